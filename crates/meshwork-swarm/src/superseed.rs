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
//! spent; passing pieces on restores it. A peer alone with the seeder has nobody to pass
//! pieces to, so credit does not apply to it: charging it would only idle the uplink (with
//! 256 KiB pieces at 20 Mbit/s, a stall of a quarter second every 16 pieces, until the
//! engine's tick forgave it).
//!
//! Offers are made by [`SuperSeeder::fill`], one at a time to the peer with the fewest, so
//! new pieces spread over the peers. Every call that can free room or pieces (a peer joined,
//! a piece announced, a peer gone) ends with it, and so does the engine's tick (which also
//! forgives peers that waited too long): nothing waits while a peer could take an offer. (A cap on the offers outstanding across all peers,
//! to send fewer pieces faster, was measured and lengthened distributions: with fewer pieces
//! in flight the seeder's uplink idled between them.)
//!
//! Invariants: every peer has at most `WINDOW` outstanding offers; a peer's outstanding
//! offers plus unproven pieces stay within `CREDIT` while the seeder has other peers (except
//! after [`SuperSeeder::forgive`]); `copies[i]` counts the connected peers
//! that have piece `i` or hold an offer of it (each peer at most once).

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

    /// The offers `peer` may still take: its window, and its credit unless it is alone.
    fn room(&self, st: &PeerState) -> usize {
        let window = WINDOW.saturating_sub(st.offers.len());
        if self.peers.len() == 1 {
            window
        } else {
            window.min(CREDIT.saturating_sub(st.offers.len() + st.unproven.len()))
        }
    }

    /// Makes every offer there is room for, one at a time to the peer with the fewest that
    /// has room and lacks a piece nobody has or was offered; returns the new offers.
    pub fn fill(&mut self) -> Vec<(P, u32)> {
        let mut out = vec![];
        // Once every piece is somewhere in the swarm (most of a distribution, and every
        // announcement ends here), there is nothing to offer.
        if !self.copies.contains(&0) {
            return out;
        }
        // Peers that lack no unoffered piece.
        let mut done: Vec<P> = vec![];
        while let Some(peer) = self
            .peers
            .iter()
            .filter(|(p, st)| !done.contains(p) && self.room(st) > 0)
            .min_by_key(|(_, st)| st.offers.len())
            .map(|(p, _)| *p)
        {
            let st = &self.peers[&peer];
            let Some(i) =
                (0..self.copies.len()).find(|i| self.copies[*i] == 0 && !st.pieces.get(*i))
            else {
                done.push(peer);
                continue;
            };
            self.copies[i] += 1;
            self.peers
                .get_mut(&peer)
                .expect("present")
                .offers
                .push(i as u32);
            out.push((peer, i as u32));
        }
        out
    }

    /// A peer joined with `pieces`: returns the new offers (to it, or to others).
    pub fn add_peer(&mut self, peer: P, pieces: Bitfield) -> Vec<(P, u32)> {
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
        self.fill()
    }

    /// A peer left: its offers go back, to the others. Returns the new offers.
    pub fn remove_peer(&mut self, peer: &P) -> Vec<(P, u32)> {
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
        self.fill()
    }

    /// Whether `peer` holds no offer.
    pub fn has_no_offer(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(|s| s.offers.is_empty())
    }

    /// Forgives `peer`'s unproven pieces: the caller does this when nobody took the pieces
    /// from it in time, so that super-seeding never stalls a swarm. A [`SuperSeeder::fill`]
    /// then makes the offers it has room for again.
    pub fn forgive(&mut self, peer: &P) {
        if let Some(st) = self.peers.get_mut(peer) {
            st.unproven.clear();
        }
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
        let was_offer = st.offers.iter().position(|o| *o == i);
        if st.pieces.set(idx) {
            match was_offer {
                // An offered piece that arrives was counted when offered.
                Some(k) => {
                    st.offers.swap_remove(k);
                    st.unproven.push(i);
                }
                None => self.copies[idx] += 1,
            }
        }
        // Whoever took `i` from us has passed it on.
        for (p, s) in self.peers.iter_mut() {
            if *p != from {
                if let Some(k) = s.unproven.iter().position(|u| *u == i) {
                    s.unproven.swap_remove(k);
                }
            }
        }
        self.fill()
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

    /// The pieces of `offers`, whoever they went to.
    fn pieces(offers: Vec<(u8, u32)>) -> Vec<u32> {
        offers.into_iter().map(|o| o.1).collect()
    }

    #[test]
    fn offers_are_distinct_pipelined_and_stop_when_credit_is_spent() {
        let n = 64;
        let mut s = SuperSeeder::new(n);
        let a: Vec<u32> = pieces(s.add_peer(1u8, Bitfield::new(n)));
        let b: Vec<u32> = pieces(s.add_peer(2u8, Bitfield::new(n)));
        assert_eq!(a.len(), WINDOW);
        assert_eq!(b.len(), WINDOW);
        assert!(a.iter().all(|p| !b.contains(p)), "each piece offered once");
        assert!(s.allowed(&1, a[0]) && !s.allowed(&1, b[0]));
        s.check().unwrap();
        // Peer 1 takes its offers: each is replaced at once while credit lasts (peer 2 sits
        // on its offers, so the freed room is peer 1's).
        let mut announced = vec![];
        while let Some(p) = (0..n as u32).find(|p| s.allowed(&1, *p)) {
            let offers = s.peer_has(1, p);
            announced.push(p);
            let taken = announced.len();
            assert!(offers.iter().all(|(q, _)| *q == 1), "{offers:?}");
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

    #[test]
    fn a_peer_alone_with_the_seeder_is_never_out_of_credit() {
        let n = 64;
        let mut s = SuperSeeder::new(n);
        let mut offered: Vec<u32> = pieces(s.add_peer(1u8, Bitfield::new(n)));
        let mut taken = 0;
        while let Some(p) = offered.pop() {
            taken += 1;
            offered.extend(s.peer_has(1, p).into_iter().map(|(_, q)| q));
            s.check().unwrap();
        }
        assert_eq!(taken, n, "every piece offered, without waiting for proof");
    }

    #[test]
    fn the_offers_of_a_peer_that_leaves_go_to_the_others() {
        let n = 64;
        let mut s = SuperSeeder::new(n);
        let a: Vec<u32> = pieces(s.add_peer(1u8, Bitfield::new(n)));
        let b = s.add_peer(2u8, Bitfield::new(n));
        assert_eq!((a.len(), b.len()), (WINDOW, WINDOW));
        // Peer 1 leaves with its offers untaken; peer 2's window is full, so nothing yet.
        assert!(s.remove_peer(&1).is_empty());
        s.check().unwrap();
        // Peer 2 announces one of its offers: its next offer is one of peer 1's old pieces,
        // which nobody holds now.
        let next = s.peer_has(2, b[0].1);
        assert_eq!(next.len(), 1);
        assert!(a.contains(&next[0].1), "{next:?} not among {a:?}");
        s.check().unwrap();
    }
}
