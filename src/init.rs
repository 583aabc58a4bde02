//! `hyperloop init`: scaffolds a repository for hyperloop without overwriting anything. It writes
//! a commented `.hyperloop.yaml`, an example spec (only into a specs folder that has none), an
//! in-repo agents overlay, and a GitHub workflow that runs one step at a time (or, with
//! `--fan-out`, one that plans, runs each agent in a matrix job of its own, and records); and it appends the
//! ignore rules for hyperloop's local state to `.gitignore`. Every file is created with
//! `create_new`, so a file that appears between the check and the write is still never replaced.

use std::fmt;
use std::io::Write as _;
use std::path::Path;

use crate::config::{self, Config};
use crate::error::{Error, Result};

/// Where the written configuration points `overlay`, relative to the repository.
pub const OVERLAY_DIR: &str = ".hyperloop/agents";

/// The `.gitignore` lines that keep hyperloop's local state out of git but not the overlay.
/// `/.hyperloop/*` (not `/.hyperloop/`) matters: git cannot re-include a path whose parent folder
/// is itself ignored.
pub const GITIGNORE_LINES: [&str; 2] = ["/.hyperloop/*", "!/.hyperloop/agents/"];

/// What `init` wrote and what it left alone, as paths relative to the repository, in the order
/// it looked at them; plus warnings about existing files it could not fix without overwriting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitReport {
    /// Files that did not exist and were written.
    pub written: Vec<String>,
    /// Existing files that missing lines were appended to (`.gitignore` only).
    pub appended: Vec<String>,
    /// Files that already existed and were left untouched; `<specs_dir>/` when the specs folder
    /// already held a spec, so no example was written.
    pub skipped: Vec<String>,
    pub warnings: Vec<String>,
    /// The `target.base_branch` written into a new configuration, and how it was chosen.
    pub base_branch: Option<(String, String)>,
    /// The example spec written, to be replaced before the first run.
    pub example_spec: Option<String>,
}

impl fmt::Display for InitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for w in &self.written {
            writeln!(f, "wrote {w}")?;
        }
        for a in &self.appended {
            writeln!(f, "appended ignore rules to {a}")?;
        }
        for s in &self.skipped {
            writeln!(f, "kept existing {s}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        if let Some((branch, why)) = &self.base_branch {
            writeln!(f, "target.base_branch: {branch} ({why})")?;
        }
        if self.written.is_empty() && self.appended.is_empty() {
            return Ok(());
        }
        writeln!(f, "\nnext:")?;
        let mut n = 1;
        if let Some(example) = &self.example_spec {
            writeln!(
                f,
                "  {n}. replace {example} with a spec of your own: what should exist when the work is done, and how to tell"
            )?;
            n += 1;
        }
        writeln!(
            f,
            "  {n}. commit what init wrote: git add -A && git commit -m \"hyperloop: set up\""
        )?;
        writeln!(
            f,
            "  {}. hyperloop run    (or hyperloop step, for one cycle)",
            n + 1
        )
    }
}

/// The branch a new configuration names as `target.base_branch`, and why: the branch checked
/// out here, else the default branch of `origin`, else `main`.
pub fn detect_base_branch(repo: &Path) -> (String, String) {
    let git = crate::git::Git::new(repo);
    let symbolic = |name: &str| {
        git.output(["symbolic-ref", "--quiet", "--short", name])
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    if let Some(branch) = symbolic("HEAD") {
        return (branch, "the branch checked out here".to_string());
    }
    if let Some(remote) = symbolic("refs/remotes/origin/HEAD")
        && let Some(branch) = remote.strip_prefix("origin/")
    {
        return (branch.to_string(), "the default branch of origin".to_string());
    }
    (
        Config::default().target.base_branch,
        "no branch is checked out and origin names no default; change it if that is wrong".to_string(),
    )
}

/// Where each workflow `init` can write goes.
pub const WORKFLOW_PATH: &str = ".github/workflows/hyperloop.yml";
pub const FANOUT_WORKFLOW_PATH: &str = ".github/workflows/hyperloop-fanout.yml";

/// What `hyperloop init` was asked for beyond the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InitOptions {
    /// The fan-out workflow instead of the single-job one.
    pub fan_out: bool,
}

/// Scaffolds `repo` with the single-job workflow (see [`init_with`]).
pub fn init(repo: &Path) -> Result<InitReport> {
    init_with(repo, &InitOptions::default())
}

/// Scaffolds `repo`. Never replaces an existing file; an existing `.hyperloop.yaml` must be valid,
/// since its `specs_dir` decides where the example spec goes, and, for the fan-out workflow, its
/// `runtime.max_workers` how many `work` jobs run at once.
pub fn init_with(repo: &Path, options: &InitOptions) -> Result<InitReport> {
    if !repo.is_dir() {
        return Err(Error::usage(format!(
            "{}: no such directory to initialise",
            repo.display()
        )));
    }
    let mut report = InitReport::default();

    let config_file = repo.join(config::FILE_NAME);
    let existing = Config::load(&config_file, repo)?;
    let (base_branch, why) = detect_base_branch(repo);
    let mut written_config = Config {
        overlay: Some(OVERLAY_DIR.to_string()),
        ..Config::default()
    };
    written_config.target.base_branch.clone_from(&base_branch);
    write_new(
        repo,
        config::FILE_NAME,
        &written_config.render_commented(),
        &mut report,
    )?;
    if report.written.iter().any(|w| w == config::FILE_NAME) {
        report.base_branch = Some((base_branch, why));
    }

    let specs_dir = existing.target.specs_dir.trim_end_matches('/').to_string();
    if has_spec(&repo.join(&specs_dir))? {
        report.skipped.push(format!("{specs_dir}/"));
    } else {
        let example = format!("{specs_dir}/example.md");
        write_new(repo, &example, EXAMPLE_SPEC, &mut report)?;
        if report.written.contains(&example) {
            report.example_spec = Some(example);
        }
    }

    write_new(
        repo,
        &format!("{OVERLAY_DIR}/kustomization.yaml"),
        KUSTOMIZATION,
        &mut report,
    )?;
    write_new(
        repo,
        &format!("{OVERLAY_DIR}/implementer-patch.yaml"),
        IMPLEMENTER_PATCH,
        &mut report,
    )?;
    if options.fan_out {
        let text = fanout_workflow(existing.runtime.max_workers);
        write_new(repo, FANOUT_WORKFLOW_PATH, &text, &mut report)?;
        if repo.join(WORKFLOW_PATH).exists() {
            // Both would run rounds on the same schedule; the shared concurrency group keeps
            // them from racing, but the single job would still run agents with the write token.
            report.warnings.push(format!(
                "{WORKFLOW_PATH} runs the single-job step beside the fan-out workflow; delete it \
                 so that agents run only in the fan-out's work jobs"
            ));
        }
    } else {
        write_new(repo, WORKFLOW_PATH, WORKFLOW, &mut report)?;
    }
    gitignore(repo, &mut report)?;
    Ok(report)
}

/// Creates `rel` under `repo` with `text` unless something (even a dangling symlink) is there.
fn write_new(repo: &Path, rel: &str, text: &str, report: &mut InitReport) -> Result<()> {
    let path = repo.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path);
    match file {
        Ok(mut f) => {
            f.write_all(text.as_bytes()).map_err(|e| Error::io(&path, e))?;
            report.written.push(rel.to_string());
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            report.skipped.push(rel.to_string());
        }
        Err(e) => return Err(Error::io(&path, e)),
    }
    Ok(())
}

/// True when the specs folder already holds a spec: a `.md` file outside the folders hyperloop
/// itself writes (CONTRACT §3). Symlinks are not followed.
fn has_spec(specs: &Path) -> Result<bool> {
    fn walk(dir: &Path, top: bool) -> Result<bool> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            let name = entry.file_name();
            if kind.is_dir() {
                let own = top && matches!(name.to_str(), Some("tasks" | "reviews" | "prompts"));
                if !own && walk(&entry.path(), false)? {
                    return Ok(true);
                }
            } else if Path::new(&name).extension().is_some_and(|x| x == "md") {
                return Ok(true);
            }
        }
        Ok(false)
    }
    walk(specs, true)
}

/// Appends whichever of [`GITIGNORE_LINES`] `.gitignore` lacks; the only change `init` makes to
/// an existing file, because ignoring the state folder is needed and losing a user's rules is not.
fn gitignore(repo: &Path, report: &mut InitReport) -> Result<()> {
    const REL: &str = ".gitignore";
    let path = repo.join(REL);
    let existing = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&path, e)),
    };
    let text = existing.as_deref().unwrap_or("");
    let present: Vec<&str> = text.lines().map(str::trim).collect();
    for line in &present {
        if matches!(
            *line,
            ".hyperloop" | ".hyperloop/" | "/.hyperloop" | "/.hyperloop/"
        ) {
            report.warnings.push(format!(
                ".gitignore line `{line}` ignores the whole .hyperloop folder, so the agents \
                 overlay cannot be committed; replace it with `/.hyperloop/*`"
            ));
        }
    }
    let missing: Vec<&str> = GITIGNORE_LINES
        .into_iter()
        .filter(|l| !present.contains(l))
        .collect();
    if missing.is_empty() {
        report.skipped.push(REL.to_string());
        return Ok(());
    }
    let mut add = String::new();
    if !text.is_empty() && !text.ends_with('\n') {
        add.push('\n');
    }
    add.push_str("# hyperloop: local state stays out of git; the agents overlay is committed\n");
    for l in missing {
        add.push_str(l);
        add.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    f.write_all(add.as_bytes()).map_err(|e| Error::io(&path, e))?;
    if existing.is_some() {
        report.appended.push(REL.to_string());
    } else {
        report.written.push(REL.to_string());
    }
    Ok(())
}

const EXAMPLE_SPEC: &str = r#"# Example spec: a greeting script

<!--
This is an example. hyperloop turns every spec in this folder into tasks on its next step, so
replace this file with a spec of your own (or delete it) before you run `hyperloop step`.
A good spec says what should exist when the work is done and how to tell that it does.
-->

## Goal

Add a script `scripts/greet.sh` that prints a greeting for the name it is given.

## Behaviour

- `scripts/greet.sh Ada` prints `Hello, Ada!` and exits 0.
- Without an argument it prints `usage: greet.sh NAME` on standard error and exits 2.

## Acceptance criteria

- [ ] `scripts/greet.sh Ada` prints exactly `Hello, Ada!` followed by a newline.
- [ ] `scripts/greet.sh` with no argument exits with status 2 and prints the usage line on
      standard error.
- [ ] A test under `tests/` checks both cases and passes.
- [ ] The README has a one-line description of the script.
"#;

const KUSTOMIZATION: &str = r#"# The in-repo agents overlay: patches applied to hyperloop's built-in agents and process.
# The resource below names the built-in base; hyperloop resolves it without network access.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - github.com/jsell-rh/hyperloop//base?ref=main
patches:
  - path: implementer-patch.yaml
    target:
      kind: Agent
      name: implementer
  # Change the pipeline with a Process patch, for example:
  # - path: process-patch.yaml
  #   target:
  #     kind: Process
  #     name: default
"#;

const IMPLEMENTER_PATCH: &str = r#"# Tells the implementer about this project. Maps merge into the built-in agent; lists and
# plain values replace what is there.
apiVersion: hyperloop.io/v1
kind: Agent
metadata:
  name: implementer
annotations:
  ambient.io/persona: |
    You work on this repository. Describe it here: the language, how to build it
    (e.g. `make build`), how to test it (`make test`), how to lint it (`make lint`),
    and the conventions a change must follow.
"#;

const WORKFLOW: &str = r#"# Runs one hyperloop step at a time: on a schedule, when a pull request or issue gets the
# `lgtm` label (which clears a gate) or `hyperloop:retry` / `hyperloop:cancel`, when a person edits the
# dashboard issue (ticks a box), and on demand. Runs never overlap and never cancel each
# other; every step reads all its state from the repository, so a queued run simply continues.
# Each run's summary page shows what the step did, every task, and a graph of their dependencies.
name: hyperloop

on:
  schedule:
    - cron: "*/15 * * * *"
  pull_request:
    types: [labeled]
  issues:
    types: [labeled, edited]
  workflow_dispatch:

concurrency:
  group: hyperloop
  cancel-in-progress: false

# hyperloop pushes task state and merges (contents), opens and labels pull requests
# (pull-requests), and reads and writes labels (issues). Nothing else.
permissions:
  contents: write
  pull-requests: write
  issues: write

jobs:
  step:
    # Any other label, and an edit of any issue but the dashboard, is not a decision for
    # hyperloop: do not spend a run on it. Edits by bots (hyperloop's own rewrite of the
    # dashboard, when it runs as a GitHub App) start nothing either.
    if: >-
      (github.event_name != 'pull_request' && github.event_name != 'issues')
      || (github.event.action == 'labeled' && contains(fromJSON('["lgtm", "hyperloop:retry", "hyperloop:cancel"]'), github.event.label.name))
      || (github.event.action == 'edited' && github.event.sender.type != 'Bot' && contains(github.event.issue.labels.*.name, 'hyperloop:dashboard'))
    runs-on: ubuntu-latest
    timeout-minutes: 120
    steps:
      - uses: actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683 # v4.2.2
        with:
          # The base branch, whatever the event: a pull request event would check out its own
          # merge commit, and task state lives on the base branch.
          ref: ${{ github.event.repository.default_branch }}
          fetch-depth: 0
          # The job token must not stay in .git/config, where every agent could read it;
          # hyperloop is given its own credential below.
          persist-credentials: false
      - id: hyperloop
        uses: hyperloop-dev/hyperloop@v1
        with:
          command: step
          # No new agent after 50 minutes: with runtime.worker_timeout (3600 s) every agent
          # still ends before the job's 120-minute limit.
          max-duration: 3000
          anthropic-api-key: ${{ secrets.ANTHROPIC_API_KEY }}
          github-token: ${{ github.token }}
          # A GitHub App instead of the workflow token (its pushes start other workflows):
          # app-id: ${{ vars.HYPERLOOP_APP_ID }}
          # app-private-key: ${{ secrets.HYPERLOOP_APP_PRIVATE_KEY }}
          # max-workers: 2
"#;

/// The fan-out workflow, with `max_workers` as the number of `work` jobs that run at once.
pub fn fanout_workflow(max_workers: usize) -> String {
    FANOUT_WORKFLOW.replace("{max_parallel}", &max_workers.max(1).to_string())
}

const FANOUT_WORKFLOW: &str = r#"# Runs hyperloop in rounds of three jobs. `plan` claims the agent runs that are ready (a lease
# for each, committed to the repository) and lists them; a `work` job per item runs that one
# agent with a read-only token and uploads its output; `record` checks every output against its
# lease, applies it, merges what passed and pushes. Agents never run where the write token is.
# Triggers as the single-job workflow: on a schedule, on the `lgtm`, `hyperloop:retry` and
# `hyperloop:cancel` labels, when a person edits the dashboard issue, and on demand; and when a
# round leaves more work ready, `record` starts the next round at once instead of waiting for
# the schedule. Intake (the pm agent turning specs into tasks) is a work item like the others;
# the process improver is not: it runs only in `hyperloop step` (or the single-job workflow).
name: hyperloop fan-out

on:
  schedule:
    - cron: "*/15 * * * *"
  pull_request:
    types: [labeled]
  issues:
    types: [labeled, edited]
  workflow_dispatch:

# One round at a time, queued, never cancelled (a cancelled round would leave its leases to
# expire). Leases already keep two rounds from running the same item; the group also keeps
# their plans and records from contending for the same pushes. It is the single-job workflow's
# group, so a step of that one never overlaps a round either.
concurrency:
  group: hyperloop
  cancel-in-progress: false

# Nothing by default: each job names what it needs.
permissions: {}

jobs:
  plan:
    # Any other label, and an edit of any issue but the dashboard, is not a decision for
    # hyperloop. Edits by bots (hyperloop's own rewrite of the dashboard) start nothing either.
    if: >-
      (github.event_name != 'pull_request' && github.event_name != 'issues')
      || (github.event.action == 'labeled' && contains(fromJSON('["lgtm", "hyperloop:retry", "hyperloop:cancel"]'), github.event.label.name))
      || (github.event.action == 'edited' && github.event.sender.type != 'Bot' && contains(github.event.issue.labels.*.name, 'hyperloop:dashboard'))
    runs-on: ubuntu-latest
    timeout-minutes: 30
    # Leases and task state (contents), pull requests and their labels, the dashboard issue.
    permissions:
      contents: write
      pull-requests: write
      issues: write
    outputs:
      items: ${{ steps.plan.outputs.items }}
      has-items: ${{ steps.plan.outputs.has-items }}
    steps:
      - uses: actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683 # v4.2.2
        with:
          ref: ${{ github.event.repository.default_branch }}
          fetch-depth: 0
          persist-credentials: false
      - id: plan
        uses: hyperloop-dev/hyperloop@v1
        with:
          command: plan
          # No agent runs here.
          install-claude: false
          github-token: ${{ github.token }}
          # A GitHub App instead of the workflow token (its pushes start other workflows):
          # app-id: ${{ vars.HYPERLOOP_APP_ID }}
          # app-private-key: ${{ secrets.HYPERLOOP_APP_PRIVATE_KEY }}

  work:
    needs: plan
    if: needs.plan.outputs.has-items == 'true'
    runs-on: ubuntu-latest
    # Keep it above runtime.worker_timeout (3600 s by default) plus the clone and the upload.
    timeout-minutes: 75
    # Read only: an agent that turns hostile has no credential here that could push or merge.
    permissions:
      contents: read
    strategy:
      # One failed agent must not cancel the others: record takes what arrived.
      fail-fast: false
      # runtime.max_workers when this workflow was written.
      max-parallel: {max_parallel}
      matrix:
        item: ${{ fromJSON(needs.plan.outputs.items) }}
    steps:
      - uses: actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683 # v4.2.2
        with:
          # After plan pushed: this checkout holds the leases and the commits each agent builds on.
          ref: ${{ github.event.repository.default_branch }}
          fetch-depth: 0
          persist-credentials: false
      - uses: hyperloop-dev/hyperloop@v1
        with:
          command: work
          item: ${{ matrix.item }}
          out: ${{ runner.temp }}/hyperloop-output
          anthropic-api-key: ${{ secrets.ANTHROPIC_API_KEY }}
      - uses: actions/upload-artifact@ea165f8d65b6e75b540449e92b4886f43607fa02 # v4.6.2
        with:
          name: hyperloop-output-${{ matrix.item }}
          path: ${{ runner.temp }}/hyperloop-output
          if-no-files-found: error
          retention-days: 1

  record:
    needs: [plan, work]
    # After every work job, however they ended (record refuses what does not match its lease
    # and leaves an item with no output to expire); not when plan itself failed or claimed nothing.
    if: always() && needs.plan.result == 'success' && needs.plan.outputs.has-items == 'true'
    runs-on: ubuntu-latest
    timeout-minutes: 30
    # As plan, and `actions: write` to start the next round.
    permissions:
      contents: write
      pull-requests: write
      issues: write
      actions: write
    steps:
      - uses: actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683 # v4.2.2
        with:
          ref: ${{ github.event.repository.default_branch }}
          fetch-depth: 0
          persist-credentials: false
      # Each artifact into a folder of its own under the path.
      - uses: actions/download-artifact@d3f86a106a0bac45b974a628896c90dbdf5c8093 # v4.3.0
        with:
          pattern: hyperloop-output-*
          path: ${{ runner.temp }}/hyperloop-outputs
      - id: record
        uses: hyperloop-dev/hyperloop@v1
        with:
          command: record
          dirs: ${{ runner.temp }}/hyperloop-outputs
          install-claude: false
          github-token: ${{ github.token }}
          # app-id: ${{ vars.HYPERLOOP_APP_ID }}
          # app-private-key: ${{ secrets.HYPERLOOP_APP_PRIVATE_KEY }}
      # A run started through the API with the job token is the one kind GitHub allows
      # (workflow_dispatch), so the next round need not wait for the schedule.
      - name: Start the next round
        if: steps.record.outputs.ready != '' && steps.record.outputs.ready != '0'
        env:
          GH_TOKEN: ${{ github.token }}
          BRANCH: ${{ github.event.repository.default_branch || github.ref_name }}
          READY: ${{ steps.record.outputs.ready }}
        run: |
          workflow="${GITHUB_WORKFLOW_REF%%@*}"
          workflow="${workflow##*/}"
          echo "$READY agent run(s) ready: dispatching ${workflow:=hyperloop-fanout.yml} on $BRANCH"
          curl --fail-with-body --silent --show-error -X POST \
            -H "Authorization: Bearer $GH_TOKEN" \
            -H "Accept: application/vnd.github+json" \
            -H "X-GitHub-Api-Version: 2022-11-28" \
            "${GITHUB_API_URL:-https://api.github.com}/repos/$GITHUB_REPOSITORY/actions/workflows/$workflow/dispatches" \
            -d "{\"ref\":\"$BRANCH\"}"
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parse(text: &str) -> Value {
        crate::yaml::parse(Path::new("hyperloop-fanout.yml"), text).expect("the workflow is YAML")
    }

    fn uses(job: &Value) -> Vec<String> {
        job["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .filter_map(|s| s["uses"].as_str().map(str::to_string))
            .collect()
    }

    fn step<'a>(job: &'a Value, prefix: &str) -> &'a Value {
        job["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .find(|s| s["uses"].as_str().is_some_and(|u| u.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no step uses {prefix}"))
    }

    #[test]
    fn the_fan_out_workflow_has_three_jobs_with_their_own_permissions() {
        let w = parse(&fanout_workflow(4));
        let jobs = &w["jobs"];
        assert_eq!(
            jobs.as_object().expect("jobs").keys().collect::<Vec<_>>(),
            ["plan", "work", "record"]
        );
        assert_eq!(w["permissions"], json!({}), "nothing unless a job asks");
        let write = json!({"contents": "write", "pull-requests": "write", "issues": "write"});
        assert_eq!(jobs["plan"]["permissions"], write);
        assert_eq!(jobs["work"]["permissions"], json!({"contents": "read"}));
        let mut record = write;
        record["actions"] = json!("write");
        assert_eq!(jobs["record"]["permissions"], record);
        assert_eq!(w["concurrency"]["group"], "hyperloop");
        assert_eq!(w["concurrency"]["cancel-in-progress"], false);
        let on = w["on"].as_object().expect("triggers");
        for trigger in ["schedule", "workflow_dispatch", "pull_request", "issues"] {
            assert!(on.contains_key(trigger), "{trigger}");
        }
    }

    #[test]
    fn work_is_a_matrix_over_the_planned_items_without_credentials() {
        let w = parse(&fanout_workflow(4));
        let plan = &w["jobs"]["plan"];
        assert_eq!(plan["outputs"]["items"], "${{ steps.plan.outputs.items }}");
        assert_eq!(step(plan, "hyperloop-dev/hyperloop@")["with"]["command"], "plan");
        let work = &w["jobs"]["work"];
        assert_eq!(work["needs"], "plan");
        assert_eq!(work["if"], "needs.plan.outputs.has-items == 'true'");
        let strategy = &work["strategy"];
        assert_eq!(strategy["fail-fast"], false);
        assert_eq!(strategy["max-parallel"], 4);
        assert_eq!(
            strategy["matrix"]["item"],
            "${{ fromJSON(needs.plan.outputs.items) }}"
        );
        let checkout = step(work, "actions/checkout@");
        assert_eq!(checkout["with"]["persist-credentials"], false);
        assert_eq!(checkout["with"]["fetch-depth"], 0);
        let action = &step(work, "hyperloop-dev/hyperloop@")["with"];
        assert_eq!(action["command"], "work");
        assert_eq!(action["item"], "${{ matrix.item }}");
        assert!(
            action.get("github-token").is_none() && action.get("app-private-key").is_none(),
            "work is given no forge credential: {action}"
        );
        let upload = &step(work, "actions/upload-artifact@")["with"];
        assert_eq!(upload["name"], "hyperloop-output-${{ matrix.item }}");
        assert_eq!(upload["path"], action["out"]);
        // Every checkout leaves no token in .git/config.
        for job in ["plan", "work", "record"] {
            let c = step(&w["jobs"][job], "actions/checkout@");
            assert_eq!(c["with"]["persist-credentials"], false, "{job}");
        }
    }

    #[test]
    fn record_runs_after_every_work_job_and_starts_the_next_round() {
        let w = parse(&fanout_workflow(4));
        let record = &w["jobs"]["record"];
        assert_eq!(record["needs"], json!(["plan", "work"]));
        let cond = record["if"].as_str().expect("if");
        assert!(cond.starts_with("always()"), "{cond}");
        assert!(cond.contains("needs.plan.result == 'success'"), "{cond}");
        let download = &step(record, "actions/download-artifact@")["with"];
        assert_eq!(download["pattern"], "hyperloop-output-*");
        let action = &step(record, "hyperloop-dev/hyperloop@")["with"];
        assert_eq!(action["command"], "record");
        assert_eq!(action["dirs"], download["path"]);
        let steps = record["steps"].as_array().expect("steps");
        let dispatch = steps.last().expect("a last step");
        assert!(
            dispatch["if"]
                .as_str()
                .is_some_and(|c| c.contains("steps.record.outputs.ready")),
            "{dispatch}"
        );
        let run = dispatch["run"].as_str().expect("run");
        assert!(run.contains("/actions/workflows/$workflow/dispatches"), "{run}");
        assert!(
            run.contains(FANOUT_WORKFLOW_PATH.rsplit('/').next().expect("file")),
            "{run}"
        );
    }

    #[test]
    fn every_remote_action_is_pinned_to_a_full_commit() {
        let w = parse(&fanout_workflow(4));
        let mut seen = 0;
        for (name, job) in w["jobs"].as_object().expect("jobs") {
            for u in uses(job) {
                if u.starts_with("hyperloop-dev/hyperloop@") {
                    continue;
                }
                seen += 1;
                let sha = u.split_once('@').map(|(_, r)| r).unwrap_or_default();
                assert!(
                    sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{name}: {u}"
                );
            }
        }
        assert_eq!(seen, 5, "three checkouts, an upload and a download");
    }

    #[test]
    fn max_parallel_follows_the_configuration_and_is_never_zero() {
        for (workers, want) in [(1, 1), (6, 6), (0, 1)] {
            let w = parse(&fanout_workflow(workers));
            assert_eq!(w["jobs"]["work"]["strategy"]["max-parallel"], want);
        }
    }
}
