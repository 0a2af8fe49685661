//! Ledger throughput on one core: `cargo bench -p meshwork-ledger`.
//!
//! - signature verification of transfers, one at a time and in batches;
//! - full admission into the mempool (stateless rules, batch verification, nonce and balance
//!   checks against the store);
//! - import of a block of 2000 transfers into a file-backed store (checks, batch verification,
//!   state changes, undo data, one fsynced commit);
//! - BLAKE3 header hashes per second, the miner's rate.

use std::time::Instant;

use meshwork_ledger::block::merkle_root;
use meshwork_ledger::spec::DEV_FAUCET_SECRET;
use meshwork_ledger::tx::{verify_all, Coinbase};
use meshwork_ledger::{ChainSpec, Hash, Ledger, SignedTransfer, Transaction, Wallet};

fn rate(n: usize, secs: f64) -> String {
    format!(
        "{:>10.0} tx/s   ({:.2} µs each)",
        n as f64 / secs,
        secs * 1e6 / n as f64
    )
}

fn main() {
    let spec = ChainSpec::test("test-bench");
    let chain_id = Ledger::in_memory(spec.clone())
        .expect("ledger")
        .chain()
        .chain_id();
    let senders: Vec<Wallet> = (0..256).map(|_| Wallet::generate()).collect();
    let n = 8192;
    let txs: Vec<SignedTransfer> = (0..n)
        .map(|i| {
            let w = &senders[i % senders.len()];
            w.transfer(
                chain_id,
                senders[0].address(),
                1,
                1,
                (i / senders.len()) as u64,
            )
        })
        .collect();

    println!("meshwork-ledger benchmarks (one thread)\n");
    let t = Instant::now();
    let ok = txs.iter().filter(|t| t.verify()).count();
    assert_eq!(ok, n);
    println!(
        "verify, single        {}",
        rate(n, t.elapsed().as_secs_f64())
    );

    for batch in [64, 128, 512] {
        let t = Instant::now();
        for chunk in txs.chunks(batch) {
            let refs: Vec<&SignedTransfer> = chunk.iter().collect();
            assert!(verify_all(&refs).iter().all(|ok| *ok));
        }
        println!(
            "verify, batch of {batch:<4} {}",
            rate(n, t.elapsed().as_secs_f64())
        );
    }

    // Admission: every sender funded at genesis; 32 transfers each (within the nonce window).
    let mut funded = spec.clone();
    funded.allocations = senders.iter().map(|w| (w.address(), 1_000_000)).collect();
    let mut ledger = Ledger::in_memory(funded.clone()).expect("ledger");
    let chain_id = ledger.chain().chain_id();
    let admit: Vec<SignedTransfer> = (0..senders.len() * 32)
        .map(|i| {
            let w = &senders[i % senders.len()];
            w.transfer(
                chain_id,
                senders[1].address(),
                1,
                1,
                (i / senders.len()) as u64,
            )
        })
        .collect();
    let t = Instant::now();
    for chunk in admit.chunks(128) {
        for r in ledger.submit_many(chunk.to_vec()) {
            r.expect("admitted");
        }
    }
    println!(
        "mempool admission     {}  (batches of 128, {} senders)",
        rate(admit.len(), t.elapsed().as_secs_f64()),
        senders.len()
    );

    // A 2000-transfer block into a file-backed store.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec2 = spec.clone();
    spec2.allocations = vec![(
        Wallet::from_secret(&DEV_FAUCET_SECRET).address(),
        u64::MAX / 2,
    )];
    let mut ledger = Ledger::open(&dir.path().join("chain.redb"), spec2).expect("ledger");
    let chain_id = ledger.chain().chain_id();
    let faucet = Wallet::from_secret(&DEV_FAUCET_SECRET);
    let transfers: Vec<SignedTransfer> = (0..2000)
        .map(|i| faucet.transfer(chain_id, senders[i % 256].address(), 1, 1, i as u64))
        .collect();
    let now = spec.genesis_timestamp + 1000;
    let mut header = ledger.chain().next_header(now);
    let mut all = vec![Transaction::Coinbase(Coinbase {
        height: header.height,
        to: faucet.address(),
        amount: spec.block_reward + 2000,
    })];
    all.extend(transfers.iter().copied().map(Transaction::Transfer));
    let ids: Vec<Hash> = all.iter().map(|t| t.id()).collect();
    header.merkle_root = merkle_root(&ids);
    let block = meshwork_ledger::Block { header, txs: all };
    let bytes = block.encode().len();
    let t = Instant::now();
    let refs: Vec<&SignedTransfer> = transfers.iter().collect();
    assert!(verify_all(&refs).iter().all(|ok| *ok));
    let verify_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    ledger.import(block, now).expect("block imports");
    let import_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(ledger.tip().height, 1);
    // Proof of work: header hashes per second (a difficulty nothing meets, so every nonce is
    // tried).
    let mut h = ledger.chain().next_header(now + 1000);
    h.target = u64::MAX;
    let hashes = 2_000_000;
    let t = Instant::now();
    let _ = meshwork_ledger::block::search_nonce(&h, 0, hashes);
    println!(
        "proof of work         {:>10.2} M header hashes/s",
        hashes as f64 / t.elapsed().as_secs_f64() / 1e6
    );
    println!(
        "import, 2000-transfer block ({} KiB): {import_ms:.1} ms in all, {:.0} tx/s (a batch verification of its signatures alone: {verify_ms:.1} ms)",
        bytes / 1024,
        2000.0 / (import_ms / 1000.0)
    );
}
