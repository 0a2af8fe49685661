//! The ledger's own thread, and the miner's.
//!
//! The ledger does CPU work (signature batches, block imports of thousands of transfers) and
//! synchronous disk writes (redb commits). None of it may stall the network event loop, so one
//! OS thread owns the [`Ledger`] and takes [`Job`]s from a bounded channel; results come back
//! to the event loop as [`LedgerEvent`]s on another bounded channel. The event loop never
//! waits on the ledger: it `try_send`s, and a full queue means "ignore this gossip message"
//! (gossipsub then neither forwards it nor penalizes anyone) or "busy" to a sync request.
//!
//! Gossiped transfers are verified in batches: the thread drains every transfer job already
//! queued (up to [`TX_BATCH`]) and checks their signatures in one batch verification.
//!
//! The miner is a second thread. It asks the ledger for a template, searches nonces in slices
//! of [`MINER_SLICE`], and between slices checks whether the tip moved (start over on the new
//! tip) or the mempool changed (rebuild after a second, to include new transfers).
//!
//! # Storage errors
//! A storage error (a full disk, an I/O error) stops the store: redb refuses every transaction
//! after one until the database is closed and opened again. The ledger then refuses blocks,
//! transfers and templates with the error (never taking it for an invalid block), the node
//! reports itself unhealthy ([`Generations::store_fault`]: `status`, `GET /api/v1/health`),
//! the miner pauses, and this thread logs the reason once and reopens the store with backoff
//! ([`StoreRetry`]). Once a reopen works the node is healthy again and a paused miner resumes.
//!
//! # Re-announcing transfers
//! The node's own pending transfers and those a reorganization returned are announced again
//! ([`Job::Rebroadcast`], sent by the event loop every [`RebroadcastConfig::round`]) until they
//! leave the mempool, with the waits of [`meshwork_ledger::Ledger::due_rebroadcasts`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::gossipsub::{MessageAcceptance, MessageId};
use libp2p::PeerId;
use meshwork_ledger::{
    Address, Block, BlockError, BlockOutcome, Hash, Header, Ledger, SignedTransfer, TxError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::chainsync::{ChainStatus, SyncResponse, MAX_BLOCKS_PER_REQUEST, MAX_HEADERS};

pub const JOB_CAPACITY: usize = 1024;
pub const EVENT_CAPACITY: usize = 1024;
pub const TX_BATCH: usize = 128;
const MINER_SLICE: u64 = 20_000;

pub type Query = Box<dyn FnOnce(&mut Ledger) + Send>;

pub enum Job {
    GossipTx {
        id: MessageId,
        source: PeerId,
        bytes: Vec<u8>,
    },
    GossipBlock {
        id: MessageId,
        source: PeerId,
        bytes: Vec<u8>,
    },
    /// A transfer from this node's API: on success it is published.
    Submit(SignedTransfer, oneshot::Sender<Result<Hash, TxError>>),
    Mined(Block),
    /// A headers answer from `peer` to check.
    Headers {
        peer: PeerId,
        headers: Vec<Header>,
    },
    /// A block batch from `peer`.
    Blocks {
        peer: PeerId,
        blocks: Vec<Vec<u8>>,
    },
    ServeHeaders {
        key: u64,
        locator: Vec<Hash>,
        max: usize,
    },
    ServeBlocks {
        key: u64,
        hashes: Vec<Hash>,
    },
    Query(Query),
    /// Announce the tracked transfers that are due again (see the module docs).
    Rebroadcast,
    Stop,
}

/// The most transfers announced again in one round.
pub const MAX_REBROADCAST_PER_ROUND: usize = 256;

/// When pending transfers are announced again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebroadcastConfig {
    /// How often the due ones are looked for.
    pub round: Duration,
    /// The wait before a transfer's first re-announcement. It must exceed gossipsub's seen
    /// TTL ([`crate::config::NodeConfig::gossip_seen_ttl`]): gossipsub refuses to publish a
    /// message id it has seen within that time, and ids are the hash of the payload.
    pub initial: Duration,
    /// The longest wait between two announcements (the wait doubles up to it).
    pub max: Duration,
}

impl Default for RebroadcastConfig {
    fn default() -> Self {
        Self {
            round: Duration::from_secs(5),
            initial: Duration::from_millis(meshwork_ledger::ledger::REBROADCAST_INITIAL_MS),
            max: Duration::from_millis(meshwork_ledger::ledger::REBROADCAST_MAX_MS),
        }
    }
}

/// How the chain store is reopened after a storage error: tried at once, then after
/// `initial`, doubling up to `max`; and only while the disk of the data directory has
/// `min_free_bytes` free. A full disk still takes writes that land in pages the file already
/// holds, so without that bar a reopen would succeed at once and the next commit fail again:
/// the node would flap between healthy and not several times a second.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreRetry {
    /// The wait after the first (immediate) failed attempt.
    pub initial: Duration,
    /// The longest wait between two attempts.
    pub max: Duration,
    /// Free bytes the data directory's disk must have before an attempt (0: no bar).
    pub min_free_bytes: u64,
}

impl Default for StoreRetry {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            min_free_bytes: 8 << 20,
        }
    }
}

/// After a recovery, a new fault within this time is logged at debug level only: an
/// intermittent disk says why once, not at every flap.
const QUIET_AFTER_RECOVERY: Duration = Duration::from_secs(60);

/// Free bytes for an unprivileged writer on the file system holding `dir`, if known.
#[cfg(unix)]
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized, writable struct;
    // statvfs only writes into it.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
}

#[cfg(not(unix))]
fn free_bytes(_dir: &std::path::Path) -> Option<u64> {
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topic {
    Tx,
    Block,
}

pub enum LedgerEvent {
    Verdict {
        id: MessageId,
        topic: Topic,
        source: PeerId,
        acceptance: MessageAcceptance,
        /// Why the message was rejected, when the sender is to blame.
        offence: Option<String>,
    },
    Publish(Topic, Vec<u8>),
    /// A pending transfer announced again (published, but not a new arrival: the lab's
    /// "first published" times stay the first).
    Republish(Vec<u8>),
    Tip(ChainStatus, Vec<Hash>),
    Orphan(PeerId),
    Headers {
        peer: PeerId,
        missing: Vec<Hash>,
        last: Option<Hash>,
        full: bool,
        offence: Option<String>,
    },
    Blocks {
        peer: PeerId,
        received: HashSet<Hash>,
        offence: Option<String>,
    },
    Serve(u64, SyncResponse),
}

/// Shared state the miner, the event loop and the API read without asking the ledger thread.
#[derive(Default)]
pub struct Generations {
    pub tip: AtomicU64,
    pub mempool: AtomicU64,
    /// Set while the chain store is stopped by a storage error (mirrors `fault`).
    unhealthy: AtomicBool,
    fault: Mutex<Option<String>>,
}

impl Generations {
    /// Why the chain store is stopped, while it is: the node is then unhealthy, does not mine
    /// and refuses transfers.
    pub fn store_fault(&self) -> Option<String> {
        self.fault
            .lock()
            .map(|f| f.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Whether the chain store is usable (no storage fault since the last reopen).
    pub fn is_healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::SeqCst)
    }

    fn set_fault(&self, fault: Option<String>) {
        let unhealthy = fault.is_some();
        match self.fault.lock() {
            Ok(mut f) => *f = fault,
            Err(p) => *p.into_inner() = fault,
        }
        self.unhealthy.store(unhealthy, Ordering::SeqCst);
    }
}

pub fn status_of(ledger: &Ledger) -> ChainStatus {
    let tip = ledger.tip();
    ChainStatus {
        chain_id: ledger.chain().chain_id(),
        height: tip.height,
        tip: tip.hash,
        work: tip.work,
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Worker {
    ledger: Ledger,
    events: mpsc::Sender<LedgerEvent>,
    gens: Arc<Generations>,
    last_tip: Hash,
    retry: StoreRetry,
    /// The directory of the chain store (for its free space); `None` in memory.
    store_dir: Option<std::path::PathBuf>,
    /// While the store is stopped: when to try reopening it next, and the wait after that.
    reopen_at: Option<(Instant, Duration)>,
    /// Until when a new fault is logged quietly (see [`QUIET_AFTER_RECOVERY`]).
    quiet_until: Option<Instant>,
}

impl Worker {
    fn emit(&self, ev: LedgerEvent) {
        // Blocks only while the event loop is behind; it never waits on us, so this cannot
        // deadlock. An error means the node is stopping.
        let _ = self.events.blocking_send(ev);
    }

    /// After anything that may move the tip: tell the event loop and the miner.
    fn after_import(&mut self) {
        let changes = self.ledger.take_changes();
        for c in changes.iter().filter(|c| c.disconnected > 0) {
            tracing::info!(
                "reorganization: {} blocks disconnected, {} connected, {} transfers back in the mempool",
                c.disconnected,
                c.connected,
                c.returned
            );
        }
        let tip = self.ledger.tip();
        if tip.hash != self.last_tip {
            self.last_tip = tip.hash;
            self.gens.tip.fetch_add(1, Ordering::Relaxed);
            self.emit(LedgerEvent::Tip(
                status_of(&self.ledger),
                self.ledger.chain().locator(),
            ));
        }
        self.gens
            .mempool
            .store(self.ledger.mempool().generation(), Ordering::Relaxed);
    }

    fn gossip_txs(&mut self, batch: Vec<(MessageId, PeerId, Vec<u8>)>) {
        let mut decoded = vec![];
        for (id, source, bytes) in batch {
            match SignedTransfer::decode(&bytes) {
                Ok(t) => decoded.push((id, source, t)),
                Err(e) => self.emit(LedgerEvent::Verdict {
                    id,
                    topic: Topic::Tx,
                    source,
                    acceptance: MessageAcceptance::Reject,
                    offence: Some(format!("malformed transaction: {e}")),
                }),
            }
        }
        let txs: Vec<SignedTransfer> = decoded.iter().map(|(_, _, t)| *t).collect();
        let results = self.ledger.submit_many(txs);
        for ((id, source, _), r) in decoded.into_iter().zip(results) {
            let (acceptance, offence) = match r {
                Ok(_) => (MessageAcceptance::Accept, None),
                Err(e) if e.punishable() => (
                    MessageAcceptance::Reject,
                    Some(format!("invalid transaction: {e}")),
                ),
                // Duplicates, stale nonces, a full pool: not the sender's fault, not forwarded.
                Err(_) => (MessageAcceptance::Ignore, None),
            };
            self.emit(LedgerEvent::Verdict {
                id,
                topic: Topic::Tx,
                source,
                acceptance,
                offence,
            });
        }
        self.after_import();
    }

    /// After every job: notices a new storage fault (logged once, the node turns unhealthy)
    /// and, while the store is stopped, tries to reopen it when the backoff says so.
    fn check_store(&mut self) {
        let Some(fault) = self.ledger.store_fault().cloned() else {
            return;
        };
        let now = Instant::now();
        match self.reopen_at {
            None => {
                let reason = format!(
                    "chain store: {fault}; not mining and refusing transfers until it is \
                     reopened (retrying with backoff, once the disk has {} MiB free)",
                    self.retry.min_free_bytes >> 20
                );
                if self.quiet_until.is_some_and(|t| now < t) {
                    tracing::debug!("{reason}");
                } else {
                    tracing::error!("{reason}");
                    self.quiet_until = None;
                }
                self.gens.set_fault(Some(reason));
                // The first attempt at once: redb needs the database closed and reopened.
                self.reopen_at = Some((now, self.retry.initial));
                self.check_store();
            }
            Some((at, _)) if now < at => {}
            Some((_, wait))
                if self
                    .store_dir
                    .as_deref()
                    .and_then(free_bytes)
                    .is_some_and(|free| free < self.retry.min_free_bytes) =>
            {
                tracing::debug!("chain store: the disk is still full; next look in {wait:?}");
                self.reopen_at = Some((now + wait, (wait * 2).min(self.retry.max)));
            }
            Some((_, wait)) => match self.ledger.reopen() {
                Ok(()) => {
                    if self.quiet_until.is_none() {
                        tracing::info!(
                            "chain store reopened: healthy again (it failed with: {fault})"
                        );
                    } else {
                        tracing::debug!("chain store reopened again");
                    }
                    self.quiet_until = Some(now + QUIET_AFTER_RECOVERY);
                    self.reopen_at = None;
                    self.gens.set_fault(None);
                    self.after_import();
                }
                Err(e) => {
                    tracing::debug!("chain store not reopened yet: {e}; next try in {wait:?}");
                    if e.is_damage() {
                        let reason = format!(
                            "chain store: {e}; not mining and refusing transfers. To recover, \
                             stop the node, move chain.redb aside and start again: the chain \
                             is synced from peers"
                        );
                        if self.gens.store_fault().as_deref() != Some(reason.as_str()) {
                            tracing::error!("{reason}");
                            self.gens.set_fault(Some(reason));
                        }
                    }
                    self.reopen_at = Some((now + wait, (wait * 2).min(self.retry.max)));
                }
            },
        }
    }

    /// The next job; while the store is stopped, wakes up for the next reopen attempt too.
    /// `None` when every sender is gone.
    fn next_job(&mut self, jobs: &mut mpsc::Receiver<Job>) -> Option<Job> {
        loop {
            let Some((at, _)) = self.reopen_at else {
                return jobs.blocking_recv();
            };
            match jobs.try_recv() {
                Ok(job) => return Some(job),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= at {
                self.check_store();
                continue;
            }
            // The channel cannot be waited on with a deadline from a plain thread: poll it,
            // only while the store is stopped.
            std::thread::sleep((at - now).min(Duration::from_millis(20)));
        }
    }

    fn import(&mut self, block: Block) -> Result<BlockOutcome, BlockError> {
        let r = self.ledger.import(block, now_ms());
        self.after_import();
        r
    }

    fn gossip_block(&mut self, id: MessageId, source: PeerId, bytes: Vec<u8>) {
        let max = self.ledger.chain().spec().max_block_bytes;
        let (acceptance, offence) = match Block::decode(&bytes, max) {
            Err(e) => (
                MessageAcceptance::Reject,
                Some(format!("malformed block: {e}")),
            ),
            Ok(block) => match self.import(block) {
                Ok(BlockOutcome::Stored { .. }) => (MessageAcceptance::Accept, None),
                Ok(BlockOutcome::Duplicate) => (MessageAcceptance::Ignore, None),
                Ok(BlockOutcome::Orphan { .. }) => {
                    self.emit(LedgerEvent::Orphan(source));
                    (MessageAcceptance::Ignore, None)
                }
                Err(e) if e.punishable() => (
                    MessageAcceptance::Reject,
                    Some(format!("invalid block: {e}")),
                ),
                Err(_) => (MessageAcceptance::Ignore, None),
            },
        };
        self.emit(LedgerEvent::Verdict {
            id,
            topic: Topic::Block,
            source,
            acceptance,
            offence,
        });
    }

    /// Checks that headers link from a block we hold and carry their proof of work; returns
    /// the hashes we lack.
    fn check_headers(&mut self, peer: PeerId, headers: Vec<Header>) {
        let chain = self.ledger.chain();
        let min = chain.spec().min_difficulty;
        let mut missing = vec![];
        let mut offence = None;
        let mut prev: Option<(Hash, u64)> = None;
        for h in &headers {
            let linked = match prev {
                Some((p, height)) => h.prev == p && h.height == height + 1,
                None => chain
                    .header(&h.prev)
                    .is_some_and(|p| p.height + 1 == h.height),
            };
            if !linked {
                offence = Some("headers that do not link".to_string());
                break;
            }
            if h.target < min || !h.meets_target() {
                offence = Some("a header without its proof of work".to_string());
                break;
            }
            let hash = h.hash();
            if chain.is_invalid(&hash) {
                offence = Some("headers of an invalid chain".to_string());
                break;
            }
            if !chain.contains(&hash) {
                missing.push(hash);
            }
            prev = Some((hash, h.height));
        }
        let full = offence.is_none() && headers.len() >= MAX_HEADERS;
        self.emit(LedgerEvent::Headers {
            peer,
            missing,
            last: prev.map(|(h, _)| h),
            full,
            offence,
        });
    }

    fn sync_blocks(&mut self, peer: PeerId, blocks: Vec<Vec<u8>>) {
        let max = self.ledger.chain().spec().max_block_bytes;
        let mut received = HashSet::new();
        let mut offence = None;
        for bytes in blocks.into_iter().take(MAX_BLOCKS_PER_REQUEST) {
            let block = match Block::decode(&bytes, max) {
                Ok(b) => b,
                Err(e) => {
                    offence = Some(format!("malformed block: {e}"));
                    break;
                }
            };
            let hash = block.hash();
            let r = self.ledger.import(block, now_ms());
            match r {
                Ok(_) => {
                    received.insert(hash);
                }
                Err(e) if e.punishable() => {
                    offence = Some(format!("invalid block {}: {e}", hash.short()));
                    break;
                }
                Err(e) => tracing::debug!("sync block {} not taken: {e}", hash.short()),
            }
        }
        self.after_import();
        self.emit(LedgerEvent::Blocks {
            peer,
            received,
            offence,
        });
    }

    fn serve_headers(&self, key: u64, locator: Vec<Hash>, max: usize) {
        let headers = self
            .ledger
            .chain()
            .headers_after(&locator, max.min(MAX_HEADERS));
        self.emit(LedgerEvent::Serve(key, SyncResponse::Headers(headers)));
    }

    fn serve_blocks(&self, key: u64, hashes: Vec<Hash>) {
        let chain = self.ledger.chain();
        let blocks = hashes
            .iter()
            .take(MAX_BLOCKS_PER_REQUEST)
            .filter_map(|h| chain.block_bytes(h).ok().flatten())
            .collect();
        self.emit(LedgerEvent::Serve(key, SyncResponse::Blocks(blocks)));
    }

    fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut held: Option<Job> = None;
        loop {
            let job = match held.take() {
                Some(job) => job,
                None => match self.next_job(&mut jobs) {
                    Some(job) => job,
                    None => return,
                },
            };
            if matches!(job, Job::Stop) {
                return;
            }
            self.run_job(job, &mut jobs, &mut held);
            self.check_store();
        }
    }

    fn run_job(&mut self, job: Job, jobs: &mut mpsc::Receiver<Job>, held: &mut Option<Job>) {
        match job {
            Job::GossipTx { id, source, bytes } => {
                let mut batch = vec![(id, source, bytes)];
                while batch.len() < TX_BATCH {
                    match jobs.try_recv() {
                        Ok(Job::GossipTx { id, source, bytes }) => batch.push((id, source, bytes)),
                        Ok(other) => {
                            *held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                self.gossip_txs(batch);
            }
            Job::GossipBlock { id, source, bytes } => self.gossip_block(id, source, bytes),
            Job::Submit(t, reply) => {
                let r = self.ledger.submit_own(t, now_ms());
                if r.is_ok() {
                    self.emit(LedgerEvent::Publish(Topic::Tx, t.encode()));
                }
                self.after_import();
                let _ = reply.send(r);
            }
            Job::Mined(block) => {
                let (hash, bytes) = (block.hash(), block.encode());
                match self.import(block) {
                    Ok(BlockOutcome::Stored { on_main: true, .. }) => {
                        tracing::info!(
                            "mined block {} at height {}",
                            hash.short(),
                            self.ledger.tip().height
                        );
                        self.emit(LedgerEvent::Publish(Topic::Block, bytes));
                    }
                    Ok(other) => tracing::debug!("mined block not taken: {other:?}"),
                    // Ours, not the block's: logged once as the store's fault.
                    Err(e @ BlockError::Storage(_)) => {
                        tracing::debug!("mined block not stored: {e}")
                    }
                    Err(e) => tracing::warn!("mined an invalid block: {e}"),
                }
            }
            Job::Headers { peer, headers } => self.check_headers(peer, headers),
            Job::Blocks { peer, blocks } => self.sync_blocks(peer, blocks),
            Job::ServeHeaders { key, locator, max } => self.serve_headers(key, locator, max),
            Job::ServeBlocks { key, hashes } => self.serve_blocks(key, hashes),
            Job::Query(f) => {
                f(&mut self.ledger);
                self.after_import();
            }
            Job::Rebroadcast => {
                for t in self
                    .ledger
                    .due_rebroadcasts(now_ms(), MAX_REBROADCAST_PER_ROUND)
                {
                    self.emit(LedgerEvent::Republish(t.encode()));
                }
            }
            Job::Stop => {}
        }
    }
}

/// Starts the ledger thread. Returns the job sender and the thread handle.
pub fn spawn(
    ledger: Ledger,
    events: mpsc::Sender<LedgerEvent>,
    gens: Arc<Generations>,
    jobs: mpsc::Receiver<Job>,
    retry: StoreRetry,
    store_dir: Option<std::path::PathBuf>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let last_tip = ledger.tip().hash;
    gens.mempool
        .store(ledger.mempool().generation(), Ordering::Relaxed);
    let worker = Worker {
        ledger,
        events,
        gens,
        last_tip,
        retry,
        store_dir,
        reopen_at: None,
        quiet_until: None,
    };
    std::thread::Builder::new()
        .name("meshwork-ledger".into())
        .spawn(move || worker.run(jobs))
}

/// The miner's settings.
#[derive(Clone, Debug)]
pub struct MinerConfig {
    pub address: Address,
    /// Lab only: the mean time between blocks found by this miner. With the `test` spec
    /// (difficulty 1) every hash wins, and this stands in for a share of hash rate without
    /// burning the CPU that many nodes on one machine share. Each wait is drawn from the
    /// exponential distribution, as proof of work's are: miners started together do not find
    /// their blocks together, and N miners of pace `N·T` find a block every `T` on average.
    /// `None` for real mining.
    pub pace: Option<Duration>,
}

pub struct Miner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Miner {
    pub fn spawn(
        cfg: MinerConfig,
        jobs: mpsc::Sender<Job>,
        gens: Arc<Generations>,
    ) -> std::io::Result<Miner> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("meshwork-miner".into())
            .spawn(move || mine(cfg, jobs, gens, flag))?;
        Ok(Miner {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the search at the next slice boundary and waits for the thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An exponentially distributed wait of mean `mean` (the time to the next block of a miner
/// with a fixed share of the hash rate).
fn exponential(mean: Duration) -> Duration {
    // 1 - U is in (0, 1], so the logarithm is finite.
    let u: f64 = rand::random();
    mean.mul_f64(-(1.0 - u).ln())
}

fn mine(cfg: MinerConfig, jobs: mpsc::Sender<Job>, gens: Arc<Generations>, stop: Arc<AtomicBool>) {
    // Paced: when this miner may find its next block.
    let mut next_at: Option<Instant> = cfg.pace.map(|p| Instant::now() + exponential(p));
    while !stop.load(Ordering::Relaxed) {
        // Paused while the store is stopped: nothing mined could be stored.
        if !gens.is_healthy() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if let Some(at) = next_at {
            let now = Instant::now();
            if now < at {
                std::thread::sleep((at - now).min(Duration::from_millis(50)));
                continue;
            }
        }
        let tip_gen = gens.tip.load(Ordering::Relaxed);
        let pool_gen = gens.mempool.load(Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let address = cfg.address;
        let ask = jobs.blocking_send(Job::Query(Box::new(move |l: &mut Ledger| {
            let r = l.template(address, now_ms());
            if let Err(e) = &r {
                l.note_store_error(e);
            }
            let _ = tx.send(r);
        })));
        let mut block = match ask.map(|_| rx.blocking_recv()) {
            Ok(Ok(Ok(block))) => block,
            // The store failed: the ledger thread reports it; wait until it is healthy again.
            Ok(Ok(Err(_))) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            _ => return, // the ledger has stopped
        };
        let built = Instant::now();
        let mut nonce: u64 = rand::random();
        let found = loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if gens.tip.load(Ordering::Relaxed) != tip_gen {
                break None;
            }
            if gens.mempool.load(Ordering::Relaxed) != pool_gen
                && built.elapsed() > Duration::from_secs(1)
            {
                break None;
            }
            if let Some(n) = meshwork_ledger::block::search_nonce(&block.header, nonce, MINER_SLICE)
            {
                break Some(n);
            }
            nonce = nonce.wrapping_add(MINER_SLICE);
        };
        if let Some(n) = found {
            block.header.nonce = n;
            next_at = cfg.pace.map(|p| Instant::now() + exponential(p));
            if jobs.blocking_send(Job::Mined(block)).is_err() {
                return;
            }
            // Wait until the ledger has taken it, so the next template builds on it.
            let deadline = Instant::now() + Duration::from_secs(5);
            while gens.tip.load(Ordering::Relaxed) == tip_gen
                && Instant::now() < deadline
                && gens.is_healthy()
            {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paced miner's waits average the pace, as exponential waits do: 20 000 draws have a
    /// standard error of 0.7 % of the mean, so ±5 % fails only if the draws are not
    /// exponential (or not of that mean).
    #[test]
    fn paced_waits_average_the_pace() {
        let mean = Duration::from_millis(100);
        let n = 20_000;
        let waits: Vec<f64> = (0..n)
            .map(|_| exponential(mean).as_secs_f64() * 1000.0)
            .collect();
        let avg = waits.iter().sum::<f64>() / n as f64;
        assert!((avg - 100.0).abs() < 5.0, "mean wait {avg} ms");
        // Memoryless: about e^-1 of the waits exceed the mean.
        let over = waits.iter().filter(|w| **w > 100.0).count() as f64 / n as f64;
        assert!((over - (-1f64).exp()).abs() < 0.02, "{over} over the mean");
    }
}
