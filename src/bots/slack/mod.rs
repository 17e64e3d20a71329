//! The Slack adapter (slack-morphism, Socket Mode): turns events into [`ChatCore`] calls
//! and [`StatusCard`]s into Block Kit. No orchestration happens here.

use std::sync::Arc;

use serde_json::{Value, json};
use slack_morphism::prelude::*;
use slack_morphism::signature_verifier::SlackEventSignatureVerifier;
use tokio_util::sync::CancellationToken;

use super::chat::{ChatCore, ChatError, ChatSurface, Click, Message, Outcome, Say, Sender, StatusUpdater, ThreadRef};
use super::render::{Action, Markup, StatusCard, card_text};
use crate::config::SlackConfig;
use crate::model::{Attachment, AttachmentSource};
use crate::orchestrator::{Orchestrator, Submitted};

type Connector =
    SlackClientHyperConnector<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>>;
type Client = SlackClient<Connector>;

const SURFACE: &str = "slack";

#[derive(Debug, thiserror::Error)]
pub enum SlackError {
    #[error("cannot set up TLS for Slack ({0}); install the ca-certificates package")]
    Tls(std::io::Error),
    #[error("Slack refused the bot token (auth.test: {0}); check slack.bot_token")]
    Auth(String),
    #[error("cannot open Slack's Socket Mode connection ({0}); check slack.app_token and that Socket Mode is on")]
    SocketMode(String),
}

/// Posts and edits status messages.
pub struct SlackSurface {
    client: Arc<Client>,
    token: SlackApiToken,
}

impl SlackSurface {
    fn session(&self) -> SlackClientSession<'_, Connector> {
        self.client.open_session(&self.token)
    }

    async fn say(&self, thread: &ThreadRef, text: &str) {
        let req = SlackApiChatPostMessageRequest::new(thread.channel.clone().into(), text_content(text))
            .with_thread_ts(thread.thread.clone().into());
        if let Err(e) = self.session().chat_post_message(&req).await {
            tracing::warn!(error = %e, "cannot reply in Slack");
        }
    }

    async fn whisper(&self, channel: &str, user: &str, thread: Option<&str>, text: &str) {
        let mut req = SlackApiChatPostEphemeralRequest::new(channel.into(), user.into(), text_content(text));
        if let Some(t) = thread {
            req = req.with_thread_ts(t.into());
        }
        if let Err(e) = self.session().chat_post_ephemeral(&req).await {
            tracing::warn!(error = %e, "cannot send an ephemeral Slack message");
        }
    }

    async fn react(&self, channel: &str, ts: &str) {
        let req = SlackApiReactionsAddRequest::new(channel.into(), SlackReactionName("eyes".into()), ts.into());
        if let Err(e) = self.session().reactions_add(&req).await {
            tracing::debug!(error = %e, "cannot add a reaction");
        }
    }
}

fn chat_error(e: slack_morphism::errors::SlackClientError) -> ChatError {
    match e {
        slack_morphism::errors::SlackClientError::RateLimitError(r) => ChatError::RateLimited {
            retry_after: r.retry_after.unwrap_or(std::time::Duration::from_secs(1)),
        },
        other => ChatError::Failed(other.to_string()),
    }
}

impl ChatSurface for SlackSurface {
    fn name(&self) -> &'static str {
        SURFACE
    }

    async fn post_status(&self, thread: &ThreadRef, card: &StatusCard) -> Result<String, ChatError> {
        let req = SlackApiChatPostMessageRequest::new(thread.channel.clone().into(), card_content(card))
            .with_thread_ts(thread.thread.clone().into());
        let res = self.session().chat_post_message(&req).await.map_err(chat_error)?;
        Ok(res.ts.0)
    }

    async fn update_status(&self, thread: &ThreadRef, message_id: &str, card: &StatusCard) -> Result<(), ChatError> {
        let req = SlackApiChatUpdateRequest::new(thread.channel.clone().into(), card_content(card), message_id.into());
        self.session().chat_update(&req).await.map(|_| ()).map_err(chat_error)
    }
}

fn text_content(text: &str) -> SlackMessageContent {
    SlackMessageContent::new().with_text(text.to_owned())
}

/// Slack's mrkdwn. Text from a run has `&`, `<` and `>` escaped as Slack asks, so no
/// `<!channel>`, mention or disguised link gets through.
struct Mrkdwn;

impl Markup for Mrkdwn {
    fn link(&self, url: &str, text: &str) -> String {
        format!("<{url}|{text}>")
    }
    fn emphasis(&self, text: &str) -> String {
        format!("_{text}_")
    }
    fn warning(&self) -> &'static str {
        ":warning:"
    }
    fn escape(&self, text: &str) -> String {
        text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
    }
    fn log_block(&self, lines: &[String]) -> String {
        let log: Vec<String> = lines.iter().map(|l| self.escape(l).replace("```", "'''")).collect();
        format!("```{}```", log.join("\n"))
    }
}

/// The card as Block Kit, written as Slack's own JSON so it reads like Slack's docs.
pub fn card_blocks(card: &StatusCard) -> Value {
    let text = card_text(card, &Mrkdwn);
    let body = std::iter::once(format!("*{}*", text.title))
        .chain(text.lines)
        .collect::<Vec<_>>();
    let mut blocks = vec![json!({"type": "section", "text": {"type": "mrkdwn", "text": body.join("\n")}})];
    if let Some(log) = text.log {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": log}}));
    }
    if !card.buttons.is_empty() {
        let elements: Vec<Value> = card
            .buttons
            .iter()
            .map(|b| {
                let mut button = json!({
                    "type": "button",
                    "action_id": action_id(b.action),
                    "text": {"type": "plain_text", "text": b.label},
                    "value": b.run_id,
                });
                if let Some(url) = &b.url {
                    // A link: Slack opens it and still reports the click, which
                    // `action_from` does not know and so ignores.
                    button["url"] = json!(url);
                    button["action_id"] = json!("threadline_link");
                }
                if b.action == Action::Cancel {
                    button["style"] = json!("danger");
                }
                button
            })
            .collect();
        blocks.push(json!({"type": "actions", "elements": elements}));
    }
    Value::Array(blocks)
}

fn card_content(card: &StatusCard) -> SlackMessageContent {
    let json = card_blocks(card);
    let text = format!("Threadline run {}: {}", card.run_id, card.headline);
    match serde_json::from_value::<Vec<SlackBlock>>(json.clone()) {
        Ok(blocks) => SlackMessageContent::new().with_text(text).with_blocks(blocks),
        Err(e) => {
            // Never silently: the card goes out as its text, and the log says why.
            tracing::error!(run_id = %card.run_id, error = %e, "the card's Block Kit does not parse; posting its text");
            let body = json[0]["text"]["text"].as_str().unwrap_or_default();
            SlackMessageContent::new().with_text(format!("{text}\n{body}"))
        }
    }
}

fn action_id(action: Action) -> String {
    format!("threadline_{}", action.key())
}

fn action_from(id: &str) -> Option<Action> {
    Action::from_key(id.strip_prefix("threadline_")?)
}

/// What the Socket Mode callbacks need.
struct State {
    core: ChatCore,
    surface: Arc<SlackSurface>,
    bot_user: String,
    /// `https://<workspace>.slack.com/`, for links to threads.
    workspace_url: String,
    /// User groups (`S…` ids) named as prompters or approvers, with their members as
    /// last read (kept for a minute).
    groups: Vec<String>,
    members: tokio::sync::Mutex<std::collections::HashMap<String, (tokio::time::Instant, Vec<String>)>>,
}

/// How long a user group's member list is trusted.
const GROUP_MEMBERS_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// A Slack user group (subteam) id, as opposed to a user (`U…`, `W…`).
fn is_usergroup(id: &str) -> bool {
    id.len() > 1 && id.starts_with('S') && id.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

impl State {
    /// The configured user groups `user` belongs to: their roles, as far as approval
    /// goes. A group that cannot be read counts as not containing them.
    async fn groups_of(&self, user: &str) -> Vec<String> {
        let mut found = Vec::new();
        for group in &self.groups {
            let mut members = self.members.lock().await;
            let fresh = members
                .get(group)
                .filter(|(at, _)| at.elapsed() < GROUP_MEMBERS_TTL)
                .map(|(_, users)| users.clone());
            let users = match fresh {
                Some(users) => users,
                None => {
                    let req = SlackApiUserGroupsUsersListRequest::new(group.clone().into());
                    match self.surface.session().usergroups_users_list(&req).await {
                        Ok(res) => {
                            let users: Vec<String> = res.users.into_iter().map(|u| u.0).collect();
                            members.insert(group.clone(), (tokio::time::Instant::now(), users.clone()));
                            users
                        }
                        Err(e) => {
                            tracing::warn!(group, error = %e, "cannot read a Slack user group (scope usergroups:read?)");
                            Vec::new()
                        }
                    }
                }
            };
            if users.iter().any(|u| u == user) {
                found.push(group.clone());
            }
        }
        found
    }

    /// A link to a thread: Slack's permalink form `archives/<channel>/p<ts without dot>`.
    fn thread_link(&self, channel: &str, ts: &str) -> Option<String> {
        if self.workspace_url.is_empty() {
            return None;
        }
        let base = self.workspace_url.trim_end_matches('/');
        Some(format!("{base}/archives/{channel}/p{}", ts.replace('.', "")))
    }
}

/// Connects to Slack and runs until `shutdown`: over Socket Mode, or, given a bound
/// `events` listener, serving the Events API at `POST /slack/events`.
pub async fn start(
    orch: Orchestrator,
    config: &SlackConfig,
    events: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), SlackError> {
    let https = crate::http::https_connector().map_err(SlackError::Tls)?;
    // slack-morphism appends "/<method>" itself.
    let client = Arc::new(SlackClient::new(
        SlackClientHyperConnector::with_connector(https).with_slack_api_url(config.api_url.trim_end_matches('/')),
    ));
    let token = SlackApiToken::new(config.bot_token.expose().into());
    let auth = client
        .open_session(&token)
        .auth_test()
        .await
        .map_err(|e| SlackError::Auth(e.to_string()))?;
    orch.metrics().register_platform(SURFACE);
    let surface = Arc::new(SlackSurface {
        client: client.clone(),
        token,
    });
    let core = ChatCore::new(orch.clone(), SURFACE, config.channels.clone());
    let named = config
        .channels
        .values()
        .flat_map(|b| b.prompters.iter().chain(&b.approvers))
        .chain(orch.config().repos.values().flat_map(|r| &r.approvers));
    let mut groups: Vec<String> = named.filter(|id| is_usergroup(id)).cloned().collect();
    groups.sort();
    groups.dedup();
    let state = Arc::new(State {
        core: core.clone(),
        surface: surface.clone(),
        bot_user: auth.user_id.0.clone(),
        workspace_url: auth.url.0.to_string(),
        groups,
        members: Default::default(),
    });
    let updater = tokio::spawn(StatusUpdater::new(core, surface).run(shutdown.clone()));
    match events {
        Some(listener) => {
            let verifier =
                SlackEventSignatureVerifier::new(&SlackSigningSecret::new(config.signing_secret.expose().to_owned()));
            let app = axum::Router::new()
                .route("/slack/events", axum::routing::post(http_event))
                .with_state(Arc::new(HttpState { state, verifier }));
            tracing::info!(bot = %auth.user_id.0, "serving Slack's Events API");
            let stop = shutdown.clone();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
                .map_err(|e| SlackError::SocketMode(e.to_string()))?;
        }
        None => {
            let callbacks = SlackSocketModeListenerCallbacks::new()
                .with_push_events(on_push)
                .with_interaction_events(on_interaction);
            let env = Arc::new(SlackClientEventsListenerEnvironment::new(client.clone()).with_user_state(state));
            let listener = SlackClientSocketModeListener::new(
                &SlackClientSocketModeConfig::new().with_max_connections_count(1),
                env,
                callbacks,
            );
            let app_token = SlackApiToken::new(config.app_token.expose().into());
            listener
                .listen_for(&app_token)
                .await
                .map_err(|e| SlackError::SocketMode(e.to_string()))?;
            listener.start().await;
            tracing::info!(bot = %auth.user_id.0, "connected to Slack (Socket Mode)");
            shutdown.cancelled().await;
            listener.shutdown().await;
        }
    }
    let _ = updater.await;
    Ok(())
}

async fn state_of(states: &SlackClientEventsUserState) -> Option<Arc<State>> {
    states.read().await.get_user_state::<Arc<State>>().cloned()
}

/// Socket Mode acks an envelope only after this returns: the work goes to a task.
async fn on_push(
    event: SlackPushEventCallback,
    _client: Arc<Client>,
    states: SlackClientEventsUserState,
) -> UserCallbackResult<()> {
    if let Some(state) = state_of(&states).await {
        handle_push(state, event);
    }
    Ok(())
}

async fn on_interaction(
    event: SlackInteractionEvent,
    _client: Arc<Client>,
    states: SlackClientEventsUserState,
) -> UserCallbackResult<()> {
    if let Some(state) = state_of(&states).await {
        handle_interaction(state, event);
    }
    Ok(())
}

struct HttpState {
    state: Arc<State>,
    verifier: SlackEventSignatureVerifier,
}

/// The Events API endpoint: signature and 5-minute replay window first, then the
/// url_verification handshake, events, and (form-encoded) interactions.
async fn http_event(
    axum::extract::State(http): axum::extract::State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (signature, timestamp) = (
        header(SlackEventSignatureVerifier::SLACK_SIGNED_HASH_HEADER),
        header(SlackEventSignatureVerifier::SLACK_SIGNED_TIMESTAMP),
    );
    if let Err(e) = http.verifier.verify(&signature, &body, &timestamp) {
        tracing::warn!(error = %e, "rejected a Slack request: bad signature or stale timestamp");
        return (StatusCode::UNAUTHORIZED, "invalid signature or stale timestamp").into_response();
    }
    if header("content-type").starts_with("application/x-www-form-urlencoded") {
        let payload = form_urlencoded::parse(body.as_bytes())
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| v.into_owned());
        return match payload.and_then(|p| serde_json::from_str::<SlackInteractionEvent>(&p).ok()) {
            Some(event) => {
                handle_interaction(http.state.clone(), event);
                StatusCode::OK.into_response()
            }
            None => (StatusCode::BAD_REQUEST, "unreadable interaction payload").into_response(),
        };
    }
    match serde_json::from_str::<SlackPushEvent>(&body) {
        Ok(SlackPushEvent::UrlVerification(v)) => axum::Json(json!({ "challenge": v.challenge })).into_response(),
        Ok(SlackPushEvent::EventCallback(event)) => {
            handle_push(http.state.clone(), event);
            StatusCode::OK.into_response()
        }
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("unreadable event: {e}")).into_response(),
    }
}

/// The files of a message, fetched with the bot token when a run is prepared.
fn slack_files(files: Option<&[SlackFile]>) -> Vec<Attachment> {
    files
        .unwrap_or_default()
        .iter()
        .filter_map(|f| {
            let url = f.url_private_download.as_ref().or(f.url_private.as_ref())?;
            Some(Attachment {
                name: f.name.clone().unwrap_or_else(|| f.id.0.clone()),
                source: AttachmentSource::Url {
                    url: url.to_string(),
                    auth: "slack".into(),
                },
            })
        })
        .collect()
}

/// Turns an event into a [`Message`] for the core, off the caller's task.
fn handle_push(state: Arc<State>, event: SlackPushEventCallback) {
    let message = match event.event {
        // Top-level mentions arrive twice (app_mention and message): only app_mention counts.
        SlackEventCallbackBody::AppMention(ev) => Some(Message {
            link: state.thread_link(&ev.channel.0, &ev.origin.thread_ts.as_ref().unwrap_or(&ev.origin.ts).0),
            channel: ev.channel.0,
            thread: ev.origin.thread_ts.map(|t| t.0),
            id: ev.origin.ts.0,
            sender: Sender {
                id: ev.user.0,
                ..Default::default()
            },
            attachments: slack_files(ev.content.files.as_deref()),
            text: ev.content.text.unwrap_or_default(),
            mentions_bot: true,
        }),
        SlackEventCallbackBody::Message(ev) if ev.origin.thread_ts.is_some() && ev.subtype.is_none() => {
            let attachments = slack_files(ev.content.as_ref().and_then(|c| c.files.as_deref()));
            let text = ev.content.and_then(|c| c.text).unwrap_or_default();
            if text.contains(&format!("<@{}>", state.bot_user)) {
                None // handled as app_mention
            } else {
                Some(Message {
                    link: None,
                    channel: ev.origin.channel.map(|c| c.0).unwrap_or_default(),
                    thread: ev.origin.thread_ts.map(|t| t.0),
                    id: ev.origin.ts.0,
                    sender: Sender {
                        is_bot: ev.sender.bot_id.is_some()
                            || ev.sender.user.as_ref().is_some_and(|u| u.0 == state.bot_user),
                        id: ev.sender.user.map(|u| u.0).unwrap_or_default(),
                        ..Default::default()
                    },
                    text,
                    mentions_bot: false,
                    attachments,
                })
            }
        }
        _ => None,
    };
    if let Some(mut msg) = message {
        tokio::spawn(async move {
            if !msg.sender.is_bot {
                msg.sender.roles = state.groups_of(&msg.sender.id).await;
            }
            let (channel, ts, user, thread) = (
                msg.channel.clone(),
                msg.id.clone(),
                msg.sender.id.clone(),
                msg.thread.clone(),
            );
            let outcome = state.core.on_message(msg).await;
            act(
                &state,
                outcome,
                &channel,
                &user,
                thread.as_deref().or(Some(&ts)),
                Some(&ts),
            )
            .await;
        });
    }
}

/// Turns button clicks into [`Click`]s for the core, off the caller's task.
fn handle_interaction(state: Arc<State>, event: SlackInteractionEvent) {
    let SlackInteractionEvent::BlockActions(ev) = event else {
        return;
    };
    let user = ev.user.map(|u| u.id.0).unwrap_or_default();
    let channel = ev.channel.map(|c| c.id.0).unwrap_or_default();
    // The thread of the clicked message: private answers go there, not to the channel.
    let thread = ev.message.and_then(|m| m.origin.thread_ts).map(|t| t.0);
    for action in ev.actions.unwrap_or_default() {
        let (Some(kind), Some(run_id)) = (action_from(&action.action_id.0), action.value.clone()) else {
            continue;
        };
        let click = Click {
            id: format!("{}:{}", ev.trigger_id.0, action.action_id.0),
            action: kind,
            run_id,
            sender: Sender {
                id: user.clone(),
                ..Default::default()
            },
        };
        let (state, user, channel, thread) = (state.clone(), user.clone(), channel.clone(), thread.clone());
        let mut click = click;
        tokio::spawn(async move {
            click.sender.roles = state.groups_of(&user).await;
            let outcome = state.core.on_click(click).await;
            act(&state, outcome, &channel, &user, thread.as_deref(), None).await;
        });
    }
}

/// Says in Slack what the core decided.
async fn act(
    state: &State,
    outcome: Outcome,
    channel: &str,
    user: &str,
    thread: Option<&str>,
    message_ts: Option<&str>,
) {
    let say = SlackSay {
        state,
        channel,
        user,
        thread,
        message_ts,
    };
    outcome.say_with(&say).await;
}

/// Where in Slack an outcome is said: the thread, with an eyes reaction on the message
/// that queued a run, and ephemeral messages to the sender in the thread they used.
struct SlackSay<'a> {
    state: &'a State,
    channel: &'a str,
    user: &'a str,
    thread: Option<&'a str>,
    message_ts: Option<&'a str>,
}

#[async_trait::async_trait]
impl Say for SlackSay<'_> {
    async fn queued(&self, thread: &ThreadRef, _submitted: &Submitted, text: &str) {
        if let Some(ts) = self.message_ts {
            self.state.surface.react(&thread.channel, ts).await;
        }
        self.state.surface.say(thread, text).await;
    }
    async fn reply(&self, thread: &ThreadRef, text: &str) {
        self.state.surface.say(thread, text).await;
    }
    async fn private(&self, text: &str) {
        self.state
            .surface
            .whisper(self.channel, self.user, self.thread, text)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_groups_are_told_from_users() {
        assert!(is_usergroup("S0REVIEW") && is_usergroup("S123ABC"));
        assert!(!is_usergroup("U123ABC") && !is_usergroup("W1") && !is_usergroup("S") && !is_usergroup("Sx1"));
    }

    #[test]
    fn a_pull_request_link_is_a_url_button_slack_accepts() {
        let card = crate::bots::render::tests::card_with_pull_request();
        let blocks = card_blocks(&card);
        let button = &blocks[1]["elements"][0];
        assert_eq!(button["url"], "https://gh/o/r/pull/4");
        assert_eq!(button["text"]["text"], "View PR #4");
        // Its clicks are not actions of ours.
        assert_eq!(action_from(button["action_id"].as_str().unwrap()), None);
        // slack-morphism takes it as a button with its url (a dropped block would be silent).
        let parsed: Vec<SlackBlock> = serde_json::from_value(blocks.clone()).unwrap();
        assert_eq!(
            serde_json::to_value(&parsed).unwrap()[1]["elements"][0]["url"],
            button["url"]
        );
        assert!(
            blocks[0]["text"]["text"]
                .as_str()
                .unwrap()
                .contains("<https://gh/o/r/pull/4|PR #4>")
        );
    }

    #[test]
    fn a_long_answer_fits_a_section_and_says_where_the_rest_is() {
        let mut card = crate::bots::render::tests::card_with_pull_request();
        card.summary = Some("<&> an answer line that goes on\n".repeat(400));
        card.usage = Some("12.3k in · 450 out · $0.04".into());
        card.progress = Some("editing src/x.rs · 3 tool calls".into());
        let blocks = card_blocks(&card);
        let text = blocks[0]["text"]["text"].as_str().unwrap();
        assert!(text.chars().count() <= 3000, "Slack's limit: {}", text.chars().count());
        assert!(text.contains("the rest of the answer is in the web chat"), "{text}");
        assert!(text.contains("&lt;&amp;&gt; an answer line"), "escaped");
        assert!(
            text.contains("12.3k in · 450 out · $0.04") && text.contains("_editing src/x.rs"),
            "{text}"
        );
    }
}
