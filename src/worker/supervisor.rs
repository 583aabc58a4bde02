//! The agent's supervisor: a small process between hyperloop and the agent whose only job is
//! that nothing the agent starts outlives it.
//!
//! A process group does not hold an agent that wants out: `setsid`, a cleared environment and a
//! double fork leave both the group and any marker hyperloop could look for. The supervisor is
//! the child subreaper of everything below it (`PR_SET_CHILD_SUBREAPER`): whatever the agent
//! orphans is re-parented to the supervisor, not to init, however it detached. When the agent
//! exits — or hyperloop asks it to stop (SIGTERM) — the supervisor kills every process left
//! below it, reaps them, and exits with the agent's status.
//!
//! It runs as `hyperloop __agent-supervisor PROGRAM ARGS…` with the agent's environment, working
//! directory and standard streams, so it holds nothing the agent does not already have. Run as
//! another user (`runtime.agent_user`), it can still stop everything below it: they share its
//! user.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The hidden command that runs a supervisor.
pub const COMMAND: &str = "__agent-supervisor";

/// This program, when it is hyperloop (a library user's own binary cannot run the supervisor).
pub fn program() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let name = exe.file_name()?.to_string_lossy().into_owned();
    (name == "hyperloop" || name.starts_with("hyperloop.")).then_some(exe)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the supervisor; returns the exit status to exit with.
pub fn main(args: &[String]) -> i32 {
    let Some((program, rest)) = args.split_first() else {
        say(&format!("hyperloop {COMMAND}: no program to run"));
        return 2;
    };
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with integer arguments; sigaction with a handler that only stores an atomic.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        // Started through sudo, no death signal survives the user switch: ask for one here, so
        // that losing the parent is a stop request.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_stop as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        // No SA_RESTART: a stop request interrupts the wait below.
        sa.sa_flags = 0;
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGHUP, &sa, std::ptr::null_mut());
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
        // SAFETY: runs in the forked child before exec; prctl and getppid only, no allocation.
        // A supervisor killed outright (SIGKILL, which it cannot handle) takes the agent along.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            say(&format!("cannot start the agent {program:?}: {e}"));
            return 127;
        }
    };
    let agent = libc::pid_t::try_from(child.id()).unwrap_or(0);
    // The Child handle is not used again: every wait goes through waitpid below.
    std::mem::forget(child);
    let mut agent_status: Option<i32> = None;
    while agent_status.is_none() {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        let mut status = 0;
        // SAFETY: waitpid with a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == agent {
            agent_status = Some(exit_code(status));
        } else if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            break;
        }
    }
    if agent_status.is_none() {
        // Asked to stop: the agent first gets the same request, briefly.
        signal_children(libc::SIGTERM);
        let until = Instant::now() + Duration::from_millis(1000);
        while Instant::now() < until && agent_status.is_none() {
            let mut status = 0;
            // SAFETY: as above.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == agent {
                agent_status = Some(exit_code(status));
            } else if pid == 0 {
                std::thread::sleep(Duration::from_millis(20));
            } else if pid < 0 {
                break;
            }
        }
    }
    let stopped = stop_everything_below();
    if stopped > 0 {
        say(&format!(
            "=== hyperloop: stopped {stopped} process(es) the agent left behind"
        ));
    }
    agent_status.unwrap_or(128 + libc::SIGTERM)
}

/// A line on standard error, which goes to the worker's log.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// The direct children of this process, from `/proc`.
fn children() -> Vec<libc::pid_t> {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(|p| p == me))
                    .unwrap_or(false)
            })
        })
        .collect()
}

fn signal_children(sig: libc::c_int) {
    for pid in children() {
        // SAFETY: kill(2) on a pid; a process gone meanwhile gives ESRCH, which is fine.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Kills every descendant and reaps it. Orphans become this process's children as their parents
/// die, so the loop runs until nothing is left to wait for. Returns how many were killed.
fn stop_everything_below() -> usize {
    let mut killed = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = children();
        for pid in &now {
            killed.insert(*pid);
            // SAFETY: as above.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        let mut status = 0;
        // SAFETY: as above.
        let reaped = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if reaped < 0 {
            // ECHILD: nothing below any more.
            return killed.len();
        }
        if reaped == 0 {
            if Instant::now() > deadline {
                return killed.len();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
