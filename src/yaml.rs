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
    // The library's Display repeats the position and adds a source snippet; the first line
    // without the position prefix is the message a user needs.
    let full = err.to_string();
    let first = full.lines().next().unwrap_or_default();
    let message = match first.find(": ") {
        Some(idx) if first.starts_with("error: line") || first.starts_with("line ") => {
            first[idx + 2..].to_string()
        }
        _ => first.trim_start_matches("error: ").to_string(),
    };
    Error::invalid(file, location, message)
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
