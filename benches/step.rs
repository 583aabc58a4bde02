//! Benchmarks of whole `hyperloop` processes on generated repositories (run with
//! `cargo bench --bench step`). Each figure is the median of several runs of the real binary,
//! with the scripted agent standing in for Claude:
//!
//! - an idle `step` (every task complete) on 1,000 and 10,000 tasks, with the task files packed
//!   (as after git's automatic gc) and loose (right after they were committed);
//! - 10 specs with 4 workers and an instant agent: `run` from specs to merged code;
//! - 8 tasks whose implementer takes 2 s, 4 workers: `run` against the ideal of two waves;
//! - a large repository (15,000 files): 6 tasks, instant agents, 3 workers, `run` — where each
//!   agent's checkout is the cost, and checkouts of different workers must not wait for each
//!   other;
//! - fan-out: 50 tasks, `plan` of 50 items, their `work` in a clone (not timed), `record` of the
//!   50 outputs — implementers, then verifiers and merges; time per item of `plan` and `record`.
//!
//! `HYPERLOOP_BENCH_BIN` and `HYPERLOOP_BENCH_AGENT` point the benchmark at other builds (an
//! older version, to compare); arguments after `--bench` that are not flags choose scenarios by
//! name (`idle`, `ten`, `slow`, `large`, `fanout`).
//!
//! Peak memory is the largest resident set of any child process (getrusage).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn hyperloop_bin() -> String {
    std::env::var("HYPERLOOP_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hyperloop").to_string())
}

fn agent_bin() -> String {
    std::env::var("HYPERLOOP_BENCH_AGENT")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_hyperloop-scripted-agent").to_string())
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", dir.join("../.gitconfig"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("git runs");
    assert!(status.success(), "git {args:?} failed in {}", dir.display());
}

fn new_repo(root: &Path, name: &str) -> PathBuf {
    std::fs::write(
        root.join(".gitconfig"),
        "[user]\n\tname = Bench\n\temail = bench@example.com\n[gc]\n\tauto = 0\n",
    )
    .expect("gitconfig");
    let repo = root.join(name);
    std::fs::create_dir_all(&repo).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "main"]);
    repo
}

fn hyperloop(repo: &Path, args: &[&str]) -> Duration {
    hyperloop_out(repo, args).1
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn peak_rss_kb() -> i64 {
    // SAFETY: getrusage writes into the struct we pass; nothing else is shared.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage.ru_maxrss
    }
}

fn task_file(id: &str, status: &str, deps: &str) -> String {
    format!(
        "---\nid: {id}\ntitle: Task {id}\nspec_ref: specs/a.md\nstatus: {status}\nphase: null\ndeps: {deps}\nround: 0\nbranch: null\npr: null\n---\nImplement {id}.\n"
    )
}

fn write_config(repo: &Path, script: &Path, workers: usize) {
    std::fs::write(
        repo.join(".hyperloop.yaml"),
        format!(
            "runtime:\n  max_workers: {workers}\n  agent_command: [\"{}\", \"--script\", \"{}\"]\npoll_interval: 0\nmax_cycles: 20\n",
            agent_bin(),
            script.display()
        ),
    )
    .expect("config");
}

fn idle(root: &Path, n: usize, packed: bool) -> Duration {
    let repo = new_repo(root, &format!("idle-{n}-{packed}"));
    let tasks = repo.join("specs/tasks");
    std::fs::create_dir_all(&tasks).expect("mkdir");
    std::fs::write(repo.join("specs/a.md"), "# A\n").expect("spec");
    for i in 1..=n {
        let id = format!("task-{i:05}");
        std::fs::write(tasks.join(format!("{id}.md")), task_file(&id, "complete", "[]")).expect("task");
    }
    // A step checks that the agent program exists before anything else.
    let script = root.join("idle.yaml");
    std::fs::write(&script, "rules: []\n").expect("script");
    write_config(&repo, &script, 4);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "tasks"]);
    if packed {
        git(&repo, &["gc", "-q"]);
    }
    hyperloop(&repo, &["step"]);
    median((0..7).map(|_| hyperloop(&repo, &["step"])).collect())
}

fn ten_specs(root: &Path, run: usize) -> Duration {
    let repo = new_repo(root, &format!("ten-specs-{run}"));
    let specs = repo.join("specs");
    std::fs::create_dir_all(&specs).expect("mkdir");
    for i in 1..=10 {
        std::fs::write(
            specs.join(format!("feature-{i:02}.md")),
            format!("# Feature {i}\n\nBuild it.\n"),
        )
        .expect("spec");
    }
    let script = root.join(format!("instant-{run}.yaml"));
    std::fs::write(
        &script,
        "rules:\n  - role: pm\n    actions:\n      - pm_tasks_from_specs: true\n      - verdict: {verdict: pass}\n  - role: implementer\n    actions:\n      - implement_task: true\n      - verdict: {verdict: pass}\n  - role: verifier\n    actions:\n      - verdict: {verdict: pass}\n",
    )
    .expect("script");
    write_config(&repo, &script, 4);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "specs"]);
    hyperloop(&repo, &["run"])
}

fn slow_agents(root: &Path, run: usize) -> Duration {
    let repo = new_repo(root, &format!("slow-{run}"));
    let tasks = repo.join("specs/tasks");
    std::fs::create_dir_all(&tasks).expect("mkdir");
    std::fs::write(repo.join("specs/a.md"), "# A\n").expect("spec");
    for i in 1..=8 {
        let id = format!("task-{i:03}");
        std::fs::write(
            tasks.join(format!("{id}.md")),
            task_file(&id, "not-started", "[]"),
        )
        .expect("task");
    }
    let script = root.join(format!("slow-{run}.yaml"));
    std::fs::write(
        &script,
        "rules:\n  - role: implementer\n    actions:\n      - sleep: 2\n      - implement_task: true\n      - verdict: {verdict: pass}\n  - role: verifier\n    actions:\n      - verdict: {verdict: pass}\n",
    )
    .expect("script");
    write_config(&repo, &script, 4);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "tasks"]);
    hyperloop(&repo, &["run"])
}

fn large_repo(root: &Path, run: usize) -> Duration {
    let repo = new_repo(root, &format!("large-{run}"));
    for d in 0..150 {
        let dir = repo.join(format!("src/module-{d:03}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..100 {
            std::fs::write(
                dir.join(format!("file-{f:03}.rs")),
                format!("// module {d} file {f}\npub fn f{f}() -> u32 {{ {d} * {f} }}\n"),
            )
            .expect("file");
        }
    }
    let tasks = repo.join("specs/tasks");
    std::fs::create_dir_all(&tasks).expect("mkdir");
    std::fs::write(repo.join("specs/a.md"), "# A\n").expect("spec");
    for i in 1..=6 {
        let id = format!("task-{i:03}");
        std::fs::write(
            tasks.join(format!("{id}.md")),
            task_file(&id, "not-started", "[]"),
        )
        .expect("task");
    }
    let script = root.join(format!("large-{run}.yaml"));
    std::fs::write(
        &script,
        "rules:\n  - role: implementer\n    actions:\n      - implement_task: true\n      - verdict: {verdict: pass}\n  - role: verifier\n    actions:\n      - verdict: {verdict: pass}\n",
    )
    .expect("script");
    write_config(&repo, &script, 3);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "a large tree"]);
    git(&repo, &["gc", "-q"]);
    hyperloop(&repo, &["run"])
}

/// `hyperloop ARGS` in `dir`: its standard output and how long it took.
fn hyperloop_out(dir: &Path, args: &[&str]) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let out = Command::new(hyperloop_bin())
        .arg("--path")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", dir.join("../.gitconfig"))
        .env("HOME", dir.join(".."))
        .stderr(Stdio::piped())
        .output()
        .expect("hyperloop runs");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "hyperloop {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.stdout, took)
}

/// Two rounds of plan → work → record over 50 tasks: the time per item of `plan` and of
/// `record`, per round.
fn fanout(root: &Path) -> Vec<(Duration, Duration)> {
    const ITEMS: usize = 50;
    let repo = new_repo(root, "fanout");
    let tasks = repo.join("specs/tasks");
    std::fs::create_dir_all(&tasks).expect("mkdir");
    std::fs::write(repo.join("specs/a.md"), "# A\n").expect("spec");
    for i in 1..=ITEMS {
        let id = format!("task-{i:03}");
        std::fs::write(
            tasks.join(format!("{id}.md")),
            task_file(&id, "not-started", "[]"),
        )
        .expect("task");
    }
    let script = root.join("fanout.yaml");
    std::fs::write(
        &script,
        "rules:\n  - role: implementer\n    actions:\n      - implement_task: true\n      - verdict: {verdict: pass}\n  - role: verifier\n    actions:\n      - verdict: {verdict: pass}\n",
    )
    .expect("script");
    write_config(&repo, &script, ITEMS);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "tasks"]);
    let clone = root.join("fanout-clone");
    let mut rounds = Vec::new();
    for round in 0..2 {
        let (stdout, plan_took) = hyperloop_out(&repo, &["plan", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&stdout).expect("plan prints JSON");
        let items: Vec<String> = v["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(items.len(), ITEMS, "round {round}: {v}");
        if clone.exists() {
            std::fs::remove_dir_all(&clone).expect("rm clone");
        }
        git(
            root,
            &[
                "clone",
                "-q",
                repo.to_str().expect("utf8"),
                clone.to_str().expect("utf8"),
            ],
        );
        let outs = root.join(format!("fanout-out-{round}"));
        let mut record: Vec<String> = vec!["record".into()];
        for id in &items {
            let dir = outs.join(id);
            let dir_s = dir.display().to_string();
            hyperloop_out(&clone, &["work", id, "--out", &dir_s]);
            record.push(dir_s);
        }
        let args: Vec<&str> = record.iter().map(String::as_str).collect();
        let (_, record_took) = hyperloop_out(&repo, &args);
        rounds.push((plan_took / ITEMS as u32, record_took / ITEMS as u32));
    }
    rounds
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` builds and runs this file too
    // (unoptimised), where timing it would only slow the test suite down.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmarks run with `cargo bench --bench step`");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("hyperloop-bench-")
        .tempdir()
        .expect("tempdir");
    let root = dir.path();
    println!(
        "hyperloop benchmarks ({} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("{:<58} {:>10}", "scenario", "median");
    let chosen: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wants = |name: &str| chosen.is_empty() || chosen.iter().any(|c| c == name);
    for (n, packed) in [(1_000, true), (1_000, false), (10_000, true), (10_000, false)] {
        if !wants("idle") {
            break;
        }
        let t = idle(root, n, packed);
        let kind = if packed { "packed" } else { "loose objects" };
        println!(
            "{:<58} {:>8.1} ms",
            format!("idle step, {n} tasks ({kind})"),
            t.as_secs_f64() * 1e3
        );
    }
    if wants("large") {
        let t = median((0..3).map(|i| large_repo(root, i)).collect());
        println!(
            "{:<58} {:>8.2} s",
            "15,000-file repository, 6 tasks, 3 workers, instant agent",
            t.as_secs_f64()
        );
    }
    if wants("ten") {
        let t = median((0..3).map(|i| ten_specs(root, i)).collect());
        println!(
            "{:<58} {:>8.2} s",
            "10 specs, 4 workers, instant agent: spec to merged",
            t.as_secs_f64()
        );
    }
    if wants("slow") {
        let t = median((0..3).map(|i| slow_agents(root, i)).collect());
        let ideal = 4.0;
        println!(
            "{:<58} {:>8.2} s  (ideal {ideal:.1} s, efficiency {:.2})",
            "8 tasks x 2 s agent, 4 workers: run",
            t.as_secs_f64(),
            ideal / t.as_secs_f64()
        );
    }
    if wants("fanout") {
        for (round, (plan, record)) in fanout(root).into_iter().enumerate() {
            let what = if round == 0 {
                "implementers"
            } else {
                "verifiers, merges"
            };
            println!(
                "{:<58} {:>8.1} ms / {:.1} ms",
                format!("fan-out of 50 items ({what}): plan / record per item"),
                plan.as_secs_f64() * 1e3,
                record.as_secs_f64() * 1e3
            );
        }
    }
    println!(
        "{:<58} {:>8} MB",
        "peak resident memory of any process",
        peak_rss_kb() / 1024
    );
}
