//! The price book as the gateway reads it, reloaded from the store in the background.
//!
//! Owns: the gateway's current copy of the billing price book and its refresh task.
//! Must never: set or change prices (the billing price book does), or fail a request
//! because a reload failed (the last book loaded stays in use).

use std::sync::Arc;
use std::time::Duration;

use billing::{Db, PriceBook};

/// The current price book, shared by every request.
pub struct PriceCache {
    book: std::sync::RwLock<Arc<PriceBook>>,
}

impl PriceCache {
    pub async fn load(db: &Db) -> Result<Arc<Self>, billing::DbError> {
        Ok(Arc::new(Self {
            book: std::sync::RwLock::new(Arc::new(PriceBook::load(db).await?)),
        }))
    }

    pub fn current(&self) -> Arc<PriceBook> {
        self.book
            .read()
            .map(|b| b.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Reloads every `every`; a failed reload keeps the last book.
    pub fn spawn_refresh(self: &Arc<Self>, db: Db, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match PriceBook::load(&db).await {
                    Ok(book) => {
                        if let Ok(mut current) = this.book.write() {
                            *current = Arc::new(book);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "reloading prices failed"),
                }
            }
        })
    }
}
