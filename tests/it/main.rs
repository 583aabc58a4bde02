//! The integration tests: one binary, a module per area.

mod config;
mod definitions;
mod harness;
mod init;
mod prompts;
mod state;
