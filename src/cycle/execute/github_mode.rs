//! The executor's GitHub mode: task state travels through `origin` (fetched at the start of a
//! step, pushed compare-and-swap after every commit), each task gets a draft pull request labelled
//! `task:<id>` and `spec:<name>`, gates clear on the `lgtm` label, and `merge-pr` merges through
//! the API. Polling costs one paginated listing of hyperloop's pull requests per step, however
//! many tasks wait.
//!
//! Git reaches `origin` through [`Transport`]: over http(s) in this process, so the token never
//! reaches a git child's environment, arguments or memory, nor `.git/config` or any file.
//!
//! A rate limit that outlasts the client's short wait ends the step cleanly: every change made so
//! far is already committed and pushed (one commit per change), the step exits 0 with a
//! `rate_limited` event and `rate_limited_until` in its report, and the next scheduled step
//! continues. A CI job is not held for an hour, and a scheduler does not see a failure for what is
//! only a quota. A 401 or 403 is different: nothing changes until someone fixes the token, so the
//! step fails (exit 1) with a hint naming the missing permission.
//!
//! A merge GitHub refuses as not mergeable asks GitHub to update the branch; the next step
//! fast-forwards the local branch to the updated head (when it still contains what was verified)
//! and merges that.

use std::collections::HashMap;

use crate::cycle::transition::{self, ChangeEvent, TaskChange};
use crate::emit;
use crate::error::{Error, Result};
use crate::events::{self, MergeAttempt, Notable, PullRequest};
use crate::forge::auth::AuthConfig;
use crate::forge::budget::PendingWrite;
use crate::forge::github::{ClientOptions, GitHubClient, RepoRef};
use crate::forge::{MergeOutcome, NotMergeableReason, PrState};
use crate::git::trailers;
use crate::state::{MergeTree, Publish, Repo};
use crate::task::{Status, Task};
use crate::transport::{PushOutcome, Transport};

use super::pull_requests::{APPROVAL_LABEL, pr_body, pr_number, spec_label};
use super::{Stepper, api_budget, ci_checks, wait};

/// What a step in GitHub mode keeps: the client, an authenticated git, and the one listing of
/// hyperloop's pull requests this step made.
pub(super) struct GitHubMode {
    pub client: GitHubClient,
    pub remote: String,
    /// Fetches and pushes to `remote`, holding the credential.
    pub transport: Transport,
    /// Head branch → its pull request, from this step's listing (updated as the step acts).
    pub prs: HashMap<String, PrState>,
    /// The repository's "automatically delete head branches", once a merge asked for it.
    pub deletes_merged_branches: Option<bool>,
    /// The checks of the pull requests at `merge-pr`, from this step's one query.
    pub checks: HashMap<u64, crate::forge::checks::PrChecks>,
    pub checks_read: bool,
    /// Each listed pull request's head when the step began: a head that is not here was pushed
    /// by this step, too recently for CI to have reported on it.
    pub listed_heads: HashMap<u64, String>,
    /// Who may approve, as this step learned it (see `trusted_gate`).
    pub permissions: super::trusted_gate::Permissions,
    /// The dashboard issue as this step read it (see `dashboard`).
    pub dashboard: super::dashboard::Dashboard,
}

fn forge(e: crate::forge::ForgeError) -> Error {
    Error::from(e)
}

/// Ends a step that GitHub's rate limit stopped: not a failure (exit 0), with the time to come
/// back in the report and in a `rate_limited` event. Whatever the step did before is committed
/// and pushed already, one commit per change.
pub(super) fn rate_limited(
    mut report: super::StepReport,
    message: &str,
    retry_at: chrono::DateTime<chrono::Utc>,
) -> super::StepReport {
    let at = retry_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    emit!(
        WARN,
        "rate_limited",
        retry_at = at.as_str(),
        detail = message,
        hint = "the next step after that time continues where this one stopped"
    );
    report.progress = "rate-limited".to_string();
    report.work_remaining = true;
    // Nothing can start before `retry_at`, so nothing is ready now.
    report.ready = 0;
    report.rate_limited_until = Some(at);
    report
}

/// Connects to GitHub for `slug` (OWNER/REPO) with credentials from the environment.
pub(super) async fn connect(slug: &str, repo: &Repo) -> Result<GitHubMode> {
    let repo_ref =
        RepoRef::parse(slug).ok_or_else(|| Error::usage(format!("--repo {slug}: expected OWNER/REPO")))?;
    let auth = AuthConfig::from_process_env().map_err(forge)?;
    let client = GitHubClient::new(auth, repo_ref, ClientOptions::default()).map_err(forge)?;
    let token = client.git_token().await.map_err(forge)?;
    let transport = Transport::new(&repo.git, "origin", Some(token))?;
    Ok(GitHubMode {
        client,
        remote: "origin".to_string(),
        transport,
        prs: HashMap::new(),
        deletes_merged_branches: None,
        checks: HashMap::new(),
        checks_read: false,
        listed_heads: HashMap::new(),
        permissions: HashMap::new(),
        dashboard: super::dashboard::Dashboard::default(),
    })
}

/// A refused push of the state branch: nothing will change until someone changes the rule, so
/// the step stops once and says which rule and what to change.
fn refused_state_push(branch: &str, message: &str) -> Error {
    Error::other(format!(
        "origin refused the push of the state branch `{branch}`: {message}\n  hint: a branch \
         protection rule or ruleset forbids hyperloop's pushes to `{branch}`; allow the \
         workflow's token (or the GitHub App) to push to it, or set `target.state_branch` to a \
         branch of its own"
    ))
}

impl Stepper {
    fn gh(&self) -> Result<&GitHubMode> {
        self.gh.as_ref().ok_or_else(|| Error::other("not in GitHub mode"))
    }

    fn remote_ref(&self, branch: &str) -> String {
        let remote = self.gh.as_ref().map_or("origin", |g| g.remote.as_str());
        format!("refs/remotes/{remote}/{branch}")
    }

    /// Brings in the task branches `origin` has: a step in a fresh clone (every CI job) must
    /// continue from the agents' earlier commits, not start the branches again. Never forced: a
    /// local branch with commits of its own (or one checked out in a worktree) is left alone.
    pub(super) fn fetch_task_branches(&self) -> Result<()> {
        let gh = self.gh()?;
        let remote = gh.remote.clone();
        let spec = format!("+refs/heads/worker/*:refs/remotes/{remote}/worker/*");
        if let Err(e) = gh.transport.fetch(&[spec]) {
            emit!(
                DEBUG,
                "task_branches_not_all_fetched",
                detail = e.to_string().as_str()
            );
            return Ok(());
        }
        // A local branch follows origin's only as a fast-forward (or when it has none yet): one
        // with commits of its own keeps them.
        let prefix = format!("refs/remotes/{remote}/worker/");
        let listed = self.repo.git.run([
            "for-each-ref",
            "--format=%(refname) %(objectname)",
            prefix.as_str(),
        ])?;
        for line in listed.lines() {
            let Some((name, tip)) = line.split_once(' ') else {
                continue;
            };
            let Some(id) = name.strip_prefix(prefix.as_str()) else {
                continue;
            };
            if crate::task::file::id_problem(id).is_some() {
                continue;
            }
            let branch = crate::task::file::task_branch(id);
            let local = self.repo.branch_tip(&branch)?;
            if local.as_deref() == Some(tip) {
                continue;
            }
            let forward = match &local {
                None => true,
                Some(l) => self
                    .repo
                    .git
                    .succeeds(["merge-base", "--is-ancestor", l.as_str(), tip])?,
            };
            if forward {
                crate::worker::worktree::set_task_ref(&self.repo.git, &branch, tip, local.as_deref())?;
            }
        }
        Ok(())
    }

    /// Fetches the state branch from `origin`; returns its tip there.
    pub(super) fn fetch_state(&self) -> Result<String> {
        let branch = self.branch.clone();
        self.fetch_branch(&branch)?.ok_or_else(|| Error::Other {
            message: format!(
                "branch `{branch}` does not exist on {}",
                self.gh.as_ref().map_or("origin", |g| g.remote.as_str())
            ),
        })
    }

    /// Fetches `branch` from `origin`: its tip there, or `None` when origin has no such branch.
    pub(super) fn fetch_branch(&self, branch: &str) -> Result<Option<String>> {
        let remote = self.gh()?.remote.clone();
        if !self.fetch_refspec(&format!("+refs/heads/{branch}:refs/remotes/{remote}/{branch}"))? {
            return Ok(None);
        }
        self.repo.git.rev_parse(&self.remote_ref(branch))
    }

    /// Fetches one refspec from origin; false when origin has no such branch.
    fn fetch_refspec(&self, refspec: &str) -> Result<bool> {
        let gh = self.gh()?;
        Ok(gh.transport.fetch(&[refspec.to_string()])?.is_empty())
    }

    /// Creates `branch` on origin at `commit`, unless someone created it first. Returns where it
    /// is now.
    pub(super) fn create_remote_branch(&self, branch: &str, commit: &str) -> Result<String> {
        let gh = self.gh()?;
        match gh.transport.push(commit, branch)? {
            PushOutcome::Pushed => {}
            // Lost a race with another creator: theirs stands.
            PushOutcome::Moved => {
                return self.fetch_branch(branch)?.ok_or_else(|| {
                    Error::other(format!(
                        "cannot create {branch} on {}: the push was rejected",
                        gh.remote
                    ))
                });
            }
            PushOutcome::Refused { message } => return Err(refused_state_push(branch, &message)),
        }
        let remote_ref = self.remote_ref(branch);
        self.repo.git.run(["update-ref", remote_ref.as_str(), commit])?;
        Ok(commit.to_string())
    }

    /// Pushes `new` (a descendant of the current tip) to the state branch on `origin`. A
    /// rejected push is never forced: the caller replays onto what is there now.
    pub(super) fn push_state(&mut self, new: &str) -> Result<Publish> {
        let gh = self.gh()?;
        match gh.transport.push(new, &self.branch)? {
            PushOutcome::Pushed => {}
            PushOutcome::Moved => {
                let current = self.fetch_state()?;
                emit!(
                    INFO,
                    "push_rejected",
                    branch = self.branch.as_str(),
                    remote_tip = current.as_str()
                );
                return Ok(Publish::Raced(current));
            }
            PushOutcome::Refused { message } => return Err(refused_state_push(&self.branch, &message)),
        }
        let remote_ref = self.remote_ref(&self.branch);
        self.repo.git.run(["update-ref", remote_ref.as_str(), new])?;
        let branch = self.branch.clone();
        self.follow_local(&branch, new)?;
        Ok(Publish::Moved)
    }

    /// Keeps a local branch of the same name (e.g. a CI checkout) following origin, when it can
    /// fast-forward; a branch with commits of its own is left alone.
    pub(super) fn follow_local(&self, branch: &str, new: &str) -> Result<()> {
        if let Some(local) = self.repo.branch_tip(branch)?
            && local != new
            && self
                .repo
                .git
                .succeeds(["merge-base", "--is-ancestor", local.as_str(), new])?
            && let Err(e) = self.repo.publish(branch, &local, new)
        {
            emit!(
                WARN,
                "checkout_not_updated",
                branch = branch,
                error = e.to_string().as_str()
            );
        }
        Ok(())
    }

    /// Reads every hyperloop pull request once, and lets tasks follow what people did to them:
    /// merged by a person → complete; closed without merging → failed.
    pub(super) fn sync_pull_requests(&mut self) -> Result<()> {
        // Only the pull requests tasks wait on — and those of failed tasks, whose pull requests
        // may carry a `hyperloop:retry` label: paging stops once all are seen, so a long history
        // of merged pull requests costs nothing, and a step with none costs no request.
        let mut wanted: Vec<u64> = self
            .tasks
            .values()
            .filter(|t| {
                matches!(
                    t.status,
                    Status::InProgress | Status::NeedsRebase | Status::Failed
                )
            })
            .filter_map(|t| t.pr.as_deref().and_then(pr_number))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let listing = {
            let gh = self.gh()?;
            wait(gh.client.list_wanted_prs(&wanted)).map_err(forge)?
        };
        let mut prs = HashMap::new();
        for pr in listing {
            // The listing is newest first: keep the newest per branch.
            prs.entry(pr.head_ref.clone()).or_insert(pr);
        }
        if let Some(gh) = self.gh.as_mut() {
            gh.listed_heads = prs.values().map(|p| (p.number, p.head_sha.clone())).collect();
            gh.prs = prs;
        }
        let active: Vec<Task> = self
            .tasks
            .values()
            .filter(|t| matches!(t.status, Status::InProgress | Status::NeedsRebase))
            .filter(|t| t.pr.is_some())
            .cloned()
            .collect();
        for task in active {
            let Some(pr) = self.pr_for(&task).cloned() else {
                continue;
            };
            if pr.merged {
                self.complete_merged_elsewhere(task, &pr)?;
            } else if !pr.is_open() {
                let mut t = task;
                let reason = format!("pull request #{} was closed without merging", pr.number);
                let change = transition::fail_task(&mut t, &reason);
                let id = t.id.clone();
                self.save_task(
                    t,
                    &change,
                    &format!("hyperloop: {id} failed (pull request closed)"),
                )?;
            }
        }
        Ok(())
    }

    pub(super) fn pr_for(&self, task: &Task) -> Option<&PrState> {
        let gh = self.gh.as_ref()?;
        let branch = crate::task::file::task_branch(&task.id);
        let pr = gh.prs.get(&branch)?;
        // A PR for the branch that is not the one the task recorded is someone else's business.
        match task.pr.as_deref().and_then(pr_number) {
            Some(n) if n != pr.number => None,
            _ => Some(pr),
        }
    }

    /// A task whose pull request was merged (by a person, or by a step that died before
    /// recording it) is complete; nothing is merged again.
    fn complete_merged_elsewhere(&mut self, task: Task, pr: &PrState) -> Result<()> {
        // Bring the merge into our view of the base branch first.
        self.refresh_after_base_moved()?;
        let mut t = task;
        let before = t.clone();
        t.status = Status::Complete;
        t.phase = None;
        t.position = None;
        t.gate_cleared = false;
        t.rebase_attempts = 0;
        t.clear_findings();
        let change = TaskChange {
            task_id: t.id.clone(),
            from_status: before.status,
            to_status: t.status,
            from_phase: before.phase.clone(),
            to_phase: None,
            from_round: before.round,
            to_round: t.round,
            events: vec![ChangeEvent::Completed],
        };
        MergeAttempt {
            pr: Some(PullRequest::Url(pr.url.clone())),
            ..MergeAttempt::new(&t.id, events::MergeOutcome::MergedOutsideThisStep)
        }
        .emit();
        let id = t.id.clone();
        self.save_task(
            t,
            &change,
            &format!("hyperloop: {id} complete (pull request #{} merged)", pr.number),
        )?;
        self.report.merged.push(id);
        Ok(())
    }

    /// Pushes the task's branch and makes sure it has its draft pull request, labelled. Returns
    /// the PR's URL when there is one (none yet when the branch has no commits of its own).
    pub(super) fn ensure_pull_request(&mut self, task: &Task) -> Result<Option<String>> {
        let branch = crate::task::file::task_branch(&task.id);
        let Some(branch_tip) = self.repo.branch_tip(&branch)? else {
            return Ok(None);
        };
        if branch_tip == self.base_tip()
            || self.repo.git.succeeds([
                "merge-base",
                "--is-ancestor",
                branch_tip.as_str(),
                self.base_tip(),
            ])?
        {
            // Nothing of its own to propose yet.
            return Ok(task.pr.clone());
        }
        if task.refused_tip.as_deref() == Some(branch_tip.as_str()) {
            // A refusal does not change by itself: the same commits are not pushed again.
            return Err(Error::PushRefused {
                branch,
                message: "the branch is unchanged since origin refused it (see the findings)".to_string(),
            });
        }
        self.push_task_branch(&branch)?;
        let specs_dir = self.config.target.specs_dir.clone();
        let base = self.config.target.base_branch.clone();
        let labels = [
            format!("task:{}", task.id),
            spec_label(&task.spec_ref, &specs_dir),
        ];
        let gh = self.gh()?;
        let existing = gh.prs.get(&branch).filter(|p| p.is_open()).cloned();
        let held = |e: crate::forge::ForgeError| {
            if self.deferred(&task.id, "open its pull request", &e) {
                Error::from(e)
            } else {
                forge(e)
            }
        };
        let pr = match existing {
            Some(pr) => pr,
            None => {
                let title = format!("{} ({})", task.title, task.id);
                let body = pr_body(task);
                // A task with no pull request recorded has none open: it is recorded in the same
                // commit as the work it shows. One that has one recorded but missing from the
                // listing is looked up before anything is opened.
                let created = if task.pr.is_none() {
                    wait(gh.client.open_draft_pr(&branch, &base, &title, &body))
                } else {
                    wait(gh.client.create_draft_pr(&branch, &base, &title, &body))
                };
                match created {
                    Ok(pr) => {
                        emit!(
                            INFO,
                            "pr_created",
                            task_id = task.id.as_str(),
                            pr = pr.url.as_str(),
                            branch = branch.as_str()
                        );
                        pr
                    }
                    Err(crate::forge::ForgeError::NoCommits { .. }) => return Ok(task.pr.clone()),
                    Err(e) => return Err(held(e)),
                }
            }
        };
        let url = pr.url.clone();
        let number = pr.number;
        if let Some(gh) = self.gh.as_mut() {
            gh.prs.insert(branch.clone(), pr.clone());
        }
        // Both labels in one request: GitHub creates a label that does not exist yet when it is
        // added, so neither a listing of the repository's labels nor a create is needed.
        let missing: Vec<&str> = labels
            .iter()
            .map(String::as_str)
            .filter(|l| !pr.has_label(l))
            .collect();
        if !missing.is_empty() {
            let gh = self.gh()?;
            match wait(gh.client.add_labels(number, &missing)) {
                Ok(now) => {
                    if let Some(gh) = self.gh.as_mut()
                        && let Some(listed) = gh.prs.get_mut(&branch)
                    {
                        listed.labels = now;
                    }
                }
                // The pull request stands; its labels follow in a later step.
                Err(e) if self.deferred(&task.id, "label its pull request", &e) => {}
                Err(e) => return Err(forge(e)),
            }
        }
        Ok(Some(url))
    }

    /// The task branch's tip to merge. When GitHub moved the branch on origin ("Update branch",
    /// asked for after a refused merge, or pressed by a person) and what is there still contains
    /// everything hyperloop verified, the local branch (and its worktree) fast-forwards to it, so
    /// the merge names the head GitHub has. A branch that went elsewhere keeps the local tip, and
    /// GitHub refuses that merge as a modified head.
    fn adopt_remote_head(&mut self, branch: &str) -> Result<Option<String>> {
        let Some(local) = self.task_branch_tip(branch)? else {
            return Ok(None);
        };
        let Some(pr) = self.gh()?.prs.get(branch).filter(|p| p.is_open()).cloned() else {
            return Ok(Some(local));
        };
        if pr.head_sha == local || pr.head_sha.is_empty() {
            return Ok(Some(local));
        }
        let Some(remote) = self.fetch_branch(branch)? else {
            return Ok(Some(local));
        };
        if remote == local
            || !self
                .repo
                .git
                .succeeds(["merge-base", "--is-ancestor", local.as_str(), remote.as_str()])?
        {
            return Ok(Some(local));
        }
        if crate::worker::worktree::set_task_ref(&self.repo.git, branch, &remote, Some(&local)).is_err() {
            return Ok(Some(local));
        }
        emit!(
            INFO,
            "branch_updated",
            branch = branch,
            from = local.as_str(),
            to = remote.as_str()
        );
        Ok(Some(remote))
    }

    fn push_task_branch(&self, branch: &str) -> Result<()> {
        let gh = self.gh()?;
        let Some(tip) = self.repo.branch_tip(branch)? else {
            return Err(Error::other(format!("no local branch {branch} to push")));
        };
        // Never forced: a person's commits on the branch are not overwritten.
        match gh.transport.push(&tip, branch)? {
            PushOutcome::Pushed => Ok(()),
            PushOutcome::Moved => Err(Error::other(format!(
                "{} has commits on {branch} that this step does not have; the next step fetches them",
                gh.remote
            ))),
            PushOutcome::Refused { message } => Err(Error::PushRefused {
                branch: branch.to_string(),
                message,
            }),
        }
    }

    /// A gate in GitHub mode: cleared by the `lgtm` label on the task's pull request.
    pub(super) fn poll_gate(&mut self, task_id: &str, gate: &str) -> Result<bool> {
        let Some(task) = self.tasks.get(task_id).cloned() else {
            return Ok(false);
        };
        // Trusted gates: an `lgtm` counts only from a writer, after the head's last change.
        let labelled = self
            .pr_for(&task)
            .filter(|pr| pr.has_label(APPROVAL_LABEL))
            .cloned();
        // A box ticked on the dashboard issue approves under the same rule (checked when read).
        let cleared = self.dashboard_approves(task_id)
            || match labelled {
                None => false,
                Some(pr) => match self.judge_approval(&task, &pr) {
                    super::trusted_gate::Verdict::Counts { .. } => true,
                    super::trusted_gate::Verdict::Undecided => false,
                    super::trusted_gate::Verdict::Ignored { by, reason } => {
                        self.refuse_approval(&task, &pr, by.as_deref(), &reason);
                        false
                    }
                },
            };
        Notable::GatePolled {
            task_id: task_id.into(),
            gate: gate.into(),
            cleared,
        }
        .emit();
        if !cleared {
            return Ok(false);
        }
        Notable::GateCleared {
            task_id: task_id.into(),
            gate: gate.into(),
        }
        .emit();
        let mut t = task;
        let change = if matches!(
            t.position
                .clone()
                .map(crate::pipeline::Position)
                .as_ref()
                .and_then(|p| crate::pipeline::step_at(self.pipeline(), p)),
            Some(crate::pipeline::Step::Gate { .. })
        ) {
            transition::gate_cleared(&mut t, self.pipeline())
        } else {
            // merge-pr with auto_merge off: the label approves the merge itself.
            t.gate_cleared = true;
            super::no_change(&t)
        };
        // Consume the approval so a later gate needs a new one; the clearing is recorded in the
        // task file, so this gate is never polled again.
        if let Some(pr) = self
            .pr_for(&t)
            .filter(|p| p.has_label(APPROVAL_LABEL))
            .map(|p| p.number)
        {
            self.write_or_keep(
                task_id,
                PendingWrite::RemoveLabel {
                    pr,
                    label: APPROVAL_LABEL.to_string(),
                },
            );
        }
        if let Some(branch) = t.branch.clone()
            && let Some(gh) = self.gh.as_mut()
            && let Some(pr) = gh.prs.get_mut(&branch)
        {
            pr.labels.retain(|l| l != APPROVAL_LABEL);
        }
        self.save_task(
            t,
            &change,
            &format!("hyperloop: {task_id} passed gate {gate} (lgtm)"),
        )?;
        Ok(true)
    }

    /// Marks the task's pull request ready for review, with its description brought up to date
    /// in the same GraphQL request. Free when the listing shows it ready already.
    pub(super) fn mark_ready_github(&mut self, task: &Task) -> Result<()> {
        let Some(pr) = self.pr_for(task).cloned() else {
            // Not in this step's listing (just opened elsewhere, or beyond its pages).
            if let Some(number) = task.pr.as_deref().and_then(pr_number) {
                let gh = self.gh()?;
                let was_draft = wait(gh.client.mark_ready(number)).map_err(|e| {
                    self.deferred(&task.id, "mark its pull request ready", &e);
                    forge(e)
                })?;
                emit!(
                    INFO,
                    "pr_marked_ready",
                    task_id = task.id.as_str(),
                    pr = number,
                    was_draft = was_draft
                );
            }
            return Ok(());
        };
        if !pr.draft {
            return Ok(());
        }
        let body = pr_body(task);
        let new_body = (pr.body.replace("\r\n", "\n").trim() != body.trim()).then_some(body.as_str());
        let gh = self.gh()?;
        wait(gh.client.ready_with_body(&pr.node_id, new_body)).map_err(|e| {
            self.deferred(&task.id, "mark its pull request ready", &e);
            forge(e)
        })?;
        emit!(
            INFO,
            "pr_marked_ready",
            task_id = task.id.as_str(),
            pr = pr.number,
            was_draft = true
        );
        if let Some(branch) = task.branch.clone()
            && let Some(gh) = self.gh.as_mut()
            && let Some(listed) = gh.prs.get_mut(&branch)
        {
            listed.draft = false;
            if new_body.is_some() {
                listed.body = body;
            }
        }
        Ok(())
    }

    /// The tip of a task's branch, fetched into the local branch when only the remote has it. A
    /// CI job starts from a fresh clone whose only local branch is the base branch, while the
    /// task's branch was pushed when its pull request opened; taking it for missing would record
    /// the task complete without merging its work.
    fn task_branch_tip(&self, branch: &str) -> Result<Option<String>> {
        if let Some(tip) = self.repo.branch_tip(branch)? {
            return Ok(Some(tip));
        }
        if !self.fetch_refspec(&format!("refs/heads/{branch}:refs/heads/{branch}"))? {
            return Ok(None);
        }
        self.repo.branch_tip(branch)
    }

    /// `merge-pr` through the API: ready the PR, merge it with the configured strategy and the
    /// trailers, then take the result into the base branch and record the task complete.
    pub(super) fn merge_github(&mut self, task: Task) -> Result<bool> {
        let id = task.id.clone();
        let branch = crate::task::file::task_branch(&id);
        if let Some(pr) = self.pr_for(&task).cloned()
            && pr.merged
        {
            self.complete_merged_elsewhere(task, &pr)?;
            return Ok(true);
        }
        let Some(branch_tip) = self.adopt_remote_head(&branch)? else {
            let mut t = task;
            let change = transition::action_done(&mut t, self.pipeline());
            self.save_task(
                t,
                &change,
                &format!("hyperloop: {id} complete (no branch to merge)"),
            )?;
            return Ok(true);
        };
        let Some(task) = self.only_what_was_verified(task, &branch_tip)? else {
            return Ok(true);
        };
        // A conflict with the base branch is the rebase-resolver's, here as in local mode.
        let base_tip = self.base_tip().to_string();
        if let MergeTree::Conflict(files) = self.repo.merge_tree(&base_tip, &branch_tip)? {
            return self.conflict(task, &branch, &files).map(|()| true);
        }
        let mut t = task;
        let url = match self.ensure_pull_request(&t) {
            Err(Error::PushRefused { branch, message }) => {
                let change = self.push_refused(&mut t, &branch, &message);
                self.save_task(t, &change, &format!("hyperloop: {id} push refused"))?;
                return Ok(true);
            }
            Ok(url) => url,
            // Its pull request waits for the pace; so does the merge.
            Err(e) if api_budget::is_held(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        if url.is_none() {
            // The branch adds nothing to the base: complete without a pull request.
            let change = transition::action_done(&mut t, self.pipeline());
            self.save_task(
                t,
                &change,
                &format!("hyperloop: {id} complete (nothing to merge)"),
            )?;
            return Ok(true);
        }
        if t.pr != url {
            t.pr.clone_from(&url);
            let change = super::no_change(&t);
            self.save_task(t.clone(), &change, &format!("hyperloop: {id} pull request"))?;
        }
        let number = url
            .as_deref()
            .and_then(pr_number)
            .ok_or_else(|| Error::other("pull request URL without a number"))?;
        // The repository's own CI is part of verification.
        match self.checks_gate(&mut t, number, &branch_tip)? {
            ci_checks::Gate::Go => {}
            ci_checks::Gate::Hold(changed) => return Ok(changed),
        }
        match self.mark_ready_github(&t) {
            Ok(()) => {}
            // The pace is spent: the merge waits for a later step.
            Err(e) if api_budget::is_held(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
        let title = format!("{} ({})", t.title, t.id);
        let message = format!("{}\n", trailers(&t.spec_ref, &t.id));
        let strategy = self.config.merge.strategy;
        let merged = {
            let gh = self.gh()?;
            wait(
                gh.client
                    .merge_pr_at(number, strategy, &title, &message, Some(branch_tip.as_str())),
            )
        };
        let outcome = match merged {
            Ok(outcome) => outcome,
            Err(e) if self.deferred(&id, "merge", &e) => return Ok(false),
            Err(e) => return Err(forge(e)),
        };
        match outcome {
            MergeOutcome::Merged { .. } | MergeOutcome::AlreadyMerged { .. } => {
                t.extra.remove("merge_blocked");
                crate::fault::point("github-merged");
                self.refresh_after_base_moved()?;
                let change = transition::action_done(&mut t, self.pipeline());
                MergeAttempt {
                    branch: Some(branch.clone()),
                    spec_ref: Some(t.spec_ref.clone()),
                    strategy: Some(strategy),
                    pr: Some(PullRequest::Number(number)),
                    ..MergeAttempt::new(&id, events::MergeOutcome::Merged)
                }
                .emit();
                self.report.merged.push(id.clone());
                self.save_task(
                    t,
                    &change,
                    &format!("hyperloop: {id} merged (pull request #{number})"),
                )?;
                if self.config.merge.delete_branch {
                    if !self.repo_deletes_merged_branches() {
                        self.write_or_keep(
                            &id,
                            PendingWrite::DeleteBranch {
                                branch: branch.clone(),
                            },
                        );
                    }
                    self.delete_task_branch(&id, &branch);
                }
                Ok(true)
            }
            MergeOutcome::NotMergeable { reason, message } => {
                MergeAttempt {
                    branch: Some(branch.clone()),
                    reason: Some(format!("{reason:?}")),
                    detail: Some(message.clone()),
                    ..MergeAttempt::new(&id, events::MergeOutcome::NotMergeable)
                }
                .emit();
                match reason {
                    NotMergeableReason::Closed => {
                        let reason = format!("pull request #{number} is closed");
                        let change = transition::fail_task(&mut t, &reason);
                        self.save_task(
                            t,
                            &change,
                            &format!("hyperloop: {id} failed (pull request closed)"),
                        )?;
                        Ok(true)
                    }
                    NotMergeableReason::HeadModified | NotMergeableReason::Draft => Ok(false),
                    NotMergeableReason::Blocked => {
                        let known = self.gh()?.checks.get(&number).cloned();
                        if let Some(why) = crate::forge::checks::merge_blocker(known.as_ref(), &message) {
                            // A rule of the repository a person must satisfy: say which, on the
                            // task and in the report, and try again in a later step.
                            emit!(
                                WARN,
                                "merge_blocked",
                                task_id = id.as_str(),
                                pr = number,
                                reason = why.as_str()
                            );
                            self.report.checks.push(format!("{id}: merge refused: {why}"));
                            let note = format!("merge refused: {why}");
                            if t.extra.get("merge_blocked").and_then(serde_json::Value::as_str)
                                != Some(note.as_str())
                            {
                                t.extra
                                    .insert("merge_blocked".into(), serde_json::Value::String(note));
                                let change = super::no_change(&t);
                                self.save_task(
                                    t,
                                    &change,
                                    &format!("hyperloop: {id} merge refused ({why})"),
                                )?;
                                return Ok(true);
                            }
                            return Ok(false);
                        }
                        // Out of date with the base: ask GitHub to bring the branch up to date;
                        // a later step tries again.
                        let gh = self.gh()?;
                        if let Err(e) = wait(gh.client.update_branch(number)) {
                            self.deferred(&id, "update its branch", &e);
                        }
                        Ok(false)
                    }
                }
            }
        }
    }
}

impl Stepper {
    /// Whether GitHub deletes a head branch after its merge by itself, so that deleting it
    /// costs no request of ours. Asked once per step, at its first merge.
    fn repo_deletes_merged_branches(&mut self) -> bool {
        let Some(gh) = self.gh.as_ref() else {
            return false;
        };
        if let Some(known) = gh.deletes_merged_branches {
            return known;
        }
        let known = wait(gh.client.deletes_branch_on_merge()).unwrap_or(false);
        if let Some(gh) = self.gh.as_mut() {
            gh.deletes_merged_branches = Some(known);
        }
        known
    }
}
