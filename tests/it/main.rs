//! The integration tests: one binary, a module per area.

mod definitions;
mod harness;
mod prompts;
mod state;
