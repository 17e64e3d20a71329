//! A wire-level fake of Slack on 127.0.0.1: the Web API methods the bot calls,
//! `apps.connections.open`, and the Socket Mode websocket. It answers with the shapes of
//! Slack's Web API spec (`shared/api-specs`: required fields of each response, required
//! parameters of each request) and records every call for tests to assert on.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::broadcast;

#[derive(Default)]
pub struct Recorded {
    /// (method, request body as JSON)
    pub calls: Vec<(String, Value)>,
    /// Envelope ids the client acknowledged.
    pub acks: Vec<String>,
    next_ts: u64,
    /// chat.update answers 429 this many more times.
    pub rate_limit_updates: u32,
    /// User groups (subteams) and their members, for usergroups.users.list.
    pub usergroups: std::collections::BTreeMap<String, Vec<String>>,
    /// Files fetched from `/files/{name}`, with the Authorization header sent.
    pub file_requests: Vec<(String, Option<String>)>,
}

#[derive(Clone)]
pub struct FakeSlack {
    pub api_url: String,
    pub recorded: Arc<Mutex<Recorded>>,
    envelopes: broadcast::Sender<String>,
}

#[derive(Clone)]
struct AppState {
    fake: FakeSlack,
    ws_url: String,
}

impl FakeSlack {
    pub async fn start() -> FakeSlack {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = FakeSlack {
            api_url: format!("http://{addr}/api/"),
            recorded: Arc::default(),
            envelopes: broadcast::channel(64).0,
        };
        let state = AppState {
            fake: fake.clone(),
            ws_url: format!("ws://{addr}/ws"),
        };
        let app = Router::new()
            .route("/api/{method}", post(api).get(api))
            .route("/ws", get(ws))
            .route("/files/{name}", get(file))
            .fallback(|uri: axum::http::Uri| async move {
                eprintln!("fake Slack: no route for {uri}");
                StatusCode::NOT_FOUND
            })
            .with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    /// Sends an Events API envelope over Socket Mode, as Slack does, and returns its id.
    pub fn push_event(&self, event_id: &str, event: Value) -> String {
        let envelope_id = format!("env-{event_id}-{}", uuid_like());
        let envelope = json!({
            "envelope_id": envelope_id,
            "type": "events_api",
            "accepts_response_payload": false,
            "retry_attempt": 0,
            "retry_reason": "",
            "payload": {
                "token": "verification-token",
                "team_id": "T1",
                "api_app_id": "A1",
                "event": event,
                "type": "event_callback",
                "event_id": event_id,
                "event_time": 1_700_000_000
            }
        });
        let _ = self.envelopes.send(envelope.to_string());
        envelope_id
    }

    /// Sends a button click (block_actions) over Socket Mode.
    /// A click on a button of the message `message_ts` in the thread `thread_ts`, as
    /// Slack sends `block_actions` (the message, with its thread, included).
    pub fn click(
        &self,
        user: &str,
        channel: &str,
        message_ts: &str,
        thread_ts: &str,
        action_id: &str,
        value: &str,
    ) -> String {
        let envelope_id = format!("env-click-{}", uuid_like());
        let envelope = json!({
            "envelope_id": envelope_id,
            "type": "interactive",
            "accepts_response_payload": false,
            "payload": {
                "type": "block_actions",
                "team": {"id": "T1", "domain": "fake"},
                "user": {"id": user, "username": user, "team_id": "T1"},
                "api_app_id": "A1",
                "token": "verification-token",
                "container": {"type": "message", "message_ts": message_ts, "channel_id": channel, "is_ephemeral": false},
                "trigger_id": format!("trigger-{}", uuid_like()),
                "channel": {"id": channel, "name": "dev"},
                "message": {"type": "message", "ts": message_ts, "thread_ts": thread_ts, "text": "status",
                            "bot_id": "B0BOT", "user": "UBOT"},
                "actions": [{"type": "button", "action_id": action_id, "block_id": "b1", "value": value,
                             "text": {"type": "plain_text", "text": "x"}, "action_ts": "1700000000.000001"}]
            }
        });
        let _ = self.envelopes.send(envelope.to_string());
        envelope_id
    }

    pub fn calls(&self, method: &str) -> Vec<Value> {
        let r = self.recorded.lock().unwrap();
        r.calls
            .iter()
            .filter(|(m, _)| m == method)
            .map(|(_, b)| b.clone())
            .collect()
    }

    pub fn acked(&self, envelope_id: &str) -> bool {
        self.recorded.lock().unwrap().acks.iter().any(|a| a == envelope_id)
    }

    /// Whether a Socket Mode websocket is open and receives envelopes.
    pub fn listening(&self) -> bool {
        self.envelopes.receiver_count() > 0
    }

    /// Waits until `check` holds on the recorded calls.
    pub async fn wait_until(&self, what: &str, check: impl Fn(&FakeSlack) -> bool) {
        let seen = || {
            let calls: Vec<String> = self
                .recorded
                .lock()
                .unwrap()
                .calls
                .iter()
                .map(|(m, b)| format!("{m} {b}"))
                .collect();
            format!("{calls:#?}")
        };
        crate::harness::poll_until(what, || check(self), seen).await;
    }
}

/// A file as Slack serves `url_private_download`: only with the bot token.
async fn file(
    State(state): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let ok = auth.as_deref() == Some("Bearer xoxb-test-token");
    state
        .fake
        .recorded
        .lock()
        .unwrap()
        .file_requests
        .push((name.clone(), auth));
    if ok {
        format!("file {name} from slack\n").into_response()
    } else {
        StatusCode::FORBIDDEN.into_response()
    }
}

impl FakeSlack {
    /// The URL Slack would give a file of this name.
    pub fn file_url(&self, name: &str) -> String {
        format!("{}files/{name}", self.api_url.trim_end_matches("api/"))
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}", N.fetch_add(1, Ordering::Relaxed))
}

async fn api(
    State(state): State<AppState>,
    Path(method): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    let wanted = if method == "apps.connections.open" {
        "Bearer xapp-"
    } else {
        "Bearer xoxb-"
    };
    if !auth.starts_with(wanted) {
        return axum::Json(json!({"ok": false, "error": "not_authed"})).into_response();
    }
    // A JSON body, a form body, or (for GET methods) the query string.
    let parsed: Value = serde_json::from_str(&body).unwrap_or_else(|_| {
        let form = if body.is_empty() {
            uri.query().unwrap_or("")
        } else {
            &body
        };
        let form: Vec<(String, String)> = serde_urlencoded_pairs(form);
        Value::Object(form.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
    });
    // The parameters the Web API spec marks required (shared/api-specs/slack-web-openapi-v2.json).
    let required: &[&str] = match method.as_str() {
        "chat.postMessage" => &["channel"],
        "chat.update" => &["channel", "ts"],
        "chat.postEphemeral" => &["channel", "user"],
        "reactions.add" => &["channel", "name", "timestamp"],
        "usergroups.users.list" => &["usergroup"],
        _ => &[],
    };
    if let Some(missing) = required.iter().find(|k| parsed[**k].as_str().is_none_or(str::is_empty)) {
        return axum::Json(json!({"ok": false, "error": "invalid_arguments", "missing": missing})).into_response();
    }
    let mut r = state.fake.recorded.lock().unwrap();
    r.calls.push((method.clone(), parsed.clone()));
    let channel = parsed["channel"].as_str().unwrap_or("C0").to_owned();
    let answer = match method.as_str() {
        "auth.test" => json!({"ok": true, "url": "https://fake.slack.com/", "team": "Fake", "user": "threadline",
                              "team_id": "T1", "user_id": "UBOT", "bot_id": "B1"}),
        "apps.connections.open" => json!({"ok": true, "url": state.ws_url}),
        "chat.postMessage" => {
            r.next_ts += 1;
            let ts = format!("1700000100.{:06}", r.next_ts);
            json!({"ok": true, "channel": channel, "ts": ts,
                   "message": {"type": "message", "text": parsed["text"], "ts": ts, "user": "UBOT", "bot_id": "B1"}})
        }
        "chat.update" => {
            if r.rate_limit_updates > 0 {
                r.rate_limit_updates -= 1;
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "1")],
                    axum::Json(json!({"ok": false, "error": "ratelimited"})),
                )
                    .into_response();
            }
            json!({"ok": true, "channel": channel, "ts": parsed["ts"], "text": parsed["text"],
                   "message": {"text": parsed["text"]}})
        }
        "chat.postEphemeral" => json!({"ok": true, "message_ts": "1700000200.000001"}),
        "reactions.add" => json!({"ok": true}),
        "usergroups.users.list" => match r.usergroups.get(parsed["usergroup"].as_str().unwrap_or("")) {
            Some(users) => json!({"ok": true, "users": users}),
            None => json!({"ok": false, "error": "no_such_subteam"}),
        },
        _ => json!({"ok": false, "error": "unknown_method"}),
    };
    axum::Json(answer).into_response()
}

fn serde_urlencoded_pairs(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace('+', " ")))
        .collect()
}

async fn ws(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| session(socket, state.fake))
}

async fn session(mut socket: WebSocket, fake: FakeSlack) {
    let hello = json!({"type": "hello", "num_connections": 1,
                       "debug_info": {"host": "fake", "approximate_connection_time": 3600},
                       "connection_info": {"app_id": "A1"}});
    if socket.send(WsMessage::Text(hello.to_string().into())).await.is_err() {
        return;
    }
    let mut envelopes = fake.envelopes.subscribe();
    loop {
        tokio::select! {
            env = envelopes.recv() => match env {
                Ok(text) => if socket.send(WsMessage::Text(text.into())).await.is_err() { return },
                Err(_) => return,
            },
            msg = socket.recv() => match msg {
                Some(Ok(WsMessage::Text(text))) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&text)
                        && let Some(id) = v["envelope_id"].as_str()
                    {
                        fake.recorded.lock().unwrap().acks.push(id.to_owned());
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
}
