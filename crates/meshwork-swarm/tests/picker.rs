//! The picker's properties under random availability and random event orders: rarest first
//! after the random start, no block asked of two peers outside the endgame, and the endgame
//! only once nothing is left to ask for the first time. The references (availability, the
//! endgame, what is verified) are computed from the test's own model of the peers' bitfields
//! and of the requests, never read back from the picker.

use std::collections::{HashMap, HashSet};

use meshwork_swarm::picker::{BlockRef, Picker, BLOCK_SIZE, RANDOM_FIRST};
use meshwork_swarm::Bitfield;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Pick { peer: usize, max: usize },
    Receive { pick: usize, fail: bool },
    Leave { peer: usize },
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            3 => (0usize..5, 1usize..6).prop_map(|(peer, max)| Op::Pick { peer, max }),
            4 => (any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(pick, fail)| Op::Receive { pick, fail }),
            1 => (0usize..5).prop_map(|peer| Op::Leave { peer }),
        ],
        1..200,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn rarest_first_no_duplicates_outside_the_endgame(
        n in 1usize..24,
        masks in prop::collection::vec(prop::collection::vec(any::<bool>(), 24), 5),
        ops in ops(),
        seed in any::<u64>(),
    ) {
        // Two blocks per piece; the last piece is short (one block).
        let piece_size = 2 * BLOCK_SIZE;
        let size = n as u64 * piece_size as u64 - BLOCK_SIZE as u64;
        let mut p: Picker<usize> = Picker::new(n, piece_size, size, Bitfield::new(n), seed);
        let mut peers: Vec<Option<Bitfield>> = masks.iter().map(|m| {
            let mut b = Bitfield::new(n);
            for (i, on) in m.iter().take(n).enumerate() {
                if *on { b.set(i); }
            }
            Some(b)
        }).collect();
        for b in peers.iter().flatten() {
            p.add_peer(b);
        }
        let mut started: HashSet<u32> = HashSet::new();
        let mut verified: HashSet<u32> = HashSet::new();
        let mut outstanding: HashMap<BlockRef, HashSet<usize>> = HashMap::new();
        let mut received: HashSet<BlockRef> = HashSet::new();
        let blocks_in = |i: u32| if i as usize == n - 1 { 1 } else { 2 };
        // Connected peers with piece `i`.
        let avail = |peers: &[Option<Bitfield>], i: usize| {
            peers.iter().flatten().filter(|b| b.get(i)).count() as u32
        };
        // The endgame, from the model: something is missing, every missing piece is started
        // and each of their blocks is received or asked of someone.
        let endgame = |started: &HashSet<u32>,
                       verified: &HashSet<u32>,
                       outstanding: &HashMap<BlockRef, HashSet<usize>>,
                       received: &HashSet<BlockRef>| {
            let missing = n - verified.len();
            let wanted = started.iter().any(|&piece| {
                (0..blocks_in(piece)).any(|block| {
                    let b = BlockRef { piece, block };
                    !received.contains(&b) && outstanding.get(&b).is_none_or(|q| q.is_empty())
                })
            });
            missing > 0 && started.len() == missing && !wanted
        };
        for op in ops {
            match op {
                Op::Pick { peer, max } => {
                    let Some(bits) = peers[peer].clone() else { continue };
                    let got = p.pick(peer, &bits, max);
                    prop_assert!(got.len() <= max);
                    let mut partial_now = started.clone();
                    let mut duplicates = false;
                    for b in &got {
                        prop_assert!(bits.get(b.piece as usize), "asked a peer for a piece it lacks");
                        prop_assert!(!verified.contains(&b.piece), "asked for a block of verified piece {}", b.piece);
                        prop_assert!(b.block < blocks_in(b.piece), "no such block {:?}", b);
                        prop_assert!(!received.contains(b), "asked for a block already received");
                        if !partial_now.contains(&b.piece) {
                            // A newly started piece: rarest among the peer's candidates, once
                            // past the random start.
                            if verified.len() + partial_now.len() >= RANDOM_FIRST {
                                let min = (0..n)
                                    .filter(|i| bits.get(*i) && !verified.contains(&(*i as u32)) && !partial_now.contains(&(*i as u32)))
                                    .map(|i| avail(&peers, i))
                                    .min()
                                    .expect("the chosen piece is a candidate");
                                prop_assert_eq!(avail(&peers, b.piece as usize), min, "piece {} is not the rarest", b.piece);
                            }
                            partial_now.insert(b.piece);
                        }
                        let others = outstanding.entry(*b).or_default();
                        duplicates |= !others.is_empty();
                        prop_assert!(others.insert(peer), "the same peer asked twice");
                    }
                    started = partial_now;
                    // A duplicate request only in the endgame (which the first-time requests
                    // of this pick may have just reached: a pick serves those first).
                    prop_assert!(
                        !duplicates || endgame(&started, &verified, &outstanding, &received),
                        "duplicate outside the endgame"
                    );
                }
                Op::Receive { pick, fail } => {
                    let all: Vec<(BlockRef, usize)> = outstanding.iter()
                        .flat_map(|(b, ps)| ps.iter().map(move |q| (*b, *q)))
                        .collect();
                    if all.is_empty() { continue; }
                    let mut all = all;
                    all.sort();
                    let (b, from) = all[pick % all.len()];
                    let r = p.block_received(from, b);
                    let requesters = outstanding.remove(&b).unwrap_or_default();
                    if !r.duplicate {
                        let cancelled: HashSet<usize> = r.cancels.iter().map(|(q, _)| *q).collect();
                        let expected: HashSet<usize> = requesters.into_iter().filter(|q| *q != from).collect();
                        prop_assert_eq!(cancelled, expected);
                        received.insert(b);
                    }
                    if r.piece_complete {
                        let blocks: Vec<BlockRef> = received.iter().filter(|x| x.piece == b.piece).copied().collect();
                        for x in &blocks { received.remove(x); }
                        outstanding.retain(|x, _| x.piece != b.piece);
                        if fail {
                            p.piece_failed(b.piece as usize);
                        } else {
                            p.piece_verified(b.piece as usize);
                            started.remove(&b.piece);
                            verified.insert(b.piece);
                        }
                    }
                }
                Op::Leave { peer } => {
                    if let Some(bits) = peers[peer].take() {
                        p.remove_peer(&bits);
                        p.release_peer(peer);
                        for ps in outstanding.values_mut() { ps.remove(&peer); }
                        outstanding.retain(|_, ps| !ps.is_empty());
                    }
                }
            }
            prop_assert_eq!(p.check_invariants(), Ok(()));
            prop_assert_eq!(
                p.in_endgame(),
                endgame(&started, &verified, &outstanding, &received),
                "the picker's endgame differs from the model's"
            );
            for i in 0..n {
                prop_assert_eq!(p.have().get(i), verified.contains(&(i as u32)));
            }
        }
    }
}
