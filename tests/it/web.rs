//! The web chat, dashboard and API at the HTTP level: every route, the token rule, and
//! live updates, against a real orchestrator running real containers.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use threadline::bots::web::{WebState, listen_addr, router};
use threadline::config::Secret;
use threadline::model::RunState;
use threadline::orchestrator::Orchestrator;
use tower::ServiceExt;

use crate::harness::{TestEnv, one_channel};

const HOST: &str = "127.0.0.1:8080";

struct Web {
    app: axum::Router,
    orch: Orchestrator,
    token: Option<String>,
}

impl Web {
    async fn new(env: &mut TestEnv, token: Option<&str>) -> Web {
        Web::with(env, token, true).await
    }

    /// A web front end whose runs stay queued: nothing executes them.
    async fn unstarted(env: &mut TestEnv, token: Option<&str>) -> Web {
        Web::with(env, token, false).await
    }

    async fn with(env: &mut TestEnv, token: Option<&str>, started: bool) -> Web {
        env.add_demo_repo();
        if let Some(t) = token {
            env.config.web.token = Secret::new(t);
        }
        let orch = if started {
            env.orchestrator().await
        } else {
            env.orchestrator_unstarted().await
        };
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

    /// Sends `req` and returns the status and the JSON body, asserting that the body is
    /// JSON.
    async fn send_json(&self, req: Request<Body>) -> (StatusCode, Value) {
        let (s, headers, text) = self.send(req).await;
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "{s} came as {content_type:?}: {text}"
        );
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{s}: {e}: {text}"));
        (s, value)
    }

    async fn get_json(&self, uri: &str) -> Value {
        let (s, b) = self.get(uri).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {b}");
        serde_json::from_str(&b).unwrap()
    }

    /// How many pipelines `GET path` lists.
    async fn pipelines(&self, path: &str) -> Option<usize> {
        self.get_json(path).await["pipelines"].as_array().map(Vec::len)
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

/// A thread started from the web chat with `prompt`: (pipeline id, run id).
async fn web_thread(web: &Web, prompt: &str) -> (String, String) {
    let (s, started) = web
        .json(
            "POST",
            "/api/pipelines",
            json!({"repo": "demo", "prompt": prompt}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{started}");
    let id = |v: &Value| v["id"].as_str().unwrap().to_owned();
    (id(&started["pipeline"]), id(&started["run"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_and_the_api_index_are_served() {
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
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_starts_nothing() {
    let mut env = TestEnv::new();
    let web = Web::new(&mut env, None).await;
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
    assert_eq!(web.pipelines("/api/pipelines").await, Some(0));
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_thread_runs_once_and_ends_with_a_branch_link() {
    let mut env = TestEnv::new();
    let web = Web::new(&mut env, None).await;
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
    assert_eq!(web.pipelines("/api/pipelines?surface=web").await, Some(1));
    assert_eq!(web.pipelines("/api/pipelines?surface=slack").await, Some(0));
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_queue_cancel_and_retry_and_metrics_count_them() {
    let mut env = TestEnv::new();
    let web = Web::new(&mut env, None).await;
    let (pipeline_id, run_id) = web_thread(&web, "echo web > web.txt").await;
    web.wait_card(&run_id, |c| c["terminal"] == true).await;
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
    let stats = web.get_json("/api/stats?days=3").await;
    let days = stats["days"].as_array().unwrap();
    assert_eq!(days.len(), 3);
    let today = days.last().unwrap();
    assert_eq!(
        (today["succeeded"].as_i64(), today["cancelled"].as_i64()),
        (Some(2), Some(2)),
        "{stats}"
    );

    let (_, metrics) = web.get("/metrics").await;
    for line in [
        "threadline_runs{state=\"succeeded\"} 2",
        "threadline_runs{state=\"cancelled\"} 2",
        "threadline_queue_depth 0",
        "threadline_run_duration_seconds_count 4",
        "threadline_container_starts_total 3",
        "threadline_container_failures_total 0",
        "# TYPE threadline_run_duration_seconds histogram",
    ] {
        assert!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
    }
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_pipeline_links_to_its_thread_on_the_dashboard() {
    let mut env = TestEnv::new();
    let web = Web::new(&mut env, None).await;
    let core = threadline::bots::chat::ChatCore::new(web.orch.clone(), "slack", one_channel("C1", "demo", &[], &[]));
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
            attachments: Vec::new(),
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
    let set = headers[header::SET_COOKIE].to_str().unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_owned();
    assert!(cookie.starts_with("threadline_token="));
    let (s, _, body) = web
        .send(
            Request::builder()
                .uri("/dashboard")
                .header(header::COOKIE, format!("theme=dark; {cookie}"))
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

/// An `error` that is one of our sentences: lowercase, no final period.
fn assert_sentence(what: &str, error: &Value) {
    let text = error["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error sentence in {error}"));
    assert!(!text.is_empty(), "{what}: empty error");
    assert!(!text.starts_with(char::is_uppercase), "{what}: {text}");
    assert!(!text.ends_with('.'), "{what}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_from_other_sites_are_refused() {
    let mut env = TestEnv::new();
    let web = Web::unstarted(&mut env, None).await;
    let (s, started) = web
        .json(
            "POST",
            "/api/pipelines",
            json!({"repo": "demo", "prompt": "echo hi"}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{started}");
    let run_id = started["run"]["id"].as_str().unwrap().to_owned();
    let store = web.orch.store();
    let queued = || async { store.run(&run_id).await.unwrap().unwrap().state == RunState::Queued };

    // A form on another site posts to the loopback UI through the user's browser: cancel,
    // retry and open-pr take no body, so the content type does not stop it.
    for path in ["cancel", "retry", "open-pr"] {
        for (name, value) in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("origin", "http://127.0.0.1:9999"),
            ("origin", "http://127.0.0.1"),
            ("sec-fetch-site", "cross-site"),
        ] {
            let (s, e) = web
                .send_json(
                    web.req("POST", &format!("/api/runs/{run_id}/{path}"))
                        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .header(name, value)
                        .body(Body::from("x=1"))
                        .unwrap(),
                )
                .await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{path} with {name}: {value}: {e}");
            assert!(e["error"].as_str().unwrap().contains("another site"), "{e}");
            assert_sentence(path, &e);
        }
    }
    let (s, e) = web
        .send_json(
            web.req("POST", "/api/pipelines")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ORIGIN, "http://evil.example")
                .body(Body::from(json!({"repo": "demo", "prompt": "rm -rf ."}).to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    assert!(queued().await, "the run was left alone");
    assert_eq!(store.pipelines(10).await.unwrap().len(), 1, "nothing started");

    // Reading is no change: a foreign Origin may GET (the browser keeps the answer from it).
    let (s, _, _) = web
        .send(
            web.req("GET", &format!("/api/runs/{run_id}"))
                .header(header::ORIGIN, "http://evil.example")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // Threadline's own pages (any case of the host name) and clients without the headers
    // (curl, scripts) change things.
    let (s, done) = web
        .send_json(
            Request::builder()
                .method("POST")
                .uri(format!("/api/runs/{run_id}/cancel"))
                .header(header::HOST, "localhost:8080")
                .header(header::ORIGIN, "http://LocalHost:8080")
                .header("sec-fetch-site", "same-origin")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{done}");
    assert_eq!(done["dequeued"][0], run_id.as_str());
    let (s, retried) = web
        .json("POST", &format!("/api/runs/{run_id}/retry"), json!({}), None)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{retried}");
    web.orch.shutdown().await;

    // With a token the rule is the same: a valid token does not make another site's
    // request the user's own.
    let mut env = TestEnv::new();
    let web = Web::unstarted(&mut env, Some("s3cret-web-token")).await;
    let start = |origin: Option<&str>| {
        let mut b = web
            .req("POST", "/api/pipelines")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        b.body(Body::from(json!({"repo": "demo", "prompt": "echo hi"}).to_string()))
            .unwrap()
    };
    let (s, e) = web.send_json(start(Some("http://evil.example"))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let (s, e) = web.send_json(start(Some("http://127.0.0.1:8080"))).await;
    assert_eq!(s, StatusCode::CREATED, "{e}");
    let (s, e) = web.send_json(start(None)).await;
    assert_eq!(s, StatusCode::CREATED, "{e}");
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_ids_list_their_candidates_and_match_literally() {
    let mut env = TestEnv::new();
    let web = Web::unstarted(&mut env, None).await;
    let store = web.orch.store();
    for id in ["dd01aaaa", "dd02bbbb", "ee03cccc"] {
        let run = crate::harness::new_run("echo hi", None);
        store
            .insert_pipeline(&crate::harness::pipeline_on(id, &env.origin_url()), &run)
            .await
            .unwrap();
    }

    for (method, uri) in [
        ("GET", "/api/pipelines/dd"),
        ("GET", "/api/runs/dd"),
        ("POST", "/api/runs/dd/cancel"),
        ("POST", "/api/runs/dd/retry"),
        ("POST", "/api/pipelines/dd/runs"),
    ] {
        let (s, e) = web
            .send_json(
                web.req(method, uri)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(json!({"prompt": "echo more"}).to_string()))
                    .unwrap(),
            )
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{method} {uri}: {e}");
        assert_eq!(e["candidates"], json!(["dd01aaaa", "dd02bbbb"]), "{uri}");
        let text = e["error"].as_str().unwrap();
        assert!(
            text.contains("ambiguous") && text.contains("dd01aaaa, dd02bbbb") && text.contains("more of the id"),
            "{text}"
        );
        assert_sentence(uri, &e);
    }
    assert_eq!(web.get_json("/api/pipelines/dd01").await["pipeline"]["id"], "dd01aaaa");

    // Ids match literally: no wildcards, and case matters.
    for id in ["%25", "d%25", "e_", "_e03cccc", "EE03", "dd\\"] {
        let (s, e) = web
            .send_json(
                web.req("GET", &format!("/api/pipelines/{id}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{id}: {e}");
        let (s, e) = web
            .send_json(
                web.req("POST", &format!("/api/runs/{id}/cancel"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{id}: {e}");
    }
    for id in ["dd01aaaa", "dd02bbbb", "ee03cccc"] {
        let run = store.run(&format!("{id}-1")).await.unwrap().unwrap();
        assert_eq!(run.state, RunState::Queued, "{id} was not cancelled by a pattern");
    }
    web.orch.shutdown().await;

    // The CLI says the same in a sentence.
    let config = crate::harness::write_cli_config(&env, "");
    let out = crate::harness::cli(&config, &["runs", "dd"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "error: pipeline id \"dd\" is ambiguous: it matches dd01aaaa, dd02bbbb; give more of the id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_with_control_characters_are_refused() {
    let mut env = TestEnv::new();
    let web = Web::unstarted(&mut env, None).await;
    for (prompt, code) in [
        ("echo a\u{0}b", "U+0000"),
        ("printf '\u{1b}[2J'", "U+001B"),
        ("echo \u{7f}", "U+007F"),
        ("echo \u{9b}31m", "U+009B"),
    ] {
        let (s, e) = web
            .json(
                "POST",
                "/api/pipelines",
                json!({"repo": "demo", "prompt": prompt}),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{prompt:?}: {e}");
        let text = e["error"].as_str().unwrap();
        assert!(text.contains(code) && text.contains("remove it"), "{text}");
        assert_sentence(prompt, &e);
    }
    assert!(web.orch.store().pipelines(10).await.unwrap().is_empty());

    // Tabs and line breaks are text.
    let (s, started) = web
        .json(
            "POST",
            "/api/pipelines",
            json!({"repo": "demo", "prompt": "echo a\tb\r\necho c"}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{started}");
    let pipeline_id = started["pipeline"]["id"].as_str().unwrap().to_owned();
    let (s, e) = web
        .json(
            "POST",
            &format!("/api/pipelines/{pipeline_id}/runs"),
            json!({"prompt": "echo \u{0}"}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(web.orch.store().runs(&pipeline_id).await.unwrap().len(), 1);
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_error_is_a_json_sentence() {
    let mut env = TestEnv::new();
    let web = Web::unstarted(&mut env, None).await;
    let post = |content_type: &str, body: Vec<u8>| {
        web.req("POST", "/api/pipelines")
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap()
    };
    let json = "application/json";
    let cases = [
        (
            "bad JSON",
            post(json, b"{\"repo\": \"demo\",".to_vec()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "bad UTF-8",
            post(json, b"{\"repo\": \"demo\", \"prompt\": \"\xff\xfe\"}".to_vec()),
            StatusCode::BAD_REQUEST,
        ),
        (
            "wrong content type",
            post("text/plain", b"{}".to_vec()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "no content type",
            web.req("POST", "/api/pipelines").body(Body::from("{}")).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "wrong fields",
            post(json, b"{\"repo\": 1}".to_vec()),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "too large",
            post(
                json,
                format!("{{\"repo\": \"demo\", \"prompt\": \"{}\"}}", "x".repeat(48 << 20)).into_bytes(),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "bad query",
            web.req("GET", "/api/pipelines?limit=many").body(Body::empty()).unwrap(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "wrong method",
            web.req("DELETE", "/api/pipelines").body(Body::empty()).unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "no such endpoint",
            web.req("GET", "/api/nope").body(Body::empty()).unwrap(),
            StatusCode::NOT_FOUND,
        ),
        (
            "foreign Host",
            Request::builder()
                .uri("/api/pipelines")
                .header(header::HOST, "evil.example:8080")
                .body(Body::empty())
                .unwrap(),
            StatusCode::FORBIDDEN,
        ),
    ];
    for (what, req, status) in cases {
        let (s, e) = web.send_json(req).await;
        assert_eq!(s, status, "{what}: {e}");
        assert_sentence(what, &e);
    }
    let (s, e) = web.json("POST", "/api/pipelines", json!({"repo": 1}), None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(e["error"].as_str().unwrap().contains("repo"), "names the field: {e}");
    assert!(web.orch.store().pipelines(10).await.unwrap().is_empty());
    // Pages are not the API: they keep their plain text.
    let (s, _, body) = web
        .send(
            Request::builder()
                .uri("/")
                .header(header::HOST, "evil.example:8080")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(!body.starts_with('{'), "{body}");
    web.orch.shutdown().await;

    // Without the token, the API answers in JSON too.
    let mut env = TestEnv::new();
    let web = Web::unstarted(&mut env, Some("s3cret-web-token")).await;
    let (s, e) = web
        .send_json(
            Request::builder()
                .uri("/api/pipelines")
                .header(header::HOST, HOST)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    assert!(e["error"].as_str().unwrap().contains("Authorization: Bearer"), "{e}");
    assert_sentence("no token", &e);
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_and_the_auth_scheme_are_case_insensitive() {
    let mut env = TestEnv::new();
    let web = Web::unstarted(&mut env, None).await;
    let with_host = |host: &str| {
        Request::builder()
            .uri("/api/pipelines")
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap()
    };
    for host in ["LOCALHOST:8080", "LocalHost", "localhost:8080", "127.0.0.1:8080"] {
        assert_eq!(web.send(with_host(host)).await.0, StatusCode::OK, "{host}");
    }
    for host in ["evil.example:8080", "localhost.evil.example:8080", ""] {
        assert_eq!(web.send(with_host(host)).await.0, StatusCode::FORBIDDEN, "{host:?}");
    }
    web.orch.shutdown().await;

    let mut env = TestEnv::new();
    let web = Web::unstarted(&mut env, Some("s3cret-web-token")).await;
    let with_auth = |value: &str| {
        Request::builder()
            .uri("/api/pipelines")
            .header(header::AUTHORIZATION, value)
            .body(Body::empty())
            .unwrap()
    };
    for value in [
        "bearer s3cret-web-token",
        "BEARER s3cret-web-token",
        "Bearer  s3cret-web-token",
    ] {
        assert_eq!(web.send(with_auth(value)).await.0, StatusCode::OK, "{value}");
    }
    for value in [
        "bearer s3cret-web-tokeN",
        "bearer s3cret-web-toke",
        "Basic s3cret-web-token",
        "bearers3cret-web-token",
        "s3cret-web-token",
    ] {
        assert_eq!(web.send(with_auth(value)).await.0, StatusCode::UNAUTHORIZED, "{value}");
    }
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_from_the_web_chat_is_answered_read_only() {
    let mut env = TestEnv::new();
    let web = Web::new(&mut env, None).await;
    let (_, run_id) = web_thread(&web, "? echo 'the answer is 42'").await;
    let done = web.wait_card(&run_id, |c| c["terminal"] == true).await;
    assert_eq!(done["run"]["mode"], "ask", "{done}");
    assert_eq!(done["card"]["headline"], "answered", "{done}");
    assert_eq!(
        done["card"]["summary"], "the answer is 42",
        "the web chat shows the answer: {done}"
    );
    assert_eq!(
        done["run"]["prompt"], "echo 'the answer is 42'",
        "the prefix is not part of the prompt"
    );
    let (s, explicit) = web
        .json(
            "POST",
            "/api/pipelines",
            json!({"repo": "demo", "prompt": "?literal question mark", "mode": "change"}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{explicit}");
    assert_eq!(
        explicit["run"]["mode"], "change",
        "an explicit mode wins over the prefix"
    );
    web.orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_sent_with_a_prompt_reach_the_agent_and_bad_ones_are_refused() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut env = TestEnv::new();
    let web = Web::new(&mut env, None).await;
    let (s, started) = web
        .json(
            "POST",
            "/api/pipelines",
            json!({"repo": "demo", "prompt": "cp /threadline/attachments/notes.txt got.txt && ls /threadline/attachments > names.txt",
                   "attachments": [{"name": "../notes.txt", "content_base64": b64("hello attachment\n")},
                                   {"name": "notes.txt", "content_base64": b64("second\n")}]}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{started}");
    let run_id = started["run"]["id"].as_str().unwrap().to_owned();
    let done = web.wait_card(&run_id, |c| c["terminal"] == true).await;
    assert_eq!(done["card"]["state"], "succeeded", "{done}");
    let branch = done["pipeline"]["branch"].as_str().unwrap();
    assert_eq!(
        env.origin_file(branch, "got.txt").as_deref(),
        Some("hello attachment\n")
    );
    assert_eq!(
        env.origin_file(branch, "names.txt").as_deref(),
        Some("2-notes.txt\nnotes.txt\n"),
        "names made safe and unique"
    );
    let (s, e) = web
        .json(
            "POST",
            "/api/pipelines",
            json!({"repo": "demo", "prompt": "x", "attachments": [{"name": "a", "content_base64": "%%%"}]}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(e["error"].as_str().unwrap().contains("not valid base64"), "{e}");
    let many: Vec<Value> = (0..21)
        .map(|i| json!({"name": format!("f{i}"), "content_base64": ""}))
        .collect();
    let (s, e) = web
        .json(
            "POST",
            "/api/pipelines",
            json!({"repo": "demo", "prompt": "x", "attachments": many}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(e["error"].as_str().unwrap().contains("more than the 20"), "{e}");
    assert_eq!(
        web.pipelines("/api/pipelines").await,
        Some(1),
        "bad attachments started nothing"
    );
    web.orch.shutdown().await;
}
