//! The GitHub API budget: what this process asked of GitHub, what GitHub says is left, and the
//! pace of content-creating requests (POST, PATCH, PUT, DELETE, GraphQL mutations).
//!
//! GitHub has two kinds of limits. The primary one is a number of requests per hour (1,000 per
//! repository for a workflow's job token, 5,000 and more for a GitHub App installation); every
//! answer reports what is left in `x-ratelimit-remaining`. The secondary ones are not reported at
//! all: at most 80 content-creating requests a minute and 500 an hour, and an integration that
//! keeps running into them can be blocked. So hyperloop counts its own content-creating requests
//! and stays under both, with a margin for anything else that uses the same token.
//!
//! A step is a short process and the hour is long, so the count must outlive the process: it is
//! kept in [`PaceRecord`], which the step commits with its task state (see
//! `.hyperloop/github-budget.json` on the state branch) and reads back at the start of the next
//! step. Times are GitHub's, taken from each answer's `Date` header: the limits are counted on
//! GitHub's clock, and a runner whose clock is off must not pace by its own.
//!
//! Nothing here sleeps. A request that would go over the pace is refused up front with the
//! time it could go out; the caller defers that write to a later step and records that it did.

use std::collections::VecDeque;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use http::HeaderMap;
use serde::{Deserialize, Serialize};

/// Content-creating requests hyperloop allows itself in any 60 seconds (GitHub refuses beyond 80).
pub const PACE_PER_MINUTE: usize = 70;
/// Content-creating requests hyperloop allows itself in any hour (GitHub refuses beyond 500).
pub const PACE_PER_HOUR: usize = 450;
/// Content-creating requests one task needs at most from its first pull request to its merge:
/// create the draft, label it, ready it (its body in the same GraphQL request), merge, delete the
/// branch. A task is only started when this much is left for it.
pub const WRITES_PER_TASK: usize = 5;
/// Below this share of the primary budget, only work in flight goes on.
pub const RESERVE_PERCENT: u64 = 10;

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;

/// What a step keeps of the pace between processes. Small on purpose: at most one entry per
/// second of the last hour that saw a content-creating request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaceRecord {
    /// `[unix second (GitHub's clock), content-creating requests in that second]`, oldest first.
    #[serde(default)]
    pub writes: Vec<(i64, u32)>,
    /// No request before this time (RFC 3339): GitHub asked for it with a rate-limit answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_until: Option<String>,
    /// Writes that a step could not make and that nothing else brings back, for the next step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingWrite>,
    /// GitHub's clock minus the recording machine's, in seconds: the next step's estimate until
    /// GitHub's first answer tells it better.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clock_offset: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// A write that is not derived from task state again, so it must be remembered when deferred.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PendingWrite {
    /// An approval label consumed by a gate; left on, it would clear the task's next gate too.
    RemoveLabel { pr: u64, label: String },
    /// A merged task's branch, when the repository does not delete head branches itself.
    DeleteBranch { branch: String },
    /// A task's pull request description, to compare with what the task shows.
    Describe { task: String },
}

/// A primary-limit reading from one answer's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Primary {
    pub remaining: u64,
    pub limit: u64,
    pub reset: i64,
}

/// What the report shows about the API (`step --json` key `github_api`, and the job summary).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApiUsage {
    /// Requests this step sent (every attempt counts, as it does for GitHub).
    pub requests: u32,
    /// Of those, content-creating ones.
    pub content_requests: u32,
    /// Answers that were rate-limit refusals.
    pub refused: u32,
    /// `x-ratelimit-remaining` of the last REST answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// `x-ratelimit-limit` of the last REST answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// When the primary budget refills (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
    /// Content-creating requests in the last minute and hour, this step's and earlier steps'.
    pub content_last_minute: usize,
    pub content_last_hour: usize,
    /// No request before this time (RFC 3339): GitHub refused one with a rate limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_until: Option<String>,
    /// When the pace allows the next content-creating request, if it does not now (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paced_until: Option<String>,
    /// What this step left for a later one, one line each ("task-004: merge").
    pub deferred: Vec<String>,
    /// Whether the primary budget was below its reserve, so no new work started.
    pub reserve_only: bool,
}

/// Why a request may not go out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// GitHub refused earlier with a rate limit; nothing until then.
    Blocked(DateTime<Utc>),
    /// The pace is used up; a content-creating request fits again at this time.
    Paced(DateTime<Utc>),
}

#[derive(Debug, Default)]
struct Inner {
    requests: u32,
    content_requests: u32,
    refused: u32,
    core: Option<Primary>,
    /// GitHub's clock minus ours, in seconds, from the last `Date` header.
    offset: i64,
    /// `offset` comes from an answer of this process, not from an earlier step's record.
    observed_clock: bool,
    /// Unix seconds (GitHub's clock) of content-creating requests in the last hour, oldest first.
    window: VecDeque<i64>,
    blocked_until: Option<DateTime<Utc>>,
    pending: Vec<PendingWrite>,
    deferred: Vec<String>,
    paced_until: Option<DateTime<Utc>>,
    reserve_only: bool,
    /// The pace changed since it was last taken for a commit.
    dirty: bool,
}

/// The budget of one process, shared by every request it makes.
#[derive(Debug, Default)]
pub struct Budget {
    inner: Mutex<Inner>,
}

impl Budget {
    pub fn new() -> Budget {
        Budget::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes in what earlier steps recorded.
    pub fn load(&self, record: &PaceRecord) {
        let mut inner = self.lock();
        let mut window: Vec<i64> = inner.window.iter().copied().collect();
        for (second, count) in &record.writes {
            window.extend(std::iter::repeat_n(*second, *count as usize));
        }
        window.sort_unstable();
        inner.window = window.into();
        inner.blocked_until = record
            .blocked_until
            .as_deref()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
            .max(inner.blocked_until);
        if !inner.observed_clock {
            inner.offset = record.clock_offset;
        }
        for p in &record.pending {
            if !inner.pending.contains(p) {
                inner.pending.push(p.clone());
            }
        }
    }

    /// What to commit for the next step: the last hour of writes, a block, pending writes.
    pub fn record(&self, now: DateTime<Utc>) -> PaceRecord {
        let mut inner = self.lock();
        let server_now = now.timestamp() + inner.offset;
        prune(&mut inner.window, server_now);
        let mut writes: Vec<(i64, u32)> = Vec::new();
        for &second in &inner.window {
            match writes.last_mut() {
                Some((s, n)) if *s == second => *n += 1,
                _ => writes.push((second, 1)),
            }
        }
        PaceRecord {
            writes,
            blocked_until: inner
                .blocked_until
                .filter(|b| b.timestamp() > server_now)
                .map(|b| b.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            pending: inner.pending.clone(),
            clock_offset: inner.offset,
        }
    }

    /// Whether the pace changed since it was last taken for a commit.
    pub fn is_dirty(&self) -> bool {
        self.lock().dirty
    }

    /// Whether the pace changed since the last call (and forgets that it did).
    pub fn take_dirty(&self) -> bool {
        std::mem::take(&mut self.lock().dirty)
    }

    /// Whether an answer in this process told GitHub's time.
    pub fn clock_observed(&self) -> bool {
        self.lock().observed_clock
    }

    /// GitHub's time now, as far as its last answer tells.
    pub fn server_now(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now + chrono::TimeDelta::seconds(self.lock().offset)
    }

    /// Asks to send one request. A content-creating one is counted in the pace when it may go.
    pub fn admit(&self, content: bool, now: DateTime<Utc>) -> Result<(), Hold> {
        let mut inner = self.lock();
        let server_now = now.timestamp() + inner.offset;
        if let Some(until) = inner.blocked_until {
            if until.timestamp() > server_now {
                return Err(Hold::Blocked(to_local(until, inner.offset)));
            }
            inner.blocked_until = None;
            inner.dirty = true;
        }
        if content {
            prune(&mut inner.window, server_now);
            if let Some(at) = next_slot(&inner.window, server_now, 1) {
                let local = to_local(from_unix(at), inner.offset);
                inner.paced_until = Some(local);
                return Err(Hold::Paced(local));
            }
            inner.window.push_back(server_now);
            inner.content_requests += 1;
            inner.dirty = true;
        }
        inner.requests += 1;
        Ok(())
    }

    /// Takes in what an answer's headers say: GitHub's clock and the primary budget.
    pub fn observe(&self, headers: &HeaderMap, now: DateTime<Utc>) {
        let mut inner = self.lock();
        if let Some(date) = header(headers, "date")
            .and_then(|d| DateTime::parse_from_rfc2822(d).ok())
            .map(|d| d.with_timezone(&Utc))
        {
            inner.offset = (date - now).num_seconds();
            inner.observed_clock = true;
        }
        let number = |name: &str| header(headers, name).and_then(|v| v.parse::<u64>().ok());
        let resource = header(headers, "x-ratelimit-resource").unwrap_or("core");
        if resource == "core"
            && let (Some(remaining), Some(limit)) =
                (number("x-ratelimit-remaining"), number("x-ratelimit-limit"))
        {
            let reset = header(headers, "x-ratelimit-reset")
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            inner.core = Some(Primary {
                remaining,
                limit,
                reset,
            });
        }
    }

    /// A rate-limit answer: nothing goes out before `retry_at`, in this step or the next.
    pub fn refused(&self, retry_at: DateTime<Utc>) {
        let mut inner = self.lock();
        inner.refused += 1;
        let server = retry_at + chrono::TimeDelta::seconds(inner.offset);
        if inner.blocked_until.is_none_or(|b| b < server) {
            inner.blocked_until = Some(server);
        }
        inner.dirty = true;
    }

    /// Whether a new task may start: its writes fit in the pace next to `in_flight` tasks'
    /// (which are only estimated as [`WRITES_PER_TASK`] each), and the primary budget is above
    /// its reserve.
    pub fn can_start(&self, in_flight: usize, now: DateTime<Utc>) -> bool {
        let mut inner = self.lock();
        let server_now = now.timestamp() + inner.offset;
        if inner.blocked_until.is_some_and(|b| b.timestamp() > server_now) {
            return false;
        }
        if let Some(p) = inner.core
            && p.remaining.saturating_mul(100) < p.limit.saturating_mul(RESERVE_PERCENT)
        {
            inner.reserve_only = true;
            return false;
        }
        prune(&mut inner.window, server_now);
        let need = WRITES_PER_TASK * (in_flight + 1);
        let hour_left = PACE_PER_HOUR.saturating_sub(inner.window.len());
        let minute_left = PACE_PER_MINUTE.saturating_sub(count_since(&inner.window, server_now - MINUTE));
        if hour_left < need || minute_left < WRITES_PER_TASK {
            if let Some(at) = next_slot_for(&inner.window, server_now, WRITES_PER_TASK, need) {
                inner.paced_until = Some(to_local(from_unix(at), inner.offset));
            }
            return false;
        }
        true
    }

    /// Notes a write this step did not make.
    pub fn defer(&self, what: String) {
        let mut inner = self.lock();
        if !inner.deferred.contains(&what) {
            inner.deferred.push(what);
        }
    }

    pub fn add_pending(&self, write: PendingWrite) {
        let mut inner = self.lock();
        if !inner.pending.contains(&write) {
            inner.pending.push(write);
            inner.dirty = true;
        }
    }

    /// The pending writes, taken out; the caller puts back what it could not do.
    pub fn take_pending(&self) -> Vec<PendingWrite> {
        let mut inner = self.lock();
        if !inner.pending.is_empty() {
            inner.dirty = true;
        }
        std::mem::take(&mut inner.pending)
    }

    pub fn primary(&self) -> Option<Primary> {
        self.lock().core
    }

    pub fn usage(&self, now: DateTime<Utc>) -> ApiUsage {
        let mut inner = self.lock();
        let server_now = now.timestamp() + inner.offset;
        prune(&mut inner.window, server_now);
        let rfc = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        ApiUsage {
            requests: inner.requests,
            content_requests: inner.content_requests,
            refused: inner.refused,
            remaining: inner.core.map(|p| p.remaining),
            limit: inner.core.map(|p| p.limit),
            resets_at: inner
                .core
                .and_then(|p| DateTime::<Utc>::from_timestamp(p.reset, 0))
                .filter(|_| inner.core.is_some_and(|p| p.reset > 0))
                .map(rfc),
            blocked_until: inner
                .blocked_until
                .filter(|b| b.timestamp() > server_now)
                .map(|b| rfc(to_local(b, inner.offset))),
            content_last_minute: count_since(&inner.window, server_now - MINUTE),
            content_last_hour: inner.window.len(),
            paced_until: inner
                .paced_until
                .filter(|t| t.timestamp() > now.timestamp())
                .map(rfc),
            deferred: inner.deferred.clone(),
            reserve_only: inner.reserve_only,
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn from_unix(secs: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(secs, 0).unwrap_or_default()
}

/// A time on GitHub's clock as a time on ours.
fn to_local(server: DateTime<Utc>, offset: i64) -> DateTime<Utc> {
    server - chrono::TimeDelta::seconds(offset)
}

fn prune(window: &mut VecDeque<i64>, server_now: i64) {
    while window.front().is_some_and(|&t| t <= server_now - HOUR) {
        window.pop_front();
    }
}

fn count_since(window: &VecDeque<i64>, since: i64) -> usize {
    window.iter().rev().take_while(|&&t| t > since).count()
}

/// `None` when `n` more content-creating requests fit now; otherwise the first second (GitHub's
/// clock) at which they do.
fn next_slot(window: &VecDeque<i64>, server_now: i64, n: usize) -> Option<i64> {
    next_slot_for(window, server_now, n, n)
}

/// [`next_slot`] for `in_minute_n` requests within a minute and `n` within the hour.
fn next_slot_for(window: &VecDeque<i64>, server_now: i64, minute_n: usize, n: usize) -> Option<i64> {
    let in_minute = count_since(window, server_now - MINUTE);
    let minute_at = (in_minute + minute_n > PACE_PER_MINUTE).then(|| {
        // The entry whose leaving the minute makes room for `minute_n`.
        let over = in_minute + minute_n - PACE_PER_MINUTE;
        let first_in_minute = window.len() - in_minute;
        window
            .get(first_in_minute + over - 1)
            .map_or(server_now, |t| t + MINUTE)
    });
    let hour_at = (window.len() + n > PACE_PER_HOUR).then(|| {
        let over = window.len() + n - PACE_PER_HOUR;
        window.get(over - 1).map_or(server_now, |t| t + HOUR)
    });
    match (minute_at, hour_at) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn at(secs: i64) -> DateTime<Utc> {
        from_unix(1_800_000_000 + secs)
    }

    #[test]
    fn the_minute_pace_refuses_the_next_write_until_the_oldest_leaves_the_minute() {
        let b = Budget::new();
        for i in 0..PACE_PER_MINUTE {
            assert_eq!(b.admit(true, at(i as i64 / 10)), Ok(()), "write {i}");
        }
        assert_eq!(b.admit(true, at(10)), Err(Hold::Paced(at(60))));
        // Reads are not paced.
        assert_eq!(b.admit(false, at(10)), Ok(()));
        assert_eq!(b.admit(true, at(60)), Ok(()));
        let u = b.usage(at(60));
        assert_eq!(u.requests as usize, PACE_PER_MINUTE + 2);
        assert_eq!(u.content_requests as usize, PACE_PER_MINUTE + 1);
    }

    #[test]
    fn the_hour_pace_survives_a_new_process_through_the_record() {
        let first = Budget::new();
        // Spread out so that the minute never fills.
        for i in 0..PACE_PER_HOUR {
            assert_eq!(first.admit(true, at(i as i64 * 7)), Ok(()), "write {i}");
        }
        let now = at(PACE_PER_HOUR as i64 * 7);
        let record = first.record(now);
        let text = serde_json::to_string(&record).expect("json");
        let second = Budget::new();
        second.load(&serde_json::from_str(&text).expect("parses"));
        // The oldest write leaves the hour 3600 s after it was made.
        assert_eq!(second.admit(true, now), Err(Hold::Paced(at(3600))));
        assert!(!second.can_start(0, now));
        assert_eq!(second.admit(true, at(3600)), Ok(()));
    }

    #[test]
    fn pace_is_counted_on_githubs_clock() {
        let b = Budget::new();
        let mut h = HeaderMap::new();
        // GitHub is two minutes ahead of this machine.
        let github = at(120);
        h.insert(
            "date",
            HeaderValue::from_str(&github.to_rfc2822().replace("+0000", "GMT")).expect("header"),
        );
        b.observe(&h, at(0));
        assert_eq!(b.server_now(at(0)), at(120));
        assert_eq!(b.admit(true, at(0)), Ok(()));
        assert_eq!(b.record(at(0)).writes, vec![(at(120).timestamp(), 1)]);
    }

    #[test]
    fn a_refusal_blocks_every_request_until_its_time_and_is_recorded() {
        let b = Budget::new();
        b.refused(at(30));
        assert_eq!(b.admit(false, at(10)), Err(Hold::Blocked(at(30))));
        assert!(!b.can_start(0, at(10)));
        let record = b.record(at(10));
        assert!(record.blocked_until.is_some());
        let next = Budget::new();
        next.load(&record);
        assert_eq!(next.admit(true, at(29)), Err(Hold::Blocked(at(30))));
        assert_eq!(next.admit(true, at(30)), Ok(()));
        assert_eq!(next.usage(at(30)).refused, 0);
        assert_eq!(b.usage(at(10)).refused, 1);
    }

    #[test]
    fn below_the_reserve_nothing_new_starts() {
        let b = Budget::new();
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-limit", HeaderValue::from_static("1000"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("101"));
        h.insert("x-ratelimit-reset", HeaderValue::from_static("1800003600"));
        b.observe(&h, at(0));
        assert!(b.can_start(3, at(0)));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("99"));
        b.observe(&h, at(0));
        assert!(!b.can_start(0, at(0)));
        let u = b.usage(at(0));
        assert!(u.reserve_only);
        assert_eq!(u.remaining, Some(99));
        assert_eq!(u.resets_at.as_deref(), Some("2027-01-15T09:00:00Z"));
    }

    #[test]
    fn starts_leave_room_for_the_tasks_in_flight() {
        let b = Budget::new();
        for i in 0..(PACE_PER_HOUR - 3 * WRITES_PER_TASK) {
            assert_eq!(b.admit(true, at(i as i64 * 7)), Ok(()));
        }
        let now = at(3500);
        assert!(b.can_start(2, now));
        assert!(!b.can_start(3, now));
        assert!(b.usage(now).paced_until.is_some());
    }
}
