//! Scheduling and recovery: claims queued runs within the concurrency limit, keeps this
//! process's lease alive, and adopts runs whose owning process died, resuming each from
//! its stored state. A run is claimed or adopted by one atomic update, so it runs once.

use std::sync::Arc;
use std::time::Duration;

use super::container::ContainerStatus;
use super::{Inner, Orchestrator, executor};
use crate::model::{Millis, now_millis};
use crate::store::{Instance, StoreError};

/// How often a process renews its lease.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(1);
/// A process whose lease is this old is dead, whatever its pid says (a pid may be a
/// zombie, or reused): its runs are adopted.
pub(super) const LEASE_MILLIS: Millis = 4_000;
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

impl Orchestrator {
    /// Registers this process, adopts orphaned runs, and starts scheduling.
    pub async fn start(&self, scope: Scope) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner
            .store
            .register_instance(
                &inner.instance_id,
                &gethostname::gethostname().to_string_lossy(),
                std::process::id() as i64,
            )
            .await?;
        recover(inner, &scope).await?;
        inner.remove_stale_setups().await;
        let me = inner.clone();
        inner.tracker.spawn(heartbeat_loop(me));
        let me = inner.clone();
        inner.tracker.spawn(scheduler_loop(me, scope));
        // PostgreSQL tells every process when runs are queued or end.
        let me = inner.clone();
        inner.tracker.spawn(async move {
            let wake = me.clone();
            me.store
                .on_run_changes(move || wake.wake.notify_one(), me.shutdown.clone())
                .await;
        });
        if inner.config.pr_poll_secs > 0 {
            let me = self.clone();
            inner.tracker.spawn(async move { me.watch_pull_requests().await });
        }
        let me = self.clone();
        inner.tracker.spawn(async move { me.answer_on_forges().await });
        Ok(())
    }
}

async fn heartbeat_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = inner.store.heartbeat(&inner.instance_id).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
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
        let Some(run) = inner
            .store
            .claim_next(&inner.instance_id, inner.config.max_concurrent_runs, scope.pipeline())
            .await?
        else {
            return Ok(());
        };
        tracing::info!(run_id = %run.id, pipeline_id = %run.pipeline_id, state = "preparing", "run claimed");
        crate::crash::point(crate::crash::Step::Claimed);
        inner.publish_stored(&run.id).await?;
        spawn_executor(inner, run);
    }
    Ok(())
}

fn spawn_executor(inner: &Arc<Inner>, run: crate::model::Run) {
    inner.executing.lock().unwrap().insert(run.id.clone());
    inner.tracker.spawn(executor::execute(inner.clone(), run));
}

/// Adopts every active run in scope whose owner is gone and resumes it from its state.
/// Queued runs need nothing: the scheduler takes them.
async fn recover(inner: &Arc<Inner>, scope: &Scope) -> Result<(), StoreError> {
    // Leases of processes that died holding no run go too, so the table does not grow.
    inner
        .store
        .remove_instances_silent_since(now_millis() - LEASE_MILLIS)
        .await?;
    for (run, owner) in inner.store.active_runs_with_owner().await? {
        if !scope.includes(&run.pipeline_id) || owner.as_deref() == Some(inner.instance_id.as_str()) {
            continue;
        }
        let owner_row = match &owner {
            Some(id) => inner.store.instance(id).await?,
            None => None,
        };
        if !owner_is_dead(owner_row.as_ref(), now_millis()) {
            continue;
        }
        if !inner.store.adopt(&run.id, owner.as_deref(), &inner.instance_id).await? {
            continue; // another process adopted it first
        }
        if let Some(dead) = &owner {
            let _ = inner.store.remove_instance(dead).await;
        }
        crate::crash::point(crate::crash::Step::Adopted);
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
        spawn_executor(inner, run);
    }
    Ok(())
}

/// An owner is dead when its lease row is gone or its lease expired. Never by its pid:
/// a dead process may linger as a zombie, and a pid may be reused.
pub(super) fn owner_is_dead(owner: Option<&Instance>, now: Millis) -> bool {
    owner.is_none_or(|o| now - o.heartbeat_at > LEASE_MILLIS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_die_by_missing_lease_or_silence() {
        let now = 1_000_000;
        assert!(owner_is_dead(None, now));
        let stale = Instance {
            id: "a".into(),
            heartbeat_at: now - LEASE_MILLIS - 1,
        };
        assert!(owner_is_dead(Some(&stale), now));
        let fresh = Instance {
            heartbeat_at: now,
            ..stale
        };
        assert!(!owner_is_dead(Some(&fresh), now));
    }
}
