//! Workers: agent processes in git worktrees, with limits, a clean environment and a verdict.
