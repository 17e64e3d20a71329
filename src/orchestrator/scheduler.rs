//! Scheduling and recovery: claims queued runs within this worker's limit and labels,
//! keeps this process's lease alive, and takes over runs whose owner's lease expired:
//! resumed from their stored state on the same home, started again from the branch on
//! another. A run is claimed or adopted by one atomic update, so it runs once, and every
//! write its executor makes is fenced on that ownership.

use std::sync::Arc;
use std::time::Duration;

use super::container::ContainerStatus;
use super::{Inner, Orchestrator, executor};
use crate::store::{NewInstance, StoreError};

/// How often a process renews its lease.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often a process looks for runs orphaned by others.
const RECOVERY_EVERY: Duration = Duration::from_secs(1);

/// Which runs this process schedules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every pipeline (`threadline serve`).
    All,
    /// One pipeline (`threadline run`, `follow-up`): the CLI runs its own work.
    Pipeline(String),
}

impl Scope {
    pub fn includes(&self, pipeline_id: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Pipeline(id) => id == pipeline_id,
        }
    }
    fn pipeline(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Pipeline(id) => Some(id),
        }
    }
}

/// What a process does with the runs in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Executes runs and serves front ends (`threadline serve`, the CLI's own runs).
    Both,
    /// Executes runs on this host's Docker engine and touches no chat platform
    /// (`threadline worker`).
    Worker,
    /// Serves front ends and executes nothing (`threadline serve --no-worker`): runs
    /// other processes execute are relayed to its watchers through the database.
    FrontEnd,
}

impl Role {
    fn executes(self) -> bool {
        self != Role::FrontEnd
    }
    fn serves(self) -> bool {
        self != Role::Worker
    }
}

impl Orchestrator {
    /// Registers this process, adopts orphaned runs, and starts scheduling.
    pub async fn start(&self, scope: Scope) -> Result<(), StoreError> {
        self.start_as(scope, Role::Both).await
    }

    /// [`Orchestrator::start`] in one role.
    pub async fn start_as(&self, scope: Scope, role: Role) -> Result<(), StoreError> {
        let inner = &self.inner;
        let asked = super::boot_clock();
        inner.store.register_instance(&inner.registration(role)).await?;
        inner.lease.lock().unwrap().renewed = Some(asked);
        let me = inner.clone();
        inner.tracker.spawn(heartbeat_loop(me, role));
        if role.executes() {
            recover(inner, &scope).await?;
            executor::let_go_of_left_agents(inner).await;
            inner.remove_stale_setups().await;
            let me = inner.clone();
            inner.tracker.spawn(scheduler_loop(me, scope));
        }
        // PostgreSQL tells every process when runs are queued or end, and front ends of
        // every change of a run that another process executes.
        let relay = role.serves().then(|| {
            inner.relay.store(true, std::sync::atomic::Ordering::Relaxed);
            let me = inner.clone();
            let relay: Box<dyn Fn(String) + Send + Sync> = Box::new(move |run_id: String| {
                if me.executing.lock().unwrap().contains_key(&run_id) {
                    return; // published here as it happens
                }
                let me = me.clone();
                tokio::spawn(async move {
                    let _ = me.publish_stored(&run_id).await;
                });
            });
            relay
        });
        let me = inner.clone();
        let executes = role.executes();
        inner.tracker.spawn(async move {
            let wake = me.clone();
            me.store
                .on_run_changes(
                    move || {
                        if executes {
                            wake.wake.notify_one()
                        }
                    },
                    relay,
                    me.shutdown.clone(),
                )
                .await;
        });
        if role.serves() {
            if inner.config.pr_poll_secs > 0 {
                let me = self.clone();
                inner.tracker.spawn(async move { me.watch_pull_requests().await });
            }
            let me = self.clone();
            inner.tracker.spawn(async move { me.answer_on_forges().await });
            let me = inner.clone();
            inner.tracker.spawn(waiting_loop(me));
        }
        Ok(())
    }
}

/// How often a front end looks for queued runs that cannot start.
const WAITING_EVERY: Duration = Duration::from_secs(2);

/// Says on each queued run next in its pipeline why it does not start, when no worker
/// can take it: never silent, even when the wait is for a worker.
async fn waiting_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(WAITING_EVERY);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = note_waiting(&inner).await {
                    tracing::debug!(error = %e, "cannot tell why queued runs wait");
                }
            }
        }
    }
}

async fn note_waiting(inner: &Arc<Inner>) -> Result<(), StoreError> {
    // Advice for people, not a takeover: a worker a heartbeat or two late (a loaded
    // host) is busy rather than gone, and is not reported missing.
    let workers: Vec<crate::store::InstanceInfo> = inner
        .store
        .instances()
        .await?
        .into_iter()
        .filter(|i| !i.worker_id.is_empty() && i.silent_ms <= 2 * crate::store::LEASE_MILLIS)
        .collect();
    for q in inner.store.next_queued().await? {
        let why = if let Some(holder) = &q.lost_holder {
            Some(format!(
                "waiting for worker {holder}, which holds this local-only pipeline's branch: start `threadline worker` there again"
            ))
        } else if workers.is_empty() {
            Some("waiting for a worker: none is running (start `threadline worker`)".to_owned())
        } else if !workers
            .iter()
            .any(|w| crate::store::label_subsets(&w.labels).contains(&q.requires))
        {
            Some(format!(
                "waiting for a worker labelled {}: no running worker has {}",
                q.requires.replace(',', ", "),
                if q.requires.contains(',') { "them all" } else { "it" }
            ))
        } else {
            None
        };
        let current = q.run.progress.as_ref().and_then(|p| p.waiting.clone());
        if why != current && inner.store.set_waiting(&q.run.id, why.as_deref()).await? {
            if let Some(why) = &why {
                tracing::info!(run_id = %q.run.id, "{why}");
            }
            inner.publish_stored(&q.run.id).await?;
        }
    }
    Ok(())
}

impl Inner {
    /// This process as others see it in the store.
    fn registration(&self, role: Role) -> NewInstance {
        NewInstance {
            id: self.instance_id.clone(),
            worker_id: if role.executes() {
                self.worker.id.clone()
            } else {
                String::new()
            },
            worker_name: self.worker.name.clone(),
            hostname: self.worker.hostname.clone(),
            pid: std::process::id() as i64,
            labels: if role.executes() {
                self.config.worker.labels.clone()
            } else {
                Vec::new()
            },
        }
    }
}

async fn heartbeat_loop(inner: Arc<Inner>, role: Role) {
    let registration = inner.registration(role);
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        // Stopping, the lease is kept while runs still execute here (a save finishing
        // may push), until the process gives it up.
        if inner.shutdown.is_cancelled() && inner.executing.lock().unwrap().is_empty() {
            return;
        }
        tokio::select! {
            _ = inner.released.cancelled() => return,
            _ = inner.shutdown.cancelled(), if !inner.shutdown.is_cancelled() => {}
            _ = tick.tick() => {
                let asked = super::boot_clock();
                match inner.store.heartbeat(&registration).await {
                    Ok(renewed) => {
                        {
                            let mut lease = inner.lease.lock().unwrap();
                            lease.renewed = Some(asked);
                            lease.lost += u64::from(!renewed);
                        }
                        if !renewed {
                            tracing::warn!("this process's lease had expired (cut off from the database, or paused); runs other workers took over meanwhile are let go here");
                            let_go_of_taken_runs(&inner).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot renew this process's lease"),
                }
            }
        }
    }
}

/// Stops the executors of runs that another process owns now.
async fn let_go_of_taken_runs(inner: &Arc<Inner>) {
    let executing: Vec<(String, tokio_util::sync::CancellationToken)> = inner
        .executing
        .lock()
        .unwrap()
        .iter()
        .map(|(id, t)| (id.clone(), t.clone()))
        .collect();
    for (run_id, taken) in executing {
        match inner.store.owner(&run_id).await {
            Ok(owner) if owner.as_deref() != Some(inner.instance_id.as_str()) => taken.cancel(),
            _ => {}
        }
    }
}

async fn scheduler_loop(inner: Arc<Inner>, scope: Scope) {
    let mut last_recovery = tokio::time::Instant::now();
    loop {
        if let Err(e) = claim_all(&inner, &scope).await {
            tracing::warn!(error = %e, "scheduling failed; retrying");
        }
        if last_recovery.elapsed() >= RECOVERY_EVERY {
            if let Err(e) = recover(&inner, &scope).await {
                tracing::warn!(error = %e, "recovery failed; retrying");
            }
            last_recovery = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = inner.wake.notified() => {}
            // Other processes queue and finish runs, and die. On PostgreSQL they say so
            // (LISTEN/NOTIFY); the poll is then only a backstop.
            _ = tokio::time::sleep(poll_every(&inner)) => {}
        }
    }
}

/// How often the scheduler looks on its own: on PostgreSQL only to check the other
/// processes' leases (new and ended runs are told), on SQLite for those too.
fn poll_every(inner: &Inner) -> Duration {
    match inner.store.backend() {
        crate::store::Backend::Postgres => RECOVERY_EVERY,
        crate::store::Backend::Sqlite => RECOVERY_EVERY.min(Duration::from_millis(500)),
    }
}

async fn claim_all(inner: &Arc<Inner>, scope: &Scope) -> Result<(), StoreError> {
    while !inner.shutdown.is_cancelled() {
        let Some(run) = inner.store.claim_next(&inner.claimer(), scope.pipeline()).await? else {
            return Ok(());
        };
        tracing::info!(run_id = %run.id, pipeline_id = %run.pipeline_id, worker = %inner.worker.name, state = "preparing", "run claimed");
        crate::crash::point(crate::crash::Step::Claimed);
        inner.publish_stored(&run.id).await?;
        spawn_executor(inner, run);
    }
    Ok(())
}

fn spawn_executor(inner: &Arc<Inner>, run: crate::model::Run) {
    inner
        .executing
        .lock()
        .unwrap()
        .insert(run.id.clone(), tokio_util::sync::CancellationToken::new());
    inner.tracker.spawn(executor::execute(inner.clone(), run));
}

/// Takes over every active run in scope whose owner's lease expired. A run this
/// worker's home executed (a restart) resumes from its state: its container and
/// workspace are here. A run another worker executed starts afresh here from the
/// pipeline's branch on the remote, unless its pipeline is local-only (its branch lives
/// on that worker's host: it waits for it) or it needs labels this worker lacks.
/// Queued runs need nothing: the scheduler takes them.
async fn recover(inner: &Arc<Inner>, scope: &Scope) -> Result<(), StoreError> {
    // Leases of processes that died holding no run go too, so the table does not grow.
    inner.store.remove_silent_instances().await?;
    let labels = crate::store::label_subsets(&inner.config.worker.labels);
    for orphan in inner.store.orphaned_runs(&inner.worker.id).await? {
        let run = orphan.run;
        if !scope.includes(&run.pipeline_id)
            || orphan.owner.as_deref() == Some(inner.instance_id.as_str())
            || inner.executing.lock().unwrap().contains_key(&run.id)
        {
            continue;
        }
        let same_home = orphan
            .worker_id
            .as_deref()
            .is_none_or(|w| w.is_empty() || w == inner.worker.id);
        if !same_home {
            if !labels.contains(&orphan.requires) {
                continue;
            }
            match inner.store.pipeline(&run.pipeline_id).await? {
                Some(p) if p.local_only => {
                    tracing::debug!(run_id = %run.id, "a local-only pipeline's run waits for the worker that holds it");
                    continue;
                }
                Some(_) => {}
                None => continue,
            }
        }
        if !inner
            .store
            .adopt(&run.id, orphan.owner.as_deref(), &inner.claimer())
            .await?
        {
            continue; // another process adopted it first, or its owner came back
        }
        crate::crash::point(crate::crash::Step::Adopted);
        let run = if same_home {
            let container = match inner.runtime.status(&super::container::container_name(&run.id)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(run_id = %run.id, error = %e, "cannot ask Docker about the run's container");
                    None
                }
            };
            tracing::info!(
                run_id = %run.id,
                state = %run.state,
                container = ?container.map(|c| match c {
                    ContainerStatus::Created => "created, never started".to_owned(),
                    ContainerStatus::Running => "running".to_owned(),
                    ContainerStatus::Exited(c) => format!("exited {c}"),
                }),
                "resuming a run whose process is gone"
            );
            run
        } else {
            let lost = match orphan.worker_id.as_deref() {
                Some(w) => inner.store.worker_name(w).await?.unwrap_or_else(|| w.to_owned()),
                None => "another worker".to_owned(),
            };
            let detail = format!(
                "taken over by worker {} from worker {lost}, whose lease expired; started again from the branch",
                inner.worker.name
            );
            tracing::warn!(run_id = %run.id, state = %run.state, "{detail}");
            if !inner
                .store
                .restart_elsewhere(&run.id, &inner.instance_id, &detail)
                .await?
            {
                continue;
            }
            match inner.store.run(&run.id).await? {
                Some(run) => run,
                None => continue,
            }
        };
        inner.publish_stored(&run.id).await?;
        spawn_executor(inner, run);
    }
    Ok(())
}
