//! `runtime.agent_user`: agents run as an unprivileged OS user of their own.
//!
//! Defences within one user (a non-dumpable hyperloop, credentials kept out of every child) fall
//! to a user who may `sudo`, as the `runner` user of GitHub's hosted runners may. An agent running
//! as another user without sudo cannot read hyperloop's memory or files, cannot write the
//! repository's `.git`, and cannot signal hyperloop.
//!
//! hyperloop switches to that user directly when it runs as root, and through `sudo -n` when it
//! has passwordless sudo. Everything that runs inside an agent's checkout — the agent, its
//! supervisor, and hyperloop's own git commands there — runs as the agent user, so no git of
//! hyperloop's ever reads a configuration the agent wrote. What the agent made comes back as a
//! git bundle, which hyperloop reads as data.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use crate::error::{Error, Result};
use crate::git::Git;

pub use crate::git::AgentUser;

static CURRENT: RwLock<Option<AgentUser>> = RwLock::new(None);

/// The agent user of the running step, if any.
pub fn current() -> Option<AgentUser> {
    CURRENT.read().ok().and_then(|c| c.clone())
}

/// Sets (or clears) the agent user for what follows.
pub fn set_current(user: Option<AgentUser>) {
    if let Ok(mut c) = CURRENT.write() {
        *c = user;
    }
}

/// The configured name, with `HYPERLOOP_AGENT_USER` (the Action's) taking precedence; an empty
/// variable means none.
pub fn configured(config: Option<&str>) -> Option<String> {
    match std::env::var("HYPERLOOP_AGENT_USER") {
        Ok(v) if v.trim().is_empty() => None,
        Ok(v) => Some(v.trim().to_string()),
        Err(_) => config.map(str::to_string),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn sudo_works() -> bool {
    crate::git::helper_command("sudo")
        .args(["-n", "true"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Looks the user up in the password database.
fn lookup(name: &str) -> Option<(u32, u32, PathBuf)> {
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r with buffers we own and sizes that match them.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: pw_dir points into `buf`, NUL-terminated, valid while `buf` lives.
    let home = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) }
        .to_string_lossy()
        .into_owned();
    Some((pwd.pw_uid, pwd.pw_gid, PathBuf::from(home)))
}

/// Resolves the agent user, creating it when hyperloop can. Fails with a clear message when the
/// user is missing and cannot be made, when hyperloop can switch to no other user, or when the
/// name is hyperloop's own user or root (no separation at all).
pub fn resolve(name: &str) -> Result<AgentUser> {
    let root = is_root();
    let sudo = !root && sudo_works();
    if !root && !sudo {
        return Err(Error::usage(format!(
            "runtime.agent_user is `{name}`, but hyperloop runs neither as root nor with passwordless sudo, so it cannot run agents as another user\n  hint: run hyperloop as root or give its user passwordless sudo, or unset runtime.agent_user (agents then run as hyperloop's own user)"
        )));
    }
    if lookup(name).is_none() {
        let mut cmd = if root {
            crate::git::helper_command("useradd")
        } else {
            let mut c = crate::git::helper_command("sudo");
            c.args(["-n", "useradd"]);
            c
        };
        let out = cmd
            .args([
                "--system",
                "--create-home",
                "--user-group",
                "--shell",
                "/bin/sh",
                name,
            ])
            .output()
            .map_err(|e| {
                Error::other(format!(
                    "cannot run useradd to create the agent user `{name}`: {e}"
                ))
            })?;
        if !out.status.success() && lookup(name).is_none() {
            return Err(Error::other(format!(
                "cannot create the agent user `{name}` (runtime.agent_user): {}\n  hint: create it yourself (useradd --system --create-home {name})",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    let Some((uid, gid, home)) = lookup(name) else {
        return Err(Error::other(format!("the agent user `{name}` does not exist")));
    };
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    if uid == 0 || uid == me {
        return Err(Error::usage(format!(
            "runtime.agent_user `{name}` is root or hyperloop's own user: agents would not be separated"
        )));
    }
    Ok(AgentUser {
        name: name.to_string(),
        uid,
        gid,
        home,
        via_sudo: !root,
    })
}

/// git in an agent's checkout: as the agent user when there is one, so that no git of
/// hyperloop's reads the configuration or hooks the agent wrote.
pub fn checkout_git(path: &Path) -> Git {
    let git = Git::pinned(path);
    match current() {
        Some(u) => git.as_user(u),
        None => git,
    }
}

/// Hands a checkout hyperloop just made to the agent user.
pub fn give(path: &Path) -> Result<()> {
    let Some(u) = current() else { return Ok(()) };
    if u.via_sudo {
        let owner = format!("{}:{}", u.uid, u.gid);
        let out = crate::git::helper_command("sudo")
            .args(["-n", "chown", "-R", "-h", owner.as_str()])
            .arg(path)
            .output()
            .map_err(|e| Error::io(path, e))?;
        if !out.status.success() {
            return Err(Error::other(format!(
                "cannot hand {} to the agent user: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        return Ok(());
    }
    chown_tree(path, u.uid, u.gid)
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| Error::io(path, e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let entry = entry.map_err(|e| Error::io(path, e))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Removes a directory the agent user may own (hyperloop, without root, cannot delete what is
/// inside another user's directories).
pub fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() && std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    if let Some(u) = current()
        && u.via_sudo
    {
        let out = crate::git::helper_command("sudo")
            .args(["-n", "rm", "-rf", "--"])
            .arg(path)
            .output()
            .map_err(|e| Error::io(path, e))?;
        if out.status.success() {
            return Ok(());
        }
    }
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Wraps `program args…` so that it runs as the agent user. Returns the program to start and its
/// arguments.
pub fn command_as(
    user: &AgentUser,
    program: &Path,
    args: Vec<std::ffi::OsString>,
) -> (PathBuf, Vec<std::ffi::OsString>) {
    if user.via_sudo {
        let mut all: Vec<std::ffi::OsString> = ["-n", "-E", "-u", user.name.as_str(), "--"]
            .iter()
            .map(std::ffi::OsString::from)
            .collect();
        all.push(program.as_os_str().to_owned());
        all.extend(args);
        (PathBuf::from("sudo"), all)
    } else {
        (program.to_path_buf(), args)
    }
}
