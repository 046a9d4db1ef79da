//! Connection exhaustion: clients that connect and never send a byte, finish a TLS
//! handshake and go quiet, open HTTP/2 streams and stall, or simply open more connections
//! than the gateway allows. Each is closed (or refused) by the gateway within its
//! configured deadline while a well-behaved client keeps getting answers; its latency is
//! printed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e_tests::stub::{StubWorker, STUB_CHAT_MODEL};
use e2e_tests::{gateway_config, metric, wait_until, RunningGateway, TempSqlite};
use gateway::tenants::NewKey;
use gateway::GatewayConfig;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// Deadlines the gateways here run with, in seconds.
const HEADER_SECS: u64 = 1;
const IDLE_SECS: u64 = 2;
const BODY_SECS: u64 = 1;
/// How long after its deadline a connection may still be open before the test fails:
/// generous, for a loaded two-core machine holding thousands of sockets.
const SLACK: Duration = Duration::from_secs(15);

struct Setup {
    _stub: StubWorker,
    store: TempSqlite,
    gateway: RunningGateway,
    key: String,
    addr: SocketAddr,
}

async fn start(configure: impl FnOnce(&mut GatewayConfig, &std::path::Path)) -> Setup {
    let stub = StubWorker::start().await;
    let store = TempSqlite::new();
    let mut config = gateway_config(&store.url, std::slice::from_ref(&stub.url));
    config.header_read_timeout_secs = HEADER_SECS;
    config.idle_timeout_secs = IDLE_SECS;
    config.body_read_timeout_secs = BODY_SECS;
    configure(&mut config, store.dir());
    let gateway = RunningGateway::start(config).await;
    let (key, _) = gateway.tenant_with_key("flood", NewKey::default()).await;
    let addr = gateway.url.trim_start_matches("http://").parse().unwrap();
    Setup {
        _stub: stub,
        store,
        gateway,
        key,
        addr,
    }
}

/// How long `stream` stayed open from `opened` until the peer closed it (end of stream or
/// a reset), or `None` when it was still open `limit` after `opened`.
async fn closed_after<S: AsyncRead + Unpin>(
    mut stream: S,
    opened: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::from_std(opened + limit);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(opened.elapsed()),
            // TLS session tickets and the like: keep reading until the close.
            Ok(Ok(_)) => {}
        }
    }
}

/// Waits on every connection; panics naming how many were still open past `limit`.
async fn assert_all_closed(
    what: &str,
    waits: Vec<tokio::task::JoinHandle<Option<Duration>>>,
    limit: Duration,
) {
    let total = waits.len();
    let mut times = Vec::with_capacity(total);
    let mut open = 0;
    for w in waits {
        match w.await.unwrap() {
            Some(t) => times.push(t),
            None => open += 1,
        }
    }
    times.sort();
    eprintln!(
        "{what}: {} of {total} closed by the gateway; slowest after {:?}",
        times.len(),
        times.last()
    );
    assert_eq!(
        open, 0,
        "{what}: {open} of {total} still open {limit:?} after they were opened"
    );
}

/// A well-behaved client calling the gateway in a loop until told to stop (bounded in
/// count and time); returns its latencies and how many calls failed.
struct GoodClient {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<Duration>, usize)>,
}

impl GoodClient {
    fn start<F, Fut>(call: F) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = bool> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut latencies, mut failures) = (Vec::new(), 0);
            let until = Instant::now() + Duration::from_secs(120);
            while !stopped.load(Ordering::Relaxed)
                && latencies.len() < 5000
                && Instant::now() < until
            {
                let started = Instant::now();
                let call = tokio::time::timeout(Duration::from_secs(10), call()).await;
                latencies.push(started.elapsed());
                if call != Ok(true) {
                    failures += 1;
                }
            }
            (latencies, failures)
        });
        Self { stop, task }
    }

    /// Stops it, prints its latency and asserts every call was answered.
    async fn finish(self, what: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut latencies, failures) = self.task.await.unwrap();
        latencies.sort();
        let q = |p: f64| {
            latencies[((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1]
        };
        eprintln!(
            "{what}: well-behaved client: {} calls, {failures} failed, p50 {:?}, p99 {:?}, max {:?}",
            latencies.len(),
            q(0.5),
            q(0.99),
            latencies.last().unwrap()
        );
        assert!(!latencies.is_empty());
        assert_eq!(failures, 0, "{what}: the well-behaved client was refused");
    }
}

/// A chat call over a kept reqwest connection.
fn chat_client(url: &str, key: &str) -> GoodClient {
    let http = reqwest::Client::new();
    let url = format!("{url}/v1/chat/completions");
    let key = key.to_owned();
    GoodClient::start(move || {
        let request = http
            .post(&url)
            .bearer_auth(&key)
            .json(&serde_json::json!({"model": STUB_CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
            .send();
        async move { matches!(request.await, Ok(r) if r.status() == 200) }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_are_closed_and_others_served() {
    let s = start(|c, _| c.max_connections = 5000).await;
    let good = chat_client(&s.gateway.url, &s.key);
    let limit = Duration::from_secs(HEADER_SECS) + SLACK;
    let mut waits = Vec::new();
    let started = Instant::now();
    for _ in 0..2000 {
        let stream = TcpStream::connect(s.addr).await.unwrap();
        let opened = Instant::now();
        waits.push(tokio::spawn(closed_after(stream, opened, limit)));
    }
    eprintln!("2000 idle connections opened in {:?}", started.elapsed());
    assert_all_closed("idle TCP", waits, limit).await;
    good.finish("idle TCP").await;
    s.gateway.stop().await;
}

fn tls_client_config(cert_pem: &str) -> Arc<tokio_rustls::rustls::ClientConfig> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    roots.add(der).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<tokio_rustls::rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_after_the_handshake_are_closed() {
    let s = start(|config, dir| {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
        config.tls_cert = Some(dir.join("cert.pem"));
        config.tls_key = Some(dir.join("key.pem"));
    })
    .await;
    let pem = std::fs::read_to_string(s.store.dir().join("cert.pem")).unwrap();
    let client_config = tls_client_config(&pem);

    // The well-behaved client: a fresh TLS connection per call, HTTP/1.1 on it.
    let (addr, key) = (s.addr, s.key.clone());
    let http1_config = {
        let mut c = (*client_config).clone();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    };
    let good = GoodClient::start(move || {
        let (config, key) = (http1_config.clone(), key.clone());
        async move {
            let tls = tls_connect(addr, config).await;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let request = hyper::Request::get("/v1/models")
                .header("host", "localhost")
                .header("authorization", format!("Bearer {key}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            matches!(send.send_request(request).await, Ok(r) if r.status() == 200)
        }
    });

    let limit = Duration::from_secs(HEADER_SECS) + SLACK;
    let mut waits = Vec::new();
    for _ in 0..200 {
        let tls = tls_connect(s.addr, client_config.clone()).await;
        let opened = Instant::now();
        waits.push(tokio::spawn(closed_after(tls, opened, limit)));
    }
    assert_all_closed("idle TLS", waits, limit).await;
    good.finish("idle TLS").await;
    s.gateway.stop().await;
}

/// An HTTP/2 connection (cleartext, prior knowledge) driven in its own task; the task
/// ends when the gateway closes the connection. Publishes the server's stream limit.
async fn h2_connect(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
    Arc<AtomicUsize>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let max_streams = Arc::new(AtomicUsize::new(0));
    let published = max_streams.clone();
    let driver = tokio::spawn(async move {
        let _ = futures::future::poll_fn(|cx| {
            let polled = Pin::new(&mut conn).poll(cx);
            published.store(conn.max_concurrent_send_streams(), Ordering::Relaxed);
            polled
        })
        .await;
    });
    (send, driver, max_streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_streams_and_idle_http2_connections_are_closed() {
    const MAX_STREAMS: u32 = 8;
    let s = start(|c, _| c.http2_max_concurrent_streams = MAX_STREAMS).await;
    let good = chat_client(&s.gateway.url, &s.key);

    // A connection that finishes the HTTP/2 preface and then sends nothing.
    let (_idle_send, idle, _) = h2_connect(s.addr).await;
    let idle_opened = Instant::now();

    // Connections whose streams send headers and never their body, many streams each.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let (mut send, driver, max_streams) = h2_connect(s.addr).await;
        let opened = Instant::now();
        let mut streams = Vec::new();
        for _ in 0..3 * MAX_STREAMS {
            let request = http::Request::post("/v1/chat/completions")
                .header("authorization", format!("Bearer {}", s.key))
                .header("content-type", "application/json")
                .body(())
                .unwrap();
            match send.send_request(request, false) {
                // Keep the body half open: the stream stalls.
                Ok((response, body)) => streams.push((response, body)),
                Err(e) => {
                    eprintln!("opening a stream failed: {e}");
                    break;
                }
            }
        }
        stalled.push((driver, max_streams, opened, streams));
    }

    // Closed within the idle deadline after the preface.
    let idle_limit = Duration::from_secs(IDLE_SECS) + SLACK;
    let closed = tokio::time::timeout(idle_limit, idle).await;
    eprintln!(
        "idle HTTP/2 connection: closed after {:?}",
        idle_opened.elapsed()
    );
    assert!(
        closed.is_ok(),
        "an idle HTTP/2 connection was still open after {idle_limit:?}"
    );

    // Each stalled stream is answered (the body deadline), then the connection, left with
    // nothing in flight, is closed after the idle deadline.
    for (i, (driver, max_streams, opened, streams)) in stalled.into_iter().enumerate() {
        let n = streams.len();
        // Streams run MAX_STREAMS at a time, each batch for the body deadline.
        let batches = (n as u64).div_ceil(u64::from(MAX_STREAMS));
        let limit = Duration::from_secs(batches * BODY_SECS + IDLE_SECS) + SLACK;
        let closed =
            tokio::time::timeout_at(tokio::time::Instant::from_std(opened + limit), driver).await;
        let mut answered = 0;
        for (response, _body) in streams {
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(10), response).await {
                assert_eq!(r.status(), 408);
                answered += 1;
            }
        }
        let advertised = max_streams.load(Ordering::Relaxed);
        eprintln!(
            "stalled HTTP/2 connection {i}: {answered} of {n} streams answered 408 (the client holds the rest back under the limit), server allows {advertised} streams, closed after {:?}",
            opened.elapsed()
        );
        assert_eq!(
            advertised, MAX_STREAMS as usize,
            "the server's stream limit"
        );
        assert!(
            closed.is_ok(),
            "a stalled HTTP/2 connection was still open after {limit:?}"
        );
    }
    good.finish("stalled HTTP/2").await;
    s.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused_and_counted() {
    const CAP: usize = 50;
    let s = start(|c, _| {
        c.max_connections = CAP;
        // Long enough that the held connections stay while the cap is checked.
        c.header_read_timeout_secs = 30;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(TcpStream::connect(s.addr).await.unwrap());
    }
    let http = reqwest::Client::new();
    let open = |http: reqwest::Client, url: String| async move {
        metric(
            &http,
            &url,
            "gateway_open_connections{listener=\"consumer\"}",
        )
        .await
    };
    wait_until(
        "the held connections are counted",
        Duration::from_secs(10),
        || {
            let (http, url) = (http.clone(), s.gateway.metrics_url.clone());
            async move { open(http, url).await >= CAP as f64 }
        },
    )
    .await;

    // One more is accepted and closed at once.
    let extra = TcpStream::connect(s.addr).await.unwrap();
    let closed = closed_after(extra, Instant::now(), Duration::from_secs(5)).await;
    eprintln!("connection past the cap: closed after {closed:?}");
    assert!(
        closed.is_some(),
        "a connection past the cap of {CAP} was kept"
    );
    let refused = metric(
        &http,
        &s.gateway.metrics_url,
        "gateway_connections_refused_total{listener=\"consumer\"}",
    )
    .await;
    assert!(refused >= 1.0, "refused connections counted: {refused}");

    // Once they are gone, calls are served again.
    drop(held);
    wait_until(
        "the held connections are released",
        Duration::from_secs(10),
        || {
            let (http, url) = (http.clone(), s.gateway.metrics_url.clone());
            async move { open(http, url).await < CAP as f64 }
        },
    )
    .await;
    let response = http
        .get(format!("{}/v1/models", s.gateway.url))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    s.gateway.stop().await;
}
