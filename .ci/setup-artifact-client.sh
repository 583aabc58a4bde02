#!/usr/bin/env bash
# Installs GitHub's artifact client (npm @actions/artifact) into the test cache
# ($HYPERLOOP_TEST_CACHE/artifact-client) when it is missing, and reuses it otherwise.
#
# tests/it/action.rs and tests/it/fanout_action.rs run the action and the fan-out workflow under
# act, which cannot fetch actions/upload-artifact and actions/download-artifact offline; the test's stand-ins for them
# move the work outputs through act's own artifact server with this client, as the real actions
# do. @actions/artifact 2.x is the line actions/upload-artifact v4 ships. Its Azure storage client
# is held at 12.17.0: later ones drop the base64 padding of the upload URL's signature, which the
# artifact server of the act release in the cache then refuses ("Error unauthorized").
set -euo pipefail
cache="${HYPERLOOP_TEST_CACHE:-$HOME/.cache/hyperloop-test}"
dir="$cache/artifact-client"
mkdir -p "$cache"

works() {
    [ -f "$dir/.complete" ] && command -v node >/dev/null 2>&1 \
        && (cd "$dir" && node -e "require('@actions/artifact')") >/dev/null 2>&1
}
if works; then
    echo "artifact client: reusing $dir"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "*** artifact client: npm not found; the fan-out workflow test under act will be SKIPPED ***" >&2
    exit 0
fi
echo "artifact client: installing @actions/artifact into $dir"
# Into a scratch folder first, so an interrupted install never passes for a finished one.
tmp="$(mktemp -d "$cache/artifact-client.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/package.json" <<'JSON'
{
  "name": "hyperloop-test-artifact-client",
  "private": true,
  "dependencies": { "@actions/artifact": "2.3.2" },
  "overrides": { "@azure/storage-blob": "12.17.0" }
}
JSON
npm install --prefix "$tmp" --no-audit --no-fund --loglevel=error
(cd "$tmp" && node -e "require('@actions/artifact')")
touch "$tmp/.complete"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "artifact client: installed at $dir"
