//! Super-seeding (BEP 16's idea): an initial seeder that uploads close to one copy.
//!
//! The seeder shows each peer no bitfield. It offers each peer one piece at a time (a `have`),
//! always a piece no peer has or has been offered, and serves only requests for the piece it
//! offered to that peer. A peer gets its next offer only when the piece it was offered shows up
//! at **another** peer (a `have` from someone else): proof that it passed the piece on. Pieces
//! then leave the seeder about once each, and the swarm copies them among itself. Once every
//! piece is somewhere in the swarm, nothing more is offered (BEP 16 goes on offering the least
//! copied piece, which is how its seeders upload 1.2 to 1.5 copies).
//!
//! Invariant: every peer has at most one outstanding offer, and `copies[i]` counts the
//! connected peers that have piece `i` or hold the offer of it (each peer at most once).

use std::collections::HashMap;
use std::hash::Hash;

use crate::bitfield::Bitfield;

pub struct SuperSeeder<P> {
    copies: Vec<u32>,
    /// Each peer's known pieces and its outstanding offer.
    peers: HashMap<P, (Bitfield, Option<u32>)>,
}

impl<P: Copy + Eq + Hash> SuperSeeder<P> {
    pub fn new(piece_count: usize) -> Self {
        SuperSeeder {
            copies: vec![0; piece_count],
            peers: HashMap::new(),
        }
    }

    /// A piece nobody has or was offered, that `pieces` lacks.
    fn next_for(&self, pieces: &Bitfield) -> Option<u32> {
        (0..self.copies.len())
            .find(|i| !pieces.get(*i) && self.copies[*i] == 0)
            .map(|i| i as u32)
    }

    /// Replaces `peer`'s offer with a fresh one, keeping `copies` (the invariant).
    fn reoffer(&mut self, peer: P) -> Option<u32> {
        let (bits, old) = self.peers.get(&peer)?.clone();
        if let Some(o) = old {
            if !bits.get(o as usize) {
                self.copies[o as usize] -= 1;
            }
        }
        let next = self.next_for(&bits);
        if let Some(n) = next {
            self.copies[n as usize] += 1;
        }
        self.peers.get_mut(&peer).expect("present").1 = next;
        next
    }

    /// A peer joined with `pieces`: returns the piece to offer it.
    pub fn add_peer(&mut self, peer: P, pieces: Bitfield) -> Option<u32> {
        for i in pieces.ones() {
            self.copies[i] += 1;
        }
        self.peers.insert(peer, (pieces, None));
        self.reoffer(peer)
    }

    pub fn remove_peer(&mut self, peer: &P) {
        if let Some((bits, offer)) = self.peers.remove(peer) {
            for i in bits.ones() {
                self.copies[i] -= 1;
            }
            if let Some(o) = offer.filter(|o| !bits.get(*o as usize)) {
                self.copies[o as usize] -= 1;
            }
        }
    }

    /// The piece currently offered to `peer`, if any.
    pub fn offer(&self, peer: &P) -> Option<u32> {
        self.peers.get(peer).and_then(|(_, o)| *o)
    }

    /// Gives `peer` its next offer without proof that it passed the last one on: the caller
    /// does this when nobody could take the piece from it (it is alone, or waited too long),
    /// and for peers left with no offer, so that super-seeding never stalls a swarm. Returns
    /// the new offer.
    pub fn advance(&mut self, peer: P) -> Option<u32> {
        self.reoffer(peer)
    }

    /// Whether `peer` may request piece `i` from us.
    pub fn allowed(&self, peer: &P, i: u32) -> bool {
        self.peers.get(peer).is_some_and(|(_, o)| *o == Some(i))
    }

    /// `from` announced piece `i`. Returns new offers `(peer, piece)` for every other peer
    /// whose offered piece `i` now appears at `from` (it passed it on).
    pub fn peer_has(&mut self, from: P, i: u32) -> Vec<(P, u32)> {
        let idx = i as usize;
        if idx >= self.copies.len() {
            return vec![];
        }
        let Some((bits, offer)) = self.peers.get_mut(&from) else {
            return vec![];
        };
        // An offered piece that arrives was counted when offered.
        if bits.set(idx) && *offer != Some(i) {
            self.copies[idx] += 1;
        }
        let passers: Vec<P> = self
            .peers
            .iter()
            .filter(|(p, (_, o))| **p != from && *o == Some(i))
            .map(|(p, _)| *p)
            .collect();
        passers
            .into_iter()
            .filter_map(|p| self.reoffer(p).map(|n| (p, n)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_spread_and_advance_only_when_passed_on() {
        let n = 4;
        let mut s = SuperSeeder::new(n);
        let a = s.add_peer(1u8, Bitfield::new(n)).unwrap();
        let b = s.add_peer(2u8, Bitfield::new(n)).unwrap();
        assert_ne!(a, b, "each peer is offered a different piece");
        assert!(s.allowed(&1, a) && !s.allowed(&1, b));
        // Peer 1 downloads its piece: no new offer yet.
        assert!(s.peer_has(1, a).is_empty());
        // Peer 2 announces piece `a`: peer 1 passed it on, so peer 1 gets a new offer.
        let offers = s.peer_has(2, a);
        assert_eq!(offers.len(), 1);
        let (p, next) = offers[0];
        assert_eq!(p, 1);
        assert!(next != a && next != b, "a piece nobody has");
        assert!(s.allowed(&1, next) && !s.allowed(&1, a));
    }
}
