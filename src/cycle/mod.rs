//! One orchestrator cycle: gather a snapshot, decide (pure), execute.
//! [`transition`] moves single tasks through their pipeline; [`decide`] turns a snapshot into a
//! [`plan::Plan`] of actions for the executor.

pub mod decide;
pub mod execute;
pub mod plan;
pub mod transition;
