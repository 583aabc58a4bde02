//! Prompt composition: every role's composed prompt (snapshots), the persona reaching the prompt,
//! placeholders always filled, and `specs/prompts/<role>-overlay.yaml` reading.

use std::path::Path;

use hyperloop::config::{Config, DEFAULT_BASE_REF};
use hyperloop::definitions::prompt::{PromptInput, compose, read_role_overlay};
use hyperloop::definitions::{self, Definitions, PERSONA_ANNOTATION, build_overlay, from_documents};

fn base() -> Definitions {
    definitions::builtin().expect("base")
}

fn implementer_input() -> PromptInput {
    PromptInput {
        task_id: "task-003".into(),
        spec_ref: "specs/auth.md".into(),
        round: 2,
        branch: Some("worker/task-003".into()),
        base_branch: "main".into(),
        task_title: Some("Add token refresh".into()),
        task_spec: Some(
            "Refresh the access token when it is within 60 seconds of expiry.\n\n\
             Acceptance: `auth::refresh` is called before every request that would use an \
             expiring token; a test covers the boundary.\n"
                .into(),
        ),
        findings: Some(
            "### Round 1 (verifier)\n1. src/auth.rs:42 compares with `>` where the spec says \
             \"within\"; use `>=`.\n2. No test covers the 60 second boundary.\n"
                .into(),
        ),
        role_overlay: Some("- Run `cargo clippy -- -D warnings` before committing.\n".into()),
        extra_sections: Vec::new(),
    }
}

fn verifier_input() -> PromptInput {
    PromptInput {
        findings: None,
        round: 0,
        role_overlay: None,
        ..implementer_input()
    }
}

fn pm_input() -> PromptInput {
    PromptInput {
        task_id: "intake".into(),
        spec_ref: "specs".into(),
        base_branch: "main".into(),
        extra_sections: vec![(
            "Specs to process".into(),
            "- specs/auth.md\n- specs/billing.md\n".into(),
        )],
        ..PromptInput::default()
    }
}

fn improver_input() -> PromptInput {
    PromptInput {
        task_id: "process-improvement".into(),
        spec_ref: "specs/prompts".into(),
        base_branch: "main".into(),
        extra_sections: vec![(
            "Failure findings".into(),
            "### task-003 (round 1)\n1. Missing test for the boundary.\n\n\
             ### task-005 (round 2)\n1. No test for the empty input.\n"
                .into(),
        )],
        ..PromptInput::default()
    }
}

fn resolver_input() -> PromptInput {
    PromptInput {
        round: 1,
        findings: None,
        role_overlay: None,
        extra_sections: vec![
            ("Conflicting files".into(), "- src/auth.rs\n- Cargo.toml\n".into()),
            (
                "Base branch changes".into(),
                "a1b2c3d feat: switch the HTTP client to reqwest\n\
                 d4e5f6a chore: bump serde\n"
                    .into(),
            ),
        ],
        ..implementer_input()
    }
}

fn composed(role: &str, input: &PromptInput) -> String {
    let defs = base();
    let agent = defs.agent(role).expect("agent");
    compose(agent, input)
}

#[test]
fn implementer_prompt() {
    insta::assert_snapshot!(composed("implementer", &implementer_input()));
}

#[test]
fn verifier_prompt() {
    insta::assert_snapshot!(composed("verifier", &verifier_input()));
}

#[test]
fn pm_prompt() {
    insta::assert_snapshot!(composed("pm", &pm_input()));
}

#[test]
fn process_improver_prompt() {
    insta::assert_snapshot!(composed("process-improver", &improver_input()));
}

#[test]
fn rebase_resolver_prompt() {
    insta::assert_snapshot!(composed("rebase-resolver", &resolver_input()));
}

#[test]
fn persona_patch_reaches_the_prompt() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/overlays");
    let docs = build_overlay(&fixtures.join("persona"), DEFAULT_BASE_REF).expect("docs");
    let defs = from_documents(&docs).expect("valid");
    let prompt = compose(defs.agent("implementer").expect("agent"), &implementer_input());
    insta::assert_snapshot!(prompt);
    let persona_at = prompt.find("## Persona").expect("persona heading");
    assert!(prompt[persona_at..].contains("You work on a Go API service."));
    // Other annotations become sections of their own, after the persona.
    let other_at = prompt
        .find("## team.example/reviewers")
        .expect("annotation heading");
    assert!(other_at > persona_at);
    // The agent without a persona gets no persona section.
    let verifier = compose(defs.agent("verifier").expect("agent"), &verifier_input());
    assert!(!verifier.contains("## Persona"));
}

#[test]
fn in_repo_persona_reaches_the_prompt_through_load() {
    let repo = tempfile::tempdir().expect("tempdir");
    let dir = repo.path().join(".hyperloop/agents");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("kustomization.yaml"),
        "resources:\n  - github.com/jsell-rh/hyperloop//base?ref=v1.0.0\npatches:\n  - path: implementer-patch.yaml\n    target:\n      kind: Agent\n      name: implementer\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("implementer-patch.yaml"),
        "kind: Agent\nname: implementer\nannotations:\n  ambient.io/persona: |\n    You maintain a Haskell compiler; run `cabal test`.\n",
    )
    .expect("write");
    let config = Config {
        overlay: Some(".hyperloop/agents/".into()),
        ..Config::default()
    };
    let defs = definitions::load(&config, repo.path()).expect("load");
    let agent = defs.agent("implementer").expect("agent");
    assert!(agent.annotations.contains_key(PERSONA_ANNOTATION));
    let prompt = compose(agent, &implementer_input());
    assert!(
        prompt.contains("## Persona\n\nYou maintain a Haskell compiler; run `cabal test`."),
        "{prompt}"
    );
}

#[test]
fn placeholders_are_never_left_literal() {
    let inputs = [
        ("implementer", implementer_input()),
        ("verifier", verifier_input()),
        ("pm", pm_input()),
        ("process-improver", improver_input()),
        ("rebase-resolver", resolver_input()),
    ];
    for (role, input) in inputs {
        let prompt = composed(role, &input);
        assert!(!prompt.contains("{task_id}"), "{role}");
        assert!(!prompt.contains("{spec_ref}"), "{role}");
        assert!(
            prompt.contains(&format!("Spec-Ref: {}", input.spec_ref)),
            "{role}"
        );
        assert!(prompt.contains(".worker-result.json"), "{role}");
    }
}

#[test]
fn sections_appear_in_order_and_only_when_given() {
    let prompt = composed("implementer", &implementer_input());
    let order = [
        "## Task",
        "## Spec",
        "## Findings from earlier rounds",
        "## Process overlay",
    ];
    let positions: Vec<usize> = order
        .iter()
        .map(|h| prompt.find(h).unwrap_or_else(|| panic!("missing {h}")))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{prompt}");
    let bare = composed("verifier", &verifier_input());
    assert!(!bare.contains("## Findings"));
    assert!(!bare.contains("## Process overlay"));
    // The task's own spec, not a spec file, is what the worker sees.
    assert!(bare.contains("within 60 seconds of expiry"));
}

fn write_overlay(repo: &Path, role: &str, text: &str) {
    let dir = repo.join("specs/prompts");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join(format!("{role}-overlay.yaml")), text).expect("write");
}

#[test]
fn role_overlay_prompt_key_is_read() {
    let repo = tempfile::tempdir().expect("tempdir");
    write_overlay(
        repo.path(),
        "implementer",
        "prompt: |\n  - Always run the linter.\n",
    );
    let text = read_role_overlay(repo.path(), "specs", "implementer").expect("read");
    assert_eq!(text.as_deref(), Some("- Always run the linter.\n"));
    assert_eq!(
        read_role_overlay(repo.path(), "specs", "verifier").expect("read"),
        None
    );
}

#[test]
fn role_overlay_without_prompt_key_is_used_whole() {
    let repo = tempfile::tempdir().expect("tempdir");
    write_overlay(repo.path(), "verifier", "rules:\n  - check the trailers\n");
    let text = read_role_overlay(repo.path(), "specs", "verifier").expect("read");
    assert_eq!(text.as_deref(), Some("rules:\n  - check the trailers\n"));
}

#[test]
fn role_overlay_honours_specs_dir() {
    let repo = tempfile::tempdir().expect("tempdir");
    let dir = repo.path().join("docs/specs/prompts");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("pm-overlay.yaml"), "prompt: keep tasks tiny\n").expect("write");
    let text = read_role_overlay(repo.path(), "docs/specs", "pm").expect("read");
    assert_eq!(text.as_deref(), Some("keep tasks tiny"));
}

#[test]
fn malformed_role_overlay_is_rejected_naming_the_file() {
    let repo = tempfile::tempdir().expect("tempdir");
    write_overlay(repo.path(), "implementer", "prompt: [unclosed\n");
    let err = read_role_overlay(repo.path(), "specs", "implementer").expect_err("malformed");
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string().contains("specs/prompts/implementer-overlay.yaml"),
        "{err}"
    );
}
