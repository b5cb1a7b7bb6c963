//! The integration suite: one binary, one module per area. Every test starts its own
//! nats-server (nextest runs each test in its own process).

mod cli;
mod ingress;
mod profiles;
mod queue;
mod queue_concurrency;
mod smoke;
mod tidy;
