//! The worker-side library: what a worker does around its jobs, apart from the jobs themselves.
//!
//! - [`archive`]: pack a workspace into a gzip tar (format 1 of spec §1.7) and unpack one safely;
//! - [`skills`]: materialise a global skills manifest into a skills directory atomically;
//! - [`attachments`]: download a job's attachments into the workspace;
//! - [`client`]: the operations a worker calls (claim, hydrate, snapshot upload and restore),
//!   over NATS or over ingress HTTP.
//!
//! The reference worker (`services/worker`) is built on it; a team writing its own worker in
//! Rust can use it as is.

pub mod archive;
pub mod attachments;
pub mod client;
pub mod skills;
