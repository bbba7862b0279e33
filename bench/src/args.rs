//! The command line of `tally-bench`. The flag names are a contract with scripts: keep them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};

/// How a closed loop sends requests (`--driver`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Lean,
    Library,
}

/// Requests in flight per connection in a closed loop, unless `--in-flight` says otherwise: the
/// server's own per-connection limit, so that the closed loop measures the server's capacity.
/// With fewer it measures the round trip instead (Little's law: in flight / latency, and the
/// latency is at least the batch window): 4 x 1024 gave 39-40k/s here at p50 104 ms, 4 x 2048
/// 43-44k/s, 4 x 4096 47k/s. A closed loop's latency is that queueing; the open loop
/// (`--rate`) is the latency measurement.
pub const IN_FLIGHT_CLOSED_DEFAULT: usize = 4096;
/// In an open loop `--in-flight` only caps what is outstanding (the generator waits beyond it,
/// and that wait counts as latency); by default the server's own per-connection limit.
pub const IN_FLIGHT_OPEN_DEFAULT: usize = 4096;
/// The timed phase when neither `--requests` nor `--duration` is given.
pub const DURATION_DEFAULT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug, Clone)]
#[command(
    name = "tally-bench",
    version,
    about = "Load generator for a tally operator: throughput, confirmation latency, and this \
             machine's signature-verification bound, measured in one run"
)]
pub struct Args {
    /// Client profile of the operator to load (written by the server as profile.toml).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present_any = [
            "start_server",
            "snapshot_accounts",
            "state_map_accounts",
            "threshold_signers"
        ],
        conflicts_with = "start_server"
    )]
    pub profile: Option<PathBuf>,
    /// TLS connections to the operator.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub connections: usize,
    /// Transfers to send in the timed phase.
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    pub requests: Option<u64>,
    /// Length of the timed phase, e.g. 30s, 500ms, 2m (default 10s).
    #[arg(long, value_name = "TIME", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Accounts to create and fund before the timed phase.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub accounts: usize,
    /// The hot working set: timed-phase transfers go only between the first N accounts
    /// (default: all of them). The others are funded, so the ledger is `--accounts` large.
    #[arg(long, value_name = "N")]
    pub hot: Option<usize>,
    /// Open loop: offer this many requests per second in total, on a fixed schedule, whatever
    /// the answers. Without it, a closed loop.
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// How a closed loop sends requests: `lean`, each connection's own writer and reader over
    /// raw frames (the load generator's CPU per request a fraction of the library's), or
    /// `library`, a client library call per request. Envelopes and the open loop always use
    /// the library.
    #[arg(long, value_enum, default_value_t = Driver::Lean)]
    pub driver: Driver,
    /// Requests outstanding per connection: kept full in a closed loop (default 4096), a cap in
    /// an open loop (default 4096).
    #[arg(long, value_name = "N")]
    pub in_flight: Option<usize>,
    /// Send plain `Submit`s (the server checks each signature strictly, one by one) instead of
    /// `SubmitHinted` (nonce hints: the server checks signatures in batches).
    #[arg(long)]
    pub no_hints: bool,
    /// Send envelopes of N transfers (one signature each, independent results) instead of one
    /// request per transfer; `--requests`, `--rate` and the figures count transfers. 1..=8192.
    #[arg(long, value_name = "N")]
    pub envelope: Option<usize>,
    /// Also write the whole report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Start a fresh development operator (tally-server, found next to this executable), run
    /// against it, and stop it at the end.
    #[arg(long)]
    pub start_server: bool,
    /// Replicas to start with --start-server: 1 (a development node) or an `init-cluster`
    /// cluster of N replicas on this machine.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nodes: usize,
    /// With --start-server and --nodes 2 or more: a threshold operator (`init-cluster
    /// --threshold`): each replica holds a share of the operator key and a majority signs
    /// every header and checkpoint (PROTOCOL.md §4.15).
    #[arg(long)]
    pub threshold: bool,
    /// With --start-server: the replicas' account cache (`cache.accounts_max`), in accounts
    /// (default: the server's, 100000). Smaller than --accounts makes the ledger outgrow it.
    #[arg(long, value_name = "N")]
    pub cache_accounts: Option<usize>,
    /// With --start-server: where the replicas archive (`archive.url`): `off`, a directory,
    /// file:///path or s3://bucket/prefix (endpoint and credentials from the AWS variables).
    /// Default: a single node archives to its data directory (the development operator's
    /// default); a cluster does not archive.
    #[arg(long, value_name = "URL")]
    pub archive: Option<String>,
    /// Instead of a load: the sizes of the archive's state snapshots for a ledger of N funded
    /// accounts, full against differential after transfers touching --snapshot-change of them.
    #[arg(long, value_name = "N")]
    pub snapshot_accounts: Option<usize>,
    /// With --snapshot-accounts: the fraction of accounts the transfers touch.
    #[arg(long, value_name = "F", default_value_t = 0.01)]
    pub snapshot_change: f64,
    /// Instead of a load: what the state map costs for a ledger of N accounts (build, memory
    /// per account, one batch of --state-map-changes changes), beside the machine's SHA-256
    /// time for the same hashes.
    #[arg(long, value_name = "N")]
    pub state_map_accounts: Option<usize>,
    /// With --state-map-accounts: accounts changed per batch.
    #[arg(long, value_name = "K", default_value_t = 8192)]
    pub state_map_changes: usize,
    /// With --state-map-accounts: batches folded in (the median is of these).
    #[arg(long, value_name = "R", default_value_t = 9)]
    pub state_map_rounds: usize,
    /// Instead of a load: what FROST threshold signing of a header costs with N signers (each
    /// step's CPU, bytes per signer), beside one single-key Ed25519 signature.
    #[arg(long, value_name = "N")]
    pub threshold_signers: Option<u16>,
    /// With --threshold-signers: signers needed (the raft majority: 2 of 3, 3 of 5).
    #[arg(long, value_name = "T", default_value_t = 2)]
    pub threshold_min: u16,
    /// With --threshold-signers: headers signed (the medians are of these).
    #[arg(long, value_name = "R", default_value_t = 200)]
    pub threshold_rounds: usize,
    /// How long one request may wait for its answer before it counts as a timeout.
    #[arg(long, value_name = "TIME", value_parser = parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// How long each signature-verification measurement runs in all (split into interleaved
    /// rounds, the best round kept).
    #[arg(long, value_name = "TIME", value_parser = parse_duration, default_value = "1500ms")]
    pub bound_time: Duration,
    /// The tally-server binary to start (default: next to this executable).
    #[arg(long, value_name = "FILE", hide = true)]
    pub server_bin: Option<PathBuf>,
}

impl Args {
    /// Checks the values clap cannot: ranges and the combinations that do not make sense.
    pub fn validate(&self) -> Result<()> {
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if let Some(n) = self.envelope {
            if !(1..=tally_wire::ENVELOPE_OPS_MAX as usize).contains(&n) {
                bail!("--envelope must be 1 to 8192 transfers, not {n}");
            }
            if self.rate.is_some() {
                bail!("--envelope runs a closed loop: --rate is for single requests");
            }
        }
        if self.accounts < 2 {
            bail!("--accounts must be at least 2: a transfer needs two accounts");
        }
        if let Some(hot) = self.hot {
            if !(2..=self.accounts).contains(&hot) {
                bail!(
                    "--hot must be between 2 and --accounts ({}), not {hot}: a transfer needs \
                     two accounts, and the hot set is the first N of them",
                    self.accounts
                );
            }
        }
        if self.cache_accounts.is_some() && !self.start_server {
            bail!("--cache-accounts only applies with --start-server (it configures the replicas)");
        }
        if self.cache_accounts == Some(0) {
            bail!("--cache-accounts must be at least 1");
        }
        if self.in_flight == Some(0) {
            bail!("--in-flight must be at least 1");
        }
        if self.requests == Some(0) {
            bail!("--requests must be at least 1");
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            bail!("--duration must be more than zero");
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--rate must be a positive number of requests per second, not {rate}");
            }
        }
        if self.timeout.is_zero() {
            bail!("--timeout must be more than zero");
        }
        if self.nodes != 1 && !self.start_server {
            bail!("--nodes only applies with --start-server");
        }
        if !(1..=crate::server::NODES_MAX).contains(&self.nodes) {
            bail!(
                "--nodes must be between 1 and {}, not {}",
                crate::server::NODES_MAX,
                self.nodes
            );
        }
        Ok(())
    }

    /// Accounts the timed phase transfers between: the first `hot_accounts()` of them.
    pub fn hot_accounts(&self) -> usize {
        self.hot.unwrap_or(self.accounts)
    }

    pub fn open_loop(&self) -> bool {
        self.rate.is_some()
    }

    pub fn in_flight_per_connection(&self) -> usize {
        self.in_flight.unwrap_or(if self.open_loop() {
            IN_FLIGHT_OPEN_DEFAULT
        } else {
            IN_FLIGHT_CLOSED_DEFAULT
        })
    }

    /// The timed phase's length, unless it is a count of requests.
    pub fn timed_duration(&self) -> Option<Duration> {
        match (self.requests, self.duration) {
            (Some(_), _) => None,
            (None, Some(d)) => Some(d),
            (None, None) => Some(DURATION_DEFAULT),
        }
    }
}

/// Parses `30s`, `500ms`, `2m`, `1.5s`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 30s, 500ms or 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let check = |text: &str, expected: Option<Duration>| {
            assert_eq!(parse_duration(text).ok(), expected, "{text:?}");
        };
        check("30s", Some(Duration::from_secs(30)));
        check("30", Some(Duration::from_secs(30)));
        check("500ms", Some(Duration::from_millis(500)));
        check("1.5s", Some(Duration::from_millis(1500)));
        check("2m", Some(Duration::from_secs(120)));
        check(" 1h ", Some(Duration::from_secs(3600)));
        check("", None);
        check("s", None);
        check("10 parsecs", None);
        check("-1s", None);
    }

    #[test]
    fn flags_and_defaults() {
        let parse = |line: &str| {
            Args::try_parse_from(std::iter::once("tally-bench").chain(line.split_whitespace()))
        };
        let args = parse("--profile p.toml").unwrap();
        args.validate().unwrap();
        assert_eq!(args.connections, 4);
        assert_eq!(args.accounts, 1000);
        assert_eq!(args.in_flight_per_connection(), IN_FLIGHT_CLOSED_DEFAULT);
        assert_eq!(args.timed_duration(), Some(DURATION_DEFAULT));

        let args = parse("--start-server --rate 1000 --requests 50 --json out.json").unwrap();
        args.validate().unwrap();
        assert!(args.open_loop());
        assert_eq!(args.in_flight_per_connection(), IN_FLIGHT_OPEN_DEFAULT);
        assert_eq!(args.timed_duration(), None);

        // Needs a profile or --start-server, not both; --requests and --duration exclude
        // each other.
        assert!(parse("").is_err());
        assert!(parse("--profile p --start-server").is_err());
        assert!(parse("--profile p --requests 5 --duration 5s").is_err());
        for bad in [
            "--profile p --connections 0",
            "--profile p --accounts 1",
            "--profile p --rate 0",
            "--profile p --rate=-5",
            "--profile p --in-flight 0",
            "--start-server --nodes 0",
            "--start-server --nodes 10",
            "--profile p --nodes 3",
        ] {
            assert!(parse(bad).unwrap().validate().is_err(), "{bad}");
        }
    }

    fn parse(line: &str) -> Args {
        Args::try_parse_from(std::iter::once("tally-bench").chain(line.split_whitespace()))
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    #[test]
    fn hot_working_set() {
        let args = parse("--profile p --accounts 500");
        args.validate().unwrap();
        assert_eq!(args.hot, None);
        assert_eq!(args.hot_accounts(), 500, "all accounts by default");

        for good in [2, 3, 499, 500] {
            let args = parse(&format!("--profile p --accounts 500 --hot {good}"));
            args.validate().unwrap();
            assert_eq!(args.hot_accounts(), good);
        }
        for (bad, says) in [
            (
                "--profile p --accounts 500 --hot 0",
                "--hot must be between 2 and",
            ),
            (
                "--profile p --accounts 500 --hot 1",
                "--hot must be between 2 and",
            ),
            ("--profile p --accounts 500 --hot 501", "(500), not 501"),
            ("--profile p --hot 1001", "(1000), not 1001"),
        ] {
            let error = parse(bad).validate().unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
        assert!(Args::try_parse_from(["tally-bench", "--profile", "p", "--hot", "-3"]).is_err());
    }

    #[test]
    fn cache_accounts() {
        let args = parse("--start-server --accounts 1000000 --hot 1000 --cache-accounts 10000");
        args.validate().unwrap();
        assert_eq!(args.cache_accounts, Some(10_000));
        assert_eq!(args.hot_accounts(), 1000);

        let args = parse("--start-server");
        args.validate().unwrap();
        assert_eq!(args.cache_accounts, None);
        let error = parse("--start-server --cache-accounts 0")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("at least 1"), "{error}");
        let error = parse("--profile p --cache-accounts 10")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("only applies with --start-server"),
            "{error}"
        );
    }
}
