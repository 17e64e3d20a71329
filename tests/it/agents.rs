//! The built-in agent profiles with the real agent CLIs: Claude Code and aider, in the
//! images built from `docker/` by `tests/agent-images/build.sh` (`.ci/run` builds them),
//! run by Threadline against fake model APIs. Each container sits on a private Docker
//! network with no route out; its DNS server and its HTTP(S) proxy are recorders, so a
//! call to anything but the fake model API would show.

use std::net::SocketAddr;

use threadline::bots::render::{Detail, card_in_context};
use threadline::config::{AgentProfile, Config};
use threadline::model::{RunMode, RunState};
use threadline::orchestrator::{NewPipeline, Orchestrator, Submitted};

use crate::fake_models::{
    AIDER_IMAGE, CLAUDE_IMAGE, DnsLogger, FakeAnthropic, FakeOpenAi, RecordingProxy, Reply, Script, TestNetwork,
};
use crate::harness::{TestEnv, finished, follow_up};

/// The container's view of the outside: the fakes on `net`'s gateway, a DNS logger and
/// a recording proxy there too.
struct Outside {
    net: TestNetwork,
    dns: DnsLogger,
    proxy: RecordingProxy,
}

impl Outside {
    async fn new() -> Outside {
        let net = TestNetwork::create();
        let dns = DnsLogger::start_on(SocketAddr::new(net.gateway, 53))
            .await
            .expect("a DNS logger on the test network's port 53 (the tests run as root)");
        let proxy = RecordingProxy::start_on(net.gateway).await;
        Outside { net, dns, proxy }
    }

    /// The shipped profile `name`, on the test's image and network, with `vars` set.
    fn profile(&self, name: &str, image: &str, vars: &[(&str, String)]) -> AgentProfile {
        assert!(
            image_exists(image),
            "the agent image {image} is missing: run `bash tests/agent-images/build.sh` (CI does)"
        );
        let mut profile = Config::default().agents[name].clone();
        profile.image = image.into();
        profile.network = self.net.name.clone();
        profile.dns = vec![self.net.gateway.to_string()];
        profile.timeout_secs = 300;
        // The API key is fixed here: a test cannot safely set its own process's
        // environment, where the shipped profile reads it from.
        profile.env.clear();
        for (k, v) in vars {
            profile.env_set.insert(k.to_string(), v.clone());
        }
        for var in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
            profile.env_set.insert(var.into(), self.proxy.url.clone());
        }
        for var in ["NO_PROXY", "no_proxy"] {
            profile.env_set.insert(var.into(), self.net.gateway.to_string());
        }
        profile
    }

    fn assert_nothing_else_was_called(&self) {
        assert_eq!(self.dns.names(), Vec::<String>::new(), "names the agent looked up");
        assert_eq!(
            self.proxy.targets(),
            Vec::<String>::new(),
            "what it sent through the proxy"
        );
    }
}

fn image_exists(image: &str) -> bool {
    std::process::Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn start(env: &TestEnv, orch: &Orchestrator, agent: &str, prompt: &str) -> Submitted {
    orch.submit_pipeline(NewPipeline {
        repo: env.origin_url(),
        base_branch: None,
        agent: Some(agent.into()),
        prompt: prompt.into(),
        requested_by: "tester".into(),
        origin: threadline::model::Origin::cli(),
        idempotency_key: None,
        mode: RunMode::Change,
        attachments: Vec::new(),
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_commits_answers_resumes_and_calls_only_its_model() {
    let outside = Outside::new().await;
    let fake = FakeAnthropic::start_on(outside.net.gateway, Script::claude_writes_hello()).await;
    let mut env = TestEnv::new();
    let profile = outside.profile(
        "claude",
        CLAUDE_IMAGE,
        &[
            ("ANTHROPIC_BASE_URL", fake.base_url.clone()),
            ("ANTHROPIC_API_KEY", "sk-ant-fake-key".into()),
        ],
    );
    env.config.agents.insert("claude".into(), profile);
    let orch = env.orchestrator().await;

    let first = start(&env, &orch, "claude", "Create hello.txt saying hello.").await;
    let run = finished(orch.store(), &first.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}\n{}", run.error, run.log_tail);
    let branch = &first.pipeline.branch;
    assert_eq!(
        env.origin_file(branch, "hello.txt").as_deref(),
        Some("hello from the fake model\n"),
        "the prompt produced a commit"
    );
    assert_eq!(run.summary.as_deref(), Some("Done: I created hello.txt."));
    assert!(run.usage.tokens_in.is_some_and(|n| n > 0) && run.usage.tokens_out.is_some_and(|n| n > 0));
    assert!(run.usage.cost_usd.is_some_and(|c| c > 0.0), "{:?}", run.usage);
    assert!(
        run.log_tail.contains("[Write] /workspace/hello.txt"),
        "{}",
        run.log_tail
    );
    // The final answer reaches the card where the channel shows more than metadata.
    let runs = orch.store().runs(&first.pipeline.id).await.unwrap();
    let card = card_in_context(
        &first.pipeline,
        &run,
        &runs,
        Detail::Summary,
        &Default::default(),
        orch.redactor(),
    );
    assert_eq!(card.summary.as_deref(), Some("Done: I created hello.txt."));
    assert!(card.usage.is_some(), "{card:?}");
    // Claude Code wrote its own state in HOME: the pipeline's agent state folder.
    let state = env
        .config
        .data_dir
        .join("agent-state")
        .join(&first.pipeline.id)
        .join("claude");
    assert!(
        state.join(".claude.json").exists(),
        "{:?}",
        std::fs::read_dir(&state).map(|d| d.count())
    );

    // A follow-up continues the conversation: the model's first request carries run 1.
    fake.clear();
    let second = orch
        .submit_follow_up(follow_up(&first.pipeline.id, "Now add a test for it."))
        .await
        .unwrap();
    let run2 = finished(orch.store(), &second.run.id).await;
    assert_eq!(run2.state, RunState::Succeeded, "{:?}\n{}", run2.error, run2.log_tail);
    assert!(run2.resumed, "the session was resumed");
    let request = fake.messages()[0].clone();
    let turns = request.body["messages"].as_array().map_or(0, Vec::len);
    assert!(turns > 1, "the conversation goes on, not a fresh one: {turns} messages");
    let text = request.text();
    for earlier in [
        "Create hello.txt saying hello.",
        "Done: I created hello.txt.",
        "Now add a test for it.",
    ] {
        assert!(text.contains(earlier), "{earlier:?} is not in the follow-up's request");
    }
    // Claude Code reports a resumed session's cost since its start: a run's is its own.
    let (cost1, cost2) = (run.usage.cost_usd.unwrap(), run2.usage.cost_usd.unwrap());
    assert!(
        (run2.session_cost_usd.unwrap() - (cost1 + cost2)).abs() < 1e-6,
        "{cost1} + {cost2} vs {:?}",
        run2.session_cost_usd
    );
    outside.assert_nothing_else_was_called();
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aider_commits_answers_remembers_and_calls_only_its_model() {
    let outside = Outside::new().await;
    // gpt-4o is in the image's model metadata (so aider downloads no price list) and
    // edits with SEARCH/REPLACE blocks; an empty SEARCH makes a new file.
    let reply = "Done: I created hello.txt.\n\nhello.txt\n```\n<<<<<<< SEARCH\n=======\nhello from the fake model\n>>>>>>> REPLACE\n```\n";
    let fake = FakeOpenAi::start_on(outside.net.gateway, Script(vec![Reply::Text(reply.into())])).await;
    let mut env = TestEnv::new();
    let profile = outside.profile(
        "aider",
        AIDER_IMAGE,
        &[
            ("OPENAI_API_BASE", fake.api_base.clone()),
            ("OPENAI_API_KEY", "sk-fake-key".into()),
            ("AIDER_MODEL", "gpt-4o".into()),
        ],
    );
    env.config.agents.insert("aider".into(), profile);
    let orch = env.orchestrator().await;

    let first = start(&env, &orch, "aider", "Create hello.txt saying hello.").await;
    let run = finished(orch.store(), &first.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}\n{}", run.error, run.log_tail);
    let branch = &first.pipeline.branch;
    assert_eq!(
        env.origin_file(branch, "hello.txt").as_deref(),
        Some("hello from the fake model\n"),
        "the prompt produced a commit"
    );
    let answer = run.summary.clone().unwrap_or_default();
    assert!(answer.contains("Done: I created hello.txt."), "{answer}");
    assert!(
        run.usage.tokens_in.is_some_and(|n| n > 0),
        "{:?}\n{}",
        run.usage,
        run.log_tail
    );
    // aider's bookkeeping stays out of the branch, and .gitignore is untouched.
    let files = crate::harness::git(&env.origin, &["ls-tree", "-r", "--name-only", branch]);
    assert!(!files.contains(".aider"), "{files}");
    assert_eq!(
        env.origin_file(branch, ".gitignore"),
        env.origin_file("main", ".gitignore")
    );
    // It wrote its own state (chat history) in HOME.
    let state = env
        .config
        .data_dir
        .join("agent-state")
        .join(&first.pipeline.id)
        .join("aider");
    assert!(state.join("aider.chat.history.md").exists());

    // The follow-up's request carries run 1: its restored chat and the history file.
    let second = orch
        .submit_follow_up(follow_up(&first.pipeline.id, "Now add a test for it."))
        .await
        .unwrap();
    let run2 = finished(orch.store(), &second.run.id).await;
    assert_eq!(run2.state, RunState::Succeeded, "{:?}\n{}", run2.error, run2.log_tail);
    assert!(run2.resumed);
    let text = fake.completions().last().unwrap().text();
    for earlier in [
        "Create hello.txt saying hello.",
        "Done: I created hello.txt.",
        "Now add a test for it.",
    ] {
        assert!(text.contains(earlier), "{earlier:?} is not in the follow-up's request");
    }
    outside.assert_nothing_else_was_called();
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_reaches_its_model_through_the_shipped_egress_allowlist() {
    // The shipped profile as it is (network = "allowlist", allow = ["api.anthropic.com"]);
    // api.anthropic.com is pinned to the fake model on loopback, reached only through
    // Threadline's egress proxy.
    assert!(image_exists(CLAUDE_IMAGE), "run `bash tests/agent-images/build.sh`");
    let fake = FakeAnthropic::start(Script::claude_writes_hello()).await;
    let port = fake.base_url.rsplit(':').next().unwrap().to_owned();
    let mut env = TestEnv::new();
    let mut profile = Config::default().agents["claude"].clone();
    assert_eq!(
        (profile.network.as_str(), profile.allow.clone()),
        ("allowlist", vec!["api.anthropic.com".to_owned()])
    );
    profile.image = CLAUDE_IMAGE.into();
    profile.timeout_secs = 300;
    profile.env.clear();
    profile
        .env_set
        .insert("ANTHROPIC_BASE_URL".into(), format!("http://api.anthropic.com:{port}"));
    profile
        .env_set
        .insert("ANTHROPIC_API_KEY".into(), "sk-ant-fake-key".into());
    env.config.agents.insert("claude".into(), profile);
    env.config.egress.resolve = [("api.anthropic.com".to_owned(), "127.0.0.1".to_owned())].into();
    let orch = env.orchestrator().await;
    let first = start(&env, &orch, "claude", "Create hello.txt saying hello.").await;
    let run = finished(orch.store(), &first.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}\n{}", run.error, run.log_tail);
    assert_eq!(
        env.origin_file(&first.pipeline.branch, "hello.txt").as_deref(),
        Some("hello from the fake model\n")
    );
    assert!(!fake.messages().is_empty());
    assert_eq!(
        run.progress.and_then(|p| p.blocked),
        None,
        "Claude Code tried hosts besides its model"
    );
    orch.shutdown().await;
}
