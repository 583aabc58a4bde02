//! The record part of a step: take an agent run's result — from a worker of this process the moment
//! it ends ([`Stepper::reap`]), or from a `work` output folder ([`Stepper::record_output`]) —
//! check it against what was handed out (the checks of an untrusted agent: its commits descend
//! from the commit it was given, only its task's branch, size limits, the result file's rules),
//! and record it: the task branch, the verdict, the findings, the lease released.
//!
//! Everything `record` reads from an output folder is treated like input from the network: the
//! lease in the committed state, not the folder, says which task, role, round and base commit the
//! output may be for.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

use super::plan::run_part;
use super::*;
use crate::events::{Notable, Origin};
use crate::task::Claim;
use crate::task::store::IntakeClaim;

/// What to do about an intake that gave up.
pub const INTAKE_GAVE_UP_HINT: &str = "fix the specs, the configuration or the pm's prompt and commit (intake runs again when any of them changes), or run `hyperloop retry intake`";

/// Whether failed intakes of `specs` under `inputs` have used up their attempts.
pub fn gave_up(f: &IntakeFailures, specs: &BTreeMap<String, String>, inputs: &str) -> bool {
    f.attempts >= MAX_INTAKE_ATTEMPTS && f.specs == *specs && f.inputs == inputs
}

/// A run that says nothing about the work it was given: the agent never started (no process
/// group), or it was killed for taking too long.
pub(super) fn environmental(outcome: &WorkerOutcome) -> bool {
    outcome.verdict == worker::Verdict::Timeout
        || (outcome.verdict == worker::Verdict::Error && outcome.pgid.is_none())
}

/// The fingerprint of what intake runs with besides the specs: the resolved configuration and
/// the resolved agents and process, as `--dry-run` prints them.
pub fn inputs_fingerprint(repo: &Repo, config: &Config, defs: &Definitions) -> Result<String> {
    let text = format!("{}\n---\n{}", config.render(), defs.render());
    repo.git
        .run_with_input(["hash-object", "--stdin"], text.as_bytes())
        .map(|s| s.trim().to_string())
}

/// An output `record` did not apply, and why.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutputRefused {
    pub dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    pub reason: String,
}

/// `hyperloop record DIR…`: applies each output that its lease vouches for, refuses the rest,
/// then finishes the cycle as a step does.
pub async fn record(target: &Target, opts: &StepOptions, dirs: &[PathBuf]) -> Result<StepReport> {
    run_part(target, opts, Mode::Record, dirs).await
}

/// Reads and checks an output's `result.json`. `Err`: why it is refused.
pub(super) fn read_result(dir: &Path) -> std::result::Result<ResultOut, String> {
    let result: ResultOut = read_capped(&dir.join(RESULT_FILE), MAX_META_BYTES)
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{RESULT_FILE}: {e}")))?;
    if result.cost_usd.is_some_and(|c| !c.is_finite() || c < 0.0) || !result.duration_s.is_finite() {
        return Err(format!(
            "{RESULT_FILE}: cost_usd and duration_s must be finite, cost not negative"
        ));
    }
    Ok(result)
}

/// An output's detail, cut to what is recorded.
pub(super) fn cut_detail(mut detail: String) -> String {
    if detail.len() > MAX_DETAIL_BYTES {
        let mut cut = MAX_DETAIL_BYTES;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push_str("\n(cut)");
    }
    detail
}

/// Reads a regular file of at most `cap` bytes, never following a symlink nor blocking on a
/// FIFO (the folder comes from a runner that is not trusted).
pub(super) fn read_capped(path: &Path, cap: u64) -> std::result::Result<Vec<u8>, String> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{name}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("{name}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{name} is not a regular file"));
    }
    if meta.len() > cap {
        return Err(format!("{name} is larger than {cap} bytes"));
    }
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() as u64 > cap {
        return Err(format!("{name} is larger than {cap} bytes"));
    }
    Ok(bytes)
}

/// An output checked against its lease: the run to record, or why it is refused (with the item
/// it names, when it names one).
pub(super) type Verified = std::result::Result<(RunRecord, WorkerOutcome), (Option<String>, String)>;

impl Stepper {
    pub(super) fn on_worker_done(&mut self, key: &str, outcome: &WorkerOutcome) -> Result<()> {
        crate::fault::point("worker-done");
        let Some(run) = self.pool.running.remove(key) else {
            return Ok(());
        };
        let record = run.record;
        let checked;
        let outcome = match self.refs_moved_during(&record, outcome)? {
            Some(replaced) => {
                checked = replaced;
                &checked
            }
            None => outcome,
        };
        let duration = run
            .started
            .elapsed()
            .as_secs_f64()
            .max(outcome.duration.as_secs_f64());
        let result = self.reap(&record, outcome, duration);
        // Anything the agent started in a session of its own escaped the group kill; its
        // environment still carries the run's nonce.
        let stray = kill_by_nonce(&record.nonce);
        if stray > 0 {
            emit!(
                WARN,
                "stray_processes_stopped",
                task_id = record.task_id.as_str(),
                role = record.role.as_str(),
                count = stray
            );
        }
        if result.is_ok() {
            // Only a recorded result may be forgotten: if recording failed, the next step
            // records it from the saved outcome instead of paying for the agent again.
            let _ = std::fs::remove_file(outcome_path(&self.running_dir(), key));
            let _ = std::fs::remove_file(self.running_dir().join(format!("{key}.json")));
        }
        result
    }

    /// Reports a finished agent run and records its result: the one path by which the result
    /// of an agent becomes task state, whether the agent ran in this process (`step`) or in a
    /// `work` job whose output `record` verified.
    pub(super) fn reap(&mut self, record: &RunRecord, outcome: &WorkerOutcome, duration: f64) -> Result<()> {
        Notable::WorkerReaped {
            task_id: record.task_id.clone(),
            role: record.role.clone(),
            verdict: outcome.verdict,
            round: record.round,
            duration_s: duration,
            findings_count: outcome.findings,
            cost_usd: outcome.cost_usd.unwrap_or(0.0),
            origin: Origin::Step {
                cycle: self.report.cycle,
            },
            log: Some(outcome.log_file.display().to_string()),
        }
        .emit();
        if outcome.verdict == worker::Verdict::Timeout {
            Notable::WorkerTimeout {
                task_id: record.task_id.clone(),
                role: record.role.clone(),
                detail: outcome.detail.clone(),
            }
            .emit();
        }
        self.report.reaped.push(WorkerRun {
            task_id: record.task_id.clone(),
            role: record.role.clone(),
            round: record.round,
            verdict: Some(outcome.verdict.as_str().to_string()),
            duration_s: duration,
            cost_usd: outcome.cost_usd,
        });
        self.report.cost_usd += outcome.cost_usd.unwrap_or(0.0);
        crate::transcripts::publish(&outcome.log_file, &record.task_id, &record.role, record.round);
        let result = match record.kind {
            Kind::Task => self.record_task_result(record, outcome, duration),
            Kind::Intake => self.record_intake(record, outcome, duration),
            Kind::Improver => self.record_improver(record, outcome, duration),
        };
        self.show_progress();
        crate::fault::point("after-record");
        result
    }

    /// Checks every task branch after an agent's run. One moved by anything but hyperloop (an
    /// agent writing into the repository instead of its checkout) is put back, and the run that
    /// just ended counts as `error` naming it; its own branch goes back to where the run
    /// started, so nothing it made is published.
    pub(super) fn refs_moved_during(
        &mut self,
        record: &RunRecord,
        outcome: &WorkerOutcome,
    ) -> Result<Option<WorkerOutcome>> {
        let moved = worktree::restore_task_refs(&self.repo.git)?;
        if moved.is_empty() {
            return Ok(None);
        }
        let mut names = Vec::new();
        for m in &moved {
            emit!(
                ERROR,
                "ref_restored",
                task_id = record.task_id.as_str(),
                role = record.role.as_str(),
                branch = m.branch.as_str(),
                expected = m.expected.as_deref().unwrap_or("(none)"),
                found = m.found.as_deref().unwrap_or("(deleted)")
            );
            names.push(format!("refs/heads/{}", m.branch));
        }
        if record.kind == Kind::Task {
            let branch = crate::task::file::task_branch(&record.task_id);
            if let Some(now) = self.repo.branch_tip(&branch)?
                && now != record.start_head
            {
                worktree::set_task_ref(&self.repo.git, &branch, &record.start_head, Some(&now))?;
            }
        }
        let mut replaced = outcome.clone();
        replaced.verdict = worker::Verdict::Error;
        replaced.findings = replaced.findings.max(1);
        replaced.suspicious = None;
        replaced.detail = format!(
            "{} moved while the agent ran, by something other than hyperloop; restored, and \
             nothing of this run is taken (agents work in their own checkout and must not write \
             into the repository)",
            names.join(", ")
        );
        Ok(Some(replaced))
    }

    pub(super) fn record_task_result(
        &mut self,
        record: &RunRecord,
        outcome: &WorkerOutcome,
        duration: f64,
    ) -> Result<()> {
        let Some(mut task) = self.tasks.get(&record.task_id).cloned() else {
            return Ok(());
        };
        if task.cancelled {
            return self.record_cancelled_run(task, record, outcome, duration);
        }
        let verdict = outcome.verdict;
        let mut detail = outcome.detail.clone();
        if let Some(why) = &outcome.suspicious {
            detail = format!("{detail}\n\nhyperloop: {why}").trim().to_string();
        }
        task.cost_usd += outcome.cost_usd.unwrap_or(0.0);
        task.last_verdict = Some(verdict.as_str().to_string());
        // What a merge may take: the tip this passing agent left, and nothing that came after.
        task.verified_tip = if outcome.verdict.is_pass() {
            // Where the run left the branch: its last commit, taken in just now, or the commit
            // it started from.
            match outcome.commits.last() {
                Some(tip) => Some(tip.clone()),
                None => self.repo.branch_tip(&crate::task::file::task_branch(&task.id))?,
            }
        } else {
            None
        };
        task.history.push(Attempt {
            round: record.round,
            role: record.role.clone(),
            verdict: verdict.as_str().to_string(),
            findings: outcome.findings,
            duration_s: round_duration(duration),
            cost_usd: outcome.cost_usd,
            run_id: Attempt::current_run_id(),
        });
        let mut change = transition::apply_verdict(
            &mut task,
            &self.defs.process.pipeline,
            &record.role,
            verdict,
            &detail,
            outcome.findings,
            self.config.max_task_rounds,
        );
        if let Some(budget) = self.enforce_task_budget(&mut task) {
            change.events.extend(budget.events);
            change.to_status = task.status;
        }
        if matches!(verdict, Verdict::Error | Verdict::Timeout) {
            self.pool.cooling.insert(task.id.clone());
        }
        if !verdict.is_pass() {
            self.improver.failures.push(FailureNote {
                task_id: task.id.clone(),
                role: record.role.clone(),
                round: record.round,
                verdict: verdict.as_str().to_string(),
                detail: detail.clone(),
            });
        }
        if !task.status.is_terminal() {
            let forge = self.forge;
            change = forge.show_work(self, &mut task, change);
        }
        let mut changes = Changes::default();
        changes.put_task(&self.tasks_rel(), &task);
        if record.role == "verifier" {
            let review = format!(
                "{}/reviews/{}-round-{}.md",
                self.specs_dir().trim_end_matches('/'),
                task.id,
                record.round
            );
            changes.put(
                review,
                format!(
                    "# Review of {} — round {}\n\n- verdict: {}\n- findings: {}\n- branch: {}\n\n{}\n",
                    task.id,
                    record.round,
                    verdict.as_str(),
                    outcome.findings,
                    task.branch.as_deref().unwrap_or("-"),
                    detail.trim()
                ),
            );
        }
        let subject = format!(
            "hyperloop: {} {} {} (round {})",
            task.id,
            record.role,
            verdict.as_str(),
            record.round
        );
        let (spec, id) = (task.spec_ref.clone(), task.id.clone());
        if self.merges_cleanly_next(&task)? {
            // The pass leads straight to a merge that will go through: record both in the merge
            // commit, one commit instead of two, and just as atomic.
            self.note_change(&task, &change);
            self.tasks.insert(id.clone(), task.clone());
            let attempted = (
                id,
                task.position.clone().unwrap_or_default(),
                MERGE_PR.to_string(),
            );
            self.attempted.insert(attempted);
            self.merge_with(task, changes)?;
            return Ok(());
        }
        self.commit(&changes, &subject, &[&spec], &id)?;
        self.note_change(&task, &change);
        self.tasks.insert(id, task);
        Ok(())
    }

    /// The result of a worker whose task was cancelled while it ran: what it cost is kept, the
    /// rest is not applied.
    pub(super) fn record_cancelled_run(
        &mut self,
        mut task: Task,
        record: &RunRecord,
        outcome: &WorkerOutcome,
        duration: f64,
    ) -> Result<()> {
        task.cost_usd += outcome.cost_usd.unwrap_or(0.0);
        task.history.push(Attempt {
            round: record.round,
            role: record.role.clone(),
            verdict: "cancelled".to_string(),
            findings: 0,
            duration_s: round_duration(duration),
            cost_usd: outcome.cost_usd,
            run_id: Attempt::current_run_id(),
        });
        let subject = format!("hyperloop: {} {} stopped (task cancelled)", task.id, record.role);
        let mut changes = Changes::default();
        changes.put_task(&self.tasks_rel(), &task);
        let (spec, id) = (task.spec_ref.clone(), task.id.clone());
        self.commit(&changes, &subject, &[&spec], &id)?;
        self.tasks.insert(id, task);
        Ok(())
    }

    /// [`inputs_fingerprint`] of this step's configuration and definitions, computed once.
    pub(super) fn inputs_fingerprint(&self) -> Result<&str> {
        if self.memo.inputs.get().is_none() {
            let f = inputs_fingerprint(&self.repo, &self.config, &self.defs)?;
            let _ = self.memo.inputs.set(f);
        }
        Ok(self.memo.inputs.get().map_or("", String::as_str))
    }

    pub(super) fn record_intake(
        &mut self,
        record: &RunRecord,
        outcome: &WorkerOutcome,
        duration: f64,
    ) -> Result<()> {
        let specs: Vec<String> = record.specs.keys().cloned().collect();
        let fail = |this: &mut Self, why: String| {
            let inputs = this.inputs_fingerprint()?.to_string();
            let mut failures = match &this.intake.failures {
                Some(f) if f.specs == record.specs && f.inputs == inputs => f.clone(),
                _ => IntakeFailures {
                    specs: record.specs.clone(),
                    inputs,
                    ..IntakeFailures::default()
                },
            };
            failures.attempts += 1;
            failures.last_error = preview(&why);
            let mut changes = Changes::default();
            this.release_intake_lease(&mut changes);
            let mut text = serde_json::to_string_pretty(&failures).unwrap_or_default();
            text.push('\n');
            changes.put(format!("{}/{INTAKE_FAILURES}", this.tasks_rel()), text);
            let subject = format!(
                "hyperloop: intake failed (attempt {} of {MAX_INTAKE_ATTEMPTS})",
                failures.attempts
            );
            let spec_refs: Vec<&str> = record.specs.keys().map(String::as_str).collect();
            this.commit(&changes, &subject, &spec_refs, INTAKE_ID)?;
            this.intake.failures = Some(failures);
            Notable::IntakeRan {
                success: false,
                counted: None,
                unprocessed_specs: specs.len(),
                created_tasks: 0,
                duration_s: duration,
                cycle: this.report.cycle,
                detail: Some(why),
            }
            .emit();
            this.report.intake_ran = true;
            Ok(())
        };
        if environmental(outcome) {
            // The agent never ran, or ran out of time: nothing the specs can be blamed for, so
            // it is not counted against them and the next step tries again.
            Notable::IntakeRan {
                success: false,
                counted: Some(false),
                unprocessed_specs: specs.len(),
                created_tasks: 0,
                duration_s: duration,
                cycle: self.report.cycle,
                detail: Some(preview(&outcome.detail)),
            }
            .emit();
            self.report.intake_ran = true;
            let mut changes = Changes::default();
            if self.release_intake_lease(&mut changes) {
                let spec_refs: Vec<&str> = record.specs.keys().map(String::as_str).collect();
                self.commit(
                    &changes,
                    "hyperloop: intake lease released (not counted)",
                    &spec_refs,
                    INTAKE_ID,
                )?;
            }
            return Ok(());
        }
        if outcome.verdict != worker::Verdict::Pass {
            return fail(
                self,
                format!("the pm reported {}: {}", outcome.verdict.as_str(), outcome.detail),
            );
        }
        let head = match &record.end_head {
            Some(head) => head.clone(),
            None => worker::agent_user::checkout_git(&record.worktree).run_trim(["rev-parse", "HEAD"])?,
        };
        let tasks_rel = self.tasks_rel();
        let entries = self.repo.diff_entries(&record.start_head, &head, &tasks_rel)?;
        let mut changes = Changes::default();
        let mut new_tasks: Vec<Task> = Vec::new();
        let mut problems: Vec<String> = Vec::new();
        let blobs: Vec<(String, String, String)> = entries
            .into_iter()
            .filter_map(|(path, entry)| match entry {
                crate::state::Entry::Blob { mode, oid } => Some((path, mode, oid)),
                _ => {
                    problems.push(format!("{path}: the pm may not delete task files"));
                    None
                }
            })
            .collect();
        let contents = self
            .repo
            .cat_blobs(blobs.iter().map(|(_, _, oid)| oid.as_str()))?;
        for ((path, mode, oid), bytes) in blobs.iter().zip(contents) {
            let name = path.strip_prefix(&format!("{tasks_rel}/")).unwrap_or(path);
            if !name.ends_with(".md") || name.contains('/') {
                problems.push(format!("{path}: only `<id>.md` files belong in {tasks_rel}"));
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            match crate::task::file::parse(Path::new(path), &text) {
                Ok(t) => {
                    if let Some(old) = self.tasks.get(&t.id)
                        && old.status != Status::NotStarted
                    {
                        problems.push(format!(
                            "{path}: task {} is {} and may not be rewritten by intake",
                            t.id, old.status
                        ));
                        continue;
                    }
                    changes.put_blob(path.clone(), "100644", oid.clone());
                    let _ = mode;
                    new_tasks.push(t);
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        // The whole task set as it would be: dependencies must resolve and must not cycle.
        let mut all: BTreeMap<String, Task> = self.tasks.clone();
        for t in &new_tasks {
            all.insert(t.id.clone(), t.clone());
        }
        let all_list: Vec<Task> = all.into_values().collect();
        if let Err(e) = decide::check_dependencies(&all_list) {
            problems.push(e.to_string());
        }
        if !problems.is_empty() {
            return fail(
                self,
                format!("the pm's task files were rejected:\n- {}", problems.join("\n- ")),
            );
        }
        let mut record_map = self.intake.record.clone();
        for (path, hash) in &record.specs {
            record_map.insert(path.clone(), hash.clone());
        }
        record_map.retain(|p, _| record.specs.contains_key(p));
        let mut text = serde_json::to_string_pretty(&record_map).map_err(|e| Error::other(e.to_string()))?;
        text.push('\n');
        changes.put(format!("{tasks_rel}/{INTAKE_RECORD}"), text);
        if self.intake.failures.is_some() {
            changes.delete(format!("{tasks_rel}/{INTAKE_FAILURES}"));
            self.intake.failures = None;
        }
        self.release_intake_lease(&mut changes);
        let created = new_tasks.len();
        let spec_refs: Vec<&str> = specs.iter().map(String::as_str).collect();
        let subject = format!(
            "hyperloop: intake of {} spec(s), {created} task file(s)",
            specs.len()
        );
        self.commit(&changes, &subject, &spec_refs, INTAKE_ID)?;
        self.intake.record = record_map;
        for t in new_tasks {
            self.tasks.insert(t.id.clone(), t);
        }
        Notable::IntakeRan {
            success: true,
            counted: None,
            unprocessed_specs: specs.len(),
            created_tasks: created,
            duration_s: duration,
            cycle: self.report.cycle,
            detail: None,
        }
        .emit();
        self.report.intake_ran = true;
        Ok(())
    }

    pub(super) fn record_improver(
        &mut self,
        record: &RunRecord,
        outcome: &WorkerOutcome,
        duration: f64,
    ) -> Result<()> {
        self.improver
            .failures
            .retain(|f| !record.failures.contains(&f.task_id));
        let mut success = outcome.verdict == worker::Verdict::Pass;
        let prompts_rel = format!("{}/prompts", self.specs_dir().trim_end_matches('/'));
        let mut changes = Changes::default();
        if success {
            // An output's commits were taken in already; a run of this step is in its checkout.
            let head = match &record.end_head {
                Some(h) => h.clone(),
                None => worker::agent_user::checkout_git(&record.worktree).run_trim(["rev-parse", "HEAD"])?,
            };
            // Only the prompts folder: whatever else the improver changed is not taken.
            for (path, entry) in self.repo.diff_entries(&record.start_head, &head, &prompts_rel)? {
                changes.files.insert(path, entry);
            }
        }
        let improved = !changes.is_empty();
        if std::mem::take(&mut self.improver.release) {
            changes.delete(format!("{}/{IMPROVER_CLAIM}", self.tasks_rel()));
            self.improver.claim = None;
        }
        if !changes.is_empty() {
            let committed = if improved {
                self.commit(
                    &changes,
                    "hyperloop: process improvements from recent failures",
                    &[&prompts_rel],
                    IMPROVER_ID,
                )
            } else {
                self.commit(&changes, "hyperloop: process improver recorded", &[], IMPROVER_ID)
            };
            success = success && committed.is_ok();
        }
        Notable::ProcessImproverRan {
            failed_task_ids: record.failures.clone(),
            success,
            duration_s: duration,
            cycle: self.report.cycle,
        }
        .emit();
        self.report.improver_ran = true;
        Ok(())
    }

    /// Verifies one output folder against its lease and records it, or refuses it (an event and
    /// an entry in the report; nothing of it is applied).
    pub(super) fn record_output(&mut self, dir: &Path) -> Result<()> {
        match self.verify_output(dir)? {
            Ok((record, outcome)) => {
                let item = record.key.clone();
                self.reap(&record, &outcome, outcome.duration.as_secs_f64())?;
                emit!(
                    INFO,
                    "output_recorded",
                    item = item.as_str(),
                    task_id = record.task_id.as_str(),
                    role = record.role.as_str(),
                    verdict = outcome.verdict.as_str()
                );
                self.report.recorded.push(item);
            }
            Err((item, reason)) => {
                emit!(
                    WARN,
                    "output_refused",
                    dir = dir.display().to_string().as_str(),
                    item = item.as_deref().unwrap_or("-"),
                    reason = reason.as_str()
                );
                self.report.refused.push(OutputRefused {
                    dir: dir.display().to_string(),
                    item,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Checks an output and takes its commits in (the task branch moves). `Err` inside: the
    /// output is refused, with the item it names (when it names one) and why.
    pub(super) fn verify_output(&mut self, dir: &Path) -> Result<Verified> {
        let refuse = |item: Option<&str>, why: String| Ok(Err((item.map(str::to_string), why)));
        let item: ItemFile = match read_capped(&dir.join(ITEM_FILE), MAX_META_BYTES)
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{ITEM_FILE}: {e}")))
        {
            Ok(i) => i,
            Err(why) => return refuse(None, why),
        };
        let id = item.id.as_str();
        if !valid_item_id(id) {
            return refuse(None, format!("{ITEM_FILE} names no valid item id"));
        }
        // The committed lease decides; the folder only says which lease it answers.
        if let Some(lease) = self
            .intake
            .claim
            .clone()
            .filter(|l| l.claim.item.as_deref() == Some(id))
        {
            return self.verify_intake_output(dir, &item, lease);
        }
        if let Some(lease) = self
            .improver
            .claim
            .clone()
            .filter(|l| l.claim.item.as_deref() == Some(id))
        {
            return self.verify_improver_output(dir, &item, &lease);
        }
        let Some(task) = self
            .tasks
            .values()
            .find(|t| t.claim.as_ref().and_then(|c| c.item.as_deref()) == Some(id))
            .cloned()
        else {
            return refuse(
                Some(id),
                "no lease holds this item: never claimed, recorded already, or re-issued after its lease expired".to_string(),
            );
        };
        let Some(claim) = task.claim.clone() else {
            return refuse(Some(id), "no lease holds this item".to_string());
        };
        let Some(base) = claim.base.clone() else {
            return refuse(Some(id), "the lease names no base commit".to_string());
        };
        if item.nonce != claim.nonce
            || item.task_id != task.id
            || item.role != claim.role
            || Some(item.round) != claim.round
            || item.base != base
        {
            return refuse(
                Some(id),
                "the output does not match its lease (task, role, round, base or nonce)".to_string(),
            );
        }
        if task.round != item.round || task.status.is_terminal() && !task.cancelled {
            return refuse(
                Some(id),
                format!("{} has moved on since the item was claimed", task.id),
            );
        }
        let result = match read_result(dir) {
            Ok(r) => r,
            Err(why) => return refuse(Some(id), why),
        };
        let branch = crate::task::file::task_branch(&task.id);
        let tip = match self.import_output(dir, &branch, id, &base) {
            Ok(tip) => tip,
            Err(why) => return refuse(Some(id), why),
        };
        // Compare-and-swap from the lease's base. A branch already at the output's tip was moved
        // by a `record` that died before its commit: the same output, not a second one.
        let now = self.repo.branch_tip(&branch)?;
        // No such branch here: `plan` made it at the base in its own clone and published nothing
        // on it (the task branches origin has were fetched at the start), so a `record` on
        // another runner (the fan-out workflow's) finds it where the lease says, and creates it.
        let absent_at_base = now.is_none()
            && self
                .repo
                .git
                .succeeds(["cat-file", "-e", &format!("{base}^{{commit}}")])?;
        if !absent_at_base && now.as_deref() != Some(base.as_str()) && now.as_deref() != Some(tip.as_str()) {
            return refuse(
                Some(id),
                format!(
                    "{branch} moved since the item was claimed (at {}, lease base {base})",
                    now.as_deref().unwrap_or("(deleted)")
                ),
            );
        }
        if now.as_deref() != Some(tip.as_str()) {
            worktree::set_task_ref(&self.repo.git, &branch, &tip, now.as_deref())?;
        }
        let mut suspicious = None;
        if result.verdict.is_pass() && claim.role == "implementer" {
            if tip == base {
                suspicious = Some("implementer reported pass but made no commits".to_string());
            } else if self
                .repo
                .git
                .succeeds(["diff", "--quiet", base.as_str(), tip.as_str()])?
            {
                suspicious = Some("implementer reported pass but its commits change nothing".to_string());
            }
        }
        let detail = cut_detail(result.detail);
        // The lease ends with its output: the commit that records the result clears it.
        let mut released = task.clone();
        released.claim = None;
        self.tasks.insert(task.id.clone(), released);
        let record = RunRecord {
            key: id.to_string(),
            kind: Kind::Task,
            task_id: task.id.clone(),
            role: claim.role.clone(),
            round: item.round,
            nonce: claim.nonce.clone(),
            started_at: claim.started_at,
            worktree: PathBuf::new(),
            start_head: base,
            specs: BTreeMap::new(),
            failures: Vec::new(),
            end_head: None,
            position: Some(task.position.clone().unwrap_or_default()),
            status: Some(task.status.as_str().to_string()),
        };
        let outcome = WorkerOutcome {
            verdict: result.verdict,
            findings: result.findings,
            detail,
            exit_code: result.exit_code,
            duration: Duration::from_secs_f64(result.duration_s.clamp(0.0, 1e9)),
            log_file: dir.join(TRANSCRIPT_FILE),
            cost_usd: result.cost_usd,
            num_turns: None,
            session_id: None,
            is_error: None,
            suspicious,
            commits: Vec::new(),
            pgid: None,
        };
        Ok(Ok((record, outcome)))
    }

    /// [`Stepper::verify_output`] for an intake output: checked against the intake lease, the
    /// pm's commits taken in, and recorded as a step records the pm it ran; the lease goes in
    /// the commit that records it.
    pub(super) fn verify_intake_output(
        &mut self,
        dir: &Path,
        item: &ItemFile,
        lease: IntakeClaim,
    ) -> Result<Verified> {
        let verified = self.verify_detached_output(
            dir,
            item,
            &lease.claim,
            (Kind::Intake, INTAKE_ID, INTAKE_OUTPUT_BRANCH),
        )?;
        Ok(verified.map(|(mut record, outcome)| {
            self.intake.release = true;
            record.specs = lease.specs;
            (record, outcome)
        }))
    }

    /// [`Stepper::verify_output`] for a process-improver output: checked against its lease, its
    /// commits taken in; recording it takes only its changes to the prompts folder, as a step
    /// takes them from the improver it ran, and releases the lease.
    pub(super) fn verify_improver_output(
        &mut self,
        dir: &Path,
        item: &ItemFile,
        lease: &ImproverClaim,
    ) -> Result<Verified> {
        let verified = self.verify_detached_output(
            dir,
            item,
            &lease.claim,
            (Kind::Improver, IMPROVER_ID, IMPROVER_OUTPUT_BRANCH),
        )?;
        Ok(verified.map(|(mut record, outcome)| {
            self.improver.release = true;
            record.failures = lease.failures.iter().map(|f| f.task_id.clone()).collect();
            (record, outcome)
        }))
    }

    /// The checks an output of a detached run (the pm, the improver) passes against its lease,
    /// and its commits taken in from the bundle on `branch`.
    fn verify_detached_output(
        &mut self,
        dir: &Path,
        item: &ItemFile,
        claim: &Claim,
        (kind, task_id, branch): (Kind, &str, &str),
    ) -> Result<Verified> {
        let id = item.id.as_str();
        let refuse = |why: String| Ok(Err((Some(id.to_string()), why)));
        let Some(base) = claim.base.clone() else {
            return refuse("the lease names no base commit".to_string());
        };
        if item.nonce != claim.nonce
            || item.task_id != task_id
            || item.role != claim.role
            || Some(item.round) != claim.round
            || item.base != base
        {
            return refuse(
                "the output does not match its lease (task, role, round, base or nonce)".to_string(),
            );
        }
        let result = match read_result(dir) {
            Ok(r) => r,
            Err(why) => return refuse(why),
        };
        let tip = match self.import_output(dir, branch, id, &base) {
            Ok(tip) => tip,
            Err(why) => return refuse(why),
        };
        let record = RunRecord {
            key: id.to_string(),
            kind,
            task_id: task_id.to_string(),
            role: claim.role.clone(),
            round: 0,
            nonce: claim.nonce.clone(),
            started_at: claim.started_at,
            worktree: PathBuf::new(),
            start_head: base,
            specs: BTreeMap::new(),
            failures: Vec::new(),
            end_head: Some(tip),
            position: None,
            status: None,
        };
        let outcome = WorkerOutcome {
            verdict: result.verdict,
            findings: result.findings,
            detail: cut_detail(result.detail),
            exit_code: result.exit_code,
            duration: Duration::from_secs_f64(result.duration_s.clamp(0.0, 1e9)),
            log_file: dir.join(TRANSCRIPT_FILE),
            cost_usd: result.cost_usd,
            num_turns: None,
            session_id: None,
            is_error: None,
            suspicious: None,
            commits: Vec::new(),
            pgid: None,
        };
        Ok(Ok((record, outcome)))
    }

    /// Takes in an output's bundle, which must hold exactly `refs/heads/<branch>` building on
    /// `base`: its tip, or `base` when the output has no bundle (no commits). `Err`: why it
    /// is refused.
    pub(super) fn import_output(
        &self,
        dir: &Path,
        branch: &str,
        id: &str,
        base: &str,
    ) -> std::result::Result<String, String> {
        let bundle = dir.join(BUNDLE_FILE);
        match std::fs::symlink_metadata(&bundle) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(base.to_string()),
            Err(e) => Err(format!("{BUNDLE_FILE}: {e}")),
            Ok(m) if !m.file_type().is_file() => Err(format!("{BUNDLE_FILE} is not a regular file")),
            Ok(m) if m.len() > MAX_BUNDLE_BYTES => Err(format!(
                "{BUNDLE_FILE} is {} bytes, more than {MAX_BUNDLE_BYTES}",
                m.len()
            )),
            Ok(_) => {
                worktree::import_bundle(&self.repo.git, &bundle, branch, id, base).map_err(|e| e.to_string())
            }
        }
    }
}
