//! Fault injection for tests: a chain store on a disk that can be made to act full.
//!
//! [`FaultyFile`] is redb's file backend with a switch, [`DiskFull`]: while it is on, every
//! write, resize and sync fails with `ENOSPC` ("No space left on device"), as a full disk's
//! would; reads still work. [`crate::Chain::open_with_faults`] and
//! [`crate::Ledger::open_with_faults`] open a store through it, and a reopen after the error
//! goes through it again, so a test can fill the disk, watch the node's reaction, free it and
//! watch the recovery, without root and without a real full disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use redb::backends::FileBackend;
use redb::StorageBackend;

/// The switch of a [`FaultyFile`]: cloned handles share one state.
#[derive(Clone, Debug, Default)]
pub struct DiskFull(Arc<AtomicBool>);

impl DiskFull {
    /// A switch in the off position: the disk has space.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the disk full (`true`) or gives the space back (`false`).
    pub fn set(&self, full: bool) {
        self.0.store(full, Ordering::SeqCst);
    }

    /// Whether writes fail now.
    pub fn is_full(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn check(&self) -> io::Result<()> {
        if self.is_full() {
            Err(io::Error::from_raw_os_error(28)) // ENOSPC
        } else {
            Ok(())
        }
    }
}

/// redb's [`FileBackend`] whose writes fail while its [`DiskFull`] switch is on.
#[derive(Debug)]
pub struct FaultyFile {
    inner: FileBackend,
    full: DiskFull,
}

impl FaultyFile {
    /// Opens (or creates) the file at `path`, locked as redb locks its files.
    pub fn open(path: &Path, full: DiskFull) -> Result<Self, redb::DatabaseError> {
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Self {
            inner: FileBackend::new(file)?,
            full,
        })
    }
}

impl StorageBackend for FaultyFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.inner.read(offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Shrinking frees space; only growing needs it.
        if len > self.inner.len()? {
            self.full.check()?;
        }
        self.inner.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> io::Result<()> {
        self.full.check()?;
        self.inner.sync_data(eventual)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.full.check()?;
        self.inner.write(offset, data)
    }
}

thread_local! {
    /// Set while [`catch_quietly`] runs on this thread.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic, and keeps the panic hook from printing it.
///
/// redb panics (an `assert!`) on some damaged files, truncated ones among them, instead of
/// returning an error. The stores catch that at open and report the file as damaged; without
/// this the default hook would still print "thread 'main' panicked at ..." with a backtrace,
/// which reads as a crash. The first call installs a hook that stays silent only on a thread
/// inside this function and defers to the previous hook everywhere else.
pub fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    let outer = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(outer));
    r
}
