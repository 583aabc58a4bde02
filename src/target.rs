//! The repository a command works on and its configuration, as the shared flags name them; and
//! what a command gives back to the binary. Below every command, so that commands and the step
//! can take a target without reaching up into the command dispatcher.

use std::path::{Path, PathBuf};

use crate::cli::GlobalArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::state::Repo;
use crate::task::Task;

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
    pub fn ok(stdout: String) -> Outcome {
        Outcome { stdout, exit_code: 0 }
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
