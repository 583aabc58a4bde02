//! The environment a worker gets (CONTRACT §4): nothing inherited but an allowlist (the basics a
//! program needs, the AI vendors' own variables, and the names the user listed in
//! `runtime.agent_env`), plus the `HYPERLOOP_*` variables that describe the job. Forge and
//! notification credentials are refused by name even when the user lists them: an agent runs
//! arbitrary commands, and a token in its environment is a token in its transcript.

use std::ffi::OsString;

/// Variables every program expects.
const BASIC: &[&str] = &["PATH", "HOME", "USER", "LANG", "TERM", "TMPDIR"];

/// Prefixes of variables the agents themselves read (API keys, base URLs, model settings).
const AGENT_PREFIXES: &[&str] = &["LC_", "ANTHROPIC_", "CLAUDE_", "OPENAI_", "GEMINI_"];

/// Credentials hyperloop itself uses; never passed to a worker.
const REFUSED: &[&str] = &[
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "GH_ENTERPRISE_TOKEN",
    "GITHUB_ENTERPRISE_TOKEN",
    "HYPERLOOP_APP_PRIVATE_KEY",
    "ACTIONS_RUNTIME_TOKEN",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    "ACTIONS_ID_TOKEN_REQUEST_URL",
];

/// Prefixes of credentials never passed to a worker (Matrix access and registration tokens).
const REFUSED_PREFIXES: &[&str] = &["MATRIX_"];

/// True when `name` must never reach a worker. `extra` holds further names that are secret in
/// this configuration (e.g. `observability.matrix.token_env`).
pub fn is_refused(name: &str, extra: &[String]) -> bool {
    REFUSED.contains(&name)
        || REFUSED_PREFIXES.iter().any(|p| name.starts_with(p))
        || extra.iter().any(|e| e == name)
}

/// True when `name` is inherited from hyperloop's environment.
pub fn is_allowed(name: &str, agent_env: &[String], secret_env: &[String]) -> bool {
    if is_refused(name, secret_env) {
        return false;
    }
    BASIC.contains(&name)
        || AGENT_PREFIXES.iter().any(|p| name.starts_with(p))
        || agent_env.iter().any(|n| n == name)
}

/// Filters `parent` down to what a worker may inherit. Non-UTF-8 names are dropped (no allowed
/// name is one); values are passed through untouched.
pub fn inherited(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    agent_env: &[String],
    secret_env: &[String],
) -> Vec<(OsString, OsString)> {
    let mut out: Vec<(OsString, OsString)> = parent
        .into_iter()
        .filter(|(k, _)| k.to_str().is_some_and(|k| is_allowed(k, agent_env, secret_env)))
        .collect();
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// The names in `agent_env` that will not be passed because they are credentials, for a warning.
pub fn refused_names<'a>(agent_env: &'a [String], secret_env: &[String]) -> Vec<&'a str> {
    agent_env
        .iter()
        .filter(|n| is_refused(n, secret_env))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn allowlist_and_refusals() {
        let parent = os(&[
            ("PATH", "/bin"),
            ("HOME", "/h"),
            ("LC_ALL", "C"),
            ("ANTHROPIC_API_KEY", "k"),
            ("CLAUDE_CODE_X", "1"),
            ("GITHUB_TOKEN", "secret"),
            ("GH_TOKEN", "secret"),
            ("HYPERLOOP_APP_PRIVATE_KEY", "pem"),
            ("MATRIX_ACCESS_TOKEN", "syt"),
            ("MY_BOT_TOKEN", "m"),
            ("IS_SANDBOX", "1"),
            ("RANDOM_THING", "x"),
            ("HYPERLOOP_TASK_ID", "spoofed"),
        ]);
        let agent_env = vec![
            "IS_SANDBOX".to_string(),
            "GITHUB_TOKEN".to_string(),
            "MATRIX_ACCESS_TOKEN".to_string(),
            "MY_BOT_TOKEN".to_string(),
        ];
        let secret = vec!["MY_BOT_TOKEN".to_string()];
        let got: Vec<String> = inherited(parent, &agent_env, &secret)
            .into_iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            got,
            [
                "ANTHROPIC_API_KEY",
                "CLAUDE_CODE_X",
                "HOME",
                "IS_SANDBOX",
                "LC_ALL",
                "PATH"
            ]
        );
        assert_eq!(
            refused_names(&agent_env, &secret),
            ["GITHUB_TOKEN", "MATRIX_ACCESS_TOKEN", "MY_BOT_TOKEN"]
        );
    }
}
