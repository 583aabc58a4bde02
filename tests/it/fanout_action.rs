//! The fan-out workflow `hyperloop init --fan-out` writes, run end to end by act on this host:
//! the plan job, a matrix of work jobs and the record job, against the fake GitHub, with the
//! work outputs carried between jobs as artifacts through act's own artifact server. act cannot
//! fetch actions from github.com here, so each remote action the workflow names is served from a
//! local folder (`--local-repository`); the artifact stand-ins speak the artifact protocol with
//! GitHub's own client library (npm `@actions/artifact`, installed by
//! `.ci/setup-artifact-client.sh`), as actions/upload-artifact and actions/download-artifact do.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::action::{
    CHECKOUT_STAND_IN, act_bin, act_summary, copy_action, run_act, set_executable, task_field,
};
use crate::fake_github::FakeGitHub;
use crate::harness::{TestEnv, describe, hyperloop_bin, scripted_agent_bin};

const AGENT_SCRIPT: &str = r#"rules:
  - role: implementer
    actions:
      - implement_task: true
      - verdict: {verdict: pass, detail: "implemented"}
  - role: verifier
    actions:
      - verdict: {verdict: pass, detail: "looks right"}
"#;

/// Stands in for actions/upload-artifact: uploads every file under `path` as the artifact
/// `name`, with `@actions/artifact`, to the artifact server act runs. Like the real action it
/// fails on a missing path when asked to (`if-no-files-found: error`).
const UPLOAD_ACTION: &str = r#"name: upload-artifact stand-in
inputs:
  name:
    required: true
  path:
    required: true
  if-no-files-found:
    default: warn
  retention-days:
    default: ""
runs:
  using: composite
  steps:
    - shell: bash
      env:
        IN_NAME: ${{ inputs.name }}
        IN_PATH: ${{ inputs.path }}
        IN_IF_NO_FILES: ${{ inputs.if-no-files-found }}
      run: node "$GITHUB_ACTION_PATH/upload.js"
"#;

const UPLOAD_JS: &str = r#"const { DefaultArtifactClient } = require('@actions/artifact');
const fs = require('fs');
const path = require('path');
function files(dir) {
  if (!fs.existsSync(dir)) return [];
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? files(p) : [p];
  });
}
(async () => {
  const root = path.resolve(process.env.IN_PATH);
  const list = files(root);
  if (list.length === 0) {
    const msg = `No files were found with the provided path: ${process.env.IN_PATH}`;
    if (process.env.IN_IF_NO_FILES === 'error') throw new Error(msg);
    console.log(`::warning::${msg}`);
    return;
  }
  const r = await new DefaultArtifactClient().uploadArtifact(process.env.IN_NAME, list, root);
  console.log(`UPLOADED ${process.env.IN_NAME} id=${r.id} files=${list.length} bytes=${r.size}`);
})().catch((e) => { console.log(`::error::upload failed: ${e.stack || e}`); process.exit(1); });
"#;

/// Stands in for actions/download-artifact: every artifact of the run whose name matches
/// `pattern` (a `*` glob) goes into a folder of its own named after it under `path`, as the real
/// action lays out several artifacts without `merge-multiple`.
const DOWNLOAD_ACTION: &str = r#"name: download-artifact stand-in
inputs:
  pattern:
    default: ""
  path:
    default: "."
  merge-multiple:
    default: "false"
runs:
  using: composite
  steps:
    - shell: bash
      env:
        IN_PATTERN: ${{ inputs.pattern }}
        IN_PATH: ${{ inputs.path }}
        IN_MERGE: ${{ inputs.merge-multiple }}
      run: node "$GITHUB_ACTION_PATH/download.js"
"#;

const DOWNLOAD_JS: &str = r#"const { DefaultArtifactClient } = require('@actions/artifact');
const path = require('path');
(async () => {
  if (process.env.IN_MERGE !== 'false') throw new Error('this stand-in only lays artifacts out one folder each');
  const glob = new RegExp('^' + process.env.IN_PATTERN.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*') + '$');
  const client = new DefaultArtifactClient();
  const { artifacts } = await client.listArtifacts({ latest: true });
  const wanted = artifacts.filter((a) => glob.test(a.name));
  console.log(`Found ${wanted.length} artifact(s) matching ${process.env.IN_PATTERN}`);
  for (const a of wanted) {
    const r = await client.downloadArtifact(a.id, { path: path.join(process.env.IN_PATH, a.name) });
    console.log(`DOWNLOADED ${a.name} to ${r.downloadPath}`);
  }
})().catch((e) => { console.log(`::error::download failed: ${e.stack || e}`); process.exit(1); });
"#;

/// The artifact client's `node_modules`, or `None` (and a loud message) when it is missing.
fn artifact_client() -> Option<PathBuf> {
    let modules = crate::action::artifact_client().map(|dir| dir.join("node_modules"));
    let node = std::process::Command::new("node").arg("--version").output();
    if let Some(modules) = modules.filter(|_| node.is_ok_and(|o| o.status.success())) {
        Some(modules)
    } else {
        crate::harness::skip(
            "the artifact client (npm @actions/artifact) or node is not installed",
            ".ci/setup-artifact-client.sh",
        );
        None
    }
}

/// A port on 127.0.0.1 that nothing listens on right now, for act's artifact server.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn write_action(dir: &Path, action: &str, script: Option<(&str, &str)>) {
    std::fs::create_dir_all(dir).expect("action dir");
    std::fs::write(dir.join("action.yml"), action).expect("action.yml");
    if let Some((name, text)) = script {
        std::fs::write(dir.join(name), text).expect("script");
    }
}

/// Lines of the act log that a job printed, for jobs whose name starts with `job`.
fn job_lines<'a>(log: &'a str, job: &str) -> Vec<&'a str> {
    let tag = format!("[hyperloop fan-out/{job}");
    log.lines().filter(|l| l.starts_with(&tag)).collect()
}

/// `hyperloop init --fan-out`'s workflow, unmodified, twice through act in GitHub mode: two
/// independent tasks; the first run plans both implementers, runs each in a matrix job of its
/// own, records them and, since both verifiers are then ready, dispatches the next round through
/// the API; the second run (what that dispatch starts) verifies both and merges their pull
/// requests, leaving nothing ready and dispatching nothing. Only what a run pushed to origin and
/// what it passed as artifacts carries over.
#[test]
fn the_fan_out_workflow_runs_two_rounds_under_act() {
    let Some(act) = act_bin() else {
        return;
    };
    let Some(node_modules) = artifact_client() else {
        return;
    };
    let env = TestEnv::new();
    let repo = env.repo("workspace");
    let script = env.root().join("agent-script.yaml");
    std::fs::write(&script, AGENT_SCRIPT).expect("script");
    // Written before init, which keeps an existing configuration.
    repo.write(
        ".hyperloop.yaml",
        &format!(
            "runtime:\n  max_workers: 3\n  agent_command: [\"{}\", \"--script\", \"{}\"]\n  worker_timeout: 60\n  agent_env: [GIT_CONFIG_GLOBAL, GIT_CONFIG_NOSYSTEM]\nmerge:\n  checks: none\n",
            scripted_agent_bin().display(),
            script.display()
        ),
    );
    repo.write("specs/a.md", "# A\n\nTwo independent pieces.\n");
    for id in ["task-001", "task-002"] {
        repo.write(
            &format!("specs/tasks/{id}.md"),
            &format!(
                "---\nid: {id}\ntitle: Task {id}\nspec_ref: specs/a.md\nstatus: not-started\nphase: null\ndeps: []\nround: 0\nbranch: null\npr: null\n---\nImplement {id}.\n"
            ),
        );
    }
    let report = hyperloop::init::init_with(&repo.path, &hyperloop::init::InitOptions { fan_out: true })
        .expect("init");
    assert!(
        report
            .written
            .contains(&hyperloop::init::FANOUT_WORKFLOW_PATH.to_string()),
        "{report}"
    );
    assert!(!repo.path.join(hyperloop::init::WORKFLOW_PATH).exists());
    let workflow_file = hyperloop::init::FANOUT_WORKFLOW_PATH;
    let workflow = std::fs::read_to_string(repo.path.join(workflow_file)).expect("workflow");
    assert!(workflow.contains("max-parallel: 3"), "{workflow}");
    env.git(&repo.path, &["add", "-A"]);
    env.git(
        &repo.path,
        &["commit", "-qm", "hyperloop init --fan-out, two tasks"],
    );
    env.git(&repo.path, &["push", "-q", "origin", "main"]);
    let gh = FakeGitHub::start(&repo.origin, "acme", "widgets");

    let actions = env.root().join("actions");
    let checkout = actions.join("checkout");
    write_action(&checkout, CHECKOUT_STAND_IN, None);
    let upload = actions.join("upload-artifact");
    write_action(&upload, UPLOAD_ACTION, Some(("upload.js", UPLOAD_JS)));
    let download = actions.join("download-artifact");
    write_action(&download, DOWNLOAD_ACTION, Some(("download.js", DOWNLOAD_JS)));
    let hyperloop_action = actions.join("hyperloop");
    copy_action(&hyperloop_action);
    let stubs = env.root().join("stubs");
    std::fs::create_dir_all(&stubs).expect("stubs");
    std::fs::write(stubs.join("claude"), "#!/bin/sh\necho '2.1.197 (Claude Code)'\n").expect("claude stub");
    set_executable(&stubs.join("claude"));

    let mut args: Vec<String> = vec!["-W".into(), workflow_file.into()];
    let mut served = Vec::new();
    for uses in workflow
        .lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("uses: "))
        .filter_map(|u| u.split_whitespace().next())
    {
        let local = if uses.starts_with("actions/checkout@") {
            &checkout
        } else if uses.starts_with("actions/upload-artifact@") {
            &upload
        } else if uses.starts_with("actions/download-artifact@") {
            &download
        } else if uses.starts_with("hyperloop-dev/hyperloop@") {
            &hyperloop_action
        } else {
            panic!("no local stand-in for `{uses}`, which act cannot fetch offline");
        };
        if !served.contains(&uses) {
            served.push(uses);
            args.extend(["--local-repository".into(), format!("{uses}={}", local.display())]);
        }
    }
    let bin_dir = hyperloop_bin().parent().expect("bin dir").to_path_buf();
    let event = env.root().join("dispatch.json");
    let payload = serde_json::json!({
        "inputs": {},
        "ref": "refs/heads/main",
        "repository": {
            "full_name": "acme/widgets",
            "name": "widgets",
            "owner": { "login": "acme" },
            "default_branch": "main"
        }
    });
    std::fs::write(&event, payload.to_string()).expect("event");
    args.extend([
        "-e".into(),
        event.display().to_string(),
        "--env".into(),
        format!("GITHUB_API_URL={}", gh.url),
        "--env".into(),
        format!("GITHUB_GRAPHQL_URL={}/graphql", gh.url),
        "--env".into(),
        "GITHUB_REPOSITORY=acme/widgets".into(),
        "-s".into(),
        format!("GITHUB_TOKEN={}", gh.token),
        "-s".into(),
        "ANTHROPIC_API_KEY=sk-test-not-a-real-key-9012".into(),
        "--env".into(),
        format!("HYPERLOOP_TEST_ORIGIN={}", repo.origin.display()),
        "--env".into(),
        format!("HYPERLOOP_BIN_DIR={}", bin_dir.display()),
        "--env".into(),
        format!("NODE_PATH={}", node_modules.display()),
        "--artifact-server-addr".into(),
        "127.0.0.1".into(),
    ]);
    // Each run gets an artifact store of its own, as each workflow run has on GitHub.
    let round = |n: u32| {
        let mut all = args.clone();
        all.extend([
            "--artifact-server-path".into(),
            env.root().join(format!("artifacts-{n}")).display().to_string(),
            "--artifact-server-port".into(),
            free_port().to_string(),
        ]);
        run_act(&env, &act, &repo.path, "workflow_dispatch", &all, Some(&stubs))
    };

    // Round one: both implementers, each in a work job of its own.
    let (out, log) = round(1);
    assert_eq!(out.status.code(), Some(0), "{}\n{log}", describe(&out));
    let work = job_lines(&log, "work");
    let uploaded: Vec<&str> = work
        .iter()
        .filter(|l| l.contains("UPLOADED hyperloop-output-"))
        .copied()
        .collect();
    assert_eq!(uploaded.len(), 2, "one artifact per item:\n{log}");
    for id in ["task-001", "task-002"] {
        assert!(
            uploaded
                .iter()
                .any(|l| l.contains(&format!("hyperloop-output-{id}-implementer-r0-"))),
            "{id}'s implementer output uploaded:\n{log}"
        );
    }
    // `work` runs without the forge: no --repo, and hyperloop got no token.
    assert!(
        work.iter().any(|l| l.contains("hyperloop --path . work task-00")),
        "{log}"
    );
    assert!(!work.iter().any(|l| l.contains("--repo")), "{log}");
    let record = job_lines(&log, "record");
    assert_eq!(
        record
            .iter()
            .filter(|l| l.contains("DOWNLOADED hyperloop-output-"))
            .count(),
        2,
        "{log}"
    );
    for id in ["task-001", "task-002"] {
        let task = env.git(&repo.origin, &["show", &format!("main:specs/tasks/{id}.md")]);
        assert_eq!(task_field(&task, "phase"), Some("verifier"), "{task}");
        assert_eq!(task_field(&task, "status"), Some("in-progress"), "{task}");
        assert!(!task.contains("\nclaim:"), "the lease was released: {task}");
        assert!(task_field(&task, "pr").is_some_and(|p| p != "null"), "{task}");
    }
    assert_eq!(gh.pr_count(), 2);
    assert_eq!(
        gh.dispatches(),
        vec![("hyperloop-fanout.yml".to_string(), "main".to_string())],
        "two verifiers were ready: the next round was started through the API"
    );
    assert!(
        !log.contains(&gh.token) && !log.contains("sk-test-not-a-real-key-9012"),
        "secrets are masked:\n{log}"
    );

    // Round two, as the dispatch starts it: both verifiers, then both merges.
    let (out, log) = round(2);
    assert_eq!(out.status.code(), Some(0), "{}\n{log}", describe(&out));
    let work = job_lines(&log, "work");
    for id in ["task-001", "task-002"] {
        assert!(
            work.iter()
                .any(|l| l.contains(&format!("UPLOADED hyperloop-output-{id}-verifier-r0-"))),
            "{id}'s verifier output uploaded:\n{log}"
        );
    }
    let files = env.git(&repo.origin, &["ls-tree", "-r", "--name-only", "main"]);
    for id in ["task-001", "task-002"] {
        let task = env.git(&repo.origin, &["show", &format!("main:specs/tasks/{id}.md")]);
        assert_eq!(task_field(&task, "status"), Some("complete"), "{task}");
        let number: u64 = task_field(&task, "pr")
            .and_then(|u| u.rsplit('/').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no PR in {task}"));
        assert_eq!(gh.pr_json(number)["merged"], Value::Bool(true), "{id}");
        assert!(
            files.contains(&format!("impl/{id}.md")),
            "{id}'s work reached main: {files}"
        );
    }
    assert_eq!(
        gh.dispatches().len(),
        1,
        "nothing was ready after the merges: no new round"
    );
    let summary = act_summary(&log);
    assert!(summary.contains("| ✅ complete |"), "{log}");

    // A third run finds nothing to do: plan claims nothing, and neither work nor record runs.
    let (out, log) = round(3);
    assert_eq!(out.status.code(), Some(0), "{}\n{log}", describe(&out));
    assert!(!job_lines(&log, "plan").is_empty(), "{log}");
    assert!(
        job_lines(&log, "work")
            .iter()
            .all(|l| !l.contains("hyperloop --path")),
        "{log}"
    );
    assert!(
        job_lines(&log, "record")
            .iter()
            .all(|l| !l.contains("hyperloop --path")),
        "{log}"
    );
    assert_eq!(gh.dispatches().len(), 1);
}
