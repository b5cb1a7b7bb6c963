//! The reference worker (`af-worker`): one process serves one conversation over the operation
//! catalogue (spec §4), through worker-kit's [`worker_kit::client::WorkerClient`] over NATS or
//! ingress HTTP.
//!
//! - [`config`]: the environment contract ([`config::WorkerConfig::from_env`]);
//! - [`engine`]: the pluggable reply engines (echo, command, OpenAI-compatible, OpenClaw);
//! - [`openclaw`]: the `openclaw` engine, which supervises an OpenClaw gateway;
//! - [`telegram`]: replies in the chat through the `telegram-bot` library (split messages,
//!   formatting fallback, files);
//! - [`workspace`]: memory files, the restore rule and the per-job journal;
//! - [`runtime`]: boot, the claim loop, job processing, drain and snapshot.
//!
//! The binary is a thin `main.rs` over [`runtime::run`], so tests run the same loop in-process.

pub mod config;
pub mod engine;
pub mod openclaw;
pub mod runtime;
pub mod telegram;
pub mod workspace;

pub use config::WorkerConfig;
pub use engine::Engine;
pub use runtime::{RunOutcome, StopReason, Worker, WorkerError, run};
