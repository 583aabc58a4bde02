#!/usr/bin/env bash
# Registers the values of the named environment variables as secrets with the runner
# (`::add-mask::`), one line at a time: a mask covers a single line of the log, so a PEM key
# masked as a whole would still show from its second line on.
#   scripts/mask.sh VAR...
set -euo pipefail
for name in "$@"; do
    value="${!name-}"
    [ -n "$value" ] || continue
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%$'\r'}"
        # Masking very short lines (a PEM's blank or one-character lines) would blot out every
        # occurrence of them in the log while hiding nothing.
        if [ "${#line}" -ge 4 ]; then
            echo "::add-mask::$line"
        fi
    done <<<"$value"
done
