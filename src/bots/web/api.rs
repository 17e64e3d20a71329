//! The JSON API (documented at `GET /api`), used by the web pages and by scripts.
//! Nothing here shows file contents, diffs or secrets: prompts and logs are redacted.

use std::convert::Infallible;
use std::error::Error as _;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::WebState;
use crate::bots::chat::split_mode;
use crate::bots::render::{Detail, StatusCard, card_in_context, pull_request_refused, pull_request_said};
use crate::model::{Origin, Pipeline, Run, RunMode, now_millis};
use crate::orchestrator::StoreError;
use crate::orchestrator::{FollowUp, NewAttachment, NewPipeline, PullRequestView, RunUpdate, SubmitError, Submitted};

/// An API error: a status and a sentence saying what to do (`error`), with the ids an
/// ambiguous prefix matched (`candidates`) when that is what went wrong.
pub struct ApiError {
    status: StatusCode,
    error: String,
    candidates: Option<Vec<String>>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            candidates: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.candidates {
            Some(candidates) => json!({ "error": self.error, "candidates": candidates }),
            None => json!({ "error": self.error }),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let status = match &e {
            SubmitError::EmptyPrompt
            | SubmitError::PromptTooLong { .. }
            | SubmitError::ControlCharacter { .. }
            | SubmitError::UnknownAgent { .. }
            | SubmitError::Attachments(_)
            | SubmitError::BaseIsPipelineBranch { .. }
            | SubmitError::Repo(_) => StatusCode::UNPROCESSABLE_ENTITY,
            SubmitError::UnknownPipeline(_) | SubmitError::UnknownRun(_) => StatusCode::NOT_FOUND,
            SubmitError::NotRetryable { .. } => StatusCode::CONFLICT,
            SubmitError::Store(e) => return ApiError::from_store(e),
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::from_store(&e)
    }
}

impl ApiError {
    fn from_store(e: &StoreError) -> Self {
        match e {
            // The caller's to resolve: a longer prefix picks one.
            StoreError::Ambiguous { matches, .. } => ApiError {
                status: StatusCode::CONFLICT,
                error: e.to_string(),
                candidates: Some(matches.clone()),
            },
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }

    /// A request body the JSON extractor refused, in words.
    fn body_rejected(rejection: JsonRejection, max_prompt_bytes: usize) -> Self {
        let detail = |e: &dyn std::error::Error| e.source().map(|s| s.to_string()).unwrap_or_default();
        let (status, error) = match &rejection {
            JsonRejection::MissingJsonContentType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the body as JSON, with `Content-Type: application/json`".to_owned(),
            ),
            JsonRejection::JsonSyntaxError(e) => (
                StatusCode::BAD_REQUEST,
                format!(
                    "the body is not valid JSON ({}); send a JSON object as `GET /api` describes",
                    detail(e)
                ),
            ),
            JsonRejection::JsonDataError(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "the body does not fit this endpoint ({}); `GET /api` shows what each one takes",
                    detail(e)
                ),
            ),
            JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is too large; a prompt may be at most {max_prompt_bytes} bytes and its attached \
                     files {} bytes in all: shorten it, attach less, or put the details in a file in the repo",
                    crate::orchestrator::MAX_RUN_ATTACHMENT_BYTES
                ),
            ),
            _ => (
                rejection.status(),
                "the request body could not be read; send it again".to_owned(),
            ),
        };
        ApiError::new(status, error)
    }
}

/// `Json<T>`, with its rejections as API errors.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequest<WebState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &WebState) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(ApiError::body_rejected(rejection, state.orch.config().max_prompt_bytes)),
        }
    }
}

/// `Query<T>`, with its rejections as API errors.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => {
                let detail = match &rejection {
                    QueryRejection::FailedToDeserializeQueryString(e) => {
                        e.source().map(|s| s.to_string()).unwrap_or_default()
                    }
                    other => other.body_text(),
                };
                Err(ApiError::new(
                    rejection.status(),
                    format!("the query string does not fit ({detail}); `GET /api` lists what each endpoint takes"),
                ))
            }
        }
    }
}

/// Makes every error of the JSON API a JSON body with an `error` sentence, whoever
/// produced it: the router (no such endpoint, wrong method), the token and Host guard, or
/// an extractor. Pages keep their plain text.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status();
    let is_api = path == "/api" || path.starts_with("/api/");
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_api || is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let error = match status {
        StatusCode::NOT_FOUND => format!("there is no endpoint {path}: `GET /api` lists them"),
        StatusCode::METHOD_NOT_ALLOWED => {
            format!("{path} does not take {method}: `GET /api` lists the methods each endpoint takes")
        }
        _ if !text.is_empty() => sentence(&text),
        _ => format!(
            "{}: `GET /api` says how to call each endpoint",
            status.canonical_reason().unwrap_or("error").to_lowercase()
        ),
    };
    let mut rewritten = (status, Json(json!({ "error": error }))).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().append(name, value.clone());
        }
    }
    rewritten
}

/// A plain-text error as one of our sentences: a lowercase start, no final period.
fn sentence(text: &str) -> String {
    let text = text.trim_end_matches('.');
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(first), Some(second)) if first.is_uppercase() && !second.is_uppercase() => {
            first.to_lowercase().chain(text[first.len_utf8()..].chars()).collect()
        }
        _ => text.to_owned(),
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub async fn index() -> Json<Value> {
    Json(json!({
        "endpoints": [
            {"method": "GET", "path": "/api/repos", "does": "configured repositories and agents"},
            {"method": "GET", "path": "/api/pipelines[?surface=web|cli|slack|discord]", "does": "pipelines, newest first, each with its latest run's card"},
            {"method": "POST", "path": "/api/pipelines", "body": {"repo": "name from /api/repos", "agent": "optional", "prompt": "text"}, "does": "start a pipeline (a web thread); send Idempotency-Key to make it safe to repeat"},
            {"method": "GET", "path": "/api/pipelines/{id}", "does": "a pipeline with every run, its card and queue position, its pull request and every Open PR decision"},
            {"method": "POST", "path": "/api/pipelines/{id}/runs", "body": {"prompt": "text", "agent": "optional"}, "does": "a follow-up"},
            {"method": "GET", "path": "/api/runs/{id}", "does": "a run: its state history, card and redacted log tail"},
            {"method": "POST", "path": "/api/runs/{id}/cancel", "does": "cancel (work so far is saved)"},
            {"method": "POST", "path": "/api/runs/{id}/retry", "does": "run a failed, timed out or cancelled run's prompt again"},
            {"method": "POST", "path": "/api/runs/{id}/open-pr", "does": "open the pipeline's pull request (or find the one it has): 201 opened or found now, 200 already had one, 422 with `error` saying what to do"},
            {"method": "GET", "path": "/api/events", "does": "Server-Sent Events: `card` (a run changed), `log` (a log line), `resync` (missed events: fetch again)"},
            {"method": "GET", "path": "/api/stats?days=14", "does": "runs ended per UTC day by final state, and their cost"},
            {"method": "GET", "path": "/healthz", "does": "liveness, no token needed"},
            {"method": "GET", "path": "/metrics", "does": "Prometheus metrics"}
        ],
        "auth": "when web.token is set: `Authorization: Bearer <token>`, or a browser opens a page once with ?token=<token>",
        "origin": "a POST whose Origin is not this address, or with `Sec-Fetch-Site: cross-site`, is refused with 403",
        "ids": "an id may be a prefix, taken literally; one that fits several ids gives 409 with them in `candidates`",
        "errors": "every error is JSON: {\"error\": \"what went wrong and what to do\"}"
    }))
}

#[derive(Deserialize)]
pub struct StatsQuery {
    days: Option<u32>,
}

/// Runs that ended per UTC day, by final state, and what they cost: the dashboard's chart.
pub async fn stats(State(state): State<WebState>, ApiQuery(q): ApiQuery<StatsQuery>) -> ApiResult<Json<Value>> {
    const DAY: i64 = 86_400_000;
    let days = i64::from(q.days.unwrap_or(14).clamp(1, 90));
    let today = now_millis().div_euclid(DAY);
    let first = today - days + 1;
    let ended = state
        .orch
        .queries()
        .ended_since(first * DAY)
        .await
        .map_err(|e| ApiError::from_store(&e))?;
    let mut out: Vec<Value> = (first..=today)
        .map(|d| {
            json!({
                "day": crate::model::format_utc(d * DAY)[..10].to_owned(),
                "succeeded": 0, "failed": 0, "timed_out": 0, "cancelled": 0, "cost_usd": 0.0,
            })
        })
        .collect();
    for (st, at, cost) in ended {
        let Some(day) = out.get_mut((at.div_euclid(DAY) - first) as usize) else {
            continue;
        };
        day[st.as_str()] = json!(day[st.as_str()].as_i64().unwrap_or(0) + 1);
        day["cost_usd"] = json!(day["cost_usd"].as_f64().unwrap_or(0.0) + cost.unwrap_or(0.0));
    }
    Ok(Json(json!({ "days": out })))
}

pub async fn healthz(State(state): State<WebState>) -> Response {
    match state.orch.queries().count_by_state().await {
        Ok(_) => Json(json!({ "status": "ok" })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "store unavailable", "error": e.to_string() })),
        )
            .into_response(),
    }
}

pub async fn repos(State(state): State<WebState>) -> Json<Value> {
    let config = state.orch.config();
    let redactor = state.orch.redactor();
    let repos: Vec<Value> = config
        .repos
        .iter()
        .map(|(name, r)| {
            json!({
                "name": name,
                "url": redactor.redact(&strip_userinfo(&r.url)),
                "base_branch": r.base_branch.as_deref().unwrap_or(&config.default_base_branch),
                "agent": r.agent.as_deref().unwrap_or(&config.default_agent),
            })
        })
        .collect();
    Json(json!({ "repos": repos, "agents": config.agent_names(), "default_agent": config.default_agent }))
}

#[derive(Deserialize)]
pub struct ListQuery {
    surface: Option<String>,
    limit: Option<i64>,
}

pub async fn list_pipelines(State(state): State<WebState>, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult<Json<Value>> {
    let store = state.orch.queries();
    let mut out = Vec::new();
    for s in store.pipelines(q.limit.unwrap_or(200).clamp(1, 1000)).await? {
        if q.surface
            .as_deref()
            .is_some_and(|want| want != s.pipeline.origin.surface)
        {
            continue;
        }
        let runs = store.runs(&s.pipeline.id).await?;
        let latest = match runs.last() {
            Some(run) => Some(card(&state, &s.pipeline, run, &runs).await),
            None => None,
        };
        out.push(json!({
            "pipeline": shown_pipeline(&state, &s.pipeline),
            "runs": s.runs,
            "latest": latest,
            "requested_by": runs.first().map(|r| r.requested_by.clone()),
        }));
    }
    Ok(Json(json!({ "pipelines": out })))
}

#[derive(Deserialize)]
pub struct StartBody {
    repo: String,
    agent: Option<String>,
    prompt: String,
    /// `change` or `ask`; else the prompt's own `?` / `ask:` / `change:`, else a change.
    mode: Option<RunMode>,
    #[serde(default)]
    attachments: Vec<UploadBody>,
}

/// A file sent with a prompt.
#[derive(Deserialize)]
pub struct UploadBody {
    name: String,
    content_base64: String,
}

fn uploads(bodies: Vec<UploadBody>) -> Result<Vec<NewAttachment>, ApiError> {
    use base64::Engine as _;
    bodies
        .into_iter()
        .map(|u| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(u.content_base64.as_bytes())
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("the attached file {:?} is not valid base64 ({e})", u.name),
                    )
                })?;
            Ok(NewAttachment::Upload { name: u.name, bytes })
        })
        .collect()
}

pub async fn start_pipeline(
    State(state): State<WebState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<StartBody>,
) -> ApiResult<Response> {
    let (prefixed, prompt) = split_mode(&body.prompt);
    let mode = body.mode.or(prefixed).unwrap_or_default();
    let attachments = uploads(body.attachments)?;
    let config = state.orch.config();
    let Some(repo) = config.repos.get(&body.repo) else {
        let known: Vec<&str> = config.repos.keys().map(String::as_str).collect();
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            if known.is_empty() {
                "no repositories are configured: add one under [repos.NAME] in the config, or start with `threadline serve --repo PATH`".to_owned()
            } else {
                format!(
                    "there is no repository named {:?}; the configured ones are: {}",
                    body.repo,
                    known.join(", ")
                )
            },
        ));
    };
    let submitted = state
        .orch
        .submit_pipeline(NewPipeline {
            repo: repo.url.clone(),
            base_branch: repo.base_branch.clone(),
            agent: body.agent.or_else(|| repo.agent.clone()),
            prompt: prompt.to_owned(),
            requested_by: "web".into(),
            origin: Origin {
                surface: "web".into(),
                thread: uuid::Uuid::new_v4().simple().to_string(),
                url: String::new(),
            },
            idempotency_key: idempotency_key(&headers),
            mode,
            attachments,
        })
        .await?;
    Ok(submitted_response(&state, submitted).await)
}

#[derive(Deserialize)]
pub struct FollowUpBody {
    prompt: String,
    agent: Option<String>,
    mode: Option<RunMode>,
    #[serde(default)]
    attachments: Vec<UploadBody>,
}

pub async fn follow_up(
    State(state): State<WebState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<FollowUpBody>,
) -> ApiResult<Response> {
    let (prefixed, prompt) = split_mode(&body.prompt);
    let mode = body.mode.or(prefixed).unwrap_or_default();
    let attachments = uploads(body.attachments)?;
    let submitted = state
        .orch
        .submit_follow_up(FollowUp {
            pipeline_id: id,
            prompt: prompt.to_owned(),
            agent: body.agent,
            requested_by: "web".into(),
            idempotency_key: idempotency_key(&headers),
            mode,
            attachments,
        })
        .await?;
    Ok(submitted_response(&state, submitted).await)
}

pub async fn retry(State(state): State<WebState>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    let submitted = state.orch.retry(&id, "web", idempotency_key(&headers)).await?;
    Ok(submitted_response(&state, submitted).await)
}

pub async fn cancel(State(state): State<WebState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let done = state.orch.cancel(&id).await?;
    Ok(Json(json!({ "dequeued": done.dequeued, "stopping": done.stopping })))
}

/// Open PR from the web chat. Whoever holds the web UI (loopback, or the token) is the
/// operator, so no channel policy applies; the decision is recorded all the same.
pub async fn open_pr(State(state): State<WebState>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    let run = state.orch.find_run(&id).await?;
    let key = idempotency_key(&headers).unwrap_or_else(|| format!("web:open-pr:{}", uuid::Uuid::new_v4()));
    let (status, body) = match state.orch.approve_pull_request(&key, &run, "web").await {
        Ok(done) => (
            if done.fresh {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            json!({ "text": pull_request_said(&done), "pull_request": done.pr }),
        ),
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "error": pull_request_refused(&e, state.orch.redactor()) }),
        ),
    };
    Ok((status, Json(body)).into_response())
}

pub async fn get_pipeline(State(state): State<WebState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let store = state.orch.queries();
    let pipeline = store
        .find_pipeline(&id)
        .await?
        .ok_or_else(|| ApiError::from(SubmitError::UnknownPipeline(id.clone())))?;
    let runs = store.runs(&pipeline.id).await?;
    let view = state.orch.pull_request_view(&pipeline).await;
    let shown: Vec<Value> = runs
        .iter()
        .map(|r| json!({ "run": shown_run(&state, r), "card": web_card(&state, &pipeline, r, &runs, &view) }))
        .collect();
    let approvals = store.approvals(&pipeline.id).await?;
    Ok(Json(json!({
        "pipeline": shown_pipeline(&state, &pipeline),
        "runs": shown,
        "pull_request": view.pr,
        "approvals": approvals,
    })))
}

pub async fn get_run(State(state): State<WebState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let run = state.orch.find_run(&id).await?;
    let store = state.orch.queries();
    let pipeline = store
        .pipeline(&run.pipeline_id)
        .await?
        .ok_or_else(|| ApiError::from(SubmitError::UnknownPipeline(run.pipeline_id.clone())))?;
    let runs = store.runs(&pipeline.id).await?;
    let events = store.events(&run.id).await?;
    Ok(Json(json!({
        "pipeline": shown_pipeline(&state, &pipeline),
        "run": shown_run(&state, &run),
        "card": card(&state, &pipeline, &run, &runs).await,
        "events": events,
        "log_tail": run.log_tail,
    })))
}

pub async fn events(State(state): State<WebState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = state.orch.subscribe();
    let stream = futures_util::stream::unfold((rx, state), |(mut rx, state)| async move {
        loop {
            let event = match rx.recv().await {
                Ok(RunUpdate::State(run)) => {
                    let store = state.orch.queries();
                    let (Ok(Some(pipeline)), Ok(runs)) = (
                        store.pipeline(&run.pipeline_id).await,
                        store.runs(&run.pipeline_id).await,
                    ) else {
                        continue;
                    };
                    // The stored run may be newer than the event's copy.
                    let latest = runs.iter().find(|r| r.id == run.id).cloned().unwrap_or(*run);
                    Event::default()
                        .event("card")
                        .json_data(card(&state, &pipeline, &latest, &runs).await)
                }
                Ok(RunUpdate::Log { run_id, line }) => Event::default()
                    .event("log")
                    .json_data(json!({ "run_id": run_id, "line": line })),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    Ok(Event::default().event("resync").data(""))
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            match event {
                Ok(e) => return Some((Ok(e), (rx, state))),
                Err(_) => continue,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn submitted_response(state: &WebState, s: Submitted) -> Response {
    let runs = state.orch.queries().runs(&s.pipeline.id).await.unwrap_or_default();
    let status = if s.created { StatusCode::CREATED } else { StatusCode::OK };
    let body = json!({
        "pipeline": shown_pipeline(state, &s.pipeline),
        "run": shown_run(state, &s.run),
        "card": card(state, &s.pipeline, &s.run, &runs).await,
        "created": s.created,
        "ahead": s.ahead,
    });
    (status, Json(body)).into_response()
}

/// The card of `run`, as the web shows it: on the user's own machine, so with the
/// summary and the last log lines.
async fn card(state: &WebState, pipeline: &Pipeline, run: &Run, runs: &[Run]) -> StatusCard {
    let view = state.orch.pull_request_view(pipeline).await;
    web_card(state, pipeline, run, runs, &view)
}

fn web_card(state: &WebState, pipeline: &Pipeline, run: &Run, runs: &[Run], view: &PullRequestView) -> StatusCard {
    card_in_context(pipeline, run, runs, Detail::Logs, view, state.orch.redactor())
}

fn shown_pipeline(state: &WebState, p: &Pipeline) -> Value {
    let r = state.orch.redactor();
    json!({
        "id": p.id, "repo": r.redact(&strip_userinfo(&p.repo)), "branch": p.branch, "base_branch": p.base_branch,
        "agent": p.agent, "title": r.redact(&p.title), "surface": p.origin.surface, "thread": p.origin.thread, "thread_url": p.origin.url,
        "local_only": p.local_only, "created_at": p.created_at,
    })
}

/// A run as the API shows it: named here field by field, so a change to the domain type
/// never changes the API unnoticed. Its log tail is served by /api/runs/{id} only.
fn shown_run(state: &WebState, run: &Run) -> Value {
    let r = state.orch.redactor();
    json!({
        "id": run.id, "pipeline_id": run.pipeline_id, "seq": run.seq, "prompt": r.redact(&run.prompt),
        "agent": run.agent, "requested_by": run.requested_by, "state": run.state,
        "created_at": run.created_at, "started_at": run.started_at, "finished_at": run.finished_at,
        "exit_code": run.exit_code, "end_reason": run.end_reason, "error": run.error,
        "start_commit": run.start_commit, "head_commit": run.head_commit, "changed": run.changed,
        "diffstat": run.diffstat, "pushed": run.pushed, "push_error": run.push_error,
        "cancel_requested": run.cancel_requested, "summary": run.summary, "answer": run.summary,
        "mode": run.mode, "usage": run.usage, "progress": run.progress,
    })
}

fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 200)
        .map(|k| format!("web:{k}"))
}

/// `https://user:token@host/x` → `https://host/x`.
fn strip_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, host)) if !rest.split('/').next().unwrap_or("").is_empty() && rest.find('@') < rest.find('/') => {
                format!("{scheme}://{host}")
            }
            _ => url.to_owned(),
        },
        None => url.to_owned(),
    }
}
