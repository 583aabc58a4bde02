//! The GitHub Action: the binary's outputs, job summary and annotations under
//! `GITHUB_ACTIONS=true`; `scripts/install.sh` (release download with checksum check, the
//! build-from-source fallback, the prebuilt escape hatch); and the whole composite action run by
//! `act` on this host against a demo repository in local mode with the scripted agent.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::{TestEnv, TestRepo, describe, hyperloop_bin, scripted_agent_bin};

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

fn set_executable(p: &Path) {
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
fn act_bin() -> Option<PathBuf> {
    let cache = std::env::var_os("HYPERLOOP_TEST_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hyperloop-test")))?;
    let act = cache.join("actions/bin/act");
    if act.is_file() {
        Some(act)
    } else {
        // A skip must be visible in the test output, not only in a log nobody reads.
        #[allow(clippy::print_stderr)]
        {
            eprintln!("\n*** SKIPPED: act is not installed (run .ci/setup-action-tools.sh) ***\n");
        }
        None
    }
}

const TEST_WORKFLOW: &str = r#"name: action-test
on: workflow_dispatch
jobs:
  step:
    runs-on: ubuntu-latest
    steps:
      # act has no actions/checkout: the repository comes from the host.
      - name: Copy the repository
        if: ${{ env.ACT }}
        run: cp -a "$HYPERLOOP_TEST_SOURCE/." .
      - id: hyperloop
        uses: ./
        with:
          version: local
          install-claude: false
          anthropic-api-key: sk-test-not-a-real-key-1234
          log-format: json
      - name: Show the outputs
        env:
          TOTAL: ${{ steps.hyperloop.outputs.tasks-total }}
          COMPLETE: ${{ steps.hyperloop.outputs.tasks-complete }}
          FAILED: ${{ steps.hyperloop.outputs.tasks-failed }}
          SPAWNED: ${{ steps.hyperloop.outputs.spawned }}
          MERGED: ${{ steps.hyperloop.outputs.merged }}
          REMAINING: ${{ steps.hyperloop.outputs.work-remaining }}
          PROGRESS: ${{ steps.hyperloop.outputs.progress }}
        run: |
          echo "OUTPUT tasks-total=$TOTAL"
          echo "OUTPUT tasks-complete=$COMPLETE"
          echo "OUTPUT tasks-failed=$FAILED"
          echo "OUTPUT spawned=$SPAWNED"
          echo "OUTPUT merged=$MERGED"
          echo "OUTPUT work-remaining=$REMAINING"
          echo "OUTPUT progress=$PROGRESS"
          echo "MAIN $(git log --format=%s -n 1 main)"
"#;

#[test]
fn the_action_runs_a_step_under_act() {
    let Some(act) = act_bin() else {
        return;
    };
    let env = TestEnv::new();
    let repo = demo_repo(&env, "workspace");
    // The action itself, as a checkout of this repository would hold it.
    std::fs::copy(source_root().join("action.yml"), repo.path.join("action.yml")).expect("action.yml");
    std::fs::create_dir_all(repo.path.join("scripts")).expect("scripts");
    for entry in std::fs::read_dir(source_root().join("scripts")).expect("scripts") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), repo.path.join("scripts").join(entry.file_name())).expect("copy");
    }
    repo.write(".github/workflows/test.yml", TEST_WORKFLOW);
    env.git(&repo.path, &["add", "-A"]);
    env.git(&repo.path, &["commit", "-qm", "the action and a workflow"]);

    let bin_dir = hyperloop_bin().parent().expect("bin dir").to_path_buf();
    let out = env
        .command(&act)
        .current_dir(&repo.path)
        .args(["workflow_dispatch", "-W", ".github/workflows/test.yml"])
        .args([
            "-P",
            "ubuntu-latest=-self-hosted",
            "--action-offline-mode",
            "--no-cache-server",
        ])
        .arg("--action-cache-path")
        .arg(env.root().join("act-cache"))
        .args(["--env", &format!("HYPERLOOP_TEST_SOURCE={}", repo.path.display())])
        .args(["--env", &format!("HYPERLOOP_BIN_DIR={}", bin_dir.display())])
        .output()
        .expect("act runs");
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for want in [
        "OUTPUT tasks-total=2",
        "OUTPUT tasks-complete=2",
        "OUTPUT tasks-failed=0",
        "OUTPUT spawned=5",
        "OUTPUT merged=2",
        "OUTPUT work-remaining=false",
        "OUTPUT progress=all-complete",
        "(task-00",
    ] {
        assert!(log.contains(want), "missing `{want}` in:\n{log}");
    }
    // act prints each step's job summary file after the step.
    let summary = log
        .split_once("Summary - ")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no job summary in:\n{log}"));
    assert!(
        summary.contains("| Task | Title | Status | Phase | Round | PR | Cost |"),
        "{log}"
    );
    assert!(
        summary.contains("```mermaid\n") && summary.contains("graph TD"),
        "{log}"
    );
    assert!(summary.contains(":::complete"), "{log}");
    assert!(
        !log.contains("sk-test-not-a-real-key-1234"),
        "the API key is masked:\n{log}"
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
    for entry in std::fs::read_dir(&dir).expect("workflows") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        for line in text.lines() {
            let Some(uses) = line.trim().trim_start_matches("- ").strip_prefix("uses: ") else {
                continue;
            };
            if uses.starts_with("./") {
                continue;
            }
            seen += 1;
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
}
