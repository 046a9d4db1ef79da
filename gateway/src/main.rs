//! `gateway`: serves the consumer API, or runs one-off operator commands.

mod cli;

use clap::Parser;

/// The request path allocates and frees many small buffers across threads (bodies, headers,
/// JSON values); mimalloc's thread-local free lists make that cheaper than glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    init_tracing();
    if let Err(e) = cli::run(cli::Cli::parse()).await {
        // One clear line for scripts and people; no backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Logs go to stderr (stdout carries results), filtered by `RUST_LOG`, `info` by default.
fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
