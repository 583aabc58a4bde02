//! Merging a task that passed its pipeline into the base branch, locally (GitHub mode merges
//! through the API, see `github_mode`), reporting conflicts, and removing merged task branches.

use super::*;
use crate::events::{MergeAttempt, MergeOutcome};

impl Stepper {
    /// Whether the task now stands at a `merge-pr` this step performs at once (local mode,
    /// automatic merges) and its branch merges without conflict.
    pub(super) fn merges_cleanly_next(&self, task: &Task) -> Result<bool> {
        if self.forge.remote()
            || self.split_state()
            || !self.config.merge.auto_merge
            // The checks run first, through `merge`.
            || self.config.merge.local_checks.is_some()
            || task.status != Status::InProgress
        {
            return Ok(false);
        }
        let at_merge = matches!(
            task.position
                .clone()
                .map(pipeline::Position)
                .as_ref()
                .and_then(|p| pipeline::step_at(self.pipeline(), p)),
            Some(s) if s.is_merge()
        );
        if !at_merge {
            return Ok(false);
        }
        let branch = crate::task::file::task_branch(&task.id);
        let Some(branch_tip) = self.repo.branch_tip(&branch)? else {
            return Ok(false);
        };
        Ok(matches!(
            self.merge_tree(&self.tip, &branch_tip)?,
            MergeTree::Clean(_)
        ))
    }

    /// [`Repo::merge_tree`], remembering the last answer (both sides are commit ids, so it
    /// cannot go stale).
    pub(super) fn merge_tree(&self, ours: &str, theirs: &str) -> Result<MergeTree> {
        if let Some((o, t, m)) = self.memo.last_merge.borrow().as_ref()
            && o == ours
            && t == theirs
        {
            return Ok(m.clone());
        }
        let m = self.repo.merge_tree(ours, theirs)?;
        *self.memo.last_merge.borrow_mut() = Some((ours.to_string(), theirs.to_string(), m.clone()));
        Ok(m)
    }

    pub(super) fn merge(&mut self, task: Task) -> Result<bool> {
        let mut task = task;
        if let ci_checks::Gate::Hold(changed) = self.local_checks_gate(&mut task)? {
            return Ok(changed);
        }
        self.merge_with(task, Changes::default())
    }

    /// A merge takes exactly the tip that was verified. A branch that moved since (anything
    /// but the forge bringing the base in, see [`Self::base_brought_in`]) goes back to be
    /// verified again instead of merging. Returns the task when it may merge.
    pub(super) fn only_what_was_verified(&mut self, task: Task, branch_tip: &str) -> Result<Option<Task>> {
        let Some(verified) = task.verified_tip.clone() else {
            // Written before hyperloop recorded verified tips.
            return Ok(Some(task));
        };
        if verified == branch_tip || self.base_brought_in(&verified, branch_tip)? {
            return Ok(Some(task));
        }
        let id = task.id.clone();
        emit!(
            ERROR,
            "merge_refused_unverified",
            task_id = id.as_str(),
            verified = verified.as_str(),
            found = branch_tip
        );
        let detail = format!(
            "the branch moved after it was verified (verified {verified}, now {branch_tip}); it is verified again before it merges"
        );
        let mut t = task;
        let change =
            transition::unverified_head(&mut t, self.pipeline(), &detail, self.config.max_task_rounds);
        self.save_task(t, &change, &format!("hyperloop: {id} goes back to verification"))?;
        Ok(None)
    }

    /// True when `tip` is `verified` with the base branch merged in by the forge (GitHub's
    /// "update branch": a merge commit whose first parent is the verified tip and whose second
    /// is on the base branch).
    pub(super) fn base_brought_in(&self, verified: &str, tip: &str) -> Result<bool> {
        let parents = self
            .repo
            .git
            .run_trim(["rev-list", "--parents", "-n", "1", tip])?;
        let parts: Vec<&str> = parents.split_whitespace().collect();
        let [_, first, second] = parts.as_slice() else {
            return Ok(false);
        };
        if *first != verified {
            return Ok(false);
        }
        let base = format!("refs/heads/{}", self.config.target.base_branch);
        let remote_base = format!("refs/remotes/origin/{}", self.config.target.base_branch);
        for b in [base, remote_base] {
            if self.repo.git.rev_parse(&b)?.is_some()
                && self
                    .repo
                    .git
                    .succeeds(["merge-base", "--is-ancestor", second, b.as_str()])?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Merges the task's branch; `extra` changes (e.g. the verifier's review) go into the same
    /// commit.
    pub(super) fn merge_with(&mut self, task: Task, extra: Changes) -> Result<bool> {
        let id = task.id.clone();
        let branch = crate::task::file::task_branch(&id);
        let Some(branch_tip) = self.repo.branch_tip(&branch)? else {
            // Nothing was ever committed for this task: there is nothing to merge.
            let mut t = task;
            let change = transition::action_done(&mut t, self.pipeline());
            MergeAttempt {
                branch: Some(branch.clone()),
                attempt: Some(0),
                ..MergeAttempt::new(&id, MergeOutcome::NothingToMerge)
            }
            .emit();
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
        if self.split_state() {
            return self.merge_to_base(task, &branch, &branch_tip);
        }
        match self.merge_tree(&self.tip, &branch_tip)? {
            MergeTree::Clean(tree) => {
                let mut t = task;
                let change = transition::action_done(&mut t, self.pipeline());
                let mut changes = extra;
                changes.put_task(&self.tasks_rel(), &t);
                let merged_tree = self.repo.write_tree(&tree, &changes)?;
                let trailer = trailers(&t.spec_ref, &t.id);
                let (parents, message) = match self.config.merge.strategy {
                    MergeStrategy::Squash => (
                        vec![self.tip.clone()],
                        format!("{} ({})\n\n{}\n", t.title, t.id, trailer),
                    ),
                    MergeStrategy::Merge => (
                        vec![self.tip.clone(), branch_tip.clone()],
                        format!("Merge {branch}: {} ({})\n\n{}\n", t.title, t.id, trailer),
                    ),
                };
                let parent_refs: Vec<&str> = parents.iter().map(String::as_str).collect();
                let commit = self.repo.commit_tree(&merged_tree, &parent_refs, &message)?;
                crate::fault::point("merge-before-publish");
                if self.forge.merges_wait() {
                    self.stage_merge(commit);
                } else {
                    self.publish(commit)?;
                    crate::fault::point("merge-after-publish");
                }
                MergeAttempt {
                    branch: Some(branch.clone()),
                    spec_ref: Some(t.spec_ref.clone()),
                    strategy: Some(self.config.merge.strategy),
                    attempt: Some(t.rebase_attempts),
                    ..MergeAttempt::new(&id, MergeOutcome::Merged)
                }
                .emit();
                self.report.merged.push(id.clone());
                self.note_change(&t, &change);
                self.tasks.insert(id.clone(), t);
                if self.config.merge.delete_branch {
                    self.cleanup.pending.push((id, branch));
                }
                Ok(true)
            }
            MergeTree::Conflict(files) => {
                self.conflict(task, &branch, &files)?;
                Ok(true)
            }
        }
    }

    /// Records a merge conflict: the rebase-resolver gets the task, or it loops back.
    pub(super) fn conflict(&mut self, task: Task, branch: &str, files: &[String]) -> Result<()> {
        let id = task.id.clone();
        {
            {
                let mut t = task;
                let detail = format!(
                    "merging {branch} into {} conflicts in:\n{}",
                    self.config.target.base_branch,
                    files
                        .iter()
                        .map(|f| format!("- {f}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                MergeAttempt {
                    branch: Some(branch.to_string()),
                    attempt: Some(t.rebase_attempts + 1),
                    ..MergeAttempt::new(&id, MergeOutcome::Conflict)
                }
                .emit();
                let change = transition::merge_conflict(
                    &mut t,
                    self.pipeline(),
                    &detail,
                    self.config.max_rebase_attempts,
                    self.config.max_task_rounds,
                );
                self.save_task(t, &change, &format!("hyperloop: {id} merge conflict"))?;
                Ok(())
            }
        }
    }

    /// Removes a task's worktree and branch after its merge — only a branch the task file says
    /// hyperloop made.
    pub(super) fn delete_task_branch(&mut self, task_id: &str, branch: &str) -> bool {
        // The merge that makes the branch redundant must be published before it goes.
        if let Err(e) = self.flush_staged() {
            emit!(
                WARN,
                "cleanup_failed",
                task_id = task_id,
                branch = branch,
                error = e.to_string().as_str()
            );
            return false;
        }
        // Only the branch hyperloop names for this task: a task file (written by a person or an
        // agent) naming any other branch must never get that branch deleted.
        if branch != format!("worker/{task_id}")
            || branch == self.branch
            || branch == self.config.target.base_branch
        {
            emit!(
                DEBUG,
                "cleanup_skipped",
                task_id = task_id,
                branch = branch,
                reason = "not a branch hyperloop made"
            );
            return true;
        }
        let wt = worktree::task_worktree_path(&self.repo.root, task_id);
        let (removed, deleted) = worktree::remove_worktree_and_branch(&self.repo.git, &wt, branch);
        if let Err(e) = removed {
            emit!(
                WARN,
                "cleanup_failed",
                task_id = task_id,
                path = wt.display().to_string().as_str(),
                error = e.to_string().as_str()
            );
        }
        match deleted {
            Ok(()) => {
                emit!(DEBUG, "branch_deleted", task_id = task_id, branch = branch);
                true
            }
            Err(e) => {
                emit!(
                    WARN,
                    "cleanup_failed",
                    task_id = task_id,
                    branch = branch,
                    error = e.to_string().as_str()
                );
                false
            }
        }
    }

    /// Removes what merges in this step left to clean up; what fails is tried once more at the
    /// end of the step (and by every later step's start).
    pub(super) fn flush_cleanup(&mut self) {
        for (id, branch) in std::mem::take(&mut self.cleanup.pending) {
            if !self.delete_task_branch(&id, &branch) {
                self.cleanup.retry.push((id, branch));
            }
        }
    }

    /// Branches of complete tasks that a killed step merged but did not get to delete.
    pub(super) fn cleanup_merged_branches(&mut self) {
        // Without a complete task that still names its branch there is nothing to look for.
        let named = |t: &Task| t.status == Status::Complete && t.branch.is_some();
        if !self.config.merge.delete_branch || !self.tasks.values().any(named) {
            return;
        }
        // One listing of hyperloop's branch namespace, whatever the number of tasks.
        let existing: HashSet<String> =
            match self
                .repo
                .git
                .run(["for-each-ref", "--format=%(refname:short)", "refs/heads/worker/"])
            {
                Ok(out) => out.lines().map(str::to_string).collect(),
                Err(_) => return,
            };
        let leftovers: Vec<(String, String)> = self
            .tasks
            .values()
            .filter(|t| t.status == Status::Complete)
            .filter_map(|t| t.branch.clone().map(|b| (t.id.clone(), b)))
            .filter(|(_, b)| existing.contains(b))
            .collect();
        for (id, branch) in leftovers {
            self.delete_task_branch(&id, &branch);
        }
    }
}
