//! `hyperloop init`: scaffolds a repository for hyperloop without overwriting anything.

use std::path::Path;

use crate::error::{Error, Result};

/// What `init` wrote and what it left alone.
#[derive(Debug, Default)]
pub struct InitReport {
    pub written: Vec<String>,
    pub skipped: Vec<String>,
}

impl std::fmt::Display for InitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for w in &self.written {
            writeln!(f, "wrote {w}")?;
        }
        for s in &self.skipped {
            writeln!(f, "kept existing {s}")?;
        }
        Ok(())
    }
}

pub fn init(_repo: &Path) -> Result<InitReport> {
    Err(Error::NotAvailable { what: "init".into() })
}
