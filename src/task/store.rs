//! Finding, reading and writing task files under `<root>/<specs_dir>/tasks/`.
//!
//! Writes are atomic (a temporary file in the same folder, then a rename), so a step killed in
//! the middle of a write leaves either the old file or the new one, never half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::task::{Task, file};

/// The task files of one checkout.
#[derive(Debug, Clone)]
pub struct TaskStore {
    root: PathBuf,
    specs_dir: String,
}

/// Name of the file (inside the tasks folder) that records which spec contents intake has taken in.
pub const INTAKE_RECORD: &str = ".intake.json";

/// Name of the file (inside the tasks folder) that counts failed intakes of one set of specs, so
/// a pm that keeps failing on the same specs is not paid again and again.
pub const INTAKE_FAILURES: &str = ".intake-failures.json";

/// Name of the file (inside the tasks folder) that holds the lease of a claimed intake: intake
/// has no task file to hold its claim. Not a `.md` file, so no loader takes it for a task.
pub const INTAKE_CLAIM: &str = ".intake-claim.json";

/// The lease of an intake claimed by `plan`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntakeClaim {
    #[serde(flatten)]
    pub claim: crate::task::Claim,
    /// Every spec (path → content hash) as it was when claimed: what the intake takes in.
    pub specs: BTreeMap<String, String>,
    /// The specs the pm is asked to turn into tasks (new or changed ones).
    pub process: Vec<String>,
}

/// Failed intakes of one set of specs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntakeFailures {
    /// The specs (path → content hash) the failing intakes were given.
    pub specs: BTreeMap<String, String>,
    pub attempts: u32,
    pub last_error: String,
    /// A fingerprint of the configuration and the agents the failing intakes ran with: when
    /// either changes, intake is tried again even on the same specs. Empty in older files.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub inputs: String,
}

impl TaskStore {
    pub fn new(root: impl Into<PathBuf>, specs_dir: impl Into<String>) -> Self {
        TaskStore {
            root: root.into(),
            specs_dir: specs_dir.into(),
        }
    }

    /// The tasks folder, relative to the checkout root.
    pub fn tasks_rel(&self) -> String {
        format!("{}/tasks", self.specs_dir.trim_end_matches('/'))
    }

    pub fn tasks_dir(&self) -> PathBuf {
        self.root.join(self.tasks_rel())
    }

    /// Path of a task's file, relative to the checkout root.
    pub fn task_rel(&self, id: &str) -> String {
        format!("{}/{id}.md", self.tasks_rel())
    }

    pub fn task_path(&self, id: &str) -> PathBuf {
        self.root.join(self.task_rel(id))
    }

    /// Reads every task file, sorted by id. A file that does not parse is an error naming it.
    pub fn load_all(&self) -> Result<Vec<Task>> {
        let dir = self.tasks_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "md") && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        let mut tasks = Vec::with_capacity(paths.len());
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let display = path.strip_prefix(&self.root).unwrap_or(&path);
            tasks.push(file::parse(display, &text)?);
        }
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(tasks)
    }

    /// Writes a task's file atomically. Returns the path relative to the root.
    pub fn write(&self, task: &Task) -> Result<String> {
        let rel = self.task_rel(&task.id);
        write_atomic(&self.root.join(&rel), file::render(task).as_bytes())?;
        Ok(rel)
    }

    /// The spec contents (path → content hash) the last successful intake took in.
    pub fn intake_record(&self) -> Result<BTreeMap<String, String>> {
        let path = self.tasks_dir().join(INTAKE_RECORD);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::invalid(
                    path.strip_prefix(&self.root).unwrap_or(&path),
                    "document",
                    e.to_string(),
                )
                .with_hint("delete the file to make the next step take every spec in again")
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Records what intake took in. Returns the path relative to the root.
    pub fn write_intake_record(&self, record: &BTreeMap<String, String>) -> Result<String> {
        let rel = format!("{}/{INTAKE_RECORD}", self.tasks_rel());
        let mut text = serde_json::to_string_pretty(record).map_err(|e| Error::other(e.to_string()))?;
        text.push('\n');
        write_atomic(&self.root.join(&rel), text.as_bytes())?;
        Ok(rel)
    }
}

/// Replaces `path` with `bytes` so that readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}
