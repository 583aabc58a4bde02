//! `hyperloop init`: scaffolds a repository for hyperloop without overwriting anything.
