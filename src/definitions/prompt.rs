//! Composes the prompt a worker receives on standard input.
