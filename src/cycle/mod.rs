//! One orchestrator cycle: gather a snapshot, decide (pure), execute.

pub mod decide;
