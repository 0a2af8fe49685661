//! The content service's bookkeeping in the data directory (`<data dir>/content/`): which
//! content owns which path, and everything needed to take each content up again after a
//! restart.
//!
//! Per content id `ID`:
//! - `ID.fetch`: a fetch acknowledged but without a manifest yet ([`Pending`]).
//! - `ID.manifest`: the manifest (checked against the id when read back).
//! - `ID.json`: the [`Record`]: the path the content lives at, whether it is the user's own
//!   shared file (`origin`) or a download of ours, its providers and tracker.
//! - `ID.parts`: a download's journal ([`meshwork_swarm::store`]): the pieces written, and
//!   the identity of the file it created, which is what proves the file is the download's.
//!
//! # Invariants
//! 1. A path belongs to at most one content: the record's `path` is that content's claim,
//!    and the service refuses a second claim on it.
//! 2. Every file here is written aside, `fsync`ed and renamed into place, and the directory
//!    is `fsync`ed, before the API acknowledges what it records: what was acknowledged
//!    survives a crash.
//! 3. Nothing read back is trusted beyond what it proves: a manifest must hash to its id, a
//!    journal must name its content and its file, and an unreadable file is reported and
//!    skipped, never a reason to delete the user's data.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use meshwork_swarm::manifest::Manifest;
use meshwork_swarm::store::FileStat;
use meshwork_swarm::ticket::Provider;
use meshwork_swarm::ContentId;
use serde::{Deserialize, Serialize};

use super::FetchRequest;

const RECORD_SUFFIX: &str = ".json";
const MANIFEST_SUFFIX: &str = ".manifest";
const FETCH_SUFFIX: &str = ".fetch";
const JOURNAL_SUFFIX: &str = ".parts";

/// What the node keeps per content with a manifest (`ID.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Record {
    /// The file the content lives at (absolute).
    pub path: PathBuf,
    /// Shared from the user's own file: seeding re-checks the file, nothing ever writes it,
    /// and removal never deletes it.
    pub origin: bool,
    pub super_seed: bool,
    pub tracker: Option<String>,
    /// For an origin, the file as it was hashed: while it still matches, a restart seeds
    /// without hashing it again; when it does not, the file is hashed and refused if changed.
    #[serde(default)]
    pub stat: Option<FileStat>,
    /// The providers the ticket named, so that a fetch resumed after a restart still knows
    /// whom to ask when neither a tracker nor the DHT names anyone.
    #[serde(default)]
    pub providers: Vec<Provider>,
}

/// A fetch acknowledged before its manifest arrived (`ID.fetch`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Pending {
    #[serde(flatten)]
    pub request: FetchRequest,
    /// When it was first asked for (Unix seconds): the manifest deadline runs from here,
    /// across restarts. 0 (absent, in a record written before deadlines): unknown, taken as
    /// the moment it is read back.
    #[serde(default)]
    pub since: u64,
}

/// A content read back at start.
pub(super) struct Loaded {
    pub id: ContentId,
    pub record: Record,
    pub manifest: Manifest,
}

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The content directory of a data directory.
#[derive(Clone, Debug)]
pub(super) struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(dir: PathBuf) -> Records {
        Records { dir }
    }

    fn file(&self, id: &ContentId, suffix: &str) -> PathBuf {
        self.dir.join(format!("{id}{suffix}"))
    }

    /// Where a download's journal lives: named by the content id, so that any file name the
    /// file system accepts can be downloaded (no suffix is added to the user's name).
    pub fn journal(&self, id: &ContentId) -> PathBuf {
        self.file(id, JOURNAL_SUFFIX)
    }

    /// The recorded manifest of `id`, if it is there and hashes to `id`.
    pub fn manifest(&self, id: &ContentId) -> Option<Manifest> {
        std::fs::read(self.file(id, MANIFEST_SUFFIX))
            .ok()
            .and_then(|b| Manifest::decode_verified(&b, id).ok())
    }

    /// Records a pending fetch durably (invariant 2).
    pub fn put_pending(&self, id: &ContentId, p: &Pending) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(p).map_err(io::Error::other)?;
        self.make_dir()?;
        write_atomic(&self.file(id, FETCH_SUFFIX), &json)
    }

    fn make_dir(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.dir.display())))
    }

    pub fn remove_pending(&self, id: &ContentId) -> io::Result<()> {
        remove_if_present(&self.file(id, FETCH_SUFFIX))
    }

    /// Records a content with its manifest durably and retires its pending fetch.
    pub fn put(&self, id: &ContentId, rec: &Record, manifest: &Manifest) -> io::Result<()> {
        self.make_dir()?;
        let m = self.file(id, MANIFEST_SUFFIX);
        if !m.exists() {
            write_atomic(&m, &manifest.encode())?;
        }
        let json = serde_json::to_vec_pretty(rec).map_err(io::Error::other)?;
        write_atomic(&self.file(id, RECORD_SUFFIX), &json)?;
        self.remove_pending(id)
    }

    /// Forgets a content: its record first (what would bring it back at a start), then its
    /// manifest, pending fetch and journal. The first failure is returned; the rest is still
    /// tried.
    pub fn remove(&self, id: &ContentId) -> io::Result<()> {
        let mut first = Ok(());
        for s in [RECORD_SUFFIX, FETCH_SUFFIX, MANIFEST_SUFFIX, JOURNAL_SUFFIX] {
            let r = remove_if_present(&self.file(id, s)).map_err(|e| {
                io::Error::new(e.kind(), format!("{}: {e}", self.file(id, s).display()))
            });
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Whether the directory can be read back (absent is fine: nothing recorded yet).
    pub fn readable(&self) -> io::Result<()> {
        match std::fs::read_dir(&self.dir) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!(
                    "{}: cannot read the content records: {e}",
                    self.dir.display()
                ),
            )),
        }
    }

    /// Reads back every content and pending fetch. Unreadable entries are logged and skipped
    /// (left in place for the operator: invariant 3). Bounded by `max` of each.
    ///
    /// # Errors
    /// The directory exists but cannot be read (not a directory, no permission): the node
    /// would otherwise start as if it held nothing, and forget every content it records.
    pub fn load(&self, max: usize) -> io::Result<(Vec<Loaded>, Vec<Pending>)> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((vec![], vec![])),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{}: cannot read the content records: {e}",
                        self.dir.display()
                    ),
                ))
            }
        };
        let mut loaded = vec![];
        let mut pending = vec![];
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(hex) = name.strip_suffix(FETCH_SUFFIX) {
                let Ok(id) = hex.parse::<ContentId>() else {
                    continue;
                };
                if self.file(&id, RECORD_SUFFIX).exists() {
                    // The record superseded it (a crash before it was removed).
                    let _ = self.remove_pending(&id);
                    continue;
                }
                match read_json::<Pending>(&e.path()) {
                    Some(p) if pending.len() < max => pending.push(p),
                    Some(_) => tracing::warn!("{}: over the limit, skipped", e.path().display()),
                    None => {
                        tracing::warn!("{}: unreadable pending fetch, skipped", e.path().display())
                    }
                }
                continue;
            }
            let Some(hex) = name.strip_suffix(RECORD_SUFFIX) else {
                continue;
            };
            let Ok(id) = hex.parse::<ContentId>() else {
                continue;
            };
            let record = read_json::<Record>(&e.path());
            let manifest = self.manifest(&id);
            match (record, manifest) {
                (Some(record), Some(manifest)) if loaded.len() < max => loaded.push(Loaded {
                    id,
                    record,
                    manifest,
                }),
                (Some(_), Some(_)) => {
                    tracing::warn!("{}: over the limit, skipped", e.path().display())
                }
                _ => tracing::warn!("{}: unreadable content record, skipped", e.path().display()),
            }
        }
        Ok((loaded, pending))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one, and the new
/// one survives once this returns: written aside, `fsync`ed, renamed, directory `fsync`ed.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp); // no half-written leftovers
        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    })
}
