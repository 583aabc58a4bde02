//! The dashboard issue against the fake GitHub: created once (even by two steps racing), found
//! again by its label, rewritten only when what it shows changed, its boxes acted on once and
//! cleared with a note, approvals under the trusted-gate rule, and a cost of at most two calls
//! per step whatever the number of tasks.

use std::process::Output;

use serde_json::Value;

use crate::github_mode::{GhProject, field, pr_of};
use crate::harness::describe;
use crate::local::{events, named};

const LABEL: &str = "hyperloop:dashboard";

fn open_dashboards(g: &GhProject) -> Vec<(u64, String)> {
    g.gh.issues_labelled(LABEL)
        .into_iter()
        .filter(|(_, open, _)| *open)
        .map(|(n, _, b)| (n, b))
        .collect()
}

fn the_dashboard(g: &GhProject) -> (u64, String) {
    let all = open_dashboards(g);
    assert_eq!(all.len(), 1, "exactly one open dashboard: {all:?}");
    all.into_iter().next().expect("one")
}

/// Ticks the box whose marker starts with `marker` (e.g. `hyperloop:approve task-001`), as
/// `login` in the web page.
fn tick(g: &GhProject, marker: &str, login: &str) {
    let (n, body) = the_dashboard(g);
    let needle = format!("- [ ] <!-- {marker}");
    assert!(body.contains(&needle), "no box {needle} in:\n{body}");
    let ticked = body.replacen(&needle, &format!("- [x] <!-- {marker}"), 1);
    g.gh.edit_issue_as(n, &ticked, login);
}

fn ok(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{}", describe(out));
}

fn dashboard_calls(g: &GhProject) -> Vec<String> {
    g.gh.requests()
        .into_iter()
        .filter(|r| {
            let p = r.path.as_str();
            p.ends_with("/issues") || (p.contains("/issues/") && r.method == "PATCH")
        })
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[test]
fn the_dashboard_is_created_once_and_rewritten_only_when_it_changes() {
    let g = GhProject::new("", "", true);
    ok(&g.step());
    let (n, body) = the_dashboard(&g);
    assert!(body.contains("# hyperloop dashboard"), "{body}");
    assert!(
        body.contains("**task-001**") && body.contains("`human-review`"),
        "{body}"
    );
    assert!(body.contains("## Waiting for you"), "{body}");
    assert!(body.contains("<!-- hyperloop:approve task-001 "), "{body}");
    assert!(body.contains("<!-- hyperloop:cancel task-001 -->"), "{body}");
    let pr = pr_of(&g.origin_task("task-001"));
    assert!(body.contains(&format!("[#{pr}](")), "{body}");
    assert!(body.contains("last verdict: pass"), "{body}");
    assert!(body.contains("**Spend**"), "{body}");
    assert_eq!(g.gh.count("POST", "/issues"), 1);

    // Idle steps read it and leave it alone.
    for _ in 0..3 {
        g.gh.clear_requests();
        ok(&g.step());
        assert_eq!(dashboard_calls(&g), vec!["GET /repos/acme/widgets/issues"]);
    }
    assert_eq!(the_dashboard(&g), (n, body));

    // A change of state is shown: one read, one write.
    g.gh.clear_requests();
    g.gh.add_label_to_pr(pr, "lgtm");
    ok(&g.step());
    assert_eq!(field(&g.origin_task("task-001"), "status"), Some("complete"));
    let calls = dashboard_calls(&g);
    assert_eq!(calls.len(), 2, "{calls:?}");
    let (n2, body) = the_dashboard(&g);
    assert_eq!(n2, n, "the same issue, found again by its label");
    assert!(
        body.contains("complete") && !body.contains("## Waiting for you"),
        "{body}"
    );
    assert!(!body.contains("hyperloop:approve"), "{body}");
    assert_eq!(g.gh.count("POST", "/issues"), 0, "never created twice");
}

#[test]
fn an_approve_box_clears_the_gate_once_under_the_trusted_gate_rule() {
    let g = GhProject::new("", "", true);
    ok(&g.step());

    // A triager's tick does not count: the gate holds, the box is cleared, the note says why.
    g.gh.set_role("trina", "triage");
    tick(&g, "hyperloop:approve task-001", "trina");
    let out = g.step();
    ok(&out);
    assert_eq!(field(&g.origin_task("task-001"), "phase"), Some("human-review"));
    let (_, body) = the_dashboard(&g);
    assert!(!body.contains("- [x]"), "cleared: {body}");
    assert!(body.contains("@trina does not have write permission"), "{body}");
    assert_eq!(named(&events(&out), "dashboard_command").len(), 1);

    // The owner's tick does: the gate clears and the task merges, once.
    tick(&g, "hyperloop:approve task-001", "octocat");
    let out = g.step();
    ok(&out);
    let cleared = named(&events(&out), "gate_checked")
        .into_iter()
        .filter(|e| e["cleared"] == Value::Bool(true))
        .count();
    assert_eq!(cleared, 1, "{}", describe(&out));
    assert_eq!(field(&g.origin_task("task-001"), "status"), Some("complete"));
    let (_, body) = the_dashboard(&g);
    assert!(!body.contains("- [x]"), "{body}");
    assert!(
        body.contains("approved at") && body.contains("by @octocat"),
        "{body}"
    );
    assert_eq!(g.gh.count("PUT", "/merge"), 1);
    let out = g.step();
    ok(&out);
    assert!(named(&events(&out), "dashboard_command").is_empty());
    assert_eq!(g.gh.count("PUT", "/merge"), 1, "merged once");
}

#[test]
fn an_approve_box_for_an_older_head_does_not_count() {
    let g = GhProject::new("", "", true);
    ok(&g.step());
    // A person pushes to the branch after the dashboard showed its head; the next step brings
    // the new head in, and the old box approves what nobody looked at.
    g.p.git(&["fetch", "-q", "origin", "worker/task-001"]);
    let tip = g.p.git(&[
        "commit-tree",
        "FETCH_HEAD^{tree}",
        "-p",
        "FETCH_HEAD",
        "-m",
        "late",
    ]);
    g.p.git(&[
        "push",
        "-q",
        "origin",
        &format!("{tip}:refs/heads/worker/task-001"),
    ]);
    tick(&g, "hyperloop:approve task-001", "octocat");
    let out = g.step();
    ok(&out);
    assert_eq!(field(&g.origin_task("task-001"), "phase"), Some("human-review"));
    let (_, body) = the_dashboard(&g);
    assert!(body.contains("head changed since"), "{body}");
    assert_eq!(g.gh.count("PUT", "/merge"), 0);
}

#[test]
fn cancel_and_retry_boxes_are_acted_on_once_and_cleared() {
    let g = GhProject::new("", "", true);
    ok(&g.step());
    tick(&g, "hyperloop:cancel task-001", "octocat");
    let out = g.step();
    ok(&out);
    let t = g.origin_task("task-001");
    assert_eq!(field(&t, "status"), Some("failed"), "{t}");
    assert_eq!(field(&t, "cancelled"), Some("true"), "{t}");
    let (_, body) = the_dashboard(&g);
    assert!(!body.contains("- [x]"), "{body}");
    assert!(body.contains("task-001: cancelled"), "{body}");
    assert!(
        body.contains("## Failed and blocked") && body.contains("**task-001** cancelled"),
        "{body}"
    );
    assert!(body.contains("<!-- hyperloop:retry task-001 -->"), "{body}");
    assert!(!body.contains("<!-- hyperloop:cancel task-001 -->"), "{body}");

    // Another step does nothing more with it.
    let out = g.step();
    ok(&out);
    assert!(named(&events(&out), "dashboard_command").is_empty());

    tick(&g, "hyperloop:retry task-001", "octocat");
    let out = g.step();
    ok(&out);
    assert_eq!(named(&events(&out), "dashboard_command").len(), 1);
    let t = g.origin_task("task-001");
    assert_ne!(field(&t, "status"), Some("failed"), "{t}");
    let (_, body) = the_dashboard(&g);
    assert!(body.contains("retry: done"), "{body}");
    assert!(!body.contains("- [x]"), "{body}");
}

#[test]
fn two_racing_steps_leave_one_dashboard() {
    let g = GhProject::new("", "", true);
    // A task already waiting at its gate, so that the two steps race on the dashboard alone.
    g.p.git(&["branch", "worker/task-001", "main"]);
    g.p.git(&["push", "-q", "origin", "worker/task-001"]);
    let n =
        g.gh.open_pr("worker/task-001", "main", "Task one (task-001)", true);
    g.p.repo.write(
        "specs/tasks/task-001.md",
        &format!(
            "---\nid: task-001\ntitle: Task one\nspec_ref: specs/a.md\nstatus: in-progress\nphase: human-review\nposition: [1]\ndeps: []\nround: 1\nbranch: worker/task-001\npr: https://github.com/acme/widgets/pull/{n}\n---\nImplement it.\n"
        ),
    );
    g.p.commit_all("a task at its gate");
    g.p.git(&["push", "-q", "origin", "main"]);
    // A second checkout of the same repository, for a step that runs at the same time.
    let other = g.p.env.root().join("other");
    g.p.env.git(
        g.p.env.root(),
        &[
            "clone",
            "-q",
            g.p.repo.origin.to_str().expect("utf8"),
            other.to_str().expect("utf8"),
        ],
    );
    let spawn = |path: &std::path::Path| {
        let mut cmd = g.p.env.command(crate::harness::hyperloop_bin());
        cmd.args([
            "--path",
            path.to_str().expect("utf8"),
            "--repo",
            "acme/widgets",
            "step",
        ])
        .env("GITHUB_API_URL", &g.gh.url)
        .env("GITHUB_TOKEN", &g.gh.token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        cmd.spawn().expect("hyperloop runs")
    };
    let a = spawn(&g.p.repo.path);
    let b = spawn(&other);
    let a = a.wait_with_output().expect("step a");
    let b = b.wait_with_output().expect("step b");
    ok(&a);
    ok(&b);
    let all = g.gh.issues_labelled(LABEL);
    assert!(!all.is_empty() && all.len() <= 2, "{all:?}");
    let open = open_dashboards(&g);
    assert_eq!(open.len(), 1, "{all:?}");
    // The oldest stays.
    assert_eq!(open[0].0, all[0].0, "{all:?}");
    // Later steps keep using it.
    ok(&g.step());
    ok(&g.step());
    assert_eq!(open_dashboards(&g).len(), 1);
    assert_eq!(g.gh.issues_labelled(LABEL).len(), all.len(), "no new one");
}

#[test]
fn a_duplicate_left_by_a_race_is_closed_and_the_oldest_kept() {
    let g = GhProject::new("", "", true);
    ok(&g.step());
    let (first, body) = the_dashboard(&g);
    // What two racing creators leave: a second open issue with the label.
    g.gh.create_issue_as("hyperloop dashboard", &body, &[LABEL], "hyperloop-bot");
    assert_eq!(open_dashboards(&g).len(), 2);
    ok(&g.step());
    let open = open_dashboards(&g);
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].0, first);
}

#[test]
fn a_hundred_tasks_cost_at_most_two_dashboard_calls_a_step() {
    let g = GhProject::new("", "", true);
    let main = g.p.git(&["rev-parse", "main"]);
    let mut refs = String::new();
    for i in 1..=100 {
        refs.push_str(&format!("create refs/heads/worker/task-{i:03} {main}\n"));
    }
    let mut cmd = g.p.env.command("git");
    cmd.current_dir(&g.p.repo.path)
        .args(["update-ref", "--stdin"])
        .stdin(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("git runs");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), refs.as_bytes()).expect("refs");
    assert!(child.wait().expect("git").success());
    g.p.git(&["push", "-q", "origin", "refs/heads/worker/*:refs/heads/worker/*"]);
    for i in 1..=100 {
        let id = format!("task-{i:03}");
        let n = g.gh.open_pr(
            &format!("worker/{id}"),
            "main",
            &format!("Task {id} ({id})"),
            true,
        );
        g.p.repo.write(
            &format!("specs/tasks/{id}.md"),
            &format!(
                "---\nid: {id}\ntitle: Task {id}\nspec_ref: specs/a.md\nstatus: in-progress\nphase: human-review\nposition: [1]\ndeps: []\nround: 1\nbranch: worker/{id}\npr: https://github.com/acme/widgets/pull/{n}\ncost_usd: 0.25\n---\nImplement {id}.\n"
            ),
        );
    }
    g.p.commit_all("a hundred tasks at their gate");
    g.p.git(&["push", "-q", "origin", "main"]);
    ok(&g.step());
    let (_, body) = the_dashboard(&g);
    for i in [1, 50, 100] {
        assert!(
            body.contains(&format!("**task-{i:03}**")),
            "task-{i:03} in:\n{body}"
        );
    }
    assert!(body.contains("$25.00"), "spend: {body}");
    assert!(body.chars().count() <= 65_536);

    // A step that changes one task: the other calls as before, plus a read and a write.
    tick(&g, "hyperloop:cancel task-050", "octocat");
    g.gh.clear_requests();
    let out = g.step();
    ok(&out);
    let all = g.gh.requests();
    let dash = dashboard_calls(&g);
    assert_eq!(dash.len(), 2, "{dash:?}");
    let others = all.len() - dash.len();
    assert!(
        others <= 3,
        "{:?}",
        all.iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
    assert_eq!(field(&g.origin_task("task-050"), "cancelled"), Some("true"));
}
