//! The one place that sequences I/O for a step: recover what a killed step left, then decide and
//! act until nothing more can start — start workers (at most `max_workers` at once), record each
//! result the moment it arrives (one commit per change of state), clear gates, merge — and exit.
//!
//! Every change of task state is a commit made without a checkout ([`crate::state`]) and moved
//! onto the branch by compare-and-swap. A step killed at any instant loses at most the worker runs
//! in flight, whose branches keep every commit the agents made.
//!
//! GitHub mode lives in the `github_mode` submodule, a state branch apart from the base branch in
//! `state_branch`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::Target;
use crate::config::{Config, MergeStrategy};
use crate::cycle::decide::{self, Snapshot, SpecInfo};
use crate::cycle::plan::{Action, FailureNote, Plan, Progress};
use crate::cycle::transition::{self, ChangeEvent, TaskChange};
use crate::definitions::prompt::{self, PromptInput};
use crate::definitions::{self, Definitions};
use crate::emit;
use crate::error::{Error, Result};
use crate::events::now_unix;
use crate::git::{Git, trailers};
use crate::lock::StepLock;
use crate::pipeline::{self, MARK_PR_READY, MERGE_PR, Step, Verdict};
use crate::state::{Changes, MergeTree, Publish, Repo};
use crate::task::store::{INTAKE_CLAIM, INTAKE_FAILURES, INTAKE_RECORD, IntakeClaim, IntakeFailures};
use crate::task::{Attempt, Status, Task};
use crate::worker::{self, WorkerOutcome, WorkerSpec, result::ResultFile, worktree};

mod api_budget;
mod ci_checks;
mod dashboard;
mod fanout;
mod github_mode;
mod requests;
mod state_branch;
mod trusted_gate;

pub use fanout::{LEASE_OWNER, OutputRefused, WorkItem, plan, record, work};

pub use requests::{CANCEL_LABEL, Op, RETRY_LABEL, operate, request_cancel};

/// Task id used for the intake worker (CONTRACT §4).
pub const INTAKE_ID: &str = "intake";
/// Failed intakes of the same specs after which intake stops until the specs change.
pub const MAX_INTAKE_ATTEMPTS: u32 = 3;

/// Task id used for the process improver (CONTRACT §4).
pub const IMPROVER_ID: &str = "process-improvement";

/// Options of one step.
#[derive(Debug, Clone, Default)]
pub struct StepOptions {
    /// Start no new worker after this long.
    pub max_duration: Option<Duration>,
    /// The cycle number (for events), when `run` drives the step.
    pub cycle: u64,
    /// Flips to true when the step must stop (SIGTERM/SIGINT); see [`interrupt_on_signals`].
    pub interrupt: Option<watch::Receiver<bool>>,
}

/// A receiver that flips to true on SIGTERM or SIGINT. Installed once per process, so a signal
/// between two steps of `run` is not lost. Must be called inside the runtime.
pub fn interrupt_on_signals() -> Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::other(format!("cannot watch for SIGTERM: {e}")))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| Error::other(format!("cannot watch for SIGINT: {e}")))?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tx.send(true);
        // Keep the sender alive so receivers see `true` rather than a closed channel.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

/// Resolves when `rx` says stop; never, without a receiver.
pub async fn interrupted(rx: &mut Option<watch::Receiver<bool>>) {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// One worker run, as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRun {
    pub task_id: String,
    pub role: String,
    pub round: u32,
    pub verdict: Option<String>,
    pub duration_s: f64,
    pub cost_usd: Option<f64>,
}

/// What a step did, for `--json` and for `run`'s stop decision.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepReport {
    pub cycle: u64,
    pub spawned: Vec<WorkerRun>,
    pub reaped: Vec<WorkerRun>,
    pub merged: Vec<String>,
    pub completed: Vec<String>,
    pub failed: Vec<String>,
    pub blocked: Vec<String>,
    pub waiting: Vec<String>,
    pub intake_ran: bool,
    pub improver_ran: bool,
    pub commits: u32,
    pub tasks_total: usize,
    pub tasks_complete: usize,
    pub tasks_failed: usize,
    /// `all-complete`, `working`, `waiting`, `stuck`, `idle`, or `rate-limited` (see
    /// `rate_limited_until`).
    pub progress: String,
    pub work_remaining: bool,
    pub duration_s: f64,
    pub cost_usd: f64,
    /// When GitHub's rate limit ended the step early: the time (RFC 3339) to try again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limited_until: Option<String>,
    /// Intake failed too often on these specs, configuration and agents and waits for a change
    /// or `hyperloop retry intake`: its last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intake_gave_up: Option<String>,
    /// Task branches the forge refused, with its reason: those tasks went back to their agents.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub push_refused: Vec<RefusedPush>,
    /// Tasks held at `merge-pr` by their checks or by a rule of the repository, one line each
    /// ("task-001: waiting for checks: test, lint").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<String>,
    /// GitHub mode: the requests this step made, the budget left, what waits for the pace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub github_api: Option<crate::forge::budget::ApiUsage>,
    /// Work items `plan` claimed in this step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<WorkItem>,
    /// Outputs `record` applied, by item id.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recorded: Vec<String>,
    /// Outputs `record` refused, with the reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<OutputRefused>,
    /// Agent runs on tasks that a `plan` started right after this cycle would claim: what the
    /// fan-out workflow reads to start its next round at once instead of waiting for the
    /// schedule. The process improver is left out, since `plan` leaves it to `step`.
    pub ready: usize,
}

/// A push of a task's branch that the forge refused.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RefusedPush {
    pub task_id: String,
    pub reason: String,
}

/// What kind of worker a running entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Task,
    Intake,
    Improver,
}

/// A worker started by this step; also written to disk so a later step can find it if this one
/// dies.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    key: String,
    kind: Kind,
    task_id: String,
    role: String,
    round: u32,
    nonce: String,
    started_at: u64,
    worktree: PathBuf,
    /// The worktree's HEAD when the worker started.
    start_head: String,
    /// For intake: the spec hashes it was asked to take in.
    #[serde(default)]
    specs: BTreeMap<String, String>,
    /// For the improver: the failures it was shown.
    #[serde(default)]
    failures: Vec<String>,
    /// For intake recorded from a `work` output: the pm's last commit (a step reads it from
    /// the checkout instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end_head: Option<String>,
    /// For a task: where it stood when the worker started, so that a result is recorded only
    /// while the task still stands there.
    #[serde(default)]
    position: Option<Vec<usize>>,
    #[serde(default)]
    status: Option<String>,
}

/// What a task's worker reported, saved next to its run record the moment the worker ends, so
/// that a step killed before recording it records it on the next step instead of running the
/// agent again (the worker has removed the result file by then).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedOutcome {
    verdict: worker::Verdict,
    findings: u32,
    detail: String,
    #[serde(default)]
    cost_usd: Option<f64>,
    #[serde(default)]
    suspicious: Option<String>,
}

/// A task's first worktree, made on a worker's thread.
struct NewWorktree {
    git: Git,
    root: PathBuf,
    task_id: String,
    spec_ref: String,
    branch: String,
    base_branch: String,
    base: String,
}

impl NewWorktree {
    fn make(self) -> Result<()> {
        worktree::prepare_task_worktree(
            &self.git,
            &self.root,
            &self.task_id,
            &self.spec_ref,
            &self.branch,
            (&self.base_branch, &self.base),
        )
        .map(|_| ())
    }
}

fn outcome_path(running_dir: &Path, key: &str) -> PathBuf {
    running_dir.join(format!("{key}.outcome"))
}

/// What would make a refused push possible, from the forge's message: what the agent can change,
/// and what only a person can.
fn refusal_hint(message: &str) -> String {
    let m = message.to_ascii_lowercase();
    if m.contains("workflow") && (m.contains("permission") || m.contains("scope")) {
        "The token that pushes may not create or update files under .github/workflows/. Drop the \
         workflow change from the branch; if the task needs it, a person must push it, or \
         hyperloop must run with a GitHub App or a token that has the `workflows` permission."
            .to_string()
    } else if m.contains("secret") || m.contains("gh013") {
        "Push protection found a secret in the branch. Remove it from every commit of the branch \
         (rewrite the commits that added it); never commit credentials."
            .to_string()
    } else if m.contains("gh001") || m.contains("large file") || m.contains("exceeds") {
        "A file is larger than the remote accepts. Remove it from every commit of the branch \
         (rewrite the commits that added it), or use Git LFS."
            .to_string()
    } else {
        "A rule of the repository refuses this push. Change the branch so that it complies, or ask \
         a person to change the rule."
            .to_string()
    }
}

/// Runs one step on `target`.
pub async fn step(target: &Target, opts: &StepOptions) -> Result<StepReport> {
    let lock = StepLock::acquire(&target.repo.common_dir.join("hyperloop.lock"))?;
    let mut stepper = match open(target, opts, Mode::Step).await? {
        Ok(s) => s,
        Err(report) => return Ok(report),
    };
    let result = match stepper.run().await {
        // Everything done so far is committed (and pushed); the rest waits for the reset.
        Err(Error::RateLimited { message, retry_at }) => stepper
            .finish()
            .map(|report| github_mode::rate_limited(report, &message, retry_at)),
        Ok(report) => Ok(when_to_come_back(report)),
        other => other,
    };
    drop(lock);
    result
}

/// A rate-limit refusal that the step survived (the writes it stopped are deferred) still tells
/// the scheduler when to come back.
fn when_to_come_back(report: StepReport) -> StepReport {
    match report
        .github_api
        .as_ref()
        .and_then(|api| api.blocked_until.as_deref())
        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
    {
        Some(at) => github_mode::rate_limited(
            report,
            "GitHub refused a request with a rate limit; the writes it stopped are deferred",
            at.with_timezone(&chrono::Utc),
        ),
        None => report,
    }
}

/// Sets up what agents run under (their user, no credential in the repository's configuration)
/// and opens a [`Stepper`] for `mode`, under the step lock the caller holds. `Err` is the report
/// of a step that GitHub's rate limit ended before it began.
async fn open(
    target: &Target,
    opts: &StepOptions,
    mode: Mode,
) -> Result<std::result::Result<Stepper, StepReport>> {
    let repo = target.repo.clone();
    prepare_agents(target)?;
    let defs = definitions::load(&target.config, &repo.root)?;
    let gh = match target.config.target.repo.as_deref() {
        Some(slug) => match github_mode::connect(slug, &repo).await {
            Ok(gh) => Some(gh),
            Err(Error::RateLimited { message, retry_at }) => {
                return Ok(Err(github_mode::rate_limited(
                    StepReport {
                        cycle: opts.cycle,
                        ..StepReport::default()
                    },
                    &message,
                    retry_at,
                )));
            }
            Err(e) => return Err(e),
        },
        None => None,
    };
    let mut stepper = Stepper::new(repo, target.config.clone(), defs, opts, gh)?;
    stepper.mode = mode;
    Ok(Ok(stepper))
}

/// What must hold before any agent runs in this process: the configured agent user is set up,
/// and no credential persisted in the repository's git configuration is within its reach.
fn prepare_agents(target: &Target) -> Result<()> {
    let repo = &target.repo;
    let agent_user = match worker::agent_user::configured(target.config.runtime.agent_user.as_deref()) {
        Some(name) => Some(worker::agent_user::resolve(&name)?),
        None => None,
    };
    if let Some(u) = &agent_user {
        // Logs and run records are hyperloop's: closed to the agent user.
        use std::os::unix::fs::PermissionsExt;
        for dir in [
            worktree::logs_dir(&repo.root),
            repo.root.join(".hyperloop").join("state"),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(&dir, e))?;
        }
        emit!(
            INFO,
            "agent_user",
            user = u.name.as_str(),
            uid = u.uid,
            via_sudo = u.via_sudo
        );
    }
    worker::agent_user::set_current(agent_user);
    for entry in crate::secrets::scrub_repository_config(&repo.git)? {
        emit!(
            WARN,
            "persisted_credential_removed",
            entry = entry.as_str(),
            hint = "agents could read it from the repository's git configuration; set `persist-credentials: false` on actions/checkout"
        );
    }
    Ok(())
}

/// Prints what the next step would do, changing nothing.
pub fn dry_run(target: &Target) -> Result<String> {
    let defs = definitions::load(&target.config, &target.repo.root)?;
    let mut out = String::new();
    out.push_str(&format!("# configuration ({})\n", target.config_file.display()));
    out.push_str(&target.config.render());
    out.push_str("\n# definitions\n");
    out.push_str(&defs.render());
    let branch = target.config.state_branch();
    out.push_str("\n# plan\n");
    match target.repo.branch_tip(branch)? {
        None => out.push_str(&format!("branch `{branch}` does not exist yet: nothing to do\n")),
        Some(tip) => {
            let specs_dir = &target.config.target.specs_dir;
            let tree = target.repo.read_tree_state(&tip, specs_dir)?;
            // With task state on a branch of its own, the specs people write are on the base.
            let base = &target.config.target.base_branch;
            let specs = match target.repo.branch_tip(base)? {
                Some(base_tip) if base != branch => target.repo.read_tree_state(&base_tip, specs_dir)?.specs,
                _ => tree.specs.clone(),
            };
            let snapshot = Snapshot {
                tasks: tree.tasks.clone(),
                specs: specs
                    .iter()
                    .map(|s| SpecInfo {
                        path: s.path.clone(),
                        hash: s.hash.clone(),
                    })
                    .collect(),
                intake_record: tree.intake_record.clone(),
                running: BTreeSet::new(),
                pending_failures: Vec::new(),
                // A `work` holding the intake lease is running it.
                intake_running: tree
                    .intake_claim
                    .as_ref()
                    .is_some_and(|c| c.claim.live_lease(now_unix())),
                github_mode: target.config.target.repo.is_some(),
            };
            let mut plan = decide::decide(&snapshot, &target.config, &defs.process, now_unix())?;
            if let Some(f) = &tree.intake_failures {
                let specs = snapshot
                    .specs
                    .iter()
                    .map(|s| (s.path.clone(), s.hash.clone()))
                    .collect();
                let inputs = inputs_fingerprint(&target.repo, &target.config, &defs)?;
                if gave_up(f, &specs, &inputs) {
                    plan.actions.retain(|a| !matches!(a, Action::RunIntake { .. }));
                    out.push_str(&format!(
                        "intake gave up after {} attempts on these specs (last error: {}); {INTAKE_GAVE_UP_HINT}\n",
                        f.attempts,
                        preview(&f.last_error)
                    ));
                }
            }
            out.push_str(&plan.to_string());
            out.push('\n');
        }
    }
    Ok(out)
}

struct Running {
    record: RunRecord,
    started: Instant,
    /// Stops this worker alone (a `hyperloop cancel` of its task).
    stop: watch::Sender<bool>,
}

/// Which part of a step a [`Stepper`] performs: all of it, or one of the fan-out commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Plan, run the agents in this process, record: `hyperloop step`.
    Step,
    /// Everything that needs no agent, and a lease for each agent run instead of the run.
    Plan,
    /// Everything that needs no agent; agent runs come from outputs of `work`.
    Record,
}

struct Stepper {
    mode: Mode,
    repo: Repo,
    config: Config,
    defs: Definitions,
    branch: String,
    tip: String,
    tasks: BTreeMap<String, Task>,
    specs: Vec<SpecInfo>,
    intake_record: BTreeMap<String, String>,
    intake_failures: Option<IntakeFailures>,
    /// Intake was wanted but has failed too often on these specs.
    intake_blocked: bool,
    /// The lease of an intake `plan` claimed, as committed.
    intake_claim: Option<IntakeClaim>,
    /// The intake being recorded came from a `work` output: its lease goes in the commit that
    /// records it.
    intake_release: bool,
    running: HashMap<String, Running>,
    workers: JoinSet<(String, WorkerOutcome)>,
    pending_failures: Vec<FailureNote>,
    improver_ran: bool,
    intake_attempted: bool,
    /// Actions already tried in this step at a given position, so a failed one is not retried
    /// in a tight loop.
    attempted: HashSet<(String, Vec<usize>, String)>,
    report: StepReport,
    cancel_tx: watch::Sender<bool>,
    cancel_rx: watch::Receiver<bool>,
    interrupt: Option<watch::Receiver<bool>>,
    deadline: Option<Instant>,
    started: Instant,
    nonce_counter: u64,
    gh: Option<github_mode::GitHubMode>,
    /// Print a progress line for people watching a terminal.
    live: bool,
    /// Tasks whose worker crashed or timed out in this step: they wait for the next step
    /// instead of burning their rounds back to back.
    cooling: HashSet<String>,
    /// The total spending cap was reached: no worker starts in this step.
    budget_blocked: bool,
    /// The base branch's tip, when task state lives on another branch (`target.state_branch`).
    base_tip: Option<String>,
    /// Task worktrees made ready earlier in this step.
    worktrees_ready: HashSet<String>,
    /// The worktree that has the state branch checked out (looked up once per step).
    checkout: Option<Option<PathBuf>>,
    /// The last merge computed, by (ours, theirs): checking that a task merges cleanly and then
    /// merging it asks the same question twice.
    last_merge: std::cell::RefCell<Option<(String, String, MergeTree)>>,
    /// Merged tasks whose worktree and branch are to be removed once the workers that can start
    /// have started: cleanup is never on the way of the next agent.
    pending_cleanup: Vec<(String, String)>,
    /// Cleanups that failed in this step, tried again at its end.
    cleanup_retry: Vec<(String, String)>,
    /// `.git/info/exclude` was checked in this step.
    excludes_ok: bool,
    /// Role overlays read at a state commit, by role; carried over to commits that do not
    /// touch the prompts folder.
    overlays: std::cell::RefCell<(String, HashMap<String, Option<String>>)>,
    /// The commit being published leaves the prompts folder as it was.
    prompts_unchanged: bool,
    /// Local commits on top of the published branch, oldest first (`tip` is the last): a merge
    /// is published together with the commit that follows it (usually the next task's start),
    /// and always before a worker starts, a branch is deleted, or the step waits or ends.
    staged: Vec<String>,
    /// Where the branch is while `staged` is not empty.
    published: Option<String>,
    /// How many of the staged commits are merges.
    staged_merges: usize,
    /// The fingerprint of the configuration and agents (see [`IntakeFailures::inputs`]).
    inputs: std::cell::OnceCell<String>,
    /// Tasks whose pull request description may no longer show their state (GitHub mode).
    redescribe: HashSet<String>,
}

impl Stepper {
    fn new(
        repo: Repo,
        config: Config,
        defs: Definitions,
        opts: &StepOptions,
        gh: Option<github_mode::GitHubMode>,
    ) -> Result<Stepper> {
        let branch = config.state_branch().to_string();
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let started = Instant::now();
        let live = std::io::IsTerminal::is_terminal(&std::io::stderr())
            && config.observability.log_format == crate::config::LogFormat::Console;
        // Under the step lock: whatever private index a dead step left is garbage now.
        repo.discard_private_indexes();
        let mut stepper = Stepper {
            mode: Mode::Step,
            repo,
            branch,
            tasks: BTreeMap::new(),
            specs: Vec::new(),
            intake_record: BTreeMap::new(),
            intake_failures: None,
            intake_blocked: false,
            intake_claim: None,
            intake_release: false,
            running: HashMap::new(),
            workers: JoinSet::new(),
            pending_failures: Vec::new(),
            improver_ran: false,
            intake_attempted: false,
            attempted: HashSet::new(),
            report: StepReport {
                cycle: opts.cycle,
                ..StepReport::default()
            },
            cancel_tx,
            cancel_rx,
            interrupt: opts.interrupt.clone(),
            deadline: opts.max_duration.map(|d| started + d),
            started,
            nonce_counter: 0,
            config,
            defs,
            gh,
            tip: String::new(),
            base_tip: None,
            worktrees_ready: HashSet::new(),
            checkout: None,
            last_merge: std::cell::RefCell::new(None),
            pending_cleanup: Vec::new(),
            cleanup_retry: Vec::new(),
            excludes_ok: false,
            overlays: std::cell::RefCell::new((String::new(), HashMap::new())),
            prompts_unchanged: false,
            staged: Vec::new(),
            published: None,
            staged_merges: 0,
            inputs: std::cell::OnceCell::new(),
            redescribe: HashSet::new(),
            budget_blocked: false,
            live,
            cooling: HashSet::new(),
        };
        stepper.tip = stepper.open_branches()?;
        Ok(stepper)
    }

    fn specs_dir(&self) -> &str {
        &self.config.target.specs_dir
    }

    fn tasks_rel(&self) -> String {
        format!("{}/tasks", self.specs_dir().trim_end_matches('/'))
    }

    fn pipeline(&self) -> &[Step] {
        &self.defs.process.pipeline
    }

    fn running_dir(&self) -> PathBuf {
        self.repo.local_dir().join("state").join("running")
    }

    fn reload(&mut self) -> Result<()> {
        let tree = self
            .repo
            .read_tree_state(&self.tip, &self.config.target.specs_dir)?;
        self.tasks = tree.tasks.into_iter().map(|t| (t.id.clone(), t)).collect();
        self.intake_record = tree.intake_record;
        self.intake_failures = tree.intake_failures;
        self.intake_claim = tree.intake_claim;
        self.set_specs(tree.specs)
    }

    /// The specs of the state just read — or the base branch's, when task state lives apart.
    fn set_specs(&mut self, read: Vec<crate::state::SpecBlob>) -> Result<()> {
        self.specs = match self.specs_on_base()? {
            Some(specs) => specs,
            None => read
                .into_iter()
                .map(|s| SpecInfo {
                    path: s.path,
                    hash: s.hash,
                })
                .collect(),
        };
        Ok(())
    }

    fn current_specs(&self) -> BTreeMap<String, String> {
        self.specs
            .iter()
            .map(|s| (s.path.clone(), s.hash.clone()))
            .collect()
    }

    /// What every part of a step does first: settle what a killed step left, read the state,
    /// recover dead workers, and (GitHub mode) read the forge.
    fn begin(&mut self) -> Result<()> {
        self.repo.finish_interrupted_publish()?;
        self.sync_state_with_base()?;
        self.reload()?;
        emit!(
            INFO,
            "cycle_started",
            cycle = self.report.cycle,
            tasks = self.tasks.len(),
            max_workers = self.config.runtime.max_workers
        );
        self.recover()?;
        if self.gh.is_some() {
            self.load_pace();
            self.fetch_task_branches()?;
            self.sync_pull_requests()?;
            self.take_label_requests()?;
            // Hook: the dashboard issue's ticked boxes (see `dashboard`).
            self.read_dashboard()?;
            self.run_pending_writes();
        }
        // From here on, a task branch is only where hyperloop puts it.
        worktree::watch_task_refs(&self.repo.git)?;
        self.cleanup_merged_branches();
        Ok(())
    }

    async fn run(&mut self) -> Result<StepReport> {
        self.begin()?;
        let mut interrupt = self.interrupt.clone();
        let mut cancelled = interrupt.as_ref().is_some_and(|rx| *rx.borrow());
        if cancelled {
            let _ = self.cancel_tx.send(true);
        }
        // After a quiet look for requests there is nothing new to decide.
        let mut decide_again = true;
        let outcome = loop {
            if !cancelled && decide_again {
                let acted = self
                    .take_cancel_requests()
                    .and_then(|_| self.act_now())
                    .and_then(|()| self.flush_staged());
                self.flush_cleanup();
                if let Err(e) = acted {
                    break Err(e);
                }
            }
            decide_again = true;
            if self.workers.is_empty() {
                if cancelled {
                    break Err(Error::other(
                        "the step was interrupted; running workers were stopped",
                    ));
                }
                // Nothing running: act() found nothing more to do.
                break Ok(());
            }
            tokio::select! {
                joined = self.workers.join_next() => {
                    let Some(joined) = joined else { continue };
                    match joined {
                        Ok((key, outcome)) => {
                            if cancelled {
                                self.forget(&key);
                            } else if let Err(e) = self.on_worker_done(&key, &outcome) {
                                break Err(e);
                            }
                        }
                        Err(e) => break Err(Error::other(format!("a worker task failed: {e}"))),
                    }
                }
                () = interrupted(&mut interrupt), if !cancelled => {
                    cancelled = true;
                    let _ = self.cancel_tx.send(true);
                }
                () = tokio::time::sleep(requests::POLL), if !cancelled => {
                    match self.take_cancel_requests() {
                        Ok(applied) => decide_again = applied,
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        // Interrupted or not, a merge made in this step is kept.
        let flushed = self.flush_staged();
        let outcome = outcome.and(flushed);
        if outcome.is_err() {
            // Stop what still runs: their tasks stay where they are and run again next step.
            let _ = self.cancel_tx.send(true);
            while let Some(joined) = self.workers.join_next().await {
                if let Ok((key, _)) = joined {
                    self.forget(&key);
                }
            }
        }
        outcome?;
        self.finish()
    }

    /// [`Stepper::act`], for a caller that only needs to know it went well.
    fn act_now(&mut self) -> Result<()> {
        self.act().map(|_| ())
    }

    /// Decides and performs everything that can happen now. Returns whether anything did.
    fn act(&mut self) -> Result<bool> {
        let mut any = self.expire_intake_lease()?;
        loop {
            let plan = self.plan()?;
            let mut progressed = self.start_batch(&plan)?;
            for action in plan.actions.iter().filter(|a| !matches!(a, Action::Start { .. })) {
                if self.perform(action)? {
                    progressed = true;
                }
            }
            if !progressed {
                self.note_plan(&plan);
                return Ok(any);
            }
            any = true;
        }
    }

    /// Starts every task the plan starts, in one commit: the workers of a wave do not wait for
    /// one state commit each.
    fn start_batch(&mut self, plan: &Plan) -> Result<bool> {
        if self.mode == Mode::Record {
            // A task started here would only wait for the next `plan` to claim its agent.
            return Ok(false);
        }
        let mut changes = Changes::default();
        let mut started = Vec::new();
        let mut progressed = false;
        for action in &plan.actions {
            let Action::Start { task_id, .. } = action else {
                continue;
            };
            if self.past_deadline() || self.running.contains_key(task_id) || self.over_total_budget() {
                continue;
            }
            if !self.api_allows_start(task_id, started.len()) {
                continue;
            }
            let Some(mut t) = self.tasks.get(task_id).cloned() else {
                continue;
            };
            if let Some(change) = self.enforce_task_budget(&mut t) {
                self.save_task(
                    t,
                    &change,
                    &format!("hyperloop: {task_id} failed (budget exceeded)"),
                )?;
                progressed = true;
                continue;
            }
            let change = transition::start(&mut t, self.pipeline());
            if t.branch.is_none() {
                t.branch = Some(crate::task::file::task_branch(task_id));
            }
            changes.put_task(&self.tasks_rel(), &t);
            started.push((t, change));
        }
        if started.is_empty() {
            return Ok(progressed);
        }
        let ids: Vec<&str> = started.iter().map(|(t, _)| t.id.as_str()).collect();
        let specs: Vec<String> = started.iter().map(|(t, _)| t.spec_ref.clone()).collect();
        let spec_refs: Vec<&str> = specs.iter().map(String::as_str).collect();
        // Committed before the workers start, so `status` (and a step on another machine) sees
        // the tasks in progress while their agents work, and a dead step's result can be matched
        // to the state it started from.
        let subject = format!("hyperloop: start {}", ids.join(", "));
        let task_refs = ids.join("\n");
        self.commit(&changes, &subject, &spec_refs, &task_refs)?;
        for (t, change) in started {
            self.note_change(&t, &change);
            self.tasks.insert(t.id.clone(), t);
        }
        Ok(true)
    }

    fn plan(&self) -> Result<Plan> {
        let snapshot = Snapshot {
            tasks: self.tasks.values().cloned().collect(),
            specs: self.specs.clone(),
            intake_record: self.intake_record.clone(),
            running: self
                .running
                .values()
                .filter(|r| r.record.kind == Kind::Task)
                .map(|r| r.record.task_id.clone())
                .collect(),
            pending_failures: if self.improver_ran {
                Vec::new()
            } else {
                self.pending_failures.clone()
            },
            intake_running: self.running.contains_key(INTAKE_ID)
                || self
                    .intake_claim
                    .as_ref()
                    .is_some_and(|c| c.claim.live_lease(now_unix())),
            github_mode: self.gh.is_some(),
        };
        let mut plan = decide::decide(&snapshot, &self.config, &self.defs.process, now_unix())?;
        plan.actions.retain(|a| match a {
            Action::Spawn { task_id, .. } => !self.cooling.contains(task_id),
            _ => true,
        });
        // Intake and the improver are workers too; decide counts task workers only through
        // `running`, so make room for them here.
        let others = self
            .running
            .values()
            .filter(|r| r.record.kind != Kind::Task)
            .count();
        if others > 0 {
            let mut budget = self.config.runtime.max_workers.saturating_sub(self.running.len());
            plan.actions.retain(|a| match a {
                Action::Spawn { .. }
                | Action::Start { .. }
                | Action::RunIntake { .. }
                | Action::RunImprover { .. } => {
                    if budget == 0 {
                        false
                    } else {
                        budget -= 1;
                        true
                    }
                }
                _ => true,
            });
        }
        Ok(plan)
    }

    fn note_plan(&mut self, plan: &Plan) {
        self.report.blocked = plan.blocked.iter().map(|b| b.task_id.clone()).collect();
        if self.gh.is_none() {
            // GitHub mode says this when it polls; locally the plan is the check. The key is the
            // one a poll uses, so each parked task is reported once per step.
            for p in &plan.parked {
                if let Some(t) = self.tasks.get(&p.task_id).cloned()
                    && self.first_attempt(&p.task_id, &t, "poll")
                {
                    emit!(
                        DEBUG,
                        "gate_checked",
                        task_id = p.task_id.as_str(),
                        gate = p.step.as_str(),
                        cleared = false
                    );
                }
            }
        }
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// On a terminal: one line saying where the work stands (tasks by state, who runs, time).
    fn show_progress(&self) {
        if !self.live {
            return;
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for t in self.tasks.values() {
            *counts.entry(t.status.as_str()).or_default() += 1;
        }
        let states: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let mut running: Vec<String> = self
            .running
            .values()
            .map(|r| format!("{} {}", r.record.task_id, r.record.role))
            .collect();
        running.sort();
        let line = format!(
            "  ⟳ {} · running: {} · ${:.2} · {:.0} s",
            if states.is_empty() {
                "no tasks yet".to_string()
            } else {
                states.join(", ")
            },
            if running.is_empty() {
                "nothing".to_string()
            } else {
                running.join(", ")
            },
            self.total_cost(),
            self.started.elapsed().as_secs_f64()
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
    }

    /// Total agent spend recorded in the task files.
    fn total_cost(&self) -> f64 {
        self.tasks.values().map(|t| t.cost_usd).fold(0.0, |a, b| a + b)
    }

    /// Whether starting another worker would break the total spending cap (reported once).
    fn over_total_budget(&mut self) -> bool {
        let Some(limit) = self.config.runtime.max_total_cost_usd else {
            return false;
        };
        let spent = self.total_cost();
        if spent < limit {
            return false;
        }
        if !self.budget_blocked {
            emit!(
                ERROR,
                "budget_exceeded",
                scope = "total",
                spent_usd = spent,
                limit_usd = limit,
                hint = "raise runtime.max_total_cost_usd to let workers start again"
            );
            self.budget_blocked = true;
        }
        true
    }

    /// Fails a task whose own spending reached `runtime.max_task_cost_usd`. Returns whether it
    /// did.
    fn enforce_task_budget(&mut self, task: &mut Task) -> Option<TaskChange> {
        let limit = self.config.runtime.max_task_cost_usd?;
        if task.cost_usd < limit || task.status.is_terminal() {
            return None;
        }
        emit!(
            ERROR,
            "budget_exceeded",
            scope = "task",
            task_id = task.id.as_str(),
            spent_usd = task.cost_usd,
            limit_usd = limit
        );
        let reason = format!(
            "budget exceeded: agents spent ${:.2} of runtime.max_task_cost_usd ${limit:.2}",
            task.cost_usd
        );
        Some(transition::fail_task(task, &reason))
    }

    /// Performs one planned action. Returns whether it changed anything.
    fn perform(&mut self, action: &Action) -> Result<bool> {
        if action.takes_worker() && self.over_total_budget() {
            return Ok(false);
        }
        if let Action::Spawn { task_id, .. } | Action::Start { task_id, .. } = action
            && let Some(mut t) = self.tasks.get(task_id).cloned()
            && let Some(change) = self.enforce_task_budget(&mut t)
        {
            self.save_task(
                t,
                &change,
                &format!("hyperloop: {task_id} failed (budget exceeded)"),
            )?;
            return Ok(true);
        }
        if self.mode != Mode::Step && matches!(action, Action::RunImprover { .. })
            || self.mode == Mode::Record && matches!(action, Action::RunIntake { .. })
        {
            // The process improver is not a work item: `step` runs it. Intake is claimed by
            // `plan`, never started by `record`.
            return Ok(false);
        }
        match action {
            Action::RunIntake { specs, .. } => {
                if self.intake_attempted || self.past_deadline() {
                    return Ok(false);
                }
                if let Some(f) = self.intake_failures.clone()
                    && gave_up(&f, &self.current_specs(), self.inputs_fingerprint()?)
                {
                    if !self.intake_blocked {
                        emit!(
                            ERROR,
                            "intake_gave_up",
                            attempts = f.attempts,
                            last_error = f.last_error.as_str(),
                            hint = INTAKE_GAVE_UP_HINT
                        );
                    }
                    self.intake_blocked = true;
                    self.report.intake_gave_up = Some(f.last_error);
                    return Ok(false);
                }
                self.intake_attempted = true;
                if self.mode == Mode::Plan {
                    return self.claim_intake(specs);
                }
                self.spawn_intake(specs)?;
                Ok(true)
            }
            Action::RunImprover { failures } => {
                if self.improver_ran || self.past_deadline() {
                    return Ok(false);
                }
                self.improver_ran = true;
                self.spawn_improver(failures)?;
                Ok(true)
            }
            // Tasks start in batches, one commit per wave: see `start_batch`.
            Action::Start { .. } => Ok(false),
            Action::Spawn { task_id, role, .. } => {
                if self.past_deadline() || self.running.contains_key(task_id) {
                    return Ok(false);
                }
                match self.mode {
                    Mode::Step => self.spawn_task(task_id, role)?,
                    Mode::Plan => return self.claim_item(task_id, role),
                    Mode::Record => return Ok(false),
                }
                Ok(true)
            }
            Action::ClearGate { task_id, .. } => {
                let Some(mut t) = self.tasks.get(task_id).cloned() else {
                    return Ok(false);
                };
                let gate = t.phase.clone().unwrap_or_default();
                if !self.first_attempt(task_id, &t, "gate") {
                    return Ok(false);
                }
                t.gate_cleared = false;
                let change = transition::gate_cleared(&mut t, self.pipeline());
                emit!(
                    INFO,
                    "gate_checked",
                    task_id = task_id.as_str(),
                    gate = gate.as_str(),
                    cleared = true
                );
                self.save_task(t, &change, &format!("hyperloop: {task_id} passed gate {gate}"))?;
                Ok(!change.is_noop())
            }
            Action::PollGate { task_id, gate } => {
                let Some(t) = self.tasks.get(task_id).cloned() else {
                    return Ok(false);
                };
                if !self.first_attempt(task_id, &t, "poll") {
                    return Ok(false);
                }
                self.poll_gate(task_id, gate)
            }
            Action::Perform { task_id, action, .. } => {
                let Some(t) = self.tasks.get(task_id).cloned() else {
                    return Ok(false);
                };
                if !self.first_attempt(task_id, &t, action) {
                    return Ok(false);
                }
                match action.as_str() {
                    MERGE_PR if self.gh.is_some() => self.merge_github(t),
                    MERGE_PR => self.merge(t),
                    MARK_PR_READY if self.gh.is_some() => {
                        let mut t = t;
                        match self.mark_ready_github(&t) {
                            Ok(()) => {}
                            // Deferred for the pace; a later step readies it.
                            Err(e) if api_budget::is_held(&e) => return Ok(false),
                            Err(e) => return Err(e),
                        }
                        let change = transition::action_done(&mut t, self.pipeline());
                        self.save_task(
                            t,
                            &change,
                            &format!("hyperloop: {task_id} pull request ready for review"),
                        )?;
                        Ok(!change.is_noop())
                    }
                    MARK_PR_READY => {
                        let mut t = t;
                        emit!(
                            INFO,
                            "pr_marked_ready",
                            task_id = task_id.as_str(),
                            mode = "local",
                            note = "no pull request in local mode"
                        );
                        let change = transition::action_done(&mut t, self.pipeline());
                        self.save_task(
                            t,
                            &change,
                            &format!("hyperloop: {task_id} mark-pr-ready (local: nothing to do)"),
                        )?;
                        Ok(!change.is_noop())
                    }
                    other => Err(Error::other(format!("unknown action `{other}` for {task_id}"))),
                }
            }
            Action::FailTask { task_id, reason } => {
                let Some(mut t) = self.tasks.get(task_id).cloned() else {
                    return Ok(false);
                };
                let change = transition::fail_task(&mut t, reason);
                if change.is_noop() {
                    return Ok(false);
                }
                self.save_task(t, &change, &format!("hyperloop: {task_id} failed"))?;
                Ok(true)
            }
            Action::Recover { task_id, .. } => {
                // Nothing in this version writes claims; one found in a task file (written by
                // hand or by an older step) is cleared so it cannot hold the task forever.
                let Some(mut t) = self.tasks.get(task_id).cloned() else {
                    return Ok(false);
                };
                let Some(claim) = t.claim.take() else {
                    return Ok(false);
                };
                if let Some(item) = &claim.item {
                    // Its `work` died, was cancelled or is too late: the next plan claims the
                    // task again, under another item id, so a late output cannot pass for it.
                    emit!(
                        WARN,
                        "lease_expired",
                        task_id = task_id.as_str(),
                        item = item.as_str(),
                        role = claim.role.as_str(),
                        expires_at = claim.expires_at
                    );
                } else {
                    emit!(
                        WARN,
                        "orphan_found",
                        task_id = task_id.as_str(),
                        note = "stale claim cleared"
                    );
                }
                let change = no_change(&t);
                self.save_task(t, &change, &format!("hyperloop: {task_id} stale claim cleared"))?;
                Ok(true)
            }
        }
    }

    fn first_attempt(&mut self, task_id: &str, t: &Task, what: &str) -> bool {
        self.attempted.insert((
            task_id.to_string(),
            t.position.clone().unwrap_or_default(),
            what.to_string(),
        ))
    }

    // ----- committing -------------------------------------------------------------------------

    /// Commits `changes` on the branch tip with trailers and moves the branch. Retries on a
    /// race by replaying the commit onto the new tip.
    fn commit(
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
        self.prompts_unchanged = !changes.files.keys().any(|p| p.starts_with(&prompts));
        let published = self.publish(new);
        self.prompts_unchanged = false;
        published?;
        Ok(true)
    }

    /// Keeps a commit on top of `tip` local for now (see `staged`).
    fn stage_merge(&mut self, new: String) {
        self.staged_merges += 1;
        if self.published.is_none() {
            self.published = Some(self.tip.clone());
        }
        self.staged.push(new.clone());
        self.tip = new;
    }

    /// Publishes what is staged.
    fn flush_staged(&mut self) -> Result<()> {
        match self.staged.pop() {
            Some(last) => self.publish(last),
            None => Ok(()),
        }
    }

    /// Moves the state branch to `new`, a child of `tip`, with whatever is staged before it.
    fn publish(&mut self, new: String) -> Result<()> {
        let mut chain = std::mem::take(&mut self.staged);
        let merges = std::mem::take(&mut self.staged_merges);
        chain.push(new);
        if let Some(published) = self.published.take() {
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
                    let overlays = self.overlays.get_mut();
                    if self.prompts_unchanged && chain.len() == 1 && overlays.0 == self.tip {
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
                            None => self.replay_with_their_pace(commit, &parent, &onto)?,
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
    fn replay_with_their_pace(&self, commit: &str, parent: &str, onto: &str) -> Result<Option<String>> {
        if self.gh.is_none() {
            return Ok(None);
        }
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
    fn move_state(&mut self, new: &str) -> Result<Publish> {
        if self.gh.is_some() {
            return self.push_state(new);
        }
        if self.checkout.is_none() {
            self.checkout = Some(self.repo.worktree_on(&format!("refs/heads/{}", self.branch))?);
        }
        let checkout = self.checkout.clone().flatten();
        self.repo
            .publish_with(&self.branch, &self.tip, new, checkout.as_deref())
    }

    /// After the branch moved under us: take what the other writer changed, except for the
    /// tasks this step has workers for (a change to those would have made the replay conflict).
    fn reload_keep_tasks(&mut self) -> Result<()> {
        let tip = self.tip.clone();
        self.reload_keep_tasks_at(&tip)
    }

    /// [`Stepper::reload_keep_tasks`] from the state at `commit`.
    fn reload_keep_tasks_at(&mut self, commit: &str) -> Result<()> {
        let tree = self.repo.read_tree_state(commit, &self.config.target.specs_dir)?;
        self.set_specs(tree.specs)?;
        let busy: HashSet<String> = self.running.values().map(|r| r.record.task_id.clone()).collect();
        for t in tree.tasks {
            if !busy.contains(&t.id) {
                self.tasks.insert(t.id.clone(), t);
            }
        }
        Ok(())
    }

    /// Writes one task's new state in its own commit and reports its change.
    fn save_task(&mut self, task: Task, change: &TaskChange, subject: &str) -> Result<()> {
        let mut changes = Changes::default();
        changes.put_task(&self.tasks_rel(), &task);
        let spec = task.spec_ref.clone();
        let id = task.id.clone();
        self.commit(&changes, subject, &[&spec], &id)?;
        self.note_change(&task, change);
        self.tasks.insert(id, task);
        Ok(())
    }

    fn note_change(&mut self, task: &Task, change: &TaskChange) {
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
                } => emit!(
                    WARN,
                    "task_looped_back",
                    task_id = task.id.as_str(),
                    spec_ref = task.spec_ref.as_str(),
                    round = task.round,
                    verdict = verdict.as_str(),
                    findings_count = *findings,
                    findings_preview = preview(detail).as_str()
                ),
                ChangeEvent::Completed => {
                    emit!(
                        INFO,
                        "task_completed",
                        task_id = task.id.as_str(),
                        spec_ref = task.spec_ref.as_str(),
                        total_rounds = task.round,
                        cost_usd = task.cost_usd
                    );
                    self.report.completed.push(task.id.clone());
                }
                ChangeEvent::Failed { reason } => {
                    emit!(
                        ERROR,
                        "task_failed",
                        task_id = task.id.as_str(),
                        spec_ref = task.spec_ref.as_str(),
                        reason = reason.as_str(),
                        round = task.round
                    );
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
                } => emit!(
                    WARN,
                    "rebase_conflict",
                    task_id = task.id.as_str(),
                    attempt = *attempt,
                    max_attempts = *max_attempts,
                    looping_back = false
                ),
                ChangeEvent::RebaseGaveUp { attempts } => emit!(
                    WARN,
                    "rebase_conflict",
                    task_id = task.id.as_str(),
                    attempt = *attempts,
                    max_attempts = self.config.max_rebase_attempts,
                    looping_back = true
                ),
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

    // ----- workers ----------------------------------------------------------------------------

    fn new_nonce(&mut self) -> String {
        self.nonce_counter += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{:x}{:x}{:x}", nanos, std::process::id(), self.nonce_counter)
    }

    fn role_overlay(&self, role: &str) -> Result<Option<String>> {
        {
            let mut cache = self.overlays.borrow_mut();
            if cache.0 != self.tip {
                *cache = (self.tip.clone(), HashMap::new());
            } else if let Some(known) = cache.1.get(role) {
                return Ok(known.clone());
            }
        }
        let overlay = self.read_role_overlay(role)?;
        self.overlays
            .borrow_mut()
            .1
            .insert(role.to_string(), overlay.clone());
        Ok(overlay)
    }

    fn read_role_overlay(&self, role: &str) -> Result<Option<String>> {
        read_role_overlay(&self.repo, self.specs_dir(), &self.tip, role)
    }

    fn worker_spec(
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
    fn secret_env(&self) -> Vec<String> {
        let mut names = Vec::new();
        if let Some(m) = &self.config.observability.matrix {
            names.extend(m.token_env.iter().cloned());
            names.extend(m.registration_token_env.iter().cloned());
        }
        names
    }

    fn launch(&mut self, record: RunRecord, spec: WorkerSpec) -> Result<()> {
        self.launch_with(record, spec, None)
    }

    /// Starts the worker; `new_worktree`, when given, is made by the worker before its agent
    /// runs.
    fn launch_with(
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
        emit!(
            INFO,
            "worker_spawned",
            task_id = record.task_id.as_str(),
            role = record.role.as_str(),
            round = record.round,
            branch = spec.branch.as_str(),
            spec_ref = spec.spec_ref.as_str(),
            cycle = self.report.cycle
        );
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
        forward_stop(self.cancel_rx.clone(), stop.clone());
        self.running.insert(
            key.clone(),
            Running {
                record,
                started: Instant::now(),
                stop,
            },
        );
        self.workers.spawn(async move {
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

    fn spawn_task(&mut self, task_id: &str, role: &str) -> Result<()> {
        let Some(task) = self.tasks.get(task_id).cloned() else {
            return Ok(());
        };
        if self.defs.agent(role).is_none() {
            return Err(Error::other(format!("no agent named `{role}` for {task_id}")));
        }
        let mut task = task;
        let branch = crate::task::file::task_branch(task_id);
        let known = worktree::task_worktree_path(&self.repo.root, task_id);
        if !self.excludes_ok {
            worktree::ensure_local_excludes_in(&self.repo.common_dir)?;
            self.excludes_ok = true;
        }
        let mut new_worktree = None;
        let (wt, start_head) = if self.worktrees_ready.contains(task_id) && known.join(".git").exists() {
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
            self.worktrees_ready.insert(task_id.to_string());
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
            self.worktrees_ready.insert(task_id.to_string());
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

    fn spawn_intake(&mut self, specs: &[String]) -> Result<()> {
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

    fn spawn_improver(&mut self, failures: &[FailureNote]) -> Result<()> {
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
        let prompts_dir = format!("{}/prompts", self.specs_dir().trim_end_matches('/'));
        let input = PromptInput {
            task_id: IMPROVER_ID.to_string(),
            spec_ref: prompts_dir.clone(),
            round: 0,
            branch: None,
            base_branch: self.config.target.base_branch.clone(),
            task_title: None,
            task_spec: None,
            findings: None,
            role_overlay: self.role_overlay(&role)?,
            extra_sections: vec![("Failure findings".to_string(), text_failures)],
        };
        let text = prompt::compose(&agent, &input);
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
    fn forget(&mut self, key: &str) {
        self.running.remove(key);
        let _ = std::fs::remove_file(outcome_path(&self.running_dir(), key));
        let _ = std::fs::remove_file(self.running_dir().join(format!("{key}.json")));
    }

    fn on_worker_done(&mut self, key: &str, outcome: &WorkerOutcome) -> Result<()> {
        crate::fault::point("worker-done");
        let Some(run) = self.running.remove(key) else {
            return Ok(());
        };
        let record = run.record;
        let checked;
        let outcome = match self.refs_moved_during(&record, outcome)? {
            Some(replaced) => {
                checked = replaced;
                &checked
            }
            None => outcome,
        };
        let duration = run
            .started
            .elapsed()
            .as_secs_f64()
            .max(outcome.duration.as_secs_f64());
        let result = self.reap(&record, outcome, duration);
        // Anything the agent started in a session of its own escaped the group kill; its
        // environment still carries the run's nonce.
        let stray = kill_by_nonce(&record.nonce);
        if stray > 0 {
            emit!(
                WARN,
                "stray_processes_stopped",
                task_id = record.task_id.as_str(),
                role = record.role.as_str(),
                count = stray
            );
        }
        if result.is_ok() {
            // Only a recorded result may be forgotten: if recording failed, the next step
            // records it from the saved outcome instead of paying for the agent again.
            let _ = std::fs::remove_file(outcome_path(&self.running_dir(), key));
            let _ = std::fs::remove_file(self.running_dir().join(format!("{key}.json")));
        }
        result
    }

    /// Reports a finished agent run and records its result: the one path by which the result
    /// of an agent becomes task state, whether the agent ran in this process (`step`) or in a
    /// `work` job whose output `record` verified.
    fn reap(&mut self, record: &RunRecord, outcome: &WorkerOutcome, duration: f64) -> Result<()> {
        macro_rules! reaped {
            ($lvl:ident) => {
                emit!(
                    $lvl,
                    "worker_reaped",
                    task_id = record.task_id.as_str(),
                    role = record.role.as_str(),
                    verdict = outcome.verdict.as_str(),
                    round = record.round,
                    duration_s = duration,
                    findings_count = outcome.findings,
                    cost_usd = outcome.cost_usd.unwrap_or(0.0),
                    cycle = self.report.cycle,
                    log = outcome.log_file.display().to_string().as_str()
                )
            };
        }
        if outcome.verdict == worker::Verdict::Pass {
            reaped!(INFO);
        } else {
            reaped!(WARN);
        }
        if outcome.verdict == worker::Verdict::Timeout {
            emit!(
                WARN,
                "worker_timeout",
                task_id = record.task_id.as_str(),
                role = record.role.as_str(),
                detail = outcome.detail.as_str()
            );
        }
        self.report.reaped.push(WorkerRun {
            task_id: record.task_id.clone(),
            role: record.role.clone(),
            round: record.round,
            verdict: Some(outcome.verdict.as_str().to_string()),
            duration_s: duration,
            cost_usd: outcome.cost_usd,
        });
        self.report.cost_usd += outcome.cost_usd.unwrap_or(0.0);
        crate::transcripts::publish(&outcome.log_file, &record.task_id, &record.role, record.round);
        let result = match record.kind {
            Kind::Task => self.record_task_result(record, outcome, duration),
            Kind::Intake => self.record_intake(record, outcome, duration),
            Kind::Improver => self.record_improver(record, outcome, duration),
        };
        self.show_progress();
        crate::fault::point("after-record");
        result
    }

    /// Checks every task branch after an agent's run. One moved by anything but hyperloop (an
    /// agent writing into the repository instead of its checkout) is put back, and the run that
    /// just ended counts as `error` naming it; its own branch goes back to where the run
    /// started, so nothing it made is published.
    fn refs_moved_during(
        &mut self,
        record: &RunRecord,
        outcome: &WorkerOutcome,
    ) -> Result<Option<WorkerOutcome>> {
        let moved = worktree::restore_task_refs(&self.repo.git)?;
        if moved.is_empty() {
            return Ok(None);
        }
        let mut names = Vec::new();
        for m in &moved {
            emit!(
                ERROR,
                "ref_restored",
                task_id = record.task_id.as_str(),
                role = record.role.as_str(),
                branch = m.branch.as_str(),
                expected = m.expected.as_deref().unwrap_or("(none)"),
                found = m.found.as_deref().unwrap_or("(deleted)")
            );
            names.push(format!("refs/heads/{}", m.branch));
        }
        if record.kind == Kind::Task {
            let branch = crate::task::file::task_branch(&record.task_id);
            if let Some(now) = self.repo.branch_tip(&branch)?
                && now != record.start_head
            {
                worktree::set_task_ref(&self.repo.git, &branch, &record.start_head, Some(&now))?;
            }
        }
        let mut replaced = outcome.clone();
        replaced.verdict = worker::Verdict::Error;
        replaced.findings = replaced.findings.max(1);
        replaced.suspicious = None;
        replaced.detail = format!(
            "{} moved while the agent ran, by something other than hyperloop; restored, and \
             nothing of this run is taken (agents work in their own checkout and must not write \
             into the repository)",
            names.join(", ")
        );
        Ok(Some(replaced))
    }

    fn record_task_result(
        &mut self,
        record: &RunRecord,
        outcome: &WorkerOutcome,
        duration: f64,
    ) -> Result<()> {
        let Some(mut task) = self.tasks.get(&record.task_id).cloned() else {
            return Ok(());
        };
        if task.cancelled {
            return self.record_cancelled_run(task, record, outcome, duration);
        }
        let verdict = outcome.verdict;
        let mut detail = outcome.detail.clone();
        if let Some(why) = &outcome.suspicious {
            detail = format!("{detail}\n\nhyperloop: {why}").trim().to_string();
        }
        task.cost_usd += outcome.cost_usd.unwrap_or(0.0);
        task.last_verdict = Some(verdict.as_str().to_string());
        // What a merge may take: the tip this passing agent left, and nothing that came after.
        task.verified_tip = if outcome.verdict.is_pass() {
            // Where the run left the branch: its last commit, taken in just now, or the commit
            // it started from.
            match outcome.commits.last() {
                Some(tip) => Some(tip.clone()),
                None => self.repo.branch_tip(&crate::task::file::task_branch(&task.id))?,
            }
        } else {
            None
        };
        task.history.push(Attempt {
            round: record.round,
            role: record.role.clone(),
            verdict: verdict.as_str().to_string(),
            findings: outcome.findings,
            duration_s: round_duration(duration),
            cost_usd: outcome.cost_usd,
            run_id: Attempt::current_run_id(),
        });
        let mut change = transition::apply_verdict(
            &mut task,
            &self.defs.process.pipeline,
            &record.role,
            verdict,
            &detail,
            outcome.findings,
            self.config.max_task_rounds,
        );
        if let Some(budget) = self.enforce_task_budget(&mut task) {
            change.events.extend(budget.events);
            change.to_status = task.status;
        }
        if matches!(verdict, Verdict::Error | Verdict::Timeout) {
            self.cooling.insert(task.id.clone());
        }
        if !verdict.is_pass() {
            self.pending_failures.push(FailureNote {
                task_id: task.id.clone(),
                role: record.role.clone(),
                round: record.round,
                verdict: verdict.as_str().to_string(),
                detail: detail.clone(),
            });
        }
        if self.gh.is_some() && !task.status.is_terminal() {
            // The branch goes to GitHub as soon as it has work, with its draft PR.
            match self.ensure_pull_request(&task) {
                Ok(url) if url.is_some() => task.pr = url,
                Ok(_) => {}
                Err(Error::PushRefused { branch, message }) => {
                    change = self.push_refused(&mut task, &branch, &message);
                }
                Err(e) if api_budget::is_held(&e) => {}
                Err(e) => emit!(
                    WARN,
                    "pr_not_created",
                    task_id = task.id.as_str(),
                    error = e.to_string().as_str()
                ),
            }
        }
        let mut changes = Changes::default();
        changes.put_task(&self.tasks_rel(), &task);
        if record.role == "verifier" {
            let review = format!(
                "{}/reviews/{}-round-{}.md",
                self.specs_dir().trim_end_matches('/'),
                task.id,
                record.round
            );
            changes.put(
                review,
                format!(
                    "# Review of {} — round {}\n\n- verdict: {}\n- findings: {}\n- branch: {}\n\n{}\n",
                    task.id,
                    record.round,
                    verdict.as_str(),
                    outcome.findings,
                    task.branch.as_deref().unwrap_or("-"),
                    detail.trim()
                ),
            );
        }
        let subject = format!(
            "hyperloop: {} {} {} (round {})",
            task.id,
            record.role,
            verdict.as_str(),
            record.round
        );
        let (spec, id) = (task.spec_ref.clone(), task.id.clone());
        if self.merges_cleanly_next(&task)? {
            // The pass leads straight to a merge that will go through: record both in the merge
            // commit, one commit instead of two, and just as atomic.
            self.note_change(&task, &change);
            self.tasks.insert(id.clone(), task.clone());
            let attempted = (
                id,
                task.position.clone().unwrap_or_default(),
                MERGE_PR.to_string(),
            );
            self.attempted.insert(attempted);
            self.merge_with(task, changes)?;
            return Ok(());
        }
        self.commit(&changes, &subject, &[&spec], &id)?;
        self.note_change(&task, &change);
        self.tasks.insert(id, task);
        Ok(())
    }

    /// The result of a worker whose task was cancelled while it ran: what it cost is kept, the
    /// rest is not applied.
    fn record_cancelled_run(
        &mut self,
        mut task: Task,
        record: &RunRecord,
        outcome: &WorkerOutcome,
        duration: f64,
    ) -> Result<()> {
        task.cost_usd += outcome.cost_usd.unwrap_or(0.0);
        task.history.push(Attempt {
            round: record.round,
            role: record.role.clone(),
            verdict: "cancelled".to_string(),
            findings: 0,
            duration_s: round_duration(duration),
            cost_usd: outcome.cost_usd,
            run_id: Attempt::current_run_id(),
        });
        let subject = format!("hyperloop: {} {} stopped (task cancelled)", task.id, record.role);
        let mut changes = Changes::default();
        changes.put_task(&self.tasks_rel(), &task);
        let (spec, id) = (task.spec_ref.clone(), task.id.clone());
        self.commit(&changes, &subject, &[&spec], &id)?;
        self.tasks.insert(id, task);
        Ok(())
    }

    /// [`inputs_fingerprint`] of this step's configuration and definitions, computed once.
    fn inputs_fingerprint(&self) -> Result<&str> {
        if self.inputs.get().is_none() {
            let f = inputs_fingerprint(&self.repo, &self.config, &self.defs)?;
            let _ = self.inputs.set(f);
        }
        Ok(self.inputs.get().map_or("", String::as_str))
    }

    /// Whether the task now stands at a `merge-pr` this step performs at once (local mode,
    /// automatic merges) and its branch merges without conflict.
    fn merges_cleanly_next(&self, task: &Task) -> Result<bool> {
        if self.gh.is_some()
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
            Some(Step::Action { name }) if name == MERGE_PR
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
    fn merge_tree(&self, ours: &str, theirs: &str) -> Result<MergeTree> {
        if let Some((o, t, m)) = self.last_merge.borrow().as_ref()
            && o == ours
            && t == theirs
        {
            return Ok(m.clone());
        }
        let m = self.repo.merge_tree(ours, theirs)?;
        *self.last_merge.borrow_mut() = Some((ours.to_string(), theirs.to_string(), m.clone()));
        Ok(m)
    }

    fn record_intake(&mut self, record: &RunRecord, outcome: &WorkerOutcome, duration: f64) -> Result<()> {
        let specs: Vec<String> = record.specs.keys().cloned().collect();
        let fail = |this: &mut Self, why: String| {
            let inputs = this.inputs_fingerprint()?.to_string();
            let mut failures = match &this.intake_failures {
                Some(f) if f.specs == record.specs && f.inputs == inputs => f.clone(),
                _ => IntakeFailures {
                    specs: record.specs.clone(),
                    inputs,
                    ..IntakeFailures::default()
                },
            };
            failures.attempts += 1;
            failures.last_error = preview(&why);
            let mut changes = Changes::default();
            this.release_intake_lease(&mut changes);
            let mut text = serde_json::to_string_pretty(&failures).unwrap_or_default();
            text.push('\n');
            changes.put(format!("{}/{INTAKE_FAILURES}", this.tasks_rel()), text);
            let subject = format!(
                "hyperloop: intake failed (attempt {} of {MAX_INTAKE_ATTEMPTS})",
                failures.attempts
            );
            let spec_refs: Vec<&str> = record.specs.keys().map(String::as_str).collect();
            this.commit(&changes, &subject, &spec_refs, INTAKE_ID)?;
            this.intake_failures = Some(failures);
            emit!(
                WARN,
                "intake_ran",
                success = false,
                unprocessed_specs = specs.len(),
                created_tasks = 0u64,
                duration_s = duration,
                cycle = this.report.cycle,
                detail = why.as_str()
            );
            this.report.intake_ran = true;
            Ok(())
        };
        if environmental(outcome) {
            // The agent never ran, or ran out of time: nothing the specs can be blamed for, so
            // it is not counted against them and the next step tries again.
            emit!(
                WARN,
                "intake_ran",
                success = false,
                counted = false,
                unprocessed_specs = specs.len(),
                created_tasks = 0u64,
                duration_s = duration,
                cycle = self.report.cycle,
                detail = preview(&outcome.detail).as_str()
            );
            self.report.intake_ran = true;
            let mut changes = Changes::default();
            if self.release_intake_lease(&mut changes) {
                let spec_refs: Vec<&str> = record.specs.keys().map(String::as_str).collect();
                self.commit(
                    &changes,
                    "hyperloop: intake lease released (not counted)",
                    &spec_refs,
                    INTAKE_ID,
                )?;
            }
            return Ok(());
        }
        if outcome.verdict != worker::Verdict::Pass {
            return fail(
                self,
                format!("the pm reported {}: {}", outcome.verdict.as_str(), outcome.detail),
            );
        }
        let head = match &record.end_head {
            Some(head) => head.clone(),
            None => worker::agent_user::checkout_git(&record.worktree).run_trim(["rev-parse", "HEAD"])?,
        };
        let tasks_rel = self.tasks_rel();
        let entries = self.repo.diff_entries(&record.start_head, &head, &tasks_rel)?;
        let mut changes = Changes::default();
        let mut new_tasks: Vec<Task> = Vec::new();
        let mut problems: Vec<String> = Vec::new();
        let blobs: Vec<(String, String, String)> = entries
            .into_iter()
            .filter_map(|(path, entry)| match entry {
                crate::state::Entry::Blob { mode, oid } => Some((path, mode, oid)),
                _ => {
                    problems.push(format!("{path}: the pm may not delete task files"));
                    None
                }
            })
            .collect();
        let contents = self
            .repo
            .cat_blobs(blobs.iter().map(|(_, _, oid)| oid.as_str()))?;
        for ((path, mode, oid), bytes) in blobs.iter().zip(contents) {
            let name = path.strip_prefix(&format!("{tasks_rel}/")).unwrap_or(path);
            if !name.ends_with(".md") || name.contains('/') {
                problems.push(format!("{path}: only `<id>.md` files belong in {tasks_rel}"));
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            match crate::task::file::parse(Path::new(path), &text) {
                Ok(t) => {
                    if let Some(old) = self.tasks.get(&t.id)
                        && old.status != Status::NotStarted
                    {
                        problems.push(format!(
                            "{path}: task {} is {} and may not be rewritten by intake",
                            t.id, old.status
                        ));
                        continue;
                    }
                    changes.put_blob(path.clone(), "100644", oid.clone());
                    let _ = mode;
                    new_tasks.push(t);
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        // The whole task set as it would be: dependencies must resolve and must not cycle.
        let mut all: BTreeMap<String, Task> = self.tasks.clone();
        for t in &new_tasks {
            all.insert(t.id.clone(), t.clone());
        }
        let all_list: Vec<Task> = all.into_values().collect();
        if let Err(e) = decide::check_dependencies(&all_list) {
            problems.push(e.to_string());
        }
        if !problems.is_empty() {
            return fail(
                self,
                format!("the pm's task files were rejected:\n- {}", problems.join("\n- ")),
            );
        }
        let mut record_map = self.intake_record.clone();
        for (path, hash) in &record.specs {
            record_map.insert(path.clone(), hash.clone());
        }
        record_map.retain(|p, _| record.specs.contains_key(p));
        let mut text = serde_json::to_string_pretty(&record_map).map_err(|e| Error::other(e.to_string()))?;
        text.push('\n');
        changes.put(format!("{tasks_rel}/{INTAKE_RECORD}"), text);
        if self.intake_failures.is_some() {
            changes.delete(format!("{tasks_rel}/{INTAKE_FAILURES}"));
            self.intake_failures = None;
        }
        self.release_intake_lease(&mut changes);
        let created = new_tasks.len();
        let spec_refs: Vec<&str> = specs.iter().map(String::as_str).collect();
        let subject = format!(
            "hyperloop: intake of {} spec(s), {created} task file(s)",
            specs.len()
        );
        self.commit(&changes, &subject, &spec_refs, INTAKE_ID)?;
        self.intake_record = record_map;
        for t in new_tasks {
            self.tasks.insert(t.id.clone(), t);
        }
        emit!(
            INFO,
            "intake_ran",
            success = true,
            unprocessed_specs = specs.len(),
            created_tasks = created,
            duration_s = duration,
            cycle = self.report.cycle
        );
        self.report.intake_ran = true;
        Ok(())
    }

    fn record_improver(&mut self, record: &RunRecord, outcome: &WorkerOutcome, duration: f64) -> Result<()> {
        self.pending_failures
            .retain(|f| !record.failures.contains(&f.task_id));
        let mut success = outcome.verdict == worker::Verdict::Pass;
        if success {
            let wt = worker::agent_user::checkout_git(&record.worktree);
            let head = wt.run_trim(["rev-parse", "HEAD"])?;
            let prompts_rel = format!("{}/prompts", self.specs_dir().trim_end_matches('/'));
            let mut changes = Changes::default();
            for (path, entry) in self.repo.diff_entries(&record.start_head, &head, &prompts_rel)? {
                changes.files.insert(path, entry);
            }
            if !changes.is_empty() {
                let subject = "hyperloop: process improvements from recent failures".to_string();
                success = self
                    .commit(&changes, &subject, &[&prompts_rel], IMPROVER_ID)
                    .is_ok();
            }
        }
        emit!(
            INFO,
            "process_improver_ran",
            failed_task_ids = record.failures.join(",").as_str(),
            success = success,
            duration_s = duration,
            cycle = self.report.cycle
        );
        self.report.improver_ran = true;
        Ok(())
    }

    // ----- merging ----------------------------------------------------------------------------

    fn merge(&mut self, task: Task) -> Result<bool> {
        let mut task = task;
        if let ci_checks::Gate::Hold(changed) = self.local_checks_gate(&mut task)? {
            return Ok(changed);
        }
        self.merge_with(task, Changes::default())
    }

    /// The forge refused a task's branch: the task (only it) goes back to the start of its loop
    /// with the forge's reason as a finding, like a failed verification, within its rounds.
    pub(super) fn push_refused(&mut self, task: &mut Task, branch: &str, message: &str) -> TaskChange {
        let hint = refusal_hint(message);
        emit!(
            WARN,
            "push_refused",
            task_id = task.id.as_str(),
            branch = branch,
            reason = message,
            hint = hint.as_str()
        );
        self.report.push_refused.push(RefusedPush {
            task_id: task.id.clone(),
            reason: message.lines().next().unwrap_or(message).to_string(),
        });
        let detail = format!(
            "origin refused the push of {branch}:\n{}\n\n{hint}",
            message.trim()
        );
        task.refused_tip = self.repo.branch_tip(branch).ok().flatten();
        let change = transition::unverified_head(task, self.pipeline(), &detail, self.config.max_task_rounds);
        task.last_verdict = Some("push-refused".to_string());
        change
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
    fn base_brought_in(&self, verified: &str, tip: &str) -> Result<bool> {
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
    fn merge_with(&mut self, task: Task, extra: Changes) -> Result<bool> {
        let id = task.id.clone();
        let branch = crate::task::file::task_branch(&id);
        let Some(branch_tip) = self.repo.branch_tip(&branch)? else {
            // Nothing was ever committed for this task: there is nothing to merge.
            let mut t = task;
            let change = transition::action_done(&mut t, self.pipeline());
            emit!(
                INFO,
                "merge_attempted",
                task_id = id.as_str(),
                branch = branch.as_str(),
                outcome = "nothing-to-merge",
                attempt = 0u64
            );
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
                if self.gh.is_none() {
                    self.stage_merge(commit);
                } else {
                    self.publish(commit)?;
                    crate::fault::point("merge-after-publish");
                }
                emit!(
                    INFO,
                    "merge_attempted",
                    task_id = id.as_str(),
                    branch = branch.as_str(),
                    spec_ref = t.spec_ref.as_str(),
                    outcome = "merged",
                    strategy = format!("{:?}", self.config.merge.strategy)
                        .to_lowercase()
                        .as_str(),
                    attempt = u64::from(t.rebase_attempts)
                );
                self.report.merged.push(id.clone());
                self.note_change(&t, &change);
                self.tasks.insert(id.clone(), t);
                if self.config.merge.delete_branch {
                    self.pending_cleanup.push((id, branch));
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
    fn conflict(&mut self, task: Task, branch: &str, files: &[String]) -> Result<()> {
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
                emit!(
                    WARN,
                    "merge_attempted",
                    task_id = id.as_str(),
                    branch = branch,
                    outcome = "conflict",
                    attempt = u64::from(t.rebase_attempts + 1)
                );
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
    fn delete_task_branch(&mut self, task_id: &str, branch: &str) -> bool {
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
    fn flush_cleanup(&mut self) {
        for (id, branch) in std::mem::take(&mut self.pending_cleanup) {
            if !self.delete_task_branch(&id, &branch) {
                self.cleanup_retry.push((id, branch));
            }
        }
    }

    /// Branches of complete tasks that a killed step merged but did not get to delete.
    fn cleanup_merged_branches(&mut self) {
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

    // ----- recovery ---------------------------------------------------------------------------

    /// Finds workers a killed step left behind: stops any that still run, and records the result
    /// of any that finished but were not recorded.
    fn recover(&mut self) -> Result<()> {
        let dir = self.running_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                // A temporary file of a write that was cut short.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().is_some_and(|e| e == "outcome") && !path.with_extension("json").exists() {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<RunRecord>(&b).ok())
            {
                Some(r) => records.push((path, r)),
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        records.sort_by(|a, b| a.1.key.cmp(&b.1.key));
        for (path, record) in records {
            let killed = kill_by_nonce(&record.nonce);
            emit!(
                WARN,
                "orphan_found",
                task_id = record.task_id.as_str(),
                role = record.role.as_str(),
                processes_stopped = killed
            );
            if record.kind == Kind::Task {
                let result_path = record.worktree.join(worker::RESULT_FILE);
                let fresh = std::fs::metadata(&result_path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .is_some_and(|t| t.as_secs() >= record.started_at);
                // Recorded already (the step died just after), the task has moved on: the result
                // is not applied twice.
                let still_there = self.tasks.get(&record.task_id).is_some_and(|t| {
                    !t.status.is_terminal()
                        && t.round == record.round
                        && record
                            .position
                            .as_ref()
                            .is_none_or(|p| t.position.clone().unwrap_or_default() == *p)
                        && record.status.as_deref().is_none_or(|s| s == t.status.as_str())
                });
                let saved_path = outcome_path(&dir, &record.key);
                let saved = std::fs::read(&saved_path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<SavedOutcome>(&b).ok());
                let _ = std::fs::remove_file(&saved_path);
                let found = saved.or_else(|| match worker::result::read(&result_path) {
                    ResultFile::Valid {
                        verdict,
                        findings,
                        detail,
                    } if fresh => Some(SavedOutcome {
                        verdict,
                        findings,
                        detail,
                        cost_usd: None,
                        suspicious: None,
                    }),
                    _ => None,
                });
                if still_there
                    && let Some(SavedOutcome {
                        verdict,
                        findings,
                        detail,
                        cost_usd,
                        suspicious,
                    }) = found
                {
                    // The worker finished; only its recording was lost. Settle its branch the
                    // way a normal run would, then record it.
                    let wt = worker::agent_user::checkout_git(&record.worktree);
                    let spec_ref = self
                        .tasks
                        .get(&record.task_id)
                        .map(|t| t.spec_ref.clone())
                        .unwrap_or_default();
                    let settled = worker::result::settle_branch(
                        &wt,
                        &record.start_head,
                        &record.role,
                        &spec_ref,
                        &record.task_id,
                    );
                    let _ = worker::result::remove_stale(&result_path);
                    let branch = crate::task::file::task_branch(&record.task_id);
                    let taken = settled.and_then(|_| {
                        let source = format!("refs/heads/{branch}");
                        let now = self.repo.branch_tip(&branch)?;
                        if now.as_deref() != Some(record.start_head.as_str()) {
                            // Taken in already by the step that ran it.
                            return Ok(None);
                        }
                        worktree::import(
                            &self.repo.git,
                            &record.worktree,
                            &source,
                            &record.task_id,
                            &record.start_head,
                            Some(&branch),
                        )
                    });
                    let (verdict, detail) = match taken {
                        Ok(_) => (verdict, detail),
                        Err(e) => (
                            worker::Verdict::Error,
                            format!("the agent's work was not taken: {e}"),
                        ),
                    };
                    let outcome = WorkerOutcome {
                        verdict,
                        findings,
                        detail: format!("{detail}\n\n(recorded after the step that ran it was interrupted)")
                            .trim()
                            .to_string(),
                        exit_code: None,
                        duration: Duration::from_secs(now_unix().saturating_sub(record.started_at)),
                        log_file: PathBuf::new(),
                        cost_usd,
                        num_turns: None,
                        session_id: None,
                        is_error: None,
                        suspicious,
                        commits: Vec::new(),
                        pgid: None,
                    };
                    emit!(
                        INFO,
                        "result_recovered",
                        task_id = record.task_id.as_str(),
                        role = record.role.as_str(),
                        verdict = verdict.as_str()
                    );
                    self.record_task_result(&record, &outcome, outcome.duration.as_secs_f64())?;
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }

    // ----- the end ----------------------------------------------------------------------------

    fn finish(&mut self) -> Result<StepReport> {
        self.flush_staged()?;
        if self.gh.is_some() {
            // Descriptions last, so that a task that moved several times in this step is
            // described once; then the pace, so the next step counts these writes too.
            self.flush_pr_bodies();
            // Hook: the dashboard shows the step's outcome (see `dashboard`).
            self.publish_dashboard();
            self.commit_pace()?;
        }
        for (id, branch) in std::mem::take(&mut self.cleanup_retry) {
            self.delete_task_branch(&id, &branch);
        }
        self.repo.discard_private_indexes();
        let plan = self.plan()?;
        self.note_plan(&plan);
        let tasks: Vec<&Task> = self.tasks.values().collect();
        self.report.tasks_total = tasks.len();
        self.report.tasks_complete = tasks.iter().filter(|t| t.status == Status::Complete).count();
        self.report.tasks_failed = tasks.iter().filter(|t| t.status == Status::Failed).count();
        let (progress, remaining) = match &plan.progress {
            Progress::Working | Progress::Waiting { .. } if self.budget_blocked => ("stuck", false),
            _ if self.intake_blocked && self.tasks.values().all(|t| t.status.is_terminal()) => {
                ("stuck", false)
            }
            Progress::AllComplete => ("all-complete", false),
            Progress::Idle => ("idle", false),
            Progress::Stuck { .. } => ("stuck", false),
            Progress::Waiting { gates } => {
                self.report.waiting = gates.clone();
                ("waiting", true)
            }
            Progress::Working => ("working", true),
        };
        self.report.progress = progress.to_string();
        self.report.work_remaining = remaining;
        // Intake that gave up on these specs waits for a change, not for the next round.
        let intake_ready = !self.intake_blocked
            && match self.intake_failures.clone() {
                Some(f) => !gave_up(&f, &self.current_specs(), self.inputs_fingerprint()?),
                None => true,
            };
        self.report.ready = if self.budget_blocked {
            0
        } else {
            plan.actions
                .iter()
                .filter(|a| match a {
                    Action::RunImprover { .. } => false,
                    Action::RunIntake { .. } => intake_ready,
                    _ => a.takes_worker(),
                })
                .count()
        };
        self.report.duration_s = (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        self.report.github_api = self.api_usage();
        if let Some(api) = &self.report.github_api {
            emit!(
                INFO,
                "github_api",
                requests = api.requests,
                content_requests = api.content_requests,
                refused = api.refused,
                remaining = api.remaining.map_or(-1, |r| i64::try_from(r).unwrap_or(i64::MAX)),
                content_last_minute = api.content_last_minute,
                content_last_hour = api.content_last_hour,
                deferred = api.deferred.len()
            );
        }
        emit!(
            INFO,
            "cycle_completed",
            cycle = self.report.cycle,
            spawned = self.report.spawned.len(),
            reaped = self.report.reaped.len(),
            merged = self.report.merged.len(),
            complete = self.report.tasks_complete,
            failed = self.report.tasks_failed,
            total = self.report.tasks_total,
            progress = progress,
            duration_s = self.report.duration_s
        );
        Ok(self.report.clone())
    }
}

/// `<specs>/prompts/<role>-overlay.yaml` as committed at `tip`.
/// The pm's prompt: the specs to turn into tasks and the tasks there are, as `step` and `work`
/// give it.
fn intake_prompt<'a>(
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

fn read_role_overlay(repo: &Repo, specs_dir: &str, tip: &str, role: &str) -> Result<Option<String>> {
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
fn task_prompt(
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
fn conflict_sections(
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

/// What to do about an intake that gave up.
pub const INTAKE_GAVE_UP_HINT: &str = "fix the specs, the configuration or the pm's prompt and commit (intake runs again when any of them changes), or run `hyperloop retry intake`";

/// Whether failed intakes of `specs` under `inputs` have used up their attempts.
pub fn gave_up(f: &IntakeFailures, specs: &BTreeMap<String, String>, inputs: &str) -> bool {
    f.attempts >= MAX_INTAKE_ATTEMPTS && f.specs == *specs && f.inputs == inputs
}

/// A run that says nothing about the work it was given: the agent never started (no process
/// group), or it was killed for taking too long.
fn environmental(outcome: &WorkerOutcome) -> bool {
    outcome.verdict == worker::Verdict::Timeout
        || (outcome.verdict == worker::Verdict::Error && outcome.pgid.is_none())
}

/// The fingerprint of what intake runs with besides the specs: the resolved configuration and
/// the resolved agents and process, as `--dry-run` prints them.
pub fn inputs_fingerprint(repo: &Repo, config: &Config, defs: &Definitions) -> Result<String> {
    let text = format!("{}\n---\n{}", config.render(), defs.render());
    repo.git
        .run_with_input(["hash-object", "--stdin"], text.as_bytes())
        .map(|s| s.trim().to_string())
}

/// Passes the step's stop (a signal) on to one worker's own stop, until the worker is gone.
fn forward_stop(mut step: watch::Receiver<bool>, worker: watch::Sender<bool>) {
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

/// Seconds as a task's history keeps them: to the millisecond, so a short run does not read 0.0.
fn round_duration(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

fn no_change(task: &Task) -> TaskChange {
    TaskChange {
        task_id: task.id.clone(),
        from_status: task.status,
        to_status: task.status,
        from_phase: task.phase.clone(),
        to_phase: task.phase.clone(),
        from_round: task.round,
        to_round: task.round,
        events: Vec::new(),
    }
}

fn intake_role(process: &definitions::Process) -> String {
    process
        .intake
        .iter()
        .find_map(|s| match s {
            Step::Role { name, .. } => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "pm".to_string())
}

fn preview(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((idx, _)) => format!("{}…", &s[..idx]),
        None => s.to_string(),
    }
}

/// A commit message with hyperloop's trailers.
pub fn commit_message(subject: &str, body: &str, spec_refs: &[&str], task_ref: &str) -> String {
    let mut msg = subject.trim().to_string();
    msg.push_str("\n\n");
    if !body.trim().is_empty() {
        msg.push_str(body.trim());
        msg.push_str("\n\n");
    }
    let mut seen = BTreeSet::new();
    for s in spec_refs {
        if seen.insert(*s) {
            msg.push_str(&format!("Spec-Ref: {s}\n"));
        }
    }
    // Several tasks (one commit starting a batch) give one trailer each, newline-separated.
    for t in task_ref.lines() {
        msg.push_str(&format!("Task-Ref: {t}\n"));
    }
    msg
}

/// Stops every process whose environment carries this worker nonce (a worker of a dead step and
/// anything it started). Returns how many were signalled.
fn kill_by_nonce(nonce: &str) -> u64 {
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
