//! Address groups and routability.
//!
//! An *address group* is the unit an attacker pays for: Bitcoin's addrman observes that
//! controlling many addresses inside one IPv4 /16 (or IPv6 /32) is cheap, while controlling
//! addresses in many groups is expensive. The address book buckets by group and the connection
//! manager never makes two outbound connections into one group, so a flood from one group can
//! take at most a bounded share of either.
//!
//! Only IP-based multiaddrs (`/ip4` or `/ip6`, then `/tcp/<port>` or `/udp/<port>/quic-v1`,
//! optionally ending in `/p2p/<id>`) are *dialable addresses* for the address book. DNS names
//! are accepted for bootstrap addresses only, where the operator vouches for them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use multiaddr::{Multiaddr, Protocol};

/// The group an address belongs to.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum AddrGroup {
    /// The first 16 bits of an IPv4 address (IPv4-mapped IPv6 addresses count as IPv4).
    V4([u8; 2]),
    /// The first 32 bits of an IPv6 address.
    V6([u8; 4]),
}

impl AddrGroup {
    pub fn of_ip(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                AddrGroup::V4([o[0], o[1]])
            }
            IpAddr::V6(v6) => {
                let o = v6.octets();
                AddrGroup::V6([o[0], o[1], o[2], o[3]])
            }
        }
    }

    /// The group of a dialable address, or `None` if the address has no IP component.
    pub fn of_addr(addr: &Multiaddr) -> Option<Self> {
        ip_of(addr).map(Self::of_ip)
    }

    /// A stable byte form, used as hash input for bucket placement.
    pub fn to_bytes(self) -> [u8; 5] {
        match self {
            AddrGroup::V4([a, b]) => [4, a, b, 0, 0],
            AddrGroup::V6([a, b, c, d]) => [6, a, b, c, d],
        }
    }
}

impl fmt::Display for AddrGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrGroup::V4([a, b]) => write!(f, "{a}.{b}.0.0/16"),
            AddrGroup::V6([a, b, c, d]) => {
                write!(
                    f,
                    "{:x}:{:x}::/32",
                    u16::from_be_bytes([*a, *b]),
                    u16::from_be_bytes([*c, *d])
                )
            }
        }
    }
}

/// Why an address is not acceptable as a dialable address.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("address {0} has no /ip4 or /ip6 component")]
    NoIp(String),
    #[error("address {0} is not /tcp/<port> or /udp/<port>/quic-v1")]
    UnsupportedTransport(String),
    #[error("address {0} is not publicly routable")]
    Unroutable(String),
    #[error("address {0} names peer {1}, not the peer it was given for")]
    WrongPeer(String, String),
}

/// The IP of an address (its first component), if it has one.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// The peer id an address ends with (`/p2p/<id>`), if any.
pub fn peer_of(addr: &Multiaddr) -> Option<libp2p_identity::PeerId> {
    match addr.iter().last()? {
        Protocol::P2p(id) => Some(id),
        _ => None,
    }
}

/// The address without a trailing `/p2p/<id>`.
pub fn without_peer(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// True for addresses that can be reached across the public Internet. Loopback, private
/// (RFC 1918, RFC 4193), link-local, shared (RFC 6598), documentation, multicast, unspecified
/// and reserved ranges are not.
pub fn is_routable(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => is_routable_v4(v4),
        IpAddr::V6(v6) => is_routable_v6(v6),
    }
}

fn is_routable_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24, IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15, benchmarking
        || o[0] >= 240) // 240.0.0.0/4, reserved
}

/// Only global unicast (2000::/3, RFC 4291) outside the special-purpose blocks (RFC 6890)
/// is routable; an address that embeds an IPv4 address (NAT64 64:ff9b::/96, RFC 6052; 6to4
/// 2002::/16, RFC 3056) is routable only if that IPv4 address is. Everything else, the
/// IPv4-compatible ::/96, site-local fec0::/10 and discard 100::/64 among it, is not.
fn is_routable_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let o = ip.octets();
    // 64:ff9b::/96: the last 32 bits are the IPv4 address.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_routable_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    // 2002:V4ADDR::/48.
    if s[0] == 0x2002 {
        return is_routable_v4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    (s[0] & 0xe000) == 0x2000 // 2000::/3, global unicast
        && !(s[0] == 0x2001 && s[1] < 0x0200) // 2001::/23, IETF protocol assignments (Teredo 2001::/32 among them)
        && !(s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32, documentation
        && !(s[0] == 0x3fff && s[1] < 0x1000) // 3fff::/20, documentation (RFC 9637)
}

/// Checks that `addr` is a dialable address: an IP, then TCP or QUIC, optionally `/p2p/<peer>`
/// where `<peer>` must be `expected_peer` if given. Unroutable IPs are refused unless
/// `allow_private`. Returns the address without its `/p2p` suffix.
pub fn check_dialable(
    addr: &Multiaddr,
    expected_peer: Option<&libp2p_identity::PeerId>,
    allow_private: bool,
) -> Result<Multiaddr, AddrError> {
    let mut it = addr.iter();
    let ip = match it.next() {
        Some(Protocol::Ip4(ip)) => IpAddr::V4(ip),
        Some(Protocol::Ip6(ip)) => IpAddr::V6(ip),
        _ => return Err(AddrError::NoIp(addr.to_string())),
    };
    let transport_ok = match (it.next(), it.next()) {
        (Some(Protocol::Tcp(_)), None) => true,
        (Some(Protocol::Tcp(_)), Some(Protocol::P2p(_))) => it.next().is_none(),
        (Some(Protocol::Udp(_)), Some(Protocol::QuicV1)) => {
            matches!(it.next(), None | Some(Protocol::P2p(_))) && it.next().is_none()
        }
        _ => false,
    };
    if !transport_ok {
        return Err(AddrError::UnsupportedTransport(addr.to_string()));
    }
    if let (Some(expected), Some(found)) = (expected_peer, peer_of(addr)) {
        if &found != expected {
            return Err(AddrError::WrongPeer(addr.to_string(), found.to_string()));
        }
    }
    if !allow_private && !is_routable(ip) {
        return Err(AddrError::Unroutable(addr.to_string()));
    }
    Ok(without_peer(addr))
}

/// Where a node learned an address: the one fact its dialable-address policy needs besides
/// the address itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum AddrSource {
    /// Given by the operator (configuration, `--bootstrap`, a ticket the user pasted): private
    /// addresses are the operator's call.
    Operator,
    /// Learned from the network (a tracker's answer, in-swarm PEX, the DHT, identify, peer
    /// exchange): private addresses only if the node allows them.
    Network,
}

impl AddrSource {
    /// Whether unroutable IPs from this source pass, given the node's `allow_private`.
    pub fn allows_private(self, allow_private: bool) -> bool {
        allow_private || self == AddrSource::Operator
    }
}

/// The node's one dialable-address policy, for every source of addresses: the shape of
/// [`check_dialable`], and unroutable IPs only from the operator or with `allow_private`.
/// Returns the address without its `/p2p` suffix.
///
/// # Errors
/// See [`check_dialable`].
pub fn check_policy(
    addr: &Multiaddr,
    expected_peer: Option<&libp2p_identity::PeerId>,
    source: AddrSource,
    allow_private: bool,
) -> Result<Multiaddr, AddrError> {
    check_dialable(addr, expected_peer, source.allows_private(allow_private))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ma(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn groups_are_slash16_and_slash32() {
        assert_eq!(
            AddrGroup::of_addr(&ma("/ip4/1.2.3.4/tcp/1")),
            Some(AddrGroup::V4([1, 2]))
        );
        assert_eq!(
            AddrGroup::of_addr(&ma("/ip4/1.2.3.4/tcp/1")),
            AddrGroup::of_addr(&ma("/ip4/1.2.200.9/udp/5/quic-v1"))
        );
        assert_ne!(
            AddrGroup::of_addr(&ma("/ip4/1.2.3.4/tcp/1")),
            AddrGroup::of_addr(&ma("/ip4/1.3.3.4/tcp/1"))
        );
        assert_eq!(
            AddrGroup::of_addr(&ma("/ip6/2001:470:1:2::1/tcp/1")),
            Some(AddrGroup::V6([0x20, 0x01, 0x04, 0x70]))
        );
        // IPv4-mapped IPv6 is the IPv4 address.
        assert_eq!(
            AddrGroup::of_addr(&ma("/ip6/::ffff:1.2.3.4/tcp/1")),
            Some(AddrGroup::V4([1, 2]))
        );
        assert_eq!(AddrGroup::of_addr(&ma("/dns4/example.com/tcp/1")), None);
        assert_eq!(AddrGroup::V4([1, 2]).to_string(), "1.2.0.0/16");
    }

    /// The byte form is hashed into the address book's bucket positions, which are persisted:
    /// it must stay exactly this, and never let a v4 group collide with a v6 one.
    #[test]
    fn group_bytes_are_stable_and_tagged_by_family() {
        assert_eq!(AddrGroup::V4([1, 2]).to_bytes(), [4, 1, 2, 0, 0]);
        assert_eq!(
            AddrGroup::V6([0x20, 0x01, 0x04, 0x70]).to_bytes(),
            [6, 0x20, 0x01, 0x04, 0x70]
        );
        assert_ne!(
            AddrGroup::V4([0, 0]).to_bytes(),
            AddrGroup::V6([0, 0, 0, 0]).to_bytes()
        );
    }

    #[test]
    fn routability() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "0.0.0.0",
            "169.254.1.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "2001:db8::1",
            // IPv6 forms that embed a private IPv4 address, and special-purpose blocks.
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "::127.0.0.1",
            "::8.8.8.8",
            "fec0::1",
            "100::1",
            "2001::1",
            "3fff::1",
            "4000::1",
            // Each special-purpose IPv4 block, at both of its ends.
            "0.1.2.3",
            "0.255.255.255",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.255",
            "100.127.255.255",
            "192.0.0.0",
            "192.0.0.255",
            "198.18.0.0",
            "198.19.255.255",
            "2001:1ff:ffff::1",
        ] {
            assert!(
                !is_routable(bad.parse().unwrap()),
                "{bad} should be unroutable"
            );
        }
        for good in [
            "1.2.3.4",
            "8.8.8.8",
            "172.32.0.1",
            "2001:470::1",
            "2a00:1450::1",
            "64:ff9b::808:808",
            "2002:808:808::1",
            // The first and last routable addresses around each special-purpose block.
            "1.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "192.0.1.0",
            "191.255.255.255",
            "192.1.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "2001:200::1",
            "2001:db9::1",
            "3fff:1000::1",
        ] {
            assert!(
                is_routable(good.parse().unwrap()),
                "{good} should be routable"
            );
        }
    }

    #[test]
    fn dialable_addresses() {
        let peer = libp2p_identity::PeerId::random();
        let other = libp2p_identity::PeerId::random();
        assert_eq!(
            check_dialable(&ma("/ip4/1.2.3.4/tcp/1"), None, false),
            Ok(ma("/ip4/1.2.3.4/tcp/1"))
        );
        assert_eq!(
            check_dialable(
                &ma(&format!("/ip4/1.2.3.4/udp/9/quic-v1/p2p/{peer}")),
                Some(&peer),
                false
            ),
            Ok(ma("/ip4/1.2.3.4/udp/9/quic-v1"))
        );
        assert!(matches!(
            check_dialable(
                &ma(&format!("/ip4/1.2.3.4/tcp/1/p2p/{other}")),
                Some(&peer),
                false
            ),
            Err(AddrError::WrongPeer(..))
        ));
        assert!(matches!(
            check_dialable(&ma("/ip4/127.0.0.1/tcp/1"), None, false),
            Err(AddrError::Unroutable(_))
        ));
        assert!(check_dialable(&ma("/ip4/127.0.0.1/tcp/1"), None, true).is_ok());
        assert!(matches!(
            check_dialable(&ma("/ip4/1.2.3.4/udp/1"), None, true),
            Err(AddrError::UnsupportedTransport(_))
        ));
        assert!(matches!(
            check_dialable(&ma("/ip4/1.2.3.4/tcp/1/ws"), None, true),
            Err(AddrError::UnsupportedTransport(_))
        ));
        assert!(matches!(
            check_dialable(&ma("/dns4/a.b/tcp/1"), None, true),
            Err(AddrError::NoIp(_))
        ));
        // Nothing may follow QUIC but the peer id, and nothing may follow the peer id.
        for trailing in [
            "/ip4/1.2.3.4/udp/1/quic-v1/tcp/5".to_string(),
            format!("/ip4/1.2.3.4/udp/1/quic-v1/p2p/{peer}/tcp/5"),
            format!("/ip4/1.2.3.4/tcp/1/p2p/{peer}/tcp/5"),
        ] {
            assert!(
                matches!(
                    check_dialable(&ma(&trailing), None, true),
                    Err(AddrError::UnsupportedTransport(_))
                ),
                "{trailing}"
            );
        }
    }

    #[test]
    fn the_policy_lets_only_the_operator_name_private_hosts() {
        let private = ma("/ip4/127.0.0.99/tcp/9999");
        assert!(check_policy(&private, None, AddrSource::Operator, false).is_ok());
        assert!(matches!(
            check_policy(&private, None, AddrSource::Network, false),
            Err(AddrError::Unroutable(_))
        ));
        assert!(check_policy(&private, None, AddrSource::Network, true).is_ok());
        // The shape holds for the operator too.
        assert!(check_policy(&ma("/ip4/1.2.3.4/udp/1"), None, AddrSource::Operator, true).is_err());
    }
}
