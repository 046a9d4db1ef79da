//! Admission control: requests per minute, tokens per minute, concurrent requests, a
//! monthly token quota and a monthly spend cap, shared by every replica through the store.
//!
//! Owns: the `limit_counters` and `reservations` tables and the arithmetic over them.
//! Must never: decide what a request costs in the ledger (that is the usage record's job)
//! or let a refused request reach a worker.
//!
//! How it holds under concurrency: every unit a request may use is charged in the store
//! before the request runs. Either the request itself goes to the store (one transaction,
//! batched with others, that locks the counter rows of its scopes, checks every limit and
//! reserves an upper bound of the request's tokens and spend: prompt bound + max
//! completion tokens, priced), or it is admitted in memory from a quota lease (see
//! [`lease`]): a share of each limit that the store already charged to this replica in the
//! same way, as a reservation, bucket level and in-flight slots. Settlement swaps a
//! reservation for the real figures (for a leased request, in memory, reported at the
//! lease's next sync). Because every admitted request is covered by a charge in the store
//! until it settles, concurrent requests on any number of replicas cannot together pass a
//! limit. Leases take at most a quarter of what is left of a limit each time, so close to
//! a limit they shrink to nothing and every request goes to the store. The documented
//! overshoot bound is:
//!
//! - zero while the store answers and usage stays within its reservation (it always does
//!   for the prompt, whose bound is its byte length plus the template's overhead);
//! - plus, for each gateway crash, nothing: its reservations and leases stay counted
//!   until they expire, and are then released (their usage is in the ledger, not in the
//!   counters);
//! - plus what is admitted while the store is unreachable: admission then fails open
//!   (counted by `gateway_admission_fail_open_total`) so an outage does not stop the API.
//!
//! Per-minute limits are leaky buckets, stored as levels in units x 60,000,000 so that
//! the arithmetic is exact in integers and independent of the limit itself.

pub mod lease;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use billing::{period_of, Db, Micros, PriceBook};
use sqlx::Row;

use crate::metrics::GatewayMetrics;
use lease::{Grant, ScopeLease, SyncRequest, Units};

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

impl Counter {
    /// A new period forgets what was used, not what is still reserved.
    fn roll_period(&mut self, period: &str) {
        if self.period != period {
            self.period = period.to_owned();
            self.used_tokens = 0;
            self.used_spend = 0;
        }
    }
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
        const NAMES: [[HeaderName; 3]; 2] = [
            [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
            ],
            [
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
                HeaderName::from_static("x-ratelimit-reset-tokens"),
            ],
        ];
        let states = [self.requests, self.tokens];
        headers.reserve(3 * states.iter().flatten().count());
        for ([limit, remaining, reset], state) in NAMES.into_iter().zip(states) {
            let Some(s) = state else { continue };
            headers.insert(limit, HeaderValue::from(s.limit));
            headers.insert(remaining, HeaderValue::from(s.remaining.max(0)));
            if let Ok(value) = HeaderValue::try_from(format_duration(s.reset_us)) {
                headers.insert(reset, value);
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
    use std::fmt::Write as _;
    let us = us.max(0);
    let mut out = String::with_capacity(16);
    if us < 1_000_000 {
        let _ = write!(out, "{}ms", ceil_div(us, 1000));
        return out;
    }
    let ms = ceil_div(us, 1000);
    let (minutes, rest_ms) = (ms / 60_000, ms % 60_000);
    let (secs, mut frac) = (rest_ms / 1000, rest_ms % 1000);
    if minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{secs}");
    if frac != 0 {
        // Milliseconds as a decimal fraction without trailing zeros: 250 -> ".25".
        let mut digits = 3;
        while frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        let _ = write!(out, ".{frac:0digits$}");
    }
    out.push('s');
    out
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
    next.roll_period(period);
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
///
/// In front of that, each replica holds leases (see [`lease`]): shares of a scope's limits
/// already charged in the store, from which it admits in memory. A request goes to the
/// store only when a lease cannot cover it (a new scope, a lease running short, or a limit
/// too close to its end to be shared out).
pub struct Admission {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    metrics: Arc<GatewayMetrics>,
    store_failed_at: std::sync::Mutex<Option<Instant>>,
    leases: Arc<Leases>,
    close: Mutex<Option<tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>>>,
}

/// This replica's leases, by scope id.
struct Leases {
    map: Mutex<HashMap<String, ScopeLease>>,
    /// Wakes the keeper when a request found a lease short.
    wake: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ScopeLease>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
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
    /// Lease synchronisations, answered with a grant each (in order).
    Sync {
        requests: Vec<SyncRequest>,
        reply: tokio::sync::oneshot::Sender<Result<Vec<Grant>, sqlx::Error>>,
    },
    /// Answered once every job queued before it has been applied.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// How often the keeper looks for leases to synchronise.
const KEEPER_TICK: Duration = Duration::from_millis(25);
/// A lease holding nothing is forgotten after this long unused.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Most jobs applied in one transaction.
const MAX_BATCH: usize = 256;

impl Admission {
    pub fn new(db: Db, metrics: Arc<GatewayMetrics>, reservation_ttl: Duration) -> Arc<Self> {
        let (jobs, rx) = tokio::sync::mpsc::unbounded_channel();
        let replica = format!("lease:{}:", uuid::Uuid::now_v7().simple());
        let applier = Applier {
            db,
            reservation_ttl,
            lease_prefix: replica,
        };
        tokio::spawn(applier.run(rx));
        let leases = Arc::new(Leases {
            map: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let (close, closing) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(keep_leases(leases.clone(), jobs.clone(), closing));
        Arc::new(Self {
            jobs,
            metrics,
            store_failed_at: std::sync::Mutex::new(None),
            leases,
            close: Mutex::new(Some(close)),
        })
    }

    /// Admits from this replica's leases if they cover every scope; otherwise notes the
    /// shortfall (the keeper asks the store for more) and returns `None`.
    fn admit_leased(&self, scopes: &[Scope], demand: Demand) -> Option<Admitted> {
        use std::sync::atomic::Ordering;
        if self.leases.closed.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        let mut map = self.leases.lock();
        let covered = scopes
            .iter()
            .all(|s| map.get(&s.id).is_some_and(|l| l.covers(&s.limits, demand)));
        if !covered {
            for s in scopes {
                let lease = map
                    .entry(s.id.clone())
                    .or_insert_with(|| ScopeLease::new(s.limits, now));
                lease.adopt(s.limits);
                lease.note_shortfall(&s.limits, demand, now);
            }
            // The keeper is woken once this request's own admission is queued (see
            // `admit`), so the store answers it before any grant it triggers.
            return None;
        }
        let now_us = now_us();
        let mut headers = RateHeaders::default();
        for s in scopes {
            if let Some(lease) = map.get_mut(&s.id) {
                let (requests, tokens) = lease.take(demand, now, now_us);
                headers.tighten(requests, tokens);
            }
        }
        drop(map);
        Some(Admitted {
            headers,
            permit: Some(Permit {
                kind: PermitKind::Leased {
                    leases: self.leases.clone(),
                    scopes: scopes.iter().map(|s| s.id.clone()).collect(),
                    bound: demand,
                },
                settled: false,
            }),
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
        if let Some(admitted) = self.admit_leased(&scopes, demand) {
            self.metrics.admissions.with_label_values(&["lease"]).inc();
            return Ok(admitted);
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
        self.leases.wake.notify_one();
        let outcome = match sent {
            Ok(()) => answer.await.unwrap_or(Err(sqlx::Error::PoolClosed)),
            Err(_) => Err(sqlx::Error::PoolClosed),
        };
        self.metrics
            .admission_seconds
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(headers)) => {
                self.metrics.admissions.with_label_values(&["store"]).inc();
                Ok(Admitted {
                    headers,
                    permit: Some(Permit {
                        kind: PermitKind::Store {
                            jobs: self.jobs.clone(),
                            request_id: request_id.to_owned(),
                            scopes,
                        },
                        settled: false,
                    }),
                })
            }
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

    /// Waits until every admission and settlement queued so far is in the store and
    /// every lease is given back: at shutdown, so this replica's reservations and leases
    /// are not left to expire.
    pub async fn flush(&self) {
        let close = self.close.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(close) = close {
            let (done, returned) = tokio::sync::oneshot::channel();
            if close.send(done).is_ok() {
                let _ = returned.await;
            }
        }
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
/// Synchronises this replica's leases with the store: reports settled usage, returns
/// what is no longer needed, tops up leases running short. On a close request it gives
/// every lease back (requests in flight keep their bounds) and stops leasing.
async fn keep_leases(
    leases: Arc<Leases>,
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    mut close: tokio::sync::mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>,
) {
    use std::sync::atomic::Ordering;
    loop {
        let mut closing = None;
        tokio::select! {
            _ = tokio::time::sleep(KEEPER_TICK) => {}
            _ = leases.wake.notified() => {}
            done = close.recv() => {
                leases.closed.store(true, Ordering::Relaxed);
                closing = Some(done);
            }
        }
        let is_closing = closing.is_some() || leases.closed.load(Ordering::Relaxed);
        let now = Instant::now();
        let period = period_of(billing::now_ms());
        let requests: Vec<SyncRequest> = {
            let mut map = leases.lock();
            map.retain(|_, l| !(l.is_empty() && l.idle_for(now) >= FORGET_AFTER));
            map.iter_mut()
                .filter_map(|(scope, l)| l.begin_sync(scope, &period, now, is_closing))
                .collect()
        };
        if !requests.is_empty() {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let sent = jobs.send(Job::Sync {
                requests: requests.clone(),
                reply,
            });
            let grants = match sent {
                Ok(()) => answer.await.unwrap_or(Err(sqlx::Error::PoolClosed)),
                Err(_) => Err(sqlx::Error::PoolClosed),
            };
            let mut map = leases.lock();
            match grants {
                Ok(grants) => {
                    for (request, grant) in requests.iter().zip(grants) {
                        if let Some(l) = map.get_mut(&request.scope) {
                            l.finish_sync(grant);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "synchronising quota leases failed; will retry");
                    for request in &requests {
                        if let Some(l) = map.get_mut(&request.scope) {
                            l.fail_sync(request);
                        }
                    }
                }
            }
        }
        if let Some(Some(done)) = closing {
            let _ = done.send(());
        } else if closing.is_some() {
            return;
        }
    }
}

struct Applier {
    db: Db,
    reservation_ttl: Duration,
    /// `lease:<replica>:`, the reservation id prefix of this replica's leases.
    lease_prefix: String,
}

/// A reservation being settled, as deleted from the store.
struct Settling {
    scopes: Vec<String>,
    tokens: i64,
    spend: i64,
    period: String,
    /// Concurrency slots: 1 for a request, any number for a lease.
    slots: i64,
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
                c.in_flight = (c.in_flight - s.slots).max(0);
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

/// Applies one lease synchronisation to its scope's counter: the usage it reports moves
/// from reserved to used, the store's count of what the lease holds becomes what the
/// replica says it keeps (whatever the store had: an expired lease is counted again),
/// returned per-minute units leave the buckets, and a grant of at most a share of what is
/// left in each limit is charged. Returns the grant and the lease's new row
/// `(tokens, spend, slots)`.
fn sync_lease(
    c: &mut Counter,
    sync: &SyncRequest,
    (held_tokens, held_spend, held_slots): (i64, i64, i64),
    now: i64,
    period: &str,
) -> (Grant, (i64, i64, i64)) {
    let l = &sync.limits;
    c.roll_period(period);
    if c.period == sync.period {
        c.used_tokens = c.used_tokens.saturating_add(sync.used_tokens);
        c.used_spend = c.used_spend.saturating_add(sync.used_spend);
    }
    c.reserved_tokens = (c.reserved_tokens - held_tokens + sync.keep.tokens).max(0);
    c.reserved_spend = (c.reserved_spend - held_spend + sync.keep.spend).max(0);
    c.in_flight = (c.in_flight - held_slots + sync.keep.slots).max(0);
    let drain = |level: i64, limit: Option<i64>| {
        limit.map_or(0, |limit| drained(level, c.levels_at_us, now, limit))
    };
    c.requests_level = (drain(c.requests_level, l.requests_per_minute)
        - sync.returned.requests.saturating_mul(WINDOW_US))
    .max(0);
    c.tokens_level = (drain(c.tokens_level, l.tokens_per_minute)
        - sync.returned.rate_tokens.saturating_mul(WINDOW_US))
    .max(0);
    c.levels_at_us = now;
    let left = Units {
        requests: lease::bucket_room(c.requests_level, l.requests_per_minute),
        rate_tokens: lease::bucket_room(c.tokens_level, l.tokens_per_minute),
        slots: l.max_concurrent.map_or(0, |m| m - c.in_flight),
        tokens: l
            .monthly_tokens
            .map_or(0, |q| q - c.used_tokens - c.reserved_tokens),
        spend: l.monthly_spend_minor.map_or(0, |cap| {
            Micros::from_minor(cap).0 - c.used_spend - c.reserved_spend
        }),
    };
    let g = lease::grant_within(sync.want, left);
    c.requests_level = c
        .requests_level
        .saturating_add(g.requests.saturating_mul(WINDOW_US));
    c.tokens_level = c
        .tokens_level
        .saturating_add(g.rate_tokens.saturating_mul(WINDOW_US));
    c.reserved_tokens = c.reserved_tokens.saturating_add(g.tokens);
    c.reserved_spend = c.reserved_spend.saturating_add(g.spend);
    c.in_flight = c.in_flight.saturating_add(g.slots);
    let grant = Grant {
        granted: g,
        view: lease::BucketView {
            requests_level: c.requests_level,
            tokens_level: c.tokens_level,
            at_us: now,
        },
    };
    (
        grant,
        (
            sync.keep.tokens + g.tokens,
            sync.keep.spend + g.spend,
            sync.keep.slots + g.slots,
        ),
    )
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
    kind: PermitKind,
    settled: bool,
}

enum PermitKind {
    /// Reserved in the store, row by row.
    Store {
        jobs: tokio::sync::mpsc::UnboundedSender<Job>,
        request_id: String,
        scopes: Vec<Scope>,
    },
    /// Taken from this replica's leases.
    Leased {
        leases: Arc<Leases>,
        scopes: Vec<String>,
        bound: Demand,
    },
}

impl Permit {
    /// Settles: in memory for a leased request, queued to the store otherwise; the
    /// client does not wait for it.
    pub fn settle(mut self, used: Demand) {
        self.settle_inner(used);
    }

    fn settle_inner(&mut self, used: Demand) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        match &mut self.kind {
            PermitKind::Store {
                jobs,
                request_id,
                scopes,
            } => {
                let refund_scopes = scopes
                    .iter()
                    .filter(|s| s.limits.tokens_per_minute.is_some())
                    .map(|s| s.id.clone())
                    .collect();
                let _ = jobs.send(Job::Settle {
                    request_id: std::mem::take(request_id),
                    used,
                    refund_scopes,
                });
            }
            PermitKind::Leased {
                leases,
                scopes,
                bound,
            } => {
                let mut map = leases.lock();
                for id in scopes.iter() {
                    if let Some(lease) = map.get_mut(id) {
                        lease.settle(*bound, used);
                    }
                }
            }
        }
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
        assert_eq!(format_duration(0), "0ms");
        assert_eq!(format_duration(-5), "0ms");
        assert_eq!(format_duration(999_999), "1000ms");
        assert_eq!(format_duration(1_005_000), "1.005s");
        assert_eq!(format_duration(1_050_000), "1.05s");
        assert_eq!(format_duration(1_000_001), "1.001s");
        assert_eq!(format_duration(60_000_000), "1m0s");
        assert_eq!(format_duration(125_100_000), "2m5.1s");
    }

    #[test]
    fn next_period_starts_on_the_first_of_the_month() {
        // 2026-11-30T23:59:59Z → one second to December.
        assert_eq!(until_next_period_us(1_796_083_199_000_000), 1_000_000);
    }
}
