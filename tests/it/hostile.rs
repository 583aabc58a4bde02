//! Agents are untrusted: a scripted agent turned hostile tries to steal the credentials in play
//! and to get work published that nobody verified, and loses.
//!
//! Root reads every process's memory and every file, so a credential check run as root proves
//! nothing. When the tests run as root, hyperloop (and so every agent it starts) runs as the
//! unprivileged uid/gid 65534, owning the test's repositories and HOME; otherwise it runs as the
//! test's own user.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::action::{act_bin, act_command, act_output, action_workflow, copy_action, keeping_upload};
use crate::fake_github::FakeGitHub;
use crate::harness::{DEMO_RULES, GATED_PROCESS, describe, hyperloop_bin, scripted_agent_bin};
use crate::local::{Project, events, named};

/// The unprivileged user the scenarios run as when the tests run as root.
const NOBODY: u32 = 65534;

/// The attack an agent runs (see the script's own description).
const ATTACK: &str = include_str!("hostile_attack.py");

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A value nobody could guess, for canaries and controls.
fn random_hex() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    let a = h.finish();
    h.write_u64(a);
    format!("{a:016x}{:016x}", h.finish())
}

pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A project whose hyperloop runs unprivileged when the tests run as root.
struct Hostile {
    p: Project,
    gh: Option<FakeGitHub>,
}

impl Hostile {
    fn local(rules: &str, extra_config: &str) -> Hostile {
        Hostile {
            p: Project::new(rules, extra_config),
            gh: None,
        }
    }

    /// GitHub mode against the fake, which accepts `token`.
    fn github(rules: &str, extra_config: &str, token: &str) -> Hostile {
        let p = Project::new(rules, extra_config);
        p.git(&["push", "-q", "origin", "main"]);
        let gh = FakeGitHub::start(&p.repo.origin, "acme", "widgets");
        gh.allow_token(token);
        Hostile { p, gh: Some(gh) }
    }

    fn root(&self) -> &Path {
        self.p.env.root()
    }

    fn git(&self, args: &[&str]) -> String {
        self.p.git(args)
    }

    /// Makes everything the scenario uses the unprivileged user's, after the test (as root) set
    /// it up. The bare `origin` stays root's but writable by all: the fake GitHub, running in
    /// this process, refuses a repository someone else owns.
    fn hand_over(&self) {
        if !is_root() {
            return;
        }
        let config = std::fs::read_to_string(self.p.env.gitconfig()).unwrap_or_default();
        if !config.contains("[safe]") {
            // Test-side git (root) works in repositories that are now another user's.
            std::fs::write(
                self.p.env.gitconfig(),
                format!("{config}[safe]\n\tdirectory = *\n"),
            )
            .expect("gitconfig");
        }
        let origin = &self.p.repo.origin;
        self.p
            .env
            .git(origin, &["config", "core.sharedRepository", "0777"]);
        sh(&format!("chmod -R a+rwX '{}'", origin.display()));
        for entry in std::fs::read_dir(self.root()).expect("read root").flatten() {
            if entry.path() != *origin {
                sh(&format!(
                    "chown -R {NOBODY}:{NOBODY} '{}'",
                    entry.path().display()
                ));
            }
        }
        sh(&format!("chown {NOBODY}:{NOBODY} '{}'", self.root().display()));
        // The index records owners: after the chown git would take every file for modified.
        let out = self
            .p
            .env
            .command("git")
            .current_dir(&self.p.repo.path)
            .args(["update-index", "-q", "--refresh"])
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("git runs");
        assert!(out.status.success(), "refresh the index: {}", describe(&out));
        for bin in [hyperloop_bin(), scripted_agent_bin()] {
            let out = Command::new("test")
                .arg("-x")
                .arg(&bin)
                .uid(NOBODY)
                .gid(NOBODY)
                .status()
                .expect("test runs");
            assert!(
                out.success(),
                "{} must be executable by uid {NOBODY} (every directory above it needs o+x)",
                bin.display()
            );
        }
    }

    /// `hyperloop --path <repo> [--repo acme/widgets] ARGS` as the scenario's user, with `vars`.
    fn command(&self, args: &[&str], vars: &[(&str, &str)]) -> Command {
        self.hand_over();
        let mut cmd = self.p.env.command(hyperloop_bin());
        cmd.args(["--path", self.p.repo.path_str()]);
        if let Some(gh) = &self.gh {
            cmd.args(["--repo", "acme/widgets"]);
            cmd.env("GITHUB_API_URL", &gh.url);
        }
        cmd.args(args);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        if is_root() {
            // std drops the supplementary groups when it changes the uid as root.
            cmd.uid(NOBODY).gid(NOBODY);
        }
        cmd
    }

    fn hyperloop(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        self.command(args, vars).output().expect("hyperloop runs")
    }

    /// Like [`Self::hyperloop`], but a run that does not end within `limit` is killed and fails
    /// the test: a hostile agent must not be able to hang a step.
    fn hyperloop_within(&self, args: &[&str], limit: Duration) -> Output {
        let out_path = self.root().join("hyperloop.stdout");
        let err_path = self.root().join("hyperloop.stderr");
        let mut cmd = self.command(args, &[]);
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).expect("stdout file"))
            .stderr(std::fs::File::create(&err_path).expect("stderr file"));
        let mut child = cmd.spawn().expect("hyperloop starts");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hyperloop {args:?} still runs after {limit:?}; stderr:\n{}",
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        Output {
            status,
            stdout: std::fs::read(&out_path).unwrap_or_default(),
            stderr: std::fs::read(&err_path).unwrap_or_default(),
        }
    }

    /// Starts a process of the scenario's user that is not hyperloop's, holding `marker` in its
    /// environment (and so in its memory): the attack must find it, or it proves nothing.
    fn control_process(&self, marker: &str) -> KillOnDrop {
        let mut cmd = Command::new("sleep");
        cmd.arg("300")
            .env_clear()
            .env("HOSTILE_CONTROL", marker)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            cmd.uid(NOBODY).gid(NOBODY);
        }
        KillOnDrop(cmd.spawn().expect("control process"))
    }

    fn attack_script(&self) -> PathBuf {
        let path = self.root().join("hostile_attack.py");
        std::fs::write(&path, ATTACK).expect("attack script");
        path
    }
}

/// A child of the test, killed (by its pid) when the test ends however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(script: &str) {
    let out = Command::new("sh").args(["-c", script]).output().expect("sh runs");
    assert!(out.status.success(), "{script}: {}", describe(&out));
}

fn require_python() {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "the hostile agent's credential search needs python3 on PATH");
}

/// Rules that make every role run the attack (into `<loot>/<role>`) before doing its job.
fn attacking_rules(attack: &Path, loot: &Path) -> String {
    attacking_rules_reading(attack, loot, &[])
}

/// [`attacking_rules`], the attack also reading every file under `dirs`.
fn attacking_rules_reading(attack: &Path, loot: &Path, dirs: &[&Path]) -> String {
    let mut shell = format!(
        "python3 '{}' '{}'/\"$HYPERLOOP_ROLE\"",
        attack.display(),
        loot.display()
    );
    for d in dirs {
        shell.push_str(&format!(" '{}'", d.display()));
    }
    let shell = serde_json::to_string(&shell).expect("json");
    format!(
        "  - role: pm\n    actions:\n      - shell: {shell}\n      - pm_tasks_from_specs: true\n      - verdict: {{verdict: pass}}\n\
         \x20 - role: implementer\n    actions:\n      - shell: {shell}\n      - implement_task: true\n      - verdict: {{verdict: pass}}\n\
         \x20 - role: verifier\n    actions:\n      - shell: {shell}\n      - verdict: {{verdict: pass}}\n"
    )
}

/// Every file under `dir` holding one of `needles`, with the needle found.
fn sightings(dir: &Path, needles: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap_or_default();
            for n in needles {
                if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                    found.push(format!("{} holds {n:?}", path.display()));
                }
            }
        }
    }
    found.sort();
    found
}

fn file_holds(path: &Path, needle: &str) -> bool {
    std::fs::read(path)
        .unwrap_or_default()
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// What the attack must have done for its empty-handedness to mean anything: run to the end for
/// every role, read the control process's environment and memory, and found the repository.
fn assert_attack_was_real(loot: &Path, roles: &[&str], control: &str, control_pid: u32) {
    for role in roles {
        let dir = loot.join(role);
        assert!(
            dir.join("done").exists(),
            "the {role}'s attack ran to the end (loot in {})",
            dir.display()
        );
        assert!(
            file_holds(&dir.join(format!("environ-{control_pid}")), control),
            "the {role} read another process's environment: the /proc scan works"
        );
        assert!(
            file_holds(&dir.join(format!("mem-{control_pid}")), control),
            "the {role} read another process's memory: the memory scan works"
        );
        assert!(
            !file_holds(&dir.join("main-repo"), "(not found)"),
            "the {role} found the repository its checkout borrows from"
        );
        // hyperloop is among the agent's ancestors; its environment held the canary at exec.
        // The agent's supervisor runs the same program but with the agent's own environment,
        // and holds nothing to hide: it is the agent's side.
        let ancestors = std::fs::read_to_string(dir.join("ancestors")).unwrap_or_default();
        let hyperloop: Vec<&str> = ancestors
            .lines()
            .filter(|l| {
                let mut words = l.split_whitespace().skip(1);
                let argv0 = words.next().unwrap_or_default();
                (argv0.ends_with("/hyperloop") || argv0 == "hyperloop")
                    && words.next() != Some("__agent-supervisor")
            })
            .collect();
        assert!(
            !hyperloop.is_empty(),
            "the {role} saw hyperloop among its ancestors:\n{ancestors}"
        );
        assert!(
            hyperloop.iter().all(|l| l.ends_with("environ=unreadable")),
            "hyperloop's own /proc/<pid>/environ is closed to its agent:\n{ancestors}"
        );
    }
}

/// Two fresh canaries. Where the tests do not run as root, hyperloop runs as the test's own
/// user, and this process (which puts the canary in hyperloop's environment) would be readable
/// to the agents: it stands for whatever launches hyperloop, which is not what is under test, so
/// it is closed to them.
fn canaries() -> (String, String) {
    if !is_root() {
        // SAFETY: prctl with integer arguments only.
        unsafe {
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        }
    }
    (
        format!("canary-{}", random_hex()),
        format!("canary-{}", random_hex()),
    )
}

#[test]
fn local_mode_agents_of_every_role_find_no_credential() {
    require_python();
    let (token, matrix) = canaries();
    let control = format!("control-{}", random_hex());
    // The project is made first: its root is where the loot and the attack script go.
    let h = Hostile::local("", "");
    let loot = h.root().join("loot");
    let attack = h.attack_script();
    std::fs::write(
        &h.p.script,
        format!("rules:\n{}\n{}", attacking_rules(&attack, &loot), DEMO_RULES),
    )
    .expect("script");
    h.p.repo.write("specs/a.md", "# A\n\nBuild A.\n");
    h.p.commit_all("spec");
    std::fs::create_dir_all(&loot).expect("loot");
    h.hand_over();
    let ctl = h.control_process(&control);

    let out = h.hyperloop(
        &["run"],
        &[
            ("GITHUB_TOKEN", token.as_str()),
            ("GH_TOKEN", token.as_str()),
            ("MATRIX_ACCESS_TOKEN", matrix.as_str()),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(h.p.task("task-001")["status"], "complete");
    assert_attack_was_real(&loot, &["pm", "implementer", "verifier"], &control, ctl.0.id());
    let needles = vec![base64(token.as_bytes()), token, matrix];
    let found = sightings(&loot, &needles);
    assert!(
        found.is_empty(),
        "the agents obtained a credential:\n{}",
        found.join("\n")
    );
}

#[test]
fn github_mode_agents_of_every_role_find_no_credential() {
    require_python();
    let (token, matrix) = canaries();
    let control = format!("control-{}", random_hex());
    let h = Hostile::github("", "", &token);
    let loot = h.root().join("loot");
    let attack = h.attack_script();
    std::fs::write(
        &h.p.script,
        format!("rules:\n{}\n{}", attacking_rules(&attack, &loot), DEMO_RULES),
    )
    .expect("script");
    h.p.use_process(GATED_PROCESS);
    h.p.repo.write("specs/a.md", "# A\n\nBuild A.\n");
    h.p.commit_all("spec");
    h.git(&["push", "-q", "origin", "main"]);
    std::fs::create_dir_all(&loot).expect("loot");
    h.hand_over();
    let ctl = h.control_process(&control);

    let out = h.hyperloop(
        &["step"],
        &[
            ("GITHUB_TOKEN", token.as_str()),
            ("MATRIX_ACCESS_TOKEN", matrix.as_str()),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // The canary was a working credential: the fake accepted it for the PR.
    let gh = h.gh.as_ref().expect("github");
    assert_eq!(gh.pr_count(), 1, "{}", describe(&out));
    assert_attack_was_real(&loot, &["pm", "implementer", "verifier"], &control, ctl.0.id());
    let needles = vec![base64(token.as_bytes()), token, matrix];
    let found = sightings(&loot, &needles);
    assert!(
        found.is_empty(),
        "the agents obtained a credential:\n{}",
        found.join("\n")
    );
}

/// The runner act stands in for, as this test arranges it: a copy of `act` nobody may read, and
/// the secrets handed to it through a FIFO.
///
/// act runs every step as itself (host mode, no containers) and hands each step its own whole
/// environment, so it runs as the scenario's user, and so do the agents: `agent-user` has nothing
/// to switch to without privileges, which is the same-user case hyperloop must hold on its own.
/// act is then readable to the agents like any process of their user, as a runner is on a
/// self-hosted machine with no `agent-user`; but the runner holds the job's token whatever
/// hyperloop does, and is not what is under test. An executable its user cannot read makes the
/// kernel start it non-dumpable, closing its `/proc/<pid>/environ` and `mem`; the steps it starts
/// run readable programs and are dumpable again, so the action's steps and hyperloop are tested
/// as they are. The secrets go through a FIFO because `-s NAME=value` would sit in act's command
/// line, which everyone can read, `-s NAME` takes it from act's environment, which every step
/// inherits, and a regular file would stay on disk for the agents.
struct ActRunner {
    act: PathBuf,
    secrets: PathBuf,
}

impl ActRunner {
    fn new(root: &Path, act: &Path) -> ActRunner {
        use std::os::unix::fs::PermissionsExt;
        let dir = root.join("runner");
        std::fs::create_dir_all(&dir).expect("runner dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        let copy = dir.join("act");
        std::fs::copy(act, &copy).expect("copy act");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o111)).expect("chmod");
        let secrets = dir.join("secrets");
        let c = std::ffi::CString::new(secrets.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        if is_root() {
            sh(&format!("chown {NOBODY}:{NOBODY} '{}'", secrets.display()));
        }
        ActRunner { act: copy, secrets }
    }

    /// Runs `cmd` (act, given `--secret-file` naming the FIFO) as the scenario's user, feeding it
    /// `secrets` (`NAME=value` lines).
    fn run(&self, mut cmd: Command, secrets: String) -> Output {
        use std::os::unix::fs::OpenOptionsExt;
        let fifo = self.secrets.clone();
        let writer = std::thread::spawn(move || std::fs::write(fifo, secrets));
        if is_root() {
            cmd.uid(NOBODY).gid(NOBODY);
        }
        let out = cmd
            .arg("--secret-file")
            .arg(&self.secrets)
            .output()
            .expect("act runs");
        // An act that never read its secrets leaves the writer blocked in open(): a reader
        // releases it.
        let _release = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.secrets);
        let _ = writer.join();
        out
    }
}

/// The composite action, run by act as a workflow would run it, in GitHub mode against the fake
/// GitHub: the job's token (`github-token`) is a canary, and so is the Anthropic key, which the
/// agents are meant to have. Every role runs the attack, which also reads every file of the
/// test's folder: act's work folders, the workspace and the files act writes for each step.
#[test]
fn agents_started_by_the_action_under_act_find_no_credential() {
    let Some(act) = act_bin() else {
        return;
    };
    require_python();
    let (token, api_key) = canaries();
    let control = format!("control-{}", random_hex());
    let h = Hostile::github("", "", &token);
    let loot = h.root().join("loot");
    let attack = h.attack_script();
    let everything = h.root().to_path_buf();
    std::fs::write(
        &h.p.script,
        format!(
            "rules:\n{}\n{}",
            attacking_rules_reading(&attack, &loot, &[&everything]),
            DEMO_RULES
        ),
    )
    .expect("script");
    h.p.use_process(GATED_PROCESS);
    h.p.repo.write("specs/a.md", "# A\n\nBuild A.\n");
    copy_action(&h.p.repo.path);
    // `agent-user: ""`: under act `auto` means the same, said here so the case is plain.
    h.p.repo.write(
        ".github/workflows/test.yml",
        &action_workflow(
            r#"git clone -q "$HYPERLOOP_TEST_ORIGIN" ."#,
            "${{ secrets.HOSTILE_AGENT_KEY }}",
            "          command: step\n          github-token: ${{ secrets.GITHUB_TOKEN }}\n          agent-user: \"\"",
        ),
    );
    h.p.commit_all("a spec, the action, a workflow");
    h.git(&["push", "-q", "origin", "main"]);
    std::fs::create_dir_all(&loot).expect("loot");
    // The upload step keeps the transcripts folder here (act, run as the scenario's user, cannot
    // read the artifact client in the test cache): what an artifact would hold.
    let kept = h.root().join("uploads");
    std::fs::create_dir_all(&kept).expect("uploads");
    let upload = keeping_upload(&h.p.env, &kept);
    h.hand_over();
    // After the hand-over, which would give act's copy to the scenario's user.
    let runner = ActRunner::new(h.root(), &act);
    let gh = h.gh.as_ref().expect("github");
    let bin_dir = hyperloop_bin().parent().expect("bin dir").to_path_buf();
    let args: Vec<String> = vec![
        "-W".into(),
        ".github/workflows/test.yml".into(),
        "--env".into(),
        format!("GITHUB_API_URL={}", gh.url),
        "--env".into(),
        format!("GITHUB_GRAPHQL_URL={}/graphql", gh.url),
        "--env".into(),
        "GITHUB_REPOSITORY=acme/widgets".into(),
        "--env".into(),
        format!("HYPERLOOP_TEST_ORIGIN={}", h.p.repo.origin.display()),
        "--env".into(),
        format!("HYPERLOOP_BIN_DIR={}", bin_dir.display()),
    ]
    .into_iter()
    .chain(upload)
    .collect();
    let ctl = h.control_process(&control);

    let cmd = act_command(
        &h.p.env,
        &runner.act,
        &h.p.repo.path,
        "workflow_dispatch",
        &args,
        None,
    );
    let out = runner.run(
        cmd,
        format!("GITHUB_TOKEN={token}\nHOSTILE_AGENT_KEY={api_key}\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(act_output(&log, "spawned"), "3", "{log}");
    assert_eq!(act_output(&log, "progress"), "waiting", "{log}");
    // The canary was the working credential: the fake accepted it for the PR.
    assert_eq!(gh.pr_count(), 1, "{}", describe(&out));

    let roles = ["pm", "implementer", "verifier"];
    assert_attack_was_real(&loot, &roles, &control, ctl.0.id());
    for role in roles {
        let dir = loot.join(role);
        // The key the action was given reached the agent: these agents are the action's, and
        // the search sees a secret that went through the action's steps.
        assert!(
            file_holds(&dir.join("own-environ"), &api_key),
            "the {role} holds the Anthropic key the action was given"
        );
        let ancestors = std::fs::read_to_string(dir.join("ancestors")).unwrap_or_default();
        let act_line = ancestors
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(&*runner.act.to_string_lossy()))
            .unwrap_or_else(|| panic!("the {role} runs under act:\n{ancestors}"));
        assert!(
            act_line.ends_with("environ=unreadable"),
            "act, the runner's stand-in, is closed to the agents by this test (see ActRunner) and \
             not by anything under test; if it is open, the test no longer separates the runner \
             from the action: {act_line}"
        );
        if is_root() {
            let status = std::fs::read_to_string(dir.join("own-status")).unwrap_or_default();
            assert!(
                status
                    .lines()
                    .any(|l| l.starts_with("Uid:") && l.contains(&NOBODY.to_string())),
                "the tests run as root, so act and its steps ran as uid {NOBODY}:\n{status}"
            );
        }
    }
    let needles = vec![
        base64(token.as_bytes()),
        base64(format!("x-access-token:{token}").as_bytes()),
        token,
    ];
    let found = sightings(&loot, &needles);
    assert!(
        found.is_empty(),
        "the agents obtained the job's token:\n{}",
        found.join("\n")
    );
    // What the upload step was given: the agents' transcripts, and in them neither the token nor
    // the Anthropic key the agents held and printed.
    assert!(log.contains("KEPT hyperloop-transcripts-"), "{log}");
    let mut secrets = needles;
    secrets.push(api_key);
    let found = sightings(&kept, &secrets);
    assert!(
        found.is_empty(),
        "a transcript for the artifact holds a secret:\n{}",
        found.join("\n")
    );
}

#[test]
fn a_credential_persisted_in_git_config_is_out_of_reach() {
    require_python();
    let (token, _) = canaries();
    let control = format!("control-{}", random_hex());
    let h = Hostile::github("", "", &token);
    let loot = h.root().join("loot");
    let attack = h.attack_script();
    std::fs::write(
        &h.p.script,
        format!("rules:\n{}\n{}", attacking_rules(&attack, &loot), DEMO_RULES),
    )
    .expect("script");
    h.p.use_process(GATED_PROCESS);
    h.p.repo.write("specs/a.md", "# A\n\nBuild A.\n");
    h.p.commit_all("spec");
    h.git(&["push", "-q", "origin", "main"]);
    // What `actions/checkout` leaves with its default `persist-credentials: true`.
    let header_secret = base64(format!("x-access-token:{token}").as_bytes());
    h.git(&[
        "config",
        "--local",
        "http.https://github.com/.extraheader",
        &format!("AUTHORIZATION: basic {header_secret}"),
    ]);
    std::fs::create_dir_all(&loot).expect("loot");
    h.hand_over();
    let ctl = h.control_process(&control);

    let out = h.hyperloop(&["step"], &[("GITHUB_TOKEN", token.as_str())]);
    let needles = vec![token, header_secret];
    match out.status.code() {
        // Refusing to start agents is one of the two answers the issue allows.
        Some(2) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("persist-credentials"), "{}", describe(&out));
            assert!(
                !loot.join("pm").exists() && !loot.join("implementer").exists(),
                "no agent ran"
            );
        }
        Some(0) => {
            assert_attack_was_real(&loot, &["pm", "implementer", "verifier"], &control, ctl.0.id());
            let found = sightings(&loot, &needles);
            assert!(
                found.is_empty(),
                "the agents obtained a credential:\n{}",
                found.join("\n")
            );
        }
        _ => panic!("{}", describe(&out)),
    }
}

/// Rules of an agent that runs `script` (with `sh`) as task `task`'s implementer, the first time.
fn attacker_rule(task: &str, script: &str) -> String {
    let shell = serde_json::to_string(script).expect("json");
    format!("  - role: implementer\n    task: {task}\n    attempt: 0\n    actions:\n      - shell: {shell}\n")
}

/// Shell that sets `$M` to the git directory of the repository the checkout borrows from.
const FIND_MAIN: &str = "M=$(dirname \"$(head -n1 .git/objects/info/alternates)\")";

#[test]
fn moving_another_tasks_branch_in_the_repository_is_undone_and_never_merged() {
    let loot_name = "evil-commit";
    let h = Hostile::local("", "");
    let loot = h.root().join(loot_name);
    // The commit is made in the repository itself (its objects are readable and writable to
    // the agent), on top of task-002's verified work, adding a file nobody verified.
    let script = format!(
        "set -e; {FIND_MAIN}; export GIT_DIR=\"$M\"\n\
         git rev-parse -q --verify refs/heads/worker/task-002 >/dev/null || {{ echo 'no task-002 branch' > '{loot}'; exit 1; }}\n\
         blob=$(echo evil | git hash-object -w --stdin)\n\
         tree=$( (git ls-tree refs/heads/worker/task-002; printf '100644 blob %s\\tevil.txt\\n' \"$blob\") | git mktree)\n\
         c=$(git commit-tree \"$tree\" -p refs/heads/worker/task-002 -m 'task-002: more')\n\
         git update-ref refs/heads/worker/task-002 \"$c\"\n\
         echo \"$c\" > '{loot}'",
        loot = loot.display()
    );
    let rules = format!(
        "{}      - implement_task: true\n      - verdict: {{verdict: pass}}\n",
        attacker_rule("task-003", &script)
    );
    std::fs::write(&h.p.script, format!("rules:\n{rules}\n{}", DEMO_RULES)).expect("script");
    h.p.use_process(GATED_PROCESS);
    // One worker at a time: task-002 is verified and waits at its gate before task-003 starts.
    h.p.set_max_workers(1);
    h.p.repo.write("specs/a.md", "# A\n");
    h.p.write_task("task-002", "specs/a.md", &[]);
    h.p.write_task("task-003", "specs/a.md", &[]);
    h.p.commit_all("tasks");

    // `run` ends with exit 3 when nothing more can progress: both tasks wait at their gates.
    let out = h.hyperloop(&["run"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let evil = std::fs::read_to_string(&loot)
        .unwrap_or_else(|_| panic!("the attack ran: {}", describe(&out)))
        .trim()
        .to_string();
    assert_eq!(evil.len(), 40, "the attack moved the branch: {evil}");

    let evs = events(&out);
    let restored = named(&evs, "ref_restored");
    assert!(
        restored
            .iter()
            .any(|e| e["branch"] == "worker/task-002" && e["found"] == evil.as_str()),
        "the move is reported with its own event: {}",
        describe(&out)
    );
    let attacker_runs: Vec<&Value> = named(&evs, "worker_reaped")
        .into_iter()
        .filter(|e| e["task_id"] == "task-003")
        .collect();
    assert_eq!(
        attacker_runs.first().map(|e| e["verdict"].clone()),
        Some(Value::from("error")),
        "the attacker's run counts as an error: {attacker_runs:?}"
    );
    let tip = h.git(&["rev-parse", "refs/heads/worker/task-002"]);
    assert_ne!(tip, evil, "task-002's branch is back where hyperloop put it");
    assert!(
        !h.p.env
            .command("git")
            .current_dir(&h.p.repo.path)
            .args(["merge-base", "--is-ancestor", &evil, &tip])
            .status()
            .expect("git")
            .success(),
        "the forged commit is not on task-002's branch"
    );

    // The gate approves what was verified; the forged commit never reaches main.
    assert_eq!(h.p.task("task-002")["phase"], "human-review");
    let out = h.hyperloop(&["approve", "task-002"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let out = h.hyperloop(&["step"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(h.p.task("task-002")["status"], "complete");
    let files = h.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(files.contains("impl/task-002.md"), "{files}");
    assert!(!files.contains("evil.txt"), "never merged: {files}");
}

#[test]
fn checking_out_main_in_its_checkout_leaves_the_real_main_alone() {
    // The agent commits on `main` in its own checkout, forces it there too, and leaves
    // uncommitted work on it: in a shared worktree all of this would land on the real main.
    let script = "set -e\n\
                  git checkout -q main || git checkout -q --ignore-other-worktrees main\n\
                  echo evil > evil-main.txt\n\
                  git add -A\n\
                  git commit -q -m 'evil on main'\n\
                  git update-ref refs/heads/main HEAD\n\
                  echo more > evil-dirty.txt\n\
                  git log -1 --format=%s main > \"$HYPERLOOP_ATTACK_DONE\"";
    let h = Hostile::local("", "");
    let done = h.root().join("attack-done");
    let script = script.replace("$HYPERLOOP_ATTACK_DONE", &done.display().to_string());
    let rules = format!(
        "{}      - verdict: {{verdict: pass}}\n",
        attacker_rule("task-001", &script)
    );
    std::fs::write(&h.p.script, format!("rules:\n{rules}\n{}", DEMO_RULES)).expect("script");
    h.p.repo.write("specs/a.md", "# A\n");
    h.p.write_task("task-001", "specs/a.md", &[]);
    h.p.commit_all("task");

    let out = h.hyperloop(&["run"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let attacked = std::fs::read_to_string(&done).unwrap_or_default();
    assert_eq!(
        attacked.trim(),
        "evil on main",
        "the attack ran: {}",
        describe(&out)
    );
    let log = h.git(&["log", "--format=%s", "main"]);
    assert!(!log.contains("evil on main"), "the real main is untouched: {log}");
    let files = h.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(
        !files.contains("evil-main.txt") && !files.contains("evil-dirty.txt"),
        "nothing of the checkout's main reached the real main: {files}"
    );
    assert_eq!(h.git(&["status", "--porcelain"]), "", "the user's tree is clean");
    // Later steps still work.
    let out = h.hyperloop(&["step"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn a_task_file_naming_another_branch_is_invalid_and_the_branch_untouched() {
    let h = Hostile::local("", "");
    h.p.repo.write("specs/a.md", "# A\n");
    h.p.write_task("task-001", "specs/a.md", &[]);
    let text = h.p.repo.read("specs/tasks/task-001.md");
    h.p.repo.write(
        "specs/tasks/task-001.md",
        &text.replace("branch: null", "branch: release"),
    );
    h.p.commit_all("a task that steers its branch");
    h.git(&["branch", "release", "main~1"]);
    let release = h.git(&["rev-parse", "release"]);

    let out = h.hyperloop(&["step"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("task-001.md") && stderr.contains("branch"),
        "the file and field are named: {}",
        describe(&out)
    );
    assert!(named(&events(&out), "worker_spawned").is_empty(), "no agent ran");
    assert_eq!(h.git(&["rev-parse", "release"]), release, "release untouched");
}

#[test]
fn a_fifo_result_file_does_not_hang_the_step() {
    let script = "rm -f \"$HYPERLOOP_RESULT_FILE\" && mkfifo \"$HYPERLOOP_RESULT_FILE\"";
    let rules = format!(
        "{}      - implement_task: true\n",
        attacker_rule("task-001", script)
    );
    let h = Hostile::local("", "");
    std::fs::write(&h.p.script, format!("rules:\n{rules}\n{}", DEMO_RULES)).expect("script");
    h.p.repo.write("specs/a.md", "# A\n");
    h.p.write_task("task-001", "specs/a.md", &[]);
    h.p.commit_all("task");

    let out = h.hyperloop_within(&["step"], Duration::from_secs(90));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    let first = named(&evs, "worker_reaped")
        .into_iter()
        .find(|e| e["task_id"] == "task-001" && e["role"] == "implementer")
        .cloned()
        .unwrap_or_else(|| panic!("the implementer was reaped: {}", describe(&out)));
    assert_eq!(first["verdict"], "error", "{first}");
    assert!(
        named(&evs, "task_looped_back")
            .iter()
            .any(|e| e["findings_preview"].as_str().is_some_and(|p| p.contains("FIFO"))),
        "the error names the FIFO: {}",
        describe(&out)
    );
}

#[test]
fn a_result_file_symlinked_out_of_the_checkout_is_not_accepted() {
    let h = Hostile::local("", "");
    // A pass verdict somewhere the agent can write, outside its checkout.
    let planted = h.root().join("planted-result.json");
    std::fs::write(
        &planted,
        r#"{"verdict": "pass", "findings": 0, "detail": "planted"}"#,
    )
    .expect("planted");
    let script = format!(
        "rm -f \"$HYPERLOOP_RESULT_FILE\" && ln -s '{}' \"$HYPERLOOP_RESULT_FILE\"",
        planted.display()
    );
    // Every verifier run hands in the symlink: the task must never pass verification.
    let shell = serde_json::to_string(&script).expect("json");
    let rules = format!("  - role: verifier\n    actions:\n      - shell: {shell}\n");
    std::fs::write(&h.p.script, format!("rules:\n{rules}\n{}", DEMO_RULES)).expect("script");
    h.p.repo.write("specs/a.md", "# A\n");
    h.p.write_task("task-001", "specs/a.md", &[]);
    h.p.commit_all("task");

    let out = h.hyperloop_within(&["step"], Duration::from_secs(90));
    let evs = events(&out);
    let verifier: Vec<&Value> = named(&evs, "worker_reaped")
        .into_iter()
        .filter(|e| e["role"] == "verifier")
        .collect();
    assert!(!verifier.is_empty(), "the verifier ran: {}", describe(&out));
    assert!(
        verifier.iter().all(|e| e["verdict"] == "error"),
        "a symlinked result is an error: {verifier:?}"
    );
    assert!(
        named(&evs, "task_looped_back")
            .iter()
            .any(|e| e["findings_preview"]
                .as_str()
                .is_some_and(|p| p.contains("symbolic link"))),
        "the error names the symlink: {}",
        describe(&out)
    );
    assert_ne!(h.p.task("task-001")["status"], "complete");
    assert!(named(&evs, "merge_attempted").is_empty(), "nothing merged");
    let files = h.git(&["ls-tree", "-r", "--name-only", "main"]);
    assert!(!files.contains("impl/task-001.md"), "{files}");
}

/// The pid and process group of the flock an agent left, from its pid file.
fn leftover_pid(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Kills the process group the agent's leftover made with `setsid` (its pid is the group's id).
struct KillGroup(PathBuf);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = leftover_pid(&self.0)
            && pid > 1
        {
            // SAFETY: kill with integer arguments only.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// A project whose implementer leaves `setsid env -i flock <git dir>/hyperloop.lock sleep 600`
/// behind, its pid in the returned file.
fn lock_thief() -> (Hostile, PathBuf) {
    let h = Hostile::local("", "");
    let pidfile = h.root().join("leftover.pid");
    // `exec` keeps the pid: the session leader is flock itself, holding the lock.
    let script = format!(
        "{FIND_MAIN}; setsid env -i sh -c 'echo $$ > \"$1\"; exec flock \"$2\"/hyperloop.lock sleep 600' sh '{}' \"$M\" </dev/null >/dev/null 2>&1 &\n\
         for i in $(seq 50); do [ -s '{}' ] && break; sleep 0.1; done",
        pidfile.display(),
        pidfile.display()
    );
    let rules = format!(
        "{}      - implement_task: true\n      - verdict: {{verdict: pass}}\n",
        attacker_rule("task-001", &script)
    );
    std::fs::write(&h.p.script, format!("rules:\n{rules}\n{}", DEMO_RULES)).expect("script");
    h.p.use_process(GATED_PROCESS);
    h.p.repo.write("specs/a.md", "# A\n");
    h.p.write_task("task-001", "specs/a.md", &[]);
    h.p.commit_all("task");
    (h, pidfile)
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    Path::new(&format!("/proc/{pid}")).exists() && unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn a_step_lock_held_by_an_agents_leftover_is_reported_not_skipped() {
    let (h, pidfile) = lock_thief();
    let _cleanup = KillGroup(pidfile.clone());
    let out = h.hyperloop_within(&["step"], Duration::from_secs(90));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let pid = leftover_pid(&pidfile).expect("the agent started its leftover");

    let out = h.hyperloop_within(&["step"], Duration::from_secs(60));
    if alive(pid) {
        // The leftover survived: the lock it took must be reported with its holder.
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&pid.to_string()) && stderr.contains("flock"),
            "the holder's pid and command are named: {}",
            describe(&out)
        );
        assert!(
            named(&events(&out), "step_skipped").is_empty(),
            "{}",
            describe(&out)
        );
    } else {
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    }
}

#[test]
fn no_detached_descendant_outlives_the_agents_run() {
    let (h, pidfile) = lock_thief();
    let _cleanup = KillGroup(pidfile.clone());
    let out = h.hyperloop_within(&["step"], Duration::from_secs(90));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let pid = leftover_pid(&pidfile).expect("the agent started its leftover");
    assert!(!alive(pid), "the agent's leftover {pid} outlived the step");
    let out = h.hyperloop_within(&["step"], Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        named(&events(&out), "step_skipped").is_empty(),
        "{}",
        describe(&out)
    );
}

#[test]
fn task_ids_git_refuses_in_a_ref_name_are_invalid_task_files() {
    for id in [
        "\"task-0\\n01\"",
        "\"task~1\"",
        "\"task..1\"",
        "\"task 1\"",
        "\"task:1\"",
        "\"task-1.lock\"",
        "\"../../etc\"",
    ] {
        let h = Hostile::local("", "");
        h.p.repo.write("specs/a.md", "# A\n");
        h.p.repo.write(
            "specs/tasks/task-001.md",
            &format!(
                "---\nid: {id}\ntitle: T\nspec_ref: specs/a.md\nstatus: not-started\nphase: null\ndeps: []\nround: 0\nbranch: null\npr: null\n---\nDo it.\n"
            ),
        );
        h.p.commit_all("a task with a bad id");
        let out = h.hyperloop(&["step"], &[]);
        assert_eq!(out.status.code(), Some(2), "id {id}: {}", describe(&out));
        assert!(
            named(&events(&out), "worker_spawned").is_empty(),
            "id {id}: no agent ran"
        );
        assert_eq!(
            h.git(&["for-each-ref", "refs/heads/worker/"]),
            "",
            "id {id}: no branch made"
        );
    }
}

#[test]
fn timeouts_beyond_a_week_are_config_errors() {
    for key in ["worker_timeout", "stall_timeout"] {
        let h = Hostile::local("", "");
        let cfg = h.p.repo.read(".hyperloop.yaml");
        let cfg = cfg
            .lines()
            .map(|l| {
                if l.trim_start().starts_with(&format!("{key}:")) {
                    format!("  {key}: 18446744073709551615")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        h.p.repo.write(".hyperloop.yaml", &format!("{cfg}\n"));
        h.p.repo.write("specs/a.md", "# A\n");
        h.p.write_task("task-001", "specs/a.md", &[]);
        h.p.commit_all("huge timeout");
        let out = h.hyperloop(&["step"], &[]);
        assert_eq!(out.status.code(), Some(2), "{key}: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(key),
            "{key} is named: {}",
            describe(&out)
        );
        assert_eq!(
            h.git(&["for-each-ref", "refs/heads/worker/"]),
            "",
            "{key}: nothing ran"
        );
    }
}
