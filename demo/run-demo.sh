#!/usr/bin/env bash
# Builds hyperloop, makes a demo repository with two specs, and runs hyperloop on it with the
# scripted agent standing in for Claude: no GitHub account, no API key.
#   demo/run-demo.sh [DIR]     (default: a new temporary directory)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# A debug build is ready in a fraction of the time of a release build and plenty fast here;
# HYPERLOOP_DEMO_PROFILE=release builds the optimised binaries instead.
profile="${HYPERLOOP_DEMO_PROFILE:-dev}"
echo "== building hyperloop (the first build compiles its dependencies: a few minutes)"
cargo build --profile "$profile" --manifest-path "$here/Cargo.toml" --bins
target_dir="${CARGO_TARGET_DIR:-$here/target}"
if [ "$profile" = dev ]; then bin="$target_dir/debug"; else bin="$target_dir/$profile"; fi
demo="${1:-$(mktemp -d -t hyperloop-demo-XXXXXX)}"
mkdir -p "$demo"
cd "$demo"

git init -q -b main
git config user.name "Demo User"
git config user.email "demo@example.com"
mkdir -p specs
cat > specs/greeting.md <<'SPEC'
# Greeting

Print a friendly greeting.

## Acceptance criteria
- `impl/` holds the implementation
SPEC
cat > specs/farewell.md <<'SPEC'
# Farewell

Print a polite farewell.

## Acceptance criteria
- `impl/` holds the implementation
SPEC
cat > .hyperloop.yaml <<YAML
runtime:
  max_workers: 2
  agent_command: ["$bin/hyperloop-scripted-agent", "--script", "$here/demo/agent-script.yaml"]
  worker_timeout: 120
poll_interval: 0
max_cycles: 20
YAML
git add -A
git commit -q -m "Specs for the demo"

echo "== hyperloop run in $demo"
"$bin/hyperloop" run
echo
echo "== hyperloop status"
"$bin/hyperloop" status
echo
echo "== git log"
git log --oneline --decorate -n 12
echo
echo "== what the agents' work put on main"
git ls-tree -r --name-only main -- impl
echo
echo "The demo repository is $demo"
