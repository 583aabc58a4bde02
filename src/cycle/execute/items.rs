//! Work items of the fan-out (`plan` → `work` → `record`): an item's id, and the files of a
//! `work` output folder with the limits `record` reads them under.

use super::*;

/// Who holds a lease, as its claim's `owner` says.
pub const LEASE_OWNER: &str = "hyperloop plan";

/// The largest bundle `record` takes in from one output.
pub(super) const MAX_BUNDLE_BYTES: u64 = 512 << 20;

/// The largest `item.json` or `result.json` `record` reads.
pub(super) const MAX_META_BYTES: u64 = 1 << 20;

/// The longest detail recorded from an output (the rest is cut).
pub(super) const MAX_DETAIL_BYTES: usize = 64 << 10;

/// The files of an output folder.
pub(super) const ITEM_FILE: &str = "item.json";

pub(super) const RESULT_FILE: &str = "result.json";

pub(super) const BUNDLE_FILE: &str = "commits.bundle";

pub(super) const TRANSCRIPT_FILE: &str = "transcript.log";

/// The branch an intake output's bundle holds the pm's commits on: the pm works detached, and
/// a bundle needs a ref.
pub(super) const INTAKE_OUTPUT_BRANCH: &str = "hyperloop-intake-output";

/// The branch an improver output's bundle holds the improver's commits on (it works detached).
pub(super) const IMPROVER_OUTPUT_BRANCH: &str = "hyperloop-improver-output";

/// In the tasks folder: the lease of a process-improver run `plan` claimed, holding the
/// failures it is to learn from. Not a `.md` file, so no loader takes it for a task.
pub(super) const IMPROVER_CLAIM: &str = ".improver-claim.json";

/// In the tasks folder: failures `record` took in that no improver has seen yet. A `step`
/// keeps them in memory and runs the improver itself; the fan-out hands them from one `record`
/// to the next `plan` through this file.
pub(super) const IMPROVER_PENDING: &str = ".improver-pending.json";

/// The most failures kept waiting for the improver (the newest): one bad day must not grow
/// the file, or the prompt, without bound.
pub(super) const MAX_PENDING_FAILURES: usize = 20;

/// The lease of a process-improver run, as committed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct ImproverClaim {
    #[serde(flatten)]
    pub(super) claim: crate::task::Claim,
    pub(super) failures: Vec<FailureNote>,
}

/// Failures waiting for the improver, as committed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(super) struct ImproverPending {
    pub(super) failures: Vec<FailureNote>,
}

/// A JSON state file of the tasks folder, found in the listing of the tasks folder a state read
/// made (`blobs`: path → blob); `None` when there is none. No git process when there is none.
pub(super) fn read_state_file<T: serde::de::DeserializeOwned>(
    repo: &Repo,
    blobs: &BTreeMap<String, String>,
    path: &str,
) -> Result<Option<T>> {
    let Some(blob) = blobs.get(path) else {
        return Ok(None);
    };
    let bytes = repo
        .cat_blobs(std::iter::once(blob.as_str()))?
        .into_iter()
        .next()
        .unwrap_or_default();
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::invalid(path, "document", e.to_string())
            .with_hint("delete the file (commit the deletion) and run `hyperloop plan` again")
    })
}

/// One claimed agent run, as `plan --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkItem {
    /// Safe as a file name and as a matrix value.
    pub id: String,
    pub task_id: String,
    pub role: String,
    pub round: u32,
}

/// `item.json`: which lease an output answers.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ItemFile {
    pub(super) id: String,
    pub(super) task_id: String,
    pub(super) role: String,
    pub(super) round: u32,
    pub(super) nonce: String,
    pub(super) base: String,
}

/// `result.json`: what the agent's run amounted to.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ResultOut {
    pub(super) verdict: worker::Verdict,
    pub(super) findings: u32,
    pub(super) detail: String,
    #[serde(default)]
    pub(super) cost_usd: Option<f64>,
    #[serde(default)]
    pub(super) exit_code: Option<i32>,
    #[serde(default)]
    pub(super) duration_s: f64,
}

/// A work item's id: task, role and round for people, then a hash of the lease's nonce, so that
/// an item re-issued after its lease expired never has the id of the one it replaces.
pub(super) fn item_id(task_id: &str, role: &str, round: u32, nonce: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    nonce.hash(&mut h);
    let role: String = role
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{task_id}-{role}-r{round}-{:08x}", h.finish() & 0xffff_ffff)
}

/// Whether `id` could be an item id: it names a folder and a matrix entry, and goes into refs.
pub(super) fn valid_item_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && !id.starts_with(['-', '.'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids_are_safe_and_differ_by_nonce() {
        let a = item_id("task-001", "implementer", 0, "abc1");
        let b = item_id("task-001", "implementer", 0, "abc2");
        assert!(a.starts_with("task-001-implementer-r0-"), "{a}");
        assert_ne!(a, b);
        assert!(valid_item_id(&a));
        let intake = item_id(INTAKE_ID, "pm", 0, "abc1");
        assert!(intake.starts_with("intake-pm-r0-"), "{intake}");
        assert!(valid_item_id(&intake));
        for bad in ["", "../x", "-x", ".x", "a/b", "a b", "a..b"] {
            assert!(!valid_item_id(bad), "{bad:?}");
        }
    }
}
