//! Command-line definitions (CONTRACT §1). Parsing only: each subcommand becomes a request that the
//! library carries out.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "hyperloop",
    version,
    about = "Walks software tasks through composable process pipelines using AI coding agents",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// The target repository (default: the current directory).
    #[arg(long, global = true, value_name = "DIR")]
    pub path: Option<PathBuf>,
    /// GitHub repository OWNER/REPO (GitHub mode).
    #[arg(long, global = true, value_name = "OWNER/REPO")]
    pub repo: Option<String>,
    /// Configuration file (default: <path>/.hyperloop.yaml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the configuration, the process, the agents and the planned actions; change nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exactly one orchestrator cycle, then exit.
    Step(StepArgs),
    /// Repeat `step` every poll_interval seconds until the work is done or cannot progress.
    Run(RunArgs),
    /// One row per task (id, status, phase, round, deps, branch, PR, last verdict).
    Status(StatusArgs),
    /// Clear the gate a task waits at (local mode).
    Approve(ApproveArgs),
    /// Write .hyperloop.yaml, specs/, an agents overlay and a GitHub workflow; never overwrite.
    Init(InitArgs),
    /// Put a failed or cancelled task back to the start of the step (or loop) it stopped in,
    /// with a fresh round budget; `retry intake` runs an intake that gave up again.
    Retry(RetryArgs),
    /// Stop a task that is not complete (and its running agent); it never merges.
    Cancel(CancelArgs),
    /// Show what a task's agents did, readable (default: the latest run).
    Logs(LogsArgs),
    /// The first part of a step: do what needs no agent, claim the next agent runs as work items
    /// (leases committed to the state branch) and print them.
    Plan(PlanArgs),
    /// Run the agent of one claimed work item in this clone; write its output to DIR. Pushes
    /// nothing.
    Work(WorkArgs),
    /// Verify outputs of `work` against their leases, apply them, then finish the cycle.
    Record(RecordArgs),
}

impl GlobalArgs {
    /// The target repository as given, or the current directory.
    pub fn path(&self) -> PathBuf {
        self.path.clone().unwrap_or_else(|| PathBuf::from("."))
    }
}

#[derive(Debug, Clone, Args)]
pub struct RetryArgs {
    /// The task to retry, or `intake`.
    pub task: String,
}

#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// The task to cancel.
    pub task: String,
}

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// The task whose agents' output to show (`intake` for the pm's runs).
    pub task: String,
    /// Only runs of this role (implementer, verifier, ...).
    #[arg(long, value_name = "ROLE")]
    pub role: Option<String>,
    /// Only runs of this round.
    #[arg(long, value_name = "N")]
    pub round: Option<u32>,
    /// Keep printing while the run goes on; stop when it ends.
    #[arg(long)]
    pub follow: bool,
    /// Print the log as it was written (raw stream-json for Claude).
    #[arg(long)]
    pub raw: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StepArgs {
    /// Start no new worker after this many seconds (running workers finish).
    #[arg(long, value_name = "SECONDS")]
    pub max_duration: Option<u64>,
    /// Print the step's report as JSON on standard output.
    #[arg(long)]
    pub json: bool,
    /// Override the configured number of parallel workers.
    #[arg(long, value_name = "N")]
    pub max_workers: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Write the fan-out workflow (`.github/workflows/hyperloop-fanout.yml`: plan, a matrix of
    /// work jobs without write credentials, record) instead of the single-job one.
    #[arg(long)]
    pub fan_out: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Print `{"items":[{"id","task_id","role","round"},…]}` on standard output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct WorkArgs {
    /// The work item's id, as `plan` printed it.
    pub item: String,
    /// Where the output goes (created when missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct RecordArgs {
    /// Output folders written by `work`. None: only finish the cycle (a round whose every
    /// `work` failed still gets its gates, merges and state commits).
    #[arg(value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// Print the cycle's report as JSON on standard output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Override the configured number of parallel workers.
    #[arg(long, value_name = "N")]
    pub max_workers: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ApproveArgs {
    /// The task whose gate to clear.
    pub task: String,
    /// The gate's name; required to match when given.
    #[arg(long, value_name = "NAME")]
    pub gate: Option<String>,
}
