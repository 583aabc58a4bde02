//! A scripted stand-in for an AI coding agent, speaking hyperloop's worker protocol (CONTRACT §4).
//!
//! `hyperloop-scripted-agent --script FILE` drains its prompt from standard input, reads the
//! `HYPERLOOP_*` environment, picks the first rule of the YAML script that matches the job, and
//! performs the rule's actions in order: edit files, commit, sleep, print (also claude-like
//! stream-json), start a process that would outlive it, write a verdict, exit with a code. The
//! test suite uses it to drive every path of the worker protocol through a real process; the demo
//! uses it (with `pm_tasks_from_specs` and `implement_task`) to walk tasks through a pipeline
//! without an AI vendor.
//!
//! ```yaml
//! rules:
//!   - role: verifier        # required; also `task`, `round`, `attempt` (times this rule matched)
//!     attempt: 0
//!     actions:
//!       - verdict: {verdict: fail, findings: 1, detail: "tests are missing"}
//!   - role: verifier
//!     actions:
//!       - verdict: {verdict: pass}
//! ```
//!
//! No matching rule is an error (exit 3), so a test cannot pass by accident.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Script {
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    role: String,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    round: Option<u32>,
    #[serde(default)]
    attempt: Option<u32>,
    #[serde(default)]
    actions: Vec<Action>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEdit {
    path: String,
    content: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitSpec {
    message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerdictSpec {
    verdict: String,
    #[serde(default)]
    findings: Option<u32>,
    #[serde(default)]
    detail: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamJsonSpec {
    #[serde(default)]
    cost_usd: Option<f64>,
    #[serde(default)]
    num_turns: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrandchildSpec {
    sleep: f64,
    pidfile: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Action {
    /// Writes a file (relative paths are relative to the worktree); `${VAR}` is expanded.
    Write(FileEdit),
    Append(FileEdit),
    /// `git add -A` and commit with the job's trailers.
    Commit(CommitSpec),
    /// Misbehaves: writes the result file (if no verdict was written yet, a pass) and commits it.
    CommitResultFile(bool),
    /// Sleeps, printing a line every half second (a busy agent).
    Sleep(f64),
    /// Sleeps without printing anything (a stuck agent).
    SilentSleep(f64),
    Print(String),
    Eprint(String),
    /// Prints claude-like stream-json `system/init`, `assistant` and `result` lines.
    StreamJsonResult(StreamJsonSpec),
    /// Starts a process in the agent's group that is not waited for.
    SpawnGrandchild(GrandchildSpec),
    Exit(i32),
    /// Writes the result file.
    Verdict(VerdictSpec),
    /// Writes raw text as the result file.
    ResultRaw(String),
    /// Writes the environment, sorted `NAME=value` lines, to a file.
    EnvDump(String),
    /// Writes the prompt read on standard input to a file.
    PromptDump(String),
    /// Demo pm: a task file for each spec that no task refers to yet.
    PmTasksFromSpecs(bool),
    /// Demo implementer: records the round in `impl/<task>.md` and commits.
    ImplementTask(bool),
    /// Runs a command with `sh -c` in the worktree; a non-zero exit ends the agent with that code.
    Shell(String),
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1)),
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "hyperloop-scripted-agent: {message}");
            ExitCode::from(3)
        }
    }
}

struct Job {
    role: String,
    task: String,
    round: u32,
    spec_ref: String,
    result_file: PathBuf,
    prompt: String,
    verdict_written: bool,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn run() -> Result<i32, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let script_path = match args.as_slice() {
        [flag, path] if flag == "--script" => PathBuf::from(path),
        _ => return Err("usage: hyperloop-scripted-agent --script FILE".into()),
    };
    // Drain the prompt first: a writer blocked on a full pipe would otherwise hang hyperloop.
    let mut prompt = String::new();
    std::io::stdin()
        .read_to_string(&mut prompt)
        .map_err(|e| format!("cannot read the prompt: {e}"))?;

    let text = std::fs::read_to_string(&script_path)
        .map_err(|e| format!("cannot read {}: {e}", script_path.display()))?;
    let script: Script = hyperloop::yaml::parse(&script_path, &text).map_err(|e| e.to_string())?;

    let mut job = Job {
        role: env("HYPERLOOP_ROLE"),
        task: env("HYPERLOOP_TASK_ID"),
        round: env("HYPERLOOP_ROUND").parse().unwrap_or(0),
        spec_ref: env("HYPERLOOP_SPEC_REF"),
        result_file: PathBuf::from(env("HYPERLOOP_RESULT_FILE")),
        prompt,
        verdict_written: false,
    };
    let state_dir = PathBuf::from(format!("{}.state", script_path.display()));
    let Some((_, rule)) = pick_rule(&script, &job, &state_dir)? else {
        return Err(format!(
            "no rule matches role {:?} task {:?} round {}",
            job.role, job.task, job.round
        ));
    };
    for action in &rule.actions {
        if let Some(code) = perform(action, &mut job)? {
            return Ok(code);
        }
    }
    Ok(0)
}

/// The first matching rule; its use is counted so later runs can match on `attempt`.
fn pick_rule<'a>(
    script: &'a Script,
    job: &Job,
    state_dir: &Path,
) -> Result<Option<(usize, &'a Rule)>, String> {
    std::fs::create_dir_all(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    for (i, rule) in script.rules.iter().enumerate() {
        if rule.role != job.role
            || rule.task.as_ref().is_some_and(|t| *t != job.task)
            || rule.round.is_some_and(|r| r != job.round)
        {
            continue;
        }
        let counter = state_dir.join(format!("rule-{i}.count"));
        let used: u32 = std::fs::read_to_string(&counter)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if rule.attempt.is_some_and(|a| a != used) {
            continue;
        }
        std::fs::write(&counter, (used + 1).to_string())
            .map_err(|e| format!("{}: {e}", counter.display()))?;
        return Ok(Some((i, rule)));
    }
    Ok(None)
}

/// Replaces `${NAME}` with the environment variable's value.
fn expand(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                out.push_str(&env(&after[..end]));
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn write_file(path: &str, content: &str, append: bool) -> Result<(), String> {
    let path = PathBuf::from(expand(path));
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(expand(content).as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn git(args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn commit(job: &Job, message: &str, task_ref: &str) -> Result<(), String> {
    commit_for(&[job.spec_ref.as_str()], message, task_ref)
}

fn commit_for(spec_refs: &[&str], message: &str, task_ref: &str) -> Result<(), String> {
    git(&["add", "-A"])?;
    let specs: String = spec_refs.iter().map(|s| format!("Spec-Ref: {s}\n")).collect();
    let message = format!("{}\n\n{specs}Task-Ref: {task_ref}", expand(message));
    git(&["commit", "-q", "-m", &message])?;
    Ok(())
}

fn write_verdict(job: &mut Job, value: &Value) -> Result<(), String> {
    if job.result_file.as_os_str().is_empty() {
        return Err("HYPERLOOP_RESULT_FILE is not set".into());
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(&job.result_file, text).map_err(|e| format!("{}: {e}", job.result_file.display()))?;
    job.verdict_written = true;
    Ok(())
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Performs one action; `Some(code)` ends the run with that exit code.
fn perform(action: &Action, job: &mut Job) -> Result<Option<i32>, String> {
    match action {
        Action::Write(f) => write_file(&f.path, &f.content, false)?,
        Action::Append(f) => write_file(&f.path, &f.content, true)?,
        Action::Commit(c) => {
            let task = job.task.clone();
            commit(job, &c.message, &task)?;
        }
        Action::CommitResultFile(false) | Action::PmTasksFromSpecs(false) | Action::ImplementTask(false) => {}
        Action::CommitResultFile(true) => {
            if !job.verdict_written {
                write_verdict(
                    job,
                    &json!({"verdict": "pass", "findings": 0, "detail": "result file committed by the agent"}),
                )?;
            }
            let name = job
                .result_file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            git(&["add", "-A"])?;
            git(&["add", "-f", "--", &name])?;
            let message = format!(
                "add everything\n\nSpec-Ref: {}\nTask-Ref: {}",
                job.spec_ref, job.task
            );
            git(&["commit", "-q", "-m", &message])?;
        }
        Action::Sleep(secs) => {
            let end = Instant::now() + Duration::from_secs_f64(secs.max(0.0));
            while Instant::now() < end {
                say("working...");
                std::thread::sleep(Duration::from_millis(500).min(end - Instant::now()));
            }
        }
        Action::SilentSleep(secs) => std::thread::sleep(Duration::from_secs_f64(secs.max(0.0))),
        Action::Print(t) => say(&expand(t)),
        Action::Eprint(t) => {
            let _ = writeln!(std::io::stderr(), "{}", expand(t));
        }
        Action::StreamJsonResult(s) => stream_json(job, s),
        Action::SpawnGrandchild(g) => spawn_grandchild(g)?,
        Action::Exit(code) => return Ok(Some(*code)),
        Action::Shell(command) => {
            let status = Command::new("sh")
                .arg("-c")
                .arg(command)
                .status()
                .map_err(|e| format!("cannot run sh -c {command:?}: {e}"))?;
            if !status.success() {
                return Ok(Some(status.code().unwrap_or(1)));
            }
        }
        Action::Verdict(v) => {
            let mut value = json!({"verdict": v.verdict, "findings": v.findings.unwrap_or(0)});
            if let Some(d) = &v.detail {
                value["detail"] = Value::String(expand(d));
            }
            write_verdict(job, &value)?;
        }
        Action::ResultRaw(text) => {
            std::fs::write(&job.result_file, text)
                .map_err(|e| format!("{}: {e}", job.result_file.display()))?;
            job.verdict_written = true;
        }
        Action::EnvDump(path) => {
            let vars: BTreeMap<String, String> = std::env::vars().collect();
            let text: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            let path = expand(path);
            std::fs::write(&path, text).map_err(|e| format!("{path}: {e}"))?;
        }
        Action::PromptDump(path) => {
            let path = expand(path);
            std::fs::write(&path, &job.prompt).map_err(|e| format!("{path}: {e}"))?;
        }
        Action::PmTasksFromSpecs(true) => pm_tasks_from_specs(job)?,
        Action::ImplementTask(true) => {
            let path = format!("impl/{}.md", job.task);
            let line = format!("- round {}: {} did the work\n", job.round, job.role);
            write_file(&path, &line, true)?;
            let message = format!("{}: implement (round {})", job.task, job.round);
            let task = job.task.clone();
            commit(job, &message, &task)?;
        }
    }
    Ok(None)
}

fn stream_json(job: &Job, s: &StreamJsonSpec) {
    let session = format!("scripted-{}-{}-r{}", job.task, job.role, job.round);
    let turns = s.num_turns.unwrap_or(1);
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    say(
        &json!({"type": "system", "subtype": "init", "cwd": cwd, "session_id": session,
        "tools": ["Bash", "Edit", "Read", "Write"], "model": "scripted"})
        .to_string(),
    );
    say(
        &json!({"type": "assistant", "message": {"id": "msg_scripted", "type": "message",
        "role": "assistant", "content": [{"type": "text", "text": "Working on it."}],
        "stop_reason": null}, "parent_tool_use_id": null, "session_id": session})
        .to_string(),
    );
    let mut result = json!({"type": "result", "subtype": "success", "is_error": false,
        "duration_ms": 10, "num_turns": turns, "result": "Done.", "session_id": session});
    if let Some(c) = s.cost_usd {
        result["total_cost_usd"] = json!(c);
    }
    say(&result.to_string());
}

fn spawn_grandchild(g: &GrandchildSpec) -> Result<(), String> {
    let pidfile = PathBuf::from(expand(&g.pidfile));
    let _ = std::fs::remove_file(&pidfile);
    // `exec` makes the recorded pid the sleeping process itself. Its output stays connected to
    // the agent's pipes, as a forgotten background job's would.
    let script = format!("echo $$ > '{}'; exec sleep {}", pidfile.display(), g.sleep);
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start sh: {e}"))?;
    // Deliberately not waited for.
    drop(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if std::fs::read_to_string(&pidfile).is_ok_and(|s| s.trim().parse::<u32>().is_ok()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("{} was not written", pidfile.display()))
}

/// The front matter of a task file, when it has one.
fn front_matter(text: &str) -> Option<Value> {
    let rest = text.strip_prefix("---\n")?;
    let end = rest.find("\n---")?;
    hyperloop::yaml::parse::<Value>(Path::new("task"), &rest[..end + 1]).ok()
}

/// Collects `*.md` files under `dir`, sorted, skipping hyperloop's own folders.
fn spec_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            let skip = p
                .strip_prefix("specs")
                .is_ok_and(|r| matches!(r.to_str(), Some("tasks") | Some("reviews") | Some("prompts")));
            if !skip {
                spec_files(&p, out);
            }
        } else if p.extension().is_some_and(|e| e == "md") {
            out.push(p);
        }
    }
}

/// Task-Ref is the job's task id (`intake` when the pm runs as intake).
fn pm_tasks_from_specs(job: &Job) -> Result<(), String> {
    let tasks_dir = Path::new("specs/tasks");
    let mut known_specs = Vec::new();
    let mut highest = 0u32;
    if let Ok(entries) = std::fs::read_dir(tasks_dir) {
        for e in entries.flatten() {
            let p = e.path();
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            if let Some(fm) = front_matter(&text) {
                if let Some(s) = fm.get("spec_ref").and_then(Value::as_str) {
                    known_specs.push(s.to_string());
                }
                if let Some(n) = fm
                    .get("id")
                    .and_then(Value::as_str)
                    .and_then(|id| id.strip_prefix("task-"))
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    highest = highest.max(n);
                }
            }
        }
    }
    let mut specs = Vec::new();
    spec_files(Path::new("specs"), &mut specs);
    let mut written = Vec::new();
    for spec in specs {
        let spec_ref = spec.to_string_lossy().into_owned();
        if known_specs.contains(&spec_ref) {
            continue;
        }
        let body = std::fs::read_to_string(&spec).map_err(|e| format!("{spec_ref}: {e}"))?;
        let title = body
            .lines()
            .find_map(|l| l.strip_prefix("# "))
            .map(str::trim)
            .unwrap_or(&spec_ref)
            .to_string();
        highest += 1;
        let id = format!("task-{highest:03}");
        let quoted = serde_json::to_string(&title).map_err(|e| e.to_string())?;
        let text = format!(
            "---\nid: {id}\ntitle: {quoted}\nspec_ref: {spec_ref}\nstatus: not-started\nphase: null\n\
             deps: []\nround: 0\nbranch: null\npr: null\n---\n{}\n",
            body.trim_end()
        );
        std::fs::create_dir_all(tasks_dir).map_err(|e| format!("specs/tasks: {e}"))?;
        let file = tasks_dir.join(format!("{id}.md"));
        std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
        written.push((id, spec_ref));
    }
    if !written.is_empty() {
        let ids: Vec<&str> = written.iter().map(|(id, _)| id.as_str()).collect();
        let specs: Vec<&str> = written.iter().map(|(_, s)| s.as_str()).collect();
        let message = format!("pm: add {}", ids.join(", "));
        commit_for(&specs, &message, &job.task)?;
    }
    Ok(())
}
