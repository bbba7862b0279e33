//! tally-server: a replica of a tally operator. The only crate that knows tokio, rustls,
//! sockets, signals and (soon) prometheus.
//!
//! - [`bootstrap`]: the development operator's generated keys, certificate, config and profile.
//! - [`tls`]: rustls configuration from PEM files.
//! - [`net`]: the TLS client listener and per-connection tasks.
//! - [`pipeline`]: validation pools, the master thread, the storage thread, the confirmer.
//! - [`node`]: wiring it together from a validated config.
//!
//! Caveats: a single node commits a batch by applying it (no replication yet); `/metrics` is not
//! served yet.

pub mod bootstrap;
pub mod net;
pub mod node;
pub mod pipeline;
pub mod tls;
