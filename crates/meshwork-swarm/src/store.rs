//! The piece store: the content file written in place at piece offsets, and a journal of the
//! pieces verified so far.
//!
//! # Invariants
//! 1. A piece is marked verified only after its bytes hashed to the manifest's hash; bytes that
//!    fail are never written.
//! 2. The journal (`<file>.mwparts`, appended 4-byte little-endian piece indices) names only
//!    pieces whose bytes reached the disk first: data is `fdatasync`ed before the journal
//!    records it. A crash loses at most the pieces since the last flush (fetched again), never
//!    marks an unwritten piece.
//! 3. Only verified pieces are read out (served to peers).
//!
//! The file is created sparse at its full size, so pieces land at their offsets in any order.
//! Pieces are flushed once [`FLUSH_BYTES`] have been written since the last flush, so that a
//! fast download does not pay one disk sync per piece. The threshold is in bytes, not pieces:
//! the syncs run on the content service's task and hold up its uploads too, and counted in
//! pieces they came four times as often with 64 KiB pieces as with 256 KiB ones.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::bitfield::Bitfield;
use crate::manifest::{default_piece_size, Digest, Manifest};

/// Bytes written between two journal flushes, at least (a crash loses at most about this
/// much, fetched again).
pub const FLUSH_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("piece {0} is out of range")]
    NoSuchPiece(usize),
    #[error("piece {index} has {got} bytes, expected {expected}")]
    WrongLength {
        index: usize,
        expected: u32,
        got: usize,
    },
    #[error("piece {0} is not verified yet")]
    NotVerified(usize),
    #[error("range {offset}+{len} is outside piece {index}")]
    BadRange { index: usize, offset: u32, len: u32 },
    #[error("{0}: the file does not match its manifest (piece {1} differs)")]
    NotTheContent(PathBuf, usize),
    #[error("{0}")]
    Manifest(#[from] crate::manifest::ManifestError),
}

pub struct PieceStore {
    manifest: Manifest,
    path: PathBuf,
    file: File,
    /// `None` for a seed opened from a complete file: nothing to journal.
    journal: Option<(PathBuf, File)>,
    have: Bitfield,
    /// Verified and written, not yet in the journal.
    unflushed: Vec<u32>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The journal's path next to the content file.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".mwparts");
    PathBuf::from(p)
}

impl PieceStore {
    /// Opens a download at `path` (created sparse if missing) and resumes from its journal.
    pub fn open(path: &Path, manifest: Manifest) -> Result<PieceStore, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io(path))?;
        file.set_len(manifest.size).map_err(io(path))?;
        let jpath = journal_path(path);
        let mut have = Bitfield::new(manifest.piece_count());
        if let Ok(mut j) = File::open(&jpath) {
            let mut bytes = vec![];
            j.read_to_end(&mut bytes).map_err(io(&jpath))?;
            // A torn last record (crash mid-append) is ignored; so is anything out of range.
            for rec in bytes.chunks_exact(4) {
                let i = u32::from_le_bytes(rec.try_into().expect("4 bytes")) as usize;
                if i < have.len() {
                    have.set(i);
                }
            }
        }
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jpath)
            .map_err(io(&jpath))?;
        Ok(PieceStore {
            manifest,
            path: path.to_path_buf(),
            file,
            journal: Some((jpath, journal)),
            have,
            unflushed: vec![],
        })
    }

    /// Hashes `path` into its manifest and opens it to seed, reading the file once: the pieces
    /// are verified by the same hashing that made the manifest (invariant 1). `piece_size`
    /// `None` cuts it into the default pieces for its length
    /// ([`crate::manifest::default_piece_size`]), as the server cuts an upload.
    pub fn share(path: &Path, piece_size: Option<u32>) -> Result<PieceStore, StoreError> {
        let piece_size = match piece_size {
            Some(p) => p,
            None => default_piece_size(std::fs::metadata(path).map_err(io(path))?.len()),
        };
        let manifest = Manifest::from_file(path, piece_size)?;
        let file = File::open(path).map_err(io(path))?;
        if file.metadata().map_err(io(path))?.len() != manifest.size {
            // It changed while we hashed it.
            return Err(StoreError::NotTheContent(path.to_path_buf(), 0));
        }
        Ok(PieceStore {
            have: Bitfield::full(manifest.piece_count()),
            manifest,
            path: path.to_path_buf(),
            file,
            journal: None,
            unflushed: vec![],
        })
    }

    /// Opens a complete file to seed it, hashing every piece against the manifest.
    pub fn open_complete(path: &Path, manifest: Manifest) -> Result<PieceStore, StoreError> {
        let file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        if len != manifest.size {
            return Err(StoreError::NotTheContent(path.to_path_buf(), 0));
        }
        let mut store = PieceStore {
            have: Bitfield::new(manifest.piece_count()),
            manifest,
            path: path.to_path_buf(),
            file,
            journal: None,
            unflushed: vec![],
        };
        for i in 0..store.manifest.piece_count() {
            let bytes = store.read_raw(i)?;
            if Digest::of(&bytes) != store.manifest.pieces[i] {
                return Err(StoreError::NotTheContent(path.to_path_buf(), i));
            }
            store.have.set(i);
        }
        Ok(store)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    /// Bytes of verified pieces.
    pub fn verified_bytes(&self) -> u64 {
        self.have
            .ones()
            .map(|i| self.manifest.piece_len(i) as u64)
            .sum()
    }

    fn read_raw(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; self.manifest.piece_len(i) as usize];
        self.file
            .read_exact_at(&mut buf, self.manifest.piece_offset(i))
            .map_err(io(&self.path))?;
        Ok(buf)
    }

    /// Checks a whole piece against its hash and, if it matches, writes it and marks it
    /// verified. Returns whether it matched; a mismatch writes nothing.
    pub fn write_piece(&mut self, i: usize, data: &[u8]) -> Result<bool, StoreError> {
        use std::os::unix::fs::FileExt;
        if i >= self.manifest.piece_count() {
            return Err(StoreError::NoSuchPiece(i));
        }
        let expected = self.manifest.piece_len(i);
        if data.len() != expected as usize {
            return Err(StoreError::WrongLength {
                index: i,
                expected,
                got: data.len(),
            });
        }
        if Digest::of(data) != self.manifest.pieces[i] {
            return Ok(false);
        }
        if self.have.get(i) {
            return Ok(true);
        }
        self.file
            .write_all_at(data, self.manifest.piece_offset(i))
            .map_err(io(&self.path))?;
        self.have.set(i);
        self.unflushed.push(i as u32);
        let unflushed_bytes = self.unflushed.len() as u64 * self.manifest.piece_size as u64;
        if unflushed_bytes >= FLUSH_BYTES || self.have.is_full() {
            self.flush()?;
        }
        Ok(true)
    }

    /// Makes the pieces written so far durable: data first, then the journal (invariant 2).
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if self.unflushed.is_empty() {
            return Ok(());
        }
        self.file.sync_data().map_err(io(&self.path))?;
        if let Some((jpath, j)) = &mut self.journal {
            let rec: Vec<u8> = self
                .unflushed
                .iter()
                .flat_map(|i| i.to_le_bytes())
                .collect();
            j.write_all(&rec).map_err(io(jpath))?;
            j.sync_data().map_err(io(jpath))?;
        }
        self.unflushed.clear();
        Ok(())
    }

    /// Reads `len` bytes at `offset` within verified piece `i` (invariant 3).
    pub fn read(&self, i: usize, offset: u32, len: u32) -> Result<Vec<u8>, StoreError> {
        use std::os::unix::fs::FileExt;
        if i >= self.manifest.piece_count() {
            return Err(StoreError::NoSuchPiece(i));
        }
        if !self.have.get(i) {
            return Err(StoreError::NotVerified(i));
        }
        let plen = self.manifest.piece_len(i);
        if offset.checked_add(len).is_none_or(|end| end > plen) {
            return Err(StoreError::BadRange {
                index: i,
                offset,
                len,
            });
        }
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, self.manifest.piece_offset(i) + offset as u64)
            .map_err(io(&self.path))?;
        Ok(buf)
    }
}

impl Drop for PieceStore {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::MIN_PIECE_SIZE;

    fn content(len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let m = Manifest::from_file(&src, MIN_PIECE_SIZE).unwrap();
        (dir, src, data, m)
    }

    fn piece(data: &[u8], m: &Manifest, i: usize) -> Vec<u8> {
        let o = m.piece_offset(i) as usize;
        data[o..o + m.piece_len(i) as usize].to_vec()
    }

    #[test]
    fn corrupt_pieces_are_refused_and_nothing_unverified_is_marked() {
        let (dir, _src, data, m) = content(70_000);
        let dst = dir.path().join("dst.bin");
        let mut s = PieceStore::open(&dst, m.clone()).unwrap();
        let mut bad = piece(&data, &m, 2);
        bad[100] ^= 1;
        assert!(!s.write_piece(2, &bad).unwrap());
        assert!(!s.have().get(2));
        assert!(matches!(s.read(2, 0, 10), Err(StoreError::NotVerified(2))));
        assert!(s.write_piece(2, &piece(&data, &m, 2)).unwrap());
        assert_eq!(
            s.read(2, 5, 10).unwrap(),
            data[m.piece_offset(2) as usize + 5..][..10]
        );
        assert!(matches!(
            s.read(2, 16_000, 1000),
            Err(StoreError::BadRange { .. })
        ));
        assert!(s.write_piece(9, &[0]).is_err());
        assert!(matches!(
            s.write_piece(1, &[0; 5]),
            Err(StoreError::WrongLength { .. })
        ));
    }

    #[test]
    fn resume_keeps_flushed_pieces_and_completes_byte_identical() {
        let (dir, _src, data, m) = content(100_000);
        let dst = dir.path().join("dst.bin");
        {
            let mut s = PieceStore::open(&dst, m.clone()).unwrap();
            for i in [0, 3, 6] {
                assert!(s.write_piece(i, &piece(&data, &m, i)).unwrap());
            }
        } // dropped: flushed
        let mut s = PieceStore::open(&dst, m.clone()).unwrap();
        assert_eq!(s.have().ones().collect::<Vec<_>>(), vec![0, 3, 6]);
        for i in 0..m.piece_count() {
            s.write_piece(i, &piece(&data, &m, i)).unwrap();
        }
        assert!(s.is_complete());
        drop(s);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        // A torn journal record is ignored.
        let j = journal_path(&dst);
        let mut bytes = std::fs::read(&j).unwrap();
        bytes.truncate(6);
        std::fs::write(&j, bytes).unwrap();
        let s = PieceStore::open(&dst, m).unwrap();
        assert_eq!(s.have().count(), 1);
    }

    #[test]
    fn a_seed_must_match_its_manifest() {
        let (_dir, src, _data, m) = content(40_000);
        assert!(PieceStore::open_complete(&src, m.clone())
            .unwrap()
            .is_complete());
        let mut bytes = std::fs::read(&src).unwrap();
        bytes[20_000] ^= 1;
        std::fs::write(&src, bytes).unwrap();
        assert!(matches!(
            PieceStore::open_complete(&src, m),
            Err(StoreError::NotTheContent(_, 1))
        ));
    }
}
