#!/usr/bin/env bash
# The Dockerfile's install steps, one subcommand per stage, so that the image and CI run the same
# commands (CI has no Docker engine; it runs the stages that do not reshape the host):
#
#   builder-deps           system packages the build needs (rust:1-slim image)
#   build OUT [PROFILE]    build hyperloop (cargo profile, default release) and put it in OUT/
#   runtime-deps           git, CA certificates, Node.js/npm and the Claude Code CLI
#   user NAME UID          the unprivileged user the image runs as
#   smoke BIN [UID]        run BIN as a non-root user: --version, then init/status in a new repo
set -euo pipefail

step="${1:?usage: docker-steps.sh builder-deps|build|runtime-deps|user|smoke ...}"
shift

case "$step" in
    builder-deps)
        apt-get update
        # libgit2 (bundled by git2) and ring are C; the slim image may lack a complete toolchain.
        apt-get install -y --no-install-recommends gcc libc6-dev make pkg-config
        rm -rf /var/lib/apt/lists/*
        ;;

    build)
        out="${1:?build OUT [PROFILE]}"
        profile="${2:-release}"
        cargo build --locked --profile "$profile" --bin hyperloop
        case "$profile" in
            dev | test) dir=debug ;;
            *) dir="$profile" ;;
        esac
        mkdir -p "$out"
        install -m 0755 "${CARGO_TARGET_DIR:-target}/$dir/hyperloop" "$out/hyperloop"
        ;;

    runtime-deps)
        apt-get update
        apt-get install -y --no-install-recommends git ca-certificates nodejs npm
        npm install --global --no-audit --no-fund "@anthropic-ai/claude-code@${CLAUDE_VERSION:-latest}"
        npm cache clean --force
        rm -rf /var/lib/apt/lists/*
        # A mounted workspace belongs to another uid than the image's user; without this git
        # refuses to work in it ("dubious ownership").
        git config --system --add safe.directory '*'
        ;;

    user)
        name="${1:?user NAME UID}"
        uid="${2:?user NAME UID}"
        useradd --create-home --uid "$uid" --user-group --shell /usr/sbin/nologin "$name"
        ;;

    smoke)
        bin="${1:?smoke BIN [UID]}"
        uid="${2:-65534}"
        scratch="$(mktemp -d)"
        trap 'rm -rf "$scratch"' EXIT
        # The binary is copied where any user can run it: a build tree is often private to root.
        install -m 0755 "$bin" "$scratch/hyperloop"
        mkdir -p "$scratch/home" "$scratch/repo"
        cat >"$scratch/smoke.sh" <<'SMOKE'
set -eu
cd "$1/repo"
"$1/hyperloop" --version
git init -q -b main
git config user.name smoke && git config user.email smoke@example.com
"$1/hyperloop" init >/dev/null
git add -A && git commit -qm init
"$1/hyperloop" status
SMOKE
        if [ "$(id -u)" != 0 ]; then
            HOME="$scratch/home" sh "$scratch/smoke.sh" "$scratch"
        elif command -v setpriv >/dev/null 2>&1; then
            chown -R "$uid:$uid" "$scratch/home" "$scratch/repo"
            chmod 0755 "$scratch"
            env -i PATH="$PATH" HOME="$scratch/home" LANG=C.UTF-8 \
                setpriv --reuid="$uid" --regid="$uid" --clear-groups sh "$scratch/smoke.sh" "$scratch"
        else
            echo "*** smoke: running as root and setpriv is missing; the non-root check is SKIPPED ***" >&2
            exit 0
        fi
        echo "smoke: hyperloop runs as uid $(if [ "$(id -u)" = 0 ]; then echo "$uid"; else id -u; fi)"
        ;;

    *)
        echo "docker-steps.sh: unknown step $step" >&2
        exit 2
        ;;
esac
