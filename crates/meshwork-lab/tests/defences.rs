//! The node's defences against hostile peers, tested against a real node with rogue peers.

mod common;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{ensure, Result};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use meshwork_lab::harness::{wait_for, HarnessBuilder, Topology};
use meshwork_lab::rogue::{constant, encode_records, RawAnswer, Rogue};
use meshwork_node::addrbook::{AddrBookConfig, Table};
use meshwork_node::node::Class;
use meshwork_proto::pex::WireRecord;

const ATTACKER_GROUP: &str = "127.250.0.0/16";
const FLOOD: usize = 5000;

fn record(peer: PeerId, addr: &Multiaddr) -> WireRecord {
    WireRecord {
        peer: peer.to_bytes(),
        addrs: vec![addr.to_vec()],
        last_seen: meshwork_node::unix_now(),
    }
}

/// Eclipse flood: a node that knows 50 honest peers in 50 address groups is sent 5000
/// addresses from one /16 through PEX answers. Its new table holds no more of them than one
/// bucket, and when it picks its 8 outbound peers afresh, at most one is the attacker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_flood_from_one_group_cannot_eclipse_a_node() -> Result<()> {
    common::init_logs();
    let honest = HarnessBuilder::new("eclipse")?
        .topology(Topology::Chain)
        .spawn(50)
        .await?;
    let honest_addrs: Vec<Multiaddr> = honest.running_nodes().map(|(_, n)| n.dial_addr()).collect();
    let mut victim = HarnessBuilder::new("eclipse")?
        .first_index(99)
        .persistent(true)
        .tweak(move |_, cfg| {
            cfg.bootstrap = honest_addrs.clone();
            // The victim asks one random peer every 50 ms (its maintenance tick too), so that
            // the flood arrives in seconds.
            cfg.timings.pex_interval = Duration::from_millis(50);
            cfg.timings.maintenance = Duration::from_millis(50);
        })
        .spawn(1)
        .await?;
    let v = victim.running(0)?.handle.clone();
    wait_for(
        "the victim to fill its outbound slots",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { Ok(v.status().await?.connections.outbound >= 8) },
    )
    .await?;

    // Sixteen attacker peers in 127.250.0.0/16 answer every PEX request with 32 records, until
    // 5000 have been sent. One record in eight names a real, reachable attacker peer.
    let sent = Arc::new(AtomicUsize::new(0));
    let real: Arc<RwLock<Vec<(PeerId, Multiaddr)>>> = Arc::default();
    let answer = {
        let (sent, real) = (sent.clone(), real.clone());
        Arc::new(move || {
            let real = real.read().expect("not poisoned").clone();
            let mut records = vec![];
            for _ in 0..32 {
                let i = sent.fetch_add(1, Ordering::SeqCst);
                if i >= FLOOD {
                    break;
                }
                let rec = match (i % 8, real.is_empty()) {
                    (0, false) => {
                        let (p, a) = &real[(i / 8) % real.len()];
                        record(*p, a)
                    }
                    _ => {
                        let addr: Multiaddr =
                            format!("/ip4/127.250.{}.{}/tcp/4001", 1 + (i >> 8) % 250, i & 0xff)
                                .parse()
                                .expect("valid");
                        record(PeerId::random(), &addr)
                    }
                };
                records.push(rec);
            }
            RawAnswer::Body(encode_records(records))
        })
    };
    let mut rogues = vec![];
    for k in 0..16u8 {
        let r = Rogue::spawn(
            &v.network,
            Keypair::generate_ed25519(),
            Ipv4Addr::new(127, 250, 0, 1 + k),
            vec![victim.dial_addr(0)?],
            answer.clone(),
        )
        .await?;
        real.write()
            .expect("not poisoned")
            .push((r.peer_id, r.listen_addr.clone()));
        rogues.push(r);
    }
    wait_for(
        "5000 flood addresses to be sent",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { Ok(sent.load(Ordering::SeqCst) >= FLOOD) },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let book = v.addrbook().await?;
    let count = |table: Table, evil: bool| {
        book.iter()
            .filter(|e| e.table == table && (e.group == ATTACKER_GROUP) == evil)
            .count()
    };
    let (evil_new, honest_new) = (count(Table::New, true), count(Table::New, false));
    let (evil_tried, honest_tried) = (count(Table::Tried, true), count(Table::Tried, false));
    let cfg = AddrBookConfig::default();
    let total = book.len();
    println!(
        "after a flood of {FLOOD}: attacker holds {evil_new} of {} new entries ({:.1}%), {evil_tried} of {} tried entries ({:.1}%), {} of {total} in all ({:.1}%)",
        evil_new + honest_new,
        100.0 * evil_new as f64 / (evil_new + honest_new).max(1) as f64,
        evil_tried + honest_tried,
        100.0 * evil_tried as f64 / (evil_tried + honest_tried).max(1) as f64,
        evil_new + evil_tried,
        100.0 * (evil_new + evil_tried) as f64 / total.max(1) as f64,
    );
    // One (address group, source group) pair reaches exactly one new bucket.
    ensure!(
        evil_new <= cfg.bucket_size as usize,
        "attacker holds {evil_new} new entries, more than one bucket"
    );
    ensure!(evil_tried <= (cfg.tried_buckets_per_group * cfg.bucket_size) as usize);
    ensure!(
        honest_new + honest_tried >= 50,
        "the honest peers must still be known"
    );

    // The victim restarts from its address book (no bootstrap, no anchors) and picks its
    // outbound peers afresh, with every attacker peer still up and reachable.
    victim.stop(0).await?;
    victim.restart(0, vec![], |cfg| cfg.anchors = false).await?;
    let v = victim.running(0)?.handle.clone();
    wait_for(
        "the restarted victim to fill its outbound slots",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { Ok(v.status().await?.connections.outbound >= 8) },
    )
    .await?;
    let outbound: Vec<_> = v
        .peers()
        .await?
        .into_iter()
        .filter(|p| p.direction == Class::Outbound)
        .collect();
    let evil_out = outbound
        .iter()
        .filter(|p| p.address_group.as_deref() == Some(ATTACKER_GROUP))
        .count();
    let groups: HashSet<_> = outbound.iter().map(|p| p.address_group.clone()).collect();
    println!(
        "outbound slots: attacker holds {evil_out} of {} ({:.1}%)",
        outbound.len(),
        100.0 * evil_out as f64 / outbound.len() as f64
    );
    ensure!(
        groups.len() == outbound.len(),
        "two outbound peers share an address group"
    );
    ensure!(evil_out <= 1, "attacker holds {evil_out} outbound slots");

    for r in rogues {
        r.stop().await;
    }
    victim.shutdown().await;
    honest.shutdown().await;
    Ok(())
}

/// Malformed PEX answers cost the sending peer points or get it disconnected and banned; the
/// node stays up and its address book is unchanged by them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pex_answers_are_punished_and_change_nothing() -> Result<()> {
    common::init_logs();
    // Private addresses are not allowed here, so that "unroutable" means something.
    let victim = HarnessBuilder::new("malformed")?
        .first_index(120)
        .tweak(|_, cfg| {
            cfg.allow_private_addrs = false;
            cfg.timings.pex_interval = Duration::from_millis(300);
        })
        .spawn(1)
        .await?;
    let v = victim.running(0)?.handle.clone();
    let target = victim.dial_addr(0)?;
    let before: HashSet<String> = v.addrbook().await?.into_iter().map(|e| e.peer_id).collect();

    let routable = |i: usize| -> Multiaddr {
        format!("/ip4/8.8.{}.{}/tcp/4001", i / 200, i % 200)
            .parse()
            .expect("valid")
    };
    let too_many: Vec<WireRecord> = (0..40)
        .map(|i| record(PeerId::random(), &routable(i)))
        .collect();
    let mut bad_bytes = record(PeerId::random(), &routable(1));
    bad_bytes.addrs = vec![vec![0xff, 0xff, 0xff, 0x01]];
    let unroutable: Vec<WireRecord> = (0..4)
        .map(|i| {
            record(
                PeerId::random(),
                &format!("/ip4/10.0.0.{i}/tcp/4001").parse().expect("valid"),
            )
        })
        .collect();
    let cases: Vec<(&str, RawAnswer, Vec<WireRecord>)> = vec![
        (
            "40 records where 32 were asked for",
            RawAnswer::Body(encode_records(too_many.clone())),
            too_many,
        ),
        (
            "invalid multiaddr bytes",
            RawAnswer::Body(encode_records(vec![bad_bytes.clone()])),
            vec![bad_bytes],
        ),
        ("a 1 MiB message", RawAnswer::Oversized(1 << 20), vec![]),
        (
            "bytes that do not decode",
            RawAnswer::Body(vec![0xff; 64]),
            vec![],
        ),
        (
            "unroutable addresses",
            RawAnswer::Body(encode_records(unroutable.clone())),
            unroutable,
        ),
    ];

    for (k, (name, answer, records)) in cases.into_iter().enumerate() {
        let bans_before = v.status().await?.address_book.banned;
        let rogue = Rogue::spawn(
            &v.network,
            Keypair::generate_ed25519(),
            Ipv4Addr::new(127, 251, 0, 1 + k as u8),
            vec![target.clone()],
            constant(answer),
        )
        .await?;
        let id = rogue.peer_id.to_string();
        // Every case ends in a ban: the severe ones at once, the minor one (20 points an
        // answer) after a few answers. Before that, the minor one's score must be seen rising.
        let max_score = Arc::new(std::sync::Mutex::new(0.0f64));
        wait_for(
            &format!("the peer sending {name} to be banned"),
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                let (v, id, max_score) = (v.clone(), id.clone(), max_score.clone());
                async move {
                    if let Some(p) = v.peers().await?.into_iter().find(|p| p.peer_id == id) {
                        let mut m = max_score.lock().expect("not poisoned");
                        *m = m.max(p.misbehaviour);
                    }
                    Ok(v.status().await?.address_book.banned > bans_before)
                }
            },
        )
        .await?;
        let max_score = *max_score.lock().expect("not poisoned");
        // The ban is recorded at once; the disconnection it orders completes asynchronously.
        wait_for(
            &format!("{name}: the banned peer to be disconnected"),
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async { Ok(!v.peers().await?.iter().any(|p| p.peer_id == id)) },
        )
        .await?;
        let after: HashSet<String> = v.addrbook().await?.into_iter().map(|e| e.peer_id).collect();
        ensure!(after == before, "{name}: the address book changed");
        for r in &records {
            let p = PeerId::from_bytes(&r.peer)?.to_string();
            ensure!(
                !after.contains(&p),
                "{name}: a record of the bad answer entered the book"
            );
        }
        if name == "unroutable addresses" {
            ensure!(
                max_score >= 20.0,
                "{name}: score was never seen lowered (max {max_score})"
            );
        }
        println!("{name}: peer banned and disconnected (score seen: {max_score:.0}); address book unchanged");
        rogue.stop().await;
    }
    let s = v.status().await?;
    ensure!(
        v.is_running() && s.address_book.banned >= 5,
        "the node must be up with 5 bans"
    );
    victim.shutdown().await;
    Ok(())
}
