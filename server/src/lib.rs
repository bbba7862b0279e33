//! tally-server: one replica of a tally operator, and the only crate that knows tokio, rustls,
//! sockets, signals and prometheus. A replica serves clients over TLS, runs the request pipeline
//! (validation pools, master, storage thread, confirmer) under raft-rs with its peers over mutual
//! TLS (a single node is a raft group of one), archives committed batches to object storage
//! (`[archive]`) and exports Prometheus metrics. `ARCHITECTURE.md` at the repository root has the
//! threads, the codemap (which module does what) and the invariants; `docs/OPERATING.md` the
//! metrics and the runbooks.
//!
//! Caveats: membership is static (from the config); a replica restored below the archive's tip
//! serves reads only, for good; any panic or fatal storage error stops the process (exit 70).

pub mod admin;
pub mod archive;
pub mod bootstrap;
pub mod certs;
pub mod channels;
pub mod dirs;
pub mod explorer;
pub mod fail;
pub mod groups;
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
pub mod view;
pub mod witnesses;
