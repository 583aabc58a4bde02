//! Operating hyperloop day to day, through the binary: the preflight of a first run, intake
//! that is not blamed for the environment, `retry`, `cancel` (also of a task whose agent is
//! running, and through pull-request labels in GitHub mode), `logs`, and `init` on a `master`
//! repository.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake_github::FakeGitHub;
use crate::harness::{TestEnv, describe, hyperloop_bin, scripted_agent_bin};
use crate::local::{Project, events, named};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A PATH that has git but no `claude`: a directory of links to the programs a test needs.
fn path_without_claude(env: &TestEnv) -> String {
    let bin = env.root().join("bin-no-claude");
    std::fs::create_dir_all(&bin).expect("mkdir");
    for tool in ["git", "sh"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{tool} on PATH"));
        std::os::unix::fs::symlink(found, bin.join(tool)).expect("link");
    }
    // git runs helpers from its exec path, which is absolute; nothing else is needed.
    bin.display().to_string()
}

fn task_field(p: &Project, id: &str, key: &str) -> Value {
    p.task(id)[key].clone()
}

#[test]
fn a_first_run_without_the_agent_stops_before_any_commit_and_runs_intake_once_fixed() {
    let env = TestEnv::new();
    let repo = env.repo("project");
    let path = path_without_claude(&env);
    let run = |args: &[&str]| {
        let mut cmd = env.command(hyperloop_bin());
        cmd.env("PATH", &path)
            .args(["--path", repo.path_str()])
            .args(args);
        cmd.output().expect("hyperloop runs")
    };
    let out = run(&["init"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    repo.write("specs/example.md", "# Greeting\n\nSay hello.\n");
    env.git(&repo.path, &["add", "-A"]);
    env.git(&repo.path, &["commit", "-qm", "hyperloop: set up"]);
    let before = env.git(&repo.path, &["rev-parse", "main"]);

    let out = run(&["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = stderr(&out);
    assert!(err.contains("runtime.agent_command"), "{err}");
    assert!(err.contains(".hyperloop.yaml"), "{err}");
    assert!(err.contains("npm install -g @anthropic-ai/claude-code"), "{err}");
    assert!(named(&events(&out), "intake_ran").is_empty(), "{err}");
    assert_eq!(env.git(&repo.path, &["rev-parse", "main"]), before, "no commit");
    assert_eq!(
        env.git(
            &repo.path,
            &["ls-tree", "-r", "--name-only", "main", "specs/tasks"]
        ),
        "",
        "no intake failure was recorded"
    );

    // The user sets another agent and commits; the next step takes the specs in, no spec edited.
    let script = env.root().join("script.yaml");
    std::fs::write(&script, format!("rules:\n{}", crate::harness::DEMO_RULES)).expect("script");
    let cfg = std::fs::read_to_string(repo.path.join(".hyperloop.yaml")).expect("config");
    let cfg: String = cfg
        .lines()
        .map(|l| {
            if l.starts_with("  agent_command:") {
                format!(
                    "  agent_command: [\"{}\", \"--script\", \"{}\"]\n",
                    scripted_agent_bin().display(),
                    script.display()
                )
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    repo.write(".hyperloop.yaml", &cfg);
    env.git(&repo.path, &["commit", "-qam", "use the scripted agent"]);
    let out = run(&["step", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("run intake"), "{}", stdout(&out));
    let out = run(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let tasks = env.git(
        &repo.path,
        &["ls-tree", "-r", "--name-only", "main", "specs/tasks"],
    );
    assert!(
        tasks.contains("specs/tasks/task-001.md"),
        "{tasks}\n{}",
        describe(&out)
    );
}

#[test]
fn the_default_agent_without_a_credential_gets_a_warning() {
    let env = TestEnv::new();
    let repo = env.repo("project");
    // A `claude` that exists but has never been logged in to.
    let bin = env.root().join("fake-bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::fs::write(bin.join("claude"), "#!/bin/sh\nexit 1\n").expect("write");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(bin.join("claude"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = env
        .command(hyperloop_bin())
        .env("PATH", &path)
        .args(["--path", repo.path_str(), "step", "--dry-run"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stderr(&out).contains("agent_credential_missing"),
        "{}",
        describe(&out)
    );
    assert!(stderr(&out).contains("ANTHROPIC_API_KEY"), "{}", describe(&out));
    let out = env
        .command(hyperloop_bin())
        .env("PATH", &path)
        .env("ANTHROPIC_API_KEY", "sk-test")
        .args(["--path", repo.path_str(), "step", "--dry-run"])
        .output()
        .expect("runs");
    assert!(
        !stderr(&out).contains("agent_credential_missing"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_missing_base_branch_is_named_with_the_branches_that_exist() {
    let env = TestEnv::new();
    let path = env.root().join("legacy");
    std::fs::create_dir_all(&path).expect("mkdir");
    env.git(&path, &["init", "-q", "-b", "master"]);
    std::fs::write(path.join("README.md"), "hi\n").expect("write");
    env.git(&path, &["add", "-A"]);
    env.git(&path, &["commit", "-qm", "init"]);
    env.git(&path, &["branch", "develop"]);
    let p = path.to_str().expect("utf8");
    for args in [&["step"][..], &["step", "--dry-run"], &["run"]] {
        let mut all = vec!["--path", p];
        all.extend_from_slice(args);
        let out = env.hyperloop(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        let err = stderr(&out);
        assert!(err.contains("target.base_branch"), "{err}");
        assert!(err.contains("`main` does not exist"), "{err}");
        assert!(err.contains("develop, master"), "{err}");
    }
    // An empty repository says to commit first.
    let empty = env.root().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    env.git(&empty, &["init", "-q", "-b", "main"]);
    let out = env.hyperloop(&["--path", empty.to_str().expect("utf8"), "step"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("no commits yet"), "{}", describe(&out));
}

#[test]
fn init_on_master_names_master_and_says_what_to_do_next() {
    let env = TestEnv::new();
    let path = env.root().join("legacy");
    std::fs::create_dir_all(&path).expect("mkdir");
    env.git(&path, &["init", "-q", "-b", "master"]);
    std::fs::write(path.join("README.md"), "hi\n").expect("write");
    env.git(&path, &["add", "-A"]);
    env.git(&path, &["commit", "-qm", "init"]);
    let p = path.to_str().expect("utf8");
    let out = env.hyperloop(&["--path", p, "init"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let said = stdout(&out);
    assert!(
        said.contains("target.base_branch: master (the branch checked out here)"),
        "{said}"
    );
    assert!(said.contains("replace specs/example.md"), "{said}");
    assert!(said.contains("git add -A && git commit"), "{said}");
    assert!(said.contains("hyperloop run"), "{said}");
    let cfg = std::fs::read_to_string(path.join(".hyperloop.yaml")).expect("config");
    assert!(cfg.contains("base_branch: master"), "{cfg}");
    // What init wrote works as it is: the dry run finds the branch.
    env.git(&path, &["add", "-A"]);
    env.git(&path, &["commit", "-qm", "set up"]);
    let out = env.hyperloop(&["--path", p, "step", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).ends_with('\n'), "dry run ends with a newline");

    // A detached checkout of a clone takes origin's default branch.
    let clone = env.root().join("clone");
    env.git(env.root(), &["clone", "-q", p, clone.to_str().expect("utf8")]);
    env.git(&clone, &["checkout", "-q", "--detach"]);
    std::fs::remove_file(clone.join(".hyperloop.yaml")).expect("rm");
    let out = env.hyperloop(&["--path", clone.to_str().expect("utf8"), "init"]);
    assert!(
        stdout(&out).contains("target.base_branch: master (the default branch of origin)"),
        "{}",
        describe(&out)
    );
}

#[test]
fn outside_a_repository_the_error_names_the_directory_not_a_flag() {
    let env = TestEnv::new();
    let out = env.hyperloop(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = stderr(&out);
    assert!(!err.contains("--path ."), "{err}");
    assert!(err.contains("is not in a git repository"), "{err}");
}

const PM_FAILS: &str = r#"
  - role: pm
    actions:
      - verdict: {verdict: fail, detail: "cannot make sense of the specs"}
"#;

#[test]
fn intake_that_gave_up_says_so_and_runs_again_when_the_configuration_changes() {
    let p = Project::new(PM_FAILS, "");
    p.repo.write("specs/a.md", "# A\n");
    p.commit_all("spec");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let evs = events(&out);
    assert_eq!(named(&evs, "intake_ran").len(), 3, "{}", describe(&out));
    let halted = named(&evs, "orchestrator_halted");
    let reason = halted[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("intake gave up"), "{reason}");
    assert!(!reason.contains("blocked behind"), "{reason}");
    let status = p.hyperloop(&["status"]);
    assert!(
        stdout(&status).contains("intake gave up"),
        "{}",
        describe(&status)
    );
    let dry = p.hyperloop(&["step", "--dry-run"]);
    assert!(stdout(&dry).contains("intake gave up"), "{}", describe(&dry));
    assert!(!stdout(&dry).contains("run intake"), "{}", describe(&dry));

    // A committed configuration change is a reason to try again, with no spec edited.
    let cfg = p.repo.read(".hyperloop.yaml");
    p.repo.write(
        ".hyperloop.yaml",
        &cfg.replace("max_cycles: 10", "max_cycles: 11"),
    );
    p.commit_all("config change");
    let out = p.hyperloop(&["step"]);
    assert_eq!(named(&events(&out), "intake_ran").len(), 1, "{}", describe(&out));
}

#[test]
fn retry_intake_runs_a_given_up_intake_again() {
    let p = Project::new(PM_FAILS, "");
    p.repo.write("specs/a.md", "# A\n");
    p.commit_all("spec");
    let out = p.hyperloop(&["retry", "intake"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "nothing failed yet: {}",
        describe(&out)
    );
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let out = p.hyperloop(&["step"]);
    assert!(
        named(&events(&out), "intake_ran").is_empty(),
        "{}",
        describe(&out)
    );
    let out = p.hyperloop(&["retry", "intake"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout(&out).contains("next step runs it again"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        p.git(&["log", "-1", "--format=%s", "main"]),
        "hyperloop: retry intake"
    );
    let out = p.hyperloop(&["step"]);
    assert_eq!(named(&events(&out), "intake_ran").len(), 1, "{}", describe(&out));
}

#[test]
fn an_intake_that_times_out_is_not_counted_against_the_specs() {
    let p = Project::new("  - role: pm\n    actions:\n      - silent_sleep: 30\n", "");
    let cfg = p.repo.read(".hyperloop.yaml");
    p.repo.write(
        ".hyperloop.yaml",
        &cfg.replace("worker_timeout: 60", "worker_timeout: 1"),
    );
    p.repo.write("specs/a.md", "# A\n");
    p.commit_all("spec");
    for _ in 0..4 {
        let out = p.hyperloop(&["step"]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let evs = events(&out);
        let ran = named(&evs, "intake_ran");
        assert_eq!(ran.len(), 1, "intake runs every step: {}", describe(&out));
        assert_eq!(ran[0]["counted"], Value::Bool(false), "{}", describe(&out));
    }
    let files = p.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(!files.contains(".intake-failures.json"), "{files}");
}

const VERIFIER_FAILS: &str = r#"
  - role: verifier
    task: task-001
    actions:
      - verdict: {verdict: fail, findings: 1, detail: "the tests are missing"}
"#;

#[test]
fn retry_of_a_task_failed_by_max_task_rounds_keeps_findings_and_renews_the_budget() {
    let p = Project::new(VERIFIER_FAILS, "max_task_rounds: 2\n");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.write_task("task-002", "specs/a.md", &["task-001"]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(task_field(&p, "task-001", "status"), "failed");
    let status = p.hyperloop(&["status"]);
    assert!(
        stdout(&status).contains("blocked by task-001"),
        "{}",
        describe(&status)
    );
    let history_before = task_field(&p, "task-001", "history")
        .as_array()
        .map_or(0, Vec::len);

    // Retrying a task that did not fail, or one that does not exist, is refused.
    for (args, says) in [
        (&["retry", "task-002"][..], "not failed or cancelled"),
        (&["retry", "task-404"][..], "no task task-404"),
        (&["retry", "task-001", "--dry-run"][..], "--dry-run"),
    ] {
        let out = p.hyperloop(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", describe(&out));
    }

    let out = p.hyperloop(&["retry", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout(&out).contains("task-001: back to implementer in round 2, with a fresh budget of 2 rounds"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        p.git(&["log", "-1", "--format=%s%n%b", "main"]).lines().next(),
        Some("hyperloop: retry task-001")
    );
    let t = p.task("task-001");
    assert_eq!(t["status"], "in-progress");
    assert_eq!(t["phase"], "implementer");
    assert_eq!(t["round"], 2);
    assert_eq!(t["failure_reason"], Value::Null);
    assert_eq!(t["history"].as_array().map_or(0, Vec::len), history_before);
    let file = p.git(&["show", "main:specs/tasks/task-001.md"]);
    assert!(file.contains("the tests are missing"), "findings kept: {file}");
    assert!(file.contains("rounds_from: 2"), "{file}");

    // With the verifier content now, the task and its dependent finish.
    std::fs::write(&p.script, format!("rules:\n{}", crate::harness::DEMO_RULES)).expect("script");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(task_field(&p, "task-001", "status"), "complete");
    assert_eq!(task_field(&p, "task-002", "status"), "complete");
}

/// Waits until `cond` holds, or panics after `secs`.
fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cancel_stops_a_running_agent_never_merges_and_blocks_dependents() {
    let marker_dir = tempfile::tempdir().expect("tempdir");
    let marker = marker_dir.path().join("implementer-finished");
    let rules = format!(
        "  - role: implementer\n    task: task-001\n    actions:\n      - sleep: 30\n      - write: {{path: \"{}\", content: \"done\"}}\n      - implement_task: true\n      - verdict: {{verdict: pass}}\n",
        marker.display()
    );
    let p = Project::new(&rules, "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.write_task("task-002", "specs/a.md", &["task-001"]);
    p.commit_all("tasks");

    let step = p
        .env
        .command(hyperloop_bin())
        .args(["--path", p.repo.path_str(), "step"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("step starts");
    let running = p.repo.path.join(".hyperloop/state/running/task-001.json");
    wait_until(30, "the implementer to start", || running.exists());

    let started = Instant::now();
    let out = p.hyperloop(&["cancel", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "cancel does not wait for the agent to finish"
    );
    let said = stdout(&out);
    assert!(said.contains("task-001: cancelled"), "{said}");
    assert!(said.contains("blocked until it is retried: task-002"), "{said}");
    let step = step.wait_with_output().expect("step ends");
    assert_eq!(step.status.code(), Some(0), "{}", describe(&step));
    assert!(
        !named(&events(&step), "task_cancelled").is_empty(),
        "{}",
        describe(&step)
    );
    assert!(!marker.exists(), "the agent was stopped before it finished");

    let t = p.task("task-001");
    assert_eq!(t["status"], "failed");
    assert_eq!(t["cancelled"], Value::Bool(true));
    let subjects = p.git(&["log", "--format=%s", "main"]);
    assert!(subjects.contains("hyperloop: cancel task-001"), "{subjects}");
    let files = p.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(!files.contains("impl/task-001.md"), "never merged: {files}");

    // Nothing more happens to it; its dependent says why it waits.
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(task_field(&p, "task-002", "status"), "not-started");
    let status = stdout(&p.hyperloop(&["status"]));
    assert!(status.contains("blocked by task-001 (cancelled)"), "{status}");
    let dry = stdout(&p.hyperloop(&["step", "--dry-run"]));
    assert!(
        dry.contains("blocked task-002 (depends on cancelled task-001)"),
        "{dry}"
    );

    let out = p.hyperloop(&["cancel", "task-001"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("already cancelled"), "{}", describe(&out));

    // retry brings it back; it then completes, and so does its dependent.
    std::fs::write(&p.script, format!("rules:\n{}", crate::harness::DEMO_RULES)).expect("script");
    let out = p.hyperloop(&["retry", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(task_field(&p, "task-001", "cancelled"), Value::Bool(false));
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(task_field(&p, "task-002", "status"), "complete");
    let out = p.hyperloop(&["cancel", "task-002"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("is complete"), "{}", describe(&out));
}

#[test]
fn cancel_between_steps_commits_at_once() {
    let p = Project::new("", "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["cancel", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(!stdout(&out).contains("agent was stopped"), "{}", describe(&out));
    assert_eq!(task_field(&p, "task-001", "status"), "failed");
    let out = p.hyperloop(&["retry", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("back to not-started"), "{}", describe(&out));
    for args in [&["cancel", "task-404"][..], &["cancel", "intake"]] {
        let out = p.hyperloop(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    }
    assert!(
        !p.repo
            .path
            .join(".hyperloop/state/requests/task-404.cancel")
            .exists(),
        "a refused cancel leaves no request"
    );
}

const STREAMING_AGENT: &str = r#"
  - role: implementer
    actions:
      - print: "working on it"
      - stream_json_result: {cost_usd: 0.25, num_turns: 3}
      - implement_task: true
      - verdict: {verdict: pass}
"#;

#[test]
fn logs_show_the_latest_run_readably_and_each_run_by_role_and_round() {
    let p = Project::new(STREAMING_AGENT, "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    let dir = p.repo.path.join(".hyperloop/logs/task-001");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .expect("logs folder per task")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".log"))
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("implementer-round-0-") && n.ends_with("Z.log")),
        "{names:?}"
    );

    let out = p.hyperloop(&["logs", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let shown = stdout(&out);
    assert!(
        shown.starts_with("# task-001 · verifier · round 0"),
        "latest run: {shown}"
    );

    let out = p.hyperloop(&["logs", "task-001", "--role", "implementer"]);
    let shown = stdout(&out);
    assert!(shown.contains("working on it"), "{shown}");
    assert!(
        shown.contains("── result: success · 3 turns · $0.2500"),
        "{shown}"
    );
    assert!(!shown.contains("{\"type\""), "no raw stream-json: {shown}");
    assert!(shown.contains("verdict pass exit 0"), "{shown}");
    let raw = stdout(&p.hyperloop(&["logs", "task-001", "--role", "implementer", "--raw"]));
    assert!(raw.contains("{\"type\":\"result\""), "{raw}");

    // A run of a few milliseconds is not recorded as 0.0 seconds.
    let history = p.task("task-001")["history"].clone();
    assert!(
        history[0]["duration_s"].as_f64().is_some_and(|d| d > 0.0),
        "{history}"
    );
    // approve on a complete task says what the task is, and nothing about "no step".
    let out = p.hyperloop(&["approve", "task-001"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("task-001 waits at no gate: it is complete\n"),
        "{}",
        describe(&out)
    );

    let out = p.hyperloop(&["logs", "task-001", "--round", "7"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("implementer round 0, verifier round 0"),
        "{}",
        describe(&out)
    );
    let out = p.hyperloop(&["logs", "task-404"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let out = p.hyperloop(&["logs", "intake"]);
    assert_eq!(out.status.code(), Some(2), "no intake ran: {}", describe(&out));
}

#[test]
fn logs_follow_prints_a_running_agent_until_it_ends() {
    let p = Project::new(
        "  - role: implementer\n    actions:\n      - print: \"first line\"\n      - sleep: 2\n      - print: \"last line\"\n      - implement_task: true\n      - verdict: {verdict: pass}\n",
        "",
    );
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    let step = p
        .env
        .command(hyperloop_bin())
        .args(["--path", p.repo.path_str(), "step"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("step starts");
    let dir = p.repo.path.join(".hyperloop/logs/task-001");
    wait_until(30, "the implementer's log", || {
        std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some())
    });
    let out = p.hyperloop(&["logs", "task-001", "--follow"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let shown = stdout(&out);
    assert!(shown.contains("first line"), "{shown}");
    assert!(shown.contains("last line"), "{shown}");
    assert!(shown.contains("hyperloop worker finished"), "{shown}");
    let _ = step.wait_with_output();
}

struct Gh {
    p: Project,
    gh: FakeGitHub,
}

impl Gh {
    fn new(rules: &str, extra: &str) -> Gh {
        let p = Project::new(rules, extra);
        p.use_process(crate::harness::GATED_PROCESS);
        p.repo.write("specs/a.md", "# A\n\nBuild A.\n");
        p.write_task("task-001", "specs/a.md", &[]);
        p.write_task("task-002", "specs/a.md", &["task-001"]);
        p.commit_all("tasks");
        p.git(&["push", "-q", "origin", "main"]);
        let gh = FakeGitHub::start(&p.repo.origin, "acme", "widgets");
        Gh { p, gh }
    }

    fn hyperloop(&self, args: &[&str]) -> Output {
        let mut cmd = self.p.env.command(hyperloop_bin());
        cmd.args(["--path", self.p.repo.path_str(), "--repo", "acme/widgets"])
            .args(args)
            .env("GITHUB_API_URL", &self.gh.url)
            .env("GITHUB_TOKEN", &self.gh.token);
        cmd.output().expect("hyperloop runs")
    }

    fn origin_field(&self, id: &str, key: &str) -> Option<String> {
        let file = self.p.env.git(
            &self.p.repo.origin,
            &["show", &format!("main:specs/tasks/{id}.md")],
        );
        file.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")).map(str::to_string))
    }

    fn pr_number(&self, id: &str) -> u64 {
        self.origin_field(id, "pr")
            .and_then(|u| u.rsplit('/').next().and_then(|n| n.parse().ok()))
            .expect("a pull request")
    }
}

#[test]
fn github_mode_retry_and_cancel_by_command_and_by_label() {
    let g = Gh::new(VERIFIER_FAILS, "max_task_rounds: 1\n");
    let out = g.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(g.origin_field("task-001", "status").as_deref(), Some("failed"));
    let number = g.pr_number("task-001");

    // The command: committed and pushed to origin.
    let out = g.hyperloop(&["retry", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        g.origin_field("task-001", "status").as_deref(),
        Some("in-progress")
    );
    assert_eq!(g.origin_field("task-001", "rounds_from").as_deref(), Some("1"));
    let out = g.hyperloop(&["cancel", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(g.origin_field("task-001", "cancelled").as_deref(), Some("true"));
    let out = g.hyperloop(&["cancel", "task-001"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let out = g.hyperloop(&["retry", "task-404"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));

    // The label: read from the step's one listing, acted on once, then removed.
    g.gh.add_label_to_pr(number, "hyperloop:retry");
    std::fs::write(&g.p.script, format!("rules:\n{}", crate::harness::DEMO_RULES)).expect("script");
    let out = g.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        named(&events(&out), "label_command").len(),
        1,
        "{}",
        describe(&out)
    );
    assert!(!g.gh.pr_labels(number).contains(&"hyperloop:retry".to_string()));
    assert_eq!(
        g.origin_field("task-001", "phase").as_deref(),
        Some("human-review")
    );

    // A cancel label on a waiting task stops it for good: it is not merged even when approved.
    g.gh.add_label_to_pr(number, "hyperloop:cancel");
    g.gh.add_label_to_pr(number, "lgtm");
    let out = g.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(g.origin_field("task-001", "cancelled").as_deref(), Some("true"));
    assert!(!g.gh.pr_labels(number).contains(&"hyperloop:cancel".to_string()));
    assert!(
        named(&events(&out), "merge_attempted").is_empty(),
        "{}",
        describe(&out)
    );
    assert_eq!(
        g.origin_field("task-002", "status").as_deref(),
        Some("not-started")
    );

    // A label that does not apply is removed with a warning, and changes nothing.
    g.gh.add_label_to_pr(number, "hyperloop:cancel");
    let out = g.hyperloop(&["step"]);
    assert_eq!(
        named(&events(&out), "label_command_ignored").len(),
        1,
        "{}",
        describe(&out)
    );
    assert!(!g.gh.pr_labels(number).contains(&"hyperloop:cancel".to_string()));
}

#[test]
fn a_step_sees_the_commit_and_names_the_uncommitted_changes_it_does_not_see() {
    let p = Project::new("", "");
    p.use_process(crate::harness::GATED_PROCESS);
    p.repo.write("specs/a.md", "# A\n");
    p.commit_all("spec, config and overlay");

    // Uncommitted: a broken configuration, a new spec, an overlay edit that drops the gate.
    let committed_cfg = p.repo.read(".hyperloop.yaml");
    p.repo.write(
        ".hyperloop.yaml",
        &format!("{committed_cfg}max_workers_typo: 3\n"),
    );
    p.repo.write("specs/b.md", "# B\n");
    p.repo.write(
        ".hyperloop/agents/process.yaml",
        "apiVersion: hyperloop.io/v1\nkind: Process\nmetadata:\n  name: default\npipeline:\n  - loop:\n      - role: implementer\n      - role: verifier\n  - action: merge-pr\n",
    );

    let dry = p.hyperloop(&["step", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", describe(&dry));
    let plan = stdout(&dry);
    assert!(plan.contains("human-review"), "the committed overlay: {plan}");
    assert!(
        plan.contains("specs/a.md") && !plan.contains("specs/b.md"),
        "{plan}"
    );
    let warned = named(&events(&dry), "uncommitted_changes_unseen")
        .first()
        .map(|e| e["paths"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    for path in [".hyperloop.yaml", "specs/b.md", ".hyperloop/agents/process.yaml"] {
        assert!(warned.contains(path), "{path} named: {}", describe(&dry));
    }

    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(!named(&events(&out), "uncommitted_changes_unseen").is_empty());
    assert_eq!(
        p.task("task-001")["phase"],
        "human-review",
        "the gate of the commit"
    );
    let tasks = p.status();
    assert_eq!(tasks.len(), 1, "only the committed spec was taken in: {tasks:?}");
    // The user's edits are still there, untouched.
    assert!(p.repo.read(".hyperloop.yaml").contains("max_workers_typo"));

    // Committed, the broken configuration is an error naming the file and the key.
    p.commit_all("typo");
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("max_workers_typo"), "{}", describe(&out));
}

#[test]
fn github_mode_cancel_stops_the_agent_of_a_step_running_here() {
    let marker_dir = tempfile::tempdir().expect("tempdir");
    let marker = marker_dir.path().join("implementer-finished");
    let rules = format!(
        "  - role: implementer\n    task: task-001\n    actions:\n      - sleep: 30\n      - write: {{path: \"{}\", content: \"done\"}}\n      - verdict: {{verdict: pass}}\n",
        marker.display()
    );
    let g = Gh::new(&rules, "");
    let mut cmd = g.p.env.command(hyperloop_bin());
    cmd.args(["--path", g.p.repo.path_str(), "--repo", "acme/widgets", "step"])
        .env("GITHUB_API_URL", &g.gh.url)
        .env("GITHUB_TOKEN", &g.gh.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let step = cmd.spawn().expect("step starts");
    let running = g.p.repo.path.join(".hyperloop/state/running/task-001.json");
    wait_until(60, "the implementer to start", || running.exists());
    let started = Instant::now();
    let out = g.hyperloop(&["cancel", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "cancel does not wait for the agent"
    );
    let step = step.wait_with_output().expect("step ends");
    assert_eq!(step.status.code(), Some(0), "{}", describe(&step));
    assert!(!marker.exists(), "the agent was stopped");
    assert_eq!(g.origin_field("task-001", "cancelled").as_deref(), Some("true"));
    assert_eq!(g.origin_field("task-001", "status").as_deref(), Some("failed"));
}
