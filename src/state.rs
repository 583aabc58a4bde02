//! Task state in git, without a checkout: tasks and specs are read from a commit's tree, changes
//! are written as blobs into a private index and committed with `commit-tree`, and the branch
//! moves by compare-and-swap. Nothing here touches a working tree, so a step killed at any
//! instant leaves either the old branch tip or the new one — the commit is the unit of truth.
//!
//! When the user has the branch checked out, [`Repo::publish`] carries their checkout along the
//! way a fast-forward would, keeping their uncommitted changes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::error::{Error, Result};
use crate::git::Git;
use crate::task::{Task, file};

/// A spec file as committed: path and content hash (git blob id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecBlob {
    pub path: String,
    pub hash: String,
}

/// The repository hyperloop works on.
#[derive(Debug, Clone)]
pub struct Repo {
    pub git: Git,
    /// Top of the user's working tree.
    pub root: PathBuf,
    /// The shared git directory.
    pub common_dir: PathBuf,
    /// What the private index holds, and trees of commits this process made: a step commits
    /// many times in a row on top of its own last commit, and each known tree is a git process
    /// saved.
    cache: std::sync::Arc<std::sync::Mutex<TreeCache>>,
    /// Started with the first blob a step writes.
    blobs: std::sync::Arc<std::sync::Mutex<Option<crate::git::BlobWriter>>>,
}

#[derive(Debug, Default)]
struct TreeCache {
    /// The tree the private index currently holds.
    index_tree: Option<String>,
    /// Commit → tree, for commits made or looked up by this process.
    trees: std::collections::HashMap<String, String>,
}

/// What a commit's tree holds that a step needs.
#[derive(Debug, Clone, Default)]
pub struct TreeState {
    pub tasks: Vec<Task>,
    pub specs: Vec<SpecBlob>,
    pub intake_record: BTreeMap<String, String>,
    /// Every path under the tasks folder, with its blob id (to detect what changed).
    pub task_blobs: BTreeMap<String, String>,
    /// Failed intakes of the current specs, if any.
    pub intake_failures: Option<crate::task::store::IntakeFailures>,
    /// The lease of an intake `plan` claimed, if one is out.
    pub intake_claim: Option<crate::task::store::IntakeClaim>,
}

/// One path's new state in a [`Changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file with this content.
    Content(Vec<u8>),
    /// An object already in the repository (e.g. from an agent's commit), with its file mode.
    Blob {
        mode: String,
        oid: String,
    },
    Delete,
}

/// A set of file changes to commit on top of a parent.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub files: BTreeMap<String, Entry>,
}

impl Changes {
    pub fn put(&mut self, path: impl Into<String>, content: impl Into<Vec<u8>>) {
        self.files.insert(path.into(), Entry::Content(content.into()));
    }

    pub fn put_blob(&mut self, path: impl Into<String>, mode: impl Into<String>, oid: impl Into<String>) {
        self.files.insert(
            path.into(),
            Entry::Blob {
                mode: mode.into(),
                oid: oid.into(),
            },
        );
    }

    pub fn delete(&mut self, path: impl Into<String>) {
        self.files.insert(path.into(), Entry::Delete);
    }

    /// Adds every change another set makes (later wins).
    pub fn extend(&mut self, other: Changes) {
        self.files.extend(other.files);
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn put_task(&mut self, tasks_rel: &str, task: &Task) {
        self.put(format!("{tasks_rel}/{}.md", task.id), file::render(task));
    }
}

/// Result of a merge computed without a checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeTree {
    Clean(String),
    Conflict(Vec<String>),
}

/// Outcome of moving a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    Moved,
    /// The branch was not where we expected: it is at this commit now.
    Raced(String),
}

impl Repo {
    /// Opens the repository that contains `path`.
    pub fn open(path: &Path) -> Result<Repo> {
        if !path.exists() {
            return Err(Error::usage(format!(
                "--path {}: no such directory",
                path.display()
            )));
        }
        let probe = Git::new(path);
        let (root, common_dir) = probe
            .toplevel_and_common_dir()
            .map_err(|_| Error::usage(format!("--path {}: not a git repository", path.display())))?;
        let git = Git::new(&root);
        Ok(Repo {
            cache: std::sync::Arc::default(),
            blobs: std::sync::Arc::default(),
            git,
            root,
            common_dir,
        })
    }

    /// Where hyperloop keeps local, uncommitted state (worktrees, logs, locks).
    pub fn local_dir(&self) -> PathBuf {
        self.root.join(".hyperloop")
    }

    /// The commit a branch points at.
    pub fn branch_tip(&self, branch: &str) -> Result<Option<String>> {
        self.git.rev_parse(&format!("refs/heads/{branch}"))
    }

    /// Reads tasks, specs and the intake record from `commit`'s tree.
    pub fn read_tree_state(&self, commit: &str, specs_dir: &str) -> Result<TreeState> {
        let specs_dir = specs_dir.trim_end_matches('/');
        let tasks_prefix = format!("{specs_dir}/tasks/");
        let listing = self
            .git
            .run(["ls-tree", "-r", "-z", "--full-tree", commit, "--", specs_dir])?;
        let mut state = TreeState::default();
        let mut wanted: Vec<(String, String)> = Vec::new();
        for entry in listing.split('\0').filter(|e| !e.is_empty()) {
            // "<mode> <type> <oid>\t<path>"
            let Some((meta, path)) = entry.split_once('\t') else {
                continue;
            };
            let mut parts = meta.split(' ');
            let (_mode, kind, oid) = (parts.next(), parts.next(), parts.next());
            let (Some("blob"), Some(oid)) = (kind, oid) else {
                continue;
            };
            if let Some(rest) = path.strip_prefix(&tasks_prefix) {
                state.task_blobs.insert(path.to_string(), oid.to_string());
                if (rest.ends_with(".md") && !rest.contains('/'))
                    || rest == crate::task::store::INTAKE_RECORD
                    || rest == crate::task::store::INTAKE_FAILURES
                    || rest == crate::task::store::INTAKE_CLAIM
                {
                    wanted.push((path.to_string(), oid.to_string()));
                }
                continue;
            }
            if is_spec_path(path, specs_dir) {
                state.specs.push(SpecBlob {
                    path: path.to_string(),
                    hash: oid.to_string(),
                });
            }
        }
        let contents = self.cat_task_blobs(&wanted)?;
        for ((path, _), bytes) in wanted.iter().zip(contents) {
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::invalid(path, "document", "the file is not valid UTF-8"))?;
            if path.ends_with(crate::task::store::INTAKE_FAILURES) {
                // Only a counter: a damaged one is treated as no failures rather than blocking.
                state.intake_failures = serde_json::from_str(&text).ok();
            } else if path.ends_with(crate::task::store::INTAKE_CLAIM) {
                state.intake_claim = Some(serde_json::from_str(&text).map_err(|e| {
                    Error::invalid(path, "document", e.to_string())
                        .with_hint("delete the file to let the next `hyperloop plan` claim intake again")
                })?);
            } else if path.ends_with(crate::task::store::INTAKE_RECORD) {
                state.intake_record = serde_json::from_str(&text).map_err(|e| {
                    Error::invalid(path, "document", e.to_string())
                        .with_hint("delete the file to make the next step take every spec in again")
                })?;
            } else {
                state.tasks.push(file::parse(Path::new(path), &text)?);
            }
        }
        state.tasks.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(state)
    }

    /// The task files' blobs, from the task cache where it has them, the rest from git.
    ///
    /// A repository hyperloop commits to holds its task files as loose objects (its plumbing
    /// commits never start git's automatic gc), and reading a thousand loose objects is a
    /// thousand files to open and inflate on every step, idle or not. The cache is one file of
    /// the blobs the last read wanted, keyed by object id: content-addressed, so an entry can
    /// only be right or absent; it is rewritten only when a read missed.
    fn cat_task_blobs(&self, wanted: &[(String, String)]) -> Result<Vec<Vec<u8>>> {
        let path = self.task_cache_path();
        let mut cached = std::fs::read(&path)
            .ok()
            .and_then(|b| parse_task_cache(&b))
            .unwrap_or_default();
        let missing: Vec<&str> = wanted
            .iter()
            .map(|(_, oid)| oid.as_str())
            .filter(|oid| !cached.contains_key(*oid))
            .collect();
        let distinct: HashSet<&str> = wanted.iter().map(|(_, oid)| oid.as_str()).collect();
        if !missing.is_empty() || cached.len() != distinct.len() {
            let fetched = self.cat_blobs(missing.iter().copied())?;
            for (oid, bytes) in missing.iter().zip(fetched) {
                cached.insert((*oid).to_string(), bytes);
            }
            let mut out = Vec::with_capacity(cached.len() * 400 + 32);
            out.extend_from_slice(TASK_CACHE_HEADER);
            for oid in &distinct {
                if let Some(bytes) = cached.get(*oid) {
                    out.extend_from_slice(format!("{oid} {}\n", bytes.len()).as_bytes());
                    out.extend_from_slice(bytes);
                    out.push(b'\n');
                }
            }
            // A cache: a failed write costs the next step a read from git, nothing else.
            let tmp = self
                .common_dir
                .join(format!("hyperloop-task-cache.tmp-{}", std::process::id()));
            if std::fs::write(&tmp, &out).is_ok() && std::fs::rename(&tmp, &path).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        wanted
            .iter()
            .map(|(path, oid)| {
                cached
                    .get(oid.as_str())
                    .cloned()
                    .ok_or_else(|| Error::other(format!("{path}: blob {oid} was not read")))
            })
            .collect()
    }

    fn task_cache_path(&self) -> PathBuf {
        self.common_dir.join("hyperloop-task-cache")
    }

    /// The content of the object a revision expression names (`<commit>:<path>`), or `None`
    /// when it names nothing: one git process, where looking the id up and then reading it
    /// would be two.
    pub fn cat_object(&self, rev: &str) -> Result<Option<Vec<u8>>> {
        if rev.contains(['\n', '\r']) {
            // The batch protocol is one name a line.
            return Ok(match self.git.rev_parse_object(rev)? {
                Some(oid) => self.cat_blobs(std::iter::once(oid.as_str()))?.into_iter().next(),
                None => None,
            });
        }
        let mut child = self.cat_file_batch()?;
        let fail = |e: std::io::Error| Error::Git {
            args: format!("cat-file --batch ({rev})"),
            dir: self.root.clone(),
            stderr: e.to_string(),
        };
        if let Some(mut stdin) = child.stdin.take() {
            // Dropped at the end of this block: git sees the end of its input.
            stdin.write_all(format!("{rev}\n").as_bytes()).map_err(fail)?;
        }
        let mut out = Vec::new();
        if let Some(mut stdout) = child.stdout.take() {
            stdout.read_to_end(&mut out).map_err(fail)?;
        }
        let _ = child.wait();
        // "<oid> <type> <size>\n<content>\n", or "<rev> missing" (or "ambiguous").
        let Some(eol) = out.iter().position(|b| *b == b'\n') else {
            return Ok(None);
        };
        let header = String::from_utf8_lossy(&out[..eol]).into_owned();
        let fields: Vec<&str> = header.split(' ').collect();
        let size = match fields.as_slice() {
            [oid, _kind, size] if oid.len() >= 40 && oid.bytes().all(|b| b.is_ascii_hexdigit()) => size
                .parse::<usize>()
                .map_err(|_| Error::other(format!("git cat-file: unexpected answer for {rev}: {header}")))?,
            _ => return Ok(None),
        };
        let body = out
            .get(eol + 1..eol + 1 + size)
            .ok_or_else(|| Error::other(format!("git cat-file: {rev} was cut short")))?;
        Ok(Some(body.to_vec()))
    }

    /// A `git cat-file --batch` reading from and answering through pipes.
    fn cat_file_batch(&self) -> Result<std::process::Child> {
        crate::git::helper_command("git")
            .current_dir(&self.root)
            .args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Git {
                args: "cat-file --batch".into(),
                dir: self.root.clone(),
                stderr: e.to_string(),
            })
    }

    /// Reads blobs by id with one `git cat-file --batch`.
    pub fn cat_blobs<'a>(&self, oids: impl Iterator<Item = &'a str>) -> Result<Vec<Vec<u8>>> {
        let oids: Vec<&str> = oids.collect();
        if oids.is_empty() {
            return Ok(Vec::new());
        }
        let fail = |e: std::io::Error| Error::Git {
            args: "cat-file --batch".into(),
            dir: self.root.clone(),
            stderr: e.to_string(),
        };
        let mut child = self.cat_file_batch()?;
        let mut input = String::with_capacity(oids.len() * 41);
        for oid in &oids {
            input.push_str(oid);
            input.push('\n');
        }
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| Error::other("git cat-file: no stdin"))?;
        // Feed from another thread so a large batch cannot deadlock on full pipes.
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::other("git cat-file: no stdout"))?;
        let mut reader = BufReader::new(stdout);
        let mut out = Vec::with_capacity(oids.len());
        let mut header = String::new();
        for oid in &oids {
            header.clear();
            reader.read_line(&mut header).map_err(fail)?;
            let size: usize = header
                .split(' ')
                .nth(2)
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    Error::other(format!(
                        "git cat-file: cannot read object {oid}: {}",
                        header.trim()
                    ))
                })?;
            let mut buf = vec![0u8; size + 1];
            reader.read_exact(&mut buf).map_err(fail)?;
            buf.truncate(size);
            out.push(buf);
        }
        let _ = writer.join();
        let _ = child.wait();
        Ok(out)
    }

    /// Writes `changes` on top of `tree_of` (a commit or tree) and returns the new tree id.
    pub fn write_tree(&self, tree_of: &str, changes: &Changes) -> Result<String> {
        let base = self.tree_of(tree_of)?;
        let index = self.index_path();
        let git = self
            .git
            .clone()
            .with_env("GIT_INDEX_FILE", index.display().to_string());
        let held = self.cache.lock().ok().and_then(|c| c.index_tree.clone());
        let result = (|| {
            if held.as_deref() != Some(base.as_str()) || !index.exists() {
                git.run(["read-tree", base.as_str()])?;
            }
            let mut index_info = String::new();
            for (path, entry) in &changes.files {
                match entry {
                    Entry::Content(bytes) => {
                        let oid = self.write_blob(bytes)?;
                        index_info.push_str(&format!("100644 {oid}\t{path}\n"));
                    }
                    Entry::Blob { mode, oid } => {
                        index_info.push_str(&format!("{mode} {oid}\t{path}\n"));
                    }
                    Entry::Delete => {
                        index_info.push_str(&format!("0 {}\t{}\n", "0".repeat(40), path));
                    }
                }
            }
            if !index_info.is_empty() {
                git.run_with_input(["update-index", "--index-info"], index_info.as_bytes())?;
            }
            git.run_trim(["write-tree"])
        })();
        if let Ok(mut c) = self.cache.lock() {
            // After a failure the index holds something in between: read it afresh next time.
            c.index_tree = result.as_ref().ok().cloned();
        }
        if result.is_err() {
            let _ = std::fs::remove_file(&index);
        }
        result
    }

    fn index_path(&self) -> PathBuf {
        self.common_dir
            .join(format!("hyperloop-index-{}", std::process::id()))
    }

    /// Removes this process's private index (and any a dead step left behind). Call with the
    /// step lock held.
    /// Writes a blob through the step's long-lived writer, or a git process of its own when the
    /// writer cannot be had.
    pub fn write_blob(&self, content: &[u8]) -> Result<String> {
        if let Ok(mut slot) = self.blobs.lock() {
            if slot.is_none() {
                *slot = self.git.blob_writer(&self.blob_scratch()).ok();
            }
            if let Some(writer) = slot.as_mut() {
                match writer.write(content) {
                    Ok(oid) => return Ok(oid),
                    Err(e) => {
                        tracing::debug!(error = %e, "the blob writer failed; writing blobs one by one");
                        *slot = None;
                    }
                }
            }
        }
        Ok(self
            .git
            .run_with_input(["hash-object", "-w", "--stdin"], content)?
            .trim()
            .to_string())
    }

    fn blob_scratch(&self) -> PathBuf {
        self.common_dir.join("hyperloop-blobs")
    }

    pub fn discard_private_indexes(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.index_tree = None;
        }
        let Ok(entries) = std::fs::read_dir(&self.common_dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("hyperloop-index-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // Scratch files of a writer that was killed mid-blob; ours are removed as they go.
        if let Ok(scratch) = std::fs::read_dir(self.blob_scratch()) {
            let own = format!("blob-{}-", std::process::id());
            for e in scratch.flatten() {
                if !e.file_name().to_string_lossy().starts_with(&own) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Creates a commit of `tree` with `parents` and `message`; returns its id.
    pub fn commit_tree(&self, tree: &str, parents: &[&str], message: &str) -> Result<String> {
        let mut args = vec!["commit-tree".to_string(), tree.to_string()];
        for p in parents {
            args.push("-p".into());
            args.push((*p).to_string());
        }
        let commit = self
            .git
            .run_with_input(&args, message.as_bytes())
            .map(|s| s.trim().to_string())?;
        if let Ok(mut c) = self.cache.lock() {
            c.trees.insert(commit.clone(), tree.to_string());
        }
        Ok(commit)
    }

    /// The tree id of a commit (or of a tree: itself).
    pub fn tree_of(&self, commit: &str) -> Result<String> {
        // Only object ids are cached: a ref name can move.
        let is_id =
            (commit.len() == 40 || commit.len() == 64) && commit.bytes().all(|b| b.is_ascii_hexdigit());
        if is_id && let Some(t) = self.cache.lock().ok().and_then(|c| c.trees.get(commit).cloned()) {
            return Ok(t);
        }
        let tree = self.git.run_trim(["rev-parse", &format!("{commit}^{{tree}}")])?;
        if is_id && let Ok(mut c) = self.cache.lock() {
            c.trees.insert(commit.to_string(), tree.clone());
        }
        Ok(tree)
    }

    /// Commits `changes` on top of `parent`. Returns `None` when they change nothing (hyperloop
    /// makes no empty commits).
    pub fn commit_changes(&self, parent: &str, changes: &Changes, message: &str) -> Result<Option<String>> {
        let tree = self.write_tree(parent, changes)?;
        // write_tree looked the parent's tree up (or knew it): this costs no process.
        if tree == self.tree_of(parent)? {
            return Ok(None);
        }
        self.commit_tree(&tree, &[parent], message).map(Some)
    }

    /// Moves `branch` from `old` to `new` if it is still at `old`, carrying along a checkout of
    /// the branch (the user's, or any worktree's) the way a fast-forward would.
    pub fn publish(&self, branch: &str, old: &str, new: &str) -> Result<Publish> {
        let checkout = self.worktree_on(&format!("refs/heads/{branch}"))?;
        self.publish_with(branch, old, new, checkout.as_deref())
    }

    /// [`Repo::publish`] when the caller already knows which checkout (if any) has the branch.
    pub fn publish_with(
        &self,
        branch: &str,
        old: &str,
        new: &str,
        checkout: Option<&Path>,
    ) -> Result<Publish> {
        self.finish_interrupted_publish()?;
        let refname = format!("refs/heads/{branch}");
        if checkout.is_some() {
            // The checkout is moved before the ref, so make sure the ref is where we think first;
            // without a checkout, update-ref's own compare-and-swap is enough.
            match self.git.rev_parse(&refname)? {
                Some(cur) if cur == old => {}
                Some(cur) => return Ok(Publish::Raced(cur)),
                None => return Ok(Publish::Raced(String::new())),
            }
        }
        if let Some(wt) = checkout {
            // Bring the checkout's index and files from `old` to `new`; refuses (and changes
            // nothing) if an uncommitted change of the user's touches a file that changed.
            let g = self.git.at(wt);
            let marker = self.publish_marker();
            let note = format!("{branch}\n{old}\n{new}\n{}\n", wt.display());
            crate::task::store::write_atomic(&marker, note.as_bytes())?;
            let out = read_tree_waiting_for_lock(&g, old, new)?;
            if !out.status.success() {
                let _ = std::fs::remove_file(&marker);
                return Err(Error::Other {
                    message: format!(
                        "cannot update the checkout of `{branch}` at {}: {}\n  hint: commit or stash your changes to these files, then run the step again",
                        wt.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
            crate::fault::point("publish-checkout-updated");
        }
        let out = self
            .git
            .output(["update-ref", "-m", "hyperloop", &refname, new, old])?;
        if out.status.success() {
            let _ = std::fs::remove_file(self.publish_marker());
            return Ok(Publish::Moved);
        }
        // Someone moved the branch between our check and the update: put the checkout back
        // where it was, so it does not hold our files as if they were the user's changes.
        if let Some(wt) = checkout {
            let back = read_tree_waiting_for_lock(&self.git.at(wt), new, old)?;
            if back.status.success() {
                let _ = std::fs::remove_file(self.publish_marker());
            }
        }
        let cur = self.git.rev_parse(&refname)?.unwrap_or_default();
        Ok(Publish::Raced(cur))
    }

    /// Notes a checkout being moved ahead of its branch, until the branch has moved too.
    fn publish_marker(&self) -> PathBuf {
        self.common_dir.join("hyperloop-publishing")
    }

    /// A step killed between moving a checkout and moving its branch leaves the checkout ahead
    /// of the branch (its files look like uncommitted changes, and every later publish would
    /// refuse to touch them). This takes such a checkout back to where its branch is.
    pub fn finish_interrupted_publish(&self) -> Result<()> {
        let marker = self.publish_marker();
        let Ok(note) = std::fs::read_to_string(&marker) else {
            return Ok(());
        };
        let lines: Vec<&str> = note.lines().collect();
        if let [branch, old, new, wt] = lines.as_slice()
            && self.git.rev_parse(&format!("refs/heads/{branch}"))?.as_deref() == Some(*old)
            && Path::new(wt).exists()
        {
            let out = read_tree_waiting_for_lock(&self.git.at(Path::new(wt)), new, old)?;
            if !out.status.success() {
                return Err(Error::Other {
                    message: format!(
                        "cannot return the checkout at {wt} to `{branch}` after an interrupted step: {}\n  hint: `git checkout {old} -- .` there (after saving your own changes), then run the step again",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
        }
        std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))
    }

    /// Files that differ between two commits under `prefix`, as entries ready to commit.
    pub fn diff_entries(&self, from: &str, to: &str, prefix: &str) -> Result<Vec<(String, Entry)>> {
        let out = self
            .git
            .run(["diff-tree", "-r", "-z", "--no-renames", from, to, "--", prefix])?;
        let mut fields = out.split('\0').filter(|f| !f.is_empty());
        let mut entries = Vec::new();
        // -z output: ":<old mode> <new mode> <old oid> <new oid> <status>" NUL "<path>" NUL
        while let (Some(meta), Some(path)) = (fields.next(), fields.next()) {
            let parts: Vec<&str> = meta.trim_start_matches(':').split(' ').collect();
            let (Some(mode), Some(oid), Some(status)) = (parts.get(1), parts.get(3), parts.get(4)) else {
                continue;
            };
            let entry = if status.starts_with('D') {
                Entry::Delete
            } else {
                Entry::Blob {
                    mode: (*mode).to_string(),
                    oid: (*oid).to_string(),
                }
            };
            entries.push((path.to_string(), entry));
        }
        Ok(entries)
    }

    /// Merges `theirs` into `ours` without a checkout. Clean: the merged tree. Conflicts: the
    /// conflicting paths.
    pub fn merge_tree(&self, ours: &str, theirs: &str) -> Result<MergeTree> {
        let out = self.git.output([
            "merge-tree",
            "--write-tree",
            "--name-only",
            "--no-messages",
            ours,
            theirs,
        ])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut lines = stdout.lines();
        let tree = lines.next().unwrap_or_default().trim().to_string();
        match out.status.code() {
            Some(0) => Ok(MergeTree::Clean(tree)),
            Some(1) => Ok(MergeTree::Conflict(
                lines.filter(|l| !l.is_empty()).map(str::to_string).collect(),
            )),
            _ => Err(Error::Git {
                args: format!("merge-tree --write-tree {ours} {theirs}"),
                dir: self.root.clone(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    /// Replays the commit `commit` (whose parent is `onto_old`) onto `onto_new`. `None` when
    /// the two conflict.
    pub fn replay(&self, commit: &str, onto_old: &str, onto_new: &str) -> Result<Option<String>> {
        let out = self.git.output([
            "merge-tree",
            "--write-tree",
            "--no-messages",
            &format!("--merge-base={onto_old}"),
            onto_new,
            commit,
        ])?;
        if !out.status.success() {
            return Ok(None);
        }
        let tree = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        // A merge commit stays a merge: only its first parent (the state it was made on) moves.
        let raw = self.git.run(["cat-file", "commit", commit])?;
        let (header, message) = raw.split_once("\n\n").unwrap_or((raw.as_str(), ""));
        let mut parents = vec![onto_new];
        parents.extend(header.lines().filter_map(|l| l.strip_prefix("parent ")).skip(1));
        self.commit_tree(&tree, &parents, message).map(Some)
    }

    /// The worktree (if any) that has `refname` checked out.
    pub fn worktree_on(&self, refname: &str) -> Result<Option<PathBuf>> {
        let list = {
            let _held = crate::worker::worktree::admin_lock();
            crate::worker::worktree::list_worktrees(&self.git)?
        };
        let mut current: Option<PathBuf> = None;
        for line in list.lines() {
            if let Some(p) = line.strip_prefix("worktree ") {
                current = Some(PathBuf::from(p));
            } else if let Some(b) = line.strip_prefix("branch ")
                && b == refname
                && let Some(p) = &current
            {
                if line_is_bare(p) {
                    return Ok(None);
                }
                return Ok(Some(p.clone()));
            }
        }
        Ok(None)
    }
}

fn line_is_bare(p: &Path) -> bool {
    !p.join(".git").exists() && p.join("HEAD").exists() && p.join("objects").exists()
}

/// True for Markdown specs people write: under the specs folder, not in its tasks, reviews or
/// prompts folders.
pub fn is_spec_path(path: &str, specs_dir: &str) -> bool {
    let Some(rest) = path.strip_prefix(specs_dir).and_then(|r| r.strip_prefix('/')) else {
        return false;
    };
    if !rest.ends_with(".md") {
        return false;
    }
    let first = rest.split('/').next().unwrap_or_default();
    !(rest.contains('/') && matches!(first, "tasks" | "reviews" | "prompts"))
}

/// `read-tree -m -u from to` in a checkout, waiting a little for its index lock: the user's own
/// `git status` (or an editor's) takes that lock for a moment to refresh the index, and a step
/// that publishes at that moment must not fail for it.
fn read_tree_waiting_for_lock(git: &Git, from: &str, to: &str) -> Result<std::process::Output> {
    let mut out = git.output(["read-tree", "-m", "-u", from, to])?;
    for _ in 0..40 {
        if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("index.lock") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        out = git.output(["read-tree", "-m", "-u", from, to])?;
    }
    Ok(out)
}

const TASK_CACHE_HEADER: &[u8] = b"hyperloop task cache 1\n";

/// The id git gives a blob of `content` (SHA-1, or SHA-256 in a repository of that format).
fn blob_id(content: &[u8], sha256: bool) -> String {
    let algorithm = if sha256 {
        &ring::digest::SHA256
    } else {
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY
    };
    let mut ctx = ring::digest::Context::new(algorithm);
    ctx.update(format!("blob {}\0", content.len()).as_bytes());
    ctx.update(content);
    ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The task cache's entries (`<oid> <length>\n<bytes>\n` after the header), or `None` for a file
/// that is not a whole cache of this format.
fn parse_task_cache(bytes: &[u8]) -> Option<HashMap<String, Vec<u8>>> {
    let mut rest = bytes.strip_prefix(TASK_CACHE_HEADER)?;
    let mut entries = HashMap::new();
    while !rest.is_empty() {
        let eol = rest.iter().position(|b| *b == b'\n')?;
        let line = std::str::from_utf8(&rest[..eol]).ok()?;
        let (oid, len) = line.split_once(' ')?;
        let len: usize = len.parse().ok()?;
        if !(oid.len() == 40 || oid.len() == 64) || !oid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let body = rest.get(eol + 1..eol + 1 + len)?;
        if rest.get(eol + 1 + len) != Some(&b'\n') {
            return None;
        }
        // The git directory is writable by whoever runs as this user, an agent included: an
        // entry counts only if its content is what its id names.
        if blob_id(body, oid.len() == 64) != oid {
            return None;
        }
        entries.insert(oid.to_string(), body.to_vec());
        rest = &rest[eol + 2 + len..];
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::{TASK_CACHE_HEADER, is_spec_path, parse_task_cache};

    #[test]
    fn a_task_cache_is_read_whole_or_not_at_all() {
        // `git hash-object` of "hello".
        let oid = "b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0".to_string();
        let mut file = TASK_CACHE_HEADER.to_vec();
        file.extend_from_slice(format!("{oid} 5\nhello\n").as_bytes());
        let read = parse_task_cache(&file).expect("a whole cache");
        assert_eq!(read.get(&oid).map(Vec::as_slice), Some(&b"hello"[..]));
        // Cut anywhere, or of another format: not used.
        for cut in 1..file.len() {
            if cut == TASK_CACHE_HEADER.len() {
                continue;
            }
            assert!(parse_task_cache(&file[..cut]).is_none(), "cut at {cut}");
        }
        assert!(parse_task_cache(b"hyperloop task cache 2\n").is_none());
        let mut bad = TASK_CACHE_HEADER.to_vec();
        bad.extend_from_slice(b"not-an-oid 1\nx\n");
        assert!(parse_task_cache(&bad).is_none());
        // Content that is not what its id names (planted, or damaged): not used.
        let mut forged = TASK_CACHE_HEADER.to_vec();
        forged.extend_from_slice(format!("{oid} 5\nhellO\n").as_bytes());
        assert!(parse_task_cache(&forged).is_none());
    }

    #[test]
    fn spec_paths() {
        assert!(is_spec_path("specs/auth.md", "specs"));
        assert!(is_spec_path("specs/area/billing.md", "specs"));
        assert!(!is_spec_path("specs/tasks/task-001.md", "specs"));
        assert!(!is_spec_path("specs/reviews/task-001.md", "specs"));
        assert!(!is_spec_path("specs/prompts/x.md", "specs"));
        assert!(!is_spec_path("specs/notes.txt", "specs"));
        assert!(!is_spec_path("other/auth.md", "specs"));
        assert!(!is_spec_path("specsx/auth.md", "specs"));
    }
}
