//! A wire-level fake of Discord on 127.0.0.1: the gateway (Hello, Identify → READY,
//! heartbeats, Resume, dispatches pushed by tests, a forced drop) and the REST routes the
//! bot calls, answering with the required fields of `shared/api-specs/discord-openapi.json`
//! (MessageResponse, ThreadResponse with 201, 204 for interaction callbacks) and recording
//! what they received.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub const GUILD: &str = "1000";
pub const BOT: &str = "900";

#[derive(Default)]
pub struct Recorded {
    /// (method, path, body)
    pub calls: Vec<(String, String, Value)>,
    /// thread id → parent channel id
    pub threads: HashMap<String, String>,
    next_id: u64,
    pub identifies: u32,
    pub resumes: u32,
    /// PATCHes of messages answered 429 this many more times.
    pub rate_limit_edits: u32,
}

#[derive(Clone)]
pub struct FakeDiscord {
    pub base: String,
    pub recorded: Arc<Mutex<Recorded>>,
    dispatches: broadcast::Sender<Value>,
}

impl FakeDiscord {
    pub async fn start() -> FakeDiscord {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = FakeDiscord {
            base: format!("http://{addr}"),
            recorded: Arc::default(),
            dispatches: broadcast::channel(64).0,
        };
        let app = Router::new()
            .route("/api/v10/gateway", get(gateway_url))
            .route("/gateway", get(ws))
            .route("/api/v10/channels/{channel}", get(get_channel))
            .route("/api/v10/channels/{channel}/messages", post(create_message))
            .route(
                "/api/v10/channels/{channel}/messages/{message}",
                axum::routing::patch(edit_message),
            )
            .route(
                "/api/v10/channels/{channel}/messages/{message}/threads",
                post(create_thread),
            )
            .route(
                "/api/v10/interactions/{id}/{token}/callback",
                post(interaction_callback),
            )
            .route("/attachments/{name}", get(attachment))
            .fallback(|method: Method, uri: axum::http::Uri| async move {
                eprintln!("fake Discord: no route for {method} {uri}");
                StatusCode::NOT_FOUND
            })
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    /// Sends a gateway dispatch (op 0) to every connected client.
    pub fn dispatch(&self, t: &str, d: Value) {
        let _ = self.dispatches.send(json!({"t": t, "d": d}));
    }

    /// Closes every gateway connection, as a network drop would.
    pub fn drop_connections(&self) {
        let _ = self.dispatches.send(json!({"drop": true}));
    }

    pub fn calls(&self, method: &str, path_contains: &str) -> Vec<(String, Value)> {
        let r = self.recorded.lock().unwrap();
        r.calls
            .iter()
            .filter(|(m, p, _)| m == method && p.contains(path_contains))
            .map(|(_, p, b)| (p.clone(), b.clone()))
            .collect()
    }

    pub async fn wait_until(&self, what: &str, check: impl Fn(&FakeDiscord) -> bool) {
        let seen = || {
            let calls: Vec<String> = self
                .recorded
                .lock()
                .unwrap()
                .calls
                .iter()
                .map(|(m, p, b)| format!("{m} {p} {b}"))
                .collect();
            format!("{calls:#?}")
        };
        crate::harness::poll_until(what, || check(self), seen).await;
    }

    fn record(&self, method: &str, path: String, body: &Value) -> u64 {
        let mut r = self.recorded.lock().unwrap();
        r.calls.push((method.to_owned(), path, body.clone()));
        r.next_id += 1;
        5_000 + r.next_id
    }
}

/// An attachment as Discord's CDN serves it (no credentials); records the Authorization
/// header it was sent, which must be none.
async fn attachment(
    State(fake): State<FakeDiscord>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
) -> String {
    let auth = headers
        .get("authorization")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    fake.record("GET", format!("/attachments/{name}"), &json!({ "authorization": auth }));
    format!("attachment {name} from discord\n")
}

/// A message like [`message`] with files attached, as the gateway delivers them.
pub fn message_with_files(id: &str, channel: &str, author: &str, content: &str, base: &str, files: &[&str]) -> Value {
    let mut m = message(id, channel, author, &[], content, true);
    m["attachments"] = files
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let url = format!("{base}/attachments/{name}");
            json!({"id": format!("77{i}"), "filename": name, "size": 64, "url": url, "proxy_url": url,
                   "content_type": "text/plain"})
        })
        .collect();
    m
}

pub fn user(id: &str, bot: bool) -> Value {
    json!({"id": id, "username": format!("user{id}"), "discriminator": "0", "global_name": null,
           "avatar": null, "bot": bot, "public_flags": 0})
}

/// A guild text message as the gateway delivers it in MESSAGE_CREATE.
pub fn message(id: &str, channel: &str, author: &str, roles: &[&str], content: &str, mentions_bot: bool) -> Value {
    json!({
        "id": id, "channel_id": channel, "guild_id": GUILD,
        "author": user(author, false),
        "member": {"roles": roles, "joined_at": "2024-01-01T00:00:00.000000+00:00", "deaf": false, "mute": false,
                   "flags": 0, "pending": false, "premium_since": null, "nick": null, "avatar": null},
        "content": content, "timestamp": "2026-11-24T10:00:00.000000+00:00", "edited_timestamp": null,
        "tts": false, "mention_everyone": false,
        "mentions": if mentions_bot { json!([user(BOT, true)]) } else { json!([]) },
        "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0, "flags": 0,
        "components": [], "nonce": id
    })
}

/// A button click (a component interaction) on `message_id` in `channel`.
pub fn click(id: &str, channel: &str, message_id: &str, clicker: &str, roles: &[&str], custom_id: &str) -> Value {
    json!({
        "id": id, "application_id": "901", "type": 3, "version": 1, "token": format!("tok-{id}"),
        "data": {"custom_id": custom_id, "component_type": 2},
        "guild_id": GUILD, "channel_id": channel,
        "member": {"user": user(clicker, false), "roles": roles, "joined_at": "2024-01-01T00:00:00.000000+00:00",
                   "deaf": false, "mute": false, "flags": 0, "pending": false, "permissions": "0",
                   "premium_since": null, "nick": null, "avatar": null},
        "message": message(message_id, channel, BOT, &[], "", false),
        "app_permissions": "0", "locale": "en-US", "guild_locale": "en-US", "entitlements": [],
        "authorizing_integration_owners": {}, "context": 0, "attachment_size_limit": 10_485_760
    })
}

/// The MessageResponse Discord returns for a message the bot sent or edited.
fn sent_message(id: &str, channel: &str, body: &Value) -> Value {
    let mut m = message(id, channel, BOT, &[], body["content"].as_str().unwrap_or(""), false);
    m["author"]["bot"] = json!(true);
    m["embeds"] = body.get("embeds").cloned().unwrap_or(json!([]));
    m["components"] = body.get("components").cloned().unwrap_or(json!([]));
    m
}

async fn gateway_url(State(fake): State<FakeDiscord>) -> axum::Json<Value> {
    axum::Json(json!({"url": format!("{}/gateway", fake.base.replace("http://", "ws://"))}))
}

async fn ws(State(fake): State<FakeDiscord>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| session(socket, fake))
}

async fn send(socket: &mut WebSocket, v: Value) -> bool {
    socket.send(WsMessage::Text(v.to_string().into())).await.is_ok()
}

async fn session(mut socket: WebSocket, fake: FakeDiscord) {
    if !send(
        &mut socket,
        json!({"op": 10, "d": {"heartbeat_interval": 1000}, "s": null, "t": null}),
    )
    .await
    {
        return;
    }
    let mut dispatches = fake.dispatches.subscribe();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            d = dispatches.recv() => {
                let Ok(d) = d else { return };
                if d.get("drop").is_some() {
                    let _ = socket.send(WsMessage::Close(None)).await;
                    return;
                }
                seq += 1;
                if !send(&mut socket, json!({"op": 0, "s": seq, "t": d["t"], "d": d["d"]})).await { return }
            }
            msg = socket.recv() => {
                let Some(Ok(WsMessage::Text(text))) = msg else {
                    if matches!(msg, Some(Ok(_))) { continue } else { return }
                };
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                match v["op"].as_u64() {
                    Some(1) if !send(&mut socket, json!({"op": 11, "d": null, "s": null, "t": null})).await => return,
                    Some(1) => {}
                    Some(2) => {
                        fake.recorded.lock().unwrap().identifies += 1;
                        seq += 1;
                        let ready = json!({
                            "v": 10, "user": {"id": BOT, "username": "threadline", "discriminator": "0", "global_name": null,
                                              "avatar": null, "bot": true, "flags": 0, "mfa_enabled": true, "verified": true},
                            "guilds": [{"id": GUILD, "unavailable": true}], "session_id": "session-1",
                            "resume_gateway_url": format!("{}/gateway", fake.base.replace("http://", "ws://")),
                            "shard": [0, 1], "application": {"id": "901", "flags": 0},
                            "private_channels": [], "presences": [], "_trace": ["fake"]
                        });
                        if !send(&mut socket, json!({"op": 0, "s": seq, "t": "READY", "d": ready})).await { return }
                    }
                    Some(6) => {
                        fake.recorded.lock().unwrap().resumes += 1;
                        seq = v["d"]["seq"].as_u64().unwrap_or(seq) + 1;
                        if !send(&mut socket, json!({"op": 0, "s": seq, "t": "RESUMED", "d": {"_trace": ["fake"]}})).await { return }
                    }
                    _ => {}
                }
            }
        }
    }
}

async fn get_channel(State(fake): State<FakeDiscord>, Path(channel): Path<String>) -> axum::Json<Value> {
    fake.record("GET", format!("/channels/{channel}"), &Value::Null);
    let parent = fake.recorded.lock().unwrap().threads.get(&channel).cloned();
    axum::Json(match parent {
        Some(parent) => json!({"id": channel, "type": 11, "guild_id": GUILD, "parent_id": parent, "name": "thread"}),
        None => json!({"id": channel, "type": 0, "guild_id": GUILD, "name": "general", "position": 0}),
    })
}

async fn create_thread(
    State(fake): State<FakeDiscord>,
    Path((channel, message)): Path<(String, String)>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if body["name"].as_str().is_none_or(str::is_empty) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"code": 50035, "message": "Invalid Form Body"})),
        )
            .into_response();
    }
    fake.record("POST", format!("/channels/{channel}/messages/{message}/threads"), &body);
    fake.recorded
        .lock()
        .unwrap()
        .threads
        .insert(message.clone(), channel.clone());
    // A thread started from a message has that message's id (201, a ThreadResponse).
    let thread = json!({
        "id": message, "type": 11, "flags": 0, "guild_id": GUILD, "parent_id": channel, "name": body["name"],
        "owner_id": BOT, "message_count": 0, "member_count": 1, "total_message_sent": 0,
        "thread_metadata": {"archived": false, "auto_archive_duration": body["auto_archive_duration"].as_u64().unwrap_or(1440),
                            "archive_timestamp": "2026-11-24T10:00:00.000000+00:00", "locked": false}
    });
    // Discord also tells the gateway about the new thread.
    let mut event = thread.clone();
    event["newly_created"] = json!(true);
    fake.dispatch("THREAD_CREATE", event);
    (StatusCode::CREATED, axum::Json(thread)).into_response()
}

async fn create_message(
    State(fake): State<FakeDiscord>,
    Path(channel): Path<String>,
    axum::Json(body): axum::Json<Value>,
) -> axum::Json<Value> {
    let id = fake.record("POST", format!("/channels/{channel}/messages"), &body);
    axum::Json(sent_message(&id.to_string(), &channel, &body))
}

async fn edit_message(
    State(fake): State<FakeDiscord>,
    Path((channel, message)): Path<(String, String)>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    {
        let mut r = fake.recorded.lock().unwrap();
        if r.rate_limit_edits > 0 {
            r.rate_limit_edits -= 1;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                axum::Json(json!({"message": "You are being rate limited.", "retry_after": 0.4, "global": false})),
            )
                .into_response();
        }
    }
    fake.record("PATCH", format!("/channels/{channel}/messages/{message}"), &body);
    axum::Json(sent_message(&message, &channel, &body)).into_response()
}

async fn interaction_callback(
    State(fake): State<FakeDiscord>,
    Path((id, token)): Path<(String, String)>,
    axum::Json(body): axum::Json<Value>,
) -> StatusCode {
    fake.record("POST", format!("/interactions/{id}/{token}/callback"), &body);
    StatusCode::NO_CONTENT
}
