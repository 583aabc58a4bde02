//! hyperloop: walks software tasks through composable process pipelines using AI coding agents.
//! Each `step` reads all state from the repository, decides, executes, commits, and exits.

pub mod action;
pub mod app;
pub mod cli;
pub mod commands;
pub mod committed;
pub mod config;
pub mod cycle;
pub mod definitions;
pub mod error;
pub mod events;
pub mod fault;
pub mod forge;
pub mod git;
pub mod init;
pub mod lock;
pub mod logs;
pub mod notify;
pub mod pipeline;
pub mod preflight;
pub mod redact;
pub mod secrets;
pub mod state;
pub mod target;
pub mod task;
pub mod transcripts;
pub mod transport;
pub mod worker;
pub mod yaml;

pub use error::{Error, Result};
