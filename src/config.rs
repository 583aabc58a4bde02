//! `.hyperloop.yaml`: every key of hyperloop 0.9.2's configuration reference plus our additions
//! (CONTRACT §2), with defaults, strict validation, and errors that name the file and dotted key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const DEFAULT_BASE_REF: &str = "github.com/jsell-rh/hyperloop//base?ref=main";
pub const DEFAULT_AGENT_COMMAND: &str =
    "claude --dangerously-skip-permissions -p --output-format stream-json --verbose";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Kustomization folder or git URL that patches the built-in agents and process.
    pub overlay: Option<String>,
    /// What an overlay's `resources` entry means by "the base" (env `HYPERLOOP_BASE_REF`).
    pub base_ref: String,
    pub target: TargetConfig,
    pub runtime: RuntimeConfig,
    pub merge: MergeConfig,
    /// Seconds `run` sleeps between steps.
    pub poll_interval: u64,
    /// Rounds a task may take before it fails.
    pub max_task_rounds: u32,
    /// Steps `run` takes before it gives up.
    pub max_cycles: u32,
    /// Merge conflicts a task may hit in a row before it loops back.
    pub max_rebase_attempts: u32,
    pub observability: ObservabilityConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetConfig {
    /// `OWNER/REPO`: GitHub mode.
    pub repo: Option<String>,
    pub base_branch: String,
    pub specs_dir: String,
    /// Branch that receives task-state commits; the base branch when unset.
    pub state_branch: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuntimeConfig {
    pub default: String,
    pub max_workers: usize,
    /// The worker program and its arguments.
    pub agent_command: Vec<String>,
    /// Wall-clock seconds a worker may run.
    pub worker_timeout: u64,
    /// Seconds a worker may print nothing.
    pub stall_timeout: u64,
    /// Extra environment variable names passed to workers.
    pub agent_env: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeStrategy {
    Squash,
    Merge,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergeConfig {
    pub auto_merge: bool,
    pub strategy: MergeStrategy,
    pub delete_branch: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Console,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObservabilityConfig {
    pub log_format: LogFormat,
    pub log_level: LogLevel,
    pub matrix: Option<MatrixConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MatrixConfig {
    pub homeserver: String,
    pub room_id: Option<String>,
    pub token_env: Option<String>,
    pub registration_token_env: Option<String>,
    pub invite_user: Option<String>,
    pub bot_username: Option<String>,
    pub verbose: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            overlay: None,
            base_ref: DEFAULT_BASE_REF.to_string(),
            target: TargetConfig {
                repo: None,
                base_branch: "main".to_string(),
                specs_dir: "specs".to_string(),
                state_branch: None,
            },
            runtime: RuntimeConfig {
                default: "local".to_string(),
                max_workers: 6,
                agent_command: DEFAULT_AGENT_COMMAND
                    .split_whitespace()
                    .map(str::to_string)
                    .collect(),
                worker_timeout: 3600,
                stall_timeout: 900,
                agent_env: Vec::new(),
            },
            merge: MergeConfig {
                auto_merge: true,
                strategy: MergeStrategy::Squash,
                delete_branch: true,
            },
            poll_interval: 30,
            max_task_rounds: 50,
            max_cycles: 200,
            max_rebase_attempts: 3,
            observability: ObservabilityConfig {
                log_format: LogFormat::Console,
                log_level: LogLevel::Info,
                matrix: None,
            },
        }
    }
}

impl Config {
    /// The branch that receives task-state commits.
    pub fn state_branch(&self) -> &str {
        self.target
            .state_branch
            .as_deref()
            .unwrap_or(&self.target.base_branch)
    }

    /// Loads `file`; a missing file means all defaults. `repo` is the target repository, against
    /// which a relative `overlay` is resolved.
    pub fn load(file: &Path, _repo: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(Error::io(file, e)),
        };
        let _ = text;
        Err(Error::NotAvailable {
            what: "configuration loading".into(),
        })
    }

    /// The overlay as a local folder, resolved against the target repo, when it is not a URL.
    pub fn overlay_dir(&self, repo: &Path) -> Option<PathBuf> {
        let o = self.overlay.as_deref()?;
        if crate::definitions::is_remote(o) {
            return None;
        }
        Some(repo.join(o))
    }
}
