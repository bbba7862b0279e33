//! One TLS connection to a replica, multiplexed: many requests in flight, matched to their
//! answers by correlation id.
//!
//! A writer task drains a bounded queue of encoded frames into the stream; a reader task cuts
//! frames from the stream and hands each answer to the caller waiting on its correlation id.
//! When the queue is full, callers wait for room (within their timeout): the server's own limit
//! on requests in flight, not this queue, is what pushes back.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tally_core::engine::apply::Found;
use tally_wire::{
    decode_frame, AdminRequest, BalanceReply, Confirmation, Decoded, Envelope,
    EnvelopeConfirmation, InfoReply, MembersReply, Message, PublicKey, RawFrame, ReadMode, Request,
    SignedHeader, StatusReply, WireError, FRAME_PAYLOAD_BYTES_MAX_DEFAULT,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::{Error, Profile, Result};

/// How long a call (or a connection's TCP and TLS handshake) may take unless configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Encoded frames queued for the writer task at most.
pub const OUTGOING_FRAMES_MAX: usize = 1024;
/// Bytes read from the stream at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Opens a TLS connection to `addr`, trusting only the profile's CA and checking the profile's
/// server name. Tests use the raw stream to send arbitrary bytes.
pub async fn tls_connect<A>(addr: A, profile: &Profile) -> Result<TlsStream<TcpStream>>
where
    A: ToSocketAddrs + Display,
{
    tls_connect_timeout(addr, profile, DEFAULT_TIMEOUT).await
}

async fn tls_connect_timeout<A>(
    addr: A,
    profile: &Profile,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>>
where
    A: ToSocketAddrs + Display,
{
    let connector = tls_connector(profile)?;
    let server_name = ServerName::try_from(profile.server_name.clone()).map_err(|e| {
        Error::Tls(format!(
            "server name {:?} is not a DNS name or IP address: {e}",
            profile.server_name
        ))
    })?;
    let address = addr.to_string();
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| Error::Connect {
                address: address.clone(),
                source,
            })?;
        // Requests are small and latency matters more than packet count.
        tcp.set_nodelay(true).map_err(|source| Error::Connect {
            address: address.clone(),
            source,
        })?;
        connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| Error::Tls(format!("handshake with {address} failed: {e}")))
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| Error::Timeout)?
}

/// A rustls client configuration (ring provider) that trusts only the profile's CA.
fn tls_connector(profile: &Profile) -> Result<TlsConnector> {
    let path = &profile.ca_cert;
    // A small file read once per connection; not worth a blocking-pool hop.
    let pem = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no PEM certificate in the file",
            path.display()
        )));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

type Reply = oneshot::Sender<std::result::Result<Message, WireError>>;

/// Callers waiting for an answer, by correlation id.
#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, Reply>,
    /// Set once the connection is gone; no caller may wait after that.
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding the lock, and the map stays consistent if it did.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails every waiting caller with `Disconnected` (their senders drop) and refuses new ones.
    fn close(&self) {
        let waiting = {
            let mut pending = self.lock();
            pending.closed = true;
            std::mem::take(&mut pending.waiting)
        };
        drop(waiting);
    }

    fn deliver(&self, frame: RawFrame) {
        let Some(reply) = self.lock().waiting.remove(&frame.correlation_id) else {
            // The caller gave up (timeout) or the server invented an id: nobody to tell.
            return;
        };
        // Decoded outside the lock. A malformed payload inside a well-formed frame does not
        // desynchronize the stream: that caller gets the error, the others carry on.
        let _ = reply.send(Message::decode(&frame));
    }
}

/// Removes a caller's entry if it stops waiting early (timeout, or its future was dropped).
struct WaitGuard<'a> {
    shared: &'a Shared,
    correlation_id: u64,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiting.remove(&self.correlation_id);
    }
}

/// A connection to one replica. Every method takes `&self` and may be called concurrently from
/// many tasks (share it in an `Arc`). Dropping the client closes the connection.
pub struct Client {
    outgoing: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
    next_correlation_id: AtomicU64,
    timeout: Duration,
    address: String,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Client {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Client {
    /// Connects to the first replica of the profile that accepts a connection, trying them in
    /// order.
    pub async fn connect(profile: &Profile) -> Result<Client> {
        Client::connect_timeout(profile, DEFAULT_TIMEOUT).await
    }

    /// [`Client::connect`] with a timeout for each handshake and for every later call.
    pub async fn connect_timeout(profile: &Profile, timeout: Duration) -> Result<Client> {
        let mut last = Error::Invalid {
            what: "profile",
            reason: "it lists no replicas".into(),
        };
        for replica in &profile.replicas {
            match Client::connect_to_timeout(replica.address.as_str(), profile, timeout).await {
                Ok(client) => return Ok(client),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Connects to one address, with the profile's CA and server name.
    pub async fn connect_to<A>(addr: A, profile: &Profile) -> Result<Client>
    where
        A: ToSocketAddrs + Display,
    {
        Client::connect_to_timeout(addr, profile, DEFAULT_TIMEOUT).await
    }

    /// [`Client::connect_to`] with a timeout for the handshake and for every later call.
    pub async fn connect_to_timeout<A>(
        addr: A,
        profile: &Profile,
        timeout: Duration,
    ) -> Result<Client>
    where
        A: ToSocketAddrs + Display,
    {
        let address = addr.to_string();
        let stream = tls_connect_timeout(addr, profile, timeout).await?;
        Ok(Client::from_stream(stream, address).with_timeout(timeout))
    }

    /// Runs the protocol over any byte stream (tests use an in-memory pipe). Spawns the reader
    /// and writer tasks, so it must be called within a tokio runtime.
    pub fn from_stream<S>(stream: S, address: String) -> Client
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        let (outgoing, queue) = mpsc::channel(OUTGOING_FRAMES_MAX);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
        });
        let tasks = [
            tokio::spawn(read_loop(reader, shared.clone())),
            tokio::spawn(write_loop(writer, queue, shared.clone())),
        ];
        Client {
            outgoing,
            shared,
            // 0 is left unused, so that a server's connection-level error (id 0) never reaches
            // a caller by accident.
            next_correlation_id: AtomicU64::new(1),
            timeout: DEFAULT_TIMEOUT,
            address,
            tasks,
        }
    }

    /// Sets the timeout of every call.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The address this client connected to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// False once the connection is known to be gone.
    pub fn is_connected(&self) -> bool {
        !self.shared.lock().closed
    }

    /// Submits a signed request and waits for its confirmation. A refusal becomes
    /// [`Error::Rejected`]. The confirmation is checked to be for this request, but not verified
    /// cryptographically: use [`tally_core::verify::verify_confirmation`] with the operator key.
    pub async fn submit(&self, request: Request) -> Result<Confirmation> {
        self.submit_message(Message::Submit(request.clone()), &request)
            .await
    }

    /// [`Client::submit`] with the request's nonce hint
    /// ([`tally_core::crypto::sign_request_with_hint`]), so that the server can check the
    /// signature in a batch. The answer is the same as for a plain submit.
    pub async fn submit_hinted(
        &self,
        request: Request,
        hint: tally_wire::NonceHint,
    ) -> Result<Confirmation> {
        self.submit_message(Message::SubmitHinted(request.clone(), hint), &request)
            .await
    }

    async fn submit_message(&self, message: Message, request: &Request) -> Result<Confirmation> {
        match self.call(message).await? {
            Message::Confirmed(c) if c.request == *request => Ok(*c),
            Message::Confirmed(_) => Err(Error::Protocol(
                "the confirmation is for a different request".into(),
            )),
            other => Err(unexpected("Confirmed", &other)),
        }
    }

    /// Submits a signed envelope and waits for its confirmation; an atomic envelope that applied
    /// nothing is [`Error::EnvelopeFailed`]. The confirmation is checked to be for this
    /// envelope, not verified: use [`tally_core::verify::verify_envelope_confirmation`].
    pub async fn submit_envelope(&self, envelope: Envelope) -> Result<EnvelopeConfirmation> {
        let hash = tally_core::crypto::envelope_hash(&envelope);
        match self
            .call(Message::SubmitEnvelope(Box::new(envelope)))
            .await?
        {
            Message::EnvelopeConfirmed(c) if c.envelope_hash == hash => Ok(*c),
            Message::EnvelopeConfirmed(_) => Err(Error::Protocol(
                "the confirmation is for a different envelope".into(),
            )),
            Message::EnvelopeFailed(f) => Err(Error::EnvelopeFailed(f)),
            other => Err(unexpected("EnvelopeConfirmed", &other)),
        }
    }

    /// The original confirmation of the operation `(signer, id)`, read from this replica's
    /// applied state without submitting anything; `not_found` is [`Error::Rejected`]. Checked
    /// to be for that key, not verified.
    pub async fn find_confirmation(&self, signer: PublicKey, id: u128) -> Result<Found> {
        let wrong = || Error::Protocol("the confirmation is for another (signer, id)".into());
        match self.call(Message::GetConfirmation { signer, id }).await? {
            Message::Confirmed(c) if (c.request.signer, c.request.id) == (signer, id) => {
                Ok(Found::Request(c))
            }
            Message::OperationConfirmed(c) => {
                let op = c.envelope.ops.get(c.receipt.op_index as usize);
                if c.envelope.signer != signer || op.map(|o| o.id) != Some(id) {
                    return Err(wrong());
                }
                Ok(Found::Operation(c))
            }
            Message::Confirmed(_) => Err(wrong()),
            other => Err(unexpected("Confirmed or OperationConfirmed", &other)),
        }
    }

    /// The confirmation of the operation whose receipt has Merkle leaf hash `leaf_hash`, from
    /// this replica's applied state; `not_found` is [`Error::Rejected`]. Checked to be for that
    /// receipt, not verified.
    pub async fn find_by_receipt(&self, leaf_hash: tally_wire::Hash) -> Result<Found> {
        let found = match self
            .call(Message::GetConfirmationByReceipt { leaf_hash })
            .await?
        {
            Message::Confirmed(c) => Found::Request(c),
            Message::OperationConfirmed(c) => Found::Operation(c),
            Message::ExpiryConfirmed(c) => Found::Expiry(c),
            other => {
                let expected = "Confirmed, OperationConfirmed or ExpiryConfirmed";
                return Err(unexpected(expected, &other));
            }
        };
        if tally_core::merkle::leaf_hash(&found.receipt().encode()) != leaf_hash {
            return Err(Error::Protocol(
                "the confirmation is for another receipt".into(),
            ));
        }
        Ok(found)
    }

    /// A page of `account`'s history from `(from_height, from_index)` on (`from_height` 0:
    /// from the oldest height the replica holds), up to `limit` entries.
    pub async fn history(
        &self,
        account: PublicKey,
        from_height: u64,
        from_index: u32,
        limit: u16,
    ) -> Result<tally_wire::HistoryReply> {
        let ask = Message::GetHistory {
            account,
            from_height,
            from_index,
            limit,
        };
        match self.call(ask).await? {
            Message::History(h) if h.account == account => Ok(*h),
            other => Err(unexpected("History", &other)),
        }
    }

    /// `account`'s figures at the applied height (`at_height` 0) or as of `at_height`.
    pub async fn account(
        &self,
        account: PublicKey,
        at_height: u64,
    ) -> Result<tally_wire::AccountReply> {
        match self
            .call(Message::GetAccount { account, at_height })
            .await?
        {
            Message::Account(a) if a.account == account => Ok(*a),
            other => Err(unexpected("Account", &other)),
        }
    }

    /// The operator's totals and the sum of balances, as this replica has applied them.
    pub async fn supply(&self) -> Result<tally_wire::SupplyReply> {
        match self.call(Message::GetSupply).await? {
            Message::Supply(s) => Ok(s),
            other => Err(unexpected("Supply", &other)),
        }
    }

    /// Reads an account's balance.
    pub async fn balance(&self, account: PublicKey, mode: ReadMode) -> Result<BalanceReply> {
        match self.call(Message::GetBalance { account, mode }).await? {
            Message::Balance(b) if b.account == account => Ok(b),
            Message::Balance(_) => Err(Error::Protocol(
                "the balance is for a different account".into(),
            )),
            other => Err(unexpected("Balance", &other)),
        }
    }

    /// Signed headers from `from_height` on, at most `limit` (the server may send fewer; see
    /// `HEADERS_PER_REPLY_MAX`). Signatures are not checked here.
    pub async fn headers(&self, from_height: u64, limit: u16) -> Result<Vec<SignedHeader>> {
        match self
            .call(Message::GetHeaders { from_height, limit })
            .await?
        {
            Message::Headers(headers) => Ok(headers),
            other => Err(unexpected("Headers", &other)),
        }
    }

    /// The header log's consistency from `from_height` to `to_height` (0: the replica's
    /// applied height). Nothing is verified here: see
    /// [`tally_core::header_log::verify_consistency_reply`].
    pub async fn consistency(
        &self,
        from_height: u64,
        to_height: u64,
    ) -> Result<tally_wire::ConsistencyReply> {
        let message = Message::GetConsistency {
            from_height,
            to_height,
        };
        match self.call(message).await? {
            Message::Consistency(r)
                if r.from.header.header.height == from_height
                    && (to_height == 0 || r.to.header.header.height == to_height) =>
            {
                Ok(*r)
            }
            Message::Consistency(_) => Err(Error::Protocol(
                "the consistency proof is for other heights".into(),
            )),
            other => Err(unexpected("Consistency", &other)),
        }
    }

    /// `account`'s balance proved against the replica's applied header (PROTOCOL.md §4.13).
    /// Not verified here: see [`tally_core::verify::verify_balance_proof`].
    pub async fn balance_proof(&self, account: PublicKey) -> Result<tally_wire::BalanceProofReply> {
        match self.call(Message::GetBalanceProof { account }).await? {
            Message::BalanceProof(p) if p.account == account => Ok(*p),
            Message::BalanceProof(_) => Err(Error::Protocol(
                "the balance proof is for another account".into(),
            )),
            other => Err(unexpected("BalanceProof", &other)),
        }
    }

    /// Every operator key rotation the ledger applied, oldest first (PROTOCOL.md §4.14). Not
    /// verified here: see [`tally_core::key_chain::KeySchedule::follow`].
    pub async fn key_chain(&self) -> Result<tally_wire::KeyChainReply> {
        match self.call(Message::GetKeyChain).await? {
            Message::KeyChain(c) => Ok(*c),
            other => Err(unexpected("KeyChain", &other)),
        }
    }

    /// Sends an admin's `RotateKey`: answered with the rotation's key link once it is applied.
    /// Not verified here.
    pub async fn rotate_key(&self, request: AdminRequest) -> Result<tally_wire::KeyLink> {
        match self.call(Message::Admin(Box::new(request))).await? {
            Message::KeyChain(c) if c.links.len() == 1 => {
                Ok(c.links.into_iter().next().expect("one link"))
            }
            other => Err(unexpected("KeyChain (one link)", &other)),
        }
    }

    /// The newest checkpoint the leader's witnesses cosigned (a signed note). Not verified here.
    pub async fn checkpoint(&self) -> Result<String> {
        match self.call(Message::GetCheckpoint).await? {
            Message::Checkpoint(note) => Ok(note),
            other => Err(unexpected("Checkpoint", &other)),
        }
    }

    /// The replica's view of itself and the cluster.
    pub async fn status(&self) -> Result<StatusReply> {
        match self.call(Message::GetStatus).await? {
            Message::Status(s) => Ok(*s),
            other => Err(unexpected("Status", &other)),
        }
    }

    /// The ledger's chain id, the operator key the replica signs with, and its frame and
    /// message size limits (`GetInfo`; a replica older than it answers
    /// `unknown_message_type`).
    pub async fn info(&self) -> Result<InfoReply> {
        match self.call(Message::GetInfo).await? {
            Message::Info(info) => Ok(*info),
            other => Err(unexpected("Info", &other)),
        }
    }

    /// Sends a signed admin request ([`tally_core::crypto::sign_admin`]) and returns the
    /// membership the replica answers with. Send each request once: the same bytes again are
    /// refused `stale_request` (PROTOCOL.md §3, `0x07 Admin`).
    pub async fn admin(&self, request: AdminRequest) -> Result<MembersReply> {
        match self.call(Message::Admin(Box::new(request))).await? {
            Message::Members(members) => Ok(*members),
            other => Err(unexpected("Members", &other)),
        }
    }

    /// Sends any message and returns the answer. An `Error` answer becomes
    /// [`Error::Rejected`]; any other answer is returned as it is.
    pub async fn call(&self, message: Message) -> Result<Message> {
        let correlation_id = self.next_correlation_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut pending = self.shared.lock();
            if pending.closed {
                return Err(Error::Disconnected);
            }
            pending.waiting.insert(correlation_id, reply);
        }
        let _guard = WaitGuard {
            shared: &self.shared,
            correlation_id,
        };
        let frame = message.encode_frame(correlation_id);
        let exchange = async {
            self.outgoing
                .send(frame)
                .await
                .map_err(|_| Error::Disconnected)?;
            answer.await.map_err(|_| Error::Disconnected)
        };
        let decoded = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Error::Timeout)??;
        match decoded {
            Ok(Message::Error(reply)) => Err(Error::Rejected(reply)),
            Ok(message) => Ok(message),
            Err(e) => Err(Error::Protocol(format!("malformed reply: {e}"))),
        }
    }
}

fn unexpected(wanted: &str, got: &Message) -> Error {
    Error::Protocol(format!(
        "expected a {wanted} reply, got message type 0x{:02x}",
        got.message_type()
    ))
}

async fn read_loop<R: AsyncRead + Unpin>(mut reader: R, shared: Arc<Shared>) {
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    'connection: loop {
        let mut used = 0;
        loop {
            match decode_frame(&buffer[used..], FRAME_PAYLOAD_BYTES_MAX_DEFAULT) {
                Ok(Decoded::Complete(frame, n)) => {
                    used += n;
                    shared.deliver(frame);
                }
                Ok(Decoded::Incomplete { .. }) => break,
                // A broken frame header leaves the stream at an unknown position.
                Err(_) => break 'connection,
            }
        }
        buffer.drain(..used);
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    shared.close();
}

/// Bytes the write loop gathers before handing them to TLS (a flush sends them sooner).
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

async fn write_loop<W: AsyncWrite + Unpin>(
    writer: W,
    mut queue: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    // tokio-rustls seals and sends a TLS record on every write: buffered, the frames queued
    // together go out as full records, one syscall per buffer.
    let mut writer = tokio::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
    'connection: while let Some(frame) = queue.recv().await {
        if writer.write_all(&frame).await.is_err() {
            break;
        }
        // Write whatever else is queued before flushing: fewer, fuller TLS records under load.
        while let Ok(frame) = queue.try_recv() {
            if writer.write_all(&frame).await.is_err() {
                break 'connection;
            }
        }
        if writer.flush().await.is_err() {
            break;
        }
    }
    shared.close();
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_wire::{encode_frame, message_type, ErrorCode, ErrorReply, Header};
    use tokio::io::DuplexStream;

    /// Reads one whole frame from the fake server's end.
    async fn read_frame(server: &mut DuplexStream, buffer: &mut Vec<u8>) -> Option<RawFrame> {
        loop {
            if let Decoded::Complete(frame, n) =
                decode_frame(buffer, FRAME_PAYLOAD_BYTES_MAX_DEFAULT).unwrap()
            {
                buffer.drain(..n);
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            let n = server.read(&mut chunk).await.unwrap();
            if n == 0 {
                return None;
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
    }

    fn header(height: u64) -> SignedHeader {
        SignedHeader {
            header: Header {
                chain_id: [1; 32],
                height,
                term: 1,
                time_unix_ms: 0,
                request_count: 1,
                prev_hash: [0; 32],
                merkle_root: [0; 32],
                state_digest: [0; 32],
                operator_key_id: [0; 8],
            },
            signature: [0; 64],
        }
    }

    /// Many calls in flight at once, answered in reverse order, each reaching its own caller;
    /// an `Error` answer becomes `Rejected`.
    #[tokio::test]
    async fn answers_reach_their_callers_out_of_order() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let client = Arc::new(Client::from_stream(near, "test".into()));
        const CALLS: u64 = 50;
        let server = tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut frames = Vec::new();
            for _ in 0..CALLS {
                frames.push(read_frame(&mut far, &mut buffer).await.unwrap());
            }
            let mut out = Vec::new();
            for frame in frames.iter().rev() {
                let Message::GetHeaders { from_height, .. } = Message::decode(frame).unwrap()
                else {
                    panic!("unexpected request");
                };
                let answer = if from_height % 7 == 0 {
                    Message::Error(ErrorReply::new(ErrorCode::NotFound, "no such height"))
                } else {
                    Message::Headers(vec![header(from_height)])
                };
                out.extend(answer.encode_frame(frame.correlation_id));
            }
            far.write_all(&out).await.unwrap();
            far
        });
        let mut calls = Vec::new();
        for height in 1..=CALLS {
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                (height, client.headers(height, 1).await)
            }));
        }
        for call in calls {
            let (height, result) = call.await.unwrap();
            if height % 7 == 0 {
                match result {
                    Err(Error::Rejected(reply)) => assert_eq!(reply.code, ErrorCode::NotFound),
                    other => panic!("height {height}: {other:?}"),
                }
            } else {
                assert_eq!(result.unwrap(), vec![header(height)]);
            }
        }
        let _far = server.await.unwrap();
        assert!(client.is_connected());
    }

    /// A dropped connection fails the waiting callers and every later call.
    #[tokio::test]
    async fn disconnect_fails_pending_calls() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let client = Client::from_stream(near, "test".into());
        let server = tokio::spawn(async move {
            let mut buffer = Vec::new();
            read_frame(&mut far, &mut buffer).await.unwrap();
            drop(far);
        });
        assert!(matches!(client.status().await, Err(Error::Disconnected)));
        server.await.unwrap();
        assert!(matches!(client.status().await, Err(Error::Disconnected)));
        assert!(!client.is_connected());
    }

    /// Silence becomes a timeout; a malformed payload fails only its own call; garbage that
    /// breaks framing closes the connection.
    #[tokio::test]
    async fn timeouts_malformed_replies_and_garbage() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let client =
            Client::from_stream(near, "test".into()).with_timeout(Duration::from_millis(200));
        let server = tokio::spawn(async move {
            let mut buffer = Vec::new();
            read_frame(&mut far, &mut buffer).await.unwrap(); // ignored: times out
            let frame = read_frame(&mut far, &mut buffer).await.unwrap();
            let mut out = Vec::new();
            encode_frame(
                &mut out,
                message_type::STATUS,
                frame.correlation_id,
                &[1, 2, 3],
            );
            far.write_all(&out).await.unwrap();
            read_frame(&mut far, &mut buffer).await.unwrap();
            far.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .await
                .unwrap();
            far
        });
        assert!(matches!(client.status().await, Err(Error::Timeout)));
        assert!(matches!(client.status().await, Err(Error::Protocol(_))));
        assert!(matches!(client.status().await, Err(Error::Disconnected)));
        let _far = server.await.unwrap();
    }
}
