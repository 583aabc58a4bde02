#!/usr/bin/env bash
# The action's main step: turns the action's inputs (passed as IN_* variables) into one hyperloop
# command line. hyperloop writes the step outputs, the job summary and the annotations itself.
set -euo pipefail

command="${IN_COMMAND:-step}"
case "$command" in
    step | run | status | plan | work | record) ;;
    *)
        echo "::error title=hyperloop action::input command must be step, run, status, plan, work or record, not '$command'"
        exit 2
        ;;
esac

if [ "$command" = work ]; then
    # An agent runs here: no forge credential, whatever reached this step, and no --repo, which
    # would ask for one. `work` reads what it needs from the checkout.
    unset GITHUB_TOKEN GH_TOKEN HYPERLOOP_APP_ID HYPERLOOP_APP_PRIVATE_KEY HYPERLOOP_APP_INSTALLATION_ID
    IN_REPO=""
fi

args=(--path "${IN_PATH:-.}")
[ -n "${IN_REPO:-}" ] && args+=(--repo "$IN_REPO")
[ -n "${IN_CONFIG:-}" ] && args+=(--config "$IN_CONFIG")
case "${IN_DRY_RUN:-false}" in
    true) args+=(--dry-run) ;;
    false | "") ;;
    *)
        echo "::error title=hyperloop action::input dry-run must be true or false, not '$IN_DRY_RUN'"
        exit 2
        ;;
esac
args+=("$command")
case "$command" in
    step | status | plan | record) args+=(--json) ;;
    work)
        if [ -z "${IN_ITEM:-}" ] || [ -z "${IN_OUT:-}" ]; then
            echo "::error title=hyperloop action::command work needs the inputs item and out"
            exit 2
        fi
        args+=("$IN_ITEM" --out "$IN_OUT")
        ;;
esac
if [ "$command" = record ]; then
    # Each entry is an output of `work` (it has item.json) or a folder holding outputs one or
    # two levels down: download-artifact puts each artifact in a folder named after it, or, for
    # a single artifact, the files straight into the path.
    outputs=()
    add_outputs() {
        if [ -f "$1/item.json" ]; then
            outputs+=("$1")
        elif [ -d "$1" ]; then
            while IFS= read -r found; do
                outputs+=("$(dirname "$found")")
            done < <(find "$1" -mindepth 2 -maxdepth 3 -name item.json -type f | sort)
        else
            echo "::warning title=hyperloop action::input dirs names '$1', which is not a folder"
        fi
    }
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        # A line that names a folder is one path, spaces and all; otherwise it is a list.
        if [ -e "$line" ]; then
            add_outputs "$line"
        else
            read -r -a words <<<"$line"
            for word in "${words[@]}"; do add_outputs "$word"; done
        fi
    done <<<"${IN_DIRS:-}"
    if [ "${#outputs[@]}" -eq 0 ]; then
        echo "::warning title=hyperloop action::no output of work found in input dirs; recording none (their leases expire and are claimed again)"
    fi
    args+=(${outputs[@]+"${outputs[@]}"})
fi
if [ -n "${IN_MAX_WORKERS:-}" ]; then
    if [ "$command" != step ] && [ "$command" != run ]; then
        echo "::warning title=hyperloop action::input max-workers applies to step and run; ignored for $command"
    else
        args+=(--max-workers "$IN_MAX_WORKERS")
    fi
fi
if [ -n "${IN_MAX_DURATION:-}" ]; then
    if [ "$command" = step ]; then
        args+=(--max-duration "$IN_MAX_DURATION")
    else
        echo "::warning title=hyperloop action::input max-duration applies to step; ignored for $command"
    fi
fi

# Agents as a user of their own where the job's user could read everything (passwordless sudo).
agent_user="${IN_AGENT_USER-auto}"
if [ "$agent_user" = auto ]; then
    if [ "${RUNNER_OS:-}" = Linux ] && [ "${RUNNER_ENVIRONMENT:-}" = github-hosted ]; then
        agent_user=hyperloop-agent
    else
        agent_user=""
    fi
fi
if [ -n "$agent_user" ]; then
    export HYPERLOOP_AGENT_USER="$agent_user"
    # The agent user reaches its checkout (inside the workspace) and the objects it borrows:
    # directories above the workspace become traversable, not listable.
    dir="$(cd "${IN_PATH:-.}" && pwd)"
    while [ "$dir" != / ]; do
        if [ -O "$dir" ]; then chmod o+x "$dir"; fi
        dir="$(dirname "$dir")"
    done
fi

# An empty input means "not given": an empty credential variable would read as a wrong one.
for name in GITHUB_TOKEN HYPERLOOP_APP_ID HYPERLOOP_APP_PRIVATE_KEY ANTHROPIC_API_KEY HYPERLOOP_LOG_FORMAT; do
    [ -n "${!name:-}" ] || unset "$name"
done

echo "hyperloop ${args[*]}"
exec hyperloop "${args[@]}"
