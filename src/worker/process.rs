//! Running one agent process: its environment, standard input, log, limits and verdict.
//!
//! The agent runs in its own process group so that everything it starts (shells, test runners,
//! servers) can be stopped together: on the wall-clock limit, on the stall limit (no output at
//! all), on cancellation, and after the agent itself exits, because nothing it started may outlive
//! the worker. On Linux the agent also gets `PR_SET_PDEATHSIG`, so a hyperloop killed with SIGKILL
//! (which cannot clean up) still takes its agent down.
//!
//! Standard output and error are drained concurrently into a per-worker log file that is kept
//! after the run; claude's stream-json `result` event is picked out of standard output on the way.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::git::Git;

use super::result::{self, ResultFile};
use super::stream_json::StreamJsonReader;
use super::{RESULT_FILE, Verdict, WorkerOutcome, env};

/// How long a process group gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How much of the log an error detail quotes.
const LOG_TAIL_BYTES: u64 = 2000;

/// A partial stdout line longer than this is not stream-json worth parsing.
const MAX_LINE_BYTES: usize = 16 << 20;

/// Everything needed to run one worker.
#[derive(Debug, Clone, Default)]
pub struct WorkerSpec {
    /// `HYPERLOOP_TASK_ID`: the task, or `intake` / `process-improvement`.
    pub task_id: String,
    pub role: String,
    pub spec_ref: String,
    pub round: u32,
    /// The branch checked out in `worktree` (informational for detached base worktrees).
    pub branch: String,
    pub base_branch: String,
    /// Where the agent runs; must exist and be a git worktree.
    pub worktree: PathBuf,
    /// Sent on standard input and written to `HYPERLOOP_PROMPT_FILE`.
    pub prompt: String,
    /// The program and its arguments (`runtime.agent_command`).
    pub command: Vec<String>,
    /// Extra variable names passed through (`runtime.agent_env`); credentials are refused.
    pub agent_env: Vec<String>,
    pub worker_timeout: Duration,
    pub stall_timeout: Duration,
    /// Where the agent's output goes (appended; the directory is created).
    pub log_file: PathBuf,
    /// A token for this run (`HYPERLOOP_NONCE`), also naming the prompt file.
    pub nonce: String,
    /// The commit the task branch started from, noted in the log.
    pub base_commit: Option<String>,
    /// Further variable names that are credentials in this configuration (e.g. the Matrix
    /// `token_env`); never passed even when listed in `agent_env`.
    pub secret_env: Vec<String>,
    /// The environment the allowlist is applied to; `None` means hyperloop's own.
    pub parent_env: Option<Vec<(OsString, OsString)>>,
    /// The commit the worktree has checked out, when the caller has just looked; `None`: the
    /// worker asks git.
    pub known_head: Option<String>,
    /// The repository the agent's work is taken into after the run (see
    /// [`super::worktree::import`]); `None` leaves it in the checkout. For a task (`detached`
    /// false) its branch moves; otherwise only the commit comes in.
    pub import_into: Option<Git>,
    /// The checkout is detached (intake, process improvement): its work is at `HEAD`.
    pub detached: bool,
    /// The hyperloop program, to run the agent under its supervisor (see
    /// [`super::supervisor`]); `None` runs the agent directly.
    pub supervisor: Option<PathBuf>,
}

impl WorkerSpec {
    /// The absolute path of the result file the agent writes.
    pub fn result_file(&self) -> PathBuf {
        absolute(&self.worktree).join(RESULT_FILE)
    }

    /// The file holding the prompt, next to the log and outside the worktree (so an agent's
    /// `git add -A` cannot pick it up).
    pub fn prompt_file(&self) -> PathBuf {
        if let Some(u) = super::agent_user::current() {
            // The agent user reads nothing of hyperloop's outside its checkout: as root the
            // prompt goes into the checkout's git directory (outside the work tree, so
            // `git add -A` does not take it); through sudo, where hyperloop cannot write there,
            // into the temporary directory.
            let name = format!("hyperloop-prompt-{}.md", self.nonce);
            let dir = if u.via_sudo {
                std::env::temp_dir()
            } else {
                absolute(&self.worktree).join(".git")
            };
            return dir.join(name);
        }
        let log = absolute(&self.log_file);
        let stem = log
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "worker".to_string());
        // The log's name already identifies the run (it carries the nonce when the executor
        // made it); a bare name gets the nonce so two runs never share a prompt file.
        let name = if self.nonce.is_empty() || stem.contains(&self.nonce) {
            format!("{stem}.prompt.md")
        } else {
            format!("{stem}-{}.prompt.md", self.nonce)
        };
        log.with_file_name(name)
    }

    /// The complete environment the agent starts with.
    pub fn environment(&self) -> Vec<(OsString, OsString)> {
        let parent: Vec<(OsString, OsString)> = match &self.parent_env {
            Some(p) => p.clone(),
            None => std::env::vars_os().collect(),
        };
        let mut vars = env::inherited(parent, &self.agent_env, &self.secret_env);
        let own: [(&str, String); 9] = [
            ("HYPERLOOP_TASK_ID", self.task_id.clone()),
            ("HYPERLOOP_ROLE", self.role.clone()),
            ("HYPERLOOP_SPEC_REF", self.spec_ref.clone()),
            ("HYPERLOOP_ROUND", self.round.to_string()),
            ("HYPERLOOP_BRANCH", self.branch.clone()),
            ("HYPERLOOP_BASE_BRANCH", self.base_branch.clone()),
            (
                "HYPERLOOP_RESULT_FILE",
                self.result_file().to_string_lossy().into_owned(),
            ),
            (
                "HYPERLOOP_PROMPT_FILE",
                self.prompt_file().to_string_lossy().into_owned(),
            ),
            ("HYPERLOOP_NONCE", self.nonce.clone()),
        ];
        vars.retain(|(k, _)| !own.iter().any(|(name, _)| k == name));
        if let Some(u) = super::agent_user::current() {
            vars.retain(|(k, _)| k != "HOME" && k != "USER");
            vars.push((OsString::from("HOME"), u.home.clone().into_os_string()));
            vars.push((OsString::from("USER"), OsString::from(&u.name)));
        }
        vars.extend(
            own.into_iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        // No background maintenance started from an agent's commits: it would outlive the
        // worker, and stopping it halfway leaves the repository's locks behind.
        if !vars.iter().any(|(k, _)| k == "GIT_CONFIG_COUNT") {
            vars.extend(
                [
                    ("GIT_CONFIG_COUNT", "2"),
                    ("GIT_CONFIG_KEY_0", "maintenance.auto"),
                    ("GIT_CONFIG_VALUE_0", "false"),
                    ("GIT_CONFIG_KEY_1", "gc.auto"),
                    ("GIT_CONFIG_VALUE_1", "0"),
                ]
                .into_iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
            );
        }
        vars
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Why the wait for the agent ended.
enum Ending {
    Exited(ExitStatus),
    WallTimeout,
    Stalled,
    Cancelled,
    /// Waiting for the agent failed; it was killed to be sure.
    Lost(String),
}

/// Runs the worker to completion (or until a limit or `cancel` stops it) and reports what it did.
/// Never fails: every problem, including not being able to start the agent, is a verdict `error`
/// with the reason in the detail.
pub async fn run_worker(spec: &WorkerSpec, mut cancel: watch::Receiver<bool>) -> WorkerOutcome {
    let started = Instant::now();
    let log_path = absolute(&spec.log_file);
    let fail = |detail: String| WorkerOutcome::error(detail, log_path.clone(), started.elapsed());

    if *cancel.borrow_and_update() {
        return fail("cancelled".into());
    }
    let Some((program, args)) = spec.command.split_first() else {
        return fail("runtime.agent_command is empty".into());
    };
    let worktree = absolute(&spec.worktree);
    let wt = super::agent_user::checkout_git(&worktree);
    let looked_up = match &spec.known_head {
        Some(h) => Ok(Some(h.clone())),
        None => wt.rev_parse("HEAD"),
    };
    let pre_head = match looked_up {
        Ok(Some(h)) => h,
        Ok(None) => {
            return fail(format!(
                "worktree {} has no commit checked out",
                worktree.display()
            ));
        }
        Err(e) => return fail(format!("worktree {} is not usable: {e}", worktree.display())),
    };
    let result_path = spec.result_file();
    if let Err(e) = result::remove_stale(&result_path) {
        return fail(format!("cannot remove the stale result file: {e}"));
    }

    let log = match open_log(&log_path) {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot open the log {}: {e}", log_path.display())),
    };
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log = Arc::new(Mutex::new(log));
    write_log(
        &log,
        format!(
            "=== hyperloop worker: task {} role {} round {} nonce {} base {} head {}\n=== command: {}\n",
            spec.task_id,
            spec.role,
            spec.round,
            spec.nonce,
            spec.base_commit.as_deref().unwrap_or("-"),
            pre_head,
            shell_words::join(&spec.command),
        )
        .as_bytes(),
    );

    let prompt_file = spec.prompt_file();
    if let Err(e) = std::fs::write(&prompt_file, &spec.prompt) {
        return fail(format!(
            "cannot write the prompt file {}: {e}",
            prompt_file.display()
        ));
    }
    let refused = env::refused_names(&spec.agent_env, &spec.secret_env);
    if !refused.is_empty() {
        tracing::warn!(
            task_id = %spec.task_id,
            names = %refused.join(","),
            "runtime.agent_env names credentials; they are not passed to workers"
        );
    }

    let (to_run, run_args): (PathBuf, Vec<OsString>) = match &spec.supervisor {
        Some(hyperloop) => {
            let mut a = vec![
                OsString::from(super::supervisor::COMMAND),
                OsString::from(program),
            ];
            a.extend(args.iter().map(OsString::from));
            (hyperloop.clone(), a)
        }
        None => (PathBuf::from(program), args.iter().map(OsString::from).collect()),
    };
    let user = super::agent_user::current();
    let (to_run, run_args) = match &user {
        Some(u) => super::agent_user::command_as(u, &to_run, run_args),
        None => (to_run, run_args),
    };
    let mut cmd = Command::new(&to_run);
    cmd.args(&run_args);
    if let Some(u) = &user
        && !u.via_sudo
    {
        cmd.uid(u.uid).gid(u.gid);
    }
    cmd.current_dir(&worktree).env_clear().envs(spec.environment());
    // The checkout sits inside the user's working tree: an agent whose `.git` broke must get
    // "not a git repository", not the user's repository.
    if let Some(above) = worktree.parent().filter(|p| p.is_absolute()) {
        cmd.env("GIT_CEILING_DIRECTORIES", above);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // A supervisor that loses hyperloop stops everything below it (SIGTERM is its stop
    // request); an agent run directly just dies.
    set_parent_death_signal(
        &mut cmd,
        if spec.supervisor.is_some() {
            libc::SIGTERM
        } else {
            libc::SIGKILL
        },
    );

    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let detail = format!("cannot start the agent {program:?}: {e}");
            write_log(&log, format!("=== {detail}\n").as_bytes());
            return fail(detail);
        }
    };
    let pgid = child.id().and_then(|id| i32::try_from(id).ok());

    // Progress is any byte of output, counted in milliseconds since `started`.
    let activity = Arc::new(AtomicU64::new(0));
    let stream_json = Arc::new(Mutex::new(StreamJsonReader::new()));
    let stdin_task = child.stdin.take().map(|mut stdin| {
        let prompt = spec.prompt.clone().into_bytes();
        tokio::spawn(async move {
            // An agent that does not read its prompt closes the pipe; that is its business.
            let _ = stdin.write_all(&prompt).await;
            let _ = stdin.shutdown().await;
        })
    });
    let mut drains = Vec::new();
    if let Some(out) = child.stdout.take() {
        drains.push(tokio::spawn(drain(
            out,
            Arc::clone(&log),
            Arc::clone(&activity),
            started,
            Some(Arc::clone(&stream_json)),
        )));
    }
    if let Some(err) = child.stderr.take() {
        drains.push(tokio::spawn(drain(
            err,
            Arc::clone(&log),
            Arc::clone(&activity),
            started,
            None,
        )));
    }

    let ending = supervise(spec, &mut child, &activity, started, &mut cancel).await;
    let mut status = match &ending {
        Ending::Exited(st) => Some(*st),
        _ => None,
    };
    if status.is_none() {
        status = stop_leader(&mut child, pgid).await;
    }
    // Whatever the agent started must not outlive it.
    if let Some(pg) = pgid {
        stop_group(pg).await;
    }
    for d in drains {
        // A process that left the group (setsid) may still hold the pipes; do not wait on it.
        let abort = d.abort_handle();
        if tokio::time::timeout(KILL_GRACE, d).await.is_err() {
            abort.abort();
        }
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    let duration = started.elapsed();

    let exit_code = status.and_then(|s| s.code());
    let mut outcome = WorkerOutcome::error(String::new(), log_path.clone(), duration);
    outcome.exit_code = exit_code;
    outcome.pgid = pgid;
    let reported = stream_json.lock().ok().and_then(|r| r.result());
    if let Some(r) = reported {
        outcome.cost_usd = r.total_cost_usd;
        outcome.num_turns = r.num_turns;
        outcome.session_id = r.session_id;
        outcome.is_error = r.is_error;
    }

    let file = result::read(&result_path);
    let _ = result::remove_stale(&result_path);
    match ending {
        Ending::Cancelled => outcome.detail = "cancelled".into(),
        Ending::Lost(e) => outcome.detail = format!("lost track of the agent: {e}"),
        Ending::WallTimeout => {
            outcome.verdict = Verdict::Timeout;
            outcome.detail = format!(
                "the worker ran longer than worker_timeout ({} s) and was killed",
                spec.worker_timeout.as_secs()
            );
        }
        Ending::Stalled => {
            outcome.verdict = Verdict::Timeout;
            outcome.detail = format!(
                "the worker printed nothing for stall_timeout ({} s) and was killed",
                spec.stall_timeout.as_secs()
            );
        }
        Ending::Exited(st) => match file {
            ResultFile::Valid {
                verdict,
                findings,
                detail,
            } => {
                outcome.verdict = verdict;
                outcome.findings = findings;
                outcome.detail = detail;
                if !st.success() {
                    outcome
                        .detail
                        .push_str(&format!("\n(the agent then {})", describe_status(st)));
                }
            }
            ResultFile::Missing if st.success() => {
                outcome.detail = format!("the agent exited 0 without writing {RESULT_FILE}");
            }
            ResultFile::Missing => {
                outcome.detail = format!(
                    "the agent {} without writing {RESULT_FILE}; last output:\n{}",
                    describe_status(st),
                    log_tail(&log_path, log_start)
                );
            }
            ResultFile::Invalid(reason) => {
                outcome.detail = reason;
                if !st.success() {
                    outcome
                        .detail
                        .push_str(&format!(" (the agent {})", describe_status(st)));
                }
            }
        },
    }

    // A few git commands; off the async threads so that other workers' output keeps flowing.
    let settled = {
        let (wt, pre_head) = (wt.clone(), pre_head.clone());
        let (role, spec_ref, task_id) = (spec.role.clone(), spec.spec_ref.clone(), spec.task_id.clone());
        tokio::task::spawn_blocking(move || result::settle_branch(&wt, &pre_head, &role, &spec_ref, &task_id))
            .await
            .unwrap_or_else(|e| {
                Err(crate::error::Error::other(format!(
                    "settling the branch failed: {e}"
                )))
            })
    };
    // The agent's work comes into the repository only now, checked (see `worktree::import`).
    let settled = match (settled, &spec.import_into) {
        (Ok(report), Some(repo)) => {
            let (repo, dir, pre_head) = (repo.clone(), worktree.clone(), pre_head.clone());
            let (task_id, branch, detached) = (spec.task_id.clone(), spec.branch.clone(), spec.detached);
            tokio::task::spawn_blocking(move || {
                let (source, target) = if detached {
                    ("HEAD".to_string(), None)
                } else {
                    (format!("refs/heads/{branch}"), Some(branch.as_str()))
                };
                super::worktree::import(&repo, &dir, &source, &task_id, &pre_head, target).map(|_| report)
            })
            .await
            .unwrap_or_else(|e| {
                Err(crate::error::Error::other(format!(
                    "taking in the agent's work failed: {e}"
                )))
            })
        }
        (other, _) => other,
    };
    match settled {
        Ok(report) => {
            if outcome.verdict == Verdict::Pass && spec.role == "implementer" {
                if report.commits.is_empty() {
                    outcome.suspicious = Some("implementer reported pass but made no commits".into());
                } else if !report.tree_changed {
                    outcome.suspicious =
                        Some("implementer reported pass but its commits change nothing".into());
                }
            }
            outcome.commits = report.commits;
        }
        Err(e) => {
            outcome.verdict = Verdict::Error;
            outcome.detail = format!(
                "the agent's work was not taken: {e}\n(worker said: {})",
                outcome.detail
            );
        }
    }
    write_log(
        &log,
        format!(
            "=== hyperloop worker finished: verdict {} {} after {:.1} s\n",
            outcome.verdict,
            exit_code.map_or_else(
                || "(killed or never started)".to_string(),
                |c| format!("exit {c}")
            ),
            duration.as_secs_f64()
        )
        .as_bytes(),
    );
    outcome.duration = started.elapsed();
    outcome
}

/// Waits for the agent to exit, a limit to pass, or cancellation.
async fn supervise(
    spec: &WorkerSpec,
    child: &mut Child,
    activity: &AtomicU64,
    started: Instant,
    cancel: &mut watch::Receiver<bool>,
) -> Ending {
    let wall = tokio::time::Instant::from_std(started + spec.worker_timeout);
    let mut cancel_open = true;
    loop {
        let last = started + Duration::from_millis(activity.load(Ordering::Relaxed));
        let stall_at = tokio::time::Instant::from_std(last + spec.stall_timeout);
        tokio::select! {
            biased;
            st = child.wait() => {
                return match st {
                    Ok(st) => Ending::Exited(st),
                    Err(e) => Ending::Lost(e.to_string()),
                };
            }
            changed = cancel.changed(), if cancel_open => {
                match changed {
                    Ok(()) if *cancel.borrow_and_update() => return Ending::Cancelled,
                    Ok(()) => {}
                    Err(_) => cancel_open = false,
                }
            }
            _ = tokio::time::sleep_until(wall) => return Ending::WallTimeout,
            _ = tokio::time::sleep_until(stall_at) => {
                let now_last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if started + now_last + spec.stall_timeout <= Instant::now() {
                    return Ending::Stalled;
                }
            }
        }
    }
}

/// SIGTERM to the group, then SIGKILL after the grace period; returns the leader's status.
async fn stop_leader(child: &mut Child, pgid: Option<i32>) -> Option<ExitStatus> {
    match pgid {
        Some(pg) => signal_group(pg, libc::SIGTERM),
        None => {
            let _ = child.start_kill();
        }
    }
    if let Ok(Ok(st)) = tokio::time::timeout(KILL_GRACE, child.wait()).await {
        return Some(st);
    }
    match pgid {
        Some(pg) => signal_group(pg, libc::SIGKILL),
        None => {
            let _ = child.start_kill();
        }
    }
    child.wait().await.ok()
}

/// Stops what is left of the group once its leader is gone.
async fn stop_group(pgid: i32) {
    if !group_alive(pgid) {
        return;
    }
    signal_group(pgid, libc::SIGTERM);
    let deadline = Instant::now() + KILL_GRACE;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !group_alive(pgid) {
            return;
        }
    }
    signal_group(pgid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(1);
    while group_alive(pgid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal_group(pgid: i32, signal: libc::c_int) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid addresses the group we
    // created for this agent (pgid > 1 was checked, so it is never "every process").
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// True while any process of the group is still running. Zombies do not count: once killed, an
/// orphan waits for its new parent (often a container's init) to reap it.
#[cfg(target_os = "linux")]
pub fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return group_alive_by_signal(pgid);
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Some((state, pgrp)) = proc_state(pid)
            && pgrp == pgid
            && state != 'Z'
            && state != 'X'
        {
            return true;
        }
    }
    false
}

#[cfg(not(target_os = "linux"))]
pub fn group_alive(pgid: i32) -> bool {
    group_alive_by_signal(pgid)
}

fn group_alive_by_signal(pgid: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence; see signal_group.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// State letter and process group of a process, from `/proc/<pid>/stat`.
#[cfg(target_os = "linux")]
pub fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// The kernel sends the signal when the *thread* that forked the agent exits, so this relies on
/// the agent being spawned from a long-lived runtime thread (as `run_worker` is, being async),
/// never from a short-lived blocking-pool thread.
#[cfg(target_os = "linux")]
fn set_parent_death_signal(cmd: &mut Command, signal: libc::c_int) {
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    let signal = libc::c_ulong::try_from(signal).unwrap_or(libc::SIGKILL as libc::c_ulong);
    // SAFETY: the closure runs in the forked child before exec. It calls only prctl(2),
    // getppid(2) and builds an io::Error from errno — async-signal-safe, no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // hyperloop died between fork and prctl: the signal would never come.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command, _signal: i32) {}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

fn write_log(log: &Mutex<std::fs::File>, bytes: &[u8]) {
    if let Ok(mut f) = log.lock() {
        // A full disk must not kill the worker; the log is a convenience.
        let _ = f.write_all(bytes);
    }
}

/// Copies one output stream into the log, noting activity and feeding stream-json lines.
async fn drain(
    mut stream: impl AsyncRead + Unpin,
    log: Arc<Mutex<std::fs::File>>,
    activity: Arc<AtomicU64>,
    started: Instant,
    json: Option<Arc<Mutex<StreamJsonReader>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.fetch_max(ms, Ordering::Relaxed);
        let chunk = &buf[..n];
        write_log(&log, chunk);
        if let Some(json) = &json {
            for piece in chunk.split_inclusive(|b| *b == b'\n') {
                if line.len() + piece.len() <= MAX_LINE_BYTES {
                    line.extend_from_slice(piece);
                } else {
                    line.clear();
                }
                if piece.ends_with(b"\n") {
                    if let Ok(mut r) = json.lock() {
                        r.feed_line(&line);
                    }
                    line.clear();
                }
            }
        }
    }
    if let Some(json) = &json
        && !line.is_empty()
        && let Ok(mut r) = json.lock()
    {
        r.feed_line(&line);
    }
}

fn describe_status(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        (None, None) => "ended with an unknown status".to_string(),
    }
}

/// The end of what this run wrote to the log.
fn log_tail(path: &Path, from: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(LOG_TAIL_BYTES));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = f.take(LOG_TAIL_BYTES).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    // Our own header lines are not the agent's output.
    text.lines()
        .filter(|l| !l.starts_with("=== "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_is_an_allowlist_plus_the_job() {
        let spec = WorkerSpec {
            task_id: "task-001".into(),
            role: "implementer".into(),
            spec_ref: "specs/a.md".into(),
            round: 2,
            branch: "worker/task-001".into(),
            base_branch: "main".into(),
            worktree: "/repo/.hyperloop/worktrees/task-001".into(),
            log_file: "/repo/.hyperloop/logs/task-001-implementer-r2.log".into(),
            nonce: "n1".into(),
            agent_env: vec!["EXTRA".into(), "GH_TOKEN".into()],
            parent_env: Some(
                [
                    ("PATH", "/bin"),
                    ("GH_TOKEN", "x"),
                    ("EXTRA", "e"),
                    ("SHELL", "/bin/sh"),
                    ("HYPERLOOP_ROLE", "spoof"),
                ]
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
            ),
            ..WorkerSpec::default()
        };
        let env: std::collections::BTreeMap<String, String> = spec
            .environment()
            .into_iter()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(env.get("PATH").map(String::as_str), Some("/bin"));
        assert_eq!(env.get("EXTRA").map(String::as_str), Some("e"));
        assert!(!env.contains_key("GH_TOKEN"));
        assert!(!env.contains_key("SHELL"));
        assert_eq!(env.get("HYPERLOOP_ROLE").map(String::as_str), Some("implementer"));
        assert_eq!(env.get("HYPERLOOP_ROUND").map(String::as_str), Some("2"));
        assert_eq!(
            env.get("HYPERLOOP_RESULT_FILE").map(String::as_str),
            Some("/repo/.hyperloop/worktrees/task-001/.worker-result.json")
        );
        assert_eq!(
            env.get("HYPERLOOP_PROMPT_FILE").map(String::as_str),
            Some("/repo/.hyperloop/logs/task-001-implementer-r2-n1.prompt.md")
        );
        // Background maintenance off, so an agent's commits leave no git running after it.
        assert_eq!(env.get("GIT_CONFIG_COUNT").map(String::as_str), Some("2"));
        assert_eq!(
            env.get("GIT_CONFIG_KEY_0").map(String::as_str),
            Some("maintenance.auto")
        );
        assert_eq!(env.get("GIT_CONFIG_VALUE_1").map(String::as_str), Some("0"));
        assert_eq!(env.len(), 16);
    }
}
