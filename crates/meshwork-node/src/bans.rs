//! Bans: peer ids and IPs, each with the Unix second its ban ends.
//!
//! The address book owns the node's bans (and persists them); the connection gate keeps a copy
//! to refuse connections. Both use this type, so both are bounded the same way.
//!
//! Invariant: at most [`MAX_BANS`] entries (peers and IPs together); when a ban would exceed
//! that, the bans that end soonest are dropped first.

use std::collections::HashMap;
use std::net::IpAddr;

use libp2p::PeerId;

/// The most bans remembered (peer ids and IPs together).
pub const MAX_BANS: usize = 4096;

/// Persisted form: banned peers and banned IPs, each with its end.
pub type BanEntries = (Vec<(PeerId, u64)>, Vec<(IpAddr, u64)>);

#[derive(Clone, Debug, Default)]
pub struct BanList {
    peers: HashMap<PeerId, u64>,
    ips: HashMap<IpAddr, u64>,
}

impl BanList {
    /// Rebuilds a list from persisted entries, skipping those that have ended.
    pub fn from_entries(peers: Vec<(PeerId, u64)>, ips: Vec<(IpAddr, u64)>, now: u64) -> Self {
        let mut list = Self {
            peers: peers.into_iter().filter(|(_, t)| *t > now).collect(),
            ips: ips.into_iter().filter(|(_, t)| *t > now).collect(),
        };
        list.trim();
        list
    }

    /// The entries, for persistence.
    pub fn entries(&self) -> BanEntries {
        (
            self.peers.iter().map(|(p, t)| (*p, *t)).collect(),
            self.ips.iter().map(|(i, t)| (*i, *t)).collect(),
        )
    }

    /// Bans a peer, an IP, or both, until `until`; an existing later end is kept.
    pub fn ban(&mut self, peer: Option<PeerId>, ip: Option<IpAddr>, until: u64) {
        if let Some(peer) = peer {
            let t = self.peers.entry(peer).or_insert(until);
            *t = (*t).max(until);
        }
        if let Some(ip) = ip {
            let t = self.ips.entry(ip).or_insert(until);
            *t = (*t).max(until);
        }
        self.trim();
    }

    pub fn is_banned_peer(&self, peer: &PeerId, now: u64) -> bool {
        self.peers.get(peer).is_some_and(|t| *t > now)
    }

    pub fn is_banned_ip(&self, ip: &IpAddr, now: u64) -> bool {
        self.ips.get(ip).is_some_and(|t| *t > now)
    }

    pub fn len(&self) -> usize {
        self.peers.len() + self.ips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the bans that have ended.
    pub fn expire(&mut self, now: u64) {
        self.peers.retain(|_, t| *t > now);
        self.ips.retain(|_, t| *t > now);
    }

    fn trim(&mut self) {
        while self.len() > MAX_BANS {
            let p = self
                .peers
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(p, t)| (*p, *t));
            let i = self
                .ips
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(i, t)| (*i, *t));
            match (p, i) {
                (Some((p, tp)), Some((_, ti))) if tp <= ti => {
                    self.peers.remove(&p);
                }
                (_, Some((i, _))) => {
                    self.ips.remove(&i);
                }
                (Some((p, _)), None) => {
                    self.peers.remove(&p);
                }
                (None, None) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_timed() {
        let mut b = BanList::default();
        for i in 0..MAX_BANS as u64 + 10 {
            b.ban(Some(PeerId::random()), None, 1000 + i);
        }
        assert_eq!(b.len(), MAX_BANS);
        let p = PeerId::random();
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        b.ban(Some(p), Some(ip), 10_000);
        assert!(b.is_banned_peer(&p, 9_999) && b.is_banned_ip(&ip, 9_999));
        assert!(!b.is_banned_peer(&p, 10_000), "a ban ends at its end time");
        assert!(b.len() <= MAX_BANS);
        b.expire(10_000);
        assert!(b.is_empty());
    }
}
