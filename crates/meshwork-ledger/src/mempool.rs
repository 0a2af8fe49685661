//! The mempool: valid transfers waiting for a block.
//!
//! # Invariants
//! 1. `by_id`, `by_sender` and `by_fee` hold the same transfers; at most `capacity` of them.
//! 2. For each sender, the pending nonces are at least its confirmed nonce and at most
//!    `MAX_NONCE_AHEAD` beyond it, one transfer per nonce.
//! 3. Every signature was verified before admission (the caller's duty: [`Mempool::admit`]
//!    takes transfers already checked, so that the ledger can batch-verify bursts).
//!
//! Admission checks affordability against the confirmed balance minus what the sender's
//! lower-nonce pending transfers already spend. After each change of the main chain the
//! touched senders are re-checked from their new confirmed state, and transfers that became
//! stale or unaffordable leave.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use crate::error::TxError;
use crate::tx::SignedTransfer;
use crate::types::{Account, Address, Amount, Hash};

/// How far beyond its confirmed nonce a sender may queue transfers.
pub const MAX_NONCE_AHEAD: u64 = 64;
/// The default bound on pending transfers.
pub const DEFAULT_CAPACITY: usize = 20_000;

pub struct Mempool {
    capacity: usize,
    by_id: HashMap<Hash, SignedTransfer>,
    by_sender: HashMap<Address, BTreeMap<u64, Hash>>,
    by_fee: BTreeSet<(Amount, Hash)>,
    /// Bumped on every change, so that a miner knows when to rebuild its template.
    generation: u64,
}

impl Mempool {
    pub fn new(capacity: usize) -> Mempool {
        Mempool {
            capacity: capacity.max(1),
            by_id: HashMap::new(),
            by_sender: HashMap::new(),
            by_fee: BTreeSet::new(),
            generation: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn contains(&self, id: &Hash) -> bool {
        self.by_id.contains_key(id)
    }

    /// The pending transfer with this id.
    pub fn get(&self, id: &Hash) -> Option<SignedTransfer> {
        self.by_id.get(id).copied()
    }

    /// Pending transfers, highest fee first.
    pub fn list(&self, max: usize) -> Vec<SignedTransfer> {
        self.by_fee
            .iter()
            .rev()
            .take(max)
            .map(|(_, id)| self.by_id[id])
            .collect()
    }

    /// Admits a transfer whose signature and stateless rules were checked, given the sender's
    /// confirmed account.
    pub fn admit(&mut self, t: SignedTransfer, sender: Account) -> Result<Hash, TxError> {
        let id = t.id();
        if self.by_id.contains_key(&id) {
            return Err(TxError::Duplicate);
        }
        let tr = t.transfer;
        if tr.nonce < sender.nonce {
            return Err(TxError::NonceTooLow {
                expected: sender.nonce,
                got: tr.nonce,
            });
        }
        if tr.nonce > sender.nonce + MAX_NONCE_AHEAD {
            return Err(TxError::NonceGap {
                expected: sender.nonce,
                got: tr.nonce,
                max_ahead: MAX_NONCE_AHEAD,
            });
        }
        let cost = tr.cost().ok_or(TxError::Overflow)?;
        // Replace-by-fee: a pending transfer with the same nonce leaves only for a fee at
        // least 10% (and 1 unit) higher, so that replacements cannot churn the pool for free.
        let existing = self
            .by_sender
            .get(&tr.from)
            .and_then(|m| m.get(&tr.nonce))
            .copied();
        if let Some(old) = existing {
            let old_fee = self.by_id[&old].transfer.fee;
            let needed = old_fee.saturating_add((old_fee / 10).max(1));
            if tr.fee < needed {
                return Err(TxError::Conflict {
                    nonce: tr.nonce,
                    fee_needed: needed,
                });
            }
        }
        let spent_before: Amount = self
            .by_sender
            .get(&tr.from)
            .map(|m| {
                m.range(..tr.nonce)
                    .map(|(_, id)| self.by_id[id].transfer.cost().unwrap_or(Amount::MAX))
                    .fold(0u64, |a, c| a.saturating_add(c))
            })
            .unwrap_or(0);
        let available = sender.balance.saturating_sub(spent_before);
        if available < cost {
            return Err(TxError::InsufficientBalance {
                has: available,
                needs: cost,
            });
        }
        if existing.is_none() && self.by_id.len() >= self.capacity {
            let &(lowest, victim) = self.by_fee.first().expect("a full pool is not empty");
            if tr.fee <= lowest {
                return Err(TxError::MempoolFull {
                    min_fee: lowest + 1,
                });
            }
            self.evict_from(victim);
        }
        if let Some(old) = existing {
            self.remove(&old);
        }
        self.by_sender
            .entry(tr.from)
            .or_default()
            .insert(tr.nonce, id);
        self.by_fee.insert((tr.fee, id));
        self.by_id.insert(id, t);
        self.generation += 1;
        Ok(id)
    }

    /// Removes `id` and every later transfer of its sender (they would wait on a gap).
    fn evict_from(&mut self, id: Hash) {
        let Some(t) = self.by_id.get(&id) else { return };
        let (from, nonce) = (t.transfer.from, t.transfer.nonce);
        let later: Vec<Hash> = self
            .by_sender
            .get(&from)
            .map(|m| m.range(nonce..).map(|(_, id)| *id).collect())
            .unwrap_or_default();
        for id in later {
            self.remove(&id);
        }
    }

    pub fn remove(&mut self, id: &Hash) -> Option<SignedTransfer> {
        let t = self.by_id.remove(id)?;
        self.by_fee.remove(&(t.transfer.fee, *id));
        if let Some(m) = self.by_sender.get_mut(&t.transfer.from) {
            m.remove(&t.transfer.nonce);
            if m.is_empty() {
                self.by_sender.remove(&t.transfer.from);
            }
        }
        self.generation += 1;
        Some(t)
    }

    /// The first nonce from `confirmed` up that `sender` has no pending transfer for.
    pub fn next_nonce(&self, sender: &Address, confirmed: u64) -> u64 {
        let mut next = confirmed;
        if let Some(m) = self.by_sender.get(sender) {
            while m.contains_key(&next) {
                next += 1;
            }
        }
        next
    }

    /// Re-checks one sender's pending transfers against its new confirmed state: stale nonces
    /// leave, and so does everything from the first transfer it can no longer afford.
    pub fn revalidate(&mut self, sender: &Address, acct: Account) {
        let Some(m) = self.by_sender.get(sender) else {
            return;
        };
        let mut drop = vec![];
        let mut balance = acct.balance;
        let mut broke = false;
        for (&nonce, id) in m {
            if nonce < acct.nonce || nonce > acct.nonce + MAX_NONCE_AHEAD || broke {
                drop.push(*id);
                continue;
            }
            match self.by_id[id].transfer.cost() {
                Some(c) if c <= balance => balance -= c,
                _ => {
                    broke = true;
                    drop.push(*id);
                }
            }
        }
        for id in drop {
            self.remove(&id);
        }
    }

    /// Picks transfers for a block: per sender in nonce order starting at its confirmed nonce
    /// with no gap, across senders by highest fee (a heap of each sender's next transfer).
    pub fn select(
        &self,
        max_txs: usize,
        mut confirmed: impl FnMut(&Address) -> Account,
    ) -> Vec<SignedTransfer> {
        let mut heap = BinaryHeap::new();
        let mut cursors: HashMap<Address, (u64, Amount)> = HashMap::new();
        for (sender, m) in &self.by_sender {
            let acct = confirmed(sender);
            if let Some(id) = m.get(&acct.nonce) {
                heap.push((self.by_id[id].transfer.fee, *id));
                cursors.insert(*sender, (acct.nonce, acct.balance));
            }
        }
        let mut out = vec![];
        while let Some((_, id)) = heap.pop() {
            if out.len() >= max_txs {
                break;
            }
            let t = self.by_id[&id];
            let (nonce, balance) = cursors[&t.transfer.from];
            let Some(cost) = t.transfer.cost().filter(|c| *c <= balance) else {
                continue; // unaffordable: this sender's chain stops here
            };
            out.push(t);
            cursors.insert(t.transfer.from, (nonce + 1, balance - cost));
            if let Some(next) = self.by_sender[&t.transfer.from].get(&(nonce + 1)) {
                heap.push((self.by_id[next].transfer.fee, *next));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tx::Wallet;

    fn tx(w: &Wallet, nonce: u64, fee: Amount) -> SignedTransfer {
        w.transfer(Hash::ZERO, w.address(), 10, fee, nonce)
    }

    fn funded(balance: Amount) -> Account {
        Account { balance, nonce: 0 }
    }

    #[test]
    fn nonce_rules_and_overspending() {
        let w = Wallet::from_secret(&[1; 32]);
        let mut m = Mempool::new(100);
        let acct = Account {
            balance: 25,
            nonce: 3,
        };
        assert_eq!(
            m.admit(tx(&w, 2, 1), acct),
            Err(TxError::NonceTooLow {
                expected: 3,
                got: 2
            })
        );
        assert!(m.admit(tx(&w, 3, 1), acct).is_ok());
        assert!(m.admit(tx(&w, 4, 1), acct).is_ok());
        // 25 - 11 - 11 = 3 left, the next needs 11.
        assert_eq!(
            m.admit(tx(&w, 5, 1), acct),
            Err(TxError::InsufficientBalance { has: 3, needs: 11 })
        );
        assert!(matches!(
            m.admit(tx(&w, 3 + MAX_NONCE_AHEAD + 1, 1), acct),
            Err(TxError::NonceGap { .. })
        ));
        assert_eq!(m.admit(tx(&w, 3, 1), acct), Err(TxError::Duplicate));
    }

    /// A pending transfer is replaced only by one with the same nonce and a fee at least 10 %
    /// higher (at 100: 110, where "+1" would be 101), and at least 1 higher (at 5: 6, where
    /// 10 % rounds to 0). One unit below is refused and leaves the pool as it was.
    #[test]
    fn same_nonce_needs_a_fee_10_percent_higher() {
        for (old_fee, needed) in [(100, 110), (5, 6), (1000, 1100)] {
            let w = Wallet::from_secret(&[2; 32]);
            let mut m = Mempool::new(100);
            let first = tx(&w, 0, old_fee);
            m.admit(first, funded(10_000)).unwrap();
            // The amount differs so that each replacement is a new transfer.
            let below = w.transfer(Hash::ZERO, w.address(), 11, needed - 1, 0);
            assert_eq!(
                m.admit(below, funded(10_000)),
                Err(TxError::Conflict {
                    nonce: 0,
                    fee_needed: needed
                }),
                "fee {} replacing {old_fee}",
                needed - 1
            );
            assert!(m.contains(&first.id()) && m.len() == 1);
            let enough = w.transfer(Hash::ZERO, w.address(), 12, needed, 0);
            m.admit(enough, funded(10_000)).unwrap();
            assert_eq!(m.len(), 1);
            assert!(!m.contains(&first.id()) && m.contains(&enough.id()));
            assert_eq!(m.next_nonce(&w.address(), 0), 1);
        }
    }

    #[test]
    fn full_pool_evicts_the_lowest_fee() {
        let mut m = Mempool::new(3);
        let ws: Vec<Wallet> = (0..5).map(|i| Wallet::from_secret(&[10 + i; 32])).collect();
        for (i, w) in ws.iter().take(3).enumerate() {
            m.admit(tx(w, 0, 5 + i as u64), funded(100)).unwrap();
        }
        assert_eq!(
            m.admit(tx(&ws[3], 0, 5), funded(100)),
            Err(TxError::MempoolFull { min_fee: 6 })
        );
        m.admit(tx(&ws[4], 0, 50), funded(100)).unwrap();
        assert_eq!(m.len(), 3);
        let fees: Vec<Amount> = m.list(10).iter().map(|t| t.transfer.fee).collect();
        assert_eq!(fees, vec![50, 7, 6]);
    }

    /// A full pool evicts the lowest-fee transfer together with its sender's later ones (they
    /// would wait on the gap), keeps that sender's earlier ones, and leaves every other
    /// sender's transfers alone.
    #[test]
    fn full_pool_evicts_the_lowest_fee_with_its_senders_later_transfers() {
        let a = Wallet::from_secret(&[20; 32]);
        let b = Wallet::from_secret(&[21; 32]);
        let c = Wallet::from_secret(&[22; 32]);
        let mut m = Mempool::new(7);
        // a: nonce 0 at fee 30, nonce 1 at fee 2 (the lowest), nonces 2 and 3 above it.
        let a_txs: Vec<SignedTransfer> = [30, 2, 40, 50]
            .iter()
            .enumerate()
            .map(|(n, fee)| tx(&a, n as u64, *fee))
            .collect();
        let b_txs: Vec<SignedTransfer> = [3, 60, 70]
            .iter()
            .enumerate()
            .map(|(n, fee)| tx(&b, n as u64, *fee))
            .collect();
        for t in a_txs.iter().chain(&b_txs) {
            m.admit(*t, funded(1000)).unwrap();
        }
        assert_eq!(m.len(), 7);
        let newcomer = tx(&c, 0, 10);
        m.admit(newcomer, funded(1000)).unwrap();
        assert!(m.contains(&a_txs[0].id()), "a's earlier transfer stays");
        for t in &a_txs[1..] {
            assert!(!m.contains(&t.id()), "a's nonce {} left", t.transfer.nonce);
        }
        assert!(b_txs.iter().all(|t| m.contains(&t.id())), "b is untouched");
        assert!(m.contains(&newcomer.id()));
        assert_eq!(m.len(), 5);
        assert_eq!(m.next_nonce(&a.address(), 0), 1);
        // Refill; now b's nonce 0 (fee 3) is the lowest: a newcomer takes all of b with it.
        m.admit(tx(&c, 1, 20), funded(1000)).unwrap();
        m.admit(tx(&c, 2, 25), funded(1000)).unwrap();
        assert_eq!(m.len(), 7);
        let last = tx(&c, 3, 26);
        m.admit(last, funded(1000)).unwrap();
        assert!(b_txs.iter().all(|t| !m.contains(&t.id())), "b left whole");
        assert!(m.contains(&a_txs[0].id()) && m.contains(&last.id()));
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn selection_keeps_nonce_order_and_prefers_fees() {
        let a = Wallet::from_secret(&[3; 32]);
        let b = Wallet::from_secret(&[4; 32]);
        let mut m = Mempool::new(100);
        m.admit(tx(&a, 0, 1), funded(500)).unwrap();
        m.admit(tx(&a, 1, 100), funded(500)).unwrap();
        m.admit(tx(&b, 0, 50), funded(500)).unwrap();
        m.admit(tx(&b, 2, 99), funded(500)).unwrap(); // gap at 1: not executable
        let picked = m.select(10, |_| funded(500));
        let order: Vec<(Address, u64)> = picked
            .iter()
            .map(|t| (t.transfer.from, t.transfer.nonce))
            .collect();
        assert_eq!(
            order,
            vec![(b.address(), 0), (a.address(), 0), (a.address(), 1)]
        );
        assert_eq!(m.select(1, |_| funded(500)).len(), 1);
    }

    #[test]
    fn revalidation_drops_stale_and_unaffordable() {
        let a = Wallet::from_secret(&[5; 32]);
        let mut m = Mempool::new(100);
        for n in 0..4 {
            m.admit(tx(&a, n, 1), funded(100)).unwrap();
        }
        m.revalidate(
            &a.address(),
            Account {
                balance: 15,
                nonce: 1,
            },
        );
        // Nonce 0 is stale; 1 is affordable (11 of 15); 2 and 3 are not.
        assert_eq!(m.len(), 1);
        assert_eq!(m.list(10)[0].transfer.nonce, 1);
    }
}
