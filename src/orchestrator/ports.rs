//! The executor's seams: the narrow traits through which a run reaches containers and
//! git, in the run's own words. The real adapters implement them (bollard in
//! `container.rs`, libgit2 in `workspace.rs`); another executor (remote Docker hosts,
//! Kubernetes) would implement them without touching the orchestrator, and the tests'
//! recording fakes let the lifecycle run in milliseconds without Docker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use super::container::{
    AgentSpec, ContainerError, ContainerRuntime, ContainerStatus, EnvImage, ImageConfig, SetupSpec, Whose,
};
use super::workspace::{BaseFiles, CommitInfo, Git, GitError, Prepared, PullRequestCheck, PushState, Saved, SetAside};
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
    /// The runs whose agent containers this worker made and Docker still has.
    async fn runs_of_worker(&self, _worker_id: &str) -> Result<Vec<String>, ContainerError> {
        Ok(Vec::new())
    }
    /// The output from the start, following until the container exits.
    fn logs(&self, id: &str) -> BoxStream<'static, Result<bytes::Bytes, ContainerError>>;
    /// The exit code once it exits; None when the container is gone.
    async fn wait(&self, id: &str) -> Result<Option<i64>, ContainerError>;
    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), ContainerError>;
    async fn remove(&self, id: &str) -> Result<(), ContainerError>;
    /// Stops and removes the run's container named `name` when `whose` matches the worker
    /// that made it, never one of that name made meanwhile. True when one went.
    /// Runtimes without worker labels count every container as this worker's own.
    async fn remove_run_container(
        &self,
        name: &str,
        whose: Whose<'_>,
        grace: Duration,
    ) -> Result<bool, ContainerError> {
        if matches!(whose, Whose::Others(_)) || self.status(name).await?.is_none() {
            return Ok(false);
        }
        let _ = self.stop(name, grace).await;
        self.remove(name).await?;
        Ok(true)
    }

    // Environments and the egress network: runtimes without them refuse.

    /// The image's id, or None when it is missing.
    async fn image_id(&self, _image: &str) -> Result<Option<String>, ContainerError> {
        Err(unsupported("inspect images"))
    }
    async fn image_config(&self, _image: &str) -> Result<ImageConfig, ContainerError> {
        Err(unsupported("inspect images"))
    }
    async fn create_setup(&self, _spec: &SetupSpec) -> Result<String, ContainerError> {
        Err(unsupported("run an environment's setup"))
    }
    async fn commit(
        &self,
        _container: &str,
        _tag: &str,
        _config: ImageConfig,
        _labels: HashMap<String, String>,
    ) -> Result<String, ContainerError> {
        Err(unsupported("commit an environment"))
    }
    /// Builds `dockerfile` of the context as `tag`: what came of it, and the build's output.
    async fn build_dockerfile(
        &self,
        _context_tar: Vec<u8>,
        _dockerfile: &str,
        _tag: &str,
    ) -> (Result<(), ContainerError>, String) {
        (Err(unsupported("build a Dockerfile")), String::new())
    }
    async fn env_images(&self, _home: &str, _repo: Option<&str>) -> Result<Vec<EnvImage>, ContainerError> {
        Ok(Vec::new())
    }
    async fn remove_image(&self, _image: &str) -> Result<bool, ContainerError> {
        Err(unsupported("remove images"))
    }
    async fn egress_gateway(&self, _network: &str) -> Result<std::net::IpAddr, ContainerError> {
        Err(unsupported("make the egress network"))
    }
    async fn container_ip(&self, _id: &str, _network: &str) -> Result<Option<std::net::IpAddr>, ContainerError> {
        Ok(None)
    }
    async fn container_label(&self, _id: &str, _label: &str) -> Result<Option<String>, ContainerError> {
        Ok(None)
    }
    async fn remove_stale_setups(&self, _home: &str, _older_than_secs: u64) -> Result<usize, ContainerError> {
        Ok(0)
    }
}

/// The containers of a process that executes no runs (`serve --no-worker`): it needs no
/// Docker engine, and anything that would start or stop an agent here says why not.
pub struct NoContainers;

fn not_here() -> ContainerError {
    ContainerError::Docker {
        action: "reach Docker",
        detail: "this process executes no runs (serve --no-worker); its workers do".into(),
    }
}

#[async_trait]
impl Containers for NoContainers {
    async fn ensure_image(&self, _image: &str) -> Result<(), ContainerError> {
        Err(not_here())
    }
    async fn start_agent(&self, _spec: &AgentSpec) -> Result<String, ContainerError> {
        Err(not_here())
    }
    async fn start(&self, _id: &str) -> Result<(), ContainerError> {
        Err(not_here())
    }
    async fn status(&self, _id_or_name: &str) -> Result<Option<ContainerStatus>, ContainerError> {
        Ok(None)
    }
    async fn running_on_pipeline(&self, _pipeline_id: &str, _except: &str) -> Result<Vec<String>, ContainerError> {
        Ok(Vec::new())
    }
    fn logs(&self, _id: &str) -> BoxStream<'static, Result<bytes::Bytes, ContainerError>> {
        Box::pin(futures_util::stream::once(async { Err(not_here()) }))
    }
    async fn wait(&self, _id: &str) -> Result<Option<i64>, ContainerError> {
        Ok(None)
    }
    async fn stop(&self, _id: &str, _grace: Duration) -> Result<(), ContainerError> {
        Ok(())
    }
    async fn remove(&self, _id: &str) -> Result<(), ContainerError> {
        Ok(())
    }
}

fn unsupported(action: &'static str) -> ContainerError {
    ContainerError::Docker {
        action,
        detail: "this container runtime cannot".into(),
    }
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
    /// Whether the pipeline's branch here holds `commit` (see [`Git::has_commit`]).
    fn has_commit(&self, _pipeline: &Pipeline, _commit: &str) -> Result<bool, GitError> {
        Ok(false)
    }
    /// Keeps a lost run's work aside and goes back to the remote (see [`Git::set_aside`]).
    fn set_aside(
        &self,
        _pipeline: &Pipeline,
        _info: &CommitInfo<'_>,
        _owner: Option<(u32, u32)>,
    ) -> Result<Option<SetAside>, GitError> {
        Ok(None)
    }
    /// Pushes the branch; nothing is sent unless `may_send` says so (see [`Git::push`]).
    fn push(&self, pipeline: &Pipeline, may_send: &(dyn Fn() -> bool + Sync)) -> Result<(), GitError>;
    fn check_pull_request(&self, pipeline: &Pipeline) -> Result<PullRequestCheck, GitError>;
    /// `paths` on the base branch as the mirror has it (see [`Git::base_files`]).
    fn base_files(&self, _remote_url: &str, _base: &str, paths: &[String]) -> Result<BaseFiles, GitError> {
        Ok((String::new(), vec![None; paths.len()]))
    }
    /// The base branch's tree written to `dest` (see [`Git::export_base`]).
    fn export_base(&self, _remote_url: &str, _base: &str, _dest: &std::path::Path) -> Result<(), GitError> {
        Ok(())
    }
    /// Brings the mirror up to date with the remote.
    fn sync_mirror(&self, _remote_url: &str) -> Result<(), GitError> {
        Ok(())
    }
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
    async fn runs_of_worker(&self, worker_id: &str) -> Result<Vec<String>, ContainerError> {
        ContainerRuntime::runs_of_worker(self, worker_id).await
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
    async fn remove_run_container(
        &self,
        name: &str,
        whose: Whose<'_>,
        grace: Duration,
    ) -> Result<bool, ContainerError> {
        ContainerRuntime::remove_run_container(self, name, whose, grace).await
    }
    async fn image_id(&self, image: &str) -> Result<Option<String>, ContainerError> {
        ContainerRuntime::image_id(self, image).await
    }
    async fn image_config(&self, image: &str) -> Result<ImageConfig, ContainerError> {
        ContainerRuntime::image_config(self, image).await
    }
    async fn create_setup(&self, spec: &SetupSpec) -> Result<String, ContainerError> {
        ContainerRuntime::create_setup(self, spec).await
    }
    async fn commit(
        &self,
        container: &str,
        tag: &str,
        config: ImageConfig,
        labels: HashMap<String, String>,
    ) -> Result<String, ContainerError> {
        ContainerRuntime::commit(self, container, tag, config, labels).await
    }
    async fn build_dockerfile(
        &self,
        context_tar: Vec<u8>,
        dockerfile: &str,
        tag: &str,
    ) -> (Result<(), ContainerError>, String) {
        ContainerRuntime::build_dockerfile(self, context_tar, dockerfile, tag).await
    }
    async fn env_images(&self, home: &str, repo: Option<&str>) -> Result<Vec<EnvImage>, ContainerError> {
        ContainerRuntime::env_images(self, home, repo).await
    }
    async fn remove_image(&self, image: &str) -> Result<bool, ContainerError> {
        ContainerRuntime::remove_image(self, image).await
    }
    async fn egress_gateway(&self, network: &str) -> Result<std::net::IpAddr, ContainerError> {
        ContainerRuntime::egress_gateway(self, network).await
    }
    async fn container_ip(&self, id: &str, network: &str) -> Result<Option<std::net::IpAddr>, ContainerError> {
        ContainerRuntime::container_ip(self, id, network).await
    }
    async fn container_label(&self, id: &str, label: &str) -> Result<Option<String>, ContainerError> {
        ContainerRuntime::container_label(self, id, label).await
    }
    async fn remove_stale_setups(&self, home: &str, older_than_secs: u64) -> Result<usize, ContainerError> {
        ContainerRuntime::remove_stale_setups(self, home, older_than_secs).await
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
    fn has_commit(&self, pipeline: &Pipeline, commit: &str) -> Result<bool, GitError> {
        Git::has_commit(self, pipeline, commit)
    }
    fn set_aside(
        &self,
        pipeline: &Pipeline,
        info: &CommitInfo<'_>,
        owner: Option<(u32, u32)>,
    ) -> Result<Option<SetAside>, GitError> {
        Git::set_aside(self, pipeline, info, owner)
    }
    fn push(&self, pipeline: &Pipeline, may_send: &(dyn Fn() -> bool + Sync)) -> Result<(), GitError> {
        Git::push(self, pipeline, may_send)
    }
    fn check_pull_request(&self, pipeline: &Pipeline) -> Result<PullRequestCheck, GitError> {
        Git::check_pull_request(self, pipeline)
    }
    fn base_files(&self, remote_url: &str, base: &str, paths: &[String]) -> Result<BaseFiles, GitError> {
        Git::base_files(self, remote_url, base, paths)
    }
    fn export_base(&self, remote_url: &str, base: &str, dest: &std::path::Path) -> Result<(), GitError> {
        Git::export_base(self, remote_url, base, dest)
    }
    fn sync_mirror(&self, remote_url: &str) -> Result<(), GitError> {
        Git::sync_mirror(self, remote_url).map(drop)
    }
}
