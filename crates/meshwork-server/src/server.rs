//! The client-server counterpart over HTTP (`meshwork server start`).
//!
//! Ledger (same JSON shapes as a node's API where the two overlap, so the same CLI commands
//! work against both):
//! - `POST /api/v1/tx` `{"tx": "<hex>"}` → 201 `{"id", "seq", "head"}`; 400 with the reason;
//! - `GET /api/v1/tx/{id}` → `{"id", "state": "confirmed", "height": seq, "block": head,
//!   "confirmations"}` or `{"state": "unknown"}`;
//! - `GET /api/v1/accounts/{addr}` → `{"address", "balance", "nonce", "next_nonce"}`;
//! - `GET /api/v1/accounts/{addr}/history?limit=N` → newest first;
//! - `GET /api/v1/chain` → the log's head and length, the chain id;
//! - `GET /api/v1/log?after=S&limit=N&wait_ms=W`: entries after S; with `wait_ms` it is a
//!   long poll that answers as soon as there is one (the clients' subscription).
//!
//! Content:
//! - `POST /api/v1/upload/{name}` (the raw file as the body) → 201 `{"id", "name", "size"}`;
//!   413 above the per-upload cap, 507 past the quota on stored bytes (nothing is kept);
//! - `DELETE /api/v1/content/{id}` → 204 (record and file removed, durably, the quota freed),
//!   404 when not stored;
//! - `GET /api/v1/content` and `GET /api/v1/content/{id}`: manifests' summaries;
//! - `GET /content/{id}`: the bytes, with single `Range` requests (206, 416);
//! - `GET /content/{id}/manifest`: the manifest, so that clients verify every piece.
//!
//! `GET /api/v1/status` reports counts, including the content bytes served (the origin's
//! upload, for the lab). `GET /api/v1/health` → 200 `{"status": "ok"}`, or 503
//! `{"status": "unavailable", "error", "down_s"}` while the store is down after a storage
//! error (a full disk).
//!
//! Authentication: the mutating content calls (upload, delete) need the server's cookie
//! (`<data-dir>/api.cookie`, new at each start, bitcoind's scheme: see
//! [`meshwork_http::auth`]) and answer 401 without it. Reads and downloads stay open: they
//! change nothing. Transfers stay open too: each is signed by its sender's key, which is the
//! authorization that matters, and submitting them is what the server's clients are for.
//!
//! Storage failures: after an I/O error the store is down until it reopens by itself
//! ([`crate::store`]; a task here retries every 100 ms, with backoff). Meanwhile status and
//! health answer 503 with the reason, and so do transfers and uploads, which are never
//! acknowledged unless durable; the reason is logged once, not per request. An upload that
//! runs out of disk answers 507 and leaves no file behind.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::StreamExt;
use meshwork_ledger::{Address, ChainSpec, Hash, SignedTransfer, TxError};
use meshwork_swarm::{ContentId, Manifest};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::content::{ContentError, ContentStore};
use crate::ledger::{CentralLedger, LedgerError, MAX_PAGE};
use crate::store::{Faults, Health, Maintained, Store, StoreError};

/// The database file in the data directory.
pub const DB_FILE: &str = "server.redb";
const MAX_JSON_BODY: usize = 16 << 10;
/// Longest long poll.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Concurrent uploads; more get 503.
const MAX_UPLOADS: usize = 16;
/// Chunks of a download.
const READ_CHUNK: usize = 64 << 10;
/// How often a down store is offered a reopen (the store itself backs off).
const MAINTAIN_EVERY: Duration = Duration::from_millis(100);
/// After a failed upload, at most this much more of its body is read (and discarded) so that
/// the client gets the answer rather than a reset connection.
const DRAIN_LIMIT: usize = 16 << 20;

/// Default [`ServerConfig::max_upload_bytes`]: 4 GiB.
pub const DEFAULT_MAX_UPLOAD: u64 = 4 << 30;
/// Default [`ServerConfig::quota_bytes`]: 16 GiB.
pub const DEFAULT_QUOTA: u64 = 16 << 30;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub spec: ChainSpec,
    /// The piece size of uploads; `None`: the swarm's default for the upload's length (from
    /// its `Content-Length`, so that a file gets the same content id here as when a node
    /// shares it), or 256 KiB when the length is not given.
    pub piece_size: Option<u32>,
    /// The largest upload accepted (413 above it).
    pub max_upload_bytes: u64,
    /// The most bytes stored in all (uploads in progress included); an upload that would pass
    /// it is refused with 507.
    pub quota_bytes: u64,
    /// Caps the bytes per second of all content downloads together (the in-process lab's
    /// stand-in for a capped uplink; the netns lab caps the link with `tc` instead).
    pub upload_limit: Option<u64>,
    /// Senders whose transfers the operator refuses (the server decides alone, for every
    /// client).
    pub refuse_senders: HashSet<Address>,
    /// The HTTP listener's connection caps and timeouts (see `meshwork_http::serve`).
    pub http: meshwork_http::serve::Limits,
}

impl ServerConfig {
    pub fn new(data_dir: &FsPath, spec: ChainSpec) -> ServerConfig {
        ServerConfig {
            data_dir: data_dir.to_path_buf(),
            spec,
            piece_size: None,
            max_upload_bytes: DEFAULT_MAX_UPLOAD,
            quota_bytes: DEFAULT_QUOTA,
            upload_limit: None,
            refuse_senders: HashSet::new(),
            http: meshwork_http::serve::Limits::server(),
        }
    }
}

/// Start-up errors of [`start`].
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{path}: cannot open the database: {reason}")]
    Db { path: String, reason: String },
    /// The database cannot be opened, or is damaged (the message says how to recover).
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Cookie(#[from] meshwork_http::auth::CookieError),
}

struct Inner {
    store: Arc<Store>,
    ledger: CentralLedger,
    content: ContentStore,
    started: Instant,
    bytes_served: AtomicU64,
    /// The log length, for long polls.
    count: tokio::sync::watch::Sender<u64>,
    piece_size: Option<u32>,
    /// Set by [`RunningServer::kill`]: downloads and long polls in flight end at once.
    dying: tokio::sync::watch::Sender<bool>,
    refused: HashSet<Address>,
    uploads: tokio::sync::Semaphore,
    limiter: Option<Limiter>,
}

/// The upload cap shared by every download: a pacer, behind a lock.
struct Limiter {
    pacer: std::sync::Mutex<Pacer>,
}

impl Limiter {
    /// When a chunk of `n` bytes may be released.
    fn release_at(&self, n: usize) -> Instant {
        self.pacer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reserve(n, Instant::now())
    }
}

/// A pacer that never lets bytes out faster than `rate`: a chunk reserved at `now` is
/// released only once the rate has paid for it, after every chunk before it.
///
/// Invariant (tested with a simulated clock): over a busy period that began at `s` (the first
/// reservation after the pacer was idle), the bytes released by any time `t` are at most
/// `rate · (t − s)`. There is no initial credit and no credit saved while idle. The only
/// leeway is `slack`: a reservation that comes up to `slack` after the previous release was
/// due (the sleeper woke late) continues the schedule instead of restarting it, so timer
/// lateness does not lower the rate; from a point inside a busy period, that lets at most
/// `rate · slack` bytes out early.
#[derive(Debug)]
pub(crate) struct Pacer {
    /// Bytes per second (> 0).
    rate: u64,
    slack: Duration,
    /// When the last reserved byte is paid for: the next chunk's schedule starts there.
    next_free: Option<Instant>,
}

impl Pacer {
    /// Timer lateness forgiven (tokio's timer has a 1 ms resolution).
    const SLACK: Duration = Duration::from_millis(5);

    pub(crate) fn new(rate: u64) -> Pacer {
        Pacer {
            rate: rate.max(1),
            slack: Pacer::SLACK,
            next_free: None,
        }
    }

    /// Reserves `n` bytes at `now`; returns when they may be released (≥ `now` or already
    /// past, when the schedule is behind).
    pub(crate) fn reserve(&mut self, n: usize, now: Instant) -> Instant {
        let start = match self.next_free {
            Some(f) if f + self.slack >= now => f,
            // Idle (or first use): a new busy period with no credit.
            _ => now,
        };
        // Rounded up to the nanosecond, so rounding never lets a byte out early.
        let nanos = (n as u128 * 1_000_000_000).div_ceil(self.rate as u128);
        let at = start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.next_free = Some(at);
        at
    }
}

type Shared = Arc<Inner>;

#[derive(Serialize, Deserialize)]
struct ApiError {
    error: String,
}

fn error(code: StatusCode, e: impl std::fmt::Display) -> Response {
    (
        code,
        Json(ApiError {
            error: e.to_string(),
        }),
    )
        .into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!("{e}");
    error(StatusCode::INTERNAL_SERVER_ERROR, e)
}

/// A running server.
pub struct RunningServer {
    pub addr: SocketAddr,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    dying: tokio::sync::watch::Sender<bool>,
    maintenance: tokio::task::JoinHandle<()>,
    cookie: meshwork_http::auth::Cookie,
}

impl RunningServer {
    /// What an uploader sends (the cookie, also in `<data-dir>/api.cookie`).
    pub fn api_credentials(&self) -> meshwork_http::auth::Credentials {
        self.cookie.credentials()
    }

    /// Long polls (`GET /api/v1/log` with `wait_ms`) in progress now: tests wait on this
    /// instead of sleeping until a poll is waiting. Exact because only a long poll subscribes
    /// to `dying` (downloads only read it), and it holds its subscription until it answers.
    pub fn long_polls(&self) -> usize {
        self.dying.receiver_count()
    }

    /// A crash, as near as one process can stage it inside another (the lab's in-process
    /// runner): downloads and long polls in flight are cut off at once instead of finishing,
    /// and nothing new is accepted. The store is left as it is, which is what a crash leaves:
    /// every acknowledged write is already durable.
    pub async fn kill(self) {
        self.dying.send_replace(true);
        self.stop().await;
    }

    /// Stops accepting, lets requests in flight finish (at most 5 s), closes the store.
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        // Its handle on the store would keep the database open (and locked) after the stop.
        self.maintenance.abort();
        let _ = self.maintenance.await;
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        if let Err(e) = self.cookie.remove() {
            tracing::warn!("{e}");
        }
    }
}

/// Opens the store in `cfg.data_dir`, binds `listen` and serves until stopped.
///
/// Errors: a damaged or unopenable database ([`ServerError::Store`], naming the file and how
/// to recover), a new database next to a non-empty content directory
/// ([`ContentError::Unrecorded`]), an address that cannot be bound.
pub async fn start(listen: SocketAddr, cfg: ServerConfig) -> Result<RunningServer, ServerError> {
    start_inner(listen, cfg, None).await
}

/// [`start`] with the [`Faults`] seam under the database and the content files. Hidden: for
/// tests of a full disk.
#[doc(hidden)]
pub async fn start_with_faults(
    listen: SocketAddr,
    cfg: ServerConfig,
    faults: Arc<Faults>,
) -> Result<RunningServer, ServerError> {
    start_inner(listen, cfg, Some(faults)).await
}

async fn start_inner(
    listen: SocketAddr,
    cfg: ServerConfig,
    faults: Option<Arc<Faults>>,
) -> Result<RunningServer, ServerError> {
    let dir = cfg.data_dir.clone();
    let limits = cfg.http.clone();
    let inner = tokio::task::spawn_blocking(move || open(&cfg, faults))
        .await
        .map_err(|e| ServerError::Db {
            path: dir.join(DB_FILE).display().to_string(),
            reason: format!("the open task failed: {e}"),
        })??;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ServerError::Io(listen.to_string(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Io(listen.to_string(), e))?;
    let cookie = meshwork_http::auth::Cookie::write(&dir)?;
    let guard = meshwork_http::auth::Guard::new(&cookie, addr);
    let dying = inner.dying.clone();
    let maintenance = tokio::spawn(maintain(inner.clone()));
    let app = router(inner, guard);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let r = meshwork_http::serve::serve(listener, app, limits, async {
            let _ = rx.await;
        })
        .await;
        if let Err(e) = r {
            tracing::error!("server stopped: {e}");
        }
    });
    tracing::info!(%addr, dir = %dir.display(), "server ready");
    Ok(RunningServer {
        addr,
        shutdown: tx,
        task,
        dying,
        maintenance,
        cookie,
    })
}

/// Offers a down store a reopen, and refreshes the log length the long polls wait on once it
/// is back (a commit that failed with an I/O error may have been durable after all).
async fn maintain(s: Shared) {
    let mut tick = tokio::time::interval(MAINTAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if s.store.health() == Health::Ok {
            continue;
        }
        let st = s.clone();
        let r = tokio::task::spawn_blocking(move || {
            let m = st.store.maintain();
            if m == Maintained::Reopened {
                if let Ok((_, count)) = st.ledger.head() {
                    st.count.send_replace(count);
                }
            }
        })
        .await;
        if r.is_err() {
            tracing::error!("the store's maintenance failed; it is retried");
        }
    }
}

/// Opens the data directory's store. Blocking. Never panics on damaged files: they are
/// errors that name the file and how to recover.
fn open(cfg: &ServerConfig, faults: Option<Arc<Faults>>) -> Result<Shared, ServerError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| ServerError::Io(cfg.data_dir.display().to_string(), e))?;
    let path = cfg.data_dir.join(DB_FILE);
    let store = Arc::new(match faults {
        Some(f) => Store::open_with_faults(&path, f)?,
        None => Store::open(&path)?,
    });
    // A store error while opening is damage, unless it was an I/O error (a full disk at
    // start-up is not a damaged file).
    let damaged = |reason: String| match store.check() {
        Err(StoreError::Unavailable { reason }) => StoreError::Open {
            path: path.display().to_string(),
            reason,
        },
        _ => StoreError::Damaged {
            path: path.display().to_string(),
            reason,
        },
    };
    // Content first: a new database next to stored files is refused before the ledger
    // initializes anything, so the refusal holds at the next start too.
    let content = ContentStore::open_with_quota(
        store.clone(),
        &cfg.data_dir.join("content"),
        cfg.max_upload_bytes,
        cfg.quota_bytes,
    )
    .map_err(|e| match e {
        e @ (ContentError::Store(_) | ContentError::Manifest(_)) => damaged(e.to_string()).into(),
        e => ServerError::from(e),
    })?;
    let opened = CentralLedger::open(store.clone(), cfg.spec.clone())
        .and_then(|l| l.head().map(|(_, count)| (l, count)));
    let (ledger, count) = match opened {
        Ok(v) => v,
        Err(e @ (LedgerError::Inconsistent(_) | LedgerError::Store(_))) => {
            return Err(damaged(e.to_string()).into())
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Arc::new(Inner {
        store,
        ledger,
        content,
        started: Instant::now(),
        bytes_served: AtomicU64::new(0),
        count: tokio::sync::watch::channel(count).0,
        dying: tokio::sync::watch::channel(false).0,
        refused: cfg.refuse_senders.clone(),
        piece_size: cfg.piece_size,
        uploads: tokio::sync::Semaphore::new(MAX_UPLOADS),
        limiter: cfg.upload_limit.filter(|r| *r > 0).map(|r| Limiter {
            pacer: std::sync::Mutex::new(Pacer::new(r)),
        }),
    }))
}

fn router(s: Shared, guard: meshwork_http::auth::Guard) -> Router {
    let auth =
        || axum::middleware::from_fn_with_state(guard.clone(), meshwork_http::auth::require_auth);
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/health", get(health))
        .route("/api/v1/chain", get(chain))
        .route("/api/v1/tx", post(submit_tx))
        .route("/api/v1/tx/{id}", get(tx_status))
        .route("/api/v1/accounts/{addr}", get(account))
        .route("/api/v1/accounts/{addr}/history", get(history))
        .route("/api/v1/log", get(log))
        .route("/api/v1/content", get(content_list))
        .route(
            "/api/v1/content/{id}",
            get(content_info).merge(delete(content_delete).layer(auth())),
        )
        .route("/content/{id}", get(content_bytes))
        .route("/content/{id}/manifest", get(content_manifest))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        // The upload streams its body itself, with the store's own limit.
        .route(
            "/api/v1/upload/{name}",
            post(upload).layer(DefaultBodyLimit::disable()).layer(
                axum::middleware::from_fn_with_state(guard.clone(), upload_auth),
            ),
        )
        .with_state(s)
}

/// Runs blocking store work off the async runtime.
///
/// A panic in that work (redb on a damaged page, say) becomes the operation's error, so the
/// client gets a 500 with a reason rather than a dropped connection.
async fn blocking<T: Send + 'static, E: FromPanic + Send + 'static>(
    s: &Shared,
    f: impl FnOnce(&Inner) -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    let s = s.clone();
    match tokio::task::spawn_blocking(move || f(&s)).await {
        Ok(r) => r,
        Err(e) => Err(E::from_panic(format!("the store failed: {e}"))),
    }
}

/// Errors that a panicked store operation becomes.
trait FromPanic {
    fn from_panic(what: String) -> Self;
}

impl FromPanic for LedgerError {
    fn from_panic(what: String) -> Self {
        LedgerError::Store(what)
    }
}

impl FromPanic for ContentError {
    fn from_panic(what: String) -> Self {
        ContentError::Store(what)
    }
}

#[derive(Serialize, Deserialize)]
pub struct ServerStatus {
    pub kind: String,
    pub network: String,
    pub chain_id: String,
    pub transactions: u64,
    pub head: String,
    pub contents: usize,
    pub bytes_served: u64,
    pub uptime_s: u64,
}

/// The answer to a failed store operation: 503 with the reason while the store is down (it
/// logged the reason once), else 500 (logged).
fn failure(s: &Inner, e: impl std::fmt::Display) -> Response {
    match s.store.check() {
        Err(down) => error(StatusCode::SERVICE_UNAVAILABLE, down),
        Ok(()) => internal(e),
    }
}

/// 503 with the reason while the store is down.
fn unavailable(s: &Inner) -> Option<Response> {
    match s.store.health() {
        Health::Ok => None,
        Health::Down { reason, since } => Some(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({
                    "status": "unavailable",
                    "error": StoreError::Unavailable { reason }.to_string(),
                    "down_s": since.elapsed().as_secs(),
                })),
            )
                .into_response(),
        ),
    }
}

async fn health(State(s): State<Shared>) -> Response {
    unavailable(&s).unwrap_or_else(|| Json(serde_json::json!({"status": "ok"})).into_response())
}

async fn status(State(s): State<Shared>) -> Response {
    if let Some(r) = unavailable(&s) {
        return r;
    }
    let r = blocking(&s, |i| {
        let (head, count) = i.ledger.head()?;
        let contents = i
            .content
            .list()
            .map_err(|e| LedgerError::Store(e.to_string()))?;
        Ok::<_, LedgerError>(ServerStatus {
            kind: "server".into(),
            network: i.ledger.spec().name.clone(),
            chain_id: i.ledger.chain_id().to_string(),
            transactions: count,
            head: head.to_string(),
            contents: contents.len(),
            bytes_served: i.bytes_served.load(Ordering::Relaxed),
            uptime_s: i.started.elapsed().as_secs(),
        })
    })
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => failure(&s, e),
    }
}

async fn chain(State(s): State<Shared>) -> Response {
    match blocking(&s, |i| i.ledger.head()).await {
        Ok((head, count)) => Json(serde_json::json!({
            "kind": "server",
            "network": s.ledger.spec().name,
            "chain_id": s.ledger.chain_id().to_string(),
            "height": count,
            "tip": head.to_string(),
        }))
        .into_response(),
        Err(e) => failure(&s, e),
    }
}

#[derive(Deserialize)]
struct SubmitTx {
    tx: String,
}

async fn submit_tx(State(s): State<Shared>, body: Option<Json<SubmitTx>>) -> Response {
    let Some(Json(body)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a JSON body {\"tx\": \"<hex>\"}",
        );
    };
    let Ok(bytes) = hex::decode(body.tx.trim()) else {
        return error(StatusCode::BAD_REQUEST, "tx is not hexadecimal");
    };
    if bytes.len() > meshwork_ledger::spec::MAX_TX_BYTES {
        return error(StatusCode::BAD_REQUEST, "tx is too large");
    }
    let t = match SignedTransfer::decode(&bytes) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, TxError::from(e)),
    };
    if s.refused.contains(&t.transfer.from) {
        return error(StatusCode::BAD_REQUEST, TxError::Refused(t.transfer.from));
    }
    match blocking(&s, move |i| i.ledger.submit(&t)).await {
        Ok(r) => {
            s.count.send_replace(r.seq);
            (
                StatusCode::CREATED,
                Json(serde_json::json!({
                    "id": r.id.to_string(),
                    "seq": r.seq,
                    "head": r.head.to_string(),
                })),
            )
                .into_response()
        }
        Err(LedgerError::Refused(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(LedgerError::Unavailable(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => failure(&s, e),
    }
}

async fn tx_status(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let id: Hash = match id.parse() {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let r = blocking(&s, move |i| {
        Ok::<_, LedgerError>((i.ledger.receipt(&id)?, i.ledger.head()?.1))
    })
    .await;
    match r {
        Ok((Some(r), count)) => Json(serde_json::json!({
            "id": id.to_string(),
            "state": "confirmed",
            "height": r.seq,
            "block": r.head.to_string(),
            "confirmations": count - r.seq + 1,
        }))
        .into_response(),
        Ok((None, _)) => {
            Json(serde_json::json!({"id": id.to_string(), "state": "unknown"})).into_response()
        }
        Err(e) => failure(&s, e),
    }
}

async fn account(State(s): State<Shared>, Path(addr): Path<String>) -> Response {
    let addr: Address = match addr.parse() {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match blocking(&s, move |i| i.ledger.account(&addr)).await {
        // Transfers are final when accepted: nothing is ever pending.
        Ok(a) => Json(serde_json::json!({
            "address": addr.to_string(),
            "balance": a.balance,
            "nonce": a.nonce,
            "next_nonce": a.nonce,
        }))
        .into_response(),
        Err(e) => failure(&s, e),
    }
}

#[derive(Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    pub id: String,
    pub from: String,
    pub to: String,
    pub amount: u64,
    pub fee: u64,
    pub nonce: u64,
}

fn entry(seq: u64, t: &SignedTransfer) -> LogEntry {
    LogEntry {
        seq,
        id: t.id().to_string(),
        from: t.transfer.from.to_string(),
        to: t.transfer.to.to_string(),
        amount: t.transfer.amount,
        fee: t.transfer.fee,
        nonce: t.transfer.nonce,
    }
}

#[derive(Deserialize)]
struct Page {
    after: Option<u64>,
    limit: Option<usize>,
    wait_ms: Option<u64>,
}

async fn history(
    State(s): State<Shared>,
    Path(addr): Path<String>,
    Query(p): Query<Page>,
) -> Response {
    let addr: Address = match addr.parse() {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let limit = p.limit.unwrap_or(100).min(MAX_PAGE);
    match blocking(&s, move |i| i.ledger.history(&addr, limit)).await {
        Ok(v) => Json(v.iter().map(|(s, t)| entry(*s, t)).collect::<Vec<_>>()).into_response(),
        Err(e) => failure(&s, e),
    }
}

#[derive(Serialize, Deserialize)]
pub struct LogPage {
    pub count: u64,
    pub entries: Vec<LogEntry>,
}

async fn log(State(s): State<Shared>, Query(p): Query<Page>) -> Response {
    let after = p.after.unwrap_or(0);
    let limit = p.limit.unwrap_or(MAX_PAGE).min(MAX_PAGE);
    if let Some(w) = p.wait_ms {
        let mut rx = s.count.subscribe();
        let mut dying = s.dying.subscribe();
        let wait = Duration::from_millis(w).min(MAX_WAIT);
        // Answers at once when the log is already past `after`.
        tokio::select! {
            _ = tokio::time::timeout(wait, rx.wait_for(|c| *c > after)) => {}
            _ = dying.wait_for(|d| *d) => return error(StatusCode::SERVICE_UNAVAILABLE, "the server stopped"),
        }
    }
    match blocking(&s, move |i| {
        Ok::<_, LedgerError>((i.ledger.log_after(after, limit)?, i.ledger.head()?.1))
    })
    .await
    {
        Ok((v, count)) => Json(LogPage {
            count,
            entries: v.iter().map(|(s, t)| entry(*s, t)).collect(),
        })
        .into_response(),
        Err(e) => failure(&s, e),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ContentSummary {
    pub id: String,
    pub name: String,
    pub size: u64,
    pub pieces: usize,
    pub piece_size: u32,
}

fn summary(id: &ContentId, m: &Manifest) -> ContentSummary {
    ContentSummary {
        id: id.to_string(),
        name: m.name.clone(),
        size: m.size,
        pieces: m.piece_count(),
        piece_size: m.piece_size,
    }
}

async fn content_list(State(s): State<Shared>) -> Response {
    match blocking(&s, |i| i.content.list()).await {
        Ok(v) => Json(v.iter().map(|(id, m)| summary(id, m)).collect::<Vec<_>>()).into_response(),
        Err(e) => failure(&s, e),
    }
}

/// The manifest of `id`, or the response to give.
async fn lookup(s: &Shared, id: &str) -> Result<(ContentId, Manifest), Response> {
    let id: ContentId = id.parse().map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    match blocking(s, move |i| i.content.manifest(&id)).await {
        Ok(Some(m)) => Ok((id, m)),
        Ok(None) => Err(error(
            StatusCode::NOT_FOUND,
            format!("content {id} not found"),
        )),
        Err(e) => Err(failure(s, e)),
    }
}

async fn content_info(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match lookup(&s, &id).await {
        Ok((id, m)) => Json(summary(&id, &m)).into_response(),
        Err(r) => r,
    }
}

async fn content_manifest(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match lookup(&s, &id).await {
        Ok((_, m)) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            m.encode(),
        )
            .into_response(),
        Err(r) => r,
    }
}

/// A single byte range of a `size`-byte body: `Ok(None)` for the whole body (no header, or a
/// form we do not serve partially, such as several ranges), `Err(())` when unsatisfiable.
fn parse_range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = h.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        // The last `b` bytes.
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 || size == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end: u64 = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

async fn content_bytes(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (id, m) = match lookup(&s, &id).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let range = match parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        m.size,
    ) {
        Ok(r) => r,
        Err(()) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{}", m.size))],
            )
                .into_response()
        }
    };
    let path = s.content.path(&id);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return internal(format!("{}: {e}", path.display())),
    };
    let (start, len) = match range {
        Some((a, b)) => (a, b - a + 1),
        None => (0, m.size),
    };
    if start > 0 {
        if let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await {
            return internal(format!("{}: {e}", path.display()));
        }
    }
    let counter = s.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), READ_CHUNK).then(
        move |chunk| {
            let counter = counter.clone();
            async move {
                if *counter.dying.borrow() {
                    return Err(std::io::Error::other("the server stopped"));
                }
                if let Ok(c) = &chunk {
                    if let Some(l) = &counter.limiter {
                        let at = l.release_at(c.len());
                        if at > Instant::now() {
                            tokio::time::sleep_until(at.into()).await;
                        }
                    }
                    counter
                        .bytes_served
                        .fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                chunk
            }
        },
    );
    let mut resp = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, len)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ETAG, format!("\"{id}\""));
    resp = match range {
        Some((a, b)) => resp
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{}", m.size)),
        None => resp.status(StatusCode::OK),
    };
    resp.body(Body::from_stream(stream))
        .unwrap_or_else(internal)
}

async fn upload(
    State(s): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(_permit) = s.uploads.try_acquire() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_UPLOADS} uploads are in progress; try again"),
        );
    };
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let piece_size = s.piece_size.unwrap_or(match length {
        Some(len) => meshwork_swarm::manifest::default_piece_size(len),
        None => meshwork_swarm::manifest::DEFAULT_PIECE_SIZE,
    });
    let mut stream = body.into_data_stream();
    if let Some(len) = length {
        // Refused before a byte of the body is stored.
        if let Err(e) = s.content.check_room(len) {
            drain(&mut stream).await;
            return upload_failure(&s, e);
        }
    }
    let up = match s.content.begin(&name, piece_size) {
        Ok(u) => u,
        Err(e) => {
            drain(&mut stream).await;
            return upload_failure(&s, e);
        }
    };
    // The body goes to a blocking writer through a small channel: backpressure reaches the
    // client's TCP window when the disk is slower than the network.
    // `None` ends a body that was cut short: the writer then drops the upload (and its file).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<bytes::Bytes>>(16);
    let st = s.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut up = up;
        while let Some(chunk) = rx.blocking_recv() {
            match chunk {
                Some(c) => up.write(&c)?,
                None => return Ok(None),
            }
        }
        st.content.commit(up).map(Some)
    });
    let mut failed = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if tx.send(Some(c)).await.is_err() {
                    // The writer stopped: its error is below.
                    drain(&mut stream).await;
                    break;
                }
            }
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    if let Some(e) = failed {
        let _ = tx.send(None).await;
        drop(tx);
        let _ = writer.await;
        return error(StatusCode::BAD_REQUEST, format!("upload cut short: {e}"));
    }
    drop(tx);
    match writer.await {
        Ok(Ok(Some((id, m)))) => (StatusCode::CREATED, Json(summary(&id, &m))).into_response(),
        Ok(Ok(None)) => internal("an upload was abandoned and reported as finished"),
        Ok(Err(e)) => upload_failure(&s, e),
        Err(e) => internal(format!("the upload's writer failed: {e}")),
    }
}

/// The cookie check of uploads. A refused upload's body is drained (bounded, as other
/// refusals' are), so that the client, still sending, hears the 401 rather than a reset
/// connection.
async fn upload_auth(
    State(g): State<meshwork_http::auth::Guard>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if g.authorized(req.headers()) {
        return next.run(req).await;
    }
    drain(&mut req.into_body().into_data_stream()).await;
    g.refusal()
}

/// `DELETE /api/v1/content/{id}` (authenticated): 204, or 404 when not stored.
async fn content_delete(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let id = match id.parse::<ContentId>() {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match blocking(&s, move |s| s.content.delete(&id)).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("content {id} not found")),
        Err(e @ ContentError::Unavailable(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => failure(&s, e),
    }
}

/// Reads (and discards) a bounded rest of a refused upload's body, so that the client, still
/// sending, hears the reason instead of a reset connection.
async fn drain(stream: &mut axum::body::BodyDataStream) {
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        match stream.next().await {
            Some(Ok(c)) => drained += c.len(),
            _ => break,
        }
    }
}

/// The answer to a refused upload, with the reason: 413 too large, 400 a bad name or
/// manifest, 507 no room on the disk, 503 the store down, else 500.
fn upload_failure(s: &Inner, e: ContentError) -> Response {
    match e {
        e @ ContentError::TooLarge(_) => error(StatusCode::PAYLOAD_TOO_LARGE, e),
        e @ ContentError::OverQuota { .. } => error(StatusCode::INSUFFICIENT_STORAGE, e),
        e @ ContentError::Manifest(_) => error(StatusCode::BAD_REQUEST, e),
        e @ ContentError::NoSpace(..) => {
            // Per upload, not per request of every kind: the disk filling is worth a line.
            tracing::warn!("upload refused: {e}");
            error(StatusCode::INSUFFICIENT_STORAGE, e)
        }
        e @ ContentError::Unavailable(_) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        e => failure(s, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `released·10⁹ ≤ rate·elapsed_ns`: no more bytes out by `t` than the rate paid for
    /// since `s`.
    fn within(released: u64, rate: u64, s: Instant, t: Instant) -> bool {
        released as u128 * 1_000_000_000 <= rate as u128 * t.duration_since(s).as_nanos()
    }

    /// The download cap never lets out more than `rate × elapsed` since a transfer began
    /// (no initial credit, none saved while idle), over chunks of every size, with sleepers
    /// that wake late; and it still reaches its rate over a long run.
    #[test]
    fn the_pacer_never_beats_its_rate_and_still_reaches_it() {
        let rate = 20_000_000; // 20 MB/s: a 64 KiB chunk takes 3.3 ms, as long as a late wake-up
        let sizes = [
            65_536, 1, 1_500, 65_536, 300_000, 7, 4_096, 65_536, 20_000, 131_072,
        ];
        let mut p = Pacer::new(rate);
        let t0 = Instant::now();
        let mut now = t0;
        let mut released = 0u64;
        // A deterministic timer lateness of 0 to 3 ms per wake-up.
        let mut lcg = 12345u64;
        let mut late = || {
            lcg = lcg
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Duration::from_micros((lcg >> 33) % 3_000)
        };
        let mut last = t0;
        for i in 0..3_000 {
            let n = sizes[i % sizes.len()];
            let at = p.reserve(n, now);
            // The chunk goes out when the pacer says, or at once when that is past.
            let out = at.max(now);
            released += n as u64;
            assert!(
                within(released, rate, t0, out),
                "chunk {i}: {released} bytes out {:?} after the start",
                out - t0
            );
            last = out;
            // A sleeper wakes late; a chunk let out at once costs only its handling.
            now = if at > now {
                out + late()
            } else {
                out + Duration::from_micros(5)
            };
        }
        let achieved = released as f64 / (last - t0).as_secs_f64();
        assert!(
            achieved >= 0.95 * rate as f64,
            "reached only {:.1} % of the rate",
            100.0 * achieved / rate as f64
        );

        // After an idle minute, a new transfer gets no credit for it: its first chunk waits
        // its full time, and the same bound holds from its own start.
        let t1 = last + Duration::from_secs(60);
        let first = p.reserve(65_536, t1);
        let full = Duration::from_secs_f64(65_536.0 / rate as f64);
        assert!(first >= t1 + full, "{:?} < {full:?}", first - t1);
        let mut out_bytes = 65_536u64;
        assert!(within(out_bytes, rate, t1, first));
        // Many downloads asking at once share the rate: released one after another.
        let mut at = first;
        for _ in 0..50 {
            at = p.reserve(10_000, t1).max(t1);
            out_bytes += 10_000;
            assert!(within(out_bytes, rate, t1, at));
        }
        assert!(at >= t1 + Duration::from_secs_f64(out_bytes as f64 / rate as f64));
    }

    /// A small store (transfers and an upload), then copies of its `server.redb` truncated
    /// or with one byte flipped at many offsets: opening each returns Ok or an error, never
    /// a panic, and an opened one answers reads without panicking either.
    #[test]
    fn damaged_copies_of_a_store_open_or_fail_without_panicking() {
        use meshwork_ledger::spec::DEV_FAUCET_SECRET;
        use meshwork_ledger::Wallet;
        let dir = tempfile::tempdir().unwrap();
        let spec = ChainSpec::test("test-central-fuzz");
        let orig = dir.path().join("orig");
        {
            let cfg = ServerConfig::new(&orig, spec.clone());
            let s = open(&cfg, None).unwrap();
            let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
            let id = s.ledger.chain_id();
            for nonce in 0..20 {
                let t = faucet.transfer(id, Wallet::generate().address(), 5, 1, nonce);
                s.ledger.submit(&t).unwrap();
            }
            let mut up = s.content.begin("a.bin", 16 << 10).unwrap();
            up.write(&[9u8; 40_000]).unwrap();
            s.content.commit(up).unwrap();
        }
        let bytes = std::fs::read(orig.join(DB_FILE)).unwrap();
        let len = bytes.len();
        let mut offsets: Vec<usize> = vec![0, 1, 8, 9, 16, 32, 64, 100, 511, 512, 1024, 2048];
        offsets.extend((1..=16).map(|i| i * len / 17));
        offsets.extend([4095, 4096, 4097, 8192, len - 4096, len - 1]);
        offsets.retain(|o| *o < len);
        offsets.sort();
        offsets.dedup();
        let mut outcomes = (0, 0);
        for (i, off) in offsets.iter().enumerate() {
            for flip in [false, true] {
                let case = dir.path().join(format!("case-{i}-{flip}"));
                std::fs::create_dir_all(case.join("content")).unwrap();
                for e in std::fs::read_dir(orig.join("content")).unwrap() {
                    let e = e.unwrap();
                    std::fs::copy(e.path(), case.join("content").join(e.file_name())).unwrap();
                }
                let mut damaged = bytes.clone();
                if flip {
                    damaged[*off] ^= 0x5a;
                } else {
                    damaged.truncate(*off);
                }
                std::fs::write(case.join(DB_FILE), &damaged).unwrap();
                let cfg = ServerConfig::new(&case, spec.clone());
                let r = std::panic::catch_unwind(|| match open(&cfg, None) {
                    Ok(s) => {
                        // Whatever it answers, it answers.
                        let _ = s.ledger.verify();
                        let _ = s.ledger.log_after(0, MAX_PAGE);
                        let _ = s.content.list();
                        true
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        assert!(!msg.is_empty());
                        false
                    }
                });
                match r {
                    Ok(true) => outcomes.0 += 1,
                    Ok(false) => outcomes.1 += 1,
                    Err(_) => panic!(
                        "opening server.redb {} at offset {off} panicked",
                        if flip {
                            "with a flipped byte"
                        } else {
                            "truncated"
                        }
                    ),
                }
            }
        }
        // Truncation to 0 is a new database next to stored content: refused; some flips land
        // in unused space and open fine.
        eprintln!("opened {}, refused {}", outcomes.0, outcomes.1);
        assert!(outcomes.0 > 0 && outcomes.1 > 0, "{outcomes:?}");
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(parse_range(Some("bytes=4-"), 10), Ok(Some((4, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=5-100"), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=x-2"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 10), Ok(None));
    }
}
