//! Reading a repository's base branch from Threadline's mirror, for its environment: a
//! few named files (the setup script, the devcontainer, lock files), and the whole tree
//! as a setup's `/workspace`. The base branch, never a pipeline's branch: an agent writes
//! those, and nothing an agent wrote may configure what runs with the setup's secrets.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use git2::{ObjectType, Repository, TreeWalkMode, TreeWalkResult};

use super::{Git, GitError, io_err};

/// Files read from a base branch: the commit they were read at, and each one's contents
/// (None: no such regular file, or too large).
pub type BaseFiles = (String, Vec<Option<Vec<u8>>>);

/// The largest file read by name.
pub const MAX_NAMED_FILE: usize = 16 * 1024 * 1024;
/// The most a base tree export writes.
pub const MAX_EXPORT: u64 = 2 * 1024 * 1024 * 1024;

/// `base`: a branch of the mirror, or a commit id (what an earlier read was at).
fn commit_at<'r>(repo: &'r Repository, base: &str) -> Result<git2::Commit<'r>, GitError> {
    if base.len() == 40
        && base.bytes().all(|b| b.is_ascii_hexdigit())
        && let Ok(oid) = git2::Oid::from_str(base)
    {
        return Ok(repo.find_commit(oid)?);
    }
    Ok(repo.find_reference(&format!("refs/heads/{base}"))?.peel_to_commit()?)
}

impl Git {
    /// The contents of `paths` on `base` in the mirror of `remote_url` (None: no such
    /// regular file, or larger than [`MAX_NAMED_FILE`]), and the commit they were read at.
    pub fn base_files(&self, remote_url: &str, base: &str, paths: &[String]) -> Result<BaseFiles, GitError> {
        let repo = Repository::open_bare(self.mirror_path(remote_url))?;
        let commit = commit_at(&repo, base)?;
        let tree = commit.tree()?;
        let files = paths
            .iter()
            .map(|path| {
                let entry = tree.get_path(Path::new(path)).ok()?;
                // Regular files only (0o100644, 0o100755): never a link.
                if entry.kind() != Some(ObjectType::Blob) || entry.filemode() & 0o170000 != 0o100000 {
                    return None;
                }
                let blob = repo.find_blob(entry.id()).ok()?;
                (blob.size() <= MAX_NAMED_FILE).then(|| blob.content().to_vec())
            })
            .collect();
        Ok((commit.id().to_string(), files))
    }

    /// Writes the tree of `base` into `dest` (which must not exist): regular files and
    /// folders only, links and submodules left out, at most [`MAX_EXPORT`] bytes.
    pub fn export_base(&self, remote_url: &str, base: &str, dest: &Path) -> Result<(), GitError> {
        let repo = Repository::open_bare(self.mirror_path(remote_url))?;
        let tree = commit_at(&repo, base)?.tree()?;
        fs::create_dir(dest).map_err(io_err("cannot create", dest))?;
        let mut written: u64 = 0;
        let mut failure: Option<GitError> = None;
        tree.walk(TreeWalkMode::PreOrder, |folder, entry| {
            let Some(name) = entry
                .name()
                .ok()
                .filter(|n| !n.is_empty() && *n != "." && *n != ".." && !n.contains('/'))
            else {
                return TreeWalkResult::Skip;
            };
            let path = dest.join(folder).join(name);
            let result = match (entry.kind(), entry.filemode()) {
                (Some(ObjectType::Tree), _) => fs::create_dir(&path).map_err(io_err("cannot create", &path)),
                (Some(ObjectType::Blob), mode) if mode & 0o170000 == 0o100000 => match repo.find_blob(entry.id()) {
                    Ok(blob) => {
                        written += blob.size() as u64;
                        if written > MAX_EXPORT {
                            failure = Some(GitError::Io {
                                action: "cannot copy",
                                path: format!("the base branch (over {} GB)", MAX_EXPORT >> 30),
                                source: std::io::Error::other("too large to copy for the setup"),
                            });
                            return TreeWalkResult::Abort;
                        }
                        let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                        fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(perm)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(&path)
                            .and_then(|mut f| f.write_all(blob.content()))
                            .map_err(io_err("cannot write", &path))
                    }
                    Err(e) => Err(e.into()),
                },
                // Links and submodules stay out.
                _ => return TreeWalkResult::Skip,
            };
            match result {
                Ok(()) => TreeWalkResult::Ok,
                Err(e) => {
                    failure = Some(e);
                    TreeWalkResult::Abort
                }
            }
        })
        .or_else(|e| if failure.is_some() { Ok(()) } else { Err(e) })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
