//! The process pipeline as data: the four primitives (`role`, `gate`, `loop`, `action`), exact
//! positions (a path of indices into the nested steps), and the pure transitions a verdict causes.
//! No I/O here: everything is a function of the process and a position.

use serde::{Deserialize, Serialize};

/// One step of a process pipeline (CONTRACT §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run a worker with the agent of this name.
    Role {
        name: String,
        on_pass: Option<String>,
        on_fail: Option<String>,
    },
    /// Wait for an external signal (local: `hyperloop approve`; GitHub: a label).
    Gate { name: String },
    /// Steps retried from the top when one of them fails.
    Loop { steps: Vec<Step> },
    /// An operation hyperloop performs itself (`merge-pr`, `mark-pr-ready`).
    Action { action: PipelineAction },
}

impl Step {
    /// Whether this is the step that merges a task's work (`action: merge-pr`).
    pub fn is_merge(&self) -> bool {
        matches!(
            self,
            Step::Action {
                action: PipelineAction::MergePr
            }
        )
    }
}

/// The actions hyperloop knows how to perform, as a pipeline names them.
pub const KNOWN_ACTIONS: &[&str] = &[MERGE_PR, MARK_PR_READY];

/// An operation hyperloop performs itself. A pipeline naming any other is refused when the
/// process is loaded, so the step never meets an action it cannot perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PipelineAction {
    /// Merge the task's work into the base branch (GitHub: merge its pull request).
    MergePr,
    /// Take the task's pull request out of draft (nothing to do locally).
    MarkPrReady,
}

impl PipelineAction {
    pub const ALL: [PipelineAction; 2] = [PipelineAction::MergePr, PipelineAction::MarkPrReady];

    /// The name a pipeline uses.
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineAction::MergePr => MERGE_PR,
            PipelineAction::MarkPrReady => MARK_PR_READY,
        }
    }

    /// The action a pipeline names; `None` for a name hyperloop does not know.
    pub fn parse(name: &str) -> Option<PipelineAction> {
        PipelineAction::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

impl std::fmt::Display for PipelineAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A path of indices from the pipeline's top level down to a leaf (a role, gate or action).
/// `[1]` is the second top-level step; `[0, 2]` the third step inside the first (loop) step.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Position(pub Vec<usize>);

impl Position {
    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[")?;
        for (i, idx) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{idx}")?;
        }
        f.write_str("]")
    }
}

/// The action that merges a task's work into the base branch.
pub const MERGE_PR: &str = "merge-pr";
/// The action that takes a task's pull request out of draft.
pub const MARK_PR_READY: &str = "mark-pr-ready";
/// The role that resolves merge conflicts; it runs outside the pipeline, at the merge action.
pub const REBASE_RESOLVER: &str = "rebase-resolver";

/// What a worker reported (CONTRACT §4). Only `pass` moves a task forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    Error,
    Timeout,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [Verdict::Pass, Verdict::Fail, Verdict::Error, Verdict::Timeout];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Error => "error",
            Verdict::Timeout => "timeout",
        }
    }

    pub fn parse(s: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_pass(self) -> bool {
        self == Verdict::Pass
    }

    pub fn outcome(self) -> Outcome {
        if self.is_pass() {
            Outcome::Pass
        } else {
            Outcome::NotPass
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a step ended, as far as the pipeline cares: a cleared gate and a performed action count
/// as a pass; `fail`, `error` and `timeout` are all the same non-pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    NotPass,
}

/// Where a task goes after the step at its position ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Forward: the next leaf after a pass, or the target of an `on_pass` jump.
    Moved(Position),
    /// Back: the first leaf of the innermost enclosing loop, or the target of an `on_fail` jump.
    LoopedBack(Position),
    /// The last step passed.
    Complete,
    /// A non-pass with nowhere to go back to.
    Failed { reason: String },
}

/// The human-readable name of a step: what 0.9.2 stored as `phase`.
pub fn phase_name(step: &Step) -> String {
    match step {
        Step::Role { name, .. } | Step::Gate { name } => name.clone(),
        Step::Action { action } => action.as_str().to_string(),
        Step::Loop { .. } => "loop".to_string(),
    }
}

/// The list of steps that `prefix` (a path of loop indices) points into.
fn list_at<'a>(steps: &'a [Step], prefix: &[usize]) -> Option<&'a [Step]> {
    let mut list = steps;
    for &i in prefix {
        match list.get(i)? {
            Step::Loop { steps } => list = steps,
            _ => return None,
        }
    }
    Some(list)
}

/// The step (leaf or loop) at `path`.
fn node_at<'a>(steps: &'a [Step], path: &[usize]) -> Option<&'a Step> {
    let (last, prefix) = path.split_last()?;
    list_at(steps, prefix)?.get(*last)
}

/// Relative path of the first leaf in `list` at or after index `start`, descending into loops and
/// skipping empty ones (the definitions reject them, but a walker that trusted that could loop).
fn first_leaf_from(list: &[Step], start: usize) -> Option<Vec<usize>> {
    for (i, step) in list.iter().enumerate().skip(start) {
        match step {
            Step::Loop { steps } => {
                if let Some(rest) = first_leaf_from(steps, 0) {
                    let mut path = Vec::with_capacity(rest.len() + 1);
                    path.push(i);
                    path.extend(rest);
                    return Some(path);
                }
            }
            _ => return Some(vec![i]),
        }
    }
    None
}

fn join(prefix: &[usize], rest: impl IntoIterator<Item = usize>) -> Position {
    let mut path = prefix.to_vec();
    path.extend(rest);
    Position(path)
}

/// The first leaf of the pipeline, descending into loops; `None` when it has no leaf at all.
pub fn first_leaf(steps: &[Step]) -> Option<Position> {
    first_leaf_from(steps, 0).map(Position)
}

/// The leaf (role, gate or action) at `position`; `None` when the position points at a loop or
/// outside the pipeline.
pub fn step_at<'a>(steps: &'a [Step], position: &Position) -> Option<&'a Step> {
    node_at(steps, &position.0).filter(|s| !matches!(s, Step::Loop { .. }))
}

/// A stored path, accepted only when it still names a leaf of this pipeline.
pub fn validate_position(steps: &[Step], path: &[usize]) -> Option<Position> {
    let position = Position(path.to_vec());
    step_at(steps, &position).map(|_| position)
}

/// Every leaf position, in walking order.
pub fn leaves(steps: &[Step]) -> Vec<Position> {
    fn walk(list: &[Step], prefix: &mut Vec<usize>, out: &mut Vec<Position>) {
        for (i, step) in list.iter().enumerate() {
            prefix.push(i);
            match step {
                Step::Loop { steps } => walk(steps, prefix, out),
                _ => out.push(Position(prefix.clone())),
            }
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(steps, &mut Vec::new(), &mut out);
    out
}

/// How many leaves the pipeline has: the number of passes an uneventful task takes.
pub fn leaf_count(steps: &[Step]) -> usize {
    leaves(steps).len()
}

/// Every leaf whose phase name is `name`, in walking order.
pub fn positions_named(steps: &[Step], name: &str) -> Vec<Position> {
    leaves(steps)
        .into_iter()
        .filter(|p| step_at(steps, p).is_some_and(|s| phase_name(s) == name))
        .collect()
}

/// Index of the role called `name` in `list` (the first one, when a list repeats a role).
fn sibling_role(list: &[Step], name: &str) -> Option<usize> {
    list.iter()
        .position(|s| matches!(s, Step::Role { name: n, .. } if n == name))
}

/// Where a task goes when the step at `position` ends with `outcome`.
///
/// A pass moves to the next leaf, leaving every loop whose last child passed; past the end the
/// pipeline is complete. A non-pass restarts the innermost enclosing loop at its first leaf, and
/// fails the task when no loop encloses the step. A role's `on_pass`/`on_fail` names a role in
/// the same list of steps; when no such role exists the default applies.
pub fn advance(steps: &[Step], position: &Position, outcome: Outcome) -> Transition {
    let Some(leaf) = step_at(steps, position) else {
        return Transition::Failed {
            reason: format!("position {position} is not a step of the pipeline"),
        };
    };
    let Some((_, parent)) = position.0.split_last() else {
        return Transition::Failed {
            reason: "empty position".to_string(),
        };
    };
    if let Step::Role { on_pass, on_fail, .. } = leaf {
        let jump = match outcome {
            Outcome::Pass => on_pass,
            Outcome::NotPass => on_fail,
        };
        let target = jump
            .as_deref()
            .and_then(|name| sibling_role(list_at(steps, parent)?, name));
        if let Some(j) = target {
            let to = join(parent, [j]);
            return match outcome {
                Outcome::Pass => Transition::Moved(to),
                Outcome::NotPass => Transition::LoopedBack(to),
            };
        }
    }
    match outcome {
        Outcome::Pass => next_after(steps, &position.0),
        Outcome::NotPass => match enclosing_loop_start(steps, &position.0) {
            Some(to) => Transition::LoopedBack(to),
            None => Transition::Failed {
                reason: format!(
                    "{} at {position} did not pass and no loop encloses it",
                    phase_name(leaf)
                ),
            },
        },
    }
}

/// The leaf after `path`, climbing out of loops whose last child it was.
fn next_after(steps: &[Step], path: &[usize]) -> Transition {
    let mut prefix = path.to_vec();
    while let Some(last) = prefix.pop() {
        let Some(list) = list_at(steps, &prefix) else {
            break;
        };
        if let Some(rest) = first_leaf_from(list, last + 1) {
            return Transition::Moved(join(&prefix, rest));
        }
    }
    Transition::Complete
}

/// The first leaf of the innermost loop enclosing `path`. Every step that contains others is a
/// loop, so that loop is the one holding the leaf's own list.
pub fn enclosing_loop_start(steps: &[Step], path: &[usize]) -> Option<Position> {
    for depth in (1..path.len()).rev() {
        let prefix = &path[..depth];
        if let Some(Step::Loop { steps: inner }) = node_at(steps, prefix)
            && let Some(rest) = first_leaf_from(inner, 0)
        {
            return Some(join(prefix, rest));
        }
    }
    None
}

/// Where a task goes back to when the step at `position` cannot go on and is not itself a
/// verdict: the innermost enclosing loop, or else the nearest loop before it (for `merge-pr`
/// after the implementation loop, that loop). `None` when the pipeline has no such loop.
pub fn retry_start(steps: &[Step], position: &Position) -> Option<Position> {
    let path = &position.0;
    if let Some(p) = enclosing_loop_start(steps, path) {
        return Some(p);
    }
    for depth in (0..path.len()).rev() {
        let prefix = &path[..depth];
        let list = list_at(steps, prefix)?;
        let here = path[depth].min(list.len());
        for j in (0..here).rev() {
            if let Step::Loop { steps: inner } = &list[j]
                && let Some(rest) = first_leaf_from(inner, 0)
            {
                return Some(join(prefix, std::iter::once(j).chain(rest)));
            }
        }
    }
    None
}

/// Step builders shared by the unit tests of the pipeline and the cycle.
#[cfg(test)]
pub(crate) mod build {
    use super::{PipelineAction, Step};
    use proptest::prelude::*;

    pub fn role(name: &str) -> Step {
        Step::Role {
            name: name.into(),
            on_pass: None,
            on_fail: None,
        }
    }

    pub fn role_jumps(name: &str, on_pass: Option<&str>, on_fail: Option<&str>) -> Step {
        Step::Role {
            name: name.into(),
            on_pass: on_pass.map(Into::into),
            on_fail: on_fail.map(Into::into),
        }
    }

    pub fn gate(name: &str) -> Step {
        Step::Gate { name: name.into() }
    }

    pub fn action(name: &str) -> Step {
        Step::Action {
            action: PipelineAction::parse(name).expect("a known action"),
        }
    }

    pub fn lp(steps: Vec<Step>) -> Step {
        Step::Loop { steps }
    }

    /// `loop(implementer, verifier)`, then `merge-pr`: the built-in default process.
    pub fn default_pipeline() -> Vec<Step> {
        vec![
            lp(vec![role("implementer"), role("verifier")]),
            action("merge-pr"),
        ]
    }

    /// Random pipelines: nesting depth at most four, lists never empty. `jumps` adds `on_pass`
    /// and `on_fail` names, some of which match a role.
    pub fn arb_pipeline(jumps: bool) -> impl Strategy<Value = Vec<Step>> {
        let names = prop::sample::select(vec!["a", "b", "c", "d"]);
        let jump = (prop::bool::weighted(0.3), names.clone())
            .prop_map(move |(on, name)| (jumps && on).then_some(name));
        let leaf = prop_oneof![
            4 => (names, jump.clone(), jump).prop_map(|(n, p, f)| role_jumps(n, p, f)),
            1 => prop::sample::select(vec!["review", "lgtm"]).prop_map(gate),
            1 => prop::sample::select(vec!["merge-pr", "mark-pr-ready"]).prop_map(action),
        ];
        let step = leaf.prop_recursive(3, 24, 4, |inner| prop::collection::vec(inner, 1..4).prop_map(lp));
        prop::collection::vec(step, 1..5)
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use proptest::prelude::*;

    fn pos(p: &[usize]) -> Position {
        Position(p.to_vec())
    }

    fn moved(p: &[usize]) -> Transition {
        Transition::Moved(pos(p))
    }

    fn back(p: &[usize]) -> Transition {
        Transition::LoopedBack(pos(p))
    }

    #[test]
    fn known_actions_are_the_typed_ones() {
        let names: Vec<&str> = PipelineAction::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(names, KNOWN_ACTIONS);
        for a in PipelineAction::ALL {
            assert_eq!(PipelineAction::parse(a.as_str()), Some(a));
        }
        assert_eq!(PipelineAction::parse("deploy"), None);
        assert!(build::action(MERGE_PR).is_merge());
        assert!(!build::action(MARK_PR_READY).is_merge());
    }

    #[test]
    fn walker_basics() {
        let p = vec![
            lp(vec![lp(vec![role("a")]), role("b")]),
            gate("g"),
            action("merge-pr"),
        ];
        assert_eq!(first_leaf(&p), Some(pos(&[0, 0, 0])));
        assert_eq!(leaf_count(&p), 4);
        assert_eq!(
            leaves(&p),
            vec![pos(&[0, 0, 0]), pos(&[0, 1]), pos(&[1]), pos(&[2])]
        );
        assert_eq!(step_at(&p, &pos(&[0])), None, "a loop is not a leaf");
        assert_eq!(step_at(&p, &pos(&[])), None);
        assert_eq!(step_at(&p, &pos(&[3])), None);
        assert_eq!(step_at(&p, &pos(&[1, 0])), None, "a gate has no children");
        assert_eq!(step_at(&p, &pos(&[1])), Some(&gate("g")));
        assert_eq!(validate_position(&p, &[0, 1]), Some(pos(&[0, 1])));
        assert_eq!(validate_position(&p, &[0, 2]), None);
        assert_eq!(phase_name(&role("a")), "a");
        assert_eq!(phase_name(&gate("g")), "g");
        assert_eq!(phase_name(&action("merge-pr")), "merge-pr");
        assert_eq!(first_leaf(&[]), None);
        assert_eq!(first_leaf(&[lp(vec![]), role("x")]), Some(pos(&[1])));
        assert_eq!(pos(&[0, 2]).to_string(), "[0, 2]");
    }

    #[test]
    fn verdicts() {
        for v in Verdict::ALL {
            assert_eq!(Verdict::parse(v.as_str()), Some(v));
            assert_eq!(
                serde_json::to_string(&v).ok(),
                Some(format!("\"{}\"", v.as_str()))
            );
        }
        assert!(Verdict::Pass.is_pass());
        assert!(!Verdict::Timeout.is_pass());
        assert_eq!(Verdict::Error.outcome(), Outcome::NotPass);
        assert_eq!(Verdict::parse("PASS"), None);
    }

    #[test]
    fn advance_table() {
        use Outcome::{NotPass as F, Pass as P};
        let default = default_pipeline();
        let nested = vec![
            role("plan"),
            lp(vec![
                role("implementer"),
                lp(vec![role("tester"), role("fixer")]),
                role("verifier"),
            ]),
            gate("review"),
            action("merge-pr"),
        ];
        let jumps = vec![lp(vec![
            role("implementer"),
            role_jumps("verifier", Some("docs"), Some("fixer")),
            role("fixer"),
            role("docs"),
        ])];
        let dangling = vec![lp(vec![
            role("a"),
            role_jumps("b", Some("nowhere"), Some("plan")),
        ])];
        // `plan` exists, but not in the same list as `b`: the jump does not apply.
        let other_level = vec![
            role("plan"),
            lp(vec![role("a"), role_jumps("b", None, Some("plan"))]),
        ];
        let twice = vec![
            lp(vec![role("implementer"), role("verifier")]),
            lp(vec![role("docs"), role("verifier")]),
        ];
        type Case<'a> = (&'a str, &'a [Step], &'a [usize], Outcome, Transition);
        let cases: Vec<Case> = vec![
            (
                "default: implementer passes",
                &default,
                &[0, 0],
                P,
                moved(&[0, 1]),
            ),
            (
                "default: verifier passes, leaves loop",
                &default,
                &[0, 1],
                P,
                moved(&[1]),
            ),
            ("default: verifier fails", &default, &[0, 1], F, back(&[0, 0])),
            ("default: merge done", &default, &[1], P, Transition::Complete),
            (
                "nested: plan passes into two loops",
                &nested,
                &[0],
                P,
                moved(&[1, 0]),
            ),
            (
                "nested: inner fail restarts inner only",
                &nested,
                &[1, 1, 1],
                F,
                back(&[1, 1, 0]),
            ),
            (
                "nested: inner last pass leaves inner",
                &nested,
                &[1, 1, 1],
                P,
                moved(&[1, 2]),
            ),
            (
                "nested: outer fail restarts outer",
                &nested,
                &[1, 2],
                F,
                back(&[1, 0]),
            ),
            (
                "nested: outer last pass reaches gate",
                &nested,
                &[1, 2],
                P,
                moved(&[2]),
            ),
            ("nested: gate cleared", &nested, &[2], P, moved(&[3])),
            ("jumps: on_pass skips fixer", &jumps, &[0, 1], P, moved(&[0, 3])),
            ("jumps: on_fail goes to fixer", &jumps, &[0, 1], F, back(&[0, 2])),
            ("jumps: fixer falls through", &jumps, &[0, 2], P, moved(&[0, 3])),
            ("jumps: docs last pass", &jumps, &[0, 3], P, Transition::Complete),
            (
                "dangling on_pass: default",
                &dangling,
                &[0, 1],
                P,
                Transition::Complete,
            ),
            ("dangling on_fail: default", &dangling, &[0, 1], F, back(&[0, 0])),
            ("other level: default", &other_level, &[1, 1], F, back(&[1, 0])),
            ("twice: first verifier", &twice, &[0, 1], P, moved(&[1, 0])),
            ("twice: second verifier fails", &twice, &[1, 1], F, back(&[1, 0])),
            (
                "twice: second verifier passes",
                &twice,
                &[1, 1],
                P,
                Transition::Complete,
            ),
        ];
        for (name, steps, at, outcome, want) in cases {
            assert_eq!(advance(steps, &pos(at), outcome), want, "{name}");
        }
    }

    #[test]
    fn advance_without_loop_fails() {
        let p = vec![role("implementer"), action("merge-pr")];
        match advance(&p, &pos(&[0]), Outcome::NotPass) {
            Transition::Failed { reason } => {
                assert!(reason.contains("implementer"), "{reason}");
            }
            other => panic!("expected failure, got {other:?}"),
        }
        // A top-level on_fail is a way back even without a loop.
        let p = vec![role("a"), role_jumps("b", None, Some("a"))];
        assert_eq!(advance(&p, &pos(&[1]), Outcome::NotPass), back(&[0]));
        // A position that does not exist never panics.
        assert!(matches!(
            advance(&p, &pos(&[7, 1]), Outcome::Pass),
            Transition::Failed { .. }
        ));
    }

    #[test]
    fn retry_start_table() {
        let cases: Vec<(Vec<Step>, &[usize], Option<Position>)> = vec![
            (default_pipeline(), &[1], Some(pos(&[0, 0]))),
            (
                vec![
                    lp(vec![role("a")]),
                    lp(vec![role("b")]),
                    gate("g"),
                    action("merge-pr"),
                ],
                &[3],
                Some(pos(&[1, 0])),
            ),
            (
                vec![lp(vec![role("a"), action("merge-pr")])],
                &[0, 1],
                Some(pos(&[0, 0])),
            ),
            (vec![role("a"), action("merge-pr")], &[1], None),
            (vec![action("merge-pr"), lp(vec![role("a")])], &[0], None),
        ];
        for (steps, at, want) in cases {
            assert_eq!(retry_start(&steps, &pos(at)), want, "{steps:?} at {at:?}");
        }
    }

    #[test]
    fn positions_by_name() {
        let p = vec![
            lp(vec![role("implementer"), role("verifier")]),
            lp(vec![role("docs"), role("verifier")]),
            action("merge-pr"),
        ];
        assert_eq!(positions_named(&p, "verifier"), vec![pos(&[0, 1]), pos(&[1, 1])]);
        assert_eq!(positions_named(&p, "merge-pr"), vec![pos(&[2])]);
        assert!(positions_named(&p, "loop").is_empty());
    }

    proptest! {
        #[test]
        fn all_pass_completes_after_every_leaf(steps in arb_pipeline(false)) {
            let mut at = first_leaf(&steps).expect("non-empty lists have a leaf");
            let mut visited = vec![at.clone()];
            loop {
                match advance(&steps, &at, Outcome::Pass) {
                    Transition::Moved(next) => {
                        prop_assert!(step_at(&steps, &next).is_some());
                        visited.push(next.clone());
                        at = next;
                    }
                    Transition::Complete => break,
                    other => prop_assert!(false, "pass gave {:?}", other),
                }
                prop_assert!(visited.len() <= leaf_count(&steps));
            }
            prop_assert_eq!(visited, leaves(&steps));
        }

        #[test]
        fn transitions_land_on_leaves(
            steps in arb_pipeline(true),
            outcomes in prop::collection::vec(any::<bool>(), 0..60),
        ) {
            let mut at = first_leaf(&steps).expect("non-empty lists have a leaf");
            for pass in outcomes {
                let outcome = if pass { Outcome::Pass } else { Outcome::NotPass };
                match advance(&steps, &at, outcome) {
                    Transition::Moved(next) => {
                        prop_assert!(pass);
                        at = next;
                    }
                    Transition::LoopedBack(next) => {
                        prop_assert!(!pass);
                        at = next;
                    }
                    Transition::Complete => {
                        prop_assert!(pass);
                        at = first_leaf(&steps).expect("leaf");
                    }
                    Transition::Failed { .. } => {
                        prop_assert!(!pass);
                        prop_assert!(at.0.len() == 1, "a step inside a loop cannot fail the task");
                        at = first_leaf(&steps).expect("leaf");
                    }
                }
                prop_assert!(step_at(&steps, &at).is_some());
                if let Some(r) = retry_start(&steps, &at) {
                    prop_assert!(step_at(&steps, &r).is_some());
                }
            }
        }

        #[test]
        fn arbitrary_paths_never_panic(
            steps in arb_pipeline(true),
            path in prop::collection::vec(0usize..6, 0..6),
        ) {
            let p = Position(path.clone());
            let valid = validate_position(&steps, &path);
            prop_assert_eq!(valid.is_some(), step_at(&steps, &p).is_some());
            prop_assert_eq!(valid.is_some(), leaves(&steps).contains(&p));
            let _ = advance(&steps, &p, Outcome::Pass);
            let _ = advance(&steps, &p, Outcome::NotPass);
            let _ = retry_start(&steps, &p);
        }
    }
}
