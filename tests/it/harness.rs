//! A test environment: a bare origin repository, a data directory, a configuration with
//! a busybox "sh" agent whose prompt is its script, and an orchestrator started on them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use threadline::config::{AgentProfile, Config};
use threadline::daemon::{DaemonError, Listeners, serve};
use threadline::model::{Origin, Run};
use threadline::orchestrator::{ContainerRuntime, FollowUp, NewPipeline, Orchestrator, Scope, Submitted};
use threadline::store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const IMAGE: &str = "threadline-test-agent:1";

/// Builds the test image once per test process.
pub fn ensure_image() {
    static BUILT: OnceLock<Mutex<bool>> = OnceLock::new();
    let mut built = BUILT.get_or_init(|| Mutex::new(false)).lock().unwrap();
    if *built {
        return;
    }
    let ctx = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/agent-image/Dockerfile");
    std::fs::copy(&src, ctx.path().join("Dockerfile")).unwrap();
    std::fs::copy("/bin/busybox", ctx.path().join("busybox"))
        .expect("the tests need a static busybox at /bin/busybox: apt-get install busybox-static");
    let out = Command::new("docker")
        .args(["build", "-q", "-t", IMAGE])
        .arg(ctx.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker CLI");
    assert!(
        out.status.success(),
        "docker build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    *built = true;
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Tester")
        .env("GIT_AUTHOR_EMAIL", "tester@example.com")
        .env("GIT_COMMITTER_NAME", "Tester")
        .env("GIT_COMMITTER_EMAIL", "tester@example.com")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub origin: PathBuf,
    pub config: Config,
}

/// A fresh PostgreSQL database when TEST_POSTGRES_URL names a server.
pub fn test_database() -> Option<String> {
    let admin = std::env::var("TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty())?;
    let name = format!("tl_{}", uuid::Uuid::new_v4().simple());
    let out = Command::new("psql")
        .arg(&admin)
        .args(["-q", "-c", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql (the PostgreSQL client)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (server, _) = admin.rsplit_once('/').expect("a URL ending in /DATABASE");
    Some(format!("{server}/{name}"))
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some((admin, name)) = std::env::var("TEST_POSTGRES_URL")
            .ok()
            .zip(self.config.database_url.rsplit_once('/').map(|(_, n)| n.to_owned()))
            .filter(|(_, n)| n.starts_with("tl_"))
        {
            let _ = Command::new("psql")
                .arg(&admin)
                .args(["-q", "-c", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")])
                .output();
        }
    }
}

impl TestEnv {
    /// A bare origin with `main` holding a README and a .gitignore.
    pub fn new() -> TestEnv {
        ensure_image();
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("origin.git");
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        git(
            dir.path(),
            &["init", "-q", "--bare", "-b", "main", origin.to_str().unwrap()],
        );
        git(&seed, &["init", "-q", "-b", "main"]);
        std::fs::write(seed.join("README.md"), "# demo\n").unwrap();
        std::fs::write(seed.join(".gitignore"), "*.tmp\n").unwrap();
        git(&seed, &["add", "."]);
        git(&seed, &["commit", "-q", "-m", "initial"]);
        git(&seed, &["push", "-q", origin.to_str().unwrap(), "main"]);

        let mut config = Config {
            data_dir: dir.path().join("data"),
            max_concurrent_runs: 2,
            default_agent: "sh".into(),
            agents: BTreeMap::new(),
            ..Config::default()
        };
        config.agents.insert("sh".into(), sh_agent());
        // TEST_POSTGRES_URL (an admin URL) runs the suite on PostgreSQL: a fresh
        // database per environment, dropped with it.
        if let Some(db) = test_database() {
            config.database_url = db;
        }
        // The daemon's listeners on free ports.
        config.web.listen = "127.0.0.1:0".into();
        config.slack.events_listen = "127.0.0.1:0".into();
        TestEnv { dir, origin, config }
    }

    pub fn origin_url(&self) -> String {
        self.origin.display().to_string()
    }

    /// Configures the origin as the repository "demo", with a forge-style branch link.
    pub fn add_demo_repo(&mut self) {
        let repo = threadline::config::RepoConfig {
            url: self.origin_url(),
            branch_url: "https://forge.example/demo/tree/{branch}".into(),
            ..Default::default()
        };
        self.config.repos.insert("demo".into(), repo);
    }

    pub fn agent_mut(&mut self) -> &mut AgentProfile {
        self.config.agents.get_mut("sh").unwrap()
    }

    pub async fn orchestrator(&self) -> Orchestrator {
        let orch = self.orchestrator_unstarted().await;
        orch.start(Scope::All).await.unwrap();
        orch
    }

    pub async fn orchestrator_unstarted(&self) -> Orchestrator {
        self.config.validate(None).unwrap();
        let store = Store::open(&self.config.database_url()).await.unwrap();
        let runtime = ContainerRuntime::connect().await.unwrap();
        Orchestrator::new(Arc::new(self.config.clone()), store, runtime)
    }

    /// A worker or front end in this process, on its own home, sharing the environment's
    /// database. Its agents say who ran them (`$WORKER`).
    pub async fn in_process(&self, name: &str, labels: &[&str], role: threadline::orchestrator::Role) -> Orchestrator {
        let mut config = self.config.clone();
        config.database_url = self.config.database_url();
        config.data_dir = self.dir.path().join(format!("home-{name}"));
        config.worker.name = name.into();
        config.worker.labels = labels.iter().map(|l| l.to_string()).collect();
        for agent in config.agents.values_mut() {
            agent.env_set.insert("WORKER".into(), name.into());
        }
        config.validate(None).unwrap();
        let store = threadline::store::Store::open(&config.database_url()).await.unwrap();
        let runtime = threadline::orchestrator::ContainerRuntime::connect().await.unwrap();
        let orch = Orchestrator::new(std::sync::Arc::new(config), store, runtime);
        orch.start_as(Scope::All, role).await.unwrap();
        orch
    }

    /// The real daemon on this configuration: `daemon::serve`, what `threadline serve`
    /// runs, on listeners bound on free ports.
    pub async fn daemon(&self) -> Daemon {
        let orch = self.orchestrator_unstarted().await;
        let listeners = Listeners::bind(&self.config).await.unwrap();
        let (web, slack_events) = (listeners.web_addr(), listeners.slack_events_addr());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (orch, stop) = (orch.clone(), stop.clone());
            async move { serve(orch, listeners, async move { stop.cancelled().await }).await }
        });
        Daemon {
            orch,
            web,
            slack_events,
            stop,
            task,
        }
    }

    pub async fn start(&self, orch: &Orchestrator, prompt: &str) -> Submitted {
        orch.submit_pipeline(NewPipeline {
            repo: self.origin_url(),
            base_branch: None,
            agent: None,
            prompt: prompt.into(),
            requested_by: "tester".into(),
            origin: Origin::cli(),
            idempotency_key: None,
            mode: Default::default(),
            attachments: Vec::new(),
        })
        .await
        .unwrap()
    }

    /// The content of `path` on `branch` in the origin, if both exist.
    pub fn origin_file(&self, branch: &str, path: &str) -> Option<String> {
        let repo = git2::Repository::open_bare(&self.origin).unwrap();
        let commit = repo
            .find_reference(&format!("refs/heads/{branch}"))
            .ok()?
            .peel_to_commit()
            .ok()?;
        let entry = commit.tree().ok()?.get_path(Path::new(path)).ok()?;
        let blob = entry.to_object(&repo).ok()?.peel_to_blob().ok()?;
        Some(String::from_utf8_lossy(blob.content()).into_owned())
    }

    pub fn origin_head(&self, branch: &str) -> Option<String> {
        let repo = git2::Repository::open_bare(&self.origin).unwrap();
        repo.refname_to_id(&format!("refs/heads/{branch}"))
            .ok()
            .map(|o| o.to_string())
    }

    pub fn origin_message(&self, branch: &str) -> String {
        git(&self.origin, &["log", "-1", "--format=%B", branch])
    }
}

pub fn follow_up(pipeline: &str, prompt: &str) -> FollowUp {
    FollowUp {
        pipeline_id: pipeline.into(),
        prompt: prompt.into(),
        agent: None,
        requested_by: "tester".into(),
        idempotency_key: None,
        mode: Default::default(),
        attachments: Vec::new(),
    }
}

/// A run of the "sh" agent to insert into a store directly.
pub fn new_run(prompt: &str, key: Option<String>) -> threadline::store::NewRun {
    threadline::store::NewRun {
        prompt: prompt.into(),
        agent: "sh".into(),
        requested_by: "t".into(),
        idempotency_key: key,
        mode: Default::default(),
        attachments: Vec::new(),
        forge_request: None,
        requires: String::new(),
        poster: None,
    }
}

/// The "sh" agent: busybox sh runs the prompt file as its script.
pub fn sh_agent() -> AgentProfile {
    AgentProfile {
        image: IMAGE.into(),
        argv: vec!["sh".into(), "/threadline/prompt.md".into()],
        network: "none".into(),
        memory_mb: 256,
        cpus: 1.0,
        pids_limit: 64,
        timeout_secs: 120,
        stop_grace_secs: 1,
        ..AgentProfile::default()
    }
}

/// Waits for the first pipeline a chat message starts (the store's newest).
pub async fn first_pipeline(store: &Store) -> threadline::model::Pipeline {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(p) = store.pipelines(1).await.unwrap().pop() {
            return p.pipeline;
        }
        assert!(tokio::time::Instant::now() < deadline, "no pipeline was started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a run with this id exists (a chat message became a run).
pub async fn appears(store: &Store, run_id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.run(run_id).await.unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "run {run_id} never appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the run reaches a state for which `done` holds.
pub async fn wait_for(store: &Store, run_id: &str, what: &str, done: impl Fn(&Run) -> bool) -> Run {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let run = store.run(run_id).await.unwrap().expect("run exists");
        if done(&run) {
            return run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run {run_id} never became {what}; it is {} ({:?})",
            run.state,
            run.error
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn finished(store: &Store, run_id: &str) -> Run {
    wait_for(store, run_id, "finished", |r| r.state.is_terminal()).await
}

/// Writes a TOML config for the binary: this environment's data directory and "sh" agent.
pub fn write_cli_config(env: &TestEnv, extra: &str) -> PathBuf {
    let path = env.dir.path().join("threadline.toml");
    let agent = sh_agent();
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\ndatabase_url = {:?}\ndefault_agent = \"sh\"\n{extra}\n[agents.sh]\nimage = {:?}\nargv = {:?}\nnetwork = \"none\"\nstop_grace_secs = 1\n",
            env.config.data_dir, env.config.database_url, agent.image, agent.argv
        ),
    )
    .unwrap();
    path
}

/// The `threadline` binary with that config.
pub fn cli(config: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_threadline"));
    c.arg("--config").arg(config).args(args);
    c
}

/// A chat sender with this id and no roles.
pub fn sender(id: &str) -> threadline::bots::chat::Sender {
    threadline::bots::chat::Sender {
        id: id.into(),
        ..Default::default()
    }
}

/// Polls `check` every 100 ms for up to 30 s; panics naming `what` and, for the
/// diagnosis, whatever `seen` describes.
pub async fn poll_until(what: &str, check: impl Fn() -> bool, seen: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        if tokio::time::Instant::now() >= deadline {
            panic!("never saw: {what}; saw: {}", seen());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks, for `window`, that what must not happen does not: `check` must hold every
/// time it is looked at (a negative cannot be waited for; this fails at the first sight
/// of the contrary rather than sleeping and looking once).
pub async fn holds_for<F, Fut>(what: &str, window: Duration, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + window;
    loop {
        assert!(check().await, "no longer true: {what}");
        if tokio::time::Instant::now() >= end {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pipeline as the store keeps it: `id` on `repo`, branch `threadline/p-<id>` from main.
pub fn pipeline_on(id: &str, repo: &str) -> threadline::model::Pipeline {
    threadline::model::Pipeline {
        id: id.into(),
        repo: repo.into(),
        remote_url: repo.into(),
        local_only: false,
        base_branch: "main".into(),
        branch: format!("threadline/p-{id}"),
        agent: "sh".into(),
        title: "t".into(),
        origin: Origin::cli(),
        created_at: threadline::model::now_millis(),
    }
}

/// A daemon started by [`TestEnv::daemon`].
pub struct Daemon {
    pub orch: Orchestrator,
    pub web: Option<SocketAddr>,
    pub slack_events: Option<SocketAddr>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), DaemonError>>,
}

impl Daemon {
    /// It stopped by itself (a chat adapter gave up).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// GETs `path` from its web listener: the response's head and body, as text.
    pub async fn get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.web.expect("web is enabled");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    /// Shuts it down as SIGTERM would; its result.
    pub async fn stop(self) -> Result<(), DaemonError> {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// Channel `id` bound to `repo`, with these prompters and approvers (none: anyone in the
/// channel may prompt, nobody may approve).
pub fn one_channel(
    id: &str,
    repo: &str,
    prompters: &[&str],
    approvers: &[&str],
) -> std::collections::BTreeMap<String, threadline::bots::chat::ChannelBinding> {
    let names = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
    let binding = threadline::bots::chat::ChannelBinding {
        repos: vec![repo.into()],
        prompters: names(prompters),
        approvers: names(approvers),
        ..Default::default()
    };
    [(id.to_owned(), binding)].into()
}

/// A TCP forwarder the test can cut: every connection through it dropped, and new ones
/// refused, until healed. A network partition between Threadline and its database.
pub struct Cuttable {
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Cuttable {
    pub async fn start(target: std::net::SocketAddr) -> Cuttable {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (is_cut, cuts) = (cut.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if is_cut.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let mut cuts = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {} // the partition: both ends dropped
                    }
                });
            }
        });
        Cuttable { addr, cut, generation }
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A PostgreSQL URL through a new [`Cuttable`] forwarder: (the forwarder, the URL).
pub async fn cuttable_database(url: &str) -> (Cuttable, String) {
    let (credentials, rest) = url.split_once('@').expect("a URL with user@host");
    let (host_port, db) = rest.split_once('/').unwrap();
    let target: std::net::SocketAddr = tokio::net::lookup_host(host_port).await.unwrap().next().unwrap();
    let proxy = Cuttable::start(target).await;
    let through = format!("{credentials}@{}/{db}", proxy.addr);
    (proxy, through)
}
