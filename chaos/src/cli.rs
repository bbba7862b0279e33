//! The command line of `tally-chaos` (the binary only parses and calls [`run`]).

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::cluster::Timing;
use crate::faults::parse_faults;
use crate::live::{InjectedBug, LiveOptions};
use crate::sim::{SimBug, SimOptions};

#[derive(Parser, Debug)]
#[command(
    name = "tally-chaos",
    version,
    about = "Disrupts a tally cluster under load and checks that nothing is lost"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Real tally-server processes, real load, seeded faults; invariants checked at the end.
    Live(Box<LiveArgs>),
    /// A deterministic in-process simulation, one run per seed.
    Sim(SimArgs),
}

#[derive(clap::Args, Debug)]
pub struct LiveArgs {
    /// Replicas in the cluster (3 or 5).
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// How long the load and the faults run: 90s, 2m, 1500ms (a bare number is seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// The seed every random choice derives from (random, and printed, when absent).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Fault kinds to inject: kill,pause,partition,restart,transfer,cut-client,archive-outage,
    /// replace
    /// (or all; archive-outage only with an S3 --archive, replace not with --total-loss, else
    /// they are skipped).
    #[arg(long, default_value = "all")]
    pub faults: String,
    /// Write the report as JSON here (and the plot next to it, as .svg).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the plot here instead.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Create the cluster in DIR (empty or absent) and keep it; by default a temporary
    /// directory is used and kept only when an invariant fails.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Concurrent load clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Funded accounts the clients move money between.
    #[arg(long, default_value_t = 32)]
    pub accounts: usize,
    /// What each account is funded with; small amounts make `insufficient_funds` common.
    #[arg(long, default_value_t = crate::load::FUNDING)]
    pub funding: u64,
    /// The tally-server binary (default: next to tally-chaos, else target/{release,debug}).
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// Inject a bug the harness must catch: confirm-before-commit, or archive-loses-batch (with
    /// --total-loss: one archived batch object deleted before the restore).
    #[arg(long, value_name = "BUG")]
    pub inject_bug: Option<String>,
    /// Archive to s3://BUCKET/PREFIX (endpoint and credentials from AWS_ENDPOINT_URL,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP; a plain-HTTP
    /// endpoint is reached through a proxy that archive-outage cuts) or to an empty local
    /// directory, instead of the cluster directory's own `archive`.
    #[arg(long, value_name = "URL")]
    pub archive: Option<String>,
    /// archive.max_lag_batches of every replica [default: 50 with --archive, so that an outage
    /// reaches it; else the server's default].
    #[arg(long, value_name = "N")]
    pub archive_max_lag_batches: Option<u64>,
    /// End with the loss of every replica: once the archive has caught up, kill them all,
    /// delete their data, `tally-server restore` each from the archive, start them again and
    /// check that every acknowledged request survived (and replays), and audit the archive.
    #[arg(long)]
    pub total_loss: bool,
    /// A threshold operator (`init-cluster --threshold`, PROTOCOL.md §4.15): each replica holds
    /// a share of the operator key and a majority signs every header and checkpoint; its
    /// archive holds every checkpoint's signature, so --total-loss restores it too. No replace
    /// fault: a new member needs a new group and a rotation to it (`init-cluster --new-group`),
    /// which this harness does not drive.
    #[arg(long)]
    pub threshold: bool,
    /// Raft tick written into every replica's config.
    #[arg(long, default_value_t = 50)]
    pub tick_ms: u64,
    /// Election timeout in ticks.
    #[arg(long, default_value_t = 10)]
    pub election_ticks: usize,
    /// Batch window written into every replica's config.
    #[arg(long, default_value_t = 20)]
    pub batch_window_ms: u64,
    /// Raft log compaction threshold (small, so that restarted replicas need snapshots).
    #[arg(long, default_value_t = 300)]
    pub compaction_entries: u64,
    /// Only print the report.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Seeds to run: A..B (B excluded) or a single seed.
    #[arg(long, default_value = "1..101", value_parser = parse_seeds)]
    pub seeds: Range<u64>,
    /// Simulated steps (10 ms ticks) of faults and load per seed, before the heal.
    #[arg(long, default_value_t = 3000)]
    pub steps: u64,
    /// Break the simulated cluster on purpose, to see the checks fail: confirm-before-commit;
    /// or mirror a server behaviour the simulation corrects: server-compacts-past-commit,
    /// server-snapshot-stall.
    #[arg(long, value_name = "BUG")]
    pub inject_bug: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one line per seed.
    #[arg(long)]
    pub verbose: bool,
}

/// `90s`, `2m`, `1500ms`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 2m or 1500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" | "min" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    }
}

/// `A..B` (B excluded, like a Rust range) or a single seed `A`.
pub fn parse_seeds(text: &str) -> Result<Range<u64>, String> {
    let bad = || format!("{text:?} is not a seed range such as 1..1000 or a single seed");
    match text.split_once("..") {
        Some((a, b)) => {
            let a: u64 = a.trim().parse().map_err(|_| bad())?;
            let b: u64 = b.trim().parse().map_err(|_| bad())?;
            if b <= a {
                return Err(format!("{text:?} is empty (the end is excluded)"));
            }
            Ok(a..b)
        }
        None => {
            let a: u64 = text.trim().parse().map_err(|_| bad())?;
            Ok(a..a + 1)
        }
    }
}

/// Runs a command. Ok(true) when every invariant held.
pub fn run(args: Args) -> Result<bool> {
    match args.command {
        Command::Live(a) => live(*a),
        Command::Sim(a) => sim(a),
    }
}

fn live(a: LiveArgs) -> Result<bool> {
    let seed = a.seed.unwrap_or_else(rand::random);
    let mut opts = LiveOptions::new(a.nodes, a.duration, seed);
    opts.faults = parse_faults(&a.faults)?;
    opts.json = a.json;
    opts.svg = a.svg;
    opts.keep = a.keep;
    opts.clients = a.clients;
    opts.accounts = a.accounts;
    opts.funding = a.funding;
    opts.server_bin = a.server_bin;
    opts.inject_bug = a
        .inject_bug
        .as_deref()
        .map(InjectedBug::parse)
        .transpose()?;
    opts.timing = Timing {
        tick_ms: a.tick_ms,
        election_ticks: a.election_ticks,
        heartbeat_ticks: (a.election_ticks / 5).max(1),
        batch_window_ms: a.batch_window_ms,
        compaction_entries: a.compaction_entries,
    };
    opts.verbose = !a.quiet;
    opts.archive = a.archive;
    opts.archive_max_lag_batches = a.archive_max_lag_batches;
    opts.total_loss = a.total_loss;
    opts.threshold = a.threshold;
    if opts.archive_max_lag_batches == Some(0) {
        bail!("--archive-max-lag-batches must be at least 1");
    }
    if a.election_ticks < 2 {
        bail!("--election-ticks must be at least 2");
    }
    println!("tally-chaos live: seed {seed}");
    let report = crate::live::run(&opts).context("the live run")?;
    print!("{}", report.to_text());
    Ok(report.ok)
}

fn sim(a: SimArgs) -> Result<bool> {
    let bug = a.inject_bug.as_deref().map(SimBug::parse).transpose()?;
    let opts = SimOptions {
        steps: a.steps,
        bug,
        verbose: a.verbose,
    };
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let summary = crate::sim::run_seeds(a.seeds.clone(), &opts, threads);
    print!("{}", summary.to_text(&a.seeds, &opts));
    Ok(summary.failed.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_seed_ranges_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("7 parsecs").is_err());
        assert_eq!(parse_seeds("1..1000"), Ok(1..1000));
        assert_eq!(parse_seeds("17"), Ok(17..18));
        assert!(parse_seeds("5..5").is_err());
        assert!(parse_seeds("x..3").is_err());
    }
}
