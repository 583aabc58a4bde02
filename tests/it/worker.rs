//! The worker runtime through real processes: the scripted agent runs in a real task worktree and
//! every path of the worker protocol (CONTRACT §4) is exercised — verdicts, broken result files,
//! crashes, limits, cancellation, process groups, the environment, and what is left on the branch.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hyperloop::worker::{
    Verdict, ensure_base_worktree, ensure_task_worktree, remove_worktree, remove_worktree_and_branch,
    run_worker,
};

use crate::support::worker_fixture::{WorkerFixture, process_dead, read_pid, run, wait_for_file};

fn commit_message(f: &WorkerFixture, dir: &std::path::Path, rev: &str) -> String {
    f.git_in(dir, &["log", "-1", "--format=%B", rev])
}

fn tree_has(f: &WorkerFixture, dir: &std::path::Path, rev: &str, path: &str) -> bool {
    !f.git_in(dir, &["ls-tree", "--name-only", rev, "--", path])
        .is_empty()
}

#[tokio::test]
async fn pass_with_a_commit() {
    let f = WorkerFixture::new(
        r#"
rules:
  - role: implementer
    actions:
      - prompt_dump: "${HOME}/prompt-seen.md"
      - write: {path: src/lib.txt, content: "hello from ${HYPERLOOP_TASK_ID}\n"}
      - commit: {message: "feat: add lib"}
      - verdict: {verdict: pass, findings: 0, detail: "implemented"}
"#,
    );
    let spec = f.spec("task-001", "implementer");
    let out = run(&spec).await;
    assert_eq!(out.verdict, Verdict::Pass, "{out:?}");
    assert_eq!(out.detail, "implemented");
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.suspicious, None);
    assert_eq!(out.commits.len(), 1, "{out:?}");
    assert!(out.pgid.is_some_and(|p| p > 1));

    let wt = &spec.worktree;
    assert_eq!(f.git_in(wt, &["rev-parse", "HEAD"]), out.commits[0]);
    assert_eq!(
        f.git_in(&f.repo.path, &["rev-parse", "worker/task-001"]),
        out.commits[0]
    );
    let msg = commit_message(&f, wt, "HEAD");
    assert!(msg.starts_with("feat: add lib"), "{msg}");
    assert!(
        msg.contains("Spec-Ref: specs/a.md") && msg.contains("Task-Ref: task-001"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(wt.join("src/lib.txt")).expect("file"),
        "hello from task-001\n"
    );
    // The prompt arrived on standard input and in the prompt file, outside the worktree.
    let seen = std::fs::read_to_string(f.env.home().join("prompt-seen.md")).expect("prompt dump");
    assert_eq!(seen, spec.prompt);
    let prompt_file = spec.prompt_file();
    assert!(!prompt_file.starts_with(wt));
    assert_eq!(
        std::fs::read_to_string(&prompt_file).expect("prompt file"),
        spec.prompt
    );
    // The log is kept; the result file is gone and never tracked.
    assert!(out.log_file.exists());
    assert!(!wt.join(".worker-result.json").exists());
    assert!(!tree_has(&f, wt, "HEAD", ".worker-result.json"));
    // Neither the user's checkout nor the worktree shows hyperloop's files.
    assert_eq!(f.git_in(&f.repo.path, &["status", "--porcelain"]), "");
    assert_eq!(f.git_in(wt, &["status", "--porcelain"]), "");
}

#[tokio::test]
async fn fail_keeps_findings_and_detail() {
    let f = WorkerFixture::new(
        r#"
rules:
  - role: verifier
    actions:
      - verdict: {verdict: fail, findings: 2, detail: "tests are missing\nand docs too"}
"#,
    );
    let out = run(&f.spec("task-001", "verifier")).await;
    assert_eq!(out.verdict, Verdict::Fail, "{out:?}");
    assert_eq!(out.findings, 2);
    assert_eq!(out.detail, "tests are missing\nand docs too");
    assert!(out.commits.is_empty());
}

#[tokio::test]
async fn missing_result_file_is_an_error() {
    let f = WorkerFixture::new("rules:\n  - role: verifier\n    actions:\n      - print: done\n");
    let out = run(&f.spec("task-001", "verifier")).await;
    assert_eq!(out.verdict, Verdict::Error, "{out:?}");
    assert_eq!(out.exit_code, Some(0));
    assert!(
        out.detail.contains("without writing .worker-result.json"),
        "{}",
        out.detail
    );
}

#[tokio::test]
async fn garbage_result_file_is_an_error() {
    let f = WorkerFixture::new(
        r#"
rules:
  - role: verifier
    actions:
      - result_raw: "{\"verdict\": \"pass\", oops"
"#,
    );
    let out = run(&f.spec("task-001", "verifier")).await;
    assert_eq!(out.verdict, Verdict::Error, "{out:?}");
    assert!(out.detail.contains("not valid JSON"), "{}", out.detail);

    let f = WorkerFixture::new(
        r#"
rules:
  - role: verifier
    actions:
      - result_raw: '{"verdict": "timeout", "findings": 1}'
"#,
    );
    let out = run(&f.spec("task-001", "verifier")).await;
    assert_eq!(out.verdict, Verdict::Error, "{out:?}");
    assert!(out.detail.contains("\"timeout\""), "{}", out.detail);
}

#[tokio::test]
async fn crash_reports_status_and_output() {
    let f = WorkerFixture::new(
        r#"
rules:
  - role: implementer
    actions:
      - eprint: "panic: the agent fell over"
      - exit: 7
      - verdict: {verdict: pass}
"#,
    );
    let out = run(&f.spec("task-001", "implementer")).await;
    assert_eq!(out.verdict, Verdict::Error, "{out:?}");
    assert_eq!(out.exit_code, Some(7));
    assert!(out.detail.contains("exited with status 7"), "{}", out.detail);
    assert!(
        out.detail.contains("panic: the agent fell over"),
        "{}",
        out.detail
    );
}

#[tokio::test]
async fn no_matching_rule_is_not_a_pass() {
    let f = WorkerFixture::new("rules:\n  - role: pm\n    actions:\n      - verdict: {verdict: pass}\n");
    let out = run(&f.spec("task-001", "verifier")).await;
    assert_eq!(out.verdict, Verdict::Error, "{out:?}");
    assert_eq!(out.exit_code, Some(3));
    assert!(out.detail.contains("no rule matches"), "{}", out.detail);
}

#[tokio::test]
async fn wall_clock_timeout_kills_a_busy_agent() {
    let f = WorkerFixture::new(
        "rules:\n  - role: implementer\n    actions:\n      - sleep: 60\n      - verdict: {verdict: pass}\n",
    );
    let mut spec = f.spec("task-001", "implementer");
    spec.worker_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let out = run(&spec).await;
    assert_eq!(out.verdict, Verdict::Timeout, "{out:?}");
    assert!(out.detail.contains("worker_timeout (2 s)"), "{}", out.detail);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(process_dead(out.pgid.expect("pgid")));
}

#[tokio::test]
async fn stall_timeout_kills_a_silent_agent() {
    let f = WorkerFixture::new(
        "rules:\n  - role: implementer\n    actions:\n      - print: starting\n      - silent_sleep: 60\n",
    );
    let mut spec = f.spec("task-001", "implementer");
    spec.stall_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let out = run(&spec).await;
    assert_eq!(out.verdict, Verdict::Timeout, "{out:?}");
    assert!(out.detail.contains("stall_timeout (1 s)"), "{}", out.detail);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn busy_output_is_not_a_stall() {
    let f = WorkerFixture::new(
        "rules:\n  - role: verifier\n    actions:\n      - sleep: 3\n      - verdict: {verdict: pass}\n",
    );
    let mut spec = f.spec("task-001", "verifier");
    spec.stall_timeout = Duration::from_secs(2);
    let out = run(&spec).await;
    assert_eq!(out.verdict, Verdict::Pass, "{out:?}");
}

#[tokio::test]
async fn committed_result_file_is_dropped_from_the_branch() {
    let f = WorkerFixture::new(
        r#"
rules:
  - role: implementer
    actions:
      - write: {path: feature.txt, content: "work\n"}
      - verdict: {verdict: pass, detail: "done, and committed everything"}
      - commit_result_file: true
"#,
    );
    let spec = f.spec("task-001", "implementer");
    let out = run(&spec).await;
    assert_eq!(out.verdict, Verdict::Pass, "{out:?}");
    assert_eq!(out.detail, "done, and committed everything");
    assert_eq!(out.commits.len(), 2, "{out:?}");
    let wt = &spec.worktree;
    assert!(tree_has(&f, wt, "HEAD~1", ".worker-result.json"));
    assert!(!tree_has(&f, wt, "HEAD", ".worker-result.json"));
    assert!(tree_has(&f, wt, "HEAD", "feature.txt"));
    let msg = commit_message(&f, wt, "HEAD");
    assert!(msg.starts_with("chore: drop orchestrator result file"), "{msg}");
    assert!(msg.contains("Spec-Ref: specs/a.md\nTask-Ref: task-001"), "{msg}");
    assert_eq!(f.git_in(wt, &["status", "--porcelain"]), "");
    assert_eq!(out.suspicious, None);
}

#[tokio::test]
async fn uncommitted_work_is_committed_for_the_agent() {
    let f = WorkerFixture::new(
        r##"
rules:
  - role: implementer
    actions:
      - write: {path: README.md, content: "# changed\n"}
      - write: {path: new/untracked.txt, content: "new\n"}
      - verdict: {verdict: pass}
"##,
    );
    let spec = f.spec("task-001", "implementer");
    let out = run(&spec).await;
    assert_eq!(out.verdict, Verdict::Pass, "{out:?}");
    assert_eq!(out.commits.len(), 1, "{out:?}");
    assert_eq!(out.suspicious, None, "left-over work is still work");
    let wt = &spec.worktree;
    let msg = commit_message(&f, wt, "HEAD");
    assert_eq!(
        msg.trim(),
        "implementer: uncommitted work left by the agent\n\nSpec-Ref: specs/a.md\nTask-Ref: task-001"
    );
    assert!(tree_has(&f, wt, "HEAD", "new/untracked.txt"));
    assert_eq!(
        f.git_in(wt, &["status", "--porcelain", "--untracked-files=all"]),
        ""
    );
}

#[tokio::test]
async fn implementer_pass_without_work_is_suspicious() {
    let f = WorkerFixture::new(
        "rules:\n  - role: implementer\n    actions:\n      - verdict: {verdict: pass, detail: done}\n",
    );
    let out = run(&f.spec("task-001", "implementer")).await;
    assert_eq!(out.verdict, Verdict::Pass);
    assert_eq!(
        out.suspicious.as_deref(),
        Some("implementer reported pass but made no commits")
    );
}

#[tokio::test]
async fn implementer_commits_that_change_nothing_are_suspicious() {
    let f = WorkerFixture::new(
        "rules:\n  - role: implementer\n    actions:\n      - shell: git commit -q --allow-empty -m nothing\n      - verdict: {verdict: pass, detail: done}\n",
    );
    let out = run(&f.spec("task-001", "implementer")).await;
    assert_eq!(out.verdict, Verdict::Pass);
    assert_eq!(out.commits.len(), 1, "{out:?}");
    assert_eq!(
        out.suspicious.as_deref(),
        Some("implementer reported pass but its commits change nothing")
    );
}

#[tokio::test]
async fn stale_result_file_is_removed_before_start() {
    let f = WorkerFixture::new("rules:\n  - role: verifier\n    actions:\n      - print: nothing\n");
    let spec = f.spec("task-001", "verifier");
    std::fs::write(
        spec.worktree.join(".worker-result.json"),
        r#"{"verdict":"pass","findings":0,"detail":"left by the pm"}"#,
    )
    .expect("stale file");
    let out = run(&spec).await;
    assert_eq!(out.verdict, Verdict::Error, "a stale file must not pass: {out:?}");
}

#[tokio::test]
async fn grandchildren_do_not_outlive_the_worker() {
    let f = WorkerFixture::new(
        r#"
rules:
  - role: verifier
    actions:
      - spawn_grandchild: {sleep: 120, pidfile: "${HOME}/grandchild.pid"}
      - verdict: {verdict: pass}
"#,
    );
    let started = Instant::now();
    let out = run(&f.spec("task-001", "verifier")).await;
    assert_eq!(out.verdict, Verdict::Pass, "{out:?}");
    let pid = read_pid(&f.env.home().join("grandchild.pid"));
    assert!(process_dead(pid), "grandchild {pid} survived the worker");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn cancellation_kills_the_whole_group() {
    let f = WorkerFixture::new(
        r#"
rules:
  - role: implementer
    actions:
      - write: {path: partial.txt, content: "half done\n"}
      - spawn_grandchild: {sleep: 120, pidfile: "${HOME}/grandchild.pid"}
      - sleep: 120
"#,
    );
    let spec = f.spec("task-001", "implementer");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(async move { run_worker(&spec, rx).await });
    let pidfile = f.env.home().join("grandchild.pid");
    assert!(wait_for_file(&pidfile, Duration::from_secs(20)).await);
    tx.send(true).expect("send cancel");
    let out = task.await.expect("join");
    assert_eq!(out.verdict, Verdict::Error, "{out:?}");
    assert_eq!(out.detail, "cancelled");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(process_dead(out.pgid.expect("pgid")), "agent survived");
    assert!(process_dead(read_pid(&pidfile)), "grandchild survived");
    // What the agent wrote is kept on its branch.
    assert_eq!(out.commits.len(), 1, "{out:?}");
}

#[tokio::test]
async fn cancelled_before_start_starts_nothing() {
    let f =
        WorkerFixture::new("rules:\n  - role: verifier\n    actions:\n      - env_dump: \"${HOME}/ran\"\n");
    let spec = f.spec("task-001", "verifier");
    let (_tx, rx) = tokio::sync::watch::channel(true);
    let out = run_worker(&spec, rx).await;
    assert_eq!(out.verdict, Verdict::Error);
    assert_eq!(out.detail, "cancelled");
    assert!(!f.env.home().join("ran").exists());
}

#[tokio::test]
async fn environment_is_an_allowlist() {
    let f = WorkerFixture::new(
        "rules:\n  - role: verifier\n    actions:\n      - env_dump: \"${HOME}/env.txt\"\n      - verdict: {verdict: pass}\n",
    );
    let mut spec = f.spec("task-001", "verifier");
    let mut parent = f.parent_env();
    for (k, v) in [
        ("GITHUB_TOKEN", "canary-github-token"),
        ("GH_TOKEN", "canary-gh-token"),
        ("HYPERLOOP_APP_PRIVATE_KEY", "canary-private-key"),
        ("MATRIX_ACCESS_TOKEN", "canary-matrix"),
        ("ROOM_BOT_TOKEN", "canary-configured-secret"),
        ("AWS_SECRET_ACCESS_KEY", "canary-aws"),
        ("ANTHROPIC_API_KEY", "sk-ant-passes"),
        ("MY_TOOL_SETTING", "on"),
        ("HYPERLOOP_ROLE", "spoofed"),
    ] {
        parent.push((k.into(), v.into()));
    }
    spec.parent_env = Some(parent);
    spec.agent_env.extend(
        ["MY_TOOL_SETTING", "GITHUB_TOKEN", "ROOM_BOT_TOKEN"]
            .iter()
            .map(|s| s.to_string()),
    );
    spec.secret_env = vec!["ROOM_BOT_TOKEN".into()];
    let out = run(&spec).await;
    assert_eq!(out.verdict, Verdict::Pass, "{out:?}");
    let dump = std::fs::read_to_string(f.env.home().join("env.txt")).expect("env dump");
    assert!(
        !dump.contains("canary"),
        "a credential reached the agent:\n{dump}"
    );
    let vars: BTreeMap<&str, &str> = dump.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(vars.get("ANTHROPIC_API_KEY"), Some(&"sk-ant-passes"));
    assert_eq!(vars.get("MY_TOOL_SETTING"), Some(&"on"));
    assert_eq!(vars.get("HYPERLOOP_ROLE"), Some(&"verifier"));
    assert_eq!(vars.get("HYPERLOOP_TASK_ID"), Some(&"task-001"));
    assert_eq!(vars.get("HYPERLOOP_SPEC_REF"), Some(&"specs/a.md"));
    assert_eq!(vars.get("HYPERLOOP_ROUND"), Some(&"0"));
    assert_eq!(vars.get("HYPERLOOP_BRANCH"), Some(&"worker/task-001"));
    assert_eq!(vars.get("HYPERLOOP_BASE_BRANCH"), Some(&"main"));
    assert_eq!(vars.get("HYPERLOOP_NONCE"), Some(&"n0nce"));
    let result_file = spec.worktree.join(".worker-result.json");
    assert_eq!(
        vars.get("HYPERLOOP_RESULT_FILE"),
        Some(&result_file.to_str().expect("utf8"))
    );
    let prompt_file = spec.prompt_file();
    assert_eq!(
        vars.get("HYPERLOOP_PROMPT_FILE"),
        Some(&prompt_file.to_str().expect("utf8"))
    );
    for name in vars.keys() {
        assert!(
            ["PATH", "HOME", "LANG", "ANTHROPIC_API_KEY", "MY_TOOL_SETTING"].contains(name)
                || name.starts_with("HYPERLOOP_")
                || name.starts_with("GIT_")
                || *name == "TZ"
                || *name == "PWD",
            "unexpected variable {name}"
        );
    }
}

#[tokio::test]
async fn stream_json_cost_is_read() {
    let f = WorkerFixture::new(
        r#"
rules:
  - role: verifier
    actions:
      - stream_json_result: {cost_usd: 0.1234, num_turns: 3}
      - verdict: {verdict: pass}
"#,
    );
    let out = run(&f.spec("task-001", "verifier")).await;
    assert_eq!(out.verdict, Verdict::Pass, "{out:?}");
    assert_eq!(out.cost_usd, Some(0.1234));
    assert_eq!(out.num_turns, Some(3));
    assert_eq!(out.is_error, Some(false));
    assert_eq!(out.session_id.as_deref(), Some("scripted-task-001-verifier-r0"));
    let log = std::fs::read_to_string(&out.log_file).expect("log");
    assert!(log.contains("\"type\":\"result\""), "{log}");
}

#[tokio::test]
async fn attempts_let_a_script_fail_then_pass() {
    let f = WorkerFixture::new(
        r#"
rules:
  - role: verifier
    attempt: 0
    actions:
      - verdict: {verdict: fail, findings: 1, detail: "first try"}
  - role: verifier
    actions:
      - verdict: {verdict: pass, detail: "second try"}
"#,
    );
    let spec = f.spec("task-001", "verifier");
    assert_eq!(run(&spec).await.verdict, Verdict::Fail);
    assert_eq!(run(&spec).await.verdict, Verdict::Pass);
    assert_eq!(run(&spec).await.verdict, Verdict::Pass);
}

// --- worktrees -------------------------------------------------------------------------------

#[test]
fn task_worktree_is_created_reused_and_never_reset() {
    let f = WorkerFixture::new("rules: []\n");
    let wt = f.worktree("task-001");
    assert!(wt.ends_with(".hyperloop/worktrees/task-001"));
    assert_eq!(
        f.git_in(&wt, &["symbolic-ref", "HEAD"]),
        "refs/heads/worker/task-001"
    );
    std::fs::write(wt.join("work.txt"), "agent work\n").expect("write");
    f.git_in(&wt, &["add", "work.txt"]);
    f.git_in(&wt, &["commit", "-q", "-m", "agent commit"]);
    let tip = f.git_in(&wt, &["rev-parse", "HEAD"]);

    // The base moves on; the task branch keeps its commits.
    f.repo.write("other.txt", "x\n");
    f.git_in(&f.repo.path, &["add", "other.txt"]);
    f.git_in(&f.repo.path, &["commit", "-q", "-m", "main moves"]);
    let new_base = f.git_in(&f.repo.path, &["rev-parse", "HEAD"]);
    let again = ensure_task_worktree(
        &f.git,
        &f.repo.path,
        "task-001",
        "specs/a.md",
        "worker/task-001",
        ("main", &new_base),
    )
    .expect("reuse");
    assert_eq!(again, wt);
    assert_eq!(f.git_in(&wt, &["rev-parse", "HEAD"]), tip);

    // Local ignores, not the user's .gitignore.
    let exclude = std::fs::read_to_string(f.repo.path.join(".git/info/exclude")).expect("exclude");
    for line in [
        "/.hyperloop/worktrees/",
        "/.hyperloop/logs/",
        "/.hyperloop/state/",
        "/.worker-result.json",
    ] {
        assert_eq!(
            exclude.lines().filter(|l| *l == line).count(),
            1,
            "{line} in\n{exclude}"
        );
    }
    assert!(!f.repo.path.join(".gitignore").exists());
    assert_eq!(f.git_in(&f.repo.path, &["status", "--porcelain"]), "");
}

#[test]
fn stale_worktrees_are_repaired() {
    let f = WorkerFixture::new("rules: []\n");
    let wt = f.worktree("task-001");
    std::fs::write(wt.join("a.txt"), "1\n").expect("write");
    f.git_in(&wt, &["add", "a.txt"]);
    f.git_in(&wt, &["commit", "-q", "-m", "agent commit"]);
    let tip = f.git_in(&wt, &["rev-parse", "HEAD"]);
    // A dead agent's commit in its checkout is taken into the repository by the next worker's
    // preparation.
    let wt = f.worktree("task-001");
    assert_eq!(f.git_in(&f.repo.path, &["rev-parse", "worker/task-001"]), tip);

    // Directory deleted behind git's back.
    std::fs::remove_dir_all(&wt).expect("rm");
    let wt = f.worktree("task-001");
    assert_eq!(f.git_in(&wt, &["rev-parse", "HEAD"]), tip);

    // A leftover directory that is no checkout.
    std::fs::remove_dir_all(&wt).expect("rm");
    std::fs::create_dir_all(wt.join("junk")).expect("mkdir");
    std::fs::write(wt.join("junk/file"), "x").expect("write");
    let wt = f.worktree("task-001");
    assert_eq!(f.git_in(&wt, &["rev-parse", "HEAD"]), tip);
    assert!(!wt.join("junk").exists());

    // A lock file and uncommitted work of a dead agent.
    let gitdir = f.git_in(&wt, &["rev-parse", "--absolute-git-dir"]);
    std::fs::write(std::path::Path::new(&gitdir).join("index.lock"), "").expect("lock");
    std::fs::write(wt.join("a.txt"), "2\n").expect("write");
    std::fs::write(wt.join("b.txt"), "new\n").expect("write");
    let wt = f.worktree("task-001");
    assert!(wt.join("b.txt").exists());
    assert_eq!(f.git_in(&f.repo.path, &["show", "worker/task-001:b.txt"]), "new");

    remove_worktree(&f.git, &wt).expect("remove");
    assert!(!wt.exists());
    assert!(f.git_in(&f.repo.path, &["rev-parse", "worker/task-001"]).len() == 40);
}

/// Workers make their tasks' first worktrees on their own threads while the step removes merged
/// tasks' worktrees and branches: git's worktree commands read every worktree's files and failed
/// on one being made ("failed to read .git/worktrees/…/commondir"), which left merged branches
/// behind.
#[test]
fn worktrees_made_on_threads_while_others_are_removed() {
    let f = WorkerFixture::new("rules: []\n");
    let old: Vec<String> = (0..12).map(|i| format!("old-{i:02}")).collect();
    for id in &old {
        f.worktree(id);
    }
    let made: Vec<std::thread::JoinHandle<Vec<String>>> = (0..3)
        .map(|t| {
            let (git, root, base) = (f.git.clone(), f.repo.path.clone(), f.base.clone());
            std::thread::spawn(move || {
                (0..8)
                    .filter_map(|i| {
                        let id = format!("new-{t}-{i}");
                        ensure_task_worktree(
                            &git,
                            &root,
                            &id,
                            "specs/a.md",
                            &format!("worker/{id}"),
                            ("main", &base),
                        )
                        .err()
                        .map(|e| format!("{id}: {e}"))
                    })
                    .collect()
            })
        })
        .collect();
    let mut errors = Vec::new();
    for id in &old {
        let path = f.repo.path.join(".hyperloop/worktrees").join(id);
        let (removed, deleted) = remove_worktree_and_branch(&f.git, &path, &format!("worker/{id}"));
        errors.extend(removed.err().map(|e| format!("remove {id}: {e}")));
        errors.extend(deleted.err().map(|e| format!("delete {id}: {e}")));
    }
    for h in made {
        errors.extend(h.join().expect("thread"));
    }
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(f.git_in(&f.repo.path, &["branch", "--list", "worker/old-*"]), "");
    let listed = f.git_in(&f.repo.path, &["branch", "--list", "worker/new-*"]);
    assert_eq!(listed.lines().count(), 24, "{listed}");
    for t in 0..3 {
        for i in 0..8 {
            let wt = f.repo.path.join(format!(".hyperloop/worktrees/new-{t}-{i}"));
            assert_eq!(
                f.git_in(&wt, &["symbolic-ref", "HEAD"]),
                format!("refs/heads/worker/new-{t}-{i}")
            );
        }
    }
}

/// What a git killed while making a worktree can leave: its files half written and still marked
/// as being made. Every worktree command fails on it; the next worktree work repairs it.
#[test]
fn a_worktree_whose_creation_was_killed_is_cleared() {
    let f = WorkerFixture::new("rules: []\n");
    let admin = f.repo.path.join(".git/worktrees/task-009");
    std::fs::create_dir_all(&admin).expect("mkdir");
    std::fs::write(admin.join("locked"), "initializing\n").expect("locked");
    let gitdir = f.repo.path.join(".hyperloop/worktrees/task-009/.git");
    std::fs::write(admin.join("gitdir"), format!("{}\n", gitdir.display())).expect("gitdir");
    std::fs::write(admin.join("commondir"), "").expect("commondir");
    let listed = f
        .env
        .command("git")
        .current_dir(&f.repo.path)
        .args(["worktree", "list"])
        .output()
        .expect("git");
    assert!(!listed.status.success(), "git itself fails on it");
    let wt = f.worktree("task-001");
    assert!(wt.join(".git").exists());
    hyperloop::worker::worktree::list_worktrees(&f.git).expect("listed after repair");
    assert!(!admin.exists());
    let path = f.repo.path.join(".hyperloop/worktrees/task-001");
    let (removed, deleted) = remove_worktree_and_branch(&f.git, &path, "worker/task-001");
    assert!(removed.is_ok() && deleted.is_ok(), "{removed:?} {deleted:?}");
}

/// An agent killed in the middle of a commit leaves its branch's ref locked; the next worker of
/// the task must not fail on it.
#[test]
fn a_branch_lock_left_by_a_killed_git_is_cleared() {
    let f = WorkerFixture::new("rules: []\n");
    let wt = f.worktree("task-001");
    let path = f.repo.path.join(".hyperloop/worktrees/task-001");
    remove_worktree(&f.git, &path).expect("remove");
    assert!(!wt.exists());
    let lock = f.repo.path.join(".git/refs/heads/worker/task-001.lock");
    std::fs::write(&lock, format!("{}\n", f.base)).expect("lock");
    let again = f.worktree("task-001");
    assert!(again.join(".git").exists());
    assert!(!lock.exists());
    assert_eq!(
        f.git_in(&again, &["symbolic-ref", "HEAD"]),
        "refs/heads/worker/task-001"
    );
}

/// The same after the agent itself: its work, left uncommitted behind a lock of its branch, is
/// still committed.
#[tokio::test]
async fn a_branch_lock_left_by_the_agent_does_not_lose_its_work() {
    let f = WorkerFixture::new(
        "rules:\n  - role: implementer\n    actions:\n      - shell: 'echo work > work.txt && touch \"$(git rev-parse --path-format=absolute --git-common-dir)/refs/heads/worker/task-001.lock\"'\n      - verdict: {verdict: pass, detail: done}\n",
    );
    let out = run(&f.spec("task-001", "implementer")).await;
    assert_eq!(out.verdict, Verdict::Pass, "{out:?}");
    assert_eq!(out.commits.len(), 1, "{out:?}");
    assert!(!f.repo.path.join(".git/refs/heads/worker/task-001.lock").exists());
}

/// A git killed while it rewrote packed-refs leaves its lock: branch deletion clears it.
#[test]
fn a_packed_refs_lock_left_by_a_killed_git_does_not_stop_cleanup() {
    let f = WorkerFixture::new("rules: []\n");
    f.worktree("task-001");
    let lock = f.repo.path.join(".git/packed-refs.lock");
    std::fs::write(&lock, "").expect("lock");
    let path = f.repo.path.join(".hyperloop/worktrees/task-001");
    let (removed, deleted) = remove_worktree_and_branch(&f.git, &path, "worker/task-001");
    assert!(removed.is_ok() && deleted.is_ok(), "{removed:?} {deleted:?}");
    assert_eq!(
        f.git_in(&f.repo.path, &["branch", "--list", "worker/task-001"]),
        ""
    );
    assert!(!lock.exists());
}

/// A git killed in the middle of the agent's commit can also leave the worktree's HEAD locked.
#[tokio::test]
async fn a_head_lock_left_by_the_agent_does_not_lose_its_work() {
    let f = WorkerFixture::new(
        "rules:\n  - role: implementer\n    actions:\n      - shell: 'echo work > work.txt && touch \"$(git rev-parse --absolute-git-dir)/HEAD.lock\"'\n      - verdict: {verdict: pass, detail: done}\n",
    );
    let out = run(&f.spec("task-001", "implementer")).await;
    assert_eq!(out.verdict, Verdict::Pass, "{out:?}");
    assert_eq!(out.commits.len(), 1, "{out:?}");
    assert!(!f.repo.path.join(".git/worktrees/task-001/HEAD.lock").exists());
}

#[test]
fn base_worktree_is_detached_and_clean() {
    let f = WorkerFixture::new("rules: []\n");
    let wt = ensure_base_worktree(&f.git, &f.repo.path, "intake", &f.base).expect("base worktree");
    assert!(wt.ends_with(".hyperloop/worktrees/.base/intake"));
    assert_eq!(f.git_in(&wt, &["rev-parse", "HEAD"]), f.base);
    assert!(
        f.env
            .command("git")
            .current_dir(&wt)
            .args(["symbolic-ref", "-q", "HEAD"])
            .status()
            .is_ok_and(|s| !s.success())
    );
    std::fs::write(wt.join("README.md"), "dirty\n").expect("write");
    std::fs::write(wt.join("stray.txt"), "x\n").expect("write");
    let again = ensure_base_worktree(&f.git, &f.repo.path, "intake", "main").expect("reuse");
    assert_eq!(again, wt);
    assert_eq!(
        f.git_in(&wt, &["status", "--porcelain", "--untracked-files=all"]),
        ""
    );
    assert!(ensure_base_worktree(&f.git, &f.repo.path, "../evil", "main").is_err());
}

#[tokio::test]
async fn demo_pm_writes_task_files_in_a_base_worktree() {
    let f = WorkerFixture::new(
        r#"
rules:
  - role: pm
    actions:
      - pm_tasks_from_specs: true
      - verdict: {verdict: pass}
"#,
    );
    f.repo.write("specs/alpha.md", "# Alpha feature\n\nDo alpha.\n");
    f.repo
        .write("specs/nested/beta.md", "# Beta: \"quoted\"\n\nDo beta.\n");
    f.repo.write("specs/tasks/task-007.md", "---\nid: task-007\ntitle: Old\nspec_ref: specs/old.md\nstatus: complete\nphase: null\ndeps: []\nround: 0\nbranch: null\npr: null\n---\nold\n");
    f.repo.write("specs/old.md", "# Old\n");
    f.git_in(&f.repo.path, &["add", "-A"]);
    f.git_in(&f.repo.path, &["commit", "-q", "-m", "specs"]);
    let head = f.git_in(&f.repo.path, &["rev-parse", "HEAD"]);
    let wt = ensure_base_worktree(&f.git, &f.repo.path, "intake", &head).expect("base");
    let mut spec = f.spec("task-001", "pm");
    spec.task_id = "intake".into();
    spec.worktree = wt.clone();
    spec.spec_ref = "specs".into();
    spec.detached = true;
    let out = run(&spec).await;
    assert_eq!(out.verdict, Verdict::Pass, "{out:?}");
    assert_eq!(out.commits.len(), 1);
    let alpha = std::fs::read_to_string(wt.join("specs/tasks/task-008.md")).expect("task-008");
    assert!(
        alpha.starts_with(
            "---\nid: task-008\ntitle: \"Alpha feature\"\nspec_ref: specs/alpha.md\nstatus: not-started\n"
        ),
        "{alpha}"
    );
    assert!(alpha.contains("Do alpha."));
    let beta = std::fs::read_to_string(wt.join("specs/tasks/task-009.md")).expect("task-009");
    assert!(
        beta.contains("title: \"Beta: \\\"quoted\\\"\"\nspec_ref: specs/nested/beta.md"),
        "{beta}"
    );
    let msg = commit_message(&f, &wt, "HEAD");
    assert!(msg.contains("Task-Ref: intake"), "{msg}");
    assert!(!wt.join("specs/tasks/task-010.md").exists());
}
