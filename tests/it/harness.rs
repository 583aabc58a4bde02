//! A hermetic test environment: temporary repositories with a bare `origin`, a fixed identity, and
//! no influence from the developer's git configuration or environment.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// Says that the calling test cannot run because `what` is missing, where a person sees it: the
/// message goes straight to standard error, which the test harness does not capture (it only
/// captures the print macros), so a plain `cargo test` shows it. With
/// `HYPERLOOP_TEST_REQUIRE_ALL=1` (as `.ci/run` sets it, after installing everything) a skip is a
/// failure instead: CI never passes with tests that did not run.
pub fn skip(what: &str, install: &str) {
    use std::io::Write as _;
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    let message = format!(
        "{test}: {what} (install it with {install}; `bash .ci/setup.sh` installs every test dependency)"
    );
    assert!(
        std::env::var("HYPERLOOP_TEST_REQUIRE_ALL").as_deref() != Ok("1"),
        "cannot run {message}"
    );
    let _ = std::io::stderr().write_all(format!("\n*** SKIPPED {message} ***\n").as_bytes());
}

/// Path of the `hyperloop` binary under test.
pub fn hyperloop_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hyperloop"))
}

/// Path of the scripted agent that stands in for an AI agent.
pub fn scripted_agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hyperloop-scripted-agent"))
}

/// One isolated world: a temp dir holding HOME, a global git config, and any repos made in it.
#[derive(Debug)]
pub struct TestEnv {
    pub dir: TempDir,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hyperloop-test-")
            .tempdir()
            .expect("tempdir");
        let env = TestEnv { dir };
        std::fs::create_dir_all(env.home()).expect("home");
        std::fs::write(
            env.gitconfig(),
            "[user]\n\tname = Test User\n\temail = test@example.com\n[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n",
        )
        .expect("gitconfig");
        env
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn home(&self) -> PathBuf {
        self.root().join("home")
    }

    /// The global git configuration; in HOME so that worker processes, which get HOME but
    /// not GIT_CONFIG_GLOBAL, see the same identity.
    pub fn gitconfig(&self) -> PathBuf {
        self.home().join(".gitconfig")
    }

    /// The environment every command in a test runs with: nothing inherited but PATH.
    pub fn envs(&self) -> Vec<(String, String)> {
        vec![
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
            ("HOME".into(), self.home().display().to_string()),
            ("GIT_CONFIG_GLOBAL".into(), self.gitconfig().display().to_string()),
            ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
            ("GIT_AUTHOR_DATE".into(), "2026-01-01T00:00:00Z".into()),
            ("GIT_COMMITTER_DATE".into(), "2026-01-01T00:00:00Z".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TZ".into(), "UTC".into()),
        ]
    }

    /// A command with the hermetic environment.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear();
        for (k, v) in self.envs() {
            cmd.env(k, v);
        }
        cmd.current_dir(self.root());
        cmd
    }

    /// `git` in `dir`, panicking on failure (test set-up only).
    pub fn git(&self, dir: &Path, args: &[&str]) -> String {
        let out = self
            .command("git")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {:?} in {} failed: {}",
            args,
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A repository `name` with one commit on `main` and a bare `origin` it has pushed to.
    pub fn repo(&self, name: &str) -> TestRepo {
        let path = self.root().join(name);
        let origin = self.root().join(format!("{name}-origin.git"));
        std::fs::create_dir_all(&path).expect("mkdir repo");
        self.git(
            self.root(),
            &[
                "init",
                "--bare",
                "-q",
                "-b",
                "main",
                origin.to_str().expect("utf8"),
            ],
        );
        self.git(&path, &["init", "-q", "-b", "main"]);
        std::fs::write(path.join("README.md"), "# test repo\n").expect("write");
        self.git(&path, &["add", "README.md"]);
        self.git(&path, &["commit", "-q", "-m", "init"]);
        self.git(
            &path,
            &["remote", "add", "origin", origin.to_str().expect("utf8")],
        );
        self.git(&path, &["push", "-q", "origin", "main"]);
        TestRepo { path, origin }
    }

    /// Runs `hyperloop` with `args` in the hermetic environment.
    pub fn hyperloop(&self, args: &[&str]) -> Output {
        self.command(hyperloop_bin())
            .args(args)
            .output()
            .expect("hyperloop runs")
    }
}

/// A repository made by [`TestEnv::repo`].
#[derive(Debug)]
pub struct TestRepo {
    pub path: PathBuf,
    pub origin: PathBuf,
}

/// The scripted agent's demo rules: every role passes, the rebase-resolver gives up.
pub const DEMO_RULES: &str = r#"
  - role: pm
    actions:
      - pm_tasks_from_specs: true
      - verdict: {verdict: pass, detail: "tasks written"}
  - role: implementer
    actions:
      - implement_task: true
      - verdict: {verdict: pass, detail: "implemented"}
  - role: verifier
    actions:
      - verdict: {verdict: pass, detail: "looks right"}
  - role: rebase-resolver
    actions:
      - verdict: {verdict: fail, detail: "cannot resolve"}
  - role: process-improver
    actions:
      - verdict: {verdict: pass, detail: "nothing to improve"}
"#;

/// The default process with a `human-review` gate before the merge.
pub const GATED_PROCESS: &str = "apiVersion: hyperloop.io/v1\nkind: Process\nmetadata:\n  name: default\npipeline:\n  - loop:\n      - role: implementer\n      - role: verifier\n  - gate: human-review\n  - action: merge-pr\n";

/// An in-repo overlay (`.hyperloop/agents`) on the built-in base that replaces its process.
pub const PROCESS_OVERLAY_KUSTOMIZATION: &str =
    "resources:\n  - github.com/jsell-rh/hyperloop//base?ref=main\npatches:\n  - path: process.yaml\n";

impl TestRepo {
    /// Writes the in-repo overlay that makes `process` the process (the config must name the
    /// overlay folder).
    pub fn write_process_overlay(&self, process: &str) {
        self.write(
            ".hyperloop/agents/kustomization.yaml",
            PROCESS_OVERLAY_KUSTOMIZATION,
        );
        self.write(".hyperloop/agents/process.yaml", process);
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, text).expect("write");
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("utf8 path")
    }
}

/// Standard output and error of a finished command, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
