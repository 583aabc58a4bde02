//! The commands for operating hyperloop day to day: `retry`, `cancel` and `logs`, and the
//! preflight every `step` and `run` goes through first.

use std::time::Duration;

use crate::cycle::execute::{self, Op};
use crate::emit;
use crate::error::{Error, Result};
use crate::lock::StepLock;
use crate::target::{Outcome, Target};
use crate::task::Status;

/// Checks what a step is about to need before it changes anything (see [`crate::preflight`]).
/// For `--dry-run`, a missing agent program is a line in the plan rather than an error, so that
/// the rest can still be looked at; the text to add to the plan is returned.
pub fn preflight(target: &Target, dry_run: bool) -> Result<String> {
    preflight_repository(target)?;
    let config = &target.config;
    let mut note = String::new();
    match crate::preflight::check_agent(config, &target.config_file, &target.repo.root) {
        Ok(()) => {}
        Err(e) if dry_run => note.push_str(&format!("# preflight\nstep would stop here: {e}\n")),
        Err(e) => return Err(e),
    }
    if let Some(gap) =
        crate::preflight::claude_credential_gap(&config.runtime.agent_command, |k| std::env::var(k).ok())
    {
        emit!(WARN, "agent_credential_missing", detail = gap.as_str());
    }
    Ok(note)
}

/// The part of [`preflight`] that concerns the repository, not the agent: what `plan` checks,
/// whose agents run elsewhere (on the `work` runners), so the agent program need not be here.
pub fn preflight_repository(target: &Target) -> Result<()> {
    let config = &target.config;
    if config.target.repo.is_none() {
        // In GitHub mode the base branch comes from origin; the step fetches it and says so.
        crate::preflight::check_base_branch(&target.repo, config, &target.config_file)?;
    }
    let unseen = &target.unseen;
    if !unseen.is_empty() {
        let mut shown: Vec<&str> = unseen.iter().take(10).map(String::as_str).collect();
        let more = unseen.len().saturating_sub(shown.len());
        let extra = format!("and {more} more");
        if more > 0 {
            shown.push(&extra);
        }
        emit!(
            WARN,
            "uncommitted_changes_unseen",
            paths = shown.join(", ").as_str(),
            hint = "a step reads the configuration, the agents overlay and the specs from the base branch's last commit; commit these changes for it to see them"
        );
    }
    Ok(())
}

/// A line for `status` when intake is failing or gave up; empty otherwise.
pub fn intake_note(target: &Target) -> Result<String> {
    let Some(tip) = target.repo.branch_tip(target.config.state_branch())? else {
        return Ok(String::new());
    };
    let tree = target
        .repo
        .read_tree_state(&tip, &target.config.target.specs_dir)?;
    let Some(f) = tree.intake_failures else {
        return Ok(String::new());
    };
    let last = f.last_error.lines().next().unwrap_or("").trim();
    Ok(if f.attempts >= execute::MAX_INTAKE_ATTEMPTS {
        format!(
            "\nintake gave up after {} attempts (last error: {last}); {}\n",
            f.attempts,
            execute::INTAKE_GAVE_UP_HINT
        )
    } else {
        format!(
            "\nintake failed {} of {} times (last error: {last}); the next step tries again\n",
            f.attempts,
            execute::MAX_INTAKE_ATTEMPTS
        )
    })
}

/// Takes the step lock, waiting for a running step to end; says once that it waits.
fn wait_for_lock(target: &Target, task_id: &str, what: &str) -> Result<StepLock> {
    let path = target.repo.common_dir.join("hyperloop.lock");
    let mut said = false;
    loop {
        match StepLock::acquire(&path) {
            Ok(l) => return Ok(l),
            Err(Error::Busy { .. }) => {
                if !said {
                    emit!(
                        INFO,
                        "command_waiting",
                        command = what,
                        task_id = task_id,
                        reason = "a step is running; this is recorded as soon as it lets go"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `retry TASK` / `retry intake` / `cancel TASK`.
pub fn retry_or_cancel(target: &Target, op: Op, task_id: &str) -> Result<Outcome> {
    let github = target.config.target.repo.is_some();
    if op == Op::Cancel && task_id == execute::INTAKE_ID {
        return Err(Error::usage(
            "intake is not a task: there is nothing to cancel".to_string(),
        ));
    }
    let mut requested = false;
    if op == Op::Cancel {
        // Checked against the committed state first, so that a mistyped id never leaves a
        // request behind; then a step running in this checkout can act on it at once. In GitHub
        // mode the local copy of the state may lag origin, so only origin's answer (below) is
        // final.
        let tasks = target.committed_tasks()?;
        let refusal = match tasks.iter().find(|t| t.id == task_id) {
            None => Some(format!(
                "no task {task_id} in {}/tasks",
                target.config.target.specs_dir.trim_end_matches('/')
            )),
            Some(t) if t.status == Status::Complete => {
                Some(format!("{task_id} is complete: there is nothing to cancel"))
            }
            Some(t) if t.cancelled => Some(format!(
                "{task_id} is already cancelled; `hyperloop retry {task_id}` brings it back"
            )),
            Some(_) => None,
        };
        match refusal {
            Some(why) if !github => return Err(Error::usage(why)),
            Some(_) => {}
            None => {
                execute::request_cancel(&target.repo, task_id)?;
                requested = true;
            }
        }
    }
    let what = match op {
        Op::Retry => "retry",
        Op::Cancel => "cancel",
    };
    let _lock = wait_for_lock(target, task_id, what)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::other(format!("cannot start the async runtime: {e}")))?;
    let text = rt.block_on(execute::operate(target, op, task_id, requested))?;
    Ok(Outcome {
        stdout: text,
        exit_code: 0,
    })
}
