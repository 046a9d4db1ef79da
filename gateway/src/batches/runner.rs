//! Running batch lines in the background, on every replica, below interactive traffic.
//!
//! A replica leases a few lines at a time from the store and runs each as a call of the
//! batch's key through [`Proxy::handle`] (admission, routing, metering as any call), with
//! the request id `{batch}_req_{line}`: the ledger keeps one usage record per request id,
//! so a line run again after a crash is never billed twice. Lines start only while this
//! replica's workers carry at most `idle_below` calls besides its own batch lines, so
//! batches use the capacity interactive calls leave.
//!
//! Owns: pacing, leasing, each line's result, stopping a batch out of quota, and ending
//! batches. Must never: run a line its lease does not cover, or start one while stopping.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::response::IntoResponse;
use billing::now_ms;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::store::{Claimed, LineEnd, Owner};
use super::{BatchError, BatchStore};
use crate::auth::KeyCaller;
use crate::consumer::ConsumerState;
use crate::proxy::{CallContext, ProxiedCall};

/// How often batches that can end are looked for.
const END_EVERY: Duration = Duration::from_secs(1);
/// How often files past their retention are deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The most bytes of one line's answer kept for the output file.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// How batches run on this replica.
#[derive(Debug, Clone, Copy)]
pub struct RunnerSettings {
    /// Lines this replica runs at once.
    pub concurrency: usize,
    /// Lines start only while the workers carry at most this many other calls.
    pub idle_below: usize,
    /// Pause when there is nothing to run, or no capacity.
    pub poll: Duration,
    /// How long a line stays leased without renewal (renewed every third of it).
    pub lease: Duration,
}

impl RunnerSettings {
    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }
}

pub struct Runner {
    pub store: BatchStore,
    pub state: Arc<ConsumerState>,
    pub settings: RunnerSettings,
    pub owner: String,
    owners: Mutex<HashMap<String, Owner>>,
}

/// What became of one line.
enum Ran {
    Recorded,
    /// Not run (no capacity, a rate limit, no worker): leased again later.
    Again,
    /// The tenant is out of quota: the batch stops.
    OutOfQuota(String),
}

impl Runner {
    pub fn new(
        store: BatchStore,
        state: Arc<ConsumerState>,
        settings: RunnerSettings,
        owner: String,
    ) -> Self {
        Self {
            store,
            state,
            settings,
            owner,
            owners: Mutex::new(HashMap::new()),
        }
    }

    /// Runs until `stop` turns true, then lets the lines in flight finish.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut lines = JoinSet::new();
        let mut ended_at = tokio::time::Instant::now();
        let mut swept_at: Option<tokio::time::Instant> = None;
        loop {
            if *stop.borrow() {
                break;
            }
            if ended_at.elapsed() >= END_EVERY {
                ended_at = tokio::time::Instant::now();
                self.end_batches().await;
            }
            if swept_at.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
                swept_at = Some(tokio::time::Instant::now());
                match self.store.delete_expired_files().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(files = n, "files past their retention deleted"),
                    Err(e) => tracing::warn!(error = %e, "deleting expired files failed"),
                }
            }
            while lines.try_join_next().is_some() {}
            let free = self.settings.concurrency.saturating_sub(lines.len());
            let claimed = if free > 0 && self.idle(lines.len()) {
                match self
                    .store
                    .claim(&self.owner, self.settings.lease_ms(), free as i64)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "leasing batch lines failed");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            if claimed.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.poll) => {}
                    _ = stop.changed() => {}
                    Some(_) = lines.join_next(), if !lines.is_empty() => {}
                }
                continue;
            }
            for line in claimed {
                let runner = self.clone();
                lines.spawn(async move { runner.line(line).await });
            }
        }
        while lines.join_next().await.is_some() {}
    }

    /// Whether the workers carry no more interactive calls than the settings allow, besides
    /// this replica's `in_flight` batch lines.
    fn idle(&self, in_flight: usize) -> bool {
        let outstanding: usize = self
            .state
            .pool
            .nodes()
            .iter()
            .map(|n| n.outstanding())
            .sum();
        outstanding.saturating_sub(in_flight) <= self.settings.idle_below
    }

    async fn end_batches(&self) {
        let endable = match self.store.endable().await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "looking for batches to end failed");
                return;
            }
        };
        for (id, end) in endable {
            match self.store.finish(&id, &end).await {
                Ok(()) => tracing::info!(batch = %id, status = %end, "batch ended"),
                Err(e) => tracing::warn!(batch = %id, error = %e, "ending a batch failed"),
            }
        }
    }

    /// Runs one leased line and records what became of it.
    async fn line(&self, line: Claimed) {
        let run = self.run_line(&line);
        tokio::pin!(run);
        let mut renew = tokio::time::interval(self.settings.lease / 3);
        renew.tick().await;
        let ran = loop {
            tokio::select! {
                ran = &mut run => break ran,
                _ = renew.tick() => {
                    if let Err(e) = self.store.renew(&self.owner, &line.batch_id, line.line, self.settings.lease_ms()).await {
                        tracing::warn!(batch = %line.batch_id, line = line.line, error = %e, "renewing a batch line's lease failed");
                    }
                }
            }
        };
        let outcome = match ran {
            Ok(Ran::Recorded) => Ok(()),
            Ok(Ran::Again) => {
                tokio::time::sleep(self.settings.poll).await;
                self.store
                    .release(&self.owner, &line.batch_id, line.line)
                    .await
            }
            Ok(Ran::OutOfQuota(message)) => {
                let error = BatchError {
                    code: "insufficient_quota".into(),
                    message,
                    line: Some(line.line),
                };
                match self.store.stop(&line.batch_id, &error).await {
                    Ok(()) => {
                        self.store
                            .release(&self.owner, &line.batch_id, line.line)
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            // The lease lapses and the line runs again; its usage is keyed by the line.
            tracing::warn!(batch = %line.batch_id, line = line.line, error = %e, "recording a batch line failed");
        }
    }

    async fn run_line(&self, line: &Claimed) -> Result<Ran, billing::DbError> {
        let owner = match self.owner_of(&line.batch_id).await? {
            Some(o) => o,
            None => return Ok(Ran::Again),
        };
        let request_id = format!("{}_req_{}", line.batch_id, line.line);
        let (status, body) = match self.caller(&owner).await? {
            Err(message) => (
                401,
                json!({"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}}),
            ),
            Ok(caller) => {
                let response =
                    match ProxiedCall::parse(owner.endpoint, Bytes::from(line.body.clone())) {
                        Err(e) => e.into_response(),
                        Ok(call) => {
                            let ctx = CallContext {
                                request_id: request_id.clone(),
                                caller,
                                started_at: now_ms(),
                                cache: crate::response_cache::Directive::default(),
                            };
                            match self.state.proxy.handle(ctx, call).await {
                                Ok(r) => r,
                                Err(e) => e.into_response(),
                            }
                        }
                    };
                let status = response.status().as_u16();
                let bytes = axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES)
                    .await
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let code = body.pointer("/error/code").and_then(Value::as_str);
                match (status, code) {
                    (429, Some("insufficient_quota")) => {
                        let message = body
                            .pointer("/error/message")
                            .and_then(Value::as_str)
                            .unwrap_or("quota exceeded");
                        return Ok(Ran::OutOfQuota(message.to_owned()));
                    }
                    // Passing conditions: a rate limit, no worker now, limits unreadable.
                    (429 | 502 | 503 | 504, _) => return Ok(Ran::Again),
                    _ => (status, body),
                }
            }
        };
        let result = json!({
            "id": request_id,
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": null,
        });
        let end = match status {
            200..=299 => LineEnd::Done,
            _ => LineEnd::Failed,
        };
        let recorded = self
            .store
            .complete(
                &self.owner,
                &line.batch_id,
                line.line,
                end,
                &result.to_string(),
            )
            .await?;
        tracing::debug!(batch = %line.batch_id, line = line.line, status, recorded, owner = %self.owner, "batch line ran");
        Ok(Ran::Recorded)
    }

    async fn owner_of(&self, batch_id: &str) -> Result<Option<Owner>, billing::DbError> {
        if let Some(o) = self
            .owners
            .lock()
            .ok()
            .and_then(|m| m.get(batch_id).cloned())
        {
            return Ok(Some(o));
        }
        let owner = self.store.owner(batch_id).await?;
        if let (Some(o), Ok(mut m)) = (&owner, self.owners.lock()) {
            if m.len() > 10_000 {
                m.clear();
            }
            m.insert(batch_id.to_owned(), o.clone());
        }
        Ok(owner)
    }

    /// The batch's key, as the store has it now: a key revoked or expired since the batch
    /// was made runs nothing more.
    async fn caller(
        &self,
        owner: &Owner,
    ) -> Result<Result<KeyCaller, &'static str>, billing::DbError> {
        let key = self.state.tenants.key(&owner.key_id).await?;
        Ok(match key {
            Some(k) if k.is_active(now_ms()) => Ok(KeyCaller { key: Arc::new(k) }),
            Some(_) => Err("the batch's API key was revoked or has expired"),
            None => Err("the batch's API key no longer exists"),
        })
    }
}
