//! The connection gate: a libp2p `NetworkBehaviour` with no protocol of its own that decides
//! which connections may exist and which are kept alive.
//!
//! - Inbound connections are refused from banned IPs (before the handshake) and banned peers
//!   (after it), beyond `max_inbound` in all, and beyond `max_inbound_per_ip` from one IP.
//! - Outbound connections to banned peers are refused.
//! - Keep-alive: inbound connections and the outbound connections the connection manager chose
//!   (their `ConnectionId`s are registered with [`Gate::expect_managed`] before dialing) are kept
//!   open for as long as both sides want. Every other outbound connection (Kademlia query dials,
//!   feelers) is *transient*: libp2p closes it once no protocol uses it for the idle timeout.
//!
//! - Outbound connections that nobody registered (Kademlia's query dials) are *transient* and
//!   capped at `max_transient`, pending and established together: a DHT under load cannot make
//!   the node hold an unbounded number of sockets. At the cap, a new dial evicts the oldest
//!   established transient connection (closed, and no longer counted, while at most
//!   `max_transient` are closing); with nothing to evict it is refused, which Kademlia treats as
//!   a failed dial.
//!
//! Invariants: `inbound` holds exactly the established inbound connections, and
//! `inbound_per_ip[ip]` counts those of them from `ip` (entries at zero are removed);
//! `transient` holds exactly the pending and established outbound connections that are neither
//! managed nor feelers nor being evicted (promotion moves one from `transient` to `managed`),
//! `transient_order` the established ones among them, and `closing` at most `max_transient`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::core::Endpoint;
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId,
    FromSwarm, NetworkBehaviour, NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use meshwork_proto::addr::ip_of;

use crate::bans::BanList;

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("peer {0} is banned")]
    BannedPeer(PeerId),
    #[error("IP {0} is banned")]
    BannedIp(IpAddr),
    #[error("inbound connection limit of {0} reached")]
    InboundFull(usize),
    #[error("limit of {0} inbound connections from IP {1} reached")]
    PerIpFull(usize, IpAddr),
    #[error("limit of {0} inbound handshakes in progress reached")]
    PendingFull(usize),
    #[error("limit of {0} inbound handshakes in progress from IP {1} reached")]
    PendingPerIpFull(usize, IpAddr),
    #[error("limit of {0} transient outbound connections reached")]
    TransientFull(usize),
    #[error("peer {0} is on the other side of a lab partition")]
    Partitioned(PeerId),
}

#[derive(Clone, Copy, Debug)]
pub struct GateLimits {
    pub max_inbound: usize,
    pub max_inbound_per_ip: usize,
    /// Outbound connections that are neither managed nor feelers (Kademlia query dials),
    /// pending and established together.
    pub max_transient: usize,
}

/// Inbound connections still in their handshake (TCP accepted, Noise and Yamux not done), in
/// all and from one IP. Each holds a descriptor for up to the transport's timeout (10 s); without
/// a cap, 1 100 sockets that never finish a handshake took a node at the usual 1 024 files to
/// `EMFILE`, and its HTTP API with it.
pub const MAX_PENDING_INBOUND: usize = 64;
/// See [`MAX_PENDING_INBOUND`].
pub const MAX_PENDING_INBOUND_PER_IP: usize = 4;

pub struct Gate {
    limits: GateLimits,
    /// A copy of the address book's bans (same bound).
    bans: BanList,
    managed: HashSet<ConnectionId>,
    /// Dials registered as feelers: short-lived, exempt from the transient limit.
    feelers: HashSet<ConnectionId>,
    /// Dials registered by the content service.
    content: HashSet<ConnectionId>,
    /// Transient outbound connections, pending or established.
    transient: HashSet<ConnectionId>,
    /// Established transient connections, oldest first, for eviction.
    transient_order: VecDeque<(PeerId, ConnectionId)>,
    /// Transient connections evicted and being closed; they no longer count toward the limit.
    closing: HashSet<ConnectionId>,
    /// Closes to deliver to the swarm.
    to_close: VecDeque<(PeerId, ConnectionId)>,
    inbound: HashMap<ConnectionId, Option<IpAddr>>,
    inbound_per_ip: HashMap<IpAddr, usize>,
    /// Inbound connections in their handshake (at most [`MAX_PENDING_INBOUND`]), and how many
    /// of them come from each IP (at most [`MAX_PENDING_INBOUND_PER_IP`]; no zero entries).
    pending_inbound: HashMap<ConnectionId, Option<IpAddr>>,
    pending_per_ip: HashMap<IpAddr, usize>,
    /// Keep-alive changes to deliver to connection handlers. Bounded by the number of open
    /// connections: at most one promotion per connection.
    notify: VecDeque<(PeerId, ConnectionId)>,
    /// Lab fault injection: peers this node may not connect to (a network partition). Set by
    /// the harness, bounded by the size of the lab's network.
    partitioned: HashSet<PeerId>,
}

fn unix_now() -> u64 {
    crate::unix_now()
}

impl Gate {
    pub fn new(limits: GateLimits) -> Self {
        Self {
            limits,
            bans: BanList::default(),
            managed: HashSet::new(),
            feelers: HashSet::new(),
            content: HashSet::new(),
            transient: HashSet::new(),
            transient_order: VecDeque::new(),
            closing: HashSet::new(),
            to_close: VecDeque::new(),
            inbound: HashMap::new(),
            inbound_per_ip: HashMap::new(),
            pending_inbound: HashMap::new(),
            pending_per_ip: HashMap::new(),
            notify: VecDeque::new(),
            partitioned: HashSet::new(),
        }
    }

    /// Lab fault injection: refuse every connection with these peers (the caller closes the
    /// open ones). An empty set heals the partition.
    pub fn set_partitioned(&mut self, peers: HashSet<PeerId>) {
        self.partitioned = peers;
    }

    /// Turns an open transient outbound connection into a managed one that is kept alive.
    pub fn promote(&mut self, peer: PeerId, id: ConnectionId) {
        if self.closing.contains(&id) {
            return; // being evicted already
        }
        self.transient.remove(&id);
        self.transient_order.retain(|(_, c)| *c != id);
        if self.managed.insert(id) {
            self.notify.push_back((peer, id));
        }
    }

    /// Bans are mirrored from the address book, which owns and persists them.
    pub fn set_bans(&mut self, bans: BanList) {
        self.bans = bans;
    }

    pub fn ban(&mut self, peer: PeerId, ip: Option<IpAddr>, until: u64) {
        self.bans.ban(Some(peer), ip, until);
    }

    pub fn expire_bans(&mut self, now: u64) {
        self.bans.expire(now);
    }

    /// Marks the connection about to be dialed with `id` as a managed outbound connection.
    pub fn expect_managed(&mut self, id: ConnectionId) {
        self.managed.insert(id);
    }

    /// Marks the connection about to be dialed with `id` as a content connection: outside the
    /// transient limit (the content service bounds its peers), kept only while a piece stream
    /// is open (libp2p keeps a connection with an active stream).
    pub fn expect_content(&mut self, id: ConnectionId) {
        self.content.insert(id);
    }

    /// Marks the connection about to be dialed with `id` as a feeler.
    pub fn expect_feeler(&mut self, id: ConnectionId) {
        self.feelers.insert(id);
    }

    fn check_ip(&self, remote: &Multiaddr, now: u64) -> Result<Option<IpAddr>, ConnectionDenied> {
        let ip = ip_of(remote);
        if let Some(ip) = ip {
            if self.bans.is_banned_ip(&ip, now) {
                return Err(ConnectionDenied::new(GateError::BannedIp(ip)));
            }
            if self.inbound_per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_inbound_per_ip
            {
                return Err(ConnectionDenied::new(GateError::PerIpFull(
                    self.limits.max_inbound_per_ip,
                    ip,
                )));
            }
        }
        if self.inbound.len() >= self.limits.max_inbound {
            return Err(ConnectionDenied::new(GateError::InboundFull(
                self.limits.max_inbound,
            )));
        }
        Ok(ip)
    }

    /// Counts a handshake in progress, or refuses it at the caps.
    fn admit_pending(
        &mut self,
        id: ConnectionId,
        ip: Option<IpAddr>,
    ) -> Result<(), ConnectionDenied> {
        if self.pending_inbound.len() >= MAX_PENDING_INBOUND {
            return Err(ConnectionDenied::new(GateError::PendingFull(
                MAX_PENDING_INBOUND,
            )));
        }
        if let Some(ip) = ip {
            let n = self.pending_per_ip.entry(ip).or_insert(0);
            if *n >= MAX_PENDING_INBOUND_PER_IP {
                return Err(ConnectionDenied::new(GateError::PendingPerIpFull(
                    MAX_PENDING_INBOUND_PER_IP,
                    ip,
                )));
            }
            *n += 1;
        }
        self.pending_inbound.insert(id, ip);
        Ok(())
    }

    /// The handshake of `id` ended (established, failed or timed out).
    fn end_pending(&mut self, id: ConnectionId) {
        if let Some(Some(ip)) = self.pending_inbound.remove(&id) {
            if let Some(n) = self.pending_per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.pending_per_ip.remove(&ip);
                }
            }
        }
    }

    /// Inbound handshakes in progress now (for tests and metrics).
    pub fn pending_inbound(&self) -> usize {
        self.pending_inbound.len()
    }

    fn check_peer(&self, peer: &PeerId, now: u64) -> Result<(), ConnectionDenied> {
        if self.bans.is_banned_peer(peer, now) {
            return Err(ConnectionDenied::new(GateError::BannedPeer(*peer)));
        }
        if self.partitioned.contains(peer) {
            return Err(ConnectionDenied::new(GateError::Partitioned(*peer)));
        }
        Ok(())
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = KeepAlive;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let ip = self.check_ip(remote, unix_now())?;
        self.admit_pending(id, ip)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.end_pending(id);
        let now = unix_now();
        self.check_peer(&peer, now)?;
        let ip = self.check_ip(remote, now)?;
        self.inbound.insert(id, ip);
        if let Some(ip) = ip {
            *self.inbound_per_ip.entry(ip).or_insert(0) += 1;
        }
        Ok(KeepAlive(true))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = peer {
            self.check_peer(&peer, unix_now())?;
        }
        if !self.managed.contains(&id) && !self.feelers.contains(&id) && !self.content.contains(&id)
        {
            if self.transient.len() >= self.limits.max_transient {
                // Make room by closing the oldest established transient connection (queries are
                // short, so it is most likely idle). Refuse only if none can be evicted, or
                // too many are already closing.
                let victim = (self.closing.len() < self.limits.max_transient)
                    .then(|| self.transient_order.pop_front())
                    .flatten();
                let Some((peer, old)) = victim else {
                    return Err(ConnectionDenied::new(GateError::TransientFull(
                        self.limits.max_transient,
                    )));
                };
                self.transient.remove(&old);
                self.closing.insert(old);
                self.to_close.push_back((peer, old));
            }
            self.transient.insert(id);
        }
        Ok(vec![])
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if let Err(e) = self.check_peer(&peer, unix_now()) {
            self.managed.remove(&id);
            self.transient.remove(&id);
            return Err(e);
        }
        if self.transient.contains(&id) {
            self.transient_order.push_back((peer, id));
        }
        Ok(KeepAlive(self.managed.contains(&id)))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(c) => {
                self.end_pending(c.connection_id);
                self.managed.remove(&c.connection_id);
                self.feelers.remove(&c.connection_id);
                self.content.remove(&c.connection_id);
                self.transient.remove(&c.connection_id);
                self.closing.remove(&c.connection_id);
                self.transient_order
                    .retain(|(_, id)| *id != c.connection_id);
                self.to_close.retain(|(_, id)| *id != c.connection_id);
                self.notify.retain(|(_, id)| *id != c.connection_id);
                if let Some(Some(ip)) = self.inbound.remove(&c.connection_id) {
                    if let Some(n) = self.inbound_per_ip.get_mut(&ip) {
                        *n -= 1;
                        if *n == 0 {
                            self.inbound_per_ip.remove(&ip);
                        }
                    }
                }
            }
            FromSwarm::ListenFailure(f) => self.end_pending(f.connection_id),
            FromSwarm::DialFailure(f) => {
                self.managed.remove(&f.connection_id);
                self.feelers.remove(&f.connection_id);
                self.content.remove(&f.connection_id);
                self.transient.remove(&f.connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        if let Some((peer_id, id)) = self.to_close.pop_front() {
            return Poll::Ready(ToSwarm::CloseConnection {
                peer_id,
                connection: CloseConnection::One(id),
            });
        }
        match self.notify.pop_front() {
            Some((peer_id, id)) => Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(id),
                event: true,
            }),
            None => Poll::Pending,
        }
    }
}

/// A handler with no protocol that keeps its connection alive, or not; the behaviour can turn
/// keep-alive on later (promotion).
pub struct KeepAlive(bool);

impl ConnectionHandler for KeepAlive {
    type FromBehaviour = bool;
    type ToBehaviour = Infallible;
    type InboundProtocol = DeniedUpgrade;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<DeniedUpgrade> {
        SubstreamProtocol::new(DeniedUpgrade, ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.0
    }

    fn on_behaviour_event(&mut self, keep_alive: bool) {
        self.0 = keep_alive;
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, (), Infallible>> {
        Poll::Pending
    }

    fn on_connection_event(&mut self, _: ConnectionEvent<DeniedUpgrade, DeniedUpgrade>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate::new(GateLimits {
            max_inbound: 1000,
            max_inbound_per_ip: 1000,
            max_transient: 16,
        })
    }

    fn from(ip: &str) -> Multiaddr {
        format!("/ip4/{ip}/tcp/40000").parse().unwrap()
    }

    fn local() -> Multiaddr {
        "/ip4/127.0.0.1/tcp/4001".parse().unwrap()
    }

    /// Connection ids as the swarm hands them out: fresh for every call.
    fn ids() -> impl FnMut() -> ConnectionId {
        let mut next = 0;
        move || {
            next += 1;
            ConnectionId::new_unchecked(next)
        }
    }

    /// Why the gate refused: its error's text.
    fn why(e: ConnectionDenied) -> String {
        e.downcast_ref::<GateError>()
            .map_or_else(|| "not the gate's".into(), ToString::to_string)
    }

    /// What the gate refused with, if it refused.
    fn denied<T>(r: Result<T, ConnectionDenied>) -> Option<String> {
        r.err().map(why)
    }

    /// An inbound connection through both stages, as the swarm drives them.
    fn accept(g: &mut Gate, id: ConnectionId, ip: &str) -> Result<(), String> {
        let remote = from(ip);
        g.handle_pending_inbound_connection(id, &local(), &remote)
            .map_err(why)?;
        g.handle_established_inbound_connection(id, PeerId::random(), &local(), &remote)
            .map(|_| ())
            .map_err(why)
    }

    fn close(g: &mut Gate, id: ConnectionId, ip: &str) {
        let endpoint = libp2p::core::ConnectedPoint::Listener {
            local_addr: local(),
            send_back_addr: from(ip),
        };
        g.on_swarm_event(FromSwarm::ConnectionClosed(
            libp2p::swarm::behaviour::ConnectionClosed {
                peer_id: PeerId::random(),
                connection_id: id,
                endpoint: &endpoint,
                cause: None,
                remaining_established: 0,
            },
        ));
    }

    /// With the configuration's defaults (64 inbound, 8 from one IP): the 9th connection from
    /// one IP and the 65th in all are refused, and a closed connection frees its slot, in all
    /// and for its IP.
    #[test]
    fn established_inbound_connections_are_capped_in_all_and_per_ip() {
        let d = crate::config::ConnectionsSection::default();
        assert_eq!((d.max_inbound, d.max_inbound_per_ip), (64, 8));
        let mut g = Gate::new(GateLimits {
            max_inbound: d.max_inbound,
            max_inbound_per_ip: d.max_inbound_per_ip,
            max_transient: d.max_transient,
        });
        let mut id = ids();
        let mut from_one = vec![];
        for _ in 0..8 {
            let c = id();
            from_one.push(c);
            accept(&mut g, c, "127.0.0.9").expect("within the per-IP limit");
        }
        assert_eq!(
            accept(&mut g, id(), "127.0.0.9"),
            Err("limit of 8 inbound connections from IP 127.0.0.9 reached".into())
        );
        // Seven more IPs of eight each fill the node: 64 in all.
        let mut last = None;
        for ip in 10..17 {
            for _ in 0..8 {
                let c = id();
                accept(&mut g, c, &format!("127.0.0.{ip}")).expect("within both limits");
                last = Some((c, ip));
            }
        }
        assert_eq!(g.inbound.len(), 64);
        assert_eq!(
            accept(&mut g, id(), "127.0.1.1"),
            Err("inbound connection limit of 64 reached".into())
        );
        // A connection that closes frees a slot for anyone...
        let (c, ip) = last.expect("connections were made");
        close(&mut g, c, &format!("127.0.0.{ip}"));
        accept(&mut g, id(), "127.0.1.1").expect("a slot was freed");
        // ...and one of the full IP's frees a slot for that IP, once the node has room.
        close(&mut g, from_one[0], "127.0.0.9");
        close(&mut g, id(), "127.0.0.200"); // an id the gate never saw changes nothing
        accept(&mut g, id(), "127.0.0.9").expect("the IP's slot was freed");
        assert_eq!(g.inbound.len(), 64);
        assert_eq!(g.inbound_per_ip.values().sum::<usize>(), 64);
    }

    /// A banned IP is refused before the handshake (the pending connection has no peer id yet,
    /// and costs no Noise work); a banned peer id from any IP after it, once the handshake
    /// names it; dials to a banned peer are not made. A ban ends at its end time.
    #[test]
    fn bans_refuse_the_ip_before_the_handshake_and_the_peer_after_it() {
        let mut g = gate();
        let mut id = ids();
        let now = unix_now();
        let peer = PeerId::random();
        g.ban(peer, Some("127.0.0.66".parse().unwrap()), now + 60);
        assert_eq!(
            denied(g.handle_pending_inbound_connection(id(), &local(), &from("127.0.0.66"))),
            Some("IP 127.0.0.66 is banned".into())
        );
        assert_eq!(
            g.pending_inbound(),
            0,
            "nothing was counted for the refused one"
        );
        // The same peer from another IP passes the first stage and is refused at the second.
        let c = id();
        assert!(g
            .handle_pending_inbound_connection(c, &local(), &from("127.0.0.67"))
            .is_ok());
        assert_eq!(
            denied(g.handle_established_inbound_connection(c, peer, &local(), &from("127.0.0.67"))),
            Some(format!("peer {peer} is banned"))
        );
        assert_eq!(
            g.pending_inbound(),
            0,
            "the refused handshake's slot is free"
        );
        assert!(g.inbound.is_empty());
        assert_eq!(
            denied(g.handle_pending_outbound_connection(id(), Some(peer), &[], Endpoint::Dialer)),
            Some(format!("peer {peer} is banned"))
        );
        // Another peer on the clean IP is welcome.
        accept(&mut g, id(), "127.0.0.67").expect("not banned");
        // Once the ban has ended, both the IP and the peer are welcome again.
        g.expire_bans(now + 61);
        assert!(g
            .handle_pending_inbound_connection(id(), &local(), &from("127.0.0.66"))
            .is_ok());
        assert!(g
            .handle_pending_outbound_connection(id(), Some(peer), &[], Endpoint::Dialer)
            .is_ok());
    }

    /// Outbound connections nobody registered (Kademlia's query dials) are capped at
    /// `max_transient`, pending and established together. At the cap a new one evicts the
    /// oldest established one (the swarm is told to close it); with none established it is
    /// refused. Managed, feeler and content dials are outside the cap.
    #[test]
    fn transient_dials_are_capped_and_evict_the_oldest_established() {
        let mut g = Gate::new(GateLimits {
            max_inbound: 1000,
            max_inbound_per_ip: 1000,
            max_transient: 4,
        });
        let mut id = ids();
        let dial = |g: &mut Gate, c: ConnectionId| {
            denied(g.handle_pending_outbound_connection(c, None, &[], Endpoint::Dialer))
        };
        let pending: Vec<ConnectionId> = (0..4).map(|_| id()).collect();
        for c in &pending {
            assert_eq!(dial(&mut g, *c), None);
        }
        assert_eq!(
            dial(&mut g, id()),
            Some("limit of 4 transient outbound connections reached".into()),
            "four pending and none to evict"
        );
        // Registered dials do not count, even at the cap.
        let registered: [fn(&mut Gate, ConnectionId); 3] = [
            Gate::expect_managed,
            Gate::expect_feeler,
            Gate::expect_content,
        ];
        for expect in registered {
            let c = id();
            expect(&mut g, c);
            assert_eq!(dial(&mut g, c), None);
        }
        // Two of the four get established, oldest first.
        let (p0, p1) = (PeerId::random(), PeerId::random());
        for (p, c) in [(p0, pending[0]), (p1, pending[1])] {
            assert!(g
                .handle_established_outbound_connection(
                    c,
                    p,
                    &local(),
                    Endpoint::Dialer,
                    PortUse::New
                )
                .is_ok());
        }
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(g.poll(&mut cx).is_pending(), "nothing to close yet");
        // A fifth transient dial evicts the oldest established one, then the next.
        for (p, c) in [(p0, pending[0]), (p1, pending[1])] {
            assert_eq!(dial(&mut g, id()), None);
            match g.poll(&mut cx) {
                Poll::Ready(ToSwarm::CloseConnection {
                    peer_id,
                    connection: CloseConnection::One(closed),
                }) => assert_eq!((peer_id, closed), (p, c)),
                _ => panic!("the oldest established transient connection is not closed"),
            }
        }
        assert_eq!(g.transient.len(), 4);
        assert_eq!(
            dial(&mut g, id()),
            Some("limit of 4 transient outbound connections reached".into()),
            "the rest are pending: nothing left to evict"
        );
    }

    /// Handshakes in progress are capped per IP and in all, and a slot is free again once the
    /// handshake ends: a flood of sockets that never finish one cannot hold the node's files.
    #[test]
    fn inbound_handshakes_in_progress_are_capped_per_ip_and_in_all() {
        let mut g = gate();
        let local = local();
        let mut id = ids();
        let mut first = vec![];
        for _ in 0..MAX_PENDING_INBOUND_PER_IP {
            let c = id();
            first.push(c);
            assert!(g
                .handle_pending_inbound_connection(c, &local, &from("127.0.0.9"))
                .is_ok());
        }
        assert!(
            g.handle_pending_inbound_connection(id(), &local, &from("127.0.0.9"))
                .is_err(),
            "one IP beyond its share"
        );
        // Other IPs fill the rest, then everyone is refused.
        let mut ip = 10;
        while g.pending_inbound() < MAX_PENDING_INBOUND {
            let _ =
                g.handle_pending_inbound_connection(id(), &local, &from(&format!("127.0.0.{ip}")));
            ip += 1;
        }
        assert!(g
            .handle_pending_inbound_connection(id(), &local, &from("127.0.1.1"))
            .is_err());
        // A handshake that completes frees its slot (and its IP's).
        let peer = PeerId::random();
        assert!(g
            .handle_established_inbound_connection(first[0], peer, &local, &from("127.0.0.9"))
            .is_ok());
        assert_eq!(g.pending_inbound(), MAX_PENDING_INBOUND - 1);
        assert!(g
            .handle_pending_inbound_connection(id(), &local, &from("127.0.0.9"))
            .is_ok());
    }
}
