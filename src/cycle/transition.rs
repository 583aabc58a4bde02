//! The task state machine: pure functions that move one in-memory [`Task`] through its process
//! pipeline when a worker reports, a gate clears, an action succeeds or a merge conflicts. Each
//! returns a [`TaskChange`] saying what happened, from which the executor emits events; writing
//! the task file is the caller's business. Positions are exact paths; the phase name is kept in
//! step with them for people and for hyperloop 0.9.2, whose files hold only the phase.

use crate::pipeline::{self, MERGE_PR, Outcome, Position, REBASE_RESOLVER, Step, Transition, Verdict};
use crate::task::{Status, Task};

/// What one call did to a task: the state before and after, and the events in order.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskChange {
    pub task_id: String,
    pub from_status: Status,
    pub to_status: Status,
    pub from_phase: Option<String>,
    pub to_phase: Option<String>,
    pub from_round: u32,
    pub to_round: u32,
    pub events: Vec<ChangeEvent>,
}

/// One thing that happened to a task.
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeEvent {
    /// A not-started task entered its pipeline.
    Started,
    /// The stored position was missing or stale and the phase named exactly one step.
    Relocated { from: Option<Position>, to: Position },
    /// The stored position could not be trusted, so the task starts its pipeline again.
    RestartedPipeline { reason: String },
    /// Forward to the next step.
    Advanced,
    /// Back to the start of a loop after a non-pass, one round later.
    LoopedBack {
        verdict: String,
        findings: u32,
        detail: String,
    },
    /// The last step passed.
    Completed,
    /// The task failed for good.
    Failed { reason: String },
    /// A person stopped the task.
    Cancelled { reason: String },
    /// A person put a failed or cancelled task back into its pipeline.
    Retried { from_reason: String },
    /// A merge conflicted; the rebase-resolver gets another try.
    NeedsRebase { attempt: u32, max_attempts: u32 },
    /// A merge conflicted once too often; the task loops back (a [`ChangeEvent::LoopedBack`]
    /// or [`ChangeEvent::Failed`] follows).
    RebaseGaveUp { attempts: u32 },
    /// The rebase-resolver passed; the merge is retried.
    RebaseResolved,
    /// Nothing changed: the call did not apply to the task as it is.
    Ignored { reason: String },
}

impl ChangeEvent {
    /// The CONTRACT §7 event this maps to; `None` for changes that are not reported.
    pub fn event_name(&self) -> Option<&'static str> {
        match self {
            ChangeEvent::Started
            | ChangeEvent::Relocated { .. }
            | ChangeEvent::RestartedPipeline { .. }
            | ChangeEvent::Advanced
            | ChangeEvent::RebaseResolved => Some("task_advanced"),
            ChangeEvent::LoopedBack { .. } => Some("task_looped_back"),
            ChangeEvent::Completed => Some("task_completed"),
            ChangeEvent::Failed { .. } => Some("task_failed"),
            ChangeEvent::Cancelled { .. } => Some("task_cancelled"),
            ChangeEvent::Retried { .. } => Some("task_retried"),
            ChangeEvent::NeedsRebase { .. } | ChangeEvent::RebaseGaveUp { .. } => Some("rebase_conflict"),
            ChangeEvent::Ignored { .. } => None,
        }
    }
}

impl TaskChange {
    /// True when the call left the task as it was.
    pub fn is_noop(&self) -> bool {
        self.events
            .iter()
            .all(|e| matches!(e, ChangeEvent::Ignored { .. }))
    }
}

/// Records the task's state before a change so the change can be described afterwards.
struct Before {
    status: Status,
    phase: Option<String>,
    round: u32,
}

impl Before {
    fn of(task: &Task) -> Self {
        Before {
            status: task.status,
            phase: task.phase.clone(),
            round: task.round,
        }
    }

    fn change(self, task: &Task, events: Vec<ChangeEvent>) -> TaskChange {
        TaskChange {
            task_id: task.id.clone(),
            from_status: self.status,
            to_status: task.status,
            from_phase: self.phase,
            to_phase: task.phase.clone(),
            from_round: self.round,
            to_round: task.round,
            events,
        }
    }
}

/// How a task's stored position maps onto the pipeline as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The stored position names a leaf whose name matches the stored phase (or no phase).
    Exact,
    /// No usable position, but the phase names exactly one leaf.
    ByPhase,
    /// Neither: the task has to start its pipeline again.
    Restarted { reason: String },
}

/// Where a task stands in `pipeline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub position: Position,
    pub placement: Placement,
}

/// Where an active task stands, without changing it. `None` only when the pipeline has no leaf.
///
/// A position that still names a leaf with the stored phase is trusted. Otherwise (a 0.9.2 file
/// with only `phase`, or a process that changed under the task) the phase is looked up, and used
/// only when exactly one leaf carries that name: a repeated role name is exactly the guess 0.9.2
/// got wrong, so then the pipeline starts over.
pub fn locate(task: &Task, pipeline: &[Step]) -> Option<Located> {
    let mut reason = match &task.position {
        Some(path) => match pipeline::validate_position(pipeline, path) {
            Some(position) => {
                let leaf_name = pipeline::step_at(pipeline, &position).map(pipeline::phase_name);
                match &task.phase {
                    Some(phase) if leaf_name.as_deref() != Some(phase.as_str()) => format!(
                        "the step at {position} is now {}, not {phase}",
                        leaf_name.unwrap_or_default()
                    ),
                    _ => {
                        return Some(Located {
                            position,
                            placement: Placement::Exact,
                        });
                    }
                }
            }
            None => format!(
                "position {} is not a step of the pipeline",
                Position(path.clone())
            ),
        },
        None => "no recorded position".to_string(),
    };
    if let Some(phase) = &task.phase {
        let mut found = pipeline::positions_named(pipeline, phase);
        if found.len() == 1
            && let Some(position) = found.pop()
        {
            return Some(Located {
                position,
                placement: Placement::ByPhase,
            });
        }
        if found.is_empty() {
            reason.push_str(&format!("; the pipeline has no step {phase}"));
        } else {
            reason.push_str(&format!("; the pipeline has {} steps named {phase}", found.len()));
        }
    }
    pipeline::first_leaf(pipeline).map(|position| Located {
        position,
        placement: Placement::Restarted { reason },
    })
}

/// Puts the task at `position`, keeping `phase` in step with it.
fn place(task: &mut Task, pipeline: &[Step], position: Position) {
    task.phase = pipeline::step_at(pipeline, &position).map(pipeline::phase_name);
    task.position = Some(position.0);
    // A cleared gate belongs to the gate it was cleared at, never to the next one.
    task.gate_cleared = false;
}

fn fail(task: &mut Task, reason: String) -> ChangeEvent {
    task.status = Status::Failed;
    task.failure_reason = Some(reason.clone());
    ChangeEvent::Failed { reason }
}

fn complete(task: &mut Task) -> ChangeEvent {
    task.status = Status::Complete;
    task.phase = None;
    task.position = None;
    task.gate_cleared = false;
    task.rebase_attempts = 0;
    task.failure_reason = None;
    task.clear_findings();
    ChangeEvent::Completed
}

const NO_STEPS: &str = "the process pipeline has no steps";

/// Makes an active task's stored position exact (see [`locate`]), recording what that took.
/// The events are empty when the position was already exact.
fn settle(task: &mut Task, pipeline: &[Step]) -> Vec<ChangeEvent> {
    let Some(located) = locate(task, pipeline) else {
        return vec![fail(task, NO_STEPS.to_string())];
    };
    let from = task.position.clone().map(Position);
    match located.placement {
        Placement::Exact => {
            if task.phase.is_none() {
                task.phase = pipeline::step_at(pipeline, &located.position).map(pipeline::phase_name);
            }
            Vec::new()
        }
        Placement::ByPhase => {
            let to = located.position.clone();
            let gate_cleared = task.gate_cleared;
            place(task, pipeline, located.position);
            // Same step, just found by name: an approval given there still counts.
            task.gate_cleared = gate_cleared;
            vec![ChangeEvent::Relocated { from, to }]
        }
        Placement::Restarted { reason } => {
            place(task, pipeline, located.position);
            task.status = Status::InProgress;
            task.rebase_attempts = 0;
            vec![ChangeEvent::RestartedPipeline { reason }]
        }
    }
}

/// Settles the position of an in-progress or needs-rebase task before it is scheduled.
/// `None` when nothing had to change.
pub fn resolve(task: &mut Task, pipeline: &[Step]) -> Option<TaskChange> {
    if !matches!(task.status, Status::InProgress | Status::NeedsRebase) {
        return None;
    }
    let before = Before::of(task);
    let events = settle(task, pipeline);
    (!events.is_empty()).then(|| before.change(task, events))
}

fn ignored(task: &Task, reason: String) -> TaskChange {
    Before::of(task).change(task, vec![ChangeEvent::Ignored { reason }])
}

/// A not-started task enters its pipeline at the first leaf; the round stays where it was.
pub fn start(task: &mut Task, pipeline: &[Step]) -> TaskChange {
    if task.status != Status::NotStarted {
        return ignored(task, format!("task is {}, not not-started", task.status));
    }
    let before = Before::of(task);
    let event = match pipeline::first_leaf(pipeline) {
        Some(position) => {
            place(task, pipeline, position);
            task.status = Status::InProgress;
            ChangeEvent::Started
        }
        None => fail(task, NO_STEPS.to_string()),
    };
    before.change(task, vec![event])
}

/// Fails a task outright (for instance when it is found past its round limit).
pub fn fail_task(task: &mut Task, reason: &str) -> TaskChange {
    if task.status.is_terminal() {
        return ignored(task, format!("task is already {}", task.status));
    }
    let before = Before::of(task);
    let event = fail(task, reason.to_string());
    before.change(task, vec![event])
}

/// A person stops a task that is not complete: it fails, marked cancelled, and keeps its
/// position so that [`retry`] can put it back where it stood.
pub fn cancel(task: &mut Task, reason: &str) -> TaskChange {
    if task.status == Status::Complete {
        return ignored(task, "task is complete".to_string());
    }
    if task.cancelled {
        return ignored(task, "task is already cancelled".to_string());
    }
    let before = Before::of(task);
    task.status = Status::Failed;
    task.cancelled = true;
    task.claim = None;
    task.gate_cleared = false;
    task.failure_reason = Some(reason.to_string());
    before.change(
        task,
        vec![ChangeEvent::Cancelled {
            reason: reason.to_string(),
        }],
    )
}

/// A person puts a failed (or cancelled) task back: to the start of the innermost loop around
/// the step it stopped at, or to that step itself when no loop encloses it; a task that never
/// started starts again from nothing. Findings and history stay; the round budget starts again
/// from the current round.
pub fn retry(task: &mut Task, pipeline: &[Step]) -> TaskChange {
    if task.status != Status::Failed {
        return ignored(task, format!("task is {}, not failed", task.status));
    }
    let before = Before::of(task);
    let from_reason = task.failure_reason.take().unwrap_or_else(|| "failed".to_string());
    task.cancelled = false;
    task.claim = None;
    task.rebase_attempts = 0;
    task.gate_cleared = false;
    task.rounds_from = task.round;
    if task.position.is_none() && task.phase.is_none() {
        task.status = Status::NotStarted;
    } else {
        task.status = Status::InProgress;
        match locate(task, pipeline) {
            Some(located) => {
                let to =
                    pipeline::enclosing_loop_start(pipeline, &located.position.0).unwrap_or(located.position);
                place(task, pipeline, to);
            }
            None => {
                task.status = Status::NotStarted;
                task.phase = None;
                task.position = None;
            }
        }
    }
    before.change(task, vec![ChangeEvent::Retried { from_reason }])
}

/// The reason a task gives when it runs out of rounds (0.9.2 wording).
pub fn round_limit_reason(max_task_rounds: u32) -> String {
    format!("exceeded max_task_rounds ({max_task_rounds})")
}

/// Sends the task back to `to` for another round, or fails it when that round would reach the
/// limit. The findings are recorded either way: they explain the failure too.
fn loop_back(
    task: &mut Task,
    pipeline: &[Step],
    to: Position,
    failed: &FailedRun<'_>,
    max_task_rounds: u32,
) -> Vec<ChangeEvent> {
    task.append_findings(task.round, failed.role, failed.verdict, failed.detail);
    let next = task.round.saturating_add(1);
    task.round = next;
    if next.saturating_sub(task.rounds_from) >= max_task_rounds {
        // The round is spent; clamp so a limit of 0 cannot leave a round above it.
        task.round = next.min(task.rounds_from.saturating_add(max_task_rounds));
        return vec![fail(task, round_limit_reason(max_task_rounds))];
    }
    place(task, pipeline, to);
    task.status = Status::InProgress;
    vec![ChangeEvent::LoopedBack {
        verdict: failed.verdict.to_string(),
        findings: failed.findings,
        detail: failed.detail.to_string(),
    }]
}

/// A run that did not pass, as it goes into the findings.
struct FailedRun<'a> {
    role: &'a str,
    verdict: &'a str,
    detail: &'a str,
    findings: u32,
}

fn fail_without_loop(task: &mut Task, failed: &FailedRun<'_>, reason: &str) -> Vec<ChangeEvent> {
    task.append_findings(task.round, failed.role, failed.verdict, failed.detail);
    let detail = failed.detail.trim();
    let reason = if detail.is_empty() {
        reason.to_string()
    } else {
        format!("{reason}: {detail}")
    };
    vec![fail(task, reason)]
}

/// Records a worker's verdict. `role` is the role the worker ran: the role at the task's position
/// for an in-progress task, the rebase-resolver for a needs-rebase one. A verdict that does not
/// match where the task stands (a result of a step the process no longer has) changes nothing
/// but `last_verdict`.
pub fn apply_verdict(
    task: &mut Task,
    pipeline: &[Step],
    role: &str,
    verdict: Verdict,
    detail: &str,
    findings: u32,
    max_task_rounds: u32,
) -> TaskChange {
    if !matches!(task.status, Status::InProgress | Status::NeedsRebase) {
        return ignored(
            task,
            format!("{role} reported {verdict}, but the task is {}", task.status),
        );
    }
    let before = Before::of(task);
    task.last_verdict = Some(verdict.as_str().to_string());
    let mut events = settle(task, pipeline);
    if task.status == Status::Failed {
        return before.change(task, events);
    }
    if events
        .iter()
        .any(|e| matches!(e, ChangeEvent::RestartedPipeline { .. }))
    {
        // The step that ran is gone; its findings still tell the next worker something.
        if !verdict.is_pass() {
            task.append_findings(task.round, role, verdict.as_str(), detail);
        }
        events.push(ChangeEvent::Ignored {
            reason: format!("{role} ran at a step the pipeline no longer has"),
        });
        return before.change(task, events);
    }
    let Some(position) = task.position.clone().map(Position) else {
        events.push(ChangeEvent::Ignored {
            reason: "task has no position".into(),
        });
        return before.change(task, events);
    };
    let failed = FailedRun {
        role,
        verdict: verdict.as_str(),
        detail,
        findings,
    };

    if task.status == Status::NeedsRebase {
        if role != REBASE_RESOLVER {
            events.push(ChangeEvent::Ignored {
                reason: format!("{role} reported, but the task waits for the {REBASE_RESOLVER}"),
            });
            return before.change(task, events);
        }
        task.status = Status::InProgress;
        if verdict.is_pass() {
            events.push(ChangeEvent::RebaseResolved);
        } else {
            task.rebase_attempts = 0;
            events.extend(match pipeline::retry_start(pipeline, &position) {
                Some(to) => loop_back(task, pipeline, to, &failed, max_task_rounds),
                None => fail_without_loop(
                    task,
                    &failed,
                    &format!("{REBASE_RESOLVER} did not pass and no loop precedes the merge"),
                ),
            });
        }
        return before.change(task, events);
    }

    match pipeline::step_at(pipeline, &position) {
        Some(Step::Role { name, .. }) if name == role => {}
        other => {
            let here = other.map(pipeline::phase_name).unwrap_or_default();
            events.push(ChangeEvent::Ignored {
                reason: format!("{role} reported, but the task stands at {here} ({position})"),
            });
            return before.change(task, events);
        }
    }
    events.extend(match pipeline::advance(pipeline, &position, verdict.outcome()) {
        Transition::Moved(to) => {
            place(task, pipeline, to);
            vec![ChangeEvent::Advanced]
        }
        Transition::LoopedBack(to) => {
            if verdict.is_pass() {
                place(task, pipeline, to);
                vec![ChangeEvent::Advanced]
            } else {
                loop_back(task, pipeline, to, &failed, max_task_rounds)
            }
        }
        Transition::Complete => vec![complete(task)],
        Transition::Failed { reason } => fail_without_loop(task, &failed, &reason),
    });
    before.change(task, events)
}

/// Moves past a step hyperloop itself finished (a cleared gate, a performed action), after
/// checking the task really stands at such a step.
fn pass_leaf(task: &mut Task, pipeline: &[Step], what: &str, fits: impl Fn(&Step) -> bool) -> TaskChange {
    if task.status != Status::InProgress {
        return ignored(task, format!("{what}, but the task is {}", task.status));
    }
    let before = Before::of(task);
    let mut events = settle(task, pipeline);
    if task.status == Status::Failed
        || events
            .iter()
            .any(|e| matches!(e, ChangeEvent::RestartedPipeline { .. }))
    {
        return before.change(task, events);
    }
    let Some(position) = task.position.clone().map(Position) else {
        events.push(ChangeEvent::Ignored {
            reason: "task has no position".into(),
        });
        return before.change(task, events);
    };
    match pipeline::step_at(pipeline, &position) {
        Some(step) if fits(step) => {}
        other => {
            let here = other.map(pipeline::phase_name).unwrap_or_default();
            events.push(ChangeEvent::Ignored {
                reason: format!("{what}, but the task stands at {here} ({position})"),
            });
            return before.change(task, events);
        }
    }
    events.push(match pipeline::advance(pipeline, &position, Outcome::Pass) {
        Transition::Moved(to) | Transition::LoopedBack(to) => {
            place(task, pipeline, to);
            ChangeEvent::Advanced
        }
        Transition::Complete => complete(task),
        Transition::Failed { reason } => fail(task, reason),
    });
    before.change(task, events)
}

/// The gate the task waits at was cleared (local approval or the forge's label).
pub fn gate_cleared(task: &mut Task, pipeline: &[Step]) -> TaskChange {
    pass_leaf(task, pipeline, "a gate was cleared", |s| {
        matches!(s, Step::Gate { .. })
    })
}

/// The action the task stands at was performed; a merge also ends the run of conflicts.
pub fn action_done(task: &mut Task, pipeline: &[Step]) -> TaskChange {
    let merged = matches!(
        task.position.clone().map(Position).as_ref().and_then(|p| pipeline::step_at(pipeline, p)),
        Some(s) if s.is_merge()
    );
    let change = pass_leaf(task, pipeline, "an action was performed", |s| {
        matches!(s, Step::Action { .. })
    });
    if merged && !change.is_noop() {
        task.rebase_attempts = 0;
    }
    change
}

/// The branch at a merge is not the one that was verified: the task loops back (a round, like a
/// failed verification) so that what merges is verified again.
pub fn unverified_head(task: &mut Task, pipeline: &[Step], detail: &str, max_task_rounds: u32) -> TaskChange {
    let before = Before::of(task);
    let Some(position) = task.position.clone().map(Position) else {
        return ignored(task, "task has no position".to_string());
    };
    let failed = FailedRun {
        role: MERGE_PR,
        verdict: "unverified",
        detail,
        findings: 1,
    };
    task.verified_tip = None;
    let events = match pipeline::retry_start(pipeline, &position) {
        Some(to) => loop_back(task, pipeline, to, &failed, max_task_rounds),
        None => fail_without_loop(task, &failed, "no loop precedes the merge"),
    };
    before.change(task, events)
}

/// The merge at the task's position conflicted. Below `max_rebase_attempts` conflicts in a row the
/// task waits for the rebase-resolver (position unchanged); at the limit the conflict becomes a
/// finding and the task loops back to the loop that produced the work.
pub fn merge_conflict(
    task: &mut Task,
    pipeline: &[Step],
    detail: &str,
    max_rebase_attempts: u32,
    max_task_rounds: u32,
) -> TaskChange {
    if task.status != Status::InProgress {
        return ignored(
            task,
            format!("a merge conflicted, but the task is {}", task.status),
        );
    }
    let before = Before::of(task);
    let mut events = settle(task, pipeline);
    if task.status == Status::Failed
        || events
            .iter()
            .any(|e| matches!(e, ChangeEvent::RestartedPipeline { .. }))
    {
        return before.change(task, events);
    }
    let Some(position) = task.position.clone().map(Position) else {
        events.push(ChangeEvent::Ignored {
            reason: "task has no position".into(),
        });
        return before.change(task, events);
    };
    if !matches!(pipeline::step_at(pipeline, &position), Some(Step::Action { .. })) {
        events.push(ChangeEvent::Ignored {
            reason: format!("a merge conflicted, but the task is not at an action ({position})"),
        });
        return before.change(task, events);
    }
    let attempt = task.rebase_attempts.saturating_add(1);
    if attempt < max_rebase_attempts {
        task.rebase_attempts = attempt;
        task.status = Status::NeedsRebase;
        events.push(ChangeEvent::NeedsRebase {
            attempt,
            max_attempts: max_rebase_attempts,
        });
        return before.change(task, events);
    }
    task.rebase_attempts = 0;
    events.push(ChangeEvent::RebaseGaveUp { attempts: attempt });
    let detail = format!("merge conflict after {attempt} attempts: {}", detail.trim());
    let failed = FailedRun {
        role: MERGE_PR,
        verdict: "conflict",
        detail: &detail,
        findings: 1,
    };
    events.extend(match pipeline::retry_start(pipeline, &position) {
        Some(to) => loop_back(task, pipeline, to, &failed, max_task_rounds),
        None => fail_without_loop(task, &failed, "no loop precedes the merge"),
    });
    before.change(task, events)
}

/// The pull request's checks failed at `merge-pr`: they become the findings and the task loops
/// back to the loop that produced the work, a round spent as for a failed verifier.
pub fn checks_failed(
    task: &mut Task,
    pipeline: &[Step],
    detail: &str,
    findings: u32,
    max_task_rounds: u32,
) -> TaskChange {
    if task.status != Status::InProgress {
        return ignored(task, format!("checks failed, but the task is {}", task.status));
    }
    let before = Before::of(task);
    let mut events = settle(task, pipeline);
    if task.status == Status::Failed
        || events
            .iter()
            .any(|e| matches!(e, ChangeEvent::RestartedPipeline { .. }))
    {
        return before.change(task, events);
    }
    let Some(position) = task.position.clone().map(Position) else {
        events.push(ChangeEvent::Ignored {
            reason: "task has no position".into(),
        });
        return before.change(task, events);
    };
    task.last_verdict = Some("fail".into());
    let failed = FailedRun {
        role: "checks",
        verdict: "fail",
        detail,
        findings,
    };
    events.extend(match pipeline::retry_start(pipeline, &position) {
        Some(to) => loop_back(task, pipeline, to, &failed, max_task_rounds),
        None => fail_without_loop(
            task,
            &failed,
            "the pull request's checks failed and no loop precedes the merge",
        ),
    });
    before.change(task, events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::build::*;
    use proptest::prelude::*;

    const MAX: u32 = 5;

    fn task_at(pipeline: &[Step], path: &[usize]) -> Task {
        let mut t = Task::new("task-001", "T", "specs/a.md");
        t.status = Status::InProgress;
        let p = Position(path.to_vec());
        t.phase = pipeline::step_at(pipeline, &p).map(pipeline::phase_name);
        t.position = Some(path.to_vec());
        t
    }

    fn kinds(c: &TaskChange) -> Vec<&'static str> {
        c.events.iter().filter_map(ChangeEvent::event_name).collect()
    }

    #[test]
    fn start_enters_first_leaf() {
        let p = vec![lp(vec![lp(vec![role("a")]), role("b")])];
        let mut t = Task::new("task-001", "T", "s");
        let c = start(&mut t, &p);
        assert_eq!(c.events, vec![ChangeEvent::Started]);
        assert_eq!(t.status, Status::InProgress);
        assert_eq!(t.position, Some(vec![0, 0, 0]));
        assert_eq!(t.phase.as_deref(), Some("a"));
        assert_eq!(t.round, 0);
        assert!(start(&mut t, &p).is_noop(), "starting twice does nothing");

        let mut t = Task::new("task-002", "T", "s");
        let c = start(&mut t, &[]);
        assert_eq!(t.status, Status::Failed);
        assert_eq!(kinds(&c), vec!["task_failed"]);
    }

    #[test]
    fn verdict_table() {
        let default = default_pipeline();
        let twice = vec![
            lp(vec![role("implementer"), role("verifier")]),
            lp(vec![role("docs"), role("verifier")]),
            action("merge-pr"),
        ];
        let nested = vec![lp(vec![
            role("implementer"),
            lp(vec![role("tester"), role("fixer")]),
            role("verifier"),
        ])];
        let flat = vec![role("implementer"), gate("review")];
        // (name, pipeline, at, round, role, verdict, want status, want position, want round)
        type Case<'a> = (
            &'a str,
            &'a [Step],
            &'a [usize],
            u32,
            &'a str,
            Verdict,
            Status,
            Option<&'a [usize]>,
            u32,
        );
        let cases: Vec<Case> = vec![
            (
                "pass advances",
                &default,
                &[0, 0],
                0,
                "implementer",
                Verdict::Pass,
                Status::InProgress,
                Some(&[0, 1]),
                0,
            ),
            (
                "fail loops back",
                &default,
                &[0, 1],
                1,
                "verifier",
                Verdict::Fail,
                Status::InProgress,
                Some(&[0, 0]),
                2,
            ),
            (
                "timeout loops back",
                &default,
                &[0, 1],
                0,
                "verifier",
                Verdict::Timeout,
                Status::InProgress,
                Some(&[0, 0]),
                1,
            ),
            (
                "error loops back",
                &default,
                &[0, 0],
                0,
                "implementer",
                Verdict::Error,
                Status::InProgress,
                Some(&[0, 0]),
                1,
            ),
            (
                "pass leaves loop to merge",
                &default,
                &[0, 1],
                0,
                "verifier",
                Verdict::Pass,
                Status::InProgress,
                Some(&[1]),
                0,
            ),
            (
                "second verifier fails: its own loop",
                &twice,
                &[1, 1],
                0,
                "verifier",
                Verdict::Fail,
                Status::InProgress,
                Some(&[1, 0]),
                1,
            ),
            (
                "first verifier passes: into second loop",
                &twice,
                &[0, 1],
                0,
                "verifier",
                Verdict::Pass,
                Status::InProgress,
                Some(&[1, 0]),
                0,
            ),
            (
                "inner fail restarts inner loop",
                &nested,
                &[0, 1, 1],
                0,
                "fixer",
                Verdict::Fail,
                Status::InProgress,
                Some(&[0, 1, 0]),
                1,
            ),
            (
                "outer fail restarts outer loop",
                &nested,
                &[0, 2],
                0,
                "verifier",
                Verdict::Fail,
                Status::InProgress,
                Some(&[0, 0]),
                1,
            ),
            (
                "last pass completes",
                &nested,
                &[0, 2],
                3,
                "verifier",
                Verdict::Pass,
                Status::Complete,
                None,
                3,
            ),
            (
                "round limit fails",
                &default,
                &[0, 1],
                MAX - 1,
                "verifier",
                Verdict::Fail,
                Status::Failed,
                Some(&[0, 1]),
                MAX,
            ),
            (
                "no loop fails",
                &flat,
                &[0],
                0,
                "implementer",
                Verdict::Fail,
                Status::Failed,
                Some(&[0]),
                0,
            ),
            (
                "flat pass reaches gate",
                &flat,
                &[0],
                0,
                "implementer",
                Verdict::Pass,
                Status::InProgress,
                Some(&[1]),
                0,
            ),
        ];
        for (name, p, at, round, role_name, verdict, status, position, want_round) in cases {
            let mut t = task_at(p, at);
            t.round = round;
            t.body = "Spec.\n".into();
            let c = apply_verdict(&mut t, p, role_name, verdict, "the detail", 2, MAX);
            assert_eq!(t.status, status, "{name}: {c:?}");
            assert_eq!(t.position.as_deref(), position, "{name}");
            assert_eq!(t.round, want_round, "{name}");
            assert_eq!(t.last_verdict.as_deref(), Some(verdict.as_str()), "{name}");
            assert_eq!((c.from_round, c.to_round), (round, want_round), "{name}");
            let phase = position
                .and_then(|p2| pipeline::step_at(p, &Position(p2.to_vec())).map(pipeline::phase_name));
            assert_eq!(t.phase, phase, "{name}: phase follows position");
            if verdict.is_pass() {
                assert_eq!(t.findings(), "", "{name}");
            } else {
                assert!(t.findings().contains("the detail"), "{name}: {}", t.body);
            }
            match status {
                Status::Failed => {
                    assert_eq!(kinds(&c), vec!["task_failed"], "{name}");
                    assert!(t.failure_reason.is_some(), "{name}");
                }
                Status::Complete => assert_eq!(kinds(&c), vec!["task_completed"], "{name}"),
                _ if verdict.is_pass() => assert_eq!(kinds(&c), vec!["task_advanced"], "{name}"),
                _ => assert_eq!(kinds(&c), vec!["task_looped_back"], "{name}"),
            }
        }
    }

    #[test]
    fn round_limit_reason_wording() {
        let p = default_pipeline();
        let mut t = task_at(&p, &[0, 1]);
        t.round = 2;
        apply_verdict(&mut t, &p, "verifier", Verdict::Fail, "x", 1, 3);
        assert_eq!(t.failure_reason.as_deref(), Some("exceeded max_task_rounds (3)"));
    }

    #[test]
    fn completion_clears_findings() {
        let p = default_pipeline();
        let mut t = task_at(&p, &[0, 1]);
        t.body = "Spec.\n".into();
        apply_verdict(&mut t, &p, "verifier", Verdict::Fail, "broken", 1, MAX);
        assert!(t.findings().contains("broken"));
        apply_verdict(&mut t, &p, "implementer", Verdict::Pass, "", 0, MAX);
        apply_verdict(&mut t, &p, "verifier", Verdict::Pass, "", 0, MAX);
        let c = action_done(&mut t, &p);
        assert_eq!(kinds(&c), vec!["task_completed"]);
        assert_eq!(t.status, Status::Complete);
        assert_eq!((t.phase.clone(), t.position.clone()), (None, None));
        assert_eq!(t.body, "Spec.\n");
    }

    #[test]
    fn stale_or_terminal_results_change_nothing() {
        let p = default_pipeline();
        let mut t = task_at(&p, &[0, 1]);
        let c = apply_verdict(&mut t, &p, "implementer", Verdict::Fail, "", 0, MAX);
        assert!(c.is_noop());
        assert_eq!((t.position.clone(), t.round), (Some(vec![0, 1]), 0));

        for status in [Status::Failed, Status::Complete, Status::NotStarted] {
            let mut t = task_at(&p, &[0, 1]);
            t.status = status;
            let before = t.clone();
            assert!(apply_verdict(&mut t, &p, "verifier", Verdict::Pass, "", 0, MAX).is_noop());
            assert!(gate_cleared(&mut t, &p).is_noop());
            assert!(action_done(&mut t, &p).is_noop());
            assert_eq!(t, before, "{status}");
        }
        // Gates and actions only clear where the task stands at one.
        let mut t = task_at(&p, &[0, 0]);
        assert!(gate_cleared(&mut t, &p).is_noop());
        assert!(action_done(&mut t, &p).is_noop());
    }

    #[test]
    fn repeated_role_resolves_by_position() {
        let p = vec![
            lp(vec![role("implementer"), role("verifier")]),
            gate("review"),
            lp(vec![role("docs"), role("verifier")]),
        ];
        let mut t = task_at(&p, &[2, 1]);
        apply_verdict(&mut t, &p, "verifier", Verdict::Fail, "", 0, MAX);
        assert_eq!(t.position, Some(vec![2, 0]), "not the first verifier's loop");
    }

    #[test]
    fn gate_and_action_resume_from_fresh_position() {
        let p = vec![
            lp(vec![role("implementer")]),
            gate("review"),
            action("mark-pr-ready"),
            action("merge-pr"),
        ];
        let mut t = task_at(&p, &[1]);
        t.gate_cleared = true;
        let c = gate_cleared(&mut t, &p);
        assert_eq!(kinds(&c), vec!["task_advanced"]);
        assert_eq!(t.position, Some(vec![2]));
        assert_eq!(t.phase.as_deref(), Some("mark-pr-ready"));
        assert!(!t.gate_cleared, "approval does not carry to the next step");
        action_done(&mut t, &p);
        assert_eq!(t.phase.as_deref(), Some("merge-pr"));
        t.rebase_attempts = 2;
        action_done(&mut t, &p);
        assert_eq!(t.status, Status::Complete);
        assert_eq!(t.rebase_attempts, 0);
    }

    #[test]
    fn legacy_and_changed_positions() {
        let p = default_pipeline();
        // A 0.9.2 file: phase only.
        let mut t = task_at(&p, &[0, 1]);
        t.position = None;
        let c = resolve(&mut t, &p).expect("relocated");
        assert!(matches!(c.events[..], [ChangeEvent::Relocated { .. }]));
        assert_eq!(t.position, Some(vec![0, 1]));
        assert_eq!(resolve(&mut t, &p), None, "exact positions stay put");

        // A 0.9.2 needs-rebase task waits at merge-pr.
        let mut t = task_at(&p, &[1]);
        t.position = None;
        t.status = Status::NeedsRebase;
        resolve(&mut t, &p);
        assert_eq!(
            (t.position.clone(), t.status),
            (Some(vec![1]), Status::NeedsRebase)
        );

        // The process changed: the stored step is gone and the phase is ambiguous.
        let changed = vec![
            lp(vec![role("implementer"), role("verifier")]),
            lp(vec![role("docs"), role("verifier")]),
        ];
        let mut t = task_at(&p, &[1]);
        t.phase = Some("verifier".into());
        t.round = 3;
        let c = resolve(&mut t, &changed).expect("restarted");
        assert!(
            matches!(&c.events[..], [ChangeEvent::RestartedPipeline { reason }] if reason.contains("2 steps named verifier"))
        );
        assert_eq!((t.position.clone(), t.round), (Some(vec![0, 0]), 3));

        // A position that points at a different step now, phase unknown to the process.
        let mut t = task_at(&p, &[0, 1]);
        t.phase = Some("reviewer".into());
        let c = resolve(&mut t, &p).expect("restarted");
        assert!(matches!(c.events[..], [ChangeEvent::RestartedPipeline { .. }]));
        assert_eq!(t.phase.as_deref(), Some("implementer"));

        // No position and no phase at all.
        let mut t = task_at(&p, &[0, 1]);
        t.position = None;
        t.phase = None;
        assert!(resolve(&mut t, &p).is_some());
        assert_eq!(t.position, Some(vec![0, 0]));

        // A verdict for a step that no longer exists is not applied, but kept as findings.
        let mut t = task_at(&p, &[0, 1]);
        t.position = Some(vec![4, 4]);
        t.phase = Some("auditor".into());
        let c = apply_verdict(&mut t, &p, "auditor", Verdict::Fail, "old news", 0, MAX);
        assert_eq!(t.round, 0);
        assert_eq!(t.position, Some(vec![0, 0]));
        assert!(t.findings().contains("old news"));
        assert!(
            c.events
                .iter()
                .any(|e| matches!(e, ChangeEvent::RestartedPipeline { .. }))
        );
    }

    #[test]
    fn merge_conflicts_and_rebase() {
        let p = default_pipeline();
        let mut t = task_at(&p, &[1]);
        let c = merge_conflict(&mut t, &p, "a.rs", 3, MAX);
        assert_eq!(t.status, Status::NeedsRebase);
        assert_eq!(t.position, Some(vec![1]));
        assert_eq!(t.rebase_attempts, 1);
        assert_eq!(kinds(&c), vec!["rebase_conflict"]);

        // Resolver passes: back at the merge.
        let c = apply_verdict(&mut t, &p, REBASE_RESOLVER, Verdict::Pass, "", 0, MAX);
        assert_eq!(c.events, vec![ChangeEvent::RebaseResolved]);
        assert_eq!(
            (t.status, t.position.clone()),
            (Status::InProgress, Some(vec![1]))
        );

        merge_conflict(&mut t, &p, "a.rs", 3, MAX);
        assert_eq!(t.rebase_attempts, 2);
        // Only the resolver's result counts while the task needs a rebase.
        assert!(apply_verdict(&mut t, &p, "verifier", Verdict::Pass, "", 0, MAX).is_noop());
        // Resolver fails: loop back like a failed verifier.
        let c = apply_verdict(&mut t, &p, REBASE_RESOLVER, Verdict::Fail, "gave up", 1, MAX);
        assert_eq!(kinds(&c), vec!["task_looped_back"]);
        assert_eq!(
            (t.status, t.position.clone(), t.round, t.rebase_attempts),
            (Status::InProgress, Some(vec![0, 0]), 1, 0)
        );

        // At the limit the conflict loops back to the implementation loop.
        let mut t = task_at(&p, &[1]);
        t.rebase_attempts = 2;
        let c = merge_conflict(&mut t, &p, "a.rs", 3, MAX);
        assert_eq!(kinds(&c), vec!["rebase_conflict", "task_looped_back"]);
        assert_eq!(
            (t.status, t.position.clone(), t.round, t.rebase_attempts),
            (Status::InProgress, Some(vec![0, 0]), 1, 0)
        );
        assert!(t.findings().contains("merge conflict after 3 attempts: a.rs"));

        // Without a loop before the merge the task fails.
        let p = vec![role("implementer"), action("merge-pr")];
        let mut t = task_at(&p, &[1]);
        merge_conflict(&mut t, &p, "a.rs", 1, MAX);
        assert_eq!(t.status, Status::Failed);
    }

    proptest! {
        #[test]
        fn random_verdicts_respect_the_machine(
            steps in crate::pipeline::build::arb_pipeline(true),
            max_rounds in 1u32..6,
            verdicts in prop::collection::vec(0usize..4, 0..80),
        ) {
            let mut t = Task::new("task-001", "T", "s");
            start(&mut t, &steps);
            for v in verdicts {
                let before = t.clone();
                let Some(pos) = t.position.clone().map(Position) else {
                    prop_assert_eq!(t.status, Status::Complete);
                    break;
                };
                let here = pipeline::step_at(&steps, &pos);
                prop_assert!(here.is_some(), "position {} must be a leaf", pos);
                let change = match here {
                    Some(Step::Role { name, .. }) => {
                        let name = name.clone();
                        apply_verdict(&mut t, &steps, &name, Verdict::ALL[v], "d", 0, max_rounds)
                    }
                    Some(Step::Gate { .. }) => gate_cleared(&mut t, &steps),
                    _ => action_done(&mut t, &steps),
                };
                prop_assert!(t.round <= max_rounds);
                prop_assert!(t.round >= before.round);
                if before.status == Status::Failed {
                    prop_assert!(change.is_noop());
                    prop_assert_eq!(&t, &before);
                }
                if t.status == Status::InProgress {
                    let p = t.position.clone().map(Position).expect("active tasks have a position");
                    prop_assert!(pipeline::step_at(&steps, &p).is_some());
                    prop_assert_eq!(t.phase.clone(), pipeline::step_at(&steps, &p).map(pipeline::phase_name));
                }
                if t.status == Status::Failed && t.position.is_none() {
                    prop_assert!(false, "failed tasks keep the step they failed at");
                }
            }
        }

        #[test]
        fn all_pass_completes_in_leaf_count_steps(steps in crate::pipeline::build::arb_pipeline(false)) {
            let mut t = Task::new("task-001", "T", "s");
            start(&mut t, &steps);
            let mut n = 0;
            while t.status == Status::InProgress {
                let pos = t.position.clone().map(Position).expect("position");
                let change = match pipeline::step_at(&steps, &pos) {
                    Some(Step::Role { name, .. }) => {
                        let name = name.clone();
                        apply_verdict(&mut t, &steps, &name, Verdict::Pass, "", 0, 3)
                    }
                    Some(Step::Gate { .. }) => gate_cleared(&mut t, &steps),
                    _ => action_done(&mut t, &steps),
                };
                prop_assert!(!change.is_noop());
                n += 1;
                prop_assert!(n <= pipeline::leaf_count(&steps));
            }
            prop_assert_eq!(t.status, Status::Complete);
            prop_assert_eq!(n, pipeline::leaf_count(&steps));
            prop_assert_eq!(t.round, 0);
        }
    }
}
