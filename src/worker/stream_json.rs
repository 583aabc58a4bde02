//! Reading claude's `--output-format stream-json` output: one JSON object per line, ending with a
//! `{"type":"result", ...}` event that carries the run's cost, turn count, session id and whether
//! it ended in an error. Any other output (plain text, other agents) is ignored, so the same
//! reader runs over every worker's standard output.

use serde_json::Value;

/// What the final `result` event reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResultEvent {
    pub total_cost_usd: Option<f64>,
    pub num_turns: Option<u32>,
    pub session_id: Option<String>,
    pub is_error: Option<bool>,
    pub subtype: Option<String>,
}

/// Feeds on output lines and remembers the last `result` event.
#[derive(Debug, Default)]
pub struct StreamJsonReader {
    last: Option<ResultEvent>,
    session_id: Option<String>,
}

impl StreamJsonReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks at one line of standard output (without or with its newline).
    pub fn feed_line(&mut self, line: &[u8]) {
        let line = line.trim_ascii();
        // Cheap rejections first: most output of a chatty agent is not a result event.
        if !line.starts_with(b"{") || !contains(line, b"\"type\"") {
            return;
        }
        let Ok(value) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        let Some(kind) = value.get("type").and_then(Value::as_str) else {
            return;
        };
        if let Some(sid) = value.get("session_id").and_then(Value::as_str) {
            self.session_id = Some(sid.to_string());
        }
        if kind == "result" {
            self.last = Some(parse_result(&value));
        }
    }

    /// The final result event, with the session id from earlier events when it lacks one.
    pub fn result(&self) -> Option<ResultEvent> {
        let mut r = self.last.clone()?;
        if r.session_id.is_none() {
            r.session_id.clone_from(&self.session_id);
        }
        Some(r)
    }

    /// The session id seen in any event (claude prints it in `system/init` already).
    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }
}

fn parse_result(v: &Value) -> ResultEvent {
    let cost = v
        .get("total_cost_usd")
        .or_else(|| v.get("cost_usd"))
        .and_then(Value::as_f64)
        .filter(|c| c.is_finite() && *c >= 0.0);
    ResultEvent {
        total_cost_usd: cost,
        num_turns: v
            .get("num_turns")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok()),
        session_id: v.get("session_id").and_then(Value::as_str).map(str::to_string),
        is_error: v.get("is_error").and_then(Value::as_bool),
        subtype: v.get("subtype").and_then(Value::as_str).map(str::to_string),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads a whole output text (e.g. a log file) at once.
pub fn parse_output(text: &str) -> Option<ResultEvent> {
    let mut r = StreamJsonReader::new();
    for line in text.lines() {
        r.feed_line(line.as_bytes());
    }
    r.result()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shaped like claude 2.1's real output (trimmed long fields).
    const REAL: &str = r#"{"type":"system","subtype":"init","cwd":"/tmp/wt","session_id":"5d0c1a4e-8a52-4d8e-9b1e-3f7f2c9a0b11","tools":["Bash","Edit","Read","Write"],"mcp_servers":[],"model":"claude-sonnet-4-5","permissionMode":"bypassPermissions","apiKeySource":"ANTHROPIC_API_KEY","output_style":"default","uuid":"0b0c"}
{"type":"assistant","message":{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"tool_use","id":"toolu_01","name":"Bash","input":{"command":"echo hi"}}],"stop_reason":null,"usage":{"input_tokens":10,"output_tokens":5}},"parent_tool_use_id":null,"session_id":"5d0c1a4e-8a52-4d8e-9b1e-3f7f2c9a0b11","uuid":"1a"}
{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_01","type":"tool_result","content":"hi","is_error":false}]},"parent_tool_use_id":null,"session_id":"5d0c1a4e-8a52-4d8e-9b1e-3f7f2c9a0b11","uuid":"2b"}
plain text the agent printed
{"type":"result","subtype":"success","is_error":false,"duration_ms":2345,"duration_api_ms":1200,"num_turns":2,"result":"Done.","session_id":"5d0c1a4e-8a52-4d8e-9b1e-3f7f2c9a0b11","total_cost_usd":0.0421,"usage":{"input_tokens":20,"output_tokens":10},"permission_denials":[],"uuid":"3c"}
"#;

    #[test]
    fn parses_the_final_result_event() {
        let r = parse_output(REAL).expect("a result event");
        assert_eq!(r.total_cost_usd, Some(0.0421));
        assert_eq!(r.num_turns, Some(2));
        assert_eq!(
            r.session_id.as_deref(),
            Some("5d0c1a4e-8a52-4d8e-9b1e-3f7f2c9a0b11")
        );
        assert_eq!(r.is_error, Some(false));
        assert_eq!(r.subtype.as_deref(), Some("success"));
    }

    #[test]
    fn error_results_and_partial_lines() {
        let text = "{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"s1\"}\n\
            {\"type\":\"result\",\"subtype\":\"error_max_turns\",\"is_error\":true,\"num_turns\":7}\n\
            {\"type\":\"result\",\"total_cost";
        let r = parse_output(text).expect("a result event");
        assert_eq!(r.is_error, Some(true));
        assert_eq!(r.num_turns, Some(7));
        assert_eq!(r.total_cost_usd, None);
        assert_eq!(r.session_id.as_deref(), Some("s1"));
    }

    #[test]
    fn no_result_in_plain_output() {
        assert_eq!(
            parse_output("hello\n{not json}\n{\"type\":\"assistant\"}\n"),
            None
        );
        assert_eq!(parse_output(""), None);
    }

    #[test]
    fn rejects_nonsense_numbers() {
        let r = parse_output("{\"type\":\"result\",\"total_cost_usd\":-1,\"num_turns\":-3}")
            .expect("a result event");
        assert_eq!(r.total_cost_usd, None);
        assert_eq!(r.num_turns, None);
    }
}
