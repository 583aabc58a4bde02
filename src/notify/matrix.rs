//! The Matrix client behind notifications: signs in (an access token from the environment, a
//! cached one that `whoami` still accepts, or a bot registered with a registration token), finds
//! the room (configured, cached, or created and shared with `invite_user`), and posts each notice
//! as `m.text`, threading a task's notices under its first one. What it learns is cached in
//! `<repo>/.hyperloop/matrix-state.json` (mode 0600, written atomically, excluded from git through
//! `.git/info/exclude`): the bot's token, user and device ids, the room, and the thread roots, so a
//! later `step` process continues the same threads. The bot's password is used for one
//! registration and never kept. Tokens live in [`Secret`]s and reach nothing but the
//! `Authorization` header and the state file.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Notice, REQUEST_TIMEOUT, Sink};
use crate::config::MatrixConfig;
use crate::emit;
use crate::forge::secret::Secret;

/// `<repo>/.hyperloop/matrix-state.json`.
pub fn state_path(repo_root: &Path) -> PathBuf {
    repo_root.join(".hyperloop").join("matrix-state.json")
}

/// What the state file holds. Not `Debug`: it carries the bot's access token.
#[derive(Default, Serialize, Deserialize)]
struct State {
    /// Cached credentials belong to this homeserver only.
    #[serde(default)]
    homeserver: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_id: Option<String>,
    /// Only for a bot hyperloop registered; a token from `token_env` stays in the environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    room_id: Option<String>,
    /// Task id → event id of the first message about it in `room_id`.
    #[serde(default)]
    threads: BTreeMap<String, String>,
}

/// Why a request did not succeed. Never holds a credential: the token travels in a header, and
/// homeserver error bodies are reduced to their `errcode` and `error`.
#[derive(Debug)]
enum HttpError {
    /// No answer: refused, timed out, DNS.
    Unreachable(String),
    /// An answer with a non-success status.
    Status {
        status: u16,
        errcode: String,
        message: String,
        body: Value,
    },
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Unreachable(why) => write!(f, "homeserver unreachable: {why}"),
            HttpError::Status {
                status,
                errcode,
                message,
                ..
            } => write!(f, "homeserver answered {status} {errcode}: {message}"),
        }
    }
}

/// A signed-in bot in a room.
struct Session {
    token: Secret,
    room_id: String,
}

/// The Matrix [`Sink`]: set up on the first notice, then one `PUT` per notice.
pub struct MatrixSink {
    homeserver: String,
    config: MatrixConfig,
    repo_root: PathBuf,
    env_token: Option<Secret>,
    registration_token: Option<Secret>,
    agent: ureq::Agent,
    session: Option<Session>,
    state: State,
    excludes_checked: bool,
}

impl std::fmt::Debug for MatrixSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatrixSink")
            .field("homeserver", &self.homeserver)
            .field("repo_root", &self.repo_root)
            .field("signed_in", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

impl MatrixSink {
    /// Reads the tokens the configuration names from `env`; no network yet.
    pub fn new(config: &MatrixConfig, repo_root: &Path, env: &dyn Fn(&str) -> Option<String>) -> MatrixSink {
        let read = |name: &Option<String>| {
            name.as_deref()
                .and_then(env)
                .map(Secret::new)
                .filter(|s| !s.is_empty())
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .user_agent(concat!("hyperloop/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        MatrixSink {
            homeserver: config.homeserver.trim_end_matches('/').to_string(),
            config: config.clone(),
            repo_root: repo_root.to_path_buf(),
            env_token: read(&config.token_env),
            registration_token: read(&config.registration_token_env),
            agent,
            session: None,
            state: State::default(),
            excludes_checked: false,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.homeserver)
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&Secret>,
        body: Option<&Value>,
    ) -> Result<Value, HttpError> {
        let url = self.url(path);
        let auth = token.map(|t| format!("Bearer {}", t.expose()));
        let result = match (method, body) {
            ("GET", _) => {
                let mut req = self.agent.get(&url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a.as_str());
                }
                req.call()
            }
            (m, body) => {
                let mut req = match m {
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.post(&url),
                };
                if let Some(a) = &auth {
                    req = req.header("Authorization", a.as_str());
                }
                req.send_json(body.cloned().unwrap_or_else(|| json!({})))
            }
        };
        let mut resp = result.map_err(|e| HttpError::Unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| HttpError::Unreachable(format!("reading the answer: {e}")))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(value);
        }
        Err(HttpError::Status {
            status,
            errcode: value["errcode"].as_str().unwrap_or("-").to_string(),
            message: value["error"].as_str().unwrap_or("").chars().take(200).collect(),
            body: value,
        })
    }

    /// `whoami`: the user a token belongs to; `Ok(None)` when the homeserver rejects the token.
    fn whoami(&self, token: &Secret) -> Result<Option<(String, Option<String>)>, HttpError> {
        match self.call("GET", "/_matrix/client/v3/account/whoami", Some(token), None) {
            Ok(v) => Ok(v["user_id"]
                .as_str()
                .map(|u| (u.to_string(), v["device_id"].as_str().map(str::to_string)))),
            Err(HttpError::Status {
                status: 401 | 403, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn load_state(&mut self) {
        let path = state_path(&self.repo_root);
        let state = match std::fs::read_to_string(&path) {
            Ok(text) => match serde_json::from_str::<State>(&text) {
                Ok(s) => s,
                Err(e) => {
                    emit!(
                        WARN,
                        "matrix_state_unreadable",
                        path = path.display().to_string().as_str(),
                        error = e.to_string().as_str(),
                        note = "starting over"
                    );
                    State::default()
                }
            },
            Err(_) => State::default(),
        };
        self.state = if state.homeserver == self.homeserver {
            state
        } else {
            State {
                homeserver: self.homeserver.clone(),
                ..State::default()
            }
        };
    }

    /// Writes the state file: a private temporary file renamed over the old one, so a reader
    /// never sees half a file and the token is never readable by others, not even briefly.
    fn save_state(&mut self) -> Result<(), String> {
        if !self.excludes_checked {
            self.excludes_checked = true;
            let git = crate::git::Git::new(&self.repo_root);
            if let Err(e) = crate::worker::worktree::ensure_local_excludes(&git) {
                emit!(
                    WARN,
                    "matrix_state_not_excluded",
                    error = e.to_string().as_str(),
                    note = "keep .hyperloop/matrix-state.json out of commits"
                );
            }
        }
        let path = state_path(&self.repo_root);
        let dir = path
            .parent()
            .ok_or_else(|| "the state file has no folder".to_string())?;
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let text = serde_json::to_string_pretty(&self.state).map_err(|e| e.to_string())?;
        let tmp = dir.join(format!(".matrix-state.json.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt as _;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            // A leftover temporary file from a crashed process may have other permissions.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display())
        })
    }

    /// Signs in and finds the room, caching what it learns.
    fn set_up(&mut self) -> Result<Session, String> {
        self.load_state();
        let (token, registered) = self.sign_in()?;
        let room_id = self.find_room(&token, registered)?;
        if self.state.room_id.as_deref() != Some(room_id.as_str()) {
            self.state.threads.clear();
            self.state.room_id = Some(room_id.clone());
        }
        self.save_state()?;
        Ok(Session { token, room_id })
    }

    /// The access token to use, and whether the bot was registered just now.
    fn sign_in(&mut self) -> Result<(Secret, bool), String> {
        if let Some(token) = self.env_token.clone() {
            let user = match self.whoami(&token) {
                Ok(Some((user, _))) => user,
                Ok(None) => {
                    return Err(format!(
                        "the homeserver rejects the access token in ${}",
                        self.config.token_env.as_deref().unwrap_or("?")
                    ));
                }
                Err(e) => return Err(e.to_string()),
            };
            if self.state.user_id.as_deref() != Some(user.as_str()) {
                self.forget_account();
                self.state.user_id = Some(user);
            }
            return Ok((token, false));
        }
        if let Some(cached) = self.state.access_token.clone().map(Secret::new) {
            match self.whoami(&cached) {
                Ok(Some((user, device))) => {
                    emit!(DEBUG, "matrix_using_cached_credentials", user_id = user.as_str());
                    self.state.user_id = Some(user);
                    if device.is_some() {
                        self.state.device_id = device;
                    }
                    return Ok((cached, false));
                }
                Ok(None) => {
                    emit!(
                        WARN,
                        "matrix_credentials_stale",
                        user_id = self.state.user_id.as_deref().unwrap_or("-"),
                        note = if self.registration_token.is_some() {
                            "registering a new bot"
                        } else {
                            "no registration_token_env to register a new bot"
                        }
                    );
                    self.forget_account();
                }
                // An outage is not a stale token: registering again would only leave a stray
                // account behind once the homeserver is back.
                Err(e) => return Err(e.to_string()),
            }
        }
        let Some(reg) = self.registration_token.clone() else {
            return Err(
                match (&self.config.token_env, &self.config.registration_token_env) {
                    (Some(t), Some(r)) => format!("neither ${t} nor ${r} is set"),
                    (Some(t), None) => format!("${t} is not set"),
                    (None, Some(r)) => format!("${r} is not set and there are no cached credentials"),
                    (None, None) => "no token_env or registration_token_env".to_string(),
                },
            );
        };
        let (user, token, device) = self.register(&reg)?;
        emit!(INFO, "matrix_bot_registered", user_id = user.as_str());
        self.state.user_id = Some(user);
        self.state.device_id = device;
        self.state.access_token = Some(token.expose().to_string());
        Ok((token, true))
    }

    /// Drops everything tied to the previous account: its token, and the room and threads it
    /// was in (a new bot is not a member of the old room).
    fn forget_account(&mut self) {
        self.state.access_token = None;
        self.state.user_id = None;
        self.state.device_id = None;
        self.state.room_id = None;
        self.state.threads.clear();
    }

    fn default_username(&self) -> Result<String, String> {
        Ok(format!(
            "hyperloop-{}-{}",
            repo_name(&self.repo_root),
            random_hex(4)?
        ))
    }

    /// Registers the bot through the registration-token interactive-auth flow: a first POST that
    /// answers 401 with a session and the stages to complete, then one POST per stage
    /// (`m.login.registration_token`, then usually `m.login.dummy`).
    fn register(&self, reg: &Secret) -> Result<(String, Secret, Option<String>), String> {
        let username = match &self.config.bot_username {
            Some(u) => u.clone(),
            None => self.default_username()?,
        };
        // Used for this registration only: hyperloop signs in with the access token afterwards.
        let password = Secret::new(random_hex(24)?);
        let path = "/_matrix/client/v3/register?kind=user";
        let mut session: Option<String> = None;
        let mut completed: Vec<String> = Vec::new();
        let mut stage: Option<&'static str> = None;
        for _ in 0..5 {
            let mut body = json!({
                "username": username,
                "password": password.expose(),
                "initial_device_display_name": "hyperloop",
                "inhibit_login": false,
            });
            if let (Some(s), Some(stage)) = (&session, stage) {
                body["auth"] = match stage {
                    "m.login.registration_token" => {
                        json!({"type": stage, "token": reg.expose(), "session": s})
                    }
                    _ => json!({"type": stage, "session": s}),
                };
            }
            match self.call("POST", path, None, Some(&body)) {
                Ok(v) => {
                    let user = v["user_id"]
                        .as_str()
                        .ok_or("registration answered without a user id")?;
                    let token = v["access_token"]
                        .as_str()
                        .ok_or("registration answered without an access token")?;
                    return Ok((
                        user.to_string(),
                        Secret::new(token),
                        v["device_id"].as_str().map(str::to_string),
                    ));
                }
                Err(HttpError::Status {
                    status: 401, body, ..
                }) if body.get("session").is_some() => {
                    session = body["session"].as_str().map(str::to_string);
                    completed = body["completed"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                        .unwrap_or_default();
                    if let Some(err) = body["errcode"].as_str() {
                        // The homeserver refused the stage just tried, e.g. an exhausted token.
                        return Err(format!(
                            "bot registration refused: {err} {}",
                            body["error"].as_str().unwrap_or("")
                        ));
                    }
                    stage = Some(next_stage(&body, &completed)?);
                }
                Err(HttpError::Status { errcode, .. }) if errcode == "M_USER_IN_USE" => {
                    return Err(format!(
                        "bot user `{username}` already exists and its password is not kept; \
                         give its token in token_env, or choose another bot_username"
                    ));
                }
                Err(e) => return Err(format!("bot registration failed: {e}")),
            }
        }
        Err(format!(
            "bot registration did not finish (completed stages: {})",
            completed.join(", ")
        ))
    }

    /// The room to post in: the configured one (joined, which also accepts an invitation), the
    /// cached one, or a new private room shared with `invite_user`.
    fn find_room(&self, token: &Secret, registered: bool) -> Result<String, String> {
        if let Some(room) = &self.config.room_id {
            let path = format!("/_matrix/client/v3/join/{}", encode(room));
            return match self.call("POST", &path, Some(token), Some(&json!({}))) {
                Ok(v) => Ok(v["room_id"].as_str().unwrap_or(room).to_string()),
                Err(e) => Err(format!(
                    "cannot join {room}{}: {e}",
                    if registered { " as the new bot" } else { "" }
                )),
            };
        }
        if let Some(room) = &self.state.room_id {
            return Ok(room.clone());
        }
        let name = format!("hyperloop-{}", repo_name(&self.repo_root));
        emit!(INFO, "matrix_room_creating", name = name.as_str());
        let mut body = json!({
            "name": name,
            "topic": "hyperloop: task progress, one thread per task",
            "preset": "private_chat",
            "visibility": "private",
        });
        if let Some(user) = &self.config.invite_user {
            body["invite"] = json!([user]);
        }
        match self.call("POST", "/_matrix/client/v3/createRoom", Some(token), Some(&body)) {
            Ok(v) => {
                let room = v["room_id"]
                    .as_str()
                    .ok_or("createRoom answered without a room id")?
                    .to_string();
                emit!(INFO, "matrix_room_created", room_id = room.as_str());
                Ok(room)
            }
            Err(e) => Err(format!("cannot create a room: {e}")),
        }
    }

    fn send(&mut self, notice: &Notice) -> Result<(), String> {
        let Some(session) = &self.session else {
            return Err("not signed in".into());
        };
        let root = notice
            .task_id
            .as_ref()
            .and_then(|t| self.state.threads.get(t))
            .cloned();
        let mut content = json!({"msgtype": "m.text", "body": notice.text});
        if let Some(root) = &root {
            // `is_falling_back` with a reply fallback lets clients without threads show the
            // message as a reply to the task's first message.
            content["m.relates_to"] = json!({
                "rel_type": "m.thread",
                "event_id": root,
                "is_falling_back": true,
                "m.in_reply_to": {"event_id": root},
            });
        }
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
            encode(&session.room_id),
            txn_id()
        );
        let answer = self
            .call("PUT", &path, Some(&session.token), Some(&content))
            .map_err(|e| format!("sending to the room failed: {e}"))?;
        if root.is_none()
            && let Some(task) = &notice.task_id
            && let Some(event_id) = answer["event_id"].as_str()
        {
            self.state.threads.insert(task.clone(), event_id.to_string());
            if let Err(e) = self.save_state() {
                // The message went out; only the thread's continuation in a later step is lost.
                emit!(WARN, "matrix_state_not_saved", error = e.as_str());
            }
        }
        Ok(())
    }
}

impl Sink for MatrixSink {
    fn deliver(&mut self, notice: &Notice) -> Result<(), String> {
        if self.session.is_none() {
            let session = self.set_up()?;
            self.session = Some(session);
        }
        self.send(notice)
    }
}

/// The stage to complete next: from the first flow that needs only stages hyperloop can do and
/// includes the registration token.
fn next_stage(body: &Value, completed: &[String]) -> Result<&'static str, String> {
    const KNOWN: [&str; 2] = ["m.login.registration_token", "m.login.dummy"];
    let flows = body["flows"].as_array().cloned().unwrap_or_default();
    for flow in &flows {
        let stages: Vec<&str> = flow["stages"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !stages.contains(&KNOWN[0]) || !stages.iter().all(|s| KNOWN.contains(s)) {
            continue;
        }
        if let Some(next) = stages.iter().find(|s| !completed.iter().any(|c| c == *s)) {
            return KNOWN
                .iter()
                .copied()
                .find(|k| k == next)
                .ok_or_else(|| format!("unexpected stage {next}"));
        }
    }
    Err(format!(
        "the homeserver offers no registration flow with a registration token (flows: {})",
        serde_json::to_string(&flows).unwrap_or_default()
    ))
}

/// The repository folder's name as a Matrix user-name part: lower case, `[a-z0-9._=-]`.
fn repo_name(root: &Path) -> String {
    let raw = root
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._=-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches('-').to_string();
    if clean.is_empty() {
        "repo".to_string()
    } else {
        clean
    }
}

fn random_hex(bytes: usize) -> Result<String, String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .map_err(|e| format!("no randomness available: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A transaction id unique across processes and within one: the homeserver treats a repeated id
/// as a retry of the same message.
fn txn_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "hl-{nanos}-{}-{n}-{}",
        std::process::id(),
        random_hex(4).unwrap_or_default()
    )
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_follow_the_offered_flow() {
        let body = json!({"session": "s", "flows": [
            {"stages": ["m.login.email.identity"]},
            {"stages": ["m.login.registration_token", "m.login.dummy"]}
        ]});
        assert_eq!(next_stage(&body, &[]), Ok("m.login.registration_token"));
        assert_eq!(
            next_stage(&body, &["m.login.registration_token".to_string()]),
            Ok("m.login.dummy")
        );
        let no_token = json!({"flows": [{"stages": ["m.login.recaptcha", "m.login.dummy"]}]});
        assert!(next_stage(&no_token, &[]).is_err());
    }

    #[test]
    fn user_names_are_valid_localparts() {
        assert_eq!(repo_name(Path::new("/src/My Project!")), "my-project");
        assert_eq!(repo_name(Path::new("/")), "repo");
        assert_eq!(random_hex(4).map(|h| h.len()), Ok(8));
        assert_ne!(txn_id(), txn_id());
    }

    #[test]
    fn debug_output_hides_tokens() {
        let config = MatrixConfig {
            homeserver: "http://127.0.0.1:1".into(),
            room_id: None,
            token_env: Some("T".into()),
            registration_token_env: Some("R".into()),
            invite_user: None,
            bot_username: None,
            verbose: false,
        };
        let sink = MatrixSink::new(&config, Path::new("/tmp/x"), &|name| {
            Some(format!("canary-{name}-0123456789"))
        });
        assert!(!format!("{sink:?}").contains("canary"));
        let err = HttpError::Unreachable("connection refused".into());
        assert!(!format!("{err} {err:?}").contains("canary"));
    }
}
