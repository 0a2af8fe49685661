//! Network names and the protocol names derived from them.
//!
//! Every protocol a Meshwork node speaks carries the network name
//! (`/meshwork/<network>/<protocol>/<version>`), so that nodes of two networks that happen to
//! connect fail protocol negotiation instead of mixing their tables, chains or content.
//! libp2p's own identify and ping protocols have fixed names; for those the network name travels
//! in identify's `protocol_version` field ([`NetworkName::identify_version`]) and the node
//! disconnects a peer whose identify names another network.

use std::fmt;
use std::str::FromStr;

/// The longest network name accepted. Protocol names must stay short (multistream-select
/// limits them, and they are sent on every stream).
pub const MAX_NETWORK_NAME_LEN: usize = 32;

/// A validated network name: 1 to 32 characters of `a-z`, `0-9` and `-`, not starting or ending
/// with `-`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkNameError {
    #[error("network name is empty")]
    Empty,
    #[error("network name is {0} characters long; at most {MAX_NETWORK_NAME_LEN} are allowed")]
    TooLong(usize),
    #[error(
        "network name {0:?} may only contain a-z, 0-9 and '-', and may not start or end with '-'"
    )]
    BadCharacter(String),
}

impl NetworkName {
    pub fn new(name: &str) -> Result<Self, NetworkNameError> {
        if name.is_empty() {
            return Err(NetworkNameError::Empty);
        }
        if name.len() > MAX_NETWORK_NAME_LEN {
            return Err(NetworkNameError::TooLong(name.len()));
        }
        let ok_chars = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok_chars || name.starts_with('-') || name.ends_with('-') {
            return Err(NetworkNameError::BadCharacter(name.to_owned()));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name of one of Meshwork's protocols on this network, e.g. `/meshwork/dev/pex/1`.
    pub fn protocol(&self, protocol: &str, version: u32) -> String {
        format!("/meshwork/{}/{}/{}", self.0, protocol, version)
    }

    /// The string a node puts in identify's `protocol_version` field.
    pub fn identify_version(&self) -> String {
        format!("/meshwork/{}/1", self.0)
    }
}

impl fmt::Display for NetworkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NetworkName {
    type Err = NetworkNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(NetworkName::new("dev").is_ok());
        assert!(NetworkName::new("lab-42").is_ok());
        assert_eq!(NetworkName::new(""), Err(NetworkNameError::Empty));
        assert!(matches!(
            NetworkName::new("Dev"),
            Err(NetworkNameError::BadCharacter(_))
        ));
        assert!(matches!(
            NetworkName::new("a/b"),
            Err(NetworkNameError::BadCharacter(_))
        ));
        assert!(matches!(
            NetworkName::new("-a"),
            Err(NetworkNameError::BadCharacter(_))
        ));
        assert!(matches!(
            NetworkName::new(&"a".repeat(33)),
            Err(NetworkNameError::TooLong(33))
        ));
    }

    #[test]
    fn protocol_names_carry_the_network() {
        let a = NetworkName::new("alpha").unwrap();
        let b = NetworkName::new("beta").unwrap();
        assert_eq!(a.protocol("pex", 1), "/meshwork/alpha/pex/1");
        assert_ne!(a.protocol("kad", 1), b.protocol("kad", 1));
        assert_ne!(a.identify_version(), b.identify_version());
    }

    #[test]
    fn a_name_reads_back_as_given() {
        let n: NetworkName = "lab-42".parse().unwrap();
        assert_eq!(n.as_str(), "lab-42");
        assert_eq!(n.to_string(), "lab-42");
    }
}
