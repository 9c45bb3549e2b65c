//! The S3 state backend: the apply lock and the journal in a bucket, shared by every checkout of a fleet.
//!
//! - The lock is the object `<key>.lock`, created with a conditional write (`If-None-Match: *`): of two
//!   applies, exactly one creates it. Its body says who holds it ([`LockInfo`]: user, host, pid, run, created,
//!   expires; never a secret). The holder renews the lease with `If-Match` on the lock's ETag; a lease past its
//!   expiry is reported as stale, never broken: `nimbus force-unlock ID` frees it, as in Terraform.
//! - The journal (the SQLite file) is the object `<key>`. An apply downloads it when it takes the lock and
//!   uploads it with a compare-and-swap on its ETag (`If-Match`) as it goes and at the end: a failed swap means
//!   a second writer, and the apply stops.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The default lease of a lock.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(120);

/// Who holds a lock. Written as the lock object's body; nothing in it is secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// The lock's id: what `nimbus force-unlock` takes.
    pub id: String,
    pub operation: String,
    pub user: String,
    pub host: String,
    pub pid: u32,
    /// The journal's run number (what `nimbus history --run ID` takes), written at the first renewal after the
    /// run is recorded; `pending` until then (the journal is downloaded after the lock is taken).
    pub run_id: String,
    pub created: DateTime<Utc>,
    pub expires: DateTime<Utc>,
}

impl LockInfo {
    /// A new lock for this process.
    pub fn new(operation: &str, lease: Duration) -> LockInfo {
        let now = Utc::now();
        let host = crate::engine::apply::hostname()
            .or_else(|| std::env::var("HOSTNAME").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "unknown".into());
        let pid = std::process::id();
        // Distinct per lock, even for two locks of one process in one clock tick.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed = format!("{host}/{pid}/{}/{n}", now.timestamp_nanos_opt().unwrap_or_default());
        let id = crate::core::model::sha256_hex(seed.as_bytes())[..16].to_string();
        LockInfo {
            id,
            operation: operation.into(),
            user: crate::engine::apply::actor(),
            host,
            pid,
            run_id: RUN_PENDING.into(),
            created: now,
            expires: expiry(now, lease),
        }
    }

    /// `alice@ci-runner-7 (pid 4242, apply run 7 since 2026-11-26T01:00:00Z (3 min ago), lock id …)`.
    pub fn describe(&self) -> String {
        let run = if self.run_id == RUN_PENDING || self.run_id.is_empty() {
            "(run not recorded yet)".to_string()
        } else {
            format!("run {}", self.run_id)
        };
        format!(
            "{}@{} (pid {}, {} {run} since {}, lock id {})",
            self.user,
            self.host,
            self.pid,
            self.operation,
            crate::util::time::at_ago(&self.created, &Utc::now()),
            self.id
        )
    }
}

/// `run_id` before the journal's run is known.
pub const RUN_PENDING: &str = "pending";

/// When a lease taken or renewed at `now` ends.
fn expiry(now: DateTime<Utc>, lease: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX)
}

/// What went wrong with remote state.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the fleet's state is locked by {}; the lease runs until {}", .info.describe(), .info.expires.format("%Y-%m-%dT%H:%M:%SZ"))]
    Locked { info: Box<LockInfo>, lock: String },
    #[error("the fleet's state is locked by {}, whose lease expired at {}: the lock is stale (its holder stopped renewing it, probably killed)", .info.describe(), .info.expires.format("%Y-%m-%dT%H:%M:%SZ"))]
    Stale { info: Box<LockInfo>, lock: String },
    #[error("the lock {} was renewed while it was being freed: its holder is probably alive", .info.describe())]
    Renewed { info: Box<LockInfo>, lock: String },
    #[error(
        "the lock `{lock}` was taken away from this apply (force-unlocked, or its lease passed and another apply took it)"
    )]
    LockLost { lock: String },
    #[error("the remote journal `{key}` changed under this apply: a second writer")]
    Conflict { key: String },
    #[error("no lock is held on `{lock}`")]
    NotLocked { lock: String },
    #[error("the lock on `{lock}` has id `{held}`, not `{given}`")]
    WrongLockId { lock: String, held: String, given: String },
    #[error("S3 {op} `{target}`: {message}")]
    S3 { op: &'static str, target: String, message: String },
}

impl RemoteError {
    pub fn hint(&self) -> String {
        match self {
            RemoteError::Locked { .. } => {
                "wait for that apply to finish; `plan` works meanwhile (it takes no lock)".into()
            }
            RemoteError::Stale { info, .. } => format!(
                "nimbus never breaks a lock on its own: if that apply is gone, `nimbus force-unlock {}`, then apply again (it recovers what the killed run left)",
                info.id
            ),
            RemoteError::LockLost { .. } => {
                "no action starts after this (running ones finish); check who holds the lock now (was it force-unlocked?), then apply again".into()
            }
            RemoteError::Conflict { .. } => "two applies wrote one journal: no action starts after this, and this apply's record stays in its local working copy (`.nimbus/journal.db`, or `journal.path`); make sure one apply runs at a time (was a lock force-unlocked?), then apply again".into(),
            RemoteError::NotLocked { .. } => "nothing to unlock".into(),
            RemoteError::Renewed { .. } => {
                "wait for that apply; if it really is gone, its lease runs out and force-unlock works then".into()
            }
            RemoteError::WrongLockId { held, .. } => {
                format!("give the id of the lock to free (`{held}` now), as the error that named it said")
            }
            RemoteError::S3 { .. } => "check the bucket, its region and endpoint, and the credentials (the standard AWS chain); RUST_LOG=debug shows the raw response".into(),
        }
    }

    /// Whether the user (or another user) can resolve it, as opposed to the service or the network.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, RemoteError::S3 { .. })
    }
}

/// The lock as held: its body and the ETag to renew or release it with.
#[derive(Debug, Clone)]
pub struct HeldLock {
    pub info: LockInfo,
    etag: String,
}

/// A fleet's state in S3.
#[derive(Clone)]
pub struct S3State {
    client: Client,
    bucket: String,
    key: String,
    lease: Duration,
}

impl std::fmt::Debug for S3State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3State(s3://{}/{})", self.bucket, self.key)
    }
}

/// What a failed request was: a failed condition, a missing object, or another error.
enum Failure {
    Precondition,
    Missing,
    Other(String),
}

fn failure<E>(e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = match &e {
        SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        _ => None,
    };
    tracing::debug!(error = %aws_sdk_s3::error::DisplayErrorContext(&e), "S3 call failed");
    let code = e.as_service_error().and_then(|s| s.code()).map(str::to_string);
    match code.as_deref() {
        // 409 ConditionalRequestConflict: a conditional write raced another; the condition did not hold for us.
        Some("PreconditionFailed" | "ConditionalRequestConflict") => Failure::Precondition,
        Some("NoSuchKey" | "NotFound") => Failure::Missing,
        _ if status == Some(412) => Failure::Precondition,
        _ if status == Some(404) && code.is_none() => Failure::Missing,
        _ => Failure::Other(match (code, e.as_service_error().and_then(|s| s.message())) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c,
            (None, Some(m)) => m.to_string(),
            (None, None) => match &e {
                SdkError::DispatchFailure(_) => "the request could not be sent (network)".to_string(),
                SdkError::TimeoutError(_) => "the request timed out".to_string(),
                _ => "the service returned an error without a code".to_string(),
            },
        }),
    }
}

impl S3State {
    /// The state of a fleet file's `state: {backend: s3, …}` section (relative `{file:}` paths against the
    /// current folder; see [`S3State::from_config_in`]).
    pub async fn from_config(c: &crate::config::StateConfig) -> Result<S3State, RemoteError> {
        Self::from_config_in(c, std::path::Path::new(".")).await
    }

    /// The state of a fleet file's `state:` section; `base_dir` is the fleet file's folder. The S3 client acts
    /// as the section's own identity (`profile`, `role_arn`, `web_identity`), else the standard chain.
    pub async fn from_config_in(
        c: &crate::config::StateConfig,
        base_dir: &std::path::Path,
    ) -> Result<S3State, RemoteError> {
        let (Some(bucket), Some(key)) = (&c.bucket, &c.key) else {
            return Err(RemoteError::S3 {
                op: "configuration",
                target: "state".into(),
                message: "`state.bucket` and `state.key` are needed".into(),
            });
        };
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &c.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        let sdk = c.identity().load(loader, base_dir).await.map_err(|message| RemoteError::S3 {
            op: "credentials",
            target: "state".into(),
            message,
        })?;
        let mut b = aws_sdk_s3::config::Builder::from(&sdk);
        if sdk.region().is_none() {
            b = b.region(aws_sdk_s3::config::Region::new("us-east-1"));
        }
        // An endpoint of one's own (MinIO, a test server) is addressed path-style: no bucket subdomains.
        let env_endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"].iter().any(|v| std::env::var_os(v).is_some());
        if let Some(u) = &c.endpoint {
            b = b.endpoint_url(u);
        }
        if c.endpoint.is_some() || env_endpoint {
            b = b.force_path_style(true);
        }
        Ok(S3State {
            client: Client::from_conf(b.build()),
            bucket: bucket.clone(),
            key: key.clone(),
            lease: c.lock_lease.map(|l| l.0).unwrap_or(DEFAULT_LEASE),
        })
    }

    /// Makes the bucket (tests and benchmarks; nimbus never creates buckets).
    #[cfg(feature = "testing")]
    pub async fn create_bucket(&self) -> Result<(), RemoteError> {
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => match failure(e) {
                Failure::Other(m) if m.contains("BucketAlreadyOwnedByYou") => Ok(()),
                Failure::Other(m) => Err(self.s3("CreateBucket", self.bucket.clone(), m)),
                _ => Ok(()),
            },
        }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lock_key(&self) -> String {
        format!("{}.lock", self.key)
    }

    /// `s3://bucket/key`.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    fn lock_url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.lock_key())
    }

    fn s3(&self, op: &'static str, target: String, message: String) -> RemoteError {
        RemoteError::S3 { op, target, message }
    }

    /// A failure no caller handles on its own, as an error.
    fn failed(&self, op: &'static str, target: &str, f: Failure) -> RemoteError {
        let message = match f {
            Failure::Other(m) => m,
            Failure::Missing => "no such object or bucket".into(),
            Failure::Precondition => "a condition did not hold".into(),
        };
        self.s3(op, target.to_string(), message)
    }

    /// GetObject: the body and ETag, or `None` when there is no such object.
    async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, String)>, Failure> {
        match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => {
                let etag = out.e_tag().unwrap_or_default().to_string();
                let body = out.body.collect().await.map_err(|e| Failure::Other(e.to_string()))?.into_bytes();
                Ok(Some((body.to_vec(), etag)))
            }
            Err(e) => match failure(e) {
                Failure::Missing | Failure::Precondition => Ok(None),
                other => Err(other),
            },
        }
    }

    /// PutObject under a condition: over the version with ETag `expected`, or (`None`) where there is none yet.
    /// Returns the new ETag.
    async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        expected: Option<&str>,
    ) -> Result<String, Failure> {
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body));
        let put = match expected {
            Some(etag) => put.if_match(etag),
            None => put.if_none_match("*"),
        };
        match put.send().await {
            Ok(out) => Ok(out.e_tag().unwrap_or_default().to_string()),
            Err(e) => Err(failure(e)),
        }
    }

    /// DeleteObject of the version with ETag `etag`.
    async fn delete(&self, key: &str, etag: &str) -> Result<(), Failure> {
        match self.client.delete_object().bucket(&self.bucket).key(key).if_match(etag).send().await {
            Ok(_) => Ok(()),
            Err(e) => Err(failure(e)),
        }
    }

    /// The lock as it is now: its body and ETag, or `None`.
    async fn read_lock(&self) -> Result<Option<(LockInfo, String)>, RemoteError> {
        let Some((body, etag)) =
            self.get(&self.lock_key()).await.map_err(|f| self.failed("GetObject", &self.lock_url(), f))?
        else {
            return Ok(None);
        };
        let info: LockInfo = serde_json::from_slice(&body).map_err(|e| {
            self.s3("GetObject", self.lock_url(), format!("the lock's body is not a nimbus lock ({e})"))
        })?;
        Ok(Some((info, etag)))
    }

    /// Takes the lock for `operation`, or says who holds it (and whether their lease has passed).
    pub async fn acquire(&self, operation: &str) -> Result<HeldLock, RemoteError> {
        // A lock released between our write and our read of it: try again (a few times).
        for _ in 0..3 {
            let info = LockInfo::new(operation, self.lease);
            let body = serde_json::to_vec_pretty(&info).expect("lock serialises");
            let put = self.put(&self.lock_key(), body, "application/json", None).await;
            match put {
                Ok(etag) => return Ok(HeldLock { info, etag }),
                Err(f) => match f {
                    Failure::Precondition => match self.read_lock().await? {
                        // The SDK retried a write whose answer was lost: the lock there is this one.
                        Some((held, etag)) if held.id == info.id => return Ok(HeldLock { info: held, etag }),
                        Some((held, _)) if held.expires <= Utc::now() => {
                            return Err(RemoteError::Stale { info: Box::new(held), lock: self.lock_url() });
                        }
                        Some((held, _)) => {
                            return Err(RemoteError::Locked { info: Box::new(held), lock: self.lock_url() });
                        }
                        None => continue,
                    },
                    Failure::Missing => {
                        return Err(self.s3("PutObject", self.lock_url(), "the bucket does not exist".into()));
                    }
                    Failure::Other(m) => return Err(self.s3("PutObject", self.lock_url(), m)),
                },
            }
        }
        Err(self.s3("PutObject", self.lock_url(), "the lock kept changing while it was taken; try again".into()))
    }

    /// Extends the lease, if the lock is still ours.
    pub async fn renew(&self, lock: &mut HeldLock) -> Result<(), RemoteError> {
        self.renew_with_run(lock, None).await
    }

    /// Extends the lease and, once the journal's run is known, names it in the lock's body.
    pub async fn renew_with_run(&self, lock: &mut HeldLock, run: Option<i64>) -> Result<(), RemoteError> {
        let mut info = lock.info.clone();
        if let Some(r) = run {
            info.run_id = r.to_string();
        }
        info.expires = expiry(Utc::now(), self.lease);
        let body = serde_json::to_vec_pretty(&info).expect("lock serialises");
        match self.put(&self.lock_key(), body, "application/json", Some(&lock.etag)).await {
            Ok(etag) => {
                lock.etag = etag;
                lock.info = info;
                Ok(())
            }
            Err(f) => match f {
                Failure::Precondition => match self.read_lock().await? {
                    // The SDK retried a renewal whose answer was lost: it took effect.
                    Some((held, etag)) if held.id == info.id && held.expires == info.expires => {
                        lock.etag = etag;
                        lock.info = held;
                        Ok(())
                    }
                    _ => Err(RemoteError::LockLost { lock: self.lock_url() }),
                },
                Failure::Missing => Err(RemoteError::LockLost { lock: self.lock_url() }),
                Failure::Other(m) => Err(self.s3("PutObject", self.lock_url(), m)),
            },
        }
    }

    /// Releases the lock, if it is still ours: by its ETag, or (when a renewal's answer was lost) by its id.
    pub async fn release(&self, lock: &HeldLock) -> Result<(), RemoteError> {
        let mut etag = lock.etag.clone();
        for _ in 0..2 {
            match self.delete(&self.lock_key(), &etag).await {
                Ok(()) => return Ok(()),
                Err(f) => match f {
                    Failure::Precondition => match self.read_lock().await? {
                        Some((info, current)) if info.id == lock.info.id => etag = current,
                        _ => return Err(RemoteError::LockLost { lock: self.lock_url() }),
                    },
                    Failure::Missing => return Err(RemoteError::LockLost { lock: self.lock_url() }),
                    Failure::Other(m) => return Err(self.s3("DeleteObject", self.lock_url(), m)),
                },
            }
        }
        Err(RemoteError::LockLost { lock: self.lock_url() })
    }

    /// Frees the lock with id `id`, whoever holds it (`nimbus force-unlock`).
    pub async fn force_unlock(&self, id: &str) -> Result<LockInfo, RemoteError> {
        let Some((info, etag)) = self.read_lock().await? else {
            return Err(RemoteError::NotLocked { lock: self.lock_url() });
        };
        if info.id != id {
            return Err(RemoteError::WrongLockId { lock: self.lock_url(), held: info.id, given: id.to_string() });
        }
        match self.delete(&self.lock_key(), &etag).await {
            Ok(()) => Ok(info),
            Err(f) => match f {
                // Renewed (or replaced) meanwhile: its holder may well be alive.
                Failure::Precondition => Err(RemoteError::Renewed { info: Box::new(info), lock: self.lock_url() }),
                Failure::Missing => Err(RemoteError::NotLocked { lock: self.lock_url() }),
                Failure::Other(m) => Err(self.s3("DeleteObject", self.lock_url(), m)),
            },
        }
    }

    /// The journal as uploaded last, with its ETag; `None` before the first upload.
    pub async fn download(&self) -> Result<Option<(Vec<u8>, String)>, RemoteError> {
        self.get(&self.key).await.map_err(|f| self.failed("GetObject", &self.url(), f))
    }

    /// Uploads the journal over the version with ETag `expected` (`None`: there must be none yet); returns the
    /// new ETag. Anything else there means a second writer.
    pub async fn upload(&self, bytes: Vec<u8>, expected: Option<&str>) -> Result<String, RemoteError> {
        // S3's ETag of a single-part upload is the body's MD5: how a write of ours whose answer was lost (and
        // which the SDK then retried) is told from another writer's.
        let md5: String = {
            use md5::Digest;
            md5::Md5::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
        };
        match self.put(&self.key, bytes, "application/vnd.sqlite3", expected).await {
            Ok(etag) => Ok(etag),
            Err(f) => match f {
                Failure::Precondition => {
                    match self.client.head_object().bucket(&self.bucket).key(&self.key).send().await {
                        Ok(head) if head.e_tag().is_some_and(|t| t.trim_matches('"') == md5) => {
                            Ok(head.e_tag().unwrap_or_default().to_string())
                        }
                        _ => Err(RemoteError::Conflict { key: self.url() }),
                    }
                }
                Failure::Missing if expected.is_some() => Err(RemoteError::Conflict { key: self.url() }),
                Failure::Missing => Err(self.s3("PutObject", self.url(), "the bucket does not exist".into())),
                Failure::Other(m) => Err(self.s3("PutObject", self.url(), m)),
            },
        }
    }
}
