//! Issues, issue events, collaborators and push activity: what trusted gates and the dashboard
//! issue need from GitHub. Kept apart from the pull-request half of the client; every request
//! goes through the same `send` (authentication, retries, the budget).

use chrono::{DateTime, Utc};
use http::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AuthMode, Call, GitHubClient, PER_PAGE, encode};
use crate::forge::{ForgeError, Permission};

/// Who added a label to an issue or pull request, and when (GitHub's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelEvent {
    pub actor: String,
    pub at: DateTime<Utc>,
}

/// The latest change of a branch GitHub knows of: a push, a force push, its creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchChange {
    pub after: String,
    pub at: DateTime<Utc>,
}

/// An issue as the dashboard needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueState {
    pub number: u64,
    pub url: String,
    pub body: String,
    pub open: bool,
    pub labels: Vec<String>,
}

/// The last edit of an issue's body: who made it, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyEdit {
    pub editor: String,
    pub at: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct ActorJson {
    login: String,
}

#[derive(Deserialize)]
struct EventJson {
    event: String,
    #[serde(default)]
    actor: Option<ActorJson>,
    created_at: DateTime<Utc>,
    #[serde(default)]
    label: Option<NameJson>,
}

#[derive(Deserialize)]
struct NameJson {
    name: String,
}

#[derive(Deserialize)]
struct IssueJson {
    number: u64,
    html_url: String,
    #[serde(default)]
    body: Option<String>,
    state: String,
    #[serde(default)]
    labels: Vec<NameJson>,
    /// Present when the "issue" is a pull request: those are not dashboards.
    #[serde(default)]
    pull_request: Option<Value>,
}

impl IssueJson {
    fn into_state(self) -> IssueState {
        IssueState {
            number: self.number,
            url: self.html_url,
            body: self.body.unwrap_or_default(),
            open: self.state == "open",
            labels: self.labels.into_iter().map(|l| l.name).collect(),
        }
    }
}

/// Whether a repository role lets its holder approve: write, maintain or admin. The legacy
/// `permission` field reads `read` for triage, so a triager never passes on either field.
pub fn can_approve(permission: &str, role_name: &str) -> bool {
    matches!(permission, "admin" | "write" | "maintain")
        || matches!(role_name, "admin" | "maintain" | "write")
}

impl GitHubClient {
    /// The latest `labeled` event for `label` on issue or pull request `number`: who added it
    /// and when. Events come oldest first; every page is read, so the latest is never missed
    /// (a pull request's events rarely fill one page).
    pub async fn last_labeled(&self, number: u64, label: &str) -> Result<Option<LabelEvent>, ForgeError> {
        let action = "read the events of a pull request";
        let mut found = None;
        for page in 1..=self.options.max_list_pages.max(1) {
            let reply = self
                .send_ok(Call {
                    method: Method::GET,
                    uri: self.repo_path(&format!(
                        "/issues/{number}/events?per_page={PER_PAGE}&page={page}"
                    )),
                    body: None,
                    action,
                    needs: Permission::PullRequestsRead,
                    auth: AuthMode::Repo,
                })
                .await?;
            let events: Vec<EventJson> = reply.json(action)?;
            let count = events.len();
            for e in events {
                if e.event == "labeled"
                    && e.label.as_ref().is_some_and(|l| l.name == label)
                    && let Some(actor) = e.actor
                {
                    found = Some(LabelEvent {
                        actor: actor.login,
                        at: e.created_at,
                    });
                }
            }
            if count < PER_PAGE || !reply.has_next_page() {
                break;
            }
        }
        Ok(found)
    }

    /// Whether `login` may approve: write, maintain or admin on the repository. Someone who is
    /// not a collaborator at all (404) may not.
    pub async fn may_approve(&self, login: &str) -> Result<bool, ForgeError> {
        let action = "read a collaborator's permission";
        let reply = self
            .send(Call {
                method: Method::GET,
                uri: self.repo_path(&format!("/collaborators/{}/permission", encode(login))),
                body: None,
                action,
                needs: Permission::MetadataRead,
                auth: AuthMode::Repo,
            })
            .await?;
        if reply.status == 404 {
            return Ok(false);
        }
        if !reply.is_success() {
            return Err(self.refusal(&reply, action, Permission::MetadataRead));
        }
        #[derive(Deserialize)]
        struct PermissionJson {
            #[serde(default)]
            permission: String,
            #[serde(default)]
            role_name: String,
        }
        let p: PermissionJson = reply.json(action)?;
        Ok(can_approve(&p.permission, &p.role_name))
    }

    /// The latest change of `branch` on GitHub (push, force push or creation), from the
    /// repository's activity: when the pull request's head last moved, by GitHub's clock.
    pub async fn last_branch_change(&self, branch: &str) -> Result<Option<BranchChange>, ForgeError> {
        let action = "read the repository's push activity";
        let full = format!("refs/heads/{branch}");
        let reply = self
            .send_ok(Call {
                method: Method::GET,
                uri: self.repo_path(&format!(
                    "/activity?ref={}&direction=desc&per_page=1",
                    encode(&full)
                )),
                body: None,
                action,
                needs: Permission::MetadataRead,
                auth: AuthMode::Repo,
            })
            .await?;
        #[derive(Deserialize)]
        struct ActivityJson {
            after: String,
            timestamp: DateTime<Utc>,
        }
        let items: Vec<ActivityJson> = reply.json(action)?;
        Ok(items.into_iter().next().map(|a| BranchChange {
            after: a.after,
            at: a.timestamp,
        }))
    }

    /// Comments on an issue or pull request.
    pub async fn comment(&self, number: u64, body: &str) -> Result<(), ForgeError> {
        self.send_ok(Call {
            method: Method::POST,
            uri: self.repo_path(&format!("/issues/{number}/comments")),
            body: Some(json!({ "body": body })),
            action: "comment on a pull request",
            needs: Permission::IssuesWrite,
            auth: AuthMode::Repo,
        })
        .await
        .map(|_| ())
    }

    /// The open issues labelled `label`, oldest first (pull requests left out): one request,
    /// since hyperloop keeps one such issue (a race may briefly make two).
    pub async fn open_issues_labelled(&self, label: &str) -> Result<Vec<IssueState>, ForgeError> {
        let action = "find the dashboard issue";
        let reply = self
            .send_ok(Call {
                method: Method::GET,
                uri: self.repo_path(&format!(
                    "/issues?labels={}&state=open&sort=created&direction=asc&per_page={PER_PAGE}",
                    encode(label)
                )),
                body: None,
                action,
                needs: Permission::MetadataRead,
                auth: AuthMode::Repo,
            })
            .await?;
        let items: Vec<IssueJson> = reply.json(action)?;
        Ok(items
            .into_iter()
            .filter(|i| i.pull_request.is_none())
            .map(IssueJson::into_state)
            .collect())
    }

    /// Opens an issue with labels (GitHub creates a label that does not exist yet).
    pub async fn create_issue(
        &self,
        title: &str,
        body: &str,
        labels: &[&str],
    ) -> Result<IssueState, ForgeError> {
        let action = "create the dashboard issue";
        let reply = self
            .send_ok(Call {
                method: Method::POST,
                uri: self.repo_path("/issues"),
                body: Some(json!({ "title": title, "body": body, "labels": labels })),
                action,
                needs: Permission::IssuesWrite,
                auth: AuthMode::Repo,
            })
            .await?;
        Ok(reply.json::<IssueJson>(action)?.into_state())
    }

    /// Replaces an issue's body.
    pub async fn update_issue_body(&self, number: u64, body: &str) -> Result<(), ForgeError> {
        self.send_ok(Call {
            method: Method::PATCH,
            uri: self.repo_path(&format!("/issues/{number}")),
            body: Some(json!({ "body": body })),
            action: "update the dashboard issue",
            needs: Permission::IssuesWrite,
            auth: AuthMode::Repo,
        })
        .await
        .map(|_| ())
    }

    /// Closes an issue (a duplicate dashboard), saying why in its body.
    pub async fn close_issue(&self, number: u64, body: &str) -> Result<(), ForgeError> {
        self.send_ok(Call {
            method: Method::PATCH,
            uri: self.repo_path(&format!("/issues/{number}")),
            body: Some(json!({ "state": "closed", "state_reason": "not_planned", "body": body })),
            action: "close a duplicate dashboard issue",
            needs: Permission::IssuesWrite,
            auth: AuthMode::Repo,
        })
        .await
        .map(|_| ())
    }

    /// Who last edited issue `number`'s body, and when: GraphQL's `editor` and `lastEditedAt`
    /// (REST does not say who edited an issue).
    pub async fn last_body_edit(&self, number: u64) -> Result<Option<BodyEdit>, ForgeError> {
        let action = "read who edited the dashboard issue";
        let query = "query($owner: String!, $name: String!, $number: Int!) { repository(owner: $owner, name: $name) { issue(number: $number) { editor { login } lastEditedAt } } }";
        let reply = self
            .send_ok(Call {
                method: Method::POST,
                uri: self.graphql_url.clone(),
                body: Some(json!({
                    "query": query,
                    "variables": { "owner": self.repo.owner, "name": self.repo.name, "number": number },
                })),
                action,
                needs: Permission::MetadataRead,
                auth: AuthMode::Repo,
            })
            .await?;
        let v: Value = reply.json(action)?;
        let Some(issue) = v.pointer("/data/repository/issue").filter(|i| !i.is_null()) else {
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
        };
        let Some(editor) = issue.pointer("/editor/login").and_then(Value::as_str) else {
            return Ok(None);
        };
        let at = issue
            .get("lastEditedAt")
            .and_then(Value::as_str)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.with_timezone(&Utc));
        Ok(Some(BodyEdit {
            editor: editor.to_string(),
            at,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::can_approve;

    #[test]
    fn who_may_approve() {
        assert!(can_approve("admin", "admin"));
        assert!(can_approve("write", "write"));
        assert!(can_approve("write", "maintain"));
        // Triage reads as `read` in the legacy field.
        assert!(!can_approve("read", "triage"));
        assert!(!can_approve("read", "read"));
        assert!(!can_approve("none", ""));
        // A custom role based on write.
        assert!(can_approve("write", "deployer"));
    }
}
