//! The orchestrator: turns prompts into runs on pipelines, schedules them, executes each
//! in a container and saves its work to git. **It never names Slack, Discord or HTTP**;
//! front ends call it with domain words and render what it reports.

pub mod agent_events;
pub mod container;
pub mod egress;
pub mod environment;
mod executor;
pub mod forge;
pub mod ports;
mod pulls;
mod queries;
mod reviews;
mod scheduler;
pub mod scrub;
pub mod workspace;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::model::{Attachment, AttachmentSource, Origin, Pipeline, Run, RunMode, RunState, now_millis};
use crate::redact::Redactor;
use crate::store::{NewRun, Store};
use crate::untrusted;

pub use crate::store::{InstanceInfo, LEASE_MILLIS, PipelineSummary, StoreError, ThreadMessage};

/// The most of one thread message kept as context.
pub const MAX_THREAD_MESSAGE_BYTES: usize = 4096;
pub use container::{ContainerError, ContainerRuntime};
pub use ports::{Containers, Workspaces};
pub use pulls::{NextStep, PullRequestError, PullRequestOutcome, PullRequestView};
pub use queries::{Queries, copy_store};
pub use reviews::{HookOutcome, WebhookError};
pub use scheduler::{Role, Scope};
pub use workspace::{Git, GitError};

/// What happened to a run, for whoever is watching in this process.
#[derive(Debug, Clone)]
pub enum RunUpdate {
    /// The run moved to a new state (the run as stored after the move).
    State(Box<Run>),
    /// A line the agent printed (redacted).
    Log { run_id: String, line: String },
}

/// A prompt that starts a new pipeline.
#[derive(Debug, Clone)]
pub struct NewPipeline {
    pub repo: String,
    pub base_branch: Option<String>,
    pub agent: Option<String>,
    pub prompt: String,
    pub requested_by: String,
    pub origin: Origin,
    /// Makes the request safe to deliver twice (a chat event id, a CLI flag).
    pub idempotency_key: Option<String>,
    /// A change (the default), or a question answered on a read-only workspace.
    pub mode: RunMode,
    /// Files attached to the message, for the agent under `/threadline/attachments/`.
    pub attachments: Vec<NewAttachment>,
}

/// A file attached to a prompt.
#[derive(Debug, Clone)]
pub enum NewAttachment {
    /// Uploaded with the prompt (the web chat): kept by Threadline.
    Upload { name: String, bytes: Vec<u8> },
    /// Where to fetch it when the run is prepared (a chat platform's file), or a file
    /// an earlier run had (a retry).
    Source(Attachment),
}

/// Refuses more attachments, or bigger uploads, than a run may have.
fn check_attachments(attachments: &[NewAttachment]) -> Result<(), SubmitError> {
    if attachments.len() > MAX_ATTACHMENTS {
        return Err(SubmitError::Attachments(format!(
            "{} files are attached, more than the {MAX_ATTACHMENTS} a run may have",
            attachments.len()
        )));
    }
    let mut total = 0;
    for a in attachments {
        if let NewAttachment::Upload { name, bytes } = a {
            if bytes.len() > MAX_ATTACHMENT_BYTES {
                return Err(SubmitError::Attachments(format!(
                    "the attached file {name:?} is {} bytes, over the limit of {MAX_ATTACHMENT_BYTES}",
                    bytes.len()
                )));
            }
            total += bytes.len();
        }
    }
    if total > MAX_RUN_ATTACHMENT_BYTES {
        return Err(SubmitError::Attachments(format!(
            "the attached files are {total} bytes in all, over the limit of {MAX_RUN_ATTACHMENT_BYTES}"
        )));
    }
    Ok(())
}

/// The most files one run gets.
pub const MAX_ATTACHMENTS: usize = 20;
/// The most of one attached file an agent gets.
pub const MAX_ATTACHMENT_BYTES: usize = 10 * 1024 * 1024;
/// The most of all the files attached to one run.
pub const MAX_RUN_ATTACHMENT_BYTES: usize = 25 * 1024 * 1024;

/// A prompt that continues a pipeline.
#[derive(Debug, Clone)]
pub struct FollowUp {
    pub pipeline_id: String,
    pub prompt: String,
    pub agent: Option<String>,
    pub requested_by: String,
    pub idempotency_key: Option<String>,
    pub mode: RunMode,
    pub attachments: Vec<NewAttachment>,
}

#[derive(Debug, Clone)]
pub struct Submitted {
    pub pipeline: Pipeline,
    pub run: Run,
    /// False when the idempotency key found an earlier run: nothing new was started.
    pub created: bool,
    /// Runs ahead of this one in its pipeline (0: it is next).
    pub ahead: usize,
}

/// Why an orchestrator could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Docker(#[from] ContainerError),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the prompt is empty: say what the agent should do")]
    EmptyPrompt,
    #[error("the prompt is {len} bytes, over the limit of {max}; shorten it or put the details in a file in the repo")]
    PromptTooLong { len: usize, max: usize },
    #[error(
        "the prompt contains the control character U+{code:04X} at byte {at}; remove it (a prompt may hold tabs and line breaks, no other control characters)"
    )]
    ControlCharacter { code: u32, at: usize },
    #[error("{0}; nothing was started")]
    Attachments(String),
    #[error("there is no agent named {name:?}; the configured agents are: {}", .known.join(", "))]
    UnknownAgent { name: String, known: Vec<String> },
    #[error("no pipeline {0:?}")]
    UnknownPipeline(String),
    #[error(
        "the base branch {base:?} is below {prefix:?}, where Threadline's agents push; start from a branch people own (e.g. main)"
    )]
    BaseIsPipelineBranch { base: String, prefix: String },
    #[error("no run {0:?}")]
    UnknownRun(String),
    #[error("run {id} is {state}; only a failed, timed out or cancelled run can be retried")]
    NotRetryable { id: String, state: RunState },
    #[error(transparent)]
    Repo(#[from] GitError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a cancel request did.
#[derive(Debug, Clone, Default)]
pub struct Cancelled {
    /// Runs cancelled while still queued.
    pub dequeued: Vec<String>,
    /// Active runs asked to stop; they save their work and end `cancelled`.
    pub stopping: Vec<String>,
}

/// This process's lease, as it knows it.
#[derive(Debug, Clone, Copy, Default)]
struct Lease {
    /// When it was last renewed (on [`boot_clock`], when the renewal was asked). None:
    /// it holds none, as in tests that drive an executor alone.
    renewed: Option<std::time::Duration>,
    /// How many times it was found expired (and taken again).
    lost: u64,
}

/// How long before its lease could run out a push must have begun sending: the time a
/// remote needs to take in a pack and update its branch, and the clocks' drift.
const PUSH_MARGIN: std::time::Duration = std::time::Duration::from_millis(1_000);

/// Whether a push may begin sending now (see [`Inner::fence_push`]).
type PushFence = Box<dyn Fn() -> bool + Send + Sync>;

/// Time since the host booted, suspended time included (`CLOCK_BOOTTIME`): the lease is
/// timed on it, because std's `Instant` stands still while the host sleeps, and the
/// database's clock, which the lease really runs on, does not.
fn boot_clock() -> std::time::Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: Arc<Config>,
    store: Store,
    runtime: Arc<dyn Containers>,
    git: Arc<dyn Workspaces>,
    redactor: Redactor,
    events: broadcast::Sender<RunUpdate>,
    wake: Notify,
    instance_id: String,
    /// This worker: its home on this host, its name and labels.
    worker: WorkerIdentity,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Runs executing in this process, each with what stops its executor when another
    /// process has taken the run over.
    executing: Mutex<HashMap<String, CancellationToken>>,
    /// This process's lease as it knows it.
    lease: Mutex<Lease>,
    /// Cancelled once the process gives its lease up, as it stops: no renewal after.
    released: CancellationToken,
    /// Relays runs other processes execute to this process's watchers (a front end).
    relay: std::sync::atomic::AtomicBool,
    /// The chat surfaces whose status messages this process keeps (its front ends'
    /// status updaters): runs it submits from their threads are its own to post.
    posting: Mutex<std::collections::BTreeSet<String>>,
    /// One git fetch into a mirror at a time.
    mirror_locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// The forges' HTTP client, made on the first Open PR (not at start-up).
    http: std::sync::OnceLock<crate::http::JsonClient>,
    /// One Open PR at a time per pipeline.
    pr_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Forges (by API root) that answered with a rate limit, and until when they are
    /// left alone by the pull request poll.
    forge_backoff: Mutex<HashMap<String, std::time::Instant>>,
    /// One environment build per key at a time; the others wait for it.
    env_builds: environment::EnvBuilds,
    /// Builds that failed lately, by key: when, and why.
    env_failures: Mutex<HashMap<String, (std::time::Instant, String)>>,
    /// This installation's id, in its environments' names and labels.
    env_home: String,
    /// The egress proxies of running allowlisted agents, by run.
    egress: Mutex<HashMap<String, Arc<egress::RunProxy>>>,
    /// The configured repositories as pipelines record them (canonical path or URL),
    /// with their `[repos]` names.
    repo_keys: Vec<(String, String)>,
    /// The daemon's own uid and gid.
    me: (u32, u32),
    metrics: Arc<crate::metrics::Metrics>,
}

impl Orchestrator {
    pub fn new(config: Arc<Config>, store: Store, runtime: ContainerRuntime) -> Self {
        let git = Arc::new(Git::new(&config));
        Self::with_ports(config, store, Arc::new(runtime), git)
    }

    /// Opens the store the configuration names and connects to Docker.
    pub async fn open(config: Arc<Config>) -> Result<Self, OpenError> {
        let store = Store::open(&config.database_url()).await?;
        let runtime = ContainerRuntime::connect().await?;
        Ok(Self::new(config, store, runtime))
    }

    /// Opens the store for a process that executes no runs (`serve --no-worker`): no
    /// Docker engine is needed.
    pub async fn open_front_end(config: Arc<Config>) -> Result<Self, OpenError> {
        let store = Store::open(&config.database_url()).await?;
        let git = Arc::new(Git::new(&config));
        Ok(Self::with_ports(config, store, Arc::new(ports::NoContainers), git))
    }

    /// An orchestrator on other containers and workspaces than Docker and libgit2 (the
    /// tests' fakes, another executor).
    pub fn with_ports(
        config: Arc<Config>,
        store: Store,
        runtime: Arc<dyn Containers>,
        git: Arc<dyn Workspaces>,
    ) -> Self {
        let (events, _) = broadcast::channel(1024);
        let worker = WorkerIdentity::of(&config);
        let env_home = environment::home_id(&config.data_dir);
        let redactor = Redactor::new(config.secret_values());
        let repo_keys = config
            .repos
            .iter()
            .map(|(name, r)| {
                let key = std::fs::canonicalize(&r.url)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| r.url.clone());
                (key, name.clone())
            })
            .collect();
        Orchestrator {
            inner: Arc::new(Inner {
                git,
                me: own_ids(&config.data_dir),
                config,
                store,
                runtime,
                redactor,
                events,
                wake: Notify::new(),
                instance_id: uuid::Uuid::new_v4().simple().to_string(),
                worker,
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                executing: Mutex::new(HashMap::new()),
                lease: Mutex::new(Lease::default()),
                released: CancellationToken::new(),
                relay: std::sync::atomic::AtomicBool::new(false),
                posting: Mutex::new(std::collections::BTreeSet::new()),
                mirror_locks: Mutex::new(HashMap::new()),
                http: std::sync::OnceLock::new(),
                pr_locks: Mutex::new(HashMap::new()),
                forge_backoff: Mutex::new(HashMap::new()),
                env_builds: Default::default(),
                env_failures: Mutex::new(HashMap::new()),
                env_home,
                egress: Mutex::new(HashMap::new()),
                repo_keys,
                metrics: Arc::new(crate::metrics::Metrics::new()),
            }),
        }
    }

    /// The store itself, for tests and the orchestrator's own modules; front ends read
    /// through [`Orchestrator::queries`].
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// What front ends may read.
    pub fn queries(&self) -> Queries {
        Queries::new(self.inner.store.clone())
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// This process's worker name (people see it on `threadline workers`).
    pub fn worker_name(&self) -> &str {
        &self.inner.worker.name
    }

    /// The worker holding the pipeline's workspace when it is another one than this
    /// process's: (name, host).
    pub async fn workspace_elsewhere(&self, pipeline_id: &str) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .inner
            .store
            .holder(pipeline_id)
            .await?
            .filter(|(id, _, _)| *id != self.inner.worker.id)
            .map(|(_, name, host)| (name, host)))
    }

    /// Makes this process the one that keeps the run's chat status message, unless
    /// another live front end is: with several `serve` processes, one posts per run.
    pub async fn claim_status_message(&self, run_id: &str) -> Result<bool, StoreError> {
        self.inner.store.claim_poster(run_id, &self.inner.instance_id).await
    }

    /// Says that this process keeps the status messages of runs from `surface`'s threads
    /// (a front end's status updater says so as it starts). A run it then submits from
    /// such a thread is its own to post from the start, so the message comes from the
    /// front end that answered the prompt, not from whichever saw the run first.
    pub fn posts_status_on(&self, surface: &str) {
        self.inner.posting.lock().unwrap().insert(surface.to_owned());
    }

    /// This process, when it keeps the status messages of the pipeline's thread.
    fn poster_for(&self, pipeline: &Pipeline) -> Option<String> {
        let posting = self.inner.posting.lock().unwrap();
        posting
            .contains(&pipeline.origin.surface)
            .then(|| self.inner.instance_id.clone())
    }

    pub fn redactor(&self) -> &Redactor {
        &self.inner.redactor
    }

    /// This process's metrics registry (`/metrics`).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RunUpdate> {
        self.inner.events.subscribe()
    }

    /// The full log of a run (redacted when written).
    pub fn log_path(&self, run_id: &str) -> PathBuf {
        log_path(&self.inner.config.data_dir, run_id)
    }

    /// Threadline's bare mirror of the pipeline's repository (where a local-only
    /// pipeline's branch lives).
    pub fn mirror_path(&self, pipeline: &Pipeline) -> PathBuf {
        self.inner.git.mirror_path(&pipeline.remote_url)
    }

    pub fn workspace_path(&self, pipeline_id: &str) -> PathBuf {
        self.inner.git.workspace_path(pipeline_id)
    }

    /// The pipeline's object store, which agents get read-only.
    pub fn objects_path(&self, pipeline_id: &str) -> PathBuf {
        self.inner.git.objects_path(pipeline_id)
    }

    /// Starts a pipeline with its first run, queued.
    pub async fn submit_pipeline(&self, req: NewPipeline) -> Result<Submitted, SubmitError> {
        let config = &self.inner.config;
        let prompt = self.check_prompt(&req.prompt)?;
        let agent = self.check_agent(req.agent.as_deref())?;
        check_attachments(&req.attachments)?;
        if let Some(key) = &req.idempotency_key
            && let Some(run) = self.inner.store.run_for_idempotency_key(Some(key)).await?
        {
            return self.submitted(run, false).await;
        }
        let source = {
            let repo = req.repo.clone();
            tokio::task::spawn_blocking(move || workspace::resolve_repo(&repo))
                .await
                .expect("resolve_repo does not panic")?
        };
        let base_branch = req.base_branch.unwrap_or_else(|| config.default_base_branch.clone());
        // A base is what environments are set up from: never a branch agents push to.
        if base_branch.starts_with(&config.branch_prefix) {
            return Err(SubmitError::BaseIsPipelineBranch {
                base: base_branch,
                prefix: config.branch_prefix.clone(),
            });
        }
        let id = new_pipeline_id();
        // Branch names and titles are pushed and shown: never made from a secret.
        let shown = self.inner.redactor.redact(&prompt);
        let pipeline = Pipeline {
            branch: workspace::branch_name(&config.branch_prefix, &shown, &id),
            id,
            repo: source.repo,
            remote_url: source.remote_url,
            local_only: source.local_only,
            base_branch,
            agent: agent.clone(),
            title: shown.lines().next().unwrap_or_default().chars().take(120).collect(),
            origin: req.origin,
            created_at: now_millis(),
        };
        let new_run = NewRun {
            requires: self.inner.required_labels(&agent, &pipeline),
            prompt,
            agent,
            requested_by: req.requested_by,
            idempotency_key: req.idempotency_key,
            mode: req.mode,
            attachments: self.keep_attachments(req.attachments).await?,
            forge_request: None,
            poster: self.poster_for(&pipeline),
        };
        let inserted = self.inner.store.insert_pipeline(&pipeline, &new_run).await?;
        self.drop_unused_uploads(&new_run, inserted.created).await;
        self.after_insert(inserted.run, inserted.created).await
    }

    /// Queues a follow-up on a pipeline; it runs after the runs before it.
    pub async fn submit_follow_up(&self, req: FollowUp) -> Result<Submitted, SubmitError> {
        self.queue_follow_up(req, None).await
    }

    /// A follow-up, with the review comment that asked for it if one did.
    async fn queue_follow_up(
        &self,
        req: FollowUp,
        forge_request: Option<crate::store::ForgeRequest>,
    ) -> Result<Submitted, SubmitError> {
        let prompt = self.check_prompt(&req.prompt)?;
        check_attachments(&req.attachments)?;
        let pipeline = self
            .inner
            .store
            .find_pipeline(&req.pipeline_id)
            .await?
            .ok_or_else(|| SubmitError::UnknownPipeline(req.pipeline_id.clone()))?;
        let agent = self.check_agent(Some(req.agent.as_deref().unwrap_or(&pipeline.agent)))?;
        let new_run = NewRun {
            requires: self.inner.required_labels(&agent, &pipeline),
            prompt,
            agent,
            requested_by: req.requested_by,
            idempotency_key: req.idempotency_key,
            mode: req.mode,
            attachments: self.keep_attachments(req.attachments).await?,
            forge_request,
            poster: self.poster_for(&pipeline),
        };
        let inserted = self.inner.store.insert_run(&pipeline.id, &new_run).await?;
        self.drop_unused_uploads(&new_run, inserted.created).await;
        self.after_insert(inserted.run, inserted.created).await
    }

    /// Queues a new run with the prompt and agent of a run that did not succeed.
    pub async fn retry(
        &self,
        run_id: &str,
        requested_by: &str,
        idempotency_key: Option<String>,
    ) -> Result<Submitted, SubmitError> {
        let run = self.find_run(run_id).await?;
        if let Some(key) = &idempotency_key
            && let Some(found) = self.inner.store.run_for_idempotency_key(Some(key)).await?
        {
            return self.submitted(found, false).await;
        }
        if !run.state.can_retry() {
            return Err(SubmitError::NotRetryable {
                id: run.id,
                state: run.state,
            });
        }
        self.submit_follow_up(FollowUp {
            pipeline_id: run.pipeline_id,
            prompt: run.prompt,
            agent: Some(run.agent),
            requested_by: requested_by.to_owned(),
            idempotency_key,
            mode: run.mode,
            attachments: self
                .inner
                .store
                .attachments(&run.id)
                .await?
                .into_iter()
                .map(NewAttachment::Source)
                .collect(),
        })
        .await
    }

    /// Gives attachments safe, unique names and keeps uploads in the store.
    async fn keep_attachments(&self, attachments: Vec<NewAttachment>) -> Result<Vec<Attachment>, SubmitError> {
        let mut kept: Vec<Attachment> = Vec::new();
        let batch = uuid::Uuid::new_v4().simple().to_string();
        for a in attachments {
            let wanted = match &a {
                NewAttachment::Source(a) => a.name.clone(),
                NewAttachment::Upload { name, .. } => name.clone(),
            };
            let base = crate::model::safe_file_name(&wanted);
            let mut name = base.clone();
            let mut n = 1;
            while kept.iter().any(|k| k.name == name) {
                n += 1;
                name = format!("{n}-{base}");
            }
            let source = match a {
                NewAttachment::Source(a) => a.source,
                NewAttachment::Upload { bytes, .. } => {
                    // In the database, so a worker on any host gives it to its agent.
                    let key = format!("{batch}/{name}");
                    self.inner.store.put_upload(&key, &bytes).await.map_err(|e| {
                        SubmitError::Attachments(format!("cannot keep the attached file {name:?}: {e}"))
                    })?;
                    AttachmentSource::Stored { key }
                }
            };
            kept.push(Attachment { name, source });
        }
        Ok(kept)
    }

    /// Removes the uploads of a request that started nothing (a redelivery).
    async fn drop_unused_uploads(&self, run: &NewRun, created: bool) {
        if created {
            return;
        }
        for a in &run.attachments {
            if let AttachmentSource::Stored { key } = &a.source {
                let _ = self.inner.store.remove_upload(key).await;
            }
        }
    }

    /// Keeps a message said in a pipeline's thread that started no run, as context for
    /// the pipeline's next run: cleaned of control characters and capped. A failure to
    /// keep it is logged; the conversation goes on.
    pub async fn note_thread_message(
        &self,
        pipeline_id: &str,
        message_id: &str,
        author: &str,
        text: &str,
        files: &[Attachment],
    ) {
        let message = ThreadMessage {
            message_id: untrusted::prefix(message_id, 200).to_owned(),
            author: untrusted::prefix(&untrusted::clean(author), 200).to_owned(),
            text: untrusted::truncate(&untrusted::clean(text), MAX_THREAD_MESSAGE_BYTES),
            at: now_millis(),
            files: files
                .iter()
                .take(MAX_ATTACHMENTS)
                .map(|f| Attachment {
                    name: crate::model::safe_file_name(&f.name),
                    source: f.source.clone(),
                })
                .collect(),
        };
        if let Err(e) = self.inner.store.add_thread_message(pipeline_id, &message).await {
            tracing::warn!(pipeline_id, error = %e, "cannot keep a thread message as context");
        }
    }

    /// Cancels a run, or every unfinished run of a pipeline.
    pub async fn cancel(&self, target: &str) -> Result<Cancelled, SubmitError> {
        let store = &self.inner.store;
        let runs = match store.run(target).await? {
            Some(run) => vec![run],
            None => match store.find_pipeline(target).await? {
                Some(p) => store.runs(&p.id).await?,
                None => return Err(SubmitError::UnknownRun(target.to_owned())),
            },
        };
        let mut out = Cancelled::default();
        // Queued ones first, so none of them starts while the active one stops.
        for run in runs.iter().rev().filter(|r| r.state.can_cancel()) {
            if store.request_cancel(&run.id).await? {
                out.dequeued.push(run.id.clone());
                let _ = self.inner.publish_moved(&run.id).await;
            } else if let Some(now) = store.run(&run.id).await?
                && now.state.is_active()
            {
                out.stopping.push(run.id.clone());
                // Its executor sees the request within a moment wherever it runs; here,
                // the container is stopped at once.
                let here = self.inner.executing.lock().unwrap().contains_key(&run.id);
                if now.state == RunState::Running && here {
                    self.stop_container_soon(&now);
                }
            }
        }
        out.dequeued.reverse();
        self.inner.wake.notify_one();
        Ok(out)
    }

    /// Resolves a run id; a pipeline id means its latest run.
    pub async fn find_run(&self, id: &str) -> Result<Run, SubmitError> {
        self.inner
            .store
            .find_run(id)
            .await?
            .ok_or_else(|| SubmitError::UnknownRun(id.to_owned()))
    }

    /// Runs ahead of `run` in its pipeline.
    pub async fn runs_ahead(&self, run: &Run) -> Result<usize, StoreError> {
        let runs = self.inner.store.runs(&run.pipeline_id).await?;
        Ok(crate::model::runs_ahead(&runs, run))
    }

    fn check_prompt(&self, prompt: &str) -> Result<String, SubmitError> {
        let prompt = prompt.trim();
        if prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let max = self.inner.config.max_prompt_bytes;
        if prompt.len() > max {
            return Err(SubmitError::PromptTooLong { len: prompt.len(), max });
        }
        // Refused rather than stripped: the prompt is run as written (a script agent runs
        // it as a shell script), and a NUL cannot even reach a container's argv.
        if let Some((at, c)) = prompt
            .char_indices()
            .find(|(_, c)| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        {
            return Err(SubmitError::ControlCharacter { code: c.into(), at });
        }
        Ok(prompt.to_owned())
    }

    fn check_agent(&self, name: Option<&str>) -> Result<String, SubmitError> {
        let config = &self.inner.config;
        let name = name.unwrap_or(&config.default_agent);
        if config.agent(name).is_none() {
            return Err(SubmitError::UnknownAgent {
                name: name.to_owned(),
                known: config.agent_names(),
            });
        }
        Ok(name.to_owned())
    }

    async fn after_insert(&self, run: Run, created: bool) -> Result<Submitted, SubmitError> {
        if created {
            crate::crash::point(crate::crash::Step::Queued);
            tracing::info!(run_id = %run.id, pipeline_id = %run.pipeline_id, state = "queued", "run queued");
            self.inner.publish(run.clone());
            self.inner.wake.notify_one();
        }
        self.submitted(run, created).await
    }

    async fn submitted(&self, run: Run, created: bool) -> Result<Submitted, SubmitError> {
        let pipeline = self
            .inner
            .store
            .pipeline(&run.pipeline_id)
            .await?
            .ok_or_else(|| SubmitError::UnknownPipeline(run.pipeline_id.clone()))?;
        let ahead = self.runs_ahead(&run).await?;
        Ok(Submitted {
            pipeline,
            run,
            created,
            ahead,
        })
    }

    fn mirror_lock(&self, remote_url: &str) -> Arc<tokio::sync::Mutex<()>> {
        executor::mirror_lock(&self.inner, remote_url)
    }

    /// Stops a run's container now rather than at its owner's next check.
    fn stop_container_soon(&self, run: &Run) {
        let runtime = self.inner.runtime.clone();
        let grace = self
            .inner
            .config
            .agent(&run.agent)
            .map(|a| a.stop_grace_secs)
            .unwrap_or(10);
        let name = container::container_name(&run.id);
        self.inner.tracker.spawn(async move {
            if let Err(e) = runtime.stop(&name, std::time::Duration::from_secs(grace)).await {
                tracing::warn!(container = %name, error = %e, "could not stop the container");
            }
        });
    }

    /// Waits until nothing in `scope` is queued or executing here.
    pub async fn wait_until_idle(&self, scope: &Scope) -> Result<(), StoreError> {
        // How long runs may stay ours but unexecuted (an executor that died on an error)
        // before they are left to the next start instead of waited for forever.
        const STRANDED: std::time::Duration = std::time::Duration::from_secs(10);
        let mut unexecuted_since: Option<tokio::time::Instant> = None;
        loop {
            let pending = self
                .inner
                .store
                .runs_in_states(&[RunState::Queued])
                .await?
                .into_iter()
                .any(|r| scope.includes(&r.pipeline_id));
            // A claimed run is `preparing` in the store before its executor is registered:
            // count the store's active runs of this process too, or that moment looks idle.
            let mut owned = false;
            let mut others = false;
            for (run, owner) in self.inner.store.active_runs_with_owner().await? {
                if scope.includes(&run.pipeline_id) {
                    if owner.as_deref() == Some(self.inner.instance_id.as_str()) {
                        owned = true;
                    } else {
                        // Another process's, or a dead one's that recovery adopts once
                        // its lease expires: not idle either way.
                        others = true;
                    }
                }
            }
            let executing = !self.inner.executing.lock().unwrap().is_empty();
            if others {
                unexecuted_since = None;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            if !pending && !owned && !executing {
                return Ok(());
            }
            if !pending && owned && !executing {
                let since = *unexecuted_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= STRANDED {
                    tracing::warn!("runs of this process stopped without finishing; the next start resumes them");
                    return Ok(());
                }
            } else {
                unexecuted_since = None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Stops scheduling, lets saving runs finish, and leaves running containers to be
    /// adopted by the next start.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        // Executors stop at once but for a git step under way (a preparation or a save),
        // which is left a moment to finish, the lease still renewed so that a save may
        // push; whatever is cut short, the next start resumes from the stored state (the
        // same path as a crash).
        if tokio::time::timeout(std::time::Duration::from_secs(10), self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("runs still preparing or saving after 10 s; the next start resumes them");
        }
        self.inner.released.cancel();
        // Agents left running are this worker's to resume: its restart adopts them at
        // once; other workers take them over only if it is not back within the grace.
        let _ = self
            .inner
            .store
            .release_instance(&self.inner.instance_id, STOP_GRACE_MILLIS)
            .await;
    }
}

/// How long a worker that stopped gracefully with agents running keeps its runs from
/// other workers (a restart, an upgrade), on top of the lease.
pub const STOP_GRACE_MILLIS: crate::model::Millis = 30_000;

/// Everything Threadline keeps about one run besides the database.
pub fn run_dir(data_dir: &Path, run_id: &str) -> PathBuf {
    data_dir.join("runs").join(run_id)
}

/// A run's full log (cleaned and redacted when written).
pub fn log_path(data_dir: &Path, run_id: &str) -> PathBuf {
    run_dir(data_dir, run_id).join("agent.log")
}

impl Inner {
    /// The `[repos]` entry a pipeline came from, by name; for a repository named only on
    /// the command line, `NAME` (for messages that say where to configure it) and the
    /// defaults.
    pub(crate) fn repo_settings(&self, pipeline: &Pipeline) -> (&str, &crate::config::RepoConfig) {
        static UNCONFIGURED: std::sync::LazyLock<crate::config::RepoConfig> =
            std::sync::LazyLock::new(crate::config::RepoConfig::default);
        self.repo_keys
            .iter()
            .find(|(key, _)| *key == pipeline.repo)
            .and_then(|(_, name)| self.config.repos.get_key_value(name))
            .map_or(("NAME", &*UNCONFIGURED), |(n, r)| (n.as_str(), r))
    }

    /// The labels a run of `agent` on `pipeline` needs of its worker.
    fn required_labels(&self, agent: &str, pipeline: &Pipeline) -> String {
        let profile = self
            .config
            .agent(agent)
            .map(|a| a.requires.as_slice())
            .unwrap_or_default();
        let repo = self.repo_settings(pipeline).1.requires.as_slice();
        crate::config::required_labels([profile, repo])
    }

    /// This process as a claimer of runs.
    fn claimer(&self) -> crate::store::Claimer<'_> {
        crate::store::Claimer {
            instance: &self.instance_id,
            worker_id: &self.worker.id,
            labels: &self.config.worker.labels,
            limit: self.config.max_concurrent_runs,
        }
    }

    /// Fences a push, which the database cannot: checks that the run is still this
    /// process's own and returns what the push asks, last in its negotiation, whether
    /// it may begin sending: while the lease checked here was never lost since (a lease
    /// lost and taken again voids what was checked before) and was renewed recently
    /// enough that it cannot run out within [`PUSH_MARGIN`]. No other process can take
    /// the run over before then: the lease runs from the renewal, measured on the
    /// database's clock, which was asked later. The answer follows each renewal, so
    /// waiting for locks or a slow remote costs nothing while the lease is kept.
    async fn fence_push(self: &Arc<Self>, run_id: &str) -> Result<PushFence, StoreError> {
        let epoch = self.lease.lock().unwrap().lost;
        self.store.check_owner(run_id, &self.instance_id).await?;
        let me = Arc::clone(self);
        let lease = std::time::Duration::from_millis(crate::store::LEASE_MILLIS as u64);
        Ok(Box::new(move || {
            let now = *me.lease.lock().unwrap();
            now.lost == epoch
                && now
                    .renewed
                    .is_none_or(|at| boot_clock().saturating_sub(at) + PUSH_MARGIN < lease)
        }))
    }

    /// Stores what the executor learned of a run it owns (fenced on that ownership).
    async fn update_owned(&self, run_id: &str, patch: &crate::store::RunPatch) -> Result<(), StoreError> {
        self.store.update_run_owned(&self.instance_id, run_id, patch).await
    }

    /// Tells every watcher (chat status messages, the web's live stream) a run as it is.
    fn publish(&self, run: Run) {
        let _ = self.events.send(RunUpdate::State(Box::new(run)));
    }

    /// Publishes a run that has just moved to another state; one that ended is counted.
    async fn publish_moved(&self, run_id: &str) -> Result<(), StoreError> {
        if let Some(run) = self.store.run(run_id).await? {
            if run.state.is_terminal() {
                self.metrics.run_ended(&run);
            }
            self.publish(run);
        }
        Ok(())
    }

    /// Reads a run afresh and publishes it.
    async fn publish_stored(&self, run_id: &str) -> Result<(), StoreError> {
        if let Some(run) = self.store.run(run_id).await? {
            self.publish(run);
        }
        Ok(())
    }
}

/// Who this process is as a worker. The id names its home (the data folder on this
/// host, where its workspaces and mirrors are): it is kept in `data_dir/worker-id`, so a
/// restarted worker is the same worker, and two hosts with the same path are not.
#[derive(Debug, Clone)]
pub(crate) struct WorkerIdentity {
    pub id: String,
    pub name: String,
    pub hostname: String,
}

impl WorkerIdentity {
    fn of(config: &Config) -> WorkerIdentity {
        let hostname = gethostname::gethostname().to_string_lossy().into_owned();
        let path = config.data_dir.join("worker-id");
        let id = match std::fs::read_to_string(&path) {
            Ok(id) if !id.trim().is_empty() && id.trim().len() <= 64 => id.trim().to_owned(),
            _ => {
                let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
                let _ = std::fs::create_dir_all(&config.data_dir);
                if let Err(e) = std::fs::write(&path, &id) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot keep this worker's id; a restart will be another worker");
                }
                id
            }
        };
        let name = if config.worker.name.is_empty() {
            hostname.clone()
        } else {
            config.worker.name.clone()
        };
        WorkerIdentity { id, name, hostname }
    }
}

fn new_pipeline_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// The daemon's uid and gid, from a file it owns.
fn own_ids(data_dir: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .or_else(|_| std::fs::metadata(data_dir))
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((1000, 1000))
}
