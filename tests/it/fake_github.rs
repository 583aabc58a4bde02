//! A stateful stand-in for GitHub, served over real HTTP on 127.0.0.1, for the tests of the
//! GitHub client and of GitHub mode. It keeps pull requests, labels and App installation tokens
//! in memory and uses a real bare git repository as the repository's storage: opening a pull
//! request checks the head branch there, merging writes a real squash (or merge) commit onto the
//! base branch there, deleting a branch deletes the ref there.
//!
//! The JSON it answers is shaped like GitHub's (real-looking URLs, the fields octocrab's models
//! require), answers carry GitHub's status codes and messages for the refusals hyperloop must
//! survive, and tests can queue canned answers per route (5xx, rate limits, 401, a broken
//! connection) and read back every request it saw.
//!
//! With [`FakeGitHub::enforce_limits`] it also keeps GitHub's rate limits: a primary budget of
//! requests per hour reported in `x-ratelimit-*` headers on every answer, and the secondary
//! limits on content-creating requests (POST, PATCH, PUT, DELETE and GraphQL mutations) per
//! minute and per hour, refused with GitHub's 403 and `retry-after`. Its clock (the `Date` header
//! and the windows) can be moved forward, so that an hour of pacing takes no hour of test.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use octocrab::jsonwebtoken::{Algorithm, DecodingKey, Validation};
use percent_encoding::percent_decode_str;
use serde_json::{Value, json};

mod issues;
pub use issues::{BOT, OWNER};

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub body: String,
    pub status: u16,
}

/// A canned answer, used instead of (or after) the real handling of a request.
#[derive(Debug, Clone)]
pub struct Canned {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Answer with bytes that are not HTTP, so the client sees a broken connection.
    pub garbage: bool,
}

impl Canned {
    pub fn status(status: u16) -> Canned {
        Canned {
            status,
            headers: Vec::new(),
            body: json!({ "message": format!("fake failure {status}") }).to_string(),
            garbage: false,
        }
    }

    // Takes `json!` literals by value so that call sites read like the answer they describe.
    #[allow(clippy::needless_pass_by_value)]
    pub fn json(status: u16, body: Value) -> Canned {
        Canned {
            status,
            headers: Vec::new(),
            body: body.to_string(),
            garbage: false,
        }
    }

    /// A secondary rate limit: 429 with `retry-after`.
    pub fn retry_after(secs: u64) -> Canned {
        Canned::json(
            429,
            json!({ "message": "You have exceeded a secondary rate limit." }),
        )
        .header("retry-after", &secs.to_string())
    }

    /// A primary rate limit: 403 with no requests left until `reset`.
    pub fn primary_rate_limit(reset: DateTime<Utc>) -> Canned {
        Canned::json(
            403,
            json!({ "message": "API rate limit exceeded for installation ID 1." }),
        )
        .header("x-ratelimit-limit", "5000")
        .header("x-ratelimit-remaining", "0")
        .header("x-ratelimit-reset", &reset.timestamp().to_string())
    }

    pub fn broken_connection() -> Canned {
        Canned {
            status: 0,
            headers: Vec::new(),
            body: String::new(),
            garbage: true,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Canned {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

#[derive(Debug)]
struct Fault {
    method: String,
    path_suffix: String,
    /// Handle the request for real first, then answer with the canned response (a lost answer).
    after_processing: bool,
    remaining: u32,
    response: Canned,
}

#[derive(Debug, Clone)]
struct Pr {
    number: u64,
    id: u64,
    title: String,
    body: String,
    head_ref: String,
    head_sha: String,
    base_ref: String,
    open: bool,
    draft: bool,
    merged_at: Option<i64>,
    closed_at: Option<i64>,
    merge_commit_sha: Option<String>,
    labels: Vec<String>,
    created_at: i64,
    updated_at: i64,
}

#[derive(Debug, Clone)]
struct Label {
    id: u64,
    name: String,
    color: String,
    description: Option<String>,
}

#[derive(Debug, Clone)]
struct App {
    app_id: u64,
    installation_id: u64,
    public_pem: String,
    token_ttl: Duration,
}

#[derive(Debug)]
struct State {
    bare: PathBuf,
    owner: String,
    repo: String,
    api: String,
    tokens: HashSet<String>,
    app: Option<App>,
    installation_tokens: Vec<(String, DateTime<Utc>)>,
    prs: BTreeMap<u64, Pr>,
    labels: Vec<Label>,
    next_number: u64,
    next_id: u64,
    /// Seconds after the epoch below; every change moves it on, so `updated_at` orders changes.
    clock: i64,
    faults: Vec<Fault>,
    log: Vec<LoggedRequest>,
    /// Seconds the fake's clock is ahead of the machine's.
    clock_offset: i64,
    limits: Option<Limits>,
    /// Unix seconds (the fake's clock) of accepted content-creating requests.
    content: VecDeque<i64>,
    /// Content-creating requests refused by the secondary limits.
    refused: u32,
    /// The primary window: when it started and what it used.
    primary_start: i64,
    primary_used: u64,
    delete_branch_on_merge: bool,
    /// Check runs by head commit, in the order they were reported.
    check_runs: HashMap<String, Vec<CheckRun>>,
    /// Commit statuses by head commit: (context, state, description), in order.
    statuses: HashMap<String, Vec<(String, String, String)>>,
    /// Status checks branch protection requires on the base branch (empty: unprotected).
    required_checks: Vec<String>,
    /// How many GraphQL check queries were answered.
    rollup_queries: usize,
    /// `workflow_dispatch` requests: the workflow file (or id) and the ref, oldest first.
    dispatches: Vec<(String, String)>,
    /// Issues, events with actors, comments, collaborators, push activity (see `issues`).
    social: issues::Social,
}

/// A check run as a CI system reports it.
#[derive(Debug, Clone)]
pub struct CheckRun {
    pub name: String,
    /// `queued`, `in_progress` or `completed`.
    pub status: String,
    /// `success`, `failure`, … once completed.
    pub conclusion: Option<String>,
    pub title: String,
    pub summary: String,
    /// (path, line, message)
    pub annotations: Vec<(String, u64, String)>,
}

impl CheckRun {
    pub fn completed(name: &str, conclusion: &str, summary: &str) -> CheckRun {
        CheckRun {
            name: name.into(),
            status: "completed".into(),
            conclusion: Some(conclusion.into()),
            title: format!("{name}: {conclusion}"),
            summary: summary.into(),
            annotations: Vec::new(),
        }
    }

    pub fn in_progress(name: &str) -> CheckRun {
        CheckRun {
            name: name.into(),
            status: "in_progress".into(),
            conclusion: None,
            title: String::new(),
            summary: String::new(),
            annotations: Vec::new(),
        }
    }

    pub fn annotate(mut self, path: &str, line: u64, message: &str) -> CheckRun {
        self.annotations.push((path.into(), line, message.into()));
        self
    }

    fn passed(&self) -> bool {
        self.status == "completed"
            && matches!(
                self.conclusion.as_deref(),
                Some("success" | "neutral" | "skipped")
            )
    }
}

/// GitHub's rate limits as the fake enforces them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub primary_per_hour: u64,
    pub content_per_minute: usize,
    pub content_per_hour: usize,
}

impl Limits {
    /// The job token's: 1,000 requests an hour for the repository; 80 content-creating requests
    /// a minute and 500 an hour.
    pub fn job_token() -> Limits {
        Limits {
            primary_per_hour: 1000,
            content_per_minute: 80,
            content_per_hour: 500,
        }
    }
}

const SECONDARY_LIMIT_MESSAGE: &str = "You have exceeded a secondary rate limit. Please wait a few minutes before you try again. If you reach out to GitHub Support for help, please include the request ID FAKE:0000.";

const EPOCH: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

/// The fake server. Stops when dropped.
pub struct FakeGitHub {
    /// The API base, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    pub owner: String,
    pub repo: String,
    /// A personal token the fake accepts.
    pub token: String,
    state: Arc<Mutex<State>>,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FakeGitHub {
    /// Serves `owner/repo`, stored in the bare repository `bare`.
    pub fn start(bare: &Path, owner: &str, repo: &str) -> FakeGitHub {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind fake GitHub"));
        let port = server
            .server_addr()
            .to_ip()
            .expect("fake GitHub listens on IP")
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let token = "ghp_fakeDefaultToken000000000000000000".to_string();
        let state = Arc::new(Mutex::new(State {
            bare: bare.to_path_buf(),
            owner: owner.to_string(),
            repo: repo.to_string(),
            api: url.clone(),
            tokens: HashSet::from([token.clone()]),
            app: None,
            installation_tokens: Vec::new(),
            prs: BTreeMap::new(),
            labels: Vec::new(),
            next_number: 1,
            next_id: 1000,
            clock: 0,
            faults: Vec::new(),
            log: Vec::new(),
            clock_offset: 0,
            limits: None,
            content: VecDeque::new(),
            refused: 0,
            primary_start: 0,
            primary_used: 0,
            delete_branch_on_merge: false,
            check_runs: HashMap::new(),
            statuses: HashMap::new(),
            required_checks: Vec::new(),
            rollup_queries: 0,
            dispatches: Vec::new(),
            social: issues::Social {
                push_log: Some(issues::install_push_hook(bare)),
                ..issues::Social::default()
            },
        }));
        let thread = {
            let server = Arc::clone(&server);
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                while let Ok(request) = server.recv() {
                    serve(&state, request);
                }
            })
        };
        FakeGitHub {
            url,
            owner: owner.to_string(),
            repo: repo.to_string(),
            token,
            state,
            server,
            thread: Some(thread),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accept another personal token.
    pub fn allow_token(&self, token: &str) {
        self.state().tokens.insert(token.to_string());
    }

    /// Act as a GitHub App installed on the repository: verify JWTs with `public_pem` and mint
    /// installation tokens that live for `token_ttl`.
    pub fn enable_app(&self, app_id: u64, installation_id: u64, public_pem: &str, token_ttl: Duration) {
        self.state().app = Some(App {
            app_id,
            installation_id,
            public_pem: public_pem.to_string(),
            token_ttl,
        });
    }

    /// Installation tokens minted so far, oldest first.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state()
            .installation_tokens
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// The next `count` requests `METHOD …path_suffix` get `response` instead of an answer.
    pub fn fail_next(&self, method: &str, path_suffix: &str, count: u32, response: Canned) {
        self.state().faults.push(Fault {
            method: method.to_string(),
            path_suffix: path_suffix.to_string(),
            after_processing: false,
            remaining: count,
            response,
        });
    }

    /// The next `count` requests are handled, but their answer is replaced by `response`: the
    /// client cannot know that its request took effect.
    pub fn lose_answer(&self, method: &str, path_suffix: &str, count: u32, response: Canned) {
        self.state().faults.push(Fault {
            method: method.to_string(),
            path_suffix: path_suffix.to_string(),
            after_processing: true,
            remaining: count,
            response,
        });
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.state().log.clone()
    }

    pub fn clear_requests(&self) {
        self.state().log.clear();
    }

    /// Requests seen with `method` whose path ends with `path_suffix`.
    pub fn count(&self, method: &str, path_suffix: &str) -> usize {
        self.state()
            .log
            .iter()
            .filter(|r| r.method == method && r.path.ends_with(path_suffix))
            .count()
    }

    /// Opens a pull request without HTTP (for setting up a scene). The head must exist.
    pub fn open_pr(&self, head: &str, base: &str, title: &str, draft: bool) -> u64 {
        let mut s = self.state();
        let sha = s
            .branch_sha(head)
            .unwrap_or_else(|| panic!("fake GitHub: no branch {head}"));
        s.insert_pr(head, base, title, "", draft, sha)
    }

    /// The repository's owner (an admin) adds a label.
    pub fn add_label_to_pr(&self, number: u64, label: &str) {
        self.add_label_as(number, label, OWNER);
    }

    /// A person presses "Ready for review".
    pub fn mark_ready_as_person(&self, number: u64) {
        if let Some(pr) = self.state().prs.get_mut(&number) {
            pr.draft = false;
        }
    }

    /// A person presses "Squash and merge".
    pub fn merge_pr_as_person(&self, number: u64) -> String {
        let mut s = self.state();
        let title = {
            let pr = s.prs.get(&number).expect("fake GitHub: no such PR");
            format!("{} (#{number})", pr.title)
        };
        match s.merge(number, "squash", &title, "", None) {
            Ok(sha) => sha,
            Err((status, body)) => panic!("fake GitHub: merge refused {status}: {body}"),
        }
    }

    pub fn close_pr(&self, number: u64) {
        let mut s = self.state();
        let now = s.tick();
        let pr = s.prs.get_mut(&number).expect("fake GitHub: no such PR");
        pr.open = false;
        pr.closed_at = Some(now);
        pr.updated_at = now;
    }

    pub fn pr_json(&self, number: u64) -> Value {
        let s = self.state();
        let pr = s.prs.get(&number).expect("fake GitHub: no such PR");
        s.pr_json(pr, true)
    }

    pub fn pr_is_draft(&self, number: u64) -> bool {
        self.state().prs.get(&number).is_some_and(|p| p.draft)
    }

    pub fn pr_labels(&self, number: u64) -> Vec<String> {
        self.state()
            .prs
            .get(&number)
            .map(|p| p.labels.clone())
            .unwrap_or_default()
    }

    pub fn pr_count(&self) -> usize {
        self.state().prs.len()
    }

    pub fn label_names(&self) -> Vec<String> {
        self.state().labels.iter().map(|l| l.name.clone()).collect()
    }

    /// Keep GitHub's rate limits from now on.
    pub fn enforce_limits(&self, limits: Limits) {
        self.state().limits = Some(limits);
    }

    /// Moves the fake's clock forward (its `Date` header and its rate-limit windows).
    pub fn advance_clock(&self, by: Duration) {
        self.state().clock_offset += i64::try_from(by.as_secs()).expect("seconds fit");
    }

    /// The fake's time now.
    pub fn now(&self) -> DateTime<Utc> {
        self.state().now()
    }

    /// Content-creating requests refused by the secondary limits so far.
    pub fn refused(&self) -> u32 {
        self.state().refused
    }

    /// Accepted content-creating requests within the last `secs` seconds of the fake's clock.
    pub fn content_within(&self, secs: i64) -> usize {
        let s = self.state();
        let now = s.now().timestamp();
        s.content.iter().filter(|&&t| t > now - secs).count()
    }

    /// The most content-creating requests accepted in any window of `secs` seconds.
    pub fn peak_content(&self, secs: i64) -> usize {
        let s = self.state();
        let times: Vec<i64> = s.content.iter().copied().collect();
        let mut peak = 0;
        let mut start = 0;
        for (end, t) in times.iter().enumerate() {
            while times[start] <= t - secs {
                start += 1;
            }
            peak = peak.max(end + 1 - start);
        }
        peak
    }

    /// The repository's "Automatically delete head branches".
    pub fn set_delete_branch_on_merge(&self, on: bool) {
        self.state().delete_branch_on_merge = on;
    }

    /// Branch protection on the base branch requiring these status checks.
    pub fn require_checks(&self, names: &[&str]) {
        self.state().required_checks = names.iter().map(|n| n.to_string()).collect();
    }

    /// CI reports a check run on `sha`.
    pub fn add_check_run(&self, sha: &str, run: CheckRun) {
        let mut s = self.state();
        s.check_runs.entry(sha.to_string()).or_default().push(run);
        s.tick();
    }

    /// A commit status (`pending`, `success`, `failure`, `error`) on `sha`.
    pub fn set_status(&self, sha: &str, context: &str, state: &str, description: &str) {
        self.state().statuses.entry(sha.to_string()).or_default().push((
            context.into(),
            state.into(),
            description.into(),
        ));
    }

    /// The head commit of pull request `number`, as GitHub sees the branch now.
    pub fn pr_head(&self, number: u64) -> String {
        let mut s = self.state();
        s.refresh_head(number);
        s.prs.get(&number).map(|p| p.head_sha.clone()).unwrap_or_default()
    }

    pub fn rollup_queries(&self) -> usize {
        self.state().rollup_queries
    }

    /// The workflow runs requested through `POST …/actions/workflows/{id}/dispatches`, as
    /// (workflow, ref), oldest first.
    pub fn dispatches(&self) -> Vec<(String, String)> {
        self.state().dispatches.clone()
    }
}

/// Whether GitHub counts a request against the secondary limit on content creation.
fn is_content(method: &str, path: &str, body: &str) -> bool {
    if method == "GET" || method == "HEAD" || path.starts_with("/app/") {
        return false;
    }
    if path == "/graphql" {
        let query = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.get("query").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default();
        return query.trim_start().starts_with("mutation");
    }
    true
}

// ---------------------------------------------------------------- the server loop

fn serve(state: &Arc<Mutex<State>>, mut request: tiny_http::Request) {
    let method = request.method().as_str().to_uppercase();
    let raw_url = request.url().to_string();
    let (path, query) = match raw_url.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (raw_url.clone(), String::new()),
    };
    let authorization = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("authorization"))
        .map(|h| h.value.as_str().to_string());
    let mut body = String::new();
    let _ = request.as_reader().read_to_string(&mut body);

    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    s.ingest_pushes();
    let fault = s.take_fault(&method, &path);
    let content = is_content(&method, &path, &body);
    let (status, mut headers, text, garbage) = match fault {
        Some((false, canned)) => (canned.status, canned.headers, canned.body, canned.garbage),
        Some((true, canned)) => {
            let _ = s.handle(&method, &path, &query, authorization.as_deref(), &body);
            (canned.status, canned.headers, canned.body, canned.garbage)
        }
        None => match s.limit(content, &path) {
            Some((status, headers, text)) => (status, headers, text, false),
            None => {
                let (status, headers, text) =
                    s.handle(&method, &path, &query, authorization.as_deref(), &body);
                (status, headers, text, false)
            }
        },
    };
    headers.extend(s.limit_headers(&path));
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("date")) {
        headers.push(("date".into(), s.now().to_rfc2822().replace("+0000", "GMT")));
    }
    s.log.push(LoggedRequest {
        method,
        path,
        query,
        authorization,
        body,
        status,
    });
    drop(s);

    if garbage {
        let mut w = request.into_writer();
        let _ = w.write_all(b"this is not HTTP\r\n\r\n");
        let _ = w.flush();
        return;
    }
    let mut response = tiny_http::Response::from_string(text).with_status_code(status);
    response.add_header(
        tiny_http::Header::from_bytes("content-type", "application/json; charset=utf-8").expect("header"),
    );
    for (k, v) in headers {
        response.add_header(tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("header"));
    }
    let _ = request.respond(response);
}

type Answer = (u16, Vec<(String, String)>, String);

#[allow(clippy::needless_pass_by_value)]
fn answer(status: u16, body: Value) -> Answer {
    (status, Vec::new(), body.to_string())
}

fn message(status: u16, text: &str) -> Answer {
    answer(
        status,
        json!({ "message": text, "documentation_url": "https://docs.github.com/rest" }),
    )
}

#[allow(clippy::needless_pass_by_value)]
fn validation(errors: Value) -> Answer {
    answer(
        422,
        json!({ "message": "Validation Failed", "errors": errors, "documentation_url": "https://docs.github.com/rest" }),
    )
}

fn no_content() -> Answer {
    (204, Vec::new(), String::new())
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn query_map(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(&k.replace('+', " ")), decode(&v.replace('+', " ")))
        })
        .collect()
}

fn iso(t: i64) -> String {
    DateTime::<Utc>::from_timestamp(EPOCH + t, 0)
        .expect("valid time")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl State {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + TimeDelta::seconds(self.clock_offset)
    }

    /// GitHub's refusal when a request goes over a limit (and the request counted when not).
    fn limit(&mut self, content: bool, path: &str) -> Option<Answer> {
        let limits = self.limits?;
        // Neither the App's own endpoints nor the rate-limit reading count against the budget.
        if path.starts_with("/app/") || path == "/rate_limit" {
            return None;
        }
        let now = self.now().timestamp();
        if now >= self.primary_start + 3600 {
            self.primary_start = now;
            self.primary_used = 0;
        }
        if self.primary_used >= limits.primary_per_hour {
            let (status, mut headers, text) = message(403, "API rate limit exceeded for installation.");
            headers.push(("x-ratelimit-remaining".into(), "0".into()));
            return Some((status, headers, text));
        }
        self.primary_used += 1;
        if !content {
            return None;
        }
        while self.content.front().is_some_and(|&t| t <= now - 3600) {
            self.content.pop_front();
        }
        let in_minute = self.content.iter().filter(|&&t| t > now - 60).count();
        if in_minute >= limits.content_per_minute || self.content.len() >= limits.content_per_hour {
            self.refused += 1;
            let (status, mut headers, text) = message(403, SECONDARY_LIMIT_MESSAGE);
            headers.push(("retry-after".into(), "60".into()));
            return Some((status, headers, text));
        }
        self.content.push_back(now);
        None
    }

    /// The primary budget's headers, as GitHub sends them on every answer.
    fn limit_headers(&self, path: &str) -> Vec<(String, String)> {
        let Some(limits) = self.limits else {
            return Vec::new();
        };
        let resource = if path == "/graphql" { "graphql" } else { "core" };
        vec![
            ("x-ratelimit-limit".into(), limits.primary_per_hour.to_string()),
            (
                "x-ratelimit-remaining".into(),
                limits
                    .primary_per_hour
                    .saturating_sub(self.primary_used)
                    .to_string(),
            ),
            ("x-ratelimit-used".into(), self.primary_used.to_string()),
            (
                "x-ratelimit-reset".into(),
                (self.primary_start + 3600).to_string(),
            ),
            ("x-ratelimit-resource".into(), resource.into()),
        ]
    }

    fn tick(&mut self) -> i64 {
        self.clock += 1;
        self.clock
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn take_fault(&mut self, method: &str, path: &str) -> Option<(bool, Canned)> {
        let i = self
            .faults
            .iter()
            .position(|f| f.remaining > 0 && f.method == method && path.ends_with(&f.path_suffix))?;
        let f = &mut self.faults[i];
        f.remaining -= 1;
        let out = (f.after_processing, f.response.clone());
        if f.remaining == 0 {
            self.faults.remove(i);
        }
        Some(out)
    }

    fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.repo)
    }

    // ------------------------------------------------------------ auth

    fn bearer(authorization: Option<&str>) -> Option<&str> {
        let a = authorization?;
        a.strip_prefix("Bearer ")
            .or_else(|| a.strip_prefix("token "))
            .map(str::trim)
    }

    fn token_ok(&self, authorization: Option<&str>) -> bool {
        let Some(t) = Self::bearer(authorization) else {
            return false;
        };
        self.tokens.contains(t)
            || self
                .installation_tokens
                .iter()
                .any(|(tok, exp)| tok == t && *exp > Utc::now())
    }

    fn jwt_ok(&self, authorization: Option<&str>) -> Result<(), Answer> {
        let app = self
            .app
            .as_ref()
            .ok_or_else(|| message(401, "A JSON web token could not be decoded"))?;
        let jwt = Self::bearer(authorization).ok_or_else(|| message(401, "Bad credentials"))?;
        let key = DecodingKey::from_rsa_pem(app.public_pem.as_bytes())
            .map_err(|e| message(500, &format!("fake: bad public key: {e}")))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_required_spec_claims(&["exp", "iat", "iss"]);
        validation.set_issuer(&[app.app_id.to_string()]);
        let data = octocrab::jsonwebtoken::decode::<Value>(jwt, &key, &validation)
            .map_err(|e| message(401, &format!("A JSON web token could not be decoded ({e})")))?;
        let iat = data.claims.get("iat").and_then(Value::as_i64).unwrap_or(0);
        let exp = data.claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        if exp - iat > 600 {
            return Err(message(
                401,
                "'Expiration time' claim ('exp') is too far in the future",
            ));
        }
        Ok(())
    }

    // ------------------------------------------------------------ routing

    fn handle(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        authorization: Option<&str>,
        body: &str,
    ) -> Answer {
        let segs: Vec<String> = path.trim_start_matches('/').split('/').map(decode).collect();
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let body: Value = serde_json::from_str(body).unwrap_or(Value::Null);

        if let ["app", "installations", id, "access_tokens"] = segs.as_slice() {
            if method != "POST" {
                return message(404, "Not Found");
            }
            if let Err(a) = self.jwt_ok(authorization) {
                return a;
            }
            let app = self.app.clone().expect("checked by jwt_ok");
            if id.parse::<u64>().ok() != Some(app.installation_id) {
                return message(404, "Not Found");
            }
            let n = self.installation_tokens.len() + 1;
            let token = format!("ghs_fakeInstallationToken{n:04}");
            let expires = Utc::now() + TimeDelta::from_std(app.token_ttl).expect("ttl fits");
            self.installation_tokens.push((token.clone(), expires));
            return answer(
                201,
                json!({
                    "token": token,
                    "expires_at": expires.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    "permissions": { "contents": "write", "pull_requests": "write", "issues": "write", "metadata": "read" },
                    "repository_selection": "selected",
                }),
            );
        }

        if segs.as_slice() == ["rate_limit"] && method == "GET" {
            if !self.token_ok(authorization) {
                return message(401, "Bad credentials");
            }
            let limit = self.limits.map_or(5000, |l| l.primary_per_hour);
            let core = json!({
                "limit": limit,
                "remaining": limit.saturating_sub(self.primary_used),
                "used": self.primary_used,
                "reset": self.primary_start + 3600,
            });
            return answer(200, json!({ "resources": { "core": core }, "rate": core }));
        }

        if segs.as_slice() == ["graphql"] && method == "POST" {
            if !self.token_ok(authorization) {
                return message(401, "Bad credentials");
            }
            return self.graphql(&body);
        }

        let ["repos", owner, repo, rest @ ..] = segs.as_slice() else {
            return message(404, "Not Found");
        };
        if !owner.eq_ignore_ascii_case(&self.owner) || !repo.eq_ignore_ascii_case(&self.repo) {
            return message(404, "Not Found");
        }

        if rest == ["installation"] && method == "GET" {
            if let Err(a) = self.jwt_ok(authorization) {
                return a;
            }
            let app = self.app.clone().expect("checked by jwt_ok");
            return answer(
                200,
                json!({
                    "id": app.installation_id,
                    "app_id": app.app_id,
                    "target_type": "Organization",
                    "account": self.user_json(&self.owner.clone(), 1),
                    "access_tokens_url": format!("{}/app/installations/{}/access_tokens", self.api, app.installation_id),
                    "repositories_url": format!("{}/installation/repositories", self.api),
                    "html_url": format!("https://github.com/organizations/{}/settings/installations/{}", self.owner, app.installation_id),
                    "permissions": { "contents": "write", "pull_requests": "write", "issues": "write" },
                    "events": [],
                }),
            );
        }

        if !self.token_ok(authorization) {
            return message(401, "Bad credentials");
        }

        match (method, rest) {
            ("GET", []) => {
                let mut repo = self.repo_json();
                if let Some(obj) = repo.as_object_mut() {
                    obj.insert(
                        "delete_branch_on_merge".into(),
                        json!(self.delete_branch_on_merge),
                    );
                    obj.insert("allow_squash_merge".into(), json!(true));
                    obj.insert("allow_merge_commit".into(), json!(true));
                }
                answer(200, repo)
            }
            ("GET", ["pulls"]) => self.list_pulls(query),
            ("GET", ["commits", sha, "status"]) => self.combined_status(sha),
            ("GET", ["commits", sha, "check-runs"]) => self.list_check_runs(sha),
            ("POST", ["pulls"]) => self.create_pull(&body),
            ("GET", ["pulls", n]) => self.with_pr(n, |s, n| {
                s.refresh_head(n);
                let pr = s.prs[&n].clone();
                answer(200, s.pr_json(&pr, true))
            }),
            ("PATCH", ["pulls", n]) => self.with_pr(n, |s, n| s.patch_pull(n, &body)),
            ("PUT", ["pulls", n, "merge"]) => self.with_pr(n, |s, n| {
                let method = body
                    .get("merge_method")
                    .and_then(Value::as_str)
                    .unwrap_or("merge")
                    .to_string();
                let default_title = format!("Merge pull request #{n}");
                let title = body
                    .get("commit_title")
                    .and_then(Value::as_str)
                    .unwrap_or(&default_title)
                    .to_string();
                let msg = body
                    .get("commit_message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let sha = body.get("sha").and_then(Value::as_str).map(str::to_string);
                match s.merge(n, &method, &title, &msg, sha.as_deref()) {
                    Ok(sha) => answer(
                        200,
                        json!({ "sha": sha, "merged": true, "message": "Pull Request successfully merged" }),
                    ),
                    Err((status, text)) => message(status, &text),
                }
            }),
            ("PUT", ["pulls", n, "update-branch"]) => self.with_pr(n, |s, n| s.update_branch(n)),
            ("POST", ["actions", "workflows", workflow, "dispatches"]) => {
                // GitHub refuses a ref that does not exist, with 422.
                match body.get("ref").and_then(Value::as_str) {
                    Some(r) if self.branch_sha(r).is_some() => {
                        self.dispatches.push(((*workflow).to_string(), r.to_string()));
                        no_content()
                    }
                    _ => validation(
                        json!([{ "resource": "WorkflowDispatch", "field": "ref", "code": "invalid" }]),
                    ),
                }
            }
            ("GET", ["labels"]) => {
                let labels: Vec<Value> = self.labels.iter().map(|l| self.label_json(l)).collect();
                self.paged(labels, query, "labels")
            }
            ("POST", ["labels"]) => self.create_label(&body),
            ("POST", ["issues", n, "labels"]) => self.with_pr(n, |s, n| {
                let names: Vec<String> = body
                    .get("labels")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                // Like GitHub, labels that do not exist yet are created on the fly.
                for name in &names {
                    s.ensure_label(name);
                }
                let now = s.tick();
                let pr = s.prs.get_mut(&n).expect("checked");
                let mut added = Vec::new();
                for name in names {
                    if !pr.labels.contains(&name) {
                        pr.labels.push(name.clone());
                        added.push(name);
                    }
                }
                pr.updated_at = now;
                let pr = pr.clone();
                for name in added {
                    s.record_event(n, "labeled", BOT, Some(&name));
                }
                answer(200, Value::Array(s.pr_labels_json(&pr)))
            }),
            ("DELETE", ["issues", n, "labels", name]) => self.with_pr(n, |s, n| {
                let now = s.tick();
                let pr = s.prs.get_mut(&n).expect("checked");
                let before = pr.labels.len();
                pr.labels.retain(|l| l != name);
                if pr.labels.len() == before {
                    return message(404, "Label does not exist");
                }
                pr.updated_at = now;
                let pr = pr.clone();
                s.record_event(n, "unlabeled", BOT, Some(name));
                answer(200, Value::Array(s.pr_labels_json(&pr)))
            }),
            ("DELETE", ["git", "refs", "heads", branch @ ..]) => {
                let branch = branch.join("/");
                if self.branch_sha(&branch).is_none() {
                    return message(422, "Reference does not exist");
                }
                self.git(&["update-ref", "-d", &format!("refs/heads/{branch}")])
                    .expect("delete ref");
                no_content()
            }
            (method, rest) => self
                .handle_social(method, rest, query, &body)
                .unwrap_or_else(|| message(404, "Not Found")),
        }
    }

    fn with_pr(&mut self, n: &str, f: impl FnOnce(&mut State, u64) -> Answer) -> Answer {
        match n.parse::<u64>() {
            Ok(n) if self.prs.contains_key(&n) => f(self, n),
            _ => message(404, "Not Found"),
        }
    }

    // ------------------------------------------------------------ pulls

    fn list_pulls(&self, query: &str) -> Answer {
        let q = query_map(query);
        let state = q.get("state").map(String::as_str).unwrap_or("open");
        let head = q.get("head").cloned();
        let mut prs: Vec<&Pr> = self
            .prs
            .values()
            .filter(|p| match state {
                "all" => true,
                "closed" => !p.open,
                _ => p.open,
            })
            .filter(|p| match &head {
                // Without `owner:` GitHub ignores the filter; so does the fake.
                Some(h) => match h.split_once(':') {
                    Some((owner, branch)) => owner.eq_ignore_ascii_case(&self.owner) && p.head_ref == branch,
                    None => true,
                },
                None => true,
            })
            .collect();
        let desc = q.get("direction").map(String::as_str) != Some("asc");
        match q.get("sort").map(String::as_str) {
            Some("updated") => prs.sort_by_key(|p| (p.updated_at, p.number)),
            _ => prs.sort_by_key(|p| (p.created_at, p.number)),
        }
        if desc {
            prs.reverse();
        }
        let items: Vec<Value> = prs.iter().map(|p| self.pr_json(p, false)).collect();
        self.paged(items, query, "pulls")
    }

    /// Slices `items` by `page`/`per_page` and adds a `Link` header like GitHub's.
    fn paged(&self, items: Vec<Value>, query: &str, route: &str) -> Answer {
        let q = query_map(query);
        let per_page = q
            .get("per_page")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(30)
            .clamp(1, 100);
        let page = q
            .get("page")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        let last = items.len().div_ceil(per_page).max(1);
        let slice: Vec<Value> = items
            .into_iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .collect();
        let base: Vec<String> = query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("page="))
            .map(str::to_string)
            .collect();
        let link_to = |n: usize| {
            let mut parts = base.clone();
            parts.push(format!("page={n}"));
            format!(
                "{}/repos/{}/{}?{}",
                self.api,
                self.full_name(),
                route,
                parts.join("&")
            )
        };
        let mut links = Vec::new();
        if page < last {
            links.push(format!("<{}>; rel=\"next\"", link_to(page + 1)));
            links.push(format!("<{}>; rel=\"last\"", link_to(last)));
        }
        if page > 1 {
            links.push(format!("<{}>; rel=\"first\"", link_to(1)));
            links.push(format!("<{}>; rel=\"prev\"", link_to(page - 1)));
        }
        let headers = if links.is_empty() {
            Vec::new()
        } else {
            vec![("link".to_string(), links.join(", "))]
        };
        (200, headers, Value::Array(slice).to_string())
    }

    fn create_pull(&mut self, body: &Value) -> Answer {
        let get = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let (title, head, base) = (get("title"), get("head"), get("base"));
        let text = get("body");
        let draft = body.get("draft").and_then(Value::as_bool).unwrap_or(false);
        if title.is_empty() || head.is_empty() || base.is_empty() {
            return validation(json!([{ "resource": "PullRequest", "code": "missing_field" }]));
        }
        // A head may be given as `owner:branch`.
        let head = match head.split_once(':') {
            Some((_, b)) => b.to_string(),
            None => head,
        };
        let Some(head_sha) = self.branch_sha(&head) else {
            return validation(json!([{ "resource": "PullRequest", "field": "head", "code": "invalid" }]));
        };
        let Some(base_sha) = self.branch_sha(&base) else {
            return validation(json!([{ "resource": "PullRequest", "field": "base", "code": "invalid" }]));
        };
        if self
            .prs
            .values()
            .any(|p| p.open && p.head_ref == head && p.base_ref == base)
        {
            return validation(json!([{
                "resource": "PullRequest",
                "code": "custom",
                "message": format!("A pull request already exists for {}:{head}.", self.owner),
            }]));
        }
        if head_sha == base_sha || self.is_ancestor(&head_sha, &base_sha) {
            return validation(json!([{
                "resource": "PullRequest",
                "code": "custom",
                "message": format!("No commits between {base} and {head}"),
            }]));
        }
        let n = self.insert_pr(&head, &base, &title, &text, draft, head_sha);
        let pr = self.prs[&n].clone();
        answer(201, self.pr_json(&pr, true))
    }

    fn insert_pr(
        &mut self,
        head: &str,
        base: &str,
        title: &str,
        body: &str,
        draft: bool,
        head_sha: String,
    ) -> u64 {
        let now = self.tick();
        let number = self.next_number;
        self.next_number += 1;
        let id = self.next_id();
        self.prs.insert(
            number,
            Pr {
                number,
                id,
                title: title.to_string(),
                body: body.to_string(),
                head_ref: head.to_string(),
                head_sha,
                base_ref: base.to_string(),
                open: true,
                draft,
                merged_at: None,
                closed_at: None,
                merge_commit_sha: None,
                labels: Vec::new(),
                created_at: now,
                updated_at: now,
            },
        );
        number
    }

    fn patch_pull(&mut self, n: u64, body: &Value) -> Answer {
        let now = self.tick();
        let pr = self.prs.get_mut(&n).expect("checked");
        if let Some(b) = body.get("body").and_then(Value::as_str) {
            pr.body = b.to_string();
        }
        if let Some(t) = body.get("title").and_then(Value::as_str) {
            pr.title = t.to_string();
        }
        match body.get("state").and_then(Value::as_str) {
            Some("closed") if pr.open => {
                pr.open = false;
                pr.closed_at = Some(now);
            }
            Some("open") if !pr.open && pr.merged_at.is_none() => {
                pr.open = true;
                pr.closed_at = None;
            }
            _ => {}
        }
        pr.updated_at = now;
        let pr = pr.clone();
        answer(200, self.pr_json(&pr, true))
    }

    fn refresh_head(&mut self, n: u64) {
        let head = self.prs[&n].head_ref.clone();
        if let Some(sha) = self.branch_sha(&head)
            && let Some(pr) = self.prs.get_mut(&n)
            && pr.open
        {
            pr.head_sha = sha;
        }
    }

    /// A real merge into the bare repository. Errors are GitHub's status and message.
    fn merge(
        &mut self,
        n: u64,
        method: &str,
        title: &str,
        message: &str,
        expected_sha: Option<&str>,
    ) -> Result<String, (u16, String)> {
        self.refresh_head(n);
        let pr = self.prs[&n].clone();
        if pr.merged_at.is_some() || !pr.open {
            return Err((405, "Pull Request is not mergeable".into()));
        }
        if pr.draft {
            return Err((405, "Pull Request is still a draft".into()));
        }
        if let Some(refusal) = self.required_check_refusal(&pr.head_sha) {
            return Err((405, refusal));
        }
        if let Some(sha) = expected_sha
            && sha != pr.head_sha
        {
            return Err((
                409,
                "Head branch was modified. Review and try the merge again.".into(),
            ));
        }
        let work = tempfile::tempdir().map_err(|e| (500, e.to_string()))?;
        let dir = work.path().join("w");
        let bare = self.bare.display().to_string();
        let dir_s = dir.display().to_string();
        run_git(work.path(), &["clone", "-q", "-b", &pr.base_ref, &bare, &dir_s]).map_err(|e| (500, e))?;
        run_git(
            &dir,
            &["fetch", "-q", "origin", &format!("refs/heads/{}", pr.head_ref)],
        )
        .map_err(|e| (500, e))?;
        let full_message = if message.is_empty() {
            title.to_string()
        } else {
            format!("{title}\n\n{message}")
        };
        let msg_file = work.path().join("msg");
        std::fs::write(&msg_file, &full_message).map_err(|e| (500, e.to_string()))?;
        let msg_path = msg_file.display().to_string();
        let merged = match method {
            "squash" => run_git(&dir, &["merge", "-q", "--squash", "FETCH_HEAD"])
                .and_then(|_| run_git(&dir, &["commit", "-q", "--cleanup=verbatim", "-F", &msg_path])),
            "merge" => run_git(
                &dir,
                &[
                    "merge",
                    "-q",
                    "--no-ff",
                    "--cleanup=verbatim",
                    "-F",
                    &msg_path,
                    "FETCH_HEAD",
                ],
            ),
            other => return Err((422, format!("merge_method {other} is not supported"))),
        };
        if merged.is_err() {
            return Err((405, "Pull Request is not mergeable".into()));
        }
        run_git(
            &dir,
            &[
                "push",
                "-q",
                "origin",
                &format!("HEAD:refs/heads/{}", pr.base_ref),
            ],
        )
        .map_err(|e| (500, e))?;
        let sha = run_git(&dir, &["rev-parse", "HEAD"]).map_err(|e| (500, e))?;
        let now = self.tick();
        if self.delete_branch_on_merge {
            let _ = self.git(&["update-ref", "-d", &format!("refs/heads/{}", pr.head_ref)]);
        }
        let pr = self.prs.get_mut(&n).expect("checked");
        pr.open = false;
        pr.merged_at = Some(now);
        pr.closed_at = Some(now);
        pr.merge_commit_sha = Some(sha.clone());
        pr.updated_at = now;
        Ok(sha)
    }

    /// Branch protection's refusal, worded as GitHub words it, when a required check on `sha`
    /// has not passed.
    fn required_check_refusal(&self, sha: &str) -> Option<String> {
        for name in &self.required_checks {
            let run = self
                .check_runs
                .get(sha)
                .and_then(|runs| runs.iter().rev().find(|r| &r.name == name));
            let status = self
                .statuses
                .get(sha)
                .and_then(|st| st.iter().rev().find(|(c, _, _)| c == name));
            let passed =
                run.is_some_and(CheckRun::passed) || status.is_some_and(|(_, st, _)| st == "success");
            if passed {
                continue;
            }
            return Some(if run.is_none() && status.is_none() {
                format!("Required status check \"{name}\" is expected.")
            } else {
                format!("Required status check \"{name}\" is failing.")
            });
        }
        None
    }

    /// `GET /commits/{sha}/status`: the combined status.
    fn combined_status(&self, sha: &str) -> Answer {
        let statuses: Vec<Value> = self
            .statuses
            .get(sha)
            .into_iter()
            .flatten()
            .map(|(context, state, description)| {
                json!({ "context": context, "state": state, "description": description, "target_url": format!("https://ci.example.com/{context}") })
            })
            .collect();
        let states: Vec<&str> = self
            .statuses
            .get(sha)
            .into_iter()
            .flatten()
            .map(|(_, st, _)| st.as_str())
            .collect();
        let state = if states.iter().any(|s| *s == "failure" || *s == "error") {
            "failure"
        } else if states.is_empty() || states.contains(&"pending") {
            "pending"
        } else {
            "success"
        };
        answer(
            200,
            json!({ "state": state, "sha": sha, "total_count": statuses.len(), "statuses": statuses }),
        )
    }

    /// `GET /commits/{sha}/check-runs`.
    fn list_check_runs(&self, sha: &str) -> Answer {
        let runs: Vec<Value> = self
            .check_runs
            .get(sha)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                json!({
                    "id": i + 1, "name": r.name, "head_sha": sha, "status": r.status,
                    "conclusion": r.conclusion,
                    "details_url": format!("https://github.com/{}/runs/{}", self.full_name(), i + 1),
                    "output": { "title": r.title, "summary": r.summary, "annotations_count": r.annotations.len() },
                })
            })
            .collect();
        answer(200, json!({ "total_count": runs.len(), "check_runs": runs }))
    }

    /// GraphQL: the `statusCheckRollup` of each aliased `prN: pullRequest(number: N)`.
    fn graphql_checks(&mut self, query: &str) -> Answer {
        self.rollup_queries += 1;
        let mut repo = serde_json::Map::new();
        for part in query.split("pullRequest(number: ").skip(1) {
            let Some(n) = part.split(')').next().and_then(|n| n.trim().parse::<u64>().ok()) else {
                continue;
            };
            if !self.prs.contains_key(&n) {
                repo.insert(format!("pr{n}"), Value::Null);
                continue;
            }
            self.refresh_head(n);
            let pr = self.prs[&n].clone();
            let mut contexts = Vec::new();
            for (i, r) in self
                .check_runs
                .get(&pr.head_sha)
                .into_iter()
                .flatten()
                .enumerate()
            {
                contexts.push(json!({
                    "__typename": "CheckRun",
                    "name": r.name,
                    "status": r.status.to_uppercase(),
                    "conclusion": r.conclusion.as_ref().map(|c| c.to_uppercase()),
                    "detailsUrl": format!("https://github.com/{}/runs/{}", self.full_name(), i + 1),
                    "title": r.title,
                    "summary": r.summary,
                    "annotations": { "nodes": r.annotations.iter().map(|(path, line, message)| json!({
                        "path": path, "message": message, "location": { "start": { "line": line } },
                    })).collect::<Vec<_>>() },
                }));
            }
            for (context, state, description) in self.statuses.get(&pr.head_sha).into_iter().flatten() {
                contexts.push(json!({
                    "__typename": "StatusContext",
                    "context": context,
                    "state": state.to_uppercase(),
                    "description": description,
                    "targetUrl": format!("https://ci.example.com/{context}"),
                }));
            }
            let rule = if self.required_checks.is_empty() {
                Value::Null
            } else {
                json!({ "requiredStatusCheckContexts": self.required_checks, "requiresConversationResolution": false })
            };
            repo.insert(
                format!("pr{n}"),
                json!({
                    "number": n,
                    "headRefOid": pr.head_sha,
                    "reviewDecision": null,
                    "mergeStateStatus": if self.required_check_refusal(&pr.head_sha).is_some() { "BLOCKED" } else { "CLEAN" },
                    "baseRef": { "refUpdateRule": rule },
                    "commits": { "nodes": [ { "commit": {
                        "oid": pr.head_sha,
                        "statusCheckRollup": if contexts.is_empty() { Value::Null } else { json!({ "state": "PENDING", "contexts": { "nodes": contexts } }) },
                    } } ] },
                }),
            );
        }
        answer(200, json!({ "data": { "repository": repo } }))
    }

    fn update_branch(&mut self, n: u64) -> Answer {
        let pr = self.prs[&n].clone();
        if !pr.open {
            return validation(json!(["pull request is closed"]));
        }
        let work = match tempfile::tempdir() {
            Ok(w) => w,
            Err(e) => return message(500, &e.to_string()),
        };
        let dir = work.path().join("w");
        let result = run_git(
            work.path(),
            &[
                "clone",
                "-q",
                "-b",
                &pr.head_ref,
                &self.bare.display().to_string(),
                &dir.display().to_string(),
            ],
        )
        .and_then(|_| {
            run_git(
                &dir,
                &["fetch", "-q", "origin", &format!("refs/heads/{}", pr.base_ref)],
            )
        })
        .and_then(|_| run_git(&dir, &["merge", "-q", "--no-edit", "FETCH_HEAD"]));
        if result.is_err() {
            return validation(json!(["merge conflict between base and head"]));
        }
        if let Err(e) = run_git(
            &dir,
            &[
                "push",
                "-q",
                "origin",
                &format!("HEAD:refs/heads/{}", pr.head_ref),
            ],
        ) {
            return message(500, &e);
        }
        self.refresh_head(n);
        let now = self.tick();
        if let Some(p) = self.prs.get_mut(&n) {
            p.updated_at = now;
        }
        answer(
            202,
            json!({ "message": "Updating pull request branch.", "url": format!("https://github.com/{}/pull/{n}", self.full_name()) }),
        )
    }

    // ------------------------------------------------------------ labels

    fn ensure_label(&mut self, name: &str) {
        if !self.labels.iter().any(|l| l.name.eq_ignore_ascii_case(name)) {
            let id = self.next_id();
            self.labels.push(Label {
                id,
                name: name.to_string(),
                color: "ededed".into(),
                description: None,
            });
        }
    }

    fn create_label(&mut self, body: &Value) -> Answer {
        let Some(name) = body.get("name").and_then(Value::as_str) else {
            return validation(json!([{ "resource": "Label", "field": "name", "code": "missing_field" }]));
        };
        if self.labels.iter().any(|l| l.name.eq_ignore_ascii_case(name)) {
            return validation(json!([{ "resource": "Label", "field": "name", "code": "already_exists" }]));
        }
        let color = body
            .get("color")
            .and_then(Value::as_str)
            .unwrap_or("ededed")
            .to_string();
        if color.len() != 6 || !color.chars().all(|c| c.is_ascii_hexdigit()) {
            return validation(json!([{ "resource": "Label", "field": "color", "code": "invalid" }]));
        }
        let id = self.next_id();
        let label = Label {
            id,
            name: name.to_string(),
            color,
            description: body
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        let json = self.label_json(&label);
        self.labels.push(label);
        answer(201, json)
    }

    // ------------------------------------------------------------ GraphQL

    fn graphql(&mut self, body: &Value) -> Answer {
        let query = body.get("query").and_then(Value::as_str).unwrap_or("");
        if query.trim_start().starts_with("query") && query.contains("lastEditedAt") {
            return self.graphql_editor(body);
        }
        if query.trim_start().starts_with("query") && query.contains("statusCheckRollup") {
            let query = query.to_string();
            return self.graphql_checks(&query);
        }
        let updates = query.contains("updatePullRequest");
        let readies = query.contains("markPullRequestReadyForReview");
        if !updates && !readies {
            return answer(
                200,
                json!({ "errors": [{ "message": "fake GitHub does not know this query" }] }),
            );
        }
        let id = body
            .pointer("/variables/id")
            .and_then(Value::as_str)
            .unwrap_or("");
        let found = self
            .prs
            .values()
            .find(|p| node_id(p.number) == id)
            .map(|p| p.number);
        let Some(n) = found else {
            return answer(
                200,
                json!({
                    "data": { "markPullRequestReadyForReview": null },
                    "errors": [{ "type": "NOT_FOUND", "path": ["markPullRequestReadyForReview"], "message": format!("Could not resolve to a node with the global id of '{id}'") }],
                }),
            );
        };
        let now = self.tick();
        let pr = self.prs.get_mut(&n).expect("found");
        let mut data = serde_json::Map::new();
        if updates && let Some(text) = body.pointer("/variables/body").and_then(Value::as_str) {
            pr.body = text.to_string();
            // Aliased as in hyperloop's request, or under the field's own name.
            let key = if query.contains("body: updatePullRequest") {
                "body"
            } else {
                "updatePullRequest"
            };
            data.insert(key.into(), json!({ "pullRequest": { "number": n } }));
        }
        if readies {
            pr.draft = false;
            let key = if query.contains("ready: markPullRequestReadyForReview") {
                "ready"
            } else {
                "markPullRequestReadyForReview"
            };
            data.insert(
                key.into(),
                json!({ "pullRequest": { "number": n, "isDraft": false } }),
            );
        }
        pr.updated_at = now;
        answer(200, json!({ "data": data }))
    }

    // ------------------------------------------------------------ git

    fn git(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["--git-dir", self.bare.to_str().expect("utf8 path")];
        all.extend_from_slice(args);
        run_git(&self.bare, &all)
    }

    fn branch_sha(&self, branch: &str) -> Option<String> {
        self.git(&["rev-parse", "--verify", "-q", &format!("refs/heads/{branch}")])
            .ok()
            .filter(|s| !s.is_empty())
    }

    fn is_ancestor(&self, a: &str, b: &str) -> bool {
        self.git(&["merge-base", "--is-ancestor", a, b]).is_ok()
    }

    // ------------------------------------------------------------ JSON

    fn user_json(&self, login: &str, id: u64) -> Value {
        let api = format!("https://api.github.com/users/{login}");
        json!({
            "login": login,
            "id": id,
            "node_id": format!("MDQ6VXNlcj{id}"),
            "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
            "gravatar_id": "",
            "url": api,
            "html_url": format!("https://github.com/{login}"),
            "followers_url": format!("{api}/followers"),
            "following_url": format!("{api}/following{{/other_user}}"),
            "gists_url": format!("{api}/gists{{/gist_id}}"),
            "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
            "subscriptions_url": format!("{api}/subscriptions"),
            "organizations_url": format!("{api}/orgs"),
            "repos_url": format!("{api}/repos"),
            "events_url": format!("{api}/events{{/privacy}}"),
            "received_events_url": format!("{api}/received_events"),
            "type": "User",
            "site_admin": false,
        })
    }

    fn repo_json(&self) -> Value {
        let full = self.full_name();
        let api = format!("{}/repos/{full}", self.api);
        json!({
            "id": 424242,
            "node_id": "R_kgDOfake",
            "name": self.repo,
            "full_name": full,
            "owner": self.user_json(&self.owner, 1),
            "private": false,
            "html_url": format!("https://github.com/{full}"),
            "description": null,
            "fork": false,
            "url": api,
            "pulls_url": format!("{api}/pulls{{/number}}"),
            "labels_url": format!("{api}/labels{{/name}}"),
            "git_refs_url": format!("{api}/git/refs{{/sha}}"),
            "clone_url": format!("https://github.com/{full}.git"),
            "default_branch": "main",
        })
    }

    fn label_json(&self, l: &Label) -> Value {
        json!({
            "id": l.id,
            "node_id": format!("LA_kwDOfake{}", l.id),
            "url": format!("{}/repos/{}/labels/{}", self.api, self.full_name(), percent_encoding::utf8_percent_encode(&l.name, percent_encoding::NON_ALPHANUMERIC)),
            "name": l.name,
            "description": l.description,
            "color": l.color,
            "default": false,
        })
    }

    fn pr_labels_json(&self, pr: &Pr) -> Vec<Value> {
        pr.labels
            .iter()
            .filter_map(|name| self.labels.iter().find(|l| &l.name == name))
            .map(|l| self.label_json(l))
            .collect()
    }

    /// `single` adds what only a single-PR read has (`merged`, `mergeable`, counts).
    fn pr_json(&self, pr: &Pr, single: bool) -> Value {
        let full = self.full_name();
        let api = format!("{}/repos/{full}", self.api);
        let html = format!("https://github.com/{full}/pull/{}", pr.number);
        let author = self.user_json("hyperloop-bot", 7);
        let side = |r: &str, sha: &str| {
            json!({
                "label": format!("{}:{r}", self.owner),
                "ref": r,
                "sha": sha,
                "user": self.user_json(&self.owner, 1),
                "repo": self.repo_json(),
            })
        };
        let base_sha = self.branch_sha(&pr.base_ref).unwrap_or_default();
        let mut v = json!({
            "url": format!("{api}/pulls/{}", pr.number),
            "id": pr.id,
            "node_id": node_id(pr.number),
            "html_url": html,
            "diff_url": format!("{html}.diff"),
            "patch_url": format!("{html}.patch"),
            "issue_url": format!("{api}/issues/{}", pr.number),
            "commits_url": format!("{api}/pulls/{}/commits", pr.number),
            "review_comments_url": format!("{api}/pulls/{}/comments", pr.number),
            "review_comment_url": format!("{api}/pulls/comments{{/number}}"),
            "comments_url": format!("{api}/issues/{}/comments", pr.number),
            "statuses_url": format!("{api}/statuses/{}", pr.head_sha),
            "number": pr.number,
            "state": if pr.open { "open" } else { "closed" },
            "locked": false,
            "title": pr.title,
            "user": author,
            "body": pr.body,
            "labels": self.pr_labels_json(pr),
            "milestone": null,
            "active_lock_reason": null,
            "created_at": iso(pr.created_at),
            "updated_at": iso(pr.updated_at),
            "closed_at": pr.closed_at.map(iso),
            "merged_at": pr.merged_at.map(iso),
            "merge_commit_sha": pr.merge_commit_sha,
            "assignee": null,
            "assignees": [],
            "requested_reviewers": [],
            "requested_teams": [],
            "head": side(&pr.head_ref, &pr.head_sha),
            "base": side(&pr.base_ref, &base_sha),
            "author_association": "MEMBER",
            "auto_merge": null,
            "draft": pr.draft,
        });
        if single && let Some(obj) = v.as_object_mut() {
            obj.insert("merged".into(), json!(pr.merged_at.is_some()));
            obj.insert(
                "mergeable".into(),
                if pr.open { json!(true) } else { Value::Null },
            );
            obj.insert(
                "mergeable_state".into(),
                json!(if pr.open { "clean" } else { "unknown" }),
            );
            obj.insert(
                "merged_by".into(),
                if pr.merged_at.is_some() {
                    self.user_json("octocat", 2)
                } else {
                    Value::Null
                },
            );
            obj.insert("comments".into(), json!(0));
            obj.insert("review_comments".into(), json!(0));
            obj.insert("maintainer_can_modify".into(), json!(false));
            obj.insert("commits".into(), json!(1));
            obj.insert("additions".into(), json!(1));
            obj.insert("deletions".into(), json!(0));
            obj.insert("changed_files".into(), json!(1));
        }
        v
    }
}

fn node_id(number: u64) -> String {
    format!("PR_kwDOfake{number:06}")
}

/// `git` with an identity and no configuration from the machine, like GitHub's own.
fn run_git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false"])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Hyperloop Bot")
        .env("GIT_AUTHOR_EMAIL", "bot@example.com")
        .env("GIT_COMMITTER_NAME", "GitHub")
        .env("GIT_COMMITTER_EMAIL", "noreply@github.com")
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
