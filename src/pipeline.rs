//! The process pipeline as data: the four primitives (`role`, `gate`, `loop`, `action`), exact
//! positions (a path of indices into the nested steps), and the pure transitions a verdict causes.
//! No I/O here: everything is a function of the process and a position.

use serde::{Deserialize, Serialize};

/// One step of a process pipeline (CONTRACT §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run a worker with the agent of this name.
    Role {
        name: String,
        on_pass: Option<String>,
        on_fail: Option<String>,
    },
    /// Wait for an external signal (local: `hyperloop approve`; GitHub: a label).
    Gate { name: String },
    /// Steps retried from the top when one of them fails.
    Loop { steps: Vec<Step> },
    /// An operation hyperloop performs itself (`merge-pr`, `mark-pr-ready`).
    Action { name: String },
}

/// The actions hyperloop knows how to perform.
pub const KNOWN_ACTIONS: &[&str] = &["merge-pr", "mark-pr-ready"];

/// A path of indices from the pipeline's top level down to a leaf (a role, gate or action).
/// `[1]` is the second top-level step; `[0, 2]` the third step inside the first (loop) step.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Position(pub Vec<usize>);
