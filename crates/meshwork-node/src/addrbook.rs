//! The address book: every peer this node knows how to reach, kept so that a flood of fake
//! peers cannot take it over. A sans-IO state machine in the style of Bitcoin Core's addrman:
//! it takes facts ("peer P told us about Q", "we connected to Q", "dialing Q failed") with the
//! current time, and answers questions ("whom should we dial next?"). It does no I/O; the node
//! persists it through [`crate::store`].
//!
//! # Tables and buckets
//! - The **new** table holds peers we heard about but have not connected to. A peer's bucket is
//!   chosen by hashing, with a per-node secret key, the address group of the peer *and* the
//!   address group of whoever told us (its *source*): one source group can reach at most
//!   `new_buckets_per_source_group` buckets, and one (address group, source group) pair exactly
//!   one bucket. So a single attacker, however many addresses it invents inside one /16, fills
//!   at most one bucket of `bucket_size` slots.
//! - The **tried** table holds peers we connected to ourselves. A peer's bucket is chosen by its
//!   own address group: one group reaches at most `tried_buckets_per_group` buckets.
//! - The slot inside a bucket is a keyed hash of the peer id. Because the key is secret and
//!   random per node, an attacker cannot compute which bucket or slot its addresses land in.
//!
//! # Replacement
//! - A newcomer whose new-table slot is taken replaces the incumbent only if the incumbent is
//!   *terrible* (too old, failed too often); otherwise the newcomer is dropped. Floods thus
//!   cannot evict good entries.
//! - A peer promoted to tried whose tried slot is taken does not evict the incumbent at once
//!   (*test-before-evict*): the pair is queued as a collision, the node tests the incumbent with
//!   a feeler connection, and [`AddrBook::resolve_collisions`] evicts it only if it failed to
//!   answer (or the test could not be made within [`COLLISION_TIMEOUT_S`]).
//!
//! # Selection
//! [`AddrBook::select`] picks the table (tried or new, half and half), then a uniformly random
//! *non-empty bucket*, then a random entry in it, accepted with a probability that falls with
//! recent failures. Choosing buckets, not entries, uniformly is what bounds an attacker's share
//! of our dials by its share of *buckets*, not of addresses.
//!
//! # Invariants (checked by [`AddrBook::check_invariants`] in tests)
//! 1. Every entry sits in exactly one slot of exactly one table, and that slot names it.
//! 2. Every occupied slot names an entry whose recorded location is that slot.
//! 3. All addresses of an entry are in the entry's address group; there are 1 to
//!    [`MAX_ADDRS`] of them.
//! 4. Sizes are bounded: `new <= new_buckets * bucket_size`, `tried <= tried_buckets *
//!    bucket_size`, collisions `<= MAX_COLLISIONS`, bans `<= MAX_BANS`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;

use libp2p::{Multiaddr, PeerId};
use meshwork_proto::addr::{ip_of, without_peer};
use meshwork_proto::pex::PeerRecord;
use meshwork_proto::AddrGroup;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::bans::{BanList, MAX_BANS};

/// The most addresses kept per peer.
pub const MAX_ADDRS: usize = 4;
/// The most pending tried-table collisions.
pub const MAX_COLLISIONS: usize = 64;
/// A collision whose incumbent could not be tested within this time evicts the incumbent.
pub const COLLISION_TIMEOUT_S: u64 = 40 * 60;

/// Entries not heard of for this long are terrible.
const HORIZON_S: u64 = 30 * 24 * 3600;
/// Never-connected entries that failed this often are terrible.
const RETRIES: u32 = 3;
/// Entries that failed this often in a row, and have not succeeded for `MIN_FAIL_S`, are terrible.
const MAX_FAILURES: u32 = 10;
const MIN_FAIL_S: u64 = 7 * 24 * 3600;

/// Sizes of the tables. The defaults are Bitcoin Core's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrBookConfig {
    pub new_buckets: u32,
    pub tried_buckets: u32,
    pub bucket_size: u32,
    pub new_buckets_per_source_group: u32,
    pub tried_buckets_per_group: u32,
}

impl Default for AddrBookConfig {
    fn default() -> Self {
        Self {
            new_buckets: 1024,
            tried_buckets: 256,
            bucket_size: 64,
            new_buckets_per_source_group: 64,
            tried_buckets_per_group: 8,
        }
    }
}

/// Who told us about an address; this is what the new table buckets by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Origin {
    /// A peer, connected from an address in this group.
    Peer(AddrGroup),
    /// The Kademlia DHT (answers of several peers merged by the query; the teller is unknown).
    /// All DHT-learned entries share this one source and so at most
    /// `new_buckets_per_source_group` buckets.
    Dht,
    /// The operator: bootstrap addresses from the command line or the config file.
    Operator,
}

impl Origin {
    fn to_bytes(self) -> [u8; 6] {
        match self {
            Origin::Peer(g) => {
                let b = g.to_bytes();
                [1, b[0], b[1], b[2], b[3], b[4]]
            }
            Origin::Dht => [2, 0, 0, 0, 0, 0],
            Origin::Operator => [3, 0, 0, 0, 0, 0],
        }
    }
}

/// How we first learned of a peer; reported to people (the demo, `meshwork peers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Bootstrap,
    Pex,
    Dht,
    /// The peer connected to us and told us its listen addresses (identify).
    Inbound,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad` so that width and alignment flags work in tables.
        f.pad(match self {
            Via::Bootstrap => "bootstrap",
            Via::Pex => "pex",
            Via::Dht => "dht",
            Via::Inbound => "inbound",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Table {
    New,
    Tried,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub table: Table,
    pub bucket: u32,
    pub slot: u32,
}

/// What we know about one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub peer: PeerId,
    /// 1 to `MAX_ADDRS` addresses, all in `group`, without `/p2p` suffix.
    pub addrs: Vec<Multiaddr>,
    pub group: AddrGroup,
    pub origin: Origin,
    pub via: Via,
    /// Unix seconds: when the peer was last known to be up (as told, or observed).
    pub last_seen: u64,
    pub last_try: Option<u64>,
    pub last_success: Option<u64>,
    /// Failed attempts since the last success.
    pub failures: u32,
    pub location: Location,
}

impl Entry {
    /// A terrible entry may be replaced by any newcomer (Bitcoin Core's `IsTerrible`).
    pub fn is_terrible(&self, now: u64) -> bool {
        if self.last_try.is_some_and(|t| now.saturating_sub(t) < 60) {
            return false; // tried in the last minute: give it a chance to answer
        }
        if self.last_seen > now + 10 * 60 {
            return true; // claims to be from the future
        }
        if now.saturating_sub(self.last_seen) > HORIZON_S {
            return true;
        }
        if self.last_success.is_none() && self.failures >= RETRIES {
            return true;
        }
        self.failures >= MAX_FAILURES
            && self
                .last_success
                .is_none_or(|s| now.saturating_sub(s) > MIN_FAIL_S)
    }

    /// Relative chance of being selected (Bitcoin Core's `GetChance`).
    fn chance(&self, now: u64) -> f64 {
        let mut c = 1.0;
        if self
            .last_try
            .is_some_and(|t| now.saturating_sub(t) < 10 * 60)
        {
            c *= 0.01; // tried recently: deprioritize
        }
        c * 0.66f64.powi(self.failures.min(8) as i32)
    }

    pub fn record(&self) -> PeerRecord {
        PeerRecord {
            peer: self.peer,
            addrs: self.addrs.clone(),
            last_seen: self.last_seen,
        }
    }
}

/// What [`AddrBook::add`] did with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddOutcome {
    Added,
    /// Already known: `last_seen` and addresses were refreshed.
    Updated,
    /// Its slot is taken by a good entry (or it is ourselves, banned, or has no usable address).
    Dropped,
}

/// What [`AddrBook::good`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoodOutcome {
    /// The peer is now (or was already) in the tried table.
    Tried,
    /// Its tried slot is held by this incumbent; it stays in new until the incumbent is tested.
    Collision(PeerId),
    /// The peer is not in the book (add it first).
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Collision {
    newcomer: PeerId,
    incumbent: PeerId,
    since: u64,
}

/// A sparse table: only occupied buckets are allocated.
#[derive(Clone, Debug, Default)]
struct Buckets {
    buckets: BTreeMap<u32, Vec<Option<PeerId>>>,
    len: usize,
}

impl Buckets {
    fn get(&self, bucket: u32, slot: u32) -> Option<PeerId> {
        self.buckets.get(&bucket).and_then(|b| b[slot as usize])
    }

    fn set(&mut self, bucket: u32, slot: u32, peer: PeerId, bucket_size: u32) {
        let b = self
            .buckets
            .entry(bucket)
            .or_insert_with(|| vec![None; bucket_size as usize]);
        debug_assert!(
            b[slot as usize].is_none(),
            "slot must be free before it is set"
        );
        b[slot as usize] = Some(peer);
        self.len += 1;
    }

    fn clear(&mut self, bucket: u32, slot: u32) {
        if let Some(b) = self.buckets.get_mut(&bucket) {
            if b[slot as usize].take().is_some() {
                self.len -= 1;
            }
            if b.iter().all(Option::is_none) {
                self.buckets.remove(&bucket);
            }
        }
    }

    /// A uniformly random non-empty bucket, then a uniformly random occupied slot in it.
    fn random_entry(&self, rng: &mut impl Rng) -> Option<PeerId> {
        if self.buckets.is_empty() {
            return None;
        }
        let i = rng.gen_range(0..self.buckets.len());
        let bucket = self.buckets.values().nth(i)?;
        let occupied: Vec<PeerId> = bucket.iter().flatten().copied().collect();
        if occupied.is_empty() {
            return None; // cannot happen: empty buckets are removed (kept as a guard)
        }
        occupied.get(rng.gen_range(0..occupied.len())).copied()
    }
}

/// The address book. See the module documentation for the algorithm and invariants.
pub struct AddrBook {
    cfg: AddrBookConfig,
    key: [u8; 32],
    local: PeerId,
    allow_private: bool,
    entries: HashMap<PeerId, Entry>,
    new: Buckets,
    tried: Buckets,
    collisions: VecDeque<Collision>,
    /// Banned peers and IPs, with the Unix second the ban ends.
    bans: BanList,
}

/// A serializable image of the book, for the store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub key: [u8; 32],
    pub entries: Vec<Entry>,
    pub banned_peers: Vec<(PeerId, u64)>,
    pub banned_ips: Vec<(IpAddr, u64)>,
}

impl AddrBook {
    /// An empty book. `key` must be secret and random per node (see the module docs).
    pub fn new(cfg: AddrBookConfig, key: [u8; 32], local: PeerId, allow_private: bool) -> Self {
        Self {
            cfg,
            key,
            local,
            allow_private,
            entries: HashMap::new(),
            new: Buckets::default(),
            tried: Buckets::default(),
            collisions: VecDeque::new(),
            bans: BanList::default(),
        }
    }

    /// Rebuilds a book from a snapshot. Entries are placed again by the same keyed hashes, so
    /// they land where they were; an entry whose slot is taken (only possible if the
    /// configuration changed) is dropped. Expired bans are not restored.
    pub fn restore(
        cfg: AddrBookConfig,
        snap: Snapshot,
        local: PeerId,
        allow_private: bool,
        now: u64,
    ) -> Self {
        let mut book = Self::new(cfg, snap.key, local, allow_private);
        // Tried entries first, so that they keep their place.
        let (tried, new): (Vec<_>, Vec<_>) = snap
            .entries
            .into_iter()
            .partition(|e| e.location.table == Table::Tried);
        for mut e in tried.into_iter().chain(new) {
            if e.peer == local || e.addrs.is_empty() || e.addrs.len() > MAX_ADDRS {
                continue;
            }
            if e.addrs
                .iter()
                .any(|a| AddrGroup::of_addr(a) != Some(e.group))
            {
                continue;
            }
            let loc = match e.location.table {
                Table::Tried => book.tried_location(&e.peer, e.group),
                Table::New => book.new_location(&e.peer, e.group, e.origin),
            };
            let free = book.table(loc.table).get(loc.bucket, loc.slot).is_none();
            if free && !book.entries.contains_key(&e.peer) {
                e.location = loc;
                book.place(e);
            }
        }
        book.bans = BanList::from_entries(snap.banned_peers, snap.banned_ips, now);
        book
    }

    pub fn snapshot(&self) -> Snapshot {
        let (banned_peers, banned_ips) = self.bans.entries();
        Snapshot {
            key: self.key,
            entries: self.entries.values().cloned().collect(),
            banned_peers,
            banned_ips,
        }
    }

    pub fn new_len(&self) -> usize {
        self.new.len
    }

    pub fn tried_len(&self) -> usize {
        self.tried.len
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, peer: &PeerId) -> Option<&Entry> {
        self.entries.get(peer)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    fn hash(&self, parts: &[&[u8]]) -> u64 {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        for p in parts {
            h.update(&(p.len() as u32).to_le_bytes());
            h.update(p);
        }
        let out = h.finalize();
        u64::from_le_bytes(out.as_bytes()[..8].try_into().expect("8 bytes"))
    }

    fn new_location(&self, peer: &PeerId, group: AddrGroup, origin: Origin) -> Location {
        let g = group.to_bytes();
        let src = origin.to_bytes();
        let h1 = self.hash(&[b"new1", &g, &src]) % u64::from(self.cfg.new_buckets_per_source_group);
        let bucket = (self.hash(&[b"new2", &src, &h1.to_le_bytes()])
            % u64::from(self.cfg.new_buckets)) as u32;
        let slot = (self.hash(&[b"newslot", &bucket.to_le_bytes(), &peer.to_bytes()])
            % u64::from(self.cfg.bucket_size)) as u32;
        Location {
            table: Table::New,
            bucket,
            slot,
        }
    }

    fn tried_location(&self, peer: &PeerId, group: AddrGroup) -> Location {
        let g = group.to_bytes();
        let h1 =
            self.hash(&[b"tried1", &peer.to_bytes()]) % u64::from(self.cfg.tried_buckets_per_group);
        let bucket = (self.hash(&[b"tried2", &g, &h1.to_le_bytes()])
            % u64::from(self.cfg.tried_buckets)) as u32;
        let slot = (self.hash(&[b"triedslot", &bucket.to_le_bytes(), &peer.to_bytes()])
            % u64::from(self.cfg.bucket_size)) as u32;
        Location {
            table: Table::Tried,
            bucket,
            slot,
        }
    }

    fn table(&self, t: Table) -> &Buckets {
        match t {
            Table::New => &self.new,
            Table::Tried => &self.tried,
        }
    }

    /// Puts an entry into its recorded (free) slot.
    fn place(&mut self, e: Entry) {
        let (loc, size) = (e.location, self.cfg.bucket_size);
        match loc.table {
            Table::New => self.new.set(loc.bucket, loc.slot, e.peer, size),
            Table::Tried => self.tried.set(loc.bucket, loc.slot, e.peer, size),
        }
        self.entries.insert(e.peer, e);
    }

    /// Takes an entry out of its slot and out of the book.
    fn unplace(&mut self, peer: &PeerId) -> Option<Entry> {
        let e = self.entries.remove(peer)?;
        let loc = e.location;
        match loc.table {
            Table::New => self.new.clear(loc.bucket, loc.slot),
            Table::Tried => self.tried.clear(loc.bucket, loc.slot),
        }
        Some(e)
    }

    /// Keeps only addresses usable for `peer`: dialable, at most `MAX_ADDRS`, all in the group of
    /// the first. Returns them with their group. Private addresses pass if `allow_private`.
    fn usable(
        &self,
        peer: &PeerId,
        addrs: &[Multiaddr],
        now: u64,
        allow_private: bool,
    ) -> Option<(Vec<Multiaddr>, AddrGroup)> {
        let mut out: Vec<Multiaddr> = Vec::new();
        let mut group = None;
        for a in addrs {
            let Ok(a) = meshwork_proto::addr::check_dialable(a, Some(peer), allow_private) else {
                continue;
            };
            let Some(g) = AddrGroup::of_addr(&a) else {
                continue;
            };
            if ip_of(&a).is_some_and(|ip| self.is_banned_ip(&ip, now)) {
                continue;
            }
            match group {
                None => group = Some(g),
                Some(g0) if g0 != g => continue,
                _ => {}
            }
            if !out.contains(&a) && out.len() < MAX_ADDRS {
                out.push(a);
            }
        }
        Some((out, group?))
    }

    /// Learns of `peer` at `addrs` from `origin`. Addresses outside the group of the first usable
    /// one are ignored (a peer is reachable through the group it was first heard of in).
    pub fn add(
        &mut self,
        peer: PeerId,
        addrs: &[Multiaddr],
        last_seen: u64,
        origin: Origin,
        via: Via,
        now: u64,
    ) -> AddOutcome {
        if peer == self.local || self.is_banned(&peer, now) {
            return AddOutcome::Dropped;
        }
        // Claims from the future are clamped: they would otherwise never grow old.
        let last_seen = last_seen.min(now);
        // The operator's own addresses (bootstrap) are trusted whatever their range: a bootstrap
        // peer on a LAN must be kept, and so retried, even where peers' private addresses are not.
        let source = if origin == Origin::Operator {
            meshwork_proto::addr::AddrSource::Operator
        } else {
            meshwork_proto::addr::AddrSource::Network
        };
        let allow_private = source.allows_private(self.allow_private);
        if let Some(e) = self.entries.get_mut(&peer) {
            e.last_seen = e.last_seen.max(last_seen);
            let group = e.group;
            for a in addrs {
                let a = without_peer(a);
                if e.addrs.len() < MAX_ADDRS
                    && !e.addrs.contains(&a)
                    && AddrGroup::of_addr(&a) == Some(group)
                    && meshwork_proto::addr::check_dialable(&a, None, allow_private).is_ok()
                {
                    e.addrs.push(a);
                }
            }
            return AddOutcome::Updated;
        }
        let Some((addrs, group)) = self.usable(&peer, addrs, now, allow_private) else {
            return AddOutcome::Dropped;
        };
        let location = self.new_location(&peer, group, origin);
        if let Some(incumbent) = self.new.get(location.bucket, location.slot) {
            let terrible = self
                .entries
                .get(&incumbent)
                .is_some_and(|e| e.is_terrible(now));
            if !terrible {
                return AddOutcome::Dropped;
            }
            self.unplace(&incumbent);
        }
        self.place(Entry {
            peer,
            addrs,
            group,
            origin,
            via,
            last_seen,
            last_try: None,
            last_success: None,
            failures: 0,
            location,
        });
        AddOutcome::Added
    }

    /// Adds validated PEX records told by a peer connected from `source`.
    pub fn add_records(&mut self, records: &[PeerRecord], source: AddrGroup, now: u64) -> usize {
        records
            .iter()
            .filter(|r| {
                self.add(
                    r.peer,
                    &r.addrs,
                    r.last_seen,
                    Origin::Peer(source),
                    Via::Pex,
                    now,
                ) == AddOutcome::Added
            })
            .count()
    }

    /// A dial to `peer` is being made.
    pub fn attempt(&mut self, peer: &PeerId, now: u64) {
        if let Some(e) = self.entries.get_mut(peer) {
            e.last_try = Some(now);
        }
    }

    /// A dial to `peer` failed.
    pub fn failed(&mut self, peer: &PeerId, now: u64) {
        if let Some(e) = self.entries.get_mut(peer) {
            e.last_try = Some(now);
            e.failures = e.failures.saturating_add(1);
        }
    }

    /// We connected to `peer` (already in the book) ourselves, at `addr`: it moves to the tried table,
    /// unless its tried slot is taken, in which case a collision is queued for
    /// test-before-evict.
    pub fn good(&mut self, peer: &PeerId, addr: &Multiaddr, now: u64) -> GoodOutcome {
        let Some(e) = self.entries.get_mut(peer) else {
            return GoodOutcome::Unknown; // the caller adds a peer before calling this
        };
        e.last_seen = now;
        e.last_try = Some(now);
        e.last_success = Some(now);
        e.failures = 0;
        let a = without_peer(addr);
        if AddrGroup::of_addr(&a) == Some(e.group) && !e.addrs.contains(&a) {
            // The address that worked goes first.
            e.addrs.insert(0, a);
            e.addrs.truncate(MAX_ADDRS);
        }
        if e.location.table == Table::Tried {
            return GoodOutcome::Tried;
        }
        let group = e.group;
        let loc = self.tried_location(peer, group);
        if let Some(incumbent) = self.tried.get(loc.bucket, loc.slot) {
            if !self.collisions.iter().any(|c| c.newcomer == *peer) {
                if self.collisions.len() >= MAX_COLLISIONS {
                    self.collisions.pop_front();
                }
                self.collisions.push_back(Collision {
                    newcomer: *peer,
                    incumbent,
                    since: now,
                });
            }
            return GoodOutcome::Collision(incumbent);
        }
        let mut e = self.unplace(peer).expect("present");
        e.location = loc;
        self.place(e);
        GoodOutcome::Tried
    }

    /// The incumbent of the oldest pending collision: the node should test it with a feeler.
    pub fn collision_to_test(&self, now: u64) -> Option<PeerId> {
        self.collisions
            .iter()
            .find(|c| {
                // Not if it was already tried after the collision arose.
                self.entries
                    .get(&c.incumbent)
                    .is_some_and(|e| e.last_try.is_none_or(|t| t < c.since))
                    && now >= c.since
            })
            .map(|c| c.incumbent)
    }

    /// Applies test-before-evict to pending collisions: an incumbent that answered after the
    /// collision stays; one that failed, or could not be tested for `COLLISION_TIMEOUT_S`, is
    /// moved back to the new table and the newcomer takes its tried slot.
    pub fn resolve_collisions(&mut self, now: u64) {
        let pending: Vec<Collision> = self.collisions.drain(..).collect();
        for c in pending {
            let (Some(newcomer), Some(incumbent)) = (
                self.entries.get(&c.newcomer),
                self.entries.get(&c.incumbent),
            ) else {
                continue; // one of them is gone: nothing to resolve
            };
            if newcomer.location.table == Table::Tried || incumbent.location.table != Table::Tried {
                continue;
            }
            let answered = incumbent.last_success.is_some_and(|s| s >= c.since);
            let failed = incumbent.last_try.is_some_and(|t| t >= c.since) && incumbent.failures > 0;
            let timed_out = now.saturating_sub(c.since) >= COLLISION_TIMEOUT_S;
            if answered {
                continue; // incumbent stays; the newcomer remains in the new table
            }
            if failed || timed_out {
                let loc = incumbent.location;
                let (newcomer_peer, newcomer_group) = (newcomer.peer, newcomer.group);
                if self.tried_location(&newcomer_peer, newcomer_group) != loc {
                    continue;
                }
                // Demote the incumbent into its new-table slot (or drop it if that is taken).
                let mut old = self.unplace(&c.incumbent).expect("present");
                let new_loc = self.new_location(&old.peer, old.group, old.origin);
                if self.new.get(new_loc.bucket, new_loc.slot).is_none() {
                    old.location = new_loc;
                    self.place(old);
                }
                let mut e = self.unplace(&newcomer_peer).expect("present");
                e.location = loc;
                self.place(e);
            } else {
                self.collisions.push_back(c); // still waiting for the test
            }
        }
    }

    /// Chooses a peer to dial (see the module docs). `new_only` selects from the new table only
    /// (feelers). Returns `None` only if the chosen table is empty.
    pub fn select(&self, rng: &mut impl Rng, now: u64, new_only: bool) -> Option<&Entry> {
        let use_tried = !new_only && self.tried.len > 0 && (self.new.len == 0 || rng.gen_bool(0.5));
        let table = if use_tried { &self.tried } else { &self.new };
        if table.len == 0 {
            return None;
        }
        let mut factor = 1.0f64;
        // Each rejection raises the acceptance odds, so this ends quickly; the bound is a guard.
        for _ in 0..10_000 {
            let peer = table.random_entry(rng)?;
            let e = self.entries.get(&peer)?;
            if rng.gen::<f64>() < factor * e.chance(now) {
                return Some(e);
            }
            factor *= 1.2;
        }
        None
    }

    /// Up to `n` random non-terrible entries of the tried table, for a PEX answer.
    pub fn tried_sample(
        &self,
        rng: &mut impl Rng,
        n: usize,
        now: u64,
        exclude: &PeerId,
    ) -> Vec<PeerRecord> {
        let candidates: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| {
                e.location.table == Table::Tried && !e.is_terrible(now) && e.peer != *exclude
            })
            .collect();
        rand::seq::index::sample(rng, candidates.len(), n.min(candidates.len()))
            .into_iter()
            .map(|i| candidates[i].record())
            .collect()
    }

    /// Forgets a peer.
    pub fn remove(&mut self, peer: &PeerId) -> Option<Entry> {
        self.unplace(peer)
    }

    /// Bans a peer (and optionally its IP) until `until`, removing it from the tables.
    pub fn ban(&mut self, peer: PeerId, ip: Option<IpAddr>, until: u64) {
        self.unplace(&peer);
        self.bans.ban(Some(peer), ip, until);
    }

    pub fn is_banned(&self, peer: &PeerId, now: u64) -> bool {
        self.bans.is_banned_peer(peer, now)
    }

    pub fn is_banned_ip(&self, ip: &IpAddr, now: u64) -> bool {
        self.bans.is_banned_ip(ip, now)
    }

    pub fn banned_count(&self) -> usize {
        self.bans.len()
    }

    /// The bans, which the node mirrors into its connection gate.
    pub fn bans(&self) -> &BanList {
        &self.bans
    }

    /// Drops the bans that have ended.
    pub fn expire_bans(&mut self, now: u64) {
        self.bans.expire(now);
    }

    /// Checks the invariants stated in the module docs. For tests; O(size).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut counted = 0;
        for (table, buckets, nb) in [
            (Table::New, &self.new, self.cfg.new_buckets),
            (Table::Tried, &self.tried, self.cfg.tried_buckets),
        ] {
            let mut n = 0;
            for (b, slots) in &buckets.buckets {
                if *b >= nb || slots.len() != self.cfg.bucket_size as usize {
                    return Err(format!("bucket {b} out of range or of wrong size"));
                }
                for (s, p) in slots.iter().enumerate() {
                    if let Some(p) = p {
                        n += 1;
                        let e = self
                            .entries
                            .get(p)
                            .ok_or(format!("slot names unknown peer {p}"))?;
                        if e.location
                            != (Location {
                                table,
                                bucket: *b,
                                slot: s as u32,
                            })
                        {
                            return Err(format!(
                                "entry {p} records {:?}, found at {table:?}/{b}/{s}",
                                e.location
                            ));
                        }
                    }
                }
            }
            if n != buckets.len {
                return Err(format!("{table:?} len {} but {n} occupied", buckets.len));
            }
            counted += n;
        }
        if counted != self.entries.len() {
            return Err(format!(
                "{} entries but {counted} slots",
                self.entries.len()
            ));
        }
        for e in self.entries.values() {
            if e.addrs.is_empty() || e.addrs.len() > MAX_ADDRS {
                return Err(format!("entry {} has {} addresses", e.peer, e.addrs.len()));
            }
            if e.addrs
                .iter()
                .any(|a| AddrGroup::of_addr(a) != Some(e.group))
            {
                return Err(format!("entry {} has an address outside its group", e.peer));
            }
        }
        if self.collisions.len() > MAX_COLLISIONS || self.banned_count() > MAX_BANS {
            return Err("collisions or bans over their bound".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const NOW: u64 = 1_800_000_000;

    fn addr(a: u8, b: u8, c: u8, d: u8) -> Multiaddr {
        format!("/ip4/{a}.{b}.{c}.{d}/tcp/4001").parse().unwrap()
    }

    fn book(allow_private: bool) -> AddrBook {
        AddrBook::new(
            AddrBookConfig::default(),
            [7; 32],
            PeerId::random(),
            allow_private,
        )
    }

    /// An entry last seen at `NOW`, never tried.
    fn entry() -> Entry {
        Entry {
            peer: PeerId::random(),
            addrs: vec![addr(6, 6, 0, 1)],
            group: AddrGroup::V4([6, 6]),
            origin: Origin::Dht,
            via: Via::Dht,
            last_seen: NOW,
            last_try: None,
            last_success: None,
            failures: 0,
            location: Location {
                table: Table::New,
                bucket: 0,
                slot: 0,
            },
        }
    }

    /// Bitcoin Core's `IsTerrible`, at each of its edges: tried within the last minute is never
    /// terrible; from more than 10 minutes in the future, unheard of for more than 30 days, 3
    /// failures without a success, or 10 failures and no success for more than 7 days are.
    #[test]
    fn terrible_entries_at_each_edge() {
        let day = 24 * 3600;
        let e = entry();
        assert!(!e.is_terrible(NOW));
        // From the future: 10 minutes ahead is fine, one second more is not.
        let ahead = |s: u64| Entry {
            last_seen: NOW + s,
            ..entry()
        };
        assert!(!ahead(600).is_terrible(NOW));
        assert!(ahead(601).is_terrible(NOW));
        // The 30-day horizon.
        let seen = |ago: u64| Entry {
            last_seen: NOW - ago,
            ..entry()
        };
        assert!(!seen(30 * day).is_terrible(NOW));
        assert!(seen(30 * day + 1).is_terrible(NOW));
        // A try in the last minute protects even a terrible entry; at 60 s it no longer does.
        let tried = |ago: u64| Entry {
            last_try: Some(NOW - ago),
            ..seen(30 * day + 1)
        };
        assert!(!tried(59).is_terrible(NOW));
        assert!(tried(60).is_terrible(NOW));
        // Never connected: 2 failures are fine, 3 are terrible.
        let failed = |n: u32| Entry {
            failures: n,
            ..entry()
        };
        assert!(!failed(2).is_terrible(NOW));
        assert!(failed(3).is_terrible(NOW));
        // Connected once: 10 failures in a row, and the success more than 7 days ago.
        let lapsed = |n: u32, ago: u64| Entry {
            failures: n,
            last_success: Some(NOW - ago),
            ..entry()
        };
        assert!(!lapsed(9, 8 * day).is_terrible(NOW));
        assert!(!lapsed(10, 7 * day).is_terrible(NOW));
        assert!(lapsed(10, 7 * day + 1).is_terrible(NOW));
        assert!(!lapsed(10, day).is_terrible(NOW));
    }

    /// Bitcoin Core's `GetChance`: 1 for a fresh entry, times 0.01 when tried in the last 10
    /// minutes, times 0.66 per failure up to 8.
    #[test]
    fn the_chance_of_an_entry_falls_with_a_recent_try_and_each_failure() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(entry().chance(NOW), 1.0));
        let tried = |ago: u64| Entry {
            last_try: Some(NOW - ago),
            ..entry()
        };
        assert!(close(tried(599).chance(NOW), 0.01));
        assert!(close(tried(600).chance(NOW), 1.0));
        let failed = |n: u32| Entry {
            failures: n,
            ..entry()
        };
        assert!(close(failed(1).chance(NOW), 0.66));
        assert!(close(failed(8).chance(NOW), 0.66f64.powi(8)));
        assert!(close(failed(20).chance(NOW), 0.66f64.powi(8)));
    }

    /// The new table's bucket depends on who told us (the source group), not only on the
    /// address's group: the same group heard from two sources goes to two buckets (each
    /// source at most one), so one source cannot fill every bucket a group may take.
    #[test]
    fn one_group_heard_from_two_sources_reaches_two_buckets() {
        let mut b = book(false);
        for (k, src) in [AddrGroup::V4([6, 6]), AddrGroup::V4([9, 9])]
            .into_iter()
            .enumerate()
        {
            for i in 0..200u32 {
                let a = addr(7, 7, k as u8 * 100 + (i >> 8) as u8, i as u8);
                b.add(
                    PeerId::random(),
                    &[a],
                    NOW,
                    Origin::Peer(src),
                    Via::Pex,
                    NOW,
                );
            }
        }
        assert_eq!(b.new.buckets.len(), 2);
        b.check_invariants().unwrap();
    }

    #[test]
    fn flood_from_one_group_fills_one_bucket() {
        let mut b = book(false);
        let src = AddrGroup::V4([6, 6]);
        let mut added = 0;
        for i in 0..5000u32 {
            let a = addr(6, 6, (i >> 8) as u8, i as u8);
            if b.add(
                PeerId::random(),
                &[a],
                NOW,
                Origin::Peer(src),
                Via::Pex,
                NOW,
            ) == AddOutcome::Added
            {
                added += 1;
            }
        }
        assert!(
            added <= 64,
            "one (group, source) pair must reach one bucket, got {added}"
        );
        assert_eq!(b.new.buckets.len(), 1);
        b.check_invariants().unwrap();
    }

    #[test]
    fn good_entries_are_not_evicted_by_newcomers() {
        let mut b = book(false);
        let src = AddrGroup::V4([6, 6]);
        let first: Vec<PeerId> = (0..64)
            .map(|i| {
                let p = PeerId::random();
                b.add(
                    p,
                    &[addr(6, 6, 0, i)],
                    NOW,
                    Origin::Peer(src),
                    Via::Pex,
                    NOW,
                );
                p
            })
            .collect();
        let kept_before = first.iter().filter(|p| b.get(p).is_some()).count();
        for i in 0..1000u32 {
            b.add(
                PeerId::random(),
                &[addr(6, 6, 1 + (i >> 8) as u8, i as u8)],
                NOW,
                Origin::Peer(src),
                Via::Pex,
                NOW,
            );
        }
        let kept_after = first.iter().filter(|p| b.get(p).is_some()).count();
        assert_eq!(
            kept_before, kept_after,
            "fresh entries must survive a flood"
        );
        // Terrible entries do get replaced: age every entry beyond the horizon.
        let later = NOW + HORIZON_S + 10;
        for i in 0..1000u32 {
            b.add(
                PeerId::random(),
                &[addr(6, 6, 9, i as u8)],
                later,
                Origin::Peer(src),
                Via::Pex,
                later,
            );
        }
        let kept_old = first.iter().filter(|p| b.get(p).is_some()).count();
        assert!(kept_old < kept_after, "terrible entries should give way");
        b.check_invariants().unwrap();
    }

    #[test]
    fn good_moves_to_tried_and_collisions_test_before_evict() {
        let cfg = AddrBookConfig {
            tried_buckets: 1,
            bucket_size: 1,
            tried_buckets_per_group: 1,
            ..Default::default()
        };
        let mut b = AddrBook::new(cfg, [1; 32], PeerId::random(), false);
        let (p1, p2) = (PeerId::random(), PeerId::random());
        let (a1, a2) = (addr(1, 1, 1, 1), addr(2, 2, 2, 2));
        b.add(
            p1,
            std::slice::from_ref(&a1),
            NOW,
            Origin::Operator,
            Via::Bootstrap,
            NOW,
        );
        b.add(
            p2,
            std::slice::from_ref(&a2),
            NOW,
            Origin::Operator,
            Via::Bootstrap,
            NOW,
        );
        assert_eq!(b.good(&p1, &a1, NOW), GoodOutcome::Tried);
        // One tried slot only: p2 collides with p1, and p1 is not evicted yet.
        assert_eq!(b.good(&p2, &a2, NOW + 1), GoodOutcome::Collision(p1));
        assert_eq!(b.get(&p2).unwrap().location.table, Table::New);
        assert_eq!(b.collision_to_test(NOW + 1), Some(p1));
        // p1 answers the feeler: it stays.
        b.good(&p1, &a1, NOW + 2);
        b.resolve_collisions(NOW + 2);
        assert_eq!(b.get(&p1).unwrap().location.table, Table::Tried);
        assert_eq!(b.get(&p2).unwrap().location.table, Table::New);
        // Later p2 collides again and p1 fails its test: p2 takes the slot, p1 goes back to new.
        assert_eq!(b.good(&p2, &a2, NOW + 100), GoodOutcome::Collision(p1));
        b.failed(&p1, NOW + 101);
        b.resolve_collisions(NOW + 101);
        assert_eq!(b.get(&p2).unwrap().location.table, Table::Tried);
        assert_eq!(b.get(&p1).map(|e| e.location.table), Some(Table::New));
        b.check_invariants().unwrap();
    }

    #[test]
    fn bans_remove_and_refuse() {
        let mut b = book(false);
        let p = PeerId::random();
        let at = addr(1, 2, 3, 4);
        let add = |b: &mut AddrBook, p: PeerId, now: u64| {
            b.add(
                p,
                std::slice::from_ref(&at),
                now,
                Origin::Operator,
                Via::Bootstrap,
                now,
            )
        };
        add(&mut b, p, NOW);
        b.ban(p, Some("1.2.3.4".parse().unwrap()), NOW + 60);
        assert!(b.get(&p).is_none());
        assert_eq!(add(&mut b, p, NOW), AddOutcome::Dropped);
        // Another peer at the banned IP is refused too.
        assert_eq!(add(&mut b, PeerId::random(), NOW), AddOutcome::Dropped);
        // Bans end by the clock, and expired ones are dropped.
        assert_eq!(add(&mut b, p, NOW + 61), AddOutcome::Added);
        b.expire_bans(NOW + 61);
        assert_eq!(b.banned_count(), 0);
    }

    #[test]
    fn private_addresses_need_permission_and_groups_are_kept_apart() {
        let mut b = book(false);
        // A private address heard from a peer is refused.
        assert_eq!(
            b.add(
                PeerId::random(),
                &[addr(10, 0, 0, 1)],
                NOW,
                Origin::Peer(AddrGroup::V4([1, 1])),
                Via::Pex,
                NOW
            ),
            AddOutcome::Dropped
        );
        let p = PeerId::random();
        b.add(
            p,
            &[addr(1, 2, 3, 4), addr(5, 6, 7, 8), addr(1, 2, 9, 9)],
            NOW,
            Origin::Operator,
            Via::Bootstrap,
            NOW,
        );
        assert_eq!(
            b.get(&p).unwrap().addrs,
            vec![addr(1, 2, 3, 4), addr(1, 2, 9, 9)]
        );
        // Bootstrap addresses from the operator are kept whatever their range.
        assert_eq!(
            b.add(
                PeerId::random(),
                &[addr(192, 168, 1, 9)],
                NOW,
                Origin::Operator,
                Via::Bootstrap,
                NOW
            ),
            AddOutcome::Added
        );
        let mut lb = book(true);
        assert_eq!(
            lb.add(
                PeerId::random(),
                &[addr(127, 0, 0, 1)],
                NOW,
                Origin::Operator,
                Via::Bootstrap,
                NOW
            ),
            AddOutcome::Added
        );
    }

    #[test]
    fn snapshot_restores_the_same_book() {
        let mut b = book(false);
        let mut rng = StdRng::seed_from_u64(1);
        for i in 0..300u32 {
            let p = PeerId::random();
            let a = addr(1 + (i % 50) as u8, (i / 50) as u8, 0, 1);
            b.add(
                p,
                std::slice::from_ref(&a),
                NOW,
                Origin::Peer(AddrGroup::V4([9, (i % 7) as u8])),
                Via::Pex,
                NOW,
            );
            if rng.gen_bool(0.3) {
                b.good(&p, &a, NOW);
            }
        }
        b.ban(PeerId::random(), None, NOW + 100);
        let snap = b.snapshot();
        let r = AddrBook::restore(AddrBookConfig::default(), snap, b.local, false, NOW);
        assert_eq!(r.new_len(), b.new_len());
        assert_eq!(r.tried_len(), b.tried_len());
        for e in b.entries() {
            assert_eq!(r.get(&e.peer), Some(e));
        }
        assert_eq!(r.banned_count(), 1);
        r.check_invariants().unwrap();
    }

    #[test]
    fn selection_is_by_bucket_not_by_count() {
        // 40 honest peers, each in its own group and bucket; 64 attackers in one bucket.
        let mut b = book(false);
        for i in 0..40u8 {
            b.add(
                PeerId::random(),
                &[addr(20 + i, 1, 1, 1)],
                NOW,
                Origin::Operator,
                Via::Bootstrap,
                NOW,
            );
        }
        let evil = AddrGroup::V4([66, 6]);
        for i in 0..5000u32 {
            b.add(
                PeerId::random(),
                &[addr(66, 6, (i >> 8) as u8, i as u8)],
                NOW,
                Origin::Peer(evil),
                Via::Pex,
                NOW,
            );
        }
        let mut rng = StdRng::seed_from_u64(3);
        let n = 10_000;
        let hits = (0..n)
            .filter(|_| b.select(&mut rng, NOW, false).unwrap().group == evil)
            .count();
        let share = hits as f64 / n as f64;
        let evil_entries = b.entries().filter(|e| e.group == evil).count() as f64 / b.len() as f64;
        // The attacker holds over half of the entries but should get about 1/41 of selections.
        assert!(evil_entries > 0.5, "attacker entries share {evil_entries}");
        assert!(share < 0.06, "attacker selection share {share}");
    }

    proptest! {
        /// Any sequence of operations keeps the invariants.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec((0u8..6, 0u8..30, 0u8..4, 0u32..100_000), 1..400)) {
            let cfg = AddrBookConfig { new_buckets: 8, tried_buckets: 4, bucket_size: 4, new_buckets_per_source_group: 2, tried_buckets_per_group: 2 };
            let mut b = AddrBook::new(cfg, [3; 32], PeerId::random(), false);
            let peers: Vec<PeerId> = (0..30).map(|_| PeerId::random()).collect();
            let mut rng = StdRng::seed_from_u64(9);
            for (op, who, grp, dt) in ops {
                let now = NOW + u64::from(dt) * 60;
                let p = peers[who as usize];
                let a = addr(1 + grp, who, 0, 1);
                match op {
                    0 => { b.add(p, &[a], now - 10, Origin::Peer(AddrGroup::V4([grp, 0])), Via::Pex, now); }
                    1 => { b.good(&p, &a, now); }
                    2 => b.failed(&p, now),
                    3 => b.resolve_collisions(now),
                    4 => { b.remove(&p); }
                    _ => { let _ = b.select(&mut rng, now, who % 2 == 0); }
                }
                prop_assert!(b.check_invariants().is_ok(), "{:?}", b.check_invariants());
            }
        }
    }
}
