//! Logging setup: `tracing` to stderr, plain or JSON.
//!
//! Plain output drops colours and timestamps when stderr goes to the
//! journal (`JOURNAL_STREAM` is set), since journald adds its own, and
//! colours whenever stderr is not a terminal.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides the
/// configured level. Calling it twice is harmless (the second does nothing).
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Plain if journald => builder.without_time().with_ansi(false).try_init(),
        LogFormat::Plain => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // Err only means a subscriber is already installed (tests, embedding).
    drop(result);
}
