//! `hyperloop logs TASK`: what a task's agents did, for a person to read. Claude's stream-json
//! becomes the assistant's text, one line per tool call, and the result with its cost; any other
//! agent's output is shown as it was written. Without `--role`/`--round` it shows the latest run;
//! `--follow` keeps printing until that run ends.

use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cli::LogsArgs;
use crate::error::{Error, Result};
use crate::target::{Outcome, Target};
use crate::worker::worktree;

/// One worker run's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLog {
    pub path: PathBuf,
    pub role: String,
    pub round: u32,
    /// Orders runs: the start time in the name, then the collision suffix, then (for runs of
    /// different roles that started in the same second) when the log was last written; one task
    /// never runs two agents at once, so the later run also ends later.
    sort_key: (String, u32, Option<std::time::SystemTime>),
}

/// Reads `<role>-round-<N>-<time>[-k].log`; `None` for any other name.
fn parse_name(path: &Path) -> Option<RunLog> {
    let name = path.file_name()?.to_str()?.strip_suffix(".log")?;
    let (role, rest) = name.rsplit_once("-round-")?;
    let (round, stamp) = rest.split_once('-')?;
    let round = round.parse().ok()?;
    let (stamp, k) = match stamp.split_once('-') {
        Some((s, k)) => (s, k.parse().ok()?),
        None => (stamp, 1),
    };
    (!role.is_empty()).then(|| RunLog {
        path: path.to_path_buf(),
        role: role.to_string(),
        round,
        sort_key: (
            stamp.to_string(),
            k,
            std::fs::metadata(path).and_then(|m| m.modified()).ok(),
        ),
    })
}

/// Every run logged for `task_id`, oldest first.
pub fn runs(repo_root: &Path, task_id: &str) -> Vec<RunLog> {
    let dir = worktree::logs_dir(repo_root).join(task_id);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut runs: Vec<RunLog> = entries.flatten().filter_map(|e| parse_name(&e.path())).collect();
    runs.sort_by(|a, b| a.sort_key.cmp(&b.sort_key));
    runs
}

/// `hyperloop logs`.
pub fn show(target: &Target, args: &LogsArgs) -> Result<Outcome> {
    let root = &target.repo.root;
    let all = runs(root, &args.task);
    if all.is_empty() {
        let known = args.task == crate::task::INTAKE_ID
            || args.task == crate::task::IMPROVER_ID
            || target.committed_tasks()?.iter().any(|t| t.id == args.task);
        return Err(Error::usage(if known {
            format!(
                "no agent has run for {} yet (logs live in {})",
                args.task,
                worktree::logs_dir(root).join(&args.task).display()
            )
        } else {
            format!("no task {} and no logs for it", args.task)
        }));
    }
    let chosen = all
        .iter()
        .rev()
        .find(|r| {
            args.role.as_ref().is_none_or(|role| *role == r.role) && args.round.is_none_or(|n| n == r.round)
        })
        .ok_or_else(|| {
            let list: Vec<String> = all
                .iter()
                .map(|r| format!("{} round {}", r.role, r.round))
                .collect();
            Error::usage(format!(
                "no run of {} matches{}{}; its runs: {}",
                args.task,
                args.role
                    .as_ref()
                    .map(|r| format!(" --role {r}"))
                    .unwrap_or_default(),
                args.round.map(|n| format!(" --round {n}")).unwrap_or_default(),
                list.join(", ")
            ))
        })?;
    let header = format!(
        "# {} · {} · round {} · {}\n",
        args.task,
        chosen.role,
        chosen.round,
        chosen.path.display()
    );
    if !args.follow {
        let bytes = std::fs::read(&chosen.path).map_err(|e| Error::io(&chosen.path, e))?;
        let text = String::from_utf8_lossy(&bytes);
        let mut out = header;
        out.push_str(&render_text(&text, args.raw));
        return Ok(Outcome {
            stdout: out,
            exit_code: 0,
        });
    }
    let running = target
        .repo
        .local_dir()
        .join("state")
        .join("running")
        .join(format!("{}.json", args.task));
    follow(&chosen.path, &header, args.raw, &running)?;
    Ok(Outcome::default())
}

/// The line hyperloop writes at the end of every run's log.
const FINISHED: &str = "=== hyperloop worker finished";

/// Prints the log as it grows, until the run's last line, or until nothing runs for the task and
/// the log stopped growing (a step that was killed writes no last line).
fn follow(path: &Path, header: &str, raw: bool, running: &Path) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(header.as_bytes());
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut pending: Vec<u8> = Vec::new();
    let mut quiet_since = Instant::now();
    loop {
        let mut chunk = Vec::new();
        file.read_to_end(&mut chunk).map_err(|e| Error::io(path, e))?;
        if chunk.is_empty() {
            if !running.exists() && quiet_since.elapsed() > Duration::from_secs(2) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
            // A log replaced under us (it never is, but a reopen costs nothing) is read again.
            let _ = file.stream_position();
            continue;
        }
        quiet_since = Instant::now();
        pending.extend_from_slice(&chunk);
        let mut done = false;
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches('\n');
            if let Some(shown) = render_line(line, raw) {
                let _ = writeln!(out, "{shown}");
            }
            done |= line.starts_with(FINISHED);
        }
        let _ = out.flush();
        if done {
            break;
        }
    }
    if !pending.is_empty() {
        let line = String::from_utf8_lossy(&pending);
        if let Some(shown) = render_line(&line, raw) {
            let _ = writeln!(out, "{shown}");
        }
    }
    let _ = out.flush();
    Ok(())
}

/// A whole log, readable.
pub fn render_text(text: &str, raw: bool) -> String {
    let mut out = String::with_capacity(text.len() / 2);
    for line in text.lines() {
        if let Some(shown) = render_line(line, raw) {
            out.push_str(&shown);
            out.push('\n');
        }
    }
    out
}

/// One line of a log as a person reads it; `None` for stream-json events that say nothing to
/// a reader (tool output that succeeded, partial messages, bookkeeping).
pub fn render_line(line: &str, raw: bool) -> Option<String> {
    if raw {
        return Some(line.to_string());
    }
    let trimmed = line.trim();
    if !trimmed.starts_with('{') {
        return Some(line.to_string());
    }
    let Ok(v) = serde_json::from_str::<Value>(trimmed) else {
        return Some(line.to_string());
    };
    let Some(kind) = v.get("type").and_then(Value::as_str) else {
        return Some(line.to_string());
    };
    match kind {
        "system" => {
            let subtype = v.get("subtype").and_then(Value::as_str).unwrap_or("");
            (subtype == "init").then(|| {
                let model = v.get("model").and_then(Value::as_str).unwrap_or("?");
                format!("── session started (model {model})")
            })
        }
        "assistant" => {
            let content = v.pointer("/message/content").and_then(Value::as_array)?;
            let parts: Vec<String> = content.iter().filter_map(assistant_part).collect();
            (!parts.is_empty()).then(|| parts.join("\n"))
        }
        "user" => {
            let content = v.pointer("/message/content").and_then(Value::as_array)?;
            let errors: Vec<String> = content
                .iter()
                .filter(|c| c.get("type").and_then(Value::as_str) == Some("tool_result"))
                .filter(|c| c.get("is_error").and_then(Value::as_bool) == Some(true))
                .map(|c| format!("  ✗ {}", one_line(&tool_result_text(c), 160)))
                .collect();
            (!errors.is_empty()).then(|| errors.join("\n"))
        }
        "result" => Some(result_line(&v)),
        _ => None,
    }
}

fn assistant_part(part: &Value) -> Option<String> {
    match part.get("type").and_then(Value::as_str)? {
        "text" => {
            let text = part.get("text").and_then(Value::as_str)?.trim();
            (!text.is_empty()).then(|| text.to_string())
        }
        "tool_use" => {
            let name = part.get("name").and_then(Value::as_str).unwrap_or("tool");
            let input = part.get("input").cloned().unwrap_or(Value::Null);
            Some(format!("→ {name} {}", one_line(&tool_summary(&input), 160)))
        }
        _ => None,
    }
}

/// The part of a tool call's input that says what it does.
fn tool_summary(input: &Value) -> String {
    for key in [
        "command",
        "file_path",
        "path",
        "pattern",
        "url",
        "query",
        "description",
    ] {
        if let Some(s) = input.get(key).and_then(Value::as_str) {
            return s.to_string();
        }
    }
    match input {
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn tool_result_text(part: &Value) -> String {
    match part.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn result_line(v: &Value) -> String {
    let subtype = v.get("subtype").and_then(Value::as_str).unwrap_or("done");
    let mut parts = vec![format!("── result: {subtype}")];
    if v.get("is_error").and_then(Value::as_bool) == Some(true) {
        parts.push("error".to_string());
    }
    if let Some(n) = v.get("num_turns").and_then(Value::as_u64) {
        parts.push(format!("{n} turns"));
    }
    if let Some(c) = v
        .get("total_cost_usd")
        .or_else(|| v.get("cost_usd"))
        .and_then(Value::as_f64)
    {
        parts.push(format!("${c:.4}"));
    }
    if let Some(ms) = v.get("duration_ms").and_then(Value::as_u64) {
        parts.push(format!("{:.1} s", ms as f64 / 1000.0));
    }
    parts.join(" · ")
}

/// The first line of `s`, cut to `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let first = s.trim().lines().next().unwrap_or("").trim();
    let more = s.trim().lines().nth(1).is_some();
    match first.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &first[..i]),
        None if more => format!("{first} …"),
        None => first.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_role_round_and_time() {
        let r = parse_name(Path::new("/x/rebase-resolver-round-3-20261125T143012Z-2.log")).expect("parses");
        assert_eq!((r.role.as_str(), r.round), ("rebase-resolver", 3));
        assert_eq!((r.sort_key.0.as_str(), r.sort_key.1), ("20261125T143012Z", 2));
        assert!(parse_name(Path::new("/x/implementer-round-0-20261125T143012Z.prompt.md")).is_none());
        assert!(parse_name(Path::new("/x/notes.log")).is_none());
    }

    #[test]
    fn stream_json_reads_as_text_tool_lines_and_a_result() {
        let log = concat!(
            "=== hyperloop worker: task task-001 role implementer round 0\n",
            r#"{"type":"system","subtype":"init","model":"claude-sonnet-4-5","session_id":"s"}"#,
            "\n",
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"I will add the file."},{"type":"tool_use","name":"Write","input":{"file_path":"/w/a.txt","content":"x"}}]}}"#,
            "\n",
            r#"{"type":"user","message":{"content":[{"type":"tool_result","content":"ok","is_error":false}]}}"#,
            "\n",
            r#"{"type":"user","message":{"content":[{"type":"tool_result","content":"boom\nmore","is_error":true}]}}"#,
            "\n",
            "plain words\n",
            r#"{"type":"result","subtype":"success","is_error":false,"num_turns":2,"total_cost_usd":0.0421,"duration_ms":2345}"#,
            "\n",
        );
        let shown = render_text(log, false);
        assert_eq!(
            shown,
            "=== hyperloop worker: task task-001 role implementer round 0\n\
             ── session started (model claude-sonnet-4-5)\n\
             I will add the file.\n\
             → Write /w/a.txt\n  ✗ boom …\n\
             plain words\n\
             ── result: success · 2 turns · $0.0421 · 2.3 s\n"
        );
        assert_eq!(render_text(log, true), log);
    }
}
