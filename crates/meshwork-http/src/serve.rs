//! A bounded HTTP/1.1 accept loop for every Meshwork service (the node's API, `meshwork
//! server`, `meshwork tracker`): slow or many clients cannot take a service down.
//!
//! `axum::serve` accepts without limit and never times a connection out, so 1 100 clients that
//! send one header byte per second hold 1 100 descriptors and the process meets `EMFILE` at
//! the usual limit of 1 024 files. This loop drives hyper's HTTP/1.1 connection itself and adds:
//!
//! - **Caps.** At most [`Limits::max_connections`] connections, never more than the process's
//!   file limit (`RLIMIT_NOFILE`, soft) minus [`Limits::reserve_files`] across every loop of the
//!   process (the rest of the process, peers, stores, files, needs descriptors too), and at most
//!   [`Limits::max_per_ip`] from one source IP.
//! - **Eviction.** A newcomer that finds a cap reached evicts a connection that does no work of
//!   ours: an *idle* one (no request in flight: still waiting for its first headers, or between
//!   keep-alive requests) or one that *waits on its peer* (a slow upload body, or a peer that
//!   does not read its answer). The victim comes from the IP holding the most connections, then
//!   is the one inactive the longest, so a flood spread over many addresses evicts its own
//!   members before the single connection of an ordinary client. Only if every candidate's
//!   handler is working is the newcomer refused (its socket closed at once). A per-IP cap
//!   evicts only from that IP.
//! - **Timeouts.** Complete request headers within [`Limits::header_read`] of accept (or of the
//!   first byte after a keep-alive pause), [`Limits::keep_alive`] of silence between requests,
//!   and a request in flight that waits on the peer (for its upload body, or with its answer
//!   blocked on a send queue that does not shrink) for [`Limits::stall`] is closed. A handler that works a long time (hashing a file,
//!   a long poll) is not a stall: only waits on the peer count, and bytes that keep moving reset
//!   them. An upload body must also keep a minimum average rate ([`Limits::min_body_rate`],
//!   after a grace of `header_read`), so one byte just inside every stall timeout does not
//!   hold a connection.
//! - **Accept errors.** `EMFILE`/`ENFILE` (someone else used the descriptors) pause the loop with
//!   a growing back-off and are logged once per episode.
//!
//! Every request carries the extensions [`axum::extract::ConnectInfo<SocketAddr>`] (the peer)
//! and [`LocalAddr`] (the socket's own address).
//!
//! Invariants: a connection is in the table from admission until its task ends or it is evicted
//! (eviction removes it from the table at once, and its task closes the socket at its next
//! poll); `per_ip[ip]` equals the number of table entries with that ip and no entry is zero;
//! the table never holds more than the effective cap. With hyper's HTTP/1.1 a connection has at
//! most one request in flight, from the service call until the response body is dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// The socket's own address (the address the client connected to), set on every request
/// [`serve`] hands to the router, next to `ConnectInfo<SocketAddr>` (the peer's address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddr(pub SocketAddr);

/// The bounds of one service's [`serve`] loop. All durations are wall-clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, at most. The effective cap is also kept below the process's
    /// file limit minus [`Limits::reserve_files`].
    pub max_connections: usize,
    /// Connections open at once from one source IP, at most.
    pub max_per_ip: usize,
    /// Descriptors left for the rest of the process: the effective total cap of all loops in
    /// the process is `RLIMIT_NOFILE (soft) - reserve_files` (at least 16).
    pub reserve_files: usize,
    /// A request's headers must be complete this long after accept, or after the first byte
    /// that follows a keep-alive pause.
    pub header_read: Duration,
    /// A keep-alive connection silent this long between requests is closed.
    pub keep_alive: Duration,
    /// A request in flight that waits this long on the peer (for its upload body, or with the
    /// answer blocked on a full send queue that does not shrink) is closed. Checked about
    /// every quarter of it, so a stall is closed between 1 and 1.25 times this.
    pub stall: Duration,
    /// The slowest upload body accepted, in bytes per second, after a grace of
    /// [`Limits::header_read`] (Apache's `mod_reqtimeout` `MinRate`): a body that has taken `t`
    /// must have brought at least `(t - header_read) * min_body_rate` bytes, or the connection
    /// is closed. Without it a client that sends one body byte just inside every stall timeout
    /// holds its connection for ever.
    pub min_body_rate: u64,
    /// After the shutdown future fires: connections with a request in flight get this long to
    /// finish, then they are cut.
    pub shutdown_grace: Duration,
    /// The largest request head (request line and headers) in bytes; hyper's read buffer
    /// (at least 8 KiB).
    pub max_head: usize,
    /// The listen backlog: connections the kernel queues before accept (clamped by
    /// `net.core.somaxconn`). At least as many as clients that may reconnect at once, else
    /// SYNs are dropped and a connect waits a second for its retransmission.
    pub backlog: u32,
}

impl Default for Limits {
    /// Middle-of-the-road values; prefer the per-service constructors.
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_per_ip: 64,
            reserve_files: 128,
            header_read: Duration::from_secs(10),
            keep_alive: Duration::from_secs(60),
            stall: Duration::from_secs(60),
            min_body_rate: 1024,
            shutdown_grace: Duration::from_secs(5),
            max_head: 64 * 1024,
            backlog: 4096,
        }
    }
}

impl Limits {
    /// The node's HTTP API: local clients (the CLI, scripts, the lab), a few at a time, all
    /// from the same loopback address, so the per-IP cap is most of the total. 512 leaves half
    /// of the usual 1 024 descriptors to the node's peers, store and content files (the
    /// reserve of 256 matters only under lower limits). Headers in 5 s (a local client sends
    /// them at once), 30 s keep-alive (a CLI call is short-lived), 30 s stall.
    pub fn api() -> Self {
        Self {
            max_connections: 512,
            max_per_ip: 256,
            reserve_files: 256,
            header_read: Duration::from_secs(5),
            keep_alive: Duration::from_secs(30),
            stall: Duration::from_secs(30),
            min_body_rate: 1024,
            shutdown_grace: Duration::from_secs(5),
            max_head: 64 * 1024,
            backlog: 4096,
        }
    }

    /// `meshwork server`: many remote clients, each with one follower (long polls of up to
    /// 30 s, between which the connection is idle for moments) and a few transfers. 4 096 in
    /// total (below the file limit anyway), 64 per IP (a household behind one NAT), headers
    /// in 10 s (remote links are slower), 60 s keep-alive, 60 s stall (uploads and downloads
    /// over bad links pause).
    pub fn server() -> Self {
        Self {
            max_connections: 4096,
            max_per_ip: 64,
            reserve_files: 128,
            header_read: Duration::from_secs(10),
            keep_alive: Duration::from_secs(60),
            stall: Duration::from_secs(60),
            min_body_rate: 4096,
            shutdown_grace: Duration::from_secs(5),
            max_head: 64 * 1024,
            backlog: 4096,
        }
    }

    /// `meshwork tracker`: one short request per announce (every interval, per content), so
    /// connections are many and brief: 4 096 in total, 32 per IP, headers in 5 s, 15 s
    /// keep-alive (longer than a client's burst of announces, much shorter than the announce
    /// interval), 15 s stall (answers are small). The tracker holds no files: a reserve of 64.
    pub fn tracker() -> Self {
        Self {
            max_connections: 4096,
            max_per_ip: 32,
            reserve_files: 64,
            header_read: Duration::from_secs(5),
            keep_alive: Duration::from_secs(15),
            stall: Duration::from_secs(15),
            min_body_rate: 1024,
            shutdown_grace: Duration::from_secs(2),
            max_head: 16 * 1024,
            backlog: 4096,
        }
    }
}

/// What a [`serve`] loop has done, for `/metrics` and status pages. Monotonic counts except
/// `open`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections open now (admitted, not yet closed).
    pub open: AtomicU64,
    /// Connections admitted since start.
    pub accepted: AtomicU64,
    /// Newcomers refused (every candidate for eviction had a request in flight).
    pub refused: AtomicU64,
    /// Idle connections closed to make room for a newcomer.
    pub evicted: AtomicU64,
    /// Connections closed by the header-read, keep-alive or stall timeout.
    pub timed_out: AtomicU64,
    /// `accept` failures (descriptors exhausted and the like).
    pub accept_errors: AtomicU64,
}

/// Descriptors held by [`serve`] connections in this process, all loops together (the file
/// limit is per process).
static OPEN_IN_PROCESS: AtomicUsize = AtomicUsize::new(0);

/// The process's soft `RLIMIT_NOFILE`, or `None` where it cannot be read (or is unlimited).
pub fn file_limit() -> Option<u64> {
    // SAFETY: getrlimit writes only into the struct we pass.
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return None;
    }
    // rlim_t is u64 on Linux, not on every unix.
    #[allow(clippy::unnecessary_cast)]
    (r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur as u64)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (what most servers do at start), and
/// returns the soft limit in force afterwards. A failure leaves the limit as it was.
pub fn raise_file_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r = want;
            }
        }
    }
    // rlim_t is u64 on Linux, not on every unix.
    #[allow(clippy::unnecessary_cast)]
    (r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur as u64)
}

/// The descriptors every serve loop of this process may hold together: the file limit less
/// `reserve` (at least 16), or no bound where the limit cannot be read.
fn file_budget(reserve: usize) -> usize {
    file_limit()
        .map(|n| (n as usize).saturating_sub(reserve).max(16))
        .unwrap_or(usize::MAX)
}

/// Serves `app` on `listener` within `limits` until `shutdown` completes, then lets requests
/// in flight finish for [`Limits::shutdown_grace`] and returns. Dropping the future closes
/// every connection at once.
///
/// Errors: none today (accept errors are retried with back-off); the `io::Result` leaves room.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_counted(
        listener,
        app,
        limits,
        Arc::new(Counters::default()),
        shutdown,
    )
    .await
}

/// [`serve`], counting into `counters` (for a service that shows them).
pub async fn serve_counted(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    widen_backlog(&listener, limits.backlog);
    let by_files = file_budget(limits.reserve_files);
    let cap = limits.max_connections.min(by_files).max(1);
    tracing::debug!(%local, cap, per_ip = limits.max_per_ip, "serving");
    let clock = Clock(Instant::now());
    let table = Arc::new(Mutex::new(Table::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut accept_trouble = AcceptTrouble::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                        if let Some(pause) = accept_trouble.failed(&e, local) {
                            tokio::time::sleep(pause).await;
                        }
                        continue;
                    }
                };
                accept_trouble.recovered(local);
                let fd = FdGuard::new();
                let now = clock.now();
                let admitted = table.lock().expect("serve table").admit(
                    peer.ip(),
                    now,
                    cap,
                    limits.max_per_ip,
                    fd.in_process() > by_files,
                );
                let (id, state) = match admitted {
                    Admission::In { id, state, evicted } => {
                        if evicted {
                            counters.evicted.fetch_add(1, Ordering::Relaxed);
                        }
                        (id, state)
                    }
                    Admission::Refused => {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "connection refused: every slot is busy");
                        continue; // drops the stream: closed at once
                    }
                };
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                counters.open.fetch_add(1, Ordering::Relaxed);
                // The connection's own local address, not the listener's: on a wildcard bind
                // (0.0.0.0) it is the address the client dialled, which the Host check needs.
                let conn_local = stream.local_addr().unwrap_or(local);
                let conn = ConnTask {
                    stream,
                    peer,
                    local: conn_local,
                    app: app.clone(),
                    state,
                    limits: limits.clone(),
                    clock,
                    stop: stop_rx.clone(),
                    counters: counters.clone(),
                };
                let table = table.clone();
                let counters = counters.clone();
                tasks.spawn(async move {
                    let _fd = fd;
                    conn.run().await;
                    table.lock().expect("serve table").remove(id);
                    counters.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Idle connections close at once; requests in flight get the grace (each task cuts
    // itself after it), and a little more here before the rest is aborted.
    let _ = tokio::time::timeout(limits.shutdown_grace + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.shutdown().await;
    Ok(())
}

/// Sets the listen backlog to `backlog` (the kernel clamps it to `net.core.somaxconn`).
///
/// `TcpListener::bind` (tokio, mio, std) listens with a backlog of 128. Clients that are
/// evicted or refused reconnect at once, each with one connection waiting in the accept
/// queue; once the queue is full the kernel drops SYNs, and an ordinary client's connect then
/// waits for its retransmission (1 s). Calling listen(2) again on a listening socket changes
/// its backlog on Linux and the BSDs.
fn widen_backlog(listener: &TcpListener, backlog: u32) {
    use std::os::fd::AsRawFd;
    let n = backlog.min(i32::MAX as u32) as i32;
    // SAFETY: listen(2) on a descriptor the listener owns; it touches no memory of ours.
    if unsafe { libc::listen(listener.as_raw_fd(), n) } != 0 {
        tracing::debug!(
            "cannot widen the listen backlog: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Logs accept failures once per episode and says how long to pause.
#[derive(Default)]
struct AcceptTrouble {
    failures: u64,
    pause: Duration,
}

impl AcceptTrouble {
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    const MAX_PAUSE: Duration = Duration::from_secs(1);

    /// `Some(pause)` when the error is about exhausted resources (waiting may help).
    fn failed(&mut self, e: &std::io::Error, local: SocketAddr) -> Option<Duration> {
        let exhausted = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if !exhausted {
            // ECONNABORTED and the like: that one connection is gone, the next may be fine.
            tracing::debug!(%local, "accept failed: {e}");
            return None;
        }
        if self.failures == 0 {
            tracing::warn!(
                %local,
                "accept failed: {e}; pausing and retrying (logged once until it recovers)"
            );
            self.pause = Self::FIRST_PAUSE;
        } else {
            self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
        }
        self.failures += 1;
        Some(self.pause)
    }

    fn recovered(&mut self, local: SocketAddr) {
        if self.failures > 0 {
            tracing::warn!(%local, failures = self.failures, "accept works again");
            self.failures = 0;
        }
    }
}

/// Counts one accepted descriptor in [`OPEN_IN_PROCESS`] for as long as it lives.
struct FdGuard;

impl FdGuard {
    fn new() -> Self {
        OPEN_IN_PROCESS.fetch_add(1, Ordering::Relaxed);
        Self
    }

    /// Descriptors held by serve loops in this process, this one included.
    fn in_process(&self) -> usize {
        OPEN_IN_PROCESS.load(Ordering::Relaxed)
    }
}

impl Drop for FdGuard {
    fn drop(&mut self) {
        OPEN_IN_PROCESS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sets a [`Clock`] time that is still unset (0) to `now`; a set one keeps its first value.
fn set_once(at: &AtomicU64, now: u64) {
    let _ = at.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
}

/// Milliseconds since the loop started, plus one, so that 0 can mean "not set".
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> u64 {
        self.0.elapsed().as_millis() as u64 + 1
    }

    fn instant(&self, ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.0 + Duration::from_millis(ms.saturating_sub(1)))
    }
}

/// One connection's state, shared by its task, its IO and body wrappers and the table.
/// Times are [`Clock`] milliseconds, 0 = unset.
#[derive(Default)]
struct ConnState {
    /// A request is in flight (service called, response body not yet dropped).
    in_flight: AtomicBool,
    /// At least one response was finished on this connection.
    served: AtomicBool,
    /// Accept, or the end of the last response.
    idle_since: AtomicU64,
    /// The first byte read while idle (a request's head arriving).
    head_started: AtomicU64,
    /// Since when a write waits for the peer to drain its buffer (reset while the kernel's
    /// send queue shrinks: the peer is reading, the kernel just wakes writers late).
    write_blocked: AtomicU64,
    /// The kernel's send queue (bytes unsent or unacknowledged) at the last look, or
    /// `u64::MAX`.
    send_queue: AtomicU64,
    /// Since when the handler waits for the peer's upload body.
    body_wait: AtomicU64,
    /// When the handler first asked for the current request's body (0: not yet), and the
    /// bytes of it received since: the minimum-rate rule's clock.
    body_started: AtomicU64,
    body_bytes: AtomicU64,
    /// Set by eviction; the task closes the connection when notified.
    evict: tokio::sync::Notify,
}

/// Why a connection's timer closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    HeaderRead,
    KeepAlive,
    Stall,
}

impl ConnState {
    fn new(now: u64) -> Self {
        let s = Self::default();
        s.idle_since.store(now, Ordering::Relaxed);
        s.send_queue.store(u64::MAX, Ordering::Relaxed);
        s
    }

    /// Notes the kernel's send queue: while a write waits, a queue that shrank since the last
    /// look means the peer reads (Linux wakes a writer only once a third of the buffer is
    /// free, which at a slow but steady reader can take longer than the stall timeout).
    fn note_send_queue(&self, now: u64, queue: Option<u64>) {
        let Some(q) = queue else { return };
        let before = self.send_queue.swap(q, Ordering::Relaxed);
        if q < before && self.write_blocked.load(Ordering::Relaxed) != 0 {
            self.write_blocked.store(now, Ordering::Relaxed);
        }
    }

    /// No request in flight and no answer still waiting to be written: an eviction candidate.
    /// (hyper drops a response body once it has polled all of it, which can be long before
    /// its last bytes are written.)
    fn idle(&self) -> bool {
        !self.in_flight.load(Ordering::Relaxed) && self.write_blocked.load(Ordering::Relaxed) == 0
    }

    /// Since when the connection waits on its peer (its upload body, or reading the answer),
    /// or `None` if it does not: the second choice of eviction, after idle connections.
    fn waiting_on_peer(&self) -> Option<u64> {
        [&self.body_wait, &self.write_blocked]
            .into_iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|t| *t != 0)
            .min()
    }

    fn begin_request(&self) {
        self.in_flight.store(true, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
    }

    fn end_request(&self, now: u64) {
        self.idle_since.store(now, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        self.body_wait.store(0, Ordering::Relaxed);
        self.body_started.store(0, Ordering::Relaxed);
        self.body_bytes.store(0, Ordering::Relaxed);
        // `write_blocked` stays: the end of the answer may still be waiting to go out.
        self.served.store(true, Ordering::Relaxed);
        self.in_flight.store(false, Ordering::Relaxed);
    }

    /// `Err` when a timeout has expired at `now`, else when to look again.
    fn check(&self, now: u64, l: &Limits) -> Result<u64, Expired> {
        let ms = |d: Duration| d.as_millis() as u64;
        if !self.idle() {
            let stall = ms(l.stall);
            for since in [&self.write_blocked, &self.body_wait] {
                let since = since.load(Ordering::Relaxed);
                if since != 0 && now.saturating_sub(since) >= stall {
                    return Err(Expired::Stall);
                }
            }
            // The minimum body rate: what a body brought must keep up with its age (after a
            // grace), however often single bytes arrive.
            let started = self.body_started.load(Ordering::Relaxed);
            if started != 0 && self.body_wait.load(Ordering::Relaxed) != 0 && l.min_body_rate > 0 {
                let owed = now
                    .saturating_sub(started)
                    .saturating_sub(ms(l.header_read))
                    .saturating_mul(l.min_body_rate)
                    / 1000;
                if self.body_bytes.load(Ordering::Relaxed) < owed {
                    return Err(Expired::Stall);
                }
            }
            // The request may end (and the keep-alive clock start) at any moment.
            return Ok(now + (stall / 4).min(ms(l.header_read)).max(10));
        }
        let idle_since = self.idle_since.load(Ordering::Relaxed);
        let head = self.head_started.load(Ordering::Relaxed);
        let (deadline, why) = if !self.served.load(Ordering::Relaxed) {
            (idle_since + ms(l.header_read), Expired::HeaderRead)
        } else if head == 0 {
            (idle_since + ms(l.keep_alive), Expired::KeepAlive)
        } else {
            (head + ms(l.header_read), Expired::HeaderRead)
        };
        if now >= deadline {
            return Err(why);
        }
        // A head may start arriving before the deadline and bring it closer: look again
        // within a header-read period.
        Ok(deadline.min(now + ms(l.header_read)))
    }
}

/// The connections of one loop.
#[derive(Default)]
struct Table {
    conns: HashMap<u64, (IpAddr, Arc<ConnState>)>,
    per_ip: HashMap<IpAddr, usize>,
    next_id: u64,
}

enum Admission {
    In {
        id: u64,
        state: Arc<ConnState>,
        evicted: bool,
    },
    Refused,
}

impl Table {
    /// Admits a newcomer from `ip`, evicting an idle connection if a cap is reached
    /// (`files_short`: the process-wide descriptor budget is spent).
    fn admit(
        &mut self,
        ip: IpAddr,
        now: u64,
        cap: usize,
        per_ip_cap: usize,
        files_short: bool,
    ) -> Admission {
        let mut evicted = false;
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= per_ip_cap {
            match self.victim(Some(ip)) {
                Some(v) => self.evict(v),
                None => return Admission::Refused,
            }
            evicted = true;
        } else if self.conns.len() >= cap || files_short {
            match self.victim(None) {
                Some(v) => self.evict(v),
                None => return Admission::Refused,
            }
            evicted = true;
        }
        let id = self.next_id;
        self.next_id += 1;
        let state = Arc::new(ConnState::new(now));
        self.conns.insert(id, (ip, state.clone()));
        *self.per_ip.entry(ip).or_insert(0) += 1;
        Admission::In { id, state, evicted }
    }

    /// The connection to evict: from `only` if given, else from the IP holding the most
    /// connections; among those, the one inactive the longest: idle (no request in flight,
    /// since its accept or its last answer) or waiting on its peer (its upload body, or the
    /// peer reading the answer: a slow upload or a reader that does not read holds no work of
    /// ours, and a flood of them must not lock newcomers out). A connection whose handler works
    /// is never chosen. `None` if every candidate works. The crowd comes first, so a client's
    /// single fresh connection is not taken while a flood's address holds several.
    fn victim(&self, only: Option<IpAddr>) -> Option<u64> {
        self.conns
            .iter()
            .filter(|(_, (ip, _))| only.is_none_or(|o| o == *ip))
            .filter_map(|(id, (ip, s))| {
                let since = if s.idle() {
                    s.idle_since.load(Ordering::Relaxed)
                } else {
                    s.waiting_on_peer()?
                };
                let crowd = self.per_ip.get(ip).copied().unwrap_or(0);
                Some((id, crowd, since))
            })
            // Most connections from its IP first, then inactive longest, then oldest id.
            .max_by_key(|(id, crowd, since)| {
                (*crowd, std::cmp::Reverse(*since), std::cmp::Reverse(**id))
            })
            .map(|(id, _, _)| *id)
    }

    fn evict(&mut self, id: u64) {
        if let Some((_, s)) = self.conns.get(&id) {
            s.evict.notify_one();
        }
        self.remove(id);
    }

    fn remove(&mut self, id: u64) {
        let Some((ip, _)) = self.conns.remove(&id) else {
            return; // evicted earlier
        };
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

/// Everything one connection's task needs.
struct ConnTask {
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    app: axum::Router,
    state: Arc<ConnState>,
    limits: Limits,
    clock: Clock,
    stop: tokio::sync::watch::Receiver<bool>,
    counters: Arc<Counters>,
}

impl ConnTask {
    async fn run(self) {
        let Self {
            stream,
            peer,
            local,
            app,
            state,
            limits,
            clock,
            mut stop,
            counters,
        } = self;
        let _ = stream.set_nodelay(true);
        // Valid while `conn` (which owns the stream) lives, that is, for this whole function.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let io = TokioIo::new(Tracked {
            inner: stream,
            state: state.clone(),
            clock,
        });
        let svc_state = state.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let state = svc_state.clone();
            state.begin_request();
            let (mut parts, body) = req.into_parts();
            parts.extensions.insert(ConnectInfo(peer));
            parts.extensions.insert(LocalAddr(local));
            let body = Body::new(Upload {
                inner: body,
                state: state.clone(),
                clock,
            });
            let fut = app.clone().oneshot(hyper::Request::from_parts(parts, body));
            async move {
                let resp = match fut.await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(resp.map(|b| {
                    Body::new(Answer {
                        inner: b,
                        state,
                        clock,
                    })
                }))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .keep_alive(true)
            .max_buf_size(limits.max_head.max(8192));
        let conn = builder.serve_connection(io, svc);
        tokio::pin!(conn);
        let mut next = clock.now() + (limits.header_read.as_millis() as u64);
        let mut grace_end: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::trace!(%peer, "connection ended: {e}");
                    }
                    return;
                }
                _ = state.evict.notified() => {
                    tracing::trace!(%peer, "connection evicted");
                    return;
                }
                _ = stop.wait_for(|s| *s), if grace_end.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    grace_end = Some(tokio::time::Instant::now() + limits.shutdown_grace);
                }
                _ = tokio::time::sleep_until(grace_end.unwrap_or_else(tokio::time::Instant::now)),
                    if grace_end.is_some() => return,
                _ = tokio::time::sleep_until(clock.instant(next)) => {
                    let now = clock.now();
                    if state.write_blocked.load(Ordering::Relaxed) != 0 {
                        state.note_send_queue(now, send_queue(fd));
                    }
                    match state.check(now, &limits) {
                        Ok(at) => next = at,
                        Err(why) => {
                            counters.timed_out.fetch_add(1, Ordering::Relaxed);
                            tracing::trace!(%peer, ?why, "connection timed out");
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// The bytes in `fd`'s send queue (unsent or not yet acknowledged), where the system says.
#[cfg(target_os = "linux")]
fn send_queue(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer; `fd` is a TCP socket
    // that stays open for the call.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (r == 0 && n >= 0).then_some(n as u64)
}

#[cfg(not(target_os = "linux"))]
fn send_queue(_fd: std::os::fd::RawFd) -> Option<u64> {
    None
}

/// The socket, noting when a request head starts arriving and when writes wait on the peer.
struct Tracked {
    inner: TcpStream,
    state: Arc<ConnState>,
    clock: Clock,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before && self.state.idle() {
            let now = self.clock.now();
            set_once(&self.state.head_started, now);
        }
        r
    }
}

impl Tracked {
    fn note_write<T>(&self, r: &Poll<std::io::Result<T>>) {
        match r {
            Poll::Pending => {
                let now = self.clock.now();
                set_once(&self.state.write_blocked, now);
            }
            Poll::Ready(_) => {
                let was = self.state.write_blocked.swap(0, Ordering::Relaxed);
                if was != 0 && !self.state.in_flight.load(Ordering::Relaxed) {
                    // The rest of an answer went out: the keep-alive pause starts now.
                    self.state
                        .idle_since
                        .store(self.clock.now(), Ordering::Relaxed);
                }
            }
        }
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note_write(&r);
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The request body as the handler reads it, noting when the handler waits for the peer.
struct Upload {
    inner: Incoming,
    state: Arc<ConnState>,
    clock: Clock,
}

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let now = self.clock.now();
        set_once(&self.state.body_started, now);
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.state
                    .body_bytes
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        if r.is_pending() {
            set_once(&self.state.body_wait, now);
        } else {
            self.state.body_wait.store(0, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // The handler no longer waits for it.
        self.state.body_wait.store(0, Ordering::Relaxed);
    }
}

/// The response body; dropping it (hyper has sent it, or the connection ended) ends the
/// request in flight.
struct Answer {
    inner: Body,
    state: Arc<ConnState>,
    clock: Clock,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.state.end_request(self.clock.now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read: Duration::from_millis(100),
            keep_alive: Duration::from_millis(300),
            stall: Duration::from_millis(200),
            ..Limits::default()
        }
    }

    #[test]
    fn timers_follow_the_connection_state() {
        let l = limits();
        let s = ConnState::new(1);
        assert!(s.check(50, &l).is_ok());
        assert_eq!(s.check(101, &l), Err(Expired::HeaderRead));
        s.begin_request();
        assert!(s.check(10_000, &l).is_ok(), "a busy handler is not a stall");
        s.write_blocked.store(10_000, Ordering::Relaxed);
        assert!(s.check(10_150, &l).is_ok());
        assert_eq!(s.check(10_200, &l), Err(Expired::Stall));
        // hyper dropped the body, but its end still waits to be written: busy, and a stall.
        s.end_request(10_100);
        assert!(!s.idle());
        assert_eq!(s.check(10_200, &l), Err(Expired::Stall));
        s.write_blocked.store(0, Ordering::Relaxed); // written
        s.end_request(20_000);
        assert!(s.check(20_250, &l).is_ok(), "keep-alive, not header-read");
        assert_eq!(s.check(20_300, &l), Err(Expired::KeepAlive));
        s.head_started.store(20_050, Ordering::Relaxed);
        assert_eq!(s.check(20_150, &l), Err(Expired::HeaderRead));
    }

    #[test]
    fn eviction_takes_from_the_crowd_then_the_longest_idle_and_spares_the_busy() {
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let me: IpAddr = "127.0.0.1".parse().unwrap();
        let mut t = Table::default();
        let id = |x: Admission| match x {
            Admission::In { id, .. } => id,
            Admission::Refused => panic!("refused"),
        };
        let mine = id(t.admit(me, 1, 4, 3, false)); // the oldest idle, but alone on its IP
        let a1 = id(t.admit(a, 2, 4, 3, false));
        let _a2 = id(t.admit(a, 3, 4, 3, false));
        let _b1 = id(t.admit(b, 4, 4, 3, false));
        // Full: the newcomer evicts a's longest idle, not the older single connection.
        assert!(matches!(
            t.admit(b, 5, 4, 3, false),
            Admission::In { evicted: true, .. }
        ));
        assert!(!t.conns.contains_key(&a1) && t.conns.contains_key(&mine));
        assert_eq!(t.conns.len(), 4);
        // Every connection busy: refused.
        for (_, s) in t.conns.values() {
            s.begin_request();
        }
        assert!(matches!(t.admit(me, 6, 4, 3, false), Admission::Refused));
        // Per-IP cap: only that IP's idle connections are candidates.
        let mut t = Table::default();
        let busy = id(t.admit(a, 1, 10, 2, false));
        t.conns[&busy].1.begin_request();
        let idle_b = id(t.admit(b, 2, 10, 2, false));
        let _a2 = id(t.admit(a, 3, 10, 2, false));
        assert!(matches!(
            t.admit(a, 4, 10, 2, false),
            Admission::In { evicted: true, .. }
        ));
        assert!(t.conns.contains_key(&idle_b) && t.conns.contains_key(&busy));
        assert_eq!(t.per_ip[&a], 2);
        let last = t.conns.iter().find(|(_, (ip, s))| *ip == a && s.idle());
        t.conns[last.map(|(i, _)| i).unwrap()].1.begin_request();
        assert!(matches!(t.admit(a, 5, 10, 2, false), Admission::Refused));
        assert_eq!(t.per_ip[&a], 2);
    }

    /// A body that dribbles (one byte just inside every stall timeout) is closed once what it
    /// brought falls behind the minimum rate; a body that keeps up is not.
    #[test]
    fn a_body_below_the_minimum_rate_is_closed_however_often_it_dribbles() {
        let l = Limits {
            stall: Duration::from_secs(1000),
            min_body_rate: 1000, // bytes per second: one per millisecond
            ..limits()
        };
        let s = ConnState::new(1);
        s.begin_request();
        s.body_started.store(1_000, Ordering::Relaxed);
        s.body_wait.store(1_000, Ordering::Relaxed);
        // Within the grace (header_read, 100 ms) nothing is owed.
        assert!(s.check(1_100, &l).is_ok());
        // 500 ms in: 400 bytes owed. 399 is too few, 400 enough.
        s.body_bytes.store(399, Ordering::Relaxed);
        assert_eq!(s.check(1_500, &l), Err(Expired::Stall));
        s.body_bytes.store(400, Ordering::Relaxed);
        assert!(s.check(1_500, &l).is_ok());
        // A handler that is not waiting for the body (it works on what came) owes nothing.
        s.body_wait.store(0, Ordering::Relaxed);
        assert!(s.check(100_000, &l).is_ok());
        // The next request starts a new clock.
        s.end_request(100_000);
        assert_eq!(s.body_started.load(Ordering::Relaxed), 0);
    }

    /// With no idle connection, a newcomer evicts one that waits on its peer (a slow upload or
    /// a reader that does not read), from the most crowded IP, before it is refused; a
    /// connection whose handler works is never evicted.
    #[test]
    fn without_idle_connections_one_waiting_on_its_peer_is_evicted() {
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let me: IpAddr = "127.0.0.1".parse().unwrap();
        let mut t = Table::default();
        let id = |x: Admission| match x {
            Admission::In { id, .. } => id,
            Admission::Refused => panic!("refused"),
        };
        let working = id(t.admit(me, 1, 3, 3, false));
        let slow1 = id(t.admit(a, 2, 3, 3, false));
        let slow2 = id(t.admit(a, 3, 3, 3, false));
        for c in [working, slow1, slow2] {
            t.conns[&c].1.begin_request();
        }
        t.conns[&slow1].1.body_wait.store(10, Ordering::Relaxed);
        t.conns[&slow2].1.write_blocked.store(20, Ordering::Relaxed);
        assert!(matches!(
            t.admit(me, 30, 3, 3, false),
            Admission::In { evicted: true, .. }
        ));
        assert!(
            !t.conns.contains_key(&slow1),
            "the longest waiting on its peer"
        );
        assert!(t.conns.contains_key(&working) && t.conns.contains_key(&slow2));
        // Only working connections left to choose from (besides the newcomer, now working):
        t.conns[&slow2].1.write_blocked.store(0, Ordering::Relaxed);
        for (_, s) in t.conns.values() {
            s.begin_request();
        }
        assert!(matches!(t.admit(me, 40, 3, 3, false), Admission::Refused));
    }
}
