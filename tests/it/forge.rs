//! Open PR end to end: a chat thread (the chat core every adapter uses, and the web
//! chat's API), a real orchestrator and containers, and a fake forge on 127.0.0.1 that
//! serves git over smart HTTP and each forge's pull request API.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use threadline::bots::chat::{ChannelBinding, ChatCore, Click, Message, Outcome};
use threadline::bots::render::Action;
use threadline::bots::web::{WebState, router};
use threadline::config::{Config, ForgeConfig, RepoConfig, Secret};
use threadline::model::{Origin, Run, RunState};
use threadline::orchestrator::forge::ForgeKind;
use threadline::orchestrator::{ContainerRuntime, NewPipeline, Orchestrator, Submitted};
use threadline::store::Store;
use tower::ServiceExt;

use crate::fake_forge::{FakeForge, READ_ONLY_TOKEN, TOKEN};
use crate::harness::{TestEnv, cli, finished, one_channel, write_cli_config};

use crate::harness::sender as user;

pub(crate) fn click(id: &str, run: &Run, who: &str) -> Click {
    Click {
        id: id.into(),
        action: Action::OpenPr,
        run_id: run.id.clone(),
        sender: user(who),
    }
}

/// U1 and U2 prompt; U1 and U3 approve; whoever prompted may not approve.
fn bindings() -> BTreeMap<String, ChannelBinding> {
    let mut channels = one_channel("C1", "app", &["U1", "U2"], &["U1", "U3"]);
    channels.get_mut("C1").unwrap().require_other_approver = true;
    channels
}

/// An environment whose repository "app" is `project` on a fake forge of `kind`.
pub(crate) async fn forge_env(kind: ForgeKind, project: &str) -> (TestEnv, FakeForge) {
    let mut env = TestEnv::new();
    let fake = FakeForge::start(&env.dir.path().join("forge")).await;
    let url = fake.create_repo(project, &[]);
    let name = format!("{kind:?}").to_lowercase();
    env.config.repos.insert(
        "app".into(),
        RepoConfig {
            url,
            forge: ForgeConfig {
                kind: Some(kind),
                api_url: fake.api_url(&name),
                token: Secret::new(TOKEN),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    (env, fake)
}

/// An orchestrator (not executing runs) on the same store with changed settings: how
/// a person fixing their config is played.
async fn core_with(env: &TestEnv, edit: impl FnOnce(&mut Config)) -> ChatCore {
    let mut config = env.config.clone();
    edit(&mut config);
    config.validate(None).unwrap();
    let store = Store::open(&config.database_url()).await.unwrap();
    let orch = Orchestrator::new(Arc::new(config), store, ContainerRuntime::connect().await.unwrap());
    ChatCore::new(orch, "slack", bindings())
}

fn forge_of(config: &mut Config) -> &mut ForgeConfig {
    &mut config.repos.get_mut("app").unwrap().forge
}

/// A thread whose first run has succeeded and pushed.
pub(crate) struct Story {
    pub env: TestEnv,
    pub fake: FakeForge,
    pub orch: Orchestrator,
    pub store: Store,
    pub core: ChatCore,
    pub run: Run,
    pub pipeline: threadline::model::Pipeline,
}

/// Starts the orchestrator on `env` and runs `script` from a mention by U1 in C1.
pub(crate) async fn story(env: TestEnv, fake: FakeForge, ts: &str, script: &str) -> Story {
    let orch = env.orchestrator().await;
    let store = orch.store().clone();
    let core = ChatCore::new(orch.clone(), "slack", bindings());
    let run = prompt(&core, &store, ts, "U1", script).await;
    let pipeline = store.pipeline(&run.pipeline_id).await.unwrap().unwrap();
    Story {
        env,
        fake,
        orch,
        store,
        core,
        run,
        pipeline,
    }
}

/// A mention in C1 that becomes a pipeline; returns its finished first run.
async fn prompt(core: &ChatCore, store: &Store, ts: &str, who: &str, script: &str) -> Run {
    let msg = Message {
        channel: "C1".into(),
        thread: None,
        id: ts.into(),
        sender: user(who),
        text: format!("<@UBOT> {script}"),
        mentions_bot: true,
        attachments: Vec::new(),
        link: Some(format!("https://chat.example/C1/{ts}")),
    };
    let Outcome::Queued { submitted, .. } = core.on_message(msg).await else {
        panic!("the mention did not queue a run");
    };
    let run = finished(store, &submitted.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    assert!(run.pushed);
    run
}

/// A pipeline started from the web chat on `repo`, its first run succeeded.
async fn web_run(orch: &Orchestrator, repo: String, prompt: &str) -> (Submitted, Run) {
    let submitted = orch
        .submit_pipeline(NewPipeline {
            repo,
            base_branch: None,
            agent: None,
            prompt: prompt.into(),
            requested_by: "web".into(),
            origin: Origin {
                surface: "web".into(),
                thread: String::new(),
                url: String::new(),
            },
            idempotency_key: None,
            mode: Default::default(),
            attachments: Vec::new(),
        })
        .await
        .unwrap();
    let run = finished(orch.store(), &submitted.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    (submitted, run)
}

/// A call to the web API, in process: its status and JSON answer.
async fn api(app: &axum::Router, method: &str, uri: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// Waits for the first pipeline a chat adapter starts, and for its first run to succeed.
async fn first_run_succeeds(store: &Store) -> String {
    let run_id = format!("{}-1", crate::harness::first_pipeline(store).await.id);
    crate::harness::appears(store, &run_id).await;
    assert_eq!(finished(store, &run_id).await.state, RunState::Succeeded);
    run_id
}

/// U1's reply `text` in the thread `thread`, as message `id`.
fn thread_reply(thread: &str, id: &str, text: &str) -> Message {
    Message {
        channel: "C1".into(),
        thread: Some(thread.into()),
        id: id.into(),
        sender: user("U1"),
        text: text.into(),
        mentions_bot: false,
        attachments: Vec::new(),
        link: None,
    }
}

pub(crate) fn reply_text(outcome: Outcome) -> String {
    match outcome {
        Outcome::Reply { text, .. } => text,
        other => panic!("expected a reply in the thread, got {other:?}"),
    }
}

fn private_text(outcome: Outcome) -> String {
    match outcome {
        Outcome::Private { text } => text,
        other => panic!("expected an ephemeral answer, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_click_opens_one_pull_request_and_follow_ups_update_it() {
    let (mut env, fake) = forge_env(ForgeKind::Github, "acme/widget").await;
    let forge = &mut env.config.repos.get_mut("app").unwrap().forge;
    forge.draft = true;
    forge.labels = vec!["agent".into()];
    forge.reviewers = vec!["octocat".into()];
    let Story {
        env,
        fake,
        orch,
        store,
        core,
        run,
        pipeline,
    } = story(env, fake, "100.1", "echo one > one.txt").await;
    // The branch really is on the forge, and the card links to it the forge's way.
    assert_eq!(fake.head("acme/widget", &pipeline.branch), run.head_commit);
    let (_, card) = core.card(&run).await.unwrap();
    assert!(
        card.buttons
            .iter()
            .any(|b| b.action == Action::OpenPr && b.url.is_none())
    );
    assert_eq!(
        card.branch_url,
        Some(format!("http://{}/acme/widget/tree/{}", fake.addr, pipeline.branch))
    );

    // Refused: a prompter who is not an approver; an approver who prompted it.
    let text = private_text(core.on_click(click("k1", &run, "U2")).await);
    assert!(
        text.contains("not allowed") && text.contains("Nothing was changed"),
        "{text}"
    );
    let text = private_text(core.on_click(click("k2", &run, "U1")).await);
    assert!(text.contains("You prompted this pipeline"), "{text}");
    assert!(fake.prs().is_empty());

    // Approved, and double-clicked: one pull request.
    let (a, b) = tokio::join!(
        core.on_click(click("k3", &run, "U3")),
        core.on_click(click("k4", &run, "U3"))
    );
    let (opened, again) = match (a, b) {
        (Outcome::Reply { text, .. }, Outcome::Private { text: other }) => (text, other),
        (Outcome::Private { text: other }, Outcome::Reply { text, .. }) => (text, other),
        other => panic!("one click should open, one find: {other:?}"),
    };
    let pr_url = format!("http://{}/acme/widget/pull/1", fake.addr);
    assert_eq!(opened, format!("Opened pull request #1: {pr_url}"));
    assert_eq!(again, format!("This pipeline already has pull request #1: {pr_url}"));
    let prs = fake.prs();
    assert_eq!(prs.len(), 1);
    let pr = &prs[0];
    assert_eq!((pr.head.as_str(), pr.base.as_str()), (pipeline.branch.as_str(), "main"));
    assert_eq!(pr.title, "echo one > one.txt");
    assert!(pr.draft);
    assert_eq!(pr.labels, ["agent"]);
    assert_eq!(pr.reviewers, ["octocat"]);
    for part in [
        "[this slack thread](https://chat.example/C1/100.1)",
        "> echo one > one.txt",
        "**succeeded**",
        "slack:U1",
        "1 file changed, 1 insertion(+), 0 deletions(-)",
        &format!("Branch `{}` into `main`", pipeline.branch),
    ] {
        assert!(pr.body.contains(part), "{part:?} is missing from:\n{}", pr.body);
    }
    // A redelivered click opens nothing and is recorded once.
    let text = private_text(core.on_click(click("k3", &run, "U3")).await);
    assert!(text.contains("already has pull request #1"), "{text}");
    assert_eq!(fake.calls("POST /api/v3/repos/acme/widget/pulls"), 1);

    // The button became a link to the pull request.
    let (_, card) = core.card(&run).await.unwrap();
    let link = card.buttons.iter().find(|b| b.action == Action::OpenPr).unwrap();
    assert_eq!(
        (link.label.as_str(), link.url.as_deref()),
        ("View PR #1", Some(pr_url.as_str()))
    );

    // A follow-up pushes to the same branch, and its status message says the PR updated.
    let msg = Message {
        channel: "C1".into(),
        thread: Some("100.1".into()),
        id: "100.2".into(),
        sender: user("U2"),
        text: "echo two > two.txt".into(),
        mentions_bot: false,
        attachments: Vec::new(),
        link: None,
    };
    let Outcome::Queued { submitted, .. } = core.on_message(msg.clone()).await else {
        panic!("the follow-up was not queued");
    };
    let follow = finished(&store, &submitted.run.id).await;
    assert!(follow.pushed);
    assert_eq!(fake.head("acme/widget", &pipeline.branch), follow.head_commit);
    let (_, card) = core.card(&follow).await.unwrap();
    assert_eq!(
        card.note.as_deref(),
        Some("Pushed to pull request #1: it now shows this run's changes.")
    );
    assert_eq!(fake.prs().len(), 1, "{:?}", fake.prs());

    // Merged on the forge: Open PR now says there is nothing new, and once a follow-up
    // has made something, it opens a second pull request.
    fake.merge_pr("acme/widget", 1, "octocat");
    let text = reply_text(core.on_click(click("k5", &run, "U3")).await);
    assert!(
        text.starts_with("Pull request #1 was merged; there is nothing to merge"),
        "{text}"
    );
    let msg = Message {
        id: "100.3".into(),
        text: "echo three > three.txt".into(),
        ..msg
    };
    let Outcome::Queued { submitted, .. } = core.on_message(msg).await else {
        panic!("the second follow-up was not queued");
    };
    let third = finished(&store, &submitted.run.id).await;
    let (_, card) = core.card(&third).await.unwrap();
    assert!(
        card.buttons
            .iter()
            .any(|b| b.action == Action::OpenPr && b.url.is_none())
    );
    let text = reply_text(core.on_click(click("k6", &third, "U3")).await);
    let second_url = format!("http://{}/acme/widget/pull/2", fake.addr);
    assert_eq!(text, format!("Opened pull request #2: {second_url}"));
    assert_eq!(fake.prs().len(), 2);

    // Every decision is recorded, once per click, and `threadline runs` shows them.
    let approvals = store.approvals(&pipeline.id).await.unwrap();
    let seen: Vec<(&str, bool)> = approvals.iter().map(|a| (a.actor.as_str(), a.approved)).collect();
    assert_eq!(
        seen,
        [
            ("slack:U2", false),
            ("slack:U1", false),
            ("slack:U3", true),
            ("slack:U3", true),
            ("slack:U3", true),
            ("slack:U3", true)
        ]
    );
    let config = write_cli_config(&env, "");
    let out = cli(&config, &["runs", &pipeline.id]).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("pull request #2 {second_url} (opened; approved by slack:U3)")),
        "{shown}"
    );
    assert!(
        shown.contains("OPEN PR DECISIONS") && shown.contains("refused"),
        "{shown}"
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forge_errors_reach_the_thread_and_open_pr_works_once_they_are_fixed() {
    let (env, fake) = forge_env(ForgeKind::Github, "acme/errs").await;
    let Story {
        env,
        fake,
        orch,
        store,
        core,
        run,
        pipeline,
    } = story(env, fake, "200.1", "echo e > e.txt").await;
    let branch = pipeline.branch.clone();
    let mut n = 0;
    let mut press = async |core: &ChatCore| {
        n += 1;
        reply_text(core.on_click(click(&format!("e{n}"), &run, "U3")).await)
    };

    let no_token = core_with(&env, |c| forge_of(c).token = Secret::default()).await;
    let text = press(&no_token).await;
    assert!(
        text.starts_with("No GitHub token is configured") && text.contains("THREADLINE_REPOS__APP__FORGE__TOKEN"),
        "{text}"
    );
    let bad = core_with(&env, |c| forge_of(c).token = Secret::new("forge-token-wrong-9999")).await;
    let text = press(&bad).await;
    assert!(text.starts_with("GitHub refused the token"), "{text}");
    assert!(!text.contains("forge-token-wrong-9999"));
    let read_only = core_with(&env, |c| forge_of(c).token = Secret::new(READ_ONLY_TOKEN)).await;
    let text = press(&read_only).await;
    assert!(text.contains("may not open pull requests on acme/errs"), "{text}");
    let elsewhere = core_with(&env, |c| forge_of(c).project = "acme/missing".into()).await;
    let text = press(&elsewhere).await;
    assert!(text.contains("has no project acme/missing"), "{text}");
    let down = core_with(&env, |c| forge_of(c).api_url = "http://127.0.0.1:9/api/v3".into()).await;
    let text = press(&down).await;
    assert!(
        text.contains("cannot be reached at http://127.0.0.1:9/api/v3"),
        "{text}"
    );

    // The branch deleted on the forge.
    let head = fake.head("acme/errs", &branch).unwrap();
    fake.git("acme/errs", &["update-ref", "-d", &format!("refs/heads/{branch}")]);
    let text = press(&core).await;
    assert!(text.contains(&format!("`{branch}` is not on the remote")), "{text}");
    fake.git("acme/errs", &["update-ref", &format!("refs/heads/{branch}"), &head]);
    // Already merged: the base holds every commit of the branch.
    let main = fake.head("acme/errs", "main").unwrap();
    fake.git("acme/errs", &["update-ref", "refs/heads/main", &head]);
    let text = press(&core).await;
    assert!(text.starts_with("There is nothing to merge"), "{text}");
    // The base branch gone.
    fake.git("acme/errs", &["update-ref", "-d", "refs/heads/main"]);
    let text = press(&core).await;
    assert!(
        text.starts_with("The base branch `main` is gone from the remote"),
        "{text}"
    );
    fake.git("acme/errs", &["update-ref", "refs/heads/main", &main]);

    // Nothing was opened, and Open PR is still offered; now it works.
    assert!(fake.prs().is_empty());
    let (_, card) = core.card(&run).await.unwrap();
    assert!(
        card.buttons
            .iter()
            .any(|b| b.action == Action::OpenPr && b.url.is_none())
    );
    let text = press(&core).await;
    assert!(text.starts_with("Opened pull request #1"), "{text}");
    assert_eq!(fake.prs().len(), 1);
    let failures = store
        .approvals(&pipeline.id)
        .await
        .unwrap()
        .iter()
        .filter(|a| a.reason.starts_with("failed: "))
        .count();
    assert_eq!(failures, 8);
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_opened_by_hand_on_gitea_is_found_not_duplicated() {
    let (env, fake) = forge_env(ForgeKind::Gitea, "team/tool").await;
    let Story {
        env: _temp_dir,
        fake,
        orch,
        store,
        core,
        run,
        pipeline,
    } = story(env, fake, "300.1", "echo g > g.txt").await;
    let (_, card) = core.card(&run).await.unwrap();
    assert_eq!(
        card.branch_url,
        Some(format!("http://{}/team/tool/src/branch/{}", fake.addr, pipeline.branch))
    );
    // Someone else's pull request first, then the one for this branch, opened by hand.
    fake.add_pr("feature", "main", "unrelated");
    let number = fake.add_pr(&pipeline.branch, "main", "opened by hand");
    let text = reply_text(core.on_click(click("g1", &run, "U3")).await);
    assert_eq!(
        text,
        format!(
            "Found an open pull request for this branch, #{number}: http://{}/team/tool/pull/{number}",
            fake.addr
        )
    );
    assert_eq!(fake.calls("POST /api/v1/repos/team/tool/pulls"), 0);
    assert_eq!(fake.prs().len(), 2);
    let recorded = store.pull_request(&pipeline.id).await.unwrap().unwrap();
    assert!(recorded.found);
    orch.shutdown().await;
}

/// The web chat's Open PR, on GitLab: a draft merge request with labels and reviewers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_chat_opens_a_gitlab_merge_request() {
    let (mut env, fake) = forge_env(ForgeKind::Gitlab, "group/sub/app").await;
    let forge = &mut env.config.repos.get_mut("app").unwrap().forge;
    forge.draft = true;
    forge.labels = vec!["agent".into(), "bot".into()];
    forge.reviewers = vec!["maria".into()];
    let orch = env.orchestrator().await;
    let url = env.config.repos["app"].url.clone();
    let (submitted, run) = web_run(&orch, url, "echo web > web.txt").await;
    let app = router(WebState::new(orch.clone(), "127.0.0.1:8080".parse().unwrap()));
    let (_, shown) = api(&app, "GET", &format!("/api/runs/{}", run.id)).await;
    assert_eq!(shown["card"]["buttons"][0]["action"], "open_pr", "{shown}");

    let mr_url = format!("http://{}/group/sub/app/-/merge_requests/1", fake.addr);
    let (status, body) = api(&app, "POST", &format!("/api/runs/{}/open-pr", run.id)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["text"], format!("Opened merge request !1: {mr_url}"));
    let (status, body) = api(&app, "POST", &format!("/api/runs/{}/open-pr", run.id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let prs = fake.prs();
    assert_eq!(prs.len(), 1);
    assert_eq!(prs[0].head, submitted.pipeline.branch);
    assert_eq!(prs[0].base, "main");
    assert_eq!(prs[0].title, "Draft: echo web > web.txt");
    assert!(prs[0].body.contains("Threadline's web chat"), "{}", prs[0].body);
    assert_eq!(prs[0].labels, ["agent", "bot"]);
    assert_eq!(prs[0].reviewers.len(), 1);

    let (_, detail) = api(&app, "GET", &format!("/api/pipelines/{}", submitted.pipeline.id)).await;
    assert_eq!(detail["pull_request"]["url"], mr_url.as_str());
    assert_eq!(detail["approvals"].as_array().map(Vec::len), Some(2));
    assert_eq!(detail["approvals"][0]["actor"], "web");
    let card = &detail["runs"][0]["card"];
    assert_eq!(card["pull_request"]["label"], "MR !1");
    assert_eq!(card["buttons"][0]["url"], mr_url.as_str());
    orch.shutdown().await;
}

/// A checkout without a remote: no Open PR, and the card and the button say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_only_repository_says_there_is_no_forge() {
    let env = TestEnv::new();
    let checkout = env.dir.path().join("checkout");
    crate::harness::git(
        env.dir.path(),
        &["clone", "-q", &env.origin_url(), checkout.to_str().unwrap()],
    );
    crate::harness::git(&checkout, &["remote", "remove", "origin"]);
    let orch = env.orchestrator().await;
    let (submitted, run) = web_run(&orch, checkout.display().to_string(), "echo local > local.txt").await;
    assert!(submitted.pipeline.local_only);
    let app = router(WebState::new(orch.clone(), "127.0.0.1:8080".parse().unwrap()));
    let (_, shown) = api(&app, "GET", &format!("/api/runs/{}", run.id)).await;
    let card = &shown["card"];
    assert_eq!(card["buttons"].as_array().map(Vec::len), Some(0), "{card}");
    let note = card["note"].as_str().unwrap_or_default();
    assert!(note.starts_with("This pipeline's repository is local-only"), "{note}");
    assert!(note.contains(&format!(
        "git fetch {}",
        orch.mirror_path(&submitted.pipeline).display()
    )));
    let (status, _) = api(&app, "POST", &format!("/api/runs/{}/open-pr", run.id)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    orch.shutdown().await;
}

/// Open PR through the Slack adapter and the real slack-morphism client: the refusal is
/// ephemeral, the link goes to the thread, and the status message's button becomes a link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_pr_from_a_slack_status_message() {
    let slack_fake = crate::fake_slack::FakeSlack::start().await;
    let (mut env, fake) = forge_env(ForgeKind::Github, "acme/chat").await;
    env.config.slack.enabled = true;
    env.config.slack.bot_token = Secret::new("xoxb-test-token");
    env.config.slack.app_token = Secret::new("xapp-test-token");
    env.config.slack.api_url = slack_fake.api_url.clone();
    env.config.slack.channels = bindings();
    // U3 approves as a member of a Slack user group.
    env.config.slack.channels.get_mut("C1").unwrap().approvers = vec!["U1".into(), "S0REVIEW".into()];
    slack_fake
        .recorded
        .lock()
        .unwrap()
        .usergroups
        .insert("S0REVIEW".into(), vec!["U7".into(), "U3".into()]);
    let daemon = crate::slack::start_socket_mode(&slack_fake, &env).await;
    let orch = daemon.orch.clone();

    slack_fake.push_event(
        "Ev1",
        crate::slack::mention("U1", "1700000001.000100", "echo s > s.txt"),
    );
    let run_id = first_run_succeeds(orch.store()).await;
    slack_fake
        .wait_until("the Open PR button", |f| {
            crate::slack::status_texts(f, &run_id)
                .last()
                .is_some_and(|c| c["blocks"].to_string().contains("threadline_open_pr"))
        })
        .await;

    // A refused click is answered privately, to the clicker.
    let refused = async |who: &str| {
        let ephemerals = slack_fake.calls("chat.postEphemeral").len();
        slack_fake.click(
            who,
            "C1",
            "1700000100.000009",
            "1700000001.000100",
            "threadline_open_pr",
            &run_id,
        );
        slack_fake
            .wait_until("the refusal", |f| f.calls("chat.postEphemeral").len() > ephemerals)
            .await;
        let refusal = slack_fake.calls("chat.postEphemeral").pop().unwrap();
        assert_eq!(refusal["user"], who);
        assert_eq!(
            refusal["thread_ts"], "1700000001.000100",
            "in the thread that was clicked"
        );
        refusal["text"].as_str().unwrap().to_owned()
    };
    // U1 prompted it; U2 is in no group that approves.
    assert!(refused("U1").await.contains("You prompted this pipeline"));
    assert!(refused("U2").await.contains("not allowed"));
    assert!(fake.prs().is_empty());

    // U3 approves: the link in the thread, and the button turns into it.
    slack_fake.click(
        "U3",
        "C1",
        "1700000100.000009",
        "1700000001.000100",
        "threadline_open_pr",
        &run_id,
    );
    let pr_url = format!("http://{}/acme/chat/pull/1", fake.addr);
    let said = format!("Opened pull request #1: {pr_url}");
    slack_fake
        .wait_until("the link in the thread", |f| {
            f.calls("chat.postMessage").iter().any(|c| c["text"] == said.as_str())
        })
        .await;
    let posted = slack_fake.calls("chat.postMessage");
    let link = posted.iter().find(|c| c["text"] == said.as_str()).unwrap();
    assert_eq!(link["thread_ts"], "1700000001.000100");
    slack_fake
        .wait_until("the status message's link button", |f| {
            crate::slack::status_texts(f, &run_id)
                .last()
                .is_some_and(|c| c["blocks"].to_string().contains(&format!("\"url\":\"{pr_url}\"")))
        })
        .await;
    let prs = fake.prs();
    assert_eq!(prs.len(), 1);
    assert!(
        prs[0]
            .body
            .contains("https://fake.slack.com/archives/C1/p1700000001000100"),
        "{}",
        prs[0].body
    );
    let lookups = slack_fake.calls("usergroups.users.list");
    assert!(
        !lookups.is_empty() && lookups.iter().all(|c| c["usergroup"] == "S0REVIEW"),
        "{lookups:?}"
    );

    daemon.stop().await.unwrap();
    orch.shutdown().await;
}

/// Open PR through the Discord adapter and serenity, with the repository's own policy:
/// approvers by role, and whoever prompted may not approve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_pr_from_a_discord_thread_follows_the_repository_policy() {
    use crate::discord::{CHANNEL, THREAD};
    use crate::fake_discord::{FakeDiscord, click, message};

    let discord_fake = FakeDiscord::start().await;
    let (mut env, fake) = forge_env(ForgeKind::Gitea, "team/bot").await;
    let app = env.config.repos.get_mut("app").unwrap();
    app.approvers = vec!["777".into()]; // a role
    app.require_other_approver = true;
    env.config.discord.enabled = true;
    env.config.discord.token = Secret::new("bot-token-123");
    env.config.discord.api_url = discord_fake.base.clone();
    env.config.discord.channels = one_channel(CHANNEL, "app", &["101"], &["101", "202", "203"]);
    let daemon = crate::discord::start_gateway(&discord_fake, &env).await;
    let orch = daemon.orch.clone();

    discord_fake.dispatch(
        "MESSAGE_CREATE",
        message(THREAD, CHANNEL, "101", &["777"], "<@900> echo d > d.txt", true),
    );
    let run_id = first_run_succeeds(orch.store()).await;
    let custom_id = format!("threadline:open_pr:{run_id}");
    let answer = async |id: &str, who: &str, roles: &[&str]| {
        discord_fake.dispatch("INTERACTION_CREATE", click(id, THREAD, "5001", who, roles, &custom_id));
        let path = format!("/interactions/{id}/");
        discord_fake
            .wait_until("the interaction's answer", |f| !f.calls("POST", &path).is_empty())
            .await;
        discord_fake.calls("POST", &path).remove(0).1
    };

    // The prompter, even with the role; then an approver of the channel without it.
    let refusal = answer("8001", "101", &["777"]).await;
    assert_eq!(refusal["data"]["flags"], 64, "{refusal}");
    assert!(
        refusal["data"]["content"]
            .as_str()
            .unwrap()
            .contains("You prompted this pipeline")
    );
    let refusal = answer("8002", "202", &[]).await;
    assert!(
        refusal["data"]["content"]
            .as_str()
            .unwrap()
            .contains("Only the approvers of app"),
        "{refusal}"
    );
    assert!(fake.prs().is_empty());

    // Someone else with the role: the pull request, its link in the thread, a link button.
    let ack = answer("8003", "203", &["777"]).await;
    assert_eq!(ack["type"], 6, "{ack}");
    let pr_url = format!("http://{}/team/bot/pull/1", fake.addr);
    let said = format!("Opened pull request #1: {pr_url}");
    discord_fake
        .wait_until("the link in the thread", |f| {
            f.calls("POST", &format!("/channels/{THREAD}/messages"))
                .iter()
                .any(|(_, b)| b["content"] == said.as_str())
        })
        .await;
    discord_fake
        .wait_until("the link button", |f| {
            f.calls("PATCH", &format!("/channels/{THREAD}/messages/"))
                .iter()
                .any(|(_, b)| {
                    let button = &b["components"][0]["components"][0];
                    button["style"] == 5 && button["url"] == pr_url.as_str()
                })
        })
        .await;
    assert_eq!(fake.prs().len(), 1);
    let decisions: Vec<bool> = orch
        .store()
        .approvals(&run_id[..run_id.len() - 2])
        .await
        .unwrap()
        .iter()
        .map(|a| a.approved)
        .collect();
    assert_eq!(decisions, [false, false, true]);

    daemon.stop().await.unwrap();
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_pull_request_shows_on_the_cards_and_a_later_change_offers_the_next() {
    let (mut env, fake) = forge_env(ForgeKind::Github, "acme/merged").await;
    env.config.pr_poll_secs = 1;
    let Story {
        env: _env,
        fake,
        orch,
        store,
        core,
        run,
        ..
    } = story(env, fake, "300.1", "echo one > one.txt").await;
    let text = reply_text(core.on_click(click("m1", &run, "U3")).await);
    assert!(text.starts_with("Opened pull request #1"), "{text}");

    // Merged on the forge: Threadline learns it without anyone pressing a button.
    fake.merge_pr("acme/merged", 1, "octocat");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while store.pull_request(&run.pipeline_id).await.unwrap().unwrap().is_open() {
        assert!(std::time::Instant::now() < deadline, "the poll never saw the merge");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, card) = core.card(&run).await.unwrap();
    assert_eq!(card.note.as_deref(), Some("PR #1 was merged by octocat."));
    assert!(
        card.buttons
            .iter()
            .any(|b| b.label == "View PR #1 (merged)" && b.url.is_some()),
        "{:?}",
        card.buttons
    );
    assert!(
        !card
            .buttons
            .iter()
            .any(|b| b.action == Action::OpenPr && b.url.is_none())
    );

    // A later change offers Open PR for what the branch gained; a run with no change says so.
    let follow = |id: &str, script: &str| thread_reply("300.1", id, script);
    let mut later = Vec::new();
    for (id, script) in [("300.2", "echo two > two.txt"), ("300.3", "true")] {
        let Outcome::Queued { submitted, .. } = core.on_message(follow(id, script)).await else {
            panic!("no follow-up");
        };
        later.push(finished(&store, &submitted.run.id).await);
    }
    let (_, changed) = core.card(&later[0]).await.unwrap();
    assert_eq!(
        changed.note.as_deref(),
        Some("PR #1 was merged by octocat. Open PR opens a new one for what the branch has gained since.")
    );
    assert!(
        changed
            .buttons
            .iter()
            .any(|b| b.action == Action::OpenPr && b.url.is_none())
    );
    let (_, unchanged) = core.card(&later[1]).await.unwrap();
    assert_eq!(
        unchanged.note.as_deref(),
        Some("PR #1 was merged by octocat. Nothing new on the branch since.")
    );
    let text = reply_text(core.on_click(click("m2", &later[0], "U3")).await);
    assert!(
        text.starts_with("Pull request #1 was merged. Opened pull request #2"),
        "{text}"
    );
    assert_eq!(fake.prs().len(), 2);
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fresh_approvals_a_push_after_the_approval_asks_for_another() {
    let (mut env, fake) = forge_env(ForgeKind::Github, "acme/fresh").await;
    env.config.repos.get_mut("app").unwrap().require_fresh_approval = true;
    let Story {
        env: _env,
        orch,
        store,
        core,
        run,
        ..
    } = story(env, fake, "400.1", "echo one > one.txt").await;
    let text = reply_text(core.on_click(click("f1", &run, "U3")).await);
    assert!(text.starts_with("Opened pull request #1"), "{text}");
    let approvals = store.approvals(&run.pipeline_id).await.unwrap();
    assert_eq!(
        approvals.last().unwrap().commit,
        run.head_commit,
        "the approval records what it approved"
    );
    let (_, card) = core.card(&run).await.unwrap();
    assert!(
        !card.buttons.iter().any(|b| b.label == "Approve again"),
        "fresh: {:?}",
        card.buttons
    );

    // A follow-up pushes after the approval: its card says the approval is stale.
    let reply = thread_reply("400.1", "400.2", "echo two > two.txt");
    let Outcome::Queued { submitted, .. } = core.on_message(reply).await else {
        panic!("no follow-up");
    };
    let second = finished(&store, &submitted.run.id).await;
    let (_, card) = core.card(&second).await.unwrap();
    assert!(
        card.note.as_deref().unwrap().contains("after it was approved"),
        "{:?}",
        card.note
    );
    assert!(
        card.buttons
            .iter()
            .any(|b| b.label == "Approve again" && b.url.is_none())
    );
    // Approving again (the same policy applies) makes it fresh.
    let again = private_text(core.on_click(click("f2", &second, "U3")).await);
    assert!(again.contains("already has pull request #1"), "{again}");
    let (_, card) = core.card(&second).await.unwrap();
    assert!(
        !card.buttons.iter().any(|b| b.label == "Approve again"),
        "{:?}",
        card.buttons
    );
    assert!(
        card.note.as_deref().unwrap().starts_with("Pushed to pull request #1"),
        "{:?}",
        card.note
    );
    orch.shutdown().await;
}
