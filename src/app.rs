//! Carries out each command: resolves the target repository and configuration from the shared
//! flags, then calls into the library. Returns what the binary prints and its exit status.

use std::path::{Path, PathBuf};

use crate::cli::{Command, GlobalArgs};
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
}

impl Target {
    /// Opens the repository named by `--path` and loads its configuration.
    pub fn load(global: &GlobalArgs) -> Result<Target> {
        let repo = Repo::open(&global.path)?;
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
        let mut config = Config::load(&config_file, &repo.root)?;
        if let Some(r) = &global.repo {
            if !valid_repo_slug(r) {
                return Err(Error::usage(format!("--repo {r}: expected OWNER/REPO")));
            }
            config.target.repo = Some(r.clone());
        }
        Ok(Target {
            repo,
            config,
            config_file,
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
        Command::Init => {
            let repo = Repo::open(&global.path)?;
            let report = crate::init::init(&repo.root)?;
            Ok(Outcome::ok(report.to_string()))
        }
        Command::Status(args) => {
            let target = Target::load(global)?;
            let tasks = target.committed_tasks()?;
            let text = if args.json {
                status_json(&tasks)?
            } else {
                status_table(&tasks)
            };
            Ok(Outcome::ok(text))
        }
        Command::Step(_) | Command::Run(_) | Command::Approve(_) => Err(Error::NotAvailable {
            what: "this command".into(),
        }),
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
                "gate_cleared": t.gate_cleared,
                "cost_usd": t.cost_usd,
            })
        })
        .collect();
    let mut s = serde_json::to_string_pretty(&serde_json::json!({ "tasks": list }))
        .map_err(|e| Error::other(e.to_string()))?;
    s.push('\n');
    Ok(s)
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
        let phase = match (&t.phase, t.gate_cleared) {
            (Some(p), true) => format!("{p} (approved)"),
            (Some(p), false) => p.clone(),
            (None, _) => "-".into(),
        };
        rows.push([
            t.id.clone(),
            t.status.as_str().to_string(),
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
    let total: f64 = tasks.iter().map(|t| t.cost_usd).sum();
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
