//! `target.state_branch`: task state on a branch of its own, for repositories whose base branch is
//! protected (or whose history should not carry hyperloop's bookkeeping).
//!
//! The design, in one rule: **the base branch gets code, the state branch gets everything
//! hyperloop writes, and the state branch is the base branch plus hyperloop's commits.**
//!
//! - The state branch is created from the base branch's tip when it does not exist (locally, or on
//!   origin in GitHub mode).
//! - Task files, the intake record and failure counter, reviews and process improvements are
//!   committed to the state branch, by the same compare-and-swap as always.
//! - Specs are read from the base branch's tree: people write them there.
//! - Task branches start from the base branch's tip, and conflicts are judged against it.
//! - A merge goes to the base branch (a local squash commit moved by compare-and-swap, carrying a
//!   checkout of the base along; or the API merge in GitHub mode). Only then is the task recorded
//!   complete, on the state branch. A step killed in between finds the branch's changes already in
//!   the base (the merged tree equals the base's) and records the completion without merging again.
//! - At the start of every step and after every merge, the base branch is brought into the state
//!   branch: a fast-forward when the state branch has nothing of its own, else a merge commit.
//!   The state branch stays a superset of the base, so intake and the process improver, whose
//!   worktrees start from the state branch, see current code and specs. If that merge conflicts
//!   (someone edited hyperloop's files on the base), the state branch is left as it is and a
//!   warning says so; nothing else depends on it, because specs and task branches come from the
//!   base itself.
//!
//! With the state branch equal to the base branch (the default) none of this applies: one branch,
//! one tip, merges and state in the same commits.

use crate::config::MergeStrategy;
use crate::cycle::decide::SpecInfo;
use crate::cycle::transition;
use crate::emit;
use crate::error::{Error, Result};
use crate::events::{MergeAttempt, MergeOutcome};
use crate::git::trailers;
use crate::state::{MergeTree, Publish, is_spec_path};
use crate::task::Task;

use super::Stepper;

impl Stepper {
    /// Whether task state lives on a branch other than the base branch.
    pub(super) fn split_state(&self) -> bool {
        self.branch != self.config.target.base_branch
    }

    /// The base branch's tip: where task branches start and merges go.
    pub(super) fn base_tip(&self) -> &str {
        self.base_tip.as_deref().unwrap_or(&self.tip)
    }

    /// Finds the branches' tips at the start of a step (creating the state branch when needed);
    /// returns the state branch's.
    pub(super) fn open_branches(&mut self) -> Result<String> {
        let forge = self.forge;
        let base = self.config.target.base_branch.clone();
        let base_tip = forge
            .tip(self, &base)?
            .ok_or_else(|| forge.no_branch(self, &base))?;
        if !self.split_state() {
            return Ok(base_tip);
        }
        forge.follow(self, &base, &base_tip)?;
        self.base_tip = Some(base_tip.clone());
        let state = self.branch.clone();
        if let Some(tip) = forge.tip(self, &state)? {
            return Ok(tip);
        }
        let tip = forge.create_branch(self, &state, &base_tip)?;
        emit!(
            INFO,
            "state_branch_created",
            branch = state.as_str(),
            from = base.as_str(),
            commit = tip.as_str()
        );
        Ok(tip)
    }

    /// Specs as people committed them to the base branch.
    pub(super) fn specs_on_base(&self) -> Result<Option<Vec<SpecInfo>>> {
        let Some(base) = self.base_tip.as_deref() else {
            return Ok(None);
        };
        let specs_dir = self.config.target.specs_dir.trim_end_matches('/');
        let listing = self
            .repo
            .git
            .run(["ls-tree", "-r", "-z", "--full-tree", base, "--", specs_dir])?;
        let mut specs = Vec::new();
        for entry in listing.split('\0').filter(|e| !e.is_empty()) {
            let Some((meta, path)) = entry.split_once('\t') else {
                continue;
            };
            let mut parts = meta.split(' ');
            if let (_, Some("blob"), Some(oid)) = (parts.next(), parts.next(), parts.next())
                && is_spec_path(path, specs_dir)
            {
                specs.push(SpecInfo {
                    path: path.to_string(),
                    hash: oid.to_string(),
                });
            }
        }
        Ok(Some(specs))
    }

    /// Brings the base branch's new commits into the state branch (see the module docs).
    pub(super) fn sync_state_with_base(&mut self) -> Result<()> {
        let Some(base_tip) = self.base_tip.clone() else {
            return Ok(());
        };
        for _ in 0..3 {
            let tip = self.tip.clone();
            let is_ancestor =
                |a: &str, b: &str| self.repo.git.succeeds(["merge-base", "--is-ancestor", a, b]);
            if is_ancestor(&base_tip, &tip)? {
                return Ok(());
            }
            let new = if is_ancestor(&tip, &base_tip)? {
                base_tip.clone()
            } else {
                match self.repo.merge_tree(&tip, &base_tip)? {
                    MergeTree::Clean(tree) => {
                        let base = &self.config.target.base_branch;
                        let message = format!("hyperloop: bring {base} into {}\n", self.branch);
                        self.repo.commit_tree(&tree, &[&tip, &base_tip], &message)?
                    }
                    MergeTree::Conflict(files) => {
                        emit!(
                            WARN,
                            "state_branch_not_synced",
                            branch = self.branch.as_str(),
                            base = self.config.target.base_branch.as_str(),
                            conflicts = files.join(",").as_str(),
                            hint = "the base branch changed files hyperloop keeps on the state branch; merge it into the state branch by hand"
                        );
                        return Ok(());
                    }
                }
            };
            // One compare-and-swap, without the replay a state commit gets: a merge commit
            // replayed would lose its second parent. On a race, merge again onto the new tip.
            match self.move_state(&new)? {
                Publish::Moved => {
                    self.tip = new;
                    self.report.commits += 1;
                    emit!(
                        DEBUG,
                        "state_branch_synced",
                        branch = self.branch.as_str(),
                        base_tip = base_tip.as_str()
                    );
                    return Ok(());
                }
                Publish::Raced(current) if !current.is_empty() => self.tip = current,
                Publish::Raced(_) => {
                    return Err(Error::other(format!(
                        "branch `{}` disappeared during the step",
                        self.branch
                    )));
                }
            }
        }
        Ok(())
    }

    /// After the base branch moved (a merge, ours or a person's): read where it is now, bring it
    /// into the state branch, and re-read the specs.
    pub(super) fn refresh_after_base_moved(&mut self) -> Result<()> {
        let forge = self.forge;
        if !forge.refetch_branches(self)? {
            return Ok(());
        }
        self.sync_state_with_base()?;
        self.reload_keep_tasks()
    }

    /// [`forge::Forge::refetch_branches`] for GitHub: the base and state branches as origin has
    /// them now. False when the state branch is where it was and is the base branch as well.
    pub(super) fn refetch_from_origin(&mut self) -> Result<bool> {
        if self.split_state() {
            let base = self.config.target.base_branch.clone();
            if let Some(tip) = self.fetch_branch(&base)? {
                self.follow_local(&base, &tip)?;
                self.base_tip = Some(tip);
            }
            self.tip = self.fetch_state()?;
            return Ok(true);
        }
        let remote = self.fetch_state()?;
        if remote == self.tip {
            return Ok(false);
        }
        self.tip = remote;
        Ok(true)
    }

    /// The local merge of a task branch when the state lives elsewhere: a commit on the base
    /// branch with the code only, then the completion on the state branch.
    pub(super) fn merge_to_base(&mut self, task: Task, branch: &str, branch_tip: &str) -> Result<bool> {
        let id = task.id.clone();
        let base = self.config.target.base_branch.clone();
        let mut merged_now = false;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let base_tip = self.base_tip().to_string();
            let tree = match self.repo.merge_tree(&base_tip, branch_tip)? {
                MergeTree::Clean(tree) => tree,
                MergeTree::Conflict(files) => {
                    self.conflict(task, branch, &files)?;
                    return Ok(true);
                }
            };
            if tree == self.repo.tree_of(&base_tip)? {
                // Nothing the base lacks: merged already (by a step that died before recording
                // it), or the branch never changed anything.
                break;
            }
            let trailer = trailers(&task.spec_ref, &task.id);
            let (parents, message) = match self.config.merge.strategy {
                MergeStrategy::Squash => (
                    vec![base_tip.clone()],
                    format!("{} ({})\n\n{}\n", task.title, task.id, trailer),
                ),
                MergeStrategy::Merge => (
                    vec![base_tip.clone(), branch_tip.to_string()],
                    format!("Merge {branch}: {} ({})\n\n{}\n", task.title, task.id, trailer),
                ),
            };
            let parent_refs: Vec<&str> = parents.iter().map(String::as_str).collect();
            let commit = self.repo.commit_tree(&tree, &parent_refs, &message)?;
            crate::fault::point("merge-before-publish");
            match self.repo.publish(&base, &base_tip, &commit)? {
                Publish::Moved => {
                    self.base_tip = Some(commit);
                    merged_now = true;
                    break;
                }
                Publish::Raced(current) if !current.is_empty() && attempts < 5 => {
                    self.base_tip = Some(current);
                }
                Publish::Raced(_) => {
                    return Err(Error::other(format!(
                        "branch `{base}` kept moving while merging {id}; giving up this step"
                    )));
                }
            }
        }
        crate::fault::point("merge-after-publish");
        MergeAttempt {
            branch: Some(branch.to_string()),
            spec_ref: Some(task.spec_ref.clone()),
            strategy: Some(self.config.merge.strategy),
            into: Some(base.clone()),
            ..MergeAttempt::new(
                &id,
                if merged_now {
                    MergeOutcome::Merged
                } else {
                    MergeOutcome::AlreadyMerged
                },
            )
        }
        .emit();
        self.sync_state_with_base()?;
        let mut t = task;
        let change = transition::action_done(&mut t, self.pipeline());
        self.save_task(t, &change, &format!("hyperloop: {id} merged into {base}"))?;
        self.report.merged.push(id.clone());
        if self.config.merge.delete_branch {
            self.delete_task_branch(&id, branch);
        }
        Ok(true)
    }
}
