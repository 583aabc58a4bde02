//! A pull request's checks — commit statuses and check runs on its head — and what they mean
//! for a merge. The reading is one GraphQL query for every pull request at `merge-pr` together
//! (`statusCheckRollup` of each head, plus the base branch's protection as a non-admin sees it),
//! so waiting for CI costs one request per step however many tasks wait. The judgement is
//! [`evaluate`], pure, so that every case is a table row in the tests.

use serde_json::Value;

use crate::config::ChecksPolicy;

/// How long a protected branch's required checks may stay unreported before hyperloop says they
/// are not coming (pushes made with a workflow's job token start no workflow).
pub const NEVER_STARTED_GRACE_SECS: i64 = 600;

/// What GitHub reports about one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckState {
    Pending,
    Passed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotation {
    pub path: String,
    pub line: Option<u64>,
    pub message: String,
}

/// One check run or commit status on a head commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub state: CheckState,
    /// GitHub's own word: `FAILURE`, `TIMED_OUT`, `ERROR`, `PENDING`, `SUCCESS`…
    pub conclusion: String,
    /// The check run's title and summary, or the status's description.
    pub summary: String,
    pub url: Option<String>,
    pub annotations: Vec<Annotation>,
}

/// The checks of one pull request's head, and what its base branch requires.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrChecks {
    pub number: u64,
    pub head_sha: String,
    pub checks: Vec<Check>,
    /// Contexts branch protection requires (empty: none, or not protected).
    pub required: Vec<String>,
    /// `reviewDecision`: `REVIEW_REQUIRED`, `CHANGES_REQUESTED`, `APPROVED`, or none.
    pub review_decision: Option<String>,
    /// `mergeStateStatus`: `BLOCKED`, `BEHIND`, `CLEAN`, `DIRTY`, `UNSTABLE`…
    pub merge_state: Option<String>,
    /// The base branch requires conversations to be resolved.
    pub requires_conversation_resolution: bool,
}

/// What the checks say about merging now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything that counts passed (or nothing counts).
    Merge,
    /// Some checks have not finished (or not started): wait, spending nothing.
    Wait { names: Vec<String> },
    /// Required checks never reported and the grace period is over.
    NeverStarted { names: Vec<String> },
    /// Checks failed: their findings for the implementer.
    Failed { checks: Vec<Check> },
    /// Waited longer than `merge.checks_timeout`.
    TimedOut { names: Vec<String> },
}

/// Judges `pr`'s checks under `policy`, `waited` seconds after the task first waited at this
/// head.
pub fn evaluate(pr: &PrChecks, policy: ChecksPolicy, waited: i64, timeout: i64) -> Verdict {
    if policy == ChecksPolicy::None {
        return Verdict::Merge;
    }
    let counts = |c: &Check| match policy {
        ChecksPolicy::Required if !pr.required.is_empty() => pr.required.iter().any(|r| r == &c.name),
        _ => true,
    };
    // A check re-run shows up once per run; the latest (last reported) is what counts.
    let mut latest: Vec<&Check> = Vec::new();
    for c in pr.checks.iter().filter(|c| counts(c)) {
        if let Some(i) = latest.iter().position(|l| l.name == c.name) {
            latest[i] = c;
        } else {
            latest.push(c);
        }
    }
    let failed: Vec<Check> = latest
        .iter()
        .filter(|c| c.state == CheckState::Failed)
        .map(|c| (*c).clone())
        .collect();
    if !failed.is_empty() {
        return Verdict::Failed { checks: failed };
    }
    let missing: Vec<String> = pr
        .required
        .iter()
        .filter(|r| !pr.checks.iter().any(|c| &c.name == *r))
        .cloned()
        .collect();
    let mut waiting: Vec<String> = latest
        .iter()
        .filter(|c| c.state == CheckState::Pending)
        .map(|c| c.name.clone())
        .collect();
    waiting.extend(missing.iter().cloned());
    if waiting.is_empty() {
        return Verdict::Merge;
    }
    if waited >= timeout {
        return Verdict::TimedOut { names: waiting };
    }
    // Nothing at all reported while the branch requires checks: CI did not start.
    if pr.checks.is_empty() && !missing.is_empty() && waited >= NEVER_STARTED_GRACE_SECS {
        return Verdict::NeverStarted { names: missing };
    }
    Verdict::Wait { names: waiting }
}

/// The findings text for failed checks, shown to the implementer like a verifier's.
pub fn findings(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "### Check `{}`: {}\n\n",
            c.name,
            c.conclusion.to_lowercase()
        ));
        if !c.summary.trim().is_empty() {
            out.push_str(c.summary.trim());
            out.push_str("\n\n");
        }
        for a in &c.annotations {
            match a.line {
                Some(line) => out.push_str(&format!("- `{}:{line}`: {}\n", a.path, a.message.trim())),
                None => out.push_str(&format!("- `{}`: {}\n", a.path, a.message.trim())),
            }
        }
        if !c.annotations.is_empty() {
            out.push('\n');
        }
        if let Some(url) = &c.url {
            out.push_str(&format!("Details: {url}\n\n"));
        }
    }
    out.trim_end().to_string() + "\n"
}

/// What a refusal to merge means, in the words a person acts on, from the pull request's state
/// and GitHub's message. `None` when nothing more specific than "blocked" can be said.
pub fn merge_blocker(pr: Option<&PrChecks>, message: &str) -> Option<String> {
    let lower = message.to_lowercase();
    if lower.contains("merge queue") {
        return Some(
            "the base branch merges through a merge queue; add the pull request to the queue".into(),
        );
    }
    // Checks first: a check may well be named "review".
    if lower.contains("status check") {
        return Some(format!("required checks have not passed ({message})"));
    }
    if lower.contains("review") {
        return Some(format!("a required review is missing ({message})"));
    }
    if lower.contains("conversation") {
        return Some("conversations on the pull request must be resolved".into());
    }
    let pr = pr?;
    match pr.review_decision.as_deref() {
        Some("REVIEW_REQUIRED") => return Some("a required review is missing".into()),
        Some("CHANGES_REQUESTED") => return Some("a reviewer requested changes".into()),
        _ => {}
    }
    if pr.requires_conversation_resolution && pr.merge_state.as_deref() == Some("BLOCKED") {
        return Some("conversations on the pull request must be resolved".into());
    }
    None
}

/// The GraphQL query for the pull requests numbered `numbers`: one aliased field each.
pub fn query(numbers: &[u64]) -> String {
    let mut q =
        String::from("query($owner: String!, $name: String!) { repository(owner: $owner, name: $name) {");
    for n in numbers {
        q.push_str(&format!(" pr{n}: pullRequest(number: {n}) {{ ...checks }}"));
    }
    q.push_str(" } }\n");
    q.push_str(
        "fragment checks on PullRequest { number headRefOid reviewDecision mergeStateStatus \
         baseRef { refUpdateRule { requiredStatusCheckContexts requiresConversationResolution } } \
         commits(last: 1) { nodes { commit { oid statusCheckRollup { state contexts(first: 100) { nodes { \
         __typename \
         ... on CheckRun { name status conclusion detailsUrl title summary \
           annotations(first: 50) { nodes { path message location { start { line } } } } } \
         ... on StatusContext { context state description targetUrl } } } } } } } }",
    );
    q
}

/// Reads the answer to [`query`]. Pull requests GitHub did not return are left out.
pub fn parse(data: &Value, numbers: &[u64]) -> Vec<PrChecks> {
    let mut out = Vec::new();
    for n in numbers {
        let Some(pr) = data
            .pointer(&format!("/data/repository/pr{n}"))
            .filter(|v| !v.is_null())
        else {
            continue;
        };
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let commit = pr.pointer("/commits/nodes/0/commit");
        let head_sha = commit
            .map(|c| s(c, "oid"))
            .filter(|o| !o.is_empty())
            .unwrap_or_else(|| s(pr, "headRefOid"));
        let rule = pr.pointer("/baseRef/refUpdateRule");
        let required = rule
            .and_then(|r| r.get("requiredStatusCheckContexts"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let mut checks = Vec::new();
        let contexts = commit
            .and_then(|c| c.pointer("/statusCheckRollup/contexts/nodes"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for c in &contexts {
            match c.get("__typename").and_then(Value::as_str) {
                Some("CheckRun") => {
                    let status = s(c, "status");
                    let conclusion = s(c, "conclusion");
                    let state = if status != "COMPLETED" {
                        CheckState::Pending
                    } else if matches!(conclusion.as_str(), "SUCCESS" | "NEUTRAL" | "SKIPPED") {
                        CheckState::Passed
                    } else {
                        CheckState::Failed
                    };
                    let title = s(c, "title");
                    let summary = s(c, "summary");
                    let annotations = c
                        .pointer("/annotations/nodes")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(|a| Annotation {
                            path: s(a, "path"),
                            line: a.pointer("/location/start/line").and_then(Value::as_u64),
                            message: s(a, "message"),
                        })
                        .collect();
                    checks.push(Check {
                        name: s(c, "name"),
                        state,
                        conclusion: if conclusion.is_empty() { status } else { conclusion },
                        summary: [title, summary]
                            .into_iter()
                            .filter(|t| !t.trim().is_empty())
                            .collect::<Vec<_>>()
                            .join("\n\n"),
                        url: c.get("detailsUrl").and_then(Value::as_str).map(str::to_string),
                        annotations,
                    });
                }
                Some("StatusContext") => {
                    let state_word = s(c, "state");
                    let state = match state_word.as_str() {
                        "SUCCESS" => CheckState::Passed,
                        "PENDING" | "EXPECTED" => CheckState::Pending,
                        _ => CheckState::Failed,
                    };
                    checks.push(Check {
                        name: s(c, "context"),
                        state,
                        conclusion: state_word,
                        summary: s(c, "description"),
                        url: c.get("targetUrl").and_then(Value::as_str).map(str::to_string),
                        annotations: Vec::new(),
                    });
                }
                _ => {}
            }
        }
        out.push(PrChecks {
            number: *n,
            head_sha,
            checks,
            required,
            review_decision: pr
                .get("reviewDecision")
                .and_then(Value::as_str)
                .map(str::to_string),
            merge_state: pr
                .get("mergeStateStatus")
                .and_then(Value::as_str)
                .map(str::to_string),
            requires_conversation_resolution: rule
                .and_then(|r| r.get("requiresConversationResolution"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, state: CheckState) -> Check {
        Check {
            name: name.into(),
            conclusion: match state {
                CheckState::Pending => "IN_PROGRESS",
                CheckState::Passed => "SUCCESS",
                CheckState::Failed => "FAILURE",
            }
            .into(),
            state,
            summary: String::new(),
            url: None,
            annotations: Vec::new(),
        }
    }

    fn pr(checks: Vec<Check>, required: &[&str]) -> PrChecks {
        PrChecks {
            number: 1,
            head_sha: "abc".into(),
            checks,
            required: required.iter().map(|s| s.to_string()).collect(),
            ..PrChecks::default()
        }
    }

    use CheckState::*;
    use ChecksPolicy as P;

    #[test]
    fn verdicts_by_policy_and_state() {
        let t = 3600;
        let cases: Vec<(PrChecks, ChecksPolicy, i64, Verdict)> = vec![
            // none: today's behaviour whatever CI says.
            (
                pr(vec![check("test", Failed)], &["test"]),
                P::None,
                0,
                Verdict::Merge,
            ),
            // No protection and no checks: nothing to wait for.
            (pr(vec![], &[]), P::Required, 0, Verdict::Merge),
            // Unprotected: every check counts.
            (
                pr(vec![check("test", Passed), check("lint", Pending)], &[]),
                P::Required,
                0,
                Verdict::Wait {
                    names: vec!["lint".into()],
                },
            ),
            // Protected: only the required ones count under `required`, all under `all`.
            (
                pr(vec![check("test", Passed), check("lint", Failed)], &["test"]),
                P::Required,
                0,
                Verdict::Merge,
            ),
            (
                pr(vec![check("test", Passed), check("lint", Failed)], &["test"]),
                P::All,
                0,
                Verdict::Failed {
                    checks: vec![check("lint", Failed)],
                },
            ),
            // A required check not reported yet is waited for…
            (
                pr(vec![check("lint", Passed)], &["test"]),
                P::Required,
                10_000,
                Verdict::TimedOut {
                    names: vec!["test".into()],
                },
            ),
            (
                pr(vec![], &["test"]),
                P::Required,
                60,
                Verdict::Wait {
                    names: vec!["test".into()],
                },
            ),
            // …and named as never started once the grace period is over.
            (
                pr(vec![], &["test"]),
                P::Required,
                NEVER_STARTED_GRACE_SECS,
                Verdict::NeverStarted {
                    names: vec!["test".into()],
                },
            ),
            // A re-run that passed replaces the failed run.
            (
                pr(vec![check("test", Failed), check("test", Passed)], &[]),
                P::Required,
                0,
                Verdict::Merge,
            ),
        ];
        for (i, (p, policy, waited, want)) in cases.into_iter().enumerate() {
            assert_eq!(evaluate(&p, policy, waited, t), want, "case {i}");
        }
    }

    #[test]
    fn findings_name_the_check_its_summary_annotations_and_link() {
        let mut c = check("test", Failed);
        c.summary = "2 tests failed".into();
        c.url = Some("https://github.com/o/r/runs/1".into());
        c.annotations = vec![Annotation {
            path: "src/lib.rs".into(),
            line: Some(12),
            message: "assertion failed: left == right".into(),
        }];
        assert_eq!(
            findings(&[c]),
            "### Check `test`: failure\n\n2 tests failed\n\n- `src/lib.rs:12`: assertion failed: left == right\n\nDetails: https://github.com/o/r/runs/1\n"
        );
    }

    #[test]
    fn refusals_are_named() {
        assert!(
            merge_blocker(None, "Changes must be made through the merge queue")
                .is_some_and(|m| m.contains("merge queue"))
        );
        assert!(
            merge_blocker(
                None,
                "At least 1 approving review is required by reviewers with write access."
            )
            .is_some_and(|m| m.contains("review"))
        );
        assert!(
            merge_blocker(None, "Required status check \"review-bot\" is expected.")
                .is_some_and(|m| m.starts_with("required checks"))
        );
        let p = PrChecks {
            review_decision: Some("REVIEW_REQUIRED".into()),
            ..PrChecks::default()
        };
        assert_eq!(
            merge_blocker(Some(&p), "Pull Request is not mergeable").as_deref(),
            Some("a required review is missing")
        );
        assert_eq!(merge_blocker(None, "Pull Request is not mergeable"), None);
    }

    #[test]
    fn a_rollup_answer_is_read() {
        let data = serde_json::json!({ "data": { "repository": { "pr7": {
            "number": 7, "headRefOid": "h1", "reviewDecision": null, "mergeStateStatus": "BLOCKED",
            "baseRef": { "refUpdateRule": { "requiredStatusCheckContexts": ["test"], "requiresConversationResolution": false } },
            "commits": { "nodes": [ { "commit": { "oid": "h1", "statusCheckRollup": { "state": "FAILURE", "contexts": { "nodes": [
                { "__typename": "CheckRun", "name": "test", "status": "COMPLETED", "conclusion": "FAILURE",
                  "detailsUrl": "https://github.com/o/r/runs/9", "title": "1 failed", "summary": "see below",
                  "annotations": { "nodes": [ { "path": "a.rs", "message": "boom", "location": { "start": { "line": 3 } } } ] } },
                { "__typename": "StatusContext", "context": "ci/legacy", "state": "PENDING", "description": "queued", "targetUrl": null }
            ] } } } } ] }
        } } } });
        let got = parse(&data, &[7, 8]);
        assert_eq!(got.len(), 1);
        let p = &got[0];
        assert_eq!(p.required, vec!["test".to_string()]);
        assert_eq!(p.checks.len(), 2);
        assert_eq!(p.checks[0].state, CheckState::Failed);
        assert_eq!(p.checks[0].summary, "1 failed\n\nsee below");
        assert_eq!(p.checks[0].annotations[0].line, Some(3));
        assert_eq!(p.checks[1].state, CheckState::Pending);
        assert!(query(&[7, 8]).contains("pr8: pullRequest(number: 8)"));
    }
}
