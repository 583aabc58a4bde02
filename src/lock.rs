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
            let written: u32 = holder
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            // The file's content is only what the last step wrote; the kernel knows who holds
            // the lock. Anything can take an flock on the file (an agent's detached leftover):
            // that must be said, or every later step would be skipped in silence.
            if let Some(pid) = kernel_holder(&file)
                && let Some(command) = foreign_command(pid)
            {
                return Err(Error::ForeignLock {
                    path: path.to_path_buf(),
                    pid,
                    command,
                });
            }
            return Err(Error::Busy {
                path: path.to_path_buf(),
                pid: written,
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

/// The pid holding an flock on `file`, from `/proc/locks` (Linux), matched by device and inode.
fn kernel_holder(file: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // `1: FLOCK  ADVISORY  WRITE 12345 08:01:123456 0 EOF`
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid: u32 = f.get(4)?.parse().ok()?;
        let mut id = f.get(5)?.split(':');
        let maj = u32::from_str_radix(id.next()?, 16).ok()?;
        let min = u32::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        (maj == major && min == minor && inode == ino).then_some(pid)
    })
}

/// The command line of `pid` when it is not a hyperloop process, `None` when it is one (or is
/// gone). A hyperloop step is recognised by its executable's name.
fn foreign_command(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let program = args.first()?;
    let name = Path::new(program).file_name()?.to_string_lossy();
    if pid == std::process::id() || name == "hyperloop" || name.starts_with("hyperloop-") {
        return None;
    }
    Some(args.join(" "))
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
