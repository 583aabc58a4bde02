//! A reader for the front matter hyperloop itself writes, without a YAML parser.
//!
//! Every step reads every task file, and a general YAML parser costs tens of microseconds a
//! file — most of an idle step at a thousand tasks. The files hyperloop writes use a small part
//! of YAML: one `key: value` a line, values that are plain words, JSON strings, numbers, `null`,
//! `true`/`false`, flat JSON lists and objects, and block lists of those (`- item` lines).
//! This reads exactly that part and answers `None` for anything else — an indented line, a
//! comment, a quote it does not understand, a word YAML might read as something other than a
//! string — so that the caller hands the text to the full parser. It never guesses: wherever
//! the two could disagree, it declines. The tests compare it with the full parser on many
//! generated front matters, hostile ones included.

use serde_json::{Map, Number, Value};

/// The front matter as the full YAML parser would read it, or `None` when the text is not of
/// the simple shape this reader is sure about.
pub fn front_matter(front: &str) -> Option<Map<String, Value>> {
    let mut map = Map::new();
    // A key whose value is a block list still being read: (key, items).
    let mut open: Option<(&str, Vec<Value>)> = None;
    let mut lines = front.split('\n').peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            // Only the end of the text after its last newline; a blank line inside declines.
            if lines.peek().is_some() {
                return None;
            }
            break;
        }
        if let Some(item) = line.strip_prefix("- ") {
            let (_, items) = open.as_mut()?;
            items.push(block_value(item)?);
            continue;
        }
        close(&mut map, &mut open)?;
        let (key, rest) = line.split_once(':')?;
        if !key_ok(key) || map.contains_key(key) {
            return None;
        }
        if rest.is_empty() {
            open = Some((key, Vec::new()));
            continue;
        }
        let value = block_value(rest.strip_prefix(' ')?)?;
        map.insert(key.to_string(), value);
    }
    close(&mut map, &mut open)?;
    Some(map)
}

/// Ends the block list being read, if any; a key with no items under it declines (YAML reads it
/// as null, which this reader leaves to the full parser).
fn close(map: &mut Map<String, Value>, open: &mut Option<(&str, Vec<Value>)>) -> Option<()> {
    if let Some((key, items)) = open.take() {
        if items.is_empty() || map.contains_key(key) {
            return None;
        }
        map.insert(key.to_string(), Value::Array(items));
    }
    Some(())
}

/// Words YAML may read as something other than a string (null, booleans of YAML 1.1 and 1.2,
/// infinities, not-a-number), compared without case.
const RESERVED: [&str; 16] = [
    "null", "~", "true", "false", "yes", "no", "on", "off", "y", "n", "nan", "inf", "infinity", ".nan",
    ".inf", "-.inf",
];

fn reserved(s: &str) -> bool {
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(s))
}

/// A mapping key: a plain word of letters, digits, `_` and `-`, starting with a letter or `_`.
fn key_ok(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !reserved(key)
}

/// A value after `key: ` or `- `: all of the rest of the line.
fn block_value(s: &str) -> Option<Value> {
    match s.as_bytes().first()? {
        b'"' | b'[' | b'{' => {
            let (value, used) = flow_value(s)?;
            (used == s.len()).then_some(value)
        }
        _ => match word(s) {
            Some(v) => Some(v),
            None => plain_ok(s).then(|| Value::String(s.to_string())),
        },
    }
}

/// `null`, `true`, `false` or a number, spelled the way JSON spells them (and only in the forms
/// whose YAML reading is the same): whole numbers without a sign or leading zeros, decimals
/// with digits on both sides of the point.
fn word(s: &str) -> Option<Value> {
    match s {
        "null" => return Some(Value::Null),
        "true" => return Some(Value::Bool(true)),
        "false" => return Some(Value::Bool(false)),
        _ => {}
    }
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let no_leading_zero = |t: &str| t == "0" || !t.starts_with('0');
    if s.len() > 15 {
        return None;
    }
    if digits(s) && no_leading_zero(s) {
        return s.parse::<u64>().ok().map(|n| Value::Number(n.into()));
    }
    let (whole, frac) = s.split_once('.')?;
    if digits(whole) && no_leading_zero(whole) && digits(frac) {
        return Number::from_f64(s.parse::<f64>().ok()?).map(Value::Number);
    }
    None
}

/// A plain (unquoted) scalar that YAML reads as exactly this string: it starts with a letter,
/// `_` or `/`, holds no character that could start a comment, a mapping, a flow collection,
/// an anchor or an escape, and is not a word YAML reads as something else.
fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if !(first.is_alphabetic() || first == '_' || first == '/') || reserved(s) {
        return false;
    }
    if s.ends_with([' ', ':']) || s.contains(": ") || s.contains(" #") {
        return false;
    }
    s.chars().all(|c| {
        if c.is_ascii() {
            c.is_ascii_alphanumeric() || " -_./'(),;+=?!:#".contains(c)
        } else {
            !(c.is_control() || c.is_whitespace() || matches!(c, '\u{feff}' | '\u{fffe}'))
        }
    })
}

/// A JSON-shaped value in YAML's flow style: a string, a word, or a flat list or object of
/// those. Returns the value and the bytes it used.
fn flow_value(s: &str) -> Option<(Value, usize)> {
    match s.as_bytes().first()? {
        b'"' => quoted(s).map(|(v, n)| (Value::String(v), n)),
        b'[' => {
            let mut items = Vec::new();
            let mut at = 1;
            if s[at..].starts_with(']') {
                return Some((Value::Array(items), at + 1));
            }
            loop {
                let (item, used) = flow_scalar(&s[at..])?;
                items.push(item);
                at += used;
                match s.as_bytes().get(at)? {
                    b',' => at += 1,
                    b']' => return Some((Value::Array(items), at + 1)),
                    _ => return None,
                }
            }
        }
        b'{' => {
            let mut map = Map::new();
            let mut at = 1;
            if s[at..].starts_with('}') {
                return Some((Value::Object(map), at + 1));
            }
            loop {
                if !s[at..].starts_with('"') {
                    return None;
                }
                let (key, used) = quoted(&s[at..])?;
                at += used;
                if s.as_bytes().get(at) != Some(&b':') {
                    return None;
                }
                at += 1;
                let (value, used) = flow_scalar(&s[at..])?;
                at += used;
                if map.insert(key, value).is_some() {
                    return None;
                }
                match s.as_bytes().get(at)? {
                    b',' => at += 1,
                    b'}' => return Some((Value::Object(map), at + 1)),
                    _ => return None,
                }
            }
        }
        _ => None,
    }
}

/// A string or a word inside a flow collection (ended by `,`, `]` or `}`).
fn flow_scalar(s: &str) -> Option<(Value, usize)> {
    if s.starts_with('"') {
        return quoted(s).map(|(v, n)| (Value::String(v), n));
    }
    let end = s.find([',', ']', '}'])?;
    word(&s[..end]).map(|v| (v, end))
}

/// A double-quoted string with only the escapes JSON and YAML read alike and hyperloop's
/// writer uses for ordinary text (`\"`, `\\`, `\n`, `\t`, `\r`). Returns the string and the
/// bytes used, closing quote included.
fn quoted(s: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, i + 1)),
            '\\' => out.push(match chars.next()?.1 {
                '"' => '"',
                '\\' => '\\',
                'n' => '\n',
                't' => '\t',
                'r' => '\r',
                _ => return None,
            }),
            c if c.is_control() || matches!(c, '\u{feff}' | '\u{fffe}' | '\u{2028}' | '\u{2029}') => {
                return None;
            }
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::front_matter;
    use crate::task::{Attempt, Claim, Status, Task};
    use proptest::prelude::*;
    use serde_json::Value;
    use std::path::{Path, PathBuf};

    fn full(front: &str) -> Option<Value> {
        crate::yaml::parse::<Value>(Path::new("t.md"), front).ok()
    }

    /// Whenever the fast reader answers, the full parser reads the same text to the same value.
    fn agrees(front: &str) -> bool {
        match front_matter(front) {
            None => true,
            Some(fast) => {
                let slow = full(front);
                assert_eq!(
                    slow.as_ref(),
                    Some(&Value::Object(fast.clone())),
                    "front matter {front:?}: fast {fast:?}"
                );
                true
            }
        }
    }

    #[test]
    fn hyperloops_own_shapes_are_read_fast() {
        let texts = [
            "id: task-001\ntitle: Task task-001\nspec_ref: specs/a.md\nstatus: complete\nphase: null\ndeps: []\nround: 0\nbranch: null\npr: null\n",
            "id: t\ntitle: \"Title: with colon\"\nspec_ref: specs/x.md\nstatus: in-progress\nphase: verifier\ndeps:\n- task-000\n- \"123\"\nround: 2\nbranch: worker/t\npr: null\nposition: [0,1]\ncost_usd: 0.125\ngate_cleared: true\nclaim: {\"role\":\"verifier\",\"owner\":\"h:1\",\"pgid\":7,\"started_at\":10,\"expires_at\":20,\"nonce\":\"abc\"}\nhistory:\n- {\"round\":0,\"role\":\"implementer\",\"verdict\":\"pass\",\"findings\":0,\"duration_s\":1.5,\"cost_usd\":0.1}\n",
            "id: t\nfailure_reason: \"line one\\nline \\\"two\\\"\\t\\\\\"\nverified_tip: \"0123456789abcdef0123456789abcdef01234567\"\n",
        ];
        for text in texts {
            assert!(front_matter(text).is_some(), "{text:?}");
            assert!(agrees(text));
        }
    }

    #[test]
    fn text_that_only_looks_simple_is_left_to_the_full_parser() {
        for text in [
            // A plain scalar continued on an indented line: YAML reads "Foo bar".
            "id: t\ntitle: Foo\n  bar\n",
            // A comment, an anchor and alias, a tag, a block scalar.
            "id: t # note\n",
            "id: &a t\ntitle: *a\n",
            "id: !!str 12\n",
            "title: |\n  x\n",
            // Words YAML reads as something else.
            "title: yes\n",
            "title: Null\n",
            "title: .inf\n",
            "round: 012\n",
            "round: 0x1F\n",
            "round: -1\n",
            "cost_usd: 1e3\n",
            // A second value for the same key (the full parser refuses it).
            "id: a\nid: b\n",
            "history:\n- {\"round\":0,\"round\":1}\n",
            // A nested mapping, a list under nothing, a key with no value.
            "claim:\n  role: x\n",
            "- a\n",
            "pr:\nid: t\n",
            // Escapes beyond the plain ones, and quotes that do not close where the line ends.
            "title: \"caf\\u00e9\"\n",
            "title: \"a\" b\n",
            "title: 'single'\n",
            // Document markers and directives.
            "...\n",
            "%YAML 1.2\n",
            // Tabs and a blank line between entries.
            "id:\tt\n",
            "id: t\n\ntitle: T\n",
            // Flow collections nested, or with spaces.
            "position: [[0]]\n",
            "position: [0, 1]\n",
            "extra: {\"a\": 1}\n",
        ] {
            assert_eq!(front_matter(text), None, "{text:?}");
        }
    }

    fn hostile_text() -> impl Strategy<Value = String> {
        // Characters that mean something to YAML, and some that do not.
        proptest::collection::vec(
            prop_oneof![
                Just("a"),
                Just("Z"),
                Just("0"),
                Just("9"),
                Just(" "),
                Just(":"),
                Just("#"),
                Just("-"),
                Just("."),
                Just("\""),
                Just("'"),
                Just("\\"),
                Just("["),
                Just("]"),
                Just("{"),
                Just("}"),
                Just(","),
                Just("&"),
                Just("*"),
                Just("!"),
                Just("|"),
                Just(">"),
                Just("%"),
                Just("@"),
                Just("`"),
                Just("?"),
                Just("~"),
                Just("\t"),
                Just("\n"),
                Just("\n  "),
                Just("\n- "),
                Just("é"),
                Just("\u{85}"),
                Just("\u{2028}"),
                Just("\u{feff}"),
                Just("\r"),
                Just("e"),
                Just("x"),
                Just("_"),
                Just("/"),
                Just("n"),
                Just("y"),
                Just("null"),
                Just("true"),
                Just("no"),
                Just("inf"),
                Just("\\n"),
                Just("\\u0041"),
                Just("1.5"),
                Just("1e5"),
                Just("0o7"),
            ],
            0..12,
        )
        .prop_map(|parts| parts.concat())
    }

    fn value_text() -> impl Strategy<Value = String> {
        prop_oneof![
            // Almost plain words, numbers and flow lists: one character from being read alike.
            "[a-zA-Z_/][a-z0-9 :#'./-]{0,8}",
            "[0-9]{1,4}(\\.[0-9]{0,3})?",
            "(null|Null|NULL|true|True|yes|no|on|off|y|n|~|inf|nan|-|0x1F|0o7)",
            "\\[[0-9a-z\",: ]{0,6}\\]",
            hostile_text(),
            any::<String>(),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| f.to_string()),
            any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap_or_default()),
            (0u32..1000, 0u32..1000).prop_map(|(a, b)| format!("{a}.{b}")),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
            hostile_text().prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
            hostile_text().prop_map(|s| crate::task::file::scalar(&s)),
            proptest::collection::vec(hostile_text(), 0..3)
                .prop_map(|v| serde_json::to_string(&v).unwrap_or_default()),
            proptest::collection::vec(0u64..100, 0..3)
                .prop_map(|v| serde_json::to_string(&v).unwrap_or_default()),
            (hostile_text(), hostile_text(), 0u64..9, 0.0f64..10.0).prop_map(|(k, v, n, f)| {
                format!(
                    "{{{}:{},\"n\":{n},\"f\":{}}}",
                    serde_json::to_string(&k).unwrap_or_default(),
                    serde_json::to_string(&v).unwrap_or_default(),
                    serde_json::to_string(&f).unwrap_or_default()
                )
            }),
        ]
    }

    fn key_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("id".to_string()),
            Just("title".to_string()),
            Just("deps".to_string()),
            Just("history".to_string()),
            Just("null".to_string()),
            Just("y".to_string()),
            Just("x-y_z".to_string()),
            hostile_text(),
        ]
    }

    /// Lines of the shapes hyperloop writes, so that generated front matters are often simple
    /// enough for the fast reader and the comparison is not only of refusals.
    fn ordinary_line() -> impl Strategy<Value = String> {
        let word = "[a-zA-Z][a-zA-Z0-9 ._/-]{0,12}";
        prop_oneof![
            (key_text(), word).prop_map(|(k, v)| format!("{k}: {v}\n")),
            (key_text(), any::<u32>()).prop_map(|(k, n)| format!("{k}: {n}\n")),
            (key_text(), 0.0f64..1000.0)
                .prop_map(|(k, f)| format!("{k}: {}\n", crate::task::file::scalar(&f.to_string()))),
            (key_text(), proptest::collection::vec(word, 1..3)).prop_map(|(k, items)| {
                let mut s = format!("{k}:\n");
                for i in items {
                    s.push_str(&format!("- {}\n", crate::task::file::scalar(&i)));
                }
                s
            }),
        ]
    }

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            ordinary_line(),
            ordinary_line(),
            (key_text(), value_text()).prop_map(|(k, v)| format!("{k}: {v}\n")),
            (key_text(), proptest::collection::vec(value_text(), 0..3)).prop_map(|(k, items)| {
                let mut s = format!("{k}:\n");
                for i in items {
                    s.push_str(&format!("- {i}\n"));
                }
                s
            }),
            hostile_text().prop_map(|s| format!("{s}\n")),
        ]
    }

    fn text(hostile: bool) -> BoxedStrategy<String> {
        if hostile {
            prop_oneof![
                hostile_text(),
                any::<String>(),
                "[a-zA-Z][a-zA-Z0-9 ._/'(),:#-]{0,20}"
            ]
            .boxed()
        } else {
            "[a-zA-Z][a-zA-Z0-9 ._/'(),-]{0,20}".boxed()
        }
    }

    /// Tasks as hyperloop writes them: with `hostile`, their strings hold anything at all.
    fn task(hostile: bool) -> impl Strategy<Value = Task> {
        let opt = move || proptest::option::of(text(hostile));
        (
            (
                "[a-z][a-z0-9-]{0,10}",
                text(hostile),
                text(hostile),
                0usize..5,
                opt(),
            ),
            (
                proptest::collection::vec(text(hostile), 0..3),
                any::<u32>(),
                any::<bool>(),
                opt(),
            ),
            (
                proptest::option::of(proptest::collection::vec(0usize..9, 0..3)),
                0u32..100_000,
                any::<u32>(),
            ),
            (
                any::<bool>(),
                opt(),
                opt(),
                proptest::option::of("[0-9a-f]{40}"),
                any::<bool>(),
            ),
            proptest::collection::vec(
                (
                    0u32..50,
                    text(hostile),
                    text(hostile),
                    0u32..9,
                    0u32..10_000,
                    proptest::option::of(0u64..1_000_000),
                ),
                0..3,
            ),
            (any::<bool>(), 0u64..1_000_000, text(hostile)),
        )
            .prop_map(
                |(
                    (id, title, spec_ref, status, phase),
                    (deps, round, with_branch, pr),
                    (position, cents, rebase),
                    (gate, verdict, reason, tip, cancelled),
                    history,
                    (with_claim, started, nonce),
                )| {
                    let mut t = Task::new(id.clone(), title, spec_ref);
                    t.status = Status::ALL[status];
                    t.phase = phase.filter(|p| !p.is_empty());
                    t.deps = deps;
                    t.round = round;
                    t.branch = with_branch.then(|| crate::task::file::task_branch(&id));
                    t.pr = pr.filter(|p| !p.is_empty());
                    t.position = position;
                    t.cost_usd = f64::from(cents) / 100.0;
                    t.rebase_attempts = rebase;
                    t.gate_cleared = gate;
                    t.last_verdict = verdict.filter(|v| !v.is_empty());
                    t.failure_reason = reason.filter(|r| !r.is_empty());
                    t.verified_tip = tip;
                    t.cancelled = cancelled;
                    t.history = history
                        .into_iter()
                        .map(|(round, role, verdict, findings, ms, run_id)| Attempt {
                            round,
                            role,
                            verdict,
                            findings,
                            duration_s: f64::from(ms) / 1000.0,
                            cost_usd: run_id.map(|r| r as f64 / 1000.0),
                            run_id,
                        })
                        .collect();
                    t.claim = with_claim.then(|| Claim {
                        role: "verifier".into(),
                        owner: "host:1".into(),
                        pgid: Some(7),
                        started_at: started,
                        expires_at: started + 60,
                        nonce,
                        item: None,
                        round: Some(1),
                        base: None,
                    });
                    t.body = "Implement it.\n".into();
                    t
                },
            )
    }

    fn front_of(text: &str) -> &str {
        let rest = text.strip_prefix("---\n").unwrap_or_default();
        rest.split_once("\n---\n").map_or("", |(f, _)| f)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn tasks_hyperloop_writes_are_read_fast_and_alike(t in task(false)) {
            let text = crate::task::file::render(&t);
            let path = PathBuf::from(format!("specs/tasks/{}.md", t.id));
            let front = format!("{}\n", front_of(&text));
            prop_assert!(front_matter(&front).is_some(), "not read fast: {}", text);
            let fast = crate::task::file::parse(&path, &text).map_err(|e| e.to_string());
            let slow = crate::task::file::parse_slowly(&path, &text).map_err(|e| e.to_string());
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn tasks_with_any_strings_read_alike(t in task(true)) {
            let text = crate::task::file::render(&t);
            let path = PathBuf::from(format!("specs/tasks/{}.md", t.id));
            let front = format!("{}\n", front_of(&text));
            prop_assert!(agrees(&front));
            let fast = crate::task::file::parse(&path, &text).map_err(|e| e.to_string());
            let slow = crate::task::file::parse_slowly(&path, &text).map_err(|e| e.to_string());
            prop_assert_eq!(fast, slow);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn the_fast_reader_never_disagrees_with_the_full_parser(
            lines in proptest::collection::vec(line(), 1..6)
        ) {
            prop_assert!(agrees(&lines.concat()));
        }

        #[test]
        fn single_values_read_alike(key in key_text(), value in value_text()) {
            let inline = format!("{key}: {value}\n");
            let listed = format!("{key}:\n- {value}\n");
            prop_assert!(agrees(&inline));
            prop_assert!(agrees(&listed));
        }
    }
}
