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

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::block::{merkle_root, Block};
use crate::chain::{apply_transfer, check_transfer_fields, Accounts, AddOutcome, Chain, TipInfo};
use crate::error::{BlockError, OpenError, StoreError, TxError};
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

pub struct Ledger {
    chain: Chain,
    mempool: Mempool,
    orphans: OrphanPool,
    changes: Vec<ChainChange>,
    /// Senders whose transfers this node neither admits nor mines (see [`Ledger::set_refused`]).
    refused: HashSet<Address>,
}

impl Ledger {
    pub fn open(path: &Path, spec: ChainSpec) -> Result<Ledger, OpenError> {
        Ok(Ledger::with_chain(Chain::open(path, spec)?))
    }

    pub fn in_memory(spec: ChainSpec) -> Result<Ledger, OpenError> {
        Ok(Ledger::with_chain(Chain::in_memory(spec)?))
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
        }
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

    /// Checks and admits transfers: stateless rules, then one batch verification of every
    /// signature that got that far, then the mempool's rules against the confirmed state.
    pub fn submit_many(&mut self, txs: Vec<SignedTransfer>) -> Vec<Result<Hash, TxError>> {
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
    pub fn import(&mut self, block: Block, now: Millis) -> Result<BlockOutcome, BlockError> {
        let hash = block.hash();
        let result = self.chain.add_block(&block, now);
        self.after_chain_change()?;
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
                self.after_chain_change()?;
                if let Ok(AddOutcome::Stored { .. }) = r {
                    unlocked += 1;
                    queue.push_back(h);
                }
            }
        }
        Ok(unlocked)
    }

    fn after_chain_change(&mut self) -> Result<(), StoreError> {
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
                if self.admit_verified(t, t.id()).is_ok() {
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
    pub fn template(&self, miner: Address, now: Millis) -> Result<Block, StoreError> {
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
