//! `.hyperloop.yaml`: every key of hyperloop 0.9.2's configuration reference plus our additions
//! (CONTRACT §2), with defaults, strict validation, and errors that name the file and dotted key.
//!
//! The file is read into a generic YAML tree first (strict YAML 1.2 booleans, duplicate keys
//! rejected) and then walked against a small schema by hand. Deserialising straight into the
//! structs would be shorter, but serde's messages cannot name the dotted key, cannot suggest the
//! key the user probably meant, and cannot tell "negative" from "not a number". 0.9.2 accepted
//! anything and failed later with a traceback (or silently did the wrong thing); here every
//! mistake stops the command before it touches the repository.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The built-in agents and process, as 0.9.2 overlays name them in their `resources`.
pub const DEFAULT_BASE_REF: &str = "github.com/jsell-rh/hyperloop//base?ref=main";
/// The worker program when `runtime.agent_command` is not set.
pub const DEFAULT_AGENT_COMMAND: &str =
    "claude --dangerously-skip-permissions -p --output-format stream-json --verbose";
/// Environment variable that supplies `base_ref` when the file does not.
pub const BASE_REF_ENV: &str = "HYPERLOOP_BASE_REF";
/// The configuration file's name inside the target repository.
pub const FILE_NAME: &str = ".hyperloop.yaml";

/// The whole configuration. Every field has a default, so a missing file is a valid configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Kustomization folder or git URL that patches the built-in agents and process. A relative
    /// folder is relative to the target repository (not the current directory); it is kept here
    /// as written, and [`Config::overlay_dir`] resolves it.
    pub overlay: Option<String>,
    /// What an overlay's `resources` entry means by "the base". Precedence: the file's
    /// `base_ref`, then the environment variable `HYPERLOOP_BASE_REF` (when non-empty), then
    /// [`DEFAULT_BASE_REF`].
    pub base_ref: String,
    pub target: TargetConfig,
    pub runtime: RuntimeConfig,
    pub merge: MergeConfig,
    /// Seconds `run` sleeps between steps (0: no pause).
    pub poll_interval: u64,
    /// Rounds a task may take before it fails (at least 1).
    pub max_task_rounds: u32,
    /// Steps `run` takes before it gives up (at least 1).
    pub max_cycles: u32,
    /// Merge conflicts a task may hit in a row before it loops back (0: loop back at once).
    pub max_rebase_attempts: u32,
    pub observability: ObservabilityConfig,
}

/// `target`: the repository hyperloop works on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetConfig {
    /// `OWNER/REPO`: GitHub mode (pull requests, labels, merges through the API). Unset: local
    /// mode. `--repo` on the command line takes precedence.
    pub repo: Option<String>,
    /// The trunk branch that finished work is merged into.
    pub base_branch: String,
    /// Folder of the specs, relative to the repository; tasks live in its `tasks/` subfolder.
    pub specs_dir: String,
    /// Branch that receives task-state commits; the base branch when unset. Use it when the base
    /// branch is protected against direct pushes.
    pub state_branch: Option<String>,
}

/// `runtime`: how workers are run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuntimeConfig {
    /// Where workers run; `local` is the only runtime.
    pub default: String,
    /// Workers running at the same time (at least 1).
    pub max_workers: usize,
    /// The worker program and its arguments. In the file, a string (split like a shell would) or
    /// a list of strings.
    pub agent_command: Vec<String>,
    /// Wall-clock seconds a worker may run before its process group is killed and its verdict is
    /// `timeout` (at least 1).
    pub worker_timeout: u64,
    /// Seconds a worker may print nothing before it is treated as timed out (at least 1).
    pub stall_timeout: u64,
    /// Seconds after which a work item claimed by `plan` whose output was never recorded may be
    /// claimed again. Unset: [`RuntimeConfig::lease_timeout`] derives it from `worker_timeout`.
    pub lease_timeout: Option<u64>,
    /// Names of extra environment variables passed through to workers. Forge credentials and
    /// hyperloop's own `HYPERLOOP_*` variables are refused: workers never receive them.
    pub agent_env: Vec<String>,
    /// Agent spend (USD, as the agents report it) after which a task gets no more workers and
    /// fails with `budget_exceeded`. Unset: no limit.
    pub max_task_cost_usd: Option<f64>,
    /// Total agent spend over all tasks after which no worker starts at all. Unset: no limit.
    pub max_total_cost_usd: Option<f64>,
    /// The unprivileged OS user agents run as (created when hyperloop can: as root or with
    /// passwordless sudo). Unset: agents run as hyperloop's own user. The environment variable
    /// `HYPERLOOP_AGENT_USER` overrides it (the Action sets it).
    pub agent_user: Option<String>,
}

/// `merge.strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeStrategy {
    Squash,
    Merge,
}

impl MergeStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            MergeStrategy::Squash => "squash",
            MergeStrategy::Merge => "merge",
        }
    }
}

/// `merge.checks`: which of the pull request's checks (commit statuses and check runs) must
/// pass before `merge-pr` merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChecksPolicy {
    /// What branch protection requires of the base branch; every check when it has none.
    Required,
    /// Every check reported on the head commit.
    All,
    /// Merge without looking at checks.
    None,
}

impl ChecksPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksPolicy::Required => "required",
            ChecksPolicy::All => "all",
            ChecksPolicy::None => "none",
        }
    }
}

/// `merge`: what happens when a task's pipeline reaches `merge-pr`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MergeConfig {
    /// Merge when the pipeline reaches `merge-pr`; when false the task waits there.
    pub auto_merge: bool,
    /// `squash` (one commit per task) or `merge` (a merge commit).
    pub strategy: MergeStrategy,
    /// Delete the worker branch after its merge.
    pub delete_branch: bool,
    /// GitHub mode: the checks that must pass before a merge.
    pub checks: ChecksPolicy,
    /// Seconds a merge waits for pending checks before the task fails.
    pub checks_timeout: u64,
    /// Local mode: a command run in the task's checkout after the verifier passes; a failure
    /// sends the task back with its output. Unset: none.
    pub local_checks: Option<String>,
}

/// `observability.log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Console,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Console => "console",
            LogFormat::Json => "json",
        }
    }
}

/// `observability.log_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
        }
    }
}

/// `observability`: events on standard error, and optional Matrix notifications.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObservabilityConfig {
    /// `console` (human-readable) or `json` (one object per line, for log aggregators).
    pub log_format: LogFormat,
    /// `debug`, `info`, `warning` or `error`.
    pub log_level: LogLevel,
    /// Matrix notifications; absent: none are sent.
    pub matrix: Option<MatrixConfig>,
}

/// `observability.matrix`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MatrixConfig {
    /// `https://` URL of the Matrix homeserver (required in the section).
    pub homeserver: String,
    /// Room to post in; unset: a room is created and remembered in `.hyperloop/matrix-state.json`.
    pub room_id: Option<String>,
    /// Name of the environment variable holding an access token of an existing bot account.
    pub token_env: Option<String>,
    /// Name of the environment variable holding a registration token: the bot registers itself.
    pub registration_token_env: Option<String>,
    /// Matrix user invited to a room hyperloop creates (`@user:server`).
    pub invite_user: Option<String>,
    /// Local part of the bot's user name; unset: `hyperloop-<repo name>`.
    pub bot_username: Option<String>,
    /// Also send worker spawns, cycle completions and intake runs.
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
                lease_timeout: None,
                agent_env: Vec::new(),
                agent_user: None,
                max_task_cost_usd: None,
                max_total_cost_usd: None,
            },
            merge: MergeConfig {
                auto_merge: true,
                strategy: MergeStrategy::Squash,
                delete_branch: true,
                checks: ChecksPolicy::Required,
                checks_timeout: 3600,
                local_checks: None,
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
    /// which a relative `overlay` is resolved by [`Config::overlay_dir`]. `base_ref` falls back to
    /// the environment variable `HYPERLOOP_BASE_REF` (see [`Config::load_with_env`]).
    pub fn load(file: &Path, repo: &Path) -> Result<Config> {
        let env = std::env::var(BASE_REF_ENV).ok();
        Config::load_with_env(file, repo, env.as_deref())
    }

    /// [`Config::load`] with the value of `HYPERLOOP_BASE_REF` passed in rather than read from
    /// the process environment. Precedence for `base_ref`: the file, then `base_ref_env` (when
    /// non-empty), then [`DEFAULT_BASE_REF`].
    pub fn load_with_env(file: &Path, _repo: &Path, base_ref_env: Option<&str>) -> Result<Config> {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(Error::invalid(file, "document", "is not UTF-8 text"));
            }
            Err(e) => return Err(Error::io(file, e)),
        };
        Config::parse(file, text.as_deref().unwrap_or(""), base_ref_env)
    }

    /// Reads configuration text; `file` is only used to name it in errors. Empty text (or text
    /// with only comments) means all defaults.
    pub fn parse(file: &Path, text: &str, base_ref_env: Option<&str>) -> Result<Config> {
        let mut config = Config::default();
        if let Some(env) = base_ref_env.map(str::trim).filter(|v| !v.is_empty()) {
            config.base_ref = env.to_string();
        }
        let has_content = text.lines().any(|l| {
            let l = l.trim();
            !l.is_empty() && !l.starts_with('#') && l != "---" && l != "..."
        });
        if !has_content {
            return Ok(config);
        }
        let tree: Value = crate::yaml::parse(file, text)?;
        Walker { file }.apply(&tree, &mut config)?;
        Ok(config)
    }

    /// The overlay as a local folder, resolved against the target repo, when it is not a URL.
    pub fn overlay_dir(&self, repo: &Path) -> Option<PathBuf> {
        let o = self.overlay.as_deref()?;
        if is_remote(o) {
            return None;
        }
        // `join` keeps an absolute overlay as it is and puts a relative one under the repo, which
        // is what 0.9.2 got wrong (it resolved against the process's current directory).
        Some(repo.join(o))
    }

    /// The resolved configuration as YAML, one key per line, for `--dry-run`. Unset optional keys
    /// appear as comments. Loading the output gives back an equal configuration.
    pub fn render(&self) -> String {
        self.render_with(false)
    }

    /// Like [`Config::render`], with a one-line explanation above every key and commented-out
    /// examples of the optional keys: a configuration file for people to read and edit. A
    /// `base_ref` equal to the default is left commented out so `HYPERLOOP_BASE_REF` still
    /// applies to the written file.
    pub fn render_commented(&self) -> String {
        self.render_with(true)
    }

    fn render_with(&self, commented: bool) -> String {
        let mut r = Renderer {
            out: String::new(),
            commented,
        };
        if commented {
            r.raw("# hyperloop configuration. Every key is optional; a key left out takes its default.");
            r.raw("");
        }
        r.opt(
            0,
            "overlay",
            self.overlay.as_deref(),
            ".hyperloop/agents",
            "Kustomization folder (relative to this repo) or git URL patching the built-in agents.",
        );
        if commented && self.base_ref == DEFAULT_BASE_REF {
            r.opt(
                0,
                "base_ref",
                None,
                DEFAULT_BASE_REF,
                "What an overlay's `resources` entry means by the base (default: env HYPERLOOP_BASE_REF, else this).",
            );
        } else {
            r.key(
                0,
                "base_ref",
                &scalar(&self.base_ref),
                "What an overlay's `resources` entry means by the built-in base.",
            );
        }
        r.section(0, "target", "The repository hyperloop works on.");
        r.opt(
            1,
            "repo",
            self.target.repo.as_deref(),
            "OWNER/REPO",
            "GitHub repository: pull requests and merges through GitHub. Unset: local mode.",
        );
        r.key(
            1,
            "base_branch",
            &scalar(&self.target.base_branch),
            "Trunk branch that finished work is merged into.",
        );
        r.key(
            1,
            "specs_dir",
            &scalar(&self.target.specs_dir),
            "Folder of the specs; task files live in its tasks/ subfolder.",
        );
        r.opt(
            1,
            "state_branch",
            self.target.state_branch.as_deref(),
            "hyperloop-state",
            "Branch that receives task-state commits (default: the base branch).",
        );
        r.section(0, "runtime", "How workers run.");
        r.key(
            1,
            "default",
            &scalar(&self.runtime.default),
            "Where workers run: local (the only runtime).",
        );
        r.key(
            1,
            "max_workers",
            &self.runtime.max_workers.to_string(),
            "Workers running at the same time.",
        );
        r.key(
            1,
            "agent_command",
            &scalar(&shell_words::join(&self.runtime.agent_command)),
            "The worker program: a string split like a shell would, or a list.",
        );
        r.key(
            1,
            "worker_timeout",
            &self.runtime.worker_timeout.to_string(),
            "Seconds a worker may run before it is killed (verdict: timeout).",
        );
        r.key(
            1,
            "stall_timeout",
            &self.runtime.stall_timeout.to_string(),
            "Seconds a worker may print nothing before it is killed (verdict: timeout).",
        );
        r.key(
            1,
            "lease_timeout",
            &self
                .runtime
                .lease_timeout
                .map_or_else(|| "null".to_string(), |n| n.to_string()),
            "Seconds after which a claimed work item never recorded may be claimed again; null: worker_timeout + 600.",
        );
        let env_list = format!(
            "[{}]",
            self.runtime
                .agent_env
                .iter()
                .map(|n| scalar(n))
                .collect::<Vec<_>>()
                .join(", ")
        );
        r.key(
            1,
            "agent_env",
            &env_list,
            "Names of extra environment variables passed through to workers.",
        );
        r.key(
            1,
            "agent_user",
            &self
                .runtime
                .agent_user
                .as_deref()
                .map_or_else(|| "null".to_string(), scalar),
            "The OS user agents run as; null: hyperloop's own user.",
        );
        let dollars = |v: Option<f64>| v.map_or_else(|| "null".to_string(), |x| format!("{x}"));
        r.key(
            1,
            "max_task_cost_usd",
            &dollars(self.runtime.max_task_cost_usd),
            "Agent spend (USD) after which a task stops and fails; null: no limit.",
        );
        r.key(
            1,
            "max_total_cost_usd",
            &dollars(self.runtime.max_total_cost_usd),
            "Total agent spend (USD) after which no worker starts; null: no limit.",
        );
        r.section(0, "merge", "What happens when a task reaches merge-pr.");
        r.key(
            1,
            "auto_merge",
            bool_str(self.merge.auto_merge),
            "Merge when the pipeline reaches merge-pr; false: the task waits there.",
        );
        r.key(
            1,
            "strategy",
            self.merge.strategy.as_str(),
            "How merge-pr merges: squash (one commit per task) | merge (a merge commit).",
        );
        r.key(
            1,
            "delete_branch",
            bool_str(self.merge.delete_branch),
            "Delete the worker branch after its merge.",
        );
        r.key(
            1,
            "checks",
            self.merge.checks.as_str(),
            "GitHub: checks that must pass before a merge: required | all | none.",
        );
        r.key(
            1,
            "checks_timeout",
            &self.merge.checks_timeout.to_string(),
            "Seconds a merge waits for pending checks before the task fails.",
        );
        r.key(
            1,
            "local_checks",
            self.merge.local_checks.as_deref().unwrap_or("null"),
            "Local mode: a command run in the task's checkout before its merge; null: none.",
        );
        r.blank();
        r.key(
            0,
            "poll_interval",
            &self.poll_interval.to_string(),
            "Seconds `run` waits between steps.",
        );
        r.key(
            0,
            "max_task_rounds",
            &self.max_task_rounds.to_string(),
            "Rounds a task may take before it fails.",
        );
        r.key(
            0,
            "max_cycles",
            &self.max_cycles.to_string(),
            "Steps `run` takes before it gives up.",
        );
        r.key(
            0,
            "max_rebase_attempts",
            &self.max_rebase_attempts.to_string(),
            "Merge conflicts a task may hit in a row before it loops back.",
        );
        r.section(
            0,
            "observability",
            "Events on standard error, and Matrix notifications.",
        );
        r.key(
            1,
            "log_format",
            self.observability.log_format.as_str(),
            "console (human-readable) | json (one object per line)",
        );
        r.key(
            1,
            "log_level",
            self.observability.log_level.as_str(),
            "debug | info | warning | error",
        );
        match &self.observability.matrix {
            Some(m) => {
                r.section(1, "matrix", "Matrix notifications, threaded per task.");
                r.key(2, "homeserver", &scalar(&m.homeserver), "URL of the homeserver.");
                r.opt(
                    2,
                    "room_id",
                    m.room_id.as_deref(),
                    "!abc123:example.com",
                    "Room to post in (default: one created for you).",
                );
                r.opt(
                    2,
                    "token_env",
                    m.token_env.as_deref(),
                    "MATRIX_ACCESS_TOKEN",
                    "Env var holding the bot's access token.",
                );
                r.opt(
                    2,
                    "registration_token_env",
                    m.registration_token_env.as_deref(),
                    "MATRIX_REGISTRATION_TOKEN",
                    "Env var holding a registration token: the bot registers itself.",
                );
                r.opt(
                    2,
                    "invite_user",
                    m.invite_user.as_deref(),
                    "@you:example.com",
                    "User invited to a room hyperloop creates.",
                );
                r.opt(
                    2,
                    "bot_username",
                    m.bot_username.as_deref(),
                    "hyperloop-bot",
                    "The bot's user name (default: hyperloop-<repo name>).",
                );
                r.key(
                    2,
                    "verbose",
                    bool_str(m.verbose),
                    "Also send worker spawns, cycle completions and intake runs.",
                );
            }
            None if commented => {
                r.raw("  # Matrix notifications, threaded per task; leave out to send none.");
                r.raw("  # matrix:");
                r.raw("  #   homeserver: https://matrix.example.com");
                r.raw("  #   registration_token_env: MATRIX_REGISTRATION_TOKEN");
                r.raw("  #   # room_id: \"!abc123:example.com\"");
                r.raw("  #   # token_env: MATRIX_ACCESS_TOKEN");
                r.raw("  #   # invite_user: \"@you:example.com\"");
                r.raw("  #   # bot_username: hyperloop-bot");
                r.raw("  #   verbose: false");
            }
            None => r.raw("  # matrix: not set (no notifications)"),
        }
        r.out
    }
}

struct Renderer {
    out: String,
    commented: bool,
}

impl Renderer {
    fn raw(&mut self, line: &str) {
        self.out.push_str(line);
        self.out.push('\n');
    }

    fn blank(&mut self) {
        if self.commented {
            self.out.push('\n');
        }
    }

    fn doc(&mut self, depth: usize, doc: &str) {
        if self.commented {
            let _ = writeln!(self.out, "{}# {doc}", "  ".repeat(depth));
        }
    }

    fn section(&mut self, depth: usize, name: &str, doc: &str) {
        if depth == 0 {
            self.blank();
        }
        self.doc(depth, doc);
        let _ = writeln!(self.out, "{}{name}:", "  ".repeat(depth));
    }

    fn key(&mut self, depth: usize, name: &str, value: &str, doc: &str) {
        self.doc(depth, doc);
        let _ = writeln!(self.out, "{}{name}: {value}", "  ".repeat(depth));
    }

    /// An optional key: its value when set, else a commented-out example.
    fn opt(&mut self, depth: usize, name: &str, value: Option<&str>, example: &str, doc: &str) {
        self.doc(depth, doc);
        let indent = "  ".repeat(depth);
        match value {
            Some(v) => {
                let _ = writeln!(self.out, "{indent}{name}: {}", scalar(v));
            }
            None if self.commented => {
                let _ = writeln!(self.out, "{indent}# {name}: {}", scalar(example));
            }
            None => {
                let _ = writeln!(self.out, "{indent}# {name}: not set");
            }
        }
    }
}

fn bool_str(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// A string as a YAML scalar: plain when that cannot be misread (as a number, boolean, null,
/// comment, tag, alias, ...), else double-quoted. JSON string syntax is valid YAML.
fn scalar(s: &str) -> String {
    let safe_char = |c: char| c.is_ascii_alphanumeric() || "._/-+@:?=~%,".contains(c);
    let plain = !s.is_empty()
        && s.chars().all(safe_char)
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '.' || c == '_' || c == '/')
        && !s.ends_with(':')
        && !s.contains(",")
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n" | ".inf" | ".nan"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

// ---------------------------------------------------------------------------------------------
// The schema walk.

const TOP_KEYS: &[&str] = &[
    "overlay",
    "base_ref",
    "target",
    "runtime",
    "merge",
    "poll_interval",
    "max_task_rounds",
    "max_cycles",
    "max_rebase_attempts",
    "observability",
];
const TARGET_KEYS: &[&str] = &["repo", "base_branch", "specs_dir", "state_branch"];
const RUNTIME_KEYS: &[&str] = &[
    "default",
    "max_workers",
    "agent_command",
    "worker_timeout",
    "stall_timeout",
    "lease_timeout",
    "agent_env",
    "max_task_cost_usd",
    "max_total_cost_usd",
    "agent_user",
];
const MERGE_KEYS: &[&str] = &[
    "auto_merge",
    "strategy",
    "delete_branch",
    "checks",
    "checks_timeout",
    "local_checks",
];
const OBSERVABILITY_KEYS: &[&str] = &["log_format", "log_level", "matrix"];
const MATRIX_KEYS: &[&str] = &[
    "homeserver",
    "room_id",
    "token_env",
    "registration_token_env",
    "invite_user",
    "bot_username",
    "verbose",
];

/// Every section with its keys, for suggestions that point into another section.
const SECTIONS: &[(&str, &[&str])] = &[
    ("", TOP_KEYS),
    ("target", TARGET_KEYS),
    ("runtime", RUNTIME_KEYS),
    ("merge", MERGE_KEYS),
    ("observability", OBSERVABILITY_KEYS),
    ("observability.matrix", MATRIX_KEYS),
];

/// Variables that carry forge or hyperloop credentials; CONTRACT §4 keeps them from workers, so
/// asking to pass them through is a configuration error rather than something silently dropped.
const FORBIDDEN_AGENT_ENV: &[&str] = &["GITHUB_TOKEN", "GH_TOKEN"];

/// A portable POSIX user name, as `useradd` takes it.
pub fn is_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// The longest worker or stall limit: a week. Larger values are typos (milliseconds for
/// seconds), and durations beyond what a clock can add would fail only after a worker started.
pub const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;

/// What a lease adds to `worker_timeout` by default: a `work` job also clones, fetches, and
/// uploads its output before `record` can see it.
pub const LEASE_MARGIN_S: u64 = 600;

impl RuntimeConfig {
    /// `runtime.lease_timeout`, or `worker_timeout` plus [`LEASE_MARGIN_S`].
    pub fn lease_timeout(&self) -> u64 {
        self.lease_timeout
            .unwrap_or_else(|| self.worker_timeout.saturating_add(LEASE_MARGIN_S))
    }
}

struct Walker<'a> {
    file: &'a Path,
}

/// One mapping of the file, with its dotted prefix.
struct Section<'v> {
    prefix: String,
    map: Option<&'v Map<String, Value>>,
}

fn dotted(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// How a value reads in a message: what was found instead of what was expected.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "a mapping".to_string(),
    }
}

impl<'v> Section<'v> {
    fn get(&self, name: &str) -> Option<&'v Value> {
        self.map.and_then(|m| m.get(name))
    }

    fn key(&self, name: &str) -> String {
        dotted(&self.prefix, name)
    }
}

impl Walker<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> Error {
        Error::invalid(self.file, key, message)
    }

    /// A mapping (or null/absent: an empty section) whose keys must all be in `known`.
    fn section<'v>(&self, value: Option<&'v Value>, prefix: &str, known: &[&str]) -> Result<Section<'v>> {
        let map = match value {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(other) => {
                let location = if prefix.is_empty() { "document" } else { prefix };
                return Err(self.err(
                    location,
                    format!("expected a mapping of keys, found {}", describe(other)),
                ));
            }
        };
        if let Some(m) = map {
            for k in m.keys() {
                if !known.contains(&k.as_str()) {
                    let mut e = self.err(&dotted(prefix, k), "unknown key");
                    e = e.with_hint(
                        suggest(prefix, k, known)
                            .unwrap_or_else(|| format!("the keys here are: {}", known.join(", "))),
                    );
                    return Err(e);
                }
            }
        }
        Ok(Section {
            prefix: prefix.to_string(),
            map,
        })
    }

    /// A whole number in `min..=max`, or `None` when absent.
    fn number(&self, s: &Section<'_>, name: &str, min: u64, max: u64) -> Result<Option<u64>> {
        let Some(v) = s.get(name) else {
            return Ok(None);
        };
        let key = s.key(name);
        let n = match v {
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    u
                } else if n.as_i64().is_some() {
                    return Err(self.err(&key, format!("must not be negative, found {n}")));
                } else {
                    return Err(self.err(&key, format!("expected a whole number, found {n}")));
                }
            }
            other => {
                return Err(self.err(
                    &key,
                    format!("expected a whole number, found {}", describe(other)),
                ));
            }
        };
        if n < min {
            let what = if min == 1 {
                "must be at least 1".to_string()
            } else {
                format!("must be at least {min}")
            };
            return Err(self.err(&key, format!("{what}, found {n}")));
        }
        if n > max {
            return Err(self.err(&key, format!("must be at most {max}, found {n}")));
        }
        Ok(Some(n))
    }

    fn boolean(&self, s: &Section<'_>, name: &str) -> Result<Option<bool>> {
        match s.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other @ Value::String(_)) => Err(self
                .err(
                    &s.key(name),
                    format!("expected true or false, found {}", describe(other)),
                )
                .with_hint("only true and false are booleans (YAML 1.2); yes, no, on and off are text")),
            Some(other) => Err(self.err(
                &s.key(name),
                format!("expected true or false, found {}", describe(other)),
            )),
        }
    }

    /// A non-empty string; `None` when absent. With `nullable`, null also means absent.
    fn string(&self, s: &Section<'_>, name: &str, nullable: bool) -> Result<Option<String>> {
        let key = s.key(name);
        match s.get(name) {
            None => Ok(None),
            Some(Value::Null) if nullable => Ok(None),
            Some(Value::String(v)) if v.trim().is_empty() => Err(self.err(&key, "must not be empty")),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(other @ (Value::Number(_) | Value::Bool(_))) => Err(self
                .err(&key, format!("expected a string, found {}", describe(other)))
                .with_hint("put the value in quotes")),
            Some(other) => Err(self.err(&key, format!("expected a string, found {}", describe(other)))),
        }
    }

    /// One of `choices` (compared without regard to case, as 0.9.2 upper-cased log levels).
    fn choice(&self, s: &Section<'_>, name: &str, choices: &[&'static str]) -> Result<Option<&'static str>> {
        let Some(v) = self.string(s, name, false)? else {
            return Ok(None);
        };
        if let Some(c) = choices.iter().find(|c| c.eq_ignore_ascii_case(v.trim())) {
            return Ok(Some(c));
        }
        let mut e = self.err(
            &s.key(name),
            format!("must be one of {}, found {v:?}", choices.join(" | ")),
        );
        if let Some(close) = closest(&v.to_ascii_lowercase(), choices) {
            e = e.with_hint(format!("did you mean `{close}`?"));
        }
        Err(e)
    }

    fn env_name(&self, key: &str, name: &str) -> Result<()> {
        if is_env_name(name) {
            Ok(())
        } else {
            Err(self
                .err(key, format!("{name:?} is not an environment variable name"))
                .with_hint("write the variable's NAME (letters, digits, _), not its value"))
        }
    }

    fn apply(&self, tree: &Value, c: &mut Config) -> Result<()> {
        let top = self.section(Some(tree), "", TOP_KEYS)?;

        if let Some(o) = self.string(&top, "overlay", true)? {
            c.overlay = Some(o);
        }
        if let Some(b) = self.string(&top, "base_ref", false)? {
            c.base_ref = b;
        }
        if let Some(n) = self.number(&top, "poll_interval", 0, u64::MAX)? {
            c.poll_interval = n;
        }
        for (name, slot, min) in [
            ("max_task_rounds", &mut c.max_task_rounds, 1),
            ("max_cycles", &mut c.max_cycles, 1),
            ("max_rebase_attempts", &mut c.max_rebase_attempts, 0),
        ] {
            if let Some(n) = self.number(&top, name, min, u64::from(u32::MAX))? {
                // The range check above makes the conversion infallible.
                *slot = u32::try_from(n).unwrap_or(u32::MAX);
            }
        }

        self.target(&top, &mut c.target)?;
        self.runtime(&top, &mut c.runtime)?;
        self.merge(&top, &mut c.merge)?;
        self.observability(&top, &mut c.observability)?;

        let matrix_secrets: Vec<&str> = c
            .observability
            .matrix
            .iter()
            .flat_map(|m| [m.token_env.as_deref(), m.registration_token_env.as_deref()])
            .flatten()
            .collect();
        for (i, name) in c.runtime.agent_env.iter().enumerate() {
            if matrix_secrets.contains(&name.as_str()) {
                return Err(self.err(
                    &format!("runtime.agent_env[{i}]"),
                    format!("{name} holds the Matrix credential; workers never receive it"),
                ));
            }
        }
        Ok(())
    }

    fn target(&self, top: &Section<'_>, t: &mut TargetConfig) -> Result<()> {
        let s = self.section(top.get("target"), "target", TARGET_KEYS)?;
        if let Some(repo) = self.string(&s, "repo", true)? {
            if let Err(why) = check_owner_repo(&repo) {
                return Err(self
                    .err(&s.key("repo"), format!("{repo:?} is not OWNER/REPO: {why}"))
                    .with_hint("for example `acme/widgets`"));
            }
            t.repo = Some(repo);
        }
        if let Some(b) = self.string(&s, "base_branch", false)? {
            self.branch(&s.key("base_branch"), &b)?;
            t.base_branch = b;
        }
        if let Some(d) = self.string(&s, "specs_dir", false)? {
            let p = Path::new(&d);
            if p.is_absolute()
                || p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(self.err(
                    &s.key("specs_dir"),
                    format!("{d:?} must be a folder inside the repository (a relative path without ..)"),
                ));
            }
            t.specs_dir = d;
        }
        if let Some(b) = self.string(&s, "state_branch", true)? {
            self.branch(&s.key("state_branch"), &b)?;
            t.state_branch = Some(b);
        }
        Ok(())
    }

    fn branch(&self, key: &str, name: &str) -> Result<()> {
        check_branch_name(name)
            .map_err(|why| self.err(key, format!("{name:?} is not a valid git branch name: {why}")))
    }

    fn runtime(&self, top: &Section<'_>, r: &mut RuntimeConfig) -> Result<()> {
        let s = self.section(top.get("runtime"), "runtime", RUNTIME_KEYS)?;
        if let Some(d) = self.string(&s, "default", false)? {
            if d != "local" {
                let e = self.err(&s.key("default"), format!("must be one of local, found {d:?}"));
                return Err(if d == "ambient" {
                    e.with_hint("the ambient runtime is planned, not available; use local")
                } else {
                    e
                });
            }
            r.default = d;
        }
        if let Some(n) = self.number(&s, "max_workers", 1, u64::from(u32::MAX))? {
            r.max_workers = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(n) = self.number(&s, "worker_timeout", 1, MAX_TIMEOUT_S)? {
            r.worker_timeout = n;
        }
        if let Some(n) = self.number(&s, "stall_timeout", 1, MAX_TIMEOUT_S)? {
            r.stall_timeout = n;
        }
        // `null` (what `render` writes for the default) means the default.
        if !matches!(s.get("lease_timeout"), Some(Value::Null))
            && let Some(n) = self.number(&s, "lease_timeout", 1, MAX_TIMEOUT_S + LEASE_MARGIN_S)?
        {
            r.lease_timeout = Some(n);
        }
        if let Some(v) = s.get("agent_command") {
            r.agent_command = self.agent_command(&s.key("agent_command"), v)?;
        }
        if let Some(v) = s.get("agent_env") {
            r.agent_env = self.agent_env(&s.key("agent_env"), v)?;
        }
        r.max_task_cost_usd = self.dollars(&s, "max_task_cost_usd")?;
        r.max_total_cost_usd = self.dollars(&s, "max_total_cost_usd")?;
        if let Some(name) = self.string(&s, "agent_user", true)? {
            if !is_user_name(&name) {
                return Err(self.err(
                    &s.key("agent_user"),
                    format!("`{}` is not a user name (lowercase letters, digits, '_' and '-', starting with a letter or '_')", name.escape_debug()),
                ));
            }
            r.agent_user = Some(name);
        }
        Ok(())
    }

    /// A positive amount of money; `None` when absent or null.
    fn dollars(&self, s: &Section<'_>, name: &str) -> Result<Option<f64>> {
        match s.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
                _ => Err(self.err(
                    &s.key(name),
                    format!("must be a positive amount in USD, found {n}"),
                )),
            },
            Some(other) => Err(self.err(
                &s.key(name),
                format!("expected an amount in USD, found {}", describe(other)),
            )),
        }
    }

    fn agent_command(&self, key: &str, v: &Value) -> Result<Vec<String>> {
        let words = match v {
            Value::String(text) => shell_words::split(text)
                .map_err(|e| self.err(key, format!("cannot be split like a shell would: {e}")))?,
            Value::Array(items) => {
                let mut words = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(w) => words.push(w.clone()),
                        other => {
                            return Err(self.err(
                                &format!("{key}[{i}]"),
                                format!("expected a string, found {}", describe(other)),
                            ));
                        }
                    }
                }
                words
            }
            other => {
                return Err(self.err(
                    key,
                    format!(
                        "expected a command (a string or a list of strings), found {}",
                        describe(other)
                    ),
                ));
            }
        };
        match words.first() {
            None => Err(self.err(key, "must name a program, found an empty command")),
            Some(program) if program.trim().is_empty() => {
                Err(self.err(key, "the program name must not be empty"))
            }
            Some(_) => Ok(words),
        }
    }

    fn agent_env(&self, key: &str, v: &Value) -> Result<Vec<String>> {
        let items = match v {
            Value::Null => return Ok(Vec::new()),
            Value::Array(items) => items,
            other => {
                return Err(self
                    .err(
                        key,
                        format!(
                            "expected a list of environment variable names, found {}",
                            describe(other)
                        ),
                    )
                    .with_hint("for example `agent_env: [NPM_TOKEN, DATABASE_URL]`"));
            }
        };
        let mut names: Vec<String> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let k = format!("{key}[{i}]");
            let Value::String(name) = item else {
                return Err(self.err(
                    &k,
                    format!("expected an environment variable name, found {}", describe(item)),
                ));
            };
            self.env_name(&k, name)?;
            if FORBIDDEN_AGENT_ENV.contains(&name.as_str()) {
                return Err(self.err(
                    &k,
                    format!("{name} is a forge credential; workers never receive it"),
                ));
            }
            if name.starts_with("HYPERLOOP_") {
                return Err(self.err(
                    &k,
                    format!("{name} is one of hyperloop's own variables; workers never receive it"),
                ));
            }
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        Ok(names)
    }

    fn merge(&self, top: &Section<'_>, m: &mut MergeConfig) -> Result<()> {
        let s = self.section(top.get("merge"), "merge", MERGE_KEYS)?;
        if let Some(b) = self.boolean(&s, "auto_merge")? {
            m.auto_merge = b;
        }
        if let Some(b) = self.boolean(&s, "delete_branch")? {
            m.delete_branch = b;
        }
        if let Some(v) = self.choice(&s, "strategy", &["squash", "merge"])? {
            m.strategy = if v == "merge" {
                MergeStrategy::Merge
            } else {
                MergeStrategy::Squash
            };
        }
        if let Some(v) = self.choice(&s, "checks", &["required", "all", "none"])? {
            m.checks = match v {
                "all" => ChecksPolicy::All,
                "none" => ChecksPolicy::None,
                _ => ChecksPolicy::Required,
            };
        }
        if let Some(n) = self.number(&s, "checks_timeout", 1, u64::MAX)? {
            m.checks_timeout = n;
        }
        m.local_checks = self.string(&s, "local_checks", true)?;
        Ok(())
    }

    fn observability(&self, top: &Section<'_>, o: &mut ObservabilityConfig) -> Result<()> {
        let s = self.section(top.get("observability"), "observability", OBSERVABILITY_KEYS)?;
        if let Some(v) = self.choice(&s, "log_format", &["console", "json"])? {
            o.log_format = if v == "json" {
                LogFormat::Json
            } else {
                LogFormat::Console
            };
        }
        if let Some(v) = self.choice(&s, "log_level", &["debug", "info", "warning", "error"])? {
            o.log_level = match v {
                "debug" => LogLevel::Debug,
                "warning" => LogLevel::Warning,
                "error" => LogLevel::Error,
                _ => LogLevel::Info,
            };
        }
        // An empty `matrix:` (every line below it commented out) means no notifications.
        if let Some(v @ Value::Object(_)) = s.get("matrix") {
            o.matrix = Some(self.matrix(v)?);
        } else if let Some(v) = s.get("matrix").filter(|v| !v.is_null()) {
            return Err(self.err(
                "observability.matrix",
                format!("expected a mapping of keys, found {}", describe(v)),
            ));
        }
        Ok(())
    }

    fn matrix(&self, v: &Value) -> Result<MatrixConfig> {
        let s = self.section(Some(v), "observability.matrix", MATRIX_KEYS)?;
        let Some(homeserver) = self.string(&s, "homeserver", false)? else {
            return Err(self
                .err(
                    "observability.matrix.homeserver",
                    "is required in the matrix section",
                )
                .with_hint(
                    "for example `homeserver: https://matrix.example.com`, or leave out the matrix section",
                ));
        };
        if !(homeserver.starts_with("https://") || homeserver.starts_with("http://")) {
            return Err(self.err(
                &s.key("homeserver"),
                format!("{homeserver:?} is not an http(s):// URL"),
            ));
        }
        let m = MatrixConfig {
            homeserver,
            room_id: self.string(&s, "room_id", true)?,
            token_env: self.string(&s, "token_env", true)?,
            registration_token_env: self.string(&s, "registration_token_env", true)?,
            invite_user: self.string(&s, "invite_user", true)?,
            bot_username: self.string(&s, "bot_username", true)?,
            verbose: self.boolean(&s, "verbose")?.unwrap_or(false),
        };
        for (name, value) in [
            ("token_env", &m.token_env),
            ("registration_token_env", &m.registration_token_env),
        ] {
            if let Some(v) = value {
                self.env_name(&s.key(name), v)?;
            }
        }
        if m.token_env.is_none() && m.registration_token_env.is_none() {
            return Err(self
                .err(
                    "observability.matrix",
                    "needs token_env or registration_token_env to sign in",
                )
                .with_hint("name the environment variable that holds the token, e.g. `token_env: MATRIX_ACCESS_TOKEN`"));
        }
        if let Some(room) = &m.room_id
            && !(room.starts_with('!') || room.starts_with('#'))
        {
            return Err(self
                .err(&s.key("room_id"), format!("{room:?} is not a Matrix room id"))
                .with_hint("room ids look like \"!abc123:example.com\" (quote them: ! starts a YAML tag)"));
        }
        if let Some(user) = &m.invite_user
            && !(user.starts_with('@') && user.contains(':'))
        {
            return Err(self
                .err(&s.key("invite_user"), format!("{user:?} is not a Matrix user id"))
                .with_hint("user ids look like \"@you:example.com\""));
        }
        if let Some(bot) = &m.bot_username
            && !bot
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/".contains(c))
        {
            return Err(self
                .err(
                    &s.key("bot_username"),
                    format!("{bot:?} is not a Matrix user name (lower-case letters, digits, . _ = - /)"),
                )
                .with_hint("give the name alone, without @ and the server"));
        }
        Ok(m)
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// GitHub's rules: an owner is 1–39 letters, digits and inner hyphens; a repository name is up to
/// 100 letters, digits, `.`, `_` and `-`, and not `.` or `..`.
fn check_owner_repo(s: &str) -> std::result::Result<(), &'static str> {
    if s.contains("://") || s.starts_with("git@") || s.starts_with("github.com") {
        return Err("give the owner and name only, not a URL");
    }
    let Some((owner, name)) = s.split_once('/') else {
        return Err("missing the / between owner and name");
    };
    if owner.is_empty()
        || owner.len() > 39
        || owner.starts_with('-')
        || owner.ends_with('-')
        || !owner.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err("the owner must be letters, digits and inner hyphens");
    }
    if name.ends_with(".git") {
        return Err("leave out the .git suffix");
    }
    if name.is_empty()
        || name.len() > 100
        || name == "."
        || name == ".."
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err("the name must be letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// The rules of `git check-ref-format --branch`, so a bad name fails here, naming the key, rather
/// than deep inside a git command.
pub(crate) fn check_branch_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name == "@" {
        return Err("\"@\" alone is not allowed");
    }
    if name.starts_with('-') {
        return Err("it must not start with '-'");
    }
    if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        return Err("it must not start or end with '/' or contain '//'");
    }
    if name.ends_with('.') {
        return Err("it must not end with '.'");
    }
    if name.contains("..") {
        return Err("it must not contain '..'");
    }
    if name.contains("@{") {
        return Err("it must not contain '@{'");
    }
    if name
        .chars()
        .any(|c| c.is_ascii_control() || " ~^:?*[\\".contains(c))
    {
        return Err("it must not contain spaces, control characters or any of ~ ^ : ? * [ \\");
    }
    for part in name.split('/') {
        if part.starts_with('.') {
            return Err("no part of it may start with '.'");
        }
        if part.ends_with(".lock") {
            return Err("no part of it may end with '.lock'");
        }
    }
    Ok(())
}

/// A hint naming the known key the user most likely meant by `unknown` in the section `prefix`: a close
/// spelling in the same section, the same words in another order or with one missing
/// (`max_rounds` → `max_task_rounds`), a key that belongs to another section, or a dotted key
/// written flat (`runtime.max_workers: 4` at the top level).
fn suggest(prefix: &str, unknown: &str, known: &[&str]) -> Option<String> {
    let full = dotted(prefix, unknown);
    let all: Vec<String> = SECTIONS
        .iter()
        .flat_map(|(p, keys)| keys.iter().map(move |k| dotted(p, k)))
        .collect();
    if unknown.contains('.') && all.contains(&full) {
        return Some(format!(
            "`{full}` is written as nested keys: each part of the dotted name on its own line, indented"
        ));
    }
    if let Some(c) = closest(unknown, known) {
        return Some(format!("did you mean `{}`?", dotted(prefix, c)));
    }
    // The right name in the wrong section.
    all.into_iter()
        .filter(|k| k != &full && k.rsplit('.').next() == Some(unknown))
        .min_by_key(|k| k.len())
        .map(|k| format!("did you mean `{k}`? it belongs in another section"))
}

/// The candidate closest to `word`, if any is close enough to be a plausible slip: a typo, a
/// known key with a word left out or added, or an abbreviation (`warn` → `warning`).
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let words = |s: &str| -> Vec<String> {
        s.to_ascii_lowercase()
            .split(['_', '-', '.'])
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mine = words(word);
    candidates
        .iter()
        .filter_map(|c| {
            let d = edit_distance(&word.to_ascii_lowercase(), c);
            let theirs = words(c);
            let subset = mine.len() >= 2
                && (mine.iter().all(|w| theirs.contains(w))
                    || theirs.len() >= 2 && theirs.iter().all(|w| mine.contains(w)));
            let lower = word.to_ascii_lowercase();
            let abbreviated = lower.len() >= 3 && c.starts_with(lower.as_str());
            let close = d <= 2 + word.len() / 5;
            (close || subset || abbreviated).then_some((d, *c))
        })
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// True when an overlay or resource names a remote location rather than a local folder.
pub fn is_remote(s: &str) -> bool {
    s.contains("://")
        || s.starts_with("git@")
        || s.starts_with("github.com/")
        || s.contains("//") && s.contains("?ref=")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names_follow_git() {
        for good in ["main", "release/1.2", "feature-x", "a.b", "hyperloop-state"] {
            assert!(check_branch_name(good).is_ok(), "{good}");
        }
        for bad in [
            "", "-x", "a..b", "a b", "a~1", "x.lock", "/a", "a/", ".hidden", "a//b", "@", "a@{1", "end.",
            "a:b",
        ] {
            assert!(check_branch_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn owner_repo_follows_github() {
        assert!(check_owner_repo("acme/widgets").is_ok());
        assert!(check_owner_repo("a-b/c.d_e").is_ok());
        for bad in [
            "acme",
            "/widgets",
            "acme/",
            "acme/widgets.git",
            "https://github.com/acme/widgets",
            "-acme/x",
            "ac me/x",
            "acme/..",
        ] {
            assert!(check_owner_repo(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn suggestions() {
        let hint = |p, k, known| suggest(p, k, known).unwrap_or_default();
        assert!(hint("", "max_rounds", TOP_KEYS).contains("`max_task_rounds`"));
        assert!(hint("runtime", "max_worker", RUNTIME_KEYS).contains("`runtime.max_workers`"));
        assert!(hint("", "max_workers", TOP_KEYS).contains("`runtime.max_workers`"));
        assert!(hint("", "runtime.max_workers", TOP_KEYS).contains("nested"));
        assert_eq!(suggest("merge", "colour", MERGE_KEYS), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn scalars_that_would_change_meaning_are_quoted() {
        assert_eq!(scalar("main"), "main");
        assert_eq!(scalar(".hyperloop/agents"), ".hyperloop/agents");
        assert_eq!(scalar(DEFAULT_BASE_REF), DEFAULT_BASE_REF);
        for tricky in [
            "yes", "1.0", "!room:x", "@me:x", "a b", "x: y", "", "#c", "- a", "*a",
        ] {
            assert!(scalar(tricky).starts_with('"'), "{tricky}");
        }
    }
}
