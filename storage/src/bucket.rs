//! Object storage for the archive: S3 (any S3-compatible store) or a local directory, through
//! the `object_store` crate, with the three writes the archive needs and nothing else.
//!
//! - [`Bucket::put_new`]: create-only. The same bytes again is an idempotent retry
//!   ([`PutNew::Same`]); different bytes under an existing key is reported, never overwritten
//!   ([`PutNew::Different`]: the archive's fork alarm).
//! - [`Bucket::replace`]: a conditional write on the version read before (S3 `If-Match`, or
//!   `If-None-Match: *` for the first one). A local directory has no conditional write in
//!   `object_store`; there the read-compare-write runs under an exclusive `flock` on
//!   `<root>/.tally-lock`, which every tally process writing the directory takes.
//! - [`Bucket::get`], [`Bucket::list`]: reads.
//!
//! Credentials for S3 come only from the standard AWS environment variables.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{
    ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion,
};
use tally_config::{ArchiveConfig, ArchiveUrl};

/// Where and how to reach an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketSettings {
    pub url: ArchiveUrl,
    /// S3 endpoint; empty: `AWS_ENDPOINT_URL`, else AWS.
    pub endpoint: String,
    /// S3 region; empty: `AWS_REGION`, else `us-east-1`.
    pub region: String,
    pub allow_http: bool,
}

impl BucketSettings {
    /// The settings of `[archive]`, or `None` when no archive is configured.
    pub fn from_config(archive: &ArchiveConfig) -> Option<BucketSettings> {
        if !archive.enabled() {
            return None;
        }
        Some(BucketSettings {
            url: ArchiveUrl::parse(&archive.url).ok()?,
            endpoint: archive.endpoint.clone(),
            region: archive.region.clone(),
            allow_http: archive.allow_http,
        })
    }

    /// Settings for a URL alone: endpoint, region and plain HTTP from the AWS variables.
    pub fn from_url(url: ArchiveUrl) -> BucketSettings {
        BucketSettings {
            url,
            endpoint: String::new(),
            region: String::new(),
            allow_http: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("archive {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("archive {url}: {what}")]
    Setup { url: String, what: String },
}

pub type BucketResult<T> = Result<T, BucketError>;

/// What a create-only write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutNew {
    Created,
    /// The object existed with exactly these bytes: an idempotent retry.
    Same,
    /// The object existed with other bytes; nothing was written.
    Different,
}

/// The version of an object as read, for a conditional replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

/// Bounds on the store client: a request that cannot finish in these surfaces as an error to
/// the archive's own retry loop (which backs off and counts it) instead of hanging inside the
/// client for minutes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT_RETRIES_MAX: usize = 2;
const CLIENT_RETRY_TIMEOUT: Duration = Duration::from_secs(20);
/// The lock file of a local archive directory (see the module docs).
const LOCAL_LOCK: &str = ".tally-lock";

/// An archive's object store, with keys relative to the archive's prefix.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// The lock file of a local directory.
    local_lock: Option<PathBuf>,
    url: String,
}

impl Bucket {
    /// Opens the store (no request is made). A local directory is created if missing.
    pub fn open(settings: &BucketSettings) -> BucketResult<Bucket> {
        let url = settings.url.to_string();
        let setup = |what: String| BucketError::Setup {
            url: url.clone(),
            what,
        };
        match &settings.url {
            ArchiveUrl::File(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| setup(format!("creating {}: {e}", dir.display())))?;
                // Every object is synced, and its directory, before the put returns: the
                // archive's durable point lets the raft log drop the entries it came from.
                let store = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| setup(e.to_string()))?
                    .with_fsync(true);
                Ok(Bucket {
                    store: Arc::new(store),
                    prefix: String::new(),
                    local_lock: Some(dir.join(LOCAL_LOCK)),
                    url,
                })
            }
            ArchiveUrl::S3 { bucket, prefix } => {
                // reqwest's TLS takes the process's default provider; tally uses ring.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let store = s3_builder(settings, bucket)
                    .build()
                    .map_err(|e| setup(e.to_string()))?;
                Ok(Bucket {
                    store: Arc::new(store),
                    prefix: prefix.clone(),
                    local_lock: None,
                    url,
                })
            }
        }
    }

    /// The archive's URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> StorePath {
        if self.prefix.is_empty() {
            StorePath::from(key)
        } else {
            StorePath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn err(&self, source: object_store::Error) -> BucketError {
        BucketError::Store {
            url: self.url.clone(),
            source,
        }
    }

    /// The object's bytes and version, or `None` if there is none.
    pub async fn get(&self, key: &str) -> BucketResult<Option<(Bytes, Version)>> {
        let got = match self.store.get(&self.path(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let version = Version {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(|e| self.err(e))?;
        Ok(Some((bytes, version)))
    }

    /// Writes `bytes` under `key` unless the key exists (see [`PutNew`]).
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> BucketResult<PutNew> {
        let opts = PutOptions::from(PutMode::Create);
        let payload = PutPayload::from(bytes.clone());
        match self.store.put_opts(&self.path(key), payload, opts).await {
            Ok(_) => {
                self.drop_cached_local(key).await;
                Ok(PutNew::Created)
            }
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => match self.get(key).await? {
                Some((stored, _)) if stored == bytes => Ok(PutNew::Same),
                Some(_) => Ok(PutNew::Different),
                None => Err(BucketError::Setup {
                    url: self.url.clone(),
                    what: format!("{key}: the store said it exists, then that it does not"),
                }),
            },
            Err(e) => Err(self.err(e)),
        }
    }

    /// Drops a local directory's new object from the page cache (synced by the put, written
    /// once, read back only by an audit or a restore; see `env::drop_cached`). The open and
    /// the advice are file system calls: on the blocking pool, like the put's own.
    async fn drop_cached_local(&self, key: &str) {
        let Some(dir) = self.local_lock.as_deref().and_then(std::path::Path::parent) else {
            return;
        };
        let path = dir.join(key);
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(file) = std::fs::File::open(path) {
                crate::env::drop_cached(&file, 0, None);
            }
        })
        .await;
    }

    /// Replaces `key` with `bytes` only if it is still at `expected` (`None`: only if it does
    /// not exist). Returns the new version, or `None` when another writer got there first.
    pub async fn replace(
        &self,
        key: &str,
        bytes: Bytes,
        expected: Option<&Version>,
    ) -> BucketResult<Option<Version>> {
        let Some(lock) = &self.local_lock else {
            return self.replace_conditional(key, bytes, expected).await;
        };
        let lock = lock.clone();
        let held = tokio::task::spawn_blocking(move || lock_exclusive(&lock))
            .await
            .map_err(|e| self.setup_error(format!("lock task: {e}")))?
            .map_err(|e| self.setup_error(format!("locking {LOCAL_LOCK}: {e}")))?;
        let current = self.store.head(&self.path(key)).await.map(|meta| Version {
            e_tag: meta.e_tag,
            version: meta.version,
        });
        let current = match current {
            Ok(v) => Some(v),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(self.err(e)),
        };
        if current.as_ref() != expected {
            return Ok(None);
        }
        let put = self
            .store
            .put(&self.path(key), PutPayload::from(bytes))
            .await;
        drop(held);
        let put = put.map_err(|e| self.err(e))?;
        Ok(Some(Version {
            e_tag: put.e_tag,
            version: put.version,
        }))
    }

    async fn replace_conditional(
        &self,
        key: &str,
        bytes: Bytes,
        expected: Option<&Version>,
    ) -> BucketResult<Option<Version>> {
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(UpdateVersion {
                e_tag: v.e_tag.clone(),
                version: v.version.clone(),
            }),
        };
        let payload = PutPayload::from(bytes);
        match self
            .store
            .put_opts(&self.path(key), payload, PutOptions::from(mode))
            .await
        {
            Ok(put) => Ok(Some(Version {
                e_tag: put.e_tag,
                version: put.version,
            })),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Keys under `prefix` (relative to the archive), sorted, starting after `after` if given.
    pub async fn list(&self, prefix: &str, after: Option<&str>) -> BucketResult<Vec<String>> {
        let full = self.path(prefix);
        let stream = match after {
            Some(a) => self.store.list_with_offset(Some(&full), &self.path(a)),
            None => self.store.list(Some(&full)),
        };
        let metas: Vec<_> = stream.try_collect().await.map_err(|e| self.err(e))?;
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut keys: Vec<String> = metas
            .into_iter()
            .map(|m| m.location.as_ref()[strip..].to_string())
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Deletes `key` (tests and tooling only: the archive itself never deletes).
    pub async fn delete(&self, key: &str) -> BucketResult<()> {
        self.store
            .delete(&self.path(key))
            .await
            .map_err(|e| self.err(e))
    }

    fn setup_error(&self, what: String) -> BucketError {
        BucketError::Setup {
            url: self.url.clone(),
            what,
        }
    }
}

fn s3_builder(settings: &BucketSettings, bucket: &str) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if !settings.endpoint.is_empty() {
        builder = builder.with_endpoint(&settings.endpoint);
    }
    if !settings.region.is_empty() {
        builder = builder.with_region(&settings.region);
    } else if std::env::var_os("AWS_REGION").is_none()
        && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        builder = builder.with_region("us-east-1");
    }
    if settings.allow_http {
        builder = builder.with_allow_http(true);
    }
    let retry = RetryConfig {
        max_retries: CLIENT_RETRIES_MAX,
        retry_timeout: CLIENT_RETRY_TIMEOUT,
        ..RetryConfig::default()
    };
    // Set key by key: `with_client_options` would replace what `from_env` read
    // (`AWS_ALLOW_HTTP`, a proxy).
    let client = |key| AmazonS3ConfigKey::Client(key);
    builder
        .with_retry(retry)
        .with_config(client(ClientConfigKey::Timeout), secs(REQUEST_TIMEOUT))
        .with_config(
            client(ClientConfigKey::ConnectTimeout),
            secs(CONNECT_TIMEOUT),
        )
        // Path-style requests (`endpoint/bucket/key`), which every S3-compatible store serves.
        .with_virtual_hosted_style_request(false)
}

/// A duration as object_store's configuration strings take it.
fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// Takes an exclusive `flock` on `path` (created if missing); released when the file closes.
fn lock_exclusive(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(file)
}
