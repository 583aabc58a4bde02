#!/usr/bin/env bash
# Installs GitHub's artifact client (npm @actions/artifact, the library actions/upload-artifact is
# built on) into the test-dependency cache ($HYPERLOOP_TEST_CACHE/artifact-client), reusing it when
# present. tests/it/action.rs serves a stand-in for actions/upload-artifact to act (which cannot
# fetch the real one offline) that uploads with this client to act's own artifact server, so the
# action's upload step really speaks the artifact protocol. Without the install the act tests say
# loudly that they were skipped.
set -euo pipefail
cache="${HYPERLOOP_TEST_CACHE:-$HOME/.cache/hyperloop-test}"
dir="$cache/artifact-client"
pkg="@actions/artifact"
# The version actions/upload-artifact v4.6.2 is built with.
version="2.3.2"
mkdir -p "$cache"

if [ -f "$dir/node_modules/$pkg/package.json" ] \
    && grep -q "\"version\": \"$version\"" "$dir/node_modules/$pkg/package.json"; then
    echo "artifact client: reusing $pkg@$version at $dir"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    echo "*** artifact client: node/npm not found; the act tests will be SKIPPED ***" >&2
    exit 0
fi
echo "artifact client: installing $pkg@$version into $dir"
# A scratch prefix first, so an interrupted install never looks like a finished one.
tmp="$(mktemp -d "$cache/artifact-client.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
npm install --prefix "$tmp" --no-audit --no-fund --loglevel=error "$pkg@$version"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "artifact client: installed at $dir"
