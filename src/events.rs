//! Structured events on standard error (CONTRACT §7).
