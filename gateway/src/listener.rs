//! Accepting consumer connections: HTTP/1.1 and HTTP/2 (cleartext or TLS with ALPN),
//! a deadline on every phase of a connection so a client that connects and goes quiet
//! cannot hold it (TLS handshake, the first request, each HTTP/1.1 request's headers,
//! idle time between requests, HTTP/2 keep-alive pings), a cap on open connections, and
//! a graceful drain on shutdown. Connections are served on [`ServingThreads`]: one
//! single-threaded event loop per CPU, each connection handed to one and kept there.
//!
//! Must never: block a serving thread (no file or store I/O waits here; the spool and
//! the store have their own threads and tasks), or keep a connection past the cap.

mod deadline;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// The peer address of the connection a request came on, in the request's extensions:
/// what limits per client (failed authentications) key on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// A connection's service, putting its [`ClientAddr`] on each request.
#[derive(Clone)]
struct WithClientAddr<S> {
    inner: S,
    peer: std::net::SocketAddr,
}

impl<S> hyper::service::Service<hyper::Request<Incoming>> for WithClientAddr<S>
where
    S: hyper::service::Service<hyper::Request<Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ClientAddr(self.peer));
        self.inner.call(req)
    }
}

/// How connections are served.
#[derive(Clone)]
pub struct ServeOptions {
    /// Time a client has to finish the TLS handshake, then to send its first request's
    /// headers; also each later HTTP/1.1 request's headers.
    pub header_timeout: Duration,
    /// Time a connection may stay with no request in flight.
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 keep-alive pings; one unanswered for as long closes the connection.
    pub http2_keepalive: Duration,
    /// Open connections at most; past it a connection is accepted and closed.
    pub max_connections: usize,
    pub http2_max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    /// Open connections and those refused for the cap, this listener's series.
    pub open_connections: prometheus::IntGauge,
    pub refused_connections: prometheus::IntCounter,
    /// Time in-flight requests get after shutdown begins.
    pub grace: Duration,
    pub tls: Option<TlsAcceptor>,
    /// Threads to serve connections on; `None`: the caller's runtime.
    pub threads: Option<Arc<ServingThreads>>,
}

thread_local! {
    /// Which serving thread this is: 1.. on serving threads, 0 elsewhere.
    static SERVING_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index of the serving thread the caller runs on (1..=n), or 0 off them: for
/// per-thread resources such as connections to workers.
pub fn serving_index() -> usize {
    SERVING_INDEX.with(std::cell::Cell::get)
}

/// Threads each running a single-threaded event loop. A connection is handed to one of
/// them and stays there with everything it spawns (its requests, their connections to
/// workers), so serving a request costs no hand-off between threads; with several
/// threads the work-stealing scheduler moved tasks and woke parked threads for each
/// request.
pub struct ServingThreads {
    handles: Vec<tokio::runtime::Handle>,
    stops: std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<()>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl ServingThreads {
    pub fn start(n: usize) -> std::io::Result<Arc<Self>> {
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("gateway-serve-{}", i + 1))
                .spawn(move || {
                    SERVING_INDEX.with(|c| c.set(i + 1));
                    let _ = runtime.block_on(stopped);
                    // Tasks still there (idle connections to workers) are dropped here.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })?;
        }
        Ok(Arc::new(Self {
            handles,
            stops: std::sync::Mutex::new(stops),
            next: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The thread for the next connection, in turn.
    fn pick(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }

    /// Ends the threads' event loops (after the server has drained its connections).
    /// Dropping the last handle does too.
    pub fn stop(&self) {
        let stops = std::mem::take(&mut *self.stops.lock().unwrap_or_else(|e| e.into_inner()));
        for stop in stops {
            let _ = stop.send(());
        }
    }
}

/// Builds a TLS acceptor from PEM files, offering HTTP/2 and HTTP/1.1 by ALPN.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert)?))
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key)?))?
        .ok_or_else(|| anyhow::anyhow!("no private key in {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Drop for ServingThreads {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An accepted connection: served on this runtime, or moved to a serving thread.
enum Accepted {
    Here(tokio::net::TcpStream),
    Moved(std::net::TcpStream),
}

/// After a connection is told to close, the longest it gets to say goodbye (an HTTP/2
/// GOAWAY, a TLS close) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A connection counted as open (and holding a place under the cap) until dropped.
struct OpenConnection {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Serves `service` (one clone per connection) until `stop` turns true, then drains for
/// up to `options.grace`.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    options: ServeOptions,
    mut stop: watch::Receiver<bool>,
) where
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(options.http2_keepalive)
        .keep_alive_timeout(options.http2_keepalive)
        .max_concurrent_streams(options.http2_max_concurrent_streams)
        .max_header_list_size(options.max_header_list_bytes);
    let builder = Arc::new(builder);
    let slots = Arc::new(tokio::sync::Semaphore::new(options.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        // Past the cap: accepted and closed at once, so the backlog does not fill with
        // clients waiting on a connection that will not be served.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            options.refused_connections.inc();
            tracing::debug!(%peer, "connection refused: at the connection cap");
            drop(stream);
            continue;
        };
        options.open_connections.inc();
        let open = OpenConnection {
            _permit: permit,
            gauge: options.open_connections.clone(),
        };
        let _ = stream.set_nodelay(true);
        let threads = options.threads.as_ref().filter(|t| !t.is_empty());
        // A socket moves to a serving thread unregistered, to be registered with that
        // thread's event loop: its readiness then never goes through this one.
        let stream = match threads {
            None => Accepted::Here(stream),
            Some(_) => match stream.into_std() {
                Ok(s) => Accepted::Moved(s),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "handing a connection over failed");
                    continue;
                }
            },
        };
        let service = WithClientAddr {
            inner: service.clone(),
            peer,
        };
        let builder = builder.clone();
        let tls = options.tls.clone();
        let deadlines = Deadlines {
            header: options.header_timeout,
            idle: options.idle_timeout,
        };
        let stop = stop.clone();
        // Reap finished connection tasks so the set stays small.
        while connections.try_join_next().is_some() {}
        let connection = async move {
            let _open = open;
            let stream = match stream {
                Accepted::Here(s) => s,
                Accepted::Moved(s) => match tokio::net::TcpStream::from_std(s) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "registering a connection failed");
                        return;
                    }
                },
            };
            let served = match tls {
                None => serve_connection(&builder, stream, service, deadlines, stop).await,
                Some(acceptor) => {
                    let Ok(Ok(tls_stream)) =
                        tokio::time::timeout(deadlines.header, acceptor.accept(stream)).await
                    else {
                        tracing::debug!(%peer, "TLS handshake failed or timed out");
                        return;
                    };
                    serve_connection(&builder, tls_stream, service, deadlines, stop).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        };
        match threads {
            Some(threads) => {
                connections.spawn_on(connection, threads.pick());
            }
            None => {
                connections.spawn(connection);
            }
        }
    }
    // Closed before the drain: a new connection is refused at once (so a readiness check
    // fails from the drain's start) rather than left waiting in the backlog.
    drop(listener);
    // Each connection saw `stop` and is closing once its requests are done.
    let drained = tokio::time::timeout(options.grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        // Cut what is left; dropping a stream's meter spools what it delivered.
        tracing::warn!(
            connections = connections.len(),
            "grace period over; closing in-flight requests"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

#[derive(Clone, Copy)]
struct Deadlines {
    /// To reach the first request (after any TLS handshake).
    header: Duration,
    /// With no request in flight.
    idle: Duration,
}

/// Serves one connection until it ends, closing it when it misses a deadline (see
/// [`deadline`]) or when `stop` turns true (after its requests are done).
async fn serve_connection<I, S, B>(
    builder: &Builder<TokioExecutor>,
    io: I,
    service: S,
    deadlines: Deadlines,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = deadline::Activity::new();
    let service = deadline::Tracked {
        inner: service,
        activity: activity.clone(),
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    let mut check_at = activity
        .deadline(deadlines.header, deadlines.idle)
        .unwrap_or_else(|| Instant::now() + deadlines.idle);
    loop {
        tokio::select! {
            served = conn.as_mut() => return served,
            _ = stop.wait_for(|s| *s), if !closing => {
                // Closes once in-flight requests are done; the server's grace bounds that.
                conn.as_mut().graceful_shutdown();
                closing = true;
                check_at = Instant::now() + Duration::from_secs(u32::MAX.into());
            }
            _ = tokio::time::sleep_until(check_at) => {
                if closing {
                    return Ok(());
                }
                let now = Instant::now();
                match activity.deadline(deadlines.header, deadlines.idle) {
                    Some(at) if at <= now => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                        check_at = now + CLOSE_GRACE;
                    }
                    Some(at) => check_at = at,
                    // A request in flight: its own deadlines bound it; look again later.
                    None => check_at = now + deadlines.idle,
                }
            }
        }
    }
}
