//! Sending checkpoints to witnesses (`[[witnesses]]`, C2SP tlog-witness) and keeping the newest
//! cosigned one for `GetCheckpoint`.
//!
//! Within [`ROUND_GAP`] of a new applied height (at most one round per gap, so a witness gets
//! at most ten requests a second), while this replica is the writable leader, it asks the storage thread for the checkpoint of that height with a
//! consistency proof from the size each witness last cosigned, and POSTs `add-checkpoint`. A
//! witness whose size it does not know yet gets `old 0`; its `409` names the size, and the
//! request is made again from there. Cosignature lines are kept only if they verify under the
//! configured key. A height some witness did not cosign (down, refusing, or not yet knowing a
//! key rotated in, PROTOCOL.md §4.14) is sent again after [`RETRY_GAP`] while no newer one
//! comes. Nothing here holds a batch back: a witness that is slow, down or refusing
//! only leaves the published checkpoint older (each request has [`REQUEST_TIMEOUT`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use tally_config::WitnessConfig;
use tally_core::witness::{cosigned_at, AddCheckpoint};
use tally_wire::ConsistencyReply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::channels::StorageCmd;
use crate::pipeline::PipelineHandle;
use crate::view::Witnessed;

/// How often the applied height is looked at, and the least time between two rounds.
pub const ROUND_GAP: Duration = Duration::from_millis(100);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The least time between two rounds for the same height, when a witness did not cosign it.
pub const RETRY_GAP: Duration = Duration::from_secs(1);
/// Bytes of a witness's answer read at most.
const ANSWER_BYTES_MAX: usize = 16 * 1024;

struct Target {
    url: String,
    key: VerifyingKey,
    /// The size the witness last cosigned, once known.
    size: Option<u64>,
}

/// Runs the rounds until the process ends; a no-op without witnesses.
pub async fn run(config: Vec<WitnessConfig>, pipeline: PipelineHandle, witnessed: Arc<Witnessed>) {
    let mut targets: Vec<Target> = config
        .into_iter()
        .filter_map(|w| {
            let bytes: [u8; 32] = hex::decode(&w.public_key).ok()?.try_into().ok()?;
            let key = VerifyingKey::from_bytes(&bytes).ok()?;
            Some(Target {
                url: w.url.trim_end_matches('/').to_string(),
                key,
                size: None,
            })
        })
        .collect();
    let (mut last_round, mut retry_at) = (0, tokio::time::Instant::now());
    while !targets.is_empty() {
        tokio::time::sleep(ROUND_GAP).await;
        let height = pipeline.applied_height.load(Ordering::SeqCst);
        let leads = pipeline.view.writable.load(Ordering::SeqCst);
        let again = height == last_round && tokio::time::Instant::now() < retry_at;
        if !leads || height == 0 || again || height == cosigned_by_all(&targets) {
            continue;
        }
        (last_round, retry_at) = (height, tokio::time::Instant::now() + RETRY_GAP);
        if let Some(note) = round(&mut targets, &pipeline, height).await {
            witnessed.publish(note);
        }
    }
}

/// The height every witness has cosigned (0 when one has not, or its size is unknown).
fn cosigned_by_all(targets: &[Target]) -> u64 {
    targets
        .iter()
        .map(|t| t.size.unwrap_or(0))
        .min()
        .unwrap_or(0)
}

/// Sends the checkpoint of `height` to every witness; returns it with the cosignatures that
/// verified (None when the checkpoint could not be had).
async fn round(targets: &mut [Target], pipeline: &PipelineHandle, height: u64) -> Option<String> {
    let mut note = None;
    let mut lines = String::new();
    for t in targets.iter_mut() {
        for _attempt in 0..2 {
            let old = t.size.unwrap_or(0);
            if old > height {
                break;
            }
            let reply = match log_proof(pipeline, old.max(1), height).await {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::warn!("witnessing height {height}: {e}");
                    return None;
                }
            };
            let checkpoint = reply.to.checkpoint.clone();
            note.get_or_insert_with(|| checkpoint.clone());
            let request = AddCheckpoint {
                old_size: old,
                proof: if old == 0 { Vec::new() } else { reply.proof },
                note: checkpoint.clone(),
            };
            match post(&t.url, &request.encode()).await {
                Ok((200, body)) => {
                    lines.push_str(&verified_lines(&checkpoint, &body, &t.key));
                    t.size = Some(height);
                    break;
                }
                Ok((409, body)) => t.size = body.trim().parse().ok(),
                Ok((status, body)) => {
                    tracing::warn!(
                        "witness {} refused height {height}: {status} {}",
                        t.url,
                        body.trim()
                    );
                    t.size = None;
                    break;
                }
                Err(e) => {
                    tracing::warn!("witness {}: {e}", t.url);
                    break;
                }
            }
        }
    }
    note.map(|n| n + &lines)
}

/// The cosignature lines of `body` that verify under `key` over `checkpoint`.
fn verified_lines(checkpoint: &str, body: &str, key: &VerifyingKey) -> String {
    let mut out = String::new();
    for line in body.lines() {
        let Some(name) = line
            .strip_prefix("\u{2014} ")
            .and_then(|r| r.split(' ').next())
        else {
            continue;
        };
        let candidate = format!("{checkpoint}{line}\n");
        if let Ok(Some(_)) = cosigned_at(&candidate, name, key) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The proof between two applied heights, from the storage thread.
async fn log_proof(
    pipeline: &PipelineHandle,
    from: u64,
    to: u64,
) -> Result<ConsistencyReply, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cmd = StorageCmd::LogProof {
        from,
        to,
        reply: tx,
    };
    crate::pipeline::send_waiting(&pipeline.storage_tx, cmd).await?;
    rx.await
        .map_err(|_| "the ledger stopped".to_string())?
        .map_err(|e| e.to_string())
}

/// POSTs `body` to `<url>/add-checkpoint` over plain HTTP/1.1: (status, body).
async fn post(url: &str, body: &str) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or("not an http:// URL")?;
    let (host, prefix) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let request = format!(
        "POST /{prefix}{}add-checkpoint HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        if prefix.is_empty() || prefix.ends_with('/') { "" } else { "/" },
        body.len()
    );
    let exchange = async {
        let mut stream = TcpStream::connect(host).await.map_err(|e| e.to_string())?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(ANSWER_BYTES_MAX as u64)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&answer).to_string())
    };
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| "no answer in time".to_string())??;
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or("not an HTTP answer")?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}
