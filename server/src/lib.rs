//! tally-server: a replica of a tally operator. The only crate that knows tokio, rustls,
//! sockets, signals and prometheus.
//!
//! - [`bootstrap`]: the development operator's generated keys, certificate, config and profile.
//! - [`certs`]: the operator CA and node certificates (`init-cluster`, renewal).
//! - [`tls`]: rustls configuration from PEM files.
//! - [`net`]: the TLS client listener and per-connection tasks.
//! - [`limits`]: what a remote party may hold: descriptors, connections per address, reply bytes.
//! - [`ratelog`]: rate-limited log lines for everything a remote party can trigger.
//! - [`pipeline`]: validation pools, the master thread, the storage thread, the confirmer.
//! - [`node`]: wiring it together from a validated config.
//! - [`archive`]: the archive writer's batch source, start and metrics; the read-only rule.
//! - [`restore`]: `tally-server restore`, a data directory rebuilt from the archive alone.
//! - [`metrics`]: the Prometheus registry and every metric handle.
//! - [`http`]: `/metrics`, `/health` and `/ready` on `listen.metrics`.
//!
//! Caveats: a replica restored below the archive's tip serves reads only, for good.

pub mod archive;
pub mod bootstrap;
pub mod certs;
pub mod channels;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod node;
pub mod peer;
pub mod pipeline;
pub mod ratelog;
pub mod replication;
pub mod restore;
pub mod snapshot;
pub mod tls;
