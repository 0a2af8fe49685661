//! The HTTP API: JSON under `/api/v1/`, Prometheus text at `/metrics`. A thin layer over
//! [`NodeHandle`]; it holds no state of its own. It listens on loopback by default and has no
//! authentication, so it must not be exposed beyond the machine.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::node::{NodeError, NodeHandle};

/// A command that the node does not answer within this time gets a 503.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

pub fn router(handle: NodeHandle) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/peers", get(peers))
        .route("/api/v1/addrbook", get(addrbook))
        .route("/metrics", get(metrics))
        .with_state(handle)
}

#[derive(Serialize)]
struct ApiError {
    error: String,
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(ApiError {
            error: e.to_string(),
        }),
    )
        .into_response()
}

async fn answer<T: Serialize>(
    fut: impl std::future::Future<Output = Result<T, NodeError>>,
) -> Response {
    match tokio::time::timeout(ANSWER_TIMEOUT, fut).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => unavailable(e),
        Err(_) => unavailable("the node did not answer in time"),
    }
}

async fn status(State(h): State<NodeHandle>) -> Response {
    answer(h.status()).await
}

async fn peers(State(h): State<NodeHandle>) -> Response {
    answer(h.peers()).await
}

async fn addrbook(State(h): State<NodeHandle>) -> Response {
    answer(h.addrbook()).await
}

async fn metrics(State(h): State<NodeHandle>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.encode_metrics(),
    )
        .into_response()
}
