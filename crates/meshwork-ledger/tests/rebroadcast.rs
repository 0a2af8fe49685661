//! Which pending transfers are announced again, and when: the node's own and those a
//! reorganization returned, with a doubling wait, until they leave the mempool.

use meshwork_ledger::block::merkle_root;
use meshwork_ledger::spec::DEV_FAUCET_SECRET;
use meshwork_ledger::tx::Coinbase;
use meshwork_ledger::*;

const NOW: Millis = 4_000_000_000_000;

fn faucet() -> Wallet {
    Wallet::from_secret(&DEV_FAUCET_SECRET)
}

fn block_on(
    parent: &Header,
    reward: u64,
    miner: Address,
    txs: Vec<SignedTransfer>,
    stamp: u64,
) -> Block {
    let fees: u64 = txs.iter().map(|t| t.transfer.fee).sum();
    let mut all = vec![Transaction::Coinbase(Coinbase {
        height: parent.height + 1,
        to: miner,
        amount: reward + fees,
    })];
    all.extend(txs.into_iter().map(Transaction::Transfer));
    let ids: Vec<Hash> = all.iter().map(|t| t.id()).collect();
    Block {
        header: Header {
            version: 1,
            height: parent.height + 1,
            prev: parent.hash(),
            merkle_root: merkle_root(&ids),
            timestamp: parent.timestamp + 1000 + stamp,
            target: 1,
            nonce: 0,
        },
        txs: all,
    }
}

fn ids(v: &[SignedTransfer]) -> Vec<Hash> {
    v.iter().map(|t| t.id()).collect()
}

#[test]
fn own_transfers_are_announced_again_with_a_doubling_wait_until_confirmed() {
    let mut ledger = Ledger::in_memory(ChainSpec::test("test-rebroadcast")).unwrap();
    ledger.set_rebroadcast(1000, 3000);
    let chain_id = ledger.chain().chain_id();
    let to = Wallet::from_secret(&[3; 32]).address();
    let own = faucet().transfer(chain_id, to, 5, 1, 0);
    let gossiped = faucet().transfer(chain_id, to, 6, 1, 1);
    ledger.submit_own(own, NOW).unwrap();
    ledger.submit(gossiped).unwrap();

    assert!(
        ledger.due_rebroadcasts(NOW + 999, 10).is_empty(),
        "not before the first wait"
    );
    // Only our own: a transfer heard from gossip is its origin's to announce.
    assert_eq!(
        ids(&ledger.due_rebroadcasts(NOW + 1000, 10)),
        vec![own.id()]
    );
    assert!(
        ledger.due_rebroadcasts(NOW + 1000, 10).is_empty(),
        "rescheduled"
    );
    // Waits: 1000, then 2000, then capped at 3000.
    assert!(ledger.due_rebroadcasts(NOW + 2999, 10).is_empty());
    assert_eq!(ledger.due_rebroadcasts(NOW + 3000, 10).len(), 1);
    assert!(ledger.due_rebroadcasts(NOW + 5999, 10).is_empty());
    assert_eq!(ledger.due_rebroadcasts(NOW + 6000, 10).len(), 1);
    assert!(ledger.due_rebroadcasts(NOW + 8999, 10).is_empty());
    assert_eq!(ledger.due_rebroadcasts(NOW + 9000, 10).len(), 1);

    // Confirmed: no longer announced.
    let b = ledger.template(to, NOW).unwrap();
    ledger.import(b, NOW).unwrap();
    assert!(ledger.mempool().is_empty());
    assert!(ledger.due_rebroadcasts(NOW + 100_000, 10).is_empty());
}

#[test]
fn one_round_announces_a_bounded_number() {
    let mut ledger = Ledger::in_memory(ChainSpec::test("test-rebroadcast-bound")).unwrap();
    ledger.set_rebroadcast(10, 10);
    let chain_id = ledger.chain().chain_id();
    let to = Wallet::from_secret(&[3; 32]).address();
    for nonce in 0..20 {
        ledger
            .submit_own(faucet().transfer(chain_id, to, 5, 1, nonce), NOW)
            .unwrap();
    }
    assert_eq!(ledger.due_rebroadcasts(NOW + 10, 8).len(), 8);
    assert_eq!(ledger.due_rebroadcasts(NOW + 10, 8).len(), 8);
    assert_eq!(
        ledger.due_rebroadcasts(NOW + 10, 8).len(),
        4,
        "all 20, 8 a round"
    );
}

/// The case in miniature: a transfer confirmed on a branch that loses goes back to
/// the mempool, and is then announced again (it is not our own: a reorganization returned it).
#[test]
fn transfers_a_reorganization_returns_are_announced_again() {
    let spec = ChainSpec::test("test-rebroadcast-reorg");
    let reward = spec.block_reward;
    let mut ledger = Ledger::in_memory(spec).unwrap();
    ledger.set_rebroadcast(1000, 8000);
    let chain_id = ledger.chain().chain_id();
    let miner = Wallet::from_secret(&[4; 32]).address();
    let to = Wallet::from_secret(&[3; 32]).address();
    let t = faucet().transfer(chain_id, to, 5, 1, 0);
    let g = ledger.chain().header(&ledger.tip().hash).unwrap();
    let a1 = block_on(&g, reward, miner, vec![t], 0);
    ledger.import(a1, NOW).unwrap();
    assert!(ledger.due_rebroadcasts(NOW + 1_000_000, 10).is_empty());
    // A heavier branch without it.
    let b1 = block_on(&g, reward, miner, vec![], 5);
    let b2 = block_on(&b1.header, reward, miner, vec![], 0);
    ledger.import(b1, NOW).unwrap();
    ledger.import(b2, NOW + 10).unwrap();
    assert_eq!(ledger.tx_status(&t.id()).unwrap(), TxStatus::Pending);
    assert!(ledger.due_rebroadcasts(NOW + 1009, 10).is_empty());
    assert_eq!(ids(&ledger.due_rebroadcasts(NOW + 1010, 10)), vec![t.id()]);
}
