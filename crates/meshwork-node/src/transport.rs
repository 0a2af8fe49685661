//! TCP dials bound to a chosen local IP.
//!
//! libp2p's TCP transport binds outgoing sockets to `0.0.0.0` (or `::`), letting the kernel pick
//! the source address. On a host with several addresses (a multi-homed server, or the lab's
//! many nodes on `127.0.0.0/8`, where the kernel always picks `127.0.0.1`) peers would then see
//! our connections come from an address that is not ours, and put us in the wrong address
//! group. [`BoundTcpDial`] dials from a given IP (as Bitcoin Core's `-bind`). It only dials: put
//! it before libp2p's TCP transport with `or_transport`, which then handles listening, and
//! dialing when no IP is set or the address family differs.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt, Pending};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::core::Transport;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

/// TCP with Noise and Yamux, dialing from `dial_from` when set: the TCP half of every
/// Meshwork node's transport (and of the lab's rogue peers).
pub fn tcp_noise_yamux(
    key: &libp2p::identity::Keypair,
    dial_from: Option<IpAddr>,
) -> Result<Boxed<(libp2p::PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    Ok(BoundTcpDial::new(dial_from)
        .or_transport(libp2p::tcp::tokio::Transport::new(
            libp2p::tcp::Config::default().nodelay(true),
        ))
        .map(|either, _| either.into_inner())
        .map_err(|either| either.into_inner())
        .upgrade(libp2p::core::upgrade::Version::V1Lazy)
        .authenticate(libp2p::noise::Config::new(key)?)
        .multiplex(libp2p::yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

pub struct BoundTcpDial {
    ip: Option<IpAddr>,
}

impl BoundTcpDial {
    pub fn new(ip: Option<IpAddr>) -> Self {
        Self { ip }
    }
}

/// `/ip4/a.b.c.d/tcp/p` (optionally `/p2p/..`) as a socket address.
fn tcp_socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut it = addr.iter();
    let ip = match it.next()? {
        Protocol::Ip4(ip) => IpAddr::V4(ip),
        Protocol::Ip6(ip) => IpAddr::V6(ip),
        _ => return None,
    };
    let Protocol::Tcp(port) = it.next()? else {
        return None;
    };
    match it.next() {
        None | Some(Protocol::P2p(_)) => Some(SocketAddr::new(ip, port)),
        _ => None,
    }
}

impl Transport for BoundTcpDial {
    type Output = libp2p::tcp::tokio::TcpStream;
    type Error = io::Error;
    type ListenerUpgrade = Pending<Result<Self::Output, io::Error>>;
    type Dial = BoxFuture<'static, Result<Self::Output, io::Error>>;

    fn listen_on(
        &mut self,
        _: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<io::Error>> {
        Err(TransportError::MultiaddrNotSupported(addr))
    }

    fn remove_listener(&mut self, _: ListenerId) -> bool {
        false
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        _: DialOpts,
    ) -> Result<Self::Dial, TransportError<io::Error>> {
        let (Some(bind), Some(remote)) = (self.ip, tcp_socket_addr(&addr)) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        if bind.is_ipv4() != remote.is_ipv4() {
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        Ok(async move {
            let socket = if bind.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_nodelay(true)?;
            socket.bind(SocketAddr::new(bind, 0))?;
            let stream = socket.connect(remote).await?;
            Ok(libp2p::tcp::tokio::TcpStream(stream))
        }
        .boxed())
    }

    fn poll(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, io::Error>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_addresses_only() {
        assert_eq!(
            tcp_socket_addr(&"/ip4/1.2.3.4/tcp/5".parse().unwrap()),
            Some("1.2.3.4:5".parse().unwrap())
        );
        assert_eq!(
            tcp_socket_addr(&"/ip4/1.2.3.4/udp/5/quic-v1".parse().unwrap()),
            None
        );
        assert_eq!(tcp_socket_addr(&"/dns4/a.b/tcp/5".parse().unwrap()), None);
        assert_eq!(
            tcp_socket_addr(&"/ip4/1.2.3.4/tcp/5/ws".parse().unwrap()),
            None
        );
    }
}
