//! Agent and Process definitions: the built-in base, validation errors (exit 2, naming the file
//! and the step), native overlay resolution, and golden comparisons with `kubectl kustomize`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hyperloop::config::{Config, DEFAULT_BASE_REF};
use hyperloop::definitions::{
    self, BASE_FILES, Definitions, Document, PERSONA_ANNOTATION, base_documents, build_overlay,
    from_documents, parse_documents,
};
use hyperloop::pipeline::Step;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/overlays")
}

fn role(name: &str) -> Step {
    Step::Role {
        name: name.into(),
        on_pass: None,
        on_fail: None,
    }
}

#[test]
fn builtin_base_has_five_agents_and_the_default_process() {
    let defs = definitions::builtin().expect("base is valid");
    let names: Vec<&str> = defs.agents.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "implementer",
            "pm",
            "process-improver",
            "rebase-resolver",
            "verifier"
        ]
    );
    assert_eq!(defs.process.name, "default");
    assert_eq!(defs.process.intake, vec![role("pm")]);
    assert_eq!(
        defs.process.pipeline,
        vec![
            Step::Loop {
                steps: vec![role("implementer"), role("verifier")]
            },
            Step::Action {
                action: hyperloop::pipeline::PipelineAction::MergePr
            },
        ]
    );
    for agent in defs.agents.values() {
        assert!(agent.annotations.is_empty(), "{}", agent.name);
    }
}

#[test]
fn embedded_base_matches_the_base_folder() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("base");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("base/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = BASE_FILES.iter().map(|(n, _)| n.to_string()).collect();
    embedded.sort();
    assert_eq!(on_disk, embedded);
    // The kustomization lists every file but itself.
    let docs = base_documents().expect("base");
    assert_eq!(docs.len(), BASE_FILES.len() - 1);
}

#[test]
fn no_overlay_means_the_builtin_base() {
    let repo = tempfile::tempdir().expect("tempdir");
    let defs = definitions::load(&Config::default(), repo.path()).expect("load");
    assert_eq!(defs, definitions::builtin().expect("base"));
}

#[test]
fn overlay_equal_to_base_ref_means_the_builtin_base() {
    let repo = tempfile::tempdir().expect("tempdir");
    let config = Config {
        overlay: Some("https://github.com/jsell-rh/hyperloop//base?ref=v0.9.2".into()),
        ..Config::default()
    };
    let defs = definitions::load(&config, repo.path()).expect("load");
    assert_eq!(defs, definitions::builtin().expect("base"));
}

// ---------------------------------------------------------------------------------------------
// Invalid documents: exit 2, and the message names the document and the step.

const BAD_FILE: &str = "overlay/bad.yaml";

/// The base agents plus `yaml` (which replaces the base process when it defines one).
fn load_with(yaml: &str) -> hyperloop::Result<Definitions> {
    let extra = parse_documents(Path::new(BAD_FILE), yaml)?;
    let replaces_process = extra.iter().any(|d| d.kind() == Some("Process"));
    let mut docs: Vec<Document> = base_documents()?
        .into_iter()
        .filter(|d| !(replaces_process && d.kind() == Some("Process")))
        .collect();
    docs.extend(extra);
    from_documents(&docs)
}

fn process(pipeline: &str) -> String {
    format!("apiVersion: hyperloop.io/v1\nkind: Process\nmetadata:\n  name: default\npipeline:\n{pipeline}")
}

#[track_caller]
fn assert_invalid(yaml: &str, expected: &[&str]) {
    let err = load_with(yaml).expect_err("definitions must be rejected");
    let msg = err.to_string();
    assert_eq!(err.exit_code(), 2, "{msg}");
    assert!(msg.contains(BAD_FILE), "message does not name the file: {msg}");
    for part in expected {
        assert!(msg.contains(part), "message lacks {part:?}: {msg}");
    }
}

#[test]
fn empty_pipeline_is_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v1\nkind: Process\nmetadata:\n  name: default\npipeline: []\n",
        &["process default: pipeline", "at least one step"],
    );
}

#[test]
fn missing_pipeline_is_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v1\nkind: Process\nmetadata:\n  name: default\n",
        &["process default: pipeline", "missing"],
    );
}

#[test]
fn empty_loop_is_rejected() {
    assert_invalid(
        &process("  - role: implementer\n  - loop: []\n"),
        &["process default: pipeline[1].loop", "at least one step"],
    );
}

#[test]
fn unknown_primitive_is_rejected() {
    assert_invalid(
        &process("  - loop:\n      - role: implementer\n      - review: verifier\n"),
        &[
            "process default: pipeline[0].loop[1]",
            "unknown step primitive `review`",
        ],
    );
}

#[test]
fn two_primitives_in_one_step_are_rejected() {
    assert_invalid(
        &process("  - role: implementer\n    gate: lgtm\n"),
        &["process default: pipeline[0]", "exactly one primitive"],
    );
}

#[test]
fn unknown_key_in_a_step_is_rejected() {
    assert_invalid(
        &process("  - role: implementer\n    retries: 3\n  - action: merge-pr\n"),
        &["process default: pipeline[0]", "unknown key `retries`"],
    );
}

#[test]
fn role_naming_no_agent_is_rejected() {
    assert_invalid(
        &process(
            "  - loop:\n      - loop:\n          - role: implementer\n          - role: reviewer\n  - action: merge-pr\n",
        ),
        &[
            "process default: pipeline[0].loop[0].loop[1]",
            "role reviewer names no agent",
        ],
    );
}

#[test]
fn bare_role_naming_no_agent_is_rejected() {
    assert_invalid(
        &process("  - loop: [implementer, reviewer]\n"),
        &["process default: pipeline[0].loop[1]", "reviewer"],
    );
}

#[test]
fn unknown_action_is_rejected() {
    assert_invalid(
        &process("  - role: implementer\n  - action: deploy\n"),
        &["process default: pipeline[1]", "unknown action deploy"],
    );
}

#[test]
fn on_fail_across_nesting_levels_is_rejected() {
    assert_invalid(
        &process(
            "  - role: pm\n  - loop:\n      - role: implementer\n      - role: verifier\n        on_fail: pm\n",
        ),
        &[
            "process default: pipeline[1].loop[1].on_fail",
            "pm is not a role step",
        ],
    );
}

#[test]
fn on_pass_naming_a_gate_is_rejected() {
    assert_invalid(
        &process("  - role: implementer\n    on_pass: lgtm\n  - gate: lgtm\n"),
        &["process default: pipeline[0].on_pass", "lgtm"],
    );
}

#[test]
fn gate_without_a_name_is_rejected() {
    assert_invalid(
        &process("  - role: implementer\n  - gate: ''\n"),
        &["process default: pipeline[1]", "non-empty name"],
    );
}

#[test]
fn intake_role_naming_no_agent_is_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v1\nkind: Process\nmetadata:\n  name: default\nintake:\n  - role: planner\npipeline:\n  - role: implementer\n",
        &["process default: intake[0]", "planner"],
    );
}

#[test]
fn unknown_process_key_is_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v1\nkind: Process\nmetadata:\n  name: default\npipelines: []\npipeline:\n  - role: implementer\n",
        &["process default: pipelines", "unknown key"],
    );
}

#[test]
fn missing_kind_is_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v1\nmetadata:\n  name: helper\nprompt: hi\n",
        &["document 1", "missing `kind`"],
    );
}

#[test]
fn unknown_kind_is_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v1\nkind: Agnet\nmetadata:\n  name: helper\nprompt: hi\n",
        &["agnet helper", "unknown kind Agnet"],
    );
}

#[test]
fn missing_name_is_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v1\nkind: Agent\nprompt: hi\n",
        &["agent document 1", "missing `metadata.name`"],
    );
}

#[test]
fn wrong_api_version_is_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v2\nkind: Agent\nmetadata:\n  name: helper\nprompt: hi\n",
        &[
            "agent helper: apiVersion",
            "expected hyperloop.io/v1, found hyperloop.io/v2",
        ],
    );
}

#[test]
fn duplicate_documents_are_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v1\nkind: Agent\nmetadata:\n  name: helper\nprompt: a\n---\napiVersion: hyperloop.io/v1\nkind: Agent\nmetadata:\n  name: helper\nprompt: b\n",
        &["agent helper", "duplicate document"],
    );
}

#[test]
fn agent_without_prompt_is_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v1\nkind: Agent\nmetadata:\n  name: helper\nannotations: {}\n",
        &["agent helper", "missing `prompt`"],
    );
}

#[test]
fn agent_with_structured_annotation_is_rejected() {
    assert_invalid(
        "apiVersion: hyperloop.io/v1\nkind: Agent\nmetadata:\n  name: helper\nprompt: hi\nannotations:\n  ambient.io/persona: [a, b]\n",
        &["agent helper: annotations.ambient.io/persona", "expected text"],
    );
}

#[test]
fn on_pass_and_on_fail_within_a_level_are_accepted() {
    let defs = load_with(&process(
        "  - loop:\n      - role: implementer\n      - role: verifier\n        on_fail: implementer\n        on_pass: implementer\n  - action: merge-pr\n",
    ))
    .expect("valid");
    let Step::Loop { steps } = &defs.process.pipeline[0] else {
        panic!("expected a loop")
    };
    assert_eq!(
        steps[1],
        Step::Role {
            name: "verifier".into(),
            on_pass: Some("implementer".into()),
            on_fail: Some("implementer".into()),
        }
    );
    // No intake given: the pm runs intake.
    assert_eq!(defs.process.intake, vec![role("pm")]);
}

// ---------------------------------------------------------------------------------------------
// Overlays in the repository.

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn repo_with_overlay(files: &[(&str, &str)]) -> tempfile::TempDir {
    let repo = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        write(&repo.path().join(".hyperloop/agents").join(name), text);
    }
    repo
}

fn overlay_config() -> Config {
    Config {
        overlay: Some(".hyperloop/agents/".into()),
        ..Config::default()
    }
}

#[test]
fn in_repo_overlay_patches_persona_and_process() {
    let repo = repo_with_overlay(&[
        (
            "kustomization.yaml",
            "resources:\n  - github.com/jsell-rh/hyperloop//base?ref=main\npatches:\n  - path: implementer-patch.yaml\n  - path: process-patch.yaml\n",
        ),
        (
            "implementer-patch.yaml",
            "kind: Agent\nmetadata:\n  name: implementer\nannotations:\n  ambient.io/persona: You work on a Rust CLI.\n",
        ),
        (
            "process-patch.yaml",
            "kind: Process\nname: default\npipeline:\n  - loop:\n      - role: implementer\n      - role: verifier\n  - gate: lgtm\n  - action: merge-pr\n",
        ),
    ]);
    let defs = definitions::load(&overlay_config(), repo.path()).expect("load");
    let implementer = defs.agent("implementer").expect("implementer");
    assert_eq!(
        implementer
            .annotations
            .get(PERSONA_ANNOTATION)
            .map(String::as_str),
        Some("You work on a Rust CLI.")
    );
    // The patch changed only what it named.
    let base = definitions::builtin().expect("base");
    assert_eq!(implementer.prompt, base.agents["implementer"].prompt);
    assert_eq!(defs.agents["verifier"], base.agents["verifier"]);
    assert_eq!(defs.process.pipeline[1], Step::Gate { name: "lgtm".into() });
    assert_eq!(defs.process.intake, vec![role("pm")]);
    assert!(defs.render().contains("You work on a Rust CLI."));
}

#[test]
fn overlay_with_a_bad_process_names_the_patch_file_and_step() {
    let repo = repo_with_overlay(&[
        (
            "kustomization.yaml",
            "resources:\n  - github.com/jsell-rh/hyperloop//base?ref=main\npatches:\n  - path: process-patch.yaml\n",
        ),
        (
            "process-patch.yaml",
            "kind: Process\nname: default\npipeline:\n  - loop:\n      - role: implementer\n      - role: security-reviewer\n",
        ),
    ]);
    let err = definitions::load(&overlay_config(), repo.path()).expect_err("invalid");
    let msg = err.to_string();
    assert_eq!(err.exit_code(), 2);
    assert!(msg.contains("process-patch.yaml"), "{msg}");
    assert!(msg.contains("process default: pipeline[0].loop[1]"), "{msg}");
}

#[test]
fn patch_matching_nothing_is_rejected() {
    let repo = repo_with_overlay(&[
        (
            "kustomization.yaml",
            "resources:\n  - github.com/jsell-rh/hyperloop//base?ref=main\npatches:\n  - path: p.yaml\n",
        ),
        (
            "p.yaml",
            "kind: Agent\nname: implementor\nannotations:\n  ambient.io/persona: x\n",
        ),
    ]);
    let err = definitions::load(&overlay_config(), repo.path()).expect_err("invalid");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("p.yaml"), "{err}");
    assert!(err.to_string().contains("matches no document"), "{err}");
}

#[test]
fn unsupported_kustomization_key_is_rejected() {
    let repo = repo_with_overlay(&[(
        "kustomization.yaml",
        "resources:\n  - github.com/jsell-rh/hyperloop//base?ref=main\nnamePrefix: x-\n",
    )]);
    let err = definitions::load(&overlay_config(), repo.path()).expect_err("invalid");
    assert_eq!(err.exit_code(), 2);
    let msg = err.to_string();
    assert!(msg.contains("kustomization.yaml"), "{msg}");
    assert!(msg.contains("namePrefix"), "{msg}");
}

#[test]
fn missing_overlay_folder_is_rejected() {
    let repo = tempfile::tempdir().expect("tempdir");
    let err = definitions::load(&overlay_config(), repo.path()).expect_err("invalid");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains(".hyperloop/agents"), "{err}");
}

#[test]
fn overlay_without_the_base_defines_everything_itself() {
    let repo = repo_with_overlay(&[
        ("kustomization.yaml", "resources:\n  - defs.yaml\n"),
        (
            "defs.yaml",
            "apiVersion: hyperloop.io/v1\nkind: Agent\nmetadata:\n  name: solo\nprompt: Do {task_id}.\n---\napiVersion: hyperloop.io/v1\nkind: Process\nmetadata:\n  name: only\nintake: []\npipeline:\n  - role: solo\n",
        ),
    ]);
    let defs = definitions::load(&overlay_config(), repo.path()).expect("load");
    assert_eq!(defs.agents.len(), 1);
    assert_eq!(defs.process.name, "only");
    assert!(defs.process.intake.is_empty());
}

#[test]
fn custom_base_ref_resolves_to_the_builtin_base() {
    let repo = repo_with_overlay(&[(
        "kustomization.yaml",
        "resources:\n  - github.com/acme/hyperloop-fork//base?ref=v2\n",
    )]);
    let config = Config {
        base_ref: "github.com/acme/hyperloop-fork//base?ref=v2".into(),
        ..overlay_config()
    };
    let defs = definitions::load(&config, repo.path()).expect("load");
    assert_eq!(defs, definitions::builtin().expect("base"));
}

#[test]
fn legacy_092_overlay_resolves_without_kustomize() {
    let config = Config {
        overlay: Some(fixtures().join("legacy-092").display().to_string()),
        ..Config::default()
    };
    let repo = tempfile::tempdir().expect("tempdir");
    let defs = definitions::load(&config, repo.path()).expect("load");
    let persona = &defs.agents["implementer"].annotations[PERSONA_ANNOTATION];
    assert!(persona.contains("Clean Architecture"), "{persona}");
    assert_eq!(
        defs.process.pipeline,
        vec![
            Step::Loop {
                steps: vec![role("implementer"), role("verifier")]
            },
            Step::Gate {
                name: "human-pr-approval".into()
            },
            Step::Action {
                action: hyperloop::pipeline::PipelineAction::MergePr
            },
        ]
    );
    // The patch's top-level `name` selects the document; it does not become a field of it.
    let docs = definitions::resolve_documents(&config, repo.path()).expect("docs");
    let implementer = docs
        .iter()
        .find(|d| d.name() == Some("implementer"))
        .expect("implementer");
    assert!(implementer.value.get("name").is_none());
}

#[test]
fn render_shows_process_and_annotations() {
    let docs = build_overlay(&fixtures().join("process"), DEFAULT_BASE_REF).expect("docs");
    let text = from_documents(&docs).expect("valid").render();
    for part in [
        "human-pr-approval",
        "security-reviewer",
        "on_fail: implementer",
        "merge-pr",
        "intake",
    ] {
        assert!(text.contains(part), "render lacks {part}:\n{text}");
    }
}

#[test]
fn render_of_a_persona_overlay() {
    let docs = build_overlay(&fixtures().join("persona"), DEFAULT_BASE_REF).expect("docs");
    insta::assert_snapshot!(from_documents(&docs).expect("valid").render());
}

// ---------------------------------------------------------------------------------------------
// Golden comparisons: the native engine and `kubectl kustomize` agree on the same fixture.

type Keyed = BTreeMap<(String, String), Value>;

fn keyed(docs: Vec<Document>) -> Keyed {
    docs.into_iter()
        .map(|d| {
            let key = (
                d.kind().expect("kind").to_string(),
                d.name().expect("name").to_string(),
            );
            (key, d.value)
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// Runs `kubectl kustomize` on a copy of the fixture whose base reference points at a copy of
/// `base/` (kubectl cannot know the built-in alias). None when kubectl is not installed.
fn kubectl_oracle(fixture: &str) -> Option<Keyed> {
    let kubectl = std::env::split_paths(&std::env::var_os("PATH")?)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())?;
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("base");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("base"), &base);
    let overlay = tmp.path().join("overlay");
    copy_dir(&fixtures().join(fixture), &overlay);
    let kfile = overlay.join("kustomization.yaml");
    let text = std::fs::read_to_string(&kfile).expect("kustomization");
    let mut k: Value = hyperloop::yaml::parse(&kfile, &text).expect("parse");
    if let Some(Value::Array(resources)) = k.get_mut("resources") {
        for r in resources.iter_mut() {
            if let Value::String(s) = r
                && definitions::is_base_alias(s, DEFAULT_BASE_REF)
            {
                *s = "../base".into();
            }
        }
    }
    std::fs::write(&kfile, serde_json::to_string_pretty(&k).expect("json")).expect("write");
    let out = Command::new(kubectl)
        .args(["kustomize"])
        .arg(&overlay)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {fixture} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let docs = parse_documents(Path::new("kubectl-output"), &stdout).expect("parse output");
    Some(keyed(docs))
}

fn golden(fixture: &str) {
    let native = build_overlay(&fixtures().join(fixture), DEFAULT_BASE_REF).expect("native");
    from_documents(&native).expect("the fixture resolves to valid definitions");
    let native = keyed(native);
    let Some(oracle) = kubectl_oracle(fixture) else {
        crate::harness::skip(
            &format!("kubectl is not installed (golden test {fixture})"),
            "kubectl, from your system's packages",
        );
        return;
    };
    assert_eq!(
        native.keys().collect::<Vec<_>>(),
        oracle.keys().collect::<Vec<_>>(),
        "{fixture}: different documents"
    );
    for (key, value) in &native {
        assert_eq!(value, &oracle[key], "{fixture}: {key:?} differs");
    }
}

#[test]
fn golden_persona_patch() {
    golden("persona");
}

#[test]
fn golden_process_patch_with_nested_loops_and_gate() {
    golden("process");
}

#[test]
fn golden_inline_and_legacy_patches() {
    golden("inline");
}

#[test]
fn golden_extra_agent_resources() {
    golden("extra-agent");
}
