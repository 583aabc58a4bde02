//! Two hyperloop processes on one repository at once: one step works, the other skips (exit 0,
//! `step_skipped`); no worker is ever started twice, and no update of task state is lost —
//! whether the race is step against step, run against run, or `approve` against a working step.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::faults::{Fixture, TASKS, parallel};
use crate::harness::GATED_PROCESS;

/// `(task, role, round)` of every `worker_spawned` event.
fn spawned(events: &[Value]) -> Vec<(String, String, u64)> {
    events
        .iter()
        .filter(|e| e["event"] == "worker_spawned")
        .map(|e| {
            (
                e["task_id"].as_str().unwrap_or_default().to_string(),
                e["role"].as_str().unwrap_or_default().to_string(),
                e["round"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

fn skipped(events: &[Value]) -> bool {
    events.iter().any(|e| e["event"] == "step_skipped")
}

/// Two `step`s started together; returns whether one of them skipped.
fn two_steps(i: &usize) -> bool {
    let f = Fixture::new("", "");
    let mut a = f.spawn(&["step"], None, &format!("step-a-{i}"));
    let mut b = f.spawn(&["step"], None, &format!("step-b-{i}"));
    let (sa, sb) = (a.wait(Duration::from_secs(120)), b.wait(Duration::from_secs(120)));
    assert_eq!(sa.code(), Some(0), "{}", a.stderr());
    assert_eq!(sb.code(), Some(0), "{}", b.stderr());
    let (ea, eb) = (a.events(), b.events());
    for (evs, r) in [(&ea, &a), (&eb, &b)] {
        if skipped(evs) {
            assert!(
                spawned(evs).is_empty(),
                "a skipped step started workers: {}",
                r.stderr()
            );
            assert!(r.stdout().contains("nothing done"), "{}", r.stdout());
        }
    }
    // No job ran in both: the same task, role and round never spawned twice.
    let (pa, pb) = (spawned(&ea), spawned(&eb));
    let set_a: BTreeSet<_> = pa.iter().cloned().collect();
    let twice: Vec<_> = pb.iter().filter(|j| set_a.contains(*j)).collect();
    assert!(
        twice.is_empty(),
        "spawned in both steps: {twice:?}\n--- a\n{}\n--- b\n{}",
        a.stderr(),
        b.stderr()
    );
    // Nor twice within one step.
    for p in [&pa, &pb] {
        let unique: BTreeSet<_> = p.iter().collect();
        assert_eq!(unique.len(), p.len(), "{p:?}");
    }
    let mut run = f.spawn(&["run"], None, "final-run");
    let st = run.wait(Duration::from_secs(120));
    assert_eq!(st.code(), Some(0), "{}", run.stderr());
    f.assert_all_done(&format!("race {i}"));
    // Every implementer and verifier job ran once per round.
    let runs = f.runs();
    for id in TASKS {
        let expected = if id == "task-003" { 2 } else { 1 };
        assert_eq!(
            runs[&(id.to_string(), "implementer".to_string())],
            expected,
            "{runs:?}"
        );
        assert_eq!(
            runs[&(id.to_string(), "verifier".to_string())],
            expected,
            "{runs:?}"
        );
    }
    skipped(&ea) || skipped(&eb)
}

#[test]
fn two_steps_started_together_never_double_spawn_or_lose_state() {
    let results = parallel((0..20).collect(), 2, two_steps);
    let mut skips = 0;
    let mut failures = Vec::new();
    for (i, r) in results {
        match r {
            Ok(s) => skips += usize::from(s),
            Err(e) => failures.push(format!(
                "race {i}: {}",
                e.downcast_ref::<String>().cloned().unwrap_or_default()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The race is real: in most rounds one step found the other holding the repository.
    assert!(skips >= 10, "only {skips} of 20 races had a loser");
}

#[test]
fn two_runs_started_together_both_finish_and_merge_once() {
    let results = parallel((0..3).collect(), 2, |i: &usize| {
        let f = Fixture::new("", "");
        let mut a = f.spawn(&["run"], None, &format!("run-a-{i}"));
        let mut b = f.spawn(&["run"], None, &format!("run-b-{i}"));
        let (sa, sb) = (a.wait(Duration::from_secs(120)), b.wait(Duration::from_secs(120)));
        assert_eq!(sa.code(), Some(0), "{}", a.stderr());
        assert_eq!(sb.code(), Some(0), "{}", b.stderr());
        let (pa, pb) = (spawned(&a.events()), spawned(&b.events()));
        let set_a: BTreeSet<_> = pa.into_iter().collect();
        assert!(pb.iter().all(|j| !set_a.contains(j)), "{set_a:?} / {pb:?}");
        f.assert_all_done(&format!("runs {i}"));
    });
    for (i, r) in results {
        if let Err(e) = r {
            panic!("runs {i}: {:?}", e.downcast_ref::<String>());
        }
    }
}

#[test]
fn approve_racing_a_working_step_loses_neither_update() {
    // task-003's first implementer run is slow, so the step is still working when task-001
    // reaches its gate and gets approved.
    let rules = r#"  - role: implementer
    task: task-003
    attempt: 0
    actions:
      - shell: "mkdir -p work && echo \"task-003 round 0 slow\" > work/task-003.txt && git add work && git commit -qm slow"
      - sleep: 8
      - verdict: {verdict: pass}
"#;
    let f = Fixture::new(rules, "overlay: .hyperloop/agents\n");
    f.repo.write_process_overlay(GATED_PROCESS);
    f.commit_all("a gate before the merge");

    let mut step = f.spawn(&["step"], None, "step");
    let end = Instant::now() + Duration::from_secs(60);
    while f.task("task-001")["phase"] != "human-review" {
        assert!(Instant::now() < end, "task-001 never reached its gate");
        assert!(
            step.child.try_wait().expect("wait").is_none(),
            "the step ended too early: {}",
            step.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut approve = f.spawn(&["approve", "task-001"], None, "approve");
    let st = approve.wait(Duration::from_secs(120));
    assert_eq!(st.code(), Some(0), "{}", approve.stderr());
    assert!(
        approve.stderr().contains("approve_waiting"),
        "it says why it waits: {}",
        approve.stderr()
    );
    let st = step.wait(Duration::from_secs(120));
    assert_eq!(st.code(), Some(0), "{}", step.stderr());
    // Both updates are there: the approval, and everything the step did for task-003.
    let t1 = f.task("task-001");
    assert_eq!(t1["gate_cleared"], true, "{t1}");
    let t3 = f.task("task-003");
    assert_eq!(t3["phase"], "human-review", "{t3}");
    assert_eq!(t3["round"], 1, "{t3}");

    // Then approve whatever waits until everything is merged.
    for _ in 0..10 {
        let out = f.hyperloop(&["step"]);
        assert!(out.status.success(), "{}", crate::harness::describe(&out));
        let tasks = f.status();
        if tasks.iter().all(|t| t["status"] == "complete") {
            break;
        }
        for t in tasks {
            if t["phase"] == "human-review" && t["gate_cleared"] != true {
                let id = t["id"].as_str().unwrap_or_default();
                let out = f.hyperloop(&["approve", id]);
                assert!(out.status.success(), "{}", crate::harness::describe(&out));
            }
        }
    }
    f.assert_all_done("approve race");
}
