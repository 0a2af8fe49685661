//! Damaged chain stores, from the built binary: `chain verify` and `node start` end with a
//! clear error that names the file and the recovery, never a panic.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Result};
use meshwork_ledger::{ChainSpec, Ledger, Wallet};

mod common;

const NETWORK: &str = "test-damaged";

fn run(dir: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_meshwork"))
        .arg("--data-dir")
        .arg(dir)
        .env_remove("MESHWORK_HOME")
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "1")
        .args(args)
        .output()?)
}

/// An initialized data dir whose chain store holds a few blocks; `marked` is the balance of
/// one account, to find its record in the file.
fn node_dir(root: &Path, name: &str, marked: u64) -> Result<std::path::PathBuf> {
    let dir = root.join(name);
    let init = run(&dir, &["init", "--network", NETWORK])?;
    ensure!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let spec = ChainSpec::for_network(NETWORK);
    let mut ledger = Ledger::open(&dir.join("chain.redb"), spec.clone())?;
    let faucet = Wallet::from_secret(&meshwork_ledger::spec::DEV_FAUCET_SECRET);
    let chain_id = ledger.chain().chain_id();
    let (to, miner) = (
        Wallet::from_secret(&[7; 32]).address(),
        Wallet::from_secret(&[8; 32]).address(),
    );
    let mut now = spec.genesis_timestamp;
    for nonce in 0..3u64 {
        let amount = if nonce == 0 { marked } else { 5 };
        let dest = if nonce == 0 { to } else { miner };
        ledger.submit(faucet.transfer(chain_id, dest, amount, 1, nonce))?;
        now += 1000;
        let b = ledger.template(miner, now)?;
        ledger.import(b, now)?;
    }
    Ok(dir)
}

/// Fails unless `o` failed cleanly: exit status 1 (not a panic's 101), no panic message, and
/// the file and the way to recover in the error.
fn clean_refusal(o: &Output, file: &Path, what: &str) -> Result<String> {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    ensure!(!o.status.success(), "{what} succeeded on a damaged store");
    ensure!(
        o.status.code() == Some(1),
        "{what}: exit {:?}: {err}",
        o.status.code()
    );
    ensure!(!err.contains("panicked"), "{what} panicked: {err}");
    ensure!(err.contains(&file.display().to_string()), "{what}: {err}");
    ensure!(
        err.contains("move the file aside"),
        "{what}: no recovery in: {err}"
    );
    Ok(err)
}

#[test]
fn a_truncated_chain_store_is_refused_cleanly_by_verify_and_start() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = node_dir(tmp.path(), "a", 1000)?;
    let ok = run(&dir, &["chain", "verify"])?;
    ensure!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let file = dir.join("chain.redb");
    std::fs::File::options()
        .write(true)
        .open(&file)?
        .set_len(4096)?;
    clean_refusal(&run(&dir, &["chain", "verify"])?, &file, "chain verify")?;
    let start = run(&dir, &common::NODE_START)?;
    clean_refusal(&start, &file, "node start")?;
    Ok(())
}

#[test]
fn a_flipped_balance_is_refused_cleanly_by_verify_and_start() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let marked: u64 = 0x0a_bcde_f123;
    let dir = node_dir(tmp.path(), "b", marked)?;
    let file = dir.join("chain.redb");
    let mut bytes = std::fs::read(&file)?;
    let pattern = marked.to_le_bytes();
    let spots: Vec<usize> = (0..bytes.len() - 8)
        .filter(|&i| bytes[i..i + 8] == pattern)
        .collect();
    ensure!(!spots.is_empty());
    for i in spots {
        bytes[i + 1] ^= 0x04;
    }
    std::fs::write(&file, bytes)?;
    let err = clean_refusal(&run(&dir, &["chain", "verify"])?, &file, "chain verify")?;
    ensure!(err.contains("account state"), "{err}");
    let start = run(&dir, &common::NODE_START)?;
    let err = clean_refusal(&start, &file, "node start")?;
    ensure!(err.contains("account state"), "{err}");
    Ok(())
}
