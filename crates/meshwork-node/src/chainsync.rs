//! Block sync: the `/meshwork/<network>/sync/1` protocol and the download scheduler.
//!
//! # Protocol
//! Request-response, framed like PEX (4-byte length, postcard body):
//! - `Status`: each side's chain id, tip and total work. Sent on every new connection; a peer
//!   on another chain (different genesis) is disconnected.
//! - `Headers { locator, max }`: main-chain headers after the first locator hash the peer has
//!   on its main chain (Bitcoin's `getheaders`), at most [`MAX_HEADERS`].
//! - `Blocks(hashes)`: at most [`MAX_BLOCKS_PER_REQUEST`] whole blocks, as stored.
//!
//! # Scheduler ([`Syncer`], sans-IO)
//! When a peer reports more work than ours, we ask it for headers from our locator. The
//! ledger checks that they link and carry proof of work, and returns the hashes we lack; they
//! join a bounded download queue. Blocks are fetched in batches of 16 from every peer that is
//! ahead of us, one batch per peer at a time, so several peers serve a sync at once. Only the
//! first [`WINDOW`] queued blocks are requested, so that blocks arriving out of order fit in
//! the ledger's orphan pool. A batch a peer fails to serve goes back to the queue front for
//! another peer. A full headers answer means there are more: the next round continues from
//! its last hash.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;

use futures::{AsyncRead, AsyncWrite};
use libp2p::{PeerId, StreamProtocol};
use meshwork_ledger::{Hash, Header};
use serde::{Deserialize, Serialize};

use crate::pex::{read_frame, write_frame};

pub const MAX_LOCATOR: usize = 64;
pub const MAX_HEADERS: usize = 2000;
pub const MAX_BLOCKS_PER_REQUEST: usize = 16;
/// Requests are small: a locator or a list of hashes.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// A response holds at most 16 blocks of at most 1 MiB each, or 2000 headers.
pub const MAX_RESPONSE_BYTES: usize = (MAX_BLOCKS_PER_REQUEST << 20) + (64 << 10);
/// Blocks queued for download, at most.
pub const MAX_QUEUE: usize = 4 * MAX_HEADERS;
/// Only this many blocks from the queue front are in flight or requested: out-of-order
/// arrivals must fit in the orphan pool (256).
pub const WINDOW: usize = 192;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainStatus {
    pub chain_id: Hash,
    pub height: u64,
    pub tip: Hash,
    pub work: u128,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    Status(ChainStatus),
    Headers { locator: Vec<Hash>, max: u32 },
    Blocks(Vec<Hash>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncResponse {
    Status(ChainStatus),
    Headers(Vec<Header>),
    /// The encoded blocks the peer has, in request order (missing ones left out).
    Blocks(Vec<Vec<u8>>),
    /// The peer is overloaded; try elsewhere.
    Busy,
}

impl SyncRequest {
    fn check(&self) -> Result<(), String> {
        match self {
            SyncRequest::Headers { locator, max } if locator.len() > MAX_LOCATOR => Err(format!(
                "locator of {} hashes (max {MAX_LOCATOR}, asked {max})",
                locator.len()
            )),
            SyncRequest::Blocks(h) if h.len() > MAX_BLOCKS_PER_REQUEST => Err(format!(
                "{} blocks asked (max {MAX_BLOCKS_PER_REQUEST})",
                h.len()
            )),
            _ => Ok(()),
        }
    }
}

impl SyncResponse {
    fn check(&self) -> Result<(), String> {
        match self {
            SyncResponse::Headers(h) if h.len() > MAX_HEADERS => {
                Err(format!("{} headers (max {MAX_HEADERS})", h.len()))
            }
            SyncResponse::Blocks(b) if b.len() > MAX_BLOCKS_PER_REQUEST => {
                Err(format!("{} blocks (max {MAX_BLOCKS_PER_REQUEST})", b.len()))
            }
            _ => Ok(()),
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    let (v, rest) = postcard::take_from_bytes(bytes).map_err(invalid)?;
    if !rest.is_empty() {
        return Err(invalid(format!("{} trailing bytes", rest.len())));
    }
    Ok(v)
}

#[derive(Clone, Default)]
pub struct SyncCodec;

impl libp2p::request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<SyncRequest> {
        let req: SyncRequest = decode(&read_frame(io, MAX_REQUEST_BYTES).await?)?;
        req.check().map_err(invalid)?;
        Ok(req)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<SyncResponse> {
        let res: SyncResponse = decode(&read_frame(io, MAX_RESPONSE_BYTES).await?)?;
        res.check().map_err(invalid)?;
        Ok(res)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: SyncRequest,
    ) -> io::Result<()> {
        write_frame(io, &postcard::to_allocvec(&req).map_err(invalid)?).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: SyncResponse,
    ) -> io::Result<()> {
        write_frame(io, &postcard::to_allocvec(&res).map_err(invalid)?).await
    }
}

/// What the scheduler wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncAction {
    /// Ask `peer` for headers after `locator`.
    Headers {
        peer: PeerId,
        locator: Vec<Hash>,
    },
    Blocks {
        peer: PeerId,
        hashes: Vec<Hash>,
    },
    /// The peer is on another chain.
    Disconnect(PeerId),
}

#[derive(Default)]
struct PeerSync {
    status: Option<ChainStatus>,
    /// The block batch in flight to this peer.
    blocks: Vec<Hash>,
}

/// The download scheduler. Invariants: `queued` holds exactly the hashes of `queue`; every
/// hash is in at most one of `queue` and
/// `in_flight`; `in_flight` holds exactly the hashes of the peers' `blocks`; a peer has at most
/// one headers request and one block batch outstanding.
pub struct Syncer {
    chain_id: Hash,
    ours: ChainStatus,
    locator: Vec<Hash>,
    peers: HashMap<PeerId, PeerSync>,
    queue: VecDeque<Hash>,
    /// The hashes in `queue`, for O(1) membership: a headers answer of 2000 checked against a
    /// queue of 8000 by scanning would cost 16 million comparisons.
    queued: HashSet<Hash>,
    in_flight: HashMap<Hash, PeerId>,
    /// The peer answering our current headers request, if any.
    headers_from: Option<PeerId>,
    /// After a full headers answer: where the next round starts, and from whom.
    continue_from: Option<(PeerId, Hash)>,
}

impl Syncer {
    pub fn new(ours: ChainStatus, locator: Vec<Hash>) -> Syncer {
        Syncer {
            chain_id: ours.chain_id,
            ours,
            locator,
            peers: HashMap::new(),
            queue: VecDeque::new(),
            queued: HashSet::new(),
            in_flight: HashMap::new(),
            headers_from: None,
            continue_from: None,
        }
    }

    pub fn ours(&self) -> ChainStatus {
        self.ours
    }

    /// Blocks queued or in flight.
    pub fn pending(&self) -> usize {
        self.queue.len() + self.in_flight.len()
    }

    /// Our tip moved (an import, a reorganization).
    pub fn on_tip(&mut self, ours: ChainStatus, locator: Vec<Hash>) -> Vec<SyncAction> {
        self.ours = ours;
        self.locator = locator;
        self.poll()
    }

    pub fn on_status(&mut self, peer: PeerId, status: ChainStatus) -> Vec<SyncAction> {
        if status.chain_id != self.chain_id {
            return vec![SyncAction::Disconnect(peer)];
        }
        self.peers.entry(peer).or_default().status = Some(status);
        self.poll()
    }

    /// A block we cannot place: ask its sender for the headers that lead to it.
    pub fn on_orphan(&mut self, peer: PeerId) -> Vec<SyncAction> {
        if self.headers_from.is_some() || !self.peers.contains_key(&peer) {
            return vec![];
        }
        self.headers_from = Some(peer);
        vec![SyncAction::Headers {
            peer,
            locator: self.locator.clone(),
        }]
    }

    /// The ledger checked a headers answer: `missing` are the hashes we lack, in chain order;
    /// `full` means the peer may have more after `last`.
    pub fn on_headers(
        &mut self,
        peer: PeerId,
        missing: Vec<Hash>,
        last: Option<Hash>,
        full: bool,
    ) -> Vec<SyncAction> {
        if self.headers_from == Some(peer) {
            self.headers_from = None;
        }
        for h in missing {
            if self.queue.len() >= MAX_QUEUE {
                break;
            }
            if !self.in_flight.contains_key(&h) && self.queued.insert(h) {
                self.queue.push_back(h);
            }
        }
        self.continue_from = match (full, last) {
            (true, Some(last)) => Some((peer, last)),
            _ => None,
        };
        self.poll()
    }

    pub fn on_headers_failed(&mut self, peer: PeerId) -> Vec<SyncAction> {
        if self.headers_from == Some(peer) {
            self.headers_from = None;
        }
        self.poll()
    }

    /// A batch came back (or failed: `received` empty). What the peer did not deliver goes
    /// back to the queue front.
    pub fn on_blocks(&mut self, peer: PeerId, received: &HashSet<Hash>) -> Vec<SyncAction> {
        let batch = self
            .peers
            .get_mut(&peer)
            .map(|p| std::mem::take(&mut p.blocks))
            .unwrap_or_default();
        for h in batch.iter().rev() {
            self.in_flight.remove(h);
            if !received.contains(h) && self.queued.insert(*h) {
                self.queue.push_front(*h);
            }
        }
        // A peer that had none of what it claimed to have is not asked again until it
        // reports a new status.
        if !batch.is_empty() && received.is_empty() {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.status = None;
            }
        }
        self.poll()
    }

    pub fn on_disconnected(&mut self, peer: &PeerId) -> Vec<SyncAction> {
        if let Some(p) = self.peers.remove(peer) {
            for h in p.blocks.iter().rev() {
                self.in_flight.remove(h);
                if self.queued.insert(*h) {
                    self.queue.push_front(*h);
                }
            }
        }
        if self.headers_from == Some(*peer) {
            self.headers_from = None;
        }
        if self.continue_from.is_some_and(|(p, _)| p == *peer) {
            self.continue_from = None;
        }
        self.poll()
    }

    fn ahead(&self, p: &PeerSync) -> bool {
        p.status.is_some_and(|s| s.work > self.ours.work)
    }

    /// Decides what to send next.
    pub fn poll(&mut self) -> Vec<SyncAction> {
        let mut out = vec![];
        // Headers: continue a long sync once the queue has room, or start one with the peer
        // that is furthest ahead.
        if self.headers_from.is_none() && self.queue.len() + MAX_HEADERS <= MAX_QUEUE {
            if let Some((peer, last)) = self.continue_from.take() {
                if self.peers.contains_key(&peer) {
                    self.headers_from = Some(peer);
                    let mut locator = vec![last];
                    locator.extend(self.locator.iter().take(MAX_LOCATOR - 1));
                    out.push(SyncAction::Headers { peer, locator });
                }
            } else if self.queue.is_empty() && self.in_flight.is_empty() {
                let best = self
                    .peers
                    .iter()
                    .filter(|(_, p)| self.ahead(p))
                    .max_by_key(|(_, p)| p.status.map(|s| s.work))
                    .map(|(id, _)| *id);
                if let Some(peer) = best {
                    self.headers_from = Some(peer);
                    out.push(SyncAction::Headers {
                        peer,
                        locator: self.locator.clone(),
                    });
                }
            }
        }
        // Blocks: one batch per idle peer that is ahead, from the window at the queue front.
        let idle: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.blocks.is_empty() && self.ahead(p))
            .map(|(id, _)| *id)
            .collect();
        for peer in idle {
            let room = WINDOW.saturating_sub(self.in_flight.len());
            let n = room.min(MAX_BLOCKS_PER_REQUEST).min(self.queue.len());
            if n == 0 {
                break;
            }
            let hashes: Vec<Hash> = self.queue.drain(..n).collect();
            for h in &hashes {
                self.queued.remove(h);
                self.in_flight.insert(*h, peer);
            }
            self.peers.get_mut(&peer).expect("idle peer").blocks = hashes.clone();
            out.push(SyncAction::Blocks { peer, hashes });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(work: u128) -> ChainStatus {
        ChainStatus {
            chain_id: Hash::of(b"c"),
            height: work as u64,
            tip: Hash::of(&work.to_le_bytes()),
            work,
        }
    }

    fn hashes(n: usize) -> Vec<Hash> {
        (0..n).map(|i| Hash::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn downloads_spread_over_peers_and_failures_requeue() {
        let mut s = Syncer::new(status(1), vec![Hash::ZERO]);
        let (a, b) = (PeerId::random(), PeerId::random());
        let acts = s.on_status(a, status(100));
        assert!(matches!(acts[..], [SyncAction::Headers { peer, .. }] if peer == a));
        assert!(s.on_status(b, status(100)).is_empty());
        let hs = hashes(40);
        let acts = s.on_headers(a, hs.clone(), hs.last().copied(), false);
        let batches: Vec<(PeerId, usize)> = acts
            .iter()
            .filter_map(|x| match x {
                SyncAction::Blocks { peer, hashes } => Some((*peer, hashes.len())),
                _ => None,
            })
            .collect();
        assert_eq!(batches.len(), 2, "both peers serve: {acts:?}");
        assert!(batches.iter().all(|(_, n)| *n == 16));
        assert_eq!(s.pending(), 40);
        // `b` disconnects: its batch returns to the queue and goes to `a` after a's batch.
        let acts = s.on_disconnected(&b);
        assert!(acts.is_empty(), "a is still busy");
        let first_a: HashSet<Hash> = hs[..16].iter().copied().collect();
        let a_batch = if s.in_flight.get(&hs[0]) == Some(&a) {
            first_a
        } else {
            hs[16..32].iter().copied().collect()
        };
        let acts = s.on_blocks(a, &a_batch);
        // b's batch went back to the front of the queue, in order: it is what a asks next,
        // ahead of the 8 hashes never asked for.
        let b_batch: Vec<Hash> = hs[..32]
            .iter()
            .filter(|h| !a_batch.contains(h))
            .copied()
            .collect();
        assert_eq!(b_batch.len(), 16);
        assert_eq!(
            acts,
            vec![SyncAction::Blocks {
                peer: a,
                hashes: b_batch.clone()
            }]
        );
        assert_eq!(s.pending(), 24);
        // a delivers only the second half: the first half goes back to the front, in order,
        // ahead of the 8 still queued.
        let second: HashSet<Hash> = b_batch[8..].iter().copied().collect();
        let acts = s.on_blocks(a, &second);
        let mut want = b_batch[..8].to_vec();
        want.extend(&hs[32..40]);
        assert_eq!(
            acts,
            vec![SyncAction::Blocks {
                peer: a,
                hashes: want
            }]
        );
        assert_eq!(s.pending(), 16);
    }

    #[test]
    fn another_chain_is_disconnected() {
        let mut s = Syncer::new(status(1), vec![]);
        let mut other = status(5);
        other.chain_id = Hash::of(b"other");
        let p = PeerId::random();
        assert_eq!(s.on_status(p, other), vec![SyncAction::Disconnect(p)]);
    }

    #[test]
    fn full_headers_answers_continue_from_the_last_hash() {
        let mut s = Syncer::new(status(1), vec![Hash::ZERO]);
        let a = PeerId::random();
        s.on_status(a, status(5000));
        let hs = hashes(MAX_HEADERS);
        let last = *hs.last().unwrap();
        let acts = s.on_headers(a, hs, Some(last), true);
        assert!(acts
            .iter()
            .any(|x| matches!(x, SyncAction::Headers { locator, .. } if locator[0] == last)));
    }
}
