//! The content service: BitTorrent's hybrid on libp2p. It drives one [`Engine`] per content
//! over long-lived libp2p streams (`/meshwork/<net>/pieces/1`), and finds peers through the
//! ticket, the tracker (HTTP announces), Kademlia provider records and in-swarm peer exchange.
//!
//! # Tasks and channels (every one bounded)
//! - **The service task** owns every engine and every link. It is the only writer of content
//!   state; everything else reports to it through one bounded channel ([`EVENT_CAPACITY`]).
//! - **An accept task** takes inbound streams promptly (libp2p-stream drops them when its
//!   accept loop lags) and gives each a handshake task, at most [`MAX_HANDSHAKES`] at once;
//!   beyond that a stream is dropped at once.
//! - **Per link, a reader and a writer task.** The reader decodes frames (bounded by the length
//!   prefix before any allocation) and forwards them; when the service's channel is full it
//!   stops reading, and the stream's flow control slows the sender. The writer drains a
//!   channel of [`LINK_QUEUE`] messages; the service fills it from [`Engine::poll_send`] only
//!   while it has room, and the writer signals when it drains below half, so a slow peer holds
//!   at most `LINK_QUEUE` messages of ours in memory. The writer flushes whenever its channel
//!   runs dry: a `Have` is on the super-seeder's critical path (the announcement of an offered
//!   piece is what earns the next offer), so none waits for company. (Held back up to 100 ms
//!   to share segments, they saved the origin 10 % of its packets at N = 16 and cost a
//!   distribution to two peers half again its time.)
//! - **Connect, manifest and announce tasks**, bounded per content.
//!
//! # Files and bookkeeping
//! Which content owns which path, and how each is taken up again after a restart, lives in
//! the data directory ([`records`]). A download's file is created by the node itself and
//! proven its own by its journal; a path another content uses is refused; a file that changed
//! while the node was down is re-hashed at start, and a complete content's file is checked
//! for changes while the node runs ([`ContentConfig::change_check`]). What the API
//! acknowledges (a share, a fetch) is on disk first.
//!
//! # Handshake
//! The opener sends `Hello` (content id, piece count, its listen addresses) and reads the
//! answering `Hello`. A stream whose first message is `GetManifest` is answered with the
//! manifest and closed. Two peers that dial each other at once keep the stream opened by the
//! smaller peer id, on both sides.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use futures::StreamExt;
use libp2p::{kad, Multiaddr, PeerId, Stream, StreamProtocol};
use meshwork_http::body::{read_json_capped, read_text_capped};
use meshwork_proto::addr::{check_policy, AddrSource};
use meshwork_swarm::engine::{Engine, EngineConfig, EngineEvent, Progress};
use meshwork_swarm::manifest::Manifest;
use meshwork_swarm::store::{journal_owns, PieceStore, Resumed};
use meshwork_swarm::ticket::{Provider, Ticket};
use meshwork_swarm::tracker_wire::{AnnounceRequest, AnnounceResponse, Event as TrackerEvent};
use meshwork_swarm::wire::{
    Msg, PexAddr, PexEntry, MAX_FRAME, MAX_PEX_ADDRS, MAX_PEX_ITEM, MAX_PEX_PEERS, MAX_SMALL_FRAME,
};
use meshwork_swarm::ContentId;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::time::Instant;

use crate::config::ContentConfig;
use crate::node::Command;

mod limit;
mod records;

use limit::UploadLimit;
use records::{Loaded, Pending, Record, Records};

/// Messages from all tasks to the service, at most, in flight.
pub const EVENT_CAPACITY: usize = 4096;
/// Messages queued for one peer's writer, at most.
pub const LINK_QUEUE: usize = 64;
/// Inbound handshakes in progress, at most.
pub const MAX_HANDSHAKES: usize = 64;
/// Contents one node holds (shared, downloading or seeding), at most.
pub const MAX_CONTENTS: usize = 1024;
/// Fetches waiting for their manifest, at most: counted apart from [`MAX_CONTENTS`], so that
/// fetches of contents nobody provides cannot crowd out shares and downloads.
pub const MAX_PENDING_FETCHES: usize = 64;
/// Failed fetches that never got a manifest, kept listed (the oldest is forgotten first).
pub const MAX_FAILED: usize = 256;
/// A download with no peer and no provider to try for this long is reported as stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(5);
/// A file that changes while it is re-checked is hashed again, this many times at most.
const MAX_CHECK_ATTEMPTS: u32 = 3;
/// Default file names tried in the downloads directory (`name`, `name (1)`, ...).
const MAX_NAME_TRIES: usize = 100;
/// Candidate peers remembered per content, at most.
pub const MAX_CANDIDATES: usize = 256;
/// Peers banned per content, at most remembered (the oldest ban is forgotten first).
pub const MAX_BANNED: usize = 1024;
/// Streams being opened per content at once.
pub const MAX_CONNECTING: usize = 8;
/// A downloading content dials until it has this many peers.
pub const WANT_PEERS: usize = 30;
/// A seed dials until it has this many peers.
pub const SEED_DIALS: usize = 8;
/// How often each link is offered new peers (in-swarm PEX), and how often one is accepted.
pub const PEX_INTERVAL: Duration = Duration::from_secs(5);
/// A handshake, a manifest exchange or a stream open that takes longer fails.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Providers are looked up in the DHT at most this often while peers are few.
pub const DHT_INTERVAL: Duration = Duration::from_secs(20);
/// The largest tracker answer read: at most the tracker's `MAX_NUMWANT` (50) peers of
/// `MAX_ADDRS` (8) addresses of `MAX_ADDR_LEN` (256) bytes, with their ids (at most 128 bytes)
/// and the JSON around them, is about 110 KiB; twice that leaves room for escapes. A larger
/// answer fails the announce like an unreachable tracker (issue 14: an 800 MiB answer was read
/// whole).
pub const TRACKER_ANSWER_MAX: usize = 256 << 10;
/// The most of a tracker's error answer read (it only goes into a log line and a reason).
const TRACKER_ERROR_MAX: usize = 4 << 10;
/// Tracker answers are obeyed within these bounds.
const MIN_ANNOUNCE: Duration = Duration::from_secs(10);
const MAX_ANNOUNCE: Duration = Duration::from_secs(1800);
/// Announces in flight at once, to all trackers: a node sharing hundreds of contents through
/// one tracker stays within its per-IP connection cap and rate bucket.
const ANNOUNCES_IN_FLIGHT: usize = 4;
/// The first wait after a tracker answered 429 (doubled per 429 in a row, up to the retry
/// period).
const RATE_LIMITED_FIRST: Duration = Duration::from_secs(1);

/// `e` with its causes, outermost first ("error sending request for url (...): client error
/// (Connect): tcp connect error: Connection refused"): reqwest's own text names none.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        // Some layers repeat their cause in their own text.
        if !s.ends_with(&c_text) {
            s.push_str(": ");
            s.push_str(&c_text);
        }
        cause = c.source();
    }
    s
}

/// A wait of `d` shortened by a random part of up to a quarter, so that announces that fell
/// due together spread out over the next round.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(1.0 - rand::random::<f64>() * 0.25)
}
/// A candidate that failed is dialed again after this, doubled with every failure in a row...
const REDIAL_FIRST: Duration = Duration::from_secs(1);
/// ...up to this.
const REDIAL_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("{0}")]
    Manifest(#[from] meshwork_swarm::manifest::ManifestError),
    #[error("{0}")]
    Store(#[from] meshwork_swarm::store::StoreError),
    #[error("{0}")]
    Ticket(#[from] meshwork_swarm::ticket::TicketError),
    #[error("{0:?} is neither a ticket nor a content id (64 hexadecimal digits)")]
    BadTarget(String),
    #[error("content {0} is not on this node")]
    Unknown(ContentId),
    #[error("content {0} is already on this node")]
    Exists(ContentId),
    #[error("{0} is not an absolute path")]
    RelativePath(PathBuf),
    #[error("{0:?} is not a usable path (it holds a NUL byte)")]
    BadPath(PathBuf),
    #[error("no output path: give one (-o PATH), or run the node with a data directory")]
    NoOutput,
    #[error("this node holds its limit of {MAX_CONTENTS} contents")]
    Full,
    #[error(
        "{MAX_PENDING_FETCHES} fetches are already waiting for a manifest: wait for them, or \
         remove some (meshwork content rm ID)"
    )]
    TooManyPending,
    #[error(
        "{0} already exists and is not an interrupted download: remove it or choose another path"
    )]
    WouldOverwrite(PathBuf),
    #[error("{path} is the file of content {owner}: choose another path (-o PATH)")]
    PathInUse { path: PathBuf, owner: ContentId },
    #[error("content {0} is recorded at {1}: fetch it there, or remove it first")]
    RecordedAt(ContentId, PathBuf),
    #[error("content {0} has no file to verify yet")]
    NotReady(ContentId),
    /// The node could not make the request durable, so it did not accept it.
    #[error("not accepted: the node cannot record it ({0})")]
    Persist(String),
    #[error("the tracker URL {0:?} is not http(s)://")]
    BadTracker(String),
    #[error("the content service has stopped")]
    Stopped,
}

/// `POST /api/v1/content`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShareRequest {
    /// An absolute path on the node's machine.
    pub path: PathBuf,
    #[serde(default)]
    pub super_seed: bool,
    #[serde(default)]
    pub tracker: Option<String>,
    #[serde(default)]
    pub piece_size: Option<u32>,
}

/// `POST /api/v1/fetch`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchRequest {
    /// A ticket, or a bare content id (then providers come from the tracker or the DHT).
    pub target: String,
    /// An absolute path; by default `<data dir>/downloads/<name>`.
    #[serde(default)]
    pub out: Option<PathBuf>,
    #[serde(default)]
    pub tracker: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Asking providers for the manifest.
    FetchingManifest,
    Downloading,
    /// Complete and verified; serving it.
    Seeding,
    Failed,
}

/// `GET /api/v1/content/{id}`: one content and its progress.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContentInfo {
    pub id: String,
    pub name: Option<String>,
    pub path: Option<PathBuf>,
    pub state: State,
    pub size: Option<u64>,
    pub pieces: Option<usize>,
    pub pieces_have: usize,
    pub bytes_have: u64,
    pub downloaded: u64,
    pub uploaded: u64,
    pub wasted: u64,
    pub down_rate: f64,
    pub up_rate: f64,
    pub peers: usize,
    pub candidates: usize,
    pub banned: usize,
    pub bad_pieces: u32,
    pub super_seed: bool,
    pub tracker: Option<String>,
    pub ticket: String,
    pub error: Option<String>,
    /// Why a fetch or download is not moving: no provider known, or none reachable.
    #[serde(default)]
    pub stalled: Option<String>,
    /// The tracker's last failure (unreachable, an error status, an answer over
    /// [`TRACKER_ANSWER_MAX`] or not JSON), cleared by its next good answer.
    #[serde(default)]
    pub tracker_error: Option<String>,
}

/// `POST /api/v1/content/{id}/verify`: every held piece hashed again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Pieces that were held and hashed.
    pub checked: usize,
    /// Those that no longer matched: a download fetches them again; an origin whose file
    /// changed stops being served.
    pub bad: Vec<usize>,
    /// The content after the check.
    pub info: ContentInfo,
}

pub(crate) enum Request {
    Share(
        ShareRequest,
        oneshot::Sender<Result<ContentInfo, ContentError>>,
    ),
    Fetch(
        FetchRequest,
        oneshot::Sender<Result<ContentInfo, ContentError>>,
    ),
    List(oneshot::Sender<Vec<ContentInfo>>),
    Pieces(ContentId, oneshot::Sender<Option<meshwork_swarm::Bitfield>>),
    Get(ContentId, oneshot::Sender<Option<ContentInfo>>),
    Remove(ContentId, oneshot::Sender<Result<(), ContentError>>),
    Verify(
        ContentId,
        oneshot::Sender<Result<VerifyReport, ContentError>>,
    ),
    Shutdown(oneshot::Sender<()>),
}

/// The API's handle to the service.
#[derive(Clone)]
pub struct ContentClient {
    tx: mpsc::Sender<Request>,
}

impl ContentClient {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, ContentError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| ContentError::Stopped)?;
        rx.await.map_err(|_| ContentError::Stopped)
    }

    pub async fn share(&self, r: ShareRequest) -> Result<ContentInfo, ContentError> {
        self.ask(|tx| Request::Share(r, tx)).await?
    }

    pub async fn fetch(&self, r: FetchRequest) -> Result<ContentInfo, ContentError> {
        self.ask(|tx| Request::Fetch(r, tx)).await?
    }

    pub async fn list(&self) -> Result<Vec<ContentInfo>, ContentError> {
        self.ask(Request::List).await
    }

    pub async fn get(&self, id: ContentId) -> Result<Option<ContentInfo>, ContentError> {
        self.ask(|tx| Request::Get(id, tx)).await
    }

    /// The verified pieces of a content (for the lab: who holds what).
    pub async fn pieces(
        &self,
        id: ContentId,
    ) -> Result<Option<meshwork_swarm::Bitfield>, ContentError> {
        self.ask(|tx| Request::Pieces(id, tx)).await
    }

    pub async fn remove(&self, id: ContentId) -> Result<(), ContentError> {
        self.ask(|tx| Request::Remove(id, tx)).await?
    }

    /// Hashes every held piece of a content again (reads its whole file).
    pub async fn verify(&self, id: ContentId) -> Result<VerifyReport, ContentError> {
        self.ask(|tx| Request::Verify(id, tx)).await?
    }

    pub(crate) async fn shutdown(&self) {
        let _ = self.ask(Request::Shutdown).await;
    }
}

/// Reports from the service's tasks.
enum Event {
    /// An inbound stream whose first message was `Hello`.
    Incoming {
        peer: PeerId,
        stream: Stream,
        content: ContentId,
        pieces: u32,
        listen: Vec<Multiaddr>,
    },
    /// An inbound stream asking for a manifest.
    ManifestWanted {
        peer: PeerId,
        stream: Stream,
        content: ContentId,
    },
    /// An outbound stream whose handshake completed.
    Opened {
        peer: PeerId,
        stream: Stream,
        content: ContentId,
        listen: Vec<Multiaddr>,
    },
    OpenFailed {
        peer: PeerId,
        content: ContentId,
        error: String,
    },
    Manifest {
        content: ContentId,
        result: Result<Manifest, (PeerId, String)>,
    },
    Msg {
        content: ContentId,
        peer: PeerId,
        link: u64,
        msg: Msg,
    },
    Closed {
        content: ContentId,
        peer: PeerId,
        link: u64,
        error: Option<String>,
    },
    Candidates {
        content: ContentId,
        peers: Vec<(PeerId, Vec<Multiaddr>)>,
    },
    Announced {
        content: ContentId,
        /// The tracker's answer: its interval, or why it failed.
        answer: Result<Duration, String>,
        /// It failed with 429 (rate limited): asked again soon, with backoff.
        rate_limited: bool,
    },
    /// A file to share, hashed.
    Shared {
        req: ShareRequest,
        opened: Result<PieceStore, ContentError>,
        reply: oneshot::Sender<Result<ContentInfo, ContentError>>,
    },
    /// A download's file, created or resumed off the service task.
    DownloadReady {
        content: ContentId,
        result: Result<(PieceStore, Resumed), String>,
    },
    /// A re-check of a content's file: the pieces that no longer verify.
    Checked {
        content: ContentId,
        result: Result<meshwork_swarm::store::Checked, String>,
        reply: Option<oneshot::Sender<Result<VerifyReport, ContentError>>>,
        /// Checks of this request so far (a file that moves while hashed is hashed again).
        attempt: u32,
    },
}

/// A writer that drained below half its queue asks to be refilled.
#[derive(Default)]
struct Writable {
    set: Mutex<HashSet<(ContentId, PeerId)>>,
    notify: Notify,
}

struct Link {
    id: u64,
    tx: mpsc::Sender<Msg>,
    /// Set by the writer when it asked for more; cleared by the service when it fills.
    asked: Arc<AtomicBool>,
    reader: tokio::task::AbortHandle,
    /// Which peer opened the stream (for the simultaneous-open rule).
    opener: PeerId,
    last_pex_out: Option<Instant>,
    last_pex_in: Option<Instant>,
    /// Peers already offered to it by PEX.
    pex_sent: HashSet<PeerId>,
}

enum Phase {
    /// Asking these peers for the manifest (failed candidates are retried after a pause).
    FetchingManifest {
        asking: HashSet<PeerId>,
    },
    /// The manifest is here; the file is being created or resumed.
    Opening,
    Active(Box<Engine<PeerId>>),
    Failed(String),
}

struct Candidate {
    /// Each address with where it was learned: the node applies its dial policy to each.
    addrs: Vec<(Multiaddr, AddrSource)>,
    failed_at: Option<Instant>,
    /// Failures in a row: the wait before the next dial doubles with each, from
    /// [`REDIAL_FIRST`] up to [`REDIAL_AFTER`].
    failures: u32,
}

impl Candidate {
    fn failed(&mut self, now: Instant) {
        self.failed_at = Some(now);
        self.failures = self.failures.saturating_add(1);
    }

    /// Whether it may be dialed again at `now`.
    ///
    /// Most failures at the start of a swarm are peers that have not yet begun to fetch the
    /// content (they close the stream unanswered): a fixed 30 s wait left a leecher that
    /// started last with the origin alone for 20 s of a 30 s distribution.
    fn may_dial(&self, now: Instant) -> bool {
        self.failed_at.is_none_or(|t| {
            let wait = REDIAL_FIRST
                .saturating_mul(1 << self.failures.saturating_sub(1).min(16))
                .min(REDIAL_AFTER);
            now.duration_since(t) >= wait
        })
    }

    fn forgive(&mut self) {
        self.failed_at = None;
        self.failures = 0;
    }
}

struct Content {
    id: ContentId,
    phase: Phase,
    /// Shared from this node's own file (see [`Record::origin`]).
    origin: bool,
    /// The content's path: its claim (records' invariant 1), from the request or, once the
    /// manifest names it, the downloads directory.
    out: Option<PathBuf>,
    /// It has a record in the data directory (so its manifest is there too).
    recorded: bool,
    /// The ticket's providers (persisted with the record).
    providers: Vec<Provider>,
    /// When the fetch was first asked for: the manifest deadline and the stall grace run
    /// from here.
    since: Instant,
    /// A re-check of its file is running.
    checking: bool,
    next_check: Instant,
    super_seed: bool,
    tracker: Option<String>,
    links: HashMap<PeerId, Link>,
    candidates: HashMap<PeerId, Candidate>,
    connecting: HashSet<PeerId>,
    banned: VecDeque<PeerId>,
    next_announce: Instant,
    announcing: bool,
    /// Why the last announce failed (see [`ContentInfo::tracker_error`]).
    tracker_error: Option<String>,
    /// 429 answers in a row.
    rate_limited: u32,
    announced_started: bool,
    announced_completed: bool,
    next_dht: Instant,
    provided: bool,
}

impl Content {
    fn is_banned(&self, p: &PeerId) -> bool {
        self.banned.contains(p)
    }

    /// Adds `peer` with the addresses of `addrs` that the dial policy admits from `source`
    /// (a peer whose every address was refused is not added; one given with none, from the
    /// DHT, is: the node looks its addresses up).
    fn add_candidate(
        &mut self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        source: AddrSource,
        allow_private: bool,
    ) {
        if self.is_banned(&peer) {
            return;
        }
        let given = addrs.len();
        let addrs: Vec<(Multiaddr, AddrSource)> = addrs
            .iter()
            .filter_map(
                |a| match check_policy(a, Some(&peer), source, allow_private) {
                    Ok(a) => Some((a, source)),
                    Err(e) => {
                        tracing::debug!("content {}: not dialing {peer} at {a}: {e}", self.id);
                        None
                    }
                },
            )
            .collect();
        if given > 0 && addrs.is_empty() {
            return;
        }
        if let Some(c) = self.candidates.get_mut(&peer) {
            for a in addrs {
                if !c.addrs.iter().any(|(b, _)| *b == a.0) && c.addrs.len() < 8 {
                    c.addrs.push(a);
                }
            }
            return;
        }
        if self.candidates.len() >= MAX_CANDIDATES {
            // Forget a candidate that failed, else refuse: connected peers stay.
            let victim = self
                .candidates
                .iter()
                .find(|(p, c)| c.failed_at.is_some() && !self.links.contains_key(p))
                .map(|(p, _)| *p);
            match victim {
                Some(v) => {
                    self.candidates.remove(&v);
                }
                None => return,
            }
        }
        let mut addrs = addrs;
        addrs.truncate(8);
        self.candidates.insert(
            peer,
            Candidate {
                addrs,
                failed_at: None,
                failures: 0,
            },
        );
    }

    fn new(
        id: ContentId,
        phase: Phase,
        out: Option<PathBuf>,
        super_seed: bool,
        tracker: Option<String>,
        origin: bool,
    ) -> Content {
        let now = Instant::now();
        Content {
            id,
            phase,
            origin,
            out,
            recorded: false,
            providers: vec![],
            since: now,
            checking: false,
            next_check: now,
            super_seed,
            tracker,
            links: HashMap::new(),
            candidates: HashMap::new(),
            connecting: HashSet::new(),
            banned: VecDeque::new(),
            next_announce: now,
            announcing: false,
            tracker_error: None,
            rate_limited: 0,
            announced_started: false,
            announced_completed: false,
            next_dht: now,
            provided: false,
        }
    }

    fn engine(&mut self) -> Option<&mut Engine<PeerId>> {
        match &mut self.phase {
            Phase::Active(e) => Some(e),
            _ => None,
        }
    }

    fn is_complete(&self) -> bool {
        matches!(&self.phase, Phase::Active(e) if e.is_complete())
    }

    /// Waiting for a manifest (or for its file to open): counted against
    /// [`MAX_PENDING_FETCHES`].
    fn is_pending(&self) -> bool {
        matches!(self.phase, Phase::FetchingManifest { .. } | Phase::Opening)
    }

    /// Why it is not moving, if it is not: a fetch or download with no peer, and no provider
    /// known, or none that answers.
    fn stalled(&self, now: Instant) -> Option<String> {
        let wants = match &self.phase {
            Phase::FetchingManifest { .. } => true,
            Phase::Active(e) => !e.is_complete(),
            _ => false,
        };
        if !wants || !self.links.is_empty() || now.duration_since(self.since) < STALL_AFTER {
            return None;
        }
        if self.candidates.is_empty() && !self.banned.is_empty() {
            return Some(format!(
                "no providers left: {} banned for sending corrupt pieces",
                self.banned.len()
            ));
        }
        if self.candidates.is_empty() {
            return Some(
                "no providers: the ticket names none, and no tracker or DHT lookup found any \
                 yet"
                .into(),
            );
        }
        let failing = self.candidates.values().all(|c| c.failed_at.is_some());
        failing.then(|| {
            format!(
                "no provider reachable: {} known, the last dial to each failed",
                self.candidates.len()
            )
        })
    }

    /// The ticket's providers: the operator's input (a ticket the user gave), so private
    /// addresses pass whatever `allow_private_addrs` says.
    fn add_providers(&mut self, local: &PeerId) {
        for p in self.providers.clone() {
            if let Ok(peer) = p.peer.parse::<PeerId>() {
                if peer != *local {
                    let addrs = p.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    self.add_candidate(peer, addrs, AddrSource::Operator, true);
                }
            }
        }
    }
}

pub(crate) struct Service {
    local: PeerId,
    /// Signs tracker announces (the node's identity).
    keypair: libp2p::identity::Keypair,
    /// Addresses learned from the network may be private (`allow_private_addrs`).
    allow_private: bool,
    /// The `time_ms` of the last announce made: each is later than the one before, even
    /// within a millisecond or after the clock stepped back.
    last_announce_ms: std::cell::Cell<u64>,
    protocol: StreamProtocol,
    control: libp2p_stream::Control,
    node: mpsc::Sender<Command>,
    listen: Vec<Multiaddr>,
    data_dir: Option<PathBuf>,
    /// The bookkeeping in `<data dir>/content` (none without a data directory: nothing
    /// survives a restart then).
    records: Option<Records>,
    contents: HashMap<ContentId, Content>,
    events: mpsc::Sender<Event>,
    writable: Arc<Writable>,
    http: reqwest::Client,
    /// Permits of announces in flight ([`ANNOUNCES_IN_FLIGHT`]); waiting announces hold no
    /// connection (one per content at most: see `Content::announcing`).
    announce_slots: Arc<tokio::sync::Semaphore>,
    next_link: u64,
    cfg: ContentConfig,
    /// The upload cap, across all contents.
    limit: Option<UploadLimit>,
    /// When the cap next allows a block, if uploads are waiting for it.
    limit_wake: Option<Instant>,
}

/// What the node hands the content service when it starts.
pub(crate) struct Setup {
    pub local: PeerId,
    pub keypair: libp2p::identity::Keypair,
    pub allow_private: bool,
    /// The local IP of TCP dials (`NodeConfig::dial_from`): tracker announces go from it too,
    /// since the tracker hands out the IP an announce came from.
    pub dial_from: Option<std::net::IpAddr>,
    pub protocol: StreamProtocol,
    pub control: libp2p_stream::Control,
    /// The node actor's command queue (dials, DHT records, penalties).
    pub node: mpsc::Sender<Command>,
    /// The addresses put in tickets, announces and `Hello`.
    pub listen: Vec<Multiaddr>,
    pub data_dir: Option<PathBuf>,
    pub cfg: ContentConfig,
}

/// The client and the request queue of a content service to be spawned.
pub(crate) fn channel() -> (ContentClient, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(64);
    (ContentClient { tx }, rx)
}

/// Checks, before a node opens its other stores, that the content records of `data_dir` can
/// be read: a start that fails later would hold those stores open a while after it returned.
pub(crate) fn check_records(data_dir: &Path) -> Result<(), String> {
    Records::new(data_dir.join("content"))
        .readable()
        .map_err(|e| e.to_string())
}

/// Starts the content service on the requests of [`channel`], with the contents of an earlier
/// run loaded.
pub(crate) async fn spawn(req_rx: mpsc::Receiver<Request>, setup: Setup) -> Result<(), String> {
    let Setup {
        local,
        keypair,
        allow_private,
        dial_from,
        protocol,
        mut control,
        node,
        listen,
        data_dir,
        cfg,
    } = setup;
    let incoming = control
        .accept(protocol.clone())
        .map_err(|e| format!("piece protocol: {e}"))?;
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_CAPACITY);
    // A tracker's redirect is not followed: the announce would be re-sent to any host a
    // tracker names (a redirect is a failed announce instead).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .local_address(dial_from)
        .build()
        .map_err(|e| e.to_string())?;
    let records = data_dir.as_ref().map(|d| Records::new(d.join("content")));
    let mut svc = Service {
        local,
        keypair,
        allow_private,
        last_announce_ms: std::cell::Cell::new(0),
        protocol,
        control,
        node,
        listen,
        data_dir,
        records: records.clone(),
        contents: HashMap::new(),
        events: ev_tx.clone(),
        writable: Arc::new(Writable::default()),
        http,
        announce_slots: Arc::new(tokio::sync::Semaphore::new(ANNOUNCES_IN_FLIGHT)),
        next_link: 0,
        limit: cfg.upload_limit.map(UploadLimit::new),
        limit_wake: None,
        cfg,
    };
    if let Some(records) = records {
        let (loaded, pending) = tokio::task::spawn_blocking(move || load_contents(&records))
            .await
            .map_err(|e| format!("loading contents: {e}"))?
            .map_err(|e| e.to_string())?;
        for mut c in loaded {
            c.add_providers(&local);
            svc.contents.insert(c.id, c);
        }
        // Fetches acknowledged before a crash that had no manifest yet start over, with the
        // deadline they had.
        for p in pending {
            let target = p.request.target.clone();
            if let Err(e) = svc.fetch_since(p.request, p.since) {
                tracing::warn!("cannot resume the fetch of {target}: {e}");
            }
        }
    }
    tokio::spawn(accept_loop(incoming, ev_tx));
    tokio::spawn(svc.run(req_rx, ev_rx));
    Ok(())
}

async fn accept_loop(mut incoming: libp2p_stream::IncomingStreams, events: mpsc::Sender<Event>) {
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    while let Some((peer, stream)) = incoming.next().await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("dropping a piece stream from {peer}: too many handshakes");
            continue;
        };
        let events = events.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut stream = stream;
            let first =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream, MAX_SMALL_FRAME))
                    .await;
            let ev = match first {
                Ok(Ok(Msg::Hello {
                    content,
                    pieces,
                    listen,
                })) => Event::Incoming {
                    peer,
                    stream,
                    content,
                    pieces,
                    listen: parse_addrs(&listen),
                },
                Ok(Ok(Msg::GetManifest(content))) => Event::ManifestWanted {
                    peer,
                    stream,
                    content,
                },
                Ok(Ok(other)) => {
                    tracing::debug!("piece stream from {peer} began with {other:?}");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!("piece stream from {peer}: {e}");
                    return;
                }
                Err(_) => return,
            };
            let _ = events.send(ev).await;
        });
    }
}

fn parse_addrs(a: &[PexAddr]) -> Vec<Multiaddr> {
    a.iter()
        .filter_map(|a| Multiaddr::try_from(a.0.clone()).ok())
        .take(MAX_PEX_ADDRS)
        .collect()
}

fn pex_addrs(addrs: &[Multiaddr]) -> Vec<PexAddr> {
    addrs
        .iter()
        .map(|a| a.to_vec())
        .filter(|b| b.len() <= MAX_PEX_ITEM)
        .take(MAX_PEX_ADDRS)
        .map(PexAddr)
        .collect()
}

/// Reads one frame of at most `limit` bytes (checked from the length prefix).
async fn read_frame<R: futures::AsyncRead + Unpin>(r: &mut R, limit: usize) -> io::Result<Msg> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes over the limit of {limit}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Msg::decode(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

async fn write_msg<W: futures::AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> io::Result<()> {
    w.write_all(&m.encode()).await
}

/// The largest frame a piece stream of `pieces` pieces may carry: a block, or the bitfield.
fn link_limit(pieces: u32) -> usize {
    MAX_SMALL_FRAME.max((pieces as usize).div_ceil(8) + 64)
}

async fn reader(
    r: ReadHalf<Stream>,
    content: ContentId,
    peer: PeerId,
    link: u64,
    pieces: u32,
    events: mpsc::Sender<Event>,
) {
    let mut r = BufReader::with_capacity(128 << 10, r);
    let limit = link_limit(pieces);
    let error = loop {
        match read_frame(&mut r, limit).await {
            Ok(msg) => {
                let ev = Event::Msg {
                    content,
                    peer,
                    link,
                    msg,
                };
                if events.send(ev).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break None,
            Err(e) => break Some(e.to_string()),
        }
    };
    let _ = events
        .send(Event::Closed {
            content,
            peer,
            link,
            error,
        })
        .await;
}

async fn writer(
    w: WriteHalf<Stream>,
    mut rx: mpsc::Receiver<Msg>,
    asked: Arc<AtomicBool>,
    writable: Arc<Writable>,
    key: (ContentId, PeerId),
) {
    let mut w = BufWriter::with_capacity(128 << 10, w);
    while let Some(m) = rx.recv().await {
        if write_msg(&mut w, &m).await.is_err() {
            return;
        }
        if rx.is_empty() && w.flush().await.is_err() {
            return;
        }
        if rx.len() <= LINK_QUEUE / 2 && !asked.swap(true, Ordering::AcqRel) {
            writable.set.lock().expect("writable lock").insert(key);
            writable.notify.notify_one();
        }
    }
    let _ = w.flush().await;
    let _ = w.close().await;
}

impl Service {
    /// Writes the content's record and manifest durably (records' invariant 2). A node
    /// without a data directory records nothing, by design.
    fn record(&self, c: &Content) -> io::Result<()> {
        let (Some(records), Some(path), Phase::Active(e)) = (&self.records, &c.out, &c.phase)
        else {
            return Ok(());
        };
        let rec = Record {
            path: path.clone(),
            origin: c.origin,
            super_seed: c.super_seed,
            tracker: c.tracker.clone(),
            stat: c.origin.then(|| e.store().last_stat()),
            providers: c.providers.clone(),
        };
        records.put(&c.id, &rec, e.manifest())
    }

    /// The content (other than `id`) whose path `path` is, if any (records' invariant 1).
    /// Paths are compared with their directories resolved (`..`, `.`, and symbolic links in
    /// the directories that exist), so one file reached two ways is one path.
    fn owner_of(&self, path: &Path, id: &ContentId) -> Option<ContentId> {
        self.claims(id).get(&resolved(path)).copied()
    }

    /// Every path claimed by a content other than `id`, resolved, with its owner: one pass
    /// over the contents (and one `canonicalize` each) for any number of lookups.
    fn claims(&self, id: &ContentId) -> HashMap<PathBuf, ContentId> {
        self.contents
            .values()
            .filter(|c| c.id != *id)
            .filter_map(|c| Some((resolved(c.out.as_deref()?), c.id)))
            .collect()
    }

    /// Refuses a path another content uses, or any existing file (a new download creates its
    /// file; it never takes over one it did not make) unless this content's own journal
    /// proves the file is its download (a crash between creating the file and recording it).
    fn check_free(&self, path: &Path, id: &ContentId) -> Result<(), ContentError> {
        if let Some(owner) = self.owner_of(path, id) {
            return Err(ContentError::PathInUse {
                path: path.to_owned(),
                owner,
            });
        }
        let ours = || {
            self.records
                .as_ref()
                .is_some_and(|r| journal_owns(&r.journal(id), path, id))
        };
        if std::fs::symlink_metadata(path).is_ok() && !ours() {
            return Err(ContentError::WouldOverwrite(path.to_owned()));
        }
        Ok(())
    }

    /// The default path of a download named `name`: `<data dir>/downloads/name`, or
    /// `name (1)`, `name (2)`, ... when that is taken by another content or another file.
    fn default_path(&self, id: &ContentId, name: &str) -> Result<PathBuf, String> {
        let dir = self
            .data_dir
            .as_ref()
            .ok_or("no output path and no data directory")?
            .join("downloads");
        let journal = self.records.as_ref().map(|r| r.journal(id));
        let claims = self.claims(id);
        for k in 0..MAX_NAME_TRIES {
            let p = dir.join(numbered(name, k));
            if claims.contains_key(&resolved(&p)) {
                continue;
            }
            match std::fs::symlink_metadata(&p) {
                Err(_) => return Ok(p),
                // Our own file from before a crash (the journal proves it): take it up again.
                Ok(_) if journal.as_ref().is_some_and(|j| journal_owns(j, &p, id)) => return Ok(p),
                Ok(_) => {}
            }
        }
        Err(format!(
            "no free file name for {name:?} in {} ({MAX_NAME_TRIES} tried)",
            dir.display()
        ))
    }

    fn ticket(&self, c: &Content) -> String {
        Ticket {
            content: c.id,
            providers: vec![Provider {
                peer: self.local.to_string(),
                addrs: self.listen.iter().map(|a| a.to_string()).collect(),
            }],
            tracker: c.tracker.clone(),
        }
        .encode()
    }

    fn info(&self, c: &Content) -> ContentInfo {
        let (state, p, name, error) = match &c.phase {
            Phase::FetchingManifest { .. } | Phase::Opening => {
                (State::FetchingManifest, Progress::default(), None, None)
            }
            Phase::Active(e) => (
                if e.is_complete() {
                    State::Seeding
                } else {
                    State::Downloading
                },
                e.progress(),
                Some(e.manifest().name.clone()),
                None,
            ),
            Phase::Failed(why) => (State::Failed, Progress::default(), None, Some(why.clone())),
        };
        let known = matches!(c.phase, Phase::Active(_));
        let stalled = c.stalled(Instant::now());
        ContentInfo {
            id: c.id.to_string(),
            name,
            path: c.out.clone(),
            state,
            size: known.then_some(p.size),
            pieces: known.then_some(p.pieces),
            pieces_have: p.pieces_have,
            bytes_have: p.bytes_have,
            downloaded: p.downloaded,
            uploaded: p.uploaded,
            wasted: p.wasted,
            down_rate: p.down_rate,
            up_rate: p.up_rate,
            peers: c.links.len(),
            candidates: c.candidates.len(),
            banned: c.banned.len(),
            bad_pieces: p.bad_pieces,
            super_seed: c.super_seed,
            tracker: c.tracker.clone(),
            ticket: self.ticket(c),
            error,
            stalled,
            tracker_error: c.tracker_error.clone(),
        }
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut events: mpsc::Receiver<Event>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let writable = self.writable.clone();
        let node = self.node.clone();
        loop {
            let wake = self.limit_wake;
            tokio::select! {
                r = requests.recv() => match r {
                    Some(Request::Shutdown(done)) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(r) => self.on_request(r),
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                ev = events.recv() => {
                    let Some(ev) = ev else { return };
                    let mut touched = HashSet::new();
                    self.on_event(ev, &mut touched);
                    // Take what else is waiting before refilling the writers: one refill per
                    // batch instead of one per message.
                    for _ in 0..256 {
                        match events.try_recv() {
                            Ok(ev) => self.on_event(ev, &mut touched),
                            Err(_) => break,
                        }
                    }
                    for id in touched {
                        self.pump(&id);
                    }
                }
                _ = writable.notify.notified() => {
                    let keys: Vec<(ContentId, PeerId)> =
                        writable.set.lock().expect("writable lock").drain().collect();
                    let mut ids = HashSet::new();
                    for (id, peer) in keys {
                        if let Some(l) = self.contents.get(&id).and_then(|c| c.links.get(&peer)) {
                            l.asked.store(false, Ordering::Release);
                        }
                        ids.insert(id);
                    }
                    for id in ids {
                        self.pump(&id);
                    }
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    // The upload cap allows the next block.
                    self.limit_wake = None;
                    let ids: Vec<ContentId> = self.contents.keys().copied().collect();
                    for id in ids {
                        self.pump(&id);
                    }
                }
                _ = tick.tick() => self.on_tick(),
                _ = node.closed() => {
                    self.shutdown().await;
                    return;
                }
            }
        }
    }

    async fn shutdown(&mut self) {
        let mut announces = vec![];
        for c in self.contents.values_mut() {
            if let Some(e) = c.engine() {
                let _ = e.flush();
            }
            c.links.clear();
        }
        for c in self.contents.values() {
            if let Some(t) = &c.tracker {
                announces.push(self.announce_request(c, t.clone(), Some(TrackerEvent::Stopped)));
            }
        }
        // Best effort: tell the trackers we left, without holding up the stop.
        let all = futures::future::join_all(announces.into_iter().map(|(url, req)| {
            let http = self.http.clone();
            async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), http.post(url).json(&req).send())
                        .await;
            }
        }));
        all.await;
    }

    fn on_request(&mut self, r: Request) {
        match r {
            Request::Share(req, reply) => self.share(req, reply),
            Request::Fetch(req, reply) => {
                let _ = reply.send(self.fetch(req));
            }
            Request::List(reply) => {
                let mut all: Vec<ContentInfo> =
                    self.contents.values().map(|c| self.info(c)).collect();
                all.sort_by(|a, b| a.id.cmp(&b.id));
                let _ = reply.send(all);
            }
            Request::Pieces(id, reply) => {
                let have = match self.contents.get(&id).map(|c| &c.phase) {
                    Some(Phase::Active(e)) => Some(e.store().have().clone()),
                    _ => None,
                };
                let _ = reply.send(have);
            }
            Request::Get(id, reply) => {
                let _ = reply.send(self.contents.get(&id).map(|c| self.info(c)));
            }
            Request::Remove(id, reply) => {
                let _ = reply.send(self.remove(id));
            }
            Request::Verify(id, reply) => self.start_check(id, Some(reply)),
            Request::Shutdown(_) => unreachable!("handled by the loop"),
        }
    }

    /// A path from the API: absolute, and one the file system can take (no NUL byte).
    fn check_path(p: &Path) -> Result<(), ContentError> {
        use std::os::unix::ffi::OsStrExt;
        if !p.is_absolute() {
            return Err(ContentError::RelativePath(p.to_owned()));
        }
        if p.as_os_str().as_bytes().contains(&0) {
            return Err(ContentError::BadPath(p.to_owned()));
        }
        Ok(())
    }

    fn check_tracker(t: &Option<String>) -> Result<(), ContentError> {
        match t {
            Some(u)
                if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() > 256 =>
            {
                Err(ContentError::BadTracker(u.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Hashes the file off the service task (a large file takes seconds), then adds it.
    fn share(
        &mut self,
        req: ShareRequest,
        reply: oneshot::Sender<Result<ContentInfo, ContentError>>,
    ) {
        let checked = (|| {
            Self::check_path(&req.path)?;
            Self::check_tracker(&req.tracker)?;
            if self.held() >= MAX_CONTENTS {
                return Err(ContentError::Full);
            }
            Ok(())
        })();
        if let Err(e) = checked {
            let _ = reply.send(Err(e));
            return;
        }
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let opened = PieceStore::share(&req.path, req.piece_size).map_err(ContentError::from);
            let _ = events.blocking_send(Event::Shared { req, opened, reply });
        });
    }

    /// Contents that count against [`MAX_CONTENTS`]: all but failed ones and fetches still
    /// waiting for their manifest.
    fn held(&self) -> usize {
        self.contents
            .values()
            .filter(|c| !c.is_pending() && !matches!(c.phase, Phase::Failed(_)))
            .count()
    }

    fn on_shared(
        &mut self,
        req: ShareRequest,
        opened: Result<PieceStore, ContentError>,
    ) -> Result<ContentInfo, ContentError> {
        let store = opened?;
        let id = store.manifest().id();
        // A failed content (a shared file that changed, a download that failed) is replaced.
        if self
            .contents
            .get(&id)
            .is_some_and(|c| !matches!(c.phase, Phase::Failed(_)))
        {
            return Err(ContentError::Exists(id));
        }
        if let Some(owner) = self.owner_of(&req.path, &id) {
            // Another content's file (a download of ours still being written, say).
            return Err(ContentError::PathInUse {
                path: req.path,
                owner,
            });
        }
        if self.held() >= MAX_CONTENTS {
            return Err(ContentError::Full);
        }
        let engine = Engine::new(
            store,
            EngineConfig {
                super_seed: req.super_seed,
                ..Default::default()
            },
            std::time::Instant::now(),
        );
        let mut c = Content::new(
            id,
            Phase::Active(Box::new(engine)),
            Some(req.path),
            req.super_seed,
            req.tracker,
            true,
        );
        // Acknowledged only once recorded: a share the node would forget at its next start
        // is refused now, with the reason.
        self.record(&c).map_err(|e| {
            tracing::error!("cannot record the share of {id}: {e}");
            ContentError::Persist(e.to_string())
        })?;
        c.recorded = self.records.is_some();
        let info = self.info(&c);
        self.contents.insert(id, c);
        tracing::info!("sharing {id}");
        Ok(info)
    }

    fn fetch(&mut self, req: FetchRequest) -> Result<ContentInfo, ContentError> {
        self.fetch_since(req, records::unix_now())
    }

    /// A fetch first asked for at `since` (Unix seconds; earlier than now for one taken up
    /// again after a restart).
    fn fetch_since(&mut self, req: FetchRequest, since: u64) -> Result<ContentInfo, ContentError> {
        let target = req.target.trim();
        let (id, providers, mut tracker) = if target.starts_with(meshwork_swarm::ticket::PREFIX) {
            let t = Ticket::decode(target)?;
            (t.content, t.providers, t.tracker)
        } else {
            let id: ContentId = target
                .parse()
                .map_err(|_| ContentError::BadTarget(target.chars().take(80).collect()))?;
            (id, vec![], None)
        };
        if req.tracker.is_some() {
            tracker = req.tracker;
        }
        Self::check_tracker(&tracker)?;
        if let Some(out) = &req.out {
            Self::check_path(out)?;
        } else if self.data_dir.is_none() {
            return Err(ContentError::NoOutput);
        }
        // A failed content is tried again, at the path it is recorded at.
        let mut retry: Option<PathBuf> = None;
        if let Some(c) = self.contents.get(&id) {
            if !matches!(c.phase, Phase::Failed(_)) {
                return Err(ContentError::Exists(id));
            }
            if c.recorded && !c.origin {
                retry = c.out.clone();
            }
            if let (Some(p), Some(o)) = (&retry, &req.out) {
                if normalize(p) != normalize(o) {
                    return Err(ContentError::RecordedAt(id, p.clone()));
                }
            }
        }
        if retry.is_none() {
            if let Some(out) = &req.out {
                self.check_free(out, &id)?;
            }
        }
        let pending = self.contents.values().filter(|c| c.is_pending()).count();
        if pending >= MAX_PENDING_FETCHES {
            return Err(ContentError::TooManyPending);
        }
        let manifest = retry
            .as_ref()
            .and_then(|_| self.records.as_ref()?.manifest(&id));
        let mut c = Content::new(
            id,
            Phase::FetchingManifest {
                asking: HashSet::new(),
            },
            retry.clone().or(req.out),
            false,
            tracker,
            false,
        );
        // `since` 0: a pending fetch recorded before deadlines were (its age is unknown, so
        // its deadline starts now).
        let since = if since == 0 {
            records::unix_now()
        } else {
            since
        };
        let age = records::unix_now().saturating_sub(since);
        c.since = Instant::now()
            .checked_sub(Duration::from_secs(age))
            .unwrap_or_else(Instant::now);
        c.providers = providers;
        c.add_providers(&self.local);
        if let (Some(records), None) = (&self.records, &manifest) {
            // Acknowledged only once on disk (records' invariant 2).
            let p = Pending {
                request: FetchRequest {
                    target: target.to_string(),
                    out: c.out.clone(),
                    tracker: c.tracker.clone(),
                },
                since,
            };
            records.put_pending(&id, &p).map_err(|e| {
                tracing::error!("cannot record the fetch of {id}: {e}");
                ContentError::Persist(e.to_string())
            })?;
        }
        c.recorded = manifest.is_some();
        let info = self.info(&c);
        self.contents.insert(id, c);
        tracing::info!("fetching {id}");
        match manifest {
            // No provider needs to answer first: the manifest is on disk.
            Some(m) => self.open_download(id, m),
            None => self.drive_manifest(&id),
        }
        Ok(info)
    }

    fn remove(&mut self, id: ContentId) -> Result<(), ContentError> {
        let Some(c) = self.contents.get(&id) else {
            return Err(ContentError::Unknown(id));
        };
        // An unfinished download is ours to delete, when its file is provably the one it
        // created (its open store, or its journal, says so). A shared file, a finished
        // download, or a file that is not the download's belongs to the user.
        let doomed = match (&c.out, c.origin, c.is_complete()) {
            (Some(path), false, false) => {
                let ours = match &c.phase {
                    Phase::Active(e) => e.store().owns_path(),
                    _ => self
                        .records
                        .as_ref()
                        .is_some_and(|r| journal_owns(&r.journal(&id), path, &id)),
                };
                ours.then(|| path.clone())
            }
            _ => None,
        };
        if let Some(r) = &self.records {
            // Said, not swallowed, and nothing else done: a record left behind would bring the
            // content back at the next start.
            r.remove(&id)
                .map_err(|e| ContentError::Persist(e.to_string()))?;
        }
        let mut c = self.contents.remove(&id).expect("looked up above");
        c.links.clear(); // the writers close their streams
        if let Some(t) = c.tracker.clone() {
            let (url, req) = self.announce_request(&c, t, Some(TrackerEvent::Stopped));
            let http = self.http.clone();
            tokio::spawn(async move {
                let _ = http.post(url).json(&req).send().await;
            });
        }
        if c.provided {
            let _ = self.node.try_send(Command::Provide(dht_key(&id), false));
        }
        drop(c);
        if let Some(path) = doomed {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    /// Asks candidates for the manifest, up to three at once.
    fn drive_manifest(&mut self, id: &ContentId) {
        let Some(c) = self.contents.get_mut(id) else {
            return;
        };
        let Phase::FetchingManifest { asking } = &mut c.phase else {
            return;
        };
        let now = Instant::now();
        let fresh: Vec<(PeerId, Vec<(Multiaddr, AddrSource)>)> = c
            .candidates
            .iter()
            .filter(|(p, cand)| !asking.contains(p) && cand.may_dial(now))
            .map(|(p, cand)| (*p, cand.addrs.clone()))
            .take(3usize.saturating_sub(asking.len()))
            .collect();
        for (peer, addrs) in fresh {
            asking.insert(peer);
            let mut control = self.control.clone();
            let node = self.node.clone();
            let events = self.events.clone();
            let protocol = self.protocol.clone();
            let content = *id;
            tokio::spawn(async move {
                let result = async {
                    let mut s = open_with(
                        &node,
                        &mut control,
                        protocol,
                        peer,
                        addrs,
                        &Msg::GetManifest(content),
                    )
                    .await?;
                    let m = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut s, MAX_FRAME))
                        .await
                        .map_err(|_| "timed out waiting for the manifest".to_string())?
                        .map_err(|e| e.to_string())?;
                    let _ = s.close().await;
                    match m {
                        Msg::Manifest(bytes) => {
                            Manifest::decode_verified(&bytes, &content).map_err(|e| e.to_string())
                        }
                        other => Err(format!("answered {other:?}")),
                    }
                }
                .await;
                let _ = events
                    .send(Event::Manifest {
                        content,
                        result: result.map_err(|e| (peer, e)),
                    })
                    .await;
            });
        }
    }

    fn on_manifest(&mut self, id: ContentId, result: Result<Manifest, (PeerId, String)>) {
        let Some(c) = self.contents.get_mut(&id) else {
            return;
        };
        let Phase::FetchingManifest { asking, .. } = &mut c.phase else {
            return;
        };
        let m = match result {
            Ok(m) => m,
            Err((peer, why)) => {
                tracing::debug!("manifest of {id} from {peer}: {why}");
                asking.remove(&peer);
                if let Some(cand) = c.candidates.get_mut(&peer) {
                    cand.failed(Instant::now());
                }
                self.drive_manifest(&id);
                return;
            }
        };
        let explicit = c.out.clone();
        let out = match explicit {
            Some(p) => Ok(p),
            None => self.default_path(&id, &m.name),
        };
        let out = out.and_then(|p| match self.owner_of(&p, &id) {
            Some(owner) => Err(ContentError::PathInUse { path: p, owner }.to_string()),
            None => Ok(p),
        });
        let Some(c) = self.contents.get_mut(&id) else {
            return;
        };
        match out {
            Ok(p) => {
                c.out = Some(p);
                self.open_download(id, m);
            }
            Err(why) => c.phase = Phase::Failed(why),
        }
    }

    /// Creates the download's file, or resumes it from its journal, on a blocking thread (a
    /// file that changed is hashed whole).
    fn open_download(&mut self, id: ContentId, m: Manifest) {
        let Some(c) = self.contents.get_mut(&id) else {
            return;
        };
        let Some(out) = c.out.clone() else {
            c.phase = Phase::Failed("no output path".into());
            return;
        };
        c.phase = Phase::Opening;
        let journal = self.records.as_ref().map(|r| r.journal(&id));
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                if let Some(parent) = out.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("{}: {e}", parent.display()))?;
                }
                match &journal {
                    Some(j) if j.exists() => PieceStore::resume(&out, j, m),
                    j => PieceStore::create(&out, j.as_deref(), m).map(|s| (s, Resumed::default())),
                }
                .map_err(|e| e.to_string())
            })();
            let _ = events.blocking_send(Event::DownloadReady {
                content: id,
                result,
            });
        });
    }

    fn on_download_ready(&mut self, id: ContentId, result: Result<(PieceStore, Resumed), String>) {
        let Some(c) = self.contents.get_mut(&id) else {
            // Removed while it opened: undo a file made for it.
            if let Ok((store, _)) = result {
                if store.have().count() == 0 && store.owns_path() {
                    let _ = std::fs::remove_file(store.path());
                }
                if let Some(r) = &self.records {
                    if let Err(e) = r.remove(&id) {
                        tracing::warn!("content {id}: {e}");
                    }
                }
            }
            return;
        };
        if !matches!(c.phase, Phase::Opening) {
            return;
        }
        let (store, resumed) = match result {
            Ok(r) => r,
            Err(why) => {
                tracing::warn!("content {id}: {why}");
                c.phase = Phase::Failed(why);
                return;
            }
        };
        if resumed.rechecked {
            tracing::warn!(
                "content {id}: {} changed since the node last saw it: re-hashed, {} of its \
                 pieces no longer verify and are fetched again",
                store.path().display(),
                resumed.dropped
            );
        }
        c.phase = Phase::Active(Box::new(Engine::new(
            store,
            EngineConfig::default(),
            std::time::Instant::now(),
        )));
        // Everyone tried for the manifest is worth a piece stream now.
        for cand in c.candidates.values_mut() {
            cand.forgive();
        }
        let c = &self.contents[&id];
        if let Err(e) = self.record(c) {
            let why = format!("cannot record the download: {e}");
            tracing::error!("content {id}: {why}");
            let c = self.contents.get_mut(&id).expect("present");
            c.phase = Phase::Failed(why);
            return;
        }
        let recorded = self.records.is_some();
        self.contents.get_mut(&id).expect("present").recorded = recorded;
        self.connect_more(&id);
    }

    fn on_event(&mut self, ev: Event, touched: &mut HashSet<ContentId>) {
        match ev {
            Event::Msg {
                content,
                peer,
                link,
                msg,
            } => {
                touched.insert(content);
                self.on_msg(content, peer, link, msg);
            }
            Event::Closed {
                content,
                peer,
                link,
                error,
            } => {
                let Some(c) = self.contents.get_mut(&content) else {
                    return;
                };
                if c.links.get(&peer).is_some_and(|l| l.id == link) {
                    match error {
                        Some(e) => tracing::debug!("piece stream with {peer} for {content}: {e}"),
                        None => tracing::debug!("piece stream with {peer} for {content} closed"),
                    }
                    c.links.remove(&peer);
                    if let Some(e) = c.engine() {
                        e.remove_peer(&peer);
                    }
                    touched.insert(content);
                }
            }
            Event::Incoming {
                peer,
                stream,
                content,
                pieces,
                listen,
            } => {
                touched.insert(content);
                self.on_stream(peer, stream, content, pieces, listen, false);
            }
            Event::ManifestWanted {
                peer,
                stream,
                content,
            } => {
                let bytes = match self.contents.get(&content).map(|c| &c.phase) {
                    Some(Phase::Active(e)) => Some(e.manifest().encode()),
                    _ => None,
                };
                let Some(bytes) = bytes else {
                    return; // unknown: the stream is dropped
                };
                tracing::debug!("sending the manifest of {content} to {peer}");
                tokio::spawn(async move {
                    let mut s = stream;
                    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                        write_msg(&mut s, &Msg::Manifest(bytes)).await?;
                        s.close().await
                    })
                    .await;
                });
            }
            Event::Opened {
                peer,
                stream,
                content,
                listen,
            } => {
                touched.insert(content);
                let Some(c) = self.contents.get_mut(&content) else {
                    return;
                };
                c.connecting.remove(&peer);
                if let Some(cand) = c.candidates.get_mut(&peer) {
                    cand.forgive();
                }
                // The handshake checked the peer's `Hello` against ours.
                let Some(pieces) = c.engine().map(|e| e.manifest().piece_count() as u32) else {
                    return;
                };
                self.on_stream(peer, stream, content, pieces, listen, true);
            }
            Event::OpenFailed {
                peer,
                content,
                error,
            } => {
                if let Some(c) = self.contents.get_mut(&content) {
                    tracing::debug!("no piece stream with {peer} for {content}: {error}");
                    c.connecting.remove(&peer);
                    if let Some(cand) = c.candidates.get_mut(&peer) {
                        cand.failed(Instant::now());
                    }
                }
            }
            Event::Manifest { content, result } => self.on_manifest(content, result),
            Event::Shared { req, opened, reply } => {
                let _ = reply.send(self.on_shared(req, opened));
            }
            Event::DownloadReady { content, result } => {
                touched.insert(content);
                self.on_download_ready(content, result);
            }
            Event::Checked {
                content,
                result,
                reply,
                attempt,
            } => {
                touched.insert(content);
                self.on_checked(content, result, reply, attempt);
            }
            Event::Candidates { content, peers } => {
                let local = self.local;
                let allow_private = self.allow_private;
                if let Some(c) = self.contents.get_mut(&content) {
                    for (p, addrs) in peers {
                        if p != local {
                            c.add_candidate(p, addrs, AddrSource::Network, allow_private);
                        }
                    }
                    self.drive_manifest(&content);
                    self.connect_more(&content);
                }
            }
            Event::Announced {
                content,
                answer,
                rate_limited,
            } => {
                if let Some(c) = self.contents.get_mut(&content) {
                    c.announcing = false;
                    // A failed tracker is asked again after the retry period; a rate-limited
                    // one soon, backing off (1 s, 2 s, 4 s... up to that period). Every wait is
                    // jittered so that announces due together do not stay together.
                    let retry = self.cfg.tracker_retry.max(Duration::from_secs(1));
                    c.rate_limited = if rate_limited { c.rate_limited + 1 } else { 0 };
                    let (every, error) = match answer {
                        Ok(every) => (every.clamp(MIN_ANNOUNCE, MAX_ANNOUNCE), None),
                        Err(why) if rate_limited => {
                            let n = (c.rate_limited - 1).min(16);
                            (
                                RATE_LIMITED_FIRST.saturating_mul(1 << n).min(retry),
                                Some(why),
                            )
                        }
                        Err(why) => (retry, Some(why)),
                    };
                    c.tracker_error = error;
                    c.next_announce = Instant::now() + jittered(every);
                }
            }
        }
    }

    /// Whether a new stream with `peer`, opened by `opener`, should replace an existing link
    /// (two peers that dial each other at once keep the stream the smaller id opened).
    fn keep_new(&self, existing: &Link, opener: PeerId, peer: PeerId) -> bool {
        let smaller = self.local.min(peer);
        existing.opener != smaller && opener == smaller
    }

    /// A piece stream whose handshake came in (`outbound`: we opened it and have its
    /// `Hello`; otherwise it is the peer's, and we answer with ours).
    fn on_stream(
        &mut self,
        peer: PeerId,
        stream: Stream,
        content: ContentId,
        pieces: u32,
        listen: Vec<Multiaddr>,
        outbound: bool,
    ) {
        let Some(c) = self.contents.get(&content) else {
            return;
        };
        let Phase::Active(e) = &c.phase else {
            return;
        };
        if c.is_banned(&peer) || pieces as usize != e.manifest().piece_count() {
            return;
        }
        let opener = if outbound { self.local } else { peer };
        if let Some(existing) = c.links.get(&peer) {
            if !self.keep_new(existing, opener, peer) {
                return;
            }
        }
        let hello = (!outbound).then(|| Msg::Hello {
            content,
            pieces,
            listen: pex_addrs(&self.listen),
        });
        self.start_link(content, peer, stream, hello, opener, listen);
    }

    fn start_link(
        &mut self,
        content: ContentId,
        peer: PeerId,
        stream: Stream,
        hello: Option<Msg>,
        opener: PeerId,
        listen: Vec<Multiaddr>,
    ) {
        let id = self.next_link;
        self.next_link += 1;
        let allow_private = self.allow_private;
        let Some(c) = self.contents.get_mut(&content) else {
            return;
        };
        let Phase::Active(e) = &mut c.phase else {
            return;
        };
        if c.links.remove(&peer).is_some() {
            e.remove_peer(&peer);
        }
        if !e.add_peer(peer, std::time::Instant::now()) {
            return; // full
        }
        let pieces = e.manifest().piece_count() as u32;
        let (r, w) = stream.split();
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        if let Some(h) = hello {
            let _ = tx.try_send(h);
        }
        let asked = Arc::new(AtomicBool::new(false));
        tokio::spawn(writer(
            w,
            rx,
            asked.clone(),
            self.writable.clone(),
            (content, peer),
        ));
        let reader = tokio::spawn(reader(r, content, peer, id, pieces, self.events.clone()));
        c.links.insert(
            peer,
            Link {
                id,
                tx,
                asked,
                reader: reader.abort_handle(),
                opener,
                last_pex_out: None,
                last_pex_in: None,
                pex_sent: HashSet::new(),
            },
        );
        if !listen.is_empty() {
            c.add_candidate(peer, listen, AddrSource::Network, allow_private);
        }
        tracing::debug!("piece stream with {peer} for {content}");
    }

    fn on_msg(&mut self, content: ContentId, peer: PeerId, link: u64, msg: Msg) {
        let local = self.local;
        let allow_private = self.allow_private;
        let Some(c) = self.contents.get_mut(&content) else {
            return;
        };
        let Some(l) = c.links.get_mut(&peer).filter(|l| l.id == link) else {
            return; // from a link that was replaced or closed
        };
        if let Msg::Peers(list) = msg {
            // Accepted at most once per interval; more is ignored (bounded work per peer).
            if l.last_pex_in
                .is_some_and(|t| t.elapsed() < PEX_INTERVAL / 2)
            {
                return;
            }
            l.last_pex_in = Some(Instant::now());
            for e in list {
                if let Ok(p) = PeerId::from_bytes(&e.peer) {
                    if p != local {
                        c.add_candidate(
                            p,
                            parse_addrs(&e.addrs),
                            AddrSource::Network,
                            allow_private,
                        );
                    }
                }
            }
            self.connect_more(&content);
            return;
        }
        if let Some(e) = c.engine() {
            e.handle(peer, msg, std::time::Instant::now());
        }
    }

    /// Moves engine output to the writers (while they have room) and acts on engine events.
    fn pump(&mut self, id: &ContentId) {
        let Some(c) = self.contents.get_mut(id) else {
            return;
        };
        let Phase::Active(e) = &mut c.phase else {
            return;
        };
        e.rechoke_if_due(std::time::Instant::now());
        let now = Instant::now();
        for (peer, l) in c.links.iter() {
            while l.tx.capacity() > 0 {
                // Out of upload budget: control messages only, data once the cap allows.
                let held_back = self
                    .limit
                    .as_mut()
                    .and_then(|l| (!l.may_send(now)).then(|| l.next_at(now)));
                let next = match held_back {
                    Some(wake) => {
                        self.limit_wake = match (self.limit_wake, wake) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                        e.poll_control(peer)
                    }
                    None => e.poll_send(peer),
                };
                let Some(mut m) = next else { break };
                if let Msg::Piece { data, .. } = &mut m {
                    if let Some(limit) = &mut self.limit {
                        limit.spend(data.len());
                    }
                    if self.cfg.corrupt_uploads {
                        data[0] ^= 0xff;
                    }
                }
                if l.tx.try_send(m).is_err() {
                    break;
                }
            }
        }
        let mut completed = false;
        while let Some(ev) = e.poll_event() {
            match ev {
                EngineEvent::Disconnect { peer, reason, ban } => {
                    tracing::info!("content {id}: closing {peer}: {reason}");
                    if let Some(l) = c.links.remove(&peer) {
                        l.reader.abort();
                    }
                    if ban {
                        if c.banned.len() >= MAX_BANNED {
                            c.banned.pop_front();
                        }
                        c.banned.push_back(peer);
                        c.candidates.remove(&peer);
                        let _ = self.node.try_send(Command::ContentOffence(peer, reason));
                    }
                }
                EngineEvent::Completed => completed = true,
                EngineEvent::StoreFailed(why) => {
                    tracing::error!("content {id}: {why}");
                    c.phase = Phase::Failed(why);
                    c.links.clear();
                    return;
                }
            }
        }
        if completed {
            tracing::info!("content {id}: complete and verified");
            c.next_announce = Instant::now();
        }
    }

    fn connect_more(&mut self, id: &ContentId) {
        let Some(c) = self.contents.get_mut(id) else {
            return;
        };
        let Phase::Active(e) = &c.phase else {
            return;
        };
        // A seed dials the leechers it learns of too (the tracker names only leechers to a
        // seed), but fewer.
        let want = if e.is_complete() {
            SEED_DIALS
        } else {
            WANT_PEERS
        };
        let now = Instant::now();
        let mut chosen = vec![];
        for (p, cand) in &c.candidates {
            if c.links.len() + c.connecting.len() + chosen.len() >= want
                || c.connecting.len() + chosen.len() >= MAX_CONNECTING
            {
                break;
            }
            if c.links.contains_key(p) || c.connecting.contains(p) || !cand.may_dial(now) {
                continue;
            }
            chosen.push((*p, cand.addrs.clone()));
        }
        let pieces = e.manifest().piece_count() as u32;
        for (peer, addrs) in chosen {
            c.connecting.insert(peer);
            let mut control = self.control.clone();
            let node = self.node.clone();
            let events = self.events.clone();
            let protocol = self.protocol.clone();
            let hello = Msg::Hello {
                content: *id,
                pieces,
                listen: pex_addrs(&self.listen),
            };
            let content = *id;
            tokio::spawn(async move {
                let result = async {
                    let mut s =
                        open_with(&node, &mut control, protocol, peer, addrs, &hello).await?;
                    let answer = tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        read_frame(&mut s, MAX_SMALL_FRAME),
                    )
                    .await
                    .map_err(|_| "timed out waiting for hello".to_string())?
                    .map_err(|e| e.to_string())?;
                    match answer {
                        Msg::Hello {
                            content: c,
                            pieces: n,
                            listen,
                        } if c == content && n == pieces => Ok((s, parse_addrs(&listen))),
                        other => Err(format!("answered {other:?}")),
                    }
                }
                .await;
                let ev = match result {
                    Ok((stream, listen)) => Event::Opened {
                        peer,
                        stream,
                        content,
                        listen,
                    },
                    Err(error) => Event::OpenFailed {
                        peer,
                        content,
                        error,
                    },
                };
                let _ = events.send(ev).await;
            });
        }
    }

    /// The signed announce of `c` to `tracker`, with our own listen addresses (less those
    /// nobody can dial: the tracker refuses an unspecified IP or port 0).
    fn announce_request(
        &self,
        c: &Content,
        tracker: String,
        event: Option<TrackerEvent>,
    ) -> (String, AnnounceRequest) {
        let left = match &c.phase {
            Phase::Active(e) => {
                let p = e.progress();
                p.size - p.bytes_have
            }
            _ => u64::MAX,
        };
        let url = format!("{}/api/v1/announce", tracker.trim_end_matches('/'));
        let time_ms = crate::unix_millis().max(self.last_announce_ms.get() + 1);
        self.last_announce_ms.set(time_ms);
        let mut req = AnnounceRequest {
            content: c.id.to_string(),
            peer: self.local.to_string(),
            addrs: self
                .listen
                .iter()
                .filter(|a| {
                    meshwork_proto::addr::check_dialable(a, Some(&self.local), true).is_ok()
                        && meshwork_proto::addr::ip_of(a).is_some_and(|ip| !ip.is_unspecified())
                })
                .map(|a| a.to_string())
                .take(meshwork_swarm::ticket::MAX_ADDRS)
                .collect(),
            event,
            left,
            numwant: None,
            time_ms,
            sig: String::new(),
        };
        if let Err(e) = req.sign(&self.keypair) {
            // Our own record always encodes; the tracker will say why if not.
            tracing::warn!("cannot sign the announce of {}: {e}", c.id);
        }
        (url, req)
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.expire(now);
        let ids: Vec<ContentId> = self.contents.keys().copied().collect();
        for id in ids {
            self.check_if_due(&id, now);
            // Engine timers.
            if let Some(e) = self.contents.get_mut(&id).and_then(|c| c.engine()) {
                e.tick(std::time::Instant::now());
            }
            self.announce_if_due(&id, now);
            self.dht(&id, now);
            self.pex(&id, now);
            self.drive_manifest(&id);
            self.connect_more(&id);
            self.pump(&id);
        }
    }

    /// Fails fetches whose manifest did not come in time (their slots free, their pending
    /// records go: not asked again at the next start), and forgets the oldest failed
    /// fetches beyond [`MAX_FAILED`].
    fn expire(&mut self, now: Instant) {
        let timeout = self.cfg.manifest_timeout;
        for c in self.contents.values_mut() {
            let Phase::FetchingManifest { asking } = &c.phase else {
                continue;
            };
            if now.duration_since(c.since) < timeout {
                continue;
            }
            let why = format!(
                "no provider sent the manifest within {} s ({} known, {} asking)",
                timeout.as_secs(),
                c.candidates.len(),
                asking.len()
            );
            tracing::warn!("content {}: {why}", c.id);
            c.phase = Phase::Failed(why);
            if let Some(r) = &self.records {
                if let Err(e) = r.remove_pending(&c.id) {
                    tracing::warn!("content {}: {e}", c.id);
                }
            }
        }
        let mut failed: Vec<(Instant, ContentId)> = self
            .contents
            .values()
            .filter(|c| matches!(c.phase, Phase::Failed(_)) && !c.recorded)
            .map(|c| (c.since, c.id))
            .collect();
        if failed.len() > MAX_FAILED {
            failed.sort();
            for (_, id) in &failed[..failed.len() - MAX_FAILED] {
                self.contents.remove(id);
            }
        }
    }

    /// Looks (two `stat`s) whether a complete content's file changed behind the node's back;
    /// if it did, hashes it again.
    fn check_if_due(&mut self, id: &ContentId, now: Instant) {
        let Some(c) = self.contents.get_mut(id) else {
            return;
        };
        if c.checking || now < c.next_check {
            return;
        }
        c.next_check = now + self.cfg.change_check;
        let Phase::Active(e) = &c.phase else {
            return;
        };
        if !e.is_complete() {
            return; // being written: its stat moves with every piece
        }
        match e.store().changed() {
            Ok(None) => {}
            Ok(Some(why)) => {
                tracing::warn!(
                    "content {id}: {}: {why}; checking it again",
                    e.store().path().display()
                );
                self.start_check(*id, None);
            }
            Err(err) => tracing::warn!("content {id}: {err}"),
        }
    }

    /// Hashes every held piece of a content's file on a blocking thread (a second
    /// descriptor; the store keeps serving meanwhile) and reports [`Event::Checked`].
    fn start_check(
        &mut self,
        id: ContentId,
        reply: Option<oneshot::Sender<Result<VerifyReport, ContentError>>>,
    ) {
        self.start_check_attempt(id, reply, 1)
    }

    fn start_check_attempt(
        &mut self,
        id: ContentId,
        reply: Option<oneshot::Sender<Result<VerifyReport, ContentError>>>,
        attempt: u32,
    ) {
        let Some(c) = self.contents.get_mut(&id) else {
            if let Some(r) = reply {
                let _ = r.send(Err(ContentError::Unknown(id)));
            }
            return;
        };
        let Phase::Active(e) = &c.phase else {
            if let Some(r) = reply {
                let _ = r.send(Err(ContentError::NotReady(id)));
            }
            return;
        };
        c.checking = true;
        let store = e.store();
        let (path, manifest, have, stat) = (
            store.path().to_owned(),
            store.manifest().clone(),
            store.have().clone(),
            store.last_stat(),
        );
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let result = meshwork_swarm::store::check_pieces(&path, &manifest, &have, &stat)
                .map_err(|e| e.to_string());
            let _ = events.blocking_send(Event::Checked {
                content: id,
                result,
                reply,
                attempt,
            });
        });
    }

    /// Acts on a re-check: a download forgets its bad pieces and fetches them again; an
    /// origin whose file no longer matches stops being served; a file that is gone or
    /// replaced fails the content.
    fn on_checked(
        &mut self,
        id: ContentId,
        result: Result<meshwork_swarm::store::Checked, String>,
        reply: Option<oneshot::Sender<Result<VerifyReport, ContentError>>>,
        attempt: u32,
    ) {
        let answer = |svc: &Service, checked: usize, bad: Vec<usize>| {
            let info = svc.contents.get(&id).map(|c| svc.info(c));
            match info {
                Some(info) => Ok(VerifyReport { checked, bad, info }),
                None => Err(ContentError::Unknown(id)),
            }
        };
        let Some(c) = self.contents.get_mut(&id) else {
            if let Some(r) = reply {
                let _ = r.send(Err(ContentError::Unknown(id)));
            }
            return;
        };
        c.checking = false;
        let (checked, bad, as_of) = match result {
            // Changed while hashed: what was read may predate the change. Hashed again (a
            // few times; after that the stat the result is true of is kept, and the next
            // periodic check sees the later change).
            Ok(r) if r.moved && attempt < MAX_CHECK_ATTEMPTS => {
                self.start_check_attempt(id, reply, attempt + 1);
                return;
            }
            Ok(r) => (r.checked, r.bad, r.before),
            Err(why) => {
                tracing::error!("content {id}: {why}");
                c.links.clear();
                c.phase = Phase::Failed(why);
                let out = answer(self, 0, vec![]);
                if let Some(r) = reply {
                    let _ = r.send(out);
                }
                return;
            }
        };
        let Phase::Active(_) = &c.phase else {
            if let Some(r) = reply {
                let _ = r.send(answer(self, checked, bad));
            }
            return;
        };
        if c.origin && !bad.is_empty() {
            let why = format!(
                "{} changed since it was shared ({} of its pieces differ): no longer served; \
                 share it again",
                c.out.as_deref().unwrap_or(Path::new("?")).display(),
                bad.len()
            );
            tracing::error!("content {id}: {why}");
            c.links.clear();
            c.phase = Phase::Failed(why);
        } else {
            // A fresh session over the pieces that still verify (peers reconnect and see
            // the new bitfield); the stat is taken anew, so an unchanged file is quiet again.
            let Phase::Active(e) = std::mem::replace(&mut c.phase, Phase::Opening) else {
                unreachable!("checked above")
            };
            c.links.clear();
            let mut store = e.into_store();
            let forgot = store.forget(&bad, as_of);
            let cfg = EngineConfig {
                super_seed: c.super_seed && bad.is_empty(),
                ..Default::default()
            };
            match forgot {
                Ok(()) => {
                    if !bad.is_empty() {
                        tracing::warn!(
                            "content {id}: {} pieces no longer verify; fetching them again",
                            bad.len()
                        );
                    }
                    c.phase =
                        Phase::Active(Box::new(Engine::new(store, cfg, std::time::Instant::now())));
                    for cand in c.candidates.values_mut() {
                        cand.forgive();
                    }
                }
                Err(e) => c.phase = Phase::Failed(e.to_string()),
            }
            let c = &self.contents[&id];
            if c.origin {
                if let Err(e) = self.record(c) {
                    tracing::warn!("content {id}: {e}");
                }
            }
            self.connect_more(&id);
        }
        if let Some(r) = reply {
            let _ = r.send(answer(self, checked, bad));
        }
    }

    fn announce_if_due(&mut self, id: &ContentId, now: Instant) {
        let Some(c) = self.contents.get(id) else {
            return;
        };
        let Some(tracker) = c.tracker.clone() else {
            return;
        };
        if c.announcing || now < c.next_announce || matches!(c.phase, Phase::Failed(_)) {
            return;
        }
        let complete = match &c.phase {
            Phase::Active(e) => e.is_complete(),
            _ => false,
        };
        let event = if complete && !c.announced_completed {
            Some(TrackerEvent::Completed)
        } else if !c.announced_started {
            Some(TrackerEvent::Started)
        } else {
            None
        };
        let (url, req) = self.announce_request(c, tracker, event);
        let c = self.contents.get_mut(id).expect("present");
        c.announcing = true;
        c.announced_started = true;
        if complete {
            c.announced_completed = true;
        }
        let http = self.http.clone();
        let events = self.events.clone();
        let slots = self.announce_slots.clone();
        let content = *id;
        tokio::spawn(async move {
            let mut rate_limited = false;
            let answer = async {
                let _slot = slots.acquire_owned().await.map_err(|e| e.to_string())?;
                let r = http
                    .post(&url)
                    .json(&req)
                    .send()
                    .await
                    .map_err(|e| error_chain(&e))?;
                if r.status().is_redirection() {
                    let to = r
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .map(|l| {
                            String::from_utf8_lossy(l.as_bytes())
                                .chars()
                                .take(200)
                                .collect()
                        })
                        .unwrap_or_else(|| "(no location)".to_string());
                    return Err(format!("the tracker redirected to {to:?} ({})", r.status()));
                }
                rate_limited = r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS;
                if !r.status().is_success() {
                    let status = r.status();
                    let text = read_text_capped(r, TRACKER_ERROR_MAX)
                        .await
                        .unwrap_or_else(|e| format!("({e})"));
                    return Err(format!("{status}: {}", text.trim()));
                }
                read_json_capped::<AnnounceResponse>(r, TRACKER_ANSWER_MAX)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            let answer = match answer {
                Ok(a) => {
                    let peers = a
                        .peers
                        .into_iter()
                        .filter_map(|p| {
                            let peer = p.peer.parse::<PeerId>().ok()?;
                            let addrs = p.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                            Some((peer, addrs))
                        })
                        .collect::<Vec<_>>();
                    let _ = events.send(Event::Candidates { content, peers }).await;
                    Ok(Duration::from_secs(a.interval_s))
                }
                Err(e) => {
                    tracing::warn!("announce of {content} to {url}: {e}");
                    Err(e)
                }
            };
            let _ = events
                .send(Event::Announced {
                    content,
                    answer,
                    rate_limited,
                })
                .await;
        });
    }

    /// Provider records: announce what we can serve; look providers up while peers are few.
    fn dht(&mut self, id: &ContentId, now: Instant) {
        let Some(c) = self.contents.get_mut(id) else {
            return;
        };
        if matches!(c.phase, Phase::Failed(_)) {
            return;
        }
        let active = matches!(c.phase, Phase::Active(_));
        if active && !c.provided {
            c.provided = self
                .node
                .try_send(Command::Provide(dht_key(id), true))
                .is_ok();
        }
        let complete = match &c.phase {
            Phase::Active(e) => e.is_complete(),
            _ => false,
        };
        if complete || now < c.next_dht || c.links.len() >= 5 {
            return;
        }
        c.next_dht = now + DHT_INTERVAL;
        let (tx, rx) = oneshot::channel();
        if self
            .node
            .try_send(Command::GetProviders(dht_key(id), tx))
            .is_err()
        {
            return;
        }
        let events = self.events.clone();
        let content = *id;
        tokio::spawn(async move {
            if let Ok(Ok(found)) = tokio::time::timeout(Duration::from_secs(60), rx).await {
                let peers = found.into_iter().map(|p| (p, vec![])).collect();
                let _ = events.send(Event::Candidates { content, peers }).await;
            }
        });
    }

    /// In-swarm peer exchange: each link hears of the peers it has not been told about yet.
    fn pex(&mut self, id: &ContentId, now: Instant) {
        let Some(c) = self.contents.get_mut(id) else {
            return;
        };
        // Our linked peers with an address to share.
        let entries: HashMap<PeerId, PexEntry> = c
            .links
            .keys()
            .filter_map(|p| {
                let addrs: Vec<Multiaddr> = c
                    .candidates
                    .get(p)?
                    .addrs
                    .iter()
                    .map(|(a, _)| a.clone())
                    .collect();
                let addrs = pex_addrs(&addrs);
                (!addrs.is_empty()).then(|| {
                    let entry = PexEntry {
                        peer: p.to_bytes(),
                        addrs,
                    };
                    (*p, entry)
                })
            })
            .collect();
        for (peer, l) in c.links.iter_mut() {
            // Forget peers that left: `pex_sent` stays within the current links (bounded),
            // and a peer that comes back is announced again.
            l.pex_sent.retain(|p| entries.contains_key(p));
            if l.last_pex_out
                .is_some_and(|t| now.duration_since(t) < PEX_INTERVAL)
            {
                continue;
            }
            let fresh: Vec<(PeerId, PexEntry)> = entries
                .iter()
                .filter(|(p, _)| *p != peer && !l.pex_sent.contains(p))
                .take(MAX_PEX_PEERS)
                .map(|(p, e)| (*p, e.clone()))
                .collect();
            if fresh.is_empty() {
                continue;
            }
            l.last_pex_out = Some(now);
            let (ids, list): (Vec<PeerId>, Vec<PexEntry>) = fresh.into_iter().unzip();
            // A full writer skips this round; the peers stay unsent for the next.
            if l.tx.try_send(Msg::Peers(list)).is_ok() {
                l.pex_sent.extend(ids);
            }
        }
    }
}

/// Reloads the contents recorded by an earlier run: an origin is seeded without hashing
/// while its file is as it was shared (else hashed, and refused if changed); a download
/// resumes from its journal, which must prove the file is its own, and is hashed again if
/// the file changed. Also returns the fetches that had no manifest yet, to be asked again.
/// Blocking (it may read whole files): the caller runs it on a blocking thread.
fn load_contents(records: &Records) -> io::Result<(Vec<Content>, Vec<Pending>)> {
    let (loaded, pending) = records.load(MAX_CONTENTS)?;
    let contents = loaded
        .into_iter()
        .map(
            |Loaded {
                 id,
                 record,
                 manifest,
             }| {
                let opened = if record.origin {
                    PieceStore::seed(&record.path, manifest, record.stat.as_ref()).map(
                        |(s, hashed)| {
                            if hashed {
                                tracing::info!(
                            "content {id}: {} changed since it was shared, or predates the \
                             record of its state: hashed again, unchanged",
                            record.path.display()
                        );
                            }
                            s
                        },
                    )
                } else if std::fs::symlink_metadata(&record.path).is_err() {
                    // Removed while the node was down: the user's say, not a reason to
                    // download it all again unasked (a fetch of it does).
                    Err(meshwork_swarm::store::StoreError::NotOurs {
                        path: record.path.clone(),
                        why: "it was removed; fetch the content again to download it anew, \
                              or remove it (meshwork content rm)"
                            .into(),
                    })
                } else {
                    PieceStore::resume(&record.path, &records.journal(&id), manifest).map(
                        |(s, r)| {
                            if r.rechecked {
                                tracing::warn!(
                            "content {id}: {} changed while the node was down (or it stopped \
                             between two flushes): re-hashed, {} pieces fetched again",
                            record.path.display(),
                            r.dropped
                        );
                            }
                            s
                        },
                    )
                };
                let phase = match opened {
                    Ok(store) => Phase::Active(Box::new(Engine::new(
                        store,
                        EngineConfig {
                            super_seed: record.super_seed,
                            ..Default::default()
                        },
                        std::time::Instant::now(),
                    ))),
                    Err(e) => {
                        tracing::error!("content {id}: {e}");
                        Phase::Failed(e.to_string())
                    }
                };
                let mut c = Content::new(
                    id,
                    phase,
                    Some(record.path),
                    record.super_seed,
                    record.tracker,
                    record.origin,
                );
                c.recorded = true;
                c.providers = record.providers;
                c
            },
        )
        .collect();
    Ok((contents, pending))
}

/// `path` with `.` and `..` resolved lexically (no file system access), for comparing the
/// paths contents claim.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// `path` with its directory canonicalized where it exists (symbolic links and `..`
/// resolved) and the last component kept as it is (it may not exist yet, and a link there is
/// refused anyway); lexically normalized otherwise.
fn resolved(path: &Path) -> PathBuf {
    let path = normalize(path);
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => match dir.canonicalize() {
            Ok(dir) => dir.join(name),
            Err(_) => path,
        },
        _ => path,
    }
}

/// `name` for `k = 0`, else `stem (k).ext`, shortened to the 255 bytes a file name may have.
fn numbered(name: &str, k: usize) -> String {
    if k == 0 {
        return name.to_owned();
    }
    // An extension is kept only while it leaves room for a stem (a "name" of dots and a long
    // tail is all stem).
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && name.len() - i <= 32 => name.split_at(i),
        _ => (name, ""),
    };
    let tag = format!(" ({k})");
    let room = meshwork_swarm::manifest::MAX_NAME_BYTES.saturating_sub(tag.len() + ext.len());
    let mut cut = stem.len().min(room);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tag}{ext}", &stem[..cut])
}

/// Asks the node for a connection to `peer` and waits until it is open.
async fn connect(
    node: &mpsc::Sender<Command>,
    peer: PeerId,
    addrs: Vec<(Multiaddr, AddrSource)>,
) -> Result<(), String> {
    let (tx, rx) = oneshot::channel();
    node.send(Command::ContentDial(peer, addrs, tx))
        .await
        .map_err(|_| "the node stopped".to_string())?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, rx)
        .await
        .map_err(|_| "timed out connecting".to_string())?
        .map_err(|_| "the node stopped".to_string())?
}

/// Connects to `peer`, opens a piece stream and sends `first` on it.
async fn open_with(
    node: &mpsc::Sender<Command>,
    control: &mut libp2p_stream::Control,
    protocol: StreamProtocol,
    peer: PeerId,
    addrs: Vec<(Multiaddr, AddrSource)>,
    first: &Msg,
) -> Result<Stream, String> {
    connect(node, peer, addrs).await?;
    let mut s = tokio::time::timeout(HANDSHAKE_TIMEOUT, control.open_stream(peer, protocol))
        .await
        .map_err(|_| "timed out opening a stream".to_string())?
        .map_err(|e| e.to_string())?;
    write_msg(&mut s, first).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    Ok(s)
}

fn dht_key(id: &ContentId) -> kad::RecordKey {
    kad::RecordKey::new(&id.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_candidate_waits_twice_as_long_after_each_failure_up_to_the_cap() {
        let mut c = Candidate {
            addrs: vec![],
            failed_at: None,
            failures: 0,
        };
        let t0 = Instant::now();
        assert!(c.may_dial(t0), "never failed");
        let mut waits = vec![];
        for _ in 0..8 {
            c.failed(t0);
            let wait = (0..=60u64)
                .map(Duration::from_secs)
                .find(|d| c.may_dial(t0 + *d))
                .expect("within a minute");
            waits.push(wait.as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        c.forgive();
        assert!(c.may_dial(t0));
        c.failed(t0);
        assert!(
            !c.may_dial(t0) && c.may_dial(t0 + REDIAL_FIRST),
            "back to the first wait"
        );
    }
}
