//! Agent and Process documents: the built-in base compiled into the binary, overlay resolution
//! (a native subset of kustomize), validation, and prompt composition.

pub mod prompt;

use std::collections::BTreeMap;

use indexmap::IndexMap;

use crate::pipeline::Step;

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

/// True when an overlay or resource names a remote location rather than a local folder.
pub fn is_remote(s: &str) -> bool {
    s.contains("://")
        || s.starts_with("git@")
        || s.starts_with("github.com/")
        || s.contains("//") && s.contains("?ref=")
}
