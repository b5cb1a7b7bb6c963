//! Shared foundation of agent-factory: configuration, the injected clock, authentication,
//! encryption of secrets, the JetStream topology and typed KV access, the readers of the stored
//! runtime configuration and secrets, the operation catalogue with its NATS server and client,
//! leader leases, telemetry, and the embedded nats-server.
//!
//! This crate holds no service's business logic: a type lives here only when two or more
//! crates need it.

pub mod api;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod console_events;
pub mod crypto;
pub mod error;
pub mod extras;
pub mod ids;
pub mod leader;
pub mod model;
pub mod nats_access;
pub mod nats_server;
pub mod ops;
pub mod process;
pub mod runtime_config;
pub mod secrets;
pub mod service;
pub mod skills;
pub mod store;
pub mod system;
pub mod telemetry;
pub mod token;
pub mod topology;

pub use error::{ErrorCode, OpError};
