//! The ledger: the chain, the mempool and the orphan pool, kept in step.
//!
//! Everything a node does with the chain goes through here: transfers from the API or gossip
//! ([`Ledger::submit_many`] batch-verifies them), blocks from gossip, sync or the miner
//! ([`Ledger::import`]), block templates for the miner, and queries. No I/O beyond the redb
//! store, no clock: callers pass `now`.
//!
//! After every change of the main chain, the transfers of connected blocks leave the mempool,
//! the transfers of disconnected blocks that the new chain does not contain go back into it,
//! and every touched sender's pending transfers are re-checked against its new state. So a
//! transfer on a losing branch is either in the winning chain or pending again: never lost
//! (unless the winning chain spent the same nonce differently, which is the double spend that
//! the chain exists to resolve).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::block::{merkle_root, Block};
use crate::chain::{apply_transfer, check_transfer_fields, Accounts, AddOutcome, Chain, TipInfo};
use crate::error::{BlockError, OpenError, StoreError, TxError};
use crate::faults::DiskFull;
use crate::mempool::{Mempool, DEFAULT_CAPACITY};
use crate::spec::ChainSpec;
use crate::tx::{verify_all, Coinbase, SignedTransfer, Transaction};
use crate::types::{Account, Address, Hash, Millis};

/// Bounds of the orphan pool: blocks whose parent we do not have yet.
pub const MAX_ORPHANS: usize = 256;
pub const MAX_ORPHAN_BYTES: usize = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockOutcome {
    Duplicate,
    /// Held in the orphan pool until `missing` arrives.
    Orphan {
        missing: Hash,
    },
    /// Stored; `on_main` when it is on the main chain now (it extended the best chain or won
    /// a reorganization). `unlocked` counts orphans that it let in after it.
    Stored {
        on_main: bool,
        unlocked: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum TxStatus {
    Pending,
    Confirmed {
        height: u64,
        block: Hash,
        confirmations: u64,
    },
    Unknown,
}

/// What a change of the main chain did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainChange {
    pub disconnected: usize,
    pub connected: usize,
    /// Transfers of disconnected blocks that went back into the mempool.
    pub returned: usize,
}

struct OrphanPool {
    blocks: HashMap<Hash, (Block, usize)>,
    by_parent: HashMap<Hash, Vec<Hash>>,
    order: VecDeque<Hash>,
    bytes: usize,
}

impl OrphanPool {
    fn insert(&mut self, block: Block) {
        let hash = block.hash();
        if self.blocks.contains_key(&hash) {
            return;
        }
        let size = block.encode().len();
        while !self.order.is_empty()
            && (self.blocks.len() >= MAX_ORPHANS || self.bytes + size > MAX_ORPHAN_BYTES)
        {
            let old = self.order.pop_front().expect("not empty");
            self.remove(&old);
        }
        self.by_parent
            .entry(block.header.prev)
            .or_default()
            .push(hash);
        self.order.push_back(hash);
        self.bytes += size;
        self.blocks.insert(hash, (block, size));
    }

    fn remove(&mut self, hash: &Hash) -> Option<Block> {
        let (block, size) = self.blocks.remove(hash)?;
        self.bytes -= size;
        if let Some(v) = self.by_parent.get_mut(&block.header.prev) {
            v.retain(|h| h != hash);
            if v.is_empty() {
                self.by_parent.remove(&block.header.prev);
            }
        }
        self.order.retain(|h| h != hash);
        Some(block)
    }

    fn take_children(&mut self, parent: &Hash) -> Vec<Block> {
        let hashes = self.by_parent.get(parent).cloned().unwrap_or_default();
        hashes.iter().filter_map(|h| self.remove(h)).collect()
    }
}

/// Account reads over the chain's state with local changes on top: a scratch state for
/// building templates.
struct Overlay<'a> {
    chain: &'a Chain,
    changes: HashMap<Address, Account>,
}

impl Accounts for Overlay<'_> {
    fn get(&mut self, addr: &Address) -> Result<Account, StoreError> {
        match self.changes.get(addr) {
            Some(a) => Ok(*a),
            None => self.chain.account(addr),
        }
    }
    fn set(&mut self, addr: Address, acct: Account) -> Result<(), StoreError> {
        self.changes.insert(addr, acct);
        Ok(())
    }
}

/// Default first wait before a tracked transfer is announced again (see [`Ledger::set_rebroadcast`]).
pub const REBROADCAST_INITIAL_MS: u64 = 30_000;
/// Default longest wait between two announcements of one transfer.
pub const REBROADCAST_MAX_MS: u64 = 600_000;

/// The pending transfers this node announces again until they leave the mempool (confirmed,
/// or invalid on the new chain): its own (submitted through [`Ledger::submit_own`]) and those
/// a reorganization returned. Each waits `initial` before its first re-announcement, then
/// twice as long each time, up to `max`. At most [`DEFAULT_CAPACITY`] are tracked.
struct Rebroadcast {
    initial: u64,
    max: u64,
    /// Transfer id → (when it is due, the wait after that announcement).
    entries: HashMap<Hash, (Millis, u64)>,
    due: BTreeSet<(Millis, Hash)>,
}

impl Rebroadcast {
    /// Tracks `id` (again), due `initial` from `now`.
    fn track(&mut self, id: Hash, now: Millis) {
        if let Some((at, _)) = self.entries.remove(&id) {
            self.due.remove(&(at, id));
        } else if self.entries.len() >= DEFAULT_CAPACITY {
            return; // bounded: the transfer stays pending, only not re-announced
        }
        let at = now.saturating_add(self.initial);
        let then = self.initial.saturating_mul(2).clamp(1, self.max.max(1));
        self.entries.insert(id, (at, then));
        self.due.insert((at, id));
    }

    /// Up to `max` ids due at `now`, each rescheduled after twice its last wait (capped).
    fn take_due(&mut self, now: Millis, max: usize) -> Vec<Hash> {
        let mut out = vec![];
        while out.len() < max {
            let Some(&(at, id)) = self.due.first() else {
                break;
            };
            if at > now {
                break;
            }
            self.due.pop_first();
            let wait = self.entries.get(&id).map_or(self.initial, |e| e.1);
            let next = wait.saturating_mul(2).clamp(1, self.max.max(1));
            let at = now.saturating_add(wait);
            self.entries.insert(id, (at, next));
            self.due.insert((at, id));
            out.push(id);
        }
        out
    }

    fn forget(&mut self, id: &Hash) {
        if let Some((at, _)) = self.entries.remove(id) {
            self.due.remove(&(at, *id));
        }
    }
}

pub struct Ledger {
    chain: Chain,
    mempool: Mempool,
    orphans: OrphanPool,
    changes: Vec<ChainChange>,
    /// Senders whose transfers this node neither admits nor mines (see [`Ledger::set_refused`]).
    refused: HashSet<Address>,
    /// The storage error that made the store unusable, until [`Ledger::reopen`] works.
    fault: Option<StoreError>,
    rebroadcast: Rebroadcast,
}

impl Ledger {
    pub fn open(path: &Path, spec: ChainSpec) -> Result<Ledger, OpenError> {
        Ok(Ledger::with_chain(Chain::open(path, spec)?))
    }

    pub fn in_memory(spec: ChainSpec) -> Result<Ledger, OpenError> {
        Ok(Ledger::with_chain(Chain::in_memory(spec)?))
    }

    /// Tests only: the ledger at `path` on a disk that `full` can make act full (see
    /// [`crate::faults`]).
    pub fn open_with_faults(
        path: &Path,
        spec: ChainSpec,
        full: DiskFull,
    ) -> Result<Ledger, OpenError> {
        Ok(Ledger::with_chain(Chain::open_with_faults(
            path, spec, full,
        )?))
    }

    fn with_chain(chain: Chain) -> Ledger {
        Ledger {
            chain,
            mempool: Mempool::new(DEFAULT_CAPACITY),
            orphans: OrphanPool {
                blocks: HashMap::new(),
                by_parent: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            },
            changes: vec![],
            refused: HashSet::new(),
            fault: None,
            rebroadcast: Rebroadcast {
                initial: REBROADCAST_INITIAL_MS,
                max: REBROADCAST_MAX_MS,
                entries: HashMap::new(),
                due: BTreeSet::new(),
            },
        }
    }

    /// The waits of re-announcement, in ms: the first after `initial`, then doubling up to
    /// `max` (defaults [`REBROADCAST_INITIAL_MS`], [`REBROADCAST_MAX_MS`]).
    pub fn set_rebroadcast(&mut self, initial_ms: u64, max_ms: u64) {
        self.rebroadcast.initial = initial_ms;
        self.rebroadcast.max = max_ms.max(initial_ms);
    }

    /// The storage error that stopped the store, while it is stopped. Every write (a block,
    /// a transfer, a template) is then refused with it, rather than accepted and lost; the
    /// caller retries [`Ledger::reopen`].
    pub fn store_fault(&self) -> Option<&StoreError> {
        self.fault.as_ref()
    }

    /// Records a storage error met outside the ledger's own methods (a query through
    /// [`Ledger::chain`]), so that the store is reopened.
    pub fn note_store_error(&mut self, e: &StoreError) {
        if self.fault.is_none() {
            self.fault = Some(e.clone());
        }
    }

    /// Closes and reopens the chain store (redb needs that after an I/O error), then brings
    /// the mempool in line with the state read back: confirmed transfers leave, and every
    /// sender's pending ones are re-checked. Clears the fault on success; on error the store
    /// stays closed and the fault stays.
    pub fn reopen(&mut self) -> Result<(), OpenError> {
        self.chain.reopen()?;
        self.fault = None;
        let pending = self.mempool.list(usize::MAX);
        let mut senders = HashSet::new();
        for t in &pending {
            let id = t.id();
            if self.chain.tx_location(&id)?.is_some() {
                self.mempool.remove(&id);
                self.rebroadcast.forget(&id);
            }
            senders.insert(t.transfer.from);
        }
        for s in senders {
            let acct = self.chain.account(&s)?;
            self.mempool.revalidate(&s, acct);
        }
        Ok(())
    }

    /// A storage error from the chain: recorded, and passed on.
    fn fail<E: Clone>(&mut self, e: &StoreError, out: E) -> E {
        self.note_store_error(e);
        out
    }

    /// An operator's policy: transfers from `senders` are refused by the mempool (submitted,
    /// gossiped, or returned by a reorganization), so this node neither relays nor mines them.
    /// Blocks that hold them stay valid: a policy is not a consensus rule. Bounded by what the
    /// operator configures.
    pub fn set_refused(&mut self, senders: HashSet<Address>) {
        self.refused = senders;
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    pub fn mempool(&self) -> &Mempool {
        &self.mempool
    }

    pub fn tip(&self) -> TipInfo {
        self.chain.tip()
    }

    pub fn orphan_count(&self) -> usize {
        self.orphans.blocks.len()
    }

    /// Main-chain changes since the last call.
    pub fn take_changes(&mut self) -> Vec<ChainChange> {
        std::mem::take(&mut self.changes)
    }

    pub fn submit(&mut self, t: SignedTransfer) -> Result<Hash, TxError> {
        self.submit_many(vec![t]).pop().expect("one in, one out")
    }

    /// Submits this node's own transfer (from its API): once admitted, it is announced again
    /// while it stays pending (see [`Ledger::due_rebroadcasts`]).
    pub fn submit_own(&mut self, t: SignedTransfer, now: Millis) -> Result<Hash, TxError> {
        let id = self.submit(t)?;
        self.rebroadcast.track(id, now);
        Ok(id)
    }

    /// The tracked transfers due for another announcement at `now`, at most `max` (the bound
    /// of one round's work), each rescheduled; those no longer pending are forgotten.
    pub fn due_rebroadcasts(&mut self, now: Millis, max: usize) -> Vec<SignedTransfer> {
        let mut out = vec![];
        // Ids that left the mempool are dropped without counting toward `max`.
        while out.len() < max {
            let ids = self.rebroadcast.take_due(now, max - out.len());
            if ids.is_empty() {
                break;
            }
            for id in ids {
                match self.mempool.get(&id) {
                    Some(t) => out.push(t),
                    None => self.rebroadcast.forget(&id),
                }
            }
        }
        out
    }

    /// Checks and admits transfers: stateless rules, then one batch verification of every
    /// signature that got that far, then the mempool's rules against the confirmed state.
    /// While the store is stopped ([`Ledger::store_fault`]) every transfer is refused with
    /// [`TxError::Storage`]: the node does not acknowledge what it may not keep.
    pub fn submit_many(&mut self, txs: Vec<SignedTransfer>) -> Vec<Result<Hash, TxError>> {
        if let Some(e) = &self.fault {
            return txs
                .iter()
                .map(|_| Err(TxError::Storage(e.clone())))
                .collect();
        }
        let results = self.submit_checked(txs);
        for r in &results {
            if let Err(TxError::Storage(e)) = r {
                let e = e.clone();
                self.note_store_error(&e);
            }
        }
        results
    }

    fn submit_checked(&mut self, txs: Vec<SignedTransfer>) -> Vec<Result<Hash, TxError>> {
        // Each id is a postcard encoding and a hash: computed once per transfer here.
        let ids: Vec<Hash> = txs.iter().map(|t| t.id()).collect();
        let mut results: Vec<Result<Hash, TxError>> = {
            let (spec, chain_id) = (self.chain.spec(), self.chain.chain_id());
            txs.iter()
                .zip(&ids)
                .map(|(t, id)| check_transfer_fields(t, spec, &chain_id).map(|_| *id))
                .collect()
        };
        let to_verify: Vec<(usize, &SignedTransfer)> = txs
            .iter()
            .enumerate()
            .filter(|(i, _)| results[*i].is_ok() && !self.mempool.contains(&ids[*i]))
            .collect();
        let refs: Vec<&SignedTransfer> = to_verify.iter().map(|(_, t)| *t).collect();
        for ((i, _), ok) in to_verify.iter().zip(verify_all(&refs)) {
            if !ok {
                results[*i] = Err(TxError::BadSignature);
            }
        }
        for (i, t) in txs.into_iter().enumerate() {
            if results[i].is_ok() {
                results[i] = self.admit_verified(t, ids[i]);
            }
        }
        results
    }

    fn admit_verified(&mut self, t: SignedTransfer, id: Hash) -> Result<Hash, TxError> {
        if self.refused.contains(&t.transfer.from) {
            return Err(TxError::Refused(t.transfer.from));
        }
        if self.mempool.contains(&id) {
            return Err(TxError::Duplicate);
        }
        if let Some(loc) = self.chain.tx_location(&id)? {
            return Err(TxError::AlreadyConfirmed { height: loc.height });
        }
        let acct = self.chain.account(&t.transfer.from)?;
        self.mempool.admit(t, acct)
    }

    /// Imports a block from anywhere: gossip, sync, or the local miner.
    /// While the store is stopped every block is refused with [`BlockError::Storage`] (not
    /// punishable, and nothing is marked invalid).
    pub fn import(&mut self, block: Block, now: Millis) -> Result<BlockOutcome, BlockError> {
        if let Some(e) = &self.fault {
            return Err(BlockError::Storage(e.clone()));
        }
        let r = self.import_checked(block, now);
        if let Err(BlockError::Storage(e)) = &r {
            return Err(self.fail(e, BlockError::Storage(e.clone())));
        }
        r
    }

    fn import_checked(&mut self, block: Block, now: Millis) -> Result<BlockOutcome, BlockError> {
        let hash = block.hash();
        let result = self.chain.add_block(&block, now);
        self.after_chain_change(now)?;
        match result? {
            AddOutcome::Duplicate => Ok(BlockOutcome::Duplicate),
            AddOutcome::MissingParent(missing) => {
                // Without the parent only the proof of work can be checked; it still makes
                // filling the pool cost real hashing.
                let h = &block.header;
                if h.target < self.chain.spec().min_difficulty || !h.meets_target() {
                    return Err(BlockError::BadProofOfWork(h.target));
                }
                self.orphans.insert(block);
                Ok(BlockOutcome::Orphan { missing })
            }
            AddOutcome::Stored { .. } => {
                let unlocked = self.connect_orphans(hash, now)?;
                Ok(BlockOutcome::Stored {
                    on_main: self.chain.on_main(&hash),
                    unlocked,
                })
            }
        }
    }

    /// Imports the orphans waiting on `parent`, and theirs, breadth first.
    fn connect_orphans(&mut self, parent: Hash, now: Millis) -> Result<usize, BlockError> {
        let mut queue = VecDeque::from([parent]);
        let mut unlocked = 0;
        while let Some(p) = queue.pop_front() {
            for child in self.orphans.take_children(&p) {
                let h = child.hash();
                let r = self.chain.add_block(&child, now);
                self.after_chain_change(now)?;
                if let Ok(AddOutcome::Stored { .. }) = r {
                    unlocked += 1;
                    queue.push_back(h);
                }
            }
        }
        Ok(unlocked)
    }

    fn after_chain_change(&mut self, now: Millis) -> Result<(), StoreError> {
        for reorg in self.chain.take_reorgs() {
            let mut touched: HashSet<Address> = HashSet::new();
            for b in &reorg.connected {
                for t in b.txs.iter().filter_map(Transaction::as_transfer) {
                    self.mempool.remove(&t.id());
                    touched.insert(t.transfer.from);
                }
            }
            // Disconnected blocks come tip first; re-admit lowest first so nonces stay ordered.
            let returned: Vec<SignedTransfer> = reorg
                .disconnected
                .iter()
                .rev()
                .flat_map(|b| b.txs.iter().filter_map(Transaction::as_transfer).copied())
                .collect();
            touched.extend(returned.iter().map(|t| t.transfer.from));
            for s in &touched {
                let acct = self.chain.account(s)?;
                self.mempool.revalidate(s, acct);
            }
            let mut back = 0;
            for t in returned {
                let id = t.id();
                if self.admit_verified(t, id).is_ok() {
                    // Peers on the winning chain may never have seen it: announce it again.
                    self.rebroadcast.track(id, now);
                    back += 1;
                }
            }
            self.changes.push(ChainChange {
                disconnected: reorg.disconnected.len(),
                connected: reorg.connected.len(),
                returned: back,
            });
        }
        Ok(())
    }

    /// A block extending the tip, paying `miner`, with the best-paying pending transfers that
    /// apply in order and fit the limits. Its nonce is 0: the miner searches from there.
    ///
    /// While the store is stopped this fails with the fault: nothing mined could be stored.
    pub fn template(&self, miner: Address, now: Millis) -> Result<Block, StoreError> {
        if let Some(e) = &self.fault {
            return Err(e.clone());
        }
        let spec = self.chain.spec();
        let mut header = self.chain.next_header(now);
        let candidates = self.mempool.select(spec.max_block_txs - 1, |a| {
            self.chain.account(a).unwrap_or_default()
        });
        let mut scratch = Overlay {
            chain: &self.chain,
            changes: HashMap::new(),
        };
        // Room for the header, the coinbase and length prefixes, with a margin.
        let mut bytes = 512;
        let mut fees: u64 = 0;
        let mut txs = vec![];
        for t in candidates {
            let size = t.encode().len() + 1;
            if bytes + size > spec.max_block_bytes {
                break;
            }
            match apply_transfer(&mut scratch, &t) {
                Ok(()) => {}
                Err(BlockError::Storage(e)) => return Err(e),
                Err(_) => continue,
            }
            let Some(f) = fees.checked_add(t.transfer.fee) else {
                break;
            };
            fees = f;
            bytes += size;
            txs.push(Transaction::Transfer(t));
        }
        txs.insert(
            0,
            Transaction::Coinbase(Coinbase {
                height: header.height,
                to: miner,
                amount: spec.block_reward.saturating_add(fees),
            }),
        );
        let ids: Vec<Hash> = txs.iter().map(|t| t.id()).collect();
        header.merkle_root = merkle_root(&ids);
        Ok(Block { header, txs })
    }

    pub fn tx_status(&self, id: &Hash) -> Result<TxStatus, StoreError> {
        if self.mempool.contains(id) {
            return Ok(TxStatus::Pending);
        }
        Ok(match self.chain.tx_location(id)? {
            Some(loc) => TxStatus::Confirmed {
                height: loc.height,
                block: loc.block,
                confirmations: self.chain.tip().height - loc.height + 1,
            },
            None => TxStatus::Unknown,
        })
    }

    /// The account's confirmed state, and the nonce its next transfer should carry given what
    /// is pending.
    pub fn account(&self, addr: &Address) -> Result<(Account, u64), StoreError> {
        let acct = self.chain.account(addr)?;
        Ok((acct, self.mempool.next_nonce(addr, acct.nonce)))
    }
}
