//! How a step changes task state: one commit per change, made without a checkout
//! ([`crate::state`]), and moved onto the state branch by compare-and-swap — pushed at once in
//! GitHub mode; locally a merge waits to be published with the commit that follows it.

use super::*;
use crate::events::Notable;

impl Stepper {
    /// Commits `changes` on the branch tip with trailers and moves the branch. Retries on a
    /// race by replaying the commit onto the new tip.
    pub(super) fn commit(
        &mut self,
        changes: &Changes,
        subject: &str,
        spec_refs: &[&str],
        task_ref: &str,
    ) -> Result<bool> {
        let message = commit_message(subject, "", spec_refs, task_ref);
        // The pace of GitHub writes rides along with the task state it paid for.
        let with_pace = self.with_pace(changes);
        let changes = with_pace.as_ref().unwrap_or(changes);
        let Some(new) = self.repo.commit_changes(&self.tip, changes, &message)? else {
            return Ok(false);
        };
        crate::fault::point("before-publish");
        let prompts = format!("{}/prompts/", self.specs_dir().trim_end_matches('/'));
        self.staging.prompts_unchanged = !changes.files.keys().any(|p| p.starts_with(&prompts));
        let published = self.publish(new);
        self.staging.prompts_unchanged = false;
        published?;
        Ok(true)
    }

    /// Keeps a commit on top of `tip` local for now (see `staged`).
    pub(super) fn stage_merge(&mut self, new: String) {
        self.staging.merges += 1;
        if self.staging.published.is_none() {
            self.staging.published = Some(self.tip.clone());
        }
        self.staging.commits.push(new.clone());
        self.tip = new;
    }

    /// Publishes what is staged.
    pub(super) fn flush_staged(&mut self) -> Result<()> {
        match self.staging.commits.pop() {
            Some(last) => self.publish(last),
            None => Ok(()),
        }
    }

    /// Moves the state branch to `new`, a child of `tip`, with whatever is staged before it.
    pub(super) fn publish(&mut self, new: String) -> Result<()> {
        let mut chain = std::mem::take(&mut self.staging.commits);
        let merges = std::mem::take(&mut self.staging.merges);
        chain.push(new);
        if let Some(published) = self.staging.published.take() {
            self.tip = published;
        }
        for _ in 0..5 {
            let Some(new) = chain.last().cloned() else {
                return Ok(());
            };
            match self.move_state(&new)? {
                Publish::Moved => {
                    crate::fault::point("after-publish");
                    for _ in 0..merges {
                        crate::fault::point("merge-after-publish");
                    }
                    let overlays = self.memo.overlays.get_mut();
                    if self.staging.prompts_unchanged && chain.len() == 1 && overlays.0 == self.tip {
                        overlays.0.clone_from(&new);
                    }
                    self.tip = new;
                    self.report.commits += u32::try_from(chain.len()).unwrap_or(u32::MAX);
                    return Ok(());
                }
                Publish::Raced(current) if !current.is_empty() => {
                    emit!(
                        INFO,
                        "state_rebased",
                        branch = self.branch.as_str(),
                        onto = current.as_str()
                    );
                    // Each commit again on top of the other writer's, in order.
                    let mut replayed = Vec::with_capacity(chain.len());
                    let (mut parent, mut onto) = (self.tip.clone(), current.clone());
                    for commit in &chain {
                        let replayed_commit = match self.repo.replay(commit, &parent, &onto)? {
                            Some(c) => Some(c),
                            None => {
                                let forge = self.forge;
                                forge.settle_replay(self, commit, &parent, &onto)?
                            }
                        };
                        let Some(again) = replayed_commit else {
                            return Err(Error::other(format!(
                                "branch `{}` changed during the step in a way that conflicts with hyperloop's state commit",
                                self.branch
                            )));
                        };
                        parent.clone_from(commit);
                        onto.clone_from(&again);
                        replayed.push(again);
                    }
                    self.tip = current;
                    // Someone else changed the branch: their edits to task files win where
                    // they touched them, so read the state again — with this step's own
                    // changes on top, as they will be published.
                    if let Some(head) = replayed.last() {
                        self.reload_keep_tasks_at(head)?;
                    }
                    chain = replayed;
                }
                Publish::Raced(_) => {
                    return Err(Error::other(format!(
                        "branch `{}` disappeared during the step",
                        self.branch
                    )));
                }
            }
        }
        Err(Error::other(format!(
            "branch `{}` kept moving; giving up this step",
            self.branch
        )))
    }

    /// A replay that conflicted only because both writers recorded the GitHub API pace (two
    /// steps at once, each having made requests): `commit` again with the other writer's pace,
    /// replayed. The pace is a guide, kept below GitHub's limits with a margin; one step's share
    /// missing from it until the next pace commit is worth less than a failed step.
    pub(super) fn replay_with_their_pace(
        &self,
        commit: &str,
        parent: &str,
        onto: &str,
    ) -> Result<Option<String>> {
        let pace = self.pace_path();
        let Some(theirs) = self.repo.git.rev_parse_object(&format!("{onto}:{pace}"))? else {
            return Ok(None);
        };
        let mut changes = Changes::default();
        changes.put_blob(pace, "100644", theirs);
        let tree = self.repo.write_tree(commit, &changes)?;
        let raw = self.repo.git.run(["cat-file", "commit", commit])?;
        let (header, message) = raw.split_once("\n\n").unwrap_or((raw.as_str(), ""));
        let mut parents: Vec<&str> = header.lines().filter_map(|l| l.strip_prefix("parent ")).collect();
        if parents.is_empty() {
            parents.push(parent);
        }
        let rewritten = self.repo.commit_tree(&tree, &parents, message)?;
        self.repo.replay(&rewritten, parent, onto)
    }

    /// Moves the state branch from the current tip to `new` by compare-and-swap (pushing, in
    /// GitHub mode).
    pub(super) fn move_state(&mut self, new: &str) -> Result<Publish> {
        let forge = self.forge;
        forge.move_state(self, new)
    }

    /// After the branch moved under us: take what the other writer changed, except for the
    /// tasks this step has workers for (a change to those would have made the replay conflict).
    pub(super) fn reload_keep_tasks(&mut self) -> Result<()> {
        let tip = self.tip.clone();
        self.reload_keep_tasks_at(&tip)
    }

    /// [`Stepper::reload_keep_tasks`] from the state at `commit`.
    pub(super) fn reload_keep_tasks_at(&mut self, commit: &str) -> Result<()> {
        let tree = self.repo.read_tree_state(commit, &self.config.target.specs_dir)?;
        self.set_specs(tree.specs)?;
        let busy: HashSet<String> = self
            .pool
            .running
            .values()
            .map(|r| r.record.task_id.clone())
            .collect();
        for t in tree.tasks {
            if !busy.contains(&t.id) {
                self.tasks.insert(t.id.clone(), t);
            }
        }
        Ok(())
    }

    /// Writes one task's new state in its own commit and reports its change.
    pub(super) fn save_task(&mut self, task: Task, change: &TaskChange, subject: &str) -> Result<()> {
        let mut changes = Changes::default();
        changes.put_task(&self.tasks_rel(), &task);
        let spec = task.spec_ref.clone();
        let id = task.id.clone();
        self.commit(&changes, subject, &[&spec], &id)?;
        self.note_change(&task, change);
        self.tasks.insert(id, task);
        Ok(())
    }

    pub(super) fn note_change(&mut self, task: &Task, change: &TaskChange) {
        self.redescribe.insert(task.id.clone());
        for ev in &change.events {
            match ev {
                ChangeEvent::Started | ChangeEvent::Advanced | ChangeEvent::RebaseResolved => emit!(
                    DEBUG,
                    "task_advanced",
                    task_id = task.id.as_str(),
                    spec_ref = task.spec_ref.as_str(),
                    from_phase = change.from_phase.as_deref().unwrap_or("-"),
                    to_phase = change.to_phase.as_deref().unwrap_or("-"),
                    from_status = change.from_status.as_str(),
                    to_status = change.to_status.as_str(),
                    round = task.round
                ),
                ChangeEvent::Relocated { .. } => emit!(
                    INFO,
                    "task_advanced",
                    task_id = task.id.as_str(),
                    note = "position recovered from the phase name",
                    to_phase = change.to_phase.as_deref().unwrap_or("-")
                ),
                ChangeEvent::RestartedPipeline { reason } => emit!(
                    WARN,
                    "task_restarted",
                    task_id = task.id.as_str(),
                    reason = reason.as_str()
                ),
                ChangeEvent::LoopedBack {
                    verdict,
                    findings,
                    detail,
                } => Notable::TaskLoopedBack {
                    task_id: task.id.clone(),
                    spec_ref: task.spec_ref.clone(),
                    round: task.round,
                    verdict: verdict.clone(),
                    findings_count: *findings,
                    findings_preview: preview(detail),
                }
                .emit(),
                ChangeEvent::Completed => {
                    Notable::TaskCompleted {
                        task_id: task.id.clone(),
                        spec_ref: task.spec_ref.clone(),
                        total_rounds: task.round,
                        cost_usd: task.cost_usd,
                    }
                    .emit();
                    self.report.completed.push(task.id.clone());
                }
                ChangeEvent::Failed { reason } => {
                    Notable::TaskFailed {
                        task_id: task.id.clone(),
                        spec_ref: task.spec_ref.clone(),
                        reason: reason.clone(),
                        round: task.round,
                    }
                    .emit();
                    self.report.failed.push(task.id.clone());
                }
                ChangeEvent::Cancelled { reason } => {
                    emit!(
                        WARN,
                        "task_cancelled",
                        task_id = task.id.as_str(),
                        spec_ref = task.spec_ref.as_str(),
                        reason = reason.as_str(),
                        round = task.round
                    );
                    self.report.failed.push(task.id.clone());
                }
                ChangeEvent::Retried { from_reason } => emit!(
                    INFO,
                    "task_retried",
                    task_id = task.id.as_str(),
                    spec_ref = task.spec_ref.as_str(),
                    to_status = task.status.as_str(),
                    to_phase = task.phase.as_deref().unwrap_or("-"),
                    round = task.round,
                    was = from_reason.as_str()
                ),
                ChangeEvent::NeedsRebase {
                    attempt,
                    max_attempts,
                } => Notable::RebaseConflict {
                    task_id: task.id.clone(),
                    attempt: *attempt,
                    max_attempts: *max_attempts,
                    looping_back: false,
                }
                .emit(),
                ChangeEvent::RebaseGaveUp { attempts } => Notable::RebaseConflict {
                    task_id: task.id.clone(),
                    attempt: *attempts,
                    max_attempts: self.config.max_rebase_attempts,
                    looping_back: true,
                }
                .emit(),
                ChangeEvent::Ignored { reason } => {
                    emit!(
                        DEBUG,
                        "task_unchanged",
                        task_id = task.id.as_str(),
                        reason = reason.as_str()
                    );
                }
            }
        }
    }
}
