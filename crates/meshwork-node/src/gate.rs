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
//! Invariant: `inbound` holds exactly the established inbound connections, and
//! `inbound_per_ip[ip]` counts those of them from `ip` (entries at zero are removed).

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::core::Endpoint;
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use meshwork_proto::addr::ip_of;

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
}

#[derive(Clone, Copy, Debug)]
pub struct GateLimits {
    pub max_inbound: usize,
    pub max_inbound_per_ip: usize,
}

pub struct Gate {
    limits: GateLimits,
    banned_peers: HashMap<PeerId, u64>,
    banned_ips: HashMap<IpAddr, u64>,
    managed: HashSet<ConnectionId>,
    inbound: HashMap<ConnectionId, Option<IpAddr>>,
    inbound_per_ip: HashMap<IpAddr, usize>,
    /// Keep-alive changes to deliver to connection handlers. Bounded by the number of open
    /// connections: at most one promotion per connection.
    notify: VecDeque<(PeerId, ConnectionId)>,
}

fn unix_now() -> u64 {
    crate::unix_now()
}

impl Gate {
    pub fn new(limits: GateLimits) -> Self {
        Self {
            limits,
            banned_peers: HashMap::new(),
            banned_ips: HashMap::new(),
            managed: HashSet::new(),
            inbound: HashMap::new(),
            inbound_per_ip: HashMap::new(),
            notify: VecDeque::new(),
        }
    }

    /// Turns an open transient outbound connection into a managed one that is kept alive.
    pub fn promote(&mut self, peer: PeerId, id: ConnectionId) {
        if self.managed.insert(id) {
            self.notify.push_back((peer, id));
        }
    }

    /// Bans are mirrored from the address book, which remains their owner and bounds them.
    pub fn ban(&mut self, peer: PeerId, ip: Option<IpAddr>, until: u64) {
        self.banned_peers.insert(peer, until);
        if let Some(ip) = ip {
            self.banned_ips.insert(ip, until);
        }
    }

    pub fn expire_bans(&mut self, now: u64) {
        self.banned_peers.retain(|_, t| *t > now);
        self.banned_ips.retain(|_, t| *t > now);
    }

    /// Marks the connection about to be dialed with `id` as a managed outbound connection.
    pub fn expect_managed(&mut self, id: ConnectionId) {
        self.managed.insert(id);
    }

    pub fn inbound_count(&self) -> usize {
        self.inbound.len()
    }

    fn check_ip(&self, remote: &Multiaddr, now: u64) -> Result<Option<IpAddr>, ConnectionDenied> {
        let ip = ip_of(remote);
        if let Some(ip) = ip {
            if self.banned_ips.get(&ip).is_some_and(|t| *t > now) {
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

    fn check_peer(&self, peer: &PeerId, now: u64) -> Result<(), ConnectionDenied> {
        if self.banned_peers.get(peer).is_some_and(|t| *t > now) {
            return Err(ConnectionDenied::new(GateError::BannedPeer(*peer)));
        }
        Ok(())
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = KeepAlive;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.check_ip(remote, unix_now()).map(|_| ())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
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
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = peer {
            self.check_peer(&peer, unix_now())?;
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
            return Err(e);
        }
        Ok(KeepAlive(self.managed.contains(&id)))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(c) => {
                self.managed.remove(&c.connection_id);
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
            FromSwarm::DialFailure(f) => {
                self.managed.remove(&f.connection_id);
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
