//! The repository's own CI as part of verification (`merge.checks`), against the fake GitHub:
//! check runs with summaries and annotations, commit statuses, branch protection's required
//! checks and the 405 it answers, all read through one GraphQL `statusCheckRollup` query per
//! step. And `merge.local_checks` in local mode.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::fake_github::{CheckRun, FakeGitHub};
use crate::harness::describe;
use crate::local::{Project, events, named};

struct Ci {
    p: Project,
    gh: FakeGitHub,
}

/// An implementer that writes its prompt to `prompt-r<round>.txt` next to the script.
fn prompt_dumping_rules(dir: &std::path::Path) -> String {
    let mut rules = String::new();
    for round in 0..3 {
        rules.push_str(&format!(
            "  - role: implementer\n    round: {round}\n    actions:\n      - prompt_dump: {}\n      - implement_task: true\n      - verdict: {{verdict: pass, detail: \"implemented\"}}\n",
            dir.join(format!("prompt-r{round}.txt")).display()
        ));
    }
    rules
}

impl Ci {
    fn new(extra_config: &str) -> Ci {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let p = Project::new(&prompt_dumping_rules(&dir), extra_config);
        p.repo.write("specs/a.md", "# A\n\nBuild A.\n");
        p.commit_all("spec");
        p.git(&["push", "-q", "origin", "main"]);
        let gh = FakeGitHub::start(&p.repo.origin, "acme", "widgets");
        Ci { p, gh }
    }

    fn prompt(&self, round: u32) -> String {
        std::fs::read_to_string(self.prompt_path(round)).unwrap_or_default()
    }

    fn prompt_path(&self, round: u32) -> std::path::PathBuf {
        let text = std::fs::read_to_string(&self.p.script).expect("script");
        let needle = format!("prompt-r{round}.txt");
        let line = text
            .lines()
            .find(|l| l.contains(&needle))
            .expect("rule for the round");
        std::path::PathBuf::from(line.trim().trim_start_matches("- prompt_dump:").trim())
    }

    fn step(&self) -> (Output, Value) {
        let mut cmd = self.p.env.command(crate::harness::hyperloop_bin());
        cmd.args(["--path", self.p.repo.path_str(), "--repo", "acme/widgets"]);
        cmd.args(["step", "--json"]);
        cmd.env("GITHUB_API_URL", &self.gh.url);
        cmd.env("GITHUB_TOKEN", &self.gh.token);
        let out = cmd.output().expect("hyperloop runs");
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("report is JSON ({e}): {}", describe(&out)));
        (out, report)
    }

    fn task(&self) -> String {
        self.p
            .env
            .git(&self.p.repo.origin, &["show", "main:specs/tasks/task-001.md"])
    }

    fn merges(&self) -> usize {
        self.p
            .env
            .git(&self.p.repo.origin, &["log", "--format=%s", "main"])
            .matches("(task-001)")
            .count()
    }
}

fn field<'a>(task_file: &'a str, key: &str) -> Option<&'a str> {
    task_file
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
}

fn held(report: &Value) -> String {
    report["checks"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

#[test]
fn a_failing_check_loops_back_with_its_findings_and_the_next_green_round_merges() {
    let ci = Ci::new("");
    ci.gh.require_checks(&["test"]);

    // The PR opens with the verified work; its checks cannot have reported in the same step.
    let (out, report) = ci.step();
    assert_eq!(field(&ci.task(), "phase"), Some("merge-pr"), "{}", describe(&out));
    assert!(held(&report).contains("task-001: waiting for checks"), "{report}");
    let first_head = ci.gh.pr_head(1);

    ci.gh.add_check_run(
        &first_head,
        CheckRun::completed("test", "failure", "1 of 12 tests failed").annotate(
            "src/widget.rs",
            42,
            "assertion failed: widget.spins()",
        ),
    );
    ci.gh.set_status(&first_head, "lint", "success", "clean");
    let (out, report) = ci.step();
    let evs = events(&out);
    assert_eq!(named(&evs, "checks_failed").len(), 1, "{}", describe(&out));
    assert!(held(&report).contains("checks failed"), "{report}");
    // The implementer of the next round was shown the check like a verifier's findings.
    let prompt = ci.prompt(1);
    for needle in [
        "Check `test`: failure",
        "1 of 12 tests failed",
        "src/widget.rs:42",
        "assertion failed: widget.spins()",
        "https://github.com/acme/widgets/runs/1",
    ] {
        assert!(
            prompt.contains(needle),
            "{needle:?} missing from the prompt:\n{prompt}"
        );
    }
    assert_eq!(field(&ci.task(), "round"), Some("1"));
    assert_eq!(ci.merges(), 0);
    // The new round's head waits for its own checks.
    let second_head = ci.gh.pr_head(1);
    assert_ne!(first_head, second_head);
    assert_eq!(field(&ci.task(), "phase"), Some("merge-pr"));

    ci.gh
        .add_check_run(&second_head, CheckRun::completed("test", "success", "12 passed"));
    let (out, report) = ci.step();
    assert_eq!(
        report["merged"],
        serde_json::json!(["task-001"]),
        "{}",
        describe(&out)
    );
    assert_eq!(field(&ci.task(), "status"), Some("complete"));
    assert_eq!(ci.merges(), 1);
    assert_eq!(ci.gh.pr_json(1)["merged"], Value::Bool(true));
    // The checks' bookkeeping is gone from the finished task.
    assert!(!ci.task().contains("checks_head"), "{}", ci.task());
}

#[test]
fn a_pending_check_holds_the_merge_across_steps_at_constant_cost() {
    let ci = Ci::new("");
    let _ = ci.step();
    let head = ci.gh.pr_head(1);
    ci.gh.add_check_run(&head, CheckRun::in_progress("test"));
    ci.gh.add_check_run(&head, CheckRun::in_progress("lint"));
    for _ in 0..3 {
        ci.gh.clear_requests();
        let before = ci.gh.rollup_queries();
        let (out, report) = ci.step();
        assert!(
            held(&report).contains("task-001: waiting for checks: test, lint"),
            "{report}"
        );
        assert_eq!(report["spawned"], serde_json::json!([]), "no agent while waiting");
        assert_eq!(ci.gh.rollup_queries(), before + 1, "one checks query a step");
        // The dashboard issue's read (and write, when it changed) come on top: at most two.
        let (dashboard, calls): (Vec<String>, Vec<String>) = ci
            .gh
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .partition(|c| c.ends_with("/issues") || c.starts_with("PATCH /repos/acme/widgets/issues/"));
        assert!(dashboard.len() <= 2, "{dashboard:?}");
        assert!(calls.len() <= 2, "{calls:?}\n{}", describe(&out));
        assert_eq!(ci.merges(), 0);
    }
    ci.gh
        .add_check_run(&head, CheckRun::completed("test", "success", "ok"));
    ci.gh
        .add_check_run(&head, CheckRun::completed("lint", "success", "ok"));
    let (_, report) = ci.step();
    assert_eq!(report["merged"], serde_json::json!(["task-001"]), "{report}");
    assert_eq!(ci.merges(), 1);
}

#[test]
fn a_required_check_that_never_starts_is_named_with_the_job_token_and_times_out() {
    let ci = Ci::new("merge:\n  checks_timeout: 1800\n");
    ci.gh.require_checks(&["test"]);
    let _ = ci.step();
    let (_, report) = ci.step();
    assert!(held(&report).contains("waiting for checks: test"), "{report}");

    // GitHub's clock moves past the grace period: the task says why nothing comes.
    ci.gh.advance_clock(Duration::from_secs(11 * 60));
    let (out, report) = ci.step();
    let text = held(&report);
    assert!(
        text.contains("never started") && text.contains("GITHUB_TOKEN") && text.contains("GitHub App"),
        "{report}"
    );
    assert_eq!(named(&events(&out), "checks_never_started").len(), 1);
    let task = ci.task();
    assert!(
        task.contains("checks_note:") && task.contains("never started"),
        "{task}"
    );
    assert_eq!(field(&task, "status"), Some("in-progress"));

    // No endless silent waiting: past `merge.checks_timeout` the task fails, saying why.
    ci.gh.advance_clock(Duration::from_secs(1800));
    let _ = ci.step();
    let task = ci.task();
    assert_eq!(field(&task, "status"), Some("failed"), "{task}");
    assert!(
        task.contains("merge.checks_timeout") && task.contains("job token"),
        "{task}"
    );
    assert_eq!(ci.merges(), 0);
}

#[test]
fn merge_checks_none_merges_without_reading_checks_and_names_what_github_refuses() {
    // Unprotected: today's behaviour, red CI or not, and no checks query at all.
    let ci = Ci::new("merge:\n  checks: none\n");
    let (_, report) = ci.step();
    assert_eq!(report["merged"], serde_json::json!(["task-001"]), "{report}");
    assert_eq!(ci.gh.rollup_queries(), 0);

    // Protected: GitHub refuses (405) and the task says what the repository requires.
    let ci = Ci::new("merge:\n  checks: none\n");
    ci.gh.require_checks(&["test"]);
    let (out, report) = ci.step();
    assert_eq!(ci.merges(), 0, "{}", describe(&out));
    assert!(
        held(&report).contains("merge refused: required checks have not passed"),
        "{report}"
    );
    let task = ci.task();
    assert!(
        task.contains("merge_blocked:") && task.contains("Required status check"),
        "{task}"
    );
    assert_eq!(
        ci.gh.count("PUT", "/update-branch"),
        0,
        "not mistaken for an outdated branch"
    );
    let head = ci.gh.pr_head(1);
    ci.gh
        .add_check_run(&head, CheckRun::completed("test", "success", "ok"));
    let _ = ci.step();
    assert_eq!(ci.merges(), 1);
    assert!(!ci.task().contains("merge_blocked"), "{}", ci.task());
}

#[test]
fn local_checks_failure_output_becomes_the_finding() {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    // The first round forgets the file the project's checks want; the second adds it.
    let rules = format!(
        "  - role: implementer\n    round: 0\n    actions:\n      - implement_task: true\n      - verdict: {{verdict: pass}}\n  - role: implementer\n    round: 1\n    actions:\n      - prompt_dump: {}\n      - write: {{path: ok.txt, content: \"ok\\n\"}}\n      - implement_task: true\n      - verdict: {{verdict: pass}}\n",
        dir.join("prompt-r1.txt").display()
    );
    let p = Project::new(
        &rules,
        "merge:\n  local_checks: \"test -f ok.txt || { echo 'checks/ok_test.sh:3: ok.txt is missing'; exit 4; }\"\n",
    );
    p.repo.write("specs/a.md", "# A\n\nBuild A.\n");
    p.commit_all("spec");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    assert_eq!(named(&evs, "checks_failed").len(), 1, "{}", describe(&out));
    let prompt = std::fs::read_to_string(dir.join("prompt-r1.txt")).expect("round 1 ran");
    assert!(
        prompt.contains("checks/ok_test.sh:3: ok.txt is missing") && prompt.contains("exit 4"),
        "{prompt}"
    );
    let t = p.task("task-001");
    assert_eq!(t["status"], "complete", "{t}");
    assert_eq!(t["round"], 1, "{t}");
    let files = p.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(files.contains("ok.txt"), "{files}");
}
