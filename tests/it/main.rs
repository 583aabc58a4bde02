//! The integration tests: one binary, a module per area.

mod action;
mod claude_cli;
mod concurrency;
mod config;
mod dashboard;
mod definitions;
mod events;
mod fake_github;
mod fanout;
mod fanout_action;
mod faults;
pub mod github;
mod github_budget;
mod github_checks;
mod github_mode;
mod harness;
mod hostile;
mod init;
pub mod local;
mod matrix;
mod operate;
mod prompts;
mod state;
mod support;
mod trusted_gates;
mod worker;
