//! `ClusterClient` against fake replicas: in-memory streams behind a test connector, each
//! replica answering from a script. Real time, short timeouts: each test takes well under 2 s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_client::{
    build_request, generate_key, public_key, Client, ClusterClient, ClusterOptions, ConnectFuture,
    Connector, Error, ReplicaAddress,
};
use tally_wire::{
    decode_frame, AdminCommand, AdminRequest, BalanceReply, Confirmation, Decoded, ErrorCode,
    ErrorReply, Header, InclusionProof, Member, MemberRole, MembersReply, Message, Op, ReadMode,
    Receipt, Request, SignedHeader, StatusReply, FRAME_PAYLOAD_BYTES_MAX_DEFAULT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;

const A: &str = "a:7401";
const B: &str = "b:7402";
const C: &str = "c:7403";

/// What a fake replica does when a client connects.
enum Accept {
    Yes,
    Refuse,
    /// Never completes the handshake (the connector's timeout ends it).
    Stall,
}

/// What a fake replica does with one message.
#[allow(clippy::large_enum_variant)] // a test double: a few per test, never stored in bulk
enum Act {
    Reply(Message),
    /// Closes the connection without answering (after reading the message).
    Drop,
    /// Never answers.
    Ignore,
}

type AcceptFn = dyn Fn(&str) -> Accept + Send + Sync;
type ScriptFn = dyn Fn(&str, &Message) -> Act + Send + Sync;

/// A set of fake replicas, keyed by address, and everything they saw.
struct Fake {
    accept: Box<AcceptFn>,
    script: Box<ScriptFn>,
    /// Every message received: (replica address, raw payload, decoded message).
    seen: Mutex<Vec<(String, Vec<u8>, Message)>>,
    /// Every connection attempt, by address.
    dialed: Mutex<Vec<String>>,
}

impl Fake {
    fn new(
        accept: impl Fn(&str) -> Accept + Send + Sync + 'static,
        script: impl Fn(&str, &Message) -> Act + Send + Sync + 'static,
    ) -> Arc<Fake> {
        Arc::new(Fake {
            accept: Box::new(accept),
            script: Box::new(script),
            seen: Mutex::default(),
            dialed: Mutex::default(),
        })
    }

    /// Raw payloads of the submits each replica received.
    fn submits(&self) -> HashMap<String, Vec<Vec<u8>>> {
        let mut out: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for (address, payload, message) in self.seen.lock().unwrap().iter() {
            if matches!(message, Message::Submit(_)) {
                out.entry(address.clone())
                    .or_default()
                    .push(payload.clone());
            }
        }
        out
    }

    fn dialed(&self) -> Vec<String> {
        self.dialed.lock().unwrap().clone()
    }
}

struct FakeConnector(Arc<Fake>);

impl Connector for FakeConnector {
    fn connect<'a>(&'a self, address: &'a str, timeout: Duration) -> ConnectFuture<'a> {
        let fake = self.0.clone();
        let address = address.to_string();
        Box::pin(async move {
            fake.dialed.lock().unwrap().push(address.clone());
            match (fake.accept)(&address) {
                Accept::Refuse => Err(Error::Connect {
                    address,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                }),
                Accept::Stall => {
                    tokio::time::sleep(timeout).await;
                    Err(Error::Timeout)
                }
                Accept::Yes => {
                    let (near, far) = tokio::io::duplex(1 << 20);
                    tokio::spawn(serve(fake, address.clone(), far));
                    Ok(Client::from_stream(near, address))
                }
            }
        })
    }
}

/// One fake replica's end of one connection.
async fn serve(fake: Arc<Fake>, address: String, mut stream: DuplexStream) {
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Decoded::Complete(frame, n) =
            decode_frame(&buffer, FRAME_PAYLOAD_BYTES_MAX_DEFAULT).unwrap()
        {
            buffer.drain(..n);
            let message = Message::decode(&frame).unwrap();
            let act = (fake.script)(&address, &message);
            fake.seen
                .lock()
                .unwrap()
                .push((address.clone(), frame.payload.clone(), message));
            match act {
                Act::Reply(answer) => {
                    let bytes = answer.encode_frame(frame.correlation_id);
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Act::Drop => return,
                Act::Ignore => {}
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

fn replicas(addresses: &[&str]) -> Vec<ReplicaAddress> {
    addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ReplicaAddress {
            id: i as u64 + 1,
            address: a.to_string(),
        })
        .collect()
}

/// Short timeouts and backoffs, so every scenario runs in well under a second or two.
fn fast() -> ClusterOptions {
    ClusterOptions {
        call_timeout: Duration::from_millis(200),
        total_timeout: Duration::from_secs(2),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        queue_max: 100,
    }
}

fn cluster(fake: &Arc<Fake>, opts: ClusterOptions) -> ClusterClient {
    ClusterClient::with_connector(
        replicas(&[A, B, C]),
        opts,
        Arc::new(FakeConnector(fake.clone())),
    )
}

fn request(id: u128) -> Request {
    let key = generate_key();
    build_request(
        &key,
        [9; 32],
        Op::Transfer,
        id,
        public_key(&generate_key()),
        5,
    )
}

/// A confirmation for `request` (not a valid proof: the cluster client does not verify).
fn confirmed(request: &Request, replayed: bool) -> Message {
    Message::Confirmed(Box::new(Confirmation {
        replayed,
        request: request.clone(),
        receipt: Receipt {
            request_hash: [1; 32],
            height: 7,
            index: 0,
            op: request.op,
            failed: None,
            op_index: 0,
            signer_balance: 10,
            to_balance: 5,
        },
        header: SignedHeader {
            header: Header {
                chain_id: [9; 32],
                height: 7,
                term: 2,
                time_unix_ms: 0,
                request_count: 1,
                prev_hash: [0; 32],
                merkle_root: [0; 32],
                state_digest: [0; 32],
                operator_key_id: [0; 8],
            },
            signature: [0; 64],
        },
        proof: InclusionProof {
            leaf_index: 0,
            tree_size: 1,
            path: vec![],
        },
    }))
}

/// Confirms every submit, as a leader would.
fn confirm(message: &Message) -> Act {
    match message {
        Message::Submit(r) => Act::Reply(confirmed(r, false)),
        other => panic!("unexpected message {other:?}"),
    }
}

fn rejection(code: ErrorCode, hint: &str, retry_after_ms: u32) -> Act {
    let mut reply = ErrorReply::new(code, "from a fake replica");
    reply.leader_hint = hint.to_string();
    reply.retry_after_ms = retry_after_ms;
    Act::Reply(Message::Error(reply))
}

fn id_of(payload: &[u8]) -> u128 {
    Request::decode(payload).unwrap().id
}

/// (1) A follower answers `not_leader` naming B: the request goes to B, once, at once.
#[tokio::test]
async fn follows_the_leader_hint() {
    let fake = Fake::new(
        |_| Accept::Yes,
        |address, message| match address {
            A => rejection(ErrorCode::NotLeader, B, 0),
            B => confirm(message),
            _ => panic!("C is never asked"),
        },
    );
    let client = cluster(&fake, fast());
    let request = request(1);
    let started = Instant::now();
    let c = client.submit(request.clone()).await.unwrap();
    assert_eq!(c.request, request);
    assert!(!c.replayed);
    assert!(started.elapsed() < Duration::from_millis(200), "no backoff");

    let submits = fake.submits();
    assert_eq!(submits[A].len(), 1);
    assert_eq!(submits[B].len(), 1);
    assert_eq!(fake.dialed(), [A, B]);
    assert_eq!(client.current_address().as_deref(), Some(B));
    let stats = client.stats();
    assert_eq!(
        (
            stats.attempts,
            stats.redirects,
            stats.connects,
            stats.backoffs
        ),
        (2, 1, 2, 0)
    );

    // The connection to the leader is kept: the next request goes straight to B.
    client.submit(self::request(2)).await.unwrap();
    assert_eq!(fake.submits()[B].len(), 2);
    assert_eq!(client.stats().connects, 2);
}

/// A hint outside the profile is followed too, if it is an address.
#[tokio::test]
async fn follows_a_hint_outside_the_profile() {
    const D: &str = "d.example:7404";
    let fake = Fake::new(
        |_| Accept::Yes,
        |address, message| match address {
            D => confirm(message),
            _ => rejection(ErrorCode::NotLeader, D, 0),
        },
    );
    let client = cluster(&fake, fast());
    client.submit(request(1)).await.unwrap();
    assert_eq!(fake.dialed(), [A, D]);
}

/// (2) A drops the connection after reading the request; B has it applied already and answers
/// with the original confirmation, flagged replayed. Both saw the same bytes (same id).
#[tokio::test]
async fn resubmits_the_same_request_after_a_drop() {
    let fake = Fake::new(
        |_| Accept::Yes,
        |address, message| match (address, message) {
            (A, _) => Act::Drop,
            (B, Message::Submit(r)) => Act::Reply(confirmed(r, true)),
            _ => panic!("unexpected {address} {message:?}"),
        },
    );
    let client = cluster(&fake, fast());
    let request = request(0xfeed_f00d);
    let c = client.submit(request.clone()).await.unwrap();
    assert!(c.replayed);
    assert_eq!(c.request, request);

    let submits = fake.submits();
    assert_eq!((submits[A].len(), submits[B].len()), (1, 1));
    assert_eq!(submits[A][0], submits[B][0], "the same request bytes");
    assert_eq!(id_of(&submits[A][0]), 0xfeed_f00d);
    assert_eq!(id_of(&submits[B][0]), 0xfeed_f00d);
    let stats = client.stats();
    assert_eq!((stats.attempts, stats.reconnects), (2, 1));
}

/// (3) No replica can take writes for 300 ms (an election); then B can. The client backs off,
/// moves between replicas, and succeeds.
#[tokio::test]
async fn backs_off_until_a_leader_is_ready() {
    let ready_at = Instant::now() + Duration::from_millis(300);
    let fake = Fake::new(
        |_| Accept::Yes,
        move |address, message| {
            if address == B && Instant::now() >= ready_at {
                confirm(message)
            } else {
                rejection(ErrorCode::Unavailable, "", 0)
            }
        },
    );
    let client = cluster(&fake, fast());
    let started = Instant::now();
    client.submit(request(3)).await.unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
    let stats = client.stats();
    assert!(stats.backoffs >= 5, "{stats:?}");
    assert_eq!(stats.attempts, stats.backoffs + 1, "{stats:?}");
    // It went round the replicas rather than hammering one.
    let dialed = fake.dialed();
    for address in [A, B, C] {
        assert!(dialed.iter().any(|d| d == address), "{dialed:?}");
    }
}

/// A server's `retry_after_ms` is honoured (busy: same replica, no reconnect).
#[tokio::test]
async fn honours_retry_after() {
    let calls = Arc::new(Mutex::new(0));
    let seen = calls.clone();
    let fake = Fake::new(
        |_| Accept::Yes,
        move |_, message| {
            let mut n = seen.lock().unwrap();
            *n += 1;
            if *n < 3 {
                rejection(ErrorCode::Busy, "", 150)
            } else {
                confirm(message)
            }
        },
    );
    let client = cluster(&fake, fast());
    let started = Instant::now();
    client.submit(request(4)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(fake.dialed(), [A], "busy keeps the connection");
    assert_eq!(fake.submits()[A].len(), 3);
}

/// (4) While no connection is usable, at most queue_max operations wait; the next one fails at
/// once with QueueFull, having sent nothing.
#[tokio::test]
async fn a_full_queue_fails_fast() {
    let fake = Fake::new(|_| Accept::Stall, |_, _| unreachable!());
    let client = cluster(
        &fake,
        ClusterOptions {
            call_timeout: Duration::from_millis(400),
            total_timeout: Duration::from_millis(400),
            queue_max: 2,
            ..fast()
        },
    );
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.submit(request(i)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let started = Instant::now();
    let err = client.submit(request(9)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(matches!(err, Error::QueueFull { queue_max: 2 }), "{err}");
    assert!(!err.outcome_unknown());
    assert_eq!(err.code_name(), "queue_full");

    // The two waiting ones give up at their deadline, having sent nothing.
    for task in waiting {
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::GaveUp { attempts: 0, .. }), "{err}");
    }
    let stats = client.stats();
    assert_eq!((stats.queue_full, stats.gave_up, stats.attempts), (1, 2, 0));
    // One connection attempt at a time: the second waiter never dialled in parallel.
    assert_eq!(fake.dialed().len(), 1, "{:?}", fake.dialed());
}

/// (5a) Every attempt reached a replica and none answered: giving up says the outcome is
/// unknown.
#[tokio::test]
async fn total_timeout_after_a_send_is_indeterminate() {
    let fake = Fake::new(|_| Accept::Yes, |_, _| Act::Ignore);
    let client = cluster(
        &fake,
        ClusterOptions {
            call_timeout: Duration::from_millis(100),
            total_timeout: Duration::from_millis(450),
            ..fast()
        },
    );
    let started = Instant::now();
    let err = client.submit(request(5)).await.unwrap_err();
    let elapsed = started.elapsed();
    // It stops at the deadline, or earlier when the next retry could not start before it.
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(900), "{elapsed:?}");
    let Error::Indeterminate { attempts, last, .. } = &err else {
        panic!("{err}");
    };
    assert!(*attempts >= 3, "{err}");
    assert!(matches!(**last, Error::Timeout), "{err}");
    assert!(err.outcome_unknown());
    assert!(err.to_string().contains("may or may not have been applied"));
    // Each timeout moved on to the next replica.
    let submits = fake.submits();
    assert!(submits.contains_key(A) && submits.contains_key(B) && submits.contains_key(C));
    assert_eq!(client.stats().indeterminate, 1);
}

/// (5b) No replica accepts a connection: giving up is a clean error, nothing was sent.
#[tokio::test]
async fn total_timeout_without_a_send_is_clean() {
    let fake = Fake::new(|_| Accept::Refuse, |_, _| unreachable!());
    let client = cluster(
        &fake,
        ClusterOptions {
            total_timeout: Duration::from_millis(300),
            ..fast()
        },
    );
    let started = Instant::now();
    let err = client.submit(request(6)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(600));
    let Error::GaveUp { attempts, last, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(*attempts, 0);
    assert!(matches!(**last, Error::Connect { .. }), "{err}");
    assert!(!err.outcome_unknown());
    assert!(err.to_string().contains("nothing was sent"), "{err}");
    // It tried every replica, paced by backoff rather than in a tight loop.
    let dialed = fake.dialed();
    assert!(dialed.len() >= 3 && dialed.len() < 40, "{dialed:?}");
    assert_eq!(&dialed[..3], [A, B, C]);
    let stats = client.stats();
    assert_eq!((stats.attempts, stats.gave_up), (0, 1));
    assert_eq!(stats.connect_failures, dialed.len() as u64);
}

/// A rejection that retrying cannot fix is returned as it is, after one attempt.
#[tokio::test]
async fn final_rejections_are_returned_as_is() {
    let fake = Fake::new(
        |_| Accept::Yes,
        |_, _| rejection(ErrorCode::InsufficientFunds, "", 0),
    );
    let client = cluster(&fake, fast());
    let err = client.submit(request(7)).await.unwrap_err();
    let Error::Rejected(reply) = &err else {
        panic!("{err}");
    };
    assert_eq!(reply.code, ErrorCode::InsufficientFunds);
    assert!(!err.outcome_unknown());
    assert_eq!(client.stats().attempts, 1);
}

/// Two replicas naming each other as leader (stale views during an election) do not make the
/// client spin: after a round of redirects it backs off.
#[tokio::test]
async fn redirect_loops_back_off() {
    let fake = Fake::new(
        |_| Accept::Yes,
        |address, _| rejection(ErrorCode::NotLeader, if address == A { B } else { A }, 0),
    );
    let client = cluster(
        &fake,
        ClusterOptions {
            total_timeout: Duration::from_millis(400),
            ..fast()
        },
    );
    let err = client.submit(request(8)).await.unwrap_err();
    assert!(matches!(err, Error::Indeterminate { .. }), "{err}");
    let stats = client.stats();
    assert!(stats.attempts < 60, "{stats:?}");
    assert!(stats.backoffs >= 3, "{stats:?}");
}

/// Many concurrent submits on a connection that dies (A reads all of them, then crashes): all
/// land on the next replica exactly once, over one reconnect.
#[tokio::test]
async fn concurrent_submits_share_one_reconnect() {
    const N: usize = 50;
    let received = Arc::new(Mutex::new(0));
    let count = received.clone();
    let fake = Fake::new(
        |_| Accept::Yes,
        move |address, message| match address {
            A => {
                let mut n = count.lock().unwrap();
                *n += 1;
                if *n == N {
                    Act::Drop
                } else {
                    Act::Ignore
                }
            }
            _ => confirm(message),
        },
    );
    let client = cluster(&fake, fast());
    // The first submit connects to A; the others wait for it and share that connection.
    let tasks: Vec<_> = (0..N as u128)
        .map(|id| {
            let client = client.clone();
            tokio::spawn(async move { client.submit(request(id)).await })
        })
        .collect();
    for task in tasks {
        let c = task.await.unwrap().unwrap();
        assert!(!c.replayed);
    }
    let submits = fake.submits();
    assert_eq!(submits[A].len(), N);
    let mut on_b: Vec<u128> = submits[B].iter().map(|p| id_of(p)).collect();
    on_b.sort();
    assert_eq!(on_b, (0..N as u128).collect::<Vec<_>>(), "each once on B");
    assert!(!submits.contains_key(C));
    let stats = client.stats();
    assert_eq!(
        (stats.connects, stats.attempts, stats.backoffs),
        (2, 2 * N as u64, 0),
        "{stats:?}"
    );
}

/// Linearizable reads follow the leader hint; stale reads are served where the client is.
#[tokio::test]
async fn reads_follow_the_leader() {
    let fake = Fake::new(
        |_| Accept::Yes,
        |address, message| match (address, message) {
            (
                A,
                Message::GetBalance {
                    mode: ReadMode::Linearizable,
                    ..
                },
            ) => rejection(ErrorCode::NotLeader, C, 0),
            (_, Message::GetBalance { account, mode }) => {
                Act::Reply(Message::Balance(BalanceReply {
                    account: *account,
                    exists: true,
                    balance: if address == C { 42 } else { 41 },
                    height: 3,
                    mode: *mode,
                }))
            }
            (_, Message::GetHeaders { .. }) => Act::Reply(Message::Headers(vec![])),
            _ => panic!("unexpected {message:?}"),
        },
    );
    let client = cluster(&fake, fast());
    let stale = client.balance([1; 32], ReadMode::Stale).await.unwrap();
    assert_eq!((stale.balance, stale.mode), (41, ReadMode::Stale));
    let read = client
        .balance([1; 32], ReadMode::Linearizable)
        .await
        .unwrap();
    assert_eq!((read.balance, read.mode), (42, ReadMode::Linearizable));
    assert_eq!(client.current_address().as_deref(), Some(C));
    assert!(client.headers(1, 10).await.unwrap().is_empty());
    assert_eq!(client.stats().redirects, 1);
}

/// Reads that never get an answer give up cleanly (a read changes nothing).
#[tokio::test]
async fn reads_give_up_cleanly() {
    let fake = Fake::new(|_| Accept::Yes, |_, _| Act::Drop);
    let client = cluster(
        &fake,
        ClusterOptions {
            total_timeout: Duration::from_millis(200),
            ..fast()
        },
    );
    let err = client
        .balance([1; 32], ReadMode::Linearizable)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::GaveUp { .. }), "{err}");
    assert!(!err.outcome_unknown());
}

/// status_all asks every replica, concurrently, and reports each one's answer in profile order.
#[tokio::test]
async fn status_of_every_replica() {
    let fake = Fake::new(
        |address| match address {
            A => Accept::Refuse,
            B => Accept::Stall,
            _ => Accept::Yes,
        },
        |_, message| match message {
            Message::GetStatus => Act::Reply(Message::Status(Box::new(StatusReply {
                node_id: 3,
                role: 2,
                term: 4,
                leader_id: 3,
                commit_index: 10,
                applied_index: 10,
                applied_height: 5,
                writable: true,
                leader_client_address: C.into(),
                latest_header: None,
                archive_height: None,
            }))),
            _ => panic!("unexpected {message:?}"),
        },
    );
    let client = cluster(&fake, fast());
    let started = Instant::now();
    let all = client.status_all().await;
    // One stalled replica costs one call_timeout (200 ms), not one per replica.
    assert!(started.elapsed() < Duration::from_millis(450));
    let addresses: Vec<_> = all.iter().map(|(r, _)| r.address.as_str()).collect();
    assert_eq!(addresses, [A, B, C]);
    assert!(matches!(all[0].1, Err(Error::Connect { .. })));
    assert!(matches!(all[1].1, Err(Error::Timeout)));
    assert_eq!(all[2].1.as_ref().unwrap().node_id, 3);
    assert_eq!(client.status_of(C).await.unwrap().role, 2);
}

/// The membership a fake leader answers with.
fn membership(leader_id: u64) -> Message {
    Message::Members(Box::new(MembersReply {
        leader_id,
        members: vec![Member {
            id: 1,
            role: MemberRole::Voter,
            address: "127.0.0.1:7500".into(),
            client_address: A.into(),
        }],
    }))
}

/// Admin changes follow `not_leader` like a submit, and every attempt is signed afresh: the
/// follower and the leader see two requests with different nonces, both verifying under the
/// admin key, for the same command and chain.
#[tokio::test]
async fn admin_changes_follow_the_leader_and_sign_each_attempt() {
    let fake = Fake::new(
        |_| Accept::Yes,
        |address, message| match (address, message) {
            (A, Message::Admin(_)) => rejection(ErrorCode::NotLeader, B, 0),
            (B, Message::Admin(_)) => Act::Reply(membership(2)),
            _ => panic!("unexpected {address} {message:?}"),
        },
    );
    let client = cluster(&fake, fast());
    let key = generate_key();
    let command = AdminCommand::Remove { id: 3 };
    let reply = client.admin([9; 32], &key, command.clone()).await.unwrap();
    assert_eq!(reply.leader_id, 2);
    let seen: Vec<(String, AdminRequest)> = fake
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(address, _, m)| match m {
            Message::Admin(a) => Some((address.clone(), (**a).clone())),
            _ => None,
        })
        .collect();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[0].0.as_str(), seen[1].0.as_str()), (A, B));
    for (_, request) in &seen {
        assert_eq!(request.command, command);
        assert_eq!(request.chain_id, [9; 32]);
        assert_eq!(request.admin_key, public_key(&key));
        tally_core::crypto::verify_admin(request).unwrap();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now_ms.abs_diff(request.issued_unix_ms) < 10_000);
    }
    assert_ne!(seen[0].1.nonce, seen[1].1.nonce, "signed afresh");
}

/// Refusals particular to admin requests are final: no retry, the code reaches the caller.
#[tokio::test]
async fn admin_refusals_are_final() {
    for code in [
        ErrorCode::Unauthorized,
        ErrorCode::StaleRequest,
        ErrorCode::MembershipRefused,
    ] {
        let fake = Fake::new(
            |_| Accept::Yes,
            move |_, message| match message {
                Message::Admin(_) => rejection(code, "", 0),
                other => panic!("unexpected {other:?}"),
            },
        );
        let client = cluster(&fake, fast());
        let err = client
            .admin([9; 32], &generate_key(), AdminCommand::Promote { id: 4 })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Rejected(r) if r.code == code),
            "{code}: {err}"
        );
        assert_eq!(err.code_name(), code.name());
        assert_eq!(client.stats().attempts, 1, "{code}");
    }
}

/// `Members` is a read: giving up is "gave up", never "outcome unknown"; a change that was
/// sent and never answered is indeterminate. An invalid command is refused before anything is
/// sent.
#[tokio::test]
async fn admin_reads_and_writes_give_up_differently() {
    let fake = Fake::new(|_| Accept::Yes, |_, _| Act::Ignore);
    let opts = ClusterOptions {
        total_timeout: Duration::from_millis(300),
        call_timeout: Duration::from_millis(100),
        ..fast()
    };
    let client = cluster(&fake, opts);
    let key = generate_key();
    let read = client.admin([9; 32], &key, AdminCommand::Members).await;
    assert!(matches!(read, Err(Error::GaveUp { .. })), "{read:?}");
    let write = client
        .admin([9; 32], &key, AdminCommand::TransferLeader { id: 2 })
        .await;
    assert!(
        matches!(write, Err(Error::Indeterminate { .. })),
        "{write:?}"
    );
    assert!(write.unwrap_err().outcome_unknown());

    let sent_before = fake.seen.lock().unwrap().len();
    let bad = client
        .admin(
            [9; 32],
            &key,
            AdminCommand::Add {
                id: 4,
                address: "no port".into(),
                client_address: String::new(),
                learner: true,
            },
        )
        .await;
    assert!(matches!(bad, Err(Error::Invalid { .. })), "{bad:?}");
    assert_eq!(fake.seen.lock().unwrap().len(), sent_before);
}
