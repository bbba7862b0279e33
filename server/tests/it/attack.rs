//! Attacks against a live `tally-server` over real TLS on loopback (issue 17): each runs while a
//! well-behaved client keeps transferring, and checks that the good client is served, the
//! server stays up, and its memory (VmRSS) and descriptors stay within the configured budgets
//! plus a fixed base. Hostile connections come from 127.0.0.2 and up (loopback is a /8), the
//! good client from 127.0.0.1. Budgets are small so that every attack reaches them in seconds.
//!
//! Each test prints `attack-figures:` lines (RSS, descriptors, good-client throughput and p99
//! before and during the attack); SECURITY.md quotes them from a release run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tally_client::{build_request, generate_key, public_key, Client, Profile};
use tally_config::Config;
use tally_wire::{decode_frame, Decoded, ErrorCode, Message, Op};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::harness::{lines, runtime, wait_started, Operator, Server};

/// Per-connection and server-wide reply budgets in these tests.
const REPLY_BYTES_PER_CONNECTION: u64 = 1 << 20;
const REPLY_BYTES_TOTAL: u64 = 8 << 20;
/// What RSS may grow by beyond the reply budgets during an attack: TLS and socket buffers of
/// the hostile connections, tokio tasks, allocator slack. Without the budgets one pipeliner
/// alone grows it by hundreds of MiB.
const RSS_SLACK_BYTES: u64 = 64 << 20;
/// Descriptors the server may open beyond its connection limits during an attack (connections
/// being closed, LevelDB files).
const FD_SLACK: usize = 32;

fn tight(c: &mut Config) {
    c.batch.batch_window_ms = 2;
    c.limits.reply_bytes_per_connection_max = REPLY_BYTES_PER_CONNECTION;
    c.limits.reply_bytes_total_max = REPLY_BYTES_TOTAL;
    c.limits.handshake_timeout_ms = 1000;
    c.limits.first_request_timeout_ms = 1000;
    c.limits.frame_timeout_ms = 1000;
    c.limits.write_timeout_ms = 2000;
}

fn source(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server alive");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("server alive")
        .count()
}

fn alive(server: &mut Server) -> bool {
    server.child.try_wait().unwrap().is_none()
}

/// Raises this test process's own soft descriptor limit (the attacks open hundreds).
fn raise_own_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
}

/// A TLS connector trusting the profile's CA, like the client library's.
fn connector(profile: &Profile) -> TlsConnector {
    let pem = std::fs::read(&profile.ca_cert).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tcp_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// A TLS connection from `from`; `None` when the server refused it (closed it during the
/// handshake) or it did not complete within 5 s.
async fn tls_from(
    from: IpAddr,
    to: SocketAddr,
    tls: &TlsConnector,
    profile: &Profile,
) -> Option<TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(profile.server_name.clone()).unwrap();
    let connect = async {
        let tcp = tcp_from(from, to).await.ok()?;
        tls.connect(name, tcp).await.ok()
    };
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .ok()
        .flatten()
}

/// Whether the server closed `s` within `within` (reading and discarding what it sends).
async fn closed_within<S: AsyncReadExt + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let reading = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, reading).await.is_ok()
}

/// Spawns `tally-server` like the harness does, optionally under a descriptor limit (soft and
/// hard) set by `prlimit` before it execs the server, with its stderr captured line by line.
fn spawn_server(
    config: &Path,
    profile: &Profile,
    nofile: Option<u64>,
) -> (Server, mpsc::Receiver<String>) {
    let bin = env!("CARGO_BIN_EXE_tally-server");
    // prlimit sets the limit and then execs the server: the child's pid is the server's.
    let mut cmd = match nofile {
        Some(n) => {
            let mut cmd = Command::new("prlimit");
            cmd.arg(format!("--nofile={n}:{n}")).arg("--").arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    cmd.arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning tally-server");
    let stdout = lines(Box::new(child.stdout.take().unwrap()));
    let stderr = lines(Box::new(child.stderr.take().unwrap()));
    let (addr, metrics_addr) = wait_started(&stdout);
    let mut profile = profile.clone();
    profile.replicas[0].address = addr.clone();
    let server = Server {
        child,
        profile,
        addr,
        metrics_addr,
        _stdout: stdout,
    };
    (server, stderr)
}

/// A well-behaved client: one connection from 127.0.0.1, one transfer at a time, each
/// confirmation's latency recorded; on an error it waits 50 ms and goes on (reconnecting when
/// the connection is gone).
struct GoodClient {
    /// (when confirmed, latency)
    confirmed: Arc<Mutex<Vec<(Instant, Duration)>>>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl GoodClient {
    async fn start(profile: &Profile) -> GoodClient {
        let chain = profile.chain_id_bytes().unwrap();
        let deposit_key = profile.load_deposit_key().unwrap();
        let alice = generate_key();
        let bob = public_key(&generate_key());
        let client = Client::connect(profile)
            .await
            .expect("good client connects");
        crate::harness::wait_writable(&client).await;
        // Each good client deposits under a fresh id (several may run against one ledger).
        let id = u128::from(rand::random::<u64>());
        let dep = build_request(
            &deposit_key,
            chain,
            Op::Deposit,
            id,
            public_key(&alice),
            1 << 40,
        );
        client.submit(dep).await.expect("deposit");
        let confirmed: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
        let (errors, stop): (Arc<AtomicU64>, Arc<AtomicBool>) = (Arc::default(), Arc::default());
        let (c, e, s, profile) = (
            Arc::clone(&confirmed),
            Arc::clone(&errors),
            Arc::clone(&stop),
            profile.clone(),
        );
        let task = tokio::spawn(async move {
            let mut client = client.with_timeout(Duration::from_secs(5));
            let mut id = 1u128;
            while !s.load(Ordering::SeqCst) {
                let t = build_request(&alice, chain, Op::Transfer, id, bob, 1);
                let sent = Instant::now();
                match client.submit(t).await {
                    Ok(_) => {
                        c.lock().unwrap().push((Instant::now(), sent.elapsed()));
                        id += 1;
                    }
                    Err(_) => {
                        e.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if !client.is_connected() {
                            if let Ok(fresh) = Client::connect(&profile).await {
                                client = fresh.with_timeout(Duration::from_secs(5));
                            }
                        }
                    }
                }
            }
        });
        GoodClient {
            confirmed,
            errors,
            stop,
            task,
        }
    }

    /// Transfers confirmed in `[from, to)`, per second, and their p99 latency.
    fn window(&self, from: Instant, to: Instant) -> (f64, Duration, usize) {
        let confirmed = self.confirmed.lock().unwrap();
        let mut lat: Vec<Duration> = confirmed
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, l)| *l)
            .collect();
        lat.sort();
        let p99 = lat
            .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default();
        let per_s = lat.len() as f64 / (to - from).as_secs_f64();
        (per_s, p99, lat.len())
    }

    /// The longest time in `[from, to)` without a confirmation.
    fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let confirmed = self.confirmed.lock().unwrap();
        let mut last = from;
        let mut gap = Duration::ZERO;
        for (at, _) in confirmed.iter().filter(|(at, _)| *at >= from && *at < to) {
            gap = gap.max(*at - last);
            last = *at;
        }
        gap.max(to - last)
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        self.errors.load(Ordering::SeqCst)
    }
}

/// Samples the server's RSS and descriptors every 50 ms until `stop`; returns the peaks.
fn sample_peaks(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, usize)> {
    std::thread::spawn(move || {
        let (mut rss, mut fd) = (0, 0);
        while !stop.load(Ordering::SeqCst) {
            rss = rss.max(rss_bytes(pid));
            fd = fd.max(fds(pid));
            std::thread::sleep(Duration::from_millis(50));
        }
        (rss, fd)
    })
}

/// Before/during figures of one attack, checked against the budgets and printed.
struct Figures {
    name: &'static str,
    rss_before: u64,
    fds_before: usize,
    rss_peak: u64,
    fds_peak: usize,
    before: (f64, Duration, usize),
    during: (f64, Duration, usize),
}

impl Figures {
    fn print(&self) {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "attack-figures: {}: rss {:.0} MiB -> peak {:.0} MiB; fds {} -> peak {}; good client \
             {:.0}/s p99 {:.1} ms before, {:.0}/s p99 {:.1} ms during",
            self.name,
            mib(self.rss_before),
            mib(self.rss_peak),
            self.fds_before,
            self.fds_peak,
            self.before.0,
            self.before.1.as_secs_f64() * 1e3,
            self.during.0,
            self.during.1.as_secs_f64() * 1e3,
        );
    }
}

/// Runs `attack` for `length` against `server` while a good client transfers; returns the
/// figures, having checked that the server stayed up and the good client was served.
async fn under_attack<F>(
    server: &mut Server,
    name: &'static str,
    length: Duration,
    attack: F,
) -> Figures
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let pid = server.child.id();
    let good = GoodClient::start(&server.profile).await;
    let calm = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_before, fds_before) = (rss_bytes(pid), fds(pid));
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_peaks(pid, stop.clone());
    let attacking = tokio::spawn(attack);
    tokio::time::sleep(length).await;
    let end = Instant::now();
    stop.store(true, Ordering::SeqCst);
    let (rss_peak, fds_peak) = sampler.join().unwrap();
    attacking.abort();
    assert!(alive(server), "{name}: the server stayed up");
    let figures = Figures {
        name,
        rss_before,
        fds_before,
        rss_peak,
        fds_peak,
        before: good.window(calm, start),
        during: good.window(start, end),
    };
    let gap = good.longest_gap(start, end);
    let errors = good.stop().await;
    figures.print();
    assert!(
        figures.during.2 >= 10,
        "{name}: the good client was served during the attack ({} transfers, {errors} errors)",
        figures.during.2
    );
    assert!(
        gap < Duration::from_secs(3),
        "{name}: the good client waited {gap:?}"
    );
    figures
}

/// The reference for the figures: the same measurement with no attack at all (the good client
/// must be served, and the server grow by no more than the slack).
#[test]
fn no_attack_baseline() {
    let rt = runtime();
    let operator = Operator::new(tight);
    let mut server = operator.start();
    rt.block_on(async {
        let figures = under_attack(&mut server, "none", Duration::from_secs(6), async {}).await;
        let growth = figures.rss_peak.saturating_sub(figures.rss_before);
        assert!(
            growth <= RSS_SLACK_BYTES,
            "RSS grew by {growth} bytes with no attack"
        );
    });
}

/// Writes `GetHeaders(1, 1024)` frames as fast as the server takes them and never reads.
async fn pipeline_headers(mut s: TlsStream<TcpStream>) {
    let mut chunk = Vec::new();
    for i in 0..256u64 {
        chunk.extend_from_slice(
            &Message::GetHeaders {
                from_height: 1,
                limit: 1024,
            }
            .encode_frame(i + 1),
        );
    }
    while s.write_all(&chunk).await.is_ok() {}
    // Closed by the server (write_timeout_ms): hold the socket so only the server's close
    // frees its descriptor.
    std::future::pending::<()>().await;
}

/// Twelve never-reading pipeliners from three addresses: RSS grows by no more than the
/// server's reply budget (each connection is held to its own), the good client is served,
/// and the pipeliners are closed once they have not read for `write_timeout_ms`.
#[test]
fn never_reading_pipeliners_are_held_to_the_reply_budgets() {
    let rt = runtime();
    let operator = Operator::new(tight);
    let mut server = operator.start();
    let (addr, profile) = (server.addr.parse().unwrap(), server.profile.clone());
    rt.block_on(async {
        // History first: a few hundred batches, so a header list is ~100 KiB.
        let history = GoodClient::start(&profile).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        history.stop().await;
        let tls = connector(&profile);
        let attack = async move {
            // All connected first, then all pipelining: each is closed write_timeout_ms after
            // it stops reading, and all twelve are open at once.
            let mut connected = Vec::new();
            for i in 0..12u8 {
                let s = tls_from(source(2 + i % 3), addr, &tls, &profile).await;
                connected.push(s.unwrap());
            }
            let tasks: Vec<_> = connected
                .into_iter()
                .map(|s| tokio::spawn(pipeline_headers(s)))
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        };
        let figures = under_attack(&mut server, "pipeliner", Duration::from_secs(6), attack).await;
        let growth = figures.rss_peak.saturating_sub(figures.rss_before);
        assert!(
            growth <= REPLY_BYTES_TOTAL + RSS_SLACK_BYTES,
            "RSS grew by {growth} bytes, over the reply budget {REPLY_BYTES_TOTAL} + slack"
        );
        assert!(
            figures.fds_peak + 2 >= figures.fds_before + 12,
            "the pipeliners were connected: {} descriptors at the peak, {} before",
            figures.fds_peak,
            figures.fds_before
        );
        // write_timeout_ms (2 s) has passed: the server closed every pipeliner.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = fds(server.child.id());
        assert!(
            now < figures.fds_before + 4,
            "pipeliners closed by the write deadline: {now} descriptors, {} before",
            figures.fds_before
        );
    });
}

/// The contract at the default limits: one connection that pipelines `GetHeaders` for 1,024
/// headers (over a ledger of more than 1,024 batches, so every reply is 263 KiB) and never
/// reads adds at most 256 MiB to RSS.
#[test]
fn one_never_reading_connection_at_the_default_limits_adds_at_most_256_mib() {
    let rt = runtime();
    let operator = Operator::new(|c| c.batch.batch_window_ms = 1);
    let mut server = operator.start();
    let (addr, profile) = (server.addr.parse().unwrap(), server.profile.clone());
    rt.block_on(async {
        // One batch per transfer: past 1,024 headers.
        let history = GoodClient::start(&profile).await;
        let start = Instant::now();
        while history.confirmed.lock().unwrap().len() < 1100 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "history took too long"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        history.stop().await;
        let tls = connector(&profile);
        let attack = async move {
            let s = tls_from(source(2), addr, &tls, &profile).await.unwrap();
            pipeline_headers(s).await;
        };
        let figures = under_attack(
            &mut server,
            "pipeliner-defaults",
            Duration::from_secs(6),
            attack,
        )
        .await;
        let growth = figures.rss_peak.saturating_sub(figures.rss_before);
        assert!(
            growth <= 256 << 20,
            "one never-reading connection added {growth} bytes of RSS"
        );
    });
}

/// Frame headers that announce 4 MiB payloads, 3 MiB of each sent, then nothing: while such a
/// frame arrives it holds server-budget bytes, so thirty-two of them hold at most
/// `reply_bytes_total_max` (the rest wait unread), where they would otherwise hold 96 MiB.
#[test]
fn large_partial_frames_are_held_to_the_server_budget() {
    let rt = runtime();
    let operator = Operator::new(|c| {
        tight(c);
        c.limits.frame_bytes_max = 4 << 20;
        c.limits.frame_timeout_ms = 8000;
    });
    let mut server = operator.start();
    let (addr, profile) = (server.addr.parse().unwrap(), server.profile.clone());
    rt.block_on(async {
        let tls = connector(&profile);
        let attack = async move {
            for i in 0..32u8 {
                let s = tls_from(source(2 + i % 4), addr, &tls, &profile)
                    .await
                    .unwrap();
                tokio::spawn(partial_frame(s, 4 << 20, 3 << 20));
            }
        };
        let figures = under_attack(
            &mut server,
            "large-partial-frames",
            Duration::from_secs(6),
            attack,
        )
        .await;
        let growth = figures.rss_peak.saturating_sub(figures.rss_before);
        assert!(
            growth <= REPLY_BYTES_TOTAL + RSS_SLACK_BYTES / 2,
            "RSS grew by {growth} bytes, over the server budget {REPLY_BYTES_TOTAL} + slack"
        );
    });
}

/// Sends a frame header announcing `payload` bytes and `sent` of them, then holds the socket.
async fn partial_frame(mut s: TlsStream<TcpStream>, payload: u32, sent: usize) {
    let header = tally_wire::FrameHeader {
        message_type: tally_wire::message_type::GET_STATUS,
        correlation_id: 1,
        payload_len: payload,
    };
    let _ = s.write_all(&header.encode()).await;
    let _ = s.write_all(&vec![0u8; sent]).await;
    std::future::pending::<()>().await;
}

/// The first frame of `message` with correlation id `id`.
fn frame(message: &Message, id: u64) -> Vec<u8> {
    message.encode_frame(id)
}

/// Reads one frame from `s` (within 5 s).
async fn read_one<S: AsyncReadExt + Unpin>(s: &mut S) -> Option<Message> {
    let mut buf = Vec::new();
    loop {
        if let Decoded::Complete(f, _) = decode_frame(&buf, 1 << 24).ok()? {
            return Message::decode(&f).ok();
        }
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf));
        match read.await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// Slowloris in its three forms, each from its own address, a byte every 300 ms: during the
/// TLS handshake, before the first request, and inside a frame after a request was served.
/// Every one is closed when its deadline (1 s) passes, not before and not much after, while
/// the good client is served.
#[test]
fn slowloris_is_closed_at_each_deadline() {
    let rt = runtime();
    let operator = Operator::new(tight);
    let mut server = operator.start();
    let (addr, profile) = (server.addr.parse().unwrap(), server.profile.clone());
    rt.block_on(async {
        let tls = connector(&profile);
        let (tx, rx) = std::sync::mpsc::channel();
        let attack = async move {
            let mut tasks = Vec::new();
            for i in 0..4u8 {
                let (tls, profile, tx) = (tls.clone(), profile.clone(), tx.clone());
                tasks.push(tokio::spawn(async move {
                    let a = handshake_drip(source(2 + i), addr).await;
                    let b = silent_after_handshake(source(10 + i), addr, &tls, &profile).await;
                    let c = frame_drip(source(20 + i), addr, &tls, &profile).await;
                    tx.send((a, b, c)).unwrap();
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        };
        let figures = under_attack(&mut server, "slowloris", Duration::from_secs(6), attack).await;
        let growth = figures.rss_peak.saturating_sub(figures.rss_before);
        assert!(growth <= RSS_SLACK_BYTES, "RSS grew by {growth} bytes");
        assert!(figures.fds_peak <= figures.fds_before + 12 + FD_SLACK);
        let outcomes: Vec<_> = rx.try_iter().collect();
        assert_eq!(outcomes.len(), 4, "every slowloris finished: {outcomes:?}");
        for (handshake, first, frame) in outcomes {
            for (what, took) in [
                ("handshake", handshake),
                ("first request", first),
                ("frame", frame),
            ] {
                let took = took.unwrap_or_else(|| panic!("{what} slowloris was never closed"));
                assert!(
                    took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
                    "{what} slowloris closed after {took:?}, deadline 1 s"
                );
            }
        }
    });
    // Each close is counted by its deadline.
    let m = crate::metrics::scrape(&server.metrics_addr);
    for deadline in ["handshake", "first_request", "frame"] {
        let series = format!("tally_connections_timed_out_total{{deadline=\"{deadline}\"}}");
        let closed = m.get(&series).copied().unwrap_or(0.0);
        assert!(closed >= 4.0, "{series} = {closed}");
    }
}

/// A byte of a TLS ClientHello every 300 ms; how long until the server closed.
async fn handshake_drip(from: IpAddr, to: SocketAddr) -> Option<Duration> {
    let mut tcp = tcp_from(from, to).await.ok()?;
    let hello = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    let start = Instant::now();
    for b in hello.iter().cycle().take(20) {
        if tcp.write_all(&[*b]).await.is_err() {
            return Some(start.elapsed());
        }
        if closed_within(&mut tcp, Duration::from_millis(300)).await {
            return Some(start.elapsed());
        }
    }
    None
}

/// A TLS connection that sends nothing; how long until the server closed it.
async fn silent_after_handshake(
    from: IpAddr,
    to: SocketAddr,
    tls: &TlsConnector,
    profile: &Profile,
) -> Option<Duration> {
    let mut s = tls_from(from, to, tls, profile).await?;
    let start = Instant::now();
    closed_within(&mut s, Duration::from_secs(6))
        .await
        .then(|| start.elapsed())
}

/// One request served, then a second frame a byte every 300 ms; how long from its first byte
/// until the server answered `malformed_frame` and closed.
async fn frame_drip(
    from: IpAddr,
    to: SocketAddr,
    tls: &TlsConnector,
    profile: &Profile,
) -> Option<Duration> {
    let mut s = tls_from(from, to, tls, profile).await?;
    s.write_all(&frame(&Message::GetStatus, 1)).await.ok()?;
    assert!(matches!(read_one(&mut s).await, Some(Message::Status(_))));
    let start = Instant::now();
    for b in frame(&Message::GetStatus, 2) {
        if s.write_all(&[b]).await.is_err() || s.flush().await.is_err() {
            break;
        }
        let answer = tokio::time::timeout(Duration::from_millis(300), read_one(&mut s)).await;
        if let Ok(answer) = answer {
            let took = start.elapsed();
            match answer {
                Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::MalformedFrame),
                other => panic!("expected malformed_frame, got {other:?}"),
            }
            return closed_within(&mut s, Duration::from_secs(1))
                .await
                .then_some(took);
        }
    }
    None
}

/// Opens TLS connections from `from` until `per_address` were kept or one was refused; returns
/// the ones kept (idle: they never send a request).
async fn open_until_refused(
    from: IpAddr,
    to: SocketAddr,
    tls: &TlsConnector,
    profile: &Profile,
    attempts: usize,
) -> Vec<TlsStream<TcpStream>> {
    let mut kept = Vec::new();
    for _ in 0..attempts {
        match tls_from(from, to, tls, profile).await {
            // A refused connection is closed right after accept: the handshake fails, or it
            // completes and the first read sees the close.
            Some(mut s) => {
                if closed_within(&mut s, Duration::from_millis(20)).await {
                    break;
                }
                kept.push(s);
            }
            None => break,
        }
    }
    kept
}

/// With the default limits, eight addresses each holding every idle TLS connection it can get
/// cannot keep a ninth address from being served within 5 s; each holds exactly
/// `connections_per_address_max`, and the server's descriptors stay under that sum plus a base.
#[test]
fn idle_connections_from_eight_addresses_leave_room_for_a_ninth() {
    raise_own_descriptor_limit();
    let rt = runtime();
    let operator = Operator::new(|c| c.batch.batch_window_ms = 2);
    let mut server = operator.start();
    let per_address = tally_config::LimitsConfig::default().connections_per_address_max as usize;
    let (addr, profile) = (server.addr.parse().unwrap(), server.profile.clone());
    let held: Arc<Mutex<Vec<usize>>> = Arc::default();
    let ninth: Arc<Mutex<Option<Duration>>> = Arc::default();
    rt.block_on(async {
        let tls = connector(&profile);
        let (h, n) = (held.clone(), ninth.clone());
        let attack = async move {
            for i in 0..8u8 {
                let (tls, profile, h) = (tls.clone(), profile.clone(), h.clone());
                tokio::spawn(async move {
                    let attempts = per_address + 16;
                    let kept =
                        open_until_refused(source(2 + i), addr, &tls, &profile, attempts).await;
                    h.lock().unwrap().push(kept.len());
                    // Held until the runtime ends.
                    std::future::pending::<()>().await;
                    drop(kept);
                });
            }
            while h.lock().unwrap().len() < 8 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Every address holds all it can get: a ninth connects and asks for the status.
            let start = Instant::now();
            let served = async {
                let s = tls_from(source(10), addr, &tls, &profile).await?;
                let client = Client::from_stream(s, addr.to_string());
                client.status().await.ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), served).await {
                *n.lock().unwrap() = Some(start.elapsed());
            }
        };
        let figures = under_attack(
            &mut server,
            "idle-8-addresses",
            Duration::from_secs(6),
            attack,
        )
        .await;
        let held = held.lock().unwrap().clone();
        assert_eq!(held.len(), 8, "every address finished opening: {held:?}");
        assert!(
            held.iter().all(|&n| n == per_address),
            "each address holds exactly its limit: {held:?}"
        );
        assert!(figures.fds_peak <= figures.fds_before + 8 * per_address + FD_SLACK);
        let ninth = ninth
            .lock()
            .unwrap()
            .expect("a ninth address is served within 5 s");
        println!("attack-figures: idle-8-addresses: a ninth address served in {ninth:?}");
    });
}

/// Handshakes from one address as fast as eight tasks can open them, for `length`: each
/// handshaken connection is dropped at once. Counts handshaken and refused connections.
async fn handshake_flood(
    from: IpAddr,
    to: SocketAddr,
    tls: TlsConnector,
    profile: Profile,
    counts: Arc<[AtomicUsize; 2]>,
) {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (tls, profile, counts) = (tls.clone(), profile.clone(), counts.clone());
            tokio::spawn(async move {
                loop {
                    let got = tls_from(from, to, &tls, &profile).await;
                    counts[usize::from(got.is_none())].fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    // Aborting the flood drops this future, not the tasks: hold until then, then stop them.
    struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.iter().for_each(|t| t.abort());
        }
    }
    let _tasks = AbortOnDrop(tasks);
    std::future::pending::<()>().await;
}

/// New connections from one address beyond `limits.handshakes_per_address_per_second` are
/// closed before their TLS handshake and counted, while other addresses are served; a second
/// after the flood the address may connect again.
#[test]
fn handshakes_beyond_the_per_address_rate_are_closed_before_tls() {
    const RATE: u32 = 4;
    let rt = runtime();
    let operator = Operator::new(|c| {
        tight(c);
        c.limits.handshakes_per_address_per_second = RATE;
    });
    let mut server = operator.start();
    let (addr, profile) = (server.addr.parse().unwrap(), server.profile.clone());
    let counts: Arc<[AtomicUsize; 2]> = Arc::default();
    let length = Duration::from_secs(4);
    rt.block_on(async {
        let tls = connector(&profile);
        let attack = handshake_flood(
            source(2),
            addr,
            tls.clone(),
            profile.clone(),
            counts.clone(),
        );
        let figures = under_attack(&mut server, "handshake-rate", length, attack).await;
        let (handshaken, refused) = (
            counts[0].load(Ordering::SeqCst),
            counts[1].load(Ordering::SeqCst),
        );
        println!(
            "attack-figures: handshake-rate: {handshaken} handshakes and {refused} refused from \
             one address in {length:?} at {RATE}/s; fds {} -> peak {}",
            figures.fds_before, figures.fds_peak
        );
        // The burst, then the rate (a little slack for the attack's start and end).
        let most = RATE as usize * (1 + length.as_secs() as usize + 1);
        assert!(
            handshaken <= most,
            "{handshaken} handshakes, at most {most}"
        );
        assert!(
            handshaken >= RATE as usize,
            "the burst is handshaken: {handshaken}"
        );
        assert!(
            refused > 10 * handshaken,
            "{refused} refused, {handshaken} handshaken"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let again = tls_from(source(2), addr, &tls, &profile).await;
        let client = Client::from_stream(
            again.expect("a second later it may connect"),
            addr.to_string(),
        );
        client.status().await.expect("and is served");
        let m = crate::metrics::scrape(&server.metrics_addr);
        let counted = m
            .get("tally_connections_rate_limited_total")
            .copied()
            .unwrap_or(0.0);
        assert!(
            counted >= refused as f64,
            "{counted} counted, {refused} refused"
        );
    });
}

/// Like [`spawn_server`], for replica `id` of a cluster (its profile lists only this replica).
fn spawn_replica(config: &Path, profile: &Profile, id: u64) -> (Server, mpsc::Receiver<String>) {
    let mut profile = profile.clone();
    profile.replicas.retain(|r| r.id == id);
    spawn_server(config, &profile, None)
}

/// `line` without its ANSI colour codes.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// Lines received so far that contain `needle`.
fn count_lines(lines: &mpsc::Receiver<String>, needle: &str) -> usize {
    lines.try_iter().filter(|l| l.contains(needle)).count()
}

/// Floods `to` from `from` for `length`: keeps `idle` plain TCP connections open (opening new
/// ones as the server closes them), and meanwhile makes TLS handshakes without a client
/// certificate, one after another.
async fn flood_peer_port(
    from: IpAddr,
    to: SocketAddr,
    idle: usize,
    tls: TlsConnector,
    node: u64,
    length: Duration,
) {
    let name = tally_server::bootstrap::node_name(node);
    let name = rustls::pki_types::ServerName::try_from(name).unwrap();
    let end = Instant::now() + length;
    let mut held: Vec<TcpStream> = Vec::new();
    while Instant::now() < end {
        // Closed by the server (refused, or at the handshake deadline): replaced.
        held.retain(|s| !matches!(s.try_read(&mut [0u8; 1]), Ok(0)));
        while held.len() < idle {
            match tcp_from(from, to).await {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        if let Ok(tcp) = tcp_from(from, to).await {
            let connect = tls.connect(name.clone(), tcp);
            if let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
                let _ = s.write_all(b"TLYP not a peer").await;
                closed_within(&mut s, Duration::from_secs(2)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A peer-port flood without a certificate (plain TCP connections held open from four
/// addresses, and handshakes without a client certificate): the leader holds at most what the
/// per-address handshake limit allows, logs at most a few lines, closes the idle ones at
/// `handshake_timeout_ms`, and the cluster keeps committing the good client's transfers. Then,
/// under the same flood, both followers are cut off and one is let back: the leader can commit
/// again only once that follower has dialed in through the flooded port.
#[test]
fn peer_port_flood_without_a_certificate_costs_little() {
    raise_own_descriptor_limit();
    let rt = runtime();
    rt.block_on(async {
        let mut cluster = crate::cluster_harness::Cluster::new(3, |c| {
            c.batch.batch_window_ms = 2;
            c.limits.handshake_timeout_ms = 1000;
        })
        .await;
        let mut logs = std::collections::HashMap::new();
        for id in cluster.ids.clone() {
            let (server, lines) = spawn_replica(&cluster.configs[&id], &cluster.profile, id);
            cluster.servers.insert(id, server);
            logs.insert(id, lines);
        }
        let leader = cluster.leader().await;
        let config = std::fs::read_to_string(&cluster.configs[&leader]).unwrap();
        let config = Config::from_toml_str(&config).unwrap();
        let peer_port = config.listen.peer;
        let cap = config.limits.peer_connections_max as usize;
        count_lines(&logs[&leader], "");
        let tls = connector(&cluster.profile);
        let flood = move |length: Duration| {
            for i in 0..4u8 {
                let tls = tls.clone();
                tokio::spawn(flood_peer_port(source(2 + i), peer_port, 100, tls, leader, length));
            }
        };
        let first = flood.clone();
        let attack = async move { first(Duration::from_secs(5)) };
        let server = cluster.servers.get_mut(&leader).unwrap();
        let figures = under_attack(server, "peer-flood", Duration::from_secs(6), attack).await;
        let per_address = tally_server::limits::peer_handshakes_per_address_max(cap);
        assert!(
            figures.fds_peak <= figures.fds_before + 4 * per_address + FD_SLACK,
            "descriptors peaked at {}, {} before, {per_address} handshakes per address",
            figures.fds_peak,
            figures.fds_before
        );
        let lines = count_lines(&logs[&leader], "peer");
        println!("attack-figures: peer-flood: {lines} log lines about peer connections");
        assert!(lines <= 8, "{lines} log lines about peer connections during the flood");
        let growth = figures.rss_peak.saturating_sub(figures.rss_before);
        assert!(growth <= RSS_SLACK_BYTES, "RSS grew by {growth} bytes");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = fds(server.child.id());
        assert!(
            now <= figures.fds_before + 4,
            "idle peer-port connections closed at the handshake deadline: {now} descriptors, {} before",
            figures.fds_before
        );
        reconnect_through_a_flood(&cluster, leader, flood).await;
    });
}

/// Under a fresh flood: both followers cut off, one let back; a transfer to the leader commits
/// within 8 s only if that follower dialed in through the leader's flooded peer port.
async fn reconnect_through_a_flood(
    cluster: &crate::cluster_harness::Cluster,
    leader: u64,
    flood: impl Fn(Duration),
) {
    let profile = &cluster.servers[&leader].profile;
    let chain = profile.chain_id_bytes().unwrap();
    let deposit_key = profile.load_deposit_key().unwrap();
    let (alice, bob) = (generate_key(), public_key(&generate_key()));
    let client = cluster.client_of(leader).await;
    let id = u128::from(rand::random::<u64>());
    let dep = build_request(&deposit_key, chain, Op::Deposit, id, public_key(&alice), 10);
    client.submit(dep).await.expect("deposit before the cut");
    flood(Duration::from_secs(12));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let followers: Vec<u64> = cluster
        .ids
        .iter()
        .copied()
        .filter(|&i| i != leader)
        .collect();
    for &f in &followers {
        cluster.isolate(f, true);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.isolate(followers[0], false);
    // The cut may have cost the leader its leadership (check quorum): the cluster client
    // follows redirects and retries. Either way the let-back follower must dial the leader's
    // port: to acknowledge if it still leads, to send appends if the follower now does.
    let transfer = build_request(&alice, chain, Op::Transfer, 1, bob, 1);
    let start = Instant::now();
    let cluster_client = cluster.cluster_client();
    let submit = cluster_client.submit(transfer);
    let committed = tokio::time::timeout(Duration::from_secs(8), submit).await;
    assert!(
        matches!(committed, Ok(Ok(_))),
        "a follower reconnected through the flooded peer port: {committed:?}"
    );
    println!(
        "attack-figures: peer-flood: a follower let back in got through the flood; commit in {:?}",
        start.elapsed()
    );
}

/// Under a hard descriptor limit of 512 the server starts, says it sized its limits down, and
/// under a flood of connections from forty addresses keeps serving the client it has; when
/// `accept` fails for want of descriptors (the soft limit lowered under it at run time) it
/// pauses instead of exiting; once the flood is gone, new clients are served again.
#[test]
fn under_a_hard_limit_of_512_descriptors_the_server_keeps_serving() {
    raise_own_descriptor_limit();
    let rt = runtime();
    let operator = Operator::new(|c| {
        tight(c);
        c.limits.first_request_timeout_ms = 60_000;
    });
    let (mut server, stderr) = spawn_server(&operator.config_path, &operator.profile, Some(512));
    let pid = server.child.id();
    let sized = stderr
        .iter()
        .find(|l| l.contains("using lower ones"))
        .expect("the server says it sized its limits down");
    // 512 less the reserve of `limits::descriptors_reserved` (312 for a single node), a
    // quarter of the rest to the peer port.
    assert!(plain(&sized).contains(" reserved=312 "), "{sized}");
    assert!(plain(&sized).contains(" connections_max=150 "), "{sized}");
    let (addr, profile) = (server.addr.parse().unwrap(), server.profile.clone());
    let flood: Arc<Mutex<Vec<TlsStream<TcpStream>>>> = Arc::default();
    rt.block_on(async {
        let tls = connector(&profile);
        let (f, t, p) = (flood.clone(), tls.clone(), profile.clone());
        let attack = async move {
            for i in 0..40u8 {
                let kept = open_until_refused(source(2 + i), addr, &t, &p, 16).await;
                f.lock().unwrap().extend(kept);
            }
        };
        let figures = under_attack(
            &mut server,
            "descriptors-512",
            Duration::from_secs(6),
            attack,
        )
        .await;
        let held = flood.lock().unwrap().len();
        assert!(
            (100..=150).contains(&held),
            "the flood got {held} connections, at most 150"
        );
        assert!(figures.fds_peak <= 512);

        // Accept failing with EMFILE: the flood gone, a client connected, then the soft limit
        // a few descriptors above what is open and a burst of connections.
        flood.lock().unwrap().clear();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let good = GoodClient::start(&profile).await;
        prlimit(pid, fds(pid) + 4, 512);
        let burst: Vec<_> = (0..12u8)
            .map(|i| {
                let (tls, profile) = (tls.clone(), profile.clone());
                tokio::spawn(async move {
                    let s = tls_from(source(50 + i), addr, &tls, &profile);
                    tokio::time::timeout(Duration::from_secs(2), s)
                        .await
                        .ok()
                        .flatten()
                })
            })
            .collect();
        let mut more = Vec::new();
        for b in burst {
            more.push(b.await.unwrap());
        }
        let since = Instant::now() - Duration::from_secs(1);
        let served = good.window(since, Instant::now()).2;
        good.stop().await;
        let paused = stderr.try_iter().any(|l| l.contains("pausing accepts"));
        assert!(alive(&mut server), "the server did not exit on EMFILE");
        assert!(paused, "the listener said it paused on EMFILE");
        assert!(
            served > 0,
            "the existing client was served while accept failed"
        );

        // Recovery: the limit back, the flood gone; a new client is served.
        prlimit(pid, 512, 512);
        drop(more);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let client = tokio::time::timeout(Duration::from_secs(5), Client::connect(&profile)).await;
        let client = client.expect("connects in time").expect("connects");
        client
            .status()
            .await
            .expect("a new client is served after the flood");
    });
}

fn prlimit(pid: u32, soft: usize, hard: usize) {
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("prlimit");
    assert!(status.success());
}
