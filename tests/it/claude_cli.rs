//! The real Claude Code CLI as a worker, offline: the default `runtime.agent_command` runs against
//! a scripted Anthropic Messages API on loopback. The first turn answers with a `Bash` tool call
//! that edits a file, commits it with trailers and writes the result file; the next turn ends the
//! conversation. This checks that the worker protocol (prompt on standard input, environment,
//! result file, stream-json cost) works with the program users actually run.
//!
//! The CLI is large, so it lives in the test-dependency cache (`.ci/setup-test-deps.sh`). Without
//! it the test says loudly that it was skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use hyperloop::config::Config;
use hyperloop::worker::Verdict;

use crate::support::worker_fixture::{GIT_ENV, WorkerFixture, run};

fn claude_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HYPERLOOP_CLAUDE_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let cache = std::env::var_os("HYPERLOOP_TEST_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hyperloop-test")))?;
    Some(cache.join("claude/node_modules/.bin/claude")).filter(|p| p.exists())
}

/// The shell command the scripted model asks claude to run.
const BASH_COMMAND: &str = r#"printf 'written by claude\n' > claude.txt && git add claude.txt && git commit -q -m 'feat: add claude.txt' --trailer "Spec-Ref: $HYPERLOOP_SPEC_REF" --trailer "Task-Ref: $HYPERLOOP_TASK_ID" && printf '{"verdict":"pass","findings":0,"detail":"done by claude"}' > "$HYPERLOOP_RESULT_FILE" && echo committed"#;

const PROMPT: &str = "Create claude.txt, commit it, and write the result file.\n";

/// A scripted Messages API: records every request it sees.
struct StubApi {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl StubApi {
    fn start() -> StubApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || {
                    let _ = serve(conn, &seen);
                });
            }
        });
        StubApi { port, requests }
    }

    fn log(&self) -> String {
        self.requests.lock().map(|r| r.join("\n")).unwrap_or_default()
    }
}

/// Serves requests on one connection until the client closes it.
fn serve(conn: TcpStream, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    length = v.trim().parse().unwrap_or(0);
                } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                }
            }
        }
        let body = if chunked {
            read_chunked(&mut reader)?
        } else {
            let mut b = vec![0u8; length];
            reader.read_exact(&mut b)?;
            b
        };
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if let Ok(mut s) = seen.lock() {
            s.push(format!("{method} {path} {}", summarize(&body)));
        }
        let (status, content_type, payload) = answer(&method, &path, &body);
        write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nrequest-id: req_stub\r\n\r\n",
            payload.len()
        )?;
        out.write_all(payload.as_bytes())?;
        out.flush()?;
    }
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        let mut chunk = vec![0u8; n + 2];
        reader.read_exact(&mut chunk)?;
        if n == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

/// A short description of a request, for failure messages.
fn summarize(body: &Value) -> String {
    let tools = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|t| t.len())
        .unwrap_or(0);
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map(|m| m.len())
        .unwrap_or(0);
    format!(
        "model={} stream={} tools={tools} messages={messages} tool_result={} saw_prompt={}",
        body.get("model").and_then(Value::as_str).unwrap_or("-"),
        body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        has_tool_result(body),
        body.to_string().contains(PROMPT.trim())
    )
}

fn has_tool_result(body: &Value) -> bool {
    let Some(last) = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
    else {
        return false;
    };
    last.get("content").and_then(Value::as_array).is_some_and(|c| {
        c.iter()
            .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
    })
}

fn offers_bash(body: &Value) -> bool {
    body.get("tools").and_then(Value::as_array).is_some_and(|t| {
        t.iter()
            .any(|t| t.get("name").and_then(Value::as_str) == Some("Bash"))
    })
}

fn answer(method: &str, path: &str, body: &Value) -> (&'static str, &'static str, String) {
    if method == "POST" && path.starts_with("/v1/messages/count_tokens") {
        return (
            "200 OK",
            "application/json",
            json!({"input_tokens": 100}).to_string(),
        );
    }
    if method != "POST" || !path.starts_with("/v1/messages") {
        return (
            "404 Not Found",
            "application/json",
            json!({"type": "error", "error": {"type": "not_found_error", "message": "not here"}}).to_string(),
        );
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-sonnet-4-5")
        .to_string();
    let block = if offers_bash(body) && !has_tool_result(body) {
        json!({"type": "tool_use", "id": "toolu_01StubBashCall000000001", "name": "Bash",
               "input": {"command": BASH_COMMAND, "description": "Write, commit, report"}})
    } else if offers_bash(body) {
        json!({"type": "text", "text": "The change is committed and the result file is written."})
    } else {
        // Side requests (titles, summaries): any short text will do.
        json!({"type": "text", "text": "Scripted task"})
    };
    let stop_reason = if block["type"] == "tool_use" {
        "tool_use"
    } else {
        "end_turn"
    };
    let usage = json!({"input_tokens": 1200, "output_tokens": 80,
                       "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        let msg = json!({"id": "msg_stub", "type": "message", "role": "assistant", "model": model,
            "content": [block], "stop_reason": stop_reason, "stop_sequence": null, "usage": usage});
        return ("200 OK", "application/json", msg.to_string());
    }
    let mut events = vec![(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_stub", "type": "message",
                "role": "assistant", "model": model, "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": 1200, "output_tokens": 1,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
    )];
    if block["type"] == "tool_use" {
        let mut start = block.clone();
        start["input"] = json!({});
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": start}),
        ));
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta",
                "partial_json": block["input"].to_string()}}),
        ));
    } else {
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ));
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
                "text": block["text"]}}),
        ));
    }
    events.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push((
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": 80}}),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    let text: String = events
        .into_iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect();
    ("200 OK", "text/event-stream", text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_claude_cli_follows_the_worker_protocol() {
    let Some(claude) = claude_bin() else {
        crate::harness::skip("the claude CLI is not installed", ".ci/setup-test-deps.sh");
        return;
    };
    let api = StubApi::start();
    let f = WorkerFixture::new("rules: []\n");

    // The default command names `claude`: put it on the worker's PATH under that name.
    let bin_dir = f.env.root().join("bin");
    std::fs::create_dir_all(&bin_dir).expect("mkdir bin");
    let target = std::fs::canonicalize(&claude).expect("claude path");
    std::os::unix::fs::symlink(&target, bin_dir.join("claude")).expect("symlink");

    let mut spec = f.spec("task-001", "implementer");
    spec.command = Config::default().runtime.agent_command;
    assert_eq!(spec.command[0], "claude");
    spec.prompt = PROMPT.into();
    spec.worker_timeout = Duration::from_secs(180);
    spec.stall_timeout = Duration::from_secs(120);
    let mut parent = f.parent_env();
    for (k, v) in parent.iter_mut() {
        if k == "PATH" {
            let mut p = bin_dir.clone().into_os_string();
            p.push(":");
            p.push(&*v);
            *v = p;
        }
    }
    for (k, v) in [
        ("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{}", api.port)),
        ("ANTHROPIC_API_KEY", "sk-test".to_string()),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_string()),
        ("DISABLE_AUTOUPDATER", "1".to_string()),
        ("IS_SANDBOX", "1".to_string()),
        ("GITHUB_TOKEN", "canary-must-not-leak".to_string()),
    ] {
        parent.push((k.into(), v.into()));
    }
    spec.parent_env = Some(parent);
    spec.agent_env = GIT_ENV
        .iter()
        .chain(["DISABLE_AUTOUPDATER", "IS_SANDBOX"].iter())
        .map(|s| s.to_string())
        .collect();

    let out = run(&spec).await;
    let log = std::fs::read_to_string(&out.log_file).unwrap_or_default();
    let context = format!("{out:?}\n--- requests\n{}\n--- log\n{log}", api.log());
    assert_eq!(out.verdict, Verdict::Pass, "{context}");
    assert_eq!(out.detail, "done by claude", "{context}");
    assert_eq!(out.exit_code, Some(0), "{context}");
    assert_eq!(out.commits.len(), 1, "{context}");
    let wt = &spec.worktree;
    let msg = f.git_in(wt, &["log", "-1", "--format=%B", &out.commits[0]]);
    assert!(msg.starts_with("feat: add claude.txt"), "{msg}");
    assert!(msg.contains("Spec-Ref: specs/a.md\nTask-Ref: task-001"), "{msg}");
    assert_eq!(
        std::fs::read_to_string(wt.join("claude.txt")).expect("claude.txt"),
        "written by claude\n"
    );
    assert_eq!(out.suspicious, None);
    assert!(out.cost_usd.is_some_and(|c| c > 0.0), "cost: {context}");
    assert_eq!(out.num_turns, Some(2), "{context}");
    assert!(out.session_id.is_some(), "{context}");
    assert_eq!(out.is_error, Some(false), "{context}");
    // The prompt reached the model through standard input.
    assert!(
        api.log().contains("tools=") && api.log().contains("saw_prompt=true"),
        "{context}"
    );
    assert!(!log.contains("canary-must-not-leak"));

    // `hyperloop logs` reads this real transcript for a person: the tool call on one line, the
    // result with its cost, no raw stream-json.
    let shown = f
        .env
        .hyperloop(&["--path", f.repo.path_str(), "logs", "task-001"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert_eq!(
        shown.status.code(),
        Some(0),
        "{}",
        crate::harness::describe(&shown)
    );
    assert!(text.starts_with("# task-001 · implementer · round 0"), "{text}");
    assert!(text.contains("── session started (model "), "{text}");
    assert!(text.contains("→ Bash printf 'written by claude"), "{text}");
    assert!(text.contains("── result: success · 2 turns · $"), "{text}");
    assert!(!text.contains("{\"type\""), "{text}");
}
