//! The one error type of the library. Its kind decides the exit status (CONTRACT §1): bad input
//! (usage, configuration, definitions, task files, dependency cycles) exits 2, everything else 1.
//! Every variant names what the user has to look at: a file and a field or line, a git command
//! and its directory, a task.

use std::fmt;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where in an input file a problem is: a dotted key (`runtime.max_workers`), a line/column, or a
/// named part of a document (`process default: pipeline[1].loop[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location(pub String);

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input the user wrote (or an agent wrote for them) is not acceptable. Exit 2.
    #[error("{file}: {location}: {message}{}", hint_suffix(.hint))]
    Invalid {
        file: PathBuf,
        location: Location,
        message: String,
        hint: Option<String>,
    },
    /// The command line itself is wrong, or asks for something that cannot apply. Exit 2.
    #[error("{message}")]
    Usage { message: String },
    /// Task dependencies form a cycle or name unknown tasks. Exit 2.
    #[error("{message}")]
    Dependencies { message: String },
    /// A git command failed.
    #[error("git {args} (in {dir}) failed: {stderr}")]
    Git {
        args: String,
        dir: PathBuf,
        stderr: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A feature that a later release provides. Exit 1, never a fake success.
    #[error("{what} is not available yet")]
    NotAvailable { what: String },
    /// GitHub's rate limit ran out; a later step continues. `step` ends cleanly on it.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_at: chrono::DateTime<chrono::Utc>,
    },
    /// Another step holds the repository. Not a failure of this step.
    #[error("another hyperloop step holds {path} (pid {pid})")]
    Busy { path: PathBuf, pid: u32 },
    /// The forge refused the push of a task's branch for a reason of its own (a protected path,
    /// push protection, a size limit, a ruleset). It concerns that task only.
    #[error("origin refused the push of {branch}: {message}")]
    PushRefused { branch: String, message: String },
    /// The step lock is held by a process that is not a hyperloop step (an agent's leftover,
    /// say). Not skipped quietly: nothing would ever run again.
    #[error(
        "the step lock {path} is held by pid {pid} ({command}), which is not a hyperloop step\n  hint: stop that process (kill {pid}); no step can run while it holds the lock"
    )]
    ForeignLock {
        path: PathBuf,
        pid: u32,
        command: String,
    },
    #[error("{message}")]
    Other { message: String },
}

fn hint_suffix(hint: &Option<String>) -> String {
    match hint {
        Some(h) => format!("\n  hint: {h}"),
        None => String::new(),
    }
}

impl Error {
    pub fn invalid(
        file: impl Into<PathBuf>,
        location: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            file: file.into(),
            location: Location(location.into()),
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(self, hint: impl Into<String>) -> Self {
        match self {
            Error::Invalid {
                file,
                location,
                message,
                ..
            } => Error::Invalid {
                file,
                location,
                message,
                hint: Some(hint.into()),
            },
            other => other,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn other(message: impl Into<String>) -> Self {
        Error::Other {
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Error::Usage {
            message: message.into(),
        }
    }

    /// The process exit status for this error (CONTRACT §1).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid { .. } | Error::Usage { .. } | Error::Dependencies { .. } => 2,
            Error::Busy { .. } => 0,
            Error::ForeignLock { .. } => 1,
            _ => 1,
        }
    }
}
