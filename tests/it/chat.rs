//! The chat logic every platform shares, against a real orchestrator: what a mention, a
//! thread message or a click leads to, and the status message kept up to date.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use threadline::bots::chat::{ChannelBinding, ChatCore, Click, Message, Outcome, StatusUpdater, ThreadRef};
use threadline::bots::render::Action;
use threadline::model::RunState;
use threadline::orchestrator::{Orchestrator, Submitted};

use threadline::bots::chat::testing::{CallKind, RecordingSurface, SurfaceCall};

use crate::harness::{TestEnv, finished, one_channel, poll_until, wait_for};

use crate::harness::sender as user;

fn mention(channel: &str, id: &str, who: &str, text: &str) -> Message {
    Message {
        channel: channel.into(),
        thread: None,
        id: id.into(),
        sender: user(who),
        text: format!("<@UBOT> {text}"),
        mentions_bot: true,
        attachments: Vec::new(),
        link: Some(format!("https://chat.example/{channel}/{id}")),
    }
}

fn reply(channel: &str, thread: &str, id: &str, who: &str, text: &str) -> Message {
    Message {
        channel: channel.into(),
        thread: Some(thread.into()),
        id: id.into(),
        sender: user(who),
        text: text.into(),
        mentions_bot: false,
        attachments: Vec::new(),
        link: None,
    }
}

fn env_with_repo() -> TestEnv {
    let mut env = TestEnv::new();
    env.add_demo_repo();
    env
}

fn bindings() -> BTreeMap<String, ChannelBinding> {
    one_channel("C1", "demo", &["U1", "U2"], &["U1"])
}

/// A chat core on Slack's channel C1 (prompters U1 and U2, approver U1) over "demo".
async fn slack_core() -> (TestEnv, Orchestrator, ChatCore) {
    let env = env_with_repo();
    let orch = env.orchestrator().await;
    let core = ChatCore::new(orch.clone(), "slack", bindings());
    (env, orch, core)
}

/// A pipeline started by U2's mention in C1 at `ts`.
async fn mentioned(core: &ChatCore, ts: &str, prompt: &str) -> Submitted {
    match core.on_message(mention("C1", ts, "U2", prompt)).await {
        Outcome::Queued { submitted, .. } => *submitted,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_start_nothing_say_why() {
    let (_env, orch, core) = slack_core().await;
    // Unbound channel: how to bind it.
    match core.on_message(mention("C9", "1.0", "U1", "do it")).await {
        Outcome::Reply { text, .. } => assert!(text.contains("[slack.channels.C9]") && text.contains("demo"), "{text}"),
        other => panic!("{other:?}"),
    }
    // Bots never start runs.
    let mut bot = mention("C1", "1.1", "B1", "echo x");
    bot.sender.is_bot = true;
    assert!(matches!(core.on_message(bot).await, Outcome::Ignored));
    // Someone not allowed: a private refusal.
    assert!(matches!(
        core.on_message(mention("C1", "1.2", "U7", "echo x")).await,
        Outcome::Private { .. }
    ));
    // Unknown names get the valid ones.
    match core.on_message(mention("C1", "1.3", "U1", "repo=nope echo x")).await {
        Outcome::Reply { text, .. } => assert!(text.contains("nope") && text.contains("demo"), "{text}"),
        other => panic!("{other:?}"),
    }
    match core.on_message(mention("C1", "1.4", "U1", "agent=nope echo x")).await {
        Outcome::Reply { text, .. } => assert!(text.contains("nope") && text.contains("sh"), "{text}"),
        other => panic!("{other:?}"),
    }
    match core.on_message(mention("C1", "1.5", "U1", "")).await {
        Outcome::Reply { text, .. } => assert!(text.contains("empty"), "{text}"),
        other => panic!("{other:?}"),
    }
    assert!(orch.store().pipelines(10).await.unwrap().is_empty(), "nothing started");
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_starts_a_pipeline_in_its_thread_once() {
    let (_env, orch, core) = slack_core().await;
    // A mention starts a pipeline in that message's thread; a redelivery starts nothing.
    let first = match core.on_message(mention("C1", "2.0", "U2", "echo one > one.txt")).await {
        Outcome::Queued {
            thread,
            submitted,
            text,
        } => {
            assert_eq!(
                thread,
                ThreadRef {
                    channel: "C1".into(),
                    thread: "2.0".into()
                }
            );
            assert!(submitted.created && text.contains(&submitted.pipeline.branch), "{text}");
            assert_eq!(
                submitted.pipeline.origin.url, "https://chat.example/C1/2.0",
                "the thread's link is kept"
            );
            submitted
        }
        other => panic!("{other:?}"),
    };
    match core.on_message(mention("C1", "2.0", "U2", "echo one > one.txt")).await {
        Outcome::Queued { submitted, .. } => assert!(!submitted.created && submitted.run.id == first.run.id),
        other => panic!("{other:?}"),
    }
    assert_eq!(orch.store().runs(&first.pipeline.id).await.unwrap().len(), 1);
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_replies_from_prompters_follow_up_and_others_are_not_heard() {
    let (_env, orch, core) = slack_core().await;
    mentioned(&core, "2.0", "echo one > one.txt").await;
    // A follow-up from someone allowed, no mention needed.
    match core
        .on_message(reply("C1", "2.0", "2.1", "U2", "echo two > two.txt"))
        .await
    {
        Outcome::Queued { submitted, text, .. } => assert_eq!(submitted.run.seq, 2, "{text}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        core.on_message(reply("C1", "2.0", "2.2", "U7", "chatter")).await,
        Outcome::Ignored
    ));
    let mut loud = reply("C1", "2.0", "2.3", "U7", "<@UBOT> do it");
    loud.mentions_bot = true;
    assert!(matches!(core.on_message(loud).await, Outcome::Private { .. }));
    match core.on_message(reply("C1", "2.0", "2.4", "U1", "repo=other x")).await {
        Outcome::Reply { text, .. } => assert!(text.contains("stays on its repository"), "{text}"),
        other => panic!("{other:?}"),
    }
    let mut lost = reply("C1", "9.9", "9.10", "U1", "<@UBOT> hello?");
    lost.mentions_bot = true;
    match core.on_message(lost).await {
        Outcome::Reply { text, .. } => assert!(text.contains("no pipeline"), "{text}"),
        other => panic!("{other:?}"),
    }
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_obey_approvers_and_a_redelivered_retry_counts_once() {
    let (_env, orch, core) = slack_core().await;
    let long = mentioned(&core, "3.0", "sleep 30").await;
    // A prompter who is not an approver is refused; an approver cancels.
    wait_for(orch.store(), &long.run.id, "running", |r| r.state == RunState::Running).await;
    let click = |who: &str| Click {
        id: format!("click-{who}"),
        action: Action::Cancel,
        run_id: long.run.id.clone(),
        sender: user(who),
    };
    match core.on_click(click("U2")).await {
        Outcome::Private { text } => assert!(
            text.contains("not allowed") && text.contains("nothing was changed"),
            "{text}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        orch.store().run(&long.run.id).await.unwrap().unwrap().state,
        RunState::Running
    );
    assert!(matches!(core.on_click(click("U1")).await, Outcome::Done));
    assert_eq!(finished(orch.store(), &long.run.id).await.state, RunState::Cancelled);
    // Retry, twice with the same click id: one new run.
    let retry = Click {
        id: "retry-1".into(),
        action: Action::Retry,
        run_id: long.run.id.clone(),
        sender: user("U1"),
    };
    let (a, b) = (core.on_click(retry.clone()).await, core.on_click(retry).await);
    match (a, b) {
        (Outcome::Queued { submitted: a, .. }, Outcome::Queued { submitted: b, .. }) => {
            assert_eq!(a.run.id, b.run.id);
            assert!(a.created && !b.created);
            orch.cancel(&a.run.id).await.unwrap();
        }
        other => panic!("{other:?}"),
    }
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_message_follows_the_run_to_its_branch_link() {
    let env = env_with_repo();
    let orch = env.orchestrator().await;
    let core = ChatCore::new(orch.clone(), "slack", bindings());
    let surface = Arc::new(RecordingSurface::new("slack"));
    surface.rate_limit_next_update(Duration::from_millis(300));
    let stop = tokio_util::sync::CancellationToken::new();
    let updater = tokio::spawn(StatusUpdater::new(core.clone(), surface.clone()).run(stop.clone()));

    let sub = match core.on_message(mention("C1", "5.0", "U1", "echo hi > hi.txt")).await {
        Outcome::Queued { submitted, .. } => submitted,
        other => panic!("{other:?}"),
    };
    finished(orch.store(), &sub.run.id).await;
    poll_until(
        "the final state in the chat",
        || surface.last_shown().is_some_and(|c| c.terminal),
        || format!("{:?}", surface.calls()),
    )
    .await;
    let calls = surface.calls();
    assert_eq!(
        calls.iter().filter(|c| c.kind == CallKind::Post).count(),
        1,
        "one status message: {calls:?}"
    );
    assert!(calls.iter().any(|c| c.kind == CallKind::RateLimited), "{calls:?}");
    let SurfaceCall { kind, card: last, .. } = calls.last().unwrap();
    assert_eq!(kind, &CallKind::Update(format!("msg-{}", sub.run.id)));
    assert_eq!(last.state, RunState::Succeeded);
    assert_eq!(
        last.branch_url.as_deref(),
        Some(format!("https://forge.example/demo/tree/{}", sub.pipeline.branch).as_str())
    );
    assert!(last.diffstat.as_deref().unwrap().contains("1 file changed"));
    assert!(
        last.log_lines.is_empty() && last.summary.is_none(),
        "metadata only by default"
    );
    let stored = orch.store().chat_message(&sub.run.id).await.unwrap();
    assert_eq!(stored, Some(("C1".to_owned(), format!("msg-{}", sub.run.id))));
    stop.cancel();
    updater.await.unwrap();
    orch.shutdown().await;
}
