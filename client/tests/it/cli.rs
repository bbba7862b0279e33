//! The `tally` binary against replicas that never answer: `--total-timeout-ms` bounds the
//! whole command, connects, retries and backoff included.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A self-signed certificate to stand in for the operator CA. No handshake ever gets far
/// enough to use it; it only has to parse.
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBcTCCASOgAwIBAgIUYZNrgCQgj0/6JunjKTZyUn1HSHswBQYDK2VwMC0xKzAp
BgNVBAMMInRhbGx5IHRlc3QgQ0EgKG5ldmVyIHVzZWQgdG8gc2lnbikwIBcNMjYx
MjAzMTAxOTE3WhgPMjEyNjExMDkxMDE5MTdaMC0xKzApBgNVBAMMInRhbGx5IHRl
c3QgQ0EgKG5ldmVyIHVzZWQgdG8gc2lnbikwKjAFBgMrZXADIQDetbwWVssEq8PV
0KTGWNotg911XaGHYR/qIlbjuqrZ9aNTMFEwHQYDVR0OBBYEFL2Kn2sW6s0mioHF
5tqFsdoeO6HtMB8GA1UdIwQYMBaAFL2Kn2sW6s0mioHF5tqFsdoeO6HtMA8GA1Ud
EwEB/wQFMAMBAf8wBQYDK2VwA0EA1ple86NlkGpUUcIfyN2O6qhZhaGTKxCwj/Sa
qR5ZaQ5MA+3z427z5tCMf2901p+w7wx4sYatnZ6nRcEKyijrDQ==
-----END CERTIFICATE-----
";

/// A public key that is a valid point (RFC 8032 test 1).
const SOMEONE: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

/// Accepts TCP connections and never sends a byte: the TLS handshake hangs (a black hole).
fn black_hole() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    address
}

/// An address where nothing listens (connections are refused at once).
fn refused() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn write_profile(dir: &Path, addresses: &[String]) -> std::path::PathBuf {
    std::fs::write(dir.join("ca.pem"), CA_PEM).unwrap();
    let mut text = format!(
        "chain_id = \"{}\"\noperator_public_key = \"{SOMEONE}\"\nca_cert = \"ca.pem\"\n",
        "ab".repeat(32)
    );
    for (i, address) in addresses.iter().enumerate() {
        text += &format!("\n[[replicas]]\nid = {}\naddress = \"{address}\"\n", i + 1);
    }
    let path = dir.join("profile.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn tally(args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env_remove("TALLY_TIMEOUT_MS")
        .env_remove("TALLY_TOTAL_TIMEOUT_MS")
        .output()
        .unwrap();
    (output, started.elapsed())
}

#[test]
fn total_timeout_bounds_every_command_against_black_holes() {
    let dir = tempfile::tempdir().unwrap();
    let profile = write_profile(dir.path(), &[black_hole(), refused(), black_hole()]);
    let profile = profile.to_str().unwrap();
    let key = dir.path().join("alice.key");
    let (out, _) = tally(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");

    let budget_ms = 1_500u64;
    let budget = budget_ms.to_string();
    let commands: [&[&str]; 5] = [
        &["balance", SOMEONE],
        &["info"],
        &[
            "transfer",
            "--key",
            key.to_str().unwrap(),
            "--to",
            SOMEONE,
            "--amount",
            "1",
        ],
        &["headers"],
        &["status"],
    ];
    for command in commands {
        // --timeout-ms stays at its default (30 s): the total budget must win over it.
        let mut args = vec![
            "--profile",
            profile,
            "--json",
            "--total-timeout-ms",
            &budget,
        ];
        args.extend_from_slice(command);
        let (out, elapsed) = tally(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Process start and exit are not in the budget; give them a second.
        assert!(
            elapsed < Duration::from_millis(budget_ms + 1_000),
            "{command:?} took {elapsed:?} for a {budget_ms} ms budget: {stdout}"
        );
        if command == ["status"] {
            // Status reports each replica, reachable or not, and succeeds.
            assert!(out.status.success(), "{command:?}: {out:?}");
            assert_eq!(
                stdout.matches("\"reachable\": false").count(),
                3,
                "{stdout}"
            );
            continue;
        }
        assert!(!out.status.success(), "{command:?}: {out:?}");
        assert!(
            elapsed >= Duration::from_millis(budget_ms - 100),
            "{command:?} gave up early, after {elapsed:?}: {stdout}"
        );
        let body: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let code = body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let expected = if command[0] == "transfer" {
            ["indeterminate", "gave_up"].as_slice()
        } else {
            ["gave_up"].as_slice()
        };
        assert!(expected.contains(&code.as_str()), "{command:?}: {stdout}");
    }
}

/// `tally cluster …`: a profile without `admin_key` is refused before anything is sent, naming
/// the key; with one, the commands honour `--total-timeout-ms` like every other.
#[test]
fn cluster_commands_need_an_admin_key_and_honour_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let profile = write_profile(dir.path(), &[black_hole(), refused()]);
    let profile = profile.to_str().unwrap();
    let (out, elapsed) = tally(&["--profile", profile, "cluster", "members"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("admin_key"), "{stderr}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let (out, _) = tally(&[
        "--profile",
        profile,
        "--json",
        "cluster",
        "remove",
        "--id",
        "2",
    ]);
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["error"]["code"], "invalid_argument", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("admin_key"),
        "{body}"
    );

    let key = dir.path().join("admin.key");
    let (out, _) = tally(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let mut text = std::fs::read_to_string(profile).unwrap();
    text = text.replacen("ca_cert", "admin_key = \"admin.key\"\nca_cert", 1);
    std::fs::write(profile, text).unwrap();
    let budget_ms = 1_000u64;
    let budget = budget_ms.to_string();
    for command in [&["members"][..], &["remove", "--id", "2"]] {
        let mut args = vec![
            "--profile",
            profile,
            "--json",
            "--total-timeout-ms",
            &budget,
            "cluster",
        ];
        args.extend_from_slice(command);
        let (out, elapsed) = tally(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{command:?}: {out:?}");
        assert!(
            elapsed < Duration::from_millis(budget_ms + 1_000),
            "{command:?} took {elapsed:?}: {stdout}"
        );
        let body: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        // No handshake completes, so nothing was sent: "gave up" even for a change.
        assert_eq!(body["error"]["code"], "gave_up", "{command:?}: {stdout}");
    }
}
