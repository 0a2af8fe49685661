//! Super-seeding (BEP 16's idea): an initial seeder that uploads close to one copy.
//!
//! The seeder shows each peer no bitfield. It offers each peer one piece at a time (a `have`),
//! always the piece offered or seen least so far, and serves only requests for the pieces it
//! offered to that peer. A peer gets its next offer only when the piece it was offered shows up
//! at **another** peer (a `have` from someone else): proof that it passed the piece on. Pieces
//! then leave the seeder about once each, and the swarm copies them among itself.
//!
//! Invariant: every peer has at most one outstanding offer, and `copies[i]` counts the offers
//! of piece `i` plus the peers seen to have it.

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

    /// The least-copied piece `pieces` lacks.
    fn next_for(&self, pieces: &Bitfield) -> Option<u32> {
        (0..self.copies.len())
            .filter(|i| !pieces.get(*i))
            .min_by_key(|i| (self.copies[*i], *i))
            .map(|i| i as u32)
    }

    /// A peer joined with `pieces`: returns the piece to offer it.
    pub fn add_peer(&mut self, peer: P, pieces: Bitfield) -> Option<u32> {
        for i in pieces.ones() {
            self.copies[i] += 1;
        }
        let offer = self.next_for(&pieces);
        if let Some(i) = offer {
            self.copies[i as usize] += 1;
        }
        self.peers.insert(peer, (pieces, offer));
        offer
    }

    pub fn remove_peer(&mut self, peer: &P) {
        self.peers.remove(peer);
    }

    /// Whether `peer` may request piece `i` from us.
    pub fn allowed(&self, peer: &P, i: u32) -> bool {
        self.peers.get(peer).is_some_and(|(_, o)| *o == Some(i))
    }

    /// `from` announced piece `i`. Returns new offers `(peer, piece)`: for `from` if `i` was
    /// its offer (it has it now; one more is due once it passes it on, so nothing yet unless
    /// it had no offer), and for every other peer whose offered piece `i` now appears at
    /// `from`.
    pub fn peer_has(&mut self, from: P, i: u32) -> Vec<(P, u32)> {
        let idx = i as usize;
        if idx >= self.copies.len() {
            return vec![];
        }
        let newly = match self.peers.get_mut(&from) {
            Some((bits, _)) => bits.set(idx),
            None => return vec![],
        };
        // An offered copy that arrives is already counted.
        let was_offer = self.peers.get(&from).is_some_and(|(_, o)| *o == Some(i));
        if newly && !was_offer {
            self.copies[idx] += 1;
        }
        let passers: Vec<P> = self
            .peers
            .iter()
            .filter(|(p, (_, o))| **p != from && *o == Some(i))
            .map(|(p, _)| *p)
            .collect();
        let mut offers = vec![];
        for p in passers {
            let bits = self.peers[&p].0.clone();
            let next = self.next_for(&bits);
            if let Some(n) = next {
                self.copies[n as usize] += 1;
            }
            self.peers.get_mut(&p).expect("listed").1 = next;
            if let Some(n) = next {
                offers.push((p, n));
            }
        }
        offers
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
        assert!(next != a && next != b, "the least-copied piece");
        assert!(s.allowed(&1, next) && !s.allowed(&1, a));
    }
}
