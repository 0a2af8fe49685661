//! Per-IP limits on content dials (sans-IO): at most [`DialGuard::per_ip`] dials in flight to
//! one IP, and an IP whose dials fail is not dialed again for a while, doubling with every
//! failure in a row.
//!
//! The unit is the IP, not the peer: a tracker, a PEX message or a DHT record that names one
//! address under many peer ids (the way a node is turned into a port scanner or a flood) gets
//! the same few dials as one peer would.
//!
//! # Invariants
//! - `in_flight[ip]` is the number of started dials in `dials` that name `ip` (entries at 0
//!   are removed).
//! - `backoff` holds at most `max_ips` IPs; when full, entries whose wait is over go first,
//!   and failures beyond that are not remembered (the in-flight cap still holds).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use libp2p::swarm::ConnectionId;
use libp2p::Multiaddr;
use meshwork_proto::addr::ip_of;
use tokio::time::Instant;

/// Content dials in flight to one IP, at most.
pub const DIALS_PER_IP: usize = 2;
/// The wait after an IP's first failed dial...
pub const BACKOFF_FIRST: Duration = Duration::from_secs(2);
/// ...doubled with each failure in a row, up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// IPs whose failures are remembered, at most.
pub const MAX_BACKOFF_IPS: usize = 4096;

struct Backoff {
    failures: u32,
    until: Instant,
}

/// See the module docs.
pub struct DialGuard {
    pub per_ip: usize,
    pub first: Duration,
    pub max: Duration,
    pub max_ips: usize,
    in_flight: HashMap<IpAddr, usize>,
    dials: HashMap<ConnectionId, Vec<IpAddr>>,
    backoff: HashMap<IpAddr, Backoff>,
}

impl Default for DialGuard {
    fn default() -> Self {
        Self {
            per_ip: DIALS_PER_IP,
            first: BACKOFF_FIRST,
            max: BACKOFF_MAX,
            max_ips: MAX_BACKOFF_IPS,
            in_flight: HashMap::new(),
            dials: HashMap::new(),
            backoff: HashMap::new(),
        }
    }
}

/// Why no address of a dial may be dialed now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} failed to answer recently: not dialed again for {1:?}")]
    BackingOff(IpAddr, Duration),
    #[error("{0} has {1} dials in flight already")]
    Busy(IpAddr, usize),
}

impl DialGuard {
    /// The addresses of `addrs` that may be dialed at `now`, or why none may. Addresses
    /// without an IP are dropped (the policy admits none).
    pub fn admit(&self, addrs: Vec<Multiaddr>, now: Instant) -> Result<Vec<Multiaddr>, Refused> {
        let mut why = None;
        let mut taken: HashSet<IpAddr> = HashSet::new();
        let ok: Vec<Multiaddr> = addrs
            .into_iter()
            .filter(|a| {
                let Some(ip) = ip_of(a) else {
                    return false;
                };
                if let Some(b) = self.backoff.get(&ip).filter(|b| b.until > now) {
                    why = Some(Refused::BackingOff(ip, b.until - now));
                    return false;
                }
                // Two addresses of one IP in one dial count once.
                let first_of_ip = !taken.contains(&ip);
                let n = self.in_flight.get(&ip).copied().unwrap_or(0);
                if first_of_ip && n >= self.per_ip {
                    why = Some(Refused::Busy(ip, n));
                    return false;
                }
                taken.insert(ip);
                true
            })
            .collect();
        match (ok.is_empty(), why) {
            (true, Some(why)) => Err(why),
            _ => Ok(ok),
        }
    }

    /// A dial of these (admitted) addresses started.
    pub fn started(&mut self, id: ConnectionId, addrs: &[Multiaddr]) {
        let mut ips: Vec<IpAddr> = addrs.iter().filter_map(ip_of).collect();
        ips.sort();
        ips.dedup();
        for ip in &ips {
            *self.in_flight.entry(*ip).or_default() += 1;
        }
        self.dials.insert(id, ips);
    }

    /// The dial `id` ended: connected to `connected` (its IP's failures are forgiven), or
    /// failed at the IPs of `failed` (`None`: at every IP it named). A dial this guard did not
    /// start is ignored.
    pub fn ended(
        &mut self,
        id: ConnectionId,
        connected: Option<&Multiaddr>,
        failed: Option<Vec<IpAddr>>,
        now: Instant,
    ) {
        let Some(ips) = self.dials.remove(&id) else {
            return;
        };
        for ip in &ips {
            if let Some(n) = self.in_flight.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(ip);
                }
            }
        }
        if let Some(ip) = connected.and_then(ip_of) {
            self.backoff.remove(&ip);
            return;
        }
        for ip in failed.unwrap_or(ips) {
            self.failed(ip, now);
        }
        if self.backoff.capacity() > 64 && self.backoff.len() * 4 < self.backoff.capacity() {
            self.backoff.shrink_to_fit();
        }
    }

    fn failed(&mut self, ip: IpAddr, now: Instant) {
        if !self.backoff.contains_key(&ip) && self.backoff.len() >= self.max_ips {
            // Rare (only when full): make room from the entries whose wait is over.
            self.backoff.retain(|_, b| b.until > now);
            if self.backoff.len() >= self.max_ips {
                return;
            }
        }
        let b = self.backoff.entry(ip).or_insert(Backoff {
            failures: 0,
            until: now,
        });
        b.failures = b.failures.saturating_add(1);
        let wait = self
            .first
            .saturating_mul(1 << (b.failures - 1).min(16))
            .min(self.max);
        b.until = now + wait;
    }

    /// Dials in flight to `ip`.
    pub fn in_flight(&self, ip: IpAddr) -> usize {
        self.in_flight.get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_ip_gets_few_dials_whatever_the_peer_ids() {
        let mut g = DialGuard::default();
        let now = Instant::now();
        let a = ma("/ip4/127.0.0.99/tcp/9999");
        let ip: IpAddr = "127.0.0.99".parse().unwrap();
        // 30 peer ids at one address: two dials at once, then refusals.
        let mut started = vec![];
        for _ in 0..30 {
            if let Ok(ok) = g.admit(vec![a.clone()], now) {
                let id = ConnectionId::new_unchecked(started.len());
                g.started(id, &ok);
                started.push(id);
            }
        }
        assert_eq!(started.len(), DIALS_PER_IP);
        assert_eq!(g.admit(vec![a.clone()], now), Err(Refused::Busy(ip, 2)));
        // Another IP is not held up.
        assert!(g.admit(vec![ma("/ip4/127.0.0.98/tcp/1")], now).is_ok());
        // They fail: the IP backs off, doubling.
        for id in started {
            g.ended(id, None, None, now);
        }
        assert_eq!(g.in_flight(ip), 0);
        assert!(matches!(
            g.admit(vec![a.clone()], now),
            Err(Refused::BackingOff(..))
        ));
        let mut t = now;
        let mut waits = vec![];
        for k in 0..3 {
            let next = (1..=700)
                .map(|s| t + Duration::from_secs(s))
                .find(|at| g.admit(vec![a.clone()], *at).is_ok())
                .unwrap();
            waits.push(next - t);
            t = next;
            let id = ConnectionId::new_unchecked(100 + k);
            g.started(id, std::slice::from_ref(&a));
            g.ended(id, None, Some(vec![ip]), t);
        }
        // Two failures at first (4 s), then one each: 8 s, 16 s.
        assert_eq!(
            waits,
            [4, 8, 16].map(Duration::from_secs),
            "exponential backoff per IP"
        );
        // A connection forgives.
        let next = t + Duration::from_secs(40);
        let id = ConnectionId::new_unchecked(200);
        g.started(id, std::slice::from_ref(&a));
        g.ended(id, Some(&a), None, next);
        assert!(g.admit(vec![a.clone()], next).is_ok());
    }

    #[test]
    fn the_backoff_map_is_bounded() {
        let mut g = DialGuard {
            max_ips: 10,
            ..DialGuard::default()
        };
        let now = Instant::now();
        for i in 0..100u32 {
            let a = ma(&format!("/ip4/10.0.{}.{}/tcp/1", i / 250, i % 250));
            let id = ConnectionId::new_unchecked(i as usize);
            g.started(id, &[a]);
            g.ended(id, None, None, now);
        }
        assert!(g.backoff.len() <= 10);
        assert!(g.dials.is_empty() && g.in_flight.is_empty());
    }
}
