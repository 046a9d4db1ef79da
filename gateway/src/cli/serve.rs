//! The serve command: the gateway from its configuration, until a shutdown signal.
//!
//! Owns: starting the gateway, printing the line launchers read to learn the port (and the
//! demo key when asked), and waiting for SIGINT or SIGTERM. Must never: print anything
//! else on stdout; launchers and tests parse it.

use gateway::{Gateway, GatewayConfig};

pub async fn serve(config: GatewayConfig) -> anyhow::Result<()> {
    let gateway = Gateway::build(&config).await?;
    let addr = gateway.local_addr()?;
    // Launchers and tests read this line to learn the port.
    println!("gateway listening on http://{addr}");
    if let Some(file) = &config.demo_key_file {
        let store = gateway.tenants().clone();
        let key = gateway::demo::ensure_demo_key(&store, file).await?;
        println!("demo key: {}", key.expose());
    }
    gateway.run(shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
    tracing::info!("shutdown signal received; draining");
}
