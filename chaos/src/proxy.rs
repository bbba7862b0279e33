//! TCP proxies the harness controls: one per directed replica-to-replica link (to cut
//! partitions, one direction at a time) and one per replica in front of its client port (to
//! drop a client's connection after its request went out and before the answer came back).
//!
//! A replica sends raft messages only on the connection it dials and receives on the ones the
//! others dial to it (see `server/src/peer.rs`), so cutting the proxy of link `a → b` silences
//! exactly `a → b`: an asymmetric partition.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long the proxy waits for its target to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BUFFER_BYTES: usize = 64 * 1024;

/// A proxy from `listen` to `target`. Dropping it stops accepting; open connections close when
/// their peers do.
pub struct Proxy {
    pub listen: SocketAddr,
    pub target: SocketAddr,
    state: Arc<State>,
    accept_task: tokio::task::JoinHandle<()>,
}

struct State {
    /// Refuse new connections and close the open ones.
    cut: AtomicBool,
    /// While non-zero, close a connection, without forwarding, as soon as the target answers
    /// anything. A count, so that overlapping cuts each hold until their own end.
    drop_answers: AtomicU64,
    /// Bumped on every mode change so that open connections look at the flags again.
    changed: watch::Sender<u64>,
    /// Connections closed because of `drop_answers`.
    answers_dropped: AtomicU64,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl Proxy {
    /// Binds `127.0.0.1:0` and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a proxy")?;
        let listen = listener.local_addr()?;
        let (changed, _) = watch::channel(0u64);
        let state = Arc::new(State {
            cut: AtomicBool::new(false),
            drop_answers: AtomicU64::new(0),
            changed,
            answers_dropped: AtomicU64::new(0),
        });
        let accept_state = state.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if accept_state.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let _ = inbound.set_nodelay(true);
                tokio::spawn(relay(inbound, target, accept_state.clone()));
            }
        });
        Ok(Proxy {
            listen,
            target,
            state,
            accept_task,
        })
    }

    /// Cuts (true) or heals (false) the link. Cutting closes every open connection at once.
    pub fn set_cut(&self, cut: bool) {
        self.state.cut.store(cut, Ordering::SeqCst);
        self.state.changed.send_modify(|g| *g += 1);
    }

    pub fn is_cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// Lifts every cut of [`AnswersSwitch::arm`] at once.
    pub fn stop_dropping_answers(&self) {
        self.state.drop_answers.store(0, Ordering::SeqCst);
        self.state.changed.send_modify(|g| *g += 1);
    }

    /// Connections closed so far because an answer was dropped.
    pub fn answers_dropped(&self) -> u64 {
        self.state.answers_dropped.load(Ordering::SeqCst)
    }

    /// A handle that cuts client connections from another task.
    pub fn answers_switch(&self) -> AnswersSwitch {
        AnswersSwitch(self.state.clone())
    }
}

/// Cuts a client proxy's connections between request and answer: between [`AnswersSwitch::arm`]
/// and the matching [`AnswersSwitch::disarm`], every connection is closed the moment the target
/// sends a byte, and that byte is never delivered, so a request that went out gets no answer.
#[derive(Clone)]
pub struct AnswersSwitch(Arc<State>);

impl AnswersSwitch {
    pub fn arm(&self) {
        self.0.drop_answers.fetch_add(1, Ordering::SeqCst);
        self.0.changed.send_modify(|g| *g += 1);
    }

    pub fn disarm(&self) {
        let _ = self
            .0
            .drop_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        self.0.changed.send_modify(|g| *g += 1);
    }
}

async fn relay(inbound: TcpStream, target: SocketAddr, state: Arc<State>) {
    let Ok(Ok(outbound)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
    else {
        return;
    };
    let _ = outbound.set_nodelay(true);
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_target, mut to_target) = outbound.into_split();
    let cut = |s: &State| s.cut.load(Ordering::SeqCst);
    let forward = {
        let state = state.clone();
        let mut changed = state.changed.subscribe();
        async move {
            let mut buf = vec![0u8; BUFFER_BYTES];
            loop {
                tokio::select! {
                    biased;
                    c = changed.changed() => {
                        if c.is_err() || cut(&state) {
                            return;
                        }
                    }
                    r = from_client.read(&mut buf) => {
                        let n = match r {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if cut(&state) || to_target.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let backward = {
        let mut changed = state.changed.subscribe();
        async move {
            let mut buf = vec![0u8; BUFFER_BYTES];
            loop {
                tokio::select! {
                    biased;
                    c = changed.changed() => {
                        if c.is_err() || cut(&state) {
                            return;
                        }
                    }
                    r = from_target.read(&mut buf) => {
                        let n = match r {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if state.drop_answers.load(Ordering::SeqCst) > 0 {
                            state.answers_dropped.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        if cut(&state) || to_client.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    // Either direction ending closes both connections (the halves drop here).
    tokio::select! {
        _ = forward => {},
        _ = backward => {},
    }
}
