//! Tickets: one string that tells another machine how to fetch a content.
//!
//! `mw1` (the format's version) followed by the lower-case, unpadded base32 of the postcard
//! encoding of [`Ticket`]: the content id, up to [`MAX_PROVIDERS`] providers (a peer id and
//! its addresses, as text) and the tracker URL, if any. Base32 keeps the ticket safe to paste
//! into a shell or a URL. A ticket is at most [`MAX_TICKET_LEN`] characters; anything longer,
//! with another version, or whose fields break the bounds is refused with the reason.

use serde::{Deserialize, Serialize};

use crate::manifest::ContentId;

pub const PREFIX: &str = "mw1";
pub const MAX_PROVIDERS: usize = 8;
pub const MAX_ADDRS: usize = 4;
pub const MAX_FIELD: usize = 256;
pub const MAX_TICKET_LEN: usize = 8192;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provider {
    pub peer: String,
    pub addrs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub content: ContentId,
    pub providers: Vec<Provider>,
    pub tracker: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("not a ticket: it must start with {PREFIX:?} (a newer format needs a newer meshwork)")]
    Version,
    #[error("the ticket is longer than {MAX_TICKET_LEN} characters")]
    TooLong,
    #[error("the ticket is damaged (not base32): {0}")]
    Encoding(String),
    #[error("the ticket is damaged: {0}")]
    Malformed(String),
    #[error("the ticket is out of bounds: {0}")]
    Bounds(String),
}

fn base32() -> data_encoding::Encoding {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.encoding().expect("a valid base32 alphabet")
}

impl Ticket {
    fn check(&self) -> Result<(), TicketError> {
        let b = |s: String| Err(TicketError::Bounds(s));
        if self.providers.len() > MAX_PROVIDERS {
            return b(format!("{} providers", self.providers.len()));
        }
        for p in &self.providers {
            if p.peer.len() > MAX_FIELD || p.addrs.len() > MAX_ADDRS {
                return b("a provider with too many or too long fields".into());
            }
            if p.addrs.iter().any(|a| a.len() > MAX_FIELD) {
                return b("an address longer than 256 characters".into());
            }
        }
        if self.tracker.as_ref().is_some_and(|t| t.len() > MAX_FIELD) {
            return b("a tracker URL longer than 256 characters".into());
        }
        Ok(())
    }

    /// The ticket as text, with providers and addresses cut to the bounds.
    pub fn encode(&self) -> String {
        let mut t = self.clone();
        t.providers.truncate(MAX_PROVIDERS);
        for p in &mut t.providers {
            p.addrs.retain(|a| a.len() <= MAX_FIELD);
            p.addrs.truncate(MAX_ADDRS);
        }
        t.providers.retain(|p| p.peer.len() <= MAX_FIELD);
        t.tracker = t.tracker.filter(|u| u.len() <= MAX_FIELD);
        let bytes = postcard::to_allocvec(&t).expect("a ticket always encodes");
        format!("{PREFIX}{}", base32().encode(&bytes))
    }

    pub fn decode(s: &str) -> Result<Ticket, TicketError> {
        let s = s.trim();
        if s.len() > MAX_TICKET_LEN {
            return Err(TicketError::TooLong);
        }
        let body = s.strip_prefix(PREFIX).ok_or(TicketError::Version)?;
        let bytes = base32()
            .decode(body.as_bytes())
            .map_err(|e| TicketError::Encoding(e.to_string()))?;
        let (t, rest): (Ticket, _) =
            postcard::take_from_bytes(&bytes).map_err(|e| TicketError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(TicketError::Malformed(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        t.check()?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Digest;
    use proptest::prelude::*;

    fn sample() -> Ticket {
        Ticket {
            content: Digest::of(b"content"),
            providers: vec![Provider {
                peer: "12D3KooWExample".into(),
                addrs: vec!["/ip4/10.0.0.1/tcp/4001".into()],
            }],
            tracker: Some("http://10.0.0.9:7000".into()),
        }
    }

    #[test]
    fn tickets_round_trip_and_are_shell_safe() {
        let t = sample();
        let s = t.encode();
        assert!(s.starts_with(PREFIX));
        assert!(s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_eq!(Ticket::decode(&s).unwrap(), t);
        assert_eq!(Ticket::decode(&format!("  {s}\n")).unwrap(), t);
    }

    #[test]
    fn bad_tickets_are_refused_with_a_reason() {
        let s = sample().encode();
        assert_eq!(Ticket::decode("mw2abc"), Err(TicketError::Version));
        assert!(matches!(
            Ticket::decode(&format!("{s}!")),
            Err(TicketError::Encoding(_))
        ));
        assert!(matches!(
            Ticket::decode(&s[..s.len() - 8]),
            Err(TicketError::Malformed(_)) | Err(TicketError::Encoding(_))
        ));
        let mut big = sample();
        big.providers = vec![big.providers[0].clone(); 20];
        // Encoding cuts to the bounds; a hand-made oversized ticket is refused.
        assert_eq!(
            Ticket::decode(&big.encode()).unwrap().providers.len(),
            MAX_PROVIDERS
        );
        let raw = postcard::to_allocvec(&big).unwrap();
        let forged = format!("{PREFIX}{}", base32().encode(&raw));
        assert!(matches!(
            Ticket::decode(&forged),
            Err(TicketError::Bounds(_))
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in "mw1[a-z2-7]{0,200}") {
            let _ = Ticket::decode(&s);
        }
    }
}
