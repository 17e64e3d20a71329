//! A chat surface that records what it is asked to show, for the tests of the status
//! engine (unit tests here, integration tests with the `testing` feature).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use super::{ChatError, ChatSurface, StatusCard, ThreadRef};

/// What the surface was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallKind {
    Post,
    /// An edit of this message id.
    Update(String),
    /// An edit answered with a rate limit.
    RateLimited,
}

#[derive(Debug, Clone)]
pub struct SurfaceCall {
    /// When (in tokio's clock, so paused tests see their own time).
    pub at: tokio::time::Instant,
    pub kind: CallKind,
    pub card: StatusCard,
}

/// Posts get the id `msg-<run id>`; the edits after [`RecordingSurface::rate_limit_next_update`]
/// are answered with a rate limit first.
pub struct RecordingSurface {
    name: &'static str,
    calls: Mutex<Vec<SurfaceCall>>,
    limits: Mutex<VecDeque<Duration>>,
}

impl RecordingSurface {
    pub fn new(name: &'static str) -> Self {
        RecordingSurface {
            name,
            calls: Mutex::new(Vec::new()),
            limits: Mutex::new(VecDeque::new()),
        }
    }

    /// The next edit is refused with "retry after `retry_after`".
    pub fn rate_limit_next_update(&self, retry_after: Duration) {
        self.limits.lock().unwrap().push_back(retry_after);
    }

    pub fn calls(&self) -> Vec<SurfaceCall> {
        self.calls.lock().unwrap().clone()
    }

    /// The last card shown (posted or edited in).
    pub fn last_shown(&self) -> Option<StatusCard> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|c| c.kind != CallKind::RateLimited)
            .map(|c| c.card.clone())
    }

    fn record(&self, kind: CallKind, card: &StatusCard) {
        self.calls.lock().unwrap().push(SurfaceCall {
            at: tokio::time::Instant::now(),
            kind,
            card: card.clone(),
        });
    }
}

impl ChatSurface for RecordingSurface {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn post_status(&self, _thread: &ThreadRef, card: &StatusCard) -> Result<String, ChatError> {
        self.record(CallKind::Post, card);
        Ok(format!("msg-{}", card.run_id))
    }

    async fn update_status(&self, _thread: &ThreadRef, message_id: &str, card: &StatusCard) -> Result<(), ChatError> {
        if let Some(retry_after) = self.limits.lock().unwrap().pop_front() {
            self.record(CallKind::RateLimited, card);
            return Err(ChatError::RateLimited { retry_after });
        }
        self.record(CallKind::Update(message_id.to_owned()), card);
        Ok(())
    }
}
