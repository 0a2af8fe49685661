//! The chain store under bad disks: damaged files never panic and fail the consistency check
//! at open, a full disk stops the store without anything being taken for an invalid block,
//! and a reopen once space returns resumes where it stopped.

use std::path::Path;

use meshwork_ledger::faults::DiskFull;
use meshwork_ledger::spec::DEV_FAUCET_SECRET;
use meshwork_ledger::*;

const NOW: Millis = 4_000_000_000_000;

fn spec() -> ChainSpec {
    ChainSpec::test("test-store")
}

fn faucet() -> Wallet {
    Wallet::from_secret(&DEV_FAUCET_SECRET)
}

/// A balance no other account holds, to find its record in the file.
const MARKED: u64 = 0x12_3456_789a;

/// Builds a small store at `path`: `blocks` blocks, one transfer of [`MARKED`] units in the
/// first, a few more after.
fn build(path: &Path, blocks: u64) -> TipInfo {
    let mut ledger = Ledger::open(path, spec()).unwrap();
    let chain_id = ledger.chain().chain_id();
    let miner = Wallet::from_secret(&[9; 32]).address();
    let marked = Wallet::from_secret(&[7; 32]).address();
    let other = Wallet::from_secret(&[8; 32]).address();
    for i in 0..blocks {
        let nonce = ledger.account(&faucet().address()).unwrap().1;
        let (to, amount) = if i == 0 {
            (marked, MARKED)
        } else {
            (other, 10 + i)
        };
        ledger
            .submit(faucet().transfer(chain_id, to, amount, 1, nonce))
            .unwrap();
        let b = ledger.template(miner, NOW + i * 1000).unwrap();
        ledger.import(b, NOW + i * 1000).unwrap();
    }
    ledger.tip()
}

/// What `chain verify` does: open, then replay. Neither may panic.
fn open_and_verify(path: &Path) -> Result<(), String> {
    let ledger = Ledger::open(path, spec()).map_err(|e| e.to_string())?;
    ledger.chain().verify_consistency()
}

#[test]
fn a_truncated_chain_store_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.redb");
    build(&path, 5);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let e = Ledger::open(&path, spec())
        .err()
        .expect("a truncated store must not open");
    assert!(e.is_damage(), "reported as damage: {e}");
    assert!(e.to_string().contains("damaged"), "{e}");
    assert!(open_and_verify(&path).is_err());
}

#[test]
fn a_flipped_byte_in_a_balance_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.redb");
    build(&path, 3);
    let mut bytes = std::fs::read(&path).unwrap();
    let pattern = MARKED.to_le_bytes();
    let spots: Vec<usize> = bytes
        .windows(8)
        .enumerate()
        .filter(|(_, w)| *w == pattern)
        .map(|(i, _)| i)
        .collect();
    assert!(!spots.is_empty(), "the marked balance is in the file");
    // The live record and any stale copies in freed pages: one byte of each.
    for i in spots {
        bytes[i + 2] ^= 0x01;
    }
    std::fs::write(&path, &bytes).unwrap();
    let e = Ledger::open(&path, spec())
        .err()
        .expect("must refuse a damaged state");
    assert!(e.is_damage(), "{e}");
    assert!(e.to_string().contains("account state"), "{e}");
}

#[test]
fn damaged_stores_never_panic_at_open_or_verify() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.redb");
    build(&good, 4);
    let original = std::fs::read(&good).unwrap();
    let len = original.len();
    let path = dir.path().join("chain.redb");
    let (mut ok, mut refused) = (0, 0);
    // Single flipped bytes across the file, and truncations at several lengths. Any panic
    // (in our code or in redb's, uncaught) fails the test.
    // The file is mostly preallocated zeros: flip bytes where there is data (the header,
    // tree pages, values), spread evenly over them, and a few in the free space.
    let data: Vec<usize> = (0..len).filter(|&i| original[i] != 0).collect();
    let on_data = (0..40).map(|k| data[k * data.len() / 40]);
    let anywhere = (0..4).map(|k| k * len / 4 + 13);
    let flips: Vec<usize> = on_data.chain(anywhere).collect();
    for offset in flips {
        let mut bytes = original.clone();
        bytes[offset] ^= 0xa5;
        std::fs::write(&path, &bytes).unwrap();
        match open_and_verify(&path) {
            Ok(()) => ok += 1,
            Err(_) => refused += 1,
        }
    }
    for cut in [0, 1, 511, 4096, len / 3, len / 2, len - 4096, len - 1] {
        std::fs::write(&path, &original[..cut]).unwrap();
        match open_and_verify(&path) {
            Ok(()) => ok += 1,
            Err(_) => refused += 1,
        }
    }
    println!(
        "{ok} opened and verified, {refused} refused, of {} damaged copies of {len} bytes",
        ok + refused
    );
    assert!(refused > 0, "some damage must be caught");
}

#[test]
fn a_store_with_a_changed_account_record_fails_the_check() {
    // The same check from another side: a record rewritten through the database itself
    // (valid pages, wrong state) is caught by the digest, not only by a replay.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.redb");
    build(&path, 2);
    {
        let db = redb::Database::create(&path).unwrap();
        let w = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&[u8; 32], (u64, u64)> =
                redb::TableDefinition::new("accounts");
            let mut t = w.open_table(def).unwrap();
            let marked = Wallet::from_secret(&[7; 32]).address();
            t.insert(&marked.0, (MARKED + 1, 0)).unwrap();
        }
        w.commit().unwrap();
    }
    let e = Ledger::open(&path, spec()).err().expect("refused");
    assert!(e.to_string().contains("account state"), "{e}");
}

/// A disk that fills while blocks arrive: the error is storage (not an invalid block, not
/// punishable, nothing marked invalid), transfers and templates are refused, reopening fails
/// while the disk is full and works once it is not, and the chain then advances again.
#[test]
fn a_full_disk_stops_the_store_until_a_reopen_works() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.redb");
    let full = DiskFull::new();
    let mut ledger = Ledger::open_with_faults(&path, spec(), full.clone()).unwrap();
    let chain_id = ledger.chain().chain_id();
    let miner = Wallet::from_secret(&[9; 32]).address();
    for i in 0..3 {
        let b = ledger.template(miner, NOW + i * 1000).unwrap();
        ledger.import(b, NOW + i * 1000).unwrap();
    }
    let before = ledger.tip();
    let next = ledger.template(miner, NOW + 5000).unwrap();

    full.set(true);
    let e = ledger.import(next.clone(), NOW + 5000).unwrap_err();
    assert!(matches!(e, BlockError::Storage(_)), "{e}");
    assert!(!e.punishable());
    assert!(e.to_string().contains("No space left"), "{e}");
    assert!(
        !ledger.chain().is_invalid(&next.hash()),
        "not marked invalid"
    );
    assert!(ledger.store_fault().is_some());
    assert_eq!(ledger.tip(), before);
    // Refused, not acknowledged and lost.
    let t = faucet().transfer(chain_id, miner, 5, 1, 0);
    assert!(matches!(ledger.submit(t), Err(TxError::Storage(_))));
    assert!(ledger.mempool().is_empty());
    assert!(ledger.template(miner, NOW + 6000).is_err());
    assert!(ledger.reopen().is_err(), "the disk is still full");
    assert!(ledger.store_fault().is_some());
    assert!(!ledger.chain().is_open());

    full.set(false);
    ledger.reopen().unwrap();
    assert!(ledger.store_fault().is_none());
    assert_eq!(ledger.tip(), before, "nothing committed was lost");
    assert!(matches!(
        ledger.import(next, NOW + 5000).unwrap(),
        BlockOutcome::Stored { on_main: true, .. }
    ));
    ledger.submit(t).unwrap();
    let b = ledger.template(miner, NOW + 7000).unwrap();
    ledger.import(b, NOW + 7000).unwrap();
    assert_eq!(ledger.tip().height, before.height + 2);
    assert_eq!(ledger.tx_status(&t.id()).unwrap().clone(), {
        let tip = ledger.tip();
        TxStatus::Confirmed {
            height: tip.height,
            block: tip.hash,
            confirmations: 1,
        }
    });
    ledger.chain().verify_consistency().unwrap();
    drop(ledger);
    // And the file is a good store afterwards.
    Ledger::open(&path, spec())
        .unwrap()
        .chain()
        .verify_consistency()
        .unwrap();
}

/// Reopening an in-memory chain reloads the same database: the blocks and the tip survive,
/// and the chain is open before and after.
#[test]
fn reopening_an_in_memory_chain_keeps_its_blocks_and_leaves_it_open() {
    let mut ledger = Ledger::in_memory(spec()).unwrap();
    assert!(ledger.chain().is_open());
    let miner = Wallet::from_secret(&[9; 32]).address();
    for i in 0..2 {
        let b = ledger.template(miner, NOW + i * 1000).unwrap();
        ledger.import(b, NOW + i * 1000).unwrap();
    }
    let before = ledger.tip();
    assert_eq!(before.height, 2);
    ledger.reopen().unwrap();
    assert!(ledger.chain().is_open());
    assert_eq!(ledger.tip(), before);
    assert_eq!(
        ledger.account(&miner).unwrap().0.balance,
        2 * spec().block_reward
    );
    ledger.chain().verify_consistency().unwrap();
}
