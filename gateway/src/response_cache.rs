//! The response cache (SPEC §10): whole responses of calls whose answer their body fixes,
//! kept for the lifetime the tenant's plan gives them.
//!
//! Owns: which calls may be cached, the key (tenant, model, endpoint and the body in
//! canonical form, hashed), and the two tiers: memory on each replica, bounded in bytes,
//! and Redis shared by the replicas where one is configured. Must never: serve one tenant's
//! entry to another (the tenant is in the key), serve an entry past its lifetime, or fail
//! or hold up a call because Redis is down or slow (that is a miss, counted).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use redis::AsyncCommands as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// How long a Redis command may take before the call goes on without it.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// After a failed connection to Redis, how long before the next try.
const REDIS_RETRY: Duration = Duration::from_secs(5);
/// Prefix of every Redis key the cache writes.
const REDIS_PREFIX: &str = "gateway:response-cache:v1:";

/// Whether a call may be answered from the cache: embeddings always; chat and completions
/// when their output is fixed by the body (`temperature` 0, or a `seed`).
pub fn cacheable(endpoint: &str, body: &Value) -> bool {
    match endpoint {
        "/v1/embeddings" => true,
        "/v1/chat/completions" | "/v1/completions" => {
            let seeded = body.get("seed").is_some_and(|s| !s.is_null());
            let greedy = body
                .get("temperature")
                .and_then(Value::as_f64)
                .is_some_and(|t| t == 0.0);
            seeded || greedy
        }
        _ => false,
    }
}

/// What the client's `cache-control` header asks of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Directive {
    /// Answer from the cache where possible, and keep the answer.
    #[default]
    Use,
    /// `no-cache`: ask the model, but keep its answer for later calls.
    Refresh,
    /// `no-store`: neither read nor write the cache.
    Bypass,
}

impl Directive {
    /// From a `cache-control` header's value; unknown directives are ignored.
    pub fn parse(header: Option<&str>) -> Self {
        let mut out = Self::Use;
        for d in header.unwrap_or("").split(',') {
            match d.trim().to_ascii_lowercase().as_str() {
                "no-store" => return Self::Bypass,
                "no-cache" => out = Self::Refresh,
                _ => {}
            }
        }
        out
    }
}

/// An entry's identity: SHA-256 of the tenant, model, endpoint and canonical body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn new(tenant: &str, model: &str, endpoint: &str, body: &Value) -> Self {
        let mut canonical = String::with_capacity(256);
        write_canonical(body, &mut canonical);
        let mut h = Sha256::new();
        for part in [tenant, model, endpoint, &canonical] {
            // Lengths first, so no two splits of the same bytes hash alike.
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        Self(h.finalize().into())
    }

    fn redis_key(&self) -> String {
        format!("{REDIS_PREFIX}{}", hex::encode(self.0))
    }
}

/// JSON with every object's keys sorted, so bodies that differ only in key order or
/// spacing are the same call.
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A cached response: the bytes the client got, and the usage they stand for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// An SSE stream (replayed as one) rather than a JSON reply.
    pub stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub body: Bytes,
    /// Unix ms from which it is no longer served.
    pub expires_at: i64,
}

impl Entry {
    /// `stream u8, prompt u64, completion u64, expires_at i64` (little-endian), the body.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(25 + self.body.len());
        out.push(u8::from(self.stream));
        out.extend_from_slice(&self.prompt_tokens.to_le_bytes());
        out.extend_from_slice(&self.completion_tokens.to_le_bytes());
        out.extend_from_slice(&self.expires_at.to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let head = bytes.get(..25)?;
        let int = |at: usize| head[at..at + 8].try_into().ok();
        Some(Self {
            stream: match head[0] {
                0 => false,
                1 => true,
                _ => return None,
            },
            prompt_tokens: u64::from_le_bytes(int(1)?),
            completion_tokens: u64::from_le_bytes(int(9)?),
            expires_at: i64::from_le_bytes(int(17)?),
            body: Bytes::copy_from_slice(&bytes[25..]),
        })
    }

    fn weight(&self) -> u32 {
        u32::try_from(self.body.len() + 128).unwrap_or(u32::MAX)
    }
}

/// Lets each memory entry live until its own `expires_at`.
struct UntilExpiry;

impl moka::Expiry<CacheKey, Arc<Entry>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let left = entry.expires_at.saturating_sub(billing::now_ms()).max(0);
        Some(Duration::from_millis(left as u64))
    }
}

/// The cache's figures for the dashboard.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub entries: u64,
    pub max_bytes: u64,
    pub shared_tier: bool,
}

struct CacheMetrics {
    lookups: IntCounterVec,
    bytes: IntGauge,
    entries: IntGauge,
    redis_errors: IntCounter,
}

impl CacheMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "gateway_response_cache_lookups_total",
                "Response cache lookups of cacheable calls, by result (hit or miss)",
            ),
            &["result"],
        )?;
        let bytes = IntGauge::new(
            "gateway_response_cache_bytes",
            "Bytes held by this replica's response cache in memory",
        )?;
        let entries = IntGauge::new(
            "gateway_response_cache_entries",
            "Responses held by this replica's response cache in memory",
        )?;
        let redis_errors = IntCounter::new(
            "gateway_response_cache_redis_errors_total",
            "Response cache commands to Redis that failed or timed out (each a miss or a skipped write)",
        )?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(entries.clone()))?;
        registry.register(Box::new(redis_errors.clone()))?;
        Ok(Self {
            lookups,
            bytes,
            entries,
            redis_errors,
        })
    }
}

/// Redis as the tier the replicas share: connected on first use, again after a failure
/// at most every [`REDIS_RETRY`].
struct RedisTier {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    /// Unix ms of the last failed connection attempt.
    failed_at: AtomicI64,
}

impl RedisTier {
    async fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Some(c.clone());
        }
        let now = billing::now_ms();
        if now - self.failed_at.load(Ordering::Relaxed) < REDIS_RETRY.as_millis() as i64 {
            return None;
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        match redis::aio::ConnectionManager::new_with_config(self.client.clone(), config).await {
            Ok(c) => {
                *slot = Some(c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(error = %e, "response cache: Redis unreachable; memory only for now");
                self.failed_at.store(now, Ordering::Relaxed);
                None
            }
        }
    }
}

/// The response cache: memory first, then Redis.
pub struct ResponseCache {
    memory: moka::sync::Cache<CacheKey, Arc<Entry>>,
    redis: Option<Arc<RedisTier>>,
    max_bytes: u64,
    metrics: Arc<CacheMetrics>,
}

impl ResponseCache {
    /// A cache of at most `max_bytes` in memory; shared through Redis at `redis_url`.
    pub fn new(
        max_bytes: u64,
        redis_url: Option<&str>,
        registry: &Registry,
    ) -> anyhow::Result<Self> {
        let metrics = Arc::new(CacheMetrics::new(registry)?);
        let (bytes, entries) = (metrics.bytes.clone(), metrics.entries.clone());
        let memory = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, e: &Arc<Entry>| e.weight())
            .expire_after(UntilExpiry)
            .eviction_listener(move |_k, e: Arc<Entry>, _cause| {
                bytes.sub(i64::from(e.weight()));
                entries.dec();
            })
            .build();
        let redis = match redis_url {
            Some(url) => Some(Arc::new(RedisTier {
                client: redis::Client::open(url)
                    .map_err(|e| anyhow::anyhow!("--response-cache-redis: {e}"))?,
                connection: tokio::sync::Mutex::new(None),
                failed_at: AtomicI64::new(i64::MIN / 2),
            })),
            None => None,
        };
        Ok(Self {
            memory,
            redis,
            max_bytes,
            metrics,
        })
    }

    fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        self.metrics.bytes.add(i64::from(entry.weight()));
        self.metrics.entries.inc();
        self.memory.insert(key, entry);
    }

    /// The largest response kept: an eighth of the memory bound, at most 4 MiB.
    pub fn max_entry_bytes(&self) -> usize {
        (self.max_bytes / 8).min(4 << 20) as usize
    }

    /// The live entry for `key`, from memory or else Redis (then kept in memory too).
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let now = billing::now_ms();
        let found = match self.memory.get(key) {
            Some(e) if e.expires_at > now => Some(e),
            _ => self.get_shared(key, now).await,
        };
        let result = if found.is_some() { "hit" } else { "miss" };
        self.metrics.lookups.with_label_values(&[result]).inc();
        found
    }

    async fn get_shared(&self, key: &CacheKey, now: i64) -> Option<Arc<Entry>> {
        let tier = self.redis.as_ref()?;
        let mut c = tier.connection().await?;
        let got: redis::RedisResult<Option<Vec<u8>>> =
            match tokio::time::timeout(REDIS_TIMEOUT, c.get(key.redis_key())).await {
                Ok(r) => r,
                Err(_) => Err(redis::RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                ))),
            };
        match got {
            Ok(Some(bytes)) => {
                let entry = Arc::new(Entry::decode(&bytes)?);
                if entry.expires_at <= now {
                    return None;
                }
                self.insert(*key, entry.clone());
                Some(entry)
            }
            Ok(None) => None,
            Err(e) => {
                self.metrics.redis_errors.inc();
                tracing::debug!(error = %e, "response cache: Redis read failed");
                None
            }
        }
    }

    /// Keeps `entry` under `key`: in memory now, in Redis in the background.
    pub fn put(&self, key: CacheKey, entry: Entry) {
        if entry.body.len() > self.max_entry_bytes() {
            return;
        }
        let ttl_ms = entry.expires_at - billing::now_ms();
        if ttl_ms <= 0 {
            return;
        }
        let entry = Arc::new(entry);
        self.insert(key, entry.clone());
        let (Some(tier), Ok(handle)) = (self.redis.clone(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let metrics = self.metrics.clone();
        handle.spawn(async move {
            let Some(mut c) = tier.connection().await else {
                return;
            };
            let set = c.pset_ex::<_, _, ()>(key.redis_key(), entry.encode(), ttl_ms as u64);
            let failed = !matches!(tokio::time::timeout(REDIS_TIMEOUT, set).await, Ok(Ok(())));
            if failed {
                metrics.redis_errors.inc();
            }
        });
    }

    /// Hits, misses and memory held.
    pub fn stats(&self) -> CacheStats {
        self.memory.run_pending_tasks();
        let (bytes, entries) = (self.memory.weighted_size(), self.memory.entry_count());
        let lookups = |r: &str| self.metrics.lookups.with_label_values(&[r]).get();
        CacheStats {
            hits: lookups("hit"),
            misses: lookups("miss"),
            bytes,
            entries,
            max_bytes: self.max_bytes,
            shared_tier: self.redis.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_calls_whose_body_fixes_the_answer_are_cacheable() {
        let chat = "/v1/chat/completions";
        assert!(cacheable("/v1/embeddings", &json!({"input": "x"})));
        assert!(cacheable(chat, &json!({"temperature": 0})));
        assert!(cacheable(
            chat,
            &json!({"temperature": 0.0, "stream": true})
        ));
        assert!(cacheable(chat, &json!({"temperature": 0.7, "seed": 3})));
        assert!(!cacheable(chat, &json!({})));
        assert!(!cacheable(chat, &json!({"temperature": 0.2})));
        assert!(!cacheable(chat, &json!({"seed": null})));
        assert!(!cacheable("/v1/responses", &json!({"temperature": 0})));
    }

    #[test]
    fn the_key_ignores_key_order_and_spacing_but_not_the_tenant_or_values() {
        let a: Value =
            serde_json::from_str(r#"{"model":"m","input":["a",{"x":1,"y":2}]}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{ "input": ["a", {"y": 2, "x": 1}], "model": "m" }"#).unwrap();
        let key = |tenant, body: &Value| CacheKey::new(tenant, "m", "/v1/embeddings", body);
        assert_eq!(key("t1", &a), key("t1", &b));
        assert_ne!(key("t1", &a), key("t2", &a));
        let c: Value =
            serde_json::from_str(r#"{"model":"m","input":["a",{"x":1,"y":3}]}"#).unwrap();
        assert_ne!(key("t1", &a), key("t1", &c));
        // The parts are length-prefixed: moving a byte between tenant and model changes it.
        assert_ne!(
            CacheKey::new("ab", "c", "/e", &a),
            CacheKey::new("a", "bc", "/e", &a)
        );
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(Directive::parse(None), Directive::Use);
        assert_eq!(Directive::parse(Some("max-age=0")), Directive::Use);
        assert_eq!(Directive::parse(Some("No-Cache")), Directive::Refresh);
        assert_eq!(
            Directive::parse(Some("no-cache, no-store")),
            Directive::Bypass
        );
    }

    #[test]
    fn entries_encode_and_decode() {
        let e = Entry {
            stream: true,
            prompt_tokens: 7,
            completion_tokens: u64::MAX,
            body: Bytes::from_static(b"data: {}\n\n"),
            expires_at: 1_800_000_000_000,
        };
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        assert_eq!(Entry::decode(&e.encode()[..24]), None);
        let mut bad = e.encode();
        bad[0] = 2;
        assert_eq!(Entry::decode(&bad), None);
    }

    #[tokio::test]
    async fn memory_entries_expire_and_the_bound_holds() {
        let cache = ResponseCache::new(64 * 1024, None, &Registry::new()).unwrap();
        let body = |n| Bytes::from(vec![b'x'; n]);
        let entry = |n, ttl_ms| Entry {
            stream: false,
            prompt_tokens: 1,
            completion_tokens: 0,
            body: body(n),
            expires_at: billing::now_ms() + ttl_ms,
        };
        let key = |i: u32| CacheKey::new("t", "m", "/v1/embeddings", &json!(i));
        cache.put(key(0), entry(100, 60_000));
        assert!(cache.get(&key(0)).await.is_some());
        cache.put(key(1), entry(100, 30));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(cache.get(&key(1)).await.is_none());
        // Larger than an eighth of the bound: never kept.
        cache.put(key(2), entry(9 * 1024, 60_000));
        assert!(cache.get(&key(2)).await.is_none());
        for i in 10..200 {
            cache.put(key(i), entry(1000, 60_000));
        }
        let stats = cache.stats();
        assert!(stats.bytes <= 64 * 1024, "{stats:?}");
        assert!(stats.entries < 190, "{stats:?}");
        assert_eq!((stats.hits, stats.misses), (1, 2));
    }
}
