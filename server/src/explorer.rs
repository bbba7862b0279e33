//! The public read-only explorer (`[explorer] enabled`, docs/CONFIG.md), on the HTTP port:
//! pages (`server/explorer/`, plain HTML and JavaScript compiled into the binary) and the JSON
//! they read. The pages never ask the browser to trust the server for a proof: the verify page
//! checks a confirmation file with WebCrypto (SHA-256, Ed25519) under a key the person gives.
//!
//! | path | answer |
//! |---|---|
//! | `/explorer/`, `/explorer/{verify,account,batch}.html`, `/explorer/tally.js` | the pages |
//! | `/explorer/api/checkpoint` | `{height, checkpoint, witnessed}`: the witnessed checkpoint, else this replica's at its height |
//! | `/explorer/api/headers?from=H&limit=N` | up to 64 headers from `H` (default: the newest 20) |
//! | `/explorer/api/batch/H` | the header at `H` and its receipts |
//! | `/explorer/api/account/PK` | an account's figures (`GetAccount`) |
//! | `/explorer/api/history/PK?from=H` | up to 100 history entries (`GetHistory`) |
//! | `/explorer/api/prove/PK` | the account's balance proof file (`GetBalanceProof`, PROTOCOL.md §11.3), which the account page checks in the browser |
//! | `/explorer/api/key-chain` | the operator's key chain (`GetKeyChain`, PROTOCOL.md §4.14) as the client saves it (`tally-key-chain-v1`) |
//!
//! Reads go to the storage thread like a client's; a full queue answers 503.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use tally_client::balance_proof::BalanceProofFile;
use tally_client::key_chain::{links_before, KeyChainFile};
use tally_core::batch::BatchBody;
use tally_core::crypto::header_hash;
use tally_wire::{KeyLink, Message, PublicKey, SignedHeader};

use crate::channels::{ReplyTo, StorageCmd};
use crate::pipeline::PipelineHandle;

const INDEX: &str = include_str!("../explorer/index.html");
const VERIFY: &str = include_str!("../explorer/verify.html");
const ACCOUNT: &str = include_str!("../explorer/account.html");
const BATCH: &str = include_str!("../explorer/batch.html");
const SCRIPT: &str = include_str!("../explorer/tally.js");
/// How long an API read waits for the storage thread.
const READ_WAIT: Duration = Duration::from_secs(5);

/// One answer of the explorer; `http.rs` writes it.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

pub struct Explorer {
    pipeline: PipelineHandle,
}

impl Explorer {
    pub fn new(pipeline: PipelineHandle) -> Explorer {
        Explorer { pipeline }
    }

    /// Answers a GET of `target` (path and query) under `/explorer`.
    pub async fn get(&self, target: &str) -> Response {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let page = |body: &'static str, content_type| Response {
            status: 200,
            content_type,
            body: body.as_bytes().to_vec(),
        };
        const HTML: &str = "text/html; charset=utf-8";
        match path {
            "/explorer" | "/explorer/" | "/explorer/index.html" => page(INDEX, HTML),
            "/explorer/verify.html" => page(VERIFY, HTML),
            "/explorer/account.html" => page(ACCOUNT, HTML),
            "/explorer/batch.html" => page(BATCH, HTML),
            "/explorer/tally.js" => page(SCRIPT, "text/javascript; charset=utf-8"),
            _ => match path.strip_prefix("/explorer/api/") {
                Some(api) => match self.api(api, query).await {
                    Ok(value) => json_response(200, &value),
                    Err((status, why)) => json_response(status, &json!({ "error": why })),
                },
                None => Response {
                    status: 404,
                    content_type: "text/plain; charset=utf-8",
                    body: b"not found\n".to_vec(),
                },
            },
        }
    }

    async fn api(&self, api: &str, query: &str) -> Result<Value, (u16, String)> {
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let (what, arg) = api.split_once('/').unwrap_or((api, ""));
        match what {
            "checkpoint" => self.checkpoint().await,
            "headers" => self.headers(param("from"), param("limit")).await,
            "batch" => {
                self.batch(arg.parse().map_err(|_| (400, "height".into()))?)
                    .await
            }
            "account" => self.account(parse_key(arg)?).await,
            "history" => {
                self.history(parse_key(arg)?, param("from").unwrap_or(0))
                    .await
            }
            "prove" => self.prove(parse_key(arg)?).await,
            "key-chain" => {
                let (genesis, links) = self.key_chain().await?;
                serde_json::to_value(KeyChainFile::new(&genesis, &links))
                    .map_err(|e| (500, e.to_string()))
            }
            _ => Err((404, format!("no API {what:?}"))),
        }
    }

    /// Sends `cmd` (made with an internal reply) to the storage thread; its answer.
    async fn ask(&self, cmd: impl FnOnce(ReplyTo) -> StorageCmd) -> Result<Message, (u16, String)> {
        let (reply, rx) = ReplyTo::internal(self.pipeline.metrics.clone());
        crate::pipeline::read(&self.pipeline, cmd(reply));
        match tokio::time::timeout(READ_WAIT, rx).await {
            Ok(Ok(Message::Error(e))) => Err((503, format!("{}: {}", e.code, e.message))),
            Ok(Ok(message)) => Ok(message),
            _ => Err((503, "the ledger did not answer in time".into())),
        }
    }

    async fn checkpoint(&self) -> Result<Value, (u16, String)> {
        let height = self.pipeline.applied_height.load(Ordering::SeqCst);
        if let Some(note) = self.pipeline.witnessed.latest() {
            return Ok(json!({ "height": height, "checkpoint": note, "witnessed": true }));
        }
        if height == 0 {
            return Ok(json!({ "height": 0, "checkpoint": null, "witnessed": false }));
        }
        match self
            .ask(|reply| StorageCmd::Consistency {
                from: height,
                to: height,
                reply,
            })
            .await?
        {
            Message::Consistency(c) => Ok(json!({
                "height": height, "checkpoint": c.to.checkpoint, "witnessed": false,
            })),
            other => Err(unexpected(&other)),
        }
    }

    async fn headers(&self, from: Option<u64>, limit: Option<u64>) -> Result<Value, (u16, String)> {
        let limit = limit.unwrap_or(20).clamp(1, 64);
        let height = self.pipeline.applied_height.load(Ordering::SeqCst);
        let from = from.unwrap_or_else(|| height.saturating_sub(limit - 1).max(1));
        let limit = limit as u16;
        match self
            .ask(|reply| StorageCmd::Headers {
                from_height: from,
                limit,
                reply,
            })
            .await?
        {
            Message::Headers(headers) => Ok(json!({
                "height": height,
                "headers": headers.iter().map(header_json).collect::<Vec<_>>(),
            })),
            other => Err(unexpected(&other)),
        }
    }

    async fn batch(&self, height: u64) -> Result<Value, (u16, String)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cmd = StorageCmd::ReadBatches {
            from: height,
            to: height,
            bytes_max: 1,
            reply: tx,
        };
        if self.pipeline.storage_tx.try_send(cmd).is_err() {
            return Err((503, "the storage queue is full".into()));
        }
        let batches = match tokio::time::timeout(READ_WAIT, rx).await {
            Ok(Ok(Ok(batches))) => batches,
            _ => return Err((503, "the ledger did not answer in time".into())),
        };
        let Some((signed, body)) = batches.into_iter().next() else {
            return Err((404, format!("no batch at height {height}")));
        };
        let body = BatchBody::decode(&body).map_err(|e| (500, e.to_string()))?;
        let receipts: Vec<Value> = body
            .operations()
            .map(|(signer, op, r)| {
                json!({
                    "index": r.index, "op": op.op.name(), "op_index": r.op_index,
                    "failed": r.failed.map(|c| c.name()), "signer": hex::encode(signer),
                    "to": hex::encode(op.to),
                    "amount": op.amount, "signer_balance": r.signer_balance,
                    "to_balance": r.to_balance, "request_hash": hex::encode(r.request_hash),
                    "receipt_hash": hex::encode(tally_core::merkle::leaf_hash(&r.encode())),
                })
            })
            .collect();
        Ok(json!({ "header": header_json(&signed), "receipts": receipts }))
    }

    /// The balance proof file of `account`, named with the key that signed its header and
    /// carrying the key chain up to it (the page checks it under a key the person gives, else
    /// under the genesis key this replica serves under).
    async fn prove(&self, account: PublicKey) -> Result<Value, (u16, String)> {
        let proof = match self
            .ask(|reply| StorageCmd::BalanceProof { account, reply })
            .await?
        {
            Message::BalanceProof(p) => p,
            other => return Err(unexpected(&other)),
        };
        // Read after the proof, the chain reaches the proof's header.
        let (genesis, links) = self.key_chain().await?;
        let height = proof.header.header.height;
        let keys = tally_core::key_chain::KeySchedule::follow(genesis, &links)
            .map_err(|e| (500, format!("the ledger's key chain: {e}")))?;
        let file = BalanceProofFile::new(&proof, &keys.key_for(height))
            .with_key_chain(links_before(&links, height));
        serde_json::to_value(file).map_err(|e| (500, e.to_string()))
    }

    /// The genesis key this replica serves under and every rotation since (`GetKeyChain`).
    async fn key_chain(&self) -> Result<(PublicKey, Vec<KeyLink>), (u16, String)> {
        let Some(info) = &self.pipeline.view.info else {
            return Err((503, "this replica is starting".into()));
        };
        match self.ask(|reply| StorageCmd::KeyChain { reply }).await? {
            Message::KeyChain(chain) => Ok((info.operator_public_key, chain.links)),
            other => Err(unexpected(&other)),
        }
    }

    async fn account(&self, account: PublicKey) -> Result<Value, (u16, String)> {
        match self
            .ask(|reply| StorageCmd::Account {
                account,
                at_height: 0,
                reply,
            })
            .await?
        {
            Message::Account(a) => Ok(json!({
                "account": hex::encode(a.account), "height": a.height, "exists": a.exists,
                "balance": a.balance, "pending_debits": a.pending_debits,
                "pending_credits": a.pending_credits,
                "total_debited": a.total_debited.to_string(),
                "total_credited": a.total_credited.to_string(),
                "operation_count": a.operation_count, "last_height": a.last_height,
            })),
            other => Err(unexpected(&other)),
        }
    }

    async fn history(&self, account: PublicKey, from: u64) -> Result<Value, (u16, String)> {
        let limit = 100;
        let cmd = |reply| StorageCmd::History {
            account,
            from_height: from,
            from_index: 0,
            limit,
            reply,
        };
        match self.ask(cmd).await? {
            Message::History(h) => Ok(json!({
                "account": hex::encode(h.account), "height": h.height, "held_from": h.held_from,
                "entries": h.entries.iter().map(|e| json!({
                    "height": e.height, "index": e.index, "op": e.op.name(), "debit": e.debit,
                    "counterparty": hex::encode(e.counterparty), "amount": e.amount,
                    "balance": e.balance, "receipt_hash": hex::encode(e.receipt_hash),
                })).collect::<Vec<_>>(),
                "next_height": h.next.map(|n| n.0),
            })),
            other => Err(unexpected(&other)),
        }
    }
}

fn header_json(s: &SignedHeader) -> Value {
    let h = &s.header;
    json!({
        "height": h.height, "term": h.term, "time_unix_ms": h.time_unix_ms,
        "request_count": h.request_count, "header_hash": hex::encode(header_hash(h)),
        "prev_hash": hex::encode(h.prev_hash), "merkle_root": hex::encode(h.merkle_root),
        "state_digest": hex::encode(h.state_digest), "signed_header_hex": hex::encode(s.encode()),
    })
}

fn parse_key(text: &str) -> Result<PublicKey, (u16, String)> {
    hex::decode(text)
        .ok()
        .and_then(|b| PublicKey::try_from(b).ok())
        .ok_or((400, "an account is 64 hex digits".into()))
}

fn unexpected(message: &Message) -> (u16, String) {
    (
        500,
        format!("unexpected answer 0x{:02x}", message.message_type()),
    )
}

fn json_response(status: u16, value: &Value) -> Response {
    Response {
        status,
        content_type: "application/json",
        body: (value.to_string() + "\n").into_bytes(),
    }
}
