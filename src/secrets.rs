//! The credentials hyperloop is given, kept where no agent can reach them.
//!
//! Agents run as the same OS user as hyperloop unless `runtime.agent_user` says otherwise, and a
//! process of the same user can read another's `/proc/<pid>/environ` and `mem` — unless that
//! process is not dumpable. So, first thing in `main`, before any thread or child exists:
//!
//! - the process makes itself non-dumpable (`PR_SET_DUMPABLE` 0): its `/proc` files become
//!   root's, and a same-user process can no longer read its environment block or memory, nor
//!   attach a debugger;
//! - the credential variables are moved out of the environment into this module, so no child
//!   (git, an agent, anything else) can inherit them by accident.
//!
//! `/proc/<pid>/environ` keeps showing the block a process started with whatever it unsets later;
//! being non-dumpable is what hides that block. Children start dumpable again (`execve`), which is
//! why none of them may ever hold a credential: forge transport with a credential happens inside
//! this process (see [`crate::transport`]).

use std::collections::HashMap;
use std::sync::OnceLock;

/// The variables hyperloop reads credentials from. Matrix tokens are named by the configuration
/// (`token_env`, `registration_token_env`) and conventionally start with `MATRIX_`.
const SEALED: &[&str] = &[
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "GH_ENTERPRISE_TOKEN",
    "GITHUB_ENTERPRISE_TOKEN",
    "HYPERLOOP_APP_PRIVATE_KEY",
    "HYPERLOOP_GITHUB_TOKEN",
];
const SEALED_PREFIXES: &[&str] = &["MATRIX_"];

static STORE: OnceLock<HashMap<String, String>> = OnceLock::new();

/// True when `name` is a credential variable hyperloop takes out of its environment.
pub fn is_sealed(name: &str) -> bool {
    SEALED.contains(&name)
        || SEALED_PREFIXES.iter().any(|p| name.starts_with(p))
        || is_action_credential(name)
}

/// An Action input that carries a credential (`INPUT_GITHUB-TOKEN`, `INPUT_APP-PRIVATE-KEY`, …):
/// a runner passes every input of a composite action's step this way as well.
fn is_action_credential(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("INPUT_") else {
        return false;
    };
    let upper = rest.to_ascii_uppercase();
    ["TOKEN", "KEY", "SECRET", "PASSWORD"]
        .iter()
        .any(|w| upper.contains(w))
}

/// Makes the process non-dumpable and moves the credential variables out of its environment.
///
/// # Safety
/// Must be called while the process has a single thread: it changes the environment, which
/// other threads could be reading.
pub unsafe fn seal_process() {
    set_not_dumpable();
    let mut kept = HashMap::new();
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            continue;
        };
        if is_sealed(k) {
            kept.insert(k.to_string(), v.to_string());
        }
    }
    for k in kept.keys() {
        // SAFETY: the caller guarantees a single thread.
        unsafe { std::env::remove_var(k) };
    }
    let _ = STORE.set(kept);
}

/// Makes this process non-dumpable (Linux): its `/proc/<pid>/environ`, `mem` and `cmdline`'s
/// neighbours become root's, and same-user processes cannot ptrace it.
pub fn set_not_dumpable() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with integer arguments only; no memory is passed to the kernel.
        unsafe {
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        }
    }
}

/// True when this process is not dumpable.
pub fn is_not_dumpable() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// A variable's value: from the sealed store for credential variables, else from the
/// environment. Blank values count as unset.
pub fn var(name: &str) -> Option<String> {
    let v = STORE
        .get()
        .and_then(|s| s.get(name).cloned())
        .or_else(|| std::env::var(name).ok())?;
    (!v.trim().is_empty()).then_some(v)
}

/// The environment as hyperloop sees it, credentials included (for code that takes a map).
pub fn vars() -> HashMap<String, String> {
    let mut all: HashMap<String, String> = std::env::vars().collect();
    if let Some(s) = STORE.get() {
        all.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    all
}

/// Every credential value this process holds, for redaction (at least 8 characters: shorter
/// values would redact ordinary words).
pub fn values() -> Vec<String> {
    STORE
        .get()
        .map(|s| {
            s.values()
                .map(|v| v.trim().to_string())
                .filter(|v| v.len() >= 8)
                .collect()
        })
        .unwrap_or_default()
}

/// Removes credentials persisted in the repository's git configuration, which every agent's
/// checkout could otherwise read through the repository's path: `actions/checkout` with its
/// default `persist-credentials: true` writes the job token as an `http.<url>.extraheader`,
/// into `.git/config` or into a file that `.git/config` includes. Such entries (and the include
/// that brings them in) are removed and reported; the forge credential hyperloop uses is its own.
/// A persisted header in the user's global or system configuration cannot be removed on their
/// behalf: that is an error (exit 2) with the way out.
pub fn scrub_repository_config(git: &crate::git::Git) -> crate::error::Result<Vec<String>> {
    use crate::error::Error;
    let out = git.output([
        "config",
        "--show-origin",
        "--show-scope",
        "--get-regexp",
        r"^http\..*\.extraheader$",
    ])?;
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut removed = Vec::new();
    for line in listed.lines() {
        // `local\tfile:.git/config\thttp.https://github.com/.extraheader AUTHORIZATION: basic …`
        let mut parts = line.splitn(3, '\t');
        let (Some(scope), Some(origin), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let key = rest.split_whitespace().next().unwrap_or_default().to_string();
        if !rest.to_ascii_lowercase().contains("authorization") {
            continue;
        }
        let file = origin.strip_prefix("file:").unwrap_or(origin).to_string();
        match scope {
            "local" | "worktree" => {
                let local = git.output(["config", "--local", "--unset-all", key.as_str()])?;
                if !local.status.success() {
                    // Brought in by an include of the local configuration: drop the include.
                    let includes =
                        git.output(["config", "--local", "--get-regexp", r"^include(if\..*)?\.path$"])?;
                    for inc in String::from_utf8_lossy(&includes.stdout).lines() {
                        if let Some((ikey, path)) = inc.split_once(' ')
                            && (path == file || file.ends_with(path) || path.ends_with(file.as_str()))
                        {
                            git.run(["config", "--local", "--unset-all", ikey])?;
                        }
                    }
                }
                removed.push(format!("{key} ({file})"));
            }
            _ => {
                return Err(Error::usage(format!(
                    "git's {scope} configuration ({file}) holds a credential in `{key}`, which every agent could read\n  hint: remove it from that file; in a workflow, give actions/checkout `persist-credentials: false`"
                )));
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forge_and_matrix_credentials_are_sealed_agent_keys_are_not() {
        for n in [
            "GITHUB_TOKEN",
            "GH_TOKEN",
            "HYPERLOOP_APP_PRIVATE_KEY",
            "MATRIX_ACCESS_TOKEN",
        ] {
            assert!(is_sealed(n), "{n}");
        }
        assert!(is_sealed("INPUT_GITHUB-TOKEN") && is_sealed("INPUT_APP-PRIVATE-KEY"));
        for n in [
            "ANTHROPIC_API_KEY",
            "PATH",
            "HYPERLOOP_APP_ID",
            "NPM_TOKEN",
            "INPUT_COMMAND",
        ] {
            assert!(!is_sealed(n), "{n}");
        }
    }
}
