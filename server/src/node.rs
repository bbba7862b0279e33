//! Builds a running replica from a validated [`Config`] and runs it until a signal.
//!
//! Threads: the tokio runtime (client connections, peer transport, HTTP), the pipeline threads
//! (validation pools, master, storage, confirmer) and the raft thread. A single node is a raft
//! group of one voter: the same code path, committing as soon as its own log write is synced.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use tally_config::Config;
use tally_core::key_chain::SigningKeys;
use tally_core::ports::LedgerStore;
use tally_core::replica::{Replica, ReplicaConfig};
use tally_core::sequencer::SequencerConfig;
use tally_core::signing::{Group, Signing};
use tally_core::validate::StatelessRules;
use tally_storage::{FilterOrigin, LedgerDb, RaftLogDb};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::archive;
use crate::channels::Applied;
use crate::dirs::{ledger_dir, raft_dir, store_options};
use crate::metrics::Metrics;
use crate::net::{serve, NetLimits};
use crate::peer::{peer_tls, serve_inbound, start_outbound, PeerSettings};
use crate::pipeline::{Pipeline, PipelineConfig, RaftWiring};
use crate::replication::RaftThread;
use crate::snapshot::PeerSnapshotTransfer;
use crate::tls::server_config;
use crate::view::ClusterView;
use tally_core::engine::members::{AddressBook, MemberAddress};
use tally_core::engine::replication::{Replication, ReplicationConfig};

/// How many applied batches' request keys the sequencer keeps in memory.
const RECENT_HEIGHTS_KEPT: u64 = 64;
/// Bound of the raft thread's input queue; peer messages beyond it are dropped (raft resends).
const RAFT_QUEUE_MAX: usize = 65_536;

/// The client listener's limits: `[limits]` with the connection counts fitted to the
/// descriptor limit.
fn net_limits(config: &Config, sizing: &crate::limits::ConnectionSizing) -> NetLimits {
    let limits = &config.limits;
    NetLimits {
        connections_max: sizing.connections_max,
        connections_per_address_max: sizing.connections_per_address_max,
        handshakes_per_address_per_second: limits.handshakes_per_address_per_second,
        in_flight_max: limits.requests_in_flight_per_connection_max as usize,
        frame_bytes_max: limits.frame_bytes_max,
        reply_bytes_per_connection_max: semaphore_bytes(limits.reply_bytes_per_connection_max),
        reply_bytes_total_max: semaphore_bytes(limits.reply_bytes_total_max),
        handshake_timeout: limits.handshake_timeout(),
        first_request_timeout: limits.first_request_timeout(),
        frame_timeout: limits.frame_timeout(),
        idle_timeout: limits.idle_timeout(),
        write_timeout: limits.write_timeout(),
        envelopes_in_flight_max: limits.envelopes_in_flight_max as usize,
    }
}

/// A byte budget as semaphore permits: tokio's semaphores hold at most `MAX_PERMITS` (2^61 on
/// 64-bit), far above any memory; a larger configured budget is that.
fn semaphore_bytes(bytes: u64) -> usize {
    usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .min(tokio::sync::Semaphore::MAX_PERMITS)
}

/// The replicas' addresses as the config names them: this replica and its `[[peers]]`. The
/// address book in the raft log, once a membership change or a snapshot wrote one, replaces it.
fn configured_book(config: &Config) -> AddressBook {
    let mut book = AddressBook::default();
    let me = MemberAddress {
        peer: config.listen.peer.to_string(),
        client: config.listen.client.to_string(),
    };
    book.0.insert(config.node.id, me);
    for p in &config.peers {
        let address = MemberAddress {
            peer: p.address.to_string(),
            client: p.client_address.to_string(),
        };
        book.0.insert(p.id, address);
    }
    book
}

/// A raft log opened for the raft thread: the replica, the address book the log holds (if
/// any), and the snapshot the ledger must still install (index, descriptor).
struct OpenedReplica {
    replica: Replica<RaftLogDb>,
    book: Option<AddressBook>,
    install: Option<(u64, Vec<u8>)>,
}

/// Opens the raft log and starts raft on it, at `min(ledger raft index, durable commit)`.
/// Refuses a replica that was removed from the cluster (its log is in use and its
/// configuration no longer names it). A ledger behind the log's snapshot point (a crash while
/// a snapshot installed, raft having moved first; or a lost ledger directory) installs that
/// snapshot from a peer before anything else applies.
fn open_replica(
    dir: &Path,
    voters: &[u64],
    node_id: u64,
    raft_cfg: &tally_config::RaftConfig,
    ledger_raft_index: u64,
) -> Result<OpenedReplica> {
    let log = RaftLogDb::open(dir, voters)?;
    let commit = log.hard_state().commit;
    let snapshot_index = log.snapshot_index();
    let install = (ledger_raft_index < snapshot_index).then(|| {
        tracing::warn!(
            ledger_raft_index,
            snapshot_index,
            "the ledger is behind the raft log's snapshot point: fetching that snapshot from \
             a peer before applying anything"
        );
        (snapshot_index, log.snapshot_point().descriptor.clone())
    });
    let conf = log.conf_state();
    let member = conf.voters.contains(&node_id) || conf.learners.contains(&node_id);
    let in_use = raft::Storage::last_index(&log)? > 0 || snapshot_index > 0;
    if in_use && !member && log.address_book().is_some() {
        bail!(
            "this replica (node {node_id}) was removed from the cluster (voters {:?}, learners \
             {:?}); to add it again, wipe its data directory and use `tally cluster add`",
            conf.voters,
            conf.learners
        );
    }
    let book = log.address_book().map(AddressBook::decode).transpose()?;
    let cfg = ReplicaConfig {
        id: node_id,
        election_ticks: raft_cfg.election_ticks,
        heartbeat_ticks: raft_cfg.heartbeat_ticks,
        applied: ledger_raft_index.min(commit).max(snapshot_index),
        max_size_per_msg: raft_cfg.max_message_bytes / 4,
        max_inflight_msgs: 256,
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    Ok(OpenedReplica {
        replica: Replica::new(&cfg, log, &logger)?,
        book,
        install,
    })
}

/// After a crash the ledger's archive (bodies, request index; written behind the state) can lag
/// the state: the batches committed at raft indexes `from+1..=to` are read back from the raft
/// log, which is never compacted past what the archive holds, and re-archived before anything
/// else runs.
fn rearchive_from_raft_log(
    store: &mut LedgerDb,
    dir: &Path,
    voters: &[u64],
    from: u64,
    to: u64,
) -> Result<()> {
    use raft::{GetEntriesContext, Storage};
    let started = std::time::Instant::now();
    let log = RaftLogDb::open(dir, voters)
        .with_context(|| format!("opening the raft log in {}", dir.display()))?;
    let mut next = from + 1;
    let mut taken = 0u64;
    while next <= to {
        let entries = log
            .entries(
                next,
                (to + 1).min(next + 256),
                None,
                GetEntriesContext::empty(false),
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "the ledger's archive (bodies, request index) is behind the ledger and the \
                     raft log no longer holds entry {next} to rebuild it ({e}); wipe this \
                     replica's ledger and raft directories to rebuild it from the others"
                )
            })?;
        let Some(last) = entries.last() else {
            bail!("the raft log ends before entry {next}, which the ledger has applied");
        };
        next = last.index + 1;
        for e in &entries {
            if tally_core::replica::is_batch(e) && store.rearchive(&e.data, e.index)? {
                taken += 1;
            }
        }
    }
    log.close()?;
    if let Some((from, _)) = store.archive_behind() {
        bail!(
            "the raft log up to index {to} does not hold every batch the ledger's archive lacks \
             (it holds up to raft index {from})"
        );
    }
    tracing::warn!(
        batches = taken,
        ms = started.elapsed().as_millis() as u64,
        "the ledger's archive was behind (a crash); re-archived from the raft log"
    );
    Ok(())
}

/// Opens the ledger: finishes (or rolls back) a snapshot install a crash interrupted, loads or
/// rebuilds the request filter, and re-archives from the raft log what a crash left behind.
fn open_ledger(
    config: &Config,
) -> Result<(LedgerDb, tally_core::state::LedgerMeta, std::time::Duration)> {
    // Finish (or roll back) a snapshot install a crash interrupted.
    tally_storage::recover_install(&ledger_dir(config))
        .with_context(|| format!("recovering {}", ledger_dir(config).display()))?;
    let opening = std::time::Instant::now();
    let mut store = LedgerDb::open(&ledger_dir(config), store_options(config))
        .with_context(|| format!("opening the ledger in {}", ledger_dir(config).display()))?;
    let meta = store.meta()?;
    // Rebuilding the request filter from the whole request table grows with the ledger's
    // history; after a clean stop the filter saved then is loaded instead.
    let filter = match store.request_filter_origin() {
        FilterOrigin::Off => "request filter off".to_string(),
        FilterOrigin::Loaded => "request filter loaded from the last clean stop".to_string(),
        FilterOrigin::Scanned(why) => {
            format!("request filter rebuilt from the request table: {why}")
        }
    };
    let opened_in = opening.elapsed();
    tracing::info!(
        height = meta.height,
        ms = opened_in.as_millis() as u64,
        "ledger opened ({filter})"
    );
    if let Some((from, to)) = store.archive_behind() {
        rearchive_from_raft_log(
            &mut store,
            &raft_dir(config),
            &config.initial_voters(),
            from,
            to,
        )?;
    }
    Ok((store, meta, opened_in))
}

/// The pipeline's sizes and rules, from the config.
fn pipeline_config(
    config: &Config,
    keys: &SigningKeys,
    metrics: Arc<Metrics>,
    gate: Option<Arc<crate::pipeline::ArchiveGate>>,
    read_only: bool,
) -> PipelineConfig {
    let chain_id = config.chain_id_bytes();
    PipelineConfig {
        node_id: config.node.id,
        rules: StatelessRules {
            chain_id,
            deposit_keys: config
                .deposit_keys_bytes()
                .into_iter()
                .collect::<HashSet<_>>(),
        },
        sequencer: SequencerConfig {
            chain_id,
            operator_key_id: keys.genesis_key_id(),
            batch_requests_max: config.batch.batch_requests_max,
            accounts_cached_max: config.cache.accounts_max,
            recent_heights_kept: RECENT_HEIGHTS_KEPT,
        },
        stateless_workers: config.workers.stateless,
        snapshot_workers: config.workers.snapshot,
        queue_depth_max: config.limits.queue_depth_max as usize,
        batch_window: config.batch.batch_window(),
        batch_close_idle: config.batch.batch_close_idle,
        batch_in_flight_max: config.batch.batch_in_flight_max as u64,
        metrics,
        archive: gate,
        read_only,
        admin: Arc::new(
            crate::admin::AdminGate::new(chain_id, config.admin_keys_bytes())
                .holding(keys.publics()),
        ),
    }
}

/// What the peer transport starts from.
struct PeerStart<'a> {
    config: &'a Config,
    view: Arc<ClusterView>,
    storage: crossbeam_channel::Sender<crate::channels::StorageCmd>,
    connections_max: usize,
    tls: (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>),
    events: crossbeam_channel::Sender<crate::channels::RaftEvent>,
    stop: watch::Receiver<bool>,
}

/// Starts the peer transport (mutual TLS with the operator's CA): a dialing task per replica
/// in the view, and the peer listener if this replica has peers.
async fn start_peers(p: PeerStart<'_>) -> Result<crate::peer::PeerSenders> {
    let config = p.config;
    let settings = Arc::new(PeerSettings {
        node_id: config.node.id,
        chain_id: config.chain_id_bytes(),
        view: p.view,
        max_message_bytes: config.raft.max_message_bytes,
        snapshot_chunk_bytes: config.raft.snapshot_chunk_bytes,
        storage: p.storage,
        connections_max: p.connections_max,
        handshake_timeout: config.limits.handshake_timeout(),
        write_timeout: config.limits.write_timeout(),
    });
    let (server, client) = p.tls;
    let senders = start_outbound(settings.clone(), client, p.events.clone(), p.stop.clone());
    if !config.peers.is_empty() {
        let listener = TcpListener::bind(config.listen.peer)
            .await
            .with_context(|| format!("binding the peer listener on {}", config.listen.peer))?;
        println!(
            "tally-server: node {} listening for peers on {} (mutual TLS)",
            config.node.id,
            listener.local_addr()?
        );
        tokio::spawn(serve_inbound(listener, server, settings, p.events, p.stop));
    }
    Ok(senders)
}

/// What the raft thread starts from.
struct RaftStart {
    dir: PathBuf,
    voters: Vec<u64>,
    node_id: u64,
    raft_cfg: tally_config::RaftConfig,
    ledger_raft_index: u64,
    configured: AddressBook,
    events: crossbeam_channel::Receiver<crate::channels::RaftEvent>,
    peers: crate::peer::PeerSenders,
    apply: crossbeam_channel::Sender<crate::channels::StorageCmd>,
    master: crossbeam_channel::Sender<crate::channels::MasterEvent>,
    applied: Arc<Applied>,
    view: Arc<ClusterView>,
    metrics: Arc<Metrics>,
    may_campaign: Box<dyn Fn() -> bool + Send>,
    signing: Option<Signing<rand::rngs::OsRng>>,
}

/// Starts the raft thread, which opens its log itself (the log lives on that thread); returns
/// once raft runs there, or why it could not start.
fn spawn_raft(s: RaftStart) -> Result<std::thread::JoinHandle<()>> {
    let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<()>>();
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || {
            let opened = open_replica(
                &s.dir,
                &s.voters,
                s.node_id,
                &s.raft_cfg,
                s.ledger_raft_index,
            )
            .with_context(|| format!("starting raft on the log in {}", s.dir.display()));
            let OpenedReplica {
                replica,
                book: stored_book,
                install,
            } = match opened {
                Ok(r) => {
                    let _ = started_tx.send(Ok(()));
                    r
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let cfg = ReplicationConfig {
                compaction_entries: s.raft_cfg.compaction_entries,
                compaction_bytes: s.raft_cfg.compaction_bytes,
            };
            let book = stored_book.unwrap_or(s.configured);
            let installing_to = install.as_ref().map_or(0, |(index, _)| *index);
            if let Some((index, descriptor)) = install {
                let cmd = crate::channels::StorageCmd::InstallSnapshot { index, descriptor };
                if s.apply.send(cmd).is_err() {
                    return;
                }
            }
            RaftThread {
                engine: Replication::new(cfg, replica, book),
                events: s.events,
                peers: s.peers,
                apply: s.apply,
                master: s.master,
                applied: s.applied,
                view: s.view,
                tick: s.raft_cfg.tick(),
                metrics: s.metrics,
                may_campaign: s.may_campaign,
                signing: s.signing,
                started: std::time::Instant::now(),
                signing_seen: Default::default(),
                leader_seen: 0,
                handed_over_at: None,
                installing_to,
            }
            .run();
        })?;
    started_rx
        .recv()
        .context("the raft thread died while starting")??;
    Ok(thread)
}

/// Runs the replica until SIGTERM or ctrl-c, then shuts down gracefully: stop accepting, finish
/// and commit the batch in progress, send its confirmations, exit.
pub fn run(config: Config, profile: Option<&Path>) -> Result<()> {
    let tls_cfg = config.tls.as_ref().context("[tls] is required")?;
    let keys = NodeKeys::read(&config, tls_cfg)?;
    // Before any database opens: the descriptor limit is raised, the connection limits fit it.
    let sizing = crate::limits::connection_sizing(&config.limits, config.peers.len());
    crate::bootstrap::create_private_dir(&config.node.data_dir)?;
    let (mut store, shared) = open_shared(&config, keys.operator.public, &sizing)?;
    let mut operator = keys.operator;
    let groups = operator
        .share
        .as_ref()
        .map(|files| (files.genesis, files.group_keys()));
    let signing = match operator.share.take() {
        Some(file) => Some(threshold_signing(
            file,
            &config.chain_id_bytes(),
            &mut store,
        )?),
        None => None,
    };
    let mut started = start_pipeline(&config, tls_cfg, operator, store, &shared)?;
    started.replication.signing = signing;
    started.replication.groups = groups;
    let limits = net_limits(&config, &sizing);
    // The HTTP endpoint outlives the client listener: /health answers while the last batch
    // drains, and /ready says 503.
    let (http_stop, http_stop_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let serving = Serving {
        config: &config,
        profile,
        shared: &shared,
        links: &started.links,
        client_tls: keys.client_tls,
        limits,
        peer_connections_max: sizing.peer_connections_max,
        pipeline: started.pipeline.handle.clone(),
        stop_tx: &stop_tx,
        stop_rx,
        http_stop: http_stop_rx,
    };
    let raft_thread = started
        .runtime
        .block_on(serve_until_signal(serving, started.replication))?;
    // Blocking joins happen off the runtime's workers.
    started.pipeline.shutdown();
    let _ = raft_thread.join();
    let _ = http_stop.send(true);
    // Give connection writers a moment to flush the last confirmations.
    started
        .runtime
        .shutdown_timeout(std::time::Duration::from_secs(2));
    println!("tally-server: stopped");
    Ok(())
}

/// The operator's signing keys, in the forms the replica uses them.
struct OperatorKeys {
    /// Sign the headers of the batches this replica applies: the configured key, and the next
    /// one ahead of a rotation (PROTOCOL.md §4.14).
    signer: SigningKeys,
    /// The ledger's genesis public key, which the replica announces and checks ledger
    /// snapshots with (the start of the key chain).
    public: tally_wire::PublicKey,
    /// The genesis key and the held keys, for the archive writer.
    archive: archive::ArchiveKeys,
    /// This replica's shares of a threshold operator key (`operator.signing_key_share`, and
    /// `next_signing_key_share`).
    share: Option<crate::bootstrap::ShareFiles>,
}

/// The keys and certificates the config names, read before anything else starts.
struct NodeKeys {
    operator: OperatorKeys,
    /// The client listener's TLS config.
    client_tls: Arc<rustls::ServerConfig>,
}

impl NodeKeys {
    /// Reads the operator's signing key (`[operator]`) and the client listener's certificate
    /// and key (`tls_cfg`).
    fn read(config: &Config, tls_cfg: &tally_config::TlsConfig) -> Result<NodeKeys> {
        let operator = match crate::bootstrap::OperatorSecret::read(config)? {
            crate::bootstrap::OperatorSecret::Whole(files) => OperatorKeys {
                public: files.genesis,
                signer: files.signing_keys(),
                archive: archive::ArchiveKeys {
                    genesis: files.genesis,
                    held: std::iter::once(files.configured.clone())
                        .chain(files.next.clone())
                        .collect(),
                },
                share: None,
            },
            crate::bootstrap::OperatorSecret::Share(files) => OperatorKeys {
                public: files.genesis,
                signer: SigningKeys::threshold(files.genesis, files.group_keys()),
                archive: archive::ArchiveKeys {
                    genesis: files.genesis,
                    held: Vec::new(),
                },
                share: Some(files),
            },
        };
        let client_tls = server_config(&tls_cfg.cert, &tls_cfg.key)?;
        Ok(NodeKeys {
            operator,
            client_tls,
        })
    }
}

/// The signing stage of a threshold operator's replica, started from its ledger: the headers
/// it applied and has not seen signed are the ones it signs (`tally_core::signing`).
fn threshold_signing(
    files: crate::bootstrap::ShareFiles,
    chain_id: &tally_wire::Hash,
    store: &mut LedgerDb,
) -> Result<Signing<rand::rngs::OsRng>> {
    let (signed, checkpointed) = (store.signed_through()?, store.checkpointed_through()?);
    let meta = store.meta()?;
    let height = meta.height;
    let genesis = files.genesis;
    let groups = files
        .all()
        .into_iter()
        .map(|f| Group::new(f.share, f.public))
        .collect::<tally_core::Result<Vec<_>>>()?;
    let mut signing = Signing::new(groups, rand::rngs::OsRng, signed, checkpointed)?;
    for h in checkpointed + 1..=signed {
        let text = tally_core::engine::apply::checkpoint_text(store, chain_id, h)?;
        let key = tally_core::key_chain::key_for_height(store, &meta, genesis, h + 1)?;
        signing.header_signed(h, text, key, 0, &mut Vec::new());
    }
    for h in signed + 1..=height {
        let header = store
            .applied_header(h)?
            .with_context(|| format!("the applied header {h}, which waits for its signature"))?;
        signing.applied(header, 0, &mut Vec::new());
    }
    if height > signed {
        println!(
            "tally-server: headers {} to {height} wait for their signatures",
            signed + 1
        );
    }
    Ok(signing)
}

/// What the replica's threads share, built around the opened ledger before any of them starts.
struct Shared {
    /// The ledger's summary when it was opened.
    meta: tally_core::state::LedgerMeta,
    metrics: Arc<Metrics>,
    view: Arc<ClusterView>,
    applied: Arc<Applied>,
}

/// Opens the ledger (see [`open_ledger`]) and builds what the threads share around it: the
/// metrics of the opening, the cluster view as the config names it, and the applied point.
fn open_shared(
    config: &Config,
    operator_public: tally_wire::PublicKey,
    sizing: &crate::limits::ConnectionSizing,
) -> Result<(LedgerDb, Shared)> {
    let (mut store, meta, opened_in) = open_ledger(config)?;
    let compactable = store.compactable_meta()?;
    let metrics = opening_metrics(&store, meta.height, opened_in);
    let view = Arc::new(
        ClusterView::new(config.node.id, &configured_book(config)).with_info(
            crate::view::info_reply(config, operator_public, sizing.connections_per_address_max),
        ),
    );
    let applied = Arc::new(Applied {
        index: std::sync::atomic::AtomicU64::new(meta.raft_index),
        meta: Mutex::new(meta.clone()),
        compactable: Mutex::new(compactable),
    });
    let shared = Shared {
        meta,
        metrics,
        view,
        applied,
    };
    Ok((store, shared))
}

/// The running pipeline, the runtime the network side runs on, and what the serving phase
/// wires to them.
struct Started {
    runtime: tokio::runtime::Runtime,
    pipeline: Pipeline,
    links: Links,
    replication: ReplicationStart,
}

/// The archive's gate and the senders of the queues into the raft thread, the master and the
/// storage thread. [`run`] holds them until it returns, so that none of these queues closes
/// while the replica stops.
struct Links {
    gate: Option<Arc<crate::pipeline::ArchiveGate>>,
    raft_tx: crossbeam_channel::Sender<crate::channels::RaftEvent>,
    master_tx: crossbeam_channel::Sender<crate::channels::MasterEvent>,
    storage_tx: crossbeam_channel::Sender<crate::channels::StorageCmd>,
}

/// What the peer transport and the raft thread take over: the raft thread's input queue and
/// the peer TLS configs.
struct ReplicationStart {
    raft_rx: crossbeam_channel::Receiver<crate::channels::RaftEvent>,
    peer_tls: (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>),
    /// A threshold operator's signing stage, for the raft thread.
    signing: Option<Signing<rand::rngs::OsRng>>,
    /// A threshold operator's genesis key and the groups this replica holds shares of.
    groups: Option<(tally_wire::PublicKey, Vec<tally_wire::PublicKey>)>,
}

/// Makes the queues and the network runtime, opens the archive, and starts the pipeline on
/// `store` and the archive writer behind it.
fn start_pipeline(
    config: &Config,
    tls_cfg: &tally_config::TlsConfig,
    operator: OperatorKeys,
    store: LedgerDb,
    shared: &Shared,
) -> Result<Started> {
    let (raft_tx, raft_rx) = crossbeam_channel::bounded(RAFT_QUEUE_MAX);
    let (master_tx, master_rx) = crossbeam_channel::bounded(16);
    let queue_depth = config.limits.queue_depth_max as usize;
    let (storage_tx, storage_rx) = crossbeam_channel::bounded(queue_depth);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tally-net")
        .build()?;
    let archive =
        archive::NodeArchive::open(config, &runtime, &operator.archive, shared.meta.height)?;
    let (gate, read_only) = (archive.gate.clone(), archive.read_only);
    let (peer_server, peer_client) = peer_tls(&tls_cfg.ca_cert, &tls_cfg.cert, &tls_cfg.key)?;
    let transfer = PeerSnapshotTransfer::new(
        config,
        operator.public,
        peer_client.clone(),
        shared.view.clone(),
        runtime.handle().clone(),
    );
    let pipeline = Pipeline::start(
        pipeline_config(
            config,
            &operator.signer,
            shared.metrics.clone(),
            gate.clone(),
            read_only,
        ),
        RaftWiring {
            raft_tx: raft_tx.clone(),
            master_events: master_rx,
            applied: shared.applied.clone(),
            view: shared.view.clone(),
            storage_tx: storage_tx.clone(),
            storage_rx,
        },
        store,
        operator.signer,
        Box::new(transfer),
    );
    let source = ledger_source(&pipeline, storage_tx.clone(), shared, read_only);
    let metrics = shared.metrics.clone();
    archive.start(runtime.handle(), config, source, operator.archive, metrics);
    let links = Links {
        gate,
        raft_tx,
        master_tx,
        storage_tx,
    };
    let replication = ReplicationStart {
        raft_rx,
        peer_tls: (peer_server, peer_client),
        signing: None,
        groups: None,
    };
    Ok(Started {
        runtime,
        pipeline,
        links,
        replication,
    })
}

/// Where the archive writer reads applied batches from: the storage thread, behind the
/// pipeline's applied height.
fn ledger_source(
    pipeline: &Pipeline,
    storage: crossbeam_channel::Sender<crate::channels::StorageCmd>,
    shared: &Shared,
    read_only: bool,
) -> archive::LedgerSource {
    archive::LedgerSource {
        storage,
        view: shared.view.clone(),
        applied_height: pipeline.handle.applied_height.clone(),
        stopping: pipeline.handle.shutdown.clone(),
        read_only,
        feed: None,
        fed: Default::default(),
        applied: None,
    }
}

/// What the serving phase (on the runtime) starts from besides the [`ReplicationStart`].
struct Serving<'a> {
    config: &'a Config,
    /// The client profile's path, announced at start.
    profile: Option<&'a Path>,
    shared: &'a Shared,
    links: &'a Links,
    client_tls: Arc<rustls::ServerConfig>,
    limits: NetLimits,
    peer_connections_max: usize,
    pipeline: crate::pipeline::PipelineHandle,
    /// Stops the client listener and the peer transport on a signal.
    stop_tx: &'a watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    /// Stops the HTTP endpoint (after the pipeline has drained).
    http_stop: watch::Receiver<bool>,
}

/// Binds the listeners, starts the peer transport, the raft thread, the client listener and
/// the HTTP endpoint, and serves until a signal; then stops taking clients. Returns the raft
/// thread, to be joined off the runtime.
async fn serve_until_signal(
    s: Serving<'_>,
    replication: ReplicationStart,
) -> Result<std::thread::JoinHandle<()>> {
    let listeners = Listeners::bind(s.config).await?;
    let raft_thread = start_replication(&s, replication).await?;
    announce(&s, &listeners);
    let witnessed = Arc::clone(&s.pipeline.witnessed);
    tokio::spawn(crate::witnesses::run(
        s.config.witnesses.clone(),
        s.pipeline.clone(),
        witnessed,
    ));
    let explorer = s
        .config
        .explorer
        .enabled
        .then(|| Arc::new(crate::explorer::Explorer::new(s.pipeline.clone())));
    let server = tokio::spawn(serve(
        listeners.client,
        tokio_rustls::TlsAcceptor::from(s.client_tls),
        s.pipeline,
        s.limits,
        s.stop_rx,
    ));
    let metrics = &s.shared.metrics;
    tokio::spawn(crate::http::serve(
        listeners.metrics,
        metrics.clone(),
        explorer,
        s.http_stop,
    ));
    #[cfg(unix)]
    transfer_leadership_on_sigusr1(s.links.raft_tx.clone())?;
    wait_for_signal().await;
    metrics.set_ready(false);
    println!("tally-server: shutting down: finishing the batch in progress");
    let _ = s.stop_tx.send(true);
    let _ = server.await;
    Ok(raft_thread)
}

/// The client and metrics listeners, and the addresses they are bound to.
struct Listeners {
    client: TcpListener,
    client_addr: std::net::SocketAddr,
    metrics: TcpListener,
    metrics_addr: std::net::SocketAddr,
}

impl Listeners {
    /// Binds the client listener, then the metrics listener, on the configured addresses.
    async fn bind(config: &Config) -> Result<Listeners> {
        let client = TcpListener::bind(config.listen.client)
            .await
            .with_context(|| format!("binding the client listener on {}", config.listen.client))?;
        let client_addr = client.local_addr()?;
        let metrics = TcpListener::bind(config.listen.metrics)
            .await
            .with_context(|| {
                format!("binding the metrics listener on {}", config.listen.metrics)
            })?;
        let metrics_addr = metrics.local_addr()?;
        Ok(Listeners {
            client,
            client_addr,
            metrics,
            metrics_addr,
        })
    }
}

/// Starts the peer transport, then the raft thread that sends through it.
async fn start_replication(
    s: &Serving<'_>,
    replication: ReplicationStart,
) -> Result<std::thread::JoinHandle<()>> {
    let (config, links) = (s.config, s.links);
    let peers = PeerStart {
        config,
        view: s.shared.view.clone(),
        storage: links.storage_tx.clone(),
        connections_max: s.peer_connections_max,
        tls: replication.peer_tls,
        events: links.raft_tx.clone(),
        stop: s.stop_rx.clone(),
    };
    let senders = start_peers(peers).await?;
    spawn_raft(RaftStart {
        dir: raft_dir(config),
        voters: config.initial_voters(),
        node_id: config.node.id,
        raft_cfg: config.raft.clone(),
        ledger_raft_index: s.shared.meta.raft_index,
        configured: configured_book(config),
        events: replication.raft_rx,
        peers: senders,
        apply: links.storage_tx.clone(),
        master: links.master_tx.clone(),
        applied: s.shared.applied.clone(),
        view: s.shared.view.clone(),
        metrics: s.shared.metrics.clone(),
        may_campaign: campaign_rule(s, &replication.groups),
        signing: replication.signing,
    })
}

/// When this replica may start an election: the archive's rule (`archive::campaign_rule`)
/// and, on a threshold operator's replica, only while it holds a share of the group that signs
/// the next header: a leader coordinates the signing of every header, which takes the group's
/// public shares (a replica added to sign for a next group, or one that holds no share of the
/// group rotated to, would stall the signatures while it led).
fn campaign_rule(
    s: &Serving<'_>,
    groups: &Option<(tally_wire::PublicKey, Vec<tally_wire::PublicKey>)>,
) -> Box<dyn Fn() -> bool + Send> {
    let archive = archive::campaign_rule(s.links.gate.clone(), s.pipeline.applied_height.clone());
    let Some((genesis, held)) = groups.clone() else {
        return archive;
    };
    let applied = s.shared.applied.clone();
    Box::new(move || {
        let signs_next = {
            let meta = applied.meta.lock().expect("applied meta");
            meta.operator.map_or(genesis, |r| r.key)
        };
        held.contains(&signs_next) && archive()
    })
}

/// Prints where the replica listens and where its ledger is.
fn announce(s: &Serving<'_>, listeners: &Listeners) {
    let (addr, metrics_addr) = (listeners.client_addr, listeners.metrics_addr);
    let node_id = s.config.node.id;
    // Scripts and tests read this line to find the port (the config may say port 0).
    println!("tally-server: node {node_id} listening for clients on {addr} (TLS)");
    println!(
        "tally-server: ledger at height {} in {}",
        s.shared.meta.height,
        ledger_dir(s.config).display()
    );
    println!("tally-server: metrics on http://{metrics_addr}/metrics");
    if let Some(p) = s.profile {
        println!("tally-server: client profile at {}", p.display());
    }
}

/// SIGUSR1: an operator (or the chaos monkey) asks the leader to hand over to its
/// best-caught-up follower, e.g. before maintenance. A no-op on a follower.
#[cfg(unix)]
fn transfer_leadership_on_sigusr1(
    raft_tx: crossbeam_channel::Sender<crate::channels::RaftEvent>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            let _ = raft_tx.try_send(crate::channels::RaftEvent::TransferLeader(0));
        }
    });
    Ok(())
}

/// The metrics the ledger's opening set.
fn opening_metrics(store: &LedgerDb, height: u64, opened_in: std::time::Duration) -> Arc<Metrics> {
    let metrics = Arc::new(Metrics::new());
    metrics.applied_height.set(height as i64);
    let loaded = store.request_filter_origin() == &FilterOrigin::Loaded;
    metrics.ledger.request_filter_loaded.set(loaded as i64);
    metrics.ledger.open_seconds.set(opened_in.as_secs_f64());
    metrics
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
