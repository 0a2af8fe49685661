//! The ledger's behaviour end to end, without a network: fork choice, reorganizations,
//! replay protection, the mempool across reorganizations, and the store across reopening.

use std::collections::HashMap;

use meshwork_ledger::block::merkle_root;
use meshwork_ledger::chain::{apply_block, genesis_state};
use meshwork_ledger::spec::DEV_FAUCET_SECRET;
use meshwork_ledger::tx::Coinbase;
use meshwork_ledger::*;
use proptest::prelude::*;

const NOW: Millis = 4_000_000_000_000;

fn faucet() -> Wallet {
    Wallet::from_secret(&DEV_FAUCET_SECRET)
}

fn wallets(n: usize) -> Vec<Wallet> {
    (0..n)
        .map(|i| Wallet::from_secret(&[i as u8 + 1; 32]))
        .collect()
}

/// A block on `parent` (difficulty 1: every nonce works) with `txs`, paying `miner`.
fn block_on(
    chain: &Chain,
    parent: &Header,
    miner: Address,
    txs: Vec<SignedTransfer>,
    stamp: u64,
) -> Block {
    let fees: u64 = txs.iter().map(|t| t.transfer.fee).sum();
    let mut all = vec![Transaction::Coinbase(Coinbase {
        height: parent.height + 1,
        to: miner,
        amount: chain.spec().block_reward + fees,
    })];
    all.extend(txs.into_iter().map(Transaction::Transfer));
    let ids: Vec<Hash> = all.iter().map(|t| t.id()).collect();
    Block {
        header: Header {
            version: 1,
            height: parent.height + 1,
            prev: parent.hash(),
            merkle_root: merkle_root(&ids),
            // Strictly increasing along every branch; `stamp` tells siblings apart.
            timestamp: parent.timestamp + 1000 + stamp,
            target: 1,
            nonce: 0,
        },
        txs: all,
    }
}

fn spec() -> ChainSpec {
    ChainSpec::test("test-ledger")
}

#[test]
fn double_spend_confirms_at_most_one_and_replays_are_rejected() {
    let mut ledger = Ledger::in_memory(spec()).unwrap();
    let chain_id = ledger.chain().chain_id();
    let f = faucet();
    let [alice, bob] = [wallets(2).remove(0), wallets(2).remove(1)];
    let to_alice = f.transfer(chain_id, alice.address(), 700, 5, 0);
    let to_bob = f.transfer(chain_id, bob.address(), 900, 5, 0); // same nonce: a double spend
    ledger.submit(to_alice).unwrap();
    assert!(matches!(
        ledger.submit(to_bob),
        Err(TxError::Conflict { nonce: 0, .. })
    ));

    // Two miners each saw a different spend: two competing blocks at height 1.
    let g = ledger.chain().header(&ledger.tip().hash).unwrap();
    let b1 = block_on(ledger.chain(), &g, alice.address(), vec![to_alice], 0);
    let b1_alt = block_on(ledger.chain(), &g, bob.address(), vec![to_bob], 7);
    ledger.import(b1.clone(), NOW).unwrap();
    ledger.import(b1_alt.clone(), NOW).unwrap();
    // The alternative branch grows longer: it wins, and `to_alice` is no longer confirmable.
    let b2_alt = block_on(ledger.chain(), &b1_alt.header, bob.address(), vec![], 0);
    ledger.import(b2_alt.clone(), NOW).unwrap();
    assert_eq!(ledger.tip().hash, b2_alt.hash());
    let confirmed = |l: &Ledger, t: &SignedTransfer| {
        matches!(l.tx_status(&t.id()).unwrap(), TxStatus::Confirmed { .. })
    };
    assert!(confirmed(&ledger, &to_bob));
    assert!(!confirmed(&ledger, &to_alice));
    assert_eq!(
        ledger.tx_status(&to_alice.id()).unwrap(),
        TxStatus::Unknown,
        "its nonce is spent on the winning chain: it cannot come back"
    );
    // A block that tries to confirm the other spend on top is invalid.
    let bad = block_on(
        ledger.chain(),
        &b2_alt.header,
        alice.address(),
        vec![to_alice],
        0,
    );
    assert!(matches!(
        ledger.import(bad, NOW),
        Err(BlockError::Tx {
            error: TxError::BadNonce {
                expected: 1,
                got: 0
            },
            ..
        })
    ));

    // Replaying the confirmed transfer is refused.
    assert!(matches!(
        ledger.submit(to_bob),
        Err(TxError::AlreadyConfirmed { height: 1 })
    ));
    // The same transfer signed for another chain is refused.
    let other = Ledger::in_memory(ChainSpec::test("test-other")).unwrap();
    let foreign = f.transfer(other.chain().chain_id(), bob.address(), 1, 5, 1);
    assert!(matches!(
        ledger.submit(foreign),
        Err(TxError::WrongChain { .. })
    ));
    assert!(TxError::WrongChain {
        expected: chain_id,
        got: chain_id
    }
    .punishable());
    ledger.chain().verify_consistency().unwrap();
}

#[test]
fn errors_read_as_sentences() {
    let mut ledger = Ledger::in_memory(spec()).unwrap();
    let chain_id = ledger.chain().chain_id();
    let poor = wallets(1).remove(0);
    let e = ledger
        .submit(poor.transfer(chain_id, faucet().address(), 5, 2, 0))
        .unwrap_err();
    assert_eq!(e.to_string(), "insufficient balance: has 0, needs 7");
    let mut forged = faucet().transfer(chain_id, poor.address(), 5, 2, 0);
    forged.transfer.amount = 5_000;
    assert_eq!(ledger.submit(forged).unwrap_err(), TxError::BadSignature);
}

#[test]
fn reorganization_returns_transfers_to_the_mempool() {
    let mut ledger = Ledger::in_memory(spec()).unwrap();
    let chain_id = ledger.chain().chain_id();
    let f = faucet();
    let w = wallets(1).remove(0);
    let txs: Vec<SignedTransfer> = (0..3)
        .map(|n| f.transfer(chain_id, w.address(), 10 + n, 1, n))
        .collect();
    let g = ledger.chain().header(&ledger.tip().hash).unwrap();
    let a1 = block_on(ledger.chain(), &g, w.address(), txs.clone(), 0);
    ledger.import(a1.clone(), NOW).unwrap();
    assert_eq!(
        ledger.tx_status(&txs[2].id()).unwrap(),
        TxStatus::Confirmed {
            height: 1,
            block: a1.hash(),
            confirmations: 1
        }
    );
    // A heavier branch without them.
    let b1 = block_on(ledger.chain(), &g, f.address(), vec![], 3);
    let b2 = block_on(ledger.chain(), &b1.header, f.address(), vec![], 0);
    ledger.import(b1, NOW).unwrap();
    ledger.import(b2, NOW).unwrap();
    for t in &txs {
        assert_eq!(ledger.tx_status(&t.id()).unwrap(), TxStatus::Pending);
    }
    let change = ledger.take_changes().pop().unwrap();
    assert_eq!(
        (change.disconnected, change.connected, change.returned),
        (1, 2, 3)
    );
    // And the next template mines them again, in nonce order.
    let tpl = ledger.template(w.address(), NOW).unwrap();
    assert_eq!(tpl.txs.len(), 4);
    ledger.import(tpl, NOW).unwrap();
    assert!(ledger.mempool().is_empty());
    assert_eq!(
        ledger.chain().account(&w.address()).unwrap().balance,
        33 + 50_000 + 3
    );
    ledger.chain().verify_consistency().unwrap();
}

/// An operator's refusal list is mempool policy, not a rule: the sender's transfers are
/// refused (without blaming whoever relayed them) and never mined here, but a block that holds
/// one is valid, and a reorganization does not sneak them back into the mempool.
#[test]
fn refused_senders_stay_out_of_the_mempool_but_not_out_of_blocks() {
    let mut ledger = Ledger::in_memory(spec()).unwrap();
    let chain_id = ledger.chain().chain_id();
    let f = faucet();
    let w = wallets(1).remove(0);
    ledger.set_refused([f.address()].into_iter().collect());
    let t = f.transfer(chain_id, w.address(), 10, 1, 0);
    let e = ledger.submit(t).unwrap_err();
    assert_eq!(e, TxError::Refused(f.address()));
    assert!(!e.punishable(), "relaying a refused sender is no offence");
    assert!(ledger.mempool().is_empty());
    let g = ledger.chain().header(&ledger.tip().hash).unwrap();
    let a1 = block_on(ledger.chain(), &g, w.address(), vec![t], 0);
    ledger.import(a1, NOW).unwrap();
    assert!(matches!(
        ledger.tx_status(&t.id()).unwrap(),
        TxStatus::Confirmed { .. }
    ));
    // A heavier branch without it: the transfer is not returned to this mempool.
    let b1 = block_on(ledger.chain(), &g, w.address(), vec![], 3);
    let b2 = block_on(ledger.chain(), &b1.header, w.address(), vec![], 0);
    ledger.import(b1, NOW).unwrap();
    ledger.import(b2, NOW).unwrap();
    assert_eq!(ledger.tx_status(&t.id()).unwrap(), TxStatus::Unknown);
    assert!(ledger.mempool().is_empty());
    assert_eq!(ledger.template(w.address(), NOW).unwrap().txs.len(), 1);
}

#[test]
fn the_store_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.redb");
    let tip = {
        let mut ledger = Ledger::open(&path, spec()).unwrap();
        let w = wallets(1).remove(0);
        for _ in 0..5 {
            let tpl = ledger.template(w.address(), NOW).unwrap();
            ledger.import(tpl, NOW).unwrap();
        }
        ledger.tip()
    };
    let ledger = Ledger::open(&path, spec()).unwrap();
    assert_eq!(ledger.tip(), tip);
    ledger.chain().verify_consistency().unwrap();
    drop(ledger);
    // Another spec on the same store is refused, not silently mixed.
    assert!(matches!(
        Ledger::open(&path, ChainSpec::test("test-else")),
        Err(OpenError::SpecMismatch { .. })
    ));
}

#[test]
fn difficulty_retargets_toward_the_interval_within_the_clamp() {
    let mut s = ChainSpec::test("test-retarget");
    s.initial_difficulty = 64;
    s.min_difficulty = 1;
    s.retarget_interval = 4;
    s.block_interval_ms = 1000;
    let mut ledger = Ledger::in_memory(s).unwrap();
    let miner = faucet().address();
    // Blocks 100 ms apart: 10x too fast, so difficulty rises by the clamp (4x) at height 8.
    let mut now = ledger.tip().timestamp;
    let mut targets = vec![];
    while ledger.tip().height < 12 {
        now += 100;
        let mut b = ledger.template(miner, now).unwrap();
        b.header.nonce =
            meshwork_ledger::block::search_nonce(&b.header, 0, u64::MAX).expect("a nonce");
        targets.push(b.header.target);
        ledger.import(b, now).unwrap();
    }
    assert_eq!(&targets[..7], &[64; 7]);
    assert_eq!(targets[7], 256, "height 8 retargets: 4x clamp");
    assert_eq!(&targets[8..11], &[256; 3]);
    assert_eq!(targets[11], 1024);

    // A block claiming a different difficulty, or an old timestamp, is refused.
    let mut wrong = ledger.template(miner, now + 100).unwrap();
    wrong.header.target = 1;
    assert!(matches!(
        ledger.import(wrong, now + 100),
        Err(BlockError::BadDifficulty { .. })
    ));
    let mut old = ledger.template(miner, now + 100).unwrap();
    old.header.timestamp = now - 10_000;
    old.header.nonce = meshwork_ledger::block::search_nonce(&old.header, 0, u64::MAX).unwrap();
    assert!(matches!(
        ledger.import(old, now + 100),
        Err(BlockError::TimeTooOld { .. })
    ));
    let mut future = ledger.template(miner, now + 100).unwrap();
    future.header.timestamp = now + 100 + 60_000;
    future.header.nonce =
        meshwork_ledger::block::search_nonce(&future.header, 0, u64::MAX).unwrap();
    let e = ledger.import(future, now + 100).unwrap_err();
    assert!(matches!(e, BlockError::TimeTooNew { .. }) && !e.punishable());
}

/// One step of a random block tree: build on the `parent`-th block created so far (modulo the
/// count), with `ntx` transfers, one of them overspending when `poison`.
#[derive(Clone, Debug)]
struct Step {
    parent: usize,
    ntx: usize,
    poison: bool,
    stamp: u64,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            any::<usize>(),
            0usize..4,
            prop::bool::weighted(0.1),
            0u64..50,
        )
            .prop_map(|(parent, ntx, poison, stamp)| Step {
                parent,
                ntx,
                poison,
                stamp,
            }),
        1..28,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random trees of competing blocks, imported in random order (so blocks arrive before
    /// their parents, branches overtake each other, and invalid blocks appear on any branch):
    /// after every import the stored state equals replaying the best chain from genesis, and
    /// the tip has the most work among the valid blocks.
    #[test]
    fn state_always_equals_replaying_the_best_chain(
        steps in steps(),
        order_seed in any::<u64>(),
    ) {
        let spec = spec();
        let mut ledger = Ledger::in_memory(spec.clone()).unwrap();
        let chain_id = ledger.chain().chain_id();
        let ws = wallets(4);
        let f = faucet();
        let genesis = ledger.chain().header(&ledger.tip().hash).unwrap();

        // Build the tree with per-branch state, so transfers are valid on their branch.
        // (block, state after it, valid?)
        let mut built: Vec<(Block, HashMap<Address, Account>, bool)> = vec![];
        let gstate = genesis_state(&spec);
        for (i, s) in steps.iter().enumerate() {
            let (parent_header, mut state, parent_valid) = if built.is_empty() || s.parent % (built.len() + 1) == 0 {
                (genesis, gstate.clone(), true)
            } else {
                let p = &built[s.parent % (built.len() + 1) - 1];
                (p.0.header, p.1.clone(), p.2)
            };
            let mut txs = vec![];
            for k in 0..s.ntx {
                let (from, to) = if k % 2 == 0 { (&f, &ws[(i + k) % 4]) } else { (&ws[(i + k) % 4], &ws[(i + k + 1) % 4]) };
                let acct = state.get(&from.address()).copied().unwrap_or_default();
                let amount = if acct.balance > 20 { acct.balance / 3 } else { continue };
                txs.push(from.transfer(chain_id, to.address(), amount, 1, acct.nonce + txs.iter().filter(|t: &&SignedTransfer| t.transfer.from == from.address()).count() as u64));
            }
            if s.poison {
                let poor = &ws[i % 4];
                let acct = state.get(&poor.address()).copied().unwrap_or_default();
                txs.push(poor.transfer(chain_id, f.address(), acct.balance + 1, 1, acct.nonce));
            }
            let block = block_on(ledger.chain(), &parent_header, ws[i % 4].address(), txs, s.stamp);
            let valid = parent_valid && apply_block(&mut state, &block, &spec).is_ok();
            built.push((block, state, valid));
        }

        // Import in a shuffled order.
        let mut order: Vec<usize> = (0..built.len()).collect();
        let mut x = order_seed | 1;
        for i in (1..order.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        for &i in &order {
            let _ = ledger.import(built[i].0.clone(), NOW);
            // Invariant 2 and 4 after every import, from scratch.
            prop_assert_eq!(ledger.chain().verify_consistency(), Ok(()));
        }

        // Invariant 3: the tip has the most work among valid blocks (all work 1 per block:
        // height), and its state is the replayed state of its branch.
        let best_height = built.iter().filter(|b| b.2).map(|b| b.0.header.height).max().unwrap_or(0);
        let tip = ledger.tip();
        prop_assert_eq!(tip.height, best_height);
        let expected_state = if tip.height == 0 {
            gstate.clone()
        } else {
            built.iter().find(|b| b.0.hash() == tip.hash).expect("the tip is a built block").1.clone()
        };
        prop_assert_eq!(ledger.chain().all_accounts().unwrap(), expected_state);
        for b in &built {
            if !b.2 {
                prop_assert!(!ledger.chain().on_main(&b.0.hash()));
            }
        }
    }
}
