//! The pure scheduler: given a snapshot of the repository's state, the plan for this cycle.
//! It checks the dependency graph, finds claims to recover, and picks what runs within
//! `max_workers`: the process improver and intake first, then rebase-resolvers, then tasks
//! resuming at a role, then new tasks, ties by id. It reads no file, starts nothing and never
//! looks at a clock; `now` comes in as an argument.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::Config;
use crate::cycle::plan::{Action, Blocked, FailureNote, Parked, Plan, Progress, SpawnReason, WorkerCount};
use crate::cycle::transition::{self, Placement};
use crate::definitions::Process;
use crate::error::{Error, Result};
use crate::pipeline::{self, MERGE_PR, PipelineAction, REBASE_RESOLVER, Step};
use crate::task::{Status, Task};

/// A spec file and the hash of its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecInfo {
    pub path: String,
    pub hash: String,
}

/// Everything `decide` looks at, gathered by the caller.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every task, sorted by id.
    pub tasks: Vec<Task>,
    /// Every spec file (CONTRACT §3).
    pub specs: Vec<SpecInfo>,
    /// Spec path → hash, as taken in by the last successful intake.
    pub intake_record: BTreeMap<String, String>,
    /// Task ids with a worker running in this step.
    pub running: BTreeSet<String>,
    /// Failures the process improver has not seen.
    pub pending_failures: Vec<FailureNote>,
    /// An intake worker runs in this step.
    pub intake_running: bool,
    pub github_mode: bool,
}

/// Rejects unknown dependency ids and dependency cycles, naming the tasks involved.
pub fn check_dependencies(tasks: &[Task]) -> Result<()> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for task in tasks {
        if graph.contains_key(task.id.as_str()) {
            return Err(Error::Dependencies {
                message: format!("task id {} is used by more than one task", task.id),
            });
        }
        graph.insert(&task.id, task.deps.iter().map(String::as_str).collect());
    }
    let unknown: Vec<String> = tasks
        .iter()
        .flat_map(|t| {
            t.deps
                .iter()
                .filter(|d| !graph.contains_key(d.as_str()))
                .map(move |d| format!("{} depends on unknown task {d}", t.id))
        })
        .collect();
    if !unknown.is_empty() {
        return Err(Error::Dependencies {
            message: unknown.join("; "),
        });
    }
    if let Some(cycle) = find_cycle(&graph) {
        return Err(Error::Dependencies {
            message: format!("dependency cycle: {}", cycle.join(" → ")),
        });
    }
    Ok(())
}

/// The first cycle a depth-first search finds (ids and edges visited in order), rotated to start
/// at its smallest id and closed by repeating it.
fn find_cycle<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Option<Vec<&'a str>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    let mut marks: BTreeMap<&str, Mark> = BTreeMap::new();
    for &root in graph.keys() {
        if marks.contains_key(root) {
            continue;
        }
        // An explicit stack of (node, its remaining edges) keeps deep chains off the call stack.
        let mut path: Vec<&str> = vec![root];
        let mut edges: Vec<std::collections::btree_set::Iter<'_, &str>> = Vec::new();
        marks.insert(root, Mark::Open);
        edges.push(graph.get(root)?.iter());
        while let Some(iter) = edges.last_mut() {
            match iter.next() {
                Some(&next) => match marks.get(next) {
                    Some(Mark::Open) => {
                        let start = path.iter().position(|&n| n == next)?;
                        let mut cycle: Vec<&str> = path[start..].to_vec();
                        let min = cycle
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, n)| **n)
                            .map_or(0, |(i, _)| i);
                        cycle.rotate_left(min);
                        cycle.push(cycle[0]);
                        return Some(cycle);
                    }
                    Some(Mark::Done) => {}
                    None => {
                        marks.insert(next, Mark::Open);
                        path.push(next);
                        edges.push(graph.get(next)?.iter());
                    }
                },
                None => {
                    edges.pop();
                    if let Some(done) = path.pop() {
                        marks.insert(done, Mark::Done);
                    }
                }
            }
        }
    }
    None
}

/// Failed tasks reachable through `id`'s dependencies (memoised per task).
fn failed_ancestors<'a>(
    id: &'a str,
    by_id: &BTreeMap<&'a str, &'a Task>,
    failed: &BTreeSet<&'a str>,
    memo: &mut BTreeMap<&'a str, BTreeSet<&'a str>>,
) -> BTreeSet<&'a str> {
    if let Some(known) = memo.get(id) {
        return known.clone();
    }
    let mut found = BTreeSet::new();
    if let Some(task) = by_id.get(id) {
        for dep in &task.deps {
            let Some((&dep, _)) = by_id.get_key_value(dep.as_str()) else {
                continue;
            };
            if failed.contains(dep) {
                found.insert(dep);
            }
            // The graph is acyclic (checked first), so this recursion ends.
            found.extend(failed_ancestors(dep, by_id, failed, memo));
        }
    }
    memo.insert(id, found.clone());
    found
}

/// Specs that intake has not seen in their current form, and recorded specs that are gone.
/// A spec missing from the record but named by a task's `spec_ref` counts as taken in: that is how
/// hyperloop 0.9.2 tracked intake, and taking it in again would duplicate its tasks.
pub fn intake_work(snapshot: &Snapshot) -> (Vec<String>, Vec<String>) {
    let referenced: BTreeSet<&str> = snapshot.tasks.iter().map(|t| t.spec_ref.as_str()).collect();
    let mut specs: Vec<String> = snapshot
        .specs
        .iter()
        .filter(|s| match snapshot.intake_record.get(&s.path) {
            Some(hash) => *hash != s.hash,
            None => !referenced.contains(s.path.as_str()),
        })
        .map(|s| s.path.clone())
        .collect();
    specs.sort();
    specs.dedup();
    let present: BTreeSet<&str> = snapshot.specs.iter().map(|s| s.path.as_str()).collect();
    let removed = snapshot
        .intake_record
        .keys()
        .filter(|p| !present.contains(p.as_str()))
        .cloned()
        .collect();
    (specs, removed)
}

/// Work that wants a worker slot, in priority order within its kind.
#[derive(Default)]
struct Wants {
    rebase: Vec<Action>,
    resume: Vec<Action>,
    start: Vec<Action>,
}

/// The plan for this cycle. Errors only on a broken dependency graph.
pub fn decide(snapshot: &Snapshot, config: &Config, process: &Process, now: u64) -> Result<Plan> {
    check_dependencies(&snapshot.tasks)?;
    let pipeline: &[Step] = &process.pipeline;
    let by_id: BTreeMap<&str, &Task> = snapshot.tasks.iter().map(|t| (t.id.as_str(), t)).collect();

    let mut load_failures = Vec::new();
    let mut recover = Vec::new();
    let mut gates = Vec::new();
    let mut performs = Vec::new();
    let mut parked = Vec::new();
    let mut wants = Wants::default();
    let mut foreign_running = 0usize;
    let mut failed: BTreeSet<&str> = BTreeSet::new();
    let mut not_started: Vec<&Task> = Vec::new();

    for task in &snapshot.tasks {
        match task.status {
            Status::Complete => continue,
            Status::Failed => {
                failed.insert(&task.id);
                continue;
            }
            _ => {}
        }
        if snapshot.running.contains(&task.id) {
            continue;
        }
        if let Some(claim) = &task.claim {
            // In GitHub mode several steps may run at once (different CI jobs); a claim that has
            // not expired belongs to one of them. Locally one step holds the repository, so a
            // claim it does not know is left over from a step that died — except a lease of
            // `plan`, whose `work` runs in another process or on another machine until it
            // expires.
            if (snapshot.github_mode && claim.expires_at > now) || claim.live_lease(now) {
                foreign_running += 1;
            } else {
                recover.push(Action::Recover {
                    task_id: task.id.clone(),
                    claim: claim.clone(),
                });
            }
            continue;
        }
        if task.status == Status::NotStarted {
            not_started.push(task);
            continue;
        }
        if task.rounds_used() >= config.max_task_rounds {
            failed.insert(&task.id);
            load_failures.push(Action::FailTask {
                task_id: task.id.clone(),
                reason: transition::round_limit_reason(config.max_task_rounds),
            });
            continue;
        }
        let Some(located) = transition::locate(task, pipeline) else {
            failed.insert(&task.id);
            load_failures.push(Action::FailTask {
                task_id: task.id.clone(),
                reason: "the process pipeline has no steps".into(),
            });
            continue;
        };
        let restart = match &located.placement {
            Placement::Restarted { reason } => Some(reason.clone()),
            _ => None,
        };
        if task.status == Status::NeedsRebase && restart.is_none() {
            wants.rebase.push(Action::Spawn {
                task_id: task.id.clone(),
                role: REBASE_RESOLVER.to_string(),
                position: located.position,
                round: task.round,
                reason: SpawnReason::Rebase {
                    attempt: task.rebase_attempts,
                },
            });
            continue;
        }
        let gate_cleared = task.gate_cleared && restart.is_none();
        match pipeline::step_at(pipeline, &located.position) {
            Some(Step::Role { name, .. }) => wants.resume.push(Action::Spawn {
                task_id: task.id.clone(),
                role: name.clone(),
                position: located.position,
                round: task.round,
                reason: match restart {
                    Some(reason) => SpawnReason::Restart { reason },
                    None => SpawnReason::Resume,
                },
            }),
            Some(Step::Gate { name }) => {
                if gate_cleared {
                    gates.push(Action::ClearGate {
                        task_id: task.id.clone(),
                        gate: name.clone(),
                    });
                } else {
                    park(&mut parked, &mut gates, task, name, snapshot.github_mode);
                }
            }
            Some(Step::Action {
                action: action @ PipelineAction::MergePr,
            }) => {
                if config.merge.auto_merge || gate_cleared {
                    performs.push(Action::Perform {
                        task_id: task.id.clone(),
                        action: *action,
                        approved: !config.merge.auto_merge,
                    });
                } else {
                    park(&mut parked, &mut gates, task, MERGE_PR, snapshot.github_mode);
                }
            }
            Some(Step::Action {
                action: action @ PipelineAction::MarkPrReady,
            }) => {
                performs.push(Action::Perform {
                    task_id: task.id.clone(),
                    action: *action,
                    approved: false,
                });
            }
            Some(Step::Loop { .. }) | None => {
                // `locate` only returns leaves; a task here would be a bug, not user input.
                failed.insert(&task.id);
                load_failures.push(Action::FailTask {
                    task_id: task.id.clone(),
                    reason: format!("position {} is not a step", located.position),
                });
            }
        }
    }

    let mut blocked = Vec::new();
    let mut memo = BTreeMap::new();
    for task in not_started {
        let because = failed_ancestors(&task.id, &by_id, &failed, &mut memo);
        if !because.is_empty() {
            let cancelled = because
                .iter()
                .filter(|id| by_id.get(*id).is_some_and(|t| t.cancelled))
                .map(|id| (*id).to_string())
                .collect();
            blocked.push(Blocked {
                task_id: task.id.clone(),
                because: because.into_iter().map(str::to_string).collect(),
                cancelled,
            });
            continue;
        }
        let ready = task.deps.iter().all(|d| {
            by_id
                .get(d.as_str())
                .is_some_and(|t| t.status == Status::Complete)
        });
        if !ready {
            continue;
        }
        let Some(position) = pipeline::first_leaf(pipeline) else {
            load_failures.push(Action::FailTask {
                task_id: task.id.clone(),
                reason: "the process pipeline has no steps".into(),
            });
            continue;
        };
        let role = match pipeline::step_at(pipeline, &position) {
            Some(Step::Role { name, .. }) => Some(name.clone()),
            _ => None,
        };
        wants.start.push(Action::Start {
            task_id: task.id.clone(),
            deps: task.deps.clone(),
            position,
            role,
        });
    }

    let (new_specs, removed_specs) = intake_work(snapshot);
    let mut extra = Vec::new();
    if !snapshot.pending_failures.is_empty() {
        extra.push(Action::RunImprover {
            failures: snapshot.pending_failures.clone(),
        });
    }
    if !new_specs.is_empty() && !snapshot.intake_running {
        extra.push(Action::RunIntake {
            specs: new_specs,
            removed: removed_specs,
        });
    }

    let running = snapshot.running.len() + foreign_running + usize::from(snapshot.intake_running);
    let max = config.runtime.max_workers;
    let mut planned = 0usize;
    let mut deferred = 0usize;
    let mut spawns = Vec::new();
    let candidates = extra
        .into_iter()
        .chain(wants.rebase)
        .chain(wants.resume)
        .chain(wants.start);
    for action in candidates {
        if action.takes_worker() {
            if running + planned >= max {
                deferred += 1;
                continue;
            }
            planned += 1;
        }
        spawns.push(action);
    }

    let mut actions = load_failures;
    actions.extend(recover);
    // Improver and intake come first in `spawns`; keep the cycle order of CONTRACT §5:
    // improver, intake, gates, actions, then workers.
    let (agents, tasks): (Vec<_>, Vec<_>) = spawns
        .into_iter()
        .partition(|a| matches!(a, Action::RunImprover { .. } | Action::RunIntake { .. }));
    actions.extend(agents);
    actions.extend(gates);
    actions.extend(performs);
    actions.extend(tasks);

    let progress = progress(snapshot, &actions, &blocked, &parked, &failed, running + deferred);
    Ok(Plan {
        actions,
        blocked,
        parked,
        progress,
        workers: WorkerCount {
            running,
            planned,
            max,
            deferred,
        },
    })
}

/// A task waiting for a person. In GitHub mode the person answers with a label, so the forge is
/// asked every cycle; locally `hyperloop approve` sets `gate_cleared` directly.
fn park(parked: &mut Vec<Parked>, gates: &mut Vec<Action>, task: &Task, step: &str, github: bool) {
    let needs = if github {
        gates.push(Action::PollGate {
            task_id: task.id.clone(),
            gate: step.to_string(),
        });
        "the lgtm label on its PR".to_string()
    } else {
        format!("`hyperloop approve {}`", task.id)
    };
    parked.push(Parked {
        task_id: task.id.clone(),
        step: step.to_string(),
        needs,
    });
}

fn progress(
    snapshot: &Snapshot,
    actions: &[Action],
    blocked: &[Blocked],
    parked: &[Parked],
    failed: &BTreeSet<&str>,
    busy: usize,
) -> Progress {
    // Polling a gate is not progress: it only asks whether a person acted.
    let moving = busy > 0 || actions.iter().any(|a| !matches!(a, Action::PollGate { .. }));
    if snapshot.tasks.is_empty() {
        return if moving { Progress::Working } else { Progress::Idle };
    }
    if moving {
        return Progress::Working;
    }
    if snapshot.tasks.iter().all(|t| t.status == Status::Complete) {
        return Progress::AllComplete;
    }
    if !parked.is_empty() {
        return Progress::Waiting {
            gates: parked.iter().map(|p| p.task_id.clone()).collect(),
        };
    }
    if !failed.is_empty() || !blocked.is_empty() {
        return Progress::Stuck {
            failed: failed.iter().map(|s| s.to_string()).collect(),
            blocked: blocked.iter().map(|b| b.task_id.clone()).collect(),
        };
    }
    // Every remaining task is waiting on another that can move, which the checks above cover;
    // claiming progress here is the safe answer, `run` still stops at `max_cycles`.
    Progress::Working
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::build::*;
    use crate::task::Claim;
    use proptest::prelude::*;

    const NOW: u64 = 1_000_000;

    fn process(pipeline: Vec<Step>) -> Process {
        Process {
            name: "default".into(),
            intake: vec![role("pm")],
            pipeline,
        }
    }

    fn config(max_workers: usize) -> Config {
        let mut c = Config::default();
        c.runtime.max_workers = max_workers;
        c.max_task_rounds = 5;
        c
    }

    fn task(id: &str, status: Status, deps: &[&str]) -> Task {
        let mut t = Task::new(id, id, "specs/a.md");
        t.status = status;
        t.deps = deps.iter().map(|d| d.to_string()).collect();
        t
    }

    fn at(mut t: Task, pipeline: &[Step], path: &[usize]) -> Task {
        let p = pipeline::Position(path.to_vec());
        t.phase = pipeline::step_at(pipeline, &p).map(pipeline::phase_name);
        t.position = Some(path.to_vec());
        t
    }

    fn snap(tasks: Vec<Task>) -> Snapshot {
        let mut s = Snapshot {
            tasks,
            ..Snapshot::default()
        };
        s.tasks.sort_by(|a, b| a.id.cmp(&b.id));
        s
    }

    fn claim(expires_at: u64) -> Claim {
        Claim {
            role: "implementer".into(),
            owner: "ci-host:42".into(),
            pgid: None,
            started_at: NOW - 10,
            expires_at,
            nonce: "n".into(),
            item: None,
            round: None,
            base: None,
        }
    }

    /// A compact picture of the plan: one word per action.
    fn summary(plan: &Plan) -> Vec<String> {
        plan.actions
            .iter()
            .map(|a| match a {
                Action::FailTask { task_id, .. } => format!("fail {task_id}"),
                Action::Recover { task_id, .. } => format!("recover {task_id}"),
                Action::RunImprover { .. } => "improver".into(),
                Action::RunIntake { specs, .. } => format!("intake {}", specs.join(",")),
                Action::ClearGate { task_id, .. } => format!("clear {task_id}"),
                Action::PollGate { task_id, .. } => format!("poll {task_id}"),
                Action::Perform { task_id, action, .. } => format!("{action} {task_id}"),
                Action::Spawn { task_id, role, .. } => format!("spawn {role} {task_id}"),
                Action::Start { task_id, .. } => format!("start {task_id}"),
            })
            .collect()
    }

    fn dep_error(tasks: Vec<Task>) -> String {
        match check_dependencies(&snap(tasks).tasks) {
            Err(Error::Dependencies { message }) => message,
            other => panic!("expected a dependency error, got {other:?}"),
        }
    }

    #[test]
    fn dependency_errors() {
        use Status::NotStarted as N;
        assert_eq!(
            dep_error(vec![
                task("task-001", N, &[]),
                task("task-003", N, &["task-007"]),
                task("task-007", N, &["task-003"]),
            ]),
            "dependency cycle: task-003 → task-007 → task-003"
        );
        // Found from task-002, reported from its smallest member.
        assert_eq!(
            dep_error(vec![
                task("task-002", N, &["task-009"]),
                task("task-005", N, &["task-002"]),
                task("task-009", N, &["task-005"]),
            ]),
            "dependency cycle: task-002 → task-009 → task-005 → task-002"
        );
        assert_eq!(
            dep_error(vec![task("task-004", N, &["task-004"])]),
            "dependency cycle: task-004 → task-004"
        );
        assert_eq!(
            dep_error(vec![
                task("task-001", N, &[]),
                task("task-002", N, &["task-001", "task-999"]),
            ]),
            "task-002 depends on unknown task task-999"
        );
        let e = decide(
            &snap(vec![task("task-002", N, &["task-999"])]),
            &config(2),
            &process(default_pipeline()),
            NOW,
        );
        assert!(matches!(e, Err(ref err) if err.exit_code() == 2), "{e:?}");
        // A diamond is not a cycle.
        assert!(
            check_dependencies(&[
                task("a", N, &[]),
                task("b", N, &["a"]),
                task("c", N, &["a"]),
                task("d", N, &["b", "c"]),
            ])
            .is_ok()
        );
    }

    #[test]
    fn failure_blocks_only_dependents() {
        use Status::*;
        let p = default_pipeline();
        let s = snap(vec![
            task("task-001", Failed, &[]),
            task("task-002", NotStarted, &["task-001"]),
            task("task-003", NotStarted, &["task-002"]),
            task("task-004", NotStarted, &[]),
            task("task-005", Complete, &[]),
            task("task-006", NotStarted, &["task-005"]),
        ]);
        let plan = decide(&s, &config(6), &process(p), NOW).expect("plan");
        assert_eq!(summary(&plan), vec!["start task-004", "start task-006"]);
        assert_eq!(
            plan.blocked,
            vec![
                Blocked {
                    task_id: "task-002".into(),
                    because: vec!["task-001".into()],
                    cancelled: Vec::new(),
                },
                Blocked {
                    task_id: "task-003".into(),
                    because: vec!["task-001".into()],
                    cancelled: Vec::new(),
                },
            ]
        );
        assert_eq!(plan.progress, Progress::Working);
    }

    #[test]
    fn stuck_when_only_failures_remain() {
        use Status::*;
        let s = snap(vec![
            task("task-001", Failed, &[]),
            task("task-002", NotStarted, &["task-001"]),
            task("task-003", Complete, &[]),
        ]);
        let plan = decide(&s, &config(6), &process(default_pipeline()), NOW).expect("plan");
        assert!(plan.actions.is_empty());
        assert_eq!(
            plan.progress,
            Progress::Stuck {
                failed: vec!["task-001".into()],
                blocked: vec!["task-002".into()]
            }
        );
        assert!(plan.progress.is_final());
    }

    #[test]
    fn priority_and_worker_limit() {
        use Status::*;
        let p = default_pipeline();
        let mut rebase = at(task("task-009", NeedsRebase, &[]), &p, &[1]);
        rebase.rebase_attempts = 1;
        let tasks = vec![
            task("task-001", NotStarted, &[]),
            at(task("task-002", InProgress, &[]), &p, &[0, 1]),
            task("task-003", NotStarted, &[]),
            at(task("task-004", InProgress, &[]), &p, &[0, 0]),
            rebase,
            at(task("task-005", InProgress, &[]), &p, &[0, 0]),
        ];
        let order = [
            "spawn rebase-resolver task-009",
            "spawn verifier task-002",
            "spawn implementer task-004",
            "start task-001",
            "start task-003",
        ];
        for max in 1..=6 {
            for running in 0..=2usize {
                let mut s = snap(tasks.clone());
                // task-005 already has a worker in this step.
                s.running.insert("task-005".into());
                if running == 2 {
                    s.intake_running = true;
                }
                let plan = decide(&s, &config(max), &process(p.clone()), NOW).expect("plan");
                let busy = 1 + usize::from(running == 2);
                let free = max.saturating_sub(busy);
                let want: Vec<String> = order.iter().take(free).map(|s| s.to_string()).collect();
                assert_eq!(summary(&plan), want, "max {max}, busy {busy}");
                assert!(plan.workers.running + plan.workers.planned <= max.max(busy));
                assert_eq!(plan.workers.deferred, order.len() - free.min(order.len()));
            }
        }
    }

    #[test]
    fn foreign_claims_and_recovery() {
        use Status::*;
        let p = default_pipeline();
        let mut live = at(task("task-001", InProgress, &[]), &p, &[0, 0]);
        live.claim = Some(claim(NOW + 100));
        let mut expired = at(task("task-002", InProgress, &[]), &p, &[0, 1]);
        expired.claim = Some(claim(NOW));
        let new = task("task-003", NotStarted, &[]);

        let mut s = snap(vec![live, expired, new]);
        s.github_mode = true;
        let plan = decide(&s, &config(2), &process(p.clone()), NOW).expect("plan");
        // The live claim takes one of two slots; the expired one is recovered, not respawned.
        assert_eq!(summary(&plan), vec!["recover task-002", "start task-003"]);
        assert_eq!(plan.workers.running, 1);

        // Locally no other step can be running: every unknown claim is recovered.
        s.github_mode = false;
        let plan = decide(&s, &config(2), &process(p.clone()), NOW).expect("plan");
        assert_eq!(
            summary(&plan),
            vec!["recover task-001", "recover task-002", "start task-003"]
        );

        // A lease of `plan` is a `work` elsewhere, locally too, until it expires.
        for t in &mut s.tasks {
            if let Some(c) = &mut t.claim {
                c.item = Some(format!("{}-implementer-r0-n", t.id));
            }
        }
        let plan = decide(&s, &config(2), &process(p), NOW).expect("plan");
        assert_eq!(summary(&plan), vec!["recover task-002", "start task-003"]);
        assert_eq!(plan.workers.running, 1);
    }

    #[test]
    fn intake_decisions() {
        let spec = |path: &str, hash: &str| SpecInfo {
            path: path.into(),
            hash: hash.into(),
        };
        let mut s = snap(vec![]);
        s.specs = vec![spec("specs/a.md", "1"), spec("specs/b.md", "2")];
        let cfg = config(3);
        let pr = process(default_pipeline());

        let plan = decide(&s, &cfg, &pr, NOW).expect("plan");
        assert_eq!(summary(&plan), vec!["intake specs/a.md,specs/b.md"]);
        assert_eq!(plan.progress, Progress::Working);

        s.intake_record = [("specs/a.md", "1"), ("specs/b.md", "2"), ("specs/gone.md", "3")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let plan = decide(&s, &cfg, &pr, NOW).expect("plan");
        assert!(plan.actions.is_empty(), "unchanged specs: no intake");
        assert_eq!(plan.progress, Progress::Idle);

        s.specs[1].hash = "changed".into();
        let plan = decide(&s, &cfg, &pr, NOW).expect("plan");
        assert_eq!(
            plan.actions,
            vec![Action::RunIntake {
                specs: vec!["specs/b.md".into()],
                removed: vec!["specs/gone.md".into()]
            }]
        );

        s.intake_running = true;
        let plan = decide(&s, &cfg, &pr, NOW).expect("plan");
        assert!(plan.actions.is_empty(), "intake already running");
        assert_eq!(plan.progress, Progress::Working);
        assert_eq!(plan.workers.running, 1);

        // A spec some task came from counts as taken in (0.9.2 kept no record).
        let mut s = snap(vec![task("task-001", Status::Complete, &[])]);
        s.specs = vec![spec("specs/a.md", "1"), spec("specs/new.md", "9")];
        let plan = decide(&s, &cfg, &pr, NOW).expect("plan");
        assert_eq!(summary(&plan), vec!["intake specs/new.md"]);

        // Intake needs a free worker too.
        let mut s2 = s.clone();
        s2.running.insert("x".into());
        let plan = decide(&s2, &config(1), &pr, NOW).expect("plan");
        assert!(plan.actions.is_empty());
        assert_eq!(plan.workers.deferred, 1);

        s.specs.pop();
        let plan = decide(&s, &cfg, &pr, NOW).expect("plan");
        assert_eq!(plan.progress, Progress::AllComplete);
    }

    #[test]
    fn improver_runs_on_pending_failures() {
        let mut s = snap(vec![task("task-001", Status::Complete, &[])]);
        s.pending_failures = vec![FailureNote {
            task_id: "task-001".into(),
            role: "verifier".into(),
            round: 0,
            verdict: "fail".into(),
            detail: "tests".into(),
        }];
        let plan = decide(&s, &config(2), &process(default_pipeline()), NOW).expect("plan");
        assert_eq!(summary(&plan), vec!["improver"]);
        assert_eq!(plan.progress, Progress::Working);
    }

    #[test]
    fn gates_and_merges() {
        use Status::*;
        let p = vec![
            lp(vec![role("implementer")]),
            gate("review"),
            action("mark-pr-ready"),
            action("merge-pr"),
        ];
        let mut cleared = at(task("task-002", InProgress, &[]), &p, &[1]);
        cleared.gate_cleared = true;
        let waiting = at(task("task-001", InProgress, &[]), &p, &[1]);
        let ready = at(task("task-003", InProgress, &[]), &p, &[2]);
        let merge = at(task("task-004", InProgress, &[]), &p, &[3]);
        let mut approved_merge = at(task("task-005", InProgress, &[]), &p, &[3]);
        approved_merge.gate_cleared = true;
        let s = snap(vec![waiting, cleared, ready, merge, approved_merge]);

        let auto = config(2);
        let plan = decide(&s, &auto, &process(p.clone()), NOW).expect("plan");
        assert_eq!(
            summary(&plan),
            vec![
                "clear task-002",
                "mark-pr-ready task-003",
                "merge-pr task-004",
                "merge-pr task-005"
            ]
        );
        assert_eq!(plan.parked.len(), 1);

        let mut manual = config(2);
        manual.merge.auto_merge = false;
        let plan = decide(&s, &manual, &process(p.clone()), NOW).expect("plan");
        assert_eq!(
            summary(&plan),
            vec!["clear task-002", "mark-pr-ready task-003", "merge-pr task-005"]
        );
        let parked: Vec<&str> = plan.parked.iter().map(|p| p.task_id.as_str()).collect();
        assert_eq!(parked, vec!["task-001", "task-004"]);

        let mut gh = s;
        gh.github_mode = true;
        let plan = decide(&gh, &manual, &process(p.clone()), NOW).expect("plan");
        assert_eq!(
            summary(&plan),
            vec![
                "poll task-001",
                "clear task-002",
                "poll task-004",
                "mark-pr-ready task-003",
                "merge-pr task-005"
            ]
        );

        // Only people can move things now: `run` should stop, not spin.
        let only_parked = snap(vec![
            at(task("task-001", InProgress, &[]), &p, &[1]),
            at(task("task-004", InProgress, &[]), &p, &[3]),
            task("task-006", Failed, &[]),
        ]);
        let plan = decide(&only_parked, &manual, &process(p.clone()), NOW).expect("plan");
        assert!(plan.actions.is_empty());
        assert_eq!(
            plan.progress,
            Progress::Waiting {
                gates: vec!["task-001".into(), "task-004".into()]
            }
        );
        let mut gh = only_parked;
        gh.github_mode = true;
        let plan = decide(&gh, &manual, &process(p), NOW).expect("plan");
        assert_eq!(summary(&plan), vec!["poll task-001", "poll task-004"]);
        assert!(matches!(plan.progress, Progress::Waiting { .. }));
    }

    #[test]
    fn load_time_failures_and_restarts() {
        use Status::*;
        let p = default_pipeline();
        let mut spent = at(task("task-001", InProgress, &[]), &p, &[0, 1]);
        spent.round = 5;
        let dependent = task("task-002", NotStarted, &["task-001"]);
        let mut legacy = task("task-003", InProgress, &[]);
        legacy.phase = Some("verifier".into());
        let mut stale = task("task-004", InProgress, &[]);
        stale.position = Some(vec![3, 3]);
        stale.phase = Some("reviewer".into());
        // A task at an action hyperloop does not know cannot be: such a process is refused
        // when it is loaded (`definitions::parse`), and a step holds only typed actions.
        let s = snap(vec![spent, dependent, legacy, stale]);
        let plan = decide(&s, &config(6), &process(p), NOW).expect("plan");
        assert_eq!(
            summary(&plan),
            vec![
                "fail task-001",
                "spawn verifier task-003",
                "spawn implementer task-004"
            ]
        );
        assert!(matches!(
            &plan.actions[2],
            Action::Spawn {
                reason: SpawnReason::Restart { .. },
                ..
            }
        ));
        assert_eq!(
            plan.blocked[0].task_id, "task-002",
            "blocked by a task failing now"
        );
    }

    #[test]
    fn progress_states() {
        use Status::*;
        let pr = process(default_pipeline());
        let plan = decide(&snap(vec![]), &config(1), &pr, NOW).expect("plan");
        assert_eq!(plan.progress, Progress::Idle);
        let done = snap(vec![task("a", Complete, &[]), task("b", Complete, &["a"])]);
        let plan = decide(&done, &config(1), &pr, NOW).expect("plan");
        assert_eq!(plan.progress, Progress::AllComplete);
        let mut running = snap(vec![at(task("a", InProgress, &[]), &pr.pipeline, &[0, 0])]);
        running.running.insert("a".into());
        let plan = decide(&running, &config(1), &pr, NOW).expect("plan");
        assert!(plan.actions.is_empty());
        assert_eq!(plan.progress, Progress::Working);
    }

    #[test]
    fn printable_plan() {
        use Status::*;
        let p = default_pipeline();
        let mut rebase = at(task("task-004", NeedsRebase, &[]), &p, &[1]);
        rebase.rebase_attempts = 1;
        let mut s = snap(vec![
            task("task-001", Complete, &[]),
            task("task-002", NotStarted, &["task-001"]),
            at(task("task-003", InProgress, &[]), &p, &[0, 1]),
            rebase,
            task("task-005", Failed, &[]),
            task("task-006", NotStarted, &["task-005"]),
        ]);
        s.tasks[2].round = 2;
        s.specs = vec![SpecInfo {
            path: "specs/b.md".into(),
            hash: "h".into(),
        }];
        let plan = decide(&s, &config(4), &process(p), NOW).expect("plan");
        assert_eq!(
            plan.to_string(),
            "run intake (pm) for new or changed specs: specs/b.md\n\
             spawn rebase-resolver for task-004 at [1], round 0 (merge conflict, attempt 1)\n\
             spawn verifier for task-003 at [0, 1], round 2 (no worker runs it)\n\
             start task-002 (deps task-001 complete) → implementer\n\
             blocked task-006 (depends on failed task-005)\n\
             workers: 0 running, 4 to start, max 4\n\
             progress: working"
        );
    }

    proptest! {
        #[test]
        fn never_more_workers_than_allowed(
            statuses in prop::collection::vec((0usize..5, any::<bool>(), 0usize..3), 1..12),
            max in 1usize..5,
            intake_running in any::<bool>(),
            new_spec in any::<bool>(),
        ) {
            let p = default_pipeline();
            let mut s = snap(vec![]);
            for (i, (st, in_step, dep)) in statuses.iter().enumerate() {
                let id = format!("task-{i:03}");
                let deps: Vec<String> = if i > 0 && *dep > 0 { vec![format!("task-{:03}", i - 1)] } else { vec![] };
                let mut t = task(&id, Status::ALL[*st], &[]);
                t.deps = deps;
                if matches!(t.status, Status::InProgress | Status::NeedsRebase) {
                    let path: &[usize] = if t.status == Status::NeedsRebase { &[1] } else { &[0, 0] };
                    t = at(t, &p, path);
                    if *in_step {
                        s.running.insert(id.clone());
                    }
                }
                s.tasks.push(t);
            }
            s.intake_running = intake_running;
            if new_spec {
                s.specs.push(SpecInfo { path: "specs/x.md".into(), hash: "1".into() });
            }
            let plan = decide(&s, &config(max), &process(p), NOW).expect("acyclic");
            let already = s.running.len() + usize::from(intake_running);
            let started = plan.actions.iter().filter(|a| a.takes_worker()).count();
            prop_assert_eq!(started, plan.workers.planned);
            prop_assert!(already + started <= max.max(already));
            for a in &plan.actions {
                if let Some(id) = a.task_id() {
                    prop_assert!(!s.running.contains(id), "running task {} got {:?}", id, a);
                }
            }
        }
    }
}
