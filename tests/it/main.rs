//! The integration tests: one binary, a module per area.

mod fake_github;
mod github;
mod harness;
