//! Slack stories against the wire-level fake, with the real slack-morphism client over
//! Socket Mode: mention → thread → status message ending with the branch link.

use serde_json::{Value, json};
use threadline::config::Secret;
use threadline::model::RunState;

use crate::fake_slack::FakeSlack;
use std::time::Duration;

use crate::harness::{Daemon, TestEnv, appears, finished, holds_for, one_channel, poll_until, wait_for};

pub fn mention(user: &str, ts: &str, text: &str) -> Value {
    json!({"type": "app_mention", "user": user, "text": format!("<@UBOT> {text}"), "ts": ts,
           "channel": "C1", "event_ts": ts, "client_msg_id": format!("m-{ts}")})
}

fn thread_message(user: &str, ts: &str, thread: &str, text: &str) -> Value {
    json!({"type": "message", "user": user, "text": text, "ts": ts, "thread_ts": thread,
           "channel": "C1", "channel_type": "channel", "event_ts": ts})
}

/// A test environment with Slack enabled against `fake`, channel C1 bound to "demo".
fn slack_env(fake: &FakeSlack) -> TestEnv {
    let mut env = TestEnv::new();
    env.add_demo_repo();
    env.config.slack.enabled = true;
    env.config.slack.bot_token = Secret::new("xoxb-test-token");
    env.config.slack.api_url = fake.api_url.clone();
    env.config.slack.channels = one_channel("C1", "demo", &[], &[]);
    env
}

/// The status message updates of one run.
pub fn status_texts(fake: &FakeSlack, run_id: &str) -> Vec<Value> {
    let prefix = format!("Threadline run {run_id}:");
    fake.calls("chat.postMessage")
        .into_iter()
        .chain(fake.calls("chat.update"))
        .filter(|c| c["text"].as_str().is_some_and(|t| t.starts_with(&prefix)))
        .collect()
}

/// The daemon with Slack over Socket Mode against `fake`, connected.
pub async fn start_socket_mode(fake: &FakeSlack, env: &TestEnv) -> Daemon {
    let daemon = env.daemon().await;
    poll_until(
        "the Socket Mode connection",
        || daemon.is_finished() || fake.listening(),
        || format!("{:?}", fake.calls("apps.connections.open")),
    )
    .await;
    if daemon.is_finished() {
        panic!("the daemon stopped: {:?}", daemon.stop().await);
    }
    daemon
}

/// A Slack thread over Socket Mode: channel C1 (prompters U1 and U2, approver U1), and
/// U2's mention `echo hi > hi.txt` at ts 1700000001.000100 run to its end. The first
/// status edit is answered 429 when `rate_limited`.
struct SlackThread {
    fake: FakeSlack,
    env: TestEnv,
    daemon: Daemon,
    orch: threadline::orchestrator::Orchestrator,
    pipeline: threadline::model::Pipeline,
    /// The mention's Socket Mode envelope.
    envelope: String,
}

async fn slack_thread(rate_limited: bool) -> SlackThread {
    let fake = FakeSlack::start().await;
    let mut env = slack_env(&fake);
    env.config.slack.app_token = Secret::new("xapp-test-token");
    let c1 = env.config.slack.channels.get_mut("C1").unwrap();
    c1.prompters = vec!["U1".into(), "U2".into()];
    c1.approvers = vec!["U1".into()];
    fake.recorded.lock().unwrap().rate_limit_updates = u32::from(rate_limited);
    let daemon = start_socket_mode(&fake, &env).await;
    let orch = daemon.orch.clone();
    let envelope = fake.push_event("Ev1", mention("U2", "1700000001.000100", "echo hi > hi.txt"));
    let pipeline = crate::harness::first_pipeline(orch.store()).await;
    assert_eq!(
        finished(orch.store(), &format!("{}-1", pipeline.id)).await.state,
        RunState::Succeeded
    );
    SlackThread {
        fake,
        env,
        daemon,
        orch,
        pipeline,
        envelope,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_starts_a_pipeline_with_one_status_message_that_ends_on_its_branch() {
    let SlackThread {
        fake,
        env,
        daemon,
        orch,
        envelope: env_id,
        ..
    } = slack_thread(true).await;
    // A mention starts a pipeline: a reaction, a reply naming repo, branch and agent.
    fake.wait_until("the acknowledgment", |f| !f.calls("reactions.add").is_empty())
        .await;
    assert!(fake.acked(&env_id), "the envelope was acknowledged");
    let reply = fake
        .calls("chat.postMessage")
        .into_iter()
        .find(|c| c["text"].as_str().unwrap_or("").starts_with("On it"))
        .unwrap();
    assert_eq!(reply["thread_ts"], "1700000001.000100");
    let text = reply["text"].as_str().unwrap();
    assert!(
        text.contains("demo") && text.contains("threadline/echo-hi-hi-txt") && text.contains("sh"),
        "{text}"
    );

    let pipeline = orch.store().pipelines(1).await.unwrap().pop().unwrap().pipeline;
    assert_eq!(
        pipeline.origin.url, "https://fake.slack.com/archives/C1/p1700000001000100",
        "the thread's permalink"
    );
    let first = format!("{}-1", pipeline.id);
    assert_eq!(finished(orch.store(), &first).await.state, RunState::Succeeded);
    // The status message ends on the final state with the branch link, despite a 429.
    let link = format!("<https://forge.example/demo/tree/{0}|{0}>", pipeline.branch);
    fake.wait_until("the final status", |f| {
        status_texts(f, &first)
            .last()
            .is_some_and(|c| c["blocks"].to_string().contains(&link))
    })
    .await;
    assert_eq!(
        fake.recorded.lock().unwrap().rate_limit_updates,
        0,
        "the fake did answer one update with 429"
    );
    let metrics = daemon.get("/metrics").await;
    assert!(
        metrics.contains("threadline_chat_api_errors_total{platform=\"slack\"} 0"),
        "Slack counted from its start, a 429 waited out is no error:\n{metrics}"
    );
    let updates = status_texts(&fake, &first);
    assert_eq!(
        updates.iter().filter(|c| c.get("ts").is_none()).count(),
        1,
        "one status message: {updates:?}"
    );
    assert!(updates.last().unwrap()["text"].as_str().unwrap().contains("succeeded"));
    assert!(
        !updates.last().unwrap()["blocks"].to_string().contains("```"),
        "metadata only: no log lines"
    );
    assert_eq!(env.origin_file(&pipeline.branch, "hi.txt").as_deref(), Some("hi\n"));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_replies_follow_up_and_redeliveries_bots_and_strangers_start_nothing() {
    let SlackThread {
        fake,
        env,
        daemon,
        orch,
        pipeline,
        ..
    } = slack_thread(false).await;
    // The same event redelivered starts nothing.
    fake.push_event("Ev1", mention("U2", "1700000001.000100", "echo hi > hi.txt"));
    // A bot's message in the thread is ignored; someone not allowed is ignored too.
    let mut bot = thread_message("UBOT", "1700000001.000150", "1700000001.000100", "I am a bot");
    bot["bot_id"] = json!("B1");
    fake.push_event("Ev2", bot);
    fake.push_event(
        "Ev3",
        thread_message("U9", "1700000001.000160", "1700000001.000100", "echo nope > nope.txt"),
    );
    // A follow-up from an allowed user, no mention needed.
    fake.push_event(
        "Ev4",
        thread_message("U2", "1700000002.000200", "1700000001.000100", "echo two > two.txt"),
    );
    let second = format!("{}-2", pipeline.id);
    let store = orch.store().clone();
    appears(&store, &second).await;
    assert_eq!(finished(orch.store(), &second).await.state, RunState::Succeeded);
    assert_eq!(env.origin_file(&pipeline.branch, "two.txt").as_deref(), Some("two\n"));
    assert_eq!(
        orch.store().runs(&pipeline.id).await.unwrap().len(),
        2,
        "no run from the redelivery, the bot or U9"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_privately_and_buttons_obey_approvers() {
    let SlackThread {
        fake,
        env: _env,
        daemon,
        orch,
        pipeline,
        ..
    } = slack_thread(false).await;
    let store = orch.store().clone();
    // Someone not allowed at the top level gets an ephemeral refusal.
    fake.push_event("Ev5", mention("U9", "1700000003.000300", "echo x > x.txt"));
    fake.wait_until("a refusal", |f| !f.calls("chat.postEphemeral").is_empty())
        .await;
    assert_eq!(fake.calls("chat.postEphemeral")[0]["user"], "U9");

    // Cancel from the status message: refused for a prompter, obeyed for an approver.
    fake.push_event(
        "Ev6",
        thread_message("U2", "1700000004.000400", "1700000001.000100", "sleep 60"),
    );
    let third = format!("{}-2", pipeline.id);
    appears(&store, &third).await;
    wait_for(orch.store(), &third, "running", |r| r.state == RunState::Running).await;
    fake.wait_until("the Cancel button", |f| {
        status_texts(f, &third)
            .iter()
            .any(|c| c["blocks"].to_string().contains("threadline_cancel"))
    })
    .await;
    let ephemerals = fake.calls("chat.postEphemeral").len();
    fake.click(
        "U2",
        "C1",
        "1700000100.000009",
        "1700000001.000100",
        "threadline_cancel",
        &third,
    );
    fake.wait_until("the refusal of U2's click", |f| {
        f.calls("chat.postEphemeral").len() > ephemerals
    })
    .await;
    assert_eq!(
        fake.calls("chat.postEphemeral").last().unwrap()["thread_ts"],
        "1700000001.000100",
        "the refusal is in the thread that was clicked"
    );
    assert_eq!(
        orch.store().run(&third).await.unwrap().unwrap().state,
        RunState::Running
    );
    fake.click(
        "U1",
        "C1",
        "1700000100.000009",
        "1700000001.000100",
        "threadline_cancel",
        &third,
    );
    assert_eq!(finished(orch.store(), &third).await.state, RunState::Cancelled);
    fake.wait_until("the cancelled status", |f| {
        status_texts(f, &third)
            .last()
            .is_some_and(|c| c["text"].as_str().unwrap_or("").contains("cancelled"))
    })
    .await;
    daemon.stop().await.unwrap();
}

/// Signs like Slack: `v0=` + hex(HMAC-SHA256(secret, "v0:{ts}:{body}")).
fn sign(secret: &str, ts: i64, body: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("v0={hex}")
}

async fn post_signed(url: &str, secret: &str, ts: i64, body: &str, tamper: bool) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let mut signature = sign(secret, ts, body);
    if tamper {
        signature.replace_range(signature.len() - 2.., "00");
    }
    let req = axum::http::Request::post(url)
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", signature)
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let status = res.status().as_u16();
    let text = String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).into_owned();
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_api_checks_signatures_and_starts_runs() {
    let fake = FakeSlack::start().await;
    let mut env = slack_env(&fake);
    env.config.slack.mode = threadline::config::SlackMode::Events;
    env.config.slack.signing_secret = Secret::new("signing-secret-123");
    let daemon = env.daemon().await;
    let orch = daemon.orch.clone();
    let url = format!("http://{}/slack/events", daemon.slack_events.unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let secret = "signing-secret-123";

    // Slack's handshake when the URL is saved.
    let challenge = json!({"token": "t", "challenge": "chal-123", "type": "url_verification"}).to_string();
    let mut answer = (0, String::new());
    for _ in 0..50 {
        answer = post_signed(&url, secret, now, &challenge, false).await;
        if answer.0 == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert!(answer.1.contains("chal-123"), "{}", answer.1);

    let callback = |event: Value, id: &str| {
        json!({"token": "t", "team_id": "T1", "api_app_id": "A1", "event": event, "type": "event_callback",
               "event_id": id, "event_time": now})
        .to_string()
    };
    // A bad signature and a stale timestamp are rejected and start nothing.
    let body = callback(mention("U1", "1700000009.000900", "echo forged > f.txt"), "EvBad");
    assert_eq!(post_signed(&url, secret, now, &body, true).await.0, 401);
    assert_eq!(post_signed(&url, secret, now - 6 * 60, &body, false).await.0, 401);
    assert_eq!(post_signed(&url, "another-secret", now, &body, false).await.0, 401);
    holds_for("nothing started", Duration::from_millis(300), || async {
        orch.store().pipelines(10).await.unwrap().is_empty()
    })
    .await;

    // A correctly signed mention runs to the end.
    let body = callback(mention("U1", "1700000010.001000", "echo signed > s.txt"), "EvGood");
    assert_eq!(post_signed(&url, secret, now, &body, false).await.0, 200);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let pipeline = loop {
        if let Some(s) = orch.store().pipelines(1).await.unwrap().pop() {
            break s.pipeline;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the signed mention never started a pipeline"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        finished(orch.store(), &format!("{}-1", pipeline.id)).await.state,
        RunState::Succeeded
    );
    assert_eq!(env.origin_file(&pipeline.branch, "s.txt").as_deref(), Some("signed\n"));
    // Slack retries a slow delivery with the same event: still one run.
    assert_eq!(post_signed(&url, secret, now, &body, false).await.0, 200);
    holds_for("one run", Duration::from_millis(300), || async {
        orch.store().runs(&pipeline.id).await.unwrap().len() == 1
    })
    .await;

    daemon.stop().await.unwrap();
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_attached_to_a_mention_reach_the_agent_and_the_token_only_slack() {
    let fake = FakeSlack::start().await;
    let mut env = slack_env(&fake);
    env.config.slack.app_token = Secret::new("xapp-test-token");
    let daemon = start_socket_mode(&fake, &env).await;
    let orch = daemon.orch.clone();
    let mut event = mention(
        "U1",
        "1700000020.000100",
        "cp /threadline/attachments/report.log got.log && cp /threadline/request.md request.md",
    );
    // One file where Slack keeps files, one elsewhere: that one must not get the token.
    event["files"] = json!([
        {"id": "F1", "name": "report.log", "url_private_download": fake.file_url("report.log")},
        {"id": "F2", "name": "evil.txt", "url_private_download": "http://127.0.0.9:9/steal"},
    ]);
    fake.push_event("EvFiles", event);
    let run_id = format!("{}-1", crate::harness::first_pipeline(orch.store()).await.id);
    let run = finished(orch.store(), &run_id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?} {}", run.error, run.log_tail);
    let branch = orch.store().pipeline(&run.pipeline_id).await.unwrap().unwrap().branch;
    assert_eq!(
        env.origin_file(&branch, "got.log").as_deref(),
        Some("file report.log from slack\n")
    );
    let request = env.origin_file(&branch, "request.md").unwrap();
    assert!(request.contains("- report.log"), "{request}");
    assert!(
        request.contains("not attached: evil.txt: \"127.0.0.9:9\" is not a host"),
        "{request}"
    );
    let fetched = fake.recorded.lock().unwrap().file_requests.clone();
    assert_eq!(
        fetched,
        vec![("report.log".to_owned(), Some("Bearer xoxb-test-token".to_owned()))]
    );
    daemon.stop().await.unwrap();
}
