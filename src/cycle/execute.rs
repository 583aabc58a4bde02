//! The one place that sequences I/O for a step: recover what a killed step left, then decide and
//! act until nothing more can start — start workers (at most `max_workers` at once), record each
//! result the moment it arrives (one commit per change of state), clear gates, merge — and exit.
//!
//! Every change of task state is a commit made without a checkout ([`crate::state`]) and moved
//! onto the branch by compare-and-swap. A step killed at any instant loses at most the worker runs
//! in flight, whose branches keep every commit the agents made.
//!
//! A step has three parts, each also a command of its own, and each a module here: [`plan`]
//! decides and claims the next agent runs, [`work`] runs one, [`record`] takes its result in.
//! `hyperloop step` is the three in one process, with the agents running while the plan goes on;
//! `hyperloop plan` / `work` / `record` are the same code run apart (on a GitHub Actions matrix,
//! say). Around them: `recover` (what a killed step left), `commits` (every change of state as a
//! compare-and-swap commit), `merge`, and the forge the step works against — local git or
//! GitHub (`forge`, `github_mode` and the GitHub behaviours beside it); a state branch apart from
//! the base branch is `state_branch`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, MergeStrategy};
use crate::cycle::decide::{self, Snapshot, SpecInfo};
use crate::cycle::plan::{Action, FailureNote, Plan, Progress};
use crate::cycle::transition::{self, ChangeEvent, TaskChange};
use crate::definitions::prompt::{self, PromptInput};
use crate::definitions::{self, Definitions};
use crate::emit;
use crate::error::{Error, Result};
use crate::events::Notable;
use crate::events::now_unix;
use crate::git::{Git, trailers};
use crate::lock::StepLock;
use crate::pipeline::{self, MERGE_PR, PipelineAction, Step, Verdict};
use crate::state::{Changes, MergeTree, Publish, Repo};
use crate::target::Target;
use crate::task::store::{INTAKE_CLAIM, INTAKE_FAILURES, INTAKE_RECORD, IntakeClaim, IntakeFailures};
use crate::task::{Attempt, Status, Task};
use crate::worker::{self, WorkerOutcome, WorkerSpec, result::ResultFile, worktree};

mod api_budget;
mod ci_checks;
mod commits;
mod dashboard;
mod forge;
mod github_mode;
mod items;
mod merge;
mod plan;
mod pull_requests;
mod record;
mod recover;
mod requests;
mod state_branch;
mod trusted_gate;
mod work;

use items::*;

use work::*;

pub use items::{LEASE_OWNER, WorkItem};
pub use plan::plan;
pub use record::{INTAKE_GAVE_UP_HINT, OutputRefused, gave_up, inputs_fingerprint, record};
pub use work::{WorkReport, work};

pub use requests::{CANCEL_LABEL, RETRY_LABEL, operate, request_cancel};

pub use crate::task::{IMPROVER_ID, INTAKE_ID};
/// Failed intakes of the same specs after which intake stops until the specs change.
pub const MAX_INTAKE_ATTEMPTS: u32 = 3;

/// A person's decision about a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Retry,
    Cancel,
}

/// Runs a future from synchronous step code (the step runs on a multi-threaded runtime).
pub(super) fn wait<F: std::future::Future>(fut: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(fut))
}

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
    /// The state branch, and its tip as this step last saw or made it.
    branch: String,
    tip: String,
    /// The base branch's tip, when task state lives on another branch (`target.state_branch`).
    base_tip: Option<String>,
    tasks: BTreeMap<String, Task>,
    specs: Vec<SpecInfo>,
    intake: IntakeState,
    pool: Workers,
    improver: ImproverState,
    /// Actions already tried in this step at a given position, so a failed one is not retried
    /// in a tight loop.
    attempted: HashSet<(String, Vec<usize>, String)>,
    report: StepReport,
    interrupt: Option<watch::Receiver<bool>>,
    deadline: Option<Instant>,
    started: Instant,
    /// GitHub's client and what this step learned from it, in GitHub mode (see `github_mode`).
    gh: Option<github_mode::GitHubMode>,
    /// The forge the step works against: [`forge::GITHUB`] exactly when `gh` is set.
    forge: &'static dyn forge::Forge,
    /// Print a progress line for people watching a terminal.
    live: bool,
    /// The total spending cap was reached: no worker starts in this step.
    budget_blocked: bool,
    staging: Staging,
    cleanup: Cleanup,
    memo: Memo,
    /// Tasks whose pull request description may no longer show their state (GitHub mode).
    redescribe: HashSet<String>,
}

/// Intake (specs → tasks) as this step knows it.
#[derive(Default)]
struct IntakeState {
    /// The specs intake last turned into tasks: path → blob.
    record: BTreeMap<String, String>,
    failures: Option<IntakeFailures>,
    /// Intake was wanted but has failed too often on these specs.
    blocked: bool,
    /// The lease of an intake `plan` claimed, as committed.
    claim: Option<IntakeClaim>,
    /// The intake being recorded came from a `work` output: its lease goes in the commit that
    /// records it.
    release: bool,
    attempted: bool,
}

/// The agents this process runs (`hyperloop step`).
struct Workers {
    running: HashMap<String, Running>,
    joins: JoinSet<(String, WorkerOutcome)>,
    /// Tasks whose worker crashed or timed out in this step: they wait for the next step
    /// instead of burning their rounds back to back.
    cooling: HashSet<String>,
    nonce_counter: u64,
    /// Stops every worker (the step was interrupted).
    cancel_tx: watch::Sender<bool>,
    cancel_rx: watch::Receiver<bool>,
}

/// The process improver: failures of this step it may learn from, and whether it ran.
#[derive(Default)]
struct ImproverState {
    failures: Vec<FailureNote>,
    ran: bool,
    /// Fan-out only: failures earlier `record`s handed on ([`IMPROVER_PENDING`]).
    pending: Vec<FailureNote>,
    /// Fan-out only: the lease of the improver run `plan` claimed, as committed.
    claim: Option<ImproverClaim>,
    /// The improver being recorded came from a `work` output: its lease goes in the commit that
    /// records it.
    release: bool,
}

/// Commits on the state branch that are not published yet.
#[derive(Default)]
struct Staging {
    /// Local commits on top of the published branch, oldest first (`tip` is the last): a merge
    /// is published together with the commit that follows it (usually the next task's start),
    /// and always before a worker starts, a branch is deleted, or the step waits or ends.
    commits: Vec<String>,
    /// Where the branch is while `commits` is not empty.
    published: Option<String>,
    /// How many of the staged commits are merges.
    merges: usize,
    /// The worktree that has the state branch checked out (looked up once per step).
    checkout: Option<Option<PathBuf>>,
    /// The commit being published leaves the prompts folder as it was.
    prompts_unchanged: bool,
}

/// Merged tasks whose worktree and branch are to be removed.
#[derive(Default)]
struct Cleanup {
    /// To remove once the workers that can start have started: cleanup is never on the way of
    /// the next agent.
    pending: Vec<(String, String)>,
    /// Cleanups that failed in this step, tried again at its end.
    retry: Vec<(String, String)>,
}

/// Answers a step looks up once and reuses.
#[derive(Default)]
struct Memo {
    /// Task worktrees made ready earlier in this step.
    worktrees_ready: HashSet<String>,
    /// `.git/info/exclude` was checked in this step.
    excludes_ok: bool,
    /// Role overlays read at a state commit, by role; carried over to commits that do not
    /// touch the prompts folder.
    overlays: std::cell::RefCell<(String, HashMap<String, Option<String>>)>,
    /// The last merge computed, by (ours, theirs): checking that a task merges cleanly and then
    /// merging it asks the same question twice.
    last_merge: std::cell::RefCell<Option<(String, String, MergeTree)>>,
    /// The fingerprint of the configuration and agents (see [`IntakeFailures::inputs`]).
    inputs: std::cell::OnceCell<String>,
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
            config,
            defs,
            branch,
            tip: String::new(),
            base_tip: None,
            tasks: BTreeMap::new(),
            specs: Vec::new(),
            intake: IntakeState::default(),
            pool: Workers {
                running: HashMap::new(),
                joins: JoinSet::new(),
                cooling: HashSet::new(),
                nonce_counter: 0,
                cancel_tx,
                cancel_rx,
            },
            improver: ImproverState::default(),
            attempted: HashSet::new(),
            report: StepReport {
                cycle: opts.cycle,
                ..StepReport::default()
            },
            interrupt: opts.interrupt.clone(),
            deadline: opts.max_duration.map(|d| started + d),
            started,
            forge: if gh.is_some() {
                &forge::GITHUB
            } else {
                &forge::LOCAL
            },
            gh,
            live,
            budget_blocked: false,
            staging: Staging::default(),
            cleanup: Cleanup::default(),
            memo: Memo::default(),
            redescribe: HashSet::new(),
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
        self.intake.record = tree.intake_record;
        self.intake.failures = tree.intake_failures;
        self.intake.claim = tree.intake_claim;
        if self.mode != Mode::Step {
            self.load_improver_files(&tree.task_blobs)?;
        }
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
        let forge = self.forge;
        forge.sync(self)?;
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
            let _ = self.pool.cancel_tx.send(true);
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
            if self.pool.joins.is_empty() {
                if cancelled {
                    break Err(Error::other(
                        "the step was interrupted; running workers were stopped",
                    ));
                }
                // Nothing running: act() found nothing more to do.
                break Ok(());
            }
            tokio::select! {
                joined = self.pool.joins.join_next() => {
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
                    let _ = self.pool.cancel_tx.send(true);
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
            let _ = self.pool.cancel_tx.send(true);
            while let Some(joined) = self.pool.joins.join_next().await {
                if let Ok((key, _)) = joined {
                    self.forget(&key);
                }
            }
        }
        outcome?;
        self.finish()
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
            .pool
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

    // ----- committing -------------------------------------------------------------------------

    // ----- workers ----------------------------------------------------------------------------

    // ----- merging ----------------------------------------------------------------------------

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

    // ----- recovery ---------------------------------------------------------------------------

    // ----- the end ----------------------------------------------------------------------------

    fn finish(&mut self) -> Result<StepReport> {
        self.flush_staged()?;
        let forge = self.forge;
        forge.finish(self)?;
        for (id, branch) in std::mem::take(&mut self.cleanup.retry) {
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
            _ if self.intake.blocked && self.tasks.values().all(|t| t.status.is_terminal()) => {
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
        let intake_ready = !self.intake.blocked
            && match self.intake.failures.clone() {
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
        Notable::CycleCompleted {
            cycle: self.report.cycle,
            spawned: self.report.spawned.len(),
            reaped: self.report.reaped.len(),
            merged: self.report.merged.len(),
            complete: self.report.tasks_complete,
            failed: self.report.tasks_failed,
            total: self.report.tasks_total,
            progress: progress.to_string(),
            duration_s: self.report.duration_s,
        }
        .emit();
        Ok(self.report.clone())
    }
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
