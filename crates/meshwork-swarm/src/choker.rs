//! The choker: which interested peers we upload to (tit-for-tat).
//!
//! Every rechoke (the caller runs one every [`RECHOKE_INTERVAL`] and when peers come or go):
//! - **Regular slots** ([`ChokerConfig::slots`], default 4) go to the interested peers that
//!   upload to us fastest while we download, or that take from us fastest while we seed
//!   (BitTorrent's seed rule: the fastest takers finish and start uploading soonest).
//! - **One optimistic slot** rotates every [`ChokerConfig::optimistic_interval`] (30 s) to a
//!   random interested peer outside the regular slots, so that newcomers with nothing to trade
//!   get a chance and we discover faster partners.
//! - **Anti-snubbing**: while we download, a peer that has us unchoked but sent us nothing for
//!   [`ChokerConfig::snub_after`] (60 s) is snubbed: it loses its regular slot (it may still win
//!   the optimistic one).
//!
//! Invariant: at most `slots + 1` peers are unchoked, and only interested ones.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::Rng;

pub const RECHOKE_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct ChokerConfig {
    pub slots: usize,
    pub optimistic_interval: Duration,
    pub snub_after: Duration,
}

impl Default for ChokerConfig {
    fn default() -> Self {
        Self {
            slots: 4,
            optimistic_interval: Duration::from_secs(30),
            snub_after: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PeerStats {
    /// It wants pieces from us.
    pub interested: bool,
    /// Bytes per second it sends us, and we send it (the caller's moving averages).
    pub down_rate: f64,
    pub up_rate: f64,
    /// It has us unchoked since this instant, if it does.
    pub unchoked_us_since: Option<Instant>,
    /// The last block it sent us.
    pub last_block: Option<Instant>,
    /// We are uploading to it.
    unchoked: bool,
}

impl Default for PeerStats {
    fn default() -> Self {
        Self {
            interested: false,
            down_rate: 0.0,
            up_rate: 0.0,
            unchoked_us_since: None,
            last_block: None,
            unchoked: false,
        }
    }
}

pub struct Choker<P> {
    cfg: ChokerConfig,
    peers: BTreeMap<P, PeerStats>,
    optimistic: Option<(P, Instant)>,
}

impl<P: Copy + Ord + std::fmt::Debug> Choker<P> {
    pub fn new(cfg: ChokerConfig) -> Self {
        Choker {
            cfg,
            peers: BTreeMap::new(),
            optimistic: None,
        }
    }

    /// The peer's stats, to update (a new peer starts choked and uninterested).
    pub fn stats(&mut self, peer: P) -> &mut PeerStats {
        self.peers.entry(peer).or_default()
    }

    pub fn remove(&mut self, peer: &P) {
        self.peers.remove(peer);
        if self.optimistic.is_some_and(|(p, _)| p == *peer) {
            self.optimistic = None;
        }
    }

    pub fn is_unchoked(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(|s| s.unchoked)
    }

    pub fn optimistic(&self) -> Option<P> {
        self.optimistic.map(|(p, _)| p)
    }

    fn snubbed(&self, s: &PeerStats, now: Instant) -> bool {
        match s.unchoked_us_since {
            Some(since) => {
                let last = s.last_block.map_or(since, |b| b.max(since));
                now.duration_since(last) >= self.cfg.snub_after
            }
            None => false,
        }
    }

    /// Recomputes who is unchoked. Returns the changes: `(peer, true)` to unchoke,
    /// `(peer, false)` to choke.
    pub fn rechoke(&mut self, now: Instant, seeding: bool, rng: &mut impl Rng) -> Vec<(P, bool)> {
        let mut ranked: Vec<(P, f64)> = self
            .peers
            .iter()
            .filter(|(_, s)| s.interested && (seeding || !self.snubbed(s, now)))
            .map(|(p, s)| (*p, if seeding { s.up_rate } else { s.down_rate }))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let regular: Vec<P> = ranked
            .iter()
            .take(self.cfg.slots)
            .map(|(p, _)| *p)
            .collect();

        let keep_optimistic = self.optimistic.filter(|(p, since)| {
            now.duration_since(*since) < self.cfg.optimistic_interval
                && !regular.contains(p)
                && self.peers.get(p).is_some_and(|s| s.interested)
        });
        self.optimistic = match keep_optimistic {
            Some(o) => Some(o),
            None => {
                let others: Vec<P> = self
                    .peers
                    .iter()
                    .filter(|(p, s)| s.interested && !regular.contains(p))
                    .map(|(p, _)| *p)
                    .collect();
                others.choose(rng).map(|p| (*p, now))
            }
        };

        let mut changes = vec![];
        let optimistic = self.optimistic();
        for (p, s) in self.peers.iter_mut() {
            let want = regular.contains(p) || optimistic == Some(*p);
            if want != s.unchoked {
                s.unchoked = want;
                changes.push((*p, want));
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(5)
    }

    fn unchoked(c: &Choker<u32>) -> Vec<u32> {
        (0..20).filter(|p| c.is_unchoked(p)).collect()
    }

    #[test]
    fn the_fastest_uploaders_get_the_slots_plus_one_optimistic() {
        let t0 = Instant::now();
        let mut c = Choker::new(ChokerConfig::default());
        for p in 0..10u32 {
            let s = c.stats(p);
            s.interested = true;
            s.down_rate = p as f64 * 100.0;
            s.unchoked_us_since = Some(t0);
            s.last_block = Some(t0);
        }
        c.stats(10).down_rate = 1e9; // fast but not interested: never unchoked
        let changes = c.rechoke(t0, false, &mut rng());
        assert_eq!(changes.len(), 5);
        let on = unchoked(&c);
        assert_eq!(on.len(), 5);
        for p in [6, 7, 8, 9] {
            assert!(on.contains(&p));
        }
        let opt = c.optimistic().unwrap();
        assert!(opt < 6 && on.contains(&opt));
        // A faster peer takes over a slot at the next rechoke.
        c.stats(2).down_rate = 10_000.0;
        c.rechoke(t0 + Duration::from_secs(10), false, &mut rng());
        assert!(c.is_unchoked(&2) && !c.is_unchoked(&6) || c.optimistic() == Some(6));
    }

    /// The optimistic slot is kept for exactly `optimistic_interval` (30 s): every rechoke
    /// before it keeps the holder, the one at 30 s draws again. Over many seeds the draw at
    /// 30 s moves the slot at least once (a draw may land on the same peer), the regular slot
    /// holder never takes it, and the new holder is kept for the next 30 s from the draw.
    #[test]
    fn the_optimistic_slot_rotates_every_30_s() {
        assert_eq!(
            ChokerConfig::default().optimistic_interval,
            Duration::from_secs(30)
        );
        let t0 = Instant::now();
        let just_before = Duration::from_secs(30) - Duration::from_millis(1);
        let mut moved = 0;
        let mut seen = std::collections::HashSet::new();
        for seed in 0..32 {
            let mut c = Choker::new(ChokerConfig {
                slots: 1,
                ..ChokerConfig::default()
            });
            for p in 0..8u32 {
                c.stats(p).interested = true;
            }
            c.stats(0).down_rate = 1000.0;
            let mut r = rand::rngs::StdRng::seed_from_u64(seed);
            c.rechoke(t0, false, &mut r);
            let first = c.optimistic().unwrap();
            for ms in [1, 10_000, 20_000, just_before.as_millis() as u64] {
                c.rechoke(t0 + Duration::from_millis(ms), false, &mut r);
                assert_eq!(c.optimistic(), Some(first), "kept at {ms} ms");
            }
            let t30 = t0 + Duration::from_secs(30);
            c.rechoke(t30, false, &mut r);
            let second = c.optimistic().unwrap();
            if second != first {
                moved += 1;
            }
            // Drawn at 30 s (even if the same peer): kept until 60 s.
            c.rechoke(t30 + just_before, false, &mut r);
            assert_eq!(c.optimistic(), Some(second), "kept until 60 s");
            seen.extend([first, second]);
        }
        assert!(
            moved >= 16,
            "the slot moved at 30 s in only {moved} of 32 runs"
        );
        assert!(seen.len() > 2, "rotation reached {seen:?}");
        assert!(
            !seen.contains(&0),
            "the regular slot holder is never the optimistic one"
        );
    }

    #[test]
    fn a_snubbing_peer_loses_its_slot_while_we_download() {
        let t0 = Instant::now();
        let mut c = Choker::new(ChokerConfig {
            slots: 1,
            ..ChokerConfig::default()
        });
        for p in 0..2u32 {
            let s = c.stats(p);
            s.interested = true;
            s.unchoked_us_since = Some(t0);
            s.last_block = Some(t0);
        }
        c.stats(0).down_rate = 5000.0;
        c.stats(1).down_rate = 10.0;
        c.rechoke(t0, false, &mut rng());
        assert!(c.is_unchoked(&0));
        // Peer 0 stops sending for 60 s: snubbed, its regular slot goes to peer 1.
        c.stats(1).last_block = Some(t0 + Duration::from_secs(59));
        c.rechoke(t0 + Duration::from_secs(61), false, &mut rng());
        assert!(c.is_unchoked(&1));
        assert_eq!(unchoked(&c).len(), 2, "0 may only hold the optimistic slot");
        assert_eq!(c.optimistic(), Some(0));
        // Seeding ignores snubbing: takers are ranked by upload rate.
        c.stats(0).up_rate = 1e6;
        c.rechoke(t0 + Duration::from_secs(100), true, &mut rng());
        assert!(c.is_unchoked(&0));
    }
}
