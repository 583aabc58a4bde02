#!/usr/bin/env bash
# Fills the test-dependency cache ($HYPERLOOP_TEST_CACHE) when it is empty, reuses it otherwise.
#
# - claude/: the real Claude Code CLI (npm @anthropic-ai/claude-code, a ~245 MB native binary),
#   driven offline by tests/it/claude_cli.rs against a scripted Messages API on loopback.
set -euo pipefail
cache="${HYPERLOOP_TEST_CACHE:-$HOME/.cache/hyperloop-test}"
mkdir -p "$cache"
echo "test dependency cache: $cache"

claude_dir="$cache/claude"
claude_bin="$claude_dir/node_modules/.bin/claude"
if [ -x "$claude_bin" ] && "$claude_bin" --version >/dev/null 2>&1; then
    echo "claude CLI: reusing $("$claude_bin" --version) at $claude_bin"
elif command -v npm >/dev/null 2>&1; then
    echo "claude CLI: installing @anthropic-ai/claude-code into $claude_dir"
    mkdir -p "$claude_dir"
    # Install into a scratch prefix first so an interrupted download never leaves a half-filled
    # cache that later runs would mistake for a working one.
    tmp="$(mktemp -d "$cache/claude.tmp.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    npm install --prefix "$tmp" --no-audit --no-fund --loglevel=error @anthropic-ai/claude-code
    "$tmp/node_modules/.bin/claude" --version
    rm -rf "$claude_dir"
    mv "$tmp" "$claude_dir"
    trap - EXIT
    echo "claude CLI: installed $("$claude_bin" --version)"
else
    echo "claude CLI: npm not found; tests/it/claude_cli.rs will be skipped" >&2
fi
