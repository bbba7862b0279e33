//! The operator's view: `/metrics` counts exactly what clients saw, `/health` and `/ready`
//! answer, `--check-config` names every problem, and the Grafana dashboard only uses metrics the
//! server exports.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tally_client::{
    build_request, build_request_hinted, generate_key, public_key, Error as ClientError,
};
use tally_server::metrics::Metrics;
use tally_wire::{Op, ReadMode};

use crate::harness::Operator;

/// One plain HTTP/1.1 request; returns the status code and the body.
fn http(addr: &str, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connecting to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("reading the response");
    let text = String::from_utf8(out).expect("utf-8 response");
    let (headers, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = headers
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line in {headers:?}"));
    (status, body.to_string())
}

pub fn get(addr: &str, path: &str) -> (u16, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: tally\r\n\r\n"))
}

/// Parses the text exposition format into `name{labels}` → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("`series value`");
            (series.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

pub fn scrape(addr: &str) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    parse_metrics(&body)
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("{series} is exported"))
}

#[test]
fn metrics_count_exactly_what_clients_saw() {
    let operator = Operator::new(|c| c.batch.batch_window_ms = 20);
    let chain = operator.profile.chain_id_bytes().unwrap();
    let deposit_key = operator.profile.load_deposit_key().unwrap();
    let alice = generate_key();
    let stranger = generate_key(); // never funded
    let bob = public_key(&generate_key());
    let server = operator.start();

    let (status, body) = get(&server.metrics_addr, "/health");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert_eq!(get(&server.metrics_addr, "/nope").0, 404);
    assert_eq!(
        http(&server.metrics_addr, "POST /metrics HTTP/1.1\r\n\r\n").0,
        405
    );
    let oversize = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(http(&server.metrics_addr, &oversize).0, 431);
    let rt = crate::harness::runtime();
    let (confirmed, replayed, rejected, height) = rt.block_on(async {
        let client = std::sync::Arc::new(server.client().await);
        // A single node is a raft group of one: it elects itself and leads.
        let before = scrape(&server.metrics_addr);
        assert_eq!(value(&before, "tally_raft_role"), 2.0, "single node leads");
        assert_eq!(value(&before, "tally_raft_leader_id"), 1.0);
        assert_eq!(value(&before, "tally_ready"), 1.0);
        assert_eq!(get(&server.metrics_addr, "/ready").0, 200);
        let dep = build_request(
            &deposit_key,
            chain,
            Op::Deposit,
            1,
            public_key(&alice),
            10_000,
        );
        client.submit(dep).await.expect("deposit");

        // 200 transfers in flight at once: 150 good, 20 from an unknown account, 20 beyond
        // the balance, 10 with a broken signature.
        let mut tasks = Vec::new();
        for i in 0..200u128 {
            let req = match i {
                0..150 => build_request(&alice, chain, Op::Transfer, 100 + i, bob, 7),
                150..170 => build_request(&stranger, chain, Op::Transfer, i, bob, 7),
                170..190 => build_request(&alice, chain, Op::Transfer, 100 + i, bob, 1_000_000),
                _ => {
                    let mut r = build_request(&alice, chain, Op::Transfer, 100 + i, bob, 7);
                    r.signature[0] ^= 1;
                    r
                }
            };
            let client = std::sync::Arc::clone(&client);
            tasks.push(tokio::spawn(async move { client.submit(req).await }));
        }
        // The first transfer again: answered with its original confirmation.
        let again = build_request(&alice, chain, Op::Transfer, 100, bob, 7);
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        results.push(client.submit(again).await);

        let mut confirmed = 1; // the deposit
        let mut replayed = 0;
        let mut rejected: BTreeMap<&'static str, u64> = BTreeMap::new();
        for r in results {
            match r {
                Ok(c) if c.replayed => replayed += 1,
                Ok(_) => confirmed += 1,
                Err(ClientError::Rejected(e)) => *rejected.entry(e.code.name()).or_default() += 1,
                Err(e) => panic!("unexpected client error: {e}"),
            }
        }
        let b = client.balance(bob, ReadMode::Linearizable).await.unwrap();
        (confirmed, replayed, rejected, b.height)
    });
    assert_eq!((confirmed, replayed), (151, 1));
    assert_eq!(
        rejected,
        BTreeMap::from([
            ("bad_signature", 10),
            ("insufficient_funds", 20),
            ("unknown_account", 20)
        ])
    );

    let m = scrape(&server.metrics_addr);
    assert_eq!(
        value(&m, "tally_requests_confirmed_total"),
        confirmed as f64
    );
    assert_eq!(value(&m, "tally_requests_replayed_total"), replayed as f64);
    for code in tally_wire::ErrorCode::ALL {
        let series = format!("tally_requests_rejected_total{{code=\"{}\"}}", code.name());
        let expected = rejected.get(code.name()).copied().unwrap_or(0);
        assert_eq!(value(&m, &series), expected as f64, "{series}");
    }
    assert_eq!(
        value(&m, "tally_confirmation_seconds_count"),
        confirmed as f64
    );
    assert!(value(&m, "tally_confirmation_seconds_sum") > 0.0);
    let batches: f64 = ["window", "full", "shutdown", "idle"]
        .iter()
        .map(|r| value(&m, &format!("tally_batches_total{{reason=\"{r}\"}}")))
        .sum();
    assert!(batches >= 2.0, "the deposit and the transfers: {batches}");
    assert_eq!(value(&m, "tally_batch_requests_count"), batches);
    // Every request the master accepted went into exactly one batch.
    assert_eq!(value(&m, "tally_batch_requests_sum"), confirmed as f64);
    assert_eq!(value(&m, "tally_applied_height"), height as f64);
    // Raft's index counts its own empty entries (one per election) besides the batches.
    assert!(value(&m, "tally_raft_applied_index") > height as f64);
    assert_eq!(
        value(&m, "tally_raft_applied_index"),
        value(&m, "tally_raft_commit_index")
    );
    assert_eq!(
        value(&m, "tally_apply_prepare_seconds_count"),
        height as f64
    );
    assert_eq!(
        value(&m, "tally_durable_write_seconds_count"),
        height as f64
    );
    assert_eq!(
        value(&m, "tally_stage_seconds_count{stage=\"storage\"}"),
        height as f64
    );
    // Every submitted request passed the stateless stage once.
    assert_eq!(
        value(&m, "tally_stage_seconds_count{stage=\"stateless\"}"),
        (1 + 200 + 1) as f64
    );
    assert!(value(&m, "tally_account_cache_misses_total") >= 1.0);
    assert_eq!(value(&m, "tally_connections_refused_total"), 0.0);
    // The client is gone; the server notices the close asynchronously.
    let mut open = value(&m, "tally_connections_open");
    for _ in 0..100 {
        if open == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        open = value(&scrape(&server.metrics_addr), "tally_connections_open");
    }
    assert_eq!(open, 0.0, "no connection is left open");
    drop(server);
}

/// `SubmitHinted` over real connections: hinted signatures are checked in batch equations
/// (`tally_signature_checks_total{path="batch"}`), every answer is the one a plain `Submit`
/// would get, and a connection that sent a bad hinted signature has its hints ignored from then
/// on, so it cannot spoil the batches other connections' requests share.
#[test]
fn hinted_submits_are_batch_verified_with_the_same_answers() {
    let operator = Operator::new(|c| {
        c.batch.batch_window_ms = 20;
        c.workers.stateless = 1; // one worker: what is queued is checked together
    });
    let chain = operator.profile.chain_id_bytes().unwrap();
    let deposit_key = operator.profile.load_deposit_key().unwrap();
    let alice = generate_key();
    let bob = public_key(&generate_key());
    let server = operator.start();
    let rt = crate::harness::runtime();
    let (outcomes, balance, before) = rt.block_on(async {
        let good = std::sync::Arc::new(server.client().await);
        let bad = std::sync::Arc::new(server.client().await);
        let (dep, hint) = build_request_hinted(
            &deposit_key,
            chain,
            Op::Deposit,
            1,
            public_key(&alice),
            100_000,
        );
        good.submit_hinted(dep, hint).await.expect("deposit");
        // One bad hinted signature, alone: refused, and the `bad` connection loses its hints.
        let (mut first, hint) = build_request_hinted(&alice, chain, Op::Transfer, 2, bob, 3);
        first.signature[40] ^= 1;
        match bad.submit_hinted(first, hint).await {
            Err(ClientError::Rejected(e)) => {
                assert_eq!(e.code, tally_wire::ErrorCode::BadSignature)
            }
            other => panic!("a bad signature: {other:?}"),
        }
        let before = scrape(&server.metrics_addr);
        let (_, foreign_hint) = build_request_hinted(&alice, chain, Op::Transfer, 3, bob, 1);
        // All signed first, then all sent at once: the server finds them queued together.
        let mut sends = Vec::new();
        for i in 0..400u128 {
            let (mut req, mut hint) =
                build_request_hinted(&alice, chain, Op::Transfer, 10 + i, bob, 3);
            let (client, expect_ok) = match i % 10 {
                // From the connection that lost its hints: s broken (R still matches its
                // hint), R broken, and good ones.
                0 => {
                    req.signature[40] ^= 1;
                    (&bad, false)
                }
                1 => {
                    req.signature[3] ^= 1;
                    (&bad, false)
                }
                2 | 3 => (&bad, true),
                // A good signature with a wrong hint: checked strictly, confirmed.
                4 => {
                    hint = foreign_hint;
                    (&good, true)
                }
                _ => (&good, true),
            };
            sends.push((std::sync::Arc::clone(client), expect_ok, req, hint));
        }
        let mut tasks = Vec::new();
        for (client, expect_ok, req, hint) in sends {
            tasks.push(tokio::spawn(async move {
                (expect_ok, client.submit_hinted(req, hint).await)
            }));
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        let b = good.balance(bob, ReadMode::Linearizable).await.unwrap();
        (outcomes, b.balance, before)
    });
    let mut confirmed = 0;
    for (i, (expect_ok, outcome)) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(c) => {
                assert!(expect_ok, "request {i} was confirmed");
                assert!(!c.replayed);
                confirmed += 1;
            }
            Err(ClientError::Rejected(e)) => {
                assert!(!expect_ok, "request {i} was refused: {e:?}");
                assert_eq!(e.code, tally_wire::ErrorCode::BadSignature, "request {i}");
            }
            Err(e) => panic!("request {i}: unexpected client error: {e}"),
        }
    }
    assert_eq!(confirmed, 320);
    assert_eq!(balance, 3 * 320);
    let m = scrape(&server.metrics_addr);
    let delta = |series: &str| value(&m, series) - value(&before, series);
    let batch = delta("tally_signature_checks_total{path=\"batch\"}");
    let single = delta("tally_signature_checks_total{path=\"single\"}");
    // Every signature is checked exactly once, one way or the other.
    assert_eq!(batch + single, 400.0);
    // Only the `good` connection's requests with matching hints can take the batch path ...
    assert!(
        batch > 0.0,
        "no batch equation accepted anything ({single} single)"
    );
    assert!(
        batch <= 200.0,
        "{batch} batched: more than the good connection's requests with matching hints"
    );
    // ... and with the `bad` connection's hints ignored, no batch held a bad signature.
    assert_eq!(
        delta("tally_signature_batches_failed_total"),
        0.0,
        "{batch} batched, {single} single"
    );
    // With no failed equation, the equations tried held exactly the batched signatures.
    assert_eq!(delta("tally_signature_batch_size_sum"), batch);
    assert!(delta("tally_signature_batch_size_count") >= 1.0);
}

#[test]
fn check_config_names_every_problem() {
    let operator = Operator::new(|c| {
        c.batch.batch_window_ms = 0;
        c.workers.stateless = 0;
        c.limits.connections_max = 0;
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally-server"))
        .arg("--check-config")
        .arg(&operator.config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    for key in [
        "batch.batch_window_ms = 0",
        "workers.stateless = 0",
        "limits.connections_max = 0",
    ] {
        assert!(text.contains(key), "{key} is named in:\n{text}");
    }

    let good = Operator::new(|_| {});
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally-server"))
        .arg("--check-config")
        .arg(&good.config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));

    // A bare file name: its relative paths (`data_dir = "."`) resolve against the working
    // directory, not against an empty path.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally-server"))
        .current_dir(good.data_dir())
        .args(["--check-config", "config.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Every `tally_*` name in a PromQL expression of the dashboard, e.g. `tally_stage_seconds_bucket`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tally_") {
        let before_ok = rest[..at]
            .chars()
            .last()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        if before_ok {
            names.push(name);
        }
    }
    names
}

fn expressions(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    (_, v) => expressions(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_uses_only_exported_metrics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/grafana/tally.json");
    let text = std::fs::read_to_string(path).expect("config/grafana/tally.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(dashboard["title"].is_string());

    let mut exported = BTreeSet::new();
    for family in Metrics::new().registry.gather() {
        let name = family.name().to_string();
        if family.get_field_type() == prometheus::proto::MetricType::HISTOGRAM {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        }
        exported.insert(name);
    }

    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    let mut used = BTreeSet::new();
    for e in &exprs {
        used.extend(metric_names(e));
    }
    assert!(used.len() >= 15, "the dashboard uses the metrics: {used:?}");
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard uses metrics the server does not export: {unknown:?}"
    );

    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: Vec<_> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "panel ids are unique"
    );
}
