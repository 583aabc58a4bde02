//! The one door to git. Everything goes through the `git` program (worktrees, merges, rebases and
//! authenticated pushes are what git itself does best, and the user's own git configuration and
//! hooks-off policy apply the same way), and every failure carries the command, the directory and
//! git's own message.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::{Error, Result};

/// Runs git commands in one directory.
#[derive(Clone)]
pub struct Git {
    dir: PathBuf,
    env: Vec<(String, String)>,
    /// Run as this user (an agent's checkout, see [`crate::worker::agent_user`]).
    user: Option<AgentUser>,
}

impl std::fmt::Debug for Git {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The environment may carry credentials (an authorization header for pushes): names only.
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Git")
            .field("dir", &self.dir)
            .field("env", &names)
            .finish()
    }
}

impl Git {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Git {
            dir: dir.into(),
            env: Vec::new(),
            user: None,
        }
    }

    /// A checkout's own repository at `dir`, and only that one: git never looks for a repository
    /// above it. A checkout lives inside the user's working tree, so a `.git` that is damaged
    /// or half made would otherwise send every command to the user's repository — checking out
    /// a task's branch over their files.
    pub fn pinned(dir: impl Into<PathBuf>) -> Self {
        let dir: PathBuf = dir.into();
        let gitdir = dir.join(".git");
        let worktree = dir.display().to_string();
        Git::new(dir)
            .with_env("GIT_DIR", gitdir.display().to_string())
            .with_env("GIT_WORK_TREE", worktree)
    }

    /// The same, run as `user` (with that user's home).
    pub fn as_user(mut self, user: AgentUser) -> Self {
        self.user = Some(user);
        self
    }

    /// The same repository, another directory (e.g. a worktree).
    pub fn at(&self, dir: impl Into<PathBuf>) -> Self {
        Git {
            dir: dir.into(),
            env: self.env.clone(),
            user: self.user.clone(),
        }
    }

    /// Adds an environment variable to every command (e.g. `GIT_INDEX_FILE`).
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn command<I, S>(&self, args: I) -> (Command, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = match &self.user {
            Some(u) if u.via_sudo => {
                let mut c = Command::new("sudo");
                c.args(["-n", "-E", "-u", u.name.as_str(), "--", "git"]);
                c
            }
            Some(u) => {
                use std::os::unix::process::CommandExt;
                let mut c = Command::new("git");
                c.uid(u.uid).gid(u.gid);
                c
            }
            None => Command::new("git"),
        };
        cmd.current_dir(&self.dir);
        scrub_env(&mut cmd);
        // Hyperloop's commits must not depend on the user's hooks, pager or editor.
        cmd.args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "core.quotepath=false",
        ]);
        cmd.env("GIT_TERMINAL_PROMPT", "0");
        cmd.env("GIT_EDITOR", "true");
        cmd.env("GIT_PAGER", "cat");
        cmd.env("LC_ALL", "C");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(u) = &self.user {
            cmd.env("HOME", &u.home);
            cmd.env("USER", &u.name);
        }
        let mut shown = Vec::new();
        for a in args {
            shown.push(a.as_ref().to_string_lossy().into_owned());
            cmd.arg(a);
        }
        (cmd, shown.join(" "))
    }

    /// Runs git and returns its output whatever the exit status.
    pub fn output<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (mut cmd, shown) = self.command(args);
        cmd.stdin(Stdio::null());
        cmd.output().map_err(|e| Error::Git {
            args: shown,
            dir: self.dir.clone(),
            stderr: format!("cannot start git: {e}"),
        })
    }

    /// Runs git with `input` on standard input; returns standard output as bytes (a pack, say).
    /// Standard input is written from a thread, so a child that answers while it reads cannot
    /// block on a full pipe.
    pub fn run_bytes<I, S>(&self, args: I, input: &[u8]) -> Result<Vec<u8>>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        use std::io::Write;
        let (mut cmd, shown) = self.command(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let err = |e: std::io::Error| Error::Git {
            args: shown.clone(),
            dir: self.dir.clone(),
            stderr: e.to_string(),
        };
        let mut child = cmd.spawn().map_err(err)?;
        let writer = child.stdin.take().map(|mut stdin| {
            let input = input.to_vec();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            })
        });
        let out = child.wait_with_output().map_err(err)?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        if out.status.success() {
            return Ok(out.stdout);
        }
        self.check(&shown, &out).map(String::into_bytes)
    }

    /// Runs git with `input` on standard input.
    pub fn run_with_input<I, S>(&self, args: I, input: &[u8]) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        use std::io::Write;
        let (mut cmd, shown) = self.command(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let err = |e: std::io::Error| Error::Git {
            args: shown.clone(),
            dir: self.dir.clone(),
            stderr: e.to_string(),
        };
        let mut child = cmd.spawn().map_err(err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input).map_err(err)?;
        }
        let out = child.wait_with_output().map_err(err)?;
        self.check(&shown, &out)
    }

    fn check(&self, shown: &str, out: &Output) -> Result<String> {
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if stderr.is_empty() {
                stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            Err(Error::Git {
                args: shown.to_string(),
                dir: self.dir.clone(),
                stderr,
            })
        }
    }

    /// Runs git; a non-zero exit is an error. Returns standard output.
    pub fn run<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (mut cmd, shown) = self.command(args);
        cmd.stdin(Stdio::null());
        let out = cmd.output().map_err(|e| Error::Git {
            args: shown.clone(),
            dir: self.dir.clone(),
            stderr: format!("cannot start git: {e}"),
        })?;
        self.check(&shown, &out)
    }

    /// Starts a [`BlobWriter`]; its scratch files go in `scratch`.
    pub fn blob_writer(&self, scratch: &Path) -> Result<BlobWriter> {
        std::fs::create_dir_all(scratch).map_err(|e| Error::io(scratch, e))?;
        let (mut cmd, shown) = self.command(["hash-object", "-w", "--no-filters", "--stdin-paths"]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|e| Error::Git {
            args: shown.clone(),
            dir: self.dir.clone(),
            stderr: format!("cannot start git: {e}"),
        })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::other("git hash-object: no pipes"));
        };
        Ok(BlobWriter {
            child,
            stdin: Some(stdin),
            stdout: std::io::BufReader::new(stdout),
            scratch: scratch.to_path_buf(),
            written: 0,
        })
    }

    /// Like [`Git::run`], trimmed.
    pub fn run_trim<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(self.run(args)?.trim().to_string())
    }

    /// True when git exits 0.
    pub fn succeeds<I, S>(&self, args: I) -> Result<bool>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(self.output(args)?.status.success())
    }

    /// The commit a ref points at, or `None` when it does not exist.
    pub fn rev_parse(&self, rev: &str) -> Result<Option<String>> {
        let out = self.output(["rev-parse", "--verify", "--quiet", &format!("{rev}^{{commit}}")])?;
        if out.status.success() {
            Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_string()))
        } else {
            Ok(None)
        }
    }

    /// The object id a revision expression names (`<commit>:<path>` for a file), or `None`.
    pub fn rev_parse_object(&self, rev: &str) -> Result<Option<String>> {
        let out = self.output(["rev-parse", "--verify", "--quiet", rev])?;
        if out.status.success() {
            Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_string()))
        } else {
            Ok(None)
        }
    }

    /// The repository's common git directory (shared by all worktrees), absolute. Asked of git
    /// once per directory and environment in a process: several parts of a step need it, and
    /// where a directory's repository keeps its git directory does not change under a step.
    pub fn common_dir(&self) -> Result<PathBuf> {
        if let Some(known) = self.known_common_dir() {
            return Ok(known);
        }
        let p = PathBuf::from(self.run_trim(["rev-parse", "--path-format=absolute", "--git-common-dir"])?);
        self.remember_common_dir(&p);
        Ok(p)
    }

    /// The top of the working tree and the common git directory, with one git process.
    pub fn toplevel_and_common_dir(&self) -> Result<(PathBuf, PathBuf)> {
        let out = self.run([
            "rev-parse",
            "--show-toplevel",
            "--path-format=absolute",
            "--git-common-dir",
        ])?;
        let mut lines = out.lines();
        let (Some(top), Some(common), None) = (lines.next(), lines.next(), lines.next()) else {
            return Err(Error::Git {
                args: "rev-parse --show-toplevel --git-common-dir".into(),
                dir: self.dir.clone(),
                stderr: format!("unexpected answer: {}", out.trim()),
            });
        };
        let (top, common) = (PathBuf::from(top), PathBuf::from(common));
        Git::new(&top).remember_common_dir(&common);
        Ok((top, common))
    }

    fn common_dir_key(&self) -> (PathBuf, Vec<(String, String)>) {
        (self.dir.clone(), self.env.clone())
    }

    fn known_common_dir(&self) -> Option<PathBuf> {
        let key = self.common_dir_key();
        COMMON_DIRS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    fn remember_common_dir(&self, common: &Path) {
        let key = self.common_dir_key();
        let mut known = COMMON_DIRS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        known.retain(|(k, _)| *k != key);
        // A step works in a handful of directories; the bound only keeps a long test process
        // from collecting every temporary repository it made.
        if known.len() >= 64 {
            known.remove(0);
        }
        known.push((key, common.to_path_buf()));
    }

    /// The top of the working tree this directory belongs to.
    pub fn toplevel(&self) -> Result<PathBuf> {
        Ok(PathBuf::from(self.run_trim(["rev-parse", "--show-toplevel"])?))
    }
}

type CommonDirs = Vec<((PathBuf, Vec<(String, String)>), PathBuf)>;

/// Common git directories already asked for, by directory and environment.
static COMMON_DIRS: std::sync::Mutex<CommonDirs> = std::sync::Mutex::new(Vec::new());

/// A command for a helper program (git, kustomize, sudo, useradd) with only the environment
/// [`git_may_see`] allows: whatever else hyperloop was started with (a notification token under
/// a name of the user's choosing, an Action's `INPUT_*` credentials) stays in this process,
/// which is not dumpable; a child is.
pub fn helper_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    scrub_env(&mut cmd);
    cmd
}

fn scrub_env(cmd: &mut Command) {
    cmd.env_clear();
    cmd.envs(std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(git_may_see)));
}

/// The environment variables a git child inherits: what locates the user's configuration and
/// identity, proxies and ssh, and git's own variables except those that inject configuration
/// (the old way to hand git a credential).
pub fn git_may_see(name: &str) -> bool {
    const BASIC: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "EMAIL",
        "LANG",
        "TMPDIR",
        "TZ",
        "XDG_CONFIG_HOME",
        "SSH_AUTH_SOCK",
        "SSH_AGENT_PID",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "SYSTEMROOT",
    ];
    if BASIC.contains(&name) || name.starts_with("LC_") {
        return true;
    }
    name.starts_with("GIT_")
        && name != "GIT_CONFIG_PARAMETERS"
        && name != "GIT_CONFIG_COUNT"
        && !name.starts_with("GIT_CONFIG_KEY_")
        && !name.starts_with("GIT_CONFIG_VALUE_")
}

/// Formats `Spec-Ref`/`Task-Ref` trailers for a commit message.
pub fn trailers(spec_ref: &str, task_ref: &str) -> String {
    format!("Spec-Ref: {spec_ref}\nTask-Ref: {task_ref}")
}

/// A long-lived `git hash-object -w --stdin-paths`: a step writes a blob for every state commit,
/// and a file write is much cheaper than a git process.
pub struct BlobWriter {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    scratch: PathBuf,
    written: u64,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("scratch", &self.scratch)
            .field("written", &self.written)
            .finish()
    }
}

impl BlobWriter {
    /// Writes `content` as a blob; returns its id. After an error the writer is not to be used
    /// again.
    pub fn write(&mut self, content: &[u8]) -> Result<String> {
        use std::io::{BufRead, Write};
        self.written += 1;
        let path = self
            .scratch
            .join(format!("blob-{}-{}", std::process::id(), self.written));
        let shown = path.to_string_lossy().into_owned();
        if shown.contains('\n') {
            return Err(Error::other("the scratch path cannot be passed on a line"));
        }
        std::fs::write(&path, content).map_err(|e| Error::io(&path, e))?;
        let asked = (|| -> std::io::Result<String> {
            let stdin = self
                .stdin
                .as_mut()
                .ok_or_else(|| std::io::Error::other("closed"))?;
            writeln!(stdin, "{shown}")?;
            stdin.flush()?;
            let mut line = String::new();
            self.stdout.read_line(&mut line)?;
            Ok(line.trim().to_string())
        })();
        let _ = std::fs::remove_file(&path);
        let oid = asked.map_err(|e| Error::io(&path, e))?;
        if oid.len() < 40 || !oid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::other(format!("git hash-object answered {oid:?}")));
        }
        Ok(oid)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // End of input ends it; it has nothing left to do by then.
        drop(self.stdin.take());
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.wait();
        }
    }
}

/// The user agents run as, and how hyperloop becomes it (see [`crate::worker::agent_user`]):
/// defined here because every git command in an agent's checkout runs as that user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// Through `sudo -n -u NAME` (hyperloop is not root).
    pub via_sudo: bool,
}
