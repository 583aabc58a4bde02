//! The pure scheduler: given a snapshot of the repository's state, the plan for this cycle.
