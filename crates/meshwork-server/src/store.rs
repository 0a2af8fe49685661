//! The server's database (`server.redb`): opened without panicking on a damaged file, and
//! reopened by itself after a storage error.
//!
//! redb, after one failed write (a full disk, say), answers every later operation with
//! "Previous I/O error occurred. Please close and re-open the database". So the [`Store`]
//! never hands out its [`Database`] for longer than one operation, and watches every I/O
//! call through a wrapper backend. Invariants:
//! - the first I/O error of an open database *trips* it: the store turns [`Health::Down`]
//!   (logged once, with the reason), drops its handle and answers every caller
//!   [`StoreError::Unavailable`] until it is reopened, so nothing is acknowledged that was not
//!   made durable;
//! - [`Store::maintain`] (the server calls it every 100 ms) reopens a down store, at most
//!   every 250 ms at first and backing off to every 5 s; redb repairs the file on that open.
//!   A reopen fails harmlessly while the disk is still full, or while an operation still holds
//!   the old handle (redb locks the file), and is simply tried again;
//! - opening never panics: redb's own panics on a damaged file are caught and reported as
//!   [`StoreError::Damaged`], naming the file and how to recover.
//!
//! [`Faults`] is the test seam: a byte budget shared by the database and the content files
//! that makes their writes fail with ENOSPC, as a full disk does, without root or a tmpfs.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redb::backends::FileBackend;
use redb::{Database, DatabaseError, StorageBackend, StorageError};

/// The first retry after a storage error.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between two reopen attempts.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// A storage error this soon after a reopen continues the same episode: its backoff keeps
/// growing and it is not logged again (a reopen can succeed on a still-full disk, and the
/// next write then fails at once).
const RELAPSE: Duration = Duration::from_secs(60);

/// Errors of [`Store`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file is not a readable redb database (truncated, overwritten, bytes flipped).
    #[error(
        "{path}: the database is damaged ({reason}). The server does not repair it itself: \
         restore {path} from a backup; or, to start over, move {path} and the content \
         directory next to it aside (the server then starts with an empty ledger and no content)"
    )]
    Damaged { path: String, reason: String },
    /// The file could not be opened for another reason (permissions, another server using
    /// the same data directory, no room to create it).
    #[error("{path}: cannot open the database: {reason}")]
    Open { path: String, reason: String },
    /// The store is down after a storage error and not yet reopened.
    #[error("storage unavailable: {reason}; the server reopens its store as soon as it can")]
    Unavailable { reason: String },
}

/// The store's health, as `GET /api/v1/health` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// Down since `since` after a storage error described by `reason`.
    Down {
        reason: String,
        since: Instant,
    },
}

/// A test seam standing in for a full disk: a budget of bytes that the database's writes and
/// the content files' writes draw from; a write beyond it fails with ENOSPC (os error 28).
/// `None`, the default, is unlimited. Hidden: only tests build servers with it.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Faults {
    space: Mutex<Option<u64>>,
}

#[doc(hidden)]
impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    /// Leaves `bytes` of room (`None`: unlimited, "space returns").
    pub fn set_space(&self, bytes: Option<u64>) {
        *self.space.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
    }

    /// Takes room for `n` bytes. On a shortfall it takes what is left and returns how many
    /// bytes fit (< n): the caller writes those and then fails with [`no_space`].
    pub fn take(&self, n: u64) -> u64 {
        let mut s = self.space.lock().unwrap_or_else(|p| p.into_inner());
        match s.as_mut() {
            None => n,
            Some(left) => {
                let ok = n.min(*left);
                *left -= ok;
                ok
            }
        }
    }
}

/// The error a full disk gives: ENOSPC.
#[doc(hidden)]
pub fn no_space() -> io::Error {
    io::Error::from_raw_os_error(28)
}

/// Whether `e` says the disk (or the user's quota) is full.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(28) | Some(122))
}

/// Set by the backend on the first I/O error of one open database.
#[derive(Debug, Default)]
struct Tripwire(Mutex<Option<String>>);

impl Tripwire {
    fn trip(&self, what: String) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if t.is_none() {
            *t = Some(what);
        }
    }
    fn reason(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// redb's file backend, watched: every I/O error trips the wire; with [`Faults`], writes draw
/// from the budget.
#[derive(Debug)]
struct Guarded {
    inner: FileBackend,
    wire: Arc<Tripwire>,
    faults: Option<Arc<Faults>>,
}

impl Guarded {
    fn watch<T>(&self, op: &str, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            self.wire.trip(format!("{op}: {e}"));
        }
        r
    }
}

impl StorageBackend for Guarded {
    fn len(&self) -> io::Result<u64> {
        self.watch("reading the database's length", self.inner.len())
    }
    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.watch("reading the database", self.inner.read(offset, len))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        // Growing the file makes a hole (no blocks yet): the writes into it pay, below.
        self.watch("resizing the database", self.inner.set_len(len))
    }
    fn sync_data(&self, eventual: bool) -> io::Result<()> {
        self.watch("syncing the database", self.inner.sync_data(eventual))
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let r = match &self.faults {
            Some(f) if f.take(data.len() as u64) < data.len() as u64 => Err(no_space()),
            _ => self.inner.write(offset, data),
        };
        self.watch("writing the database", r)
    }
}

/// What one [`Store::maintain`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Maintained {
    /// The store was open and healthy: nothing to do.
    Healthy,
    /// Down, and the next reopen attempt is not due yet.
    NotDue,
    /// Down; this attempt to reopen failed (the disk is still full, say).
    Failed,
    /// Down until this call, which reopened it.
    Reopened,
}

/// The episode a reopened store came back from.
#[derive(Clone, Copy)]
struct Episode {
    since: Instant,
    reopened: Instant,
    backoff: Duration,
}

enum State {
    Open {
        db: Arc<Database>,
        wire: Arc<Tripwire>,
        /// Set when this handle came from a reopen.
        after: Option<Episode>,
    },
    Down {
        reason: String,
        since: Instant,
        retry_at: Instant,
        backoff: Duration,
        /// Down again soon after a reopen: the episode was logged already.
        relapse: bool,
    },
}

/// The server's redb database, shared by the ledger and the content store.
pub struct Store {
    path: PathBuf,
    faults: Option<Arc<Faults>>,
    state: Mutex<State>,
    /// Storage-error episodes so far, each logged once.
    episodes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates, when missing or empty) the database at `path`.
    ///
    /// Errors: [`StoreError::Damaged`] for a file that is not a readable database (never a
    /// panic), [`StoreError::Open`] otherwise.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_inner(path, None)
    }

    /// [`Store::open`] with the [`Faults`] seam. Hidden: for tests.
    #[doc(hidden)]
    pub fn open_with_faults(path: &Path, faults: Arc<Faults>) -> Result<Store, StoreError> {
        Store::open_inner(path, Some(faults))
    }

    fn open_inner(path: &Path, faults: Option<Arc<Faults>>) -> Result<Store, StoreError> {
        let (db, wire) = open_db(path, faults.clone())?;
        Ok(Store {
            path: path.to_path_buf(),
            faults,
            state: Mutex::new(State::Open {
                db,
                wire,
                after: None,
            }),
            episodes: Default::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The test seam this store was opened with, which the content store shares.
    pub(crate) fn faults(&self) -> Option<Arc<Faults>> {
        self.faults.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open database, for one operation: do not keep it (a reopen waits for every handle
    /// to be dropped). [`StoreError::Unavailable`] while the store is down.
    pub fn db(&self) -> Result<Arc<Database>, StoreError> {
        let mut st = self.lock();
        self.trip_if_failed(&mut st);
        match &*st {
            State::Open { db, .. } => Ok(db.clone()),
            State::Down { reason, .. } => Err(StoreError::Unavailable {
                reason: reason.clone(),
            }),
        }
    }

    /// `Ok` while the store is usable; [`StoreError::Unavailable`] once an I/O error has
    /// tripped it. Call it after an operation failed, to tell a storage failure (answer 503)
    /// from another error.
    pub fn check(&self) -> Result<(), StoreError> {
        self.db().map(drop)
    }

    /// How many storage-error episodes there were since open. Each is logged once: a store
    /// that fails again within a minute of its reopen continues its episode (and its backoff).
    pub fn episodes(&self) -> u64 {
        self.episodes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The store's health now.
    pub fn health(&self) -> Health {
        let mut st = self.lock();
        self.trip_if_failed(&mut st);
        match &*st {
            State::Open { .. } => Health::Ok,
            State::Down { reason, since, .. } => Health::Down {
                reason: reason.clone(),
                since: *since,
            },
        }
    }

    /// Open → Down when the wire tripped; the one place that logs the failure.
    fn trip_if_failed(&self, st: &mut State) {
        let State::Open { wire, after, .. } = &*st else {
            return;
        };
        let Some(what) = wire.reason() else {
            return;
        };
        let reason = format!("{}: {what}", self.path.display());
        let now = Instant::now();
        let (since, backoff, relapse) = match after {
            Some(ep) if now.duration_since(ep.reopened) < RELAPSE => {
                tracing::debug!("storage error again soon after the reopen: {reason}");
                (ep.since, (ep.backoff * 2).min(MAX_RETRY), true)
            }
            _ => {
                self.episodes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    "storage error: {reason}; refusing transfers and uploads, and reporting \
                     unhealthy, until the store is reopened"
                );
                (now, FIRST_RETRY, false)
            }
        };
        *st = State::Down {
            reason,
            since,
            retry_at: now + backoff,
            backoff,
            relapse,
        };
    }

    /// Reopens a down store when its retry is due. Blocking (redb repairs the file on open).
    pub fn maintain(&self) -> Maintained {
        {
            let mut st = self.lock();
            self.trip_if_failed(&mut st);
            match &*st {
                State::Down { retry_at, .. } if Instant::now() >= *retry_at => {}
                State::Down { .. } => return Maintained::NotDue,
                State::Open { .. } => return Maintained::Healthy,
            }
        }
        // Not under the lock: callers keep getting `Unavailable` meanwhile. Only the server's
        // maintenance task calls this, so two opens never race.
        let r = open_db(&self.path, self.faults.clone());
        let mut st = self.lock();
        let State::Down {
            since,
            backoff,
            relapse,
            ..
        } = &mut *st
        else {
            return Maintained::Healthy;
        };
        match r {
            Ok((db, wire)) => {
                let ep = Episode {
                    since: *since,
                    reopened: Instant::now(),
                    backoff: *backoff,
                };
                let msg = format!(
                    "{}: store reopened after {:.1} s down",
                    self.path.display(),
                    since.elapsed().as_secs_f64()
                );
                // Once per episode, like the error.
                if *relapse {
                    tracing::debug!("{msg}");
                } else {
                    tracing::info!("{msg}");
                }
                *st = State::Open {
                    db,
                    wire,
                    after: Some(ep),
                };
                Maintained::Reopened
            }
            Err(e) => {
                // Expected while the disk is still full: not worth a line every few seconds.
                tracing::debug!("reopening the store failed: {e}");
                let next = (*backoff * 2).min(MAX_RETRY);
                if let State::Down {
                    retry_at, backoff, ..
                } = &mut *st
                {
                    *backoff = next;
                    *retry_at = Instant::now() + next;
                }
                Maintained::Failed
            }
        }
    }
}

fn open_db(
    path: &Path,
    faults: Option<Arc<Faults>>,
) -> Result<(Arc<Database>, Arc<Tripwire>), StoreError> {
    let name = path.display().to_string();
    let open_err = |reason: String| StoreError::Open {
        path: name.clone(),
        reason,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| open_err(e.to_string()))?;
    let inner = FileBackend::new(file).map_err(|e| match e {
        DatabaseError::DatabaseAlreadyOpen => {
            open_err("it is open in another process (another server on this data dir?)".into())
        }
        e => open_err(e.to_string()),
    })?;
    let wire = Arc::new(Tripwire::default());
    let backend = Guarded {
        inner,
        wire: wire.clone(),
        faults,
    };
    // redb panics on some damaged files instead of returning an error (a file shorter than
    // its header says, for one): a damaged file is bad input, never a crash, so its panics
    // become `Damaged`, without the panic's message and backtrace on stderr.
    let r = quietly(|| Database::builder().create_with_backend(backend));
    let damaged = |reason: String| StoreError::Damaged {
        path: name.clone(),
        reason,
    };
    match r {
        Ok(Ok(db)) => Ok((Arc::new(db), wire)),
        Ok(Err(DatabaseError::Storage(StorageError::Io(e)))) if is_no_space(&e) => {
            Err(open_err(e.to_string()))
        }
        Ok(Err(DatabaseError::Storage(StorageError::Io(e))))
            if e.kind() == io::ErrorKind::UnexpectedEof =>
        {
            Err(damaged(format!("it ends early: {e}")))
        }
        Ok(Err(e @ DatabaseError::Storage(StorageError::Corrupted(_)))) => {
            Err(damaged(e.to_string()))
        }
        Ok(Err(e @ DatabaseError::UpgradeRequired(_))) => Err(open_err(e.to_string())),
        Ok(Err(DatabaseError::Storage(StorageError::Io(e)))) => Err(open_err(e.to_string())),
        Ok(Err(e)) => Err(damaged(e.to_string())),
        Err(panic) => Err(damaged(format!(
            "redb failed reading it: {}",
            panic_message(&panic)
        ))),
    }
}

thread_local! {
    /// Set while this thread runs [`quietly`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching its panic; the panic hook (chained once in front of the one installed
/// before) stays silent for this thread meanwhile, and for every other thread behaves as
/// before.
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info)
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::TableDefinition;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn put(s: &Store, k: u64) -> Result<(), String> {
        let db = s.db().map_err(|e| e.to_string())?;
        let w = db.begin_write().map_err(|e| e.to_string())?;
        w.open_table(T)
            .map_err(|e| e.to_string())?
            .insert(k, k)
            .map_err(|e| e.to_string())?;
        w.commit().map_err(|e| e.to_string())
    }

    fn get(s: &Store, k: u64) -> Option<u64> {
        let db = s.db().ok()?;
        let r = db.begin_read().ok()?;
        let t = r.open_table(T).ok()?;
        t.get(k).ok()?.map(|g| g.value())
    }

    /// A write that fails for lack of room trips the store (down, with the reason), later
    /// callers get `Unavailable`, and `maintain` reopens it once room returns, with every
    /// committed write still there.
    #[test]
    fn a_full_disk_trips_the_store_and_it_reopens_when_room_returns() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let s = Store::open_with_faults(&dir.path().join("s.redb"), faults.clone()).unwrap();
        put(&s, 1).unwrap();
        assert_eq!(s.health(), Health::Ok);
        faults.set_space(Some(0));
        let e = put(&s, 2).unwrap_err();
        assert!(
            e.contains("No space left") || e.contains("os error 28"),
            "{e}"
        );
        let Health::Down { reason, .. } = s.health() else {
            panic!("still healthy after a failed write");
        };
        assert!(reason.contains("No space left"), "{reason}");
        assert!(matches!(s.db(), Err(StoreError::Unavailable { .. })));
        // Still full: a reopen attempt (which must write to repair the file) fails, and the
        // store stays down.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match s.maintain() {
                Maintained::NotDue => {}
                Maintained::Failed => break,
                m => panic!("reopened on a full disk: {m:?}"),
            }
            assert!(Instant::now() < deadline, "no reopen attempt");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(matches!(s.health(), Health::Down { .. }));
        faults.set_space(None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.maintain() != Maintained::Reopened {
            assert!(Instant::now() < deadline, "never reopened");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.health(), Health::Ok);
        assert_eq!(get(&s, 1), Some(1));
        assert_eq!(s.episodes(), 1);

        // Full again at once (a reopen can succeed on a full disk): the same episode, not
        // logged again, its down time counted from the first failure.
        let Health::Down { since: first, .. } = ({
            faults.set_space(Some(0));
            assert!(put(&s, 2).is_err());
            s.health()
        }) else {
            panic!("healthy after a failed write");
        };
        assert_eq!(s.episodes(), 1, "a relapse is the same episode");
        assert!(first.elapsed() > Duration::from_millis(200), "{first:?}");
        faults.set_space(None);
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.maintain() != Maintained::Reopened {
            assert!(Instant::now() < deadline, "never reopened");
            std::thread::sleep(Duration::from_millis(20));
        }
        put(&s, 3).unwrap();
        drop(s);
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        assert_eq!(get(&s, 1), Some(1));
        assert_eq!(get(&s, 3), Some(3));
    }

    #[test]
    fn a_second_open_of_the_same_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Store::open(&dir.path().join("s.redb")).unwrap();
        let e = Store::open(&dir.path().join("s.redb")).unwrap_err();
        assert!(matches!(e, StoreError::Open { .. }), "{e}");
    }
}
