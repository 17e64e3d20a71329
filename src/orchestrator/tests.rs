//! The run lifecycle end to end without Docker or git: the real orchestrator, scheduler
//! and executor, a real SQLite store, and recording fakes behind the executor's seams
//! ([`Containers`], [`Workspaces`]). Each story takes milliseconds; the Docker and git
//! stories in `tests/it` prove the real adapters.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use super::container::{AgentSpec, ContainerError, ContainerStatus, container_name};
use super::workspace::{CommitInfo, GitError, Prepared, PullRequestCheck, PushState, Saved};
use super::{Containers, NewPipeline, Orchestrator, Scope, Workspaces};
use crate::config::{AgentProfile, Config};
use crate::model::{Diffstat, EndReason, Origin, Pipeline, Run, RunState};
use crate::store::Store;

/// Containers that exist only in memory. An agent exits with `exit` at once, or, when
/// that is None, runs until it is stopped.
#[derive(Default)]
struct FakeContainers {
    exit: Option<i64>,
    calls: Mutex<Vec<String>>,
    states: Mutex<HashMap<String, ContainerStatus>>,
    stopped: tokio::sync::Notify,
}

impl FakeContainers {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Containers for FakeContainers {
    async fn ensure_image(&self, _image: &str) -> Result<(), ContainerError> {
        Ok(())
    }
    async fn start_agent(&self, spec: &AgentSpec) -> Result<String, ContainerError> {
        self.record(format!("start_agent {}", spec.name));
        self.states
            .lock()
            .unwrap()
            .insert(spec.name.clone(), ContainerStatus::Running);
        Ok(spec.name.clone())
    }
    async fn start(&self, id: &str) -> Result<(), ContainerError> {
        self.record(format!("start {id}"));
        self.states
            .lock()
            .unwrap()
            .insert(id.to_owned(), ContainerStatus::Running);
        Ok(())
    }
    async fn status(&self, id: &str) -> Result<Option<ContainerStatus>, ContainerError> {
        Ok(self.states.lock().unwrap().get(id).copied())
    }
    async fn running_on_pipeline(&self, _pipeline_id: &str, _except: &str) -> Result<Vec<String>, ContainerError> {
        Ok(Vec::new())
    }
    fn logs(&self, _id: &str) -> BoxStream<'static, Result<bytes::Bytes, ContainerError>> {
        Box::pin(futures_util::stream::iter([Ok(bytes::Bytes::from_static(
            b"the fake agent works\n",
        ))]))
    }
    async fn wait(&self, id: &str) -> Result<Option<i64>, ContainerError> {
        let code = match self.exit {
            Some(code) => code,
            None => {
                self.stopped.notified().await;
                137
            }
        };
        self.states
            .lock()
            .unwrap()
            .insert(id.to_owned(), ContainerStatus::Exited(code));
        Ok(Some(code))
    }
    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), ContainerError> {
        self.record(format!("stop {id}"));
        self.stopped.notify_waiters();
        Ok(())
    }
    async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        self.record(format!("remove {id}"));
        self.states.lock().unwrap().remove(id);
        Ok(())
    }
}

/// Workspaces that only record what was asked of them.
struct FakeWorkspaces {
    dir: PathBuf,
    calls: Mutex<Vec<String>>,
    prepare_error: Option<String>,
    push_error: Option<String>,
    /// How long saving takes (a huge tree, a slow disk).
    save_takes: Duration,
    /// Commits the pipeline's branch has (pushed by another worker).
    on_branch: Mutex<Vec<String>>,
}

impl FakeWorkspaces {
    fn record(&self, call: &str) {
        self.calls.lock().unwrap().push(call.to_owned());
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Workspaces for FakeWorkspaces {
    fn workspace_path(&self, pipeline_id: &str) -> PathBuf {
        self.dir.join("ws").join(pipeline_id)
    }
    fn objects_path(&self, pipeline_id: &str) -> PathBuf {
        self.dir.join("objects").join(pipeline_id)
    }
    fn mirror_path(&self, _remote_url: &str) -> PathBuf {
        self.dir.join("mirror")
    }
    fn prepare(&self, pipeline: &Pipeline) -> Result<Prepared, GitError> {
        self.record("prepare");
        if let Some(detail) = &self.prepare_error {
            return Err(GitError::Fetch {
                remote: pipeline.remote_url.clone(),
                detail: detail.clone(),
            });
        }
        let workspace = self.workspace_path(&pipeline.id);
        std::fs::create_dir_all(&workspace).unwrap();
        Ok(Prepared {
            workspace,
            start_commit: "a".repeat(40),
            note: None,
        })
    }
    fn save(&self, _: &Pipeline, _: &str, info: &CommitInfo<'_>, _: Option<(u32, u32)>) -> Result<Saved, GitError> {
        self.record(&format!("save {}", info.outcome));
        std::thread::sleep(self.save_takes);
        Ok(Saved {
            head: "b".repeat(40),
            changed: true,
            diffstat: Diffstat {
                files_changed: 1,
                insertions: 1,
                deletions: 0,
            },
            summary: None,
            notes: Vec::new(),
        })
    }
    fn push_state(&self, _: &Pipeline) -> Result<PushState, GitError> {
        Ok(PushState::Needed)
    }
    fn has_commit(&self, _: &Pipeline, commit: &str) -> Result<bool, GitError> {
        Ok(self.on_branch.lock().unwrap().iter().any(|c| c == commit))
    }
    fn push(&self, pipeline: &Pipeline, _may_send: &(dyn Fn() -> bool + Sync)) -> Result<(), GitError> {
        self.record("push");
        match &self.push_error {
            Some(detail) => Err(GitError::Push {
                remote: pipeline.remote_url.clone(),
                detail: detail.clone(),
            }),
            None => Ok(()),
        }
    }
    fn check_pull_request(&self, _: &Pipeline) -> Result<PullRequestCheck, GitError> {
        Ok(PullRequestCheck::NoCommits)
    }
}

struct Story {
    orch: Orchestrator,
    containers: Arc<FakeContainers>,
    workspaces: Arc<FakeWorkspaces>,
    _dir: tempfile::TempDir,
}

async fn story(
    containers: FakeContainers,
    prepare_error: Option<&str>,
    push_error: Option<&str>,
    timeout_secs: u64,
) -> Story {
    story_saving(containers, prepare_error, push_error, timeout_secs, Duration::ZERO, 300).await
}

async fn story_saving(
    containers: FakeContainers,
    prepare_error: Option<&str>,
    push_error: Option<&str>,
    timeout_secs: u64,
    save_takes: Duration,
    save_timeout_secs: u64,
) -> Story {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().join("data"),
        default_agent: "fake".into(),
        save_timeout_secs,
        ..Config::default()
    };
    config.agents.insert(
        "fake".into(),
        AgentProfile {
            image: "fake".into(),
            argv: vec!["work".into()],
            network: "none".into(),
            timeout_secs,
            stop_grace_secs: 0,
            ..AgentProfile::default()
        },
    );
    let store = Store::open(&config.database_url()).await.unwrap();
    let containers = Arc::new(containers);
    let workspaces = Arc::new(FakeWorkspaces {
        dir: dir.path().join("git"),
        calls: Mutex::default(),
        prepare_error: prepare_error.map(str::to_owned),
        push_error: push_error.map(str::to_owned),
        save_takes,
        on_branch: Mutex::default(),
    });
    let orch = Orchestrator::with_ports(Arc::new(config), store, containers.clone(), workspaces.clone());
    Story {
        orch,
        containers,
        workspaces,
        _dir: dir,
    }
}

/// An agent that exits with `code` at once.
fn exits(code: i64) -> FakeContainers {
    FakeContainers {
        exit: Some(code),
        ..Default::default()
    }
}

/// Starts the orchestrator, submits one prompt and waits for its run to end.
async fn one_run(s: &Story) -> Run {
    s.orch.start(Scope::All).await.unwrap();
    let sub = s.orch.submit_pipeline(prompt()).await.unwrap();
    until(&s.orch, &sub.run.id, |r| r.state.is_terminal()).await
}

fn prompt() -> NewPipeline {
    NewPipeline {
        repo: "https://forge.invalid/demo.git".into(),
        base_branch: None,
        agent: None,
        prompt: "do it".into(),
        requested_by: "tester".into(),
        origin: Origin::cli(),
        idempotency_key: None,
        mode: Default::default(),
        attachments: Vec::new(),
    }
}

async fn until(orch: &Orchestrator, run_id: &str, done: impl Fn(&Run) -> bool) -> Run {
    for _ in 0..3000 {
        let run = orch.store().run(run_id).await.unwrap().unwrap();
        if done(&run) {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("run {run_id} never got there");
}

async fn states(orch: &Orchestrator, run_id: &str) -> Vec<RunState> {
    orch.store()
        .events(run_id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.state)
        .collect()
}

#[tokio::test]
async fn an_agent_that_exits_zero_succeeds_and_its_work_is_pushed() {
    let s = story(exits(0), None, None, 60).await;
    let run = one_run(&s).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    assert!(run.pushed && run.changed && run.error.is_none());
    use RunState::*;
    assert_eq!(
        states(&s.orch, &run.id).await,
        [Queued, Preparing, Running, Saving, Succeeded]
    );
    let name = container_name(&run.id);
    assert_eq!(
        s.containers.calls(),
        [format!("start_agent {name}"), format!("remove {name}")]
    );
    assert_eq!(s.workspaces.calls(), ["prepare", "save exited 0", "push"]);
    s.orch.shutdown().await;
}

#[tokio::test]
async fn an_agent_that_fails_fails_with_its_code_and_its_work_is_saved() {
    let s = story(exits(3), None, None, 60).await;
    let run = one_run(&s).await;
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(run.exit_code, Some(3));
    assert!(run.error.unwrap().contains("exited with code 3"));
    assert_eq!(s.workspaces.calls(), ["prepare", "save exited 3", "push"]);
    s.orch.shutdown().await;
}

#[tokio::test]
async fn a_failed_push_fails_the_run_and_says_why() {
    let s = story(exits(0), None, Some("the remote hung up"), 60).await;
    let run = one_run(&s).await;
    assert_eq!(run.state, RunState::Failed);
    assert!(!run.pushed);
    let error = run.error.unwrap();
    assert!(
        error.contains("push failed") && error.contains("the remote hung up"),
        "{error}"
    );
    s.orch.shutdown().await;
}

#[tokio::test]
async fn cancel_stops_a_running_agent_and_saves_its_work() {
    // A save that takes a while: the cancel that stopped the agent does not cut it.
    let s = story_saving(FakeContainers::default(), None, None, 60, Duration::from_secs(1), 300).await;
    s.orch.start(Scope::All).await.unwrap();
    let sub = s.orch.submit_pipeline(prompt()).await.unwrap();
    until(&s.orch, &sub.run.id, |r| r.state == RunState::Running).await;
    s.orch.cancel(&sub.run.id).await.unwrap();
    let run = until(&s.orch, &sub.run.id, |r| r.state.is_terminal()).await;
    assert_eq!(run.state, RunState::Cancelled);
    assert_eq!(run.end_reason, Some(EndReason::Cancelled));
    assert!(run.pushed, "{:?}", run.error);
    assert!(run.error.is_none_or(|e| !e.contains("being saved")));
    assert!(s.containers.calls().iter().any(|c| c.starts_with("stop ")));
    assert_eq!(s.workspaces.calls(), ["prepare", "save cancelled", "push"]);
    s.orch.shutdown().await;
}

#[tokio::test]
async fn an_agent_past_its_time_limit_is_stopped_and_timed_out() {
    let s = story(FakeContainers::default(), None, None, 1).await;
    let run = one_run(&s).await;
    assert_eq!(run.state, RunState::TimedOut);
    assert!(run.error.unwrap().contains("past its limit"));
    assert_eq!(s.workspaces.calls(), ["prepare", "save timed out", "push"]);
    s.orch.shutdown().await;
}

#[tokio::test]
async fn a_preparation_that_fails_starts_no_agent() {
    let s = story(exits(0), Some("no route to host"), None, 60).await;
    let run = one_run(&s).await;
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(run.end_reason, Some(EndReason::NotStarted));
    assert!(run.error.unwrap().contains("no route to host"));
    assert!(s.containers.calls().is_empty(), "{:?}", s.containers.calls());
    use RunState::*;
    assert_eq!(states(&s.orch, &run.id).await, [Queued, Preparing, Failed]);
    s.orch.shutdown().await;
}

/// A run a process of another worker (another home, another host) claimed and saved,
/// its commit recorded, before its lease was lost.
async fn lost_elsewhere(s: &Story, head: &str) -> Run {
    let sub = s.orch.submit_pipeline(prompt()).await.unwrap();
    let store = s.orch.store();
    let lost = "lost-process";
    let claimer = crate::store::Claimer {
        instance: lost,
        worker_id: "another-home",
        labels: &[],
        limit: 4,
    };
    let claimed = store.claim_next(&claimer, None).await.unwrap().unwrap();
    assert_eq!(claimed.id, sub.run.id);
    let attempt = crate::store::RunPatch {
        start_commit: Some("a".repeat(40)),
        head_commit: Some(head.to_owned()),
        exit_code: Some(0),
        end_reason: Some(EndReason::Exited),
        summary: Some("what the lost attempt did".into()),
        push_error: Some(Some("the lost attempt's push failed".into())),
        ..Default::default()
    };
    store.update_run_owned(lost, &claimed.id, &attempt).await.unwrap();
    for (from, to) in [
        (RunState::Preparing, RunState::Running),
        (RunState::Running, RunState::Saving),
    ] {
        store.transition_owned(lost, &claimed.id, from, to, "").await.unwrap();
    }
    claimed
}

#[tokio::test]
async fn a_run_lost_after_its_push_landed_ends_as_saved_without_its_agent_again() {
    let s = story(exits(0), None, None, 60).await;
    let head = "c".repeat(40);
    s.workspaces.on_branch.lock().unwrap().push(head.clone());
    let lost = lost_elsewhere(&s, &head).await;
    s.orch.start(Scope::All).await.unwrap();
    let run = until(&s.orch, &lost.id, |r| r.state.is_terminal()).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let calls = s.containers.calls();
    assert!(!calls.iter().any(|c| c.starts_with("start_agent")), "{calls:?}");
    assert_eq!(run.summary.as_deref(), Some("what the lost attempt did"));
    s.orch.shutdown().await;
}

#[tokio::test]
async fn a_run_lost_before_its_push_landed_runs_again_and_forgets_the_lost_attempt() {
    let s = story(exits(0), None, None, 60).await;
    let lost = lost_elsewhere(&s, &"c".repeat(40)).await;
    s.orch.start(Scope::All).await.unwrap();
    let waited = std::time::Instant::now();
    let run = until(&s.orch, &lost.id, |r| r.state.is_terminal()).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    assert!(
        waited.elapsed() >= super::executor::PUSH_SETTLE,
        "it waited for a push that may still have been landing"
    );
    let calls = s.containers.calls();
    assert!(calls.iter().any(|c| c.starts_with("start_agent")), "{calls:?}");
    assert_eq!(
        run.summary.as_deref(),
        Some("the fake agent works"),
        "this attempt's summary"
    );
    assert_eq!(run.push_error, None, "the lost attempt's push error is forgotten");
    assert_eq!(
        run.head_commit.as_deref(),
        Some("b".repeat(40).as_str()),
        "this attempt's commit"
    );
    s.orch.shutdown().await;
}

#[tokio::test]
async fn a_container_a_crash_left_created_is_started_not_counted_as_run() {
    let s = story(exits(0), None, None, 60).await;
    // A process that has died claimed the run and created its container, never started.
    let sub = s.orch.submit_pipeline(prompt()).await.unwrap();
    let claimed = s
        .orch
        .store()
        .claim_next(
            &crate::store::Claimer {
                instance: "dead-process",
                worker_id: &s.orch.inner.worker.id,
                labels: &[],
                limit: 4,
            },
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.id, sub.run.id);
    let name = container_name(&claimed.id);
    s.containers
        .states
        .lock()
        .unwrap()
        .insert(name.clone(), ContainerStatus::Created);

    s.orch.start(Scope::All).await.unwrap();
    let run = until(&s.orch, &sub.run.id, |r| r.state.is_terminal()).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let calls = s.containers.calls();
    assert_eq!(calls.first(), Some(&format!("start {name}")), "{calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("start_agent")), "{calls:?}");
    s.orch.shutdown().await;
}

#[tokio::test]
async fn saving_past_its_limit_fails_the_run_and_says_the_work_is_kept() {
    let s = story_saving(exits(0), None, None, 60, Duration::from_secs(3), 1).await;
    let run = one_run(&s).await;
    assert_eq!(run.state, RunState::Failed);
    let error = run.error.unwrap();
    assert!(
        error.contains("took longer than") && error.contains("still in the workspace"),
        "{error}"
    );
    s.orch.shutdown().await;
}

#[tokio::test]
async fn cancel_works_while_a_run_is_saving() {
    let s = story_saving(exits(0), None, None, 60, Duration::from_secs(3), 300).await;
    s.orch.start(Scope::All).await.unwrap();
    let sub = s.orch.submit_pipeline(prompt()).await.unwrap();
    until(&s.orch, &sub.run.id, |r| r.state == RunState::Saving).await;
    s.orch.cancel(&sub.run.id).await.unwrap();
    let run = until(&s.orch, &sub.run.id, |r| r.state.is_terminal()).await;
    assert_eq!(run.state, RunState::Cancelled);
    assert!(run.error.unwrap().contains("while its work was being saved"));
    s.orch.shutdown().await;
}
