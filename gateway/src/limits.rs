//! Admission control: requests per minute, tokens per minute, concurrent requests, a
//! monthly token quota and a monthly spend cap, shared by every replica through the store.
//!
//! Owns: the `limit_counters` and `reservations` tables and the arithmetic over them.
//! Must never: decide what a request costs in the ledger (that is the usage record's job)
//! or let a refused request reach a worker.
//!
//! How it holds under concurrency: admission is one transaction that locks the counter
//! rows of the request's scopes (the tenant's plan, and the key when the key narrows it),
//! checks every limit, and reserves an upper bound of the request's tokens and spend
//! (prompt bound + max completion tokens, priced). Settlement, when the usage is known,
//! swaps the reservation for the real figures. Because every admitted request holds its
//! upper bound until it settles, concurrent requests on any number of replicas cannot
//! together pass a quota or spend cap. The documented overshoot bound is:
//!
//! - zero while the store answers and usage stays within its reservation (it always does
//!   for the prompt, whose bound is its byte length plus the template's overhead);
//! - plus, for each gateway crash, nothing: its reservations stay counted until they
//!   expire, and are then released (their usage is in the ledger, not in the counters);
//! - plus what is admitted while the store is unreachable: admission then fails open
//!   (counted by `gateway_admission_fail_open_total`) so an outage does not stop the API.
//!
//! Per-minute limits are leaky buckets, stored as levels in units x 60,000,000 so that
//! the arithmetic is exact in integers and independent of the limit itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use billing::{period_of, Db, Micros, PriceBook};
use sqlx::Row;

use crate::metrics::GatewayMetrics;

/// Microseconds in the per-minute limits' window.
const WINDOW_US: i64 = 60_000_000;

/// The most seconds a 429 tells a client to wait (SPEC §3).
pub const MAX_RETRY_AFTER_SECS: u64 = 120;

/// How long after a store error admission fails open without asking the store again.
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Limits of a plan or a key; `None` is "no limit".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub requests_per_minute: Option<i64>,
    pub tokens_per_minute: Option<i64>,
    pub max_concurrent: Option<i64>,
    pub monthly_tokens: Option<i64>,
    /// In minor units of the price book's currency.
    pub monthly_spend_minor: Option<i64>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
    MonthlyTokens,
    MonthlySpend,
}

impl LimitKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests_per_minute",
            Self::Tokens => "tokens_per_minute",
            Self::Concurrency => "concurrent_requests",
            Self::MonthlyTokens => "monthly_tokens",
            Self::MonthlySpend => "monthly_spend",
        }
    }

    /// Quotas answer `insufficient_quota`; rate limits `rate_limit_exceeded`.
    pub fn is_quota(self) -> bool {
        matches!(self, Self::MonthlyTokens | Self::MonthlySpend)
    }
}

/// What a request may cost at most, reserved at admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub tokens: i64,
    pub spend: Micros,
}

/// A scope's counters as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Counter {
    requests_level: i64,
    tokens_level: i64,
    levels_at_us: i64,
    in_flight: i64,
    period: String,
    used_tokens: i64,
    reserved_tokens: i64,
    used_spend: i64,
    reserved_spend: i64,
}

/// One per-minute limit's state for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    pub limit: i64,
    pub remaining: i64,
    /// Until the bucket is empty again (full allowance).
    pub reset_us: i64,
}

/// The `x-ratelimit-*` headers of a response: the tightest scope per dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<RateState>,
    pub tokens: Option<RateState>,
}

impl RateHeaders {
    fn tighten(&mut self, requests: Option<RateState>, tokens: Option<RateState>) {
        let pick = |a: Option<RateState>, b: Option<RateState>| match (a, b) {
            (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
            (a, b) => a.or(b),
        };
        self.requests = pick(self.requests, requests);
        self.tokens = pick(self.tokens, tokens);
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for (dimension, state) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(s) = state else { continue };
            let values = [
                ("limit", s.limit.to_string()),
                ("remaining", s.remaining.max(0).to_string()),
                ("reset", format_duration(s.reset_us)),
            ];
            for (what, value) in values {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::try_from(format!("x-ratelimit-{what}-{dimension}")),
                    HeaderValue::try_from(value),
                ) {
                    headers.insert(name, value);
                }
            }
        }
    }
}

/// `a / b` rounded up, for `a >= 0`, `b > 0`.
fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// `6m0s`, `1.5s`, `120ms`: the duration style of OpenAI's reset headers.
fn format_duration(us: i64) -> String {
    let us = us.max(0);
    if us < 1_000_000 {
        return format!("{}ms", ceil_div(us, 1000));
    }
    let ms = ceil_div(us, 1000);
    let minutes = ms / 60_000;
    let rest_ms = ms % 60_000;
    let secs = rest_ms / 1000;
    let frac = rest_ms % 1000;
    let secs = if frac == 0 {
        format!("{secs}s")
    } else {
        let digits = format!("{frac:03}");
        format!("{secs}.{}s", digits.trim_end_matches('0'))
    };
    if minutes > 0 {
        format!("{minutes}m{secs}")
    } else {
        secs
    }
}

/// Why a request was refused, with what the client is told.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub kind: LimitKind,
    pub retry_after_secs: u64,
    pub headers: RateHeaders,
    pub message: String,
}

/// A limited scope of one request: its counter row and the limits that apply to it.
#[derive(Debug, Clone)]
pub struct Scope {
    pub id: String,
    pub limits: Limits,
}

impl Scope {
    pub fn tenant(tenant_id: &str, limits: Limits) -> Self {
        Self {
            id: format!("t:{tenant_id}"),
            limits,
        }
    }

    pub fn key(key_id: &str, limits: Limits) -> Self {
        Self {
            id: format!("k:{key_id}"),
            limits,
        }
    }
}

/// Leaky-bucket level after draining from `at_us` to `now_us` at `limit` per window.
fn drained(level: i64, at_us: i64, now_us: i64, limit: i64) -> i64 {
    let elapsed = (now_us - at_us).max(0) as i128;
    (level as i128 - elapsed * limit as i128).max(0) as i64
}

fn rate_state(level: i64, limit: i64) -> RateState {
    let capacity = limit.saturating_mul(WINDOW_US);
    RateState {
        limit,
        remaining: (capacity - level).max(0) / WINDOW_US,
        reset_us: level / limit.max(1),
    }
}

/// A scope that passed: its new counter and its request and token header states.
type Checked = (Counter, Option<RateState>, Option<RateState>);
/// A scope that refused: the limit, microseconds to wait, the message.
type Denied = (LimitKind, i64, String);

/// Checks one scope; on success returns the new counter and its header states.
fn check(
    counter: &Counter,
    limits: &Limits,
    demand: Demand,
    now_us: i64,
    period: &str,
) -> Result<Checked, Denied> {
    let mut next = counter.clone();
    if next.period != period {
        next.period = period.to_owned();
        next.used_tokens = 0;
        next.used_spend = 0;
    }
    if let Some(max) = limits.max_concurrent {
        if next.in_flight >= max {
            return Err((
                LimitKind::Concurrency,
                1_000_000,
                format!("Too many concurrent requests: the limit is {max}."),
            ));
        }
    }
    let mut states = (None, None);
    let buckets = [
        (
            limits.requests_per_minute,
            &mut next.requests_level,
            1,
            LimitKind::Requests,
        ),
        (
            limits.tokens_per_minute,
            &mut next.tokens_level,
            demand.tokens,
            LimitKind::Tokens,
        ),
    ];
    for (i, (limit, level, units, kind)) in buckets.into_iter().enumerate() {
        let Some(limit) = limit else { continue };
        let current = drained(*level, counter.levels_at_us, now_us, limit);
        let wanted = current.saturating_add(units.saturating_mul(WINDOW_US));
        let capacity = limit.saturating_mul(WINDOW_US);
        if units > limit {
            return Err((
                kind,
                WINDOW_US,
                format!(
                    "This request may use up to {units} tokens, more than the limit of {limit} tokens per minute; lower max_tokens or the input."
                ),
            ));
        }
        if wanted > capacity {
            let wait_us = ceil_div(wanted - capacity, limit);
            let what = if kind == LimitKind::Requests {
                "requests"
            } else {
                "tokens"
            };
            return Err((
                kind,
                wait_us,
                format!("Rate limit reached: {limit} {what} per minute."),
            ));
        }
        *level = wanted;
        let state = rate_state(wanted, limit);
        if i == 0 {
            states.0 = Some(state);
        } else {
            states.1 = Some(state);
        }
    }
    // Levels of unlimited dimensions drain too, so a limit added later starts fresh.
    if limits.requests_per_minute.is_none() {
        next.requests_level = 0;
    }
    if limits.tokens_per_minute.is_none() {
        next.tokens_level = 0;
    }
    next.levels_at_us = now_us;
    if let Some(quota) = limits.monthly_tokens {
        let committed = next.used_tokens.saturating_add(next.reserved_tokens);
        if committed.saturating_add(demand.tokens) > quota {
            return Err((
                LimitKind::MonthlyTokens,
                until_next_period_us(now_us),
                format!(
                    "Monthly token quota reached: {committed} of {quota} tokens used or reserved; this request may use up to {}.",
                    demand.tokens
                ),
            ));
        }
    }
    if let Some(cap) = limits.monthly_spend_minor {
        let cap = Micros::from_minor(cap).0;
        let committed = next.used_spend.saturating_add(next.reserved_spend);
        if committed.saturating_add(demand.spend.0) > cap {
            return Err((
                LimitKind::MonthlySpend,
                until_next_period_us(now_us),
                "Monthly spend cap reached.".to_owned(),
            ));
        }
    }
    next.in_flight += 1;
    next.reserved_tokens = next.reserved_tokens.saturating_add(demand.tokens);
    next.reserved_spend = next.reserved_spend.saturating_add(demand.spend.0);
    Ok((next, states.0, states.1))
}

fn until_next_period_us(now_us: i64) -> i64 {
    let now = time::OffsetDateTime::from_unix_timestamp(now_us.div_euclid(1_000_000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let (year, month) = match now.month() {
        time::Month::December => (now.year() + 1, time::Month::January),
        m => (now.year(), m.next()),
    };
    time::Date::from_calendar_date(year, month, 1)
        .map(|d| d.midnight().assume_utc().unix_timestamp() * 1_000_000 - now_us)
        .unwrap_or(WINDOW_US)
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The price book as admission reads it, reloaded from the store in the background.
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

/// Admission against the shared counters.
///
/// Admissions and settlements are applied in batches, like a group commit: one task takes
/// every job waiting, and applies them all in one transaction that locks each counter row
/// once. Under load a batch holds many requests, so the store sees one transaction per
/// batch instead of two per request; alone, a request waits for one transaction.
pub struct Admission {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    metrics: Arc<GatewayMetrics>,
    store_failed_at: std::sync::Mutex<Option<Instant>>,
}

/// An admitted request: the headers to send and the reservation to settle.
pub struct Admitted {
    pub headers: RateHeaders,
    pub permit: Option<Permit>,
}

type AdmitReply = Result<Result<RateHeaders, Refusal>, sqlx::Error>;

enum Job {
    Admit {
        request_id: String,
        scopes: Vec<Scope>,
        demand: Demand,
        reply: tokio::sync::oneshot::Sender<AdmitReply>,
    },
    Settle {
        request_id: String,
        used: Demand,
        /// Scopes whose tokens-per-minute bucket gets back what was reserved and unused.
        refund_scopes: Vec<String>,
    },
    /// Answered once every job queued before it has been applied.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Most jobs applied in one transaction.
const MAX_BATCH: usize = 256;

impl Admission {
    pub fn new(db: Db, metrics: Arc<GatewayMetrics>, reservation_ttl: Duration) -> Arc<Self> {
        let (jobs, rx) = tokio::sync::mpsc::unbounded_channel();
        let applier = Applier {
            db,
            reservation_ttl,
        };
        tokio::spawn(applier.run(rx));
        Arc::new(Self {
            jobs,
            metrics,
            store_failed_at: std::sync::Mutex::new(None),
        })
    }

    /// Checks and reserves `demand` in every scope, or refuses with the first limit hit.
    pub async fn admit(
        self: &Arc<Self>,
        request_id: &str,
        tenant_id: &str,
        mut scopes: Vec<Scope>,
        demand: Demand,
    ) -> Result<Admitted, Refusal> {
        scopes.retain(|s| !s.limits.is_unlimited());
        let unchecked = || {
            Ok(Admitted {
                headers: RateHeaders::default(),
                permit: None,
            })
        };
        if scopes.is_empty() {
            return unchecked();
        }
        let recently_failed = self
            .store_failed_at
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < STORE_RETRY_AFTER);
        if recently_failed {
            self.metrics.admission_fail_open.inc();
            return unchecked();
        }
        let started = Instant::now();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self.jobs.send(Job::Admit {
            request_id: request_id.to_owned(),
            scopes: scopes.clone(),
            demand,
            reply,
        });
        let outcome = match sent {
            Ok(()) => answer.await.unwrap_or(Err(sqlx::Error::PoolClosed)),
            Err(_) => Err(sqlx::Error::PoolClosed),
        };
        self.metrics
            .admission_seconds
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(headers)) => Ok(Admitted {
                headers,
                permit: Some(Permit {
                    jobs: self.jobs.clone(),
                    request_id: request_id.to_owned(),
                    scopes,
                    settled: false,
                }),
            }),
            Ok(Err(refusal)) => {
                self.metrics
                    .limit_rejections
                    .with_label_values(&[tenant_id, refusal.kind.label()])
                    .inc();
                Err(refusal)
            }
            Err(e) => {
                tracing::warn!(error = %e, "limit store unreachable; admitting without limits");
                if let Ok(mut t) = self.store_failed_at.lock() {
                    *t = Some(Instant::now());
                }
                self.metrics.admission_fail_open.inc();
                unchecked()
            }
        }
    }

    /// Waits until every admission and settlement queued so far is in the store: at
    /// shutdown, so this replica's reservations are not left to expire.
    pub async fn flush(&self) {
        let (done, finished) = tokio::sync::oneshot::channel();
        if self.jobs.send(Job::Flush(done)).is_ok() {
            let _ = finished.await;
        }
    }

    /// Releases expired reservations every `every`: those of crashed replicas, or of
    /// requests that outlived the timeout.
    pub fn spawn_sweeper(self: &Arc<Self>, db: Db, every: Duration) -> tokio::task::JoinHandle<()> {
        let jobs = self.jobs.clone();
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
}

/// The task that applies admission jobs in batches.
struct Applier {
    db: Db,
    reservation_ttl: Duration,
}

/// A reservation being settled, as deleted from the store.
struct Settling {
    scopes: Vec<String>,
    tokens: i64,
    spend: i64,
    period: String,
    used: Demand,
    refund_scopes: Vec<String>,
}

impl Applier {
    async fn run(self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Job>) {
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
                }
            }
            let requests: Vec<(&str, &[Scope], Demand)> = admits
                .iter()
                .map(|(id, scopes, demand, _)| (id.as_str(), scopes.as_slice(), *demand))
                .collect();
            let outcome = if requests.is_empty() && settles.is_empty() {
                Ok(Vec::new())
            } else {
                self.apply(&requests, &settles).await
            };
            match outcome {
                Ok(answers) => {
                    for ((_, _, _, reply), answer) in admits.into_iter().zip(answers) {
                        let _ = reply.send(Ok(answer));
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
                }
            }
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// One transaction: settle, then admit in order; answers per admission.
    async fn apply(
        &self,
        admits: &[(&str, &[Scope], Demand)],
        settles: &[(String, Demand, Vec<String>)],
    ) -> Result<Vec<Result<RateHeaders, Refusal>>, sqlx::Error> {
        let pg = self.db.is_postgres();
        let mut tx = self.db.counters().begin().await?;
        // Settlements first: their reservations say which scopes they hold.
        let mut settling = Vec::new();
        for (request_id, used, refund_scopes) in settles {
            let row = sqlx::query(
                "DELETE FROM reservations WHERE request_id = $1 \
                 RETURNING scopes, tokens, spend, period",
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
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut counters: std::collections::BTreeMap<String, Counter> = Default::default();
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
            let unused = (s.tokens - s.used.tokens).max(0);
            for id in &s.scopes {
                let Some(c) = counters.get_mut(id) else {
                    continue;
                };
                c.in_flight = (c.in_flight - 1).max(0);
                c.reserved_tokens = (c.reserved_tokens - s.tokens).max(0);
                c.reserved_spend = (c.reserved_spend - s.spend).max(0);
                if c.period == s.period {
                    c.used_tokens = c.used_tokens.saturating_add(s.used.tokens);
                    c.used_spend = c.used_spend.saturating_add(s.used.spend.0);
                }
                if s.refund_scopes.contains(id) {
                    c.tokens_level = (c.tokens_level - unused.saturating_mul(WINDOW_US)).max(0);
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
        tx.commit().await?;
        Ok(answers)
    }
}

/// Checks one request against its scopes' counters; on success updates them.
fn admit_one(
    counters: &mut std::collections::BTreeMap<String, Counter>,
    scopes: &[Scope],
    demand: Demand,
    now: i64,
    period: &str,
) -> Result<RateHeaders, Refusal> {
    let mut headers = RateHeaders::default();
    let mut updated = Vec::with_capacity(scopes.len());
    for scope in scopes {
        let counter = counters.get(&scope.id).cloned().unwrap_or_default();
        match check(&counter, &scope.limits, demand, now, period) {
            Ok((next, requests, tokens)) => {
                headers.tighten(requests, tokens);
                updated.push((scope.id.clone(), next));
            }
            Err((kind, wait_us, message)) => {
                // Headers of a refusal show the state without this request.
                let mut headers = RateHeaders::default();
                for scope in scopes {
                    let counter = counters.get(&scope.id).cloned().unwrap_or_default();
                    let state = |limit: Option<i64>, level: i64| {
                        limit.map(|l| rate_state(drained(level, counter.levels_at_us, now, l), l))
                    };
                    headers.tighten(
                        state(scope.limits.requests_per_minute, counter.requests_level),
                        state(scope.limits.tokens_per_minute, counter.tokens_level),
                    );
                }
                let retry_after_secs = (wait_us.max(1) as u64)
                    .div_ceil(1_000_000)
                    .clamp(1, MAX_RETRY_AFTER_SECS);
                return Err(Refusal {
                    kind,
                    retry_after_secs,
                    headers,
                    message,
                });
            }
        }
    }
    for (id, next) in updated {
        counters.insert(id, next);
    }
    Ok(headers)
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

/// An admitted request's reservation. Settle it with the real usage; dropped unsettled,
/// it settles as "nothing used" (the request failed before any usage was recorded).
pub struct Permit {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    request_id: String,
    scopes: Vec<Scope>,
    settled: bool,
}

impl Permit {
    /// Queues the settlement: the client does not wait for it.
    pub fn settle(mut self, used: Demand) {
        self.settle_inner(used);
    }

    fn settle_inner(&mut self, used: Demand) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let refund_scopes = self
            .scopes
            .iter()
            .filter(|s| s.limits.tokens_per_minute.is_some())
            .map(|s| s.id.clone())
            .collect();
        let _ = self.jobs.send(Job::Settle {
            request_id: std::mem::take(&mut self.request_id),
            used,
            refund_scopes,
        });
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.settle_inner(Demand::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_000_000_000_000;

    fn limits() -> Limits {
        Limits::default()
    }

    fn demand(tokens: i64) -> Demand {
        Demand {
            tokens,
            spend: Micros(0),
        }
    }

    #[test]
    fn requests_per_minute_allow_a_full_burst_then_refuse() {
        let l = Limits {
            requests_per_minute: Some(7),
            ..limits()
        };
        let mut c = Counter::default();
        for i in 0..7 {
            let (next, requests, _) = check(&c, &l, demand(1), NOW, "2026-11").unwrap();
            assert_eq!(requests.unwrap().remaining, 6 - i);
            c = next;
            c.in_flight = 0;
        }
        let (kind, wait_us, _) = check(&c, &l, demand(1), NOW, "2026-11").unwrap_err();
        assert_eq!(kind, LimitKind::Requests);
        // One request drains in 60/7 s.
        assert_eq!(wait_us, ceil_div(60_000_000, 7));
        assert!(check(&c, &l, demand(1), NOW + wait_us, "2026-11").is_ok());
        assert!(check(&c, &l, demand(1), NOW + wait_us - 1, "2026-11").is_err());
    }

    #[test]
    fn tokens_per_minute_count_the_demand_and_refuse_oversized_requests() {
        let l = Limits {
            tokens_per_minute: Some(1000),
            ..limits()
        };
        let c = Counter::default();
        let (c, _, tokens) = check(&c, &l, demand(600), NOW, "p").unwrap();
        assert_eq!(tokens.unwrap().remaining, 400);
        assert_eq!(tokens.unwrap().reset_us, 36_000_000);
        assert_eq!(
            check(&c, &l, demand(500), NOW, "p").unwrap_err().0,
            LimitKind::Tokens
        );
        assert!(check(&c, &l, demand(400), NOW, "p").is_ok());
        assert_eq!(
            check(&Counter::default(), &l, demand(1001), NOW, "p")
                .unwrap_err()
                .0,
            LimitKind::Tokens
        );
    }

    #[test]
    fn concurrency_counts_in_flight_requests() {
        let l = Limits {
            max_concurrent: Some(2),
            ..limits()
        };
        let c = Counter::default();
        let (c, _, _) = check(&c, &l, demand(1), NOW, "p").unwrap();
        let (c, _, _) = check(&c, &l, demand(1), NOW, "p").unwrap();
        assert_eq!(c.in_flight, 2);
        assert_eq!(
            check(&c, &l, demand(1), NOW, "p").unwrap_err().0,
            LimitKind::Concurrency
        );
    }

    #[test]
    fn the_monthly_quota_counts_reservations_and_resets_with_the_period() {
        let l = Limits {
            monthly_tokens: Some(100),
            ..limits()
        };
        let c = Counter {
            period: "2026-11".into(),
            used_tokens: 50,
            reserved_tokens: 30,
            ..Counter::default()
        };
        assert!(check(&c, &l, demand(20), NOW, "2026-11").is_ok());
        assert_eq!(
            check(&c, &l, demand(21), NOW, "2026-11").unwrap_err().0,
            LimitKind::MonthlyTokens
        );
        // A new month forgets what was used, not what is still reserved.
        let (next, _, _) = check(&c, &l, demand(70), NOW, "2026-12").unwrap();
        assert_eq!((next.used_tokens, next.reserved_tokens), (0, 100));
    }

    #[test]
    fn the_spend_cap_is_in_exact_micros() {
        let l = Limits {
            monthly_spend_minor: Some(1),
            ..limits()
        };
        let c = Counter {
            period: "p".into(),
            used_spend: 999_999,
            ..Counter::default()
        };
        let one = Demand {
            tokens: 1,
            spend: Micros(1),
        };
        let (c, _, _) = check(&c, &l, one, NOW, "p").unwrap();
        assert_eq!(
            check(&c, &l, one, NOW, "p").unwrap_err().0,
            LimitKind::MonthlySpend
        );
    }

    #[test]
    fn reset_durations_read_like_openai_headers() {
        assert_eq!(format_duration(120_000), "120ms");
        assert_eq!(format_duration(1_500_000), "1.5s");
        assert_eq!(format_duration(360_000_000), "6m0s");
        assert_eq!(format_duration(61_250_000), "1m1.25s");
    }

    #[test]
    fn next_period_starts_on_the_first_of_the_month() {
        // 2026-11-30T23:59:59Z → one second to December.
        assert_eq!(until_next_period_us(1_796_083_199_000_000), 1_000_000);
    }
}
