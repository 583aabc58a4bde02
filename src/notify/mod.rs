//! Notifications fed by events. The notifier's [`Listener`] sits in the subscriber beside the
//! standard-error formatter and is handed each [`Notable`] event as a value when it is emitted;
//! it picks those a chat room should hear about (hyperloop 0.9.2's Matrix column: high-signal events
//! always, progress chatter only with `verbose`, noise never), turns each into a one-line
//! [`Notice`], and hands it to a bounded queue without ever waiting. One background thread per process drains the
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

use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;

use crate::config::MatrixConfig;
use crate::emit;
use crate::events::{self, Halt, Listener, MergeOutcome, Notable, Orphan};
use crate::pipeline::Verdict;

/// The most a process waits at exit for queued notices to go out.
pub const FLUSH_BUDGET: Duration = Duration::from_secs(5);

/// Per-request limit; one slow request is all an outage costs, since the first failure stops
/// delivery for the rest of the process.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Notices waiting for the network. A `run` produces a handful per task, so this only fills when
/// the homeserver is slow, and then dropping is better than holding the cycle.
const QUEUE_LEN: usize = 256;

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

/// Whether the room wants this event: high-signal events always, progress chatter only with
/// `verbose`.
pub fn wanted(event: &Notable, verbose: bool) -> bool {
    match event {
        // A poll is noise (hyperloop 0.9.2 never sent one), even a poll that found the gate cleared:
        // the clearing itself follows as its own event, and is the news.
        Notable::GatePolled { .. } => false,
        Notable::GateCleared { .. } => true,
        // A rebase retry is routine; giving up sends the task back to work.
        Notable::RebaseConflict { looping_back, .. } => *looping_back,
        // Intake and the process improver are reported by `intake_ran` and
        // `process_improver_ran`; their workers' reaps are no task's news.
        Notable::WorkerSpawned { task_id, .. } if is_housekeeping(task_id) => false,
        Notable::WorkerReaped { task_id, .. } if is_housekeeping(task_id) => verbose,
        Notable::WorkerReaped { .. }
        | Notable::TaskLoopedBack { .. }
        | Notable::TaskCompleted { .. }
        | Notable::TaskFailed { .. }
        | Notable::MergeAttempted(_)
        | Notable::OrchestratorHalted { .. }
        | Notable::OrphanFound { .. }
        | Notable::WorkerTimeout { .. }
        | Notable::BudgetExceeded { .. } => true,
        Notable::OrchestratorStarted { .. }
        | Notable::CycleCompleted { .. }
        | Notable::WorkerSpawned { .. }
        | Notable::IntakeRan { .. }
        | Notable::ProcessImproverRan { .. } => verbose,
    }
}

fn is_housekeeping(task_id: &str) -> bool {
    matches!(task_id, crate::task::INTAKE_ID | crate::task::IMPROVER_ID)
}

/// `s`, unless it is empty.
fn given(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

fn plural(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
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
/// happened. Numbers are shown as the event's line has them (see [`events::rounded`]).
pub fn render(event: &Notable) -> Notice {
    let task = event.task_id().and_then(given).map(str::to_string);
    let id = task.as_deref().unwrap_or("-");
    let line = match event {
        Notable::WorkerReaped {
            role,
            verdict,
            round,
            duration_s,
            findings_count,
            ..
        } => {
            let icon = match verdict {
                Verdict::Pass => "✅",
                Verdict::Fail => "❌",
                Verdict::Timeout => "⏱️",
                Verdict::Error => "⚠️",
            };
            let mut facts = vec![
                format!("round {round}"),
                format!("{:.1} s", events::rounded(*duration_s)),
            ];
            if *findings_count > 0 {
                facts.push(plural(*findings_count, "finding", "findings"));
            }
            let role = given(role).unwrap_or("worker");
            format!("{icon} {id} {role} {verdict} ({})", facts.join(", "))
        }
        Notable::TaskLoopedBack {
            round,
            verdict,
            findings_preview,
            ..
        } => {
            let mut s = format!("🔁 {id} looped back to round {round}");
            if let Some(v) = given(verdict) {
                s.push_str(&format!(" after a {v} verdict"));
            }
            if let Some(p) = given(findings_preview) {
                s.push_str(&format!(": {}", one_line(p, 200)));
            }
            s
        }
        Notable::TaskCompleted {
            total_rounds,
            cost_usd,
            ..
        } => {
            let mut s = format!("🎉 {id} complete in round {total_rounds}");
            let cost = events::rounded(*cost_usd);
            if cost > 0.0 {
                s.push_str(&format!(", ${cost:.2}"));
            }
            s
        }
        Notable::TaskFailed { reason, round, .. } => {
            let mut s = format!("💀 {id} failed in round {round}");
            if let Some(why) = given(reason) {
                s.push_str(&format!(": {}", one_line(why, 300)));
            }
            s
        }
        Notable::MergeAttempted(events::MergeAttempt {
            branch,
            outcome,
            attempt,
            ..
        }) => {
            let branch = branch.as_deref().and_then(given).unwrap_or("its branch");
            match outcome {
                MergeOutcome::Merged => format!("🔀 {id} merged {branch}"),
                MergeOutcome::Conflict => {
                    let attempt = attempt.map(|a| format!(" (attempt {a})")).unwrap_or_default();
                    format!("⚠️ {id} merge of {branch} conflicts{attempt}")
                }
                MergeOutcome::NothingToMerge => format!("🔀 {id} had nothing to merge on {branch}"),
                other => format!("🔀 {id} merge of {branch}: {}", other.as_str()),
            }
        }
        Notable::GatePolled {
            gate, cleared: false, ..
        } => format!("🚦 {id} waits at gate {}", given(gate).unwrap_or("?")),
        Notable::GatePolled { gate, .. } | Notable::GateCleared { gate, .. } => {
            format!("🚦 {id} cleared gate {}", given(gate).unwrap_or("?"))
        }
        Notable::RebaseConflict { attempt, .. } => {
            format!("↩️ {id} rebase gave up after {attempt} attempts; back to work")
        }
        Notable::OrphanFound { orphan, .. } => match orphan {
            Orphan::StaleClaim => format!("👻 {id} found an orphaned worker"),
            Orphan::Run {
                role,
                processes_stopped,
            } => {
                let stopped = if *processes_stopped > 0 {
                    format!(", {} stopped", plural(*processes_stopped, "process", "processes"))
                } else {
                    String::new()
                };
                format!(
                    "👻 {id} found an orphaned {}{stopped}",
                    given(role).unwrap_or("worker")
                )
            }
        },
        Notable::WorkerTimeout { role, detail, .. } => {
            let detail = given(detail)
                .map(|d| format!(": {}", one_line(d, 200)))
                .unwrap_or_default();
            format!("⏱️ {id} {} timed out{detail}", given(role).unwrap_or("worker"))
        }
        Notable::BudgetExceeded { .. } => format!("💸 {id} budget exceeded"),
        Notable::WorkerSpawned { role, round, .. } => {
            format!(
                "▶️ {id} {} started (round {round})",
                given(role).unwrap_or("worker")
            )
        }
        Notable::OrchestratorHalted {
            halt,
            total_cycles,
            completed_tasks,
            failed_tasks,
        } => {
            let icon = if *halt == Halt::AllComplete {
                "🏁"
            } else {
                "🛑"
            };
            format!(
                "{icon} hyperloop halted: {} ({completed_tasks} complete, {failed_tasks} failed, {})",
                halt.reason(),
                plural(*total_cycles, "cycle", "cycles")
            )
        }
        Notable::OrchestratorStarted {
            max_workers, github, ..
        } => {
            let mode = if *github { "github" } else { "local" };
            format!("🚀 hyperloop started ({mode} mode, up to {max_workers} workers)")
        }
        Notable::CycleCompleted {
            cycle,
            spawned,
            reaped,
            merged,
            complete,
            failed,
            total,
            ..
        } => format!(
            "🔄 cycle {cycle}: {spawned} spawned, {reaped} reaped, {merged} merged; {complete}/{total} tasks complete{}",
            if *failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        ),
        Notable::IntakeRan {
            success,
            unprocessed_specs,
            created_tasks,
            ..
        } => format!(
            "{} intake: {} → {}{}",
            if *success { "📥" } else { "⚠️" },
            plural(*unprocessed_specs as u64, "spec", "specs"),
            plural(*created_tasks as u64, "new task", "new tasks"),
            if *success { "" } else { " (failed)" }
        ),
        Notable::ProcessImproverRan { failed_task_ids, .. } => format!(
            "🛠️ process improver ran for {}",
            given(&failed_task_ids.join(",")).unwrap_or("-")
        ),
    };
    // The halt summary is about the whole run, so it stays out of task threads.
    let task_id = match event {
        Notable::OrchestratorHalted { .. } => None,
        _ => task,
    };
    Notice {
        event: event.name().to_string(),
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

    /// The layer that feeds this notifier: it hears each [`Notable`] emitted under the
    /// subscriber it is part of, keeps those [`wanted`], and queues their [`render`]ing without
    /// ever waiting (a full queue drops the notice and counts it).
    pub fn layer(&self) -> Listener {
        let tx = self.tx.clone();
        let verbose = self.verbose;
        let dropped = Arc::clone(&self.dropped);
        Listener::new(move |event| {
            if wanted(event, verbose) && tx.try_send(Msg::Notice(render(event))).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        })
    }

    /// [`Notifier::layer`], ready for [`crate::events::init_with`]. It takes no `tracing`
    /// events at all (notable events reach it as values), so its filter lets none through and
    /// it enables nothing the standard-error level does not.
    pub fn boxed_layer(&self) -> crate::events::ExtraLayer {
        Box::new(self.layer().with_filter(LevelFilter::OFF))
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
    use crate::events::{Budget, MergeAttempt, Origin};
    use std::sync::Mutex;

    fn spawned(task_id: &str) -> Notable {
        Notable::WorkerSpawned {
            task_id: task_id.into(),
            role: "implementer".into(),
            round: 0,
            branch: None,
            spec_ref: "specs/a.md".into(),
            origin: Origin::Step { cycle: 1 },
        }
    }

    fn reaped(task_id: &str, role: &str, verdict: Verdict, round: u32, duration_s: f64) -> Notable {
        Notable::WorkerReaped {
            task_id: task_id.into(),
            role: role.into(),
            verdict,
            round,
            duration_s,
            findings_count: 0,
            cost_usd: 0.0,
            origin: Origin::Step { cycle: 1 },
            log: None,
        }
    }

    fn looped(task_id: &str, round: u32, preview: &str) -> Notable {
        Notable::TaskLoopedBack {
            task_id: task_id.into(),
            spec_ref: "specs/a.md".into(),
            round,
            verdict: "fail".into(),
            findings_count: 1,
            findings_preview: preview.into(),
        }
    }

    fn completed(task_id: &str, total_rounds: u32) -> Notable {
        Notable::TaskCompleted {
            task_id: task_id.into(),
            spec_ref: "specs/a.md".into(),
            total_rounds,
            cost_usd: 0.0,
        }
    }

    fn halted(halt: Halt) -> Notable {
        Notable::OrchestratorHalted {
            halt,
            total_cycles: 4,
            completed_tasks: 2,
            failed_tasks: 0,
        }
    }

    #[test]
    fn policy_follows_the_original_table() {
        let always = [
            reaped("t-1", "verifier", Verdict::Pass, 0, 1.0),
            looped("t-1", 1, ""),
            completed("t-1", 1),
            Notable::TaskFailed {
                task_id: "t-1".into(),
                spec_ref: "specs/a.md".into(),
                reason: "why".into(),
                round: 1,
            },
            MergeAttempt::new("t-1", MergeOutcome::Merged).into(),
            halted(Halt::AllComplete),
            Notable::OrphanFound {
                task_id: "t-1".into(),
                orphan: Orphan::StaleClaim,
            },
            Notable::WorkerTimeout {
                task_id: "t-1".into(),
                role: "implementer".into(),
                detail: String::new(),
            },
            Notable::BudgetExceeded {
                budget: Budget::Total,
                spent_usd: 2.0,
                limit_usd: 1.0,
            },
            Notable::GateCleared {
                task_id: "t-1".into(),
                gate: "review".into(),
            },
        ];
        for ev in &always {
            assert!(wanted(ev, false), "{ev:?}");
        }
        let verbose_only = [
            spawned("t-1"),
            Notable::OrchestratorStarted {
                repo: "/r".into(),
                branch: "main".into(),
                max_workers: 2,
                max_rounds: 5,
                overlay: None,
                github: false,
            },
            Notable::CycleCompleted {
                cycle: 1,
                spawned: 0,
                reaped: 0,
                merged: 0,
                complete: 0,
                failed: 0,
                total: 0,
                progress: "idle".into(),
                duration_s: 0.1,
            },
            Notable::IntakeRan {
                success: true,
                counted: None,
                unprocessed_specs: 1,
                created_tasks: 1,
                duration_s: 1.0,
                cycle: 1,
                detail: None,
            },
            Notable::ProcessImproverRan {
                failed_task_ids: vec!["t-1".into()],
                success: true,
                duration_s: 1.0,
                cycle: 1,
            },
        ];
        for ev in &verbose_only {
            assert!(!wanted(ev, false), "{ev:?} needs verbose");
            assert!(wanted(ev, true), "{ev:?}");
        }
        let poll = |cleared| Notable::GatePolled {
            task_id: "t-1".into(),
            gate: "review".into(),
            cleared,
        };
        assert!(!wanted(&poll(false), true));
        assert!(
            !wanted(&poll(true), true),
            "the clearing that follows is the news"
        );
        assert!(!wanted(&spawned(crate::task::INTAKE_ID), true));
        let intake_reap = reaped(crate::task::INTAKE_ID, "pm", Verdict::Pass, 0, 1.0);
        assert!(!wanted(&intake_reap, false));
        assert!(wanted(&intake_reap, true));
        let rebase = |looping_back| Notable::RebaseConflict {
            task_id: "t-1".into(),
            attempt: 3,
            max_attempts: 3,
            looping_back,
        };
        assert!(wanted(&rebase(true), false));
        assert!(!wanted(&rebase(false), true));
    }

    #[test]
    fn messages_name_the_task() {
        let n = render(&reaped("task-003", "verifier", Verdict::Pass, 1, 42.123));
        assert_eq!(n.text, "✅ task-003 verifier pass (round 1, 42.1 s)");
        assert_eq!(n.task_id.as_deref(), Some("task-003"));
        assert_eq!(n.event, "worker_reaped");

        let n = render(&looped("task-007", 2, "missing\n  tests"));
        assert_eq!(
            n.text,
            "🔁 task-007 looped back to round 2 after a fail verdict: missing tests"
        );

        let n = render(&Notable::OrchestratorHalted {
            halt: Halt::AllComplete,
            total_cycles: 4,
            completed_tasks: 2,
            failed_tasks: 0,
        });
        assert_eq!(
            n.text,
            "🏁 hyperloop halted: all tasks complete (2 complete, 0 failed, 4 cycles)"
        );
        assert_eq!(n.task_id, None);
        let n = render(&halted(Halt::MaxCycles { max_cycles: 1 }));
        assert!(
            n.text
                .starts_with("🛑 hyperloop halted: max_cycles exhausted (1)"),
            "{}",
            n.text
        );

        let n = render(&Notable::TaskFailed {
            task_id: "t-1".into(),
            spec_ref: "specs/a.md".into(),
            reason: "x".repeat(500),
            round: 3,
        });
        assert!(n.text.starts_with("💀 t-1 failed in round 3: xxx"), "{}", n.text);
        assert!(n.text.chars().count() < 340, "{}", n.text);

        let conflict = MergeAttempt {
            branch: Some("worker/t-2".into()),
            attempt: Some(2),
            ..MergeAttempt::new("t-2", MergeOutcome::Conflict)
        };
        assert_eq!(
            render(&conflict.into()).text,
            "⚠️ t-2 merge of worker/t-2 conflicts (attempt 2)"
        );
        let outside = MergeAttempt::new("t-2", MergeOutcome::MergedOutsideThisStep);
        assert_eq!(
            render(&outside.into()).text,
            "🔀 t-2 merge of its branch: merged-outside-this-step"
        );
        let n = render(&Notable::BudgetExceeded {
            budget: Budget::Total,
            spent_usd: 2.0,
            limit_usd: 1.0,
        });
        assert_eq!((n.text.as_str(), n.task_id), ("💸 - budget exceeded", None));
        let n = render(&Notable::OrphanFound {
            task_id: "t-4".into(),
            orphan: Orphan::Run {
                role: "verifier".into(),
                processes_stopped: 1,
            },
        });
        assert_eq!(n.text, "👻 t-4 found an orphaned verifier, 1 process stopped");
        let n = render(&Notable::IntakeRan {
            success: false,
            counted: Some(false),
            unprocessed_specs: 1,
            created_tasks: 0,
            duration_s: 1.0,
            cycle: 1,
            detail: Some("no result".into()),
        });
        assert_eq!(n.text, "⚠️ intake: 1 spec → 0 new tasks (failed)");
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
        spawned("t-1").emit();
        reaped("t-1", "implementer", Verdict::Pass, 0, 1.25).emit();
        looped("t-1", 1, "").emit();
        completed("t-1", 1).emit();
        // A line that merely carries a notable name is not a notable event.
        emit!(INFO, "task_completed", task_id = "not-ours", total_rounds = 1u64);
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
