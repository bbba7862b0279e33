//! `tally-chaos live`: a real cluster, real load, seeded faults, and the invariants at the end.
//!
//! The run: write an operator with `init-cluster` and rewire it through proxies; start every
//! replica; fund the accounts; start the load clients, a linearizable-read observer and a
//! status sampler; inject faults one after another for the duration; stop the load; heal
//! everything; wait until the replicas converge; resolve every operation whose outcome is still
//! unknown; read every replica's chain and balances; with `--total-loss`, lose every replica
//! and restore them from the archive ([`crate::total_loss`]); judge the invariants.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tally_client::{ClusterClient, ClusterStats, ProfileConnector};
use tally_wire::PublicKey;

use crate::cluster::{find_server_binary, leader_of, statuses, ArchiveSetup, LiveCluster, Timing};
use crate::faults::{self, Asymmetry, FaultKind, Plan};
use crate::load::{self, ClientSetup, ProxiedConnector, Recorder};
use crate::membership::{self, Replacement};
use crate::report::{self, ClientLibrary, FaultEvent, Report};
use crate::verdict;

/// A bug the harness injects to show that it catches one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedBug {
    /// Batches are confirmed although they are durable on fewer than a majority of replicas:
    /// the harness cuts a minority off, lets the leader and the rest confirm batches, then
    /// SIGKILLs those and wipes the ones that acknowledged (a disk that acknowledged appends it
    /// had not made durable), so the confirmed batches survive on the leader alone, which
    /// stays down. What the cluster then commits was never confirmed, and what it confirmed is
    /// gone: exactly what confirming before commit leads to.
    ConfirmBeforeCommit,
    /// The archive's store loses one batch object its checkpoint covers (a lifecycle rule, an
    /// operator's mistake): the harness deletes it at the total-loss ending, after the archive
    /// caught up and before the replicas are restored. Needs `--total-loss`.
    ArchiveLosesBatch,
}

impl InjectedBug {
    pub fn parse(text: &str) -> Result<InjectedBug> {
        match text {
            "confirm-before-commit" => Ok(InjectedBug::ConfirmBeforeCommit),
            "archive-loses-batch" => Ok(InjectedBug::ArchiveLosesBatch),
            other => {
                bail!("unknown bug {other:?}; known: confirm-before-commit, archive-loses-batch")
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            InjectedBug::ConfirmBeforeCommit => "confirm-before-commit",
            InjectedBug::ArchiveLosesBatch => "archive-loses-batch",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub nodes: u64,
    /// Length of the load phase, faults included.
    pub duration: Duration,
    pub seed: u64,
    pub faults: Vec<FaultKind>,
    pub json: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    /// Write the operator here and keep it; else a temporary directory kept only on failure.
    pub keep: Option<PathBuf>,
    pub clients: usize,
    pub accounts: usize,
    /// What each account is funded with (small values make `insufficient_funds` common).
    pub funding: u64,
    pub server_bin: Option<PathBuf>,
    pub inject_bug: Option<InjectedBug>,
    pub timing: Timing,
    /// Pause between one fault's heal and the next fault, drawn from this range.
    pub fault_gap: (Duration, Duration),
    /// Print progress (faults as they happen) on stderr.
    pub verbose: bool,
    /// The archive every replica writes: `s3://bucket/prefix` (endpoint and credentials from
    /// the `AWS_*` variables; a plain-HTTP endpoint is reached through a proxy that
    /// archive-outage faults cut) or an empty local directory. None: `init-cluster`'s shared
    /// `DIR/archive`.
    pub archive: Option<String>,
    /// `archive.max_lag_batches` of every replica. None: 50 with `archive`, so that an outage
    /// of a few seconds reaches it and writes are refused with `archive_behind`; else the
    /// server's default.
    pub archive_max_lag_batches: Option<u64>,
    /// End with the loss of every replica: once the archive has caught up, kill every replica,
    /// delete its data directory, `tally-server restore` it from the archive, start them again
    /// and check that nothing acknowledged was lost ([`crate::total_loss`]).
    pub total_loss: bool,
    /// A threshold operator: no replacements.
    pub threshold: bool,
}

impl LiveOptions {
    pub fn new(nodes: u64, duration: Duration, seed: u64) -> LiveOptions {
        LiveOptions {
            nodes,
            duration,
            seed,
            faults: FaultKind::ALL.to_vec(),
            json: None,
            svg: None,
            keep: None,
            clients: 8,
            accounts: 32,
            funding: load::FUNDING,
            server_bin: None,
            inject_bug: None,
            timing: Timing::default(),
            fault_gap: (Duration::from_millis(500), Duration::from_millis(2500)),
            verbose: true,
            archive: None,
            archive_max_lag_batches: None,
            total_loss: false,
            threshold: false,
        }
    }
}

/// Runs a live chaos run and returns its report (also written to `--json` and the SVG).
pub fn run(opts: &LiveOptions) -> Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tally-chaos")
        .build()?;
    runtime.block_on(run_async(opts))
}

async fn run_async(opts: &LiveOptions) -> Result<Report> {
    if !(3..=9).contains(&opts.nodes) {
        bail!(
            "--nodes {}: a chaos run needs 3 to 9 replicas (3 or 5 are usual)",
            opts.nodes
        );
    }
    if opts.clients == 0 || opts.accounts < 2 {
        bail!("at least one client and two accounts are needed");
    }
    if opts.inject_bug == Some(InjectedBug::ArchiveLosesBatch) && !opts.total_loss {
        bail!("--inject-bug archive-loses-batch needs --total-loss (it strikes at the restore)");
    }
    let server_bin = find_server_binary(opts.server_bin.as_deref())?;
    let recorder = Arc::new(Recorder::new());
    progress!(
        opts,
        recorder,
        "seed {} ({} replicas, {} clients, {:?}, server {})",
        opts.seed,
        opts.nodes,
        opts.clients,
        opts.duration,
        server_bin.display()
    );
    let archive = ArchiveSetup {
        url: opts.archive.clone(),
        max_lag_batches: opts
            .archive_max_lag_batches
            .or(opts.archive.as_ref().map(|_| 50)),
        threshold: opts.threshold,
    };
    let mut cluster = LiveCluster::create(
        opts.nodes,
        opts.keep.clone(),
        server_bin,
        &opts.timing,
        &archive,
    )
    .await?;
    progress!(
        opts,
        recorder,
        "operator files in {}; archive {}{}",
        cluster.root().display(),
        cluster.archive_url,
        match &cluster.archive_proxy {
            Some(p) => format!(" through a proxy on {} to {}", p.listen, p.target),
            None => String::new(),
        }
    );
    // Kinds this run cannot inject are skipped, and the report says why.
    let proxied = cluster.archive_proxy.is_some();
    let unsupported: Vec<String> = opts
        .faults
        .iter()
        .filter_map(|k| {
            k.unavailable(proxied, opts.total_loss, opts.threshold)
                .map(|why| format!("{}: {why}", k.name()))
        })
        .collect();
    let drawable: Vec<FaultKind> = opts
        .faults
        .iter()
        .copied()
        .filter(|k| {
            k.unavailable(proxied, opts.total_loss, opts.threshold)
                .is_none()
        })
        .collect();
    cluster.start_all().await?;
    if cluster.wait_leader(Duration::from_secs(30)).await.is_none() {
        bail!(
            "no replica became leader within 30 s; logs in {}",
            cluster.dir.keep().display()
        );
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let accounts: Arc<Vec<SigningKey>> = Arc::new(
        (0..opts.accounts)
            .map(|_| SigningKey::from_bytes(&rng.gen()))
            .collect(),
    );
    let account_keys: Vec<PublicKey> = accounts
        .iter()
        .map(|k| k.verifying_key().to_bytes())
        .collect();
    let profile = cluster.profile.clone();
    let operator = profile.operator_key()?;
    let chain_id = profile.chain_id_bytes()?;
    if let Err(e) = load::fund(&recorder, &profile, &accounts, &operator, opts.funding).await {
        let warnings = cluster.log_warnings(opts.nodes, 8);
        let kept = cluster.dir.keep();
        bail!(
            "funding the accounts (logs in {}): {e:#}\n{warnings}",
            kept.display()
        );
    }
    progress!(opts, recorder, "{} accounts funded", accounts.len());

    // Load, observer and sampler.
    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicU64::new(1_000));
    let cut_client = opts.faults.contains(&FaultKind::CutClient);
    let routes: Vec<(String, std::net::SocketAddr)> = cluster
        .client_proxies
        .iter()
        .map(|(id, p)| (cluster.client_addrs[id].to_string(), p.listen))
        .collect();
    let mut clients = Vec::new();
    for index in 0..opts.clients {
        // Every other client goes through the client proxies that cut-client faults cut.
        let client = if cut_client && index % 2 == 1 {
            ClusterClient::with_connector(
                profile.replicas.clone(),
                load::client_options(),
                Arc::new(ProxiedConnector::new(&profile, routes.clone())),
            )
        } else {
            ClusterClient::with_connector(
                profile.replicas.clone(),
                load::client_options(),
                Arc::new(ProfileConnector::new(&profile)),
            )
        };
        clients.push(tokio::spawn(load::run_client(ClientSetup {
            index,
            seed: opts.seed,
            client,
            accounts: accounts.clone(),
            chain_id,
            operator,
            recorder: recorder.clone(),
            stop: stop.clone(),
            next_id: next_id.clone(),
            withdrawals: opts.funding >= 100_000,
        })));
    }
    let observer = tokio::spawn(load::observe(
        ClusterClient::new(&profile, load::client_options()),
        account_keys[0],
        recorder.clone(),
        stop.clone(),
    ));
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(
        profile.clone(),
        cluster.client_addrs.clone(),
        recorder.clone(),
        sampling.clone(),
    ));

    // Faults.
    let load_started = Instant::now();
    let end = load_started + opts.duration;
    let mut log: Vec<FaultEvent> = Vec::new();
    let mut replacements: Vec<Replacement> = Vec::new();
    loop {
        let gap =
            Duration::from_millis(rng.gen_range(
                opts.fault_gap.0.as_millis() as u64..=opts.fault_gap.1.as_millis() as u64,
            ));
        if Instant::now() + gap + Duration::from_secs(3) >= end {
            break;
        }
        tokio::time::sleep(gap).await;
        reap(&mut cluster, &recorder, opts).await;
        if let Some(bug @ InjectedBug::ConfirmBeforeCommit) = opts.inject_bug {
            if load_started.elapsed() >= opts.duration / 3 {
                let event = inject(&mut cluster, bug, &mut rng, &recorder).await?;
                progress!(opts, recorder, "INJECTED {}: {}", event.kind, event.detail);
                log.push(event);
                // Nothing else: the damage is done.
                break;
            }
        }
        if drawable.is_empty() {
            continue;
        }
        let plan = faults::draw(
            &mut rng,
            &drawable,
            opts.nodes,
            opts.timing.election_timeout(),
        );
        let applied = match plan {
            Plan::Replace { isolated } => {
                let done = membership::fault(&mut cluster, isolated, &mut rng, &recorder).await?;
                done.map(|(event, r)| {
                    replacements.push(r);
                    event
                })
            }
            _ => apply(&mut cluster, &plan, &mut rng, &recorder).await?,
        };
        let Some(event) = applied else {
            progress!(opts, recorder, "no leader within 15 s; fault skipped");
            continue;
        };
        progress!(
            opts,
            recorder,
            "{} on {:?} (leader was {:?}), lasted {} ms",
            event.kind,
            event.targets,
            event.leader,
            event.healed_at_ms - event.at_ms
        );
        log.push(event);
        if cluster.wait_leader(Duration::from_secs(20)).await.is_none() {
            progress!(opts, recorder, "no writable leader 20 s after healing");
        }
    }
    let rest = end.saturating_duration_since(Instant::now());
    tokio::time::sleep(rest).await;

    // Stop the load; heal; converge; resolve what is unknown; converge again.
    stop.store(true, Ordering::SeqCst);
    let mut stats = Vec::new();
    for c in clients {
        if let Ok(s) = c.await {
            stats.push(s);
        }
    }
    let _ = observer.await;
    let load_end_ms = recorder.now_ms();
    progress!(opts, recorder, "load stopped; healing everything");
    reap(&mut cluster, &recorder, opts).await;
    cluster.heal_all().await?;
    // Short reserves expire by themselves; let them, before the final state is read.
    tokio::time::sleep(load::TWO_PHASE_SETTLE).await;
    let patience = if opts.inject_bug == Some(InjectedBug::ConfirmBeforeCommit) {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(60)
    };
    let mut converged = verdict::converge(&cluster, patience).await;
    let unresolved = recorder
        .lock()
        .ops
        .iter()
        .filter(|o| o.state.applied().is_none())
        .count();
    progress!(
        opts,
        recorder,
        "convergence: {}; resolving {unresolved} operations",
        if converged.is_ok() { "ok" } else { "FAILED" }
    );
    if cluster.wait_leader(Duration::from_secs(10)).await.is_some() {
        load::resolve_all(&recorder, &profile, &operator).await;
        if converged.is_ok() {
            converged = verdict::converge(&cluster, patience).await;
        }
    }
    sampling.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    reap(&mut cluster, &recorder, opts).await;
    let fin = verdict::collect(&cluster, &account_keys, converged).await;
    let ending = if opts.total_loss {
        let lose_batch = opts.inject_bug == Some(InjectedBug::ArchiveLosesBatch);
        let ending = crate::total_loss::run(
            &mut cluster,
            &recorder,
            &fin,
            &account_keys,
            lose_batch,
            opts,
        )
        .await?;
        log.extend(ending.injected.clone());
        reap(&mut cluster, &recorder, opts).await;
        Some(ending)
    } else {
        None
    };
    for id in cluster.ids.iter().chain(&cluster.removed).copied() {
        for panic in panics_in_log(&cluster.log_path(id)) {
            recorder.lock().crashes.push(format!("node {id}: {panic}"));
        }
    }

    // Judge and report.
    let answers_dropped = cluster
        .client_proxies
        .values()
        .map(|p| p.answers_dropped())
        .sum();
    let mut h = recorder.lock();
    let (mut invariants, final_height) = verdict::judge(&mut h, &fin, &account_keys, &operator);
    if let Some(e) = &ending {
        invariants.extend(e.invariants.iter().cloned());
    }
    if drawable.contains(&FaultKind::Replace) {
        invariants.push(membership::invariant(&replacements));
    }
    let seconds = load_end_ms / 1000 + 1;
    let mut faults_by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for e in &log {
        *faults_by_kind.entry(e.kind.clone()).or_default() += 1;
    }
    let ok = invariants.iter().all(|i| i.ok);
    let mut report = Report {
        mode: "live",
        seed: opts.seed,
        nodes: opts.nodes,
        clients: opts.clients,
        accounts: opts.accounts,
        duration_s: opts.duration.as_secs_f64(),
        faults_enabled: drawable.iter().map(|k| k.name().to_string()).collect(),
        unsupported_faults: unsupported,
        injected_bug: opts.inject_bug.map(|b| b.name().to_string()),
        leader_disruptions: log.iter().filter(|e| e.disrupts_leader).count() as u64,
        faults_by_kind,
        ops: report::summarize_ops(&h, load_end_ms),
        client_library: client_library(&stats, answers_dropped),
        invariants,
        failover: report::failover(&h, &log),
        throughput: report::throughput(&h, seconds),
        fault_log: log,
        final_height,
        archive: report::ArchiveSummary {
            url: cluster.archive_url.clone(),
            proxied,
            max_lag_batches: cluster.archive_max_lag_batches,
        },
        total_loss: ending.map(|e| e.summary),
        replacements,
        members_at_end: cluster.ids.clone(),
        data_dir: None,
        ok,
    };
    drop(h);
    if !ok || opts.keep.is_some() {
        report.data_dir = Some(cluster.dir.keep().display().to_string());
    }
    if let Some(path) = &opts.json {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let svg = opts
        .svg
        .clone()
        .or_else(|| opts.json.as_ref().map(|j| j.with_extension("svg")));
    if let Some(path) = svg {
        std::fs::write(&path, crate::svg::render(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

fn client_library(stats: &[ClusterStats], answers_dropped: u64) -> ClientLibrary {
    let mut c = ClientLibrary {
        answers_dropped,
        ..ClientLibrary::default()
    };
    for s in stats {
        c.operations += s.operations;
        c.attempts += s.attempts;
        c.redirects += s.redirects;
        c.reconnects += s.reconnects;
        c.connect_failures += s.connect_failures;
        c.backoffs += s.backoffs;
        c.indeterminate += s.indeterminate;
        c.gave_up += s.gave_up;
    }
    c
}

/// Every thread panic a replica's log shows (a panic may kill one thread and leave the
/// process running), with its message.
fn panics_in_log(path: &std::path::Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("panicked at") {
            let message = lines.get(i + 1).map_or("", |l| l.trim());
            out.push(format!(
                "{} {message} ({}:{})",
                line.trim(),
                path.display(),
                i + 1
            ));
        }
    }
    out
}

/// Records replicas that exited by themselves and restarts them (as a supervisor would), so
/// that the next fault still leaves a majority up.
async fn reap(cluster: &mut LiveCluster, recorder: &Recorder, opts: &LiveOptions) {
    for (id, status) in cluster.reap_exited() {
        let line = format!(
            "node {id} exited by itself ({status}) by +{} ms; see {}",
            recorder.now_ms(),
            cluster.log_path(id).display()
        );
        progress!(opts, recorder, "{line}");
        recorder.lock().crashes.push(line);
        if let Err(e) = cluster.start(id).await {
            progress!(opts, recorder, "restarting node {id} failed: {e:#}");
        }
    }
}

/// Samples every replica's latest signed header twice a second until `stop`.
async fn sample(
    profile: tally_client::Profile,
    addrs: BTreeMap<u64, std::net::SocketAddr>,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let st = statuses(&profile, &addrs).await;
        let at = recorder.now_ms();
        {
            let mut h = recorder.lock();
            for (id, s) in &st {
                if let Some(header) = s.as_ref().and_then(|s| s.latest_header.as_ref()) {
                    h.headers
                        .record(header, || format!("the status of node {id} at +{at} ms"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Applies one fault against the current leader, holds it, heals it. None if no replica led.
async fn apply(
    cluster: &mut LiveCluster,
    plan: &Plan,
    rng: &mut StdRng,
    recorder: &Recorder,
) -> Result<Option<FaultEvent>> {
    let Some((leader, term)) = cluster.wait_leader(Duration::from_secs(15)).await else {
        return Ok(None);
    };
    let mut backups: Vec<u64> = cluster
        .ids
        .iter()
        .copied()
        .filter(|&id| id != leader)
        .collect();
    backups.shuffle(rng);
    let minority = ((cluster.ids.len() - 1) / 2).max(1);
    let pick = |use_leader: bool| if use_leader { leader } else { backups[0] };
    let at_ms = recorder.now_ms();
    let (targets, detail) = match plan {
        Plan::Kill {
            leader: l,
            backups: b,
            down,
        } => {
            let mut targets: Vec<u64> = Vec::new();
            if *l {
                targets.push(leader);
            }
            targets.extend(backups.iter().take(*b));
            for &t in &targets {
                cluster.kill(t);
            }
            tokio::time::sleep(*down).await;
            for &t in &targets {
                cluster.start(t).await?;
            }
            (
                targets,
                format!("SIGKILL, restarted after {} ms", down.as_millis()),
            )
        }
        Plan::Transfer => {
            cluster.transfer_leadership(leader)?;
            (
                vec![leader],
                "SIGUSR1: the leader hands over to its best-caught-up follower".to_string(),
            )
        }
        Plan::Pause { leader: l, hold } => {
            let t = pick(*l);
            cluster.pause(t)?;
            tokio::time::sleep(*hold).await;
            cluster.resume(t)?;
            (
                vec![t],
                format!("SIGSTOP for {} ms, then SIGCONT", hold.as_millis()),
            )
        }
        Plan::Restart { leader: l, down } => {
            let t = pick(*l);
            cluster.terminate(t).await;
            tokio::time::sleep(*down).await;
            cluster.start(t).await?;
            (
                vec![t],
                format!(
                    "SIGTERM (graceful), restarted after {} ms",
                    down.as_millis()
                ),
            )
        }
        Plan::IsolateLeader { hold } => {
            cluster.isolate(leader, true);
            tokio::time::sleep(*hold).await;
            cluster.heal_network();
            (
                vec![leader],
                format!(
                    "every link to and from the leader cut for {} ms",
                    hold.as_millis()
                ),
            )
        }
        Plan::Split {
            leader_in_minority,
            hold,
        } => {
            let mut minor: Vec<u64> = Vec::new();
            if *leader_in_minority {
                minor.push(leader);
                minor.extend(backups.iter().take(minority - 1));
            } else {
                minor.extend(backups.iter().take(minority));
            }
            let major: Vec<u64> = cluster
                .ids
                .iter()
                .copied()
                .filter(|id| !minor.contains(id))
                .collect();
            cluster.split(&minor, &major);
            tokio::time::sleep(*hold).await;
            cluster.heal_network();
            (
                minor.clone(),
                format!("split {minor:?} | {major:?} for {} ms", hold.as_millis()),
            )
        }
        Plan::Asymmetric { variant, hold } => {
            let (targets, what) = match variant {
                Asymmetry::LeaderCannotSend => {
                    for &b in &backups {
                        cluster.set_link(leader, b, true);
                    }
                    (
                        vec![leader],
                        "the leader's outbound links cut (it still hears)",
                    )
                }
                Asymmetry::LeaderCannotHear => {
                    for &b in &backups {
                        cluster.set_link(b, leader, true);
                    }
                    (
                        vec![leader],
                        "the leader's inbound links cut (it still sends)",
                    )
                }
                Asymmetry::OneLinkFromLeader => {
                    // A link into a replica added during the run cannot be cut alone.
                    let to = *backups
                        .iter()
                        .find(|&&b| cluster.has_link(leader, b))
                        .unwrap_or(&backups[0]);
                    cluster.set_link(leader, to, true);
                    (vec![leader, to], "one link from the leader cut")
                }
            };
            tokio::time::sleep(*hold).await;
            cluster.heal_network();
            (targets, format!("{what} for {} ms", hold.as_millis()))
        }
        Plan::ArchiveOutage { hold } => {
            cluster.set_archive_cut(true);
            let lag_max = archive_lag_max(cluster, *hold).await;
            cluster.set_archive_cut(false);
            let healed_at_ms = recorder.now_ms();
            // Like a replica fault, the next fault waits until writes are taken again: here,
            // until the archive is back under the lag bound.
            let bound = cluster.archive_max_lag_batches;
            let refused = if lag_max >= bound {
                match archive_under_bound(cluster, Duration::from_secs(20)).await {
                    Some(after) => format!(
                        "; at the bound ({bound}) new writes were refused with archive_behind, \
                         until {} ms after the store came back",
                        after.as_millis()
                    ),
                    None => format!(
                        "; at the bound ({bound}) new writes were refused with archive_behind, \
                         still 20 s after the store came back"
                    ),
                }
            } else {
                format!(" (bound {bound})")
            };
            return Ok(Some(FaultEvent {
                at_ms,
                healed_at_ms,
                kind: plan.kind_name().to_string(),
                targets: Vec::new(),
                disrupts_leader: false,
                leader: Some((leader, term)),
                detail: format!(
                    "the replicas' connections to the archive's store cut for {} ms; the \
                     leader's archive lag peaked at {lag_max} batches{refused}",
                    hold.as_millis()
                ),
            }));
        }
        Plan::Replace { .. } => unreachable!("membership::fault applies replacements"),
        Plan::CutClient { hold } => {
            // Replicas are untouched, so the next fault need not wait: the cut is lifted by a
            // task of its own (and by the final heal at the latest).
            let switches: Vec<_> = cluster
                .client_proxies
                .values()
                .map(|p| p.answers_switch())
                .collect();
            for s in &switches {
                s.arm();
            }
            let hold = *hold;
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                for s in &switches {
                    s.disarm();
                }
            });
            return Ok(Some(FaultEvent {
                at_ms,
                healed_at_ms: at_ms + hold.as_millis() as u64,
                kind: plan.kind_name().to_string(),
                targets: Vec::new(),
                disrupts_leader: false,
                leader: Some((leader, term)),
                detail: format!(
                    "proxied clients' connections dropped on their next answer for {} ms",
                    hold.as_millis()
                ),
            }));
        }
    };
    Ok(Some(FaultEvent {
        at_ms,
        healed_at_ms: recorder.now_ms(),
        kind: plan.kind_name().to_string(),
        targets,
        disrupts_leader: plan.disrupts_leader(),
        leader: Some((leader, term)),
        detail,
    }))
}

/// Holds for `hold` while sampling the leader's archive lag (applied batches the archive does
/// not hold yet, as its status says); returns the largest seen.
async fn archive_lag_max(cluster: &LiveCluster, hold: Duration) -> u64 {
    let until = Instant::now() + hold;
    let mut lag_max = 0;
    while Instant::now() < until {
        if let Some(lag) = leader_archive_lag(cluster).await {
            lag_max = lag_max.max(lag);
        }
        tokio::time::sleep(
            Duration::from_millis(300).min(until.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    lag_max
}

/// The leader's archive lag (applied height minus the archive's, as its status says), if a
/// leader answers.
async fn leader_archive_lag(cluster: &LiveCluster) -> Option<u64> {
    let st = cluster.statuses().await;
    let (leader, _) = leader_of(&st)?;
    let s = st.get(&leader)?.as_ref()?;
    Some(
        s.applied_height
            .saturating_sub(s.archive_height.unwrap_or(0)),
    )
}

/// Waits until the leader's archive lag is below the bound again (it takes writes); returns
/// how long that took, or None after `timeout`.
async fn archive_under_bound(cluster: &LiveCluster, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if leader_archive_lag(cluster)
            .await
            .is_some_and(|lag| lag < cluster.archive_max_lag_batches)
        {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Injects `bug` (see [`InjectedBug`]). The harness must then report violations.
async fn inject(
    cluster: &mut LiveCluster,
    bug: InjectedBug,
    rng: &mut StdRng,
    recorder: &Recorder,
) -> Result<FaultEvent> {
    assert_eq!(
        bug,
        InjectedBug::ConfirmBeforeCommit,
        "the others strike at the end"
    );
    let Some((leader, term)) = cluster.wait_leader(Duration::from_secs(15)).await else {
        bail!("no leader to inject {} against", bug.name());
    };
    let at_ms = recorder.now_ms();
    let mut backups: Vec<u64> = cluster
        .ids
        .iter()
        .copied()
        .filter(|&id| id != leader)
        .collect();
    backups.shuffle(rng);
    // The leader and `ackers` form a bare majority; `cut` is everyone else.
    let majority = cluster.ids.len() / 2 + 1;
    let ackers: Vec<u64> = backups[..majority - 1].to_vec();
    let cut: Vec<u64> = backups[majority - 1..].to_vec();
    for &c in &cut {
        cluster.isolate(c, true);
    }
    // Let the bare majority confirm batches the cut-off replicas never see.
    let base = statuses(&cluster.profile, &cluster.client_addrs).await;
    let cut_height = cut
        .iter()
        .filter_map(|c| base.get(c).cloned().flatten())
        .map(|s| s.applied_height)
        .max()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut leader_height = 0;
    while Instant::now() < deadline {
        let st = statuses(&cluster.profile, &cluster.client_addrs).await;
        leader_height = st
            .get(&leader)
            .cloned()
            .flatten()
            .map_or(0, |s| s.applied_height);
        if leader_height >= cut_height + 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.kill(leader);
    for &a in &ackers {
        cluster.kill(a);
        cluster.wipe(a)?;
    }
    cluster.heal_network();
    for &a in &ackers {
        cluster.start(a).await?;
    }
    Ok(FaultEvent {
        at_ms,
        healed_at_ms: recorder.now_ms(),
        kind: format!("injected-{}", bug.name()),
        targets: std::iter::once(leader)
            .chain(ackers.iter().copied())
            .collect(),
        disrupts_leader: true,
        leader: Some((leader, term)),
        detail: format!(
            "cut {cut:?} off at height {cut_height}; leader {leader} with {ackers:?} confirmed up \
             to height {leader_height}; then SIGKILLed {leader} and {ackers:?}, wiped {ackers:?} \
             (acknowledged appends that were never durable), healed {cut:?} and restarted \
             {ackers:?} empty; {leader} stays down until the end"
        ),
    })
}
