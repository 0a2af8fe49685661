//! The client-server content store: files on disk, named by the same content id as in the
//! swarm (the hash of the manifest), with their manifests in redb.
//!
//! An upload streams into a temporary file while its pieces are hashed, so the manifest is
//! ready when the last byte arrives; the file is then fsynced, renamed to its content id and
//! only then recorded. Invariants:
//! - a content id in the `CONTENT` table names a complete, fsynced file `<dir>/<id>` whose
//!   pieces hash to that manifest (the record is written after the rename; when the record
//!   cannot be written, the renamed file is removed again before the upload is refused);
//! - the store only ever deletes its own temporary files, `tmp-` and 16 hex digits (an upload
//!   in progress, or one cut short by a crash): those are swept at open. Anything else in
//!   `<dir>` without a record is left alone, with a warning;
//! - a database that has never held a content table (new, deleted or emptied) next to a
//!   content directory holding anything but temporary files refuses to open
//!   ([`ContentError::Unrecorded`]) and creates nothing, so the refusal holds at every start
//!   until the operator restores the database or moves the directory aside. Re-adopting the
//!   files instead is impossible: a content id hashes the manifest (name, piece size), which
//!   the file alone does not hold;
//! - quota: `used` is the total size of the recorded contents plus the bytes that uploads in
//!   progress have written (each upload reserves its bytes before it writes them, and gives
//!   them back when it is dropped unrecorded or turns out to be a copy of a stored content),
//!   and never exceeds `quota`: a write that would pass it fails the upload
//!   ([`ContentError::OverQuota`]) and the upload's file is removed;
//! - a delete removes the record first (durably), then the file, then frees its bytes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use meshwork_swarm::manifest::{ManifestError, MAX_NAME_BYTES};
use meshwork_swarm::{ContentId, Digest, Manifest};
use redb::{ReadableTable, TableDefinition};

use crate::store::{is_no_space, no_space, Faults, Store, StoreError};

/// content id → encoded manifest.
const CONTENT: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("content");

/// Prefix of the temporary file of an upload in progress (then 16 hex digits).
const TMP_PREFIX: &str = "tmp-";

/// Errors of [`ContentStore`].
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("the upload exceeds the server's limit of {0} bytes")]
    TooLarge(u64),
    /// Storing the upload would pass the server's quota on stored bytes (HTTP 507).
    #[error("the server's storage quota of {quota} bytes is used up ({used} bytes stored or being uploaded); delete contents to make room")]
    OverQuota { quota: u64, used: u64 },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The disk (or quota) is full: the upload is refused and its file removed (HTTP 507).
    #[error("{0}: no room left on the server's disk: {1}")]
    NoSpace(String, std::io::Error),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The database is new but the content directory is not (see the module's invariants).
    #[error(
        "{dir} holds {count} file(s) (for instance {example}) but the database records no \
         content: it is new, or was deleted or emptied. Nothing was deleted. Restore the \
         database from a backup, or move {dir} aside to start with no content"
    )]
    Unrecorded {
        dir: String,
        count: usize,
        example: String,
    },
    /// The store is down after a storage error (HTTP 503): nothing was recorded.
    #[error("{0}")]
    Unavailable(StoreError),
    #[error("store: {0}")]
    Store(String),
}

impl From<StoreError> for ContentError {
    fn from(e: StoreError) -> Self {
        match e {
            e @ StoreError::Unavailable { .. } => ContentError::Unavailable(e),
            e => ContentError::Store(e.to_string()),
        }
    }
}

/// An I/O error on `path`, told apart when it is a full disk.
fn io_err(path: &Path, e: std::io::Error) -> ContentError {
    if is_no_space(&e) {
        ContentError::NoSpace(path.display().to_string(), e)
    } else {
        ContentError::Io(path.display().to_string(), e)
    }
}

/// Whether `name` is one of the store's own temporary files.
fn is_tmp(name: &str) -> bool {
    name.strip_prefix(TMP_PREFIX)
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for ContentError {
            fn from(e: $t) -> Self {
                ContentError::Store(e.to_string())
            }
        }
    )*};
}
store_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The content files in a directory, with their manifests in the [`Store`].
pub struct ContentStore {
    store: Arc<Store>,
    dir: PathBuf,
    max_bytes: u64,
    faults: Option<Arc<Faults>>,
    quota: Arc<Quota>,
}

/// Stored bytes against the quota (see the module's invariants).
struct Quota {
    limit: u64,
    used: AtomicU64,
}

impl Quota {
    /// The total with `n` more bytes on top of `used`, if it stays within the limit.
    fn with(&self, used: u64, n: u64) -> Option<u64> {
        used.checked_add(n).filter(|t| *t <= self.limit)
    }

    fn over(&self, used: u64) -> ContentError {
        ContentError::OverQuota {
            quota: self.limit,
            used,
        }
    }

    /// Whether `n` more bytes would fit now (taking nothing).
    fn room(&self, n: u64) -> Result<(), ContentError> {
        let used = self.used.load(Ordering::Acquire);
        self.with(used, n)
            .map(|_| ())
            .ok_or_else(|| self.over(used))
    }

    /// Takes `n` bytes, or says how full it is.
    fn take(&self, n: u64) -> Result<(), ContentError> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| self.with(u, n))
            .map(|_| ())
            .map_err(|used| self.over(used))
    }

    fn give_back(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }
}

impl ContentStore {
    /// Opens the store in `dir` (created if missing): sweeps the temporary files of
    /// interrupted uploads and nothing else.
    ///
    /// Errors: [`ContentError::Unrecorded`] when the database has no content table yet but
    /// `dir` holds other files (nothing is created or deleted then); I/O and store errors.
    pub fn open(
        store: Arc<Store>,
        dir: &Path,
        max_bytes: u64,
    ) -> Result<ContentStore, ContentError> {
        Self::open_with_quota(store, dir, max_bytes, u64::MAX)
    }

    /// [`ContentStore::open`] with a quota on the total bytes stored (`quota`); contents
    /// already stored count, even when together they pass it (then uploads are refused
    /// until deletes make room).
    pub fn open_with_quota(
        store: Arc<Store>,
        dir: &Path,
        max_bytes: u64,
        quota: u64,
    ) -> Result<ContentStore, ContentError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let db = store.db()?;
        let is_new = match db.begin_read()?.open_table(CONTENT) {
            Ok(_) => false,
            Err(redb::TableError::TableDoesNotExist(_)) => true,
            Err(e) => return Err(e.into()),
        };
        let mut others = vec![];
        let mut tmps = vec![];
        for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let e = e.map_err(|e| io_err(dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if is_tmp(&name) {
                tmps.push(e.path());
            } else {
                others.push(name);
            }
        }
        if is_new && !others.is_empty() {
            others.sort();
            return Err(ContentError::Unrecorded {
                dir: dir.display().to_string(),
                count: others.len(),
                example: others[0].clone(),
            });
        }
        for t in tmps {
            tracing::info!(file = %t.display(), "removing the temporary file of an interrupted upload");
            if let Err(e) = std::fs::remove_file(&t) {
                tracing::warn!(file = %t.display(), "cannot remove: {e}");
            }
        }
        if is_new {
            let w = db.begin_write()?;
            w.open_table(CONTENT)?;
            w.commit()?;
        }
        drop(db);
        let s = ContentStore {
            faults: store.faults(),
            store,
            dir: dir.to_path_buf(),
            max_bytes,
            quota: Arc::new(Quota {
                limit: quota,
                used: AtomicU64::new(0),
            }),
        };
        for name in others {
            let recorded = match name.parse::<ContentId>() {
                Ok(id) => s.manifest(&id)?.is_some(),
                Err(_) => false,
            };
            if !recorded {
                tracing::warn!(
                    file = %s.dir.join(&name).display(),
                    "a file the database does not record (left in place; not served)"
                );
            }
        }
        // Every manifest decodes (a damaged one is an open error, not a client's surprise),
        // and a record whose file is gone or of another size is said once, at start.
        for (id, m) in s.list()? {
            s.quota.used.fetch_add(m.size, Ordering::AcqRel);
            let p = s.path(&id);
            match std::fs::metadata(&p) {
                Ok(md) if md.is_file() && md.len() == m.size => {}
                Ok(md) => tracing::warn!(
                    file = %p.display(),
                    "recorded as {} bytes but {} bytes on disk: downloads of it will fail verification",
                    m.size,
                    md.len()
                ),
                Err(e) => tracing::warn!(file = %p.display(), "recorded content is missing: {e}"),
            }
        }
        Ok(s)
    }

    /// Bytes stored or being uploaded, and the quota on them.
    pub fn usage(&self) -> (u64, u64) {
        (self.quota.used.load(Ordering::Acquire), self.quota.limit)
    }

    /// Whether an upload of `len` bytes could be accepted now: checked before its body is
    /// read, so that a refusal costs the client nothing. The upload's writes are checked
    /// again as they come (others may fill the room meanwhile).
    ///
    /// Errors: [`ContentError::TooLarge`], [`ContentError::OverQuota`].
    pub fn check_room(&self, len: u64) -> Result<(), ContentError> {
        if len > self.max_bytes {
            return Err(ContentError::TooLarge(self.max_bytes));
        }
        self.quota.room(len)
    }

    /// Deletes a stored content: its record (durably), then its file; frees its bytes.
    /// `Ok(false)` when it is not stored.
    ///
    /// Errors: [`ContentError::Unavailable`] when the store is down (nothing deleted), store
    /// errors. A file that cannot be removed after its record is gone is logged, not an
    /// error: the content is deleted (no longer recorded nor served).
    pub fn delete(&self, id: &ContentId) -> Result<bool, ContentError> {
        self.store.check()?;
        let w = self.store.db()?.begin_write()?;
        let size = {
            let mut t = w.open_table(CONTENT)?;
            let old = t.remove(&id.0)?;
            match old {
                None => None,
                Some(v) => Some(Manifest::decode_verified(v.value(), id)?.size),
            }
        };
        let Some(size) = size else {
            return Ok(false);
        };
        if let Err(e) = w.commit() {
            return Err(match self.store.check() {
                Err(down) => down.into(),
                Ok(()) => e.into(),
            });
        }
        let p = self.path(id);
        match std::fs::remove_file(&p) {
            Ok(()) => {
                if let Ok(d) = std::fs::File::open(&self.dir) {
                    let _ = d.sync_all();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %p.display(), "deleted content's file stays: {e}"),
        }
        self.quota.give_back(size);
        Ok(true)
    }

    pub fn path(&self, id: &ContentId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// The manifest of `id`, if stored (checked against `id`).
    pub fn manifest(&self, id: &ContentId) -> Result<Option<Manifest>, ContentError> {
        let r = self.store.db()?.begin_read()?;
        let t = r.open_table(CONTENT)?;
        let Some(v) = t.get(&id.0)? else {
            return Ok(None);
        };
        Ok(Some(Manifest::decode_verified(v.value(), id)?))
    }

    /// Every stored content's manifest.
    pub fn list(&self) -> Result<Vec<(ContentId, Manifest)>, ContentError> {
        let r = self.store.db()?.begin_read()?;
        let t = r.open_table(CONTENT)?;
        let mut out = vec![];
        for e in t.iter()? {
            let (k, v) = e?;
            let id = Digest(*k.value());
            out.push((id, Manifest::decode_verified(v.value(), &id)?));
        }
        Ok(out)
    }

    /// Starts an upload named `name` (checked like a manifest's name), cut into pieces of
    /// `piece_size` (a power of two the manifest accepts).
    ///
    /// Errors: a bad name ([`ContentError::Manifest`]), the store down
    /// ([`ContentError::Unavailable`]: refused before any byte is read), I/O.
    pub fn begin(&self, name: &str, piece_size: u32) -> Result<Upload, ContentError> {
        if name.is_empty()
            || name.len() > MAX_NAME_BYTES
            || name.contains(['/', '\\', '\0'])
            || name == "."
            || name == ".."
        {
            return Err(ManifestError::Inconsistent(format!("unusable file name {name:?}")).into());
        }
        self.store.check()?;
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        Ok(Upload {
            faults: self.faults.clone(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            name: name.to_string(),
            piece_size,
            max_bytes: self.max_bytes,
            quota: self.quota.clone(),
            reserved: 0,
            hasher: blake3::Hasher::new(),
            in_piece: 0,
            size: 0,
            pieces: vec![],
        })
    }

    /// Finishes an upload: the file is durable and recorded under its content id. Uploading
    /// the same content twice keeps the first copy (or puts the file back when a record
    /// outlived it).
    ///
    /// Errors: [`ContentError::NoSpace`] (the file is removed), [`ContentError::Unavailable`]
    /// when the record could not be written (the file is removed: nothing unrecorded stays
    /// under a content id), I/O.
    pub fn commit(&self, mut up: Upload) -> Result<(ContentId, Manifest), ContentError> {
        let manifest = up.manifest()?;
        let id = manifest.id();
        let Some(file) = up.file.take() else {
            return Err(ContentError::Io(
                up.tmp.display().to_string(),
                std::io::Error::other("the upload's file is already closed"),
            ));
        };
        let file = file
            .into_inner()
            .map_err(|e| io_err(&up.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| io_err(&up.tmp, e))?;
        drop(file);
        let dest = self.path(&id);
        if self.manifest(&id)?.is_some() && dest.is_file() {
            // A copy of a stored content: its bytes are counted already (dropping `up` gives
            // its reservation back).
            return Ok((id, manifest));
        }
        std::fs::rename(&up.tmp, &dest).map_err(|e| io_err(&up.tmp, e))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let record = || -> Result<(), ContentError> {
            let w = self.store.db()?.begin_write()?;
            w.open_table(CONTENT)?
                .insert(&id.0, manifest.encode().as_slice())?;
            w.commit()?;
            Ok(())
        };
        if let Err(e) = record() {
            // Unrecorded, so not content: ours to remove. (Should the failed commit have
            // been durable after all, the record names a missing file, which the next
            // upload of the same content puts back, above.)
            let _ = std::fs::remove_file(&dest);
            return Err(match self.store.check() {
                Err(down) => down.into(),
                Ok(()) => e,
            });
        }
        // Recorded: its bytes now count as stored, not as reserved by the upload.
        up.reserved = 0;
        Ok((id, manifest))
    }
}

/// An upload in progress; dropping it without [`ContentStore::commit`] removes its file.
pub struct Upload {
    faults: Option<Arc<Faults>>,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    name: String,
    piece_size: u32,
    max_bytes: u64,
    quota: Arc<Quota>,
    /// Bytes taken from the quota by this upload (given back when it is dropped unrecorded).
    reserved: u64,
    hasher: blake3::Hasher,
    /// Bytes of the current piece hashed so far (< piece_size).
    in_piece: u32,
    size: u64,
    pieces: Vec<Digest>,
}

impl Upload {
    /// Appends a chunk of the body. Blocking I/O: call it off the async runtime.
    ///
    /// Errors: [`ContentError::TooLarge`], [`ContentError::NoSpace`], I/O. After an error
    /// the upload is to be dropped, which removes its file.
    pub fn write(&mut self, mut chunk: &[u8]) -> Result<(), ContentError> {
        self.size += chunk.len() as u64;
        if self.size > self.max_bytes {
            return Err(ContentError::TooLarge(self.max_bytes));
        }
        self.quota.take(chunk.len() as u64)?;
        self.reserved += chunk.len() as u64;
        if let Some(f) = self.file.as_mut() {
            let fits = match &self.faults {
                Some(faults) => faults.take(chunk.len() as u64) as usize,
                None => chunk.len(),
            };
            f.write_all(&chunk[..fits])
                .map_err(|e| io_err(&self.tmp, e))?;
            if fits < chunk.len() {
                // The seam's full disk: what fitted is written, as a real one would.
                let _ = f.flush();
                return Err(io_err(&self.tmp, no_space()));
            }
        }
        while !chunk.is_empty() {
            let room = (self.piece_size - self.in_piece) as usize;
            let n = room.min(chunk.len());
            self.hasher.update(&chunk[..n]);
            self.in_piece += n as u32;
            chunk = &chunk[n..];
            if self.in_piece == self.piece_size {
                self.pieces.push(Digest(*self.hasher.finalize().as_bytes()));
                self.hasher.reset();
                self.in_piece = 0;
            }
        }
        Ok(())
    }

    fn manifest(&mut self) -> Result<Manifest, ContentError> {
        if self.in_piece > 0 {
            self.pieces.push(Digest(*self.hasher.finalize().as_bytes()));
            self.in_piece = 0;
        }
        let m = Manifest {
            version: 1,
            name: self.name.clone(),
            size: self.size,
            piece_size: self.piece_size,
            pieces: std::mem::take(&mut self.pieces),
        };
        m.check()?;
        Ok(m)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.quota.give_back(self.reserved);
        if self.file.is_some() || self.tmp.exists() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_gets_the_swarms_content_id_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let src = dir.path().join("f.bin");
        std::fs::write(&src, &data).unwrap();
        let want = Manifest::from_file(&src, 16 << 10).unwrap();

        let db = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
        let store = ContentStore::open(db.clone(), &dir.path().join("c"), 1 << 20).unwrap();
        let mut up = store.begin("f.bin", 16 << 10).unwrap();
        for c in data.chunks(3000) {
            up.write(c).unwrap();
        }
        let (id, m) = store.commit(up).unwrap();
        assert_eq!(m, want);
        assert_eq!(id, want.id());
        // An abandoned upload leaves nothing behind.
        let mut up = store.begin("g.bin", 16 << 10).unwrap();
        up.write(b"partial").unwrap();
        drop(up);
        drop(store);
        // A crash's temporary file is swept; files that are not the store's own are not.
        let c = dir.path().join("c");
        std::fs::write(c.join("tmp-00000000deadbeef"), b"x").unwrap();
        std::fs::write(c.join("tmp-crash"), b"not ours").unwrap();
        std::fs::write(c.join("notes.txt"), b"the operator's").unwrap();
        let store = ContentStore::open(db, &c, 1 << 20).unwrap();
        assert_eq!(store.manifest(&id).unwrap(), Some(want));
        assert_eq!(std::fs::read(store.path(&id)).unwrap(), data);
        assert!(!c.join("tmp-00000000deadbeef").exists());
        assert_eq!(std::fs::read(c.join("tmp-crash")).unwrap(), b"not ours");
        assert_eq!(
            std::fs::read(c.join("notes.txt")).unwrap(),
            b"the operator's"
        );
        assert_eq!(std::fs::read_dir(&c).unwrap().count(), 3);
        assert!(store.begin("../x", 16 << 10).is_err());
        let mut up = store.begin("big", 16 << 10).unwrap();
        assert!(matches!(
            up.write(&vec![0u8; (1 << 20) + 1]),
            Err(ContentError::TooLarge(_))
        ));
    }
}
