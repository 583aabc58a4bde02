//! The worker's verdict and the state of its branch afterwards.
//!
//! The verdict comes only from `.worker-result.json`, which must be a fresh file (a stale one is
//! removed before the worker starts) holding `{"verdict": "pass"|"fail", "findings": <int>,
//! "detail": "<text>"}`. Anything else is an `error` whose detail says what was wrong, so a
//! worker that did nothing can never pass by accident.
//!
//! After the run the branch is made to hold only the agent's work: a result file the agent
//! committed is removed by a new commit (history is never rewritten: the branch may be pushed
//! already), and uncommitted work is committed for the agent, both with trailers.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::git::{Git, trailers};

use super::worktree::{commit_all, committing};
use super::{RESULT_FILE, Verdict};

/// Result files larger than this are not a verdict but a mistake.
const MAX_RESULT_BYTES: u64 = 1 << 20;

/// What the result file said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultFile {
    Missing,
    Invalid(String),
    Valid {
        verdict: Verdict,
        findings: u32,
        detail: String,
    },
}

/// Removes a result file left by an earlier run, so that only this run's file is read.
pub fn remove_stale(path: &Path) -> Result<()> {
    if super::agent_user::current().is_some_and(|u| u.via_sudo) {
        // In the agent user's checkout, which hyperloop cannot write without sudo.
        return super::agent_user::remove_tree(path);
    }
    // A directory of that name is removed too: the agent cannot be allowed to keep the name.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e));
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Reads and validates the result file.
///
/// The file is the agent's: only a regular file counts. It is opened without following a
/// symlink (one pointing out of the checkout would let the agent hand in someone else's file)
/// and without blocking (a FIFO would hang the step in `open`), then checked to be a regular
/// file before a byte is read.
pub fn read(path: &Path) -> ResultFile {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ResultFile::Missing,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return ResultFile::Invalid(format!(
                "{RESULT_FILE} is a symbolic link; only a regular file in the checkout is read"
            ));
        }
        Err(e) => return ResultFile::Invalid(format!("cannot read {RESULT_FILE}: {e}")),
    };
    match file.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(m) => {
            let t = m.file_type();
            let what = if t.is_fifo() {
                "a FIFO"
            } else if t.is_dir() {
                "a directory"
            } else if t.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            return ResultFile::Invalid(format!("{RESULT_FILE} is {what}; only a regular file is read"));
        }
        Err(e) => return ResultFile::Invalid(format!("cannot read {RESULT_FILE}: {e}")),
    }
    let mut bytes = Vec::new();
    if let Err(e) = file.take(MAX_RESULT_BYTES + 1).read_to_end(&mut bytes) {
        return ResultFile::Invalid(format!("cannot read {RESULT_FILE}: {e}"));
    }
    if bytes.len() as u64 > MAX_RESULT_BYTES {
        return ResultFile::Invalid(format!("{RESULT_FILE} is larger than {MAX_RESULT_BYTES} bytes"));
    }
    parse(&bytes)
}

/// Validates the bytes of a result file.
pub fn parse(bytes: &[u8]) -> ResultFile {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return ResultFile::Invalid(format!("{RESULT_FILE} is not valid JSON: {e}")),
    };
    let Some(obj) = value.as_object() else {
        return ResultFile::Invalid(format!("{RESULT_FILE} must hold a JSON object"));
    };
    let verdict = match obj.get("verdict").and_then(Value::as_str) {
        Some("pass") => Verdict::Pass,
        Some("fail") => Verdict::Fail,
        Some(other) => {
            return ResultFile::Invalid(format!(
                "{RESULT_FILE}: verdict must be \"pass\" or \"fail\", not {other:?}"
            ));
        }
        None => return ResultFile::Invalid(format!("{RESULT_FILE}: no \"verdict\" string")),
    };
    let findings = match obj.get("findings") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_u64() {
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
            None => {
                return ResultFile::Invalid(format!(
                    "{RESULT_FILE}: findings must be a non-negative integer, not {v}"
                ));
            }
        },
    };
    let detail = match obj.get("detail") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return ResultFile::Invalid(format!("{RESULT_FILE}: detail must be a string, not {v}"));
        }
    };
    ResultFile::Valid {
        verdict,
        findings,
        detail,
    }
}

/// What hyperloop did to the branch after the run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BranchReport {
    /// New commits on HEAD since the run started, oldest first.
    pub commits: Vec<String>,
    /// Commits the agent made itself (before hyperloop's own).
    pub agent_commits: usize,
    /// hyperloop committed work the agent left uncommitted.
    pub committed_leftovers: bool,
    /// hyperloop removed a result file the agent had committed.
    pub dropped_result_file: bool,
    /// HEAD's tree differs from the tree at the start of the run.
    pub tree_changed: bool,
}

/// Cleans up the worktree's branch after a run that started at `pre_head`. The common case (the
/// agent committed its work and left nothing behind) costs three git commands.
pub fn settle_branch(
    wt: &Git,
    pre_head: &str,
    role: &str,
    spec_ref: &str,
    task_id: &str,
) -> Result<BranchReport> {
    let mut report = BranchReport::default();
    // A git the agent's group was running when it was stopped may have left its locks.
    let gitdir = git_dir(wt)?;
    super::worktree::clear_worktree_locks(&gitdir)?;

    let result_blob = format!("HEAD:{RESULT_FILE}");
    let pre_tree = format!("{pre_head}^{{tree}}");
    let found = batch_check(wt, &[&result_blob, &pre_tree, "HEAD^{tree}"])?;
    if found[0].is_some() {
        drop_result_file(wt, &gitdir, spec_ref, task_id)?;
        report.dropped_result_file = true;
    }
    if super::worktree::is_dirty(wt)? {
        let subject = format!("{role}: uncommitted work left by the agent");
        report.committed_leftovers = commit_all(wt, &subject, spec_ref, task_id)?.is_some();
    }

    report.commits = rev_list(wt, pre_head)?;
    let ours = usize::from(report.dropped_result_file) + usize::from(report.committed_leftovers);
    report.agent_commits = report.commits.len().saturating_sub(ours);
    let after = if ours == 0 {
        found[2].clone()
    } else {
        Some(wt.run_trim(["rev-parse", "HEAD^{tree}"])?)
    };
    report.tree_changed = found[1] != after;
    Ok(report)
}

/// The worktree's own git directory, read from its `.git` file (a linked worktree) or the
/// directory itself, without running git.
fn git_dir(wt: &Git) -> Result<PathBuf> {
    let dot_git = wt.dir().join(".git");
    if dot_git.is_dir() {
        return Ok(dot_git);
    }
    let text = std::fs::read_to_string(&dot_git).map_err(|e| Error::io(&dot_git, e))?;
    match text.trim().strip_prefix("gitdir:") {
        Some(p) => {
            let p = Path::new(p.trim());
            Ok(if p.is_absolute() {
                p.to_path_buf()
            } else {
                wt.dir().join(p)
            })
        }
        // Not the usual layout: ask git.
        None => Ok(PathBuf::from(wt.run_trim(["rev-parse", "--absolute-git-dir"])?)),
    }
}

/// The object ids of `revs` (`None` for what does not exist), in one git command.
fn batch_check(wt: &Git, revs: &[&str]) -> Result<Vec<Option<String>>> {
    let input: String = revs.iter().map(|r| format!("{r}\n")).collect();
    let out = wt.run_with_input(["cat-file", "--batch-check=%(objectname)"], input.as_bytes())?;
    let mut lines = out.lines();
    Ok(revs
        .iter()
        .map(|_| {
            lines
                .next()
                .filter(|l| !l.ends_with(" missing") && !l.ends_with(" ambiguous"))
                .map(str::to_string)
        })
        .collect())
}

/// Commits the removal of the result file, and nothing else: whatever the agent staged stays
/// staged for the left-over commit. Built on a scratch index so the agent's index is not touched.
fn drop_result_file(wt: &Git, gitdir: &Path, spec_ref: &str, task_id: &str) -> Result<()> {
    let head = wt.run_trim(["rev-parse", "HEAD"])?;
    let scratch = gitdir.join("hyperloop-drop-result.index");
    let g = wt
        .clone()
        .with_env("GIT_INDEX_FILE", scratch.to_string_lossy().into_owned());
    let built = (|| -> Result<String> {
        g.run(["read-tree", "HEAD"])?;
        g.run(["rm", "--cached", "-q", "--", RESULT_FILE])?;
        let tree = g.run_trim(["write-tree"])?;
        let message = format!(
            "chore: drop orchestrator result file\n\n{}\n",
            trailers(spec_ref, task_id)
        );
        let commit = committing(wt)?.run_with_input(
            ["commit-tree", tree.as_str(), "-p", head.as_str(), "-F", "-"],
            message.as_bytes(),
        )?;
        Ok(commit.trim().to_string())
    })();
    let _ = std::fs::remove_file(&scratch);
    let commit = built?;
    wt.run([
        "update-ref",
        "-m",
        "hyperloop: drop orchestrator result file",
        "HEAD",
        commit.as_str(),
        head.as_str(),
    ])?;
    wt.run(["rm", "--cached", "-q", "--ignore-unmatch", "--", RESULT_FILE])?;
    Ok(())
}

/// Commits reachable from HEAD but not from `since`, oldest first.
fn rev_list(wt: &Git, since: &str) -> Result<Vec<String>> {
    let out = wt.run(["rev-list", "--reverse", &format!("{since}..HEAD")])?;
    Ok(out.lines().map(str::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(v: Verdict, findings: u32, detail: &str) -> ResultFile {
        ResultFile::Valid {
            verdict: v,
            findings,
            detail: detail.to_string(),
        }
    }

    #[test]
    fn accepts_the_contract_shape() {
        assert_eq!(
            parse(br#"{"verdict":"pass","findings":0,"detail":"ok"}"#),
            valid(Verdict::Pass, 0, "ok")
        );
        assert_eq!(
            parse(br#"{"verdict":"fail","findings":3}"#),
            valid(Verdict::Fail, 3, "")
        );
        assert_eq!(
            parse(br#"{"verdict":"pass","findings":null,"detail":null,"extra":1}"#),
            valid(Verdict::Pass, 0, "")
        );
    }

    #[test]
    fn refuses_everything_else() {
        for (bytes, needle) in [
            (&b"garbage"[..], "not valid JSON"),
            (b"[1]", "JSON object"),
            (br#"{"findings":1}"#, "no \"verdict\""),
            (br#"{"verdict":"error"}"#, "\"error\""),
            (br#"{"verdict":"timeout"}"#, "\"timeout\""),
            (br#"{"verdict":"PASS"}"#, "\"PASS\""),
            (br#"{"verdict":"pass","findings":-1}"#, "non-negative"),
            (br#"{"verdict":"pass","findings":1.5}"#, "non-negative"),
            (br#"{"verdict":"pass","findings":"2"}"#, "non-negative"),
            (
                br#"{"verdict":"pass","detail":{"a":1}}"#,
                "detail must be a string",
            ),
        ] {
            match parse(bytes) {
                ResultFile::Invalid(reason) => {
                    assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
                }
                other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(bytes)),
            }
        }
    }

    #[test]
    fn missing_file() {
        let dir = std::env::temp_dir().join("hyperloop-result-missing-check");
        assert_eq!(read(&dir.join("nope.json")), ResultFile::Missing);
    }
}
