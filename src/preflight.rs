//! What a step checks before it changes anything: that the agent program exists, that the
//! default Claude agent has a credential to work with, and that the base branch exists. A missing
//! program or branch is bad input (exit 2) naming the configuration key to fix; without these
//! checks the first step would fail its intake for reasons the specs have nothing to do with.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::state::Repo;

/// How to get the default agent, for messages.
pub const CLAUDE_INSTALL_HINT: &str = "install Claude Code (`npm install -g @anthropic-ai/claude-code`, \
     which needs Node.js 18 or newer) so that `claude` is on PATH, or set runtime.agent_command \
     to the agent program you use";

/// The agent program of `runtime.agent_command`, resolved the way the worker will start it:
/// a name is looked up on `PATH`, a path with a slash is taken relative to the repository (the
/// agent runs in a checkout of it).
pub fn resolve_agent(command: &[String], repo_root: &Path, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let program = command.first()?;
    if program.contains('/') {
        let candidate = repo_root.join(program);
        return is_executable(&candidate).then_some(candidate);
    }
    std::env::split_paths(path_var?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True when the agent is the Claude Code CLI (the default, or a command naming `claude`).
pub fn is_claude(command: &[String]) -> bool {
    command
        .first()
        .and_then(|p| Path::new(p).file_name())
        .is_some_and(|n| n == "claude")
}

/// Exit 2, naming `runtime.agent_command`, when the agent program cannot be found.
pub fn check_agent(config: &Config, config_file: &Path, repo_root: &Path) -> Result<()> {
    let command = &config.runtime.agent_command;
    let path_var = std::env::var_os("PATH");
    if resolve_agent(command, repo_root, path_var.as_deref()).is_some() {
        return Ok(());
    }
    let program = command.first().map_or("", String::as_str);
    let message = if program.contains('/') {
        format!(
            "the agent program `{program}` does not exist in {} or is not executable",
            repo_root.display()
        )
    } else {
        format!("the agent program `{program}` is not on PATH")
    };
    let hint = if is_claude(command) {
        CLAUDE_INSTALL_HINT.to_string()
    } else {
        format!("install `{program}` or set runtime.agent_command to a program that exists")
    };
    Err(Error::invalid(config_file, "runtime.agent_command", message).with_hint(hint))
}

/// For the Claude CLI: a reason to warn when no credential is in sight — no API key or token in
/// the environment and no login stored by the CLI. Only a warning: the CLI may keep its login
/// where this cannot see it (a keychain).
pub fn claude_credential_gap(command: &[String], env: impl Fn(&str) -> Option<String>) -> Option<String> {
    if !is_claude(command) {
        return None;
    }
    let set = |k: &str| env(k).is_some_and(|v| !v.trim().is_empty());
    let keys = [
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "CLAUDE_CODE_USE_BEDROCK",
        "CLAUDE_CODE_USE_VERTEX",
    ];
    if keys.iter().any(|k| set(k)) {
        return None;
    }
    let mut stores = Vec::new();
    if let Some(dir) = env("CLAUDE_CONFIG_DIR").filter(|d| !d.is_empty()) {
        stores.push(PathBuf::from(dir).join(".credentials.json"));
    }
    if let Some(home) = env("HOME").filter(|h| !h.is_empty()) {
        stores.push(PathBuf::from(home).join(".claude").join(".credentials.json"));
    }
    if stores.iter().any(|p| p.is_file()) {
        return None;
    }
    Some(
        "neither ANTHROPIC_API_KEY nor a Claude Code login was found; set ANTHROPIC_API_KEY or run \
         `claude` once and log in (ignore this if the CLI keeps its login elsewhere)"
            .to_string(),
    )
}

/// Exit 2, naming `target.base_branch` and the branches that exist, when the base branch is
/// missing from the repository.
pub fn check_base_branch(repo: &Repo, config: &Config, config_file: &Path) -> Result<()> {
    let base = &config.target.base_branch;
    if repo.branch_tip(base)?.is_some() {
        return Ok(());
    }
    let branches: Vec<String> = repo
        .git
        .run(["for-each-ref", "--format=%(refname:short)", "refs/heads/"])?
        .lines()
        .filter(|b| !b.starts_with("worker/"))
        .map(str::to_string)
        .collect();
    let (message, hint) = if branches.is_empty() {
        (
            format!(
                "branch `{base}` does not exist: {} has no commits yet",
                repo.root.display()
            ),
            "commit something first (for example the files `hyperloop init` wrote), then run again"
                .to_string(),
        )
    } else {
        (
            format!(
                "branch `{base}` does not exist; the branches here are: {}",
                branches.join(", ")
            ),
            "set target.base_branch to the branch hyperloop should work on".to_string(),
        )
    };
    Err(Error::invalid(config_file, "target.base_branch", message).with_hint(hint))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn claude_is_recognised_by_its_program_name() {
        assert!(is_claude(&cmd("claude -p")));
        assert!(is_claude(&cmd("/usr/local/bin/claude -p")));
        assert!(!is_claude(&cmd("my-agent --claude")));
        assert!(!is_claude(&[]));
    }

    #[test]
    fn a_key_or_a_stored_login_silences_the_warning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().display().to_string();
        let claude = cmd("claude -p");
        let with = |vars: Vec<(&'static str, String)>| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        };
        assert!(claude_credential_gap(&claude, with(vec![("HOME", home.clone())])).is_some());
        assert!(
            claude_credential_gap(
                &claude,
                with(vec![("HOME", home.clone()), ("ANTHROPIC_API_KEY", "k".into())])
            )
            .is_none()
        );
        std::fs::create_dir_all(dir.path().join(".claude")).expect("mkdir");
        std::fs::write(dir.path().join(".claude/.credentials.json"), "{}").expect("write");
        assert!(claude_credential_gap(&claude, with(vec![("HOME", home)])).is_none());
        assert!(claude_credential_gap(&cmd("other-agent"), with(vec![])).is_none());
    }

    #[test]
    fn programs_are_found_on_path_or_relative_to_the_repo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        let agent = bin.join("agent");
        std::fs::write(&agent, "#!/bin/sh\n").expect("write");
        let path = std::env::join_paths([&bin]).expect("join");
        assert_eq!(
            resolve_agent(&cmd("agent"), dir.path(), Some(&path)),
            None,
            "not executable yet"
        );
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(
            resolve_agent(&cmd("agent"), dir.path(), Some(&path)),
            Some(agent.clone())
        );
        assert_eq!(resolve_agent(&cmd("bin/agent"), dir.path(), None), Some(agent));
        assert_eq!(resolve_agent(&cmd("missing"), dir.path(), Some(&path)), None);
    }
}
