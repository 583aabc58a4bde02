//! Overlay resolution without an external program: the part of kustomize that agent overlays use
//! (`resources`, `patches` with `path`/`patch`/`target`, legacy `patchesStrategicMerge`), with
//! kustomize's strategic-merge semantics for kinds it has no schema for: maps merge recursively,
//! lists and scalars replace, `null` deletes. A resource naming the hyperloop base resolves to the
//! compiled-in copy, so 0.9.2 overlays need no network. Anything remote other than the base is
//! handed to `kustomize build` or `kubectl kustomize` when one is installed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{API_VERSION, BASE_FILES, BASE_PREFIX, Document, doc_name, is_remote, parse_documents};
use crate::error::{Error, Result};

/// The file names kustomize accepts for a kustomization, in its order of preference.
const KUSTOMIZATION_NAMES: &[&str] = &["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// How long an external kustomize may take (0.9.2 allowed the same).
const EXTERNAL_TIMEOUT: Duration = Duration::from_secs(120);

/// The original project's base, which 0.9.2 overlays list as a remote resource.
const ORIGINAL_BASE: &str = "github.com/jsell-rh/hyperloop//base";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    /// Accepted so that kustomize-style files load; any kustomize version reads the same keys.
    #[serde(default)]
    #[allow(dead_code)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    /// Older kustomize spelling of folder resources.
    #[serde(default)]
    bases: Vec<String>,
    #[serde(default)]
    patches: Vec<PatchEntry>,
    #[serde(default)]
    patches_strategic_merge: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchEntry {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    patch: Option<String>,
    #[serde(default)]
    target: Option<Target>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
    /// Accepted for kustomize compatibility; must agree with [`API_VERSION`] when given.
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    version: Option<String>,
}

/// Strips what does not change which repository and folder a reference names: the scheme, a
/// `git::` prefix, an ssh user, `.git`, and the `?ref=` pin.
fn normalize_ref(s: &str) -> String {
    let mut s = s.trim();
    s = s.strip_prefix("git::").unwrap_or(s);
    for scheme in ["https://", "http://", "ssh://", "git://"] {
        s = s.strip_prefix(scheme).unwrap_or(s);
    }
    let s = s.strip_prefix("git@").unwrap_or(s);
    let s = s.split('?').next().unwrap_or(s);
    let s = s.replacen("github.com:", "github.com/", 1);
    let s = s.replacen(".git//", "//", 1);
    s.trim_end_matches('/').to_string()
}

/// True when `entry` (an overlay or a `resources` entry) stands for the built-in base: it equals
/// the configured `base_ref`, or names the original project's base at any ref.
pub fn is_base_alias(entry: &str, base_ref: &str) -> bool {
    let entry = entry.trim();
    if entry == base_ref.trim() {
        return true;
    }
    let normalized = normalize_ref(entry);
    normalized == ORIGINAL_BASE || (is_remote(base_ref) && normalized == normalize_ref(base_ref))
}

fn base_path(file: &str) -> PathBuf {
    PathBuf::from(format!("{BASE_PREFIX}/{file}"))
}

/// The compiled-in base, read through its own kustomization so the listing cannot drift from
/// the files.
pub(super) fn builtin_base() -> Result<Vec<Document>> {
    let (kfile, ktext) = BASE_FILES[0];
    let kpath = base_path(kfile);
    let k: Kustomization = crate::yaml::parse(&kpath, ktext)?;
    let mut docs = Vec::new();
    for res in &k.resources {
        let Some((_, text)) = BASE_FILES.iter().find(|(name, _)| name == res) else {
            return Err(Error::invalid(
                &kpath,
                "resources",
                format!("{res} is not a built-in file"),
            ));
        };
        docs.extend(parse_documents(&base_path(res), text)?);
    }
    check_identities(&docs)?;
    Ok(docs)
}

/// Why native resolution gave up: a remote source only kustomize can fetch.
enum Outcome {
    Done(Vec<Document>),
    NeedsExternal(String),
}

/// Resolves the overlay folder `dir` natively, or through an external kustomize when it (or a
/// folder it includes) lists a remote resource other than the hyperloop base.
pub fn build_overlay(dir: &Path, base_ref: &str) -> Result<Vec<Document>> {
    let mut stack = Vec::new();
    match build_dir(dir, base_ref, &mut stack)? {
        Outcome::Done(docs) => Ok(docs),
        Outcome::NeedsExternal(remote) => external_build(&dir.display().to_string(), dir, &remote),
    }
}

fn find_kustomization(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Error::invalid(
            dir,
            "overlay",
            "no such folder",
        )
        .with_hint("`overlay` must name a folder holding a kustomization.yaml, or a git URL; a relative path is relative to the target repository"));
    }
    KUSTOMIZATION_NAMES
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::invalid(dir, "kustomization.yaml", "the folder has no kustomization.yaml"))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn build_dir(dir: &Path, base_ref: &str, stack: &mut Vec<PathBuf>) -> Result<Outcome> {
    let kpath = find_kustomization(dir)?;
    let canonical = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if stack.contains(&canonical) {
        return Err(Error::invalid(
            &kpath,
            "resources",
            "the kustomizations include each other in a cycle",
        ));
    }
    stack.push(canonical);
    let text = read(&kpath)?;
    let k: Kustomization = crate::yaml::parse(&kpath, &text).map_err(|e| {
        e.with_hint("hyperloop reads `resources`, `patches` and `patchesStrategicMerge` itself; other kustomize features are not supported in an agents overlay")
    })?;
    if let Some(kind) = k.kind.as_deref()
        && kind != "Kustomization"
    {
        return Err(Error::invalid(
            &kpath,
            "kind",
            format!("expected Kustomization, found {kind}"),
        ));
    }

    let mut docs = Vec::new();
    for (i, entry) in k.resources.iter().chain(k.bases.iter()).enumerate() {
        if is_base_alias(entry, base_ref) {
            docs.extend(builtin_base()?);
            continue;
        }
        if is_remote(entry) {
            return Ok(Outcome::NeedsExternal(entry.clone()));
        }
        let path = dir.join(entry);
        if path.is_dir() {
            match build_dir(&path, base_ref, stack)? {
                Outcome::Done(sub) => docs.extend(sub),
                other => return Ok(other),
            }
        } else if path.is_file() {
            docs.extend(parse_documents(&path, &read(&path)?)?);
        } else {
            return Err(Error::invalid(
                &kpath,
                format!("resources[{i}]"),
                format!("{entry}: no such file or folder"),
            ));
        }
    }
    for doc in &docs {
        identity(doc)?;
    }
    check_identities(&docs)?;

    for (i, entry) in k.patches.iter().enumerate() {
        let at = format!("patches[{i}]");
        let (file, text) = match (&entry.path, &entry.patch) {
            (Some(p), None) => {
                let path = dir.join(p);
                if !path.is_file() {
                    return Err(Error::invalid(
                        &kpath,
                        format!("{at}.path"),
                        format!("{p}: no such file"),
                    ));
                }
                let text = read(&path)?;
                (path, text)
            }
            (None, Some(inline)) => (kpath.clone(), inline.clone()),
            _ => {
                return Err(Error::invalid(
                    &kpath,
                    at,
                    "a patch needs exactly one of `path` and `patch`",
                ));
            }
        };
        let patches = parse_patch_text(&file, &text)?;
        for patch in patches {
            apply_patch(&mut docs, &patch, entry.target.as_ref(), &file, &kpath, &at)?;
        }
    }
    for (i, entry) in k.patches_strategic_merge.iter().enumerate() {
        let at = format!("patchesStrategicMerge[{i}]");
        // kustomize also accepts the patch text itself in this list.
        let (file, text) = if entry.contains('\n') {
            (kpath.clone(), entry.clone())
        } else {
            let path = dir.join(entry);
            if !path.is_file() {
                return Err(Error::invalid(&kpath, at, format!("{entry}: no such file")));
            }
            let text = read(&path)?;
            (path, text)
        };
        for patch in parse_patch_text(&file, &text)? {
            apply_patch(&mut docs, &patch, None, &file, &kpath, &at)?;
        }
    }
    stack.pop();
    Ok(Outcome::Done(docs))
}

fn parse_patch_text(file: &Path, text: &str) -> Result<Vec<Value>> {
    let values: Vec<Value> = crate::yaml::parse_multi(file, text)?;
    for v in &values {
        if !v.is_object() {
            return Err(Error::invalid(
                file,
                "patch",
                "expected a strategic-merge patch (a YAML mapping)",
            )
            .with_hint("JSON 6902 patches (lists of operations) are not supported in an agents overlay; write the changed keys as a mapping"));
        }
    }
    Ok(values)
}

/// The kind and name of a resource document, or an error naming its file.
fn identity(doc: &Document) -> Result<(String, String)> {
    let kind = doc
        .kind()
        .ok_or_else(|| Error::invalid(&doc.origin, "kind", "the document has no `kind`"))?;
    let name = doc.name().ok_or_else(|| {
        Error::invalid(
            &doc.origin,
            format!("{} document", kind.to_lowercase()),
            "the document has no `metadata.name`",
        )
    })?;
    Ok((kind.to_string(), name.to_string()))
}

/// Two documents with the same kind and name are ambiguous, as in kustomize.
pub(super) fn check_identities(docs: &[Document]) -> Result<()> {
    let mut seen: HashMap<(String, String), &Path> = HashMap::new();
    for doc in docs {
        let id = identity(doc)?;
        if let Some(first) = seen.get(&id) {
            return Err(Error::invalid(
                &doc.origin,
                format!("{} {}", id.0.to_lowercase(), id.1),
                format!(
                    "duplicate document: {} {} is also defined in {}",
                    id.0,
                    id.1,
                    first.display()
                ),
            ));
        }
        seen.insert(id, &doc.origin);
    }
    Ok(())
}

fn apply_patch(
    docs: &mut [Document],
    patch: &Value,
    target: Option<&Target>,
    file: &Path,
    kpath: &Path,
    at: &str,
) -> Result<()> {
    if let Some(v) = patch.get("apiVersion").and_then(Value::as_str)
        && v != API_VERSION
    {
        return Err(Error::invalid(
            file,
            "apiVersion",
            format!("expected {API_VERSION}, found {v}"),
        ));
    }
    let (kind, name) = match target {
        Some(t) => {
            if let Some(g) = &t.group
                && Some(g.as_str()) != API_VERSION.split('/').next()
            {
                return Err(Error::invalid(
                    kpath,
                    format!("{at}.target.group"),
                    format!("no documents in group {g}"),
                ));
            }
            if let Some(v) = &t.version
                && Some(v.as_str()) != API_VERSION.split('/').nth(1)
            {
                return Err(Error::invalid(
                    kpath,
                    format!("{at}.target.version"),
                    format!("no documents at version {v}"),
                ));
            }
            (t.kind.clone(), t.name.clone())
        }
        None => {
            let kind = patch.get("kind").and_then(Value::as_str);
            let name = doc_name(patch);
            match (kind, name) {
                (Some(k), Some(n)) => (Some(k.to_string()), Some(n.to_string())),
                _ => {
                    return Err(Error::invalid(
                        file,
                        "patch",
                        "the patch names no document: give it `kind` and `metadata.name`, or give the patch entry a `target`",
                    ));
                }
            }
        }
    };
    let body = patch_body(patch);
    let mut matched = false;
    for doc in docs.iter_mut() {
        let kind_ok = kind.as_deref().is_none_or(|k| doc.kind() == Some(k));
        let name_ok = name.as_deref().is_none_or(|n| doc.name() == Some(n));
        if kind_ok && name_ok {
            merge(&mut doc.value, &body);
            doc.patched_by.push(file.to_path_buf());
            matched = true;
        }
    }
    if !matched {
        return Err(Error::invalid(
            file,
            "patch",
            format!(
                "the patch matches no document (kind {}, name {})",
                kind.as_deref().unwrap_or("any"),
                name.as_deref().unwrap_or("any")
            ),
        ));
    }
    Ok(())
}

/// The patch without the keys that only say which document it is for: a patch selects a
/// document, it does not rename it (and a 0.9.2-style top-level `name` must not leak in).
fn patch_body(patch: &Value) -> Value {
    let mut body = patch.clone();
    if let Value::Object(map) = &mut body {
        map.shift_remove("apiVersion");
        map.shift_remove("kind");
        map.shift_remove("name");
        if let Some(Value::Object(meta)) = map.get_mut("metadata") {
            meta.shift_remove("name");
            if meta.is_empty() {
                map.shift_remove("metadata");
            }
        }
    }
    body
}

/// Strategic merge for schemaless kinds: maps merge, everything else replaces, null deletes.
pub(super) fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => merge_maps(b, p),
        (b, p) => *b = without_nulls(p),
    }
}

fn merge_maps(base: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        if value.is_null() {
            base.shift_remove(key);
            continue;
        }
        match base.get_mut(key) {
            Some(existing @ Value::Object(_)) if value.is_object() => merge(existing, value),
            Some(existing) => *existing = without_nulls(value),
            None => {
                base.insert(key.clone(), without_nulls(value));
            }
        }
    }
}

/// A null in a patch map means "delete"; where there is nothing to delete it means nothing.
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Finds `program` on PATH.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Resolves `target` (a folder or git URL) with an installed kustomize and parses its output.
/// `remote` is the source that made this necessary, for the error when no kustomize exists.
pub(super) fn external_build(target: &str, cwd: &Path, remote: &str) -> Result<Vec<Document>> {
    let (program, args): (PathBuf, Vec<&str>) = if let Some(p) = on_path("kustomize") {
        (p, vec!["build", target])
    } else if let Some(p) = on_path("kubectl") {
        (p, vec!["kustomize", target])
    } else {
        return Err(Error::invalid(
            target,
            "overlay",
            format!("{remote} is remote; resolving it needs `kustomize` or `kubectl` on PATH"),
        )
        .with_hint("install kustomize, or vendor the overlay into the repository and list the hyperloop base as `github.com/jsell-rh/hyperloop//base?ref=...`, which resolves to the built-in copy"));
    };
    let run_dir = if cwd.is_dir() {
        cwd
    } else {
        cwd.parent().unwrap_or(cwd)
    };
    let mut child = crate::git::helper_command(&program)
        .args(&args)
        .current_dir(run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(&program, e))?;
    // Read the pipes on threads so a large output cannot block the child while we wait.
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || read_pipe(stdout));
    let err_thread = std::thread::spawn(move || read_pipe(stderr));
    let started = Instant::now();
    let status = loop {
        match child.try_wait().map_err(|e| Error::io(&program, e))? {
            Some(status) => break status,
            None if started.elapsed() > EXTERNAL_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::other(format!(
                    "{} {} took longer than {}s",
                    program.display(),
                    args.join(" "),
                    EXTERNAL_TIMEOUT.as_secs()
                )));
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    if !status.success() {
        return Err(Error::other(format!(
            "{} {} failed: {}",
            program.display(),
            args.join(" "),
            stderr.trim()
        )));
    }
    let docs = parse_documents(Path::new(target), &stdout)?;
    check_identities(&docs)?;
    Ok(docs)
}

fn read_pipe<R: std::io::Read>(pipe: Option<R>) -> String {
    let mut s = String::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_string(&mut s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base_aliases() {
        let base_ref = crate::config::DEFAULT_BASE_REF;
        for alias in [
            "github.com/jsell-rh/hyperloop//base?ref=v1.0.0",
            "https://github.com/jsell-rh/hyperloop//base?ref=main",
            "https://github.com/jsell-rh/hyperloop.git//base?ref=v0.9.2",
            "github.com/jsell-rh/hyperloop.git//base",
            "git@github.com:jsell-rh/hyperloop.git//base?ref=main",
        ] {
            assert!(is_base_alias(alias, base_ref), "{alias}");
        }
        for other in [
            "github.com/someone/else//base?ref=main",
            "github.com/jsell-rh/hyperloop//overlays/x?ref=main",
            "../base",
        ] {
            assert!(!is_base_alias(other, base_ref), "{other}");
        }
        assert!(is_base_alias("../shared/base", "../shared/base"));
    }

    #[test]
    fn merge_semantics() {
        let mut base = json!({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": 1});
        merge(
            &mut base,
            &json!({"a": {"c": [3], "f": {"g": null, "h": 2}}, "d": "y", "e": null}),
        );
        assert_eq!(base, json!({"a": {"b": 1, "c": [3], "f": {"h": 2}}, "d": "y"}));
    }
}
