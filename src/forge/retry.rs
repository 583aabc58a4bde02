//! When to try a GitHub request again, and for how long to wait. Pure rules, no I/O: the client
//! asks [`RetryPolicy::decide`] after every answer and sleeps or gives up as told.
//!
//! octocrab has a retry layer of its own, but it re-sends at once on 5xx and 429 (ignoring
//! `Retry-After`), does not recognise a 403 rate limit, and cannot tell a lost answer to a POST
//! from a refusal. The client therefore turns it off and follows these rules instead:
//! - 5xx answers and connection failures: exponential backoff, a bounded number of attempts;
//! - rate limits (429, or 403 with `x-ratelimit-remaining: 0`, `retry-after`, or a "rate limit"
//!   message): wait until the reset when that is soon, otherwise stop with a typed
//!   [`ForgeError::RateLimited`](super::ForgeError::RateLimited) carrying the reset time, so the
//!   next scheduled step picks up the work instead of a CI job sleeping for an hour;
//! - everything else goes back to the caller, which knows what a 404 or a 422 means for it.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use http::HeaderMap;

/// GitHub's advice when a rate limit answer carries no timing headers: wait at least a minute.
const UNSPECIFIED_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries for one request, the first included.
    pub max_attempts: u32,
    /// Wait after the first transient failure; doubled after each further one.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// The longest rate-limit wait sat out inside a step; longer ones end in `RateLimited`.
    pub max_rate_limit_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(20),
            max_rate_limit_wait: Duration::from_secs(60),
        }
    }
}

/// What one answer (or its absence) says about trying again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// A real answer, good or bad, for the caller to interpret.
    Final,
    /// The server failed or the connection did; the same request may well succeed later.
    Transient {
        after: Option<Duration>,
    },
    RateLimited {
        retry_at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Return,
    Sleep(Duration),
    GiveUpRateLimited { retry_at: DateTime<Utc> },
    GiveUpUnreachable,
}

impl RetryPolicy {
    /// The delay after the `failures`-th transient failure (1-based), with a little jitter so
    /// that parallel steps do not come back in lockstep.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        let delay = self.base_delay.saturating_mul(1u32 << exp).min(self.max_delay);
        let jitter_range = delay.as_millis() as u64 / 4;
        let jitter = if jitter_range == 0 {
            0
        } else {
            u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0),
            ) % jitter_range
        };
        delay + Duration::from_millis(jitter)
    }

    /// What to do after `attempt` tries (1-based) ended in `class`.
    pub fn decide(&self, class: &Class, attempt: u32, now: DateTime<Utc>) -> Decision {
        let last = attempt >= self.max_attempts;
        match class {
            Class::Final => Decision::Return,
            Class::Transient { .. } if last => Decision::GiveUpUnreachable,
            Class::Transient { after } => {
                let backoff = self.backoff(attempt);
                let wait = match after {
                    Some(a) if *a <= self.max_rate_limit_wait => (*a).max(backoff),
                    _ => backoff,
                };
                Decision::Sleep(wait)
            }
            Class::RateLimited { retry_at } => {
                let wait = (*retry_at - now).to_std().unwrap_or(Duration::ZERO);
                if last || wait > self.max_rate_limit_wait {
                    Decision::GiveUpRateLimited { retry_at: *retry_at }
                } else {
                    Decision::Sleep(wait)
                }
            }
        }
    }
}

/// Classifies an HTTP answer. `body` is used only to recognise a 403 rate limit that comes
/// without headers.
pub fn classify(status: u16, headers: &HeaderMap, body: &str, now: DateTime<Utc>) -> Class {
    let retry_after = retry_after(headers, now);
    let remaining_zero = header_str(headers, "x-ratelimit-remaining").is_some_and(|v| v == "0");
    let reset = header_str(headers, "x-ratelimit-reset")
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(|secs| DateTime::<Utc>::from_timestamp(secs, 0));

    let rate_limited = match status {
        429 => true,
        403 => retry_after.is_some() || remaining_zero || body.to_ascii_lowercase().contains("rate limit"),
        _ => false,
    };
    if rate_limited {
        let retry_at = retry_after
            .map(|d| now + TimeDelta::from_std(d).unwrap_or(TimeDelta::zero()))
            .or(if remaining_zero {
                // The reset is a whole second; a request in that very second may still be refused.
                reset.map(|r| r + TimeDelta::seconds(1))
            } else {
                None
            })
            .unwrap_or_else(|| {
                now + TimeDelta::from_std(UNSPECIFIED_RATE_LIMIT_WAIT).unwrap_or(TimeDelta::zero())
            });
        return Class::RateLimited { retry_at };
    }
    if (500..600).contains(&status) {
        return Class::Transient { after: retry_after };
    }
    Class::Final
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let v = header_str(headers, "retry-after")?;
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(v).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn now() -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000, 0).expect("valid timestamp")
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header value"));
        }
        h
    }

    #[test]
    fn success_and_client_errors_are_final() {
        for status in [200, 201, 204, 404, 405, 409, 422] {
            assert_eq!(
                classify(status, &HeaderMap::new(), "", now()),
                Class::Final,
                "{status}"
            );
        }
    }

    #[test]
    fn server_errors_are_transient() {
        for status in [500, 502, 503, 504] {
            assert_eq!(
                classify(status, &HeaderMap::new(), "", now()),
                Class::Transient { after: None }
            );
        }
    }

    #[test]
    fn a_plain_403_is_not_a_rate_limit() {
        let c = classify(
            403,
            &headers(&[("x-ratelimit-remaining", "4999")]),
            r#"{"message":"Resource not accessible by integration"}"#,
            now(),
        );
        assert_eq!(c, Class::Final);
    }

    #[test]
    fn primary_rate_limit_uses_the_reset_header() {
        let reset = now().timestamp() + 30;
        let c = classify(
            403,
            &headers(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", &reset.to_string()),
            ]),
            "",
            now(),
        );
        assert_eq!(
            c,
            Class::RateLimited {
                retry_at: now() + TimeDelta::seconds(31)
            }
        );
    }

    #[test]
    fn secondary_rate_limit_uses_retry_after() {
        let c = classify(429, &headers(&[("retry-after", "7")]), "", now());
        assert_eq!(
            c,
            Class::RateLimited {
                retry_at: now() + TimeDelta::seconds(7)
            }
        );
        let c = classify(
            403,
            &HeaderMap::new(),
            "You have exceeded a secondary rate limit",
            now(),
        );
        assert_eq!(
            c,
            Class::RateLimited {
                retry_at: now() + TimeDelta::seconds(60)
            }
        );
    }

    #[test]
    fn short_waits_are_sat_out_and_long_ones_give_up() {
        let p = RetryPolicy::default();
        let soon = Class::RateLimited {
            retry_at: now() + TimeDelta::seconds(5),
        };
        assert_eq!(p.decide(&soon, 1, now()), Decision::Sleep(Duration::from_secs(5)));
        let later = now() + TimeDelta::seconds(3600);
        assert_eq!(
            p.decide(&Class::RateLimited { retry_at: later }, 1, now()),
            Decision::GiveUpRateLimited { retry_at: later }
        );
    }

    #[test]
    fn transient_failures_back_off_then_give_up() {
        let p = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(250),
            max_rate_limit_wait: Duration::from_secs(60),
        };
        let t = Class::Transient { after: None };
        let Decision::Sleep(d1) = p.decide(&t, 1, now()) else {
            panic!("first failure should sleep")
        };
        let Decision::Sleep(d2) = p.decide(&t, 2, now()) else {
            panic!("second failure should sleep")
        };
        assert!(d1 >= Duration::from_millis(100) && d1 < Duration::from_millis(125));
        assert!(d2 >= Duration::from_millis(200) && d2 < Duration::from_millis(250));
        assert_eq!(p.decide(&t, 3, now()), Decision::GiveUpUnreachable);
        assert!(p.backoff(30) <= Duration::from_millis(250 + 62));
    }
}
