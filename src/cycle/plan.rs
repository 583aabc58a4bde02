//! The plan of one cycle: the actions the scheduler chose, in the order the executor should take
//! them, the tasks held back by failed dependencies, the tasks parked until a person acts, and the
//! overall progress. Printable, one line per action with its reason, for `step --dry-run`.

use std::fmt;

use serde::Serialize;

use crate::pipeline::{PipelineAction, Position};
use crate::task::Claim;

/// A worker result that did not pass and that the process improver has not seen yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FailureNote {
    pub task_id: String,
    pub role: String,
    pub round: u32,
    pub verdict: String,
    pub detail: String,
}

/// Why a worker is spawned for a task that is already in its pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum SpawnReason {
    /// The task's merge conflicted: run the rebase-resolver.
    Rebase { attempt: u32 },
    /// The task stands at a role and no worker runs it.
    Resume,
    /// The stored position did not fit the process; the task starts over at its first step.
    Restart { reason: String },
}

/// One thing the executor should do this cycle.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Action {
    /// Fail a task for a reason found at load time (round limit spent, unknown action).
    FailTask { task_id: String, reason: String },
    /// A claim whose worker is no longer running here: collect its result or release it.
    Recover { task_id: String, claim: Claim },
    /// Show the process improver the failures it has not seen.
    RunImprover { failures: Vec<FailureNote> },
    /// Run intake (pm) on new or changed specs.
    RunIntake {
        specs: Vec<String>,
        removed: Vec<String>,
    },
    /// A gate the task waits at was already approved: move on.
    ClearGate { task_id: String, gate: String },
    /// Ask the forge whether the gate's label is there.
    PollGate { task_id: String, gate: String },
    /// Perform the action the task stands at. `approved` when a person cleared a manual merge.
    Perform {
        task_id: String,
        action: PipelineAction,
        approved: bool,
    },
    /// Spawn the worker for a task already in its pipeline.
    Spawn {
        task_id: String,
        role: String,
        position: Position,
        round: u32,
        reason: SpawnReason,
    },
    /// Put a not-started task whose dependencies are complete at its first step; `role` is the
    /// worker that then starts (none when the first step is a gate or an action).
    Start {
        task_id: String,
        deps: Vec<String>,
        position: Position,
        role: Option<String>,
    },
}

impl Action {
    /// The task the action concerns, if any.
    pub fn task_id(&self) -> Option<&str> {
        match self {
            Action::FailTask { task_id, .. }
            | Action::Recover { task_id, .. }
            | Action::ClearGate { task_id, .. }
            | Action::PollGate { task_id, .. }
            | Action::Perform { task_id, .. }
            | Action::Spawn { task_id, .. }
            | Action::Start { task_id, .. } => Some(task_id),
            Action::RunImprover { .. } | Action::RunIntake { .. } => None,
        }
    }

    /// True when the action starts an agent process (and so takes one of `max_workers`).
    pub fn takes_worker(&self) -> bool {
        match self {
            Action::RunImprover { .. } | Action::RunIntake { .. } | Action::Spawn { .. } => true,
            Action::Start { role, .. } => role.is_some(),
            _ => false,
        }
    }
}

/// A task that cannot start because a task it depends on (directly or not) failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blocked {
    pub task_id: String,
    /// The failed tasks in its dependency tree, sorted.
    pub because: Vec<String>,
    /// Those of them a person cancelled.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cancelled: Vec<String>,
}

/// A task that waits for a person: at a gate nobody cleared, or at `merge-pr` without
/// `auto_merge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Parked {
    pub task_id: String,
    /// The gate or action it waits at.
    pub step: String,
    /// What would release it.
    pub needs: String,
}

/// How far the whole set of tasks has come.
///
/// `Waiting` and `Stuck` both mean another step right away would change nothing: `run` stops on
/// either rather than spin until `max_cycles`. `Waiting` is the hopeful one (a person can
/// approve), `Stuck` the final one (only fixing a task file helps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "progress")]
pub enum Progress {
    /// Every task is complete and there is nothing to take in.
    AllComplete,
    /// Something ran, runs or can run.
    Working,
    /// Nothing can move until a person clears a gate or approves a merge; the ids of those tasks.
    Waiting { gates: Vec<String> },
    /// Nothing runs or can run, and failed tasks (or their dependents) remain.
    Stuck {
        failed: Vec<String>,
        blocked: Vec<String>,
    },
    /// No tasks and no specs to take in.
    Idle,
}

impl Progress {
    /// True when `run` should stop after this step.
    pub fn is_final(&self) -> bool {
        !matches!(self, Progress::Working)
    }
}

/// What one cycle will do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub blocked: Vec<Blocked>,
    pub parked: Vec<Parked>,
    pub progress: Progress,
    /// Workers this plan starts, and the limit it respected.
    pub workers: WorkerCount,
}

/// Worker slots as the plan saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WorkerCount {
    /// Already running (this step's workers, live claims of other steps, a running intake).
    pub running: usize,
    /// Started by this plan.
    pub planned: usize,
    /// `runtime.max_workers`.
    pub max: usize,
    /// Workers that could start but found no free slot.
    pub deferred: usize,
}

fn list(items: &[String]) -> String {
    items.join(", ")
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::FailTask { task_id, reason } => write!(f, "fail {task_id}: {reason}"),
            Action::Recover { task_id, claim } => write!(
                f,
                "recover {task_id}: its {} worker (claimed by {}, expires at {}) is not running here",
                claim.role, claim.owner, claim.expires_at
            ),
            Action::RunImprover { failures } => {
                let notes: Vec<String> = failures
                    .iter()
                    .map(|n| format!("{} {} round {}: {}", n.task_id, n.role, n.round, n.verdict))
                    .collect();
                write!(
                    f,
                    "run process-improver on {} failure(s) ({})",
                    failures.len(),
                    notes.join("; ")
                )
            }
            Action::RunIntake { specs, removed } => {
                write!(f, "run intake (pm) for new or changed specs: {}", list(specs))?;
                if !removed.is_empty() {
                    write!(f, "; removed since last intake: {}", list(removed))?;
                }
                Ok(())
            }
            Action::ClearGate { task_id, gate } => {
                write!(f, "clear gate {gate} of {task_id} (approved) → next step")
            }
            Action::PollGate { task_id, gate } => {
                write!(f, "poll gate {gate} of {task_id} (is the lgtm label on its PR?)")
            }
            Action::Perform {
                task_id,
                action,
                approved,
            } => {
                let why = if *action != PipelineAction::MergePr {
                    "its pipeline reached it"
                } else if *approved {
                    "merge approved"
                } else {
                    "auto_merge"
                };
                write!(f, "perform {action} for {task_id} ({why})")
            }
            Action::Spawn {
                task_id,
                role,
                position,
                round,
                reason,
            } => {
                let why = match reason {
                    SpawnReason::Rebase { attempt } => {
                        format!("merge conflict, attempt {attempt}")
                    }
                    SpawnReason::Resume => "no worker runs it".to_string(),
                    SpawnReason::Restart { reason } => format!("restarting pipeline: {reason}"),
                };
                write!(
                    f,
                    "spawn {role} for {task_id} at {position}, round {round} ({why})"
                )
            }
            Action::Start {
                task_id,
                deps,
                position,
                role,
            } => {
                let why = if deps.is_empty() {
                    "no deps".to_string()
                } else {
                    format!("deps {} complete", list(deps))
                };
                match role {
                    Some(role) => write!(f, "start {task_id} ({why}) → {role}"),
                    None => write!(f, "start {task_id} ({why}) → step {position}"),
                }
            }
        }
    }
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Progress::AllComplete => f.write_str("all tasks complete"),
            Progress::Working => f.write_str("working"),
            Progress::Waiting { gates } => {
                write!(f, "waiting for a person: {}", list(gates))
            }
            Progress::Stuck { failed, blocked } => {
                write!(f, "stuck: failed {}", list(failed))?;
                if !blocked.is_empty() {
                    write!(f, "; blocked {}", list(blocked))?;
                }
                Ok(())
            }
            Progress::Idle => f.write_str("idle: no tasks and no specs to take in"),
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.actions.is_empty() {
            writeln!(f, "no actions")?;
        }
        for action in &self.actions {
            writeln!(f, "{action}")?;
        }
        for b in &self.blocked {
            let failed: Vec<String> = b
                .because
                .iter()
                .filter(|id| !b.cancelled.contains(id))
                .cloned()
                .collect();
            let mut why = Vec::new();
            if !failed.is_empty() {
                why.push(format!("failed {}", list(&failed)));
            }
            if !b.cancelled.is_empty() {
                why.push(format!("cancelled {}", list(&b.cancelled)));
            }
            writeln!(f, "blocked {} (depends on {})", b.task_id, why.join("; "))?;
        }
        for p in &self.parked {
            writeln!(f, "waiting {} at {} ({})", p.task_id, p.step, p.needs)?;
        }
        writeln!(
            f,
            "workers: {} running, {} to start, max {}",
            self.workers.running, self.workers.planned, self.workers.max
        )?;
        if self.workers.deferred > 0 {
            writeln!(f, "{} more wait for a free worker", self.workers.deferred)?;
        }
        write!(f, "progress: {}", self.progress)
    }
}
