//! The wallet and chain commands: keys, transfers and queries, all through a node's HTTP API
//! except `key new` (local) and `chain verify` (offline, on a stopped node's store).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use meshwork_http::body::{read_json_capped, SMALL_ANSWER_MAX};
use meshwork_ledger::{Address, Hash, Wallet};
use meshwork_node::api::{
    AccountView, ApiError, BlockView, ChainView, SubmitTx, Submitted, TxStatusView,
};
use meshwork_node::config;

use crate::{api_base, get, ClientArgs};

/// Writes a new secret key to `out` (mode 0600, never over an existing file).
pub fn key_new(out: &Path) -> Result<()> {
    write_key(out, &Wallet::generate())
}

pub fn write_key(out: &Path, w: &Wallet) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(out)
        .with_context(|| format!("{}: cannot create the key file", out.display()))?;
    writeln!(f, "{}", w.secret_hex())?;
    println!("{}", w.address());
    eprintln!("secret key written to {}", out.display());
    Ok(())
}

pub fn load_wallet(path: &Path) -> Result<Wallet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the key file", path.display()))?;
    Wallet::from_secret_hex(&text)
        .with_context(|| format!("{}: not a meshwork key file", path.display()))
}

/// The miner's key in the data directory, created on first use.
pub fn miner_wallet(dir: &Path) -> Result<Wallet> {
    let path = dir.join("miner.key");
    if !path.exists() {
        key_new(&path)?;
    }
    load_wallet(&path)
}

pub struct SendArgs<'a> {
    pub key: &'a Path,
    pub to: &'a str,
    pub amount: u64,
    pub fee: u64,
}

pub async fn tx_send(data_dir: Option<&Path>, client: ClientArgs, a: SendArgs<'_>) -> Result<()> {
    let to: Address = a.to.parse().context("--to")?;
    if a.amount == 0 {
        bail!("--amount must be positive");
    }
    let w = load_wallet(a.key)?;
    let base = api_base(data_dir, &client)?;
    // Only the chain id is read, so that a node and a `meshwork server` both answer.
    let (chain, _): (serde_json::Value, _) = get(&base, "/api/v1/chain").await?;
    let chain_id: Hash = chain["chain_id"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .context("the chain id in the answer")?;
    let (acct, _): (AccountView, _) =
        get(&base, &format!("/api/v1/accounts/{}", w.address())).await?;
    let t = w.transfer(chain_id, to, a.amount, a.fee, acct.next_nonce);
    let url = format!("{base}/api/v1/tx");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    let resp = base
        .authorize(http.post(&url))
        .json(&SubmitTx {
            tx: hex::encode(t.encode()),
        })
        .send()
        .await
        .with_context(|| format!("cannot reach the node at {url}"))?;
    if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(base.unauthorized(&url));
    }
    if resp.status().is_success() {
        let s: Submitted = read_json_capped(resp, SMALL_ANSWER_MAX)
            .await
            .context("the node's answer")?;
        if client.json {
            println!("{}", serde_json::json!({ "id": s.id }));
        } else {
            println!("{}", s.id);
        }
        Ok(())
    } else {
        let code = resp.status();
        let e: ApiError = read_json_capped(resp, SMALL_ANSWER_MAX)
            .await
            .unwrap_or(ApiError {
                error: code.to_string(),
            });
        if code == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            // Not the transfer's fault: try again once the node is healthy (`meshwork status`).
            bail!("the node cannot take transfers now: {}", e.error)
        }
        bail!("transaction refused: {}", e.error)
    }
}

fn print_json(raw: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(raw)?);
    Ok(())
}

pub async fn balance(data_dir: Option<&Path>, client: ClientArgs, addr: &str) -> Result<()> {
    let addr: Address = addr.parse()?;
    let base = api_base(data_dir, &client)?;
    let (a, raw): (AccountView, _) = get(&base, &format!("/api/v1/accounts/{addr}")).await?;
    if client.json {
        return print_json(&raw);
    }
    println!("{}", a.balance);
    if a.next_nonce > a.nonce {
        eprintln!(
            "{} transfer(s) pending; next nonce {}",
            a.next_nonce - a.nonce,
            a.next_nonce
        );
    }
    Ok(())
}

pub async fn chain(data_dir: Option<&Path>, client: ClientArgs) -> Result<()> {
    let base = api_base(data_dir, &client)?;
    let (c, raw): (ChainView, _) = get(&base, "/api/v1/chain").await?;
    if client.json {
        return print_json(&raw);
    }
    println!("network      {}", c.network);
    println!("chain id     {}", c.chain_id);
    println!("height       {}", c.height);
    println!("tip          {}", c.tip);
    println!("total work   {}", c.total_work);
    println!("difficulty   {} (next block)", c.next_difficulty);
    println!(
        "held         {} blocks, {} orphans, {} pending transfers",
        c.blocks_held, c.orphans, c.mempool
    );
    Ok(())
}

/// Checks a stopped node's chain store from scratch (replays the main chain from genesis).
pub fn chain_verify(data_dir: Option<&Path>) -> Result<()> {
    let dir = config::data_dir(data_dir)?;
    let spec = config::chain_spec(&config::load_file_config(&dir)?, &dir)?;
    let path = dir.join(config::CHAIN_FILE);
    if !path.exists() {
        bail!("{}: no chain store", path.display());
    }
    // Every failure names the file and, for damage, how to recover (no panic on any file).
    let ledger = meshwork_ledger::Ledger::open(&path, spec).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot open the chain store: {e}{}",
            path.display(),
            meshwork_node::node::chain_store_hint(&e, &path)
        )
    })?;
    ledger.chain().verify_consistency().map_err(|e| {
        let damage = meshwork_ledger::OpenError::Corrupt(e);
        anyhow::anyhow!(
            "{}: inconsistent: {damage}{}",
            path.display(),
            meshwork_node::node::chain_store_hint(&damage, &path)
        )
    })?;
    let tip = ledger.tip();
    println!(
        "consistent: height {}, tip {}, {} blocks held",
        tip.height,
        tip.hash,
        ledger.chain().block_count()
    );
    Ok(())
}

pub async fn block(data_dir: Option<&Path>, client: ClientArgs, id: &str) -> Result<()> {
    let base = api_base(data_dir, &client)?;
    let (b, raw): (BlockView, _) = get(&base, &format!("/api/v1/blocks/{id}")).await?;
    if client.json {
        return print_json(&raw);
    }
    println!("hash         {}", b.hash);
    println!(
        "height       {}{}",
        b.height,
        if b.on_main_chain {
            ""
        } else {
            " (not on the main chain)"
        }
    );
    println!("previous     {}", b.prev);
    println!("timestamp    {} ms", b.timestamp);
    println!("difficulty   {}", b.difficulty);
    println!("nonce        {}", b.nonce);
    println!("transactions {}", b.txs.len());
    for t in &b.txs {
        match &t.from {
            Some(from) => println!(
                "  {}  {} -> {}  amount {} fee {} nonce {}",
                &t.id[..16],
                &from[..16],
                &t.to[..16],
                t.amount,
                t.fee,
                t.nonce.unwrap_or(0)
            ),
            None => println!(
                "  {}  coinbase -> {}  amount {}",
                &t.id[..16],
                &t.to[..16],
                t.amount
            ),
        }
    }
    Ok(())
}

pub async fn tx_status(data_dir: Option<&Path>, client: ClientArgs, id: &str) -> Result<()> {
    let id: Hash = id.parse().context("transaction id")?;
    let base = api_base(data_dir, &client)?;
    let (s, raw): (TxStatusView, _) = get(&base, &format!("/api/v1/tx/{id}")).await?;
    if client.json {
        return print_json(&raw);
    }
    match s.status {
        meshwork_ledger::TxStatus::Pending => println!("pending"),
        meshwork_ledger::TxStatus::Confirmed {
            height,
            block,
            confirmations,
        } => println!(
            "confirmed at height {height} (block {}), {confirmations} confirmation(s)",
            block.short()
        ),
        meshwork_ledger::TxStatus::Unknown => println!("unknown"),
    }
    Ok(())
}
