//! Shared by the lab's integration tests.

/// Logs to the test's output, filtered by `RUST_LOG` (default: warnings).
#[allow(dead_code)] // content.rs installs its own subscriber, which also captures events
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A file of `size` seeded random bytes at `dir/name` (the directory is created).
#[allow(dead_code)] // not every test binary writes files
pub fn random_file(
    dir: &std::path::Path,
    name: &str,
    size: usize,
    seed: u64,
) -> anyhow::Result<std::path::PathBuf> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bytes = vec![0u8; size];
    rng.fill(&mut bytes[..]);
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    std::fs::write(&path, &bytes)?;
    Ok(path)
}

/// One content's state on a node.
#[allow(dead_code)] // not every test binary has contents
pub async fn info(
    h: &meshwork_node::NodeHandle,
    id: &str,
) -> anyhow::Result<meshwork_node::content::ContentInfo> {
    use anyhow::Context;
    let id: meshwork_swarm::ContentId = id.parse()?;
    h.content.get(id).await?.context("content gone")
}
