//! The gateway's Prometheus series, served on their own listener (never the consumer one:
//! they name tenants).

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Figures other parts keep, read when `/metrics` is scraped.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub workers: Vec<WorkerStats>,
    /// Usage events read from the spool but not yet in the store.
    pub spool_backlog: u64,
    pub usage_shipped: u64,
    pub usage_ship_failures: u64,
    /// Running totals since start (the counters are advanced to them).
    pub spool_durable_appends: u64,
    pub spool_fsyncs: u64,
}

#[derive(Debug)]
pub struct WorkerStats {
    pub base_url: String,
    pub healthy: bool,
    pub outstanding: usize,
}

pub struct GatewayMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub tokens: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub upstream_retries: IntCounter,
    pub worker_up: IntGaugeVec,
    pub worker_outstanding: IntGaugeVec,
    pub spool_backlog: IntGauge,
    pub usage_shipped: IntGauge,
    pub spool_durable_appends: IntCounter,
    pub spool_fsyncs: IntCounter,
    pub usage_ship_failures: IntGauge,
    pub limit_rejections: IntCounterVec,
    pub admission_fail_open: IntCounter,
    pub admission_fail_closed: IntCounter,
    pub admission_seconds: prometheus::Histogram,
    /// Admissions by where they were decided: `lease` (in memory) or `store`.
    pub admissions: IntCounterVec,
    /// Open connections and those refused at the cap, by listener (`consumer`, `admin`).
    pub open_connections: IntGaugeVec,
    pub refused_connections: IntCounterVec,
}

impl GatewayMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("gateway_http_requests_total", "Consumer requests answered"),
            &["route", "model", "status"],
        )?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "gateway_http_request_duration_seconds",
                "Time from request to response head (first byte of a stream)",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 18)?),
            &["route", "model", "status"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "gateway_tokens_total",
                "Tokens metered, by tenant, model and kind",
            ),
            &["tenant", "model", "kind"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "gateway_upstream_errors_total",
                "Failed attempts to reach a worker",
            ),
            &["worker", "kind"],
        )?;
        let upstream_retries = IntCounter::new(
            "gateway_upstream_retries_total",
            "Requests sent to another worker after a failed attempt",
        )?;
        let worker_up = IntGaugeVec::new(
            Opts::new("gateway_worker_up", "1 if the worker passes health checks"),
            &["worker"],
        )?;
        let worker_outstanding = IntGaugeVec::new(
            Opts::new(
                "gateway_worker_outstanding_requests",
                "Requests in flight per worker",
            ),
            &["worker"],
        )?;
        let spool_backlog = IntGauge::new(
            "gateway_usage_spool_backlog_events",
            "Usage events read from the spool and not yet in the store",
        )?;
        let usage_shipped = IntGauge::new(
            "gateway_usage_shipped_events",
            "Usage events written to the store since start",
        )?;
        let spool_durable_appends = IntCounter::new(
            "gateway_usage_spool_durable_appends_total",
            "Usage events written to the local spool before their response ended (and fsynced first, unless GATEWAY_SPOOL_FSYNC_INTERVAL_MS is set)",
        )?;
        let spool_fsyncs = IntCounter::new(
            "gateway_usage_spool_fsyncs_total",
            "Fsyncs of the local usage spool, each covering every event written since the last (group commits, or one per fsync interval)",
        )?;
        let usage_ship_failures = IntGauge::new(
            "gateway_usage_ship_failures",
            "Failed attempts to write usage to the store since start",
        )?;
        let limit_rejections = IntCounterVec::new(
            Opts::new(
                "gateway_limit_rejections_total",
                "Requests refused with 429, by tenant and the limit that refused them",
            ),
            &["tenant", "limit"],
        )?;
        let admission_fail_open = IntCounter::new(
            "gateway_admission_fail_open_total",
            "Requests admitted without checking limits because the store was unreachable",
        )?;
        let admission_fail_closed = IntCounter::new(
            "gateway_admission_fail_closed_total",
            "Requests refused with 503 because the store was unreachable and a limit that applies fails closed",
        )?;
        let admission_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "gateway_admission_duration_seconds",
                "Time to check and reserve a request's limits in the store",
            )
            .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 16)?),
        )?;
        let admissions = IntCounterVec::new(
            Opts::new(
                "gateway_admissions_total",
                "Requests admitted under limits, by where the decision was made: from this replica's quota leases or by the store",
            ),
            &["path"],
        )?;
        let open_connections = IntGaugeVec::new(
            Opts::new(
                "gateway_open_connections",
                "Client connections open, by listener",
            ),
            &["listener"],
        )?;
        let refused_connections = IntCounterVec::new(
            Opts::new(
                "gateway_connections_refused_total",
                "Client connections closed at once because the listener was at its connection cap",
            ),
            &["listener"],
        )?;
        for c in [
            Box::new(admissions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(open_connections.clone()),
            Box::new(refused_connections.clone()),
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(tokens.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(upstream_retries.clone()),
            Box::new(worker_up.clone()),
            Box::new(worker_outstanding.clone()),
            Box::new(spool_backlog.clone()),
            Box::new(usage_shipped.clone()),
            Box::new(spool_durable_appends.clone()),
            Box::new(spool_fsyncs.clone()),
            Box::new(usage_ship_failures.clone()),
            Box::new(limit_rejections.clone()),
            Box::new(admission_fail_open.clone()),
            Box::new(admission_fail_closed.clone()),
            Box::new(admission_seconds.clone()),
        ] {
            registry.register(c)?;
        }
        Ok(Self {
            registry,
            requests,
            request_seconds,
            tokens,
            upstream_errors,
            upstream_retries,
            worker_up,
            worker_outstanding,
            spool_backlog,
            usage_shipped,
            spool_durable_appends,
            spool_fsyncs,
            usage_ship_failures,
            limit_rejections,
            admission_fail_open,
            admission_fail_closed,
            admission_seconds,
            admissions,
            open_connections,
            refused_connections,
        })
    }

    /// The text exposition, after setting the gauges that are read at scrape time.
    pub fn render_live(&self, live: &LiveStats) -> String {
        for w in &live.workers {
            self.worker_up
                .with_label_values(&[&w.base_url])
                .set(i64::from(w.healthy));
            self.worker_outstanding
                .with_label_values(&[&w.base_url])
                .set(w.outstanding as i64);
        }
        self.spool_backlog.set(live.spool_backlog as i64);
        self.usage_shipped.set(live.usage_shipped as i64);
        self.usage_ship_failures
            .set(live.usage_ship_failures as i64);
        let advance = |c: &IntCounter, to: u64| c.inc_by(to.saturating_sub(c.get()));
        advance(&self.spool_durable_appends, live.spool_durable_appends);
        advance(&self.spool_fsyncs, live.spool_fsyncs);
        self.render()
    }

    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"))
    }

    /// Per route: requests, client and server errors, and latency percentiles estimated from
    /// the histogram (each the upper bound of the bucket holding it), since this process
    /// started.
    pub fn traffic(&self) -> Vec<RouteTraffic> {
        use std::collections::BTreeMap;
        let mut routes: BTreeMap<String, (RouteTraffic, Vec<(f64, u64)>)> = BTreeMap::new();
        for family in self.registry.gather() {
            if family.name() != "gateway_http_request_duration_seconds" {
                continue;
            }
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map_or(String::new(), |l| l.value().to_owned())
                };
                let route = label("route");
                let status: u16 = label("status").parse().unwrap_or(0);
                let h = m.get_histogram();
                let entry = routes.entry(route.clone()).or_insert_with(|| {
                    (
                        RouteTraffic {
                            route,
                            ..RouteTraffic::default()
                        },
                        Vec::new(),
                    )
                });
                let count = h.get_sample_count();
                entry.0.requests += count;
                match status {
                    400..=499 => entry.0.client_errors += count,
                    500..=599 => entry.0.server_errors += count,
                    _ => {}
                }
                let buckets = h.get_bucket();
                if entry.1.is_empty() {
                    entry.1 = buckets.iter().map(|b| (b.upper_bound(), 0)).collect();
                }
                for (acc, b) in entry.1.iter_mut().zip(buckets) {
                    acc.1 += b.cumulative_count();
                }
            }
        }
        routes
            .into_values()
            .map(|(mut t, cumulative)| {
                let q = |p: f64| -> Option<f64> {
                    if t.requests == 0 {
                        return None;
                    }
                    let rank = (p * t.requests as f64).ceil() as u64;
                    cumulative
                        .iter()
                        .find(|(_, c)| *c >= rank)
                        .map(|(le, _)| *le)
                };
                t.p50_seconds = q(0.5);
                t.p90_seconds = q(0.9);
                t.p99_seconds = q(0.99);
                t
            })
            .collect()
    }
}

/// One route's traffic since start (see [`GatewayMetrics::traffic`]). A percentile is
/// `None` when there were no requests or it lies beyond the last bucket.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RouteTraffic {
    pub route: String,
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub p50_seconds: Option<f64>,
    pub p90_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
}
