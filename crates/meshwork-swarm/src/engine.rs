//! One content's swarm session, sans-IO: the piece protocol's state per peer, driving the
//! store, the picker, the choker and (for an initial seeder) the super-seeder.
//!
//! The driver (the node's content service) owns the streams. It tells the engine what happened
//! ([`Engine::add_peer`], [`Engine::handle`], [`Engine::remove_peer`], [`Engine::tick`]) and
//! pulls what to do: [`Engine::poll_send`] for the next message to a peer (control messages
//! first, then one served block, only while that peer's stream has room: the engine never
//! builds an unbounded backlog of data), and [`Engine::poll_event`] for disconnects, bans and
//! progress. Time is passed in (`now`), as in quinn-proto, so tests control it.
//!
//! # Invariants
//! 1. A peer is known to the picker (its pieces counted in availability) exactly while it is in
//!    `peers` and has sent its bitfield; [`Engine::remove_peer`] undoes both, and releases its
//!    requests.
//! 2. `peer.requested` holds exactly the blocks the picker has recorded as asked of that peer
//!    (released together on choke, timeout, cancel and removal), and never more than
//!    [`MAX_DEPTH`].
//! 3. `peer.their_requests` never exceeds [`MAX_QUEUED_REQUESTS`]; a peer that pushes it over
//!    is disconnected. Requests are served only while the peer is unchoked, and only for
//!    verified pieces (the store refuses the rest).
//! 4. `peer.wanted_from` counts the pieces the peer has and we lack: we are interested in it
//!    exactly when it is non-zero (and we sent `Interested` / `NotInterested` on each change).
//! 5. A piece's bytes reach the store only whole, and the store checks them against the
//!    manifest's hash; a block is accepted only from a peer we asked for it.
//!
//! # Corrupt pieces
//! A piece that fails its hash was assembled from blocks of one or more peers. With one
//! contributor, that peer gets a strike at once. With several, the failed blocks are kept
//! (bounded by [`MAX_SUSPECT_BYTES`]) until the piece verifies from a later download; the
//! peers whose blocks differ from the verified bytes get a strike. Either way no honest peer is
//! blamed. [`MAX_STRIKES`] strikes ban the peer from this content.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::bitfield::Bitfield;
use crate::choker::{Choker, ChokerConfig, RECHOKE_INTERVAL};
use crate::manifest::Manifest;
use crate::picker::{BlockRef, Picker, BLOCK_SIZE};
use crate::store::PieceStore;
use crate::superseed::SuperSeeder;
use crate::wire::Msg;

/// Requests a peer may have queued with us; beyond this it is disconnected.
pub const MAX_QUEUED_REQUESTS: usize = 512;
/// Requests we keep outstanding with one peer, at most (below `MAX_QUEUED_REQUESTS`, which is
/// what other Meshwork nodes accept).
pub const MAX_DEPTH: usize = 500;
/// Requests we start a peer with, before its rate is known.
pub const INITIAL_DEPTH: usize = 16;
/// In the endgame, a peer is asked for more (blocks already asked of others) only while it
/// has fewer requests than this outstanding: duplicates keep idle peers busy rather than
/// fill every queue. Filling queues to their depth (a second of data) made each of 16
/// leechers discard 1.9 % of the file in duplicates (`meshwork lab run distribution`).
pub const ENDGAME_DEPTH: usize = 4;
/// The queue depth covers this much time at the peer's measured rate: enough to keep the link
/// busy across a round trip and the uploader's scheduling delays.
pub const DEPTH_WINDOW: Duration = Duration::from_secs(1);
/// Bad pieces before a peer is banned from the content.
pub const MAX_STRIKES: u32 = 2;
/// Failed multi-source pieces kept for blame, in bytes at most.
pub const MAX_SUSPECT_BYTES: usize = 64 << 20;
/// A request unanswered this long is withdrawn, and the peer asked for nothing more until it
/// delivers (the picker gives the block to someone else).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A super-seeding peer that got its offer but could not pass it on this long gets the next.
pub const SUPERSEED_PATIENCE: Duration = Duration::from_secs(10);
/// Blocks a peer may send that we neither asked it for nor want (cancelled in flight, endgame
/// duplicates) before it is disconnected. An unrequested block we still want is taken.
pub const MAX_UNSOLICITED: u32 = 1024;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Offer pieces one at a time instead of a bitfield (a complete initial seed only).
    pub super_seed: bool,
    pub choker: ChokerConfig,
    /// Peers at once, at most.
    pub max_peers: usize,
    pub seed: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            super_seed: false,
            choker: ChokerConfig::default(),
            max_peers: 50,
            seed: rand::random(),
        }
    }
}

/// What the driver must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent<P> {
    /// Close the stream with `peer`; with `ban`, refuse it for this content from now on.
    Disconnect { peer: P, reason: String, ban: bool },
    /// Every piece is verified (the file is complete; the store has flushed).
    Completed,
    /// The disk failed; the session cannot go on.
    StoreFailed(String),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    pub pieces: usize,
    pub pieces_have: usize,
    pub size: u64,
    pub bytes_have: u64,
    /// Block bytes received and sent (payload only), since this session started.
    pub downloaded: u64,
    pub uploaded: u64,
    /// Bytes received that were not used: duplicates, unsolicited, pieces that failed.
    pub wasted: u64,
    pub down_rate: f64,
    pub up_rate: f64,
    pub bad_pieces: u32,
}

/// A moving average of a byte rate, updated on each tick.
#[derive(Clone, Debug, Default)]
struct Rate {
    pending: u64,
    per_s: f64,
}

impl Rate {
    fn add(&mut self, n: usize) {
        self.pending += n as u64;
    }

    fn update(&mut self, dt: Duration) {
        let s = dt.as_secs_f64();
        if s <= 0.0 {
            return;
        }
        let sample = self.pending as f64 / s;
        self.pending = 0;
        // About a 3-tick memory: quick enough for choking and queue depth, smooth enough to not
        // flap.
        self.per_s = if self.per_s == 0.0 {
            sample
        } else {
            0.7 * self.per_s + 0.3 * sample
        };
    }
}

struct Peer {
    pieces: Bitfield,
    bitfield_seen: bool,
    /// Invariant 4.
    wanted_from: usize,
    am_interested: bool,
    /// It chokes us (the initial state).
    choking_us: bool,
    /// Invariant 2, with the time each was sent.
    requested: HashMap<BlockRef, Instant>,
    depth: usize,
    /// Its requests to us, in order (invariant 3).
    their_requests: VecDeque<(u32, u32, u32)>,
    /// Control messages to send, ahead of data.
    outbox: VecDeque<Msg>,
    down: Rate,
    up: Rate,
    strikes: u32,
    unsolicited: u32,
    /// A request of ours went unanswered for [`REQUEST_TIMEOUT`]: it is asked for nothing
    /// until it delivers a block (a late answer clears it), so its withdrawn blocks go to
    /// other peers rather than straight back to it.
    stalled: bool,
    /// Super-seeding: when it completed its current offer.
    offer_done: Option<Instant>,
}

impl Peer {
    fn new(pieces: usize) -> Self {
        Peer {
            pieces: Bitfield::new(pieces),
            bitfield_seen: false,
            wanted_from: 0,
            am_interested: false,
            choking_us: true,
            requested: HashMap::new(),
            depth: INITIAL_DEPTH,
            their_requests: VecDeque::new(),
            outbox: VecDeque::new(),
            down: Rate::default(),
            up: Rate::default(),
            strikes: 0,
            unsolicited: 0,
            stalled: false,
            offer_done: None,
        }
    }
}

/// A block of a failed piece, kept for blame: its sender, its index and its bytes.
type SuspectBlock<P> = (P, u32, Vec<u8>);

/// A piece being assembled: its bytes and who sent each block.
struct Assembly<P> {
    data: Vec<u8>,
    from: Vec<Option<P>>,
}

pub struct Engine<P> {
    store: PieceStore,
    picker: Picker<P>,
    choker: Choker<P>,
    superseed: Option<SuperSeeder<P>>,
    cfg: EngineConfig,
    peers: HashMap<P, Peer>,
    assembling: HashMap<u32, Assembly<P>>,
    /// Failed multi-source pieces: (piece, its blocks with their senders), oldest first.
    suspects: VecDeque<(u32, Vec<SuspectBlock<P>>)>,
    suspect_bytes: usize,
    events: VecDeque<EngineEvent<P>>,
    last_tick: Instant,
    last_rechoke: Instant,
    rechoke_due: bool,
    rng: StdRng,
    downloaded: u64,
    uploaded: u64,
    wasted: u64,
    bad_pieces: u32,
    down: Rate,
    up: Rate,
}

impl<P: Copy + Eq + Hash + Ord + std::fmt::Debug> Engine<P> {
    pub fn new(store: PieceStore, mut cfg: EngineConfig, now: Instant) -> Self {
        let m = store.manifest();
        let n = m.piece_count();
        let picker = Picker::new(n, m.piece_size, m.size, store.have().clone(), cfg.seed);
        let superseed = (cfg.super_seed && store.is_complete()).then(|| SuperSeeder::new(n));
        cfg.super_seed = superseed.is_some();
        if cfg.super_seed {
            // Offers, not slots, ration a super-seeder's upload (one piece per peer at a time),
            // so every interested peer is unchoked: a choked peer could not take its offer.
            cfg.choker.slots = cfg.max_peers;
        }
        Engine {
            picker,
            choker: Choker::new(cfg.choker.clone()),
            superseed,
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            store,
            peers: HashMap::new(),
            assembling: HashMap::new(),
            suspects: VecDeque::new(),
            suspect_bytes: 0,
            events: VecDeque::new(),
            last_tick: now,
            last_rechoke: now,
            rechoke_due: false,
            downloaded: 0,
            uploaded: 0,
            wasted: 0,
            bad_pieces: 0,
            down: Rate::default(),
            up: Rate::default(),
        }
    }

    pub fn manifest(&self) -> &Manifest {
        self.store.manifest()
    }

    /// Ends the session and hands back its store (to forget pieces that failed a re-check
    /// and start a fresh session over the rest: every peer's state goes with this one).
    pub fn into_store(self) -> PieceStore {
        self.store
    }

    pub fn store(&self) -> &PieceStore {
        &self.store
    }

    pub fn is_complete(&self) -> bool {
        self.store.is_complete()
    }

    pub fn has_peer(&self, p: &P) -> bool {
        self.peers.contains_key(p)
    }

    pub fn progress(&self) -> Progress {
        Progress {
            pieces: self.store.manifest().piece_count(),
            pieces_have: self.store.have().count(),
            size: self.store.manifest().size,
            bytes_have: self.store.verified_bytes(),
            downloaded: self.downloaded,
            uploaded: self.uploaded,
            wasted: self.wasted,
            down_rate: self.down.per_s,
            up_rate: self.up.per_s,
            bad_pieces: self.bad_pieces,
        }
    }

    /// Flushes verified pieces to the journal (the driver calls this before stopping).
    pub fn flush(&mut self) -> Result<(), String> {
        self.store.flush().map_err(|e| e.to_string())
    }

    /// A peer completed the handshake. Refused (returns false) when the session is full.
    pub fn add_peer(&mut self, p: P, _now: Instant) -> bool {
        if self.peers.contains_key(&p) || self.peers.len() >= self.cfg.max_peers {
            return false;
        }
        let n = self.store.manifest().piece_count();
        let mut peer = Peer::new(n);
        // A super-seeder shows nothing; its offers follow the peer's bitfield.
        let ours = if self.superseed.is_some() {
            Bitfield::new(n)
        } else {
            self.store.have().clone()
        };
        peer.outbox
            .push_back(Msg::Bitfield(ours.as_bytes().to_vec()));
        self.peers.insert(p, peer);
        self.choker.stats(p);
        true
    }

    /// The stream with `p` closed (or the driver closed it).
    pub fn remove_peer(&mut self, p: &P) {
        let Some(peer) = self.peers.remove(p) else {
            return;
        };
        if peer.bitfield_seen {
            self.picker.remove_peer(&peer.pieces);
        }
        self.picker.release_peer(*p);
        let was_unchoked = self.choker.is_unchoked(p);
        self.choker.remove(p);
        if let Some(s) = &mut self.superseed {
            let offers = s.remove_peer(p);
            self.deliver_offers(offers);
        }
        if was_unchoked {
            self.rechoke_due = true;
        }
    }

    fn violation(&mut self, p: P, reason: String) {
        self.remove_peer(&p);
        self.events.push_back(EngineEvent::Disconnect {
            peer: p,
            reason,
            ban: false,
        });
    }

    /// A message from `p` (after the handshake; `Hello`, `GetManifest`, `Manifest` and peer
    /// exchange are the driver's).
    pub fn handle(&mut self, p: P, msg: Msg, now: Instant) {
        let Some(peer) = self.peers.get(&p) else {
            return;
        };
        let m = self.store.manifest();
        let pieces = m.piece_count() as u32;
        if let Err(e) = msg.check(pieces, |i| m.piece_len(i as usize)) {
            return self.violation(p, e.to_string());
        }
        if !peer.bitfield_seen && !matches!(msg, Msg::Bitfield(_)) {
            return self.violation(
                p,
                "the first message after hello must be the bitfield".into(),
            );
        }
        match msg {
            Msg::Bitfield(bytes) => self.on_bitfield(p, &bytes, now),
            Msg::Have(i) => self.on_have(p, i, now),
            Msg::Interested => {
                self.choker.stats(p).interested = true;
                self.rechoke_due = true;
            }
            Msg::NotInterested => {
                self.choker.stats(p).interested = false;
                if self.choker.is_unchoked(&p) {
                    self.rechoke_due = true;
                }
            }
            Msg::Choke => {
                let peer = self.peers.get_mut(&p).expect("checked");
                peer.choking_us = true;
                let blocks: Vec<BlockRef> = peer.requested.drain().map(|(b, _)| b).collect();
                self.picker.release(p, &blocks);
                self.choker.stats(p).unchoked_us_since = None;
            }
            Msg::Unchoke => {
                let peer = self.peers.get_mut(&p).expect("checked");
                if peer.choking_us {
                    peer.choking_us = false;
                    self.choker.stats(p).unchoked_us_since = Some(now);
                    self.fill_requests(p, now);
                }
            }
            Msg::Request { piece, offset, len } => self.on_request(p, piece, offset, len),
            Msg::Cancel { piece, offset, len } => {
                let peer = self.peers.get_mut(&p).expect("checked");
                peer.their_requests.retain(|r| *r != (piece, offset, len));
            }
            Msg::Piece {
                piece,
                offset,
                data,
            } => self.on_block(p, piece, offset, data, now),
            Msg::Hello { .. } | Msg::GetManifest(_) | Msg::Manifest(_) | Msg::Peers(_) => {}
        }
    }

    fn on_bitfield(&mut self, p: P, bytes: &[u8], now: Instant) {
        let n = self.store.manifest().piece_count();
        let peer = self.peers.get_mut(&p).expect("checked");
        if peer.bitfield_seen {
            return self.violation(p, "a second bitfield".into());
        }
        let Ok(bits) = Bitfield::from_bytes(bytes, n) else {
            return self.violation(p, "a bitfield with bits past the last piece".into());
        };
        peer.bitfield_seen = true;
        peer.wanted_from = bits.ones().filter(|i| !self.picker.have().get(*i)).count();
        peer.pieces = bits.clone();
        self.picker.add_peer(&bits);
        if let Some(s) = &mut self.superseed {
            let offers = s.add_peer(p, bits);
            self.deliver_offers(offers);
        }
        self.update_interest(p, now);
    }

    fn on_have(&mut self, p: P, i: u32, now: Instant) {
        let we_have = self.picker.have().get(i as usize);
        let peer = self.peers.get_mut(&p).expect("checked");
        if peer.pieces.set(i as usize) {
            self.picker.peer_has(i as usize);
            if !we_have {
                peer.wanted_from += 1;
            }
        }
        if let Some(s) = &mut self.superseed {
            let offers = s.peer_has(p, i);
            let no_offer = s.has_no_offer(&p);
            self.deliver_offers(offers);
            // Out of offers (its credit spent, or the others' turn): the patience clock
            // starts.
            if let Some(peer) = self.peers.get_mut(&p) {
                if no_offer && peer.offer_done.is_none() {
                    peer.offer_done = Some(now);
                }
            }
        }
        self.update_interest(p, now);
    }

    /// Super-seeding: sends each new offer to its peer as a `Have`.
    fn deliver_offers(&mut self, offers: Vec<(P, u32)>) {
        for (q, piece) in offers {
            if let Some(qp) = self.peers.get_mut(&q) {
                qp.offer_done = None;
                qp.outbox.push_back(Msg::Have(piece));
            }
        }
    }

    /// Sends `Interested` / `NotInterested` on a change (invariant 4), and asks for blocks.
    fn update_interest(&mut self, p: P, now: Instant) {
        let Some(peer) = self.peers.get_mut(&p) else {
            return;
        };
        let want = peer.wanted_from > 0;
        if want != peer.am_interested {
            peer.am_interested = want;
            peer.outbox.push_back(if want {
                Msg::Interested
            } else {
                Msg::NotInterested
            });
        }
        if want && !peer.choking_us {
            self.fill_requests(p, now);
        }
    }

    /// A block from `p` that we did not ask for and do not want: waste, and past
    /// [`MAX_UNSOLICITED`] of them a violation.
    fn unsolicited(&mut self, p: P, len: usize) {
        self.wasted += len as u64;
        let Some(peer) = self.peers.get_mut(&p) else {
            return;
        };
        peer.unsolicited += 1;
        if peer.unsolicited > MAX_UNSOLICITED {
            self.violation(p, format!("more than {MAX_UNSOLICITED} unrequested blocks"));
        }
    }

    fn on_request(&mut self, p: P, piece: u32, offset: u32, len: u32) {
        if let Some(s) = &self.superseed {
            if !s.allowed(&p, piece) {
                return; // not offered to this peer: ignored, as BEP 16 does
            }
        }
        if !self.choker.is_unchoked(&p) || !self.store.have().get(piece as usize) {
            // A request racing our choke, or for a piece we do not have (it may have read an
            // old bitfield): dropped. The requester times it out.
            return;
        }
        let peer = self.peers.get_mut(&p).expect("checked");
        if peer.their_requests.len() >= MAX_QUEUED_REQUESTS {
            return self.violation(
                p,
                format!("more than {MAX_QUEUED_REQUESTS} queued requests"),
            );
        }
        peer.their_requests.push_back((piece, offset, len));
    }

    fn on_block(&mut self, p: P, piece: u32, offset: u32, data: Vec<u8>, now: Instant) {
        let len = data.len();
        let b = BlockRef {
            piece,
            block: offset / BLOCK_SIZE,
        };
        let peer = self.peers.get_mut(&p).expect("checked");
        peer.down.add(len);
        self.down.add(len);
        self.downloaded += len as u64;
        // A block we did not ask this peer for (or no longer: it was in flight when the peer
        // choked us and we released it) is still taken if the picker wants it; only one it
        // has no use for is waste, and counts toward the unsolicited limit.
        let aligned = offset.is_multiple_of(BLOCK_SIZE);
        let asked = aligned && peer.requested.remove(&b).is_some();
        if asked {
            self.choker.stats(p).last_block = Some(now);
        }
        if !aligned || len as u32 != self.picker.block_len(b) {
            if asked {
                return self.violation(p, format!("block {piece}/{} of {len} bytes", b.block));
            }
            return self.unsolicited(p, len);
        }
        // A well-formed block: the peer is alive again (see `Peer::stalled`).
        if let Some(peer) = self.peers.get_mut(&p) {
            peer.stalled = false;
        }
        let r = self.picker.block_received(p, b);
        if r.duplicate && !asked {
            return self.unsolicited(p, len);
        }
        for (q, cb) in r.cancels {
            if let Some(qp) = self.peers.get_mut(&q) {
                if qp.requested.remove(&cb).is_some() {
                    qp.outbox.push_back(Msg::Cancel {
                        piece: cb.piece,
                        offset: cb.block * BLOCK_SIZE,
                        len: self.picker.block_len(cb),
                    });
                }
            }
        }
        if r.duplicate {
            self.wasted += len as u64;
        } else {
            let plen = self.store.manifest().piece_len(piece as usize) as usize;
            let blocks = plen.div_ceil(BLOCK_SIZE as usize);
            let a = self.assembling.entry(piece).or_insert_with(|| Assembly {
                data: vec![0; plen],
                from: vec![None; blocks],
            });
            a.data[offset as usize..offset as usize + len].copy_from_slice(&data);
            a.from[b.block as usize] = Some(p);
            if r.piece_complete {
                self.piece_done(piece, now);
            }
        }
        self.fill_requests(p, now);
    }

    fn piece_done(&mut self, piece: u32, now: Instant) {
        let Some(a) = self.assembling.remove(&piece) else {
            return;
        };
        match self.store.write_piece(piece as usize, &a.data) {
            Ok(true) => {
                self.picker.piece_verified(piece as usize);
                self.blame_suspects(piece, &a.data);
                let ids: Vec<P> = self.peers.keys().copied().collect();
                for q in ids {
                    let qp = self.peers.get_mut(&q).expect("listed");
                    if qp.pieces.get(piece as usize) {
                        qp.wanted_from -= 1;
                    }
                    qp.outbox.push_back(Msg::Have(piece));
                    self.update_interest(q, now);
                }
                // Only a newly verified piece gets here, so completion is seen exactly once.
                if self.store.is_complete() {
                    if let Err(e) = self.store.flush() {
                        self.events
                            .push_back(EngineEvent::StoreFailed(e.to_string()));
                    }
                    self.events.push_back(EngineEvent::Completed);
                    // A seed ranks by what peers take; rechoke under the new rule.
                    self.rechoke_due = true;
                }
            }
            Ok(false) => {
                self.bad_pieces += 1;
                self.wasted += a.data.len() as u64;
                self.picker.piece_failed(piece as usize);
                let senders: HashSet<P> = a.from.iter().flatten().copied().collect();
                if senders.len() == 1 {
                    let culprit = *senders.iter().next().expect("one");
                    self.strike(culprit, piece);
                } else {
                    let blocks: Vec<SuspectBlock<P>> = a
                        .from
                        .iter()
                        .enumerate()
                        .filter_map(|(bi, s)| {
                            let s = (*s)?;
                            let start = bi * BLOCK_SIZE as usize;
                            let end = (start + BLOCK_SIZE as usize).min(a.data.len());
                            Some((s, bi as u32, a.data[start..end].to_vec()))
                        })
                        .collect();
                    self.suspect_bytes += a.data.len();
                    self.suspects.push_back((piece, blocks));
                    while self.suspect_bytes > MAX_SUSPECT_BYTES {
                        let Some((_, old)) = self.suspects.pop_front() else {
                            break;
                        };
                        self.suspect_bytes -= old.iter().map(|b| b.2.len()).sum::<usize>();
                    }
                }
            }
            Err(e) => self
                .events
                .push_back(EngineEvent::StoreFailed(e.to_string())),
        }
    }

    /// The piece verified: peers whose earlier blocks of it differ sent corrupt data.
    fn blame_suspects(&mut self, piece: u32, good: &[u8]) {
        let mut culprits = HashSet::new();
        self.suspects.retain(|(i, blocks)| {
            if *i != piece {
                return true;
            }
            for (p, bi, bytes) in blocks {
                let start = *bi as usize * BLOCK_SIZE as usize;
                if good.get(start..start + bytes.len()) != Some(bytes.as_slice()) {
                    culprits.insert(*p);
                }
                self.suspect_bytes -= bytes.len();
            }
            false
        });
        for p in culprits {
            self.strike(p, piece);
        }
    }

    fn strike(&mut self, p: P, piece: u32) {
        let Some(peer) = self.peers.get_mut(&p) else {
            return;
        };
        peer.strikes += 1;
        if peer.strikes >= MAX_STRIKES {
            let n = peer.strikes;
            self.remove_peer(&p);
            self.events.push_back(EngineEvent::Disconnect {
                peer: p,
                reason: format!("{n} pieces failed their hash (the last: piece {piece})"),
                ban: true,
            });
        }
    }

    /// Tops up `p`'s request queue to its depth.
    fn fill_requests(&mut self, p: P, now: Instant) {
        let Some(peer) = self.peers.get_mut(&p) else {
            return;
        };
        let depth = if self.picker.in_endgame() {
            ENDGAME_DEPTH.min(peer.depth)
        } else {
            peer.depth
        };
        if peer.choking_us || peer.stalled || peer.wanted_from == 0 || peer.requested.len() >= depth
        {
            return;
        }
        let room = depth - peer.requested.len();
        let picked = self.picker.pick(p, &peer.pieces, room);
        for b in picked {
            peer.requested.insert(b, now);
            peer.outbox.push_back(Msg::Request {
                piece: b.piece,
                offset: b.block * BLOCK_SIZE,
                len: self.picker.block_len(b),
            });
        }
    }

    /// The next message for `p`, if any: control messages first, then one block it asked for.
    /// The driver calls it while `p`'s stream has room.
    pub fn poll_send(&mut self, p: &P) -> Option<Msg> {
        let peer = self.peers.get_mut(p)?;
        if let Some(m) = peer.outbox.pop_front() {
            return Some(m);
        }
        let (piece, offset, len) = peer.their_requests.pop_front()?;
        match self.store.read(piece as usize, offset, len) {
            Ok(data) => {
                peer.up.add(data.len());
                self.up.add(data.len());
                self.uploaded += data.len() as u64;
                Some(Msg::Piece {
                    piece,
                    offset,
                    data,
                })
            }
            Err(e) => {
                self.events
                    .push_back(EngineEvent::StoreFailed(e.to_string()));
                None
            }
        }
    }

    /// The next control message for `p`, never data (for a link with no room for data).
    pub fn poll_control(&mut self, p: &P) -> Option<Msg> {
        self.peers.get_mut(p)?.outbox.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<EngineEvent<P>> {
        self.events.pop_front()
    }

    /// Periodic work (the driver calls it about once a second): rates, queue depths, request
    /// timeouts, super-seeding patience and the rechoke.
    pub fn tick(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last_tick);
        if dt >= Duration::from_millis(200) {
            self.last_tick = now;
            self.down.update(dt);
            self.up.update(dt);
            let ids: Vec<P> = self.peers.keys().copied().collect();
            for p in ids {
                let peer = self.peers.get_mut(&p).expect("listed");
                peer.down.update(dt);
                peer.up.update(dt);
                let want = (peer.down.per_s * DEPTH_WINDOW.as_secs_f64() / BLOCK_SIZE as f64).ceil()
                    as usize;
                peer.depth = want.clamp(INITIAL_DEPTH, MAX_DEPTH);
                let s = self.choker.stats(p);
                s.down_rate = peer.down.per_s;
                s.up_rate = peer.up.per_s;
                let late = peer
                    .requested
                    .values()
                    .any(|t| now.saturating_duration_since(*t) >= REQUEST_TIMEOUT);
                if late {
                    // Withdraw everything asked of a stalled peer, not just the late blocks:
                    // the rest is queued behind them.
                    let all: Vec<BlockRef> = peer.requested.drain().map(|(b, _)| b).collect();
                    peer.stalled = true;
                    self.picker.release(p, &all);
                }
                let peer = self.peers.get_mut(&p).expect("listed");
                if let Some(s) = &mut self.superseed {
                    // A peer that took its offers but found nobody to pass them to is
                    // forgiven after a while (the fill below then offers it more).
                    let patience_over = peer.offer_done.is_some_and(|done| {
                        now.saturating_duration_since(done) >= SUPERSEED_PATIENCE
                    });
                    if patience_over {
                        peer.offer_done = None;
                        s.forgive(&p);
                    }
                }
                self.fill_requests(p, now);
            }
            if let Some(s) = &mut self.superseed {
                let offers = s.fill();
                self.deliver_offers(offers);
            }
        }
        if self.rechoke_due || now.saturating_duration_since(self.last_rechoke) >= RECHOKE_INTERVAL
        {
            self.rechoke(now);
        }
    }

    fn rechoke(&mut self, now: Instant) {
        self.rechoke_due = false;
        self.last_rechoke = now;
        let seeding = self.store.is_complete();
        for (p, unchoke) in self.choker.rechoke(now, seeding, &mut self.rng) {
            if let Some(peer) = self.peers.get_mut(&p) {
                if unchoke {
                    peer.outbox.push_back(Msg::Unchoke);
                } else {
                    peer.their_requests.clear();
                    peer.outbox.push_back(Msg::Choke);
                }
            }
        }
    }

    /// Runs a due rechoke now (interest changes set one); cheap when none is due.
    pub fn rechoke_if_due(&mut self, now: Instant) {
        if self.rechoke_due {
            self.rechoke(now);
        }
    }

    /// Checks the invariants that can be read off the state (tests call it after every step).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.picker.check_invariants()?;
        for (p, peer) in &self.peers {
            if peer.requested.len() > MAX_DEPTH {
                return Err(format!("{p:?}: {} requests", peer.requested.len()));
            }
            if peer.their_requests.len() > MAX_QUEUED_REQUESTS {
                return Err(format!("{p:?}: {} queued", peer.their_requests.len()));
            }
            if peer.bitfield_seen {
                let lack = peer
                    .pieces
                    .ones()
                    .filter(|i| !self.picker.have().get(*i))
                    .count();
                if lack != peer.wanted_from {
                    return Err(format!(
                        "{p:?}: wanted_from {} but lacks {lack}",
                        peer.wanted_from
                    ));
                }
            }
        }
        if self.picker.have() != self.store.have() {
            return Err("picker and store disagree on what is verified".into());
        }
        Ok(())
    }
}
