//! Small, fast runs of the lab's scenarios in process, checking that what each one reports is
//! sane and says what the scenario claims. (The full-size runs are `meshwork lab run`.)

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use meshwork_lab::distribution::DistOptions;
use meshwork_lab::propagation::{Figures, PropagationOptions};
use meshwork_lab::scenario::RunnerKind;
use meshwork_lab::sybil::SybilOptions;
use meshwork_lab::testbed::Arch;

/// Latencies measured, positive and ordered, for messages that all reached every receiver.
fn check_figures(what: &str, f: &Figures, messages: usize) -> Result<()> {
    ensure!(
        f.messages == messages && f.reached_all == messages,
        "{what}: {} of {messages} messages seen, {} reached everyone",
        f.messages,
        f.reached_all
    );
    for (name, p50, p99) in [
        ("to everyone", f.all_p50_ms, f.all_p99_ms),
        ("one delivery", f.delivery_p50_ms, f.delivery_p99_ms),
    ] {
        ensure!(
            p50 > 0.0 && p50 <= p99 && p99.is_finite(),
            "{what} {name}: p50 {p50} ms, p99 {p99} ms"
        );
    }
    // Every receiver got every message at least once: copies per receiver cannot be fewer.
    ensure!(
        f.copies_per_node >= 1.0,
        "{what}: {} copies per receiver",
        f.copies_per_node
    );
    Ok(())
}

/// `propagation` with 4 users, 5 transfers and 2 blocks: every transfer reaches every node
/// (and every client of the server), every block every node; the latencies are measured,
/// positive and ordered (p50 ≤ p99).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagation_reaches_every_user_with_ordered_latencies() -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let mut o = PropagationOptions::new(RunnerKind::Inproc, dir.path());
    o.common.users = 4;
    o.common.first_index = 0;
    o.txs = 5;
    o.blocks = 2;
    o.interval = Duration::from_millis(100);
    o.settle = Duration::ZERO;
    o.quiet_max = Duration::ZERO;
    o.idle_window = Duration::from_millis(200);
    let (r, out) = meshwork_lab::propagation::run(o).await?;
    println!("{}", out.markdown);
    check_figures("peer to peer, transfers", &r.peer_to_peer.tx, 5)?;
    let blocks = r
        .peer_to_peer
        .block
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no block figures peer to peer"))?;
    check_figures("peer to peer, blocks", blocks, 2)?;
    check_figures("client-server, transfers", &r.client_server.tx, 5)?;
    ensure!(
        r.client_server.block.is_none(),
        "there are no blocks client-server"
    );
    for a in [&r.peer_to_peer, &r.client_server] {
        ensure!(a.setup_secs > 0.0, "{}: no setup time", a.arch);
    }
    Ok(())
}

/// `churn` with 4 users for 8 s, one crash every 1.5 s, each away about 1.5 s: users did
/// crash and come back; their downloads all completed anyway (restarts included), nearly
/// every request of a user that was up was accepted, and every accepted transfer was
/// confirmed by the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_crashes_users_and_the_service_goes_on() -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let mut o = meshwork_lab::churn::ChurnOptions::new(RunnerKind::Inproc, dir.path());
    o.common.users = 4;
    o.common.first_index = 40;
    o.file_mib = 1;
    o.upload_mbps = 40.0;
    o.interval = Duration::from_millis(250);
    o.duration = Duration::from_secs(8);
    o.period = Duration::from_millis(1500);
    o.down = Duration::from_millis(1500);
    o.block_interval = Duration::from_millis(500);
    let (r, out) = meshwork_lab::churn::run(o).await?;
    println!("{}", out.markdown);
    for a in [&r.client_server, &r.peer_to_peer] {
        ensure!(a.crashes >= 2, "{}: only {} crashes", a.arch, a.crashes);
        ensure!(
            a.downloads == 3 && a.completed == a.downloads,
            "{}: {} of {} downloads completed: {:?}",
            a.arch,
            a.completed,
            a.downloads,
            a.unfinished
        );
        ensure!(
            a.completion_secs.len() == a.completed && a.completion_secs.iter().all(|s| *s > 0.0),
            "{}: completion times {:?}",
            a.arch,
            a.completion_secs
        );
        ensure!(
            a.accepted.all > 0 && a.accepted.ok * 10 >= a.accepted.all * 9,
            "{}: {} of {} requests accepted",
            a.arch,
            a.accepted.ok,
            a.accepted.all
        );
        ensure!(
            a.confirmed == a.accepted.ok,
            "{}: {} of {} accepted transfers confirmed",
            a.arch,
            a.confirmed,
            a.accepted.ok
        );
        ensure!(
            a.confirm_p50_ms >= 0.0 && a.confirm_p50_ms <= a.confirm_p99_ms,
            "{}: confirmation p50 {} ms, p99 {} ms",
            a.arch,
            a.confirm_p50_ms,
            a.confirm_p99_ms
        );
    }
    Ok(())
}

/// The censorship half of `sybil`, 5 users, 3 transfers of the censored account: the server
/// refuses them all (one decision cuts the user off); peer to peer, 3 of the 5 nodes refuse
/// them, yet the owner's own node accepts them and the honest others confirm every one. The
/// control account is accepted everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn censorship_by_the_server_cuts_off_and_by_most_peers_does_not() -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let mut o = SybilOptions::new(RunnerKind::Inproc, dir.path());
    o.common.users = 5;
    o.common.first_index = 80;
    o.transfers = 3;
    let cs = meshwork_lab::sybil::censorship(&o, Arch::ClientServer).await?;
    println!("{cs:?}");
    ensure!(
        cs.refuser_count == 1 && cs.refused_by_refusers == 1,
        "{cs:?}"
    );
    ensure!(
        cs.accepted == 0 && cs.confirmed == 0,
        "the server accepted some: {cs:?}"
    );
    ensure!(cs.control_accepted == 3, "{cs:?}");
    let p2p = meshwork_lab::sybil::censorship(&o, Arch::PeerToPeer).await?;
    println!("{p2p:?}");
    ensure!(
        p2p.refuser_count == 3 && p2p.refused_by_refusers == 3,
        "every refuser refuses when asked directly: {p2p:?}"
    );
    ensure!(
        p2p.accepted == 3 && p2p.confirmed == 3,
        "the censored transfers get through the honest nodes: {p2p:?}"
    );
    ensure!(p2p.confirmed_secs.is_some_and(|s| s > 0.0), "{p2p:?}");
    ensure!(p2p.control_accepted == 3, "{p2p:?}");
    Ok(())
}

/// `distribution` where the downloaders' uploads are the bottleneck: the origin uploads at
/// 40 Mbit/s, each of 4 downloaders at 8, so `N·F/(u_s + Σu_i)` (4·F/72 Mbit/s) is the bound,
/// above `F/u_s` (F/40). The swarm's time is no shorter than that bound (a time below it is a
/// measurement error) and within 6 times it; client-server is no shorter than `N·F/u_s`.
///
/// Why 6: the origin super-seeds, so it uploads about one copy and then idles, while the
/// bound has it upload all along; the peers carry the other `N−1` copies, `(N−1)·F/Σu_i`, 1.7
/// times the bound here, plus the start-up of a swarm of 5 nodes on a shared machine (4.4
/// times measured with other builds loading its 2 cores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribution_bound_by_the_peers_uploads_is_met_not_beaten() -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let mut o = DistOptions::new(RunnerKind::Inproc, dir.path());
    o.ns = vec![4];
    o.file_mib = 4;
    o.upload_mbps = 40.0;
    o.peer_upload_mbps = Some(8.0);
    o.piece_kib = Some(64);
    o.first_index = 220;
    let (r, out) = meshwork_lab::distribution::run(o).await?;
    println!("{}", out.markdown);
    let row = &r.rows[0];
    let f = (4u64 << 20) as f64 * 8.0;
    let third = 4.0 * f / (40e6 + 4.0 * 8e6);
    ensure!(
        (row.bound_p2p_secs - third).abs() < 1e-9 && third > f / 40e6,
        "the peers' uploads bind: bound {} s, N·F/(u_s+Σu_i) {third} s, F/u_s {} s",
        row.bound_p2p_secs,
        f / 40e6
    );
    ensure!(
        row.swarm.verified == 4 && row.client_server.verified == 4,
        "{row:?}"
    );
    ensure!(
        row.swarm.secs >= row.bound_p2p_secs,
        "the swarm took {} s, below its bound {} s: a measurement error",
        row.swarm.secs,
        row.bound_p2p_secs
    );
    ensure!(
        row.swarm_ratio <= 6.0,
        "the swarm took {:.2}× its bound",
        row.swarm_ratio
    );
    ensure!(
        row.cs_ratio >= 1.0,
        "client-server took {:.2}× its bound",
        row.cs_ratio
    );
    Ok(())
}
