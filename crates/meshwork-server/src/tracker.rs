//! The content tracker, sans-IO: who has which content, as its peers announce it.
//!
//! An announce names the content id, the peer id, its addresses, an event (`started`,
//! `completed`, `stopped`, or none for a periodic refresh) and the bytes it still lacks. The
//! answer is a bounded random sample of the other peers of that content: for a leecher, seeders
//! first; for a seeder, leechers only (a seeder needs nobody's pieces). Peers that stop
//! announcing expire after [`TrackerConfig::peer_ttl`].
//!
//! # Invariants
//! - A request is validated whole before anything changes: a malformed announce changes
//!   nothing.
//! - At most `max_contents` contents and `max_peers_per_content` peers per content; a full
//!   content evicts its stalest peer for a new one, and a new content beyond the limit is
//!   refused. Every content listed has at least one peer.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use meshwork_swarm::ContentId;
use multiaddr::Multiaddr;
use rand::seq::SliceRandom;
use rand::Rng;

pub const MAX_ADDRS: usize = 8;
pub const MAX_ADDR_LEN: usize = 256;
pub const MAX_PEER_ID_LEN: usize = 128;
pub const DEFAULT_NUMWANT: usize = 30;
pub const MAX_NUMWANT: usize = 50;

#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// How often peers are asked to announce.
    pub interval: Duration,
    /// A peer not heard from for this long is dropped.
    pub peer_ttl: Duration,
    pub max_contents: usize,
    pub max_peers_per_content: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            peer_ttl: Duration::from_secs(180),
            max_contents: 100_000,
            max_peers_per_content: 10_000,
        }
    }
}

pub use meshwork_swarm::tracker_wire::{
    AnnounceRequest, AnnounceResponse, Event, PeerAddrs, Stats,
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
    #[error("numwant {0} is above {MAX_NUMWANT}")]
    NumWant(usize),
    #[error("the tracker holds its limit of {0} contents")]
    Full(usize),
}

struct Entry {
    addrs: Vec<String>,
    left: u64,
    seen: Instant,
}

struct Checked {
    content: ContentId,
    peer: String,
    addrs: Vec<String>,
    numwant: usize,
}

pub struct Tracker {
    cfg: TrackerConfig,
    contents: HashMap<ContentId, HashMap<String, Entry>>,
    announces: u64,
    rejected: u64,
}

fn check(req: &AnnounceRequest) -> Result<Checked, AnnounceError> {
    let content = ContentId::from_str(&req.content)
        .map_err(|_| AnnounceError::Content(req.content.clone()))?;
    let base58 = |c: char| c.is_ascii_alphanumeric() && !"0OIl".contains(c);
    if req.peer.is_empty() || req.peer.len() > MAX_PEER_ID_LEN || !req.peer.chars().all(base58) {
        return Err(AnnounceError::Peer(req.peer.chars().take(140).collect()));
    }
    if req.addrs.len() > MAX_ADDRS {
        return Err(AnnounceError::TooManyAddrs(req.addrs.len()));
    }
    for a in &req.addrs {
        if a.len() > MAX_ADDR_LEN || a.parse::<Multiaddr>().is_err() {
            return Err(AnnounceError::Addr(a.chars().take(300).collect()));
        }
    }
    let numwant = req.numwant.unwrap_or(DEFAULT_NUMWANT);
    if numwant > MAX_NUMWANT {
        return Err(AnnounceError::NumWant(numwant));
    }
    Ok(Checked {
        content,
        peer: req.peer.clone(),
        addrs: req.addrs.clone(),
        numwant,
    })
}

impl Tracker {
    pub fn new(cfg: TrackerConfig) -> Tracker {
        Tracker {
            cfg,
            contents: HashMap::new(),
            announces: 0,
            rejected: 0,
        }
    }

    pub fn announce(
        &mut self,
        req: &AnnounceRequest,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Result<AnnounceResponse, AnnounceError> {
        let c = match check(req) {
            Ok(c) => c,
            Err(e) => {
                self.rejected += 1;
                return Err(e);
            }
        };
        if !self.contents.contains_key(&c.content)
            && req.event != Some(Event::Stopped)
            && self.contents.len() >= self.cfg.max_contents
        {
            self.expire(now);
            if self.contents.len() >= self.cfg.max_contents {
                self.rejected += 1;
                return Err(AnnounceError::Full(self.cfg.max_contents));
            }
        }
        self.announces += 1;
        let ttl = self.cfg.peer_ttl;
        let max_peers = self.cfg.max_peers_per_content;
        let peers = self.contents.entry(c.content).or_default();
        peers.retain(|_, e| now.duration_since(e.seen) < ttl);
        if req.event == Some(Event::Stopped) {
            peers.remove(&c.peer);
        } else {
            if !peers.contains_key(&c.peer) && peers.len() >= max_peers {
                let stalest = peers
                    .iter()
                    .min_by_key(|(_, e)| e.seen)
                    .map(|(p, _)| p.clone())
                    .expect("a full content has peers");
                peers.remove(&stalest);
            }
            peers.insert(
                c.peer.clone(),
                Entry {
                    addrs: c.addrs,
                    left: req.left,
                    seen: now,
                },
            );
        }
        let seeders = peers.values().filter(|e| e.left == 0).count();
        let leechers = peers.len() - seeders;
        let mut others: Vec<(&String, &Entry)> =
            peers.iter().filter(|(p, _)| **p != c.peer).collect();
        others.shuffle(rng);
        // Seeders first for a leecher; a seeder gets leechers only.
        if req.left == 0 {
            others.retain(|(_, e)| e.left > 0);
        } else {
            others.sort_by_key(|(_, e)| e.left > 0);
        }
        let sample = others
            .into_iter()
            .take(c.numwant)
            .map(|(p, e)| PeerAddrs {
                peer: p.clone(),
                addrs: e.addrs.clone(),
                seeder: e.left == 0,
            })
            .collect();
        if peers.is_empty() {
            self.contents.remove(&c.content);
        }
        Ok(AnnounceResponse {
            interval_s: self.cfg.interval.as_secs(),
            seeders,
            leechers,
            peers: sample,
        })
    }

    /// Counts a request refused before it could be parsed (bad JSON at the HTTP layer).
    pub fn note_rejected(&mut self) {
        self.rejected += 1;
    }

    /// Drops every peer not heard from within the TTL, and contents left empty.
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.cfg.peer_ttl;
        self.contents.retain(|_, peers| {
            peers.retain(|_, e| now.duration_since(e.seen) < ttl);
            !peers.is_empty()
        });
    }

    pub fn stats(&self) -> Stats {
        let peers: usize = self.contents.values().map(|p| p.len()).sum();
        let seeders = self
            .contents
            .values()
            .flat_map(|p| p.values())
            .filter(|e| e.left == 0)
            .count();
        Stats {
            contents: self.contents.len(),
            peers,
            seeders,
            leechers: peers - seeders,
            announces: self.announces,
            rejected: self.rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const ID: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn req(peer: &str, left: u64, event: Option<Event>) -> AnnounceRequest {
        AnnounceRequest {
            content: ID.into(),
            peer: peer.into(),
            addrs: vec!["/ip4/10.0.0.1/tcp/4001".into()],
            event,
            left,
            numwant: None,
        }
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(1)
    }

    /// A base58 peer name for `i` (no 0, O, I or l).
    fn name(i: u64) -> String {
        format!("Pe{}x{}", i / 9 + 1, i % 9 + 1)
    }

    #[test]
    fn leechers_get_seeders_first_and_seeders_get_leechers_only() {
        let mut t = Tracker::new(TrackerConfig::default());
        let now = Instant::now();
        let mut r = rng();
        for i in 0..40 {
            let left = if i < 5 { 0 } else { 100 };
            t.announce(&req(&name(i), left, Some(Event::Started)), now, &mut r)
                .unwrap();
        }
        let mut q = req("NewLeecher", 100, Some(Event::Started));
        q.numwant = Some(10);
        let a = t.announce(&q, now, &mut r).unwrap();
        assert_eq!(a.peers.len(), 10);
        assert!(a.peers[..5].iter().all(|p| p.seeder), "seeders first");
        assert_eq!((a.seeders, a.leechers), (5, 36));
        let s = t.announce(&req(&name(0), 0, None), now, &mut r).unwrap();
        assert!(s.peers.iter().all(|p| !p.seeder));
        assert!(s.peers.len() <= DEFAULT_NUMWANT);
        assert!(!s.peers.iter().any(|p| p.peer == name(0)), "never yourself");
    }

    #[test]
    fn stopped_and_stale_peers_leave() {
        let mut t = Tracker::new(TrackerConfig::default());
        let now = Instant::now();
        let mut r = rng();
        t.announce(&req("A", 0, Some(Event::Started)), now, &mut r)
            .unwrap();
        t.announce(&req("B", 10, Some(Event::Started)), now, &mut r)
            .unwrap();
        t.announce(&req("B", 10, Some(Event::Stopped)), now, &mut r)
            .unwrap();
        assert_eq!(t.stats().peers, 1);
        t.expire(now + Duration::from_secs(181));
        assert_eq!(
            t.stats().contents,
            0,
            "A expired, and the empty content with it"
        );
    }

    #[test]
    fn malformed_announces_change_nothing() {
        let mut t = Tracker::new(TrackerConfig::default());
        let now = Instant::now();
        let mut r = rng();
        t.announce(&req("A", 0, Some(Event::Started)), now, &mut r)
            .unwrap();
        let before = t.stats();
        let mut bad = vec![];
        let mut q = req("B", 1, None);
        q.content = "xyz".into();
        bad.push(q);
        bad.push(req("bad peer!", 1, None));
        let mut q = req("B", 1, None);
        q.addrs = vec!["not-an-address".into()];
        bad.push(q);
        let mut q = req("B", 1, None);
        q.addrs = vec!["/ip4/1.2.3.4/tcp/1".into(); 9];
        bad.push(q);
        let mut q = req("B", 1, None);
        q.numwant = Some(1000);
        bad.push(q);
        for q in &bad {
            assert!(t.announce(q, now, &mut r).is_err(), "{q:?}");
        }
        let after = t.stats();
        assert_eq!(
            (after.peers, after.contents, after.announces),
            (before.peers, before.contents, before.announces)
        );
        assert_eq!(after.rejected, bad.len() as u64);
    }

    #[test]
    fn limits_hold() {
        let mut t = Tracker::new(TrackerConfig {
            max_contents: 2,
            max_peers_per_content: 3,
            ..TrackerConfig::default()
        });
        let now = Instant::now();
        let mut r = rng();
        for i in 0..5 {
            t.announce(
                &req(&name(i), 1, None),
                now + Duration::from_secs(i),
                &mut r,
            )
            .unwrap();
        }
        assert_eq!(t.stats().peers, 3, "the stalest peers were evicted");
        let mut other = req("Q", 1, None);
        other.content = "22".repeat(32);
        t.announce(&other, now, &mut r).unwrap();
        other.content = "33".repeat(32);
        assert_eq!(t.announce(&other, now, &mut r), Err(AnnounceError::Full(2)));
    }
}
