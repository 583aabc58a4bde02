//! `hyperloop init` through the library: what a fresh repository gets, that nothing is ever
//! overwritten, and that what it writes is valid and loads.

use std::path::Path;

use hyperloop::config::Config;
use hyperloop::init::init;

use crate::harness::TestEnv;

const WRITTEN: [&str; 6] = [
    ".hyperloop.yaml",
    "specs/example.md",
    ".hyperloop/agents/kustomization.yaml",
    ".hyperloop/agents/implementer-patch.yaml",
    ".github/workflows/hyperloop.yml",
    ".gitignore",
];

fn expected(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn yaml(text: &str) -> serde_json::Value {
    hyperloop::yaml::parse(Path::new("test.yaml"), text).expect("valid YAML")
}

#[test]
fn fresh_repo_gets_everything() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    let report = init(&repo.path).expect("init");
    assert_eq!(report.written, expected(&WRITTEN));
    assert!(report.skipped.is_empty(), "{report}");
    assert!(report.appended.is_empty(), "{report}");
    for rel in WRITTEN {
        assert!(repo.path.join(rel).is_file(), "{rel} missing");
    }
    let shown = report.to_string();
    for rel in WRITTEN {
        assert!(shown.contains(&format!("wrote {rel}\n")), "{shown}");
    }

    let spec = repo.read("specs/example.md");
    assert!(spec.contains("## Acceptance criteria"), "{spec}");
    assert!(spec.contains("- [ ]"), "{spec}");
}

#[test]
fn written_config_loads_to_the_defaults_with_the_overlay() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    init(&repo.path).expect("init");
    let file = repo.path.join(".hyperloop.yaml");
    let loaded = Config::load_with_env(&file, &repo.path, None).expect("loads");
    let want = Config {
        overlay: Some(".hyperloop/agents".into()),
        ..Config::default()
    };
    assert_eq!(loaded, want);
    assert_eq!(
        loaded.overlay_dir(&repo.path),
        Some(repo.path.join(".hyperloop/agents"))
    );
    assert!(repo.path.join(".hyperloop/agents/kustomization.yaml").is_file());

    // Every key is in the file, with an explanation.
    let text = repo.read(".hyperloop.yaml");
    for key in [
        "overlay:",
        "base_ref:",
        "target:",
        "repo:",
        "base_branch:",
        "specs_dir:",
        "state_branch:",
        "runtime:",
        "default:",
        "max_workers:",
        "agent_command:",
        "worker_timeout:",
        "stall_timeout:",
        "agent_env:",
        "merge:",
        "auto_merge:",
        "strategy:",
        "delete_branch:",
        "poll_interval:",
        "max_task_rounds:",
        "max_cycles:",
        "max_rebase_attempts:",
        "observability:",
        "log_format:",
        "log_level:",
        "matrix:",
        "homeserver:",
        "room_id:",
        "token_env:",
        "registration_token_env:",
        "invite_user:",
        "bot_username:",
        "verbose:",
    ] {
        assert!(text.contains(key), "{key} missing from\n{text}");
    }
    // The written file does not pin base_ref, so HYPERLOOP_BASE_REF keeps working.
    let with_env = Config::load_with_env(&file, &repo.path, Some("pinned-elsewhere")).expect("loads");
    assert_eq!(with_env.base_ref, "pinned-elsewhere");
}

#[test]
fn second_run_keeps_everything_and_writes_nothing() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    init(&repo.path).expect("first");
    let before: Vec<String> = WRITTEN.iter().map(|p| repo.read(p)).collect();
    let report = init(&repo.path).expect("second");
    assert!(report.written.is_empty(), "{report}");
    assert!(report.appended.is_empty(), "{report}");
    assert_eq!(
        report.skipped,
        expected(&[
            ".hyperloop.yaml",
            "specs/",
            ".hyperloop/agents/kustomization.yaml",
            ".hyperloop/agents/implementer-patch.yaml",
            ".github/workflows/hyperloop.yml",
            ".gitignore",
        ])
    );
    let after: Vec<String> = WRITTEN.iter().map(|p| repo.read(p)).collect();
    assert_eq!(before, after);
    assert!(report.to_string().contains("kept existing .hyperloop.yaml\n"));
}

#[test]
fn existing_files_are_untouched() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    let mine = "# mine\nmax_cycles: 7\ntarget:\n  specs_dir: docs/specs\n";
    repo.write(".hyperloop.yaml", mine);
    repo.write(".github/workflows/hyperloop.yml", "name: mine\n");
    let report = init(&repo.path).expect("init");
    assert_eq!(repo.read(".hyperloop.yaml"), mine);
    assert_eq!(repo.read(".github/workflows/hyperloop.yml"), "name: mine\n");
    let skipped = &report.skipped;
    assert!(skipped.contains(&".hyperloop.yaml".to_string()), "{report}");
    assert!(
        skipped.contains(&".github/workflows/hyperloop.yml".to_string()),
        "{report}"
    );
    // The example spec goes where the existing configuration keeps specs.
    assert!(repo.path.join("docs/specs/example.md").is_file(), "{report}");
    assert!(!repo.path.join("specs").exists(), "{report}");
}

#[test]
fn no_example_spec_when_specs_exist() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    repo.write("specs/area/widget.md", "# Widget\n");
    let report = init(&repo.path).expect("init");
    assert!(!repo.path.join("specs/example.md").exists());
    assert_eq!(report.skipped, ["specs/"], "{report}");
    assert!(report.to_string().contains("kept existing specs/\n"), "{report}");
}

#[test]
fn task_files_are_not_specs() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    repo.write("specs/tasks/task-001.md", "---\nid: task-001\n---\n");
    repo.write("specs/reviews/task-001.md", "review\n");
    init(&repo.path).expect("init");
    assert!(repo.path.join("specs/example.md").is_file());
}

#[test]
fn invalid_existing_config_is_reported_not_replaced() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    repo.write(".hyperloop.yaml", "max_rounds: 3\n");
    let err = init(&repo.path).expect_err("invalid config");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("max_rounds"), "{err}");
    assert_eq!(repo.read(".hyperloop.yaml"), "max_rounds: 3\n");
}

#[test]
fn overlay_files_are_valid() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    init(&repo.path).expect("init");
    let k = yaml(&repo.read(".hyperloop/agents/kustomization.yaml"));
    assert_eq!(k["kind"], "Kustomization");
    assert_eq!(
        k["resources"],
        serde_json::json!(["github.com/jsell-rh/hyperloop//base?ref=main"])
    );
    assert_eq!(k["patches"][0]["path"], "implementer-patch.yaml");
    assert_eq!(k["patches"][0]["target"]["kind"], "Agent");
    assert_eq!(k["patches"][0]["target"]["name"], "implementer");

    let p = yaml(&repo.read(".hyperloop/agents/implementer-patch.yaml"));
    assert_eq!(p["apiVersion"], "hyperloop.io/v1");
    assert_eq!(p["kind"], "Agent");
    assert_eq!(p["metadata"]["name"], "implementer");
    assert!(
        p["annotations"]["ambient.io/persona"]
            .as_str()
            .is_some_and(|s| !s.trim().is_empty())
    );
}

#[test]
fn workflow_runs_one_step_at_a_time() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    init(&repo.path).expect("init");
    let w = yaml(&repo.read(".github/workflows/hyperloop.yml"));
    assert_eq!(w["on"]["schedule"][0]["cron"], "*/15 * * * *");
    assert_eq!(w["on"]["pull_request"]["types"], serde_json::json!(["labeled"]));
    assert_eq!(
        w["on"]["issues"]["types"],
        serde_json::json!(["labeled", "edited"])
    );
    // Among issue edits, only the dashboard's start a step.
    let cond = w["jobs"]["step"]["if"].as_str().expect("if");
    assert!(
        cond.contains("github.event.action == 'edited'")
            && cond.contains("contains(github.event.issue.labels.*.name, 'hyperloop:dashboard')"),
        "{cond}"
    );
    assert!(w["on"].get("workflow_dispatch").is_some());
    assert_eq!(w["concurrency"]["group"], "hyperloop");
    assert_eq!(w["concurrency"]["cancel-in-progress"], false);
    assert_eq!(
        w["permissions"],
        serde_json::json!({"contents": "write", "pull-requests": "write", "issues": "write"})
    );
    let steps = w["jobs"]["step"]["steps"].as_array().expect("steps");
    let action = steps
        .iter()
        .find(|s| s["uses"] == "hyperloop-dev/hyperloop@v1")
        .expect("hyperloop action");
    assert_eq!(action["with"]["command"], "step");
    assert_eq!(
        action["with"]["anthropic-api-key"],
        "${{ secrets.ANTHROPIC_API_KEY }}"
    );
    assert!(action["with"]["github-token"].is_string());
}

#[test]
fn gitignore_keeps_state_out_but_the_overlay_in() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    repo.write(".gitignore", "target/\n/.hyperloop/*");
    let report = init(&repo.path).expect("init");
    assert_eq!(
        repo.read(".gitignore"),
        "target/\n/.hyperloop/*\n# hyperloop: local state stays out of git; the agents overlay is committed\n!/.hyperloop/agents/\n"
    );
    assert_eq!(report.appended, [".gitignore"], "{report}");
    assert!(!report.written.contains(&".gitignore".to_string()), "{report}");
    assert!(
        report
            .to_string()
            .contains("appended ignore rules to .gitignore\n"),
        "{report}"
    );

    // git agrees: state is ignored, the overlay is not.
    repo.write(".hyperloop/matrix-state.json", "{}");
    let ignored = |rel: &str| {
        env.command("git")
            .current_dir(&repo.path)
            .args(["check-ignore", "-q", rel])
            .status()
            .expect("git")
            .success()
    };
    assert!(ignored(".hyperloop/matrix-state.json"));
    assert!(!ignored(".hyperloop/agents/kustomization.yaml"));
    assert!(!ignored(".hyperloop.yaml"));
}

#[test]
fn gitignore_that_hides_the_overlay_is_warned_about() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    repo.write(".gitignore", ".hyperloop/\n");
    let report = init(&repo.path).expect("init");
    assert!(repo.read(".gitignore").starts_with(".hyperloop/\n"));
    assert_eq!(report.warnings.len(), 1, "{report}");
    assert!(
        report
            .to_string()
            .contains("warning: .gitignore line `.hyperloop/`")
    );
}

#[test]
fn missing_directory_is_a_usage_error() {
    let env = TestEnv::new();
    let err = init(&env.root().join("nope")).expect_err("no dir");
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn init_command_prints_the_report() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    let out = env.hyperloop(&["init", "--path", repo.path_str()]);
    assert_eq!(out.status.code(), Some(0), "{}", crate::harness::describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wrote .hyperloop.yaml\n"), "{stdout}");
    let again = env.hyperloop(&["init", "--path", repo.path_str()]);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        crate::harness::describe(&again)
    );
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(stdout.contains("kept existing .hyperloop.yaml\n"), "{stdout}");
    assert!(!stdout.contains("wrote "), "{stdout}");
}

#[test]
fn written_overlay_resolves_to_the_persona() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    init(&repo.path).expect("init");
    let config = Config::load_with_env(&repo.path.join(".hyperloop.yaml"), &repo.path, None).expect("load");
    let defs = hyperloop::definitions::load(&config, &repo.path).expect("overlay resolves");
    let implementer = defs.agent("implementer").expect("implementer");
    let persona = implementer
        .annotations
        .get(hyperloop::definitions::PERSONA_ANNOTATION)
        .expect("persona annotation");
    assert!(persona.contains("Describe it here"), "{persona}");
}

/// `hyperloop init --fan-out`, the command as a user types it: the fan-out workflow instead of the
/// single-job one, its `max-parallel` taken from the configuration's `runtime.max_workers`; and in
/// a repository that already has the single-job workflow, a warning to delete it.
#[test]
fn init_fan_out_writes_the_fan_out_workflow_instead() {
    let env = TestEnv::new();
    let repo = env.repo("r");
    repo.write(".hyperloop.yaml", "runtime:\n  max_workers: 5\n");
    let out = env
        .command(crate::harness::hyperloop_bin())
        .args(["--path", repo.path_str(), "init", "--fan-out"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", crate::harness::describe(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("wrote .github/workflows/hyperloop-fanout.yml\n"),
        "{shown}"
    );
    assert!(!repo.path.join(".github/workflows/hyperloop.yml").exists());
    assert!(!shown.contains("warning:"), "{shown}");
    let w = yaml(&repo.read(".github/workflows/hyperloop-fanout.yml"));
    assert_eq!(w["jobs"]["work"]["strategy"]["max-parallel"], 5);

    let other = env.repo("single-first");
    init(&other.path).expect("init");
    let out = env
        .command(crate::harness::hyperloop_bin())
        .args(["--path", other.path_str(), "init", "--fan-out"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(0), "{}", crate::harness::describe(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("wrote .github/workflows/hyperloop-fanout.yml\n"),
        "{shown}"
    );
    assert!(
        shown.contains("warning: .github/workflows/hyperloop.yml runs the single-job step"),
        "{shown}"
    );
    let w = yaml(&other.read(".github/workflows/hyperloop-fanout.yml"));
    assert_eq!(
        w["jobs"]["work"]["strategy"]["max-parallel"], 6,
        "the default max_workers"
    );
}
