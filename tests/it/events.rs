//! The event stream of CONTRACT §7, end to end: a whole local `run` with the scripted agent, read
//! back from standard error in both formats. Checks names, order, fields and levels, that the two
//! formats carry the same events, that `log_level` filters, and that standard output holds only
//! the command's own result.

use std::path::PathBuf;
use std::process::Output;

use serde_json::{Map, Value};

use crate::harness::{DEMO_RULES, TestEnv, TestRepo, describe, scripted_agent_bin};

struct Project {
    env: TestEnv,
    repo: TestRepo,
    _script: PathBuf,
}

impl Project {
    /// `rules` go before the defaults (first match wins); `observability` is the body of that
    /// section, indented by two spaces.
    fn new(rules: &str, observability: &str, extra: &str) -> Project {
        let env = TestEnv::new();
        let repo = env.repo("project");
        let script = env.root().join("agent-script.yaml");
        std::fs::write(&script, format!("rules:\n{rules}\n{DEMO_RULES}")).expect("script");
        let config = format!(
            "runtime:\n  max_workers: 2\n  agent_command: [\"{}\", \"--script\", \"{}\"]\n  worker_timeout: 60\n  stall_timeout: 30\npoll_interval: 0\nmax_cycles: 10\nobservability:\n{observability}\n{extra}",
            scripted_agent_bin().display(),
            script.display()
        );
        repo.write(".hyperloop.yaml", &config);
        repo.write("specs/greeting.md", "# Greeting\n\nSay hello.\n");
        env.git(&repo.path, &["add", "-A"]);
        env.git(&repo.path, &["commit", "-qm", "config and spec"]);
        Project {
            env,
            repo,
            _script: script,
        }
    }

    fn hyperloop(&self, args: &[&str]) -> Output {
        let mut all = vec!["--path", self.repo.path_str()];
        all.extend_from_slice(args);
        self.env.hyperloop(&all)
    }
}

/// One event as read back from either format.
#[derive(Debug, Clone)]
struct Ev {
    level: String,
    name: String,
    fields: Map<String, Value>,
}

impl Ev {
    fn get(&self, key: &str) -> &Value {
        self.fields.get(key).unwrap_or(&Value::Null)
    }
}

fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// Every line of standard error as a JSON event; panics on any other line.
fn json_events(out: &Output) -> Vec<Ev> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON event ({e}): {line}\n{}", describe(out)));
            let Value::Object(mut obj) = v else {
                panic!("not an object: {line}");
            };
            let keys: Vec<&String> = obj.keys().take(3).collect();
            assert_eq!(keys, ["timestamp", "level", "event"], "key order: {line}");
            let ts = obj.shift_remove("timestamp").unwrap_or_default();
            assert!(is_timestamp(ts.as_str().unwrap_or("")), "timestamp: {line}");
            let level = obj
                .shift_remove("level")
                .and_then(|v| v.as_str().map(str::to_string));
            let name = obj
                .shift_remove("event")
                .and_then(|v| v.as_str().map(str::to_string));
            Ev {
                level: level.unwrap_or_else(|| panic!("level: {line}")),
                name: name.unwrap_or_else(|| panic!("event: {line}")),
                fields: obj,
            }
        })
        .collect()
}

/// Every line of standard error as a console event (`TS [level  ] name k=v …`); panics on any
/// other line. Values are read back as JSON where they parse (numbers, quoted strings), else as
/// bare strings.
fn console_events(out: &Output) -> Vec<Ev> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A long event continues on indented lines; none is wider than a terminal.
    let mut joined: Vec<String> = Vec::new();
    for line in stderr.lines() {
        assert!(
            line.chars().count() <= 110,
            "a console line of {} characters: {line}",
            line.chars().count()
        );
        match joined.last_mut() {
            Some(last) if line.starts_with(' ') => {
                last.push(' ');
                last.push_str(line.trim_start());
            }
            _ => joined.push(line.to_string()),
        }
    }
    joined
        .iter()
        .map(|line| {
            let (ts, rest) = line
                .split_at_checked(24)
                .unwrap_or_else(|| panic!("short line: {line}"));
            assert!(is_timestamp(ts), "timestamp: {line}");
            let rest = rest
                .strip_prefix(" [")
                .unwrap_or_else(|| panic!("no level: {line}"));
            let (level, rest) = rest.split_once(']').unwrap_or_else(|| panic!("no level: {line}"));
            let rest = rest.trim_start();
            let (name, mut rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let mut fields = Map::new();
            while !rest.trim().is_empty() {
                rest = rest.trim_start();
                let (key, after) = rest
                    .split_once('=')
                    .unwrap_or_else(|| panic!("not key=value at `{rest}`: {line}"));
                let (value, after) = if after.starts_with('"') {
                    // A JSON string: find its closing quote.
                    let mut de = serde_json::Deserializer::from_str(after).into_iter::<Value>();
                    let v = de
                        .next()
                        .and_then(Result::ok)
                        .unwrap_or_else(|| panic!("bad quoted value: {line}"));
                    (v, &after[de.byte_offset()..])
                } else {
                    let (raw, after) = after.split_once(' ').unwrap_or((after, ""));
                    let v = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
                    (v, after)
                };
                fields.insert(key.to_string(), value);
                rest = after;
            }
            Ev {
                level: level.trim().to_string(),
                name: name.to_string(),
                fields,
            }
        })
        .collect()
}

fn names(evs: &[Ev]) -> Vec<&str> {
    evs.iter().map(|e| e.name.as_str()).collect()
}

fn named<'a>(evs: &'a [Ev], name: &str) -> Vec<&'a Ev> {
    evs.iter().filter(|e| e.name == name).collect()
}

fn position(evs: &[Ev], pred: impl Fn(&Ev) -> bool, what: &str) -> usize {
    evs.iter()
        .position(pred)
        .unwrap_or_else(|| panic!("no {what} in {:?}", names(evs)))
}

/// The shape every successful one-spec run has, whatever the format.
fn check_one_spec_run(evs: &[Ev]) {
    let n = names(evs);
    assert_eq!(n.first(), Some(&"orchestrator_started"), "{n:?}");
    assert_eq!(n.last(), Some(&"orchestrator_halted"), "{n:?}");
    let started = &evs[0];
    assert_eq!(started.level, "info");
    assert_eq!(started.get("mode"), "local");
    assert_eq!(started.get("max_workers"), 2);

    let cycle_started = position(evs, |e| e.name == "cycle_started", "cycle_started");
    let intake = position(evs, |e| e.name == "intake_ran", "intake_ran");
    let pm_spawned = position(
        evs,
        |e| e.name == "worker_spawned" && e.get("role") == "pm",
        "pm spawn",
    );
    let pm_reaped = position(
        evs,
        |e| e.name == "worker_reaped" && e.get("role") == "pm",
        "pm reap",
    );
    assert!(
        cycle_started < pm_spawned && pm_spawned < pm_reaped && pm_reaped < intake,
        "{n:?}"
    );
    let ir = &evs[intake];
    assert_eq!(ir.get("success"), true);
    assert_eq!(ir.get("unprocessed_specs"), 1);
    assert_eq!(ir.get("created_tasks"), 1);
    assert!(ir.get("duration_s").is_number(), "{ir:?}");

    // The task's workers, each spawn followed by its own reap, implementer before verifier.
    let task = |role: &str, name: &str| {
        position(
            evs,
            |e| e.name == name && e.get("task_id") == "task-001" && e.get("role") == role,
            &format!("{role} {name}"),
        )
    };
    let impl_spawned = task("implementer", "worker_spawned");
    let impl_reaped = task("implementer", "worker_reaped");
    let ver_spawned = task("verifier", "worker_spawned");
    let ver_reaped = task("verifier", "worker_reaped");
    assert!(intake < impl_spawned, "tasks start after intake made them: {n:?}");
    assert!(
        impl_spawned < impl_reaped && impl_reaped < ver_spawned && ver_spawned < ver_reaped,
        "{n:?}"
    );
    let merge = position(evs, |e| e.name == "merge_attempted", "merge_attempted");
    let completed = position(evs, |e| e.name == "task_completed", "task_completed");
    let cycle_done = position(evs, |e| e.name == "cycle_completed", "cycle_completed");
    assert!(
        ver_reaped < merge && merge < completed && completed < cycle_done,
        "{n:?}"
    );
    assert_eq!(
        cycle_done,
        evs.len() - 2,
        "cycle_completed just before the halt: {n:?}"
    );

    // Spawns and reaps pair up one to one.
    let key = |e: &Ev| format!("{}/{}/{}", e.get("task_id"), e.get("role"), e.get("round"));
    let mut spawned: Vec<String> = named(evs, "worker_spawned").into_iter().map(key).collect();
    let mut reaped: Vec<String> = named(evs, "worker_reaped").into_iter().map(key).collect();
    spawned.sort();
    reaped.sort();
    assert_eq!(spawned, reaped);
    assert_eq!(spawned.len(), 3, "{spawned:?}");

    for e in named(evs, "worker_reaped") {
        assert!(e.get("task_id").is_string(), "{e:?}");
        assert!(e.get("role").is_string(), "{e:?}");
        assert_eq!(e.get("verdict"), "pass", "{e:?}");
        assert!(e.get("round").is_u64(), "{e:?}");
        let d = e.get("duration_s").as_f64().unwrap_or(-1.0);
        assert!((0.0..60.0).contains(&d), "{e:?}");
        assert_eq!(e.level, "info", "a pass is info: {e:?}");
    }
    let m = &evs[merge];
    assert_eq!(m.get("task_id"), "task-001");
    assert_eq!(m.get("outcome"), "merged");
    assert_eq!(m.get("branch"), "worker/task-001");
    let c = &evs[completed];
    assert_eq!(c.get("task_id"), "task-001");
    assert_eq!(c.get("spec_ref"), "specs/greeting.md");
    let cc = &evs[cycle_done];
    assert_eq!(cc.get("progress"), "all-complete");
    assert_eq!(cc.get("complete"), 1);
    let halted = &evs[evs.len() - 1];
    assert_eq!(halted.level, "info");
    assert_eq!(halted.get("reason"), "all tasks complete");
    assert_eq!(halted.get("completed_tasks"), 1);
    assert_eq!(halted.get("failed_tasks"), 0);
    assert_eq!(halted.get("total_cycles"), 1);
    for e in evs {
        assert!(e.level == "info", "a clean run logs no warnings: {e:?}");
        assert!(
            !["task_advanced", "gate_checked", "task_failed", "task_looped_back"].contains(&e.name.as_str()),
            "{e:?}"
        );
    }
}

/// Standard output holds the command's result only: no event ever lands there.
fn check_stdout(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        "step: agents 3 started, 3 finished; 1 merged; 1/1 tasks complete (all-complete)\n",
        "{}",
        describe(out)
    );
}

#[test]
fn json_run_emits_the_contract_events_in_order() {
    let p = Project::new("", "  log_format: json", "");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    check_stdout(&out);
    let evs = json_events(&out);
    check_one_spec_run(&evs);
}

#[test]
fn console_run_carries_the_same_events_as_json() {
    let console = Project::new("", "  log_format: console", "");
    let out = console.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    check_stdout(&out);
    let console_evs = console_events(&out);
    check_one_spec_run(&console_evs);

    let json = Project::new("", "  log_format: json", "");
    let out = json.hyperloop(&["run"]);
    let json_evs = json_events(&out);
    assert_eq!(names(&console_evs), names(&json_evs));
    for (c, j) in console_evs.iter().zip(&json_evs) {
        assert_eq!(c.level, j.level, "{c:?} vs {j:?}");
        let ck: Vec<&String> = c.fields.keys().collect();
        let jk: Vec<&String> = j.fields.keys().collect();
        assert_eq!(ck, jk, "same fields in the same order: {c:?} vs {j:?}");
    }
}

#[test]
fn a_loop_back_and_a_failure_are_warnings_and_errors_with_their_fields() {
    // The verifier fails task-001 every time: round 0 loops back, round 1 hits the limit.
    let rules = r#"
  - role: verifier
    actions:
      - verdict: {verdict: fail, findings: 2, detail: "tests are missing"}
"#;
    let p = Project::new(rules, "  log_format: json", "max_task_rounds: 2\n");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let evs = json_events(&out);

    let fails: Vec<&Ev> = named(&evs, "worker_reaped")
        .into_iter()
        .filter(|e| e.get("role") == "verifier")
        .collect();
    assert_eq!(fails.len(), 2, "{:?}", names(&evs));
    for (round, e) in fails.iter().enumerate() {
        assert_eq!(e.level, "warning", "{e:?}");
        assert_eq!(e.get("verdict"), "fail");
        assert_eq!(e.get("round"), round as u64);
        assert_eq!(e.get("findings_count"), 2);
    }
    let looped = named(&evs, "task_looped_back");
    assert_eq!(looped.len(), 1, "{:?}", names(&evs));
    let l = looped[0];
    assert_eq!(l.level, "warning");
    assert_eq!(l.get("task_id"), "task-001");
    assert_eq!(l.get("round"), 1);
    assert_eq!(l.get("verdict"), "fail");
    assert!(
        l.get("findings_preview")
            .as_str()
            .unwrap_or("")
            .contains("tests are missing"),
        "{l:?}"
    );

    let failed = named(&evs, "task_failed");
    assert_eq!(failed.len(), 1, "{:?}", names(&evs));
    let f = failed[0];
    assert_eq!(f.level, "error");
    assert_eq!(f.get("task_id"), "task-001");
    assert!(
        f.get("reason").as_str().unwrap_or("").contains("max_task_rounds"),
        "{f:?}"
    );
    assert!(
        position(&evs, |e| e.name == "task_looped_back", "loop")
            < position(&evs, |e| e.name == "task_failed", "failure")
    );
    assert_eq!(named(&evs, "task_completed").len(), 0);
    assert_eq!(named(&evs, "merge_attempted").len(), 0);
    let improver = named(&evs, "process_improver_ran");
    assert_eq!(
        improver.len(),
        1,
        "the process improver learns from the loop-back"
    );
    assert!(improver[0].get("success").is_boolean());
    assert!(improver[0].get("duration_s").is_number());

    let halted = evs.last().expect("events");
    assert_eq!(halted.name, "orchestrator_halted");
    assert_eq!(halted.level, "error");
    assert_eq!(halted.get("failed_tasks"), 1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("step: ") && stdout.lines().count() == 1,
        "{stdout}"
    );
}

#[test]
fn log_level_filters_what_is_printed() {
    let rules = r#"
  - role: verifier
    attempt: 0
    actions:
      - verdict: {verdict: fail, findings: 1, detail: "not yet"}
"#;
    let p = Project::new(rules, "  log_format: json\n  log_level: warning", "");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = json_events(&out);
    assert!(!evs.is_empty(), "warnings still print: {}", describe(&out));
    for e in &evs {
        assert!(e.level == "warning" || e.level == "error", "{e:?}");
    }
    let n = names(&evs);
    assert!(n.contains(&"task_looped_back"), "{n:?}");
    assert!(n.contains(&"worker_reaped"), "the failed verification: {n:?}");
    for info in [
        "orchestrator_started",
        "cycle_started",
        "worker_spawned",
        "task_completed",
    ] {
        assert!(!n.contains(&info), "{info} is info: {n:?}");
    }

    // And debug adds the per-transition detail that info leaves out.
    let p = Project::new("", "  log_format: json\n  log_level: debug", "");
    let out = p.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = json_events(&out);
    let advanced = named(&evs, "task_advanced");
    assert!(!advanced.is_empty(), "{:?}", names(&evs));
    assert!(
        advanced
            .iter()
            .all(|e| e.level == "debug" && e.get("task_id") == "task-001")
    );
}
