//! End-to-end runs of the `tally-bench` binary against a real `tally-server` it starts itself
//! (`--start-server`, the same code path a user runs), with tiny numbers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A run that takes longer than this has hung.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// `target/<profile>`: the test executable lives in `target/<profile>/deps`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable is in target/<profile>/deps")
        .to_path_buf()
}

/// Makes sure `target/<profile>/tally-server` is built and current, where tally-bench (built
/// by cargo for this test, in the same directory) looks for it. `CARGO_BIN_EXE_*` only names
/// binaries of this package, so cargo is asked to build the server's, with the same profile.
fn ensure_server_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let dir = profile_dir();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_string(),
            Some(other) => other.to_string(),
            None => panic!("unexpected target directory {}", dir.display()),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut command = Command::new(cargo);
        command.current_dir(workspace).args([
            "build",
            "--quiet",
            "--bin",
            "tally-server",
            "--profile",
            &profile,
        ]);
        // Cargo gives this test the variables it gives a build script (CARGO_MANIFEST_DIR,
        // CARGO_PKG_NAME, ...). Build scripts that rerun when those change (ring's does) would
        // then be rebuilt here and again by the next `cargo test`: hide them from the build.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let set_for_this_test = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_", "CARGO_CFG_"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&name.as_ref());
            if set_for_this_test {
                command.env_remove(name.as_ref());
            }
        }
        let status = command
            .status()
            .expect("running cargo build --bin tally-server");
        assert!(status.success(), "cargo build --bin tally-server failed");
        let binary = dir.join(format!("tally-server{}", std::env::consts::EXE_SUFFIX));
        assert!(binary.is_file(), "{} was not built", binary.display());
        binary
    })
}

/// Runs tally-bench with `args`, killing it if it outlives [`RUN_TIMEOUT`].
fn bench(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally-bench"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning tally-bench");
    // Drained on threads so that a chatty child never blocks on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut b).unwrap();
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut b).unwrap();
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > RUN_TIMEOUT {
            child.kill().unwrap();
            panic!("tally-bench {args:?} ran for more than {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs a successful benchmark and returns (markdown, JSON report).
fn run_ok(extra: &[&str]) -> (String, Value) {
    ensure_server_binary();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut args = vec![
        "--start-server",
        "--accounts",
        "50",
        "--connections",
        "2",
        "--bound-time",
        "200ms",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let output = bench(&args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tally-bench {args:?} failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    let text = std::fs::read_to_string(&json).expect("the JSON report was written");
    let report: Value = serde_json::from_str(&text).expect("the JSON report parses");
    (stdout, report)
}

fn sum(object: &Value) -> u64 {
    object
        .as_object()
        .expect("an object of counts")
        .values()
        .map(|n| n.as_u64().expect("a count"))
        .sum()
}

/// The checks every successful run must pass.
fn check_report(markdown: &str, report: &Value, sent: u64) {
    assert!(markdown.contains("| metric | value |"), "{markdown}");
    assert!(markdown.contains("| fraction of bound |"), "{markdown}");
    let confirmed = report["confirmed"].as_u64().unwrap();
    let rejected = sum(&report["rejected"]);
    let errors = sum(&report["errors"]);
    assert_eq!(report["sent"].as_u64().unwrap(), sent, "{report:#}");
    assert_eq!(confirmed + rejected + errors, sent, "{report:#}");
    assert!(confirmed > 0, "{report:#}");
    let fraction = report["fraction_of_bound"].as_f64().unwrap();
    assert!(fraction > 0.0 && fraction <= 1.0, "{report:#}");
    assert!(report["confirmed_per_second"].as_f64().unwrap() > 0.0);
    let latency = &report["latency_ms"];
    let p = |name: &str| latency[name].as_f64().unwrap();
    assert!(p("p50") > 0.0, "{report:#}");
    assert!(
        p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= p("p999"),
        "{report:#}"
    );
    assert!(p("p999") <= p("max"), "{report:#}");
    let batches = &report["batches"];
    assert!(batches["count"].as_u64().unwrap() >= 1, "{report:#}");
    assert!(batches["max_size"].as_u64().unwrap() >= batches["p50_size"].as_u64().unwrap());
    let bound = &report["bound"];
    let bound_per_second = bound["bound_per_second"].as_f64().unwrap();
    assert_eq!(
        bound_per_second,
        bound["strict_verifications_per_second"]
            .as_f64()
            .unwrap()
            .max(bound["batch_verifications_per_second"].as_f64().unwrap())
    );
    let cached = bound["cached_key_bound_per_second"].as_f64().unwrap();
    assert_eq!(
        cached,
        bound["strict_cached_key_verifications_per_second"]
            .as_f64()
            .unwrap()
            .max(
                bound["batch_cached_key_verifications_per_second"]
                    .as_f64()
                    .unwrap()
            )
    );
    let confirmed_per_second = report["confirmed_per_second"].as_f64().unwrap();
    let fraction_cached = report["fraction_of_cached_key_bound"].as_f64().unwrap();
    assert!(
        (fraction_cached - confirmed_per_second / cached).abs() < 1e-9,
        "{report:#}"
    );
    assert!(report["sample_verified"].as_u64().unwrap() >= 1);
    assert_eq!(report["sample_failed"], 0);
    for parameter in [
        "connections",
        "in_flight",
        "rate",
        "duration_seconds",
        "requests",
        "accounts",
        "nodes",
        "cores",
    ] {
        assert!(report.get(parameter).is_some(), "{parameter} missing");
    }
}

/// The replicas' memory, read before they stop: a resident set and a peak no smaller.
fn check_memory(markdown: &str, report: &Value, replicas: usize) {
    let rss = report["server_rss_bytes"]
        .as_u64()
        .expect("server_rss_bytes");
    let peak = report["server_peak_rss_bytes"]
        .as_u64()
        .expect("server_peak_rss_bytes");
    assert!(rss > 1024 * 1024 && peak >= rss, "{report:#}");
    assert_eq!(
        report["server_memory"].as_array().unwrap().len(),
        replicas,
        "{report:#}"
    );
    assert!(markdown.contains("| server RSS at the end |"), "{markdown}");
}

#[test]
fn closed_loop_against_a_fresh_server() {
    let (markdown, report) = run_ok(&[
        "--requests",
        "500",
        "--in-flight",
        "32",
        "--hot",
        "10",
        "--cache-accounts",
        "20",
    ]);
    check_report(&markdown, &report, 500);
    check_memory(&markdown, &report, 1);
    assert_eq!(report["mode"], "closed");
    assert_eq!(report["accounts"], 50);
    assert_eq!(report["hot_accounts"], 10);
    assert_eq!(report["cache_accounts"], 20);
    assert_eq!(report["connections"], 2);
    assert_eq!(report["in_flight"], 32);
    assert_eq!(report["presigned"], 500);
    assert!(markdown.contains("50 accounts (hot 10)"), "{markdown}");
    assert!(
        markdown.contains("| account cache (per replica) | 20 accounts |"),
        "{markdown}"
    );
}

#[test]
fn open_loop_against_a_fresh_server() {
    let (markdown, report) = run_ok(&["--rate", "1000", "--duration", "500ms"]);
    check_report(&markdown, &report, 500);
    check_memory(&markdown, &report, 1);
    assert_eq!(report["mode"], "open");
    assert_eq!(report["rate"], 1000.0);
    assert_eq!(report["hot_accounts"], 50, "every account by default");
    assert_eq!(report["cache_accounts"], 100_000, "the server's default");
    assert!(markdown.contains("open loop at 1,000 req/s"), "{markdown}");
    // Half a second of schedule, plus the answers to the last requests.
    let elapsed = report["elapsed_seconds"].as_f64().unwrap();
    assert!((0.45..30.0).contains(&elapsed), "{report:#}");
}

/// Three replicas from `init-cluster`; the load goes to whichever was elected.
#[test]
fn closed_loop_against_a_fresh_cluster_of_three() {
    let (markdown, report) = run_ok(&["--nodes", "3", "--requests", "300", "--in-flight", "16"]);
    check_report(&markdown, &report, 300);
    check_memory(&markdown, &report, 3);
    assert_eq!(report["nodes"], 3);
    assert!(markdown.contains("3 nodes"), "{markdown}");
}

#[test]
fn refusals_are_clear() {
    let check = |args: &[&str], expected: &str| {
        let output = bench(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    check(
        &["--start-server", "--nodes", "10"],
        "--nodes must be between 1 and 9",
    );
    check(
        &[
            "--start-server",
            "--server-bin",
            "/nonexistent/tally-server",
        ],
        "cargo build --release --bin tally-server",
    );
    check(&[], "--profile");
    check(
        &["--start-server", "--accounts", "100", "--hot", "101"],
        "--hot must be between 2 and --accounts (100)",
    );
    check(
        &["--profile", "p.toml", "--cache-accounts", "10"],
        "--cache-accounts only applies with --start-server",
    );
}
