//! The lab's HTTP client of the two services it measures: a node's API and the server's.
//!
//! Scenarios drive every node through its HTTP API, in either runner: the in-process harness
//! starts each node's API on the node's own loopback address, and the netns runner's nodes are
//! processes that only the API reaches. A scenario is then written once, and only the
//! lifecycle of its nodes (start, kill, restart, partition) depends on the runner.
//!
//! The node and the server answer `POST /api/v1/tx`, `GET /api/v1/tx/{id}`,
//! `GET /api/v1/accounts/{addr}` and `GET /api/v1/chain` (its `chain_id`) with the same JSON,
//! so the transfer calls below work against both.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use meshwork_http::auth::Credentials;
use meshwork_ledger::{Address, Hash, SignedTransfer, TxStatus};
use meshwork_node::api::{AccountView, BlockView, ChainView, MiningRequest, TxStatusView};
use meshwork_node::content::{ContentInfo, FetchRequest, ShareRequest};
use meshwork_node::node::{Arrival, PeerInfo, Status};
use meshwork_server::server::{LogPage, ServerStatus};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Every request but a long poll gives up after this.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What a service answered to a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Submitted {
    Accepted(Hash),
    /// Refused, with the service's reason (400).
    Refused(String),
}

/// Where an [`Api`]'s credentials come from.
#[derive(Clone, Debug)]
enum Auth {
    /// None: the server's open calls, or a probe.
    None,
    /// Given (an in-process service hands its cookie out).
    Fixed(Credentials),
    /// A cookie file, read when first needed and again after a 401 (a restarted process
    /// writes a new cookie).
    File {
        path: PathBuf,
        cached: Arc<Mutex<Option<Credentials>>>,
    },
}

#[derive(Clone, Debug)]
pub struct Api {
    base: String,
    http: reqwest::Client,
    auth: Auth,
}

impl Api {
    /// A client of the service at `addr` (`HOST:PORT` or a URL) that sends `creds` (the
    /// service's cookie: see `meshwork_http::auth`).
    pub fn with_credentials(addr: impl std::fmt::Display, creds: Credentials) -> Api {
        Api {
            auth: Auth::Fixed(creds),
            ..Api::new(addr)
        }
    }

    /// A client of the service at `addr` that sends the cookie in `path` (a process's
    /// `<data-dir>/api.cookie`), read again whenever the service answers 401.
    pub fn with_cookie_file(addr: impl std::fmt::Display, path: PathBuf) -> Api {
        Api {
            auth: Auth::File {
                path,
                cached: Arc::default(),
            },
            ..Api::new(addr)
        }
    }

    /// The cookie file this client reads, if it reads one.
    pub fn cookie_file(&self) -> Option<&std::path::Path> {
        match &self.auth {
            Auth::File { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The credentials this client sends, if any (reading its cookie file if need be).
    pub fn credentials(&self) -> Result<Option<Credentials>> {
        self.creds(false)
    }

    fn creds(&self, reread: bool) -> Result<Option<Credentials>> {
        match &self.auth {
            Auth::None => Ok(None),
            Auth::Fixed(c) => Ok(Some(c.clone())),
            Auth::File { path, cached } => {
                let mut cached = cached.lock().unwrap_or_else(|e| e.into_inner());
                if reread || cached.is_none() {
                    *cached = Some(Credentials::read(path)?);
                }
                Ok(cached.clone())
            }
        }
    }

    /// A client of the service at `addr` (`HOST:PORT` or a URL), without credentials.
    pub fn new(addr: impl std::fmt::Display) -> Api {
        let addr = addr.to_string();
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        Api {
            base,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("a default reqwest client builds"),
            auth: Auth::None,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request; `Ok((status, body))` for any HTTP answer, `Err` when none came.
    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        timeout: Duration,
    ) -> Result<(StatusCode, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let mut reread = false;
        let r = loop {
            let mut req = self.http.request(method.clone(), &url).timeout(timeout);
            if let Some(b) = body {
                req = req.json(b);
            }
            // A cookie file not there yet (the process is starting) is a request without it.
            if let Ok(Some(c)) = self.creds(reread) {
                req = c.apply(req);
            }
            let r = req.send().await.with_context(|| url.clone())?;
            if r.status() == StatusCode::UNAUTHORIZED
                && !reread
                && matches!(self.auth, Auth::File { .. })
            {
                // The process may have restarted with a new cookie: read it once more.
                reread = true;
                continue;
            }
            break r;
        };
        let code = r.status();
        let bytes = meshwork_http::body::read_capped(r, meshwork_http::body::API_ANSWER_MAX)
            .await
            .with_context(|| url.clone())?
            .to_vec();
        Ok((code, bytes))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T> {
        let (code, bytes) = self.raw(method, path, body, TIMEOUT).await?;
        if !code.is_success() {
            bail!(
                "{}{path}: {code}: {}",
                self.base,
                reason(&bytes).unwrap_or_default()
            );
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{}{path}: unexpected answer", self.base))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// Whether the service's HTTP listener answers at all, whatever the status. It probes
    /// `/metrics`, which the node serves without its actor (a hundred nodes starting on two
    /// cores keep their actors busy for a while, and `/api/v1/status` waits on the actor);
    /// the server has no such route and its 404 is an answer too.
    pub async fn is_up(&self) -> bool {
        self.raw(Method::GET, "/metrics", None::<&()>, Duration::from_secs(5))
            .await
            .is_ok()
    }

    // Transfers: the node and the server alike.

    pub async fn chain_id(&self) -> Result<Hash> {
        let v: serde_json::Value = self.get("/api/v1/chain").await?;
        v["chain_id"]
            .as_str()
            .ok_or_else(|| anyhow!("{}: no chain id", self.base))?
            .parse()
            .context("the chain id")
    }

    /// `Err` when the service did not answer (or failed inside); a refusal is an answer.
    pub async fn submit(&self, t: &SignedTransfer) -> Result<Submitted> {
        let body = serde_json::json!({ "tx": hex::encode(t.encode()) });
        let (code, bytes) = self
            .raw(Method::POST, "/api/v1/tx", Some(&body), TIMEOUT)
            .await?;
        if code.is_success() {
            return Ok(Submitted::Accepted(t.id()));
        }
        let why = reason(&bytes).unwrap_or_default();
        if code == StatusCode::BAD_REQUEST {
            Ok(Submitted::Refused(why))
        } else {
            bail!("{}/api/v1/tx: {code}: {why}", self.base)
        }
    }

    pub async fn tx_status(&self, id: &Hash) -> Result<TxStatus> {
        let v: TxStatusView = self.get(&format!("/api/v1/tx/{id}")).await?;
        Ok(v.status)
    }

    pub async fn account(&self, a: &Address) -> Result<AccountView> {
        self.get(&format!("/api/v1/accounts/{a}")).await
    }

    // Nodes.

    pub async fn status(&self) -> Result<Status> {
        self.get("/api/v1/status").await
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.get("/api/v1/peers").await
    }

    pub async fn chain(&self) -> Result<ChainView> {
        self.get("/api/v1/chain").await
    }

    pub async fn block(&self, height_or_hash: &str) -> Result<BlockView> {
        self.get(&format!("/api/v1/blocks/{height_or_hash}")).await
    }

    /// Starts the node's miner (to `address`, at most one block per `pace`), or stops it.
    pub async fn set_mining(&self, m: Option<(Address, Duration)>) -> Result<()> {
        let body = MiningRequest {
            address: m.map(|(a, _)| a.to_string()),
            pace_ms: m.map(|(_, p)| p.as_millis() as u64),
        };
        self.call::<serde_json::Value>(Method::PUT, "/api/v1/mining", Some(&body))
            .await
            .map(drop)
    }

    pub async fn gossip_recent(&self) -> Result<Vec<Arrival>> {
        self.get("/api/v1/gossip/recent").await
    }

    pub async fn metrics(&self) -> Result<String> {
        let (code, bytes) = self
            .raw(Method::GET, "/metrics", None::<&()>, TIMEOUT)
            .await?;
        if !code.is_success() {
            bail!("{}/metrics: {code}", self.base);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub async fn share(&self, req: &ShareRequest) -> Result<ContentInfo> {
        self.call(Method::POST, "/api/v1/content", Some(req)).await
    }

    pub async fn fetch(&self, req: &FetchRequest) -> Result<ContentInfo> {
        self.call(Method::POST, "/api/v1/fetch", Some(req)).await
    }

    /// `None` when the node does not hold the content.
    pub async fn content(&self, id: &str) -> Result<Option<ContentInfo>> {
        let path = format!("/api/v1/content/{id}");
        let (code, bytes) = self.raw(Method::GET, &path, None::<&()>, TIMEOUT).await?;
        match code {
            StatusCode::NOT_FOUND => Ok(None),
            c if c.is_success() => Ok(Some(serde_json::from_slice(&bytes)?)),
            c => bail!(
                "{}{path}: {c}: {}",
                self.base,
                reason(&bytes).unwrap_or_default()
            ),
        }
    }

    // The server.

    pub async fn server_status(&self) -> Result<ServerStatus> {
        self.get("/api/v1/status").await
    }

    /// The server's log after `after`, waiting up to `wait` for something new (a long poll).
    pub async fn log_after(&self, after: u64, wait: Duration) -> Result<LogPage> {
        let path = format!("/api/v1/log?after={after}&wait_ms={}", wait.as_millis());
        let (code, bytes) = self
            .raw(Method::GET, &path, None::<&()>, wait + TIMEOUT)
            .await?;
        if !code.is_success() {
            bail!("{}{path}: {code}", self.base);
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// The `error` of an API error body.
fn reason(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(v.get("error")?.as_str()?.to_string())
}

/// Polls until the service at `api` answers `/api/v1/status`, or `timeout` passes; `dead`
/// says whether the process behind it has exited (then waiting is pointless).
pub async fn wait_up(
    api: &Api,
    timeout: Duration,
    mut dead: impl FnMut() -> Result<Option<String>>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if api.is_up().await {
            return Ok(());
        }
        if let Some(why) = dead()? {
            bail!("{} never answered: {why}", api.base());
        }
        if std::time::Instant::now() >= deadline {
            bail!("{} did not answer within {timeout:?}", api.base());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
