//! Crash points for fault-injection tests. `HYPERLOOP_FAULT=<point>:<n>` makes the process kill
//! itself with SIGKILL the n-th time (1-based) it passes `<point>`, so tests can prove that a step
//! dying at that exact instant loses nothing. Unset (always, in normal use), a point costs one
//! load of an already-initialised value.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Fault {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

fn configured() -> Option<&'static Fault> {
    static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
    FAULT
        .get_or_init(|| {
            let spec = std::env::var("HYPERLOOP_FAULT").ok()?;
            let (point, nth) = spec.rsplit_once(':').unwrap_or((spec.as_str(), "1"));
            Some(Fault {
                point: point.to_string(),
                nth: nth.parse().unwrap_or(1),
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Marks a crash point.
pub fn point(name: &str) {
    let Some(f) = configured() else { return };
    if f.point != name {
        return;
    }
    if f.seen.fetch_add(1, Ordering::SeqCst) + 1 == f.nth {
        // SAFETY: raising a signal against our own process; nothing is shared.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
