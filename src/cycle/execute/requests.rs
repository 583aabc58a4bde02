//! `hyperloop retry` and `hyperloop cancel`: a person's decisions about one task, carried out as
//! state commits like any other change (and pushed, in GitHub mode).
//!
//! They reach a task three ways. The commands themselves take the step lock and commit through the
//! same machinery as a step ([`operate`]). A step that is running when `cancel` is typed would
//! hold the lock for as long as its agents work, so `cancel` also leaves a request file that the
//! running step picks up within a fraction of a second: it stops that task's agent and commits the
//! cancellation itself. In GitHub mode a person can also label the task's pull request
//! `hyperloop:retry` or `hyperloop:cancel`; the labels are read from the one listing of pull
//! requests a step makes anyway, and removed once acted on.

use std::path::PathBuf;
use std::time::Duration;

use crate::cycle::transition;
use crate::definitions;
use crate::emit;
use crate::error::{Error, Result};
use crate::state::{Changes, Repo};
use crate::target::Target;
use crate::task::Status;
use crate::task::store::INTAKE_FAILURES;

use super::{INTAKE_ID, MAX_INTAKE_ATTEMPTS, Op, StepOptions, Stepper, github_mode, wait};

/// The pull-request label that retries a failed or cancelled task.
pub const RETRY_LABEL: &str = "hyperloop:retry";
/// The pull-request label that cancels a task.
pub const CANCEL_LABEL: &str = "hyperloop:cancel";

/// How often a step with running agents looks for cancel requests.
pub(super) const POLL: Duration = Duration::from_millis(300);

fn requests_dir(repo: &Repo) -> PathBuf {
    repo.local_dir().join("state").join("requests")
}

fn request_file(repo: &Repo, task_id: &str) -> PathBuf {
    requests_dir(repo).join(format!("{task_id}.cancel"))
}

/// Leaves a cancel request for a step that runs now (local mode): it stops the task's agent at
/// once instead of letting it finish first.
pub fn request_cancel(repo: &Repo, task_id: &str) -> Result<()> {
    crate::task::store::write_atomic(&request_file(repo, task_id), b"")
}

/// Carries out `op` on `task_id` (or, for a retry, on `intake`) with the step lock held by the
/// caller: reads the state as a step does, commits the change, publishes it. Returns what to tell
/// the person. A task the operation does not apply to is a usage error (exit 2).
/// `requested`: the caller left a cancel request (see [`request_cancel`]) before it waited for
/// the lock, which a running step may have carried out already.
pub async fn operate(target: &Target, op: Op, task_id: &str, requested: bool) -> Result<String> {
    let repo = target.repo.clone();
    let defs = definitions::load(&target.config, &repo.root)?;
    let gh = match target.config.target.repo.as_deref() {
        Some(slug) => Some(github_mode::connect(slug, &repo).await?),
        None => None,
    };
    let mut stepper = Stepper::new(repo, target.config.clone(), defs, &StepOptions::default(), gh)?;
    stepper.repo.finish_interrupted_publish()?;
    stepper.sync_state_with_base()?;
    stepper.reload()?;
    let pending = request_file(&stepper.repo, task_id);
    let message = match (op, task_id) {
        (Op::Retry, INTAKE_ID) => stepper.retry_intake(),
        // A step that ran meanwhile took the request and cancelled the task itself.
        (Op::Cancel, _)
            if requested && !pending.exists() && stepper.tasks.get(task_id).is_some_and(|t| t.cancelled) =>
        {
            let mut said = stepper.cancelled_message(task_id, false);
            said.insert_str(
                said.find(';').unwrap_or(0),
                " by the running step, which stopped its agent",
            );
            Ok(said)
        }
        _ => stepper.apply_op(op, task_id, "hyperloop"),
    };
    let _ = std::fs::remove_file(&pending);
    let message = message?;
    stepper.flush_staged()?;
    stepper.repo.discard_private_indexes();
    Ok(message)
}

impl Stepper {
    /// Applies `op` to one task and commits it. `by` says who asked, for the task's record.
    pub(super) fn apply_op(&mut self, op: Op, task_id: &str, by: &str) -> Result<String> {
        let Some(task) = self.tasks.get(task_id).cloned() else {
            return Err(Error::usage(format!("no task {task_id} in {}", self.tasks_rel())));
        };
        match op {
            Op::Cancel => {
                if task.status == Status::Complete {
                    return Err(Error::usage(format!(
                        "{task_id} is complete: there is nothing to cancel"
                    )));
                }
                if task.cancelled {
                    return Err(Error::usage(format!(
                        "{task_id} is already cancelled; `hyperloop retry {task_id}` brings it back"
                    )));
                }
                let stopped = self.stop_worker(task_id);
                let mut t = task;
                let reason = format!("cancelled by {by}");
                let change = transition::cancel(&mut t, &reason);
                self.save_task(t, &change, &format!("hyperloop: cancel {task_id}"))?;
                Ok(self.cancelled_message(task_id, stopped))
            }
            Op::Retry => {
                if task.status != Status::Failed {
                    return Err(Error::usage(format!(
                        "{task_id} is {}, not failed or cancelled: there is nothing to retry",
                        task.status
                    )));
                }
                let mut t = task;
                let change = transition::retry(&mut t, self.pipeline());
                let message = match (&t.phase, t.status) {
                    (Some(phase), Status::InProgress) => format!(
                        "{task_id}: back to {phase} in round {}, with a fresh budget of {} rounds\n",
                        t.round, self.config.max_task_rounds
                    ),
                    _ => format!(
                        "{task_id}: back to not-started, with a fresh budget of {} rounds\n",
                        self.config.max_task_rounds
                    ),
                };
                self.pool.cooling.remove(task_id);
                self.save_task(t, &change, &format!("hyperloop: retry {task_id}"))?;
                Ok(message)
            }
        }
    }

    /// Stops the worker running for `task_id` in this step, if any. Returns whether there was one.
    fn stop_worker(&self, task_id: &str) -> bool {
        match self.pool.running.get(task_id) {
            Some(r) => {
                let _ = r.stop.send(true);
                true
            }
            None => false,
        }
    }

    /// What `cancel` says: whether an agent was stopped, and which tasks now wait behind this one.
    fn cancelled_message(&self, task_id: &str, stopped: bool) -> String {
        let mut dependents: Vec<&str> = Vec::new();
        let mut frontier = vec![task_id.to_string()];
        while let Some(id) = frontier.pop() {
            for t in self.tasks.values() {
                if t.status != Status::Complete
                    && t.deps.contains(&id)
                    && !dependents.contains(&t.id.as_str())
                {
                    dependents.push(&t.id);
                    frontier.push(t.id.clone());
                }
            }
        }
        dependents.sort_unstable();
        let mut msg = format!("{task_id}: cancelled");
        if stopped {
            msg.push_str(" (its running agent was stopped)");
        }
        msg.push_str("; it will not merge");
        if !dependents.is_empty() {
            msg.push_str(&format!(
                "; blocked until it is retried: {}",
                dependents.join(", ")
            ));
        }
        msg.push('\n');
        msg
    }

    /// `retry intake`: forgets the failed intakes of the current specs, so the next step runs
    /// intake again.
    fn retry_intake(&mut self) -> Result<String> {
        let Some(f) = self.intake.failures.clone() else {
            return Err(Error::usage(
                "intake has not failed: there is nothing to retry".to_string(),
            ));
        };
        if f.attempts < MAX_INTAKE_ATTEMPTS {
            return Err(Error::usage(format!(
                "intake failed {} of {MAX_INTAKE_ATTEMPTS} times and has not given up: the next step runs it again",
                f.attempts
            )));
        }
        let mut changes = Changes::default();
        changes.delete(format!("{}/{INTAKE_FAILURES}", self.tasks_rel()));
        let specs: Vec<&str> = f.specs.keys().map(String::as_str).collect();
        let spec_refs = if specs.is_empty() {
            vec![self.specs_dir()]
        } else {
            specs
        };
        let spec_refs: Vec<String> = spec_refs.into_iter().map(str::to_string).collect();
        let refs: Vec<&str> = spec_refs.iter().map(String::as_str).collect();
        self.commit(&changes, "hyperloop: retry intake", &refs, INTAKE_ID)?;
        self.intake.failures = None;
        emit!(INFO, "intake_retried", attempts_before = f.attempts);
        Ok(format!(
            "intake: its {} failed attempts are forgotten; the next step runs it again\n",
            f.attempts
        ))
    }

    /// Cancel requests left by `hyperloop cancel` while this step runs. Returns whether any was
    /// carried out.
    pub(super) fn take_cancel_requests(&mut self) -> Result<bool> {
        let dir = requests_dir(&self.repo);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(false);
        };
        let mut applied = false;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(task_id) = name.strip_suffix(".cancel") else {
                continue;
            };
            let applies = self
                .tasks
                .get(task_id)
                .is_some_and(|t| !t.cancelled && t.status != Status::Complete);
            if applies {
                let said = self.apply_op(Op::Cancel, task_id, "hyperloop cancel")?;
                emit!(
                    INFO,
                    "cancel_requested",
                    task_id = task_id,
                    outcome = said.trim_end()
                );
                applied = true;
            }
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(applied)
    }

    /// GitHub mode: the `hyperloop:cancel` and `hyperloop:retry` labels on task pull requests,
    /// from this step's listing. Each is acted on once and then removed.
    pub(super) fn take_label_requests(&mut self) -> Result<()> {
        let mut found = Vec::new();
        for t in self.tasks.values() {
            let Some(pr) = self.pr_for(t) else {
                continue;
            };
            for (label, op) in [(CANCEL_LABEL, Op::Cancel), (RETRY_LABEL, Op::Retry)] {
                if pr.has_label(label) {
                    found.push((t.id.clone(), pr.number, pr.head_ref.clone(), label, op));
                }
            }
        }
        for (task_id, number, head, label, op) in found {
            let by = format!("the {label} label on pull request #{number}");
            match self.apply_op(op, &task_id, &by) {
                Ok(said) => emit!(
                    INFO,
                    "label_command",
                    task_id = task_id.as_str(),
                    label = label,
                    outcome = said.trim_end()
                ),
                Err(e) if e.exit_code() == 2 => emit!(
                    WARN,
                    "label_command_ignored",
                    task_id = task_id.as_str(),
                    label = label,
                    reason = e.to_string().as_str()
                ),
                Err(e) => return Err(e),
            }
            let Some(gh) = self.gh.as_mut() else {
                continue;
            };
            if let Some(pr) = gh.prs.get_mut(&head) {
                pr.labels.retain(|l| l != label);
            }
            if let Err(e) = wait(gh.client.remove_label(number, label)) {
                emit!(
                    WARN,
                    "label_not_removed",
                    task_id = task_id.as_str(),
                    label = label,
                    error = e.to_string().as_str()
                );
            }
        }
        Ok(())
    }
}
