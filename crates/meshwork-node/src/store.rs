//! The node's persistent state in redb (`<data-dir>/node.redb`): the address book (with its
//! secret bucket key and bans) and the anchors (the outbound peers at the last shutdown).
//!
//! The book is small (at most ~80k entries, typically hundreds), so it is written whole, as one
//! postcard value, in one redb transaction: a crash leaves either the previous or the new book,
//! never a mix. A value that does not decode (written by a future version, or damaged) is
//! kept aside under `<key>.unreadable` and the node starts with an empty book rather than
//! refusing to start: the book is a cache of the network, which the node can learn again.
//!
//! For the same reason a damaged *file* (one that redb cannot open, or whose table does not
//! read: truncated, overwritten) does not stop the node: [`Store::open_or_rebuild`] renames
//! it to `node.redb.damaged-<unix time>` (kept for inspection, never deleted), logs a warning
//! and starts a new, empty store. Errors that are not damage (permissions, a full disk, the
//! file locked by another node) are returned: moving the file would not help.
//!
//! A failed write (a full disk) closes the database and the next use opens it again: redb
//! refuses every transaction after an I/O error until then. The failure is logged once, and
//! so is the first write that works again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use libp2p::{Multiaddr, PeerId};
use redb::{Database, ReadableTable, TableDefinition};
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
    path: PathBuf,
    /// `None` after a failed transaction: redb refuses everything after an I/O error until
    /// the database is closed and opened again, so the next use reopens it.
    db: Mutex<Option<Database>>,
    /// Whether the last write failed (so that a failing disk is logged once, not per flush).
    failing: AtomicBool,
}

/// Why a store did not open.
enum Opened {
    /// The file's bytes are wrong: setting it aside helps.
    Damaged(String),
    /// Anything else (permissions, a lock, the disk): setting it aside would not.
    Failed(String),
}

/// Opens the database and reads its one table whole (it is small), so that damage shows at
/// open rather than at the first write. redb panics on some damaged files; that is caught
/// here and reported as damage.
fn open_checked(path: &Path) -> Result<Database, Opened> {
    use redb::{DatabaseError, StorageError as S};
    let damage_io = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        )
    };
    let opened = meshwork_ledger::faults::catch_quietly(|| Database::create(path));
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(DatabaseError::Storage(S::Corrupted(m)))) => return Err(Opened::Damaged(m)),
        Ok(Err(DatabaseError::Storage(S::Io(e)))) if damage_io(&e) => {
            return Err(Opened::Damaged(e.to_string()))
        }
        Ok(Err(e)) => return Err(Opened::Failed(e.to_string())),
        Err(_) => return Err(Opened::Damaged("the database engine cannot read it".into())),
    };
    let probe = meshwork_ledger::faults::catch_quietly(|| -> Result<(), String> {
        let tx = db.begin_read().map_err(|e| e.to_string())?;
        let t = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        for item in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let _ = (k.value().len(), v.value().len());
        }
        Ok(())
    });
    match probe {
        Ok(Ok(())) => Ok(db),
        Ok(Err(e)) => Err(Opened::Damaged(e)),
        Err(_) => Err(Opened::Damaged("the database engine cannot read it".into())),
    }
}

/// `<path>.damaged-<unix time>`, with a counter if that exists already.
fn damaged_name(path: &Path) -> PathBuf {
    let base = format!("{}.damaged-{}", path.display(), crate::unix_now());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    candidate
}

pub type Anchors = Vec<(PeerId, Vec<Multiaddr>)>;

impl Store {
    /// Opens (or creates) the store at `path`. A damaged file is an error here; see
    /// [`Store::open_or_rebuild`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        match open_checked(path) {
            Ok(db) => Ok(Self::with(path, db)),
            Err(Opened::Damaged(reason)) => Err(open_err(format!("damaged: {reason}"))),
            Err(Opened::Failed(reason)) => Err(open_err(reason)),
        }
    }

    /// Opens the store at `path`, setting a damaged file aside (see the module docs) and
    /// starting a new one in its place. Returns an error only for what is not damage.
    pub fn open_or_rebuild(path: &Path) -> Result<Self, StoreError> {
        match open_checked(path) {
            Ok(db) => return Ok(Self::with(path, db)),
            Err(Opened::Failed(reason)) => {
                return Err(StoreError::Open {
                    path: path.display().to_string(),
                    reason,
                })
            }
            Err(Opened::Damaged(reason)) => {
                let aside = damaged_name(path);
                std::fs::rename(path, &aside).map_err(|e| StoreError::Open {
                    path: path.display().to_string(),
                    reason: format!("damaged ({reason}), and cannot be moved aside: {e}"),
                })?;
                tracing::warn!(
                    "{}: the node store is damaged ({reason}); kept as {} and starting a new \
                     one: the address book is rebuilt from the network",
                    path.display(),
                    aside.display()
                );
            }
        }
        Self::open(path)
    }

    fn with(path: &Path, db: Database) -> Self {
        Self {
            path: path.to_owned(),
            db: Mutex::new(Some(db)),
            failing: AtomicBool::new(false),
        }
    }

    /// Runs `f` on the database, reopening it first if the last use failed; a failure closes
    /// it (see the field docs).
    fn use_db<R>(
        &self,
        f: impl FnOnce(&Database) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut slot = self.db.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Database::create(&self.path).map_err(db_err)?);
        }
        let r = f(slot.as_ref().expect("opened just above"));
        if r.is_err() {
            *slot = None;
        }
        r
    }

    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(value).map_err(db_err)?;
        let r = self.use_db(|db| {
            let tx = db.begin_write().map_err(db_err)?;
            {
                let mut t = tx.open_table(META).map_err(db_err)?;
                t.insert(key, bytes.as_slice()).map_err(db_err)?;
            }
            tx.commit().map_err(db_err)
        });
        match &r {
            Err(e) if !self.failing.swap(true, Ordering::SeqCst) => tracing::error!(
                "{}: cannot write the node store: {e}; the address book stays in memory and \
                 is written again at the next flush",
                self.path.display()
            ),
            Ok(()) if self.failing.swap(false, Ordering::SeqCst) => {
                tracing::info!("{}: the node store is written again", self.path.display())
            }
            _ => {}
        }
        r
    }

    /// Reads a value; an undecodable one is moved aside (see the module docs) and `None` returned.
    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let bytes = self.use_db(|db| {
            let tx = db.begin_read().map_err(db_err)?;
            let t = match tx.open_table(META) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(db_err(e)),
            };
            Ok(t.get(key).map_err(db_err)?.map(|v| v.value().to_vec()))
        })?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        match postcard::from_bytes(&bytes) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                tracing::warn!("node store: {key} does not decode ({e}); keeping it as {key}.unreadable and starting without it");
                self.use_db(|db| {
                    let tx = db.begin_write().map_err(db_err)?;
                    {
                        let mut t = tx.open_table(META).map_err(db_err)?;
                        t.insert(format!("{key}.unreadable").as_str(), bytes.as_slice())
                            .map_err(db_err)?;
                        t.remove(key).map_err(db_err)?;
                    }
                    tx.commit().map_err(db_err)
                })?;
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

    /// The saved address book; `None` (with a warning) when there is none or it cannot be
    /// read: the node then starts with an empty book, which it refills from the network.
    pub fn load_addrbook_or_none(&self) -> Option<Snapshot> {
        self.load_addrbook().unwrap_or_else(|e| {
            tracing::warn!("{e}; starting with an empty address book");
            None
        })
    }

    pub fn save_anchors(&self, anchors: &Anchors) -> Result<(), StoreError> {
        self.put(ANCHORS, anchors)
    }

    pub fn load_anchors(&self) -> Result<Anchors, StoreError> {
        Ok(self.get(ANCHORS)?.unwrap_or_default())
    }

    #[cfg(test)]
    fn get_raw(&self, key: &str) -> Option<Vec<u8>> {
        self.use_db(|db| {
            let tx = db.begin_read().unwrap();
            let t = tx.open_table(META).unwrap();
            Ok(t.get(key).unwrap().map(|v| v.value().to_vec()))
        })
        .unwrap()
    }

    #[cfg(test)]
    fn put_raw(&self, key: &str, bytes: &[u8]) {
        self.use_db(|db| {
            let tx = db.begin_write().unwrap();
            tx.open_table(META).unwrap().insert(key, bytes).unwrap();
            tx.commit().unwrap();
            Ok(())
        })
        .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addrbook::{AddrBook, AddrBookConfig, Origin, Via};

    /// redb refuses every transaction after an I/O error until it is reopened: a failed use
    /// closes the database, and the next one opens it again (and works).
    #[test]
    fn a_failed_transaction_closes_the_store_and_the_next_use_reopens_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("node.redb")).unwrap();
        let r: Result<(), _> = store.use_db(|_| Err(StoreError::Db("injected".into())));
        assert!(r.is_err());
        assert!(
            store.db.lock().unwrap().is_none(),
            "closed after the failure"
        );
        store.save_anchors(&vec![]).unwrap();
        assert!(
            store.db.lock().unwrap().is_some(),
            "reopened by the next use"
        );
        assert!(store.load_anchors().unwrap().is_empty());
    }

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
        let damaged = [0xff, 0x01, 0xfe, 0x02, 0xfd, 0x03, 0xfc];
        store.put_raw(ADDRBOOK, &damaged);
        assert!(store.load_addrbook().unwrap().is_none());
        // Moved aside: the damaged bytes, unchanged, under `<key>.unreadable`, and gone from
        // the key itself.
        assert_eq!(
            store.get_raw(&format!("{ADDRBOOK}.unreadable")).as_deref(),
            Some(&damaged[..])
        );
        assert_eq!(store.get_raw(ADDRBOOK), None);
        assert!(
            store.load_addrbook().unwrap().is_none(),
            "moved aside, not read again"
        );
        // The other values are untouched.
        assert_eq!(store.load_anchors().unwrap().len(), 1);
        // They survive a reopen.
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.get_raw(&format!("{ADDRBOOK}.unreadable")).as_deref(),
            Some(&damaged[..])
        );
    }
}
