//! Fetch and push to the forge, with the credential kept inside this process.
//!
//! An http(s) remote is reached through libgit2, in process: the token goes from memory to the
//! request in a credential callback, and this process is not dumpable (see [`crate::secrets`]).
//! A `git` child would hold it in its environment, arguments or memory, all of which another
//! process of the same user (an agent) can read. Remotes that are not http(s) — a path, `file://`,
//! ssh — need no credential of hyperloop's and go through the `git` program, which also runs the
//! receiving side's hooks as a server would.
//!
//! Pushes report three outcomes that callers treat differently: pushed; rejected because the
//! remote branch moved (the caller re-reads and replays, never forces); refused by a rule of the
//! remote (a hook, a ruleset, push protection), which will not change by retrying.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::forge::secret::Secret;
use crate::git::Git;

/// What became of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    Pushed,
    /// The remote branch is not where the push expected it (someone else moved it).
    Moved,
    /// The remote refused the update for a reason of its own; `message` is what it said.
    Refused {
        message: String,
    },
}

/// How this remote is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// libgit2 in this process, with the credential.
    InProcess,
    /// The `git` program, without any credential of hyperloop's.
    Program,
}

/// One remote of the repository at `dir`.
pub struct Transport {
    git: Git,
    dir: PathBuf,
    remote: String,
    url: String,
    way: Way,
    token: Option<Secret>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("dir", &self.dir)
            .field("remote", &self.remote)
            .field("url", &self.url)
            .field("way", &self.way)
            .finish()
    }
}

/// True for URLs libgit2 reaches over http(s).
fn is_http(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

impl Transport {
    /// The remote `remote` of the repository `git` works in; `token` authenticates http(s).
    pub fn new(git: &Git, remote: &str, token: Option<Secret>) -> Result<Transport> {
        let url = git.run_trim(["remote", "get-url", remote])?;
        let way = if is_http(&url) {
            Way::InProcess
        } else {
            Way::Program
        };
        Ok(Transport {
            git: git.clone(),
            dir: git.dir().to_path_buf(),
            remote: remote.to_string(),
            url,
            way,
            token,
        })
    }

    pub fn remote(&self) -> &str {
        &self.remote
    }

    /// True when pushes and fetches run inside this process.
    pub fn in_process(&self) -> bool {
        self.way == Way::InProcess
    }

    /// Fetches `refspecs` (each `[+]src:dst`). Returns the sources the remote does not have;
    /// a glob source is never reported missing.
    pub fn fetch(&self, refspecs: &[String]) -> Result<Vec<String>> {
        match self.way {
            Way::Program => self.fetch_program(refspecs),
            Way::InProcess => self.fetch_in_process(refspecs),
        }
    }

    /// Pushes `commit` to `refs/heads/<branch>` on the remote as a fast-forward (never forced).
    pub fn push(&self, commit: &str, branch: &str) -> Result<PushOutcome> {
        match self.way {
            Way::Program => self.push_program(commit, branch),
            Way::InProcess => self.push_in_process(commit, branch),
        }
    }

    fn fetch_program(&self, refspecs: &[String]) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        for spec in refspecs {
            let out = self.git.output([
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                &self.remote,
                spec,
            ])?;
            if out.status.success() {
                continue;
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("couldn't find remote ref") {
                missing.push(source_of(spec).to_string());
                continue;
            }
            return Err(Error::Git {
                args: format!("fetch {} {spec}", self.remote),
                dir: self.dir.clone(),
                stderr: stderr.trim().to_string(),
            });
        }
        Ok(missing)
    }

    fn push_program(&self, commit: &str, branch: &str) -> Result<PushOutcome> {
        let refspec = format!("{commit}:refs/heads/{branch}");
        let out = self
            .git
            .output(["push", "--porcelain", &self.remote, refspec.as_str()])?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            return Ok(PushOutcome::Pushed);
        }
        if let Some(line) = stdout.lines().find(|l| l.starts_with('!')) {
            let reason = line.rsplit('\t').next().unwrap_or(line);
            if reason.contains("[rejected]")
                && (reason.contains("fetch first")
                    || reason.contains("non-fast-forward")
                    || reason.contains("stale info"))
            {
                return Ok(PushOutcome::Moved);
            }
            // Two pushes landing at the same instant: the receiving side's compare-and-swap
            // lost to the other one ("cannot lock ref … is at X but expected Y"). That is a
            // moved branch, to re-read and replay onto, not a rule of the remote.
            let said = format!("{reason}\n{stderr}");
            if reason.contains("[remote rejected]")
                && said.contains("cannot lock ref")
                && said.contains("but expected")
            {
                return Ok(PushOutcome::Moved);
            }
            if reason.contains("[remote rejected]") || reason.contains("[rejected]") {
                return Ok(PushOutcome::Refused {
                    message: remote_message(&stderr, reason),
                });
            }
        }
        Err(Error::Git {
            args: format!("push {} {refspec}", self.remote),
            dir: self.dir.clone(),
            stderr: format!("{}\n{}", stderr.trim(), stdout.trim()).trim().to_string(),
        })
    }

    fn open(&self) -> Result<git2::Repository> {
        git2::Repository::open(&self.dir).map_err(|e| self.lib_error("open", &e))
    }

    fn lib_error(&self, what: &str, e: &git2::Error) -> Error {
        Error::Git {
            args: format!("{what} {} (in process)", self.remote),
            dir: self.dir.clone(),
            stderr: e.message().to_string(),
        }
    }

    /// Callbacks that answer an authentication challenge with the token (once: a refused token
    /// is not offered again and again) and collect what the remote says.
    fn callbacks<'a>(&'a self, said: &'a std::cell::RefCell<String>) -> git2::RemoteCallbacks<'a> {
        let mut cb = git2::RemoteCallbacks::new();
        let mut asked = 0u32;
        cb.credentials(move |_url, _user, _allowed| {
            asked += 1;
            match (&self.token, asked) {
                (Some(t), 1) => git2::Cred::userpass_plaintext("x-access-token", t.expose()),
                (Some(_), _) => Err(git2::Error::from_str("the forge refused the credential")),
                (None, _) => Err(git2::Error::from_str(
                    "the remote asks for a credential and none is set",
                )),
            }
        });
        cb.sideband_progress(move |data| {
            said.borrow_mut().push_str(&String::from_utf8_lossy(data));
            true
        });
        cb
    }

    fn fetch_in_process(&self, refspecs: &[String]) -> Result<Vec<String>> {
        let repo = self.open()?;
        let mut remote = repo
            .remote_anonymous(&self.url)
            .map_err(|e| self.lib_error("fetch", &e))?;
        let said = std::cell::RefCell::new(String::new());
        let mut opts = git2::FetchOptions::new();
        opts.remote_callbacks(self.callbacks(&said));
        opts.download_tags(git2::AutotagOption::None);
        let mut proxy = git2::ProxyOptions::new();
        proxy.auto();
        opts.proxy_options(proxy);
        let specs: Vec<&str> = refspecs.iter().map(String::as_str).collect();
        remote
            .fetch(&specs, Some(&mut opts), None)
            .map_err(|e| self.lib_error("fetch", &e))?;
        let advertised: Vec<String> = remote
            .list()
            .map(|heads| heads.iter().map(|h| h.name().to_string()).collect())
            .unwrap_or_default();
        Ok(refspecs
            .iter()
            .map(|s| source_of(s))
            .filter(|src| !src.contains('*') && !advertised.iter().any(|a| a == src))
            .map(str::to_string)
            .collect())
    }

    fn push_in_process(&self, commit: &str, branch: &str) -> Result<PushOutcome> {
        let repo = self.open()?;
        // libgit2 pushes from a reference, not a bare commit id: a private one, removed after.
        let staging = format!("refs/hyperloop/push/{}", std::process::id());
        let oid = git2::Oid::from_str(commit).map_err(|e| self.lib_error("push", &e))?;
        repo.reference(&staging, oid, true, "hyperloop: push")
            .map_err(|e| self.lib_error("push", &e))?;
        let outcome = self.push_ref(&repo, &staging, branch);
        if let Ok(mut r) = repo.find_reference(&staging) {
            let _ = r.delete();
        }
        outcome
    }

    fn push_ref(&self, repo: &git2::Repository, from: &str, branch: &str) -> Result<PushOutcome> {
        let mut remote = repo
            .remote_anonymous(&self.url)
            .map_err(|e| self.lib_error("push", &e))?;
        let said = std::cell::RefCell::new(String::new());
        let refused = std::cell::RefCell::new(None::<String>);
        let mut cb = self.callbacks(&said);
        cb.push_update_reference(|_name, status| {
            if let Some(s) = status {
                *refused.borrow_mut() = Some(s.to_string());
            }
            Ok(())
        });
        let mut opts = git2::PushOptions::new();
        opts.remote_callbacks(cb);
        let mut proxy = git2::ProxyOptions::new();
        proxy.auto();
        opts.proxy_options(proxy);
        let spec = format!("{from}:refs/heads/{branch}");
        let pushed = remote.push(&[spec.as_str()], Some(&mut opts));
        drop(opts);
        let said = said.into_inner();
        match pushed {
            Ok(()) => match refused.into_inner() {
                None => Ok(PushOutcome::Pushed),
                Some(status) if is_moved(&status) => Ok(PushOutcome::Moved),
                Some(status) => Ok(PushOutcome::Refused {
                    message: remote_message(&said, &status),
                }),
            },
            Err(e) if e.code() == git2::ErrorCode::NotFastForward => Ok(PushOutcome::Moved),
            Err(e) => Err(self.lib_error("push", &e)),
        }
    }
}

/// The source side of a refspec.
fn source_of(spec: &str) -> &str {
    let spec = spec.strip_prefix('+').unwrap_or(spec);
    spec.split(':').next().unwrap_or(spec)
}

/// True for a server's answer that means "the branch is not where you thought".
fn is_moved(status: &str) -> bool {
    status.contains("non-fast-forward") || status.contains("fetch first") || status.contains("stale info")
}

/// What the remote said about a refused push: its `remote:` lines (a hook's or a ruleset's
/// explanation), else the status it gave.
pub fn remote_message(stderr: &str, status: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .flat_map(|l| l.split('\r'))
        .filter_map(|l| l.trim().strip_prefix("remote:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        status.trim().to_string()
    } else {
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_lines_explain_a_refusal() {
        let stderr = "remote: error: GH013: Repository rule violations found\nremote: - Push cannot contain secrets\nTo x\n";
        assert_eq!(
            remote_message(stderr, "[remote rejected] (pre-receive hook declined)"),
            "error: GH013: Repository rule violations found\n- Push cannot contain secrets"
        );
        assert_eq!(remote_message("", " [remote rejected] x "), "[remote rejected] x");
    }

    #[test]
    fn http_remotes_go_in_process() {
        assert!(is_http("https://github.com/o/r.git"));
        assert!(is_http("HTTP://127.0.0.1:8080/o/r.git"));
        assert!(!is_http("/tmp/origin.git"));
        assert!(!is_http("git@github.com:o/r.git"));
        assert_eq!(source_of("+refs/heads/a:refs/remotes/o/a"), "refs/heads/a");
    }
}
