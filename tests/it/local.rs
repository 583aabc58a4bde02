//! `hyperloop step` and `run` in local mode, end to end: real repositories, the real binary, and
//! the scripted agent as a real worker process.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::harness::{DEMO_RULES, GATED_PROCESS, TestEnv, TestRepo, describe, scripted_agent_bin};

/// A repository set up for hyperloop with a scripted agent.
#[derive(Debug)]
pub struct Project {
    pub env: TestEnv,
    pub repo: TestRepo,
    pub script: PathBuf,
}

impl Project {
    /// `rules` are script rules placed before the demo's defaults (first match wins).
    pub fn new(rules: &str, extra_config: &str) -> Project {
        let env = TestEnv::new();
        let repo = env.repo("project");
        let script = env.root().join("agent-script.yaml");
        std::fs::write(&script, format!("rules:\n{rules}\n{DEMO_RULES}")).expect("script");
        let config = format!(
            "runtime:\n  max_workers: 2\n  agent_command: [\"{}\", \"--script\", \"{}\"]\n  worker_timeout: 60\n  stall_timeout: 30\npoll_interval: 0\nmax_cycles: 10\nobservability:\n  log_format: json\n{extra_config}",
            scripted_agent_bin().display(),
            script.display()
        );
        repo.write(".hyperloop.yaml", &config);
        env.git(&repo.path, &["add", "-A"]);
        env.git(&repo.path, &["commit", "-qm", "hyperloop config"]);
        Project { env, repo, script }
    }

    /// Makes `process` the process, through the in-repo overlay.
    pub fn use_process(&self, process: &str) {
        self.repo.write_process_overlay(process);
        let cfg = self.repo.read(".hyperloop.yaml");
        self.repo
            .write(".hyperloop.yaml", &format!("overlay: .hyperloop/agents\n{cfg}"));
    }

    /// Replaces the configuration's `max_workers: 2`.
    pub fn set_max_workers(&self, n: usize) {
        let cfg = self.repo.read(".hyperloop.yaml");
        self.repo.write(
            ".hyperloop.yaml",
            &cfg.replace("max_workers: 2", &format!("max_workers: {n}")),
        );
    }

    pub fn commit_all(&self, message: &str) {
        self.env.git(&self.repo.path, &["add", "-A"]);
        self.env.git(&self.repo.path, &["commit", "-qm", message]);
    }

    pub fn hyperloop(&self, args: &[&str]) -> Output {
        let mut all = vec!["--path", self.repo.path_str()];
        all.extend_from_slice(args);
        self.env.hyperloop(&all)
    }

    pub fn status(&self) -> Vec<Value> {
        let out = self.hyperloop(&["status", "--json"]);
        assert!(out.status.success(), "{}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("status json");
        v["tasks"].as_array().cloned().unwrap_or_default()
    }

    pub fn task(&self, id: &str) -> Value {
        self.status()
            .into_iter()
            .find(|t| t["id"] == id)
            .unwrap_or_else(|| panic!("no task {id}"))
    }

    pub fn git(&self, args: &[&str]) -> String {
        self.env.git(&self.repo.path, args)
    }

    pub fn write_task(&self, id: &str, spec: &str, deps: &[&str]) {
        let deps = if deps.is_empty() {
            "[]".to_string()
        } else {
            format!("[{}]", deps.join(", "))
        };
        self.repo.write(
            &format!("specs/tasks/{id}.md"),
            &format!(
                "---\nid: {id}\ntitle: Task {id}\nspec_ref: {spec}\nstatus: not-started\nphase: null\ndeps: {deps}\nround: 0\nbranch: null\npr: null\n---\nImplement {id}.\n"
            ),
        );
    }
}

/// The JSON events a command printed on standard error.
pub fn events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

pub fn named<'a>(evs: &'a [Value], name: &str) -> Vec<&'a Value> {
    evs.iter().filter(|e| e["event"] == name).collect()
}

fn assert_clean_tree(p: &Project) {
    let status = p.git(&["status", "--porcelain"]);
    assert_eq!(status, "", "the user's working tree is clean");
}

#[test]
fn one_spec_becomes_merged_verified_code() {
    let p = Project::new("", "");
    p.repo.write("specs/greeting.md", "# Greeting\n\nSay hello.\n");
    p.commit_all("spec");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    assert_eq!(named(&evs, "intake_ran").len(), 1);
    assert_eq!(named(&evs, "merge_attempted").len(), 1);
    assert!(
        !named(&evs, "task_completed").is_empty(),
        "task_completed fires for merge-pr pipelines"
    );

    let tasks = p.status();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let t = &tasks[0];
    assert_eq!(t["status"], "complete");
    assert_eq!(t["spec_ref"], "specs/greeting.md");
    let id = t["id"].as_str().expect("id");

    // The implementation reached main in one squash commit with the trailers.
    let main_files = p.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(main_files.contains(&format!("impl/{id}.md")), "{main_files}");
    assert!(
        !main_files.contains(".worker-result.json"),
        "the result file never reaches main"
    );
    let log = p.git(&["log", "--format=%s%n%b%n--", "main"]);
    let merge = log
        .split("--\n")
        .find(|c| c.contains(&format!("({id})")))
        .expect("squash commit");
    assert!(merge.contains("Spec-Ref: specs/greeting.md"), "{merge}");
    assert!(merge.contains(&format!("Task-Ref: {id}")), "{merge}");
    // Every commit hyperloop made on main carries trailers.
    for c in log.split("--\n").filter(|c| c.starts_with("hyperloop:")) {
        assert!(c.contains("Task-Ref: "), "commit without trailers: {c}");
    }
    // The branch is gone (delete_branch), and the checkout followed along, clean.
    assert_eq!(p.git(&["branch", "--list", "worker/*"]), "");
    assert_clean_tree(&p);
    assert!(
        p.repo.path.join(format!("impl/{id}.md")).exists(),
        "checkout follows main"
    );
}

#[test]
fn unchanged_repo_runs_no_intake_and_commits_nothing() {
    let p = Project::new("", "");
    p.repo.write("specs/greeting.md", "# Greeting\n");
    p.commit_all("spec");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let before = p.git(&["rev-parse", "main"]);
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        named(&events(&out), "intake_ran").is_empty(),
        "no intake for unchanged specs"
    );
    assert!(named(&events(&out), "worker_spawned").is_empty());
    assert_eq!(
        p.git(&["rev-parse", "main"]),
        before,
        "an idle step makes no commit"
    );

    // A changed spec is taken in again.
    p.repo.write("specs/greeting.md", "# Greeting\n\nNow louder.\n");
    p.commit_all("spec change");
    let out = p.hyperloop(&["step"]);
    assert_eq!(named(&events(&out), "intake_ran").len(), 1, "{}", describe(&out));
}

#[test]
fn dependencies_are_respected() {
    let p = Project::new("", "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.write_task("task-002", "specs/a.md", &["task-001"]);
    p.write_task("task-003", "specs/a.md", &["task-002"]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    let order: Vec<String> = evs
        .iter()
        .filter(|e| {
            e["event"] == "worker_spawned" && e["role"] == "implementer" || e["event"] == "merge_attempted"
        })
        .map(|e| {
            format!(
                "{}:{}",
                e["event"].as_str().unwrap_or(""),
                e["task_id"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            "worker_spawned:task-001",
            "merge_attempted:task-001",
            "worker_spawned:task-002",
            "merge_attempted:task-002",
            "worker_spawned:task-003",
            "merge_attempted:task-003",
        ]
    );
    assert!(
        named(&evs, "intake_ran").is_empty(),
        "specs named by tasks count as taken in"
    );
}

#[test]
fn verifier_failure_loops_back_with_findings_then_passes() {
    let rules = r#"
  - role: verifier
    attempt: 0
    actions:
      - verdict: {verdict: fail, findings: 2, detail: "tests are missing"}
"#;
    let p = Project::new(rules, "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    let looped = named(&evs, "task_looped_back");
    assert_eq!(looped.len(), 1, "{}", describe(&out));
    assert_eq!(looped[0]["round"], 1);
    let t = p.task("task-001");
    assert_eq!(t["status"], "complete");
    assert_eq!(t["round"], 1);
    // The implementer's second round saw the findings in its prompt... and the review was kept.
    let review = p.git(&["show", "main:specs/reviews/task-001-round-0.md"]);
    assert!(
        review.contains("tests are missing") && review.contains("fail"),
        "{review}"
    );
    // Two implementer runs, two verifier runs.
    let spawned: Vec<_> = named(&evs, "worker_spawned")
        .into_iter()
        .map(|e| e["role"].clone())
        .collect();
    assert_eq!(
        spawned.iter().filter(|r| *r == "implementer").count(),
        2,
        "{spawned:?}"
    );
    assert_eq!(
        spawned.iter().filter(|r| *r == "verifier").count(),
        2,
        "{spawned:?}"
    );
    // The process improver ran after the failure.
    assert_eq!(named(&evs, "process_improver_ran").len(), 1);
}

#[test]
fn round_limit_fails_the_task_blocks_dependents_and_merges_the_rest() {
    let rules = r#"
  - role: verifier
    task: task-001
    actions:
      - verdict: {verdict: fail, findings: 1, detail: "still wrong"}
"#;
    let p = Project::new(rules, "max_task_rounds: 2\n");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.write_task("task-002", "specs/a.md", &["task-001"]);
    p.write_task("task-003", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let t1 = p.task("task-001");
    assert_eq!(t1["status"], "failed");
    assert!(
        t1["failure_reason"]
            .as_str()
            .unwrap_or("")
            .contains("max_task_rounds"),
        "{t1}"
    );
    assert_eq!(p.task("task-002")["status"], "not-started");
    assert_eq!(p.task("task-003")["status"], "complete");
    let evs = events(&out);
    let halted = named(&evs, "orchestrator_halted");
    assert_eq!(halted.len(), 1);
    assert_eq!(named(&evs, "task_failed").len(), 1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("task-002"), "blocked task reported: {stdout}");
}

#[test]
fn a_gate_waits_until_approve() {
    let p = Project::new("", "");
    p.use_process(GATED_PROCESS);
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks and gate");

    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let t = p.task("task-001");
    assert_eq!(t["status"], "in-progress");
    assert_eq!(t["phase"], "human-review");
    let table = String::from_utf8_lossy(&p.hyperloop(&["status"]).stdout).to_string();
    assert!(table.contains("human-review"), "{table}");
    // Another step does nothing while the gate is closed.
    let before = p.git(&["rev-parse", "main"]);
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(p.git(&["rev-parse", "main"]), before);
    // Approving the wrong gate, or a task that waits nowhere, is bad input.
    assert_eq!(
        p.hyperloop(&["approve", "task-001", "--gate", "other"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(p.hyperloop(&["approve", "task-999"]).status.code(), Some(2));

    let out = p.hyperloop(&["approve", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(p.task("task-001")["status"], "complete");
    assert_eq!(
        p.hyperloop(&["approve", "task-001"]).status.code(),
        Some(2),
        "nothing waits any more"
    );
}

/// The gate approves what was verified: a commit added to the task's branch after its verifier
/// passed is not merged with the approval; the task goes back to be verified, and what finally
/// merges was verified.
#[test]
fn a_branch_moved_after_verification_is_verified_again_before_it_merges() {
    let p = Project::new("", "");
    p.use_process(GATED_PROCESS);
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks and gate");
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let t = p.task("task-001");
    assert_eq!(t["phase"], "human-review");
    let verified = p.git(&["rev-parse", "worker/task-001"]);
    assert_eq!(t["verified_tip"], verified.as_str(), "{t}");

    // Someone adds a commit to the branch while it waits at the gate.
    let tree = p.git(&["rev-parse", "worker/task-001^{tree}"]);
    let sneaked = p.git(&[
        "commit-tree",
        tree.as_str(),
        "-p",
        verified.as_str(),
        "-m",
        "unreviewed",
    ]);
    p.git(&["update-ref", "refs/heads/worker/task-001", sneaked.as_str()]);
    let out = p.hyperloop(&["approve", "task-001"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let before = p.git(&["rev-parse", "main"]);
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    let refused = named(&evs, "merge_refused_unverified");
    assert_eq!(refused.len(), 1, "{}", describe(&out));
    assert_eq!(refused[0]["found"], sneaked.as_str());
    assert!(
        named(&evs, "merge_attempted")
            .iter()
            .all(|e| e["outcome"] != "merged"),
        "{}",
        describe(&out)
    );
    assert!(
        p.git(&["log", "--format=%s", "main"])
            .lines()
            .all(|l| !l.contains("(task-001)"))
    );
    assert_ne!(p.git(&["rev-parse", "main"]), before, "the loop-back is recorded");
    // Verified again (the verifier saw the new tip), it waits at the gate for a new approval.
    let t = p.task("task-001");
    assert_eq!(t["phase"], "human-review", "{t}");
    assert_eq!(t["round"], 1);
    let tip = p.git(&["rev-parse", "worker/task-001"]);
    assert_eq!(t["verified_tip"], tip.as_str());
    assert!(
        p.git(&["merge-base", "--is-ancestor", sneaked.as_str(), tip.as_str()])
            .is_empty()
    );
    p.hyperloop(&["approve", "task-001"]);
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(p.task("task-001")["status"], "complete");
}

#[test]
fn merge_strategy_merge_makes_a_merge_commit() {
    let p = Project::new("", "merge:\n  strategy: merge\n  delete_branch: false\n");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let merges = p.git(&["log", "--merges", "--format=%s", "main"]);
    assert!(merges.contains("Merge worker/task-001"), "{merges}");
    assert!(
        !p.git(&["branch", "--list", "worker/task-001"]).is_empty(),
        "delete_branch: false keeps it"
    );
    // The merge commit's second parent is the task branch.
    let parent2 = p.git(&["rev-parse", "main^2"]);
    assert_eq!(parent2, p.git(&["rev-parse", "worker/task-001"]));
}

#[test]
fn squash_makes_one_commit_per_task() {
    let p = Project::new("", "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        p.git(&["log", "--merges", "--format=%s", "main"]),
        "",
        "no merge commits"
    );
    let squash = p.git(&["log", "--format=%s", "--grep=(task-001)", "main"]);
    assert_eq!(squash.lines().count(), 1, "{squash}");
}

#[test]
fn pm_output_that_cycles_or_does_not_parse_is_rejected() {
    for (name, files) in [
        (
            "cycle",
            vec![
                (
                    "specs/tasks/task-001.md",
                    "---\nid: task-001\ntitle: A\nspec_ref: specs/a.md\nstatus: not-started\ndeps: [task-002]\n---\nA\n",
                ),
                (
                    "specs/tasks/task-002.md",
                    "---\nid: task-002\ntitle: B\nspec_ref: specs/a.md\nstatus: not-started\ndeps: [task-001]\n---\nB\n",
                ),
            ],
        ),
        (
            "malformed",
            vec![("specs/tasks/task-001.md", "---\nid: task-001\ntitle: [\n---\n")],
        ),
        (
            "misnamed",
            vec![(
                "specs/tasks/task-9.md",
                "---\nid: task-001\ntitle: A\nspec_ref: specs/a.md\nstatus: not-started\n---\n",
            )],
        ),
        (
            "unknown dep",
            vec![(
                "specs/tasks/task-001.md",
                "---\nid: task-001\ntitle: A\nspec_ref: specs/a.md\nstatus: not-started\ndeps: [task-404]\n---\n",
            )],
        ),
    ] {
        let mut rules = String::from("  - role: pm\n    actions:\n");
        for (path, content) in &files {
            rules.push_str(&format!(
                "      - write: {{path: {path}, content: {}}}\n",
                serde_json::to_string(content).expect("json")
            ));
        }
        rules.push_str("      - commit: {message: \"tasks\"}\n      - verdict: {verdict: pass}\n");
        let p = Project::new(&rules, "");
        p.repo.write("specs/a.md", "# A\n");
        p.commit_all("spec");
        let out = p.hyperloop(&["step"]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", describe(&out));
        let evs = events(&out);
        let intake = named(&evs, "intake_ran");
        assert_eq!(intake.len(), 1, "{name}");
        assert_eq!(intake[0]["success"], false, "{name}: {}", intake[0]);
        assert!(
            p.status().is_empty(),
            "{name}: nothing half-valid enters the task set"
        );
        // Only the failure counter was committed: no task file.
        assert_eq!(
            p.git(&["ls-tree", "-r", "--name-only", "main", "specs/tasks"]),
            "specs/tasks/.intake-failures.json",
            "{name}"
        );
    }
}

#[test]
fn users_uncommitted_files_survive_a_whole_run() {
    let p = Project::new("", "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    p.repo.write("README.md", "# test repo\n\nmy unsaved edit\n");
    p.repo.write("notes/todo.txt", "untracked notes\n");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(p.repo.read("README.md"), "# test repo\n\nmy unsaved edit\n");
    assert_eq!(p.repo.read("notes/todo.txt"), "untracked notes\n");
    let status = p.git(&["status", "--porcelain"]);
    assert_eq!(
        status, "M README.md\n?? notes/",
        "only the user's own changes are pending"
    );
    // hyperloop committed none of them.
    let committed = p.git(&["show", "main:README.md"]);
    assert_eq!(committed, "# test repo");
}

/// The user's `git status` takes the checkout's index lock for a moment to refresh the index; a
/// step that moves the checked-out branch at that moment waits for it instead of failing.
#[test]
fn a_git_status_running_in_the_checkout_does_not_fail_the_step() {
    let p = Project::new("", "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    let lock = p.repo.path.join(".git/index.lock");
    std::fs::write(&lock, "").expect("index.lock");
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1200));
        std::fs::remove_file(&lock).expect("release the lock");
    });
    let out = p.hyperloop(&["step"]);
    release.join().expect("released");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        p.git(&["status", "--porcelain"]),
        "",
        "the checkout follows its branch"
    );
}

/// The task cache sits in the git directory, which anything running as the user (an agent
/// included) can write: a planted entry whose content is not what its id names is not believed.
#[test]
fn a_forged_task_cache_entry_is_not_believed() {
    let p = Project::new("", "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let cache = p.repo.path.join(".git/hyperloop-task-cache");
    let text = std::fs::read_to_string(&cache).expect("a status reads through the cache");
    // Same length, so the entry still parses; only its content lies.
    let forged = text.replace("status: not-started", "status: complete   ");
    assert_ne!(forged, text);
    std::fs::write(&cache, forged).expect("plant");
    let t = p.status();
    assert_eq!(t[0]["status"], "not-started", "{t:?}");
}

#[test]
fn work_goes_to_the_base_branch_whatever_is_checked_out() {
    let p = Project::new("", "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    p.git(&["checkout", "-q", "-b", "feature"]);
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(p.git(&["rev-parse", "--abbrev-ref", "HEAD"]), "feature");
    let files = p.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(files.contains("impl/task-001.md"), "{files}");
    assert!(
        !p.repo.path.join("impl/task-001.md").exists(),
        "the feature checkout is untouched"
    );
}

#[allow(dead_code)]
fn script_path(p: &Project) -> &Path {
    &p.script
}

#[test]
fn independent_tasks_run_in_parallel_up_to_max_workers() {
    // Each implementer records when it starts and ends; with two slots, two overlap and never three.
    let log = "${HYPERLOOP_TASK_ID}";
    let rules = format!(
        r#"
  - role: implementer
    actions:
      - append: {{path: "{root}/spans.log", content: "start {log}\n"}}
      - sleep: 0.6
      - append: {{path: "{root}/spans.log", content: "end {log}\n"}}
      - implement_task: true
      - verdict: {{verdict: pass}}
"#,
        root = "${HOME}/.."
    );
    let p = Project::new(&rules, "");
    // Tasks come from intake, which runs first in the same step and must not hold a slot after.
    for name in ["a", "b", "c"] {
        p.repo.write(&format!("specs/{name}.md"), &format!("# {name}\n"));
    }
    p.commit_all("specs");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let spans = std::fs::read_to_string(p.env.root().join("spans.log")).expect("spans");
    let mut live = 0i32;
    let mut peak = 0;
    for line in spans.lines() {
        live += if line.starts_with("start") { 1 } else { -1 };
        peak = peak.max(live);
    }
    assert_eq!(peak, 2, "two workers at once, never more:\n{spans}");
    for id in ["task-001", "task-002", "task-003"] {
        assert_eq!(p.task(id)["status"], "complete");
    }
}

/// Rules for two tasks whose implementers write the same file differently; task-002 is slower,
/// so task-001 merges first and task-002 conflicts.
const CONFLICTING: &str = r#"
  - role: implementer
    task: task-002
    actions:
      - sleep: 0.8
      - write: {path: shared.txt, content: "from task-002\n"}
      - commit: {message: "task-002 writes shared.txt"}
      - verdict: {verdict: pass}
  - role: implementer
    actions:
      - write: {path: shared.txt, content: "from ${HYPERLOOP_TASK_ID}\n"}
      - commit: {message: "${HYPERLOOP_TASK_ID} writes shared.txt"}
      - verdict: {verdict: pass}
"#;

#[test]
fn a_real_conflict_is_resolved_by_the_rebase_resolver() {
    let rules = format!(
        r#"{CONFLICTING}
  - role: rebase-resolver
    actions:
      - prompt_dump: "${{HOME}}/../resolver-prompt.md"
      - shell: "git merge --no-edit {base} >/dev/null 2>&1 || {{ printf 'from task-001\nfrom task-002\n' > shared.txt && git add shared.txt && git commit -q --no-edit; }}"
      - verdict: {{verdict: pass, detail: "merged main and kept both lines"}}
"#,
        base = "main"
    );
    let p = Project::new(&rules, "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.write_task("task-002", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    let conflicts = named(&evs, "rebase_conflict");
    assert_eq!(conflicts.len(), 1, "{}", describe(&out));
    assert_eq!(conflicts[0]["task_id"], "task-002");
    assert_eq!(
        p.git(&["show", "main:shared.txt"]),
        "from task-001\nfrom task-002"
    );
    assert_eq!(p.task("task-001")["status"], "complete");
    assert_eq!(p.task("task-002")["status"], "complete");
    // The resolver was told what conflicts and what changed on the base branch.
    let prompt = std::fs::read_to_string(p.env.root().join("resolver-prompt.md")).expect("prompt dumped");
    assert!(
        prompt.contains("Conflicting files") && prompt.contains("- shared.txt"),
        "{prompt}"
    );
    assert!(prompt.contains("task-001"), "base changes listed: {prompt}");
    // One squash commit per task on main: the work reached main exactly once each.
    for id in ["task-001", "task-002"] {
        let n = p
            .git(&["log", "--format=%s", &format!("--grep=({id})"), "main"])
            .lines()
            .count();
        assert_eq!(n, 1, "{id} merged once");
    }
}

#[test]
fn a_conflict_the_resolver_cannot_fix_loops_back_and_fails_at_the_round_limit() {
    let rules = format!(
        r#"{CONFLICTING}
  - role: rebase-resolver
    actions:
      - verdict: {{verdict: fail, findings: 1, detail: "the two versions of shared.txt cannot be reconciled"}}
"#
    );
    let p = Project::new(&rules, "max_task_rounds: 2\nmax_rebase_attempts: 1\n");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.write_task("task-002", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(p.task("task-001")["status"], "complete");
    let t2 = p.task("task-002");
    assert_eq!(t2["status"], "failed", "{t2}");
    assert_eq!(
        p.git(&["show", "main:shared.txt"]),
        "from task-001",
        "main keeps the merged version"
    );
    let evs = events(&out);
    assert!(!named(&evs, "task_looped_back").is_empty(), "{}", describe(&out));
    // The branch with the agent's work is kept for a person to look at.
    assert!(!p.git(&["branch", "--list", "worker/task-002"]).is_empty());
}

#[test]
fn a_pm_that_keeps_failing_is_not_paid_forever() {
    let rules = r#"
  - role: pm
    actions:
      - verdict: {verdict: fail, detail: "cannot understand the spec"}
"#;
    let p = Project::new(rules, "");
    p.repo.write("specs/a.md", "# A\n");
    p.commit_all("spec");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let evs = events(&out);
    assert_eq!(
        named(&evs, "intake_ran").len(),
        3,
        "three attempts, then stop: {}",
        describe(&out)
    );
    assert_eq!(named(&evs, "intake_gave_up").len(), 1);
    let halted = named(&evs, "orchestrator_halted");
    assert_eq!(halted.len(), 1);
    assert!(
        halted[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("intake gave up"),
        "{}",
        halted[0]
    );
    // Another run does not pay for the pm again; a changed spec does.
    let out = p.hyperloop(&["step"]);
    assert!(
        named(&events(&out), "intake_ran").is_empty(),
        "{}",
        describe(&out)
    );
    p.repo.write("specs/a.md", "# A\n\nClearer now.\n");
    p.commit_all("clearer spec");
    let out = p.hyperloop(&["step"]);
    assert_eq!(named(&events(&out), "intake_ran").len(), 1, "{}", describe(&out));
}

#[test]
fn sigterm_between_steps_stops_run_promptly() {
    let p = Project::new("", "");
    p.use_process(
        "apiVersion: hyperloop.io/v1\nkind: Process\nmetadata:\n  name: default\npipeline:\n  - gate: human-review\n  - action: merge-pr\n",
    );
    let cfg = p
        .repo
        .read(".hyperloop.yaml")
        .replace("poll_interval: 0", "poll_interval: 60");
    p.repo.write(".hyperloop.yaml", &cfg);
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("gated task");
    let mut child = p
        .env
        .command(crate::harness::hyperloop_bin())
        .args(["--path", p.repo.path_str(), "run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run starts");
    // Wait until the first step has finished and `run` sleeps before the next one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let log = p.git(&["log", "--format=%s", "main"]);
        if log.contains("start task-001") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first step never committed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signalling the child we started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "run ignored SIGTERM between steps"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success(), "an interrupted run does not report success");
}

/// An implementer that reports $0.60 per run in claude's stream-json, and a verifier that
/// always finds something: without a cap this would spend until max_task_rounds.
const COSTLY: &str = r#"
  - role: implementer
    actions:
      - stream_json_result: {cost_usd: 0.6, num_turns: 3}
      - implement_task: true
      - verdict: {verdict: pass}
  - role: verifier
    actions:
      - verdict: {verdict: fail, findings: 1, detail: "not yet"}
"#;

#[test]
fn a_task_stops_at_its_spending_cap() {
    let p = Project::new(COSTLY, "max_task_rounds: 20\n");
    let cfg = p
        .repo
        .read(".hyperloop.yaml")
        .replace("runtime:\n", "runtime:\n  max_task_cost_usd: 1.0\n");
    p.repo.write(".hyperloop.yaml", &cfg);
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("task");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let t = p.task("task-001");
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["failure_reason"]
            .as_str()
            .unwrap_or("")
            .contains("budget exceeded"),
        "{t}"
    );
    assert!(
        (t["cost_usd"].as_f64().unwrap_or(0.0) - 1.2).abs() < 1e-9,
        "two runs recorded: {t}"
    );
    let evs = events(&out);
    let spent: Vec<_> = named(&evs, "worker_spawned")
        .into_iter()
        .filter(|e| e["role"] == "implementer")
        .collect();
    assert_eq!(
        spent.len(),
        2,
        "no implementer run after the cap: {}",
        describe(&out)
    );
    assert_eq!(named(&evs, "budget_exceeded").len(), 1);
}

#[test]
fn no_worker_starts_past_the_total_spending_cap() {
    let p = Project::new(COSTLY, "");
    let cfg = p
        .repo
        .read(".hyperloop.yaml")
        .replace("runtime:\n", "runtime:\n  max_total_cost_usd: 1.0\n")
        .replace("max_workers: 2", "max_workers: 1");
    p.repo.write(".hyperloop.yaml", &cfg);
    p.repo.write("specs/a.md", "# A\n");
    for id in ["task-001", "task-002", "task-003"] {
        p.write_task(id, "specs/a.md", &[]);
    }
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let evs = events(&out);
    let implementers = named(&evs, "worker_spawned")
        .into_iter()
        .filter(|e| e["role"] == "implementer")
        .count();
    assert_eq!(
        implementers,
        2,
        "$0.60 + $0.60 reaches the $1.00 cap: {}",
        describe(&out)
    );
    let budget = named(&evs, "budget_exceeded");
    assert!(!budget.is_empty() && budget[0]["scope"] == "total", "{budget:?}");
    // Nothing more starts in a later step either.
    let out = p.hyperloop(&["step"]);
    assert!(
        named(&events(&out), "worker_spawned").is_empty(),
        "{}",
        describe(&out)
    );
}

#[test]
fn dry_run_prints_config_process_personas_and_plan_and_changes_nothing() {
    let p = Project::new("", "");
    p.repo.write(
        ".hyperloop/agents/kustomization.yaml",
        "resources:\n  - github.com/jsell-rh/hyperloop//base?ref=v1.0.0\npatches:\n  - path: implementer-patch.yaml\n    target:\n      kind: Agent\n      name: implementer\n",
    );
    p.repo.write(
        ".hyperloop/agents/implementer-patch.yaml",
        "kind: Agent\nname: implementer\nannotations:\n  ambient.io/persona: |\n    You work on a Go API service. Test: make test.\n",
    );
    let cfg = p.repo.read(".hyperloop.yaml");
    p.repo
        .write(".hyperloop.yaml", &format!("overlay: .hyperloop/agents/\n{cfg}"));
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.write_task("task-002", "specs/a.md", &["task-001"]);
    p.commit_all("tasks and overlay");
    let before = p.git(&["rev-parse", "main"]);
    let out = p.hyperloop(&["step", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_workers: 2"), "configuration printed: {text}");
    assert!(
        text.contains("merge-pr") && text.contains("implementer") && text.contains("verifier"),
        "{text}"
    );
    assert!(
        text.contains("You work on a Go API service"),
        "the persona is shown: {text}"
    );
    assert!(text.contains("start task-001"), "the plan: {text}");
    assert!(
        !text.contains("start task-002"),
        "task-002 waits for its dependency: {text}"
    );
    assert_eq!(p.git(&["rev-parse", "main"]), before, "a dry run commits nothing");
    assert!(
        !p.repo.path.join(".hyperloop/worktrees").exists(),
        "and starts no worker"
    );
}

#[test]
fn bad_input_exits_2_naming_file_and_field() {
    let p = Project::new("", "");
    // A task file with an unknown status.
    p.repo.write(
        "specs/tasks/task-001.md",
        "---\nid: task-001\ntitle: T\nspec_ref: specs/a.md\nstatus: done\n---\n",
    );
    p.commit_all("bad task");
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("specs/tasks/task-001.md") && err.contains("status"),
        "{err}"
    );
    // A dependency cycle.
    p.repo.write(
        "specs/tasks/task-001.md",
        "---\nid: task-001\ntitle: T\nspec_ref: specs/a.md\nstatus: not-started\ndeps: [task-002]\n---\n",
    );
    p.write_task("task-002", "specs/a.md", &["task-001"]);
    p.commit_all("cycle");
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("task-001 → task-002 → task-001"), "{err}");
    // A bad configuration value.
    let cfg = p
        .repo
        .read(".hyperloop.yaml")
        .replace("max_workers: 2", "max_workers: 0");
    p.repo.write(".hyperloop.yaml", &cfg);
    // Uncommitted, a step does not see it; committed, it is an error.
    assert_eq!(p.hyperloop(&["status"]).status.code(), Some(0));
    p.commit_all("bad config");
    let out = p.hyperloop(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(".hyperloop.yaml") && err.contains("runtime.max_workers"),
        "{err}"
    );
    // A usage error.
    assert_eq!(p.hyperloop(&["step", "--no-such-flag"]).status.code(), Some(2));
}

#[test]
fn a_crashing_agent_runs_once_per_step_not_back_to_back() {
    let rules = r#"
  - role: implementer
    actions:
      - exit: 1
"#;
    let p = Project::new(rules, "max_task_rounds: 3\n");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("task");
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let spawned = named(&events(&out), "worker_spawned")
        .into_iter()
        .filter(|e| e["role"] == "implementer")
        .count();
    assert_eq!(spawned, 1, "one crash per step: {}", describe(&out));
    assert_eq!(p.task("task-001")["round"], 1);
    // `run` carries on step by step until the round limit.
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(p.task("task-001")["status"], "failed");
}

#[test]
fn a_task_file_never_gets_a_foreign_branch_deleted() {
    let p = Project::new("", "");
    p.git(&["branch", "keepme"]);
    p.repo.write("precious.txt", "unmerged work\n");
    p.git(&["checkout", "-q", "keepme"]);
    p.commit_all("precious");
    let precious = p.git(&["rev-parse", "keepme"]);
    p.git(&["checkout", "-q", "main"]);
    p.repo.write(
        "specs/tasks/task-001.md",
        "---\nid: task-001\ntitle: T\nspec_ref: specs/a.md\nstatus: complete\nbranch: keepme\n---\n",
    );
    p.repo.write("specs/a.md", "# A\n");
    p.commit_all("a complete task naming a foreign branch");
    let out = p.hyperloop(&["step"]);
    // A task's branch is derived from its id: a file that names another is invalid, and nothing
    // runs on it.
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("task-001.md") && stderr.contains("branch") && stderr.contains("worker/task-001"),
        "{stderr}"
    );
    assert_eq!(
        p.git(&["rev-parse", "keepme"]),
        precious,
        "the branch and its commit survive"
    );
}

#[test]
fn processes_an_agent_detached_into_its_own_session_are_stopped() {
    let rules = r#"
  - role: implementer
    actions:
      - shell: "setsid sh -c 'echo $$ > \"$HOME/../escaped.pid\"; exec sleep 300' </dev/null >/dev/null 2>&1 &"
      - shell: "for i in 1 2 3 4 5 6 7 8 9 10; do [ -s \"$HOME/../escaped.pid\" ] && break; sleep 0.1; done"
      - implement_task: true
      - verdict: {verdict: pass}
"#;
    let p = Project::new(rules, "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("task");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let pid: i32 = std::fs::read_to_string(p.env.root().join("escaped.pid"))
        .expect("pid written")
        .trim()
        .parse()
        .expect("a pid");
    // Give the kernel a moment to reap it.
    let gone = (0..50).any(|_| {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let dead = state.is_empty() || state.split_whitespace().nth(2) == Some("Z");
        if !dead {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        dead
    });
    assert!(gone, "the detached process {pid} outlived the step");
}

/// An agent's descendant that leaves its session, clears its environment and double-forks — and
/// then takes the step lock — is still stopped when the worker ends, so the next step runs.
#[test]
fn a_detached_descendant_with_a_cleared_environment_does_not_outlive_its_worker() {
    let rules = r#"
  - role: implementer
    actions:
      - shell: "setsid env -i /bin/sh -c '(flock \"$0/.git/hyperloop.lock\" sleep 300 </dev/null >/dev/null 2>&1 & echo $! > \"$1/escaped.pid\")' \"$HOME/../project\" \"$HOME/..\" </dev/null >/dev/null 2>&1 &"
      - shell: "for i in $(seq 1 50); do [ -s \"$HOME/../escaped.pid\" ] && break; sleep 0.1; done"
      - implement_task: true
      - verdict: {verdict: pass}
"#;
    let p = Project::new(rules, "");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("task");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let pid: i32 = std::fs::read_to_string(p.env.root().join("escaped.pid"))
        .expect("pid written")
        .trim()
        .parse()
        .expect("a pid");
    let gone = (0..50).any(|_| {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let dead = state.is_empty() || state.split_whitespace().nth(2) == Some("Z");
        if !dead {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        dead
    });
    assert!(gone, "the detached process {pid} outlived its worker");
    assert!(
        named(&events(&out), "step_skipped").is_empty(),
        "{}",
        describe(&out)
    );
    assert_eq!(p.task("task-001")["status"], "complete");
}

/// A step lock held by something that is not a hyperloop step is named, with its pid and command,
/// instead of every step being skipped in silence.
#[test]
fn a_step_lock_held_by_a_stranger_is_reported() {
    let p = Project::new("", "");
    p.repo.write("specs/a.md", "# A\n");
    p.commit_all("spec");
    let lock = p.repo.path.join(".git/hyperloop.lock");
    let mut holder = std::process::Command::new("flock")
        .arg(&lock)
        .args(["sleep", "30"])
        .spawn()
        .expect("flock");
    let held = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::fs::read_to_string("/proc/locks").is_ok_and(|l| l.contains("FLOCK"))
    });
    assert!(held);
    let out = p.hyperloop(&["step"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a hyperloop step") && stderr.contains("sleep 30"),
        "{stderr}"
    );
}

#[test]
fn a_separate_state_branch_keeps_the_base_for_code() {
    let p = Project::new("", "target:\n  state_branch: hyperloop-state\n");
    p.repo.write("specs/a.md", "# A\n\nBuild A.\n");
    p.commit_all("spec a");
    assert!(p.git(&["branch", "--list", "hyperloop-state"]).is_empty());

    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    assert_eq!(named(&evs, "state_branch_created").len(), 1, "{}", describe(&out));
    assert_eq!(named(&evs, "merge_attempted").len(), 1, "{}", describe(&out));

    // The code reached main in one squash commit; hyperloop's bookkeeping did not.
    let main_files = p.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(main_files.contains("impl/task-001.md"), "{main_files}");
    assert!(!main_files.contains("specs/tasks/"), "{main_files}");
    assert!(!main_files.contains("specs/reviews/"), "{main_files}");
    let main_log = p.git(&["log", "--format=%s", "main"]);
    assert_eq!(main_log.matches("(task-001)").count(), 1, "{main_log}");
    assert!(
        !main_log.contains("hyperloop:"),
        "state commits on main: {main_log}"
    );

    // Task state, the intake record and reviews live on the state branch, which contains main.
    let state = p.git(&["show", "hyperloop-state:specs/tasks/task-001.md"]);
    assert!(state.contains("status: complete"), "{state}");
    let state_files = p.git(&["ls-tree", "-r", "--name-only", "hyperloop-state"]);
    assert!(state_files.contains("specs/tasks/.intake.json"), "{state_files}");
    assert!(state_files.contains("specs/reviews/"), "{state_files}");
    p.git(&["merge-base", "--is-ancestor", "main", "hyperloop-state"]);
    assert_eq!(p.task("task-001")["status"], "complete");
    assert_clean_tree(&p);

    // A spec people add to main later is read from main and taken in; its task branches from
    // main and merges there.
    p.repo.write("specs/b.md", "# B\n\nBuild B.\n");
    p.commit_all("spec b");
    let dry = p.hyperloop(&["step", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", describe(&dry));
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(
        plan.contains("run intake (pm) for new or changed specs: specs/b.md"),
        "the dry run sees main's specs too: {plan}"
    );
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let tasks = p.status();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert!(tasks.iter().all(|t| t["status"] == "complete"), "{tasks:?}");
    let main_files = p.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(main_files.contains("impl/task-002.md"), "{main_files}");
    assert!(!main_files.contains("specs/tasks/"), "{main_files}");
    p.git(&["merge-base", "--is-ancestor", "main", "hyperloop-state"]);
    assert_clean_tree(&p);
}

#[test]
fn a_state_branch_merge_cut_short_is_not_merged_twice() {
    // A step that merged into main and died before recording it: the next step sees the
    // branch's changes in main already and records the completion without a second merge.
    let p = Project::new("", "target:\n  state_branch: hyperloop-state\n");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("task");
    let out = p
        .env
        .command(crate::harness::hyperloop_bin())
        .args(["--path", p.repo.path_str(), "step"])
        .env("HYPERLOOP_FAULT", "merge-after-publish:1")
        .output()
        .expect("runs");
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        p.git(&["log", "--format=%s", "main"])
            .matches("(task-001)")
            .count(),
        1
    );
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    let merges = named(&evs, "merge_attempted");
    assert_eq!(merges.len(), 1, "{}", describe(&out));
    assert_eq!(merges[0]["outcome"], "already-merged");
    assert_eq!(p.task("task-001")["status"], "complete");
    let main_log = p.git(&["log", "--format=%s", "main"]);
    assert_eq!(main_log.matches("(task-001)").count(), 1, "{main_log}");
}

#[test]
fn a_closed_gate_is_reported_once_per_step() {
    let p = Project::new("", "  log_level: debug\n");
    p.use_process(GATED_PROCESS);
    p.repo.write("specs/a.md", "# A\n");
    p.repo.write(
        "specs/tasks/task-001.md",
        "---\nid: task-001\ntitle: Task task-001\nspec_ref: specs/a.md\nstatus: in-progress\nphase: human-review\nposition: [1]\ndeps: []\nround: 1\nbranch: null\npr: null\n---\nImplement task-001.\n",
    );
    p.commit_all("a task at its gate");
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    let checks = named(&evs, "gate_checked");
    assert_eq!(checks.len(), 1, "{}", describe(&out));
    assert_eq!(checks[0]["task_id"], "task-001");
    assert_eq!(checks[0]["gate"], "human-review");
    assert_eq!(checks[0]["cleared"], Value::Bool(false));
    assert_eq!(
        checks[0]["level"].as_str().map(str::to_lowercase).as_deref(),
        Some("debug")
    );
}

/// A merge is published together with the next task's start. When someone commits to the base
/// branch meanwhile, both are replayed on top, in order, and the merge commit still merges the
/// task's branch.
#[test]
fn a_merge_and_the_next_start_are_replayed_over_a_commit_made_meanwhile() {
    let p = Project::new(
        r#"
  - role: verifier
    task: task-001
    actions:
      - shell: 'cd "${HOME}/../project" && echo mine > note.txt && git add note.txt && git commit -qm "a commit of my own"'
      - verdict: {verdict: pass, detail: "fine"}
"#,
        "merge:\n  strategy: merge\n  delete_branch: false\n",
    );
    p.set_max_workers(1);
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.write_task("task-002", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    assert!(
        !named(&evs, "state_rebased").is_empty(),
        "the race happened: {}",
        describe(&out)
    );

    let mine = p.git(&["log", "--format=%H", "--grep=a commit of my own", "main"]);
    let merge1 = p.git(&["log", "--format=%H", "--merges", "--grep=(task-001)", "main"]);
    assert_eq!(merge1.lines().count(), 1, "{merge1}");
    assert!(
        p.env
            .command("git")
            .current_dir(&p.repo.path)
            .args(["merge-base", "--is-ancestor", &mine, &merge1])
            .status()
            .expect("git")
            .success(),
        "the merge comes after the commit made meanwhile"
    );
    assert_eq!(
        p.git(&["rev-parse", &format!("{merge1}^2")]),
        p.git(&["rev-parse", "worker/task-001"])
    );
    // The start of task-002 follows the merge, as it was made.
    let after = p.git(&["log", "--format=%s", "--reverse", &format!("{merge1}..main")]);
    assert!(
        after.lines().next().is_some_and(|l| l.contains("start task-002")),
        "{after}"
    );
    assert_eq!(p.repo.read("note.txt"), "mine\n");
    for id in ["task-001", "task-002"] {
        assert_eq!(p.task(id)["status"], "complete");
    }
    assert_clean_tree(&p);
}

/// The process improver's overlay reaches the prompts that follow it in the same run, though
/// role overlays are read once per change of the prompts folder.
#[test]
fn the_improvers_overlay_reaches_the_next_prompts() {
    let dumps = tempfile::tempdir().expect("tempdir");
    let rules = format!(
        r#"
  - role: process-improver
    actions:
      - shell: "mkdir -p specs/prompts && printf 'prompt: |\n  Remember the tests the verifier asked for.\n' > specs/prompts/implementer-overlay.yaml && git add specs/prompts && git commit -qm improve"
      - verdict: {{verdict: pass, detail: "overlay written"}}
  - role: verifier
    round: 0
    actions:
      - verdict: {{verdict: fail, findings: 1, detail: "tests are missing"}}
  - role: verifier
    round: 1
    actions:
      - verdict: {{verdict: fail, findings: 1, detail: "still missing"}}
  - role: implementer
    actions:
      - shell: 'cp "$HYPERLOOP_PROMPT_FILE" "{dir}/implementer-$HYPERLOOP_ROUND.md"'
      - implement_task: true
      - verdict: {{verdict: pass, detail: "implemented"}}
"#,
        dir = dumps.path().display()
    );
    let p = Project::new(&rules, "");
    p.set_max_workers(1);
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("tasks");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(p.task("task-001")["round"], 2);
    let first = std::fs::read_to_string(dumps.path().join("implementer-0.md")).expect("round 0");
    assert!(!first.contains("Remember the tests"), "{first}");
    let last = std::fs::read_to_string(dumps.path().join("implementer-2.md")).expect("round 2");
    assert!(
        last.contains("Remember the tests the verifier asked for."),
        "{last}"
    );
}

/// `actions/checkout` persists the job token in the repository's configuration (directly, or in
/// a file the configuration includes); every agent could read it there. A step removes both.
#[test]
fn credentials_persisted_in_the_repository_config_are_removed() {
    let p = Project::new("", "");
    p.git(&[
        "config",
        "--local",
        "http.https://github.com/.extraheader",
        "AUTHORIZATION: basic eC1hY2Nlc3MtdG9rZW46Y2FuYXJ5",
    ]);
    let included = p.env.root().join("included-credentials.config");
    std::fs::write(
        &included,
        "[http \"https://example.com/\"]\n\textraheader = AUTHORIZATION: basic Y2FuYXJ5\n",
    )
    .expect("include");
    let include = included.display().to_string();
    p.git(&["config", "--local", "includeIf.gitdir:/.path", include.as_str()]);
    p.git(&[
        "config",
        "--local",
        "http.https://example.org/.extraheader",
        "X-Not-A-Credential: 1",
    ]);
    let before = p.git(&["config", "--get-regexp", "extraheader"]);
    assert_eq!(before.lines().count(), 3, "{before}");
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    assert_eq!(
        named(&evs, "persisted_credential_removed").len(),
        2,
        "{}",
        describe(&out)
    );
    let after = p.git(&["config", "--get-regexp", "extraheader"]);
    assert_eq!(
        after,
        "http.https://example.org/.extraheader X-Not-A-Credential: 1"
    );
}

/// `runtime.agent_user`: the agent runs as that user (created when missing), in a checkout it
/// owns, unable to write the repository's `.git` or read hyperloop's logs; its work still
/// merges. Needs root (or passwordless sudo) to switch users.
#[test]
fn agents_run_as_the_agent_user() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let sudo = std::process::Command::new("sudo")
        .args(["-n", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !root && !sudo {
        // Not a missing dependency but a machine that cannot switch users: said where a person
        // sees it (straight to standard error, which the harness does not capture).
        use std::io::Write as _;
        let _ = std::io::stderr().write_all(
            b"\n*** SKIPPED agents_run_as_the_agent_user: needs root or passwordless sudo to run agents as another user ***\n",
        );
        return;
    }
    let user = "hyperloop-agent-it";
    let rules = r#"
  - role: implementer
    actions:
      - shell: "id -u > \"$HOME/uid\"; id -un >> \"$HOME/uid\""
      - shell: "if touch \"$AGENT_REPO/.git/planted\" 2>/dev/null; then echo wrote-git; else echo no-git; fi >> \"$HOME/uid\""
      - shell: "if ls \"$AGENT_REPO/.hyperloop/logs\" >/dev/null 2>&1; then echo read-logs; else echo no-logs; fi >> \"$HOME/uid\""
      - shell: "cp \"$HOME/uid\" agent-was.txt"
      - implement_task: true
      - verdict: {verdict: pass}
"#;
    let p = Project::new(rules, "");
    let config = std::fs::read_to_string(p.repo.path.join(".hyperloop.yaml")).expect("config");
    p.repo.write(
        ".hyperloop.yaml",
        &config.replacen(
            "runtime:\n",
            &format!(
                "runtime:\n  agent_env: [AGENT_REPO, GIT_AUTHOR_NAME, GIT_AUTHOR_EMAIL, GIT_COMMITTER_NAME, GIT_COMMITTER_EMAIL]\n  agent_user: {user}\n"
            ),
            1,
        ),
    );
    // The test's own files must be reachable by the agent user: the scripted agent's script
    // and the repository (its objects are borrowed by the checkout).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p.env.root(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    p.repo.write("specs/a.md", "# A\n");
    p.write_task("task-001", "specs/a.md", &[]);
    p.commit_all("task");
    let out = p
        .env
        .command(crate::harness::hyperloop_bin())
        .args(["--path", p.repo.path_str(), "run"])
        .env("AGENT_REPO", &p.repo.path)
        .env("GIT_AUTHOR_NAME", "Agent")
        .env("GIT_AUTHOR_EMAIL", "agent@example.com")
        .env("GIT_COMMITTER_NAME", "Agent")
        .env("GIT_COMMITTER_EMAIL", "agent@example.com")
        .output()
        .expect("hyperloop");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(p.task("task-001")["status"], "complete");
    let seen = p.git(&["show", "main:agent-was.txt"]);
    let mut lines = seen.lines();
    let uid: u32 = lines.next().and_then(|l| l.trim().parse().ok()).expect("uid");
    assert_ne!(uid, 0, "{seen}");
    assert_eq!(lines.next(), Some(user), "{seen}");
    assert_eq!(
        lines.next(),
        Some("no-git"),
        "the agent user cannot write the repository's .git: {seen}"
    );
    assert_eq!(
        lines.next(),
        Some("no-logs"),
        "the agent user cannot read hyperloop's logs: {seen}"
    );
    assert!(!p.repo.path.join(".git/planted").exists());
}

#[test]
fn a_task_file_that_only_looks_simple_is_read_as_yaml_reads_it() {
    // The title goes on over an indented line, another ends in a comment, and a list is written
    // in flow style without quotes: a reader of `key: value` lines alone would misread all three.
    let p = Project::new("", "");
    p.repo.write("specs/a.md", "# A\n");
    p.repo.write(
        "specs/tasks/task-001.md",
        "---\nid: task-001\ntitle: Short\n  and continued\nspec_ref: specs/a.md\nstatus: complete\ndeps: []\n---\nBody.\n",
    );
    p.repo.write(
        "specs/tasks/task-002.md",
        "---\nid: task-002\ntitle: T # a comment\nspec_ref: specs/a.md\nstatus: complete\ndeps: [task-001]\n---\nBody.\n",
    );
    p.commit_all("tasks");
    let t = p.status();
    assert_eq!(t[0]["title"], "Short and continued", "{t:?}");
    assert_eq!(t[1]["title"], "T", "{t:?}");
    assert_eq!(t[1]["deps"], serde_json::json!(["task-001"]), "{t:?}");
}
