//! Discord stories against the wire-level fake, with the real serenity gateway client:
//! mention → thread → status message ending with the branch link.

use serde_json::{Value, json};
use threadline::config::Secret;
use threadline::model::RunState;

use crate::fake_discord::{FakeDiscord, click, message, message_with_files};
use std::time::Duration;

use crate::harness::{Daemon, TestEnv, appears, finished, holds_for, one_channel, wait_for};

pub const CHANNEL: &str = "2000";
pub const THREAD: &str = "3001";

/// The embeds posted to or edited in the thread for run `seq`.
fn status_embeds(fake: &FakeDiscord, seq: i64) -> Vec<Value> {
    let title = format!("Run {seq}: ");
    fake.calls("POST", &format!("/channels/{THREAD}/messages"))
        .into_iter()
        .chain(fake.calls("PATCH", &format!("/channels/{THREAD}/messages/")))
        .filter_map(|(_, b)| b["embeds"].get(0).cloned())
        .filter(|e| e["title"].as_str().is_some_and(|t| t.starts_with(&title)))
        .collect()
}

/// The daemon with Discord against `fake`, identified on the gateway.
pub async fn start_gateway(fake: &FakeDiscord, env: &TestEnv) -> Daemon {
    let daemon = env.daemon().await;
    // READY is on its way; dispatches sent from now on follow it on the socket.
    fake.wait_until("an Identify", |f| f.recorded.lock().unwrap().identifies >= 1)
        .await;
    daemon
}

/// A test environment with Discord on `fake`, CHANNEL bound to "demo".
fn discord_env(fake: &FakeDiscord, prompters: &[&str], approvers: &[&str]) -> TestEnv {
    let mut env = TestEnv::new();
    env.add_demo_repo();
    env.config.discord.enabled = true;
    env.config.discord.token = Secret::new("bot-token-123");
    env.config.discord.api_url = fake.base.clone();
    env.config.discord.channels = one_channel(CHANNEL, "demo", prompters, approvers);
    env
}

/// The daemon with Discord against a fake: channel CHANNEL (prompters 101, 102 and role
/// 501; approver 101), and 102's mention `echo hi > hi.txt` (message THREAD) run to its
/// end. The first status edit is answered 429 when `rate_limited`.
async fn discord_thread(rate_limited: bool) -> (FakeDiscord, TestEnv, Daemon, threadline::model::Pipeline) {
    let fake = FakeDiscord::start().await;
    let env = discord_env(&fake, &["101", "102", "501"], &["101"]);
    fake.recorded.lock().unwrap().rate_limit_edits = u32::from(rate_limited);
    let daemon = start_gateway(&fake, &env).await;
    fake.dispatch(
        "MESSAGE_CREATE",
        message(THREAD, CHANNEL, "102", &[], "<@900> echo hi > hi.txt", true),
    );
    let pipeline = crate::harness::first_pipeline(daemon.orch.store()).await;
    assert_eq!(
        finished(daemon.orch.store(), &format!("{}-1", pipeline.id)).await.state,
        RunState::Succeeded
    );
    (fake, env, daemon, pipeline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_opens_a_thread_whose_status_ends_on_its_branch() {
    let (fake, env, daemon, _) = discord_thread(true).await;
    let orch = daemon.orch.clone();
    // A mention opens a thread on the message and answers in it.
    fake.wait_until("the thread", |f| {
        !f.calls("POST", &format!("/messages/{THREAD}/threads")).is_empty()
    })
    .await;
    let (_, thread) = fake.calls("POST", &format!("/messages/{THREAD}/threads")).remove(0);
    assert!(thread["name"].as_str().unwrap().starts_with("echo hi"), "{thread}");
    fake.wait_until("the acknowledgment", |f| {
        f.calls("POST", &format!("/channels/{THREAD}/messages"))
            .iter()
            .any(|(_, b)| b["content"].as_str().unwrap_or("").starts_with("On it"))
    })
    .await;
    let pipeline = orch.store().pipelines(1).await.unwrap().pop().unwrap().pipeline;
    assert_eq!(
        pipeline.origin.url, "https://discord.com/channels/1000/3001",
        "the thread's link"
    );
    assert_eq!(
        finished(orch.store(), &format!("{}-1", pipeline.id)).await.state,
        RunState::Succeeded
    );
    let link = format!("[{0}](https://forge.example/demo/tree/{0})", pipeline.branch);
    fake.wait_until("the final status with the branch link", |f| {
        status_embeds(f, 1)
            .last()
            .is_some_and(|e| e["title"] == "Run 1: succeeded" && e["description"].as_str().unwrap().contains(&link))
    })
    .await;
    assert_eq!(
        fake.recorded.lock().unwrap().rate_limit_edits,
        0,
        "one edit was answered 429 and retried"
    );
    assert_eq!(env.origin_file(&pipeline.branch, "hi.txt").as_deref(), Some("hi\n"));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_roles_follow_up_in_the_thread_and_bots_and_strangers_do_not() {
    let (fake, env, daemon, pipeline) = discord_thread(false).await;
    let orch = daemon.orch.clone();
    // Follow-ups in the thread: by a listed user, and by a listed role; bots never count.
    fake.dispatch(
        "MESSAGE_CREATE",
        message("3002", THREAD, "102", &[], "echo two > two.txt", false),
    );
    let mut from_bot = message("3003", THREAD, "105", &[], "echo bot > bot.txt", false);
    from_bot["author"]["bot"] = json!(true);
    fake.dispatch("MESSAGE_CREATE", from_bot);
    fake.dispatch(
        "MESSAGE_CREATE",
        message("3004", THREAD, "107", &["501"], "echo role > role.txt", false),
    );
    for seq in [2, 3] {
        let id = format!("{}-{seq}", pipeline.id);
        appears(orch.store(), &id).await;
        assert_eq!(finished(orch.store(), &id).await.state, RunState::Succeeded);
    }
    assert_eq!(env.origin_file(&pipeline.branch, "two.txt").as_deref(), Some("two\n"));
    assert_eq!(env.origin_file(&pipeline.branch, "role.txt").as_deref(), Some("role\n"));
    assert_eq!(env.origin_file(&pipeline.branch, "bot.txt"), None);

    // Someone not allowed gets told so and starts nothing.
    fake.dispatch(
        "MESSAGE_CREATE",
        message("3010", CHANNEL, "109", &[], "<@900> echo x > x.txt", true),
    );
    fake.wait_until("the refusal", |f| {
        f.calls("POST", &format!("/channels/{CHANNEL}/messages"))
            .iter()
            .any(|(_, b)| b["message_reference"]["message_id"] == "3010")
    })
    .await;
    assert_eq!(
        orch.store().pipelines(10).await.unwrap().len(),
        1,
        "the stranger started nothing"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_loses_and_doubles_nothing_and_buttons_obey_approvers() {
    let (fake, _env, daemon, pipeline) = discord_thread(false).await;
    let orch = daemon.orch.clone();
    // A long run; the gateway drops and the client comes back; the replayed message starts nothing.
    fake.dispatch("MESSAGE_CREATE", message("3005", THREAD, "102", &[], "sleep 60", false));
    let long = format!("{}-2", pipeline.id);
    appears(orch.store(), &long).await;
    wait_for(orch.store(), &long, "running", |r| r.state == RunState::Running).await;
    fake.drop_connections();
    fake.wait_until("a reconnect", |f| {
        let r = f.recorded.lock().unwrap();
        r.resumes + r.identifies >= 2
    })
    .await;
    fake.dispatch("MESSAGE_CREATE", message("3005", THREAD, "102", &[], "sleep 60", false));
    holds_for("no lost or doubled run", Duration::from_millis(500), || async {
        orch.store().runs(&pipeline.id).await.unwrap().len() == 2
    })
    .await;
    assert_eq!(orch.store().run(&long).await.unwrap().unwrap().state, RunState::Running);

    // Cancel: refused (ephemerally) for a prompter, obeyed for an approver.
    fake.wait_until("the Cancel button", |f| status_embeds(f, 2).len() >= 2)
        .await;
    let custom_id = format!("threadline:cancel:{long}");
    fake.dispatch(
        "INTERACTION_CREATE",
        click("7001", THREAD, "5001", "102", &[], &custom_id),
    );
    fake.wait_until("the refusal of the click", |f| {
        !f.calls("POST", "/interactions/7001/").is_empty()
    })
    .await;
    let (_, refusal) = fake.calls("POST", "/interactions/7001/").remove(0);
    assert_eq!(
        (refusal["type"].as_u64(), refusal["data"]["flags"].as_u64()),
        (Some(4), Some(64)),
        "{refusal}"
    );
    assert_eq!(orch.store().run(&long).await.unwrap().unwrap().state, RunState::Running);
    fake.dispatch(
        "INTERACTION_CREATE",
        click("7002", THREAD, "5001", "101", &[], &custom_id),
    );
    assert_eq!(finished(orch.store(), &long).await.state, RunState::Cancelled);
    let (_, ack) = fake.calls("POST", "/interactions/7002/").remove(0);
    assert_eq!(ack["type"], 6);
    fake.wait_until("the cancelled status", |f| {
        status_embeds(f, 2)
            .last()
            .is_some_and(|e| e["title"] == "Run 2: cancelled")
    })
    .await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_attached_to_a_mention_reach_the_agent_without_the_bot_token() {
    let fake = FakeDiscord::start().await;
    let env = discord_env(&fake, &[], &[]);
    let daemon = start_gateway(&fake, &env).await;
    let orch = daemon.orch.clone();
    fake.dispatch(
        "MESSAGE_CREATE",
        message_with_files(
            "3100",
            CHANNEL,
            "102",
            "<@900> cp /threadline/attachments/trace.log got.log",
            &fake.base,
            &["trace.log"],
        ),
    );
    let run_id = format!("{}-1", crate::harness::first_pipeline(orch.store()).await.id);
    let run = finished(orch.store(), &run_id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?} {}", run.error, run.log_tail);
    let branch = orch.store().pipeline(&run.pipeline_id).await.unwrap().unwrap().branch;
    assert_eq!(
        env.origin_file(&branch, "got.log").as_deref(),
        Some("attachment trace.log from discord\n")
    );
    let (_, fetched) = fake.calls("GET", "/attachments/trace.log").remove(0);
    assert_eq!(fetched["authorization"], Value::Null, "no credentials to a CDN");
    daemon.stop().await.unwrap();
}
