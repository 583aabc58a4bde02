//! Carries out each command: resolves the target repository and configuration from the shared
//! flags, then calls into the library. Returns what the binary prints and its exit status.

use std::path::{Path, PathBuf};

use std::time::Duration;

use crate::cli::{Command, GlobalArgs};
use crate::config::Config;
use crate::cycle::execute::{StepOptions, StepReport};
use crate::emit;
use crate::error::{Error, Result};
use crate::lock::StepLock;
use crate::notify::Notifier;
use crate::pipeline::Step;
use crate::state::{Changes, Publish, Repo};
use crate::task::{Status, Task};

/// Everything a command needs to know about its target.
#[derive(Debug)]
pub struct Target {
    pub repo: Repo,
    pub config: Config,
    pub config_file: PathBuf,
    /// Uncommitted changes to the configuration, the overlay or the specs, which commands that
    /// read the base branch's commit do not see.
    pub unseen: Vec<String>,
}

impl Target {
    /// Opens the repository named by `--path` and loads its configuration.
    pub fn load(global: &GlobalArgs) -> Result<Target> {
        let repo = open_repo(global)?;
        let config_file = match &global.config {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => std::env::current_dir().map_err(|e| Error::io(".", e))?.join(p),
            None => repo.root.join(".hyperloop.yaml"),
        };
        if global.config.is_some() && !config_file.exists() {
            return Err(Error::usage(format!(
                "--config {}: no such file",
                config_file.display()
            )));
        }
        // One rule for what a step sees (see `committed`): the base branch's commit, unless a
        // file is named on the command line.
        let (mut config, unseen) = match &global.config {
            Some(_) => (Config::load(&config_file, &repo.root)?, Vec::new()),
            None => {
                let mut config = crate::committed::load_config(&repo, &config_file)?;
                let unseen = crate::committed::unseen_changes(&repo, &config, &config_file)?;
                if let Some(copy) = crate::committed::committed_overlay(&repo, &config)? {
                    config.overlay = Some(copy.display().to_string());
                }
                (config, unseen)
            }
        };
        if let Some(r) = &global.repo {
            if !valid_repo_slug(r) {
                return Err(Error::usage(format!("--repo {r}: expected OWNER/REPO")));
            }
            config.target.repo = Some(r.clone());
        }
        // The origin is only looked at when a GitHub credential is there to use (see
        // `infer_repo`): without one, no git process for it.
        if config.target.repo.is_none() && github_credential_set(crate::secrets::var) {
            let origin = repo
                .git
                .output(["config", "--get", "remote.origin.url"])
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
            config.target.repo = infer_repo(origin.as_deref(), crate::secrets::var);
        }
        Ok(Target {
            repo,
            config,
            config_file,
            unseen,
        })
    }

    /// Tasks as committed on the state branch (no lock needed: reads a commit).
    pub fn committed_tasks(&self) -> Result<Vec<Task>> {
        match self.repo.branch_tip(self.config.state_branch())? {
            Some(tip) => Ok(self
                .repo
                .read_tree_state(&tip, &self.config.target.specs_dir)?
                .tasks),
            None => Ok(Vec::new()),
        }
    }
}

/// The repository `--path` names, or the one the current directory is in. Without `--path`, an
/// error speaks of the current directory: the user typed no flag to blame.
pub fn open_repo(global: &GlobalArgs) -> Result<Repo> {
    match &global.path {
        Some(p) => Repo::open(p),
        None => Repo::open(Path::new(".")).map_err(|e| match e {
            Error::Usage { .. } => {
                let here = std::env::current_dir()
                    .map(|d| d.display().to_string())
                    .unwrap_or_else(|_| ".".to_string());
                Error::usage(format!(
                    "{here} is not in a git repository; run hyperloop inside one, or name it with --path DIR"
                ))
            }
            other => other,
        }),
    }
}

/// OWNER/REPO from the `origin` URL, for GitHub mode without `--repo` or `target.repo`. Only
/// when a GitHub credential is in the environment: a plain local run must never turn into a
/// GitHub one just because its origin happens to live on GitHub. github.com URLs only, unless
/// `GITHUB_API_URL` names another server (Enterprise), in which case any host is taken.
///
/// The URL is read from the configuration as written (not `git remote get-url`), so that an
/// `insteadOf` rewrite to a mirror does not hide which repository it is.
pub fn infer_repo(origin_url: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set = |k: &str| env(k).is_some_and(|v| !v.trim().is_empty());
    if !github_credential_set(&env) {
        return None;
    }
    let (host, path) = split_remote_url(origin_url?.trim())?;
    if !set("GITHUB_API_URL") && !host.eq_ignore_ascii_case("github.com") {
        return None;
    }
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    valid_repo_slug(path).then(|| path.to_string())
}

/// Whether a GitHub credential is in the environment, without which an origin URL is not taken
/// for a GitHub repository.
fn github_credential_set(env: impl Fn(&str) -> Option<String>) -> bool {
    let set = |k: &str| env(k).is_some_and(|v| !v.trim().is_empty());
    set("GITHUB_TOKEN") || set("GH_TOKEN") || set("HYPERLOOP_APP_ID")
}

/// Host and path of a git remote URL: `scheme://[user@]host[:port]/path` or scp-like
/// `[user@]host:path`. Local paths and `file://` URLs have no host and give `None`.
fn split_remote_url(url: &str) -> Option<(&str, &str)> {
    if let Some((scheme, rest)) = url.split_once("://") {
        if !matches!(scheme, "https" | "http" | "ssh" | "git" | "git+ssh" | "ssh+git") {
            return None;
        }
        let (authority, path) = rest.split_once('/')?;
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = host.split_once(':').map_or(host, |(h, _)| h);
        return (!host.is_empty()).then_some((host, path));
    }
    // scp-like syntax: a colon before any slash.
    let (authority, path) = url.split_once(':')?;
    if authority.contains('/') || path.starts_with("//") {
        return None;
    }
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    // One letter before the colon is a Windows drive, as git itself reads it.
    (host.len() > 1).then_some((host, path))
}

fn valid_repo_slug(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// What a command produced: text for standard output and the exit status.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: String) -> Outcome {
        Outcome { stdout, exit_code: 0 }
    }
}

/// Runs one parsed command line.
pub fn run(command: &Command, global: &GlobalArgs) -> Result<Outcome> {
    match command {
        Command::Init(args) => {
            let repo = open_repo(global)?;
            let options = crate::init::InitOptions {
                fan_out: args.fan_out,
            };
            let report = crate::init::init_with(&repo.root, &options)?;
            Ok(Outcome::ok(report.to_string()))
        }
        Command::Status(args) => {
            let target = Target::load(global)?;
            let tasks = target.committed_tasks()?;
            let text = if args.json {
                status_json(&tasks)?
            } else {
                status_table(&tasks) + &crate::commands::intake_note(&target)?
            };
            Ok(Outcome::ok(text))
        }
        Command::Step(args) => {
            let mut target = Target::load(global)?;
            override_max_workers(&mut target, args.max_workers)?;
            let _notifier = start_logging(&target, !global.dry_run);
            let note = crate::commands::preflight(&target, global.dry_run)?;
            if global.dry_run {
                return Ok(Outcome::ok(note + &crate::cycle::execute::dry_run(&target)?));
            }
            let max_duration = args.max_duration.map(Duration::from_secs);
            emit_started(&target);
            let report = match block_on(async {
                let opts = StepOptions {
                    max_duration,
                    cycle: 1,
                    interrupt: Some(crate::cycle::execute::interrupt_on_signals()?),
                };
                crate::cycle::execute::step(&target, &opts).await
            })? {
                Ok(r) => r,
                Err(Error::Busy { path, pid }) => {
                    emit!(
                        INFO,
                        "step_skipped",
                        reason = "another step holds the repository",
                        lock = path.display().to_string().as_str(),
                        holder_pid = pid
                    );
                    let text = if args.json {
                        "{\"skipped\": true}\n".to_string()
                    } else {
                        format!(
                            "another hyperloop step (pid {pid}) is working on this repository; nothing done\n"
                        )
                    };
                    return Ok(Outcome::ok(text));
                }
                Err(e) => return Err(e),
            };
            crate::action::after_step(&target, &report);
            let text = if args.json {
                let mut s = serde_json::to_string_pretty(&report).map_err(|e| Error::other(e.to_string()))?;
                s.push('\n');
                s
            } else {
                summary(&report)
            };
            Ok(Outcome::ok(text))
        }
        Command::Run(args) => {
            let mut target = Target::load(global)?;
            override_max_workers(&mut target, args.max_workers)?;
            let _notifier = start_logging(&target, !global.dry_run);
            let note = crate::commands::preflight(&target, global.dry_run)?;
            if global.dry_run {
                return Ok(Outcome::ok(note + &crate::cycle::execute::dry_run(&target)?));
            }
            emit_started(&target);
            let (outcome, last) = block_on(run_loop(&target))??;
            crate::action::after_step(&target, &last);
            Ok(outcome)
        }
        Command::Retry(args) => {
            no_dry_run(global)?;
            let target = Target::load(global)?;
            let _notifier = start_logging(&target, false);
            crate::commands::retry_or_cancel(&target, crate::cycle::execute::Op::Retry, &args.task)
        }
        Command::Cancel(args) => {
            no_dry_run(global)?;
            let target = Target::load(global)?;
            let _notifier = start_logging(&target, false);
            crate::commands::retry_or_cancel(&target, crate::cycle::execute::Op::Cancel, &args.task)
        }
        Command::Logs(args) => {
            no_dry_run(global)?;
            let target = Target::load(global)?;
            crate::logs::show(&target, args)
        }
        Command::Plan(args) => {
            no_dry_run(global)?;
            let target = Target::load(global)?;
            let _notifier = start_logging(&target, true);
            crate::commands::preflight_repository(&target)?;
            emit_started(&target);
            let report = block_on(async {
                let opts = step_options()?;
                crate::cycle::execute::plan(&target, &opts).await
            })??;
            crate::action::after_step(&target, &report);
            let text = if args.json {
                let items = serde_json::json!({ "items": report.items });
                let mut s = serde_json::to_string(&items).map_err(|e| Error::other(e.to_string()))?;
                s.push('\n');
                s
            } else {
                let mut s: String = report
                    .items
                    .iter()
                    .map(|i| format!("{}\t{} {} round {}\n", i.id, i.task_id, i.role, i.round))
                    .collect();
                s.push_str(&format!("plan: {} item(s) claimed; ", report.items.len()));
                s.push_str(&summary(&report));
                s
            };
            Ok(Outcome::ok(text))
        }
        Command::Work(args) => {
            no_dry_run(global)?;
            let target = Target::load(global)?;
            let _notifier = start_logging(&target, false);
            let report = block_on(crate::cycle::execute::work(&target, &args.item, &args.out))??;
            Ok(Outcome::ok(format!(
                "work: {} ({} {}) {}, {} commit(s); output in {}\n",
                report.item, report.task_id, report.role, report.verdict, report.commits, report.out
            )))
        }
        Command::Record(args) => {
            no_dry_run(global)?;
            let target = Target::load(global)?;
            let _notifier = start_logging(&target, true);
            emit_started(&target);
            let report = block_on(async {
                let opts = step_options()?;
                crate::cycle::execute::record(&target, &opts, &args.dirs).await
            })??;
            crate::action::after_step(&target, &report);
            let text = if args.json {
                let mut s = serde_json::to_string_pretty(&report).map_err(|e| Error::other(e.to_string()))?;
                s.push('\n');
                s
            } else {
                let mut s: String = report
                    .refused
                    .iter()
                    .map(|r| format!("refused {}: {}\n", r.dir, r.reason))
                    .collect();
                s.push_str(&format!(
                    "record: {} output(s) applied, {} refused; ",
                    report.recorded.len(),
                    report.refused.len()
                ));
                s.push_str(&summary(&report));
                s
            };
            Ok(Outcome::ok(text))
        }
        Command::Approve(args) => {
            if global.dry_run {
                return Err(Error::usage("--dry-run applies to step and run"));
            }
            let target = Target::load(global)?;
            let _notifier = start_logging(&target, false);
            approve(&target, &args.task, args.gate.as_deref())
        }
    }
}

/// Options of a `plan` or `record`: one cycle that stops cleanly on SIGTERM or SIGINT.
fn step_options() -> Result<StepOptions> {
    Ok(StepOptions {
        max_duration: None,
        cycle: 1,
        interrupt: Some(crate::cycle::execute::interrupt_on_signals()?),
    })
}

fn no_dry_run(global: &GlobalArgs) -> Result<()> {
    if global.dry_run {
        return Err(Error::usage("--dry-run applies to step and run"));
    }
    Ok(())
}

fn override_max_workers(target: &mut Target, max_workers: Option<usize>) -> Result<()> {
    if let Some(n) = max_workers {
        if n == 0 {
            return Err(Error::usage("--max-workers must be at least 1"));
        }
        target.config.runtime.max_workers = n;
    }
    Ok(())
}

/// Installs the event printer and, when `notify` and `observability.matrix` ask for it, the
/// Matrix notifier beside it. The returned guard flushes the notifier when the command ends,
/// whichever way it ends.
fn start_logging(target: &Target, notify: bool) -> NotifyGuard {
    let o = &target.config.observability;
    let notifier = match &o.matrix {
        Some(m) if notify => Some(Notifier::matrix(m, &target.repo.root, &crate::secrets::var)),
        _ => None,
    };
    // The Action may choose the format (its `log-format` input) without editing the config.
    let format = crate::action::log_format_override().unwrap_or(o.log_format);
    crate::events::init_with(format, o.log_level, notifier.as_ref().map(Notifier::boxed_layer));
    NotifyGuard(notifier)
}

/// Flushes pending notifications on drop, within the notifier's time budget.
struct NotifyGuard(Option<Notifier>);

impl Drop for NotifyGuard {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            let report = n.flush();
            // After a failure `matrix_disabled` has already said that the rest is dropped.
            if report.dropped > 0 && report.failure.is_none() {
                emit!(
                    WARN,
                    "matrix_notices_dropped",
                    sent = report.sent,
                    dropped = report.dropped
                );
            }
        }
    }
}

fn emit_started(target: &Target) {
    emit!(
        INFO,
        "orchestrator_started",
        repo = target.repo.root.display().to_string().as_str(),
        branch = target.config.target.base_branch.as_str(),
        max_workers = target.config.runtime.max_workers,
        max_rounds = target.config.max_task_rounds,
        overlay = target.config.overlay.as_deref().unwrap_or("-"),
        mode = if target.config.target.repo.is_some() {
            "github"
        } else {
            "local"
        }
    );
}

fn block_on<F: std::future::Future>(fut: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::other(format!("cannot start the async runtime: {e}")))?;
    Ok(rt.block_on(fut))
}

/// One line per step for people; `--json` has everything.
fn summary(r: &StepReport) -> String {
    let mut s = format!(
        "step: agents {} started, {} finished; {} merged; {}/{} tasks complete",
        r.spawned.len(),
        r.reaped.len(),
        r.merged.len(),
        r.tasks_complete,
        r.tasks_total
    );
    if r.tasks_failed > 0 {
        s.push_str(&format!(", {} failed", r.tasks_failed));
    }
    if !r.blocked.is_empty() {
        s.push_str(&format!(", blocked: {}", r.blocked.join(", ")));
    }
    if !r.waiting.is_empty() {
        s.push_str(&format!(", waiting for approval: {}", r.waiting.join(", ")));
    }
    if let Some(at) = &r.rate_limited_until {
        s.push_str(&format!(", GitHub rate limit: try again after {at}"));
    }
    if let Some(api) = &r.github_api {
        s.push_str(&format!(", GitHub API: {} requests", api.requests));
        if let (Some(left), Some(limit)) = (api.remaining, api.limit) {
            s.push_str(&format!(" ({left} of {limit} left this hour)"));
        }
        if !api.deferred.is_empty() {
            s.push_str(&format!(", {} writes deferred", api.deferred.len()));
        }
    }
    s.push_str(&format!(" ({})\n", r.progress));
    s
}

/// The longest `run` waits between steps for the pace of GitHub writes to allow more.
const MAX_PACE_PAUSE: Duration = Duration::from_secs(90);

/// `run`: steps until the work is done, cannot progress, or `max_cycles` ran out. Returns the
/// outcome and the last step's report.
async fn run_loop(target: &Target) -> Result<(Outcome, StepReport)> {
    let config = &target.config;
    let mut hinted_waiting = false;
    let mut last = StepReport::default();
    // One signal watcher for the whole run, so a signal between steps is not lost.
    let mut interrupt = Some(crate::cycle::execute::interrupt_on_signals()?);
    for cycle in 1..=u64::from(config.max_cycles) {
        if interrupt.as_ref().is_some_and(|rx| *rx.borrow()) {
            return Err(stopped_by_signal(cycle, &last));
        }
        let opts = StepOptions {
            max_duration: None,
            cycle,
            interrupt: interrupt.clone(),
        };
        match crate::cycle::execute::step(target, &opts).await {
            Ok(report) => last = report,
            Err(Error::Busy { pid, .. }) => {
                emit!(
                    INFO,
                    "step_skipped",
                    reason = "another step holds the repository",
                    holder_pid = pid,
                    cycle = cycle
                );
                tokio::time::sleep(Duration::from_secs(config.poll_interval.max(1))).await;
                continue;
            }
            Err(e) => return Err(e),
        }
        match last.progress.as_str() {
            "rate-limited" => {
                // Sleeping out a long reset would hold a CI runner; the next run continues.
                emit!(
                    WARN,
                    "orchestrator_halted",
                    reason = "GitHub rate limit reached",
                    retry_at = last.rate_limited_until.as_deref().unwrap_or("-"),
                    total_cycles = cycle,
                    completed_tasks = last.tasks_complete,
                    failed_tasks = last.tasks_failed
                );
                let outcome = Outcome {
                    stdout: summary(&last),
                    exit_code: 0,
                };
                return Ok((outcome, last));
            }
            "all-complete" | "idle" => {
                let reason = if last.progress == "idle" {
                    "nothing to do: no specs and no tasks"
                } else {
                    "all tasks complete"
                };
                emit!(
                    INFO,
                    "orchestrator_halted",
                    reason = reason,
                    total_cycles = cycle,
                    completed_tasks = last.tasks_complete,
                    failed_tasks = last.tasks_failed
                );
                let outcome = Outcome {
                    stdout: summary(&last),
                    exit_code: 0,
                };
                return Ok((outcome, last));
            }
            "stuck" => {
                emit!(
                    ERROR,
                    "orchestrator_halted",
                    reason = stuck_reason(&last).as_str(),
                    total_cycles = cycle,
                    completed_tasks = last.tasks_complete,
                    failed_tasks = last.tasks_failed,
                    blocked = last.blocked.join(",").as_str()
                );
                let outcome = Outcome {
                    stdout: summary(&last),
                    exit_code: 3,
                };
                return Ok((outcome, last));
            }
            "waiting" if !hinted_waiting => {
                hinted_waiting = true;
                emit!(
                    INFO,
                    "waiting_for_approval",
                    tasks = last.waiting.join(",").as_str(),
                    hint = "run `hyperloop approve TASK` to clear a gate"
                );
            }
            _ => {}
        }
        // A step held back by the pace of GitHub writes: the next one is useful only once the
        // pace allows more; a long wait ends the run like a rate limit does.
        let mut pause = Duration::from_secs(config.poll_interval);
        if let Some(until) = last
            .github_api
            .as_ref()
            .and_then(|api| api.paced_until.as_deref())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        {
            let wait = (until.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or_default();
            let idle = last.spawned.is_empty() && last.reaped.is_empty() && last.merged.is_empty();
            if idle && wait > MAX_PACE_PAUSE {
                emit!(
                    INFO,
                    "orchestrator_halted",
                    reason = "GitHub write pace spent",
                    retry_at = until.to_rfc3339().as_str(),
                    total_cycles = cycle,
                    completed_tasks = last.tasks_complete,
                    failed_tasks = last.tasks_failed
                );
                let outcome = Outcome {
                    stdout: summary(&last),
                    exit_code: 0,
                };
                return Ok((outcome, last));
            }
            pause = pause.max(wait.min(MAX_PACE_PAUSE));
        }
        if cycle < u64::from(config.max_cycles) {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = crate::cycle::execute::interrupted(&mut interrupt) => {
                    return Err(stopped_by_signal(cycle, &last));
                }
            }
        }
    }
    emit!(
        WARN,
        "orchestrator_halted",
        reason = format!("max_cycles exhausted ({})", config.max_cycles).as_str(),
        total_cycles = config.max_cycles,
        completed_tasks = last.tasks_complete,
        failed_tasks = last.tasks_failed
    );
    let outcome = Outcome {
        stdout: summary(&last),
        exit_code: 3,
    };
    Ok((outcome, last))
}

/// Why nothing more can happen, in the words that fit: an intake that gave up, failed or
/// cancelled tasks and those behind them, or a spending cap.
fn stuck_reason(last: &StepReport) -> String {
    let mut parts = Vec::new();
    if let Some(e) = &last.intake_gave_up {
        let e = e.lines().next().unwrap_or("").trim();
        parts.push(format!(
            "intake gave up after {} attempts ({e}); {}",
            crate::cycle::execute::MAX_INTAKE_ATTEMPTS,
            crate::cycle::execute::INTAKE_GAVE_UP_HINT
        ));
    }
    if last.tasks_failed > 0 {
        let mut s = format!("{} task(s) failed or were cancelled", last.tasks_failed);
        if !last.blocked.is_empty() {
            s.push_str(&format!(
                " and {} wait behind them ({})",
                last.blocked.len(),
                last.blocked.join(", ")
            ));
        }
        s.push_str("; `hyperloop retry TASK` puts a task back");
        parts.push(s);
    }
    if parts.is_empty() {
        parts.push(
            "no task can progress: the spending cap (runtime.max_total_cost_usd) is reached".to_string(),
        );
    }
    parts.join("; ")
}

fn stopped_by_signal(cycle: u64, last: &StepReport) -> Error {
    emit!(
        WARN,
        "orchestrator_halted",
        reason = "interrupted by a signal",
        total_cycles = cycle,
        completed_tasks = last.tasks_complete,
        failed_tasks = last.tasks_failed
    );
    Error::other("interrupted by a signal; the next run continues where this one stopped")
}

/// `approve TASK`: records that the gate TASK waits at is cleared (local mode).
fn approve(target: &Target, task_id: &str, gate: Option<&str>) -> Result<Outcome> {
    let repo = &target.repo;
    let mut said = false;
    let _lock = loop {
        match StepLock::acquire(&repo.common_dir.join("hyperloop.lock")) {
            Ok(l) => break l,
            // A running step holds the lock and writes the same task files: the approval is
            // recorded as soon as it ends (or stops between its commits).
            Err(Error::Busy { .. }) => {
                if !said {
                    emit!(
                        INFO,
                        "approve_waiting",
                        task_id = task_id,
                        reason = "a step is running; the approval is recorded when it ends"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    };
    let defs = crate::definitions::load(&target.config, &repo.root)?;
    let branch = target.config.state_branch();
    let Some(tip) = repo.branch_tip(branch)? else {
        return Err(Error::usage(format!(
            "no task {task_id}: branch `{branch}` does not exist"
        )));
    };
    let tree = repo.read_tree_state(&tip, &target.config.target.specs_dir)?;
    let Some(mut task) = tree.tasks.into_iter().find(|t| t.id == task_id) else {
        return Err(Error::usage(format!(
            "no task {task_id} in {}",
            target.config.target.specs_dir
        )));
    };
    let Some(name) = waiting_gate(&task, &defs.process.pipeline, target.config.merge.auto_merge) else {
        let at = task
            .phase
            .as_deref()
            .filter(|_| !task.status.is_terminal())
            .map(|p| format!(" at {p}"))
            .unwrap_or_default();
        return Err(Error::usage(format!(
            "{task_id} waits at no gate: it is {}{at}",
            if task.cancelled {
                "cancelled"
            } else {
                task.status.as_str()
            }
        )));
    };
    if let Some(g) = gate
        && g != name
    {
        return Err(Error::usage(format!(
            "{task_id} waits at gate `{name}`, not `{g}`"
        )));
    }
    if task.gate_cleared {
        return Ok(Outcome::ok(format!(
            "{task_id}: gate `{name}` was already approved\n"
        )));
    }
    task.gate_cleared = true;
    let mut changes = Changes::default();
    changes.put_task(
        &format!("{}/tasks", target.config.target.specs_dir.trim_end_matches('/')),
        &task,
    );
    let message = crate::cycle::execute::commit_message(
        &format!("hyperloop: approve {task_id} at {name}"),
        "",
        &[&task.spec_ref],
        task_id,
    );
    let committed = repo.commit_changes(&tip, &changes, &message);
    repo.discard_private_indexes();
    let Some(commit) = committed? else {
        return Ok(Outcome::ok(format!("{task_id}: nothing to change\n")));
    };
    match repo.publish(branch, &tip, &commit)? {
        Publish::Moved => {}
        Publish::Raced(_) => {
            return Err(Error::other(format!(
                "branch `{branch}` moved while approving; run the command again"
            )));
        }
    }
    emit!(INFO, "gate_approved", task_id = task_id, gate = name.as_str());
    Ok(Outcome::ok(format!("{task_id}: approved gate `{name}`\n")))
}

/// The gate a task waits at: a gate step, or `merge-pr` when merges need a person.
pub fn waiting_gate(task: &Task, pipeline: &[Step], auto_merge: bool) -> Option<String> {
    if task.status != Status::InProgress {
        return None;
    }
    let located = crate::cycle::transition::locate(task, pipeline)?;
    match crate::pipeline::step_at(pipeline, &located.position)? {
        Step::Gate { name } => Some(name.clone()),
        Step::Action { name } if name == crate::pipeline::MERGE_PR && !auto_merge => Some(name.clone()),
        _ => None,
    }
}

/// `status --json`: one document `{"tasks": [...]}`.
pub fn status_json(tasks: &[Task]) -> Result<String> {
    let list: Vec<serde_json::Value> = tasks
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": t.id,
                "title": t.title,
                "spec_ref": t.spec_ref,
                "status": t.status.as_str(),
                "phase": t.phase,
                "position": t.position,
                "round": t.round,
                "deps": t.deps,
                "branch": t.branch,
                "pr": t.pr,
                "last_verdict": t.last_verdict,
                "failure_reason": t.failure_reason,
                "verified_tip": t.verified_tip,
                "cancelled": t.cancelled,
                "blocked_by": blocked_by(t, tasks),
                "gate_cleared": t.gate_cleared,
                "cost_usd": t.cost_usd,
                "history": t.history,
            })
        })
        .collect();
    let mut s = serde_json::to_string_pretty(&serde_json::json!({ "tasks": list }))
        .map_err(|e| Error::other(e.to_string()))?;
    s.push('\n');
    Ok(s)
}

/// The failed (or cancelled) tasks that keep a not-started task from starting, through its
/// dependencies, sorted.
pub fn blocked_by(task: &Task, tasks: &[Task]) -> Vec<String> {
    if task.status != Status::NotStarted {
        return Vec::new();
    }
    let mut found = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut frontier: Vec<&str> = task.deps.iter().map(String::as_str).collect();
    while let Some(id) = frontier.pop() {
        if !seen.insert(id) {
            continue;
        }
        if let Some(dep) = tasks.iter().find(|t| t.id == id) {
            if dep.status == Status::Failed {
                found.insert(id.to_string());
            }
            frontier.extend(dep.deps.iter().map(String::as_str));
        }
    }
    found.into_iter().collect()
}

/// `status`: a table, one row per task.
pub fn status_table(tasks: &[Task]) -> String {
    if tasks.is_empty() {
        return "no tasks yet\n".to_string();
    }
    let header = [
        "ID", "STATUS", "PHASE", "ROUND", "DEPS", "BRANCH", "PR", "VERDICT", "COST",
    ];
    let mut rows: Vec<[String; 9]> = Vec::with_capacity(tasks.len());
    for t in tasks {
        let blocked = blocked_by(t, tasks);
        let phase = match (&t.phase, t.gate_cleared) {
            _ if !blocked.is_empty() => {
                let names: Vec<String> = blocked
                    .iter()
                    .map(|id| match tasks.iter().find(|d| d.id == *id) {
                        Some(d) if d.cancelled => format!("{id} (cancelled)"),
                        _ => id.clone(),
                    })
                    .collect();
                format!("blocked by {}", names.join(", "))
            }
            (Some(p), true) => format!("{p} (approved)"),
            (Some(p), false) => p.clone(),
            (None, _) => "-".into(),
        };
        let status = if t.cancelled {
            "failed (cancelled)".to_string()
        } else {
            t.status.as_str().to_string()
        };
        rows.push([
            t.id.clone(),
            status,
            phase,
            t.round.to_string(),
            if t.deps.is_empty() {
                "-".into()
            } else {
                t.deps.join(",")
            },
            t.branch.clone().unwrap_or_else(|| "-".into()),
            t.pr.clone().unwrap_or_else(|| "-".into()),
            t.last_verdict.clone().unwrap_or_else(|| "-".into()),
            format!("${:.2}", t.cost_usd),
        ]);
    }
    let mut widths = header.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            l.push_str(c);
            if i + 1 < cells.len() {
                l.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header.map(str::to_string));
    for r in &rows {
        line(r);
    }
    let total: f64 = tasks.iter().map(|t| t.cost_usd).fold(0.0, |a, b| a + b);
    let done = tasks
        .iter()
        .filter(|t| t.status == crate::task::Status::Complete)
        .count();
    out.push_str(&format!("\n{done}/{} complete, ${total:.2} spent\n", tasks.len()));
    out
}

/// The directory a relative path given on the command line refers to.
pub fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

#[cfg(test)]
mod repo_inference_tests {
    use super::infer_repo;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_string())
    }

    #[test]
    fn github_urls_in_every_form() {
        let token = [("GITHUB_TOKEN", "t")];
        for url in [
            "https://github.com/acme/widgets.git",
            "https://github.com/acme/widgets",
            "https://github.com/acme/widgets/",
            "https://x-access-token:abc@github.com/acme/widgets.git",
            "http://github.com/acme/widgets.git",
            "ssh://git@github.com/acme/widgets.git",
            "ssh://git@github.com:22/acme/widgets",
            "git@github.com:acme/widgets.git",
            "git@github.com:acme/widgets",
            "git://github.com/acme/widgets.git",
            "https://GitHub.com/acme/widgets.git",
        ] {
            assert_eq!(
                infer_repo(Some(url), env(&token)).as_deref(),
                Some("acme/widgets"),
                "{url}"
            );
        }
    }

    #[test]
    fn any_credential_enables_it() {
        let url = Some("git@github.com:acme/widgets.git");
        assert!(infer_repo(url, env(&[("GH_TOKEN", "t")])).is_some());
        assert!(infer_repo(url, env(&[("HYPERLOOP_APP_ID", "12")])).is_some());
    }

    #[test]
    fn never_without_a_credential() {
        let url = Some("https://github.com/acme/widgets.git");
        assert_eq!(infer_repo(url, env(&[])), None);
        assert_eq!(infer_repo(url, env(&[("GITHUB_TOKEN", "  ")])), None);
        assert_eq!(infer_repo(url, env(&[("GITHUB_API_URL", "http://x")])), None);
    }

    #[test]
    fn other_hosts_only_with_an_api_url() {
        let url = Some("https://git.example.com/acme/widgets.git");
        assert_eq!(infer_repo(url, env(&[("GITHUB_TOKEN", "t")])), None);
        assert_eq!(
            infer_repo(
                url,
                env(&[
                    ("GITHUB_TOKEN", "t"),
                    ("GITHUB_API_URL", "https://git.example.com/api/v3")
                ])
            )
            .as_deref(),
            Some("acme/widgets")
        );
        assert_eq!(
            infer_repo(
                Some("git@gitlab.com:acme/widgets.git"),
                env(&[("GITHUB_TOKEN", "t")])
            ),
            None
        );
    }

    #[test]
    fn what_does_not_parse_stays_local() {
        let vars = [("GITHUB_TOKEN", "t"), ("GITHUB_API_URL", "http://127.0.0.1:1")];
        for url in [
            "/srv/git/widgets.git",
            "../widgets.git",
            "file:///srv/git/widgets.git",
            "C:/repos/widgets",
            "https://github.com/acme",
            "https://github.com/acme/widgets/extra",
            "https://github.com/",
            "github.com",
            "",
        ] {
            assert_eq!(infer_repo(Some(url), env(&vars)), None, "{url}");
        }
        assert_eq!(infer_repo(None, env(&vars)), None);
    }
}
