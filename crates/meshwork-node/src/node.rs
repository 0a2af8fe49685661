//! The node's actor: one task owns the libp2p `Swarm`, the address book and the scores, and
//! is the only place where the node does network I/O. Everything else (the HTTP API, the CLI,
//! the lab) sends [`Command`]s through a bounded channel and gets answers on oneshots (the shape
//! of rust-libp2p's `file-sharing` example).
//!
//! # Data path of discovery
//! 1. Start: the address book is restored from `node.redb`; the anchors (outbound peers at the
//!    last shutdown) and the bootstrap addresses are dialed.
//! 2. Every connection runs identify. Its listen addresses go to Kademlia (if the peer speaks
//!    our Kademlia protocol) and to the address book (new table, source = the peer's group).
//! 3. On the first connection to a peer, and every `pex_interval` after, we ask it for up to 32
//!    records from its tried table; a valid answer goes to the new table, an invalid one is
//!    discarded whole and costs the peer points.
//! 4. Kademlia random walks (`get_closest_peers` of a random id) refresh the routing table; the
//!    peers they return go to the new table with the DHT as source.
//! 5. Every `maintenance` tick, the connection manager tops up outbound connections from the
//!    book (one per address group), makes a feeler connection when one is due (testing a
//!    tried-table collision first), and resolves collisions. An outbound connection that
//!    succeeds moves its peer to the tried table.
//! 6. Shutdown writes the book and the anchors.
//!
//! # Data path of the ledger
//! The ledger lives on its own thread ([`crate::ledger_service`]); this loop only moves bytes.
//! - Gossip (gossipsub, validation mode): every transaction or block message goes to the
//!   ledger thread before it is forwarded; its verdict comes back as a `LedgerEvent` and is
//!   reported to gossipsub (accept: forward; reject: the sender's score drops and it is
//!   penalized; ignore: drop quietly). Message ids are BLAKE3 of the payload; gossipsub's own
//!   signing is off, since transactions and blocks carry their own signatures and work.
//! - Sync ([`crate::chainsync`]): on every new connection the two sides exchange chain status;
//!   a node behind fetches headers and then blocks in batches from every peer ahead of it.
//! - The API submits transactions and queries the ledger directly through the job channel;
//!   locally accepted transactions and mined blocks come back here to be published.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::kad::{self, store::MemoryStore, GetClosestPeersOk, Mode, QueryId, QueryResult};
use libp2p::metrics::Recorder;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{gossipsub, identify, ping, Multiaddr, PeerId, StreamProtocol, Swarm};
use meshwork_ledger::{Hash, Ledger, SignedTransfer, TxError};
use meshwork_proto::addr::{
    check_dialable, check_policy, ip_of, peer_of, without_peer, AddrSource,
};
use meshwork_proto::pex::{PexRequest, PexResponse, MAX_RECORDS};
use meshwork_proto::{AddrGroup, NetworkName};
use prometheus_client::registry::Registry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::addrbook::{AddrBook, GoodOutcome, Origin, Table, Via};
use crate::chainsync::{SyncAction, SyncCodec, SyncRequest, SyncResponse, Syncer};
use crate::config::{NodeConfig, API_FILE, STORE_FILE};
use crate::connmgr::{choose_outbound, Offence, Scores, Verdict};
use crate::dialguard::DialGuard;
use crate::gate::{Gate, GateLimits};
use crate::ledger_service::{self, Generations, Job, LedgerEvent, Miner, Topic};
use crate::metrics::NodeMetrics;
use crate::pex::PexCodec;
use crate::store::{Anchors, Store};
use crate::unix_now;

/// Capacity of the command channel. Senders wait when it is full: back-pressure, not loss.
const COMMAND_CAPACITY: usize = 256;
/// The most concurrent `find_peer` lookups; more are refused.
const MAX_LOOKUPS: usize = 256;
/// After this many answers refused by the rate limit, a peer is penalized for flooding.
const PEX_FLOOD_TOLERANCE: u32 = 5;
/// The most peers remembered for PEX rate limiting.
const MAX_PEX_RATE_ENTRIES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot build the libp2p swarm: {0}")]
    Swarm(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot start the HTTP API on {addr}: {source}")]
    Api {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The API cookie could not be written (see [`meshwork_http::auth::Cookie::write`]).
    #[error(transparent)]
    Cookie(#[from] meshwork_http::auth::CookieError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the node has stopped")]
    Stopped,
    #[error("lookup limit of {MAX_LOOKUPS} concurrent lookups reached")]
    Busy,
    #[error("cannot open the chain store: {0}")]
    Ledger(#[from] meshwork_ledger::OpenError),
    /// The chain store file did not open; for a damaged file the message says how to recover.
    #[error("{}: cannot open the chain store: {error}{}", path.display(), chain_store_hint(error, path))]
    ChainStore {
        path: PathBuf,
        error: meshwork_ledger::OpenError,
    },
}

/// What an operator can do about a chain store that does not open.
pub fn chain_store_hint(e: &meshwork_ledger::OpenError, path: &std::path::Path) -> String {
    if e.is_damage() {
        format!(
            ". To recover: stop the node, move the file aside (mv {p} {p}.damaged) and start \
             it again; the node creates an empty store and syncs the chain from its peers \
             (your keys and the address book are in other files)",
            p = path.display()
        )
    } else {
        String::new()
    }
}

/// How a connection came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Inbound,
    /// Chosen by the connection manager; counts toward `target_outbound`.
    Outbound,
    /// A short test of an address from the new table; closed once it succeeds.
    Feeler,
    /// Dialed by a protocol (Kademlia queries) or a bootstrap beyond one per group; closed when idle.
    Transient,
    /// Dialed by the content service to exchange pieces; kept while a piece stream is open,
    /// outside the transient limit (the content service bounds its own peers).
    Content,
}

impl Class {
    /// How a peer first met through a connection of this class was learned of.
    fn via(self) -> Via {
        match self {
            Class::Inbound => Via::Inbound,
            Class::Transient | Class::Content => Via::Dht,
            Class::Outbound | Class::Feeler => Via::Bootstrap,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Class::Inbound => "inbound",
            Class::Outbound => "outbound",
            Class::Feeler => "feeler",
            Class::Transient => "transient",
            Class::Content => "content",
        }
    }
}

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    gate: Gate,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    pex: request_response::Behaviour<PexCodec>,
    gossipsub: gossipsub::Behaviour,
    sync: request_response::Behaviour<SyncCodec>,
    stream: libp2p_stream::Behaviour,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionCounts {
    pub inbound: usize,
    pub outbound: usize,
    /// Feelers and transient connections (DHT queries).
    pub other: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddrBookCounts {
    pub new: usize,
    pub tried: usize,
    pub banned: usize,
}

/// `GET /api/v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub peer_id: String,
    pub network: String,
    pub agent: String,
    pub listen_addrs: Vec<String>,
    pub connections: ConnectionCounts,
    pub address_book: AddrBookCounts,
    pub uptime_s: u64,
    pub chain: ChainSummary,
    /// Whether the node is healthy, and if not why (see [`NodeHandle::health`]).
    #[serde(default)]
    pub health: Health,
}

/// `GET /api/v1/health`, and the `health` of `GET /api/v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// Why not, when not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            healthy: true,
            error: None,
        }
    }
}

impl Health {
    /// Healthy without a fault; else not, with the fault as the error.
    pub fn of(fault: Option<String>) -> Health {
        Health {
            healthy: fault.is_none(),
            error: fault,
        }
    }
}

/// The chain as the network loop last heard from the ledger.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChainSummary {
    pub height: u64,
    pub tip: String,
    pub total_work: String,
    /// Blocks queued or in flight for sync.
    pub sync_pending: usize,
    /// Whether the node is mining now: a miner is configured and the chain store is
    /// healthy (a paused miner resumes once it is).
    pub mining: bool,
    /// A miner is configured (it may be paused: see `mining`).
    #[serde(default)]
    pub miner_configured: bool,
}

/// One record of `GET /api/v1/peers`: one per open connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub address: String,
    pub direction: Class,
    pub address_group: Option<String>,
    /// How we first learned of the peer; `None` if it is not in our address book.
    pub learned_via: Option<Via>,
    pub misbehaviour: f64,
    pub connected_s: u64,
    pub rtt_ms: Option<f64>,
}

/// One address book entry, for inspection (the lab, `GET /api/v1/addrbook`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BookEntry {
    pub peer_id: String,
    pub addrs: Vec<String>,
    pub group: String,
    pub table: Table,
    pub via: Via,
    pub failures: u32,
}

pub(crate) enum Command {
    Status(oneshot::Sender<Status>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    AddrBook(oneshot::Sender<Vec<BookEntry>>),
    FindPeer(PeerId, oneshot::Sender<Result<Vec<PeerId>, NodeError>>),
    Partition(HashSet<PeerId>, oneshot::Sender<()>),
    GossipScore(PeerId, oneshot::Sender<Option<f64>>),
    Inject(Topic, Vec<u8>, oneshot::Sender<Result<(), String>>),
    Seen(oneshot::Sender<Vec<Arrival>>),
    Mining(
        Option<ledger_service::MinerConfig>,
        oneshot::Sender<Result<(), NodeError>>,
    ),
    /// The content service wants a connection to `peer` at these addresses (each with where
    /// it was learned: the dial policy applies); the answer comes once one is open (or the
    /// dial failed or was refused).
    ContentDial(
        PeerId,
        Vec<(Multiaddr, AddrSource)>,
        oneshot::Sender<Result<(), String>>,
    ),
    /// Announce (or stop announcing) ourselves as a provider of a DHT key.
    Provide(kad::RecordKey, bool),
    GetProviders(kad::RecordKey, oneshot::Sender<Vec<PeerId>>),
    /// A content session banned this peer (corrupt pieces).
    ContentOffence(PeerId, String),
    Shutdown(oneshot::Sender<()>),
}

/// A cheap, cloneable handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    jobs: mpsc::Sender<Job>,
    pub peer_id: PeerId,
    pub network: NetworkName,
    registry: Arc<Registry>,
    /// The content service (share, fetch, list, remove).
    pub content: crate::content::ContentClient,
    stream_control: libp2p_stream::Control,
    gens: Arc<Generations>,
}

impl NodeHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    pub async fn status(&self) -> Result<Status, NodeError> {
        self.ask(Command::Status).await
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        self.ask(Command::Peers).await
    }

    pub async fn addrbook(&self) -> Result<Vec<BookEntry>, NodeError> {
        self.ask(Command::AddrBook).await
    }

    /// A Kademlia lookup of `peer`: the closest peers to its id that the network returns (the
    /// peer itself first, if the network knows it).
    pub async fn find_peer(&self, peer: PeerId) -> Result<Vec<PeerId>, NodeError> {
        self.ask(|tx| Command::FindPeer(peer, tx)).await?
    }

    /// Prometheus text exposition of all metrics (libp2p's and the node's).
    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A control for libp2p streams of any protocol on this node's connections (the lab
    /// measures raw stream throughput with it).
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.stream_control.clone()
    }

    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    /// `None` when healthy; else why not (the chain store is stopped by a storage error: the
    /// node neither mines nor accepts transfers until it has reopened the store). Answered
    /// without asking the node's threads.
    pub fn health(&self) -> Option<String> {
        self.gens.store_fault()
    }

    /// Runs `f` on the ledger thread and returns its result (reads, or anything a test needs).
    pub async fn ledger<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Ledger) -> T + Send + 'static,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Query(Box::new(move |l: &mut Ledger| {
                let _ = tx.send(f(l));
            })))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Submits a signed transfer; once the ledger accepts it, it is gossiped.
    pub async fn submit(&self, t: SignedTransfer) -> Result<Result<Hash, TxError>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Submit(t, tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Lab fault injection: refuse connections with `peers` and close those open (a network
    /// partition). An empty set heals it.
    pub async fn partition(&self, peers: HashSet<PeerId>) -> Result<(), NodeError> {
        self.ask(|tx| Command::Partition(peers, tx)).await
    }

    /// Starts mining with `cfg` (replacing a running miner), or stops with `None`.
    pub async fn set_mining(
        &self,
        cfg: Option<ledger_service::MinerConfig>,
    ) -> Result<(), NodeError> {
        self.ask(|tx| Command::Mining(cfg, tx)).await?
    }

    /// When this node first accepted (or itself published) each recent gossip message, oldest
    /// first, at most 4096. The lab's propagation measurements.
    pub async fn gossip_seen(&self) -> Result<Vec<Arrival>, NodeError> {
        self.ask(Command::Seen).await
    }

    /// Gossipsub's score of a peer, as this node sees it.
    pub async fn gossip_score(&self, peer: PeerId) -> Result<Option<f64>, NodeError> {
        self.ask(|tx| Command::GossipScore(peer, tx)).await
    }

    /// Lab fault injection: publishes raw bytes on a gossip topic without validating them, as
    /// a misbehaving peer would.
    pub async fn inject_gossip(&self, topic: Topic, bytes: Vec<u8>) -> Result<(), NodeError> {
        self.ask(|tx| Command::Inject(topic, bytes, tx))
            .await?
            .map_err(NodeError::Swarm)
    }
}

/// A started node.
pub struct RunningNode {
    pub handle: NodeHandle,
    /// The addresses the node listens on (port 0 resolved), without `/p2p`.
    pub listen_addrs: Vec<Multiaddr>,
    pub api_addr: Option<SocketAddr>,
    /// The secret every API call needs (also in `<data-dir>/api.cookie` when the node has a
    /// data directory and an API).
    cookie: meshwork_http::auth::Cookie,
    task: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    pub fn peer_id(&self) -> PeerId {
        self.handle.peer_id
    }

    /// The first listen address with `/p2p/<peer id>`: what another node bootstraps from.
    pub fn dial_addr(&self) -> Multiaddr {
        self.listen_addrs[0]
            .clone()
            .with(Protocol::P2p(self.handle.peer_id))
    }

    /// What a client of this node's API sends (the cookie; see [`meshwork_http::auth`]).
    pub fn api_credentials(&self) -> meshwork_http::auth::Credentials {
        self.cookie.credentials()
    }

    /// The file that holds the API cookie, when the node wrote one.
    pub fn api_cookie_path(&self) -> Option<&std::path::Path> {
        self.cookie.path()
    }

    /// Stops the node: closes connections and writes the address book and anchors; removes
    /// the API cookie.
    pub async fn shutdown(self) {
        // Content first: its stores flush and its trackers hear that we leave.
        self.handle.content.shutdown().await;
        let (tx, rx) = oneshot::channel();
        if self.handle.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
        if let Err(e) = self.cookie.remove() {
            tracing::warn!("{e}");
        }
    }
}

/// Where the answer to a `find_peer` lookup goes.
type LookupReply = (PeerId, oneshot::Sender<Result<Vec<PeerId>, NodeError>>);

struct Conn {
    peer: PeerId,
    remote: Multiaddr,
    class: Class,
    group: Option<AddrGroup>,
    since: Instant,
    rtt: Option<Duration>,
}

struct Actor {
    swarm: Swarm<Behaviour>,
    network: NetworkName,
    cfg: NodeConfig,
    book: AddrBook,
    scores: Scores,
    store: Option<Arc<Store>>,
    /// The periodic address-book write in progress, if any (it runs off the event loop).
    flush_task: Option<tokio::task::JoinHandle<()>>,
    conns: HashMap<ConnectionId, Conn>,
    /// Dials in flight that we started, with their purpose and the group they will occupy.
    /// The peer is unknown for a bootstrap address without `/p2p`.
    dials: HashMap<ConnectionId, (Option<PeerId>, Class, Option<AddrGroup>)>,
    /// When we last asked a random peer for PEX.
    last_pex_round: Instant,
    /// When we last answered each peer, and how many of its requests were refused since.
    pex_answered: HashMap<PeerId, (Instant, u32)>,
    pex_pending: HashMap<OutboundRequestId, (PeerId, usize)>,
    lookups: HashMap<QueryId, LookupReply>,
    /// Content-service dials waiting for a connection, per peer (at most `MAX_LOOKUPS` peers,
    /// 8 waiters each).
    content_waiters: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>>,
    /// Per-IP caps and backoff of content dials.
    content_ips: DialGuard,
    /// Provider lookups in flight, and where the answer goes.
    provider_lookups: HashMap<QueryId, oneshot::Sender<Vec<PeerId>>>,
    listen_addrs: Vec<Multiaddr>,
    kad_protocol: StreamProtocol,
    kad_bootstrapped: bool,
    started: Instant,
    last_feeler: Instant,
    rng: StdRng,
    lp2p_metrics: libp2p::metrics::Metrics,
    metrics: NodeMetrics,
    jobs: mpsc::Sender<Job>,
    syncer: Syncer,
    /// Sync requests we sent, with what they asked.
    sync_out: HashMap<OutboundRequestId, (PeerId, SyncAsk)>,
    /// Inbound sync requests the ledger thread is answering.
    serving: HashMap<u64, request_response::ResponseChannel<SyncResponse>>,
    next_serve: u64,
    topics: [gossipsub::TopicHash; 2],
    ledger_thread: Option<std::thread::JoinHandle<()>>,
    miner: Option<Miner>,
    gens: Arc<Generations>,
    /// When recent gossip messages were first accepted or published here, oldest first.
    seen: std::collections::VecDeque<Arrival>,
    /// Our own messages that found no peer to publish to yet (see `publish`).
    unbroadcast: std::collections::VecDeque<(Topic, Vec<u8>)>,
}

/// Recent gossip arrivals remembered for the lab, at most.
const MAX_SEEN: usize = 4096;

/// The first time this node accepted (or published) a gossip message.
///
/// The time is the wall clock, in microseconds since the Unix epoch, so that the arrivals of
/// processes on one machine (the lab's network namespaces) can be compared: they share the
/// clock. Across machines the figures are only as good as the clocks' agreement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    /// The message id: BLAKE3 of the payload, in hex.
    pub id: String,
    pub topic: Topic,
    pub at_us: u64,
}

/// Own messages kept for a later publish, at most.
const MAX_UNBROADCAST: usize = 1024;

/// What an outbound sync request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SyncAsk {
    Status,
    Headers,
    Blocks,
}

/// Most inbound sync requests being answered at once; more get `Busy`.
const MAX_SERVING: usize = 64;

/// Gossipsub's configuration and peer-score parameters. See `docs/architecture.md`
/// ("Gossip and peer scoring") for why each value is what it is.
fn gossipsub_behaviour(
    topics: &[gossipsub::TopicHash; 2],
    max_block_bytes: usize,
    seen_ttl: Duration,
    registry: &mut Registry,
) -> Result<gossipsub::Behaviour, NodeError> {
    use gossipsub::{PeerScoreParams, PeerScoreThresholds, TopicScoreParams};
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(blake3::hash(&m.data).as_bytes().to_vec())
        })
        .validate_messages()
        // Re-announcements of pending transfers must get through (see `NodeConfig`).
        .duplicate_cache_time(seen_ttl)
        // A block of the largest size, its framing and the protobuf envelope.
        .max_transmit_size(max_block_bytes + (64 << 10))
        .build()
        .map_err(|e| NodeError::Swarm(e.to_string()))?;
    let mut g = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, config)
        .map_err(|e| NodeError::Swarm(e.to_string()))?
        .with_metrics(
            registry.sub_registry_with_prefix("gossipsub"),
            gossipsub::MetricsConfig::default(),
        );
    let topic = TopicScoreParams {
        topic_weight: 1.0,
        // A small reward for staying in the mesh: at most +3.6 after an hour.
        time_in_mesh_weight: 0.001,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 3600.0,
        // Being first to deliver valid messages earns up to +20, decaying.
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 20.0,
        // Off: traffic is bursty and often idle (a block every few seconds, transactions when
        // people send them); a delivery quota would punish honest peers in quiet periods.
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        // One invalid message: -100 (the counter squared times the weight), below the
        // graylist threshold at once; it decays by 1% a second (half-life about 70 s).
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.99,
        ..TopicScoreParams::default()
    };
    let params = PeerScoreParams {
        topics: topics.iter().map(|t| (t.clone(), topic.clone())).collect(),
        topic_score_cap: 50.0,
        app_specific_weight: 0.0,
        // More than 8 peers from one IP (our per-IP inbound limit) costs the excess squared.
        ip_colocation_factor_weight: -5.0,
        ip_colocation_factor_threshold: 8.0,
        behaviour_penalty_weight: -10.0,
        behaviour_penalty_threshold: 6.0,
        behaviour_penalty_decay: 0.9,
        decay_interval: Duration::from_secs(1),
        decay_to_zero: 0.01,
        retain_score: Duration::from_secs(3600),
        ..PeerScoreParams::default()
    };
    let thresholds = PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    };
    g.with_peer_score(params, thresholds)
        .map_err(NodeError::Swarm)?;
    Ok(g)
}

/// Starts a node: builds the swarm, restores the address book, listens, starts the API (if
/// configured), and returns once every listener is up.
pub async fn start(cfg: NodeConfig) -> Result<RunningNode, NodeError> {
    let mut registry = Registry::default();
    let lp2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
    let metrics = NodeMetrics::register(&mut registry);
    let api_counters = Arc::new(meshwork_http::serve::Counters::default());
    registry
        .sub_registry_with_prefix("meshwork")
        .register_collector(Box::new(crate::metrics::ApiConnections(
            api_counters.clone(),
        )));
    let network = cfg.network.clone();
    let local = cfg.keypair.public().to_peer_id();
    let kad_protocol = StreamProtocol::try_from_owned(network.protocol("kad", 1))
        .map_err(|e| NodeError::Swarm(e.to_string()))?;
    let pex_protocol = StreamProtocol::try_from_owned(network.protocol("pex", 1))
        .map_err(|e| NodeError::Swarm(e.to_string()))?;
    let sync_protocol = StreamProtocol::try_from_owned(network.protocol("sync", 1))
        .map_err(|e| NodeError::Swarm(e.to_string()))?;
    let topics = [
        gossipsub::IdentTopic::new(network.protocol("tx", 1)),
        gossipsub::IdentTopic::new(network.protocol("block", 1)),
    ];
    let topic_hashes = [topics[0].hash(), topics[1].hash()];
    let mut gossip = gossipsub_behaviour(
        &topic_hashes,
        cfg.chain.max_block_bytes,
        cfg.gossip_seen_ttl,
        &mut registry,
    )?;
    for t in &topics {
        gossip
            .subscribe(t)
            .map_err(|e| NodeError::Swarm(e.to_string()))?;
    }
    let mut gossip = Some(gossip);

    // The ledger, on its own thread.
    let ledger = match &cfg.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| NodeError::Io {
                path: dir.clone(),
                source,
            })?;
            crate::content::check_records(dir).map_err(NodeError::Swarm)?;
            let path = dir.join(crate::config::CHAIN_FILE);
            let opened = match &cfg.disk_fault {
                Some(full) => Ledger::open_with_faults(&path, cfg.chain.clone(), full.clone()),
                None => Ledger::open(&path, cfg.chain.clone()),
            };
            opened.map_err(|error| NodeError::ChainStore { path, error })?
        }
        None => Ledger::in_memory(cfg.chain.clone())?,
    };
    let mut ledger = ledger;
    ledger.set_refused(cfg.refuse_senders.clone());
    ledger.set_rebroadcast(
        cfg.rebroadcast.initial.as_millis() as u64,
        cfg.rebroadcast.max.as_millis() as u64,
    );
    let status0 = ledger_service::status_of(&ledger);
    let locator0 = ledger.chain().locator();
    let gens = Arc::new(Generations::default());
    let (jobs, jobs_rx) = mpsc::channel(ledger_service::JOB_CAPACITY);
    let (events_tx, ledger_events) = mpsc::channel(ledger_service::EVENT_CAPACITY);
    let ledger_thread = ledger_service::spawn(
        ledger,
        events_tx,
        gens.clone(),
        jobs_rx,
        cfg.store_retry.clone(),
        cfg.data_dir.clone(),
    )
    .map_err(|source| NodeError::Io {
        path: "meshwork-ledger thread".into(),
        source,
    })?;
    let miner =
        match &cfg.mining {
            Some(m) => Some(Miner::spawn(m.clone(), jobs.clone(), gens.clone()).map_err(
                |source| NodeError::Io {
                    path: "meshwork-miner thread".into(),
                    source,
                },
            )?),
            None => None,
        };

    let gate = Gate::new(GateLimits {
        max_inbound: cfg.max_inbound,
        max_inbound_per_ip: cfg.max_inbound_per_ip,
        max_transient: cfg.max_transient,
    });
    let t = cfg.timings.clone();
    let kad_server = cfg.kad_server;
    let swarm_err = |e: &dyn std::fmt::Display| NodeError::Swarm(e.to_string());
    let dial_from = cfg.dial_from;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_quic()
        // TCP: dials from `dial_from` when set (see `transport`), libp2p's TCP otherwise.
        .with_other_transport(|key| crate::transport::tcp_noise_yamux(key, dial_from))
        .map_err(|e| swarm_err(&e))?
        .with_dns()
        .map_err(|e| swarm_err(&e))?
        .with_bandwidth_metrics(&mut registry)
        .with_behaviour(|key| {
            let mut kcfg = kad::Config::new(kad_protocol.clone());
            kcfg.set_periodic_bootstrap_interval(Some(t.kad_bootstrap_interval));
            kcfg.set_query_timeout(Duration::from_secs(30));
            let mut kad = kad::Behaviour::with_config(local, MemoryStore::new(local), kcfg);
            kad.set_mode(Some(if kad_server {
                Mode::Server
            } else {
                Mode::Client
            }));
            Behaviour {
                gate,
                identify: identify::Behaviour::new(
                    identify::Config::new(network.identify_version(), key.public())
                        .with_agent_version(crate::AGENT.to_string()),
                ),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(30)),
                ),
                kad,
                pex: request_response::Behaviour::with_codec(
                    PexCodec,
                    [(pex_protocol, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(10)),
                ),
                gossipsub: gossip.take().expect("the behaviour is built once"),
                sync: request_response::Behaviour::with_codec(
                    SyncCodec,
                    [(sync_protocol, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(30))
                        .with_max_concurrent_streams(64),
                ),
                stream: libp2p_stream::Behaviour::new(),
            }
        })
        .map_err(|e| swarm_err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(t.idle_timeout))
        .build();

    // The store and the address book.
    let now = unix_now();
    let store = match &cfg.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| NodeError::Io {
                path: dir.clone(),
                source,
            })?;
            Some(Arc::new(Store::open_or_rebuild(&dir.join(STORE_FILE))?))
        }
        None => None,
    };
    let mut book = match store.as_ref().and_then(|s| s.load_addrbook_or_none()) {
        Some(snap) => AddrBook::restore(
            cfg.addrbook.clone(),
            snap,
            local,
            cfg.allow_private_addrs,
            now,
        ),
        None => AddrBook::new(
            cfg.addrbook.clone(),
            rand::thread_rng().gen(),
            local,
            cfg.allow_private_addrs,
        ),
    };
    let anchors: Anchors = match (&store, cfg.anchors) {
        (Some(s), true) => s.load_anchors().unwrap_or_else(|e| {
            tracing::warn!("{e}; starting without anchors");
            vec![]
        }),
        _ => vec![],
    };
    swarm.behaviour_mut().gate.set_bans(book.bans().clone());
    for b in &cfg.bootstrap {
        if let Some(peer) = peer_of(b) {
            book.add(
                peer,
                std::slice::from_ref(b),
                now,
                Origin::Operator,
                Via::Bootstrap,
                now,
            );
        }
    }

    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NodeError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }

    let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
    let (content, content_rx) = crate::content::channel();
    let stream_control = swarm.behaviour().stream.new_control();
    let handle = NodeHandle {
        stream_control: stream_control.clone(),
        tx,
        jobs: jobs.clone(),
        peer_id: local,
        network: network.clone(),
        registry: Arc::new(registry),
        content,
        gens: gens.clone(),
    };
    let pieces_protocol = StreamProtocol::try_from_owned(network.protocol("pieces", 1))
        .map_err(|e| NodeError::Swarm(e.to_string()))?;
    let mut actor = Actor {
        swarm,
        network,
        cfg: cfg.clone(),
        book,
        scores: Scores::default(),
        store,
        flush_task: None,
        conns: HashMap::new(),
        dials: HashMap::new(),
        last_pex_round: Instant::now(),
        pex_answered: HashMap::new(),
        pex_pending: HashMap::new(),
        lookups: HashMap::new(),
        provider_lookups: HashMap::new(),
        content_waiters: HashMap::new(),
        content_ips: DialGuard::default(),
        listen_addrs: vec![],
        kad_protocol,
        kad_bootstrapped: false,
        started: Instant::now(),
        last_feeler: Instant::now(),
        rng: StdRng::from_entropy(),
        lp2p_metrics,
        metrics,
        jobs,
        syncer: Syncer::new(status0, locator0),
        sync_out: HashMap::new(),
        serving: HashMap::new(),
        next_serve: 0,
        topics: topic_hashes,
        ledger_thread: Some(ledger_thread),
        miner,
        gens,
        unbroadcast: std::collections::VecDeque::new(),
        seen: std::collections::VecDeque::new(),
    };
    actor.metrics.chain_height.set(status0.height as i64);

    // Run the swarm until every listener reports an address.
    let wanted = cfg.listen.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut up = HashSet::new();
    while up.len() < wanted {
        let ev = tokio::time::timeout_at(deadline, actor.swarm.select_next_some())
            .await
            .map_err(|_| NodeError::Listen {
                addr: cfg.listen[0].clone(),
                reason: "no address after 10 s".into(),
            })?;
        match &ev {
            SwarmEvent::NewListenAddr { listener_id, .. } => {
                up.insert(*listener_id);
            }
            SwarmEvent::ListenerClosed { reason: Err(e), .. }
            | SwarmEvent::ListenerError { error: e, .. } => {
                return Err(NodeError::Listen {
                    addr: cfg.listen[up.len().min(wanted - 1)].clone(),
                    reason: e.to_string(),
                });
            }
            _ => {}
        }
        actor.on_swarm_event(ev);
    }
    let listen_addrs = actor.listen_addrs.clone();
    crate::content::spawn(
        content_rx,
        crate::content::Setup {
            local,
            keypair: cfg.keypair.clone(),
            allow_private: cfg.allow_private_addrs,
            dial_from: cfg.dial_from,
            protocol: pieces_protocol,
            control: stream_control,
            node: handle.tx.clone(),
            listen: listen_addrs.clone(),
            data_dir: cfg.data_dir.clone(),
            cfg: cfg.content.clone(),
        },
    )
    .await
    .map_err(NodeError::Swarm)?;

    // The API, if asked for. Its cookie is new at each start: a secret that leaked with an
    // old file is worth nothing after a restart.
    let mut cookie = meshwork_http::auth::Cookie::generate();
    let api_addr = match cfg.api {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Api { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| NodeError::Api { addr, source })?;
            if let Some(dir) = &cfg.data_dir {
                // Before the address: a client that finds the address finds the cookie too.
                cookie = meshwork_http::auth::Cookie::write(dir)?;
                let path = dir.join(API_FILE);
                std::fs::write(&path, format!("{bound}\n"))
                    .map_err(|source| NodeError::Io { path, source })?;
            }
            let guard = meshwork_http::auth::Guard::new(&cookie, bound)
                .with_hosts(&cfg.api_hosts)
                .with_token_hashes(&cfg.api_token_hashes);
            let router = guard.protect(crate::api::router(handle.clone()));
            let done = handle.tx.clone();
            let limits = cfg.api_limits.clone();
            tokio::spawn(async move {
                // Bounded: slow or many local clients cannot exhaust the node's descriptors.
                let serve = meshwork_http::serve::serve_counted(
                    listener,
                    router,
                    limits,
                    api_counters,
                    async move { done.closed().await },
                );
                if let Err(e) = serve.await {
                    tracing::error!("HTTP API stopped: {e}");
                }
            });
            Some(bound)
        }
        None => None,
    };

    actor.connect_initial(&anchors);
    let task = tokio::spawn(actor.run(rx, ledger_events));
    Ok(RunningNode {
        handle,
        listen_addrs,
        api_addr,
        cookie,
        task,
    })
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut ledger_events: mpsc::Receiver<LedgerEvent>,
    ) {
        let mut sync_tick = tokio::time::interval(Duration::from_secs(5));
        sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(self.cfg.timings.maintenance);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut walk = tokio::time::interval(self.cfg.timings.random_walk_interval);
        walk.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        walk.tick().await; // the first tick is immediate; the bootstrap does the first walk
        let mut flush = tokio::time::interval(self.cfg.timings.flush_interval);
        flush.tick().await;
        let mut rebroadcast = tokio::time::interval(self.cfg.rebroadcast.round);
        rebroadcast.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reply = loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = rx.recv() => match cmd {
                    Some(Command::Shutdown(reply)) => break Some(reply),
                    Some(cmd) => self.on_command(cmd),
                    None => break None, // every handle dropped
                },
                _ = tick.tick() => self.maintain(),
                _ = walk.tick() => self.random_walk(),
                _ = flush.tick() => self.flush_in_background(),
                Some(ev) = ledger_events.recv() => self.on_ledger_event(ev),
                _ = sync_tick.tick() => self.sync_round(),
                // A full queue skips a round: the transfers stay due for the next.
                _ = rebroadcast.tick() => { self.to_ledger(Job::Rebroadcast); }
            }
        };
        // Stop the miner, then the ledger thread (after the jobs already queued), so that the
        // chain store is closed when `shutdown` returns.
        if let Some(mut m) = self.miner.take() {
            let _ = tokio::task::spawn_blocking(move || m.stop()).await;
        }
        if self.jobs.send(Job::Stop).await.is_ok() {
            // Keep draining events so the ledger thread never blocks on a full channel.
            while !self.ledger_thread.as_ref().is_none_or(|t| t.is_finished()) {
                tokio::select! {
                    _ = ledger_events.recv() => {}
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        }
        if let Some(t) = self.ledger_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if let Some(writing) = self.flush_task.take() {
            let _ = writing.await; // the final write must land after it
        }
        self.flush_at_shutdown();
        if let Some(dir) = &self.cfg.data_dir {
            let _ = std::fs::remove_file(dir.join(API_FILE));
        }
        // Close connections politely before the swarm is dropped.
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for p in peers {
            let _ = self.swarm.disconnect_peer_id(p);
        }
        if let Some(r) = reply {
            let _ = r.send(());
        }
    }

    /// Writes the address book on a blocking thread, so that serializing and committing a large
    /// book never stalls the event loop. A round is skipped while the previous write is still
    /// running, so writes land in order.
    fn flush_in_background(&mut self) {
        let Some(store) = &self.store else { return };
        if self.flush_task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let (store, snap) = (store.clone(), self.book.snapshot());
        self.flush_task = Some(tokio::task::spawn_blocking(move || {
            // The store logs a failing disk once, and its recovery.
            if let Err(e) = store.save_addrbook(&snap) {
                tracing::debug!("cannot save the address book: {e}");
            }
        }));
    }

    /// Writes the address book and the anchors; the last write before the node stops.
    fn flush_at_shutdown(&mut self) {
        let Some(store) = &self.store else { return };
        if let Err(e) = store.save_addrbook(&self.book.snapshot()) {
            tracing::error!("cannot save the address book: {e}");
        }
        if self.cfg.anchors {
            let anchors: Anchors = self
                .conns
                .values()
                .filter(|c| c.class == Class::Outbound)
                .map(|c| (c.peer, vec![without_peer(&c.remote)]))
                .collect();
            if let Err(e) = store.save_anchors(&anchors) {
                tracing::error!("cannot save the anchors: {e}");
            }
        }
    }

    /// Dials anchors and bootstrap peers at start.
    fn connect_initial(&mut self, anchors: &Anchors) {
        let mut used: HashSet<AddrGroup> = HashSet::new();
        for (peer, addrs) in anchors.iter().take(self.cfg.target_outbound) {
            let group = addrs.first().and_then(AddrGroup::of_addr);
            if group.is_some_and(|g| !used.insert(g)) {
                continue;
            }
            self.dial(Some(*peer), addrs.clone(), Class::Outbound, group, "anchor");
        }
        for b in self.cfg.bootstrap.clone() {
            let group = AddrGroup::of_addr(&b);
            match peer_of(&b) {
                Some(peer) => {
                    if self.swarm.is_connected(&peer)
                        || self.dials.values().any(|d| d.0 == Some(peer))
                    {
                        continue;
                    }
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, without_peer(&b));
                    // Outbound slots for the first bootstrap peer of each group, up to the
                    // target; the rest are transient (used by Kademlia's bootstrap, then idle).
                    let slots_left = used.len() < self.cfg.target_outbound;
                    let class = match group {
                        Some(g) if slots_left && used.insert(g) => Class::Outbound,
                        None if slots_left => Class::Outbound, // DNS: group unknown until connected
                        _ => Class::Transient,
                    };
                    self.dial(
                        Some(peer),
                        vec![without_peer(&b)],
                        class,
                        group,
                        "bootstrap",
                    );
                }
                // No peer id: dial by address; the peer id is learned from the handshake.
                None => {
                    self.dial(None, vec![b.clone()], Class::Outbound, group, "bootstrap");
                }
            }
        }
    }

    /// Starts a dial of `class` and records it. With no peer id, the first address is dialed and
    /// the peer is learned from the handshake (a bootstrap address without `/p2p`).
    fn dial(
        &mut self,
        peer: Option<PeerId>,
        addrs: Vec<Multiaddr>,
        class: Class,
        group: Option<AddrGroup>,
        purpose: &'static str,
    ) -> Option<ConnectionId> {
        let opts = match peer {
            Some(peer) => DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build(),
            None => match addrs.into_iter().next() {
                Some(addr) => DialOpts::unknown_peer_id().address(addr).build(),
                None => return None,
            },
        };
        let id = opts.connection_id();
        match class {
            Class::Outbound => self.swarm.behaviour_mut().gate.expect_managed(id),
            Class::Feeler => self.swarm.behaviour_mut().gate.expect_feeler(id),
            Class::Content => self.swarm.behaviour_mut().gate.expect_content(id),
            Class::Inbound | Class::Transient => {}
        }
        if let Some(peer) = &peer {
            self.book.attempt(peer, unix_now());
        }
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dials.insert(id, (peer, class, group));
                self.metrics
                    .dials
                    .get_or_create(&vec![("purpose", purpose)])
                    .inc();
                Some(id)
            }
            Err(e) => {
                tracing::debug!("dial {peer:?} not started: {e}");
                None
            }
        }
    }

    /// The addresses a content dial of `peer` may use: those of `addrs` the dial policy admits
    /// from their source, then the address book's (admitted when they were added), less the
    /// IPs the per-IP guard holds back. With none known, Kademlia is asked (its answers reach
    /// the address book, through the same policy) and the dial is refused for now: a dial by
    /// peer id alone would let Kademlia's unchecked query results pick the address.
    fn content_dial_addrs(
        &mut self,
        peer: PeerId,
        addrs: Vec<(Multiaddr, AddrSource)>,
    ) -> Result<Vec<Multiaddr>, String> {
        let allow_private = self.cfg.allow_private_addrs;
        let mut out: Vec<Multiaddr> = vec![];
        for (a, source) in addrs {
            match check_policy(&a, Some(&peer), source, allow_private) {
                Ok(a) if !out.contains(&a) => out.push(a),
                Ok(_) => {}
                Err(e) => tracing::debug!("content dial of {peer}: {e}"),
            }
        }
        if let Some(e) = self.book.get(&peer) {
            for a in &e.addrs {
                if !out.contains(a) {
                    out.push(a.clone());
                }
            }
        }
        if out.is_empty() {
            self.swarm.behaviour_mut().kad.get_closest_peers(peer);
            return Err(format!(
                "no dialable address of {peer} known yet: looking it up in the DHT"
            ));
        }
        self.content_ips
            .admit(out, Instant::now())
            .map_err(|e| e.to_string())
    }

    fn maintain(&mut self) {
        let now = unix_now();
        self.book.resolve_collisions(now);
        self.book.expire_bans(now);
        self.swarm.behaviour_mut().gate.expire_bans(now);

        // Outbound slots: one per address group across connections and dials.
        let mut used: HashSet<AddrGroup> = HashSet::new();
        let mut outbound = 0;
        for c in self.conns.values().filter(|c| c.class == Class::Outbound) {
            outbound += 1;
            used.extend(c.group);
        }
        for (_, class, group) in self.dials.values() {
            if *class == Class::Outbound {
                outbound += 1;
                used.extend(*group);
            }
        }
        let want = self.cfg.target_outbound.saturating_sub(outbound);
        if want > 0 {
            // Peers we are dialing, or hold a lasting connection with, are not candidates. A
            // peer we hold only a transient connection with (a DHT query dialed it) is: that
            // connection is promoted instead of dialing a second one.
            let mut busy: HashSet<PeerId> = self.dials.values().filter_map(|d| d.0).collect();
            let mut transient: HashMap<PeerId, ConnectionId> = HashMap::new();
            for (id, c) in &self.conns {
                if c.class == Class::Transient {
                    transient.insert(c.peer, *id);
                } else {
                    busy.insert(c.peer);
                }
            }
            let chosen: Vec<_> =
                choose_outbound(&self.book, &mut self.rng, now, want, &mut used, |p| {
                    busy.contains(p)
                })
                .into_iter()
                .map(|e| (e.peer, e.addrs.clone(), e.group))
                .collect();
            for (peer, addrs, group) in chosen {
                match transient.get(&peer) {
                    Some(id) if !busy.contains(&peer) => {
                        if let Some(c) = self.conns.get_mut(id) {
                            c.class = Class::Outbound;
                            self.swarm.behaviour_mut().gate.promote(peer, *id);
                            self.metrics
                                .dials
                                .get_or_create(&vec![("purpose", "promote")])
                                .inc();
                        }
                    }
                    _ => {
                        self.dial(Some(peer), addrs, Class::Outbound, Some(group), "outbound");
                    }
                }
            }
        }

        // A feeler, testing a tried-table collision first.
        if self.last_feeler.elapsed() >= self.cfg.timings.feeler_interval {
            self.last_feeler = Instant::now();
            let target = self.book.collision_to_test(now).or_else(|| {
                self.book
                    .select(&mut self.rng, now, true)
                    .filter(|e| !self.swarm.is_connected(&e.peer))
                    .map(|e| e.peer)
            });
            if let Some(peer) = target {
                if let Some(e) = self.book.get(&peer) {
                    let (addrs, group) = (e.addrs.clone(), e.group);
                    if !self.swarm.is_connected(&peer) {
                        self.dial(Some(peer), addrs, Class::Feeler, Some(group), "feeler");
                    } else {
                        // Connected already: it answers, which is what the test wanted to know.
                        let addr = addrs[0].clone();
                        self.book.good(&peer, &addr, now);
                    }
                }
            }
        }

        // PEX: one random lasting peer per interval (new peers were asked when they connected).
        if self.last_pex_round.elapsed() >= self.cfg.timings.pex_interval {
            self.last_pex_round = Instant::now();
            let lasting: Vec<PeerId> = self
                .conns
                .values()
                .filter(|c| matches!(c.class, Class::Inbound | Class::Outbound))
                .map(|c| c.peer)
                .collect();
            if !lasting.is_empty() {
                let p = lasting[self.rng.gen_range(0..lasting.len())];
                self.ask_pex(p);
            }
        }

        // Bound the rate-limit memory: forget peers whose last answer is older than the interval.
        let answer_interval = self.cfg.timings.pex_answer_interval;
        self.pex_answered
            .retain(|_, (t, _)| t.elapsed() < answer_interval);
        if self.pex_answered.len() > MAX_PEX_RATE_ENTRIES {
            let mut by_age: Vec<(PeerId, Instant)> = self
                .pex_answered
                .iter()
                .map(|(p, (t, _))| (*p, *t))
                .collect();
            by_age.sort_by_key(|(_, t)| *t);
            for (p, _) in by_age
                .into_iter()
                .take(self.pex_answered.len() - MAX_PEX_RATE_ENTRIES)
            {
                self.pex_answered.remove(&p);
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let mut counts: HashMap<Class, i64> = HashMap::new();
        for c in self.conns.values() {
            *counts.entry(c.class).or_default() += 1;
        }
        for class in [
            Class::Inbound,
            Class::Outbound,
            Class::Feeler,
            Class::Transient,
        ] {
            let n = counts.get(&class).copied().unwrap_or(0);
            self.metrics
                .connections
                .get_or_create(&vec![("class", class.label())])
                .set(n);
        }
        self.metrics
            .addrbook_entries
            .get_or_create(&vec![("table", "new")])
            .set(self.book.new_len() as i64);
        self.metrics
            .addrbook_entries
            .get_or_create(&vec![("table", "tried")])
            .set(self.book.tried_len() as i64);
    }

    fn ask_pex(&mut self, peer: PeerId) {
        let req = PexRequest {
            max: MAX_RECORDS as u8,
        };
        let allowed = req.allowed();
        let id = self.swarm.behaviour_mut().pex.send_request(&peer, req);
        self.pex_pending.insert(id, (peer, allowed));
        self.metrics.pex_requests_sent.inc();
    }

    fn random_walk(&mut self) {
        if self.conns.is_empty() {
            return;
        }
        self.swarm
            .behaviour_mut()
            .kad
            .get_closest_peers(PeerId::random());
    }

    /// Applies a penalty; disconnects and bans the peer if its score crossed the limit.
    fn penalize(&mut self, peer: PeerId, offence: Offence) {
        let now = unix_now();
        tracing::info!("peer {peer} penalized: {offence}");
        let label = match offence {
            Offence::BadPex(_) => "bad_pex",
            Offence::PexFraming => "pex_framing",
            Offence::PexFlood => "pex_flood",
            Offence::WrongNetwork => "wrong_network",
            Offence::InvalidGossip(_) => "invalid_gossip",
            Offence::BadSync(_) => "bad_sync",
            Offence::CorruptPieces(_) => "corrupt_pieces",
        };
        self.metrics
            .penalties
            .get_or_create(&vec![("offence", label)])
            .inc();
        if let Verdict::Ban { until } = self.scores.penalize(peer, &offence, now) {
            let ip = self
                .conns
                .values()
                .find(|c| c.peer == peer)
                .and_then(|c| ip_of(&c.remote));
            tracing::warn!("peer {peer} disconnected and banned for {} s", until - now);
            self.metrics.bans.inc();
            self.book.ban(peer, ip, until);
            self.swarm.behaviour_mut().gate.ban(peer, ip, until);
            self.swarm.behaviour_mut().kad.remove_peer(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(tx) => {
                let _ = tx.send(self.status());
            }
            Command::Peers(tx) => {
                let now = unix_now();
                let mut peers: Vec<PeerInfo> = self
                    .conns
                    .values()
                    .map(|c| PeerInfo {
                        peer_id: c.peer.to_string(),
                        address: c.remote.to_string(),
                        direction: c.class,
                        address_group: c.group.map(|g| g.to_string()),
                        learned_via: self.book.get(&c.peer).map(|e| e.via),
                        misbehaviour: self.scores.points(&c.peer, now),
                        connected_s: c.since.elapsed().as_secs(),
                        rtt_ms: c.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    })
                    .collect();
                peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
                let _ = tx.send(peers);
            }
            Command::AddrBook(tx) => {
                let entries = self
                    .book
                    .entries()
                    .map(|e| BookEntry {
                        peer_id: e.peer.to_string(),
                        addrs: e.addrs.iter().map(|a| a.to_string()).collect(),
                        group: e.group.to_string(),
                        table: e.location.table,
                        via: e.via,
                        failures: e.failures,
                    })
                    .collect();
                let _ = tx.send(entries);
            }
            Command::ContentDial(peer, addrs, tx) => {
                if self.swarm.is_connected(&peer) {
                    let _ = tx.send(Ok(()));
                    return;
                }
                // Waiters that gave up (their dial never resolved) leave no trace.
                self.content_waiters.retain(|_, ws| {
                    ws.retain(|w| !w.is_closed());
                    !ws.is_empty()
                });
                if self.content_waiters.len() >= MAX_LOOKUPS
                    && !self.content_waiters.contains_key(&peer)
                {
                    let _ = tx.send(Err("too many content dials at once".into()));
                    return;
                }
                if self
                    .content_waiters
                    .get(&peer)
                    .is_some_and(|ws| ws.len() >= 8)
                {
                    let _ = tx.send(Err("too many waiting for this peer".into()));
                    return;
                }
                let dialing = self.dials.values().any(|d| d.0 == Some(peer));
                if !dialing {
                    let addrs = match self.content_dial_addrs(peer, addrs) {
                        Ok(addrs) => addrs,
                        Err(why) => {
                            let _ = tx.send(Err(why));
                            return;
                        }
                    };
                    let group = addrs.first().and_then(AddrGroup::of_addr);
                    if let Some(id) =
                        self.dial(Some(peer), addrs.clone(), Class::Content, group, "content")
                    {
                        self.content_ips.started(id, &addrs);
                    }
                }
                self.content_waiters.entry(peer).or_default().push(tx);
            }
            Command::Provide(key, start) => {
                let kad = &mut self.swarm.behaviour_mut().kad;
                if start {
                    if let Err(e) = kad.start_providing(key) {
                        tracing::warn!("cannot announce a provider record: {e}");
                    }
                } else {
                    kad.stop_providing(&key);
                }
            }
            Command::GetProviders(key, tx) => {
                if self.provider_lookups.len() >= MAX_LOOKUPS {
                    let _ = tx.send(vec![]);
                    return;
                }
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.provider_lookups.insert(id, tx);
            }
            Command::ContentOffence(peer, why) => self.penalize(peer, Offence::CorruptPieces(why)),
            Command::FindPeer(peer, tx) => {
                if self.lookups.len() >= MAX_LOOKUPS {
                    let _ = tx.send(Err(NodeError::Busy));
                    return;
                }
                let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                self.lookups.insert(id, (peer, tx));
            }
            Command::Partition(peers, tx) => {
                let open: Vec<PeerId> = self
                    .swarm
                    .connected_peers()
                    .filter(|p| peers.contains(p))
                    .copied()
                    .collect();
                self.swarm.behaviour_mut().gate.set_partitioned(peers);
                for p in open {
                    let _ = self.swarm.disconnect_peer_id(p);
                }
                let _ = tx.send(());
            }
            Command::Mining(cfg, tx) => {
                // Joining the old miner waits at most one nonce slice (milliseconds).
                if let Some(mut m) = self.miner.take() {
                    m.stop();
                }
                let r = match cfg {
                    Some(c) => Miner::spawn(c, self.jobs.clone(), self.gens.clone())
                        .map(|m| self.miner = Some(m))
                        .map_err(|source| NodeError::Io {
                            path: "meshwork-miner thread".into(),
                            source,
                        }),
                    None => Ok(()),
                };
                let _ = tx.send(r);
            }
            Command::Seen(tx) => {
                let _ = tx.send(self.seen.iter().cloned().collect());
            }
            Command::GossipScore(peer, tx) => {
                let _ = tx.send(self.swarm.behaviour().gossipsub.peer_score(&peer));
            }
            Command::Inject(topic, bytes, tx) => {
                let t = self.topic(topic);
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(t, bytes)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                let _ = tx.send(r);
            }
            Command::Shutdown(_) => unreachable!("handled by the run loop"),
        }
    }

    fn status(&self) -> Status {
        let mut counts = ConnectionCounts {
            inbound: 0,
            outbound: 0,
            other: 0,
        };
        for c in self.conns.values() {
            match c.class {
                Class::Inbound => counts.inbound += 1,
                Class::Outbound => counts.outbound += 1,
                Class::Feeler | Class::Transient | Class::Content => counts.other += 1,
            }
        }
        Status {
            peer_id: self.swarm.local_peer_id().to_string(),
            network: self.network.to_string(),
            agent: crate::AGENT.to_string(),
            listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
            connections: counts,
            address_book: AddrBookCounts {
                new: self.book.new_len(),
                tried: self.book.tried_len(),
                banned: self.book.banned_count(),
            },
            uptime_s: self.started.elapsed().as_secs(),
            chain: {
                let ours = self.syncer.ours();
                ChainSummary {
                    height: ours.height,
                    tip: ours.tip.to_string(),
                    total_work: ours.work.to_string(),
                    sync_pending: self.syncer.pending(),
                    mining: self.miner.is_some() && self.gens.is_healthy(),
                    miner_configured: self.miner.is_some(),
                }
            },
            health: Health::of(self.gens.store_fault()),
        }
    }

    /// Publishes our own transaction or block. One that finds no subscribed peer yet (just
    /// started, or alone) is kept, bounded, and published again when a peer subscribes or at
    /// the next sync round, so that what the ledger accepted is never silently kept local
    /// (Bitcoin Core's "unbroadcast set").
    fn publish(&mut self, topic: Topic, bytes: Vec<u8>) {
        self.remember(blake3::hash(&bytes).as_bytes().to_vec(), topic);
        self.publish_again(topic, bytes);
    }

    /// Publishes without recording an arrival: for what was published (or accepted) before.
    /// gossipsub refuses an id it saw within its seen TTL (`Duplicate`): such a copy is
    /// dropped here, and the ledger's next re-announcement of it comes later.
    fn publish_again(&mut self, topic: Topic, bytes: Vec<u8>) {
        let t = self.topic(topic);
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(t, bytes.clone())
        {
            Ok(_) | Err(gossipsub::PublishError::Duplicate) => {}
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                if self.unbroadcast.len() >= MAX_UNBROADCAST {
                    self.unbroadcast.pop_front();
                }
                self.unbroadcast.push_back((topic, bytes));
            }
            Err(e) => tracing::debug!("not published: {e}"),
        }
    }

    fn remember(&mut self, id: Vec<u8>, topic: Topic) {
        if self.seen.len() >= MAX_SEEN {
            self.seen.pop_front();
        }
        self.seen.push_back(Arrival {
            id: hex::encode(id),
            topic,
            at_us: crate::unix_micros(),
        });
    }

    fn retry_unbroadcast(&mut self) {
        // Remembered at the first attempt: a retry is not a new arrival.
        for (topic, bytes) in std::mem::take(&mut self.unbroadcast) {
            self.publish_again(topic, bytes);
        }
    }

    fn topic(&self, t: Topic) -> gossipsub::TopicHash {
        match t {
            Topic::Tx => self.topics[0].clone(),
            Topic::Block => self.topics[1].clone(),
        }
    }

    /// Hands a job to the ledger thread without waiting. `false` when its queue is full.
    fn to_ledger(&self, job: Job) -> bool {
        self.jobs.try_send(job).is_ok()
    }

    fn on_gossip(&mut self, ev: gossipsub::Event) {
        if let gossipsub::Event::Subscribed { .. } = ev {
            if !self.unbroadcast.is_empty() {
                self.retry_unbroadcast();
            }
            return;
        }
        let gossipsub::Event::Message {
            propagation_source: source,
            message_id: id,
            message,
        } = ev
        else {
            return;
        };
        let job = if message.topic == self.topics[0] {
            Job::GossipTx {
                id: id.clone(),
                source,
                bytes: message.data,
            }
        } else if message.topic == self.topics[1] {
            Job::GossipBlock {
                id: id.clone(),
                source,
                bytes: message.data,
            }
        } else {
            return; // we subscribe to nothing else
        };
        if !self.to_ledger(job) {
            // Overloaded: neither forward nor blame.
            self.swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
                    &id,
                    &source,
                    gossipsub::MessageAcceptance::Ignore,
                );
        }
    }

    fn on_ledger_event(&mut self, ev: LedgerEvent) {
        match ev {
            LedgerEvent::Verdict {
                id,
                topic,
                source,
                acceptance,
                offence,
            } => {
                if acceptance == gossipsub::MessageAcceptance::Accept {
                    self.remember(id.0.clone(), topic);
                }
                let topic = match topic {
                    Topic::Tx => "tx",
                    Topic::Block => "block",
                };
                let verdict = match acceptance {
                    gossipsub::MessageAcceptance::Accept => "accept",
                    gossipsub::MessageAcceptance::Reject => "reject",
                    gossipsub::MessageAcceptance::Ignore => "ignore",
                };
                self.metrics
                    .gossip_messages
                    .get_or_create(&vec![("topic", topic), ("verdict", verdict)])
                    .inc();
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, acceptance);
                if let Some(why) = offence {
                    self.penalize(source, Offence::InvalidGossip(why));
                }
            }
            LedgerEvent::Publish(topic, bytes) => self.publish(topic, bytes),
            LedgerEvent::Republish(bytes) => self.publish_again(Topic::Tx, bytes),
            LedgerEvent::Tip(status, locator) => {
                self.metrics.chain_height.set(status.height as i64);
                let acts = self.syncer.on_tip(status, locator);
                self.apply_sync(acts);
            }
            LedgerEvent::Orphan(peer) => {
                let acts = self.syncer.on_orphan(peer);
                self.apply_sync(acts);
            }
            LedgerEvent::Headers {
                peer,
                missing,
                last,
                full,
                offence,
            } => {
                if let Some(why) = offence {
                    self.penalize(peer, Offence::BadSync(why));
                    let acts = self.syncer.on_headers_failed(peer);
                    self.apply_sync(acts);
                    return;
                }
                let acts = self.syncer.on_headers(peer, missing, last, full);
                self.apply_sync(acts);
            }
            LedgerEvent::Blocks {
                peer,
                received,
                offence,
            } => {
                self.metrics.sync_blocks.inc_by(received.len() as u64);
                if let Some(why) = offence {
                    self.penalize(peer, Offence::BadSync(why));
                }
                let acts = self.syncer.on_blocks(peer, &received);
                self.apply_sync(acts);
            }
            LedgerEvent::Serve(key, response) => {
                if let Some(ch) = self.serving.remove(&key) {
                    let _ = self.swarm.behaviour_mut().sync.send_response(ch, response);
                }
            }
        }
    }

    fn apply_sync(&mut self, actions: Vec<SyncAction>) {
        for a in actions {
            match a {
                SyncAction::Headers { peer, locator } => {
                    let id = self.swarm.behaviour_mut().sync.send_request(
                        &peer,
                        SyncRequest::Headers {
                            locator,
                            max: crate::chainsync::MAX_HEADERS as u32,
                        },
                    );
                    self.sync_out.insert(id, (peer, SyncAsk::Headers));
                }
                SyncAction::Blocks { peer, hashes } => {
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_request(&peer, SyncRequest::Blocks(hashes));
                    self.sync_out.insert(id, (peer, SyncAsk::Blocks));
                }
                SyncAction::Disconnect(peer) => self.penalize(peer, Offence::WrongNetwork),
            }
        }
    }

    fn send_status(&mut self, peer: PeerId) {
        let ours = self.syncer.ours();
        let id = self
            .swarm
            .behaviour_mut()
            .sync
            .send_request(&peer, SyncRequest::Status(ours));
        self.sync_out.insert(id, (peer, SyncAsk::Status));
    }

    /// Every few seconds: re-ask one random lasting peer for its status (a missed block
    /// announcement is noticed within a round), and let the scheduler retry.
    fn sync_round(&mut self) {
        self.retry_unbroadcast();
        let lasting: Vec<PeerId> = self
            .conns
            .values()
            .filter(|c| matches!(c.class, Class::Inbound | Class::Outbound))
            .map(|c| c.peer)
            .collect();
        if !lasting.is_empty() {
            let p = lasting[self.rng.gen_range(0..lasting.len())];
            self.send_status(p);
        }
        let acts = self.syncer.poll();
        self.apply_sync(acts);
    }

    fn on_sync(&mut self, ev: request_response::Event<SyncRequest, SyncResponse>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let key = self.next_serve;
                self.next_serve += 1;
                let job = match request {
                    SyncRequest::Status(theirs) => {
                        let ours = self.syncer.ours();
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .sync
                            .send_response(channel, SyncResponse::Status(ours));
                        let acts = self.syncer.on_status(peer, theirs);
                        self.apply_sync(acts);
                        return;
                    }
                    SyncRequest::Headers { locator, max } => Job::ServeHeaders {
                        key,
                        locator,
                        max: max as usize,
                    },
                    SyncRequest::Blocks(hashes) => Job::ServeBlocks { key, hashes },
                };
                if self.serving.len() >= MAX_SERVING || !self.to_ledger(job) {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_response(channel, SyncResponse::Busy);
                    return;
                }
                self.serving.insert(key, channel);
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((_, ask)) = self.sync_out.remove(&request_id) else {
                    return;
                };
                let acts = match (ask, response) {
                    (_, SyncResponse::Busy) => self.sync_failed(peer, ask),
                    (SyncAsk::Status, SyncResponse::Status(s)) => self.syncer.on_status(peer, s),
                    (SyncAsk::Headers, SyncResponse::Headers(headers)) => {
                        if !self.to_ledger(Job::Headers { peer, headers }) {
                            self.sync_failed(peer, ask)
                        } else {
                            vec![]
                        }
                    }
                    (SyncAsk::Blocks, SyncResponse::Blocks(blocks)) => {
                        if !self.to_ledger(Job::Blocks { peer, blocks }) {
                            self.sync_failed(peer, ask)
                        } else {
                            vec![]
                        }
                    }
                    (ask, _) => {
                        self.penalize(
                            peer,
                            Offence::BadSync(format!("an answer of the wrong kind to {ask:?}")),
                        );
                        self.sync_failed(peer, ask)
                    }
                };
                self.apply_sync(acts);
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, ask)) = self.sync_out.remove(&request_id) {
                    if let request_response::OutboundFailure::Io(e) = &error {
                        self.penalize_bad_frame(peer, e);
                    }
                    tracing::debug!("sync {ask:?} to {peer} failed: {error}");
                    let acts = self.sync_failed(peer, ask);
                    self.apply_sync(acts);
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                if let request_response::InboundFailure::Io(e) = &error {
                    self.penalize_bad_frame(peer, e);
                }
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// The sync codec reports oversized or undecodable frames as `InvalidData`: the peer's
    /// fault. Other I/O errors (closed streams, resets) are nobody's.
    fn penalize_bad_frame(&mut self, peer: PeerId, e: &std::io::Error) {
        if e.kind() == std::io::ErrorKind::InvalidData {
            self.penalize(peer, Offence::BadSync(e.to_string()));
        }
    }

    fn sync_failed(&mut self, peer: PeerId, ask: SyncAsk) -> Vec<SyncAction> {
        match ask {
            SyncAsk::Status => vec![],
            SyncAsk::Headers => self.syncer.on_headers_failed(peer),
            SyncAsk::Blocks => self.syncer.on_blocks(peer, &HashSet::new()),
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        self.lp2p_metrics.record(&ev);
        let now = unix_now();
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::debug!("listening on {address}");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address)
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let remote = endpoint.get_remote_address().clone();
                self.content_ips
                    .ended(connection_id, Some(&remote), None, Instant::now());
                for w in self.content_waiters.remove(&peer_id).unwrap_or_default() {
                    let _ = w.send(Ok(()));
                }
                let class = match self.dials.remove(&connection_id) {
                    Some((_, class, _)) => class,
                    None if endpoint.is_dialer() => Class::Transient,
                    None => Class::Inbound,
                };
                let group = AddrGroup::of_addr(&remote);
                if endpoint.is_dialer() && self.book.get(&peer_id).is_none() {
                    // First heard of through this connection: a bootstrap address dialed by
                    // address, or a peer a DHT query dialed. (An inbound peer's remote address
                    // has an ephemeral port; its listen addresses come with identify.)
                    let origin = match class {
                        Class::Transient => Origin::Dht,
                        _ => group.map(Origin::Peer).unwrap_or(Origin::Operator),
                    };
                    self.book.add(
                        peer_id,
                        std::slice::from_ref(&remote),
                        now,
                        origin,
                        class.via(),
                        now,
                    );
                }
                if endpoint.is_dialer() {
                    // We reached it ourselves: the address works.
                    if let GoodOutcome::Collision(incumbent) =
                        self.book.good(&peer_id, &remote, now)
                    {
                        tracing::debug!(
                            "tried-table collision: {peer_id} waits for a test of {incumbent}"
                        );
                    }
                }
                self.conns.insert(
                    connection_id,
                    Conn {
                        peer: peer_id,
                        remote,
                        class,
                        group,
                        since: Instant::now(),
                        rtt: None,
                    },
                );
                if class == Class::Feeler {
                    // The test succeeded; a feeler has nothing more to do.
                    self.swarm.close_connection(connection_id);
                } else if num_established.get() == 1 && class != Class::Transient {
                    self.ask_pex(peer_id);
                }
                if class != Class::Feeler && num_established.get() == 1 {
                    self.send_status(peer_id);
                }
                if !self.kad_bootstrapped && class != Class::Feeler {
                    self.kad_bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
                }
            }
            SwarmEvent::ConnectionClosed {
                connection_id,
                peer_id,
                num_established,
                ..
            } => {
                self.conns.remove(&connection_id);
                if num_established == 0 {
                    let acts = self.syncer.on_disconnected(&peer_id);
                    self.apply_sync(acts);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let dial = self.dials.remove(&connection_id);
                // The IPs that failed: those the transport names, none for a dial that never
                // reached the network or that our own gate denied, every one for the rest (a
                // wrong peer id answered...).
                let failed_ips = match &error {
                    libp2p::swarm::DialError::Transport(errs) => {
                        Some(errs.iter().filter_map(|(a, _)| ip_of(a)).collect())
                    }
                    libp2p::swarm::DialError::DialPeerConditionFalse(_)
                    | libp2p::swarm::DialError::Denied { .. }
                    | libp2p::swarm::DialError::Aborted
                    | libp2p::swarm::DialError::NoAddresses
                    | libp2p::swarm::DialError::LocalPeerId { .. } => Some(vec![]),
                    _ => None,
                };
                self.content_ips
                    .ended(connection_id, None, failed_ips, Instant::now());
                if let Some(peer) = peer_id.or(dial.and_then(|d| d.0)) {
                    // A dial of this peer failed (ours or another class's that a content dial
                    // waited on) and none is left in flight: the content service hears now.
                    // ("Condition false" means another dial is under way or a connection is up.)
                    let other = self.dials.values().any(|d| d.0 == Some(peer))
                        || matches!(error, libp2p::swarm::DialError::DialPeerConditionFalse(_));
                    if !other && !self.swarm.is_connected(&peer) {
                        for w in self.content_waiters.remove(&peer).unwrap_or_default() {
                            let _ = w.send(Err(format!("dial failed: {error}")));
                        }
                    }
                    // "Already connected / dialing" is not a failure of the address.
                    if !matches!(
                        error,
                        libp2p::swarm::DialError::DialPeerConditionFalse(_)
                            | libp2p::swarm::DialError::Denied { .. }
                    ) {
                        self.book.failed(&peer, now);
                    }
                }
                tracing::debug!("dial failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(ev)) => {
                self.lp2p_metrics.record(&ev);
                self.on_identify(ev);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => {
                self.lp2p_metrics.record(&ev);
                self.on_kad(ev);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ev)) => {
                self.lp2p_metrics.record(&ev);
                if let (Some(c), Ok(rtt)) = (self.conns.get_mut(&ev.connection), ev.result) {
                    c.rtt = Some(rtt);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Pex(ev)) => self.on_pex(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(ev)) => {
                self.lp2p_metrics.record(&ev);
                self.on_gossip(ev);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => self.on_sync(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Gate(ev)) => match ev {},
            _ => {}
        }
    }

    fn on_identify(&mut self, ev: identify::Event) {
        let identify::Event::Received {
            peer_id,
            info,
            connection_id,
        } = ev
        else {
            return;
        };
        if info.protocol_version != self.network.identify_version() {
            tracing::info!(
                "peer {peer_id} is on {:?}, not {}: disconnecting",
                info.protocol_version,
                self.network
            );
            self.book.remove(&peer_id);
            self.swarm.behaviour_mut().kad.remove_peer(&peer_id);
            let _ = self.swarm.disconnect_peer_id(peer_id);
            return;
        }
        let Some(conn) = self.conns.get(&connection_id) else {
            return;
        };
        let (class, source) = (conn.class, conn.group);
        let allow_private = self.cfg.allow_private_addrs;
        let addrs: Vec<Multiaddr> = info
            .listen_addrs
            .iter()
            .filter_map(|a| check_dialable(a, Some(&peer_id), allow_private).ok())
            .collect();
        if info.protocols.contains(&self.kad_protocol) {
            for a in &addrs {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer_id, a.clone());
            }
        }
        let now = unix_now();
        let origin = source.map(Origin::Peer).unwrap_or(Origin::Operator);
        self.book
            .add(peer_id, &addrs, now, origin, class.via(), now);
    }

    fn on_kad(&mut self, ev: kad::Event) {
        let now = unix_now();
        match ev {
            kad::Event::RoutingUpdated {
                peer, addresses, ..
            } => {
                let addrs: Vec<Multiaddr> = addresses.iter().cloned().collect();
                self.book.add(peer, &addrs, now, Origin::Dht, Via::Dht, now);
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: QueryResult::GetClosestPeers(res),
                step,
                ..
            } => {
                let peers = match res {
                    Ok(GetClosestPeersOk { peers, .. }) => peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                for p in &peers {
                    self.book
                        .add(p.peer_id, &p.addrs, now, Origin::Dht, Via::Dht, now);
                }
                if step.last {
                    if let Some((_, tx)) = self.lookups.remove(&id) {
                        let _ = tx.send(Ok(peers.iter().map(|p| p.peer_id).collect()));
                    }
                }
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: QueryResult::GetProviders(res),
                step,
                ..
            } => {
                let local = *self.swarm.local_peer_id();
                let found: Vec<PeerId> = match res {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        providers.into_iter().filter(|p| *p != local).collect()
                    }
                    _ => vec![],
                };
                // Answer with the first providers found (a download can start; the lookup
                // stops there), or empty at the end.
                if step.last || !found.is_empty() {
                    if let Some(tx) = self.provider_lookups.remove(&id) {
                        let _ = tx.send(found);
                        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                            q.finish();
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn on_pex(&mut self, ev: request_response::Event<PexRequest, PexResponse>) {
        use request_response::{Event, Message, OutboundFailure};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let interval = self.cfg.timings.pex_answer_interval;
                let answer = match self.pex_answered.get_mut(&peer) {
                    Some((t, refused)) if t.elapsed() < interval => {
                        *refused += 1;
                        if *refused > PEX_FLOOD_TOLERANCE {
                            *refused = 0;
                            self.penalize(peer, Offence::PexFlood);
                        }
                        PexResponse::default()
                    }
                    _ => {
                        self.pex_answered.insert(peer, (Instant::now(), 0));
                        let records = self.book.tried_sample(
                            &mut self.rng,
                            request.allowed(),
                            unix_now(),
                            &peer,
                        );
                        PexResponse::from_records(records, request.allowed())
                    }
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .pex
                    .send_response(channel, answer);
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((_, allowed)) = self.pex_pending.remove(&request_id) else {
                    return;
                };
                let source = self
                    .conns
                    .values()
                    .find(|c| c.peer == peer)
                    .and_then(|c| c.group);
                match response.validate(allowed, self.cfg.allow_private_addrs) {
                    Ok(records) => {
                        self.metrics
                            .pex_answers
                            .get_or_create(&vec![("outcome", "accepted")])
                            .inc();
                        if let Some(source) = source {
                            let added = self.book.add_records(&records, source, unix_now());
                            self.metrics.pex_records_added.inc_by(added as u64);
                        }
                    }
                    Err(e) => {
                        self.metrics
                            .pex_answers
                            .get_or_create(&vec![("outcome", "rejected")])
                            .inc();
                        self.penalize(peer, Offence::BadPex(e));
                    }
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.pex_pending.remove(&request_id);
                if let OutboundFailure::Io(e) = &error {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        self.metrics
                            .pex_answers
                            .get_or_create(&vec![("outcome", "rejected")])
                            .inc();
                        self.penalize(peer, Offence::PexFraming);
                    }
                }
            }
            Event::InboundFailure {
                peer,
                error: request_response::InboundFailure::Io(e),
                ..
            } if e.kind() == std::io::ErrorKind::InvalidData => {
                self.penalize(peer, Offence::PexFraming);
            }
            _ => {}
        }
    }
}
