//! Shared set-up for tests that run workers: a repository with a task worktree, a worker spec
//! for the scripted agent, and checks on processes.

#![allow(dead_code)]

pub mod worker_fixture;
