//! The swarm engine against a hostile peer, driven message by message with controlled time:
//! the request queue limit, the unsolicited-block limit, a block of the wrong length, the
//! request timeout, and the blame of a piece assembled from several peers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshwork_swarm::engine::{
    Engine, EngineConfig, EngineEvent, INITIAL_DEPTH, MAX_QUEUED_REQUESTS, MAX_UNSOLICITED,
    REQUEST_TIMEOUT,
};
use meshwork_swarm::manifest::Manifest;
use meshwork_swarm::picker::BLOCK_SIZE;
use meshwork_swarm::store::PieceStore;
use meshwork_swarm::wire::Msg;
use meshwork_swarm::Bitfield;
use rand::{Rng, SeedableRng};

const PIECE: u32 = 2 * BLOCK_SIZE;
/// 64 pieces of two blocks: more blocks than one peer's initial request depth.
const SIZE: usize = 2 << 20;

/// Peer ids: the hostile peer, an honest one and late joiners.
const HOSTILE: u32 = 1;
const HONEST: u32 = 2;

struct Fixture {
    _dir: tempfile::TempDir,
    origin: PathBuf,
    bytes: Vec<u8>,
    m: Manifest,
    leechers: std::sync::atomic::AtomicUsize,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let bytes: Vec<u8> = (0..SIZE).map(|_| rng.gen()).collect();
    let origin = dir.path().join("origin.bin");
    std::fs::write(&origin, &bytes).unwrap();
    let m = Manifest::from_file(&origin, PIECE).unwrap();
    Fixture {
        _dir: dir,
        origin,
        bytes,
        m,
        leechers: Default::default(),
    }
}

impl Fixture {
    fn seeder(&self, now: Instant) -> Engine<u32> {
        let store = PieceStore::open_complete(&self.origin, self.m.clone()).unwrap();
        Engine::new(store, cfg(), now)
    }

    /// A leecher with an empty store of its own (`leech<n>.bin`, n counting up).
    fn leecher(&self, now: Instant) -> Engine<u32> {
        let n = self
            .leechers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir().join(format!("leech{n}.bin"));
        let store = PieceStore::open(&path, self.m.clone()).unwrap();
        Engine::new(store, cfg(), now)
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// The true bytes of a block.
    fn block(&self, piece: u32, offset: u32, len: u32) -> Vec<u8> {
        let start = piece as usize * PIECE as usize + offset as usize;
        self.bytes[start..start + len as usize].to_vec()
    }

    fn pieces(&self) -> usize {
        self.m.piece_count()
    }
}

fn cfg() -> EngineConfig {
    EngineConfig {
        seed: 4,
        ..Default::default()
    }
}

/// Adds `p` with `bits` as its bitfield.
fn join(e: &mut Engine<u32>, p: u32, bits: &Bitfield, now: Instant) {
    assert!(e.add_peer(p, now));
    e.handle(p, Msg::Bitfield(bits.as_bytes().to_vec()), now);
}

/// The requests the engine has queued for `p` (its control messages, drained).
fn requests_to(e: &mut Engine<u32>, p: u32) -> Vec<(u32, u32, u32)> {
    let mut out = vec![];
    while let Some(m) = e.poll_control(&p) {
        if let Msg::Request { piece, offset, len } = m {
            out.push((piece, offset, len));
        }
    }
    out
}

fn events(e: &mut Engine<u32>) -> Vec<EngineEvent<u32>> {
    std::iter::from_fn(|| e.poll_event()).collect()
}

fn disconnects(ev: &[EngineEvent<u32>]) -> Vec<(u32, bool)> {
    ev.iter()
        .filter_map(|x| match x {
            EngineEvent::Disconnect { peer, ban, .. } => Some((*peer, *ban)),
            _ => None,
        })
        .collect()
}

/// A peer may have [`MAX_QUEUED_REQUESTS`] (512) requests queued with us; the next one
/// disconnects it (without a ban: it is a protocol violation, not corrupt data).
#[test]
fn the_513th_queued_request_disconnects_the_peer() {
    let f = fixture();
    let t0 = Instant::now();
    let mut e = f.seeder(t0);
    join(&mut e, HOSTILE, &Bitfield::new(f.pieces()), t0);
    e.handle(HOSTILE, Msg::Interested, t0);
    e.rechoke_if_due(t0);
    while let Some(m) = e.poll_control(&HOSTILE) {
        if m == Msg::Unchoke {
            break;
        }
    }
    let blocks = f.pieces() as u32 * 2;
    for i in 0..MAX_QUEUED_REQUESTS as u32 {
        let b = i % blocks;
        e.handle(
            HOSTILE,
            Msg::Request {
                piece: b / 2,
                offset: (b % 2) * BLOCK_SIZE,
                len: BLOCK_SIZE,
            },
            t0,
        );
    }
    assert!(e.has_peer(&HOSTILE), "512 queued requests are allowed");
    assert!(disconnects(&events(&mut e)).is_empty());
    e.check_invariants().unwrap();
    e.handle(
        HOSTILE,
        Msg::Request {
            piece: 0,
            offset: 0,
            len: BLOCK_SIZE,
        },
        t0,
    );
    assert!(!e.has_peer(&HOSTILE), "the 513th is one too many");
    assert_eq!(disconnects(&events(&mut e)), vec![(HOSTILE, false)]);
}

/// A peer may send [`MAX_UNSOLICITED`] (1 024) blocks we neither asked for nor want; the
/// next one disconnects it.
#[test]
fn the_1025th_unsolicited_block_disconnects_the_peer() {
    let f = fixture();
    let t0 = Instant::now();
    let mut e = f.leecher(t0);
    // It has everything but never unchokes us, so we ask it for nothing.
    join(&mut e, HOSTILE, &Bitfield::full(f.pieces()), t0);
    let blocks = f.pieces() as u32 * 2;
    let block = |i: u32| {
        let b = i % blocks;
        let (piece, offset) = (b / 2, (b % 2) * BLOCK_SIZE);
        Msg::Piece {
            piece,
            offset,
            data: f.block(piece, offset, BLOCK_SIZE),
        }
    };
    for i in 0..MAX_UNSOLICITED {
        e.handle(HOSTILE, block(i), t0);
    }
    assert!(
        e.has_peer(&HOSTILE),
        "1 024 unsolicited blocks are tolerated"
    );
    assert!(disconnects(&events(&mut e)).is_empty());
    assert_eq!(e.progress().pieces_have, 0, "none of them was taken");
    assert_eq!(
        e.progress().wasted,
        u64::from(MAX_UNSOLICITED) * u64::from(BLOCK_SIZE)
    );
    e.handle(HOSTILE, block(MAX_UNSOLICITED), t0);
    assert!(!e.has_peer(&HOSTILE), "the 1 025th is one too many");
    assert_eq!(disconnects(&events(&mut e)), vec![(HOSTILE, false)]);
}

/// A block we asked for that comes back with the wrong length disconnects the sender, and
/// the block is asked of someone else.
#[test]
fn a_requested_block_of_the_wrong_length_disconnects_the_sender() {
    let f = fixture();
    let t0 = Instant::now();
    let mut e = f.leecher(t0);
    join(&mut e, HOSTILE, &Bitfield::full(f.pieces()), t0);
    e.handle(HOSTILE, Msg::Unchoke, t0);
    let asked = requests_to(&mut e, HOSTILE);
    assert_eq!(asked.len(), INITIAL_DEPTH);
    let (piece, offset, len) = asked[0];
    e.handle(
        HOSTILE,
        Msg::Piece {
            piece,
            offset,
            data: f.block(piece, offset, len - 1),
        },
        t0,
    );
    assert!(!e.has_peer(&HOSTILE));
    assert_eq!(disconnects(&events(&mut e)), vec![(HOSTILE, false)]);
    e.check_invariants().unwrap();
    // Its requests went back to the picker: the next peer is asked for them first.
    join(&mut e, HONEST, &Bitfield::full(f.pieces()), t0);
    e.handle(HONEST, Msg::Unchoke, t0);
    let mut again = requests_to(&mut e, HONEST);
    let mut before = asked.clone();
    again.sort();
    before.sort();
    assert_eq!(again, before);
}

/// A leecher that asked the hostile peer for its first blocks at `t0`, and those requests.
fn asked_of_a_silent_peer(f: &Fixture, t0: Instant) -> (Engine<u32>, Vec<(u32, u32, u32)>) {
    let mut e = f.leecher(t0);
    join(&mut e, HOSTILE, &Bitfield::full(f.pieces()), t0);
    e.handle(HOSTILE, Msg::Unchoke, t0);
    let mut stuck = requests_to(&mut e, HOSTILE);
    stuck.sort();
    assert_eq!(stuck.len(), INITIAL_DEPTH);
    (e, stuck)
}

/// A request unanswered for [`REQUEST_TIMEOUT`] (30 s) is withdrawn: not at the tick at
/// 29.9 s, at the tick at 30 s. The withdrawn blocks go to another peer, and the stalled peer
/// is asked for nothing more until it delivers.
#[test]
fn requests_time_out_at_30_s_and_go_to_another_peer() {
    assert_eq!(REQUEST_TIMEOUT, Duration::from_secs(30));
    let f = fixture();
    let t0 = Instant::now();

    // Just before the timeout: nothing is withdrawn, so a newcomer gets other blocks.
    let (mut e, stuck) = asked_of_a_silent_peer(&f, t0);
    let before = t0 + REQUEST_TIMEOUT - Duration::from_millis(100);
    e.tick(before);
    join(&mut e, 3, &Bitfield::full(f.pieces()), before);
    e.handle(3, Msg::Unchoke, before);
    let early = requests_to(&mut e, 3);
    assert_eq!(early.len(), INITIAL_DEPTH);
    assert!(
        early.iter().all(|r| !stuck.contains(r)),
        "withdrawn before 30 s: {early:?}"
    );
    assert!(requests_to(&mut e, HOSTILE).is_empty());

    // At the timeout: withdrawn, given to the next peer that asks, and not asked again of
    // the stalled peer.
    let (mut e, stuck) = asked_of_a_silent_peer(&f, t0);
    let at = t0 + REQUEST_TIMEOUT;
    e.tick(at);
    assert!(
        requests_to(&mut e, HOSTILE).is_empty(),
        "the stalled peer was asked again"
    );
    join(&mut e, 4, &Bitfield::full(f.pieces()), at);
    e.handle(4, Msg::Unchoke, at);
    let mut late = requests_to(&mut e, 4);
    late.sort();
    assert_eq!(late, stuck, "the withdrawn blocks go to the next peer");
    e.check_invariants().unwrap();
    assert!(e.has_peer(&HOSTILE), "a timeout is no violation");
    // Still not asked at the next tick.
    e.tick(at + Duration::from_secs(1));
    assert!(requests_to(&mut e, HOSTILE).is_empty());

    // A late answer revives the stalled peer: it is asked again.
    let (piece, offset, len) = stuck[0];
    let data = f.block(piece, offset, len);
    e.handle(
        HOSTILE,
        Msg::Piece {
            piece,
            offset,
            data,
        },
        at,
    );
    assert!(!requests_to(&mut e, HOSTILE).is_empty());
}

/// A piece assembled from an honest peer's and a liar's blocks fails its hash: nobody is
/// blamed then (the engine cannot tell who lied). The failed blocks are kept; when the honest
/// peer alone supplies the pieces again and they verify, the liar's kept blocks differ and it
/// gets a strike per piece, so it is banned at the second such piece. The honest peer is never
/// struck.
#[test]
fn a_multi_source_piece_that_fails_blames_only_the_liar() {
    let f = fixture();
    let t0 = Instant::now();
    let mut e = f.leecher(t0);
    let (honest, liar) = (HONEST, HOSTILE);
    join(&mut e, honest, &Bitfield::full(f.pieces()), t0);
    join(&mut e, liar, &Bitfield::full(f.pieces()), t0);
    let serve = |e: &mut Engine<u32>, from: u32, (piece, offset, len): (u32, u32, u32), bad| {
        let mut data = f.block(piece, offset, len);
        if bad {
            data[0] ^= 0xff;
        }
        e.handle(
            from,
            Msg::Piece {
                piece,
                offset,
                data,
            },
            t0,
        );
    };

    // The honest peer sends the first block of each piece it is asked for, then chokes us.
    e.handle(honest, Msg::Unchoke, t0);
    let asked = requests_to(&mut e, honest);
    let mut half_done = vec![];
    for r in asked.iter().filter(|r| r.1 == 0) {
        serve(&mut e, honest, *r, false);
        half_done.push(r.0);
    }
    e.handle(honest, Msg::Choke, t0);
    requests_to(&mut e, honest);
    assert!(half_done.len() >= 2);

    // The liar is asked for the rest and corrupts the second blocks of those pieces.
    e.handle(liar, Msg::Unchoke, t0);
    let mut mixed = 0;
    for r in requests_to(&mut e, liar) {
        if r.1 == BLOCK_SIZE && half_done.contains(&r.0) {
            serve(&mut e, liar, r, true);
            mixed += 1;
        }
    }
    assert_eq!(mixed, half_done.len(), "{asked:?}");
    assert_eq!(e.progress().bad_pieces, mixed as u32);
    assert!(
        disconnects(&events(&mut e)).is_empty(),
        "a multi-source failure strikes nobody yet"
    );
    e.handle(liar, Msg::Choke, t0);
    requests_to(&mut e, liar);

    // The honest peer serves everything asked of it until the file is complete.
    e.handle(honest, Msg::Unchoke, t0);
    let mut bans = vec![];
    let mut rounds = 0;
    while !e.is_complete() {
        rounds += 1;
        assert!(rounds < 10_000, "stalled");
        let asked = requests_to(&mut e, honest);
        assert!(!asked.is_empty(), "nothing asked of the honest peer");
        for r in asked {
            serve(&mut e, honest, r, false);
            let ev = events(&mut e);
            for d in disconnects(&ev) {
                bans.push((d, e.progress().pieces_have));
            }
        }
        e.check_invariants().unwrap();
    }
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(bans[0].0, (liar, true), "only the liar is banned");
    assert!(e.has_peer(&honest) && !e.has_peer(&liar));
    assert_eq!(
        e.progress().bad_pieces,
        mixed as u32,
        "no piece failed again"
    );
    e.flush().unwrap();
    assert_eq!(
        std::fs::read(f.dir().join("leech0.bin")).unwrap(),
        f.bytes,
        "the file is byte-identical"
    );
}
