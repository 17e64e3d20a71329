//! Git: a bare mirror per repository, a full clone per pipeline (mounted into the
//! agent's container), committing whatever a run left, and pushing. **Only a pipeline's
//! own branch is ever pushed, never with force, and a user's local checkout is never
//! written to.** Blocking (libgit2): call from `spawn_blocking`.

use std::fs;
use std::path::{Path, PathBuf};

use git2::build::{CheckoutBuilder, RepoBuilder};
use git2::{
    BranchType, Cred, CredentialType, FetchOptions, IndexAddOption, Oid, PushOptions, RemoteCallbacks, Repository,
    Signature,
};

use crate::config::Secret;
use crate::model::{Diffstat, Pipeline};

/// Files the agent may leave for Threadline; excluded from commits.
pub const CONTROL_DIR: &str = ".threadline";
pub const SUMMARY_FILE: &str = ".threadline/summary.md";

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("{path} is not a git repository: {detail}")]
    NotARepo { path: String, detail: String },
    #[error("cannot fetch {remote}: {detail}")]
    Fetch { remote: String, detail: String },
    #[error("the base branch {base:?} does not exist in {remote} (branches there: {available})")]
    BaseMissing {
        base: String,
        remote: String,
        available: String,
    },
    #[error(
        "the branch {branch} on the remote has commits this pipeline's workspace does not have \
         (remote {remote_head}, workspace {local_head}), and the workspace has commits the remote \
         does not; nothing was changed. Merge or rebase the remote branch so it contains {local_head}, \
         or start a new pipeline"
    )]
    Diverged {
        branch: String,
        local_head: String,
        remote_head: String,
    },
    #[error("refusing to push {branch}: only branches below {prefix:?} other than the base are ever pushed")]
    ForbiddenBranch { branch: String, prefix: String },
    #[error("push to {remote} was rejected: {reason}")]
    PushRejected { remote: String, reason: String },
    #[error("push to {remote} failed: {detail}")]
    Push { remote: String, detail: String },
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> GitError + 'a {
    move |source| GitError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// Where a pipeline's repository fetches from and pushes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSource {
    pub repo: String,
    pub remote_url: String,
    pub local_only: bool,
}

/// Works out where to fetch and push for what the user named: a URL is the remote; a
/// bare repository path is the remote; a checkout with an `origin` pushes there; a
/// checkout without one keeps the branch in Threadline's own mirror only.
pub fn resolve_repo(input: &str) -> Result<RepoSource, GitError> {
    let looks_remote =
        input.contains("://") || (input.contains('@') && input.contains(':') && !Path::new(input).exists());
    if looks_remote {
        return Ok(RepoSource {
            repo: input.to_owned(),
            remote_url: input.to_owned(),
            local_only: false,
        });
    }
    let path = fs::canonicalize(input).map_err(|e| GitError::NotARepo {
        path: input.to_owned(),
        detail: e.to_string(),
    })?;
    let repo = Repository::open_bare(&path)
        .or_else(|_| Repository::open(&path))
        .map_err(|e| GitError::NotARepo {
            path: path.display().to_string(),
            detail: e.message().to_owned(),
        })?;
    let shown = path.display().to_string();
    if repo.is_bare() {
        return Ok(RepoSource {
            repo: shown.clone(),
            remote_url: shown,
            local_only: false,
        });
    }
    let origin = repo
        .find_remote("origin")
        .ok()
        .and_then(|r| r.url().ok().map(str::to_owned));
    match origin {
        Some(url) => {
            // A relative origin is relative to the checkout.
            let url = if !url.contains("://") && !url.contains('@') && Path::new(&url).is_relative() {
                path.join(&url).display().to_string()
            } else {
                url
            };
            Ok(RepoSource {
                repo: shown,
                remote_url: url,
                local_only: false,
            })
        }
        None => Ok(RepoSource {
            repo: shown.clone(),
            remote_url: shown,
            local_only: true,
        }),
    }
}

/// Makes a branch name: `<prefix><slug of the prompt>-<id>`.
pub fn branch_name(prefix: &str, prompt: &str, id: &str) -> String {
    let mut slug = String::new();
    for word in prompt
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if slug.len() + word.len() + 1 > 40 {
            break;
        }
        if !slug.is_empty() {
            slug.push('-');
        }
        slug.push_str(&word.to_ascii_lowercase());
    }
    if slug.is_empty() {
        slug.push_str("run");
    }
    format!("{prefix}{slug}-{id}")
}

/// Git access with the host's credentials. Credentials are used only here, in the
/// daemon's process; nothing of them reaches a container.
#[derive(Clone)]
pub struct Git {
    data_dir: PathBuf,
    author_name: String,
    author_email: String,
    token: Secret,
    token_username: String,
    branch_prefix: String,
}

/// The result of preparing a workspace for a run.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub workspace: PathBuf,
    pub start_commit: String,
    /// Something the user should know (a fast-forward to a remote push).
    pub note: Option<String>,
}

/// The result of saving a run's work.
#[derive(Debug, Clone)]
pub struct Saved {
    pub head: String,
    /// The run left a change (its own commit, or the agent's).
    pub changed: bool,
    pub diffstat: Diffstat,
    pub summary: Option<String>,
}

/// The run and outcome for a commit message.
pub struct CommitInfo<'a> {
    pub run_id: &'a str,
    pub prompt: &'a str,
    pub agent: &'a str,
    pub outcome: &'a str,
}

impl Git {
    pub fn new(config: &crate::config::Config) -> Self {
        Git {
            data_dir: config.data_dir.clone(),
            author_name: config.git.author_name.clone(),
            author_email: config.git.author_email.clone(),
            token: config.git.token.clone(),
            token_username: config.git.token_username.clone(),
            branch_prefix: config.branch_prefix.clone(),
        }
    }

    pub fn workspace_path(&self, pipeline_id: &str) -> PathBuf {
        self.data_dir.join("workspaces").join(pipeline_id)
    }

    pub fn mirror_path(&self, remote_url: &str) -> PathBuf {
        let name: String = remote_url
            .rsplit(['/', ':'])
            .find(|s| !s.is_empty())
            .unwrap_or("repo")
            .trim_end_matches(".git")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(40)
            .collect();
        self.data_dir
            .join("mirrors")
            .join(format!("{name}-{:016x}.git", fnv1a(remote_url.as_bytes())))
    }

    fn callbacks(&self) -> RemoteCallbacks<'static> {
        let token = self.token.clone();
        let user = self.token_username.clone();
        let mut attempts = 0;
        let mut cb = RemoteCallbacks::new();
        cb.credentials(move |url, username_from_url, allowed| {
            // libgit2 asks again after every refusal; give up instead of looping.
            attempts += 1;
            if attempts > 3 {
                return Err(git2::Error::from_str(
                    "authentication failed: the credentials were refused",
                ));
            }
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) && !token.is_empty() {
                return Cred::userpass_plaintext(&user, token.expose());
            }
            if allowed.contains(CredentialType::SSH_KEY) {
                return Cred::ssh_key_from_agent(username_from_url.unwrap_or("git"));
            }
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT)
                && let Ok(config) = git2::Config::open_default()
                && let Ok(cred) = Cred::credential_helper(&config, url, username_from_url)
            {
                return Ok(cred);
            }
            if allowed.contains(CredentialType::DEFAULT) {
                return Cred::default();
            }
            Err(git2::Error::from_str(
                "no credentials: set git.token (or THREADLINE_GIT_TOKEN), or load a key into ssh-agent",
            ))
        });
        cb
    }

    /// Creates the mirror if needed and fetches every branch of the remote into it.
    pub fn sync_mirror(&self, remote_url: &str) -> Result<PathBuf, GitError> {
        self.fetch_mirror(remote_url).map(|(path, _)| path)
    }

    /// [`Git::sync_mirror`], also returning the branches the remote has now, as it
    /// advertised them (the mirror keeps branches the remote deleted).
    fn fetch_mirror(&self, remote_url: &str) -> Result<(PathBuf, Vec<(String, Oid)>), GitError> {
        let path = self.mirror_path(remote_url);
        let repo = match Repository::open_bare(&path) {
            Ok(repo) => repo,
            Err(_) => {
                fs::create_dir_all(&path).map_err(io_err("cannot create", &path))?;
                Repository::init_bare(&path)?
            }
        };
        let mut remote = repo.remote_anonymous(remote_url)?;
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(self.callbacks());
        // Without prune: branches pushed only to a local-only mirror must survive.
        let fetch_error = |e: git2::Error| GitError::Fetch {
            remote: remote_url.to_owned(),
            detail: e.message().to_owned(),
        };
        remote
            .fetch(&["+refs/heads/*:refs/heads/*"], Some(&mut opts), None)
            .map_err(fetch_error)?;
        // libgit2 keeps the advertised refs after the fetch disconnects.
        let heads = remote
            .list()
            .map_err(fetch_error)?
            .iter()
            .filter_map(|h| Some((h.name().strip_prefix("refs/heads/")?.to_owned(), h.oid())))
            .collect();
        Ok((path, heads))
    }

    /// Makes the pipeline's workspace ready for a run: cloned from the mirror on the
    /// first run, brought up to date with the remote branch later. Changes nothing when
    /// the remote branch and the workspace have diverged.
    pub fn prepare(&self, pipeline: &Pipeline) -> Result<Prepared, GitError> {
        let mirror = self.sync_mirror(&pipeline.remote_url)?;
        let mirror_repo = Repository::open_bare(&mirror)?;
        let base_ref = format!("refs/heads/{}", pipeline.base_branch);
        if mirror_repo.find_reference(&base_ref).is_err() {
            let available = mirror_repo
                .branches(Some(BranchType::Local))?
                .filter_map(|b| b.ok()?.0.name().ok().flatten().map(str::to_owned))
                .filter(|n| !n.starts_with(&self.branch_prefix))
                .take(10)
                .collect::<Vec<_>>();
            return Err(GitError::BaseMissing {
                base: pipeline.base_branch.clone(),
                remote: pipeline.repo.clone(),
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available.join(", ")
                },
            });
        }
        let ws = self.workspace_path(&pipeline.id);
        let fresh = !ws.join(".git").exists();
        if fresh {
            self.clone_workspace(&mirror, &ws)?;
        }
        let repo = Repository::open(&ws)?;
        // Handing the workspace to the agent's user and back changes every file's ctime;
        // trusting it would make staging re-hash every file of the repository.
        repo.config()?.set_bool("core.trustctime", false)?;
        let branch_ref = format!("refs/heads/{}", pipeline.branch);
        let tracking = format!("refs/remotes/origin/{}", pipeline.branch);
        {
            let mut origin = repo.find_remote("origin")?;
            // A fresh view of the branch and the base, as the remote has them now.
            let specs = [
                format!("+refs/heads/{0}:refs/remotes/origin/{0}", pipeline.base_branch),
                format!("+{branch_ref}:{tracking}"),
            ];
            let _ = repo.find_reference(&tracking).map(|mut r| r.delete());
            origin.fetch(&specs, None, None)?;
        }
        let remote_head = repo.refname_to_id(&tracking).ok();
        let local_head = repo.refname_to_id(&branch_ref).ok();
        let mut note = None;
        let start = match (local_head, remote_head) {
            (None, Some(remote)) => remote,
            (None, None) => repo.refname_to_id(&format!("refs/remotes/origin/{}", pipeline.base_branch))?,
            (Some(local), None) => local,
            (Some(local), Some(remote)) if local == remote => local,
            (Some(local), Some(remote)) if repo.graph_descendant_of(local, remote)? => {
                // The last push failed: this run's push will carry both.
                local
            }
            (Some(local), Some(remote)) if repo.graph_descendant_of(remote, local)? => {
                note = Some(format!(
                    "fast-forwarded {} to {} pushed on the remote",
                    pipeline.branch,
                    short(&remote)
                ));
                remote
            }
            (Some(local), Some(remote)) => {
                return Err(GitError::Diverged {
                    branch: pipeline.branch.clone(),
                    local_head: short(&local),
                    remote_head: short(&remote),
                });
            }
        };
        let commit = repo.find_commit(start)?;
        if local_head != Some(start) {
            // Check the target out before moving the branch, so a failure moves nothing.
            // A fresh clone's empty work tree holds nothing to protect: `force` skips the
            // per-file comparison that `safe` needs for a work tree in use.
            let mut how = CheckoutBuilder::new();
            if fresh {
                how.force();
            } else {
                how.safe();
            }
            repo.checkout_tree(commit.as_object(), Some(&mut how))?;
            repo.reference(&branch_ref, start, true, "threadline: start of run")?;
        }
        repo.set_head(&branch_ref)?;
        Ok(Prepared {
            workspace: ws,
            start_commit: start.to_string(),
            note,
        })
    }

    fn clone_workspace(&self, mirror: &Path, ws: &Path) -> Result<(), GitError> {
        let parent = ws.parent().expect("workspaces live in a directory");
        fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
        let tmp = parent.join(format!(
            ".{}.tmp-{}",
            ws.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err("cannot remove", &tmp))?;
        }
        // NoLinks: objects are copied, so nothing in the container can write into the mirror.
        RepoBuilder::new()
            .clone_local(git2::build::CloneLocal::NoLinks)
            .clone(&mirror.display().to_string(), &tmp)?;
        let exclude = tmp.join(".git/info/exclude");
        if let Some(dir) = exclude.parent() {
            fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        }
        let mut text = fs::read_to_string(&exclude).unwrap_or_default();
        text.push_str(&format!("\n# Threadline's control files\n/{CONTROL_DIR}/\n"));
        fs::write(&exclude, text).map_err(io_err("cannot write", &exclude))?;
        if ws.exists() {
            fs::remove_dir_all(ws).map_err(io_err("cannot remove", ws))?;
        }
        fs::rename(&tmp, ws).map_err(io_err("cannot move into place", ws))?;
        Ok(())
    }

    /// Commits everything the run left on the pipeline's branch (new, changed and
    /// deleted files; .gitignore respected). Commits the agent made are kept. Makes no
    /// empty commit.
    pub fn save(&self, pipeline: &Pipeline, start_commit: &str, info: &CommitInfo<'_>) -> Result<Saved, GitError> {
        let ws = self.workspace_path(&pipeline.id);
        let repo = Repository::open(&ws)?;
        let branch_ref = format!("refs/heads/{}", pipeline.branch);
        let start = Oid::from_str(start_commit)?;

        // The agent may have moved HEAD (its own commits, or a branch switch). Keep its
        // commits when they build on the run's start; the branch is what gets pushed.
        if let Ok(head) = repo.head()
            && let Some(head_oid) = head.target()
            && head.name().ok() != Some(branch_ref.as_str())
            && (head_oid == start || repo.graph_descendant_of(head_oid, start)?)
        {
            repo.reference(&branch_ref, head_oid, true, "threadline: keep the agent's commits")?;
        }
        repo.set_head(&branch_ref)?;

        let summary_path = ws.join(SUMMARY_FILE);
        let summary = fs::read_to_string(&summary_path)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        let control = ws.join(CONTROL_DIR);
        if control.exists() {
            fs::remove_dir_all(&control).map_err(io_err("cannot remove", &control))?;
        }

        let parent = repo.find_commit(repo.refname_to_id(&branch_ref)?)?;
        let mut index = repo.index()?;
        index.add_all(["*"], IndexAddOption::DEFAULT, None)?;
        index.update_all(["*"], None)?;
        index.write()?;
        let tree_id = index.write_tree()?;
        if tree_id != parent.tree_id() {
            let sig = Signature::now(&self.author_name, &self.author_email)?;
            let tree = repo.find_tree(tree_id)?;
            let message = commit_message(&pipeline.id, info);
            repo.commit(Some(&branch_ref), &sig, &sig, &message, &tree, &[&parent])?;
        }
        let head = repo.refname_to_id(&branch_ref)?;
        let diffstat = diffstat(&repo, start, head)?;
        Ok(Saved {
            head: head.to_string(),
            changed: head != start,
            diffstat,
            summary,
        })
    }

    /// Whether the branch head differs from what the remote had at the last fetch and
    /// from the base (a branch identical to its base is not worth pushing).
    pub fn needs_push(&self, pipeline: &Pipeline) -> Result<bool, GitError> {
        let repo = Repository::open(self.workspace_path(&pipeline.id))?;
        let head = repo.refname_to_id(&format!("refs/heads/{}", pipeline.branch))?;
        let remote = repo
            .refname_to_id(&format!("refs/remotes/origin/{}", pipeline.branch))
            .ok();
        let base = repo
            .refname_to_id(&format!("refs/remotes/origin/{}", pipeline.base_branch))
            .ok();
        Ok(Some(head) != remote && (remote.is_some() || Some(head) != base))
    }

    /// Pushes the pipeline's branch, and nothing else, without force. A local-only
    /// pipeline pushes into Threadline's mirror, never into the user's checkout.
    pub fn push(&self, pipeline: &Pipeline) -> Result<(), GitError> {
        let branch = &pipeline.branch;
        if !branch.starts_with(&self.branch_prefix)
            || *branch == pipeline.base_branch
            || branch.len() <= self.branch_prefix.len()
        {
            return Err(GitError::ForbiddenBranch {
                branch: branch.clone(),
                prefix: self.branch_prefix.clone(),
            });
        }
        let target = if pipeline.local_only {
            self.mirror_path(&pipeline.remote_url).display().to_string()
        } else {
            pipeline.remote_url.clone()
        };
        let repo = Repository::open(self.workspace_path(&pipeline.id))?;
        let mut remote = repo.remote_anonymous(&target)?;
        let rejection = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let mut cb = self.callbacks();
        let seen = rejection.clone();
        cb.push_update_reference(move |_refname, status| {
            if let Some(msg) = status {
                *seen.lock().unwrap() = Some(msg.to_owned());
            }
            Ok(())
        });
        let mut opts = PushOptions::new();
        opts.remote_callbacks(cb);
        // No leading '+': the remote refuses anything but a fast-forward.
        let spec = format!("refs/heads/{branch}:refs/heads/{branch}");
        remote.push(&[spec.as_str()], Some(&mut opts)).map_err(|e| {
            let detail = e.message().to_owned();
            if detail.contains("non-fast-forward") || detail.contains("fetch first") {
                GitError::PushRejected {
                    remote: target.clone(),
                    reason: "the remote branch has commits this pipeline does not; nothing was overwritten".into(),
                }
            } else {
                GitError::Push {
                    remote: target.clone(),
                    detail,
                }
            }
        })?;
        if let Some(reason) = rejection.lock().unwrap().take() {
            return Err(GitError::PushRejected { remote: target, reason });
        }
        // Remember what the remote now has, for `needs_push`.
        let head = repo.refname_to_id(&format!("refs/heads/{branch}"))?;
        repo.reference(
            &format!("refs/remotes/origin/{branch}"),
            head,
            true,
            "threadline: pushed",
        )?;
        Ok(())
    }
}

fn commit_message(pipeline_id: &str, info: &CommitInfo<'_>) -> String {
    let first_line = info
        .prompt
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("agent run");
    let mut subject: String = first_line.chars().take(72).collect();
    if first_line.chars().count() > 72 {
        subject.truncate(subject.trim_end().len());
        subject.push('…');
    }
    let body: String = info.prompt.chars().take(4000).collect();
    format!(
        "{subject}\n\n{body}\n\nThreadline-Pipeline: {pipeline_id}\nThreadline-Run: {}\nThreadline-Agent: {}\nThreadline-Outcome: {}\n",
        info.run_id, info.agent, info.outcome
    )
}

/// Whether a pipeline's branch can become a pull request, as the remote has it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullRequestCheck {
    /// Both branches exist and the branch has commits its base lacks: its changes
    /// against the merge base.
    Ready(Diffstat),
    BranchMissing,
    BaseMissing,
    NoCommits,
}

impl Git {
    /// Fetches, and compares the pipeline's branch with its base as the remote has them
    /// now (the mirror alone would still have branches deleted there).
    pub fn check_pull_request(&self, pipeline: &Pipeline) -> Result<PullRequestCheck, GitError> {
        let (mirror, heads) = self.fetch_mirror(&pipeline.remote_url)?;
        let repo = Repository::open_bare(&mirror)?;
        let head_of = |name: &str| heads.iter().find(|(n, _)| n == name).map(|(_, oid)| *oid);
        let (branch, base) = (head_of(&pipeline.branch), head_of(&pipeline.base_branch));
        let (Some(branch), Some(base)) = (branch, base) else {
            return Ok(if branch.is_none() {
                PullRequestCheck::BranchMissing
            } else {
                PullRequestCheck::BaseMissing
            });
        };
        let (ahead, _) = repo.graph_ahead_behind(branch, base)?;
        if ahead == 0 {
            return Ok(PullRequestCheck::NoCommits);
        }
        let merge_base = repo.merge_base(branch, base)?;
        Ok(PullRequestCheck::Ready(diffstat(&repo, merge_base, branch)?))
    }
}

fn diffstat(repo: &Repository, from: Oid, to: Oid) -> Result<Diffstat, GitError> {
    if from == to {
        return Ok(Diffstat::default());
    }
    let old = repo.find_commit(from)?.tree()?;
    let new = repo.find_commit(to)?.tree()?;
    let stats = repo.diff_tree_to_tree(Some(&old), Some(&new), None)?.stats()?;
    Ok(Diffstat {
        files_changed: stats.files_changed() as i64,
        insertions: stats.insertions() as i64,
        deletions: stats.deletions() as i64,
    })
}

pub fn short(oid: &impl ToString) -> String {
    oid.to_string().chars().take(10).collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Changes the owner of a tree (symlinks themselves, never their targets), skipping
/// entries that already have it.
pub fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path)?;
    if (meta.uid(), meta.gid()) != (uid, gid) {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names_are_slugs_with_the_id() {
        assert_eq!(
            branch_name("threadline/", "Add a /health endpoint, please!", "ab12cd34"),
            "threadline/add-a-health-endpoint-please-ab12cd34"
        );
        assert_eq!(branch_name("tl/", "???", "x1"), "tl/run-x1");
        let long = branch_name("t/", &"word ".repeat(50), "id");
        assert!(long.len() <= 2 + 40 + 3, "{long}");
        assert!(git2::Reference::is_valid_name(&format!("refs/heads/{long}")));
    }

    #[test]
    fn remote_looking_inputs_are_urls() {
        let src = resolve_repo("https://example.com/a/b.git").unwrap();
        assert_eq!(src.remote_url, "https://example.com/a/b.git");
        assert!(!src.local_only);
        assert!(matches!(
            resolve_repo("/nonexistent/path/xyz"),
            Err(GitError::NotARepo { .. })
        ));
    }

    #[test]
    fn commit_messages_carry_trailers() {
        let msg = commit_message(
            "p1",
            &CommitInfo {
                run_id: "p1-2",
                prompt: "fix the bug\nin detail",
                agent: "script",
                outcome: "exited 0",
            },
        );
        assert!(msg.starts_with("fix the bug\n\n"));
        assert!(msg.contains("Threadline-Pipeline: p1\nThreadline-Run: p1-2\n"));
    }
}
