//! One step at a time per repository on one machine. The lock is an `flock` on a file in the git
//! directory: the kernel releases it when the holder dies, however it dies, so a stale lock can
//! never block the next step. The file also names the holder (pid and start time) for messages.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A held lock; released on drop.
#[derive(Debug)]
pub struct StepLock {
    file: File,
    path: PathBuf,
}

impl StepLock {
    /// Takes the lock at `path`, or reports who holds it.
    pub fn acquire(path: &Path) -> Result<StepLock> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let pid = holder
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            return Err(Error::Busy {
                path: path.to_path_buf(),
                pid,
            });
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{} {}", std::process::id(), crate::events::now_unix());
        Ok(StepLock {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StepLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        // SAFETY: as above; unlocking a descriptor we own.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("lock");
        let first = StepLock::acquire(&p).expect("first");
        match StepLock::acquire(&p) {
            Err(Error::Busy { pid, .. }) => assert_eq!(pid, std::process::id()),
            other => panic!("expected Busy, got {other:?}"),
        }
        drop(first);
        StepLock::acquire(&p).expect("free again");
    }
}
