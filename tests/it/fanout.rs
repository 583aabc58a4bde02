//! A step as three commands (issue 13): `plan` claims work items with leases, `work` runs one
//! item's agent in any clone and writes its output, `record` verifies and applies outputs. Local
//! mode, end to end: the planning repository, fresh clones of it for the `work` processes (read
//! access only), the real binary and the scripted agent.

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{describe, hyperloop_bin};
use crate::local::{Project, events, named};

/// A project of `tasks` independent tasks, a worker for each (at least ten), leases of `lease`
/// seconds.
fn project(tasks: usize, lease: u64, rules: &str) -> Project {
    let workers = tasks.max(10);
    let p = Project::new(rules, "");
    let cfg = p.repo.read(".hyperloop.yaml");
    p.repo.write(
        ".hyperloop.yaml",
        &cfg.replace("max_workers: 2", &format!("max_workers: {workers}"))
            .replace(
                "stall_timeout: 30",
                &format!("stall_timeout: 30\n  lease_timeout: {lease}"),
            ),
    );
    p.repo.write("specs/a.md", "# A\n");
    for i in 1..=tasks {
        p.write_task(&format!("task-{i:03}"), "specs/a.md", &[]);
    }
    p.commit_all("tasks");
    p
}

fn plan(p: &Project) -> Vec<Value> {
    let out = p.hyperloop(&["plan", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)));
    v["items"].as_array().cloned().unwrap_or_default()
}

fn item_id(item: &Value) -> String {
    item["id"].as_str().expect("item id").to_string()
}

/// A fresh clone of the planning repository, as a `work` runner would check it out.
fn clone(p: &Project, name: &str) -> PathBuf {
    let dir = p.env.root().join("clones").join(name);
    std::fs::create_dir_all(dir.parent().expect("parent")).expect("mkdir");
    p.env.git(
        p.env.root(),
        &["clone", "-q", p.repo.path_str(), dir.to_str().expect("utf8")],
    );
    dir
}

fn outputs(p: &Project) -> PathBuf {
    p.env.root().join("outputs")
}

/// `work ITEM --out DIR` in `clone`, started and not waited for.
fn start_work(p: &Project, clone: &Path, item: &str) -> Child {
    let out = outputs(p).join(item);
    p.env
        .command(hyperloop_bin())
        .args(["--path", clone.to_str().expect("utf8"), "work", item, "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("work starts")
}

fn work(p: &Project, item: &str) -> Output {
    static CLONES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CLONES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let c = clone(p, &format!("{item}-{n}"));
    start_work(p, &c, item).wait_with_output().expect("work ends")
}

fn record(p: &Project, dirs: &[PathBuf]) -> (Output, Value) {
    let mut args = vec!["record".to_string(), "--json".to_string()];
    args.extend(dirs.iter().map(|d| d.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = p.hyperloop(&args);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)));
    (out, v)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// How many commits on main merged `task` (the squash commit's subject names it).
fn merges_of(p: &Project, task: &str) -> usize {
    p.git(&["log", "--format=%s", "main"])
        .lines()
        .filter(|s| s.ends_with(&format!("({task})")))
        .count()
}

/// Plan, work (every item at once, each in a fresh clone) and record until nothing is left.
/// Returns how many items ran.
fn fan_out_until_done(p: &Project) -> usize {
    let mut ran = 0;
    for _ in 0..10 {
        let items = plan(p);
        if items.is_empty() {
            return ran;
        }
        let clones: Vec<(String, PathBuf)> = items
            .iter()
            .map(|i| (item_id(i), clone(p, &item_id(i))))
            .collect();
        let children: Vec<(String, Child)> = clones
            .iter()
            .map(|(id, c)| (id.clone(), start_work(p, c, id)))
            .collect();
        let mut dirs = Vec::new();
        for (id, child) in children {
            let out = child.wait_with_output().expect("work ends");
            assert_eq!(out.status.code(), Some(0), "work {id}: {}", describe(&out));
            dirs.push(outputs(p).join(&id));
        }
        let (_, report) = record(p, &dirs);
        let recorded = strings(&report["recorded"]);
        assert_eq!(recorded.len(), dirs.len(), "every output is recorded: {report}");
        assert!(report["refused"].is_null(), "{report}");
        ran += dirs.len();
    }
    panic!("not done after 10 rounds of plan, work and record");
}

#[test]
fn fifty_work_processes_at_once_finish_like_run() {
    const TASKS: usize = 50;
    let fanned = project(TASKS, 600, "");
    let started = Instant::now();
    let ran = fan_out_until_done(&fanned);
    let took = started.elapsed();
    // Implementer and verifier for each task, each exactly once.
    assert_eq!(ran, 2 * TASKS, "items run");

    let single = project(TASKS, 600, "");
    let out = single.hyperloop(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    for p in [&fanned, &single] {
        let tasks = p.status();
        assert_eq!(tasks.len(), TASKS);
        for t in &tasks {
            let id = t["id"].as_str().expect("id");
            assert_eq!(t["status"], "complete", "{t}");
            assert_eq!(merges_of(p, id), 1, "{id} merged exactly once");
            assert!(
                p.repo.path.join(format!("impl/{id}.md")).exists(),
                "{id}'s work is on main"
            );
        }
        assert_eq!(
            p.git(&["branch", "--list", "worker/*"]),
            "",
            "task branches are gone"
        );
        assert_eq!(p.git(&["status", "--porcelain"]), "", "the checkout is clean");
    }
    // No lease is left behind.
    for i in 1..=TASKS {
        let text = fanned.repo.read(&format!("specs/tasks/task-{i:03}.md"));
        assert!(!text.contains("\nclaim:"), "a lease is left: {text}");
    }
    // The figure, where a person running the test sees it (the harness captures print macros).
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("fan-out of {TASKS} tasks ({ran} items, {TASKS} work processes at once): {took:?}\n")
            .as_bytes(),
    );
}

#[test]
fn a_killed_work_is_reissued_after_its_lease_and_completes() {
    // Long enough for a loaded machine to clone and start the agent inside it.
    const LEASE: u64 = 10;
    let p = project(
        1,
        LEASE,
        "  - role: implementer\n    attempt: 0\n    actions:\n      - sleep: 60\n",
    );
    let planned = Instant::now();
    let items = plan(&p);
    let claimed = Instant::now();
    assert_eq!(items.len(), 1, "{items:?}");
    let first = item_id(&items[0]);
    let c = clone(&p, "killed");
    let mut child = start_work(&p, &c, &first);
    // Wait until the agent runs (its log says so), then kill `work` outright.
    let log_dir = c.join(".hyperloop/logs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_dir(&log_dir).is_ok_and(|mut d| d.next().is_some()) {
        assert!(Instant::now() < deadline, "the agent never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().expect("kill -9");
    let _ = child.wait();

    // While the lease holds, nobody else gets the task.
    let before = Instant::now();
    let still_leased = plan(&p).is_empty();
    if before.duration_since(planned) < Duration::from_secs(LEASE - 3) {
        assert!(still_leased, "the item is still leased");
    }
    let expired = claimed + Duration::from_secs(LEASE + 1);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    let out = p.hyperloop(&["plan", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        named(&events(&out), "lease_expired").len(),
        1,
        "{}",
        describe(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let items = v["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{v}");
    let second = item_id(&items[0]);
    assert_ne!(second, first, "a re-issued item has a new id");
    assert_eq!(items[0]["role"], "implementer");

    // The dead item is refused by `work`; the new one runs.
    let stale = work(&p, &first);
    assert_eq!(stale.status.code(), Some(2), "{}", describe(&stale));
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("not a claimed work item"),
        "{}",
        describe(&stale)
    );
    let out = work(&p, &second);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    record(&p, &[outputs(&p).join(&second)]);
    fan_out_until_done(&p);
    assert_eq!(p.task("task-001")["status"], "complete");
    assert_eq!(merges_of(&p, "task-001"), 1);
}

/// Copies an output folder, so that a test can tamper with the copy.
fn copy_output(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read output") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

fn edit_item(dir: &Path, key: &str, value: &str) {
    let path = dir.join("item.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).expect("item.json")).expect("json");
    v[key] = Value::String(value.to_string());
    std::fs::write(&path, serde_json::to_vec(&v).expect("json")).expect("write");
}

#[test]
fn forged_and_replayed_outputs_are_refused_and_reported() {
    let p = project(2, 600, "");
    let items = plan(&p);
    assert_eq!(items.len(), 2, "{items:?}");
    let a = items
        .iter()
        .find(|i| i["task_id"] == "task-001")
        .map(item_id)
        .expect("task-001");
    let b = items
        .iter()
        .find(|i| i["task_id"] == "task-002")
        .map(item_id)
        .expect("task-002");
    for id in [&a, &b] {
        let out = work(&p, id);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    }
    // The lease is in the task file, committed: item, nonce, role, round and base commit.
    let lease = p.repo.read("specs/tasks/task-001.md");
    for field in [
        format!("\"item\":\"{a}\""),
        "\"role\":\"implementer\"".to_string(),
        "\"round\":0".to_string(),
        "\"nonce\":".to_string(),
        "\"expires_at\":".to_string(),
    ] {
        assert!(lease.contains(&field), "{field} missing in {lease}");
    }
    assert!(lease.contains("\"base\":\""), "{lease}");
    let out_a = outputs(&p).join(&a);
    let out_b = outputs(&p).join(&b);
    assert!(
        out_a.join("commits.bundle").is_file(),
        "the implementer's commits come as a bundle"
    );
    let forged = p.env.root().join("forged");

    // An item nobody claimed.
    let wrong_item = forged.join("wrong-item");
    copy_output(&out_a, &wrong_item);
    edit_item(&wrong_item, "id", "task-009-implementer-r0-deadbeef");

    // Another base than the lease's.
    let wrong_base = forged.join("wrong-base");
    copy_output(&out_a, &wrong_base);
    let readme_commit = p.git(&["rev-list", "--max-parents=0", "main"]);
    edit_item(&wrong_base, "base", &readme_commit);

    // Commits that do not build on the commit the agent was given.
    let scratch = clone(&p, "scratch");
    p.env
        .git(&scratch, &["checkout", "-q", "--orphan", "worker/task-001"]);
    p.env.git(&scratch, &["commit", "-q", "-m", "unrelated history"]);
    let unrelated = forged.join("unrelated");
    copy_output(&out_a, &unrelated);
    p.env.git(
        &scratch,
        &[
            "bundle",
            "create",
            "-q",
            unrelated.join("commits.bundle").to_str().expect("utf8"),
            "refs/heads/worker/task-001",
        ],
    );

    // Commits for another branch than the task's.
    let other_branch = forged.join("other-branch");
    copy_output(&out_a, &other_branch);
    let theirs = clone(&p, "theirs");
    p.env.git(
        &theirs,
        &["fetch", "-q", "origin", "worker/task-002:worker/task-002"],
    );
    p.env.git(
        &theirs,
        &[
            "bundle",
            "create",
            "-q",
            other_branch.join("commits.bundle").to_str().expect("utf8"),
            "refs/heads/worker/task-002",
            "refs/heads/main",
            "^HEAD~3",
        ],
    );

    let before = p.git(&["rev-parse", "worker/task-001"]);
    let (out, report) = record(
        &p,
        &[
            wrong_item.clone(),
            wrong_base.clone(),
            unrelated.clone(),
            other_branch.clone(),
            out_a.clone(),
            out_a.clone(),
            out_b,
        ],
    );
    assert_eq!(strings(&report["recorded"]), vec![a.clone(), b], "{report}");
    let refused = report["refused"].as_array().cloned().unwrap_or_default();
    let reasons: Vec<(String, String)> = refused
        .iter()
        .map(|r| {
            (
                r["dir"].as_str().unwrap_or("").to_string(),
                r["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(refused.len(), 5, "{reasons:#?}");
    let reason_of = |dir: &Path| -> String {
        reasons
            .iter()
            .find(|(d, _)| d == &dir.display().to_string())
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{} not refused: {reasons:#?}", dir.display()))
    };
    assert!(reason_of(&wrong_item).contains("no lease holds"), "{reasons:#?}");
    assert!(
        reason_of(&wrong_base).contains("does not match its lease"),
        "{reasons:#?}"
    );
    assert!(
        reason_of(&unrelated).contains("does not build on"),
        "{reasons:#?}"
    );
    assert!(
        reason_of(&other_branch).contains("must hold exactly"),
        "{reasons:#?}"
    );
    // The same output a second time: its lease is gone with the first.
    assert_eq!(
        reasons
            .iter()
            .filter(|(d, _)| d == &out_a.display().to_string())
            .count(),
        1,
        "{reasons:#?}"
    );
    assert_eq!(named(&events(&out), "output_refused").len(), 5);
    assert_ne!(
        p.git(&["rev-parse", "worker/task-001"]),
        before,
        "the real output was taken"
    );

    // Replayed later, in another `record`: refused, nothing applied twice.
    let (out, report) = record(&p, std::slice::from_ref(&out_a));
    assert!(report["recorded"].is_null(), "{report}");
    assert_eq!(named(&events(&out), "output_refused").len(), 1);
    for id in ["task-001", "task-002"] {
        let t = p.task(id);
        assert_eq!(t["phase"], "verifier", "{t}");
    }
    let history = p.repo.read("specs/tasks/task-001.md");
    assert_eq!(
        history.matches("\"role\":\"implementer\"").count(),
        1,
        "{history}"
    );

    // `work` refuses an item that is no longer claimed.
    let again = work(&p, &a);
    assert_eq!(again.status.code(), Some(2), "{}", describe(&again));

    // The rest goes through as usual.
    fan_out_until_done(&p);
    for id in ["task-001", "task-002"] {
        assert_eq!(p.task(id)["status"], "complete");
        assert_eq!(merges_of(&p, id), 1);
    }
}

#[test]
fn github_mode_plan_and_record_with_work_in_clones_without_a_token() {
    use crate::fake_github::FakeGitHub;
    const TASKS: usize = 3;
    let p = project(TASKS, 600, "");
    p.git(&["push", "-q", "origin", "main"]);
    let gh = FakeGitHub::start(&p.repo.origin, "acme", "widgets");
    // `plan` and `record` hold the token; `work` runs in clones of origin without one.
    let with_token = |args: &[&str]| -> Output {
        let mut cmd = p.env.command(hyperloop_bin());
        cmd.args(["--path", p.repo.path_str(), "--repo", "acme/widgets"]);
        cmd.args(args);
        cmd.env("GITHUB_API_URL", &gh.url);
        cmd.env("GITHUB_TOKEN", &gh.token);
        cmd.output().expect("hyperloop runs")
    };
    let mut ran = 0;
    for round in 0..6 {
        let out = with_token(&["plan", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let items: Vec<String> = v["items"]
            .as_array()
            .map(|a| a.iter().map(item_id).collect())
            .unwrap_or_default();
        if items.is_empty() {
            break;
        }
        // The leases reached origin before any work started.
        let on_origin = p
            .env
            .git(&p.repo.origin, &["log", "--format=%s", "-n", "20", "main"]);
        for id in &items {
            assert!(
                on_origin.contains(id.as_str()),
                "{id} not claimed on origin: {on_origin}"
            );
        }
        let children: Vec<(String, Child)> = items
            .iter()
            .map(|id| {
                let dir = p.env.root().join("gh-clones").join(format!("{id}-{round}"));
                std::fs::create_dir_all(dir.parent().expect("parent")).expect("mkdir");
                p.env.git(
                    p.env.root(),
                    &[
                        "clone",
                        "-q",
                        p.repo.origin.to_str().expect("utf8"),
                        dir.to_str().expect("utf8"),
                    ],
                );
                (id.clone(), start_work(&p, &dir, id))
            })
            .collect();
        let mut args = vec!["record".to_string(), "--json".to_string()];
        for (id, child) in children {
            let out = child.wait_with_output().expect("work ends");
            assert_eq!(out.status.code(), Some(0), "work {id}: {}", describe(&out));
            args.push(outputs(&p).join(&id).display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = with_token(&args);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let report: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(strings(&report["recorded"]).len(), items.len(), "{report}");
        ran += items.len();
    }
    assert_eq!(ran, 2 * TASKS, "implementer and verifier of each task, once each");
    let files = p
        .env
        .git(&p.repo.origin, &["ls-tree", "-r", "--name-only", "main"]);
    for i in 1..=TASKS {
        let id = format!("task-{i:03}");
        let t = p
            .env
            .git(&p.repo.origin, &["show", &format!("main:specs/tasks/{id}.md")]);
        assert!(t.contains("\nstatus: complete\n"), "{t}");
        assert!(!t.contains("\nclaim:"), "a lease is left: {t}");
        let number: u64 = t
            .lines()
            .find_map(|l| l.strip_prefix("pr: "))
            .and_then(|u| u.rsplit('/').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no PR in {t}"));
        assert_eq!(gh.pr_json(number)["merged"], Value::Bool(true), "{id}");
        assert!(files.contains(&format!("impl/{id}.md")), "{files}");
    }
}

/// The GitHub requests `plan` and `record` make for one round of five items, in a repository of
/// `tasks` tasks: (plan, record) for the implementers' round, then for the verifiers'.
fn github_requests_per_round(tasks: usize) -> Vec<(usize, usize)> {
    use crate::fake_github::FakeGitHub;
    let p = Project::new("", "");
    p.set_max_workers(5);
    p.repo.write("specs/a.md", "# A\n");
    for i in 1..=tasks {
        p.write_task(&format!("task-{i:04}"), "specs/a.md", &[]);
    }
    p.commit_all("tasks");
    p.git(&["push", "-q", "origin", "main"]);
    let gh = FakeGitHub::start(&p.repo.origin, "acme", "widgets");
    let with_token = |args: &[String]| -> Output {
        let mut cmd = p.env.command(hyperloop_bin());
        cmd.args(["--path", p.repo.path_str(), "--repo", "acme/widgets"]);
        cmd.args(args);
        cmd.env("GITHUB_API_URL", &gh.url);
        cmd.env("GITHUB_TOKEN", &gh.token);
        let out = cmd.output().expect("hyperloop runs");
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        out
    };
    let mut rounds = Vec::new();
    for round in 0..2 {
        gh.clear_requests();
        let out = with_token(&["plan".into(), "--json".into()]);
        let planned = gh.requests().len();
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let items: Vec<String> = v["items"]
            .as_array()
            .map(|a| a.iter().map(item_id).collect())
            .unwrap_or_default();
        assert_eq!(items.len(), 5, "max_workers bounds the items: {v}");
        let mut args = vec!["record".to_string(), "--json".to_string()];
        for id in &items {
            let dir = p.env.root().join("gh-clones").join(format!("{id}-{round}"));
            std::fs::create_dir_all(dir.parent().expect("parent")).expect("mkdir");
            p.env.git(
                p.env.root(),
                &[
                    "clone",
                    "-q",
                    p.repo.origin.to_str().expect("utf8"),
                    dir.to_str().expect("utf8"),
                ],
            );
            let out = start_work(&p, &dir, id).wait_with_output().expect("work ends");
            assert_eq!(out.status.code(), Some(0), "work {id}: {}", describe(&out));
            args.push(outputs(&p).join(id).display().to_string());
        }
        gh.clear_requests();
        let started = Instant::now();
        let out = with_token(&args);
        let took = started.elapsed();
        let requests = gh.requests();
        // A step that ran longer than ten seconds reads the dashboard again before it writes
        // (a person may have ticked a box meanwhile): a matter of the machine's speed, not of
        // the number of tasks, so it is not counted here.
        let dashboard_reads = requests
            .iter()
            .filter(|r| r.method == "GET" && r.query.contains("hyperloop%3Adashboard"))
            .count();
        assert!(
            (1..=2).contains(&dashboard_reads),
            "{dashboard_reads} dashboard reads"
        );
        let recorded = requests.len() - (dashboard_reads - 1);
        if std::env::var_os("HYPERLOOP_TEST_SHOW_REQUESTS").is_some() {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("{tasks} tasks, round {round}: record took {took:?}");
            }
        }
        // HYPERLOOP_TEST_SHOW_REQUESTS=1 lists them, to see what changed when the counts do.
        #[allow(clippy::print_stderr)]
        if std::env::var_os("HYPERLOOP_TEST_SHOW_REQUESTS").is_some() {
            for r in gh.requests() {
                eprintln!(
                    "{tasks} round {round}: {} {}?{} -> {}",
                    r.method, r.path, r.query, r.status
                );
            }
        }
        let report: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(strings(&report["recorded"]).len(), 5, "{report}");
        rounds.push((planned, recorded));
    }
    rounds
}

/// What `plan` and `record` cost in GitHub requests depends on the items they handle, not on how
/// many tasks the repository holds. Printed with `--nocapture` (the README quotes it).
#[test]
fn github_requests_of_plan_and_record_do_not_grow_with_the_tasks() {
    let small = github_requests_per_round(100);
    let large = github_requests_per_round(1_000);
    #[allow(clippy::print_stderr)]
    {
        for (i, ((p1, r1), (p2, r2))) in small.iter().zip(&large).enumerate() {
            eprintln!(
                "round {i} of 5 items: plan {p1} / {p2} requests, record {r1} / {r2} requests (100 / 1,000 tasks)"
            );
        }
    }
    assert_eq!(small, large, "requests per round with 100 tasks and with 1,000");
}

/// The fan-out workflow's shape: `plan`, `work` and `record` each in a fresh clone of origin, on
/// runners of their own. `record` finds no task branch for a new task (plan made it at the base
/// in its own clone and pushed nothing on it) and must take the output all the same; in the next
/// round it finds the branch the first `record` pushed.
#[test]
fn github_mode_record_in_a_fresh_clone_takes_outputs_for_new_branches() {
    use crate::fake_github::FakeGitHub;
    let p = project(1, 600, "");
    p.git(&["push", "-q", "origin", "main"]);
    let gh = FakeGitHub::start(&p.repo.origin, "acme", "widgets");
    let fresh = |name: &str| -> PathBuf {
        let dir = p.env.root().join("runners").join(name);
        std::fs::create_dir_all(dir.parent().expect("parent")).expect("mkdir");
        p.env.git(
            p.env.root(),
            &[
                "clone",
                "-q",
                p.repo.origin.to_str().expect("utf8"),
                dir.to_str().expect("utf8"),
            ],
        );
        dir
    };
    let with_token = |dir: &Path, args: &[&str]| -> Output {
        let mut cmd = p.env.command(hyperloop_bin());
        cmd.args(["--path", dir.to_str().expect("utf8"), "--repo", "acme/widgets"]);
        cmd.args(args);
        cmd.env("GITHUB_API_URL", &gh.url);
        cmd.env("GITHUB_TOKEN", &gh.token);
        cmd.output().expect("hyperloop runs")
    };
    for (round, role) in [(0, "implementer"), (1, "verifier")] {
        let planner = fresh(&format!("plan-{round}"));
        let out = with_token(&planner, &["plan", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let items = v["items"].as_array().cloned().unwrap_or_default();
        assert_eq!(items.len(), 1, "{v}");
        assert_eq!(items[0]["role"], role);
        let id = item_id(&items[0]);
        let worker = fresh(&format!("work-{round}"));
        let out = start_work(&p, &worker, &id)
            .wait_with_output()
            .expect("work ends");
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let recorder = fresh(&format!("record-{round}"));
        if round == 0 {
            assert_eq!(
                p.env.git(&recorder, &["branch", "-a", "--list", "*worker/*"]),
                "",
                "origin has no task branch yet"
            );
        }
        let dir = outputs(&p).join(&id);
        let out = with_token(&recorder, &["record", "--json", dir.to_str().expect("utf8")]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let report: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(strings(&report["recorded"]), vec![id.clone()], "{report}");
        assert!(report["refused"].is_null(), "{report}");
    }
    let t = p
        .env
        .git(&p.repo.origin, &["show", "main:specs/tasks/task-001.md"]);
    assert!(t.contains("\nstatus: complete\n"), "{t}");
    let files = p
        .env
        .git(&p.repo.origin, &["ls-tree", "-r", "--name-only", "main"]);
    assert!(files.contains("impl/task-001.md"), "{files}");
    // A round whose every `work` failed has no output to record; `record` still ends the cycle.
    let out = with_token(&fresh("record-none"), &["record", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        report["recorded"].is_null() && report["refused"].is_null(),
        "{report}"
    );
    assert_eq!(report["progress"], "all-complete", "{report}");
}

/// `work --out` hands its folder to another job: the transcript in it is redacted, and with
/// `HYPERLOOP_TRANSCRIPTS_DIR` set the run's transcript goes there too, redacted the same way.
#[test]
fn work_writes_its_transcript_redacted() {
    let key = "sk-test-canary-work-key-0123456789";
    let secret = "canary-deploy-secret-abcdef";
    let p = project(
        1,
        600,
        &format!(
            "  - role: implementer\n    actions:\n      - implement_task: true\n      - print: \"WORK-MARK key=${{ANTHROPIC_API_KEY}} secret={secret}\"\n      - verdict: {{verdict: pass}}\n"
        ),
    );
    let items = plan(&p);
    let item = item_id(&items[0]);
    let c = clone(&p, "redacted");
    let out_dir = outputs(&p).join(&item);
    let transcripts = p.env.root().join("transcripts");
    let out = p
        .env
        .command(hyperloop_bin())
        .args(["--path", c.to_str().expect("utf8"), "work", &item, "--out"])
        .arg(&out_dir)
        .env("ANTHROPIC_API_KEY", key)
        .env("RELEASE_SECRET", secret)
        .env("HYPERLOOP_TRANSCRIPTS_DIR", &transcripts)
        .output()
        .expect("work runs");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for file in [
        out_dir.join("transcript.log"),
        transcripts.join("task-001/implementer-round-0.log"),
    ] {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains("WORK-MARK key=*** secret=***"),
            "{}: {text}",
            file.display()
        );
        assert!(!text.contains(key) && !text.contains(secret), "{text}");
    }
}

/// A project with specs and no task file yet: intake comes first. Leases of `lease` seconds.
fn spec_project(lease: u64, rules: &str) -> Project {
    let p = Project::new(rules, "");
    let cfg = p.repo.read(".hyperloop.yaml");
    p.repo.write(
        ".hyperloop.yaml",
        &cfg.replace("max_workers: 2", "max_workers: 4").replace(
            "stall_timeout: 30",
            &format!("stall_timeout: 30\n  lease_timeout: {lease}"),
        ),
    );
    p.repo.write("specs/a.md", "# A\n\nThe first feature.\n");
    p.repo.write("specs/b.md", "# B\n\nThe second feature.\n");
    p.commit_all("specs");
    p
}

const INTAKE_LEASE: &str = "specs/tasks/.intake-claim.json";

/// The single intake item a plan of `p` claims.
fn plan_intake(p: &Project) -> String {
    let items = plan(p);
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["task_id"], "intake", "{items:?}");
    assert_eq!(items[0]["role"], "pm", "{items:?}");
    let id = item_id(&items[0]);
    assert!(id.starts_with("intake-pm-r0-"), "{id}");
    id
}

fn intake_commits(p: &Project) -> usize {
    p.git(&["log", "--format=%s", "main"])
        .lines()
        .filter(|s| s.starts_with("hyperloop: intake of "))
        .count()
}

#[test]
fn specs_become_tasks_and_run_to_completion_with_plan_work_and_record_only() {
    let p = spec_project(600, "");
    let dry_run = |p: &Project| -> String {
        let out = p.hyperloop(&["step", "--dry-run"]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(dry_run(&p).contains("run intake (pm)"), "{}", dry_run(&p));
    let id = plan_intake(&p);
    assert!(!dry_run(&p).contains("run intake (pm)"), "the lease holds intake");
    // The lease is a committed file of its own: item, nonce, role, base, expiry and the specs.
    let lease: Value = serde_json::from_str(&p.repo.read(INTAKE_LEASE)).expect("lease json");
    assert_eq!(lease["item"], id.as_str(), "{lease}");
    assert_eq!(lease["role"], "pm", "{lease}");
    for field in ["nonce", "base", "expires_at"] {
        assert!(!lease[field].is_null(), "{field} missing in {lease}");
    }
    let specs = lease["specs"].as_object().cloned().unwrap_or_default();
    assert!(
        specs.contains_key("specs/a.md") && specs.contains_key("specs/b.md"),
        "{lease}"
    );
    assert!(p.status().is_empty(), "the lease is no task");

    // While it holds, neither `plan` nor `step` starts another intake.
    assert!(plan(&p).is_empty(), "intake is leased");
    let out = p.hyperloop(&["step"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        named(&events(&out), "intake_ran").is_empty(),
        "{}",
        describe(&out)
    );

    let out = work(&p, &id);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let dir = outputs(&p).join(&id);
    assert!(
        dir.join("commits.bundle").is_file(),
        "the pm's commits come as a bundle"
    );
    let item: Value =
        serde_json::from_slice(&std::fs::read(dir.join("item.json")).expect("item.json")).expect("json");
    assert_eq!(item["task_id"], "intake", "{item}");
    let (out, report) = record(&p, std::slice::from_ref(&dir));
    assert_eq!(strings(&report["recorded"]), vec![id], "{report}");
    let evs = events(&out);
    let ran = named(&evs, "intake_ran");
    assert_eq!(ran.len(), 1, "{}", describe(&out));
    assert_eq!(ran[0]["success"], true, "{}", describe(&out));
    assert!(
        !p.repo.path.join(INTAKE_LEASE).exists(),
        "the lease is released with the intake"
    );
    assert_eq!(intake_commits(&p), 1);
    let tasks = p.status();
    assert!(!tasks.is_empty(), "the specs became tasks");
    assert!(p.repo.read("specs/tasks/.intake.json").contains("specs/a.md"));

    // The tasks run to completion through more rounds; intake does not run again.
    let ran = fan_out_until_done(&p);
    assert_eq!(ran, 2 * tasks.len(), "implementer and verifier per task");
    for t in p.status() {
        assert_eq!(t["status"], "complete", "{t}");
        assert_eq!(merges_of(&p, t["id"].as_str().expect("id")), 1);
    }
    assert_eq!(intake_commits(&p), 1);
}

#[test]
fn forged_and_replayed_intake_outputs_are_refused() {
    let p = spec_project(600, "");
    let id = plan_intake(&p);
    let out = work(&p, &id);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let real = outputs(&p).join(&id);
    let forged = p.env.root().join("forged");
    let wrong_nonce = forged.join("wrong-nonce");
    copy_output(&real, &wrong_nonce);
    edit_item(&wrong_nonce, "nonce", "0123456789abcdef");
    let wrong_role = forged.join("wrong-role");
    copy_output(&real, &wrong_role);
    edit_item(&wrong_role, "role", "implementer");

    let (out, report) = record(
        &p,
        &[
            wrong_nonce.clone(),
            wrong_role.clone(),
            real.clone(),
            real.clone(),
        ],
    );
    assert_eq!(strings(&report["recorded"]), vec![id.clone()], "{report}");
    let refused = report["refused"].as_array().cloned().unwrap_or_default();
    let reason_of = |dir: &Path| -> Vec<String> {
        refused
            .iter()
            .filter(|r| r["dir"] == dir.display().to_string().as_str())
            .map(|r| r["reason"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(refused.len(), 3, "{report}");
    assert!(
        reason_of(&wrong_nonce)[0].contains("does not match its lease"),
        "{report}"
    );
    assert!(
        reason_of(&wrong_role)[0].contains("does not match its lease"),
        "{report}"
    );
    assert!(reason_of(&real)[0].contains("no lease holds"), "{report}");
    assert_eq!(named(&events(&out), "output_refused").len(), 3);
    assert_eq!(intake_commits(&p), 1);
    let tasks = p.status().len();
    assert!(tasks > 0);

    // Replayed in a later `record`: refused, the tasks are not written again.
    let (out, report) = record(&p, std::slice::from_ref(&real));
    assert!(report["recorded"].is_null(), "{report}");
    assert_eq!(named(&events(&out), "output_refused").len(), 1);
    assert_eq!(intake_commits(&p), 1);
    assert_eq!(p.status().len(), tasks);
    // `work` refuses the item, recorded already.
    let again = work(&p, &id);
    assert_eq!(again.status.code(), Some(2), "{}", describe(&again));
}

#[test]
fn a_killed_intake_is_reissued_after_its_lease() {
    let p = spec_project(
        3,
        "  - role: pm\n    attempt: 0\n    actions:\n      - sleep: 60\n",
    );
    let first = plan_intake(&p);
    let c = clone(&p, "killed-intake");
    let mut child = start_work(&p, &c, &first);
    let log_dir = c.join(".hyperloop/logs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_dir(&log_dir).is_ok_and(|mut d| d.next().is_some()) {
        assert!(Instant::now() < deadline, "the pm never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().expect("kill -9");
    let _ = child.wait();

    assert!(plan(&p).is_empty(), "intake is still leased");
    std::thread::sleep(Duration::from_secs(4));
    let out = p.hyperloop(&["plan", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    let expired = named(&evs, "lease_expired");
    assert_eq!(expired.len(), 1, "{}", describe(&out));
    assert_eq!(expired[0]["item"], first.as_str());
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let items = v["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{v}");
    let second = item_id(&items[0]);
    assert_ne!(second, first, "a re-issued item has a new id");
    assert_eq!(items[0]["task_id"], "intake");

    let stale = work(&p, &first);
    assert_eq!(stale.status.code(), Some(2), "{}", describe(&stale));
    let out = work(&p, &second);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let (_, report) = record(&p, &[outputs(&p).join(&second)]);
    assert_eq!(strings(&report["recorded"]), vec![second], "{report}");
    assert!(!p.status().is_empty(), "the specs became tasks");
    fan_out_until_done(&p);
    for t in p.status() {
        assert_eq!(t["status"], "complete", "{t}");
    }
}

/// Runs `work` for every item of `items` (each in a fresh clone) and records their outputs in one
/// `record`. Returns the output folders and the record's output and report.
fn work_and_record(p: &Project, items: &[Value]) -> (Vec<PathBuf>, Output, Value) {
    let mut dirs = Vec::new();
    for item in items {
        let id = item_id(item);
        let out = work(p, &id);
        assert_eq!(out.status.code(), Some(0), "work {id}: {}", describe(&out));
        dirs.push(outputs(p).join(&id));
    }
    let (out, report) = record(p, &dirs);
    (dirs, out, report)
}

/// A verifier that fails round 0; an improver that, given that failure, writes an implementer
/// overlay (and a file outside the prompts folder, which must not land).
const IMPROVER_RULES: &str = r#"
  - role: verifier
    round: 0
    actions:
      - verdict: {verdict: fail, findings: 1, detail: "tests are missing"}
  - role: process-improver
    actions:
      - shell: "grep -q 'tests are missing' \"$HYPERLOOP_PROMPT_FILE\" && mkdir -p specs/prompts && printf 'prompt: |\\n  Remember the tests.\\n' > specs/prompts/implementer-overlay.yaml && echo stray > stray.txt && git add -A && git commit -qm improve"
      - verdict: {verdict: pass, detail: "overlay written"}
"#;

/// The process improver is a work item like any other: a failure `record` takes in waits,
/// committed, for the next `plan`, which claims an improver run holding it; `work` runs the
/// improver in a clone; `record` takes its changes to the prompts folder only and releases the
/// lease. A replay of the output is refused, and the task then finishes as usual.
#[test]
fn the_process_improver_runs_as_a_work_item() {
    let p = project(1, 600, IMPROVER_RULES);
    let pending = "specs/tasks/.improver-pending.json";
    let claim = "specs/tasks/.improver-claim.json";
    let exists = |path: &str| {
        p.env
            .command("git")
            .current_dir(&p.repo.path)
            .args(["cat-file", "-e", &format!("main:{path}")])
            .status()
            .expect("git runs")
            .success()
    };

    // Implementer, then the verifier's failure.
    for role in ["implementer", "verifier"] {
        let items = plan(&p);
        assert_eq!(items.len(), 1, "{items:?}");
        assert_eq!(items[0]["role"], role);
        let (_, _, report) = work_and_record(&p, &items);
        assert_eq!(strings(&report["recorded"]).len(), 1, "{report}");
    }
    assert!(exists(pending), "the failure waits for the improver");
    let waiting: Value = serde_json::from_str(&p.git(&["show", &format!("main:{pending}")])).expect("json");
    assert_eq!(waiting["failures"][0]["task_id"], "task-001", "{waiting}");
    assert_eq!(waiting["failures"][0]["detail"], "tests are missing", "{waiting}");

    // The next plan claims the implementer's next round and the improver.
    let items = plan(&p);
    let roles: Vec<&str> = items.iter().filter_map(|i| i["role"].as_str()).collect();
    assert!(
        roles.contains(&"process-improver") && roles.contains(&"implementer"),
        "{items:?}"
    );
    assert!(
        exists(claim) && !exists(pending),
        "the failures moved into the lease"
    );
    let improver = items
        .iter()
        .find(|i| i["role"] == "process-improver")
        .map(item_id)
        .expect("improver item");
    assert_eq!(
        items
            .iter()
            .find(|i| i["role"] == "process-improver")
            .expect("item")["task_id"],
        "process-improvement"
    );
    let (dirs, out, report) = work_and_record(&p, &items);
    assert_eq!(strings(&report["recorded"]).len(), 2, "{report}");
    let ran = named(&events(&out), "process_improver_ran").len();
    assert_eq!(ran, 1, "{}", describe(&out));
    assert!(
        p.git(&["show", "main:specs/prompts/implementer-overlay.yaml"])
            .contains("Remember the tests."),
        "the improver's prompt held the failure, and its overlay landed"
    );
    assert!(
        !exists("stray.txt"),
        "only the prompts folder is taken from the improver"
    );
    assert!(!exists(claim) && !exists(pending), "the lease is released");

    // Its output again: refused, nothing applied twice.
    let improver_dir = dirs
        .iter()
        .find(|d| d.ends_with(&improver))
        .cloned()
        .expect("improver output");
    let (out, report) = record(&p, &[improver_dir]);
    assert!(report["recorded"].is_null(), "{report}");
    assert_eq!(named(&events(&out), "output_refused").len(), 1);
    assert_eq!(named(&events(&out), "process_improver_ran").len(), 0);

    fan_out_until_done(&p);
    assert_eq!(p.task("task-001")["status"], "complete");
    assert_eq!(merges_of(&p, "task-001"), 1);
    assert!(plan(&p).is_empty());
}

/// An improver run whose `work` never reports: after its lease the failures it held wait again,
/// and the next `plan` claims the improver anew (another item id); that run is recorded.
#[test]
fn an_improver_item_never_worked_is_reissued_after_its_lease() {
    let p = project(1, 6, IMPROVER_RULES);
    for _ in 0..2 {
        let items = plan(&p);
        let (_, _, report) = work_and_record(&p, &items);
        assert_eq!(strings(&report["recorded"]).len(), 1, "{report}");
    }
    let improver_of = |items: &[Value]| {
        items
            .iter()
            .find(|i| i["role"] == "process-improver")
            .map(item_id)
    };
    let first = improver_of(&plan(&p)).expect("the improver is claimed");
    // Its `work` never runs. Past the lease, the next plan gives it back and claims it again.
    std::thread::sleep(Duration::from_secs(7));
    let out = p.hyperloop(&["plan", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let evs = events(&out);
    let expired: Vec<_> = named(&evs, "lease_expired")
        .into_iter()
        .filter(|e| e["task_id"] == "process-improvement")
        .collect();
    assert_eq!(expired.len(), 1, "{}", describe(&out));
    let items: Vec<Value> = serde_json::from_slice::<Value>(&out.stdout).expect("json")["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let second = improver_of(&items).expect("claimed again");
    assert_ne!(first, second);
    // The first item is no longer claimed.
    let stale = work(&p, &first);
    assert_eq!(stale.status.code(), Some(2), "{}", describe(&stale));
    let (_, out, report) = work_and_record(&p, &items);
    assert!(report["refused"].is_null(), "{report}");
    assert_eq!(named(&events(&out), "process_improver_ran").len(), 1);
    assert!(
        p.git(&["show", "main:specs/prompts/implementer-overlay.yaml"])
            .contains("Remember the tests.")
    );
}
