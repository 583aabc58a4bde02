#!/usr/bin/env bash
# The action's main step: turns the action's inputs (passed as IN_* variables) into one hyperloop
# command line. hyperloop writes the step outputs, the job summary and the annotations itself.
set -euo pipefail

command="${IN_COMMAND:-step}"
case "$command" in
    step | run | status) ;;
    *)
        echo "::error title=hyperloop action::input command must be step, run or status, not '$command'"
        exit 2
        ;;
esac

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
    step) args+=(--json) ;;
    status) args+=(--json) ;;
esac
if [ -n "${IN_MAX_WORKERS:-}" ]; then
    if [ "$command" = status ]; then
        echo "::warning title=hyperloop action::input max-workers applies to step and run; ignored for status"
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
