//! Opening a pipeline's pull request: the forge of its repository, the checks that make
//! a refusal say what to do, and the idempotency that keeps it to one pull request per
//! pipeline however often Open PR is pressed.

use std::fmt::Write as _;
use std::time::Duration;

use super::forge::{self, ForgeError, ForgeKind, ForgeTarget, NewPullRequest, PrState};
use super::workspace::PullRequestCheck;
use super::{GitError, Orchestrator};
use crate::config::RepoConfig;
use crate::model::{Approval, Pipeline, PullRequestRecord, Run, RunState, capitalize, now_millis, sentence};
use crate::store::StoreError;

/// Why no pull request was opened, in words that say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum PullRequestError {
    #[error("no run or pipeline {0:?}")]
    UnknownRun(String),
    #[error(
        "this pipeline's repository is local-only (it has no remote), so there is no forge to open a pull \
         request on; its branch `{branch}` is in Threadline's mirror: `git fetch {mirror} {branch}`"
    )]
    LocalOnly { branch: String, mirror: String },
    #[error(
        "no forge is known for {remote}, so Threadline cannot open a pull request there; set `[repos.{repo}.forge] \
         kind` (github, gitlab or gitea) to enable Open PR"
    )]
    NoForge { remote: String, repo: String },
    #[error("the forge settings of {remote} are incomplete: {reason}; fix `[repos.{repo}.forge]`")]
    Misconfigured {
        remote: String,
        repo: String,
        reason: String,
    },
    #[error(
        "no {forge} token is configured; set `[repos.{repo}.forge] token` (or THREADLINE_REPOS__{env}__FORGE__TOKEN, \
         or `git.token`) to a token that may open {noun}s"
    )]
    NoToken {
        forge: &'static str,
        noun: &'static str,
        repo: String,
        env: String,
    },
    #[error("{forge} refused the token (it is wrong, expired or revoked); replace `[repos.{repo}.forge] token`")]
    Unauthorized { forge: &'static str, repo: String },
    #[error(
        "the token may not open {noun}s on {project} ({forge} said forbidden); give it write access to {noun}s \
         there"
    )]
    Forbidden {
        forge: &'static str,
        noun: &'static str,
        project: String,
    },
    #[error(
        "{forge} has no project {project}, or the token cannot see it; check `[repos.{repo}.forge] project` and \
         the token's access"
    )]
    ProjectNotFound {
        forge: &'static str,
        project: String,
        repo: String,
    },
    #[error("the branch `{branch}` is not on the remote (deleted?)")]
    BranchMissing { branch: String },
    #[error(
        "the base branch `{base}` is gone from the remote; recreate it there (or open the {noun} by hand against \
         another branch)"
    )]
    BaseMissing { base: String, noun: &'static str },
    #[error("there is nothing to merge: `{branch}` has no commits that `{base}` lacks (already merged?)")]
    NoCommits { branch: String, base: String },
    #[error("{forge} cannot be reached at {api} ({detail})")]
    Unreachable {
        forge: &'static str,
        api: String,
        detail: String,
    },
    #[error("{forge}'s rate limit for the token is reached; try again in {wait_secs} s")]
    RateLimited { forge: &'static str, wait_secs: u64 },
    #[error("{forge} refused the {noun} ({status}: {message})")]
    Refused {
        forge: &'static str,
        noun: &'static str,
        status: u16,
        message: String,
    },
    #[error("{what}; {source}")]
    AfterEnded {
        what: String,
        source: Box<PullRequestError>,
    },
    #[error("cannot read the branches on the remote ({0})")]
    Git(#[from] GitError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a person can do about a [`PullRequestError`], for front ends to word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Ask again once the cause is fixed.
    TryAgain,
    /// Push the branch again (a retry or a follow-up), then ask again.
    PushAgain,
    /// Make changes with a follow-up, then ask again.
    ChangeFirst,
    /// Asking again will not help.
    Nothing,
}

impl PullRequestError {
    pub fn next_step(&self) -> NextStep {
        match self {
            PullRequestError::BranchMissing { .. } => NextStep::PushAgain,
            PullRequestError::NoCommits { .. } => NextStep::ChangeFirst,
            PullRequestError::AfterEnded { source, .. } => source.next_step(),
            PullRequestError::UnknownRun(_)
            | PullRequestError::LocalOnly { .. }
            | PullRequestError::NoForge { .. }
            | PullRequestError::Store(_) => NextStep::Nothing,
            PullRequestError::Misconfigured { .. }
            | PullRequestError::NoToken { .. }
            | PullRequestError::Unauthorized { .. }
            | PullRequestError::Forbidden { .. }
            | PullRequestError::ProjectNotFound { .. }
            | PullRequestError::BaseMissing { .. }
            | PullRequestError::Unreachable { .. }
            | PullRequestError::RateLimited { .. }
            | PullRequestError::Refused { .. }
            | PullRequestError::Git(_) => NextStep::TryAgain,
        }
    }
}

/// What Open PR produced.
#[derive(Debug, Clone)]
pub struct PullRequestOutcome {
    pub pr: PullRequestRecord,
    pub kind: ForgeKind,
    /// Opened on the forge by this request.
    pub opened: bool,
    /// Recorded by this request: opened now, or found on the forge now. False when the
    /// pipeline already had it (a second click).
    pub fresh: bool,
    /// The pipeline's earlier pull request, merged or closed since, that this one follows.
    pub previous: Option<(i64, PrState)>,
    /// Extras (labels, reviewers) that did not apply.
    pub warnings: Vec<String>,
}

/// How a pipeline's card shows pull requests: where its branch is on the forge, whether
/// Open PR applies, and the pull request once there is one.
#[derive(Debug, Clone, Default)]
pub struct PullRequestView {
    /// A template with `{branch}`.
    pub branch_template: Option<String>,
    /// The forge, when Open PR can work for this pipeline.
    pub forge: Option<ForgeKind>,
    /// Said instead of Open PR when there is no forge.
    pub unavailable: Option<String>,
    pub pr: Option<PullRequestRecord>,
    /// With `require_fresh_approval`: the commit the latest approval covered (None: no
    /// approval yet, or fresh approvals are not required).
    pub approved_commit: Option<String>,
    pub require_fresh_approval: bool,
}

impl Orchestrator {
    /// The `[repos]` entry a pipeline came from, by name; for a repository named only on
    /// the command line, `NAME` (for messages that say where to configure it) and the
    /// defaults.
    pub fn repo_settings(&self, pipeline: &Pipeline) -> (&str, &RepoConfig) {
        self.inner.repo_settings(pipeline)
    }

    /// The forge of a pipeline's repository.
    pub fn forge_of(&self, pipeline: &Pipeline) -> Result<Option<ForgeTarget>, PullRequestError> {
        if pipeline.local_only {
            return Ok(None);
        }
        let (name, settings) = self.repo_settings(pipeline);
        forge::resolve(&pipeline.remote_url, &settings.forge).map_err(|reason| PullRequestError::Misconfigured {
            remote: pipeline.remote_url.clone(),
            repo: name.to_owned(),
            reason,
        })
    }

    /// What a pipeline's cards show about pull requests.
    pub async fn pull_request_view(&self, pipeline: &Pipeline) -> PullRequestView {
        let settings_fresh = self.repo_settings(pipeline).1.require_fresh_approval;
        let configured = Some(self.repo_settings(pipeline).1.branch_url.clone()).filter(|t| !t.is_empty());
        let forge = self.forge_of(pipeline);
        let target = forge.as_ref().ok().cloned().flatten();
        let unavailable = match &forge {
            Ok(Some(_)) => None,
            Ok(None) => Some(self.no_forge(pipeline).to_string()),
            Err(e) => Some(e.to_string()),
        };
        PullRequestView {
            branch_template: configured.or_else(|| target.as_ref().map(|t| t.branch_url("{branch}"))),
            forge: target.map(|t| t.kind),
            unavailable,
            pr: self.inner.store.pull_request(&pipeline.id).await.ok().flatten(),
            approved_commit: if settings_fresh {
                self.inner
                    .store
                    .approvals(&pipeline.id)
                    .await
                    .ok()
                    .and_then(|a| a.into_iter().rev().find(|a| a.approved).and_then(|a| a.commit))
            } else {
                None
            },
            require_fresh_approval: settings_fresh,
        }
    }

    fn no_forge(&self, pipeline: &Pipeline) -> PullRequestError {
        if pipeline.local_only {
            PullRequestError::LocalOnly {
                branch: pipeline.branch.clone(),
                mirror: self.mirror_path(pipeline).display().to_string(),
            }
        } else {
            PullRequestError::NoForge {
                remote: pipeline.remote_url.clone(),
                repo: self.repo_settings(pipeline).0.to_owned(),
            }
        }
    }

    /// Opens the pull request of `run`'s pipeline, or finds the one it has (recorded
    /// here, or opened by hand on the forge). One at a time per pipeline, so a double
    /// click opens one.
    async fn open_pull_request(&self, run_id: &str, actor: &str) -> Result<PullRequestOutcome, PullRequestError> {
        let store = &self.inner.store;
        let run = store
            .find_run(run_id)
            .await?
            .ok_or_else(|| PullRequestError::UnknownRun(run_id.to_owned()))?;
        let pipeline = store
            .pipeline(&run.pipeline_id)
            .await?
            .ok_or_else(|| PullRequestError::UnknownRun(run_id.to_owned()))?;
        let Some(target) = self.forge_of(&pipeline)? else {
            return Err(self.no_forge(&pipeline));
        };
        let lock = self
            .inner
            .pr_locks
            .lock()
            .unwrap()
            .entry(pipeline.id.clone())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        let (name, settings) = self.repo_settings(&pipeline);
        let explain = |e: ForgeError| self.explain(e, &pipeline, &target, name);
        let client = self.forge_client(&pipeline, &target);
        let mut previous = None;
        if let Some(pr) = store.pull_request(&pipeline.id).await? {
            // A merged or closed one makes way for a new one; while it is open, or when
            // the forge cannot say, it is the pipeline's pull request.
            let state = match &client {
                Ok(client) => client.state(pr.number).await.ok().map(|s| s.state),
                Err(_) => None,
            };
            match state {
                Some(ended @ (PrState::Merged | PrState::Closed)) => {
                    store.clear_pull_request(&pipeline.id, pr.number).await?;
                    self.republish(&pipeline.id).await;
                    previous = Some((pr.number, ended));
                }
                _ => {
                    return Ok(PullRequestOutcome {
                        pr,
                        kind: target.kind,
                        opened: false,
                        fresh: false,
                        previous: None,
                        warnings: Vec::new(),
                    });
                }
            }
        }
        let outcome = |pr, opened, warnings| PullRequestOutcome {
            pr,
            kind: target.kind,
            opened,
            fresh: true,
            previous,
            warnings,
        };
        let result = async {
            let client = client.map_err(explain)?;
            let record = |number, url, found| PullRequestRecord {
                pipeline_id: pipeline.id.clone(),
                forge: target.kind.as_str().to_owned(),
                number,
                url,
                found,
                opened_by: actor.to_owned(),
                created_at: now_millis(),
                state: "open".into(),
                state_at: None,
                state_by: None,
            };
            let (head, base) = (&pipeline.branch, &pipeline.base_branch);
            if let Some(found) = client.find_open(head, base).await.map_err(explain)? {
                let pr = store.set_pull_request(&record(found.number, found.url, true)).await?;
                self.republish(&pipeline.id).await;
                return Ok(outcome(pr, false, Vec::new()));
            }
            let check = {
                let (git, lock) = (self.inner.git.clone(), self.mirror_lock(&pipeline.remote_url));
                let pipeline = pipeline.clone();
                let _mirror = lock.lock_owned().await;
                tokio::task::spawn_blocking(move || git.check_pull_request(&pipeline))
                    .await
                    .expect("the branch check does not panic")?
            };
            let diffstat = match check {
                PullRequestCheck::Ready(d) => d,
                PullRequestCheck::BranchMissing => return Err(explain(ForgeError::BranchMissing)),
                PullRequestCheck::BaseMissing => return Err(explain(ForgeError::BaseMissing)),
                PullRequestCheck::NoCommits => return Err(explain(ForgeError::NoCommits)),
            };
            let runs = store.runs(&pipeline.id).await?;
            let request = NewPullRequest {
                head: head.clone(),
                base: base.clone(),
                title: pipeline.title.clone(),
                body: self.pull_request_body(&pipeline, &runs, &diffstat.to_string()),
                draft: settings.forge.draft,
                labels: settings.forge.labels.clone(),
                reviewers: settings.forge.reviewers.clone(),
            };
            let (pr, opened, warnings) = match client.open(&request).await {
                Ok(done) => (record(done.pr.number, done.pr.url, false), true, done.warnings),
                // Someone (another instance, or a person) opened one meanwhile.
                Err(ForgeError::AlreadyExists) => match client.find_open(head, base).await.map_err(explain)? {
                    Some(found) => (record(found.number, found.url, true), false, Vec::new()),
                    None => return Err(explain(ForgeError::AlreadyExists)),
                },
                Err(e) => return Err(explain(e)),
            };
            let pr = store.set_pull_request(&pr).await?;
            tracing::info!(pipeline = %pipeline.id, number = pr.number, actor, "pull request recorded");
            self.republish(&pipeline.id).await;
            Ok(outcome(pr, opened, warnings))
        }
        .await;
        // Say what became of the earlier one, whatever comes of this one.
        result.map_err(|e| match previous {
            Some((number, state)) => PullRequestError::AfterEnded {
                what: format!(
                    "{} {} was {}",
                    capitalize(target.kind.noun()),
                    target.kind.reference(number),
                    state.word()
                ),
                source: Box::new(e),
            },
            None => e,
        })
    }

    /// Open PR pressed by `actor`, whom the front end has let through: opens (or finds)
    /// the pull request and records the approval with what came of it, once per `key`
    /// (a click's id).
    pub async fn approve_pull_request(
        &self,
        key: &str,
        run: &Run,
        actor: &str,
    ) -> Result<PullRequestOutcome, PullRequestError> {
        let result = self.open_pull_request(&run.id, actor).await;
        let reason = match &result {
            Ok(done) => {
                let reference = done.kind.reference(done.pr.number);
                match (done.opened, done.pr.found, done.fresh) {
                    (true, _, _) => format!("opened {reference}"),
                    (false, true, true) => format!("found {reference} open on the forge"),
                    _ => format!("the pipeline already had {reference}"),
                }
            }
            Err(e) => format!("failed: {}", sentence(&e.to_string())),
        };
        self.record_approval(key, run, actor, true, &reason).await;
        // An approval may have made a stale one fresh: the cards say so.
        self.republish(&run.pipeline_id).await;
        result
    }

    /// Records an Open PR decision (once per `key`, a click's id); a failure to record
    /// is logged, not fatal.
    pub async fn record_approval(&self, key: &str, run: &Run, actor: &str, approved: bool, reason: &str) {
        // What was approved: the branch as its latest pushed run left it.
        let commit = match self.inner.store.runs(&run.pipeline_id).await {
            Ok(runs) => runs.into_iter().rev().find(|r| r.pushed).and_then(|r| r.head_commit),
            Err(_) => None,
        };
        let approval = Approval {
            pipeline_id: run.pipeline_id.clone(),
            run_id: run.id.clone(),
            actor: actor.to_owned(),
            approved,
            reason: self.inner.redactor.redact(reason),
            at: now_millis(),
            commit,
        };
        if let Err(e) = self.inner.store.record_approval(key, &approval).await {
            tracing::warn!(run = %run.id, error = %e, "cannot record an Open PR decision");
        }
    }

    /// The pull request's description: what was asked, what came of each run, the
    /// changes, and where the conversation is.
    fn pull_request_body(&self, pipeline: &Pipeline, runs: &[Run], diffstat: &str) -> String {
        let redact = |s: &str| self.inner.redactor.redact(s);
        let mut body = String::new();
        let place = match (pipeline.origin.surface.as_str(), pipeline.origin.url.as_str()) {
            (_, url) if !url.is_empty() => format!("[this {} thread]({url})", pipeline.origin.surface),
            ("web", _) => "Threadline's web chat".to_owned(),
            (surface, _) => format!("Threadline ({surface})"),
        };
        let _ = writeln!(body, "Made by coding agents prompted from {place}.\n");
        let _ = writeln!(body, "## Runs\n");
        for run in runs.iter().filter(|r| r.state.is_terminal()) {
            let changes = match (&run.diffstat, run.changed) {
                (Some(d), true) => d.short(),
                _ => "no changes".to_owned(),
            };
            let prompt: String = redact(&run.prompt).chars().take(500).collect();
            let quoted = prompt
                .lines()
                .map(|l| format!("   > {l}"))
                .collect::<Vec<_>>()
                .join("\n");
            let _ = writeln!(
                body,
                "{}. **{}** ({}, agent {}, {changes})\n{quoted}",
                run.seq,
                outcome_word(run.state),
                run.requested_by,
                run.agent
            );
        }
        let _ = writeln!(body, "\n## Changes\n\n{diffstat}");
        let _ = write!(
            body,
            "\nBranch `{}` into `{}`; pipeline `{}`.",
            pipeline.branch, pipeline.base_branch, pipeline.id
        );
        body
    }

    fn explain(&self, e: ForgeError, pipeline: &Pipeline, target: &ForgeTarget, repo: &str) -> PullRequestError {
        let forge = target.kind.name();
        let noun = target.kind.noun();
        let repo = repo.to_owned();
        match e {
            ForgeError::NoToken => PullRequestError::NoToken {
                forge,
                noun,
                env: repo.to_uppercase(),
                repo,
            },
            ForgeError::Unauthorized => PullRequestError::Unauthorized { forge, repo },
            ForgeError::Forbidden => PullRequestError::Forbidden {
                forge,
                noun,
                project: target.project.clone(),
            },
            ForgeError::ProjectNotFound => PullRequestError::ProjectNotFound {
                forge,
                project: target.project.clone(),
                repo,
            },
            ForgeError::BranchMissing => PullRequestError::BranchMissing {
                branch: pipeline.branch.clone(),
            },
            ForgeError::BaseMissing => PullRequestError::BaseMissing {
                base: pipeline.base_branch.clone(),
                noun,
            },
            ForgeError::NoCommits => PullRequestError::NoCommits {
                branch: pipeline.branch.clone(),
                base: pipeline.base_branch.clone(),
            },
            ForgeError::Unreachable(detail) => PullRequestError::Unreachable {
                forge,
                api: target.api_url.clone(),
                detail,
            },
            ForgeError::RateLimited(wait) => PullRequestError::RateLimited {
                forge,
                wait_secs: wait.as_secs().max(1),
            },
            ForgeError::AlreadyExists => PullRequestError::Refused {
                forge,
                noun,
                status: 422,
                message: format!("a {noun} for this branch exists but is not open; reopen it by hand"),
            },
            ForgeError::Other { status, message } => PullRequestError::Refused {
                forge,
                noun,
                status,
                message: self.inner.redactor.redact(&message),
            },
        }
    }

    /// The HTTP client the forges share (its TLS roots are read once).
    fn http(&self) -> Result<&crate::http::JsonClient, ForgeError> {
        if let Some(http) = self.inner.http.get() {
            return Ok(http);
        }
        let made = crate::http::JsonClient::new().map_err(|e| ForgeError::Unreachable(e.to_string()))?;
        Ok(self.inner.http.get_or_init(|| made))
    }

    /// Asks the forge, every `pr_poll_secs` until shutdown, whether the open pull requests
    /// were merged or closed; a change is stored and the pipeline's cards redrawn.
    pub(super) async fn watch_pull_requests(&self) {
        let every = Duration::from_secs(self.inner.config.pr_poll_secs);
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.check_pull_requests().await {
                tracing::warn!(error = %e, "cannot read the pull requests to check");
            }
        }
    }

    /// One round of [`Orchestrator::watch_pull_requests`]: a conditional request per
    /// open pull request, so an unchanged one costs GitHub's rate limit nothing. A forge
    /// that cannot answer is asked again next round; one that says its rate limit is
    /// reached is left alone for as long as it asks.
    pub async fn check_pull_requests(&self) -> Result<(), StoreError> {
        // A closed pull request may be reopened: asked about for a week after it closed.
        let week_ago = now_millis() - 7 * 24 * 3600 * 1000;
        for pr in self.inner.store.pull_requests_to_poll(week_ago).await? {
            let Some(pipeline) = self.inner.store.pipeline(&pr.pipeline_id).await? else {
                continue;
            };
            let Ok(Some(target)) = self.forge_of(&pipeline) else {
                continue;
            };
            let now = std::time::Instant::now();
            let resting = self.inner.forge_backoff.lock().unwrap().get(&target.api_url).copied();
            if resting.is_some_and(|until| until > now) {
                continue;
            }
            let Ok(client) = self.forge_client(&pipeline, &target) else {
                continue;
            };
            match client.state(pr.number).await {
                Ok(status) => {
                    self.pull_request_moved(&pipeline.id, pr.number, status.state, status.by.as_deref())
                        .await?;
                }
                Err(ForgeError::RateLimited(wait)) => {
                    tracing::warn!(forge = %target.api_url, wait_secs = wait.as_secs(), "the forge's rate limit is reached; polling it later");
                    self.inner
                        .forge_backoff
                        .lock()
                        .unwrap()
                        .insert(target.api_url.clone(), now + wait);
                }
                Err(e) => tracing::debug!(pipeline = %pipeline.id, error = %e, "the forge did not say"),
            }
        }
        Ok(())
    }

    /// The forge client for a pipeline's repository, with its token.
    pub(super) fn forge_client(
        &self,
        pipeline: &Pipeline,
        target: &ForgeTarget,
    ) -> Result<Box<dyn forge::Forge>, ForgeError> {
        let (_, settings) = self.repo_settings(pipeline);
        let token = if settings.forge.token.is_empty() {
            &self.inner.config.git.token
        } else {
            &settings.forge.token
        };
        self.http().and_then(|http| forge::client(target, token.expose(), http))
    }

    /// Records that pull request `number` of a pipeline is now `state` (by `by`), and
    /// redraws the pipeline's cards when that is news.
    pub(super) async fn pull_request_moved(
        &self,
        pipeline_id: &str,
        number: i64,
        state: PrState,
        by: Option<&str>,
    ) -> Result<(), StoreError> {
        let changed = self
            .inner
            .store
            .set_pull_request_state(pipeline_id, number, state.word(), by, now_millis())
            .await?;
        if changed {
            tracing::info!(pipeline = %pipeline_id, number, state = state.word(), by, "pull request moved");
            self.republish(pipeline_id).await;
        }
        Ok(())
    }

    /// Sends the pipeline's pushed, succeeded runs again, so their status messages
    /// redraw (Open PR becomes a link, or comes back).
    pub(super) async fn republish(&self, pipeline_id: &str) {
        if let Ok(runs) = self.inner.store.runs(pipeline_id).await {
            for run in runs.into_iter().filter(|r| r.state == RunState::Succeeded && r.pushed) {
                self.inner.publish(run);
            }
        }
    }
}

fn outcome_word(state: RunState) -> &'static str {
    match state {
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
        RunState::TimedOut => "timed out",
        RunState::Cancelled => "cancelled",
        _ => "unfinished",
    }
}
