//! `hyperloop step` in GitHub mode, end to end, against the stateful fake GitHub (real HTTP on
//! 127.0.0.1) backed by the test repository's real bare `origin`: draft PRs, labels, lgtm gates,
//! squash merges through the API, branch deletion, and people merging or closing PRs.

use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::fake_github::{Canned, FakeGitHub};
use crate::harness::{GATED_PROCESS, describe};
use crate::local::{Project, events, named};

pub(crate) struct GhProject {
    pub(crate) p: Project,
    pub(crate) gh: FakeGitHub,
}

impl GhProject {
    pub(crate) fn new(rules: &str, extra_config: &str, gated: bool) -> GhProject {
        let p = Project::new(rules, extra_config);
        if gated {
            p.use_process(GATED_PROCESS);
        }
        p.repo.write("specs/a.md", "# A\n\nBuild A.\n");
        p.commit_all("spec and config");
        p.git(&["push", "-q", "origin", "main"]);
        let gh = FakeGitHub::start(&p.repo.origin, "acme", "widgets");
        GhProject { p, gh }
    }

    pub(crate) fn step(&self) -> Output {
        self.step_with(&[("GITHUB_TOKEN", &self.gh.token)], true)
    }

    /// A step with these credentials, against the fake's API, with or without `--repo`.
    pub(crate) fn step_with(&self, vars: &[(&str, &str)], repo_flag: bool) -> Output {
        let mut cmd = self.p.env.command(crate::harness::hyperloop_bin());
        cmd.args(["--path", self.p.repo.path_str()]);
        if repo_flag {
            cmd.args(["--repo", "acme/widgets"]);
        }
        cmd.arg("step");
        cmd.env("GITHUB_API_URL", &self.gh.url);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.output().expect("hyperloop runs")
    }

    pub(crate) fn origin_git(&self, args: &[&str]) -> String {
        self.p.env.git(&self.p.repo.origin, args)
    }

    /// The task as committed on origin's main.
    pub(crate) fn origin_task(&self, id: &str) -> String {
        self.origin_git(&["show", &format!("main:specs/tasks/{id}.md")])
    }
}

/// For tests about something else than CI: merge in the step that verifies, as without
/// `merge.checks` (a pull request opened in a step has no checks reported in that step).
pub(crate) const NO_CI: &str = "merge:\n  checks: none\n";

pub(crate) fn field<'a>(task_file: &'a str, key: &str) -> Option<&'a str> {
    task_file
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
}

#[test]
fn full_lifecycle_draft_pr_lgtm_gate_squash_merge() {
    let g = GhProject::new("", "", true);
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    // Intake, implementation and verification happened; the task waits at the gate with a PR.
    let t = g.origin_task("task-001");
    assert_eq!(field(&t, "status"), Some("in-progress"), "{t}");
    assert_eq!(field(&t, "phase"), Some("human-review"), "{t}");
    let pr_url = field(&t, "pr").expect("pr recorded").to_string();
    let number: u64 = pr_url
        .rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("pr number");
    assert!(g.gh.pr_is_draft(number), "a draft PR");
    let labels = g.gh.pr_labels(number);
    assert!(labels.contains(&"task:task-001".to_string()), "{labels:?}");
    assert!(labels.contains(&"spec:a".to_string()), "{labels:?}");
    // The branch was pushed to origin before its PR existed.
    assert!(!g.origin_git(&["branch", "--list", "worker/task-001"]).is_empty());
    let body = g.gh.pr_json(number)["body"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(body.contains("task-001") && body.contains("verifier"), "{body}");

    // Without the label, another step waits and spends no more than the listing on polling.
    g.gh.clear_requests();
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(field(&g.origin_task("task-001"), "phase"), Some("human-review"));
    let calls = g.gh.requests().len();
    assert!(
        calls <= 3,
        "an idle gated step costs at most 3 API calls, made {calls}"
    );

    // A person approves: the gate clears, the PR is readied and squash-merged, the branch goes.
    g.gh.add_label_to_pr(number, "lgtm");
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    assert_eq!(named(&evs, "merge_attempted").len(), 1, "{}", describe(&out));
    let t = g.origin_task("task-001");
    assert_eq!(field(&t, "status"), Some("complete"), "{t}");
    let pr = g.gh.pr_json(number);
    assert_eq!(pr["merged"], Value::Bool(true), "{pr}");
    let files = g.origin_git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(files.contains("impl/task-001.md"), "{files}");
    let log = g.origin_git(&["log", "--format=%B", "-n", "20", "main"]);
    assert!(
        log.contains("Task-Ref: task-001") && log.contains("Spec-Ref: specs/a.md"),
        "{log}"
    );
    assert!(
        g.origin_git(&["branch", "--list", "worker/task-001"]).is_empty(),
        "branch deleted"
    );
    assert!(
        !g.gh.pr_labels(number).contains(&"lgtm".to_string()),
        "the approval was consumed"
    );
    // The local checkout follows origin.
    assert_eq!(
        g.p.git(&["rev-parse", "main"]),
        g.origin_git(&["rev-parse", "main"])
    );
}

#[test]
fn a_person_merging_or_closing_the_pr_is_noticed() {
    let g = GhProject::new("", "", true);
    // Tasks written by hand: a spec named by a task counts as taken in, so no intake runs.
    g.p.write_task("task-001", "specs/a.md", &[]);
    g.p.write_task("task-002", "specs/a.md", &[]);
    g.p.commit_all("two tasks");
    g.p.git(&["push", "-q", "origin", "main"]);
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let n1: u64 = field(&g.origin_task("task-001"), "pr")
        .and_then(|u| u.rsplit('/').next()?.parse().ok())
        .expect("pr 1");
    let n2: u64 = field(&g.origin_task("task-002"), "pr")
        .and_then(|u| u.rsplit('/').next()?.parse().ok())
        .expect("pr 2");
    g.gh.mark_ready_as_person(n1);
    g.gh.merge_pr_as_person(n1);
    g.gh.close_pr(n2);
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let t1 = g.origin_task("task-001");
    assert_eq!(field(&t1, "status"), Some("complete"), "{t1}");
    let t2 = g.origin_task("task-002");
    assert_eq!(field(&t2, "status"), Some("failed"), "{t2}");
    assert!(t2.contains("closed without merging"), "{t2}");
    // Nothing was merged twice.
    assert_eq!(g.gh.count("PUT", "/merge"), 0);
}

#[test]
fn state_pushes_are_compare_and_swap() {
    // While the implementer works, a person pushes to main on origin: hyperloop's next state
    // push is rejected, and it must re-read and replay, never force.
    let rules = r#"
  - role: implementer
    actions:
      - shell: "set -e; d=$(mktemp -d); git clone -q \"$(git remote get-url origin)\" \"$d/c\"; cd \"$d/c\"; echo person > NOTES.md; git add NOTES.md; git -c user.name=P -c user.email=p@example.com commit -qm 'a person pushes'; git push -q origin HEAD:main"
      - implement_task: true
      - verdict: {verdict: pass}
"#;
    let g = GhProject::new(rules, NO_CI, false);
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    assert!(
        !named(&evs, "push_rejected").is_empty(),
        "the race happened: {}",
        describe(&out)
    );
    // The person's commit survives under hyperloop's, and the task still completed.
    assert_eq!(g.origin_git(&["show", "main:NOTES.md"]), "person");
    assert_eq!(field(&g.origin_task("task-001"), "status"), Some("complete"));
    let log = g.origin_git(&["log", "--format=%s", "main"]);
    assert!(log.contains("a person pushes"), "{log}");
    assert_eq!(log.matches("(task-001)").count(), 1, "merged once: {log}");
}

#[test]
fn the_token_never_reaches_logs_files_or_agents() {
    let rules = r#"
  - role: implementer
    actions:
      - env_dump: "${HOME}/../agent-env.txt"
      - implement_task: true
      - verdict: {verdict: pass}
"#;
    let g = GhProject::new(rules, NO_CI, false);
    let canary = "ghp_canaryTOKEN0123456789abcdefghijklmnopq";
    g.gh.allow_token(canary);
    let mut cmd = g.p.env.command(crate::harness::hyperloop_bin());
    cmd.args([
        "--path",
        g.p.repo.path_str(),
        "--repo",
        "acme/widgets",
        "step",
        "--json",
    ]);
    cmd.env("GITHUB_API_URL", &g.gh.url);
    cmd.env("GITHUB_TOKEN", canary);
    let out = cmd.output().expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(canary), "token in output");
    let agent_env = std::fs::read_to_string(g.p.env.root().join("agent-env.txt")).expect("env dumped");
    assert!(
        !agent_env.contains(canary) && !agent_env.contains("GITHUB_TOKEN"),
        "{agent_env}"
    );
    // Nothing on disk in the repository or its git directory holds it either.
    let grep = std::process::Command::new("grep")
        .args(["-rl", canary, g.p.repo.path_str()])
        .output()
        .expect("grep runs");
    assert!(
        grep.stdout.is_empty(),
        "token written to {}",
        String::from_utf8_lossy(&grep.stdout)
    );
    // Logs of the worker too.
    assert_eq!(field(&g.origin_task("task-001"), "status"), Some("complete"));
}

#[test]
fn a_fresh_clone_merges_a_task_branch_that_exists_only_on_origin() {
    // Each CI job starts from a new clone: the task branch that an earlier job pushed is only
    // a remote-tracking branch there, and its work must still be merged, not skipped.
    let g = GhProject::new("", "", true);
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let number: u64 = field(&g.origin_task("task-001"), "pr")
        .and_then(|u| u.rsplit('/').next()?.parse().ok())
        .expect("pr");
    g.gh.add_label_to_pr(number, "lgtm");

    let clone = g.p.env.root().join("fresh");
    g.p.env.git(
        g.p.env.root(),
        &[
            "clone",
            "-q",
            g.p.repo.origin.to_str().expect("utf8"),
            clone.to_str().expect("utf8"),
        ],
    );
    assert!(
        g.p.env
            .git(&clone, &["branch", "--list", "worker/task-001"])
            .is_empty()
    );
    let mut cmd = g.p.env.command(crate::harness::hyperloop_bin());
    cmd.args([
        "--path",
        clone.to_str().expect("utf8"),
        "--repo",
        "acme/widgets",
        "step",
    ]);
    cmd.env("GITHUB_API_URL", &g.gh.url);
    cmd.env("GITHUB_TOKEN", &g.gh.token);
    let out = cmd.output().expect("hyperloop runs");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    assert_eq!(
        g.gh.pr_json(number)["merged"],
        Value::Bool(true),
        "{}",
        describe(&out)
    );
    assert_eq!(field(&g.origin_task("task-001"), "status"), Some("complete"));
    let files = g.origin_git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(files.contains("impl/task-001.md"), "{files}");
    assert!(
        g.origin_git(&["branch", "--list", "worker/task-001"]).is_empty(),
        "branch deleted after the merge"
    );
}

#[test]
fn a_step_in_a_fresh_clone_continues_from_the_agents_earlier_commits() {
    // The implementer outlasts the step's time budget, so the verifier runs in the next step —
    // in a fresh clone, as every CI job is — and must see the implementer's work.
    let rules = r#"
  - role: implementer
    actions:
      - sleep: 1.5
      - implement_task: true
      - verdict: {verdict: pass}
  - role: verifier
    actions:
      - shell: "test -f impl/task-001.md"
      - verdict: {verdict: pass, detail: "implementation present"}
"#;
    let g = GhProject::new(rules, "", false);
    g.p.write_task("task-001", "specs/a.md", &[]);
    g.p.commit_all("task");
    g.p.git(&["push", "-q", "origin", "main"]);
    let step = |dir: &std::path::Path, extra: &[&str]| {
        let mut cmd = g.p.env.command(crate::harness::hyperloop_bin());
        cmd.args([
            "--path",
            dir.to_str().expect("utf8"),
            "--repo",
            "acme/widgets",
            "step",
        ]);
        cmd.args(extra);
        cmd.env("GITHUB_API_URL", &g.gh.url);
        cmd.env("GITHUB_TOKEN", &g.gh.token);
        cmd.output().expect("hyperloop runs")
    };
    let out = step(&g.p.repo.path, &["--max-duration", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        field(&g.origin_task("task-001"), "phase"),
        Some("verifier"),
        "{}",
        describe(&out)
    );

    let fresh = g.p.env.root().join("fresh-clone");
    let origin = g.p.repo.origin.to_str().expect("utf8").to_string();
    g.p.env.git(
        g.p.env.root(),
        &["clone", "-q", &origin, fresh.to_str().expect("utf8")],
    );
    let out = step(&fresh, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let t = g.origin_task("task-001");
    assert_eq!(field(&t, "status"), Some("complete"), "{t}\n{}", describe(&out));
    assert!(
        g.origin_git(&["ls-tree", "-r", "--name-only", "main"])
            .contains("impl/task-001.md")
    );
}

pub(crate) fn pr_of(task_file: &str) -> u64 {
    field(task_file, "pr")
        .and_then(|u| u.rsplit('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no pr in {task_file}"))
}

#[test]
fn a_separate_state_branch_on_github() {
    let g = GhProject::new(
        "",
        &format!("target:\n  state_branch: hyperloop-state\n{NO_CI}"),
        false,
    );
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(named(&events(&out), "state_branch_created").len(), 1);

    // State on origin's state branch, created from main; code on origin's main, merged once
    // through a pull request against main.
    let t = g.origin_git(&["show", "hyperloop-state:specs/tasks/task-001.md"]);
    assert_eq!(field(&t, "status"), Some("complete"), "{t}");
    let pr = g.gh.pr_json(pr_of(&t));
    assert_eq!(pr["merged"], Value::Bool(true), "{pr}");
    assert_eq!(pr["base"]["ref"], "main", "{pr}");
    let main_files = g.origin_git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(main_files.contains("impl/task-001.md"), "{main_files}");
    assert!(
        !main_files.contains("specs/tasks/"),
        "state leaked to main: {main_files}"
    );
    let main_log = g.origin_git(&["log", "--format=%s", "main"]);
    assert_eq!(main_log.matches("(task-001)").count(), 1, "{main_log}");
    assert!(!main_log.contains("hyperloop:"), "{main_log}");
    // The state branch holds main's merge too.
    g.origin_git(&["merge-base", "--is-ancestor", "main", "hyperloop-state"]);
    // The local main follows origin's.
    assert_eq!(
        g.p.git(&["rev-parse", "main"]),
        g.origin_git(&["rev-parse", "main"])
    );
}

#[test]
fn a_rate_limit_ends_the_step_cleanly_and_no_step_asks_again_before_the_reset() {
    let g = GhProject::new("", NO_CI, false);
    // A short reset, so that the test can wait for it; a refused write is never retried in the
    // step that met the limit, however short the wait.
    // Long enough that a step slowed down by a busy machine still ends before it.
    let reset = chrono::Utc::now() + chrono::TimeDelta::seconds(20);
    g.gh.fail_next("PUT", "/merge", 1, Canned::primary_rate_limit(reset));
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    let limited = named(&evs, "rate_limited");
    assert_eq!(limited.len(), 1, "{}", describe(&out));
    let at = limited[0]["retry_at"].as_str().expect("retry_at").to_string();
    let retry_at = chrono::DateTime::parse_from_rfc3339(&at).expect("RFC 3339");
    assert!(retry_at.timestamp() > reset.timestamp(), "{at} vs {reset}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rate limit"),
        "{}",
        describe(&out)
    );
    assert_eq!(g.gh.count("PUT", "/merge"), 1, "not retried in the step");
    // What happened before the limit is on origin: the work is verified and waits to merge.
    let t = g.origin_task("task-001");
    assert_eq!(field(&t, "status"), Some("in-progress"), "{t}");
    assert_eq!(field(&t, "phase"), Some("merge-pr"), "{t}");
    assert!(
        !g.origin_git(&["log", "--format=%s", "main"])
            .contains("(task-001)")
    );

    // A step before the reset (a new process: it knows from the state branch) asks nothing.
    g.gh.clear_requests();
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        named(&events(&out), "rate_limited").len(),
        1,
        "{}",
        describe(&out)
    );
    assert!(g.gh.requests().is_empty(), "{:?}", g.gh.requests());

    while chrono::Utc::now().timestamp() <= retry_at.timestamp() {
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(named(&events(&out), "rate_limited").is_empty());
    assert_eq!(field(&g.origin_task("task-001"), "status"), Some("complete"));
    let log = g.origin_git(&["log", "--format=%s", "main"]);
    assert_eq!(log.matches("(task-001)").count(), 1, "{log}");
}

#[test]
fn permission_errors_fail_the_step_and_name_what_is_missing() {
    let g = GhProject::new("", "", true);
    // The first step has no pull request to read yet; the second lists the one it opened.
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    g.gh.fail_next("GET", "/pulls", 1, Canned::status(403));
    let out = g.step();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pull-requests: read"), "{stderr}");

    g.gh.fail_next("GET", "/pulls", 1, Canned::status(401));
    let out = g.step();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hint:") && stderr.contains("GITHUB_TOKEN"),
        "{stderr}"
    );
    assert!(!stderr.contains(&g.gh.token), "{stderr}");
}

#[test]
fn an_idle_step_over_a_hundred_gated_tasks_costs_one_listing() {
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
                "---\nid: {id}\ntitle: Task {id}\nspec_ref: specs/a.md\nstatus: in-progress\nphase: human-review\nposition: [1]\ndeps: []\nround: 1\nbranch: worker/{id}\npr: https://github.com/acme/widgets/pull/{n}\n---\nImplement {id}.\n"
            ),
        );
    }
    g.p.commit_all("a hundred tasks at their gate");
    g.p.git(&["push", "-q", "origin", "main"]);
    // The first step creates the dashboard issue (a write, which the pace records).
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let before = g.origin_git(&["rev-parse", "main"]);

    g.gh.clear_requests();
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // The dashboard issue's own calls (at most 3 in the step that creates it) are counted in
    // the dashboard tests.
    let (dashboard, calls): (Vec<_>, Vec<_>) =
        g.gh.requests()
            .into_iter()
            .partition(|r| r.path.ends_with("/issues"));
    assert!(
        dashboard.len() <= 1,
        "an unchanged dashboard is only read: {dashboard:?}"
    );
    assert!(
        calls.len() <= 3,
        "an idle step over 100 gated tasks made {} API calls: {:?}",
        calls.len(),
        calls
            .iter()
            .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
            .collect::<Vec<_>>()
    );
    assert_eq!(g.origin_git(&["rev-parse", "main"]), before, "nothing to commit");
    let evs = events(&out);
    let cycle = named(&evs, "cycle_completed");
    assert_eq!(cycle[0]["progress"], "waiting", "{}", describe(&out));

    // One approval among them is found by the same listing.
    g.gh.add_label_to_pr(37, "lgtm");
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let cleared: Vec<_> = named(&events(&out), "gate_checked")
        .into_iter()
        .filter(|e| e["cleared"] == Value::Bool(true))
        .map(|e| e["task_id"].clone())
        .collect();
    assert_eq!(cleared, vec![Value::from("task-037")], "{}", describe(&out));
    assert_ne!(field(&g.origin_task("task-037"), "phase"), Some("human-review"));
    assert_eq!(field(&g.origin_task("task-036"), "phase"), Some("human-review"));
}

#[test]
fn a_github_app_opens_the_pull_requests() {
    let g = GhProject::new("", "", true);
    let keys = crate::github::rsa_keys(&g.p.env);
    g.gh.enable_app(4242, 77, &keys.public_pem, Duration::from_secs(3600));
    let out = g.step_with(
        &[
            ("HYPERLOOP_APP_ID", "4242"),
            ("HYPERLOOP_APP_PRIVATE_KEY", keys.private_pem.as_str()),
        ],
        true,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let minted = g.gh.issued_tokens();
    assert!(!minted.is_empty(), "an installation token was minted");
    let creates: Vec<_> =
        g.gh.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/pulls"))
            .collect();
    assert_eq!(creates.len(), 1, "{creates:?}");
    let auth = creates[0].authorization.clone().unwrap_or_default();
    assert!(minted.iter().any(|t| auth == format!("Bearer {t}")), "{auth}");
    // Git pushes went through too: the branch and the state are on origin.
    assert!(!g.origin_git(&["branch", "--list", "worker/task-001"]).is_empty());
    let t = g.origin_task("task-001");
    assert_eq!(field(&t, "phase"), Some("human-review"), "{t}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        minted.iter().all(|t| !all.contains(t.as_str())),
        "token in output"
    );
    assert!(!all.contains("PRIVATE KEY"), "key in output");
}

#[test]
fn a_merge_refused_as_not_mergeable_updates_the_branch_and_merges_once_later() {
    let g = GhProject::new("", "", true);
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let number = pr_of(&g.origin_task("task-001"));
    g.gh.add_label_to_pr(number, "lgtm");
    g.gh.fail_next(
        "PUT",
        "/merge",
        1,
        Canned::json(405, json!({ "message": "Pull Request is not mergeable" })),
    );
    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(g.gh.count("PUT", "/update-branch"), 1, "{}", describe(&out));
    let t = g.origin_task("task-001");
    assert_eq!(field(&t, "status"), Some("in-progress"), "{t}");
    assert!(
        !g.origin_git(&["log", "--format=%s", "main"])
            .contains("(task-001)")
    );

    let out = g.step();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(field(&g.origin_task("task-001"), "status"), Some("complete"));
    assert_eq!(g.gh.pr_json(number)["merged"], Value::Bool(true));
    let log = g.origin_git(&["log", "--format=%s", "main"]);
    assert_eq!(log.matches("(task-001)").count(), 1, "merged once: {log}");
    assert_eq!(g.gh.count("PUT", "/merge"), 2, "one refusal, one merge");
}

#[test]
fn the_repository_is_taken_from_origin_only_with_a_token() {
    let g = GhProject::new("", "", true);
    // origin names a GitHub Enterprise repository; git reaches it through the local bare copy.
    let url = "https://github.example.test/acme/widgets.git";
    let bare = g.p.repo.origin.display().to_string();
    g.p.git(&["remote", "set-url", "origin", url]);
    g.p.git(&["config", &format!("url.{bare}.insteadOf"), url]);

    let out = g.step_with(&[("GITHUB_TOKEN", &g.gh.token)], false);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    assert_eq!(named(&evs, "orchestrator_started")[0]["mode"], "github");
    assert_eq!(g.gh.pr_count(), 1, "{}", describe(&out));

    // Without a credential the same repository is a local run that asks GitHub nothing.
    g.gh.clear_requests();
    let out = g.step_with(&[], false);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(named(&events(&out), "orchestrator_started")[0]["mode"], "local");
    assert!(g.gh.requests().is_empty());
}

/// What a GitHub push refusal looks like, reproduced by origin's pre-receive hook for one of
/// GitHub's rules: a workflow file pushed with the job token, a secret caught by push protection,
/// a file over the size limit (a small limit here).
const REFUSING_HOOK: &str = r#"#!/bin/sh
while read old new ref; do
  case "$ref" in refs/heads/worker/*) ;; *) continue ;; esac
  files=$(git ls-tree -r --name-only "$new")
  if echo "$files" | grep -q '^\.github/workflows/'; then
    echo "refusing to allow a GitHub App to create or update workflow \`.github/workflows/ci.yml\` without \`workflows\` permission" >&2
    exit 1
  fi
  if git grep -q 'ghp_[A-Za-z0-9]\{20\}' "$new" -- . 2>/dev/null; then
    echo "error: GH013: Repository rule violations found for $ref." >&2
    echo "- GITHUB PUSH PROTECTION" >&2
    echo "  Push cannot contain secrets" >&2
    exit 1
  fi
  big=$(git ls-tree -r -l "$new" | awk '$4 > 2000 {print $5}' | head -n 1)
  if [ -n "$big" ]; then
    echo "error: GH001: Large files detected. You may want to try Git Large File Storage - https://git-lfs.github.com." >&2
    echo "error: File $big is larger than the limit" >&2
    exit 1
  fi
done
exit 0
"#;

/// Task-001's implementer adds something GitHub refuses in its first round and drops it in the
/// next; task-002 is ordinary. The refusal stops task-001 only: every step exits 0, task-002
/// merges, task-001 loops back with GitHub's reason in its implementer's prompt, and completes.
fn a_refused_push_stops_one_task(offence: &str, path: &str, reason: &str) {
    let rules = format!(
        r#"
  - role: implementer
    task: task-001
    round: 0
    actions:
      - shell: {offence}
      - implement_task: true
      - verdict: {{verdict: pass}}
  - role: implementer
    task: task-001
    actions:
      - prompt_dump: "${{HOME}}/../task-001-prompt.md"
      - shell: "git rm -q -- '{path}' && git commit -qm 'drop what GitHub refuses'"
      - implement_task: true
      - verdict: {{verdict: pass}}
"#,
        offence = serde_json::to_string(offence).expect("json")
    );
    let g = GhProject::new(&rules, "", false);
    let hook = g.p.repo.origin.join("hooks/pre-receive");
    std::fs::write(&hook, REFUSING_HOOK).expect("hook");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    g.p.write_task("task-001", "specs/a.md", &[]);
    g.p.write_task("task-002", "specs/a.md", &[]);
    g.p.commit_all("two tasks");
    g.p.git(&["push", "-q", "origin", "main"]);

    let mut refused = Vec::new();
    for _ in 0..6 {
        let out = g.step();
        assert_eq!(
            out.status.code(),
            Some(0),
            "every step exits 0: {}",
            describe(&out)
        );
        refused.extend(named(&events(&out), "push_refused").into_iter().cloned());
        if field(&g.origin_task("task-001"), "status") == Some("complete")
            && field(&g.origin_task("task-002"), "status") == Some("complete")
        {
            break;
        }
    }
    assert_eq!(field(&g.origin_task("task-002"), "status"), Some("complete"));
    let t1 = g.origin_task("task-001");
    assert_eq!(field(&t1, "status"), Some("complete"), "{t1}");
    assert_eq!(
        refused.len(),
        1,
        "refused once, never pushed again unchanged: {refused:?}"
    );
    assert_eq!(refused[0]["task_id"], "task-001");
    let said = refused[0]["reason"].as_str().unwrap_or_default();
    assert!(said.contains(reason), "{said}");
    let prompt =
        std::fs::read_to_string(g.p.env.root().join("task-001-prompt.md")).expect("prompt of round 1");
    assert!(prompt.contains(reason), "the implementer was told why: {prompt}");
    // Nothing refused ever reached origin; both tasks merged once.
    let log = g.origin_git(&["log", "--format=%s", "main"]);
    assert_eq!(log.matches("(task-001)").count(), 1, "{log}");
    assert_eq!(log.matches("(task-002)").count(), 1, "{log}");
    assert!(
        g.origin_git(&["ls-tree", "-r", "--name-only", "main"])
            .lines()
            .all(|f| f != path)
    );
}

#[test]
fn a_workflow_file_the_token_may_not_push_stops_only_its_task() {
    a_refused_push_stops_one_task(
        "mkdir -p .github/workflows && echo 'on: push' > .github/workflows/ci.yml && git add -A && git commit -qm 'add CI'",
        ".github/workflows/ci.yml",
        "workflows",
    );
}

#[test]
fn a_secret_caught_by_push_protection_stops_only_its_task() {
    a_refused_push_stops_one_task(
        "echo 'token = ghp_abcdefghijklmnopqrstuvwxyz0123' > config.txt && git add -A && git commit -qm 'config'",
        "config.txt",
        "GH013",
    );
}

#[test]
fn a_file_over_the_size_limit_stops_only_its_task() {
    a_refused_push_stops_one_task(
        "head -c 5000 /dev/zero | tr '\\0' x > big.bin && git add -A && git commit -qm 'big file'",
        "big.bin",
        "GH001",
    );
}

/// A ruleset on the state branch refuses hyperloop's push: the step stops (exit 1) saying what
/// refused it and which setting to change, and never forces or retries the same push.
#[test]
fn a_refused_state_push_says_which_rule_and_what_to_change() {
    let g = GhProject::new("", "", false);
    let hook = g.p.repo.origin.join("hooks/pre-receive");
    std::fs::write(
        &hook,
        "#!/bin/sh\nwhile read old new ref; do\n  if [ \"$ref\" = refs/heads/main ]; then\n    echo 'error: GH013: Repository rule violations found for refs/heads/main.' >&2\n    echo '- Changes must be made through a pull request.' >&2\n    exit 1\n  fi\ndone\n",
    )
    .expect("hook");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let before = g.origin_git(&["rev-parse", "main"]);
    let out = g.step();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Changes must be made through a pull request")
            && stderr.contains("target.state_branch"),
        "{stderr}"
    );
    assert_eq!(g.origin_git(&["rev-parse", "main"]), before);
    assert!(
        named(&events(&out), "push_rejected").is_empty(),
        "a refusal is not a race"
    );
}

/// What an agent printed leaves the machine only redacted, and the pull request tells the task's
/// story. The implementer prints the job's token (which it never holds: the script has it), its
/// own API key, a password from the environment, the token's basic-auth header and a
/// GitHub-token-shaped string; the verifier fails once. With `HYPERLOOP_TRANSCRIPTS_DIR` set, every
/// run's transcript is copied there with none of them, while the log under `.hyperloop/logs`
/// keeps what was printed. The PR body shows each round's cost and a link to its run's
/// artifacts, and the findings of the failing round.
#[test]
fn transcripts_leave_redacted_and_the_pull_request_tells_the_story() {
    let g = GhProject::new("", "", true);
    let api_key = "sk-test-canary-key-0123456789";
    let password = "hunter2-canary-password";
    let shaped = format!("github_pat_{}", "11AbCdEfGh_0123456789".repeat(3));
    let header = crate::hostile::base64(format!("x-access-token:{}", g.gh.token).as_bytes());
    std::fs::write(
        &g.p.script,
        format!(
            "rules:\n  - role: implementer\n    actions:\n      - implement_task: true\n      - print: \"MARK token={token} key=${{ANTHROPIC_API_KEY}} password={password}\"\n      - print: \"MARK header=AUTHORIZATION: basic {header} pat={shaped}\"\n      - stream_json_result: {{cost_usd: 0.42}}\n      - verdict: {{verdict: pass, detail: implemented}}\n  - role: verifier\n    attempt: 0\n    actions:\n      - stream_json_result: {{cost_usd: 0.05}}\n      - verdict: {{verdict: fail, findings: 1, detail: \"FINDING-ALPHA tests/login.rs:4 fails with key ${{ANTHROPIC_API_KEY}}\"}}\n{}",
            crate::harness::DEMO_RULES,
            token = g.gh.token,
        ),
    )
    .expect("script");
    let transcripts = g.p.env.root().join("transcripts");
    let vars = [
        ("GITHUB_TOKEN", g.gh.token.as_str()),
        ("ANTHROPIC_API_KEY", api_key),
        ("DEPLOY_PASSWORD", password),
        ("HYPERLOOP_TRANSCRIPTS_DIR", transcripts.to_str().expect("utf-8")),
        ("GITHUB_RUN_ID", "777"),
        ("GITHUB_SERVER_URL", "https://github.example"),
        ("GITHUB_REPOSITORY", "acme/ops"),
    ];
    for _ in 0..4 {
        let out = g.step_with(&vars, true);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        if field(&g.origin_task("task-001"), "phase") == Some("human-review") {
            break;
        }
    }
    let task = g.origin_task("task-001");
    assert_eq!(field(&task, "phase"), Some("human-review"), "{task}");
    assert!(
        task.contains("\"run_id\":777"),
        "each round records its run: {task}"
    );

    // The transcripts folder: every run, redacted.
    let implementer = transcripts.join("task-001/implementer-round-0.log");
    let text = std::fs::read_to_string(&implementer).expect("the implementer's transcript");
    assert!(
        text.contains("MARK token=*** key=*** password=***")
            && text.contains("MARK header=AUTHORIZATION: basic *** pat=***"),
        "{text}"
    );
    for file in [
        "task-001/verifier-round-0.log",
        "task-001/implementer-round-1.log",
        "intake/pm-round-0.log",
    ] {
        assert!(transcripts.join(file).is_file(), "{file}");
    }
    let mut all = String::new();
    for dir in std::fs::read_dir(&transcripts).expect("dir").flatten() {
        for f in std::fs::read_dir(dir.path()).expect("dir").flatten() {
            all.push_str(&std::fs::read_to_string(f.path()).expect("read"));
        }
    }
    for secret in [g.gh.token.as_str(), api_key, password, &header, &shaped] {
        assert!(!all.contains(secret), "a transcript holds {secret}: {all}");
    }
    // The canaries really were printed: the local log keeps them.
    let local = std::fs::read_dir(g.p.repo.path.join(".hyperloop/logs/task-001"))
        .expect("logs")
        .flatten()
        .map(|f| std::fs::read_to_string(f.path()).unwrap_or_default())
        .collect::<String>();
    assert!(local.contains(&g.gh.token) && local.contains(api_key), "{local}");

    // The pull request's body.
    let pr = field(&task, "pr").expect("a PR");
    let number: u64 = pr
        .rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("number");
    let body = g.gh.pr_json(number)["body"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        body.contains("| round | role | verdict | findings | duration | cost | transcript |"),
        "{body}"
    );
    let link = "[run 777](https://github.example/acme/ops/actions/runs/777#artifacts)";
    assert!(body.contains(&format!("| $0.42 | {link} |")), "{body}");
    assert!(body.contains(&format!("| $0.05 | {link} |")), "{body}");
    assert!(
        body.contains("## Findings of the latest failing round\n\nRound 0 — verifier: fail\n"),
        "{body}"
    );
    assert!(
        body.contains("FINDING-ALPHA tests/login.rs:4 fails with key ***"),
        "{body}"
    );
    assert!(!body.contains(api_key), "{body}");
}
