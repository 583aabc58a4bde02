//! Tasks: the unit of work, one Markdown file with YAML front matter per task under
//! `<specs_dir>/tasks/`. [`file`] owns the on-disk format; [`store`] finds and writes the files.

pub mod fast;
pub mod file;
pub mod store;

use serde::{Deserialize, Serialize};

/// A task's lifecycle state, spelled as hyperloop 0.9.2 spelled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    NotStarted,
    InProgress,
    NeedsRebase,
    Complete,
    Failed,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::NotStarted,
        Status::InProgress,
        Status::NeedsRebase,
        Status::Complete,
        Status::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::NotStarted => "not-started",
            Status::InProgress => "in-progress",
            Status::NeedsRebase => "needs-rebase",
            Status::Complete => "complete",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Complete | Status::Failed)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that a worker was started for this task, or (a lease, with `item`) that `plan` handed
/// the task's next agent run to a `work` job elsewhere. Written (and committed) before the worker
/// starts, cleared when its result is recorded; a claim whose holder is gone, or a lease past
/// `expires_at`, marks a run that will never be recorded, and the task is claimable again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// The role the worker runs.
    pub role: String,
    /// `host:pid` of the step that started the worker.
    pub owner: String,
    /// The worker's process group, when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgid: Option<i32>,
    /// Unix seconds when the worker started.
    pub started_at: u64,
    /// Unix seconds after which nobody may still be running this worker (start + timeout + grace).
    pub expires_at: u64,
    /// A random token also written into the worker's environment, so a result file left on disk
    /// can be matched to the claim that produced it.
    pub nonce: String,
    /// The work item's id (a lease): what `work` and `record` name it by. Ends with part of
    /// the nonce, so an item re-issued after its lease expired has another id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    /// The task's round the item was claimed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// The commit the agent is given (the task branch's tip when claimed): its output must be
    /// commits that descend from it, and the branch must still be there when it is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

impl Claim {
    /// Whether this claim is a lease of `plan` that has not expired at `now`.
    pub fn live_lease(&self, now: u64) -> bool {
        self.item.is_some() && self.expires_at > now
    }
}

/// One finished worker run, kept in the task's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub round: u32,
    pub role: String,
    pub verdict: String,
    #[serde(default)]
    pub findings: u32,
    #[serde(default)]
    pub duration_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// The GitHub Actions run that recorded it (`GITHUB_RUN_ID`), whose artifacts hold its
    /// transcript; none outside Actions and in files written before runs were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<u64>,
}

impl Attempt {
    /// The current Actions run's id, for the attempt being recorded.
    pub fn current_run_id() -> Option<u64> {
        std::env::var("GITHUB_RUN_ID").ok()?.trim().parse().ok()
    }
}

/// A task as read from (and written back to) its file. Known fields are typed; every other
/// front-matter field is kept in `extra`, in its original order, and written back unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    pub title: String,
    pub spec_ref: String,
    pub status: Status,
    /// Human-readable name of the current pipeline step (0.9.2 compatible).
    pub phase: Option<String>,
    pub deps: Vec<String>,
    pub round: u32,
    pub branch: Option<String>,
    pub pr: Option<String>,
    /// The exact pipeline position (hyperloop's own field). `None` in 0.9.2 files.
    pub position: Option<Vec<usize>>,
    /// Agent spend so far, as reported by the agents.
    pub cost_usd: f64,
    /// Consecutive merge conflicts since the last clean merge attempt.
    pub rebase_attempts: u32,
    /// The gate at `position` has been cleared (local approve or GitHub label).
    pub gate_cleared: bool,
    /// The verdict of the latest worker.
    pub last_verdict: Option<String>,
    /// Why the task failed, once it has.
    pub failure_reason: Option<String>,
    /// The branch tip the task's last passing agent left (what was verified): a merge takes
    /// exactly this commit.
    pub verified_tip: Option<String>,
    /// The branch tip the forge refused to accept: not pushed again unchanged.
    pub refused_tip: Option<String>,
    /// A person stopped the task (`hyperloop cancel`); its status is `failed`.
    pub cancelled: bool,
    /// The round at which the task's round budget starts: rounds before it were spent before
    /// the last `hyperloop retry`, and do not count against `max_task_rounds`.
    pub rounds_from: u32,
    /// A worker started for this task that has not been recorded yet.
    pub claim: Option<Claim>,
    /// Every finished worker run.
    pub history: Vec<Attempt>,
    /// Front-matter fields hyperloop does not know, in file order.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// The Markdown body: the task's spec, then `## Findings`.
    pub body: String,
}

impl Task {
    pub fn new(id: impl Into<String>, title: impl Into<String>, spec_ref: impl Into<String>) -> Self {
        Task {
            id: id.into(),
            title: title.into(),
            spec_ref: spec_ref.into(),
            status: Status::NotStarted,
            phase: None,
            deps: Vec::new(),
            round: 0,
            branch: None,
            pr: None,
            position: None,
            cost_usd: 0.0,
            rebase_attempts: 0,
            gate_cleared: false,
            last_verdict: None,
            failure_reason: None,
            verified_tip: None,
            refused_tip: None,
            cancelled: false,
            rounds_from: 0,
            claim: None,
            history: Vec::new(),
            extra: serde_json::Map::new(),
            body: String::new(),
        }
    }
}

/// Task id used for the intake worker (CONTRACT §4).
pub const INTAKE_ID: &str = "intake";

/// Task id used for the process improver (CONTRACT §4).
pub const IMPROVER_ID: &str = "process-improvement";

/// The heading that starts the findings section of a task body (0.9.2 compatible).
pub const FINDINGS_HEADING: &str = "## Findings";

impl Task {
    /// Rounds spent since the round budget was last renewed.
    pub fn rounds_used(&self) -> u32 {
        self.round.saturating_sub(self.rounds_from)
    }

    /// The task's own spec: the body before the findings section.
    pub fn spec_text(&self) -> &str {
        match find_findings(&self.body) {
            Some(idx) => self.body[..idx].trim_end(),
            None => self.body.trim_end(),
        }
    }

    /// Findings recorded by earlier rounds (empty when none).
    pub fn findings(&self) -> &str {
        match find_findings(&self.body) {
            Some(idx) => self.body[idx + FINDINGS_HEADING.len()..].trim(),
            None => "",
        }
    }

    /// Appends one round's findings under the findings heading, marked with round and role.
    pub fn append_findings(&mut self, round: u32, role: &str, verdict: &str, detail: &str) {
        if find_findings(&self.body).is_none() {
            let spec = self.body.trim_end().to_string();
            self.body = if spec.is_empty() {
                format!("{FINDINGS_HEADING}\n")
            } else {
                format!("{spec}\n\n{FINDINGS_HEADING}\n")
            };
        }
        if !self.body.ends_with('\n') {
            self.body.push('\n');
        }
        let detail = detail.trim();
        let detail = if detail.is_empty() {
            "(no detail given)"
        } else {
            detail
        };
        self.body
            .push_str(&format!("\n### Round {round} — {role}: {verdict}\n\n{detail}\n"));
    }

    /// Removes the findings section (the task passed its pipeline).
    pub fn clear_findings(&mut self) {
        if let Some(idx) = find_findings(&self.body) {
            let spec = self.body[..idx].trim_end().to_string();
            self.body = if spec.is_empty() {
                String::new()
            } else {
                format!("{spec}\n")
            };
        }
    }
}

/// Byte offset of the findings heading when it starts a line.
fn find_findings(body: &str) -> Option<usize> {
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        if line.trim_end() == FINDINGS_HEADING {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_append_and_clear() {
        let mut t = Task::new("task-001", "T", "specs/a.md");
        t.body = "Do the thing.\n".into();
        assert_eq!(t.findings(), "");
        t.append_findings(0, "verifier", "fail", "tests missing");
        t.append_findings(1, "verifier", "error", "");
        assert_eq!(t.spec_text(), "Do the thing.");
        assert!(
            t.findings()
                .contains("### Round 0 — verifier: fail\n\ntests missing")
        );
        assert!(
            t.findings()
                .contains("### Round 1 — verifier: error\n\n(no detail given)")
        );
        t.clear_findings();
        assert_eq!(t.body, "Do the thing.\n");
    }

    #[test]
    fn findings_heading_must_start_a_line() {
        let mut t = Task::new("t", "T", "s");
        t.body = "Mentions ## Findings inline\n## Findings\nold\n".into();
        assert_eq!(t.findings(), "old");
        assert_eq!(t.spec_text(), "Mentions ## Findings inline");
    }
}
