//! A tracker answer of any size is not read whole (issue 14, case 7): a fake tracker answers
//! every announce with 800 MiB of valid JSON (generated on the fly, never held in memory); the
//! node that fetches through it keeps its memory, reports the tracker as failed with the cap in
//! the reason, and stops reading early.

#[path = "../../../support/skip.rs"]
mod skip;

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{meshwork, Proc};
use serde_json::Value;

const ANSWER_BYTES: u64 = 800 << 20;

/// What the fake tracker saw: bytes sent per finished announce answer.
#[derive(Default)]
struct Seen {
    rounds: Mutex<Vec<u64>>,
    stop: AtomicBool,
    sending: AtomicU64,
}

/// Reads one request (head and `Content-Length` body) from `s`.
fn read_request(s: &mut std::net::TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(());
        }
    }
}

/// Answers with [`ANSWER_BYTES`] of valid announce JSON; odd rounds declare the length (the
/// reader can refuse up front), even rounds send none and close at the end (the reader must
/// count). Returns the bytes written before the node hung up.
fn answer_huge(s: &mut std::net::TcpStream, declare: bool, seen: &Seen) -> u64 {
    let head = br#"{"interval_s":10,"seeders":1,"leechers":0,"peers":["#;
    let entry = br#"{"peer":"12D3KooWBmwkafWE2fqfzS96VoTZkqhLyZPzRrqDZxCnTzCgFC6V","addrs":["/ip4/127.0.0.99/tcp/9999"],"seeder":true}"#;
    let tail = b"]}";
    let fixed = (head.len() + tail.len()) as u64;
    // count entries and count-1 commas.
    let count = (ANSWER_BYTES - fixed + 1) / (entry.len() as u64 + 1);
    let total = fixed + count * entry.len() as u64 + (count - 1);
    let mut http = String::from("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n");
    if declare {
        http.push_str(&format!("content-length: {total}\r\n"));
    }
    http.push_str("connection: close\r\n\r\n");
    let mut sent = 0u64;
    if s.write_all(http.as_bytes()).is_err() || s.write_all(head).is_err() {
        return 0;
    }
    sent += head.len() as u64;
    // 64 KiB of entries at a time, written until the node stops reading.
    let per = 65536 / (entry.len() + 1);
    let mut block = Vec::with_capacity(per * (entry.len() + 1));
    for _ in 0..per {
        block.extend_from_slice(entry);
        block.push(b',');
    }
    let mut left = count;
    while left > 0 && !seen.stop.load(Ordering::Relaxed) {
        let n = (per as u64).min(left);
        let bytes = if n == left {
            // The last block: no comma after the last entry.
            let mut b = block[..n as usize * (entry.len() + 1) - 1].to_vec();
            b.extend_from_slice(tail);
            b
        } else {
            block.clone()
        };
        if s.write_all(&bytes).is_err() {
            return sent;
        }
        sent += bytes.len() as u64;
        seen.sending.store(sent, Ordering::Relaxed);
        left -= n;
    }
    sent
}

fn fake_tracker(seen: Arc<Seen>) -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", l.local_addr()?);
    std::thread::spawn(move || {
        let mut round = 0u64;
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            if seen.stop.load(Ordering::Relaxed) {
                break;
            }
            let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
            if read_request(&mut s).is_err() {
                continue;
            }
            round += 1;
            let sent = answer_huge(&mut s, round % 2 == 1, &seen);
            seen.rounds.lock().expect("lock").push(sent);
        }
    });
    Ok(url)
}

#[test]
fn an_800_mib_tracker_answer_is_refused_at_the_cap_with_memory_unchanged() -> Result<()> {
    if !Path::new("/proc/self/status").exists() {
        skip::skip("no /proc to read the node's memory from");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("node");
    let mut init = meshwork(&dir);
    init.args(["init", "--network", "test-tracker-answer"]);
    common::run_ok(init)?;
    // Ask a failed tracker again after 1 s instead of 60, so that rounds come quickly.
    let cfg = std::fs::read_to_string(dir.join("config.toml"))?;
    ensure!(cfg.contains("tracker_retry_s = 60"), "{cfg}");
    std::fs::write(
        dir.join("config.toml"),
        cfg.replace("tracker_retry_s = 60", "tracker_retry_s = 1"),
    )?;
    let mut cmd = meshwork(&dir);
    cmd.args(common::NODE_START);
    let node = Proc::start(cmd, &tmp.path().join("node.log"), "node is ready")?;

    let seen = Arc::new(Seen::default());
    let tracker = fake_tracker(seen.clone())?;
    let before = node.rss()?;
    let id = "ab".repeat(32);
    let o = meshwork(&dir)
        .args(["fetch", &id, "--tracker", &tracker, "--timeout", "1"])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&o.stderr).contains("keeps fetching")
            || String::from_utf8_lossy(&o.stderr).contains("timeout")
            || !o.status.success(),
        "fetch: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // At least three announce rounds (both kinds of answer), watching the node's memory.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut peak = before;
    while seen.rounds.lock().expect("lock").len() < 3 {
        ensure!(
            Instant::now() < deadline,
            "only {:?} rounds in 40 s",
            seen.rounds.lock().expect("lock")
        );
        peak = peak.max(node.rss()?);
        ensure!(
            peak < before + (32 << 20),
            "the node's memory grew from {before} to {peak} bytes during the announces"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    peak = peak.max(node.rss()?);
    seen.stop.store(true, Ordering::Relaxed);
    let rounds = seen.rounds.lock().expect("lock").clone();
    eprintln!(
        "node RSS {} KiB before, {} KiB at most; bytes sent per round before the node hung up: \
         {rounds:?}",
        before >> 10,
        peak >> 10
    );
    ensure!(
        peak < before + (32 << 20),
        "the node's memory grew from {before} to {peak} bytes"
    );
    for sent in &rounds {
        ensure!(
            *sent < 64 << 20,
            "the node read {sent} bytes of an {ANSWER_BYTES}-byte answer"
        );
    }

    let o = meshwork(&dir)
        .args(["content", "list", "--json"])
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list: Value = serde_json::from_slice(&o.stdout)?;
    let entry = list
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id.as_str()))
        .with_context(|| format!("the fetch is not listed: {list}"))?;
    let why = entry["tracker_error"].as_str().unwrap_or_default();
    ensure!(
        why.contains("answer larger than 256 KiB"),
        "the tracker's failure names the cap: {entry}"
    );
    drop(node);
    Ok(())
}
