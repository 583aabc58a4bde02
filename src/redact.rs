//! Redaction of what leaves the machine: agent transcripts copied where others can read them (a
//! workflow artifact, a `work --out` folder) and agent text shown in a pull request.
//!
//! An agent never holds a forge credential, but it holds its own API key, it can print whatever
//! it reads, and a hostile one may print a token it found anywhere. So every secret this process
//! knows is replaced by `***`, in the forms it would take in a transcript:
//!
//! - as it is, and JSON-escaped (stream-json carries text inside JSON strings: a PEM key's line
//!   breaks become `\n`); a multi-line secret also line by line, however it was wrapped;
//! - base64-encoded at any alignment inside a longer encoding, standard and URL-safe alphabets
//!   (git's `Authorization: basic base64(x-access-token:<token>)` is one such encoding);
//! - token-shaped strings whatever their origin: GitHub's (`ghp_`, `gho_`, `ghu_`, `ghs_`,
//!   `ghr_`, `github_pat_`) and Anthropic's (`sk-ant-`) followed by their alphabet.
//!
//! The secrets are: [`crate::secrets::values`] (the sealed credentials), `ANTHROPIC_API_KEY`, and
//! every environment variable whose name says it holds one (`TOKEN`, `KEY`, `SECRET`, `PASSWORD`),
//! when its value has at least 8 characters (shorter ones would blank ordinary words).

use std::sync::OnceLock;

use aho_corasick::{AhoCorasick, MatchKind};

/// What every redacted secret becomes.
pub const MASK: &str = "***";

/// Shortest value treated as a secret.
const MIN_SECRET: usize = 8;

/// Words in a variable's name that mark its value as a secret.
const SECRET_WORDS: [&str; 4] = ["TOKEN", "KEY", "SECRET", "PASSWORD"];

/// A token's prefix, the characters that may follow it and how many at least.
type Shape = (&'static str, fn(u8) -> bool, usize);

/// The token-shaped strings masked wherever they come from.
const TOKEN_SHAPES: [Shape; 7] = [
    ("github_pat_", is_word, 20),
    ("ghp_", is_alnum, 20),
    ("gho_", is_alnum, 20),
    ("ghu_", is_alnum, 20),
    ("ghs_", is_alnum, 20),
    ("ghr_", is_alnum, 20),
    ("sk-ant-", is_key_char, 16),
];

fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Replaces known secrets and token-shaped strings with [`MASK`].
#[derive(Debug)]
pub struct Redactor {
    /// Every form of every secret, longest first among overlapping matches.
    literals: Literals,
    /// Per form: a base64 encoding, whose match grows to the whole encoded run around it (the
    /// characters at its edges carry bits of the secret too).
    encoded: Vec<bool>,
    shapes: AhoCorasick,
}

#[derive(Debug)]
enum Literals {
    Automaton(AhoCorasick),
    Naive(Vec<String>),
}

impl Redactor {
    /// A redactor for these secret values (each also in its encoded forms).
    pub fn new<I, S>(secrets: I) -> Redactor
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        // (form, is a base64 encoding)
        let mut needles: Vec<(String, bool)> = Vec::new();
        for secret in secrets {
            let secret = secret.as_ref().trim();
            if secret.len() < MIN_SECRET {
                continue;
            }
            forms(secret, &mut needles);
            if secret.contains('\n') {
                for line in secret.lines().map(str::trim) {
                    // PEM armour lines are public text; the lines between them are the key.
                    if line.len() >= MIN_SECRET && !line.starts_with("-----") {
                        forms(line, &mut needles);
                    }
                }
            }
        }
        needles.sort();
        needles.dedup_by(|a, b| a.0 == b.0);
        let (forms, encoded): (Vec<String>, Vec<bool>) = needles.into_iter().unzip();
        let literals = match AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&forms)
        {
            Ok(ac) => Literals::Automaton(ac),
            // Only a pathological size fails to build; slower, but nothing goes unmasked.
            Err(_) => Literals::Naive(forms),
        };
        let shapes = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(TOKEN_SHAPES.iter().map(|(p, _, _)| p))
            .expect("constant patterns build");
        Redactor {
            literals,
            encoded,
            shapes,
        }
    }

    /// A redactor for the secrets of this process's environment (see the module's comment).
    pub fn from_env() -> Redactor {
        Redactor::new(env_secrets())
    }

    /// The process-wide redactor, built once: the environment's secrets do not change while it
    /// runs.
    pub fn global() -> &'static Redactor {
        static GLOBAL: OnceLock<Redactor> = OnceLock::new();
        GLOBAL.get_or_init(Redactor::from_env)
    }

    /// `bytes` with every secret replaced.
    pub fn redact_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut literal = |form: usize, start: usize, end: usize| {
            if self.encoded[form] {
                let is_b64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_');
                let before = bytes[..start].iter().rev().take_while(|b| is_b64(**b)).count();
                let after = bytes[end..]
                    .iter()
                    .take_while(|b| is_b64(**b) || **b == b'=')
                    .count();
                spans.push((start - before, end + after));
            } else {
                spans.push((start, end));
            }
        };
        match &self.literals {
            Literals::Automaton(ac) => {
                for m in ac.find_iter(bytes) {
                    literal(m.pattern().as_usize(), m.start(), m.end());
                }
            }
            Literals::Naive(forms) => {
                for (i, n) in forms.iter().map(String::as_bytes).enumerate() {
                    for (at, _) in bytes.windows(n.len()).enumerate().filter(|(_, w)| w == &n) {
                        literal(i, at, at + n.len());
                    }
                }
            }
        }
        for m in self.shapes.find_iter(bytes) {
            let (_, allowed, min) = TOKEN_SHAPES[m.pattern().as_usize()];
            // Inside a longer identifier (`my_ghp_…`) it is not a token's start.
            if m.start() > 0 && is_alnum(bytes[m.start() - 1]) {
                continue;
            }
            let tail = bytes[m.end()..].iter().take_while(|b| allowed(**b)).count();
            if tail >= min {
                spans.push((m.start(), m.end() + tail));
            }
        }
        if spans.is_empty() {
            return bytes.to_vec();
        }
        spans.sort_unstable();
        let mut out = Vec::with_capacity(bytes.len());
        let mut at = 0;
        for (start, end) in spans {
            if end <= at {
                continue;
            }
            if start >= at {
                out.extend_from_slice(&bytes[at..start]);
                out.extend_from_slice(MASK.as_bytes());
            }
            at = end;
        }
        out.extend_from_slice(&bytes[at..]);
        out
    }

    /// `text` with every secret replaced.
    pub fn redact(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.redact_bytes(text.as_bytes())).into_owned()
    }
}

/// The secrets of this process's environment.
pub fn env_secrets() -> Vec<String> {
    let mut all = crate::secrets::values();
    for (name, value) in crate::secrets::vars() {
        if names_a_secret(&name) {
            all.push(value);
        }
    }
    all.retain(|v| v.trim().len() >= MIN_SECRET);
    all
}

/// Whether a variable's name says its value is a secret.
fn names_a_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    // git's `GIT_CONFIG_KEY_<n>` holds a configuration key's name, which hyperloop itself sets
    // for agents; blanking it would blank ordinary git output.
    if upper.starts_with("GIT_CONFIG_KEY_") {
        return false;
    }
    name == "ANTHROPIC_API_KEY" || SECRET_WORDS.iter().any(|w| upper.contains(w))
}

/// `secret` as it may appear in a transcript: itself, JSON-escaped, base64-encoded.
fn forms(secret: &str, out: &mut Vec<(String, bool)>) {
    out.push((secret.to_string(), false));
    if let Ok(quoted) = serde_json::to_string(secret) {
        let escaped = &quoted[1..quoted.len() - 1];
        if escaped != secret {
            out.push((escaped.to_string(), false));
        }
    }
    for alphabet in [STANDARD, URL_SAFE] {
        for offset in 0..3 {
            if let Some(core) = base64_core(secret.as_bytes(), offset, alphabet) {
                out.push((core, true));
            }
        }
    }
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The base64 characters that encode `data` and nothing else when `data` starts `offset` bytes
/// (mod 3) into a longer encoded text: the same whatever comes before or after it, so a match
/// finds the secret inside any encoding of a text that contains it (`x-access-token:<token>`).
fn base64_core(data: &[u8], offset: usize, alphabet: &[u8; 64]) -> Option<String> {
    let mut padded = vec![0u8; offset];
    padded.extend_from_slice(data);
    let encoded = encode(&padded, alphabet);
    // The first characters mix in the bytes before; a character is pure once all six of its
    // bits come from `data`: after 2 characters when one byte precedes, 3 when two do.
    let skip = [0, 2, 3][offset];
    // The last characters mix in the bytes after: whole groups are pure, and in a partial group
    // of r bytes the first r characters are.
    let n = padded.len();
    let keep = n / 3 * 4 + n % 3;
    let core = encoded.get(skip..keep)?;
    (core.len() >= MIN_SECRET).then(|| core.to_string())
}

fn encode(data: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(alphabet[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "tok3n-canary-8b1d2f0e9a";
    const KEY: &str = "sk-test-api-key-abcdef0123";

    fn r() -> Redactor {
        Redactor::new([TOKEN, KEY, "short"])
    }

    fn b64(s: &str) -> String {
        // Padding as a real encoder writes it.
        let mut e = encode(s.as_bytes(), STANDARD);
        while !e.len().is_multiple_of(4) {
            e.push('=');
        }
        e
    }

    #[test]
    fn encoder_matches_known_vectors() {
        assert_eq!(b64("f"), "Zg==");
        assert_eq!(b64("fo"), "Zm8=");
        assert_eq!(b64("foo"), "Zm9v");
        assert_eq!(b64("foobar"), "Zm9vYmFy");
        assert_eq!(encode(&[0xfb, 0xff], URL_SAFE), "-_8");
    }

    #[test]
    fn plain_values_are_masked_and_short_ones_are_not() {
        let out = r().redact(&format!("token {TOKEN} and key={KEY}; short stays"));
        assert_eq!(out, "token *** and key=***; short stays");
    }

    #[test]
    fn a_secret_inside_json_escaped_text_is_masked() {
        let pem = "-----BEGIN KEY-----\nMIIEowIBAAKCAQEA1234567890abcdef\nQWERTYUIOPasdfghjkl0987654321\n-----END KEY-----";
        let red = Redactor::new([pem, TOKEN]);
        let line = serde_json::json!({
            "type": "assistant",
            "text": format!("found \"{TOKEN}\"\tin env; key:\n{pem}\n"),
        })
        .to_string();
        let out = red.redact(&line);
        assert!(!out.contains(TOKEN), "{out}");
        assert!(!out.contains("MIIEowIBAAKCAQEA1234567890abcdef"), "{out}");
        assert!(!out.contains("QWERTYUIOPasdfghjkl0987654321"), "{out}");
        assert!(out.contains("\"type\":\"assistant\""), "{out}");
        // Still valid JSON: the mask replaced whole escaped runs.
        assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok(), "{out}");
    }

    #[test]
    fn base64_forms_at_every_alignment_are_masked() {
        let red = r();
        let basic = b64(&format!("x-access-token:{TOKEN}"));
        let out = red.redact(&format!("AUTHORIZATION: basic {basic}\n"));
        assert_eq!(out, "AUTHORIZATION: basic ***\n");
        for prefix in ["", "a", "ab", "abc", "user:"] {
            let enc = b64(&format!("{prefix}{TOKEN}!"));
            // The whole encoded run goes: its edges carry bits of the secret too.
            assert_eq!(red.redact(&format!("\"{enc}\"")), "\"***\"", "{prefix:?}: {enc}");
        }
        let url_safe = encode(format!("??{KEY}??").as_bytes(), URL_SAFE);
        assert!(red.redact(&url_safe).contains(MASK), "{url_safe}");
    }

    #[test]
    fn token_shaped_strings_are_masked() {
        let red = Redactor::new(Vec::<String>::new());
        let ghp = format!("ghp_{}", "A1b2C3d4".repeat(5));
        let pat = format!("github_pat_{}", "11ABCDEFG0_xyz".repeat(4));
        let ant = "sk-ant-api03-abcDEF_123-xyz7890abcd";
        let text = format!("a={ghp} b=\"{pat}\" c:{ant}. ghs_short my_ghp_{}", "x".repeat(30));
        let out = red.redact(&text);
        assert_eq!(out, format!("a=*** b=\"***\" c:***. ghs_short my_***"), "{text}");
        assert_eq!(red.redact("the ghp_ prefix"), "the ghp_ prefix");
    }

    #[test]
    fn secrets_are_known_by_their_variables_names() {
        for name in [
            "ANTHROPIC_API_KEY",
            "NPM_TOKEN",
            "deploy_password",
            "AWS_SECRET_ACCESS_KEY",
            "INPUT_APP-PRIVATE-KEY",
        ] {
            assert!(names_a_secret(name), "{name}");
        }
        for name in [
            "PATH",
            "HOME",
            "GITHUB_RUN_ID",
            "GIT_CONFIG_KEY_0",
            "HYPERLOOP_APP_ID",
        ] {
            assert!(!names_a_secret(name), "{name}");
        }
    }

    #[test]
    fn overlapping_matches_mask_once_and_bytes_pass_through() {
        let red = Redactor::new([TOKEN, &format!("{TOKEN}-longer")]);
        assert_eq!(red.redact(&format!("[{TOKEN}-longer]")), "[***]");
        let bytes = [b"\xff\xfe ".as_slice(), TOKEN.as_bytes(), b" \x00"].concat();
        assert_eq!(red.redact_bytes(&bytes), b"\xff\xfe *** \x00");
    }
}
