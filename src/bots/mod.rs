//! Chat front ends (the built-in web chat; Slack and Discord next) and the
//! platform-neutral model of what they show. **Adapters only translate**: they call the
//! orchestrator and render [`render::StatusCard`]s; none holds orchestration logic.

pub mod chat;
pub mod discord;
pub mod render;
pub mod slack;
pub mod web;

/// The HTTP(S) connector chat clients use: system roots for TLS, and plain HTTP for a
/// local proxy or a test's fake.
pub(crate) fn https_connector()
-> std::io::Result<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>> {
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .build())
}
