//! Git: a bare mirror per repository; per pipeline, a git directory of the daemon's own and
//! a work tree (mounted into the agent's container); committing whatever a run left, and
//! pushing. **Only a pipeline's own branch is ever pushed, never with force, and a user's
//! local checkout is never written to.** Blocking (libgit2): call from `spawn_blocking`.
//!
//! **The agent is untrusted, and so is everything it wrote.** The daemon's git directory
//! (`gitdirs/<pipeline>.git`) is outside every mount; its work tree is set by the daemon,
//! never read from a file. The work tree holds a `.git` for the agent alone: rebuilt by
//! the daemon before every run (HEAD, the branch, the index, and the daemon's object
//! store lent read-only as an alternate), and never opened by the daemon as a
//! repository, a configuration or a path. After the run, the agent's commits on the
//! pipeline's branch are imported like a fetch from a stranger: objects only, each one
//! re-hashed, sizes capped, and only if they descend from the run's start; the rest of
//! its work is staged from the work tree with the daemon's own settings. Network
//! operations use only the URL from the store, and credentials go only to its host.

use std::fs;
use std::path::{Path, PathBuf};

use git2::build::{CheckoutBuilder, RepoBuilder};
use git2::{
    BranchType, Cred, CredentialType, FetchOptions, IndexAddOption, Odb, Oid, PushOptions, RemoteCallbacks, Repository,
    Signature,
};

mod base;
pub use base::BaseFiles;
mod import;
mod lock;

use super::scrub::{self, Walk};
use crate::config::Secret;
use crate::model::{Diffstat, Pipeline};
use crate::untrusted;
use import::{Import, agent_branch_tip, copy_object_files};
use lock::DirLock;

/// Files the agent may leave for Threadline; excluded from commits.
pub const CONTROL_DIR: &str = ".threadline";
pub const SUMMARY_FILE: &str = ".threadline/summary.md";
/// The most of a summary that is kept.
pub const SUMMARY_CAP: usize = 16 * 1024;
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
    #[error("did not push to {remote}: this worker's lease could run out before the push ends")]
    PushTooLate { remote: String },
    #[error("git: {0}")]
    Git(#[from] LibGitError),
    #[error("another git operation on this repository is still running after {0} s; try again when it has finished")]
    Busy(u64),
    #[error("refusing to send credentials to {asked}: only the configured remote's host {allowed} gets them")]
    CredentialHost { asked: String, allowed: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// libgit2's error, kept opaque: callers see its message, not its crate.
#[derive(Debug)]
pub struct LibGitError(git2::Error);

impl std::fmt::Display for LibGitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for LibGitError {}

impl From<git2::Error> for GitError {
    fn from(e: git2::Error) -> Self {
        GitError::Git(LibGitError(e))
    }
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
    if crate::config::looks_like_url(input) {
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

/// Work kept aside by [`Git::set_aside`].
#[derive(Debug, Clone)]
pub struct SetAside {
    /// `refs/threadline/set-aside/RUN`, or `…/RUN-2` and on when a run's work was set
    /// aside before.
    pub reference: String,
    pub commit: String,
}

/// The result of saving a run's work.
#[derive(Debug, Clone)]
pub struct Saved {
    pub head: String,
    /// The run left a change (its own commit, or the agent's).
    pub changed: bool,
    pub diffstat: Diffstat,
    pub summary: Option<String>,
    /// What the save passed over or refused in what the agent left, for the run's notes.
    pub notes: Vec<String>,
}

/// Where a pipeline's branch stands against its remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushState {
    /// The branch has commits the remote does not.
    Needed,
    /// The remote has the branch head (pushed, perhaps by a save a crash cut short).
    Pushed,
    /// The branch is its base, and not on the remote: nothing worth pushing.
    NothingToPush,
}

/// The run and outcome for a commit message.
pub struct CommitInfo<'a> {
    pub run_id: &'a str,
    pub prompt: &'a str,
    pub agent: &'a str,
    pub outcome: &'a str,
    /// Paths the agent's own bookkeeping writes (gitignore patterns): never committed.
    pub exclude: &'a [String],
}

/// The daemon's `info/exclude` of a pipeline: Threadline's control files and the agent
/// profile's bookkeeping (one pattern a line; the repository's `.gitignore` is untouched).
fn exclude_file(patterns: &[String]) -> String {
    let mut text = format!("# Threadline's control files\n/{CONTROL_DIR}/\n");
    for p in patterns {
        let p = p.trim();
        if !p.is_empty() && !p.contains(['\n', '\r']) {
            text.push_str(p);
            text.push('\n');
        }
    }
    text
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

    /// The work tree the agent's container gets.
    pub fn workspace_path(&self, pipeline_id: &str) -> PathBuf {
        self.data_dir.join("workspaces").join(pipeline_id)
    }

    /// The daemon's own git directory for a pipeline: never mounted into a container.
    pub fn gitdir_path(&self, pipeline_id: &str) -> PathBuf {
        self.data_dir.join("gitdirs").join(format!("{pipeline_id}.git"))
    }

    /// The pipeline's object store, lent read-only to its agents so their git has the
    /// history without a copy.
    pub fn objects_path(&self, pipeline_id: &str) -> PathBuf {
        self.gitdir_path(pipeline_id).join("objects")
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

    /// Credentials for `remote_url`, and only for its host: a redirect or a rewritten URL
    /// that leads elsewhere gets none.
    fn callbacks(&self, remote_url: &str) -> RemoteCallbacks<'static> {
        let token = self.token.clone();
        let user = self.token_username.clone();
        let allowed = url_host(remote_url);
        let mut attempts = 0;
        let mut cb = RemoteCallbacks::new();
        cb.credentials(move |url, username_from_url, kinds| {
            let asked = url_host(url);
            if asked != allowed {
                let shown = |h: &Option<String>| h.clone().unwrap_or_else(|| "a local path".into());
                let refused = GitError::CredentialHost {
                    asked: shown(&asked),
                    allowed: shown(&allowed),
                };
                return Err(git2::Error::from_str(&refused.to_string()));
            }
            // libgit2 asks again after every refusal; give up instead of looping.
            attempts += 1;
            if attempts > 3 {
                return Err(git2::Error::from_str(
                    "authentication failed: the credentials were refused",
                ));
            }
            if kinds.contains(CredentialType::USER_PASS_PLAINTEXT) && !token.is_empty() {
                return Cred::userpass_plaintext(&user, token.expose());
            }
            if kinds.contains(CredentialType::SSH_KEY) {
                return Cred::ssh_key_from_agent(username_from_url.unwrap_or("git"));
            }
            if kinds.contains(CredentialType::USER_PASS_PLAINTEXT)
                && let Ok(config) = git2::Config::open_default()
                && let Ok(cred) = Cred::credential_helper(&config, url, username_from_url)
            {
                return Ok(cred);
            }
            if kinds.contains(CredentialType::DEFAULT) {
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
        let _held = DirLock::acquire(&path)?;
        let repo = match Repository::open_bare(&path) {
            Ok(repo) => repo,
            Err(_) => {
                fs::create_dir_all(&path).map_err(io_err("cannot create", &path))?;
                Repository::init_bare(&path)?
            }
        };
        let mut remote = repo.remote_anonymous(remote_url)?;
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(self.callbacks(remote_url));
        // Without prune: branches pushed only to a local-only mirror must survive.
        let fetch_error = |e: git2::Error| GitError::Fetch {
            remote: remote_url.to_owned(),
            // libgit2 takes a path that is gone for a URL of an unknown kind.
            detail: if !crate::config::looks_like_url(remote_url) && !Path::new(remote_url).exists() {
                "the repository is no longer there (moved or deleted?); restore it, or start a new thread on \
                 another repository"
                    .to_owned()
            } else {
                e.message().to_owned()
            },
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

    /// The pipeline's repository as the daemon sees it: its own git directory, with the
    /// work tree set here rather than read from any file.
    fn open_pipeline(&self, pipeline_id: &str) -> Result<Repository, GitError> {
        let repo = Repository::open_bare(self.gitdir_path(pipeline_id))?;
        repo.set_workdir(&self.workspace_path(pipeline_id), false)?;
        Ok(repo)
    }

    /// Makes the pipeline's workspace ready for a run: its git directory made from the
    /// mirror on the first run, brought up to date with the remote branch later, and the
    /// agent's `.git` made anew. Changes nothing when the remote branch and the pipeline
    /// have diverged.
    pub fn prepare(&self, pipeline: &Pipeline) -> Result<Prepared, GitError> {
        let _held = DirLock::acquire(&self.gitdir_path(&pipeline.id))?;
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
        // A work tree with a `.git` but no git directory of ours: the layout before
        // `gitdirs`, or a git directory lost. Its files may hold a run's unsaved work.
        let mut adopt = false;
        if !self.gitdir_path(&pipeline.id).exists() {
            adopt = fs::symlink_metadata(ws.join(".git")).is_ok_and(|m| m.is_dir());
            self.create_gitdir(&mirror, &pipeline.id)?;
        }
        fs::create_dir_all(&ws).map_err(io_err("cannot create", &ws))?;
        let repo = self.open_pipeline(&pipeline.id)?;
        let branch_ref = format!("refs/heads/{}", pipeline.branch);
        let tracking = format!("refs/remotes/origin/{}", pipeline.branch);
        {
            // A fresh view of the branch and the base, as the remote has them now.
            let mut from_mirror = repo.remote_anonymous(&mirror.display().to_string())?;
            let specs = [
                format!("+refs/heads/{0}:refs/remotes/origin/{0}", pipeline.base_branch),
                format!("+{branch_ref}:{tracking}"),
            ];
            let _ = repo.find_reference(&tracking).map(|mut r| r.delete());
            from_mirror.fetch(&specs, None, None)?;
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
            // Until the branch exists no agent has had the work tree, so it holds nothing
            // to protect (at most a checkout a crash cut short): `force` skips the
            // per-file comparison that `safe` needs for a work tree in use.
            if adopt {
                // Keep the files as they are: the index takes the start's tree, and the
                // next save commits whatever the work tree holds beyond it.
                let mut index = repo.index()?;
                index.read_tree(&commit.tree()?)?;
                index.write()?;
            } else {
                let mut how = CheckoutBuilder::new();
                if local_head.is_none() {
                    how.force();
                } else {
                    // A file the checkout adds where an ignored link stands would be
                    // written through the link.
                    remove_untracked_links(&repo, &ws)?;
                    how.safe();
                }
                repo.checkout_tree(commit.as_object(), Some(&mut how))?;
            }
            repo.reference(&branch_ref, start, true, "threadline: start of run")?;
        }
        repo.set_head(&branch_ref)?;
        self.write_agent_git(&repo, pipeline, start)?;
        Ok(Prepared {
            workspace: ws,
            start_commit: start.to_string(),
            note,
        })
    }

    /// Makes the pipeline's git directory: a bare clone of the mirror whose objects are
    /// hard links (both are the daemon's, and agents only ever get them read-only), made
    /// aside and moved into place whole.
    fn create_gitdir(&self, mirror: &Path, pipeline_id: &str) -> Result<(), GitError> {
        let gitdir = self.gitdir_path(pipeline_id);
        let parent = gitdir.parent().expect("git directories live in a directory");
        fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
        let tmp = parent.join(format!(".{pipeline_id}.tmp-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err("cannot remove", &tmp))?;
        }
        let repo = RepoBuilder::new()
            .bare(true)
            .clone_local(git2::build::CloneLocal::Local)
            .clone(&mirror.display().to_string(), &tmp)?;
        // Nothing is ever fetched by name: the mirror's path is given at each fetch.
        repo.remote_delete("origin")?;
        let mut config = repo.config()?;
        // Handing the work tree to the agent's user and back changes every file's ctime;
        // trusting it would make staging re-hash every file of the repository.
        config.set_bool("core.trustctime", false)?;
        let exclude = tmp.join("info/exclude");
        fs::create_dir_all(tmp.join("info")).map_err(io_err("cannot create", &tmp))?;
        fs::write(&exclude, exclude_file(&[])).map_err(io_err("cannot write", &exclude))?;
        drop(repo);
        fs::rename(&tmp, &gitdir).map_err(io_err("cannot move into place", &gitdir))?;
        Ok(())
    }

    /// Gives the agent a `.git` of its own in the work tree: made anew (whatever the last
    /// agent left there is removed, links included, never followed), with the pipeline's
    /// branch checked out, the daemon's index, the base as `origin/<base>`, and the
    /// daemon's objects as a read-only alternate at `objects_mount`.
    fn write_agent_git(&self, repo: &Repository, pipeline: &Pipeline, start: Oid) -> Result<(), GitError> {
        let ws = self.workspace_path(&pipeline.id);
        let dotgit = ws.join(".git");
        match fs::symlink_metadata(&dotgit) {
            Ok(m) if m.is_dir() => scrub::remove_tree(&dotgit).map_err(io_err("cannot remove", &dotgit))?,
            Ok(_) => fs::remove_file(&dotgit).map_err(io_err("cannot remove", &dotgit))?,
            Err(_) => {}
        }
        let branch_file = dotgit.join("refs/heads").join(&pipeline.branch);
        for dir in [
            dotgit.join("objects/info"),
            dotgit.join("objects/pack"),
            dotgit.join("refs/tags"),
            dotgit.join("info"),
            branch_file.parent().expect("a ref has a parent").to_path_buf(),
        ] {
            fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        }
        let base = repo
            .refname_to_id(&format!("refs/remotes/origin/{}", pipeline.base_branch))
            .ok();
        let mut packed = String::from("# pack-refs with: peeled fully-peeled sorted \n");
        if let Some(base) = base {
            packed.push_str(&format!("{base} refs/remotes/origin/{}\n", pipeline.base_branch));
        }
        let config = format!(
            "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n\
             \ttrustctime = false\n\tcheckStat = minimal\n[user]\n\tname = {}\n\temail = {}\n",
            config_value(&format!("{} (agent)", self.author_name)),
            config_value(&self.author_email),
        );
        let files: [(PathBuf, Vec<u8>); 6] = [
            (
                dotgit.join("HEAD"),
                format!("ref: refs/heads/{}\n", pipeline.branch).into_bytes(),
            ),
            (branch_file, format!("{start}\n").into_bytes()),
            (dotgit.join("packed-refs"), packed.into_bytes()),
            (dotgit.join("config"), config.into_bytes()),
            (
                dotgit.join("objects/info/alternates"),
                format!("{}\n", crate::orchestrator::container::OBJECTS_MOUNT).into_bytes(),
            ),
            (
                dotgit.join("info/exclude"),
                fs::read(repo.path().join("info/exclude")).unwrap_or_else(|_| exclude_file(&[]).into_bytes()),
            ),
        ];
        for (path, bytes) in files {
            write_new(&path, &bytes)?;
        }
        // The daemon's index, so the agent's `git status` starts clean.
        let index = repo.path().join("index");
        if let Ok(bytes) = fs::read(&index) {
            write_new(&dotgit.join("index"), &bytes)?;
        }
        Ok(())
    }

    /// Commits everything the run left on the pipeline's branch (the agent's own commits
    /// when they build on the run's start, then new, changed and deleted files;
    /// .gitignore respected). Hands the work tree to `owner` first, and takes out what
    /// git must not open. Makes no empty commit. Idempotent: saving again after a crash
    /// adds nothing twice.
    pub fn save(
        &self,
        pipeline: &Pipeline,
        start_commit: &str,
        info: &CommitInfo<'_>,
        owner: Option<(u32, u32)>,
    ) -> Result<Saved, GitError> {
        let _held = DirLock::acquire(&self.gitdir_path(&pipeline.id))?;
        let ws = self.workspace_path(&pipeline.id);
        let mut notes = Vec::new();
        // Read before the walk, which would remove a (sparse) summary over its size cap.
        let summary = match untrusted::read_capped(&ws, SUMMARY_FILE, SUMMARY_CAP) {
            Ok(Some(read)) => {
                if read.truncated {
                    notes.push(format!(
                        "the summary was longer than {SUMMARY_CAP} bytes; its beginning is kept"
                    ));
                }
                Some(read.text.trim().to_owned()).filter(|s| !s.is_empty())
            }
            Ok(None) => None,
            Err(refused) => {
                notes.push(format!("ignored the summary: {refused}"));
                None
            }
        };
        let removed = scrub::walk(&ws, Walk { owner, scrub: true }).map_err(io_err("cannot examine", &ws))?;
        notes.extend(removed.note());
        let repo = self.open_pipeline(&pipeline.id)?;
        let branch_ref = format!("refs/heads/{}", pipeline.branch);
        let start = Oid::from_str(start_commit)?;

        match self.import_agent_commits(&repo, &pipeline.id, &pipeline.branch, start) {
            Ok(Some(tip)) => {
                let current = repo.refname_to_id(&branch_ref)?;
                // Forward only: a save that ran before a crash may have built on it already.
                if tip != current && repo.graph_descendant_of(tip, current)? {
                    repo.reference(&branch_ref, tip, true, "threadline: the agent's commits")?;
                }
            }
            Ok(None) => {}
            Err(note) => notes.push(note),
        }
        repo.set_head(&branch_ref)?;

        let control = ws.join(CONTROL_DIR);
        match fs::symlink_metadata(&control) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&control).map_err(io_err("cannot remove", &control))?,
            Ok(_) => fs::remove_file(&control).map_err(io_err("cannot remove", &control))?,
            Err(_) => {}
        }

        let parent = repo.find_commit(repo.refname_to_id(&branch_ref)?)?;
        let exclude = repo.path().join("info/exclude");
        fs::write(&exclude, exclude_file(info.exclude)).map_err(io_err("cannot write", &exclude))?;
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
            notes,
        })
    }

    /// The agent's own commits on the pipeline's branch, imported as from an untrusted
    /// remote: its ref read as a plain file (no link followed), its object files copied
    /// out (regular files only, sizes capped), every object reachable from its tip and
    /// missing here read back (which checks its hash) and written anew. Only a tip that
    /// descends from the run's start is taken. Returns the tip, or a note saying why the
    /// agent's commits were passed over (its files are still saved from the work tree).
    fn import_agent_commits(
        &self,
        repo: &Repository,
        pipeline_id: &str,
        branch: &str,
        start: Oid,
    ) -> Result<Option<Oid>, String> {
        let ws = self.workspace_path(pipeline_id);
        let passed_over = |why: String| format!("passed over the agent's own commits ({why}); its files are saved");
        let tip = match agent_branch_tip(&ws, branch) {
            Ok(Some(tip)) if tip != start => tip,
            Ok(_) => return Ok(None),
            Err(why) => return Err(passed_over(why)),
        };
        let staging = self.gitdir_path(pipeline_id).join("import");
        let result = (|| {
            if staging.exists() {
                fs::remove_dir_all(&staging).map_err(|e| e.to_string())?;
            }
            copy_object_files(&ws.join(".git/objects"), &staging)?;
            // The agent's objects alone: nothing it wrote can point this at another store.
            let source = Odb::new().map_err(|e| e.message().to_owned())?;
            source
                .add_disk_alternate(&staging.display().to_string())
                .map_err(|e| e.message().to_owned())?;
            Import::new(&source, repo)?.run(tip, start)
        })();
        let _ = fs::remove_dir_all(&staging);
        result.map(|()| Some(tip)).map_err(passed_over)
    }

    /// Whether the pipeline's branch here holds `commit` (is it or descends from it).
    pub fn has_commit(&self, pipeline: &Pipeline, commit: &str) -> Result<bool, GitError> {
        let repo = Repository::open_bare(self.gitdir_path(&pipeline.id))?;
        let Ok(wanted) = Oid::from_str(commit) else {
            return Ok(false);
        };
        let head = repo.refname_to_id(&format!("refs/heads/{}", pipeline.branch))?;
        Ok(head == wanted || repo.graph_descendant_of(head, wanted).unwrap_or(false))
    }

    /// Keeps what a run left here after its worker lost the run to another one: the
    /// work tree's changes and any commit not on the remote go to
    /// `refs/threadline/set-aside/RUN` (never pushed), and the branch and work tree go
    /// back to what the remote has, so the pipeline's next run here starts clean from
    /// the branch as the new owner pushed it. Returns the set-aside commit, if any.
    pub fn set_aside(
        &self,
        pipeline: &Pipeline,
        info: &CommitInfo<'_>,
        owner: Option<(u32, u32)>,
    ) -> Result<Option<SetAside>, GitError> {
        if !self.gitdir_path(&pipeline.id).exists() {
            return Ok(None);
        }
        let repo = self.open_pipeline(&pipeline.id)?;
        let branch_ref = format!("refs/heads/{}", pipeline.branch);
        let Ok(head) = repo.refname_to_id(&branch_ref) else {
            return Ok(None);
        };
        drop(repo);
        let saved = self.save(pipeline, &head.to_string(), info, owner)?;
        let _held = DirLock::acquire(&self.gitdir_path(&pipeline.id))?;
        let repo = self.open_pipeline(&pipeline.id)?;
        let tip = Oid::from_str(&saved.head)?;
        let keep = repo
            .refname_to_id(&format!("refs/remotes/origin/{}", pipeline.branch))
            .or_else(|_| repo.refname_to_id(&format!("refs/remotes/origin/{}", pipeline.base_branch)))?;
        if tip == keep {
            return Ok(None);
        }
        // Never over an earlier one (a run set aside again, by another cause).
        let name = (1..)
            .map(|n| match n {
                1 => format!("refs/threadline/set-aside/{}", info.run_id),
                n => format!("refs/threadline/set-aside/{}-{n}", info.run_id),
            })
            .find(|name| repo.find_reference(name).is_err())
            .expect("some name is free");
        repo.reference(&name, tip, false, "threadline: work here kept aside, never pushed")?;
        let commit = repo.find_commit(keep)?;
        let mut how = CheckoutBuilder::new();
        // Everything the work tree held is in the set-aside commit.
        how.force().remove_untracked(false);
        repo.checkout_tree(commit.as_object(), Some(&mut how))?;
        repo.reference(
            &branch_ref,
            keep,
            true,
            "threadline: back to the remote after a lost lease",
        )?;
        repo.set_head(&branch_ref)?;
        Ok(Some(SetAside {
            reference: name,
            commit: tip.to_string(),
        }))
    }

    /// Where the branch stands against the remote, as of the last fetch or push.
    pub fn push_state(&self, pipeline: &Pipeline) -> Result<PushState, GitError> {
        let repo = Repository::open_bare(self.gitdir_path(&pipeline.id))?;
        let tracking = |branch: &str| repo.refname_to_id(&format!("refs/remotes/origin/{branch}")).ok();
        let head = repo.refname_to_id(&format!("refs/heads/{}", pipeline.branch))?;
        let (remote, base) = (tracking(&pipeline.branch), tracking(&pipeline.base_branch));
        Ok(if remote == Some(head) {
            PushState::Pushed
        } else if remote.is_none() && base == Some(head) {
            // A branch identical to its base is not worth pushing.
            PushState::NothingToPush
        } else {
            PushState::Needed
        })
    }

    /// Pushes the pipeline's branch, and nothing else, without force, from the daemon's
    /// own git directory to the URL in the store. A local-only pipeline pushes into
    /// Threadline's mirror, never into the user's checkout. `may_send` is asked before
    /// and, last, in the push's negotiation (the remote's branches are known, the pack
    /// not yet sent): a worker whose lease may run out pushes nothing.
    pub fn push(&self, pipeline: &Pipeline, may_send: &(dyn Fn() -> bool + Sync)) -> Result<(), GitError> {
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
        let _held = DirLock::acquire(&self.gitdir_path(&pipeline.id))?;
        let (target, _mirror_held) = if pipeline.local_only {
            let mirror = self.mirror_path(&pipeline.remote_url);
            let held = DirLock::acquire(&mirror)?;
            (mirror.display().to_string(), Some(held))
        } else {
            (pipeline.remote_url.clone(), None)
        };
        let repo = Repository::open_bare(self.gitdir_path(&pipeline.id))?;
        let mut remote = repo.remote_anonymous(&target)?;
        let rejection = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let mut cb = self.callbacks(&target);
        let seen = rejection.clone();
        cb.push_update_reference(move |_refname, status| {
            if let Some(msg) = status {
                *seen.lock().unwrap() = Some(msg.to_owned());
            }
            Ok(())
        });
        cb.push_negotiation(move |_updates| {
            if !may_send() {
                return Err(git2::Error::from_str(TOO_LATE));
            }
            Ok(())
        });
        let mut opts = PushOptions::new();
        opts.remote_callbacks(cb);
        // No leading '+': the remote refuses anything but a fast-forward.
        let spec = format!("refs/heads/{branch}:refs/heads/{branch}");
        if !may_send() {
            return Err(GitError::PushTooLate { remote: target });
        }
        remote.push(&[spec.as_str()], Some(&mut opts)).map_err(|e| {
            let detail = e.message().to_owned();
            if detail.contains(TOO_LATE) {
                GitError::PushTooLate { remote: target.clone() }
            } else if detail.contains("non-fast-forward") || detail.contains("fetch first") {
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
        // Remember what the remote now has, for `push_state`.
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

/// What the push negotiation answers when the lease may run out before the push ends.
const TOO_LATE: &str = "threadline: the lease may run out before this push ends";

/// Removes the links in the work tree that the index does not track as links (ones the
/// agent left ignored, which saving keeps): a checkout that adds a file where such a
/// link stands writes through it, as root.
fn remove_untracked_links(repo: &Repository, ws: &Path) -> Result<(), GitError> {
    let index = repo.index()?;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = ws.join(&rel);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let tracked = index.get_path(&rel, 0).is_some_and(|e| e.mode == 0o120000);
            if !tracked {
                fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
            }
        } else if meta.is_dir() && rel != Path::new(".git") {
            for entry in fs::read_dir(&path).map_err(io_err("cannot read", &path))? {
                let entry = entry.map_err(io_err("cannot read", &path))?;
                stack.push(rel.join(entry.file_name()));
            }
        }
    }
    Ok(())
}

/// Creates a file that must not exist yet (so never through a link someone left).
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), GitError> {
    use std::io::Write;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(io_err("cannot write", path))
}

/// A value for a git config file: one line, quoted, backslashes and quotes escaped.
fn config_value(value: &str) -> String {
    let one_line: String = value.chars().filter(|c| !c.is_control()).collect();
    format!("\"{}\"", one_line.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The host part of a remote URL (`https://host/…`, `ssh://user@host:22/…`,
/// `user@host:path`), lower-cased; None for a local path.
fn url_host(url: &str) -> Option<String> {
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme != "file" => rest,
        Some(_) => return None,
        None if url.contains(':') && !url.starts_with('/') => url,
        None => return None,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
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
    // Larger blobs count as binary and are never loaded whole to count their lines.
    let mut opts = git2::DiffOptions::new();
    opts.max_size(8 * 1024 * 1024);
    let stats = repo
        .diff_tree_to_tree(Some(&old), Some(&new), Some(&mut opts))?
        .stats()?;
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
                exclude: &[],
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
