//! The task-file format: YAML front matter between `---` lines, then a Markdown body.
//!
//! Reading is strict about what hyperloop relies on (required fields, status values, the id
//! matching the file name) and lenient about everything else: unknown fields are kept, in order,
//! and written back unchanged. Writing puts the 0.9.2 fields first in their usual order, then
//! hyperloop's own fields (only when they say something), then the unknown fields, so a file
//! hyperloop wrote reads back to the same task and writes back byte for byte.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::task::{Attempt, Claim, Status, Task};

/// The front-matter fields hyperloop 0.9.2 wrote, in its order.
const LEGACY_FIELDS: [&str; 9] = [
    "id", "title", "spec_ref", "status", "phase", "deps", "round", "branch", "pr",
];
/// Fields of hyperloop's own.
const OWN_FIELDS: [&str; 12] = [
    "position",
    "cost_usd",
    "rebase_attempts",
    "gate_cleared",
    "last_verdict",
    "failure_reason",
    "verified_tip",
    "refused_tip",
    "cancelled",
    "rounds_from",
    "claim",
    "history",
];

/// Splits a task file into its front matter and body. Returns the front matter text, the line on
/// which it starts (1-based), and the body.
fn split(file: &Path, text: &str) -> Result<(String, usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.split_inclusive('\n');
    let first = lines.next().unwrap_or_default();
    if first.trim_end() != "---" {
        return Err(
            Error::invalid(file, "line 1", "a task file must start with a `---` line")
                .with_hint("put the task's YAML front matter between two `---` lines at the top of the file"),
        );
    }
    let mut front = String::new();
    let mut consumed = first.len();
    for line in lines {
        consumed += line.len();
        if line.trim_end() == "---" {
            let body = text[consumed..].to_string();
            return Ok((front.replace("\r\n", "\n"), 2, body));
        }
        front.push_str(line);
    }
    Err(Error::invalid(
        file,
        "front matter",
        "the front matter is not closed by a `---` line",
    ))
}

/// The largest task file hyperloop reads. A task is a spec and its findings; a file far beyond
/// that (a pm or a contributor gone wrong) would be read into memory on every step.
pub const MAX_TASK_FILE_BYTES: usize = 1 << 20;

/// The longest task id: it names a branch, a directory and a file.
const MAX_ID_LEN: usize = 100;

/// Why `id` cannot be a task id, or `None` when it can. A task's id names its branch
/// (`worker/<id>`), its checkout's directory and its file, so it must be safe as all three: git's
/// ref-name rules and a single path component.
pub fn id_problem(id: &str) -> Option<String> {
    if id.len() > MAX_ID_LEN {
        return Some(format!("is longer than {MAX_ID_LEN} characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Some(format!(
            "contains {c:?}; a task id may hold letters, digits, '-', '_' and '.'"
        ));
    }
    if id.starts_with('.') || id.starts_with('-') {
        return Some("must not start with '.' or '-'".to_string());
    }
    if id.contains("..") || id.ends_with('.') || id.ends_with(".lock") {
        return Some(
            "must not contain '..' or end with '.' or '.lock' (git refuses such branch names)".to_string(),
        );
    }
    None
}

/// The branch hyperloop derives from a task id. Never chosen by a task file: a branch named by
/// a file would let whoever writes task files steer what hyperloop pushes, merges and deletes.
pub fn task_branch(id: &str) -> String {
    format!("worker/{id}")
}

/// Parses a task file's text. `file` is used in error messages and to check the id.
pub fn parse(file: &Path, text: &str) -> Result<Task> {
    parse_with(file, text, true)
}

/// [`parse`] with every front matter given to the YAML parser, to compare the fast reader with.
#[cfg(test)]
pub(crate) fn parse_slowly(file: &Path, text: &str) -> Result<Task> {
    parse_with(file, text, false)
}

fn parse_with(file: &Path, text: &str, fast: bool) -> Result<Task> {
    if text.len() > MAX_TASK_FILE_BYTES {
        return Err(Error::invalid(
            file,
            "file",
            format!(
                "is {} bytes; a task file may hold at most {MAX_TASK_FILE_BYTES}",
                text.len()
            ),
        ));
    }
    let (front, first_line, body) = split(file, text)?;
    let value: Value = if front.trim().is_empty() {
        Value::Object(Map::new())
    } else if let Some(map) = fast.then(|| crate::task::fast::front_matter(&front)).flatten() {
        Value::Object(map)
    } else {
        serde_saphyr_value(file, &front, first_line)?
    };
    let Value::Object(mut map) = value else {
        return Err(Error::invalid(
            file,
            "front matter",
            "the front matter must be a YAML mapping",
        ));
    };

    let field = |name: &str| format!("field `{name}`");
    let req_str = |map: &mut Map<String, Value>, name: &str| -> Result<String> {
        match map.shift_remove(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::Null) | None => Err(Error::invalid(file, field(name), "is required")),
            Some(other) => Err(Error::invalid(
                file,
                field(name),
                format!("must be a non-empty string, found {}", kind(&other)),
            )),
        }
    };
    let opt_str = |map: &mut Map<String, Value>, name: &str| -> Result<Option<String>> {
        match map.shift_remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(Error::invalid(
                file,
                field(name),
                format!("must be a string or null, found {}", kind(&other)),
            )),
        }
    };
    let uint = |map: &mut Map<String, Value>, name: &str| -> Result<u32> {
        match map.shift_remove(name) {
            None | Some(Value::Null) => Ok(0),
            Some(Value::Number(n)) => n.as_u64().and_then(|v| u32::try_from(v).ok()).ok_or_else(|| {
                Error::invalid(
                    file,
                    field(name),
                    format!("must be a whole number ≥ 0, found {n}"),
                )
            }),
            Some(other) => Err(Error::invalid(
                file,
                field(name),
                format!("must be a whole number, found {}", kind(&other)),
            )),
        }
    };

    let id = req_str(&mut map, "id")?;
    let title = req_str(&mut map, "title")?;
    let spec_ref = req_str(&mut map, "spec_ref")?;
    let status_text = req_str(&mut map, "status")?;
    let status = Status::parse(&status_text).ok_or_else(|| {
        Error::invalid(
            file,
            field("status"),
            format!(
                "unknown status `{status_text}`; expected one of not-started, in-progress, needs-rebase, complete, failed"
            ),
        )
    })?;
    let phase = opt_str(&mut map, "phase")?;
    let deps = match map.shift_remove("deps") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                other => Err(Error::invalid(
                    file,
                    format!("field `deps[{i}]`"),
                    format!("must be a task id, found {}", kind(&other)),
                )),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(other) => {
            return Err(Error::invalid(
                file,
                field("deps"),
                format!("must be a list of task ids, found {}", kind(&other)),
            ));
        }
    };
    let round = uint(&mut map, "round")?;
    if let Some(problem) = id_problem(&id) {
        return Err(Error::invalid(
            file,
            field("id"),
            format!("`{}` {problem}", id.escape_debug()),
        ));
    }
    let branch = opt_str(&mut map, "branch")?;
    if let Some(b) = &branch
        && *b != task_branch(&id)
    {
        return Err(Error::invalid(
            file,
            field("branch"),
            format!(
                "is `{}`; a task's branch is derived from its id: `{}` (or null)",
                b.escape_debug(),
                task_branch(&id)
            ),
        )
        .with_hint("remove the `branch` field; hyperloop sets it"));
    }
    let pr = opt_str(&mut map, "pr")?;

    let position = match map.shift_remove("position") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<Vec<usize>>(v)
                .map_err(|_| Error::invalid(file, field("position"), "must be a list of step indices"))?,
        ),
    };
    let cost_usd = match map.shift_remove("cost_usd") {
        None | Some(Value::Null) => 0.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
        Some(other) => {
            return Err(Error::invalid(
                file,
                field("cost_usd"),
                format!("must be a number, found {}", kind(&other)),
            ));
        }
    };
    let rebase_attempts = uint(&mut map, "rebase_attempts")?;
    let gate_cleared = match map.shift_remove("gate_cleared") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(Error::invalid(
                file,
                field("gate_cleared"),
                format!("must be true or false, found {}", kind(&other)),
            ));
        }
    };
    let last_verdict = opt_str(&mut map, "last_verdict")?;
    let failure_reason = opt_str(&mut map, "failure_reason")?;
    let verified_tip = opt_str(&mut map, "verified_tip")?;
    let refused_tip = opt_str(&mut map, "refused_tip")?;
    if let Some(v) = &verified_tip
        && (!(v.len() == 40 || v.len() == 64) || !v.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(Error::invalid(file, field("verified_tip"), "must be a commit id"));
    }
    let cancelled = match map.shift_remove("cancelled") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(Error::invalid(
                file,
                field("cancelled"),
                format!("must be true or false, found {}", kind(&other)),
            ));
        }
    };
    let rounds_from = uint(&mut map, "rounds_from")?;
    let claim = match map.shift_remove("claim") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<Claim>(v)
                .map_err(|e| Error::invalid(file, field("claim"), e.to_string()))?,
        ),
    };
    let history = match map.shift_remove("history") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value::<Vec<Attempt>>(v)
            .map_err(|e| Error::invalid(file, field("history"), e.to_string()))?,
    };

    if let Some(stem) = file.file_stem().and_then(|s| s.to_str())
        && file.extension().is_some_and(|e| e == "md")
        && stem != id
    {
        return Err(Error::invalid(
            file,
            field("id"),
            format!("the id `{id}` does not match the file name `{stem}.md`"),
        )
        .with_hint(format!(
            "rename the file to `{id}.md` or change the id to `{stem}`"
        )));
    }

    Ok(Task {
        id,
        title,
        spec_ref,
        status,
        phase,
        deps,
        round,
        branch,
        pr,
        position,
        cost_usd,
        rebase_attempts,
        gate_cleared,
        last_verdict,
        failure_reason,
        verified_tip,
        refused_tip,
        cancelled,
        rounds_from,
        claim,
        history,
        extra: map,
        body,
    })
}

fn serde_saphyr_value(file: &Path, front: &str, first_line: usize) -> Result<Value> {
    match crate::yaml::parse::<Value>(file, front) {
        Ok(v) => Ok(v),
        Err(Error::Invalid {
            file,
            location,
            message,
            hint,
        }) => {
            // The parser counts lines from the start of the front matter; the user counts from
            // the top of the file, where the opening `---` is line 1.
            let location = shift_line(&location.0, first_line - 1);
            Err(Error::Invalid {
                file,
                location: crate::error::Location(location),
                message,
                hint,
            })
        }
        Err(e) => Err(e),
    }
}

fn shift_line(location: &str, by: usize) -> String {
    let Some(rest) = location.strip_prefix("line ") else {
        return location.to_string();
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    match digits.parse::<usize>() {
        Ok(n) => format!("line {}{}", n + by, &rest[digits.len()..]),
        Err(_) => location.to_string(),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Renders a task as file text.
pub fn render(task: &Task) -> String {
    let mut out = String::with_capacity(256 + task.body.len());
    out.push_str("---\n");
    for name in LEGACY_FIELDS {
        let value = match name {
            "id" => scalar(&task.id),
            "title" => scalar(&task.title),
            "spec_ref" => scalar(&task.spec_ref),
            "status" => task.status.as_str().to_string(),
            "phase" => opt_scalar(task.phase.as_deref()),
            "deps" => {
                if task.deps.is_empty() {
                    "[]".to_string()
                } else {
                    let mut s = String::new();
                    for d in &task.deps {
                        s.push_str("\n- ");
                        s.push_str(&scalar(d));
                    }
                    s
                }
            }
            "round" => task.round.to_string(),
            "branch" => opt_scalar(task.branch.as_deref()),
            _ => opt_scalar(task.pr.as_deref()),
        };
        push_field(&mut out, name, &value);
    }
    for name in OWN_FIELDS {
        let value = match name {
            "position" => task.position.as_ref().map(json),
            "cost_usd" => (task.cost_usd != 0.0).then(|| format_cost(task.cost_usd)),
            "rebase_attempts" => (task.rebase_attempts != 0).then(|| task.rebase_attempts.to_string()),
            "gate_cleared" => task.gate_cleared.then(|| "true".to_string()),
            "last_verdict" => task.last_verdict.as_deref().map(scalar),
            "failure_reason" => task.failure_reason.as_deref().map(scalar),
            "verified_tip" => task.verified_tip.as_deref().map(scalar),
            "refused_tip" => task.refused_tip.as_deref().map(scalar),
            "cancelled" => task.cancelled.then(|| "true".to_string()),
            "rounds_from" => (task.rounds_from != 0).then(|| task.rounds_from.to_string()),
            "claim" => task.claim.as_ref().map(json),
            _ => (!task.history.is_empty()).then(|| {
                let mut s = String::new();
                for a in &task.history {
                    s.push_str("\n- ");
                    s.push_str(&json(a));
                }
                s
            }),
        };
        if let Some(v) = value {
            push_field(&mut out, name, &v);
        }
    }
    for (k, v) in &task.extra {
        push_field(&mut out, &scalar(k), &json(v));
    }
    out.push_str("---\n");
    out.push_str(&task.body);
    out
}

fn push_field(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    if !value.starts_with('\n') {
        out.push(' ');
    }
    out.push_str(value);
    out.push('\n');
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    // JSON is a subset of YAML's flow style, so this is always valid front matter.
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_string())
}

fn format_cost(c: f64) -> String {
    let s = format!("{c:.6}");
    let s = s.trim_end_matches('0');
    s.strip_suffix('.')
        .map_or_else(|| s.to_string(), |t| format!("{t}.0"))
}

fn opt_scalar(v: Option<&str>) -> String {
    v.map_or_else(|| "null".to_string(), scalar)
}

/// A string as a YAML scalar: plain when that reads back as the same string, else double-quoted.
pub fn scalar(s: &str) -> String {
    if is_plain_safe(s) { s.to_string() } else { json(s) }
}

fn is_plain_safe(s: &str) -> bool {
    if s.is_empty() || s.trim() != s {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    const RESERVED: [&str; 13] = [
        "null", "~", "true", "false", "yes", "no", "on", "off", "y", "n", ".nan", ".inf", "-.inf",
    ];
    if RESERVED.contains(&lower.as_str()) {
        return false;
    }
    let first = s.as_bytes()[0];
    if first.is_ascii_digit() || first == b'-' || first == b'+' || first == b'.' {
        // Could read back as a number (`1e3`, `0x10`, `-1`): quote anything number-like.
        if s.parse::<f64>().is_ok() || s.chars().all(|c| c.is_ascii_hexdigit() || "xXoO_.+-".contains(c)) {
            return false;
        }
    }
    if s.contains(": ") || s.contains(" #") || s.ends_with(':') {
        return false;
    }
    let first_char = s.chars().next().unwrap_or(' ');
    if "!&*{}[],#|>@`\"'%?:-".contains(first_char) {
        return false;
    }
    s.chars().all(|c| !c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn p(name: &str) -> PathBuf {
        PathBuf::from(format!("specs/tasks/{name}.md"))
    }

    #[test]
    fn legacy_file_round_trips_semantically() {
        let text = "---\nid: task-001\ntitle: Add login\nspec_ref: specs/auth.md\nstatus: in-progress\nphase: verifier\ndeps:\n- task-000\nround: 2\nbranch: worker/task-001\npr: null\n---\nBody here.\n\n## Findings\nold\n";
        let t = parse(&p("task-001"), text).expect("parses");
        assert_eq!(t.status, Status::InProgress);
        assert_eq!(t.deps, vec!["task-000"]);
        assert_eq!(t.round, 2);
        assert_eq!(t.phase.as_deref(), Some("verifier"));
        assert_eq!(render(&t), text);
    }

    #[test]
    fn unknown_fields_are_kept_in_order() {
        let text = "---\nid: t\ntitle: T\nspec_ref: s.md\nstatus: not-started\nzeta: 1\nalpha: {\"b\": [1, 2]}\n---\n";
        let t = parse(&p("t"), text).expect("parses");
        let keys: Vec<_> = t.extra.keys().cloned().collect();
        assert_eq!(keys, vec!["zeta", "alpha"]);
        let again = parse(&p("t"), &render(&t)).expect("reparses");
        assert_eq!(again, t);
        assert_eq!(render(&again), render(&t));
    }

    #[test]
    fn own_fields_round_trip() {
        let mut t = Task::new("task-9", "Title: with colon", "specs/x.md");
        t.position = Some(vec![0, 1]);
        t.cost_usd = 0.125;
        t.gate_cleared = true;
        t.last_verdict = Some("fail".into());
        t.claim = Some(Claim {
            role: "verifier".into(),
            owner: "h:1".into(),
            pgid: Some(7),
            started_at: 10,
            expires_at: 20,
            nonce: "abc".into(),
            item: Some("task-001-verifier-r2-abc".into()),
            round: Some(2),
            base: Some("0123456789012345678901234567890123456789".into()),
        });
        t.history.push(Attempt {
            round: 0,
            role: "implementer".into(),
            verdict: "pass".into(),
            findings: 0,
            duration_s: 1.5,
            cost_usd: Some(0.1),
            run_id: Some(12345),
        });
        t.deps = vec!["yes".into(), "123".into()];
        t.body = "text\n".into();
        let text = render(&t);
        let back = parse(&p("task-9"), &text).expect("parses");
        assert_eq!(back, t);
    }

    #[test]
    fn errors_name_file_and_line_or_field() {
        let e = parse(&p("t"), "---\nid: t\ntitle: [\n---\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("specs/tasks/t.md"), "{msg}");
        assert!(msg.contains("line "), "{msg}");
        assert_eq!(e.exit_code(), 2);

        let e = parse(&p("t"), "---\nid: t\ntitle: T\nspec_ref: s\nstatus: done\n---\n").unwrap_err();
        assert!(e.to_string().contains("field `status`"), "{e}");

        let e = parse(&p("t"), "---\ntitle: T\nspec_ref: s\nstatus: complete\n---\n").unwrap_err();
        assert!(e.to_string().contains("field `id`"), "{e}");

        let e = parse(
            &p("other"),
            "---\nid: t\ntitle: T\nspec_ref: s\nstatus: complete\n---\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not match the file name"), "{e}");

        let e = parse(&p("t"), "no front matter").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");

        let e = parse(&p("t"), "---\nid: t\n").unwrap_err();
        assert!(e.to_string().contains("not closed"), "{e}");

        let e = parse(
            &p("t"),
            "---\nid: t\ntitle: T\nspec_ref: s\nstatus: complete\nround: -1\n---\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("field `round`"), "{e}");
    }

    #[test]
    fn yaml_error_line_counts_from_top_of_file() {
        let e = parse(&p("t"), "---\nid: t\ntitle: T\n  bad: : :\n---\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("line 4") || msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn scalars_quote_when_needed() {
        for s in [
            "null", "yes", "No", "1.5", "0x1F", "-3", "a: b", "#x", "", " lead", "- item", "x #c",
        ] {
            let yaml = format!("v: {}\n", scalar(s));
            let v: Value = crate::yaml::parse(Path::new("x"), &yaml).expect("valid yaml");
            assert_eq!(
                v["v"],
                Value::String(s.to_string()),
                "round trip of {s:?} via {yaml:?}"
            );
        }
        assert_eq!(scalar("task-001"), "task-001");
        assert_eq!(scalar("specs/auth.md"), "specs/auth.md");
    }
}
