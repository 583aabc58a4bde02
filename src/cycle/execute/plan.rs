//! The plan part of a step: decide what to do next from the state as read, do at once whatever
//! needs no agent (gates, budgets, merges through [`Stepper::perform`]), and start each agent run —
//! in this process (`hyperloop step`) or, for `hyperloop plan`, as a work item claimed with a
//! lease committed to the state branch (compare-and-swap), for a `work` job elsewhere.

use super::*;
use crate::events::{Budget, Notable, Orphan};
use crate::task::Claim;
use crate::task::store::IntakeClaim;

/// `hyperloop plan`: everything of a step that needs no agent, then a lease for each agent run
/// the step would start (within `max_workers`, counting the leases still out, and the spending
/// caps).
pub async fn plan(target: &Target, opts: &StepOptions) -> Result<StepReport> {
    run_part(target, opts, Mode::Plan, &[]).await
}

pub(super) async fn run_part(
    target: &Target,
    opts: &StepOptions,
    mode: Mode,
    dirs: &[PathBuf],
) -> Result<StepReport> {
    let lock = StepLock::acquire(&target.repo.common_dir.join("hyperloop.lock"))?;
    let mut stepper = match open(target, opts, mode).await? {
        Ok(s) => s,
        Err(report) => return Ok(report),
    };
    let done = (|| -> Result<()> {
        stepper.begin()?;
        for dir in dirs {
            stepper.record_output(dir)?;
        }
        let mut acted = stepper.act_now();
        if acted.is_ok() && mode == Mode::Record {
            acted = stepper.hand_on_failures();
        }
        let acted = acted.and_then(|()| stepper.flush_staged());
        stepper.flush_cleanup();
        acted
    })();
    let result = match done {
        Ok(()) => stepper.finish(),
        Err(Error::RateLimited { message, retry_at }) => stepper
            .finish()
            .map(|report| github_mode::rate_limited(report, &message, retry_at)),
        Err(e) => {
            // What was committed stays; what is staged (a merge) is published before failing.
            let _ = stepper.flush_staged();
            Err(e)
        }
    };
    drop(lock);
    result
}

impl Stepper {
    /// [`Stepper::act`], for a caller that only needs to know it went well.
    pub(super) fn act_now(&mut self) -> Result<()> {
        self.act().map(|_| ())
    }

    /// Decides and performs everything that can happen now. Returns whether anything did.
    pub(super) fn act(&mut self) -> Result<bool> {
        let mut any = self.expire_intake_lease()?;
        any |= self.expire_improver_lease()?;
        loop {
            let plan = self.plan()?;
            let mut progressed = self.start_batch(&plan)?;
            for action in plan.actions.iter().filter(|a| !matches!(a, Action::Start { .. })) {
                if self.perform(action)? {
                    progressed = true;
                }
            }
            if !progressed {
                self.note_plan(&plan);
                return Ok(any);
            }
            any = true;
        }
    }

    /// Starts every task the plan starts, in one commit: the workers of a wave do not wait for
    /// one state commit each.
    pub(super) fn start_batch(&mut self, plan: &Plan) -> Result<bool> {
        if self.mode == Mode::Record {
            // A task started here would only wait for the next `plan` to claim its agent.
            return Ok(false);
        }
        let mut changes = Changes::default();
        let mut started = Vec::new();
        let mut progressed = false;
        for action in &plan.actions {
            let Action::Start { task_id, .. } = action else {
                continue;
            };
            if self.past_deadline() || self.pool.running.contains_key(task_id) || self.over_total_budget() {
                continue;
            }
            if !self.api_allows_start(task_id, started.len()) {
                continue;
            }
            let Some(mut t) = self.tasks.get(task_id).cloned() else {
                continue;
            };
            if let Some(change) = self.enforce_task_budget(&mut t) {
                self.save_task(
                    t,
                    &change,
                    &format!("hyperloop: {task_id} failed (budget exceeded)"),
                )?;
                progressed = true;
                continue;
            }
            let change = transition::start(&mut t, self.pipeline());
            if t.branch.is_none() {
                t.branch = Some(crate::task::file::task_branch(task_id));
            }
            changes.put_task(&self.tasks_rel(), &t);
            started.push((t, change));
        }
        if started.is_empty() {
            return Ok(progressed);
        }
        let ids: Vec<&str> = started.iter().map(|(t, _)| t.id.as_str()).collect();
        let specs: Vec<String> = started.iter().map(|(t, _)| t.spec_ref.clone()).collect();
        let spec_refs: Vec<&str> = specs.iter().map(String::as_str).collect();
        // Committed before the workers start, so `status` (and a step on another machine) sees
        // the tasks in progress while their agents work, and a dead step's result can be matched
        // to the state it started from.
        let subject = format!("hyperloop: start {}", ids.join(", "));
        let task_refs = ids.join("\n");
        self.commit(&changes, &subject, &spec_refs, &task_refs)?;
        for (t, change) in started {
            self.note_change(&t, &change);
            self.tasks.insert(t.id.clone(), t);
        }
        Ok(true)
    }

    pub(super) fn plan(&self) -> Result<Plan> {
        let snapshot = Snapshot {
            tasks: self.tasks.values().cloned().collect(),
            specs: self.specs.clone(),
            intake_record: self.intake.record.clone(),
            running: self
                .pool
                .running
                .values()
                .filter(|r| r.record.kind == Kind::Task)
                .map(|r| r.record.task_id.clone())
                .collect(),
            pending_failures: if self.improver.ran || self.improver_leased() {
                Vec::new()
            } else {
                let mut all = self.improver.pending.clone();
                all.extend(self.improver.failures.iter().cloned());
                all
            },
            intake_running: self.pool.running.contains_key(INTAKE_ID)
                || self
                    .intake
                    .claim
                    .as_ref()
                    .is_some_and(|c| c.claim.live_lease(now_unix())),
            github_mode: self.forge.remote(),
        };
        let mut plan = decide::decide(&snapshot, &self.config, &self.defs.process, now_unix())?;
        plan.actions.retain(|a| match a {
            Action::Spawn { task_id, .. } => !self.pool.cooling.contains(task_id),
            _ => true,
        });
        // Intake and the improver are workers too; decide counts task workers only through
        // `running`, so make room for them here.
        let others = self
            .pool
            .running
            .values()
            .filter(|r| r.record.kind != Kind::Task)
            .count();
        if others > 0 {
            let mut budget = self
                .config
                .runtime
                .max_workers
                .saturating_sub(self.pool.running.len());
            plan.actions.retain(|a| match a {
                Action::Spawn { .. }
                | Action::Start { .. }
                | Action::RunIntake { .. }
                | Action::RunImprover { .. } => {
                    if budget == 0 {
                        false
                    } else {
                        budget -= 1;
                        true
                    }
                }
                _ => true,
            });
        }
        Ok(plan)
    }

    pub(super) fn note_plan(&mut self, plan: &Plan) {
        self.report.blocked = plan.blocked.iter().map(|b| b.task_id.clone()).collect();
        let forge = self.forge;
        forge.note_closed_gates(self, plan);
    }

    /// Whether starting another worker would break the total spending cap (reported once).
    pub(super) fn over_total_budget(&mut self) -> bool {
        let Some(limit) = self.config.runtime.max_total_cost_usd else {
            return false;
        };
        let spent = self.total_cost();
        if spent < limit {
            return false;
        }
        if !self.budget_blocked {
            Notable::BudgetExceeded {
                budget: Budget::Total,
                spent_usd: spent,
                limit_usd: limit,
            }
            .emit();
            self.budget_blocked = true;
        }
        true
    }

    /// Fails a task whose own spending reached `runtime.max_task_cost_usd`. Returns whether it
    /// did.
    pub(super) fn enforce_task_budget(&mut self, task: &mut Task) -> Option<TaskChange> {
        let limit = self.config.runtime.max_task_cost_usd?;
        if task.cost_usd < limit || task.status.is_terminal() {
            return None;
        }
        Notable::BudgetExceeded {
            budget: Budget::Task {
                task_id: task.id.clone(),
            },
            spent_usd: task.cost_usd,
            limit_usd: limit,
        }
        .emit();
        let reason = format!(
            "budget exceeded: agents spent ${:.2} of runtime.max_task_cost_usd ${limit:.2}",
            task.cost_usd
        );
        Some(transition::fail_task(task, &reason))
    }

    /// Performs one planned action. Returns whether it changed anything.
    pub(super) fn perform(&mut self, action: &Action) -> Result<bool> {
        if action.takes_worker() && self.over_total_budget() {
            return Ok(false);
        }
        if let Action::Spawn { task_id, .. } | Action::Start { task_id, .. } = action
            && let Some(mut t) = self.tasks.get(task_id).cloned()
            && let Some(change) = self.enforce_task_budget(&mut t)
        {
            self.save_task(
                t,
                &change,
                &format!("hyperloop: {task_id} failed (budget exceeded)"),
            )?;
            return Ok(true);
        }
        if self.mode == Mode::Record
            && matches!(action, Action::RunImprover { .. } | Action::RunIntake { .. })
        {
            // Intake and the improver are claimed by `plan`, never started by `record`.
            return Ok(false);
        }
        match action {
            Action::RunIntake { specs, .. } => {
                if self.intake.attempted || self.past_deadline() {
                    return Ok(false);
                }
                if let Some(f) = self.intake.failures.clone()
                    && gave_up(&f, &self.current_specs(), self.inputs_fingerprint()?)
                {
                    if !self.intake.blocked {
                        emit!(
                            ERROR,
                            "intake_gave_up",
                            attempts = f.attempts,
                            last_error = f.last_error.as_str(),
                            hint = INTAKE_GAVE_UP_HINT
                        );
                    }
                    self.intake.blocked = true;
                    self.report.intake_gave_up = Some(f.last_error);
                    return Ok(false);
                }
                self.intake.attempted = true;
                if self.mode == Mode::Plan {
                    return self.claim_intake(specs);
                }
                self.spawn_intake(specs)?;
                Ok(true)
            }
            Action::RunImprover { failures } => {
                if self.improver.ran || self.past_deadline() {
                    return Ok(false);
                }
                self.improver.ran = true;
                if self.mode == Mode::Plan {
                    return self.claim_improver(failures);
                }
                self.spawn_improver(failures)?;
                Ok(true)
            }
            // Tasks start in batches, one commit per wave: see `start_batch`.
            Action::Start { .. } => Ok(false),
            Action::Spawn { task_id, role, .. } => {
                if self.past_deadline() || self.pool.running.contains_key(task_id) {
                    return Ok(false);
                }
                match self.mode {
                    Mode::Step => self.spawn_task(task_id, role)?,
                    Mode::Plan => return self.claim_item(task_id, role),
                    Mode::Record => return Ok(false),
                }
                Ok(true)
            }
            Action::ClearGate { task_id, .. } => {
                let Some(mut t) = self.tasks.get(task_id).cloned() else {
                    return Ok(false);
                };
                let gate = t.phase.clone().unwrap_or_default();
                if !self.first_attempt(task_id, &t, "gate") {
                    return Ok(false);
                }
                t.gate_cleared = false;
                let change = transition::gate_cleared(&mut t, self.pipeline());
                Notable::GateCleared {
                    task_id: task_id.clone(),
                    gate: gate.clone(),
                }
                .emit();
                self.save_task(t, &change, &format!("hyperloop: {task_id} passed gate {gate}"))?;
                Ok(!change.is_noop())
            }
            Action::PollGate { task_id, gate } => {
                let Some(t) = self.tasks.get(task_id).cloned() else {
                    return Ok(false);
                };
                if !self.first_attempt(task_id, &t, "poll") {
                    return Ok(false);
                }
                self.poll_gate(task_id, gate)
            }
            Action::Perform { task_id, action, .. } => {
                let Some(t) = self.tasks.get(task_id).cloned() else {
                    return Ok(false);
                };
                if !self.first_attempt(task_id, &t, action.as_str()) {
                    return Ok(false);
                }
                let forge = self.forge;
                match action {
                    PipelineAction::MergePr => forge.merge(self, t),
                    PipelineAction::MarkPrReady => {
                        let Some(subject) = forge.mark_ready(self, &t)? else {
                            return Ok(false);
                        };
                        let mut t = t;
                        let change = transition::action_done(&mut t, self.pipeline());
                        self.save_task(t, &change, &subject)?;
                        Ok(!change.is_noop())
                    }
                }
            }
            Action::FailTask { task_id, reason } => {
                let Some(mut t) = self.tasks.get(task_id).cloned() else {
                    return Ok(false);
                };
                let change = transition::fail_task(&mut t, reason);
                if change.is_noop() {
                    return Ok(false);
                }
                self.save_task(t, &change, &format!("hyperloop: {task_id} failed"))?;
                Ok(true)
            }
            Action::Recover { task_id, .. } => {
                // Nothing in this version writes claims; one found in a task file (written by
                // hand or by an older step) is cleared so it cannot hold the task forever.
                let Some(mut t) = self.tasks.get(task_id).cloned() else {
                    return Ok(false);
                };
                let Some(claim) = t.claim.take() else {
                    return Ok(false);
                };
                if let Some(item) = &claim.item {
                    // Its `work` died, was cancelled or is too late: the next plan claims the
                    // task again, under another item id, so a late output cannot pass for it.
                    emit!(
                        WARN,
                        "lease_expired",
                        task_id = task_id.as_str(),
                        item = item.as_str(),
                        role = claim.role.as_str(),
                        expires_at = claim.expires_at
                    );
                } else {
                    Notable::OrphanFound {
                        task_id: task_id.clone(),
                        orphan: Orphan::StaleClaim,
                    }
                    .emit();
                }
                let change = no_change(&t);
                self.save_task(t, &change, &format!("hyperloop: {task_id} stale claim cleared"))?;
                Ok(true)
            }
        }
    }

    pub(super) fn first_attempt(&mut self, task_id: &str, t: &Task, what: &str) -> bool {
        self.attempted.insert((
            task_id.to_string(),
            t.position.clone().unwrap_or_default(),
            what.to_string(),
        ))
    }

    /// Claims the run of `role` on `task_id` as a work item: a lease in the task file, committed
    /// (compare-and-swap, and pushed in GitHub mode) before anyone can run it.
    pub(super) fn claim_item(&mut self, task_id: &str, role: &str) -> Result<bool> {
        let Some(mut task) = self.tasks.get(task_id).cloned() else {
            return Ok(false);
        };
        let now = now_unix();
        if task.claim.as_ref().is_some_and(|c| c.live_lease(now)) {
            return Ok(false);
        }
        if self.defs.agent(role).is_none() {
            return Err(Error::other(format!("no agent named `{role}` for {task_id}")));
        }
        let branch = crate::task::file::task_branch(task_id);
        // The commit the agent is given: its branch, made at the base when it has none yet, so
        // that recording its output moves the branch by compare-and-swap from here.
        let base = match self.repo.branch_tip(&branch)? {
            Some(tip) => tip,
            None => {
                let base = self.base_tip().to_string();
                worktree::set_task_ref(&self.repo.git, &branch, &base, None)?;
                base
            }
        };
        let nonce = self.new_nonce();
        let id = item_id(task_id, role, task.round, &nonce);
        task.claim = Some(Claim {
            role: role.to_string(),
            owner: format!("{LEASE_OWNER} {}", std::process::id()),
            pgid: None,
            started_at: now,
            expires_at: now.saturating_add(self.config.runtime.lease_timeout()),
            nonce,
            item: Some(id.clone()),
            round: Some(task.round),
            base: Some(base.clone()),
        });
        task.branch = Some(branch);
        let change = no_change(&task);
        let round = task.round;
        self.save_task(
            task,
            &change,
            &format!("hyperloop: {task_id} {role} claimed as {id}"),
        )?;
        emit!(
            INFO,
            "item_claimed",
            item = id.as_str(),
            task_id = task_id,
            role = role,
            round = round,
            base = base.as_str(),
            lease_timeout_s = self.config.runtime.lease_timeout()
        );
        self.report.items.push(WorkItem {
            id,
            task_id: task_id.to_string(),
            role: role.to_string(),
            round,
        });
        Ok(true)
    }

    /// Claims intake as a work item: there is no task file to hold its lease, so it has a file
    /// of its own in the tasks folder, committed like a task's claim.
    pub(super) fn claim_intake(&mut self, process: &[String]) -> Result<bool> {
        let now = now_unix();
        if self
            .intake
            .claim
            .as_ref()
            .is_some_and(|c| c.claim.live_lease(now))
        {
            return Ok(false);
        }
        let role = intake_role(&self.defs.process);
        if self.defs.agent(&role).is_none() {
            return Err(Error::other(format!("no agent named `{role}` for intake")));
        }
        // The pm is given the state as it is now, as a step gives it; the lease's own commit
        // comes after, so the pm's checkout does not hold it.
        let (id, claim) = self.detached_lease(INTAKE_ID, &role);
        let lease = IntakeClaim {
            claim: claim.clone(),
            specs: self.current_specs(),
            process: process.to_vec(),
        };
        let mut changes = Changes::default();
        let mut text = to_json(&lease)?;
        text.push(b'\n');
        changes.put(format!("{}/{INTAKE_CLAIM}", self.tasks_rel()), text);
        let spec_refs: Vec<&str> = process.iter().map(String::as_str).collect();
        self.commit(
            &changes,
            &format!("hyperloop: intake claimed as {id}"),
            &spec_refs,
            INTAKE_ID,
        )?;
        self.intake.claim = Some(lease);
        self.announce_item(&id, INTAKE_ID, &claim);
        Ok(true)
    }

    /// Clears an intake lease whose `work` died, was cancelled or is too late, so that intake
    /// can be claimed (or run by a step) again, under another item id. Returns whether it did.
    pub(super) fn expire_intake_lease(&mut self) -> Result<bool> {
        let Some(lease) = &self.intake.claim else {
            return Ok(false);
        };
        let claim = &lease.claim;
        if claim.expires_at > now_unix() {
            return Ok(false);
        }
        emit!(
            WARN,
            "lease_expired",
            task_id = INTAKE_ID,
            item = claim.item.as_deref().unwrap_or("-"),
            role = claim.role.as_str(),
            expires_at = claim.expires_at
        );
        let mut changes = Changes::default();
        changes.delete(format!("{}/{INTAKE_CLAIM}", self.tasks_rel()));
        self.commit(&changes, "hyperloop: intake lease expired", &[], INTAKE_ID)?;
        self.intake.claim = None;
        Ok(true)
    }

    /// Adds the removal of the intake lease to `changes` when the intake being recorded holds
    /// it. Returns whether it did.
    pub(super) fn release_intake_lease(&mut self, changes: &mut Changes) -> bool {
        if !std::mem::take(&mut self.intake.release) {
            return false;
        }
        changes.delete(format!("{}/{INTAKE_CLAIM}", self.tasks_rel()));
        self.intake.claim = None;
        true
    }

    /// A lease of a run on the state as it is now (the pm, the improver), under a new item id.
    fn detached_lease(&mut self, task_id: &str, role: &str) -> (String, Claim) {
        let now = now_unix();
        let nonce = self.new_nonce();
        let id = item_id(task_id, role, 0, &nonce);
        let claim = Claim {
            role: role.to_string(),
            owner: format!("{LEASE_OWNER} {}", std::process::id()),
            pgid: None,
            started_at: now,
            expires_at: now.saturating_add(self.config.runtime.lease_timeout()),
            nonce,
            item: Some(id.clone()),
            round: Some(0),
            base: Some(self.tip.clone()),
        };
        (id, claim)
    }

    /// Says that `claim`, committed, hands item `id` out: its event, and a line of the report.
    fn announce_item(&mut self, id: &str, task_id: &str, claim: &Claim) {
        emit!(
            INFO,
            "item_claimed",
            item = id,
            task_id = task_id,
            role = claim.role.as_str(),
            round = 0u32,
            base = claim.base.as_deref().unwrap_or(""),
            lease_timeout_s = self.config.runtime.lease_timeout()
        );
        self.report.items.push(WorkItem {
            id: id.to_string(),
            task_id: task_id.to_string(),
            role: claim.role.clone(),
            round: 0,
        });
    }

    /// Whether a live lease holds an improver run.
    pub(super) fn improver_leased(&self) -> bool {
        self.improver
            .claim
            .as_ref()
            .is_some_and(|c| c.claim.live_lease(now_unix()))
    }

    fn improver_path(&self, file: &str) -> String {
        format!("{}/{file}", self.tasks_rel())
    }

    /// Reads the fan-out's improver files of the state just read (`plan` and `record` only):
    /// `blobs` is its listing of the tasks folder.
    pub(super) fn load_improver_files(&mut self, blobs: &BTreeMap<String, String>) -> Result<()> {
        let pending: Option<ImproverPending> =
            read_state_file(&self.repo, blobs, &self.improver_path(IMPROVER_PENDING))?;
        self.improver.pending = pending.map(|p| p.failures).unwrap_or_default();
        self.improver.claim = read_state_file(&self.repo, blobs, &self.improver_path(IMPROVER_CLAIM))?;
        Ok(())
    }

    /// Claims a process-improver run as a work item: its lease, holding the failures it is to
    /// learn from, replaces the pending failures in one commit. Returns whether it did.
    pub(super) fn claim_improver(&mut self, failures: &[FailureNote]) -> Result<bool> {
        let role = "process-improver".to_string();
        if self.defs.agent(&role).is_none() {
            emit!(
                DEBUG,
                "process_improver_skipped",
                reason = "no process-improver agent"
            );
            return Ok(false);
        }
        let (id, claim) = self.detached_lease(IMPROVER_ID, &role);
        let lease = ImproverClaim {
            claim: claim.clone(),
            failures: failures.to_vec(),
        };
        let mut changes = Changes::default();
        let mut text = to_json(&lease)?;
        text.push(b'\n');
        changes.put(self.improver_path(IMPROVER_CLAIM), text);
        if !self.improver.pending.is_empty() {
            changes.delete(self.improver_path(IMPROVER_PENDING));
        }
        self.commit(
            &changes,
            &format!("hyperloop: process improver claimed as {id}"),
            &[],
            IMPROVER_ID,
        )?;
        self.improver.pending.clear();
        self.improver.failures.clear();
        self.improver.claim = Some(lease);
        self.announce_item(&id, IMPROVER_ID, &claim);
        Ok(true)
    }

    /// Clears an improver lease whose `work` died or is too late; its failures wait for the
    /// improver again. Returns whether it did.
    pub(super) fn expire_improver_lease(&mut self) -> Result<bool> {
        let Some(lease) = self.improver.claim.clone() else {
            return Ok(false);
        };
        if lease.claim.expires_at > now_unix() {
            return Ok(false);
        }
        emit!(
            WARN,
            "lease_expired",
            task_id = IMPROVER_ID,
            item = lease.claim.item.as_deref().unwrap_or("-"),
            role = lease.claim.role.as_str(),
            expires_at = lease.claim.expires_at
        );
        let mut waiting = lease.failures;
        waiting.extend(std::mem::take(&mut self.improver.pending));
        let mut changes = Changes::default();
        changes.delete(self.improver_path(IMPROVER_CLAIM));
        self.put_pending(&mut changes, &waiting)?;
        self.commit(
            &changes,
            "hyperloop: process improver lease expired",
            &[],
            IMPROVER_ID,
        )?;
        self.improver.claim = None;
        self.improver.pending = waiting;
        Ok(true)
    }

    /// Adds the failures waiting for the improver (the newest [`MAX_PENDING_FAILURES`]) to
    /// `changes`, or the file's removal when there are none.
    pub(super) fn put_pending(&self, changes: &mut Changes, failures: &[FailureNote]) -> Result<()> {
        let path = self.improver_path(IMPROVER_PENDING);
        if failures.is_empty() {
            changes.delete(path);
            return Ok(());
        }
        let keep = failures.len().saturating_sub(MAX_PENDING_FAILURES);
        let mut text = to_json(&ImproverPending {
            failures: failures[keep..].to_vec(),
        })?;
        text.push(b'\n');
        changes.put(path, text);
        Ok(())
    }

    /// `record`: hands the failures it took in to the next `plan`, for the improver, when the
    /// process has one.
    pub(super) fn hand_on_failures(&mut self) -> Result<()> {
        if self.improver.failures.is_empty() || self.defs.agent("process-improver").is_none() {
            return Ok(());
        }
        let mut waiting = self.improver.pending.clone();
        waiting.extend(std::mem::take(&mut self.improver.failures));
        let mut changes = Changes::default();
        self.put_pending(&mut changes, &waiting)?;
        self.commit(
            &changes,
            "hyperloop: failures kept for the process improver",
            &[],
            IMPROVER_ID,
        )?;
        self.improver.pending = waiting;
        Ok(())
    }
}
