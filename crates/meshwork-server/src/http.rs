//! The tracker over HTTP: `POST /api/v1/announce` (JSON) and `GET /api/v1/stats`.
//!
//! A malformed announce (bad JSON, a bad content id, peer id or address, too many addresses)
//! gets a 400 with the reason, and changes nothing; a bad signature or a replay a 403; an IP
//! over its limits a 429; a full tracker a 503. Bodies are limited to 16 KiB. The announce's
//! source is the connection's peer address (`ConnectInfo<SocketAddr>`). Stale peers are swept
//! every second, a bounded batch per lock, and memory goes back to the system after a large
//! expiry.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::tracker::{AnnounceError, AnnounceRequest, Tracker, TrackerConfig};

const MAX_BODY: usize = 16 << 10;

type Shared = Arc<Mutex<Tracker>>;

#[derive(Serialize)]
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

pub fn router(tracker: Shared) -> Router {
    Router::new()
        .route("/api/v1/announce", post(announce))
        .route("/api/v1/stats", get(stats))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(tracker)
}

/// Records dropped after which the allocator is asked to give memory back...
const TRIM_AFTER: usize = 10_000;
/// ...or this many, once a second passes with none dropped.
const TRIM_QUIET: usize = 1_000;
/// Records expired per lock, at most (announces get the lock in between).
const SWEEP_BATCH: usize = 4096;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn announce(
    State(t): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<AnnounceRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            t.lock()
                .expect("tracker lock")
                .note_rejected(peer.ip(), Instant::now());
            // 413 for a body over `MAX_BODY` (the client should send less, not differently);
            // everything else that is not an announce is a 400, as the protocol documents
            // (axum would answer 422 or 415 for some).
            let code = match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return error(code, e.body_text());
        }
    };
    let r = t.lock().expect("tracker lock").announce(
        &req,
        peer.ip(),
        Instant::now(),
        unix_ms(),
        &mut rand::thread_rng(),
    );
    match r {
        Ok(a) => Json(a).into_response(),
        Err(e @ (AnnounceError::Full(_) | AnnounceError::FullPeers(_))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e)
        }
        Err(
            e @ (AnnounceError::RateLimited(_)
            | AnnounceError::IpLimit(..)
            | AnnounceError::TooManyClients),
        ) => error(StatusCode::TOO_MANY_REQUESTS, e),
        Err(e @ (AnnounceError::Signature(_) | AnnounceError::Replay)) => {
            error(StatusCode::FORBIDDEN, e)
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn stats(State(t): State<Shared>) -> Response {
    Json(t.lock().expect("tracker lock").stats()).into_response()
}

/// A running tracker.
pub struct RunningTracker {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RunningTracker {
    pub fn stop(self) {
        self.task.abort();
    }
}

/// Binds `listen` and serves until stopped.
pub async fn start(listen: SocketAddr, cfg: TrackerConfig) -> std::io::Result<RunningTracker> {
    start_with_limits(listen, cfg, meshwork_http::serve::Limits::tracker()).await
}

/// [`start`] with other connection caps and timeouts than [`meshwork_http::serve::Limits::tracker`].
pub async fn start_with_limits(
    listen: SocketAddr,
    cfg: TrackerConfig,
    limits: meshwork_http::serve::Limits,
) -> std::io::Result<RunningTracker> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let shared: Shared = Arc::new(Mutex::new(Tracker::new(cfg)));
    let sweeper = shared.clone();
    let app = router(shared);
    let task = tokio::spawn(async move {
        let sweep = async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut freed = 0;
            loop {
                tick.tick().await;
                let now = Instant::now();
                // In batches: the lock is held for a bounded time however much expires.
                while sweeper
                    .lock()
                    .expect("tracker lock")
                    .expire_some(now, SWEEP_BATCH)
                    == SWEEP_BATCH
                {
                    tokio::task::yield_now().await;
                }
                let now_freed = sweeper.lock().expect("tracker lock").take_freed();
                freed += now_freed;
                // During a long expiry wave every TRIM_AFTER records, and once more when the
                // wave is over (else what expired after the last trim would stay).
                if freed >= TRIM_AFTER || (now_freed == 0 && freed >= TRIM_QUIET) {
                    freed = 0;
                    trim().await;
                }
            }
        };
        tokio::select! {
            r = meshwork_http::serve::serve(listener, app, limits, std::future::pending()) => {
                if let Err(e) = r {
                    tracing::error!("tracker stopped: {e}");
                }
            }
            _ = sweep => {}
        }
    });
    Ok(RunningTracker { addr, task })
}

/// Gives freed heap back to the system: glibc keeps the arenas of a flood that expired
/// otherwise (RSS stays at its peak). Off the lock, on a blocking thread.
async fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let _ = tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim only releases free memory; it takes no pointers.
        unsafe { libc::malloc_trim(0) };
    })
    .await;
}
