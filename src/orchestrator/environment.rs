//! Repository environments: the image a repository's agents run in, built once from a
//! setup script, a configured command or the repository's devcontainer on top of the
//! agent's image, keyed by a hash of everything it is made from, and reused by every
//! run of every pipeline of the repository until an input changes.
//!
//! What configures a setup is read from the **base branch** in Threadline's mirror, never
//! from a pipeline's branch: an agent writes those, and a setup runs as root with the
//! repository's secrets. The secrets reach the setup as read-only files in a mount that
//! is not part of the image, never as its environment; agents never get them.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Inner;
use super::container::{ImageConfig, LABEL_ENV_HOME, LABEL_ENV_KEY, LABEL_ENV_REPO, LABEL_ENV_SETUP, SetupSpec};
use crate::config::{AgentProfile, EnvironmentConfig};
use crate::model::Pipeline;
use crate::untrusted;

/// The setup script a repository may hold, used when the configuration names none.
pub const SETUP_SCRIPT: &str = ".threadline/setup.sh";
pub const DEVCONTAINER: &str = ".devcontainer/devcontainer.json";
use super::container::SETUP_MOUNT as RUN_MOUNT;
/// A line the driver prints before each step, so a failure names its step.
const STEP_MARK: &str = "::threadline-step::";
/// The largest secret read from a file.
const MAX_SECRET: usize = 64 * 1024;

/// What a run's container is made from.
#[derive(Debug, Clone)]
pub struct RunImage {
    pub image: String,
    /// The repository's caches: (volume, path).
    pub volumes: Vec<(String, String)>,
}

/// Where the environment's base image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// The agent profile's image, or the devcontainer's `image`.
    Image(String),
    /// The devcontainer's `build.dockerfile` (a path in the repository) and its context.
    Dockerfile { dockerfile: String, context: String },
}

/// One step of a setup: what it is called in messages, and its shell text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub script: String,
}

/// An environment to have, from the configuration and the base branch's files.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The installation's id (see [`home_id`]).
    pub home: String,
    pub repo: String,
    pub key: String,
    pub tag: String,
    pub base: Base,
    pub steps: Vec<Step>,
    pub container_env: Vec<(String, String)>,
    pub remote_user: Option<String>,
    pub caches: Vec<(String, String)>,
    pub secrets: BTreeMap<String, String>,
    pub owner: (u32, u32),
    pub timeout: Duration,
    pub memory_mb: u64,
    pub network: String,
    pub keep: usize,
    /// The base branch's commit the inputs were read at: the setup gets that tree.
    pub commit: String,
}

/// What a devcontainer.json says that Threadline uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devcontainer {
    pub image: Option<String>,
    /// `build.dockerfile` and `build.context`, as paths in the repository.
    pub dockerfile: Option<(String, String)>,
    pub container_env: Vec<(String, String)>,
    /// `onCreateCommand`, `updateContentCommand`, `postCreateCommand`, in that order.
    pub commands: Vec<Step>,
    pub remote_user: Option<String>,
}

/// Reads a devcontainer.json (JSON with comments and trailing commas).
pub fn parse_devcontainer(text: &str) -> Result<Devcontainer, String> {
    let json: Value = serde_json::from_str(&strip_jsonc(text)).map_err(|e| format!("it is not valid JSON: {e}"))?;
    let string = |v: &Value| v.as_str().map(str::to_owned);
    let dir = Path::new(DEVCONTAINER).parent().unwrap_or(Path::new(""));
    let in_repo = |p: &str| -> Result<String, String> {
        let joined = dir.join(p);
        let mut parts: Vec<String> = Vec::new();
        for c in joined.components() {
            match c {
                std::path::Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
                std::path::Component::ParentDir => {
                    parts.pop().ok_or(format!("{p:?} leaves the repository"))?;
                }
                std::path::Component::CurDir => {}
                _ => return Err(format!("{p:?} is not a path in the repository")),
            }
        }
        Ok(parts.join("/"))
    };
    let build = &json["build"];
    let dockerfile = match string(&build["dockerfile"]).or_else(|| string(&json["dockerFile"])) {
        Some(d) => {
            let context = string(&build["context"])
                .or_else(|| string(&json["context"]))
                .unwrap_or(".".into());
            Some((in_repo(&d)?, in_repo(&context)?))
        }
        None => None,
    };
    let image = string(&json["image"]);
    if image.is_none() && dockerfile.is_none() {
        return Err("it names neither an image nor build.dockerfile".into());
    }
    let mut container_env = Vec::new();
    if let Some(map) = json["containerEnv"].as_object() {
        for (k, v) in map {
            let v = v.as_str().ok_or(format!("containerEnv.{k} is not a string"))?;
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(format!("containerEnv has an unusable name {k:?}"));
            }
            container_env.push((k.clone(), v.to_owned()));
        }
    }
    let mut commands = Vec::new();
    for key in ["onCreateCommand", "updateContentCommand", "postCreateCommand"] {
        let value = &json[key];
        let scripts: Vec<(String, String)> = match value {
            Value::Null => Vec::new(),
            Value::Object(parallel) => parallel
                .iter()
                .map(|(name, v)| {
                    Ok((
                        format!("{key}.{name}"),
                        command_text(v).ok_or(format!("{key}.{name} is not a command"))?,
                    ))
                })
                .collect::<Result<_, String>>()?,
            v => vec![(
                key.to_owned(),
                command_text(v).ok_or(format!("{key} is not a command"))?,
            )],
        };
        commands.extend(scripts.into_iter().map(|(name, script)| Step { name, script }));
    }
    Ok(Devcontainer {
        image,
        dockerfile,
        container_env,
        commands,
        remote_user: string(&json["remoteUser"]).or_else(|| string(&json["containerUser"])),
    })
}

/// A devcontainer command as shell text: a string as it is, an array as quoted words.
fn command_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(words) => {
            let words: Option<Vec<String>> = words.iter().map(|w| w.as_str().map(quote)).collect();
            words.map(|w| w.join(" "))
        }
        _ => None,
    }
}

/// `s` in single quotes for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// JSON with comments (`//`, `/* */`) and trailing commas made plain JSON.
fn strip_jsonc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match (c, chars.peek()) {
            ('"', _) => {
                in_string = true;
                out.push(c);
            }
            ('/', Some('/')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            (',', _) => {
                // A comma followed only by blanks and a closing bracket is dropped.
                let rest: String = chars.clone().take_while(|c| c.is_whitespace()).collect();
                let after = chars.clone().nth(rest.chars().count());
                if !matches!(after, Some('}' | ']')) {
                    out.push(',');
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// The files of the base branch an environment is made from.
pub struct Inputs {
    /// The base branch's commit every file here was read at (and the setup is given).
    pub commit: String,
    /// The repository's remote, so two repositories never share an image.
    pub remote: String,
    /// The configured or found setup script: its path and contents.
    pub script: Option<(String, Vec<u8>)>,
    pub devcontainer: Option<Devcontainer>,
    /// The Dockerfile's contents, when the devcontainer builds one.
    pub dockerfile: Option<Vec<u8>>,
    /// Each configured lock file's contents (None: not on the base branch).
    pub lock_files: Vec<(String, Option<Vec<u8>>)>,
}

/// Plans `repo`'s environment for an agent on `agent_image` (whose id is
/// `agent_image_id`) running as `owner`; None when the repository has none.
pub fn plan(
    home: &str,
    repo: &str,
    cfg: &EnvironmentConfig,
    agent_image: &str,
    agent_image_id: &str,
    owner: (u32, u32),
    inputs: &Inputs,
) -> Option<Plan> {
    let mut steps = Vec::new();
    let caches: Vec<(String, String)> = cfg
        .caches
        .iter()
        .map(|path| (cache_volume(home, repo, path), path.clone()))
        .collect();
    if let Some((path, _)) = &inputs.script {
        steps.push(Step {
            name: format!("`{path}`"),
            script: format!("sh {}", quote(&format!("/workspace/{path}"))),
        });
    }
    if !cfg.command.is_empty() {
        steps.push(Step {
            name: "the configured command".into(),
            script: cfg.command.clone(),
        });
    }
    let dc = inputs.devcontainer.clone().unwrap_or_default();
    steps.extend(dc.commands.iter().cloned());
    let base = match (&dc.dockerfile, &dc.image) {
        (Some((dockerfile, context)), _) => Base::Dockerfile {
            dockerfile: dockerfile.clone(),
            context: context.clone(),
        },
        (None, Some(image)) => Base::Image(image.clone()),
        (None, None) => Base::Image(agent_image.to_owned()),
    };
    if inputs.devcontainer.is_none() && steps.is_empty() && caches.is_empty() {
        return None;
    }
    let mut h = Sha256::new();
    let mut part = |label: &str, bytes: &[u8]| {
        h.update(label.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    part("v1", b"");
    part("remote", inputs.remote.as_bytes());
    match &base {
        Base::Image(image) if image == agent_image => part("agent image", agent_image_id.as_bytes()),
        Base::Image(image) => part("devcontainer image", image.as_bytes()),
        Base::Dockerfile { dockerfile, context } => {
            part("dockerfile", dockerfile.as_bytes());
            part("context", context.as_bytes());
            part("dockerfile text", inputs.dockerfile.as_deref().unwrap_or_default());
        }
    }
    if let Some((path, text)) = &inputs.script {
        part("script", path.as_bytes());
        part("script text", text);
    }
    for step in &steps {
        part("step", step.script.as_bytes());
    }
    for (k, v) in &dc.container_env {
        part("env", format!("{k}={v}").as_bytes());
    }
    part("user", dc.remote_user.as_deref().unwrap_or_default().as_bytes());
    for (path, text) in &inputs.lock_files {
        part("lock file", path.as_bytes());
        match text {
            Some(t) => part("lock text", t),
            None => part("lock absent", b""),
        }
    }
    for name in cfg.secrets.keys() {
        part("secret", name.as_bytes());
    }
    for (_, path) in &caches {
        part("cache", path.as_bytes());
    }
    part("owner", format!("{}:{}", owner.0, owner.1).as_bytes());
    let key: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    Some(Plan {
        repo: repo.to_owned(),
        tag: format!("threadline-env/{}-{home}:{key}", slug(repo)),
        home: home.to_owned(),
        key,
        base,
        steps,
        container_env: dc.container_env,
        remote_user: dc.remote_user,
        caches,
        secrets: cfg.secrets.clone(),
        owner,
        timeout: Duration::from_secs(cfg.setup_timeout_secs),
        memory_mb: cfg.setup_memory_mb,
        network: cfg.setup_network.clone(),
        keep: cfg.keep.max(1),
        commit: inputs.commit.clone(),
    })
}

/// An installation's id: its data folder's, so two Threadlines on one engine keep
/// their environments apart.
pub fn home_id(data_dir: &Path) -> String {
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    Sha256::digest(path.as_os_str().as_encoded_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A repository name as an image or volume name allows.
fn slug(repo: &str) -> String {
    let s: String = repo
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    let s = s.trim_matches('-').to_owned();
    if s.is_empty() { "repo".into() } else { s }
}

fn cache_volume(home: &str, repo: &str, path: &str) -> String {
    let digest: String = Sha256::digest(path.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("threadline-cache-{}-{home}-{digest}", slug(repo))
}

/// Why an environment could not be had; the run fails with it.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{0}")]
    Input(String),
    #[error(
        "preparing the environment of {repo} failed at {step} (exit {code}) after {elapsed}; its last lines:\n{tail}\nThe whole log is {log}. Fix the setup on the base branch (or [repos.{repo}.environment]) and retry"
    )]
    Step {
        repo: String,
        step: String,
        code: i64,
        elapsed: String,
        tail: String,
        log: String,
    },
    #[error(
        "preparing the environment of {repo} took longer than {secs} s (setup_timeout_secs) at {step}; the log is {log}"
    )]
    TimedOut {
        repo: String,
        secs: u64,
        step: String,
        log: String,
    },
    #[error("preparing the environment of {repo} failed: {detail}")]
    Other { repo: String, detail: String },
}

impl Inner {
    /// The image (and caches) a run of `pipeline` with `profile` uses: the agent's image,
    /// or the repository's environment, built first when it is not there yet. Runs that
    /// need the same environment at once wait for one build. `building` is called when a
    /// build starts.
    pub(super) async fn run_image(
        self: &Arc<Self>,
        pipeline: &Pipeline,
        profile: &AgentProfile,
        owner: (u32, u32),
        building: impl FnOnce(),
    ) -> Result<RunImage, EnvError> {
        let agent_only = || RunImage {
            image: profile.image.clone(),
            volumes: Vec::new(),
        };
        let Some(plan) = self.plan_environment(pipeline, profile, owner).await? else {
            return Ok(agent_only());
        };
        let volumes = plan.caches.clone();
        let have = |tag: String| async move { matches!(self.runtime.image_id(&tag).await, Ok(Some(_))) };
        if !have(plan.tag.clone()).await {
            // The card says so from here, whether this run builds or waits for a build.
            building();
            let lock = self
                .env_builds
                .lock()
                .unwrap()
                .entry(plan.key.clone())
                .or_default()
                .clone();
            let waiting_since = Instant::now();
            let one_build = lock.lock_owned().await;
            // A build of this key that failed while this run waited for it fails it at
            // once, instead of each waiting run trying again for as long.
            if let Some(failed) = self.env_failure_since(&plan.key, waiting_since) {
                return Err(EnvError::Other {
                    repo: plan.repo.clone(),
                    detail: format!("{failed} (the build this run waited for; retry to build again)"),
                });
            }
            if !have(plan.tag.clone()).await {
                // Its own task: a run that is cancelled while it waits does not cut the
                // build short (later runs use it); shutdown stops it.
                let (me, pipeline, built) = (self.clone(), pipeline.clone(), plan.clone());
                let task = self.tracker.spawn(async move {
                    let _one_build = one_build;
                    let result = me.build_environment(&pipeline, &built).await;
                    if let Err(e) = &result {
                        me.env_failures
                            .lock()
                            .unwrap()
                            .insert(built.key.clone(), (Instant::now(), e.to_string()));
                    }
                    result
                });
                task.await.map_err(|e| EnvError::Other {
                    repo: plan.repo.clone(),
                    detail: format!("the build stopped: {e}"),
                })??;
            }
        }
        Ok(RunImage {
            image: plan.tag,
            volumes,
        })
    }

    /// Why a build of `key` failed after `since` (while a run waited for it); a run that
    /// comes later (a retry) builds again.
    fn env_failure_since(&self, key: &str, since: Instant) -> Option<String> {
        let mut failures = self.env_failures.lock().unwrap();
        failures.retain(|_, (at, _)| at.elapsed() < Duration::from_secs(3600));
        failures.get(key).filter(|(at, _)| *at > since).map(|(_, e)| e.clone())
    }

    /// Reads the base branch's inputs and plans the repository's environment.
    pub(super) async fn plan_environment(
        &self,
        pipeline: &Pipeline,
        profile: &AgentProfile,
        owner: (u32, u32),
    ) -> Result<Option<Plan>, EnvError> {
        let (name, settings) = self.repo_settings(pipeline);
        let cfg = &settings.environment;
        let input = |detail: String| EnvError::Input(format!("the environment of {name}: {detail}"));
        let script_path = if cfg.setup.is_empty() {
            SETUP_SCRIPT.to_owned()
        } else {
            cfg.setup.clone()
        };
        let mut paths = vec![script_path.clone(), DEVCONTAINER.to_owned()];
        paths.extend(cfg.lock_files.iter().cloned());
        let read = |paths: Vec<String>, base: String| {
            let git = self.git.clone();
            let remote = pipeline.remote_url.clone();
            async move {
                tokio::task::spawn_blocking(move || git.base_files(&remote, &base, &paths))
                    .await
                    .expect("reading the base branch does not panic")
            }
        };
        let (commit, mut files) = read(paths, pipeline.base_branch.clone())
            .await
            .map_err(|e| input(e.to_string()))?;
        let lock_files: Vec<(String, Option<Vec<u8>>)> =
            cfg.lock_files.iter().cloned().zip(files.split_off(2)).collect();
        let devcontainer_text = files.pop().flatten().filter(|_| cfg.devcontainer);
        let script = files.pop().flatten();
        if script.is_none() && !cfg.setup.is_empty() {
            return Err(input(format!(
                "the setup script {:?} is not a file on the base branch `{}`",
                cfg.setup, pipeline.base_branch
            )));
        }
        let devcontainer = match devcontainer_text {
            Some(text) => Some(
                parse_devcontainer(&String::from_utf8_lossy(&text))
                    .map_err(|e| input(format!("{DEVCONTAINER} on `{}`: {e}", pipeline.base_branch)))?,
            ),
            None => None,
        };
        let dockerfile = match devcontainer.as_ref().and_then(|d| d.dockerfile.clone()) {
            Some((path, _)) => {
                let (_, mut found) = read(vec![path.clone()], commit.clone())
                    .await
                    .map_err(|e| input(e.to_string()))?;
                Some(found.pop().flatten().ok_or_else(|| {
                    input(format!(
                        "the devcontainer's Dockerfile {path:?} is not on `{}`",
                        pipeline.base_branch
                    ))
                })?)
            }
            None => None,
        };
        if script.is_none() && devcontainer.is_none() && cfg.caches.is_empty() && cfg.command.is_empty() {
            return Ok(None);
        }
        let inputs = Inputs {
            commit,
            remote: pipeline.remote_url.clone(),
            script: script.map(|text| (script_path, text)),
            devcontainer,
            dockerfile,
            lock_files,
        };
        let needs_agent_id = inputs
            .devcontainer
            .as_ref()
            .is_none_or(|d| d.image.is_none() && d.dockerfile.is_none());
        let agent_id = if needs_agent_id {
            self.runtime
                .image_id(&profile.image)
                .await
                .map_err(|e| input(e.to_string()))?
                .ok_or_else(|| {
                    input(format!(
                        "the agent image {} is not on this machine; build it with: {}",
                        profile.image,
                        super::container::build_hint(&profile.image)
                    ))
                })?
        } else {
            String::new()
        };
        Ok(plan(
            &self.env_home,
            name,
            cfg,
            &profile.image,
            &agent_id,
            owner,
            &inputs,
        ))
    }

    /// Builds `plan`'s image: the base (the devcontainer's Dockerfile built first), the
    /// setup run on it as root with the repository's files at /workspace and the secrets
    /// as files, then committed with the base's own settings. The log is kept beside the
    /// other environments'; old images of the repository are removed.
    pub(super) async fn build_environment(&self, pipeline: &Pipeline, plan: &Plan) -> Result<(), EnvError> {
        let started = Instant::now();
        let dir = self.config.data_dir.join("environments").join(slug(&plan.repo));
        // Unique per build: another process building the same key meanwhile (a
        // `threadline run`, an `env build`) uses a folder and container of its own.
        let build_id = uuid::Uuid::new_v4().simple().to_string();
        let work = dir.join(format!("{}.{}.work", plan.key, &build_id[..8]));
        let log_path = dir.join(format!("{}.log", plan.key));
        let other = |detail: String| EnvError::Other {
            repo: plan.repo.clone(),
            detail,
        };
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| other(format!("cannot create {}: {e}", dir.display())))?;
        let _ = tokio::fs::remove_dir_all(&work).await;
        let result = self
            .build_in(pipeline, plan, &work, &log_path, started, &build_id[..8])
            .await;
        let _ = tokio::fs::remove_dir_all(&work).await;
        self.metrics.environment_built(result.is_ok());
        if result.is_ok() {
            self.prune_environments(&plan.repo, &plan.tag, plan.keep).await;
        }
        tracing::info!(repo = %plan.repo, key = %plan.key, ok = result.is_ok(), secs = started.elapsed().as_secs(), "environment built");
        result
    }

    async fn build_in(
        &self,
        pipeline: &Pipeline,
        plan: &Plan,
        work: &Path,
        log_path: &Path,
        started: Instant,
        build_id: &str,
    ) -> Result<(), EnvError> {
        let other = |detail: String| EnvError::Other {
            repo: plan.repo.clone(),
            detail,
        };
        let run_dir = work.join("run");
        let src = work.join("src");
        std::fs::create_dir_all(run_dir.join("secrets")).map_err(|e| other(e.to_string()))?;
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| other(e.to_string()))?;
        {
            let git = self.git.clone();
            let (remote, base, dest) = (pipeline.remote_url.clone(), plan.commit.clone(), src.clone());
            tokio::task::spawn_blocking(move || git.export_base(&remote, &base, &dest))
                .await
                .expect("exporting the base branch does not panic")
                .map_err(|e| other(format!("cannot copy the base branch for the setup: {e}")))?;
        }
        // The secrets: files only the setup sees, redacted from its log.
        let mut values = Vec::new();
        for (name, source) in &plan.secrets {
            let value = read_secret(source).map_err(|e| {
                other(format!(
                    "the secret {name} ({source}) is not available: {e}; set it where Threadline runs and retry"
                ))
            })?;
            write_private(&run_dir.join("secrets").join(name), value.as_bytes()).map_err(|e| other(e.to_string()))?;
            values.push(value);
        }
        let redactor = crate::redact::Redactor::new(values);
        let mut log = std::fs::File::create(log_path).map_err(|e| other(format!("cannot write the log: {e}")))?;
        let cap = self.config.max_log_bytes;
        let mut written: u64 = 0;
        let mut write_log = |text: &str| {
            if written >= cap {
                return;
            }
            let shown = self.redactor.redact(&redactor.redact(&untrusted::clean(text)));
            let shown = untrusted::prefix(&shown, (cap - written) as usize);
            written += shown.len() as u64;
            let _ = log.write_all(shown.as_bytes());
            if written >= cap {
                let _ = log.write_all(b"\n[the log is cut here: max_log_bytes]\n");
            }
        };

        let base = match &plan.base {
            Base::Image(image) => {
                self.runtime
                    .ensure_image(image)
                    .await
                    .map_err(|e| other(e.to_string()))?;
                image.clone()
            }
            Base::Dockerfile { dockerfile, context } => {
                let tag = format!("threadline-env/{}-{}-base:{}", slug(&plan.repo), plan.home, plan.key);
                write_log(&format!("{STEP_MARK} the devcontainer's Dockerfile {dockerfile}\n"));
                let tar = context_tar(&src, context, dockerfile).map_err(other)?;
                let inside = relative(dockerfile, context);
                let building = self.runtime.build_dockerfile(tar, &inside, &tag);
                let (built, output) = match tokio::time::timeout(plan.timeout, building).await {
                    Ok(done) => done,
                    Err(_) => {
                        return Err(EnvError::TimedOut {
                            repo: plan.repo.clone(),
                            secs: plan.timeout.as_secs(),
                            step: format!("the devcontainer's Dockerfile `{dockerfile}`"),
                            log: log_path.display().to_string(),
                        });
                    }
                };
                write_log(&output);
                if let Err(e) = built {
                    return Err(EnvError::Step {
                        repo: plan.repo.clone(),
                        step: format!("the devcontainer's Dockerfile `{dockerfile}`"),
                        code: 1,
                        elapsed: crate::model::format_duration(started.elapsed().as_millis() as i64),
                        tail: tail(&output, &e.to_string()),
                        log: log_path.display().to_string(),
                    });
                }
                tag
            }
        };
        let base_config = self
            .runtime
            .image_config(&base)
            .await
            .map_err(|e| other(e.to_string()))?;

        // The driver: each step announced, the first failure ends it with its status.
        // The setup's own variables live in the driver, not the container's environment,
        // so the commit does not keep them.
        let mut driver = format!("set -e\nexport THREADLINE_SECRETS={RUN_MOUNT}/secrets HOME=/root\n");
        std::fs::create_dir_all(run_dir.join("steps")).map_err(|e| other(e.to_string()))?;
        for (i, step) in plan.steps.iter().enumerate() {
            let file = format!("steps/{i}.sh");
            write_private(&run_dir.join(&file), step.script.as_bytes()).map_err(|e| other(e.to_string()))?;
            driver.push_str(&format!(
                "echo {}\nsh {RUN_MOUNT}/{file}\n",
                quote(&format!("{STEP_MARK} {}", step.name))
            ));
        }
        write_private(&run_dir.join("setup.sh"), driver.as_bytes()).map_err(|e| other(e.to_string()))?;
        let env: Vec<String> = plan.container_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let name = format!(
            "threadline-env-{}-{}-{}-{build_id}",
            slug(&plan.repo),
            plan.home,
            plan.key
        );
        self.init_caches(plan, &base, &name).await?;
        let spec = SetupSpec {
            name: name.clone(),
            image: base.clone(),
            argv: vec!["sh".into(), format!("{RUN_MOUNT}/setup.sh")],
            env,
            workspace: Some(src.clone()),
            run_dir: Some(run_dir.clone()),
            // Never the caches: agents write those, and the setup has the secrets.
            volumes: Vec::new(),
            labels: setup_labels(plan),
            memory_bytes: (plan.memory_mb * 1024 * 1024) as i64,
            nano_cpus: 2_000_000_000,
            network: plan.network.clone(),
            log_file_bytes: self.config.max_log_bytes,
        };
        let id = self
            .runtime
            .create_setup(&spec)
            .await
            .map_err(|e| other(e.to_string()))?;
        let outcome = async {
            self.runtime.start(&id).await.map_err(|e| other(e.to_string()))?;
            let mut output = String::new();
            let mut logs = self.runtime.logs(&id);
            let followed = tokio::time::timeout(plan.timeout, async {
                loop {
                    let chunk = tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(EnvError::Other {
                            repo: plan.repo.clone(),
                            detail: "Threadline stopped during the build; the next run builds it again".into(),
                        }),
                        chunk = logs.next() => chunk,
                    };
                    let Some(Ok(chunk)) = chunk else { break };
                    let text = String::from_utf8_lossy(&chunk).into_owned();
                    write_log(&text);
                    output.push_str(&text);
                    if output.len() > 256 * 1024 {
                        // The latest 128 KB, cut on a character boundary.
                        let mut cut = output.len() - 128 * 1024;
                        while !output.is_char_boundary(cut) {
                            cut += 1;
                        }
                        output.drain(..cut);
                    }
                }
                Ok(self.runtime.wait(&id).await)
            })
            .await;
            let step = self.redactor.redact(&redactor.redact(&last_step(&output)));
            let code = match followed {
                Ok(Err(stopped)) => {
                    let _ = self.runtime.stop(&id, Duration::from_secs(1)).await;
                    return Err(stopped);
                }
                Err(_) => {
                    let _ = self.runtime.stop(&id, Duration::from_secs(1)).await;
                    return Err(EnvError::TimedOut {
                        repo: plan.repo.clone(),
                        secs: plan.timeout.as_secs(),
                        step,
                        log: log_path.display().to_string(),
                    });
                }
                Ok(Ok(waited)) => waited.map_err(|e| other(e.to_string()))?.unwrap_or(-1),
            };
            if code != 0 {
                return Err(EnvError::Step {
                    repo: plan.repo.clone(),
                    step,
                    code,
                    elapsed: crate::model::format_duration(started.elapsed().as_millis() as i64),
                    tail: tail(&self.redactor.redact(&redactor.redact(&output)), ""),
                    log: log_path.display().to_string(),
                });
            }
            let mut config = ImageConfig {
                env: base_config.env.clone(),
                ..base_config.clone()
            };
            for (k, v) in &plan.container_env {
                config.env.retain(|e| !e.starts_with(&format!("{k}=")));
                config.env.push(format!("{k}={v}"));
            }
            if let Some(user) = &plan.remote_user {
                config.user = Some(user.clone());
            }
            let mut labels = HashMap::from([
                (LABEL_ENV_REPO.to_owned(), plan.repo.clone()),
                (LABEL_ENV_HOME.to_owned(), plan.home.clone()),
                (LABEL_ENV_KEY.to_owned(), plan.key.clone()),
            ]);
            labels.insert("threadline.env.commit".into(), plan.commit.clone());
            self.runtime
                .commit(&id, &plan.tag, config, labels)
                .await
                .map_err(|e| other(e.to_string()))?;
            Ok(())
        }
        .await;
        let _ = self.runtime.remove(&id).await;
        outcome
    }

    /// Makes the cache volumes' folders and hands them to the agent's user, in a container
    /// of their own: no secrets, no network, nothing but the caches mounted.
    async fn init_caches(&self, plan: &Plan, base: &str, name: &str) -> Result<(), EnvError> {
        if plan.caches.is_empty() {
            return Ok(());
        }
        let other = |detail: String| EnvError::Other {
            repo: plan.repo.clone(),
            detail: format!("cannot prepare the caches: {detail}"),
        };
        let paths: Vec<String> = plan.caches.iter().map(|(_, p)| quote(p)).collect();
        let spec = SetupSpec {
            name: format!("{name}-caches"),
            image: base.to_owned(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "mkdir -p {0} && chown {1}:{2} {0}",
                    paths.join(" "),
                    plan.owner.0,
                    plan.owner.1
                ),
            ],
            env: Vec::new(),
            workspace: None,
            run_dir: None,
            volumes: plan.caches.clone(),
            labels: setup_labels(plan),
            memory_bytes: 256 * 1024 * 1024,
            nano_cpus: 1_000_000_000,
            network: "none".into(),
            log_file_bytes: 1024 * 1024,
        };
        let id = self
            .runtime
            .create_setup(&spec)
            .await
            .map_err(|e| other(e.to_string()))?;
        let done = async {
            self.runtime.start(&id).await.map_err(|e| other(e.to_string()))?;
            match tokio::time::timeout(Duration::from_secs(120), self.runtime.wait(&id)).await {
                Ok(Ok(Some(0))) => Ok(()),
                Ok(Ok(code)) => Err(other(format!("mkdir and chown ended with {code:?}"))),
                Ok(Err(e)) => Err(other(e.to_string())),
                Err(_) => Err(other("it took longer than 2 minutes".into())),
            }
        }
        .await;
        let _ = self.runtime.remove(&id).await;
        done
    }

    /// Setup containers older than the longest setup allows, and their work folders,
    /// left by a process that died during a build (they may hold secrets): removed at
    /// start.
    pub(super) async fn remove_stale_setups(&self) {
        let longest = self
            .config
            .repos
            .values()
            .map(|r| r.environment.setup_timeout_secs)
            .max()
            .unwrap_or(0)
            + 300;
        match self.runtime.remove_stale_setups(&self.env_home, longest).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "setup containers a stopped build left"),
            Err(e) => tracing::debug!(error = %e, "cannot look for stale setup containers"),
        }
        let root = self.config.data_dir.join("environments");
        let Ok(repos) = std::fs::read_dir(&root) else {
            return;
        };
        let stale = |p: &Path| {
            std::fs::symlink_metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > longest))
        };
        for repo in repos.flatten() {
            for entry in std::fs::read_dir(repo.path()).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|x| x == "work") && stale(&path) {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
    }

    /// Removes the repository's environment images beyond the newest `keep` (never
    /// `current`; one a container uses stays).
    pub(super) async fn prune_environments(&self, repo: &str, current: &str, keep: usize) {
        let Ok(images) = self.runtime.env_images(&self.env_home, Some(repo)).await else {
            return;
        };
        for old in images.iter().filter(|i| i.tag != current).skip(keep.saturating_sub(1)) {
            match self.runtime.remove_image(&old.id).await {
                Ok(true) => tracing::info!(repo, image = %old.tag, "old environment removed"),
                Ok(false) => {}
                Err(e) => tracing::debug!(repo, error = %e, "cannot remove an old environment"),
            }
        }
    }
}

impl super::Orchestrator {
    /// The image a run of `pipeline` would start from now, without building anything:
    /// the repository's environment if it is built, else the agent's image.
    pub async fn existing_environment(
        &self,
        pipeline: &Pipeline,
        profile: &AgentProfile,
        owner: (u32, u32),
    ) -> RunImage {
        let agent_only = RunImage {
            image: profile.image.clone(),
            volumes: Vec::new(),
        };
        match self.inner.plan_environment(pipeline, profile, owner).await {
            Ok(Some(plan)) if matches!(self.inner.runtime.image_id(&plan.tag).await, Ok(Some(_))) => RunImage {
                image: plan.tag,
                volumes: plan.caches,
            },
            _ => agent_only,
        }
    }

    /// A configured repository as a pipeline on its base branch, for building and checking
    /// its environment outside a run; the mirror is brought up to date first.
    async fn repo_as_pipeline(&self, repo: &str, agent: Option<&str>) -> Result<(Pipeline, AgentProfile), EnvError> {
        let inner = &self.inner;
        let settings = inner
            .config
            .repos
            .get(repo)
            .ok_or_else(|| EnvError::Input(format!("no repository {repo:?} is configured")))?;
        let agent_name = agent
            .map(str::to_owned)
            .or(settings.agent.clone())
            .unwrap_or_else(|| inner.config.default_agent.clone());
        let profile = inner
            .config
            .agent(&agent_name)
            .cloned()
            .ok_or_else(|| EnvError::Input(format!("there is no agent named {agent_name:?}")))?;
        let url = settings.url.clone();
        let source = tokio::task::spawn_blocking(move || super::workspace::resolve_repo(&url))
            .await
            .expect("resolve_repo does not panic")
            .map_err(|e| EnvError::Input(e.to_string()))?;
        let pipeline = Pipeline {
            id: "env".into(),
            repo: source.repo,
            remote_url: source.remote_url.clone(),
            local_only: source.local_only,
            base_branch: settings
                .base_branch
                .clone()
                .unwrap_or_else(|| inner.config.default_base_branch.clone()),
            branch: String::new(),
            agent: agent_name,
            title: String::new(),
            origin: crate::model::Origin {
                surface: "cli".into(),
                thread: String::new(),
                url: String::new(),
            },
            created_at: 0,
        };
        let git = inner.git.clone();
        let remote = source.remote_url;
        tokio::task::spawn_blocking(move || git.sync_mirror(&remote))
            .await
            .expect("syncing the mirror does not panic")
            .map_err(|e| EnvError::Input(e.to_string()))?;
        Ok((pipeline, profile))
    }

    /// Builds (or finds built) the environment of a configured repository for `agent`,
    /// from its base branch as the remote has it now, for `threadline env build`.
    pub async fn build_environment(&self, repo: &str, agent: Option<&str>) -> Result<Option<String>, EnvError> {
        let (pipeline, profile) = self.repo_as_pipeline(repo, agent).await?;
        let owner = super::executor::agent_owner(&profile, self.inner.me).map_err(EnvError::Input)?;
        let image = self.inner.run_image(&pipeline, &profile, owner, || {}).await?;
        Ok((image.image != profile.image).then_some(image.image))
    }

    /// What `threadline doctor` says of a repository's environment: None when it has
    /// none, else its image and whether it is built; an error for what would fail a run
    /// (a devcontainer that does not parse, a missing image or secret).
    pub async fn check_environment(&self, repo: &str) -> Result<Option<(String, bool)>, EnvError> {
        let (pipeline, profile) = self.repo_as_pipeline(repo, None).await?;
        let owner = super::executor::agent_owner(&profile, self.inner.me).map_err(EnvError::Input)?;
        let Some(plan) = self.inner.plan_environment(&pipeline, &profile, owner).await? else {
            return Ok(None);
        };
        for (name, source) in &plan.secrets {
            read_secret(source).map_err(|e| EnvError::Input(format!("the secret {name} ({source}): {e}")))?;
        }
        let built = matches!(self.inner.runtime.image_id(&plan.tag).await, Ok(Some(_)));
        Ok(Some((plan.tag, built)))
    }

    /// The environment images on this engine (of one repository, or all).
    pub async fn environment_images(&self, repo: Option<&str>) -> Result<Vec<super::container::EnvImage>, String> {
        self.inner
            .runtime
            .env_images(&self.inner.env_home, repo)
            .await
            .map_err(|e| e.to_string())
    }

    /// Removes environment images (of one repository, or all); those in use stay.
    pub async fn remove_environments(&self, repo: Option<&str>) -> Result<(usize, usize), String> {
        let images = self.environment_images(repo).await?;
        let mut removed = 0;
        for image in &images {
            if self
                .inner
                .runtime
                .remove_image(&image.id)
                .await
                .map_err(|e| e.to_string())?
            {
                removed += 1;
            }
        }
        Ok((removed, images.len() - removed))
    }
}

/// The labels of a setup container: whose it is, so stale ones can be found.
fn setup_labels(plan: &Plan) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_ENV_REPO.to_owned(), plan.repo.clone()),
        (LABEL_ENV_HOME.to_owned(), plan.home.clone()),
        (LABEL_ENV_KEY.to_owned(), plan.key.clone()),
        (LABEL_ENV_SETUP.to_owned(), "1".to_owned()),
    ])
}

/// A secret's value from `env:VAR` or `file:/path`.
fn read_secret(source: &str) -> Result<String, String> {
    if let Some(var) = source.strip_prefix("env:") {
        return std::env::var(var).map_err(|_| format!("{var} is not set in Threadline's environment"));
    }
    let path = source.strip_prefix("file:").unwrap_or(source);
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    if bytes.len() > MAX_SECRET {
        return Err(format!("{path} is larger than {MAX_SECRET} bytes"));
    }
    String::from_utf8(bytes)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
        .map_err(|_| format!("{path} is not text"))
}

/// A file only its owner (root, in the setup) may read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(bytes)
}

/// The name of the last step the driver started.
fn last_step(output: &str) -> String {
    output
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(STEP_MARK))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "the start of the setup".into())
}

/// The last lines of a log (without the driver's markers), then `extra`.
fn tail(output: &str, extra: &str) -> String {
    let lines: Vec<&str> = output.lines().filter(|l| !l.starts_with(STEP_MARK)).collect();
    let mut shown: Vec<String> = lines[lines.len().saturating_sub(6)..]
        .iter()
        .map(|l| format!("  {}", untrusted::prefix(l, 300)))
        .collect();
    if !extra.is_empty() {
        shown.push(format!("  {extra}"));
    }
    shown.join("\n")
}

/// `path` relative to `dir` (both paths in the repository), for a Dockerfile inside its
/// context.
fn relative(path: &str, dir: &str) -> String {
    if dir.is_empty() || dir == "." {
        return path.to_owned();
    }
    path.strip_prefix(&format!("{dir}/"))
        .map_or_else(|| path.to_owned(), str::to_owned)
}

/// The build context `context` of the exported tree as a tar, the Dockerfile included
/// even when it lies outside the context.
fn context_tar(src: &Path, context: &str, dockerfile: &str) -> Result<Vec<u8>, String> {
    let root = if context.is_empty() || context == "." {
        src.to_path_buf()
    } else {
        src.join(context)
    };
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", &root)
        .map_err(|e| format!("cannot pack the build context {context:?}: {e}"))?;
    if relative(dockerfile, context) == dockerfile && !(context.is_empty() || context == ".") {
        tar.append_path_with_name(src.join(dockerfile), dockerfile)
            .map_err(|e| format!("cannot pack the Dockerfile: {e}"))?;
    }
    tar.into_inner().map_err(|e| e.to_string())
}

/// The environment images on this engine, for `threadline env ls`.
pub fn describe_size(bytes: i64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

pub type EnvBuilds = std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// `PathBuf` of an environment's kept build log.
pub fn log_path(data_dir: &Path, repo: &str, key: &str) -> PathBuf {
    data_dir
        .join("environments")
        .join(slug(repo))
        .join(format!("{key}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devcontainers_are_read_with_comments_and_relative_paths() {
        let text = r#"{
            // the image for agents
            "name": "app", /* inline */
            "build": { "dockerfile": "Dockerfile", "context": "..", },
            "containerEnv": { "RUST_LOG": "debug", "URL": "http://x//y" },
            "postCreateCommand": ["apt-get", "install", "-y", "it's"],
            "onCreateCommand": "echo one",
            "remoteUser": "vscode",
        }"#;
        let dc = parse_devcontainer(text).unwrap();
        assert_eq!(dc.dockerfile, Some((".devcontainer/Dockerfile".into(), "".into())));
        assert_eq!(
            dc.container_env,
            vec![
                ("RUST_LOG".into(), "debug".into()),
                ("URL".into(), "http://x//y".into())
            ]
        );
        assert_eq!(dc.commands[0].script, "echo one");
        assert_eq!(dc.commands[1].script, r"'apt-get' 'install' '-y' 'it'\''s'");
        assert_eq!(dc.remote_user.as_deref(), Some("vscode"));
        assert!(parse_devcontainer(r#"{"build": {"dockerfile": "../../x"}}"#).is_err());
        assert!(parse_devcontainer(r#"{"name": "no image"}"#).is_err());
    }

    #[test]
    fn the_key_follows_every_input() {
        let cfg = EnvironmentConfig {
            lock_files: vec!["Cargo.lock".into()],
            ..Default::default()
        };
        let inputs = |script: &str, lock: Option<&str>| Inputs {
            commit: "c".into(),
            remote: "/srv/app.git".into(),
            script: Some((SETUP_SCRIPT.into(), script.as_bytes().to_vec())),
            devcontainer: None,
            dockerfile: None,
            lock_files: vec![("Cargo.lock".into(), lock.map(|l| l.as_bytes().to_vec()))],
        };
        let key = |i: &Inputs, id: &str| plan("h", "app", &cfg, "agent:1", id, (1000, 1000), i).unwrap().key;
        let a = key(&inputs("apt-get install jq", Some("v1")), "sha256:1");
        assert_eq!(a, key(&inputs("apt-get install jq", Some("v1")), "sha256:1"));
        assert_ne!(a, key(&inputs("apt-get install yq", Some("v1")), "sha256:1"));
        assert_ne!(a, key(&inputs("apt-get install jq", Some("v2")), "sha256:1"));
        assert_ne!(a, key(&inputs("apt-get install jq", None), "sha256:1"));
        assert_ne!(a, key(&inputs("apt-get install jq", Some("v1")), "sha256:2"));
        let none = Inputs {
            commit: "c".into(),
            remote: "/srv/app.git".into(),
            script: None,
            devcontainer: None,
            dockerfile: None,
            lock_files: Vec::new(),
        };
        assert!(plan("h", "app", &EnvironmentConfig::default(), "agent:1", "x", (1, 1), &none).is_none());
    }
}
