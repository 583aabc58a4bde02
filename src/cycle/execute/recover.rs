//! What a step does first: recover what a killed step left — claims of workers that are gone,
//! outcomes saved but not recorded, worktrees half made, task branches moved by hand.

use super::*;
use crate::events::{Notable, Orphan};

impl Stepper {
    /// Finds workers a killed step left behind: stops any that still run, and records the result
    /// of any that finished but were not recorded.
    pub(super) fn recover(&mut self) -> Result<()> {
        let dir = self.running_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                // A temporary file of a write that was cut short.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().is_some_and(|e| e == "outcome") && !path.with_extension("json").exists() {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<RunRecord>(&b).ok())
            {
                Some(r) => records.push((path, r)),
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        records.sort_by(|a, b| a.1.key.cmp(&b.1.key));
        for (path, record) in records {
            let killed = kill_by_nonce(&record.nonce);
            Notable::OrphanFound {
                task_id: record.task_id.clone(),
                orphan: Orphan::Run {
                    role: record.role.clone(),
                    processes_stopped: killed,
                },
            }
            .emit();
            if record.kind == Kind::Task {
                let result_path = record.worktree.join(worker::RESULT_FILE);
                let fresh = std::fs::metadata(&result_path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .is_some_and(|t| t.as_secs() >= record.started_at);
                // Recorded already (the step died just after), the task has moved on: the result
                // is not applied twice.
                let still_there = self.tasks.get(&record.task_id).is_some_and(|t| {
                    !t.status.is_terminal()
                        && t.round == record.round
                        && record
                            .position
                            .as_ref()
                            .is_none_or(|p| t.position.clone().unwrap_or_default() == *p)
                        && record.status.as_deref().is_none_or(|s| s == t.status.as_str())
                });
                let saved_path = outcome_path(&dir, &record.key);
                let saved = std::fs::read(&saved_path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<SavedOutcome>(&b).ok());
                let _ = std::fs::remove_file(&saved_path);
                let found = saved.or_else(|| match worker::result::read(&result_path) {
                    ResultFile::Valid {
                        verdict,
                        findings,
                        detail,
                    } if fresh => Some(SavedOutcome {
                        verdict,
                        findings,
                        detail,
                        cost_usd: None,
                        suspicious: None,
                    }),
                    _ => None,
                });
                if still_there
                    && let Some(SavedOutcome {
                        verdict,
                        findings,
                        detail,
                        cost_usd,
                        suspicious,
                    }) = found
                {
                    // The worker finished; only its recording was lost. Settle its branch the
                    // way a normal run would, then record it.
                    let wt = worker::agent_user::checkout_git(&record.worktree);
                    let spec_ref = self
                        .tasks
                        .get(&record.task_id)
                        .map(|t| t.spec_ref.clone())
                        .unwrap_or_default();
                    let settled = worker::result::settle_branch(
                        &wt,
                        &record.start_head,
                        &record.role,
                        &spec_ref,
                        &record.task_id,
                    );
                    let _ = worker::result::remove_stale(&result_path);
                    let branch = crate::task::file::task_branch(&record.task_id);
                    let taken = settled.and_then(|_| {
                        let source = format!("refs/heads/{branch}");
                        let now = self.repo.branch_tip(&branch)?;
                        if now.as_deref() != Some(record.start_head.as_str()) {
                            // Taken in already by the step that ran it.
                            return Ok(None);
                        }
                        worktree::import(
                            &self.repo.git,
                            &record.worktree,
                            &source,
                            &record.task_id,
                            &record.start_head,
                            Some(&branch),
                        )
                    });
                    let (verdict, detail) = match taken {
                        Ok(_) => (verdict, detail),
                        Err(e) => (
                            worker::Verdict::Error,
                            format!("the agent's work was not taken: {e}"),
                        ),
                    };
                    let outcome = WorkerOutcome {
                        verdict,
                        findings,
                        detail: format!("{detail}\n\n(recorded after the step that ran it was interrupted)")
                            .trim()
                            .to_string(),
                        exit_code: None,
                        duration: Duration::from_secs(now_unix().saturating_sub(record.started_at)),
                        log_file: PathBuf::new(),
                        cost_usd,
                        num_turns: None,
                        session_id: None,
                        is_error: None,
                        suspicious,
                        commits: Vec::new(),
                        pgid: None,
                    };
                    emit!(
                        INFO,
                        "result_recovered",
                        task_id = record.task_id.as_str(),
                        role = record.role.as_str(),
                        verdict = verdict.as_str()
                    );
                    self.record_task_result(&record, &outcome, outcome.duration.as_secs_f64())?;
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }
}
