//! The fake's issues side: issues with labels, bodies and edits; issue events with actors
//! (who labelled what, when); comments; collaborators and their roles; and the repository's push
//! activity. Pushes reach the bare repository through git, not through the fake, so a
//! `post-receive` hook there logs them and the fake takes the log in (stamping each push with
//! its clock) before it answers any request or plays any person: a push is always ordered before
//! whatever the fake does next, as on GitHub.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Answer, FakeGitHub, State, answer, iso, message, query_map, validation};

/// The login the fake's tokens act as.
pub const BOT: &str = "hyperloop-bot";
/// A person with admin rights, who acts when a test does not name anyone.
pub const OWNER: &str = "octocat";

#[derive(Debug, Clone)]
pub struct Event {
    pub id: u64,
    pub event: String,
    pub actor: String,
    pub label: Option<String>,
    pub at: i64,
}

#[derive(Debug, Clone)]
pub struct Issue {
    pub number: u64,
    pub title: String,
    pub body: String,
    pub open: bool,
    pub labels: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The last edit of the body: who, when.
    pub editor: Option<(String, i64)>,
}

#[derive(Debug, Clone)]
pub struct Activity {
    pub id: u64,
    pub before: String,
    pub after: String,
    pub refname: String,
    pub at: i64,
}

#[derive(Debug, Default)]
pub struct Social {
    pub push_log: Option<PathBuf>,
    pub events: BTreeMap<u64, Vec<Event>>,
    pub issues: BTreeMap<u64, Issue>,
    /// login → role (`admin`, `maintain`, `write`, `triage`, `read`).
    pub roles: HashMap<String, String>,
    pub activity: Vec<Activity>,
    /// (issue or pull request number, author, body), in order.
    pub comments: Vec<(u64, String, String)>,
}

/// Installs the push-logging hook in the bare repository.
pub fn install_push_hook(bare: &Path) -> PathBuf {
    let log = bare.join("fake-github-pushes.log");
    let hooks = bare.join("hooks");
    std::fs::create_dir_all(&hooks).expect("hooks dir");
    let hook = hooks.join("post-receive");
    std::fs::write(&hook, format!("#!/bin/sh\ncat >> '{}'\n", log.display())).expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod hook");
    log
}

impl State {
    /// Takes in the pushes logged since last time, each stamped now.
    pub(super) fn ingest_pushes(&mut self) {
        let Some(log) = self.social.push_log.clone() else {
            return;
        };
        let Ok(text) = std::fs::read_to_string(&log) else {
            return;
        };
        if text.is_empty() {
            return;
        }
        let _ = std::fs::write(&log, "");
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(before), Some(after), Some(refname)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let at = self.tick();
            let id = self.next_id();
            self.social.activity.push(Activity {
                id,
                before: before.to_string(),
                after: after.to_string(),
                refname: refname.to_string(),
                at,
            });
        }
    }

    pub(super) fn record_event(&mut self, number: u64, event: &str, actor: &str, label: Option<&str>) {
        let at = self.tick();
        let id = self.next_id();
        self.social.events.entry(number).or_default().push(Event {
            id,
            event: event.to_string(),
            actor: actor.to_string(),
            label: label.map(str::to_string),
            at,
        });
    }

    fn role(&self, login: &str) -> Option<String> {
        if let Some(r) = self.social.roles.get(login) {
            return Some(r.clone());
        }
        match login {
            OWNER => Some("admin".into()),
            BOT => Some("write".into()),
            _ => None,
        }
    }

    /// The routes of this half; `None` for a route it does not serve.
    pub(super) fn handle_social(
        &mut self,
        method: &str,
        rest: &[&str],
        query: &str,
        body: &Value,
    ) -> Option<Answer> {
        Some(match (method, rest) {
            ("GET", ["issues", n, "events"]) => {
                let n: u64 = n.parse().ok()?;
                if !self.prs.contains_key(&n) && !self.social.issues.contains_key(&n) {
                    return Some(message(404, "Not Found"));
                }
                let events: Vec<Value> = self
                    .social
                    .events
                    .get(&n)
                    .into_iter()
                    .flatten()
                    .map(|e| self.event_json(n, e))
                    .collect();
                self.paged(events, query, &format!("issues/{n}/events"))
            }
            ("GET", ["collaborators", login, "permission"]) => {
                let Some(role) = self.role(login) else {
                    return Some(message(404, &format!("{login} is not a user")));
                };
                let permission = match role.as_str() {
                    "admin" => "admin",
                    "maintain" | "write" => "write",
                    "triage" | "read" => "read",
                    _ => "none",
                };
                answer(
                    200,
                    json!({ "permission": permission, "role_name": role, "user": self.user_json(login, 99) }),
                )
            }
            ("GET", ["activity"]) => {
                let q = query_map(query);
                let wanted = q.get("ref").cloned();
                let mut items: Vec<&Activity> = self
                    .social
                    .activity
                    .iter()
                    .filter(|a| match &wanted {
                        Some(r) => a.refname == *r || a.refname == format!("refs/heads/{r}"),
                        None => true,
                    })
                    .collect();
                items.sort_by_key(|a| a.id);
                if q.get("direction").map(String::as_str) != Some("asc") {
                    items.reverse();
                }
                let per_page = q.get("per_page").and_then(|v| v.parse().ok()).unwrap_or(30usize);
                let out: Vec<Value> = items
                    .into_iter()
                    .take(per_page)
                    .map(|a| {
                        json!({
                            "id": a.id,
                            "node_id": format!("RA_fake{}", a.id),
                            "before": a.before,
                            "after": a.after,
                            "ref": a.refname,
                            "timestamp": iso(a.at),
                            "activity_type": if a.before.chars().all(|c| c == '0') { "branch_creation" } else { "push" },
                            "actor": self.user_json(OWNER, 2),
                        })
                    })
                    .collect();
                answer(200, Value::Array(out))
            }
            ("POST", ["issues", n, "comments"]) => {
                let n: u64 = n.parse().ok()?;
                if !self.prs.contains_key(&n) && !self.social.issues.contains_key(&n) {
                    return Some(message(404, "Not Found"));
                }
                let text = body.get("body").and_then(Value::as_str).unwrap_or("").to_string();
                let id = self.next_id();
                self.tick();
                self.social.comments.push((n, BOT.to_string(), text.clone()));
                answer(
                    201,
                    json!({ "id": id, "body": text, "user": self.user_json(BOT, 7) }),
                )
            }
            ("GET", ["issues"]) => {
                let q = query_map(query);
                let state = q.get("state").map(String::as_str).unwrap_or("open");
                let labels: Vec<String> = q
                    .get("labels")
                    .map(|l| l.split(',').map(str::to_string).collect())
                    .unwrap_or_default();
                let mut items: Vec<&Issue> = self
                    .social
                    .issues
                    .values()
                    .filter(|i| match state {
                        "all" => true,
                        "closed" => !i.open,
                        _ => i.open,
                    })
                    .filter(|i| labels.iter().all(|l| i.labels.contains(l)))
                    .collect();
                items.sort_by_key(|i| (i.created_at, i.number));
                if q.get("direction").map(String::as_str) != Some("asc") {
                    items.reverse();
                }
                let out: Vec<Value> = items.iter().map(|i| self.issue_json(i)).collect();
                self.paged(out, query, "issues")
            }
            ("POST", ["issues"]) => {
                let title = body.get("title").and_then(Value::as_str).unwrap_or("");
                if title.is_empty() {
                    return Some(validation(
                        json!([{ "resource": "Issue", "field": "title", "code": "missing_field" }]),
                    ));
                }
                let text = body.get("body").and_then(Value::as_str).unwrap_or("").to_string();
                if text.chars().count() > 65_536 {
                    return Some(validation(
                        json!([{ "resource": "Issue", "field": "body", "code": "custom", "message": "body is too long (maximum is 65536 characters)" }]),
                    ));
                }
                let labels: Vec<String> = body
                    .get("labels")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                for l in &labels {
                    self.ensure_label(l);
                }
                let now = self.tick();
                let number = self.next_number;
                self.next_number += 1;
                let issue = Issue {
                    number,
                    title: title.to_string(),
                    body: text,
                    open: true,
                    labels,
                    created_at: now,
                    updated_at: now,
                    editor: None,
                };
                let json = self.issue_json(&issue);
                self.social.issues.insert(number, issue);
                answer(201, json)
            }
            ("PATCH", ["issues", n]) => {
                let n: u64 = n.parse().ok()?;
                if !self.social.issues.contains_key(&n) {
                    // Pull requests are patched through /pulls in hyperloop; not served here.
                    return None;
                }
                if let Some(text) = body.get("body").and_then(Value::as_str)
                    && text.chars().count() > 65_536
                {
                    return Some(validation(
                        json!([{ "resource": "Issue", "field": "body", "code": "custom", "message": "body is too long (maximum is 65536 characters)" }]),
                    ));
                }
                let now = self.tick();
                let issue = self.social.issues.get_mut(&n)?;
                if let Some(text) = body.get("body").and_then(Value::as_str) {
                    issue.body = text.to_string();
                    issue.editor = Some((BOT.to_string(), now));
                }
                if let Some(state) = body.get("state").and_then(Value::as_str) {
                    issue.open = state == "open";
                }
                issue.updated_at = now;
                let issue = issue.clone();
                answer(200, self.issue_json(&issue))
            }
            _ => return None,
        })
    }

    /// GraphQL: who last edited an issue's body.
    pub(super) fn graphql_editor(&self, body: &Value) -> Answer {
        let n = body
            .pointer("/variables/number")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let Some(issue) = self.social.issues.get(&n) else {
            return answer(
                200,
                json!({ "data": { "repository": { "issue": null } }, "errors": [{ "type": "NOT_FOUND", "message": format!("Could not resolve to an Issue with the number of {n}.") }] }),
            );
        };
        let (editor, at) = match &issue.editor {
            Some((who, at)) => (json!({ "login": who }), json!(iso(*at))),
            None => (Value::Null, Value::Null),
        };
        answer(
            200,
            json!({ "data": { "repository": { "issue": { "editor": editor, "lastEditedAt": at } } } }),
        )
    }

    fn event_json(&self, n: u64, e: &Event) -> Value {
        let api = format!("{}/repos/{}", self.api, self.full_name());
        json!({
            "id": e.id,
            "node_id": format!("LE_fake{}", e.id),
            "url": format!("{api}/issues/events/{}", e.id),
            "actor": self.user_json(&e.actor, 50),
            "event": e.event,
            "commit_id": null,
            "commit_url": null,
            "created_at": iso(e.at),
            "label": e.label.as_ref().map(|l| json!({ "name": l, "color": "ededed" })),
            "issue_url": format!("{api}/issues/{n}"),
            "performed_via_github_app": null,
        })
    }

    fn issue_json(&self, i: &Issue) -> Value {
        let api = format!("{}/repos/{}", self.api, self.full_name());
        let labels: Vec<Value> = i
            .labels
            .iter()
            .filter_map(|name| self.labels.iter().find(|l| &l.name == name))
            .map(|l| self.label_json(l))
            .collect();
        json!({
            "id": 5000 + i.number,
            "node_id": format!("I_kwDOfake{:06}", i.number),
            "url": format!("{api}/issues/{}", i.number),
            "html_url": format!("https://github.com/{}/issues/{}", self.full_name(), i.number),
            "number": i.number,
            "state": if i.open { "open" } else { "closed" },
            "title": i.title,
            "body": i.body,
            "user": self.user_json(BOT, 7),
            "labels": labels,
            "created_at": iso(i.created_at),
            "updated_at": iso(i.updated_at),
        })
    }
}

impl FakeGitHub {
    /// A person adds a label to a pull request (or issue).
    pub fn add_label_as(&self, number: u64, label: &str, login: &str) {
        let mut s = self.state();
        s.ingest_pushes();
        s.ensure_label(label);
        let now = s.tick();
        if let Some(pr) = s.prs.get_mut(&number) {
            if !pr.labels.iter().any(|l| l == label) {
                pr.labels.push(label.to_string());
            }
            pr.updated_at = now;
        } else if let Some(issue) = s.social.issues.get_mut(&number) {
            if !issue.labels.iter().any(|l| l == label) {
                issue.labels.push(label.to_string());
            }
            issue.updated_at = now;
        } else {
            panic!("fake GitHub: no issue or pull request #{number}");
        }
        s.record_event(number, "labeled", login, Some(label));
    }

    /// Gives `login` a role on the repository (`admin`, `maintain`, `write`, `triage`, `read`).
    pub fn set_role(&self, login: &str, role: &str) {
        self.state()
            .social
            .roles
            .insert(login.to_string(), role.to_string());
    }

    /// Comments on `number`, oldest first.
    pub fn comments(&self, number: u64) -> Vec<String> {
        self.state()
            .social
            .comments
            .iter()
            .filter(|(n, _, _)| *n == number)
            .map(|(_, _, b)| b.clone())
            .collect()
    }

    /// The issues labelled `label` (open and closed), oldest first: (number, open, body).
    pub fn issues_labelled(&self, label: &str) -> Vec<(u64, bool, String)> {
        self.state()
            .social
            .issues
            .values()
            .filter(|i| i.labels.iter().any(|l| l == label))
            .map(|i| (i.number, i.open, i.body.clone()))
            .collect()
    }

    /// A person edits an issue's body in the web page.
    pub fn edit_issue_as(&self, number: u64, body: &str, login: &str) {
        let mut s = self.state();
        s.ingest_pushes();
        let now = s.tick();
        let issue = s
            .social
            .issues
            .get_mut(&number)
            .expect("fake GitHub: no such issue");
        issue.body = body.to_string();
        issue.editor = Some((login.to_string(), now));
        issue.updated_at = now;
    }

    /// Someone opens an issue (e.g. what a racing step would have left).
    pub fn create_issue_as(&self, title: &str, body: &str, labels: &[&str], login: &str) -> u64 {
        let mut s = self.state();
        for l in labels {
            s.ensure_label(l);
        }
        let now = s.tick();
        let number = s.next_number;
        s.next_number += 1;
        s.social.issues.insert(
            number,
            Issue {
                number,
                title: title.to_string(),
                body: body.to_string(),
                open: true,
                labels: labels.iter().map(|l| (*l).to_string()).collect(),
                created_at: now,
                updated_at: now,
                editor: Some((login.to_string(), now)),
            },
        );
        number
    }

    pub fn issue_body(&self, number: u64) -> String {
        self.state()
            .social
            .issues
            .get(&number)
            .map(|i| i.body.clone())
            .unwrap_or_default()
    }
}
