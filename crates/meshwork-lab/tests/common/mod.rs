//! Shared by the lab's integration tests.

/// Logs to the test's output, filtered by `RUST_LOG` (default: warnings).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
