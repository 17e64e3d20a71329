//! Integration tests: one binary (each links the whole crate; on 2 cores that matters).
//! Real Docker with an image the tests build, real git with a local bare origin, a real
//! SQLite file.

mod agents;
mod architecture;
mod browser;
mod chat;
mod conversation;
mod core;
mod crash;
mod discord;
mod environments;
mod fake_discord;
mod fake_forge;
mod fake_models;
mod fake_slack;
mod forge;
mod harness;
mod hostile;
mod pr_events;
mod slack;
mod store;
mod web;
mod workers;
