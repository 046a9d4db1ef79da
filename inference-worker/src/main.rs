//! `inference-worker`: loads the configured models and serves them until SIGINT/SIGTERM.
//!
//! Owns: logging set-up, the start-up line that announces the port, and the shutdown
//! signals. Must never: hold serving logic (that is the library's).

use clap::Parser;
use inference_worker::{Worker, WorkerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = WorkerConfig::parse();
    if config.chat_models.is_empty() && config.embedding_models.is_empty() {
        anyhow::bail!("no models configured: pass --chat-model and/or --embedding-model");
    }
    let worker = Worker::build(config).await?;
    // Tests and launchers read this line to learn the port.
    println!(
        "inference-worker listening on http://{}",
        worker.local_addr()?
    );
    worker.run(shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
