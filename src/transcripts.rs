//! Agent transcripts that outlive the machine they were written on. When
//! `HYPERLOOP_TRANSCRIPTS_DIR` names a folder (the Action sets one under the runner's temporary
//! directory and uploads it as a workflow artifact), every agent run a command records leaves a
//! redacted copy of its transcript there, as `<task>/<role>-round-<N>.log`. The logs under
//! `.hyperloop/logs/` stay as they were written: they never leave the machine.

use std::path::{Path, PathBuf};

use crate::emit;
use crate::error::{Error, Result};
use crate::redact::Redactor;

/// The variable naming the folder transcripts are copied into.
pub const DIR_ENV: &str = "HYPERLOOP_TRANSCRIPTS_DIR";

/// The folder transcripts go to, when one is asked for.
pub fn dir() -> Option<PathBuf> {
    std::env::var_os(DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Writes `from`, redacted, to `to` (replacing it): what leaves the machine never holds a secret.
pub fn copy_redacted(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(|e| Error::io(from, e))?;
    let clean = Redactor::global().redact_bytes(&bytes);
    crate::task::store::write_atomic(to, &clean)
}

/// Copies the transcript of one agent run into the transcripts folder, when there is one and
/// the run left a transcript. A failure is a warning: the run's result counts all the same.
pub fn publish(log_file: &Path, task_id: &str, role: &str, round: u32) {
    let Some(root) = dir() else { return };
    if !log_file.is_file() || (crate::task::file::id_problem(task_id).is_some() && !is_own_id(task_id)) {
        return;
    }
    let folder = root.join(task_id);
    let result = std::fs::create_dir_all(&folder)
        .map_err(|e| Error::io(&folder, e))
        .and_then(|()| {
            let to = free_name(&folder, &format!("{role}-round-{round}"));
            copy_redacted(log_file, &to).map(|()| to)
        });
    match result {
        Ok(to) => emit!(
            DEBUG,
            "transcript_published",
            task_id = task_id,
            role = role,
            round = round,
            file = to.display().to_string().as_str()
        ),
        Err(e) => emit!(
            WARN,
            "transcript_not_published",
            task_id = task_id,
            role = role,
            error = e.to_string().as_str()
        ),
    }
}

/// The ids of runs that are not tasks' (intake, the process improver).
fn is_own_id(id: &str) -> bool {
    id == crate::task::INTAKE_ID || id == crate::task::IMPROVER_ID
}

/// `<stem>.log` in `folder`, or `<stem>-2.log`, … when a run of the same round is there already
/// (a retried task, a `run` of several steps).
fn free_name(folder: &Path, stem: &str) -> PathBuf {
    let mut k = 1;
    loop {
        let name = if k == 1 {
            format!("{stem}.log")
        } else {
            format!("{stem}-{k}.log")
        };
        let path = folder.join(name);
        if !path.exists() {
            return path;
        }
        k += 1;
    }
}

/// What the transcripts folder holds: each task (or `intake`, …) with its number of
/// transcripts, sorted by task.
pub fn listed(root: &Path) -> Vec<(String, usize)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(String, usize)> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let count = std::fs::read_dir(e.path())
                .ok()?
                .flatten()
                .filter(|f| f.path().is_file())
                .count();
            (count > 0).then_some((name, count))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_do_not_overwrite_and_listing_counts_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let task = dir.path().join("task-001");
        std::fs::create_dir_all(&task).expect("mkdir");
        let first = free_name(&task, "implementer-round-0");
        std::fs::write(&first, "a").expect("write");
        let second = free_name(&task, "implementer-round-0");
        assert_eq!(
            second.file_name().and_then(|n| n.to_str()),
            Some("implementer-round-0-2.log")
        );
        std::fs::write(&second, "b").expect("write");
        std::fs::create_dir_all(dir.path().join("empty")).expect("mkdir");
        assert_eq!(listed(dir.path()), vec![("task-001".to_string(), 2)]);
    }
}
