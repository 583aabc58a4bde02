//! What hyperloop does differently when it runs inside a GitHub Actions job
//! (`GITHUB_ACTIONS=true`): after `step` or `run` it appends the step outputs the action
//! (`action.yml`) publishes to `$GITHUB_OUTPUT` (after `plan` and `record` too) and a Markdown job summary — what the cycle did, a
//! table of tasks and a Mermaid graph of their dependencies — to `$GITHUB_STEP_SUMMARY`; and it
//! turns errors into workflow-command annotations so a bad configuration or task file is marked
//! on the file itself in the pull request and run views. The rendering functions are pure; only
//! [`write_for_actions`] and [`after_step`] touch the environment and the file system.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::config::LogFormat;
use crate::cycle::execute::{StepReport, WorkerRun};
use crate::emit;
use crate::error::{Error, Result};
use crate::forge::budget::{ApiUsage, PACE_PER_HOUR, PACE_PER_MINUTE};
use crate::target::Target;
use crate::task::{Status, Task};

/// Environment variable through which the action asks for a log format without editing the
/// user's configuration (`console` or `json`).
pub const LOG_FORMAT_ENV: &str = "HYPERLOOP_LOG_FORMAT";

/// The parts of a GitHub Actions job environment hyperloop writes to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActionsEnv {
    /// `$GITHUB_OUTPUT`: the step's outputs file.
    pub output_file: Option<PathBuf>,
    /// `$GITHUB_STEP_SUMMARY`: the step's Markdown summary file.
    pub summary_file: Option<PathBuf>,
    /// `$GITHUB_WORKSPACE`: annotations name files relative to it.
    pub workspace: Option<PathBuf>,
    /// `$HYPERLOOP_TRANSCRIPTS_DIR`: the folder the action uploads as an artifact.
    pub transcripts_dir: Option<PathBuf>,
    /// The run's artifacts page, from `GITHUB_SERVER_URL`, `GITHUB_REPOSITORY`, `GITHUB_RUN_ID`.
    pub artifacts_url: Option<String>,
}

impl ActionsEnv {
    /// The job's environment, or `None` outside GitHub Actions.
    pub fn from_env() -> Option<ActionsEnv> {
        if std::env::var("GITHUB_ACTIONS").ok().as_deref() != Some("true") {
            return None;
        }
        let path = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Some(ActionsEnv {
            output_file: path("GITHUB_OUTPUT"),
            summary_file: path("GITHUB_STEP_SUMMARY"),
            workspace: path("GITHUB_WORKSPACE"),
            transcripts_dir: path(crate::transcripts::DIR_ENV),
            artifacts_url: artifacts_url(),
        })
    }
}

/// The run's artifacts: `$GITHUB_SERVER_URL/$GITHUB_REPOSITORY/actions/runs/$GITHUB_RUN_ID#artifacts`,
/// when the runner set all three.
fn artifacts_url() -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let (server, repo, run) = (
        var("GITHUB_SERVER_URL")?,
        var("GITHUB_REPOSITORY")?,
        var("GITHUB_RUN_ID")?,
    );
    Some(format!(
        "{}/{repo}/actions/runs/{run}#artifacts",
        server.trim_end_matches('/')
    ))
}

/// The job summary's section on the transcripts folder: which tasks' agent transcripts the
/// run's artifact holds, linked to the run's artifacts when the address is known. Empty when
/// the folder holds none.
pub fn transcripts_markdown(listed: &[(String, usize)], artifacts_url: Option<&str>) -> String {
    if listed.is_empty() {
        return String::new();
    }
    let mut md = String::from("### Agent transcripts\n\n");
    let runs: usize = listed.iter().map(|(_, n)| n).sum();
    let whose = listed
        .iter()
        .map(|(id, n)| format!("{} ({n})", code(id)))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = write!(
        md,
        "Redacted transcripts of {runs} agent run{} — {whose} — ",
        if runs == 1 { "" } else { "s" }
    );
    match artifacts_url {
        Some(url) => {
            let _ = writeln!(
                md,
                "are in [this run's artifacts]({}).\n",
                url.replace(['(', ')', ' '], "")
            );
        }
        None => md.push_str("are in this run's artifacts.\n\n"),
    }
    md
}

/// The log format the action asked for through [`LOG_FORMAT_ENV`], if any.
pub fn log_format_override() -> Option<LogFormat> {
    match std::env::var(LOG_FORMAT_ENV).ok()?.trim() {
        "json" => Some(LogFormat::Json),
        "console" => Some(LogFormat::Console),
        _ => None,
    }
}

/// The step outputs, in the order `action.yml` declares them.
pub fn outputs(report: &StepReport) -> Vec<(String, String)> {
    let pair = |k: &str, v: String| (k.to_string(), v);
    let json = serde_json::to_string_pretty(report).unwrap_or_else(|_| "{}".to_string());
    vec![
        pair("tasks-total", report.tasks_total.to_string()),
        pair("tasks-complete", report.tasks_complete.to_string()),
        pair("tasks-failed", report.tasks_failed.to_string()),
        pair("spawned", report.spawned.len().to_string()),
        pair("merged", report.merged.len().to_string()),
        pair("work-remaining", report.work_remaining.to_string()),
        pair("progress", report.progress.clone()),
        pair("cost-usd", format!("{:.4}", report.cost_usd)),
        pair("ready", report.ready.to_string()),
        // The ids alone: a matrix over plain strings names each job by its item.
        pair("items", items_json(report)),
        pair("has-items", (!report.items.is_empty()).to_string()),
        pair("report", json),
    ]
}

/// The ids of the work items `plan` claimed, as one line of JSON (`[]` for any other command).
pub fn items_json(report: &StepReport) -> String {
    let ids: Vec<&str> = report.items.iter().map(|i| i.id.as_str()).collect();
    serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_string())
}

/// `$GITHUB_OUTPUT` text for `pairs`. Single-line values are `key=value`; anything with a line
/// break uses the `key<<DELIMITER` form, with a delimiter derived from `seed` and lengthened
/// until no value contains it, so a value can never end its own block early.
pub fn output_file_text(pairs: &[(String, String)], seed: &str) -> String {
    let mut delimiter = format!("ghadelimiter_{seed}");
    while pairs.iter().any(|(_, v)| v.contains(&delimiter)) {
        delimiter.push('_');
    }
    let mut out = String::new();
    for (key, value) in pairs {
        if value.contains('\n') || value.contains('\r') {
            let _ = writeln!(out, "{key}<<{delimiter}\n{value}\n{delimiter}");
        } else {
            let _ = writeln!(out, "{key}={value}");
        }
    }
    out
}

/// The job summary for one step (for `run`, its last cycle) and the tasks as committed after it.
pub fn summary_markdown(report: &StepReport, tasks: &[Task]) -> String {
    let mut md = String::new();
    let headline = match report.progress.as_str() {
        "all-complete" => "✅ all tasks complete",
        "working" => "🔄 work in progress",
        "waiting" => "⏸️ waiting for approval",
        "stuck" => "⛔ stuck: no task can progress",
        "idle" => "💤 idle: no specs and no tasks",
        _ => "hyperloop",
    };
    let _ = writeln!(md, "## hyperloop — cycle {}: {headline}\n", report.cycle);
    let _ = writeln!(
        md,
        "**{}/{}** tasks complete, **{}** failed · {} commit{} · {:.1} s · ${:.2} agent spend this cycle\n",
        report.tasks_complete,
        report.tasks_total,
        report.tasks_failed,
        report.commits,
        if report.commits == 1 { "" } else { "s" },
        report.duration_s,
        report.cost_usd
    );

    md.push_str("### This cycle\n\n");
    let mut did = Vec::new();
    if report.intake_ran {
        did.push("Intake ran: the `pm` agent turned new or changed specs into tasks.".to_string());
    }
    if report.improver_ran {
        did.push("The `process-improver` ran after failures.".to_string());
    }
    if !report.spawned.is_empty() {
        did.push(format!("Started: {}", runs(&report.spawned, false)));
    }
    if !report.reaped.is_empty() {
        did.push(format!("Finished: {}", runs(&report.reaped, true)));
    }
    for (label, ids) in [
        ("Merged", &report.merged),
        ("Completed", &report.completed),
        ("Failed", &report.failed),
        ("Blocked behind a failed dependency", &report.blocked),
    ] {
        if !ids.is_empty() {
            did.push(format!("{label}: {}", code_list(ids)));
        }
    }
    for refused in &report.push_refused {
        did.push(format!(
            "⚠️ GitHub refused the push of `{}`'s branch: {} — the task went back to its agent \
             with the reason.",
            refused.task_id,
            refused.reason.replace('|', "\\|")
        ));
    }
    for line in &report.checks {
        did.push(format!("Held at merge: {}", cell(line)));
    }
    if !report.waiting.is_empty() {
        did.push(format!(
            "Waiting for approval: {} — add the `lgtm` label to the task's pull request (locally: \
             `hyperloop approve TASK`).",
            code_list(&report.waiting)
        ));
    }
    if did.is_empty() {
        did.push("Nothing to do.".to_string());
    }
    for line in did {
        let _ = writeln!(md, "- {line}");
    }
    md.push('\n');
    if let Some(api) = &report.github_api {
        md.push_str(&github_api_section(api));
    }

    if tasks.is_empty() {
        md.push_str("No tasks yet.\n");
        return md;
    }

    md.push_str("### Tasks\n\n");
    md.push_str("| Task | Title | Status | Phase | Round | PR | Cost |\n");
    md.push_str("| --- | --- | --- | --- | ---: | --- | ---: |\n");
    for t in tasks {
        let phase = match (&t.phase, t.gate_cleared) {
            (Some(p), true) => format!("{} (approved)", cell(p)),
            (Some(p), false) => cell(p),
            (None, _) => "–".to_string(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | ${:.2} |",
            code(&t.id),
            cell(&t.title),
            status_cell(t, report),
            phase,
            t.round,
            pr_link(t.pr.as_deref()),
            t.cost_usd
        );
    }
    let spent: f64 = tasks.iter().map(|t| t.cost_usd).fold(0.0, |a, b| a + b);
    let _ = writeln!(md, "\nAgent spend on these tasks so far: **${spent:.2}**\n");

    md.push_str("### Dependencies\n\n```mermaid\n");
    md.push_str(&mermaid(report, tasks));
    md.push_str("```\n");
    md
}

/// What the step asked of GitHub and what is left: the primary budget as GitHub reports it,
/// the pace of content-creating requests, and what waits for a later step.
fn github_api_section(api: &ApiUsage) -> String {
    let mut md = String::from(
        "### GitHub API

",
    );
    let _ = write!(
        md,
        "- Requests this cycle: **{}** ({} content-creating)",
        api.requests, api.content_requests
    );
    if api.refused > 0 {
        let _ = write!(md, ", **{} refused by a rate limit**", api.refused);
    }
    md.push('\n');
    match (api.remaining, api.limit) {
        (Some(left), Some(limit)) => {
            let _ = write!(md, "- Budget left: **{left}** of {limit} requests");
            if let Some(at) = &api.resets_at {
                let _ = write!(md, " (refills at {at})");
            }
            md.push('\n');
        }
        _ => md.push_str("- Budget left: not reported (no request this cycle)\n"),
    }
    let _ = writeln!(
        md,
        "- Content-creating requests: {} in the last minute (pace {}), {} in the last hour (pace {})",
        api.content_last_minute, PACE_PER_MINUTE, api.content_last_hour, PACE_PER_HOUR
    );
    if api.reserve_only {
        md.push_str("- Below the reserve: only work in flight went on; no new task started.\n");
    }
    if let Some(at) = &api.blocked_until {
        let _ = writeln!(
            md,
            "- GitHub asked to wait until {at}; no request goes out before."
        );
    }
    if !api.deferred.is_empty() {
        let _ = write!(md, "- Deferred to a later cycle");
        if let Some(at) = &api.paced_until {
            let _ = write!(md, " (the pace allows more at {at})");
        }
        let _ = writeln!(
            md,
            ": {}",
            api.deferred
                .iter()
                .map(|d| cell(d))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    md.push('\n');
    md
}

/// A Mermaid `graph TD` of the tasks, an edge from each dependency to its dependent, each node
/// styled by its state.
fn mermaid(report: &StepReport, tasks: &[Task]) -> String {
    let mut g = String::from("graph TD\n");
    // Node names are positions, not task ids: ids may hold characters Mermaid gives a meaning to.
    for (i, t) in tasks.iter().enumerate() {
        let _ = writeln!(
            g,
            "  t{i}[\"{}\"]:::{}",
            mermaid_label(&format!("{}: {}", t.id, shorten(&t.title, 60))),
            node_class(t, report)
        );
    }
    for (i, t) in tasks.iter().enumerate() {
        for dep in &t.deps {
            if let Some(d) = tasks.iter().position(|x| &x.id == dep) {
                let _ = writeln!(g, "  t{d} --> t{i}");
            }
        }
    }
    for (class, style) in [
        ("notStarted", "fill:#f6f8fa,stroke:#8c959f,color:#24292f"),
        ("inProgress", "fill:#ddf4ff,stroke:#0969da,color:#0a3069"),
        ("needsRebase", "fill:#fff8c5,stroke:#9a6700,color:#4d2d00"),
        ("waiting", "fill:#fbefff,stroke:#8250df,color:#3e1f79"),
        (
            "blocked",
            "fill:#ffebe9,stroke:#cf222e,color:#82071e,stroke-dasharray:4 3",
        ),
        ("complete", "fill:#dafbe1,stroke:#1a7f37,color:#044f1e"),
        ("failed", "fill:#ffebe9,stroke:#cf222e,color:#82071e"),
    ] {
        let _ = writeln!(g, "  classDef {class} {style}");
    }
    g
}

fn node_class(t: &Task, report: &StepReport) -> &'static str {
    if report.waiting.contains(&t.id) {
        return "waiting";
    }
    if report.blocked.contains(&t.id) {
        return "blocked";
    }
    match t.status {
        Status::NotStarted => "notStarted",
        Status::InProgress => "inProgress",
        Status::NeedsRebase => "needsRebase",
        Status::Complete => "complete",
        Status::Failed => "failed",
    }
}

fn status_cell(t: &Task, report: &StepReport) -> String {
    let icon = match t.status {
        Status::NotStarted => "⏳",
        Status::InProgress => "🔄",
        Status::NeedsRebase => "🔀",
        Status::Complete => "✅",
        Status::Failed => "❌",
    };
    let mut s = format!("{icon} {}", t.status);
    if report.waiting.contains(&t.id) {
        s.push_str(" (waiting for `lgtm`)");
    } else if report.blocked.contains(&t.id) {
        s.push_str(" (blocked)");
    }
    s
}

fn runs(list: &[WorkerRun], with_verdict: bool) -> String {
    list.iter()
        .map(|r| {
            let mut s = format!("{} {} (round {})", code(&r.task_id), r.role, r.round);
            if with_verdict {
                let _ = write!(s, " → {}", r.verdict.as_deref().unwrap_or("no verdict"));
            }
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn code_list(ids: &[String]) -> String {
    ids.iter().map(|i| code(i)).collect::<Vec<_>>().join(", ")
}

/// A task id as inline code, unless a backtick in it would end the span early.
fn code(s: &str) -> String {
    if s.contains('`') {
        cell(s)
    } else {
        format!("`{}`", s.replace('|', "\\|"))
    }
}

/// Text made safe for one Markdown table cell: no line breaks, no column separators, no HTML
/// (titles come from agents, and a summary must not become a page of their markup).
fn cell(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    one_line
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('|', "\\|")
}

fn pr_link(pr: Option<&str>) -> String {
    let Some(url) = pr.filter(|u| !u.is_empty()) else {
        return "–".to_string();
    };
    let number = url
        .trim_end_matches('/')
        .rsplit_once("/pull/")
        .map(|(_, n)| n)
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
    let safe_url = url.replace(['(', ')', ' ', '|'], "");
    match number {
        Some(n) => format!("[#{n}]({safe_url})"),
        None => format!("<{}>", safe_url.replace(['<', '>'], "")),
    }
}

/// Text for inside a quoted Mermaid label, using Mermaid's entity codes for the characters that
/// would end the label or be read as markup.
fn mermaid_label(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '"' => out.push_str("#quot;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '#' => out.push_str("#35;"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// Appends the outputs and the summary for `report` to the files `env` names.
pub fn write_for_actions(report: &StepReport, tasks: &[Task], env: &ActionsEnv) -> Result<()> {
    if let Some(file) = &env.output_file {
        let seed = format!(
            "{:x}{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        append(file, &output_file_text(&outputs(report), &seed))?;
    }
    if let Some(file) = &env.summary_file {
        let mut md = summary_markdown(report, tasks);
        if let Some(dir) = &env.transcripts_dir {
            md.push_str(&transcripts_markdown(
                &crate::transcripts::listed(dir),
                env.artifacts_url.as_deref(),
            ));
        }
        append(file, &md)?;
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
}

/// Called after `step`, `run`, `plan` and `record`: inside GitHub Actions, publishes the report. The cycle has
/// already committed its work, so a failure here is reported as a warning, not as a failed step.
pub fn after_step(target: &Target, report: &StepReport) {
    let Some(env) = ActionsEnv::from_env() else {
        return;
    };
    let tasks = match target.committed_tasks() {
        Ok(t) => t,
        Err(e) => {
            warn(&format!("cannot read the tasks for the job summary: {e}"));
            Vec::new()
        }
    };
    if let Err(e) = write_for_actions(report, &tasks, &env) {
        warn(&format!("cannot write the step outputs or the job summary: {e}"));
    }
    for line in notices(report, &tasks) {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

fn warn(message: &str) {
    emit!(WARN, "actions_output_failed", reason = message);
    let _ = writeln!(
        std::io::stderr(),
        "::warning title=hyperloop::{}",
        escape_data(message)
    );
}

/// Workflow-command annotations for what went wrong in this cycle: one per task that failed in
/// it, and one when nothing can progress any more.
pub fn notices(report: &StepReport, tasks: &[Task]) -> Vec<String> {
    let mut out = Vec::new();
    for id in &report.failed {
        let reason = tasks
            .iter()
            .find(|t| &t.id == id)
            .and_then(|t| t.failure_reason.clone())
            .unwrap_or_else(|| "see the task file".to_string());
        out.push(format!(
            "::error title={}::{}",
            escape_property(&format!("hyperloop: task {id}")),
            escape_data(&format!("{id} failed: {reason}"))
        ));
    }
    if report.progress == "stuck" {
        out.push(format!(
            "::warning title=hyperloop::{}",
            escape_data("no task can progress: the rest failed or are blocked behind a failed dependency")
        ));
    }
    out
}

/// The `::error` workflow command for `err`, or `None` for a non-failure (another step held
/// the repository). Bad input names its file, and the line and column when the error knows them,
/// relative to `$GITHUB_WORKSPACE` so that GitHub can place it on the file.
pub fn annotate(err: &Error) -> Option<String> {
    let workspace = std::env::var_os("GITHUB_WORKSPACE").map(PathBuf::from);
    annotation(err, workspace.as_deref())
}

/// [`annotate`] with the workspace passed in.
pub fn annotation(err: &Error, workspace: Option<&Path>) -> Option<String> {
    if err.exit_code() == 0 {
        return None;
    }
    let message = escape_data(&err.to_string());
    let Error::Invalid { file, location, .. } = err else {
        return Some(format!("::error title=hyperloop::{message}"));
    };
    let shown = workspace.and_then(|w| file.strip_prefix(w).ok()).unwrap_or(file);
    let mut props = format!("file={}", escape_property(&shown.display().to_string()));
    if let Some((line, column)) = line_column(&location.0) {
        let _ = write!(props, ",line={line}");
        if let Some(c) = column {
            let _ = write!(props, ",col={c}");
        }
    }
    let _ = write!(props, ",title={}", escape_property("hyperloop: invalid input"));
    Some(format!("::error {props}::{message}"))
}

/// The line (and column) in a location such as `line 3 column 7` or `line 12`.
fn line_column(location: &str) -> Option<(u64, Option<u64>)> {
    let mut words = location.split(|c: char| c.is_whitespace() || c == ',' || c == ':');
    let mut line = None;
    let mut column = None;
    while let Some(w) = words.next() {
        match w {
            "line" if line.is_none() => line = words.next().and_then(|n| n.parse().ok()),
            "column" | "col" if column.is_none() => column = words.next().and_then(|n| n.parse().ok()),
            _ => {}
        }
    }
    line.filter(|&l| l > 0).map(|l| (l, column))
}

/// Escaping for a workflow command's message.
fn escape_data(s: &str) -> String {
    s.replace('%', "%25").replace('\r', "%0D").replace('\n', "%0A")
}

/// Escaping for a workflow command's property value.
fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Location;

    #[test]
    fn the_transcripts_section_names_tasks_and_links_the_artifacts() {
        assert_eq!(transcripts_markdown(&[], Some("https://x")), "");
        let listed = vec![("intake".to_string(), 1), ("task-001".to_string(), 2)];
        let md = transcripts_markdown(
            &listed,
            Some("https://github.com/acme/widgets/actions/runs/42#artifacts"),
        );
        assert_eq!(
            md,
            "### Agent transcripts\n\nRedacted transcripts of 3 agent runs — `intake` (1), \
             `task-001` (2) — are in [this run's artifacts](https://github.com/acme/widgets/actions/runs/42#artifacts).\n\n"
        );
        assert!(transcripts_markdown(&listed, None).ends_with("are in this run's artifacts.\n\n"));
    }

    fn run(task: &str, role: &str, round: u32, verdict: Option<&str>) -> WorkerRun {
        WorkerRun {
            task_id: task.into(),
            role: role.into(),
            round,
            verdict: verdict.map(str::to_string),
            duration_s: 1.5,
            cost_usd: Some(0.25),
        }
    }

    fn task(id: &str, title: &str, status: Status, deps: &[&str]) -> Task {
        let mut t = Task::new(id, title, "specs/feature.md");
        t.status = status;
        t.deps = deps.iter().map(|d| d.to_string()).collect();
        t
    }

    fn busy_report() -> StepReport {
        StepReport {
            cycle: 4,
            spawned: vec![
                run("task-003", "implementer", 1, None),
                run("process-improvement", "process-improver", 0, None),
            ],
            reaped: vec![
                run("task-001", "verifier", 0, Some("pass")),
                run("task-002", "implementer", 2, Some("fail")),
            ],
            merged: vec!["task-001".into()],
            completed: vec!["task-001".into()],
            failed: vec!["task-005".into()],
            blocked: vec!["task-006".into()],
            waiting: vec!["task-004".into()],
            intake_ran: true,
            improver_ran: true,
            commits: 7,
            tasks_total: 6,
            tasks_complete: 1,
            tasks_failed: 1,
            progress: "working".into(),
            work_remaining: true,
            duration_s: 12.25,
            cost_usd: 1.5,
            rate_limited_until: None,
            push_refused: Vec::new(),
            items: Vec::new(),
            recorded: Vec::new(),
            refused: Vec::new(),
            ready: 2,
            intake_gave_up: None,
            checks: Vec::new(),
            github_api: None,
        }
    }

    fn busy_tasks() -> Vec<Task> {
        let mut one = task("task-001", "Parse the config", Status::Complete, &[]);
        one.cost_usd = 0.75;
        one.pr = Some("https://github.com/o/r/pull/12".into());
        let mut two = task(
            "task-002",
            "Add a | pipe <b>and</b> a\nnewline",
            Status::InProgress,
            &["task-001"],
        );
        two.phase = Some("implementer".into());
        two.round = 2;
        let mut four = task("task-004", "Ship \"it\" #now", Status::InProgress, &["task-001"]);
        four.phase = Some("human-review".into());
        let mut five = task("task-005", "Doomed", Status::Failed, &[]);
        five.failure_reason = Some("max_task_rounds (50) reached".into());
        vec![
            one,
            two,
            task(
                "task-003",
                "Wire it up",
                Status::InProgress,
                &["task-001", "task-002"],
            ),
            four,
            five,
            task(
                "task-006",
                "Needs the doomed one",
                Status::NotStarted,
                &["task-005", "gone"],
            ),
        ]
    }

    #[test]
    fn outputs_carry_the_report_counts() {
        // Distinct numbers, so that a mix-up of two counts shows.
        let report = StepReport {
            tasks_complete: 2,
            tasks_failed: 3,
            ..busy_report()
        };
        let pairs = outputs(&report);
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "tasks-total",
                "tasks-complete",
                "tasks-failed",
                "spawned",
                "merged",
                "work-remaining",
                "progress",
                "cost-usd",
                "ready",
                "items",
                "has-items",
                "report"
            ]
        );
        let text = output_file_text(&pairs[..8], "seed");
        insta::assert_snapshot!(text);
    }

    #[test]
    fn multi_line_outputs_use_a_delimiter_no_value_contains() {
        let pairs = vec![
            ("one".to_string(), "a".to_string()),
            (
                "many".to_string(),
                "x\nghadelimiter_s\nghadelimiter_s_ too".to_string(),
            ),
        ];
        let text = output_file_text(&pairs, "s");
        assert_eq!(
            text,
            "one=a\nmany<<ghadelimiter_s__\nx\nghadelimiter_s\nghadelimiter_s_ too\nghadelimiter_s__\n"
        );
    }

    #[test]
    fn the_report_output_is_the_json_report() {
        let pairs = outputs(&busy_report());
        let report = &pairs.last().expect("report").1;
        let v: serde_json::Value = serde_json::from_str(report).expect("json");
        assert_eq!(v["tasks_total"], 6);
        assert_eq!(v["merged"][0], "task-001");
        let text = output_file_text(&pairs, "z");
        assert!(text.contains("report<<ghadelimiter_z\n{\n"), "{text}");
        assert!(text.ends_with("}\nghadelimiter_z\n"), "{text}");
    }

    #[test]
    fn summary_of_a_busy_cycle() {
        insta::assert_snapshot!(summary_markdown(&busy_report(), &busy_tasks()));
    }

    #[test]
    fn summary_of_a_cycle_the_github_pace_held_back() {
        let mut report = busy_report();
        report.github_api = Some(ApiUsage {
            requests: 75,
            content_requests: 70,
            refused: 0,
            remaining: Some(871),
            limit: Some(1000),
            resets_at: Some("2026-01-01T13:00:00Z".into()),
            blocked_until: None,
            content_last_minute: 70,
            content_last_hour: 212,
            paced_until: Some("2026-01-01T12:01:00Z".into()),
            deferred: vec![
                "task-004: merge".into(),
                "task-009: start (GitHub API budget)".into(),
            ],
            reserve_only: false,
        });
        let md = summary_markdown(&report, &[]);
        let section = md.split("### GitHub API").nth(1).expect("a GitHub API section");
        insta::assert_snapshot!(section);
    }

    #[test]
    fn summary_of_an_idle_cycle() {
        let report = StepReport {
            cycle: 1,
            progress: "idle".into(),
            ..StepReport::default()
        };
        insta::assert_snapshot!(summary_markdown(&report, &[]));
    }

    #[test]
    fn every_node_gets_a_defined_class() {
        let md = summary_markdown(&busy_report(), &busy_tasks());
        let defined: Vec<&str> = md
            .lines()
            .filter_map(|l| l.trim().strip_prefix("classDef "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let used: Vec<&str> = md
            .lines()
            .filter_map(|l| l.split_once(":::").map(|(_, c)| c.trim()))
            .collect();
        assert_eq!(used.len(), 6, "{md}");
        for c in used {
            assert!(defined.contains(&c), "class {c} is not defined:\n{md}");
        }
    }

    #[test]
    fn invalid_input_is_annotated_on_its_line() {
        let err = Error::invalid(
            "/home/runner/work/r/r/specs/tasks/task-001.md",
            "line 3 column 7",
            "unknown status `done`",
        )
        .with_hint("use one of: not-started, complete");
        let a = annotation(&err, Some(Path::new("/home/runner/work/r/r"))).expect("annotation");
        assert_eq!(
            a,
            "::error file=specs/tasks/task-001.md,line=3,col=7,title=hyperloop%3A invalid input::\
             /home/runner/work/r/r/specs/tasks/task-001.md: line 3 column 7: unknown status `done`%0A  \
             hint: use one of: not-started, complete"
        );
    }

    #[test]
    fn a_dotted_key_gives_the_file_without_a_line() {
        let err = Error::Invalid {
            file: "/elsewhere/a,b:c.yaml".into(),
            location: Location("runtime.max_workers".into()),
            message: "must not be negative, found -1 (100%)".into(),
            hint: None,
        };
        let a = annotation(&err, Some(Path::new("/home/runner/work/r/r"))).expect("annotation");
        assert_eq!(
            a,
            "::error file=/elsewhere/a%2Cb%3Ac.yaml,title=hyperloop%3A invalid input::\
             /elsewhere/a,b:c.yaml: runtime.max_workers: must not be negative, found -1 (100%25)"
        );
    }

    #[test]
    fn other_errors_are_plain_annotations_and_busy_is_none() {
        assert_eq!(
            annotation(&Error::other("git broke"), None).as_deref(),
            Some("::error title=hyperloop::git broke")
        );
        let busy = Error::Busy {
            path: "/x".into(),
            pid: 1,
        };
        assert_eq!(annotation(&busy, None), None);
    }

    #[test]
    fn line_numbers_are_read_from_locations() {
        assert_eq!(line_column("line 12"), Some((12, None)));
        assert_eq!(line_column("line 1 column 10"), Some((1, Some(10))));
        assert_eq!(line_column("front matter, line 4"), Some((4, None)));
        assert_eq!(line_column("runtime.max_workers"), None);
        assert_eq!(line_column("line zero"), None);
        assert_eq!(line_column("line 0"), None);
    }

    #[test]
    fn failures_and_a_stuck_run_become_annotations() {
        let mut report = busy_report();
        report.progress = "stuck".into();
        let n = notices(&report, &busy_tasks());
        assert_eq!(
            n,
            [
                "::error title=hyperloop%3A task task-005::task-005 failed: max_task_rounds (50) reached",
                "::warning title=hyperloop::no task can progress: the rest failed or are blocked behind a failed dependency",
            ]
        );
    }

    #[test]
    fn pull_request_links_show_their_number() {
        assert_eq!(
            pr_link(Some("https://github.com/o/r/pull/7")),
            "[#7](https://github.com/o/r/pull/7)"
        );
        assert_eq!(pr_link(Some("https://example.com/x")), "<https://example.com/x>");
        assert_eq!(pr_link(None), "–");
    }
}
