//! Structured events on standard error (CONTRACT §7): one line per event, console text or one
//! JSON object (`timestamp`, `level`, `event`, then the fields). Events are `tracing` events with
//! an `event` field naming them; [`init`] installs the formatter that renders them, and
//! [`init_with`] adds a second consumer (the Matrix notifier) beside it. The events people are
//! told about are [`Notable`] values: their lines are written here too, and the values go to the
//! notifier as they are.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, format::Writer};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogFormat, LogLevel};

mod notable;

pub use notable::{Budget, Halt, Listener, MergeAttempt, MergeOutcome, Notable, Origin, Orphan, PullRequest};

/// Emits a named event with fields: `emit!(INFO, "worker_reaped", task_id = id, verdict = v)`.
#[macro_export]
macro_rules! emit {
    ($level:ident, $name:expr $(, $($fields:tt)*)?) => {
        ::tracing::event!(target: "hyperloop::events", ::tracing::Level::$level, event = $name $(, $($fields)*)?)
    };
}

/// Installs the global subscriber for this process. Later calls do nothing.
pub fn init(format: LogFormat, level: LogLevel) {
    init_with(format, level, None);
}

/// A second consumer of events next to the standard-error formatter (the Matrix notifier).
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// [`init`] plus an `extra` layer that sees events whatever `level` is: the level governs what is
/// printed, while the extra layer applies its own choice of events.
pub fn init_with(format: LogFormat, level: LogLevel, extra: Option<ExtraLayer>) {
    let max = match level {
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Warning => LevelFilter::WARN,
        LogLevel::Error => LevelFilter::ERROR,
    };
    let printer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .event_format(Formatter {
            json: format == LogFormat::Json,
        })
        .with_filter(max);
    let _ = tracing_subscriber::registry()
        .with(extra)
        .with(printer)
        .try_init();
}

/// Renders events as CONTRACT §7 lines.
#[derive(Debug, Clone, Copy)]
pub struct Formatter {
    pub json: bool,
}

#[derive(Default)]
struct Fields {
    event: Option<String>,
    message: Option<String>,
    values: Vec<(String, serde_json::Value)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, serde_json::Value::String(value.to_string()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, serde_json::Value::Bool(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, serde_json::Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, serde_json::Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, serde_json::Value::from(rounded(value)));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, serde_json::Value::String(format!("{value:?}")));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        match field.name() {
            "event" => self.event = value.as_str().map(str::to_string),
            "message" => {
                self.message = Some(value.as_str().map_or_else(|| value.to_string(), str::to_string))
            }
            name => self.values.push((name.to_string(), value)),
        }
    }
}

/// A number as its line shows it: durations and costs read better to the thousandth, and JSON
/// keeps a number.
pub fn rounded(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

impl<S, N> FormatEvent<S, N> for Formatter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut f = Fields::default();
        event.record(&mut f);
        let name = f
            .event
            .clone()
            .or_else(|| f.message.clone())
            .unwrap_or_else(|| "log".to_string());
        let level = level_name(event.metadata().level());
        let ts = timestamp(SystemTime::now());
        if self.json {
            let mut obj = serde_json::Map::new();
            obj.insert("timestamp".into(), ts.into());
            obj.insert("level".into(), level.into());
            obj.insert("event".into(), name.into());
            if f.event.is_some()
                && let Some(m) = f.message
            {
                obj.insert("message".into(), m.into());
            }
            for (k, v) in f.values {
                obj.insert(k, v);
            }
            let line = serde_json::to_string(&obj).map_err(|_| std::fmt::Error)?;
            writeln!(writer, "{line}")
        } else {
            let mut line = format!("{ts} [{level:<7}] {name:<18}");
            if f.event.is_some()
                && let Some(m) = f.message
            {
                let _ = write!(line, " {m}");
            }
            let mut text = String::new();
            let mut width = line.chars().count();
            let mut fields_on_line = 0;
            for (k, v) in f.values {
                let field = match v {
                    serde_json::Value::String(s) if !s.contains(char::is_whitespace) && !s.is_empty() => {
                        format!("{k}={}", shorten(&s))
                    }
                    serde_json::Value::String(s) => {
                        format!("{k}={}", serde_json::Value::String(shorten(&s)))
                    }
                    other => format!("{k}={other}"),
                };
                let len = field.chars().count();
                // People read the console in a terminal: past the width, a field continues on
                // an indented line of its own event.
                if fields_on_line > 0 && width + 1 + len > CONSOLE_WIDTH {
                    text.push_str(line.trim_end());
                    text.push('\n');
                    line = CONTINUATION.to_string();
                    width = CONTINUATION.len();
                    fields_on_line = 0;
                }
                line.push(' ');
                line.push_str(&field);
                width += 1 + len;
                fields_on_line += 1;
            }
            text.push_str(line.trim_end());
            writeln!(writer, "{text}")
        }
    }
}

/// Console lines wrap before this many characters.
const CONSOLE_WIDTH: usize = 110;
/// The start of a console line that continues the event above it.
pub const CONTINUATION: &str = "   ";
/// Longest field value the console shows (the JSON format has every value whole).
const CONSOLE_VALUE_CHARS: usize = 80;

fn shorten(s: &str) -> String {
    let one_line = s.replace('\n', " ⏎ ");
    match one_line.char_indices().nth(CONSOLE_VALUE_CHARS) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

/// RFC 3339 UTC timestamp with millisecond precision: a step's events often share a second.
pub fn timestamp(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let millis = since.subsec_millis();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_millis(1_776_263_381_042)),
            "2026-04-15T14:29:41.042Z"
        );
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
