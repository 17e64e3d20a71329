//! Repository environments against the real Docker engine: setup scripts and
//! devcontainers built once into local images, reused by every pipeline, rebuilt when an
//! input changes, one build for concurrent first runs, failures that name their step,
//! secrets that reach the setup only; and the egress allowlist, on private networks this
//! test creates.

use std::path::Path;
use std::process::Command;

use threadline::config::{AgentProfile, EnvironmentConfig, RepoConfig};
use threadline::model::{Run, RunState};
use threadline::orchestrator::Orchestrator;

use crate::harness::{IMAGE, TestEnv, finished, follow_up, git, sh_agent};

const DEBIAN: &str = "threadline-test/debian:bookworm";

/// Commits `files` to the origin's `main`, as a person pushing to the base branch.
fn push_to_main(env: &TestEnv, files: &[(&str, &str)]) {
    let work = env.dir.path().join(format!("push-{}", uuid_ish()));
    git(
        env.dir.path(),
        &["clone", "-q", &env.origin_url(), work.to_str().unwrap()],
    );
    for (path, text) in files {
        let file = work.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }
    git(&work, &["add", "-A"]);
    git(
        &work,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@e",
            "commit",
            "-q",
            "-m",
            "setup",
        ],
    );
    git(&work, &["push", "-q", "origin", "main"]);
}

fn uuid_ish() -> String {
    format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// `env` with the origin as repository "demo" whose environment is `environment`, and
/// its agent on `image`.
fn env_with(image: &str, environment: EnvironmentConfig) -> TestEnv {
    let mut env = TestEnv::new();
    env.config.agents.insert(
        "sh".into(),
        AgentProfile {
            image: image.into(),
            ..sh_agent()
        },
    );
    env.config.repos.insert(
        "demo".into(),
        RepoConfig {
            url: env.origin_url(),
            environment,
            ..Default::default()
        },
    );
    env
}

async fn succeeded(orch: &Orchestrator, run_id: &str) -> Run {
    let run = finished(orch.store(), run_id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}\n{}", run.error, run.log_tail);
    run
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every byte of an image: its layers and configuration, as `docker save` writes them.
fn image_bytes(tag: &str) -> Vec<u8> {
    let out = Command::new("docker").args(["save", tag]).output().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setup_script_is_built_once_shared_by_pipelines_and_keeps_its_secret() {
    let canary = format!("canary-{}-secret", uuid_ish());
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), format!("{canary}\n")).unwrap();
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(canary.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let mut env = env_with(
        DEBIAN,
        EnvironmentConfig {
            lock_files: vec!["deps.lock".into()],
            caches: vec!["/cache".into()],
            secrets: [("CANARY".to_owned(), format!("file:{}", secret_file.path().display()))].into(),
            ..Default::default()
        },
    );
    env.config.max_concurrent_runs = 1;
    // A package from Debian's repository, the secret checked by its digest (the canary
    // itself is never in the repository), a marker; the caches (which agents write) are
    // not mounted in the setup, which has the secrets.
    let setup = format!(
        "set -e\napt-get update -qq\napt-get install -y -qq jq >/dev/null\n\
         test \"$(printf %s \"$(cat \"$THREADLINE_SECRETS/CANARY\")\" | sha256sum | cut -d' ' -f1)\" = {digest}\n\
         echo setup-saw-the-secret\ncat /proc/sys/kernel/random/uuid > /opt/built-id\n\
         test ! -e /cache/mine && echo the-setup-has-no-caches\n"
    );
    push_to_main(&env, &[(".threadline/setup.sh", &setup), ("deps.lock", "v1\n")]);
    let orch = env.orchestrator().await;
    let script = "jq --version > jq.txt; cat /opt/built-id > built.txt; env > env.txt; \
                  ls /run/threadline/secrets > secrets.txt 2>&1; echo mine > /cache/mine; \
                  echo the agent ran";

    // The first run builds; its card said so while it did.
    let first = env.start(&orch, script).await;
    let mut saw_preparing = false;
    loop {
        let run = orch.store().run(&first.run.id).await.unwrap().unwrap();
        if run.state == RunState::Preparing && run.progress.as_ref().is_some_and(|p| p.environment_since.is_some()) {
            saw_preparing = true;
        }
        if run.state.is_terminal() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(saw_preparing, "the run showed no environment build");
    let one = succeeded(&orch, &first.run.id).await;
    let branch = &first.pipeline.branch;
    let file = |branch: &str, name: &str| env.origin_file(branch, name).unwrap_or_default();
    assert!(file(branch, "jq.txt").starts_with("jq-"), "{}", file(branch, "jq.txt"));
    assert!(
        file(branch, "secrets.txt").contains("No such file"),
        "{}",
        file(branch, "secrets.txt")
    );
    let built = file(branch, "built.txt");
    assert!(!built.is_empty());

    // Another pipeline reuses the image without building.
    let second = env.start(&orch, script).await;
    succeeded(&orch, &second.run.id).await;
    assert_eq!(
        file(&second.pipeline.branch, "built.txt"),
        built,
        "rebuilt for another pipeline"
    );
    let images = orch.environment_images(Some("demo")).await.unwrap();
    assert_eq!(images.len(), 1, "{images:?}");
    let tag = images[0].tag.clone();

    // The canary reached the setup only: not the agent's environment, the image's layers
    // or history, the build log, the run's log, or a commit.
    let saw = std::fs::read_dir(env.config.data_dir.join("environments/demo")).unwrap();
    let logs: Vec<_> = saw
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .collect();
    assert_eq!(logs.len(), 1);
    let build_log = std::fs::read_to_string(logs[0].path()).unwrap();
    assert!(build_log.contains("setup-saw-the-secret"), "{build_log}");
    assert!(build_log.contains("the-setup-has-no-caches"), "{build_log}");
    assert!(!build_log.contains(&canary));
    assert!(!file(branch, "env.txt").contains(&canary));
    assert!(!file(branch, "env.txt").is_empty());
    assert!(!contains(&image_bytes(&tag), &canary), "the canary is in the image");
    assert!(!docker(&["history", "--no-trunc", &tag]).contains(&canary));
    assert!(!docker(&["image", "inspect", &tag]).contains(&canary));
    let run_log = std::fs::read_to_string(orch.log_path(&one.id)).unwrap();
    assert!(!run_log.contains(&canary));
    assert!(!git(&env.origin, &["log", "-p", "--all"]).contains(&canary));

    // A changed lock file rebuilds; the follow-up runs on the new image, the cache kept.
    push_to_main(&env, &[("deps.lock", "v2\n")]);
    let again = orch
        .submit_follow_up(follow_up(
            &first.pipeline.id,
            "cat /opt/built-id > built.txt; cat /cache/mine > mine.txt",
        ))
        .await
        .unwrap();
    succeeded(&orch, &again.run.id).await;
    assert_ne!(
        file(branch, "built.txt"),
        built,
        "not rebuilt after the lock file changed"
    );
    assert_eq!(
        file(branch, "mine.txt"),
        "mine\n",
        "the cache survives runs and rebuilds"
    );
    assert_eq!(orch.environment_images(Some("demo")).await.unwrap().len(), 2);
    orch.shutdown().await;
    let (removed, _) = orch.remove_environments(Some("demo")).await.unwrap();
    assert_eq!(removed, 2);
    let volume = docker(&["volume", "ls", "-q", "--filter", "name=threadline-cache-demo-"]);
    for v in volume.lines() {
        let _ = Command::new("docker").args(["volume", "rm", v]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_runs_build_once_and_a_failing_setup_names_its_step() {
    let mut env = env_with(IMAGE, EnvironmentConfig::default());
    env.config.max_concurrent_runs = 2;
    push_to_main(
        &env,
        &[(
            ".threadline/setup.sh",
            "echo building\nsleep 2\nmkdir -p /opt\ncat /proc/sys/kernel/random/uuid > /opt/built-id\n",
        )],
    );
    let orch = env.orchestrator().await;
    let (a, b) = tokio::join!(
        env.start(&orch, "cat /opt/built-id > id.txt"),
        env.start(&orch, "cat /opt/built-id > id.txt")
    );
    succeeded(&orch, &a.run.id).await;
    succeeded(&orch, &b.run.id).await;
    let id = |s: &threadline::orchestrator::Submitted| env.origin_file(&s.pipeline.branch, "id.txt").unwrap();
    assert_eq!(id(&a), id(&b), "two builds for one key");
    let metrics = orch.metrics().render(&[]);
    assert!(
        metrics.contains("threadline_environment_builds_total{outcome=\"built\"} 1"),
        "{metrics}"
    );

    // A failing setup fails the run, naming the step, its status and the log.
    push_to_main(
        &env,
        &[(
            ".threadline/setup.sh",
            "echo step one\necho something broke >&2\nexit 3\n",
        )],
    );
    // Two runs at once: one build fails, and the run that waited for it fails with it
    // rather than trying again.
    let (failing, waiting) = tokio::join!(env.start(&orch, "true"), env.start(&orch, "true"));
    let run = finished(orch.store(), &failing.run.id).await;
    assert_eq!(run.state, RunState::Failed);
    let other = finished(orch.store(), &waiting.run.id).await;
    assert_eq!(other.state, RunState::Failed);
    let metrics = orch.metrics().render(&[]);
    assert!(
        metrics.contains("threadline_environment_builds_total{outcome=\"failed\"} 1"),
        "{metrics}"
    );
    let error = run.error.unwrap();
    assert!(error.contains("failed at `.threadline/setup.sh` (exit 3)"), "{error}");
    assert!(error.contains("something broke"), "{error}");
    let log = error
        .split("The whole log is ")
        .nth(1)
        .unwrap()
        .split(". Fix")
        .next()
        .unwrap();
    assert!(Path::new(log).exists(), "{log}");
    orch.shutdown().await;
    orch.remove_environments(Some("demo")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devcontainer_with_a_dockerfile_is_built_with_its_env_and_commands() {
    let env = env_with(IMAGE, EnvironmentConfig::default());
    push_to_main(
        &env,
        &[
            (
                ".devcontainer/devcontainer.json",
                r#"{
                    // as editors write them: comments and trailing commas
                    "build": { "dockerfile": "Dockerfile", },
                    "containerEnv": { "GREETING": "hello from the devcontainer" },
                    "postCreateCommand": "echo post > /post-marker",
                }"#,
            ),
            (
                ".devcontainer/Dockerfile",
                &format!("FROM {IMAGE}\nRUN echo from-dockerfile > /dockerfile-marker\n"),
            ),
        ],
    );
    // Built ahead of any run from the command line, listed, and found ready by doctor.
    let config = crate::harness::write_cli_config(&env, &format!("[repos.demo]\nurl = {:?}\n", env.origin_url()));
    let out = crate::harness::cli(&config, &["env", "build", "demo"])
        .output()
        .unwrap();
    let built = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{built}{}", String::from_utf8_lossy(&out.stderr));
    assert!(built.starts_with("threadline-env/demo-"), "{built}");
    let out = crate::harness::cli(&config, &["env", "ls"]).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(listed.contains(built.split(' ').next().unwrap()), "{listed}");
    let out = crate::harness::cli(&config, &["doctor"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("repo demo: environment threadline-env/demo-"), "{said}");
    assert!(said.contains("is built"), "{said}");

    let orch = env.orchestrator().await;
    let run = env
        .start(
            &orch,
            "cat /dockerfile-marker /post-marker > m.txt; echo \"$GREETING\" >> m.txt",
        )
        .await;
    succeeded(&orch, &run.run.id).await;
    assert_eq!(
        env.origin_file(&run.pipeline.branch, "m.txt").unwrap(),
        "from-dockerfile\npost\nhello from the devcontainer\n"
    );
    let metrics = orch.metrics().render(&[]);
    assert!(
        !metrics.contains("threadline_environment_builds_total{"),
        "the run rebuilt: {metrics}"
    );
    orch.shutdown().await;
    orch.remove_environments(Some("demo")).await.unwrap();
}

/// A private network with a web server on it; removed on drop.
struct ServerNet {
    network: String,
    container: String,
    ip: String,
}

impl ServerNet {
    fn start() -> ServerNet {
        let tag = uuid_ish();
        let network = format!("tl-test-outside-{tag}");
        let container = format!("tl-test-server-{tag}");
        docker(&["network", "create", &network]);
        docker(&[
            "run",
            "-d",
            "--network",
            &network,
            "--name",
            &container,
            IMAGE,
            "sh",
            "-c",
            "mkdir -p /www && echo hello-from-server > /www/ok && httpd -f -p 80 -h /www",
        ]);
        let ip = docker(&[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
            &container,
        ])
        .trim()
        .to_owned();
        ServerNet { network, container, ip }
    }
}

impl Drop for ServerNet {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.container]).output();
        let _ = Command::new("docker").args(["network", "rm", &self.network]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowlisted_agent_reaches_listed_hosts_through_the_proxy_and_nothing_else() {
    let server = ServerNet::start();
    let mut env = TestEnv::new();
    env.add_demo_repo();
    let agent = env.agent_mut();
    agent.network = "allowlist".into();
    agent.allow = vec!["server.test".into()];
    env.config.egress.resolve = [("server.test".to_owned(), server.ip.clone())].into();
    let orch = env.orchestrator().await;
    let script = format!(
        r#"p=${{HTTP_PROXY#http://}}; h=${{p%:*}}; port=${{p##*:}}
printf 'GET http://server.test/ok HTTP/1.0\r\nHost: server.test\r\n\r\n' | nc -w 5 $h $port > listed.txt
printf 'GET http://unlisted.test/ HTTP/1.0\r\n\r\n' | nc -w 5 $h $port > unlisted.txt
printf 'CONNECT evil.test:443 HTTP/1.1\r\n\r\n' | nc -w 5 $h $port > connect.txt
printf 'GET /ok HTTP/1.0\r\n\r\n' | nc -w 3 {ip} 80 > direct.txt 2>&1; echo "direct=$?" >> direct.txt
nslookup example.com > dns.txt 2>&1; echo "dns=$?" >> dns.txt
"#,
        ip = server.ip
    );
    let started = env.start(&orch, &script).await;
    let run = succeeded(&orch, &started.run.id).await;
    let file = |name: &str| env.origin_file(&started.pipeline.branch, name).unwrap_or_default();
    assert!(
        file("listed.txt").contains("hello-from-server"),
        "{}",
        file("listed.txt")
    );
    assert!(
        file("unlisted.txt").starts_with("HTTP/1.1 403"),
        "{}",
        file("unlisted.txt")
    );
    assert!(
        file("connect.txt").starts_with("HTTP/1.1 403"),
        "{}",
        file("connect.txt")
    );
    assert!(
        !file("direct.txt").contains("hello-from-server"),
        "{}",
        file("direct.txt")
    );
    assert!(!file("direct.txt").contains("direct=0"), "{}", file("direct.txt"));
    assert!(
        !file("dns.txt").contains("dns=0"),
        "DNS is a way out: {}",
        file("dns.txt")
    );

    // The refusals are counted on the run, its card and /metrics.
    let blocked = run.progress.and_then(|p| p.blocked).expect("no refusals recorded");
    assert_eq!(blocked.count, 2);
    assert_eq!(
        blocked.describe().unwrap(),
        "blocked 2 requests to evil.test, unlisted.test"
    );
    let metrics = orch.metrics().render(&[]);
    assert!(metrics.contains("threadline_egress_blocked_total 2"), "{metrics}");
    let runs = orch.store().runs(&started.pipeline.id).await.unwrap();
    let run = runs.last().unwrap();
    let card = threadline::bots::render::card_in_context(
        &started.pipeline,
        run,
        &runs,
        threadline::bots::render::Detail::Metadata,
        &Default::default(),
        orch.redactor(),
    );
    assert_eq!(
        card.blocked.as_deref(),
        Some("blocked 2 requests to evil.test, unlisted.test"),
        "the card (chat and dashboard) says what was refused"
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cancelled_during_its_environment_build_ends_at_once() {
    let env = env_with(IMAGE, EnvironmentConfig::default());
    push_to_main(&env, &[(".threadline/setup.sh", "sleep 20\n")]);
    let orch = env.orchestrator().await;
    let started = env.start(&orch, "true").await;
    loop {
        let run = orch.store().run(&started.run.id).await.unwrap().unwrap();
        if run.progress.is_some_and(|p| p.environment_since.is_some()) {
            break;
        }
        assert!(!run.state.is_terminal(), "{:?}", run.error);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let asked = std::time::Instant::now();
    orch.cancel(&started.run.id).await.unwrap();
    let run = finished(orch.store(), &started.run.id).await;
    assert_eq!(run.state, RunState::Cancelled);
    assert!(asked.elapsed().as_secs() < 5, "the cancel waited for the build");
    // A base branch below branch_prefix (where agents push) is refused.
    let refused = orch
        .submit_pipeline(threadline::orchestrator::NewPipeline {
            repo: env.origin_url(),
            base_branch: Some("threadline/p-abc".into()),
            agent: None,
            prompt: "true".into(),
            requested_by: "tester".into(),
            origin: threadline::model::Origin::cli(),
            idempotency_key: None,
            mode: Default::default(),
            attachments: Vec::new(),
        })
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("where Threadline's agents push"),
        "{refused}"
    );
    orch.shutdown().await;
    orch.remove_environments(Some("demo")).await.unwrap();
}
