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
        let acted = stepper.act_now().and_then(|()| stepper.flush_staged());
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
            if self.past_deadline() || self.running.contains_key(task_id) || self.over_total_budget() {
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
            intake_record: self.intake_record.clone(),
            running: self
                .running
                .values()
                .filter(|r| r.record.kind == Kind::Task)
                .map(|r| r.record.task_id.clone())
                .collect(),
            pending_failures: if self.improver_ran {
                Vec::new()
            } else {
                self.pending_failures.clone()
            },
            intake_running: self.running.contains_key(INTAKE_ID)
                || self
                    .intake_claim
                    .as_ref()
                    .is_some_and(|c| c.claim.live_lease(now_unix())),
            github_mode: self.forge.remote(),
        };
        let mut plan = decide::decide(&snapshot, &self.config, &self.defs.process, now_unix())?;
        plan.actions.retain(|a| match a {
            Action::Spawn { task_id, .. } => !self.cooling.contains(task_id),
            _ => true,
        });
        // Intake and the improver are workers too; decide counts task workers only through
        // `running`, so make room for them here.
        let others = self
            .running
            .values()
            .filter(|r| r.record.kind != Kind::Task)
            .count();
        if others > 0 {
            let mut budget = self.config.runtime.max_workers.saturating_sub(self.running.len());
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
        if self.mode != Mode::Step && matches!(action, Action::RunImprover { .. })
            || self.mode == Mode::Record && matches!(action, Action::RunIntake { .. })
        {
            // The process improver is not a work item: `step` runs it. Intake is claimed by
            // `plan`, never started by `record`.
            return Ok(false);
        }
        match action {
            Action::RunIntake { specs, .. } => {
                if self.intake_attempted || self.past_deadline() {
                    return Ok(false);
                }
                if let Some(f) = self.intake_failures.clone()
                    && gave_up(&f, &self.current_specs(), self.inputs_fingerprint()?)
                {
                    if !self.intake_blocked {
                        emit!(
                            ERROR,
                            "intake_gave_up",
                            attempts = f.attempts,
                            last_error = f.last_error.as_str(),
                            hint = INTAKE_GAVE_UP_HINT
                        );
                    }
                    self.intake_blocked = true;
                    self.report.intake_gave_up = Some(f.last_error);
                    return Ok(false);
                }
                self.intake_attempted = true;
                if self.mode == Mode::Plan {
                    return self.claim_intake(specs);
                }
                self.spawn_intake(specs)?;
                Ok(true)
            }
            Action::RunImprover { failures } => {
                if self.improver_ran || self.past_deadline() {
                    return Ok(false);
                }
                self.improver_ran = true;
                self.spawn_improver(failures)?;
                Ok(true)
            }
            // Tasks start in batches, one commit per wave: see `start_batch`.
            Action::Start { .. } => Ok(false),
            Action::Spawn { task_id, role, .. } => {
                if self.past_deadline() || self.running.contains_key(task_id) {
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
                if !self.first_attempt(task_id, &t, action) {
                    return Ok(false);
                }
                match action.as_str() {
                    MERGE_PR => {
                        let forge = self.forge;
                        forge.merge(self, t)
                    }
                    MARK_PR_READY => {
                        let forge = self.forge;
                        if !forge.mark_ready(self, &t)? {
                            return Ok(false);
                        }
                        let mut t = t;
                        let change = transition::action_done(&mut t, self.pipeline());
                        let subject = if forge.remote() {
                            format!("hyperloop: {task_id} pull request ready for review")
                        } else {
                            format!("hyperloop: {task_id} mark-pr-ready (local: nothing to do)")
                        };
                        self.save_task(t, &change, &subject)?;
                        Ok(!change.is_noop())
                    }
                    other => Err(Error::other(format!("unknown action `{other}` for {task_id}"))),
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
            .intake_claim
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
        let base = self.tip.clone();
        let nonce = self.new_nonce();
        let id = item_id(INTAKE_ID, &role, 0, &nonce);
        let lease = IntakeClaim {
            claim: Claim {
                role: role.clone(),
                owner: format!("{LEASE_OWNER} {}", std::process::id()),
                pgid: None,
                started_at: now,
                expires_at: now.saturating_add(self.config.runtime.lease_timeout()),
                nonce,
                item: Some(id.clone()),
                round: Some(0),
                base: Some(base.clone()),
            },
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
        self.intake_claim = Some(lease);
        emit!(
            INFO,
            "item_claimed",
            item = id.as_str(),
            task_id = INTAKE_ID,
            role = role.as_str(),
            round = 0u32,
            base = base.as_str(),
            lease_timeout_s = self.config.runtime.lease_timeout()
        );
        self.report.items.push(WorkItem {
            id,
            task_id: INTAKE_ID.to_string(),
            role,
            round: 0,
        });
        Ok(true)
    }

    /// Clears an intake lease whose `work` died, was cancelled or is too late, so that intake
    /// can be claimed (or run by a step) again, under another item id. Returns whether it did.
    pub(super) fn expire_intake_lease(&mut self) -> Result<bool> {
        let Some(lease) = &self.intake_claim else {
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
        self.intake_claim = None;
        Ok(true)
    }

    /// Adds the removal of the intake lease to `changes` when the intake being recorded holds
    /// it. Returns whether it did.
    pub(super) fn release_intake_lease(&mut self, changes: &mut Changes) -> bool {
        if !std::mem::take(&mut self.intake_release) {
            return false;
        }
        changes.delete(format!("{}/{INTAKE_CLAIM}", self.tasks_rel()));
        self.intake_claim = None;
        true
    }
}
