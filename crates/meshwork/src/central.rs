//! The same commands against the client-server counterpart (`--server URL`), and
//! `meshwork server start`.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use meshwork_node::config;
use meshwork_server::client;
use meshwork_server::server::{self, LogEntry, LogPage, ServerConfig, ServerStatus};

use crate::{wallet, ClientArgs, Command, TxCommand};

pub struct ServerOptions<'a> {
    pub listen: SocketAddr,
    pub network: &'a str,
    pub spec: Option<&'a Path>,
    pub refuse: std::collections::HashSet<meshwork_ledger::Address>,
    /// Most content bytes stored in all.
    pub quota: u64,
    /// Largest single upload.
    pub max_upload: u64,
}

pub async fn server_start(data_dir: Option<&Path>, o: ServerOptions<'_>) -> Result<()> {
    let ServerOptions {
        listen,
        network,
        spec,
        refuse,
        quota,
        max_upload,
    } = o;
    let stop = crate::StopSignals::install()?;
    let dir = server_dir(data_dir)?;
    let spec = match spec {
        Some(p) => config::load_spec(p)?,
        None => {
            meshwork_proto::NetworkName::new(network)?;
            meshwork_ledger::ChainSpec::for_network(network)
        }
    };
    let mut cfg = ServerConfig::new(&dir, spec);
    cfg.refuse_senders = refuse;
    cfg.quota_bytes = quota;
    cfg.max_upload_bytes = max_upload;
    let srv = server::start(listen, cfg).await.with_context(|| {
        format!(
            "cannot start the server (data dir {}, listening on {listen})",
            dir.display()
        )
    })?;
    // Where this server answers: the CLI sends the cookie of this data directory only there.
    let api_file = dir.join(config::API_FILE);
    std::fs::write(&api_file, format!("{}\n", srv.addr))
        .with_context(|| format!("cannot write {}", api_file.display()))?;
    println!("data dir    {}", dir.display());
    println!("api         http://{}/api/v1/status", srv.addr);
    println!(
        "api cookie  {} (uploads and deletes need it)",
        dir.join(meshwork_http::auth::COOKIE_FILE).display()
    );
    println!("server is ready");
    stop.wait().await?;
    srv.stop().await;
    let _ = std::fs::remove_file(&api_file);
    println!("server stopped");
    Ok(())
}

/// The server's data directory: `--data-dir`, else `server/` in the default one.
fn server_dir(data_dir: Option<&Path>) -> Result<PathBuf> {
    Ok(match data_dir {
        Some(d) => d.to_path_buf(),
        None => config::data_dir(None)?.join("server"),
    })
}

fn base(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.starts_with("http://") || url.starts_with("https://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// Runs a client command against the server at `url`.
pub async fn run(cmd: Command, data_dir: Option<&Path>, url: &str) -> Result<()> {
    let base = base(url);
    // The server's cookie (if any), never the node's: a server is not sent a node's secret.
    let server_cookie = server_dir(data_dir)?.join(meshwork_http::auth::COOKIE_FILE);
    let with_api = |mut c: ClientArgs| {
        c.api = Some(base.clone());
        if c.api_cookie.is_none() {
            c.api_cookie = Some(server_cookie.clone());
        }
        c
    };
    match cmd {
        Command::Tx {
            command:
                TxCommand::Send {
                    key,
                    to,
                    amount,
                    fee,
                    client,
                },
        } => {
            let a = wallet::SendArgs {
                key: &key,
                to: &to,
                amount,
                fee,
            };
            wallet::tx_send(data_dir, with_api(client), a).await
        }
        Command::Tx {
            command: TxCommand::Status { id, client },
        } => wallet::tx_status(data_dir, with_api(client), &id).await,
        Command::Balance { address, client } => {
            wallet::balance(data_dir, with_api(client), &address).await
        }
        Command::Share {
            path,
            tracker,
            super_seed,
            client,
        } => {
            if tracker.is_some() || super_seed {
                bail!(
                    "--tracker and --super-seed are swarm options; a server serves the file itself"
                );
            }
            // Uploads need the server's cookie: --api-cookie, else the server's data dir's.
            let dir = server_dir(data_dir)?;
            let target = crate::Target::new(base.clone(), client.api_cookie.as_deref(), Some(&dir));
            let s = client::upload(&base, target.credentials()?, &path).await?;
            if client.json {
                println!("{}", serde_json::to_string(&s)?);
                return Ok(());
            }
            println!("content  {}", s.id);
            println!("size     {} bytes", s.size);
            println!();
            println!("Fetch it with:");
            println!("  meshwork --server {base} fetch {}", s.id);
            Ok(())
        }
        Command::Fetch {
            target,
            out,
            client,
            ..
        } => fetch(&base, &target, out, client.json).await,
        Command::Log {
            after,
            follow,
            client,
        } => log(&base, after, follow, client.json).await,
        Command::Content {
            command: crate::ContentCommand::Rm { id, client },
        } => {
            // Deleting needs the server's cookie, as uploads do.
            let dir = server_dir(data_dir)?;
            let target = crate::Target::new(base.clone(), client.api_cookie.as_deref(), Some(&dir));
            let cid: meshwork_swarm::ContentId =
                id.parse().context("a content id (64 hex digits)")?;
            if client::delete(&base, target.credentials()?, &cid).await? {
                println!("deleted {id} from the server");
                Ok(())
            } else {
                bail!("the server holds no content {id}")
            }
        }
        _ => bail!(
            "--server works with tx send, tx status, balance, share, fetch, log and content rm; \
             for the other commands, leave it out"
        ),
    }
}

/// The server's open calls (reads): no credentials.
fn open(base: &str) -> crate::Target {
    crate::Target::new(base.to_string(), None, None)
}

/// Prints the server's log after `after` (by default the newest 20 entries, or from the end
/// with `follow`), and with `follow` every later entry as it comes. JSON lines carry
/// `seen_us`, when this client received the entry (µs since the Unix epoch).
async fn log(base: &str, after: Option<u64>, follow: bool, json: bool) -> Result<()> {
    let print = |e: LogEntry| -> Result<()> {
        if json {
            let mut v = serde_json::to_value(&e)?;
            v["seen_us"] = meshwork_node::unix_micros().into();
            println!("{v}");
        } else {
            println!(
                "{:>8}  {}  {} -> {}  {} (fee {})",
                e.seq, e.id, e.from, e.to, e.amount, e.fee
            );
        }
        Ok(())
    };
    let after = match after {
        Some(a) => a,
        None => {
            let (st, _): (ServerStatus, _) = crate::get(&open(base), "/api/v1/status").await?;
            if follow {
                st.transactions
            } else {
                st.transactions.saturating_sub(20)
            }
        }
    };
    if !follow {
        let (page, _): (LogPage, _) =
            crate::get(&open(base), &format!("/api/v1/log?after={after}")).await?;
        return page.entries.into_iter().try_for_each(print);
    }
    let mut failed = None;
    client::follow(base, after, |e| match print(e) {
        Ok(()) => true,
        Err(err) => {
            failed = Some(err);
            false
        }
    })
    .await?;
    failed.map_or(Ok(()), Err)
}

async fn fetch(base: &str, target: &str, out: Option<PathBuf>, json: bool) -> Result<()> {
    let id: meshwork_swarm::ContentId = target
        .parse()
        .context("with --server, fetch takes a content id (64 hex digits)")?;
    let out = match out {
        Some(p) => p,
        None => {
            let m = client::manifest(base, &id).await?;
            std::env::current_dir()?.join(m.name)
        }
    };
    let tty = std::io::stderr().is_terminal() && !json;
    let begun = Instant::now();
    let got = client::download(base, &id, &out, |done, m| {
        if tty {
            let pct = if m.size == 0 {
                100.0
            } else {
                done as f64 * 100.0 / m.size as f64
            };
            let rate = done as f64 / begun.elapsed().as_secs_f64().max(1e-3) / 1e6;
            eprint!(
                "\r\x1b[2K{pct:5.1}%  {done}/{} bytes  {rate:.1} MB/s",
                m.size
            );
            let _ = std::io::stderr().flush();
        }
    })
    .await?;
    if tty {
        eprintln!();
    }
    let secs = begun.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "path": out, "size": got.size, "received": got.received,
                "resumed": got.resumed, "secs": secs
            })
        );
    } else {
        println!("{}", out.display());
        println!("verified {} bytes in {secs:.1} s", got.size);
    }
    Ok(())
}
