//! The piece picker: which 16 KiB blocks to ask which peer for.
//!
//! # Invariants (kept by every method)
//! 1. A piece is in at most one of `have` (verified) and `partial` (being downloaded), and it
//!    enters `have` only through [`Picker::piece_verified`], which the caller invokes after the
//!    piece store matched its hash.
//! 2. `availability[i]` is the number of connected peers that have piece `i`, as reported to
//!    [`Picker::add_peer`], [`Picker::peer_has`] and [`Picker::remove_peer`].
//! 3. A block gains a second requester only in the endgame, and never more than
//!    [`ENDGAME_REQUESTERS`]. (Requests made in the endgame may outlive it: a piece that fails
//!    its hash makes its blocks wanted again, which ends the endgame, while the duplicates
//!    already sent for other pieces stay until they arrive or are released.)
//! 4. The endgame holds exactly when nothing is left to ask for the first time: no block is
//!    wanted and every missing piece is partial. Only then may a block gain a second (or
//!    third) requester, and receiving it yields cancels for the others.
//! 5. `wanted` counts the blocks in state `Wanted` across partial pieces.
//!
//! # Order
//! Blocks of pieces already started come first (finish what is open, so pieces verify and
//! can be served sooner). A new piece is chosen at random among the peer's pieces for the first
//! [`RANDOM_FIRST`] pieces (a newcomer needs something to trade quickly, and the rarest pieces
//! are slow to get), then rarest first: the least available among the peer's pieces, ties
//! broken at random.

use std::collections::BTreeMap;
use std::hash::Hash;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::bitfield::Bitfield;

pub const BLOCK_SIZE: u32 = 16 << 10;
/// Pieces chosen at random before rarest-first begins.
pub const RANDOM_FIRST: usize = 4;
/// In the endgame, a block is asked of at most this many peers at once. Two, not more: in a
/// swarm whose peers' uplinks are nearly all in use, every duplicate costs someone's upload
/// (at 16 peers, three requesters made each discard about 2 % of the file).
pub const ENDGAME_REQUESTERS: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockRef {
    pub piece: u32,
    pub block: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum BlockState<P> {
    Wanted,
    Requested(Vec<P>),
    Received,
}

#[derive(Clone, Debug)]
struct Partial<P> {
    blocks: Vec<BlockState<P>>,
    received: usize,
}

/// What receiving a block changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received<P> {
    /// Already received from someone else (an endgame duplicate), or not requested at all.
    pub duplicate: bool,
    /// Requests to cancel: the same block asked of other peers in the endgame.
    pub cancels: Vec<(P, BlockRef)>,
    /// Every block of the piece is in: hand the piece to the store for verification.
    pub piece_complete: bool,
}

pub struct Picker<P> {
    piece_count: usize,
    piece_size: u32,
    size: u64,
    have: Bitfield,
    availability: Vec<u32>,
    partial: BTreeMap<u32, Partial<P>>,
    wanted: usize,
    rng: StdRng,
}

impl<P: Copy + Eq + Hash + std::fmt::Debug> Picker<P> {
    pub fn new(piece_count: usize, piece_size: u32, size: u64, have: Bitfield, seed: u64) -> Self {
        assert_eq!(have.len(), piece_count, "bitfield of the content");
        Picker {
            piece_count,
            piece_size,
            size,
            have,
            availability: vec![0; piece_count],
            partial: BTreeMap::new(),
            wanted: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    pub fn availability(&self, i: usize) -> u32 {
        self.availability[i]
    }

    fn piece_len(&self, i: usize) -> u32 {
        let start = i as u64 * self.piece_size as u64;
        (self.size - start).min(self.piece_size as u64) as u32
    }

    /// The length of a block (the last block of the last piece may be short).
    pub fn block_len(&self, b: BlockRef) -> u32 {
        let plen = self.piece_len(b.piece as usize);
        (plen - b.block * BLOCK_SIZE).min(BLOCK_SIZE)
    }

    fn blocks_in(&self, i: usize) -> usize {
        self.piece_len(i).div_ceil(BLOCK_SIZE) as usize
    }

    /// Invariant 4.
    pub fn in_endgame(&self) -> bool {
        let missing = self.piece_count - self.have.count();
        missing > 0 && self.wanted == 0 && self.partial.len() == missing
    }

    pub fn add_peer(&mut self, pieces: &Bitfield) {
        for i in pieces.ones() {
            self.availability[i] += 1;
        }
    }

    pub fn peer_has(&mut self, i: usize) {
        if i < self.piece_count {
            self.availability[i] += 1;
        }
    }

    /// A peer left with these pieces; its requests must be released with
    /// [`Picker::release_peer`].
    pub fn remove_peer(&mut self, pieces: &Bitfield) {
        for i in pieces.ones() {
            self.availability[i] = self.availability[i].saturating_sub(1);
        }
    }

    /// Whether `peer_pieces` holds anything we still miss.
    pub fn interesting(&self, peer_pieces: &Bitfield) -> bool {
        peer_pieces.ones().any(|i| !self.have.get(i))
    }

    /// Up to `max` blocks to request from `peer`, which has `peer_pieces`.
    pub fn pick(&mut self, peer: P, peer_pieces: &Bitfield, max: usize) -> Vec<BlockRef> {
        let mut out = vec![];
        // 1. Wanted blocks of pieces already started.
        let started: Vec<u32> = self
            .partial
            .keys()
            .copied()
            .filter(|i| peer_pieces.get(*i as usize))
            .collect();
        for i in started {
            self.take_wanted(peer, i, max, &mut out);
            if out.len() >= max {
                return out;
            }
        }
        // 2. New pieces: random first, then rarest first.
        while out.len() < max {
            let candidates: Vec<usize> = (0..self.piece_count)
                .filter(|i| {
                    peer_pieces.get(*i)
                        && !self.have.get(*i)
                        && !self.partial.contains_key(&(*i as u32))
                })
                .collect();
            if candidates.is_empty() {
                break;
            }
            let chosen = if self.have.count() + self.partial.len() < RANDOM_FIRST {
                *candidates.choose(&mut self.rng).expect("not empty")
            } else {
                let min = candidates
                    .iter()
                    .map(|i| self.availability[*i])
                    .min()
                    .expect("not empty");
                let rarest: Vec<usize> = candidates
                    .into_iter()
                    .filter(|i| self.availability[*i] == min)
                    .collect();
                *rarest.choose(&mut self.rng).expect("not empty")
            };
            let n = self.blocks_in(chosen);
            self.partial.insert(
                chosen as u32,
                Partial {
                    blocks: vec![BlockState::Wanted; n],
                    received: 0,
                },
            );
            self.wanted += n;
            self.take_wanted(peer, chosen as u32, max, &mut out);
        }
        // 3. The endgame: blocks already asked of others.
        if out.len() < max && self.in_endgame() {
            for (&piece, p) in self.partial.iter_mut() {
                if !peer_pieces.get(piece as usize) {
                    continue;
                }
                for (block, st) in p.blocks.iter_mut().enumerate() {
                    if out.len() >= max {
                        return out;
                    }
                    if let BlockState::Requested(peers) = st {
                        if !peers.contains(&peer) && peers.len() < ENDGAME_REQUESTERS {
                            peers.push(peer);
                            out.push(BlockRef {
                                piece,
                                block: block as u32,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    fn take_wanted(&mut self, peer: P, piece: u32, max: usize, out: &mut Vec<BlockRef>) {
        let Some(p) = self.partial.get_mut(&piece) else {
            return;
        };
        for (block, st) in p.blocks.iter_mut().enumerate() {
            if out.len() >= max {
                return;
            }
            if *st == BlockState::Wanted {
                *st = BlockState::Requested(vec![peer]);
                self.wanted -= 1;
                out.push(BlockRef {
                    piece,
                    block: block as u32,
                });
            }
        }
    }

    /// A block arrived from `peer`.
    pub fn block_received(&mut self, peer: P, b: BlockRef) -> Received<P> {
        let none = Received {
            duplicate: true,
            cancels: vec![],
            piece_complete: false,
        };
        let Some(p) = self.partial.get_mut(&b.piece) else {
            return none;
        };
        let Some(st) = p.blocks.get_mut(b.block as usize) else {
            return none;
        };
        let cancels = match st {
            BlockState::Received => return none,
            BlockState::Wanted => {
                // Unrequested, but welcome (e.g. a request released just before it came).
                self.wanted -= 1;
                vec![]
            }
            BlockState::Requested(peers) => peers
                .iter()
                .filter(|q| **q != peer)
                .map(|q| (*q, b))
                .collect(),
        };
        *st = BlockState::Received;
        p.received += 1;
        Received {
            duplicate: false,
            cancels,
            piece_complete: p.received == p.blocks.len(),
        }
    }

    /// The store verified piece `i` (invariant 1).
    pub fn piece_verified(&mut self, i: usize) {
        if let Some(p) = self.partial.remove(&(i as u32)) {
            self.wanted -= p
                .blocks
                .iter()
                .filter(|s| **s == BlockState::Wanted)
                .count();
        }
        self.have.set(i);
    }

    /// Piece `i` failed its hash: all of its blocks are wanted again.
    pub fn piece_failed(&mut self, i: usize) {
        if let Some(p) = self.partial.get_mut(&(i as u32)) {
            for st in p.blocks.iter_mut() {
                if *st != BlockState::Wanted {
                    *st = BlockState::Wanted;
                    self.wanted += 1;
                }
            }
            p.received = 0;
        }
    }

    /// Withdraws `peer` from these requests (it choked us, or a request failed).
    pub fn release(&mut self, peer: P, blocks: &[BlockRef]) {
        for b in blocks {
            let Some(p) = self.partial.get_mut(&b.piece) else {
                continue;
            };
            if let Some(st @ BlockState::Requested(_)) = p.blocks.get_mut(b.block as usize) {
                if let BlockState::Requested(peers) = st {
                    peers.retain(|q| *q != peer);
                    if peers.is_empty() {
                        *st = BlockState::Wanted;
                        self.wanted += 1;
                    }
                }
            }
        }
    }

    /// Withdraws every request of `peer` (it left).
    pub fn release_peer(&mut self, peer: P) {
        let mine: Vec<BlockRef> = self
            .partial
            .iter()
            .flat_map(|(&piece, p)| {
                p.blocks
                    .iter()
                    .enumerate()
                    .filter_map(move |(block, st)| match st {
                        BlockState::Requested(peers) if peers.contains(&peer) => Some(BlockRef {
                            piece,
                            block: block as u32,
                        }),
                        _ => None,
                    })
            })
            .collect();
        self.release(peer, &mine);
    }

    /// Checks invariants 1, 3 (its bound) and 5 from the state; the property tests check the
    /// rest over event sequences.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut wanted = 0;
        for (&i, p) in &self.partial {
            if self.have.get(i as usize) {
                return Err(format!("piece {i} is both verified and partial"));
            }
            for (b, st) in p.blocks.iter().enumerate() {
                match st {
                    BlockState::Wanted => wanted += 1,
                    BlockState::Requested(peers) if peers.is_empty() => {
                        return Err(format!("block {i}/{b} requested of nobody"))
                    }
                    BlockState::Requested(peers) if peers.len() > ENDGAME_REQUESTERS => {
                        return Err(format!("block {i}/{b} asked of {} peers", peers.len()))
                    }
                    _ => {}
                }
            }
        }
        if wanted != self.wanted {
            return Err(format!("wanted count {} but {wanted} wanted", self.wanted));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u32 = 4 * BLOCK_SIZE;

    fn bits(len: usize, ones: &[usize]) -> Bitfield {
        let mut b = Bitfield::new(len);
        for i in ones {
            b.set(*i);
        }
        b
    }

    #[test]
    fn rarest_first_after_the_random_start() {
        let n = 10;
        let mut p: Picker<u8> = Picker::new(n, PS, n as u64 * PS as u64, bits(n, &[0, 1, 2, 3]), 1);
        // Availability: piece 7 on one peer, the rest on three.
        let everyone = Bitfield::full(n);
        p.add_peer(&everyone);
        p.add_peer(&everyone);
        p.add_peer(&bits(n, &[4, 5, 6, 8, 9]));
        let got = p.pick(9, &everyone, 4);
        assert!(got.iter().all(|b| b.piece == 7), "{got:?}");
        p.check_invariants().unwrap();
    }

    #[test]
    fn endgame_only_at_the_end_with_cancels() {
        let n = 2;
        let size = 2 * PS as u64;
        let mut p: Picker<u8> = Picker::new(n, PS, size, Bitfield::new(n), 2);
        let all = Bitfield::full(n);
        p.add_peer(&all);
        p.add_peer(&all);
        let a = p.pick(1, &all, 7);
        assert_eq!(a.len(), 7);
        assert!(!p.in_endgame(), "one block is still wanted");
        let b = p.pick(2, &all, 1);
        assert_eq!(b.len(), 1, "peer 2 gets the one block left");
        assert!(!a.contains(&b[0]), "not a duplicate");
        assert!(p.in_endgame());
        let dup = p.pick(2, &all, 8);
        assert_eq!(
            dup.len(),
            7,
            "endgame: peer 2 may now double peer 1's requests"
        );
        p.check_invariants().unwrap();
        let r = p.block_received(2, dup[0]);
        assert_eq!(r.cancels, vec![(1, dup[0])]);
        assert!(p.block_received(1, dup[0]).duplicate);
    }

    #[test]
    fn released_and_failed_blocks_are_wanted_again() {
        let n = 1;
        let mut p: Picker<u8> = Picker::new(n, PS, PS as u64, Bitfield::new(n), 3);
        let all = Bitfield::full(n);
        p.add_peer(&all);
        let got = p.pick(1, &all, 4);
        p.release_peer(1);
        p.check_invariants().unwrap();
        assert_eq!(p.pick(2, &all, 4), got);
        for b in &got {
            p.block_received(2, *b);
        }
        p.piece_failed(0);
        p.check_invariants().unwrap();
        assert_eq!(p.pick(3, &all, 4).len(), 4);
        p.piece_verified(0);
        assert!(p.is_complete());
        p.check_invariants().unwrap();
    }
}
