//! The integration tests: one binary, a module per area.

mod harness;
mod support;

mod claude_cli;
mod worker;
