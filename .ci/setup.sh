#!/usr/bin/env bash
# Installs every optional test dependency into the test cache ($HYPERLOOP_TEST_CACHE, default
# ~/.cache/hyperloop-test), reusing what is there: the Claude Code CLI, GitHub's API simulator,
# the GitHub Actions tools (act, actionlint, shellcheck, check-jsonschema), the artifact client the
# act tests upload with, and Synapse.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-test-deps.sh
bash .ci/setup-github-sim.sh
bash .ci/setup-action-tools.sh
bash .ci/setup-artifact-client.sh
bash .ci/setup-synapse.sh
