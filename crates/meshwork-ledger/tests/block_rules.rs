//! Each block rule on its own: a block that breaks one rule and keeps every other is refused
//! with that rule's error, and (where the rule has a boundary) the block just inside it is
//! accepted. Also the orphan pool's bounds and the median-time-past rule.

use meshwork_ledger::block::{merkle_root, search_nonce};
use meshwork_ledger::chain::AddOutcome;
use meshwork_ledger::ledger::{MAX_ORPHANS, MAX_ORPHAN_BYTES};
use meshwork_ledger::spec::DEV_FAUCET_SECRET;
use meshwork_ledger::tx::{Coinbase, DecodeError};
use meshwork_ledger::*;

const NOW: Millis = 4_000_000_000_000;

fn spec() -> ChainSpec {
    ChainSpec::test("test-rules")
}

fn faucet() -> Wallet {
    Wallet::from_secret(&DEV_FAUCET_SECRET)
}

fn coinbase(height: u64, amount: Amount) -> Transaction {
    Transaction::Coinbase(Coinbase {
        height,
        to: faucet().address(),
        amount,
    })
}

/// `n` valid transfers from the faucet (nonces 0..n), fee 1 each.
fn transfers(chain_id: Hash, n: u64) -> Vec<Transaction> {
    let to = Wallet::from_secret(&[7; 32]).address();
    (0..n)
        .map(|nonce| Transaction::Transfer(faucet().transfer(chain_id, to, 5, 1, nonce)))
        .collect()
}

/// A block on `parent` with exactly `txs`, its Merkle root computed from them.
fn block(parent: &Header, txs: Vec<Transaction>) -> Block {
    let ids: Vec<Hash> = txs.iter().map(|t| t.id()).collect();
    // The parent's version and difficulty carry over (the spec never retargets).
    let header = Header {
        height: parent.height + 1,
        prev: parent.hash(),
        merkle_root: merkle_root(&ids),
        timestamp: parent.timestamp + 1000,
        nonce: 0,
        ..*parent
    };
    Block { header, txs }
}

/// A valid block on `parent`: a coinbase of exactly reward plus fees, then `txs`.
fn valid(chain: &Chain, parent: &Header, txs: Vec<Transaction>) -> Block {
    let fees: Amount = txs
        .iter()
        .filter_map(Transaction::as_transfer)
        .map(|t| t.transfer.fee)
        .sum();
    let mut all = vec![coinbase(
        parent.height + 1,
        chain.spec().block_reward + fees,
    )];
    all.extend(txs);
    block(parent, all)
}

fn genesis(chain: &Chain) -> Header {
    chain.header(&chain.hash_at(0).unwrap()).unwrap()
}

fn stored(r: Result<AddOutcome, BlockError>) {
    assert!(
        matches!(r, Ok(AddOutcome::Stored { tip: true })),
        "refused: {r:?}"
    );
}

#[test]
fn a_header_that_misses_its_difficulty_is_refused() {
    let spec = ChainSpec {
        initial_difficulty: 64,
        ..spec()
    };
    let mut chain = Chain::in_memory(spec).unwrap();
    let g = genesis(&chain);
    let mut b = valid(&chain, &g, vec![]);
    assert_eq!(b.header.target, 64);
    let header = b.header;
    b.header.nonce = (0..)
        .find(|n| {
            !Header {
                nonce: *n,
                ..header
            }
            .meets_target()
        })
        .unwrap();
    assert_eq!(
        chain.add_block(&b, NOW),
        Err(BlockError::BadProofOfWork(64))
    );
    b.header.nonce = search_nonce(&b.header, 0, 1_000_000).unwrap();
    stored(chain.add_block(&b, NOW));
}

#[test]
fn a_merkle_root_that_does_not_match_the_transactions_is_refused() {
    let mut chain = Chain::in_memory(spec()).unwrap();
    let g = genesis(&chain);
    let txs = transfers(chain.chain_id(), 2);
    let mut b = valid(&chain, &g, txs.clone());
    // The root of the same transactions in another order.
    let mut swapped = b.txs.clone();
    swapped.swap(1, 2);
    b.header.merkle_root = merkle_root(&swapped.iter().map(|t| t.id()).collect::<Vec<_>>());
    assert_eq!(chain.add_block(&b, NOW), Err(BlockError::MerkleMismatch));
    stored(chain.add_block(&valid(&chain, &g, txs), NOW));
}

#[test]
fn a_coinbase_over_reward_plus_fees_is_refused() {
    let mut chain = Chain::in_memory(spec()).unwrap();
    let g = genesis(&chain);
    let txs = transfers(chain.chain_id(), 3);
    let allowed = chain.spec().block_reward + 3;
    let mut all = vec![coinbase(1, allowed + 1)];
    all.extend(txs.clone());
    assert_eq!(
        chain.add_block(&block(&g, all), NOW),
        Err(BlockError::CoinbaseAmount {
            allowed,
            got: allowed + 1
        })
    );
    let mut all = vec![coinbase(1, allowed)];
    all.extend(txs);
    stored(chain.add_block(&block(&g, all), NOW));
}

#[test]
fn a_block_without_a_leading_coinbase_is_refused() {
    let mut chain = Chain::in_memory(spec()).unwrap();
    let g = genesis(&chain);
    let txs = transfers(chain.chain_id(), 1);
    assert_eq!(
        chain.add_block(&block(&g, txs.clone()), NOW),
        Err(BlockError::NoCoinbase)
    );
    assert_eq!(
        chain.add_block(&block(&g, vec![]), NOW),
        Err(BlockError::NoCoinbase)
    );
    // The coinbase after the transfer: still no leading coinbase.
    let mut late = txs.clone();
    late.push(coinbase(1, chain.spec().block_reward + 1));
    assert_eq!(
        chain.add_block(&block(&g, late), NOW),
        Err(BlockError::NoCoinbase)
    );
}

#[test]
fn a_second_coinbase_is_refused() {
    let mut chain = Chain::in_memory(spec()).unwrap();
    let g = genesis(&chain);
    let mut b = valid(&chain, &g, transfers(chain.chain_id(), 1));
    b.txs.push(coinbase(1, 1));
    let b = block(&g, b.txs);
    assert_eq!(chain.add_block(&b, NOW), Err(BlockError::ExtraCoinbase));
}

#[test]
fn a_transaction_twice_in_a_block_is_refused() {
    let mut chain = Chain::in_memory(spec()).unwrap();
    let g = genesis(&chain);
    let t = transfers(chain.chain_id(), 1).remove(0);
    let b = valid(&chain, &g, vec![t, t]);
    assert_eq!(
        chain.add_block(&b, NOW),
        Err(BlockError::DuplicateTx(t.id()))
    );
}

/// A block of `n` transfers on the genesis of a chain with `spec`.
fn on_genesis(spec: ChainSpec, n: u64) -> (Chain, Block) {
    let chain = Chain::in_memory(spec).unwrap();
    let b = valid(&chain, &genesis(&chain), transfers(chain.chain_id(), n));
    (chain, b)
}

#[test]
fn a_block_over_the_size_limit_is_refused_and_one_at_it_accepted() {
    // 30 transfers: over the smallest limit a spec may set (4 096 bytes). The size does not
    // depend on the chain id (fixed-length fields), so it is the same on every chain below.
    let size = on_genesis(spec(), 30).1.encode().len();
    assert!(size > 4096, "{size}");
    let (mut tight, b) = on_genesis(
        ChainSpec {
            max_block_bytes: size - 1,
            ..spec()
        },
        30,
    );
    assert_eq!(b.encode().len(), size);
    assert_eq!(
        tight.add_block(&b, NOW),
        Err(BlockError::TooLarge {
            max: size - 1,
            got: size
        })
    );
    let (mut exact, b) = on_genesis(
        ChainSpec {
            max_block_bytes: size,
            ..spec()
        },
        30,
    );
    assert_eq!(b.encode().len(), size);
    stored(exact.add_block(&b, NOW));
}

#[test]
fn a_block_over_the_transaction_limit_is_refused_and_one_at_it_accepted() {
    let limited = ChainSpec {
        max_block_txs: 3,
        ..spec()
    };
    let mut chain = Chain::in_memory(limited).unwrap();
    let g = genesis(&chain);
    let over = valid(&chain, &g, transfers(chain.chain_id(), 3));
    assert_eq!(
        chain.add_block(&over, NOW),
        Err(BlockError::TooManyTxs { max: 3, got: 4 })
    );
    stored(chain.add_block(&valid(&chain, &g, transfers(chain.chain_id(), 2)), NOW));
}

/// A block's timestamp must be above the median of its last 11 ancestors: at the median it is
/// refused, one millisecond above it accepted. The chain's timestamps are not monotone (block
/// 3 is far ahead), so a window of 10 or 12 blocks has another median.
#[test]
fn a_timestamp_at_the_median_of_the_last_11_is_refused_and_one_above_accepted() {
    let mut chain = Chain::in_memory(spec()).unwrap();
    assert_eq!(chain.spec().median_time_span, 11);
    let g = genesis(&chain);
    let mut parent = g;
    let mut times = vec![];
    for k in 1..=14u64 {
        let mut b = valid(&chain, &parent, vec![]);
        b.header.timestamp = g.timestamp + if k == 3 { 1_000_000 } else { 1000 * k };
        times.push(b.header.timestamp);
        stored(chain.add_block(&b, NOW));
        parent = b.header;
    }
    let mut last_11: Vec<Millis> = times[times.len() - 11..].to_vec();
    last_11.sort_unstable();
    let median = last_11[5];
    assert_eq!(median, g.timestamp + 9000);
    let mut b = valid(&chain, &parent, vec![]);
    b.header.timestamp = median;
    assert_eq!(
        chain.add_block(&b, NOW),
        Err(BlockError::TimeTooOld {
            median,
            got: median
        })
    );
    b.header.timestamp = median + 1;
    stored(chain.add_block(&b, NOW));
}

/// The orphan pool holds at most [`MAX_ORPHANS`] blocks and drops the oldest first: an
/// orphan followed by 256 others is gone when its parent comes; followed by 255, it is kept
/// and connects.
#[test]
fn the_orphan_pool_holds_256_blocks_and_drops_the_oldest() {
    for (others, kept) in [(MAX_ORPHANS - 1, true), (MAX_ORPHANS, false)] {
        let mut l = Ledger::in_memory(spec()).unwrap();
        let g = genesis(l.chain());
        let parent = valid(l.chain(), &g, vec![]);
        let child = valid(l.chain(), &parent.header, vec![]);
        assert!(matches!(
            l.import(child.clone(), NOW),
            Ok(BlockOutcome::Orphan { .. })
        ));
        for i in 0..others {
            let mut o = child.clone();
            o.header.prev = Hash::of(&(i as u64).to_le_bytes());
            assert!(matches!(l.import(o, NOW), Ok(BlockOutcome::Orphan { .. })));
        }
        assert_eq!(l.orphan_count(), MAX_ORPHANS);
        let r = l.import(parent, NOW).unwrap();
        assert_eq!(
            r,
            BlockOutcome::Stored {
                on_main: true,
                unlocked: usize::from(kept)
            },
            "{others} orphans after it"
        );
        assert_eq!(l.chain().contains(&child.hash()), kept);
    }
}

/// The orphan pool holds at most [`MAX_ORPHAN_BYTES`]: blocks of nearly 1 MiB fill it at 64,
/// far below the count limit.
#[test]
fn the_orphan_pool_holds_at_most_64_mib() {
    let mut l = Ledger::in_memory(spec()).unwrap();
    let g = genesis(l.chain());
    // Orphans are checked for their proof of work only, so one transfer repeated fills them.
    let t = transfers(l.chain().chain_id(), 1).remove(0);
    let base = valid(l.chain(), &g, vec![]).encode().len();
    let one = valid(l.chain(), &g, vec![t]).encode().len() - base;
    // About 1 040 000 bytes: 64 fit in 64 MiB, 65 do not.
    let n = (1_040_000 - base) / one;
    let mut big = valid(l.chain(), &g, vec![t; n]);
    let size = big.encode().len();
    assert!(
        size > MAX_ORPHAN_BYTES / 65 && size <= l.chain().spec().max_block_bytes,
        "{size}"
    );
    let fit = MAX_ORPHAN_BYTES / size;
    assert!(fit < MAX_ORPHANS);
    for i in 0..fit + 5 {
        big.header.prev = Hash::of(&(i as u64).to_le_bytes());
        assert_eq!(big.encode().len(), size);
        l.import(big.clone(), NOW).unwrap();
        assert_eq!(
            l.orphan_count(),
            (i + 1).min(fit),
            "after {} orphans",
            i + 1
        );
    }
}

/// A block's coinbase must carry the block's own height: one below or one above it is refused
/// with `CoinbaseHeight`, the height itself accepted.
#[test]
fn a_coinbase_height_one_off_the_block_height_is_refused_and_the_block_height_accepted() {
    let mut chain = Chain::in_memory(spec()).unwrap();
    let g = genesis(&chain);
    let reward = chain.spec().block_reward;
    for got in [0, 2] {
        let b = block(&g, vec![coinbase(got, reward)]);
        assert_eq!(b.header.height, 1);
        assert_eq!(
            chain.add_block(&b, NOW),
            Err(BlockError::CoinbaseHeight { expected: 1, got }),
            "coinbase height {got}"
        );
    }
    stored(chain.add_block(&block(&g, vec![coinbase(1, reward)]), NOW));
}

/// A chain whose faucet holds exactly `balance` at genesis.
fn funded(balance: Amount) -> Chain {
    Chain::in_memory(ChainSpec {
        allocations: vec![(faucet().address(), balance)],
        ..spec()
    })
    .unwrap()
}

/// A sender may spend its whole balance (amount plus fee equal to it) and not one unit more:
/// a cost of balance + 1 is refused with `InsufficientBalance`.
#[test]
fn a_transfer_costing_exactly_the_balance_is_accepted_and_one_unit_more_refused() {
    let mut chain = funded(100);
    let g = genesis(&chain);
    let to = Wallet::from_secret(&[7; 32]).address();
    let over = faucet().transfer(chain.chain_id(), to, 100, 1, 0);
    assert_eq!(
        chain.add_block(&valid(&chain, &g, vec![Transaction::Transfer(over)]), NOW),
        Err(BlockError::Tx {
            id: over.id(),
            error: TxError::InsufficientBalance {
                has: 100,
                needs: 101
            }
        })
    );
    let exact = faucet().transfer(chain.chain_id(), to, 99, 1, 0);
    stored(chain.add_block(&valid(&chain, &g, vec![Transaction::Transfer(exact)]), NOW));
    assert_eq!(chain.account(&to).unwrap().balance, 99);
}

/// Applying a transfer debits amount plus fee from the sender (and bumps its nonce) and
/// credits the amount to the recipient; the fee goes to the miner with the coinbase.
#[test]
fn a_transfer_debits_amount_plus_fee_from_the_sender_and_credits_the_amount() {
    let mut chain = funded(1000);
    let g = genesis(&chain);
    let to = Wallet::from_secret(&[7; 32]).address();
    let miner = Wallet::from_secret(&[8; 32]).address();
    let t = faucet().transfer(chain.chain_id(), to, 300, 2, 0);
    let cb = Transaction::Coinbase(Coinbase {
        height: 1,
        to: miner,
        amount: chain.spec().block_reward + 2,
    });
    stored(chain.add_block(&block(&g, vec![cb, Transaction::Transfer(t)]), NOW));
    assert_eq!(
        chain.account(&faucet().address()).unwrap(),
        Account {
            balance: 698,
            nonce: 1
        }
    );
    assert_eq!(
        chain.account(&to).unwrap(),
        Account {
            balance: 300,
            nonce: 0
        }
    );
    assert_eq!(
        chain.account(&miner).unwrap().balance,
        chain.spec().block_reward + 2
    );
}

/// `Block::decode` takes a block of exactly `max_bytes` and refuses it, as `TooLarge`, when the
/// limit is one byte less.
#[test]
fn a_block_of_exactly_max_bytes_decodes_and_one_byte_more_does_not() {
    let chain = Chain::in_memory(spec()).unwrap();
    let b = valid(&chain, &genesis(&chain), transfers(chain.chain_id(), 2));
    let bytes = b.encode();
    let len = bytes.len();
    assert_eq!(Block::decode(&bytes, len), Ok(b));
    assert_eq!(
        Block::decode(&bytes, len - 1),
        Err(DecodeError::TooLarge {
            what: "block",
            len,
            max: len - 1
        })
    );
}

/// A block with a bad signature is refused with `BadSignature` naming the transfer that
/// carries it (here the third of three), not a neighbour or the coinbase.
#[test]
fn a_bad_signature_is_refused_naming_the_transfer_that_carries_it() {
    let mut chain = Chain::in_memory(spec()).unwrap();
    let g = genesis(&chain);
    let mut txs = transfers(chain.chain_id(), 3);
    let Transaction::Transfer(t) = &mut txs[2] else {
        unreachable!("transfers() makes transfers")
    };
    t.signature[0] ^= 0x01;
    let bad = t.id();
    assert_eq!(
        chain.add_block(&valid(&chain, &g, txs), NOW),
        Err(BlockError::Tx {
            id: bad,
            error: TxError::BadSignature
        })
    );
}

/// A block that passes its stateless checks but fails against the state is stored marked
/// invalid: `is_invalid` says so and adding it again gives `KnownInvalid`; a valid block is not.
#[test]
fn a_block_that_fails_against_the_state_is_marked_invalid_and_known_invalid_after() {
    let mut chain = funded(100);
    let g = genesis(&chain);
    let to = Wallet::from_secret(&[7; 32]).address();
    let over = faucet().transfer(chain.chain_id(), to, 100, 1, 0);
    let bad = valid(&chain, &g, vec![Transaction::Transfer(over)]);
    assert!(chain.add_block(&bad, NOW).is_err());
    assert!(chain.is_invalid(&bad.hash()));
    assert_eq!(chain.add_block(&bad, NOW), Err(BlockError::KnownInvalid));
    let good = valid(&chain, &g, vec![]);
    stored(chain.add_block(&good, NOW));
    assert!(!chain.is_invalid(&good.hash()));
}

/// A block may be at most `max_future_drift_ms` ahead of the local clock: at exactly
/// `now + drift` it is accepted, one millisecond later refused with `TimeTooNew`.
#[test]
fn a_timestamp_at_the_future_drift_limit_is_accepted_and_one_more_refused() {
    let mut chain = Chain::in_memory(spec()).unwrap();
    let g = genesis(&chain);
    let drift_ms = chain.spec().max_future_drift_ms;
    let mut b = valid(&chain, &g, vec![]);
    let now = b.header.timestamp - drift_ms;
    b.header.timestamp += 1;
    assert_eq!(
        chain.add_block(&b, now),
        Err(BlockError::TimeTooNew {
            now,
            drift_ms,
            got: now + drift_ms + 1
        })
    );
    b.header.timestamp -= 1;
    stored(chain.add_block(&b, now));
}

/// A block refused because an ancestor failed during the reorganization it triggered is
/// refused with `InvalidParent(ancestor)`, not with the ancestor's own error.
#[test]
fn a_block_whose_side_branch_ancestor_fails_on_reorg_is_refused_as_invalid_parent() {
    let mut chain = funded(100);
    let g = genesis(&chain);
    stored(chain.add_block(&valid(&chain, &g, vec![]), NOW));
    let to = Wallet::from_secret(&[7; 32]).address();
    let over = faucet().transfer(chain.chain_id(), to, 100, 1, 0);
    let mut p = valid(&chain, &g, vec![Transaction::Transfer(over)]);
    p.header.timestamp += 1;
    assert_eq!(
        chain.add_block(&p, NOW),
        Ok(AddOutcome::Stored { tip: false })
    );
    let c = valid(&chain, &p.header, vec![]);
    assert_eq!(
        chain.add_block(&c, NOW),
        Err(BlockError::InvalidParent(p.hash()))
    );
    assert!(chain.is_invalid(&p.hash()) && chain.is_invalid(&c.hash()));
}
