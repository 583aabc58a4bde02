//! A step that dies at any instant loses nothing: `hyperloop run` is killed with SIGKILL at every
//! crash point (`HYPERLOOP_FAULT=<point>:<n>`) and while agents run, then run again to the end, and
//! the repository must show every task merged exactly once, every agent commit on main, no agent
//! process left over and a clean checkout. Also the recovery cases one by one, and SIGTERM/SIGINT.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{TestEnv, TestRepo, describe, hyperloop_bin, scripted_agent_bin};

/// The implementer's work: one unique line per run appended to `work/<task>.txt` and committed;
/// the line is logged outside the repository once the commit exists, so every logged line must
/// reach main. The agent's pid goes to `pids`.
const IMPLEMENT: &str = r#"echo $PPID >> "$ROOT/pids"
line="$HYPERLOOP_TASK_ID round $HYPERLOOP_ROUND $HYPERLOOP_NONCE"
mkdir -p work
echo "$line" >> "work/$HYPERLOOP_TASK_ID.txt"
git add work
git commit -q -m "$HYPERLOOP_TASK_ID: round $HYPERLOOP_ROUND" -m "Spec-Ref: $HYPERLOOP_SPEC_REF
Task-Ref: $HYPERLOOP_TASK_ID"
echo "$line" >> "$ROOT/committed.log"
echo "$HYPERLOOP_TASK_ID $HYPERLOOP_ROLE" >> "$ROOT/runs.log"
"#;

/// Notes a run of a role that changes nothing on the branch.
const NOTE_RUN: &str = r#"echo $PPID >> "$ROOT/pids"
echo "$HYPERLOOP_TASK_ID $HYPERLOOP_ROLE" >> "$ROOT/runs.log"
"#;

/// A job that runs until it is killed: it commits first (that commit must survive), starts a
/// grandchild, announces itself in `sleeping` and sleeps.
fn sleeper(task: &str, role: &str, round: Option<u32>) -> String {
    let round = round.map(|r| format!("    round: {r}\n")).unwrap_or_default();
    let work = if role == "implementer" {
        IMPLEMENT
    } else {
        NOTE_RUN
    };
    format!(
        r#"  - role: {role}
    task: {task}
{round}    attempt: 0
    actions:
      - shell: {work}
      - spawn_grandchild: {{sleep: 120, pidfile: "${{ROOT}}/gc-${{HYPERLOOP_NONCE}}.pid"}}
      - shell: "echo $PPID > \"$ROOT/sleeping.tmp\" && mv \"$ROOT/sleeping.tmp\" \"$ROOT/sleeping\""
      - sleep: 120
      - verdict: {{verdict: pass}}
"#,
        work = serde_json::to_string(work).expect("json")
    )
}

/// The scripted agent's default behaviour: instant; task-003's verifier fails once.
fn base_rules() -> String {
    let implement = serde_json::to_string(IMPLEMENT).expect("json");
    let note = serde_json::to_string(NOTE_RUN).expect("json");
    format!(
        r#"  - role: implementer
    actions:
      - shell: {implement}
      - verdict: {{verdict: pass, detail: "implemented"}}
  - role: verifier
    task: task-003
    attempt: 0
    actions:
      - shell: {note}
      - verdict: {{verdict: fail, findings: 1, detail: "one more round"}}
  - role: verifier
    actions:
      - shell: {note}
      - verdict: {{verdict: pass, detail: "fine"}}
  - role: process-improver
    actions:
      - shell: {note}
      - verdict: {{verdict: pass, detail: "nothing to improve"}}
  - role: rebase-resolver
    actions:
      - verdict: {{verdict: fail, detail: "no conflicts expected"}}
"#
    )
}

/// A repository with three tasks (task-002 depends on task-001), two worker slots and the
/// scripted agent.
pub(crate) struct Fixture {
    pub env: TestEnv,
    pub repo: TestRepo,
    /// Outside the repository: agent pids, logs of runs and commits.
    pub root: PathBuf,
}

pub(crate) const TASKS: [&str; 3] = ["task-001", "task-002", "task-003"];

impl Fixture {
    /// `rules` come before the defaults (the first matching rule wins).
    pub fn new(rules: &str, extra_config: &str) -> Fixture {
        let env = TestEnv::new();
        let repo = env.repo("project");
        let root = env.root().join("agents");
        std::fs::create_dir_all(&root).expect("agents dir");
        let script = env.root().join("agent-script.yaml");
        std::fs::write(&script, format!("rules:\n{rules}{}", base_rules())).expect("script");
        let config = format!(
            "runtime:\n  max_workers: 2\n  agent_command: [\"{}\", \"--script\", \"{}\"]\n  agent_env: [ROOT]\n  worker_timeout: 300\n  stall_timeout: 300\npoll_interval: 0\nmax_cycles: 20\nobservability:\n  log_format: json\n{extra_config}",
            scripted_agent_bin().display(),
            script.display()
        );
        repo.write(".hyperloop.yaml", &config);
        let f = Fixture { env, repo, root };
        for (id, deps) in [
            ("task-001", vec![]),
            ("task-002", vec!["task-001"]),
            ("task-003", vec![]),
        ] {
            let spec = format!("specs/{id}.md");
            f.repo.write(&spec, &format!("# {id}\n"));
            f.write_task(id, &spec, &deps);
        }
        f.commit_all("tasks");
        f
    }

    pub fn write_task(&self, id: &str, spec: &str, deps: &[&str]) {
        self.repo.write(
            &format!("specs/tasks/{id}.md"),
            &format!(
                "---\nid: {id}\ntitle: Task {id}\nspec_ref: {spec}\nstatus: not-started\nphase: null\ndeps: [{}]\nround: 0\nbranch: null\npr: null\n---\nImplement {id}.\n",
                deps.join(", ")
            ),
        );
    }

    pub fn commit_all(&self, message: &str) {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-qm", message]);
    }

    pub fn git(&self, args: &[&str]) -> String {
        self.env.git(&self.repo.path, args)
    }

    /// `hyperloop` with `--path` and the agents' `ROOT`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.env.command(hyperloop_bin());
        cmd.arg("--path").arg(&self.repo.path).args(args);
        cmd.env("ROOT", &self.root);
        cmd
    }

    pub fn hyperloop(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("hyperloop runs")
    }

    /// Starts `hyperloop`, its standard error going to a file (a pipe nobody reads could fill).
    pub fn spawn(&self, args: &[&str], fault: Option<&str>, name: &str) -> Running {
        let err_path = self.env.root().join(format!("{name}.stderr"));
        let out_path = self.env.root().join(format!("{name}.stdout"));
        let mut cmd = self.command(args);
        if let Some(f) = fault {
            cmd.env("HYPERLOOP_FAULT", f);
        }
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).expect("stdout file"))
            .stderr(std::fs::File::create(&err_path).expect("stderr file"));
        let child = cmd.spawn().expect("hyperloop starts");
        Running {
            child,
            err_path,
            out_path,
        }
    }

    pub fn status(&self) -> Vec<Value> {
        let out = self.hyperloop(&["status", "--json"]);
        assert!(out.status.success(), "{}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("status json");
        v["tasks"].as_array().cloned().unwrap_or_default()
    }

    pub fn task(&self, id: &str) -> Value {
        self.status()
            .into_iter()
            .find(|t| t["id"] == id)
            .unwrap_or_else(|| panic!("no task {id}"))
    }

    pub fn read_root(&self, name: &str) -> String {
        std::fs::read_to_string(self.root.join(name)).unwrap_or_default()
    }

    /// How often each `(task, role)` ran, from `runs.log`.
    pub fn runs(&self) -> BTreeMap<(String, String), usize> {
        let mut m = BTreeMap::new();
        for l in self.read_root("runs.log").lines() {
            if let Some((t, r)) = l.split_once(' ') {
                *m.entry((t.to_string(), r.to_string())).or_insert(0) += 1;
            }
        }
        m
    }

    /// Waits for a file outside the repo to appear.
    pub fn wait_for_root_file(&self, name: &str, limit: Duration) -> String {
        let path = self.root.join(name);
        let end = Instant::now() + limit;
        loop {
            if let Ok(s) = std::fs::read_to_string(&path)
                && !s.trim().is_empty()
            {
                return s;
            }
            assert!(Instant::now() < end, "{} never appeared", path.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every pid an agent or grandchild recorded.
    pub fn recorded_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        let mut texts = vec![self.read_root("pids")];
        for e in std::fs::read_dir(&self.root).expect("agents dir").flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("gc-") || name == "sleeping" {
                texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        for t in texts {
            pids.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        pids
    }

    /// Asserts everything the contract promises after a run to completion.
    pub fn assert_all_done(&self, context: &str) {
        let tasks = self.status();
        assert_eq!(tasks.len(), 3, "{context}: {tasks:?}");
        for t in &tasks {
            assert_eq!(t["status"], "complete", "{context}: {t}");
        }
        // Each task's work reached main exactly once: one squash commit `(<id>)`.
        for id in TASKS {
            let squashes = self.git(&[
                "log",
                "--format=%s",
                "--fixed-strings",
                &format!("--grep=({id})"),
                "main",
            ]);
            assert_eq!(
                squashes.lines().count(),
                1,
                "{context}: {id} merged once: {squashes:?}"
            );
        }
        // No agent commit was lost: every line an implementer committed is on main.
        let mut on_main: BTreeMap<String, String> = BTreeMap::new();
        for id in TASKS {
            let text = self
                .env
                .command("git")
                .current_dir(&self.repo.path)
                .args(["show", &format!("main:work/{id}.txt")])
                .output()
                .expect("git");
            on_main.insert(id.to_string(), String::from_utf8_lossy(&text.stdout).into_owned());
        }
        let committed = self.read_root("committed.log");
        for line in committed.lines() {
            let id = line.split(' ').next().unwrap_or_default();
            assert!(
                on_main.get(id).is_some_and(|t| t.lines().any(|l| l == line)),
                "{context}: committed work `{line}` is not on main:\n{on_main:?}"
            );
        }
        for t in &tasks {
            let id = t["id"].as_str().unwrap_or_default();
            let last_round = format!("{id} round {} ", t["round"]);
            assert!(
                on_main[id].lines().any(|l| l.starts_with(&last_round)),
                "{context}: the final round of {id} is on main: {:?}",
                on_main[id]
            );
        }
        // The result file never reached main.
        let files = self.git(&["log", "--format=", "--name-only", "main"]);
        assert!(
            !files.contains(".worker-result.json"),
            "{context}: the result file was committed"
        );
        // The user's checkout is clean and follows main.
        assert_eq!(
            self.git(&["status", "--porcelain"]),
            "",
            "{context}: dirty checkout"
        );
        assert_eq!(self.git(&["rev-parse", "HEAD"]), self.git(&["rev-parse", "main"]));
        // Merged task branches are gone; no worker is registered as running.
        for id in TASKS {
            let branch = format!("worker/{id}");
            assert_eq!(self.git(&["branch", "--list", &branch]), "", "{context}");
        }
        let running = self.repo.path.join(".hyperloop/state/running");
        let left: Vec<_> = std::fs::read_dir(&running)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{context}: run records left: {left:?}");
        // Nothing an agent started is still alive.
        for pid in self.recorded_pids() {
            assert!(
                wait_dead(pid, Duration::from_secs(10)),
                "{context}: agent process {pid} is still running"
            );
        }
    }
}

/// A started `hyperloop` process.
pub(crate) struct Running {
    pub child: Child,
    pub err_path: PathBuf,
    pub out_path: PathBuf,
}

impl Running {
    /// Waits (at most `limit`, else kills it and fails) for the process to end.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("hyperloop did not finish in {limit:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err_path).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out_path).unwrap_or_default()
    }

    pub fn events(&self) -> Vec<Value> {
        events_of(&self.stderr())
    }

    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: signalling a child process this test started and has not reaped yet.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The JSON events in `stderr`.
pub(crate) fn events_of(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// True when `pid` is a live process that carries a worker nonce (so a reused pid of something
/// else never counts).
pub(crate) fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .unwrap_or('X');
    if matches!(state, 'Z' | 'X') {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|e| e.split(|b| *b == 0).any(|v| v.starts_with(b"HYPERLOOP_NONCE=")))
        .unwrap_or(false)
}

/// Polls until `pid` is gone.
pub(crate) fn wait_dead(pid: i32, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn killed_by_sigkill(st: ExitStatus) -> bool {
    st.signal() == Some(libc::SIGKILL)
}

/// Runs `hyperloop run` to completion and checks it exited 0.
fn run_to_completion(f: &Fixture, context: &str) -> Running {
    let mut r = f.spawn(&["run"], None, "final-run");
    let st = r.wait(Duration::from_secs(120));
    assert_eq!(
        st.code(),
        Some(0),
        "{context}: the run after the kill\n{}",
        r.stderr()
    );
    r
}

/// One way to kill a run.
#[derive(Debug, Clone)]
enum Kill {
    /// `HYPERLOOP_FAULT=<point>:<n>`.
    Point(&'static str, u32),
    /// SIGKILL from outside while this job sleeps (task, role, round).
    WhileRunning(&'static str, &'static str, Option<u32>),
}

impl Kill {
    fn name(&self) -> String {
        match self {
            Kill::Point(p, n) => format!("{p}:{n}"),
            Kill::WhileRunning(t, r, round) => format!("while {t} {r} round {round:?} runs"),
        }
    }
}

/// Kills a run as `kill` says, runs again to the end and checks the result. Returns whether the
/// first run really died by SIGKILL.
fn kill_case(kill: &Kill) -> bool {
    let context = kill.name();
    let rules = match kill {
        Kill::Point(..) => String::new(),
        Kill::WhileRunning(t, r, round) => sleeper(t, r, *round),
    };
    let f = Fixture::new(&rules, "");
    let killed = match kill {
        Kill::Point(..) => {
            let mut r = f.spawn(&["run"], Some(&context), "killed-run");
            let st = r.wait(Duration::from_secs(120));
            if !killed_by_sigkill(st) {
                assert_eq!(st.code(), Some(0), "{context}: {}", r.stderr());
            }
            killed_by_sigkill(st)
        }
        Kill::WhileRunning(..) => {
            let mut r = f.spawn(&["run"], None, "killed-run");
            let agent: i32 = f
                .wait_for_root_file("sleeping", Duration::from_secs(60))
                .trim()
                .parse()
                .expect("agent pid");
            r.signal(libc::SIGKILL);
            let st = r.wait(Duration::from_secs(30));
            // PR_SET_PDEATHSIG: the agent dies with hyperloop, without waiting for another step.
            assert!(
                wait_dead(agent, Duration::from_secs(10)),
                "{context}: the agent outlived hyperloop"
            );
            killed_by_sigkill(st)
        }
    };
    run_to_completion(&f, &context);
    f.assert_all_done(&context);
    killed
}

/// Every crash point, at every pass a full run makes through it, and SIGKILLs from outside while
/// agents work.
fn all_kills() -> Vec<Kill> {
    let mut kills = Vec::new();
    for (point, passes) in [
        ("before-run-record", 9),
        ("before-spawn", 9),
        ("after-spawn", 9),
        ("worker-done", 9),
        ("after-record", 9),
        ("before-publish", 12),
        ("after-publish", 15),
        ("publish-checkout-updated", 15),
        ("merge-before-publish", 3),
        ("merge-after-publish", 3),
        ("before-branch-delete", 3),
    ] {
        for n in 1..=passes {
            kills.push(Kill::Point(point, n));
        }
    }
    for (task, role, round) in [
        ("task-001", "implementer", None),
        ("task-003", "implementer", Some(0)),
        ("task-003", "implementer", Some(1)),
        ("task-001", "verifier", None),
        ("task-003", "verifier", Some(0)),
        ("task-002", "implementer", None),
        ("task-002", "verifier", None),
        ("process-improvement", "process-improver", None),
    ] {
        kills.push(Kill::WhileRunning(task, role, round));
    }
    kills
}

/// Runs `cases` on `threads` threads; returns the failures' messages and the results.
pub(crate) fn parallel<T: Send + Clone, R: Send>(
    cases: Vec<T>,
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<(T, std::thread::Result<R>)> {
    let queue = Mutex::new(cases.into_iter().collect::<Vec<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let Some(case) = queue.lock().expect("queue").pop() else {
                        break;
                    };
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&case)));
                    results.lock().expect("results").push((case, r));
                }
            });
        }
    });
    results.into_inner().expect("results")
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "panic".into())
}

#[test]
fn a_run_killed_anywhere_loses_nothing() {
    let started = Instant::now();
    // HYPERLOOP_TEST_KILL=<name>[,<name>…] runs only those cases, to chase one failure.
    let only: Option<Vec<String>> = std::env::var("HYPERLOOP_TEST_KILL")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let kills: Vec<Kill> = all_kills()
        .into_iter()
        .filter(|k| only.as_ref().is_none_or(|o| o.contains(&k.name())))
        .collect();
    let filtered = only.is_some();
    let results = parallel(kills, 3, kill_case);
    let mut failures = Vec::new();
    let mut exercised = BTreeSet::new();
    for (kill, r) in results {
        match r {
            Ok(true) => {
                exercised.insert(kill.name());
            }
            Ok(false) => {}
            Err(e) => failures.push(format!("{}: {}", kill.name(), panic_text(&*e))),
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // Shown with --nocapture: how much the suite covered and how long it took.
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "{} distinct kill points exercised in {:.0?}",
            exercised.len(),
            started.elapsed()
        );
    }
    assert!(
        filtered || exercised.len() >= 50,
        "only {} kills really happened: {exercised:?}",
        exercised.len()
    );
}

// ----- recovery, case by case ------------------------------------------------------------------

/// A run killed with HYPERLOOP_FAULT, asserting it really died there.
fn kill_at(f: &Fixture, fault: &str) {
    kill_at_with(f, fault, &["run"]);
}

fn kill_at_with(f: &Fixture, fault: &str, args: &[&str]) {
    let mut r = f.spawn(args, Some(fault), "killed-run");
    let st = r.wait(Duration::from_secs(120));
    assert!(
        killed_by_sigkill(st),
        "{fault} was not reached: {st:?}\n{}",
        r.stderr()
    );
}

fn worktree_gitdir(f: &Fixture, id: &str) -> PathBuf {
    let wt = f.repo.path.join(".hyperloop/worktrees").join(id);
    let out = f.env.git(&wt, &["rev-parse", "--absolute-git-dir"]);
    PathBuf::from(out)
}

#[test]
fn a_worktree_deleted_behind_gits_back_is_repaired() {
    let f = Fixture::new("", "");
    // The first implementer result is recorded, then the step dies: task-001's worktree exists.
    kill_at(&f, "after-record:1");
    let wt = f.repo.path.join(".hyperloop/worktrees/task-001");
    assert!(wt.exists());
    std::fs::remove_dir_all(&wt).expect("rm worktree");
    assert!(
        !f.git(&["worktree", "list"]).contains("task-001"),
        "a task's checkout is a repository of its own, not a registered worktree"
    );
    run_to_completion(&f, "deleted worktree");
    f.assert_all_done("deleted worktree");
}

/// A step killed while it wrote a new checkout's repository files leaves a `.git` directory that
/// is not yet a repository. git run there must not climb up to the repository the checkout sits
/// in: it would check out the task's branch over the user's files and move their branch.
#[test]
fn a_checkout_cut_short_while_it_was_made_never_touches_the_main_checkout() {
    let f = Fixture::new("", "");
    kill_at(&f, "after-record:1");
    let head = f.git(&["symbolic-ref", "HEAD"]);
    for id in ["task-002", "task-003"] {
        let wt = f.repo.path.join(".hyperloop/worktrees").join(id);
        if wt.exists() {
            std::fs::remove_dir_all(&wt).expect("rm checkout");
        }
        // What make_checkout leaves when killed after its first directories.
        std::fs::create_dir_all(wt.join(".git/objects/info")).expect("half a checkout");
    }
    run_to_completion(&f, "half-made checkout");
    assert_eq!(
        f.git(&["symbolic-ref", "HEAD"]),
        head,
        "the user's checkout stays on its branch"
    );
    f.assert_all_done("half-made checkout");
}

#[test]
fn a_worktree_with_a_leftover_index_lock_is_repaired() {
    let f = Fixture::new("", "");
    kill_at(&f, "after-record:1");
    let lock = worktree_gitdir(&f, "task-001").join("index.lock");
    std::fs::write(&lock, "").expect("index.lock");
    run_to_completion(&f, "index.lock");
    f.assert_all_done("index.lock");
    assert!(!lock.exists());
}

#[test]
fn a_dead_workers_task_runs_its_role_again_without_burning_a_round() {
    let f = Fixture::new(&sleeper("task-001", "implementer", None), "");
    let mut r = f.spawn(&["run"], None, "killed-run");
    let agent: i32 = f
        .wait_for_root_file("sleeping", Duration::from_secs(60))
        .trim()
        .parse()
        .expect("pid");
    let gc_file = std::fs::read_dir(&f.root)
        .expect("dir")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("gc-"))
        .expect("grandchild pidfile");
    let grandchild: i32 = std::fs::read_to_string(gc_file.path())
        .expect("gc pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(alive(agent) && alive(grandchild));
    r.signal(libc::SIGKILL);
    r.wait(Duration::from_secs(30));
    assert!(
        wait_dead(agent, Duration::from_secs(10)),
        "PR_SET_PDEATHSIG takes the agent down with hyperloop"
    );
    // The agent committed before it was killed; that commit is on its branch in its checkout,
    // and is taken into the repository by the next step.
    let committed: Vec<String> = f
        .read_root("committed.log")
        .lines()
        .filter(|l| l.starts_with("task-001 "))
        .map(str::to_string)
        .collect();
    assert_eq!(committed.len(), 1, "{committed:?}");
    let on_branch = f.git(&[
        "-C",
        ".hyperloop/worktrees/task-001",
        "show",
        "worker/task-001:work/task-001.txt",
    ]);
    assert_eq!(on_branch, committed[0]);
    assert_eq!(f.task("task-001")["round"], 0);

    // The agent's supervisor, told by the kernel that hyperloop died, stops what the agent
    // started too — at once, not only at the next step.
    assert!(
        wait_dead(grandchild, Duration::from_secs(10)),
        "the dead worker's grandchild outlived it"
    );
    let r = run_to_completion(&f, "dead worker");
    let orphans: Vec<Value> = r
        .events()
        .into_iter()
        .filter(|e| e["event"] == "orphan_found" && e["task_id"] == "task-001")
        .collect();
    assert_eq!(orphans.len(), 1, "{}", r.stderr());
    let t = f.task("task-001");
    assert_eq!(t["round"], 0, "no round burned: {t}");
    assert!(
        r.events()
            .iter()
            .all(|e| e["event"] != "task_looped_back" || e["task_id"] != "task-001"),
        "{}",
        r.stderr()
    );
    assert_eq!(f.runs()[&("task-001".into(), "implementer".into())], 2);
    f.assert_all_done("dead worker");
}

#[test]
fn a_result_written_but_not_recorded_is_recorded_without_running_the_agent_again() {
    let f = Fixture::new("", "");
    // One worker at a time, so that no other agent is cut short: the first worker to finish is
    // task-001's implementer.
    kill_at_with(&f, "worker-done:1", &["run", "--max-workers", "1"]);
    let before = f.runs();
    assert_eq!(before.values().sum::<usize>(), 1, "{before:?}");
    let r = run_to_completion(&f, "worker-done");
    let recovered: Vec<Value> = r
        .events()
        .into_iter()
        .filter(|e| e["event"] == "result_recovered")
        .collect();
    assert!(!recovered.is_empty(), "{}", r.stderr());
    let runs = f.runs();
    for id in TASKS {
        assert_eq!(
            runs[&(id.to_string(), "implementer".to_string())],
            if id == "task-003" { 2 } else { 1 },
            "{id}: every implementer round ran exactly once: {runs:?}"
        );
    }
    f.assert_all_done("worker-done");
}

#[test]
fn a_half_done_merge_is_merged_exactly_once_and_its_branch_cleaned_up_later() {
    let cases: Vec<&'static str> = vec![
        "merge-before-publish:1",
        "merge-after-publish:1",
        "before-branch-delete:1",
    ];
    let results = parallel(cases, 3, |fault| {
        let f = Fixture::new("", "");
        kill_at(&f, fault);
        if *fault != "merge-before-publish:1" {
            // The merge is on main, its branch still there.
            let merged = f.git(&["log", "--format=%s", "--fixed-strings", "--grep=(task-", "main"]);
            assert_eq!(merged.lines().count(), 1, "{fault}: {merged}");
            assert!(
                !f.git(&["branch", "--list", "worker/*"]).is_empty(),
                "{fault}: the branch outlives the killed step"
            );
        }
        run_to_completion(&f, fault);
        f.assert_all_done(fault);
    });
    for (fault, r) in results {
        if let Err(e) = r {
            panic!("{fault}: {}", panic_text(&*e));
        }
    }
}

#[test]
fn recovery_touches_only_branches_the_task_files_name() {
    let f = Fixture::new("", "");
    let base = f.git(&["rev-parse", "main"]);
    for b in ["worker/unrelated", "feature/x", "worker/task-xyz"] {
        f.git(&["branch", b, &base]);
    }
    // A user commit on one of them.
    f.git(&["checkout", "-q", "feature/x"]);
    f.repo.write("mine.txt", "mine\n");
    f.commit_all("my work");
    let mine = f.git(&["rev-parse", "feature/x"]);
    f.git(&["checkout", "-q", "main"]);
    for fault in ["before-branch-delete:1", "merge-after-publish:1"] {
        kill_at(&f, fault);
    }
    run_to_completion(&f, "foreign branches");
    f.assert_all_done("foreign branches");
    assert_eq!(f.git(&["rev-parse", "worker/unrelated"]), base);
    assert_eq!(f.git(&["rev-parse", "worker/task-xyz"]), base);
    assert_eq!(f.git(&["rev-parse", "feature/x"]), mine);
}

// ----- SIGTERM / SIGINT ------------------------------------------------------------------------

fn interrupt_case(sig: i32) {
    let f = Fixture::new(&sleeper("task-001", "implementer", None), "");
    let mut r = f.spawn(&["run"], None, "interrupted-run");
    let agent: i32 = f
        .wait_for_root_file("sleeping", Duration::from_secs(60))
        .trim()
        .parse()
        .expect("pid");
    let grandchildren: Vec<i32> = f.recorded_pids().into_iter().filter(|p| *p != agent).collect();
    let sent = Instant::now();
    r.signal(sig);
    let st = r.wait(Duration::from_secs(30));
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    assert!(!st.success(), "{st:?}\n{}", r.stderr());
    assert_eq!(st.signal(), None, "hyperloop handled the signal: {st:?}");
    assert!(wait_dead(agent, Duration::from_secs(5)), "the agent died");
    for gc in grandchildren {
        assert!(wait_dead(gc, Duration::from_secs(5)), "process {gc} died");
    }
    let t = f.task("task-001");
    assert_eq!(t["round"], 0, "{t}");
    assert_eq!(t["status"], "in-progress", "{t}");
    run_to_completion(&f, "after an interrupt");
    assert_eq!(f.task("task-001")["round"], 0);
    f.assert_all_done("after an interrupt");
}

#[test]
fn sigterm_stops_agents_and_the_next_run_completes() {
    interrupt_case(libc::SIGTERM);
}

#[test]
fn sigint_stops_agents_and_the_next_run_completes() {
    interrupt_case(libc::SIGINT);
}
