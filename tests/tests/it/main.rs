//! The integration suite: one binary, one module per area. Every test starts its own
//! nats-server (nextest runs each test in its own process).

mod audit;
mod bindings;
mod cli;
mod compose;
mod console;
mod contracts;
mod fly_provider;
mod hostile_input;
mod hostile_suite;
mod hydration;
mod ingress;
mod launcher;
mod local_pool;
mod nats_access;
pub(crate) mod observability;
mod openclaw;
mod original_shapes;
mod profiles;
mod push;
mod queue;
mod queue_concurrency;
mod rate_limits;
pub(crate) mod reference_worker;
mod rotation;
mod scheduler;
mod skills;
mod smoke;
pub(crate) mod snapshots;
mod store;
pub(crate) mod telegram;
mod telegram_replies;
mod telegram_webhook;
mod tidy;
mod user_agents;
mod worker_isolation;
mod worker_kit;
