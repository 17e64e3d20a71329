//! One status message per run, kept up to date: the latest card wins, one edit a second
//! at most, rate limits waited out, the final state always delivered, and message ids
//! kept across restarts.

use super::*;

// ---- the status message ------------------------------------------------------------

/// Why a chat API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("rate limited; retry after {retry_after:?}")]
    RateLimited { retry_after: Duration },
    #[error("{0}")]
    Failed(String),
}

/// What a platform adapter provides to show status messages.
pub trait ChatSurface: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Posts the status message in the thread; returns its id.
    fn post_status(
        &self,
        thread: &ThreadRef,
        card: &StatusCard,
    ) -> impl Future<Output = Result<String, ChatError>> + Send;
    fn update_status(
        &self,
        thread: &ThreadRef,
        message_id: &str,
        card: &StatusCard,
    ) -> impl Future<Output = Result<(), ChatError>> + Send;
}

/// At most one edit of a status message per this interval.
pub const EDIT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the elapsed time of a running run is refreshed.
pub const REFRESH_EVERY: Duration = Duration::from_secs(20);
const MAX_FAILURES: u32 = 8;

/// Keeps one status message per run of `surface` up to date: the latest card wins, edits
/// are throttled, rate limits are waited out, and the final state is always delivered.
pub struct StatusUpdater<S: ChatSurface> {
    core: ChatCore,
    surface: Arc<S>,
    /// Runs whose status message another live front end keeps, and when that was last
    /// asked (it is asked again now and then: that front end may die).
    elsewhere: std::sync::Mutex<BTreeMap<String, tokio::time::Instant>>,
}

/// How often a front end asks again whether the one keeping a run's status message is
/// still alive, and whether it still keeps the ones it delivers.
const POSTER_RECHECK: Duration = Duration::from_secs(3);

/// A run's status message this process delivers: the latest card, and when it last made
/// sure the message is still its own.
struct Delivery {
    tx: watch::Sender<StatusCard>,
    checked: tokio::time::Instant,
}

impl<S: ChatSurface> StatusUpdater<S> {
    /// From now on, runs this process submits from `surface`'s threads are its own to
    /// post (see [`crate::orchestrator::Orchestrator::posts_status_on`]).
    pub fn new(core: ChatCore, surface: Arc<S>) -> Self {
        core.orch.posts_status_on(surface.name());
        StatusUpdater {
            core,
            surface,
            elsewhere: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether this process keeps the run's status message: with several front ends on
    /// one database, exactly one does (the store decides, and a dead one's runs pass on).
    /// An end is always asked about: the front end that kept the message may have died
    /// just before it, and the end must be shown. None: the store cannot tell now.
    async fn mine(&self, run_id: &str, terminal: bool) -> Option<bool> {
        if !terminal
            && let Some(at) = self.elsewhere.lock().unwrap().get(run_id)
            && at.elapsed() < POSTER_RECHECK
        {
            return Some(false);
        }
        match self.core.orch.claim_status_message(run_id).await {
            Ok(true) => {
                self.elsewhere.lock().unwrap().remove(run_id);
                Some(true)
            }
            Ok(false) => {
                let mut elsewhere = self.elsewhere.lock().unwrap();
                if elsewhere.len() >= 4096 {
                    elsewhere.retain(|_, at| at.elapsed() < POSTER_RECHECK);
                }
                elsewhere.insert(run_id.to_owned(), tokio::time::Instant::now());
                Some(false)
            }
            Err(e) => {
                tracing::warn!(run_id, error = %e, "cannot tell which front end keeps the status message");
                None
            }
        }
    }

    /// Runs until `shutdown`: follows the orchestrator's updates, one worker per run.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut events = self.core.orch.subscribe();
        let mut workers: BTreeMap<String, Delivery> = BTreeMap::new();
        // Runs already underway (a restart) get their card again.
        if let Ok(active) = self
            .core
            .orch
            .queries()
            .runs_in_states(&crate::model::RunState::UNFINISHED)
            .await
        {
            for run in active {
                self.push(&mut workers, &run).await;
            }
        }
        loop {
            let update = tokio::select! {
                _ = shutdown.cancelled() => return,
                u = events.recv() => u,
            };
            match update {
                Ok(RunUpdate::State(run)) => self.push(&mut workers, &run).await,
                Ok(RunUpdate::Log { .. }) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let ids: Vec<String> = workers.keys().cloned().collect();
                    for id in ids {
                        if let Ok(Some(run)) = self.core.orch.queries().run(&id).await {
                            self.push(&mut workers, &run).await;
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
            workers.retain(|_, d| !d.tx.is_closed());
        }
    }

    async fn push(&self, workers: &mut BTreeMap<String, Delivery>, run: &Run) {
        let Some((thread, card)) = self.core.card(run).await else {
            return;
        };
        let terminal = run.state.is_terminal();
        if let Some(d) = workers.get_mut(&run.id) {
            // Still this process's message? Asked again now and then, and at the end:
            // cut off from the database a while, it may have passed to another. When
            // the store cannot tell, it stays this process's.
            if d.checked.elapsed() >= POSTER_RECHECK || terminal {
                match self.mine(&run.id, terminal).await {
                    Some(false) => {
                        workers.remove(&run.id);
                        return;
                    }
                    Some(true) => d.checked = tokio::time::Instant::now(),
                    None => {}
                }
            }
            if d.tx.send(card.clone()).is_ok() {
                return;
            }
        } else if self.mine(&run.id, terminal).await != Some(true) {
            return;
        }
        if terminal {
            self.elsewhere.lock().unwrap().remove(&run.id);
        }
        let (tx, rx) = watch::channel(card);
        workers.insert(
            run.id.clone(),
            Delivery {
                tx,
                checked: tokio::time::Instant::now(),
            },
        );
        let known = self
            .core
            .orch
            .queries()
            .chat_message(&run.id)
            .await
            .ok()
            .flatten()
            .map(|(_, id)| id);
        let surface = self.surface.clone();
        let core = self.core.clone();
        let run_id = run.id.clone();
        tokio::spawn(async move {
            let store = core.orch.queries().clone();
            let counters_orch = core.orch.clone();
            let refresh_core = core.clone();
            let refresh_id = run_id.clone();
            deliver(
                surface.as_ref(),
                &thread,
                known,
                rx,
                |message_id| {
                    let store = store.clone();
                    let (run_id, thread) = (run_id.clone(), thread.clone());
                    let name = surface.name();
                    async move {
                        if let Err(e) = store
                            .set_chat_message(&run_id, name, &thread.channel, &message_id)
                            .await
                        {
                            tracing::warn!(run_id, error = %e, "cannot record the status message");
                        }
                    }
                },
                || counters_orch.metrics().chat_api_error(surface.name()),
                || {
                    let core = refresh_core.clone();
                    let id = refresh_id.clone();
                    async move {
                        let run = core.orch.queries().run(&id).await.ok()??;
                        // Not refreshed once the message is another front end's.
                        if !matches!(core.orch.claim_status_message(&id).await, Ok(true)) {
                            return None;
                        }
                        core.card(&run).await.map(|(_, c)| c)
                    }
                },
            )
            .await;
        });
    }
}

/// Delivers the latest card of `rx` to one status message until a terminal card is shown.
/// Generic over the surface and the callbacks so it can be tested with paused time.
pub async fn deliver<S, Posted, PostedFut, Refresh, RefreshFut>(
    surface: &S,
    thread: &ThreadRef,
    mut message_id: Option<String>,
    mut rx: watch::Receiver<StatusCard>,
    on_posted: Posted,
    on_error: impl Fn(),
    refresh: Refresh,
) where
    S: ChatSurface,
    Posted: Fn(String) -> PostedFut,
    PostedFut: Future<Output = ()>,
    Refresh: Fn() -> RefreshFut,
    RefreshFut: Future<Output = Option<StatusCard>>,
{
    let mut last_edit: Option<tokio::time::Instant> = None;
    let mut failures = 0;
    let mut card = rx.borrow_and_update().clone();
    loop {
        if let Some(at) = last_edit {
            tokio::time::sleep_until(at + EDIT_INTERVAL).await;
        }
        // The newest card by the time we may edit.
        if rx.has_changed().unwrap_or(false) {
            card = rx.borrow_and_update().clone();
        }
        let result = match &message_id {
            None => surface.post_status(thread, &card).await.map(Some),
            Some(id) => surface.update_status(thread, id, &card).await.map(|()| None),
        };
        last_edit = Some(tokio::time::Instant::now());
        match result {
            Ok(posted) => {
                failures = 0;
                if let Some(id) = posted {
                    on_posted(id.clone()).await;
                    message_id = Some(id);
                }
                if card.terminal && !rx.has_changed().unwrap_or(false) {
                    return;
                }
            }
            Err(ChatError::RateLimited { retry_after }) => {
                tokio::time::sleep(retry_after).await;
                continue;
            }
            Err(ChatError::Failed(e)) => {
                on_error();
                failures += 1;
                tracing::warn!(error = %e, failures, "updating a status message failed");
                if failures >= MAX_FAILURES {
                    return;
                }
                tokio::time::sleep(EDIT_INTERVAL * 2u32.pow(failures.min(5))).await;
                continue;
            }
        }
        // Wait for a change, refreshing the elapsed time of an unfinished run meanwhile.
        // No fresh card (the store cannot be read, or another front end keeps the
        // message now): nothing is edited, least of all with the card shown already,
        // which may be older than what another front end showed since.
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The updater went away (shutdown, or the message is another
                        // front end's now): the next start picks the run up.
                        return;
                    }
                    card = rx.borrow_and_update().clone();
                    break;
                }
                _ = tokio::time::sleep(REFRESH_EVERY), if !card.terminal => {
                    if let Some(fresh) = refresh().await {
                        card = fresh;
                        break;
                    }
                }
            }
        }
    }
}
