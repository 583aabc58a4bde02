//! `.hyperloop.yaml` loading through the public API: defaults, every key, the fixtures under
//! `tests/fixtures/config/`, error messages and exit statuses, `base_ref` precedence, overlay
//! resolution and rendering.

use std::path::{Path, PathBuf};

use hyperloop::config::{
    Config, DEFAULT_AGENT_COMMAND, DEFAULT_BASE_REF, LogFormat, LogLevel, MatrixConfig, MergeStrategy,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config")
}

/// Loads `text` from a real file in a temp dir, with no `HYPERLOOP_BASE_REF`.
fn load_text(text: &str) -> hyperloop::Result<Config> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(".hyperloop.yaml");
    std::fs::write(&file, text).expect("write");
    Config::load_with_env(&file, dir.path(), None)
}

fn load_fixture(rel: &str) -> hyperloop::Result<Config> {
    let file = fixtures().join(rel);
    Config::load_with_env(&file, &fixtures(), None)
}

fn invalid_message(text: &str) -> String {
    let err = load_text(text).expect_err("should be rejected");
    assert_eq!(err.exit_code(), 2, "{err}");
    err.to_string()
}

#[test]
fn defaults_match_the_reference() {
    let c = Config::default();
    assert_eq!(c.overlay, None);
    assert_eq!(c.base_ref, "github.com/jsell-rh/hyperloop//base?ref=main");
    assert_eq!(c.target.repo, None);
    assert_eq!(c.target.base_branch, "main");
    assert_eq!(c.target.specs_dir, "specs");
    assert_eq!(c.target.state_branch, None);
    assert_eq!(c.state_branch(), "main");
    assert_eq!(c.runtime.default, "local");
    assert_eq!(c.runtime.max_workers, 6);
    assert_eq!(
        c.runtime.agent_command,
        [
            "claude",
            "--dangerously-skip-permissions",
            "-p",
            "--output-format",
            "stream-json",
            "--verbose"
        ]
    );
    assert_eq!(c.runtime.agent_command.join(" "), DEFAULT_AGENT_COMMAND);
    assert_eq!(c.runtime.worker_timeout, 3600);
    assert_eq!(c.runtime.stall_timeout, 900);
    // A lease outlives the worker it covers by a margin.
    assert_eq!(c.runtime.lease_timeout, None);
    assert_eq!(c.runtime.lease_timeout(), 3600 + 600);
    assert!(c.runtime.agent_env.is_empty());
    assert!(c.merge.auto_merge);
    assert_eq!(c.merge.strategy, MergeStrategy::Squash);
    assert!(c.merge.delete_branch);
    assert_eq!(c.merge.checks, hyperloop::config::ChecksPolicy::Required);
    assert_eq!(c.merge.checks_timeout, 3600);
    assert_eq!(c.merge.local_checks, None);
    assert_eq!(c.poll_interval, 30);
    assert_eq!(c.max_task_rounds, 50);
    assert_eq!(c.max_cycles, 200);
    assert_eq!(c.max_rebase_attempts, 3);
    assert_eq!(c.observability.log_format, LogFormat::Console);
    assert_eq!(c.observability.log_level, LogLevel::Info);
    assert_eq!(c.observability.matrix, None);
}

#[test]
fn missing_file_means_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Config::load_with_env(&dir.path().join("nope.yaml"), dir.path(), None).expect("load");
    assert_eq!(c, Config::default());
}

#[test]
fn empty_and_comment_only_files_mean_defaults() {
    for text in ["", "\n\n", "# nothing yet\n", "---\n# still nothing\n", "{}\n"] {
        assert_eq!(load_text(text).expect(text), Config::default(), "{text:?}");
    }
}

#[test]
fn every_key_can_be_set() {
    let c = load_fixture("valid/every-key.yaml").expect("load");
    assert_eq!(
        c.overlay.as_deref(),
        Some("git@github.com:acme/agent-gitops//overlays/api")
    );
    assert_eq!(c.base_ref, "github.com/acme/hyperloop//base?ref=v1.0.0");
    assert_eq!(c.target.repo.as_deref(), Some("acme/widgets"));
    assert_eq!(c.target.base_branch, "trunk");
    assert_eq!(c.target.specs_dir, "docs/specs");
    assert_eq!(c.target.state_branch.as_deref(), Some("hyperloop-state"));
    assert_eq!(c.state_branch(), "hyperloop-state");
    assert_eq!(c.runtime.default, "local");
    assert_eq!(c.runtime.max_workers, 2);
    assert_eq!(c.runtime.agent_command, ["my-agent", "--model", "big one", "-p"]);
    assert_eq!(c.runtime.worker_timeout, 600);
    assert_eq!(c.runtime.stall_timeout, 120);
    assert_eq!(c.runtime.lease_timeout, Some(900));
    assert_eq!(c.runtime.lease_timeout(), 900);
    assert_eq!(c.runtime.agent_env, ["NPM_TOKEN", "DATABASE_URL"]);
    assert!(!c.merge.auto_merge);
    assert_eq!(c.merge.strategy, MergeStrategy::Merge);
    assert!(!c.merge.delete_branch);
    assert_eq!(c.merge.checks, hyperloop::config::ChecksPolicy::All);
    assert_eq!(c.merge.checks_timeout, 900);
    assert_eq!(c.merge.local_checks.as_deref(), Some("cargo test --quiet"));
    assert_eq!(c.poll_interval, 0);
    assert_eq!(c.max_task_rounds, 5);
    assert_eq!(c.max_cycles, 12);
    assert_eq!(c.max_rebase_attempts, 0);
    assert_eq!(c.observability.log_format, LogFormat::Json);
    assert_eq!(c.observability.log_level, LogLevel::Debug);
    assert_eq!(
        c.observability.matrix,
        Some(MatrixConfig {
            homeserver: "https://matrix.example.com".into(),
            room_id: Some("!abc123:example.com".into()),
            token_env: Some("MATRIX_ACCESS_TOKEN".into()),
            registration_token_env: Some("MATRIX_REGISTRATION_TOKEN".into()),
            invite_user: Some("@lead:example.com".into()),
            bot_username: Some("widgets-bot".into()),
            verbose: true,
        })
    );
}

#[test]
fn unset_keys_keep_their_defaults() {
    let c = load_fixture("valid/readme-example.yaml").expect("load");
    let mut expected = Config::default();
    expected.runtime.max_workers = 4;
    assert_eq!(c, expected);

    assert_eq!(
        load_fixture("valid/empty-sections.yaml").expect("load"),
        Config::default()
    );
}

#[test]
fn agent_command_as_list() {
    let c = load_text("runtime:\n  agent_command: [\"/opt/my agent\", --flag]\n").expect("load");
    assert_eq!(c.runtime.agent_command, ["/opt/my agent", "--flag"]);
}

#[test]
fn matrix_defaults_inside_the_section() {
    let c = load_text(
        "observability:\n  matrix:\n    homeserver: https://m.example.com\n    registration_token_env: REG\n",
    )
    .expect("load");
    let m = c.observability.matrix.expect("matrix");
    assert_eq!(m.homeserver, "https://m.example.com");
    assert_eq!(m.registration_token_env.as_deref(), Some("REG"));
    assert_eq!(m.room_id, None);
    assert_eq!(m.token_env, None);
    assert_eq!(m.invite_user, None);
    assert_eq!(m.bot_username, None);
    assert!(!m.verbose);
}

#[test]
fn choices_ignore_case() {
    // 0.9.2 upper-cased log levels, so `INFO` files exist in the wild.
    let c =
        load_text("observability:\n  log_level: WARNING\n  log_format: JSON\nmerge:\n  strategy: Merge\n")
            .expect("load");
    assert_eq!(c.observability.log_level, LogLevel::Warning);
    assert_eq!(c.observability.log_format, LogFormat::Json);
    assert_eq!(c.merge.strategy, MergeStrategy::Merge);
}

/// Each file in `invalid/` starts with `# expect: <dotted key> | <part of the message>`.
#[test]
fn invalid_fixtures_name_file_and_key() {
    let dir = fixtures().join("invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 15, "only {} invalid fixtures", files.len());
    let mut problems = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect:` line", file.display()));
        let (key, fragment) = expect.split_once(" | ").expect("key | fragment");
        let err = match Config::load_with_env(&file, &dir, None) {
            Ok(_) => {
                problems.push(format!("{}: accepted", file.display()));
                continue;
            }
            Err(e) => e,
        };
        let msg = err.to_string();
        if err.exit_code() != 2
            || !msg.starts_with(&format!("{}: {key}: ", file.display()))
            || !msg.contains(fragment)
        {
            problems.push(format!(
                "expected exit 2, key `{key}` and {fragment:?}, got {}: {msg}",
                err.exit_code()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn unknown_key_lists_the_keys_when_nothing_is_close() {
    let msg = invalid_message("merge:\n  colour: blue\n");
    assert!(msg.contains("merge.colour: unknown key"), "{msg}");
    assert!(msg.contains("auto_merge, strategy, delete_branch"), "{msg}");
}

#[test]
fn numbers_have_their_bounds() {
    // Zero is fine where it means "none"; elsewhere a count must be positive.
    let c = load_text("poll_interval: 0\nmax_rebase_attempts: 0\n").expect("load");
    assert_eq!((c.poll_interval, c.max_rebase_attempts), (0, 0));
    for key in ["max_task_rounds", "max_cycles"] {
        let msg = invalid_message(&format!("{key}: 0\n"));
        assert!(msg.contains(&format!("{key}: must be at least 1")), "{msg}");
    }
    for key in ["max_workers", "worker_timeout", "stall_timeout", "lease_timeout"] {
        let msg = invalid_message(&format!("runtime:\n  {key}: 0\n"));
        assert!(
            msg.contains(&format!("runtime.{key}: must be at least 1")),
            "{msg}"
        );
        let msg = invalid_message(&format!("runtime:\n  {key}: -5\n"));
        assert!(
            msg.contains(&format!("runtime.{key}: must not be negative")),
            "{msg}"
        );
    }
}

#[test]
fn yaml_syntax_errors_give_line_and_column() {
    for (name, line) in [("syntax/bad-indent.yaml", 3), ("syntax/duplicate-key.yaml", 3)] {
        let file = fixtures().join(name);
        let err = Config::load_with_env(&file, &fixtures(), None).expect_err(name);
        let msg = err.to_string();
        assert_eq!(err.exit_code(), 2, "{msg}");
        assert!(
            msg.starts_with(&format!("{}: line {line} column ", file.display())),
            "{name}: {msg}"
        );
    }
    let file = fixtures().join("syntax/unclosed-quote.yaml");
    let msg = Config::load_with_env(&file, &fixtures(), None)
        .expect_err("unclosed")
        .to_string();
    assert!(msg.contains("line ") && msg.contains(" column "), "{msg}");
}

#[test]
fn not_utf8_is_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(".hyperloop.yaml");
    std::fs::write(&file, b"overlay: \xff\xfe\n").expect("write");
    let err = Config::load_with_env(&file, dir.path(), None).expect_err("binary");
    assert_eq!(err.exit_code(), 2, "{err}");
}

#[test]
fn base_ref_precedence_is_file_then_env_then_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.yaml");
    let with_key = dir.path().join("with.yaml");
    let without_key = dir.path().join("without.yaml");
    std::fs::write(&with_key, "base_ref: from-file\n").expect("write");
    std::fs::write(&without_key, "max_cycles: 3\n").expect("write");
    let repo = dir.path();

    let load = |f: &Path, env| Config::load_with_env(f, repo, env).expect("load").base_ref;
    assert_eq!(load(&with_key, Some("from-env")), "from-file");
    assert_eq!(load(&with_key, None), "from-file");
    assert_eq!(load(&without_key, Some("from-env")), "from-env");
    assert_eq!(load(&missing, Some("from-env")), "from-env");
    assert_eq!(load(&without_key, None), DEFAULT_BASE_REF);
    // An empty variable counts as unset.
    assert_eq!(load(&without_key, Some("")), DEFAULT_BASE_REF);
}

#[test]
fn relative_overlay_resolves_against_the_repo_not_the_cwd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    let file = repo.join(".hyperloop.yaml");
    std::fs::write(&file, "overlay: .hyperloop/agents/\n").expect("write");
    let c = Config::load_with_env(&file, &repo, None).expect("load");
    // Kept as written, for display.
    assert_eq!(c.overlay.as_deref(), Some(".hyperloop/agents/"));
    let resolved = c.overlay_dir(&repo).expect("local overlay");
    assert_eq!(resolved, repo.join(".hyperloop").join("agents"));
    assert!(resolved.starts_with(&repo));
    let cwd = std::env::current_dir().expect("cwd");
    assert!(!resolved.starts_with(&cwd), "{}", resolved.display());

    // A config file elsewhere (`--config`) does not change what the overlay is relative to.
    let other = dir.path().join("elsewhere/conf.yaml");
    std::fs::create_dir_all(other.parent().expect("parent")).expect("mkdir");
    std::fs::write(&other, "overlay: agents\n").expect("write");
    let c = Config::load_with_env(&other, &repo, None).expect("load");
    assert_eq!(c.overlay_dir(&repo), Some(repo.join("agents")));
}

#[test]
fn absolute_and_remote_overlays() {
    let c = load_text("overlay: /srv/agents\n").expect("load");
    assert_eq!(
        c.overlay_dir(Path::new("/work/repo")),
        Some(PathBuf::from("/srv/agents"))
    );
    for remote in [
        "git@github.com:acme/agent-gitops//overlays/api",
        "https://github.com/acme/agent-gitops//overlays/api?ref=v1",
        "github.com/acme/agent-gitops//overlays/api?ref=v1",
    ] {
        let c = load_text(&format!("overlay: \"{remote}\"\n")).expect("load");
        assert_eq!(c.overlay.as_deref(), Some(remote));
        assert_eq!(c.overlay_dir(Path::new("/work/repo")), None, "{remote}");
    }
}

#[test]
fn render_round_trips() {
    let configs = [
        Config::default(),
        load_fixture("valid/every-key.yaml").expect("load"),
        load_text("runtime:\n  agent_command: [\"it's\", \"a \\\"b\\\"\", \"\"]\n").expect("load"),
    ];
    for c in configs {
        for text in [c.render(), c.render_commented()] {
            let back = load_text(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(back, c, "{text}");
        }
    }
}

#[test]
fn render_shows_every_key() {
    let text = load_fixture("valid/every-key.yaml").expect("load").render();
    for key in [
        "overlay:",
        "base_ref:",
        "repo: acme/widgets",
        "base_branch: trunk",
        "specs_dir: docs/specs",
        "state_branch: hyperloop-state",
        "default: local",
        "max_workers: 2",
        "agent_command:",
        "worker_timeout: 600",
        "stall_timeout: 120",
        "lease_timeout: 900",
        "agent_env: [NPM_TOKEN, DATABASE_URL]",
        "auto_merge: false",
        "strategy: merge",
        "delete_branch: false",
        "checks: all",
        "checks_timeout: 900",
        "local_checks: cargo test --quiet",
        "poll_interval: 0",
        "max_task_rounds: 5",
        "max_cycles: 12",
        "max_rebase_attempts: 0",
        "log_format: json",
        "log_level: debug",
        "homeserver: https://matrix.example.com",
        "room_id: \"!abc123:example.com\"",
        "bot_username: widgets-bot",
        "verbose: true",
    ] {
        assert!(text.contains(key), "missing {key:?} in\n{text}");
    }
    // The compact form has no explanations; the commented one has one per key.
    assert!(!text.contains("# Workers running"), "{text}");
    assert!(
        Config::default()
            .render_commented()
            .contains("# Workers running at the same time.")
    );
}

#[test]
fn commented_render_leaves_default_base_ref_to_the_environment() {
    let text = Config::default().render_commented();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(".hyperloop.yaml");
    std::fs::write(&file, &text).expect("write");
    let c = Config::load_with_env(&file, dir.path(), Some("from-env")).expect("load");
    assert_eq!(c.base_ref, "from-env");
}

#[test]
fn odd_yaml_is_bad_input_not_a_crash() {
    for text in [
        "1: x\n",
        "runtime:\n  ? [a, b]\n  : c\n",
        "overlay: &a x\nbase_ref: *b\n",
        "--- \nmax_cycles: 1\n---\nmax_cycles: 2\n",
    ] {
        let err = load_text(text).expect_err(text);
        assert_eq!(err.exit_code(), 2, "{text:?}: {err}");
        assert!(err.to_string().contains(".hyperloop.yaml: "), "{err}");
    }
}
