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
//! - `GET /api/v1/content` and `GET /api/v1/content/{id}`: manifests' summaries;
//! - `GET /content/{id}`: the bytes, with single `Range` requests (206, 416);
//! - `GET /content/{id}/manifest`: the manifest, so that clients verify every piece.
//!
//! `GET /api/v1/status` reports counts, including the content bytes served (the origin's
//! upload, for the lab).

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
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use meshwork_ledger::{Address, ChainSpec, Hash, SignedTransfer, TxError};
use meshwork_swarm::{ContentId, Manifest};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::content::{ContentError, ContentStore};
use crate::ledger::{CentralLedger, LedgerError, MAX_PAGE};

/// The database file in the data directory.
pub const DB_FILE: &str = "server.redb";
const MAX_JSON_BODY: usize = 16 << 10;
/// Longest long poll.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Concurrent uploads; more get 503.
const MAX_UPLOADS: usize = 16;
/// Chunks of a download.
const READ_CHUNK: usize = 64 << 10;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub spec: ChainSpec,
    /// The piece size of uploads; `None`: the swarm's default for the upload's length (from
    /// its `Content-Length`, so that a file gets the same content id here as when a node
    /// shares it), or 256 KiB when the length is not given.
    pub piece_size: Option<u32>,
    /// The largest upload accepted.
    pub max_upload_bytes: u64,
    /// Caps the bytes per second of all content downloads together (the in-process lab's
    /// stand-in for a capped uplink; the netns lab caps the link with `tc` instead).
    pub upload_limit: Option<u64>,
    /// Senders whose transfers the operator refuses (the server decides alone, for every
    /// client).
    pub refuse_senders: HashSet<Address>,
}

impl ServerConfig {
    pub fn new(data_dir: &FsPath, spec: ChainSpec) -> ServerConfig {
        ServerConfig {
            data_dir: data_dir.to_path_buf(),
            spec,
            piece_size: None,
            max_upload_bytes: 64 << 30,
            upload_limit: None,
            refuse_senders: HashSet::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{path}: cannot open the database: {reason}")]
    Db { path: String, reason: String },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Content(#[from] ContentError),
}

struct Inner {
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

/// A token bucket shared by every download. Each chunk reserves its bytes and sleeps until
/// the bucket has paid for them, so the aggregate rate never exceeds `rate` (after a burst of
/// at most `rate / 20` bytes).
struct Limiter {
    rate: f64,
    /// (tokens, when) — tokens go negative while chunks wait.
    state: std::sync::Mutex<(f64, Instant)>,
}

impl Limiter {
    fn delay(&self, n: usize) -> Duration {
        let mut st = self.state.lock().expect("limiter lock");
        let now = Instant::now();
        let burst = self.rate / 20.0;
        st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * self.rate).min(burst);
        st.1 = now;
        st.0 -= n as f64;
        if st.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-st.0 / self.rate)
        }
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
}

impl RunningServer {
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
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Opens the store in `cfg.data_dir`, binds `listen` and serves until stopped.
pub async fn start(listen: SocketAddr, cfg: ServerConfig) -> Result<RunningServer, ServerError> {
    let dir = cfg.data_dir.clone();
    let inner = tokio::task::spawn_blocking(move || open(&cfg))
        .await
        .expect("the open task does not panic")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ServerError::Io(listen.to_string(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Io(listen.to_string(), e))?;
    let dying = inner.dying.clone();
    let app = router(inner);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async {
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
    })
}

fn open(cfg: &ServerConfig) -> Result<Shared, ServerError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| ServerError::Io(cfg.data_dir.display().to_string(), e))?;
    let path = cfg.data_dir.join(DB_FILE);
    let db = redb::Database::create(&path).map_err(|e| ServerError::Db {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let db = Arc::new(db);
    let ledger = CentralLedger::open(db.clone(), cfg.spec.clone())?;
    let content = ContentStore::open(db, &cfg.data_dir.join("content"), cfg.max_upload_bytes)?;
    let (_, count) = ledger.head()?;
    Ok(Arc::new(Inner {
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
            rate: r as f64,
            state: std::sync::Mutex::new((0.0, Instant::now())),
        }),
    }))
}

fn router(s: Shared) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/chain", get(chain))
        .route("/api/v1/tx", post(submit_tx))
        .route("/api/v1/tx/{id}", get(tx_status))
        .route("/api/v1/accounts/{addr}", get(account))
        .route("/api/v1/accounts/{addr}/history", get(history))
        .route("/api/v1/log", get(log))
        .route("/api/v1/content", get(content_list))
        .route("/api/v1/content/{id}", get(content_info))
        .route("/content/{id}", get(content_bytes))
        .route("/content/{id}/manifest", get(content_manifest))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        // The upload streams its body itself, with the store's own limit.
        .route(
            "/api/v1/upload/{name}",
            post(upload).layer(DefaultBodyLimit::disable()),
        )
        .with_state(s)
}

/// Runs blocking store work off the async runtime.
async fn blocking<T: Send + 'static>(
    s: &Shared,
    f: impl FnOnce(&Inner) -> T + Send + 'static,
) -> T {
    let s = s.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .expect("store work does not panic")
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

async fn status(State(s): State<Shared>) -> Response {
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
        Err(e) => internal(e),
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
        Err(e) => internal(e),
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
        Err(e) => internal(e),
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
        Err(e) => internal(e),
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
        Err(e) => internal(e),
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
        Err(e) => internal(e),
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
        Err(e) => internal(e),
    }
}

#[derive(Serialize, Deserialize)]
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
        Err(e) => internal(e),
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
        Err(e) => Err(internal(e)),
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
                        let d = l.delay(c.len());
                        if !d.is_zero() {
                            tokio::time::sleep(d).await;
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
    let up = match s.content.begin(&name, piece_size) {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
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
    let mut stream = body.into_data_stream();
    let mut failed = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if tx.send(Some(c)).await.is_err() {
                    break; // the writer stopped: its error is below
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
    match writer.await.expect("the writer does not panic") {
        Ok(Some((id, m))) => (StatusCode::CREATED, Json(summary(&id, &m))).into_response(),
        Ok(None) => internal("an upload was abandoned and reported as finished"),
        Err(e @ ContentError::TooLarge(_)) => error(StatusCode::PAYLOAD_TOO_LARGE, e),
        Err(e @ ContentError::Manifest(_)) => error(StatusCode::BAD_REQUEST, e),
        Err(e) => internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

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
