//! The dashboard issue: one issue, found by its own label, that shows every task and takes
//! commands as checkboxes — approve a gate, retry a failed or cancelled task, cancel a task.
//!
//! Cost: one listing of the open issues carrying the label at the start of a step (its body
//! comes with it) and one write at the end, only when what it shows changed. Creating it costs a
//! second listing, so that two steps that raced to create it both see the two issues and keep
//! the oldest; any later step closes a duplicate it finds the same way.
//!
//! Commands are read at the start of the step and carried out through the same code as the
//! `hyperloop retry`/`cancel` commands and the `lgtm` label. An approval counts under the same
//! rule as the label: the last editor of the issue must have write permission, and the box names
//! the head it approves (the full SHA sits in the box's hidden marker), so a box ticked for a
//! head that has changed since does not count. The next rendering clears every box and says
//! what was done.
//!
//! GitHub cannot update an issue conditionally, so a box ticked while a step runs could be
//! overwritten by that step's write. A step that ran longer than [`REREAD_AFTER`] reads the
//! issue again before writing and, when someone edited it meanwhile, leaves it for the next
//! step (which the edit triggers) instead of overwriting it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::emit;
use crate::error::Result;
use crate::forge::ForgeError;
use crate::task::{Status, Task};

use super::Op;
use super::Stepper;
use super::wait;

/// The label that finds the dashboard issue.
pub const DASHBOARD_LABEL: &str = "hyperloop:dashboard";
/// The dashboard's title.
const TITLE: &str = "hyperloop dashboard";
/// GitHub refuses an issue body longer than this many characters.
pub const MAX_BODY: usize = 65_536;
/// A step longer than this reads the dashboard again before it writes.
const REREAD_AFTER: Duration = Duration::from_secs(10);
/// The line that says which step wrote the body; not part of the comparison, so a step that
/// changes nothing else does not rewrite the issue.
const STAMP: &str = "<sub>Updated by the step at ";
const NOTES_START: &str = "<!-- hyperloop:notes -->";
const NOTES_END: &str = "<!-- /hyperloop:notes -->";

/// What this step knows of the dashboard.
#[derive(Debug, Default)]
pub(super) struct Dashboard {
    /// The issue, when there is one.
    number: Option<u64>,
    /// Its body as read at the start of the step.
    body: String,
    read_at: Option<Instant>,
    /// Reading failed: this step leaves the dashboard alone.
    unreadable: bool,
    /// Tasks whose gate a ticked box approved (see `poll_gate`).
    pub approved: HashSet<String>,
    /// What this step did about ticked boxes, one line each.
    notes: Vec<String>,
}

/// A command as a ticked box carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Command {
    pub kind: Kind,
    pub task_id: String,
    /// For an approval: the head it approves.
    pub head: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Approve,
    Retry,
    Cancel,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Approve => "approve",
            Kind::Retry => "retry",
            Kind::Cancel => "cancel",
        }
    }
}

/// The hidden marker of a box.
fn marker(kind: Kind, task_id: &str, head: Option<&str>) -> String {
    match head {
        Some(h) => format!("<!-- hyperloop:{} {task_id} {h} -->", kind.as_str()),
        None => format!("<!-- hyperloop:{} {task_id} -->", kind.as_str()),
    }
}

/// The ticked boxes of a body, in order, each once.
pub(super) fn ticked(body: &str) -> Vec<Command> {
    let mut out: Vec<Command> = Vec::new();
    for line in body.lines() {
        let l = line.trim_start();
        let Some(rest) = l.strip_prefix("- [").or_else(|| l.strip_prefix("* [")) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix("x]").or_else(|| rest.strip_prefix("X]")) else {
            continue;
        };
        let Some(start) = rest.find("<!-- hyperloop:") else {
            continue;
        };
        let inner = &rest[start + "<!-- hyperloop:".len()..];
        let Some(end) = inner.find("-->") else {
            continue;
        };
        let mut words = inner[..end].split_whitespace();
        let kind = match words.next() {
            Some("approve") => Kind::Approve,
            Some("retry") => Kind::Retry,
            Some("cancel") => Kind::Cancel,
            _ => continue,
        };
        let Some(task_id) = words.next() else {
            continue;
        };
        if crate::task::file::id_problem(task_id).is_some() {
            continue;
        }
        let head = words
            .next()
            .filter(|h| h.len() == 40 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .map(str::to_string);
        let cmd = Command {
            kind,
            task_id: task_id.to_string(),
            head,
        };
        if !out.contains(&cmd) {
            out.push(cmd);
        }
    }
    out
}

/// Text from agents or task files, made safe for one line of the body: no markup that could
/// become a box, a hidden marker or a mention.
fn inline(text: &str, max: usize) -> String {
    let one: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('@', "@\u{200b}")
        .replace('[', "&#91;");
    if one.chars().count() > max {
        let cut: String = one.chars().take(max).collect();
        format!("{cut}…")
    } else {
        one
    }
}

/// The body without the stamp line: what "changed" compares.
fn content(body: &str) -> String {
    body.replace("\r\n", "\n")
        .lines()
        .filter(|l| !l.starts_with(STAMP))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

/// The notes section of an earlier body, kept while no new command arrives.
fn old_notes(body: &str) -> Option<String> {
    let body = body.replace("\r\n", "\n");
    let start = body.find(NOTES_START)? + NOTES_START.len();
    let end = body[start..].find(NOTES_END)? + start;
    Some(body[start..end].trim().to_string())
}

/// The first line of the latest round's findings: what the last failing agent said first.
fn first_finding(task: &Task) -> Option<String> {
    let findings = task.findings();
    let last = findings.rsplit("### Round ").next()?;
    last.lines()
        .skip(1)
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

fn short(sha: &str) -> &str {
    sha.get(..7).unwrap_or(sha)
}

fn dollars(x: f64) -> String {
    format!("${x:.2}")
}

/// Where the run that wrote the body can be seen, from the Actions environment.
fn run_link() -> String {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    match (var("GITHUB_RUN_ID"), var("GITHUB_REPOSITORY")) {
        (Some(id), Some(repo)) => {
            let server = var("GITHUB_SERVER_URL").unwrap_or_else(|| "https://github.com".into());
            format!(
                "[run {id}]({}/{repo}/actions/runs/{id})",
                server.trim_end_matches('/')
            )
        }
        (Some(id), None) => format!("run {id}"),
        _ => "outside GitHub Actions".to_string(),
    }
}

/// Everything the dashboard shows, with the tasks as separate entries so that the body can
/// leave some out when it would be too long.
pub(super) struct View {
    pub head: String,
    /// (entry, task is complete).
    pub entries: Vec<(String, bool)>,
    pub tail: String,
}

/// Puts a view together within `limit` characters: all of it when it fits; else complete tasks
/// collapse into a count; else the last entries go, with a count of what is not shown.
pub(super) fn assemble(view: &View, limit: usize) -> String {
    let join = |entries: &[&str], extra: &str| {
        let mut s = view.head.clone();
        for e in entries {
            s.push_str(e);
        }
        s.push_str(extra);
        s.push_str(&view.tail);
        s
    };
    let all: Vec<&str> = view.entries.iter().map(|(e, _)| e.as_str()).collect();
    let body = join(&all, "");
    if body.chars().count() <= limit {
        return body;
    }
    let open: Vec<&str> = view
        .entries
        .iter()
        .filter(|(_, complete)| !complete)
        .map(|(e, _)| e.as_str())
        .collect();
    let complete = view.entries.len() - open.len();
    let collapsed = if complete > 0 {
        format!("- {complete} complete tasks, not listed for space (`hyperloop status` lists them)\n")
    } else {
        String::new()
    };
    let body = join(&open, &collapsed);
    if body.chars().count() <= limit {
        return body;
    }
    let mut kept = open.len();
    loop {
        let more = format!(
            "{collapsed}- {} more tasks not listed for space (`hyperloop status` lists them)\n",
            open.len() - kept
        );
        let body = join(&open[..kept], &more);
        if body.chars().count() <= limit || kept == 0 {
            return body;
        }
        kept -= 1;
    }
}

impl Stepper {
    fn dash(&mut self) -> Option<&mut Dashboard> {
        self.gh.as_mut().map(|g| &mut g.dashboard)
    }

    /// Whether a ticked box approved `task_id`'s gate in this step.
    pub(super) fn dashboard_approves(&self, task_id: &str) -> bool {
        self.gh
            .as_ref()
            .is_some_and(|g| g.dashboard.approved.contains(task_id))
    }

    fn dashboard_trouble(&self, what: &str, e: &ForgeError) {
        if !self.deferred("dashboard", what, e) {
            emit!(
                WARN,
                "dashboard_not_updated",
                action = what,
                error = e.to_string().as_str()
            );
        }
    }

    /// Start of a step: finds the dashboard (closing a duplicate a race left) and carries out
    /// its ticked boxes. Never fails the step for the dashboard's sake.
    pub(super) fn read_dashboard(&mut self) -> Result<()> {
        let Some(gh) = self.gh.as_ref() else {
            return Ok(());
        };
        let listed = wait(gh.client.open_issues_labelled(DASHBOARD_LABEL));
        let issues = match listed {
            Ok(i) => i,
            Err(e) => {
                self.dashboard_trouble("read the dashboard", &e);
                if let Some(d) = self.dash() {
                    d.unreadable = true;
                }
                return Ok(());
            }
        };
        let Some(keep) = self.keep_oldest(issues) else {
            if let Some(d) = self.dash() {
                d.read_at = Some(Instant::now());
            }
            return Ok(());
        };
        let commands = ticked(&keep.body);
        if let Some(d) = self.dash() {
            d.number = Some(keep.number);
            d.body.clone_from(&keep.body);
            d.read_at = Some(Instant::now());
        }
        if !commands.is_empty() {
            self.carry_out(keep.number, &commands)?;
        }
        Ok(())
    }

    /// Of the open dashboards listed (oldest first), keeps the oldest and closes the others.
    fn keep_oldest(&self, mut issues: Vec<crate::forge::IssueState>) -> Option<crate::forge::IssueState> {
        issues.sort_by_key(|i| i.number);
        let mut it = issues.into_iter();
        let keep = it.next()?;
        for dup in it {
            let text = format!(
                "hyperloop keeps one dashboard: this one duplicates #{} (two steps created one at the same time), so it is closed.\n",
                keep.number
            );
            let Some(gh) = self.gh.as_ref() else { break };
            match wait(gh.client.close_issue(dup.number, &text)) {
                Ok(()) => emit!(
                    INFO,
                    "dashboard_duplicate_closed",
                    issue = dup.number,
                    kept = keep.number
                ),
                Err(e) => self.dashboard_trouble("close a duplicate dashboard", &e),
            }
        }
        Some(keep)
    }

    /// Carries out ticked boxes, once each: the body written at the end of the step clears them.
    fn carry_out(&mut self, issue: u64, commands: &[Command]) -> Result<()> {
        // Who ticked an approval: the issue's last editor, asked only when there is one.
        let mut editor: Option<Option<String>> = None;
        let mut notes = Vec::new();
        for cmd in commands {
            let id = cmd.task_id.as_str();
            let note = match cmd.kind {
                Kind::Retry | Kind::Cancel => {
                    let op = if cmd.kind == Kind::Retry {
                        Op::Retry
                    } else {
                        Op::Cancel
                    };
                    match self.apply_op(op, id, "a box on the dashboard issue") {
                        Ok(said) => format!("{}: done — {}", cmd.kind.as_str(), inline(&said, 300)),
                        Err(e) if e.exit_code() == 2 => {
                            format!(
                                "{} {id}: not done — {}",
                                cmd.kind.as_str(),
                                inline(&e.to_string(), 300)
                            )
                        }
                        Err(e) => return Err(e),
                    }
                }
                Kind::Approve => {
                    if editor.is_none() {
                        editor = Some(self.dashboard_editor(issue));
                    }
                    self.approve_from_dashboard(cmd, editor.clone().flatten().as_deref())
                }
            };
            emit!(
                INFO,
                "dashboard_command",
                task_id = id,
                command = cmd.kind.as_str(),
                outcome = note.as_str()
            );
            notes.push(note);
        }
        if let Some(d) = self.dash() {
            d.notes = notes;
        }
        Ok(())
    }

    /// The login that last edited the dashboard, when GitHub says.
    fn dashboard_editor(&self, issue: u64) -> Option<String> {
        let gh = self.gh.as_ref()?;
        match wait(gh.client.last_body_edit(issue)) {
            Ok(edit) => edit.map(|e| e.editor),
            Err(e) => {
                self.dashboard_trouble("read who edited the dashboard", &e);
                None
            }
        }
    }

    /// An approval by a ticked box: it counts when the editor may approve, the task waits at a
    /// gate (or at a merge that waits for approval), and the box named the head there is now.
    fn approve_from_dashboard(&mut self, cmd: &Command, editor: Option<&str>) -> String {
        let id = cmd.task_id.as_str();
        let Some(login) = editor else {
            return format!("approve {id}: not done — GitHub did not say who ticked the box");
        };
        match self.may_approve(login) {
            Ok(true) => {}
            Ok(false) => {
                return format!(
                    "approve {id}: not done — @{login} does not have write permission on this repository"
                );
            }
            Err(e) => {
                self.dashboard_trouble("read a collaborator's permission", &e);
                return format!(
                    "approve {id}: not done yet — could not read @{login}'s permission; tick it again"
                );
            }
        }
        let waiting = self
            .plan()
            .ok()
            .and_then(|p| p.parked.into_iter().find(|w| w.task_id == id));
        let Some(waiting) = waiting else {
            return format!("approve {id}: not done — it waits at no gate");
        };
        let tip = self
            .repo
            .branch_tip(&crate::task::file::task_branch(id))
            .ok()
            .flatten();
        if cmd.head.is_none() || cmd.head != tip {
            return format!(
                "approve {id}: not done — its head changed since the box was shown (now `{}`); approve the new head",
                tip.as_deref().map_or("none", short)
            );
        }
        if let Some(d) = self.dash() {
            d.approved.insert(id.to_string());
        }
        format!(
            "approve {id}: `{}` approved at `{}` by @{login}",
            waiting.step,
            tip.as_deref().map_or("", short)
        )
    }

    /// End of a step: writes the dashboard when what it shows changed (creating it when there
    /// is none). Never fails the step.
    pub(super) fn publish_dashboard(&mut self) {
        let Some(gh) = self.gh.as_ref() else { return };
        let d = &gh.dashboard;
        if d.unreadable {
            return;
        }
        let mut old = d.body.clone();
        if let (Some(n), Some(at)) = (d.number, d.read_at)
            && at.elapsed() > REREAD_AFTER
        {
            match wait(gh.client.open_issues_labelled(DASHBOARD_LABEL)) {
                Ok(now) => match now.into_iter().find(|i| i.number == n) {
                    Some(i) if content(&i.body) != content(&old) => {
                        // A person edited it while this step ran: their boxes are the next
                        // step's to read, not this step's to overwrite.
                        emit!(INFO, "dashboard_edited_meanwhile", issue = n);
                        return;
                    }
                    Some(i) => old = i.body,
                    None => {}
                },
                Err(e) => {
                    self.dashboard_trouble("read the dashboard", &e);
                    return;
                }
            }
        }
        let number = d.number;
        let body = self.render_dashboard(&old);
        let Some(gh) = self.gh.as_ref() else { return };
        match number {
            Some(n) => {
                if content(&body) == content(&old) {
                    return;
                }
                match wait(gh.client.update_issue_body(n, &body)) {
                    Ok(()) => emit!(INFO, "dashboard_updated", issue = n),
                    Err(e) => self.dashboard_trouble("update the dashboard", &e),
                }
            }
            None => match wait(gh.client.create_issue(TITLE, &body, &[DASHBOARD_LABEL])) {
                Ok(issue) => {
                    emit!(
                        INFO,
                        "dashboard_created",
                        issue = issue.number,
                        url = issue.url.as_str()
                    );
                    // Another step may have created one at the same time: both look again
                    // and the oldest stays.
                    match wait(gh.client.open_issues_labelled(DASHBOARD_LABEL)) {
                        Ok(all) if all.len() > 1 => {
                            self.keep_oldest(all);
                        }
                        Ok(_) => {}
                        Err(e) => self.dashboard_trouble("read the dashboard", &e),
                    }
                }
                Err(e) => self.dashboard_trouble("create the dashboard", &e),
            },
        }
    }

    /// The body for the tasks as they are now. `old` is the body as read, for its notes.
    fn render_dashboard(&self, old: &str) -> String {
        let tasks: Vec<&Task> = self.tasks.values().collect();
        let plan = self.plan().ok();
        let parked = plan.as_ref().map(|p| p.parked.clone()).unwrap_or_default();
        let blocked = plan.as_ref().map(|p| p.blocked.clone()).unwrap_or_default();
        let count = |s: Status| tasks.iter().filter(|t| t.status == s).count();
        let spent: f64 = tasks.iter().map(|t| t.cost_usd).sum();

        let mut head = String::new();
        head.push_str("<!-- hyperloop:dashboard — hyperloop rewrites this issue after each step; tick a box to give a command -->\n");
        let _ = writeln!(head, "# {TITLE}\n");
        let _ = writeln!(
            head,
            "**{} tasks**: {} in progress, {} not started, {} complete, {} failed.\n",
            tasks.len(),
            count(Status::InProgress) + count(Status::NeedsRebase),
            count(Status::NotStarted),
            count(Status::Complete),
            count(Status::Failed)
        );
        let caps = &self.config.runtime;
        let total_cap = caps.max_total_cost_usd.map_or_else(
            || "no total cap".to_string(),
            |c| format!("of {} total", dollars(c)),
        );
        let task_cap = caps.max_task_cost_usd.map_or_else(
            || "no cap per task".to_string(),
            |c| format!("at most {} per task", dollars(c)),
        );
        let _ = writeln!(head, "**Spend**: {} {total_cap}; {task_cap}.\n", dollars(spent));

        if !parked.is_empty() {
            head.push_str("## Waiting for you\n\n");
            for w in &parked {
                let pr = self.tasks.get(&w.task_id).and_then(|t| t.pr.clone());
                let link = pr.map_or_else(String::new, |u| format!(" — {}", pr_link(&u)));
                let _ = writeln!(head, "- **{}** at `{}`{link}", w.task_id, inline(&w.step, 80));
            }
            head.push('\n');
        }
        let failed: Vec<&&Task> = tasks.iter().filter(|t| t.status == Status::Failed).collect();
        if !failed.is_empty() || !blocked.is_empty() {
            head.push_str("## Failed and blocked\n\n");
            for t in failed {
                let why = if t.cancelled {
                    "cancelled".to_string()
                } else {
                    t.failure_reason
                        .as_deref()
                        .map_or_else(|| "failed".to_string(), |r| format!("failed: {}", inline(r, 200)))
                };
                let _ = writeln!(head, "- **{}** {why}", t.id);
            }
            for b in &blocked {
                let _ = writeln!(
                    head,
                    "- **{}** blocked: waits for {}",
                    b.task_id,
                    b.because.join(", ")
                );
            }
            head.push('\n');
        }
        head.push_str("## Tasks\n\n");

        // Tasks that need attention first, complete ones last (they are the first to go when
        // the body is too long).
        let rank = |t: &Task| match t.status {
            Status::InProgress | Status::NeedsRebase => 0,
            Status::Failed => 1,
            Status::NotStarted => 2,
            Status::Complete => 3,
        };
        let mut ordered = tasks.clone();
        ordered.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.id.cmp(&b.id)));
        let entries = ordered
            .iter()
            .map(|t| (self.task_entry(t, &parked), t.status == Status::Complete))
            .collect();

        let mut tail = String::from("\n## Last commands\n\n");
        tail.push_str(NOTES_START);
        tail.push('\n');
        let notes = self
            .gh
            .as_ref()
            .map(|g| g.dashboard.notes.clone())
            .unwrap_or_default();
        if notes.is_empty() {
            match old_notes(old).filter(|n| !n.is_empty()) {
                Some(n) => {
                    tail.push_str(&n);
                    tail.push('\n');
                }
                None => tail.push_str("None yet.\n"),
            }
        } else {
            for n in notes {
                let _ = writeln!(tail, "- {n}");
            }
        }
        tail.push_str(NOTES_END);
        tail.push('\n');
        let _ = writeln!(
            tail,
            "\n{STAMP}{} · {}</sub>",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            run_link()
        );
        assemble(&View { head, entries, tail }, MAX_BODY)
    }

    /// One task's entry: its line, then its boxes.
    fn task_entry(&self, t: &Task, parked: &[crate::cycle::plan::Parked]) -> String {
        let mut line = format!("- **{}** {} — {}", t.id, inline(&t.title, 80), t.status);
        if let Some(phase) = &t.phase {
            let _ = write!(line, " · `{}`", inline(phase, 60));
        }
        let _ = write!(line, " · round {}", t.round);
        if let Some(pr) = &t.pr {
            let _ = write!(line, " · {}", pr_link(pr));
        }
        if let Some(v) = &t.last_verdict {
            let _ = write!(line, " · last verdict: {}", inline(v, 20));
            if !matches!(v.as_str(), "pass")
                && let Some(f) = first_finding(t)
            {
                let _ = write!(line, " — “{}”", inline(&f, 120));
            }
        }
        if t.cost_usd > 0.0 {
            let _ = write!(line, " · {}", dollars(t.cost_usd));
        }
        line.push('\n');
        let mut boxes = Vec::new();
        if let Some(w) = parked.iter().find(|w| w.task_id == t.id)
            && let Ok(Some(tip)) = self.repo.branch_tip(&crate::task::file::task_branch(&t.id))
        {
            boxes.push(format!(
                "  - [ ] {} approve `{}` at `{}`",
                marker(Kind::Approve, &t.id, Some(&tip)),
                inline(&w.step, 60),
                short(&tip)
            ));
        }
        if t.status == Status::Failed {
            boxes.push(format!("  - [ ] {} retry", marker(Kind::Retry, &t.id, None)));
        } else if t.status != Status::Complete {
            boxes.push(format!("  - [ ] {} cancel", marker(Kind::Cancel, &t.id, None)));
        }
        for b in boxes {
            line.push_str(&b);
            line.push('\n');
        }
        line
    }
}

/// `[#12](url)` for a pull request URL.
fn pr_link(url: &str) -> String {
    match super::pull_requests::pr_number(url) {
        Some(n) => format!("[#{n}]({url})"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticked_boxes_are_read_once_and_unticked_ones_not_at_all() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let body = format!(
            "- **t1** x\n  - [x] <!-- hyperloop:approve t1 {sha} --> approve\n  - [ ] <!-- hyperloop:cancel t1 --> cancel\n\
             - [X] <!-- hyperloop:retry t2 --> retry\n- [x] <!-- hyperloop:retry t2 --> retry\n\
             - [x] <!-- hyperloop:delete t3 -->\n- [x] <!-- hyperloop:cancel ../x -->\ntext - [x] <!-- hyperloop:cancel t4 -->\n"
        );
        let got = ticked(&body);
        assert_eq!(
            got,
            vec![
                Command {
                    kind: Kind::Approve,
                    task_id: "t1".into(),
                    head: Some(sha.into())
                },
                Command {
                    kind: Kind::Retry,
                    task_id: "t2".into(),
                    head: None
                },
            ]
        );
    }

    #[test]
    fn agent_text_cannot_become_a_box_or_a_mention() {
        let s = inline("ok\n- [x] <!-- hyperloop:cancel t1 --> @alice", 200);
        assert!(
            !s.contains('\n') && !s.contains("<!--") && !s.contains("[x]"),
            "{s}"
        );
        assert!(!s.contains("@alice"), "{s}");
        assert!(ticked(&format!("- **t** {s}")).is_empty());
    }

    #[test]
    fn a_body_too_long_collapses_complete_tasks_first() {
        let view = View {
            head: "head\n".into(),
            entries: (0..10)
                .map(|i| (format!("- entry {i} {}\n", "x".repeat(100)), i >= 4))
                .collect(),
            tail: "tail\n".into(),
        };
        let all = assemble(&view, 10_000);
        assert!(all.contains("entry 9"));
        let collapsed = assemble(&view, 800);
        assert!(collapsed.chars().count() <= 800, "{}", collapsed.len());
        assert!(
            collapsed.contains("entry 3") && !collapsed.contains("entry 4"),
            "{collapsed}"
        );
        assert!(collapsed.contains("6 complete tasks"), "{collapsed}");
        let cut = assemble(&view, 400);
        assert!(cut.chars().count() <= 400, "{}", cut.len());
        assert!(
            cut.contains("6 complete tasks") && cut.contains("more tasks not listed"),
            "{cut}"
        );
        assert!(cut.ends_with("tail\n"));
    }

    #[test]
    fn the_stamp_alone_is_no_change() {
        let a = format!("x\n{STAMP}2026-01-01 · run 1</sub>\n");
        let b = format!("x\r\n{STAMP}2026-01-02 · run 2</sub>");
        assert_eq!(content(&a), content(&b));
        assert_ne!(content(&a), content("y\n"));
    }
}
