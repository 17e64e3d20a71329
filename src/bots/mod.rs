//! Chat front ends (the built-in web chat; Slack and Discord next) and the
//! platform-neutral model of what they show. **Adapters only translate**: they call the
//! orchestrator and render [`render::StatusCard`]s; none holds orchestration logic.

pub mod chat;
pub mod discord;
pub mod render;
pub mod slack;
pub mod web;
