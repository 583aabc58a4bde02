//! Agent and Process documents: the built-in base compiled into the binary, overlay resolution
//! (a native subset of kustomize, with the real tool as a fallback for remote sources),
//! validation into typed [`Agent`]s and a [`Process`], and prompt composition ([`prompt`]).
//!
//! Resolution works on raw YAML values ([`Document`]) so that patches can touch any key; only the
//! final set of documents is validated, because a patch may legitimately fix up what another
//! resource left incomplete.

mod overlay;
mod parse;
pub mod prompt;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde_json::Value;

use crate::config::Config;
use crate::error::Result;
use crate::pipeline::Step;

pub use overlay::{build_overlay, is_base_alias};
pub use parse::{from_documents, step_to_value};

/// The only `apiVersion` Agent and Process documents may carry.
pub const API_VERSION: &str = "hyperloop.io/v1";

/// The annotation whose text describes the project to every worker of a role.
pub const PERSONA_ANNOTATION: &str = "ambient.io/persona";

/// The process picked when an overlay defines several.
pub const DEFAULT_PROCESS: &str = "default";

/// The files of `base/`, compiled in so that a fresh install needs neither files nor network.
/// The first entry is the kustomization that lists the others.
pub const BASE_FILES: &[(&str, &str)] = &[
    (
        "kustomization.yaml",
        include_str!("../../base/kustomization.yaml"),
    ),
    (
        "process-default.yaml",
        include_str!("../../base/process-default.yaml"),
    ),
    ("implementer.yaml", include_str!("../../base/implementer.yaml")),
    ("verifier.yaml", include_str!("../../base/verifier.yaml")),
    ("pm.yaml", include_str!("../../base/pm.yaml")),
    (
        "process-improver.yaml",
        include_str!("../../base/process-improver.yaml"),
    ),
    (
        "rebase-resolver.yaml",
        include_str!("../../base/rebase-resolver.yaml"),
    ),
];

/// How errors name a file of the built-in base (it has no path on disk).
pub const BASE_PREFIX: &str = "<built-in>/base";

/// An agent template: the prompt a role's worker receives, and annotations such as the persona.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub name: String,
    pub prompt: String,
    pub annotations: IndexMap<String, String>,
}

/// A process: the intake steps and the pipeline every task walks.
#[derive(Debug, Clone, PartialEq)]
pub struct Process {
    pub name: String,
    pub intake: Vec<Step>,
    pub pipeline: Vec<Step>,
}

/// The resolved definitions a step works with.
#[derive(Debug, Clone, PartialEq)]
pub struct Definitions {
    pub agents: BTreeMap<String, Agent>,
    pub process: Process,
}

/// One YAML document on its way through overlay resolution: its value, the file it came from,
/// and the patch files applied to it (errors blame the last of them).
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub origin: PathBuf,
    pub patched_by: Vec<PathBuf>,
    pub value: Value,
}

impl Document {
    pub fn new(origin: impl Into<PathBuf>, value: Value) -> Self {
        Document {
            origin: origin.into(),
            patched_by: Vec::new(),
            value,
        }
    }

    /// The document's `kind`, when it is a string.
    pub fn kind(&self) -> Option<&str> {
        self.value.get("kind").and_then(Value::as_str)
    }

    /// The document's name: `metadata.name`, or a top-level `name` as hyperloop 0.9.2 allowed.
    pub fn name(&self) -> Option<&str> {
        doc_name(&self.value)
    }

    /// The file an error about this document should name: the latest patch, since the user wrote
    /// that, or else the file the document came from.
    pub fn blamed_file(&self) -> &Path {
        self.patched_by.last().unwrap_or(&self.origin)
    }
}

/// `metadata.name`, else top-level `name`.
pub(crate) fn doc_name(value: &Value) -> Option<&str> {
    value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .or_else(|| value.get("name").and_then(Value::as_str))
}

/// Parses a YAML stream into documents that all name `file` as their origin.
pub fn parse_documents(file: &Path, text: &str) -> Result<Vec<Document>> {
    let values: Vec<Value> = crate::yaml::parse_multi(file, text)?;
    Ok(values.into_iter().map(|v| Document::new(file, v)).collect())
}

/// The built-in base as documents, in the order its kustomization lists them.
pub fn base_documents() -> Result<Vec<Document>> {
    overlay::builtin_base()
}

/// The built-in definitions, validated.
pub fn builtin() -> Result<Definitions> {
    from_documents(&base_documents()?)
}

/// The documents `config` selects, after overlay resolution and before validation: the built-in
/// base when there is no overlay; a local overlay folder resolved natively; a remote overlay
/// through `kustomize build` or `kubectl kustomize`.
pub fn resolve_documents(config: &Config, repo: &Path) -> Result<Vec<Document>> {
    let Some(overlay) = config.overlay.as_deref() else {
        return base_documents();
    };
    if is_base_alias(overlay, &config.base_ref) {
        return base_documents();
    }
    match config.overlay_dir(repo) {
        Some(dir) => build_overlay(&dir, &config.base_ref),
        None => overlay::external_build(overlay, repo, overlay),
    }
}

/// Resolves and validates the agents and the process `config` selects for the repo at `repo`.
pub fn load(config: &Config, repo: &Path) -> Result<Definitions> {
    from_documents(&resolve_documents(config, repo)?)
}

pub use crate::config::is_remote;

impl Definitions {
    pub fn agent(&self, name: &str) -> Option<&Agent> {
        self.agents.get(name)
    }

    /// A YAML description of the resolved process and of each agent with its annotations and
    /// prompt, for `--dry-run`: the whole text, since checking what an overlay changed is the
    /// point of looking.
    pub fn render(&self) -> String {
        let steps = |steps: &[Step]| Value::Array(steps.iter().map(step_to_value).collect());
        let mut agents = serde_json::Map::new();
        for agent in self.agents.values() {
            let mut entry = serde_json::Map::new();
            let annotations = agent
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            entry.insert("annotations".into(), Value::Object(annotations));
            entry.insert("prompt".into(), Value::String(agent.prompt.clone()));
            agents.insert(agent.name.clone(), Value::Object(entry));
        }
        let mut process = serde_json::Map::new();
        process.insert("name".into(), Value::String(self.process.name.clone()));
        process.insert("intake".into(), steps(&self.process.intake));
        process.insert("pipeline".into(), steps(&self.process.pipeline));
        let mut top = serde_json::Map::new();
        top.insert("process".into(), Value::Object(process));
        top.insert("agents".into(), Value::Object(agents));
        let top = Value::Object(top);
        // Serialising a tree of strings, lists and maps cannot fail; JSON (also YAML) is a
        // readable fallback should the YAML writer ever refuse.
        crate::yaml::to_string(&top)
            .unwrap_or_else(|_| serde_json::to_string_pretty(&top).unwrap_or_default())
    }
}
