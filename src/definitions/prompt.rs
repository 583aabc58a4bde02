//! Composes the prompt a worker receives on standard input: the agent's template with its
//! placeholders filled in, its annotations (the persona first), the task, the task's own spec,
//! findings of earlier rounds, the learned role overlay from `specs/prompts/`, and any
//! role-specific inputs (specs to process, conflicting files, ...). Composition is pure; only
//! [`read_role_overlay`] touches the disk.

use std::path::Path;

use serde_json::Value;

use super::{Agent, PERSONA_ANNOTATION};
use crate::error::{Error, Result};

/// Everything about one worker run that goes into its prompt besides the agent itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptInput {
    /// The task id, or `intake` / `process-improvement` for the serial roles.
    pub task_id: String,
    /// The spec the work traces to; for intake and process improvement, a folder such as
    /// `specs` or `specs/prompts` (it fills `{spec_ref}` and the commit trailer).
    pub spec_ref: String,
    pub round: u32,
    pub branch: Option<String>,
    pub base_branch: String,
    pub task_title: Option<String>,
    /// The task file's body before its findings: the task's own spec.
    pub task_spec: Option<String>,
    /// Findings recorded in earlier rounds.
    pub findings: Option<String>,
    /// Text of `specs/prompts/<role>-overlay.yaml`.
    pub role_overlay: Option<String>,
    /// Role-specific sections as (heading, text), e.g. ("Specs to process", list of paths).
    pub extra_sections: Vec<(String, String)>,
}

/// Fills `{task_id}` and `{spec_ref}` in one pass, so a value that itself contains a
/// placeholder is not expanded again.
fn substitute(template: &str, input: &PromptInput) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(idx) = rest.find('{') {
        out.push_str(&rest[..idx]);
        let tail = &rest[idx..];
        if let Some(after) = tail.strip_prefix("{task_id}") {
            out.push_str(&input.task_id);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{spec_ref}") {
            out.push_str(&input.spec_ref);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

fn section(out: &mut String, heading: &str, body: &str) {
    let body = body.trim_matches('\n').trim_end();
    if body.trim().is_empty() {
        return;
    }
    out.push_str("\n## ");
    out.push_str(heading);
    out.push_str("\n\n");
    out.push_str(body);
    out.push('\n');
}

/// The whole prompt for one run of `agent`.
pub fn compose(agent: &Agent, input: &PromptInput) -> String {
    let mut out = substitute(agent.prompt.trim_end(), input);
    out.push('\n');

    // The persona describes the project; it frames everything after it, so it comes first.
    if let Some(persona) = agent.annotations.get(PERSONA_ANNOTATION) {
        section(&mut out, "Persona", &substitute(persona, input));
    }
    for (key, text) in &agent.annotations {
        if key != PERSONA_ANNOTATION {
            section(&mut out, key, &substitute(text, input));
        }
    }

    let mut task = format!("- id: {}\n", input.task_id);
    if let Some(title) = &input.task_title {
        task.push_str(&format!("- title: {title}\n"));
    }
    task.push_str(&format!("- spec_ref: {}\n", input.spec_ref));
    task.push_str(&format!("- round: {}\n", input.round));
    if let Some(branch) = &input.branch {
        task.push_str(&format!("- branch: {branch}\n"));
    }
    task.push_str(&format!("- base branch: {}\n", input.base_branch));
    section(&mut out, "Task", &task);

    if let Some(spec) = &input.task_spec {
        section(&mut out, "Spec", spec);
    }
    if let Some(findings) = &input.findings {
        section(&mut out, "Findings from earlier rounds", findings);
    }
    if let Some(overlay) = &input.role_overlay {
        section(&mut out, "Process overlay", overlay);
    }
    for (heading, text) in &input.extra_sections {
        section(&mut out, heading, text);
    }
    out
}

/// Reads `<repo_dir>/<specs_dir>/prompts/<role>-overlay.yaml`: its `prompt:` text, or the whole
/// text when the file has no such key (0.9.2 did the same). A missing or blank file gives `None`.
pub fn read_role_overlay(repo_dir: &Path, specs_dir: &str, role: &str) -> Result<Option<String>> {
    let path = repo_dir
        .join(specs_dir)
        .join("prompts")
        .join(format!("{role}-overlay.yaml"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    parse_role_overlay(&path, &text)
}

/// The overlay text of a role-overlay file's content (`file` names it in errors).
pub fn parse_role_overlay(file: &Path, text: &str) -> Result<Option<String>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let value: Value = crate::yaml::parse(file, text)?;
    let chosen = match value.get("prompt") {
        Some(Value::String(p)) => p.clone(),
        Some(Value::Null) => return Ok(None),
        Some(_) => {
            return Err(Error::invalid(file, "prompt", "expected text"));
        }
        None => text.to_string(),
    };
    Ok(if chosen.trim().is_empty() {
        None
    } else {
        Some(chosen)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_is_single_pass() {
        let input = PromptInput {
            task_id: "t-{spec_ref}".into(),
            spec_ref: "specs/a.md".into(),
            ..Default::default()
        };
        assert_eq!(
            substitute("{task_id} {spec_ref} {other} {", &input),
            "t-{spec_ref} specs/a.md {other} {"
        );
    }
}
