//! A step in three parts that can run apart (issue 13): `plan` claims the next agent runs as work
//! items, each with a lease committed to the state branch; `work` runs one item's agent in any
//! clone and writes its output to a folder; `record` verifies each output against its lease and
//! records it through the same path `step` records an agent it ran itself ([`Stepper::reap`]).
//!
//! `work` holds no write credential and pushes nothing, so the machine that runs an agent never
//! holds one. Everything `record` reads from an output folder is treated like input from the
//! network: the lease in the committed state, not the folder, says which task, role, round and
//! base commit the output may be for.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

use super::*;
use crate::task::Claim;
use crate::task::store::IntakeClaim;

/// Who holds a lease, as its claim's `owner` says.
pub const LEASE_OWNER: &str = "hyperloop plan";

/// The largest bundle `record` takes in from one output.
const MAX_BUNDLE_BYTES: u64 = 512 << 20;
/// The largest `item.json` or `result.json` `record` reads.
const MAX_META_BYTES: u64 = 1 << 20;
/// The longest detail recorded from an output (the rest is cut).
const MAX_DETAIL_BYTES: usize = 64 << 10;

/// The files of an output folder.
const ITEM_FILE: &str = "item.json";
const RESULT_FILE: &str = "result.json";
const BUNDLE_FILE: &str = "commits.bundle";
const TRANSCRIPT_FILE: &str = "transcript.log";

/// The branch an intake output's bundle holds the pm's commits on: the pm works detached, and
/// a bundle needs a ref.
const INTAKE_OUTPUT_BRANCH: &str = "hyperloop-intake-output";

/// One claimed agent run, as `plan --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkItem {
    /// Safe as a file name and as a matrix value.
    pub id: String,
    pub task_id: String,
    pub role: String,
    pub round: u32,
}

/// An output `record` did not apply, and why.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutputRefused {
    pub dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    pub reason: String,
}

/// `item.json`: which lease an output answers.
#[derive(Debug, Serialize, Deserialize)]
struct ItemFile {
    id: String,
    task_id: String,
    role: String,
    round: u32,
    nonce: String,
    base: String,
}

/// `result.json`: what the agent's run amounted to.
#[derive(Debug, Serialize, Deserialize)]
struct ResultOut {
    verdict: worker::Verdict,
    findings: u32,
    detail: String,
    #[serde(default)]
    cost_usd: Option<f64>,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    duration_s: f64,
}

/// A work item's id: task, role and round for people, then a hash of the lease's nonce, so that
/// an item re-issued after its lease expired never has the id of the one it replaces.
fn item_id(task_id: &str, role: &str, round: u32, nonce: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    nonce.hash(&mut h);
    let role: String = role
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{task_id}-{role}-r{round}-{:08x}", h.finish() & 0xffff_ffff)
}

/// Whether `id` could be an item id: it names a folder and a matrix entry, and goes into refs.
fn valid_item_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && !id.starts_with(['-', '.'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.contains("..")
}

/// `hyperloop plan`: everything of a step that needs no agent, then a lease for each agent run
/// the step would start (within `max_workers`, counting the leases still out, and the spending
/// caps).
pub async fn plan(target: &Target, opts: &StepOptions) -> Result<StepReport> {
    run_part(target, opts, Mode::Plan, &[]).await
}

/// `hyperloop record DIR…`: applies each output that its lease vouches for, refuses the rest,
/// then finishes the cycle as a step does.
pub async fn record(target: &Target, opts: &StepOptions, dirs: &[PathBuf]) -> Result<StepReport> {
    run_part(target, opts, Mode::Record, dirs).await
}

async fn run_part(target: &Target, opts: &StepOptions, mode: Mode, dirs: &[PathBuf]) -> Result<StepReport> {
    let lock = StepLock::acquire(&target.repo.common_dir.join("hyperloop.lock"))?;
    let mut stepper = match open(target, opts, mode).await? {
        Ok(s) => s,
        Err(report) => return Ok(report),
    };
    let done = (|| -> Result<()> {
        stepper.begin()?;
        for dir in dirs {
            stepper.record_output(dir)?;
        }
        let acted = stepper.act_now().and_then(|()| stepper.flush_staged());
        stepper.flush_cleanup();
        acted
    })();
    let result = match done {
        Ok(()) => stepper.finish(),
        Err(Error::RateLimited { message, retry_at }) => stepper
            .finish()
            .map(|report| github_mode::rate_limited(report, &message, retry_at)),
        Err(e) => {
            // What was committed stays; what is staged (a merge) is published before failing.
            let _ = stepper.flush_staged();
            Err(e)
        }
    };
    drop(lock);
    result
}

impl Stepper {
    /// Claims the run of `role` on `task_id` as a work item: a lease in the task file, committed
    /// (compare-and-swap, and pushed in GitHub mode) before anyone can run it.
    pub(super) fn claim_item(&mut self, task_id: &str, role: &str) -> Result<bool> {
        let Some(mut task) = self.tasks.get(task_id).cloned() else {
            return Ok(false);
        };
        let now = now_unix();
        if task.claim.as_ref().is_some_and(|c| c.live_lease(now)) {
            return Ok(false);
        }
        if self.defs.agent(role).is_none() {
            return Err(Error::other(format!("no agent named `{role}` for {task_id}")));
        }
        let branch = crate::task::file::task_branch(task_id);
        // The commit the agent is given: its branch, made at the base when it has none yet, so
        // that recording its output moves the branch by compare-and-swap from here.
        let base = match self.repo.branch_tip(&branch)? {
            Some(tip) => tip,
            None => {
                let base = self.base_tip().to_string();
                worktree::set_task_ref(&self.repo.git, &branch, &base, None)?;
                base
            }
        };
        let nonce = self.new_nonce();
        let id = item_id(task_id, role, task.round, &nonce);
        task.claim = Some(Claim {
            role: role.to_string(),
            owner: format!("{LEASE_OWNER} {}", std::process::id()),
            pgid: None,
            started_at: now,
            expires_at: now.saturating_add(self.config.runtime.lease_timeout()),
            nonce,
            item: Some(id.clone()),
            round: Some(task.round),
            base: Some(base.clone()),
        });
        task.branch = Some(branch);
        let change = no_change(&task);
        let round = task.round;
        self.save_task(
            task,
            &change,
            &format!("hyperloop: {task_id} {role} claimed as {id}"),
        )?;
        emit!(
            INFO,
            "item_claimed",
            item = id.as_str(),
            task_id = task_id,
            role = role,
            round = round,
            base = base.as_str(),
            lease_timeout_s = self.config.runtime.lease_timeout()
        );
        self.report.items.push(WorkItem {
            id,
            task_id: task_id.to_string(),
            role: role.to_string(),
            round,
        });
        Ok(true)
    }

    /// Claims intake as a work item: there is no task file to hold its lease, so it has a file
    /// of its own in the tasks folder, committed like a task's claim.
    pub(super) fn claim_intake(&mut self, process: &[String]) -> Result<bool> {
        let now = now_unix();
        if self
            .intake_claim
            .as_ref()
            .is_some_and(|c| c.claim.live_lease(now))
        {
            return Ok(false);
        }
        let role = intake_role(&self.defs.process);
        if self.defs.agent(&role).is_none() {
            return Err(Error::other(format!("no agent named `{role}` for intake")));
        }
        // The pm is given the state as it is now, as a step gives it; the lease's own commit
        // comes after, so the pm's checkout does not hold it.
        let base = self.tip.clone();
        let nonce = self.new_nonce();
        let id = item_id(INTAKE_ID, &role, 0, &nonce);
        let lease = IntakeClaim {
            claim: Claim {
                role: role.clone(),
                owner: format!("{LEASE_OWNER} {}", std::process::id()),
                pgid: None,
                started_at: now,
                expires_at: now.saturating_add(self.config.runtime.lease_timeout()),
                nonce,
                item: Some(id.clone()),
                round: Some(0),
                base: Some(base.clone()),
            },
            specs: self.current_specs(),
            process: process.to_vec(),
        };
        let mut changes = Changes::default();
        let mut text = to_json(&lease)?;
        text.push(b'\n');
        changes.put(format!("{}/{INTAKE_CLAIM}", self.tasks_rel()), text);
        let spec_refs: Vec<&str> = process.iter().map(String::as_str).collect();
        self.commit(
            &changes,
            &format!("hyperloop: intake claimed as {id}"),
            &spec_refs,
            INTAKE_ID,
        )?;
        self.intake_claim = Some(lease);
        emit!(
            INFO,
            "item_claimed",
            item = id.as_str(),
            task_id = INTAKE_ID,
            role = role.as_str(),
            round = 0u32,
            base = base.as_str(),
            lease_timeout_s = self.config.runtime.lease_timeout()
        );
        self.report.items.push(WorkItem {
            id,
            task_id: INTAKE_ID.to_string(),
            role,
            round: 0,
        });
        Ok(true)
    }

    /// Clears an intake lease whose `work` died, was cancelled or is too late, so that intake
    /// can be claimed (or run by a step) again, under another item id. Returns whether it did.
    pub(super) fn expire_intake_lease(&mut self) -> Result<bool> {
        let Some(lease) = &self.intake_claim else {
            return Ok(false);
        };
        let claim = &lease.claim;
        if claim.expires_at > now_unix() {
            return Ok(false);
        }
        emit!(
            WARN,
            "lease_expired",
            task_id = INTAKE_ID,
            item = claim.item.as_deref().unwrap_or("-"),
            role = claim.role.as_str(),
            expires_at = claim.expires_at
        );
        let mut changes = Changes::default();
        changes.delete(format!("{}/{INTAKE_CLAIM}", self.tasks_rel()));
        self.commit(&changes, "hyperloop: intake lease expired", &[], INTAKE_ID)?;
        self.intake_claim = None;
        Ok(true)
    }

    /// Adds the removal of the intake lease to `changes` when the intake being recorded holds
    /// it. Returns whether it did.
    pub(super) fn release_intake_lease(&mut self, changes: &mut Changes) -> bool {
        if !std::mem::take(&mut self.intake_release) {
            return false;
        }
        changes.delete(format!("{}/{INTAKE_CLAIM}", self.tasks_rel()));
        self.intake_claim = None;
        true
    }

    /// Verifies one output folder against its lease and records it, or refuses it (an event and
    /// an entry in the report; nothing of it is applied).
    pub(super) fn record_output(&mut self, dir: &Path) -> Result<()> {
        match self.verify_output(dir)? {
            Ok((record, outcome)) => {
                let item = record.key.clone();
                self.reap(&record, &outcome, outcome.duration.as_secs_f64())?;
                emit!(
                    INFO,
                    "output_recorded",
                    item = item.as_str(),
                    task_id = record.task_id.as_str(),
                    role = record.role.as_str(),
                    verdict = outcome.verdict.as_str()
                );
                self.report.recorded.push(item);
            }
            Err((item, reason)) => {
                emit!(
                    WARN,
                    "output_refused",
                    dir = dir.display().to_string().as_str(),
                    item = item.as_deref().unwrap_or("-"),
                    reason = reason.as_str()
                );
                self.report.refused.push(OutputRefused {
                    dir: dir.display().to_string(),
                    item,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Checks an output and takes its commits in (the task branch moves). `Err` inside: the
    /// output is refused, with the item it names (when it names one) and why.
    #[allow(clippy::type_complexity)]
    fn verify_output(
        &mut self,
        dir: &Path,
    ) -> Result<std::result::Result<(RunRecord, WorkerOutcome), (Option<String>, String)>> {
        let refuse = |item: Option<&str>, why: String| Ok(Err((item.map(str::to_string), why)));
        let item: ItemFile = match read_capped(&dir.join(ITEM_FILE), MAX_META_BYTES)
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{ITEM_FILE}: {e}")))
        {
            Ok(i) => i,
            Err(why) => return refuse(None, why),
        };
        let id = item.id.as_str();
        if !valid_item_id(id) {
            return refuse(None, format!("{ITEM_FILE} names no valid item id"));
        }
        // The committed lease decides; the folder only says which lease it answers.
        if let Some(lease) = self
            .intake_claim
            .clone()
            .filter(|l| l.claim.item.as_deref() == Some(id))
        {
            return self.verify_intake_output(dir, &item, lease);
        }
        let Some(task) = self
            .tasks
            .values()
            .find(|t| t.claim.as_ref().and_then(|c| c.item.as_deref()) == Some(id))
            .cloned()
        else {
            return refuse(
                Some(id),
                "no lease holds this item: never claimed, recorded already, or re-issued after its lease expired".to_string(),
            );
        };
        let Some(claim) = task.claim.clone() else {
            return refuse(Some(id), "no lease holds this item".to_string());
        };
        let Some(base) = claim.base.clone() else {
            return refuse(Some(id), "the lease names no base commit".to_string());
        };
        if item.nonce != claim.nonce
            || item.task_id != task.id
            || item.role != claim.role
            || Some(item.round) != claim.round
            || item.base != base
        {
            return refuse(
                Some(id),
                "the output does not match its lease (task, role, round, base or nonce)".to_string(),
            );
        }
        if task.round != item.round || task.status.is_terminal() && !task.cancelled {
            return refuse(
                Some(id),
                format!("{} has moved on since the item was claimed", task.id),
            );
        }
        let result = match read_result(dir) {
            Ok(r) => r,
            Err(why) => return refuse(Some(id), why),
        };
        let branch = crate::task::file::task_branch(&task.id);
        let tip = match self.import_output(dir, &branch, id, &base) {
            Ok(tip) => tip,
            Err(why) => return refuse(Some(id), why),
        };
        // Compare-and-swap from the lease's base. A branch already at the output's tip was moved
        // by a `record` that died before its commit: the same output, not a second one.
        let now = self.repo.branch_tip(&branch)?;
        // No such branch here: `plan` made it at the base in its own clone and published nothing
        // on it (the task branches origin has were fetched at the start), so a `record` on
        // another runner (the fan-out workflow's) finds it where the lease says, and creates it.
        let absent_at_base = now.is_none()
            && self
                .repo
                .git
                .succeeds(["cat-file", "-e", &format!("{base}^{{commit}}")])?;
        if !absent_at_base && now.as_deref() != Some(base.as_str()) && now.as_deref() != Some(tip.as_str()) {
            return refuse(
                Some(id),
                format!(
                    "{branch} moved since the item was claimed (at {}, lease base {base})",
                    now.as_deref().unwrap_or("(deleted)")
                ),
            );
        }
        if now.as_deref() != Some(tip.as_str()) {
            worktree::set_task_ref(&self.repo.git, &branch, &tip, now.as_deref())?;
        }
        let mut suspicious = None;
        if result.verdict.is_pass() && claim.role == "implementer" {
            if tip == base {
                suspicious = Some("implementer reported pass but made no commits".to_string());
            } else if self
                .repo
                .git
                .succeeds(["diff", "--quiet", base.as_str(), tip.as_str()])?
            {
                suspicious = Some("implementer reported pass but its commits change nothing".to_string());
            }
        }
        let detail = cut_detail(result.detail);
        // The lease ends with its output: the commit that records the result clears it.
        let mut released = task.clone();
        released.claim = None;
        self.tasks.insert(task.id.clone(), released);
        let record = RunRecord {
            key: id.to_string(),
            kind: Kind::Task,
            task_id: task.id.clone(),
            role: claim.role.clone(),
            round: item.round,
            nonce: claim.nonce.clone(),
            started_at: claim.started_at,
            worktree: PathBuf::new(),
            start_head: base,
            specs: BTreeMap::new(),
            failures: Vec::new(),
            end_head: None,
            position: Some(task.position.clone().unwrap_or_default()),
            status: Some(task.status.as_str().to_string()),
        };
        let outcome = WorkerOutcome {
            verdict: result.verdict,
            findings: result.findings,
            detail,
            exit_code: result.exit_code,
            duration: Duration::from_secs_f64(result.duration_s.clamp(0.0, 1e9)),
            log_file: dir.join(TRANSCRIPT_FILE),
            cost_usd: result.cost_usd,
            num_turns: None,
            session_id: None,
            is_error: None,
            suspicious,
            commits: Vec::new(),
            pgid: None,
        };
        Ok(Ok((record, outcome)))
    }
}

impl Stepper {
    /// [`Stepper::verify_output`] for an intake output: checked against the intake lease, the
    /// pm's commits taken in, and recorded as a step records the pm it ran; the lease goes in
    /// the commit that records it.
    #[allow(clippy::type_complexity)]
    fn verify_intake_output(
        &mut self,
        dir: &Path,
        item: &ItemFile,
        lease: IntakeClaim,
    ) -> Result<std::result::Result<(RunRecord, WorkerOutcome), (Option<String>, String)>> {
        let id = item.id.as_str();
        let refuse = |why: String| Ok(Err((Some(id.to_string()), why)));
        let claim = lease.claim;
        let Some(base) = claim.base.clone() else {
            return refuse("the lease names no base commit".to_string());
        };
        if item.nonce != claim.nonce
            || item.task_id != INTAKE_ID
            || item.role != claim.role
            || Some(item.round) != claim.round
            || item.base != base
        {
            return refuse(
                "the output does not match its lease (task, role, round, base or nonce)".to_string(),
            );
        }
        let result = match read_result(dir) {
            Ok(r) => r,
            Err(why) => return refuse(why),
        };
        let tip = match self.import_output(dir, INTAKE_OUTPUT_BRANCH, id, &base) {
            Ok(tip) => tip,
            Err(why) => return refuse(why),
        };
        self.intake_release = true;
        let record = RunRecord {
            key: id.to_string(),
            kind: Kind::Intake,
            task_id: INTAKE_ID.to_string(),
            role: claim.role.clone(),
            round: 0,
            nonce: claim.nonce.clone(),
            started_at: claim.started_at,
            worktree: PathBuf::new(),
            start_head: base,
            specs: lease.specs,
            failures: Vec::new(),
            end_head: Some(tip),
            position: None,
            status: None,
        };
        let outcome = WorkerOutcome {
            verdict: result.verdict,
            findings: result.findings,
            detail: cut_detail(result.detail),
            exit_code: result.exit_code,
            duration: Duration::from_secs_f64(result.duration_s.clamp(0.0, 1e9)),
            log_file: dir.join(TRANSCRIPT_FILE),
            cost_usd: result.cost_usd,
            num_turns: None,
            session_id: None,
            is_error: None,
            suspicious: None,
            commits: Vec::new(),
            pgid: None,
        };
        Ok(Ok((record, outcome)))
    }

    /// Takes in an output's bundle, which must hold exactly `refs/heads/<branch>` building on
    /// `base`: its tip, or `base` when the output has no bundle (no commits). `Err`: why it
    /// is refused.
    fn import_output(
        &self,
        dir: &Path,
        branch: &str,
        id: &str,
        base: &str,
    ) -> std::result::Result<String, String> {
        let bundle = dir.join(BUNDLE_FILE);
        match std::fs::symlink_metadata(&bundle) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(base.to_string()),
            Err(e) => Err(format!("{BUNDLE_FILE}: {e}")),
            Ok(m) if !m.file_type().is_file() => Err(format!("{BUNDLE_FILE} is not a regular file")),
            Ok(m) if m.len() > MAX_BUNDLE_BYTES => Err(format!(
                "{BUNDLE_FILE} is {} bytes, more than {MAX_BUNDLE_BYTES}",
                m.len()
            )),
            Ok(_) => {
                worktree::import_bundle(&self.repo.git, &bundle, branch, id, base).map_err(|e| e.to_string())
            }
        }
    }
}

/// Reads and checks an output's `result.json`. `Err`: why it is refused.
fn read_result(dir: &Path) -> std::result::Result<ResultOut, String> {
    let result: ResultOut = read_capped(&dir.join(RESULT_FILE), MAX_META_BYTES)
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{RESULT_FILE}: {e}")))?;
    if result.cost_usd.is_some_and(|c| !c.is_finite() || c < 0.0) || !result.duration_s.is_finite() {
        return Err(format!(
            "{RESULT_FILE}: cost_usd and duration_s must be finite, cost not negative"
        ));
    }
    Ok(result)
}

/// An output's detail, cut to what is recorded.
fn cut_detail(mut detail: String) -> String {
    if detail.len() > MAX_DETAIL_BYTES {
        let mut cut = MAX_DETAIL_BYTES;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push_str("\n(cut)");
    }
    detail
}

/// Reads a regular file of at most `cap` bytes, never following a symlink nor blocking on a
/// FIFO (the folder comes from a runner that is not trusted).
fn read_capped(path: &Path, cap: u64) -> std::result::Result<Vec<u8>, String> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{name}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("{name}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{name} is not a regular file"));
    }
    if meta.len() > cap {
        return Err(format!("{name} is larger than {cap} bytes"));
    }
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() as u64 > cap {
        return Err(format!("{name} is larger than {cap} bytes"));
    }
    Ok(bytes)
}

/// What `work` did, for its summary line.
#[derive(Debug, Clone, Serialize)]
pub struct WorkReport {
    pub item: String,
    pub task_id: String,
    pub role: String,
    pub verdict: String,
    pub commits: usize,
    pub out: String,
}

/// `hyperloop work ITEM --out DIR`: runs the agent of one claimed item in this clone, with every
/// runtime limit, and writes its output to `out`. Reads the state from `origin` when there is
/// one; writes nothing anywhere but this clone and `out`.
pub async fn work(target: &Target, item: &str, out: &Path) -> Result<WorkReport> {
    if !valid_item_id(item) {
        return Err(Error::usage(format!("{item:?} is not a work item id")));
    }
    let repo = &target.repo;
    let config = &target.config;
    let has_origin = repo
        .git
        .output(["config", "--get", "remote.origin.url"])
        .is_ok_and(|o| o.status.success());
    if has_origin {
        // `work` holds no credential, so a private repository's origin may refuse the fetch;
        // a clone made after `plan` pushed (a matrix job's checkout) already has the lease, and
        // one that does not is refused below like any unclaimed item.
        let fetched = repo.git.output([
            "fetch",
            "--quiet",
            "--no-tags",
            "origin",
            "+refs/heads/*:refs/remotes/origin/*",
        ])?;
        if !fetched.status.success() {
            emit!(
                WARN,
                "fetch_failed",
                remote = "origin",
                detail = String::from_utf8_lossy(&fetched.stderr).trim(),
                hint = "working from the refs this clone already has"
            );
        }
    }
    // The state as published: origin's, when this clone has one.
    let tip_of = |branch: &str| -> Result<Option<String>> {
        if has_origin && let Some(t) = repo.git.rev_parse(&format!("refs/remotes/origin/{branch}"))? {
            return Ok(Some(t));
        }
        repo.branch_tip(branch)
    };
    let state_branch = config.state_branch();
    let Some(tip) = tip_of(state_branch)? else {
        return Err(Error::usage(format!(
            "branch `{state_branch}` does not exist: nothing is claimed"
        )));
    };
    let tree = repo.read_tree_state(&tip, &config.target.specs_dir)?;
    let intake = tree
        .intake_claim
        .filter(|l| l.claim.item.as_deref() == Some(item));
    let found = tree.tasks.into_iter().find_map(|t| {
        let c = t.claim.clone()?;
        (c.item.as_deref() == Some(item)).then_some((t, c))
    });
    let Some(claim) = found
        .as_ref()
        .map(|(_, c)| c.clone())
        .or_else(|| intake.as_ref().map(|l| l.claim.clone()))
    else {
        return Err(Error::usage(format!(
            "{item} is not a claimed work item (never claimed, recorded already, or re-issued \
             after its lease expired); `hyperloop plan` prints the items to run"
        )));
    };
    let now = now_unix();
    if claim.expires_at <= now {
        return Err(Error::usage(format!(
            "the lease of {item} expired {} s ago; the next `hyperloop plan` issues the task again",
            now - claim.expires_at
        )));
    }
    let Some(base) = claim.base.clone() else {
        return Err(Error::usage(format!("the lease of {item} names no base commit")));
    };
    if !repo
        .git
        .succeeds(["cat-file", "-e", &format!("{base}^{{commit}}")])?
    {
        return Err(Error::other(format!(
            "commit {base}, which {item} starts from, is not in this clone (fetch the task's branch \
             from the repository that ran `hyperloop plan`)"
        )));
    }
    let Some((task, _)) = found else {
        let Some(lease) = intake else {
            return Err(Error::other(format!("{item} names no lease")));
        };
        return work_intake(target, item, out, &lease, &base).await;
    };
    let base_branch = config.target.base_branch.clone();
    let base_tip = tip_of(&base_branch)?.unwrap_or_else(|| tip.clone());
    prepare_agents(target)?;
    let defs = definitions::load(config, &repo.root)?;
    let overlay = read_role_overlay(repo, &config.target.specs_dir, &tip, &claim.role)?;
    let prompt_text = task_prompt(
        repo,
        config,
        &defs,
        (&task, &claim.role),
        overlay,
        (&base_tip, Some(&base)),
    )?;

    // The agent's checkout starts at the lease's base, in a checkout of its own as in `step`.
    worktree::ensure_local_excludes_in(&repo.common_dir)?;
    let branch = crate::task::file::task_branch(&task.id);
    let wt_path = worktree::task_worktree_path(&repo.root, &task.id);
    if wt_path.exists() {
        // Left by an earlier item in this clone: nothing in it belongs to this one.
        worktree::remove_worktree(&repo.git, &wt_path)?;
    }
    repo.git
        .run(["update-ref", &format!("refs/heads/{branch}"), base.as_str()])?;
    let wt = worktree::prepare_task_worktree(
        &repo.git,
        &repo.root,
        &task.id,
        &task.spec_ref,
        &branch,
        (&base_branch, &base_tip),
    )?;
    worktree::watch_task_refs(&repo.git)?;
    let spec = WorkerSpec {
        task_id: task.id.clone(),
        role: claim.role.clone(),
        spec_ref: task.spec_ref.clone(),
        round: task.round,
        branch: branch.clone(),
        base_branch: base_branch.clone(),
        worktree: wt,
        prompt: prompt_text,
        command: config.runtime.agent_command.clone(),
        agent_env: config.runtime.agent_env.clone(),
        worker_timeout: Duration::from_secs(config.runtime.worker_timeout),
        stall_timeout: Duration::from_secs(config.runtime.stall_timeout),
        log_file: worktree::worker_log_path(&repo.root, &task.id, &claim.role, task.round),
        nonce: claim.nonce.clone(),
        base_commit: Some(base.clone()),
        secret_env: config
            .observability
            .matrix
            .iter()
            .flat_map(|m| m.token_env.iter().chain(m.registration_token_env.iter()).cloned())
            .collect(),
        parent_env: None,
        known_head: Some(base.clone()),
        import_into: Some(repo.git.clone()),
        detached: false,
        supervisor: worker::supervisor::program(),
    };
    emit!(
        INFO,
        "worker_spawned",
        task_id = task.id.as_str(),
        role = claim.role.as_str(),
        round = task.round,
        branch = branch.as_str(),
        spec_ref = task.spec_ref.as_str(),
        item = item
    );
    let cancel = interrupt_on_signals()?;
    let mut outcome = worker::run_worker(&spec, cancel).await;
    // As in `step`: a branch of this clone moved by anything but hyperloop voids the run.
    let moved = worktree::restore_task_refs(&repo.git)?;
    if !moved.is_empty() {
        let names: Vec<String> = moved.iter().map(|m| format!("refs/heads/{}", m.branch)).collect();
        repo.git
            .run(["update-ref", &format!("refs/heads/{branch}"), base.as_str()])?;
        outcome.verdict = worker::Verdict::Error;
        outcome.findings = outcome.findings.max(1);
        outcome.detail = format!(
            "{} moved while the agent ran, by something other than hyperloop; nothing of this run is taken",
            names.join(", ")
        );
    }
    let end = repo.branch_tip(&branch)?.unwrap_or_else(|| base.clone());
    let bundle_ref = format!("refs/heads/{branch}");
    write_output(
        out,
        &repo.git,
        (item, &task.id, &claim),
        (&base, &end, &bundle_ref),
        &outcome,
    )?;
    crate::transcripts::publish(&outcome.log_file, &task.id, &claim.role, task.round);
    work_report(
        &repo.git,
        item,
        (&task.id, &claim.role, task.round),
        (&base, &end),
        &outcome,
        out,
    )
}

/// `work` for an intake item: the pm runs in a checkout of the lease's base with the prompt a
/// step would give it, and its commits go into the output's bundle.
async fn work_intake(
    target: &Target,
    item: &str,
    out: &Path,
    lease: &IntakeClaim,
    base: &str,
) -> Result<WorkReport> {
    let repo = &target.repo;
    let config = &target.config;
    let claim = &lease.claim;
    let specs_dir = config.target.specs_dir.clone();
    prepare_agents(target)?;
    let defs = definitions::load(config, &repo.root)?;
    let at_base = repo.read_tree_state(base, &specs_dir)?;
    let overlay = read_role_overlay(repo, &specs_dir, base, &claim.role)?;
    let prompt_text = intake_prompt(config, &defs, at_base.tasks.iter(), &lease.process, overlay)?;
    worktree::ensure_local_excludes_in(&repo.common_dir)?;
    let wt = worktree::ensure_base_worktree(&repo.git, &repo.root, INTAKE_ID, base)?;
    worktree::watch_task_refs(&repo.git)?;
    let spec = WorkerSpec {
        task_id: INTAKE_ID.to_string(),
        role: claim.role.clone(),
        spec_ref: specs_dir.clone(),
        round: 0,
        branch: config.target.base_branch.clone(),
        base_branch: config.target.base_branch.clone(),
        worktree: wt.clone(),
        prompt: prompt_text,
        command: config.runtime.agent_command.clone(),
        agent_env: config.runtime.agent_env.clone(),
        worker_timeout: Duration::from_secs(config.runtime.worker_timeout),
        stall_timeout: Duration::from_secs(config.runtime.stall_timeout),
        log_file: worktree::worker_log_path(&repo.root, INTAKE_ID, &claim.role, 0),
        nonce: claim.nonce.clone(),
        base_commit: Some(base.to_string()),
        secret_env: config
            .observability
            .matrix
            .iter()
            .flat_map(|m| m.token_env.iter().chain(m.registration_token_env.iter()).cloned())
            .collect(),
        parent_env: None,
        known_head: None,
        import_into: Some(repo.git.clone()),
        detached: true,
        supervisor: worker::supervisor::program(),
    };
    emit!(
        INFO,
        "worker_spawned",
        task_id = INTAKE_ID,
        role = claim.role.as_str(),
        round = 0u32,
        spec_ref = specs_dir.as_str(),
        item = item
    );
    let cancel = interrupt_on_signals()?;
    let mut outcome = worker::run_worker(&spec, cancel).await;
    let moved = worktree::restore_task_refs(&repo.git)?;
    let head = worker::agent_user::checkout_git(&wt).rev_parse("HEAD")?;
    // Only commits the worker took into this clone, building on the base, are handed on.
    let end = match head {
        Some(h)
            if moved.is_empty()
                && h != base
                && repo
                    .git
                    .succeeds(["cat-file", "-e", &format!("{h}^{{commit}}")])?
                && repo
                    .git
                    .succeeds(["merge-base", "--is-ancestor", base, h.as_str()])? =>
        {
            h
        }
        _ => base.to_string(),
    };
    if !moved.is_empty() {
        let names: Vec<String> = moved.iter().map(|m| format!("refs/heads/{}", m.branch)).collect();
        outcome.verdict = worker::Verdict::Error;
        outcome.findings = outcome.findings.max(1);
        outcome.detail = format!(
            "{} moved while the agent ran, by something other than hyperloop; nothing of this run is taken",
            names.join(", ")
        );
    }
    let bundle_ref = format!("refs/heads/{INTAKE_OUTPUT_BRANCH}");
    if end != base {
        repo.git.run(["update-ref", bundle_ref.as_str(), end.as_str()])?;
    }
    let written = write_output(
        out,
        &repo.git,
        (item, INTAKE_ID, claim),
        (base, &end, &bundle_ref),
        &outcome,
    );
    if end != base {
        let _ = repo.git.output(["update-ref", "-d", bundle_ref.as_str()]);
    }
    written?;
    crate::transcripts::publish(&outcome.log_file, INTAKE_ID, &claim.role, 0);
    work_report(
        &repo.git,
        item,
        (INTAKE_ID, &claim.role, 0),
        (base, &end),
        &outcome,
        out,
    )
}

/// Reports a finished `work` item: its `worker_reaped` event and what `work --json` prints.
fn work_report(
    git: &crate::git::Git,
    item: &str,
    (task_id, role, round): (&str, &str, u32),
    (base, end): (&str, &str),
    outcome: &WorkerOutcome,
    out: &Path,
) -> Result<WorkReport> {
    let commits = if end == base {
        0
    } else {
        git.run_trim(["rev-list", "--count", &format!("{base}..{end}")])?
            .parse()
            .unwrap_or(0)
    };
    emit!(
        INFO,
        "worker_reaped",
        task_id = task_id,
        role = role,
        verdict = outcome.verdict.as_str(),
        round = round,
        duration_s = outcome.duration.as_secs_f64(),
        findings_count = outcome.findings,
        cost_usd = outcome.cost_usd.unwrap_or(0.0),
        item = item
    );
    Ok(WorkReport {
        item: item.to_string(),
        task_id: task_id.to_string(),
        role: role.to_string(),
        verdict: outcome.verdict.as_str().to_string(),
        commits,
        out: out.display().to_string(),
    })
}

/// Writes an output folder: the item, the result, the transcript and (when the agent made
/// commits) a bundle of `bundle_ref` against the lease's base.
fn write_output(
    out: &Path,
    git: &crate::git::Git,
    (item, task_id, claim): (&str, &str, &Claim),
    (base, end, bundle_ref): (&str, &str, &str),
    outcome: &WorkerOutcome,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let bundle = out.join(BUNDLE_FILE);
    let _ = std::fs::remove_file(&bundle);
    if end != base {
        let shown = bundle.to_string_lossy().into_owned();
        git.run([
            "bundle",
            "create",
            "-q",
            shown.as_str(),
            bundle_ref,
            &format!("^{base}"),
        ])?;
    }
    let result = ResultOut {
        verdict: outcome.verdict,
        findings: outcome.findings,
        detail: match &outcome.suspicious {
            Some(why) => format!("{}\n\nhyperloop: {why}", outcome.detail)
                .trim()
                .to_string(),
            None => outcome.detail.clone(),
        },
        cost_usd: outcome.cost_usd,
        exit_code: outcome.exit_code,
        duration_s: outcome.duration.as_secs_f64(),
    };
    let item_file = ItemFile {
        id: item.to_string(),
        task_id: task_id.to_string(),
        role: claim.role.clone(),
        round: claim.round.unwrap_or_default(),
        nonce: claim.nonce.clone(),
        base: base.to_string(),
    };
    crate::task::store::write_atomic(&out.join(RESULT_FILE), &to_json(&result)?)?;
    crate::task::store::write_atomic(&out.join(ITEM_FILE), &to_json(&item_file)?)?;
    let transcript = out.join(TRANSCRIPT_FILE);
    if outcome.log_file.is_file() {
        // The folder is uploaded or handed to another job: it gets the redacted transcript.
        crate::transcripts::copy_redacted(&outcome.log_file, &transcript)?;
    }
    Ok(())
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids_are_safe_and_differ_by_nonce() {
        let a = item_id("task-001", "implementer", 0, "abc1");
        let b = item_id("task-001", "implementer", 0, "abc2");
        assert!(a.starts_with("task-001-implementer-r0-"), "{a}");
        assert_ne!(a, b);
        assert!(valid_item_id(&a));
        let intake = item_id(INTAKE_ID, "pm", 0, "abc1");
        assert!(intake.starts_with("intake-pm-r0-"), "{intake}");
        assert!(valid_item_id(&intake));
        for bad in ["", "../x", "-x", ".x", "a/b", "a b", "a..b"] {
            assert!(!valid_item_id(bad), "{bad:?}");
        }
    }
}
