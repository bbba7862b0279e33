//! Builds a running node from a validated [`Config`] and runs it until a signal.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tally_config::Config;
use tally_core::crypto::OperatorKey;
use tally_core::ports::LedgerStore;
use tally_core::sequencer::{Sequencer, SequencerConfig};
use tally_core::validate::StatelessRules;
use tally_storage::{LedgerDb, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bootstrap::read_signing_key;
use crate::metrics::{role, Metrics};
use crate::net::{serve, NetLimits};
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::tls::server_config;

/// How many applied batches' request keys the sequencer keeps in memory.
const RECENT_HEIGHTS_KEPT: u64 = 64;

pub fn ledger_dir(config: &Config) -> PathBuf {
    config.node.data_dir.join("ledger")
}

/// Runs the node until SIGTERM or ctrl-c, then shuts down gracefully: stop accepting, finish and
/// persist the batch in progress, send its confirmations, exit.
pub fn run(config: Config, profile: Option<&Path>) -> Result<()> {
    let tls_cfg = config.tls.as_ref().context("[tls] is required")?;
    let op_cfg = config.operator.as_ref().context("[operator] is required")?;
    let operator = OperatorKey::new(read_signing_key(&op_cfg.signing_key)?);
    let tls = server_config(&tls_cfg.cert, &tls_cfg.key)?;
    std::fs::create_dir_all(&config.node.data_dir)
        .with_context(|| format!("creating {}", config.node.data_dir.display()))?;
    let mut store = LedgerDb::open(&ledger_dir(&config), StoreOptions::default())
        .with_context(|| format!("opening the ledger in {}", ledger_dir(&config).display()))?;
    let meta = store.meta()?;
    let chain_id = config.chain_id_bytes();
    let metrics = Arc::new(Metrics::new());
    metrics.applied_height.set(meta.height as i64);
    // A single node is its own leader and commits by applying.
    metrics.raft.role.set(role::SINGLE);
    metrics.raft.leader_id.set(config.node.id as i64);
    metrics.raft.commit_index.set(meta.height as i64);
    metrics.raft.applied_index.set(meta.height as i64);
    let sequencer = Sequencer::new(
        SequencerConfig {
            chain_id,
            operator_key_id: operator.key_id(),
            batch_requests_max: config.batch.batch_requests_max,
            accounts_cached_max: config.cache.accounts_max,
            recent_heights_kept: RECENT_HEIGHTS_KEPT,
        },
        meta.clone(),
    );
    let pipeline = Pipeline::start(
        PipelineConfig {
            node_id: config.node.id,
            rules: StatelessRules {
                chain_id,
                deposit_keys: config
                    .deposit_keys_bytes()
                    .into_iter()
                    .collect::<HashSet<_>>(),
            },
            stateless_workers: config.workers.stateless,
            snapshot_workers: config.workers.snapshot,
            queue_depth_max: config.limits.queue_depth_max as usize,
            batch_window: config.batch.batch_window(),
            batch_in_flight_max: config.batch.batch_in_flight_max as u64,
            metrics: metrics.clone(),
        },
        store,
        sequencer,
        operator,
    );
    let limits = NetLimits {
        connections_max: config.limits.connections_max as usize,
        in_flight_max: config.limits.requests_in_flight_per_connection_max as usize,
        frame_bytes_max: config.limits.frame_bytes_max,
        handshake_timeout: config.limits.handshake_timeout(),
        frame_timeout: config.limits.frame_timeout(),
        idle_timeout: config.limits.idle_timeout(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tally-net")
        .build()?;
    // The HTTP endpoint outlives the client listener: /health answers while the last batch
    // drains, and /ready says 503.
    let (http_stop, http_stop_rx) = watch::channel(false);
    runtime.block_on(async {
        let listener = TcpListener::bind(config.listen.client)
            .await
            .with_context(|| format!("binding the client listener on {}", config.listen.client))?;
        let addr = listener.local_addr()?;
        let metrics_listener = TcpListener::bind(config.listen.metrics)
            .await
            .with_context(|| {
                format!("binding the metrics listener on {}", config.listen.metrics)
            })?;
        let metrics_addr = metrics_listener.local_addr()?;
        // Single node: the pipeline runs and the listeners are bound (connections queue in the
        // backlog until the accept loop below starts), so it can serve.
        metrics.set_ready(true);
        // Scripts and tests read this line to find the port (the config may say port 0).
        println!(
            "tally-server: node {} listening for clients on {addr} (TLS)",
            config.node.id
        );
        println!(
            "tally-server: ledger at height {} in {}",
            meta.height,
            ledger_dir(&config).display()
        );
        println!("tally-server: metrics on http://{metrics_addr}/metrics");
        if let Some(p) = profile {
            println!("tally-server: client profile at {}", p.display());
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            tokio_rustls::TlsAcceptor::from(tls),
            pipeline.handle.clone(),
            limits,
            stop_rx,
        ));
        tokio::spawn(crate::http::serve(
            metrics_listener,
            metrics.clone(),
            http_stop_rx,
        ));
        wait_for_signal().await;
        metrics.set_ready(false);
        println!("tally-server: shutting down: finishing the batch in progress");
        let _ = stop_tx.send(true);
        let _ = server.await;
        anyhow::Ok(())
    })?;
    // Blocking joins happen off the runtime's workers.
    pipeline.shutdown();
    let _ = http_stop.send(true);
    // Give connection writers a moment to flush the last confirmations.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    println!("tally-server: stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
