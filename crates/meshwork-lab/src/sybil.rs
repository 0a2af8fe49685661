//! `meshwork lab run sybil`: who can cut a user off, or refuse the user's transfers.
//!
//! - **Eclipse flood** (peer to peer): a victim that knows `honest` peers in as many address
//!   groups hears `flood` addresses from one /16 (sixteen rogue peers answering its PEX
//!   requests, one record in eight naming a real, reachable rogue). The figures: the attacker's
//!   share of what the victim heard, of its new and tried tables, and of its 8 outbound slots
//!   when it picks them afresh from its address book (`restarts` times, anchors off, every
//!   rogue still up). Rogue peers are lab code speaking the node's protocols, so this part runs
//!   in process; its figures depend on address groups, not on links.
//! - **Censorship**: one account's transfers refused by the operator's policy
//!   (`refuse_senders`). Client-server, the operator is the server: one decision, and every
//!   client is refused. Peer to peer, a `censors` share of the nodes refuse (seeded pick); the
//!   account's owner submits through its own node, and the transfers are confirmed anyway,
//!   relayed and mined by the others. Transfers of another account are the control.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use meshwork_ledger::{Hash, Wallet};
use meshwork_node::addrbook::Table;
use meshwork_node::node::Class;
use meshwork_proto::pex::WireRecord;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::api::Submitted;
use crate::harness::{wait_for, HarnessBuilder, Topology};
use crate::rogue::{encode_records, RawAnswer, Rogue};
use crate::scenario::{
    fund, mine_everywhere, wait_confirmed, with_bed, Common, Outputs, RunnerKind,
};
use crate::testbed::{pick, Arch, Bed};

/// The attackers' address group.
pub const ATTACKER_GROUP: &str = "127.250.0.0/16";
const ROGUES: u8 = 16;

#[derive(Clone, Debug)]
pub struct SybilOptions {
    /// `users`: the censorship part's users.
    pub common: Common,
    /// Honest nodes the victim knows.
    pub honest: usize,
    /// Addresses in the flood.
    pub flood: usize,
    /// Times the victim picks its outbound peers afresh.
    pub restarts: usize,
    /// Censorship: the share of the nodes that refuse, and the transfers submitted.
    pub censors: f64,
    pub transfers: usize,
}

impl SybilOptions {
    pub fn new(runner: RunnerKind, out: &Path) -> SybilOptions {
        SybilOptions {
            common: Common::new(runner, 10, out),
            honest: 50,
            flood: 5000,
            restarts: 3,
            censors: 0.5,
            transfers: 10,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Eclipse {
    pub honest: usize,
    pub flood: usize,
    /// The attacker's share of the addresses the victim heard.
    pub heard_share: f64,
    pub new_attacker: usize,
    pub new_total: usize,
    pub tried_attacker: usize,
    pub tried_total: usize,
    /// Honest peers still in the book.
    pub honest_known: usize,
    /// The attacker's outbound slots, of the victim's outbound connections, per restart.
    pub outbound: Vec<(usize, usize)>,
    /// Whether every restart's outbound peers were in distinct address groups.
    pub distinct_groups: bool,
    /// The bounds the address book promises: one new bucket for one (group, source group)
    /// pair, and the tried buckets of one group.
    pub new_bound: usize,
    pub tried_bound: usize,
}

impl Eclipse {
    pub fn max_outbound_attacker(&self) -> usize {
        self.outbound.iter().map(|(a, _)| *a).max().unwrap_or(0)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Censorship {
    pub arch: Arch,
    /// Who refuses: "the server", or "k of n nodes"; and how many services that is.
    pub refusers: String,
    pub refuser_count: usize,
    /// The censored account's transfers: submitted, accepted (by the service the owner
    /// uses), confirmed, and refused when submitted to a refuser.
    pub submitted: usize,
    pub accepted: usize,
    pub confirmed: usize,
    pub refused_by_refusers: usize,
    /// Seconds from the first submission until the last confirmation (peer to peer).
    pub confirmed_secs: Option<f64>,
    /// The control account's transfers: accepted of submitted.
    pub control_accepted: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SybilReport {
    pub scenario: String,
    pub runner: RunnerKind,
    pub seed: u64,
    pub eclipse: Eclipse,
    pub client_server: Censorship,
    pub peer_to_peer: Censorship,
}

pub async fn run(o: SybilOptions) -> Result<(SybilReport, Outputs)> {
    if o.common.runner == RunnerKind::Netns {
        bail!(
            "the sybil scenario runs in process (--runner inproc): its attackers are lab code \
             speaking the node's protocols, and its figures depend on address groups, not links"
        );
    }
    ensure!(
        o.common.users >= 4,
        "the censorship part needs at least 4 users"
    );
    let eclipse = eclipse(&o).await?;
    let cs = censorship(&o, Arch::ClientServer).await?;
    let p2p = censorship(&o, Arch::PeerToPeer).await?;
    let report = SybilReport {
        scenario: "sybil".into(),
        runner: o.common.runner,
        seed: o.common.seed,
        eclipse,
        client_server: cs,
        peer_to_peer: p2p,
    };
    let outputs = outputs(&report)?;
    Ok((report, outputs))
}

fn record(peer: PeerId, addr: &Multiaddr) -> WireRecord {
    WireRecord {
        peer: peer.to_bytes(),
        addrs: vec![addr.to_vec()],
        last_seen: meshwork_node::unix_now(),
    }
}

/// The eclipse flood (see the module docs), in process.
pub async fn eclipse(o: &SybilOptions) -> Result<Eclipse> {
    let honest = HarnessBuilder::new("eclipse")?
        .topology(Topology::Chain)
        .first_index(o.common.first_index)
        .spawn(o.honest)
        .await?;
    let honest_addrs: Vec<Multiaddr> = honest.running_nodes().map(|(_, n)| n.dial_addr()).collect();
    let mut victim = HarnessBuilder::new("eclipse")?
        .first_index(o.common.first_index + o.honest + 49)
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
    outbound_full(&victim).await?;

    // Sixteen rogue peers answer every PEX request with 32 records, until `flood` are sent.
    let sent = Arc::new(AtomicUsize::new(0));
    let real: Arc<RwLock<Vec<(PeerId, Multiaddr)>>> = Arc::default();
    let flood = o.flood;
    let answer = {
        let (sent, real) = (sent.clone(), real.clone());
        Arc::new(move || {
            let real = real.read().expect("not poisoned").clone();
            let mut records = vec![];
            for _ in 0..32 {
                let i = sent.fetch_add(1, Ordering::SeqCst);
                if i >= flood {
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
    for k in 0..ROGUES {
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
        "the flood to be sent",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || async { Ok(sent.load(Ordering::SeqCst) >= flood) },
    )
    .await?;
    // The last answers are still on their way: the flood is processed once the attacker's
    // share of the book has stopped changing for a second (ten polls in a row). Requests
    // after the flood get empty answers, so nothing the rogues send changes it later.
    let attacker_entries = || async {
        Ok::<_, anyhow::Error>(
            v.addrbook()
                .await?
                .iter()
                .filter(|e| e.group == ATTACKER_GROUP)
                .count(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut unchanged) = (usize::MAX, 0);
    while unchanged < 10 {
        ensure!(
            Instant::now() < deadline,
            "the flood was never processed: the victim's book kept changing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = attacker_entries().await?;
        unchanged = if now == last { unchanged + 1 } else { 0 };
        last = now;
    }

    let book = v.addrbook().await?;
    let count = |table: Table, evil: bool| {
        book.iter()
            .filter(|e| e.table == table && (e.group == ATTACKER_GROUP) == evil)
            .count()
    };
    let cfg = meshwork_node::addrbook::AddrBookConfig::default();
    let mut e = Eclipse {
        honest: o.honest,
        flood: o.flood,
        heard_share: o.flood as f64 / (o.flood + o.honest) as f64,
        new_attacker: count(Table::New, true),
        new_total: count(Table::New, true) + count(Table::New, false),
        tried_attacker: count(Table::Tried, true),
        tried_total: count(Table::Tried, true) + count(Table::Tried, false),
        honest_known: count(Table::New, false) + count(Table::Tried, false),
        outbound: vec![],
        distinct_groups: true,
        new_bound: cfg.bucket_size as usize,
        tried_bound: (cfg.tried_buckets_per_group * cfg.bucket_size) as usize,
    };

    // The victim restarts from its address book (no bootstrap, no anchors) and picks its
    // outbound peers afresh, with every rogue still up and reachable.
    for _ in 0..o.restarts {
        victim.stop(0).await?;
        victim.restart(0, vec![], |cfg| cfg.anchors = false).await?;
        outbound_full(&victim).await?;
        let outbound: Vec<_> = victim
            .running(0)?
            .handle
            .peers()
            .await?
            .into_iter()
            .filter(|p| p.direction == Class::Outbound)
            .collect();
        let evil = outbound
            .iter()
            .filter(|p| p.address_group.as_deref() == Some(ATTACKER_GROUP))
            .count();
        let groups: HashSet<_> = outbound.iter().map(|p| p.address_group.clone()).collect();
        e.distinct_groups &= groups.len() == outbound.len();
        e.outbound.push((evil, outbound.len()));
    }
    for r in rogues {
        r.stop().await;
    }
    victim.shutdown().await;
    honest.shutdown().await;
    Ok(e)
}

async fn outbound_full(victim: &crate::Harness) -> Result<()> {
    wait_for(
        "the victim to fill its outbound slots",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            Ok(victim
                .running(0)?
                .handle
                .status()
                .await?
                .connections
                .outbound
                >= 8)
        },
    )
    .await
    .map(drop)
}

/// One account's transfers, refused by the server or by a share of the nodes.
pub async fn censorship(o: &SybilOptions, arch: Arch) -> Result<Censorship> {
    let c = Common {
        // Past the eclipse's hosts.
        first_index: o.common.first_index + o.honest + 60,
        ..o.common.clone()
    };
    let censored = Wallet::generate();
    let control = Wallet::generate();
    // User 0 funds and owns the accounts; its node is honest.
    let others: Vec<usize> = (1..c.users).collect();
    let k = ((c.users as f64 * o.censors).round() as usize).clamp(1, c.users - 2);
    let mut rng = rand::rngs::StdRng::seed_from_u64(c.seed);
    let refusers = pick(&mut rng, &others, k);
    let senders = HashSet::from([censored.address()]);
    let tweak = |b: &mut crate::testbed::BedOptions| {
        b.refuse_senders = senders;
        b.refusers = refusers.iter().copied().collect();
    };
    let (r, _) = with_bed("sybil", &c, arch, tweak, async |bed| {
        censor_drive(o, bed, &refusers, censored, control).await
    })
    .await?;
    Ok(r)
}

async fn censor_drive(
    o: &SybilOptions,
    bed: &Bed,
    refusers: &[usize],
    censored: Wallet,
    control: Wallet,
) -> Result<Censorship> {
    let arch = bed.arch;
    if arch == Arch::PeerToPeer {
        bed.wait_connected(3.min(bed.users() - 1), Duration::from_secs(60))
            .await?;
        let all: Vec<usize> = (0..bed.users()).collect();
        mine_everywhere(bed, &all, Duration::from_millis(500)).await?;
    }
    // The owner funds both accounts through its own service.
    fund(bed, &[censored.clone(), control.clone()]).await?;
    let owner = bed.service(0).clone();
    let chain = owner.chain_id().await?;
    let to = Wallet::generate().address();
    let mut c = Censorship {
        arch,
        refusers: match arch {
            Arch::ClientServer => "the server".into(),
            Arch::PeerToPeer => format!("{} of {} nodes", refusers.len(), bed.users()),
        },
        refuser_count: match arch {
            Arch::ClientServer => 1,
            Arch::PeerToPeer => refusers.len(),
        },
        submitted: o.transfers,
        accepted: 0,
        confirmed: 0,
        refused_by_refusers: 0,
        confirmed_secs: None,
        control_accepted: 0,
    };
    let started = Instant::now();
    let mut ids: Vec<Hash> = vec![];
    for i in 0..o.transfers as u64 {
        let t = censored.transfer(chain, to, 1, 1, i);
        if let Submitted::Accepted(id) = owner.submit(&t).await? {
            c.accepted += 1;
            ids.push(id);
        }
        let t = control.transfer(chain, to, 1, 1, i);
        if let Submitted::Accepted(_) = owner.submit(&t).await? {
            c.control_accepted += 1;
        }
    }
    // The same transfers offered straight to each refuser are refused there.
    let probe = censored.transfer(chain, to, 1, 1, o.transfers as u64);
    let refusing_services: Vec<_> = match arch {
        Arch::ClientServer => vec![bed.server().clone()],
        Arch::PeerToPeer => refusers.iter().map(|u| bed.node(*u).clone()).collect(),
    };
    for s in &refusing_services {
        if let Submitted::Refused(_) = s.submit(&probe).await? {
            c.refused_by_refusers += 1;
        }
    }
    if !ids.is_empty() {
        c.confirmed = wait_confirmed(&owner, &ids, Duration::from_secs(60)).await?;
        if c.confirmed == ids.len() && arch == Arch::PeerToPeer {
            c.confirmed_secs = Some(started.elapsed().as_secs_f64());
        }
    }
    Ok(c)
}

fn outputs(r: &SybilReport) -> Result<Outputs> {
    use std::fmt::Write;
    let e = &r.eclipse;
    let pct = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
    let mut md = String::new();
    writeln!(
        md,
        "# Sybil: an eclipse flood, and one account censored ({} runner)\n",
        r.runner
    )?;
    writeln!(
        md,
        "Eclipse flood: {} addresses from one /16 against a node that knows {} honest peers.\n",
        e.flood, e.honest
    )?;
    writeln!(md, "| what | the attacker's share |\n|---|---|")?;
    writeln!(
        md,
        "| addresses the victim heard | {:.1} % |",
        e.heard_share * 100.0
    )?;
    writeln!(
        md,
        "| new table | {} of {} ({:.1} %; the bound is one bucket, {}) |",
        e.new_attacker,
        e.new_total,
        pct(e.new_attacker, e.new_total),
        e.new_bound
    )?;
    writeln!(
        md,
        "| tried table | {} of {} ({:.1} %) |",
        e.tried_attacker,
        e.tried_total,
        pct(e.tried_attacker, e.tried_total)
    )?;
    writeln!(
        md,
        "| whole address book | {} of {} ({:.1} %) |",
        e.new_attacker + e.tried_attacker,
        e.new_total + e.tried_total,
        pct(
            e.new_attacker + e.tried_attacker,
            e.new_total + e.tried_total
        )
    )?;
    for (k, (a, n)) in e.outbound.iter().enumerate() {
        writeln!(
            md,
            "| outbound slots after restart {} | {a} of {n} ({:.1} %) |",
            k + 1,
            pct(*a, *n)
        )?;
    }
    writeln!(
        md,
        "\nCensorship: one account's transfers, refused by the operator's policy.\n"
    )?;
    writeln!(
        md,
        "| architecture | who refuses | accepted through the owner's service | confirmed | refused by each refuser | control account accepted |\n|---|---|---|---|---|---|"
    )?;
    for c in [&r.client_server, &r.peer_to_peer] {
        writeln!(
            md,
            "| {} | {} | {} of {} | {}{} | {} of {} | {} of {} |",
            c.arch,
            c.refusers,
            c.accepted,
            c.submitted,
            c.confirmed,
            c.confirmed_secs
                .map_or(String::new(), |s| format!(" (all within {s:.1} s)")),
            c.refused_by_refusers,
            c.refuser_count,
            c.control_accepted,
            c.submitted
        )?;
    }
    let svg = crate::svg::bar_chart(
        "The attacker's share: heard vs held",
        "%",
        &[
            "addresses heard".into(),
            "new table".into(),
            "tried table".into(),
            "outbound slots (worst)".into(),
        ],
        &[(
            "attacker".into(),
            vec![
                e.heard_share * 100.0,
                pct(e.new_attacker, e.new_total),
                pct(e.tried_attacker, e.tried_total),
                pct(
                    e.max_outbound_attacker(),
                    e.outbound.first().map_or(8, |(_, n)| *n),
                ),
            ],
        )],
    );
    writeln!(md, "\n![shares](sybil.svg)")?;
    Ok(Outputs {
        json: serde_json::to_value(r)?,
        markdown: md,
        svgs: vec![("sybil.svg".into(), svg)],
    })
}
