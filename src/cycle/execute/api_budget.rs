//! The step's side of the GitHub API budget (see [`crate::forge::budget`]): the pace of
//! content-creating requests travels from step to step in a state file committed with the task
//! state, new tasks start only when their writes fit in it, writes that do not fit are deferred
//! and named in the report, and pull request descriptions are written only when what they show
//! changed.
//!
//! Deferring is safe because nearly every write is derived again from task state by the next
//! step: a task at `merge-pr` is merged by whichever step gets to it, a pull request missing for a
//! task with work is opened, a description that differs from what the task shows is rewritten.
//! The two writes that are not derived again (an approval label to take off, a branch to delete)
//! are kept in the state file until a step makes them.

use chrono::Utc;

use crate::emit;
use crate::error::{Error, Result};
use crate::forge::ForgeError;
use crate::forge::budget::{ApiUsage, PaceRecord, PendingWrite};
use crate::state::Changes;
use crate::task::{Status, Task};

use super::Stepper;
use super::pull_requests::pr_body;
use super::wait;

/// The state file's name in the tasks folder, next to the intake record.
pub const PACE_FILE: &str = ".github-api.json";

/// Task bodies as GitHub stores them may come back with `\r\n` (an edit in the web page) or
/// without the final newline.
fn same_body(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.replace("\r\n", "\n").trim().to_string();
    norm(a) == norm(b)
}

impl Stepper {
    pub(super) fn pace_path(&self) -> String {
        format!("{}/{PACE_FILE}", self.tasks_rel())
    }

    /// Reads the pace that earlier steps committed.
    pub(super) fn load_pace(&mut self) {
        let Some(gh) = self.gh.as_ref() else { return };
        let spec = format!("{}:{}", self.tip, self.pace_path());
        let Ok(out) = self.repo.git.output(["cat-file", "blob", spec.as_str()]) else {
            return;
        };
        if !out.status.success() {
            // No file yet: no content-creating request in the last hour that anyone recorded.
            return;
        }
        match serde_json::from_slice::<PaceRecord>(&out.stdout) {
            Ok(record) => gh.client.budget().load(&record),
            Err(e) => emit!(
                WARN,
                "github_pace_unreadable",
                path = self.pace_path().as_str(),
                error = e.to_string().as_str(),
                note = "pacing from this step's own requests only"
            ),
        }
    }

    /// Adds the pace to `changes` when it changed since it was last committed.
    pub(super) fn with_pace(&self, changes: &Changes) -> Option<Changes> {
        let gh = self.gh.as_ref()?;
        if !gh.client.budget().take_dirty() {
            return None;
        }
        let record = gh.client.budget().record(Utc::now());
        let text = serde_json::to_string_pretty(&record).ok()?;
        let mut all = changes.clone();
        all.put(self.pace_path(), format!("{text}\n"));
        Some(all)
    }

    /// Commits the pace when requests after the step's last commit changed it.
    pub(super) fn commit_pace(&mut self) -> Result<()> {
        let dirty = self.gh.as_ref().is_some_and(|gh| gh.client.budget().is_dirty());
        if !dirty {
            return Ok(());
        }
        let path = self.pace_path();
        self.commit(
            &Changes::default(),
            "hyperloop: GitHub API pace",
            &[&path],
            "github-api",
        )?;
        Ok(())
    }

    /// Records that a write waits for a later step, when `e` says the budget held it back.
    /// Returns whether it did (other errors are the caller's).
    pub(super) fn deferred(&self, task_id: &str, what: &str, e: &ForgeError) -> bool {
        if !e.is_rate_limit() {
            return false;
        }
        if let Some(gh) = self.gh.as_ref() {
            gh.client.budget().defer(format!("{task_id}: {what}"));
        }
        let (until, why) = match e {
            ForgeError::Paced { until, .. } => (*until, "paced"),
            ForgeError::RateLimited { retry_at, .. } => (*retry_at, "rate-limited"),
            _ => return false,
        };
        emit!(
            INFO,
            "github_write_deferred",
            task_id = task_id,
            write = what,
            reason = why,
            until = until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).as_str()
        );
        true
    }

    /// Whether one more task may start: what it will write fits in the pace beside what the
    /// tasks in flight still have to write, and the primary budget is above its reserve.
    pub(super) fn api_allows_start(&self, task_id: &str, starting: usize) -> bool {
        let Some(gh) = self.gh.as_ref() else {
            return true;
        };
        let in_flight = self
            .tasks
            .values()
            .filter(|t| matches!(t.status, Status::InProgress | Status::NeedsRebase))
            .count()
            + starting;
        if gh.client.budget().can_start(in_flight, Utc::now()) {
            return true;
        }
        gh.client
            .budget()
            .defer(format!("{task_id}: start (GitHub API budget)"));
        false
    }

    /// Writes the description of each pull request whose task moved in this step (or whose
    /// description an earlier step had to leave) and now shows something new: once per step at
    /// most, however many rounds the task went through in it. Tasks nobody moved are not
    /// compared, so an idle step costs no write whatever the descriptions say.
    pub(super) fn flush_pr_bodies(&mut self) {
        let Some(gh) = self.gh.as_ref() else { return };
        let ids = std::mem::take(&mut self.redescribe);
        let stale: Vec<(Task, u64, String)> = ids
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .filter(|t| !t.status.is_terminal())
            .filter_map(|t| {
                let pr = self.pr_for(t)?;
                // A draft at `merge-pr` gets its body with the ready mutation, in one request.
                if pr.draft && self.at_merge(t) {
                    return None;
                }
                let body = pr_body(t);
                (pr.is_open() && !same_body(&pr.body, &body)).then(|| (t.clone(), pr.number, body))
            })
            .collect();
        let mut written = Vec::new();
        for (task, number, body) in stale {
            match wait(gh.client.update_pr_body(number, &body)) {
                Ok(_) => written.push((task.branch.clone(), body)),
                Err(e) if self.deferred(&task.id, "pull request description", &e) => {
                    gh.client.budget().add_pending(PendingWrite::Describe {
                        task: task.id.clone(),
                    })
                }
                Err(e) => emit!(
                    WARN,
                    "pr_update_failed",
                    task_id = task.id.as_str(),
                    error = e.to_string().as_str()
                ),
            }
        }
        if let Some(gh) = self.gh.as_mut() {
            for (branch, body) in written {
                if let Some(pr) = branch.and_then(|b| gh.prs.get_mut(&b)) {
                    pr.body = body;
                }
            }
        }
    }

    fn at_merge(&self, t: &Task) -> bool {
        matches!(
            t.position
                .clone()
                .map(crate::pipeline::Position)
                .as_ref()
                .and_then(|p| crate::pipeline::step_at(self.pipeline(), p)),
            Some(s) if s.is_merge()
        )
    }

    fn make_write(&self, write: &PendingWrite) -> std::result::Result<(), ForgeError> {
        let Some(gh) = self.gh.as_ref() else {
            return Ok(());
        };
        match write {
            PendingWrite::RemoveLabel { pr, label } => wait(gh.client.remove_label(*pr, label)).map(|_| ()),
            PendingWrite::DeleteBranch { branch } => wait(gh.client.delete_branch(branch)).map(|_| ()),
            // Written with the other descriptions at the end of the step.
            PendingWrite::Describe { .. } => Ok(()),
        }
    }

    /// Makes the writes earlier steps had to leave; what still does not fit waits again.
    pub(super) fn run_pending_writes(&mut self) {
        let Some(gh) = self.gh.as_ref() else { return };
        for write in gh.client.budget().take_pending() {
            if let PendingWrite::Describe { task } = write {
                self.redescribe.insert(task);
            } else {
                self.write_or_keep("-", write);
            }
        }
    }

    /// A write that no later step derives again: made now, or remembered for the next step.
    pub(super) fn write_or_keep(&self, task_id: &str, write: PendingWrite) {
        let Some(gh) = self.gh.as_ref() else { return };
        let Err(e) = self.make_write(&write) else {
            return;
        };
        let what = match &write {
            PendingWrite::RemoveLabel { pr, label } => format!("remove label {label} from #{pr}"),
            PendingWrite::DeleteBranch { branch } => format!("delete branch {branch}"),
            PendingWrite::Describe { task } => format!("describe {task}"),
        };
        if self.deferred(task_id, &what, &e) {
            gh.client.budget().add_pending(write);
        } else {
            emit!(
                WARN,
                "github_write_failed",
                task_id = task_id,
                write = what.as_str(),
                error = e.to_string().as_str()
            );
        }
    }

    /// What the report shows about the API.
    pub(super) fn api_usage(&self) -> Option<ApiUsage> {
        self.gh.as_ref().map(|gh| gh.client.budget().usage(Utc::now()))
    }
}

/// A rate limit met by a write that must happen in this step's order (a merge): the caller
/// stops trying this task in this step.
pub(super) fn is_held(e: &Error) -> bool {
    matches!(e, Error::RateLimited { .. })
}
