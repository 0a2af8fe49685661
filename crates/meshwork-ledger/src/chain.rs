//! The chain: every block we hold, the best chain among them, and the account state at its tip.
//!
//! # Invariants (kept by every method that writes)
//! 1. Every block in the index is stored whole, passed its context-free checks (proof of work,
//!    Merkle root, signatures, limits) and its header checks against its parent (height,
//!    difficulty, timestamp), and its parent is in the index. Blocks that fail are never stored.
//! 2. `main[h]` is the hash of the main-chain block at height h, from genesis to the tip, and
//!    the `accounts` table is exactly the state after applying `main[0..=tip]` in order.
//! 3. The tip has the most cumulative work among the blocks not marked invalid (ties keep the
//!    block that arrived first). A block is marked invalid when applying it to the state fails;
//!    its descendants are marked with it.
//! 4. Every main-chain block except genesis has undo data: the state, before the block, of
//!    every account it touched. Disconnecting a block restores exactly that, so a
//!    reorganization of any depth lands on the state that replaying the new chain would give.
//!
//! Each change of the main chain (disconnect back to the fork point, connect up to the new
//! tip, move the tip pointer) is one redb write transaction, so a crash leaves the store at the
//! old tip or the new one, never in between. A block that fails halfway through a
//! reorganization aborts the transaction: the state is untouched and the block is marked
//! invalid.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::block::{merkle_root, Block, Header};
use crate::error::{BlockError, OpenError, StoreError, TxError, CORRUPT_PREFIX};
use crate::faults::{catch_quietly, DiskFull, FaultyFile};
use crate::spec::ChainSpec;
use crate::tx::{verify_all, Coinbase, SignedTransfer, Transaction};
use crate::types::{Account, Address, Hash, Millis};

const BLOCKS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("blocks");
const INDEX: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("index");
const ACCOUNTS: TableDefinition<&[u8; 32], (u64, u64)> = TableDefinition::new("accounts");
const UNDO: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("undo");
const MAIN: TableDefinition<u64, &[u8; 32]> = TableDefinition::new("main");
/// Transaction id → (height, position) on the main chain.
const TXS: TableDefinition<&[u8; 32], (u64, u32)> = TableDefinition::new("txs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub const BLOCK_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct IndexRecord {
    header: Header,
    invalid: bool,
}

#[derive(Clone, Debug)]
struct Entry {
    header: Header,
    /// Cumulative work from genesis to this block inclusive.
    work: u128,
    invalid: bool,
}

/// A change of the main chain: blocks removed (tip first) and blocks added (lowest first).
#[derive(Clone, Debug, Default)]
pub struct Reorg {
    pub disconnected: Vec<Block>,
    pub connected: Vec<Block>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddOutcome {
    /// Already held.
    Duplicate,
    /// The parent is unknown; nothing was stored.
    MissingParent(Hash),
    /// Stored; `tip` says whether it is now the tip of the main chain.
    Stored { tip: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TipInfo {
    pub height: u64,
    pub hash: Hash,
    pub work: u128,
    pub timestamp: Millis,
}

/// Where a transaction is on the main chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxLocation {
    pub height: u64,
    pub block: Hash,
    pub position: u32,
}

/// Reads and writes account state; implemented by a redb table and by a `HashMap` (replay).
/// An account equal to `Account::default()` is absent: `set` removes it, so two states are
/// equal exactly when their tables are.
pub trait Accounts {
    fn get(&mut self, addr: &Address) -> Result<Account, StoreError>;
    fn set(&mut self, addr: Address, acct: Account) -> Result<(), StoreError>;
}

impl Accounts for HashMap<Address, Account> {
    fn get(&mut self, addr: &Address) -> Result<Account, StoreError> {
        Ok(HashMap::get(self, addr).copied().unwrap_or_default())
    }
    fn set(&mut self, addr: Address, acct: Account) -> Result<(), StoreError> {
        if acct == Account::default() {
            self.remove(&addr);
        } else {
            self.insert(addr, acct);
        }
        Ok(())
    }
}

/// A commitment to the whole account state: the XOR of one keyed hash per stored account.
///
/// Order-independent and updated in O(1) per changed account (XOR out the old record, XOR in
/// the new one), so each main-chain change maintains it at the cost of the accounts it
/// touches, and opening the store recomputes it with one scan of the `accounts` table (far
/// cheaper than replaying the chain). Addresses are unique keys, so every record enters once
/// and any change of one record (a flipped byte in a balance) changes the digest. It detects
/// damage, not a forger who can rewrite the file (such a person can rewrite anything).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountsDigest(pub [u8; 32]);

impl AccountsDigest {
    fn toggle(&mut self, addr: &Address, acct: Account) {
        let mut h = blake3::Hasher::new();
        h.update(b"meshwork account v1");
        h.update(&addr.0);
        h.update(&acct.balance.to_le_bytes());
        h.update(&acct.nonce.to_le_bytes());
        for (d, x) in self.0.iter_mut().zip(h.finalize().as_bytes()) {
            *d ^= x;
        }
    }

    /// The digest of a whole state.
    pub fn of<'a>(state: impl IntoIterator<Item = (&'a Address, &'a Account)>) -> Self {
        let mut d = AccountsDigest::default();
        for (a, acct) in state {
            d.toggle(a, *acct);
        }
        d
    }
}

/// The `accounts` table of a write transaction, keeping a running [`AccountsDigest`].
struct TableAccounts<'a, 't> {
    table: &'a mut redb::Table<'t, &'static [u8; 32], (u64, u64)>,
    digest: &'a mut AccountsDigest,
}

impl Accounts for TableAccounts<'_, '_> {
    fn get(&mut self, addr: &Address) -> Result<Account, StoreError> {
        Ok(self
            .table
            .get(&addr.0)?
            .map(|v| {
                let (balance, nonce) = v.value();
                Account { balance, nonce }
            })
            .unwrap_or_default())
    }
    fn set(&mut self, addr: Address, acct: Account) -> Result<(), StoreError> {
        let old = if acct == Account::default() {
            self.table.remove(&addr.0)?.map(|v| v.value())
        } else {
            self.table
                .insert(&addr.0, (acct.balance, acct.nonce))?
                .map(|v| v.value())
        };
        if let Some((balance, nonce)) = old {
            self.digest.toggle(&addr, Account { balance, nonce });
        }
        if acct != Account::default() {
            self.digest.toggle(&addr, acct);
        }
        Ok(())
    }
}

/// Records the first state of every account touched, for undo.
struct Recorder<'a, A: Accounts> {
    inner: &'a mut A,
    undo: Vec<(Address, Account)>,
    seen: HashSet<Address>,
}

impl<A: Accounts> Accounts for Recorder<'_, A> {
    fn get(&mut self, addr: &Address) -> Result<Account, StoreError> {
        self.inner.get(addr)
    }
    fn set(&mut self, addr: Address, acct: Account) -> Result<(), StoreError> {
        if self.seen.insert(addr) {
            let before = self.inner.get(&addr)?;
            self.undo.push((addr, before));
        }
        self.inner.set(addr, acct)
    }
}

/// Applies one transfer to the state: the sender's nonce must be next and its balance enough.
pub fn apply_transfer<A: Accounts>(state: &mut A, t: &SignedTransfer) -> Result<(), BlockError> {
    let tr = &t.transfer;
    let tx_err = |error| BlockError::Tx { id: t.id(), error };
    let cost = tr.cost().ok_or_else(|| tx_err(TxError::Overflow))?;
    let mut from = state.get(&tr.from)?;
    if tr.nonce != from.nonce {
        return Err(tx_err(TxError::BadNonce {
            expected: from.nonce,
            got: tr.nonce,
        }));
    }
    if from.balance < cost {
        return Err(tx_err(TxError::InsufficientBalance {
            has: from.balance,
            needs: cost,
        }));
    }
    from.balance -= cost;
    from.nonce += 1;
    state.set(tr.from, from)?;
    let mut to = state.get(&tr.to)?;
    to.balance = to
        .balance
        .checked_add(tr.amount)
        .ok_or_else(|| tx_err(TxError::BalanceOverflow))?;
    state.set(tr.to, to)?;
    Ok(())
}

/// Applies a block's transactions to `state` (checks that need state: nonces, balances, the
/// coinbase amount) and returns the undo data. On error `state` may be partly changed: callers
/// apply to a transaction they can abort, or to a scratch copy.
pub fn apply_block<A: Accounts>(
    state: &mut A,
    block: &Block,
    spec: &ChainSpec,
) -> Result<Vec<(Address, Account)>, BlockError> {
    let mut rec = Recorder {
        inner: state,
        undo: vec![],
        seen: HashSet::new(),
    };
    let mut fees: u64 = 0;
    // `get`, not an index: a block read back from a damaged store may hold no transaction.
    for tx in block.txs.get(1..).unwrap_or_default() {
        let Transaction::Transfer(t) = tx else {
            return Err(BlockError::ExtraCoinbase);
        };
        fees = fees.checked_add(t.transfer.fee).ok_or(BlockError::Tx {
            id: t.id(),
            error: TxError::Overflow,
        })?;
        apply_transfer(&mut rec, t)?;
    }
    let Some(Transaction::Coinbase(cb)) = block.txs.first() else {
        return Err(BlockError::NoCoinbase);
    };
    let allowed = spec.block_reward.saturating_add(fees);
    if cb.amount > allowed {
        return Err(BlockError::CoinbaseAmount {
            allowed,
            got: cb.amount,
        });
    }
    let mut miner = rec.get(&cb.to)?;
    miner.balance = miner.balance.checked_add(cb.amount).ok_or(BlockError::Tx {
        id: block.txs[0].id(),
        error: TxError::BalanceOverflow,
    })?;
    rec.set(cb.to, miner)?;
    Ok(rec.undo)
}

/// The genesis block of a spec: its allocations as height-0 coinbases, its `prev` the spec hash.
pub fn genesis_block(spec: &ChainSpec) -> Block {
    let txs: Vec<Transaction> = spec
        .allocations
        .iter()
        .map(|(to, amount)| {
            Transaction::Coinbase(Coinbase {
                height: 0,
                to: *to,
                amount: *amount,
            })
        })
        .collect();
    let ids: Vec<Hash> = txs.iter().map(|t| t.id()).collect();
    Block {
        header: Header {
            version: BLOCK_VERSION,
            height: 0,
            prev: spec.hash(),
            merkle_root: merkle_root(&ids),
            timestamp: spec.genesis_timestamp,
            target: spec.initial_difficulty,
            nonce: 0,
        },
        txs,
    }
}

/// The genesis state: allocations to the same address add up.
pub fn genesis_state(spec: &ChainSpec) -> HashMap<Address, Account> {
    let mut state = HashMap::new();
    for (a, amount) in &spec.allocations {
        state.entry(*a).or_insert_with(Account::default).balance += amount;
    }
    state
}

/// Checks that need no state and no parent: limits, coinbase placement, Merkle root,
/// duplicates, chain id, amounts, fees, signatures (batch-verified).
pub fn check_body(block: &Block, spec: &ChainSpec, chain_id: &Hash) -> Result<(), BlockError> {
    let size = block.encode().len();
    if size > spec.max_block_bytes {
        return Err(BlockError::TooLarge {
            max: spec.max_block_bytes,
            got: size,
        });
    }
    if block.txs.len() > spec.max_block_txs {
        return Err(BlockError::TooManyTxs {
            max: spec.max_block_txs,
            got: block.txs.len(),
        });
    }
    match block.txs.first() {
        Some(Transaction::Coinbase(cb)) if cb.height != block.header.height => {
            return Err(BlockError::CoinbaseHeight {
                expected: block.header.height,
                got: cb.height,
            })
        }
        Some(Transaction::Coinbase(_)) => {}
        _ => return Err(BlockError::NoCoinbase),
    }
    let ids = block.tx_ids();
    if merkle_root(&ids) != block.header.merkle_root {
        return Err(BlockError::MerkleMismatch);
    }
    let mut seen = HashSet::with_capacity(ids.len());
    for id in &ids {
        if !seen.insert(*id) {
            return Err(BlockError::DuplicateTx(*id));
        }
    }
    let mut transfers = Vec::with_capacity(block.txs.len());
    for (tx, id) in block.txs[1..].iter().zip(&ids[1..]) {
        let Transaction::Transfer(t) = tx else {
            return Err(BlockError::ExtraCoinbase);
        };
        check_transfer_fields(t, spec, chain_id)
            .map_err(|error| BlockError::Tx { id: *id, error })?;
        transfers.push(t);
    }
    let verdict = verify_all(&transfers);
    if let Some(i) = verdict.iter().position(|ok| !ok) {
        return Err(BlockError::Tx {
            id: ids[i + 1],
            error: TxError::BadSignature,
        });
    }
    Ok(())
}

/// The stateless rules of a transfer, except its signature.
pub fn check_transfer_fields(
    t: &SignedTransfer,
    spec: &ChainSpec,
    chain_id: &Hash,
) -> Result<(), TxError> {
    let tr = &t.transfer;
    if tr.chain_id != *chain_id {
        return Err(TxError::WrongChain {
            expected: *chain_id,
            got: tr.chain_id,
        });
    }
    if tr.amount == 0 {
        return Err(TxError::ZeroAmount);
    }
    if tr.fee < spec.min_fee {
        return Err(TxError::FeeTooLow {
            min: spec.min_fee,
            got: tr.fee,
        });
    }
    tr.cost().ok_or(TxError::Overflow)?;
    Ok(())
}

/// Where a chain's database lives, so that it can be opened again after a storage error.
#[derive(Clone, Debug)]
enum Source {
    File(PathBuf),
    /// In memory: there is no file to reopen, so a reopen reloads the same database.
    Memory,
    /// A file behind a switch that can make the disk act full ([`crate::faults`], tests only).
    Faulty(PathBuf, DiskFull),
}

impl Source {
    /// Opens the database. redb panics on some damaged files rather than returning an error;
    /// such a panic is caught here and reported as damage, so a bad file never takes the
    /// process down.
    fn open(&self) -> Result<Database, OpenError> {
        let open = || match self {
            Source::File(path) => Database::create(path),
            Source::Memory => {
                redb::Builder::new().create_with_backend(redb::backends::InMemoryBackend::new())
            }
            Source::Faulty(path, switch) => {
                redb::Builder::new().create_with_backend(FaultyFile::open(path, switch.clone())?)
            }
        };
        match catch_quietly(open) {
            Ok(r) => r.map_err(open_error),
            Err(panic) => Err(OpenError::Corrupt(format!(
                "the database engine cannot read the file ({})",
                panic_message(&panic)
            ))),
        }
    }
}

/// Runs a load of stored data; a panic in the database engine on damaged pages becomes
/// [`OpenError::Corrupt`] (whatever it touched is dropped with it).
fn guarded(load: impl FnOnce() -> Result<Chain, OpenError>) -> Result<Chain, OpenError> {
    catch_quietly(load).unwrap_or_else(|panic| {
        Err(OpenError::Corrupt(format!(
            "the database engine failed on the file ({})",
            panic_message(&panic)
        )))
    })
}

/// The text of a caught panic.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Sorts redb's errors at open into damage, a lock held elsewhere, and other storage errors.
fn open_error(e: redb::DatabaseError) -> OpenError {
    use redb::{DatabaseError, StorageError as S};
    match e {
        DatabaseError::DatabaseAlreadyOpen => OpenError::Locked,
        DatabaseError::Storage(S::Corrupted(m)) => OpenError::Corrupt(m),
        DatabaseError::Storage(S::Io(io))
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
            ) =>
        {
            OpenError::Corrupt(io.to_string())
        }
        other => OpenError::Store(other.into()),
    }
}

pub struct Chain {
    spec: ChainSpec,
    chain_id: Hash,
    source: Source,
    /// `None` while closed: after a storage error, between closing and a successful reopen.
    db: Option<Database>,
    index: HashMap<Hash, Entry>,
    children: HashMap<Hash, Vec<Hash>>,
    main: Vec<Hash>,
    /// The committed [`AccountsDigest`] of the `accounts` table (meta `accounts_digest`).
    digest: AccountsDigest,
    /// Main-chain changes not yet taken by [`Chain::take_reorgs`].
    reorgs: Vec<Reorg>,
    /// Why the last block marked invalid failed.
    last_failure: Option<(Hash, BlockError)>,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{CORRUPT_PREFIX}{what}"))
}

fn decode_block(bytes: &[u8]) -> Result<Block, StoreError> {
    Block::decode(bytes, usize::MAX).map_err(corrupt)
}

/// Meta key of the [`AccountsDigest`], written with every move of the tip.
const DIGEST_KEY: &str = "accounts_digest";

/// The digest of a stored `accounts` table, by a full scan.
fn scan_digest(
    t: &impl ReadableTable<&'static [u8; 32], (u64, u64)>,
) -> Result<AccountsDigest, StoreError> {
    let mut d = AccountsDigest::default();
    for item in t.iter()? {
        let (k, v) = item?;
        let (balance, nonce) = v.value();
        d.toggle(&Address(*k.value()), Account { balance, nonce });
    }
    Ok(d)
}

impl Chain {
    /// Opens (or creates) the chain stored at `path`.
    ///
    /// Opening checks the store's consistency cheaply (see [`Chain::reopen`] and
    /// `docs/architecture.md`): the tip is present and is the last main-chain block; the main
    /// chain runs from genesis with consecutive heights, each block linking to the one
    /// before; every stored block's parent is stored one height below; every main-chain
    /// block but genesis has undo data; and the `accounts` table matches the digest committed
    /// with the tip. A store that fails any of these gives [`OpenError::Corrupt`]; a damaged
    /// file never panics.
    pub fn open(path: &Path, spec: ChainSpec) -> Result<Chain, OpenError> {
        Chain::from_source(Source::File(path.to_owned()), spec)
    }

    /// A chain in memory: for tests and benchmarks.
    pub fn in_memory(spec: ChainSpec) -> Result<Chain, OpenError> {
        Chain::from_source(Source::Memory, spec)
    }

    /// Tests only: the chain at `path` on a disk that `full` can make act full (every write,
    /// resize and sync fails with ENOSPC until it is switched off). See [`crate::faults`].
    pub fn open_with_faults(
        path: &Path,
        spec: ChainSpec,
        full: DiskFull,
    ) -> Result<Chain, OpenError> {
        Chain::from_source(Source::Faulty(path.to_owned(), full), spec)
    }

    fn from_source(source: Source, spec: ChainSpec) -> Result<Chain, OpenError> {
        spec.validate().map_err(OpenError::Spec)?;
        let db = source.open()?;
        guarded(|| Chain::with_db(db, spec, source))
    }

    /// Closes the database and opens it again, reloading the index, the main chain and the
    /// digest from disk (and checking them, as [`Chain::open`] does). After an I/O error redb
    /// refuses every transaction ("Previous I/O error occurred") until its database is closed
    /// and opened again; this is that. On error the chain stays closed: its reads and writes
    /// fail with a [`StoreError`], its in-memory view (tip, index) stays the last committed
    /// one, and a later reopen may succeed (say, once the disk has space again).
    pub fn reopen(&mut self) -> Result<(), OpenError> {
        let db = match self.source {
            // Nothing to close: the same database is reloaded.
            Source::Memory => self
                .db
                .take()
                .ok_or_else(|| OpenError::Corrupt("the in-memory store was lost".into()))?,
            _ => {
                // Closed first: redb holds an exclusive lock on the file while open.
                drop(self.db.take());
                self.source.open()?
            }
        };
        let (spec, source) = (self.spec.clone(), self.source.clone());
        *self = guarded(|| Chain::with_db(db, spec, source))?;
        Ok(())
    }

    /// Whether the database is open (it is closed between a failed reopen and the next).
    pub fn is_open(&self) -> bool {
        self.db.is_some()
    }

    fn db(&self) -> Result<&Database, StoreError> {
        self.db.as_ref().ok_or_else(|| {
            StoreError(
                "the chain store is closed after a storage error; it is being reopened".into(),
            )
        })
    }

    fn with_db(db: Database, spec: ChainSpec, source: Source) -> Result<Chain, OpenError> {
        let genesis = genesis_block(&spec);
        let chain_id = genesis.hash();
        let w = db.begin_write().map_err(StoreError::from)?;
        {
            let mut meta = w.open_table(META).map_err(StoreError::from)?;
            let stored = meta
                .get("chain_id")
                .map_err(StoreError::from)?
                .map(|v| v.value().to_vec());
            match stored {
                Some(id) if id != chain_id.0 => {
                    let stored = Hash(id.try_into().map_err(|_| {
                        OpenError::Corrupt("the stored chain id is not 32 bytes".into())
                    })?);
                    return Err(OpenError::SpecMismatch {
                        stored,
                        expected: chain_id,
                    });
                }
                Some(_) => {
                    // A store written before the digest existed gets one now, from its
                    // current state (which `meshwork chain verify` can still check).
                    if meta.get(DIGEST_KEY).map_err(StoreError::from)?.is_none() {
                        let accounts = w.open_table(ACCOUNTS).map_err(StoreError::from)?;
                        let d = scan_digest(&accounts)?;
                        meta.insert(DIGEST_KEY, d.0.as_slice())
                            .map_err(StoreError::from)?;
                    }
                }
                None => {
                    // No chain id but blocks: the meta table was lost, not a new store.
                    let held = w
                        .open_table(INDEX)
                        .map_err(StoreError::from)?
                        .len()
                        .map_err(StoreError::from)?;
                    if held > 0 {
                        return Err(OpenError::Corrupt(format!(
                            "{held} blocks are stored but the chain id is missing"
                        )));
                    }
                    meta.insert("chain_id", chain_id.0.as_slice())
                        .map_err(StoreError::from)?;
                    meta.insert("tip", chain_id.0.as_slice())
                        .map_err(StoreError::from)?;
                    let rec = postcard::to_allocvec(&IndexRecord {
                        header: genesis.header,
                        invalid: false,
                    })
                    .map_err(StoreError::from)?;
                    w.open_table(INDEX)
                        .map_err(StoreError::from)?
                        .insert(&chain_id.0, rec.as_slice())
                        .map_err(StoreError::from)?;
                    w.open_table(BLOCKS)
                        .map_err(StoreError::from)?
                        .insert(&chain_id.0, genesis.encode().as_slice())
                        .map_err(StoreError::from)?;
                    w.open_table(MAIN)
                        .map_err(StoreError::from)?
                        .insert(0, &chain_id.0)
                        .map_err(StoreError::from)?;
                    let mut accounts = w.open_table(ACCOUNTS).map_err(StoreError::from)?;
                    let mut digest = AccountsDigest::default();
                    for (a, acct) in genesis_state(&spec) {
                        TableAccounts {
                            table: &mut accounts,
                            digest: &mut digest,
                        }
                        .set(a, acct)?;
                    }
                    meta.insert(DIGEST_KEY, digest.0.as_slice())
                        .map_err(StoreError::from)?;
                }
            }
            // Create the remaining tables so that readers never meet a missing one.
            w.open_table(UNDO).map_err(StoreError::from)?;
            w.open_table(TXS).map_err(StoreError::from)?;
        }
        w.commit().map_err(StoreError::from)?;

        let mut chain = Chain {
            spec,
            chain_id,
            source,
            db: Some(db),
            index: HashMap::new(),
            children: HashMap::new(),
            main: vec![],
            digest: AccountsDigest::default(),
            reorgs: vec![],
            last_failure: None,
        };
        chain.load()?;
        // A block stored but not connected before a crash (invariant 3 broken between two
        // transactions) is connected now.
        chain.activate_best(None)?;
        chain.reorgs.clear();
        Ok(chain)
    }

    /// Loads the index, the main chain and the digest, checking what can be checked without
    /// reading every block (see [`Chain::open`]).
    fn load(&mut self) -> Result<(), OpenError> {
        let c = |m: String| OpenError::Corrupt(m);
        let r = self.db()?.begin_read().map_err(StoreError::from)?;
        let index = r.open_table(INDEX).map_err(StoreError::from)?;
        let mut records = Vec::with_capacity(index.len().map_err(StoreError::from)? as usize);
        for item in index.iter().map_err(StoreError::from)? {
            let (k, v) = item.map_err(StoreError::from)?;
            let hash = Hash(*k.value());
            let rec: IndexRecord = postcard::from_bytes(v.value())
                .map_err(|e| c(format!("index record of block {hash} does not decode: {e}")))?;
            records.push((hash, rec));
        }
        // Parents before children: heights increase along every branch.
        records.sort_by_key(|(_, r)| r.header.height);
        for (hash, rec) in records {
            let parent_work = if rec.header.height == 0 {
                if hash != self.chain_id {
                    return Err(c(format!(
                        "block {hash} at height 0 is not the genesis block"
                    )));
                }
                0
            } else {
                let parent = self
                    .index
                    .get(&rec.header.prev)
                    .ok_or_else(|| c(format!("block {hash} is stored without its parent")))?;
                if parent.header.height + 1 != rec.header.height {
                    return Err(c(format!(
                        "block {hash} at height {} has its parent at height {}",
                        rec.header.height, parent.header.height
                    )));
                }
                parent.work
            };
            self.children.entry(rec.header.prev).or_default().push(hash);
            self.index.insert(
                hash,
                Entry {
                    work: parent_work.saturating_add(rec.header.target as u128),
                    header: rec.header,
                    invalid: rec.invalid,
                },
            );
        }
        let main = r.open_table(MAIN).map_err(StoreError::from)?;
        for (i, item) in main.iter().map_err(StoreError::from)?.enumerate() {
            let (k, v) = item.map_err(StoreError::from)?;
            if k.value() != i as u64 {
                return Err(c(format!("the main chain has a gap at height {i}")));
            }
            let hash = Hash(*v.value());
            let e = self.index.get(&hash).ok_or_else(|| {
                c(format!(
                    "main-chain block {hash} at height {i} is not in the index"
                ))
            })?;
            if e.header.height != i as u64 || e.invalid {
                return Err(c(format!(
                    "main-chain block {hash} at height {i} is indexed at height {}{}",
                    e.header.height,
                    if e.invalid { ", marked invalid" } else { "" }
                )));
            }
            if i == 0 && hash != self.chain_id {
                return Err(c("the main chain does not start at genesis".into()));
            }
            if i > 0 && e.header.prev != self.main[i - 1] {
                return Err(c(format!(
                    "main-chain block {hash} at height {i} does not extend the block below it"
                )));
            }
            self.main.push(hash);
        }
        let meta = r.open_table(META).map_err(StoreError::from)?;
        let tip = meta
            .get("tip")
            .map_err(StoreError::from)?
            .ok_or_else(|| c("no tip".into()))?
            .value()
            .to_vec();
        if self.main.last().map(|h| h.0.as_slice()) != Some(tip.as_slice()) {
            return Err(c("the tip is not the last main-chain block".into()));
        }
        let tip = *self.main.last().expect("checked just above");
        let blocks = r.open_table(BLOCKS).map_err(StoreError::from)?;
        match blocks.get(&tip.0).map_err(StoreError::from)? {
            Some(v) if decode_block(v.value()).is_ok_and(|b| b.hash() == tip) => {}
            Some(_) => return Err(c(format!("the stored tip block {tip} is damaged"))),
            None => return Err(c(format!("the tip block {tip} is missing"))),
        }
        let undo = r.open_table(UNDO).map_err(StoreError::from)?;
        let undo_count = undo.len().map_err(StoreError::from)?;
        if undo_count != self.main.len() as u64 - 1 {
            return Err(c(format!(
                "{undo_count} undo records for {} main-chain blocks after genesis",
                self.main.len() - 1
            )));
        }
        let stored = meta
            .get(DIGEST_KEY)
            .map_err(StoreError::from)?
            .ok_or_else(|| c("no account-state digest".into()))?
            .value()
            .to_vec();
        let accounts = r.open_table(ACCOUNTS).map_err(StoreError::from)?;
        let actual = scan_digest(&accounts)?;
        if stored != actual.0 {
            return Err(c(
                "the account state does not match the digest committed with the tip \
                 (the accounts table is damaged)"
                    .into(),
            ));
        }
        self.digest = actual;
        Ok(())
    }

    pub fn spec(&self) -> &ChainSpec {
        &self.spec
    }

    /// The genesis hash, which every transfer of this chain carries.
    pub fn chain_id(&self) -> Hash {
        self.chain_id
    }

    pub fn tip(&self) -> TipInfo {
        let hash = *self.main.last().expect("main always holds genesis");
        let e = &self.index[&hash];
        TipInfo {
            height: e.header.height,
            hash,
            work: e.work,
            timestamp: e.header.timestamp,
        }
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.index.contains_key(hash)
    }

    pub fn is_invalid(&self, hash: &Hash) -> bool {
        self.index.get(hash).is_some_and(|e| e.invalid)
    }

    pub fn header(&self, hash: &Hash) -> Option<Header> {
        self.index.get(hash).map(|e| e.header)
    }

    /// How many blocks are held, on every branch.
    pub fn block_count(&self) -> usize {
        self.index.len()
    }

    pub fn hash_at(&self, height: u64) -> Option<Hash> {
        self.main.get(usize::try_from(height).ok()?).copied()
    }

    pub fn on_main(&self, hash: &Hash) -> bool {
        self.index
            .get(hash)
            .is_some_and(|e| self.hash_at(e.header.height) == Some(*hash))
    }

    pub fn block(&self, hash: &Hash) -> Result<Option<Block>, StoreError> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(BLOCKS)?;
        let v = t.get(&hash.0)?;
        v.map(|v| decode_block(v.value())).transpose()
    }

    /// The stored bytes of a block: what sync serves without re-encoding.
    pub fn block_bytes(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(BLOCKS)?;
        let v = t.get(&hash.0)?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    pub fn account(&self, addr: &Address) -> Result<Account, StoreError> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(ACCOUNTS)?;
        let v = t.get(&addr.0)?;
        Ok(v.map(|v| {
            let (balance, nonce) = v.value();
            Account { balance, nonce }
        })
        .unwrap_or_default())
    }

    pub fn tx_location(&self, id: &Hash) -> Result<Option<TxLocation>, StoreError> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(TXS)?;
        let Some(v) = t.get(&id.0)? else {
            return Ok(None);
        };
        let (height, position) = v.value();
        let block = self
            .hash_at(height)
            .ok_or_else(|| corrupt("transaction index points past the tip"))?;
        Ok(Some(TxLocation {
            height,
            block,
            position,
        }))
    }

    /// Hashes of the main chain, dense near the tip and exponentially sparser toward genesis
    /// (always last): a peer finds our fork point with it in one round trip.
    pub fn locator(&self) -> Vec<Hash> {
        let mut out = vec![];
        let mut h = self.main.len() as i64 - 1;
        let mut step = 1;
        while h > 0 {
            out.push(self.main[h as usize]);
            if out.len() >= 10 {
                step *= 2;
            }
            h -= step;
        }
        out.push(self.main[0]);
        out
    }

    /// Main-chain headers after the first locator hash that is on our main chain (after genesis
    /// if none is), at most `max`.
    pub fn headers_after(&self, locator: &[Hash], max: usize) -> Vec<Header> {
        let start = locator
            .iter()
            .find(|h| self.on_main(h))
            .map(|h| self.index[h].header.height + 1)
            .unwrap_or(1);
        self.main
            .iter()
            .skip(start as usize)
            .take(max)
            .map(|h| self.index[h].header)
            .collect()
    }

    /// The ancestor of `hash` at `height` (which must not exceed `hash`'s height).
    fn ancestor(&self, mut hash: Hash, height: u64) -> Hash {
        loop {
            let e = &self.index[&hash];
            if e.header.height == height {
                return hash;
            }
            if self.hash_at(e.header.height) == Some(hash) {
                return self.main[height as usize];
            }
            hash = e.header.prev;
        }
    }

    /// The difficulty a child of `parent` must carry.
    pub fn expected_difficulty(&self, parent: &Hash) -> u64 {
        let p = &self.index[parent].header;
        let height = p.height + 1;
        let interval = self.spec.retarget_interval;
        // The first period keeps the genesis difficulty: genesis has a fixed, old timestamp.
        if interval == 0 || !height.is_multiple_of(interval) || height < 2 * interval {
            return p.target;
        }
        let first = &self.index[&self.ancestor(*parent, height - interval)].header;
        let expected = (interval - 1) as u128 * self.spec.block_interval_ms as u128;
        let f = self.spec.max_retarget_factor as u128;
        let actual = (p.timestamp.saturating_sub(first.timestamp) as u128)
            .clamp((expected / f).max(1), expected * f);
        let next = p.target as u128 * expected / actual;
        next.clamp(self.spec.min_difficulty as u128, u64::MAX as u128) as u64
    }

    /// The median timestamp of `parent` and its ancestors, `median_time_span` of them at most.
    pub fn median_time_past(&self, parent: &Hash) -> Millis {
        let mut times = Vec::with_capacity(self.spec.median_time_span);
        let mut h = *parent;
        while times.len() < self.spec.median_time_span {
            let e = &self.index[&h];
            times.push(e.header.timestamp);
            if e.header.height == 0 {
                break;
            }
            h = e.header.prev;
        }
        times.sort_unstable();
        times[times.len() / 2]
    }

    /// The header fields of a block extending the tip at `now` (nonce 0, Merkle root empty).
    pub fn next_header(&self, now: Millis) -> Header {
        let tip = self.tip();
        Header {
            version: BLOCK_VERSION,
            height: tip.height + 1,
            prev: tip.hash,
            merkle_root: Hash::ZERO,
            timestamp: now.max(self.median_time_past(&tip.hash) + 1),
            target: self.expected_difficulty(&tip.hash),
            nonce: 0,
        }
    }

    /// All checks a block can pass without state; its parent must be in the index.
    pub fn check(&self, block: &Block, now: Millis) -> Result<(), BlockError> {
        let h = &block.header;
        if h.version != BLOCK_VERSION {
            return Err(BlockError::Version(h.version));
        }
        if !h.meets_target() {
            return Err(BlockError::BadProofOfWork(h.target));
        }
        let parent = &self.index[&h.prev];
        if parent.invalid {
            return Err(BlockError::InvalidParent(h.prev));
        }
        if h.height != parent.header.height + 1 {
            return Err(BlockError::BadHeight {
                parent: parent.header.height,
                got: h.height,
            });
        }
        let expected = self.expected_difficulty(&h.prev);
        if h.target != expected {
            return Err(BlockError::BadDifficulty {
                expected,
                got: h.target,
            });
        }
        let median = self.median_time_past(&h.prev);
        if h.timestamp <= median {
            return Err(BlockError::TimeTooOld {
                median,
                got: h.timestamp,
            });
        }
        let drift_ms = self.spec.max_future_drift_ms;
        if h.timestamp > now.saturating_add(drift_ms) {
            return Err(BlockError::TimeTooNew {
                now,
                drift_ms,
                got: h.timestamp,
            });
        }
        check_body(block, &self.spec, &self.chain_id)
    }

    /// Adds a block: checks it, stores it, and moves the main chain to it if it now has the
    /// most work. Main-chain changes are queued for [`Chain::take_reorgs`].
    pub fn add_block(&mut self, block: &Block, now: Millis) -> Result<AddOutcome, BlockError> {
        let hash = block.hash();
        if let Some(e) = self.index.get(&hash) {
            return if e.invalid {
                Err(BlockError::KnownInvalid)
            } else {
                Ok(AddOutcome::Duplicate)
            };
        }
        if !self.index.contains_key(&block.header.prev) {
            return Ok(AddOutcome::MissingParent(block.header.prev));
        }
        self.check(block, now)?;

        // Not fsynced on its own: the main-chain change that usually follows commits durably,
        // and a durable commit persists the non-durable ones before it. A side-chain block lost
        // in a crash is simply fetched again.
        let mut w = self.db()?.begin_write().map_err(StoreError::from)?;
        w.set_durability(redb::Durability::None);
        {
            let rec = postcard::to_allocvec(&IndexRecord {
                header: block.header,
                invalid: false,
            })
            .map_err(StoreError::from)?;
            w.open_table(INDEX)
                .map_err(StoreError::from)?
                .insert(&hash.0, rec.as_slice())
                .map_err(StoreError::from)?;
            w.open_table(BLOCKS)
                .map_err(StoreError::from)?
                .insert(&hash.0, block.encode().as_slice())
                .map_err(StoreError::from)?;
        }
        w.commit().map_err(StoreError::from)?;
        let work = self.index[&block.header.prev].work + block.header.target as u128;
        self.index.insert(
            hash,
            Entry {
                header: block.header,
                work,
                invalid: false,
            },
        );
        self.children
            .entry(block.header.prev)
            .or_default()
            .push(hash);

        if work > self.tip().work {
            self.activate_best(Some(hash))?;
        }
        if self.index[&hash].invalid {
            return Err(match &self.last_failure {
                Some((bad, e)) if *bad == hash => e.clone(),
                Some((bad, _)) => BlockError::InvalidParent(*bad),
                None => BlockError::KnownInvalid,
            });
        }
        Ok(AddOutcome::Stored {
            tip: self.tip().hash == hash,
        })
    }

    /// The valid block with the most work (the current tip wins ties).
    fn best_candidate(&self) -> Hash {
        let tip = self.tip();
        let mut best = (tip.work, tip.hash);
        for (h, e) in &self.index {
            if !e.invalid && e.work > best.0 {
                best = (e.work, *h);
            }
        }
        best.1
    }

    /// Moves the main chain to the best candidate, marking invalid whatever fails on the way
    /// and trying the next best, until the tip is the best valid block (invariant 3).
    ///
    /// `new` is a block just added with more work than the tip: since invariant 3 held before
    /// it arrived, it is the best candidate, and the index is scanned only after a failure
    /// (or at start-up). Scanning on every new tip would make a sync quadratic.
    fn activate_best(&mut self, new: Option<Hash>) -> Result<(), StoreError> {
        let mut hint = new;
        loop {
            let best = match hint.take() {
                Some(h) => h,
                None => self.best_candidate(),
            };
            if best == self.tip().hash {
                return Ok(());
            }
            match self.reorg_to(best)? {
                Ok(reorg) => self.reorgs.push(reorg),
                Err((bad, e)) => {
                    self.mark_invalid(bad)?;
                    self.last_failure = Some((bad, e));
                }
            }
        }
    }

    /// One write transaction: disconnect down to the fork point, connect up to `target`. On a
    /// block that fails, the transaction is aborted and that block is returned.
    #[allow(clippy::type_complexity)]
    fn reorg_to(&mut self, target: Hash) -> Result<Result<Reorg, (Hash, BlockError)>, StoreError> {
        let mut connect = vec![];
        let mut h = target;
        while !self.on_main(&h) {
            connect.push(h);
            h = self.index[&h].header.prev;
        }
        connect.reverse();
        let fork_height = self.index[&h].header.height;
        let tip_height = self.tip().height;

        let w = self.db()?.begin_write()?;
        let mut reorg = Reorg::default();
        // Updated with every account changed; committed with the tip, adopted after commit.
        let mut digest = self.digest;
        let outcome = (|| -> Result<Result<(), (Hash, BlockError)>, StoreError> {
            let blocks = w.open_table(BLOCKS)?;
            let mut accounts = w.open_table(ACCOUNTS)?;
            let mut undo_t = w.open_table(UNDO)?;
            let mut main_t = w.open_table(MAIN)?;
            let mut txs_t = w.open_table(TXS)?;
            for height in (fork_height + 1..=tip_height).rev() {
                let hash = self.main[height as usize];
                let block = decode_block(
                    blocks
                        .get(&hash.0)?
                        .ok_or_else(|| corrupt("main-chain block missing"))?
                        .value(),
                )?;
                let undo: Vec<(Address, Account)> = postcard::from_bytes(
                    undo_t
                        .get(&hash.0)?
                        .ok_or_else(|| corrupt("undo data missing"))?
                        .value(),
                )?;
                let mut state = TableAccounts {
                    table: &mut accounts,
                    digest: &mut digest,
                };
                for (a, before) in undo.into_iter().rev() {
                    state.set(a, before)?;
                }
                for id in block.tx_ids() {
                    txs_t.remove(&id.0)?;
                }
                main_t.remove(height)?;
                undo_t.remove(&hash.0)?;
                reorg.disconnected.push(block);
            }
            for hash in &connect {
                let block = decode_block(
                    blocks
                        .get(&hash.0)?
                        .ok_or_else(|| corrupt("indexed block missing"))?
                        .value(),
                )?;
                let mut state = TableAccounts {
                    table: &mut accounts,
                    digest: &mut digest,
                };
                let undo = match apply_block(&mut state, &block, &self.spec) {
                    Ok(undo) => undo,
                    Err(BlockError::Storage(e)) => return Err(e),
                    Err(e) => return Ok(Err((*hash, e))),
                };
                undo_t.insert(&hash.0, postcard::to_allocvec(&undo)?.as_slice())?;
                for (pos, id) in block.tx_ids().into_iter().enumerate() {
                    txs_t.insert(&id.0, (block.header.height, pos as u32))?;
                }
                main_t.insert(block.header.height, &hash.0)?;
                reorg.connected.push(block);
            }
            let mut meta = w.open_table(META)?;
            meta.insert("tip", target.0.as_slice())?;
            meta.insert(DIGEST_KEY, digest.0.as_slice())?;
            Ok(Ok(()))
        })()?;
        if let Err(bad) = outcome {
            w.abort()?;
            return Ok(Err(bad));
        }
        w.commit()?;
        self.digest = digest;
        self.main.truncate(fork_height as usize + 1);
        self.main.extend(connect);
        Ok(Ok(reorg))
    }

    /// Marks `hash` and all its descendants invalid, on disk and then in memory (so that a
    /// failed commit, a storage error, leaves nothing marked: a storage error is never taken
    /// for an invalid block).
    fn mark_invalid(&mut self, hash: Hash) -> Result<(), StoreError> {
        let mut queue = VecDeque::from([hash]);
        let mut marked = vec![];
        let w = self.db()?.begin_write()?;
        {
            let mut index = w.open_table(INDEX)?;
            while let Some(h) = queue.pop_front() {
                let Some(e) = self.index.get(&h) else {
                    continue;
                };
                let rec = postcard::to_allocvec(&IndexRecord {
                    header: e.header,
                    invalid: true,
                })?;
                index.insert(&h.0, rec.as_slice())?;
                marked.push(h);
                queue.extend(self.children.get(&h).into_iter().flatten().copied());
            }
        }
        w.commit()?;
        for h in marked {
            if let Some(e) = self.index.get_mut(&h) {
                e.invalid = true;
            }
        }
        Ok(())
    }

    /// Main-chain changes since the last call, oldest first.
    pub fn take_reorgs(&mut self) -> Vec<Reorg> {
        std::mem::take(&mut self.reorgs)
    }

    /// All stored accounts (for consistency checks and tests).
    pub fn all_accounts(&self) -> Result<HashMap<Address, Account>, StoreError> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(ACCOUNTS)?;
        let mut out = HashMap::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let (balance, nonce) = v.value();
            out.insert(Address(*k.value()), Account { balance, nonce });
        }
        Ok(out)
    }

    /// Replays the main chain from genesis and compares with the stored state, the
    /// transaction index and the undo data: invariants 2 and 4, checked from scratch. Never
    /// panics: a panic of the database engine on a damaged page is an error too.
    pub fn verify_consistency(&self) -> Result<(), String> {
        catch_quietly(|| self.replay_and_compare()).unwrap_or_else(|panic| {
            Err(format!(
                "the database engine failed reading the file ({})",
                panic_message(&panic)
            ))
        })
    }

    fn replay_and_compare(&self) -> Result<(), String> {
        let mut state = genesis_state(&self.spec);
        let r = self
            .db()
            .map_err(|e| e.to_string())?
            .begin_read()
            .map_err(|e| e.to_string())?;
        let txs_t = r.open_table(TXS).map_err(|e| e.to_string())?;
        let undo_t = r.open_table(UNDO).map_err(|e| e.to_string())?;
        let mut tx_count = 0u64;
        for (height, hash) in self.main.iter().enumerate().skip(1) {
            let block = self
                .block(hash)
                .map_err(|e| e.to_string())?
                .ok_or(format!("main-chain block {hash} missing"))?;
            if block.header.height != height as u64 {
                return Err(format!(
                    "block {hash} is at height {height} of the main chain"
                ));
            }
            if block.header.prev != self.main[height - 1] {
                return Err(format!("block {hash} does not extend its predecessor"));
            }
            apply_block(&mut state, &block, &self.spec)
                .map_err(|e| format!("main-chain block {hash} does not apply: {e}"))?;
            if undo_t.get(&hash.0).map_err(|e| e.to_string())?.is_none() {
                return Err(format!("no undo data for {hash}"));
            }
            for id in block.tx_ids() {
                let loc = txs_t.get(&id.0).map_err(|e| e.to_string())?;
                if loc.map(|v| v.value().0) != Some(height as u64) {
                    return Err(format!("transaction {id} is not indexed at {height}"));
                }
                tx_count += 1;
            }
        }
        let indexed = txs_t.len().map_err(|e| e.to_string())?;
        if indexed != tx_count {
            return Err(format!(
                "{indexed} transactions indexed, {tx_count} on the main chain"
            ));
        }
        let stored = self.all_accounts().map_err(|e| e.to_string())?;
        if AccountsDigest::of(&stored) != self.digest {
            return Err("the stored account state does not match its committed digest".into());
        }
        if stored != state {
            return Err(format!(
                "stored state ({} accounts) differs from the replayed main chain ({} accounts)",
                stored.len(),
                state.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that holds blocks but has lost its chain id is damaged, not a new store: even
    /// one block (the genesis alone) makes the open fail as `Corrupt`.
    #[test]
    fn a_store_holding_one_block_but_no_chain_id_is_refused_as_damaged() {
        let mut chain = Chain::in_memory(ChainSpec::test("test-meta")).unwrap();
        assert_eq!(chain.block_count(), 1);
        let w = chain.db().unwrap().begin_write().unwrap();
        w.open_table(META).unwrap().remove("chain_id").unwrap();
        w.commit().unwrap();
        let e = chain.reopen().unwrap_err();
        assert!(
            matches!(&e, OpenError::Corrupt(m) if m == "1 blocks are stored but the chain id is missing"),
            "{e:?}"
        );
    }

    const NOW: Millis = 4_000_000_000_000;

    fn spec() -> ChainSpec {
        ChainSpec::test("test-chain-unit")
    }

    /// A block on `parent` with just a coinbase to `miner` (difficulty 1: any nonce works).
    fn block_on(chain: &Chain, parent: &Header, miner: u8) -> Block {
        let txs = vec![Transaction::Coinbase(Coinbase {
            height: parent.height + 1,
            to: Address([miner; 32]),
            amount: chain.spec().block_reward,
        })];
        let header = Header {
            version: BLOCK_VERSION,
            height: parent.height + 1,
            prev: parent.hash(),
            merkle_root: merkle_root(&[txs[0].id()]),
            timestamp: parent.timestamp + 1000,
            target: 1,
            nonce: 0,
        };
        Block { header, txs }
    }

    /// A chain holding genesis, `a` and `b` (siblings at height 1) and `c` on `a`: the main
    /// chain is genesis, `a`, `c`.
    fn forked() -> (Chain, [Block; 3]) {
        let mut chain = Chain::in_memory(spec()).unwrap();
        let g = chain.header(&chain.chain_id()).unwrap();
        let a = block_on(&chain, &g, 1);
        let b = block_on(&chain, &g, 2);
        let c = block_on(&chain, &a.header, 1);
        for x in [&a, &b, &c] {
            chain.add_block(x, NOW).unwrap();
        }
        assert_eq!(chain.tip().hash, c.hash());
        (chain, [a, b, c])
    }

    /// Runs `damage` on the store in one write transaction, then reopens the chain.
    fn reopen_after(chain: &mut Chain, damage: impl FnOnce(&redb::WriteTransaction)) -> OpenError {
        let w = chain.db().unwrap().begin_write().unwrap();
        damage(&w);
        w.commit().unwrap();
        chain.reopen().unwrap_err()
    }

    fn assert_corrupt(e: &OpenError, want: &str) {
        assert!(
            matches!(e, OpenError::Corrupt(m) if m == want),
            "{e:?}, not {want:?}"
        );
    }

    /// The block count covers every branch: genesis alone is 1, and genesis with two
    /// siblings and a child of one of them is 4.
    #[test]
    fn the_block_count_counts_blocks_on_every_branch() {
        assert_eq!(Chain::in_memory(spec()).unwrap().block_count(), 1);
        assert_eq!(forked().0.block_count(), 4);
    }

    /// Every main-chain block must be valid in the index: a store whose main chain holds a
    /// block marked invalid (at its right height) is refused at open as `Corrupt`.
    #[test]
    fn a_main_chain_block_marked_invalid_in_the_index_is_refused_at_open() {
        let (mut chain, [a, _, _]) = forked();
        let e = reopen_after(&mut chain, |w| {
            let rec = postcard::to_allocvec(&IndexRecord {
                header: a.header,
                invalid: true,
            })
            .unwrap();
            let mut index = w.open_table(INDEX).unwrap();
            index.insert(&a.hash().0, rec.as_slice()).unwrap();
        });
        let want = format!(
            "main-chain block {} at height 1 is indexed at height 1, marked invalid",
            a.hash()
        );
        assert_corrupt(&e, &want);
    }

    /// Each main-chain block must extend the one below it: a main chain of genesis, `b`, `c`
    /// (heights right, but `c` is built on `a`) is refused at open.
    #[test]
    fn a_main_chain_block_that_does_not_extend_the_one_below_is_refused_at_open() {
        let (mut chain, [_, b, c]) = forked();
        let e = reopen_after(&mut chain, |w| {
            let mut main = w.open_table(MAIN).unwrap();
            main.insert(1, &b.hash().0).unwrap();
        });
        let want = format!(
            "main-chain block {} at height 2 does not extend the block below it",
            c.hash()
        );
        assert_corrupt(&e, &want);
    }

    /// The stored tip block must decode and hash to the tip: bytes that do not decode, or
    /// another well-formed block, under the tip's key are refused at open.
    #[test]
    fn a_stored_tip_block_that_is_not_the_tip_is_refused_at_open() {
        let other = forked().1[1].encode();
        for bytes in [vec![0xff; 8], other] {
            let (mut chain, [_, _, c]) = forked();
            let e = reopen_after(&mut chain, |w| {
                let mut blocks = w.open_table(BLOCKS).unwrap();
                blocks.insert(&c.hash().0, bytes.as_slice()).unwrap();
            });
            assert_corrupt(&e, &format!("the stored tip block {} is damaged", c.hash()));
        }
    }

    /// A chain of `n` blocks after genesis on one branch.
    fn linear(n: u64) -> Chain {
        let mut chain = Chain::in_memory(spec()).unwrap();
        for _ in 0..n {
            let tip = chain.header(&chain.tip().hash).unwrap();
            let b = block_on(&chain, &tip, 1);
            chain.add_block(&b, NOW).unwrap();
        }
        chain
    }

    /// The stored bytes of a block are exactly its encoding; an unknown hash has none.
    #[test]
    fn block_bytes_are_the_stored_encoding_and_none_for_an_unknown_block() {
        let (chain, [a, _, _]) = forked();
        assert_eq!(chain.block_bytes(&a.hash()).unwrap(), Some(a.encode()));
        assert_eq!(chain.block_bytes(&Hash::of(b"unknown")).unwrap(), None);
    }

    /// The locator lists the 10 highest main-chain blocks one by one, then doubles its step
    /// after each further entry, and ends with genesis exactly once.
    #[test]
    fn the_locator_is_ten_dense_hashes_then_doubling_steps_then_genesis() {
        let chain = linear(30);
        let heights: Vec<u64> = (21..=30).rev().chain([19, 15, 7, 0]).collect();
        let want: Vec<Hash> = heights.iter().map(|h| chain.hash_at(*h).unwrap()).collect();
        assert_eq!(chain.locator(), want);
        let genesis_only = linear(0);
        assert_eq!(genesis_only.locator(), vec![genesis_only.chain_id()]);
    }

    /// Headers are served from just after the first locator hash on our main chain (from
    /// height 1 when none is), at most `max` of them.
    #[test]
    fn headers_after_start_just_above_the_first_known_locator_hash() {
        let chain = linear(10);
        let heights = |hs: Vec<Header>| hs.iter().map(|h| h.height).collect::<Vec<_>>();
        let at5 = chain.hash_at(5).unwrap();
        let unknown = Hash::of(b"unknown");
        assert_eq!(heights(chain.headers_after(&[unknown, at5], 3)), [6, 7, 8]);
        assert_eq!(heights(chain.headers_after(&[unknown], 2)), [1, 2]);
    }

    /// A mined block on `parent`, `dt` ms after it, at the difficulty the chain expects.
    fn mined_on(chain: &mut Chain, parent: &Header, miner: u8, dt: u64) -> Header {
        let mut b = block_on(chain, parent, miner);
        b.header.timestamp = parent.timestamp + dt;
        b.header.target = chain.expected_difficulty(&parent.hash());
        b.header.nonce = crate::block::search_nonce(&b.header, 0, 1_000_000).unwrap();
        let r = chain.add_block(&b, NOW);
        assert!(matches!(r, Ok(AddOutcome::Stored { .. })), "{r:?}");
        b.header
    }

    /// A retarget scales the difficulty by (interval − 1)·block_interval over the time the last
    /// interval took, measured from the parent's own ancestor, also on a side branch that
    /// forks below it: interval 4, blocks 500 ms apart on the main chain give 1000·3000/1500.
    #[test]
    fn a_retarget_uses_the_time_since_the_parents_own_ancestor_one_interval_back() {
        let spec = ChainSpec {
            initial_difficulty: 1000,
            min_difficulty: 1,
            retarget_interval: 4,
            block_interval_ms: 1000,
            ..spec()
        };
        let mut chain = Chain::in_memory(spec).unwrap();
        let mut main = vec![chain.header(&chain.chain_id()).unwrap()];
        for _ in 1..=7 {
            let parent = *main.last().unwrap();
            main.push(mined_on(&mut chain, &parent, 1, 500));
        }
        let mut side = main[2];
        for _ in 3..=7 {
            side = mined_on(&mut chain, &side, 2, 700);
        }
        assert_eq!(chain.tip().hash, main[7].hash());
        // Heights 1 to 7 keep the genesis difficulty (no retarget before height 8).
        assert!(main[1..].iter().all(|h| h.target == 1000));
        assert_eq!(
            chain.expected_difficulty(&main[7].hash()),
            1000 * 3000 / 1500
        );
        // The side branch's own block at height 4 is 3 × 700 ms before its height-7 block.
        assert_eq!(chain.expected_difficulty(&side.hash()), 1000 * 3000 / 2100);
    }

    /// The consistency check replays the main chain: a sound store passes, and one whose
    /// account table no longer equals the replayed state (one balance off by one) fails.
    #[test]
    fn verify_consistency_passes_a_sound_store_and_fails_one_balance_off_by_one() {
        let (chain, _) = forked();
        chain.verify_consistency().unwrap();
        let miner = Address([1; 32]);
        let acct = chain.account(&miner).unwrap();
        let w = chain.db().unwrap().begin_write().unwrap();
        {
            let mut accounts = w.open_table(ACCOUNTS).unwrap();
            accounts
                .insert(&miner.0, (acct.balance + 1, acct.nonce))
                .unwrap();
        }
        w.commit().unwrap();
        assert!(chain.verify_consistency().is_err());
    }

    /// A caught panic is reported with its own message, whether it was raised with a literal
    /// or a formatted `String`; only a payload of another type gets the generic text.
    #[test]
    fn a_caught_panic_is_reported_with_its_own_message() {
        let literal = catch_quietly(|| panic!("page checksum mismatch")).unwrap_err();
        assert_eq!(panic_message(&literal), "page checksum mismatch");
        let formatted = catch_quietly(|| panic!("bad page {}", 7)).unwrap_err();
        assert_eq!(panic_message(&formatted), "bad page 7");
        let other = catch_quietly(|| std::panic::panic_any(42u32)).unwrap_err();
        assert_eq!(panic_message(&other), "a panic without a message");
    }

    /// At open, an I/O error of kind `UnexpectedEof` or `InvalidData` means a damaged file
    /// (`Corrupt`); any other I/O error, such as a full disk, is a storage error (`Store`).
    #[test]
    fn only_eof_and_invalid_data_io_errors_at_open_count_as_damage() {
        let io = |e: std::io::Error| redb::DatabaseError::Storage(redb::StorageError::Io(e));
        for kind in [
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::InvalidData,
        ] {
            let e = open_error(io(std::io::Error::new(kind, "short read")));
            assert!(
                matches!(&e, OpenError::Corrupt(m) if m == "short read"),
                "{kind:?}: {e:?}"
            );
        }
        for e in [
            std::io::Error::from_raw_os_error(28), // ENOSPC
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
        ] {
            let e = open_error(io(e));
            assert!(matches!(e, OpenError::Store(_)), "{e:?}");
        }
    }
}
