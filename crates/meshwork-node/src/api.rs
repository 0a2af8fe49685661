//! The HTTP API: JSON under `/api/v1/`, Prometheus text at `/metrics`. A thin layer over
//! [`NodeHandle`]; it holds no state of its own. The node serves this router behind
//! `meshwork_http::auth::Guard::protect`: every route needs the node's cookie, and requests
//! naming a foreign host or coming from a foreign origin are refused (issue 14).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use meshwork_ledger::{
    Address, Block, Hash, Ledger, SignedTransfer, Transaction, TxError, TxStatus,
};
use serde::{Deserialize, Serialize};

use crate::content::{ContentError, FetchRequest, ShareRequest};
use crate::node::{Health, NodeError, NodeHandle};
use meshwork_swarm::ContentId;

/// A command that the node does not answer within this time gets a 503.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

pub fn router(handle: NodeHandle) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/health", get(health))
        .route("/api/v1/peers", get(peers))
        .route("/api/v1/addrbook", get(addrbook))
        .route("/api/v1/tx", post(submit_tx))
        .route("/api/v1/tx/{id}", get(tx_status))
        .route("/api/v1/accounts/{addr}", get(account))
        .route("/api/v1/chain", get(chain))
        .route("/api/v1/blocks/{id}", get(block))
        .route("/api/v1/mempool", get(mempool))
        .route("/api/v1/content", post(share).get(content_list))
        .route("/api/v1/content/{id}", get(content_get).delete(content_rm))
        .route("/api/v1/content/{id}/verify", post(content_verify))
        .route("/api/v1/fetch", post(fetch))
        .route("/api/v1/gossip/recent", get(gossip_recent))
        .route("/api/v1/mining", put(set_mining))
        .route("/metrics", get(metrics))
        .with_state(handle)
}

/// Every error body: `{"error": "insufficient balance: has 5, needs 7"}`.
#[derive(Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

fn bad_request(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(ApiError {
            error: e.to_string(),
        }),
    )
        .into_response()
}

fn not_found(what: impl std::fmt::Display) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ApiError {
            error: format!("{what} not found"),
        }),
    )
        .into_response()
}

/// `POST /api/v1/tx` body: the postcard encoding of a signed transfer, in hex.
#[derive(Serialize, Deserialize)]
pub struct SubmitTx {
    pub tx: String,
}

#[derive(Serialize, Deserialize)]
pub struct Submitted {
    pub id: String,
}

/// `GET /api/v1/accounts/{addr}`.
#[derive(Serialize, Deserialize)]
pub struct AccountView {
    pub address: String,
    pub balance: u64,
    /// The nonce of the account's next transfer on the chain...
    pub nonce: u64,
    /// ... and the one to use now, after the transfers it has pending.
    pub next_nonce: u64,
}

/// `GET /api/v1/chain`.
#[derive(Serialize, Deserialize)]
pub struct ChainView {
    pub network: String,
    pub chain_id: String,
    pub height: u64,
    pub tip: String,
    pub total_work: String,
    pub timestamp: u64,
    pub next_difficulty: u64,
    pub blocks_held: usize,
    pub orphans: usize,
    pub mempool: usize,
}

#[derive(Serialize, Deserialize)]
pub struct TxView {
    pub id: String,
    pub kind: String,
    pub from: Option<String>,
    pub to: String,
    pub amount: u64,
    pub fee: u64,
    pub nonce: Option<u64>,
}

impl TxView {
    pub fn of(t: &Transaction) -> TxView {
        match t {
            Transaction::Coinbase(c) => TxView {
                id: t.id().to_string(),
                kind: "coinbase".into(),
                from: None,
                to: c.to.to_string(),
                amount: c.amount,
                fee: 0,
                nonce: None,
            },
            Transaction::Transfer(s) => TxView {
                id: t.id().to_string(),
                kind: "transfer".into(),
                from: Some(s.transfer.from.to_string()),
                to: s.transfer.to.to_string(),
                amount: s.transfer.amount,
                fee: s.transfer.fee,
                nonce: Some(s.transfer.nonce),
            },
        }
    }
}

/// `GET /api/v1/blocks/{height-or-hash}`.
#[derive(Serialize, Deserialize)]
pub struct BlockView {
    pub hash: String,
    pub height: u64,
    pub prev: String,
    pub merkle_root: String,
    pub timestamp: u64,
    pub difficulty: u64,
    pub nonce: u64,
    pub on_main_chain: bool,
    pub txs: Vec<TxView>,
}

/// `GET /api/v1/tx/{id}`.
#[derive(Serialize, Deserialize)]
pub struct TxStatusView {
    pub id: String,
    #[serde(flatten)]
    pub status: TxStatus,
}

#[derive(Serialize, Deserialize)]
pub struct MempoolView {
    pub count: usize,
    /// The highest-fee pending transfers, at most 100.
    pub txs: Vec<TxView>,
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

fn content_error(e: ContentError) -> Response {
    let code = match e {
        ContentError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        ContentError::Unknown(_) => StatusCode::NOT_FOUND,
        ContentError::Exists(_)
        | ContentError::PathInUse { .. }
        | ContentError::RecordedAt(..)
        | ContentError::WouldOverwrite(_) => StatusCode::CONFLICT,
        ContentError::NotReady(_) => StatusCode::CONFLICT,
        // Not made durable, so not accepted: the node's storage is at fault, not the request.
        ContentError::Persist(_) => StatusCode::INSUFFICIENT_STORAGE,
        ContentError::Full | ContentError::TooManyPending => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    (
        code,
        Json(ApiError {
            error: e.to_string(),
        }),
    )
        .into_response()
}

/// Sharing hashes the whole file: a large one takes longer than other answers.
const SHARE_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs a content request with a deadline; `Err(response)` is already an HTTP error.
async fn on_content<T>(
    fut: impl std::future::Future<Output = Result<T, ContentError>>,
    timeout: Duration,
    late: &str,
) -> Result<T, Response> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(content_error(e)),
        Err(_) => Err(unavailable(late)),
    }
}

const LATE: &str = "the node did not answer in time";

async fn share(State(h): State<NodeHandle>, body: Option<Json<ShareRequest>>) -> Response {
    let Some(Json(req)) = body else {
        return bad_request("expected a JSON body {\"path\": \"/absolute/path\"}");
    };
    match on_content(
        h.content.share(req),
        SHARE_TIMEOUT,
        "the node did not finish hashing the file in time",
    )
    .await
    {
        Ok(info) => (StatusCode::CREATED, Json(info)).into_response(),
        Err(r) => r,
    }
}

async fn fetch(State(h): State<NodeHandle>, body: Option<Json<FetchRequest>>) -> Response {
    let Some(Json(req)) = body else {
        return bad_request("expected a JSON body {\"target\": \"<ticket or content id>\"}");
    };
    match on_content(h.content.fetch(req), ANSWER_TIMEOUT, LATE).await {
        Ok(info) => (StatusCode::ACCEPTED, Json(info)).into_response(),
        Err(r) => r,
    }
}

async fn content_list(State(h): State<NodeHandle>) -> Response {
    match on_content(h.content.list(), ANSWER_TIMEOUT, LATE).await {
        Ok(all) => Json(all).into_response(),
        Err(r) => r,
    }
}

async fn content_get(State(h): State<NodeHandle>, Path(id): Path<String>) -> Response {
    let id = match id.parse::<ContentId>() {
        Ok(id) => id,
        Err(e) => return bad_request(e),
    };
    match on_content(h.content.get(id), ANSWER_TIMEOUT, LATE).await {
        Ok(Some(info)) => Json(info).into_response(),
        Ok(None) => not_found(format!("content {id}")),
        Err(r) => r,
    }
}

async fn content_rm(State(h): State<NodeHandle>, Path(id): Path<String>) -> Response {
    let id = match id.parse::<ContentId>() {
        Ok(id) => id,
        Err(e) => return bad_request(e),
    };
    match on_content(h.content.remove(id), ANSWER_TIMEOUT, LATE).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

/// Hashing a large file takes a while (about a second per GiB).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(600);

async fn content_verify(State(h): State<NodeHandle>, Path(id): Path<String>) -> Response {
    let id = match id.parse::<ContentId>() {
        Ok(id) => id,
        Err(e) => return bad_request(e),
    };
    match on_content(
        h.content.verify(id),
        VERIFY_TIMEOUT,
        "the node did not finish hashing the file in time",
    )
    .await
    {
        Ok(report) => Json(report).into_response(),
        Err(r) => r,
    }
}

async fn status(State(h): State<NodeHandle>) -> Response {
    answer(h.status()).await
}

/// `GET /api/v1/health`: 200 `{"healthy": true}`, or 503 `{"healthy": false, "error": "..."}`
/// while the chain store is stopped by a storage error. Answered from shared state, so it
/// answers even when the node's threads are busy.
async fn health(State(h): State<NodeHandle>) -> Response {
    let health = Health::of(h.health());
    let code = if health.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(health)).into_response()
}

async fn peers(State(h): State<NodeHandle>) -> Response {
    answer(h.peers()).await
}

async fn addrbook(State(h): State<NodeHandle>) -> Response {
    answer(h.addrbook()).await
}

/// Runs a ledger query; `Err(response)` is already an HTTP error.
async fn on_ledger<T: Send + 'static>(
    h: &NodeHandle,
    f: impl FnOnce(&mut Ledger) -> T + Send + 'static,
) -> Result<T, Response> {
    match tokio::time::timeout(ANSWER_TIMEOUT, h.ledger(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("the ledger did not answer in time")),
    }
}

async fn submit_tx(State(h): State<NodeHandle>, body: Option<Json<SubmitTx>>) -> Response {
    let Some(Json(body)) = body else {
        return bad_request("expected a JSON body {\"tx\": \"<hex>\"}");
    };
    let bytes = match hex::decode(body.tx.trim()) {
        Ok(b) => b,
        Err(_) => return bad_request("tx is not hexadecimal"),
    };
    let t = match SignedTransfer::decode(&bytes) {
        Ok(t) => t,
        Err(e) => return bad_request(e),
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, h.submit(t)).await {
        Ok(Ok(Ok(id))) => Json(Submitted { id: id.to_string() }).into_response(),
        // Not the client's fault: the node cannot store it now, and says so.
        Ok(Ok(Err(e @ TxError::Storage(_)))) => unavailable(e),
        Ok(Ok(Err(e))) => bad_request(e),
        Ok(Err(e)) => unavailable(e),
        Err(_) => unavailable("the ledger did not answer in time"),
    }
}

async fn tx_status(State(h): State<NodeHandle>, Path(id): Path<String>) -> Response {
    let id: Hash = match id.parse() {
        Ok(id) => id,
        Err(e) => return bad_request(e),
    };
    match on_ledger(&h, move |l| l.tx_status(&id)).await {
        Ok(Ok(status)) => Json(TxStatusView {
            id: id.to_string(),
            status,
        })
        .into_response(),
        Ok(Err(e)) => unavailable(e),
        Err(r) => r,
    }
}

async fn account(State(h): State<NodeHandle>, Path(addr): Path<String>) -> Response {
    let addr: Address = match addr.parse() {
        Ok(a) => a,
        Err(e) => return bad_request(e),
    };
    match on_ledger(&h, move |l| l.account(&addr)).await {
        Ok(Ok((acct, next_nonce))) => Json(AccountView {
            address: addr.to_string(),
            balance: acct.balance,
            nonce: acct.nonce,
            next_nonce,
        })
        .into_response(),
        Ok(Err(e)) => unavailable(e),
        Err(r) => r,
    }
}

async fn chain(State(h): State<NodeHandle>) -> Response {
    let network = h.network.to_string();
    match on_ledger(&h, move |l| {
        let tip = l.tip();
        ChainView {
            network,
            chain_id: l.chain().chain_id().to_string(),
            height: tip.height,
            tip: tip.hash.to_string(),
            total_work: tip.work.to_string(),
            timestamp: tip.timestamp,
            next_difficulty: l.chain().expected_difficulty(&tip.hash),
            blocks_held: l.chain().block_count(),
            orphans: l.orphan_count(),
            mempool: l.mempool().len(),
        }
    })
    .await
    {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

fn block_view(b: &Block, on_main_chain: bool) -> BlockView {
    BlockView {
        hash: b.hash().to_string(),
        height: b.header.height,
        prev: b.header.prev.to_string(),
        merkle_root: b.header.merkle_root.to_string(),
        timestamp: b.header.timestamp,
        difficulty: b.header.target,
        nonce: b.header.nonce,
        on_main_chain,
        txs: b.txs.iter().map(TxView::of).collect(),
    }
}

async fn block(State(h): State<NodeHandle>, Path(id): Path<String>) -> Response {
    enum Key {
        Height(u64),
        Hash(Hash),
    }
    let key = if let Ok(height) = id.parse::<u64>() {
        Key::Height(height)
    } else {
        match id.parse::<Hash>() {
            Ok(hash) => Key::Hash(hash),
            Err(_) => return bad_request(format!("{id:?} is neither a height nor a block hash")),
        }
    };
    let found = on_ledger(&h, move |l| {
        let hash = match key {
            Key::Height(height) => l.chain().hash_at(height),
            Key::Hash(hash) => Some(hash),
        };
        let Some(hash) = hash else { return Ok(None) };
        let on_main = l.chain().on_main(&hash);
        l.chain()
            .block(&hash)
            .map(|b| b.map(|b| block_view(&b, on_main)))
    })
    .await;
    match found {
        Ok(Ok(Some(v))) => Json(v).into_response(),
        Ok(Ok(None)) => not_found(format!("block {id}")),
        Ok(Err(e)) => unavailable(e),
        Err(r) => r,
    }
}

async fn mempool(State(h): State<NodeHandle>) -> Response {
    match on_ledger(&h, |l| MempoolView {
        count: l.mempool().len(),
        txs: l
            .mempool()
            .list(100)
            .into_iter()
            .map(|t| TxView::of(&Transaction::Transfer(t)))
            .collect(),
    })
    .await
    {
        Ok(v) => Json(v).into_response(),
        Err(r) => r,
    }
}

async fn gossip_recent(State(h): State<NodeHandle>) -> Response {
    answer(h.gossip_seen()).await
}

/// `PUT /api/v1/mining` body: `{"address": "<addr>", "pace_ms": 500}` starts (or replaces) the
/// miner; `{"address": null}` stops it. `pace_ms` is the lab's stand-in for hash rate on the
/// `test` chain (see `MinerConfig::pace`).
#[derive(Serialize, Deserialize)]
pub struct MiningRequest {
    pub address: Option<String>,
    #[serde(default)]
    pub pace_ms: Option<u64>,
}

async fn set_mining(State(h): State<NodeHandle>, body: Option<Json<MiningRequest>>) -> Response {
    let Some(Json(req)) = body else {
        return bad_request("expected a JSON body {\"address\": \"<addr>\" or null}");
    };
    let cfg = match req.address {
        None => None,
        Some(a) => match a.parse::<Address>() {
            Ok(address) => Some(crate::ledger_service::MinerConfig {
                address,
                pace: req.pace_ms.map(Duration::from_millis),
            }),
            Err(e) => return bad_request(e),
        },
    };
    answer(h.set_mining(cfg)).await
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
