//! The batched store transaction behind admission: one task takes every job waiting and
//! applies them all in one transaction that locks each counter row once, like a group
//! commit. Under load a batch holds many requests, so the store sees one transaction per
//! batch instead of two per request; alone, a request waits for one transaction.
//!
//! Owns: the `limit_counters` and `reservations` rows (reading, locking, writing), the
//! order jobs are applied in (settlements, then admissions, then lease syncs), and
//! releasing expired reservations. Must never: change a counter other than through
//! `counter.rs`, or answer a job before its transaction has committed.

use std::collections::BTreeMap;
use std::time::Duration;

use billing::{period_of, Db};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use super::counter::{admit_one, sync_lease, Counter, Settling};
use super::headers::RateHeaders;
use super::lease::{self, Grant, SyncRequest};
use super::model::{Demand, Refusal, Scope};
use billing::period::now_us;

pub(super) type AdmitReply = Result<Result<RateHeaders, Refusal>, sqlx::Error>;

/// Work for the applier, sent by admission, permits, the lease keeper and the sweeper.
pub(super) enum Job {
    Admit {
        request_id: String,
        scopes: Vec<Scope>,
        demand: Demand,
        reply: oneshot::Sender<AdmitReply>,
    },
    Settle {
        request_id: String,
        used: Demand,
        /// Scopes whose tokens-per-minute bucket gets back what was reserved and unused.
        refund_scopes: Vec<String>,
    },
    /// Lease synchronisations, answered with a grant each (in order).
    Sync {
        requests: Vec<SyncRequest>,
        reply: oneshot::Sender<Result<Vec<Grant>, sqlx::Error>>,
    },
    /// Answered once every job queued before it has been applied.
    Flush(oneshot::Sender<()>),
}

/// Most jobs applied in one transaction.
const MAX_BATCH: usize = 256;

/// Starts the applier task; admission jobs go to the returned sender.
pub(super) fn start(db: Db, reservation_ttl: Duration) -> mpsc::UnboundedSender<Job> {
    let (jobs, rx) = mpsc::unbounded_channel();
    let applier = Applier {
        db,
        reservation_ttl,
        lease_prefix: format!("lease:{}:", uuid::Uuid::now_v7().simple()),
    };
    tokio::spawn(applier.run(rx));
    jobs
}

/// The task that applies admission jobs in batches.
struct Applier {
    db: Db,
    reservation_ttl: Duration,
    /// `lease:<replica>:`, the reservation id prefix of this replica's leases.
    lease_prefix: String,
}

impl Applier {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let mut admits = Vec::new();
            let mut settles = Vec::new();
            let mut flushes = Vec::new();
            let mut syncs = Vec::new();
            for job in batch {
                match job {
                    Job::Admit {
                        request_id,
                        scopes,
                        demand,
                        reply,
                    } => admits.push((request_id, scopes, demand, reply)),
                    Job::Settle {
                        request_id,
                        used,
                        refund_scopes,
                    } => settles.push((request_id, used, refund_scopes)),
                    Job::Flush(done) => flushes.push(done),
                    Job::Sync { requests, reply } => syncs.push((requests, reply)),
                }
            }
            let sync_requests: Vec<&SyncRequest> =
                syncs.iter().flat_map(|(r, _)| r.iter()).collect();
            let requests: Vec<(&str, &[Scope], Demand)> = admits
                .iter()
                .map(|(id, scopes, demand, _)| (id.as_str(), scopes.as_slice(), *demand))
                .collect();
            let outcome = if requests.is_empty() && settles.is_empty() && sync_requests.is_empty() {
                Ok((Vec::new(), Vec::new()))
            } else {
                self.apply(&requests, &settles, &sync_requests).await
            };
            match outcome {
                Ok((answers, grants)) => {
                    for ((_, _, _, reply), answer) in admits.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
                    }
                    let mut grants = grants.into_iter();
                    for (requests, reply) in syncs {
                        let mine: Vec<Grant> = grants.by_ref().take(requests.len()).collect();
                        let _ = reply.send(Ok(mine));
                    }
                }
                Err(e) => {
                    if !settles.is_empty() {
                        // Those reservations stay counted until they expire.
                        tracing::warn!(error = %e, count = settles.len(), "settling reservations failed");
                    }
                    let message = e.to_string();
                    for (_, _, _, reply) in admits {
                        let _ = reply.send(Err(sqlx::Error::Protocol(message.clone())));
                    }
                    for (_, reply) in syncs {
                        let _ = reply.send(Err(sqlx::Error::Protocol(message.clone())));
                    }
                }
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// One transaction: settle, synchronise leases, then admit in order; answers per
    /// admission and grants per lease.
    async fn apply(
        &self,
        admits: &[(&str, &[Scope], Demand)],
        settles: &[(String, Demand, Vec<String>)],
        syncs: &[&SyncRequest],
    ) -> Result<(Vec<Result<RateHeaders, Refusal>>, Vec<Grant>), sqlx::Error> {
        let pg = self.db.is_postgres();
        let mut tx = self.db.counters().begin().await?;
        // Settlements first: their reservations say which scopes they hold.
        let mut settling = Vec::new();
        for (request_id, used, refund_scopes) in settles {
            let row = sqlx::query(
                "DELETE FROM reservations WHERE request_id = $1 \
                 RETURNING scopes, tokens, spend, period, slots",
            )
            .bind(request_id)
            .fetch_optional(&mut *tx)
            .await?;
            // None: already released (expired, or settled before).
            if let Some(row) = row {
                let scopes: String = row.try_get("scopes")?;
                settling.push(Settling {
                    scopes: scopes
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    tokens: row.try_get("tokens")?,
                    spend: row.try_get("spend")?,
                    period: row.try_get("period")?,
                    slots: row.try_get("slots")?,
                    used: *used,
                    refund_scopes: refund_scopes.clone(),
                });
            }
        }
        // Every counter row this batch touches, locked once, always in the same order.
        let mut ids: Vec<String> = admits
            .iter()
            .flat_map(|(_, scopes, _)| scopes.iter().map(|s| s.id.clone()))
            .chain(settling.iter().flat_map(|s| s.scopes.iter().cloned()))
            .chain(syncs.iter().map(|s| s.scope.clone()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut counters: BTreeMap<String, Counter> = BTreeMap::new();
        for id in &ids {
            if !pg {
                ensure_row(&mut tx, id).await?;
            }
            let mut counter = read_counter(&mut tx, id, pg).await?;
            if counter.is_none() {
                ensure_row(&mut tx, id).await?;
                counter = read_counter(&mut tx, id, pg).await?;
            }
            counters.insert(id.clone(), counter.unwrap_or_default());
        }
        let original = counters.clone();
        for s in &settling {
            for id in &s.scopes {
                if let Some(c) = counters.get_mut(id) {
                    c.release(s, s.refund_scopes.contains(id));
                }
            }
        }
        let now = now_us();
        let period = period_of(now / 1000);
        let expires_at = now / 1000 + self.reservation_ttl.as_millis() as i64;
        let mut answers = Vec::with_capacity(admits.len());
        let mut reserved: Vec<(&str, String, Demand)> = Vec::new();
        for (request_id, scopes, demand) in admits {
            let answer = admit_one(&mut counters, scopes, *demand, now, &period);
            if answer.is_ok() {
                let ids: Vec<&str> = scopes.iter().map(|s| s.id.as_str()).collect();
                reserved.push((request_id, ids.join(" "), *demand));
            }
            answers.push(answer);
        }
        // Leases after admissions: a request that found its lease short and came here
        // is answered with the store as it was before this batch's grants.
        let mut grants = Vec::with_capacity(syncs.len());
        let mut lease_rows = Vec::with_capacity(syncs.len());
        for sync in syncs {
            let id = format!("{}{}", self.lease_prefix, sync.scope);
            let held =
                sqlx::query("SELECT tokens, spend, slots FROM reservations WHERE request_id = $1")
                    .bind(&id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let held = match held {
                Some(row) => (
                    row.try_get::<i64, _>("tokens")?,
                    row.try_get::<i64, _>("spend")?,
                    row.try_get::<i64, _>("slots")?,
                ),
                None => (0, 0, 0),
            };
            let Some(c) = counters.get_mut(&sync.scope) else {
                // Never: every sync's scope was read above. Keep grants aligned.
                grants.push(Grant::default());
                continue;
            };
            let (grant, row) = sync_lease(c, sync, held, now, &period);
            grants.push(grant);
            lease_rows.push((id, row));
        }
        for (id, c) in &counters {
            if original.get(id) == Some(c) {
                continue;
            }
            sqlx::query(
                "UPDATE limit_counters SET requests_level = $1, tokens_level = $2, \
                 levels_at_us = $3, in_flight = $4, period = $5, used_tokens = $6, \
                 reserved_tokens = $7, used_spend = $8, reserved_spend = $9 WHERE scope = $10",
            )
            .bind(c.requests_level)
            .bind(c.tokens_level)
            .bind(c.levels_at_us)
            .bind(c.in_flight)
            .bind(&c.period)
            .bind(c.used_tokens)
            .bind(c.reserved_tokens)
            .bind(c.used_spend)
            .bind(c.reserved_spend)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        for chunk in reserved.chunks(100) {
            let mut sql = String::from(
                "INSERT INTO reservations (request_id, scopes, tokens, spend, period, expires_at) VALUES ",
            );
            for i in 0..chunk.len() {
                let b = i * 6;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6
                ));
            }
            let mut query = sqlx::query(&sql);
            for (request_id, scopes, demand) in chunk {
                query = query
                    .bind(*request_id)
                    .bind(scopes.as_str())
                    .bind(demand.tokens)
                    .bind(demand.spend.0)
                    .bind(period.as_str())
                    .bind(expires_at);
            }
            query.execute(&mut *tx).await?;
        }
        for (id, (tokens, spend, slots)) in &lease_rows {
            if *tokens == 0 && *spend == 0 && *slots == 0 {
                sqlx::query("DELETE FROM reservations WHERE request_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                continue;
            }
            let scope = id.strip_prefix(&self.lease_prefix).unwrap_or(id);
            sqlx::query(
                "INSERT INTO reservations (request_id, scopes, tokens, spend, period, expires_at, slots) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (request_id) DO UPDATE SET \
                 tokens = excluded.tokens, spend = excluded.spend, period = excluded.period, \
                 expires_at = excluded.expires_at, slots = excluded.slots",
            )
            .bind(id.as_str())
            .bind(scope)
            .bind(*tokens)
            .bind(*spend)
            .bind(period.as_str())
            .bind(now / 1000 + lease::LEASE_TTL.as_millis() as i64)
            .bind(*slots)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok((answers, grants))
    }
}

async fn ensure_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    scope: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO limit_counters (scope) VALUES ($1) ON CONFLICT (scope) DO NOTHING")
        .bind(scope)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn read_counter(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    scope: &str,
    lock: bool,
) -> Result<Option<Counter>, sqlx::Error> {
    let sql = if lock {
        "SELECT requests_level, tokens_level, levels_at_us, in_flight, period, used_tokens, \
         reserved_tokens, used_spend, reserved_spend FROM limit_counters WHERE scope = $1 FOR UPDATE"
    } else {
        "SELECT requests_level, tokens_level, levels_at_us, in_flight, period, used_tokens, \
         reserved_tokens, used_spend, reserved_spend FROM limit_counters WHERE scope = $1"
    };
    let Some(r) = sqlx::query(sql)
        .bind(scope)
        .fetch_optional(&mut **tx)
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(Counter {
        requests_level: r.try_get("requests_level")?,
        tokens_level: r.try_get("tokens_level")?,
        levels_at_us: r.try_get("levels_at_us")?,
        in_flight: r.try_get("in_flight")?,
        period: r.try_get("period")?,
        used_tokens: r.try_get("used_tokens")?,
        reserved_tokens: r.try_get("reserved_tokens")?,
        used_spend: r.try_get("used_spend")?,
        reserved_spend: r.try_get("reserved_spend")?,
    }))
}

/// Releases expired reservations every `every`: those of crashed replicas, or of requests
/// that outlived the timeout. Each is settled as "nothing used" through the applier.
pub(super) fn spawn_sweeper(
    jobs: mpsc::UnboundedSender<Job>,
    db: Db,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let expired = sqlx::query(
                "SELECT request_id FROM reservations WHERE expires_at < $1 \
                 ORDER BY expires_at LIMIT 500",
            )
            .bind(billing::now_ms())
            .fetch_all(db.counters())
            .await;
            match expired {
                Ok(rows) => {
                    if !rows.is_empty() {
                        tracing::info!(count = rows.len(), "releasing expired reservations");
                    }
                    for row in rows {
                        if let Ok(request_id) = row.try_get::<String, _>("request_id") {
                            let _ = jobs.send(Job::Settle {
                                request_id,
                                used: Demand::default(),
                                refund_scopes: Vec::new(),
                            });
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "listing expired reservations failed"),
            }
        }
    })
}
