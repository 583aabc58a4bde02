//! The GitHub client: pull requests, labels, merges and branch deletion for one repository, over
//! REST (and GraphQL for the one thing REST cannot do: mark a draft ready for review).
//!
//! octocrab carries the HTTP (rustls, timeouts, redirects, base URI); this module adds what
//! hyperloop relies on and octocrab does not give:
//! - its own `Authorization` header on every request, built from a [`Secret`]. octocrab's App
//!   mode sends the token only for relative URLs or the host `api.github.com`, and its retry
//!   layer is blind to rate limits; doing both here keeps GitHub Enterprise and the test fake on
//!   the same path as github.com;
//! - the wait-or-retry rules of [`super::retry`], with octocrab's own retry turned off;
//! - idempotence where GitHub is not: a create whose answer was lost and comes back as "already
//!   exists" is answered by looking the pull request up; a merge that "fails" because an earlier
//!   attempt succeeded reports `AlreadyMerged`;
//! - one paginated listing for all of hyperloop's pull requests, so polling many gated tasks
//!   costs a few calls, not one per task.

use std::fmt;
use std::time::Duration;

use chrono::Utc;
use http::{HeaderMap, HeaderValue, Method};
use octocrab::Octocrab;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::auth::{AuthConfig, Credentials, InstallationToken, app_jwt};
use super::budget::{Budget, Hold};
use super::retry::{Class, Decision, RetryPolicy, classify};
use super::secret::Secret;
use super::{ForgeError, MergeOutcome, NotMergeableReason, Permission, PrState, PrStatus};
use crate::config::MergeStrategy;

/// Characters left alone in a path segment or query value; everything else is percent-encoded
/// (a label like `spec:auth/login` must stay one segment).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

const PER_PAGE: usize = 100;

mod issues;
pub use issues::{BodyEdit, BranchChange, IssueState, LabelEvent, can_approve};

/// `owner/name` of the repository the client works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub owner: String,
    pub name: String,
}

impl RepoRef {
    pub fn new(owner: impl Into<String>, name: impl Into<String>) -> Self {
        RepoRef {
            owner: owner.into(),
            name: name.into(),
        }
    }

    /// Parses `owner/name` as given to `--repo` or `target.repo`.
    pub fn parse(s: &str) -> Option<RepoRef> {
        let (owner, name) = s.trim().split_once('/')?;
        let name = name.strip_suffix(".git").unwrap_or(name);
        let valid = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (valid(owner) && valid(name)).then(|| RepoRef::new(owner, name))
    }

    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

impl fmt::Display for RepoRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub retry: RetryPolicy,
    /// Head branches that belong to hyperloop; other pull requests are not its business.
    pub branch_prefix: String,
    /// Upper bound on pages one listing reads (100 pull requests each).
    pub max_list_pages: u32,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retry: RetryPolicy::default(),
            branch_prefix: "worker/".into(),
            max_list_pages: 20,
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Which credential a request presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthMode {
    /// The token, or the App's installation token.
    Repo,
    /// The App's own JWT (installation lookup and token minting).
    AppJwt,
}

struct Call<'a> {
    method: Method,
    /// Relative to the API base (`/repos/...`), or absolute (GraphQL).
    uri: String,
    body: Option<Value>,
    /// What the user would call it, for messages: "create a pull request".
    action: &'a str,
    needs: Permission,
    auth: AuthMode,
}

impl Call<'_> {
    /// Whether GitHub counts it against the secondary limit on content creation: every write,
    /// and GraphQL mutations (a GraphQL query is a POST too, but creates nothing). The App's own
    /// endpoints are counted against the App, not the repository's budget.
    fn is_content(&self) -> bool {
        if self.auth == AuthMode::AppJwt || self.method == Method::GET || self.method == Method::HEAD {
            return false;
        }
        match self
            .body
            .as_ref()
            .and_then(|b| b.get("query"))
            .and_then(Value::as_str)
        {
            Some(query) => query.trim_start().starts_with("mutation"),
            None => true,
        }
    }
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, action: &str) -> Result<T, ForgeError> {
        serde_json::from_str(&self.body).map_err(|e| ForgeError::Decode {
            action: action.to_string(),
            message: e.to_string(),
        })
    }

    /// GitHub's message with the details of its `errors` array, which is where "A pull request
    /// already exists" and "No commits between" live.
    fn message(&self) -> String {
        let Ok(v) = serde_json::from_str::<Value>(&self.body) else {
            let snippet: String = self.body.chars().take(200).collect();
            return if snippet.trim().is_empty() {
                "(no message)".into()
            } else {
                snippet
            };
        };
        let mut parts = Vec::new();
        if let Some(m) = v.get("message").and_then(Value::as_str) {
            parts.push(m.to_string());
        }
        for e in v.get("errors").and_then(Value::as_array).into_iter().flatten() {
            if let Some(m) = e.get("message").and_then(Value::as_str) {
                parts.push(m.to_string());
            } else if let Some(code) = e.get("code").and_then(Value::as_str) {
                let field = e.get("field").and_then(Value::as_str).unwrap_or("");
                parts.push(format!("{field} {code}").trim().to_string());
            } else if let Some(s) = e.as_str() {
                parts.push(s.to_string());
            }
        }
        if parts.is_empty() {
            // Not GitHub's usual shape (a proxy, a validator): show the start of it as it is.
            self.body.chars().take(200).collect()
        } else {
            parts.join("; ")
        }
    }

    fn error_codes(&self) -> Vec<String> {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("errors").and_then(Value::as_array).cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.get("code").and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    fn has_next_page(&self) -> bool {
        self.headers
            .get_all("link")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|part| part.contains("rel=\"next\"")))
    }
}

#[derive(Deserialize)]
struct PrJson {
    number: u64,
    html_url: String,
    #[serde(default)]
    node_id: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    body: Option<String>,
    state: String,
    #[serde(default)]
    draft: Option<bool>,
    #[serde(default)]
    merged: Option<bool>,
    #[serde(default)]
    merged_at: Option<String>,
    #[serde(default)]
    mergeable: Option<bool>,
    #[serde(default)]
    merge_commit_sha: Option<String>,
    #[serde(default)]
    labels: Vec<LabelJson>,
    head: RefJson,
    base: RefJson,
}

#[derive(Deserialize)]
struct RefJson {
    #[serde(rename = "ref")]
    ref_name: String,
    #[serde(default)]
    sha: String,
    #[serde(default)]
    repo: Option<RepoJson>,
}

#[derive(Deserialize)]
struct RepoJson {
    full_name: String,
}

#[derive(Deserialize)]
struct LabelJson {
    name: String,
}

impl PrJson {
    fn into_state(self) -> PrState {
        // List entries carry `merged_at` but not `merged`; the single-PR read carries both.
        let merged = self.merged.unwrap_or(self.merged_at.is_some());
        PrState {
            number: self.number,
            url: self.html_url,
            node_id: self.node_id,
            title: self.title.unwrap_or_default(),
            body: self.body.unwrap_or_default(),
            head_ref: self.head.ref_name,
            head_sha: self.head.sha,
            base_ref: self.base.ref_name,
            state: if self.state == "open" {
                PrStatus::Open
            } else {
                PrStatus::Closed
            },
            merged,
            draft: self.draft.unwrap_or(false),
            labels: self.labels.into_iter().map(|l| l.name).collect(),
            mergeable: self.mergeable,
            merge_commit_sha: if merged { self.merge_commit_sha } else { None },
        }
    }
}

/// A GitHub client bound to one repository.
pub struct GitHubClient {
    http: Octocrab,
    api_url: String,
    graphql_url: String,
    repo: RepoRef,
    credentials: Credentials,
    installation_id: Mutex<Option<u64>>,
    installation_token: Mutex<Option<InstallationToken>>,
    options: ClientOptions,
    budget: Budget,
}

impl fmt::Debug for GitHubClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubClient")
            .field("api_url", &self.api_url)
            .field("repo", &self.repo.full_name())
            .field("credentials", &self.credentials.kind())
            .finish_non_exhaustive()
    }
}

impl GitHubClient {
    /// Must be called inside a Tokio runtime, and used inside that same runtime: octocrab starts
    /// a background task there that carries every request.
    pub fn new(auth: AuthConfig, repo: RepoRef, options: ClientOptions) -> Result<GitHubClient, ForgeError> {
        let http = Octocrab::builder()
            .base_uri(auth.api_url.as_str())
            .map_err(|e| ForgeError::Credentials {
                message: format!("GITHUB_API_URL {:?} is not a URL ({e})", auth.api_url),
            })?
            // Retries are decided in `send`; see the retry module for why octocrab's are off.
            .add_retry_config(octocrab::service::middleware::retry::RetryConfig::None)
            .set_connect_timeout(Some(options.connect_timeout))
            .set_read_timeout(Some(options.read_timeout))
            .build()
            .map_err(|e| ForgeError::Unreachable {
                action: "set up the GitHub client".into(),
                attempts: 0,
                message: e.to_string(),
            })?;
        let installation_id = match &auth.credentials {
            Credentials::App { installation_id, .. } => *installation_id,
            Credentials::Token(_) => None,
        };
        Ok(GitHubClient {
            http,
            api_url: auth.api_url,
            graphql_url: auth.graphql_url,
            repo,
            credentials: auth.credentials,
            installation_id: Mutex::new(installation_id),
            installation_token: Mutex::new(None),
            options,
            budget: Budget::new(),
        })
    }

    pub fn repo(&self) -> &RepoRef {
        &self.repo
    }

    /// What this client asked of GitHub, and the pace it keeps.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// A token for git over HTTPS (the personal token, or a fresh installation token).
    pub async fn git_token(&self) -> Result<Secret, ForgeError> {
        self.token_for(AuthMode::Repo).await
    }

    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    fn repo_path(&self, rest: &str) -> String {
        format!(
            "/repos/{}/{}{}",
            encode(&self.repo.owner),
            encode(&self.repo.name),
            rest
        )
    }

    // ---------------------------------------------------------------- pull requests

    /// Every pull request whose head is a hyperloop branch in this repository (not a fork),
    /// most recently updated first, open or closed. One paginated listing: 100 per call.
    pub async fn list_hyperloop_prs(&self) -> Result<Vec<PrState>, ForgeError> {
        self.list_prs_until(&[]).await
    }

    /// Like [`Self::list_hyperloop_prs`], but stops paging as soon as every number in `wanted`
    /// has been seen. Pull requests being waited on are usually the recently updated ones, so
    /// this reads one page where the full history would take many.
    pub async fn list_hyperloop_prs_covering(&self, wanted: &[u64]) -> Result<Vec<PrState>, ForgeError> {
        self.list_prs_until(wanted).await
    }

    /// The pull requests numbered in `wanted` (and whatever else of hyperloop's shares their
    /// pages), reading no page at all when nothing is wanted: a step whose tasks have no pull
    /// request yet has nothing to learn from GitHub.
    pub async fn list_wanted_prs(&self, wanted: &[u64]) -> Result<Vec<PrState>, ForgeError> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        self.list_prs_until(wanted).await
    }

    async fn list_prs_until(&self, wanted: &[u64]) -> Result<Vec<PrState>, ForgeError> {
        let mut out = Vec::new();
        let mut missing: Vec<u64> = wanted.to_vec();
        for page in 1..=self.options.max_list_pages.max(1) {
            // Pages are requested by number on a relative path rather than by following the
            // absolute `next` URL, which would leave the API base (and its authentication) behind
            // on GitHub Enterprise and local servers.
            let uri = self.repo_path(&format!(
                "/pulls?state=all&sort=updated&direction=desc&per_page={PER_PAGE}&page={page}"
            ));
            let reply = self
                .send_ok(Call {
                    method: Method::GET,
                    uri,
                    body: None,
                    action: "list pull requests",
                    needs: Permission::PullRequestsRead,
                    auth: AuthMode::Repo,
                })
                .await?;
            let items: Vec<PrJson> = reply.json("list pull requests")?;
            let count = items.len();
            for pr in items {
                missing.retain(|n| *n != pr.number);
                if self.is_ours(&pr) {
                    out.push(pr.into_state());
                }
            }
            let done_early = !wanted.is_empty() && missing.is_empty();
            if done_early || count < PER_PAGE || !reply.has_next_page() {
                break;
            }
        }
        Ok(out)
    }

    fn is_ours(&self, pr: &PrJson) -> bool {
        // A fork can name its branch `worker/x` too; only branches of this repository count.
        let same_repo = pr
            .head
            .repo
            .as_ref()
            .is_some_and(|r| r.full_name.eq_ignore_ascii_case(&self.repo.full_name()));
        same_repo && pr.head.ref_name.starts_with(&self.options.branch_prefix)
    }

    /// The pull request whose head is `branch` of this repository: the open one if there is
    /// one, else the most recent.
    pub async fn find_pr_for_branch(&self, branch: &str) -> Result<Option<PrState>, ForgeError> {
        // GitHub ignores a `head` filter without the `owner:` prefix and returns everything.
        let head = format!("{}:{}", self.repo.owner, branch);
        let uri = self.repo_path(&format!(
            "/pulls?state=all&head={}&per_page={PER_PAGE}",
            encode(&head)
        ));
        let reply = self
            .send_ok(Call {
                method: Method::GET,
                uri,
                body: None,
                action: "look up a pull request",
                needs: Permission::PullRequestsRead,
                auth: AuthMode::Repo,
            })
            .await?;
        let items: Vec<PrJson> = reply.json("look up a pull request")?;
        let mut found: Vec<PrState> = items
            .into_iter()
            .filter(|pr| {
                pr.head.ref_name == branch
                    && pr
                        .head
                        .repo
                        .as_ref()
                        .is_some_and(|r| r.full_name.eq_ignore_ascii_case(&self.repo.full_name()))
            })
            .map(PrJson::into_state)
            .collect();
        if let Some(i) = found.iter().position(PrState::is_open) {
            return Ok(Some(found.swap_remove(i)));
        }
        Ok(found.into_iter().next())
    }

    pub async fn get_pr(&self, number: u64) -> Result<PrState, ForgeError> {
        let reply = self
            .send_ok(Call {
                method: Method::GET,
                uri: self.repo_path(&format!("/pulls/{number}")),
                body: None,
                action: "read a pull request",
                needs: Permission::PullRequestsRead,
                auth: AuthMode::Repo,
            })
            .await?;
        Ok(reply.json::<PrJson>("read a pull request")?.into_state())
    }

    /// Opens a draft pull request from `branch` into `base`, or returns the existing one: an
    /// open pull request for the branch is reused, and so is a merged one (its work is on the
    /// base already; a second pull request would bring it twice). A closed, unmerged one is left
    /// alone and a new pull request is opened.
    pub async fn create_draft_pr(
        &self,
        branch: &str,
        base: &str,
        title: &str,
        body: &str,
    ) -> Result<PrState, ForgeError> {
        if let Some(pr) = self.find_pr_for_branch(branch).await?
            && (pr.is_open() || pr.merged)
        {
            return Ok(pr);
        }
        self.open_draft_pr(branch, base, title, body).await
    }

    /// Opens a draft pull request without looking for an existing one first: for a caller that
    /// knows there is none open (its listing of this step shows none for the branch). One
    /// request; should there be one after all, GitHub's "already exists" is answered by the
    /// lookup.
    pub async fn open_draft_pr(
        &self,
        branch: &str,
        base: &str,
        title: &str,
        body: &str,
    ) -> Result<PrState, ForgeError> {
        let action = "create a pull request";
        let reply = self
            .send(Call {
                method: Method::POST,
                uri: self.repo_path("/pulls"),
                body: Some(json!({
                    "title": title,
                    "head": branch,
                    "base": base,
                    "body": body,
                    "draft": true,
                    "maintainer_can_modify": false,
                })),
                action,
                needs: Permission::PullRequestsWrite,
                auth: AuthMode::Repo,
            })
            .await?;
        if reply.is_success() {
            return Ok(reply.json::<PrJson>(action)?.into_state());
        }
        if reply.status == 422 {
            let message = reply.message();
            // Also the answer to a create that succeeded but whose answer was lost and retried.
            if message.contains("already exists")
                && let Some(pr) = self.find_pr_for_branch(branch).await?
            {
                return Ok(pr);
            }
            if message.contains("No commits between") {
                return Err(ForgeError::NoCommits {
                    head: branch.to_string(),
                    base: base.to_string(),
                });
            }
        }
        Err(self.refusal(&reply, action, Permission::PullRequestsWrite))
    }

    pub async fn update_pr_body(&self, number: u64, body: &str) -> Result<PrState, ForgeError> {
        let reply = self
            .send_ok(Call {
                method: Method::PATCH,
                uri: self.repo_path(&format!("/pulls/{number}")),
                body: Some(json!({ "body": body })),
                action: "update a pull request",
                needs: Permission::PullRequestsWrite,
                auth: AuthMode::Repo,
            })
            .await?;
        Ok(reply.json::<PrJson>("update a pull request")?.into_state())
    }

    /// Marks a draft ready for review. Returns whether it was a draft. Costs one read to find
    /// the GraphQL id; use [`Self::mark_ready_by_node_id`] when a [`PrState`] is at hand.
    pub async fn mark_ready(&self, number: u64) -> Result<bool, ForgeError> {
        let pr = self.get_pr(number).await?;
        if !pr.draft {
            return Ok(false);
        }
        self.mark_ready_by_node_id(&pr.node_id).await?;
        Ok(true)
    }

    /// REST cannot undraft a pull request; GraphQL's `markPullRequestReadyForReview` can.
    pub async fn mark_ready_by_node_id(&self, node_id: &str) -> Result<(), ForgeError> {
        let action = "mark a pull request ready for review";
        let query = "mutation($id: ID!) { markPullRequestReadyForReview(input: {pullRequestId: $id}) { pullRequest { number isDraft } } }";
        self.graphql_mutation(action, json!({ "query": query, "variables": { "id": node_id } }))
            .await
    }

    /// Sends a GraphQL mutation; GitHub answers errors with 200 and an `errors` array.
    async fn graphql_mutation(&self, action: &str, request: Value) -> Result<(), ForgeError> {
        let reply = self
            .send_ok(Call {
                method: Method::POST,
                uri: self.graphql_url.clone(),
                body: Some(request),
                action,
                needs: Permission::PullRequestsWrite,
                auth: AuthMode::Repo,
            })
            .await?;
        let v: Value = reply.json(action)?;
        if let Some(errors) = v.get("errors").and_then(Value::as_array)
            && !errors.is_empty()
        {
            let message = errors
                .iter()
                .filter_map(|e| e.get("message").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("; ");
            let forbidden = errors.iter().any(|e| {
                matches!(
                    e.get("type").and_then(Value::as_str),
                    Some("FORBIDDEN" | "INSUFFICIENT_SCOPES")
                )
            });
            return Err(if forbidden {
                ForgeError::Permission {
                    action: action.into(),
                    status: 403,
                    message,
                    needs: Permission::PullRequestsWrite,
                }
            } else {
                ForgeError::Api {
                    action: action.into(),
                    status: reply.status,
                    message,
                }
            });
        }
        Ok(())
    }

    /// Marks a draft ready for review and, when `body` is given, replaces its description: one
    /// GraphQL request doing the work of a PATCH and the ready mutation.
    pub async fn ready_with_body(&self, node_id: &str, body: Option<&str>) -> Result<(), ForgeError> {
        let Some(body) = body else {
            return self.mark_ready_by_node_id(node_id).await;
        };
        let action = "mark a pull request ready for review";
        let query = "mutation($id: ID!, $body: String!) { \
            body: updatePullRequest(input: {pullRequestId: $id, body: $body}) { pullRequest { number } } \
            ready: markPullRequestReadyForReview(input: {pullRequestId: $id}) { pullRequest { number isDraft } } }";
        self.graphql_mutation(
            action,
            json!({ "query": query, "variables": { "id": node_id, "body": body } }),
        )
        .await
    }

    /// The checks of the pull requests numbered `numbers` (their heads' check runs and commit
    /// statuses) and what their base branch requires: one GraphQL query for all of them.
    pub async fn pr_checks(&self, numbers: &[u64]) -> Result<Vec<super::checks::PrChecks>, ForgeError> {
        if numbers.is_empty() {
            return Ok(Vec::new());
        }
        let action = "read the checks of pull requests";
        let reply = self
            .send_ok(Call {
                method: Method::POST,
                uri: self.graphql_url.clone(),
                body: Some(json!({
                    "query": super::checks::query(numbers),
                    "variables": { "owner": self.repo.owner, "name": self.repo.name },
                })),
                action,
                needs: Permission::PullRequestsRead,
                auth: AuthMode::Repo,
            })
            .await?;
        let v: Value = reply.json(action)?;
        if v.get("data").is_none_or(Value::is_null) {
            let message = v
                .get("errors")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|e| e.get("message").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ForgeError::Api {
                action: action.into(),
                status: reply.status,
                message,
            });
        }
        Ok(super::checks::parse(&v, numbers))
    }

    /// Whether the repository deletes head branches itself after a merge ("Automatically delete
    /// head branches"), so that hyperloop need not.
    pub async fn deletes_branch_on_merge(&self) -> Result<bool, ForgeError> {
        let action = "read the repository's settings";
        let reply = self
            .send_ok(Call {
                method: Method::GET,
                uri: self.repo_path(""),
                body: None,
                action,
                needs: Permission::MetadataRead,
                auth: AuthMode::Repo,
            })
            .await?;
        #[derive(Deserialize)]
        struct RepoSettings {
            #[serde(default)]
            delete_branch_on_merge: bool,
        }
        Ok(reply.json::<RepoSettings>(action)?.delete_branch_on_merge)
    }

    /// Merges through the API. The commit title and message (with its trailers) are used as
    /// given. A refusal comes back as `NotMergeable` with the reason, after one read of the pull
    /// request to tell "already merged" (e.g. by an earlier attempt whose answer was lost) from
    /// a draft, a closed pull request, a moved head or a blocked merge.
    pub async fn merge_pr(
        &self,
        number: u64,
        method: MergeStrategy,
        commit_title: &str,
        commit_message: &str,
    ) -> Result<MergeOutcome, ForgeError> {
        self.merge_pr_at(number, method, commit_title, commit_message, None)
            .await
    }

    /// [`Self::merge_pr`], refusing (409, `HeadModified`) if the head is no longer `head_sha` —
    /// so that only the commits that were verified get merged.
    pub async fn merge_pr_at(
        &self,
        number: u64,
        method: MergeStrategy,
        commit_title: &str,
        commit_message: &str,
        head_sha: Option<&str>,
    ) -> Result<MergeOutcome, ForgeError> {
        let action = "merge a pull request";
        let mut body = json!({
            "merge_method": match method {
                MergeStrategy::Squash => "squash",
                MergeStrategy::Merge => "merge",
            },
            "commit_title": commit_title,
            "commit_message": commit_message,
        });
        if let (Some(sha), Some(obj)) = (head_sha, body.as_object_mut()) {
            obj.insert("sha".into(), Value::String(sha.to_string()));
        }
        let reply = self
            .send(Call {
                method: Method::PUT,
                uri: self.repo_path(&format!("/pulls/{number}/merge")),
                body: Some(body),
                action,
                needs: Permission::ContentsWrite,
                auth: AuthMode::Repo,
            })
            .await?;
        if reply.is_success() {
            #[derive(Deserialize)]
            struct Merged {
                sha: String,
            }
            let merged: Merged = reply.json(action)?;
            return Ok(MergeOutcome::Merged { sha: merged.sha });
        }
        if matches!(reply.status, 405 | 409 | 422) {
            let message = reply.message();
            let pr = self.get_pr(number).await?;
            if pr.merged {
                return Ok(MergeOutcome::AlreadyMerged {
                    sha: pr.merge_commit_sha,
                });
            }
            let reason = if !pr.is_open() {
                NotMergeableReason::Closed
            } else if pr.draft {
                NotMergeableReason::Draft
            } else if reply.status == 409 {
                NotMergeableReason::HeadModified
            } else {
                NotMergeableReason::Blocked
            };
            return Ok(MergeOutcome::NotMergeable { reason, message });
        }
        Err(self.refusal(&reply, action, Permission::ContentsWrite))
    }

    /// Asks GitHub to bring the base branch into the pull request's head. `false` when GitHub
    /// declines (422: conflicts, or nothing to update).
    pub async fn update_branch(&self, number: u64) -> Result<bool, ForgeError> {
        let action = "update a pull request's branch";
        let reply = self
            .send(Call {
                method: Method::PUT,
                uri: self.repo_path(&format!("/pulls/{number}/update-branch")),
                body: Some(json!({})),
                action,
                needs: Permission::ContentsWrite,
                auth: AuthMode::Repo,
            })
            .await?;
        match reply.status {
            200..=299 => Ok(true),
            422 => Ok(false),
            _ => Err(self.refusal(&reply, action, Permission::ContentsWrite)),
        }
    }

    // ---------------------------------------------------------------- branches

    /// Deletes `branch` on GitHub. `false` when it was already gone.
    pub async fn delete_branch(&self, branch: &str) -> Result<bool, ForgeError> {
        let action = "delete a branch";
        let path = branch.split('/').map(encode).collect::<Vec<_>>().join("/");
        let reply = self
            .send(Call {
                method: Method::DELETE,
                uri: self.repo_path(&format!("/git/refs/heads/{path}")),
                body: None,
                action,
                needs: Permission::ContentsWrite,
                auth: AuthMode::Repo,
            })
            .await?;
        match reply.status {
            200..=299 => Ok(true),
            // 422 "Reference does not exist"; 404 on some GitHub versions.
            404 | 422 => Ok(false),
            _ => Err(self.refusal(&reply, action, Permission::ContentsWrite)),
        }
    }

    // ---------------------------------------------------------------- labels

    /// Creates each label in `names` that the repository does not have yet.
    pub async fn ensure_labels(&self, names: &[&str]) -> Result<Vec<String>, ForgeError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let existing = self.list_labels().await?;
        let mut created = Vec::new();
        for name in names {
            if existing.iter().any(|e| e.eq_ignore_ascii_case(name))
                || created.iter().any(|c: &String| c.eq_ignore_ascii_case(name))
            {
                continue;
            }
            let action = "create a label";
            let reply = self
                .send(Call {
                    method: Method::POST,
                    uri: self.repo_path("/labels"),
                    body: Some(json!({
                        "name": name,
                        "color": label_color(name),
                        "description": label_description(name),
                    })),
                    action,
                    needs: Permission::IssuesWrite,
                    auth: AuthMode::Repo,
                })
                .await?;
            if reply.is_success() {
                created.push((*name).to_string());
            } else if reply.status == 422 && reply.error_codes().iter().any(|c| c == "already_exists") {
                // Made meanwhile by someone else, or by a retried request of ours.
            } else {
                return Err(self.refusal(&reply, action, Permission::IssuesWrite));
            }
        }
        Ok(created)
    }

    async fn list_labels(&self) -> Result<Vec<String>, ForgeError> {
        let mut out = Vec::new();
        for page in 1..=self.options.max_list_pages.max(1) {
            let reply = self
                .send_ok(Call {
                    method: Method::GET,
                    uri: self.repo_path(&format!("/labels?per_page={PER_PAGE}&page={page}")),
                    body: None,
                    action: "list labels",
                    needs: Permission::MetadataRead,
                    auth: AuthMode::Repo,
                })
                .await?;
            let items: Vec<LabelJson> = reply.json("list labels")?;
            let count = items.len();
            out.extend(items.into_iter().map(|l| l.name));
            if count < PER_PAGE || !reply.has_next_page() {
                break;
            }
        }
        Ok(out)
    }

    /// Adds labels to a pull request; returns all its labels afterwards.
    pub async fn add_labels(&self, number: u64, labels: &[&str]) -> Result<Vec<String>, ForgeError> {
        let reply = self
            .send_ok(Call {
                method: Method::POST,
                uri: self.repo_path(&format!("/issues/{number}/labels")),
                body: Some(json!({ "labels": labels })),
                action: "label a pull request",
                needs: Permission::IssuesWrite,
                auth: AuthMode::Repo,
            })
            .await?;
        let items: Vec<LabelJson> = reply.json("label a pull request")?;
        Ok(items.into_iter().map(|l| l.name).collect())
    }

    /// Removes a label from a pull request. `false` when it did not have it.
    pub async fn remove_label(&self, number: u64, label: &str) -> Result<bool, ForgeError> {
        let action = "remove a label from a pull request";
        let reply = self
            .send(Call {
                method: Method::DELETE,
                uri: self.repo_path(&format!("/issues/{number}/labels/{}", encode(label))),
                body: None,
                action,
                needs: Permission::IssuesWrite,
                auth: AuthMode::Repo,
            })
            .await?;
        match reply.status {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(self.refusal(&reply, action, Permission::IssuesWrite)),
        }
    }

    /// Learns GitHub's clock and primary budget from `GET /rate_limit`, which GitHub does not
    /// count against any limit.
    pub async fn sync_clock(&self) -> Result<(), ForgeError> {
        self.send_ok(Call {
            method: Method::GET,
            uri: "/rate_limit".into(),
            body: None,
            action: "read the rate limit",
            needs: Permission::MetadataRead,
            auth: AuthMode::Repo,
        })
        .await
        .map(|_| ())
    }

    // ---------------------------------------------------------------- transport

    /// The error for an answer the operation cannot use.
    fn refusal(&self, reply: &Reply, action: &str, needs: Permission) -> ForgeError {
        let message = reply.message();
        match reply.status {
            401 | 403 => ForgeError::Permission {
                action: action.to_string(),
                status: reply.status,
                message,
                needs,
            },
            status => ForgeError::Api {
                action: action.to_string(),
                status,
                message,
            },
        }
    }

    /// [`Self::send`], treating anything but 2xx as an error.
    async fn send_ok(&self, call: Call<'_>) -> Result<Reply, ForgeError> {
        let action = call.action;
        let needs = call.needs;
        let reply = self.send(call).await?;
        if reply.is_success() {
            Ok(reply)
        } else {
            Err(self.refusal(&reply, action, needs))
        }
    }

    /// Sends one logical request: authenticates, retries transient failures, waits out short
    /// rate limits, and for an App replaces a rejected installation token once.
    async fn send(&self, call: Call<'_>) -> Result<Reply, ForgeError> {
        let mut replaced_token = false;
        loop {
            let token = self.token_for(call.auth).await?;
            let reply = self.send_with(&call, &token).await?;
            let installation =
                matches!(self.credentials, Credentials::App { .. }) && call.auth == AuthMode::Repo;
            if reply.status == 401 && installation && !replaced_token {
                // Revoked or expired early: mint a new one and try once more.
                *self.installation_token.lock().await = None;
                replaced_token = true;
                continue;
            }
            return Ok(reply);
        }
    }

    /// The retry loop for one request with one credential.
    async fn send_with(&self, call: &Call<'_>, token: &Secret) -> Result<Reply, ForgeError> {
        let policy = &self.options.retry;
        let content = call.is_content();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut continue_after_sync = false;
            // Every attempt is a request for GitHub, so every attempt asks the budget.
            match self.budget.admit(content, Utc::now()) {
                Ok(()) => {}
                Err(Hold::Blocked(retry_at)) => {
                    return Err(ForgeError::RateLimited {
                        action: call.action.to_string(),
                        retry_at,
                    });
                }
                Err(Hold::Paced(until)) => {
                    // The pace may only look spent because this process has not heard GitHub's
                    // clock yet (its estimate is an earlier step's). `GET /rate_limit` costs
                    // nothing against any limit and tells it; then ask once more.
                    if !self.budget.clock_observed() && Box::pin(self.sync_clock()).await.is_ok() {
                        continue_after_sync = true;
                    }
                    if !continue_after_sync {
                        return Err(ForgeError::Paced {
                            action: call.action.to_string(),
                            until,
                        });
                    }
                    match self.budget.admit(content, Utc::now()) {
                        Ok(()) => {}
                        Err(Hold::Paced(until)) => {
                            return Err(ForgeError::Paced {
                                action: call.action.to_string(),
                                until,
                            });
                        }
                        Err(Hold::Blocked(retry_at)) => {
                            return Err(ForgeError::RateLimited {
                                action: call.action.to_string(),
                                retry_at,
                            });
                        }
                    }
                }
            }
            let (class, outcome) = match self.send_once(call, token).await {
                Ok(reply) => {
                    self.budget.observe(&reply.headers, Utc::now());
                    (
                        classify(reply.status, &reply.headers, &reply.body, Utc::now()),
                        Ok(reply),
                    )
                }
                Err(message) => (Class::Transient { after: None }, Err(message)),
            };
            let mut decision = policy.decide(&class, attempt, Utc::now());
            if let Class::RateLimited { retry_at } = class {
                self.budget.refused(retry_at);
                // A write that hit a limit is not sent again in this step: GitHub counts
                // repeated violations against the integration, and the next step (after
                // `retry_at`, which the budget now enforces) makes it again.
                if content {
                    decision = Decision::GiveUpRateLimited { retry_at };
                }
            }
            match decision {
                Decision::Return => {
                    // `Return` only follows a real answer.
                    return outcome.map_err(|message| ForgeError::Unreachable {
                        action: call.action.to_string(),
                        attempts: attempt,
                        message,
                    });
                }
                Decision::Sleep(wait) => {
                    let status = outcome.as_ref().map(|r| r.status).unwrap_or(0);
                    tracing::warn!(
                        event = "github_retry",
                        action = call.action,
                        status,
                        attempt,
                        wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "GitHub request will be retried"
                    );
                    tokio::time::sleep(wait).await;
                }
                Decision::GiveUpRateLimited { retry_at } => {
                    return Err(ForgeError::RateLimited {
                        action: call.action.to_string(),
                        retry_at,
                    });
                }
                Decision::GiveUpUnreachable => {
                    let message = match outcome {
                        Ok(reply) => format!("last answer {}: {}", reply.status, reply.message()),
                        Err(message) => message,
                    };
                    return Err(ForgeError::Unreachable {
                        action: call.action.to_string(),
                        attempts: attempt,
                        message,
                    });
                }
            }
        }
    }

    /// One HTTP exchange. A transport failure comes back as its message.
    async fn send_once(&self, call: &Call<'_>, token: &Secret) -> Result<Reply, String> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| "the token contains characters not allowed in a header".to_string())?;
        auth.set_sensitive(true);
        let builder = http::Request::builder()
            .method(call.method.clone())
            .uri(call.uri.as_str())
            .header(http::header::AUTHORIZATION, auth)
            .header(http::header::ACCEPT, "application/vnd.github+json")
            .header(
                http::header::USER_AGENT,
                concat!("hyperloop/", env!("CARGO_PKG_VERSION")),
            );
        let request = self
            .http
            .build_request(builder, call.body.as_ref())
            .map_err(|e| format!("could not build the request: {e}"))?;
        let response = self.http.execute(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = self
            .http
            .body_to_string(response)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    async fn token_for(&self, mode: AuthMode) -> Result<Secret, ForgeError> {
        match (&self.credentials, mode) {
            (Credentials::Token(t), _) => Ok(t.clone()),
            (Credentials::App { app_id, key, .. }, AuthMode::AppJwt) => app_jwt(*app_id, key, Utc::now()),
            (Credentials::App { app_id, key, .. }, AuthMode::Repo) => {
                // Held while minting so that concurrent requests wait for one new token
                // instead of each minting their own.
                let mut cached = self.installation_token.lock().await;
                if let Some(t) = cached.as_ref()
                    && t.is_fresh(Utc::now())
                {
                    return Ok(t.token.clone());
                }
                let jwt = app_jwt(*app_id, key, Utc::now())?;
                let id = self.installation_id(&jwt).await?;
                let action = "mint an installation token";
                let call = Call {
                    method: Method::POST,
                    uri: format!("/app/installations/{id}/access_tokens"),
                    body: None,
                    action,
                    needs: Permission::AppJwt,
                    auth: AuthMode::AppJwt,
                };
                let reply = self.send_with(&call, &jwt).await?;
                if !reply.is_success() {
                    return Err(self.refusal(&reply, action, Permission::AppJwt));
                }
                let fresh = InstallationToken::from_response(&reply.body)?;
                tracing::debug!(
                    event = "github_app_token",
                    installation_id = id,
                    expires_at = %fresh.expires_at,
                    "minted an installation token"
                );
                let token = fresh.token.clone();
                *cached = Some(fresh);
                Ok(token)
            }
        }
    }

    async fn installation_id(&self, jwt: &Secret) -> Result<u64, ForgeError> {
        let mut known = self.installation_id.lock().await;
        if let Some(id) = *known {
            return Ok(id);
        }
        let action = "find the GitHub App's installation on the repository";
        let call = Call {
            method: Method::GET,
            uri: self.repo_path("/installation"),
            body: None,
            action,
            needs: Permission::AppJwt,
            auth: AuthMode::AppJwt,
        };
        let reply = self.send_with(&call, jwt).await?;
        if !reply.is_success() {
            let mut e = self.refusal(&reply, action, Permission::AppJwt);
            if reply.status == 404 {
                e = ForgeError::Credentials {
                    message: format!("the GitHub App is not installed on {}", self.repo),
                };
            }
            return Err(e);
        }
        #[derive(Deserialize)]
        struct Installation {
            id: u64,
        }
        let id = reply.json::<Installation>(action)?.id;
        *known = Some(id);
        Ok(id)
    }
}

fn encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

fn label_color(name: &str) -> &'static str {
    if name == "lgtm" {
        "0e8a16"
    } else if name.starts_with("task:") {
        "c5def5"
    } else if name.starts_with("spec:") {
        "fef2c0"
    } else {
        "ededed"
    }
}

fn label_description(name: &str) -> &'static str {
    if name == "lgtm" {
        "Approves the gate a hyperloop task waits at"
    } else if name.starts_with("task:") {
        "The hyperloop task this pull request carries"
    } else if name.starts_with("spec:") {
        "The spec the hyperloop task implements"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ref_parsing() {
        assert_eq!(
            RepoRef::parse("acme/widgets"),
            Some(RepoRef::new("acme", "widgets"))
        );
        assert_eq!(
            RepoRef::parse("acme/widgets.git"),
            Some(RepoRef::new("acme", "widgets"))
        );
        assert_eq!(RepoRef::parse("acme"), None);
        assert_eq!(RepoRef::parse("/widgets"), None);
        assert_eq!(RepoRef::parse("a/b/c"), None);
    }

    #[test]
    fn labels_with_slashes_stay_one_segment() {
        assert_eq!(encode("spec:auth/login"), "spec%3Aauth%2Flogin");
        assert_eq!(encode("task:t-1_a.b"), "task%3At-1_a.b");
    }

    fn reply(status: u16, body: &str, link: Option<&str>) -> Reply {
        let mut headers = HeaderMap::new();
        if let Some(l) = link {
            headers.insert("link", HeaderValue::from_str(l).expect("header"));
        }
        Reply {
            status,
            headers,
            body: body.into(),
        }
    }

    #[test]
    fn messages_include_the_errors_array() {
        let r = reply(
            422,
            r#"{"message":"Validation Failed","errors":[{"resource":"PullRequest","code":"custom","message":"A pull request already exists for o:worker/a."}]}"#,
            None,
        );
        assert_eq!(
            r.message(),
            "Validation Failed; A pull request already exists for o:worker/a."
        );
        let r = reply(
            422,
            r#"{"message":"Validation Failed","errors":[{"resource":"Label","code":"already_exists","field":"name"}]}"#,
            None,
        );
        assert_eq!(r.error_codes(), vec!["already_exists".to_string()]);
        assert_eq!(r.message(), "Validation Failed; name already_exists");
    }

    #[test]
    fn next_page_from_link_header() {
        let r = reply(
            200,
            "[]",
            Some(
                r#"<https://api.github.com/repos/o/r/pulls?page=2>; rel="next", <https://api.github.com/repos/o/r/pulls?page=5>; rel="last""#,
            ),
        );
        assert!(r.has_next_page());
        let r = reply(
            200,
            "[]",
            Some(r#"<https://api.github.com/repos/o/r/pulls?page=1>; rel="prev""#),
        );
        assert!(!r.has_next_page());
    }
}
