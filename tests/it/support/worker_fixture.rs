//! A repository with one task worktree and a worker spec pointing the scripted agent at a script.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyperloop::git::Git;
use hyperloop::worker::worktree::worker_log_path;
use hyperloop::worker::{WorkerOutcome, WorkerSpec, ensure_task_worktree, run_worker};

use crate::harness::{TestEnv, TestRepo, scripted_agent_bin};

/// Variables the agent needs to commit in the hermetic world.
pub const GIT_ENV: &[&str] = &[
    "GIT_CONFIG_GLOBAL",
    "GIT_CONFIG_NOSYSTEM",
    "GIT_AUTHOR_DATE",
    "GIT_COMMITTER_DATE",
    "TZ",
];

pub struct WorkerFixture {
    pub env: TestEnv,
    pub repo: TestRepo,
    pub git: Git,
    pub script: PathBuf,
    pub base: String,
}

impl WorkerFixture {
    /// A repository and a scripted-agent script with `script` as its text.
    pub fn new(script: &str) -> Self {
        let env = TestEnv::new();
        let repo = env.repo("repo");
        let git = hermetic_git(&env, &repo.path);
        let base = git.rev_parse("HEAD").expect("rev-parse").expect("HEAD");
        let script_path = env.root().join("script.yaml");
        std::fs::write(&script_path, script).expect("write script");
        WorkerFixture {
            env,
            repo,
            git,
            script: script_path,
            base,
        }
    }

    /// The task's worktree on `worker/<task>`, created on first use.
    pub fn worktree(&self, task: &str) -> PathBuf {
        ensure_task_worktree(
            &self.git,
            &self.repo.path,
            task,
            "specs/a.md",
            &format!("worker/{task}"),
            ("main", &self.base),
        )
        .expect("task worktree")
    }

    /// The hermetic environment as a worker's parent environment.
    pub fn parent_env(&self) -> Vec<(OsString, OsString)> {
        self.env
            .envs()
            .into_iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    /// A spec that runs the scripted agent for `task` in `role`, with generous limits.
    pub fn spec(&self, task: &str, role: &str) -> WorkerSpec {
        let worktree = self.worktree(task);
        WorkerSpec {
            task_id: task.into(),
            role: role.into(),
            spec_ref: "specs/a.md".into(),
            round: 0,
            branch: format!("worker/{task}"),
            base_branch: "main".into(),
            worktree,
            prompt: format!("# Prompt for {task}\n\nDo the {role} work.\n"),
            command: vec![
                scripted_agent_bin().display().to_string(),
                "--script".into(),
                self.script.display().to_string(),
            ],
            agent_env: GIT_ENV.iter().map(|s| s.to_string()).collect(),
            worker_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(60),
            log_file: worker_log_path(&self.repo.path, task, role, 0),
            nonce: "n0nce".into(),
            base_commit: Some(self.base.clone()),
            secret_env: Vec::new(),
            parent_env: Some(self.parent_env()),
            known_head: None,
            import_into: Some(hermetic_git(&self.env, &self.repo.path)),
            detached: false,
            supervisor: None,
        }
    }

    /// `git` in `dir` (test assertions).
    pub fn git_in(&self, dir: &Path, args: &[&str]) -> String {
        self.env.git(dir, args)
    }
}

/// The library's git door, pointed at the hermetic configuration.
pub fn hermetic_git(env: &TestEnv, dir: &Path) -> Git {
    let mut git = Git::new(dir);
    for (k, v) in env.envs() {
        if k != "PATH" {
            git = git.with_env(k, v);
        }
    }
    git
}

/// Runs a worker with a cancellation channel nobody flips.
pub async fn run(spec: &WorkerSpec) -> WorkerOutcome {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let outcome = run_worker(spec, rx).await;
    drop(tx);
    outcome
}

/// True when `pid` is gone or only a zombie waiting to be reaped.
pub fn process_dead(pid: i32) -> bool {
    match hyperloop::worker::process::proc_state(pid) {
        None => true,
        Some((state, _)) => state == 'Z' || state == 'X',
    }
}

/// Reads a pid written by the scripted agent's `spawn_grandchild`.
pub fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .parse()
        .expect("pid")
}

/// Waits (up to `limit`) for a file to appear.
pub async fn wait_for_file(path: &Path, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|s| !s.trim().is_empty()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
