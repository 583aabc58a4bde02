//! Strict YAML reading shared by configuration, definitions and task files: YAML 1.2 booleans only
//! (`no` stays a string, `y` stays a string), duplicate keys rejected, and every error turned into
//! an [`Error::Invalid`] that names the file and the line and column.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

fn options() -> serde_saphyr::Options {
    let mut opts = serde_saphyr::Options::default();
    opts.strict_booleans = true;
    opts.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    opts
}

/// Turns a parser/deserializer error into our error, keeping line and column.
pub fn error_for(file: &Path, err: &serde_saphyr::Error) -> Error {
    let location = match err.location() {
        Some(loc) => format!("line {} column {}", loc.line(), loc.column()),
        None => "document".to_string(),
    };
    // The library's Display repeats the position (sometimes twice) and adds a source snippet;
    // the user needs the message alone, next to our own position.
    let full = err.to_string();
    let mut message = full
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    while let Some(rest) = strip_position(&message) {
        message = rest.to_string();
    }
    // A hint meant for programmers using the library, not for people writing YAML.
    if let Some(idx) = message.find(", set DuplicateKeyPolicy") {
        message.truncate(idx);
    }
    Error::invalid(file, location, message)
}

/// `line N column M: rest` → `rest`.
fn strip_position(s: &str) -> Option<&str> {
    let rest = s.strip_prefix("line ")?;
    let (_, rest) = rest.split_once(" column ")?;
    let (col, rest) = rest.split_once(": ")?;
    col.chars().all(|c| c.is_ascii_digit()).then_some(rest)
}

/// Parses one YAML document into `T`.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T> {
    serde_saphyr::from_str_with_options(text, options()).map_err(|e| error_for(file, &e))
}

/// Parses a stream of YAML documents (`---` separated) into `T`s.
pub fn parse_multi<T: DeserializeOwned>(file: &Path, text: &str) -> Result<Vec<T>> {
    serde_saphyr::from_multiple_with_options(text, options()).map_err(|e| error_for(file, &e))
}

/// Serialises a value as block-style YAML.
pub fn to_string<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_saphyr::to_string(value).map_err(|e| Error::other(format!("cannot write YAML: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_position_once() {
        let e = parse::<serde_json::Value>(Path::new("f.yaml"), "a: 1\na: 2\n").unwrap_err();
        let msg = e.to_string();
        assert_eq!(msg.matches("line 2").count(), 1, "{msg}");
        assert!(msg.contains("duplicate"), "{msg}");
        assert!(!msg.contains("DuplicateKeyPolicy"), "{msg}");
    }
}
