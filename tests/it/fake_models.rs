//! Wire-level fakes of the model APIs the real agent CLIs call, for tests that run the
//! agent images built from `docker/` (see `tests/agent-images/build.sh` and `NOTES.md`):
//!
//! - [`FakeAnthropic`]: the Anthropic Messages API as Claude Code uses it. `POST
//!   /v1/messages` (streaming answers are Server-Sent Events in the order Anthropic's docs
//!   give: `message_start` with usage, `content_block_start`/`_delta`/`_stop` for text and
//!   for `tool_use` with `input_json_delta`, `message_delta` with the stop reason and output
//!   tokens, `message_stop`), `POST /v1/messages/count_tokens`, and `HEAD /api/hello` (the
//!   connectivity check Claude Code makes at start).
//! - [`FakeOpenAi`]: `POST /v1/chat/completions` as aider (through litellm) uses it,
//!   streamed (`chat.completion.chunk` events, usage in the last chunk, `[DONE]`) or not.
//!
//! Both follow a [`Script`] and record every request, so a test can assert what a request
//! carried (a follow-up's first request holding the earlier conversation, say).
//!
//! For a container to reach a fake and nothing else: [`TestNetwork`] (a Docker network
//! created `--internal`, whose gateway is the host's address on it) and a fake bound on that
//! gateway. To see what else an agent tries to reach: [`DnsLogger`] (give the container
//! `--dns <gateway>`; Docker's embedded resolver forwards every outside name to it, even on
//! an internal network) and [`RecordingProxy`] (give it `HTTP_PROXY`/`HTTPS_PROXY`).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request a fake received.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub method: String,
    /// With the query string (Claude Code calls `/v1/messages?beta=true`).
    pub path: String,
    /// The body as JSON (`Value::Null` when empty or not JSON).
    pub body: Value,
}

impl ModelRequest {
    /// Every piece of text in the request's messages and system prompt, one per line: what
    /// a test searches for an earlier answer, a file name, the history.
    pub fn text(&self) -> String {
        let mut out = Vec::new();
        collect_text(&self.body["system"], &mut out);
        for message in self.body["messages"].as_array().into_iter().flatten() {
            collect_text(&message["content"], &mut out);
        }
        out.join("\n")
    }
}

fn collect_text(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_text(i, out)),
        Value::Object(o) => {
            for key in ["text", "content", "input"] {
                match o.get(key) {
                    Some(Value::Object(input)) => out.push(Value::Object(input.clone()).to_string()),
                    Some(inner) => collect_text(inner, out),
                    None => {}
                }
            }
        }
        _ => {}
    }
}

/// What a fake model answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Some text, then a call to one of the agent's tools.
    ToolUse { text: String, name: String, input: Value },
    /// A text answer that ends the turn.
    Text(String),
}

/// The answers to one user prompt, in order.
///
/// For Anthropic, the step of a request is the number of tool results sent back since the
/// conversation's latest real user message, so the same script answers a first run and a
/// resumed follow-up alike; past the end, the last reply repeats. Requests that offer no
/// tools (side queries such as a title) get a short text. For OpenAI (aider has no tool
/// calls), the step is the number of chat-completion requests seen so far.
#[derive(Debug, Clone)]
pub struct Script(pub Vec<Reply>);

impl Script {
    /// Claude Code: `Write` `hello.txt` into the workspace, then say so.
    pub fn claude_writes_hello() -> Script {
        Script(vec![
            Reply::ToolUse {
                text: "I will create hello.txt.".into(),
                name: "Write".into(),
                input: json!({"file_path": "/workspace/hello.txt", "content": "hello from the fake model\n"}),
            },
            Reply::Text("Done: I created hello.txt.".into()),
        ])
    }

    /// aider's `whole` edit format (its default for a model it does not know, such as
    /// `openai/<anything>`): the file's path on its own line, then its whole new content
    /// in a fence. aider applies it and prints the reply.
    pub fn aider_writes_hello() -> Script {
        Script(vec![Reply::Text(
            "Done: I created hello.txt.\n\nhello.txt\n```\nhello from the fake model\n```\n".into(),
        )])
    }

    fn step(&self, n: usize) -> &Reply {
        &self.0[n.min(self.0.len() - 1)]
    }
}

/// After this many requests a fake answers only text, which ends any agent's turn.
const MAX_REQUESTS: usize = 200;

/// Input tokens and output tokens every answer reports.
pub const USAGE_INPUT_TOKENS: u64 = 1200;
pub const USAGE_OUTPUT_TOKENS: u64 = 34;

#[derive(Clone)]
struct Shared {
    requests: Arc<Mutex<Vec<ModelRequest>>>,
    script: Arc<Mutex<Script>>,
}

impl Shared {
    fn new(script: Script) -> Shared {
        Shared {
            requests: Arc::default(),
            script: Arc::new(Mutex::new(script)),
        }
    }

    fn record(&self, method: &Method, uri: &Uri, body: &Bytes) -> ModelRequest {
        let request = ModelRequest {
            method: method.to_string(),
            path: uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            body: serde_json::from_slice(body).unwrap_or(Value::Null),
        };
        self.requests.lock().unwrap().push(request.clone());
        request
    }
}

async fn serve(bind: IpAddr, app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((bind, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Server-Sent Events sent in a few chunks, as a streaming API would.
fn event_stream(events: Vec<String>) -> Response {
    let chunks = events.into_iter().map(|e| Ok::<_, Infallible>(Bytes::from(e)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Anthropic

/// The Anthropic Messages API. Point Claude Code at it with
/// `ANTHROPIC_BASE_URL=<base_url>` (no `/v1`) and any `ANTHROPIC_API_KEY`.
#[derive(Clone)]
pub struct FakeAnthropic {
    /// `http://<addr>`: the value for `ANTHROPIC_BASE_URL`.
    pub base_url: String,
    shared: Shared,
}

impl FakeAnthropic {
    /// On 127.0.0.1, for an agent run on the host.
    pub async fn start(script: Script) -> FakeAnthropic {
        FakeAnthropic::start_on(Ipv4Addr::LOCALHOST.into(), script).await
    }

    /// On `bind` (a [`TestNetwork`]'s gateway, for a container on that network).
    pub async fn start_on(bind: IpAddr, script: Script) -> FakeAnthropic {
        let shared = Shared::new(script);
        let app = Router::new().fallback(anthropic).with_state(shared.clone());
        let addr = serve(bind, app).await;
        FakeAnthropic {
            base_url: format!("http://{addr}"),
            shared,
        }
    }

    /// Every request, in order of arrival.
    pub fn requests(&self) -> Vec<ModelRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The `POST /v1/messages` requests only.
    pub fn messages(&self) -> Vec<ModelRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.split('?').next() == Some("/v1/messages"))
            .collect()
    }

    pub fn clear(&self) {
        self.shared.requests.lock().unwrap().clear();
    }
}

/// How many tool results were sent back since the latest user message that is not only
/// tool results (the prompt this turn answers).
fn tool_rounds(body: &Value) -> usize {
    let is_tool_results = |m: &Value| {
        m["role"] == "user"
            && m["content"]
                .as_array()
                .is_some_and(|c| !c.is_empty() && c.iter().all(|b| b["type"] == "tool_result"))
    };
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let mut rounds = 0;
    for m in messages.iter().rev() {
        if is_tool_results(m) {
            rounds += 1;
        } else if m["role"] == "user" {
            break;
        }
    }
    rounds
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

async fn anthropic(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = shared.record(&method, &uri, &body);
    let path = uri.path();
    match (method.as_str(), path) {
        // Claude Code's connectivity check against the base URL.
        ("HEAD" | "GET", "/api/hello") => StatusCode::OK.into_response(),
        ("POST", "/v1/messages/count_tokens") => {
            let tokens = request.text().len() / 4 + 1;
            axum::Json(json!({"input_tokens": tokens})).into_response()
        }
        ("POST", "/v1/messages") => {
            if headers.get("x-api-key").is_none() && headers.get("authorization").is_none() {
                return anthropic_error(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "x-api-key header is required",
                );
            }
            let body = &request.body;
            let model = body["model"].as_str().unwrap_or("claude-fake").to_owned();
            let has_tools = body["tools"].as_array().is_some_and(|t| !t.is_empty());
            let reply = if has_tools {
                shared.script.lock().unwrap().step(tool_rounds(body)).clone()
            } else {
                Reply::Text("Fake side answer.".into())
            };
            // A runaway agent (one that keeps calling tools) is stopped with a text answer.
            let served = shared.requests.lock().unwrap().len();
            let reply = if served > MAX_REQUESTS {
                Reply::Text("The fake model stops here.".into())
            } else {
                reply
            };
            if body["stream"] == true {
                event_stream(anthropic_events(&model, &reply))
            } else {
                axum::Json(anthropic_message(&model, &reply)).into_response()
            }
        }
        _ => anthropic_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("no route for {method} {path}"),
        ),
    }
}

/// Ids unique across fakes and runs: Claude Code merges assistant messages that share a
/// message id, and takes a tool_use whose id it has seen before as already answered (a
/// resumed session replays both), so reused ids garble the conversation.
fn unique_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

fn content_blocks(reply: &Reply) -> (Vec<Value>, &'static str) {
    match reply {
        Reply::Text(text) => (vec![json!({"type": "text", "text": text})], "end_turn"),
        Reply::ToolUse { text, name, input } => (
            vec![
                json!({"type": "text", "text": text}),
                json!({"type": "tool_use", "id": unique_id("toolu_"), "name": name, "input": input}),
            ],
            "tool_use",
        ),
    }
}

fn anthropic_message(model: &str, reply: &Reply) -> Value {
    let (content, stop_reason) = content_blocks(reply);
    json!({
        "id": unique_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {"input_tokens": USAGE_INPUT_TOKENS, "output_tokens": USAGE_OUTPUT_TOKENS,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    })
}

/// The events of one streamed message, each `event: <type>\ndata: <json>\n\n`.
fn anthropic_events(model: &str, reply: &Reply) -> Vec<String> {
    let sse = |data: Value| format!("event: {}\ndata: {data}\n\n", data["type"].as_str().unwrap());
    let (blocks, stop_reason) = content_blocks(reply);
    let mut events = vec![
        sse(json!({"type": "message_start", "message": {
            "id": unique_id("msg_"), "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": USAGE_INPUT_TOKENS, "output_tokens": 1,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}})),
        sse(json!({"type": "ping"})),
    ];
    for (index, block) in blocks.iter().enumerate() {
        if block["type"] == "text" {
            events.push(sse(json!({"type": "content_block_start", "index": index,
                                   "content_block": {"type": "text", "text": ""}})));
            // Two deltas, split on a character boundary.
            let text = block["text"].as_str().unwrap();
            let mid = text
                .char_indices()
                .nth(text.chars().count() / 2)
                .map_or(text.len(), |(i, _)| i);
            for part in [&text[..mid], &text[mid..]] {
                events.push(sse(json!({"type": "content_block_delta", "index": index,
                                       "delta": {"type": "text_delta", "text": part}})));
            }
        } else {
            events.push(sse(json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})));
            // The input arrives as partial JSON strings that only parse once joined.
            let input = block["input"].to_string();
            let mid = input
                .char_indices()
                .nth(input.chars().count() / 2)
                .map_or(input.len(), |(i, _)| i);
            for part in [&input[..mid], &input[mid..]] {
                events.push(sse(json!({"type": "content_block_delta", "index": index,
                                       "delta": {"type": "input_json_delta", "partial_json": part}})));
            }
        }
        events.push(sse(json!({"type": "content_block_stop", "index": index})));
    }
    events.push(sse(json!({"type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": null},
        "usage": {"output_tokens": USAGE_OUTPUT_TOKENS}})));
    events.push(sse(json!({"type": "message_stop"})));
    events
}

// ---------------------------------------------------------------------------------------
// OpenAI

/// The OpenAI chat completions API. Point aider at it with
/// `OPENAI_API_BASE=<api_base>` (it ends in `/v1`), any `OPENAI_API_KEY`, and
/// `--model openai/<name>`.
#[derive(Clone)]
pub struct FakeOpenAi {
    /// `http://<addr>/v1`: the value for `OPENAI_API_BASE` (aider, litellm) or
    /// `OPENAI_BASE_URL` (the OpenAI SDKs).
    pub api_base: String,
    shared: Shared,
}

impl FakeOpenAi {
    pub async fn start(script: Script) -> FakeOpenAi {
        FakeOpenAi::start_on(Ipv4Addr::LOCALHOST.into(), script).await
    }

    pub async fn start_on(bind: IpAddr, script: Script) -> FakeOpenAi {
        let shared = Shared::new(script);
        let app = Router::new().fallback(openai).with_state(shared.clone());
        let addr = serve(bind, app).await;
        FakeOpenAi {
            api_base: format!("http://{addr}/v1"),
            shared,
        }
    }

    pub fn requests(&self) -> Vec<ModelRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The `POST …/chat/completions` requests only.
    pub fn completions(&self) -> Vec<ModelRequest> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r.method == "POST"
                    && r.path
                        .split('?')
                        .next()
                        .is_some_and(|p| p.ends_with("/chat/completions"))
            })
            .collect()
    }
}

async fn openai(State(shared): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let request = shared.record(&method, &uri, &body);
    let path = uri.path();
    if method != Method::POST || !path.ends_with("/chat/completions") {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": {"message": format!("no route for {method} {path}"), "type": "invalid_request_error", "param": null, "code": null}})),
        )
            .into_response();
    }
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !auth.starts_with("Bearer ") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": {"message": "You didn't provide an API key.", "type": "invalid_request_error", "param": null, "code": null}})),
        )
            .into_response();
    }
    let n = shared
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/chat/completions"))
        .count();
    let content = match shared.script.lock().unwrap().step(n - 1) {
        Reply::Text(text) => text.clone(),
        Reply::ToolUse { text, .. } => text.clone(),
    };
    let model = request.body["model"].as_str().unwrap_or("gpt-fake").to_owned();
    let id = unique_id("chatcmpl-");
    let created = 1_700_000_000 + n as u64;
    let usage = json!({"prompt_tokens": USAGE_INPUT_TOKENS, "completion_tokens": USAGE_OUTPUT_TOKENS,
                       "total_tokens": USAGE_INPUT_TOKENS + USAGE_OUTPUT_TOKENS});
    if request.body["stream"] == true {
        let chunk = |choices: Value, usage: Value| {
            let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                               "model": model, "system_fingerprint": "fp_fake", "choices": choices});
            if !usage.is_null() {
                c["usage"] = usage;
            }
            format!("data: {c}\n\n")
        };
        let mut events = vec![chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
            Value::Null,
        )];
        // A few content deltas, split on line boundaries.
        for line in content.split_inclusive('\n') {
            events.push(chunk(
                json!([{"index": 0, "delta": {"content": line}, "finish_reason": null}]),
                Value::Null,
            ));
        }
        events.push(chunk(
            json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
            Value::Null,
        ));
        // Usage comes in a last chunk with no choices when the client asks for it
        // (`stream_options.include_usage`); sending it always is harmless.
        events.push(chunk(json!([]), usage));
        events.push("data: [DONE]\n\n".into());
        event_stream(events)
    } else {
        axum::Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": usage
        }))
        .into_response()
    }
}

// ---------------------------------------------------------------------------------------
// Networking

/// A Docker network created `--internal`: containers on it reach each other and the host's
/// address on it (the gateway, where the fakes listen), and nothing else: no route out, and
/// Docker's embedded DNS resolves no outside name (unless the container is given `--dns`).
/// Removed on drop.
pub struct TestNetwork {
    pub name: String,
    pub gateway: IpAddr,
}

impl TestNetwork {
    pub fn create() -> TestNetwork {
        let name = format!("threadline-test-{}", uuid::Uuid::new_v4().simple());
        let out = Command::new("docker")
            .args(["network", "create", "--internal", &name])
            .output()
            .expect("docker CLI");
        assert!(
            out.status.success(),
            "docker network create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new("docker")
            .args([
                "network",
                "inspect",
                "--format",
                "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
                &name,
            ])
            .output()
            .expect("docker CLI");
        let gateway = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the network's gateway address");
        TestNetwork { name, gateway }
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["network", "rm", &self.name]).output();
    }
}

/// A DNS server that answers every query NXDOMAIN and records the names asked. Docker's
/// `--dns` takes an address, not a port: bind it on port 53 of a [`TestNetwork`]'s gateway
/// (binding port 53 needs root or CAP_NET_BIND_SERVICE).
#[derive(Clone)]
pub struct DnsLogger {
    pub addr: SocketAddr,
    names: Arc<Mutex<Vec<String>>>,
}

impl DnsLogger {
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<DnsLogger> {
        let socket = tokio::net::UdpSocket::bind(addr).await?;
        let addr = socket.local_addr()?;
        let names: Arc<Mutex<Vec<String>>> = Arc::default();
        let recorded = names.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some((name, answer)) = nxdomain(&buf[..n]) {
                    recorded.lock().unwrap().push(name);
                    let _ = socket.send_to(&answer, peer).await;
                }
            }
        });
        Ok(DnsLogger { addr, names })
    }

    /// Every name asked, in order, with repeats (A and AAAA queries both count).
    pub fn names(&self) -> Vec<String> {
        self.names.lock().unwrap().clone()
    }
}

/// The query's name, and an NXDOMAIN answer to it (header and question only).
fn nxdomain(query: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *query.get(i)? as usize;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + len)?).into_owned());
        i += 1 + len;
    }
    let question_end = i + 5; // the root label, QTYPE, QCLASS
    let question = query.get(12..question_end)?;
    let mut answer = Vec::with_capacity(question_end);
    answer.extend_from_slice(&query[..2]); // id
    answer.push(0x80 | (query[2] & 0x01)); // QR, RD copied
    answer.push(0x80 | 3); // RA, RCODE NXDOMAIN
    answer.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question, no records
    answer.extend_from_slice(question);
    Some((labels.join("."), answer))
}

/// An HTTP proxy that forwards nothing: it records the target of each request (`host:port`
/// of a `CONNECT`, the absolute URL of a plain request) and answers 403. Give a container
/// `HTTPS_PROXY`/`HTTP_PROXY` (and the lower-case forms) pointing at it, and `NO_PROXY` for
/// the fake model's address.
#[derive(Clone)]
pub struct RecordingProxy {
    pub addr: SocketAddr,
    /// `http://<addr>`
    pub url: String,
    targets: Arc<Mutex<Vec<String>>>,
}

impl RecordingProxy {
    pub async fn start_on(bind: IpAddr) -> RecordingProxy {
        let listener = tokio::net::TcpListener::bind((bind, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let targets: Arc<Mutex<Vec<String>>> = Arc::default();
        let recorded = targets.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let mut line = head.lines().next().unwrap_or("").split_whitespace();
                    let (method, target) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
                    if !method.is_empty() {
                        recorded.lock().unwrap().push(format!("{method} {target}"));
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        RecordingProxy {
            addr,
            url: format!("http://{addr}"),
            targets,
        }
    }

    /// `CONNECT host:443`, `GET http://host/path`, … in order of arrival.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

/// The images `tests/agent-images/build.sh` builds.
pub const CLAUDE_IMAGE: &str = "threadline/agent-claude:test";
pub const AIDER_IMAGE: &str = "threadline/agent-aider:test";

// ---------------------------------------------------------------------------------------
// The fakes themselves, spoken to over HTTP, as an agent would (no Docker needed).

#[cfg(test)]
mod tests {
    use super::*;

    /// The status and the body (de-chunked) of a POST.
    async fn post(url: &str, body: Value) -> (u16, String) {
        // A minimal HTTP/1.1 client: the crate's own HTTP stack is for its front ends.
        let url = url.strip_prefix("http://").unwrap();
        let (host, path) = url.split_once('/').unwrap();
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        let body = body.to_string();
        let request = format!(
            "POST /{path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\nx-api-key: k\r\n\
             authorization: Bearer k\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8(response).unwrap();
        let status = response[9..12].parse().unwrap();
        let (head, mut rest) = response.split_once("\r\n\r\n").unwrap();
        if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            return (status, rest.to_owned());
        }
        let mut body = String::new();
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                return (status, body);
            }
            body.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
    }

    /// The SSE `data:` payloads of a (possibly chunked) response, in order.
    fn data_events(response: &str) -> Vec<Value> {
        response
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn fake_anthropic_streams_a_tool_use_then_a_final_answer() {
        let fake = FakeAnthropic::start(Script::claude_writes_hello()).await;
        let url = format!("{}/v1/messages?beta=true", fake.base_url);
        let tools = json!([{"name": "Write", "input_schema": {"type": "object"}}]);
        let first = json!({"model": "claude-x", "stream": true, "tools": tools, "max_tokens": 100,
                           "messages": [{"role": "user", "content": [{"type": "text", "text": "make hello.txt"}]}]});
        let (status, response) = post(&url, first.clone()).await;
        assert_eq!(status, 200);
        let events = data_events(&response);
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types.first(), Some(&"message_start"));
        assert_eq!(types.last(), Some(&"message_stop"));
        let partial: String = events
            .iter()
            .filter(|e| e["delta"]["type"] == "input_json_delta")
            .map(|e| e["delta"]["partial_json"].as_str().unwrap())
            .collect();
        let input: Value = serde_json::from_str(&partial).unwrap();
        assert_eq!(input["file_path"], "/workspace/hello.txt");
        let delta = events.iter().find(|e| e["type"] == "message_delta").unwrap();
        assert_eq!(delta["delta"]["stop_reason"], "tool_use");
        assert_eq!(delta["usage"]["output_tokens"], USAGE_OUTPUT_TOKENS);

        let mut second = first;
        second["messages"].as_array_mut().unwrap().extend([
            json!({"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Write", "input": input}]}),
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}),
        ]);
        let (_, response) = post(&url, second).await;
        let text: String = data_events(&response)
            .iter()
            .filter(|e| e["delta"]["type"] == "text_delta")
            .map(|e| e["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Done: I created hello.txt.");
        let recorded = fake.messages();
        assert_eq!(recorded.len(), 2);
        assert!(recorded[1].text().contains("make hello.txt"), "{}", recorded[1].text());
    }

    #[tokio::test]
    async fn fake_openai_answers_streamed_and_whole_with_usage() {
        let fake = FakeOpenAi::start(Script::aider_writes_hello()).await;
        let url = format!("{}/chat/completions", fake.api_base);
        let request = json!({"model": "fake", "messages": [{"role": "user", "content": "make hello.txt"}]});
        let (status, response) = post(&url, request.clone()).await;
        assert_eq!(status, 200);
        let body: Value = serde_json::from_str(&response).unwrap();
        assert!(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .contains("hello.txt\n```")
        );
        assert_eq!(body["usage"]["completion_tokens"], USAGE_OUTPUT_TOKENS);

        let mut streamed = request;
        streamed["stream"] = json!(true);
        let (_, response) = post(&url, streamed).await;
        assert!(response.trim_end().ends_with("data: [DONE]"));
        let events = data_events(&response);
        let content: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            content,
            "Done: I created hello.txt.\n\nhello.txt\n```\nhello from the fake model\n```\n"
        );
        assert_eq!(events.last().unwrap()["usage"]["prompt_tokens"], USAGE_INPUT_TOKENS);
        assert_eq!(fake.completions().len(), 2);
    }

    #[tokio::test]
    async fn dns_logger_records_names_and_answers_nxdomain() {
        let dns = DnsLogger::start_on("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // A query for statsig.anthropic.com, type A, recursion desired.
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["statsig", "anthropic", "com"] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        socket.send_to(&query, dns.addr).await.unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..2], &[0x12, 0x34]);
        assert_eq!(buf[3] & 0x0f, 3, "NXDOMAIN");
        assert_eq!(n, query.len());
        assert_eq!(dns.names(), vec!["statsig.anthropic.com"]);
    }

    #[tokio::test]
    async fn recording_proxy_records_connect_targets() {
        let proxy = RecordingProxy::start_on(Ipv4Addr::LOCALHOST.into()).await;
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"CONNECT pypi.org:443 HTTP/1.1\r\nhost: pypi.org:443\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 403"));
        assert_eq!(proxy.targets(), vec!["CONNECT pypi.org:443"]);
    }
}
