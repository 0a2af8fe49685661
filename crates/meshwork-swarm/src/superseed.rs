//! Super-seeding (BEP 16's idea, pipelined): an initial seeder that uploads close to one copy
//! while keeping its uplink busy.
//!
//! The seeder shows each peer no bitfield. It offers each peer pieces (`have`s) that no peer
//! has or has been offered, and serves only requests for pieces it offered to that peer. A
//! piece that leaves the seeder is then copied by the swarm, not by the seeder: pieces leave
//! it about once each. Once every piece is somewhere in the swarm, nothing more is offered
//! (BEP 16 goes on offering the least copied piece, which is how its seeders upload 1.2 to 1.5
//! copies).
//!
//! BEP 16 offers one piece at a time and the next only when the last one shows up at another
//! peer (proof that it was passed on). That leaves the seeder's uplink idle while it waits,
//! which at one piece per round trip is most of the time. Here each peer holds up to
//! [`WINDOW`] offers at once and gets a new one as soon as it announces an offered piece,
//! while its *credit* lasts: pieces it took from us that no other peer has announced yet
//! count against [`CREDIT`]. A peer that hoards stops getting offers once its credit is
//! spent; passing pieces on restores it.
//!
//! Invariants: every peer has at most `WINDOW` outstanding offers, and outstanding offers
//! plus unproven pieces stay within `CREDIT` (except after [`SuperSeeder::advance`], which
//! forgives); `copies[i]` counts the connected peers that have piece `i` or hold an offer of
//! it (each peer at most once).

use std::collections::HashMap;
use std::hash::Hash;

use crate::bitfield::Bitfield;

/// Offers a peer may hold at once.
pub const WINDOW: usize = 4;
/// Offers plus pieces taken but not yet seen at another peer.
pub const CREDIT: usize = 16;

struct PeerState {
    pieces: Bitfield,
    /// Offered, not yet announced by the peer.
    offers: Vec<u32>,
    /// Announced by the peer after our offer, not yet seen at any other peer.
    unproven: Vec<u32>,
}

pub struct SuperSeeder<P> {
    copies: Vec<u32>,
    peers: HashMap<P, PeerState>,
}

impl<P: Copy + Eq + Hash> SuperSeeder<P> {
    pub fn new(piece_count: usize) -> Self {
        SuperSeeder {
            copies: vec![0; piece_count],
            peers: HashMap::new(),
        }
    }

    /// Tops `peer`'s offers up to its window and credit; returns the new offers. Besides the
    /// calls here, the engine calls it on its tick for a peer with no offer, which picks up
    /// pieces whose only holder left.
    pub fn refill(&mut self, peer: P) -> Vec<u32> {
        let mut out = vec![];
        let Some(st) = self.peers.get(&peer) else {
            return out;
        };
        let mut room = WINDOW
            .saturating_sub(st.offers.len())
            .min(CREDIT.saturating_sub(st.offers.len() + st.unproven.len()));
        let mut i = 0;
        while room > 0 && i < self.copies.len() {
            let st = self.peers.get(&peer).expect("present");
            if self.copies[i] == 0 && !st.pieces.get(i) {
                self.copies[i] += 1;
                self.peers
                    .get_mut(&peer)
                    .expect("present")
                    .offers
                    .push(i as u32);
                out.push(i as u32);
                room -= 1;
            }
            i += 1;
        }
        out
    }

    /// A peer joined with `pieces`: returns the pieces to offer it.
    pub fn add_peer(&mut self, peer: P, pieces: Bitfield) -> Vec<u32> {
        for i in pieces.ones() {
            self.copies[i] += 1;
        }
        self.peers.insert(
            peer,
            PeerState {
                pieces,
                offers: vec![],
                unproven: vec![],
            },
        );
        self.refill(peer)
    }

    pub fn remove_peer(&mut self, peer: &P) {
        if let Some(st) = self.peers.remove(peer) {
            for i in st.pieces.ones() {
                self.copies[i] -= 1;
            }
            for o in st.offers {
                if !st.pieces.get(o as usize) {
                    self.copies[o as usize] -= 1;
                }
            }
        }
    }

    /// Whether `peer` holds no offer.
    pub fn has_no_offer(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(|s| s.offers.is_empty())
    }

    /// Forgives `peer`'s unproven pieces and refills its offers: the caller does this when
    /// nobody could take the pieces from it (it is alone, or waited too long), so that
    /// super-seeding never stalls a swarm. Returns the new offers.
    pub fn advance(&mut self, peer: P) -> Vec<u32> {
        if let Some(st) = self.peers.get_mut(&peer) {
            st.unproven.clear();
        }
        self.refill(peer)
    }

    /// Whether `peer` may request piece `i` from us.
    pub fn allowed(&self, peer: &P, i: u32) -> bool {
        self.peers.get(peer).is_some_and(|s| s.offers.contains(&i))
    }

    /// `from` announced piece `i`. Returns the new offers `(peer, piece)`: for `from` when
    /// `i` was one of its offers, and for every other peer that had taken `i` from us (it
    /// passed it on).
    pub fn peer_has(&mut self, from: P, i: u32) -> Vec<(P, u32)> {
        let idx = i as usize;
        if idx >= self.copies.len() {
            return vec![];
        }
        let Some(st) = self.peers.get_mut(&from) else {
            return vec![];
        };
        let mut touched = vec![];
        let was_offer = st.offers.iter().position(|o| *o == i);
        if st.pieces.set(idx) {
            match was_offer {
                // An offered piece that arrives was counted when offered.
                Some(k) => {
                    st.offers.swap_remove(k);
                    st.unproven.push(i);
                    touched.push(from);
                }
                None => self.copies[idx] += 1,
            }
        }
        for (p, s) in self.peers.iter_mut() {
            if *p != from {
                if let Some(k) = s.unproven.iter().position(|u| *u == i) {
                    s.unproven.swap_remove(k);
                    touched.push(*p);
                }
            }
        }
        let mut out = vec![];
        for p in touched {
            out.extend(self.refill(p).into_iter().map(|n| (p, n)));
        }
        out
    }

    /// Checks the invariants (tests and simulations).
    pub fn check(&self) -> Result<(), String> {
        let mut copies = vec![0u32; self.copies.len()];
        for st in self.peers.values() {
            if st.offers.len() > WINDOW {
                return Err("window exceeded".into());
            }
            for i in st.pieces.ones() {
                copies[i] += 1;
            }
            for o in &st.offers {
                if !st.pieces.get(*o as usize) {
                    copies[*o as usize] += 1;
                }
            }
        }
        if copies != self.copies {
            return Err("copies out of step with the peers".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_distinct_pipelined_and_stop_when_credit_is_spent() {
        let n = 64;
        let mut s = SuperSeeder::new(n);
        let a = s.add_peer(1u8, Bitfield::new(n));
        let b = s.add_peer(2u8, Bitfield::new(n));
        assert_eq!(a.len(), WINDOW);
        assert_eq!(b.len(), WINDOW);
        assert!(a.iter().all(|p| !b.contains(p)), "each piece offered once");
        assert!(s.allowed(&1, a[0]) && !s.allowed(&1, b[0]));
        s.check().unwrap();
        // Peer 1 takes its offers: each is replaced at once while credit lasts.
        let mut announced = vec![];
        while let Some(p) = (0..n as u32).find(|p| s.allowed(&1, *p)) {
            let offers = s.peer_has(1, p);
            announced.push(p);
            let taken = announced.len();
            assert!(offers.iter().all(|(q, _)| *q == 1));
            s.check().unwrap();
            assert!(taken <= CREDIT, "credit bounds what a hoarder gets");
        }
        assert_eq!(announced.len(), CREDIT);
        assert!(s.has_no_offer(&1));
        // Peer 2 announces one of peer 1's pieces: peer 1 passed it on and gets an offer.
        let offers = s.peer_has(2, announced[0]);
        assert!(offers.iter().any(|(q, _)| *q == 1), "{offers:?}");
        s.check().unwrap();
    }
}
