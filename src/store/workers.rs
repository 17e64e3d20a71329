//! Workers and leases: each process holds a lease (its `instances` row) that it renews;
//! a run is claimed by one process and every write its executor makes is fenced on that
//! ownership, so a process that lost its lease (a partition, a pause) can no longer store
//! anything about the run. Lease ages are measured on the database's clock, never on the
//! processes' own, so a host whose clock is off neither loses its runs nor keeps them.

use sqlx::Row;

use super::{ACTIVE_STATES, Backend, RUN_COLUMNS, Result, Store, StoreError, TERMINAL_STATES, run_from_row};
use crate::model::{Millis, Run, RunState};

/// A process whose lease is this old (on the database's clock) is dead: its runs are
/// taken over and its follow-ups may go to other workers.
pub const LEASE_MILLIS: Millis = 4_000;

/// A process as it registers: what others see of it.
#[derive(Debug, Clone, Default)]
pub struct NewInstance {
    pub id: String,
    /// The worker's home (its data folder on its host); empty for a process that
    /// executes nothing (a front end alone).
    pub worker_id: String,
    pub worker_name: String,
    pub hostname: String,
    pub pid: i64,
    pub labels: Vec<String>,
}

/// A live or lately silent process, for people (`threadline workers`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub worker_id: String,
    pub worker_name: String,
    pub hostname: String,
    pub pid: i64,
    pub labels: Vec<String>,
    /// How long ago it last renewed its lease, on the database's clock.
    pub silent_ms: Millis,
    /// Runs it executes now.
    pub active_runs: i64,
}

/// Who asks for a run: one worker process, within its own limit and labels.
#[derive(Debug, Clone)]
pub struct Claimer<'a> {
    pub instance: &'a str,
    pub worker_id: &'a str,
    pub labels: &'a [String],
    /// Runs this process executes at once.
    pub limit: u32,
}

/// An active run whose owner's lease expired (or that never had an owner).
#[derive(Debug, Clone)]
pub struct Orphan {
    pub run: Run,
    pub owner: Option<String>,
    /// The home of the worker that last executed it: the same home resumes it where it
    /// was (its container, its workspace); another starts it afresh from the branch.
    pub worker_id: Option<String>,
    /// The labels it needs of its worker.
    pub requires: String,
}

/// A queued run next in its pipeline, and what it waits for.
#[derive(Debug, Clone)]
pub struct NextQueued {
    pub run: Run,
    /// The labels it needs (sorted, comma-joined).
    pub requires: String,
    /// The name of the gone worker holding its local-only pipeline, if that is so.
    pub lost_holder: Option<String>,
}

/// Every sorted, comma-joined subset of `labels`: the `requires` values a worker with
/// these labels satisfies (a worker has at most [`crate::config::MAX_WORKER_LABELS`]).
pub fn label_subsets(labels: &[String]) -> Vec<String> {
    let mut sorted: Vec<&str> = labels.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let sorted = &sorted[..sorted.len().min(crate::config::MAX_WORKER_LABELS)];
    (0u32..1 << sorted.len())
        .map(|mask| {
            sorted
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, l)| *l)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// A SQL list of string literals. Only for labels, which validation limits to
/// `[a-z0-9._-]`; anything else is dropped rather than quoted.
pub(super) fn sql_strings(values: &[String]) -> String {
    let safe: Vec<String> = values
        .iter()
        .filter(|v| {
            v.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.' | ','))
        })
        .map(|v| format!("'{v}'"))
        .collect();
    format!("({})", safe.join(", "))
}

impl Store {
    /// The database's clock in milliseconds since the epoch, as SQL.
    pub(super) fn db_now(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// SQL true when the worker `worker_sql` (an expression) has a live process.
    pub(super) fn worker_alive_sql(&self, worker_sql: &str) -> String {
        format!(
            "EXISTS (SELECT 1 FROM instances i WHERE i.worker_id = {worker_sql} AND i.heartbeat_at >= {now} - {LEASE_MILLIS})",
            now = self.db_now()
        )
    }

    /// Takes (or takes again, after it was lost) the lease of `instance`.
    pub async fn register_instance(&self, instance: &NewInstance) -> Result<()> {
        let now = self.db_now();
        sqlx::query(&format!(
            "INSERT INTO instances (id, hostname, pid, started_at, heartbeat_at, worker_id, worker_name, labels) \
             VALUES ($1, $2, $3, {now}, {now}, $4, $5, $6)"
        ))
        .bind(&instance.id)
        .bind(&instance.hostname)
        .bind(instance.pid)
        .bind(&instance.worker_id)
        .bind(&instance.worker_name)
        .bind(instance.labels.join(","))
        .execute(&self.pool)
        .await?;
        if !instance.worker_id.is_empty() {
            sqlx::query(&format!(
                "INSERT INTO workers (id, name, hostname, seen_at) VALUES ($1, $2, $3, {now}) \
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, hostname = excluded.hostname, seen_at = excluded.seen_at"
            ))
            .bind(&instance.worker_id)
            .bind(&instance.worker_name)
            .bind(&instance.hostname)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Renews the lease while it has not expired. Returns false when it had (the
    /// process was cut off or paused): it is taken again, from now, but the runs others
    /// took over meanwhile are theirs, and what this process fenced before is void.
    pub async fn heartbeat(&self, instance: &NewInstance) -> Result<bool> {
        let now = self.db_now();
        let renewed = sqlx::query(&format!(
            "UPDATE instances SET heartbeat_at = {now} WHERE id = $1 AND heartbeat_at >= {now} - {LEASE_MILLIS}"
        ))
        .bind(&instance.id)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        if !renewed {
            self.remove_instance(&instance.id).await?;
            self.register_instance(instance).await?;
        }
        Ok(renewed)
    }

    /// Forgets the processes whose lease expired: they are dead, and their runs are
    /// taken over by whoever finds them.
    pub async fn remove_silent_instances(&self) -> Result<u64> {
        let done = sqlx::query(&format!(
            "DELETE FROM instances WHERE heartbeat_at < {now} - {LEASE_MILLIS}",
            now = self.db_now()
        ))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Ends a process's lease as it stops. With runs still active (agents left running
    /// for the next start) the lease is kept `grace_ms` more, marked stopped: a restart of
    /// the same worker adopts them at once, another worker only once that has passed.
    pub async fn release_instance(&self, id: &str, grace_ms: Millis) -> Result<()> {
        let kept = sqlx::query(&format!(
            "UPDATE instances SET stopped = 1, heartbeat_at = {now} + {keep} WHERE id = $1 \
             AND EXISTS (SELECT 1 FROM runs r WHERE r.owner = instances.id AND r.state IN {active})",
            now = self.db_now(),
            keep = (grace_ms - LEASE_MILLIS).max(0),
            active = *ACTIVE_STATES
        ))
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if kept == 0 {
            self.remove_instance(id).await?;
        }
        Ok(())
    }

    pub async fn remove_instance(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every registered process, the longest-running first.
    pub async fn instances(&self) -> Result<Vec<InstanceInfo>> {
        let rows = sqlx::query(&format!(
            "SELECT i.id, i.worker_id, i.worker_name, i.hostname, i.pid, i.labels, \
             {now} - i.heartbeat_at AS silent_ms, \
             (SELECT COUNT(*) FROM runs r WHERE r.owner = i.id AND r.state IN {active}) AS active_runs \
             FROM instances i ORDER BY i.started_at, i.id",
            now = self.db_now(),
            active = *ACTIVE_STATES
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let labels: String = r.try_get("labels")?;
                Ok(InstanceInfo {
                    id: r.try_get("id")?,
                    worker_id: r.try_get("worker_id")?,
                    worker_name: r.try_get("worker_name")?,
                    hostname: r.try_get("hostname")?,
                    pid: r.try_get("pid")?,
                    labels: labels.split(',').filter(|l| !l.is_empty()).map(str::to_owned).collect(),
                    silent_ms: r.try_get("silent_ms")?,
                    active_runs: r.try_get("active_runs")?,
                })
            })
            .collect()
    }

    /// The name a worker last registered with, live or not (for messages).
    pub async fn worker_name(&self, worker_id: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT name FROM workers WHERE id = $1")
            .bind(worker_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The process that owns a run now (None: none, or no such run).
    pub async fn owner(&self, run_id: &str) -> Result<Option<String>> {
        let owner: Option<Option<String>> = sqlx::query_scalar("SELECT owner FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(owner.flatten())
    }

    /// Active runs and the process that owns each (None when never owned).
    pub async fn active_runs_with_owner(&self) -> Result<Vec<(Run, Option<String>)>> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS}, owner FROM runs WHERE state IN {active} ORDER BY created_at, seq",
            active = *ACTIVE_STATES
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((run_from_row(r)?, r.try_get("owner")?)))
            .collect()
    }

    /// Active runs whose owner holds no lease, oldest first; for worker `mine`, also
    /// the runs of its own home whose owner stopped gracefully (a restart).
    pub async fn orphaned_runs(&self, mine: &str) -> Result<Vec<Orphan>> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS}, owner, worker_id, requires FROM runs WHERE state IN {active} \
             AND NOT EXISTS ({holds}) ORDER BY created_at, seq",
            active = *ACTIVE_STATES,
            holds = self.owner_holds_sql()
        ))
        .bind(mine)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Orphan {
                    run: run_from_row(r)?,
                    owner: r.try_get("owner")?,
                    worker_id: r.try_get("worker_id")?,
                    requires: r.try_get("requires")?,
                })
            })
            .collect()
    }

    /// SQL of a subquery with rows while a run's owner still holds it against the
    /// worker bound as `$1`: its row is there. A lease that ran out counts
    /// only once its row is deleted ([`Store::remove_silent_instances`], before every
    /// takeover): that delete and a renewal lock the row, so a renewal at the lease's
    /// last instant either wins (the run stays) or finds the row gone (its holder learns
    /// the lease was lost), never both. A process that stopped gracefully keeps its runs
    /// from other homes through its grace, not from its own home's restart.
    fn owner_holds_sql(&self) -> String {
        "SELECT 1 FROM instances i WHERE i.id = runs.owner AND NOT (i.stopped = 1 AND runs.worker_id = $1)".to_owned()
    }

    /// Takes over a run from an owner whose lease expired, unless another process did
    /// first or the owner came back: one statement, so it is never taken twice.
    pub async fn adopt(&self, run_id: &str, dead_owner: Option<&str>, me: &Claimer<'_>) -> Result<bool> {
        let rows = sqlx::query(&format!(
            "UPDATE runs SET owner = $2, worker_id = $1 WHERE id = $3 AND state NOT IN {terminal} \
             AND (owner = $4 OR (owner IS NULL AND $4 = '')) AND NOT EXISTS ({holds})",
            terminal = *TERMINAL_STATES,
            holds = self.owner_holds_sql()
        ))
        .bind(me.worker_id)
        .bind(me.instance)
        .bind(run_id)
        .bind(dead_owner.unwrap_or_default())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if rows == 1 {
            sqlx::query("UPDATE pipelines SET holder = $1 WHERE id = (SELECT pipeline_id FROM runs WHERE id = $2)")
                .bind(me.worker_id)
                .bind(run_id)
                .execute(&self.pool)
                .await?;
        }
        Ok(rows == 1)
    }

    /// Starts a run taken over from a lost worker on another host afresh: back to
    /// `preparing`, its container forgotten (it was on that host). What the lost worker
    /// recorded of its save stays, so a push that landed is found and not redone.
    pub async fn restart_elsewhere(&self, run_id: &str, owner: &str, detail: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(&format!(
            "UPDATE runs SET state = '{preparing}', container_id = NULL WHERE id = $1 AND owner = $2 AND state IN {active}",
            preparing = RunState::Preparing.as_str(),
            active = *ACTIVE_STATES
        ))
        .bind(run_id)
        .bind(owner)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if moved {
            super::insert_event(&mut tx, run_id, RunState::Preparing, crate::model::now_millis(), detail).await?;
            self.notify_update(&mut *tx, run_id).await?;
            tx.commit().await?;
        }
        Ok(moved)
    }

    /// Forgets what an earlier attempt at a run left (its exit, error, summary, diffstat,
    /// commit, push and progress) when the run starts again from the branch after the
    /// worker of that attempt was lost: the run shows the new attempt only. Fenced on
    /// `owner` like every write of an executor; the log tail stays, and the usage until
    /// the new attempt reports its own.
    pub async fn forget_attempt(&self, run_id: &str, owner: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "UPDATE runs SET exit_code = NULL, end_reason = NULL, error = NULL, head_commit = NULL, \
             changed = 0, files_changed = NULL, insertions = NULL, deletions = NULL, pushed = 0, \
             push_error = NULL, summary = NULL, progress = NULL, resumed = 0 WHERE id = $1 AND owner = $2",
        )
        .bind(run_id)
        .bind(owner)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if rows == 0 {
            drop(tx);
            return self.check_owner(run_id, owner).await;
        }
        self.notify_update(&mut *tx, run_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Makes `instance` the one front end that keeps the run's chat status message,
    /// unless another live one is. True when `instance` is (or already was) the poster.
    pub async fn claim_poster(&self, run_id: &str, instance: &str) -> Result<bool> {
        let rows = sqlx::query(&format!(
            "UPDATE runs SET poster = $1 WHERE id = $2 AND (poster IS NULL OR poster = $1 \
             OR NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = runs.poster AND i.heartbeat_at >= {now} - {LEASE_MILLIS}))",
            now = self.db_now()
        ))
        .bind(instance)
        .bind(run_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(rows == 1)
    }

    /// The queued runs that are next in their pipeline (nothing active or older before
    /// them), with what they need of a worker.
    pub async fn next_queued(&self) -> Result<Vec<NextQueued>> {
        let rows = sqlx::query(&format!(
            "SELECT {cols}, r.requires, p.local_only, p.holder, \
             CASE WHEN p.holder IS NOT NULL AND {alive} THEN 1 ELSE 0 END AS holder_alive \
             FROM runs r JOIN pipelines p ON p.id = r.pipeline_id WHERE r.state = '{queued}' \
             AND NOT EXISTS (SELECT 1 FROM runs a WHERE a.pipeline_id = r.pipeline_id AND a.state IN {active}) \
             AND NOT EXISTS (SELECT 1 FROM runs q WHERE q.pipeline_id = r.pipeline_id AND q.state = '{queued}' AND q.seq < r.seq) \
             ORDER BY r.created_at LIMIT 500",
            cols = RUN_COLUMNS
                .split(", ")
                .map(|c| format!("r.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", "),
            queued = RunState::Queued.as_str(),
            active = *ACTIVE_STATES,
            alive = self.worker_alive_sql("p.holder")
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let holder: Option<String> = r.try_get("holder")?;
            let local_only: i64 = r.try_get("local_only")?;
            let alive: i64 = r.try_get("holder_alive")?;
            let lost_holder = match holder {
                Some(h) if local_only != 0 && alive == 0 => Some(self.worker_name(&h).await?.unwrap_or(h)),
                _ => None,
            };
            out.push(NextQueued {
                run: run_from_row(r)?,
                requires: r.try_get("requires")?,
                lost_holder,
            });
        }
        Ok(out)
    }

    /// Says why a queued run waits (None: it does not), while it is still queued.
    pub async fn set_waiting(&self, run_id: &str, why: Option<&str>) -> Result<bool> {
        let progress = crate::model::Progress {
            waiting: why.map(str::to_owned),
            ..Default::default()
        };
        let rows = sqlx::query(&format!(
            "UPDATE runs SET progress = $1 WHERE id = $2 AND state = '{queued}'",
            queued = RunState::Queued.as_str()
        ))
        .bind(serde_json::to_string(&progress).ok())
        .bind(run_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if rows == 1 {
            self.notify_update(&self.pool, run_id).await?;
        }
        Ok(rows == 1)
    }

    /// The id of the worker (home) that executes or last executed a run, if any.
    pub async fn home_of_run(&self, run_id: &str) -> Result<Option<String>> {
        let home: Option<Option<String>> = sqlx::query_scalar("SELECT worker_id FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(home.flatten().filter(|w| !w.is_empty()))
    }

    /// The worker (home) that executed the pipeline's latest run other than `run_id`.
    pub async fn previous_home(&self, pipeline_id: &str, run_id: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT worker_id FROM runs WHERE pipeline_id = $1 AND id <> $2 AND worker_id IS NOT NULL \
             AND worker_id <> '' ORDER BY created_at DESC, seq DESC LIMIT 1",
        )
        .bind(pipeline_id)
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The worker that executes (or last executed) a run: (name, host).
    pub async fn worker_of_run(&self, run_id: &str) -> Result<Option<(String, String)>> {
        let row =
            sqlx::query("SELECT w.name, w.hostname FROM runs r JOIN workers w ON w.id = r.worker_id WHERE r.id = $1")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| Ok((r.try_get("name")?, r.try_get("hostname")?)))
            .transpose()
    }

    /// The worker holding a pipeline's workspace: (id, name, host).
    pub async fn holder(&self, pipeline_id: &str) -> Result<Option<(String, String, String)>> {
        let row = sqlx::query(
            "SELECT w.id, w.name, w.hostname FROM pipelines p JOIN workers w ON w.id = p.holder WHERE p.id = $1",
        )
        .bind(pipeline_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("id")?, r.try_get("name")?, r.try_get("hostname")?)))
            .transpose()
    }

    /// Keeps an uploaded file's bytes under `key`.
    pub async fn put_upload(&self, key: &str, bytes: &[u8]) -> Result<()> {
        sqlx::query("INSERT INTO uploads (key, bytes, created_at) VALUES ($1, $2, $3)")
            .bind(key)
            .bind(bytes.to_vec())
            .bind(crate::model::now_millis())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// An uploaded file's bytes, if kept.
    pub async fn upload(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(sqlx::query_scalar("SELECT bytes FROM uploads WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn remove_upload(&self, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM uploads WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Fails with [`StoreError::LeaseLost`] unless `owner` owns the run.
    pub async fn check_owner(&self, run_id: &str, owner: &str) -> Result<()> {
        match self.owner(run_id).await? {
            Some(o) if o == owner => Ok(()),
            now => Err(StoreError::LeaseLost {
                run: run_id.to_owned(),
                owner: now,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_satisfies_every_subset_of_its_labels() {
        let subsets = label_subsets(&["gpu".into(), "arm64".into()]);
        assert_eq!(subsets, vec!["", "arm64", "gpu", "arm64,gpu"]);
        assert_eq!(label_subsets(&[]), vec![""]);
    }

    #[test]
    fn only_label_shaped_strings_reach_sql() {
        assert_eq!(
            sql_strings(&["gpu".into(), "x'); DROP TABLE runs; --".into(), "a,b".into()]),
            "('gpu', 'a,b')"
        );
    }
}
