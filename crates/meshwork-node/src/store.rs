//! The node's persistent state in redb (`<data-dir>/node.redb`): the address book (with its
//! secret bucket key and bans) and the anchors (the outbound peers at the last shutdown).
//!
//! The book is small (at most ~80k entries, typically hundreds), so it is written whole, as one
//! postcard value, in one redb transaction: a crash leaves either the previous or the new book,
//! never a mix. A value that does not decode (written by a future version, or damaged) is
//! kept aside under `<key>.unreadable` and the node starts with an empty book rather than
//! refusing to start: the book is a cache of the network, which the node can learn again.

use std::path::Path;

use libp2p::{Multiaddr, PeerId};
use redb::{Database, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

use crate::addrbook::Snapshot;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const ADDRBOOK: &str = "addrbook.v1";
const ANCHORS: &str = "anchors.v1";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: cannot open the node store: {reason}")]
    Open { path: String, reason: String },
    #[error("node store: {0}")]
    Db(String),
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

pub struct Store {
    db: Database,
}

pub type Anchors = Vec<(PeerId, Vec<Multiaddr>)>;

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self { db })
    }

    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(value).map_err(db_err)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(META).map_err(db_err)?;
            t.insert(key, bytes.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Reads a value; an undecodable one is moved aside (see the module docs) and `None` returned.
    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let bytes = {
            let tx = self.db.begin_read().map_err(db_err)?;
            let t = match tx.open_table(META) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(db_err(e)),
            };
            match t.get(key).map_err(db_err)? {
                Some(v) => v.value().to_vec(),
                None => return Ok(None),
            }
        };
        match postcard::from_bytes(&bytes) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                tracing::warn!("node store: {key} does not decode ({e}); keeping it as {key}.unreadable and starting without it");
                let tx = self.db.begin_write().map_err(db_err)?;
                {
                    let mut t = tx.open_table(META).map_err(db_err)?;
                    t.insert(format!("{key}.unreadable").as_str(), bytes.as_slice())
                        .map_err(db_err)?;
                    t.remove(key).map_err(db_err)?;
                }
                tx.commit().map_err(db_err)?;
                Ok(None)
            }
        }
    }

    pub fn save_addrbook(&self, snap: &Snapshot) -> Result<(), StoreError> {
        self.put(ADDRBOOK, snap)
    }

    pub fn load_addrbook(&self) -> Result<Option<Snapshot>, StoreError> {
        self.get(ADDRBOOK)
    }

    pub fn save_anchors(&self, anchors: &Anchors) -> Result<(), StoreError> {
        self.put(ANCHORS, anchors)
    }

    pub fn load_anchors(&self) -> Result<Anchors, StoreError> {
        Ok(self.get(ANCHORS)?.unwrap_or_default())
    }

    #[cfg(test)]
    fn put_raw(&self, key: &str, bytes: &[u8]) {
        let tx = self.db.begin_write().unwrap();
        tx.open_table(META).unwrap().insert(key, bytes).unwrap();
        tx.commit().unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addrbook::{AddrBook, AddrBookConfig, Origin, Via};

    #[test]
    fn round_trip_and_damaged_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let me = PeerId::random();
        let mut book = AddrBook::new(AddrBookConfig::default(), [5; 32], me, false);
        let p = PeerId::random();
        book.add(
            p,
            &["/ip4/1.2.3.4/tcp/1".parse().unwrap()],
            100,
            Origin::Operator,
            Via::Bootstrap,
            100,
        );
        {
            let store = Store::open(&path).unwrap();
            assert!(store.load_addrbook().unwrap().is_none());
            store.save_addrbook(&book.snapshot()).unwrap();
            store
                .save_anchors(&vec![(p, vec!["/ip4/1.2.3.4/tcp/1".parse().unwrap()])])
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let snap = store.load_addrbook().unwrap().unwrap();
        let back = AddrBook::restore(AddrBookConfig::default(), snap, me, false, 100);
        assert_eq!(back.get(&p), book.get(&p));
        assert_eq!(store.load_anchors().unwrap().len(), 1);
        store.put_raw(ADDRBOOK, &[0xff; 7]);
        assert!(store.load_addrbook().unwrap().is_none());
        assert!(
            store.load_addrbook().unwrap().is_none(),
            "moved aside, not read again"
        );
    }
}
