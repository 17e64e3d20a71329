//! Taking a git directory across threads and processes, and clearing what a dead
//! holder left.

use std::fs;
use std::path::{Path, PathBuf};

use super::{GitError, io_err};

/// An exclusive hold on a git directory, across threads and processes: an `flock` on a
/// file beside it, which the kernel drops when its holder dies. So whoever holds it knows
/// no live process is writing there, and removes the `.lock` files a dead one left (a
/// crash mid-update), which would otherwise fail every later operation.
pub(super) struct DirLock {
    _file: fs::File,
}

impl DirLock {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(120);

    pub(super) fn acquire(dir: &Path) -> Result<DirLock, GitError> {
        let path = PathBuf::from(format!("{}.flock", dir.display()));
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("cannot open", &path))?;
        let deadline = std::time::Instant::now() + Self::WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => return Err(GitError::Busy(Self::WAIT.as_secs())),
                Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &path)(e)),
            }
        }
        remove_stale_locks(dir);
        Ok(DirLock { _file: file })
    }
}

/// Removes the `.lock` files libgit2 leaves when its process dies mid-update: the
/// repository's own (HEAD, index, config, packed-refs, …) and every ref's.
fn remove_stale_locks(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(here) = stack.pop() {
        let Ok(entries) = fs::read_dir(&here) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            let at_top = here == dir;
            if kind.is_dir() && (path.starts_with(dir.join("refs")) || (at_top && entry.file_name() == "refs")) {
                stack.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "lock") {
                tracing::warn!(path = %path.display(), "removing a git lock file a dead process left");
                let _ = fs::remove_file(&path);
            }
        }
    }
}
