//! Threadline: prompt AI coding agents from a chat thread. Each thread is a pipeline (a
//! git branch and its runs); each prompt is a run of an agent in a hardened local
//! container whose work is committed to the pipeline's branch and pushed.
//!
//! `ARCHITECTURE.md` has the map. In short: front ends (`cli`, `bots`) call the
//! [`orchestrator`], which keeps its state in the [`store`].

#![forbid(unsafe_code)]

pub mod bots;
pub mod cli;
pub mod config;
pub mod crash;
pub mod daemon;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod orchestrator;
pub mod redact;
pub mod store;
pub mod untrusted;
