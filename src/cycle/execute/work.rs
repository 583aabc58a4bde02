//! The work part of a step: one agent run, with every runtime limit. `hyperloop step` runs up to
//! `max_workers` of them in this process ([`Stepper::launch`]); `hyperloop work` runs one claimed
//! item in any clone, without a write credential, and writes its output to a folder for `record`.

use super::*;
use crate::events::{Notable, Origin};
use crate::task::Claim;
use crate::task::store::IntakeClaim;

/// `<specs>/prompts/<role>-overlay.yaml` as committed at `tip`.
/// The pm's prompt: the specs to turn into tasks and the tasks there are, as `step` and `work`
/// give it.
pub(super) fn intake_prompt<'a>(
    config: &Config,
    defs: &Definitions,
    tasks: impl Iterator<Item = &'a Task>,
    specs: &[String],
    role_overlay: Option<String>,
) -> Result<String> {
    let agent_name = intake_role(&defs.process);
    let agent = defs
        .agent(&agent_name)
        .ok_or_else(|| Error::other(format!("no agent named `{agent_name}` for intake")))?;
    let tasks_rel = format!("{}/tasks", config.target.specs_dir.trim_end_matches('/'));
    let mut existing = String::new();
    for t in tasks {
        existing.push_str(&format!(
            "- {} ({}) {} — {}\n",
            t.id, t.status, t.spec_ref, t.title
        ));
    }
    if existing.is_empty() {
        existing.push_str("(none yet: start at task-001)\n");
    }
    let spec_list: String = specs.iter().map(|s| format!("- {s}\n")).collect();
    let input = PromptInput {
        task_id: INTAKE_ID.to_string(),
        spec_ref: config.target.specs_dir.clone(),
        round: 0,
        branch: None,
        base_branch: config.target.base_branch.clone(),
        task_title: None,
        task_spec: None,
        findings: None,
        role_overlay,
        extra_sections: vec![
            ("Specs to process".to_string(), spec_list),
            ("Existing tasks".to_string(), existing),
            (
                "Where task files go".to_string(),
                format!(
                    "Write each task to `{tasks_rel}/<id>.md`; the file name must equal the id. Commit them."
                ),
            ),
        ],
    };
    Ok(prompt::compose(agent, &input))
}

pub(super) fn read_role_overlay(
    repo: &Repo,
    specs_dir: &str,
    tip: &str,
    role: &str,
) -> Result<Option<String>> {
    let rel = format!("{}/prompts/{role}-overlay.yaml", specs_dir.trim_end_matches('/'));
    let spec = format!("{tip}:{rel}");
    let Some(oid) = repo.git.rev_parse_object(&spec)? else {
        return Ok(None);
    };
    let bytes = repo.cat_blobs(std::iter::once(oid.as_str()))?;
    let text = String::from_utf8_lossy(bytes.first().map_or(&[][..], Vec::as_slice)).into_owned();
    prompt::parse_role_overlay(Path::new(&rel), &text)
}

/// The prompt of a task's agent: the same text whether `step` runs the agent or a `work` job
/// does. `tips` are the base branch's tip and the task branch's (when it exists).
pub(super) fn task_prompt(
    repo: &Repo,
    config: &Config,
    defs: &Definitions,
    (task, role): (&Task, &str),
    role_overlay: Option<String>,
    (base_tip, branch_tip): (&str, Option<&str>),
) -> Result<String> {
    let agent = defs
        .agent(role)
        .ok_or_else(|| Error::other(format!("no agent named `{role}` for {}", task.id)))?;
    let branch = crate::task::file::task_branch(&task.id);
    let mut extra = Vec::new();
    if (role == pipeline::REBASE_RESOLVER || task.status == Status::NeedsRebase)
        && let Some(branch_tip) = branch_tip
    {
        extra = conflict_sections(repo, &config.target.base_branch, base_tip, branch_tip)?;
    }
    let findings = task.findings().to_string();
    let input = PromptInput {
        task_id: task.id.clone(),
        spec_ref: task.spec_ref.clone(),
        round: task.round,
        branch: Some(branch),
        base_branch: config.target.base_branch.clone(),
        task_title: Some(task.title.clone()),
        task_spec: Some(task.spec_text().to_string()),
        findings: (!findings.is_empty()).then_some(findings),
        role_overlay,
        extra_sections: extra,
    };
    Ok(prompt::compose(agent, &input))
}

/// Prompt sections for the rebase-resolver: what conflicts and what changed on the base.
pub(super) fn conflict_sections(
    repo: &Repo,
    base_branch: &str,
    base_tip: &str,
    branch_tip: &str,
) -> Result<Vec<(String, String)>> {
    let mut sections = Vec::new();
    if let MergeTree::Conflict(files) = repo.merge_tree(base_tip, branch_tip)? {
        sections.push((
            "Conflicting files".to_string(),
            files.iter().map(|f| format!("- {f}\n")).collect(),
        ));
    }
    let base = repo
        .git
        .run_trim(["merge-base", base_tip, branch_tip])
        .unwrap_or_default();
    if !base.is_empty() {
        let log = repo.git.run([
            "log",
            "--oneline",
            "--no-decorate",
            "-n",
            "50",
            &format!("{base}..{base_tip}"),
        ])?;
        let stat = repo.git.run(["diff", "--stat", &base, base_tip])?;
        sections.push((
            format!("Changes on {base_branch} since this branch started"),
            format!("Base branch tip: {base_tip}\n\n{log}\n{stat}"),
        ));
    }
    Ok(sections)
}

/// Passes the step's stop (a signal) on to one worker's own stop, until the worker is gone.
pub(super) fn forward_stop(mut step: watch::Receiver<bool>, worker: watch::Sender<bool>) {
    tokio::spawn(async move {
        tokio::select! {
            () = async {
                loop {
                    if *step.borrow_and_update() {
                        let _ = worker.send(true);
                        return;
                    }
                    if step.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                }
            } => {}
            () = worker.closed() => {}
        }
    });
}

pub(super) fn intake_role(process: &definitions::Process) -> String {
    process
        .intake
        .iter()
        .find_map(|s| match s {
            Step::Role { name, .. } => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "pm".to_string())
}

/// Stops every process whose environment carries this worker nonce (a worker of a dead step and
/// anything it started). Returns how many were signalled.
pub(super) fn kill_by_nonce(nonce: &str) -> u64 {
    let needle = format!("HYPERLOOP_NONCE={nonce}");
    let mut killed = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|var| var == needle.as_bytes()) {
            // SAFETY: sending a signal to a pid we just found; no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
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
    let improver_path = format!(
        "{}/tasks/{IMPROVER_CLAIM}",
        config.target.specs_dir.trim_end_matches('/')
    );
    let improver = read_state_file::<ImproverClaim>(repo, &tree.task_blobs, &improver_path)?
        .filter(|l| l.claim.item.as_deref() == Some(item));
    let found = tree.tasks.into_iter().find_map(|t| {
        let c = t.claim.clone()?;
        (c.item.as_deref() == Some(item)).then_some((t, c))
    });
    let Some(claim) = found
        .as_ref()
        .map(|(_, c)| c.clone())
        .or_else(|| intake.as_ref().map(|l| l.claim.clone()))
        .or_else(|| improver.as_ref().map(|l| l.claim.clone()))
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
        if let Some(lease) = improver {
            return work_improver(target, item, out, &lease, &base).await;
        }
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
    Notable::WorkerSpawned {
        task_id: task.id.clone(),
        role: claim.role.clone(),
        round: task.round,
        branch: Some(branch.clone()),
        spec_ref: task.spec_ref.clone(),
        origin: Origin::Work { item: item.into() },
    }
    .emit();
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
/// The process improver's prompt: its agent, and the failures it is to learn from.
pub(super) fn improver_prompt(
    agent: &definitions::Agent,
    failures: &[FailureNote],
    prompts_dir: &str,
    base_branch: &str,
    role_overlay: Option<String>,
) -> String {
    let mut text_failures = String::new();
    for f in failures {
        text_failures.push_str(&format!(
            "### {} — {} round {}: {}\n\n{}\n\n",
            f.task_id,
            f.role,
            f.round,
            f.verdict,
            f.detail.trim()
        ));
    }
    let input = PromptInput {
        task_id: IMPROVER_ID.to_string(),
        spec_ref: prompts_dir.to_string(),
        round: 0,
        branch: None,
        base_branch: base_branch.to_string(),
        task_title: None,
        task_spec: None,
        findings: None,
        role_overlay,
        extra_sections: vec![("Failure findings".to_string(), text_failures)],
    };
    prompt::compose(agent, &input)
}

pub(super) async fn work_intake(
    target: &Target,
    item: &str,
    out: &Path,
    lease: &IntakeClaim,
    base: &str,
) -> Result<WorkReport> {
    let (repo, config) = (&target.repo, &target.config);
    let run = |defs: &Definitions, overlay| {
        let at_base = repo.read_tree_state(base, &config.target.specs_dir)?;
        Ok(Detached {
            task_id: INTAKE_ID,
            output_branch: INTAKE_OUTPUT_BRANCH,
            spec_ref: config.target.specs_dir.clone(),
            prompt: intake_prompt(config, defs, at_base.tasks.iter(), &lease.process, overlay)?,
        })
    };
    work_detached(target, item, out, &lease.claim, base, run).await
}

/// `work` for a process-improver item: the improver, given the failures its lease holds, in a
/// checkout of the lease's base; its commits go in the output like the pm's.
pub(super) async fn work_improver(
    target: &Target,
    item: &str,
    out: &Path,
    lease: &ImproverClaim,
    base: &str,
) -> Result<WorkReport> {
    let config = &target.config;
    let role = &lease.claim.role;
    let run = |defs: &Definitions, overlay| {
        let agent = defs
            .agent(role)
            .ok_or_else(|| Error::other(format!("no agent named `{role}` for {item}")))?;
        let prompts_dir = format!("{}/prompts", config.target.specs_dir.trim_end_matches('/'));
        let prompt = improver_prompt(
            agent,
            &lease.failures,
            &prompts_dir,
            &config.target.base_branch,
            overlay,
        );
        Ok(Detached {
            task_id: IMPROVER_ID,
            output_branch: IMPROVER_OUTPUT_BRANCH,
            spec_ref: prompts_dir,
            prompt,
        })
    };
    work_detached(target, item, out, &lease.claim, base, run).await
}

/// An agent run that works on the base branch, detached, rather than on a task's branch (the
/// pm, the process improver).
pub(super) struct Detached {
    task_id: &'static str,
    /// The branch the output's bundle holds the commits on.
    output_branch: &'static str,
    spec_ref: String,
    prompt: String,
}

/// Runs a detached item's agent at `base` and writes its output. `run` makes the run from the
/// definitions and the role's overlay as committed at `base`.
async fn work_detached(
    target: &Target,
    item: &str,
    out: &Path,
    claim: &Claim,
    base: &str,
    run: impl FnOnce(&Definitions, Option<String>) -> Result<Detached>,
) -> Result<WorkReport> {
    prepare_agents(target)?;
    let defs = definitions::load(&target.config, &target.repo.root)?;
    let overlay = read_role_overlay(&target.repo, &target.config.target.specs_dir, base, &claim.role)?;
    let run = run(&defs, overlay)?;
    let repo = &target.repo;
    let config = &target.config;
    let task_id = run.task_id;
    worktree::ensure_local_excludes_in(&repo.common_dir)?;
    let wt = worktree::ensure_base_worktree(&repo.git, &repo.root, task_id, base)?;
    worktree::watch_task_refs(&repo.git)?;
    let spec = WorkerSpec {
        task_id: task_id.to_string(),
        role: claim.role.clone(),
        spec_ref: run.spec_ref.clone(),
        round: 0,
        branch: config.target.base_branch.clone(),
        base_branch: config.target.base_branch.clone(),
        worktree: wt.clone(),
        prompt: run.prompt,
        command: config.runtime.agent_command.clone(),
        agent_env: config.runtime.agent_env.clone(),
        worker_timeout: Duration::from_secs(config.runtime.worker_timeout),
        stall_timeout: Duration::from_secs(config.runtime.stall_timeout),
        log_file: worktree::worker_log_path(&repo.root, task_id, &claim.role, 0),
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
    Notable::WorkerSpawned {
        task_id: task_id.into(),
        role: claim.role.clone(),
        round: 0,
        branch: None,
        spec_ref: run.spec_ref.clone(),
        origin: Origin::Work { item: item.into() },
    }
    .emit();
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
    let bundle_ref = format!("refs/heads/{}", run.output_branch);
    if end != base {
        repo.git.run(["update-ref", bundle_ref.as_str(), end.as_str()])?;
    }
    let written = write_output(
        out,
        &repo.git,
        (item, task_id, claim),
        (base, &end, &bundle_ref),
        &outcome,
    );
    if end != base {
        let _ = repo.git.output(["update-ref", "-d", bundle_ref.as_str()]);
    }
    written?;
    crate::transcripts::publish(&outcome.log_file, task_id, &claim.role, 0);
    work_report(
        &repo.git,
        item,
        (task_id, &claim.role, 0),
        (base, &end),
        &outcome,
        out,
    )
}

/// Reports a finished `work` item: its `worker_reaped` event and what `work --json` prints.
pub(super) fn work_report(
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
    Notable::WorkerReaped {
        task_id: task_id.into(),
        role: role.into(),
        verdict: outcome.verdict,
        round,
        duration_s: outcome.duration.as_secs_f64(),
        findings_count: outcome.findings,
        cost_usd: outcome.cost_usd.unwrap_or(0.0),
        origin: Origin::Work { item: item.into() },
        log: None,
    }
    .emit();
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
pub(super) fn write_output(
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

pub(super) fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::other(e.to_string()))
}

impl Stepper {
    pub(super) fn new_nonce(&mut self) -> String {
        self.pool.nonce_counter += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{:x}{:x}{:x}", nanos, std::process::id(), self.pool.nonce_counter)
    }

    pub(super) fn role_overlay(&self, role: &str) -> Result<Option<String>> {
        {
            let mut cache = self.memo.overlays.borrow_mut();
            if cache.0 != self.tip {
                *cache = (self.tip.clone(), HashMap::new());
            } else if let Some(known) = cache.1.get(role) {
                return Ok(known.clone());
            }
        }
        let overlay = self.read_role_overlay(role)?;
        self.memo
            .overlays
            .borrow_mut()
            .1
            .insert(role.to_string(), overlay.clone());
        Ok(overlay)
    }

    pub(super) fn read_role_overlay(&self, role: &str) -> Result<Option<String>> {
        read_role_overlay(&self.repo, self.specs_dir(), &self.tip, role)
    }

    pub(super) fn worker_spec(
        &mut self,
        record: &RunRecord,
        prompt_text: String,
        spec_ref: &str,
        branch: &str,
    ) -> WorkerSpec {
        let log_file =
            worktree::worker_log_path(&self.repo.root, &record.task_id, &record.role, record.round);
        WorkerSpec {
            task_id: record.task_id.clone(),
            role: record.role.clone(),
            spec_ref: spec_ref.to_string(),
            round: record.round,
            branch: branch.to_string(),
            base_branch: self.config.target.base_branch.clone(),
            worktree: record.worktree.clone(),
            prompt: prompt_text,
            command: self.config.runtime.agent_command.clone(),
            agent_env: self.config.runtime.agent_env.clone(),
            worker_timeout: Duration::from_secs(self.config.runtime.worker_timeout),
            stall_timeout: Duration::from_secs(self.config.runtime.stall_timeout),
            log_file,
            nonce: record.nonce.clone(),
            base_commit: Some(record.start_head.clone()),
            secret_env: self.secret_env(),
            parent_env: None,
            known_head: None,
            import_into: Some(self.repo.git.clone()),
            detached: record.kind != Kind::Task,
            supervisor: worker::supervisor::program(),
        }
    }

    /// Environment names that hold credentials in this configuration, never given to agents.
    pub(super) fn secret_env(&self) -> Vec<String> {
        let mut names = Vec::new();
        if let Some(m) = &self.config.observability.matrix {
            names.extend(m.token_env.iter().cloned());
            names.extend(m.registration_token_env.iter().cloned());
        }
        names
    }

    pub(super) fn launch(&mut self, record: RunRecord, spec: WorkerSpec) -> Result<()> {
        self.launch_with(record, spec, None)
    }

    /// Starts the worker; `new_worktree`, when given, is made by the worker before its agent
    /// runs.
    pub(super) fn launch_with(
        &mut self,
        record: RunRecord,
        spec: WorkerSpec,
        new_worktree: Option<NewWorktree>,
    ) -> Result<()> {
        // A worker starts from published state only: what it was started for must survive a
        // crash of this step.
        self.flush_staged()?;
        let dir = self.running_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let text = serde_json::to_vec_pretty(&record).map_err(|e| Error::other(e.to_string()))?;
        // An outcome left by an earlier run of this key must not pass for this run's.
        let saved = (record.kind == Kind::Task).then(|| outcome_path(&dir, &record.key));
        if let Some(p) = &saved {
            let _ = std::fs::remove_file(p);
        }
        crate::fault::point("before-run-record");
        crate::task::store::write_atomic(&dir.join(format!("{}.json", record.key)), &text)?;
        crate::fault::point("before-spawn");
        Notable::WorkerSpawned {
            task_id: record.task_id.clone(),
            role: record.role.clone(),
            round: record.round,
            branch: Some(spec.branch.clone()),
            spec_ref: spec.spec_ref.clone(),
            origin: Origin::Step {
                cycle: self.report.cycle,
            },
        }
        .emit();
        self.report.spawned.push(WorkerRun {
            task_id: record.task_id.clone(),
            role: record.role.clone(),
            round: record.round,
            verdict: None,
            duration_s: 0.0,
            cost_usd: None,
        });
        let key = record.key.clone();
        let (stop, cancel) = watch::channel(false);
        forward_stop(self.pool.cancel_rx.clone(), stop.clone());
        self.pool.running.insert(
            key.clone(),
            Running {
                record,
                started: Instant::now(),
                stop,
            },
        );
        self.pool.joins.spawn(async move {
            let cancelled = cancel.clone();
            if let Some(nw) = new_worktree {
                let made = tokio::task::spawn_blocking(move || nw.make()).await;
                let failure = match made {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = failure {
                    let detail = format!("cannot prepare the task's worktree: {why}");
                    return (
                        key,
                        WorkerOutcome::error(detail, spec.log_file.clone(), Duration::ZERO),
                    );
                }
            }
            let outcome = worker::run_worker(&spec, cancel).await;
            if let Some(path) = saved
                && !*cancelled.borrow()
            {
                let saved = SavedOutcome {
                    verdict: outcome.verdict,
                    findings: outcome.findings,
                    detail: outcome.detail.clone(),
                    cost_usd: outcome.cost_usd,
                    suspicious: outcome.suspicious.clone(),
                };
                if let Ok(text) = serde_json::to_vec(&saved) {
                    let _ = crate::task::store::write_atomic(&path, &text);
                }
            }
            (key, outcome)
        });
        crate::fault::point("after-spawn");
        self.show_progress();
        Ok(())
    }

    pub(super) fn spawn_task(&mut self, task_id: &str, role: &str) -> Result<()> {
        let Some(task) = self.tasks.get(task_id).cloned() else {
            return Ok(());
        };
        if self.defs.agent(role).is_none() {
            return Err(Error::other(format!("no agent named `{role}` for {task_id}")));
        }
        let mut task = task;
        let branch = crate::task::file::task_branch(task_id);
        let known = worktree::task_worktree_path(&self.repo.root, task_id);
        if !self.memo.excludes_ok {
            worktree::ensure_local_excludes_in(&self.repo.common_dir)?;
            self.memo.excludes_ok = true;
        }
        let mut new_worktree = None;
        let (wt, start_head) = if self.memo.worktrees_ready.contains(task_id) && known.join(".git").exists() {
            // Checked and repaired earlier in this step; the worker since then settled it.
            worktree::refresh_base(&known, &self.config.target.base_branch, self.base_tip())?;
            let head = worker::agent_user::checkout_git(&known).run_trim(["rev-parse", "HEAD"])?;
            (known, head)
        } else if !known.exists() && self.repo.branch_tip(&branch)?.is_none() {
            // A task's first worker: its worktree is made by the worker itself, so that the
            // next agent does not wait for this checkout.
            let base = self.base_tip().to_string();
            new_worktree = Some(NewWorktree {
                git: self.repo.git.clone(),
                root: self.repo.root.clone(),
                task_id: task_id.to_string(),
                spec_ref: task.spec_ref.clone(),
                branch: branch.clone(),
                base_branch: self.config.target.base_branch.clone(),
                base: base.clone(),
            });
            self.memo.worktrees_ready.insert(task_id.to_string());
            (known, base)
        } else {
            let wt = worktree::prepare_task_worktree(
                &self.repo.git,
                &self.repo.root,
                task_id,
                &task.spec_ref,
                &branch,
                (&self.config.target.base_branch, self.base_tip()),
            )?;
            self.memo.worktrees_ready.insert(task_id.to_string());
            let head = worker::agent_user::checkout_git(&wt).run_trim(["rev-parse", "HEAD"])?;
            (wt, head)
        };
        if task.branch.as_deref() != Some(branch.as_str()) {
            // Record the branch before anything runs on it, so cleanup knows hyperloop made it.
            task.branch = Some(branch.clone());
            let change = no_change(&task);
            self.save_task(
                task.clone(),
                &change,
                &format!("hyperloop: {task_id} works on {branch}"),
            )?;
        }
        let branch_tip = self.repo.branch_tip(&branch)?;
        let text = task_prompt(
            &self.repo,
            &self.config,
            &self.defs,
            (&task, role),
            self.role_overlay(role)?,
            (self.base_tip(), branch_tip.as_deref()),
        )?;
        let nonce = self.new_nonce();
        let record = RunRecord {
            key: task_id.to_string(),
            kind: Kind::Task,
            task_id: task_id.to_string(),
            role: role.to_string(),
            round: task.round,
            nonce,
            started_at: now_unix(),
            worktree: wt,
            start_head,
            specs: BTreeMap::new(),
            failures: Vec::new(),
            end_head: None,
            position: Some(task.position.clone().unwrap_or_default()),
            status: Some(task.status.as_str().to_string()),
        };
        let mut spec = self.worker_spec(&record, text, &task.spec_ref, &branch);
        if new_worktree.is_none() {
            // Looked up just now, and nothing moves a task's worktree between here and the agent.
            spec.known_head = Some(record.start_head.clone());
        }
        self.launch_with(record, spec, new_worktree)
    }

    pub(super) fn spawn_intake(&mut self, specs: &[String]) -> Result<()> {
        let agent_name = intake_role(&self.defs.process);
        let overlay = self.role_overlay(&agent_name)?;
        let text = intake_prompt(&self.config, &self.defs, self.tasks.values(), specs, overlay)?;
        let wt = worktree::ensure_base_worktree(&self.repo.git, &self.repo.root, INTAKE_ID, &self.tip)?;
        let record = RunRecord {
            key: INTAKE_ID.to_string(),
            kind: Kind::Intake,
            task_id: INTAKE_ID.to_string(),
            role: agent_name,
            round: 0,
            nonce: self.new_nonce(),
            started_at: now_unix(),
            start_head: self.tip.clone(),
            worktree: wt,
            specs: self
                .specs
                .iter()
                .map(|s| (s.path.clone(), s.hash.clone()))
                .collect(),
            failures: Vec::new(),
            end_head: None,
            position: None,
            status: None,
        };
        let spec_dir = self.specs_dir().to_string();
        let base = self.config.target.base_branch.clone();
        let spec = self.worker_spec(&record, text, &spec_dir, &base);
        self.launch(record, spec)
    }

    pub(super) fn spawn_improver(&mut self, failures: &[FailureNote]) -> Result<()> {
        let role = "process-improver".to_string();
        let Some(agent) = self.defs.agent(&role).cloned() else {
            emit!(
                DEBUG,
                "process_improver_skipped",
                reason = "no process-improver agent"
            );
            return Ok(());
        };
        let wt = worktree::ensure_base_worktree(&self.repo.git, &self.repo.root, IMPROVER_ID, &self.tip)?;
        let prompts_dir = format!("{}/prompts", self.specs_dir().trim_end_matches('/'));
        let text = improver_prompt(
            &agent,
            failures,
            &prompts_dir,
            &self.config.target.base_branch,
            self.role_overlay(&role)?,
        );
        let record = RunRecord {
            key: IMPROVER_ID.to_string(),
            kind: Kind::Improver,
            task_id: IMPROVER_ID.to_string(),
            role,
            round: 0,
            nonce: self.new_nonce(),
            started_at: now_unix(),
            start_head: self.tip.clone(),
            worktree: wt,
            specs: BTreeMap::new(),
            failures: failures.iter().map(|f| f.task_id.clone()).collect(),
            end_head: None,
            position: None,
            status: None,
        };
        let base = self.config.target.base_branch.clone();
        let spec = self.worker_spec(&record, text, &prompts_dir, &base);
        self.launch(record, spec)
    }

    /// Drops a worker that will not be recorded (the step is being cancelled).
    pub(super) fn forget(&mut self, key: &str) {
        self.pool.running.remove(key);
        let _ = std::fs::remove_file(outcome_path(&self.running_dir(), key));
        let _ = std::fs::remove_file(self.running_dir().join(format!("{key}.json")));
    }
}
