//! Trusted gates: an `lgtm` label clears a gate only when it counts — added by a user with write
//! permission (maintain and admin include it; triage, which can label too, does not), after the
//! pull request's head last changed. An approval is bound to the head it saw: a label added
//! before the latest push to the branch approved other commits. A label that does not count is
//! taken off with a comment saying why, so the person knows to look again.
//!
//! Polling stays O(1): a gate costs nothing beyond the step's one listing until an `lgtm`
//! appears on its pull request. Every `lgtm` seen is then either consumed (the gate clears) or
//! removed (it did not count), so it is examined once: its labelled event (who, when), the
//! person's permission (once per person per step) and the branch's last push.

use std::collections::HashMap;

use crate::emit;
use crate::forge::budget::PendingWrite;
use crate::forge::{ForgeError, PrState};
use crate::task::Task;

use super::Stepper;
use super::pull_requests::APPROVAL_LABEL;
use super::wait;

/// What this step learned about people's permissions: login → may approve.
pub(super) type Permissions = HashMap<String, bool>;

/// Why an approval does not count, or that it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    Counts {
        by: String,
    },
    /// Not decided this step (GitHub could not be asked); the label stays for the next step.
    Undecided,
    Ignored {
        by: Option<String>,
        reason: String,
    },
}

impl Stepper {
    /// Whether `write` permission holds for `login`, asking GitHub once per step.
    pub(super) fn may_approve(&mut self, login: &str) -> Result<bool, ForgeError> {
        let Some(gh) = self.gh.as_mut() else {
            return Ok(false);
        };
        if let Some(known) = gh.permissions.get(login) {
            return Ok(*known);
        }
        let may = wait(gh.client.may_approve(login))?;
        gh.permissions.insert(login.to_string(), may);
        Ok(may)
    }

    /// Judges the `lgtm` on `pr`, the pull request of `task`.
    pub(super) fn judge_approval(&mut self, task: &Task, pr: &PrState) -> Verdict {
        let Some(gh) = self.gh.as_ref() else {
            return Verdict::Undecided;
        };
        let event = match wait(gh.client.last_labeled(pr.number, APPROVAL_LABEL)) {
            Ok(Some(e)) => e,
            Ok(None) => {
                return Verdict::Ignored {
                    by: None,
                    reason: "GitHub shows no event of anyone adding it".into(),
                };
            }
            Err(e) => return self.undecided(task, &e),
        };
        let may = match self.may_approve(&event.actor) {
            Ok(m) => m,
            Err(e) => return self.undecided(task, &e),
        };
        if !may {
            return Verdict::Ignored {
                by: Some(event.actor),
                reason: "they do not have write permission on this repository (triage and read \
                         can label, but not approve)"
                    .into(),
            };
        }
        let Some(gh) = self.gh.as_ref() else {
            return Verdict::Undecided;
        };
        match wait(gh.client.last_branch_change(&pr.head_ref)) {
            // GitHub stamps both in seconds: a label in the same second as the push may have
            // been added before it, so only a later one is known to have seen the new head.
            Ok(Some(change)) if event.at <= change.at => Verdict::Ignored {
                by: Some(event.actor),
                reason: format!(
                    "it was added at {} and the branch changed after that (to {} at {}): an approval \
                     holds for the commits it saw",
                    event.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    short(&change.after),
                    change.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
            },
            Ok(_) => Verdict::Counts { by: event.actor },
            Err(e) => self.undecided(task, &e),
        }
    }

    fn undecided(&self, task: &Task, e: &ForgeError) -> Verdict {
        if !self.deferred(&task.id, "check who approved its pull request", e) {
            emit!(
                WARN,
                "gate_approval_unchecked",
                task_id = task.id.as_str(),
                error = e.to_string().as_str()
            );
        }
        Verdict::Undecided
    }

    /// Takes an approval that does not count off the pull request, with a comment saying why.
    pub(super) fn refuse_approval(&mut self, task: &Task, pr: &PrState, by: Option<&str>, reason: &str) {
        emit!(
            WARN,
            "gate_approval_ignored",
            task_id = task.id.as_str(),
            pr = pr.number,
            by = by.unwrap_or("unknown"),
            reason = reason
        );
        self.write_or_keep(
            &task.id,
            PendingWrite::RemoveLabel {
                pr: pr.number,
                label: APPROVAL_LABEL.to_string(),
            },
        );
        if let Some(gh) = self.gh.as_mut()
            && let Some(listed) = gh.prs.get_mut(&pr.head_ref)
        {
            listed.labels.retain(|l| l != APPROVAL_LABEL);
        }
        let who = by.map_or_else(String::new, |b| format!(" from @{b}"));
        let text = format!(
            "hyperloop removed `{APPROVAL_LABEL}`{who}: it does not count because {reason}.\n\n\
             A user with write permission can add `{APPROVAL_LABEL}` again to approve the current head."
        );
        if let Some(gh) = self.gh.as_ref()
            && let Err(e) = wait(gh.client.comment(pr.number, &text))
            && !self.deferred(&task.id, "explain a removed approval", &e)
        {
            emit!(
                WARN,
                "github_write_failed",
                task_id = task.id.as_str(),
                write = "comment",
                error = e.to_string().as_str()
            );
        }
    }
}

fn short(sha: &str) -> &str {
    sha.get(..7).unwrap_or(sha)
}
