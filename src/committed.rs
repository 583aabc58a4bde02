//! One rule for what a step sees: everything comes from the commit at the tip of the base branch
//! (task state from the state branch) — the configuration and the agents overlay included, as in
//! CI, where the checkout is that commit. An uncommitted edit in the working tree is not used; a
//! warning names it, so that nobody wonders why a change "did nothing".
//!
//! `--config FILE` is the exception: a file named on the command line is read as it is.

use std::path::{Path, PathBuf};

use crate::config::{self, Config};
use crate::error::{Error, Result};
use crate::state::Repo;

/// The configuration a step uses: `.hyperloop.yaml` as committed on the base branch. The branch
/// is the one the working tree's file names (read leniently, only for that key), else `main`; a
/// committed file that names another base branch is read from there. Without that branch, the
/// working tree's file is read (the preflight then stops on the missing branch).
pub fn load_config(repo: &Repo, file: &Path) -> Result<Config> {
    let env = std::env::var(config::BASE_REF_ENV).ok();
    let on_disk = std::fs::read_to_string(file).ok();
    let mut branch = on_disk
        .as_deref()
        .and_then(base_branch_in)
        .unwrap_or_else(|| Config::default().target.base_branch);
    for _ in 0..2 {
        let Some(text) = committed_text(repo, &branch, file)? else {
            break;
        };
        let config = Config::parse(file, &text, env.as_deref())?;
        if config.target.base_branch == branch {
            return Ok(config);
        }
        branch.clone_from(&config.target.base_branch);
    }
    Config::load(file, &repo.root)
}

/// The file's text at the tip of `branch`: `Some("")` when the branch has no such file (all
/// defaults), `None` when there is no such branch.
fn committed_text(repo: &Repo, branch: &str, file: &Path) -> Result<Option<String>> {
    let Some(tip) = repo.branch_tip(branch)? else {
        return Ok(None);
    };
    let rel = file
        .strip_prefix(&repo.root)
        .unwrap_or(file)
        .to_string_lossy()
        .into_owned();
    let Some(bytes) = repo.cat_object(&format!("{tip}:{rel}"))? else {
        return Ok(Some(String::new()));
    };
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Error::invalid(file, "document", "is not UTF-8 text"))
}

/// `target.base_branch` from configuration text, without judging the rest of it.
fn base_branch_in(text: &str) -> Option<String> {
    let value: serde_json::Value = crate::yaml::parse(Path::new(config::FILE_NAME), text).ok()?;
    value
        .get("target")?
        .get("base_branch")?
        .as_str()
        .map(str::to_string)
}

/// When the agents overlay is a folder in the repository whose working copy differs from the
/// base branch's commit, a copy of the committed folder (content-addressed under
/// `.hyperloop/state/overlays/`), for the step to read instead. `None` when the folder on disk
/// is what is committed, or the overlay is not such a folder.
pub fn committed_overlay(repo: &Repo, config: &Config) -> Result<Option<PathBuf>> {
    let Some(dir) = config.overlay_dir(&repo.root) else {
        return Ok(None);
    };
    let Ok(rel) = dir.strip_prefix(&repo.root) else {
        return Ok(None);
    };
    let rel = rel.to_string_lossy().trim_end_matches('/').to_string();
    if rel.is_empty() || changed_paths(repo, &[rel.as_str()])?.is_empty() {
        return Ok(None);
    }
    let Some(tip) = repo.branch_tip(&config.target.base_branch)? else {
        return Ok(None);
    };
    let Some(tree) = repo.git.rev_parse_object(&format!("{tip}:{rel}"))? else {
        return Ok(None);
    };
    let copy = repo.local_dir().join("state").join("overlays").join(&tree);
    if copy.is_dir() {
        return Ok(Some(copy));
    }
    let listing = repo.git.run(["ls-tree", "-r", "-z", &tree])?;
    let entries: Vec<(String, String)> = listing
        .split('\0')
        .filter_map(|e| {
            let (meta, path) = e.split_once('\t')?;
            let oid = meta.split_whitespace().nth(2)?;
            meta.contains(" blob ")
                .then(|| (path.to_string(), oid.to_string()))
        })
        .collect();
    let blobs = repo.cat_blobs(entries.iter().map(|(_, oid)| oid.as_str()))?;
    // Written beside its final name and moved into place, so a half-made copy is never used.
    let partial = copy.with_extension(format!("partial-{}", std::process::id()));
    for ((path, _), bytes) in entries.iter().zip(blobs) {
        let target = partial.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&target, bytes).map_err(|e| Error::io(&target, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    if std::fs::rename(&partial, &copy).is_err() {
        // Another process made the same copy first: theirs is identical.
        let _ = std::fs::remove_dir_all(&partial);
    }
    Ok(Some(copy))
}

/// Paths under `paths` (relative to the repository) with uncommitted changes, untracked files
/// included, as `git status` names them.
pub fn changed_paths(repo: &Repo, paths: &[&str]) -> Result<Vec<String>> {
    // Without optional locks: this `status` only reads, and must not hold the index lock a
    // concurrent publish to the same checkout needs.
    let mut args = vec![
        "--no-optional-locks",
        "status",
        "--porcelain",
        "-z",
        "--untracked-files=all",
        "--",
    ];
    args.extend_from_slice(paths);
    let out = repo.git.output(args)?;
    if !out.status.success() {
        return Ok(Vec::new());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut changed = Vec::new();
    let mut entries = text.split('\0');
    while let Some(entry) = entries.next() {
        if entry.len() < 4 {
            continue;
        }
        let (code, path) = entry.split_at(3);
        // A rename or copy is followed by its source path.
        if code.starts_with('R') || code.starts_with('C') {
            entries.next();
        }
        changed.push(path.to_string());
    }
    Ok(changed)
}

/// Uncommitted changes to the configuration, the overlay folder or the specs, which a step does
/// not see, for a warning.
pub fn unseen_changes(repo: &Repo, config: &Config, config_file: &Path) -> Result<Vec<String>> {
    let mut paths: Vec<String> = Vec::new();
    if let Ok(rel) = config_file.strip_prefix(&repo.root) {
        paths.push(rel.to_string_lossy().into_owned());
    }
    if let Some(dir) = config.overlay_dir(&repo.root)
        && let Ok(rel) = dir.strip_prefix(&repo.root)
        && !rel.as_os_str().is_empty()
    {
        paths.push(rel.to_string_lossy().trim_end_matches('/').to_string());
    }
    paths.push(config.target.specs_dir.trim_end_matches('/').to_string());
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    changed_paths(repo, &refs)
}
