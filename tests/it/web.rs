//! The web chat, dashboard and API at the HTTP level: every route, the token rule, and
//! live updates, against a real orchestrator running real containers.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use threadline::bots::web::{WebState, listen_addr, router};
use threadline::config::Secret;
use threadline::orchestrator::Orchestrator;
use tower::ServiceExt;

use crate::harness::TestEnv;

const HOST: &str = "127.0.0.1:8080";

struct Web {
    app: axum::Router,
    orch: Orchestrator,
    token: Option<String>,
}

impl Web {
    async fn new(env: &mut TestEnv, token: Option<&str>) -> Web {
        env.add_demo_repo();
        if let Some(t) = token {
            env.config.web.token = Secret::new(t);
        }
        let orch = env.orchestrator().await;
        let app = router(WebState::new(orch.clone(), HOST.parse().unwrap()));
        Web {
            app,
            orch,
            token: token.map(str::to_owned),
        }
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
        let res = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    fn req(&self, method: &str, uri: &str) -> axum::http::request::Builder {
        let b = Request::builder().method(method).uri(uri).header(header::HOST, HOST);
        match &self.token {
            Some(t) => b.header(header::AUTHORIZATION, format!("Bearer {t}")),
            None => b,
        }
    }

    async fn get(&self, uri: &str) -> (StatusCode, String) {
        let (s, _, b) = self.send(self.req("GET", uri).body(Body::empty()).unwrap()).await;
        (s, b)
    }

    async fn json(&self, method: &str, uri: &str, body: Value, key: Option<&str>) -> (StatusCode, Value) {
        let mut b = self.req(method, uri).header(header::CONTENT_TYPE, "application/json");
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        let (s, _, text) = self.send(b.body(Body::from(body.to_string())).unwrap()).await;
        (s, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get_json(&self, uri: &str) -> Value {
        let (s, b) = self.get(uri).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {b}");
        serde_json::from_str(&b).unwrap()
    }

    async fn wait_card(&self, run_id: &str, done: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..600 {
            let run = self.get_json(&format!("/api/runs/{run_id}")).await;
            if done(&run["card"]) {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("run {run_id} never reached the expected card");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_of_the_chat_and_the_api_works() {
    let mut env = TestEnv::new();
    let web = Web::new(&mut env, None).await;

    for (path, needle) in [
        ("/", "Start a thread"),
        ("/dashboard", "Dashboard"),
        ("/pipelines/x", "app.js"),
        ("/runs/x", "app.js"),
        ("/assets/app.js", "EventSource"),
        ("/assets/style.css", ".card"),
        ("/api", "/api/pipelines"),
        ("/healthz", "ok"),
    ] {
        let (s, body) = web.get(path).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(body.contains(needle), "{path} lacks {needle:?}");
    }
    let repos = web.get_json("/api/repos").await;
    assert_eq!(repos["repos"][0]["name"], "demo");
    assert_eq!(repos["default_agent"], "sh");

    // Bad input: clear errors, nothing started.
    let (s, e) = web
        .json("POST", "/api/pipelines", json!({"repo": "nope", "prompt": "x"}), None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(e["error"].as_str().unwrap().contains("demo"), "{e}");
    let (s, e) = web
        .json("POST", "/api/pipelines", json!({"repo": "demo", "prompt": "  "}), None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (s, _) = web
        .json("POST", "/api/pipelines/nope/runs", json!({"prompt": "x"}), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(web.get("/api/runs/nope").await.0, StatusCode::NOT_FOUND);

    // A new thread: a pipeline whose first run ends with a branch link.
    let (s, started) = web
        .json(
            "POST",
            "/api/pipelines",
            json!({"repo": "demo", "prompt": "echo web > web.txt\necho hi from the agent"}),
            Some("k1"),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{started}");
    let run_id = started["run"]["id"].as_str().unwrap().to_owned();
    let pipeline_id = started["pipeline"]["id"].as_str().unwrap().to_owned();
    assert_eq!(started["pipeline"]["surface"], "web");
    // The same message delivered twice starts one run.
    let (s, again) = web
        .json(
            "POST",
            "/api/pipelines",
            json!({"repo": "demo", "prompt": "echo web > web.txt\necho hi from the agent"}),
            Some("k1"),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["run"]["id"], run_id.as_str());
    assert_eq!(again["created"], false);

    let done = web.wait_card(&run_id, |c| c["terminal"] == true).await;
    let card = &done["card"];
    assert_eq!(card["state"], "succeeded", "{done}");
    let branch = done["pipeline"]["branch"].as_str().unwrap();
    assert_eq!(card["branch_url"], format!("https://forge.example/demo/tree/{branch}"));
    assert!(card["diffstat"].as_str().unwrap().contains("1 file changed"));
    assert!(card["log_lines"].to_string().contains("hi from the agent"));
    assert_eq!(done["events"].as_array().unwrap().len(), 5);
    assert_eq!(env.origin_file(branch, "web.txt").as_deref(), Some("web\n"));

    // A follow-up in the thread, then one to cancel while queued behind a long run.
    let (s, long) = web
        .json(
            "POST",
            &format!("/api/pipelines/{pipeline_id}/runs"),
            json!({"prompt": "sleep 30"}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, queued) = web
        .json(
            "POST",
            &format!("/api/pipelines/{pipeline_id}/runs"),
            json!({"prompt": "echo later > l.txt"}),
            None,
        )
        .await;
    assert_eq!(queued["ahead"], 1);
    assert_eq!(queued["card"]["headline"], "queued (1 ahead)");
    let queued_id = queued["run"]["id"].as_str().unwrap().to_owned();
    let (s, c) = web
        .json("POST", &format!("/api/runs/{queued_id}/cancel"), json!({}), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(c["dequeued"][0], queued_id.as_str());
    let (s, _) = web
        .json("POST", &format!("/api/runs/{run_id}/retry"), json!({}), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "a succeeded run is not retried");
    let (s, retried) = web
        .json("POST", &format!("/api/runs/{queued_id}/retry"), json!({}), None)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{retried}");
    let long_id = long["run"]["id"].as_str().unwrap().to_owned();
    web.wait_card(&long_id, |c| c["state"] == "running").await;
    web.json("POST", &format!("/api/runs/{long_id}/cancel"), json!({}), None)
        .await;
    let cancelled = web.wait_card(&long_id, |c| c["terminal"] == true).await;
    assert_eq!(cancelled["card"]["state"], "cancelled");
    let retried_id = retried["run"]["id"].as_str().unwrap().to_owned();
    let r = web.wait_card(&retried_id, |c| c["terminal"] == true).await;
    assert_eq!(r["card"]["state"], "succeeded", "{r}");

    let thread = web.get_json(&format!("/api/pipelines/{pipeline_id}")).await;
    assert_eq!(thread["runs"].as_array().unwrap().len(), 4);
    let list = web.get_json("/api/pipelines?surface=web").await;
    assert_eq!(list["pipelines"].as_array().unwrap().len(), 1);
    assert_eq!(
        web.get_json("/api/pipelines?surface=slack").await["pipelines"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let (_, metrics) = web.get("/metrics").await;
    for line in [
        "threadline_runs{state=\"succeeded\"} 2",
        "threadline_runs{state=\"cancelled\"} 2",
        "threadline_queue_depth 0",
        "threadline_run_duration_seconds_count 4",
        "threadline_container_starts_total 3",
        "# TYPE threadline_chat_api_errors_total counter",
    ] {
        assert!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
    }

    // A pipeline from a chat platform links to its thread on the dashboard.
    let binding = threadline::bots::chat::ChannelBinding {
        repos: vec!["demo".into()],
        ..Default::default()
    };
    let core = threadline::bots::chat::ChatCore::new(web.orch.clone(), "slack", [("C1".to_owned(), binding)].into());
    let outcome = core
        .on_message(threadline::bots::chat::Message {
            channel: "C1".into(),
            thread: None,
            id: "9.1".into(),
            sender: threadline::bots::chat::Sender {
                id: "U1".into(),
                ..Default::default()
            },
            text: "<@UBOT> true".into(),
            mentions_bot: true,
            link: Some("https://team.slack.com/archives/C1/p91".into()),
        })
        .await;
    assert!(
        matches!(outcome, threadline::bots::chat::Outcome::Queued { .. }),
        "{outcome:?}"
    );
    let slack = web.get_json("/api/pipelines?surface=slack").await;
    assert_eq!(
        slack["pipelines"][0]["pipeline"]["thread_url"],
        "https://team.slack.com/archives/C1/p91"
    );
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_other_sites_are_refused() {
    let mut env = TestEnv::new();
    let web = Web::new(&mut env, None).await;
    // A page elsewhere can post a form, but not JSON: nothing starts.
    let (s, _, _) = web
        .send(
            web.req("POST", "/api/pipelines")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from("repo=demo&prompt=rm"))
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // DNS rebinding: a foreign Host is refused when no token is set.
    let (s, _, _) = web
        .send(
            Request::builder()
                .uri("/api/pipelines")
                .header(header::HOST, "evil.example:8080")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(web.orch.store().pipelines(10).await.unwrap().is_empty());
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_a_token_is_required_and_checked() {
    let mut env = TestEnv::new();
    env.config.web.listen = "0.0.0.0:8080".into();
    let err = listen_addr(&env.config).unwrap_err().to_string();
    assert!(err.contains("web.token"), "{err}");
    env.config.web.listen = "127.0.0.1:8080".into();
    assert!(listen_addr(&env.config).is_ok(), "loopback needs no token");

    let web = Web::new(&mut env, Some("s3cret-web-token")).await;
    let bare = |uri: &str| {
        Request::builder()
            .uri(uri)
            .header(header::HOST, "box.lan:8080")
            .body(Body::empty())
            .unwrap()
    };
    let (s, _, _) = web.send(bare("/api/pipelines")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = web.send(bare("/metrics")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = web
        .send(
            Request::builder()
                .uri("/")
                .header(header::AUTHORIZATION, "Bearer wrong-token-xx")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, body) = web.send(bare("/healthz")).await;
    assert_eq!(s, StatusCode::OK, "health checks need no token: {body}");
    let (s, _, _) = web
        .send(
            Request::builder()
                .uri("/api/pipelines")
                .header(header::AUTHORIZATION, "Bearer s3cret-web-token")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // A browser opens a link with ?token= once, then carries a cookie.
    let (s, headers, _) = web.send(bare("/dashboard?token=s3cret-web-token")).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let cookie = headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("threadline_token="));
    let (s, _, body) = web
        .send(
            Request::builder()
                .uri("/dashboard")
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(!body.contains("s3cret-web-token"));
    // The token is never shown by the API.
    let (_, api) = web.get("/api/repos").await;
    assert!(!api.contains("s3cret-web-token"));
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_carries_cards_and_log_lines_live() {
    let mut env = TestEnv::new();
    let web = Web::new(&mut env, None).await;
    let res = web
        .app
        .clone()
        .oneshot(web.req("GET", "/api/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = res.into_body();
    let (_, started) = web
        .json(
            "POST",
            "/api/pipelines",
            json!({"repo": "demo", "prompt": "echo live-line"}),
            None,
        )
        .await;
    let run_id = started["run"]["id"].as_str().unwrap().to_owned();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !(seen.contains("live-line") && seen.contains("\"state\":\"succeeded\"")) {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("events arrive")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(seen.contains("event: card") && seen.contains("event: log"), "{seen}");
    assert!(seen.contains(&run_id));
    web.orch.shutdown().await;
}
