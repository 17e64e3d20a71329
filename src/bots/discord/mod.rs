//! The Discord adapter: serenity's gateway for messages and button clicks, and a small
//! REST client of our own for what the bot sends (serenity drops Discord's
//! `retry_after` when its rate limiter is off, which it must be to use another API base).
//! It translates only: [`ChatCore`] decides, [`StatusUpdater`] keeps the status message.

mod rest;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Value, json};
use serenity::all::{ComponentInteraction, Context, EventHandler, GatewayIntents, Interaction, Ready};
use serenity::async_trait;
use tokio_util::sync::CancellationToken;

use super::chat::{ChatCore, ChatError, ChatSurface, Click, Message, Say, Sender, StatusUpdater, ThreadRef};
use super::render::{Action, Markup, StatusCard, card_text};
use crate::config::DiscordConfig;
use crate::model::RunState;
use crate::orchestrator::{Orchestrator, Submitted};
pub use rest::Rest;

const SURFACE: &str = "discord";

#[derive(Debug, thiserror::Error)]
pub enum DiscordError {
    #[error("cannot set up TLS for Discord ({0}); install the ca-certificates package")]
    Tls(std::io::Error),
    #[error("the Discord gateway failed: {0}")]
    Gateway(String),
}

/// Posts and edits status messages in threads.
pub struct DiscordSurface {
    rest: Rest,
}

impl ChatSurface for DiscordSurface {
    fn name(&self) -> &'static str {
        SURFACE
    }

    async fn post_status(&self, thread: &ThreadRef, card: &StatusCard) -> Result<String, ChatError> {
        let sent = self
            .rest
            .call(
                "POST",
                &format!("/channels/{}/messages", thread.thread),
                Some(card_message(card)),
            )
            .await?;
        Ok(sent["id"].as_str().unwrap_or_default().to_owned())
    }

    async fn update_status(&self, thread: &ThreadRef, message_id: &str, card: &StatusCard) -> Result<(), ChatError> {
        self.rest
            .call(
                "PATCH",
                &format!("/channels/{}/messages/{message_id}", thread.thread),
                Some(card_message(card)),
            )
            .await
            .map(|_| ())
    }
}

/// Discord's markdown. Text from a run has the characters of masked links and mentions
/// escaped, so no disguised link or ping from an agent gets through.
struct DiscordMarkdown;

impl Markup for DiscordMarkdown {
    fn link(&self, url: &str, text: &str) -> String {
        format!("[{text}]({url})")
    }
    fn emphasis(&self, text: &str) -> String {
        format!("*{text}*")
    }
    fn warning(&self) -> &'static str {
        "⚠️"
    }
    fn escape(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if "[]<>@".contains(c) {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }
    fn log_block(&self, lines: &[String]) -> String {
        let log: Vec<String> = lines.iter().map(|l| l.replace("```", "'''")).collect();
        format!("```\n{}\n```", log.join("\n"))
    }
}

/// The card as a Discord message: an embed and a row of buttons.
pub fn card_message(card: &StatusCard) -> Value {
    let color = match card.state {
        RunState::Succeeded => 0x1f8a4c,
        RunState::Failed | RunState::TimedOut => 0xc0362c,
        RunState::Cancelled => 0xb7791f,
        _ => 0x3057d5,
    };
    let text = card_text(card, &DiscordMarkdown);
    let description = text.lines.into_iter().chain(text.log).collect::<Vec<_>>().join("\n");
    let buttons: Vec<Value> = card
        .buttons
        .iter()
        .map(|b| {
            let style = match b.action {
                Action::Cancel => 4,
                Action::Retry => 1,
                Action::OpenPr => 3,
            };
            match &b.url {
                // A link button (style 5) has a url and no custom id.
                Some(url) => json!({"type": 2, "style": 5, "label": b.label, "url": url}),
                None => {
                    json!({"type": 2, "style": style, "label": b.label, "custom_id": custom_id(b.action, &b.run_id)})
                }
            }
        })
        .collect();
    let components = if buttons.is_empty() {
        json!([])
    } else {
        json!([{"type": 1, "components": buttons}])
    };
    json!({
        "content": "",
        "embeds": [{"title": text.title, "description": description, "color": color}],
        "components": components,
    })
}

fn custom_id(action: Action, run_id: &str) -> String {
    format!("threadline:{}:{run_id}", action.key())
}

fn parse_custom_id(id: &str) -> Option<(Action, String)> {
    let (name, run) = id.strip_prefix("threadline:")?.split_once(':')?;
    Some((Action::from_key(name)?, run.to_owned()))
}

struct Handler {
    core: ChatCore,
    rest: Rest,
    bot: OnceLock<u64>,
    /// thread id → parent channel id, as Discord said.
    parents: Mutex<HashMap<String, Option<String>>>,
}

impl Handler {
    /// The parent channel of a thread (None for a channel that is not a thread).
    async fn parent_of(&self, channel: &str) -> Option<String> {
        if let Some(known) = self.parents.lock().unwrap().get(channel) {
            return known.clone();
        }
        let parent = match self.rest.call("GET", &format!("/channels/{channel}"), None).await {
            Ok(c) if matches!(c["type"].as_u64(), Some(10..=12)) => c["parent_id"].as_str().map(str::to_owned),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(channel, error = %e, "cannot look up a Discord channel");
                return None;
            }
        };
        self.parents.lock().unwrap().insert(channel.to_owned(), parent.clone());
        parent
    }

    async fn say(&self, channel: &str, text: &str, reply_to: Option<&str>) {
        let mut body = json!({"content": text, "allowed_mentions": {"parse": []}});
        if let Some(id) = reply_to {
            body["message_reference"] = json!({"message_id": id, "fail_if_not_exists": false});
        }
        if let Err(e) = self
            .rest
            .call("POST", &format!("/channels/{channel}/messages"), Some(body))
            .await
        {
            tracing::warn!(error = %e, "cannot reply in Discord");
        }
    }
}

#[async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _ctx: Context, ready: Ready) {
        let _ = self.bot.set(ready.user.id.get());
        tracing::info!(bot = %ready.user.name, "connected to Discord");
    }

    async fn message(&self, ctx: Context, msg: serenity::all::Message) {
        if msg.author.bot {
            return;
        }
        // Handlers run concurrently: a message right after READY may be handled before
        // `ready` is, but serenity's cache has READY's user by then.
        let bot = match self.bot.get() {
            Some(id) => *id,
            None => ctx.cache.current_user().id.get(),
        };
        let channel = msg.channel_id.get().to_string();
        let (parent, thread) = if self.core.binding(&channel).is_some() {
            (channel.clone(), None)
        } else {
            match self.parent_of(&channel).await {
                Some(parent) => (parent, Some(channel.clone())),
                None => (channel.clone(), None),
            }
        };
        // A thread started from a message has that message's id.
        let thread_id = thread.clone().unwrap_or_else(|| msg.id.get().to_string());
        let link = msg
            .guild_id
            .map(|g| format!("https://discord.com/channels/{g}/{thread_id}"));
        let message = Message {
            link,
            channel: parent,
            thread: thread.clone(),
            id: msg.id.get().to_string(),
            sender: sender(&msg.author, msg.member.as_ref().map(|m| &m.roles[..])),
            text: msg.content.clone(),
            mentions_bot: msg.mentions.iter().any(|u| u.id.get() == bot),
            attachments: msg
                .attachments
                .iter()
                .map(|a| crate::model::Attachment {
                    name: a.filename.clone(),
                    source: crate::model::AttachmentSource::Url {
                        url: a.url.clone(),
                        auth: "none".into(),
                    },
                })
                .collect(),
        };
        let say = MessageSay {
            handler: self,
            channel: &channel,
            message_id: msg.id.get().to_string(),
            top_level: thread.is_none(),
        };
        self.core.on_message(message).await.say_with(&say).await;
    }

    async fn interaction_create(&self, _ctx: Context, interaction: Interaction) {
        let Interaction::Component(component) = interaction else {
            return;
        };
        self.click(component).await;
    }
}

impl Handler {
    /// Answers a button within Discord's 3 seconds: the decision first, the response after.
    async fn click(&self, c: ComponentInteraction) {
        let respond = |body: Value| {
            let path = format!("/interactions/{}/{}/callback", c.id.get(), c.token);
            let rest = self.rest.clone();
            async move {
                if let Err(e) = rest.call("POST", &path, Some(body)).await {
                    tracing::warn!(error = %e, "cannot answer a Discord interaction");
                }
            }
        };
        let Some((action, run_id)) = parse_custom_id(&c.data.custom_id) else {
            return respond(json!({"type": 6})).await;
        };
        let click = Click {
            id: c.id.get().to_string(),
            action,
            run_id,
            sender: sender(&c.user, c.member.as_ref().map(|m| &m.roles[..])),
        };
        // The decision goes on in its own task: Open PR calls a forge and may take longer
        // than Discord waits, and it must not be dropped halfway.
        let core = self.core.clone();
        let mut decision = tokio::spawn(async move { core.on_click(click).await });
        let outcome = match tokio::time::timeout(std::time::Duration::from_millis(2500), &mut decision).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "a Discord click failed");
                let text = "Something went wrong handling that click; try again.";
                return respond(json!({"type": 4, "data": {"content": text, "flags": 64}})).await;
            }
            Err(_) => {
                let text = "Still working on it; the result will be posted here.";
                respond(json!({"type": 4, "data": {"content": text, "flags": 64}})).await;
                let Ok(late) = decision.await else { return };
                let here = c.channel_id.get().to_string();
                late.say_with(&LateSay { handler: self, here }).await;
                return;
            }
        };
        let say = ClickSay {
            handler: self,
            respond: &respond,
        };
        outcome.say_with(&say).await;
    }
}

/// Where a message's outcome is said: a run queued from a message outside a thread gets
/// a thread opened on that message (same id), the acknowledgment goes in the thread, and
/// a refusal replies to the message.
struct MessageSay<'a> {
    handler: &'a Handler,
    channel: &'a str,
    message_id: String,
    top_level: bool,
}

#[async_trait]
impl Say for MessageSay<'_> {
    async fn queued(&self, thread: &ThreadRef, submitted: &Submitted, text: &str) {
        if self.top_level {
            let name: String = submitted.pipeline.title.chars().take(90).collect();
            let body = json!({"name": if name.is_empty() { "threadline".to_owned() } else { name }, "auto_archive_duration": 1440});
            let path = format!("/channels/{}/messages/{}/threads", thread.channel, thread.thread);
            if let Err(e) = self.handler.rest.call("POST", &path, Some(body)).await {
                tracing::warn!(error = %e, "cannot open a Discord thread");
            }
        }
        // A thread started from a message has that message's id.
        self.handler.say(&thread.thread, text, None).await;
    }
    async fn reply(&self, thread: &ThreadRef, text: &str) {
        if self.top_level {
            self.handler.say(&thread.channel, text, Some(&thread.thread)).await
        } else {
            self.handler.say(&thread.thread, text, None).await
        }
    }
    async fn private(&self, text: &str) {
        self.handler.say(self.channel, text, Some(&self.message_id)).await
    }
}

/// A click answered in time: the interaction gets its response (an ephemeral message for
/// what is private, an acknowledgment otherwise) and the thread what is public.
struct ClickSay<'a, R> {
    handler: &'a Handler,
    respond: &'a R,
}

#[async_trait]
impl<R, F> Say for ClickSay<'_, R>
where
    R: Fn(Value) -> F + Send + Sync,
    F: std::future::Future<Output = ()> + Send,
{
    async fn queued(&self, thread: &ThreadRef, _submitted: &Submitted, text: &str) {
        (self.respond)(json!({"type": 6})).await;
        self.handler.say(&thread.thread, text, None).await;
    }
    async fn reply(&self, thread: &ThreadRef, text: &str) {
        (self.respond)(json!({"type": 6})).await;
        self.handler.say(&thread.thread, text, None).await;
    }
    async fn private(&self, text: &str) {
        (self.respond)(json!({"type": 4, "data": {"content": text, "flags": 64}})).await;
    }
    async fn nothing(&self) {
        (self.respond)(json!({"type": 6})).await;
    }
}

/// A click decided after Discord stopped waiting: everything goes to the channel.
struct LateSay<'a> {
    handler: &'a Handler,
    here: String,
}

#[async_trait]
impl Say for LateSay<'_> {
    async fn queued(&self, thread: &ThreadRef, _submitted: &Submitted, text: &str) {
        self.handler.say(&thread.thread, text, None).await;
    }
    async fn reply(&self, thread: &ThreadRef, text: &str) {
        self.handler.say(&thread.thread, text, None).await;
    }
    async fn private(&self, text: &str) {
        self.handler.say(&self.here, text, None).await;
    }
}

/// Who sent a message or clicked, with their roles in the guild.
fn sender(user: &serenity::all::User, roles: Option<&[serenity::all::RoleId]>) -> Sender {
    Sender {
        id: user.id.get().to_string(),
        roles: roles.unwrap_or_default().iter().map(|r| r.get().to_string()).collect(),
        is_bot: false,
        name: user.name.clone(),
    }
}

/// Connects to the gateway and runs until `shutdown`.
pub async fn start(
    orch: Orchestrator,
    config: &DiscordConfig,
    shutdown: CancellationToken,
) -> Result<(), DiscordError> {
    let rest = Rest::new(&config.api_url, config.token.expose()).map_err(DiscordError::Tls)?;
    orch.metrics().register_platform(SURFACE);
    let core = ChatCore::new(orch.clone(), SURFACE, config.channels.clone());
    let surface = Arc::new(DiscordSurface { rest: rest.clone() });
    let updater = tokio::spawn(StatusUpdater::new(core.clone(), surface).run(shutdown.clone()));
    let handler = Handler {
        core,
        rest,
        bot: OnceLock::new(),
        parents: Mutex::new(HashMap::new()),
    };
    // Without serenity's rate limiter requests honour the API base (see FIELD-NOTES);
    // our own REST client honours Discord's retry_after instead.
    let http = serenity::http::HttpBuilder::new(config.token.expose())
        .proxy(config.api_url.trim_end_matches('/'))
        .ratelimiter_disabled(true)
        .build();
    let intents = GatewayIntents::GUILDS | GatewayIntents::GUILD_MESSAGES | GatewayIntents::MESSAGE_CONTENT;
    let mut client = serenity::all::ClientBuilder::new_with_http(http, intents)
        .event_handler(handler)
        .await
        .map_err(|e| DiscordError::Gateway(e.to_string()))?;
    let shards = client.shard_manager.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        shards.shutdown_all().await;
    });
    let result = client.start().await.map_err(|e| DiscordError::Gateway(e.to_string()));
    shutdown.cancel();
    let _ = updater.await;
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pull_request_link_is_a_link_button() {
        let message = card_message(&crate::bots::render::tests::card_with_pull_request());
        let button = &message["components"][0]["components"][0];
        assert_eq!(button["style"], 5);
        assert_eq!(button["url"], "https://gh/o/r/pull/4");
        assert!(button.get("custom_id").is_none());
    }

    use super::*;

    #[test]
    fn custom_ids_round_trip() {
        for a in [Action::Cancel, Action::Retry, Action::OpenPr] {
            assert_eq!(parse_custom_id(&custom_id(a, "p1-2")), Some((a, "p1-2".to_owned())));
        }
        assert_eq!(parse_custom_id("other:cancel:x"), None);
    }
}
