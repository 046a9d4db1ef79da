//! Forwarding consumer calls to workers and metering what they used.
//!
//! Every successful call produces exactly one usage event, durable in the spool before the
//! client sees the end of the response: for a JSON reply, before the reply is sent; for a
//! stream, before `[DONE]`. Once the response is handed over (or the client is gone) an
//! outcome follows. A stream that ends early is billed for the tokens the worker had
//! delivered, as counted by the worker's `: usage P C` comments, and marked as such.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use billing::{now_ms, Delivery, Spool, UsageEvent, UsageStatus};
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, Full};
use serde_json::{Map, Value};

use crate::auth::KeyCaller;
use crate::error::GatewayError;
use crate::limits::{Admission, Demand, Permit, RateHeaders, Scope};
use crate::metrics::GatewayMetrics;
use crate::pool::{WorkerPool, WorkerSlot};
use crate::pricing::PriceCache;
use crate::upstream::{Upstream, UpstreamBody};

/// Upstream settings.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamLimits {
    /// Until the worker's response head arrives.
    pub first_byte_timeout: Duration,
    /// For a whole non-streamed response.
    pub total_timeout: Duration,
    /// Workers tried for one request (only while nothing reached the client).
    pub max_attempts: usize,
}

/// A consumer request body: forwarded as the client sent it unless the gateway must
/// change it, with what the gateway reads from it.
pub struct ProxiedCall {
    pub endpoint: &'static str,
    pub model: String,
    /// The body as the client sent it: forwarded as is unless the gateway changed it.
    raw: Bytes,
    body: Parsed,
}

/// What a call's body is to the gateway.
enum Parsed {
    /// A chat call that does not stream, the common case: its few fields read in one pass
    /// over the bytes, nothing else parsed or copied.
    Chat {
        /// Bytes of `messages` written as compact JSON (an upper bound of them).
        messages_bytes: i64,
        /// `max_completion_tokens`, else `max_tokens`, where one is an integer.
        max_tokens: Option<i64>,
    },
    /// Anything else, parsed whole so unknown fields pass through unchanged; `changed`
    /// once the gateway edited it (a stream's usage forced on).
    Json {
        body: Map<String, Value>,
        changed: bool,
    },
}

/// The fields of a chat body the gateway reads, borrowed from the body. Any body this does
/// not take as it is (not an object, a field of another type, a repeated field, a stream)
/// goes the general way, which also words the errors.
#[derive(serde::Deserialize)]
struct ChatFields<'a> {
    #[serde(borrow)]
    model: std::borrow::Cow<'a, str>,
    #[serde(default)]
    stream: bool,
    #[serde(borrow, default)]
    messages: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a serde_json::value::RawValue>,
}

impl ProxiedCall {
    pub fn parse(endpoint: &'static str, bytes: Bytes) -> Result<Self, GatewayError> {
        if endpoint == "/v1/chat/completions" {
            if let Some(call) = Self::parse_chat(&bytes) {
                return Ok(call);
            }
        }
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| GatewayError::bad_request(format!("invalid JSON body: {e}"), None))?;
        let Value::Object(body) = value else {
            return Err(GatewayError::bad_request(
                "the request body must be a JSON object",
                None,
            ));
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(_) => {
                return Err(GatewayError::bad_request(
                    "`model` must be a non-empty string",
                    Some("model"),
                ))
            }
            None => {
                return Err(GatewayError::bad_request(
                    "`model` is required",
                    Some("model"),
                ))
            }
        };
        Ok(Self {
            endpoint,
            model,
            raw: bytes,
            body: Parsed::Json {
                body,
                changed: false,
            },
        })
    }

    /// The one-pass read of a plain chat body, or `None` for the general way.
    fn parse_chat(bytes: &Bytes) -> Option<Self> {
        // A struct also deserializes from an array; only an object is a body.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        let fields: ChatFields<'_> = serde_json::from_slice(bytes).ok()?;
        if fields.stream || fields.model.is_empty() {
            return None;
        }
        // As `Value::as_i64` reads them: an integer within i64, else nothing.
        let int = |v: Option<&serde_json::value::RawValue>| {
            v.and_then(|v| serde_json::from_str::<i64>(v.get()).ok())
        };
        Some(Self {
            endpoint: "/v1/chat/completions",
            model: fields.model.into_owned(),
            raw: bytes.clone(),
            body: Parsed::Chat {
                messages_bytes: fields.messages.map_or(0, |m| compact_len(m.get())),
                max_tokens: int(fields.max_completion_tokens).or(int(fields.max_tokens)),
            },
        })
    }

    /// The JSON to send the worker.
    fn upstream_body(&self) -> Result<Bytes, GatewayError> {
        match &self.body {
            Parsed::Json {
                body,
                changed: true,
            } => serde_json::to_vec(body)
                .map(Bytes::from)
                .map_err(|e| GatewayError::Upstream(e.to_string())),
            _ => Ok(self.raw.clone()),
        }
    }

    /// The body as parsed JSON, where it was parsed whole.
    fn json(&self) -> Option<&Map<String, Value>> {
        match &self.body {
            Parsed::Json { body, .. } => Some(body),
            Parsed::Chat { .. } => None,
        }
    }

    pub fn is_stream(&self) -> bool {
        self.json()
            .and_then(|b| b.get("stream"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// An upper bound of the tokens this call can use, from its body alone:
    /// `(prompt, completion)`. Byte-level tokenizers never make more tokens than bytes, and
    /// the JSON of a message is longer than its text plus its role markers.
    pub fn token_bound(&self, default_completion: i64) -> (i64, i64) {
        const TEMPLATE_OVERHEAD: i64 = 64;
        let body = match &self.body {
            Parsed::Chat {
                messages_bytes,
                max_tokens,
            } => {
                return (
                    messages_bytes + TEMPLATE_OVERHEAD,
                    max_tokens.unwrap_or(default_completion).max(0),
                )
            }
            Parsed::Json { body, .. } => body,
        };
        let len = |v: &Value| -> i64 {
            match v {
                Value::String(s) => s.len() as i64 + 2,
                Value::Array(items) => items.len() as i64 + 2,
                other => serde_json::to_vec(other).map_or(0, |b| b.len() as i64),
            }
        };
        let inputs = |v: Option<&Value>| -> i64 {
            match v {
                Some(Value::Array(items)) if items.iter().all(|i| !i.is_number()) => {
                    items.iter().map(len).sum()
                }
                Some(v) => len(v),
                None => 0,
            }
        };
        match self.endpoint {
            "/v1/chat/completions" => {
                let prompt = body
                    .get("messages")
                    .and_then(|m| serde_json::to_vec(m).ok())
                    .map_or(0, |b| b.len() as i64)
                    + TEMPLATE_OVERHEAD;
                let completion = ["max_completion_tokens", "max_tokens"]
                    .iter()
                    .find_map(|k| body.get(*k).and_then(Value::as_i64))
                    .unwrap_or(default_completion)
                    .max(0);
                (prompt, completion)
            }
            _ => (inputs(body.get("input")) + inputs(body.get("labels")), 0),
        }
    }

    fn client_wants_usage(&self) -> bool {
        self.json()
            .and_then(|b| b.get("stream_options"))
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// Billing needs the usage chunk whatever the client asked.
    fn force_stream_usage(&mut self) {
        if self.client_wants_usage() {
            return;
        }
        let Parsed::Json { body, changed } = &mut self.body else {
            return;
        };
        *changed = true;
        let options = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if !options.is_object() {
            *options = Value::Object(Map::new());
        }
        if let Value::Object(o) = options {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
}

/// The length of valid JSON `text` written compactly: without the whitespace between
/// tokens. Never less than `serde_json::to_vec` of the same value makes, except where a
/// number is written shorter than serde writes it back, which no message text is.
fn compact_len(text: &str) -> i64 {
    let (mut len, mut in_string, mut escaped) = (0i64, false, false);
    for &b in text.as_bytes() {
        if in_string {
            len += 1;
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !b.is_ascii_whitespace() {
            len += 1;
            in_string = b == b'"';
        }
    }
    len
}

/// Who made the call and when, for the usage event.
#[derive(Clone)]
pub struct CallContext {
    pub request_id: String,
    pub caller: KeyCaller,
    pub started_at: i64,
}

impl CallContext {
    fn event(
        &self,
        call_endpoint: &str,
        model: &str,
        (prompt, completion): (u64, u64),
        status: UsageStatus,
        delivery: Delivery,
    ) -> UsageEvent {
        UsageEvent {
            request_id: self.request_id.clone(),
            tenant_id: self.caller.key.tenant_id.clone(),
            key_id: self.caller.key.id.clone(),
            model: model.to_owned(),
            endpoint: call_endpoint.to_owned(),
            prompt_tokens: prompt as i64,
            completion_tokens: completion as i64,
            started_at: self.started_at,
            finished_at: now_ms(),
            status,
            delivery,
        }
    }
}

pub struct Proxy {
    pub pool: Arc<WorkerPool>,
    /// Connections to workers, one set per serving thread (index 0: any other thread), so
    /// a request's connection to a worker lives on the thread that serves the request.
    pub upstreams: Vec<Arc<Upstream>>,
    pub spool: Spool,
    pub limits: UpstreamLimits,
    pub metrics: Arc<GatewayMetrics>,
    pub admission: Arc<Admission>,
    pub prices: Arc<PriceCache>,
    /// Completion tokens reserved for a chat call that sets no `max_tokens`.
    pub default_completion_reserve: i64,
}

/// A request's reservation and the price it was made at; settled with the real usage.
struct Reservation {
    permit: Option<Permit>,
    price: Option<billing::Price>,
}

impl Reservation {
    fn settle(&mut self, (prompt, completion): (u64, u64)) {
        if let Some(permit) = self.permit.take() {
            let (prompt, completion) = (prompt as i64, completion as i64);
            permit.settle(Demand {
                tokens: prompt + completion,
                spend: self
                    .price
                    .as_ref()
                    .map(|p| p.cost(1, prompt, completion))
                    .unwrap_or_default(),
            });
        }
    }
}

impl Proxy {
    fn upstream(&self) -> Option<&Arc<Upstream>> {
        let i = crate::listener::serving_index();
        self.upstreams.get(i).or_else(|| self.upstreams.first())
    }

    /// Checks the model against the key and the pool, forwards, meters, answers.
    pub async fn handle(
        &self,
        ctx: CallContext,
        call: ProxiedCall,
    ) -> Result<Response, GatewayError> {
        if !ctx.caller.key.allows_model(&call.model) {
            return Err(GatewayError::ModelNotAllowed(call.model));
        }
        if !self.pool.knows(&call.model) {
            return Err(GatewayError::ModelNotFound(call.model));
        }
        let (mut reservation, rate_headers) = self.admit(&ctx, &call).await?;
        let mut response = match self.forward(ctx, call, &mut reservation).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        rate_headers.apply(response.headers_mut());
        Ok(response)
    }

    /// Reserves the most this call can cost against every limit of its tenant and key.
    async fn admit(
        &self,
        ctx: &CallContext,
        call: &ProxiedCall,
    ) -> Result<(Reservation, RateHeaders), GatewayError> {
        let key = &ctx.caller.key;
        let (prompt, completion) = call.token_bound(self.default_completion_reserve);
        // Tiered prices count at their highest rates: spend caps are never under-counted.
        let price = self
            .prices
            .current()
            .at(&call.model, ctx.started_at)
            .map(billing::Price::ceiling);
        let demand = Demand {
            tokens: prompt.saturating_add(completion),
            spend: price
                .as_ref()
                .map(|p| p.cost(1, prompt, completion))
                .unwrap_or_default(),
        };
        // Only limited scopes are checked: none is made (named) for the others.
        let scopes: Vec<Scope> = [
            (!key.plan_limits.is_unlimited())
                .then(|| Scope::tenant(&key.tenant_id, key.plan_limits)),
            (!key.key_limits.is_unlimited()).then(|| Scope::key(&key.id, key.key_limits)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let admitted = self
            .admission
            .admit(&ctx.request_id, &key.tenant_id, scopes, demand)
            .await
            .map_err(|r| GatewayError::Limited(Box::new(r)))?;
        Ok((
            Reservation {
                permit: admitted.permit,
                price,
            },
            admitted.headers,
        ))
    }

    async fn forward(
        &self,
        ctx: CallContext,
        mut call: ProxiedCall,
        reservation: &mut Reservation,
    ) -> Result<Response, GatewayError> {
        let stream = call.is_stream();
        let client_wants_usage = call.client_wants_usage();
        if stream {
            call.force_stream_usage();
        }
        let mut tried: Vec<String> = Vec::new();
        let bytes = loop {
            let (lease, upstream) = self.send(&call, &mut tried).await?;
            let status = upstream.status();
            if !status.is_success() {
                // Worker-side errors are already in the OpenAI shape; pass them on as they are.
                let bytes = read_all(upstream)
                    .await
                    .map_err(|e| GatewayError::Upstream(e.to_string()))?;
                return Ok(json_response(status, bytes));
            }
            if stream {
                let reservation = Reservation {
                    permit: reservation.permit.take(),
                    price: reservation.price.take(),
                };
                return Ok(self.metered_stream(
                    ctx,
                    call,
                    lease,
                    upstream,
                    client_wants_usage,
                    reservation,
                ));
            }
            match tokio::time::timeout(self.limits.total_timeout, read_all(upstream)).await {
                Err(_) => return Err(GatewayError::UpstreamTimeout),
                Ok(Ok(bytes)) => break bytes,
                // The worker died while answering; nothing reached the client, so another
                // worker may answer instead.
                Ok(Err(e)) if tried.len() < self.limits.max_attempts => {
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[&lease.node.base_url, "body"])
                        .inc();
                    lease.node.eject();
                    tracing::warn!(worker = %lease.node.base_url, error = %e, "worker failed mid-reply; trying another");
                }
                Ok(Err(e)) => return Err(GatewayError::Upstream(e.to_string())),
            }
        };
        let counted = usage_of(&bytes)
            .ok_or_else(|| GatewayError::Upstream("the worker's reply carried no usage".into()))?;
        let event = ctx.event(
            call.endpoint,
            &call.model,
            counted,
            UsageStatus::Success,
            Delivery::Unknown,
        );
        count_tokens(&self.metrics, &event);
        reservation.settle(counted);
        self.spool.append_usage(&event).await.map_err(|e| {
            tracing::error!(error = %e, request_id = %ctx.request_id, "spooling usage failed");
            GatewayError::Metering
        })?;
        let outcome = OutcomeOnEnd {
            spool: self.spool.clone(),
            request_id: ctx.request_id,
            pending: true,
        };
        Ok(tracked_json(bytes, outcome))
    }

    /// Sends to a worker, trying another (up to `max_attempts` workers in all, counting
    /// `tried`) while nothing has reached the client: on a refused or broken connection,
    /// or a 503. A timeout is not retried: the worker may still be working on it.
    async fn send(
        &self,
        call: &ProxiedCall,
        tried: &mut Vec<String>,
    ) -> Result<(WorkerSlot, hyper::Response<UpstreamBody>), GatewayError> {
        let body = call.upstream_body()?;
        while tried.len() < self.limits.max_attempts.max(1) {
            let Some(lease) = self.pool.pick(&call.model, tried) else {
                break;
            };
            if !tried.is_empty() {
                self.metrics.upstream_retries.inc();
            }
            let worker = lease.node.base_url.clone();
            let failed = |kind: &str| {
                self.metrics
                    .upstream_errors
                    .with_label_values(&[&worker, kind])
                    .inc()
            };
            let target = lease
                .node
                .target(call.endpoint)
                .map_err(|e| GatewayError::Upstream(format!("worker address {worker}: {e}")))?;
            let request = hyper::Request::post(target.path)
                .header(header::HOST, target.host)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .map_err(|e| GatewayError::Upstream(format!("worker address {worker}: {e}")))?;
            let upstream = self
                .upstream()
                .ok_or_else(|| GatewayError::Upstream("no upstream connections".into()))?;
            tried.push(worker.clone());
            let sent = tokio::time::timeout(
                self.limits.first_byte_timeout,
                upstream.send(&target.authority, request),
            )
            .await;
            match sent {
                Err(_) => {
                    failed("timeout");
                    return Err(GatewayError::UpstreamTimeout);
                }
                Ok(Err(e)) if e.is_connect() => {
                    failed("connect");
                    lease.node.eject();
                    tracing::warn!(%worker, error = %e, "worker unreachable; trying another");
                }
                // The connection broke before a response head: the worker died or
                // restarted with the request; nothing reached the client yet.
                Ok(Err(e)) => {
                    failed("reset");
                    lease.node.eject();
                    tracing::warn!(%worker, error = %e, "worker failed before answering; trying another");
                }
                // Overloaded: the worker did not take the request, so another may.
                Ok(Ok(r)) if r.status() == StatusCode::SERVICE_UNAVAILABLE => failed("overloaded"),
                Ok(Ok(r)) => return Ok((lease, r)),
            }
        }
        Err(GatewayError::NoWorker(call.model.clone()))
    }

    fn metered_stream(
        &self,
        ctx: CallContext,
        call: ProxiedCall,
        lease: WorkerSlot,
        upstream: hyper::Response<UpstreamBody>,
        client_wants_usage: bool,
        reservation: Reservation,
    ) -> Response {
        let meter = StreamMeter {
            reservation,
            spool: self.spool.clone(),
            metrics: self.metrics.clone(),
            ctx,
            endpoint: call.endpoint,
            model: call.model,
            counted: (0, 0),
            recorded: false,
            outcome: None,
            _lease: lease,
        };
        let body = metered(
            upstream.into_body().into_data_stream(),
            meter,
            client_wants_usage,
        );
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(body))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

/// A worker's whole response body.
async fn read_all(response: hyper::Response<UpstreamBody>) -> Result<Bytes, hyper::Error> {
    Ok(response.into_body().collect().await?.to_bytes())
}

fn json_response(status: StatusCode, bytes: Bytes) -> Response {
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Records a response's outcome: delivered once its body has been read to the end,
/// undelivered if it is dropped before.
struct OutcomeOnEnd {
    spool: Spool,
    request_id: String,
    pending: bool,
}

impl OutcomeOnEnd {
    fn settle(&mut self, delivered: bool) {
        if std::mem::take(&mut self.pending) {
            if delivered {
                self.spool.record_delivered(&self.request_id);
            } else {
                self.spool.record_outcome(&self.request_id, false);
            }
        }
    }
}

impl Drop for OutcomeOnEnd {
    fn drop(&mut self) {
        self.settle(false);
    }
}

/// A JSON reply of known length that reports its outcome when the server takes it, or
/// "undelivered" if it is dropped before (the client left while the reply was waiting).
struct TrackedBody {
    bytes: Option<Bytes>,
    len: u64,
    outcome: OutcomeOnEnd,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = this.bytes.take().map(|b| Ok(http_body::Frame::data(b)));
        // The whole reply is handed to the connection now (with a known length, the
        // server does not ask again); the delivery settle time covers the socket write.
        this.outcome.settle(true);
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len)
    }
}

/// A JSON body that reports its outcome when the server has taken all of it.
fn tracked_json(bytes: Bytes, outcome: OutcomeOnEnd) -> Response {
    let body = TrackedBody {
        len: bytes.len() as u64,
        bytes: Some(bytes),
        outcome,
    };
    let mut response = Response::new(Body::new(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn count_tokens(metrics: &GatewayMetrics, event: &UsageEvent) {
    for (kind, n) in [
        ("prompt", event.prompt_tokens),
        ("completion", event.completion_tokens),
    ] {
        metrics
            .tokens
            .with_label_values(&[&event.tenant_id, &event.model, kind])
            .inc_by(n.max(0) as u64);
    }
}

/// `(prompt_tokens, completion_tokens)` of a JSON reply. Reads only `usage`: the rest of
/// the reply is skipped, not built into a tree.
fn usage_of(bytes: &[u8]) -> Option<(u64, u64)> {
    #[derive(serde::Deserialize)]
    struct Reply {
        usage: Option<Usage>,
    }
    #[derive(serde::Deserialize)]
    struct Usage {
        prompt_tokens: u64,
        completion_tokens: Option<u64>,
    }
    let usage = serde_json::from_slice::<Reply>(bytes).ok()?.usage?;
    Some((usage.prompt_tokens, usage.completion_tokens.unwrap_or(0)))
}

/// Tracks a stream's usage; if dropped before the stream completed (the client left),
/// spools what was delivered.
struct StreamMeter {
    spool: Spool,
    metrics: Arc<GatewayMetrics>,
    ctx: CallContext,
    endpoint: &'static str,
    model: String,
    counted: (u64, u64),
    recorded: bool,
    /// Set once a success is spooled; reports the outcome when the stream ends, or
    /// "undelivered" if the meter is dropped first.
    outcome: Option<OutcomeOnEnd>,
    reservation: Reservation,
    _lease: WorkerSlot,
}

impl StreamMeter {
    fn event(&self, status: UsageStatus) -> UsageEvent {
        let delivery = match status {
            UsageStatus::Success => Delivery::Unknown,
            // Only what was delivered is counted for streams that end early.
            UsageStatus::ClientCancelled | UsageStatus::UpstreamFailed => Delivery::Delivered,
        };
        self.ctx
            .event(self.endpoint, &self.model, self.counted, status, delivery)
    }

    async fn record(&mut self, status: UsageStatus) -> bool {
        self.recorded = true;
        let event = self.event(status);
        count_tokens(&self.metrics, &event);
        self.reservation.settle(self.counted);
        match self.spool.append_usage(&event).await {
            Ok(()) => {
                if status == UsageStatus::Success {
                    self.outcome = Some(OutcomeOnEnd {
                        spool: self.spool.clone(),
                        request_id: self.ctx.request_id.clone(),
                        pending: true,
                    });
                }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, request_id = %self.ctx.request_id, "spooling stream usage failed");
                false
            }
        }
    }
}

impl Drop for StreamMeter {
    fn drop(&mut self) {
        // A pending outcome reports itself as undelivered when `self.outcome` drops.
        if self.recorded {
            return;
        }
        let event = self.event(UsageStatus::ClientCancelled);
        count_tokens(&self.metrics, &event);
        self.reservation.settle(self.counted);
        // Queued now, synchronously, so a shutdown's final flush covers it.
        if !self.spool.append_usage_detached(&event) {
            tracing::error!(request_id = %event.request_id, "spooling a cancelled stream failed");
        }
    }
}

/// What one upstream SSE event means to the meter.
enum SseEvent<'a> {
    /// `: usage P C` from the worker.
    Counted(u64, u64),
    Comment,
    Done,
    Data(&'a str),
}

fn classify_event(event: &str) -> SseEvent<'_> {
    if let Some(rest) = event.strip_prefix(": usage ") {
        let mut parts = rest.split_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(p)), Some(Ok(c))) = (parts.next(), parts.next()) {
            return SseEvent::Counted(p, c);
        }
    }
    if event.starts_with(':') {
        return SseEvent::Comment;
    }
    match event.strip_prefix("data:").map(str::trim) {
        Some("[DONE]") => SseEvent::Done,
        Some(data) => SseEvent::Data(data),
        None => SseEvent::Comment,
    }
}

/// Passes the worker's SSE stream through, reading usage from it, hiding the usage chunk
/// if the client did not ask for it, and recording usage before `[DONE]` goes out.
fn metered<E: std::fmt::Display + Send + 'static>(
    upstream: impl Stream<Item = Result<Bytes, E>> + Send + 'static,
    meter: StreamMeter,
    client_wants_usage: bool,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    struct State<S> {
        upstream: S,
        meter: StreamMeter,
        buffer: Vec<u8>,
        finished: bool,
    }
    let state = State {
        upstream: Box::pin(upstream),
        meter,
        buffer: Vec::new(),
        finished: false,
    };
    futures::stream::unfold(state, move |mut st| async move {
        if st.finished {
            // The server asked for more after the last event: all of it was handed over.
            if let Some(outcome) = st.meter.outcome.as_mut() {
                outcome.settle(true);
            }
            return None;
        }
        loop {
            // Emit every complete event in the buffer.
            if let Some(end) = find_event_end(&st.buffer) {
                let raw: Vec<u8> = st.buffer.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&raw[..raw.len() - 2]).into_owned();
                match classify_event(&text) {
                    SseEvent::Counted(p, c) => st.meter.counted = (p, c),
                    SseEvent::Comment => {}
                    SseEvent::Done => {
                        st.finished = true;
                        let out = if st.meter.record(UsageStatus::Success).await {
                            Bytes::from_static(b"data: [DONE]\n\n")
                        } else {
                            Bytes::from(error_event(
                                "usage could not be recorded",
                                "metering_unavailable",
                            ))
                        };
                        return Some((Ok(out), st));
                    }
                    SseEvent::Data(data) => {
                        let parsed: Option<Value> = serde_json::from_str(data).ok();
                        if let Some(usage) = parsed
                            .as_ref()
                            .and_then(|v| v.get("usage"))
                            .filter(|u| !u.is_null())
                        {
                            let p = usage
                                .get("prompt_tokens")
                                .and_then(Value::as_u64)
                                .unwrap_or(0);
                            let c = usage
                                .get("completion_tokens")
                                .and_then(Value::as_u64)
                                .unwrap_or(0);
                            st.meter.counted = (p, c);
                            if !client_wants_usage {
                                continue;
                            }
                        }
                        if parsed.as_ref().and_then(|v| v.get("error")).is_some() {
                            st.finished = true;
                            st.meter.record(UsageStatus::UpstreamFailed).await;
                        }
                        return Some((Ok(Bytes::from(raw)), st));
                    }
                }
                continue;
            }
            match st.upstream.next().await {
                Some(Ok(chunk)) => st.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    // The worker went away mid-stream: bill what was delivered, tell the client.
                    st.finished = true;
                    st.meter.record(UsageStatus::UpstreamFailed).await;
                    let out = error_event(
                        &format!("the upstream worker failed mid-stream: {e}"),
                        "upstream_error",
                    );
                    return Some((Ok(Bytes::from(out)), st));
                }
                None => {
                    st.finished = true;
                    st.meter.record(UsageStatus::UpstreamFailed).await;
                    let out = error_event("the upstream stream ended early", "upstream_error");
                    return Some((Ok(Bytes::from(out)), st));
                }
            }
        }
    })
}

fn find_event_end(buffer: &[u8]) -> Option<usize> {
    buffer.windows(2).position(|w| w == b"\n\n")
}

fn error_event(message: &str, code: &str) -> String {
    let body = openai_types::ErrorBody::new(message, "server_error", None, Some(code));
    format!(
        "data: {}\n\n",
        serde_json::to_string(&body).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sse_events() {
        assert!(matches!(
            classify_event(": usage 12 3"),
            SseEvent::Counted(12, 3)
        ));
        assert!(matches!(classify_event(": keep-alive"), SseEvent::Comment));
        assert!(matches!(classify_event("data: [DONE]"), SseEvent::Done));
        assert!(matches!(
            classify_event("data: {\"a\":1}"),
            SseEvent::Data("{\"a\":1}")
        ));
    }

    /// The general way for any endpoint's body: parsed whole.
    fn parse_whole(bytes: &'static [u8]) -> Result<ProxiedCall, GatewayError> {
        let mut call = ProxiedCall::parse("/v1/embeddings", Bytes::from_static(bytes))?;
        call.endpoint = "/v1/chat/completions";
        Ok(call)
    }

    #[test]
    fn a_plain_chat_body_read_in_one_pass_bounds_and_forwards_as_parsed_whole() {
        let bodies: [&'static [u8]; 8] = [
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            br#"{"model":"m","max_tokens":16,"messages":[{"role":"user","content":"a \"quoted\" \\ word"}]}"#,
            br#"{"messages":[{"role":"system","content":"x"},{"role":"user","content":"y"}],"max_completion_tokens":7,"max_tokens":99,"model":"m2"}"#,
            br#"{"model":"m","max_tokens":16.0,"messages":[]}"#,
            br#"{"model":"m","max_tokens":-3,"stream":false,"extra":{"k":[1,2,3]}}"#,
            br#"{"model":"m","max_tokens":null,"max_completion_tokens":"5","messages":[{"role":"user","content":"\u00e9t\u00e9"}]}"#,
            b"{\"model\":\"m\",\"max_tokens\":18446744073709551615,\"messages\":[{\"role\":\"user\",\"content\":\"caf\xc3\xa9\"}]}",
            br#"{"model":"m\u0021","messages":[{"role":"user","content":[{"type":"text","text":"t"}]}]}"#,
        ];
        for bytes in bodies {
            let text = String::from_utf8_lossy(bytes);
            let fast = ProxiedCall::parse("/v1/chat/completions", Bytes::from_static(bytes))
                .unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert!(matches!(fast.body, Parsed::Chat { .. }), "{text}");
            let whole = parse_whole(bytes).unwrap();
            assert_eq!(fast.model, whole.model, "{text}");
            assert!(!fast.is_stream() && !whole.is_stream(), "{text}");
            let (fast_bound, whole_bound) = (fast.token_bound(256), whole.token_bound(256));
            assert_eq!(fast_bound.1, whole_bound.1, "{text}");
            // Escapes are written back shorter, never longer.
            assert!(
                fast_bound.0 >= whole_bound.0,
                "{text}: {fast_bound:?} {whole_bound:?}"
            );
            assert_eq!(
                fast.upstream_body().unwrap(),
                Bytes::from_static(bytes),
                "{text}"
            );
        }
        // Written compactly with nothing to unescape, the bound is the same to the byte.
        let compact: &'static [u8] =
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let spaced: &'static [u8] =
            b"{ \"model\": \"m\",\n  \"messages\": [ {\"role\": \"user\", \"content\": \"h i\"} ] }";
        let fast = ProxiedCall::parse("/v1/chat/completions", Bytes::from_static(compact)).unwrap();
        assert_eq!(
            fast.token_bound(0),
            parse_whole(compact).unwrap().token_bound(0)
        );
        let fast = ProxiedCall::parse("/v1/chat/completions", Bytes::from_static(spaced)).unwrap();
        assert_eq!(
            fast.token_bound(0),
            parse_whole(spaced).unwrap().token_bound(0)
        );
    }

    #[test]
    fn chat_bodies_the_one_pass_does_not_take_go_the_general_way() {
        let general = |bytes: &'static [u8]| {
            let call = ProxiedCall::parse("/v1/chat/completions", Bytes::from_static(bytes));
            call.map(|c| matches!(c.body, Parsed::Json { .. }))
        };
        // Streams (the body changes), odd types of known fields, repeated fields.
        assert_eq!(general(br#"{"model":"m","stream":true}"#).ok(), Some(true));
        assert_eq!(general(br#"{"model":"m","stream":null}"#).ok(), Some(true));
        assert_eq!(general(br#"{"model":"m","model":"n"}"#).ok(), Some(true));
        let repeated = ProxiedCall::parse(
            "/v1/chat/completions",
            Bytes::from_static(br#"{"model":"m","model":"n"}"#),
        );
        assert_eq!(repeated.ok().map(|c| c.model), Some("n".to_string()));
        // Bad bodies keep the general way's words.
        let message = |bytes: &'static [u8]| match general(bytes) {
            Err(GatewayError::BadRequest { message, .. }) => message,
            other => panic!("{}: {:?}", String::from_utf8_lossy(bytes), other.ok()),
        };
        assert_eq!(
            message(br#"[{"model":"m"}]"#),
            "the request body must be a JSON object"
        );
        assert_eq!(
            message(br#"["m"]"#),
            "the request body must be a JSON object"
        );
        assert_eq!(
            message(br#"{"model":7}"#),
            "`model` must be a non-empty string"
        );
        assert_eq!(
            message(br#"{"model":""}"#),
            "`model` must be a non-empty string"
        );
        assert_eq!(message(br#"{"messages":[]}"#), "`model` is required");
        assert!(message(br#"{"model":"m""#).starts_with("invalid JSON body"));
        assert!(message(br#"{"model":"m"} x"#).starts_with("invalid JSON body"));
    }

    #[test]
    fn stream_usage_is_forced_on() {
        let mut call = ProxiedCall::parse(
            "/v1/chat/completions",
            Bytes::from_static(br#"{"model":"m","stream":true,"stream_options":null}"#),
        )
        .unwrap();
        assert!(!call.client_wants_usage());
        call.force_stream_usage();
        assert!(call.client_wants_usage());
        let sent: Value = serde_json::from_slice(&call.upstream_body().unwrap()).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], Value::Bool(true));
    }
}
