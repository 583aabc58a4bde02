//! Checkouts workers run in: one per task at `<repo>/.hyperloop/worktrees/<task id>`, on the
//! task's branch, and detached ones for intake and process improvement under
//! `<repo>/.hyperloop/worktrees/.base/<name>`. Each is a repository of its own that borrows the
//! main repository's objects: an agent's refs, configuration and hooks stay in its checkout, and
//! what it made comes back only through [`import`], checked.
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
use super::agent_user::checkout_git;

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
    ensure_local_excludes_in(&common_dir(git)?)
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
    if path.join(".git").is_dir() {
        // A checkout of its own: nothing of it is registered in the repository.
        return remove_dir(path);
    }
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
    let delete = || delete_task_ref(git, branch);
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

/// Makes sure the task's branch exists in the repository (created from `base_commit` the first
/// time) and that the task's checkout — a repository of its own at [`task_worktree_path`] —
/// has it checked out at the same commit; returns the checkout's path.
///
/// The checkout borrows the repository's objects (`objects/info/alternates`) but has its own
/// refs, configuration and hooks, so an agent working in it cannot move the base branch, the
/// state branch or another task's branch, nor plant a hook that a person's git would run. Its
/// work comes back only through [`import`]. Work a dead agent left in it (commits, uncommitted
/// changes) is taken in first (`spec_ref` and `task_id` go into the trailers).
pub fn ensure_task_worktree(
    git: &Git,
    repo_root: &Path,
    task_id: &str,
    spec_ref: &str,
    branch: &str,
    base: (&str, &str),
) -> Result<PathBuf> {
    ensure_local_excludes(git)?;
    prepare_task_worktree(git, repo_root, task_id, spec_ref, branch, base)
}

/// [`ensure_task_worktree`] for a caller that has made sure of the local excludes already
/// ([`ensure_local_excludes`]): safe to run for several tasks at once. `base` is the base
/// branch's name and tip: a new task branch starts there, and the checkout gets a branch of that
/// name (and `origin/<name>`) at that commit, for agents that compare their work with it.
pub fn prepare_task_worktree(
    git: &Git,
    repo_root: &Path,
    task_id: &str,
    spec_ref: &str,
    branch: &str,
    base: (&str, &str),
) -> Result<PathBuf> {
    let (base_branch, base_commit) = base;
    check_name("task id", task_id)?;
    if crate::task::file::id_problem(task_id).is_some() || branch != crate::task::file::task_branch(task_id) {
        return Err(Error::other(format!(
            "{branch:?} is not the branch of task {task_id:?}"
        )));
    }
    let path = task_worktree_path(repo_root, task_id);
    let branch_ref = format!("refs/heads/{branch}");
    let common = common_dir(git)?;
    clear_stale_lock(&common.join(format!("{branch_ref}.lock")))?;

    let base_tip = git.rev_parse(base_commit)?.unwrap_or_default();
    let mut tip = match git.rev_parse(&branch_ref)? {
        Some(t) => t,
        None => {
            let Some(base) = git.rev_parse(base_commit)? else {
                return Err(Error::other(format!(
                    "cannot create branch {branch}: {base_commit} is not a commit"
                )));
            };
            set_task_ref(git, branch, &base, None)?;
            base
        }
    };

    if path.join(".git").is_file() {
        retire_linked_worktree(git, &path, task_id, spec_ref, branch)?;
        tip = git.rev_parse(&branch_ref)?.unwrap_or(tip);
    }
    if path.join(".git").is_dir() {
        let c = checkout_git(&path);
        let reused = (|| -> Result<()> {
            clear_interrupted_operations(&c)?;
            let on = c.output(["symbolic-ref", "-q", "HEAD"])?;
            let on_branch = String::from_utf8_lossy(&on.stdout).trim() == branch_ref;
            if on_branch && is_dirty(&c)? {
                commit_all(
                    &c,
                    "hyperloop: uncommitted work left by an interrupted worker",
                    spec_ref,
                    task_id,
                )?;
            }
            // Commits a dead agent made that never came back: taken in, when they build on
            // the branch; anything else in the checkout is not the task's.
            if let Some(theirs) = c.rev_parse(&branch_ref)?
                && theirs != tip
                && c.succeeds(["merge-base", "--is-ancestor", tip.as_str(), theirs.as_str()])?
                && let Ok(Some(new)) = import(git, &path, &branch_ref, task_id, &tip, Some(branch))
            {
                tip = new;
            }
            c.run_with_input(
                ["update-ref", "--stdin"],
                base_refs(base_branch, &base_tip).as_bytes(),
            )?;
            c.run(["checkout", "-q", "--force", "-B", branch, tip.as_str()])?;
            Ok(())
        })();
        if reused.is_ok() {
            return Ok(path);
        }
        remove_dir(&path)?;
    } else if path.exists() {
        remove_dir(&path)?;
    }
    make_checkout(git, &common, &path, &base_refs(base_branch, &base_tip))?;
    Git::pinned(&path).run(["checkout", "-q", "--force", "-B", branch, tip.as_str()])?;
    super::agent_user::give(&path)?;
    Ok(path)
}

/// Points a task checkout's copy of the base branch at `base_tip` (the base moves as other
/// tasks merge; a rebase-resolver merges what is there now).
pub fn refresh_base(path: &Path, base_branch: &str, base_tip: &str) -> Result<()> {
    let input = base_refs(base_branch, base_tip);
    if input.is_empty() {
        return Ok(());
    }
    checkout_git(path).run_with_input(["update-ref", "--stdin"], input.as_bytes())?;
    Ok(())
}

/// `update-ref --stdin` input that sets the base branch (and its `origin/` twin) in a checkout.
fn base_refs(base_branch: &str, base_tip: &str) -> String {
    if base_tip.is_empty() || base_branch.is_empty() {
        return String::new();
    }
    format!(
        "update refs/heads/{base_branch} {base_tip}\nupdate refs/remotes/origin/{base_branch} {base_tip}\n"
    )
}

/// A git config value in double quotes.
fn quoted(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Creates an empty repository at `path` that borrows the objects of the repository whose common
/// git directory is `common`, with the base refs of `refs` (`update-ref --stdin` lines). Its
/// files are written directly — a repository is a handful of small files — so the only git
/// command a new checkout costs is the checkout itself, as a worktree's did.
fn make_checkout(git: &Git, common: &Path, path: &Path, refs: &str) -> Result<()> {
    // Written aside and renamed into place: a step killed half way leaves no `.git` that looks
    // like a repository without being one.
    let gitdir = path.join(".git-partial");
    let io = |p: &Path, e: std::io::Error| Error::io(p, e);
    if gitdir.exists() {
        std::fs::remove_dir_all(&gitdir).map_err(|e| io(&gitdir, e))?;
    }
    for dir in ["objects/info", "objects/pack", "refs/heads", "refs/tags", "info"] {
        let d = gitdir.join(dir);
        std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
    }
    let objects = std::path::absolute(common.join("objects")).map_err(|e| io(common, e))?;
    let write = |rel: &str, text: &str| -> Result<()> {
        let f = gitdir.join(rel);
        std::fs::write(&f, text).map_err(|e| Error::io(&f, e))
    };
    write("objects/info/alternates", &format!("{}\n", objects.display()))?;
    // Unborn until the checkout that follows points it somewhere.
    write("HEAD", "ref: refs/heads/hyperloop-unborn\n")?;
    let sha256 = refs
        .split_whitespace()
        .any(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()));
    let mut config = if sha256 {
        "[core]\n\trepositoryformatversion = 1\n".to_string()
    } else {
        "[core]\n\trepositoryformatversion = 0\n".to_string()
    };
    config.push_str("\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n");
    if sha256 {
        config.push_str("[extensions]\n\tobjectformat = sha256\n");
    }
    // The repository's `origin`, without any credential: agents may read from it as people do.
    if let Some(url) = origin_url(git, common)? {
        config.push_str(&format!(
            "[remote \"origin\"]\n\turl = {}\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n",
            quoted(&url)
        ));
    }
    write("config", &config)?;
    write("description", "a hyperloop agent's checkout\n")?;
    ensure_local_excludes_in(&gitdir)?;
    for line in refs.lines() {
        let mut words = line.split_whitespace().skip(1);
        let (Some(name), Some(oid)) = (words.next(), words.next()) else {
            continue;
        };
        let file = gitdir.join(name);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        std::fs::write(&file, format!("{oid}\n")).map_err(|e| io(&file, e))?;
    }
    let done = path.join(".git");
    std::fs::rename(&gitdir, &done).map_err(|e| io(&done, e))
}

/// `origin`'s URL in the repository, read once per process.
fn origin_url(git: &Git, common: &Path) -> Result<Option<String>> {
    static CACHE: std::sync::Mutex<Option<(PathBuf, Option<String>)>> = std::sync::Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((dir, url)) = cache.as_ref()
        && dir == common
    {
        return Ok(url.clone());
    }
    let out = git.output(["config", "--get", "remote.origin.url"])?;
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let url = (out.status.success() && !url.is_empty()).then_some(url);
    *cache = Some((common.to_path_buf(), url.clone()));
    Ok(url)
}

fn remove_dir(path: &Path) -> Result<()> {
    super::agent_user::remove_tree(path)
}

/// A checkout made by an older hyperloop as a linked worktree of the repository (sharing its
/// refs): its uncommitted work is committed on the task's branch, then the worktree goes.
fn retire_linked_worktree(git: &Git, path: &Path, task_id: &str, spec_ref: &str, branch: &str) -> Result<()> {
    let wt = git.at(path);
    let on = wt.output(["symbolic-ref", "-q", "HEAD"])?;
    if String::from_utf8_lossy(&on.stdout).trim() == format!("refs/heads/{branch}") {
        let _ = clear_interrupted_operations(&wt);
        if is_dirty(&wt).unwrap_or(false) {
            commit_all(
                &wt,
                "hyperloop: uncommitted work left by an interrupted worker",
                spec_ref,
                task_id,
            )?;
        }
    }
    remove_worktree(git, path)?;
    let tip = git.rev_parse(&format!("refs/heads/{branch}"))?;
    note_task_ref(branch, tip.as_deref());
    Ok(())
}

/// Brings what an agent left at `source` in its checkout into the repository, after checking
/// that it builds on `base` (the commit the agent was given). With `branch`, the task's branch
/// moves there (compare-and-swap from `base`); without, the commit is only made available (for
/// intake and the process improver, whose changes are read from it). Returns the commit, or
/// `None` when the agent changed nothing.
///
/// The agent's checkout is read, never trusted: a tip that does not descend from `base` is
/// refused, and only the one ref named is looked at.
pub fn import(
    git: &Git,
    checkout: &Path,
    source: &str,
    _key: &str,
    base: &str,
    branch: Option<&str>,
) -> Result<Option<String>> {
    let agent = checkout_git(checkout);
    let Some(tip) = agent.rev_parse(source)? else {
        return Err(Error::other(format!("the agent's checkout has no {source}")));
    };
    if tip == base {
        return Ok(None);
    }
    {
        // The agent's new objects, packed in its checkout (as the agent user, when there is
        // one: no git of hyperloop's reads that repository's configuration), and unpacked here
        // by git, which hashes every object as it writes it and checks each one: the pack is
        // only data. Two processes, no transport negotiation.
        let wanted = format!("{tip}\n^{base}\n");
        let pack = agent.run_bytes(["pack-objects", "--revs", "--stdout", "-q"], wanted.as_bytes())?;
        if pack.len() > MAX_IMPORT_BYTES {
            return Err(Error::other(format!(
                "the agent's commits come to {} bytes, more than the {MAX_IMPORT_BYTES} hyperloop takes in",
                pack.len()
            )));
        }
        git.run_bytes(["unpack-objects", "-q", "--strict"], &pack)?;
    }
    let descends = git.succeeds(["merge-base", "--is-ancestor", base, tip.as_str()])?;
    if !descends {
        return Err(Error::other(format!(
            "the agent's {source} ({}) does not build on the commit it was given ({}); nothing of it is taken",
            short(&tip),
            short(base)
        )));
    }
    if let Some(branch) = branch {
        set_task_ref(git, branch, &tip, Some(base))?;
    }
    Ok(Some(tip))
}

/// Takes in the commits of a task branch from a bundle that `hyperloop work` wrote, after
/// checking that the bundle holds exactly `refs/heads/<branch>` and nothing else, that git
/// verifies it against this repository, and that its tip descends from `base` (the commit the
/// agent was given). Moves no branch; returns the tip, whose objects are now in the repository.
///
/// The bundle comes from a runner hyperloop does not trust: it is read as data only (a bundle
/// carries no configuration or hooks), and everything it claims is checked.
pub fn import_bundle(git: &Git, bundle: &Path, branch: &str, key: &str, base: &str) -> Result<String> {
    let shown = bundle.to_string_lossy().into_owned();
    let want = format!("refs/heads/{branch}");
    let heads = git
        .run(["bundle", "list-heads", shown.as_str()])
        .map_err(|e| Error::other(format!("not a readable git bundle: {e}")))?;
    let listed: Vec<(&str, &str)> = heads.lines().filter_map(|l| l.trim().split_once(' ')).collect();
    let tip = match listed.as_slice() {
        [(tip, name)] if *name == want => (*tip).to_string(),
        _ => {
            let names: Vec<&str> = listed.iter().map(|(_, n)| *n).collect();
            return Err(Error::other(format!(
                "the bundle must hold exactly {want}; it holds [{}]",
                names.join(", ")
            )));
        }
    };
    if tip.len() != 40 || !tip.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::other(format!("the bundle names {tip:?}, not a commit id")));
    }
    git.run(["bundle", "verify", "--quiet", shown.as_str()])
        .map_err(|e| Error::other(format!("the bundle does not verify against this repository: {e}")))?;
    let incoming = format!("refs/hyperloop/incoming/{key}");
    git.run([
        "fetch",
        "--quiet",
        "--no-tags",
        "--no-write-fetch-head",
        shown.as_str(),
        &format!("+{want}:{incoming}"),
    ])?;
    let fetched = git.rev_parse(&incoming)?;
    let descends = fetched.as_deref() == Some(tip.as_str())
        && git.succeeds(["merge-base", "--is-ancestor", base, tip.as_str()])?;
    let _ = git.output(["update-ref", "-d", incoming.as_str()]);
    if !descends {
        return Err(Error::other(format!(
            "the bundle's {want} ({}) does not build on the commit the agent was given ({}); nothing of it is taken",
            short(&tip),
            short(base)
        )));
    }
    Ok(tip)
}

fn short(oid: &str) -> &str {
    oid.get(..12).unwrap_or(oid)
}

/// The most an agent's run may add to the repository (its new objects, packed).
const MAX_IMPORT_BYTES: usize = 512 << 20;

/// Where hyperloop last put each task branch of this repository (`None`: deleted). A task
/// branch that is anywhere else was moved by something other than hyperloop.
static TASK_REFS: std::sync::Mutex<Option<std::collections::HashMap<String, Option<String>>>> =
    std::sync::Mutex::new(None);

fn task_refs() -> std::sync::MutexGuard<'static, Option<std::collections::HashMap<String, Option<String>>>> {
    TASK_REFS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records where hyperloop put a task branch.
pub fn note_task_ref(branch: &str, tip: Option<&str>) {
    if let Some(map) = task_refs().as_mut() {
        map.insert(branch.to_string(), tip.map(str::to_string));
    }
}

/// Moves (or creates, with `old` `None`) a task branch, compare-and-swap, and records it.
pub fn set_task_ref(git: &Git, branch: &str, new: &str, old: Option<&str>) -> Result<()> {
    let refname = format!("refs/heads/{branch}");
    let zero = "0".repeat(40);
    let mut guard = task_refs();
    git.run([
        "update-ref",
        "-m",
        "hyperloop",
        refname.as_str(),
        new,
        old.unwrap_or(&zero),
    ])?;
    if let Some(map) = guard.as_mut() {
        map.insert(branch.to_string(), Some(new.to_string()));
    }
    Ok(())
}

/// Deletes a task branch and records it.
pub fn delete_task_ref(git: &Git, branch: &str) -> Result<()> {
    let mut guard = task_refs();
    let out = git.output(["branch", "-D", branch])?;
    if let Some(map) = guard.as_mut() {
        map.insert(branch.to_string(), None);
    }
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Starts watching the task branches of the repository: what they are now is hyperloop's.
pub fn watch_task_refs(git: &Git) -> Result<()> {
    let mut guard = task_refs();
    let map = guard.get_or_insert_with(Default::default);
    map.clear();
    for (name, oid) in list_task_refs(git)? {
        map.insert(name, Some(oid));
    }
    Ok(())
}

fn list_task_refs(git: &Git) -> Result<Vec<(String, String)>> {
    // Checked after every agent run: read from the files (packed-refs, then the loose refs that
    // override it) rather than with a git process, unless the repository keeps refs otherwise.
    if let Some(common) = common_dir_of(git)
        && !common.join("reftable").exists()
        && let Some(found) = read_files_refs(&common)
    {
        return Ok(found);
    }
    let out = git.run([
        "for-each-ref",
        "--format=%(refname:strip=2) %(objectname)",
        "refs/heads/worker/",
    ])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, o)| (n.to_string(), o.to_string()))
        .collect())
}

/// [`common_dir_of`], as an error when git cannot tell.
fn common_dir(git: &Git) -> Result<PathBuf> {
    match common_dir_of(git) {
        Some(c) => Ok(c),
        None => git.common_dir(),
    }
}

/// The common git directory of the repository `git` works in, looked up once per directory.
fn common_dir_of(git: &Git) -> Option<PathBuf> {
    static CACHE: std::sync::Mutex<Option<(PathBuf, PathBuf)>> = std::sync::Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((dir, common)) = cache.as_ref()
        && dir == git.dir()
    {
        return Some(common.clone());
    }
    let common = git.common_dir().ok()?;
    *cache = Some((git.dir().to_path_buf(), common.clone()));
    Some(common)
}

/// `worker/*` branches from a files-backend repository; `None` when something there is not
/// understood (the caller asks git instead).
fn read_files_refs(common: &Path) -> Option<Vec<(String, String)>> {
    let mut refs: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    match std::fs::read_to_string(common.join("packed-refs")) {
        Ok(text) => {
            for line in text.lines() {
                if line.starts_with('#') || line.starts_with('^') {
                    continue;
                }
                let (oid, name) = line.split_once(' ')?;
                if let Some(branch) = name.strip_prefix("refs/heads/")
                    && branch.starts_with("worker/")
                {
                    refs.insert(branch.to_string(), oid.to_string());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) => return None,
    }
    let root = common.join("refs").join("heads");
    let mut stack = vec![root.join("worker")];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => return None,
        };
        for entry in entries {
            let entry = entry.ok()?;
            let path = entry.path();
            if entry.file_type().ok()?.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.strip_prefix(&root).ok()?.to_str()?.to_string();
            if name.ends_with(".lock") {
                continue;
            }
            let text = std::fs::read_to_string(&path).ok()?;
            let oid = text.trim();
            if oid.starts_with("ref:") || !oid.bytes().all(|b| b.is_ascii_hexdigit()) {
                // A symbolic ref or something odd: git knows better.
                return None;
            }
            refs.insert(name, oid.to_string());
        }
    }
    Some(refs.into_iter().collect())
}

/// A task branch found where hyperloop did not put it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedRef {
    pub branch: String,
    pub expected: Option<String>,
    pub found: Option<String>,
}

/// Checks every task branch against where hyperloop put it; a branch moved, made or deleted by
/// anything else is put back (or removed) and reported. Does nothing until
/// [`watch_task_refs`] ran.
pub fn restore_task_refs(git: &Git) -> Result<Vec<MovedRef>> {
    let mut guard = task_refs();
    let Some(map) = guard.as_mut() else {
        return Ok(Vec::new());
    };
    let now: std::collections::HashMap<String, String> = list_task_refs(git)?.into_iter().collect();
    let mut moved = Vec::new();
    for (branch, found) in &now {
        let expected = map.get(branch).cloned().flatten();
        if expected.as_deref() != Some(found.as_str()) {
            moved.push(MovedRef {
                branch: branch.clone(),
                expected,
                found: Some(found.clone()),
            });
        }
    }
    for (branch, expected) in map.iter() {
        if let Some(e) = expected
            && !now.contains_key(branch)
        {
            moved.push(MovedRef {
                branch: branch.clone(),
                expected: Some(e.clone()),
                found: None,
            });
        }
    }
    for m in &moved {
        let refname = format!("refs/heads/{}", m.branch);
        match &m.expected {
            Some(e) => {
                git.run([
                    "update-ref",
                    "-m",
                    "hyperloop: restored",
                    refname.as_str(),
                    e.as_str(),
                ])?;
            }
            None => {
                git.run(["update-ref", "-d", refname.as_str()])?;
            }
        }
    }
    moved.sort_by(|a, b| a.branch.cmp(&b.branch));
    Ok(moved)
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

/// A clean checkout detached at `commit`, for workers that do not belong to a task (intake,
/// process improvement): a repository of its own, like a task's. Whatever a previous run left in
/// it is discarded: its results were taken from its commits, which the caller records.
pub fn ensure_base_worktree(git: &Git, repo_root: &Path, name: &str, commit: &str) -> Result<PathBuf> {
    check_name("worktree name", name)?;
    ensure_local_excludes(git)?;
    let Some(commit) = git.rev_parse(commit)? else {
        return Err(Error::other(format!(
            "cannot check out {commit} for {name}: not a commit"
        )));
    };
    let path = base_worktree_path(repo_root, name);
    if path.join(".git").is_file() {
        remove_worktree(git, &path)?;
    }
    if path.join(".git").is_dir() {
        let c = checkout_git(&path);
        let reset = clear_interrupted_operations(&c)
            .and_then(|()| c.run(["checkout", "-q", "--force", "--detach", commit.as_str()]))
            .and_then(|_| c.run(["clean", "-q", "-ffd"]));
        if reset.is_ok() {
            return Ok(path);
        }
    }
    remove_dir(&path)?;
    make_checkout(git, &common_dir(git)?, &path, "")?;
    Git::pinned(&path).run(["checkout", "-q", "--force", "--detach", commit.as_str()])?;
    super::agent_user::give(&path)?;
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
