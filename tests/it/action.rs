//! The GitHub Action: the binary's outputs, job summary and annotations under
//! `GITHUB_ACTIONS=true`; `scripts/install.sh` (release download with checksum check, the
//! build-from-source fallback, the prebuilt escape hatch); and the whole composite action run by
//! `act` on this host with the scripted agent: in local mode, in GitHub mode against the fake
//! GitHub on 127.0.0.1, and as the workflow `hyperloop init` writes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::fake_github::FakeGitHub;
use crate::harness::{
    GATED_PROCESS, PROCESS_OVERLAY_KUSTOMIZATION, TestEnv, TestRepo, describe, hyperloop_bin,
    scripted_agent_bin,
};

/// The `anthropic-api-key` the action tests give the action.
const API_KEY: &str = "sk-test-not-a-real-key-1234";

const AGENT_SCRIPT: &str = r#"rules:
  - role: pm
    actions:
      - pm_tasks_from_specs: true
      - verdict: {verdict: pass, detail: "tasks written"}
  - role: implementer
    actions:
      - implement_task: true
      - verdict: {verdict: pass, detail: "implemented"}
  - role: verifier
    actions:
      - verdict: {verdict: pass, detail: "looks right"}
  - role: rebase-resolver
    actions:
      - verdict: {verdict: pass, detail: "nothing to resolve"}
  - role: process-improver
    actions:
      - verdict: {verdict: pass, detail: "nothing to improve"}
"#;

fn source_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A repository with two specs and a configuration that runs the scripted agent.
fn demo_repo(env: &TestEnv, name: &str) -> TestRepo {
    let repo = env.repo(name);
    let script = env.root().join("agent-script.yaml");
    std::fs::write(&script, AGENT_SCRIPT).expect("script");
    repo.write(
        ".hyperloop.yaml",
        &format!(
            "runtime:\n  max_workers: 2\n  agent_command: [\"{}\", \"--script\", \"{}\"]\n  worker_timeout: 60\n  agent_env: [GIT_CONFIG_GLOBAL, GIT_CONFIG_NOSYSTEM]\npoll_interval: 0\nmax_cycles: 5\n",
            scripted_agent_bin().display(),
            script.display()
        ),
    );
    repo.write("specs/greeting.md", "# Greeting\n\nPrint a greeting.\n");
    repo.write("specs/farewell.md", "# Farewell\n\nPrint a farewell.\n");
    env.git(&repo.path, &["add", "-A"]);
    env.git(&repo.path, &["commit", "-qm", "specs"]);
    repo
}

/// `KEY=value` and `KEY<<DELIM … DELIM` entries of a `$GITHUB_OUTPUT` file.
fn parse_output_file(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some((k, delim)) = line.split_once("<<") {
            let mut value = Vec::new();
            for l in lines.by_ref() {
                if l == delim {
                    break;
                }
                value.push(l);
            }
            out.push((k.to_string(), value.join("\n")));
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no output {key} in {pairs:?}"))
}

#[test]
fn a_step_in_actions_writes_outputs_and_a_summary() {
    let env = TestEnv::new();
    let repo = demo_repo(&env, "project");
    let output = env.root().join("github_output");
    let summary = env.root().join("step_summary");
    // The runner creates both files; hyperloop appends.
    std::fs::write(&output, "earlier=kept\n").expect("output file");
    std::fs::write(&summary, "").expect("summary file");
    let out = env
        .command(hyperloop_bin())
        .args(["--path", repo.path_str(), "step", "--json"])
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_OUTPUT", &output)
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("GITHUB_WORKSPACE", &repo.path)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout stays pure JSON");

    let pairs = parse_output_file(&std::fs::read_to_string(&output).expect("output"));
    assert_eq!(get(&pairs, "earlier"), "kept", "appends, never truncates");
    assert_eq!(get(&pairs, "tasks-total"), "2");
    assert_eq!(get(&pairs, "tasks-complete"), "2");
    assert_eq!(get(&pairs, "tasks-failed"), "0");
    assert_eq!(get(&pairs, "merged"), "2");
    assert_eq!(get(&pairs, "work-remaining"), "false");
    assert_eq!(get(&pairs, "progress"), "all-complete");
    assert_eq!(
        get(&pairs, "spawned"),
        report["spawned"].as_array().expect("spawned").len().to_string()
    );
    let from_output: serde_json::Value = serde_json::from_str(get(&pairs, "report")).expect("report JSON");
    assert_eq!(from_output["merged"], report["merged"]);

    let md = std::fs::read_to_string(&summary).expect("summary");
    assert!(
        md.contains("| Task | Title | Status | Phase | Round | PR | Cost |"),
        "{md}"
    );
    assert_eq!(md.matches("| ✅ complete |").count(), 2, "{md}");
    assert!(md.contains("```mermaid\ngraph TD\n"), "{md}");
    assert!(md.contains("Intake ran"), "{md}");
}

#[test]
fn outside_actions_nothing_is_written() {
    let env = TestEnv::new();
    let repo = demo_repo(&env, "project");
    let output = env.root().join("github_output");
    let out = env
        .command(hyperloop_bin())
        .args(["--path", repo.path_str(), "step"])
        .env("GITHUB_OUTPUT", &output)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(!output.exists(), "GITHUB_ACTIONS is not true: no outputs file");
}

#[test]
fn bad_config_is_annotated_on_its_line() {
    let env = TestEnv::new();
    let repo = env.repo("project");
    repo.write(".hyperloop.yaml", "runtime:\n  max_workers: [\n");
    env.git(&repo.path, &["add", "-A"]);
    env.git(&repo.path, &["commit", "-qm", "a broken configuration"]);
    let run = |actions: bool| {
        let mut cmd = env.command(hyperloop_bin());
        cmd.args(["--path", repo.path_str(), "status"])
            .env("GITHUB_WORKSPACE", &repo.path);
        if actions {
            cmd.env("GITHUB_ACTIONS", "true");
        }
        cmd.output().expect("runs")
    };
    let out = run(true);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("::error file=.hyperloop.yaml,line=2,col=16,"),
        "{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error: "),
        "{}",
        describe(&out)
    );

    let out = run(false);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        out.stdout.is_empty(),
        "no annotation outside Actions: {}",
        describe(&out)
    );
}

// ---- scripts/install.sh ----------------------------------------------------------------------

/// The release asset name install.sh looks for on this machine.
fn this_target() -> String {
    let arch = std::env::consts::ARCH;
    match std::env::consts::OS {
        "macos" => format!("{arch}-apple-darwin"),
        _ => format!("{arch}-unknown-linux-musl"),
    }
}

struct Install {
    env: TestEnv,
    github_path: PathBuf,
    install_dir: PathBuf,
}

impl Install {
    fn new() -> Install {
        let env = TestEnv::new();
        let github_path = env.root().join("github_path");
        std::fs::write(&github_path, "").expect("github_path");
        let install_dir = env.root().join("tool/bin");
        Install {
            env,
            github_path,
            install_dir,
        }
    }

    fn run(&self, vars: &[(&str, &str)]) -> Output {
        let mut cmd = self.env.command("bash");
        cmd.arg(source_root().join("scripts/install.sh"))
            .env("GITHUB_PATH", &self.github_path)
            .env("HYPERLOOP_INSTALL_DIR", &self.install_dir)
            .env("GITHUB_ACTION_PATH", source_root());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        cmd.output().expect("bash runs")
    }

    fn github_path(&self) -> String {
        std::fs::read_to_string(&self.github_path).expect("github_path")
    }

    /// A release `tag` under a file:// URL holding a fake hyperloop and a SHA256SUMS file;
    /// `corrupt` makes the checksum disagree with the asset.
    fn release(&self, tag: &str, corrupt: bool) -> String {
        let root = self.env.root().join("releases");
        let dir = root.join("download").join(tag);
        let stage = self.env.root().join("stage");
        std::fs::create_dir_all(&dir).expect("release dir");
        std::fs::create_dir_all(&stage).expect("stage");
        let bin = stage.join("hyperloop");
        std::fs::write(&bin, format!("#!/bin/sh\necho \"hyperloop {tag}\"\n")).expect("fake bin");
        set_executable(&bin);
        let asset = format!("hyperloop-{}.tar.gz", this_target());
        let ok = Command::new("tar")
            .args(["-czf"])
            .arg(dir.join(&asset))
            .args(["-C"])
            .arg(&stage)
            .arg("hyperloop")
            .status()
            .expect("tar");
        assert!(ok.success());
        let sum = Command::new("sha256sum")
            .arg(&asset)
            .current_dir(&dir)
            .output()
            .expect("sha256sum");
        let mut sums = String::from_utf8_lossy(&sum.stdout).to_string();
        if corrupt {
            sums = format!("{}{}", "0".repeat(64), &sums[64..]);
        }
        std::fs::write(
            dir.join("SHA256SUMS"),
            format!("{}  hyperloop-other.tar.gz\n{sums}", "1".repeat(64)),
        )
        .expect("sums");
        format!("file://{}", root.display())
    }
}

pub(crate) fn set_executable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn install_uses_a_release_binary_whose_checksum_matches() {
    let i = Install::new();
    let url = i.release("v9.8.7", false);
    let out = i.run(&[
        ("HYPERLOOP_RELEASE_URL", &url),
        ("HYPERLOOP_ACTION_REF", "v9.8.7"),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("matches SHA256SUMS"),
        "{}",
        describe(&out)
    );
    assert_eq!(i.github_path(), format!("{}\n", i.install_dir.display()));
    let v = Command::new(i.install_dir.join("hyperloop"))
        .arg("--version")
        .output()
        .expect("runs");
    assert_eq!(String::from_utf8_lossy(&v.stdout), "hyperloop v9.8.7\n");
}

#[test]
fn install_refuses_a_binary_whose_checksum_differs() {
    let i = Install::new();
    let url = i.release("v9.8.7", true);
    let out = i.run(&[("HYPERLOOP_RELEASE_URL", &url), ("HYPERLOOP_VERSION", "v9.8.7")]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("::error title=hyperloop install::checksum mismatch"),
        "{}",
        describe(&out)
    );
    assert!(!i.install_dir.join("hyperloop").exists(), "nothing installed");
    assert_eq!(i.github_path(), "");
}

#[test]
fn install_builds_from_source_when_there_is_no_release_binary() {
    let i = Install::new();
    let url = i.release("v9.8.7", false);
    // A stand-in cargo that records its arguments and "installs" a binary where it was told to.
    let fake = i.env.root().join("fakebin");
    std::fs::create_dir_all(&fake).expect("fakebin");
    let log = i.env.root().join("cargo-args");
    std::fs::write(
        fake.join("cargo"),
        format!(
            "#!/bin/sh\necho \"$@\" > '{}'\nwhile [ $# -gt 0 ]; do [ \"$1\" = --root ] && root=\"$2\"; shift; done\nmkdir -p \"$root/bin\"\nprintf '#!/bin/sh\\necho hyperloop built\\n' > \"$root/bin/hyperloop\"\nchmod +x \"$root/bin/hyperloop\"\n",
            log.display()
        ),
    )
    .expect("fake cargo");
    set_executable(&fake.join("cargo"));
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap_or_default());
    // No such release: v0.0.1 has no assets.
    let out = i.run(&[
        ("HYPERLOOP_RELEASE_URL", &url),
        ("HYPERLOOP_VERSION", "v0.0.1"),
        ("PATH", &path),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let args = std::fs::read_to_string(&log).expect("cargo ran");
    assert_eq!(
        args.trim(),
        format!(
            "install --path {} --locked --root {} --bin hyperloop",
            source_root().display(),
            i.install_dir.parent().expect("parent").display()
        )
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("::notice title=hyperloop install::"));
    assert_eq!(i.github_path(), format!("{}\n", i.install_dir.display()));
}

#[test]
fn install_local_uses_the_given_binaries() {
    let i = Install::new();
    let dir = hyperloop_bin().parent().expect("bin dir").display().to_string();
    let out = i.run(&[("HYPERLOOP_VERSION", "local"), ("HYPERLOOP_BIN_DIR", &dir)]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(i.github_path(), format!("{dir}\n"));
    let out = i.run(&[
        ("HYPERLOOP_VERSION", "local"),
        ("HYPERLOOP_BIN_DIR", "/nonexistent"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

// ---- the composite action under act ----------------------------------------------------------

/// `act` from the tools cache, or `None` (and a loud message) when it is not installed.
pub(crate) fn act_bin() -> Option<PathBuf> {
    let cache = std::env::var_os("HYPERLOOP_TEST_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hyperloop-test")))?;
    let act = cache.join("actions/bin/act");
    if act.is_file() {
        Some(act)
    } else {
        crate::harness::skip("act is not installed", ".ci/setup-action-tools.sh");
        None
    }
}

/// The action's files, as a checkout of this repository holds them, copied into `to`.
pub(crate) fn copy_action(to: &Path) {
    std::fs::create_dir_all(to.join("scripts")).expect("scripts");
    std::fs::copy(source_root().join("action.yml"), to.join("action.yml")).expect("action.yml");
    for entry in std::fs::read_dir(source_root().join("scripts")).expect("scripts") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join("scripts").join(entry.file_name())).expect("copy");
    }
}

/// A workflow whose first step stands in for actions/checkout, then runs the action from the
/// workspace (`uses: ./`) with the inputs in `with`, then prints every output on a line of its
/// own so that the act log shows what a later step of a real workflow would read. `api_key` is the
/// `anthropic-api-key` input's value (an expression is fine).
pub(crate) fn action_workflow(checkout: &str, api_key: &str, with: &str) -> String {
    format!(
        r#"name: action-test
on: workflow_dispatch
jobs:
  step:
    runs-on: ubuntu-latest
    steps:
      # act cannot fetch actions/checkout offline.
      - name: Check out
        if: ${{{{ env.ACT }}}}
        run: {checkout}
      - id: hyperloop
        uses: ./
        with:
          version: local
          install-claude: false
          anthropic-api-key: {api_key}
          log-format: json
{with}
      - name: Show the outputs
        env:
          TOTAL: ${{{{ steps.hyperloop.outputs.tasks-total }}}}
          COMPLETE: ${{{{ steps.hyperloop.outputs.tasks-complete }}}}
          FAILED: ${{{{ steps.hyperloop.outputs.tasks-failed }}}}
          SPAWNED: ${{{{ steps.hyperloop.outputs.spawned }}}}
          MERGED: ${{{{ steps.hyperloop.outputs.merged }}}}
          REMAINING: ${{{{ steps.hyperloop.outputs.work-remaining }}}}
          PROGRESS: ${{{{ steps.hyperloop.outputs.progress }}}}
        run: |
          echo "OUTPUT tasks-total=$TOTAL"
          echo "OUTPUT tasks-complete=$COMPLETE"
          echo "OUTPUT tasks-failed=$FAILED"
          echo "OUTPUT spawned=$SPAWNED"
          echo "OUTPUT merged=$MERGED"
          echo "OUTPUT work-remaining=$REMAINING"
          echo "OUTPUT progress=$PROGRESS"
          echo "MAIN $(git log --format=%s -n 1 main)"
"#
    )
}

/// `act EVENT` in `workdir` on this host (no Docker), offline, with `extra` arguments and the
/// directory `bin_first` (if any) put first on PATH; returns its output and its log (standard
/// output, where act prints the steps' lines).
pub(crate) fn run_act(
    env: &TestEnv,
    act: &Path,
    workdir: &Path,
    event: &str,
    extra: &[String],
    bin_first: Option<&Path>,
) -> (Output, String) {
    let out = act_command(env, act, workdir, event, extra, bin_first)
        .output()
        .expect("act runs");
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    (out, log)
}

/// The command [`run_act`] runs, for callers that need to change how it runs (its user).
pub(crate) fn act_command(
    env: &TestEnv,
    act: &Path,
    workdir: &Path,
    event: &str,
    extra: &[String],
    bin_first: Option<&Path>,
) -> Command {
    let mut cmd = env.command(act);
    if let Some(dir) = bin_first {
        let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
        cmd.env("PATH", path);
    }
    cmd.current_dir(workdir)
        .arg(event)
        .args([
            "-P",
            "ubuntu-latest=-self-hosted",
            "--action-offline-mode",
            "--no-cache-server",
        ])
        .arg("--action-cache-path")
        .arg(env.root().join("act-cache"))
        .args(extra);
    cmd
}

/// The value a "Show the outputs" step printed for `key`.
pub(crate) fn act_output<'a>(log: &'a str, key: &str) -> &'a str {
    let marker = format!("| OUTPUT {key}=");
    log.lines()
        .find_map(|l| l.split_once(&marker).map(|(_, v)| v.trim_end()))
        .unwrap_or_else(|| panic!("no output {key} in:\n{log}"))
}

/// The job summary, which act prints after the step that wrote it.
pub(crate) fn act_summary(log: &str) -> &str {
    log.split_once("Summary - ")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no job summary in:\n{log}"))
}

/// `actions/upload-artifact@<sha>` as `action.yml` pins it: the stand-ins are served under this.
pub(crate) fn upload_artifact_uses() -> String {
    let action = std::fs::read_to_string(source_root().join("action.yml")).expect("action.yml");
    action
        .lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("uses: "))
        .filter_map(|u| u.split_whitespace().next())
        .find(|u| u.starts_with("actions/upload-artifact@"))
        .expect("action.yml uploads with actions/upload-artifact")
        .to_string()
}

/// Stands in for actions/upload-artifact under act, which cannot fetch it offline: the same
/// inputs and outputs, and the same upload, through GitHub's artifact client (the library the
/// real action is built on, from `.ci/setup-artifact-client.sh`) to act's artifact server.
const UPLOAD_STAND_IN: &str = r#"name: upload-artifact stand-in
inputs:
  name:
    default: artifact
  path:
    required: true
  if-no-files-found:
    default: warn
outputs:
  artifact-id:
    description: the artifact's id
  artifact-url:
    description: where the artifact can be downloaded
runs:
  using: node20
  main: index.js
"#;

const UPLOAD_STAND_IN_JS: &str = r#"const fs = require('fs');
const path = require('path');
const artifact = require(path.join(process.env.HYPERLOOP_ARTIFACT_CLIENT, 'node_modules/@actions/artifact'));
const input = (name) => (process.env[`INPUT_${name.toUpperCase()}`] || '').trim();
const files = (dir) => !fs.existsSync(dir) ? [] : fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
  const p = path.join(dir, e.name);
  return e.isDirectory() ? files(p) : e.isFile() ? [p] : [];
});
async function main() {
  const root = path.resolve(input('path'));
  const found = files(root);
  if (found.length === 0) {
    const how = input('if-no-files-found') || 'warn';
    if (how === 'error') throw new Error(`no files in ${root}`);
    console.log(`${how === 'warn' ? '::warning::' : ''}no files in ${root}: nothing uploaded`);
    return;
  }
  const { id, size } = await new artifact.DefaultArtifactClient().uploadArtifact(input('name'), found, root, {});
  const env = process.env;
  const url = `${env.GITHUB_SERVER_URL}/${env.GITHUB_REPOSITORY}/actions/runs/${env.GITHUB_RUN_ID}/artifacts/${id}`;
  fs.appendFileSync(env.GITHUB_OUTPUT, `artifact-id=${id}\nartifact-url=${url}\n`);
  console.log(`UPLOADED ${found.length} files, ${size} bytes, artifact ${id}`);
}
main().catch((e) => { console.log(`::error::${e.stack || e}`); process.exit(1); });
"#;

/// For tests about something else than artifacts where GitHub's artifact client cannot run (no
/// install, or act running as a user who cannot read the test cache): keeps the folder in
/// `$HYPERLOOP_TEST_UPLOADS/<name>` and says so. This is not an upload.
const KEEP_STAND_IN: &str = r#"name: upload-artifact stand-in that keeps the folder
inputs:
  name:
    default: artifact
  path:
    required: true
  if-no-files-found:
    default: warn
outputs:
  artifact-url:
    description: none; nothing is uploaded
    value: ""
runs:
  using: composite
  steps:
    - shell: bash
      env:
        NAME: ${{ inputs.name }}
        FROM: ${{ inputs.path }}
      run: |
        mkdir -p "$HYPERLOOP_TEST_UPLOADS/$NAME"
        if [ -d "$FROM" ]; then cp -a "$FROM/." "$HYPERLOOP_TEST_UPLOADS/$NAME/"; fi
        echo "KEPT $NAME (not uploaded)"
"#;

/// Where the artifact client is installed, or `None`.
pub(crate) fn artifact_client() -> Option<PathBuf> {
    let cache = std::env::var_os("HYPERLOOP_TEST_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hyperloop-test")))?;
    let dir = cache.join("artifact-client");
    dir.join("node_modules/@actions/artifact/package.json")
        .is_file()
        .then_some(dir)
}

/// act's artifact server, with the stand-in that uploads to it.
pub(crate) struct ArtifactServer {
    /// Where act's server stores what is uploaded: `<run>/<name>/<name>.zip`.
    pub(crate) store: PathBuf,
    /// act's arguments for the server and the stand-in.
    pub(crate) args: Vec<String>,
}

/// act's artifact server on a free loopback port and [`UPLOAD_STAND_IN`]; `None` (and a loud
/// message) when the artifact client is not installed.
pub(crate) fn artifact_server(env: &TestEnv) -> Option<ArtifactServer> {
    let Some(client) = artifact_client() else {
        crate::harness::skip(
            "GitHub's artifact client (npm @actions/artifact) is not installed",
            ".ci/setup-artifact-client.sh",
        );
        return None;
    };
    let dir = env.root().join("upload-artifact-action");
    std::fs::create_dir_all(&dir).expect("stand-in dir");
    std::fs::write(dir.join("action.yml"), UPLOAD_STAND_IN).expect("action.yml");
    std::fs::write(dir.join("index.js"), UPLOAD_STAND_IN_JS).expect("index.js");
    let store = env.root().join("artifacts");
    std::fs::create_dir_all(&store).expect("store");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let args = vec![
        "--local-repository".into(),
        format!("{}={}", upload_artifact_uses(), dir.display()),
        "--artifact-server-path".into(),
        store.display().to_string(),
        "--artifact-server-addr".into(),
        "127.0.0.1".into(),
        "--artifact-server-port".into(),
        port.to_string(),
        "--env".into(),
        format!("HYPERLOOP_ARTIFACT_CLIENT={}", client.display()),
    ];
    Some(ArtifactServer { store, args })
}

/// act's arguments that serve [`KEEP_STAND_IN`], keeping what would be uploaded in `into`.
pub(crate) fn keeping_upload(env: &TestEnv, into: &Path) -> Vec<String> {
    let dir = env.root().join("keep-artifact-action");
    std::fs::create_dir_all(&dir).expect("stand-in dir");
    std::fs::write(dir.join("action.yml"), KEEP_STAND_IN).expect("action.yml");
    vec![
        "--local-repository".into(),
        format!("{}={}", upload_artifact_uses(), dir.display()),
        "--env".into(),
        format!("HYPERLOOP_TEST_UPLOADS={}", into.display()),
    ]
}

/// The upload step's arguments for a test about something else: the real upload when the client
/// is installed, else the folder kept.
fn any_upload(env: &TestEnv) -> Vec<String> {
    match artifact_client() {
        Some(_) => artifact_server(env).map(|s| s.args).unwrap_or_default(),
        None => keeping_upload(env, &env.root().join("kept")),
    }
}

/// Every file act's artifact server stored, unzipped: (artifact name, path inside, contents).
fn stored_artifacts(store: &Path) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![store.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read store").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "zip") {
                let name = path
                    .file_stem()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                let unpacked = store.with_extension("unzipped").join(&name);
                let ok = Command::new("python3")
                    .args(["-m", "zipfile", "-e"])
                    .arg(&path)
                    .arg(&unpacked)
                    .status()
                    .expect("python3 runs");
                assert!(ok.success(), "unzip {}", path.display());
                let mut files = vec![unpacked.clone()];
                while let Some(d) = files.pop() {
                    for f in std::fs::read_dir(&d).expect("read").flatten() {
                        let p = f.path();
                        if p.is_dir() {
                            files.push(p);
                        } else {
                            let inside = p.strip_prefix(&unpacked).expect("inside").display().to_string();
                            let text =
                                String::from_utf8_lossy(&std::fs::read(&p).expect("read")).into_owned();
                            out.push((name.clone(), inside, text));
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_action_runs_a_step_under_act() {
    let Some(act) = act_bin() else {
        return;
    };
    let env = TestEnv::new();
    let repo = demo_repo(&env, "workspace");
    copy_action(&repo.path);
    // Local mode: under act `github.repository` is the origin's path, which is no OWNER/REPO.
    repo.write(
        ".github/workflows/test.yml",
        &action_workflow(
            r#"cp -a "$HYPERLOOP_TEST_SOURCE/." ."#,
            API_KEY,
            "          repo: \"\"",
        ),
    );
    env.git(&repo.path, &["add", "-A"]);
    env.git(&repo.path, &["commit", "-qm", "the action and a workflow"]);

    let bin_dir = hyperloop_bin().parent().expect("bin dir").to_path_buf();
    let (out, log) = run_act(
        &env,
        &act,
        &repo.path,
        "workflow_dispatch",
        &[
            "-W".into(),
            ".github/workflows/test.yml".into(),
            "--env".into(),
            format!("HYPERLOOP_TEST_SOURCE={}", repo.path.display()),
            "--env".into(),
            format!("HYPERLOOP_BIN_DIR={}", bin_dir.display()),
        ]
        .into_iter()
        .chain(any_upload(&env))
        .collect::<Vec<_>>(),
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for (key, want) in [
        ("tasks-total", "2"),
        ("tasks-complete", "2"),
        ("tasks-failed", "0"),
        ("spawned", "5"),
        ("merged", "2"),
        ("work-remaining", "false"),
        ("progress", "all-complete"),
    ] {
        assert_eq!(act_output(&log, key), want, "{key} in:\n{log}");
    }
    assert!(log.contains("(task-00"), "{log}");
    let summary = act_summary(&log);
    assert!(
        summary.contains("| Task | Title | Status | Phase | Round | PR | Cost |"),
        "{log}"
    );
    assert!(
        summary.contains("```mermaid\n") && summary.contains("graph TD"),
        "{log}"
    );
    assert!(summary.contains(":::complete"), "{log}");
    assert!(!log.contains(API_KEY), "the API key is masked:\n{log}");
}

/// The action uploads the agents' transcripts as an artifact of the run, through act's own
/// artifact server (the upload step is [`UPLOAD_STAND_IN`], which speaks the artifact protocol
/// with GitHub's client): the implementer prints the job's token, its own API key and a
/// GitHub-token-shaped string into its transcript, and the artifact holds the transcript with
/// none of them. The job summary names the tasks whose transcripts are there and links the run's
/// artifacts and the artifact itself.
#[test]
fn the_action_uploads_redacted_transcripts_under_act() {
    let Some(act) = act_bin() else {
        return;
    };
    let env = TestEnv::new();
    let Some(server) = artifact_server(&env) else {
        return;
    };
    let token = "canary-job-token-0123456789abcdef";
    let api_key = "sk-test-canary-api-key-9876543210";
    let shaped = "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789";
    let script = AGENT_SCRIPT.replace(
        "      - implement_task: true\n",
        &format!(
            "      - implement_task: true\n      - print: \"TRANSCRIPT-MARK token={token} key=${{ANTHROPIC_API_KEY}} found={shaped}\"\n      - print: '{{\"type\":\"assistant\",\"text\":\"the key is \\\"${{ANTHROPIC_API_KEY}}\\\"\\n\"}}'\n"
        ),
    );
    let repo = demo_repo(&env, "workspace");
    std::fs::write(env.root().join("agent-script.yaml"), script).expect("script");
    copy_action(&repo.path);
    repo.write(
        ".github/workflows/test.yml",
        &action_workflow(
            r#"cp -a "$HYPERLOOP_TEST_SOURCE/." ."#,
            api_key,
            "          repo: \"\"",
        ),
    );
    env.git(&repo.path, &["add", "-A"]);
    env.git(&repo.path, &["commit", "-qm", "the action and a workflow"]);
    let bin_dir = hyperloop_bin().parent().expect("bin dir").to_path_buf();
    let mut args: Vec<String> = vec![
        "-W".into(),
        ".github/workflows/test.yml".into(),
        "--env".into(),
        format!("HYPERLOOP_TEST_SOURCE={}", repo.path.display()),
        "--env".into(),
        format!("HYPERLOOP_BIN_DIR={}", bin_dir.display()),
        "--env".into(),
        "GITHUB_REPOSITORY=acme/widgets".into(),
        "--env".into(),
        "GITHUB_RUN_ID=4242".into(),
        "-s".into(),
        format!("GITHUB_TOKEN={token}"),
    ];
    args.extend(server.args.clone());
    let (out, log) = run_act(&env, &act, &repo.path, "workflow_dispatch", &args, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(act_output(&log, "tasks-complete"), "2", "{log}");
    assert!(log.contains("UPLOADED "), "the stand-in uploaded:\n{log}");

    let stored = stored_artifacts(&server.store);
    let names: Vec<&str> = stored.iter().map(|(n, _, _)| n.as_str()).collect();
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("hyperloop-transcripts-step-4242-1-")),
        "{names:?}"
    );
    let implementer: Vec<&(String, String, String)> = stored
        .iter()
        .filter(|(_, path, _)| path.starts_with("task-00") && path.contains("implementer-round-0"))
        .collect();
    assert_eq!(implementer.len(), 2, "one per task: {stored:?}");
    for (_, path, text) in &implementer {
        assert!(
            text.contains("TRANSCRIPT-MARK token=*** key=*** found=***"),
            "{path}: {text}"
        );
        assert!(
            text.contains(r#""text":"the key is \"***\"\n""#),
            "{path}: {text}"
        );
    }
    for role in ["intake/pm-round-0", "verifier-round-0"] {
        assert!(
            stored.iter().any(|(_, path, _)| path.contains(role)),
            "{role} in {stored:?}"
        );
    }
    for (_, path, text) in &stored {
        for secret in [token, api_key, shaped] {
            assert!(!text.contains(secret), "{path} holds {secret}: {text}");
        }
    }

    let summary = act_summary(&log);
    assert!(
        summary.contains("`task-001` (2)")
            && summary.contains("`task-002` (2)")
            && summary.contains("`intake` (1)"),
        "the summary names whose transcripts are there: {log}"
    );
    assert!(
        summary
            .contains("[this run's artifacts](https://github.com/acme/widgets/actions/runs/4242#artifacts)"),
        "{log}"
    );
    assert!(
        log.contains("Agent transcripts: [hyperloop-transcripts-step-4242-1-")
            && log.contains("](https://github.com/acme/widgets/actions/runs/4242/artifacts/"),
        "the upload's own link is in the summary: {log}"
    );
}

const GATED_OVERLAY: [(&str, &str); 2] = [
    (
        ".hyperloop/agents/kustomization.yaml",
        PROCESS_OVERLAY_KUSTOMIZATION,
    ),
    (".hyperloop/agents/process.yaml", GATED_PROCESS),
];

/// The `KEY: value` line of a task file.
pub(crate) fn task_field<'a>(task: &'a str, key: &str) -> Option<&'a str> {
    task.lines().find_map(|l| l.strip_prefix(&format!("{key}: ")))
}

/// The action in GitHub mode, twice through act, against the fake GitHub whose storage is the
/// workspace's `origin`: the first run leaves a draft PR at a human gate; a person labels it
/// `lgtm`; the second run merges it. Everything the action gets comes the way a runner gives it:
/// the API URL and the repository as the runner's variables, the token as the workflow token
/// (`github-token` keeps its default, `github.token`), and each run starts from a fresh clone of
/// origin, so only what the first run pushed can carry over to the second.
#[test]
fn the_action_walks_a_task_through_github_mode_under_act() {
    let Some(act) = act_bin() else {
        return;
    };
    let env = TestEnv::new();
    let repo = env.repo("workspace");
    let script = env.root().join("agent-script.yaml");
    std::fs::write(&script, AGENT_SCRIPT).expect("script");
    repo.write(
        ".hyperloop.yaml",
        &format!(
            "overlay: .hyperloop/agents\nruntime:\n  max_workers: 2\n  agent_command: [\"{}\", \"--script\", \"{}\"]\n  worker_timeout: 60\n  agent_env: [GIT_CONFIG_GLOBAL, GIT_CONFIG_NOSYSTEM]\n",
            scripted_agent_bin().display(),
            script.display()
        ),
    );
    for (path, text) in GATED_OVERLAY {
        repo.write(path, text);
    }
    repo.write("specs/greeting.md", "# Greeting\n\nPrint a greeting.\n");
    copy_action(&repo.path);
    repo.write(
        ".github/workflows/test.yml",
        &action_workflow(
            r#"git clone -q "$HYPERLOOP_TEST_ORIGIN" ."#,
            API_KEY,
            "          command: step",
        ),
    );
    env.git(&repo.path, &["add", "-A"]);
    env.git(&repo.path, &["commit", "-qm", "specs, configuration, the action"]);
    env.git(&repo.path, &["push", "-q", "origin", "main"]);
    let pushed = env.git(&repo.origin, &["rev-parse", "main"]);
    let gh = FakeGitHub::start(&repo.origin, "acme", "widgets");

    let bin_dir = hyperloop_bin().parent().expect("bin dir").to_path_buf();
    let mut args: Vec<String> = vec![
        "-W".into(),
        ".github/workflows/test.yml".into(),
        "--env".into(),
        format!("GITHUB_API_URL={}", gh.url),
        // A runner sets both; act would otherwise point GraphQL at api.github.com.
        "--env".into(),
        format!("GITHUB_GRAPHQL_URL={}/graphql", gh.url),
        "--env".into(),
        "GITHUB_REPOSITORY=acme/widgets".into(),
        "-s".into(),
        format!("GITHUB_TOKEN={}", gh.token),
        "--env".into(),
        format!("HYPERLOOP_TEST_ORIGIN={}", repo.origin.display()),
        "--env".into(),
        format!("HYPERLOOP_BIN_DIR={}", bin_dir.display()),
    ];
    args.extend(any_upload(&env));

    let (out, log) = run_act(&env, &act, &repo.path, "workflow_dispatch", &args, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for (key, want) in [
        ("tasks-total", "1"),
        ("tasks-complete", "0"),
        ("tasks-failed", "0"),
        ("spawned", "3"),
        ("merged", "0"),
        ("work-remaining", "true"),
        ("progress", "waiting"),
    ] {
        assert_eq!(act_output(&log, key), want, "{key} in:\n{log}");
    }
    // The task state went to origin, the only place a runner's work survives the job.
    assert_ne!(env.git(&repo.origin, &["rev-parse", "main"]), pushed);
    let task = env.git(&repo.origin, &["show", "main:specs/tasks/task-001.md"]);
    assert_eq!(task_field(&task, "phase"), Some("human-review"), "{task}");
    let pr_url = task_field(&task, "pr").expect("PR recorded").to_string();
    let number: u64 = pr_url
        .rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("PR number");
    assert_eq!(gh.pr_count(), 1);
    assert!(gh.pr_is_draft(number), "{}", gh.pr_json(number));
    let labels = gh.pr_labels(number);
    assert!(
        labels.contains(&"task:task-001".to_string()) && labels.contains(&"spec:greeting".to_string()),
        "{labels:?}"
    );
    assert!(
        !env.git(&repo.origin, &["branch", "--list", "worker/task-001"])
            .is_empty(),
        "the task branch was pushed"
    );
    let summary = act_summary(&log);
    assert!(
        summary.contains(&format!("[#{number}]({pr_url})")),
        "the PR is linked: {log}"
    );
    assert!(
        summary.contains("```mermaid\n") && summary.contains("graph TD"),
        "{log}"
    );
    assert!(!log.contains(&gh.token), "the token is masked:\n{log}");

    gh.add_label_to_pr(number, "lgtm");
    let (out, log) = run_act(&env, &act, &repo.path, "workflow_dispatch", &args, None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for (key, want) in [
        ("tasks-total", "1"),
        ("tasks-complete", "1"),
        ("merged", "1"),
        ("work-remaining", "false"),
        ("progress", "all-complete"),
    ] {
        assert_eq!(act_output(&log, key), want, "{key} in:\n{log}");
    }
    assert_eq!(gh.pr_json(number)["merged"], serde_json::Value::Bool(true));
    let task = env.git(&repo.origin, &["show", "main:specs/tasks/task-001.md"]);
    assert_eq!(task_field(&task, "status"), Some("complete"), "{task}");
    let files = env.git(&repo.origin, &["ls-tree", "-r", "--name-only", "main"]);
    assert!(
        files.contains("impl/task-001.md"),
        "the work reached main: {files}"
    );
    let summary = act_summary(&log);
    assert!(
        summary.contains("| ✅ complete |") && summary.contains(&format!("[#{number}]({pr_url})")),
        "{log}"
    );
}

/// Stands in for actions/checkout under act: clones the test's origin the way the real action
/// checks out the repository, and refuses what the real one would do differently from what
/// hyperloop needs (no `ref`: a pull-request event would check out the PR's merge commit; a
/// shallow clone: merges need history).
pub(crate) const CHECKOUT_STAND_IN: &str = r#"name: checkout stand-in
inputs:
  ref:
    default: ""
  fetch-depth:
    default: "1"
runs:
  using: composite
  steps:
    - shell: bash
      env:
        REF: ${{ inputs.ref }}
        DEPTH: ${{ inputs.fetch-depth }}
      run: |
        [ -n "$REF" ] || { echo "::error::checkout without ref: the event's ref, not the base branch"; exit 1; }
        [ "$DEPTH" = 0 ] || { echo "::error::shallow checkout (fetch-depth $DEPTH)"; exit 1; }
        git clone -q --branch "$REF" "$HYPERLOOP_TEST_ORIGIN" .
"#;

/// The workflow `hyperloop init` writes, unmodified, through act in GitHub mode: the remote
/// actions it names are served from local folders (`--local-repository`) — actions/checkout by
/// [`CHECKOUT_STAND_IN`], the hyperloop action by this source tree's action — and its defaults
/// are what a first-time user gets: the version from the action's ref (`v1`, no release, so
/// `HYPERLOOP_BIN_DIR` provides the binary as the local install), the Claude Code CLI checked for
/// on PATH (a stub answers), the API key and token from secrets. A label other than `lgtm` must
/// not start a step; an `lgtm` label must run one on the base branch, which here takes the
/// example spec all the way to a merged PR.
#[test]
fn the_init_workflow_runs_under_act() {
    let Some(act) = act_bin() else {
        return;
    };
    let env = TestEnv::new();
    let repo = env.repo("workspace");
    let script = env.root().join("agent-script.yaml");
    std::fs::write(&script, AGENT_SCRIPT).expect("script");
    // Written before init, which keeps an existing configuration: the agents must be scripted.
    repo.write(
        ".hyperloop.yaml",
        &format!(
            // No CI in this repository to wait for: the one run merges what it verifies.
            "overlay: .hyperloop/agents\nruntime:\n  max_workers: 2\n  agent_command: [\"{}\", \"--script\", \"{}\"]\n  worker_timeout: 60\n  agent_env: [GIT_CONFIG_GLOBAL, GIT_CONFIG_NOSYSTEM]\nmerge:\n  checks: none\n",
            scripted_agent_bin().display(),
            script.display()
        ),
    );
    let report = hyperloop::init::init(&repo.path).expect("init");
    assert!(
        report
            .written
            .contains(&".github/workflows/hyperloop.yml".to_string()),
        "{report}"
    );
    env.git(&repo.path, &["add", "-A"]);
    env.git(&repo.path, &["commit", "-qm", "hyperloop init"]);
    env.git(&repo.path, &["push", "-q", "origin", "main"]);
    let gh = FakeGitHub::start(&repo.origin, "acme", "widgets");

    let checkout = env.root().join("checkout-action");
    std::fs::create_dir_all(&checkout).expect("checkout dir");
    std::fs::write(checkout.join("action.yml"), CHECKOUT_STAND_IN).expect("checkout action");
    let action = env.root().join("hyperloop-action");
    copy_action(&action);
    let stubs = env.root().join("stubs");
    std::fs::create_dir_all(&stubs).expect("stubs");
    std::fs::write(stubs.join("claude"), "#!/bin/sh\necho '2.1.197 (Claude Code)'\n").expect("claude stub");
    set_executable(&stubs.join("claude"));

    let workflow =
        std::fs::read_to_string(repo.path.join(".github/workflows/hyperloop.yml")).expect("workflow");
    let mut args: Vec<String> = vec!["-W".into(), ".github/workflows/hyperloop.yml".into()];
    for uses in workflow
        .lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("uses: "))
        .filter_map(|u| u.split_whitespace().next())
    {
        let local = if uses.starts_with("actions/checkout@") {
            &checkout
        } else if uses.starts_with("hyperloop-dev/hyperloop@") {
            &action
        } else {
            panic!("no local stand-in for `{uses}`, which act cannot fetch offline");
        };
        args.extend(["--local-repository".into(), format!("{uses}={}", local.display())]);
    }
    let bin_dir = hyperloop_bin().parent().expect("bin dir").to_path_buf();
    args.extend([
        "--env".into(),
        format!("GITHUB_API_URL={}", gh.url),
        // A runner sets both; act would otherwise point GraphQL at api.github.com.
        "--env".into(),
        format!("GITHUB_GRAPHQL_URL={}/graphql", gh.url),
        "--env".into(),
        "GITHUB_REPOSITORY=acme/widgets".into(),
        "-s".into(),
        format!("GITHUB_TOKEN={}", gh.token),
        "-s".into(),
        "ANTHROPIC_API_KEY=sk-test-not-a-real-key-5678".into(),
        "--env".into(),
        format!("HYPERLOOP_TEST_ORIGIN={}", repo.origin.display()),
        "--env".into(),
        format!("HYPERLOOP_BIN_DIR={}", bin_dir.display()),
    ]);
    // The hyperloop action's own upload step.
    args.extend(any_upload(&env));
    let labelled = |label: &str| {
        let event = env.root().join(format!("event-{label}.json"));
        let payload = serde_json::json!({
            "action": "labeled",
            "number": 7,
            "label": { "name": label },
            "pull_request": {
                "number": 7,
                "head": { "ref": "feature" },
                "base": { "ref": "main" }
            },
            "repository": {
                "full_name": "acme/widgets",
                "name": "widgets",
                "owner": { "login": "acme" },
                "default_branch": "main"
            }
        });
        std::fs::write(&event, payload.to_string()).expect("event");
        let mut all = args.clone();
        all.extend(["-e".into(), event.display().to_string()]);
        run_act(&env, &act, &repo.path, "pull_request", &all, Some(&stubs))
    };

    // The two runs differ only in the label's name, so the lgtm run below also shows that this
    // one was stopped by the job's condition and not by anything else in act.
    let (out, log) = labelled("wontfix");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        !log.contains("hyperloop --path"),
        "no step for another label:\n{log}"
    );
    assert!(gh.requests().is_empty(), "{:?}", gh.requests());

    let (out, log) = labelled("lgtm");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        log.contains("hyperloop --path . --repo acme/widgets step --json"),
        "{log}"
    );
    let task = env.git(&repo.origin, &["show", "main:specs/tasks/task-001.md"]);
    assert_eq!(task_field(&task, "status"), Some("complete"), "{task}");
    let pr_url = task_field(&task, "pr").expect("PR recorded").to_string();
    let number: u64 = pr_url
        .rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("PR number");
    assert_eq!(gh.pr_json(number)["merged"], serde_json::Value::Bool(true));
    let labels = gh.pr_labels(number);
    assert!(labels.contains(&"spec:example".to_string()), "{labels:?}");
    let summary = act_summary(&log);
    assert!(
        summary.contains("| ✅ complete |") && summary.contains(&format!("[#{number}]({pr_url})")),
        "{log}"
    );
    assert!(
        !log.contains("sk-test-not-a-real-key-5678") && !log.contains(&gh.token),
        "secrets are masked:\n{log}"
    );
}

#[test]
fn the_init_workflow_uses_only_inputs_the_action_has() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    hyperloop::init::init(&repo.path).expect("init");
    let yaml = |p: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(p).expect("read");
        hyperloop::yaml::parse(p, &text).expect("valid YAML")
    };
    let action = yaml(&source_root().join("action.yml"));
    let inputs = action["inputs"].as_object().expect("inputs");
    let workflow = yaml(&repo.path.join(".github/workflows/hyperloop.yml"));
    let step = workflow["jobs"]["step"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("hyperloop-dev/hyperloop@"))
        })
        .expect("the action step")
        .clone();
    let with = step["with"].as_object().expect("with");
    assert!(!with.is_empty());
    for key in with.keys() {
        assert!(
            inputs.contains_key(key),
            "the workflow passes `{key}`, which action.yml lacks"
        );
    }
    // What the step needs: a commit it can push from, with history for merges.
    let checkout = &workflow["jobs"]["step"]["steps"][0];
    assert_eq!(checkout["with"]["fetch-depth"], 0);
    // Every action the workflow uses is pinned to a full commit SHA or is this action's tag.
    for s in workflow["jobs"]["step"]["steps"].as_array().expect("steps") {
        let uses = s["uses"].as_str().unwrap_or_default();
        if uses.starts_with("actions/") {
            let sha = uses.split_once('@').map(|(_, r)| r).unwrap_or_default();
            assert!(
                sha.len() == 40 && sha.chars().all(|c| c.is_ascii_hexdigit()),
                "{uses}"
            );
        }
    }
}

#[test]
fn every_action_in_our_workflows_is_pinned_to_a_commit() {
    let dir = source_root().join(".github/workflows");
    let mut seen = 0;
    let workflows = std::fs::read_dir(&dir)
        .expect("workflows")
        .map(|e| e.expect("entry").path());
    let mut in_action = 0;
    for path in workflows.chain([source_root().join("action.yml")]) {
        let text = std::fs::read_to_string(&path).expect("read");
        for line in text.lines() {
            let Some(uses) = line.trim().trim_start_matches("- ").strip_prefix("uses: ") else {
                continue;
            };
            if uses.starts_with("./") {
                continue;
            }
            seen += 1;
            if path.ends_with("action.yml") {
                in_action += 1;
            }
            let reference = uses
                .split_whitespace()
                .next()
                .and_then(|u| u.split_once('@'))
                .map(|(_, r)| r);
            assert!(
                reference.is_some_and(|r| r.len() == 40 && r.chars().all(|c| c.is_ascii_hexdigit())),
                "{}: `{uses}` is not pinned to a full commit SHA",
                path.display()
            );
        }
    }
    assert!(seen > 5, "found only {seen} actions");
    assert!(in_action >= 1, "action.yml's own `uses:` were not checked");
}

/// Every input the fan-out workflow passes to the action exists in `action.yml`, and every
/// action it names besides this one is pinned to a full commit SHA.
#[test]
fn the_fan_out_workflow_uses_only_inputs_the_action_has_and_pinned_actions() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    hyperloop::init::init_with(&repo.path, &hyperloop::init::InitOptions { fan_out: true }).expect("init");
    let yaml = |p: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(p).expect("read");
        hyperloop::yaml::parse(p, &text).expect("valid YAML")
    };
    let action = yaml(&source_root().join("action.yml"));
    let inputs = action["inputs"].as_object().expect("inputs");
    let outputs = action["outputs"].as_object().expect("outputs");
    for name in ["items", "has-items", "ready"] {
        assert!(outputs.contains_key(name), "action.yml lacks the output {name}");
    }
    let workflow = yaml(&repo.path.join(hyperloop::init::FANOUT_WORKFLOW_PATH));
    let mut commands = Vec::new();
    for (job, body) in workflow["jobs"].as_object().expect("jobs") {
        for s in body["steps"].as_array().expect("steps") {
            let uses = s["uses"].as_str().unwrap_or_default();
            if uses.starts_with("hyperloop-dev/hyperloop@") {
                let with = s["with"].as_object().expect("with");
                for key in with.keys() {
                    assert!(
                        inputs.contains_key(key),
                        "{job} passes `{key}`, which action.yml lacks"
                    );
                }
                commands.push(with["command"].as_str().expect("command").to_string());
            } else if !uses.is_empty() {
                let sha = uses.split_once('@').map(|(_, r)| r).unwrap_or_default();
                assert!(
                    sha.len() == 40 && sha.chars().all(|c| c.is_ascii_hexdigit()),
                    "{job}: `{uses}` is not pinned to a full commit SHA"
                );
            }
        }
    }
    commands.sort();
    assert_eq!(commands, ["plan", "record", "work"]);
}

/// `scripts/run-action.sh` with a stand-in `hyperloop` that prints its arguments and whether a
/// credential reached it.
fn run_action_script(env: &TestEnv, vars: &[(&str, &str)]) -> Output {
    let fake = env.root().join("fake-hyperloop");
    std::fs::create_dir_all(&fake).expect("dir");
    std::fs::write(
        fake.join("hyperloop"),
        "#!/bin/sh
for a in \"$@\"; do echo \"ARG $a\"; done
for v in GITHUB_TOKEN GH_TOKEN HYPERLOOP_APP_ID HYPERLOOP_APP_PRIVATE_KEY; do eval \"x=\\${$v-unset}\"; echo \"ENV $v=$x\"; done
",
    )
    .expect("fake hyperloop");
    set_executable(&fake.join("hyperloop"));
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = env.command("bash");
    cmd.arg(source_root().join("scripts/run-action.sh"))
        .current_dir(env.root())
        .env("PATH", path)
        .env("IN_AGENT_USER", "");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().expect("bash runs")
}

fn printed(out: &Output, prefix: &str) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(prefix).map(str::to_string))
        .collect()
}

#[test]
fn the_action_runs_work_without_a_forge_credential() {
    let env = TestEnv::new();
    let out = run_action_script(
        &env,
        &[
            ("IN_COMMAND", "work"),
            ("IN_REPO", "acme/widgets"),
            ("IN_ITEM", "task-001-implementer-r0-1a2b3c4d"),
            ("IN_OUT", "/tmp/out dir"),
            ("GITHUB_TOKEN", "ghp_shouldNeverArrive"),
            ("GH_TOKEN", "ghp_shouldNeverArriveEither"),
            ("HYPERLOOP_APP_ID", "42"),
            ("HYPERLOOP_APP_PRIVATE_KEY", "-----BEGIN KEY-----"),
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        printed(&out, "ARG "),
        [
            "--path",
            ".",
            "work",
            "task-001-implementer-r0-1a2b3c4d",
            "--out",
            "/tmp/out dir"
        ]
    );
    assert_eq!(
        printed(&out, "ENV "),
        [
            "GITHUB_TOKEN=unset",
            "GH_TOKEN=unset",
            "HYPERLOOP_APP_ID=unset",
            "HYPERLOOP_APP_PRIVATE_KEY=unset"
        ]
    );
    // Without an item there is nothing to run.
    let out = run_action_script(&env, &[("IN_COMMAND", "work"), ("IN_OUT", "o")]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("::error title=hyperloop action::command work needs the inputs item and out"),
        "{}",
        describe(&out)
    );
}

#[test]
fn the_action_finds_record_outputs_however_they_were_downloaded() {
    let env = TestEnv::new();
    let root = env.root();
    let output = |rel: &str| {
        let d = root.join(rel);
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join("item.json"), "{}").expect("item.json");
        d.display().to_string()
    };
    // One folder per artifact under a parent, as download-artifact lays several out...
    let a = output("downloads/hyperloop-output-a");
    let b = output("downloads/hyperloop-output-b");
    // ...one level deeper, when the parent holds the download path itself...
    let c = output("nested/run/hyperloop-output-c");
    // ...a single output given directly, with a space in its path...
    let d = output("single dir/out");
    // ...and a folder that holds nothing of work's.
    std::fs::create_dir_all(root.join("downloads/stray")).expect("dir");
    let dirs = format!(
        "{}\n{} {}\n{d}\n",
        root.join("downloads").display(),
        root.join("nested").display(),
        root.join("missing").display()
    );
    let out = run_action_script(
        &env,
        &[
            ("IN_COMMAND", "record"),
            ("IN_REPO", "acme/widgets"),
            ("IN_DIRS", &dirs),
            ("GITHUB_TOKEN", "ghp_x"),
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        printed(&out, "ARG "),
        [
            "--path",
            ".",
            "--repo",
            "acme/widgets",
            "record",
            "--json",
            &a,
            &b,
            &c,
            &d
        ]
    );
    assert!(printed(&out, "ENV ").contains(&"GITHUB_TOKEN=ghp_x".to_string()));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("which is not a folder"),
        "{}",
        describe(&out)
    );

    // Nothing downloaded (every work job failed): record still finishes the cycle.
    let out = run_action_script(
        &env,
        &[
            ("IN_COMMAND", "record"),
            ("IN_DIRS", &root.join("downloads/stray").display().to_string()),
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(printed(&out, "ARG "), ["--path", ".", "record", "--json"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no output of work found"),
        "{}",
        describe(&out)
    );
}
