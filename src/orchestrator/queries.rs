//! What the front ends may read, and the one thing they keep: pipelines, runs and their
//! history, pull requests and approvals, and which chat message shows which run. A
//! narrow view of the store, so no front end names it (the CLI's read-only commands
//! open one without starting an orchestrator).

use crate::model::{Approval, Millis, Origin, Pipeline, PullRequestRecord, Run, RunEvent, RunState};
use crate::store::{PipelineSummary, Store, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone)]
pub struct Queries {
    store: Store,
}

impl Queries {
    pub(super) fn new(store: Store) -> Queries {
        Queries { store }
    }

    /// Opens the store at `database_url` for reading (migrating it if it is new).
    pub async fn open(database_url: &str) -> Result<Queries> {
        Ok(Queries {
            store: Store::open(database_url).await?,
        })
    }

    /// Pipelines, newest first, with their latest state and number of runs.
    pub async fn pipelines(&self, limit: i64) -> Result<Vec<PipelineSummary>> {
        self.store.pipelines(limit).await
    }

    pub async fn pipeline(&self, id: &str) -> Result<Option<Pipeline>> {
        self.store.pipeline(id).await
    }

    /// A pipeline by its id or a unique prefix of it.
    pub async fn find_pipeline(&self, prefix: &str) -> Result<Option<Pipeline>> {
        self.store.find_pipeline(prefix).await
    }

    /// The latest pipeline started from a chat thread.
    pub async fn pipeline_by_origin(&self, origin: &Origin) -> Result<Option<Pipeline>> {
        self.store.pipeline_by_origin(origin).await
    }

    /// A pipeline's runs, first to last.
    pub async fn runs(&self, pipeline_id: &str) -> Result<Vec<Run>> {
        self.store.runs(pipeline_id).await
    }

    pub async fn run(&self, id: &str) -> Result<Option<Run>> {
        self.store.run(id).await
    }

    /// A run by its id; a pipeline id means its latest run.
    pub async fn find_run(&self, id: &str) -> Result<Option<Run>> {
        self.store.find_run(id).await
    }

    /// Runs in any of `states`, oldest first.
    pub async fn runs_in_states(&self, states: &[RunState]) -> Result<Vec<Run>> {
        self.store.runs_in_states(states).await
    }

    /// A run's state changes, in order.
    pub async fn events(&self, run_id: &str) -> Result<Vec<RunEvent>> {
        self.store.events(run_id).await
    }

    pub async fn pull_request(&self, pipeline_id: &str) -> Result<Option<PullRequestRecord>> {
        self.store.pull_request(pipeline_id).await
    }

    /// Every Open PR decision on a pipeline.
    pub async fn approvals(&self, pipeline_id: &str) -> Result<Vec<Approval>> {
        self.store.approvals(pipeline_id).await
    }

    /// Runs that ended at or after `since` (ms): final state, end, cost.
    pub async fn ended_since(&self, since: Millis) -> Result<Vec<(RunState, Millis, Option<f64>)>> {
        self.store.ended_since(since).await
    }

    /// How many runs are in each state.
    /// The worker that executes (or last executed) a run: (name, host).
    pub async fn worker_of_run(&self, run_id: &str) -> Result<Option<(String, String)>> {
        self.store.worker_of_run(run_id).await
    }

    /// The processes sharing the database (workers and front ends).
    pub async fn instances(&self) -> Result<Vec<crate::store::InstanceInfo>> {
        self.store.instances().await
    }

    pub async fn count_by_state(&self) -> Result<Vec<(RunState, i64)>> {
        self.store.count_by_state().await
    }

    /// The chat message showing a run: (channel, message id).
    pub async fn chat_message(&self, run_id: &str) -> Result<Option<(String, String)>> {
        self.store.chat_message(run_id).await
    }

    /// Records the chat message showing a run, so a restart edits it rather than posting
    /// another.
    pub async fn set_chat_message(&self, run_id: &str, surface: &str, channel: &str, message_id: &str) -> Result<()> {
        self.store.set_chat_message(run_id, surface, channel, message_id).await
    }
}

/// Copies the store at `from` into the empty one at `to` (migrating it first), for
/// `threadline migrate-store`: each table's row count.
pub async fn copy_store(from: &str, to: &str) -> Result<Vec<(&'static str, u64)>> {
    let source = Store::open(from).await?;
    let destination = Store::open(to).await?;
    source.copy_into(&destination).await
}
