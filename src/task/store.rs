//! Finding, reading and writing task files.
