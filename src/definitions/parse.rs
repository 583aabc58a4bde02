//! Validation of resolved documents into [`Definitions`]: document kinds and identities, agent
//! fields, and process steps (the four primitives, `on_pass`/`on_fail` targets, roles that name an
//! agent, known actions). Every error names the file and a path into the document such as
//! `process default: pipeline[0].loop[1]`, so a user can find the mistake without guessing.

use std::collections::{BTreeMap, BTreeSet};

use indexmap::IndexMap;
use serde_json::{Map, Value};

use super::{API_VERSION, Agent, DEFAULT_PROCESS, Definitions, Document, Process};
use crate::error::{Error, Result};
use crate::pipeline::{KNOWN_ACTIONS, PipelineAction, Step};

const AGENT_KEYS: &[&str] = &["apiVersion", "kind", "metadata", "name", "prompt", "annotations"];
const PROCESS_KEYS: &[&str] = &["apiVersion", "kind", "metadata", "name", "intake", "pipeline"];
const PRIMITIVES: &[&str] = &["role", "gate", "loop", "action"];

/// An error about one document, blaming the file the user most recently touched it in.
fn doc_error(doc: &Document, location: impl Into<String>, message: impl Into<String>) -> Error {
    let err = Error::invalid(doc.blamed_file(), location, message);
    if doc.patched_by.is_empty() {
        err
    } else {
        let files: Vec<String> = std::iter::once(&doc.origin)
            .chain(doc.patched_by.iter())
            .map(|p| p.display().to_string())
            .collect();
        err.with_hint(format!("the document is built from {}", files.join(", then ")))
    }
}

/// Agent names become file names (`<role>-overlay.yaml`) and environment values, so they are
/// kept to a conservative alphabet.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

/// The identity of a document, checked: a known kind, the right apiVersion, a usable name.
fn identify(doc: &Document, index: usize) -> Result<(String, String)> {
    let unnamed = format!("document {}", index + 1);
    let Some(map) = doc.value.as_object() else {
        return Err(doc_error(doc, unnamed, "expected a mapping"));
    };
    let kind = match map.get("kind") {
        Some(Value::String(k)) => k.clone(),
        Some(_) => return Err(doc_error(doc, unnamed, "`kind` must be a string")),
        None => return Err(doc_error(doc, unnamed, "missing `kind` (Agent or Process)")),
    };
    let meta_name = match map.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => match m.get("name") {
            None => None,
            Some(Value::String(n)) => Some(n.clone()),
            Some(_) => {
                return Err(doc_error(doc, unnamed, "`metadata.name` must be a string"));
            }
        },
        Some(_) => return Err(doc_error(doc, unnamed, "`metadata` must be a mapping")),
    };
    let top_name = match map.get("name") {
        None => None,
        Some(Value::String(n)) => Some(n.clone()),
        Some(_) => return Err(doc_error(doc, unnamed, "`name` must be a string")),
    };
    let name = match (meta_name, top_name) {
        (Some(m), Some(t)) if m != t => {
            return Err(doc_error(
                doc,
                unnamed,
                format!("`metadata.name` ({m}) and `name` ({t}) disagree"),
            ));
        }
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => {
            return Err(doc_error(
                doc,
                format!("{} {unnamed}", kind.to_lowercase()),
                "missing `metadata.name`",
            ));
        }
    };
    let label = format!("{} {name}", kind.to_lowercase());
    if !matches!(kind.as_str(), "Agent" | "Process") {
        return Err(doc_error(
            doc,
            label,
            format!("unknown kind {kind} (expected Agent or Process)"),
        ));
    }
    if !valid_name(&name) {
        return Err(doc_error(
            doc,
            label,
            "a name may hold only letters, digits, `-`, `_` and `.`",
        ));
    }
    match map.get("apiVersion") {
        None => {}
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(other) => {
            return Err(doc_error(
                doc,
                format!("{label}: apiVersion"),
                format!("expected {API_VERSION}, found {}", short(other)),
            ));
        }
    }
    Ok((kind, name))
}

fn short(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn check_keys(doc: &Document, label: &str, map: &Map<String, Value>, allowed: &[&str]) -> Result<()> {
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(doc_error(
                doc,
                format!("{label}: {key}"),
                format!("unknown key (expected one of {})", allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

fn parse_agent(doc: &Document, name: &str) -> Result<Agent> {
    let label = format!("agent {name}");
    let map = doc.value.as_object().cloned().unwrap_or_default();
    check_keys(doc, &label, &map, AGENT_KEYS)?;
    let prompt = match map.get("prompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => p.clone(),
        Some(Value::String(_)) => {
            return Err(doc_error(doc, format!("{label}: prompt"), "the prompt is empty"));
        }
        Some(_) => {
            return Err(doc_error(doc, format!("{label}: prompt"), "expected text"));
        }
        None => return Err(doc_error(doc, label, "missing `prompt`")),
    };
    let mut annotations = IndexMap::new();
    match map.get("annotations") {
        None | Some(Value::Null) => {}
        Some(Value::Object(a)) => {
            for (key, value) in a {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Null => continue,
                    _ => {
                        return Err(doc_error(
                            doc,
                            format!("{label}: annotations.{key}"),
                            "expected text",
                        ));
                    }
                };
                annotations.insert(key.clone(), text);
            }
        }
        Some(_) => {
            return Err(doc_error(
                doc,
                format!("{label}: annotations"),
                "expected a mapping of names to text",
            ));
        }
    }
    Ok(Agent {
        name: name.to_string(),
        prompt,
        annotations,
    })
}

/// Context for step parsing: the document (for errors), its label, and the agent names.
struct StepCx<'a> {
    doc: &'a Document,
    label: String,
    agents: &'a BTreeSet<String>,
}

impl StepCx<'_> {
    fn err(&self, path: &str, message: impl Into<String>) -> Error {
        doc_error(self.doc, format!("{}: {path}", self.label), message)
    }
}

fn required_text(cx: &StepCx<'_>, path: &str, key: &str, v: &Value) -> Result<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(cx.err(path, format!("`{key}` needs a non-empty name"))),
    }
}

fn check_role(cx: &StepCx<'_>, path: &str, name: &str) -> Result<()> {
    if !cx.agents.contains(name) {
        let known: Vec<&str> = cx.agents.iter().map(String::as_str).collect();
        return Err(cx.err(
            path,
            format!("role {name} names no agent (agents: {})", known.join(", ")),
        ));
    }
    Ok(())
}

fn parse_step(cx: &StepCx<'_>, path: &str, v: &Value) -> Result<Step> {
    let map = match v {
        // hyperloop 0.9.2 wrote loops as `loop: [implementer, verifier]`.
        Value::String(role) if !role.trim().is_empty() => {
            check_role(cx, path, role)?;
            return Ok(Step::Role {
                name: role.clone(),
                on_pass: None,
                on_fail: None,
            });
        }
        Value::Object(m) => m,
        _ => {
            return Err(cx.err(
                path,
                "expected a step: one of `role: X`, `gate: X`, `loop: [...]`, `action: X`",
            ));
        }
    };
    let primitives: Vec<&str> = PRIMITIVES
        .iter()
        .copied()
        .filter(|p| map.contains_key(*p))
        .collect();
    let primitive = match primitives.as_slice() {
        [one] => *one,
        [] => {
            let keys: Vec<&str> = map.keys().map(String::as_str).collect();
            return Err(cx.err(
                path,
                format!(
                    "unknown step primitive `{}` (expected role, gate, loop or action)",
                    keys.join("`, `")
                ),
            ));
        }
        many => {
            return Err(cx.err(
                path,
                format!("a step has exactly one primitive, found {}", many.join(", ")),
            ));
        }
    };
    let allowed: &[&str] = match primitive {
        "role" => &["role", "on_pass", "on_fail"],
        "gate" => &["gate"],
        "loop" => &["loop"],
        _ => &["action"],
    };
    if let Some(extra) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(cx.err(path, format!("unknown key `{extra}` in a {primitive} step")));
    }
    let value = &map[primitive];
    match primitive {
        "role" => {
            let name = required_text(cx, path, "role", value)?;
            let target = |key: &str| -> Result<Option<String>> {
                match map.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => required_text(cx, &format!("{path}.{key}"), key, v).map(Some),
                }
            };
            let on_pass = target("on_pass")?;
            let on_fail = target("on_fail")?;
            check_role(cx, path, &name)?;
            Ok(Step::Role {
                name,
                on_pass,
                on_fail,
            })
        }
        "gate" => Ok(Step::Gate {
            name: required_text(cx, path, "gate", value)?,
        }),
        "action" => {
            let name = required_text(cx, path, "action", value)?;
            match PipelineAction::parse(&name) {
                Some(action) => Ok(Step::Action { action }),
                None => Err(cx.err(
                    path,
                    format!("unknown action {name} (known: {})", KNOWN_ACTIONS.join(", ")),
                )),
            }
        }
        _ => {
            let path = format!("{path}.loop");
            let steps = parse_steps(cx, &path, value)?;
            if steps.is_empty() {
                return Err(cx.err(&path, "a loop needs at least one step"));
            }
            Ok(Step::Loop { steps })
        }
    }
}

/// Parses a list of steps at `path`, then checks that `on_pass`/`on_fail` name a role among
/// these siblings: jumps never cross a nesting level.
fn parse_steps(cx: &StepCx<'_>, path: &str, v: &Value) -> Result<Vec<Step>> {
    let Value::Array(items) = v else {
        return Err(cx.err(path, "expected a list of steps"));
    };
    let steps = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_step(cx, &format!("{path}[{i}]"), item))
        .collect::<Result<Vec<_>>>()?;
    let roles: BTreeSet<&str> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Role { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    for (i, step) in steps.iter().enumerate() {
        if let Step::Role { on_pass, on_fail, .. } = step {
            for (key, target) in [("on_pass", on_pass), ("on_fail", on_fail)] {
                if let Some(t) = target
                    && !roles.contains(t.as_str())
                {
                    return Err(cx.err(
                        &format!("{path}[{i}].{key}"),
                        format!("{t} is not a role step at this level of the process"),
                    ));
                }
            }
        }
    }
    Ok(steps)
}

fn parse_process(doc: &Document, name: &str, agents: &BTreeSet<String>) -> Result<Process> {
    let label = format!("process {name}");
    let map = doc.value.as_object().cloned().unwrap_or_default();
    check_keys(doc, &label, &map, PROCESS_KEYS)?;
    let cx = StepCx { doc, label, agents };
    let pipeline = match map.get("pipeline") {
        None | Some(Value::Null) => return Err(cx.err("pipeline", "missing `pipeline`")),
        Some(v) => parse_steps(&cx, "pipeline", v)?,
    };
    if pipeline.is_empty() {
        return Err(cx.err("pipeline", "the pipeline needs at least one step"));
    }
    // An empty intake list is a deliberate choice (tasks written by hand), unlike a missing one.
    let intake = match map.get("intake") {
        None | Some(Value::Null) => vec![Step::Role {
            name: "pm".to_string(),
            on_pass: None,
            on_fail: None,
        }],
        Some(v) => parse_steps(&cx, "intake", v)?,
    };
    if map.get("intake").is_none_or(Value::is_null) && !agents.contains("pm") {
        return Err(cx.err(
            "intake",
            "no `intake` given and there is no pm agent to default to",
        ));
    }
    Ok(Process {
        name: name.to_string(),
        intake,
        pipeline,
    })
}

/// Validates resolved documents into the definitions a step uses: every Agent, and the Process
/// named `default` (or the only one).
pub fn from_documents(docs: &[Document]) -> Result<Definitions> {
    let mut agents_docs = Vec::new();
    let mut process_docs = Vec::new();
    let mut seen: BTreeMap<(String, String), &Document> = BTreeMap::new();
    for (i, doc) in docs.iter().enumerate() {
        // Number documents within their own file, which is what the user can count.
        let in_file = docs[..i].iter().filter(|d| d.origin == doc.origin).count();
        let (kind, name) = identify(doc, in_file)?;
        if let Some(first) = seen.get(&(kind.clone(), name.clone())) {
            return Err(doc_error(
                doc,
                format!("{} {name}", kind.to_lowercase()),
                format!(
                    "duplicate document: {kind} {name} is also defined in {}",
                    first.origin.display()
                ),
            ));
        }
        seen.insert((kind.clone(), name.clone()), doc);
        if kind == "Agent" {
            agents_docs.push((doc, name));
        } else {
            process_docs.push((doc, name));
        }
    }
    let mut agents = BTreeMap::new();
    for (doc, name) in &agents_docs {
        agents.insert(name.clone(), parse_agent(doc, name)?);
    }
    let names: BTreeSet<String> = agents.keys().cloned().collect();
    let chosen = match process_docs.as_slice() {
        [] => {
            let file = docs
                .first()
                .map(|d| d.origin.clone())
                .unwrap_or_else(|| std::path::PathBuf::from(super::BASE_PREFIX));
            return Err(Error::invalid(
                file,
                "process",
                "no Process document: the overlay must keep the base or define a process",
            ));
        }
        [only] => only,
        many => match many.iter().find(|(_, n)| n == DEFAULT_PROCESS) {
            Some(p) => p,
            None => {
                let listed: Vec<&str> = many.iter().map(|(_, n)| n.as_str()).collect();
                return Err(doc_error(
                    many[0].0,
                    "process",
                    format!(
                        "several processes ({}) and none is named {DEFAULT_PROCESS}",
                        listed.join(", ")
                    ),
                ));
            }
        },
    };
    // Validate every process, not just the chosen one: a broken spare is still a mistake.
    let mut process = None;
    for (doc, name) in &process_docs {
        let p = parse_process(doc, name, &names)?;
        if name == &chosen.1 {
            process = Some(p);
        }
    }
    let process = process.ok_or_else(|| Error::other("the chosen process vanished"))?;
    Ok(Definitions { agents, process })
}

/// A step as the YAML a user would write for it.
pub fn step_to_value(step: &Step) -> Value {
    let mut map = Map::new();
    match step {
        Step::Role {
            name,
            on_pass,
            on_fail,
        } => {
            map.insert("role".into(), Value::String(name.clone()));
            if let Some(p) = on_pass {
                map.insert("on_pass".into(), Value::String(p.clone()));
            }
            if let Some(f) = on_fail {
                map.insert("on_fail".into(), Value::String(f.clone()));
            }
        }
        Step::Gate { name } => {
            map.insert("gate".into(), Value::String(name.clone()));
        }
        Step::Action { action } => {
            map.insert("action".into(), Value::String(action.as_str().to_string()));
        }
        Step::Loop { steps } => {
            map.insert(
                "loop".into(),
                Value::Array(steps.iter().map(step_to_value).collect()),
            );
        }
    }
    Value::Object(map)
}
