//! The tracker over HTTP: `POST /api/v1/announce` (JSON) and `GET /api/v1/stats`.
//!
//! A malformed announce (bad JSON, a bad content id, peer id or address, too many addresses)
//! gets a 400 with the reason, and changes nothing. Bodies are limited to 16 KiB. Stale peers
//! are swept every interval.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
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

async fn announce(
    State(t): State<Shared>,
    body: Result<Json<AnnounceRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            t.lock().expect("tracker lock").note_rejected();
            return error(StatusCode::BAD_REQUEST, e.body_text());
        }
    };
    let r = t
        .lock()
        .expect("tracker lock")
        .announce(&req, Instant::now(), &mut rand::thread_rng());
    match r {
        Ok(a) => Json(a).into_response(),
        Err(e @ AnnounceError::Full(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
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
    let interval = cfg.interval;
    let shared: Shared = Arc::new(Mutex::new(Tracker::new(cfg)));
    let sweeper = shared.clone();
    let app = router(shared);
    let task = tokio::spawn(async move {
        let sweep = async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                sweeper.lock().expect("tracker lock").expire(Instant::now());
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
