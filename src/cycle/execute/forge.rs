//! The forge a step works against: where the state branch is published, where task branches go
//! to be seen, how gates clear and how a task is merged. Two implementations of one trait — the
//! repository itself ([`Local`]) and GitHub ([`GitHub`], whose state for the step lives in
//! `Stepper::gh`, see `github_mode`). The step picks one when it opens and asks it at each point
//! where the two differ, instead of asking "GitHub or local?" itself.

use super::*;
use crate::events::Notable;

pub(super) trait Forge: Sync {
    /// Whether task state and gates live on a remote forge (pull requests, labels, pushes).
    fn remote(&self) -> bool;

    /// The tip of `branch` as the forge has it: fetched from origin first on GitHub.
    fn tip(&self, s: &Stepper, branch: &str) -> Result<Option<String>>;

    /// Makes `branch` at `at` unless someone else made it first; where it is now.
    fn create_branch(&self, s: &Stepper, branch: &str, at: &str) -> Result<String>;

    /// Keeps a local branch of the name following where the forge has `branch`.
    fn follow(&self, s: &Stepper, branch: &str, tip: &str) -> Result<()>;

    /// The error for a branch the step needs and the forge does not have.
    fn no_branch(&self, s: &Stepper, branch: &str) -> Error;

    /// After the base branch moved: reads the branches again where the forge keeps them. False
    /// when nothing moved that the step must take in.
    fn refetch_branches(&self, s: &mut Stepper) -> Result<bool>;

    /// What the forge knows that the repository does not, brought in before the step decides:
    /// task branches pushed elsewhere, pull requests people merged or closed, label and dashboard
    /// requests, writes deferred by the API pace.
    fn sync(&self, s: &mut Stepper) -> Result<()>;

    /// Moves the state branch from the step's tip to `new` by compare-and-swap.
    fn move_state(&self, s: &mut Stepper, new: &str) -> Result<Publish>;

    /// A replay of `commit` onto `onto` conflicted: a commit that replays after all, when the
    /// conflict is one the forge knows how to settle.
    fn settle_replay(&self, s: &Stepper, commit: &str, parent: &str, onto: &str) -> Result<Option<String>>;

    /// Says, once per step and task, that a gate is still closed. On GitHub the poll of the gate
    /// says it; locally the plan is the check.
    fn note_closed_gates(&self, s: &mut Stepper, plan: &Plan);

    /// A round was recorded on a task that goes on: show its work where people look (GitHub: push
    /// the branch, open the draft pull request). A refusal to take the branch is the task's
    /// change instead of `change`.
    fn show_work(&self, s: &mut Stepper, task: &mut Task, change: TaskChange) -> TaskChange;

    /// The pipeline's `mark-pr-ready`: the subject of the commit that records it, or `None` when
    /// it is deferred to a later step.
    fn mark_ready(&self, s: &mut Stepper, task: &Task) -> Result<Option<String>>;

    /// The pipeline's `merge-pr`.
    fn merge(&self, s: &mut Stepper, task: Task) -> Result<bool>;

    /// Whether a merge commit may wait on the branch to be published with the commit after it
    /// (locally), rather than being published at once.
    fn merges_wait(&self) -> bool;

    /// What the forge does at the end of a step, once everything is recorded.
    fn finish(&self, s: &mut Stepper) -> Result<()>;
}

/// The repository itself: the state branch moves in place, gates clear with `hyperloop approve`,
/// merges are git merges.
pub(super) struct Local;

/// GitHub: see `github_mode`.
pub(super) struct GitHub;

pub(super) static LOCAL: Local = Local;
pub(super) static GITHUB: GitHub = GitHub;

impl Forge for Local {
    fn remote(&self) -> bool {
        false
    }

    fn tip(&self, s: &Stepper, branch: &str) -> Result<Option<String>> {
        s.repo.branch_tip(branch)
    }

    fn create_branch(&self, s: &Stepper, branch: &str, at: &str) -> Result<String> {
        // Compare-and-swap against "no such ref", so a branch made meanwhile is not replaced.
        let refname = format!("refs/heads/{branch}");
        let zero = "0".repeat(40);
        let out = s.repo.git.output([
            "update-ref",
            "-m",
            "hyperloop: state branch",
            refname.as_str(),
            at,
            zero.as_str(),
        ])?;
        if out.status.success() {
            return Ok(at.to_string());
        }
        s.repo
            .branch_tip(branch)?
            .ok_or_else(|| Error::other(format!("cannot create branch `{branch}`")))
    }

    fn follow(&self, _: &Stepper, _: &str, _: &str) -> Result<()> {
        Ok(())
    }

    fn no_branch(&self, s: &Stepper, branch: &str) -> Error {
        Error::other(format!(
            "branch `{branch}` does not exist in {}; commit something to it first (hyperloop works on target.base_branch)",
            s.repo.root.display()
        ))
    }

    fn refetch_branches(&self, _: &mut Stepper) -> Result<bool> {
        // The branches are here; whoever moved them moved them in this repository.
        Ok(true)
    }

    fn sync(&self, _: &mut Stepper) -> Result<()> {
        Ok(())
    }

    fn move_state(&self, s: &mut Stepper, new: &str) -> Result<Publish> {
        if s.staging.checkout.is_none() {
            s.staging.checkout = Some(s.repo.worktree_on(&format!("refs/heads/{}", s.branch))?);
        }
        let checkout = s.staging.checkout.clone().flatten();
        s.repo.publish_with(&s.branch, &s.tip, new, checkout.as_deref())
    }

    fn settle_replay(&self, _: &Stepper, _: &str, _: &str, _: &str) -> Result<Option<String>> {
        Ok(None)
    }

    fn note_closed_gates(&self, s: &mut Stepper, plan: &Plan) {
        // The key is the one a GitHub poll uses, so each parked task is reported once per step.
        for p in &plan.parked {
            if let Some(t) = s.tasks.get(&p.task_id).cloned()
                && s.first_attempt(&p.task_id, &t, "poll")
            {
                Notable::GatePolled {
                    task_id: p.task_id.clone(),
                    gate: p.step.clone(),
                    cleared: false,
                }
                .emit();
            }
        }
    }

    fn show_work(&self, _: &mut Stepper, _: &mut Task, change: TaskChange) -> TaskChange {
        change
    }

    fn mark_ready(&self, _: &mut Stepper, task: &Task) -> Result<Option<String>> {
        emit!(
            INFO,
            "pr_marked_ready",
            task_id = task.id.as_str(),
            mode = "local",
            note = "no pull request in local mode"
        );
        Ok(Some(format!(
            "hyperloop: {} mark-pr-ready (local: nothing to do)",
            task.id
        )))
    }

    fn merge(&self, s: &mut Stepper, task: Task) -> Result<bool> {
        s.merge(task)
    }

    fn merges_wait(&self) -> bool {
        true
    }

    fn finish(&self, _: &mut Stepper) -> Result<()> {
        Ok(())
    }
}

impl Forge for GitHub {
    fn remote(&self) -> bool {
        true
    }

    fn tip(&self, s: &Stepper, branch: &str) -> Result<Option<String>> {
        s.fetch_branch(branch)
    }

    fn create_branch(&self, s: &Stepper, branch: &str, at: &str) -> Result<String> {
        s.create_remote_branch(branch, at)
    }

    fn follow(&self, s: &Stepper, branch: &str, tip: &str) -> Result<()> {
        s.follow_local(branch, tip)
    }

    fn no_branch(&self, s: &Stepper, branch: &str) -> Error {
        let remote = s.gh.as_ref().map_or("origin", |g| g.remote.as_str());
        Error::other(format!("branch `{branch}` does not exist on {remote}"))
    }

    fn refetch_branches(&self, s: &mut Stepper) -> Result<bool> {
        s.refetch_from_origin()
    }

    fn sync(&self, s: &mut Stepper) -> Result<()> {
        s.load_pace();
        s.fetch_task_branches()?;
        s.sync_pull_requests()?;
        s.take_label_requests()?;
        // Hook: the dashboard issue's ticked boxes (see `dashboard`).
        s.read_dashboard()?;
        s.run_pending_writes();
        Ok(())
    }

    fn move_state(&self, s: &mut Stepper, new: &str) -> Result<Publish> {
        s.push_state(new)
    }

    fn settle_replay(&self, s: &Stepper, commit: &str, parent: &str, onto: &str) -> Result<Option<String>> {
        s.replay_with_their_pace(commit, parent, onto)
    }

    fn note_closed_gates(&self, _: &mut Stepper, _: &Plan) {}

    fn show_work(&self, s: &mut Stepper, task: &mut Task, change: TaskChange) -> TaskChange {
        // The branch goes to GitHub as soon as it has work, with its draft PR.
        match s.ensure_pull_request(task) {
            Ok(url) if url.is_some() => task.pr = url,
            Ok(_) => {}
            Err(Error::PushRefused { branch, message }) => return s.push_refused(task, &branch, &message),
            Err(e) if api_budget::is_held(&e) => {}
            Err(e) => emit!(
                WARN,
                "pr_not_created",
                task_id = task.id.as_str(),
                error = e.to_string().as_str()
            ),
        }
        change
    }

    fn mark_ready(&self, s: &mut Stepper, task: &Task) -> Result<Option<String>> {
        match s.mark_ready_github(task) {
            Ok(()) => Ok(Some(format!(
                "hyperloop: {} pull request ready for review",
                task.id
            ))),
            // Deferred for the pace; a later step readies it.
            Err(e) if api_budget::is_held(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn merge(&self, s: &mut Stepper, task: Task) -> Result<bool> {
        s.merge_github(task)
    }

    fn merges_wait(&self) -> bool {
        false
    }

    fn finish(&self, s: &mut Stepper) -> Result<()> {
        // Descriptions last, so that a task that moved several times in this step is described
        // once; then the pace, so the next step counts these writes too.
        s.flush_pr_bodies();
        // Hook: the dashboard shows the step's outcome (see `dashboard`).
        s.publish_dashboard();
        s.commit_pace()
    }
}
