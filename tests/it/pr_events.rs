//! The pull request's life after Open PR, against the fake forges: merges, closes and
//! reopens seen by polling (conditional, backing off on rate limits) and by signed
//! webhooks; review comments from allowed reviewers run as follow-ups and are answered
//! on the pull request.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use threadline::bots::web::{WebState, router};
use threadline::config::Secret;
use threadline::model::RunState;
use threadline::orchestrator::forge::ForgeKind;
use tower::ServiceExt;

use crate::forge::{Story, click, forge_env, reply_text, story};
use crate::harness::{finished, holds_for, poll_until};

const SECRET: &str = "hook-secret-0042";

/// Signs a payload as GitHub and Gitea do (hex HMAC-SHA256 of the body).
fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Delivers a webhook to the web listener's `/hooks/app`, through a public host name.
async fn deliver(app: &axum::Router, headers: &[(&str, String)], payload: &Value) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method("POST")
        .uri("/hooks/app")
        .header("host", "threadline.example.com")
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::from(payload.to_string())).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A GitHub delivery of `event`, signed with `secret`.
async fn github(app: &axum::Router, event: &str, delivery: &str, secret: &str, payload: Value) -> (StatusCode, Value) {
    let signature = format!("sha256={}", sign(secret, payload.to_string().as_bytes()));
    let headers = [
        ("x-github-event", event.to_owned()),
        ("x-github-delivery", delivery.to_owned()),
        ("x-hub-signature-256", signature),
    ];
    deliver(app, &headers, &payload).await
}

/// Whether the story's pipeline's pull request is open, as the store has it.
async fn pr_is_open(story: &Story) -> bool {
    story
        .store
        .pull_request(&story.run.pipeline_id)
        .await
        .unwrap()
        .unwrap()
        .is_open()
}

fn web(story: &Story) -> axum::Router {
    router(WebState::new(story.orch.clone(), "127.0.0.1:8080".parse().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_tell_closes_and_reopens_and_forged_ones_change_nothing() {
    let (mut env, fake) = forge_env(ForgeKind::Github, "acme/hooks").await;
    env.config.pr_poll_secs = 0; // only webhooks tell
    env.config.repos.get_mut("app").unwrap().forge.webhook_secret = Secret::new(SECRET);
    let s = story(env, fake, "600.1", "echo one > one.txt").await;
    let text = reply_text(s.core.on_click(click("h1", &s.run, "U3")).await);
    assert!(text.starts_with("Opened pull request #1"), "{text}");
    let app = web(&s);
    let closed = json!({"action": "closed", "number": 1, "pull_request": {"number": 1, "merged": false,
        "merged_by": null}, "repository": {"full_name": "acme/hooks"}, "sender": {"login": "bob"}});

    // Forged and unsigned deliveries are refused and change nothing.
    let (status, body) = github(&app, "pull_request", "d-1", "not-the-secret", closed.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["error"].as_str().unwrap().contains("signature"), "{body}");
    let (status, _) = deliver(&app, &[("x-github-event", "pull_request".into())], &closed).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(pr_is_open(&s).await);

    // Signed, but about another repository (an organisation's hook): nothing changes.
    let mut elsewhere = closed.clone();
    elsewhere["repository"]["full_name"] = json!("acme/other");
    let (status, body) = github(&app, "pull_request", "d-1b", SECRET, elsewhere).await;
    assert_eq!(
        (status, &body["outcome"]),
        (StatusCode::OK, &json!("ignored")),
        "{body}"
    );
    assert!(pr_is_open(&s).await);

    // Signed: the card tells the close, and who did it, without a click or a poll.
    s.fake.set_open(1, false, "bob");
    let (status, body) = github(&app, "pull_request", "d-2", SECRET, closed).await;
    assert_eq!(
        (status, &body["outcome"]),
        (StatusCode::OK, &json!("pull_request")),
        "{body}"
    );
    let (_, card) = s.core.card(&s.run).await.unwrap();
    assert_eq!(card.note.as_deref(), Some("PR #1 was closed by bob."));
    assert!(
        card.buttons.iter().any(|b| b.label == "View PR #1 (closed)"),
        "{:?}",
        card.buttons
    );

    // Reopened: the pull request is the pipeline's again.
    s.fake.set_open(1, true, "bob");
    let reopened = json!({"action": "reopened", "number": 1, "pull_request": {"number": 1, "merged": false},
        "repository": {"full_name": "acme/hooks"}, "sender": {"login": "bob"}});
    let (status, _) = github(&app, "pull_request", "d-3", SECRET, reopened).await;
    assert_eq!(status, StatusCode::OK);
    let (_, card) = s.core.card(&s.run).await.unwrap();
    assert!(
        card.buttons.iter().any(|b| b.label == "View PR #1"),
        "{:?}",
        card.buttons
    );
    assert_ne!(card.note.as_deref(), Some("PR #1 was closed by bob."));

    // Another repository's name, and a repository without a secret, are refused.
    let mut req = Request::builder().method("POST").uri("/hooks/nope").header("host", "x");
    req = req.header("x-github-event", "ping");
    let res = app.clone().oneshot(req.body(Body::from("{}")).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    s.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_and_gitea_merges_are_seen_by_webhook_and_by_polling() {
    // GitLab: a merge told by a webhook carrying the secret token.
    let (mut env, fake) = forge_env(ForgeKind::Gitlab, "group/app").await;
    env.config.pr_poll_secs = 0;
    env.config.repos.get_mut("app").unwrap().forge.webhook_secret = Secret::new(SECRET);
    let s = story(env, fake, "610.1", "echo one > one.txt").await;
    let text = reply_text(s.core.on_click(click("g1", &s.run, "U3")).await);
    assert!(text.starts_with("Opened merge request !1"), "{text}");
    let app = web(&s);
    let merged = json!({"object_kind": "merge_request", "user": {"username": "dana"},
        "project": {"path_with_namespace": "group/app"},
        "object_attributes": {"iid": 1, "action": "merge", "state": "merged"}});
    let wrong = [
        ("x-gitlab-event", "Merge Request Hook".to_owned()),
        ("x-gitlab-token", "guess".to_owned()),
    ];
    assert_eq!(deliver(&app, &wrong, &merged).await.0, StatusCode::UNAUTHORIZED);
    assert!(pr_is_open(&s).await);
    let right = [
        ("x-gitlab-event", "Merge Request Hook".to_owned()),
        ("x-gitlab-token", SECRET.to_owned()),
        ("x-gitlab-event-uuid", "u-1".to_owned()),
    ];
    let (status, body) = deliver(&app, &right, &merged).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, card) = s.core.card(&s.run).await.unwrap();
    assert_eq!(card.note.as_deref(), Some("MR !1 was merged by dana."));
    s.orch.shutdown().await;

    // Gitea: a merge seen by polling, with who merged it.
    let (mut env, fake) = forge_env(ForgeKind::Gitea, "team/tool").await;
    env.config.pr_poll_secs = 0;
    let s = story(env, fake, "620.1", "echo one > one.txt").await;
    let text = reply_text(s.core.on_click(click("t1", &s.run, "U3")).await);
    assert!(text.starts_with("Opened pull request #1"), "{text}");
    s.orch.check_pull_requests().await.unwrap();
    assert!(pr_is_open(&s).await);
    s.fake.merge_pr("team/tool", 1, "erin");
    s.orch.check_pull_requests().await.unwrap();
    let (_, card) = s.core.card(&s.run).await.unwrap();
    assert_eq!(card.note.as_deref(), Some("PR #1 was merged by erin."));
    s.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_asks_conditionally_and_backs_off_on_a_rate_limit() {
    let (mut env, fake) = forge_env(ForgeKind::Github, "acme/poll").await;
    env.config.pr_poll_secs = 0; // rounds are run by hand
    let s = story(env, fake, "630.1", "echo one > one.txt").await;
    reply_text(s.core.on_click(click("p1", &s.run, "U3")).await);
    let path = "/api/v3/repos/acme/poll/pulls/1";
    s.orch.check_pull_requests().await.unwrap();
    s.orch.check_pull_requests().await.unwrap();
    assert_eq!(s.fake.calls(&format!("GET {path}")), 2);
    assert_eq!(
        s.fake.calls(&format!("304 GET {path}")),
        1,
        "the second round is a conditional request the forge answers 304"
    );

    // Rate limited: asked once, then left alone until the reset.
    s.fake.rate_limit(true);
    s.orch.check_pull_requests().await.unwrap();
    assert_eq!(s.fake.calls(&format!("GET {path}")), 3);
    s.fake.merge_pr("acme/poll", 1, "octocat");
    s.fake.rate_limit(false);
    for _ in 0..3 {
        s.orch.check_pull_requests().await.unwrap();
    }
    assert_eq!(s.fake.calls(&format!("GET {path}")), 3, "no call before the reset");
    assert!(pr_is_open(&s).await);
    s.orch.shutdown().await;
}

/// A review comment payload by `who` on line 1 of `one.txt`.
fn review_comment(id: i64, who: &str, body: &str) -> Value {
    json!({
        "action": "created",
        "pull_request": {"number": 1, "head": {"ref": "x"}},
        "comment": {"id": id, "body": body, "path": "one.txt", "line": 1, "original_line": 1,
            "diff_hunk": "@@ -0,0 +1 @@\n+one", "user": {"login": who},
            "html_url": format!("https://forge.example/acme/review/pull/1#discussion_r{id}")},
        "repository": {"full_name": "acme/review"},
        "sender": {"login": who},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_comment_from_an_allowed_reviewer_runs_a_follow_up_and_is_answered() {
    let (mut env, fake) = forge_env(ForgeKind::Github, "acme/review").await;
    env.config.pr_poll_secs = 0;
    let forge = &mut env.config.repos.get_mut("app").unwrap().forge;
    forge.webhook_secret = Secret::new(SECRET);
    forge.review_from = vec!["Alice".into()];
    let s = story(env, fake, "640.1", "echo one > one.txt").await;
    let text = reply_text(s.core.on_click(click("r1", &s.run, "U3")).await);
    assert!(text.starts_with("Opened pull request #1"), "{text}");
    let app = web(&s);
    let runs = || async { s.store.runs(&s.run.pipeline_id).await.unwrap().len() };

    // A stranger's comment and an allowed reviewer's comment without the mention run nothing.
    let (status, body) = github(
        &app,
        "pull_request_review_comment",
        "d-10",
        SECRET,
        review_comment(70, "mallory", "@threadline echo evil > evil.txt"),
    )
    .await;
    assert_eq!(
        (status, &body["outcome"]),
        (StatusCode::OK, &json!("ignored")),
        "{body}"
    );
    assert!(
        body["reason"].as_str().unwrap().contains("not in review_from"),
        "{body}"
    );
    let (_, body) = github(
        &app,
        "pull_request_review_comment",
        "d-11",
        SECRET,
        review_comment(71, "alice", "looks odd"),
    )
    .await;
    assert_eq!(body["outcome"], json!("ignored"), "{body}");
    assert_eq!(runs().await, 1);

    // The allowed reviewer mentions the bot: a follow-up, given the comment's context.
    let asked = review_comment(
        72,
        "alice",
        "@threadline cat /threadline/review.md > seen.md; echo fixed > one.txt",
    );
    let (status, body) = github(&app, "pull_request_review_comment", "d-12", SECRET, asked.clone()).await;
    assert_eq!((status, &body["outcome"]), (StatusCode::OK, &json!("queued")), "{body}");
    let run_id = body["run"].as_str().unwrap().to_owned();
    let run = finished(&s.store, &run_id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    assert!(run.pushed);
    assert_eq!(run.requested_by, "github:alice");
    assert_eq!(run.prompt, "cat /threadline/review.md > seen.md; echo fixed > one.txt");
    let branch = &s.pipeline.branch;
    let shown = |file: &str| {
        s.fake
            .git("acme/review", &["show", &format!("{branch}:{file}")])
            .trim()
            .to_owned()
    };
    assert_eq!(shown("one.txt"), "fixed", "the result is pushed to the same branch");
    let seen = shown("seen.md");
    assert!(
        seen.contains("review comment by alice on pull request #1") && seen.contains("`one.txt` line 1"),
        "{seen}"
    );
    assert!(seen.contains("@@ -0,0 +1 @@\n+one"), "the diff hunk: {seen}");

    // The thread's card says who asked, from where.
    let (_, card) = s.core.card(&run).await.unwrap();
    assert!(
        card.note
            .as_deref()
            .unwrap()
            .starts_with("Asked for by alice in a review of pull request #1."),
        "{:?}",
        card.note
    );

    // The answer on the pull request, in the comment's thread, linking the chat thread.
    poll_until(
        "the answer on the pull request",
        || !s.fake.comments().is_empty(),
        || format!("{:?}", s.fake.comments()),
    )
    .await;
    let comments = s.fake.comments();
    assert_eq!(comments.len(), 1, "{comments:?}");
    let (path, said) = &comments[0];
    assert_eq!(path, "/api/v3/repos/acme/review/pulls/1/comments/72/replies");
    assert!(said.contains("\nDone: pushed `"), "{said}");
    assert!(said.contains("https://chat.example/C1/640.1"), "{said}");
    assert!(!said.contains("@threadline"), "{said}");

    // A redelivery (same comment) runs nothing twice; Threadline's own answer, echoed back
    // as a review comment by an allowed user, runs nothing.
    let (_, body) = github(&app, "pull_request_review_comment", "d-12", SECRET, asked).await;
    assert_eq!(body["outcome"], json!("already_queued"), "{body}");
    let echo = review_comment(73, "alice", said);
    let (_, body) = github(&app, "pull_request_review_comment", "d-13", SECRET, echo).await;
    assert_eq!(body["outcome"], json!("ignored"), "{body}");
    assert_eq!(runs().await, 2);
    holds_for("one answer only", std::time::Duration::from_secs(1), || async {
        s.fake.comments().len() == 1
    })
    .await;
    s.orch.shutdown().await;
}
