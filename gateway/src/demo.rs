//! The demo tenant and key that `make run` prints, created on first start.
//!
//! The key is stored hashed like any other; its plaintext is also kept in a file readable
//! only by its owner so later starts can print it again.

use std::io::Write;
use std::path::Path;

use crate::keys::PlaintextKey;
use crate::tenants::{NewKey, TenantStore};

pub const DEMO_TENANT: &str = "demo";

/// Returns the demo key, creating tenant, key and file as needed.
pub async fn ensure_demo_key(store: &TenantStore, file: &Path) -> anyhow::Result<PlaintextKey> {
    if let Ok(text) = std::fs::read_to_string(file) {
        if let Some(key) = PlaintextKey::parse(text.trim()) {
            if let Some(record) = store.key(key.public_id()).await? {
                if key.presented().matches(&record.secret_hash)
                    && record.is_active(billing::now_ms())
                {
                    return Ok(key);
                }
            }
        }
        tracing::warn!(file = %file.display(), "demo key file does not match an active key; issuing a new one");
    }
    let tenant = store.ensure_tenant(DEMO_TENANT).await?;
    let (key, _) = store
        .create_key(
            &tenant.id,
            &NewKey {
                name: "demo".into(),
                ..Default::default()
            },
        )
        .await?;
    write_private(file, key.expose())?;
    Ok(key)
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}
