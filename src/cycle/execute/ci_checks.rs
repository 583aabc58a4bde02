//! The repository's own CI as part of verification. In GitHub mode `merge-pr` merges only when
//! the pull request's head has passed the checks `merge.checks` names; pending checks hold the
//! task at its step without spending an agent, failed ones send it back to its implementer with
//! their summaries and annotations as findings, checks that never start are named with the reason
//! (a job token's pushes start no workflow). In local mode `merge.local_checks` runs a command in
//! the task's checkout before the merge, its failure output becoming the finding.
//!
//! How long a task has waited is counted on GitHub's clock from the first step that saw it wait
//! at this head, recorded in the task file (`checks_head`, `checks_since`), so that the timeout
//! holds across steps and a new head starts a new wait.

use std::process::Stdio;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;

use crate::config::ChecksPolicy;
use crate::cycle::plan::FailureNote;
use crate::cycle::transition;
use crate::emit;
use crate::error::Result;
use crate::forge::checks::{self, PrChecks, Verdict};
use crate::pipeline;
use crate::task::Task;
use crate::worker::worktree;

use super::Stepper;
use super::pull_requests::pr_number;
use super::wait;

const HEAD_KEY: &str = "checks_head";
const SINCE_KEY: &str = "checks_since";
const NOTE_KEY: &str = "checks_note";

/// The most of a failed local check's output that goes into the findings.
const LOCAL_OUTPUT_TAIL: usize = 6000;

/// Whether `merge-pr` may go on.
pub(super) enum Gate {
    Go,
    /// Not now; `true` when the task's state changed (and was committed).
    Hold(bool),
}

fn clear_wait(t: &mut Task) -> bool {
    let mut changed = false;
    for key in [HEAD_KEY, SINCE_KEY, NOTE_KEY] {
        changed |= t.extra.remove(key).is_some();
    }
    changed
}

impl Stepper {
    /// The checks of `number`, read (with those of every other task at `merge-pr`) by the step's
    /// one query. `None` when that query did not cover it: it opened after the query, so its
    /// checks cannot have reported yet.
    fn checks_of(&mut self, number: u64) -> std::result::Result<Option<PrChecks>, crate::forge::ForgeError> {
        let Some(gh) = self.gh.as_ref() else {
            return Ok(None);
        };
        if gh.checks_read {
            return Ok(gh.checks.get(&number).cloned());
        }
        let mut numbers: Vec<u64> = self
            .tasks
            .values()
            .filter(|t| {
                matches!(
                    t.position
                        .clone()
                        .map(pipeline::Position)
                        .as_ref()
                        .and_then(|p| pipeline::step_at(self.pipeline(), p)),
                    Some(s) if s.is_merge()
                )
            })
            .filter_map(|t| t.pr.as_deref().and_then(pr_number))
            .collect();
        numbers.push(number);
        numbers.sort_unstable();
        numbers.dedup();
        let read = wait(gh.client.pr_checks(&numbers))?;
        if let Some(gh) = self.gh.as_mut() {
            gh.checks_read = true;
            gh.checks = read.into_iter().map(|c| (c.number, c)).collect();
            return Ok(gh.checks.get(&number).cloned());
        }
        Ok(None)
    }

    /// Looks at the checks of the task's pull request before its merge.
    pub(super) fn checks_gate(&mut self, t: &mut Task, number: u64, head: &str) -> Result<Gate> {
        let policy = self.config.merge.checks;
        if policy == ChecksPolicy::None {
            return Ok(Gate::Go);
        }
        let id = t.id.clone();
        let read = match self.checks_of(number) {
            Ok(read) => read,
            Err(e) => {
                if !self.deferred(&id, "read its checks", &e) {
                    emit!(
                        WARN,
                        "checks_unreadable",
                        task_id = id.as_str(),
                        error = e.to_string().as_str()
                    );
                }
                return Ok(Gate::Hold(false));
            }
        };
        let server_now = self
            .gh
            .as_ref()
            .map_or_else(Utc::now, |gh| gh.client.budget().server_now(Utc::now()))
            .timestamp();
        // The wait is counted from the first step that saw this head wait.
        let mut changed = false;
        let same_head = t.extra.get(HEAD_KEY).and_then(Value::as_str) == Some(head);
        let since = match t.extra.get(SINCE_KEY).and_then(Value::as_i64) {
            Some(since) if same_head => since,
            _ => {
                clear_wait(t);
                t.extra.insert(HEAD_KEY.into(), Value::String(head.to_string()));
                t.extra.insert(SINCE_KEY.into(), Value::from(server_now));
                changed = true;
                server_now
            }
        };
        let fresh = self
            .gh
            .as_ref()
            .is_none_or(|gh| gh.listed_heads.get(&number).map(String::as_str) != Some(head));
        let verdict = match read.filter(|r| r.head_sha == head) {
            // A head this step pushed, with nothing reported: CI may not have registered its
            // runs yet, and merging now would merge before CI started. The next step decides;
            // an unprotected repository with no checks at all merges then.
            Some(pr) if fresh && pr.checks.is_empty() => Verdict::Wait { names: pr.required },
            Some(pr) => checks::evaluate(
                &pr,
                policy,
                server_now - since,
                i64::try_from(self.config.merge.checks_timeout).unwrap_or(i64::MAX),
            ),
            // Pushed or opened after the step read the checks: nothing can have reported yet.
            None if server_now - since
                >= i64::try_from(self.config.merge.checks_timeout).unwrap_or(i64::MAX) =>
            {
                Verdict::TimedOut {
                    names: vec!["(no check reported)".into()],
                }
            }
            None => Verdict::Wait { names: Vec::new() },
        };
        match verdict {
            Verdict::Merge => {
                // The wait is over; the merge commits the task without it.
                clear_wait(t);
                Ok(Gate::Go)
            }
            Verdict::Wait { names } => {
                let shown = if names.is_empty() {
                    "waiting for checks to report".to_string()
                } else {
                    format!("waiting for checks: {}", names.join(", "))
                };
                emit!(
                    INFO,
                    "waiting_for_checks",
                    task_id = id.as_str(),
                    pr = number,
                    checks = names.join(",").as_str(),
                    waited_s = server_now - since
                );
                self.report.checks.push(format!("{id}: {shown}"));
                if changed {
                    self.save_task(
                        t.clone(),
                        &super::no_change(t),
                        &format!("hyperloop: {id} waits for checks"),
                    )?;
                }
                Ok(Gate::Hold(changed))
            }
            Verdict::NeverStarted { names } => {
                let note = format!(
                    "checks never started: {} on {} — GitHub starts no workflow for a push made with a workflow's job token (GITHUB_TOKEN); run hyperloop as a GitHub App (README: \"Checks and CI\") so that its pushes trigger CI",
                    names.join(", "),
                    &head[..head.len().min(12)]
                );
                emit!(
                    WARN,
                    "checks_never_started",
                    task_id = id.as_str(),
                    pr = number,
                    checks = names.join(",").as_str(),
                    hint = "use a GitHub App: a job token's pushes start no workflow"
                );
                self.report.checks.push(format!("{id}: {note}"));
                if t.extra.get(NOTE_KEY).and_then(Value::as_str) != Some(note.as_str()) {
                    t.extra.insert(NOTE_KEY.into(), Value::String(note));
                    changed = true;
                }
                if changed {
                    self.save_task(
                        t.clone(),
                        &super::no_change(t),
                        &format!("hyperloop: {id} checks never started"),
                    )?;
                }
                Ok(Gate::Hold(changed))
            }
            Verdict::Failed { checks: failed } => {
                let detail = checks::findings(&failed);
                self.loop_back_on_checks(t, &detail, u32::try_from(failed.len()).unwrap_or(u32::MAX))?;
                Ok(Gate::Hold(true))
            }
            Verdict::TimedOut { names } => {
                let mut reason = format!(
                    "checks did not finish within merge.checks_timeout ({} s): {}",
                    self.config.merge.checks_timeout,
                    names.join(", ")
                );
                if let Some(note) = t.extra.get(NOTE_KEY).and_then(Value::as_str) {
                    reason = format!("{reason}; {note}");
                }
                clear_wait(t);
                let change = transition::fail_task(t, &reason);
                self.save_task(
                    t.clone(),
                    &change,
                    &format!("hyperloop: {id} failed (checks timed out)"),
                )?;
                Ok(Gate::Hold(true))
            }
        }
    }

    /// Failed checks become findings and the task goes back to its implementer.
    fn loop_back_on_checks(&mut self, t: &mut Task, detail: &str, findings: u32) -> Result<()> {
        let id = t.id.clone();
        let round = t.round;
        clear_wait(t);
        let change =
            transition::checks_failed(t, self.pipeline(), detail, findings, self.config.max_task_rounds);
        emit!(
            WARN,
            "checks_failed",
            task_id = id.as_str(),
            round = round,
            findings = findings
        );
        self.improver.failures.push(FailureNote {
            task_id: id.clone(),
            role: "checks".into(),
            round,
            verdict: "fail".into(),
            detail: detail.to_string(),
        });
        self.report
            .checks
            .push(format!("{id}: checks failed; back to the implementer"));
        self.save_task(
            t.clone(),
            &change,
            &format!("hyperloop: {id} checks failed (round {round})"),
        )
    }

    /// Local mode: runs `merge.local_checks` in the task's checkout. `Go` when it passes (or none
    /// is configured); a failure loops the task back with the command's output.
    pub(super) fn local_checks_gate(&mut self, t: &mut Task) -> Result<Gate> {
        let Some(command) = self.config.merge.local_checks.clone() else {
            return Ok(Gate::Go);
        };
        let id = t.id.clone();
        let dir = worktree::task_worktree_path(&self.repo.root, &id);
        if !dir.is_dir() {
            // No checkout (nothing was ever committed for the task): nothing to check.
            return Ok(Gate::Go);
        }
        let timeout = Duration::from_secs(self.config.merge.checks_timeout);
        let secret_env = self.secret_env();
        let env =
            crate::worker::env::inherited(std::env::vars_os(), &self.config.runtime.agent_env, &secret_env);
        let outcome = wait(run_local_checks(&command, &dir, env, timeout));
        match outcome {
            LocalOutcome::Passed => {
                emit!(
                    INFO,
                    "local_checks_passed",
                    task_id = id.as_str(),
                    command = command.as_str()
                );
                Ok(Gate::Go)
            }
            LocalOutcome::Failed { code, output } => {
                let mut tail = output.trim().to_string();
                if tail.len() > LOCAL_OUTPUT_TAIL {
                    let mut cut = tail.len() - LOCAL_OUTPUT_TAIL;
                    while !tail.is_char_boundary(cut) {
                        cut += 1;
                    }
                    tail = format!("…{}", &tail[cut..]);
                }
                let detail = format!(
                    "### Check `{command}`: {}\n\n```\n{tail}\n```\n",
                    code.map_or("timed out or was killed".to_string(), |c| format!("exit {c}"))
                );
                self.loop_back_on_checks(t, &detail, 1)?;
                Ok(Gate::Hold(true))
            }
        }
    }
}

enum LocalOutcome {
    Passed,
    Failed { code: Option<i32>, output: String },
}

/// Runs `command` with `sh -c` in `dir` with an agent's environment (the code under check is an
/// agent's: it gets no credential), standard output and error together, killed with its process
/// group at `timeout`.
async fn run_local_checks(
    command: &str,
    dir: &std::path::Path,
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    timeout: Duration,
) -> LocalOutcome {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("exec 2>&1; {command}"))
        .current_dir(dir)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return LocalOutcome::Failed {
                code: None,
                output: format!("could not start `sh -c {command}`: {e}"),
            };
        }
    };
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => LocalOutcome::Passed,
        Ok(Ok(out)) => LocalOutcome::Failed {
            code: out.status.code(),
            output: String::from_utf8_lossy(&out.stdout).into_owned(),
        },
        Ok(Err(e)) => LocalOutcome::Failed {
            code: None,
            output: e.to_string(),
        },
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: signalling a process group this function created.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            LocalOutcome::Failed {
                code: None,
                output: format!("timed out after {} s", timeout.as_secs()),
            }
        }
    }
}
