//! One walk over a workspace's work tree: hands it to the agent's user before a run and
//! back after it, and, after a run, takes out what the daemon's git must never be made to
//! open. Never follows a link: entries are examined with `lstat`, owners changed with
//! `lchown`, and anything removed is removed as the entry itself.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Entries whose path inside the workspace is longer than this are removed after a run:
/// beyond it, paths no longer fit the kernel's limit once joined to the workspace's own.
pub const MAX_PATH_BYTES: usize = 3000;
/// Entries nested deeper than this are removed after a run: libgit2 refuses to walk
/// a tree deeper than 100 directories, which would fail every save from then on.
pub const MAX_DEPTH: usize = 90;

/// Files larger than this are removed after a run, not committed: git reads a file whole
/// when attributes filter it and pushes each object whole, so one sparse 20 GB file would
/// exhaust the daemon (forges refuse files over 100 MB anyway).
pub const MAX_FILE_BYTES: u64 = 100 * 1024 * 1024;
/// Git's own settings files larger than this are removed after a run.
const MAX_CONTROL_BYTES: u64 = 1024 * 1024;

/// Files git reads for its own settings wherever they are in the tree; as links they
/// would make the daemon read whatever they point at.
const GIT_CONTROL_FILES: [&str; 3] = [".gitignore", ".gitattributes", ".gitmodules"];

/// What a walk removed, for the run's notes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The first few paths removed, with why.
    pub examples: Vec<String>,
    pub count: usize,
}

impl Removed {
    fn add(&mut self, rel: &Path, why: &str) {
        self.count += 1;
        if self.examples.len() < 5 {
            let shown: String = crate::untrusted::prefix(&rel.display().to_string(), 200).to_owned();
            self.examples
                .push(format!("{} ({why})", crate::untrusted::clean(&shown)));
        }
    }

    /// One sentence for the run's notes, if anything was removed.
    pub fn note(&self) -> Option<String> {
        (self.count > 0).then(|| {
            format!(
                "removed {} entr{} the daemon's git must not open, before saving: {}{}",
                self.count,
                if self.count == 1 { "y" } else { "ies" },
                self.examples.join(", "),
                if self.count > self.examples.len() { ", …" } else { "" }
            )
        })
    }
}

/// What to do on the walk.
#[derive(Debug, Clone, Copy)]
pub struct Walk {
    /// Change every entry's owner to this uid:gid (links themselves, never targets).
    pub owner: Option<(u32, u32)>,
    /// Remove what an agent may have left to steer the daemon's git: special files,
    /// nested `.git` entries, git control files that are not regular files, paths too
    /// long to handle. The workspace's own `.git` (the agent's) is left to the caller.
    pub scrub: bool,
}

pub fn walk(root: &Path, how: Walk) -> std::io::Result<Removed> {
    let mut removed = Removed::default();
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let is_root = rel.as_os_str().is_empty();
        if how.scrub
            && !is_root
            && let Some(why) = unwanted(root, &rel, &meta)
        {
            remove(&path, &meta)?;
            removed.add(&rel, why);
            continue;
        }
        if let Some((uid, gid)) = how.owner
            && (meta.uid(), meta.gid()) != (uid, gid)
        {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        }
        if meta.is_dir() {
            let entries = match fs::read_dir(&path) {
                // An agent of the daemon's own uid may have taken its own rights away.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    use std::os::unix::fs::PermissionsExt;
                    fs::set_permissions(&path, fs::Permissions::from_mode(meta.permissions().mode() | 0o700))?;
                    fs::read_dir(&path)?
                }
                other => other?,
            };
            for entry in entries {
                stack.push(rel.join(entry?.file_name()));
            }
        }
    }
    Ok(removed)
}

/// Makes `owner` the owner of every entry of a work tree, links themselves and never
/// their targets (handing it to an agent's user, or taking it back).
/// Whether what is under `root` takes more than `cap` bytes of disk (allocated blocks:
/// a sparse file counts for what it uses), or more than a million entries. Links are
/// never followed; the walk stops as soon as the answer is yes.
pub fn over(root: &Path, cap: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    const MAX_ENTRIES: u64 = 1_000_000;
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = fs::symlink_metadata(entry.path())?;
            bytes = bytes.saturating_add(meta.blocks().saturating_mul(512));
            entries += 1;
            if bytes > cap || entries > MAX_ENTRIES {
                return Ok(true);
            }
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(false)
}

pub fn hand_over(root: &Path, owner: (u32, u32)) -> std::io::Result<()> {
    walk(
        root,
        Walk {
            owner: Some(owner),
            scrub: false,
        },
    )
    .map(drop)
}

/// Removes a directory tree, first giving back the rights to every directory in it that
/// an agent of the daemon's own uid may have taken away (`chmod 000`).
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            use std::os::unix::fs::PermissionsExt;
            let mut stack = vec![path.to_path_buf()];
            while let Some(dir) = stack.pop() {
                let meta = fs::symlink_metadata(&dir)?;
                if !meta.is_dir() {
                    continue;
                }
                fs::set_permissions(&dir, fs::Permissions::from_mode(meta.permissions().mode() | 0o700))?;
                for entry in fs::read_dir(&dir)? {
                    stack.push(entry?.path());
                }
            }
            fs::remove_dir_all(path)
        }
        other => other,
    }
}

fn unwanted(root: &Path, rel: &Path, meta: &fs::Metadata) -> Option<&'static str> {
    let kind = meta.file_type();
    let name = rel.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let top_level = rel.components().count() == 1;
    if rel.as_os_str().len() > MAX_PATH_BYTES || rel.components().count() > MAX_DEPTH {
        Some("nested too deep or path too long for git")
    } else if name == ".git" && !top_level {
        Some("a nested repository's git directory")
    } else if name != ".git" && names_git_dir(&name) {
        Some("a name git refuses (it could stand for .git)")
    } else if kind.is_fifo() || kind.is_socket() || kind.is_block_device() || kind.is_char_device() {
        Some("not a file, directory or link")
    } else if GIT_CONTROL_FILES.contains(&name.as_ref()) && !kind.is_file() {
        Some("git settings that are not a regular file")
    } else if GIT_CONTROL_FILES.contains(&name.as_ref()) && meta.len() > MAX_CONTROL_BYTES {
        Some("git settings larger than 1 MB")
    } else if kind.is_file() && meta.len() > MAX_FILE_BYTES {
        Some("a file larger than 100 MB")
    } else if name == ".gitmodules" && includes_other_files(&root.join(rel)) {
        Some("submodule settings that include other files")
    } else {
        None
    }
}

/// Whether git (with `core.protectNTFS`, its default) refuses a name for standing for
/// `.git` on another file system: `.git` in any case, `git~1`, with trailing dots or
/// spaces, or an NTFS stream (`:`), or any backslash.
fn names_git_dir(name: &str) -> bool {
    if name.contains('\\') {
        return true;
    }
    let lower = name.to_ascii_lowercase();
    let stem = lower.split(':').next().unwrap_or("").trim_end_matches(['.', ' ']);
    stem == ".git" || stem == "git~1"
}

/// Whether a `.gitmodules` file has `[include]` or `[includeIf]` sections, which libgit2
/// obeys when it reads submodule settings (and which could name any host path).
fn includes_other_files(path: &Path) -> bool {
    let Some(dir) = path.parent() else { return false };
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    match crate::untrusted::read_capped(dir, name, MAX_CONTROL_BYTES as usize) {
        Ok(Some(read)) => read.text.to_ascii_lowercase().contains("[include"),
        _ => true,
    }
}

fn remove(path: &Path, meta: &fs::Metadata) -> std::io::Result<()> {
    // remove_dir_all works relative to directory handles and never follows a link.
    if meta.is_dir() {
        remove_tree(path)
    } else {
        fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn scrub_takes_out_what_git_must_not_open_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        fs::create_dir_all(ws.join(".git/objects")).unwrap();
        fs::create_dir_all(ws.join("src/vendored/.git")).unwrap();
        fs::write(ws.join("src/main.rs"), "fn main() {}").unwrap();
        fs::write(ws.join("src/vendored/lib.rs"), "").unwrap();
        symlink("/etc/passwd", ws.join("src/passwd")).unwrap();
        symlink("/dev/zero", ws.join(".gitignore")).unwrap();
        fs::write(ws.join("sub.git"), "gitdir: /elsewhere").unwrap();
        symlink("/home", ws.join("src/.git")).unwrap();
        assert!(
            std::process::Command::new("mkfifo")
                .arg(ws.join("src/pipe"))
                .status()
                .unwrap()
                .success()
        );
        // Deeper than any path can name at once: made a directory at a time.
        let made = std::process::Command::new("sh")
            .arg("-c")
            .arg("mkdir deep && cd deep && i=0 && while [ $i -lt 1600 ]; do mkdir d && cd d; i=$((i+1)); done")
            .current_dir(ws)
            .status()
            .unwrap();
        assert!(made.success());

        let removed = walk(
            ws,
            Walk {
                owner: None,
                scrub: true,
            },
        )
        .unwrap();
        assert!(
            ws.join(".git/objects").is_dir(),
            "the workspace's own .git is the caller's"
        );
        assert!(ws.join("src/main.rs").is_file() && ws.join("src/vendored/lib.rs").is_file());
        assert!(
            fs::symlink_metadata(ws.join("src/passwd"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(ws.join("sub.git").is_file());
        for gone in ["src/vendored/.git", ".gitignore", "src/.git", "src/pipe"] {
            assert!(fs::symlink_metadata(ws.join(gone)).is_err(), "{gone} is still there");
        }
        assert!(ws.join("deep").is_dir());
        assert_eq!(removed.count, 5, "{removed:?}");
        assert!(removed.note().unwrap().contains("path too long"));
        assert!(Path::new("/etc/passwd").exists());
    }
}
