//! The platform-neutral status message of a run and its buttons. Each chat adapter turns
//! a [`StatusCard`] into its own format (HTML, Block Kit, an embed).

use serde::{Deserialize, Serialize};

use crate::config::ForgeKind;
use crate::model::{Pipeline, Run, RunMode, RunState, format_duration, now_millis};
use crate::model::{capitalize, sentence};
use crate::orchestrator::{NextStep, PullRequestError, PullRequestOutcome, PullRequestView};
use crate::redact::Redactor;

pub use crate::config::Detail;

/// What a button does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Cancel,
    Retry,
    OpenPr,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Cancel, Action::Retry, Action::OpenPr];

    pub fn label(self) -> &'static str {
        match self {
            Action::Cancel => "Cancel",
            Action::Retry => "Retry",
            Action::OpenPr => "Open PR",
        }
    }

    /// The action's name inside a platform's button id.
    pub fn key(self) -> &'static str {
        match self {
            Action::Cancel => "cancel",
            Action::Retry => "retry",
            Action::OpenPr => "open_pr",
        }
    }

    pub fn from_key(key: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.key() == key)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Button {
    pub action: Action,
    pub label: String,
    /// The run the action applies to.
    pub run_id: String,
    /// Set for a link rather than an action: Open PR once the pull request exists.
    pub url: Option<String>,
}

/// A pipeline's pull request as a card shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrLink {
    pub number: i64,
    pub url: String,
    /// `PR #3`, `MR !3`.
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusCard {
    pub pipeline_id: String,
    pub run_id: String,
    pub seq: i64,
    pub state: RunState,
    /// A word or two for humans: "queued (2 ahead)", "running", "succeeded".
    pub headline: String,
    pub terminal: bool,
    /// `m:ss` since the run was accepted (to its end, once it ended).
    pub elapsed: String,
    /// When the run was accepted and ended (ms since the epoch), for live clocks.
    pub accepted_at: crate::model::Millis,
    pub finished_at: Option<crate::model::Millis>,
    pub agent: String,
    pub branch: String,
    pub branch_url: Option<String>,
    pub commit: Option<String>,
    pub diffstat: Option<String>,
    pub changed: bool,
    pub pushed: bool,
    pub exit_code: Option<i64>,
    /// What went wrong and what to do next.
    pub error: Option<String>,
    pub summary: Option<String>,
    pub log_lines: Vec<String>,
    pub buttons: Vec<Button>,
    /// The pipeline's pull request, once there is one.
    pub pull_request: Option<PrLink>,
    /// A line about pull requests: none is possible here and why, or this run updated one.
    pub note: Option<String>,
    /// A change, or a question (answered; nothing committed).
    pub mode: RunMode,
    /// What the agent is doing now (while it runs): `editing src/x.rs · 4 tool calls`;
    /// the step's object only where the detail level allows more than metadata.
    pub progress: Option<String>,
    /// Tokens and cost, where the agent reported them.
    pub usage: Option<String>,
    /// What the egress proxy refused the agent: "blocked 3 requests to example.com".
    pub blocked: Option<String>,
}

/// The most of an agent's answer a chat card shows (Slack's sections hold 3,000
/// characters, Discord's embeds 4,096, and escaping grows the text).
pub const CARD_ANSWER_BYTES: usize = 1500;

/// Log lines a card shows at `Detail::Logs`.
pub const CARD_LOG_LINES: usize = 8;

/// Builds the card of `run`. `ahead` is its place in the queue; `branch_url` the forge
/// link, given once the branch is on the forge; `can_open_pr` whether a forge can open one.
pub fn status_card(
    pipeline: &Pipeline,
    run: &Run,
    ahead: usize,
    detail: Detail,
    branch_url: Option<String>,
    can_open_pr: bool,
    redactor: &Redactor,
) -> StatusCard {
    let end = run.finished_at.unwrap_or_else(now_millis);
    let headline = match run.state {
        RunState::Queued if ahead > 0 => format!("queued ({ahead} ahead)"),
        RunState::Queued => "queued".to_owned(),
        RunState::Preparing => "preparing the workspace".to_owned(),
        RunState::Running if run.mode == RunMode::Ask => "answering (read-only)".to_owned(),
        RunState::Running => "running".to_owned(),
        RunState::Saving if run.mode == RunMode::Ask => "finishing".to_owned(),
        RunState::Saving => "saving: commit and push".to_owned(),
        RunState::Succeeded if run.mode == RunMode::Ask => "answered".to_owned(),
        RunState::Succeeded if !run.changed => "succeeded, no changes".to_owned(),
        RunState::Succeeded => "succeeded".to_owned(),
        RunState::Failed => "failed".to_owned(),
        RunState::TimedOut => "timed out".to_owned(),
        RunState::Cancelled => "cancelled".to_owned(),
    };
    let mut buttons = Vec::new();
    let mut add = |action: Action| {
        buttons.push(Button {
            action,
            label: action.label().to_owned(),
            run_id: run.id.clone(),
            url: None,
        })
    };
    if run.state.can_cancel() {
        add(Action::Cancel);
    }
    if run.state.can_retry() {
        add(Action::Retry);
    }
    if run.state == RunState::Succeeded && run.pushed && can_open_pr && !pipeline.local_only {
        add(Action::OpenPr);
    }
    let log_lines = if detail == Detail::Logs {
        let lines: Vec<&str> = run.log_tail.lines().collect();
        lines[lines.len().saturating_sub(CARD_LOG_LINES)..]
            .iter()
            .map(|l| redactor.redact(l))
            .collect()
    } else {
        Vec::new()
    };
    StatusCard {
        pipeline_id: pipeline.id.clone(),
        run_id: run.id.clone(),
        seq: run.seq,
        state: run.state,
        headline,
        terminal: run.state.is_terminal(),
        elapsed: format_duration(end - run.created_at),
        accepted_at: run.created_at,
        finished_at: run.finished_at,
        agent: run.agent.clone(),
        branch: pipeline.branch.clone(),
        branch_url,
        commit: run.head_commit.as_ref().map(|c| c.chars().take(10).collect()),
        diffstat: run.diffstat.as_ref().filter(|_| run.changed).map(|d| d.to_string()),
        changed: run.changed,
        pushed: run.pushed,
        exit_code: run.exit_code,
        error: run.error.as_deref().map(|e| redactor.redact(e)),
        summary: if detail != Detail::Metadata {
            run.summary.as_deref().map(|s| redactor.redact(s))
        } else {
            None
        },
        log_lines,
        buttons,
        pull_request: None,
        note: (run.mode == RunMode::Ask
            && run.state.is_terminal()
            && detail == Detail::Metadata
            && run.summary.is_some())
        .then(|| {
            format!(
                "The answer stays on this machine at this channel's detail level: `threadline runs {}` or the web \
                     chat shows it.",
                pipeline.id
            )
        }),
        mode: run.mode,
        progress: match (&run.progress, run.state) {
            (Some(p), RunState::Preparing) => p
                .environment_since
                .map(|since| format!("preparing the environment: {}", format_duration(now_millis() - since))),
            (Some(p), RunState::Running) => p.describe(detail != Detail::Metadata),
            (Some(p), RunState::Queued) => p.waiting.clone(),
            _ => None,
        }
        .map(|p| redactor.redact(&p)),
        usage: run.usage.describe(),
        blocked: run
            .progress
            .as_ref()
            .and_then(|p| p.blocked.as_ref())
            .and_then(|b| b.describe())
            .map(|b| redactor.redact(&crate::untrusted::clean(&b))),
    }
}

/// How a chat platform writes the parts of a card's text. Every text-based card (Slack's
/// Block Kit, Discord's embed) is drawn once, by [`card_text`], in the platform's markup.
pub trait Markup {
    /// A link showing `text`.
    fn link(&self, url: &str, text: &str) -> String;
    /// Emphasis (italics).
    fn emphasis(&self, text: &str) -> String;
    /// The sign before an error.
    fn warning(&self) -> &'static str;
    /// Text from a run (the agent's summary and output, errors) made to show literally:
    /// no mention, ping or disguised link of the agent's gets through.
    fn escape(&self, text: &str) -> String;
    /// Log lines in a code block, escaped for the inside of one.
    fn log_block(&self, lines: &[String]) -> String;
}

/// A card's text for a chat platform: its facts, error, pull request, note and the
/// agent's summary, one line each (the title and buttons are the platform's own).
pub fn card_text(card: &StatusCard, m: &impl Markup) -> CardText {
    let branch = match &card.branch_url {
        Some(url) => m.link(url, &card.branch),
        None => format!("`{}`", card.branch),
    };
    let mut facts = vec![
        card.elapsed.clone(),
        format!("agent {}", card.agent),
        format!("branch {branch}"),
    ];
    if card.mode == RunMode::Ask {
        facts.push("read-only".into());
    }
    if let Some(c) = &card.commit {
        facts.push(format!("commit `{c}`"));
    }
    if let Some(d) = &card.diffstat {
        facts.push(d.clone());
    } else if card.terminal && !card.changed && card.mode == RunMode::Change {
        facts.push("no changes".into());
    }
    if let Some(u) = &card.usage {
        facts.push(u.clone());
    }
    let mut lines = vec![facts.join(" · ")];
    if let Some(p) = &card.progress {
        lines.push(m.emphasis(&m.escape(p)));
    }
    if let Some(b) = &card.blocked {
        lines.push(format!("{} {}", m.warning(), m.escape(b)));
    }
    if let Some(e) = &card.error {
        lines.push(format!("{} {}", m.warning(), m.escape(e)));
    }
    if let Some(pr) = &card.pull_request {
        lines.push(format!("pull request {}", m.link(&pr.url, &pr.label)));
    }
    if let Some(n) = &card.note {
        lines.push(m.emphasis(&m.escape(n)));
    }
    if let Some(s) = &card.summary {
        // Every line quoted, so none of the agent's lines can pass for the card's own;
        // cut to what a chat message holds (the rest is in the web chat and the CLI).
        let shown = crate::untrusted::prefix(s, CARD_ANSWER_BYTES);
        lines.extend(shown.lines().map(|l| format!("> {}", m.escape(l))));
        if shown.len() < s.len() {
            lines.push(m.emphasis("(the rest of the answer is in the web chat and `threadline runs`)"));
        }
    }
    CardText {
        title: format!("Run {}: {}", card.seq, card.headline),
        lines,
        log: (!card.log_lines.is_empty()).then(|| m.log_block(&card.log_lines)),
    }
}

/// What [`card_text`] draws.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardText {
    /// `Run 2: succeeded`.
    pub title: String,
    pub lines: Vec<String>,
    /// The last log lines as a code block (at `Detail::Logs`).
    pub log: Option<String>,
}

/// A forge link to a branch from a template with `{branch}` (e.g.
/// `https://github.com/o/r/tree/{branch}`).
pub fn branch_link(template: &str, branch: &str) -> Option<String> {
    (!template.is_empty()).then(|| template.replace("{branch}", branch))
}

/// The card of `run` among its pipeline's `runs` (its queue position and whether the
/// branch is on the forge come from them), with what `view` knows of pull requests.
pub fn card_in_context(
    pipeline: &Pipeline,
    run: &Run,
    runs: &[Run],
    detail: Detail,
    view: &PullRequestView,
    redactor: &Redactor,
) -> StatusCard {
    let on_forge = !pipeline.local_only && runs.iter().any(|r| r.pushed && r.seq <= run.seq);
    let branch_url = view
        .branch_template
        .as_deref()
        .and_then(|t| branch_link(t, &pipeline.branch))
        .filter(|_| on_forge);
    // After a pull request was merged or closed, a run that pushed changes since may
    // open the next one; the runs before it may not.
    let after_end =
        |pr: &crate::model::PullRequestRecord| run.finished_at.zip(pr.state_at).is_some_and(|(end, at)| end > at);
    let can_open = view.forge.is_some()
        && match &view.pr {
            None => true,
            Some(pr) if !pr.is_open() => run.pushed && run.changed && after_end(pr),
            Some(_) => false,
        };
    let mut card = status_card(
        pipeline,
        run,
        crate::model::runs_ahead(runs, run),
        detail,
        branch_url,
        can_open,
        redactor,
    );
    let kind = view.forge.unwrap_or(ForgeKind::Github);
    if let Some(pr) = &view.pr {
        let short = if kind == ForgeKind::Gitlab { "MR" } else { "PR" };
        let reference = format!("{short} {}", kind.reference(pr.number));
        let label = if pr.is_open() {
            reference.clone()
        } else {
            format!("{reference} ({})", pr.state)
        };
        if !can_open {
            card.buttons.push(Button {
                action: Action::OpenPr,
                label: format!("View {label}"),
                run_id: run.id.clone(),
                url: Some(pr.url.clone()),
            });
        }
        if pr.is_open() {
            if run.pushed && run.finished_at.is_some_and(|end| end >= pr.created_at) {
                card.note = Some(format!(
                    "Pushed to {} {}: it now shows this run's changes.",
                    kind.noun(),
                    kind.reference(pr.number)
                ));
            }
            // Where approvals must be fresh, the branch's latest push needs its own.
            let latest = runs.iter().rev().find(|r| r.pushed).map(|r| r.id.as_str());
            if view.require_fresh_approval
                && latest == Some(run.id.as_str())
                && run.head_commit.is_some()
                && view.approved_commit != run.head_commit
            {
                let approved = match &view.approved_commit {
                    Some(c) => format!("its approval covers {}", c.chars().take(10).collect::<String>()),
                    None => "it has no approval yet".to_owned(),
                };
                card.note = Some(format!(
                    "This run pushed to {} {} after it was approved: {approved}. An approver presses Approve \
                     again.",
                    kind.noun(),
                    kind.reference(pr.number)
                ));
                card.buttons.push(Button {
                    action: Action::OpenPr,
                    label: "Approve again".into(),
                    run_id: run.id.clone(),
                    url: None,
                });
            }
        } else if run.state == RunState::Succeeded {
            let by = pr
                .state_by
                .as_deref()
                .map(|who| format!(" by {who}"))
                .unwrap_or_default();
            let ended = format!("{reference} was {}{by}.", pr.state);
            card.note = Some(if can_open {
                format!("{ended} Open PR opens a new one for what the branch has gained since.")
            } else if run.pushed && after_end(pr) {
                format!("{ended} Nothing new on the branch since.")
            } else {
                ended
            });
        }
        if let Some(asked) = asked_on_forge(run, kind, pr.number) {
            card.note = Some(match card.note.take() {
                Some(note) => format!("{asked} {note}"),
                None => asked,
            });
        }
        card.pull_request = Some(PrLink {
            number: pr.number,
            url: pr.url.clone(),
            label,
        });
    } else if run.state == RunState::Succeeded && run.pushed && view.forge.is_none() {
        card.note = view
            .unavailable
            .as_deref()
            .map(|why| redactor.redact(&crate::model::sentence(why)));
    }
    card
}

/// What Open PR did, in one sentence for the thread.
pub fn pull_request_said(done: &PullRequestOutcome) -> String {
    let noun = done.kind.noun();
    let reference = done.kind.reference(done.pr.number);
    let mut text = match done.previous {
        Some((number, state)) => format!(
            "{} {} was {}. ",
            capitalize(noun),
            done.kind.reference(number),
            state.word()
        ),
        None => String::new(),
    };
    text += &if done.opened {
        format!("Opened {noun} {reference}: {}", done.pr.url)
    } else if done.pr.found {
        format!("Found an open {noun} for this branch, {reference}: {}", done.pr.url)
    } else {
        format!("This pipeline already has {noun} {reference}: {}", done.pr.url)
    };
    for warning in &done.warnings {
        text += &format!(" (Note: {warning}.)");
    }
    text
}

/// Why Open PR opened nothing, and what to do next, redacted.
pub fn pull_request_refused(e: &PullRequestError, redactor: &Redactor) -> String {
    let next = match e.next_step() {
        NextStep::TryAgain => " Then press Open PR again.",
        NextStep::PushAgain => " Press Retry on the last run or send a follow-up to push it again, then press Open PR.",
        NextStep::ChangeFirst => " Send a follow-up to make changes, then press Open PR.",
        NextStep::Nothing => "",
    };
    format!("{}{next}", sentence(&redactor.redact(&e.to_string())))
}

/// "Asked for by NAME in a review of PR #N.", for a run a review comment started
/// (recorded as `github:NAME`, as chat runs are as `slack:ID`).
fn asked_on_forge(run: &Run, kind: ForgeKind, number: i64) -> Option<String> {
    let (surface, who) = run.requested_by.split_once(':')?;
    (surface == kind.as_str() && kind != ForgeKind::None).then(|| {
        format!(
            "Asked for by {who} in a review of {} {}.",
            kind.noun(),
            kind.reference(number)
        )
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Diffstat, Origin};

    /// A succeeded run's card with a link to pull request #4, for the adapters' tests.
    pub(crate) fn card_with_pull_request() -> StatusCard {
        let view = PullRequestView {
            forge: Some(ForgeKind::Github),
            pr: Some(crate::model::PullRequestRecord {
                pipeline_id: "p1".into(),
                forge: "github".into(),
                number: 4,
                url: "https://gh/o/r/pull/4".into(),
                found: false,
                opened_by: "slack:U1".into(),
                created_at: 0,
                state: "open".into(),
                state_at: None,
                state_by: None,
            }),
            ..Default::default()
        };
        let done = run(RunState::Succeeded);
        card_in_context(
            &pipeline(),
            &done,
            std::slice::from_ref(&done),
            Detail::Metadata,
            &view,
            &Redactor::default(),
        )
    }

    fn pipeline() -> Pipeline {
        Pipeline {
            id: "p1".into(),
            repo: "/r".into(),
            remote_url: "/r".into(),
            local_only: false,
            base_branch: "main".into(),
            branch: "threadline/x-p1".into(),
            agent: "sh".into(),
            title: "x".into(),
            origin: Origin::cli(),
            created_at: 0,
        }
    }

    fn run(state: RunState) -> Run {
        Run {
            id: "p1-1".into(),
            pipeline_id: "p1".into(),
            seq: 1,
            prompt: "do it".into(),
            agent: "sh".into(),
            requested_by: "u".into(),
            state,
            created_at: 0,
            started_at: None,
            finished_at: Some(65_000),
            exit_code: Some(0),
            end_reason: None,
            error: None,
            start_commit: None,
            head_commit: Some("0123456789abcdef".into()),
            changed: true,
            diffstat: Some(Diffstat {
                files_changed: 2,
                insertions: 3,
                deletions: 1,
            }),
            pushed: true,
            push_error: None,
            container_id: None,
            cancel_requested: false,
            summary: Some("did it with key sk-secret-1".into()),
            log_tail: (1..=20).map(|i| format!("line {i}")).collect::<Vec<_>>().join("\n"),
            mode: crate::model::RunMode::Change,
            usage: Default::default(),
            progress: None,
            resumed: false,
            session_cost_usd: None,
        }
    }

    #[test]
    fn buttons_follow_the_state() {
        let r = Redactor::default();
        let card = |st| status_card(&pipeline(), &run(st), 0, Detail::Metadata, None, true, &r);
        let actions = |st| card(st).buttons.iter().map(|b| b.action).collect::<Vec<_>>();
        assert_eq!(actions(RunState::Queued), [Action::Cancel]);
        assert_eq!(actions(RunState::Running), [Action::Cancel]);
        assert_eq!(actions(RunState::Failed), [Action::Retry]);
        assert_eq!(actions(RunState::Succeeded), [Action::OpenPr]);
        let no_forge = status_card(
            &pipeline(),
            &run(RunState::Succeeded),
            0,
            Detail::Metadata,
            None,
            false,
            &r,
        );
        assert!(no_forge.buttons.is_empty());
    }

    #[test]
    fn a_pull_request_turns_open_pr_into_a_link_and_no_forge_says_so() {
        let r = Redactor::default();
        let p = pipeline();
        let done = run(RunState::Succeeded);
        let runs = [done.clone()];
        let no_forge = PullRequestView {
            unavailable: Some("no forge is known for /r".into()),
            ..Default::default()
        };
        let card = card_in_context(&p, &done, &runs, Detail::Metadata, &no_forge, &r);
        assert!(card.buttons.is_empty());
        assert_eq!(card.note.as_deref(), Some("No forge is known for /r."));

        let mut view = PullRequestView {
            branch_template: Some("https://gl/x/-/tree/{branch}".into()),
            forge: Some(ForgeKind::Gitlab),
            ..Default::default()
        };
        let card = card_in_context(&p, &done, &runs, Detail::Metadata, &view, &r);
        assert_eq!(card.buttons.len(), 1);
        assert_eq!(
            (card.buttons[0].action, card.buttons[0].url.clone()),
            (Action::OpenPr, None)
        );
        assert_eq!(card.branch_url.as_deref(), Some("https://gl/x/-/tree/threadline/x-p1"));

        view.pr = Some(crate::model::PullRequestRecord {
            pipeline_id: "p1".into(),
            forge: "gitlab".into(),
            number: 4,
            url: "https://gl/x/-/merge_requests/4".into(),
            found: false,
            opened_by: "slack:U1".into(),
            created_at: 70_000,
            state: "open".into(),
            state_at: None,
            state_by: None,
        });
        // This run ended before the merge request was opened: no "updated" note.
        let card = card_in_context(&p, &done, &runs, Detail::Metadata, &view, &r);
        let link = &card.buttons[0];
        assert_eq!(link.label, "View MR !4");
        assert_eq!(link.url.as_deref(), Some("https://gl/x/-/merge_requests/4"));
        assert_eq!(card.pull_request.as_ref().map(|p| p.label.as_str()), Some("MR !4"));
        assert_eq!(card.note, None);
        let mut later = done.clone();
        later.finished_at = Some(80_000);
        let card = card_in_context(&p, &later, &[later.clone()], Detail::Metadata, &view, &r);
        assert_eq!(
            card.note.as_deref(),
            Some("Pushed to merge request !4: it now shows this run's changes.")
        );
    }

    #[test]
    fn metadata_is_the_default_and_secrets_never_show() {
        let r = Redactor::new(["sk-secret-1".to_owned()]);
        let p = pipeline();
        let done = run(RunState::Succeeded);
        let meta = status_card(&p, &done, 0, Detail::Metadata, Some("https://f/b".into()), false, &r);
        assert_eq!(meta.summary, None);
        assert!(meta.log_lines.is_empty());
        assert_eq!(meta.elapsed, "1:05");
        assert_eq!(meta.commit.as_deref(), Some("0123456789"));
        assert_eq!(meta.branch_url.as_deref(), Some("https://f/b"));
        let summary = status_card(&p, &done, 0, Detail::Summary, None, false, &r);
        assert_eq!(summary.summary.as_deref(), Some("did it with key [REDACTED]"));
        let logs = status_card(&p, &done, 0, Detail::Logs, None, false, &r);
        assert_eq!(logs.log_lines.len(), CARD_LOG_LINES);
        assert_eq!(logs.log_lines.last().map(String::as_str), Some("line 20"));
        let queued = status_card(&p, &run(RunState::Queued), 2, Detail::Metadata, None, false, &r);
        assert_eq!(queued.headline, "queued (2 ahead)");
    }

    #[test]
    fn the_thread_hears_what_became_of_an_earlier_pull_request() {
        use crate::model::PullRequestRecord;
        use crate::orchestrator::forge::PrState;
        let outcome = PullRequestOutcome {
            pr: PullRequestRecord {
                pipeline_id: "p".into(),
                forge: "gitlab".into(),
                number: 2,
                url: "https://gl/x/-/merge_requests/2".into(),
                found: false,
                opened_by: "slack:U1".into(),
                created_at: 0,
                state: "open".into(),
                state_at: None,
                state_by: None,
            },
            kind: ForgeKind::Gitlab,
            opened: true,
            fresh: true,
            previous: Some((1, PrState::Closed)),
            warnings: vec!["the reviewer \"x\" was not found".into()],
        };
        assert_eq!(
            pull_request_said(&outcome),
            "Merge request !1 was closed. Opened merge request !2: https://gl/x/-/merge_requests/2 \
             (Note: the reviewer \"x\" was not found.)"
        );
    }

    #[test]
    fn a_refusal_says_what_to_do_next() {
        let r = Redactor::new(vec![]);
        let missing = PullRequestError::BranchMissing { branch: "b".into() };
        assert_eq!(
            pull_request_refused(&missing, &r),
            "The branch `b` is not on the remote (deleted?). Press Retry on the last run or send a follow-up to \
             push it again, then press Open PR."
        );
        let local = PullRequestError::LocalOnly {
            branch: "b".into(),
            mirror: "/m".into(),
        };
        assert!(pull_request_refused(&local, &r).ends_with("`git fetch /m b`."));
        let wrapped = PullRequestError::AfterEnded {
            what: "PR #1 was merged".into(),
            source: Box::new(PullRequestError::NoCommits {
                branch: "b".into(),
                base: "main".into(),
            }),
        };
        assert!(pull_request_refused(&wrapped, &r).ends_with("Send a follow-up to make changes, then press Open PR."));
    }
}
