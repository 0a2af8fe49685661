//! Connection policy, sans-IO: which peers to dial, and how misbehaviour is punished.
//!
//! # Outbound selection
//! The node keeps `target_outbound` outbound connections that it chose itself. Candidates come
//! from [`AddrBook::select`]; a candidate is skipped if we are connected or dialing it, if it is
//! banned, or if **its address group already holds one of our outbound connections or dials**.
//! Hence no two outbound peers share a group, and an attacker confined to `g` groups holds at
//! most `g` of our outbound slots, however many addresses it floods us with.
//!
//! # Misbehaviour
//! Every offence adds points to a peer's score ([`Offence::points`]); points halve every
//! [`SCORE_HALF_LIFE_S`]. A peer reaching [`DISCONNECT_POINTS`] is disconnected and banned
//! (peer id and IP). The first time the ban is a short cool-off ([`FIRST_BAN_S`]), so that it
//! cannot reconnect at once; each further time it doubles from [`REPEAT_BAN_S`], up to
//! [`MAX_BAN_S`]: repeat offenders stay out longer.
//!
//! Invariant: both maps are bounded by [`MAX_TRACKED`]; when full, the entry with the fewest
//! points (or offences) is forgotten first, which can only favour an attacker by forgetting a
//! *lesser* offence.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;
use meshwork_proto::pex::PexError;
use meshwork_proto::AddrGroup;
use rand::Rng;

use crate::addrbook::{AddrBook, Entry};

pub const DISCONNECT_POINTS: f64 = 100.0;
/// The points of an offence whose second occurrence bans ("two strikes"): more than half of
/// [`DISCONNECT_POINTS`], so that the first has not decayed below the rest when the second
/// comes. Two strikes within 350 s ban (`60 + 60 · 2^(-t/600) >= 100` for `t <= 350`); at
/// exactly half, two strikes a second apart would fall short (99.9), and gossipsub, which
/// stops listening to a peer for about 11 s after an invalid message, makes the second come
/// seconds after the first.
pub const STRIKE_POINTS: f64 = 60.0;
pub const SCORE_HALF_LIFE_S: u64 = 600;
pub const FIRST_BAN_S: u64 = 60;
pub const REPEAT_BAN_S: u64 = 600;
pub const MAX_BAN_S: u64 = 24 * 3600;
pub const MAX_TRACKED: usize = 4096;

/// Things a peer can do wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offence {
    /// A PEX answer that fails validation.
    BadPex(PexError),
    /// A PEX frame over the size limit, or one that does not decode.
    PexFraming,
    /// Asking for PEX far more often than allowed.
    PexFlood,
    /// Identify says it belongs to another network, or sync says it is on another chain.
    WrongNetwork,
    /// Relayed a transaction or block that fails validation in a way no honest relay allows
    /// (bad signature, bad proof of work, malformed bytes): honest nodes verify before they
    /// forward. Two of these and the peer is out.
    InvalidGossip(String),
    /// A sync answer that is malformed, does not link, or holds an invalid block.
    BadSync(String),
    /// Sent pieces that failed their hash until a content session banned it.
    CorruptPieces(String),
}

impl Offence {
    pub fn points(&self) -> f64 {
        match self {
            Offence::BadPex(e) if !e.is_severe() => 20.0,
            Offence::BadPex(_) | Offence::PexFraming | Offence::WrongNetwork => DISCONNECT_POINTS,
            Offence::PexFlood => 10.0,
            Offence::InvalidGossip(_) | Offence::BadSync(_) | Offence::CorruptPieces(_) => {
                STRIKE_POINTS
            }
        }
    }
}

impl std::fmt::Display for Offence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Offence::BadPex(e) => write!(f, "bad PEX answer: {e}"),
            Offence::PexFraming => f.write_str("PEX message over the size limit or undecodable"),
            Offence::PexFlood => f.write_str("PEX requests beyond the rate limit"),
            Offence::WrongNetwork => f.write_str("peer belongs to another network"),
            Offence::InvalidGossip(why) => write!(f, "relayed {why}"),
            Offence::BadSync(why) => write!(f, "bad sync answer: {why}"),
            Offence::CorruptPieces(why) => write!(f, "corrupt pieces: {why}"),
        }
    }
}

/// What the node must do after an offence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// Keep the peer; its score is now this many points.
    Keep(f64),
    /// Disconnect the peer and ban it (peer id and IP) until this Unix second.
    Ban { until: u64 },
}

#[derive(Default)]
pub struct Scores {
    /// Points and the time they were last decayed.
    points: HashMap<PeerId, (f64, u64)>,
    /// How many times a peer was disconnected for misbehaviour.
    offences: HashMap<PeerId, u32>,
}

impl Scores {
    fn decayed(&self, peer: &PeerId, now: u64) -> f64 {
        self.points.get(peer).map_or(0.0, |(p, t)| {
            let dt = now.saturating_sub(*t) as f64;
            p * 0.5f64.powf(dt / SCORE_HALF_LIFE_S as f64)
        })
    }

    /// Current misbehaviour points of a peer (0 for a clean one).
    pub fn points(&self, peer: &PeerId, now: u64) -> f64 {
        self.decayed(peer, now)
    }

    pub fn offences(&self, peer: &PeerId) -> u32 {
        self.offences.get(peer).copied().unwrap_or(0)
    }

    pub fn penalize(&mut self, peer: PeerId, offence: &Offence, now: u64) -> Verdict {
        let p = self.decayed(&peer, now) + offence.points();
        if p < DISCONNECT_POINTS {
            if self.points.len() >= MAX_TRACKED && !self.points.contains_key(&peer) {
                evict_min(&mut self.points, |(p, _)| *p);
            }
            self.points.insert(peer, (p, now));
            return Verdict::Keep(p);
        }
        self.points.remove(&peer);
        if self.offences.len() >= MAX_TRACKED && !self.offences.contains_key(&peer) {
            evict_min(&mut self.offences, |n| f64::from(*n));
        }
        let n = self.offences.entry(peer).or_insert(0);
        *n += 1;
        let ban = if *n == 1 {
            FIRST_BAN_S
        } else {
            REPEAT_BAN_S
                .saturating_mul(1 << (*n - 2).min(16))
                .min(MAX_BAN_S)
        };
        Verdict::Ban { until: now + ban }
    }
}

fn evict_min<V>(map: &mut HashMap<PeerId, V>, key: impl Fn(&V) -> f64) {
    if let Some(victim) = map
        .iter()
        .min_by(|a, b| key(a.1).total_cmp(&key(b.1)))
        .map(|(k, _)| *k)
    {
        map.remove(&victim);
    }
}

/// Picks up to `want` peers to dial for outbound slots. `used_groups` holds the groups of our
/// current outbound connections and dials; `busy` says whether we are already connected to or
/// dialing a peer. Each chosen peer's group is added to `used_groups`.
pub fn choose_outbound<'a>(
    book: &'a AddrBook,
    rng: &mut impl Rng,
    now: u64,
    want: usize,
    used_groups: &mut HashSet<AddrGroup>,
    busy: impl Fn(&PeerId) -> bool,
) -> Vec<&'a Entry> {
    let mut out: Vec<&Entry> = Vec::new();
    if want == 0 || book.is_empty() {
        return out;
    }
    // Bitcoin Core's bound: a hundred selections per slot, after which we wait for the next tick.
    for tries in 0..100 * want {
        if out.len() >= want {
            break;
        }
        let Some(e) = book.select(rng, now, false) else {
            break;
        };
        if used_groups.contains(&e.group) || busy(&e.peer) || book.is_banned(&e.peer, now) {
            continue;
        }
        // Early on, skip peers tried in the last ten minutes; later take what there is.
        if tries < 30 * want
            && e.last_try.is_some_and(|t| now.saturating_sub(t) < 600)
            && e.last_success.is_none()
        {
            continue;
        }
        used_groups.insert(e.group);
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addrbook::{AddrBookConfig, Origin, Via};
    use libp2p::Multiaddr;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const NOW: u64 = 1_800_000_000;

    fn addr(a: u8, b: u8, c: u8, d: u8) -> Multiaddr {
        format!("/ip4/{a}.{b}.{c}.{d}/tcp/4001").parse().unwrap()
    }

    #[test]
    fn repeat_offenders_are_banned_longer() {
        let mut s = Scores::default();
        let p = PeerId::random();
        let minor = Offence::BadPex(PexError::Addr(meshwork_proto::AddrError::Unroutable(
            "x".into(),
        )));
        assert_eq!(s.penalize(p, &minor, NOW), Verdict::Keep(20.0));
        assert!(matches!(s.penalize(p, &minor, NOW), Verdict::Keep(x) if (x - 40.0).abs() < 1e-9));
        // Points decay: after one half-life 40 became 20.
        assert!((s.points(&p, NOW + SCORE_HALF_LIFE_S) - 20.0).abs() < 1e-9);
        assert_eq!(
            s.penalize(p, &Offence::PexFraming, NOW),
            Verdict::Ban {
                until: NOW + FIRST_BAN_S
            }
        );
        assert_eq!(s.points(&p, NOW), 0.0);
        assert_eq!(
            s.penalize(p, &Offence::WrongNetwork, NOW),
            Verdict::Ban {
                until: NOW + REPEAT_BAN_S
            }
        );
        assert_eq!(
            s.penalize(p, &Offence::WrongNetwork, NOW),
            Verdict::Ban {
                until: NOW + 2 * REPEAT_BAN_S
            }
        );
        for _ in 0..40 {
            s.penalize(p, &Offence::WrongNetwork, NOW);
        }
        assert_eq!(
            s.penalize(p, &Offence::WrongNetwork, NOW),
            Verdict::Ban {
                until: NOW + MAX_BAN_S
            }
        );
        assert_eq!(s.offences(&p), 44);
    }

    #[test]
    fn scores_are_bounded() {
        let mut s = Scores::default();
        for _ in 0..MAX_TRACKED + 100 {
            s.penalize(PeerId::random(), &Offence::PexFlood, NOW);
            s.penalize(PeerId::random(), &Offence::WrongNetwork, NOW);
        }
        assert!(s.points.len() <= MAX_TRACKED && s.offences.len() <= MAX_TRACKED);
    }

    /// The eclipse flood at the policy level, with every attacker address reachable: however
    /// the dice fall, at most one of eight outbound slots goes to the attacker's group.
    #[test]
    fn outbound_slots_resist_a_flood_from_one_group() {
        let evil = meshwork_proto::AddrGroup::V4([66, 6]);
        let mut worst = 0;
        let mut total = 0;
        for seed in 0..200 {
            let mut book = AddrBook::new(
                AddrBookConfig::default(),
                [seed as u8; 32],
                PeerId::random(),
                false,
            );
            for i in 0..50u8 {
                book.add(
                    PeerId::random(),
                    &[addr(20 + i, 1, 1, 1)],
                    NOW,
                    Origin::Operator,
                    Via::Bootstrap,
                    NOW,
                );
            }
            for i in 0..5000u32 {
                let a = addr(66, 6, (i >> 8) as u8, i as u8);
                book.add(
                    PeerId::random(),
                    &[a],
                    NOW,
                    Origin::Peer(evil),
                    Via::Pex,
                    NOW,
                );
            }
            let mut rng = StdRng::seed_from_u64(seed);
            let mut used = HashSet::new();
            let chosen = choose_outbound(&book, &mut rng, NOW, 8, &mut used, |_| false);
            assert_eq!(chosen.len(), 8);
            let groups: HashSet<_> = chosen.iter().map(|e| e.group).collect();
            assert_eq!(groups.len(), 8, "no two outbound peers may share a group");
            let bad = chosen.iter().filter(|e| e.group == evil).count();
            worst = worst.max(bad);
            total += bad;
        }
        println!("flood of 5000 from one /16 against 50 honest groups: the attacker took one of 8 outbound slots in {total} of 200 seeded runs, never more than {worst}");
        assert!(worst <= 1);
        // 8 picks among ~51 buckets: the attacker's bucket should come up in well under half.
        assert!(total < 100, "attacker took a slot in {total} of 200 runs");
    }
}
