//! The GitHub client against the fake GitHub over real HTTP: pull requests, labels, merges into
//! a real bare repository, retries, rate limits, permission errors and GitHub App sign-in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use hyperloop::config::MergeStrategy;
use hyperloop::forge::{
    AuthConfig, ClientOptions, ForgeError, GitHubClient, MergeOutcome, NotMergeableReason, PrStatus, RepoRef,
    RetryPolicy,
};
use serde_json::json;

use crate::fake_github::{Canned, FakeGitHub};
use crate::harness::{TestEnv, TestRepo};

const OWNER: &str = "acme";
const NAME: &str = "widgets";

struct World {
    env: TestEnv,
    repo: TestRepo,
    fake: FakeGitHub,
}

fn world() -> World {
    let env = TestEnv::new();
    let repo = env.repo("widgets");
    let fake = FakeGitHub::start(&repo.origin, OWNER, NAME);
    World { env, repo, fake }
}

fn options() -> ClientOptions {
    ClientOptions {
        retry: RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            max_rate_limit_wait: Duration::from_secs(5),
        },
        ..ClientOptions::default()
    }
}

fn env_map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl World {
    fn client_with(&self, token: &str) -> GitHubClient {
        let auth = AuthConfig::from_env_map(&env_map(&[
            ("GITHUB_TOKEN", token),
            ("GITHUB_API_URL", &self.fake.url),
        ]))
        .expect("auth config");
        GitHubClient::new(auth, RepoRef::new(OWNER, NAME), options()).expect("client")
    }

    fn client(&self) -> GitHubClient {
        self.client_with(&self.fake.token)
    }

    /// Commits a file on a new branch `branch` (from main) and pushes it to origin.
    fn push_branch(&self, branch: &str, file: &str, text: &str) {
        let dir = &self.repo.path;
        self.env.git(dir, &["checkout", "-q", "-B", branch, "main"]);
        self.repo.write(file, text);
        self.env.git(dir, &["add", file]);
        self.env
            .git(dir, &["commit", "-q", "-m", &format!("work on {branch}")]);
        self.env.git(dir, &["push", "-q", "-f", "origin", branch]);
        self.env.git(dir, &["checkout", "-q", "main"]);
    }

    fn origin_git(&self, args: &[&str]) -> String {
        let mut all = vec!["--git-dir", self.repo.origin.to_str().expect("utf8")];
        all.extend_from_slice(args);
        self.env.git(self.env.root(), &all)
    }
}

#[tokio::test]
async fn draft_pr_is_created_once_and_then_reused() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    let c = w.client();
    async {
        let pr = c
            .create_draft_pr("worker/t1", "main", "Task t1", "body")
            .await
            .expect("create");
        assert_eq!(pr.number, 1);
        assert!(pr.draft);
        assert_eq!(pr.state, PrStatus::Open);
        assert_eq!(pr.head_ref, "worker/t1");
        assert_eq!(pr.url, "https://github.com/acme/widgets/pull/1");
        let again = c
            .create_draft_pr("worker/t1", "main", "Task t1", "body")
            .await
            .expect("reuse");
        assert_eq!(again.number, 1);
        let found = c.find_pr_for_branch("worker/t1").await.expect("find");
        assert_eq!(found.map(|p| p.number), Some(1));
        assert_eq!(c.find_pr_for_branch("worker/none").await.expect("find"), None);
    }
    .await;
    assert_eq!(w.fake.pr_count(), 1);
    assert_eq!(w.fake.count("POST", "/pulls"), 1);
    // Every lookup named the owner, or GitHub would have ignored the filter.
    for r in w.fake.requests().iter().filter(|r| r.method == "GET") {
        assert!(r.query.contains("head=acme%3Aworker"), "{r:?}");
    }
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_found_by_lookup() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    w.fake
        .lose_answer("POST", "/repos/acme/widgets/pulls", 1, Canned::status(502));
    let c = w.client();
    let pr = c
        .create_draft_pr("worker/t1", "main", "Task t1", "")
        .await
        .expect("create despite the lost answer");
    assert_eq!(pr.number, 1);
    assert_eq!(w.fake.pr_count(), 1);
    // The lost one, then the retry that GitHub refuses with "already exists".
    assert_eq!(w.fake.count("POST", "/pulls"), 2);
}

#[tokio::test]
async fn a_second_pr_from_the_same_branch_is_refused_and_the_first_returned() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    let n = w.fake.open_pr("worker/t1", "main", "made elsewhere", false);
    // The lookup misses it (as if GitHub's search lagged), so the create runs into a 422.
    w.fake.fail_next(
        "GET",
        "/repos/acme/widgets/pulls",
        1,
        Canned::json(200, json!([])),
    );
    let pr = w
        .client()
        .create_draft_pr("worker/t1", "main", "Task t1", "")
        .await
        .expect("422 already exists resolves to the existing PR");
    assert_eq!(pr.number, n);
    assert_eq!(w.fake.pr_count(), 1);
}

#[tokio::test]
async fn an_empty_branch_gives_no_commits() {
    let w = world();
    w.env
        .git(&w.repo.path, &["push", "-q", "origin", "main:worker/empty"]);
    let err = w
        .client()
        .create_draft_pr("worker/empty", "main", "t", "")
        .await
        .expect_err("no commits");
    assert!(
        matches!(&err, ForgeError::NoCommits { head, base } if head == "worker/empty" && base == "main"),
        "{err:?}"
    );
}

#[tokio::test]
async fn labels_are_created_when_missing_added_and_removed() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    let c = w.client();
    async {
        let created = c
            .ensure_labels(&["lgtm", "task:t1", "spec:auth/login"])
            .await
            .expect("ensure");
        assert_eq!(created, vec!["lgtm", "task:t1", "spec:auth/login"]);
        let created = c
            .ensure_labels(&["lgtm", "task:t1", "spec:auth/login"])
            .await
            .expect("ensure again");
        assert!(created.is_empty());

        let pr = c
            .create_draft_pr("worker/t1", "main", "Task t1", "")
            .await
            .expect("create");
        let labels = c
            .add_labels(pr.number, &["task:t1", "spec:auth/login"])
            .await
            .expect("add");
        assert_eq!(labels, vec!["task:t1", "spec:auth/login"]);
        assert!(
            c.remove_label(pr.number, "spec:auth/login")
                .await
                .expect("remove")
        );
        assert!(!c.remove_label(pr.number, "spec:auth/login").await.expect("gone"));
        assert_eq!(w.fake.pr_labels(pr.number), vec!["task:t1"]);
    }
    .await;
    assert_eq!(w.fake.count("POST", "/labels"), 3 + 1);
    let mut names = w.fake.label_names();
    names.sort();
    assert_eq!(names, vec!["lgtm", "spec:auth/login", "task:t1"]);
}

#[tokio::test]
async fn a_label_made_meanwhile_is_not_an_error() {
    let w = world();
    // Listing says the label is missing; creating finds it exists.
    w.fake.fail_next(
        "GET",
        "/repos/acme/widgets/labels",
        1,
        Canned::json(200, json!([])),
    );
    w.fake.fail_next(
        "POST",
        "/repos/acme/widgets/labels",
        1,
        Canned::json(
            422,
            json!({"message":"Validation Failed","errors":[{"resource":"Label","code":"already_exists","field":"name"}]}),
        ),
    );
    let created = w
        .client()
        .ensure_labels(&["lgtm"])
        .await
        .expect("already_exists is fine");
    assert!(created.is_empty());
}

#[tokio::test]
async fn polling_many_prs_costs_few_calls() {
    let w = world();
    // One commit, pushed as 120 hyperloop branches and 5 others, in one push.
    w.push_branch("scratch", "x.txt", "x\n");
    let mut args = vec!["push".to_string(), "-q".into(), "origin".into()];
    for i in 0..120 {
        args.push(format!("scratch:refs/heads/worker/t{i}"));
    }
    for i in 0..5 {
        args.push(format!("scratch:refs/heads/feature/f{i}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.env.git(&w.repo.path, &args);
    for i in 0..5 {
        w.fake
            .open_pr(&format!("feature/f{i}"), "main", "someone else", false);
    }
    let mut numbers = Vec::new();
    for i in 0..120 {
        numbers.push(
            w.fake
                .open_pr(&format!("worker/t{i}"), "main", &format!("t{i}"), true),
        );
    }
    w.fake.add_label_to_pr(numbers[3], "lgtm");
    w.fake.close_pr(numbers[4]);
    w.fake.clear_requests();

    let c = w.client();
    let prs = c.list_hyperloop_prs().await.expect("list");
    assert_eq!(prs.len(), 120);
    assert!(prs.iter().all(|p| p.head_ref.starts_with("worker/")));
    let list_calls = w.fake.count("GET", "/pulls");
    assert!(list_calls <= 3, "{list_calls} calls");
    assert_eq!(list_calls, 2);
    // Most recently updated first.
    assert_eq!(prs[0].number, numbers[4]);
    assert_eq!(prs[0].state, PrStatus::Closed);
    assert!(!prs[0].merged);
    assert!(prs[1].has_label("lgtm"));

    // Waiting on recently touched pull requests needs one page only.
    w.fake.clear_requests();
    let prs = c
        .list_hyperloop_prs_covering(&[numbers[3], numbers[119]])
        .await
        .expect("list");
    assert!(prs.iter().any(|p| p.number == numbers[3]));
    assert_eq!(w.fake.count("GET", "/pulls"), 1);
}

#[tokio::test]
async fn exactly_one_full_page_costs_one_call() {
    let w = world();
    w.push_branch("scratch", "x.txt", "x\n");
    let mut args = vec!["push".to_string(), "-q".into(), "origin".into()];
    for i in 0..100 {
        args.push(format!("scratch:refs/heads/worker/t{i}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.env.git(&w.repo.path, &args);
    for i in 0..100 {
        w.fake.open_pr(&format!("worker/t{i}"), "main", "t", true);
    }
    w.fake.clear_requests();
    let prs = w.client().list_hyperloop_prs().await.expect("list");
    assert_eq!(prs.len(), 100);
    assert_eq!(w.fake.count("GET", "/pulls"), 1);
}

#[tokio::test]
async fn squash_merge_lands_on_main_with_the_message_and_trailers() {
    let w = world();
    w.push_branch("worker/t1", "feature.txt", "feature\n");
    let c = w.client();
    let message = "Implements the feature.\n\nSpec-Ref: specs/feature.md\nTask-Ref: t1";
    let before = w.origin_git(&["rev-parse", "main"]);
    let (pr, outcome) = async {
        let pr = c
            .create_draft_pr("worker/t1", "main", "Task t1", "")
            .await
            .expect("create");
        assert!(c.mark_ready(pr.number).await.expect("ready"));
        let outcome = c
            .merge_pr(pr.number, MergeStrategy::Squash, "t1: the feature (#1)", message)
            .await
            .expect("merge");
        (pr, outcome)
    }
    .await;
    let MergeOutcome::Merged { sha } = outcome else {
        panic!("expected a merge, got {outcome:?}")
    };
    assert_eq!(w.origin_git(&["rev-parse", "main"]), sha);
    // A squash: one parent, the old main.
    assert_eq!(w.origin_git(&["rev-parse", &format!("{sha}^")]), before);
    let parents = w.origin_git(&["log", "-1", "--format=%P", &sha]);
    assert_eq!(parents.split_whitespace().count(), 1, "{parents}");
    assert_eq!(
        w.origin_git(&["log", "-1", "--format=%B", "main"]),
        format!("t1: the feature (#1)\n\n{message}")
    );
    let trailers = w.origin_git(&["log", "-1", "--format=%(trailers:only,unfold)", "main"]);
    assert!(trailers.contains("Spec-Ref: specs/feature.md"), "{trailers}");
    assert!(trailers.contains("Task-Ref: t1"), "{trailers}");
    assert_eq!(w.origin_git(&["show", "main:feature.txt"]), "feature");

    async {
        let read = c.get_pr(pr.number).await.expect("get");
        assert!(read.merged);
        assert_eq!(read.state, PrStatus::Closed);
        assert_eq!(read.merge_commit_sha.as_deref(), Some(sha.as_str()));
        // Merged pull requests in the listing too, though list entries carry no `merged`.
        let listed = c.list_hyperloop_prs().await.expect("list");
        assert!(listed.iter().any(|p| p.number == pr.number && p.merged));
        // A second attempt (say, after a lost answer) is not an error.
        let again = c
            .merge_pr(pr.number, MergeStrategy::Squash, "x", "y")
            .await
            .expect("merge again");
        assert_eq!(
            again,
            MergeOutcome::AlreadyMerged {
                sha: Some(sha.clone())
            }
        );
        // And a new "create" for the merged branch does not open a second pull request.
        let reused = c
            .create_draft_pr("worker/t1", "main", "Task t1", "")
            .await
            .expect("reuse merged");
        assert_eq!(reused.number, pr.number);

        assert!(c.delete_branch("worker/t1").await.expect("delete"));
        assert!(!c.delete_branch("worker/t1").await.expect("already gone"));
    }
    .await;
    assert_eq!(
        w.origin_git(&["branch", "--list", "worker/t1"]),
        "",
        "the branch is gone from origin"
    );
}

#[tokio::test]
async fn merge_strategy_merge_makes_a_merge_commit() {
    let w = world();
    w.push_branch("worker/t2", "b.txt", "b\n");
    let c = w.client();
    let outcome = async {
        let pr = c
            .create_draft_pr("worker/t2", "main", "Task t2", "")
            .await
            .expect("create");
        c.mark_ready(pr.number).await.expect("ready");
        c.merge_pr(pr.number, MergeStrategy::Merge, "merge: t2", "Task-Ref: t2")
            .await
            .expect("merge")
    }
    .await;
    let MergeOutcome::Merged { sha } = outcome else {
        panic!("{outcome:?}")
    };
    let parents = w.origin_git(&["log", "-1", "--format=%P", &sha]);
    assert_eq!(parents.split_whitespace().count(), 2, "{parents}");
}

#[tokio::test]
async fn merging_a_draft_is_a_typed_refusal() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    let c = w.client();
    let before = w.origin_git(&["rev-parse", "main"]);
    let outcome = async {
        let pr = c
            .create_draft_pr("worker/t1", "main", "Task t1", "")
            .await
            .expect("create");
        c.merge_pr(pr.number, MergeStrategy::Squash, "t", "m")
            .await
            .expect("an answer")
    }
    .await;
    assert!(
        matches!(
            &outcome,
            MergeOutcome::NotMergeable { reason: NotMergeableReason::Draft, message } if message.contains("draft")
        ),
        "{outcome:?}"
    );
    assert_eq!(w.origin_git(&["rev-parse", "main"]), before);
}

#[tokio::test]
async fn merging_a_moved_head_or_a_closed_pr_is_refused() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    w.push_branch("worker/t2", "b.txt", "b\n");
    let c = w.client();
    async {
        let p1 = c
            .create_draft_pr("worker/t1", "main", "t1", "")
            .await
            .expect("create");
        c.mark_ready(p1.number).await.expect("ready");
        let outcome = c
            .merge_pr_at(
                p1.number,
                MergeStrategy::Squash,
                "t",
                "m",
                Some("0000000000000000000000000000000000000000"),
            )
            .await
            .expect("answer");
        assert!(
            matches!(
                outcome,
                MergeOutcome::NotMergeable {
                    reason: NotMergeableReason::HeadModified,
                    ..
                }
            ),
            "{outcome:?}"
        );
        let p2 = c
            .create_draft_pr("worker/t2", "main", "t2", "")
            .await
            .expect("create");
        w.fake.close_pr(p2.number);
        let outcome = c
            .merge_pr(p2.number, MergeStrategy::Squash, "t", "m")
            .await
            .expect("answer");
        assert!(
            matches!(
                outcome,
                MergeOutcome::NotMergeable {
                    reason: NotMergeableReason::Closed,
                    ..
                }
            ),
            "{outcome:?}"
        );
    }
    .await;
}

#[tokio::test]
async fn mark_ready_flips_draft_and_body_updates() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    let c = w.client();
    async {
        let pr = c
            .create_draft_pr("worker/t1", "main", "Task t1", "old")
            .await
            .expect("create");
        assert!(w.fake.pr_is_draft(pr.number));
        assert!(c.mark_ready(pr.number).await.expect("ready"));
        assert!(!w.fake.pr_is_draft(pr.number));
        assert!(!c.mark_ready(pr.number).await.expect("already ready"));
        let updated = c.update_pr_body(pr.number, "new body").await.expect("body");
        assert!(!updated.draft);
        assert_eq!(w.fake.pr_json(pr.number)["body"], "new body");
    }
    .await;
    assert_eq!(w.fake.count("POST", "/graphql"), 1);
}

#[tokio::test]
async fn update_branch_brings_main_into_the_head() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    let c = w.client();
    let pr = c
        .create_draft_pr("worker/t1", "main", "t1", "")
        .await
        .expect("create");
    w.repo.write("main.txt", "main moved\n");
    w.env.git(&w.repo.path, &["add", "main.txt"]);
    w.env.git(&w.repo.path, &["commit", "-q", "-m", "main moves"]);
    w.env.git(&w.repo.path, &["push", "-q", "origin", "main"]);
    assert!(c.update_branch(pr.number).await.expect("update"));
    assert_eq!(w.origin_git(&["show", "worker/t1:main.txt"]), "main moved");
    let read = c.get_pr(pr.number).await.expect("get");
    assert_eq!(read.head_sha, w.origin_git(&["rev-parse", "worker/t1"]));
}

#[tokio::test]
async fn server_errors_and_broken_connections_are_retried() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    let n = w.fake.open_pr("worker/t1", "main", "t1", true);
    w.fake
        .fail_next("GET", &format!("/pulls/{n}"), 1, Canned::status(500));
    w.fake
        .fail_next("GET", &format!("/pulls/{n}"), 1, Canned::status(502));
    w.fake
        .fail_next("GET", &format!("/pulls/{n}"), 1, Canned::broken_connection());
    let pr = w.client().get_pr(n).await.expect("retried to success");
    assert_eq!(pr.number, n);
    assert_eq!(w.fake.count("GET", &format!("/pulls/{n}")), 4);
}

#[tokio::test]
async fn persistent_server_errors_give_up_after_the_attempt_limit() {
    let w = world();
    w.fake.fail_next("GET", "/pulls/7", 100, Canned::status(503));
    let err = w.client().get_pr(7).await.expect_err("gives up");
    assert!(
        matches!(&err, ForgeError::Unreachable { attempts: 4, message, .. } if message.contains("503")),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert_eq!(w.fake.count("GET", "/pulls/7"), 4);
}

#[tokio::test]
async fn a_short_secondary_rate_limit_is_waited_out() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    let n = w.fake.open_pr("worker/t1", "main", "t1", true);
    w.fake
        .fail_next("GET", &format!("/pulls/{n}"), 1, Canned::retry_after(1));
    let started = Instant::now();
    let pr = w.client().get_pr(n).await.expect("after the wait");
    assert_eq!(pr.number, n);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(w.fake.count("GET", &format!("/pulls/{n}")), 2);
}

#[tokio::test]
async fn a_long_rate_limit_stops_with_the_reset_time() {
    let w = world();
    let reset = Utc::now() + TimeDelta::minutes(40);
    w.fake
        .fail_next("GET", "/pulls", 1, Canned::primary_rate_limit(reset));
    let started = Instant::now();
    let err = w.client().list_hyperloop_prs().await.expect_err("rate limited");
    assert!(started.elapsed() < Duration::from_secs(3));
    let ForgeError::RateLimited { retry_at, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        (*retry_at - reset).num_seconds().abs() <= 2,
        "{retry_at} vs {reset}"
    );
    assert_eq!(w.fake.count("GET", "/pulls"), 1);
    let top: hyperloop::Error = err.into();
    assert_eq!(top.exit_code(), 1);
}

#[tokio::test]
async fn a_rejected_token_and_a_missing_permission_name_the_fix() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    let err = w.client_with("ghp_wrong").get_pr(1).await.expect_err("401");
    assert!(
        matches!(err, ForgeError::Permission { status: 401, .. }),
        "{err:?}"
    );
    assert!(err.hint().is_some_and(|h| h.contains("GITHUB_TOKEN")));

    w.fake.fail_next(
        "POST",
        "/repos/acme/widgets/pulls",
        1,
        Canned::json(403, json!({"message":"Resource not accessible by integration"})),
    );
    let err = w
        .client()
        .create_draft_pr("worker/t1", "main", "t", "")
        .await
        .expect_err("403");
    let top: hyperloop::Error = err.into();
    assert_eq!(top.exit_code(), 1);
    let text = top.to_string();
    assert!(text.contains("pull-requests: write"), "{text}");
    assert!(text.contains("Resource not accessible by integration"), "{text}");

    w.fake.fail_next(
        "PUT",
        "/merge",
        1,
        Canned::json(403, json!({"message":"Resource not accessible by integration"})),
    );
    let err = w
        .client()
        .merge_pr(1, MergeStrategy::Squash, "t", "m")
        .await
        .expect_err("403 on merge");
    assert!(err.hint().is_some_and(|h| h.contains("contents: write")), "{err}");
}

#[tokio::test]
async fn a_canary_token_never_shows_in_debug_display_or_errors() {
    let w = world();
    let canary = "ghp_canary0123456789abcdefghijklmnopqrstu";
    let c = w.client_with(canary);
    let err = c.get_pr(1).await.expect_err("the fake does not know it");
    let top: hyperloop::Error = c
        .create_draft_pr("worker/x", "main", "t", "")
        .await
        .expect_err("401")
        .into();
    let auth = AuthConfig::from_env_map(&env_map(&[("GITHUB_TOKEN", canary)])).expect("auth");
    for text in [
        format!("{c:?}"),
        format!("{err}"),
        format!("{err:?}"),
        format!("{:?}", err.hint()),
        format!("{top}"),
        format!("{top:?}"),
        format!("{auth:?}"),
    ] {
        assert!(!text.contains("canary"), "leaked: {text}");
    }
    // It was sent, though: the canary is hidden, not missing.
    assert!(
        w.fake
            .requests()
            .iter()
            .any(|r| r.authorization.as_deref() == Some(&format!("Bearer {canary}")))
    );
}

// ---------------------------------------------------------------- GitHub App

#[derive(Debug)]
pub struct AppKeys {
    pub private_pem: String,
    pub public_pem: String,
}

pub fn rsa_keys(env: &TestEnv) -> AppKeys {
    let key = env.root().join("app.pem");
    let key_s = key.to_str().expect("utf8");
    // `-traditional` gives PKCS#1, the form GitHub hands out for App keys.
    let out = env
        .command("openssl")
        .args(["genrsa", "-traditional", "-out", key_s, "2048"])
        .output()
        .expect("openssl is needed for the GitHub App tests");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = env
        .command("openssl")
        .args(["rsa", "-in", key_s, "-pubout"])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    AppKeys {
        private_pem: std::fs::read_to_string(&key).expect("key"),
        public_pem: String::from_utf8(out.stdout).expect("pem"),
    }
}

fn app_client(w: &World, keys: &AppKeys, extra: &[(&str, &str)]) -> GitHubClient {
    let mut map = env_map(&[
        ("HYPERLOOP_APP_ID", "4242"),
        ("HYPERLOOP_APP_PRIVATE_KEY", &keys.private_pem),
        ("GITHUB_API_URL", &w.fake.url),
        // An App wins over a token that happens to be in the environment.
        ("GITHUB_TOKEN", "ghp_not_this_one"),
    ]);
    map.extend(env_map(extra));
    let auth = AuthConfig::from_env_map(&map).expect("app auth config");
    GitHubClient::new(auth, RepoRef::new(OWNER, NAME), options()).expect("client")
}

#[tokio::test]
async fn app_auth_mints_an_installation_token_and_reuses_it() {
    let w = world();
    let keys = rsa_keys(&w.env);
    w.fake
        .enable_app(4242, 77, &keys.public_pem, Duration::from_secs(3600));
    w.push_branch("worker/t1", "a.txt", "a\n");
    let c = app_client(&w, &keys, &[]);
    async {
        let pr = c
            .create_draft_pr("worker/t1", "main", "t1", "")
            .await
            .expect("create as the App");
        c.add_labels(pr.number, &["task:t1"]).await.expect("label");
        c.list_hyperloop_prs().await.expect("list");
    }
    .await;
    assert_eq!(w.fake.count("GET", "/repos/acme/widgets/installation"), 1);
    assert_eq!(w.fake.count("POST", "/app/installations/77/access_tokens"), 1);
    let minted = w.fake.issued_tokens();
    assert_eq!(minted.len(), 1);
    let expected = format!("Bearer {}", minted[0]);
    let repo_calls: Vec<_> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/repos/") && !r.path.ends_with("/installation"))
        .collect();
    assert!(repo_calls.len() >= 4);
    for r in &repo_calls {
        assert_eq!(r.authorization.as_deref(), Some(expected.as_str()), "{r:?}");
    }
}

#[tokio::test]
async fn app_tokens_near_expiry_or_rejected_are_replaced() {
    let w = world();
    let keys = rsa_keys(&w.env);
    // Two minutes is inside the refresh margin: every request needs a new token.
    w.fake
        .enable_app(4242, 77, &keys.public_pem, Duration::from_secs(120));
    let c = app_client(&w, &keys, &[("HYPERLOOP_APP_INSTALLATION_ID", "77")]);
    async {
        c.list_hyperloop_prs().await.expect("list");
        c.list_hyperloop_prs().await.expect("list");
    }
    .await;
    assert_eq!(w.fake.issued_tokens().len(), 2);
    // The installation id was given: no lookup.
    assert_eq!(w.fake.count("GET", "/installation"), 0);

    let w = world();
    w.fake
        .enable_app(4242, 77, &keys.public_pem, Duration::from_secs(3600));
    let c = app_client(&w, &keys, &[]);
    c.list_hyperloop_prs().await.expect("list");
    w.fake.fail_next(
        "GET",
        "/repos/acme/widgets/pulls",
        1,
        Canned::json(401, json!({"message":"Bad credentials"})),
    );
    c.list_hyperloop_prs()
        .await
        .expect("a revoked token is replaced once");
    assert_eq!(w.fake.issued_tokens().len(), 2);
}

#[tokio::test]
async fn app_with_a_key_github_does_not_know_is_refused_with_a_hint() {
    let w = world();
    let keys = rsa_keys(&w.env);
    let other = rsa_keys(&TestEnv::new());
    w.fake
        .enable_app(4242, 77, &other.public_pem, Duration::from_secs(3600));
    let c = app_client(&w, &keys, &[]);
    let err = c.get_pr(1).await.expect_err("wrong key");
    assert!(
        matches!(err, ForgeError::Permission { status: 401, .. }),
        "{err:?}"
    );
    assert!(
        err.hint()
            .is_some_and(|h| h.contains("HYPERLOOP_APP_PRIVATE_KEY")),
        "{err:?}"
    );
    assert!(!format!("{err:?}{c:?}").contains("PRIVATE KEY-----"));
}

// ---------------------------------------------------------------- the fake itself

#[tokio::test]
async fn fake_answers_parse_as_octocrab_models() {
    let w = world();
    w.push_branch("worker/t1", "a.txt", "a\n");
    let n = w.fake.open_pr("worker/t1", "main", "t1", true);
    w.fake.add_label_to_pr(n, "lgtm");
    let pr: octocrab::models::pulls::PullRequest =
        serde_json::from_value(w.fake.pr_json(n)).expect("a PullRequest");
    assert_eq!(pr.number, n);
    assert_eq!(pr.head.ref_field, "worker/t1");
    assert_eq!(pr.draft, Some(true));
    assert_eq!(
        pr.labels.unwrap_or_default().first().map(|l| l.name.clone()),
        Some("lgtm".to_string())
    );
}

#[test]
fn app_keys_in_pkcs8_or_with_escaped_newlines_are_accepted() {
    let env = TestEnv::new();
    let keys = rsa_keys(&env);
    let pkcs8 = env
        .command("openssl")
        .args(["pkcs8", "-topk8", "-nocrypt"])
        .arg("-in")
        .arg(env.root().join("app.pem"))
        .output()
        .expect("openssl");
    assert!(pkcs8.status.success());
    let pkcs8 = String::from_utf8(pkcs8.stdout).expect("pem");
    assert!(pkcs8.contains("BEGIN PRIVATE KEY"));
    let escaped = keys.private_pem.trim().replace('\n', "\\n");
    for key in [pkcs8.as_str(), escaped.as_str()] {
        let auth = AuthConfig::from_env_map(&env_map(&[
            ("HYPERLOOP_APP_ID", "1"),
            ("HYPERLOOP_APP_PRIVATE_KEY", key),
        ]));
        assert!(auth.is_ok(), "{auth:?}");
    }
    let broken = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD9\n-----END RSA PRIVATE KEY-----\n";
    let err = AuthConfig::from_env_map(&env_map(&[
        ("HYPERLOOP_APP_ID", "1"),
        ("HYPERLOOP_APP_PRIVATE_KEY", broken),
    ]));
    assert!(err.is_err());
}

// ---------------------------------------------------------------- GitHub's own schema

/// Starts the simulator with one repository, `acme/widgets`, and prints the port it bound.
const SIMULATOR_SCRIPT: &str = r#"
import { simulation } from "@simulacrum/github-api-simulator";
const app = simulation({
  initialState: {
    users: [{ login: "acme", organizations: ["acme"] }],
    organizations: [{ login: "acme" }],
    repositories: [{ owner: "acme", name: "widgets" }],
    branches: [{ name: "main" }],
    blobs: [],
  },
});
const { port } = await app.listen(0, "127.0.0.1");
console.log(`listening ${port}`);
"#;

struct Simulator {
    child: std::process::Child,
    url: String,
}

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn simulator_dir() -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("HYPERLOOP_TEST_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/hyperloop-test"))
        })?;
    let dir = cache.join("ghsim");
    dir.join("node_modules/@simulacrum/github-api-simulator/package.json")
        .exists()
        .then_some(dir)
}

fn start_simulator(dir: &std::path::Path) -> Simulator {
    use std::io::BufRead;
    // With --eval, module imports resolve from the working directory: the cache's node_modules.
    let mut child = std::process::Command::new("node")
        .current_dir(dir)
        .args(["--input-type=module", "-e", SIMULATOR_SCRIPT])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("node starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let port = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("listening ").map(str::to_string))
        .expect("the simulator reports its port");
    // Keep draining so the simulator never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Simulator {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// A raw request, to check the simulator really refuses bodies that break the schema.
fn raw_request(url: &str, method: &str, path: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line")
}

#[tokio::test]
async fn requests_match_githubs_rest_schema() {
    let Some(dir) = simulator_dir() else {
        crate::harness::skip(
            "the GitHub API simulator is not installed",
            ".ci/setup-github-sim.sh",
        );
        return;
    };
    let sim = start_simulator(&dir);
    // The control: a body GitHub's schema forbids is refused.
    assert_eq!(
        raw_request(
            &sim.url,
            "PUT",
            "/repos/acme/widgets/pulls/1/merge",
            r#"{"merge_method":"fast-forward"}"#
        ),
        400
    );

    let auth = AuthConfig::from_env_map(&env_map(&[
        ("GITHUB_TOKEN", "ghp_simulated"),
        ("GITHUB_API_URL", &sim.url),
    ]))
    .expect("auth");
    let c = GitHubClient::new(auth, RepoRef::new(OWNER, NAME), options()).expect("client");
    // The simulator answers with the examples of GitHub's description (pull request 1347 of
    // octocat/Hello-World); what matters here is that every request body passes validation.
    let pr = c
        .create_draft_pr("worker/t1", "main", "Task t1", "body")
        .await
        .expect("create passes the schema");
    c.ensure_labels(&["lgtm", "task:t1", "spec:auth/login"])
        .await
        .expect("labels pass the schema");
    c.add_labels(pr.number, &["task:t1", "spec:auth/login"])
        .await
        .expect("add labels passes the schema");
    c.remove_label(pr.number, "spec:auth/login")
        .await
        .expect("remove label");
    c.update_pr_body(pr.number, "new body")
        .await
        .expect("update passes the schema");
    c.update_branch(pr.number).await.expect("update branch");
    let outcome = c
        .merge_pr(
            pr.number,
            MergeStrategy::Squash,
            "t1 (#1347)",
            "Spec-Ref: specs/t1.md\nTask-Ref: t1",
        )
        .await
        .expect("merge passes the schema");
    assert!(matches!(outcome, MergeOutcome::Merged { .. }), "{outcome:?}");
    c.merge_pr(pr.number, MergeStrategy::Merge, "t", "m")
        .await
        .expect("merge method merge passes the schema");
    c.get_pr(pr.number).await.expect("read");
    c.list_hyperloop_prs().await.expect("list parses");
    c.delete_branch("worker/t1").await.expect("delete");
}
