//! Notifications fed by events. A [`NoticeLayer`] sits beside the standard-error formatter, picks
//! the events a chat room should hear about (the seed's Matrix column: high-signal events always,
//! progress chatter only with `verbose`, noise never), turns each into a one-line [`Notice`], and
//! hands it to a bounded queue without ever waiting. One background thread per process drains the
//! queue in order into a [`Sink`] (the Matrix client in [`matrix`]). The cycle never waits on the
//! network: the only wait is [`Notifier::flush`] at exit, and that is bounded by [`FLUSH_BUDGET`].
//! After the first failed delivery the thread stops trying for the rest of the process, so an
//! outage costs at most one request timeout.

pub mod matrix;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::Context;

use crate::config::MatrixConfig;
use crate::emit;

/// The most a process waits at exit for queued notices to go out.
pub const FLUSH_BUDGET: Duration = Duration::from_secs(5);

/// Per-request limit; one slow request is all an outage costs, since the first failure stops
/// delivery for the rest of the process.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Notices waiting for the network. A `run` produces a handful per task, so this only fills when
/// the homeserver is slow, and then dropping is better than holding the cycle.
const QUEUE_LEN: usize = 256;

/// The `tracing` target of `emit!` events.
const EVENTS_TARGET: &str = "hyperloop::events";

/// One message for the room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The event it came from.
    pub event: String,
    /// Messages about a task are threaded under the first one for that task.
    pub task_id: Option<String>,
    /// Plain text, one line, naming the task.
    pub text: String,
}

/// Where notices go. Called from the background thread only, one notice at a time, in order.
pub trait Sink: Send {
    /// Delivers one notice. An error stops delivery for the rest of the process.
    fn deliver(&mut self, notice: &Notice) -> std::result::Result<(), String>;
}

/// Events the room always hears about.
const ALWAYS: &[&str] = &[
    "worker_reaped",
    "task_looped_back",
    "task_completed",
    "task_failed",
    "merge_attempted",
    "orchestrator_halted",
    "orphan_found",
    "worker_timeout",
    "budget_exceeded",
];

/// Events the room hears about with `verbose: true`.
const VERBOSE: &[&str] = &[
    "orchestrator_started",
    "cycle_completed",
    "worker_spawned",
    "intake_ran",
    "process_improver_ran",
    "recovery_started",
];

/// Whether the room wants event `name` with these fields.
pub fn wanted(name: &str, fields: &Map<String, Value>, verbose: bool) -> bool {
    match name {
        // A gate poll that did not clear is noise; a cleared one is news.
        "gate_checked" => fields.get("cleared") == Some(&Value::Bool(true)),
        // A rebase retry is routine; giving up sends the task back to work.
        "rebase_conflict" => fields.get("looping_back") == Some(&Value::Bool(true)),
        // Intake and the process improver are reported by `intake_ran` and
        // `process_improver_ran`; their workers' reaps are no task's news.
        "worker_spawned" | "worker_reaped" if is_housekeeping(fields) => verbose && name == "worker_reaped",
        n if ALWAYS.contains(&n) => true,
        n if VERBOSE.contains(&n) => verbose,
        _ => false,
    }
}

fn is_housekeeping(fields: &Map<String, Value>) -> bool {
    matches!(
        fields.get("task_id").and_then(Value::as_str),
        Some(crate::task::INTAKE_ID | crate::task::IMPROVER_ID)
    )
}

fn text<'a>(fields: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    fields.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn num(fields: &Map<String, Value>, key: &str) -> Option<f64> {
    fields.get(key).and_then(Value::as_f64)
}

fn int(fields: &Map<String, Value>, key: &str) -> Option<i64> {
    fields
        .get(key)
        .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
}

/// Shortens free text (agent findings can be long) to one line of at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{}…", cut.trim_end())
    }
}

/// The readable line for an event: an emoji for the glance, the task id first, then what
/// happened. Unknown events fall back to `name key=value …`.
pub fn render(name: &str, fields: &Map<String, Value>) -> Notice {
    let task = text(fields, "task_id").map(str::to_string);
    let id = task.as_deref().unwrap_or("-");
    let role = text(fields, "role").unwrap_or("worker");
    let round = int(fields, "round");
    let line = match name {
        "worker_reaped" => {
            let verdict = text(fields, "verdict").unwrap_or("unknown");
            let icon = match verdict {
                "pass" => "✅",
                "fail" => "❌",
                "timeout" => "⏱️",
                _ => "⚠️",
            };
            let mut facts = Vec::new();
            if let Some(r) = round {
                facts.push(format!("round {r}"));
            }
            if let Some(d) = num(fields, "duration_s") {
                facts.push(format!("{d:.1} s"));
            }
            if let Some(n) = int(fields, "findings_count").filter(|n| *n > 0) {
                facts.push(format!("{n} finding{}", if n == 1 { "" } else { "s" }));
            }
            let facts = if facts.is_empty() {
                String::new()
            } else {
                format!(" ({})", facts.join(", "))
            };
            format!("{icon} {id} {role} {verdict}{facts}")
        }
        "task_looped_back" => {
            let mut s = format!("🔁 {id} looped back");
            if let Some(r) = round {
                s.push_str(&format!(" to round {r}"));
            }
            if let Some(v) = text(fields, "verdict") {
                s.push_str(&format!(" after a {v} verdict"));
            }
            if let Some(p) = text(fields, "findings_preview") {
                s.push_str(&format!(": {}", one_line(p, 200)));
            }
            s
        }
        "task_completed" => {
            let mut s = format!("🎉 {id} complete");
            if let Some(r) = int(fields, "total_rounds") {
                s.push_str(&format!(" in round {r}"));
            }
            if let Some(c) = num(fields, "cost_usd").filter(|c| *c > 0.0) {
                s.push_str(&format!(", ${c:.2}"));
            }
            s
        }
        "task_failed" => {
            let mut s = format!("💀 {id} failed");
            if let Some(r) = round {
                s.push_str(&format!(" in round {r}"));
            }
            if let Some(why) = text(fields, "reason") {
                s.push_str(&format!(": {}", one_line(why, 300)));
            }
            s
        }
        "merge_attempted" => {
            let branch = text(fields, "branch").unwrap_or("its branch");
            match text(fields, "outcome").unwrap_or("unknown") {
                "merged" => format!("🔀 {id} merged {branch}"),
                "conflict" => {
                    let attempt = int(fields, "attempt")
                        .map(|a| format!(" (attempt {a})"))
                        .unwrap_or_default();
                    format!("⚠️ {id} merge of {branch} conflicts{attempt}")
                }
                "nothing-to-merge" => format!("🔀 {id} had nothing to merge on {branch}"),
                other => format!("🔀 {id} merge of {branch}: {other}"),
            }
        }
        "gate_checked" => format!("🚦 {id} cleared gate {}", text(fields, "gate").unwrap_or("?")),
        "rebase_conflict" => {
            let attempts = int(fields, "attempt")
                .map(|a| format!(" after {a} attempts"))
                .unwrap_or_default();
            format!("↩️ {id} rebase gave up{attempts}; back to work")
        }
        "orphan_found" => {
            let stopped = int(fields, "processes_stopped")
                .filter(|n| *n > 0)
                .map(|n| format!(", {n} process{} stopped", if n == 1 { "" } else { "es" }))
                .unwrap_or_default();
            format!("👻 {id} found an orphaned {role}{stopped}")
        }
        "worker_timeout" => {
            let detail = text(fields, "detail")
                .map(|d| format!(": {}", one_line(d, 200)))
                .unwrap_or_default();
            format!("⏱️ {id} {role} timed out{detail}")
        }
        "budget_exceeded" => {
            let detail = text(fields, "detail")
                .or_else(|| text(fields, "reason"))
                .map(|d| format!(": {}", one_line(d, 200)))
                .unwrap_or_default();
            format!("💸 {id} budget exceeded{detail}")
        }
        "worker_spawned" => {
            let r = round.map(|r| format!(" (round {r})")).unwrap_or_default();
            format!("▶️ {id} {role} started{r}")
        }
        "orchestrator_halted" => {
            let reason = text(fields, "reason").unwrap_or("stopped");
            let icon = if reason.contains("complete") {
                "🏁"
            } else {
                "🛑"
            };
            let mut s = format!("{icon} hyperloop halted: {reason}");
            let mut facts = Vec::new();
            if let Some(n) = int(fields, "completed_tasks") {
                facts.push(format!("{n} complete"));
            }
            if let Some(n) = int(fields, "failed_tasks") {
                facts.push(format!("{n} failed"));
            }
            if let Some(n) = int(fields, "total_cycles") {
                facts.push(format!("{n} cycle{}", if n == 1 { "" } else { "s" }));
            }
            if !facts.is_empty() {
                s.push_str(&format!(" ({})", facts.join(", ")));
            }
            s
        }
        "orchestrator_started" => {
            let mode = text(fields, "mode").unwrap_or("local");
            let workers = int(fields, "max_workers")
                .map(|n| format!(", up to {n} workers"))
                .unwrap_or_default();
            format!("🚀 hyperloop started ({mode} mode{workers})")
        }
        "cycle_completed" => format!(
            "🔄 cycle {}: {} spawned, {} reaped, {} merged; {}/{} tasks complete{}",
            int(fields, "cycle").unwrap_or(0),
            int(fields, "spawned").unwrap_or(0),
            int(fields, "reaped").unwrap_or(0),
            int(fields, "merged").unwrap_or(0),
            int(fields, "complete").unwrap_or(0),
            int(fields, "total").unwrap_or(0),
            int(fields, "failed")
                .filter(|n| *n > 0)
                .map(|n| format!(", {n} failed"))
                .unwrap_or_default()
        ),
        "intake_ran" => {
            let ok = fields.get("success") != Some(&Value::Bool(false));
            format!(
                "{} intake: {} spec{} → {} new task{}{}",
                if ok { "📥" } else { "⚠️" },
                int(fields, "unprocessed_specs").unwrap_or(0),
                if int(fields, "unprocessed_specs") == Some(1) {
                    ""
                } else {
                    "s"
                },
                int(fields, "created_tasks").unwrap_or(0),
                if int(fields, "created_tasks") == Some(1) {
                    ""
                } else {
                    "s"
                },
                if ok { "" } else { " (failed)" }
            )
        }
        "process_improver_ran" => format!(
            "🛠️ process improver ran for {}",
            text(fields, "failed_task_ids").unwrap_or("-")
        ),
        "recovery_started" => "🩺 recovering in-progress tasks".to_string(),
        other => {
            let mut s = format!("ℹ️ {other}");
            for (k, v) in fields {
                match v {
                    Value::String(t) => s.push_str(&format!(" {k}={}", one_line(t, 80))),
                    v => s.push_str(&format!(" {k}={v}")),
                }
            }
            s
        }
    };
    // The halt summary is about the whole run, so it stays out of task threads even when a field
    // happens to name a task.
    let task_id = if name == "orchestrator_halted" { None } else { task };
    Notice {
        event: name.to_string(),
        task_id,
        text: line,
    }
}

#[derive(Debug)]
enum Msg {
    Notice(Notice),
    Flush(SyncSender<FlushReport>),
}

/// What the background thread did, as seen at [`Notifier::flush`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Notices delivered.
    pub sent: u64,
    /// Notices not delivered: the queue was full, or delivery had stopped after a failure.
    pub dropped: u64,
    /// Why delivery stopped, if it did (never holds a credential).
    pub failure: Option<String>,
    /// False when the budget ran out before the thread answered.
    pub finished: bool,
}

/// The `tracing` layer that feeds a [`Notifier`]. Cheap to clone; never blocks.
#[derive(Debug, Clone)]
pub struct NoticeLayer {
    tx: SyncSender<Msg>,
    verbose: bool,
    dropped: Arc<AtomicU64>,
}

impl<S: Subscriber> Layer<S> for NoticeLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != EVENTS_TARGET {
            return;
        }
        let Some((name, fields)) = crate::events::capture(event) else {
            return;
        };
        if !wanted(&name, &fields, self.verbose) {
            return;
        }
        match self.tx.try_send(Msg::Notice(render(&name, &fields))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The background sender for one process. Create it at start, install [`Notifier::layer`], call
/// [`Notifier::flush`] before exit.
#[derive(Debug)]
pub struct Notifier {
    tx: SyncSender<Msg>,
    verbose: bool,
    dropped: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Notifier {
    /// Starts a notifier that delivers to `sink` on a background thread.
    pub fn start(sink: Box<dyn Sink>, verbose: bool) -> Notifier {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LEN);
        let thread = std::thread::Builder::new()
            .name("hyperloop-notify".into())
            .spawn(move || drain(&rx, sink))
            .map_err(|e| {
                emit!(
                    WARN,
                    "matrix_disabled",
                    reason = format!("cannot start the notification thread: {e}").as_str()
                );
            })
            .ok();
        Notifier {
            tx,
            verbose,
            dropped: Arc::new(AtomicU64::new(0)),
            thread,
        }
    }

    /// A Matrix notifier for the repository at `repo_root`. `env` looks up the environment
    /// variables the configuration names (the access and registration tokens). Nothing touches
    /// the network until the first notice.
    pub fn matrix(config: &MatrixConfig, repo_root: &Path, env: &dyn Fn(&str) -> Option<String>) -> Notifier {
        let sink = matrix::MatrixSink::new(config, repo_root, env);
        Notifier::start(Box::new(sink), config.verbose)
    }

    /// The layer that feeds this notifier.
    pub fn layer(&self) -> NoticeLayer {
        NoticeLayer {
            tx: self.tx.clone(),
            verbose: self.verbose,
            dropped: Arc::clone(&self.dropped),
        }
    }

    /// [`Notifier::layer`] restricted to `emit!` events at every level, ready for
    /// [`crate::events::init_with`].
    pub fn boxed_layer(&self) -> crate::events::ExtraLayer {
        let only_events = Targets::new().with_target(EVENTS_TARGET, tracing::Level::DEBUG);
        Box::new(self.layer().with_filter(only_events))
    }

    /// Waits for queued notices to go out, at most [`FLUSH_BUDGET`].
    pub fn flush(self) -> FlushReport {
        self.flush_within(FLUSH_BUDGET)
    }

    /// Waits for queued notices to go out, at most `budget`. Notices emitted afterwards are
    /// dropped.
    pub fn flush_within(mut self, budget: Duration) -> FlushReport {
        let deadline = Instant::now() + budget;
        let queue_dropped = self.dropped.load(Ordering::Relaxed);
        let abandoned = |sent_flush: bool| {
            emit!(
                WARN,
                "matrix_flush_abandoned",
                reason = if sent_flush {
                    "notices still sending when the time for them ran out"
                } else {
                    "the notification queue stayed full"
                },
                budget_s = budget.as_secs_f64()
            );
            FlushReport {
                dropped: queue_dropped,
                ..FlushReport::default()
            }
        };
        if self.thread.is_none() {
            return FlushReport {
                dropped: queue_dropped,
                finished: true,
                ..FlushReport::default()
            };
        }
        let (reply_tx, reply_rx) = std::sync::mpsc::sync_channel(1);
        let mut msg = Msg::Flush(reply_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(TrySendError::Full(_)) => return abandoned(false),
                Err(TrySendError::Disconnected(_)) => {
                    return FlushReport {
                        dropped: queue_dropped,
                        finished: true,
                        ..FlushReport::default()
                    };
                }
            }
        }
        match reply_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(mut report) => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
                report.dropped += queue_dropped;
                report.finished = true;
                report
            }
            // The thread is left to the process exit: waiting longer is what the budget forbids.
            Err(_) => abandoned(true),
        }
    }
}

fn drain(rx: &Receiver<Msg>, mut sink: Box<dyn Sink>) {
    let mut report = FlushReport::default();
    loop {
        let msg = match rx.recv() {
            Ok(m) => m,
            Err(_) => return,
        };
        match msg {
            Msg::Notice(n) if report.failure.is_none() => match sink.deliver(&n) {
                Ok(()) => report.sent += 1,
                Err(why) => {
                    emit!(
                        WARN,
                        "matrix_disabled",
                        reason = why.as_str(),
                        note = "no more Matrix messages from this process; the cycle goes on"
                    );
                    report.dropped += 1;
                    report.failure = Some(why);
                }
            },
            Msg::Notice(_) => report.dropped += 1,
            Msg::Flush(reply) => {
                // Notices queued behind the flush request were emitted after it: drop them.
                loop {
                    match rx.try_recv() {
                        Ok(Msg::Notice(_)) => report.dropped += 1,
                        Ok(Msg::Flush(_)) => {}
                        Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
                    }
                }
                let _ = reply.send(report);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn fields(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn policy_follows_the_seed_table() {
        let none = Map::new();
        for name in ALWAYS {
            assert!(wanted(name, &none, false), "{name}");
        }
        for name in VERBOSE {
            assert!(!wanted(name, &none, false), "{name} needs verbose");
            assert!(wanted(name, &none, true), "{name}");
        }
        for name in [
            "cycle_started",
            "task_advanced",
            "step_skipped",
            "matrix_disabled",
        ] {
            assert!(!wanted(name, &none, true), "{name} is noise");
        }
        let cleared = fields(serde_json::json!({"cleared": true}));
        let waiting = fields(serde_json::json!({"cleared": false}));
        assert!(wanted("gate_checked", &cleared, false));
        assert!(!wanted("gate_checked", &waiting, true));
        let intake = fields(serde_json::json!({"task_id": "intake", "role": "pm"}));
        assert!(!wanted("worker_reaped", &intake, false));
        assert!(!wanted("worker_spawned", &intake, true));
        let giving_up = fields(serde_json::json!({"looping_back": true}));
        let retrying = fields(serde_json::json!({"looping_back": false}));
        assert!(wanted("rebase_conflict", &giving_up, false));
        assert!(!wanted("rebase_conflict", &retrying, true));
    }

    #[test]
    fn messages_name_the_task() {
        let n = render(
            "worker_reaped",
            &fields(serde_json::json!({
                "task_id": "task-003", "role": "verifier", "verdict": "pass",
                "round": 1, "duration_s": 42.123, "findings_count": 0
            })),
        );
        assert_eq!(n.text, "✅ task-003 verifier pass (round 1, 42.1 s)");
        assert_eq!(n.task_id.as_deref(), Some("task-003"));

        let n = render(
            "task_looped_back",
            &fields(serde_json::json!({
                "task_id": "task-007", "round": 2, "verdict": "fail",
                "findings_preview": "missing\n  tests"
            })),
        );
        assert_eq!(
            n.text,
            "🔁 task-007 looped back to round 2 after a fail verdict: missing tests"
        );

        let n = render(
            "orchestrator_halted",
            &fields(serde_json::json!({
                "reason": "all tasks complete", "total_cycles": 4,
                "completed_tasks": 2, "failed_tasks": 0
            })),
        );
        assert_eq!(
            n.text,
            "🏁 hyperloop halted: all tasks complete (2 complete, 0 failed, 4 cycles)"
        );
        assert_eq!(n.task_id, None);

        let long = "x".repeat(500);
        let n = render(
            "task_failed",
            &fields(serde_json::json!({"task_id": "t-1", "reason": long})),
        );
        assert!(n.text.chars().count() < 340, "{}", n.text);
    }

    struct Recorder {
        seen: Arc<Mutex<Vec<String>>>,
        fail_on: Option<usize>,
    }

    impl Sink for Recorder {
        fn deliver(&mut self, notice: &Notice) -> std::result::Result<(), String> {
            let mut seen = self.seen.lock().map_err(|_| "poisoned".to_string())?;
            if self.fail_on == Some(seen.len()) {
                seen.push(format!("FAILED {}", notice.text));
                return Err("homeserver unreachable".into());
            }
            seen.push(notice.text.clone());
            Ok(())
        }
    }

    fn emit_three() {
        emit!(INFO, "cycle_started", cycle = 1u64);
        emit!(
            INFO,
            "worker_spawned",
            task_id = "t-1",
            role = "implementer",
            round = 0u64
        );
        emit!(
            INFO,
            "worker_reaped",
            task_id = "t-1",
            role = "implementer",
            verdict = "pass",
            round = 0u64,
            duration_s = 1.25
        );
        emit!(
            WARN,
            "task_looped_back",
            task_id = "t-1",
            round = 1u64,
            verdict = "fail"
        );
        emit!(INFO, "task_completed", task_id = "t-1", total_rounds = 1u64);
        tracing::info!(target: "other", event = "task_completed", task_id = "not-ours");
    }

    #[test]
    fn the_layer_forwards_wanted_events_in_order() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let n = Notifier::start(
            Box::new(Recorder {
                seen: Arc::clone(&seen),
                fail_on: None,
            }),
            false,
        );
        let subscriber = tracing_subscriber::registry().with(n.boxed_layer());
        tracing::subscriber::with_default(subscriber, emit_three);
        let report = n.flush();
        assert!(report.finished);
        assert_eq!(report.sent, 3);
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(
            seen,
            vec![
                "✅ t-1 implementer pass (round 0, 1.2 s)".to_string(),
                "🔁 t-1 looped back to round 1 after a fail verdict".to_string(),
                "🎉 t-1 complete in round 1".to_string(),
            ]
        );
    }

    #[test]
    fn the_first_failure_stops_delivery() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let n = Notifier::start(
            Box::new(Recorder {
                seen: Arc::clone(&seen),
                fail_on: Some(1),
            }),
            true,
        );
        let subscriber = tracing_subscriber::registry().with(n.boxed_layer());
        tracing::subscriber::with_default(subscriber, emit_three);
        let report = n.flush();
        assert_eq!(report.sent, 1, "{report:?}");
        assert_eq!(report.dropped, 3, "{report:?}");
        assert_eq!(report.failure.as_deref(), Some("homeserver unreachable"));
        assert_eq!(seen.lock().map(|s| s.len()).unwrap_or(0), 2);
    }

    struct Slow;
    impl Sink for Slow {
        fn deliver(&mut self, _: &Notice) -> std::result::Result<(), String> {
            std::thread::sleep(Duration::from_secs(3));
            Ok(())
        }
    }

    #[test]
    fn flush_gives_up_at_the_budget() {
        let n = Notifier::start(Box::new(Slow), false);
        let layer = n.layer();
        let subscriber =
            tracing_subscriber::layer::SubscriberExt::with(tracing_subscriber::registry(), layer);
        tracing::subscriber::with_default(subscriber, emit_three);
        let t = Instant::now();
        let report = n.flush_within(Duration::from_millis(300));
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(!report.finished);
    }
}
