//! The thread as a conversation (#17), with the tests' busybox agent standing in for a
//! real one: what a follow-up is told, the thread's discussion as context, structured
//! events (progress, answer, tokens, cost, budget), ask mode, the agent's own state
//! across runs, and its bookkeeping kept out of commits.

use std::time::Duration;

use threadline::bots::chat::{ChatCore, Message, Outcome};
use threadline::config::{EventFormat, FollowUps};
use threadline::model::{EndReason, RunMode, RunState, StepKind};
use threadline::orchestrator::FollowUp;

use crate::harness::{TestEnv, finished, follow_up, git, one_channel, sender};

/// A Claude Code stream-json transcript the busybox agent prints: a tool call, then the
/// result with its answer, tokens and cost.
const CLAUDE_EVENTS: &str = r#"echo hi > hi.txt
cat <<'EOF'
{"type":"system","subtype":"init","session_id":"s1","model":"claude"}
{"type":"assistant","message":{"id":"m1","content":[{"type":"tool_use","id":"t1","name":"Write","input":{"file_path":"/workspace/hi.txt","content":"hi"}}],"usage":{"input_tokens":1200,"output_tokens":80}}}
{"type":"result","subtype":"success","is_error":false,"result":"Done: I wrote hi.txt.\nNothing else needs a decision.","usage":{"input_tokens":2400,"output_tokens":160},"total_cost_usd":0.0421,"session_id":"s1"}
EOF
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_events_give_the_answer_tokens_and_cost() {
    let mut env = TestEnv::new();
    env.agent_mut().events = EventFormat::Claude;
    let orch = env.orchestrator().await;
    let sub = env.start(&orch, CLAUDE_EVENTS).await;
    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    assert_eq!(
        run.summary.as_deref(),
        Some("Done: I wrote hi.txt.\nNothing else needs a decision."),
        "the agent's own answer, not its raw output"
    );
    assert_eq!((run.usage.tokens_in, run.usage.tokens_out), (Some(2400), Some(160)));
    assert_eq!(run.usage.cost_usd, Some(0.0421));
    let progress = run.progress.expect("progress was stored");
    assert_eq!((progress.tool_calls, progress.files_touched), (1, 1));
    assert_eq!(progress.step, Some(StepKind::Editing));
    assert!(
        !run.log_tail.contains("\"type\""),
        "the tail shows events as lines for people: {}",
        run.log_tail
    );
    assert!(run.log_tail.contains("[Write] /workspace/hi.txt"), "{}", run.log_tail);
    let metrics = orch.metrics().render(&[]);
    assert!(
        metrics.contains("threadline_agent_tokens_total{direction=\"in\"} 2400"),
        "{metrics}"
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_over_its_budget_is_stopped_and_its_work_saved() {
    let mut env = TestEnv::new();
    let agent = env.agent_mut();
    agent.events = EventFormat::Aider;
    agent.max_cost_usd = 0.10;
    let orch = env.orchestrator().await;
    let script = "echo partial > partial.txt\n\
                  echo 'Tokens: 10k sent, 1k received. Cost: $0.05 message, $0.05 session.'\n\
                  echo 'Tokens: 20k sent, 2k received. Cost: $0.08 message, $0.13 session.'\n\
                  sleep 60\n";
    let sub = env.start(&orch, script).await;
    let started = std::time::Instant::now();
    let run = finished(orch.store(), &sub.run.id).await;
    assert!(started.elapsed() < Duration::from_secs(30), "stopped, not timed out");
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(run.end_reason, Some(EndReason::OverBudget));
    assert!(
        run.error.as_deref().unwrap().contains("budget of $0.10"),
        "{:?}",
        run.error
    );
    assert_eq!(run.usage.cost_usd, Some(0.13));
    assert_eq!(
        env.origin_file(&sub.pipeline.branch, "partial.txt").as_deref(),
        Some("partial\n"),
        "the work so far is saved and pushed"
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_reads_the_workspace_commits_nothing_and_answers() {
    let mut env = TestEnv::new();
    env.add_demo_repo();
    let orch = env.orchestrator().await;
    let first = env.start(&orch, "echo v1 > app.txt").await;
    finished(orch.store(), &first.run.id).await;
    let head = git(&env.origin, &["rev-parse", &first.pipeline.branch]);

    let ask = FollowUp {
        mode: RunMode::Ask,
        ..follow_up(
            &first.pipeline.id,
            "cat app.txt\necho changed > app.txt || echo 'read-only, as it should be'",
        )
    };
    let sub = orch.submit_follow_up(ask).await.unwrap();
    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    assert_eq!(run.mode, RunMode::Ask);
    assert!(!run.changed && !run.pushed && run.head_commit.is_none(), "{run:?}");
    let answer = run.summary.as_deref().unwrap_or_default();
    assert!(
        answer.contains("v1") && answer.contains("read-only, as it should be"),
        "its last lines are its answer: {answer}"
    );
    assert_eq!(
        git(&env.origin, &["rev-parse", &first.pipeline.branch]),
        head,
        "nothing pushed"
    );

    // The card says it answered; at metadata level the answer stays here.
    let card = threadline::bots::render::card_in_context(
        &sub.pipeline,
        &run,
        std::slice::from_ref(&run),
        threadline::bots::render::Detail::Metadata,
        &Default::default(),
        orch.redactor(),
    );
    assert_eq!(card.headline, "answered");
    assert!(card.summary.is_none());
    assert!(
        card.note.as_deref().unwrap().contains("stays on this machine"),
        "{card:?}"
    );

    // A change after the ask continues from the branch as the first run left it.
    let next = orch
        .submit_follow_up(follow_up(&first.pipeline.id, "cat app.txt > seen.txt"))
        .await
        .unwrap();
    assert_eq!(finished(orch.store(), &next.run.id).await.state, RunState::Succeeded);
    assert_eq!(
        env.origin_file(&first.pipeline.branch, "seen.txt").as_deref(),
        Some("v1\n")
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_is_told_what_came_before_and_what_the_thread_said() {
    let mut env = TestEnv::new();
    env.add_demo_repo();
    env.config.slack.channels = one_channel("C1", "demo", &["U1"], &["U1"]);
    env.config.slack.channels.get_mut("C1").unwrap().follow_ups = FollowUps::Mentions;
    // Where Slack keeps the file someone attaches in the discussion.
    let slack = crate::fake_slack::FakeSlack::start().await;
    env.config.slack.api_url = slack.api_url.clone();
    env.config.slack.bot_token = threadline::config::Secret::new("xoxb-test-token");
    let orch = env.orchestrator().await;
    let core = ChatCore::new(orch.clone(), "slack", env.config.slack.channels.clone());

    let first = match core
        .on_message(message(
            "1.0",
            None,
            "U1",
            "echo 'I made one.txt' && echo 1 > one.txt",
            true,
        ))
        .await
    {
        Outcome::Queued { submitted, .. } => submitted,
        other => panic!("{other:?}"),
    };
    finished(orch.store(), &first.run.id).await;
    // Discussion in the thread: not a follow-up in `mentions` mode, but context.
    for (id, who, text) in [
        ("1.1", "U2", "please also handle the empty case"),
        ("1.2", "U1", "agreed, and keep it small {prompt}"),
    ] {
        let mut said = message(id, Some("1.0"), who, text, false);
        if id == "1.1" {
            said.attachments = vec![threadline::model::Attachment {
                name: "design.md".into(),
                source: threadline::model::AttachmentSource::Url {
                    url: slack.file_url("design.md"),
                    auth: "slack".into(),
                },
            }];
        }
        assert!(matches!(core.on_message(said).await, Outcome::Ignored));
    }
    let second = match core
        .on_message(message(
            "1.3",
            Some("1.0"),
            "U1",
            "cp /threadline/request.md request.md && cp /threadline/thread.md thread.md \
             && cp /threadline/attachments/thread-design.md design.md",
            true,
        ))
        .await
    {
        Outcome::Queued { submitted, .. } => submitted,
        other => panic!("{other:?}"),
    };
    assert_eq!(second.run.seq, 2);
    assert_eq!(finished(orch.store(), &second.run.id).await.state, RunState::Succeeded);
    let branch = &first.pipeline.branch;
    let request = env.origin_file(branch, "request.md").unwrap();
    assert!(
        request.starts_with("cp /threadline/request.md"),
        "the message comes first: {request}"
    );
    assert!(request.contains("Run 1 (succeeded"), "{request}");
    assert!(
        request.contains("It answered: I made one.txt"),
        "the earlier answer: {request}"
    );
    assert!(
        request.contains("U2 said: please also handle the empty case"),
        "{request}"
    );
    assert!(
        request.contains("keep it small {prompt}"),
        "what people wrote is never taken for a placeholder: {request}"
    );
    assert!(request.contains("untrusted"), "{request}");
    let thread = env.origin_file(branch, "thread.md").unwrap();
    assert!(
        thread.contains("## U2 at ") && thread.contains("not instructions"),
        "{thread}"
    );
    assert_eq!(
        env.origin_file(branch, "design.md").as_deref(),
        Some("file design.md from slack\n"),
        "a file attached in the discussion comes along"
    );
    assert!(request.contains("- thread-design.md"), "{request}");

    // The next run is told only what was said since the last one.
    let third = orch
        .submit_follow_up(follow_up(&first.pipeline.id, "cp /threadline/thread.md thread.md"))
        .await
        .unwrap();
    finished(orch.store(), &third.run.id).await;
    let thread = env.origin_file(branch, "thread.md").unwrap();
    assert!(!thread.contains("empty case"), "{thread}");
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_keeps_its_state_and_resumes_and_its_bookkeeping_is_not_committed() {
    let mut env = TestEnv::new();
    let agent = env.agent_mut();
    agent.state_dir = "/home/agent".into();
    agent.resume_argv = vec![
        "sh".into(),
        "-c".into(),
        "echo resumed > resumed.txt; sh /threadline/prompt.md".into(),
    ];
    agent.exclude = vec![".aider*".into()];
    let orch = env.orchestrator().await;
    let first = env
        .start(
            &orch,
            "echo \"$HOME\" > home.txt\necho remembered > \"$HOME/session\"\necho log > .aider.chat.history.md",
        )
        .await;
    assert_eq!(finished(orch.store(), &first.run.id).await.state, RunState::Succeeded);
    let branch = &first.pipeline.branch;
    assert_eq!(env.origin_file(branch, "home.txt").as_deref(), Some("/home/agent\n"));
    assert_eq!(
        env.origin_file(branch, ".aider.chat.history.md"),
        None,
        "the agent's bookkeeping is never committed"
    );
    assert_eq!(
        env.origin_file(branch, ".gitignore"),
        env.origin_file("main", ".gitignore"),
        "and .gitignore is untouched"
    );

    let second = orch
        .submit_follow_up(follow_up(&first.pipeline.id, "cat \"$HOME/session\" > session.txt"))
        .await
        .unwrap();
    assert_eq!(finished(orch.store(), &second.run.id).await.state, RunState::Succeeded);
    assert_eq!(env.origin_file(branch, "session.txt").as_deref(), Some("remembered\n"));
    assert_eq!(
        env.origin_file(branch, "resumed.txt").as_deref(),
        Some("resumed\n"),
        "the follow-up resumed the agent's session"
    );
    orch.shutdown().await;
}

fn message(id: &str, thread: Option<&str>, who: &str, text: &str, mentions_bot: bool) -> Message {
    Message {
        channel: "C1".into(),
        thread: thread.map(str::to_owned),
        id: id.into(),
        sender: sender(who),
        text: if mentions_bot {
            format!("<@UBOT> {text}")
        } else {
            text.into()
        },
        mentions_bot,
        link: None,
        attachments: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_composed_prompt_stays_within_max_prompt_bytes() {
    let mut env = TestEnv::new();
    env.config.max_prompt_bytes = 1500;
    let orch = env.orchestrator().await;
    // Earlier runs whose prompts and answers would fill far more than the limit.
    let long = format!("# {}\necho '{}'", "x".repeat(600), "an answer line ".repeat(40));
    let first = env.start(&orch, &long).await;
    finished(orch.store(), &first.run.id).await;
    for _ in 0..2 {
        let more = orch
            .submit_follow_up(follow_up(&first.pipeline.id, &long))
            .await
            .unwrap();
        finished(orch.store(), &more.run.id).await;
    }
    let last = orch
        .submit_follow_up(follow_up(&first.pipeline.id, "cp /threadline/request.md request.md"))
        .await
        .unwrap();
    assert_eq!(finished(orch.store(), &last.run.id).await.state, RunState::Succeeded);
    let request = env.origin_file(&first.pipeline.branch, "request.md").unwrap();
    assert!(request.len() <= 1500, "{} bytes:\n{request}", request.len());
    assert!(request.starts_with("cp /threadline/request.md"), "the message is whole");
    assert!(
        request.contains("earlier lines left out"),
        "the oldest history gave way: {request}"
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_state_past_its_limit_is_removed_and_the_next_run_starts_fresh() {
    let mut env = TestEnv::new();
    let agent = env.agent_mut();
    agent.state_dir = "/home/agent".into();
    agent.max_state_mb = 1;
    agent.resume_argv = vec!["sh".into(), "-c".into(), "echo resumed > resumed.txt".into()];
    let orch = env.orchestrator().await;
    let first = env
        .start(
            &orch,
            "dd if=/dev/zero of=\"$HOME/big\" bs=1024 count=2048 2>/dev/null; echo done",
        )
        .await;
    let run = finished(orch.store(), &first.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let events = orch.store().events(&run.id).await.unwrap();
    let last = &events.last().unwrap().detail;
    assert!(last.contains("state passed 1 MB and was removed"), "{last}");
    assert!(
        !env.config
            .data_dir
            .join("agent-state")
            .join(&first.pipeline.id)
            .exists()
    );
    let next = orch
        .submit_follow_up(follow_up(&first.pipeline.id, "echo fresh > fresh.txt"))
        .await
        .unwrap();
    let next = finished(orch.store(), &next.run.id).await;
    assert!(!next.resumed, "nothing left to resume");
    assert_eq!(
        env.origin_file(&first.pipeline.branch, "fresh.txt").as_deref(),
        Some("fresh\n")
    );
    orch.shutdown().await;
}
