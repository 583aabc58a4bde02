//! The events people are told about, as values. Each is written to standard error as its
//! CONTRACT §7 line (the same name, fields, order and level the line always had) and handed, as
//! the value itself, to the [`Listener`] installed in the current subscriber (the Matrix
//! notifier). Nothing reads an event back from its text: a field renamed here changes the line
//! and the message together, and the tests below pin every line.

use std::sync::Arc;

use tracing::{Level, Subscriber};
use tracing_subscriber::Layer;

use crate::config::MergeStrategy;
use crate::pipeline::Verdict;

/// Where a worker ran: a `work` command (the fan-out) or the step itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// `hyperloop work ITEM`.
    Work { item: String },
    /// An in-process step, in this cycle.
    Step { cycle: u64 },
}

/// What a merge came to; the `outcome` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// Merged by this step.
    Merged,
    /// The base already held the work.
    AlreadyMerged,
    /// The pull request was merged by someone else.
    MergedOutsideThisStep,
    /// The branch does not merge cleanly.
    Conflict,
    /// The task never committed anything.
    NothingToMerge,
    /// The forge refused the merge.
    NotMergeable,
}

impl MergeOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            MergeOutcome::Merged => "merged",
            MergeOutcome::AlreadyMerged => "already-merged",
            MergeOutcome::MergedOutsideThisStep => "merged-outside-this-step",
            MergeOutcome::Conflict => "conflict",
            MergeOutcome::NothingToMerge => "nothing-to-merge",
            MergeOutcome::NotMergeable => "not-mergeable",
        }
    }
}

/// A pull request as a merge names it: by number when hyperloop merged it, by URL when it found
/// it merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullRequest {
    Number(u64),
    Url(String),
}

/// What an orphan was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Orphan {
    /// A claim on a task whose run left nothing behind.
    StaleClaim,
    /// A worker a killed step left running.
    Run { role: String, processes_stopped: u64 },
}

/// Which spending cap was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Budget {
    /// `runtime.max_total_cost_usd`: no worker starts any more.
    Total,
    /// `runtime.max_task_cost_usd`: the task fails.
    Task { task_id: String },
}

/// Why `run` stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    AllComplete,
    /// No specs and no tasks.
    Idle,
    /// Nothing can progress; the reason names what is in the way.
    Stuck {
        reason: String,
        blocked: Vec<String>,
    },
    RateLimited {
        retry_at: String,
    },
    PaceSpent {
        retry_at: String,
    },
    MaxCycles {
        max_cycles: u32,
    },
    Interrupted,
}

impl Halt {
    /// The `reason` field.
    pub fn reason(&self) -> String {
        match self {
            Halt::AllComplete => "all tasks complete".into(),
            Halt::Idle => "nothing to do: no specs and no tasks".into(),
            Halt::Stuck { reason, .. } => reason.clone(),
            Halt::RateLimited { .. } => "GitHub rate limit reached".into(),
            Halt::PaceSpent { .. } => "GitHub write pace spent".into(),
            Halt::MaxCycles { max_cycles } => format!("max_cycles exhausted ({max_cycles})"),
            Halt::Interrupted => "interrupted by a signal".into(),
        }
    }

    fn retry_at(&self) -> Option<&str> {
        match self {
            Halt::RateLimited { retry_at } | Halt::PaceSpent { retry_at } => Some(retry_at),
            _ => None,
        }
    }
}

/// A merge and how it went; the fields a site has nothing for stay `None` and are left out of
/// the line.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeAttempt {
    pub task_id: String,
    pub branch: Option<String>,
    pub spec_ref: Option<String>,
    pub outcome: MergeOutcome,
    pub strategy: Option<MergeStrategy>,
    pub attempt: Option<u32>,
    /// Why the forge refused, and what it said.
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub pr: Option<PullRequest>,
    /// The base a split-state merge went into.
    pub into: Option<String>,
}

impl From<MergeAttempt> for Notable {
    fn from(merge: MergeAttempt) -> Notable {
        Notable::MergeAttempted(merge)
    }
}

impl MergeAttempt {
    /// `outcome` for `task_id`, with no other field.
    pub fn new(task_id: &str, outcome: MergeOutcome) -> MergeAttempt {
        MergeAttempt {
            task_id: task_id.to_string(),
            branch: None,
            spec_ref: None,
            outcome,
            strategy: None,
            attempt: None,
            reason: None,
            detail: None,
            pr: None,
            into: None,
        }
    }

    /// [`Notable::emit`] of this merge.
    pub fn emit(self) {
        Notable::MergeAttempted(self).emit();
    }
}

/// The events the Matrix room may hear about. Fields are listed in the order of their line.
#[derive(Debug, Clone, PartialEq)]
pub enum Notable {
    WorkerSpawned {
        task_id: String,
        role: String,
        round: u32,
        /// None for intake, which works on the base branch.
        branch: Option<String>,
        spec_ref: String,
        origin: Origin,
    },
    WorkerReaped {
        task_id: String,
        role: String,
        verdict: Verdict,
        round: u32,
        duration_s: f64,
        findings_count: u32,
        cost_usd: f64,
        origin: Origin,
        /// The transcript, when the step kept it.
        log: Option<String>,
    },
    TaskLoopedBack {
        task_id: String,
        spec_ref: String,
        round: u32,
        /// A worker's verdict, or what stood for one (`conflict`, `unverified`, …).
        verdict: String,
        findings_count: u32,
        findings_preview: String,
    },
    TaskCompleted {
        task_id: String,
        spec_ref: String,
        total_rounds: u32,
        cost_usd: f64,
    },
    TaskFailed {
        task_id: String,
        spec_ref: String,
        reason: String,
        round: u32,
    },
    MergeAttempted(MergeAttempt),
    /// A gate looked at; a `gate_checked` line at debug level.
    GatePolled {
        task_id: String,
        gate: String,
        cleared: bool,
    },
    /// A gate cleared and the task moved past it.
    GateCleared {
        task_id: String,
        gate: String,
    },
    RebaseConflict {
        task_id: String,
        attempt: u32,
        max_attempts: u32,
        /// True when the rebase-resolver gets no more tries and the task goes back to work.
        looping_back: bool,
    },
    OrphanFound {
        task_id: String,
        orphan: Orphan,
    },
    WorkerTimeout {
        task_id: String,
        role: String,
        detail: String,
    },
    BudgetExceeded {
        budget: Budget,
        spent_usd: f64,
        limit_usd: f64,
    },
    OrchestratorStarted {
        repo: String,
        branch: String,
        max_workers: usize,
        max_rounds: u32,
        overlay: Option<String>,
        github: bool,
    },
    OrchestratorHalted {
        halt: Halt,
        total_cycles: u64,
        completed_tasks: usize,
        failed_tasks: usize,
    },
    CycleCompleted {
        cycle: u64,
        spawned: usize,
        reaped: usize,
        merged: usize,
        complete: usize,
        failed: usize,
        total: usize,
        progress: String,
        duration_s: f64,
    },
    IntakeRan {
        success: bool,
        /// `Some(false)` when the failure was not the specs' doing and is not counted.
        counted: Option<bool>,
        unprocessed_specs: usize,
        created_tasks: usize,
        duration_s: f64,
        cycle: u64,
        detail: Option<String>,
    },
    ProcessImproverRan {
        failed_task_ids: Vec<String>,
        success: bool,
        duration_s: f64,
        cycle: u64,
    },
}

/// `emit!` at a level chosen at run time.
macro_rules! emit_at {
    ($level:expr, $($rest:tt)*) => {
        match $level {
            Level::ERROR => $crate::emit!(ERROR, $($rest)*),
            Level::WARN => $crate::emit!(WARN, $($rest)*),
            Level::INFO => $crate::emit!(INFO, $($rest)*),
            Level::DEBUG => $crate::emit!(DEBUG, $($rest)*),
            _ => $crate::emit!(TRACE, $($rest)*),
        }
    };
}

impl Notable {
    /// The §7 event name.
    pub fn name(&self) -> &'static str {
        match self {
            Notable::WorkerSpawned { .. } => "worker_spawned",
            Notable::WorkerReaped { .. } => "worker_reaped",
            Notable::TaskLoopedBack { .. } => "task_looped_back",
            Notable::TaskCompleted { .. } => "task_completed",
            Notable::TaskFailed { .. } => "task_failed",
            Notable::MergeAttempted(_) => "merge_attempted",
            Notable::GatePolled { .. } | Notable::GateCleared { .. } => "gate_checked",
            Notable::RebaseConflict { .. } => "rebase_conflict",
            Notable::OrphanFound { .. } => "orphan_found",
            Notable::WorkerTimeout { .. } => "worker_timeout",
            Notable::BudgetExceeded { .. } => "budget_exceeded",
            Notable::OrchestratorStarted { .. } => "orchestrator_started",
            Notable::OrchestratorHalted { .. } => "orchestrator_halted",
            Notable::CycleCompleted { .. } => "cycle_completed",
            Notable::IntakeRan { .. } => "intake_ran",
            Notable::ProcessImproverRan { .. } => "process_improver_ran",
        }
    }

    /// The level of the line.
    pub fn level(&self) -> Level {
        match self {
            // `record` judges a `work` run; the step itself warns about a run that did not pass.
            Notable::WorkerReaped {
                verdict,
                origin: Origin::Step { .. },
                ..
            } if !verdict.is_pass() => Level::WARN,
            Notable::MergeAttempted(MergeAttempt {
                outcome: MergeOutcome::Conflict | MergeOutcome::NotMergeable,
                ..
            }) => Level::WARN,
            Notable::GatePolled { .. } => Level::DEBUG,
            Notable::IntakeRan { success: false, .. } => Level::WARN,
            Notable::OrchestratorHalted { halt, .. } => match halt {
                Halt::AllComplete | Halt::Idle | Halt::PaceSpent { .. } => Level::INFO,
                Halt::Stuck { .. } => Level::ERROR,
                Halt::RateLimited { .. } | Halt::MaxCycles { .. } | Halt::Interrupted => Level::WARN,
            },
            Notable::TaskLoopedBack { .. }
            | Notable::RebaseConflict { .. }
            | Notable::OrphanFound { .. }
            | Notable::WorkerTimeout { .. } => Level::WARN,
            Notable::TaskFailed { .. } | Notable::BudgetExceeded { .. } => Level::ERROR,
            _ => Level::INFO,
        }
    }

    /// The task the event is about, if it is about one.
    pub fn task_id(&self) -> Option<&str> {
        match self {
            Notable::WorkerSpawned { task_id, .. }
            | Notable::WorkerReaped { task_id, .. }
            | Notable::TaskLoopedBack { task_id, .. }
            | Notable::TaskCompleted { task_id, .. }
            | Notable::TaskFailed { task_id, .. }
            | Notable::MergeAttempted(MergeAttempt { task_id, .. })
            | Notable::GatePolled { task_id, .. }
            | Notable::GateCleared { task_id, .. }
            | Notable::RebaseConflict { task_id, .. }
            | Notable::OrphanFound { task_id, .. }
            | Notable::WorkerTimeout { task_id, .. }
            | Notable::BudgetExceeded {
                budget: Budget::Task { task_id },
                ..
            } => Some(task_id),
            _ => None,
        }
    }

    /// Writes the event's line to standard error and hands the event to the listener of the
    /// current subscriber, if it has one.
    pub fn emit(self) {
        self.write_line();
        tracing::dispatcher::get_default(|dispatch| {
            if let Some(listener) = dispatch.downcast_ref::<Listener>() {
                (listener.hear)(&self);
            }
        });
    }

    fn write_line(&self) {
        let name = self.name();
        let level = self.level();
        match self {
            Notable::WorkerSpawned {
                task_id,
                role,
                round,
                branch,
                spec_ref,
                origin,
            } => {
                let (item, cycle) = origin.fields();
                emit_at!(
                    level,
                    name,
                    task_id = task_id.as_str(),
                    role = role.as_str(),
                    round = *round,
                    branch = branch.as_deref(),
                    spec_ref = spec_ref.as_str(),
                    item = item,
                    cycle = cycle
                );
            }
            Notable::WorkerReaped {
                task_id,
                role,
                verdict,
                round,
                duration_s,
                findings_count,
                cost_usd,
                origin,
                log,
            } => {
                let (item, cycle) = origin.fields();
                emit_at!(
                    level,
                    name,
                    task_id = task_id.as_str(),
                    role = role.as_str(),
                    verdict = verdict.as_str(),
                    round = *round,
                    duration_s = *duration_s,
                    findings_count = *findings_count,
                    cost_usd = *cost_usd,
                    item = item,
                    cycle = cycle,
                    log = log.as_deref()
                );
            }
            Notable::TaskLoopedBack {
                task_id,
                spec_ref,
                round,
                verdict,
                findings_count,
                findings_preview,
            } => emit_at!(
                level,
                name,
                task_id = task_id.as_str(),
                spec_ref = spec_ref.as_str(),
                round = *round,
                verdict = verdict.as_str(),
                findings_count = *findings_count,
                findings_preview = findings_preview.as_str()
            ),
            Notable::TaskCompleted {
                task_id,
                spec_ref,
                total_rounds,
                cost_usd,
            } => emit_at!(
                level,
                name,
                task_id = task_id.as_str(),
                spec_ref = spec_ref.as_str(),
                total_rounds = *total_rounds,
                cost_usd = *cost_usd
            ),
            Notable::TaskFailed {
                task_id,
                spec_ref,
                reason,
                round,
            } => emit_at!(
                level,
                name,
                task_id = task_id.as_str(),
                spec_ref = spec_ref.as_str(),
                reason = reason.as_str(),
                round = *round
            ),
            Notable::MergeAttempted(MergeAttempt {
                task_id,
                branch,
                spec_ref,
                outcome,
                strategy,
                attempt,
                reason,
                detail,
                pr,
                into,
            }) => {
                // One field, two kinds of value: the number of a PR merged here, the URL of one
                // found merged.
                let (pr_number, pr_url) = match pr {
                    Some(PullRequest::Number(n)) => (Some(*n), None),
                    Some(PullRequest::Url(u)) => (None, Some(u.as_str())),
                    None => (None, None),
                };
                let strategy = strategy.map(MergeStrategy::as_str);
                let attempt = attempt.map(u64::from);
                if let Some(url) = pr_url {
                    emit_at!(
                        level,
                        name,
                        task_id = task_id.as_str(),
                        branch = branch.as_deref(),
                        spec_ref = spec_ref.as_deref(),
                        outcome = outcome.as_str(),
                        strategy = strategy,
                        attempt = attempt,
                        reason = reason.as_deref(),
                        detail = detail.as_deref(),
                        pr = url,
                        into = into.as_deref()
                    );
                } else {
                    emit_at!(
                        level,
                        name,
                        task_id = task_id.as_str(),
                        branch = branch.as_deref(),
                        spec_ref = spec_ref.as_deref(),
                        outcome = outcome.as_str(),
                        strategy = strategy,
                        attempt = attempt,
                        reason = reason.as_deref(),
                        detail = detail.as_deref(),
                        pr = pr_number,
                        into = into.as_deref()
                    );
                }
            }
            Notable::GatePolled {
                task_id,
                gate,
                cleared,
            } => emit_at!(
                level,
                name,
                task_id = task_id.as_str(),
                gate = gate.as_str(),
                cleared = *cleared
            ),
            Notable::GateCleared { task_id, gate } => emit_at!(
                level,
                name,
                task_id = task_id.as_str(),
                gate = gate.as_str(),
                cleared = true
            ),
            Notable::RebaseConflict {
                task_id,
                attempt,
                max_attempts,
                looping_back,
            } => emit_at!(
                level,
                name,
                task_id = task_id.as_str(),
                attempt = *attempt,
                max_attempts = *max_attempts,
                looping_back = *looping_back
            ),
            Notable::OrphanFound { task_id, orphan } => match orphan {
                Orphan::StaleClaim => emit_at!(
                    level,
                    name,
                    task_id = task_id.as_str(),
                    note = "stale claim cleared"
                ),
                Orphan::Run {
                    role,
                    processes_stopped,
                } => emit_at!(
                    level,
                    name,
                    task_id = task_id.as_str(),
                    role = role.as_str(),
                    processes_stopped = *processes_stopped
                ),
            },
            Notable::WorkerTimeout {
                task_id,
                role,
                detail,
            } => emit_at!(
                level,
                name,
                task_id = task_id.as_str(),
                role = role.as_str(),
                detail = detail.as_str()
            ),
            Notable::BudgetExceeded {
                budget,
                spent_usd,
                limit_usd,
            } => match budget {
                Budget::Total => emit_at!(
                    level,
                    name,
                    scope = "total",
                    spent_usd = *spent_usd,
                    limit_usd = *limit_usd,
                    hint = "raise runtime.max_total_cost_usd to let workers start again"
                ),
                Budget::Task { task_id } => emit_at!(
                    level,
                    name,
                    scope = "task",
                    task_id = task_id.as_str(),
                    spent_usd = *spent_usd,
                    limit_usd = *limit_usd
                ),
            },
            Notable::OrchestratorStarted {
                repo,
                branch,
                max_workers,
                max_rounds,
                overlay,
                github,
            } => emit_at!(
                level,
                name,
                repo = repo.as_str(),
                branch = branch.as_str(),
                max_workers = *max_workers,
                max_rounds = *max_rounds,
                overlay = overlay.as_deref().unwrap_or("-"),
                mode = if *github { "github" } else { "local" }
            ),
            Notable::OrchestratorHalted {
                halt,
                total_cycles,
                completed_tasks,
                failed_tasks,
            } => {
                let blocked = match halt {
                    Halt::Stuck { blocked, .. } => Some(blocked.join(",")),
                    _ => None,
                };
                emit_at!(
                    level,
                    name,
                    reason = halt.reason().as_str(),
                    retry_at = halt.retry_at(),
                    total_cycles = *total_cycles,
                    completed_tasks = *completed_tasks,
                    failed_tasks = *failed_tasks,
                    blocked = blocked.as_deref()
                );
            }
            Notable::CycleCompleted {
                cycle,
                spawned,
                reaped,
                merged,
                complete,
                failed,
                total,
                progress,
                duration_s,
            } => emit_at!(
                level,
                name,
                cycle = *cycle,
                spawned = *spawned,
                reaped = *reaped,
                merged = *merged,
                complete = *complete,
                failed = *failed,
                total = *total,
                progress = progress.as_str(),
                duration_s = *duration_s
            ),
            Notable::IntakeRan {
                success,
                counted,
                unprocessed_specs,
                created_tasks,
                duration_s,
                cycle,
                detail,
            } => emit_at!(
                level,
                name,
                success = *success,
                counted = *counted,
                unprocessed_specs = *unprocessed_specs,
                created_tasks = *created_tasks,
                duration_s = *duration_s,
                cycle = *cycle,
                detail = detail.as_deref()
            ),
            Notable::ProcessImproverRan {
                failed_task_ids,
                success,
                duration_s,
                cycle,
            } => emit_at!(
                level,
                name,
                failed_task_ids = failed_task_ids.join(",").as_str(),
                success = *success,
                duration_s = *duration_s,
                cycle = *cycle
            ),
        }
    }
}

impl Origin {
    fn fields(&self) -> (Option<&str>, Option<u64>) {
        match self {
            Origin::Work { item } => (Some(item.as_str()), None),
            Origin::Step { cycle } => (None, Some(*cycle)),
        }
    }
}

/// Hears every [`Notable`] emitted under the subscriber it is part of. A layer of its own so
/// that it goes wherever the subscriber goes (the process's global one, or a test's scoped
/// one); it takes no part in `tracing`'s own events.
#[derive(Clone)]
pub struct Listener {
    hear: Arc<dyn Fn(&Notable) + Send + Sync>,
}

impl Listener {
    /// `hear` runs on the emitting thread, inside the step: it must not block.
    pub fn new(hear: impl Fn(&Notable) + Send + Sync + 'static) -> Listener {
        Listener { hear: Arc::new(hear) }
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").finish_non_exhaustive()
    }
}

impl<S: Subscriber> Layer<S> for Listener {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::sync::Mutex;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// Lines written by the §7 formatter, kept in memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut b) = self.0.lock() {
                b.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines `events` write, with their timestamps taken off: JSON objects, or console text.
    fn lines(json: bool, events: impl FnOnce()) -> Vec<String> {
        let out = Lines::default();
        let writer = out.clone();
        let printer = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .event_format(crate::events::Formatter { json });
        tracing::subscriber::with_default(tracing_subscriber::registry().with(printer), events);
        let bytes = out.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| match l.split_once(' ') {
                Some((_, rest)) if !json => rest.to_string(),
                _ => l.to_string(),
            })
            .collect()
    }

    fn spawned(origin: Origin, branch: Option<&str>) -> Notable {
        Notable::WorkerSpawned {
            task_id: "task-001".into(),
            role: "implementer".into(),
            round: 2,
            branch: branch.map(str::to_string),
            spec_ref: "specs/a.md".into(),
            origin,
        }
    }

    fn reaped(verdict: Verdict, origin: Origin, log: Option<&str>) -> Notable {
        Notable::WorkerReaped {
            task_id: "task-001".into(),
            role: "verifier".into(),
            verdict,
            round: 1,
            duration_s: 42.123_456,
            findings_count: 3,
            cost_usd: 0.5,
            origin,
            log: log.map(str::to_string),
        }
    }

    fn halted(halt: Halt) -> Notable {
        Notable::OrchestratorHalted {
            halt,
            total_cycles: 7,
            completed_tasks: 2,
            failed_tasks: 1,
        }
    }

    fn intake(success: bool, counted: Option<bool>, detail: Option<&str>) -> Notable {
        Notable::IntakeRan {
            success,
            counted,
            unprocessed_specs: 2,
            created_tasks: if success { 3 } else { 0 },
            duration_s: 9.5,
            cycle: 4,
            detail: detail.map(str::to_string),
        }
    }

    /// Every shape each notable event's line has at its emit sites, and that line: level, name,
    /// then the fields in order, with their JSON types. A change here is a change to CONTRACT §7
    /// output that scripts read.
    fn cases() -> Vec<(Notable, Value)> {
        let work = || Origin::Work {
            item: "task-001-r2-implementer".into(),
        };
        vec![
            (
                spawned(work(), Some("worker/task-001")),
                json!({"level": "info", "event": "worker_spawned", "task_id": "task-001",
                    "role": "implementer", "round": 2, "branch": "worker/task-001",
                    "spec_ref": "specs/a.md", "item": "task-001-r2-implementer"}),
            ),
            (
                Notable::WorkerSpawned {
                    task_id: "intake".into(),
                    role: "pm".into(),
                    round: 0,
                    branch: None,
                    spec_ref: "specs".into(),
                    origin: Origin::Work {
                        item: "intake-1".into(),
                    },
                },
                json!({"level": "info", "event": "worker_spawned", "task_id": "intake",
                    "role": "pm", "round": 0, "spec_ref": "specs", "item": "intake-1"}),
            ),
            (
                spawned(Origin::Step { cycle: 5 }, Some("worker/task-001")),
                json!({"level": "info", "event": "worker_spawned", "task_id": "task-001",
                    "role": "implementer", "round": 2, "branch": "worker/task-001",
                    "spec_ref": "specs/a.md", "cycle": 5}),
            ),
            (
                reaped(Verdict::Fail, work(), None),
                json!({"level": "info", "event": "worker_reaped", "task_id": "task-001",
                    "role": "verifier", "verdict": "fail", "round": 1, "duration_s": 42.123,
                    "findings_count": 3, "cost_usd": 0.5, "item": "task-001-r2-implementer"}),
            ),
            (
                reaped(Verdict::Pass, Origin::Step { cycle: 5 }, Some("/l/run.jsonl")),
                json!({"level": "info", "event": "worker_reaped", "task_id": "task-001",
                    "role": "verifier", "verdict": "pass", "round": 1, "duration_s": 42.123,
                    "findings_count": 3, "cost_usd": 0.5, "cycle": 5, "log": "/l/run.jsonl"}),
            ),
            (
                reaped(Verdict::Timeout, Origin::Step { cycle: 5 }, Some("/l/run.jsonl")),
                json!({"level": "warning", "event": "worker_reaped", "task_id": "task-001",
                    "role": "verifier", "verdict": "timeout", "round": 1, "duration_s": 42.123,
                    "findings_count": 3, "cost_usd": 0.5, "cycle": 5, "log": "/l/run.jsonl"}),
            ),
            (
                Notable::TaskLoopedBack {
                    task_id: "task-001".into(),
                    spec_ref: "specs/a.md".into(),
                    round: 3,
                    verdict: "conflict".into(),
                    findings_count: 1,
                    findings_preview: "tests are missing".into(),
                },
                json!({"level": "warning", "event": "task_looped_back", "task_id": "task-001",
                    "spec_ref": "specs/a.md", "round": 3, "verdict": "conflict",
                    "findings_count": 1, "findings_preview": "tests are missing"}),
            ),
            (
                Notable::TaskCompleted {
                    task_id: "task-001".into(),
                    spec_ref: "specs/a.md".into(),
                    total_rounds: 2,
                    cost_usd: 1.234_56,
                },
                json!({"level": "info", "event": "task_completed", "task_id": "task-001",
                    "spec_ref": "specs/a.md", "total_rounds": 2, "cost_usd": 1.235}),
            ),
            (
                Notable::TaskFailed {
                    task_id: "task-001".into(),
                    spec_ref: "specs/a.md".into(),
                    reason: "max_task_rounds reached".into(),
                    round: 5,
                },
                json!({"level": "error", "event": "task_failed", "task_id": "task-001",
                    "spec_ref": "specs/a.md", "reason": "max_task_rounds reached", "round": 5}),
            ),
            (
                MergeAttempt {
                    branch: Some("worker/task-001".into()),
                    attempt: Some(0),
                    ..MergeAttempt::new("task-001", MergeOutcome::NothingToMerge)
                }
                .into(),
                json!({"level": "info", "event": "merge_attempted", "task_id": "task-001",
                    "branch": "worker/task-001", "outcome": "nothing-to-merge", "attempt": 0}),
            ),
            (
                MergeAttempt {
                    branch: Some("worker/task-001".into()),
                    spec_ref: Some("specs/a.md".into()),
                    strategy: Some(MergeStrategy::Squash),
                    attempt: Some(1),
                    ..MergeAttempt::new("task-001", MergeOutcome::Merged)
                }
                .into(),
                json!({"level": "info", "event": "merge_attempted", "task_id": "task-001",
                    "branch": "worker/task-001", "spec_ref": "specs/a.md", "outcome": "merged",
                    "strategy": "squash", "attempt": 1}),
            ),
            (
                MergeAttempt {
                    branch: Some("worker/task-001".into()),
                    attempt: Some(2),
                    ..MergeAttempt::new("task-001", MergeOutcome::Conflict)
                }
                .into(),
                json!({"level": "warning", "event": "merge_attempted", "task_id": "task-001",
                    "branch": "worker/task-001", "outcome": "conflict", "attempt": 2}),
            ),
            (
                MergeAttempt {
                    pr: Some(PullRequest::Url("https://github.com/o/r/pull/7".into())),
                    ..MergeAttempt::new("task-001", MergeOutcome::MergedOutsideThisStep)
                }
                .into(),
                json!({"level": "info", "event": "merge_attempted", "task_id": "task-001",
                    "outcome": "merged-outside-this-step", "pr": "https://github.com/o/r/pull/7"}),
            ),
            (
                MergeAttempt {
                    branch: Some("worker/task-001".into()),
                    spec_ref: Some("specs/a.md".into()),
                    strategy: Some(MergeStrategy::Merge),
                    pr: Some(PullRequest::Number(7)),
                    ..MergeAttempt::new("task-001", MergeOutcome::Merged)
                }
                .into(),
                json!({"level": "info", "event": "merge_attempted", "task_id": "task-001",
                    "branch": "worker/task-001", "spec_ref": "specs/a.md", "outcome": "merged",
                    "strategy": "merge", "pr": 7}),
            ),
            (
                MergeAttempt {
                    branch: Some("worker/task-001".into()),
                    reason: Some("Conflict".into()),
                    detail: Some("merge conflict".into()),
                    ..MergeAttempt::new("task-001", MergeOutcome::NotMergeable)
                }
                .into(),
                json!({"level": "warning", "event": "merge_attempted", "task_id": "task-001",
                    "branch": "worker/task-001", "outcome": "not-mergeable",
                    "reason": "Conflict", "detail": "merge conflict"}),
            ),
            (
                MergeAttempt {
                    branch: Some("worker/task-001".into()),
                    spec_ref: Some("specs/a.md".into()),
                    strategy: Some(MergeStrategy::Squash),
                    into: Some("main".into()),
                    ..MergeAttempt::new("task-001", MergeOutcome::AlreadyMerged)
                }
                .into(),
                json!({"level": "info", "event": "merge_attempted", "task_id": "task-001",
                    "branch": "worker/task-001", "spec_ref": "specs/a.md",
                    "outcome": "already-merged", "strategy": "squash", "into": "main"}),
            ),
            (
                Notable::GatePolled {
                    task_id: "task-001".into(),
                    gate: "human-review".into(),
                    cleared: false,
                },
                json!({"level": "debug", "event": "gate_checked", "task_id": "task-001",
                    "gate": "human-review", "cleared": false}),
            ),
            (
                Notable::GateCleared {
                    task_id: "task-001".into(),
                    gate: "human-review".into(),
                },
                json!({"level": "info", "event": "gate_checked", "task_id": "task-001",
                    "gate": "human-review", "cleared": true}),
            ),
            (
                Notable::RebaseConflict {
                    task_id: "task-001".into(),
                    attempt: 3,
                    max_attempts: 3,
                    looping_back: true,
                },
                json!({"level": "warning", "event": "rebase_conflict", "task_id": "task-001",
                    "attempt": 3, "max_attempts": 3, "looping_back": true}),
            ),
            (
                Notable::OrphanFound {
                    task_id: "task-001".into(),
                    orphan: Orphan::StaleClaim,
                },
                json!({"level": "warning", "event": "orphan_found", "task_id": "task-001",
                    "note": "stale claim cleared"}),
            ),
            (
                Notable::OrphanFound {
                    task_id: "task-001".into(),
                    orphan: Orphan::Run {
                        role: "verifier".into(),
                        processes_stopped: 2,
                    },
                },
                json!({"level": "warning", "event": "orphan_found", "task_id": "task-001",
                    "role": "verifier", "processes_stopped": 2}),
            ),
            (
                Notable::WorkerTimeout {
                    task_id: "task-001".into(),
                    role: "implementer".into(),
                    detail: "no output for 900 s".into(),
                },
                json!({"level": "warning", "event": "worker_timeout", "task_id": "task-001",
                    "role": "implementer", "detail": "no output for 900 s"}),
            ),
            (
                Notable::BudgetExceeded {
                    budget: Budget::Total,
                    spent_usd: 10.5,
                    limit_usd: 10.0,
                },
                json!({"level": "error", "event": "budget_exceeded", "scope": "total",
                    "spent_usd": 10.5, "limit_usd": 10.0,
                    "hint": "raise runtime.max_total_cost_usd to let workers start again"}),
            ),
            (
                Notable::BudgetExceeded {
                    budget: Budget::Task {
                        task_id: "task-001".into(),
                    },
                    spent_usd: 2.5,
                    limit_usd: 2.0,
                },
                json!({"level": "error", "event": "budget_exceeded", "scope": "task",
                    "task_id": "task-001", "spent_usd": 2.5, "limit_usd": 2.0}),
            ),
            (
                Notable::OrchestratorStarted {
                    repo: "/r".into(),
                    branch: "main".into(),
                    max_workers: 6,
                    max_rounds: 50,
                    overlay: None,
                    github: true,
                },
                json!({"level": "info", "event": "orchestrator_started", "repo": "/r",
                    "branch": "main", "max_workers": 6, "max_rounds": 50, "overlay": "-",
                    "mode": "github"}),
            ),
            (
                halted(Halt::RateLimited {
                    retry_at: "2026-01-01T00:00:00Z".into(),
                }),
                json!({"level": "warning", "event": "orchestrator_halted",
                    "reason": "GitHub rate limit reached", "retry_at": "2026-01-01T00:00:00Z",
                    "total_cycles": 7, "completed_tasks": 2, "failed_tasks": 1}),
            ),
            (
                halted(Halt::AllComplete),
                json!({"level": "info", "event": "orchestrator_halted",
                    "reason": "all tasks complete", "total_cycles": 7, "completed_tasks": 2,
                    "failed_tasks": 1}),
            ),
            (
                halted(Halt::Idle),
                json!({"level": "info", "event": "orchestrator_halted",
                    "reason": "nothing to do: no specs and no tasks", "total_cycles": 7,
                    "completed_tasks": 2, "failed_tasks": 1}),
            ),
            (
                halted(Halt::Stuck {
                    reason: "1 task(s) failed".into(),
                    blocked: vec!["task-002".into(), "task-003".into()],
                }),
                json!({"level": "error", "event": "orchestrator_halted",
                    "reason": "1 task(s) failed", "total_cycles": 7, "completed_tasks": 2,
                    "failed_tasks": 1, "blocked": "task-002,task-003"}),
            ),
            (
                halted(Halt::PaceSpent {
                    retry_at: "2026-01-01T00:00:00+00:00".into(),
                }),
                json!({"level": "info", "event": "orchestrator_halted",
                    "reason": "GitHub write pace spent", "retry_at": "2026-01-01T00:00:00+00:00",
                    "total_cycles": 7, "completed_tasks": 2, "failed_tasks": 1}),
            ),
            (
                halted(Halt::MaxCycles { max_cycles: 7 }),
                json!({"level": "warning", "event": "orchestrator_halted",
                    "reason": "max_cycles exhausted (7)", "total_cycles": 7,
                    "completed_tasks": 2, "failed_tasks": 1}),
            ),
            (
                halted(Halt::Interrupted),
                json!({"level": "warning", "event": "orchestrator_halted",
                    "reason": "interrupted by a signal", "total_cycles": 7,
                    "completed_tasks": 2, "failed_tasks": 1}),
            ),
            (
                Notable::CycleCompleted {
                    cycle: 3,
                    spawned: 2,
                    reaped: 1,
                    merged: 1,
                    complete: 4,
                    failed: 0,
                    total: 6,
                    progress: "progressed".into(),
                    duration_s: 12.3,
                },
                json!({"level": "info", "event": "cycle_completed", "cycle": 3, "spawned": 2,
                    "reaped": 1, "merged": 1, "complete": 4, "failed": 0, "total": 6,
                    "progress": "progressed", "duration_s": 12.3}),
            ),
            (
                intake(true, None, None),
                json!({"level": "info", "event": "intake_ran", "success": true,
                    "unprocessed_specs": 2, "created_tasks": 3, "duration_s": 9.5, "cycle": 4}),
            ),
            (
                intake(false, None, Some("no task files")),
                json!({"level": "warning", "event": "intake_ran", "success": false,
                    "unprocessed_specs": 2, "created_tasks": 0, "duration_s": 9.5, "cycle": 4,
                    "detail": "no task files"}),
            ),
            (
                intake(false, Some(false), Some("timed out")),
                json!({"level": "warning", "event": "intake_ran", "success": false,
                    "counted": false, "unprocessed_specs": 2, "created_tasks": 0,
                    "duration_s": 9.5, "cycle": 4, "detail": "timed out"}),
            ),
            (
                Notable::ProcessImproverRan {
                    failed_task_ids: vec!["task-001".into(), "task-004".into()],
                    success: true,
                    duration_s: 30.0,
                    cycle: 8,
                },
                json!({"level": "info", "event": "process_improver_ran",
                    "failed_task_ids": "task-001,task-004", "success": true, "duration_s": 30.0,
                    "cycle": 8}),
            ),
        ]
    }

    #[test]
    fn every_notable_line_keeps_its_name_fields_order_and_types() {
        let cases = cases();
        let written = lines(true, || {
            for (ev, _) in &cases {
                ev.clone().emit();
            }
        });
        assert_eq!(written.len(), cases.len(), "{written:#?}");
        for ((ev, expected), line) in cases.iter().zip(&written) {
            let mut got: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap_or_default();
            assert!(
                got.shift_remove("timestamp").is_some_and(|t| t.is_string()),
                "{line}"
            );
            // Compared as lists, so that the order of the fields counts too.
            let got: Vec<(String, Value)> = got.into_iter().collect();
            let want: Vec<(String, Value)> = expected
                .as_object()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .collect();
            assert_eq!(got, want, "{ev:?}");
            assert_eq!(expected["event"], ev.name());
        }
        // Each variant's line is pinned above.
        let names: std::collections::BTreeSet<&str> = cases.iter().map(|(ev, _)| ev.name()).collect();
        assert_eq!(names.len(), 16, "{names:?}");
    }

    #[test]
    fn the_console_line_is_the_same_event() {
        let written = lines(false, || {
            Notable::TaskFailed {
                task_id: "task-001".into(),
                spec_ref: "specs/a.md".into(),
                reason: "max_task_rounds reached".into(),
                round: 5,
            }
            .emit();
        });
        assert_eq!(
            written,
            [
                "[error  ] task_failed        task_id=task-001 spec_ref=specs/a.md",
                "   reason=\"max_task_rounds reached\" round=5"
            ]
        );
    }

    #[test]
    fn the_listener_is_handed_the_value_itself() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let into = Arc::clone(&heard);
        let listener = Listener::new(move |ev| {
            if let Ok(mut h) = into.lock() {
                h.push(ev.clone());
            }
        });
        let sent = cases();
        let printed = Lines::default();
        let writer = printed.clone();
        // As the process installs it: beside the printer, and filtered so that it takes no
        // `tracing` event at all.
        let subscriber = tracing_subscriber::registry()
            .with(Some(
                Box::new(listener.with_filter(tracing_subscriber::filter::LevelFilter::OFF))
                    as crate::events::ExtraLayer,
            ))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || writer.clone())
                    .event_format(crate::events::Formatter { json: true })
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            );
        tracing::subscriber::with_default(subscriber, || {
            for (ev, _) in &sent {
                ev.clone().emit();
            }
            // A plain line with a notable name is text, and no listener hears text.
            crate::emit!(INFO, "task_completed", task_id = "task-009", total_rounds = 1u64);
        });
        let heard = heard.lock().map(|h| h.clone()).unwrap_or_default();
        let sent: Vec<Notable> = sent.into_iter().map(|(ev, _)| ev).collect();
        // Debug lines are below the printer's level; the listener hears them all the same.
        assert_eq!(heard, sent);
        let printed = printed.0.lock().map(|b| b.clone()).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&printed).contains("\"level\":\"debug\""));
        assert!(String::from_utf8_lossy(&printed).contains("task-009"));
    }
}
