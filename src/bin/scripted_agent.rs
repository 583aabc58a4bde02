//! A scripted stand-in for an AI coding agent.
fn main() {}
