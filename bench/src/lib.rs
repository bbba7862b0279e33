//! tally-bench: a load generator for a tally operator, and its report.
//!
//! One run (`tally-bench --profile FILE ...` or `--start-server`) goes:
//! 1. the machine's bound ([`bound`]): Ed25519 checks per second on every core, strict and in
//!    batches of 256, measured before any load so that neither disturbs the other;
//! 2. setup, not timed ([`load`]): create `--accounts` keys, fund each with one deposit signed
//!    by the profile's deposit key (many in flight on every connection), wait for every
//!    confirmation, then sign every transfer the timed phase will send (signing is not what is
//!    measured), between the first `--hot` accounts only if that is given;
//! 3. the timed phase: a closed loop (`--in-flight` requests outstanding per connection) or an
//!    open loop (`--rate`, latency counted from each request's scheduled time, so a slow answer
//!    cannot hide the requests it delayed); confirmations, refusals by code and errors are
//!    recorded per connection ([`stats`]), with a progress line on stderr every second;
//! 4. the report ([`report`]): a markdown table on stdout, everything as JSON with `--json`.
//!
//! [`server`] starts a fresh operator for `--start-server`: a development single node, or with
//! `--nodes N` an `init-cluster` cluster of N replicas on this machine, with `--cache-accounts`
//! as their account cache. Their resident memory (VmRSS, and the peak VmHWM) is read after the
//! setup and again at the end of the timed phase, before they are stopped.
//!
//! This crate is the program's logic rather than a library for others, so its errors are
//! `anyhow` messages for the user (the style guide's "thiserror in libraries" does not buy
//! anything here).
//!
//! Caveats:
//! - The load generator runs on the same machine as the operator and takes CPU from it (TLS,
//!   the client's bookkeeping): on a small machine the figures understate the server alone.
//! - The bound excludes decompressing public keys (a server can cache them for hot accounts).
//! - `--duration` runs sign their transfers in advance: an open loop `rate × duration`, a
//!   closed loop `bound × duration` (capped at [`POOL_ESTIMATE_MAX`]), since no operator on this
//!   machine confirms faster than it can check signatures. If the pool runs out before the
//!   deadline the run ends early and the report says so (`pool_exhausted`).
//! - All connections go to the replica that leads when the setup starts. A connection that
//!   drops is not reopened and a leader change is not followed: its requests count as
//!   `disconnected` errors or `not_leader` refusals (this measures throughput, not failover).

pub mod archive;
pub mod args;
pub mod bound;
pub mod driver;
pub mod load;
pub mod report;
pub mod server;
pub mod state_map;
pub mod stats;
pub mod threshold;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tally_client::{Client, Profile};

pub use crate::args::Args;
use crate::args::Driver;
use crate::load::{Accounts, Ids, Pool, Schedule};
pub use crate::report::Report;
use crate::stats::{Batches, Latency};

/// The largest pool signed for a `--duration` closed loop.
pub const POOL_ESTIMATE_MAX: usize = 2_000_000;
/// The smallest pool signed for a `--duration` closed loop.
const POOL_ESTIMATE_MIN: usize = 10_000;
/// The most transfers one run signs in advance (about 200 bytes each in memory).
pub const POOL_MAX: u64 = 10_000_000;
/// How long to wait for a writable leader before the setup phase.
const LEADER_WAIT: Duration = Duration::from_secs(30);
/// Connect and status timeout while looking for the leader.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the whole benchmark and returns its report; prints progress to stderr.
pub fn run(args: &Args) -> Result<Report> {
    args.validate()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let in_flight = args.in_flight_per_connection();
    let duration = args.timed_duration();
    if let (Some(rate), Some(d)) = (args.rate, duration) {
        if rate * d.as_secs_f64() > POOL_MAX as f64 {
            bail!("--rate × --duration is more than {POOL_MAX} requests: shorten the run");
        }
    }
    if args.requests.is_some_and(|n| n > POOL_MAX) {
        bail!("--requests is more than {POOL_MAX}: every request is signed in advance");
    }

    // Started first: a missing binary should fail before anything slow happens.
    let mut started = if args.start_server {
        eprintln!("starting a fresh operator of {} replica(s)", args.nodes);
        let server = server::start(
            args.nodes,
            args.threshold,
            args.server_bin.as_deref(),
            args.cache_accounts,
            args.archive.as_deref(),
        )?;
        for replica in &server.profile.replicas {
            eprintln!(
                "replica {} listening for clients on {}",
                replica.id, replica.address
            );
        }
        eprintln!("account cache: {} per replica", server.cache_accounts);
        match server.archive.as_str() {
            "" => eprintln!("archive: off"),
            url => eprintln!("archive: {url}"),
        }
        Some(server)
    } else {
        None
    };
    let profile = match (&started, &args.profile) {
        (Some(server), _) => server.profile.clone(),
        (None, Some(path)) => Profile::load(path)?,
        (None, None) => bail!("give --profile FILE or --start-server"),
    };
    let chain_id = profile.chain_id_bytes()?;
    let operator_key = profile.operator_key()?;
    let deposit_key = profile
        .load_deposit_key()
        .context("tally-bench funds its accounts with deposits")?;

    eprintln!(
        "measuring the signature-verification bound on {cores} threads ({:.1} s each way, in \
         {} rounds, best kept)",
        args.bound_time.as_secs_f64(),
        bound::ROUNDS
    );
    let bound = bound::measure(args.bound_time);
    eprintln!(
        "bound: strict {}/s, batch {}/s (cached keys: strict {}/s, batch {}/s; tally's hinted \
         batches: {}/s)",
        report::thousands(bound.strict_verifications_per_second),
        report::thousands(bound.batch_verifications_per_second),
        report::thousands(bound.strict_cached_key_verifications_per_second),
        report::thousands(bound.batch_cached_key_verifications_per_second),
        report::thousands(bound.hinted_batch_verifications_per_second)
    );

    // One thread: the load generator shares the machine with the server, and at ~6 us of CPU
    // per request (profile, docs/PERFORMANCE.md) one core could drive well over 100k/s; a multi-threaded runtime spent more on cross-thread wake-ups than it
    // gained (saturated single node 43-46k/s -> 47k/s). Late sends in an open loop are counted.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;

    let setup_start = Instant::now();
    // Keys first: a million take longer than the server's first_request_timeout_ms, which
    // closes a connection that has sent nothing yet.
    eprintln!(
        "creating {} accounts",
        report::thousands(args.accounts as f64)
    );
    let accounts = Accounts::generate(args.accounts, cores);
    let (clients, leader) = runtime.block_on(async {
        let leader = find_leader(&profile).await?;
        eprintln!("the leader is at {leader}");
        let mut clients = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            let client = Client::connect_to_timeout(leader.as_str(), &profile, args.timeout)
                .await
                .with_context(|| format!("connecting to {leader}"))?;
            clients.push(Arc::new(client));
        }
        Ok::<_, anyhow::Error>((clients, leader))
    })?;
    let ids = Ids::new();
    eprintln!(
        "funding them, {} deposits in flight per connection at most",
        load::DEPOSITS_IN_FLIGHT_PER_CONNECTION
    );
    let funding_start = Instant::now();
    runtime.block_on(load::fund(&clients, &deposit_key, chain_id, ids, &accounts))?;
    let funding_seconds = funding_start.elapsed().as_secs_f64();
    let memory_after_setup = started.as_mut().map(|s| s.memory());
    let pool_size = match (args.requests, duration, args.rate) {
        (Some(n), _, _) => n as usize,
        (None, Some(d), Some(rate)) => (rate * d.as_secs_f64()).ceil() as usize,
        (None, Some(d), None) => ((bound.bound_per_second * d.as_secs_f64()).ceil() as usize)
            .clamp(POOL_ESTIMATE_MIN, POOL_ESTIMATE_MAX),
        (None, None, _) => unreachable!("timed_duration defaults the duration"),
    };
    let hot = args.hot_accounts();
    eprintln!("signing {pool_size} transfers between the first {hot} accounts");
    let transfers = match args.envelope {
        Some(per) => {
            eprintln!("in envelopes of {per} transfers, one signature each");
            let envelopes = pool_size.max(1).div_ceil(per);
            load::sign_envelopes(&accounts, chain_id, ids, envelopes * per, per, hot)
        }
        None => load::sign_transfers(
            &accounts,
            chain_id,
            ids,
            pool_size.max(1),
            hot,
            cores,
            !args.no_hints,
        ),
    };
    // Only the hot keys are needed from here on; the rest is a large ledger's worth of memory.
    drop(accounts);
    let presigned = transfers.len() as u64;
    let pool = Arc::new(Pool::new(transfers));
    let setup_seconds = setup_start.elapsed().as_secs_f64();

    let schedule = match args.rate {
        Some(rate) => Schedule::Open { rate, in_flight },
        None => Schedule::Closed {
            in_flight,
            deadline: duration,
        },
    };
    let driver = match args.envelope {
        None => args.driver,
        Some(_) => Driver::Library,
    };
    // Opened last: the server closes a connection that sends nothing for a while.
    let streams = match driver {
        Driver::Lean => {
            Some(runtime.block_on(lean_streams(&leader, &profile, args.connections))?)
        }
        Driver::Library => None,
    };
    eprintln!("timed phase: {schedule:?}, {driver:?} driver");
    let cpu_before = started.as_mut().and_then(|s| s.cpu_ns());
    let (phase, archive_lag) = runtime.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = tokio::spawn(archive::sample(clients[0].clone(), stop.clone()));
        let phase = match streams {
            Some(streams) => driver::phase(streams, pool, schedule, args.timeout).await,
            None => load::timed_phase(&clients, pool, schedule).await,
        };
        stop.store(true, Ordering::SeqCst);
        let lag = match sampler.await.ok().flatten() {
            Some(samples) => {
                let caught_up = archive::catch_up(&clients[0]).await;
                Some(archive::ArchiveLag::from_samples(samples, caught_up))
            }
            None => None,
        };
        (phase, lag)
    });
    // At the end of the timed phase, before anything is stopped. (The CPU figure includes
    // the archive's catch-up after the load, which is part of the load's cost.)
    let memory_at_end = started.as_mut().map(|s| s.memory());
    let cpu_after = started.as_mut().and_then(|s| s.cpu_ns());
    // As written into the replicas' configs (`--cache-accounts`, else the server's default).
    let cache_accounts = started.as_ref().map(|s| s.cache_accounts);

    // Verified after the clock stopped: a sample, one confirmation per batch.
    let mut sample_verified = 0;
    let mut sample_failed = 0;
    for answer in &phase.recorder.samples {
        match answer.verify(&operator_key) {
            Ok(()) => sample_verified += 1,
            Err(e) => {
                sample_failed += 1;
                eprintln!(
                    "a confirmation at height {} does not verify: {e}",
                    answer.header().height
                );
            }
        }
    }
    drop(clients);
    drop(runtime);
    drop(started);

    let recorder = &phase.recorder;
    let elapsed_seconds = phase.elapsed.as_secs_f64();
    let confirmed_per_second = if elapsed_seconds > 0.0 {
        recorder.confirmed as f64 / elapsed_seconds
    } else {
        0.0
    };
    if bound.bound_per_second <= 0.0 {
        return Err(anyhow!("the measured bound is zero"));
    }
    Ok(Report {
        mode: if args.open_loop() { "open" } else { "closed" },
        connections: args.connections,
        in_flight,
        rate: args.rate,
        duration_seconds: duration.map(|d| d.as_secs_f64()),
        requests: args.requests,
        accounts: args.accounts,
        nodes: args.nodes,
        cores,
        sent: phase.sent,
        confirmed: recorder.confirmed,
        confirmed_per_second,
        elapsed_seconds,
        rejected: recorder.rejected.clone(),
        errors: recorder.errors.clone(),
        latency_ms: Latency::from_histogram_us(&recorder.latency_us),
        batches: Batches::from_sizes(&recorder.batch_sizes),
        fraction_of_bound: confirmed_per_second / bound.bound_per_second,
        fraction_of_cached_key_bound: confirmed_per_second / bound.cached_key_bound_per_second,
        bound,
        presigned,
        pool_exhausted: duration.is_some() && phase.pool_exhausted,
        hinted: !args.no_hints && args.envelope.is_none(),
        driver,
        envelope: args.envelope,
        late_sends: phase.late_sends,
        setup_seconds,
        sample_verified,
        sample_failed,
        hot_accounts: hot,
        cache_accounts,
        funding_seconds,
        server_rss_bytes: max_of(&memory_at_end, |m| m.rss_bytes),
        server_peak_rss_bytes: max_of(&memory_at_end, |m| m.peak_rss_bytes),
        server_rss_after_setup_bytes: max_of(&memory_after_setup, |m| m.rss_bytes),
        server_memory: memory_at_end.unwrap_or_default(),
        server_cpu_us_per_request: cpu_per_request(cpu_before, cpu_after, recorder.confirmed),
        archive_lag,
    })
}

/// The replicas' CPU time (all of them) per confirmed request in the timed phase, in µs.
fn cpu_per_request(before: Option<u64>, after: Option<u64>, confirmed: u64) -> Option<f64> {
    let used = after?.checked_sub(before?)?;
    (confirmed > 0).then(|| used as f64 / 1e3 / confirmed as f64)
}

/// The largest figure over the replicas, if any was read.
fn max_of(
    memory: &Option<Vec<server::ReplicaMemory>>,
    figure: impl Fn(&server::ReplicaMemory) -> u64,
) -> Option<u64> {
    memory.as_ref()?.iter().map(figure).max()
}

/// The lean driver's connections to `leader`.
async fn lean_streams(
    leader: &str,
    profile: &Profile,
    connections: usize,
) -> Result<Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>> {
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let stream = tally_client::tls_connect(leader, profile)
            .await
            .with_context(|| format!("connecting to {leader}"))?;
        streams.push(stream);
    }
    Ok(streams)
}

/// The client address of the replica that takes writes. Asks each replica of the profile for
/// its status until one says it is writable: a cluster that just started may still be electing.
async fn find_leader(profile: &Profile) -> Result<String> {
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        for replica in &profile.replicas {
            let address = replica.address.as_str();
            let Ok(client) = Client::connect_to_timeout(address, profile, STATUS_TIMEOUT).await
            else {
                continue;
            };
            if client.status().await.is_ok_and(|s| s.writable) {
                return Ok(replica.address.clone());
            }
        }
        if Instant::now() >= deadline {
            let addresses: Vec<&str> = profile
                .replicas
                .iter()
                .map(|r| r.address.as_str())
                .collect();
            bail!(
                "no replica became a writable leader within {} s (asked {addresses:?})",
                LEADER_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes the report as pretty JSON.
pub fn write_json(report: &Report, path: &std::path::Path) -> Result<()> {
    let mut text = serde_json::to_string_pretty(report).context("encoding the report")?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
