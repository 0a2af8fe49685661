//! The content tracker, sans-IO: who has which content, as its peers announce it.
//!
//! An announce names the content id, the peer id, its addresses, an event (`started`,
//! `completed`, `stopped`, or none for a periodic refresh) and the bytes it still lacks, and is
//! signed with the peer's key ([`meshwork_swarm::tracker_wire`]). The answer is a bounded
//! random sample of the other peers of that content: for a leecher, seeders first; for a
//! seeder, leechers only (a seeder needs nobody's pieces). Peers that stop announcing expire
//! after [`TrackerConfig::peer_ttl`].
//!
//! # What an announcer controls
//! - **Only its own record.** The record of (content, peer) changes only by an announce signed
//!   with that peer's key, made within [`TrackerConfig::max_skew`] of the tracker's clock and
//!   newer than the last one accepted for it (a replay, even after the record left by a
//!   `stopped`, by expiry or by eviction, is refused for as long as its time is acceptable
//!   at all: the last time of a record that left is kept as a tombstone).
//! - **Not where others dial.** As BitTorrent trackers do, the tracker hands out the IP the
//!   announce came from; of each claimed address it keeps only the transport and port
//!   (`/tcp/P` or `/udp/P/quic-v1`). Claims of another address family, DNS names and other
//!   transports are dropped; port 0 and unspecified, multicast or broadcast IPs are refused.
//! - **A bounded share.** Per source (an IPv4 address, an IPv6 /64: [`source_of`]): a token
//!   bucket of announces ([`IpLimits`]), caps on
//!   its records per content, its records in total and the contents it holds records in. An
//!   answer holds at most [`ANSWER_PER_IP`] peers of one IP, so no single IP can crowd the
//!   others out of an answer.
//!
//! # Invariants
//! - A request is validated whole before anything changes: a refused announce changes
//!   nothing (but spends its IP's token).
//! - At most `max_contents` contents, `max_peers_per_content` peers per content and
//!   `max_peers` in all. A full content makes room for a newcomer by evicting the stalest
//!   record of its most crowded source, if the newcomer's source, with it, still holds fewer;
//!   a full total (contents or records) does the same for a source below its fair share
//!   (the limit over the sources holding any) and fewer than the most crowded one; everyone
//!   else is refused. Every content listed has at least one peer.
//! - `expiry` holds exactly one key per record, `(seen, seq)`, equal to the record's own:
//!   expiry pops the oldest first and never scans, and the refusal path does no expiry at all
//!   beyond a bounded batch.
//! - Every map keyed by IPs or peers is bounded: `ips` by `max_ips`, `tombstones` by
//!   [`MAX_TOMBSTONES`], the rest by the record limits.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use meshwork_swarm::ContentId;
use multiaddr::{Multiaddr, Protocol};
use rand::seq::SliceRandom;
use rand::Rng;

/// Addresses per announce, at most.
pub const MAX_ADDRS: usize = 8;
/// Characters per address, at most.
pub const MAX_ADDR_LEN: usize = 256;
/// Characters of a peer id, at most.
pub const MAX_PEER_ID_LEN: usize = 128;
/// Peers in an answer when the announce does not say.
pub const DEFAULT_NUMWANT: usize = 30;
/// Peers in an answer, at most.
pub const MAX_NUMWANT: usize = 50;
/// Peers of one source IP in one answer, at most.
pub const ANSWER_PER_IP: usize = 2;
/// Records removed per announce (the rest wait for the next announce or the sweep).
pub const EXPIRE_BATCH: usize = 256;
/// Remembered announce times of records that left (stopped, expired or evicted: their time
/// refuses replays), at most.
pub const MAX_TOMBSTONES: usize = 100_000;
/// Records of the most crowded source looked at, oldest first, for a content it holds alone
/// when a full tracker makes room for a new content (bounded: the refusal path never sweeps).
pub const SOLO_SCAN: usize = 64;

/// Per source IP limits.
#[derive(Clone, Debug)]
pub struct IpLimits {
    /// Announces an IP may make at once (the token bucket's size).
    pub burst: u32,
    /// Announces per second an IP may make in the long run (the bucket's refill rate).
    pub per_second: u32,
    /// Records one IP may hold in one content (peers behind one NAT share an IP).
    pub records_per_content: usize,
    /// Records one IP may hold in all.
    pub records: usize,
    /// Contents one IP may hold records in.
    pub contents: usize,
    /// Source IPs tracked at once; beyond that a new IP is refused until an idle one is
    /// forgotten.
    pub max_ips: usize,
}

impl Default for IpLimits {
    fn default() -> Self {
        Self {
            burst: 200,
            per_second: 20,
            records_per_content: 8,
            records: 4096,
            contents: 2048,
            max_ips: 100_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// How often peers are asked to announce.
    pub interval: Duration,
    /// A peer not heard from for this long is dropped.
    pub peer_ttl: Duration,
    pub max_contents: usize,
    pub max_peers_per_content: usize,
    /// Records in all contents, at most.
    pub max_peers: usize,
    /// An announce whose time is further than this from the tracker's clock is refused.
    pub max_skew: Duration,
    pub ip: IpLimits,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            peer_ttl: Duration::from_secs(180),
            max_contents: 100_000,
            max_peers_per_content: 10_000,
            max_peers: 1_000_000,
            max_skew: Duration::from_secs(300),
            ip: IpLimits::default(),
        }
    }
}

pub use meshwork_swarm::tracker_wire::{
    AnnounceRequest, AnnounceResponse, Event, PeerAddrs, SignatureError, Stats,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    #[error("content {0:?} is not a content id (64 hexadecimal digits)")]
    Content(String),
    #[error("peer id {0:?} is empty, too long or not base58")]
    Peer(String),
    #[error("{0} addresses (at most {MAX_ADDRS})")]
    TooManyAddrs(usize),
    #[error("address {0:?} is not a multiaddr of at most {MAX_ADDR_LEN} characters")]
    Addr(String),
    #[error(
        "address {0:?} is not dialable (port 0, or an unspecified, multicast or broadcast IP)"
    )]
    Undialable(String),
    #[error("numwant {0} is above {MAX_NUMWANT}")]
    NumWant(usize),
    #[error("{0}")]
    Signature(#[from] SignatureError),
    #[error("the announce's time is {0} ms away from the tracker's clock (at most {1} s)")]
    Clock(u64, u64),
    #[error("the announce is not newer than the last accepted for this peer (a replay)")]
    Replay,
    #[error("too many announces from {0}: retry later")]
    RateLimited(IpAddr),
    #[error("{0} holds as many {1} as one address may")]
    IpLimit(IpAddr, &'static str),
    #[error("the tracker tracks as many client addresses as it may: retry later")]
    TooManyClients,
    #[error("the tracker holds its limit of {0} contents")]
    Full(usize),
    #[error("the tracker holds its limit of {0} peers")]
    FullPeers(usize),
}

/// A claimed address, reduced to what the tracker keeps of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp(u16),
    Quic(u16),
}

impl Transport {
    fn addr(self, ip: IpAddr) -> String {
        let ip = match ip {
            IpAddr::V4(v4) => format!("/ip4/{v4}"),
            IpAddr::V6(v6) => format!("/ip6/{v6}"),
        };
        match self {
            Transport::Tcp(p) => format!("{ip}/tcp/{p}"),
            Transport::Quic(p) => format!("{ip}/udp/{p}/quic-v1"),
        }
    }
}

type IndexKey = (Instant, u64);

struct Entry {
    /// Where the announce came from: the only IP handed out for it.
    ip: IpAddr,
    /// Its source as the per-IP limits count it ([`source_of`]).
    src: IpAddr,
    transports: Vec<Transport>,
    left: u64,
    /// Its key in [`Tracker::expiry`].
    key: IndexKey,
    /// The announce's own time, for replay refusal.
    time_ms: u64,
}

#[derive(Default)]
struct Swarm {
    peers: HashMap<String, Entry>,
    /// The records of each source ([`source_of`]) in this content, by their expiry key
    /// (oldest first); no empty set.
    per_ip: HashMap<IpAddr, BTreeSet<IndexKey>>,
    /// `(records, source)` for every source of `per_ip`: the most crowded last.
    crowd: BTreeSet<(usize, IpAddr)>,
    seeders: usize,
}

/// Moves `ip` from `old` to `new` in a `(count, ip)` ranking (a count of 0 is not ranked).
fn rerank(set: &mut BTreeSet<(usize, IpAddr)>, ip: IpAddr, old: usize, new: usize) {
    if old > 0 {
        set.remove(&(old, ip));
    }
    if new > 0 {
        set.insert((new, ip));
    }
}

/// The source an IP counts as for every per-IP limit: an IPv4 address as it is (users behind
/// one NAT share it anyway), an IPv6 address by its /64 (the prefix one host or one site is
/// given, RFC 6177: any of its 2^64 addresses is the same source).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

struct IpState {
    tokens: f64,
    refilled: Instant,
    /// Its records in all contents, by their expiry key (oldest first).
    records: BTreeSet<IndexKey>,
    /// Contents it holds records in.
    contents: usize,
    /// It is in [`Tracker::idle`].
    queued: bool,
}

struct Checked {
    content: ContentId,
    transports: Vec<Transport>,
    numwant: usize,
}

pub struct Tracker {
    cfg: TrackerConfig,
    contents: HashMap<ContentId, Swarm>,
    /// Every record by last announce, oldest first (see the invariants).
    expiry: BTreeMap<IndexKey, (ContentId, String)>,
    seq: u64,
    ips: HashMap<IpAddr, IpState>,
    /// IPs that may be forgotten once their bucket is full again and they hold no record.
    idle: VecDeque<(Instant, IpAddr)>,
    /// The last time of records that left (stopped, expired or evicted), so that none of
    /// their announces is replayed while its time is acceptable. Keyed by [`tomb_key`]: fixed-size entries in two flat tables, so that tombstones made
    /// while a flood expires hold no small allocations among the records' freed memory (which
    /// would pin those pages and keep the tracker at its peak size).
    tombstones: HashMap<TombKey, (u64, Instant)>,
    tomb_order: VecDeque<(Instant, TombKey)>,
    /// `(records, source)` of every source holding records: the most crowded last.
    crowd_records: BTreeSet<(usize, IpAddr)>,
    /// `(contents, source)` of every source holding records: the most crowded last.
    crowd_contents: BTreeSet<(usize, IpAddr)>,
    peers: usize,
    seeders: usize,
    announces: u64,
    rejected: u64,
    /// Records dropped since the last [`Tracker::take_freed`].
    freed: usize,
}

fn undialable_ip(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    }
}

/// What is kept of a claimed address (see the module docs): `Ok(None)` for one that is
/// dropped, an error for one that is refused.
fn transport_of(a: &str, source: IpAddr) -> Result<Option<Transport>, AnnounceError> {
    let bad = || AnnounceError::Addr(a.chars().take(300).collect());
    if a.len() > MAX_ADDR_LEN {
        return Err(bad());
    }
    let m: Multiaddr = a.parse().map_err(|_| bad())?;
    let mut it = m.iter();
    let ip = match it.next() {
        Some(Protocol::Ip4(ip)) => IpAddr::V4(ip),
        Some(Protocol::Ip6(ip)) => IpAddr::V6(ip),
        _ => return Ok(None), // DNS names and the like: the source IP stands in anyway
    };
    let undialable = || AnnounceError::Undialable(a.chars().take(300).collect());
    if undialable_ip(ip) {
        return Err(undialable());
    }
    if ip.to_canonical().is_ipv4() != source.is_ipv4() {
        return Ok(None);
    }
    let t = match (it.next(), it.next()) {
        (Some(Protocol::Tcp(p)), None | Some(Protocol::P2p(_))) => Transport::Tcp(p),
        (Some(Protocol::Udp(p)), Some(Protocol::QuicV1)) => Transport::Quic(p),
        _ => return Ok(None),
    };
    if matches!(t, Transport::Tcp(0) | Transport::Quic(0)) {
        return Err(undialable());
    }
    Ok(Some(t))
}

fn check(req: &AnnounceRequest, source: IpAddr) -> Result<Checked, AnnounceError> {
    let content = ContentId::from_str(&req.content)
        .map_err(|_| AnnounceError::Content(req.content.chars().take(80).collect()))?;
    let base58 = |c: char| c.is_ascii_alphanumeric() && !"0OIl".contains(c);
    if req.peer.is_empty() || req.peer.len() > MAX_PEER_ID_LEN || !req.peer.chars().all(base58) {
        return Err(AnnounceError::Peer(req.peer.chars().take(140).collect()));
    }
    if req.addrs.len() > MAX_ADDRS {
        return Err(AnnounceError::TooManyAddrs(req.addrs.len()));
    }
    let mut transports = Vec::with_capacity(req.addrs.len());
    for a in &req.addrs {
        if let Some(t) = transport_of(a, source)? {
            if !transports.contains(&t) {
                transports.push(t);
            }
        }
    }
    let numwant = req.numwant.unwrap_or(DEFAULT_NUMWANT);
    if numwant > MAX_NUMWANT {
        return Err(AnnounceError::NumWant(numwant));
    }
    Ok(Checked {
        content,
        transports,
        numwant,
    })
}

/// Gives back a map's spare room once it is mostly empty (a flood that expired leaves none).
/// A tombstone's key: the first 16 bytes of BLAKE3(content id, peer id). A collision would
/// need about 2^64 tries, and would only make one announce look like a replay.
type TombKey = [u8; 16];

fn tomb_key(content: &ContentId, peer: &str) -> TombKey {
    let mut h = blake3::Hasher::new();
    h.update(&content.0);
    h.update(peer.as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.finalize().as_bytes()[..16]);
    k
}

fn shrink<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
    if m.capacity() > 64 && m.len() * 4 < m.capacity() {
        m.shrink_to_fit();
    }
}

impl Tracker {
    pub fn new(cfg: TrackerConfig) -> Tracker {
        Tracker {
            cfg,
            contents: HashMap::new(),
            expiry: BTreeMap::new(),
            seq: 0,
            ips: HashMap::new(),
            idle: VecDeque::new(),
            tombstones: HashMap::new(),
            tomb_order: VecDeque::new(),
            crowd_records: BTreeSet::new(),
            crowd_contents: BTreeSet::new(),
            peers: 0,
            seeders: 0,
            announces: 0,
            rejected: 0,
            freed: 0,
        }
    }

    /// Handles an announce that came from `source`, at `now` (monotonic) and `unix_ms` (the
    /// wall clock, milliseconds since the Unix epoch, for the announce's signed time).
    ///
    /// # Errors
    /// Every [`AnnounceError`]; none changes a record.
    pub fn announce(
        &mut self,
        req: &AnnounceRequest,
        source: IpAddr,
        now: Instant,
        unix_ms: u64,
        rng: &mut impl Rng,
    ) -> Result<AnnounceResponse, AnnounceError> {
        let source = source.to_canonical();
        self.expire_some(now, EXPIRE_BATCH);
        // Every limit counts the source ([`source_of`]); answers hand out the IP itself.
        let r = self.try_announce(req, source, now, unix_ms, rng);
        match &r {
            Ok(_) => self.announces += 1,
            Err(_) => self.rejected += 1,
        }
        r
    }

    fn try_announce(
        &mut self,
        req: &AnnounceRequest,
        source: IpAddr,
        now: Instant,
        unix_ms: u64,
        rng: &mut impl Rng,
    ) -> Result<AnnounceResponse, AnnounceError> {
        // Cheapest first: the bucket, the shape, the clock, then the signature.
        let src = source_of(source);
        self.take_token(src, now)?;
        let c = check(req, source)?;
        let skew = req.time_ms.abs_diff(unix_ms);
        if skew > self.cfg.max_skew.as_millis() as u64 {
            return Err(AnnounceError::Clock(skew, self.cfg.max_skew.as_secs()));
        }
        req.verify()?;
        let key = (c.content, req.peer.clone());
        let last = self
            .contents
            .get(&c.content)
            .and_then(|s| s.peers.get(&req.peer))
            .map(|e| e.time_ms)
            .or_else(|| {
                self.tombstones
                    .get(&tomb_key(&key.0, &key.1))
                    .map(|(t, _)| *t)
            });
        if last.is_some_and(|t| req.time_ms <= t) {
            return Err(AnnounceError::Replay);
        }
        if req.event == Some(Event::Stopped) {
            if self.remove(&c.content, &req.peer).is_some() {
                self.tombstone(key, req.time_ms, now);
            }
            let (seeders, leechers) = self.counts(&c.content);
            return Ok(AnnounceResponse {
                interval_s: self.cfg.interval.as_secs(),
                seeders,
                leechers,
                peers: vec![],
            });
        }
        self.upsert(&c, req, source, src, now)?;
        Ok(self.answer(&c, req, rng))
    }

    fn counts(&self, id: &ContentId) -> (usize, usize) {
        self.contents
            .get(id)
            .map(|s| (s.seeders, s.peers.len() - s.seeders))
            .unwrap_or((0, 0))
    }

    /// Spends one of `ip`'s tokens.
    fn take_token(&mut self, ip: IpAddr, now: Instant) -> Result<(), AnnounceError> {
        self.forget_idle(now, 4);
        let lim = self.cfg.ip.clone();
        if !self.ips.contains_key(&ip) {
            if self.ips.len() >= lim.max_ips {
                self.forget_idle(now, 64);
                if self.ips.len() >= lim.max_ips {
                    return Err(AnnounceError::TooManyClients);
                }
            }
            self.ips.insert(
                ip,
                IpState {
                    tokens: lim.burst as f64,
                    refilled: now,
                    records: BTreeSet::new(),
                    contents: 0,
                    queued: true,
                },
            );
            self.idle.push_back((now, ip));
        }
        let s = self.ips.get_mut(&ip).expect("inserted above");
        let dt = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + dt * lim.per_second as f64).min(lim.burst as f64);
        s.refilled = now;
        if s.tokens < 1.0 {
            return Err(AnnounceError::RateLimited(ip));
        }
        s.tokens -= 1.0;
        Ok(())
    }

    /// Forgets up to `n` IPs that hold no record and whose bucket has refilled (the state of
    /// one is then the same as of a new IP).
    fn forget_idle(&mut self, now: Instant, n: usize) {
        let lim = &self.cfg.ip;
        let refill = Duration::from_secs_f64(lim.burst as f64 / lim.per_second.max(1) as f64);
        for _ in 0..n {
            let Some(&(t, ip)) = self.idle.front() else {
                break;
            };
            if now.saturating_duration_since(t) < refill {
                break;
            }
            self.idle.pop_front();
            let Some(s) = self.ips.get_mut(&ip) else {
                continue;
            };
            if !s.records.is_empty() {
                // Queued again when its last record goes.
                s.queued = false;
            } else if now.saturating_duration_since(s.refilled) >= refill {
                self.ips.remove(&ip);
            } else {
                self.idle.push_back((now, ip));
            }
        }
        shrink(&mut self.ips);
    }

    fn tombstone(&mut self, key: (ContentId, String), time_ms: u64, now: Instant) {
        let key = tomb_key(&key.0, &key.1);
        // Older tombstones are useless: their replays fail the clock check anyway.
        while let Some((t, ..)) = self.tomb_order.front() {
            if now.saturating_duration_since(*t) <= self.cfg.max_skew
                && self.tomb_order.len() < MAX_TOMBSTONES
            {
                break;
            }
            let (t, k) = self.tomb_order.pop_front().expect("front exists");
            // Only the newest stop of a record owns its tombstone.
            if self.tombstones.get(&k).is_some_and(|(_, at)| *at == t) {
                self.tombstones.remove(&k);
            }
        }
        self.tomb_order.push_back((now, key));
        self.tombstones.insert(key, (time_ms, now));
        shrink(&mut self.tombstones);
    }

    /// Adds or refreshes the record, within every limit. `ip` is where the announce came
    /// from, `src` the source it counts as ([`source_of`]).
    ///
    /// A full content, a full tracker (contents) or a full record total makes room for a
    /// newcomer from the most crowded source (of that content, of contents, of records), its
    /// stalest first, unless the newcomer's own source is that crowded: many sources filling
    /// a limit push out one another's records, never a long-standing one of a source that
    /// holds few. Finding the victim is O(log n) (the rankings), never a sweep.
    fn upsert(
        &mut self,
        c: &Checked,
        req: &AnnounceRequest,
        ip: IpAddr,
        src: IpAddr,
        now: Instant,
    ) -> Result<(), AnnounceError> {
        let lim = &self.cfg.ip;
        let swarm = self.contents.get(&c.content);
        let old_src = swarm.and_then(|s| s.peers.get(&req.peer)).map(|e| e.src);
        let ip_state = self.ips.get(&src).expect("a token was taken");
        let here = swarm
            .and_then(|s| s.per_ip.get(&src))
            .map_or(0, |m| m.len());
        if old_src != Some(src) {
            // A new record for this source (new, or moved from another source).
            if here >= lim.records_per_content {
                return Err(AnnounceError::IpLimit(src, "records in this content"));
            }
            if ip_state.records.len() >= lim.records {
                return Err(AnnounceError::IpLimit(src, "records"));
            }
            if here == 0 && ip_state.contents >= lim.contents {
                return Err(AnnounceError::IpLimit(src, "contents"));
            }
        }
        // The records to evict for this one (the checks end before any goes).
        let mut evict: Vec<IndexKey> = vec![];
        let full_content = swarm.is_some_and(|s| s.peers.len() >= self.cfg.max_peers_per_content);
        if swarm.is_none() && self.contents.len() >= self.cfg.max_contents {
            // A fair share of contents each for the sources holding any.
            let share = self.cfg.max_contents / self.crowd_contents.len().max(1);
            let refuse = Err(AnnounceError::Full(self.cfg.max_contents));
            let Some(&(most_n, most)) = self.crowd_contents.last() else {
                return refuse;
            };
            if ip_state.contents >= share || ip_state.contents + 1 >= most_n {
                return refuse;
            }
            // Its stalest content it holds alone (the others' records there stay): among
            // its oldest records only, so the work is bounded.
            let victim = self.ips[&most]
                .records
                .iter()
                .take(SOLO_SCAN)
                .map(|k| &self.expiry[k].0)
                .find(|id| self.contents[*id].per_ip.len() == 1);
            let Some(id) = victim else {
                return refuse;
            };
            evict.extend(self.contents[id].per_ip[&most].iter().copied());
        } else if old_src.is_none() && full_content {
            let s = swarm.expect("a full content exists");
            let &(most_n, most) = s.crowd.last().expect("a full content has peers");
            // Strictly fewer than the victim's source even with this one, or sources of one
            // record each would take turns pushing out one another (the oldest first).
            if here + 1 >= most_n {
                return Err(AnnounceError::IpLimit(src, "records in this full content"));
            }
            evict.push(
                *s.per_ip[&most]
                    .first()
                    .expect("ranked sources hold records"),
            );
        } else if old_src.is_none() && self.peers >= self.cfg.max_peers {
            let share = self.cfg.max_peers / self.crowd_records.len().max(1);
            let refuse = Err(AnnounceError::FullPeers(self.cfg.max_peers));
            let Some(&(most_n, most)) = self.crowd_records.last() else {
                return refuse;
            };
            let mine = ip_state.records.len();
            if mine >= share || mine + 1 >= most_n {
                return refuse;
            }
            evict.push(*self.ips[&most].records.first().expect("ranked"));
        }
        // Checked: from here on it succeeds.
        for k in evict {
            let (id, peer) = self.expiry[&k].clone();
            if let Some(e) = self.remove(&id, &peer) {
                // An evicted record's announces must not come back as replays either.
                self.tombstone((id, peer), e.time_ms, now);
            }
        }
        if old_src.is_some_and(|s| s != src) {
            self.remove(&c.content, &req.peer);
        }
        self.seq += 1;
        let key = (now, self.seq);
        let seeder = req.left == 0;
        let swarm = self.contents.entry(c.content).or_default();
        let st = self.ips.get_mut(&src).expect("a token was taken");
        match swarm.peers.get_mut(&req.peer) {
            Some(e) => {
                self.expiry.remove(&e.key);
                let mine = swarm.per_ip.get_mut(&src).expect("the record is counted");
                mine.remove(&e.key);
                mine.insert(key);
                st.records.remove(&e.key);
                st.records.insert(key);
                if (e.left == 0) != seeder {
                    if seeder {
                        swarm.seeders += 1;
                        self.seeders += 1;
                    } else {
                        swarm.seeders -= 1;
                        self.seeders -= 1;
                    }
                }
                e.ip = ip;
                e.transports = c.transports.clone();
                e.left = req.left;
                e.key = key;
                e.time_ms = req.time_ms;
            }
            None => {
                swarm.peers.insert(
                    req.peer.clone(),
                    Entry {
                        ip,
                        src,
                        transports: c.transports.clone(),
                        left: req.left,
                        key,
                        time_ms: req.time_ms,
                    },
                );
                let mine = swarm.per_ip.entry(src).or_default();
                mine.insert(key);
                let n = mine.len();
                rerank(&mut swarm.crowd, src, n - 1, n);
                st.records.insert(key);
                let total = st.records.len();
                rerank(&mut self.crowd_records, src, total - 1, total);
                if n == 1 {
                    st.contents += 1;
                    rerank(&mut self.crowd_contents, src, st.contents - 1, st.contents);
                }
                self.peers += 1;
                if seeder {
                    swarm.seeders += 1;
                    self.seeders += 1;
                }
            }
        }
        self.expiry.insert(key, (c.content, req.peer.clone()));
        Ok(())
    }

    /// Removes a record and everything that counts it; the content too if it was the last.
    fn remove(&mut self, id: &ContentId, peer: &str) -> Option<Entry> {
        let swarm = self.contents.get_mut(id)?;
        let e = swarm.peers.remove(peer)?;
        self.expiry.remove(&e.key);
        self.peers -= 1;
        self.freed += 1;
        if e.left == 0 {
            swarm.seeders -= 1;
            self.seeders -= 1;
        }
        let mut left_content = false;
        if let Some(mine) = swarm.per_ip.get_mut(&e.src) {
            mine.remove(&e.key);
            let n = mine.len();
            rerank(&mut swarm.crowd, e.src, n + 1, n);
            if n == 0 {
                swarm.per_ip.remove(&e.src);
                left_content = true;
            }
        }
        if swarm.peers.is_empty() {
            self.contents.remove(id);
            shrink(&mut self.contents);
        } else {
            shrink(&mut swarm.peers);
            shrink(&mut swarm.per_ip);
        }
        if let Some(s) = self.ips.get_mut(&e.src) {
            s.records.remove(&e.key);
            let total = s.records.len();
            rerank(&mut self.crowd_records, e.src, total + 1, total);
            if left_content {
                s.contents -= 1;
                rerank(&mut self.crowd_contents, e.src, s.contents + 1, s.contents);
            }
            if s.records.is_empty() && !s.queued {
                s.queued = true;
                self.idle.push_back((e.key.0, e.src));
            }
        }
        Some(e)
    }

    /// A sample of the other peers: seeders first for a leecher, leechers only for a seeder,
    /// at most [`ANSWER_PER_IP`] per source IP, none without an address.
    fn answer(&self, c: &Checked, req: &AnnounceRequest, rng: &mut impl Rng) -> AnnounceResponse {
        let swarm = &self.contents[&c.content];
        let mut others: Vec<(&String, &Entry)> = swarm
            .peers
            .iter()
            .filter(|(p, e)| **p != req.peer && !e.transports.is_empty())
            .filter(|(_, e)| req.left > 0 || e.left > 0)
            .collect();
        others.shuffle(rng);
        others.sort_by_key(|(_, e)| e.left > 0); // stable: still shuffled within each kind
        let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
        let mut peers = Vec::with_capacity(c.numwant);
        for (p, e) in others {
            if peers.len() >= c.numwant {
                break;
            }
            let n = per_ip.entry(e.src).or_default();
            if *n >= ANSWER_PER_IP {
                continue;
            }
            *n += 1;
            peers.push(PeerAddrs {
                peer: p.clone(),
                addrs: e.transports.iter().map(|t| t.addr(e.ip)).collect(),
                seeder: e.left == 0,
            });
        }
        AnnounceResponse {
            interval_s: self.cfg.interval.as_secs(),
            seeders: swarm.seeders,
            leechers: swarm.peers.len() - swarm.seeders,
            peers,
        }
    }

    /// Counts a request from `source` refused before it could be parsed (bad JSON at the HTTP
    /// layer); it spends one of the IP's tokens like any announce.
    pub fn note_rejected(&mut self, source: IpAddr, now: Instant) {
        let _ = self.take_token(source_of(source), now);
        self.rejected += 1;
    }

    /// Drops up to `max` records not heard from within the TTL, oldest first, and contents
    /// left empty. Returns how many it dropped (fewer than `max`: none is left to expire).
    pub fn expire_some(&mut self, now: Instant, max: usize) -> usize {
        let ttl = self.cfg.peer_ttl;
        let mut n = 0;
        while n < max {
            let Some(((seen, _), _)) = self.expiry.first_key_value() else {
                break;
            };
            if now.saturating_duration_since(*seen) < ttl {
                break;
            }
            let (_, (id, peer)) = self.expiry.pop_first().expect("first exists");
            if let Some(e) = self.remove(&id, &peer) {
                // Its last time still refuses a replay while that time is within the skew
                // window (longer than the TTL).
                self.tombstone((id, peer), e.time_ms, now);
            }
            n += 1;
        }
        n
    }

    /// Drops every record not heard from within the TTL (in one go: for tests and callers
    /// without a lock to release; the HTTP sweeper uses [`Tracker::expire_some`]).
    pub fn expire(&mut self, now: Instant) {
        while self.expire_some(now, usize::MAX) > 0 {}
    }

    /// Records dropped since the last call (so a caller can return memory to the system
    /// after a large expiry).
    pub fn take_freed(&mut self) -> usize {
        std::mem::take(&mut self.freed)
    }

    pub fn stats(&self) -> Stats {
        Stats {
            contents: self.contents.len(),
            peers: self.peers,
            seeders: self.seeders,
            leechers: self.peers - self.seeders,
            announces: self.announces,
            rejected: self.rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p_identity::Keypair;

    const ID: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    /// The wall clock of every test, in ms.
    const T0: u64 = 1_800_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An announce of `content` by `key`, signed, made at `t` (ms).
    fn signed(
        key: &Keypair,
        content: &str,
        left: u64,
        event: Option<Event>,
        t: u64,
    ) -> AnnounceRequest {
        let mut r = AnnounceRequest {
            content: content.into(),
            peer: key.public().to_peer_id().to_string(),
            addrs: vec!["/ip4/10.0.0.1/tcp/4001".into()],
            event,
            left,
            numwant: None,
            time_ms: t,
            sig: String::new(),
        };
        r.sign(key).unwrap();
        r
    }

    /// `q` as it reaches the tracker from `src` at `now` (the wall clock at [`T0`]).
    fn send(
        t: &mut Tracker,
        q: &AnnounceRequest,
        src: &str,
        now: Instant,
    ) -> Result<AnnounceResponse, AnnounceError> {
        send_at(t, q, src, now, T0)
    }

    fn keys(n: usize) -> Vec<Keypair> {
        (0..n).map(|_| Keypair::generate_ed25519()).collect()
    }

    /// A tracker whose per-IP limits do not get in the way.
    fn open() -> Tracker {
        Tracker::new(TrackerConfig {
            ip: IpLimits {
                burst: 1_000_000,
                per_second: 1_000_000,
                records_per_content: 100_000,
                records: 1_000_000,
                contents: 1_000_000,
                max_ips: 100_000,
            },
            ..TrackerConfig::default()
        })
    }

    #[test]
    fn leechers_get_seeders_first_and_seeders_get_leechers_only() {
        let mut t = open();
        let now = Instant::now();
        let ks = keys(41);
        for (i, k) in ks[..40].iter().enumerate() {
            let left = if i < 5 { 0 } else { 100 };
            let q = signed(k, ID, left, Some(Event::Started), T0);
            send(&mut t, &q, &format!("127.0.1.{i}"), now).unwrap();
        }
        let mut q = signed(&ks[40], ID, 100, Some(Event::Started), T0);
        q.numwant = Some(10);
        let a = send(&mut t, &q, "127.0.2.1", now).unwrap();
        assert_eq!(a.peers.len(), 10);
        assert!(a.peers[..5].iter().all(|p| p.seeder), "seeders first");
        assert_eq!((a.seeders, a.leechers), (5, 36));
        let me = ks[0].public().to_peer_id().to_string();
        let s = send(
            &mut t,
            &signed(&ks[0], ID, 0, None, T0 + 1),
            "127.0.1.0",
            now,
        )
        .unwrap();
        assert!(s.peers.iter().all(|p| !p.seeder));
        assert!(s.peers.len() <= DEFAULT_NUMWANT);
        assert!(!s.peers.iter().any(|p| p.peer == me), "never yourself");
    }

    #[test]
    fn answers_name_the_source_ip_not_the_claimed_one() {
        let mut t = open();
        let now = Instant::now();
        let (seed, leech) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let mut q = signed(&seed, ID, 0, Some(Event::Started), T0);
        q.addrs = vec![
            "/ip4/127.0.0.99/tcp/9999".into(),
            format!("/ip4/127.0.0.99/udp/7000/quic-v1/p2p/{}", q.peer),
            "/dns4/victim.example/tcp/80".into(),
            "/ip6/::1/tcp/81".into(),
            "/ip4/127.0.0.99/tcp/9999/ws".into(),
        ];
        q.sign(&seed).unwrap();
        send(&mut t, &q, "127.0.0.7", now).unwrap();
        let q = signed(&leech, ID, 9, Some(Event::Started), T0);
        let a = send(&mut t, &q, "127.0.0.8", now).unwrap();
        assert_eq!(a.peers.len(), 1);
        assert_eq!(
            a.peers[0].addrs,
            vec!["/ip4/127.0.0.7/tcp/9999", "/ip4/127.0.0.7/udp/7000/quic-v1"],
            "the source IP with the claimed ports; DNS, IPv6 and /ws claims dropped"
        );
        // Announced over IPv6: only the IPv6 claims count.
        let mut q = signed(&leech, ID, 9, None, T0 + 1);
        q.addrs = vec!["/ip6/2001:db8::1/tcp/5".into(), "/ip4/1.2.3.4/tcp/6".into()];
        q.sign(&leech).unwrap();
        send(&mut t, &q, "::1", now).unwrap();
        let a = send(
            &mut t,
            &signed(&seed, ID, 0, None, T0 + 1),
            "127.0.0.7",
            now,
        )
        .unwrap();
        assert_eq!(a.peers[0].addrs, vec!["/ip6/::1/tcp/5"]);
    }

    #[test]
    fn undialable_claims_are_refused() {
        let mut t = open();
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        for bad in [
            "/ip4/1.2.3.4/tcp/0",
            "/ip4/0.0.0.0/tcp/4001",
            "/ip4/224.0.0.1/tcp/4001",
            "/ip4/255.255.255.255/tcp/4001",
            "/ip6/::/tcp/4001",
            "/ip6/ff02::1/tcp/4001",
            "/ip4/1.2.3.4/udp/0/quic-v1",
        ] {
            let mut q = signed(&k, ID, 0, None, T0);
            q.addrs = vec![bad.into()];
            q.sign(&k).unwrap();
            let r = send(&mut t, &q, "127.0.0.1", now);
            assert!(matches!(r, Err(AnnounceError::Undialable(_))), "{bad}");
        }
        assert_eq!(t.stats().peers, 0);
    }

    #[test]
    fn only_the_key_holder_changes_a_record_and_replays_are_refused() {
        let mut t = open();
        let now = Instant::now();
        let [seed, mallory, leech] = [(); 3].map(|_| Keypair::generate_ed25519());
        let started = signed(&seed, ID, 0, Some(Event::Started), T0);
        send(&mut t, &started, "127.0.0.1", now).unwrap();
        // A stop under the seeder's id, signed with another key.
        let mut forged = signed(&mallory, ID, 0, Some(Event::Stopped), T0 + 5);
        forged.peer = started.peer.clone();
        assert!(matches!(
            send(&mut t, &forged, "127.0.0.2", now),
            Err(AnnounceError::Signature(SignatureError::Invalid(_)))
        ));
        let mut unsigned = started.clone();
        unsigned.time_ms += 1;
        unsigned.sig = "00".repeat(64);
        assert!(send(&mut t, &unsigned, "127.0.0.2", now).is_err());
        let replayed = send(&mut t, &started, "127.0.0.2", now);
        assert_eq!(replayed.unwrap_err(), AnnounceError::Replay);
        let a = send(&mut t, &signed(&leech, ID, 1, None, T0), "127.0.0.3", now).unwrap();
        assert_eq!(
            a.peers[0].addrs,
            vec!["/ip4/127.0.0.1/tcp/4001"],
            "not moved"
        );
        // Its own stop works once; the stop replayed later is refused, and so is the old
        // `started` (the record is gone, its tombstone stays).
        let stop = signed(&seed, ID, 0, Some(Event::Stopped), T0 + 10);
        send(&mut t, &stop, "127.0.0.1", now).unwrap();
        assert_eq!(t.stats().seeders, 0);
        for old in [&stop, &started] {
            let r = send(&mut t, old, "127.0.0.1", now);
            assert_eq!(r.unwrap_err(), AnnounceError::Replay);
        }
        // Too far from the clock.
        let late = signed(&seed, ID, 0, None, T0 + 301_000);
        let r = send(&mut t, &late, "127.0.0.1", now);
        assert!(matches!(r, Err(AnnounceError::Clock(..))), "{r:?}");
        send(
            &mut t,
            &signed(&seed, ID, 0, None, T0 + 299_000),
            "127.0.0.1",
            now,
        )
        .unwrap();
    }

    /// 3 000 fake seeders with their own keys from one IP: the real seeder is in every answer,
    /// with the per-IP caps out of the way (the sampling alone does it) and with the defaults
    /// (the caps refuse almost all of the flood).
    #[test]
    fn a_flood_from_one_ip_never_hides_the_real_seeder() {
        let flood = keys(3000);
        let real = Keypair::generate_ed25519();
        let real_id = real.public().to_peer_id().to_string();
        for (mut t, caps) in [
            (open(), false),
            (Tracker::new(TrackerConfig::default()), true),
        ] {
            let now = Instant::now();
            let q = signed(&real, ID, 0, Some(Event::Started), T0);
            send(&mut t, &q, "127.0.0.1", now).unwrap();
            let refused = flood
                .iter()
                .map(|k| signed(k, ID, 0, Some(Event::Started), T0))
                .filter(|q| send(&mut t, q, "127.0.0.2", now).is_err())
                .count();
            for i in 0..200u64 {
                let leech = signed(&Keypair::generate_ed25519(), ID, 7, None, T0 + i);
                let src = format!("127.0.3.{}", i + 1);
                let a = send(&mut t, &leech, &src, now).unwrap();
                assert!(
                    a.peers.iter().any(|p| p.peer == real_id),
                    "answer {i}: {a:?}"
                );
                let flooders = a.peers.iter().filter(|p| p.addrs[0].contains("127.0.0.2/"));
                assert!(flooders.count() <= ANSWER_PER_IP);
            }
            if caps {
                assert_eq!(refused, 3000 - IpLimits::default().records_per_content);
            } else {
                assert_eq!(refused, 0);
            }
        }
    }

    #[test]
    fn per_ip_rate_limit_and_caps_hold() {
        let mut t = Tracker::new(TrackerConfig {
            ip: IpLimits {
                burst: 5,
                per_second: 1,
                records_per_content: 2,
                records: 3,
                contents: 2,
                max_ips: 2,
            },
            ..TrackerConfig::default()
        });
        let now = Instant::now();
        let ks = keys(6);
        let content = |i: u8| format!("{i:02x}").repeat(32);
        let mut go = |k: usize, c: u8, t_ms: u64, src: &str, at: Instant| {
            send(&mut t, &signed(&ks[k], &content(c), 0, None, t_ms), src, at)
        };
        let a = "127.0.0.5";
        go(0, 1, T0, a, now).unwrap();
        go(1, 1, T0, a, now).unwrap();
        let full = AnnounceError::IpLimit(ip(a), "records in this content");
        assert_eq!(go(2, 1, T0, a, now).unwrap_err(), full);
        go(2, 2, T0, a, now).unwrap();
        let records = AnnounceError::IpLimit(ip(a), "records");
        assert_eq!(go(3, 3, T0, a, now).unwrap_err(), records);
        // Five tokens spent: the sixth is refused, one comes back in a second.
        assert_eq!(
            go(3, 3, T0, a, now).unwrap_err(),
            AnnounceError::RateLimited(ip(a))
        );
        go(0, 1, T0 + 1, a, now + Duration::from_secs(1)).unwrap();
        // A third IP while two are tracked and busy.
        go(4, 4, T0, "127.0.0.6", now).unwrap();
        let third = go(5, 4, T0, "127.0.0.7", now);
        assert_eq!(third.unwrap_err(), AnnounceError::TooManyClients);
        assert_eq!(t.stats().peers, 4);
    }

    #[test]
    fn contents_per_ip_are_capped() {
        let mut t = Tracker::new(TrackerConfig {
            ip: IpLimits {
                contents: 2,
                ..IpLimits::default()
            },
            ..TrackerConfig::default()
        });
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        for c in ["22", "33"] {
            send(
                &mut t,
                &signed(&k, &c.repeat(32), 0, None, T0),
                "127.0.0.5",
                now,
            )
            .unwrap();
        }
        let third = send(
            &mut t,
            &signed(&k, &"44".repeat(32), 0, None, T0),
            "127.0.0.5",
            now,
        );
        assert_eq!(
            third.unwrap_err(),
            AnnounceError::IpLimit(ip("127.0.0.5"), "contents")
        );
    }

    #[test]
    fn stopped_and_stale_peers_leave() {
        let mut t = open();
        let now = Instant::now();
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        send(
            &mut t,
            &signed(&a, ID, 0, Some(Event::Started), T0),
            "127.0.0.1",
            now,
        )
        .unwrap();
        send(
            &mut t,
            &signed(&b, ID, 10, Some(Event::Started), T0),
            "127.0.0.2",
            now,
        )
        .unwrap();
        let stop = signed(&b, ID, 10, Some(Event::Stopped), T0 + 1);
        send(&mut t, &stop, "127.0.0.2", now).unwrap();
        assert_eq!(t.stats().peers, 1);
        // A record lives three announce intervals: still there 1 ms before, gone 1 ms after.
        let ttl = 3 * t.cfg.interval;
        assert_eq!(t.cfg.peer_ttl, ttl);
        t.expire(now + ttl - Duration::from_millis(1));
        assert_eq!(t.stats().peers, 1, "not stale before three intervals");
        t.expire(now + ttl + Duration::from_millis(1));
        assert_eq!(
            t.stats().contents,
            0,
            "A expired, and the empty content with it"
        );
        assert!(t.expiry.is_empty() && t.contents.is_empty());
    }

    #[test]
    fn malformed_announces_change_nothing() {
        let mut t = open();
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        send(
            &mut t,
            &signed(&k, ID, 0, Some(Event::Started), T0),
            "127.0.0.1",
            now,
        )
        .unwrap();
        let before = t.stats();
        let b = Keypair::generate_ed25519();
        let changes: Vec<fn(&mut AnnounceRequest)> = vec![
            |q| q.content = "xyz".into(),
            |q| q.peer = "bad peer!".into(),
            |q| q.addrs = vec!["not-an-address".into()],
            |q| q.addrs = vec!["/ip4/1.2.3.4/tcp/1".into(); 9],
            |q| q.numwant = Some(1000),
            |q| q.left = 0, // no longer what was signed
        ];
        for change in &changes {
            let mut q = signed(&b, ID, 1, None, T0);
            change(&mut q);
            assert!(send(&mut t, &q, "127.0.0.2", now).is_err(), "{q:?}");
        }
        let after = t.stats();
        assert_eq!(
            (after.peers, after.contents, after.announces),
            (before.peers, before.contents, before.announces)
        );
        assert_eq!(after.rejected, changes.len() as u64);
    }

    #[test]
    fn limits_hold() {
        let mut t = Tracker::new(TrackerConfig {
            max_contents: 2,
            max_peers_per_content: 3,
            ..open().cfg
        });
        let now = Instant::now();
        for (i, k) in keys(5).iter().enumerate() {
            let when = now + Duration::from_secs(i as u64);
            let r = send(&mut t, &signed(k, ID, 1, None, T0), "127.0.0.1", when);
            assert_eq!(
                r.is_ok(),
                i < 3,
                "the full content's most crowded IP is refused"
            );
        }
        assert_eq!(t.stats().peers, 3);
        assert_eq!(t.expiry.len(), 3);
        let q = Keypair::generate_ed25519();
        send(
            &mut t,
            &signed(&q, &"22".repeat(32), 1, None, T0),
            "127.0.0.1",
            now,
        )
        .unwrap();
        let third = send(
            &mut t,
            &signed(&q, &"33".repeat(32), 1, None, T0),
            "127.0.0.1",
            now,
        );
        assert_eq!(third, Err(AnnounceError::Full(2)));
    }

    /// A full content takes a newcomer from a source holding fewer records by evicting the
    /// stalest record of its most crowded source: the newcomer is in, that record is out, and
    /// every other record stays.
    #[test]
    fn a_full_content_evicts_the_stalest_record_of_its_most_crowded_source() {
        let mut t = Tracker::new(TrackerConfig {
            max_peers_per_content: 4,
            ..open().cfg
        });
        let now = Instant::now();
        let ks = keys(6);
        let id = |k: &Keypair| k.public().to_peer_id().to_string();
        // 127.0.0.1 holds three records, seen at 0, 1 and 2 s; 127.0.0.2 one, at 3 s.
        for (i, k) in ks[..4].iter().enumerate() {
            let src = if i < 3 { "127.0.0.1" } else { "127.0.0.2" };
            let when = now + Duration::from_secs(i as u64);
            send(&mut t, &signed(k, ID, 0, None, T0), src, when).unwrap();
        }
        let later = now + Duration::from_secs(10);
        send(&mut t, &signed(&ks[4], ID, 0, None, T0), "127.0.0.3", later).unwrap();
        let peers = |t: &Tracker| {
            let mut v: Vec<String> = t.contents[&ContentId::from_str(ID).unwrap()]
                .peers
                .keys()
                .cloned()
                .collect();
            v.sort();
            v
        };
        let mut want: Vec<String> = [1, 2, 3, 4].iter().map(|i| id(&ks[*i])).collect();
        want.sort();
        assert_eq!(
            peers(&t),
            want,
            "the newcomer in, the stalest of 127.0.0.1 out"
        );
        // 127.0.0.1 still holds the most (two): its stalest left is the next to go.
        send(&mut t, &signed(&ks[5], ID, 0, None, T0), "127.0.0.4", later).unwrap();
        let mut want: Vec<String> = [2, 3, 4, 5].iter().map(|i| id(&ks[*i])).collect();
        want.sort();
        assert_eq!(peers(&t), want);
        assert_eq!(t.stats().peers, 4);
    }

    /// The flood of the review: many IPs with 8 records each fill a content whose long-standing
    /// real seeder holds one record; the evictions fall on the crowded IPs, never on it.
    #[test]
    fn a_flood_of_many_ips_never_evicts_a_long_standing_seeder() {
        let mut t = Tracker::new(TrackerConfig {
            max_peers_per_content: 100,
            ip: IpLimits {
                records_per_content: 8,
                ..open().cfg.ip
            },
            ..open().cfg
        });
        let now = Instant::now();
        let real = Keypair::generate_ed25519();
        let real_id = real.public().to_peer_id().to_string();
        send(&mut t, &signed(&real, ID, 0, None, T0), "127.0.0.1", now).unwrap();
        let flood = keys(150 * 8);
        let mut accepted = 0;
        for (i, flood) in flood.chunks(8).enumerate() {
            let i = i as u32;
            let src = format!("127.3.{}.{}", i / 200, i % 200 + 1);
            let when = now + Duration::from_millis(u64::from(i) + 1);
            for k in flood {
                if send(&mut t, &signed(k, ID, 0, None, T0), &src, when).is_ok() {
                    accepted += 1;
                }
            }
        }
        let swarm = &t.contents[&ContentId::from_str(ID).unwrap()];
        assert_eq!(swarm.peers.len(), 100, "full");
        assert!(swarm.peers.contains_key(&real_id), "the real seeder stays");
        assert!(
            accepted > 100,
            "newcomers evicted the crowded IPs: {accepted}"
        );
        let most = swarm.crowd.last().unwrap().0;
        assert!(most <= 2, "evened out: the most crowded IP holds {most}");
    }

    /// An IPv6 source counts by its /64 (the bucket, the caps), an IPv4 one by its address.
    #[test]
    fn ipv6_sources_count_by_their_64_and_ipv4_by_address() {
        let mut t = Tracker::new(TrackerConfig {
            ip: IpLimits {
                burst: 3,
                per_second: 1,
                records_per_content: 2,
                ..IpLimits::default()
            },
            ..TrackerConfig::default()
        });
        let now = Instant::now();
        let ks = keys(8);
        let prefix = ip("2001:db8:1:2::");
        let a1 = send(
            &mut t,
            &signed(&ks[0], ID, 0, None, T0),
            "2001:db8:1:2::1",
            now,
        );
        a1.unwrap();
        send(
            &mut t,
            &signed(&ks[1], ID, 0, None, T0),
            "2001:db8:1:2:ffff::9",
            now,
        )
        .unwrap();
        // A third record of the same /64 in this content, from yet another address.
        let third = send(
            &mut t,
            &signed(&ks[2], ID, 0, None, T0),
            "2001:db8:1:2:1::1",
            now,
        );
        assert_eq!(
            third.unwrap_err(),
            AnnounceError::IpLimit(prefix, "records in this content")
        );
        // Three tokens spent by the /64: the fourth address is refused too.
        let fourth = send(
            &mut t,
            &signed(&ks[3], ID, 0, None, T0),
            "2001:db8:1:2:2::1",
            now,
        );
        assert_eq!(fourth.unwrap_err(), AnnounceError::RateLimited(prefix));
        // Another /64 and two IPv4 addresses are sources of their own.
        send(
            &mut t,
            &signed(&ks[4], ID, 0, None, T0),
            "2001:db8:1:3::1",
            now,
        )
        .unwrap();
        for (k, a) in [(5, "127.0.0.1"), (6, "127.0.0.2")] {
            for j in 0..3 {
                send(&mut t, &signed(&ks[k], ID, 0, None, T0 + j), a, now).unwrap();
            }
        }
        assert_eq!(t.stats().peers, 5);
        assert_eq!(source_of(ip("::ffff:127.0.0.9")), ip("127.0.0.9"));
    }

    /// A few IPs fill the content and record totals; a new content (record) from another IP
    /// takes the room of the most crowded one's stalest, while the crowded ones are refused.
    #[test]
    fn full_totals_make_room_for_an_ip_below_its_share() {
        let mut t = Tracker::new(TrackerConfig {
            max_contents: 100,
            ..open().cfg
        });
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        let content = |i: u32| format!("{i:064x}");
        for i in 0..100u32 {
            let src = format!("127.0.0.{}", i % 4 + 1);
            let when = now + Duration::from_millis(u64::from(i));
            send(&mut t, &signed(&k, &content(i), 0, None, T0), &src, when).unwrap();
        }
        let later = now + Duration::from_secs(1);
        let crowded = send(
            &mut t,
            &signed(&k, &content(200), 0, None, T0),
            "127.0.0.4",
            later,
        );
        assert_eq!(crowded.unwrap_err(), AnnounceError::Full(100));
        send(
            &mut t,
            &signed(&k, &content(201), 0, None, T0),
            "127.0.9.9",
            later,
        )
        .unwrap();
        assert_eq!(t.stats().contents, 100);
        let lost = (1..=4)
            .filter(|i| t.ips[&ip(&format!("127.0.0.{i}"))].contents == 24)
            .count();
        assert_eq!(lost, 1, "one crowded IP gave up one content");

        // The record total: two IPs hold it all, in one content.
        let mut t = Tracker::new(TrackerConfig {
            max_peers: 50,
            ..open().cfg
        });
        let ks = keys(52);
        for (i, k) in ks[..50].iter().enumerate() {
            let src = format!("127.0.0.{}", i % 2 + 1);
            send(&mut t, &signed(k, ID, 0, None, T0), &src, now).unwrap();
        }
        let crowded = send(
            &mut t,
            &signed(&ks[50], ID, 0, None, T0),
            "127.0.0.1",
            later,
        );
        assert_eq!(crowded.unwrap_err(), AnnounceError::FullPeers(50));
        send(
            &mut t,
            &signed(&ks[51], ID, 0, None, T0),
            "127.0.9.9",
            later,
        )
        .unwrap();
        assert_eq!(t.stats().peers, 50);
    }

    /// A captured announce replayed after its record expired (TTL 3 min) while its time is
    /// still within the skew window (5 min) is refused.
    #[test]
    fn a_replay_after_expiry_is_refused() {
        let mut t = open();
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        let captured = signed(&k, ID, 0, Some(Event::Started), T0);
        send(&mut t, &captured, "127.0.0.1", now).unwrap();
        let after = now + t.cfg.peer_ttl + Duration::from_secs(1);
        t.expire(after);
        assert_eq!(t.stats().peers, 0, "expired");
        let wall = T0 + (t.cfg.peer_ttl + Duration::from_secs(1)).as_millis() as u64;
        let mut rng = rand::thread_rng();
        let r = t.announce(&captured, ip("127.0.0.2"), after, wall, &mut rng);
        assert_eq!(r.unwrap_err(), AnnounceError::Replay);
        let fresh = signed(&k, ID, 0, None, wall);
        t.announce(&fresh, ip("127.0.0.1"), after, wall, &mut rng)
            .unwrap();
        assert_eq!(t.stats().peers, 1, "a newer announce is accepted");
    }

    /// A full tracker refuses a new content without sweeping: the median refusal, over many,
    /// stays under a millisecond (the figure is printed; speed belongs to benchmarks, this
    /// only catches a sweep coming back onto the refusal path).
    #[test]
    fn the_refusal_path_of_a_full_tracker_is_short() {
        let mut cfg = open().cfg;
        cfg.max_contents = 20_000;
        let mut t = Tracker::new(cfg);
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        for i in 0..20_000u32 {
            let src = format!("127.1.{}.{}", (i / 250) % 250, i % 250 + 1);
            send(
                &mut t,
                &signed(&k, &format!("{i:064x}"), 0, None, T0),
                &src,
                now,
            )
            .unwrap();
        }
        assert_eq!(t.stats().contents, 20_000);
        // Nothing is stale yet, so nothing can make room: every new content is refused.
        let later = now + Duration::from_secs(100);
        let mut times = vec![];
        for i in 0..500u32 {
            let q = signed(&k, &format!("{:064x}", 1_000_000 + i), 0, None, T0 + 1);
            let start = Instant::now();
            let res = send(&mut t, &q, "127.2.0.1", later);
            times.push(start.elapsed());
            assert_eq!(res.unwrap_err(), AnnounceError::Full(20_000));
        }
        times.sort();
        let median = times[times.len() / 2];
        eprintln!(
            "refusal of a full tracker: median {median:?}, max {:?}",
            times.last().unwrap()
        );
        assert!(median < Duration::from_millis(1), "{median:?}");
    }

    #[test]
    fn expiry_goes_oldest_first_in_batches() {
        let mut t = open();
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        for i in 0..1000u64 {
            let q = signed(&k, &format!("{i:064x}"), 0, None, T0);
            send(&mut t, &q, "127.0.0.1", now + Duration::from_millis(i)).unwrap();
        }
        let at = now + t.cfg.peer_ttl + Duration::from_millis(99);
        assert_eq!(t.expire_some(at, 50), 50);
        assert_eq!(t.expire_some(at, 1000), 50, "only the 100 oldest");
        assert_eq!(t.stats().contents, 900);
        let oldest_left = ContentId::from_str(&format!("{:064x}", 100)).unwrap();
        assert!(t.contents.contains_key(&oldest_left));
        t.expire(now + t.cfg.peer_ttl * 2);
        assert_eq!((t.stats().contents, t.stats().peers), (0, 0));
        assert!(t.contents.capacity() < 64, "{}", t.contents.capacity());
        assert_eq!(t.take_freed(), 1000);
        assert!(t.ips[&ip("127.0.0.1")].records.is_empty());
    }

    // ---- Tests for the mutants cargo-mutants left alive (docs/mutation-testing.md). ----

    /// `q` from `src` at `now`, with the tracker's wall clock at `unix_ms`.
    fn send_at(
        t: &mut Tracker,
        q: &AnnounceRequest,
        src: &str,
        now: Instant,
        unix_ms: u64,
    ) -> Result<AnnounceResponse, AnnounceError> {
        t.announce(q, ip(src), now, unix_ms, &mut rand::thread_rng())
    }

    /// `q` with `change` applied, signed again by `key`.
    fn resigned(
        key: &Keypair,
        mut q: AnnounceRequest,
        change: impl FnOnce(&mut AnnounceRequest),
    ) -> AnnounceRequest {
        change(&mut q);
        q.sign(key).unwrap();
        q
    }

    /// The fair share of a full record total divides it among the sources holding records
    /// now: a source whose records all left no longer counts (nor lowers the share).
    #[test]
    fn a_source_whose_records_all_left_does_not_count_toward_the_fair_share() {
        let mut t = Tracker::new(TrackerConfig {
            max_peers: 4,
            ..open().cfg
        });
        let now = Instant::now();
        let ks = keys(6);
        send(&mut t, &signed(&ks[0], ID, 0, None, T0), "127.0.0.4", now).unwrap();
        let stop = signed(&ks[0], ID, 0, Some(Event::Stopped), T0 + 1);
        send(&mut t, &stop, "127.0.0.4", now).unwrap();
        // 127.0.0.1 holds three records, 127.0.0.3 one: the total is full.
        for k in &ks[1..4] {
            send(&mut t, &signed(k, ID, 0, None, T0), "127.0.0.1", now).unwrap();
        }
        send(&mut t, &signed(&ks[4], ID, 0, None, T0), "127.0.0.3", now).unwrap();
        assert_eq!(t.stats().peers, 4);
        // Two sources hold records: a share of 2 each, and 127.0.0.3 holds 1 (below it).
        let r = send(&mut t, &signed(&ks[5], ID, 0, None, T0), "127.0.0.3", now);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(t.stats().peers, 4);
        assert_eq!(t.crowd_records.len(), 2, "only the sources holding records");
    }

    /// An address of exactly [`MAX_ADDR_LEN`] characters is taken, one character more is
    /// refused as malformed.
    #[test]
    fn an_address_of_256_characters_is_accepted_and_of_257_refused() {
        let mut t = open();
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        let addr = |len: usize| format!("/dns4/{}/tcp/80", "a".repeat(len - 13));
        assert_eq!(addr(MAX_ADDR_LEN).len(), MAX_ADDR_LEN);
        let q = resigned(&k, signed(&k, ID, 0, None, T0), |q| {
            q.addrs = vec![addr(MAX_ADDR_LEN)]
        });
        send(&mut t, &q, "127.0.0.1", now).unwrap();
        let q = resigned(&k, signed(&k, ID, 0, None, T0 + 1), |q| {
            q.addrs = vec![addr(MAX_ADDR_LEN + 1)]
        });
        let r = send(&mut t, &q, "127.0.0.1", now);
        assert!(matches!(r, Err(AnnounceError::Addr(_))), "{r:?}");
    }

    /// A peer id is 1 to [`MAX_PEER_ID_LEN`] base58 characters (no `0`, `O`, `I`, `l`, no
    /// punctuation); anything else is refused as a bad peer id before the signature is read.
    #[test]
    fn a_peer_id_must_be_1_to_128_base58_characters() {
        let mut t = open();
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        let too_long = "1".repeat(MAX_PEER_ID_LEN + 1);
        for bad in [
            "", "12a0", "12aO", "12aI", "12al", "12a-", "12 a", &too_long,
        ] {
            let mut q = signed(&k, ID, 0, None, T0);
            q.peer = bad.into();
            let r = send(&mut t, &q, "127.0.0.1", now);
            assert!(matches!(r, Err(AnnounceError::Peer(_))), "{bad:?}: {r:?}");
        }
        // 128 base58 characters pass the shape check: only the signature refuses them.
        let mut q = signed(&k, ID, 0, None, T0);
        q.peer = "1".repeat(MAX_PEER_ID_LEN);
        let r = send(&mut t, &q, "127.0.0.1", now);
        assert!(matches!(r, Err(AnnounceError::Signature(_))), "{r:?}");
        assert_eq!(t.stats().peers, 0);
    }

    /// An announce may claim [`MAX_ADDRS`] addresses; one more is refused.
    #[test]
    fn eight_addresses_are_accepted_and_nine_refused() {
        let mut t = open();
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        let addrs = |n: u16| (0..n).map(|i| format!("/ip4/10.0.0.1/tcp/{}", 4001 + i));
        let q = resigned(&k, signed(&k, ID, 0, None, T0), |q| {
            q.addrs = addrs(MAX_ADDRS as u16).collect()
        });
        send(&mut t, &q, "127.0.0.1", now).unwrap();
        let q = resigned(&k, signed(&k, ID, 0, None, T0 + 1), |q| {
            q.addrs = addrs(MAX_ADDRS as u16 + 1).collect()
        });
        let r = send(&mut t, &q, "127.0.0.1", now);
        assert_eq!(r.unwrap_err(), AnnounceError::TooManyAddrs(MAX_ADDRS + 1));
    }

    /// An announce may ask for [`MAX_NUMWANT`] peers; one more is refused.
    #[test]
    fn a_numwant_of_50_is_accepted_and_51_refused() {
        let mut t = open();
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        let q = resigned(&k, signed(&k, ID, 0, None, T0), |q| {
            q.numwant = Some(MAX_NUMWANT)
        });
        send(&mut t, &q, "127.0.0.1", now).unwrap();
        let q = resigned(&k, signed(&k, ID, 0, None, T0 + 1), |q| {
            q.numwant = Some(MAX_NUMWANT + 1)
        });
        let r = send(&mut t, &q, "127.0.0.1", now);
        assert_eq!(r.unwrap_err(), AnnounceError::NumWant(MAX_NUMWANT + 1));
    }

    /// A map gives back its room only when it has more than 64 slots and fewer than a
    /// quarter of them are used: at exactly a quarter, or with 64 slots or fewer, it keeps it.
    #[test]
    fn a_map_is_shrunk_only_above_64_slots_and_below_a_quarter_full() {
        let filled = |cap: usize, len: u32| {
            let mut m: HashMap<u32, ()> = HashMap::with_capacity(cap);
            m.extend((0..len).map(|i| (i, ())));
            m
        };
        let big = filled(100, 0).capacity();
        assert!(big > 64 && big % 4 == 0, "{big}");
        let quarter = (big / 4) as u32;
        let mut m = filled(100, quarter);
        shrink(&mut m);
        assert_eq!(m.capacity(), big, "a quarter full: kept");
        let mut m = filled(100, quarter - 1);
        shrink(&mut m);
        assert!(m.capacity() < big, "below a quarter: shrunk");
        let small = filled(50, 0).capacity();
        assert!(small <= 64, "{small}");
        let mut m = filled(50, 1);
        shrink(&mut m);
        assert_eq!(m.capacity(), small, "64 slots or fewer: kept");
    }

    /// `announces` counts the accepted announces and `rejected` the refused ones.
    #[test]
    fn stats_count_each_accepted_and_each_refused_announce() {
        let mut t = open();
        let now = Instant::now();
        let ks = keys(3);
        for k in &ks {
            send(&mut t, &signed(k, ID, 0, None, T0), "127.0.0.1", now).unwrap();
        }
        let replay = send(&mut t, &signed(&ks[0], ID, 0, None, T0), "127.0.0.1", now);
        assert_eq!(replay.unwrap_err(), AnnounceError::Replay);
        let s = t.stats();
        assert_eq!((s.announces, s.rejected), (3, 1));
    }

    /// An announce whose time is exactly `max_skew` from the tracker's clock, either way, is
    /// accepted; 1 ms further is refused.
    #[test]
    fn an_announce_exactly_max_skew_away_is_accepted_and_1_ms_more_refused() {
        let mut t = open();
        let now = Instant::now();
        let skew = t.cfg.max_skew.as_millis() as u64;
        let ks = keys(4);
        let wall = T0 + 10 * skew;
        for (k, time) in [(0, wall + skew), (1, wall - skew)] {
            let q = signed(&ks[k], ID, 0, None, time);
            send_at(&mut t, &q, "127.0.0.1", now, wall).unwrap();
        }
        for (k, time) in [(2, wall + skew + 1), (3, wall - skew - 1)] {
            let q = signed(&ks[k], ID, 0, None, time);
            let r = send_at(&mut t, &q, "127.0.0.1", now, wall);
            assert_eq!(r.unwrap_err(), AnnounceError::Clock(skew + 1, skew / 1000));
        }
        assert_eq!(t.stats().peers, 2);
    }

    /// The answer to a `stopped` counts the seeders and the leechers still in the content.
    #[test]
    fn a_stop_answers_the_seeders_and_leechers_still_there() {
        let mut t = open();
        let now = Instant::now();
        let ks = keys(6);
        for (i, k) in ks.iter().enumerate() {
            let left = if i < 2 { 0 } else { 5 };
            send(&mut t, &signed(k, ID, left, None, T0), "127.0.0.1", now).unwrap();
        }
        let stop = signed(&ks[5], ID, 5, Some(Event::Stopped), T0 + 1);
        let a = send(&mut t, &stop, "127.0.0.1", now).unwrap();
        assert_eq!((a.seeders, a.leechers), (2, 3));
        assert!(a.peers.is_empty());
    }

    /// At 2 announces per second a spent bucket has its token back after exactly 500 ms, not
    /// 1 ms before.
    #[test]
    fn a_spent_bucket_at_2_per_second_gives_a_token_back_after_500_ms_not_499() {
        let mut t = Tracker::new(TrackerConfig {
            ip: IpLimits {
                burst: 1,
                per_second: 2,
                ..open().cfg.ip
            },
            ..open().cfg
        });
        let now = Instant::now();
        let ks = keys(2);
        // Each source holds a record, so that neither is forgotten (and refilled) meanwhile.
        for (k, src) in [(0, "127.0.0.1"), (1, "127.0.0.2")] {
            send(&mut t, &signed(&ks[k], ID, 0, None, T0), src, now).unwrap();
        }
        let again = |k: usize| signed(&ks[k], ID, 0, None, T0 + 1);
        let early = send(
            &mut t,
            &again(0),
            "127.0.0.1",
            now + Duration::from_millis(499),
        );
        assert_eq!(
            early.unwrap_err(),
            AnnounceError::RateLimited(ip("127.0.0.1"))
        );
        let on_time = send(
            &mut t,
            &again(1),
            "127.0.0.2",
            now + Duration::from_millis(500),
        );
        assert!(on_time.is_ok(), "{on_time:?}");
    }

    /// An IP that holds no record is forgotten (making room under `max_ips`) once its bucket
    /// has refilled (`burst / per_second`: 2 s here), not 1 ms before, and long after too.
    #[test]
    fn an_idle_ip_is_forgotten_once_its_bucket_has_refilled_and_not_a_ms_before() {
        let probe = |after: Duration| {
            let mut t = Tracker::new(TrackerConfig {
                ip: IpLimits {
                    burst: 4,
                    per_second: 2,
                    max_ips: 1,
                    ..open().cfg.ip
                },
                ..open().cfg
            });
            let now = Instant::now();
            t.note_rejected(ip("127.0.0.1"), now);
            let k = Keypair::generate_ed25519();
            send(
                &mut t,
                &signed(&k, ID, 0, None, T0),
                "127.0.0.2",
                now + after,
            )
        };
        let early = probe(Duration::from_millis(1999));
        assert_eq!(early.unwrap_err(), AnnounceError::TooManyClients);
        for after in [Duration::from_secs(2), Duration::from_secs(60)] {
            let r = probe(after);
            assert!(r.is_ok(), "{after:?}: {r:?}");
        }
    }

    /// A tombstone is kept while it is at most `max_skew` old and dropped (from both tables)
    /// when a newer one is made later than that.
    #[test]
    fn a_tombstone_is_kept_for_max_skew_and_dropped_1_ms_later() {
        let id = ContentId::from_str(ID).unwrap();
        let tombs = |later: Duration| {
            let mut t = open();
            let now = Instant::now();
            t.tombstone((id, "a".into()), 1, now);
            t.tombstone((id, "b".into()), 2, now + later);
            (t.tombstones, t.tomb_order.len())
        };
        let skew = open().cfg.max_skew;
        let (kept, order) = tombs(skew);
        assert_eq!((kept.len(), order), (2, 2), "max_skew old: kept");
        let (kept, order) = tombs(skew + Duration::from_millis(1));
        assert_eq!((kept.len(), order), (1, 1), "1 ms older: dropped");
        assert!(kept.contains_key(&tomb_key(&id, "b")));
    }

    /// At most [`MAX_TOMBSTONES`] tombstones are kept, however fresh: one more drops the
    /// oldest.
    #[test]
    fn tombstones_are_capped_at_max_tombstones_and_the_oldest_goes_first() {
        let id = ContentId::from_str(ID).unwrap();
        let mut t = open();
        let now = Instant::now();
        for i in 0..MAX_TOMBSTONES {
            t.tombstone((id, format!("p{i}")), 1, now);
        }
        assert_eq!(t.tombstones.len(), MAX_TOMBSTONES);
        t.tombstone((id, "last".into()), 1, now);
        assert_eq!(t.tombstones.len(), MAX_TOMBSTONES);
        assert_eq!(t.tomb_order.len(), MAX_TOMBSTONES);
        assert!(!t.tombstones.contains_key(&tomb_key(&id, "p0")));
        assert!(t.tombstones.contains_key(&tomb_key(&id, "p1")));
        assert!(t.tombstones.contains_key(&tomb_key(&id, "last")));
    }

    /// A record that left twice keeps the tombstone of its newest leaving when the older one
    /// ages out of the order.
    #[test]
    fn a_record_that_left_twice_keeps_its_newest_tombstone_when_the_first_ages_out() {
        let id = ContentId::from_str(ID).unwrap();
        let mut t = open();
        let now = Instant::now();
        let second = now + Duration::from_secs(1);
        t.tombstone((id, "x".into()), 10, now);
        t.tombstone((id, "x".into()), 20, second);
        let aged = now + t.cfg.max_skew + Duration::from_millis(1);
        t.tombstone((id, "y".into()), 5, aged);
        assert_eq!(t.tombstones.get(&tomb_key(&id, "x")), Some(&(20, second)));
        assert_eq!(t.tombstones.len(), 2);
    }

    /// A full tracker refuses a new content to a source holding its fair share of contents
    /// (the limit over the sources), even when it holds fewer than the most crowded; one
    /// below its share gets in.
    #[test]
    fn a_source_at_its_fair_share_of_contents_is_refused_a_new_one_and_one_below_is_not() {
        let mut t = Tracker::new(TrackerConfig {
            max_contents: 9,
            ..open().cfg
        });
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        let content = |i: u32| format!("{i:064x}");
        // 127.0.0.1 holds 5 contents, 127.0.0.2 one, 127.0.0.3 three: a share of 3 each.
        for i in 0..9u32 {
            let src = match i {
                0..=4 => "127.0.0.1",
                5 => "127.0.0.2",
                _ => "127.0.0.3",
            };
            let when = now + Duration::from_millis(u64::from(i));
            send(&mut t, &signed(&k, &content(i), 0, None, T0), src, when).unwrap();
        }
        let later = now + Duration::from_secs(1);
        let q = signed(&k, &content(100), 0, None, T0);
        let at_share = send(&mut t, &q, "127.0.0.3", later);
        assert_eq!(at_share.unwrap_err(), AnnounceError::Full(9));
        let q = signed(&k, &content(101), 0, None, T0);
        send(&mut t, &q, "127.0.0.2", later).unwrap();
        assert_eq!(t.stats().contents, 9);
        assert_eq!(t.ips[&ip("127.0.0.1")].contents, 4);
    }

    /// A full content takes a newcomer only if its source, with it, still holds fewer records
    /// there than the most crowded: equal is refused, one fewer gets in.
    #[test]
    fn a_full_content_refuses_a_newcomer_whose_source_would_equal_the_most_crowded() {
        let mut t = Tracker::new(TrackerConfig {
            max_peers_per_content: 3,
            ..open().cfg
        });
        let now = Instant::now();
        let ks = keys(5);
        for (k, src) in [(0, "127.0.0.1"), (1, "127.0.0.1"), (2, "127.0.0.2")] {
            send(&mut t, &signed(&ks[k], ID, 0, None, T0), src, now).unwrap();
        }
        let equal = send(&mut t, &signed(&ks[3], ID, 0, None, T0), "127.0.0.2", now);
        assert_eq!(
            equal.unwrap_err(),
            AnnounceError::IpLimit(ip("127.0.0.2"), "records in this full content")
        );
        send(&mut t, &signed(&ks[4], ID, 0, None, T0), "127.0.0.3", now).unwrap();
        assert_eq!(t.stats().peers, 3);
    }

    /// A full record total refuses a new record to a source holding its fair share of
    /// records, even when it holds fewer than the most crowded; one below its share gets in.
    #[test]
    fn a_source_at_its_fair_share_of_records_is_refused_a_new_one_and_one_below_is_not() {
        let mut t = Tracker::new(TrackerConfig {
            max_peers: 9,
            ..open().cfg
        });
        let now = Instant::now();
        let ks = keys(11);
        // 127.0.0.1 holds 5 records, 127.0.0.2 one, 127.0.0.3 three: a share of 3 each.
        for (i, k) in ks[..9].iter().enumerate() {
            let src = match i {
                0..=4 => "127.0.0.1",
                5 => "127.0.0.2",
                _ => "127.0.0.3",
            };
            send(&mut t, &signed(k, ID, 0, None, T0), src, now).unwrap();
        }
        let at_share = send(&mut t, &signed(&ks[9], ID, 0, None, T0), "127.0.0.3", now);
        assert_eq!(at_share.unwrap_err(), AnnounceError::FullPeers(9));
        send(&mut t, &signed(&ks[10], ID, 0, None, T0), "127.0.0.2", now).unwrap();
        assert_eq!(t.stats().peers, 9);
        assert_eq!(t.ips[&ip("127.0.0.1")].records.len(), 4);
    }

    /// A full record total takes a new source only if it would then hold fewer records than
    /// the most crowded: with one record per source it is refused, with a source of two not.
    #[test]
    fn a_full_record_total_refuses_a_new_source_when_every_source_holds_one_record() {
        let ks = keys(4);
        let newcomer = |held: &[&str]| {
            let mut t = Tracker::new(TrackerConfig {
                max_peers: held.len(),
                ..open().cfg
            });
            let now = Instant::now();
            for (k, src) in ks.iter().zip(held) {
                send(&mut t, &signed(k, ID, 0, None, T0), src, now).unwrap();
            }
            send(&mut t, &signed(&ks[3], ID, 0, None, T0), "127.0.0.9", now)
        };
        let one_each = newcomer(&["127.0.0.1", "127.0.0.2"]);
        assert_eq!(one_each.unwrap_err(), AnnounceError::FullPeers(2));
        let two = newcomer(&["127.0.0.1", "127.0.0.1", "127.0.0.2"]);
        assert!(two.is_ok(), "{two:?}");
    }

    /// A leecher that completes counts as a seeder, in its content and in the tracker, and a
    /// seeder that lacks bytes again counts as a leecher again.
    #[test]
    fn a_record_that_completes_or_lacks_bytes_again_moves_between_seeders_and_leechers() {
        let mut t = open();
        let now = Instant::now();
        let ks = keys(2);
        send(&mut t, &signed(&ks[0], ID, 0, None, T0), "127.0.0.1", now).unwrap();
        send(&mut t, &signed(&ks[1], ID, 5, None, T0), "127.0.0.2", now).unwrap();
        let counts = |t: &Tracker, a: &AnnounceResponse| {
            let s = t.stats();
            ((a.seeders, a.leechers), (s.seeders, s.leechers))
        };
        let done = signed(&ks[1], ID, 0, Some(Event::Completed), T0 + 1);
        let a = send(&mut t, &done, "127.0.0.2", now).unwrap();
        assert_eq!(counts(&t, &a), ((2, 0), (2, 0)), "completed: a seeder");
        let lacking = signed(&ks[1], ID, 7, None, T0 + 2);
        let a = send(&mut t, &lacking, "127.0.0.2", now).unwrap();
        assert_eq!(counts(&t, &a), ((1, 1), (1, 1)), "lacking bytes: a leecher");
    }

    /// When a source's records leave, its rank among the sources (by records, by contents)
    /// goes down with them: a full tracker counts the sources and the shares by what they hold.
    #[test]
    fn a_sources_rank_goes_down_as_its_records_leave() {
        let k = Keypair::generate_ed25519();
        let content = |i: u32| format!("{i:064x}");
        let (a, b, c) = ("127.0.0.1", "127.0.0.2", "127.0.0.3");
        let filled = |cfg: TrackerConfig| {
            let mut t = Tracker::new(cfg);
            let now = Instant::now();
            // 127.0.0.1 held three records (a content each) and stopped two; .2 holds two.
            for i in 0..3 {
                send(&mut t, &signed(&k, &content(i), 0, None, T0), a, now).unwrap();
            }
            for i in 0..2 {
                let stop = signed(&k, &content(i), 0, Some(Event::Stopped), T0 + 1);
                send(&mut t, &stop, a, now).unwrap();
            }
            for i in 3..5 {
                send(&mut t, &signed(&k, &content(i), 0, None, T0), b, now).unwrap();
            }
            (t, now)
        };
        // Full in contents: a newcomer content takes the room of one of 127.0.0.2's.
        let (mut t, now) = filled(TrackerConfig {
            max_contents: 3,
            ..open().cfg
        });
        assert_eq!(t.crowd_contents.len(), 2);
        send(&mut t, &signed(&k, &content(9), 0, None, T0), c, now).unwrap();
        assert_eq!((t.ips[&ip(a)].contents, t.ips[&ip(b)].contents), (1, 1));
        // Full in records: a newcomer record takes the room of one of 127.0.0.2's.
        let (mut t, now) = filled(TrackerConfig {
            max_peers: 3,
            ..open().cfg
        });
        assert_eq!(t.crowd_records.len(), 2);
        let other = Keypair::generate_ed25519();
        send(&mut t, &signed(&other, &content(3), 0, None, T0), c, now).unwrap();
        let held = |s: &str| t.ips[&ip(s)].records.len();
        assert_eq!((held(a), held(b)), (1, 1));
    }

    /// An IP is queued to be forgotten only when its last record leaves: one of several
    /// leaving queues nothing, so nothing holds up forgetting the idle IPs queued behind.
    #[test]
    fn an_ip_is_queued_to_be_forgotten_only_when_its_last_record_leaves() {
        let mut t = Tracker::new(TrackerConfig {
            peer_ttl: Duration::from_secs(10),
            ip: IpLimits {
                burst: 10,
                per_second: 2,
                max_ips: 2,
                ..open().cfg.ip
            },
            ..open().cfg
        });
        let now = Instant::now();
        let s = Duration::from_secs;
        let ks = keys(4);
        let (a, c) = ("127.0.0.1", "127.0.0.3");
        send(&mut t, &signed(&ks[0], ID, 0, None, T0), c, now).unwrap();
        send(&mut t, &signed(&ks[1], ID, 0, None, T0), a, now).unwrap();
        send(&mut t, &signed(&ks[2], ID, 0, None, T0), a, now).unwrap();
        // At 5 s both buckets have refilled: both IPs leave the queue, as they hold records.
        send(&mut t, &signed(&ks[2], ID, 0, None, T0 + 1), a, now + s(5)).unwrap();
        assert!(t.idle.is_empty());
        // At 9 s one of 127.0.0.1's two records leaves: it still holds one, nothing is queued.
        send(&mut t, &signed(&ks[1], ID, 0, None, T0 + 2), a, now + s(9)).unwrap();
        let stop = signed(&ks[1], ID, 0, Some(Event::Stopped), T0 + 3);
        send(&mut t, &stop, a, now + s(9)).unwrap();
        assert!(t.idle.is_empty(), "{:?}", t.idle);
        // At 10 s 127.0.0.3's only record expires: it is queued, and forgotten at once (its
        // bucket is full), which makes room for a third IP.
        let r = send(
            &mut t,
            &signed(&ks[3], ID, 0, None, T0),
            "127.0.0.4",
            now + s(10),
        );
        assert!(r.is_ok(), "{r:?}");
        assert!(!t.ips.contains_key(&ip(c)));
    }

    /// A request refused before it could be parsed counts as rejected and spends one of its
    /// IP's tokens, like any announce.
    #[test]
    fn a_request_refused_before_parsing_counts_as_rejected_and_spends_a_token() {
        let mut t = Tracker::new(TrackerConfig {
            ip: IpLimits {
                burst: 2,
                per_second: 1,
                ..open().cfg.ip
            },
            ..open().cfg
        });
        let now = Instant::now();
        let k = Keypair::generate_ed25519();
        t.note_rejected(ip("127.0.0.1"), now);
        t.note_rejected(ip("127.0.0.1"), now);
        assert_eq!(t.stats().rejected, 2);
        let r = send(&mut t, &signed(&k, ID, 0, None, T0), "127.0.0.1", now);
        assert_eq!(r.unwrap_err(), AnnounceError::RateLimited(ip("127.0.0.1")));
        send(&mut t, &signed(&k, ID, 0, None, T0), "127.0.0.2", now).unwrap();
    }
}
