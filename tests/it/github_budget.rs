//! The GitHub API budget, end to end: many specs from spec to merged against the fake GitHub with
//! GitHub's limits enforced (a primary budget per hour; 80 content-creating requests a minute and
//! 500 an hour, refused with a 403 and `retry-after`). Every request the fake sees is counted, so
//! the figures below are what a repository on GitHub would pay.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::fake_github::{Canned, FakeGitHub, Limits};
use crate::harness::describe;
use crate::local::{Project, events, named};

struct Budgeted {
    p: Project,
    gh: FakeGitHub,
}

impl Budgeted {
    fn new(specs: usize, workers: usize) -> Budgeted {
        let p = Project::new("", "");
        p.set_max_workers(workers);
        for i in 1..=specs {
            p.repo
                .write(&format!("specs/s{i:03}.md"), &format!("# S{i}\n\nBuild s{i}.\n"));
        }
        p.commit_all("specs");
        p.git(&["push", "-q", "origin", "main"]);
        let gh = FakeGitHub::start(&p.repo.origin, "acme", "widgets");
        gh.enforce_limits(Limits::job_token());
        Budgeted { p, gh }
    }

    /// One `step --json`; its report.
    fn step(&self) -> (Output, Value) {
        let mut cmd = self.p.env.command(crate::harness::hyperloop_bin());
        cmd.args(["--path", self.p.repo.path_str(), "--repo", "acme/widgets"]);
        cmd.args(["step", "--json"]);
        cmd.env("GITHUB_API_URL", &self.gh.url);
        cmd.env("GITHUB_TOKEN", &self.gh.token);
        let out = cmd.output().expect("hyperloop runs");
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("report is JSON ({e}): {}", describe(&out)));
        (out, report)
    }

    /// Steps until every task is complete, moving the fake's clock to when the pace allows more
    /// after each step (as the time between scheduled steps would). Returns the reports.
    fn until_all_merged(&self, max_steps: usize) -> Vec<Value> {
        let mut reports = Vec::new();
        for _ in 0..max_steps {
            let (out, report) = self.step();
            let api = &report["github_api"];
            assert_eq!(api["refused"], 0, "{}", describe(&out));
            let done = report["progress"] == "all-complete";
            reports.push(report.clone());
            if done {
                return reports;
            }
            let wait = api["paced_until"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map_or(61, |t| {
                    (t.timestamp() - chrono::Utc::now().timestamp()).max(1) + 1
                });
            self.gh
                .advance_clock(Duration::from_secs(u64::try_from(wait).unwrap_or(61)));
        }
        panic!(
            "not all merged after {max_steps} steps: {}",
            serde_json::to_string_pretty(&reports.last()).unwrap_or_default()
        );
    }

    fn merged_subjects(&self) -> Vec<String> {
        self.p
            .env
            .git(&self.p.repo.origin, &["log", "--format=%s", "main"])
            .lines()
            .filter(|l| l.contains("(task-"))
            .map(str::to_string)
            .collect()
    }
}

fn sum(reports: &[Value], key: &str) -> u64 {
    reports
        .iter()
        .map(|r| r["github_api"][key].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn thirty_specs_reach_main_with_at_most_six_requests_each_and_no_refusal() {
    let b = Budgeted::new(30, 4);
    let reports = b.until_all_merged(12);

    let requests = b.gh.requests();
    let per_task = requests.len() as f64 / 30.0;
    let mut by_route: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for r in &requests {
        let path = match r.path.split_once("/git/refs/heads/") {
            Some((repo, _)) => format!("{repo}/git/refs/heads/{{branch}}"),
            None => r.path.clone(),
        };
        let route: String = path
            .split('/')
            .map(|s| if s.parse::<u64>().is_ok() { "{n}" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        *by_route.entry(format!("{} {route}", r.method)).or_default() += 1;
    }
    assert!(
        per_task <= 6.0,
        "{per_task:.2} requests per task ({} in all): {by_route:#?}",
        requests.len()
    );
    assert_eq!(b.gh.refused(), 0, "{by_route:#?}");
    assert!(requests.iter().all(|r| r.status < 400), "{by_route:#?}");
    // What the reports say is what GitHub saw.
    assert_eq!(
        sum(&reports, "requests") as usize,
        requests.len(),
        "{by_route:#?}"
    );
    // No label listing or creation: labels are added (and made) in one request per task.
    assert!(
        !by_route.contains_key("GET /repos/acme/widgets/labels")
            && !by_route.contains_key("POST /repos/acme/widgets/labels"),
        "{by_route:#?}"
    );
    assert_eq!(
        by_route.get("POST /repos/acme/widgets/issues/{n}/labels"),
        Some(&30)
    );

    // Every task merged exactly once, with both labels on its pull request.
    let merged = b.merged_subjects();
    assert_eq!(merged.len(), 30, "{merged:#?}");
    for n in 1..=30u64 {
        let labels = b.gh.pr_labels(n);
        assert!(
            labels.iter().any(|l| l.starts_with("task:")) && labels.iter().any(|l| l.starts_with("spec:")),
            "#{n}: {labels:?}"
        );
        assert_eq!(b.gh.pr_json(n)["merged"], Value::Bool(true), "#{n}");
    }
    // The last report shows the primary budget as GitHub reported it.
    let last = &reports.last().expect("a report")["github_api"];
    let remaining = last["remaining"].as_u64().expect("remaining reported");
    assert_eq!(last["limit"], 1000);
    assert!(remaining < 1000, "{last}");
    // The figures the README quotes (`-- --nocapture` shows them).
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "30 specs: {} requests ({per_task:.2} per task) in {} steps: {by_route:#?}",
            requests.len(),
            reports.len()
        );
    }
}

#[test]
fn a_hundred_specs_are_paced_over_several_steps_and_nothing_is_lost() {
    let b = Budgeted::new(100, 8);
    b.gh.set_delete_branch_on_merge(true);
    let reports = b.until_all_merged(40);

    assert_eq!(b.gh.refused(), 0);
    assert!(b.gh.peak_content(60) <= 80, "{}", b.gh.peak_content(60));
    assert!(b.gh.peak_content(3600) <= 500, "{}", b.gh.peak_content(3600));
    // The step held itself back, said so, and a later step did what it deferred.
    assert!(reports.len() >= 3, "{} steps", reports.len());
    let deferring: Vec<&Value> = reports
        .iter()
        .filter(|r| {
            r["github_api"]["deferred"]
                .as_array()
                .is_some_and(|d| !d.is_empty())
        })
        .collect();
    assert!(!deferring.is_empty(), "no step deferred anything");
    assert!(
        deferring
            .iter()
            .any(|r| r["github_api"]["paced_until"].is_string()),
        "a deferring step says when to come back"
    );
    let merged = b.merged_subjects();
    assert_eq!(merged.len(), 100, "every task merged exactly once");
    let mut ids: Vec<&str> = merged.iter().filter_map(|s| s.rsplit('(').next()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 100, "{merged:#?}");
    // GitHub deletes merged branches in this repository: hyperloop did not ask.
    assert_eq!(b.gh.count("DELETE", "/git/refs/heads/worker"), 0);
    let requests = b.gh.requests().len();
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "100 specs: {requests} requests ({:.2} per task) in {} steps, peak {} a minute, {} an hour",
            requests as f64 / 100.0,
            reports.len(),
            b.gh.peak_content(60),
            b.gh.peak_content(3600)
        );
    }
    assert!(requests <= 600, "{requests} requests for 100 tasks");
}

#[test]
fn a_secondary_limit_met_anyway_defers_the_write_and_is_honoured_by_the_next_step() {
    let b = Budgeted::new(1, 1);
    // Someone else's requests used the minute up: GitHub refuses the first write.
    b.gh.fail_next(
        "POST",
        "/pulls",
        1,
        Canned::json(
            403,
            serde_json::json!({ "message": "You have exceeded a secondary rate limit." }),
        )
        .header("retry-after", "3"),
    );
    let (out, report) = b.step();
    let api = &report["github_api"];
    assert_eq!(api["refused"], 1, "{}", describe(&out));
    assert_eq!(b.gh.count("POST", "/pulls"), 1, "not retried within the step");
    assert!(report["rate_limited_until"].is_string(), "{report}");
    assert!(
        api["deferred"].as_array().is_some_and(|d| d
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("pull request")))),
        "{api}"
    );
    let evs = events(&out);
    assert!(
        !named(&evs, "github_write_deferred").is_empty(),
        "{}",
        describe(&out)
    );
    // The work is kept: implemented and verified, waiting at the merge for its pull request.
    let task =
        b.p.env
            .git(&b.p.repo.origin, &["show", "main:specs/tasks/task-001.md"]);
    assert!(task.contains("phase: merge-pr"), "{task}");

    // The next step before retry-after sends nothing at all.
    b.gh.clear_requests();
    let (out, report) = b.step();
    assert!(b.gh.requests().is_empty(), "{}", describe(&out));
    assert!(report["rate_limited_until"].is_string(), "{report}");

    // After it, the deferred writes are made and the task merges.
    let until = report["rate_limited_until"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .expect("a time");
    while chrono::Utc::now().timestamp() <= until.timestamp() {
        std::thread::sleep(Duration::from_millis(200));
    }
    let reports = b.until_all_merged(3);
    assert_eq!(b.merged_subjects().len(), 1);
    assert!(reports.iter().all(|r| r["github_api"]["refused"] == 0));
}
