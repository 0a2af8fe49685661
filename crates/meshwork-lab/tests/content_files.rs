//! Files and stores a user can trust: a download path belongs to one content, a file changed
//! behind the node's back is re-hashed, what the API acknowledges is on disk, and fetches
//! nobody serves neither hang forever nor crowd out the rest. Real nodes in one process over
//! loopback, as in `content.rs`.

mod common;
#[path = "../../../support/skip.rs"]
mod skip;

use common::{info, random_file};

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meshwork_lab::harness::{wait_for, Harness, HarnessBuilder, Topology};
use meshwork_node::content::{ContentError, ContentInfo, FetchRequest, ShareRequest, State};
use meshwork_node::NodeHandle;
use meshwork_swarm::ContentId;

const PIECE: u32 = 64 << 10;

async fn share(h: &NodeHandle, path: &Path) -> Result<ContentInfo> {
    Ok(h.content
        .share(ShareRequest {
            path: path.to_owned(),
            super_seed: false,
            tracker: None,
            piece_size: Some(PIECE),
        })
        .await?)
}

fn fetch_req(target: &str, out: Option<&Path>) -> FetchRequest {
    FetchRequest {
        target: target.to_string(),
        out: out.map(Path::to_owned),
        tracker: None,
    }
}

async fn seeding(h: &Harness, i: usize, id: &str, timeout: Duration) -> Result<ContentInfo> {
    wait_for(
        "the download complete",
        timeout,
        Duration::from_millis(100),
        || async {
            let c = info(&h.running(i)?.handle, id).await?;
            ensure!(c.state != State::Failed, "node {i}: {:?}", c.error);
            Ok(c.state == State::Seeding)
        },
    )
    .await?;
    info(&h.running(i)?.handle, id).await
}

/// Case 1 and 2 of the kind: two contents with one name, fetched at once without `-o`, each
/// land in a file of their own with their own bytes; the name is the longest a file system
/// takes (255 bytes), so no bookkeeping suffix fits beside it and the second file's numbered
/// name is shortened to fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_contents_with_one_long_name_fetched_at_once_land_in_files_of_their_own() -> Result<()>
{
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let name = format!("{}.bin", "b".repeat(251));
    assert_eq!(name.len(), 255);
    let size = 2 << 20;
    let a = random_file(&dir.path().join("a"), &name, size, 11)?;
    let b = random_file(&dir.path().join("b"), &name, size, 12)?;
    let h = HarnessBuilder::new("test-files-names")?
        .topology(Topology::Star)
        .persistent(true)
        .spawn(2)
        .await?;
    let (seeder, leecher) = (&h.running(0)?.handle, &h.running(1)?.handle);
    let ta = share(seeder, &a).await?;
    let tb = share(seeder, &b).await?;
    ensure!(ta.id != tb.id);
    let (ra, rb) = tokio::join!(
        leecher.content.fetch(fetch_req(&ta.ticket, None)),
        leecher.content.fetch(fetch_req(&tb.ticket, None)),
    );
    ra?;
    rb?;
    let ga = seeding(&h, 1, &ta.id, Duration::from_secs(60)).await?;
    let gb = seeding(&h, 1, &tb.id, Duration::from_secs(60)).await?;
    let (pa, pb) = (ga.path.context("a path")?, gb.path.context("a path")?);
    ensure!(pa != pb, "both at {}", pa.display());
    let downloads = h.data_dir(1).context("a data dir")?.join("downloads");
    for p in [&pa, &pb] {
        ensure!(p.parent() == Some(downloads.as_path()), "{}", p.display());
        let n = p.file_name().context("a name")?.len();
        ensure!(n <= 255, "a file name of {n} bytes");
    }
    ensure!(
        std::fs::read(&pa)? == std::fs::read(&a)?,
        "content A's file differs"
    );
    ensure!(
        std::fs::read(&pb)? == std::fs::read(&b)?,
        "content B's file differs"
    );
    // No sidecar file beside the downloads: the bookkeeping is in the data directory.
    let beside: Vec<_> = std::fs::read_dir(&downloads)?.flatten().collect();
    ensure!(beside.len() == 2, "{} files in downloads/", beside.len());
    h.shutdown().await;
    Ok(())
}

/// A path that another content uses, running or finished, is refused; so is any file the
/// node did not create, and a symbolic link; the first content's file stays whole and
/// seeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_to_a_path_another_content_uses_is_refused_and_leaves_it_whole() -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let q = random_file(dir.path(), "q.bin", 2 << 20, 21)?;
    let p = random_file(dir.path(), "p.bin", 1 << 20, 22)?;
    let h = HarnessBuilder::new("test-files-owner")?
        .topology(Topology::Star)
        .persistent(true)
        .spawn(2)
        .await?;
    let (seeder, leecher) = (&h.running(0)?.handle, &h.running(1)?.handle);
    let tq = share(seeder, &q).await?;
    let tp = share(seeder, &p).await?;
    let z = dir.path().join("z.bin");
    leecher
        .content
        .fetch(fetch_req(&tq.ticket, Some(&z)))
        .await?;
    seeding(&h, 1, &tq.id, Duration::from_secs(60)).await?;
    // Another content to the same path: refused with the owner named.
    match leecher.content.fetch(fetch_req(&tp.ticket, Some(&z))).await {
        Err(ContentError::PathInUse { owner, .. }) => ensure!(owner.to_string() == tq.id),
        other => anyhow::bail!("expected PathInUse, got {other:?}"),
    }
    // The same path spelt another way.
    let z2 = dir.path().join(".").join("z.bin");
    ensure!(matches!(
        leecher
            .content
            .fetch(fetch_req(&tp.ticket, Some(&z2)))
            .await,
        Err(ContentError::PathInUse { .. })
    ));
    // ... or through a symbolic link to its directory.
    let alias = dir.path().join("alias");
    std::os::unix::fs::symlink(dir.path(), &alias)?;
    ensure!(matches!(
        leecher
            .content
            .fetch(fetch_req(&tp.ticket, Some(&alias.join("z.bin"))))
            .await,
        Err(ContentError::PathInUse { .. })
    ));
    // A path no file system takes is refused at once.
    let nul = PathBuf::from("/tmp/a\0b");
    ensure!(matches!(
        leecher
            .content
            .fetch(fetch_req(&tp.ticket, Some(&nul)))
            .await,
        Err(ContentError::BadPath(_))
    ));
    // A file of the user's, and a symbolic link to it.
    let mine = dir.path().join("mine.txt");
    std::fs::write(&mine, b"mine")?;
    let link = dir.path().join("link.bin");
    std::os::unix::fs::symlink(&mine, &link)?;
    for target in [&mine, &link] {
        ensure!(matches!(
            leecher
                .content
                .fetch(fetch_req(&tp.ticket, Some(target)))
                .await,
            Err(ContentError::WouldOverwrite(_))
        ));
    }
    ensure!(std::fs::read(&mine)? == b"mine");
    ensure!(std::fs::read(&z)? == std::fs::read(&q)?, "Q's file changed");
    let c = info(leecher, &tq.id).await?;
    ensure!(c.state == State::Seeding && c.pieces_have == c.pieces.unwrap_or(0));
    // A journal in the data dir that names another content proves nothing: P, fetched to a
    // fresh path with Q's journal planted under P's name, starts from nothing and completes.
    let content_dir = h.data_dir(1).context("a data dir")?.join("content");
    std::fs::copy(
        content_dir.join(format!("{}.parts", tq.id)),
        content_dir.join(format!("{}.parts", tp.id)),
    )?;
    let fresh = dir.path().join("fresh.bin");
    leecher
        .content
        .fetch(fetch_req(&tp.ticket, Some(&fresh)))
        .await?;
    seeding(&h, 1, &tp.id, Duration::from_secs(60)).await?;
    ensure!(
        std::fs::read(&fresh)? == std::fs::read(&p)?,
        "P's file differs"
    );
    ensure!(std::fs::read(&z)? == std::fs::read(&q)?, "Q's file changed");
    h.shutdown().await;
    Ok(())
}

/// Case 3: a file changed while the node was down is re-hashed at start, and the changed
/// piece is fetched again; a shared file that changed stops being served; `verify` finds a
/// change made while the node runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_behind_the_nodes_back_is_rehashed_and_its_bad_piece_fetched_again(
) -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let origin = random_file(dir.path(), "origin.bin", 2 << 20, 31)?;
    let want = std::fs::read(&origin)?;
    let mut h = HarnessBuilder::new("test-files-changed")?
        .topology(Topology::Star)
        .persistent(true)
        // Only `verify` notices a change while the node runs, in this test.
        .tweak(|_, cfg| cfg.content.change_check = Duration::from_secs(3600))
        .spawn(2)
        .await?;
    let shared = share(&h.running(0)?.handle, &origin).await?;
    let out = dir.path().join("copy.bin");
    h.running(1)?
        .handle
        .content
        .fetch(fetch_req(&shared.ticket, Some(&out)))
        .await?;
    seeding(&h, 1, &shared.id, Duration::from_secs(60)).await?;
    // Down, four bytes inside piece 3 change.
    h.stop(1).await?;
    let f = std::fs::OpenOptions::new().write(true).open(&out)?;
    f.write_all_at(b"EVIL", 3 * PIECE as u64 + 100)?;
    drop(f);
    let seeder = h.dial_addr(0)?;
    h.restart(1, vec![seeder], |_| {}).await?;
    let back = info(&h.running(1)?.handle, &shared.id).await?;
    ensure!(
        back.state == State::Downloading || back.state == State::Seeding,
        "{back:?}"
    );
    let done = seeding(&h, 1, &shared.id, Duration::from_secs(60)).await?;
    ensure!(std::fs::read(&out)? == want, "the repaired file differs");
    ensure!(
        done.downloaded - done.wasted == PIECE as u64,
        "only the changed piece is fetched again: {} bytes ({} wasted)",
        done.downloaded,
        done.wasted
    );
    // While the node runs: `verify` finds a changed piece and the download repairs it.
    let f = std::fs::OpenOptions::new().write(true).open(&out)?;
    f.write_all_at(b"EVIL", 7 * PIECE as u64 + 5)?;
    drop(f);
    let id: ContentId = shared.id.parse()?;
    let report = h.running(1)?.handle.content.verify(id).await?;
    ensure!(report.bad == vec![7], "{:?}", report.bad);
    ensure!(report.checked == report.info.pieces.unwrap_or(0));
    seeding(&h, 1, &shared.id, Duration::from_secs(60)).await?;
    ensure!(std::fs::read(&out)? == want, "the re-verified file differs");
    // The origin's own file changes while its node is down: it is not served as the content.
    h.stop(0).await?;
    let f = std::fs::OpenOptions::new().write(true).open(&origin)?;
    f.write_all_at(b"EVIL", 100)?;
    drop(f);
    h.restart(0, vec![], |_| {}).await?;
    let c = info(&h.running(0)?.handle, &shared.id).await?;
    ensure!(c.state == State::Failed, "{c:?}");
    ensure!(
        c.error.as_deref().unwrap_or("").contains("piece 0 differs"),
        "{:?}",
        c.error
    );
    h.shutdown().await;
    Ok(())
}

/// Case 4: a ticket fetch interrupted half way resumes after a restart with nobody but the
/// ticket's provider to ask (no bootstrap, no tracker, no DHT path), and "no providers" is a
/// visible state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_ticket_fetch_resumes_from_the_tickets_providers() -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let size = 4 << 20;
    let origin = random_file(dir.path(), "origin.bin", size, 41)?;
    // Two one-node networks: the leecher knows the seeder only from the ticket.
    let a = HarnessBuilder::new("test-files-ticket")?
        .tweak(|_, cfg| cfg.content.upload_limit = Some(2 << 20))
        .spawn(1)
        .await?;
    let mut b = HarnessBuilder::new("test-files-ticket")?
        .first_index(10)
        .persistent(true)
        .spawn(1)
        .await?;
    let shared = share(&a.running(0)?.handle, &origin).await?;
    let out = dir.path().join("copy.bin");
    b.running(0)?
        .handle
        .content
        .fetch(fetch_req(&shared.ticket, Some(&out)))
        .await?;
    wait_for(
        "part of it downloaded",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            Ok(info(&b.running(0)?.handle, &shared.id).await?.bytes_have >= size as u64 / 4)
        },
    )
    .await?;
    b.stop(0).await?;
    // Nor does it find the seeder again through its address book or anchors (a cache of the
    // network it may lose): only the fetch's own record can name the provider.
    std::fs::remove_file(b.data_dir(0).context("a data dir")?.join("node.redb"))?;
    b.restart(0, vec![], |_| {}).await?;
    seeding(&b, 0, &shared.id, Duration::from_secs(60)).await?;
    ensure!(
        std::fs::read(&out)? == std::fs::read(&origin)?,
        "the file differs"
    );
    // A content nobody provides says so.
    let nobody = ContentId::of(b"nobody has this");
    b.running(0)?
        .handle
        .content
        .fetch(fetch_req(&nobody.to_string(), Some(&dir.path().join("x"))))
        .await?;
    let why = wait_for(
        "a stalled fetch",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            Ok(info(&b.running(0)?.handle, &nobody.to_string())
                .await?
                .stalled
                .is_some())
        },
    )
    .await;
    why?;
    let c = info(&b.running(0)?.handle, &nobody.to_string()).await?;
    ensure!(
        c.stalled
            .as_deref()
            .unwrap_or("")
            .starts_with("no providers"),
        "{:?}",
        c.stalled
    );
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

/// Case 5: a share or a fetch the node cannot record is refused with the reason, never
/// acknowledged and then forgotten at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_or_fetch_the_node_cannot_record_is_refused_not_acknowledged() -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let file = random_file(dir.path(), "f.bin", 1 << 20, 51)?;
    let mut h = HarnessBuilder::new("test-files-durable")?
        .persistent(true)
        .spawn(1)
        .await?;
    let content_dir = h.data_dir(0).context("a data dir")?.join("content");
    // Where the records go, a file: no write there can succeed (even as root).
    let _ = std::fs::remove_dir_all(&content_dir);
    std::fs::write(&content_dir, b"in the way")?;
    let node = &h.running(0)?.handle;
    match share(node, &file).await {
        Err(e) => {
            let e = e.downcast::<ContentError>()?;
            ensure!(matches!(e, ContentError::Persist(_)), "{e}");
        }
        Ok(c) => anyhow::bail!("acknowledged a share it could not record: {c:?}"),
    }
    let some = ContentId::of(b"some content");
    ensure!(matches!(
        node.content
            .fetch(fetch_req(&some.to_string(), Some(&dir.path().join("o"))))
            .await,
        Err(ContentError::Persist(_))
    ));
    ensure!(
        node.content.list().await?.is_empty(),
        "nothing half-accepted"
    );
    // Room again: the share is acknowledged and survives a restart.
    std::fs::remove_file(&content_dir)?;
    let shared = share(&h.running(0)?.handle, &file).await?;
    h.stop(0).await?;
    h.restart(0, vec![], |_| {}).await?;
    let c = info(&h.running(0)?.handle, &shared.id).await?;
    ensure!(c.state == State::Seeding, "{c:?}");
    // Records the node cannot read stop its start, rather than have it start as if it held
    // nothing.
    h.stop(0).await?;
    let aside = content_dir.with_extension("aside");
    std::fs::rename(&content_dir, &aside)?;
    std::fs::write(&content_dir, b"in the way")?;
    let refused = h.restart(0, vec![], |_| {}).await;
    let why = format!(
        "{:#}",
        refused.err().context("started over unreadable records")?
    );
    ensure!(why.contains("cannot read the content records"), "{why}");
    std::fs::remove_file(&content_dir)?;
    std::fs::rename(&aside, &content_dir)?;
    h.restart(0, vec![], |_| {}).await?;
    let c = info(&h.running(0)?.handle, &shared.id).await?;
    ensure!(c.state == State::Seeding, "{c:?}");
    h.shutdown().await;
    Ok(())
}

/// Case 8: fetches of contents nobody provides fill at most their own slots, fail once their
/// manifest deadline passes (freeing them, and not asked again at the next start), and never
/// stop a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_nobody_serves_fail_in_time_and_never_crowd_out_shares() -> Result<()> {
    use meshwork_node::content::MAX_PENDING_FETCHES;
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let file = random_file(dir.path(), "f.bin", 1 << 20, 81)?;
    let mut h = HarnessBuilder::new("test-files-slots")?
        .persistent(true)
        .tweak(|_, cfg| cfg.content.manifest_timeout = Duration::from_secs(3))
        .spawn(1)
        .await?;
    let node = &h.running(0)?.handle;
    let mut accepted = 0;
    let mut refused = 0;
    for k in 0..MAX_PENDING_FETCHES + 10 {
        let id = ContentId::of(format!("nobody {k}").as_bytes());
        match node.content.fetch(fetch_req(&id.to_string(), None)).await {
            Ok(_) => accepted += 1,
            Err(ContentError::TooManyPending) => refused += 1,
            Err(e) => anyhow::bail!("{e}"),
        }
    }
    ensure!(
        accepted == MAX_PENDING_FETCHES && refused == 10,
        "{accepted} / {refused}"
    );
    share(node, &file)
        .await
        .context("a share while the fetch slots are full")?;
    wait_for(
        "every unserved fetch failed",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let all = h.running(0)?.handle.content.list().await?;
            Ok(all.iter().filter(|c| c.state == State::Failed).count() == MAX_PENDING_FETCHES)
        },
    )
    .await?;
    let failed = h.running(0)?.handle.content.list().await?;
    let one = failed
        .iter()
        .find(|c| c.state == State::Failed)
        .context("a failed fetch")?;
    ensure!(
        one.error
            .as_deref()
            .unwrap_or("")
            .contains("no provider sent the manifest"),
        "{:?}",
        one.error
    );
    // The slots are free again.
    let later = ContentId::of(b"a later fetch");
    h.running(0)?
        .handle
        .content
        .fetch(fetch_req(&later.to_string(), None))
        .await?;
    // A restart asks again only for the fetch still within its deadline.
    h.stop(0).await?;
    h.restart(0, vec![], |_| {}).await?;
    let all = h.running(0)?.handle.content.list().await?;
    let pending = all
        .iter()
        .filter(|c| c.state == State::FetchingManifest)
        .count();
    ensure!(pending <= 1, "{pending} fetches asked again");
    ensure!(
        all.iter().any(|c| c.state == State::Seeding),
        "the share survived"
    );
    h.shutdown().await;
    Ok(())
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, bytes: u64) -> Result<SmallDisk> {
        std::fs::create_dir_all(path)?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "meshwork-test",
            ])
            .arg(path)
            .status()?
            .success();
        ensure!(ok, "mount tmpfs at {}", path.display());
        Ok(SmallDisk {
            path: path.to_owned(),
        })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Case 6, content: a download that fills its disk fails with the reason and keeps every
/// piece it verified; once space returns, fetching it again resumes where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_that_fills_its_disk_says_why_and_resumes_once_space_returns() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip::skip("mounting a small tmpfs needs root");
        return Ok(());
    }
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let size = 4 << 20;
    let origin = random_file(dir.path(), "origin.bin", size, 61)?;
    let disk = SmallDisk::mount(&dir.path().join("small"), 5 << 20)?;
    let filler = disk.path.join("filler");
    std::fs::write(&filler, vec![7u8; 3 << 20])?;
    let h = HarnessBuilder::new("test-files-full")?
        .topology(Topology::Star)
        .persistent(true)
        .spawn(2)
        .await?;
    let shared = share(&h.running(0)?.handle, &origin).await?;
    let out = disk.path.join("copy.bin");
    let leecher = &h.running(1)?.handle;
    leecher
        .content
        .fetch(fetch_req(&shared.ticket, Some(&out)))
        .await?;
    wait_for(
        "the download failed for lack of space",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let c = info(&h.running(1)?.handle, &shared.id).await?;
            ensure!(c.state != State::Seeding, "it fit after all");
            Ok(c.state == State::Failed)
        },
    )
    .await?;
    let failed = info(leecher, &shared.id).await?;
    ensure!(
        failed
            .error
            .as_deref()
            .unwrap_or("")
            .contains("No space left"),
        "{:?}",
        failed.error
    );
    // Space returns; the same fetch resumes from what it had verified.
    std::fs::remove_file(&filler)?;
    leecher
        .content
        .fetch(fetch_req(&shared.ticket, None))
        .await?;
    let done = seeding(&h, 1, &shared.id, Duration::from_secs(60)).await?;
    ensure!(
        std::fs::read(&out)? == std::fs::read(&origin)?,
        "the file differs"
    );
    ensure!(
        done.downloaded < size as u64,
        "resumed: {} bytes fetched after the retry",
        done.downloaded
    );
    h.shutdown().await;
    drop(disk);
    Ok(())
}

/// While the node runs, a complete content's file that changes is noticed (its stat moved)
/// without being asked: a download re-fetches the changed piece, a shared file stops being
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_while_the_node_runs_is_noticed_and_handled() -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let origin = random_file(dir.path(), "origin.bin", 1 << 20, 71)?;
    let want = std::fs::read(&origin)?;
    let h = HarnessBuilder::new("test-files-running")?
        .topology(Topology::Star)
        .tweak(|_, cfg| cfg.content.change_check = Duration::from_millis(200))
        .spawn(2)
        .await?;
    let shared = share(&h.running(0)?.handle, &origin).await?;
    let out = dir.path().join("copy.bin");
    h.running(1)?
        .handle
        .content
        .fetch(fetch_req(&shared.ticket, Some(&out)))
        .await?;
    seeding(&h, 1, &shared.id, Duration::from_secs(60)).await?;
    let f = std::fs::OpenOptions::new().write(true).open(&out)?;
    f.write_all_at(b"EVIL", 5 * PIECE as u64 + 9)?;
    drop(f);
    wait_for(
        "the changed piece fetched again",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let c = info(&h.running(1)?.handle, &shared.id).await?;
            Ok(c.state == State::Seeding && std::fs::read(&out)? == want)
        },
    )
    .await?;
    let c = info(&h.running(1)?.handle, &shared.id).await?;
    ensure!(
        c.downloaded - c.wasted == PIECE as u64,
        "only the changed piece fetched again: {c:?}"
    );
    let f = std::fs::OpenOptions::new().write(true).open(&origin)?;
    f.write_all_at(b"EVIL", 9)?;
    drop(f);
    wait_for(
        "the changed origin no longer served",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { Ok(info(&h.running(0)?.handle, &shared.id).await?.state == State::Failed) },
    )
    .await?;
    let c = info(&h.running(0)?.handle, &shared.id).await?;
    ensure!(
        c.error
            .as_deref()
            .unwrap_or("")
            .contains("changed since it was shared"),
        "{:?}",
        c.error
    );
    h.shutdown().await;
    Ok(())
}

/// A crash between creating a download's file and recording it leaves the pending fetch and
/// the journal: the restarted fetch takes up its own file (the journal proves it) instead of
/// refusing it as someone else's. And a recorded download whose file the user removed while
/// the node was down is not downloaded again unasked; a fetch of it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_record_orphans_nothing_and_a_removed_file_is_not_fetched_unasked(
) -> Result<()> {
    common::init_logs();
    let dir = tempfile::tempdir()?;
    let origin = random_file(dir.path(), "origin.bin", 1 << 20, 91)?;
    let mut h = HarnessBuilder::new("test-files-crash")?
        .topology(Topology::Star)
        .persistent(true)
        .spawn(2)
        .await?;
    let shared = share(&h.running(0)?.handle, &origin).await?;
    let out = dir.path().join("copy.bin");
    h.running(1)?
        .handle
        .content
        .fetch(fetch_req(&shared.ticket, Some(&out)))
        .await?;
    seeding(&h, 1, &shared.id, Duration::from_secs(60)).await?;
    h.stop(1).await?;
    // The state a crash right after the file was created leaves: the pending fetch and the
    // journal, no record.
    let content_dir = h.data_dir(1).context("a data dir")?.join("content");
    std::fs::remove_file(content_dir.join(format!("{}.json", shared.id)))?;
    std::fs::remove_file(content_dir.join(format!("{}.manifest", shared.id)))?;
    let pending = serde_json::json!({"target": shared.ticket, "out": out, "tracker": null});
    std::fs::write(
        content_dir.join(format!("{}.fetch", shared.id)),
        serde_json::to_vec(&pending)?,
    )?;
    let seeder = h.dial_addr(0)?;
    h.restart(1, vec![seeder.clone()], |_| {}).await?;
    seeding(&h, 1, &shared.id, Duration::from_secs(60)).await?;
    ensure!(
        std::fs::read(&out)? == std::fs::read(&origin)?,
        "the file differs"
    );
    // Removed while the node is down: failed with the reason, not fetched again unasked.
    h.stop(1).await?;
    std::fs::remove_file(&out)?;
    h.restart(1, vec![seeder], |_| {}).await?;
    let c = info(&h.running(1)?.handle, &shared.id).await?;
    ensure!(c.state == State::Failed, "{c:?}");
    ensure!(!out.exists(), "downloaded again unasked");
    ensure!(
        c.error.as_deref().unwrap_or("").contains("removed"),
        "{:?}",
        c.error
    );
    h.running(1)?
        .handle
        .content
        .fetch(fetch_req(&shared.ticket, None))
        .await?;
    seeding(&h, 1, &shared.id, Duration::from_secs(60)).await?;
    ensure!(
        std::fs::read(&out)? == std::fs::read(&origin)?,
        "the file differs"
    );
    h.shutdown().await;
    Ok(())
}
