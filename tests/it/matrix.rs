//! Matrix notifications against a real Synapse homeserver on loopback: bot registration with a
//! registration token, room creation and invitation, per-task threads that continue across
//! processes, cached credentials, the state file's privacy, and the time an outage may cost.
//!
//! Synapse lives in the test-dependency cache (`.ci/setup-synapse.sh`); one instance serves the
//! whole test binary and is killed when the binary exits. Without it the Synapse tests say loudly
//! that they were skipped; the outage tests need no homeserver and always run.

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyperloop::config::MatrixConfig;
use hyperloop::emit;
use hyperloop::events::{Halt, Notable, Origin};
use hyperloop::notify::{FLUSH_BUDGET, FlushReport, Notifier, REQUEST_TIMEOUT};
use hyperloop::pipeline::Verdict;
use serde_json::{Value, json};
use tracing_subscriber::layer::SubscriberExt as _;

use crate::harness::{TestEnv, TestRepo, describe, scripted_agent_bin};

const ADMIN_PASSWORD: &str = "admin-password-1";
const HUMAN_PASSWORD: &str = "human-password-1";
const SHARED_SECRET: &str = "hyperloop-test-shared-secret";

/// A running homeserver with an admin, a registration token and a person to invite.
struct Synapse {
    url: String,
    admin_token: String,
    registration_token: String,
    human: String,
    /// The shell that owns Synapse; it outlives this binary only long enough to clean up.
    _watchdog: std::process::Child,
}

static SYNAPSE: OnceLock<Option<Synapse>> = OnceLock::new();

fn venv() -> Option<PathBuf> {
    let cache = std::env::var_os("HYPERLOOP_TEST_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hyperloop-test")))?;
    let venv = cache.join("synapse-venv");
    venv.join(".installed").exists().then_some(venv)
}

/// The shared homeserver, started on first use; `None` (after a loud message) when Synapse is not
/// installed.
fn synapse() -> Option<&'static Synapse> {
    SYNAPSE
        .get_or_init(|| venv().map(|v| start_synapse(&v)))
        .as_ref()
        .or_else(|| {
            crate::harness::skip("Synapse is not installed", ".ci/setup-synapse.sh");
            None
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start_synapse(venv: &Path) -> Synapse {
    let dir = tempfile::Builder::new()
        .prefix("hyperloop-synapse-")
        .tempdir()
        .expect("tempdir")
        .keep();
    let port = free_port();
    let d = dir.display();
    let limit = "{per_second: 10000, burst_count: 10000}";
    let config = format!(
        "server_name: localhost
pid_file: {d}/homeserver.pid
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: {d}/homeserver.db
media_store_path: {d}/media
signing_key_path: {d}/signing.key
registration_shared_secret: \"{SHARED_SECRET}\"
macaroon_secret_key: \"hyperloop-test-macaroon\"
form_secret: \"hyperloop-test-form\"
report_stats: false
enable_registration: true
registration_requires_token: true
trusted_key_servers: []
suppress_key_server_warning: true
rc_message: {limit}
rc_registration: {limit}
rc_registration_token_validity: {limit}
rc_login:
  address: {limit}
  account: {limit}
  failed_attempts: {limit}
rc_joins:
  local: {limit}
  remote: {limit}
rc_invites:
  per_room: {limit}
  per_user: {limit}
  per_issuer: {limit}
rc_room_creation: {limit}
rc_admin_redaction: {limit}
"
    );
    let config_path = dir.join("homeserver.yaml");
    std::fs::write(&config_path, config).expect("synapse config");
    let python = venv.join("bin/python");
    let out = Command::new(&python)
        .args(["-m", "synapse.app.homeserver", "-c"])
        .arg(&config_path)
        .arg("--generate-keys")
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "synapse --generate-keys: {}",
        describe(&out)
    );

    // A shell parent watches this test binary and kills Synapse once it is gone, however it ends;
    // then removes the homeserver's folder.
    let script = r#"
"$1" -m synapse.app.homeserver -c "$2" >"$3" 2>&1 &
child=$!
while kill -0 "$4" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
kill -9 "$child" 2>/dev/null
wait "$child" 2>/dev/null
rm -rf "$5"
"#;
    let log = dir.join("synapse.log");
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(&python)
        .arg(&config_path)
        .arg(&log)
        .arg(std::process::id().to_string())
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start synapse");

    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = call("GET", &url, "/_matrix/client/versions", None, None) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "Synapse did not come up:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let register = |user: &str, password: &str, admin: bool| {
        let out = Command::new(venv.join("bin/register_new_matrix_user"))
            .args([
                "-u",
                user,
                "-p",
                password,
                if admin { "-a" } else { "--no-admin" },
            ])
            .args(["-k", SHARED_SECRET, &url])
            .output()
            .expect("register_new_matrix_user runs");
        assert!(out.status.success(), "register {user}: {}", describe(&out));
    };
    register("admin", ADMIN_PASSWORD, true);
    register("human", HUMAN_PASSWORD, false);
    let admin_token = login(&url, "admin", ADMIN_PASSWORD);
    let (status, minted) = call(
        "POST",
        &url,
        "/_synapse/admin/v1/registration_tokens/new",
        Some(&admin_token),
        Some(&json!({})),
    )
    .expect("mint a registration token");
    assert_eq!(status, 200, "{minted}");
    Synapse {
        url,
        admin_token,
        registration_token: minted["token"].as_str().expect("token").to_string(),
        human: "@human:localhost".to_string(),
        _watchdog: watchdog,
    }
}

/// One request; the status and the JSON answer (`null` when it is not JSON).
fn call(
    method: &str,
    base: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .new_agent();
    let url = format!("{base}{path}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let result = match method {
        "GET" => {
            let mut r = agent.get(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a.as_str());
            }
            r.call()
        }
        m => {
            let mut r = if m == "PUT" {
                agent.put(&url)
            } else {
                agent.post(&url)
            };
            if let Some(a) = &auth {
                r = r.header("Authorization", a.as_str());
            }
            r.send_json(body.cloned().unwrap_or(json!({})))
        }
    };
    let mut resp = result.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

fn login(url: &str, user: &str, password: &str) -> String {
    let (status, v) = call(
        "POST",
        url,
        "/_matrix/client/v3/login",
        None,
        Some(&json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        })),
    )
    .expect("login");
    assert_eq!(status, 200, "login {user}: {v}");
    v["access_token"].as_str().expect("access token").to_string()
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl Synapse {
    fn admin(&self, path: &str) -> Value {
        let (status, v) = call("GET", &self.url, path, Some(&self.admin_token), None).expect("admin call");
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// Users whose id contains `part`: tests run in parallel, so each counts its own bots.
    fn user_count(&self, part: &str) -> u64 {
        self.admin(&format!(
            "/_synapse/admin/v2/users?guests=false&limit=1000&name={}",
            enc(part)
        ))["total"]
            .as_u64()
            .expect("total")
    }

    /// The room's `m.room.message` events, oldest first.
    fn messages(&self, room: &str) -> Vec<Value> {
        let v = self.admin(&format!(
            "/_synapse/admin/v1/rooms/{}/messages?dir=f&limit=1000",
            enc(room)
        ));
        v["chunk"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["type"] == "m.room.message")
            .collect()
    }

    /// user id → membership, from the room's current state.
    fn members(&self, room: &str) -> Vec<(String, String)> {
        let v = self.admin(&format!("/_synapse/admin/v1/rooms/{}/state", enc(room)));
        let mut out: Vec<(String, String)> = v["state"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["type"] == "m.room.member")
            .map(|e| {
                (
                    e["state_key"].as_str().unwrap_or("").to_string(),
                    e["content"]["membership"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn config(&self) -> MatrixConfig {
        MatrixConfig {
            homeserver: self.url.clone(),
            room_id: None,
            token_env: None,
            registration_token_env: Some("TEST_MATRIX_REGISTRATION".into()),
            invite_user: Some(self.human.clone()),
            bot_username: None,
            verbose: false,
        }
    }

    fn env(&self) -> impl Fn(&str) -> Option<String> + '_ {
        move |name| (name == "TEST_MATRIX_REGISTRATION").then(|| self.registration_token.clone())
    }
}

/// Runs `events` with a fresh notifier installed, as one `step` process would, and flushes it.
fn one_process(
    config: &MatrixConfig,
    repo: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    events: impl FnOnce(),
) -> FlushReport {
    let notifier = Notifier::matrix(config, repo, env);
    let subscriber = tracing_subscriber::registry().with(notifier.boxed_layer());
    tracing::subscriber::with_default(subscriber, events);
    // What these tests check is what reaches the homeserver, not the exit budget (tests of
    // their own hold that): a homeserver on a loaded machine may take longer than the five
    // seconds a step waits to register a bot and make a room.
    notifier.flush_within(Duration::from_secs(60))
}

fn state(repo: &Path) -> (String, Value) {
    let path = repo.join(".hyperloop/matrix-state.json");
    let text = std::fs::read_to_string(&path).expect("state file");
    let v = serde_json::from_str(&text).expect("state is JSON");
    (text, v)
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

fn reaped(task: &str, role: &str, verdict: &str, round: u32) {
    Notable::WorkerReaped {
        task_id: task.into(),
        role: role.into(),
        verdict: Verdict::parse(verdict).expect("a verdict"),
        round,
        duration_s: 42.125,
        findings_count: 0,
        cost_usd: 0.0,
        origin: Origin::Step { cycle: 1 },
        log: None,
    }
    .emit();
}

fn spawned(task: &str, role: &str, round: u32) {
    Notable::WorkerSpawned {
        task_id: task.into(),
        role: role.into(),
        round,
        branch: Some(format!("worker/{task}")),
        spec_ref: "specs/widget.md".into(),
        origin: Origin::Step { cycle: 1 },
    }
    .emit();
}

fn bodies(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["content"]["body"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn auto_setup_registers_a_bot_creates_a_private_room_and_invites() {
    let Some(hs) = synapse() else { return };
    let env = TestEnv::new();
    let repo = env.repo("widget");
    let users_before = hs.user_count("hyperloop-widget-");

    let report = one_process(&hs.config(), &repo.path, &hs.env(), || {
        reaped("task-001", "verifier", "pass", 1);
    });
    assert_eq!(report.failure, None, "{report:?}");
    assert_eq!((report.sent, report.dropped), (1, 0), "{report:?}");
    assert_eq!(users_before, 0);
    assert_eq!(hs.user_count("hyperloop-widget-"), 1, "one bot registered");

    let state_file = repo.path.join(".hyperloop/matrix-state.json");
    assert_eq!(mode(&state_file), 0o600);
    let (text, st) = state(&repo.path);
    for key in ["access_token", "user_id", "device_id", "room_id", "threads"] {
        assert!(!st[key].is_null(), "{key} cached");
    }
    assert!(!text.to_lowercase().contains("password"), "{text}");
    assert!(
        !text.contains(&hs.registration_token),
        "the registration token is not cached"
    );
    let user = st["user_id"].as_str().expect("user");
    let local = user
        .strip_prefix("@hyperloop-widget-")
        .and_then(|r| r.strip_suffix(":localhost"))
        .unwrap_or_else(|| panic!("bot name: {user}"));
    assert!(
        local.len() == 8 && local.chars().all(|c| c.is_ascii_hexdigit()),
        "{user}"
    );

    let room = st["room_id"].as_str().expect("room");
    let info = hs.admin(&format!("/_synapse/admin/v1/rooms/{}", enc(room)));
    assert_eq!(info["name"], "hyperloop-widget");
    assert_eq!(info["public"], false);
    assert_eq!(info["join_rules"], "invite", "a private room");
    assert_eq!(
        hs.members(room),
        vec![
            (hs.human.clone(), "invite".to_string()),
            (user.to_string(), "join".to_string()),
        ]
    );
    let msgs = hs.messages(room);
    assert_eq!(bodies(&msgs), ["✅ task-001 verifier pass (round 1, 42.1 s)"]);
    assert_eq!(msgs[0]["sender"], user);
    assert_eq!(msgs[0]["content"]["msgtype"], "m.text");
    assert_eq!(
        st["threads"]["task-001"], msgs[0]["event_id"],
        "the first message is the root"
    );

    // The state file is ignored by git; the overlay folder beside it is not.
    let ignored = |rel: &str| {
        env.command("git")
            .current_dir(&repo.path)
            .args(["check-ignore", "-q", "--no-index", rel])
            .status()
            .expect("git")
            .success()
    };
    assert!(ignored(".hyperloop/matrix-state.json"));
    assert!(!ignored(".hyperloop/agents/kustomization.yaml"));
}

#[test]
fn threads_continue_across_processes_on_cached_credentials() {
    let Some(hs) = synapse() else { return };
    let env = TestEnv::new();
    let repo = env.repo("gadget");
    let config = hs.config();

    // First step.
    let first = one_process(&config, &repo.path, &hs.env(), || {
        emit!(INFO, "cycle_started", cycle = 1u64);
        spawned("task-001", "implementer", 0);
        reaped("task-001", "implementer", "pass", 0);
        reaped("task-002", "implementer", "pass", 0);
        reaped("task-001", "verifier", "fail", 0);
        Notable::TaskLoopedBack {
            task_id: "task-001".into(),
            spec_ref: "specs/widget.md".into(),
            round: 1,
            verdict: "fail".into(),
            findings_count: 1,
            findings_preview: "tests are missing".into(),
        }
        .emit();
        Notable::GatePolled {
            task_id: "task-002".into(),
            gate: "review".into(),
            cleared: false,
        }
        .emit();
    });
    assert_eq!((first.sent, first.failure.as_deref()), (4, None), "{first:?}");
    assert_eq!(hs.user_count("hyperloop-gadget-"), 1);
    let (_, st1) = state(&repo.path);

    // Second step: a new process with the cached credentials and thread roots.
    let second = one_process(&config, &repo.path, &hs.env(), || {
        reaped("task-001", "implementer", "pass", 1);
        Notable::TaskCompleted {
            task_id: "task-001".into(),
            spec_ref: "specs/widget.md".into(),
            total_rounds: 1,
            cost_usd: 0.0,
        }
        .emit();
        Notable::TaskFailed {
            task_id: "task-002".into(),
            spec_ref: "specs/widget.md".into(),
            reason: "max_task_rounds reached".into(),
            round: 1,
        }
        .emit();
        Notable::OrchestratorHalted {
            halt: Halt::Stuck {
                reason: "no task can progress".into(),
                blocked: Vec::new(),
            },
            total_cycles: 2,
            completed_tasks: 1,
            failed_tasks: 1,
        }
        .emit();
    });
    assert_eq!((second.sent, second.failure.as_deref()), (4, None), "{second:?}");
    assert_eq!(hs.user_count("hyperloop-gadget-"), 1, "no second registration");
    let (_, st2) = state(&repo.path);
    assert_eq!(st2["user_id"], st1["user_id"]);
    assert_eq!(st2["access_token"], st1["access_token"]);
    assert_eq!(st2["room_id"], st1["room_id"]);

    let room = st2["room_id"].as_str().expect("room");
    let msgs = hs.messages(room);
    assert_eq!(
        bodies(&msgs),
        [
            "✅ task-001 implementer pass (round 0, 42.1 s)",
            "✅ task-002 implementer pass (round 0, 42.1 s)",
            "❌ task-001 verifier fail (round 0, 42.1 s)",
            "🔁 task-001 looped back to round 1 after a fail verdict: tests are missing",
            "✅ task-001 implementer pass (round 1, 42.1 s)",
            "🎉 task-001 complete in round 1",
            "💀 task-002 failed in round 1: max_task_rounds reached",
            "🛑 hyperloop halted: no task can progress (1 complete, 1 failed, 2 cycles)",
        ]
    );
    for task in ["task-001", "task-002"] {
        let of_task: Vec<&Value> = msgs
            .iter()
            .filter(|m| m["content"]["body"].as_str().unwrap_or("").contains(task))
            .collect();
        let root = of_task[0]["event_id"].as_str().expect("root id");
        assert!(
            of_task[0]["content"]["m.relates_to"].is_null(),
            "the root is a plain message"
        );
        assert_eq!(st2["threads"][task], root);
        for m in &of_task[1..] {
            let rel = &m["content"]["m.relates_to"];
            assert_eq!(rel["rel_type"], "m.thread", "{m}");
            assert_eq!(rel["event_id"], root, "{m}");
            assert_eq!(rel["is_falling_back"], true, "{m}");
            assert_eq!(rel["m.in_reply_to"]["event_id"], root, "{m}");
        }
    }
    assert_ne!(st2["threads"]["task-001"], st2["threads"]["task-002"]);
    assert!(
        msgs[7]["content"]["m.relates_to"].is_null(),
        "the halt is not in a thread"
    );

    // The homeserver agrees: task-001's thread holds the four replies from both processes.
    let root = st2["threads"]["task-001"].as_str().expect("root");
    let token = st2["access_token"].as_str().expect("token");
    let (status, thread) = call(
        "GET",
        &hs.url,
        &format!(
            "/_matrix/client/v1/rooms/{}/relations/{}/m.thread?limit=50",
            enc(room),
            enc(root)
        ),
        Some(token),
        None,
    )
    .expect("relations");
    assert_eq!(status, 200, "{thread}");
    assert_eq!(thread["chunk"].as_array().map(Vec::len), Some(4), "{thread}");
}

#[test]
fn a_stale_cached_token_registers_a_new_bot_in_a_new_room() {
    let Some(hs) = synapse() else { return };
    let env = TestEnv::new();
    let repo = env.repo("stale");
    repo.write(
        ".hyperloop/matrix-state.json",
        &serde_json::to_string(&json!({
            "homeserver": hs.url,
            "user_id": "@gone:localhost",
            "access_token": "syt_revoked_long_ago",
            "room_id": "!old:localhost",
            "threads": {"task-001": "$old-root"},
        }))
        .expect("json"),
    );
    let report = one_process(&hs.config(), &repo.path, &hs.env(), || {
        reaped("task-001", "verifier", "pass", 0)
    });
    assert_eq!((report.sent, report.failure.as_deref()), (1, None), "{report:?}");
    let (_, st) = state(&repo.path);
    assert_ne!(st["user_id"], "@gone:localhost");
    assert_ne!(st["access_token"], "syt_revoked_long_ago");
    assert_ne!(st["room_id"], "!old:localhost");
    assert_ne!(
        st["threads"]["task-001"], "$old-root",
        "a new thread in the new room"
    );
    assert_eq!(mode(&repo.path.join(".hyperloop/matrix-state.json")), 0o600);
}

#[test]
fn manual_setup_posts_with_the_given_token_into_the_given_room() {
    let Some(hs) = synapse() else { return };
    let venv = venv().expect("venv");
    let out = Command::new(venv.join("bin/register_new_matrix_user"))
        .args(["-u", "manualbot", "-p", "manual-password-1", "--no-admin"])
        .args(["-k", SHARED_SECRET, &hs.url])
        .output()
        .expect("register");
    assert!(out.status.success(), "{}", describe(&out));
    let token = login(&hs.url, "manualbot", "manual-password-1");
    let (status, created) = call(
        "POST",
        &hs.url,
        "/_matrix/client/v3/createRoom",
        Some(&token),
        Some(&json!({"name": "ops", "preset": "private_chat"})),
    )
    .expect("createRoom");
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().expect("room").to_string();

    let env = TestEnv::new();
    let repo = env.repo("manual");
    let config = MatrixConfig {
        homeserver: hs.url.clone(),
        room_id: Some(room.clone()),
        token_env: Some("TEST_MATRIX_TOKEN".into()),
        registration_token_env: None,
        invite_user: None,
        bot_username: None,
        verbose: true,
    };
    let lookup = |name: &str| (name == "TEST_MATRIX_TOKEN").then(|| token.clone());
    let report = one_process(&config, &repo.path, &lookup, || {
        spawned("task-009", "implementer", 0);
        Notable::IntakeRan {
            success: true,
            counted: None,
            unprocessed_specs: 2,
            created_tasks: 3,
            duration_s: 1.0,
            cycle: 1,
            detail: None,
        }
        .emit();
    });
    assert_eq!((report.sent, report.failure.as_deref()), (2, None), "{report:?}");
    assert_eq!(hs.user_count("hyperloop-manual-"), 0, "no registration");
    let msgs = hs.messages(&room);
    assert_eq!(
        bodies(&msgs),
        [
            "▶️ task-009 implementer started (round 0)",
            "📥 intake: 2 specs → 3 new tasks"
        ]
    );
    assert!(msgs.iter().all(|m| m["sender"] == "@manualbot:localhost"));
    let (text, st) = state(&repo.path);
    assert_eq!(st["room_id"], room.as_str());
    assert!(
        st["access_token"].is_null(),
        "a token from the environment stays there"
    );
    assert!(!text.contains(&token));
}

/// A scripted-agent project whose configuration has `matrix` as its `observability.matrix` body.
fn cli_project(env: &TestEnv, name: &str, matrix: &str) -> TestRepo {
    let repo = env.repo(name);
    let script = env.root().join("agent-script.yaml");
    std::fs::write(
        &script,
        r#"rules:
  - role: pm
    actions:
      - pm_tasks_from_specs: true
      - verdict: {verdict: pass, detail: "tasks written"}
  - role: implementer
    actions:
      - implement_task: true
      - verdict: {verdict: pass, detail: "implemented"}
  - role: verifier
    attempt: 0
    actions:
      - verdict: {verdict: fail, findings: 1, detail: "needs a test"}
  - role: verifier
    actions:
      - verdict: {verdict: pass, detail: "looks right"}
  - role: process-improver
    actions:
      - verdict: {verdict: pass, detail: "nothing to improve"}
"#,
    )
    .expect("script");
    repo.write(
        ".hyperloop.yaml",
        &format!(
            "runtime:\n  max_workers: 2\n  agent_command: [\"{}\", \"--script\", \"{}\"]\n  worker_timeout: 60\npoll_interval: 0\nmax_cycles: 10\nobservability:\n  log_format: json\n  matrix:\n{matrix}\n",
            scripted_agent_bin().display(),
            script.display()
        ),
    );
    repo.write("specs/greeting.md", "# Greeting\n\nSay hello.\n");
    env.git(&repo.path, &["add", "-A"]);
    env.git(&repo.path, &["commit", "-qm", "config and spec"]);
    repo
}

#[test]
fn hyperloop_run_posts_a_thread_per_task_and_never_logs_a_secret() {
    let Some(hs) = synapse() else { return };
    let env = TestEnv::new();
    let repo = cli_project(
        &env,
        "cli",
        &format!(
            "    homeserver: {}\n    registration_token_env: MATRIX_REGISTRATION_TOKEN\n    invite_user: \"{}\"",
            hs.url, hs.human
        ),
    );
    let out = env
        .command(hyperloop_bin())
        .args(["--path", repo.path_str(), "run"])
        .env("MATRIX_REGISTRATION_TOKEN", &hs.registration_token)
        .output()
        .expect("hyperloop runs");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("matrix_disabled"), "{stderr}");
    let (text, st) = state(&repo.path);
    assert_eq!(mode(&repo.path.join(".hyperloop/matrix-state.json")), 0o600);
    assert!(!text.to_lowercase().contains("password"));
    let token = st["access_token"].as_str().expect("token");
    for secret in [token, hs.registration_token.as_str()] {
        assert!(!stderr.contains(secret), "a secret on stderr");
        assert!(!String::from_utf8_lossy(&out.stdout).contains(secret));
    }
    // The user's working tree stays clean: the state file is ignored.
    assert_eq!(env.git(&repo.path, &["status", "--porcelain"]), "");

    let room = st["room_id"].as_str().expect("room");
    let msgs = hs.messages(room);
    let b = bodies(&msgs);
    let task: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["content"]["body"].as_str().unwrap_or("").contains("task-001"))
        .collect();
    assert!(task.len() >= 6, "{b:?}");
    let root = &task[0]["event_id"];
    for m in &task[1..] {
        assert_eq!(m["content"]["m.relates_to"]["event_id"], *root, "{b:?}");
    }
    assert!(
        b.iter().any(|s| s.starts_with("🔁 task-001 looped back")),
        "{b:?}"
    );
    assert!(b.iter().any(|s| s.starts_with("🔀 task-001 merged")), "{b:?}");
    assert!(b.iter().any(|s| s.starts_with("🎉 task-001 complete")), "{b:?}");
    assert!(
        b.last()
            .is_some_and(|s| s.starts_with("🏁 hyperloop halted: all tasks complete (1 complete, 0 failed")),
        "{b:?}"
    );
    // Not verbose: no spawns, no intake, no cycle summaries.
    assert!(
        !b.iter()
            .any(|s| s.contains("started") || s.contains("intake") || s.contains("cycle ")),
        "{b:?}"
    );
}

fn hyperloop_bin() -> PathBuf {
    crate::harness::hyperloop_bin()
}

fn outage_config(homeserver: &str) -> MatrixConfig {
    MatrixConfig {
        homeserver: homeserver.to_string(),
        room_id: None,
        token_env: None,
        registration_token_env: Some("REG".into()),
        invite_user: None,
        bot_username: None,
        verbose: true,
    }
}

fn lots_of_events() {
    for i in 0..500u32 {
        let task = format!("task-{:03}", i % 7);
        reaped(&task, "verifier", "pass", i);
    }
}

#[test]
fn an_unreachable_homeserver_costs_almost_nothing() {
    let env = TestEnv::new();
    let repo = env.repo("offline");
    let reg = |_: &str| Some("reg-token-canary".to_string());
    let started = Instant::now();
    let notifier = Notifier::matrix(&outage_config("http://127.0.0.1:1"), &repo.path, &reg);
    let subscriber = tracing_subscriber::registry().with(notifier.boxed_layer());
    tracing::subscriber::with_default(subscriber, lots_of_events);
    let emitted = started.elapsed();
    let report = notifier.flush();
    let total = started.elapsed();
    assert!(
        emitted < Duration::from_secs(1),
        "emitting never waits: {emitted:?}"
    );
    assert!(total < REQUEST_TIMEOUT + Duration::from_millis(500), "{total:?}");
    assert!(report.finished, "{report:?}");
    assert_eq!(report.sent, 0);
    assert_eq!(report.dropped, 500, "{report:?}");
    let why = report.failure.expect("a failure");
    assert!(why.contains("unreachable"), "{why}");
    assert!(!why.contains("canary"));
    assert!(!repo.path.join(".hyperloop/matrix-state.json").exists());
}

#[test]
fn a_homeserver_that_never_answers_costs_one_request_timeout() {
    // Connections are accepted by the kernel's backlog, then nothing is ever said.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("addr"));
    let env = TestEnv::new();
    let repo = env.repo("silent");
    let reg = |_: &str| Some("reg".to_string());
    let started = Instant::now();
    let report = one_process(&outage_config(&url), &repo.path, &reg, lots_of_events);
    let total = started.elapsed();
    assert!(total >= REQUEST_TIMEOUT - Duration::from_millis(100), "{total:?}");
    assert!(total < FLUSH_BUDGET, "{total:?}");
    assert!(report.finished);
    assert_eq!(report.sent, 0);
    assert!(report.failure.is_some(), "{report:?}");
    drop(silent);
}

#[test]
fn hyperloop_run_finishes_normally_while_matrix_is_down() {
    let env = TestEnv::new();
    let repo = cli_project(
        &env,
        "down",
        "    homeserver: http://127.0.0.1:1\n    registration_token_env: MATRIX_REGISTRATION_TOKEN\n    verbose: true",
    );
    let started = Instant::now();
    let out = env
        .command(hyperloop_bin())
        .args(["--path", repo.path_str(), "run"])
        .env("MATRIX_REGISTRATION_TOKEN", "reg-token-canary")
        .output()
        .expect("hyperloop runs");
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(took < Duration::from_secs(30), "{took:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let disabled: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "matrix_disabled")
        .collect();
    assert_eq!(disabled.len(), 1, "one warning, then silence: {stderr}");
    assert_eq!(disabled[0]["level"], "warning");
    assert!(!stderr.contains("canary"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("step: ") && stdout.ends_with("1/1 tasks complete (all-complete)\n"),
        "{stdout}"
    );
    let mut buf = String::new();
    let _ = std::fs::File::open(repo.path.join(".hyperloop/matrix-state.json"))
        .map(|mut f| f.read_to_string(&mut buf));
    assert!(buf.is_empty(), "nothing cached from a failed set-up");
}
