//! What the client remembers of each ledger: the newest signed header it has verified, with
//! the operator's checkpoint of the header log at its height (PROTOCOL.md §4.12), in
//! `<profile dir>/trust/<chain id hex>.json`. Every header the client sees afterwards is
//! checked against it with a consistency proof ([`TrustStore::check`]): a header that is not
//! on the same log is a split view, saved with the header it contradicts under
//! `<profile dir>/evidence/` and reported as [`Error::SplitView`].
//!
//! Trust on first use: the first header seen for a ledger is taken as the start of its log.
//! Concurrent processes may each update the file; the newest height wins, and a lost update
//! only means the next check starts from an older header.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_core::crypto::header_hash;
use tally_core::header_log::{
    checkpoints_split, open_note_under, split_view, verify_consistency_reply_under,
};
use tally_core::key_chain::KeySchedule;
use tally_core::tlog::{origin_for, Checkpoint};
use tally_core::witness::cosigned_at;
use tally_wire::{ConsistencyReply, ErrorCode, Hash, LogPoint, SignedHeader};

use crate::confirmation::write_atomically;
use crate::{ClusterClient, Error, Result};

/// `format` of the file that holds the newest verified header of a ledger.
pub const TRUSTED_HEADER_FORMAT: &str = "tally-trusted-header-v1";
/// `format` of a split view's evidence file.
pub const SPLIT_VIEW_FORMAT: &str = "tally-split-view-evidence-v1";

/// How long a check waits for a replica to apply the height it was asked about.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HeldFile {
    format: String,
    chain_id: String,
    height: u64,
    header_hex: String,
    checkpoint: String,
}

/// The newest header verified for one ledger, and its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub header: SignedHeader,
    pub checkpoint: Checkpoint,
    note: String,
}

/// What [`TrustStore::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Nothing was held for the ledger: the header is now.
    First,
    /// The held header itself.
    Same,
    /// A newer header, proven to extend the held one; it is held now.
    Extended { from: u64 },
    /// An older header, proven to be in the held one's log.
    Older { held: u64 },
}

/// The trust directory of one profile, and the witness cosignatures it requires.
pub struct TrustStore {
    dir: PathBuf,
    quorum: Option<Quorum>,
}

/// `witness_quorum` of the profile's `witnesses`.
struct Quorum {
    k: usize,
    witnesses: Vec<(String, ed25519_dalek::VerifyingKey)>,
}

/// How long a check waits for the witnesses to cosign a checkpoint that covers a header.
const WITNESS_WAIT: Duration = Duration::from_secs(10);
/// How often a command asks for the newest cosigned checkpoint while it waits for one that
/// covers its header: the leader holds it in memory, so a poll is one small round trip, and
/// the wait is a witness round (within 100 ms of the batch) plus at most one poll.
const WITNESS_POLL: Duration = Duration::from_millis(25);

impl TrustStore {
    /// The store of the profile in `profile_dir`.
    pub fn new(profile_dir: &Path) -> TrustStore {
        TrustStore {
            dir: profile_dir.to_path_buf(),
            quorum: None,
        }
    }

    /// Also requires, for every header checked, a checkpoint at or above it cosigned by
    /// `profile.witness_quorum` of `profile.witnesses` (none when the quorum is 0).
    pub fn with_witnesses(mut self, profile: &crate::Profile) -> Result<TrustStore> {
        if profile.witness_quorum == 0 {
            return Ok(self);
        }
        let mut witnesses = Vec::new();
        for w in &profile.witnesses {
            let key = crate::parse_public_key(&w.public_key)?;
            let key =
                ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| Error::Invalid {
                    what: "witness key",
                    reason: format!("{}: not an Ed25519 point", w.name),
                })?;
            witnesses.push((w.name.clone(), key));
        }
        self.quorum = Some(Quorum {
            k: profile.witness_quorum as usize,
            witnesses,
        });
        Ok(self)
    }

    fn held_path(&self, chain_id: &Hash) -> PathBuf {
        self.dir
            .join("trust")
            .join(format!("{}.json", hex::encode(chain_id)))
    }

    /// The held header of `chain_id`, verified again under `operator` (the file could have been
    /// edited), if any.
    pub fn held(&self, chain_id: &Hash, operator: &KeySchedule) -> Result<Option<Held>> {
        let path = self.held_path(chain_id);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let bad = |what: String| Error::Verify(format!("{}: {what}", path.display()));
        let file: HeldFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if file.format != TRUSTED_HEADER_FORMAT {
            return Err(bad(format!("format {:?}", file.format)));
        }
        let bytes = hex::decode(&file.header_hex).map_err(|e| bad(e.to_string()))?;
        let header = SignedHeader::decode(&bytes).map_err(|e| bad(e.to_string()))?;
        operator
            .verify_header(&header)
            .map_err(|e| bad(e.to_string()))?;
        let checkpoint = open_checkpoint(&file.checkpoint, operator, chain_id)
            .map_err(|e| bad(format!("checkpoint: {e}")))?;
        if header.header.chain_id != *chain_id || checkpoint.size != header.header.height {
            return Err(bad("the header and checkpoint do not match the file".into()));
        }
        Ok(Some(Held {
            header,
            checkpoint,
            note: file.checkpoint,
        }))
    }

    /// Checks `seen` (a header the client just verified under `operator`) against the held
    /// header of its ledger with a consistency proof from `cluster`, and holds it if newer.
    pub async fn check(
        &self,
        cluster: &ClusterClient,
        operator: &KeySchedule,
        seen: &SignedHeader,
    ) -> Result<Checked> {
        let checked = self.check_held(cluster, operator, seen).await?;
        if let Some(quorum) = &self.quorum {
            self.witnessed(cluster, operator, seen, quorum).await?;
        }
        Ok(checked)
    }

    /// Waits (at most [`WITNESS_WAIT`]) for a checkpoint at or above `seen` cosigned by the
    /// quorum, proves `seen` is in it, and holds it.
    async fn witnessed(
        &self,
        cluster: &ClusterClient,
        operator: &KeySchedule,
        seen: &SignedHeader,
        quorum: &Quorum,
    ) -> Result<()> {
        let chain_id = seen.header.chain_id;
        let height = seen.header.height;
        let started = std::time::Instant::now();
        let (note, checkpoint) = loop {
            let found = match cluster.checkpoint().await {
                Ok(note) => {
                    let cp = open_checkpoint(&note, operator, &chain_id)?;
                    let count = quorum
                        .witnesses
                        .iter()
                        .filter(|(name, key)| matches!(cosigned_at(&note, name, key), Ok(Some(_))))
                        .count();
                    (cp.size >= height && count >= quorum.k).then_some((note, cp, count))
                }
                Err(Error::Rejected(r)) if r.code == ErrorCode::NotFound => None,
                Err(e) => return Err(e),
            };
            if let Some((note, cp, _)) = found {
                break (note, cp);
            }
            if started.elapsed() > WITNESS_WAIT {
                return Err(Error::Verify(format!(
                    "no checkpoint at or above height {height} cosigned by {} of the profile's \
                     {} witnesses within {} s",
                    quorum.k,
                    quorum.witnesses.len(),
                    WITNESS_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(WITNESS_POLL).await;
        };
        let reply = proof(cluster, operator, &chain_id, (height, checkpoint.size)).await?;
        self.compare(operator, ("seen", seen), ("served", &reply.from.header))?;
        let served = open_checkpoint(&reply.to.checkpoint, operator, &chain_id)?;
        if checkpoints_split(&checkpoint, &served) {
            let evidence = self.save_evidence(
                operator,
                checkpoint.size,
                json!({ "held_checkpoint": note, "served_checkpoint": reply.to.checkpoint }),
            )?;
            return Err(Error::SplitView {
                height: checkpoint.size,
                evidence,
            });
        }
        let held = self.held(&chain_id, operator)?;
        if held.is_none_or(|h| h.header.header.height <= checkpoint.size) {
            let point = LogPoint {
                checkpoint: note,
                ..reply.to
            };
            self.hold(&point)?;
        }
        Ok(())
    }

    async fn check_held(
        &self,
        cluster: &ClusterClient,
        operator: &KeySchedule,
        seen: &SignedHeader,
    ) -> Result<Checked> {
        operator
            .verify_header(seen)
            .map_err(|e| Error::Verify(e.to_string()))?;
        let chain_id = seen.header.chain_id;
        let height = seen.header.height;
        let Some(held) = self.held(&chain_id, operator)? else {
            let reply = proof(cluster, operator, &chain_id, (height, height)).await?;
            self.compare(operator, ("seen", seen), ("served", &reply.to.header))?;
            self.hold(&reply.to)?;
            return Ok(Checked::First);
        };
        let held_height = held.header.header.height;
        if held_height == height {
            self.compare(operator, ("held", &held.header), ("seen", seen))?;
            return Ok(Checked::Same);
        }
        let (low, high) = (held_height.min(height), held_height.max(height));
        let reply = proof(cluster, operator, &chain_id, (low, high)).await?;
        let (older, newer) = if held_height < height {
            (&held.header, seen)
        } else {
            (seen, &held.header)
        };
        self.compare(
            operator,
            ("held or seen", older),
            ("served", &reply.from.header),
        )?;
        self.compare(
            operator,
            ("held or seen", newer),
            ("served", &reply.to.header),
        )?;
        let served = open_checkpoint(&reply.from.checkpoint, operator, &chain_id)?;
        let served_high = open_checkpoint(&reply.to.checkpoint, operator, &chain_id)?;
        for cp in [&served, &served_high] {
            if checkpoints_split(&held.checkpoint, cp) {
                let evidence = self.save_evidence(
                    operator,
                    held_height,
                    json!({ "held_checkpoint": held.note, "served_checkpoint":
                        if cp.size == served.size { &reply.from.checkpoint } else { &reply.to.checkpoint } }),
                )?;
                return Err(Error::SplitView {
                    height: held_height,
                    evidence,
                });
            }
        }
        if held_height < height {
            self.hold(&reply.to)?;
            return Ok(Checked::Extended { from: held_height });
        }
        Ok(Checked::Older { held: held_height })
    }

    /// Fails with a split view, saving both, when `a` and `b` are two headers of one height.
    fn compare(
        &self,
        operator: &KeySchedule,
        a: (&str, &SignedHeader),
        b: (&str, &SignedHeader),
    ) -> Result<()> {
        if a.1.encode() == b.1.encode() {
            return Ok(());
        }
        if !split_view(a.1, b.1) {
            return Err(Error::Protocol(format!(
                "the server answered header {} for height {}",
                b.1.header.height, a.1.header.height
            )));
        }
        let height = a.1.header.height;
        let describe = |(role, h): (&str, &SignedHeader)| {
            json!({
                "role": role,
                "height": h.header.height,
                "header_hash": hex::encode(header_hash(&h.header)),
                "signed_header_hex": hex::encode(h.encode()),
            })
        };
        let evidence = self.save_evidence(
            operator,
            height,
            json!({ "headers": [describe(a), describe(b)] }),
        )?;
        Err(Error::SplitView { height, evidence })
    }

    /// Writes `what` as a split view's evidence file; returns its path.
    fn save_evidence(
        &self,
        operator: &KeySchedule,
        height: u64,
        what: serde_json::Value,
    ) -> Result<PathBuf> {
        let dir = self.dir.join("evidence");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let path = dir.join(format!("split-view-{height}-{ms}.json"));
        let mut body = json!({
            "format": SPLIT_VIEW_FORMAT,
            "operator_public_key": hex::encode(operator.current()),
            "height": height,
        });
        if let (Some(body), serde_json::Value::Object(more)) = (body.as_object_mut(), what) {
            body.extend(more);
        }
        let text = serde_json::to_string_pretty(&body).expect("JSON") + "\n";
        write_atomically(&path, &text)?;
        Ok(path)
    }

    /// Holds `point` (verified) as the newest header of its ledger, unless a newer one is.
    fn hold(&self, point: &LogPoint) -> Result<()> {
        let chain_id = point.header.header.chain_id;
        let path = self.held_path(&chain_id);
        let dir = path.parent().expect("a directory");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let file = HeldFile {
            format: TRUSTED_HEADER_FORMAT.into(),
            chain_id: hex::encode(chain_id),
            height: point.header.header.height,
            header_hex: hex::encode(point.header.encode()),
            checkpoint: point.checkpoint.clone(),
        };
        let text = serde_json::to_string_pretty(&file).expect("JSON") + "\n";
        write_atomically(&path, &text)
    }
}

/// A consistency proof from `cluster`, verified under `operator`; waits (bounded) for a
/// replica that has not applied `high` yet.
pub async fn proof(
    cluster: &ClusterClient,
    operator: &KeySchedule,
    chain_id: &Hash,
    (low, high): (u64, u64),
) -> Result<ConsistencyReply> {
    let started = std::time::Instant::now();
    let reply = loop {
        match cluster.consistency(low, high).await {
            Err(Error::Rejected(r))
                if r.code == ErrorCode::HeightNotApplied && started.elapsed() < CATCH_UP_WAIT =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other?,
        }
    };
    verify_consistency_reply_under(&reply, operator, chain_id)
        .map_err(|e| Error::Verify(format!("consistency proof {low} -> {high}: {e}")))?;
    Ok(reply)
}

/// Opens a checkpoint note of `chain_id`'s log under an operator key of the chain (any of
/// them: the size is only known once it is open).
fn open_checkpoint(note: &str, operator: &KeySchedule, chain_id: &Hash) -> Result<Checkpoint> {
    let origin = origin_for(chain_id);
    let body = open_note_under(note, &origin, &operator.keys())
        .map_err(|e| Error::Verify(e.to_string()))?;
    Checkpoint::parse_body(&body).map_err(|e| Error::Verify(e.to_string()))
}
