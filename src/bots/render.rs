//! The platform-neutral status message of a run and its buttons. Each chat adapter turns
//! a [`StatusCard`] into its own format (HTML, Block Kit, an embed).

use serde::{Deserialize, Serialize};

use crate::model::{Pipeline, Run, RunState, format_duration, now_millis};
use crate::redact::Redactor;

/// How much a card shows beyond metadata: a per-channel choice, since chat platforms
/// are someone else's cloud. File contents and diffs are never shown at any level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detail {
    /// State, timings, diffstat, commit, links.
    #[default]
    Metadata,
    /// Adds the summary the agent left.
    Summary,
    /// Adds the last log lines.
    Logs,
}

/// What a button does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Cancel,
    Retry,
    OpenPr,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::Cancel => "Cancel",
            Action::Retry => "Retry",
            Action::OpenPr => "Open PR",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Button {
    pub action: Action,
    pub label: &'static str,
    /// The run the action applies to.
    pub run_id: String,
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
}

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
        RunState::Running => "running".to_owned(),
        RunState::Saving => "saving: commit and push".to_owned(),
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
            label: action.label(),
            run_id: run.id.clone(),
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
    }
}

/// A forge link to a branch from a template with `{branch}` (e.g.
/// `https://github.com/o/r/tree/{branch}`).
pub fn branch_link(template: &str, branch: &str) -> Option<String> {
    (!template.is_empty()).then(|| template.replace("{branch}", branch))
}

/// The branch-link templates of the configured repositories, keyed the way pipelines
/// store their repository (canonical paths), resolved once rather than per card.
#[derive(Debug, Clone, Default)]
pub struct BranchLinks(Vec<(String, String)>);

impl BranchLinks {
    pub fn new(config: &crate::config::Config) -> Self {
        BranchLinks(
            config
                .repos
                .values()
                .filter(|r| !r.branch_url.is_empty())
                .map(|r| {
                    let key = std::fs::canonicalize(&r.url)
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| r.url.clone());
                    (key, r.branch_url.clone())
                })
                .collect(),
        )
    }

    /// The link to the pipeline's branch, once some run up to `run` has pushed it.
    fn for_run(&self, pipeline: &Pipeline, run: &Run, runs: &[Run]) -> Option<String> {
        let on_forge = !pipeline.local_only && runs.iter().any(|r| r.pushed && r.seq <= run.seq);
        let (_, template) = self.0.iter().find(|(repo, _)| *repo == pipeline.repo)?;
        branch_link(template, &pipeline.branch).filter(|_| on_forge)
    }
}

/// The card of `run` among its pipeline's `runs`: its queue position and branch link
/// come from them.
pub fn card_in_context(
    pipeline: &Pipeline,
    run: &Run,
    runs: &[Run],
    detail: Detail,
    links: &BranchLinks,
    redactor: &Redactor,
) -> StatusCard {
    status_card(
        pipeline,
        run,
        crate::model::runs_ahead(runs, run),
        detail,
        links.for_run(pipeline, run, runs),
        false,
        redactor,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Diffstat, Origin};

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
}
