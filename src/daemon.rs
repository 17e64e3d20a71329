//! The daemon as a library function: what `threadline serve` runs (the web chat,
//! dashboard and API, the Slack and Discord bots, and the orchestrator's scheduler and
//! executors) on listeners bound beforehand, until a shutdown future resolves or a chat
//! adapter stops. The binary parses arguments, binds, and calls [`serve`]; tests can
//! start the same daemon on port 0.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SlackMode};
use crate::orchestrator::{Orchestrator, Role, Scope, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Web(#[from] crate::bots::web::WebError),
    #[error("cannot listen on slack.events_listen {addr}: {source}")]
    SlackEvents { addr: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A chat adapter stopped (a bad token, a lost connection): its reason.
    #[error("{0}")]
    Adapter(String),
}

/// The sockets the daemon serves, bound before anything starts (so a bad address fails
/// at once, and tests can bind port 0).
pub struct Listeners {
    /// The web chat, dashboard and API, when `web.enabled`.
    pub web: Option<TcpListener>,
    /// Slack's Events API, in `events` mode.
    pub slack_events: Option<TcpListener>,
}

impl Listeners {
    /// Binds what the configuration asks for. A non-loopback web address without a
    /// token is refused here, before anything starts.
    pub async fn bind(config: &Config) -> Result<Listeners, DaemonError> {
        let web = if config.web.enabled {
            Some(crate::bots::web::bind(config).await?)
        } else {
            None
        };
        let slack_events = if config.slack.enabled && config.slack.mode == SlackMode::Events {
            let addr = &config.slack.events_listen;
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::SlackEvents {
                        addr: addr.clone(),
                        source,
                    })?,
            )
        } else {
            None
        };
        Ok(Listeners { web, slack_events })
    }

    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn slack_events_addr(&self) -> Option<SocketAddr> {
        self.slack_events.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Starts the orchestrator on every pipeline and serves the front ends until `shutdown`
/// resolves (Ok) or a chat adapter stops (its reason). Either way it stops taking work,
/// answers what is in flight, leaves agent containers running for the next start and
/// releases its lease.
pub async fn serve(
    orch: Orchestrator,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    serve_as(orch, listeners, Role::Both, shutdown).await
}

/// [`serve`] in a role: with a worker of its own (`Both`) or front ends alone.
pub async fn serve_as(
    orch: Orchestrator,
    listeners: Listeners,
    role: Role,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    orch.start_as(Scope::All, role).await?;
    let stop = CancellationToken::new();
    let server = listeners.web.map(|listener| {
        let addr = listener.local_addr().expect("a bound listener has an address");
        let state = crate::bots::web::WebState::new(orch.clone(), addr);
        let stopped = stop.clone();
        tokio::spawn(crate::bots::web::serve(listener, state, async move {
            stopped.cancelled().await
        }))
    });
    // Any chat adapter that stops (bad token, lost connection) stops the daemon with its reason.
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::channel::<String>(2);
    if orch.config().slack.enabled {
        let (orch, stop, tx) = (orch.clone(), stop.clone(), failed_tx.clone());
        let config = orch.config().slack.clone();
        let events = listeners.slack_events;
        tokio::spawn(async move {
            let result = crate::bots::slack::start(orch, &config, events, stop.clone()).await;
            if !stop.is_cancelled() {
                let reason = match result {
                    Err(e) => format!("slack: {e}"),
                    Ok(()) => "slack: the connection ended".to_owned(),
                };
                let _ = tx.send(reason).await;
            }
        });
    }
    if orch.config().discord.enabled {
        let (orch, stop, tx) = (orch.clone(), stop.clone(), failed_tx.clone());
        let config = orch.config().discord.clone();
        tokio::spawn(async move {
            let result = crate::bots::discord::start(orch, &config, stop.clone()).await;
            if !stop.is_cancelled() {
                let reason = match result {
                    Err(e) => format!("discord: {e}"),
                    Ok(()) => "discord: the gateway connection ended".to_owned(),
                };
                let _ = tx.send(reason).await;
            }
        });
    }
    drop(failed_tx);
    let failed = tokio::select! {
        () = shutdown => None,
        Some(reason) = failed_rx.recv() => Some(reason),
    };
    stop.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    orch.shutdown().await;
    match failed {
        Some(reason) => Err(DaemonError::Adapter(reason)),
        None => Ok(()),
    }
}
