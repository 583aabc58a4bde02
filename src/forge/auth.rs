//! Who hyperloop is on GitHub. Reads the credentials from an environment map (the process
//! environment in production, a plain map in tests, so no test has to mutate process-wide state):
//! a token (`GITHUB_TOKEN`, else `GH_TOKEN`) or a GitHub App (`HYPERLOOP_APP_ID` and
//! `HYPERLOOP_APP_PRIVATE_KEY`, optionally `HYPERLOOP_APP_INSTALLATION_ID`). An App wins when both
//! are present: whoever configured an App did so on purpose (pull requests opened by an App
//! trigger workflows; ones opened with a workflow's own token do not).
//!
//! For an App this module signs the short-lived JWT and keeps the installation token with its
//! expiry, so the client mints a new one only when the old one is about to run out.

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use octocrab::jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::ForgeError;
use super::secret::Secret;

pub const DEFAULT_API_URL: &str = "https://api.github.com";

/// A cached installation token is replaced this long before GitHub's stated expiry, so that a
/// request never leaves with a token that dies in flight.
const REFRESH_MARGIN: TimeDelta = TimeDelta::minutes(5);

/// An App's RSA private key, parsed once.
#[derive(Clone)]
pub struct AppKey(EncodingKey);

impl fmt::Debug for AppKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AppKey([redacted])")
    }
}

impl AppKey {
    /// Parses PEM text (PKCS#1 as GitHub hands it out, or PKCS#8). A key pasted into a CI secret
    /// with its line breaks written as `\n` is accepted too.
    pub fn from_pem(pem: &Secret) -> Result<AppKey, ForgeError> {
        let text = pem.expose().trim();
        let unescaped;
        let text = if !text.contains('\n') && text.contains("\\n") {
            unescaped = Secret::new(text.replace("\\n", "\n"));
            unescaped.expose()
        } else {
            text
        };
        EncodingKey::from_rsa_pem(text.as_bytes())
            .map(AppKey)
            .map_err(|e| ForgeError::Credentials {
                // The error names the kind of problem only; it never quotes the key.
                message: format!("HYPERLOOP_APP_PRIVATE_KEY is not an RSA private key in PEM form ({e})"),
            })
    }
}

#[derive(Debug, Clone)]
pub enum Credentials {
    Token(Secret),
    App {
        app_id: u64,
        key: AppKey,
        installation_id: Option<u64>,
    },
}

impl Credentials {
    pub fn kind(&self) -> &'static str {
        match self {
            Credentials::Token(_) => "token",
            Credentials::App { .. } => "github-app",
        }
    }
}

/// Where GitHub is and how to sign in.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// REST base without a trailing slash (`https://api.github.com`, `https://ghe.example/api/v3`).
    pub api_url: String,
    /// The GraphQL endpoint; derived from `api_url` unless `GITHUB_GRAPHQL_URL` says otherwise.
    pub graphql_url: String,
    pub credentials: Credentials,
}

impl AuthConfig {
    pub fn from_process_env() -> Result<AuthConfig, ForgeError> {
        let env: HashMap<String, String> = crate::secrets::vars();
        AuthConfig::from_env_map(&env)
    }

    pub fn from_env_map(env: &HashMap<String, String>) -> Result<AuthConfig, ForgeError> {
        let get = |k: &str| {
            env.get(k)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let api_url = get("GITHUB_API_URL")
            .unwrap_or_else(|| DEFAULT_API_URL.to_string())
            .trim_end_matches('/')
            .to_string();
        let graphql_url = get("GITHUB_GRAPHQL_URL")
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| graphql_url_for(&api_url));

        let app_id = get("HYPERLOOP_APP_ID");
        // The key is read without `get` so its text never passes through a plain String that
        // outlives this function.
        let app_key = env
            .get("HYPERLOOP_APP_PRIVATE_KEY")
            .map(|k| Secret::new(k.as_str()))
            .filter(|k| !k.is_empty());
        let credentials = match (app_id, app_key) {
            (Some(id), Some(key)) => {
                let app_id = id.parse::<u64>().map_err(|_| ForgeError::Credentials {
                    message: format!("HYPERLOOP_APP_ID must be a number, not {id:?}"),
                })?;
                let installation_id = match get("HYPERLOOP_APP_INSTALLATION_ID") {
                    Some(s) => Some(s.parse::<u64>().map_err(|_| ForgeError::Credentials {
                        message: format!("HYPERLOOP_APP_INSTALLATION_ID must be a number, not {s:?}"),
                    })?),
                    None => None,
                };
                Credentials::App {
                    app_id,
                    key: AppKey::from_pem(&key)?,
                    installation_id,
                }
            }
            (Some(_), None) => {
                return Err(ForgeError::Credentials {
                    message: "HYPERLOOP_APP_ID is set but HYPERLOOP_APP_PRIVATE_KEY is not".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ForgeError::Credentials {
                    message: "HYPERLOOP_APP_PRIVATE_KEY is set but HYPERLOOP_APP_ID is not".into(),
                });
            }
            (None, None) => {
                let token = env
                    .get("GITHUB_TOKEN")
                    .filter(|t| !t.trim().is_empty())
                    .or_else(|| env.get("GH_TOKEN").filter(|t| !t.trim().is_empty()))
                    .ok_or_else(|| ForgeError::Credentials {
                        message: "no GitHub credentials in the environment".into(),
                    })?;
                Credentials::Token(Secret::new(token.trim()))
            }
        };
        Ok(AuthConfig {
            api_url,
            graphql_url,
            credentials,
        })
    }
}

/// GitHub.com serves GraphQL at `/graphql` beside REST; GitHub Enterprise Server serves REST
/// under `/api/v3` and GraphQL at `/api/graphql`.
pub fn graphql_url_for(api_url: &str) -> String {
    match api_url.strip_suffix("/api/v3") {
        Some(host) => format!("{host}/api/graphql"),
        None => format!("{api_url}/graphql"),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AppClaims {
    pub iat: i64,
    pub exp: i64,
    pub iss: String,
}

/// The JWT an App presents to mint installation tokens. Backdated a minute against clock drift,
/// valid for nine (GitHub allows at most ten).
pub fn app_jwt(app_id: u64, key: &AppKey, now: DateTime<Utc>) -> Result<Secret, ForgeError> {
    let claims = AppClaims {
        iat: now.timestamp() - 60,
        exp: now.timestamp() + 9 * 60,
        iss: app_id.to_string(),
    };
    octocrab::jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key.0)
        .map(Secret::new)
        .map_err(|e| ForgeError::Credentials {
            message: format!("could not sign the GitHub App JWT ({e})"),
        })
}

/// An installation token and when GitHub said it expires.
#[derive(Debug, Clone)]
pub struct InstallationToken {
    pub token: Secret,
    pub expires_at: DateTime<Utc>,
}

impl InstallationToken {
    /// Whether it can still be sent at `now` without risking expiry in flight.
    pub fn is_fresh(&self, now: DateTime<Utc>) -> bool {
        now + REFRESH_MARGIN < self.expires_at
    }

    /// Reads GitHub's answer to `POST /app/installations/{id}/access_tokens`.
    pub fn from_response(body: &str) -> Result<InstallationToken, ForgeError> {
        #[derive(Deserialize)]
        struct Raw {
            token: String,
            expires_at: String,
        }
        let raw: Raw = serde_json::from_str(body).map_err(|e| ForgeError::Decode {
            action: "mint an installation token".into(),
            // serde's message names the field and position, not the value.
            message: e.to_string(),
        })?;
        let expires_at = DateTime::parse_from_rfc3339(&raw.expires_at)
            .map_err(|e| ForgeError::Decode {
                action: "mint an installation token".into(),
                message: format!("expires_at {:?}: {e}", raw.expires_at),
            })?
            .with_timezone(&Utc);
        Ok(InstallationToken {
            token: Secret::new(raw.token),
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn token_from_github_token_then_gh_token() {
        let c = AuthConfig::from_env_map(&env(&[("GH_TOKEN", "b"), ("GITHUB_TOKEN", "a")])).expect("config");
        assert!(matches!(&c.credentials, Credentials::Token(t) if t.expose() == "a"));
        let c = AuthConfig::from_env_map(&env(&[("GH_TOKEN", "b"), ("GITHUB_TOKEN", "")])).expect("config");
        assert!(matches!(&c.credentials, Credentials::Token(t) if t.expose() == "b"));
        assert_eq!(c.api_url, "https://api.github.com");
        assert_eq!(c.graphql_url, "https://api.github.com/graphql");
    }

    #[test]
    fn api_url_and_graphql_url() {
        let c = AuthConfig::from_env_map(&env(&[
            ("GITHUB_TOKEN", "a"),
            ("GITHUB_API_URL", "https://ghe.example.com/api/v3/"),
        ]))
        .expect("config");
        assert_eq!(c.api_url, "https://ghe.example.com/api/v3");
        assert_eq!(c.graphql_url, "https://ghe.example.com/api/graphql");
    }

    #[test]
    fn missing_or_partial_credentials_are_errors() {
        let e = AuthConfig::from_env_map(&env(&[])).expect_err("no creds");
        assert!(matches!(e, ForgeError::Credentials { .. }));
        assert!(e.hint().is_some_and(|h| h.contains("GITHUB_TOKEN")));
        let e = AuthConfig::from_env_map(&env(&[("HYPERLOOP_APP_ID", "1"), ("GITHUB_TOKEN", "x")]))
            .expect_err("partial app");
        assert!(e.to_string().contains("HYPERLOOP_APP_PRIVATE_KEY"));
    }

    #[test]
    fn a_bad_key_is_reported_without_quoting_it() {
        let e = AuthConfig::from_env_map(&env(&[
            ("HYPERLOOP_APP_ID", "12"),
            (
                "HYPERLOOP_APP_PRIVATE_KEY",
                "-----BEGIN RSA PRIVATE KEY-----\nsecretstuff\n-----END RSA PRIVATE KEY-----",
            ),
        ]))
        .expect_err("bad key");
        assert!(!e.to_string().contains("secretstuff"), "{e}");
        assert!(!format!("{e:?}").contains("secretstuff"));
    }

    #[test]
    fn installation_token_freshness() {
        let t = InstallationToken::from_response(
            r#"{"token":"ghs_x","expires_at":"2030-01-01T01:00:00Z","permissions":{}}"#,
        )
        .expect("parse");
        let at = |s: &str| DateTime::parse_from_rfc3339(s).expect("date").with_timezone(&Utc);
        assert!(t.is_fresh(at("2030-01-01T00:30:00Z")));
        assert!(!t.is_fresh(at("2030-01-01T00:56:00Z")));
        assert!(!format!("{t:?}").contains("ghs_x"));
    }
}
