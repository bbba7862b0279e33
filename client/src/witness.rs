//! `tally witness`: an independent witness of tally ledgers over C2SP tlog-witness. It
//! serves `POST /add-checkpoint` on plain HTTP/1.1 and cosigns a checkpoint only when it is
//! signed by the log's operator key and consistent with the last checkpoint it cosigned for
//! that log (`tally_core::witness::judge`); the new state is on disk (synced) before the
//! cosignature leaves.
//!
//! State: `<key file>.state.json` (format `tally-witness-state-v1`): per log origin, the size
//! and root last cosigned. Limits: [`CONNECTIONS_MAX`] connections at once (more are closed
//! unanswered), a request head of [`HEAD_BYTES_MAX`] and a body of
//! `ADD_CHECKPOINT_BYTES_MAX` (else 431 or 413), [`READ_TIMEOUT`] to send them (else 408).
//! Each connection carries one request (`Connection: close`): the spec's keep-alive is a
//! SHOULD, and a witness of a few logs answers a request per log per checkpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use tally_core::witness::{
    cosign, judge, AddCheckpoint, Cosigned, Refusal, ADD_CHECKPOINT_BYTES_MAX,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::confirmation::write_atomically;
use crate::{Error, Result};

pub const CONNECTIONS_MAX: usize = 64;
pub const HEAD_BYTES_MAX: usize = 8 * 1024;
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// `format` of the witness's state file.
pub const WITNESS_STATE_FORMAT: &str = "tally-witness-state-v1";

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: String,
    logs: BTreeMap<String, LogState>,
}

#[derive(Serialize, Deserialize)]
struct LogState {
    size: u64,
    root: String,
}

/// One witness: its key and name, the logs it witnesses, and what it last cosigned.
pub struct Witness {
    key: SigningKey,
    name: String,
    /// Origin → the keys of the log's operator key chain (any may sign a checkpoint).
    logs: Mutex<BTreeMap<String, Vec<VerifyingKey>>>,
    state_path: PathBuf,
    state: Mutex<BTreeMap<String, Cosigned>>,
    /// Woken when a checkpoint was refused for its signature: the key chain may have grown
    /// (see `tally witness`'s follower of the chain).
    pub refused_signature: tokio::sync::Notify,
}

/// An HTTP answer: status, content type, body.
pub type Answer = (u16, &'static str, String);

impl Witness {
    /// The witness of `logs` (origin → the keys of its operator key chain) with `key`, its
    /// state next to `key_path`.
    pub fn open(
        key: SigningKey,
        name: String,
        key_path: &Path,
        logs: BTreeMap<String, Vec<VerifyingKey>>,
    ) -> Result<Witness> {
        let mut state_path = key_path.as_os_str().to_owned();
        state_path.push(".state.json");
        let state_path = PathBuf::from(state_path);
        let state = load_state(&state_path)?;
        Ok(Witness {
            key,
            name,
            logs: Mutex::new(logs),
            state_path,
            state: Mutex::new(state),
            refused_signature: tokio::sync::Notify::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// After a key rotation of the log `origin`: the keys of its chain, as followed from its
    /// genesis key (`tally_core::key_chain::KeySchedule::keys()`).
    pub fn set_log_keys(&self, origin: &str, keys: Vec<VerifyingKey>) {
        self.logs
            .lock()
            .expect("witness logs")
            .insert(origin.to_string(), keys);
    }

    /// The verifier key of the witness's cosignatures: `<name>+<key id hex>+<base64(0x04 ‖ key)>`.
    pub fn verifier_key(&self) -> String {
        use base64::Engine as _;
        let public = self.key.verifying_key();
        let id = tally_core::witness::cosigner_key_id(&self.name, &public);
        let mut material = vec![tally_core::witness::COSIGNATURE_TYPE_ED25519];
        material.extend_from_slice(public.as_bytes());
        let b64 = base64::engine::general_purpose::STANDARD.encode(material);
        format!("{}+{}+{b64}", self.name, hex::encode(id))
    }

    /// Answers one `add-checkpoint` body at `now` (Unix seconds). The check, the update and
    /// the synced write of the state happen under one lock (the spec's atomicity).
    pub fn add_checkpoint(&self, body: &str, now: u64) -> Answer {
        let request = match AddCheckpoint::parse(body) {
            Ok(r) => r,
            Err(refusal) => return refused(&refusal),
        };
        let known = self.logs.lock().expect("witness logs").clone();
        let mut state = self.state.lock().expect("witness state");
        let logs = |origin: &str| known.get(origin).cloned();
        let last = |origin: &str| state.get(origin).copied();
        let (checkpoint, new) = match judge(&request, &logs, &last) {
            Ok(decided) => decided,
            Err(refusal) => {
                eprintln!("tally witness: refused a checkpoint: {refusal}");
                if matches!(refusal, Refusal::Forbidden(_)) {
                    self.refused_signature.notify_one();
                }
                return refused(&refusal);
            }
        };
        let before = state.insert(checkpoint.origin.clone(), new);
        if let Err(e) = save_state(&self.state_path, &state) {
            match before {
                Some(old) => state.insert(checkpoint.origin.clone(), old),
                None => state.remove(&checkpoint.origin),
            };
            eprintln!("tally witness: cannot save the state: {e}");
            return (
                500,
                "text/plain; charset=utf-8",
                "cannot save the witness state\n".into(),
            );
        }
        let line = cosign(&checkpoint.body(), now, &self.name, &self.key);
        (200, "text/plain; charset=utf-8", line)
    }
}

fn refused(refusal: &Refusal) -> Answer {
    match refusal {
        Refusal::Conflict {
            size,
            same_size_fork: false,
        } => (409, "text/x.tlog.size", format!("{size}\n")),
        other => (
            other.status(),
            "text/plain; charset=utf-8",
            format!("{other}\n"),
        ),
    }
}

fn load_state(path: &Path) -> Result<BTreeMap<String, Cosigned>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let bad = |what: String| Error::Invalid {
        what: "witness state",
        reason: format!("{}: {what}", path.display()),
    };
    let file: StateFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if file.format != WITNESS_STATE_FORMAT {
        return Err(bad(format!("format {:?}", file.format)));
    }
    let mut out = BTreeMap::new();
    for (origin, log) in file.logs {
        let root = hex::decode(&log.root)
            .ok()
            .and_then(|b| tally_wire::Hash::try_from(b).ok())
            .ok_or_else(|| bad(format!("the root of {origin:?}")))?;
        out.insert(
            origin,
            Cosigned {
                size: log.size,
                root,
            },
        );
    }
    Ok(out)
}

fn save_state(path: &Path, state: &BTreeMap<String, Cosigned>) -> Result<()> {
    let logs = state
        .iter()
        .map(|(origin, c)| {
            let log = LogState {
                size: c.size,
                root: hex::encode(c.root),
            };
            (origin.clone(), log)
        })
        .collect();
    let file = StateFile {
        format: WITNESS_STATE_FORMAT.into(),
        logs,
    };
    write_atomically(
        path,
        &(serde_json::to_string_pretty(&file).expect("JSON") + "\n"),
    )
}

/// Serves the witness on `listener` until the process ends.
pub async fn serve(listener: TcpListener, witness: Arc<Witness>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let witness = Arc::clone(&witness);
        tokio::spawn(async move {
            answer(stream, witness).await;
            drop(slot);
        });
    }
}

async fn answer(mut stream: TcpStream, witness: Arc<Witness>) {
    let (status, content_type, body) =
        match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
            Ok(Ok(Request::AddCheckpoint(body))) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                // The decision ends in an fsync of the state: off the tokio workers.
                let decide = move || witness.add_checkpoint(&body, now);
                tokio::task::spawn_blocking(decide)
                    .await
                    .unwrap_or_else(|_| {
                        (
                            500,
                            "text/plain; charset=utf-8",
                            "the witness failed\n".into(),
                        )
                    })
            }
            Ok(Ok(Request::Refused(status, why))) => {
                (status, "text/plain; charset=utf-8", why.into())
            }
            Ok(Err(_)) => return,
            Err(_) => (408, "text/plain; charset=utf-8", "request timeout\n".into()),
        };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

enum Request {
    AddCheckpoint(String),
    Refused(u16, &'static str),
}

/// Reads one request: its head (at most [`HEAD_BYTES_MAX`]) and, for `POST /add-checkpoint`,
/// a body of `Content-Length` bytes (at most `ADD_CHECKPOINT_BYTES_MAX`).
async fn read_request(stream: &mut TcpStream) -> std::io::Result<Request> {
    let mut buf = Vec::with_capacity(2048);
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() >= HEAD_BYTES_MAX {
            return Ok(Request::Refused(431, "request head too large\n"));
        }
        read_some(stream, &mut buf, HEAD_BYTES_MAX + ADD_CHECKPOINT_BYTES_MAX).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if path != "/add-checkpoint" {
        return Ok(Request::Refused(
            404,
            "not found: this witness serves POST /add-checkpoint\n",
        ));
    }
    if method != "POST" {
        return Ok(Request::Refused(405, "use POST\n"));
    }
    let length = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    let Some(length) = length else {
        return Ok(Request::Refused(411, "Content-Length required\n"));
    };
    if length > ADD_CHECKPOINT_BYTES_MAX {
        return Ok(Request::Refused(413, "body longer than 16 KiB\n"));
    }
    while buf.len() < head_end + length {
        read_some(stream, &mut buf, head_end + length).await?;
    }
    match String::from_utf8(buf[head_end..head_end + length].to_vec()) {
        Ok(body) => Ok(Request::AddCheckpoint(body)),
        Err(_) => Ok(Request::Refused(400, "the body is not UTF-8\n")),
    }
}

async fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>, max: usize) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    let room = max.saturating_sub(buf.len()).min(chunk.len()).max(1);
    let n = stream.read(&mut chunk[..room]).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// The default name of a witness: `tally-witness/<first 8 bytes of its key, hex>`.
pub fn default_name(key: &SigningKey) -> String {
    format!(
        "tally-witness/{}",
        hex::encode(&key.verifying_key().as_bytes()[..8])
    )
}

/// Binds `listen`, for `serve`.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(listen).await.map_err(|e| Error::Connect {
        address: listen.to_string(),
        source: e,
    })
}
