//! Credentials as a type. A [`Secret`] holds a token or a private key; its `Debug` and `Display`
//! print a fixed placeholder, so a token cannot reach a log line, an error message or a panic
//! through formatting. The only way to the text is [`Secret::expose`], which is called where an
//! HTTP header or a signature is built and nowhere else. The memory is wiped on drop.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

const REDACTED: &str = "[redacted]";

#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(SecretString::from(text.into()))
    }

    /// The secret text. Use only to build a header or a signature, never to format a message.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().trim().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({REDACTED})")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret::new(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_text() {
        let s = Secret::new("ghp_canary_0123456789");
        assert!(!format!("{s:?}").contains("canary"));
        assert!(!format!("{s}").contains("canary"));
        assert!(!format!("{s:#?}").contains("canary"));
        assert_eq!(s.expose(), "ghp_canary_0123456789");
    }
}
