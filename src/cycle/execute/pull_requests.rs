//! What a task's pull request says: its number, its labels, and its description — the task, its
//! rounds with their verdicts, cost and runs, and the findings the implementer works from, with
//! agent text redacted. Shared by the GitHub side of the step (`github_mode` and the behaviours
//! beside it); no I/O here.

use crate::task::Task;

/// The label that clears a gate.
pub const APPROVAL_LABEL: &str = "lgtm";

/// The pull request number at the end of a PR URL.
pub fn pr_number(url: &str) -> Option<u64> {
    url.trim_end_matches('/').rsplit('/').next()?.parse().ok()
}

/// The `spec:<name>` label for a spec path: `specs/auth/login.md` → `spec:auth/login`.
pub fn spec_label(spec_ref: &str, specs_dir: &str) -> String {
    let name = spec_ref
        .strip_prefix(specs_dir.trim_end_matches('/'))
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(spec_ref);
    let name = name.strip_suffix(".md").unwrap_or(name);
    // GitHub limits label names to 50 characters.
    let label = format!("spec:{name}");
    label.chars().take(50).collect()
}

/// The body of a task's pull request, with the runs of its rounds linked through the runner's
/// variables (or the pull request's own address) and agent text redacted.
pub fn pr_body(task: &Task) -> String {
    render_pr_body(task, runs_url(task).as_deref(), crate::redact::Redactor::global())
}

/// Most characters of findings a body shows: findings can be long (test output), and a body
/// holds at most 65,536 characters beside the task's spec and its rounds.
pub const BODY_FINDINGS_MAX: usize = 4_000;

/// `<server>/<owner>/<repo>/actions/runs`, where a round's run is shown: the workflow's
/// repository from the runner (`GITHUB_SERVER_URL`, `GITHUB_REPOSITORY`), else the repository of
/// the task's pull request.
fn runs_url(task: &Task) -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if let (Some(server), Some(repo)) = (var("GITHUB_SERVER_URL"), var("GITHUB_REPOSITORY")) {
        return Some(format!("{}/{repo}/actions/runs", server.trim_end_matches('/')));
    }
    let pr = task.pr.as_deref()?;
    let (repo, number) = pr.trim_end_matches('/').rsplit_once("/pull/")?;
    number
        .chars()
        .all(|c| c.is_ascii_digit())
        .then(|| format!("{repo}/actions/runs"))
}

/// [`pr_body`] with the address runs are shown under (`runs`) and the redactor given.
pub fn render_pr_body(task: &Task, runs: Option<&str>, redactor: &crate::redact::Redactor) -> String {
    let mut body = format!(
        "Task **{}** — {}\n\n- spec: `{}`\n- round: {}\n- latest verdict: {}\n- status: {}\n",
        task.id,
        task.title,
        task.spec_ref,
        task.round,
        task.last_verdict.as_deref().unwrap_or("none yet"),
        task.status
    );
    if task.cost_usd > 0.0 {
        body.push_str(&format!("- agent spend so far: ${:.2}\n", task.cost_usd));
    }
    let spec = task.spec_text();
    if !spec.trim().is_empty() {
        body.push_str("\n## Task\n\n");
        body.push_str(spec.trim());
        body.push('\n');
    }
    if !task.history.is_empty() {
        body.push_str(
            "\n## Rounds\n\n| round | role | verdict | findings | duration | cost | transcript |\n\
             | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for a in &task.history {
            let cost = a.cost_usd.map_or_else(|| "–".to_string(), |c| format!("${c:.2}"));
            let transcript = match (a.run_id, runs) {
                (Some(id), Some(base)) => format!("[run {id}]({base}/{id}#artifacts)"),
                (Some(id), None) => format!("run {id}"),
                (None, _) => "–".to_string(),
            };
            body.push_str(&format!(
                "| {} | {} | {} | {} | {:.0} s | {cost} | {transcript} |\n",
                a.round, a.role, a.verdict, a.findings, a.duration_s
            ));
        }
    }
    if let Some((heading, text)) = latest_findings(task) {
        let text = redactor.redact(text);
        let (shown, cut) = match text.char_indices().nth(BODY_FINDINGS_MAX) {
            Some((at, _)) => (&text[..at], true),
            None => (text.as_str(), false),
        };
        // A fence longer than any run of backticks inside: agent text stays text (no markup,
        // no mentions, no checkboxes).
        let longest = shown.split(|c| c != '`').map(str::len).max().unwrap_or(0);
        let fence = "`".repeat(longest.max(2) + 1);
        body.push_str(&format!(
            "\n## Findings of the latest failing round\n\n{}\n\n{fence}\n{}\n{fence}\n",
            heading.replace(['<', '>', '@'], ""),
            shown.trim_end()
        ));
        if cut {
            body.push_str(&format!(
                "\n(cut at {BODY_FINDINGS_MAX} characters; the task file holds all of them)\n"
            ));
        }
    }
    body.push_str("\n<sub>Managed by hyperloop. Add the `lgtm` label to clear a gate.</sub>\n");
    body
}

/// The last round's findings the task keeps for its implementer: its heading (`Round 2 —
/// verifier: fail`) and its text.
fn latest_findings(task: &Task) -> Option<(&str, &str)> {
    let findings = task.findings();
    let start = match findings.rfind("\n### Round ") {
        Some(i) => i + 1,
        None if findings.starts_with("### Round ") => 0,
        // Findings written by hand or by another tool: shown whole.
        None => return (!findings.is_empty()).then_some(("Findings", findings)),
    };
    let section = &findings[start..];
    let (heading, text) = section.split_once('\n').unwrap_or((section, ""));
    let text = text.trim();
    (!text.is_empty()).then(|| (heading.trim_start_matches('#').trim(), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_numbers() {
        assert_eq!(spec_label("specs/auth/login.md", "specs"), "spec:auth/login");
        assert_eq!(spec_label("specs/a.md", "specs/"), "spec:a");
        assert_eq!(pr_number("https://github.com/o/r/pull/42"), Some(42));
        assert_eq!(pr_number("https://github.com/o/r/pull/x"), None);
    }

    fn task_with_rounds() -> Task {
        let mut t = Task::new("task-001", "Login", "specs/login.md");
        t.body = "Build the login form.\n".into();
        t.pr = Some("https://github.com/acme/widgets/pull/7".into());
        for (round, role, verdict, cost, run) in [
            (0, "implementer", "pass", Some(0.5), Some(11)),
            (0, "verifier", "fail", None, Some(11)),
            (1, "implementer", "pass", Some(0.25), None),
        ] {
            t.history.push(crate::task::Attempt {
                round,
                role: role.into(),
                verdict: verdict.into(),
                findings: 0,
                duration_s: 3.0,
                cost_usd: cost,
                run_id: run,
            });
        }
        t.append_findings(0, "verifier", "fail", "old finding");
        t.append_findings(
            1,
            "verifier",
            "fail",
            "tests/login.rs:4 fails\n```\npanic\n```\n@owner",
        );
        t
    }

    #[test]
    fn the_body_shows_cost_transcript_links_and_the_latest_findings() {
        let t = task_with_rounds();
        let red = crate::redact::Redactor::new(["panic-not-a-secret"]);
        let body = render_pr_body(&t, Some("https://github.com/acme/ops/actions/runs"), &red);
        assert!(
            body.contains("| round | role | verdict | findings | duration | cost | transcript |"),
            "{body}"
        );
        assert!(
            body.contains(
                "| 0 | implementer | pass | 0 | 3 s | $0.50 | [run 11](https://github.com/acme/ops/actions/runs/11#artifacts) |"
            ),
            "{body}"
        );
        assert!(
            body.contains("| 1 | implementer | pass | 0 | 3 s | $0.25 | – |"),
            "{body}"
        );
        assert!(
            body.contains("| 0 | verifier | fail | 0 | 3 s | – | [run 11]"),
            "{body}"
        );
        let findings = body
            .split_once("## Findings of the latest failing round\n\nRound 1 — verifier: fail\n\n````\n")
            .map(|(_, rest)| rest)
            .expect("the latest findings, fenced longer than their own backticks");
        assert!(
            findings.starts_with("tests/login.rs:4 fails\n```\npanic\n```\n@owner\n````\n"),
            "{body}"
        );
        assert!(!body.contains("old finding"), "{body}");
        // The same task renders the same body: an unchanged task costs no write.
        assert_eq!(
            body,
            render_pr_body(&t, Some("https://github.com/acme/ops/actions/runs"), &red)
        );
    }

    #[test]
    fn long_findings_are_cut_and_secrets_masked() {
        let mut t = task_with_rounds();
        let secret = "sekrit-value-123456";
        t.append_findings(
            2,
            "verifier",
            "error",
            &format!("{secret} {}", "x".repeat(10_000)),
        );
        let body = render_pr_body(&t, None, &crate::redact::Redactor::new([secret]));
        assert!(!body.contains(secret), "{body}");
        assert!(body.contains("*** xxx"), "{body}");
        assert!(body.contains("(cut at 4000 characters"), "{body}");
        assert!(body.len() < 6_000, "{}", body.len());
        // No runner variables: the run is named, not linked.
        assert!(body.contains("| run 11 |"), "{body}");
    }

    #[test]
    fn runs_are_found_under_the_pull_requests_repository() {
        let t = task_with_rounds();
        if std::env::var_os("GITHUB_REPOSITORY").is_none() {
            assert_eq!(
                runs_url(&t).as_deref(),
                Some("https://github.com/acme/widgets/actions/runs")
            );
        }
        let mut other = t;
        other.pr = Some("https://example.com/not-a-pr".into());
        other.history.clear();
        assert!(!render_pr_body(&other, None, crate::redact::Redactor::global()).contains("## Rounds"));
    }
}
