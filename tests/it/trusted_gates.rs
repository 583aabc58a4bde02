//! Trusted gates against the fake GitHub: an `lgtm` clears a gate only when a user with write
//! permission added it after the pull request's head last changed; one that does not count is
//! taken off with a comment saying why, and costs its issue events, the person's permission and
//! the branch's last push — never more, and nothing at all while no `lgtm` is on the PR.

use serde_json::Value;

use crate::github_mode::{GhProject, field, pr_of};
use crate::harness::describe;
use crate::local::{events, named};

fn gated() -> (GhProject, u64) {
    let g = GhProject::new("", "", true);
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let t = g.origin_task("task-001");
    assert_eq!(field(&t, "phase"), Some("human-review"), "{t}");
    let n = pr_of(&t);
    (g, n)
}

fn ignored(out: &std::process::Output) -> Vec<Value> {
    named(&events(out), "gate_approval_ignored")
        .into_iter()
        .cloned()
        .collect()
}

#[test]
fn an_lgtm_from_a_triage_user_is_ignored_and_removed_with_a_comment() {
    let (g, n) = gated();
    g.gh.set_role("trina", "triage");
    g.gh.add_label_as(n, "lgtm", "trina");
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        field(&g.origin_task("task-001"), "phase"),
        Some("human-review"),
        "the gate held: {}",
        describe(&out)
    );
    let ig = ignored(&out);
    assert_eq!(ig.len(), 1, "{}", describe(&out));
    assert_eq!(ig[0]["by"], "trina");
    assert!(!g.gh.pr_labels(n).contains(&"lgtm".to_string()), "label removed");
    let comments = g.gh.comments(n);
    assert_eq!(comments.len(), 1, "{comments:?}");
    assert!(
        comments[0].contains("@trina") && comments[0].contains("write permission"),
        "{comments:?}"
    );
    assert_eq!(g.gh.count("PUT", "/merge"), 0, "nothing merged");

    // A user with no role at all is refused the same way.
    g.gh.add_label_as(n, "lgtm", "stranger");
    let out = g.step();
    assert_eq!(ignored(&out).len(), 1, "{}", describe(&out));
    assert_eq!(field(&g.origin_task("task-001"), "phase"), Some("human-review"));

    // With no label, a waiting step reads no events and no permissions.
    g.gh.clear_requests();
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(g.gh.count("GET", "/events"), 0);
    assert_eq!(g.gh.count("GET", "/permission"), 0);
    assert_eq!(g.gh.count("GET", "/activity"), 0);

    // A maintainer's approval clears the gate and the task merges.
    g.gh.set_role("mia", "maintain");
    g.gh.add_label_as(n, "lgtm", "mia");
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(ignored(&out).is_empty(), "{}", describe(&out));
    let t = g.origin_task("task-001");
    assert_eq!(field(&t, "status"), Some("complete"), "{t}\n{}", describe(&out));
    assert_eq!(g.gh.pr_json(n)["merged"], Value::Bool(true));
    assert_eq!(g.gh.comments(n).len(), 2, "no comment for a valid approval");
}

#[test]
fn an_lgtm_older_than_the_head_is_ignored_and_removed_with_a_comment() {
    let (g, n) = gated();
    // The owner approves, then someone pushes to the branch: the approval saw other commits.
    g.gh.add_label_to_pr(n, "lgtm");
    g.p.git(&["fetch", "-q", "origin", "worker/task-001"]);
    let tip = g.p.git(&[
        "commit-tree",
        "FETCH_HEAD^{tree}",
        "-p",
        "FETCH_HEAD",
        "-m",
        "a late change",
    ]);
    g.p.git(&[
        "push",
        "-q",
        "origin",
        &format!("{tip}:refs/heads/worker/task-001"),
    ]);
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        field(&g.origin_task("task-001"), "phase"),
        Some("human-review"),
        "{}",
        describe(&out)
    );
    let ig = ignored(&out);
    assert_eq!(ig.len(), 1, "{}", describe(&out));
    assert!(
        ig[0]["reason"].as_str().unwrap_or("").contains("changed after"),
        "{ig:?}"
    );
    assert!(!g.gh.pr_labels(n).contains(&"lgtm".to_string()));
    let comments = g.gh.comments(n);
    assert!(
        comments.len() == 1 && comments[0].contains("commits it saw"),
        "{comments:?}"
    );
    assert_eq!(g.gh.count("PUT", "/merge"), 0);

    // Approving the new head counts: the gate clears (and hyperloop, which verified other
    // commits, sends the branch back through verification before anything merges).
    g.gh.add_label_to_pr(n, "lgtm");
    let out = g.step();
    assert!(ignored(&out).is_empty(), "{}", describe(&out));
    let cleared = named(&events(&out), "gate_checked")
        .into_iter()
        .filter(|e| e["cleared"] == Value::Bool(true))
        .count();
    assert_eq!(cleared, 1, "{}", describe(&out));
}
