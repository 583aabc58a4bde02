#!/usr/bin/env bash
# Installs the Synapse Matrix homeserver (PyPI matrix-synapse) into a virtualenv in the
# test-dependency cache ($HYPERLOOP_TEST_CACHE/synapse-venv), reusing it when present.
# tests/it/matrix.rs starts it on loopback and runs the Matrix notifier against it: registration
# with a token, room creation, invitations and threads are checked against a real homeserver
# rather than a fake of our own. Without the install those tests say loudly that they were skipped.
set -euo pipefail
cache="${HYPERLOOP_TEST_CACHE:-$HOME/.cache/hyperloop-test}"
venv="$cache/synapse-venv"
mkdir -p "$cache"

if [ -f "$venv/.installed" ] && "$venv/bin/python" -c 'import synapse' 2>/dev/null; then
    echo "synapse: reusing $("$venv/bin/python" -c 'import synapse; print(synapse.__version__)') at $venv"
    exit 0
fi
python="$(command -v python3 || true)"
if [ -z "$python" ] || ! "$python" -c 'import venv' 2>/dev/null; then
    echo "synapse: python3 with venv not found; tests/it/matrix.rs will be skipped" >&2
    exit 0
fi
echo "synapse: installing matrix-synapse into $venv"
# A virtualenv's scripts hold its absolute path, so it is built in place; the marker written last
# tells a finished install from an interrupted one.
rm -rf "$venv"
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check matrix-synapse
"$venv/bin/python" -c 'import synapse; print("synapse: installed", synapse.__version__)'
touch "$venv/.installed"
trap - EXIT
