//! The container runtime: starts agents in hardened containers and follows them.
//! **The only module that names bollard**; everything else speaks in agents and runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::{Stream, StreamExt};

/// Where the workspace is mounted inside every agent container.
pub const WORKSPACE_MOUNT: &str = "/workspace";
/// Where the read-only context (prompt, history) is mounted.
pub const CONTEXT_MOUNT: &str = "/threadline";
/// Where the pipeline's object store is lent read-only: the agent's `.git` names it as
/// an alternate, so its git has the whole history while the daemon's git directory stays
/// outside every mount. The context directory holds the mount point.
pub const OBJECTS_MOUNT: &str = "/threadline/objects";
pub const LABEL_RUN: &str = "threadline.run";
pub const LABEL_PIPELINE: &str = "threadline.pipeline";
/// The worker (home) whose agent a container is.
pub const LABEL_WORKER: &str = "threadline.worker";
/// The port of an allowlisted agent's egress proxy, so a restart listens there again.
pub const LABEL_EGRESS_PORT: &str = "threadline.egress.port";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(
        "cannot reach the Docker engine ({detail}); check that it is running and that this user may use it \
         (the docker group, or DOCKER_HOST)"
    )]
    Unreachable { detail: String },
    #[error("the image {image} is not on this machine; build it with: {hint}")]
    ImageMissing { image: String, hint: String },
    #[error("docker refused to {action}: {detail}")]
    Docker { action: &'static str, detail: String },
}

fn docker_err(action: &'static str) -> impl FnOnce(DockerError) -> ContainerError {
    move |e| ContainerError::Docker {
        action,
        detail: e.to_string(),
    }
}

/// Everything needed to start one agent container.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    pub image: String,
    pub argv: Vec<String>,
    /// `KEY=value` pairs. May hold API keys: never log this.
    pub env: Vec<String>,
    /// `uid:gid`, never root.
    pub user: String,
    pub workspace: PathBuf,
    /// An ask: the agent reads the workspace and cannot change it.
    pub workspace_read_only: bool,
    pub context: PathBuf,
    /// The pipeline's agent state (a host folder) and where it is mounted, as `HOME`.
    pub state: Option<(PathBuf, String)>,
    /// The pipeline's object store, mounted read-only at [`OBJECTS_MOUNT`].
    pub objects: Option<PathBuf>,
    pub labels: HashMap<String, String>,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub pids_limit: i64,
    pub network: String,
    /// DNS servers instead of Docker's defaults.
    pub dns: Vec<String>,
    /// Named volumes (the repository's caches) and where they are mounted.
    pub volumes: Vec<(String, String)>,
    pub read_only_rootfs: bool,
    /// The most of its output Docker keeps on disk (two files of this size at most).
    pub log_file_bytes: u64,
}

impl AgentSpec {
    fn host_config(&self) -> HostConfig {
        let bind = |source: &PathBuf, target: &str, read_only: bool| Mount {
            typ: Some(MountType::BIND),
            source: Some(source.display().to_string()),
            target: Some(target.to_owned()),
            read_only: Some(read_only),
            ..Default::default()
        };
        HostConfig {
            // The only host paths: the workspace, the context and objects read-only, and
            // the pipeline's agent state.
            mounts: Some(
                [
                    Some(bind(&self.workspace, WORKSPACE_MOUNT, self.workspace_read_only)),
                    Some(bind(&self.context, CONTEXT_MOUNT, true)),
                    self.objects.as_ref().map(|o| bind(o, OBJECTS_MOUNT, true)),
                    self.state.as_ref().map(|(dir, target)| bind(dir, target, false)),
                ]
                .into_iter()
                .flatten()
                .chain(self.volumes.iter().map(|(name, target)| volume(name, target)))
                .collect(),
            ),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            privileged: Some(false),
            pids_limit: Some(self.pids_limit),
            memory: Some(self.memory_bytes),
            memory_swap: Some(self.memory_bytes),
            nano_cpus: Some(self.nano_cpus),
            network_mode: Some(self.network.clone()),
            dns: (!self.dns.is_empty()).then(|| self.dns.clone()),
            readonly_rootfs: Some(self.read_only_rootfs),
            // Docker's own copy of the output is bounded too: an agent printing at full
            // speed until its timeout must not fill the host's disk.
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), self.log_file_bytes.max(1024 * 1024).to_string()),
                    ("max-file".to_owned(), "2".to_owned()),
                ])),
            }),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                "rw,nosuid,nodev,size=1g,mode=1777".to_owned(),
            )])),
            ..Default::default()
        }
    }

    /// The same container as `docker run` arguments, for `threadline shell`.
    pub fn docker_run_args(&self, tty: bool) -> Vec<String> {
        // Every hardening flag from the one HostConfig the agents get, so the two cannot
        // drift apart.
        let hc = self.host_config();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--rm".into(),
            "--interactive".into(),
            "--name".into(),
            self.name.clone(),
            "--user".into(),
            self.user.clone(),
            "--workdir".into(),
            WORKSPACE_MOUNT.into(),
            // Nothing reads a shell's log: Docker keeps none.
            "--log-driver".into(),
            "none".into(),
        ];
        for cap in hc.cap_drop.unwrap_or_default() {
            args.extend(["--cap-drop".into(), cap]);
        }
        for opt in hc.security_opt.unwrap_or_default() {
            args.extend(["--security-opt".into(), opt]);
        }
        if let Some(pids) = hc.pids_limit {
            args.push(format!("--pids-limit={pids}"));
        }
        if let Some(memory) = hc.memory {
            args.push(format!("--memory={memory}"));
        }
        if let Some(swap) = hc.memory_swap {
            args.push(format!("--memory-swap={swap}"));
        }
        if let Some(cpus) = hc.nano_cpus {
            args.push(format!("--cpus={}", cpus as f64 / 1e9));
        }
        if let Some(network) = hc.network_mode {
            args.push(format!("--network={network}"));
        }
        for server in hc.dns.unwrap_or_default() {
            args.push(format!("--dns={server}"));
        }
        for (path, options) in hc.tmpfs.unwrap_or_default() {
            args.extend(["--tmpfs".into(), format!("{path}:{options}")]);
        }
        if tty {
            args.push("--tty".into());
        }
        if hc.readonly_rootfs == Some(true) {
            args.push("--read-only".into());
        }
        for m in hc.mounts.unwrap_or_default() {
            let kind = if m.typ == Some(MountType::VOLUME) {
                "volume"
            } else {
                "bind"
            };
            let mut spec = format!(
                "type={kind},source={},target={}",
                m.source.unwrap_or_default(),
                m.target.unwrap_or_default()
            );
            if m.read_only == Some(true) {
                spec.push_str(",readonly");
            }
            args.push("--mount".into());
            args.push(spec);
        }
        for (k, v) in &self.labels {
            args.push("--label".into());
            args.push(format!("{k}={v}"));
        }
        args.push("--env".into());
        args.push("HOME=/tmp".into());
        args.push(self.image.clone());
        args.push("sh".into());
        args
    }
}

/// Which of a run's containers [`ContainerRuntime::remove_run_container`] removes, by the
/// worker its `threadline.worker` label names.
#[derive(Debug, Clone, Copy)]
pub enum Whose<'a> {
    /// Made by a worker other than this one: a lost attempt, on an engine workers share.
    Others(&'a str),
    /// This worker's own, or one without the label (made before workers had labels).
    Own(&'a str),
}

impl Whose<'_> {
    fn matches(self, worker: Option<&str>) -> bool {
        match self {
            Whose::Others(me) => worker.is_some_and(|w| w != me),
            Whose::Own(me) => worker.is_none_or(|w| w == me),
        }
    }
}

/// A container found by name: what deciding about it needs.
struct Named {
    id: String,
    worker: Option<String>,
    /// Docker is removing it, or it is dead: it cannot be started any more.
    going: bool,
}

/// How long a removal another caller began is waited for.
const REMOVAL_WAIT: Duration = Duration::from_secs(30);

/// What Docker says of a run's container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerStatus {
    /// Created but never started: the agent has not run.
    Created,
    /// Running: it may still produce work.
    Running,
    Exited(i64),
}

#[derive(Clone)]
pub struct ContainerRuntime {
    docker: Docker,
}

impl ContainerRuntime {
    /// Connects to the engine named by `DOCKER_HOST` or the default socket.
    pub async fn connect() -> Result<Self, ContainerError> {
        let unreachable = |e: DockerError| ContainerError::Unreachable { detail: e.to_string() };
        let docker = Docker::connect_with_defaults()
            .map_err(unreachable)?
            .negotiate_version()
            .await
            .map_err(unreachable)?;
        Ok(ContainerRuntime { docker })
    }

    /// The engine's version and API version.
    pub async fn version(&self) -> Result<String, ContainerError> {
        let v = self
            .docker
            .version()
            .await
            .map_err(|e| ContainerError::Unreachable { detail: e.to_string() })?;
        Ok(format!(
            "{} (API {})",
            v.version.unwrap_or_default(),
            v.api_version.unwrap_or_default()
        ))
    }

    /// Fails with a message naming the image and how to build it when it is missing.
    pub async fn ensure_image(&self, image: &str) -> Result<(), ContainerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Err(ContainerError::ImageMissing {
                image: image.to_owned(),
                hint: build_hint(image),
            }),
            Err(e) => Err(docker_err("inspect the image")(e)),
        }
    }

    /// Creates and starts the agent's container. If a container of that name exists
    /// already (a crash between start and recording it), that one is used: a run never
    /// gets a second container.
    pub async fn start_agent(&self, spec: &AgentSpec) -> Result<String, ContainerError> {
        let id = self.create_agent(spec).await?;
        crate::crash::point(crate::crash::Step::ContainerCreated);
        self.start(&id).await?;
        Ok(id)
    }

    /// Creates the agent's container, or finds the one of that name a crash left.
    async fn create_agent(&self, spec: &AgentSpec) -> Result<String, ContainerError> {
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(spec.argv.clone()),
            // The image's entrypoint would wrap argv in ways the profile cannot see.
            entrypoint: Some(Vec::new()),
            env: Some(spec.env.clone()),
            user: Some(spec.user.clone()),
            working_dir: Some(WORKSPACE_MOUNT.into()),
            labels: Some(spec.labels.clone()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            host_config: Some(spec.host_config()),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&spec.name).build();
        let created = match self.docker.create_container(Some(options.clone()), body.clone()).await {
            // The name is taken. By this worker's container a crash left: it is used. By
            // one Docker is removing, or by another worker's (on an engine workers share:
            // that worker lost the run and, not yet aware, made it meanwhile): that one
            // goes, by its id, and the name is tried once more.
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {
                let mine = spec.labels.get(LABEL_WORKER).map(String::as_str);
                match self.named(&spec.name).await? {
                    Some(c) if !c.going && (mine.is_none() || c.worker.as_deref() == mine) => return Ok(c.id),
                    Some(c) => {
                        let _ = self.stop(&c.id, Duration::from_secs(2)).await;
                        self.remove(&c.id).await?;
                        self.docker.create_container(Some(options), body).await
                    }
                    None => self.docker.create_container(Some(options), body).await,
                }
            }
            created => created,
        };
        let id = match created {
            Ok(created) => created.id,
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {
                return Err(ContainerError::Docker {
                    action: "create the container",
                    detail: format!("a container named {} is in the way", spec.name),
                });
            }
            Err(DockerError::DockerResponseServerError {
                status_code: 404,
                message,
            }) if message.contains("image") => {
                return Err(ContainerError::ImageMissing {
                    image: spec.image.clone(),
                    hint: build_hint(&spec.image),
                });
            }
            Err(e) => return Err(docker_err("create the container")(e)),
        };
        Ok(id)
    }

    /// Starts a created container (one a crash left unstarted, too); removes it when
    /// Docker refuses, so a retry begins clean.
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        match self.docker.start_container(id, None).await {
            Ok(()) => Ok(()),
            // 304: already started (the adopted case above).
            Err(DockerError::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(e) => {
                let _ = self.remove(id).await;
                Err(docker_err("start the container")(e))
            }
        }
    }

    /// The state of a container by id or name; None when there is no such container.
    pub async fn status(&self, id_or_name: &str) -> Result<Option<ContainerStatus>, ContainerError> {
        match self.docker.inspect_container(id_or_name, None).await {
            Ok(info) => {
                use bollard::models::ContainerStateStatusEnum as S;
                let state = info.state.unwrap_or_default();
                Ok(Some(match state.status {
                    // Created and never started: its agent has not run at all.
                    Some(S::CREATED) => ContainerStatus::Created,
                    _ if state.running.unwrap_or(false) => ContainerStatus::Running,
                    Some(S::RESTARTING) => ContainerStatus::Running,
                    _ => ContainerStatus::Exited(state.exit_code.unwrap_or(-1)),
                }))
            }
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(docker_err("inspect the container")(e)),
        }
    }

    /// The running containers of a pipeline other than `except` (an agent's, or a
    /// `threadline shell`): while one runs, the daemon must not touch the work tree.
    pub async fn running_on_pipeline(&self, pipeline_id: &str, except: &str) -> Result<Vec<String>, ContainerError> {
        let filters = HashMap::from([
            ("label".to_owned(), vec![format!("{LABEL_PIPELINE}={pipeline_id}")]),
            ("status".to_owned(), vec!["running".to_owned()]),
        ]);
        Ok(self
            .list(filters, false)
            .await?
            .into_iter()
            .flat_map(|c| c.names.unwrap_or_default())
            .map(|n| n.trim_start_matches('/').to_owned())
            .filter(|n| n != except)
            .collect())
    }

    /// The run ids of every agent container (running or not) this worker made.
    pub async fn runs_of_worker(&self, worker_id: &str) -> Result<Vec<String>, ContainerError> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_WORKER}={worker_id}")])]);
        Ok(self
            .list(filters, true)
            .await?
            .into_iter()
            .filter_map(|c| c.labels.and_then(|mut l| l.remove(LABEL_RUN)))
            .collect())
    }

    /// The containers matching Docker's list `filters` (stopped ones too with `all`).
    async fn list(
        &self,
        filters: HashMap<String, Vec<String>>,
        all: bool,
    ) -> Result<Vec<bollard::models::ContainerSummary>, ContainerError> {
        let options = ListContainersOptionsBuilder::new().all(all).filters(&filters).build();
        self.docker
            .list_containers(Some(options))
            .await
            .map_err(docker_err("list the containers"))
    }

    /// The container's output from its start, following until it exits.
    pub fn logs(&self, id: &str) -> impl Stream<Item = Result<bytes::Bytes, ContainerError>> + Send + 'static {
        let options = LogsOptionsBuilder::new().follow(true).stdout(true).stderr(true).build();
        self.docker
            .logs(id, Some(options))
            .map(|item| item.map(|out| out.into_bytes()).map_err(docker_err("stream the logs")))
    }

    /// Waits for the container to exit; returns its exit code, or None when it is gone.
    pub async fn wait(&self, id: &str) -> Result<Option<i64>, ContainerError> {
        let mut stream = self.docker.wait_container(id, None);
        match stream.next().await {
            Some(Ok(resp)) => Ok(Some(resp.status_code)),
            // bollard reports a non-zero exit as an error.
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(Some(code)),
            Some(Err(DockerError::DockerResponseServerError { status_code: 404, .. })) => Ok(None),
            Some(Err(e)) => Err(docker_err("wait for the container")(e)),
            None => Ok(self.status(id).await?.and_then(|s| match s {
                ContainerStatus::Exited(code) => Some(code),
                ContainerStatus::Running | ContainerStatus::Created => None,
            })),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), ContainerError> {
        let options = StopContainerOptionsBuilder::new().t(grace.as_secs() as i32).build();
        match self.docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(DockerError::DockerResponseServerError {
                status_code: 304 | 404, ..
            }) => Ok(()),
            Err(e) => Err(docker_err("stop the container")(e)),
        }
    }

    /// Removes a container, running or not. When this returns Ok it is gone, also when
    /// someone else (another worker, `docker rm`) had begun removing it: its name is free.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            // 409: a removal is already in progress; it is waited for.
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => self.wait_removed(id).await,
            Err(e) => Err(docker_err("remove the container")(e)),
        }
    }

    async fn wait_removed(&self, id: &str) -> Result<(), ContainerError> {
        let deadline = tokio::time::Instant::now() + REMOVAL_WAIT;
        while tokio::time::Instant::now() < deadline {
            match self.docker.inspect_container(id, None).await {
                Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => return Ok(()),
                Err(e) => return Err(docker_err("remove the container")(e)),
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Err(ContainerError::Docker {
            action: "remove the container",
            detail: format!("{id} is still being removed after {} s", REMOVAL_WAIT.as_secs()),
        })
    }

    /// Stops and removes the container named `name` when `whose` says so of the worker its
    /// label names. Decided on one inspection and done by the id it gave, so a container
    /// of that name another worker makes meanwhile is never touched. True when one went.
    pub async fn remove_run_container(
        &self,
        name: &str,
        whose: Whose<'_>,
        grace: Duration,
    ) -> Result<bool, ContainerError> {
        let Some(c) = self.named(name).await?.filter(|c| whose.matches(c.worker.as_deref())) else {
            return Ok(false);
        };
        let _ = self.stop(&c.id, grace).await;
        self.remove(&c.id).await?;
        Ok(true)
    }

    async fn named(&self, name: &str) -> Result<Option<Named>, ContainerError> {
        use bollard::models::ContainerStateStatusEnum as S;
        match self.docker.inspect_container(name, None).await {
            Ok(info) => Ok(info.id.map(|id| Named {
                id,
                worker: info
                    .config
                    .and_then(|c| c.labels)
                    .and_then(|mut l| l.remove(LABEL_WORKER)),
                going: matches!(info.state.and_then(|s| s.status), Some(S::REMOVING | S::DEAD)),
            })),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(docker_err("inspect the container")(e)),
        }
    }
}

/// A named volume mounted at `target`.
fn volume(name: &str, target: &str) -> Mount {
    Mount {
        typ: Some(MountType::VOLUME),
        source: Some(name.to_owned()),
        target: Some(target.to_owned()),
        read_only: Some(false),
        ..Default::default()
    }
}

/// The container an environment's setup runs in: the base image, the repository's files
/// at `/workspace` (a copy, thrown away after), the secrets as read-only files, and the
/// caches. It runs as root (it installs packages), with every capability dropped but
/// those package managers need, and is committed into the environment's image.
pub struct SetupSpec {
    pub name: String,
    pub image: String,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub workspace: Option<PathBuf>,
    /// Mounted read-only at [`SETUP_MOUNT`]: the driver, its steps, and `secrets/`.
    pub run_dir: Option<PathBuf>,
    pub volumes: Vec<(String, String)>,
    pub labels: HashMap<String, String>,
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub network: String,
    pub log_file_bytes: u64,
}

/// What an image says about how its containers run, kept by an environment built on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
}

/// Where a setup finds its driver, steps and secrets (`secrets/NAME`); not committed.
pub const SETUP_MOUNT: &str = "/run/threadline";

/// An environment image as `threadline env ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EnvImage {
    pub id: String,
    pub tag: String,
    pub repo: String,
    pub key: String,
    pub created: i64,
    pub size: i64,
}

pub const LABEL_ENV_REPO: &str = "threadline.env.repo";
pub const LABEL_ENV_KEY: &str = "threadline.env.key";
/// Which Threadline installation (its data folder) built an environment.
pub const LABEL_ENV_HOME: &str = "threadline.env.home";
/// On setup containers (not images), so stale ones can be found.
pub const LABEL_ENV_SETUP: &str = "threadline.env.setup";

impl ContainerRuntime {
    /// The image's id, or None when there is no such image.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>, ContainerError> {
        match self.docker.inspect_image(image).await {
            Ok(info) => Ok(info.id),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(docker_err("inspect the image")(e)),
        }
    }

    /// An image's own entrypoint, command, environment, user and working directory, which
    /// an environment built on it keeps.
    pub async fn image_config(&self, image: &str) -> Result<ImageConfig, ContainerError> {
        let info = self
            .docker
            .inspect_image(image)
            .await
            .map_err(docker_err("inspect the image"))?;
        let c = info.config.unwrap_or_default();
        Ok(ImageConfig {
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            env: c.env.unwrap_or_default(),
            user: c.user,
            working_dir: c.working_dir,
        })
    }

    /// Creates (does not start) a setup container; one of that name left by a crash is
    /// removed first.
    pub async fn create_setup(&self, spec: &SetupSpec) -> Result<String, ContainerError> {
        self.remove(&spec.name).await?;
        let mounts = [
            spec.workspace.as_ref().map(|dir| Mount {
                typ: Some(MountType::BIND),
                source: Some(dir.display().to_string()),
                target: Some(WORKSPACE_MOUNT.into()),
                read_only: Some(false),
                ..Default::default()
            }),
            spec.run_dir.as_ref().map(|dir| Mount {
                typ: Some(MountType::BIND),
                source: Some(dir.display().to_string()),
                target: Some(SETUP_MOUNT.into()),
                read_only: Some(true),
                ..Default::default()
            }),
        ]
        .into_iter()
        .flatten()
        .chain(spec.volumes.iter().map(|(name, target)| volume(name, target)))
        .collect();
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(spec.argv.clone()),
            entrypoint: Some(Vec::new()),
            env: Some(spec.env.clone()),
            user: Some("0:0".into()),
            working_dir: Some(WORKSPACE_MOUNT.into()),
            labels: Some(spec.labels.clone()),
            tty: Some(false),
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                // Root, but only with what package managers need: no raw sockets (no
                // spoofing on the bridge), no device nodes, no file capabilities.
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(
                    ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETUID", "SETGID", "KILL"]
                        .map(String::from)
                        .to_vec(),
                ),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                privileged: Some(false),
                memory: Some(spec.memory_bytes),
                memory_swap: Some(spec.memory_bytes),
                nano_cpus: Some(spec.nano_cpus),
                pids_limit: Some(4096),
                network_mode: Some(spec.network.clone()),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(HashMap::from([
                        ("max-size".to_owned(), spec.log_file_bytes.max(1024 * 1024).to_string()),
                        ("max-file".to_owned(), "2".to_owned()),
                    ])),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&spec.name).build();
        match self.docker.create_container(Some(options), body).await {
            Ok(created) => Ok(created.id),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Err(ContainerError::ImageMissing {
                image: spec.image.clone(),
                hint: build_hint(&spec.image),
            }),
            Err(e) => Err(docker_err("create the setup container")(e)),
        }
    }

    /// Commits a finished setup container as `tag`, with `config` (the base image's
    /// entrypoint, command and user, and the environment's variables) and `labels`.
    pub async fn commit(
        &self,
        container: &str,
        tag: &str,
        image: ImageConfig,
        labels: HashMap<String, String>,
    ) -> Result<String, ContainerError> {
        let (repo, tag) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
        let config = bollard::models::ContainerConfig {
            entrypoint: Some(image.entrypoint.unwrap_or_default()),
            cmd: Some(image.cmd.unwrap_or_default()),
            env: Some(image.env),
            user: Some(image.user.unwrap_or_default()),
            working_dir: Some(image.working_dir.unwrap_or_default()),
            labels: Some(labels),
            ..Default::default()
        };
        let options = bollard::query_parameters::CommitContainerOptionsBuilder::new()
            .container(container)
            .repo(repo)
            .tag(tag)
            .comment("threadline environment")
            .build();
        let made = self
            .docker
            .commit_container(options, config)
            .await
            .map_err(docker_err("commit the environment"))?;
        Ok(made.id)
    }

    /// Builds `dockerfile` (a path inside the `context` tar) as `tag`: what came of it and
    /// the build's output. The classic builder: no registry, so `FROM` must name a local
    /// image.
    pub async fn build_dockerfile(
        &self,
        context_tar: Vec<u8>,
        dockerfile: &str,
        tag: &str,
    ) -> (Result<(), ContainerError>, String) {
        let options = bollard::query_parameters::BuildImageOptionsBuilder::new()
            .dockerfile(dockerfile)
            .t(tag)
            .rm(true)
            .forcerm(true)
            .build();
        let mut log = String::new();
        let mut stream = self
            .docker
            .build_image(options, None, Some(bollard::body_full(context_tar.into())));
        while let Some(item) = stream.next().await {
            let info = match item {
                Ok(info) => info,
                Err(e) => return (Err(docker_err("build the devcontainer's Dockerfile")(e)), log),
            };
            if let Some(text) = info.stream
                && log.len() < 4 * 1024 * 1024
            {
                log.push_str(&text);
            }
            if let Some(e) = info.error_detail.and_then(|d| d.message) {
                let failed = ContainerError::Docker {
                    action: "build the devcontainer's Dockerfile",
                    detail: e,
                };
                return (Err(failed), log);
            }
        }
        (Ok(()), log)
    }

    /// The environment images of installation `home`, of one repository or all.
    pub async fn env_images(&self, home: &str, repo: Option<&str>) -> Result<Vec<EnvImage>, ContainerError> {
        let mut labels = vec![format!("{LABEL_ENV_HOME}={home}")];
        if let Some(r) = repo {
            labels.push(format!("{LABEL_ENV_REPO}={r}"));
        }
        let filters = HashMap::from([("label", labels)]);
        let options = bollard::query_parameters::ListImagesOptionsBuilder::new()
            .filters(&filters)
            .build();
        let images = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(docker_err("list the environment images"))?;
        let mut out: Vec<EnvImage> = images
            .into_iter()
            .map(|i| EnvImage {
                tag: i.repo_tags.first().cloned().unwrap_or_default(),
                repo: i.labels.get(LABEL_ENV_REPO).cloned().unwrap_or_default(),
                key: i.labels.get(LABEL_ENV_KEY).cloned().unwrap_or_default(),
                id: i.id,
                created: i.created,
                size: i.size,
            })
            .collect();
        out.sort_by_key(|i| std::cmp::Reverse(i.created));
        Ok(out)
    }

    /// Removes an image; one a container still uses stays (false).
    pub async fn remove_image(&self, image: &str) -> Result<bool, ContainerError> {
        let options = bollard::query_parameters::RemoveImageOptionsBuilder::new().build();
        match self.docker.remove_image(image, Some(options), None).await {
            Ok(_) => Ok(true),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(true),
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => Ok(false),
            Err(e) => Err(docker_err("remove the image")(e)),
        }
    }

    /// The internal network of allowlisted agents (made on first use): no route out,
    /// containers on it cannot reach each other. Returns its gateway, where their proxies
    /// listen.
    pub async fn egress_gateway(&self, name: &str) -> Result<std::net::IpAddr, ContainerError> {
        let inspect = || async {
            self.docker
                .inspect_network(name, None::<bollard::query_parameters::InspectNetworkOptions>)
                .await
        };
        let network = match inspect().await {
            Ok(n) => n,
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {
                let request = bollard::models::NetworkCreateRequest {
                    name: name.to_owned(),
                    driver: Some("bridge".into()),
                    internal: Some(true),
                    options: Some(HashMap::from([(
                        "com.docker.network.bridge.enable_icc".to_owned(),
                        "false".to_owned(),
                    )])),
                    labels: Some(HashMap::from([("threadline".to_owned(), "egress".to_owned())])),
                    ..Default::default()
                };
                match self.docker.create_network(request).await {
                    Ok(_) | Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {}
                    Err(e) => return Err(docker_err("create the egress network")(e)),
                }
                inspect().await.map_err(docker_err("inspect the egress network"))?
            }
            Err(e) => return Err(docker_err("inspect the egress network")(e)),
        };
        if network.internal != Some(true) {
            return Err(ContainerError::Docker {
                action: "use the egress network",
                detail: format!("the network {name} exists but is not internal; remove it (docker network rm {name})"),
            });
        }
        network
            .ipam
            .and_then(|i| i.config)
            .into_iter()
            .flatten()
            .find_map(|c| c.gateway.and_then(|g| g.parse().ok()))
            .ok_or_else(|| ContainerError::Docker {
                action: "use the egress network",
                detail: format!("the network {name} has no IPv4 gateway"),
            })
    }

    /// Removes the setup containers of installation `home` created more than
    /// `older_than_secs` ago (a process died during their build); how many.
    pub async fn remove_stale_setups(&self, home: &str, older_than_secs: u64) -> Result<usize, ContainerError> {
        let filters = HashMap::from([(
            "label",
            vec![format!("{LABEL_ENV_HOME}={home}"), format!("{LABEL_ENV_SETUP}=1")],
        )]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let found = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(docker_err("list the setup containers"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut removed = 0;
        for c in found {
            if now - c.created.unwrap_or(now) > older_than_secs as i64
                && let Some(id) = c.id
            {
                self.remove(&id).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// A container's label.
    pub async fn container_label(&self, id: &str, label: &str) -> Result<Option<String>, ContainerError> {
        match self.docker.inspect_container(id, None).await {
            Ok(info) => Ok(info.config.and_then(|c| c.labels).and_then(|mut l| l.remove(label))),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(docker_err("inspect the container")(e)),
        }
    }

    /// A container's address on `network`.
    pub async fn container_ip(&self, id: &str, network: &str) -> Result<Option<std::net::IpAddr>, ContainerError> {
        let info = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(docker_err("inspect the container"))?;
        Ok(info
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(network))
            .and_then(|e| e.ip_address)
            .and_then(|ip| ip.parse().ok()))
    }
}

/// How to build an image that is missing: ours come from `docker/`.
pub fn build_hint(image: &str) -> String {
    let name = image.split(':').next().unwrap_or(image);
    match name.strip_prefix("threadline/") {
        Some(dir) => format!("docker build -t {image} docker/{dir}   (from the Threadline source tree)"),
        None => format!("docker pull {image}   (or build it yourself)"),
    }
}

/// The container name of a run: unique per run, so Docker itself refuses a second one.
pub fn container_name(run_id: &str) -> String {
    format!("threadline-run-{run_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shell_is_hardened_like_an_agent() {
        let spec = AgentSpec {
            name: "threadline-shell-p".into(),
            image: "img".into(),
            argv: vec!["sh".into()],
            env: Vec::new(),
            user: "1000:1000".into(),
            workspace: "/data/workspaces/p".into(),
            workspace_read_only: false,
            context: "/data/workspaces/p.shell-context".into(),
            state: None,
            objects: Some("/data/gitdirs/p.git/objects".into()),
            labels: HashMap::from([(LABEL_PIPELINE.to_owned(), "p".to_owned())]),
            memory_bytes: 256 << 20,
            nano_cpus: 1_000_000_000,
            pids_limit: 64,
            network: "none".into(),
            dns: Vec::new(),
            volumes: Vec::new(),
            read_only_rootfs: true,
            log_file_bytes: 0,
        };
        let args = spec.docker_run_args(false).join(" ");
        for flag in [
            "--cap-drop ALL",
            "--security-opt no-new-privileges:true",
            "--pids-limit=64",
            "--memory=268435456",
            "--memory-swap=268435456",
            "--cpus=1",
            "--network=none",
            "--read-only",
            "--tmpfs /tmp:rw,nosuid,nodev,size=1g,mode=1777",
            "--user 1000:1000",
            "type=bind,source=/data/workspaces/p,target=/workspace",
            "target=/threadline,readonly",
            "source=/data/gitdirs/p.git/objects,target=/threadline/objects,readonly",
            "--label threadline.pipeline=p",
        ] {
            assert!(args.contains(flag), "{flag} missing from: {args}");
        }
    }
}
