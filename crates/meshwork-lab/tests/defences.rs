//! The node's defences against hostile peers, tested against a real node with rogue peers.

mod common;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use meshwork_lab::harness::{wait_for, HarnessBuilder};
use meshwork_lab::rogue::{constant, encode_records, RawAnswer, Rogue};
use meshwork_lab::scenario::RunnerKind;
use meshwork_lab::sybil::SybilOptions;
use meshwork_proto::pex::WireRecord;

fn record(peer: PeerId, addr: &Multiaddr) -> WireRecord {
    WireRecord {
        peer: peer.to_bytes(),
        addrs: vec![addr.to_vec()],
        last_seen: meshwork_node::unix_now(),
    }
}

/// Eclipse flood: a node that knows 50 honest peers in 50 address groups is sent 5000
/// addresses from one /16 through PEX answers (the `sybil` scenario's flood). Its new table
/// holds no more of them than one bucket, and when it picks its 8 outbound peers afresh, at
/// most one is the attacker's, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_flood_from_one_group_cannot_eclipse_a_node() -> Result<()> {
    common::init_logs();
    let mut o = SybilOptions::new(RunnerKind::Inproc, std::path::Path::new("unused"));
    o.restarts = 2;
    let e = meshwork_lab::sybil::eclipse(&o).await?;
    println!("{e:?}");
    // The flood did reach the book (else the bounds below say nothing): it fills at least
    // half of the one bucket it may hold.
    ensure!(
        e.new_attacker >= e.new_bound / 2,
        "only {} of the flood's addresses entered the new table (bucket: {})",
        e.new_attacker,
        e.new_bound
    );
    ensure!(
        e.new_attacker <= e.new_bound,
        "attacker holds {} new entries, more than one bucket ({})",
        e.new_attacker,
        e.new_bound
    );
    ensure!(e.tried_attacker <= e.tried_bound);
    ensure!(e.honest_known >= 50, "the honest peers must still be known");
    ensure!(e.outbound.len() == 2 && e.outbound.iter().all(|(_, n)| *n >= 8));
    ensure!(
        e.distinct_groups,
        "two outbound peers share an address group"
    );
    ensure!(
        e.max_outbound_attacker() <= 1,
        "attacker holds {} outbound slots",
        e.max_outbound_attacker()
    );
    Ok(())
}

/// A flood that reaches the tried table's bound: 8192 peers of one /16, told by 128 source
/// groups (so the new table takes thousands of them) and then connected to (`good`), as an
/// attacker with that many reachable hosts could arrange. The group holds at
/// most `tried_buckets_per_group * bucket_size` (512) tried entries, nearly all of which it
/// fills; peers of other groups, connected afterwards, still get tried slots.
#[test]
fn the_tried_table_holds_one_group_to_its_buckets() -> Result<()> {
    use meshwork_node::addrbook::{AddrBook, AddrBookConfig, Origin, Table, Via};
    use meshwork_proto::AddrGroup;
    let cfg = AddrBookConfig::default();
    let bound = (cfg.tried_buckets_per_group * cfg.bucket_size) as usize;
    let mut book = AddrBook::new(cfg, [7; 32], PeerId::random(), true);
    let now = meshwork_node::unix_now();
    let addr = |a: u8, b: u8, c: u8| -> Result<Multiaddr> {
        Ok(format!("/ip4/127.{a}.{b}.{c}/tcp/4001").parse()?)
    };
    let group = |a: &Multiaddr| AddrGroup::of_addr(a).expect("an IPv4 address");
    let attacker = group(&addr(250, 0, 1)?);
    for i in 0..8192u32 {
        let a = addr(250, (i >> 8) as u8, i as u8)?;
        // 128 source groups, each telling 64 peers: one bucket of the new table each.
        let source = group(&addr(1 + (i % 128) as u8, 0, 1)?);
        let peer = PeerId::random();
        book.add(
            peer,
            std::slice::from_ref(&a),
            now,
            Origin::Peer(source),
            Via::Pex,
            now,
        );
        book.good(&peer, &a, now);
    }
    // Pending collisions time out (their incumbents were never tested): newcomers may take
    // slots, never more of them.
    book.resolve_collisions(now + 24 * 3600);
    let tried_of = |book: &AddrBook, g: AddrGroup| {
        book.entries()
            .filter(|e| e.group == g && e.location.table == Table::Tried)
            .count()
    };
    let held = tried_of(&book, attacker);
    println!("one group holds {held} tried entries (bound {bound}) after 8192 connections");
    ensure!(
        held <= bound,
        "one group holds {held} tried entries, over {bound}"
    );
    ensure!(
        held >= bound * 95 / 100,
        "the flood never came near the bound: {held} of {bound}"
    );
    // Peers of other groups, connected afterwards, still get tried slots: the flood's group is
    // held to 8 of the 256 tried buckets. A peer whose slot is taken waits for test-before-evict
    // instead (measured: 27 or 28 of 32 placed at once); without the per-group bound the
    // flood's 8192 entries would hold half of all tried slots, spread over every bucket.
    let mut placed = 0;
    for g in 0..32u8 {
        let honest = addr(9 + g, 0, 1)?;
        let peer = Keypair::ed25519_from_bytes([g + 1; 32])?
            .public()
            .to_peer_id();
        let source = group(&addr(200 + g % 8, 0, 1)?);
        book.add(
            peer,
            std::slice::from_ref(&honest),
            now,
            Origin::Peer(source),
            Via::Pex,
            now,
        );
        book.good(&peer, &honest, now);
        placed += tried_of(&book, group(&honest));
    }
    println!("{placed} of 32 peers of other groups got a tried slot at once");
    ensure!(
        placed >= 24,
        "only {placed} of 32 peers of other groups got a tried slot"
    );
    ensure!(
        tried_of(&book, attacker) == held,
        "the flood's group changed while others joined"
    );
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
