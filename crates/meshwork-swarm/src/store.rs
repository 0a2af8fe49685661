//! The piece store: the content file written in place at piece offsets, and a journal of the
//! pieces verified so far.
//!
//! # Invariants
//! 1. A piece is marked verified only after its bytes hashed to the manifest's hash; bytes that
//!    fail are never written.
//! 2. The journal names only pieces whose bytes reached the disk first: data is `fdatasync`ed
//!    before the journal records it. A crash loses at most the pieces since the last flush
//!    (fetched again), never marks an unwritten piece.
//! 3. Only verified pieces are read out (served to peers).
//! 4. A store writes only to a file it created itself (`O_CREAT | O_EXCL`), or to one whose
//!    identity (device and inode) its journal recorded when it created it. It never follows a
//!    symbolic link at the content path, and never truncates, resizes or writes a file it
//!    cannot prove is its own.
//! 5. A journal's piece records are trusted only while the file is as the journal last saw it
//!    (the same size and modification time as its last stat record). A file changed behind
//!    the store's back is re-hashed whole, and only the pieces that still verify are kept.
//!
//! # The journal
//! It lives wherever the caller says (the node keeps it in its data directory, named by the
//! content id, so that any file name the file system accepts can be downloaded):
//!
//! ```text
//! header  "MWJ2" | content id (32 bytes) | device (u64 LE) | inode (u64 LE)
//!         | birth time in ns (u128 LE, 0 where the file system keeps none)
//! record  'P' | piece index (u32 LE)                       a piece, verified and written
//!       | 'S' | size (u64) | mtime s (i64) | ns (u32) | ctime s (i64) | ns (u32)
//!                                                          the file after a flush (all LE)
//! ```
//!
//! Each flush appends the pieces made durable since the last one and then one stat record, in
//! one write: piece records after the last stat record are a torn append and are ignored. A
//! journal whose header names another content or another file is not this download's (it is
//! refused, never reused). The same idea as a BitTorrent client's fast-resume data, checked the
//! way rtorrent checks it: trusted while size and mtime match, re-hashed when they do not.
//!
//! The file is created sparse at its full size, so pieces land at their offsets in any order.
//! Pieces are flushed once [`FLUSH_BYTES`] have been written since the last flush, so that a
//! fast download does not pay one disk sync per piece. The threshold is in bytes, not pieces:
//! the syncs run on the content service's task and hold up its uploads too, and counted in
//! pieces they came four times as often with 64 KiB pieces as with 256 KiB ones.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bitfield::Bitfield;
use crate::manifest::{default_piece_size, Digest, Manifest};
use crate::ContentId;

/// Bytes written between two journal flushes, at least (a crash loses at most about this
/// much, fetched again).
pub const FLUSH_BYTES: u64 = 16 << 20;

const MAGIC: &[u8; 4] = b"MWJ2";
const HEADER_LEN: usize = 4 + 32 + 8 + 8 + 16;
const TAG_PIECE: u8 = b'P';
const TAG_STAT: u8 = b'S';
const STAT_LEN: usize = 8 + 8 + 4 + 8 + 4;

/// Which file a path names and how it last changed, from `statx(2)`: device, inode and
/// birth time say *which* file (the birth time guards against an inode number reused by a
/// later file, where the file system records it); size, modification time and change time
/// (seconds and nanoseconds) whether it changed. The change time cannot be set by a user
/// (`touch -d` moves it to now), so a change with its mtime put back is still seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    /// Birth time in nanoseconds since the epoch, where the file system keeps one.
    #[serde(default)]
    pub born_ns: Option<u128>,
    pub size: u64,
    pub mtime_s: i64,
    pub mtime_ns: u32,
    #[serde(default)]
    pub ctime_s: i64,
    #[serde(default)]
    pub ctime_ns: u32,
}

impl FileStat {
    /// The stat of an open file.
    pub fn of(file: &File) -> std::io::Result<FileStat> {
        Ok(Self::from_meta(&file.metadata()?))
    }

    /// The stat of what `path` names, not following a final symbolic link (`lstat(2)`).
    pub fn at(path: &Path) -> std::io::Result<FileStat> {
        Ok(Self::from_meta(&std::fs::symlink_metadata(path)?))
    }

    fn from_meta(m: &std::fs::Metadata) -> FileStat {
        FileStat {
            dev: m.dev(),
            ino: m.ino(),
            born_ns: m
                .created()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos()),
            size: m.len(),
            mtime_s: m.mtime(),
            mtime_ns: m.mtime_nsec() as u32,
            ctime_s: m.ctime(),
            ctime_ns: m.ctime_nsec() as u32,
        }
    }

    /// Whether both name the same file (device and inode), changed or not.
    pub fn same_file(&self, other: &FileStat) -> bool {
        self.dev == other.dev && self.ino == other.ino && self.born_ns == other.born_ns
    }
}

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
    /// A new download's path is taken: a download never writes over a file it did not create.
    #[error("{0} already exists: remove it or choose another path")]
    Exists(PathBuf),
    /// The file at a download's path is not the one its journal recorded (invariant 4).
    #[error("{path} is not this download's file ({why}); it was left untouched")]
    NotOurs { path: PathBuf, why: String },
    /// The path is a symbolic link: content files are opened only as themselves (a link
    /// swapped in by another user would publish, or overwrite, the file it points to).
    #[error("{0} is a symbolic link: give the path of the file itself")]
    Symlink(PathBuf),
    #[error("{0}: damaged journal ({1})")]
    BadJournal(PathBuf, String),
    #[error("{0}")]
    Manifest(#[from] crate::manifest::ManifestError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An open error at a content path, with a symbolic link named as what it is.
fn open_error(path: &Path, e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return StoreError::Symlink(path.to_owned());
    }
    io(path)(e)
}

/// Opens a file to read, never through a symbolic link at `path`.
fn open_read(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| open_error(path, e))
}

/// What [`PieceStore::resume`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resumed {
    /// A journal at the journal's path that was not this download's (damaged, or another
    /// content's), and so was not used: why.
    pub ignored: Option<String>,
    /// The file had changed since the journal last saw it (or the node stopped between two
    /// flushes): every piece was hashed again.
    pub rechecked: bool,
    /// Pieces the journal listed that no longer verify (fetched again).
    pub dropped: usize,
    /// The file was gone and was created anew, empty.
    pub recreated: bool,
}

struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Writes a fresh journal for `id` over `stat`'s file: the header and one stat record.
    fn create(
        path: &Path,
        id: &ContentId,
        stat: &FileStat,
        pieces: &[u32],
    ) -> Result<Journal, StoreError> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + pieces.len() * 5 + 1 + STAT_LEN);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&id.0);
        bytes.extend_from_slice(&stat.dev.to_le_bytes());
        bytes.extend_from_slice(&stat.ino.to_le_bytes());
        bytes.extend_from_slice(&stat.born_ns.unwrap_or(0).to_le_bytes());
        for i in pieces {
            bytes.push(TAG_PIECE);
            bytes.extend_from_slice(&i.to_le_bytes());
        }
        encode_stat(&mut bytes, stat);
        // Written aside and renamed, so that a crash leaves the old journal or the new one.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> std::io::Result<File> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            sync_parent(path)?;
            OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
        };
        let file = write().map_err(io(path))?;
        Ok(Journal {
            path: path.to_owned(),
            file,
        })
    }
}

fn encode_stat(out: &mut Vec<u8>, s: &FileStat) {
    out.push(TAG_STAT);
    out.extend_from_slice(&s.size.to_le_bytes());
    out.extend_from_slice(&s.mtime_s.to_le_bytes());
    out.extend_from_slice(&s.mtime_ns.to_le_bytes());
    out.extend_from_slice(&s.ctime_s.to_le_bytes());
    out.extend_from_slice(&s.ctime_ns.to_le_bytes());
}

/// Seconds and nanoseconds since the epoch.
type Timestamp = (i64, u32);

/// A parsed journal: whose it is, and the pieces committed by its last stat record.
struct JournalView {
    content: ContentId,
    dev: u64,
    ino: u64,
    born_ns: Option<u128>,
    /// Pieces listed before the last stat record.
    pieces: Vec<u32>,
    /// The file's stat at the last flush: size, mtime, ctime.
    last: Option<(u64, Timestamp, Timestamp)>,
}

fn parse_journal(path: &Path, bytes: &[u8]) -> Result<JournalView, StoreError> {
    let bad = |why: &str| StoreError::BadJournal(path.to_owned(), why.to_owned());
    if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
        return Err(bad("no Meshwork journal header"));
    }
    let u64_at =
        |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let mut content = [0u8; 32];
    content.copy_from_slice(&bytes[4..36]);
    let mut view = JournalView {
        content: Digest(content),
        dev: u64_at(bytes, 36),
        ino: u64_at(bytes, 44),
        born_ns: Some(u128::from_le_bytes(
            bytes[52..68].try_into().expect("16 bytes"),
        ))
        .filter(|b| *b != 0),
        pieces: vec![],
        last: None,
    };
    let mut pending = vec![];
    let mut rest = &bytes[HEADER_LEN..];
    // A torn last record (a crash mid-append) ends the walk; what it would have committed
    // is not trusted.
    loop {
        match rest {
            [TAG_PIECE, r @ ..] if r.len() >= 4 => {
                pending.push(u32::from_le_bytes(r[..4].try_into().expect("4 bytes")));
                rest = &r[4..];
            }
            [TAG_STAT, r @ ..] if r.len() >= STAT_LEN => {
                let u32_at = |at: usize| u32::from_le_bytes(r[at..at + 4].try_into().expect("4"));
                let m = (u64_at(r, 8) as i64, u32_at(16));
                let c = (u64_at(r, 20) as i64, u32_at(28));
                view.last = Some((u64_at(r, 0), m, c));
                view.pieces.append(&mut pending);
                rest = &r[STAT_LEN..];
            }
            [] => break,
            [TAG_PIECE | TAG_STAT, ..] => break, // torn
            [other, ..] => return Err(bad(&format!("unknown record tag {other:#04x}"))),
        }
    }
    Ok(view)
}

/// `fsync`s the directory holding `path`, so that a created or renamed entry survives a crash.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => File::open(p)?.sync_all(),
        _ => Ok(()),
    }
}

/// Removes `path` if it still names the file `file` is open on (an undo of our own create).
fn remove_if_same(path: &Path, file: &File) {
    if let (Ok(a), Ok(b)) = (FileStat::of(file), FileStat::at(path)) {
        if a.same_file(&b) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether the journal at `journal` belongs to content `id` and names the very file now at
/// `path` (invariant 4): what lets a node delete or reuse a download's file after a restart.
pub fn journal_owns(journal: &Path, path: &Path, id: &ContentId) -> bool {
    let Ok(bytes) = std::fs::read(journal) else {
        return false;
    };
    let (Ok(view), Ok(now)) = (parse_journal(journal, &bytes), FileStat::at(path)) else {
        return false;
    };
    view.content == *id && now.dev == view.dev && now.ino == view.ino && now.born_ns == view.born_ns
}

/// Hashes the pieces of `manifest` in `file`, returning those listed in `want` that differ.
fn bad_pieces(
    file: &File,
    path: &Path,
    manifest: &Manifest,
    want: impl Iterator<Item = usize>,
) -> Result<Vec<usize>, StoreError> {
    let mut buf = vec![0u8; manifest.piece_size as usize];
    let mut bad = vec![];
    for i in want {
        let b = &mut buf[..manifest.piece_len(i) as usize];
        match file.read_exact_at(b, manifest.piece_offset(i)) {
            Ok(()) if Digest::of(b) == manifest.pieces[i] => {}
            Ok(()) => bad.push(i),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => bad.push(i),
            Err(e) => return Err(io(path)(e)),
        }
    }
    Ok(bad)
}

/// What [`check_pieces`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// Held pieces that no longer verify.
    pub bad: Vec<usize>,
    /// Held pieces hashed.
    pub checked: usize,
    /// The file when the check began: what the result is true of.
    pub before: FileStat,
    /// Whether the file changed while it was hashed (the result may miss that change).
    pub moved: bool,
}

/// Re-hashes the pieces `have` of the file at `path`, which must still be the file `expect`
/// names (device, inode, birth time), and reports the pieces that no longer verify. For
/// `meshwork content verify` and for a content whose file changed while the node ran: the
/// caller holds the store, and hashes a second descriptor on another thread. Reads the whole
/// file.
pub fn check_pieces(
    path: &Path,
    manifest: &Manifest,
    have: &Bitfield,
    expect: &FileStat,
) -> Result<Checked, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    let now = FileStat::of(&file).map_err(io(path))?;
    if !now.same_file(expect) {
        return Err(StoreError::NotOurs {
            path: path.to_owned(),
            why: "another file has taken its place".into(),
        });
    }
    let bad = bad_pieces(&file, path, manifest, have.ones())?;
    let after = FileStat::of(&file).map_err(io(path))?;
    Ok(Checked {
        bad,
        checked: have.count(),
        moved: after != now,
        before: now,
    })
}

pub struct PieceStore {
    manifest: Manifest,
    /// A download's file, created by this store or proven its own (invariant 4), as opposed
    /// to a seed of the user's file, which is never written.
    written: bool,
    path: PathBuf,
    file: File,
    /// `None` for a seed of the user's own file, or a download with nowhere to keep one.
    journal: Option<Journal>,
    have: Bitfield,
    /// Verified and written, not yet in the journal.
    unflushed: Vec<u32>,
    /// The file as of the last flush (or the open, for a seed): what a later change is told
    /// apart from.
    last_stat: FileStat,
}

impl PieceStore {
    /// Starts a download at `path`, which must not exist: the file is created (exclusively,
    /// never through a symbolic link) sparse at its full size, with a fresh journal at
    /// `journal` when given (without one the download cannot resume after a restart).
    ///
    /// # Errors
    /// [`StoreError::Exists`] when `path` exists; I/O errors. A failure after the file was
    /// created removes it again: a failed start leaves nothing behind that blocks a retry.
    pub fn create(
        path: &Path,
        journal: Option<&Path>,
        manifest: Manifest,
    ) -> Result<PieceStore, StoreError> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Exists(path.to_owned()))
            }
            Err(e) => return Err(open_error(path, e)),
        };
        let made = (|| {
            file.set_len(manifest.size).map_err(io(path))?;
            let stat = FileStat::of(&file).map_err(io(path))?;
            let journal = journal
                .map(|j| Journal::create(j, &manifest.id(), &stat, &[]))
                .transpose()?;
            sync_parent(path).map_err(io(path))?;
            Ok((journal, stat))
        })();
        match made {
            Ok((journal, last_stat)) => Ok(PieceStore {
                written: true,
                have: Bitfield::new(manifest.piece_count()),
                manifest,
                path: path.to_path_buf(),
                file,
                journal,
                unflushed: vec![],
                last_stat,
            }),
            Err(e) => {
                remove_if_same(path, &file);
                if let Some(j) = journal {
                    let _ = std::fs::remove_file(j);
                }
                Err(e)
            }
        }
    }

    /// [`PieceStore::create`] without a journal: a download that cannot resume.
    pub fn open(path: &Path, manifest: Manifest) -> Result<PieceStore, StoreError> {
        Self::create(path, None, manifest)
    }

    /// Resumes the download at `path` from its journal at `journal` (both as
    /// [`PieceStore::create`] made them).
    ///
    /// The journal must name this content and the very file at `path` (invariant 4); its
    /// pieces are trusted only if the file is as the last flush left it (invariant 5), else
    /// every piece is hashed again and the journal rewritten with those that verify. A file
    /// that is gone is created anew (the node still wants the content).
    ///
    /// # Errors
    /// [`StoreError::NotOurs`] when there is no journal, or it names another content or
    /// another file; [`StoreError::BadJournal`]; I/O errors.
    pub fn resume(
        path: &Path,
        journal: &Path,
        manifest: Manifest,
    ) -> Result<(PieceStore, Resumed), StoreError> {
        let not_ours = |why: String| StoreError::NotOurs {
            path: path.to_owned(),
            why,
        };
        let id = manifest.id();
        // A journal that is missing, damaged or another content's proves nothing: it is
        // set aside as if absent (a fresh download may start), and the file, if there is
        // one, is not ours to touch.
        let mut ignored = None;
        let view = match std::fs::read(journal) {
            Ok(bytes) => match parse_journal(journal, &bytes) {
                Ok(v) if v.content == id => Some(v),
                Ok(v) => {
                    ignored = Some(format!("a journal of content {}", v.content));
                    None
                }
                Err(e) => {
                    ignored = Some(e.to_string());
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(journal)(e)),
        };
        // No file (and no journal of ours, or one of a file that is gone): start over.
        let start_over = |manifest, ignored| {
            let s = Self::create(path, Some(journal), manifest)?;
            let r = Resumed {
                recreated: true,
                ignored,
                ..Default::default()
            };
            Ok((s, r))
        };
        let Some(view) = view else {
            if FileStat::at(path).is_err() {
                return start_over(manifest, ignored);
            }
            let why = match ignored {
                Some(j) => format!("no journal of this node names it; {j} was ignored"),
                None => "no journal of this node names it".into(),
            };
            return Err(not_ours(why));
        };
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return start_over(manifest, None);
            }
            Err(e) => return Err(open_error(path, e)),
        };
        let now = FileStat::of(&file).map_err(io(path))?;
        if now.dev != view.dev || now.ino != view.ino || now.born_ns != view.born_ns {
            return Err(not_ours(
                "another file has taken its place since this node created it".into(),
            ));
        }
        let n = manifest.piece_count();
        let mut have = Bitfield::new(n);
        let mut resumed = Resumed::default();
        let unchanged = view.last
            == Some((
                now.size,
                (now.mtime_s, now.mtime_ns),
                (now.ctime_s, now.ctime_ns),
            ))
            && now.size == manifest.size;
        let mut last_stat = now;
        if unchanged {
            for &i in &view.pieces {
                if (i as usize) < n {
                    have.set(i as usize);
                }
            }
        } else {
            // Changed behind our back, or stopped between flushes: trust nothing it holds.
            resumed.rechecked = true;
            if now.size != manifest.size {
                file.set_len(manifest.size).map_err(io(path))?;
            }
            let bad = bad_pieces(&file, path, &manifest, 0..n)?;
            let mut listed = Bitfield::new(n);
            for &i in &view.pieces {
                if (i as usize) < n {
                    listed.set(i as usize);
                }
            }
            for i in 0..n {
                have.set(i);
            }
            for &i in &bad {
                have.clear(i);
                if listed.get(i) {
                    resumed.dropped += 1;
                }
            }
            file.sync_data().map_err(io(path))?;
            last_stat = FileStat::of(&file).map_err(io(path))?;
        }
        let pieces: Vec<u32> = have.ones().map(|i| i as u32).collect();
        let journal = if unchanged {
            Journal {
                path: journal.to_owned(),
                file: OpenOptions::new()
                    .append(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(journal)
                    .map_err(io(journal))?,
            }
        } else {
            Journal::create(journal, &id, &last_stat, &pieces)?
        };
        Ok((
            PieceStore {
                written: true,
                manifest,
                path: path.to_path_buf(),
                file,
                journal: Some(journal),
                have,
                unflushed: vec![],
                last_stat,
            },
            resumed,
        ))
    }

    /// Hashes `path` into its manifest and opens it to seed, reading the file once: the pieces
    /// are verified by the same hashing that made the manifest (invariant 1). `piece_size`
    /// `None` cuts it into the default pieces for its length
    /// ([`crate::manifest::default_piece_size`]), as the server cuts an upload. A file that
    /// changes while it is hashed is refused.
    pub fn share(path: &Path, piece_size: Option<u32>) -> Result<PieceStore, StoreError> {
        let file = open_read(path)?;
        let before = FileStat::of(&file).map_err(io(path))?;
        let piece_size = piece_size.unwrap_or_else(|| default_piece_size(before.size));
        // Hashed through our own descriptor: the bytes of the file opened and stat'ed, not
        // of whatever the path names by then.
        let manifest = Manifest::from_open_file(path, &file, piece_size)?;
        let after = FileStat::of(&file).map_err(io(path))?;
        if after != before || manifest.size != after.size {
            return Err(StoreError::NotTheContent(path.to_path_buf(), 0));
        }
        Ok(PieceStore {
            written: false,
            have: Bitfield::full(manifest.piece_count()),
            manifest,
            path: path.to_path_buf(),
            file,
            journal: None,
            unflushed: vec![],
            last_stat: after,
        })
    }

    /// Opens a complete file to seed it. When `recorded` (the stat taken when it was shared)
    /// still describes the file, it is trusted as hashed then; otherwise every piece is
    /// hashed against the manifest. Returns the store and whether it hashed.
    ///
    /// # Errors
    /// [`StoreError::NotTheContent`] when the file no longer matches; I/O errors.
    pub fn seed(
        path: &Path,
        manifest: Manifest,
        recorded: Option<&FileStat>,
    ) -> Result<(PieceStore, bool), StoreError> {
        let file = open_read(path)?;
        let now = FileStat::of(&file).map_err(io(path))?;
        if now.size != manifest.size {
            return Err(StoreError::NotTheContent(path.to_path_buf(), 0));
        }
        let hashed = recorded != Some(&now);
        if hashed {
            let all = 0..manifest.piece_count();
            if let Some(&i) = bad_pieces(&file, path, &manifest, all)?.first() {
                return Err(StoreError::NotTheContent(path.to_path_buf(), i));
            }
        }
        let store = PieceStore {
            written: false,
            have: Bitfield::full(manifest.piece_count()),
            manifest,
            path: path.to_path_buf(),
            file,
            journal: None,
            unflushed: vec![],
            last_stat: now,
        };
        Ok((store, hashed))
    }

    /// Opens a complete file to seed it, hashing every piece against the manifest.
    pub fn open_complete(path: &Path, manifest: Manifest) -> Result<PieceStore, StoreError> {
        Ok(Self::seed(path, manifest, None)?.0)
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

    /// Whether the path still names this download's own file (so that removing the download
    /// may delete it). Always false for a seed of the user's file.
    pub fn owns_path(&self) -> bool {
        self.written
            && match (FileStat::of(&self.file), FileStat::at(&self.path)) {
                (Ok(a), Ok(b)) => a.same_file(&b),
                _ => false,
            }
    }

    /// The file as the last flush (or the open) saw it.
    pub fn last_stat(&self) -> FileStat {
        self.last_stat
    }

    /// Whether the file changed since the last flush: another file now at the path, or the
    /// open file's size or modification time moved. Cheap (two `stat` calls); meaningful
    /// while nothing is being written (a complete content).
    pub fn changed(&self) -> Result<Option<String>, StoreError> {
        let now = FileStat::of(&self.file).map_err(io(&self.path))?;
        match FileStat::at(&self.path) {
            Ok(at) if !at.same_file(&now) => {
                return Ok(Some("another file has taken its place".into()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some("the file was removed".into()))
            }
            _ => {}
        }
        Ok((now != self.last_stat).then(|| "the file was modified".into()))
    }

    /// Bytes of verified pieces.
    pub fn verified_bytes(&self) -> u64 {
        self.have
            .ones()
            .map(|i| self.manifest.piece_len(i) as u64)
            .sum()
    }

    /// Marks `pieces` as no longer held (they failed a re-check of the file as it was at
    /// `as_of`), rewriting the journal without them; the file is taken to be as `as_of`
    /// describes, so a change after it is still seen as one. A seed of the user's file just
    /// stops serving them.
    pub fn forget(&mut self, pieces: &[usize], as_of: FileStat) -> Result<(), StoreError> {
        self.flush()?;
        for &i in pieces {
            if i < self.have.len() {
                self.have.clear(i);
            }
        }
        let stat = as_of;
        if let Some(j) = &self.journal {
            let listed: Vec<u32> = self.have.ones().map(|i| i as u32).collect();
            let path = j.path.clone();
            self.journal = Some(Journal::create(&path, &self.manifest.id(), &stat, &listed)?);
        }
        self.last_stat = stat;
        Ok(())
    }

    /// Checks a whole piece against its hash and, if it matches, writes it and marks it
    /// verified. Returns whether it matched; a mismatch writes nothing.
    pub fn write_piece(&mut self, i: usize, data: &[u8]) -> Result<bool, StoreError> {
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

    /// Makes the pieces written so far durable: data first, then the journal's piece records
    /// and the file's stat in one append (invariants 2 and 5).
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if self.unflushed.is_empty() {
            return Ok(());
        }
        self.file.sync_data().map_err(io(&self.path))?;
        let stat = FileStat::of(&self.file).map_err(io(&self.path))?;
        if let Some(j) = &mut self.journal {
            let mut rec = Vec::with_capacity(self.unflushed.len() * 5 + 1 + STAT_LEN);
            for i in &self.unflushed {
                rec.push(TAG_PIECE);
                rec.extend_from_slice(&i.to_le_bytes());
            }
            encode_stat(&mut rec, &stat);
            j.file.write_all(&rec).map_err(io(&j.path))?;
            j.file.sync_data().map_err(io(&j.path))?;
        }
        self.last_stat = stat;
        self.unflushed.clear();
        Ok(())
    }

    /// Reads `len` bytes at `offset` within verified piece `i` (invariant 3).
    pub fn read(&self, i: usize, offset: u32, len: u32) -> Result<Vec<u8>, StoreError> {
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
        let j = dir.path().join("dst.journal");
        {
            let mut s = PieceStore::create(&dst, Some(&j), m.clone()).unwrap();
            for i in [0, 3, 6] {
                assert!(s.write_piece(i, &piece(&data, &m, i)).unwrap());
            }
        } // dropped: flushed
        let (mut s, r) = PieceStore::resume(&dst, &j, m.clone()).unwrap();
        assert_eq!(r, Resumed::default(), "unchanged since the flush: trusted");
        assert_eq!(s.have().ones().collect::<Vec<_>>(), vec![0, 3, 6]);
        for i in 0..m.piece_count() {
            s.write_piece(i, &piece(&data, &m, i)).unwrap();
        }
        assert!(s.is_complete());
        drop(s);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        let (s, r) = PieceStore::resume(&dst, &j, m.clone()).unwrap();
        assert!(s.is_complete() && !r.rechecked);
        drop(s);
        // A torn last append (piece records without their stat record) commits nothing.
        let mut bytes = std::fs::read(&j).unwrap();
        let full = bytes.len();
        bytes.truncate(HEADER_LEN + 5 + 1 + STAT_LEN + 5 + 2);
        std::fs::write(&j, &bytes).unwrap();
        let view = parse_journal(&j, &bytes).unwrap();
        assert!(full > bytes.len() && view.pieces.is_empty() && view.last.is_some());
    }

    #[test]
    fn a_download_never_touches_a_file_it_did_not_create() {
        let (dir, src, data, m) = content(70_000);
        // An existing file, and a symbolic link to one, are refused and left as they were.
        let mine = dir.path().join("mine.txt");
        std::fs::write(&mine, b"the user's own file").unwrap();
        assert!(matches!(
            PieceStore::create(&mine, None, m.clone()),
            Err(StoreError::Exists(_))
        ));
        let link = dir.path().join("link.bin");
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        assert!(PieceStore::create(&link, None, m.clone()).is_err());
        assert_eq!(std::fs::read(&mine).unwrap(), b"the user's own file");
        // A journal of another content does not make the file ours.
        let dst = dir.path().join("dst.bin");
        let j = dir.path().join("dst.journal");
        drop(PieceStore::create(&dst, Some(&j), m.clone()).unwrap());
        let other = Manifest::from_file(&mine, MIN_PIECE_SIZE).unwrap();
        let mut other_named = other.clone();
        other_named.name = "dst.bin".into();
        assert!(matches!(
            PieceStore::resume(&dst, &j, other_named.clone()),
            Err(StoreError::NotOurs { .. })
        ));
        // Nor does our journal make a file that replaced ours at the path ours.
        let swap = dir.path().join("swap.bin");
        std::fs::write(&swap, &data[..1000]).unwrap();
        std::fs::rename(&swap, &dst).unwrap();
        assert!(matches!(
            PieceStore::resume(&dst, &j, m.clone()),
            Err(StoreError::NotOurs { .. })
        ));
        assert_eq!(std::fs::read(&dst).unwrap(), &data[..1000], "not resized");
        // A symbolic link at the path is not followed either.
        std::fs::remove_file(&dst).unwrap();
        std::os::unix::fs::symlink(&src, &dst).unwrap();
        assert!(matches!(
            PieceStore::resume(&dst, &j, m.clone()),
            Err(StoreError::Symlink(_))
        ));
        // Nor is a file shared through one.
        assert!(matches!(
            PieceStore::share(&dst, None),
            Err(StoreError::Symlink(_))
        ));
        // No journal at all: a file there is not provably ours.
        std::fs::remove_file(&dst).unwrap();
        std::fs::write(&dst, b"x").unwrap();
        std::fs::remove_file(&j).unwrap();
        assert!(matches!(
            PieceStore::resume(&dst, &j, m.clone()),
            Err(StoreError::NotOurs { .. })
        ));
        assert_eq!(std::fs::read(&dst).unwrap(), b"x");
        // Another content's journal where no file is: ignored, and the download starts over.
        std::fs::remove_file(&dst).unwrap();
        drop(PieceStore::create(&dst, Some(&j), m.clone()).unwrap());
        std::fs::remove_file(&dst).unwrap();
        let (s, r) = PieceStore::resume(&dst, &j, other_named).unwrap();
        assert!(r.recreated && r.ignored.is_some(), "{r:?}");
        assert_eq!(s.have().count(), 0);
    }

    #[test]
    fn a_failed_start_leaves_nothing_behind() {
        let (dir, _src, _data, m) = content(40_000);
        let dst = dir.path().join("dst.bin");
        let j = dir.path().join("no-such-dir").join("dst.journal");
        assert!(PieceStore::create(&dst, Some(&j), m.clone()).is_err());
        assert!(!dst.exists(), "the half-made download was removed");
        assert!(PieceStore::create(&dst, None, m).is_ok(), "a retry works");
    }

    #[test]
    fn a_file_changed_while_the_node_was_down_is_rehashed_and_only_bad_pieces_dropped() {
        let (dir, _src, data, m) = content(100_000);
        let dst = dir.path().join("dst.bin");
        let j = dir.path().join("dst.journal");
        {
            let mut s = PieceStore::create(&dst, Some(&j), m.clone()).unwrap();
            for i in [0, 2, 3, 5] {
                assert!(s.write_piece(i, &piece(&data, &m, i)).unwrap());
            }
        }
        // Four bytes inside journaled piece 3.
        let f = OpenOptions::new().write(true).open(&dst).unwrap();
        f.write_all_at(b"EVIL", m.piece_offset(3) + 10).unwrap();
        drop(f);
        let (s, r) = PieceStore::resume(&dst, &j, m.clone()).unwrap();
        assert!(r.rechecked);
        assert_eq!(r.dropped, 1);
        assert_eq!(s.have().ones().collect::<Vec<_>>(), vec![0, 2, 5]);
        drop(s);
        // The rewritten journal is trusted as it stands.
        let (s, r) = PieceStore::resume(&dst, &j, m.clone()).unwrap();
        assert!(!r.rechecked);
        assert_eq!(s.have().ones().collect::<Vec<_>>(), vec![0, 2, 5]);
        drop(s);
        // A change with its mtime put back is still seen (the change time moves).
        let f = OpenOptions::new().write(true).open(&dst).unwrap();
        let mtime = f.metadata().unwrap().modified().unwrap();
        f.write_all_at(b"EVIL", m.piece_offset(2) + 3).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let (s, r) = PieceStore::resume(&dst, &j, m.clone()).unwrap();
        assert!(r.rechecked && r.dropped == 1, "{r:?}");
        assert_eq!(s.have().ones().collect::<Vec<_>>(), vec![0, 5]);
        drop(s);
        let mut s = PieceStore::resume(&dst, &j, m.clone()).unwrap().0;
        s.write_piece(2, &piece(&data, &m, 2)).unwrap();
        // The same change found by a check while running, and forgotten.
        let f = OpenOptions::new().write(true).open(&dst).unwrap();
        f.write_all_at(b"EVIL", m.piece_offset(5) + 1).unwrap();
        drop(f);
        let mut s = s;
        assert_eq!(
            s.changed().unwrap().as_deref(),
            Some("the file was modified")
        );
        let c = check_pieces(&dst, &m, s.have(), &s.last_stat()).unwrap();
        assert_eq!((c.bad.clone(), c.moved), (vec![5], false));
        s.forget(&c.bad, c.before).unwrap();
        assert_eq!(s.changed().unwrap(), None);
        drop(s);
        let (s, _) = PieceStore::resume(&dst, &j, m).unwrap();
        assert_eq!(s.have().ones().collect::<Vec<_>>(), vec![0, 2]);
    }

    #[test]
    fn a_seed_must_match_its_manifest() {
        let (_dir, src, _data, m) = content(40_000);
        let shared = PieceStore::share(&src, Some(MIN_PIECE_SIZE)).unwrap();
        let stat = shared.last_stat();
        let (s, hashed) = PieceStore::seed(&src, m.clone(), Some(&stat)).unwrap();
        assert!(
            s.is_complete() && !hashed,
            "unchanged since shared: not hashed again"
        );
        assert!(PieceStore::open_complete(&src, m.clone())
            .unwrap()
            .is_complete());
        let mut bytes = std::fs::read(&src).unwrap();
        bytes[20_000] ^= 1;
        std::fs::write(&src, bytes).unwrap();
        assert!(matches!(
            PieceStore::seed(&src, m.clone(), Some(&stat)),
            Err(StoreError::NotTheContent(_, 1))
        ));
        assert!(matches!(
            PieceStore::open_complete(&src, m),
            Err(StoreError::NotTheContent(_, 1))
        ));
    }
}
