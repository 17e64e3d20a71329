//! What every chat platform shares, so the Slack and Discord adapters only translate:
//! channel bindings, reading a prompt out of a message, deciding what a message or a
//! button click means ([`ChatCore`]), and keeping one status message per run up to date
//! within a platform's rate limits ([`StatusUpdater`]).
//!
//! `policy.rs` says who may prompt and approve in a channel, `prompt.rs` reads a prompt
//! out of a message, `status.rs` keeps the status messages; what a message or a click
//! means is here.

mod policy;
use policy::allowed;
mod prompt;
pub use prompt::split_mode;
mod status;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use prompt::{ParsedPrompt, parse_prompt};
pub use status::{ChatError, ChatSurface, StatusUpdater, deliver};

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::render::{Action, StatusCard, card_in_context, pull_request_refused, pull_request_said};
pub use crate::config::ChannelBinding;
use crate::config::{FollowUps, RunMode};
use crate::model::{Origin, Run};
use crate::orchestrator::{FollowUp, NewAttachment, NewPipeline, Orchestrator, RunUpdate, SubmitError, Submitted};

/// Who sent a message or clicked.
#[derive(Debug, Clone, Default)]
pub struct Sender {
    pub id: String,
    /// Discord role ids, or the Slack user groups (`S…`) named in the config that the
    /// sender is in; they count like user ids in prompters and approvers.
    pub roles: Vec<String>,
    pub is_bot: bool,
    /// A name to show (Discord's user name); empty where the platform gives only ids.
    pub name: String,
}

/// A message as an adapter saw it.
#[derive(Debug, Clone)]
pub struct Message {
    pub channel: String,
    /// The thread it was posted in; None at the channel's top level.
    pub thread: Option<String>,
    /// Its own id (Slack `ts`, Discord message id): the thread a mention starts.
    pub id: String,
    pub sender: Sender,
    pub text: String,
    pub mentions_bot: bool,
    /// A link to the thread this message starts or belongs to, for the dashboard.
    pub link: Option<String>,
    /// Files attached to it, where the platform keeps them.
    pub attachments: Vec<crate::model::Attachment>,
}

/// A button click as an adapter saw it.
#[derive(Debug, Clone)]
pub struct Click {
    /// The click's own id (Slack trigger id, Discord interaction id).
    pub id: String,
    pub action: Action,
    pub run_id: String,
    pub sender: Sender,
}

/// A thread on a platform: a channel and the id of the thread's first message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ThreadRef {
    pub channel: String,
    pub thread: String,
}

impl ThreadRef {
    fn origin_key(&self) -> String {
        format!("{}/{}", self.channel, self.thread)
    }
    fn parse(origin_thread: &str) -> Option<ThreadRef> {
        let (channel, thread) = origin_thread.split_once('/')?;
        Some(ThreadRef {
            channel: channel.to_owned(),
            thread: thread.to_owned(),
        })
    }
}

/// What an adapter should do about a message or click.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing: bots, chatter, messages in threads that are not ours.
    Ignored,
    /// A run was queued (or found again, for a redelivery): acknowledge in the thread.
    Queued {
        thread: ThreadRef,
        submitted: Box<Submitted>,
        text: String,
    },
    /// Done; the status message shows the rest.
    Done,
    /// Say this in the thread (bad input, an unbound channel).
    Reply { thread: ThreadRef, text: String },
    /// Say this to the sender only (a refusal).
    Private { text: String },
}

/// How a platform says what the core decided. [`Outcome::say_with`] is the one place
/// that maps an outcome to these calls: a redelivered prompt (its run found again) is not
/// acknowledged twice, and an ignored or finished one says nothing.
#[async_trait::async_trait]
pub trait Say: Send + Sync {
    /// A new run was queued from a message in `thread`: acknowledge it there.
    async fn queued(&self, thread: &ThreadRef, submitted: &Submitted, text: &str);
    /// Say this in the thread.
    async fn reply(&self, thread: &ThreadRef, text: &str);
    /// Say this to the sender only.
    async fn private(&self, text: &str);
    /// Nothing to say (a platform may still have to answer, as Discord's interactions do).
    async fn nothing(&self) {}
}

impl Outcome {
    pub async fn say_with(self, say: &impl Say) {
        match self {
            Outcome::Queued {
                thread,
                submitted,
                text,
            } if submitted.created => say.queued(&thread, &submitted, &text).await,
            Outcome::Reply { thread, text } => say.reply(&thread, &text).await,
            Outcome::Private { text } => say.private(&text).await,
            Outcome::Queued { .. } | Outcome::Ignored | Outcome::Done => say.nothing().await,
        }
    }
}

/// The decisions shared by every chat platform.
#[derive(Clone)]
pub struct ChatCore {
    orch: Orchestrator,
    surface: &'static str,
    bindings: Arc<BTreeMap<String, ChannelBinding>>,
}

impl ChatCore {
    pub fn new(orch: Orchestrator, surface: &'static str, bindings: BTreeMap<String, ChannelBinding>) -> Self {
        ChatCore {
            orch,
            surface,
            bindings: Arc::new(bindings),
        }
    }

    pub fn binding(&self, channel: &str) -> Option<&ChannelBinding> {
        self.bindings.get(channel)
    }

    /// Decides what a message means: a new pipeline, a follow-up, or nothing.
    pub async fn on_message(&self, msg: Message) -> Outcome {
        if msg.sender.is_bot {
            return Outcome::Ignored;
        }
        if let Some(thread) = &msg.thread
            && *thread != msg.id
        {
            return self.in_thread(&msg, thread).await;
        }
        if !msg.mentions_bot {
            return Outcome::Ignored;
        }
        let here = ThreadRef {
            channel: msg.channel.clone(),
            thread: msg.id.clone(),
        };
        let Some(binding) = self.binding(&msg.channel) else {
            let repos = self.orch.config().repos.keys().cloned().collect::<Vec<_>>();
            return Outcome::Reply {
                thread: here,
                text: format!(
                    "This channel is not bound to a repository yet. Bind it in Threadline's config under \
                     `[{}.channels.{}]` with `repos = [\"NAME\"]` (configured repositories: {}).",
                    self.surface,
                    msg.channel,
                    if repos.is_empty() {
                        "none yet".to_owned()
                    } else {
                        repos.join(", ")
                    }
                ),
            };
        };
        if !binding.may_prompt(&msg.sender) {
            return Outcome::Private {
                text: "You are not allowed to start agents in this channel; ask someone who is.".into(),
            };
        }
        let parsed = parse_prompt(&msg.text);
        let choices: Vec<String> = if binding.repos.is_empty() {
            self.orch.config().repos.keys().cloned().collect()
        } else {
            binding.repos.clone()
        };
        let repo_name = match parsed.repo.clone().or_else(|| choices.first().cloned()) {
            Some(name) if choices.contains(&name) => name,
            Some(name) => {
                return Outcome::Reply {
                    thread: here,
                    text: format!(
                        "There is no repository {name:?} here. Pick one with repo=NAME: {}.",
                        choices.join(", ")
                    ),
                };
            }
            None => {
                return Outcome::Reply {
                    thread: here,
                    text: "No repositories are configured; add one under [repos.NAME] in Threadline's config.".into(),
                };
            }
        };
        let Some(repo) = self.orch.config().repos.get(&repo_name).cloned() else {
            return Outcome::Reply {
                thread: here,
                text: format!("The repository {repo_name:?} is bound here but not configured under [repos]."),
            };
        };
        let request = NewPipeline {
            repo: repo.url.clone(),
            base_branch: repo.base_branch.clone(),
            agent: parsed.agent.or_else(|| binding.agent.clone()).or(repo.agent.clone()),
            prompt: parsed.prompt,
            requested_by: format!("{}:{}", self.surface, msg.sender.id),
            origin: Origin {
                surface: self.surface.to_owned(),
                thread: here.origin_key(),
                url: msg.link.clone().unwrap_or_default(),
            },
            idempotency_key: Some(format!("{}:{}:{}", self.surface, msg.channel, msg.id)),
            mode: parsed.mode.unwrap_or(binding.mode),
            attachments: msg.attachments.iter().cloned().map(NewAttachment::Source).collect(),
        };
        queued(here, self.orch.submit_pipeline(request).await, |submitted| {
            let what = match submitted.run.mode {
                RunMode::Ask => "a question (read-only; nothing is committed)",
                RunMode::Change => "a change",
            };
            format!(
                "On it, {what}: pipeline `{}` on {repo_name}, branch `{}` from `{}`, agent {}.",
                submitted.pipeline.id, submitted.pipeline.branch, submitted.pipeline.base_branch, submitted.run.agent
            )
        })
    }

    async fn in_thread(&self, msg: &Message, thread: &str) -> Outcome {
        let here = ThreadRef {
            channel: msg.channel.clone(),
            thread: thread.to_owned(),
        };
        let origin = Origin {
            surface: self.surface.to_owned(),
            thread: here.origin_key(),
            url: String::new(),
        };
        let pipeline = match self.orch.queries().pipeline_by_origin(&origin).await {
            Ok(Some(p)) => p,
            Ok(None) if msg.mentions_bot => {
                return Outcome::Reply {
                    thread: here,
                    text: "This thread has no pipeline (it may have been removed). Mention me at the top of the \
                           channel to start one."
                        .into(),
                };
            }
            Ok(None) => return Outcome::Ignored,
            Err(e) => {
                return Outcome::Reply {
                    thread: here,
                    text: format!("Threadline cannot read its store right now ({e}); try again in a moment."),
                };
            }
        };
        let binding = self.binding(&msg.channel).cloned().unwrap_or_default();
        let allowed = binding.may_prompt(&msg.sender);
        if allowed && (msg.mentions_bot || binding.follow_ups == FollowUps::All) {
            // A follow-up, below.
        } else if msg.mentions_bot {
            return Outcome::Private {
                text: "You are not allowed to prompt the agent in this thread.".into(),
            };
        } else {
            // Discussion: context for the thread's next run.
            let author = if msg.sender.name.is_empty() {
                msg.sender.id.clone()
            } else {
                format!("{} ({})", msg.sender.name, msg.sender.id)
            };
            self.orch
                .note_thread_message(&pipeline.id, &msg.id, &author, &msg.text, &msg.attachments)
                .await;
            return Outcome::Ignored;
        }
        let parsed = parse_prompt(&msg.text);
        if parsed.repo.is_some() {
            return Outcome::Reply {
                thread: here,
                text: "A thread stays on its repository; start a new thread for another one.".into(),
            };
        }
        let request = FollowUp {
            pipeline_id: pipeline.id.clone(),
            prompt: parsed.prompt,
            agent: parsed.agent,
            requested_by: format!("{}:{}", self.surface, msg.sender.id),
            idempotency_key: Some(format!("{}:{}:{}", self.surface, msg.channel, msg.id)),
            mode: parsed.mode.unwrap_or(binding.mode),
            attachments: msg.attachments.iter().cloned().map(NewAttachment::Source).collect(),
        };
        queued(
            here,
            self.orch.submit_follow_up(request).await,
            |submitted| match submitted.ahead {
                0 => format!("Follow-up queued as run {}; it starts now.", submitted.run.seq),
                n => format!(
                    "Follow-up queued as run {}, behind {n} run(s) of this thread.",
                    submitted.run.seq
                ),
            },
        )
    }

    /// Acts on a button, if the clicker may.
    pub async fn on_click(&self, click: Click) -> Outcome {
        let Ok(run) = self.orch.find_run(&click.run_id).await else {
            return Outcome::Private {
                text: "That run no longer exists.".into(),
            };
        };
        let Ok(Some(pipeline)) = self.orch.queries().pipeline(&run.pipeline_id).await else {
            return Outcome::Private {
                text: "That run's pipeline no longer exists.".into(),
            };
        };
        let Some(thread) = ThreadRef::parse(&pipeline.origin.thread) else {
            return Outcome::Private {
                text: "That run was not started from this chat.".into(),
            };
        };
        let binding = self.binding(&thread.channel).cloned().unwrap_or_default();
        if click.action == Action::OpenPr {
            return self.open_pr(&click, &run, &pipeline, thread, &binding).await;
        }
        if !binding.may_approve(&click.sender) {
            return Outcome::Private {
                text: format!(
                    "You are not allowed to {} runs here; nothing was changed.",
                    click.action.label().to_lowercase()
                ),
            };
        }
        let result = match click.action {
            Action::Cancel => self.orch.cancel(&run.id).await.map(|_| Outcome::Done),
            Action::Retry => self
                .orch
                .retry(
                    &run.id,
                    &format!("{}:{}", self.surface, click.sender.id),
                    Some(format!("{}:click:{}", self.surface, click.id)),
                )
                .await
                .map(|submitted| Outcome::Queued {
                    text: format!("Retrying as run {}.", submitted.run.seq),
                    thread: thread.clone(),
                    submitted: Box::new(submitted),
                }),
            Action::OpenPr => unreachable!("handled above"),
        };
        result.unwrap_or_else(|e| Outcome::Private { text: sentence(&e) })
    }

    /// Open PR: the approval policy of the channel and the repository, then the
    /// orchestrator. Every decision is recorded; a refusal changes nothing else.
    async fn open_pr(
        &self,
        click: &Click,
        run: &Run,
        pipeline: &crate::model::Pipeline,
        thread: ThreadRef,
        binding: &ChannelBinding,
    ) -> Outcome {
        let actor = format!("{}:{}", self.surface, click.sender.id);
        let key = format!("{}:click:{}", self.surface, click.id);
        let (repo, settings) = self.orch.repo_settings(pipeline);
        let prompted = || async {
            let runs = self.orch.queries().runs(&pipeline.id).await.unwrap_or_default();
            runs.iter().any(|r| r.requested_by == actor)
        };
        let refusal = if !binding.may_approve(&click.sender) {
            Some("You are not allowed to approve pull requests in this channel; ask one of its approvers.".to_owned())
        } else if !settings.approvers.is_empty() && !allowed(&settings.approvers, &click.sender) {
            Some(format!(
                "Only the approvers of {repo} may open its pull requests; ask one of them."
            ))
        } else if (binding.require_other_approver || settings.require_other_approver) && prompted().await {
            Some(
                "You prompted this pipeline, and its pull request must be approved by someone else; ask another \
                 approver."
                    .to_owned(),
            )
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.orch.record_approval(&key, run, &actor, false, &reason).await;
            return Outcome::Private {
                text: format!("{reason} Nothing was changed."),
            };
        }
        match self.orch.approve_pull_request(&key, run, &actor).await {
            Ok(done) if done.fresh => Outcome::Reply {
                thread,
                text: pull_request_said(&done),
            },
            Ok(done) => Outcome::Private {
                text: pull_request_said(&done),
            },
            Err(e) => Outcome::Reply {
                thread,
                text: pull_request_refused(&e, self.orch.redactor()),
            },
        }
    }

    /// The card of a run as this surface shows it (the channel's detail level).
    pub async fn card(&self, run: &Run) -> Option<(ThreadRef, StatusCard)> {
        let store = self.orch.queries();
        let pipeline = store.pipeline(&run.pipeline_id).await.ok()??;
        if pipeline.origin.surface != self.surface {
            return None;
        }
        let thread = ThreadRef::parse(&pipeline.origin.thread)?;
        let runs = store.runs(&pipeline.id).await.ok()?;
        let run = runs
            .iter()
            .find(|r| r.id == run.id)
            .cloned()
            .unwrap_or_else(|| run.clone());
        let detail = self.binding(&thread.channel).map(|b| b.detail).unwrap_or_default();
        let view = self.orch.pull_request_view(&pipeline).await;
        let card = card_in_context(&pipeline, &run, &runs, detail, &view, self.orch.redactor());
        Some((thread, card))
    }
}

/// A queued run to acknowledge with `text`, or the submission error as a reply.
fn queued(here: ThreadRef, result: Result<Submitted, SubmitError>, text: impl FnOnce(&Submitted) -> String) -> Outcome {
    match result {
        Ok(submitted) => Outcome::Queued {
            text: text(&submitted),
            thread: here,
            submitted: Box::new(submitted),
        },
        Err(e) => Outcome::Reply {
            thread: here,
            text: sentence(&e),
        },
    }
}

/// A user-facing sentence from a submission error (it already says what to do).
fn sentence(e: &SubmitError) -> String {
    crate::model::sentence(&e.to_string())
}

#[cfg(test)]
mod tests {
    use super::status::{EDIT_INTERVAL, REFRESH_EVERY};
    use super::testing::{CallKind, RecordingSurface};
    use super::*;

    #[test]
    fn prompts_lose_mentions_and_options() {
        let p = parse_prompt("<@U0BOT> repo=api agent=codex add a /health endpoint\nwith a test");
        assert_eq!(p.repo.as_deref(), Some("api"));
        assert_eq!(p.agent.as_deref(), Some("codex"));
        assert_eq!(p.prompt, "add a /health endpoint\nwith a test");
        assert_eq!(parse_prompt("<@U0BOT>").prompt, "");
        assert_eq!(parse_prompt("use repo= literally").prompt, "use repo= literally");
    }

    #[test]
    fn approvers_default_to_prompters() {
        let who = |id: &str| Sender {
            id: id.into(),
            ..Default::default()
        };
        let open = ChannelBinding::default();
        assert!(open.may_prompt(&who("anyone")) && open.may_approve(&who("anyone")));
        let b = ChannelBinding {
            prompters: vec!["U1".into(), "role-dev".into()],
            ..Default::default()
        };
        assert!(b.may_prompt(&who("U1")) && b.may_approve(&who("U1")));
        assert!(!b.may_prompt(&who("U2")));
        let dev = Sender {
            id: "U3".into(),
            roles: vec!["role-dev".into()],
            ..Sender::default()
        };
        assert!(b.may_prompt(&dev));
        let strict = ChannelBinding {
            approvers: vec!["U9".into()],
            ..b
        };
        assert!(strict.may_prompt(&who("U1")) && !strict.may_approve(&who("U1")) && strict.may_approve(&who("U9")));
    }

    fn card(headline: &str, terminal: bool) -> StatusCard {
        StatusCard {
            pipeline_id: "p".into(),
            run_id: "p-1".into(),
            seq: 1,
            state: if terminal {
                crate::model::RunState::Succeeded
            } else {
                crate::model::RunState::Running
            },
            headline: headline.into(),
            terminal,
            elapsed: "0:00".into(),
            accepted_at: 0,
            finished_at: None,
            agent: "a".into(),
            branch: "b".into(),
            branch_url: None,
            commit: None,
            diffstat: None,
            changed: false,
            pushed: false,
            exit_code: None,
            error: None,
            summary: None,
            log_lines: Vec::new(),
            buttons: Vec::new(),
            pull_request: None,
            note: None,
            mode: crate::config::RunMode::Change,
            progress: None,
            blocked: None,
            usage: None,
        }
    }

    async fn run_deliver(rec: Arc<RecordingSurface>, rx: watch::Receiver<StatusCard>) {
        let thread = ThreadRef {
            channel: "C".into(),
            thread: "T".into(),
        };
        deliver(rec.as_ref(), &thread, None, rx, |_| async {}, || {}, || async { None }).await;
    }

    #[tokio::test(start_paused = true)]
    async fn no_fresh_card_edits_nothing() {
        // The store cannot be read, or another front end keeps the message now: the card
        // shown is not sent again over what that one may have shown since.
        let rec = Arc::new(RecordingSurface::new("test"));
        let (tx, rx) = watch::channel(card("running", false));
        let task = tokio::spawn(run_deliver(rec.clone(), rx));
        tokio::time::sleep(REFRESH_EVERY * 4).await;
        assert_eq!(rec.calls().len(), 1, "only the post: {:?}", rec.calls());
        tx.send(card("succeeded", true)).unwrap();
        task.await.unwrap();
        assert_eq!(rec.calls().last().unwrap().card.headline, "succeeded");
    }

    #[tokio::test(start_paused = true)]
    async fn edits_are_throttled_and_the_final_state_always_lands() {
        let rec = Arc::new(RecordingSurface::new("test"));
        let (tx, rx) = watch::channel(card("queued", false));
        let task = tokio::spawn(run_deliver(rec.clone(), rx));
        // A burst of 20 states within 200 ms, the last one final.
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send(card(&format!("step {i}"), i == 19)).unwrap();
        }
        task.await.unwrap();
        let calls = rec.calls();
        assert_eq!(calls.first().unwrap().kind, CallKind::Post);
        assert_eq!(
            calls.last().unwrap().card.headline,
            "step 19",
            "the final state is delivered: {calls:?}"
        );
        assert!(calls.len() <= 3, "a burst collapses into few edits: {calls:?}");
        for pair in calls.windows(2) {
            assert!(
                pair[1].at - pair[0].at >= EDIT_INTERVAL,
                "at most one edit per second: {calls:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_is_waited_out_and_the_latest_card_sent() {
        let rec = Arc::new(RecordingSurface::new("test"));
        rec.rate_limit_next_update(Duration::from_secs(5));
        let (tx, rx) = watch::channel(card("queued", false));
        let task = tokio::spawn(run_deliver(rec.clone(), rx));
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(card("running", false)).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        tx.send(card("succeeded", true)).unwrap();
        task.await.unwrap();
        let calls = rec.calls();
        let kinds: Vec<CallKind> = calls.iter().map(|c| c.kind.clone()).collect();
        assert_eq!(
            kinds,
            [
                CallKind::Post,
                CallKind::RateLimited,
                CallKind::Update("msg-p-1".into())
            ],
            "{calls:?}"
        );
        assert!(
            calls[2].at - calls[1].at >= Duration::from_secs(5),
            "Retry-After honoured"
        );
        assert_eq!(calls[2].card.headline, "succeeded", "the retry carries the newest card");
    }
}
