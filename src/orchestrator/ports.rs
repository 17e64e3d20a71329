//! The executor's seams: the narrow traits through which a run reaches containers and
//! git, in the run's own words. The real adapters implement them (bollard in
//! `container.rs`, libgit2 in `workspace.rs`); another executor (remote Docker hosts,
//! Kubernetes) would implement them without touching the orchestrator, and the tests'
//! recording fakes let the lifecycle run in milliseconds without Docker.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use super::container::{AgentSpec, ContainerError, ContainerRuntime, ContainerStatus};
use super::workspace::{CommitInfo, Git, GitError, Prepared, PullRequestCheck, PushState, Saved};
use crate::model::Pipeline;

/// Where agents run.
#[async_trait]
pub trait Containers: Send + Sync + 'static {
    /// Fails with a sentence naming the image and how to build it when it is missing.
    async fn ensure_image(&self, image: &str) -> Result<(), ContainerError>;
    /// Creates and starts the agent (or takes over the one of its name a crash left).
    async fn start_agent(&self, spec: &AgentSpec) -> Result<String, ContainerError>;
    /// Starts a created container.
    async fn start(&self, id: &str) -> Result<(), ContainerError>;
    async fn status(&self, id_or_name: &str) -> Result<Option<ContainerStatus>, ContainerError>;
    /// Running containers of the pipeline other than `except`.
    async fn running_on_pipeline(&self, pipeline_id: &str, except: &str) -> Result<Vec<String>, ContainerError>;
    /// The output from the start, following until the container exits.
    fn logs(&self, id: &str) -> BoxStream<'static, Result<bytes::Bytes, ContainerError>>;
    /// The exit code once it exits; None when the container is gone.
    async fn wait(&self, id: &str) -> Result<Option<i64>, ContainerError>;
    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), ContainerError>;
    async fn remove(&self, id: &str) -> Result<(), ContainerError>;
}

/// Where a pipeline's work is kept: blocking calls (run them on a blocking thread).
pub trait Workspaces: Send + Sync + 'static {
    fn workspace_path(&self, pipeline_id: &str) -> PathBuf;
    fn objects_path(&self, pipeline_id: &str) -> PathBuf;
    fn mirror_path(&self, remote_url: &str) -> PathBuf;
    fn prepare(&self, pipeline: &Pipeline) -> Result<Prepared, GitError>;
    fn save(
        &self,
        pipeline: &Pipeline,
        start_commit: &str,
        info: &CommitInfo<'_>,
        owner: Option<(u32, u32)>,
    ) -> Result<Saved, GitError>;
    fn push_state(&self, pipeline: &Pipeline) -> Result<PushState, GitError>;
    fn push(&self, pipeline: &Pipeline) -> Result<(), GitError>;
    fn check_pull_request(&self, pipeline: &Pipeline) -> Result<PullRequestCheck, GitError>;
}

#[async_trait]
impl Containers for ContainerRuntime {
    async fn ensure_image(&self, image: &str) -> Result<(), ContainerError> {
        ContainerRuntime::ensure_image(self, image).await
    }
    async fn start_agent(&self, spec: &AgentSpec) -> Result<String, ContainerError> {
        ContainerRuntime::start_agent(self, spec).await
    }
    async fn start(&self, id: &str) -> Result<(), ContainerError> {
        ContainerRuntime::start(self, id).await
    }
    async fn status(&self, id_or_name: &str) -> Result<Option<ContainerStatus>, ContainerError> {
        ContainerRuntime::status(self, id_or_name).await
    }
    async fn running_on_pipeline(&self, pipeline_id: &str, except: &str) -> Result<Vec<String>, ContainerError> {
        ContainerRuntime::running_on_pipeline(self, pipeline_id, except).await
    }
    fn logs(&self, id: &str) -> BoxStream<'static, Result<bytes::Bytes, ContainerError>> {
        Box::pin(ContainerRuntime::logs(self, id))
    }
    async fn wait(&self, id: &str) -> Result<Option<i64>, ContainerError> {
        ContainerRuntime::wait(self, id).await
    }
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), ContainerError> {
        ContainerRuntime::stop(self, id, grace).await
    }
    async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        ContainerRuntime::remove(self, id).await
    }
}

impl Workspaces for Git {
    fn workspace_path(&self, pipeline_id: &str) -> PathBuf {
        Git::workspace_path(self, pipeline_id)
    }
    fn objects_path(&self, pipeline_id: &str) -> PathBuf {
        Git::objects_path(self, pipeline_id)
    }
    fn mirror_path(&self, remote_url: &str) -> PathBuf {
        Git::mirror_path(self, remote_url)
    }
    fn prepare(&self, pipeline: &Pipeline) -> Result<Prepared, GitError> {
        Git::prepare(self, pipeline)
    }
    fn save(
        &self,
        pipeline: &Pipeline,
        start_commit: &str,
        info: &CommitInfo<'_>,
        owner: Option<(u32, u32)>,
    ) -> Result<Saved, GitError> {
        Git::save(self, pipeline, start_commit, info, owner)
    }
    fn push_state(&self, pipeline: &Pipeline) -> Result<PushState, GitError> {
        Git::push_state(self, pipeline)
    }
    fn push(&self, pipeline: &Pipeline) -> Result<(), GitError> {
        Git::push(self, pipeline)
    }
    fn check_pull_request(&self, pipeline: &Pipeline) -> Result<PullRequestCheck, GitError> {
        Git::check_pull_request(self, pipeline)
    }
}
