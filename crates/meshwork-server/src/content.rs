//! The client-server content store: files on disk, named by the same content id as in the
//! swarm (the hash of the manifest), with their manifests in redb.
//!
//! An upload streams into a temporary file while its pieces are hashed, so the manifest is
//! ready when the last byte arrives; the file is then fsynced, renamed to its content id and
//! only then recorded. Invariants:
//! - a content id in the `CONTENT` table names a complete, fsynced file `<dir>/<id>` whose
//!   pieces hash to that manifest (the record is written after the rename);
//! - files in `<dir>` without a record (an upload cut short by a crash) and `tmp-*` files
//!   are removed at open, so they never pile up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshwork_swarm::manifest::{ManifestError, MAX_NAME_BYTES};
use meshwork_swarm::{ContentId, Digest, Manifest};
use redb::{Database, ReadableTable, TableDefinition};

/// content id → encoded manifest.
const CONTENT: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("content");

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("the upload exceeds the server's limit of {0} bytes")]
    TooLarge(u64),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("store: {0}")]
    Store(String),
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

pub struct ContentStore {
    db: Arc<Database>,
    dir: PathBuf,
    max_bytes: u64,
}

impl ContentStore {
    /// Opens the store in `dir` (created if missing) and sweeps unrecorded files.
    pub fn open(
        db: Arc<Database>,
        dir: &Path,
        max_bytes: u64,
    ) -> Result<ContentStore, ContentError> {
        std::fs::create_dir_all(dir).map_err(|e| ContentError::Io(dir.display().to_string(), e))?;
        let w = db.begin_write()?;
        w.open_table(CONTENT)?;
        w.commit()?;
        let s = ContentStore {
            db,
            dir: dir.to_path_buf(),
            max_bytes,
        };
        let entries =
            std::fs::read_dir(dir).map_err(|e| ContentError::Io(dir.display().to_string(), e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let recorded = name
                .parse::<ContentId>()
                .ok()
                .map(|id| s.manifest(&id).map(|m| m.is_some()))
                .transpose()?
                .unwrap_or(false);
            if !recorded {
                tracing::warn!(file = %name, "removing an unrecorded file (an interrupted upload)");
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(s)
    }

    pub fn path(&self, id: &ContentId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    pub fn manifest(&self, id: &ContentId) -> Result<Option<Manifest>, ContentError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(CONTENT)?;
        let Some(v) = t.get(&id.0)? else {
            return Ok(None);
        };
        Ok(Some(Manifest::decode_verified(v.value(), id)?))
    }

    /// Every stored content's manifest.
    pub fn list(&self) -> Result<Vec<(ContentId, Manifest)>, ContentError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(CONTENT)?;
        let mut out = vec![];
        for e in t.iter()? {
            let (k, v) = e?;
            let id = Digest(*k.value());
            out.push((id, Manifest::decode_verified(v.value(), &id)?));
        }
        Ok(out)
    }

    /// Starts an upload of a file called `name` (checked like a manifest's name).
    /// Starts an upload named `name`, cut into pieces of `piece_size` (a power of two the
    /// manifest accepts).
    pub fn begin(&self, name: &str, piece_size: u32) -> Result<Upload, ContentError> {
        if name.is_empty()
            || name.len() > MAX_NAME_BYTES
            || name.contains(['/', '\\', '\0'])
            || name == "."
            || name == ".."
        {
            return Err(ManifestError::Inconsistent(format!("unusable file name {name:?}")).into());
        }
        let tmp = self.dir.join(format!("tmp-{:016x}", rand::random::<u64>()));
        let file = std::fs::File::create(&tmp)
            .map_err(|e| ContentError::Io(tmp.display().to_string(), e))?;
        Ok(Upload {
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            name: name.to_string(),
            piece_size,
            max_bytes: self.max_bytes,
            hasher: blake3::Hasher::new(),
            in_piece: 0,
            size: 0,
            pieces: vec![],
        })
    }

    /// Finishes an upload: the file is durable and recorded under its content id. Uploading
    /// the same content twice keeps the first copy.
    pub fn commit(&self, mut up: Upload) -> Result<(ContentId, Manifest), ContentError> {
        let manifest = up.manifest()?;
        let id = manifest.id();
        let tmp_name = up.tmp.display().to_string();
        let file = up
            .file
            .take()
            .expect("an upload's file is taken only here")
            .into_inner()
            .map_err(|e| ContentError::Io(tmp_name.clone(), e.into_error()))?;
        file.sync_all()
            .map_err(|e| ContentError::Io(tmp_name.clone(), e))?;
        drop(file);
        if self.manifest(&id)?.is_some() {
            return Ok((id, manifest));
        }
        let dest = self.path(&id);
        std::fs::rename(&up.tmp, &dest).map_err(|e| ContentError::Io(tmp_name, e))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let w = self.db.begin_write()?;
        w.open_table(CONTENT)?
            .insert(&id.0, manifest.encode().as_slice())?;
        w.commit()?;
        Ok((id, manifest))
    }
}

/// An upload in progress; dropping it without [`ContentStore::commit`] removes its file.
pub struct Upload {
    tmp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    name: String,
    piece_size: u32,
    max_bytes: u64,
    hasher: blake3::Hasher,
    /// Bytes of the current piece hashed so far (< piece_size).
    in_piece: u32,
    size: u64,
    pieces: Vec<Digest>,
}

impl Upload {
    /// Appends a chunk of the body. Blocking I/O: call it off the async runtime.
    pub fn write(&mut self, mut chunk: &[u8]) -> Result<(), ContentError> {
        self.size += chunk.len() as u64;
        if self.size > self.max_bytes {
            return Err(ContentError::TooLarge(self.max_bytes));
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(chunk)
                .map_err(|e| ContentError::Io(self.tmp.display().to_string(), e))?;
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

        let db = Arc::new(Database::create(dir.path().join("s.redb")).unwrap());
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
        std::fs::write(dir.path().join("c").join("tmp-crash"), b"x").unwrap();
        let store = ContentStore::open(db, &dir.path().join("c"), 1 << 20).unwrap();
        assert_eq!(store.manifest(&id).unwrap(), Some(want));
        assert_eq!(std::fs::read(store.path(&id)).unwrap(), data);
        assert_eq!(std::fs::read_dir(dir.path().join("c")).unwrap().count(), 1);
        assert!(store.begin("../x", 16 << 10).is_err());
        let mut up = store.begin("big", 16 << 10).unwrap();
        assert!(matches!(
            up.write(&vec![0u8; (1 << 20) + 1]),
            Err(ContentError::TooLarge(_))
        ));
    }
}
