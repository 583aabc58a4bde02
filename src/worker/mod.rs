//! Workers: agent processes in git worktrees, with limits, a clean environment and a verdict.
//!
//! This module owns everything between "this task needs a worker for role X" and "here is what the
//! worker did": the task's worktree ([`worktree`]), the agent's environment ([`env`]), the process
//! itself with its process group, timeouts and cancellation ([`process`]), the result file and the
//! clean-up of what the agent left on its branch ([`result`]), the cost report in claude's
//! stream-json output ([`stream_json`]). It decides nothing about pipelines, nor how many workers
//! run at once (the cycle's scheduler bounds that): a [`WorkerOutcome`] is handed back to the
//! cycle, which turns it into task state.
//!
//! An outcome's `suspicious` note (an implementer that reported `pass` without changing its
//! branch) does not change the verdict; the cycle records it as a finding on the task so that a
//! person or the verifier sees it.

pub mod agent_user;
pub mod env;
pub mod process;
pub mod result;
pub mod stream_json;
pub mod supervisor;
pub mod worktree;

use std::path::PathBuf;
use std::time::Duration;

pub use process::{WorkerSpec, run_worker};
pub use worktree::{ensure_base_worktree, ensure_task_worktree, remove_worktree, remove_worktree_and_branch};

/// The name of the result file at a worktree's root (CONTRACT §4).
pub const RESULT_FILE: &str = ".worker-result.json";

/// What a worker run amounted to: the pipeline's own verdict type. Agents may only write `pass`
/// or `fail`; `error` and `timeout` are hyperloop's own judgements.
pub use crate::pipeline::Verdict;

/// Everything a finished (or killed) worker tells the cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerOutcome {
    pub verdict: Verdict,
    pub findings: u32,
    /// The agent's own detail, or hyperloop's reason for `error`/`timeout`.
    pub detail: String,
    /// The agent's exit status; `None` when it was killed by a signal or never started.
    pub exit_code: Option<i32>,
    pub duration: Duration,
    /// Everything the agent printed, kept after the run.
    pub log_file: PathBuf,
    /// From claude's stream-json `result` event, when the agent printed one.
    pub cost_usd: Option<f64>,
    pub num_turns: Option<u32>,
    pub session_id: Option<String>,
    pub is_error: Option<bool>,
    /// A reason to distrust a `pass` (recorded as a finding by the cycle; the verdict stands).
    pub suspicious: Option<String>,
    /// Commits added to the worktree's HEAD during the run, oldest first, including the ones
    /// hyperloop made for the agent (left-over work, dropping the result file).
    pub commits: Vec<String>,
    /// The agent's process group, once it was started.
    pub pgid: Option<i32>,
}

impl WorkerOutcome {
    /// An outcome for a worker that never produced anything.
    pub(crate) fn error(detail: impl Into<String>, log_file: PathBuf, duration: Duration) -> Self {
        WorkerOutcome {
            verdict: Verdict::Error,
            findings: 0,
            detail: detail.into(),
            exit_code: None,
            duration,
            log_file,
            cost_usd: None,
            num_turns: None,
            session_id: None,
            is_error: None,
            suspicious: None,
            commits: Vec::new(),
            pgid: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_spelling() {
        for v in [Verdict::Pass, Verdict::Fail, Verdict::Error, Verdict::Timeout] {
            let json = serde_json::to_string(&v).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", v.as_str()));
        }
    }
}
