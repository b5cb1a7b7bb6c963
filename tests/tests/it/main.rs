//! The integration suite: one binary, one module per area. Every test starts its own
//! nats-server (nextest runs each test in its own process).

mod queue;
mod smoke;
