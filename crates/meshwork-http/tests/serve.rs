//! `meshwork_http::serve` in process: the extensions every request carries, the header-read,
//! keep-alive and stall timeouts (and what is not a stall), the per-IP cap, and graceful
//! shutdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::{Extension, Router};
use meshwork_http::serve::{serve, Limits, LocalAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const BIG: usize = 8 << 20;

fn app() -> Router {
    Router::new()
        .route(
            "/who",
            get(
                |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                 Extension(LocalAddr(local)): Extension<LocalAddr>| async move {
                    format!("{peer} {local}")
                },
            ),
        )
        .route(
            "/work",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(900)).await;
                "done"
            }),
        )
        .route("/big", get(|| async { Body::from(vec![b'x'; BIG]) }))
}

fn limits() -> Limits {
    Limits {
        header_read: Duration::from_millis(300),
        keep_alive: Duration::from_millis(500),
        stall: Duration::from_millis(400),
        shutdown_grace: Duration::from_secs(5),
        ..Limits::default()
    }
}

async fn start(
    limits: Limits,
) -> Result<(
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(l, app(), limits, async {
        let _ = rx.await;
    }));
    Ok((addr, tx, task))
}

async fn connect_from(from: &str, to: SocketAddr) -> Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{from}:0").parse()?)?;
    Ok(s.connect(to).await?)
}

fn get_req(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

/// Reads until the peer closes; the bytes read.
async fn read_to_close(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .context("the server did not close the connection in time")?;
    Ok(out)
}

#[tokio::test]
async fn requests_carry_the_peer_and_local_addresses() -> Result<()> {
    let (addr, _stop, _task) = start(limits()).await?;
    let mut s = connect_from("127.0.0.3", addr).await?;
    let me = s.local_addr()?;
    s.write_all(&get_req("/who")).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf[..n]);
    ensure!(text.starts_with("HTTP/1.1 200"), "{text}");
    ensure!(text.ends_with(&format!("{me} {addr}")), "{text}");
    Ok(())
}

/// On a wildcard bind the local address is the one the client dialled (what the Host check
/// compares with), not `0.0.0.0`.
#[tokio::test]
async fn on_a_wildcard_bind_the_local_address_is_the_one_dialled() -> Result<()> {
    let l = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let port = l.local_addr()?.port();
    let _task = tokio::spawn(serve(l, app(), limits(), std::future::pending()));
    for dialled in ["127.0.0.1", "127.0.0.7"] {
        let to: SocketAddr = format!("{dialled}:{port}").parse()?;
        let mut s = connect_from("127.0.0.3", to).await?;
        s.write_all(&get_req("/who")).await?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
        let text = String::from_utf8_lossy(&buf[..n]);
        ensure!(text.ends_with(&format!(" {to}")), "{text}");
    }
    Ok(())
}

#[tokio::test]
async fn a_slow_head_is_cut_at_the_header_read_timeout_and_an_idle_keep_alive_later() -> Result<()>
{
    let (addr, _stop, _task) = start(limits()).await?;
    // One byte every 100 ms: headers never complete.
    let mut s = TcpStream::connect(addr).await?;
    let t0 = Instant::now();
    let head = get_req("/who");
    let mut closed = false;
    for b in head.iter().take(head.len() - 2) {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 16];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            ensure!(
                matches!(r, Ok(0) | Err(_)),
                "no answer to an unfinished head"
            );
            closed = true;
            break;
        }
    }
    let took = t0.elapsed();
    ensure!(closed, "a head trickled over {took:?} was not cut");
    ensure!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "cut after {took:?}, the header-read timeout is 300 ms"
    );

    // After an answer, the connection may rest for the keep-alive (500 ms), not just 300 ms.
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&get_req("/who")).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    ensure!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let t0 = Instant::now();
    read_to_close(&mut s, Duration::from_secs(5)).await?;
    let idle = t0.elapsed();
    ensure!(
        idle >= Duration::from_millis(400) && idle < Duration::from_secs(2),
        "an idle keep-alive was closed after {idle:?} (keep-alive 500 ms)"
    );
    Ok(())
}

#[tokio::test]
async fn a_busy_handler_and_a_moving_download_are_not_stalls_a_reader_that_stops_is() -> Result<()>
{
    let (addr, _stop, _task) = start(limits()).await?;
    // The handler works 900 ms, over twice the stall timeout: still answered.
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&get_req("/work")).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    ensure!(
        String::from_utf8_lossy(&buf[..n]).contains("done"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    // 8 MiB read 256 KiB every 100 ms (about 3 s, far over the stall timeout): complete.
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&get_req("/big")).await?;
    let mut got = 0usize;
    let mut chunk = vec![0u8; 256 << 10];
    let t0 = Instant::now();
    while got < BIG && t0.elapsed() < Duration::from_secs(30) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await??;
        ensure!(n > 0, "a moving download was cut after {got} bytes");
        got += n;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(got >= BIG, "only {got} bytes");

    // A reader that stops: the server's writes wait on it, and the connection is closed
    // after the stall timeout (reading afterwards ends before the whole answer).
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&get_req("/big")).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rest = read_to_close(&mut s, Duration::from_secs(10)).await?;
    ensure!(
        rest.len() < BIG,
        "a reader that stopped still got the whole answer ({} bytes)",
        rest.len()
    );
    Ok(())
}

#[tokio::test]
async fn the_per_ip_cap_refuses_only_that_ip_when_its_connections_are_busy() -> Result<()> {
    let (addr, _stop, _task) = start(Limits {
        max_per_ip: 2,
        ..limits()
    })
    .await?;
    let mut busy = vec![];
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.5", addr).await?;
        s.write_all(&get_req("/work")).await?;
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // their requests are in flight
    let mut third = connect_from("127.0.0.5", addr).await?;
    let _ = third.write_all(&get_req("/who")).await;
    let got = read_to_close(&mut third, Duration::from_secs(5)).await?;
    ensure!(
        got.is_empty(),
        "a third connection from a full IP was served"
    );
    let mut other = connect_from("127.0.0.6", addr).await?;
    other.write_all(&get_req("/who")).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), other.read(&mut buf)).await??;
    ensure!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "another IP is served"
    );
    for s in &mut busy {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
        ensure!(String::from_utf8_lossy(&buf[..n]).contains("done"));
    }
    Ok(())
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish_then_returns() -> Result<()> {
    let (addr, stop, task) = start(limits()).await?;
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&get_req("/work")).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop.send(());
    let got = read_to_close(&mut s, Duration::from_secs(5)).await?;
    ensure!(
        String::from_utf8_lossy(&got).contains("done"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    tokio::time::timeout(Duration::from_secs(5), task).await???;
    ensure!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    Ok(())
}
