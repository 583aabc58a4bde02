//! The forge: where pull requests, labels and merges live. This module owns the types the rest of
//! hyperloop sees — a pull request's state as one listing reports it, the outcome of a merge, and
//! a typed error for everything GitHub can refuse — so that callers decide on facts ("not
//! mergeable because it is a draft", "rate limited until 12:03") rather than on HTTP status
//! codes. The GitHub client itself lives in [`github`], its credentials in [`auth`], the
//! wait-or-retry rules in [`retry`].

pub mod auth;
pub mod budget;
pub mod checks;
pub mod github;
pub mod retry;
pub mod secret;

use std::fmt;

use chrono::{DateTime, Utc};

pub use auth::{AuthConfig, Credentials};
pub use github::{ClientOptions, GitHubClient, IssueState, RepoRef};
pub use retry::RetryPolicy;
pub use secret::Secret;

/// Whether a pull request is open. Merged pull requests are closed and have `merged` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrStatus {
    Open,
    Closed,
}

impl PrStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PrStatus::Open => "open",
            PrStatus::Closed => "closed",
        }
    }
}

/// A pull request as hyperloop needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrState {
    pub number: u64,
    /// The page people open (`html_url`); this is what a task file records as `pr`.
    pub url: String,
    /// GraphQL id, needed to mark the pull request ready for review.
    pub node_id: String,
    pub title: String,
    /// The description as GitHub has it (empty when it has none).
    pub body: String,
    pub head_ref: String,
    pub head_sha: String,
    pub base_ref: String,
    pub state: PrStatus,
    pub merged: bool,
    pub draft: bool,
    pub labels: Vec<String>,
    /// Only a single-PR read carries this, and GitHub may still be computing it (`None`).
    pub mergeable: Option<bool>,
    pub merge_commit_sha: Option<String>,
}

impl PrState {
    pub fn has_label(&self, name: &str) -> bool {
        self.labels.iter().any(|l| l == name)
    }

    pub fn is_open(&self) -> bool {
        self.state == PrStatus::Open
    }
}

/// Why GitHub would not merge a pull request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotMergeableReason {
    /// Drafts cannot be merged; mark the pull request ready first.
    Draft,
    /// The pull request was closed without being merged.
    Closed,
    /// The head branch moved while merging (409); read it again and retry.
    HeadModified,
    /// Conflicts with the base branch, failing required checks or reviews, or branch protection.
    Blocked,
}

impl fmt::Display for NotMergeableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotMergeableReason::Draft => "the pull request is a draft",
            NotMergeableReason::Closed => "the pull request is closed",
            NotMergeableReason::HeadModified => "the head branch changed during the merge",
            NotMergeableReason::Blocked => {
                "GitHub reports it not mergeable (conflicts, checks or branch protection)"
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeOutcome {
    Merged {
        sha: String,
    },
    NotMergeable {
        reason: NotMergeableReason,
        /// GitHub's own words.
        message: String,
    },
    /// Someone (or an earlier attempt whose answer was lost) merged it already.
    AlreadyMerged {
        sha: Option<String>,
    },
}

/// A repository permission an operation needs; named in the hint of a 401/403 error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    MetadataRead,
    ContentsWrite,
    PullRequestsRead,
    PullRequestsWrite,
    IssuesWrite,
    /// The App's own endpoints (installation lookup, token minting): the JWT, not a permission.
    AppJwt,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::MetadataRead => "metadata: read",
            Permission::ContentsWrite => "contents: write",
            Permission::PullRequestsRead => "pull-requests: read",
            Permission::PullRequestsWrite => "pull-requests: write",
            Permission::IssuesWrite => "issues: write",
            Permission::AppJwt => "a valid GitHub App id and private key",
        }
    }
}

/// Everything that can go wrong talking to the forge, typed so a caller can tell "wait" from
/// "fix your token" from "nothing to do".
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    #[error("GitHub rate limit reached while trying to {action}; it resets at {retry_at}")]
    RateLimited { action: String, retry_at: DateTime<Utc> },
    /// Not sent: it would take hyperloop over its pace of content-creating requests.
    #[error("held back to stay under GitHub's secondary rate limits: {action} can go at {until}")]
    Paced { action: String, until: DateTime<Utc> },
    #[error("GitHub refused to {action} ({status}): {message}")]
    Permission {
        action: String,
        status: u16,
        message: String,
        needs: Permission,
    },
    #[error("no commits between {base} and {head}: there is nothing to open a pull request for")]
    NoCommits { head: String, base: String },
    #[error("GitHub answered {status} when trying to {action}: {message}")]
    Api {
        action: String,
        status: u16,
        message: String,
    },
    #[error("could not reach GitHub to {action} after {attempts} attempts: {message}")]
    Unreachable {
        action: String,
        attempts: u32,
        message: String,
    },
    #[error("GitHub's answer to {action} was not understood: {message}")]
    Decode { action: String, message: String },
    #[error("GitHub credentials: {message}")]
    Credentials { message: String },
}

impl ForgeError {
    /// What the user can do about it, when there is something.
    pub fn hint(&self) -> Option<String> {
        match self {
            ForgeError::Permission {
                status: 401,
                needs: Permission::AppJwt,
                ..
            } => Some(
                "check HYPERLOOP_APP_ID and HYPERLOOP_APP_PRIVATE_KEY, and that the App is installed on the repository"
                    .into(),
            ),
            ForgeError::Permission { status: 401, .. } => Some(
                "the token was rejected: check that GITHUB_TOKEN / GH_TOKEN is set, current and not expired"
                    .into(),
            ),
            ForgeError::Permission { needs, .. } => Some(format!(
                "the token likely lacks `{}` on this repository (a workflow grants it under `permissions:`; a GitHub App or fine-grained token in its repository permissions)",
                needs.as_str()
            )),
            ForgeError::RateLimited { .. } | ForgeError::Paced { .. } => Some(
                "the next step after the reset continues where this one stopped".into(),
            ),
            ForgeError::NoCommits { head, .. } => Some(format!(
                "push commits to {head} first; an empty branch cannot have a pull request"
            )),
            ForgeError::Credentials { .. } => Some(
                "set GITHUB_TOKEN (or GH_TOKEN), or HYPERLOOP_APP_ID and HYPERLOOP_APP_PRIVATE_KEY"
                    .into(),
            ),
            _ => None,
        }
    }

    /// Whether a later step may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ForgeError::RateLimited { .. } | ForgeError::Paced { .. } | ForgeError::Unreachable { .. }
        )
    }

    /// A rate limit, hit or avoided: the write waits for a later step.
    pub fn is_rate_limit(&self) -> bool {
        matches!(self, ForgeError::RateLimited { .. } | ForgeError::Paced { .. })
    }
}

impl From<ForgeError> for crate::Error {
    fn from(e: ForgeError) -> Self {
        let message = match e.hint() {
            Some(h) => format!("{e}\n  hint: {h}"),
            None => e.to_string(),
        };
        match e {
            ForgeError::RateLimited { retry_at, .. } | ForgeError::Paced { until: retry_at, .. } => {
                crate::Error::RateLimited { message, retry_at }
            }
            _ => crate::Error::Other { message },
        }
    }
}
