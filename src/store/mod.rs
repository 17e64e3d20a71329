//! Persistence: pipelines, runs, their state transitions, idempotency keys and process
//! leases. **All SQL lives here.** It runs on `sqlx::any`, so a PostgreSQL backend is a
//! driver and a migrations folder away; callers see only domain types.

mod copy;
mod migrations;
mod workers;

pub use workers::{Claimer, InstanceInfo, LEASE_MILLIS, NewInstance, NextQueued, Orphan, label_subsets};

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::model::{
    Approval, Attachment, AttachmentSource, Diffstat, EndReason, Millis, Origin, Pipeline, Progress, PullRequestRecord,
    Run, RunEvent, RunMode, RunState, Usage, now_millis,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {source}")]
    Open { url: String, source: SqlError },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot lock {path} for the database's migrations: {source}")]
    Lock { path: String, source: std::io::Error },
    #[error("database migration failed: {0}")]
    Migrate(String),
    #[error("database error: {0}")]
    Sql(#[from] SqlError),
    #[error("the stored value {value:?} in {column} is not valid")]
    Corrupt { column: &'static str, value: String },
    /// The run is no longer this process's: its lease expired and another took it over.
    #[error("run {run} is no longer this process's (its owner now: {}); its lease was lost", .owner.as_deref().unwrap_or("none"))]
    LeaseLost { run: String, owner: Option<String> },
    #[error("a run cannot go from {from} to {to}")]
    InvalidTransition { from: RunState, to: RunState },
    /// A prefix that matches more than one id: `matches` lists the first ones, `more`
    /// says there are others.
    #[error(
        "{kind} id {prefix:?} is ambiguous: it matches {}{}; give more of the id",
        .matches.join(", "),
        if *.more { " and more" } else { "" }
    )]
    Ambiguous {
        kind: &'static str,
        prefix: String,
        matches: Vec<String>,
        more: bool,
    },
}

/// A database driver's error, kept opaque: the store's users see its message, not its
/// crate.
#[derive(Debug)]
pub struct SqlError(sqlx::Error);

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SqlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(e.to_string())
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Sql(SqlError(e))
    }
}

impl StoreError {
    /// A unique constraint refused a write another transaction made first (two runs of
    /// one pipeline numbered at once on PostgreSQL, where writers run concurrently).
    fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Sql(SqlError(sqlx::Error::Database(e))) if e.is_unique_violation())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What inserting a run produced: the run, and whether it is new or was found again
/// through its idempotency key.
#[derive(Debug, Clone)]
pub struct Inserted {
    pub run: Run,
    pub created: bool,
}

/// A run to insert.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub prompt: String,
    pub agent: String,
    pub requested_by: String,
    pub idempotency_key: Option<String>,
    pub mode: RunMode,
    /// Recorded with the run, in the same transaction.
    pub attachments: Vec<Attachment>,
    /// The review comment that asked for it, recorded in the same transaction.
    pub forge_request: Option<ForgeRequest>,
    /// The labels its worker must have (see [`crate::config::required_labels`]).
    pub requires: String,
    /// The front end that took the prompt, when it keeps status messages on the thread's
    /// surface: the run's chat status message is its own while it lives (see
    /// [`Store::claim_poster`]); otherwise the first front end to claim it keeps it.
    pub poster: Option<String>,
}

/// A run asked for by a review comment on a pipeline's pull request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgeRequest {
    pub number: i64,
    /// The comment to answer, as [`crate::orchestrator::forge::CommentRef`] JSON.
    pub comment: String,
    pub author: String,
    /// What the agent is told: the comment, its file, line and diff hunk.
    pub context: String,
}

/// A message in a pipeline's thread that started no run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ThreadMessage {
    pub message_id: String,
    /// Who said it, as the platform names them.
    pub author: String,
    pub text: String,
    pub at: Millis,
    /// Files attached to it, where the platform keeps them.
    pub files: Vec<Attachment>,
}

/// One line of `threadline pipelines`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineSummary {
    pub pipeline: Pipeline,
    pub runs: i64,
    pub latest_state: Option<RunState>,
}

/// Fields of a run set together with (or apart from) a transition.
#[derive(Debug, Default, Clone)]
pub struct RunPatch {
    pub exit_code: Option<i64>,
    pub end_reason: Option<EndReason>,
    pub error: Option<String>,
    pub start_commit: Option<String>,
    pub head_commit: Option<String>,
    pub changed: Option<bool>,
    pub diffstat: Option<Diffstat>,
    pub pushed: Option<bool>,
    /// `Some(None)` clears a previous push error.
    pub push_error: Option<Option<String>>,
    pub container_id: Option<String>,
    pub summary: Option<String>,
    pub usage: Option<Usage>,
    pub progress: Option<Progress>,
    pub resumed: Option<bool>,
    /// The session's total cost as the agent reported it.
    pub session_cost_usd: Option<f64>,
}

/// The most thread messages kept per pipeline.
pub const MAX_THREAD_MESSAGES: i64 = 200;

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// For PostgreSQL's LISTEN connection.
    url: std::sync::Arc<str>,
}

/// The PostgreSQL channel a run's arrival or end is told on, so every process claims at
/// once instead of at its next poll.
const RUNS_CHANNEL: &str = "threadline_runs";
/// The PostgreSQL channel every change of a run is told on, with its id.
const UPDATES_CHANNEL: &str = "threadline_run_updates";

/// Which database a store is on, where the two differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

const RUN_COLUMNS: &str = "id, pipeline_id, seq, prompt, agent, requested_by, state, created_at, \
     started_at, finished_at, exit_code, end_reason, error, start_commit, head_commit, changed, \
     files_changed, insertions, deletions, pushed, push_error, container_id, cancel_requested, \
     summary, log_tail, mode, tokens_in, tokens_out, cost_micro_usd, progress, resumed, session_cost_micro_usd";
const PR_COLUMNS: &str = "pipeline_id, forge, number, url, found, opened_by, created_at, state, state_at, state_by";
const PIPELINE_COLUMNS: &str = "id, repo, remote_url, local_only, base_branch, branch, agent, \
     title, origin_surface, origin_thread, origin_url, created_at";
/// The state lists of SQL, made from the lifecycle's own.
static ACTIVE_STATES: LazyLock<String> = LazyLock::new(|| RunState::sql_list(&RunState::ACTIVE));
static TERMINAL_STATES: LazyLock<String> = LazyLock::new(|| RunState::sql_list(&RunState::TERMINAL));

impl Store {
    /// Opens (creating if needed) the database at `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = url.split(':').next().unwrap_or_default().to_owned();
        if backend == "sqlite"
            && let Some(path) = sqlite_path(url)
            && let Some(dir) = Path::new(&path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let is_sqlite = backend == "sqlite";
        let pool = AnyPoolOptions::new()
            .max_connections(if is_sqlite { 4 } else { 10 })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if is_sqlite {
                        // WAL lets readers (the CLI, the dashboard) run beside the daemon.
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|source| StoreError::Open {
                url: url.to_owned(),
                source: SqlError(source),
            })?;
        // Several processes may open a fresh database at once; PostgreSQL's migrator
        // takes an advisory lock, SQLite's takes none: a file lock beside the database
        // makes them apply one at a time (the later ones then find nothing to do).
        let _held = match sqlite_path(url) {
            Some(path) => Some(migration_lock(&format!("{path}.migrate-lock")).await?),
            None => None,
        };
        migrations::run(&pool, &backend).await?;
        let backend = if is_sqlite { Backend::Sqlite } else { Backend::Postgres };
        Ok(Store {
            pool,
            backend,
            url: url.into(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// On PostgreSQL: calls `wake` whenever any process queues a run or ends one (the
    /// moments a claim may succeed), until `stop`. The connection is remade when it
    /// drops. On SQLite there is nothing to listen to: returns at once.
    /// With `updated`, it is also called with the id of every run any process changes.
    pub async fn on_run_changes(
        &self,
        wake: impl Fn() + Send + 'static,
        updated: Option<Box<dyn Fn(String) + Send + Sync>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if self.backend != Backend::Postgres {
            return;
        }
        loop {
            let listener = async {
                let mut listener = sqlx::postgres::PgListener::connect(&self.url).await?;
                listener.listen(RUNS_CHANNEL).await?;
                if updated.is_some() {
                    listener.listen(UPDATES_CHANNEL).await?;
                }
                // Whatever happened while not listening.
                wake();
                loop {
                    let n = listener.recv().await?;
                    match &updated {
                        Some(updated) if n.channel() == UPDATES_CHANNEL => {
                            updated(crate::untrusted::prefix(n.payload(), 64).to_owned())
                        }
                        _ => wake(),
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                ended = listener => {
                    if let Err(e) = ended {
                        tracing::warn!(error = %e, "lost the database's notifications; listening again");
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Tells the front ends of other processes (PostgreSQL) that a run changed, so the
    /// one keeping its status message shows it at once.
    async fn notify_update<'e>(
        &self,
        executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
        run_id: &str,
    ) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(UPDATES_CHANNEL)
                .bind(run_id)
                .execute(executor)
                .await?;
        }
        Ok(())
    }

    /// Tells the other processes (PostgreSQL) that runs changed, when `tx` commits.
    async fn notify_in(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query(&format!("NOTIFY {RUNS_CHANNEL}"))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    // ---- pipelines and runs -------------------------------------------------------

    /// Inserts a new pipeline with its first run. With an idempotency key already used,
    /// nothing is inserted and the earlier run is returned.
    pub async fn insert_pipeline(&self, pipeline: &Pipeline, run: &NewRun) -> Result<Inserted> {
        if let Some(found) = self.run_for_idempotency_key(run.idempotency_key.as_deref()).await? {
            return Ok(Inserted {
                run: found,
                created: false,
            });
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO pipelines (id, repo, remote_url, local_only, base_branch, branch, agent, \
             title, origin_surface, origin_thread, origin_url, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&pipeline.id)
        .bind(&pipeline.repo)
        .bind(&pipeline.remote_url)
        .bind(pipeline.local_only as i64)
        .bind(&pipeline.base_branch)
        .bind(&pipeline.branch)
        .bind(&pipeline.agent)
        .bind(&pipeline.title)
        .bind(&pipeline.origin.surface)
        .bind(&pipeline.origin.thread)
        .bind(&pipeline.origin.url)
        .bind(pipeline.created_at)
        .execute(&mut *tx)
        .await?;
        let inserted = insert_run_in(&mut tx, &pipeline.id, run).await?;
        if inserted.created {
            self.notify_in(&mut tx).await?;
            tx.commit().await?;
        }
        // A concurrent redelivery won the key: the pipeline insert is rolled back with it.
        Ok(inserted)
    }

    /// Appends a run to a pipeline (a follow-up or a retry). Two at once may both pick
    /// the next number (PostgreSQL runs writers concurrently): the loser numbers again.
    pub async fn insert_run(&self, pipeline_id: &str, run: &NewRun) -> Result<Inserted> {
        let mut attempt = 0;
        loop {
            if let Some(found) = self.run_for_idempotency_key(run.idempotency_key.as_deref()).await? {
                return Ok(Inserted {
                    run: found,
                    created: false,
                });
            }
            let mut tx = self.pool.begin().await?;
            match insert_run_in(&mut tx, pipeline_id, run).await {
                Ok(inserted) => {
                    if inserted.created {
                        self.notify_in(&mut tx).await?;
                        tx.commit().await?;
                    }
                    return Ok(inserted);
                }
                Err(e) if e.is_conflict() && attempt < 20 => {
                    drop(tx);
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(5 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn run_for_idempotency_key(&self, key: Option<&str>) -> Result<Option<Run>> {
        let Some(key) = key else { return Ok(None) };
        let row = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE id = (SELECT run_id FROM requests WHERE idempotency_key = $1)"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| run_from_row(&r)).transpose()
    }

    pub async fn pipeline(&self, id: &str) -> Result<Option<Pipeline>> {
        let row = sqlx::query(&format!("SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| pipeline_from_row(&r)).transpose()
    }

    /// Finds a pipeline by its id or a unique prefix of it. The prefix is taken literally:
    /// `%` and `_` are characters, not wildcards, and case matters.
    pub async fn find_pipeline(&self, prefix: &str) -> Result<Option<Pipeline>> {
        /// The most ids an ambiguous prefix reports.
        const MAX_CANDIDATES: usize = 10;
        if let Some(p) = self.pipeline(prefix).await? {
            return Ok(Some(p));
        }
        if prefix.is_empty() {
            return Ok(None);
        }
        // LIKE (wildcards escaped) narrows the search; comparing the start makes the match
        // exact, as SQLite's LIKE ignores the case of ASCII letters.
        let rows = sqlx::query(&format!(
            "SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE id LIKE $1 ESCAPE '\\' \
             AND substr(id, 1, length($2)) = $2 ORDER BY id LIMIT {}",
            MAX_CANDIDATES + 1
        ))
        .bind(format!("{}%", escape_like(prefix)))
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        match rows.len() {
            0 => Ok(None),
            1 => pipeline_from_row(&rows[0]).map(Some),
            n => Err(StoreError::Ambiguous {
                kind: "pipeline",
                prefix: prefix.to_owned(),
                matches: rows
                    .iter()
                    .take(MAX_CANDIDATES)
                    .map(|r| r.try_get("id"))
                    .collect::<Result<_, _>>()?,
                more: n > MAX_CANDIDATES,
            }),
        }
    }

    pub async fn pipeline_by_origin(&self, origin: &Origin) -> Result<Option<Pipeline>> {
        let row = sqlx::query(&format!(
            "SELECT {PIPELINE_COLUMNS} FROM pipelines WHERE origin_surface = $1 AND origin_thread = $2 \
             ORDER BY created_at DESC LIMIT 1"
        ))
        .bind(&origin.surface)
        .bind(&origin.thread)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| pipeline_from_row(&r)).transpose()
    }

    /// Pipelines, newest first, with their number of runs and latest run state.
    pub async fn pipelines(&self, limit: i64) -> Result<Vec<PipelineSummary>> {
        let rows = sqlx::query(&format!(
            "SELECT {PIPELINE_COLUMNS}, \
               (SELECT COUNT(*) FROM runs r WHERE r.pipeline_id = pipelines.id) AS run_count, \
               (SELECT r.state FROM runs r WHERE r.pipeline_id = pipelines.id ORDER BY r.seq DESC LIMIT 1) AS latest \
             FROM pipelines ORDER BY created_at DESC, id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let latest: Option<String> = r.try_get("latest")?;
                Ok(PipelineSummary {
                    pipeline: pipeline_from_row(r)?,
                    runs: r.try_get("run_count")?,
                    latest_state: latest.map(|s| parse_state(&s)).transpose()?,
                })
            })
            .collect()
    }

    pub async fn runs(&self, pipeline_id: &str) -> Result<Vec<Run>> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE pipeline_id = $1 ORDER BY seq"
        ))
        .bind(pipeline_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    pub async fn run(&self, id: &str) -> Result<Option<Run>> {
        let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| run_from_row(&r)).transpose()
    }

    /// A run by its id; a pipeline id (or unique prefix) means that pipeline's latest run.
    pub async fn find_run(&self, id: &str) -> Result<Option<Run>> {
        if let Some(run) = self.run(id).await? {
            return Ok(Some(run));
        }
        match self.find_pipeline(id).await? {
            Some(p) => Ok(self.runs(&p.id).await?.pop()),
            None => Ok(None),
        }
    }

    /// Runs in any of `states`, oldest first.
    pub async fn runs_in_states(&self, states: &[RunState]) -> Result<Vec<Run>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let list = states
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE state IN ({list}) ORDER BY created_at, seq"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    pub async fn events(&self, run_id: &str) -> Result<Vec<RunEvent>> {
        let rows = sqlx::query("SELECT run_id, state, at, detail FROM run_events WHERE run_id = $1 ORDER BY id")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RunEvent {
                    run_id: r.try_get("run_id")?,
                    state: parse_state(&r.try_get::<String, _>("state")?)?,
                    at: r.try_get("at")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    /// How many runs are in each state, for metrics.
    pub async fn count_by_state(&self) -> Result<Vec<(RunState, i64)>> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM runs GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((parse_state(&r.try_get::<String, _>("state")?)?, r.try_get("n")?)))
            .collect()
    }

    /// Runs that ended at or after `since` (ms): their final state, when, and their cost.
    pub async fn ended_since(&self, since: Millis) -> Result<Vec<(RunState, Millis, Option<f64>)>> {
        let rows = sqlx::query(&format!(
            "SELECT state, finished_at, cost_micro_usd FROM runs WHERE state IN {terminal} AND finished_at >= $1",
            terminal = *TERMINAL_STATES
        ))
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    parse_state(&r.try_get::<String, _>("state")?)?,
                    r.try_get("finished_at")?,
                    r.try_get::<Option<i64>, _>("cost_micro_usd")?.map(|m| m as f64 / 1e6),
                ))
            })
            .collect()
    }

    // ---- the lifecycle ------------------------------------------------------------

    /// Takes the oldest queued run that may start now: its pipeline has no active run and
    /// no older queued run, and the claimer executes fewer than `limit` runs. One
    /// statement, so two processes can never take the same run, nor one exceed its limit.
    ///
    /// A worker takes only runs whose required labels it has, at most `limit` of its own
    /// at once, and a pipeline whose workspace another live worker holds is left to that
    /// worker; a local-only pipeline waits for its worker whatever happens (its branch
    /// lives in that worker's mirror).
    pub async fn claim_next(&self, claimer: &Claimer<'_>, pipeline: Option<&str>) -> Result<Option<Run>> {
        let scope = if pipeline.is_some() {
            "AND r.pipeline_id = $4"
        } else {
            ""
        };
        let mut tx = self.pool.begin().await?;
        // SQLite runs one writer at a time. PostgreSQL runs them at once: the candidate is
        // locked with SKIP LOCKED, so a run another claimer is taking is passed over, and
        // its pipeline's later runs with it (the older one is still queued, or active, as
        // this statement sees it). One process's claims go one at a time, under an
        // advisory lock of its own, so its limit holds; a claimer at its limit locks no
        // candidate, which another would then pass over and come away empty.
        let skip_locked = if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(7243001, hashtext($1))")
                .bind(claimer.instance)
                .execute(&mut *tx)
                .await?;
            let active: i64 = sqlx::query_scalar(&format!(
                "SELECT COUNT(*) FROM runs WHERE state IN {active} AND owner = $1",
                active = *ACTIVE_STATES
            ))
            .bind(claimer.instance)
            .fetch_one(&mut *tx)
            .await?;
            if active >= claimer.limit as i64 {
                return Ok(None);
            }
            "FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        // After the lock: a run queued while this claim waited is seen, and started after.
        let now = now_millis();
        let claimed = sqlx::query(&format!(
            "UPDATE runs SET state = '{preparing}', owner = $1, started_at = $3, worker_id = $5 \
             WHERE state = '{queued}' AND id = ( \
                 SELECT r.id FROM runs r WHERE r.state = '{queued}' {scope} \
                 AND r.requires IN {satisfied} \
                 AND NOT EXISTS (SELECT 1 FROM runs a WHERE a.pipeline_id = r.pipeline_id AND a.state IN {active}) \
                 AND NOT EXISTS (SELECT 1 FROM runs q WHERE q.pipeline_id = r.pipeline_id AND q.state = '{queued}' AND q.seq < r.seq) \
                 AND EXISTS (SELECT 1 FROM pipelines p WHERE p.id = r.pipeline_id AND \
                     (p.holder IS NULL OR p.holder = $5 OR (p.local_only = 0 AND NOT {holder_alive}))) \
                 ORDER BY r.created_at, r.seq LIMIT 1 {skip_locked}) \
             AND (SELECT COUNT(*) FROM runs c WHERE c.state IN {active} AND c.owner = $1) < $2 \
             RETURNING {RUN_COLUMNS}",
            preparing = RunState::Preparing.as_str(),
            queued = RunState::Queued.as_str(),
            active = *ACTIVE_STATES,
            satisfied = workers::sql_strings(&workers::label_subsets(claimer.labels)),
            holder_alive = self.worker_alive_sql("p.holder"),
        ))
        .bind(claimer.instance)
        .bind(claimer.limit as i64)
        .bind(now)
        .bind(pipeline.unwrap_or_default())
        .bind(claimer.worker_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = claimed else {
            return Ok(None);
        };
        let run = run_from_row(&row)?;
        // The pipeline's workspace is (about to be) on this worker's disk.
        sqlx::query("UPDATE pipelines SET holder = $1 WHERE id = $2")
            .bind(claimer.worker_id)
            .bind(&run.pipeline_id)
            .execute(&mut *tx)
            .await?;
        insert_event(&mut tx, &run.id, RunState::Preparing, now, "").await?;
        tx.commit().await?;
        Ok(Some(run))
    }

    /// Moves a run from `from` to `to` if it is still in `from`; records the event.
    /// Returns false when another actor moved it first.
    pub async fn transition(&self, run_id: &str, from: RunState, to: RunState, detail: &str) -> Result<bool> {
        self.transition_in(None, run_id, from, to, detail).await
    }

    /// [`Store::transition`] by the run's executor: only while `owner` owns the run
    /// (fencing), else [`StoreError::LeaseLost`].
    pub async fn transition_owned(
        &self,
        owner: &str,
        run_id: &str,
        from: RunState,
        to: RunState,
        detail: &str,
    ) -> Result<bool> {
        let moved = self.transition_in(Some(owner), run_id, from, to, detail).await?;
        if !moved {
            self.check_owner(run_id, owner).await?;
        }
        Ok(moved)
    }

    async fn transition_in(
        &self,
        owner: Option<&str>,
        run_id: &str,
        from: RunState,
        to: RunState,
        detail: &str,
    ) -> Result<bool> {
        if !from.can_transition_to(to) {
            return Err(StoreError::InvalidTransition { from, to });
        }
        let now = now_millis();
        let mut tx = self.pool.begin().await?;
        let finished = if to.is_terminal() { Some(now) } else { None };
        let fence = if owner.is_some() { "AND owner = $5" } else { "" };
        let done = sqlx::query(&format!(
            "UPDATE runs SET state = $1, finished_at = COALESCE($2, finished_at) WHERE id = $3 AND state = $4 {fence}"
        ))
        .bind(to.as_str())
        .bind(finished)
        .bind(run_id)
        .bind(from.as_str())
        .bind(owner.unwrap_or_default())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if done {
            insert_event(&mut tx, run_id, to, now, detail).await?;
            // An end frees a slot and lets the pipeline's next run start.
            if to.is_terminal() {
                self.notify_in(&mut tx).await?;
            }
            self.notify_update(&mut *tx, run_id).await?;
            tx.commit().await?;
        }
        Ok(done)
    }

    /// Stores what an executor learned of its run, only while `owner` owns it (fencing):
    /// else [`StoreError::LeaseLost`], and nothing is written.
    pub async fn update_run_owned(&self, owner: &str, run_id: &str, patch: &RunPatch) -> Result<()> {
        if !self.update_run_in(Some(owner), run_id, patch).await? {
            self.check_owner(run_id, owner).await?;
        }
        Ok(())
    }

    pub async fn update_run(&self, run_id: &str, patch: &RunPatch) -> Result<()> {
        self.update_run_in(None, run_id, patch).await.map(|_| ())
    }

    /// Whether a row was written.
    async fn update_run_in(&self, owner: Option<&str>, run_id: &str, patch: &RunPatch) -> Result<bool> {
        let mut sets: Vec<(&str, Bind)> = Vec::new();
        if let Some(v) = patch.exit_code {
            sets.push(("exit_code", Bind::Int(Some(v))));
        }
        if let Some(v) = patch.end_reason {
            sets.push(("end_reason", Bind::Text(Some(v.as_str().to_owned()))));
        }
        if let Some(v) = &patch.error {
            sets.push(("error", Bind::Text(Some(v.clone()))));
        }
        if let Some(v) = &patch.start_commit {
            sets.push(("start_commit", Bind::Text(Some(v.clone()))));
        }
        if let Some(v) = &patch.head_commit {
            sets.push(("head_commit", Bind::Text(Some(v.clone()))));
        }
        if let Some(v) = patch.changed {
            sets.push(("changed", Bind::Int(Some(v as i64))));
        }
        if let Some(d) = &patch.diffstat {
            sets.push(("files_changed", Bind::Int(Some(d.files_changed))));
            sets.push(("insertions", Bind::Int(Some(d.insertions))));
            sets.push(("deletions", Bind::Int(Some(d.deletions))));
        }
        if let Some(v) = patch.pushed {
            sets.push(("pushed", Bind::Int(Some(v as i64))));
        }
        if let Some(v) = &patch.push_error {
            sets.push(("push_error", Bind::Text(v.clone())));
        }
        if let Some(v) = &patch.container_id {
            sets.push(("container_id", Bind::Text(Some(v.clone()))));
        }
        if let Some(v) = &patch.summary {
            sets.push(("summary", Bind::Text(Some(v.clone()))));
        }
        if let Some(u) = &patch.usage {
            sets.push(("tokens_in", Bind::Int(u.tokens_in)));
            sets.push(("tokens_out", Bind::Int(u.tokens_out)));
            let micro = u.cost_usd.map(|c| (c * 1e6).round() as i64);
            sets.push(("cost_micro_usd", Bind::Int(micro)));
        }
        if let Some(v) = patch.resumed {
            sets.push(("resumed", Bind::Int(Some(v as i64))));
        }
        if let Some(c) = patch.session_cost_usd {
            sets.push(("session_cost_micro_usd", Bind::Int(Some((c * 1e6).round() as i64))));
        }
        if let Some(p) = &patch.progress {
            sets.push(("progress", Bind::Text(serde_json::to_string(p).ok())));
        }
        if sets.is_empty() {
            return Ok(true);
        }
        let assignments = sets
            .iter()
            .enumerate()
            .map(|(i, (col, _))| format!("{col} = ${}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let fence = match owner {
            Some(_) => format!("AND owner = ${}", sets.len() + 2),
            None => String::new(),
        };
        let sql = format!("UPDATE runs SET {assignments} WHERE id = ${} {fence}", sets.len() + 1);
        let mut q = sqlx::query(&sql);
        for (_, b) in sets {
            q = match b {
                Bind::Int(v) => q.bind(v),
                Bind::Text(v) => q.bind(v),
            };
        }
        q = q.bind(run_id);
        if let Some(owner) = owner {
            q = q.bind(owner);
        }
        let written = q.execute(&self.pool).await?.rows_affected() == 1;
        if written {
            self.notify_update(&self.pool, run_id).await?;
        }
        Ok(written)
    }

    pub async fn attachments(&self, run_id: &str) -> Result<Vec<Attachment>> {
        let rows = sqlx::query("SELECT name, source, location, auth FROM attachments WHERE run_id = $1 ORDER BY name")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let location: String = r.try_get("location")?;
                let source = match r.try_get::<String, _>("source")?.as_str() {
                    "file" => AttachmentSource::File { path: location },
                    "stored" => AttachmentSource::Stored { key: location },
                    "url" => AttachmentSource::Url {
                        url: location,
                        auth: r.try_get("auth")?,
                    },
                    other => {
                        return Err(StoreError::Corrupt {
                            column: "source",
                            value: other.to_owned(),
                        });
                    }
                };
                Ok(Attachment {
                    name: r.try_get("name")?,
                    source,
                })
            })
            .collect()
    }

    /// Keeps a thread message that started no run (once per message id); a thread keeps
    /// its latest `MAX_THREAD_MESSAGES`.
    pub async fn add_thread_message(&self, pipeline_id: &str, m: &ThreadMessage) -> Result<()> {
        sqlx::query(
            "INSERT INTO thread_messages (pipeline_id, message_id, author, text, at, files) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind(pipeline_id)
        .bind(&m.message_id)
        .bind(&m.author)
        .bind(&m.text)
        .bind(m.at)
        .bind(serde_json::to_string(&m.files).unwrap_or_else(|_| "[]".into()))
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "DELETE FROM thread_messages WHERE pipeline_id = $1 AND message_id NOT IN \
             (SELECT message_id FROM thread_messages WHERE pipeline_id = $1 ORDER BY at DESC LIMIT $2)",
        )
        .bind(pipeline_id)
        .bind(MAX_THREAD_MESSAGES)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A thread's messages after `since` (ms), oldest first.
    pub async fn thread_messages(&self, pipeline_id: &str, since: Millis) -> Result<Vec<ThreadMessage>> {
        let rows = sqlx::query(
            "SELECT message_id, author, text, at, files FROM thread_messages WHERE pipeline_id = $1 AND at > $2 \
             ORDER BY at, message_id",
        )
        .bind(pipeline_id)
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ThreadMessage {
                    message_id: r.try_get("message_id")?,
                    author: r.try_get("author")?,
                    text: r.try_get("text")?,
                    at: r.try_get("at")?,
                    // Written here only; an unreadable list is no files.
                    files: serde_json::from_str(&r.try_get::<String, _>("files")?).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Marks a run for cancellation. A queued run is cancelled at once (returns true);
    /// an active one is stopped by whichever process owns it. Requests are counted, so a
    /// save can tell a cancel asked of it from the one that stopped the agent before it.
    pub async fn request_cancel(&self, run_id: &str) -> Result<bool> {
        sqlx::query("UPDATE runs SET cancel_requested = cancel_requested + 1 WHERE id = $1")
            .bind(run_id)
            .execute(&self.pool)
            .await?;
        self.transition(run_id, RunState::Queued, RunState::Cancelled, "cancelled while queued")
            .await
    }

    pub async fn cancel_requested(&self, run_id: &str) -> Result<bool> {
        Ok(self.cancel_requests(run_id).await? != 0)
    }

    /// How many times a cancel of the run has been asked for.
    pub async fn cancel_requests(&self, run_id: &str) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT cancel_requested FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// The run's latest log lines, stored by its executor while `owner` owns it.
    pub async fn set_log_tail(&self, owner: &str, run_id: &str, tail: &str) -> Result<()> {
        sqlx::query("UPDATE runs SET log_tail = $1 WHERE id = $2 AND owner = $3")
            .bind(tail)
            .bind(run_id)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- chat status messages -----------------------------------------------------

    /// The status message a chat surface posted for a run: (channel, message id).
    pub async fn chat_message(&self, run_id: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query("SELECT channel, message_id FROM chat_messages WHERE run_id = $1")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("channel")?, r.try_get("message_id")?)))
            .transpose()
    }

    pub async fn set_chat_message(&self, run_id: &str, surface: &str, channel: &str, message_id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO chat_messages (run_id, surface, channel, message_id) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (run_id) DO UPDATE SET channel = $3, message_id = $4",
        )
        .bind(run_id)
        .bind(surface)
        .bind(channel)
        .bind(message_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- pull requests and approvals ----------------------------------------------

    pub async fn pull_request(&self, pipeline_id: &str) -> Result<Option<PullRequestRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {PR_COLUMNS} FROM pull_requests WHERE pipeline_id = $1"
        ))
        .bind(pipeline_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(pull_request_from_row).transpose()
    }

    /// The pull requests worth asking the forge about: every one it last called open,
    /// and those closed (not merged) since `closed_since`, which may be reopened.
    pub async fn pull_requests_to_poll(&self, closed_since: Millis) -> Result<Vec<PullRequestRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {PR_COLUMNS} FROM pull_requests WHERE state = 'open' OR (state = 'closed' AND state_at >= $1)"
        ))
        .bind(closed_since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(pull_request_from_row).collect()
    }

    /// The pull requests numbered `number` on `forge` of the pipelines of `repo`.
    pub async fn pull_requests_numbered(&self, repo: &str, forge: &str, number: i64) -> Result<Vec<PullRequestRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {PR_COLUMNS} FROM pull_requests WHERE forge = $1 AND number = $2 \
             AND pipeline_id IN (SELECT id FROM pipelines WHERE repo = $3)"
        ))
        .bind(forge)
        .bind(number)
        .bind(repo)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(pull_request_from_row).collect()
    }

    /// Records what the forge says of pull request `number` now, and who did it; false
    /// when that was already known.
    pub async fn set_pull_request_state(
        &self,
        pipeline_id: &str,
        number: i64,
        state: &str,
        by: Option<&str>,
        at: Millis,
    ) -> Result<bool> {
        // Who did it is kept when a later report (a poll) cannot say; the time is the
        // change's, not the report's.
        let changed = sqlx::query(
            "UPDATE pull_requests SET \
               state_by = CASE WHEN state <> $1 THEN $3 ELSE COALESCE($3, state_by) END, \
               state_at = CASE WHEN state <> $1 THEN $2 ELSE state_at END, \
               state = $1 \
             WHERE pipeline_id = $4 AND number = $5 \
               AND (state <> $1 OR ($3 IS NOT NULL AND COALESCE(state_by, '') <> $3))",
        )
        .bind(state)
        .bind(at)
        .bind(by)
        .bind(pipeline_id)
        .bind(number)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(changed > 0)
    }

    // ---- runs asked for on the forge ----------------------------------------------

    pub async fn forge_request(&self, run_id: &str) -> Result<Option<ForgeRequest>> {
        let row = sqlx::query("SELECT number, comment, author, context FROM forge_requests WHERE run_id = $1")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(ForgeRequest {
                number: r.try_get("number")?,
                comment: r.try_get("comment")?,
                author: r.try_get("author")?,
                context: r.try_get("context")?,
            })
        })
        .transpose()
    }

    /// The runs asked for on a forge that ended and were not answered there yet.
    pub async fn unanswered_forge_requests(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT f.run_id FROM forge_requests f JOIN runs r ON r.id = f.run_id \
             WHERE f.replied_at IS NULL AND r.state IN {}",
            *TERMINAL_STATES
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Why the answer to a forge request could not be sent.
    pub async fn set_forge_reply_error(&self, run_id: &str, error: &str) -> Result<()> {
        sqlx::query("UPDATE forge_requests SET reply_error = $1 WHERE run_id = $2")
            .bind(error)
            .bind(run_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks a forge request answered (or given up on, with `error`); false when it
    /// already was, so only one process answers.
    pub async fn mark_forge_request_answered(&self, run_id: &str, error: Option<&str>) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE forge_requests SET replied_at = $1, reply_error = $2 WHERE run_id = $3 AND replied_at IS NULL",
        )
        .bind(now_millis())
        .bind(error)
        .bind(run_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done > 0)
    }

    /// Records a pipeline's pull request; a pipeline keeps the first one recorded,
    /// which is returned.
    pub async fn set_pull_request(&self, pr: &PullRequestRecord) -> Result<PullRequestRecord> {
        sqlx::query(
            "INSERT INTO pull_requests (pipeline_id, forge, number, url, found, opened_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(&pr.pipeline_id)
        .bind(&pr.forge)
        .bind(pr.number)
        .bind(&pr.url)
        .bind(pr.found as i64)
        .bind(&pr.opened_by)
        .bind(pr.created_at)
        .execute(&self.pool)
        .await?;
        Ok(self.pull_request(&pr.pipeline_id).await?.unwrap_or_else(|| pr.clone()))
    }

    /// Forgets pull request `number` of a pipeline (it was merged or closed), so the
    /// pipeline can have a new one.
    pub async fn clear_pull_request(&self, pipeline_id: &str, number: i64) -> Result<()> {
        sqlx::query("DELETE FROM pull_requests WHERE pipeline_id = $1 AND number = $2")
            .bind(pipeline_id)
            .bind(number)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records an Open PR decision once per `request_key`.
    pub async fn record_approval(&self, request_key: &str, approval: &Approval) -> Result<()> {
        sqlx::query(
            "INSERT INTO approvals (request_key, pipeline_id, run_id, actor, decision, reason, created_at, commit_sha) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(request_key)
        .bind(&approval.pipeline_id)
        .bind(&approval.run_id)
        .bind(&approval.actor)
        .bind(if approval.approved { "approved" } else { "refused" })
        .bind(&approval.reason)
        .bind(approval.at)
        .bind(&approval.commit)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A pipeline's Open PR decisions, oldest first.
    pub async fn approvals(&self, pipeline_id: &str) -> Result<Vec<Approval>> {
        let rows = sqlx::query(
            "SELECT pipeline_id, run_id, actor, decision, reason, created_at, commit_sha FROM approvals \
             WHERE pipeline_id = $1 ORDER BY created_at, request_key",
        )
        .bind(pipeline_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Approval {
                    pipeline_id: r.try_get("pipeline_id")?,
                    run_id: r.try_get("run_id")?,
                    actor: r.try_get("actor")?,
                    approved: r.try_get::<String, _>("decision")? == "approved",
                    reason: r.try_get("reason")?,
                    at: r.try_get("created_at")?,
                    commit: r.try_get("commit_sha")?,
                })
            })
            .collect()
    }
}

enum Bind {
    Int(Option<i64>),
    Text(Option<String>),
}

async fn insert_run_in(tx: &mut sqlx::Transaction<'_, sqlx::Any>, pipeline_id: &str, run: &NewRun) -> Result<Inserted> {
    let now = now_millis();
    // The write comes first: a SQLite transaction that reads before writing cannot wait
    // for another writer and fails with "database is locked".
    let id: String = sqlx::query_scalar(
        "INSERT INTO runs (id, pipeline_id, seq, prompt, agent, requested_by, state, created_at, mode, requires, poster) \
         SELECT $1 || '-' || CAST(next.n AS TEXT), $1, next.n, $2, $3, $4, 'queued', $5, $6, $7, $8 \
         FROM (SELECT COALESCE(MAX(seq), 0) + 1 AS n FROM runs WHERE pipeline_id = $1) AS next \
         RETURNING id",
    )
    .bind(pipeline_id)
    .bind(&run.prompt)
    .bind(&run.agent)
    .bind(&run.requested_by)
    .bind(now)
    .bind(run.mode.as_str())
    .bind(&run.requires)
    .bind(&run.poster)
    .fetch_one(&mut **tx)
    .await?;
    if let Some(key) = &run.idempotency_key {
        let fresh = sqlx::query(
            "INSERT INTO requests (idempotency_key, run_id, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(key)
        .bind(&id)
        .bind(now)
        .execute(&mut **tx)
        .await?
        .rows_affected()
            == 1;
        if !fresh {
            let existing: String = sqlx::query_scalar("SELECT run_id FROM requests WHERE idempotency_key = $1")
                .bind(key)
                .fetch_one(&mut **tx)
                .await?;
            let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"))
                .bind(existing)
                .fetch_one(&mut **tx)
                .await?;
            return Ok(Inserted {
                run: run_from_row(&row)?,
                created: false,
            });
        }
    }
    insert_event(tx, &id, RunState::Queued, now, "").await?;
    if let Some(f) = &run.forge_request {
        sqlx::query(
            "INSERT INTO forge_requests (run_id, pipeline_id, number, comment, author, context) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(pipeline_id)
        .bind(f.number)
        .bind(&f.comment)
        .bind(&f.author)
        .bind(&f.context)
        .execute(&mut **tx)
        .await?;
    }
    for a in &run.attachments {
        let (source, location, auth) = match &a.source {
            AttachmentSource::File { path } => ("file", path.as_str(), "none"),
            AttachmentSource::Stored { key } => ("stored", key.as_str(), "none"),
            AttachmentSource::Url { url, auth } => ("url", url.as_str(), auth.as_str()),
        };
        sqlx::query(
            "INSERT INTO attachments (run_id, name, source, location, auth) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&id)
        .bind(&a.name)
        .bind(source)
        .bind(location)
        .bind(auth)
        .execute(&mut **tx)
        .await?;
    }
    let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"))
        .bind(&id)
        .fetch_one(&mut **tx)
        .await?;
    Ok(Inserted {
        run: run_from_row(&row)?,
        created: true,
    })
}

async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    run_id: &str,
    state: RunState,
    at: Millis,
    detail: &str,
) -> Result<()> {
    sqlx::query("INSERT INTO run_events (run_id, state, at, detail) VALUES ($1, $2, $3, $4)")
        .bind(run_id)
        .bind(state.as_str())
        .bind(at)
        .bind(detail)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn parse_state(s: &str) -> Result<RunState> {
    s.parse().map_err(|_| StoreError::Corrupt {
        column: "state",
        value: s.to_owned(),
    })
}

fn pipeline_from_row(r: &AnyRow) -> Result<Pipeline> {
    Ok(Pipeline {
        id: r.try_get("id")?,
        repo: r.try_get("repo")?,
        remote_url: r.try_get("remote_url")?,
        local_only: r.try_get::<i64, _>("local_only")? != 0,
        base_branch: r.try_get("base_branch")?,
        branch: r.try_get("branch")?,
        agent: r.try_get("agent")?,
        title: r.try_get("title")?,
        origin: Origin {
            surface: r.try_get("origin_surface")?,
            thread: r.try_get("origin_thread")?,
            url: r.try_get("origin_url")?,
        },
        created_at: r.try_get("created_at")?,
    })
}

fn run_from_row(r: &AnyRow) -> Result<Run> {
    let end_reason: Option<String> = r.try_get("end_reason")?;
    let files_changed: Option<i64> = r.try_get("files_changed")?;
    Ok(Run {
        id: r.try_get("id")?,
        pipeline_id: r.try_get("pipeline_id")?,
        seq: r.try_get("seq")?,
        prompt: r.try_get("prompt")?,
        agent: r.try_get("agent")?,
        requested_by: r.try_get("requested_by")?,
        state: parse_state(&r.try_get::<String, _>("state")?)?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        exit_code: r.try_get("exit_code")?,
        end_reason: end_reason
            .map(|s| {
                EndReason::parse(&s).ok_or(StoreError::Corrupt {
                    column: "end_reason",
                    value: s,
                })
            })
            .transpose()?,
        error: r.try_get("error")?,
        start_commit: r.try_get("start_commit")?,
        head_commit: r.try_get("head_commit")?,
        changed: r.try_get::<i64, _>("changed")? != 0,
        diffstat: match files_changed {
            Some(files_changed) => Some(Diffstat {
                files_changed,
                insertions: r.try_get::<Option<i64>, _>("insertions")?.unwrap_or(0),
                deletions: r.try_get::<Option<i64>, _>("deletions")?.unwrap_or(0),
            }),
            None => None,
        },
        pushed: r.try_get::<i64, _>("pushed")? != 0,
        push_error: r.try_get("push_error")?,
        container_id: r.try_get("container_id")?,
        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        summary: r.try_get("summary")?,
        log_tail: r.try_get("log_tail")?,
        mode: {
            let mode: String = r.try_get("mode")?;
            RunMode::parse(&mode).ok_or(StoreError::Corrupt {
                column: "mode",
                value: mode,
            })?
        },
        usage: Usage {
            tokens_in: r.try_get("tokens_in")?,
            tokens_out: r.try_get("tokens_out")?,
            cost_usd: r.try_get::<Option<i64>, _>("cost_micro_usd")?.map(|m| m as f64 / 1e6),
        },
        // Written by this process only; an unreadable one is just not shown.
        progress: r
            .try_get::<Option<String>, _>("progress")?
            .and_then(|p| serde_json::from_str(&p).ok()),
        resumed: r.try_get::<i64, _>("resumed")? != 0,
        session_cost_usd: r
            .try_get::<Option<i64>, _>("session_cost_micro_usd")?
            .map(|m| m as f64 / 1e6),
    })
}

fn pull_request_from_row(r: &AnyRow) -> Result<PullRequestRecord> {
    Ok(PullRequestRecord {
        pipeline_id: r.try_get("pipeline_id")?,
        forge: r.try_get("forge")?,
        number: r.try_get("number")?,
        url: r.try_get("url")?,
        found: r.try_get::<i64, _>("found")? != 0,
        opened_by: r.try_get("opened_by")?,
        created_at: r.try_get("created_at")?,
        state: r.try_get("state")?,
        state_at: r.try_get("state_at")?,
        state_by: r.try_get("state_by")?,
    })
}

/// `s` for a LIKE pattern with a backslash as its ESCAPE character: its wildcards and
/// backslashes match themselves.
fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Holds an exclusive `flock` on `path` (released when the file is dropped or the
/// process dies).
async fn migration_lock(path: &str) -> Result<std::fs::File> {
    let path = path.to_owned();
    let held = path.clone();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&held)?;
        file.lock()?;
        Ok(file)
    })
    .await
    .expect("locking does not panic")
    .map_err(|source| StoreError::Lock {
        path: path.clone(),
        source,
    })
}

fn sqlite_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| path.to_owned())
}
