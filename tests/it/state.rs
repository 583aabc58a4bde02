//! Task state read from and written to commits, and the user's checkout following along.

use hyperloop::state::{Changes, Publish, Repo};
use hyperloop::task::{Status, Task};

use crate::harness::TestEnv;

fn task_text(id: &str, status: &str) -> String {
    format!(
        "---\nid: {id}\ntitle: Task {id}\nspec_ref: specs/a.md\nstatus: {status}\nphase: null\ndeps: []\nround: 0\nbranch: null\npr: null\n---\nDo {id}.\n"
    )
}

#[test]
fn reads_tasks_specs_and_commits_changes_without_a_checkout() {
    let env = TestEnv::new();
    let r = env.repo("r");
    r.write("specs/a.md", "# A\n");
    r.write("specs/sub/b.md", "# B\n");
    r.write("specs/tasks/task-001.md", &task_text("task-001", "not-started"));
    r.write("specs/reviews/task-001.md", "review");
    env.git(&r.path, &["add", "-A"]);
    env.git(&r.path, &["commit", "-qm", "specs"]);

    let repo = Repo::open(&r.path).expect("open");
    let tip = repo.branch_tip("main").expect("tip").expect("exists");
    let st = repo.read_tree_state(&tip, "specs").expect("read");
    assert_eq!(st.tasks.len(), 1);
    assert_eq!(st.tasks[0].status, Status::NotStarted);
    let specs: Vec<_> = st.specs.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(specs, vec!["specs/a.md", "specs/sub/b.md"]);

    let mut t = st.tasks[0].clone();
    t.status = Status::InProgress;
    let mut ch = Changes::default();
    ch.put_task("specs/tasks", &t);
    let new = repo
        .commit_changes(&tip, &ch, "state\n\nTask-Ref: task-001\n")
        .expect("commit")
        .expect("non-empty");
    // Nothing moved yet: the commit exists but the branch is untouched.
    assert_eq!(
        repo.branch_tip("main").expect("tip").as_deref(),
        Some(tip.as_str())
    );
    let again = repo.read_tree_state(&new, "specs").expect("read new");
    assert_eq!(again.tasks[0].status, Status::InProgress);

    // Committing the same content again is a no-op: no empty commits.
    assert!(repo.commit_changes(&new, &ch, "again").expect("commit").is_none());
}

#[test]
fn publish_carries_the_users_checkout_and_keeps_their_changes() {
    let env = TestEnv::new();
    let r = env.repo("r");
    r.write("notes.txt", "committed\n");
    env.git(&r.path, &["add", "-A"]);
    env.git(&r.path, &["commit", "-qm", "notes"]);
    // The user has uncommitted work: a modified tracked file and an untracked file.
    r.write("notes.txt", "edited but not committed\n");
    r.write("scratch.txt", "untracked\n");

    let repo = Repo::open(&r.path).expect("open");
    let tip = repo.branch_tip("main").expect("tip").expect("exists");
    let mut ch = Changes::default();
    let t = Task::new("task-001", "T", "specs/a.md");
    ch.put_task("specs/tasks", &t);
    let new = repo
        .commit_changes(&tip, &ch, "state")
        .expect("commit")
        .expect("non-empty");
    assert_eq!(repo.publish("main", &tip, &new).expect("publish"), Publish::Moved);

    assert_eq!(env.git(&r.path, &["rev-parse", "HEAD"]), new);
    assert!(
        r.path.join("specs/tasks/task-001.md").exists(),
        "new file appears in the checkout"
    );
    assert_eq!(r.read("notes.txt"), "edited but not committed\n");
    assert_eq!(r.read("scratch.txt"), "untracked\n");
    let status = env.git(&r.path, &["status", "--porcelain"]);
    assert_eq!(
        status, "M notes.txt\n?? scratch.txt",
        "only the user's changes remain"
    );
}

#[test]
fn publish_detects_a_moved_branch() {
    let env = TestEnv::new();
    let r = env.repo("r");
    let repo = Repo::open(&r.path).expect("open");
    let tip = repo.branch_tip("main").expect("tip").expect("exists");
    let mut ch = Changes::default();
    ch.put("specs/tasks/x.md", "x");
    let ours = repo
        .commit_changes(&tip, &ch, "ours")
        .expect("commit")
        .expect("non-empty");
    // Someone else commits first.
    r.write("other.txt", "other\n");
    env.git(&r.path, &["add", "-A"]);
    env.git(&r.path, &["commit", "-qm", "other"]);
    let theirs = env.git(&r.path, &["rev-parse", "HEAD"]);
    assert_eq!(
        repo.publish("main", &tip, &ours).expect("publish"),
        Publish::Raced(theirs.clone())
    );
    assert_eq!(
        env.git(&r.path, &["rev-parse", "HEAD"]),
        theirs,
        "their commit is untouched"
    );
}

/// A merge commit replayed onto a branch that moved keeps its second parent: the task branch's
/// commits stay reachable after the branch is deleted.
#[test]
fn a_replayed_merge_commit_keeps_the_merged_branch() {
    let env = TestEnv::new();
    let r = env.repo("r");
    let repo = Repo::open(&r.path).expect("open");
    let base = repo.branch_tip("main").expect("tip").expect("exists");
    env.git(&r.path, &["checkout", "-q", "-b", "worker/task-001"]);
    r.write("feature.txt", "feature\n");
    env.git(&r.path, &["add", "-A"]);
    env.git(&r.path, &["commit", "-qm", "agent work"]);
    let work = env.git(&r.path, &["rev-parse", "HEAD"]);
    env.git(&r.path, &["checkout", "-q", "main"]);
    let tree = env.git(&r.path, &["rev-parse", "worker/task-001^{tree}"]);
    let merge = repo
        .commit_tree(
            &tree,
            &[base.as_str(), work.as_str()],
            "Merge worker/task-001\n\nTask-Ref: task-001\n",
        )
        .expect("merge commit");
    r.write("other.txt", "other\n");
    env.git(&r.path, &["add", "-A"]);
    env.git(&r.path, &["commit", "-qm", "someone else"]);
    let theirs = env.git(&r.path, &["rev-parse", "HEAD"]);

    let replayed = repo
        .replay(&merge, &base, &theirs)
        .expect("replay")
        .expect("no conflict");
    assert_eq!(
        env.git(&r.path, &["log", "-1", "--format=%P", &replayed]),
        format!("{theirs} {work}")
    );
    assert_eq!(
        env.git(&r.path, &["log", "-1", "--format=%B", &replayed]),
        "Merge worker/task-001\n\nTask-Ref: task-001"
    );
    let files = env.git(&r.path, &["ls-tree", "--name-only", &replayed]);
    assert!(
        files.contains("feature.txt") && files.contains("other.txt"),
        "{files}"
    );
}
