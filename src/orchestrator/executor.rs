//! Executes one run through its states: prepare the workspace, run the agent's container,
//! save and push its work. Every step is persisted first, so a run interrupted anywhere
//! resumes from its stored state (see `scheduler::recover`).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::container::{AgentSpec, CONTEXT_MOUNT, ContainerStatus, LABEL_PIPELINE, LABEL_RUN, container_name};
use super::scrub;
use super::workspace::{self, CommitInfo, PushState, SUMMARY_FILE};
use super::{Inner, RunUpdate, log_path, run_dir};
use crate::config::{AgentProfile, parse_user};
use crate::crash::{self, Step};
use crate::lifecycle::{self, Ending, SaveOutcome};
use crate::model::{EndReason, Pipeline, Run, RunState, now_millis};
use crate::store::{RunPatch, StoreError};
use crate::untrusted;

/// How often an executing run checks for a cancel request made by another process.
const CANCEL_POLL: Duration = Duration::from_millis(500);
/// The most of a run's log tail the store keeps.
const LOG_TAIL_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("run {0} lost its pipeline")]
    NoPipeline(String),
    #[error("run {id} was moved to {state} by someone else")]
    Raced { id: String, state: RunState },
}

/// Drives `run` to a terminal state (or until shutdown detaches it).
pub(super) async fn execute(inner: Arc<Inner>, run: Run) {
    let run_id = run.id.clone();
    if let Err(e) = drive(&inner, run).await {
        tracing::error!(run_id = %run_id, error = %e, "run stopped unexpectedly; the next start resumes it");
    }
    inner.executing.lock().unwrap().remove(&run_id);
    inner.wake.notify_one();
}

async fn drive(inner: &Arc<Inner>, mut run: Run) -> Result<(), ExecError> {
    let pipeline = inner
        .store
        .pipeline(&run.pipeline_id)
        .await?
        .ok_or_else(|| ExecError::NoPipeline(run.id.clone()))?;
    loop {
        let before = run.state;
        match run.state {
            RunState::Preparing => prepare(inner, &pipeline, &run).await?,
            RunState::Running => {
                if !follow(inner, &run).await? {
                    return Ok(()); // shutting down: the container keeps running
                }
            }
            RunState::Saving => save(inner, &pipeline, &run).await?,
            RunState::Queued => return Ok(()),
            _ => return Ok(()),
        }
        run = inner
            .store
            .run(&run.id)
            .await?
            .ok_or_else(|| ExecError::NoPipeline(run.id.clone()))?;
        if run.state == before {
            return Err(ExecError::Raced {
                id: run.id,
                state: run.state,
            });
        }
    }
}

/// Moves the run and tells watchers. Returns false if someone else moved it first.
async fn transition(
    inner: &Inner,
    run_id: &str,
    from: RunState,
    to: RunState,
    detail: &str,
) -> Result<bool, StoreError> {
    let moved = inner.store.transition(run_id, from, to, detail).await?;
    if moved {
        tracing::info!(run_id, from = %from, state = %to, detail, "run state");
        inner.publish_moved(run_id).await?;
    }
    Ok(moved)
}

/// Why a run does not get past `preparing`.
enum Unprepared {
    /// It fails, with this sentence; nothing ran.
    Failed(String),
    /// A cancel came first.
    Cancelled,
    /// The store failed: the run stays `preparing` for the next start.
    Store(StoreError),
}

impl From<StoreError> for Unprepared {
    fn from(e: StoreError) -> Self {
        Unprepared::Store(e)
    }
}

fn failed(e: impl ToString) -> Unprepared {
    Unprepared::Failed(e.to_string())
}

/// Prepares the run and starts its agent; every way out of `preparing` but `running`
/// ends here, stored once.
async fn prepare(inner: &Arc<Inner>, pipeline: &Pipeline, run: &Run) -> Result<(), ExecError> {
    let (to, detail) = match start(inner, pipeline, run).await {
        Ok(()) => return Ok(()),
        Err(Unprepared::Store(e)) => return Err(e.into()),
        Err(Unprepared::Cancelled) => (RunState::Cancelled, "cancelled before the agent started".to_owned()),
        Err(Unprepared::Failed(message)) => {
            let message = inner.redactor.redact(&message);
            let patch = RunPatch {
                error: Some(message.clone()),
                end_reason: Some(EndReason::NotStarted),
                ..Default::default()
            };
            inner.store.update_run(&run.id, &patch).await?;
            (RunState::Failed, message)
        }
    };
    // The workspace may have been handed to the agent's user already.
    give_back_workspace(inner, pipeline).await;
    transition(inner, &run.id, RunState::Preparing, to, &detail).await?;
    Ok(())
}

async fn start(inner: &Arc<Inner>, pipeline: &Pipeline, run: &Run) -> Result<(), Unprepared> {
    let name = container_name(&run.id);
    // A container already exists when the last process died after creating it: one
    // never started is started now (its agent has not run), any other is followed.
    match inner.runtime.status(&name).await {
        Ok(Some(ContainerStatus::Created)) => {
            inner.runtime.start(&name).await.map_err(failed)?;
            mark_running(inner, run, name, "container found again, not started yet: started").await?;
            return Ok(());
        }
        Ok(Some(_)) => {
            mark_running(inner, run, name, "container found again").await?;
            return Ok(());
        }
        Ok(None) | Err(_) => {}
    }
    if inner.store.cancel_requested(&run.id).await? {
        return Err(Unprepared::Cancelled);
    }
    let profile = inner.config.agent(&run.agent).cloned().ok_or_else(|| {
        failed(format!(
            "the agent {:?} is no longer configured (known: {}); retry with another agent",
            run.agent,
            inner.config.agent_names().join(", ")
        ))
    })?;
    inner.runtime.ensure_image(&profile.image).await.map_err(failed)?;
    let env = agent_env(&profile, pipeline, run).map_err(|missing| {
        failed(format!(
            "the agent {:?} needs {missing} in Threadline's environment; set it where Threadline runs and retry",
            run.agent
        ))
    })?;
    let (uid, gid) = agent_user(&profile, inner.me).map_err(failed)?;
    refuse_if_in_use(inner, pipeline, &name).await.map_err(failed)?;

    let prepared = {
        let lock = mirror_lock(inner, &pipeline.remote_url);
        let _guard = lock.lock().await;
        let git = inner.git.clone();
        let p = pipeline.clone();
        tokio::task::spawn_blocking(move || git.prepare(&p))
            .await
            .expect("git prepare does not panic")
            .map_err(failed)?
    };
    crash::point(Step::Prepared);
    let patch = RunPatch {
        start_commit: Some(prepared.start_commit.clone()),
        ..Default::default()
    };
    inner.store.update_run(&run.id, &patch).await?;
    let context = write_context(inner, pipeline, run)
        .await
        .map_err(|e| failed(format!("cannot write the run's context files: {e}")))?;
    if (uid, gid) != inner.me {
        hand_over(prepared.workspace.clone(), uid, gid).await.map_err(|e| {
            failed(format!(
                "cannot hand the workspace to the agent's user {uid}:{gid}: {e}"
            ))
        })?;
    }
    if inner.store.cancel_requested(&run.id).await? {
        return Err(Unprepared::Cancelled);
    }
    let spec = AgentSpec {
        name: name.clone(),
        image: profile.image.clone(),
        argv: profile
            .argv
            .iter()
            .map(|a| if a == "{prompt}" { run.prompt.clone() } else { a.clone() })
            .collect(),
        env,
        user: format!("{uid}:{gid}"),
        workspace: prepared.workspace.clone(),
        context,
        objects: Some(inner.git.objects_path(&pipeline.id)),
        labels: HashMap::from([
            (LABEL_RUN.to_owned(), run.id.clone()),
            (LABEL_PIPELINE.to_owned(), pipeline.id.clone()),
        ]),
        memory_bytes: (profile.memory_mb * 1024 * 1024) as i64,
        nano_cpus: (profile.cpus * 1e9) as i64,
        pids_limit: profile.pids_limit,
        network: profile.network.clone(),
        read_only_rootfs: profile.read_only_rootfs,
        // Docker's copy in JSON, several times the size of the text Threadline keeps.
        log_file_bytes: inner.config.max_log_bytes.saturating_mul(4),
    };
    let started = inner.runtime.start_agent(&spec).await;
    inner.metrics.container_started(started.is_ok());
    let id = started.map_err(failed)?;
    crash::point(Step::ContainerStarted);
    mark_running(inner, run, id, prepared.note.as_deref().unwrap_or("")).await?;
    Ok(())
}

/// Records the run's container and moves it to `running`.
async fn mark_running(inner: &Inner, run: &Run, container_id: String, detail: &str) -> Result<(), StoreError> {
    let patch = RunPatch {
        container_id: Some(container_id),
        ..Default::default()
    };
    inner.store.update_run(&run.id, &patch).await?;
    transition(inner, &run.id, RunState::Preparing, RunState::Running, detail).await?;
    Ok(())
}

/// Follows the agent until it exits, is timed out or cancelled. Returns false when the
/// process is shutting down (the run stays `running`, to be followed again).
async fn follow(inner: &Arc<Inner>, run: &Run) -> Result<bool, ExecError> {
    let id = run.container_id.clone().unwrap_or_else(|| container_name(&run.id));
    let profile = inner.config.agent(&run.agent).cloned().unwrap_or_default();
    let grace = Duration::from_secs(profile.stop_grace_secs);
    // The deadline counts from when the agent started, also across a restart.
    let started = inner
        .store
        .events(&run.id)
        .await?
        .iter()
        .rev()
        .find(|e| e.state == RunState::Running)
        .map(|e| e.at)
        .unwrap_or_else(now_millis);
    let deadline_ms = started + (profile.timeout_secs as i64) * 1000;
    let deadline = tokio::time::Instant::now() + Duration::from_millis((deadline_ms - now_millis()).max(0) as u64);

    let logs = tokio::spawn(stream_logs(inner.clone(), run.id.clone(), id.clone()));
    let wait = inner.runtime.wait(&id);
    tokio::pin!(wait);
    let mut poll = tokio::time::interval(CANCEL_POLL);
    let mut reason = EndReason::Exited;
    let mut stopping = false;
    let exit = loop {
        tokio::select! {
            code = &mut wait => break code,
            _ = tokio::time::sleep_until(deadline), if !stopping => {
                reason = EndReason::TimedOut;
                stopping = true;
                stop(inner, &id, grace).await;
            }
            _ = poll.tick(), if !stopping => {
                if inner.store.cancel_requested(&run.id).await? {
                    reason = EndReason::Cancelled;
                    stopping = true;
                    stop(inner, &id, grace).await;
                }
            }
            _ = inner.shutdown.cancelled() => {
                logs.abort();
                return Ok(false);
            }
        }
    };
    // The rest of the output is already with Docker: reading it is bounded by the log
    // cap's worth of work, which a loaded machine may take a while to do.
    let _ = tokio::time::timeout(Duration::from_secs(30), logs).await;
    crash::point(Step::AgentExited);
    let (exit_code, reason) = match exit {
        Ok(Some(code)) => (Some(code), reason),
        Ok(None) => (None, EndReason::Lost),
        Err(e) => {
            tracing::warn!(run_id = %run.id, error = %e, "lost track of the container");
            (None, EndReason::Lost)
        }
    };
    // A cancel that stopped the container from another process ends here as an exit.
    let reason = if reason == EndReason::Exited && inner.store.cancel_requested(&run.id).await? {
        EndReason::Cancelled
    } else {
        reason
    };
    inner
        .store
        .update_run(
            &run.id,
            &RunPatch {
                exit_code,
                end_reason: Some(reason),
                ..Default::default()
            },
        )
        .await?;
    let detail = match (reason, exit_code) {
        (EndReason::Exited, Some(code)) => format!("agent exited with code {code}"),
        (EndReason::TimedOut, _) => "timed out: agent stopped".to_owned(),
        (EndReason::Cancelled, _) => "cancelled: agent stopped".to_owned(),
        _ => "container lost".to_owned(),
    };
    transition(inner, &run.id, RunState::Running, RunState::Saving, &detail).await?;
    Ok(true)
}

async fn stop(inner: &Inner, id: &str, grace: Duration) {
    if let Err(e) = inner.runtime.stop(id, grace).await {
        tracing::warn!(container = id, error = %e, "could not stop the container");
    }
}

/// Copies the container's output, cleaned and redacted, into the run's log file (at most
/// `max_log_bytes`, then a marker), the stored tail and the event channel. Starts from
/// the container's first line, so a restart rewrites the file whole instead of
/// duplicating it. Lines are split at [`untrusted::MAX_LINE_BYTES`], so no output, however
/// long or newline-free, costs more than a line's worth of memory.
async fn stream_logs(inner: Arc<Inner>, run_id: String, container: String) {
    let path = log_path(&inner.config.data_dir, &run_id);
    // Made (or emptied) at the first line: a container that is gone by now leaves the
    // log that was written while it ran as it is.
    let mut file: Option<tokio::io::BufWriter<tokio::fs::File>> = None;
    let cap = inner.config.log_tail_lines.max(1);
    let mut tail: VecDeque<String> = VecDeque::with_capacity(cap);
    let mut lines = untrusted::Lines::default();
    let mut written: u64 = 0;
    let mut dropped: u64 = 0;
    let mut last_flush = tokio::time::Instant::now();
    let mut dirty = false;
    let mut stream = Box::pin(inner.runtime.logs(&container));
    loop {
        let chunk = stream.next().await;
        let done = !matches!(chunk, Some(Ok(_)));
        let mut new_lines = match &chunk {
            Some(Ok(bytes)) => lines.push(bytes),
            _ => Vec::new(),
        };
        if done {
            new_lines.extend(lines.finish());
        }
        if file.is_none() && !new_lines.is_empty() {
            match tokio::fs::File::create(&path).await {
                Ok(f) => file = Some(tokio::io::BufWriter::new(f)),
                Err(e) => tracing::warn!(run_id, error = %e, "cannot write the log file"),
            }
        }
        for line in new_lines {
            let line = inner.redactor.redact(&line);
            let size = line.len() as u64 + 1;
            if written + size <= inner.config.max_log_bytes {
                written += size;
                if let Some(file) = file.as_mut() {
                    let _ = file.write_all(line.as_bytes()).await;
                    let _ = file.write_all(b"\n").await;
                }
            } else {
                dropped += size;
            }
            if tail.len() == cap {
                tail.pop_front();
            }
            tail.push_back(line.clone());
            dirty = true;
            let _ = inner.events.send(RunUpdate::Log {
                run_id: run_id.clone(),
                line,
            });
        }
        if done && dropped > 0 {
            let marker = format!(
                "[threadline: the log was truncated at {} bytes; {dropped} more bytes were not kept]\n",
                inner.config.max_log_bytes
            );
            if let Some(file) = file.as_mut() {
                let _ = file.write_all(marker.as_bytes()).await;
            }
        }
        if let Some(file) = file.as_mut() {
            let _ = file.flush().await;
        }
        if dirty && (done || last_flush.elapsed() >= Duration::from_secs(1)) {
            // The last lines that fit the stored tail's size.
            let mut size = 0;
            let keep = tail
                .iter()
                .rev()
                .take_while(|l| {
                    size += l.len() + 1;
                    size <= LOG_TAIL_BYTES
                })
                .count();
            let text = tail
                .iter()
                .skip(tail.len() - keep)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join("\n");
            if let Err(e) = inner.store.set_log_tail(&run_id, &text).await {
                tracing::warn!(run_id, error = %e, "cannot store the log tail");
            }
            dirty = false;
            last_flush = tokio::time::Instant::now();
        }
        if done {
            return;
        }
    }
}

async fn save(inner: &Arc<Inner>, pipeline: &Pipeline, run: &Run) -> Result<(), ExecError> {
    let reason = run.end_reason.unwrap_or(EndReason::Lost);
    let outcome = match (reason, run.exit_code) {
        (EndReason::Exited, Some(code)) => format!("exited {code}"),
        (EndReason::TimedOut, _) => "timed out".to_owned(),
        (EndReason::Cancelled, _) => "cancelled".to_owned(),
        _ => "container lost".to_owned(),
    };
    // The agent must be gone before its work tree is read: a live one could swap a file
    // for a link between the daemon's check and its use.
    let container = run.container_id.clone().unwrap_or_else(|| container_name(&run.id));
    let in_use = match inner.runtime.remove(&container).await {
        Ok(()) => refuse_if_in_use(inner, pipeline, &container).await.err(),
        Err(e) => Some(format!("the agent's container could not be removed ({e})")),
    };
    let mut patch = RunPatch::default();
    let (saved, outcome) = if run.start_commit.is_none() {
        (None, SaveOutcome::NothingToSave) // never got as far as a workspace
    } else if let Some(why) = in_use {
        (None, SaveOutcome::Failed(why))
    } else {
        let git = inner.git.clone();
        let p = pipeline.clone();
        let start = run.start_commit.clone().unwrap_or_default();
        let prompt = inner.redactor.redact(&run.prompt);
        let (run_id, agent, outcome) = (run.id.clone(), run.agent.clone(), outcome.clone());
        let owner = Some(inner.me);
        let job = tokio::task::spawn_blocking(move || {
            let saved = git.save(
                &p,
                &start,
                &CommitInfo {
                    run_id: &run_id,
                    prompt: &prompt,
                    agent: &agent,
                    outcome: &outcome,
                },
                owner,
            )?;
            crash::point(Step::Committed);
            let state = git.push_state(&p)?;
            let push = (state == PushState::Needed).then(|| git.push(&p));
            if let Some(Ok(())) = push {
                crash::point(Step::Pushed);
            }
            // Pushed already: by a save that a crash interrupted before its outcome was stored.
            let pushed_before = state == PushState::Pushed;
            Ok::<_, workspace::GitError>((saved, push, pushed_before))
        });
        // Whatever the agent left, saving ends: within its time limit, or when the run
        // is cancelled. A save cut short finishes on its own thread under the pipeline's
        // git lock, so the next run waits for it rather than racing it.
        let limit = Duration::from_secs(inner.config.save_timeout_secs);
        let result = tokio::select! {
            done = job => done.expect("git save does not panic").map_err(|e| SaveOutcome::Failed(e.to_string())),
            _ = tokio::time::sleep(limit) => Err(SaveOutcome::TimedOut { limit: limit.as_millis() as i64 }),
            _ = cancel_requested(inner, &run.id) => Err(SaveOutcome::Cancelled),
        };
        match result {
            Ok((saved, push, pushed_before)) => {
                patch.head_commit = Some(saved.head.clone());
                patch.changed = Some(saved.changed);
                patch.diffstat = Some(saved.diffstat.clone());
                patch.summary = saved.summary.clone().map(|s| inner.redactor.redact(&s));
                let push_error = match push {
                    Some(Ok(())) | None => {
                        patch.pushed = Some(push.is_some() || run.pushed || pushed_before);
                        patch.push_error = Some(None);
                        None
                    }
                    Some(Err(e)) => {
                        let e = inner.redactor.redact(&e.to_string());
                        patch.push_error = Some(Some(e.clone()));
                        Some(e)
                    }
                };
                for note in &saved.notes {
                    tracing::warn!(run_id = %run.id, note = %note, "saving passed over what the agent left");
                }
                (Some(saved), SaveOutcome::Saved { push_error })
            }
            Err(cut) => (None, cut),
        }
    };
    let agent_limit = inner
        .config
        .agent(&run.agent)
        .map(|a| a.timeout_secs as i64 * 1000)
        .unwrap_or(0);
    let Ending { state: to, error } = lifecycle::ending(reason, run.exit_code, &outcome, agent_limit, &run.id);
    if let Some(e) = &error {
        patch.error = Some(inner.redactor.redact(e));
    }
    inner.store.update_run(&run.id, &patch).await?;
    let mut detail = match &saved {
        Some(s) if s.changed => format!("{} at {}", s.diffstat, workspace::short(&s.head)),
        Some(_) => "no changes".to_owned(),
        None => String::new(),
    };
    for note in saved.iter().flat_map(|s| &s.notes) {
        detail.push_str(if detail.is_empty() { "" } else { "; " });
        detail.push_str(&inner.redactor.redact(note));
    }
    let context = run_dir(&inner.config.data_dir, &run.id).join("context");
    let _ = tokio::fs::remove_dir_all(context).await;
    transition(inner, &run.id, RunState::Saving, to, &detail).await?;
    crash::point(Step::Stored);
    Ok(())
}

/// Fails while a container other than `own` runs on the pipeline's work tree (a
/// `threadline shell`, or an agent Docker would not remove): what runs in it could swap
/// a file for a link between the daemon's check and its use.
async fn refuse_if_in_use(inner: &Inner, pipeline: &Pipeline, own: &str) -> Result<(), String> {
    match inner.runtime.running_on_pipeline(&pipeline.id, own).await {
        Ok(others) if others.is_empty() => Ok(()),
        Ok(others) => Err(format!(
            "the container {} is open on this pipeline's workspace (a `threadline shell`?); close it, then retry",
            others.join(", ")
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Resolves once a cancel of the run has been requested, by any process.
async fn cancel_requested(inner: &Inner, run_id: &str) {
    let mut poll = tokio::time::interval(CANCEL_POLL);
    loop {
        poll.tick().await;
        if inner.store.cancel_requested(run_id).await.unwrap_or(false) {
            return;
        }
    }
}

/// Gives the workspace back to the daemon's user after an agent of another uid used it.
async fn give_back_workspace(inner: &Inner, pipeline: &Pipeline) {
    let ws = inner.git.workspace_path(&pipeline.id);
    let (uid, gid) = inner.me;
    if let Err(e) = hand_over(ws, uid, gid).await {
        tracing::warn!(pipeline_id = %pipeline.id, error = %e, "cannot take the workspace back");
    }
}

/// [`scrub::hand_over`] on a blocking thread.
async fn hand_over(path: PathBuf, uid: u32, gid: u32) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || scrub::hand_over(&path, (uid, gid)))
        .await
        .expect("chown does not panic")
}

/// The uid:gid an agent runs as: the profile's, else the daemon's own, else (when the
/// daemon is root) 1000:1000. Never root.
fn agent_user(profile: &AgentProfile, me: (u32, u32)) -> Result<(u32, u32), String> {
    let ids = if profile.user.is_empty() {
        if me.0 == 0 { (1000, 1000) } else { me }
    } else {
        parse_user(&profile.user).ok_or_else(|| format!("{:?} is not uid:gid", profile.user))?
    };
    if ids != me && me.0 != 0 {
        return Err(format!(
            "the agent is configured to run as {}:{}, which needs Threadline to run as root; remove `user` from the agent's profile to run it as your own user",
            ids.0, ids.1
        ));
    }
    Ok(ids)
}

/// The container's environment: Threadline's variables, the profile's fixed ones, and
/// the passed-through ones (which must be set). Returns the first missing name.
fn agent_env(profile: &AgentProfile, pipeline: &Pipeline, run: &Run) -> Result<Vec<String>, String> {
    let mut env = vec![
        format!("THREADLINE_PROMPT={}", run.prompt),
        format!("THREADLINE_PROMPT_FILE={CONTEXT_MOUNT}/prompt.md"),
        format!("THREADLINE_CONTEXT_DIR={CONTEXT_MOUNT}"),
        format!("THREADLINE_SUMMARY_FILE=/workspace/{SUMMARY_FILE}"),
        format!("THREADLINE_RUN_ID={}", run.id),
        format!("THREADLINE_PIPELINE_ID={}", pipeline.id),
        format!("THREADLINE_BRANCH={}", pipeline.branch),
    ];
    if !profile.env_set.contains_key("HOME") {
        env.push("HOME=/tmp".to_owned());
    }
    for (k, v) in &profile.env_set {
        env.push(format!("{k}={v}"));
    }
    for name in &profile.env {
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => env.push(format!("{name}={v}")),
            _ => return Err(name.clone()),
        }
    }
    Ok(env)
}

/// Writes the read-only context the agent sees at /threadline: the prompt and what the
/// pipeline's earlier runs did.
async fn write_context(inner: &Inner, pipeline: &Pipeline, run: &Run) -> std::io::Result<PathBuf> {
    let dir = run_dir(&inner.config.data_dir, &run.id).join("context");
    // The mount point of the pipeline's object store (see `OBJECTS_MOUNT`).
    tokio::fs::create_dir_all(dir.join("objects")).await?;
    let earlier: Vec<Run> = inner
        .store
        .runs(&pipeline.id)
        .await
        .map_err(std::io::Error::other)?
        .into_iter()
        .filter(|r| r.seq < run.seq)
        .collect();
    let mut md = format!(
        "# Pipeline {} on branch {} (base {}) of {}\n\nThis is run {} of the pipeline.\n",
        pipeline.id, pipeline.branch, pipeline.base_branch, pipeline.repo, run.seq
    );
    let mut json = Vec::new();
    for r in &earlier {
        md.push_str(&format!("\n## Run {}: {}\n\nPrompt:\n\n", r.seq, r.state));
        for line in r.prompt.lines() {
            md.push_str(&format!("> {line}\n"));
        }
        if let Some(code) = r.exit_code {
            md.push_str(&format!("\nExit code: {code}\n"));
        }
        if let Some(c) = &r.head_commit {
            md.push_str(&format!("Commit: {c}\n"));
        }
        if let Some(d) = &r.diffstat {
            md.push_str(&format!("Changes: {d}\n"));
        }
        if let Some(s) = &r.summary {
            md.push_str(&format!("Summary: {s}\n"));
        }
        if let Some(e) = &r.error {
            md.push_str(&format!("Error: {e}\n"));
        }
        json.push(serde_json::json!({
            "seq": r.seq, "prompt": r.prompt, "state": r.state, "exit_code": r.exit_code,
            "commit": r.head_commit, "diffstat": r.diffstat, "summary": r.summary, "error": r.error,
        }));
    }
    tokio::fs::write(dir.join("prompt.md"), &run.prompt).await?;
    tokio::fs::write(dir.join("history.md"), md).await?;
    tokio::fs::write(
        dir.join("history.json"),
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    )
    .await?;
    Ok(dir)
}

pub(super) fn mirror_lock(inner: &Inner, remote_url: &str) -> Arc<tokio::sync::Mutex<()>> {
    let path = inner.git.mirror_path(remote_url);
    inner.mirror_locks.lock().unwrap().entry(path).or_default().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_never_run_as_root() {
        let p = AgentProfile::default();
        assert_eq!(agent_user(&p, (0, 0)).unwrap(), (1000, 1000));
        assert_eq!(agent_user(&p, (1234, 99)).unwrap(), (1234, 99));
        let fixed = AgentProfile {
            user: "2000:2000".into(),
            ..AgentProfile::default()
        };
        assert!(agent_user(&fixed, (1234, 99)).is_err());
    }
}
