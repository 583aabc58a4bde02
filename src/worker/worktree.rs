//! Worktrees workers run in: one per task at `<repo>/.hyperloop/worktrees/<task id>`, checked out
//! on the task's branch, and detached ones for intake and process improvement under
//! `<repo>/.hyperloop/worktrees/.base/<name>`.
//!
//! A step can be killed at any moment, so whatever a previous step left behind — a registration
//! whose directory is gone, a directory git no longer knows, an `index.lock`, a half-done rebase,
//! uncommitted work of a dead agent — is repaired here and is never a reason to fail. The task
//! branch is never reset: it holds the agent's commits. Uncommitted work found in a task worktree
//! is committed (with trailers) rather than thrown away.
//!
//! hyperloop's local state must not show up in `git status`, and the user's `.gitignore` is theirs,
//! so the ignores go into the repository's `info/exclude`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::git::{Git, trailers};

use super::RESULT_FILE;

/// Lines hyperloop keeps in `info/exclude` (shared by every worktree of the repository).
pub const LOCAL_EXCLUDES: &[&str] = &[
    "/.hyperloop/worktrees/",
    "/.hyperloop/logs/",
    "/.hyperloop/state/",
    "/.hyperloop/matrix-state.json",
    "/.worker-result.json",
];

/// `<repo>/.hyperloop/worktrees`.
pub fn worktrees_dir(repo_root: &Path) -> PathBuf {
    repo_root.join(".hyperloop").join("worktrees")
}

/// `<repo>/.hyperloop/logs`.
pub fn logs_dir(repo_root: &Path) -> PathBuf {
    repo_root.join(".hyperloop").join("logs")
}

/// The log of one worker run, named so that a person finds it by task, role, round and time:
/// `<repo>/.hyperloop/logs/<task>/<role>-round-<round>-<UTC start time>.log`. A second run that
/// starts in the same second gets `-2`, and so on, so runs never share a log.
pub fn worker_log_path(repo_root: &Path, task_id: &str, role: &str, round: u32) -> PathBuf {
    let started = chrono::Utc::now();
    let dir = logs_dir(repo_root).join(task_id);
    let stem = format!("{role}-round-{round}-{}", started.format("%Y%m%dT%H%M%SZ"));
    let mut path = dir.join(format!("{stem}.log"));
    let mut n = 2;
    while path.exists() {
        path = dir.join(format!("{stem}-{n}.log"));
        n += 1;
    }
    path
}

/// Where a task's worktree lives.
pub fn task_worktree_path(repo_root: &Path, task_id: &str) -> PathBuf {
    worktrees_dir(repo_root).join(task_id)
}

/// Where a detached base worktree lives. Task ids cannot start with a dot, so `.base` never
/// collides with a task's worktree.
pub fn base_worktree_path(repo_root: &Path, name: &str) -> PathBuf {
    worktrees_dir(repo_root).join(".base").join(name)
}

/// Rejects ids that cannot safely name a directory (separators, `..`, a leading dot).
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::other(format!(
            "{what} {name:?} cannot name a worktree: use letters, digits, '-', '_' and '.', not starting with '.'"
        )))
    }
}

/// Makes sure `info/exclude` ignores hyperloop's local state and the result file.
pub fn ensure_local_excludes(git: &Git) -> Result<()> {
    ensure_local_excludes_in(&git.common_dir()?)
}

/// [`ensure_local_excludes`] for a repository whose common git directory is known.
pub fn ensure_local_excludes_in(common_dir: &Path) -> Result<()> {
    let info = common_dir.join("info");
    let file = info.join("exclude");
    let current = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(&file, e)),
    };
    let have: Vec<&str> = current.lines().map(str::trim).collect();
    let missing: Vec<&str> = LOCAL_EXCLUDES
        .iter()
        .copied()
        .filter(|l| !have.contains(l))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut text = current.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# hyperloop's local state\n");
    for l in missing {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::create_dir_all(&info).map_err(|e| Error::io(&info, e))?;
    std::fs::write(&file, text).map_err(|e| Error::io(&file, e))
}

/// git commands that look at worktrees (`worktree add/list/remove/prune`, `branch -D`, `checkout`,
/// `fetch` into a branch) read every worktree's administrative files and fail on one another
/// thread is creating ("failed to read .git/worktrees/…/commondir"). hyperloop's own worktree
/// work takes turns under this lock; it is held for a few git commands at most.
static ADMIN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes the worktree lock (see [`ADMIN`]).
pub fn admin_lock() -> std::sync::MutexGuard<'static, ()> {
    ADMIN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One entry of `git worktree list --porcelain`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Registered {
    path: PathBuf,
    branch: Option<String>,
}

/// `git worktree list --porcelain`. A git killed while it was making a worktree can leave that
/// worktree's files half written, and then every worktree command fails on them: such a
/// leftover, still marked as being made after its maker had time to finish, is removed.
pub fn list_worktrees(git: &Git) -> Result<String> {
    let mut patience = 20;
    loop {
        let out = git.output(["worktree", "list", "--porcelain"])?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let failed = || Error::Git {
            args: "worktree list --porcelain".into(),
            dir: git.dir().to_path_buf(),
            stderr: stderr.clone(),
        };
        let Some(name) = half_made_worktree(&stderr) else {
            return Err(failed());
        };
        if patience > 0 {
            // Perhaps being made right now, by a git outliving the step that started it.
            patience -= 1;
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        let admin = git.common_dir()?.join("worktrees").join(name);
        let marker = std::fs::read_to_string(admin.join("locked")).unwrap_or_default();
        if check_name("worktree", name).is_err() || marker.trim() != "initializing" {
            return Err(failed());
        }
        tracing::warn!(path = %admin.display(), "removing a worktree whose creation was cut short");
        std::fs::remove_dir_all(&admin).map_err(|e| Error::io(&admin, e))?;
        patience = 0;
    }
}

/// The name of the worktree whose files git could not read, from its error message.
fn half_made_worktree(stderr: &str) -> Option<&str> {
    let at = stderr.find("failed to read ")?;
    let rest = &stderr[at..];
    let after = &rest[rest.find("worktrees/")? + "worktrees/".len()..];
    let name = &after[..after.find('/')?];
    let file = &after[name.len() + 1..];
    (file.starts_with("commondir") || file.starts_with("gitdir")).then_some(name)
}

fn registered_worktrees(git: &Git) -> Result<Vec<Registered>> {
    let text = list_worktrees(git)?;
    let mut out = Vec::new();
    let mut current: Option<Registered> = None;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("worktree ") {
            if let Some(r) = current.take() {
                out.push(r);
            }
            current = Some(Registered {
                path: PathBuf::from(p),
                branch: None,
            });
        } else if let Some(b) = line.strip_prefix("branch ")
            && let Some(r) = current.as_mut()
        {
            r.branch = Some(b.to_string());
        }
    }
    if let Some(r) = current {
        out.push(r);
    }
    Ok(out)
}

/// Compares paths after resolving symlinks where the path exists (git records real paths on
/// some systems and the given ones on others).
fn same_path(a: &Path, b: &Path) -> bool {
    let norm = |p: &Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| {
            // A missing directory: resolve its parent, which usually still exists.
            match (p.parent(), p.file_name()) {
                (Some(parent), Some(name)) => std::fs::canonicalize(parent)
                    .map(|pp| pp.join(name))
                    .unwrap_or_else(|_| p.to_path_buf()),
                _ => p.to_path_buf(),
            }
        })
    };
    norm(a) == norm(b)
}

/// Returns a git that can commit even when the repository has no identity configured (a fresh
/// CI runner): hyperloop then commits as itself.
pub fn committing(git: &Git) -> Result<Git> {
    let mut g = git.clone();
    if !git.succeeds(["config", "--get", "user.name"])? {
        g = g
            .with_env("GIT_AUTHOR_NAME", "hyperloop")
            .with_env("GIT_COMMITTER_NAME", "hyperloop");
    }
    if !git.succeeds(["config", "--get", "user.email"])? {
        g = g
            .with_env("GIT_AUTHOR_EMAIL", "hyperloop@localhost")
            .with_env("GIT_COMMITTER_EMAIL", "hyperloop@localhost");
    }
    Ok(g)
}

/// Stages everything in the worktree `git` runs in (ignored files and the result file excepted)
/// and commits it with trailers. Returns the new commit, or `None` when there was nothing to
/// commit (hyperloop makes no empty commits).
pub fn commit_all(git: &Git, subject: &str, spec_ref: &str, task_ref: &str) -> Result<Option<String>> {
    git.run(["add", "-A"])?;
    // A result file that is tracked already (an older orchestrator committed it) is not work.
    git.run(["rm", "--cached", "-q", "--ignore-unmatch", "--", RESULT_FILE])?;
    if git.succeeds(["diff", "--cached", "--quiet"])? {
        return Ok(None);
    }
    let message = format!("{subject}\n\n{}", trailers(spec_ref, task_ref));
    committing(git)?.run(["commit", "-q", "--no-verify", "-m", &message])?;
    git.rev_parse("HEAD")
}

/// True when the worktree has changes `git add -A` would stage.
pub fn is_dirty(git: &Git) -> Result<bool> {
    let s = git.run(["status", "--porcelain", "--untracked-files=all"])?;
    Ok(!s.trim().is_empty())
}

/// Clears what a killed git or agent leaves behind in a worktree: a lock file and a rebase,
/// merge, cherry-pick or revert in progress.
fn clear_interrupted_operations(wt: &Git) -> Result<()> {
    let gitdir = PathBuf::from(wt.run_trim(["rev-parse", "--absolute-git-dir"])?);
    clear_worktree_locks(&gitdir)?;
    let rebasing = gitdir.join("rebase-merge").exists() || gitdir.join("rebase-apply").exists();
    if rebasing && !wt.succeeds(["rebase", "--abort"])? {
        for d in ["rebase-merge", "rebase-apply"] {
            let p = gitdir.join(d);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    for (head, cmd) in [
        ("MERGE_HEAD", "merge"),
        ("CHERRY_PICK_HEAD", "cherry-pick"),
        ("REVERT_HEAD", "revert"),
    ] {
        if gitdir.join(head).exists() && !wt.succeeds([cmd, "--abort"])? {
            let p = gitdir.join(head);
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// Removes a worktree directory and its registration, however broken either is. The branch is
/// kept.
pub fn remove_worktree(git: &Git, path: &Path) -> Result<()> {
    let held = admin_lock();
    remove_worktree_held(git, path, &held)
}

/// [`remove_worktree`] for a caller that holds [`admin_lock`].
pub fn remove_worktree_held(
    git: &Git,
    path: &Path,
    _held: &std::sync::MutexGuard<'static, ()>,
) -> Result<()> {
    let listed = registered_worktrees(git)?
        .into_iter()
        .any(|r| same_path(&r.path, path));
    if listed {
        let shown = path.to_string_lossy().into_owned();
        // Twice --force: also removes a locked or dirty worktree.
        let _ = git.output(["worktree", "remove", "--force", "--force", shown.as_str()])?;
    }
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
    }
    git.run(["worktree", "prune"])?;
    Ok(())
}

/// Removes a merged task's worktree, then its branch; each part reports on its own (the branch
/// goes even when the worktree's removal stumbled, if git lets it).
pub fn remove_worktree_and_branch(git: &Git, path: &Path, branch: &str) -> (Result<()>, Result<()>) {
    // `branch -D` looks at every worktree too: one turn of the lock for both.
    let held = admin_lock();
    let worktree = remove_worktree_held(git, path, &held);
    crate::fault::point("before-branch-delete");
    let delete = || {
        git.output(["branch", "-D", branch]).and_then(|out| {
            if out.status.success() {
                Ok(())
            } else {
                Err(Error::other(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ))
            }
        })
    };
    let mut deleted = delete();
    // A git killed while it rewrote packed-refs (a background `gc` of an agent's, say) leaves
    // its lock behind, and no branch can be deleted after that.
    if deleted
        .as_ref()
        .is_err_and(|e| e.to_string().contains("packed-refs.lock"))
        && let Ok(common) = git.common_dir()
        && clear_stale_lock(&common.join("packed-refs.lock")).is_ok()
    {
        deleted = delete();
    }
    (worktree, deleted)
}

/// Checks out the task's branch in its worktree, creating the branch from `base_commit` the first
/// time, and returns the worktree's path. Reuses a healthy worktree, repairs a broken one, and
/// commits uncommitted work a dead agent left in it (`spec_ref` and `task_id` go into the
/// trailers).
pub fn ensure_task_worktree(
    git: &Git,
    repo_root: &Path,
    task_id: &str,
    spec_ref: &str,
    branch: &str,
    base_commit: &str,
) -> Result<PathBuf> {
    ensure_local_excludes(git)?;
    prepare_task_worktree(git, repo_root, task_id, spec_ref, branch, base_commit)
}

/// [`ensure_task_worktree`] for a caller that has made sure of the local excludes already
/// ([`ensure_local_excludes`]): safe to run for several tasks at once.
pub fn prepare_task_worktree(
    git: &Git,
    repo_root: &Path,
    task_id: &str,
    spec_ref: &str,
    branch: &str,
    base_commit: &str,
) -> Result<PathBuf> {
    check_name("task id", task_id)?;
    let held = admin_lock();
    if !git.succeeds(["check-ref-format", "--branch", branch])? {
        return Err(Error::other(format!("{branch:?} is not a valid branch name")));
    }
    let path = task_worktree_path(repo_root, task_id);
    let branch_ref = format!("refs/heads/{branch}");

    // The common case, a task's first worker: no branch and no worktree yet. One git command
    // makes both; everything below is for reuse and repair.
    if !path.exists()
        && git.rev_parse(&branch_ref)?.is_none()
        && let Some(base) = git.rev_parse(base_commit)?
    {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let p = path.to_string_lossy().into_owned();
        if git.succeeds(["worktree", "add", "-q", "-b", branch, p.as_str(), base.as_str()])? {
            return Ok(path);
        }
        // A stale registration of the same path, say: fall through to the careful way.
    }
    clear_stale_lock(&git.common_dir()?.join(format!("{branch_ref}.lock")))?;
    git.run(["worktree", "prune"])?;

    if git.rev_parse(&branch_ref)?.is_none() {
        let Some(base) = git.rev_parse(base_commit)? else {
            return Err(Error::other(format!(
                "cannot create branch {branch}: {base_commit} is not a commit"
            )));
        };
        git.run(["branch", "--no-track", branch, base.as_str()])?;
    }

    let registered = registered_worktrees(git)?;
    // Our own worktree of another task id (a renamed task) holding the branch is stale; anybody
    // else's checkout of it is the user's business.
    for r in &registered {
        if r.branch.as_deref() == Some(branch_ref.as_str()) && !same_path(&r.path, &path) {
            if r.path.starts_with(worktrees_dir(repo_root)) || !r.path.exists() {
                remove_worktree_held(git, &r.path, &held)?;
            } else {
                return Err(Error::other(format!(
                    "branch {branch} is checked out at {}; hyperloop needs it for task {task_id}",
                    r.path.display()
                )));
            }
        }
    }

    let ours = registered.iter().find(|r| same_path(&r.path, &path));
    if ours.is_some() && path.join(".git").exists() {
        let wt = git.at(&path);
        if repair_task_worktree(&wt, task_id, spec_ref, branch).is_ok() {
            return Ok(path);
        }
        // Beyond repair (e.g. its git files are damaged): start it afresh from the branch.
        remove_worktree_held(git, &path, &held)?;
    } else if ours.is_some() || path.exists() {
        remove_worktree_held(git, &path, &held)?;
    }
    add_worktree(git, &path, &[branch])?;
    Ok(path)
}

/// Removes a lock file that a killed git left behind (an agent stopped in the middle of a commit
/// leaves its branch locked for good). A live git holds a lock for milliseconds: one that stays
/// for a few seconds has no owner.
pub(crate) fn clear_stale_lock(lock: &Path) -> Result<()> {
    for _ in 0..40 {
        if !lock.exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    tracing::warn!(path = %lock.display(), "removing a lock file left by a killed git");
    match std::fs::remove_file(lock) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(lock, e)),
        _ => Ok(()),
    }
}

/// Clears the locks a git killed in the middle of its work leaves in a worktree whose agent is
/// gone: the index's (at once: only the agent used that index), then its HEAD's and its
/// branch's.
pub(crate) fn clear_worktree_locks(gitdir: &Path) -> Result<()> {
    let index_lock = gitdir.join("index.lock");
    if index_lock.exists() {
        std::fs::remove_file(&index_lock).map_err(|e| Error::io(&index_lock, e))?;
    }
    let head_lock = gitdir.join("HEAD.lock");
    if head_lock.exists() {
        clear_stale_lock(&head_lock)?;
    }
    if let Some(lock) = branch_lock(gitdir)
        && lock.exists()
    {
        clear_stale_lock(&lock)?;
    }
    Ok(())
}

/// The lock file of the branch a worktree has checked out, from its git files.
fn branch_lock(gitdir: &Path) -> Option<PathBuf> {
    let head = std::fs::read_to_string(gitdir.join("HEAD")).ok()?;
    let refname = head.trim().strip_prefix("ref:")?.trim().to_string();
    let common = match std::fs::read_to_string(gitdir.join("commondir")) {
        Ok(c) => gitdir.join(c.trim()),
        Err(_) => gitdir.to_path_buf(),
    };
    Some(common.join(format!("{refname}.lock")))
}

fn repair_task_worktree(wt: &Git, task_id: &str, spec_ref: &str, branch: &str) -> Result<()> {
    clear_interrupted_operations(wt)?;
    if is_dirty(wt)? {
        commit_all(
            wt,
            "hyperloop: uncommitted work left by an interrupted worker",
            spec_ref,
            task_id,
        )?;
    }
    let head = wt.output(["symbolic-ref", "-q", "HEAD"])?;
    let on = String::from_utf8_lossy(&head.stdout).trim().to_string();
    if on != format!("refs/heads/{branch}") {
        wt.run(["checkout", "-q", "--force", branch])?;
    }
    Ok(())
}

/// `git worktree add`, falling back to the forced forms that override stale registrations.
fn add_worktree(git: &Git, path: &Path, rest: &[&str]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let p = path.to_string_lossy().into_owned();
    let mut args = vec!["worktree", "add", "-q", p.as_str()];
    args.extend_from_slice(rest);
    if git.succeeds(&args)? {
        return Ok(());
    }
    git.run(["worktree", "prune"])?;
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
    }
    let mut forced = vec!["worktree", "add", "-q", "--force", "--force", p.as_str()];
    forced.extend_from_slice(rest);
    git.run(&forced)?;
    Ok(())
}

/// A clean worktree detached at `commit`, for workers that do not belong to a task (intake,
/// process improvement). Whatever a previous run left in it is discarded: its results were
/// taken from its commits, which the caller records.
pub fn ensure_base_worktree(git: &Git, repo_root: &Path, name: &str, commit: &str) -> Result<PathBuf> {
    check_name("worktree name", name)?;
    let held = admin_lock();
    ensure_local_excludes(git)?;
    let Some(commit) = git.rev_parse(commit)? else {
        return Err(Error::other(format!(
            "cannot check out {commit} for {name}: not a commit"
        )));
    };
    let path = base_worktree_path(repo_root, name);
    git.run(["worktree", "prune"])?;
    let registered = registered_worktrees(git)?;
    let ours = registered.iter().any(|r| same_path(&r.path, &path));
    if ours && path.join(".git").exists() {
        let wt = git.at(&path);
        let reset = clear_interrupted_operations(&wt)
            .and_then(|()| wt.run(["checkout", "-q", "--force", "--detach", commit.as_str()]))
            .and_then(|_| wt.run(["clean", "-q", "-ffd"]));
        if reset.is_ok() {
            return Ok(path);
        }
        remove_worktree_held(git, &path, &held)?;
    } else if ours || path.exists() {
        remove_worktree_held(git, &path, &held)?;
    }
    add_worktree(git, &path, &["--detach", commit.as_str()])?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_made_worktrees_are_named_from_gits_error() {
        assert_eq!(
            half_made_worktree("fatal: failed to read .git/worktrees/task-002/commondir: Success"),
            Some("task-002")
        );
        assert_eq!(
            half_made_worktree("fatal: failed to read /r/.git/worktrees/x/gitdir: No such file"),
            Some("x")
        );
        assert_eq!(half_made_worktree("fatal: not a git repository"), None);
        assert_eq!(
            half_made_worktree("fatal: failed to read .git/worktrees/x/HEAD"),
            None
        );
    }

    #[test]
    fn names_that_cannot_be_directories() {
        for bad in ["", ".base", "..", "a/b", "a b", "x\n"] {
            assert!(check_name("task id", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["task-001", "T_2.x", "intake"] {
            assert!(check_name("task id", good).is_ok(), "{good:?} refused");
        }
    }
}
