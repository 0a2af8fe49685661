//! The client-server ledger: the same signed transfers as the peer-to-peer chain, ordered by
//! the server alone.
//!
//! A transfer is checked exactly as a node checks it (chain id, fields, signature, nonce and
//! balance through [`meshwork_ledger::chain::apply_transfer`]), and is then *final* the moment
//! it is committed: there are no blocks, no proof of work and no forks, because the server is
//! the authority. Transfers signed for a network are valid here when the server runs that
//! network's spec, since the chain id is the same genesis hash.
//!
//! Invariants, kept by [`CentralLedger::submit`] (one redb write transaction per transfer,
//! durable on commit):
//! - the log is dense: sequence numbers 1..=count, each a transfer that applied;
//! - `accounts` equals genesis plus the log replayed in order ([`CentralLedger::verify`]);
//! - `head(s) = H(head(s-1) ‖ id(s))`, `head(0)` the chain id: a client holding a head can
//!   check that the server did not rewrite the log before it;
//! - every logged transfer is in the id index, so a replay is refused as already confirmed.

use std::collections::HashMap;
use std::sync::Arc;

use meshwork_ledger::chain::{apply_transfer, check_transfer_fields, genesis_block, Accounts};
use meshwork_ledger::{Account, Address, BlockError, ChainSpec, Hash, SignedTransfer, TxError};
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::store::{Store, StoreError};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("ledger_meta");
/// sequence → encoded transfer.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger_log");
/// transfer id → (sequence, log head after it).
const TXIDX: TableDefinition<&[u8; 32], (u64, &[u8; 32])> = TableDefinition::new("ledger_txs");
/// address → (balance, nonce).
const ACCOUNTS: TableDefinition<&[u8; 32], (u64, u64)> = TableDefinition::new("ledger_accounts");
/// (address, sequence) of every transfer that debits or credits the address.
const HISTORY: TableDefinition<(&[u8; 32], u64), ()> = TableDefinition::new("ledger_history");

const SPEC_KEY: &str = "spec";
const HEAD_KEY: &str = "head";
const COUNT_KEY: &str = "count";

/// At most this many entries in one history or log page.
pub const MAX_PAGE: usize = 1000;

/// Errors of [`CentralLedger`].
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The transfer is invalid (the client's error: HTTP 400).
    #[error("transaction refused: {0}")]
    Refused(#[from] TxError),
    #[error("the store was created for another chain spec (network {stored:?}); use its spec or another data directory")]
    OtherSpec { stored: String },
    /// The stored ledger contradicts itself (found at open or while reading it).
    #[error("the stored ledger is inconsistent: {0}")]
    Inconsistent(String),
    /// The store is down after a storage error (HTTP 503): nothing was recorded.
    #[error("{0}")]
    Unavailable(StoreError),
    #[error("store: {0}")]
    Store(String),
}

impl From<StoreError> for LedgerError {
    fn from(e: StoreError) -> Self {
        match e {
            e @ StoreError::Unavailable { .. } => LedgerError::Unavailable(e),
            e => LedgerError::Store(e.to_string()),
        }
    }
}

impl From<redb::Error> for LedgerError {
    fn from(e: redb::Error) -> Self {
        LedgerError::Store(e.to_string())
    }
}

macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for LedgerError {
            fn from(e: $t) -> Self {
                LedgerError::Store(e.to_string())
            }
        }
    )*};
}
store_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    meshwork_ledger::StoreError
);

/// Where a transfer sits in the server's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub id: Hash,
    pub seq: u64,
    /// The log head after this transfer.
    pub head: Hash,
}

/// The server's ledger in its [`Store`].
pub struct CentralLedger {
    store: Arc<Store>,
    spec: ChainSpec,
    chain_id: Hash,
}

/// `Accounts` over an open write transaction's table.
struct TableAccounts<'a, 't>(&'a mut redb::Table<'t, &'static [u8; 32], (u64, u64)>);

impl Accounts for TableAccounts<'_, '_> {
    fn get(&mut self, addr: &Address) -> Result<Account, meshwork_ledger::StoreError> {
        let v = self
            .0
            .get(&addr.0)
            .map_err(|e| meshwork_ledger::StoreError(e.to_string()))?;
        Ok(v.map(|g| {
            let (balance, nonce) = g.value();
            Account { balance, nonce }
        })
        .unwrap_or_default())
    }
    fn set(&mut self, addr: Address, a: Account) -> Result<(), meshwork_ledger::StoreError> {
        self.0
            .insert(&addr.0, (a.balance, a.nonce))
            .map_err(|e| meshwork_ledger::StoreError(e.to_string()))?;
        Ok(())
    }
}

fn next_head(head: &Hash, id: &Hash) -> Hash {
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(&head.0);
    buf[32..].copy_from_slice(&id.0);
    Hash::of(&buf)
}

impl CentralLedger {
    /// Opens (or creates, with the spec's genesis allocations) the ledger in `store`.
    ///
    /// An existing ledger passes a cheap consistency check first (the head and count are
    /// readable, the log holds exactly `count` entries ending at `count`, and the id index
    /// as many): [`LedgerError::Inconsistent`] otherwise. The full replay is
    /// [`CentralLedger::verify`].
    pub fn open(store: Arc<Store>, spec: ChainSpec) -> Result<CentralLedger, LedgerError> {
        let chain_id = genesis_block(&spec).hash();
        let spec_hash = spec.hash();
        let db = store.db()?;
        let w = db.begin_write()?;
        let mut existing = false;
        {
            let mut meta = w.open_table(META)?;
            let stored = meta.get(SPEC_KEY)?.map(|v| v.value().to_vec());
            match stored {
                Some(h) if h != spec_hash.0 => {
                    return Err(LedgerError::OtherSpec {
                        stored: meta
                            .get("network")?
                            .map(|v| String::from_utf8_lossy(v.value()).into_owned())
                            .unwrap_or_default(),
                    })
                }
                Some(_) => existing = true,
                None => {
                    meta.insert(SPEC_KEY, spec_hash.0.as_slice())?;
                    meta.insert("network", spec.name.as_bytes())?;
                    meta.insert(HEAD_KEY, chain_id.0.as_slice())?;
                    meta.insert(COUNT_KEY, 0u64.to_le_bytes().as_slice())?;
                    let mut accounts = w.open_table(ACCOUNTS)?;
                    for (addr, acct) in meshwork_ledger::chain::genesis_state(&spec) {
                        accounts.insert(&addr.0, (acct.balance, acct.nonce))?;
                    }
                }
            }
            w.open_table(LOG)?;
            w.open_table(TXIDX)?;
            w.open_table(HISTORY)?;
        }
        if existing {
            check_counts(&w)?;
        }
        w.commit()?;
        Ok(CentralLedger {
            store,
            spec,
            chain_id,
        })
    }

    pub fn spec(&self) -> &ChainSpec {
        &self.spec
    }

    pub fn chain_id(&self) -> Hash {
        self.chain_id
    }

    /// Checks and orders one transfer. Callers serialize submits (the HTTP layer holds a
    /// mutex), so the nonce checked is the nonce committed.
    pub fn submit(&self, t: &SignedTransfer) -> Result<Receipt, LedgerError> {
        check_transfer_fields(t, &self.spec, &self.chain_id)?;
        if !t.verify() {
            return Err(TxError::BadSignature.into());
        }
        let id = t.id();
        let w = self.store.db()?.begin_write()?;
        let receipt;
        {
            let mut txidx = w.open_table(TXIDX)?;
            if let Some(g) = txidx.get(&id.0)? {
                let height = g.value().0;
                return Err(TxError::AlreadyConfirmed { height }.into());
            }
            let mut accounts = w.open_table(ACCOUNTS)?;
            match apply_transfer(&mut TableAccounts(&mut accounts), t) {
                Ok(()) => {}
                Err(BlockError::Tx { error, .. }) => return Err(error.into()),
                Err(e) => return Err(LedgerError::Store(e.to_string())),
            }
            let mut meta = w.open_table(META)?;
            let (head, count) = read_head(&meta)?;
            let seq = count + 1;
            let head = next_head(&head, &id);
            meta.insert(HEAD_KEY, head.0.as_slice())?;
            meta.insert(COUNT_KEY, seq.to_le_bytes().as_slice())?;
            w.open_table(LOG)?.insert(seq, t.encode().as_slice())?;
            txidx.insert(&id.0, (seq, &head.0))?;
            let mut hist = w.open_table(HISTORY)?;
            hist.insert((&t.transfer.from.0, seq), ())?;
            hist.insert((&t.transfer.to.0, seq), ())?;
            receipt = Receipt { id, seq, head };
        }
        // Durable before the client hears "accepted": redb's default durability fsyncs.
        w.commit()?;
        Ok(receipt)
    }

    /// (log head, number of transfers).
    pub fn head(&self) -> Result<(Hash, u64), LedgerError> {
        let r = self.store.db()?.begin_read()?;
        let meta = r.open_table(META)?;
        read_head(&meta)
    }

    pub fn account(&self, addr: &Address) -> Result<Account, LedgerError> {
        let r = self.store.db()?.begin_read()?;
        let t = r.open_table(ACCOUNTS)?;
        Ok(t.get(&addr.0)?
            .map(|g| {
                let (balance, nonce) = g.value();
                Account { balance, nonce }
            })
            .unwrap_or_default())
    }

    pub fn receipt(&self, id: &Hash) -> Result<Option<Receipt>, LedgerError> {
        let r = self.store.db()?.begin_read()?;
        let t = r.open_table(TXIDX)?;
        Ok(t.get(&id.0)?.map(|g| {
            let (seq, head) = g.value();
            Receipt {
                id: *id,
                seq,
                head: Hash(*head),
            }
        }))
    }

    /// Log entries with sequence numbers after `after`, at most `limit` (≤ [`MAX_PAGE`]).
    pub fn log_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SignedTransfer)>, LedgerError> {
        let r = self.store.db()?.begin_read()?;
        let t = r.open_table(LOG)?;
        let mut out = vec![];
        for e in t
            .range(after.saturating_add(1)..)?
            .take(limit.min(MAX_PAGE))
        {
            let (k, v) = e?;
            let tx = SignedTransfer::decode(v.value())
                .map_err(|e| LedgerError::Inconsistent(format!("log entry {}: {e}", k.value())))?;
            out.push((k.value(), tx));
        }
        Ok(out)
    }

    /// The transfers touching `addr`, newest first, at most `limit` (≤ [`MAX_PAGE`]).
    pub fn history(
        &self,
        addr: &Address,
        limit: usize,
    ) -> Result<Vec<(u64, SignedTransfer)>, LedgerError> {
        let r = self.store.db()?.begin_read()?;
        let hist = r.open_table(HISTORY)?;
        let log = r.open_table(LOG)?;
        let mut out = vec![];
        for e in hist
            .range((&addr.0, 0u64)..=(&addr.0, u64::MAX))?
            .rev()
            .take(limit.min(MAX_PAGE))
        {
            let (k, _) = e?;
            let seq = k.value().1;
            let bytes = log.get(seq)?.ok_or_else(|| {
                LedgerError::Inconsistent(format!("history names missing entry {seq}"))
            })?;
            let tx = SignedTransfer::decode(bytes.value())
                .map_err(|e| LedgerError::Inconsistent(format!("log entry {seq}: {e}")))?;
            out.push((seq, tx));
        }
        Ok(out)
    }

    /// Replays the log from genesis and compares balances, nonces and the head. Each entry is
    /// checked as [`CentralLedger::submit`] checked it (fields and signature, then nonce and
    /// balance): a log rewritten together with its head and accounts still fails on the entry
    /// its writer could not sign.
    pub fn verify(&self) -> Result<(), String> {
        let mut state: HashMap<Address, Account> =
            meshwork_ledger::chain::genesis_state(&self.spec);
        let mut head = self.chain_id;
        let (stored_head, count) = self.head().map_err(|e| e.to_string())?;
        let mut seq = 0;
        loop {
            let page = self.log_after(seq, MAX_PAGE).map_err(|e| e.to_string())?;
            if page.is_empty() {
                break;
            }
            for (s, t) in page {
                if s != seq + 1 {
                    return Err(format!("log gap before {s}"));
                }
                check_transfer_fields(&t, &self.spec, &self.chain_id)
                    .map_err(|e| format!("entry {s}: {e}"))?;
                if !t.verify() {
                    return Err(format!("entry {s}: {}", TxError::BadSignature));
                }
                apply_transfer(&mut state, &t).map_err(|e| format!("entry {s}: {e}"))?;
                head = next_head(&head, &t.id());
                seq = s;
            }
        }
        if seq != count || head != stored_head {
            return Err(format!(
                "log of {seq} entries does not match the stored head"
            ));
        }
        let r = self
            .store
            .db()
            .map_err(|e| e.to_string())?
            .begin_read()
            .map_err(|e| e.to_string())?;
        let t = r.open_table(ACCOUNTS).map_err(|e| e.to_string())?;
        let mut stored = HashMap::new();
        for e in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = e.map_err(|e| e.to_string())?;
            let (balance, nonce) = v.value();
            let a = Account { balance, nonce };
            if a != Account::default() {
                stored.insert(Address(*k.value()), a);
            }
        }
        state.retain(|_, a| *a != Account::default());
        if stored != state {
            return Err("stored accounts differ from the replayed log".into());
        }
        Ok(())
    }
}

fn read_head(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<(Hash, u64), LedgerError> {
    let head = meta
        .get(HEAD_KEY)?
        .ok_or_else(|| LedgerError::Inconsistent("no log head".into()))?;
    let count = meta
        .get(COUNT_KEY)?
        .ok_or_else(|| LedgerError::Inconsistent("no log count".into()))?;
    let h: [u8; 32] = head
        .value()
        .try_into()
        .map_err(|_| LedgerError::Inconsistent("bad log head".into()))?;
    let c: [u8; 8] = count
        .value()
        .try_into()
        .map_err(|_| LedgerError::Inconsistent("bad log count".into()))?;
    Ok((Hash(h), u64::from_le_bytes(c)))
}

/// The open-time check of an existing ledger: O(1) reads, no replay.
fn check_counts(w: &redb::WriteTransaction) -> Result<(), LedgerError> {
    let (_, count) = read_head(&w.open_table(META)?)?;
    let log = w.open_table(LOG)?;
    let entries = log.len()?;
    let last = log.last()?.map(|(k, _)| k.value()).unwrap_or(0);
    let indexed = w.open_table(TXIDX)?.len()?;
    if entries != count || last != count || indexed != count {
        return Err(LedgerError::Inconsistent(format!(
            "the head counts {count} transfers, the log holds {entries} ending at {last}, \
             the id index {indexed}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwork_ledger::spec::DEV_FAUCET_SECRET;
    use meshwork_ledger::Wallet;
    use std::path::Path;

    fn open(dir: &Path) -> CentralLedger {
        let store = Arc::new(Store::open(&dir.join("s.redb")).unwrap());
        CentralLedger::open(store, ChainSpec::test("test-central")).unwrap()
    }

    #[test]
    fn transfers_apply_in_order_survive_reopen_and_replays_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
        let bob = Wallet::generate();
        let (first, second);
        {
            let l = open(dir.path());
            let id = l.chain_id();
            let t0 = faucet.transfer(id, bob.address(), 100, 1, 0);
            first = l.submit(&t0).unwrap();
            assert_eq!(first.seq, 1);
            // Replay: same bytes.
            assert!(matches!(
                l.submit(&t0),
                Err(LedgerError::Refused(TxError::AlreadyConfirmed {
                    height: 1
                }))
            ));
            // A gap in nonces is refused, not queued: the server orders, it does not wait.
            let t2 = faucet.transfer(id, bob.address(), 5, 1, 2);
            assert!(matches!(
                l.submit(&t2),
                Err(LedgerError::Refused(TxError::BadNonce { .. }))
            ));
            // Overspending.
            let t_bob = bob.transfer(id, faucet.address(), 100, 1, 0);
            assert!(matches!(
                l.submit(&t_bob),
                Err(LedgerError::Refused(TxError::InsufficientBalance { .. }))
            ));
            // A bit flipped in the signature.
            let mut bad = faucet.transfer(id, bob.address(), 7, 1, 1);
            bad.signature[3] ^= 1;
            assert!(matches!(
                l.submit(&bad),
                Err(LedgerError::Refused(TxError::BadSignature))
            ));
            // Another chain's transfer.
            let other = genesis_block(&ChainSpec::test("test-other")).hash();
            let foreign = faucet.transfer(other, bob.address(), 7, 1, 1);
            assert!(matches!(
                l.submit(&foreign),
                Err(LedgerError::Refused(TxError::WrongChain { .. }))
            ));
            second = l
                .submit(&faucet.transfer(id, bob.address(), 7, 1, 1))
                .unwrap();
            assert_eq!(second.seq, 2);
        }
        let l = open(dir.path());
        assert_eq!(l.account(&bob.address()).unwrap().balance, 107);
        assert_eq!(l.account(&faucet.address()).unwrap().nonce, 2);
        assert_eq!(l.receipt(&second.id).unwrap(), Some(second));
        assert_eq!(l.head().unwrap(), (second.head, 2));
        let h = l.history(&bob.address(), 10).unwrap();
        assert_eq!(
            h.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![2, 1],
            "newest first"
        );
        assert_eq!(l.log_after(1, 10).unwrap().len(), 1);
        l.verify().unwrap();
        drop(l);
        let store = Arc::new(Store::open(&dir.path().join("s.redb")).unwrap());
        assert!(matches!(
            CentralLedger::open(store, ChainSpec::test("test-another")),
            Err(LedgerError::OtherSpec { .. })
        ));
        let _ = first;
    }

    /// Three transfers from two senders, submitted: faucet → alice, faucet → bob, alice → bob.
    fn three(dir: &Path) -> (CentralLedger, Vec<SignedTransfer>) {
        let l = open(dir);
        let id = l.chain_id();
        let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
        let (alice, bob) = (
            Wallet::from_secret(&[31; 32]),
            Wallet::from_secret(&[32; 32]),
        );
        let txs = vec![
            faucet.transfer(id, alice.address(), 1000, 1, 0),
            faucet.transfer(id, bob.address(), 100, 1, 1),
            alice.transfer(id, bob.address(), 10, 1, 0),
        ];
        for t in &txs {
            l.submit(t).unwrap();
        }
        l.verify().unwrap();
        (l, txs)
    }

    /// Changes the stored ledger behind the API's back, as a damaged disk or an operator
    /// with the file would.
    fn tamper(l: &CentralLedger, f: impl FnOnce(&redb::WriteTransaction)) {
        let db = l.store.db().unwrap();
        let w = db.begin_write().unwrap();
        f(&w);
        w.commit().unwrap();
    }

    fn entry(w: &redb::WriteTransaction, seq: u64) -> Vec<u8> {
        w.open_table(LOG)
            .unwrap()
            .get(seq)
            .unwrap()
            .unwrap()
            .value()
            .to_vec()
    }

    fn put_entry(w: &redb::WriteTransaction, seq: u64, bytes: &[u8]) {
        w.open_table(LOG).unwrap().insert(seq, bytes).unwrap();
    }

    fn set_head(w: &redb::WriteTransaction, head: &Hash, count: u64) {
        let mut meta = w.open_table(META).unwrap();
        meta.insert(HEAD_KEY, head.0.as_slice()).unwrap();
        meta.insert(COUNT_KEY, count.to_le_bytes().as_slice())
            .unwrap();
    }

    /// The head as the module docs define it, computed here: `head(0)` the chain id (the
    /// genesis block's hash), `head(s) = blake3(head(s-1) ‖ id(s))`.
    fn head_of(spec: &ChainSpec, ids: &[Hash]) -> Hash {
        let mut h = *blake3::hash(&genesis_block(spec).header.encode()).as_bytes();
        for id in ids {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&h);
            hasher.update(&id.0);
            h = *hasher.finalize().as_bytes();
        }
        Hash(h)
    }

    #[test]
    fn the_head_is_the_hash_chain_of_the_transfer_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (l, txs) = three(dir.path());
        let spec = ChainSpec::test("test-central");
        let ids: Vec<Hash> = txs.iter().map(|t| t.id()).collect();
        assert_eq!(l.head().unwrap(), (head_of(&spec, &ids), 3));
        for (i, id) in ids.iter().enumerate() {
            let r = l.receipt(id).unwrap().unwrap();
            assert_eq!((r.seq, r.head), (i as u64 + 1, head_of(&spec, &ids[..=i])));
        }
        assert_ne!(
            head_of(&spec, &ids),
            head_of(&spec, &[ids[0], ids[2], ids[1]])
        );
    }

    /// A flipped byte anywhere in a log entry is refused by `verify()`.
    #[test]
    fn verify_refuses_a_log_entry_with_any_byte_flipped() {
        let dir = tempfile::tempdir().unwrap();
        let (l, _) = three(dir.path());
        let (good, _) = tamper_pair(&l);
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            tamper(&l, |w| put_entry(w, 2, &bad));
            assert!(l.verify().is_err(), "byte {i} flipped passed verify");
        }
        tamper(&l, |w| put_entry(w, 2, &good));
        l.verify().unwrap();
    }

    /// A dropped record is refused: in the middle (a gap), at the end (the count), and at
    /// the end with the head and count rewritten to match (the accounts).
    #[test]
    fn verify_refuses_a_log_with_a_record_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (l, txs) = three(dir.path());
        let spec = ChainSpec::test("test-central");
        let (middle, _) = tamper_pair(&l);
        tamper(&l, |w| {
            w.open_table(LOG).unwrap().remove(2).unwrap();
        });
        let e = l.verify().unwrap_err();
        assert!(e.contains("gap"), "{e}");
        tamper(&l, |w| put_entry(w, 2, &middle));
        l.verify().unwrap();
        tamper(&l, |w| {
            w.open_table(LOG).unwrap().remove(3).unwrap();
        });
        assert!(l.verify().is_err(), "the last record dropped");
        let ids: Vec<Hash> = txs[..2].iter().map(|t| t.id()).collect();
        tamper(&l, |w| set_head(w, &head_of(&spec, &ids), 2));
        let e = l.verify().unwrap_err();
        assert!(e.contains("accounts"), "{e}");
    }

    /// Entries 2 and 3 swapped (both still apply: their senders differ) are refused by the
    /// head; 1 and 2 swapped by the nonces.
    #[test]
    fn verify_refuses_a_reordered_log() {
        let dir = tempfile::tempdir().unwrap();
        let (l, _) = three(dir.path());
        let (e2, e3) = tamper_pair(&l);
        tamper(&l, |w| {
            put_entry(w, 2, &e3);
            put_entry(w, 3, &e2);
        });
        let e = l.verify().unwrap_err();
        assert!(e.contains("head"), "{e}");
        tamper(&l, |w| {
            put_entry(w, 3, &e3);
            let e1 = entry(w, 1);
            put_entry(w, 1, &e2);
            put_entry(w, 2, &e1);
        });
        assert!(l.verify().is_err());
    }

    /// A transfer changed in the log with the head and the accounts rewritten to match is
    /// still refused: its signature no longer verifies.
    #[test]
    fn verify_refuses_a_consistently_rewritten_log_it_cannot_sign() {
        let dir = tempfile::tempdir().unwrap();
        let (l, mut txs) = three(dir.path());
        let spec = ChainSpec::test("test-central");
        txs[2].transfer.amount += 1; // alice pays bob 11, not 10
        let ids: Vec<Hash> = txs.iter().map(|t| t.id()).collect();
        let (alice, bob) = (txs[2].transfer.from, txs[2].transfer.to);
        tamper(&l, |w| {
            put_entry(w, 3, &txs[2].encode());
            set_head(w, &head_of(&spec, &ids), 3);
            let mut acc = w.open_table(ACCOUNTS).unwrap();
            let a = acc.get(&alice.0).unwrap().unwrap().value();
            let b = acc.get(&bob.0).unwrap().unwrap().value();
            acc.insert(&alice.0, (a.0 - 1, a.1)).unwrap();
            acc.insert(&bob.0, (b.0 + 1, b.1)).unwrap();
        });
        let e = l.verify().unwrap_err();
        assert!(e.contains("entry 3") && e.contains("signature"), "{e}");
    }

    /// Entries 2 and 3 as stored.
    fn tamper_pair(l: &CentralLedger) -> (Vec<u8>, Vec<u8>) {
        let db = l.store.db().unwrap();
        let r = db.begin_read().unwrap();
        let t = r.open_table(LOG).unwrap();
        let get = |s: u64| t.get(s).unwrap().unwrap().value().to_vec();
        (get(2), get(3))
    }
}
