//! Keep-alive HTTP/1.1 connections from the gateway to its workers.
//!
//! Owns: opening connections (with a connect timeout, without Nagle's delay), keeping the
//! idle ones per worker, lending each to one request at a time, and taking it back once
//! that request's response body has been read to its end. Each serving thread has its own
//! [`Upstream`], so a connection's reads and writes stay on the event loop that serves the
//! requests sent on it, and the idle list's lock is never contended.
//!
//! Must never: send a request again that a worker may have received. Only a request the
//! connection never took (a kept connection the worker had closed meanwhile) goes out again,
//! on a new connection; every other failure goes to the caller, which decides about other
//! workers.
//!
//! hyper-util's pooled client does the same job for any scheme, host and protocol; for a
//! few plain-HTTP workers per thread this costs a fraction of its checkout, pool-key hashing
//! and give-back, which were a tenth of the gateway's own work per request.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::http::uri::Authority;
use hyper_util::rt::TokioIo;

/// Idle connections kept per worker, per serving thread; more are closed when returned.
const MAX_IDLE_PER_WORKER: usize = 512;

/// A request to a worker: its body is always whole in memory.
pub type UpstreamRequest = hyper::Request<Full<Bytes>>;

type Sender = SendRequest<Full<Bytes>>;

/// Why a request did not get a response head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be opened: the worker never saw the request.
    #[error("connecting to {worker}: {reason}")]
    Connect { worker: String, reason: String },
    /// The connection failed after it took the request; the worker may have seen it.
    #[error(transparent)]
    Request(#[from] hyper::Error),
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }
}

/// One serving thread's connections to the workers.
pub struct Upstream {
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<IdleConnections>,
}

struct IdleConnections {
    /// Per worker authority, newest last. A handful of workers: a list beats a hash.
    by_worker: Vec<(Authority, Vec<(Sender, Instant)>)>,
    pruned_at: Instant,
}

impl IdleConnections {
    fn list(&mut self, worker: &Authority) -> Option<&mut Vec<(Sender, Instant)>> {
        self.by_worker
            .iter_mut()
            .find(|(a, _)| a == worker)
            .map(|(_, list)| list)
    }

    /// Closes connections idle too long or closed by the worker, and forgets workers with
    /// none left (workers that left the pool included).
    fn prune(&mut self, idle_timeout: Duration) {
        for (_, list) in &mut self.by_worker {
            list.retain(|(sender, since)| !sender.is_closed() && since.elapsed() < idle_timeout);
        }
        self.by_worker.retain(|(_, list)| !list.is_empty());
        self.pruned_at = Instant::now();
    }
}

impl Upstream {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(IdleConnections {
                by_worker: Vec::new(),
                pruned_at: Instant::now(),
            }),
        })
    }

    /// Idle connections kept now, over all workers.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lock().by_worker.iter().map(|(_, l)| l.len()).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdleConnections> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `request` (origin-form URI, `Host` set) to `worker`, on an idle connection to
    /// it when one is ready, else on a new one. The response's body gives the connection
    /// back when it has been read to the end; dropped before, it closes the connection, which
    /// tells the worker to stop.
    pub async fn send(
        self: &Arc<Self>,
        worker: &Authority,
        mut request: UpstreamRequest,
    ) -> Result<hyper::Response<UpstreamBody>, UpstreamError> {
        while let Some(mut sender) = self.take_idle(worker) {
            // Given back as its last response ended, it may not have turned idle yet.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.lend(worker, sender, response)),
                Err(mut e) => match e.take_message() {
                    // The connection was gone before it took the request: try another.
                    Some(unsent) => request = unsent,
                    None => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
        let mut sender = self.connect(worker).await?;
        let response = sender.send_request(request).await?;
        Ok(self.lend(worker, sender, response))
    }

    /// The newest idle connection to `worker` still open.
    fn take_idle(&self, worker: &Authority) -> Option<Sender> {
        let mut idle = self.lock();
        let list = idle.list(worker)?;
        while let Some((sender, since)) = list.pop() {
            if !sender.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self, worker: &Authority) -> Result<Sender, UpstreamError> {
        let failed = |reason: String| UpstreamError::Connect {
            worker: worker.to_string(),
            reason,
        };
        let addr = (connect_host(worker), worker.port_u16().unwrap_or(80));
        let stream =
            tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| failed(format!("timed out after {:?}", self.connect_timeout)))?
                .map_err(|e| failed(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| failed(e.to_string()))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(e.to_string()))?;
        // Driven on this thread's event loop until the worker or the gateway closes it.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "worker connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn lend(
        self: &Arc<Self>,
        worker: &Authority,
        sender: Sender,
        response: hyper::Response<Incoming>,
    ) -> hyper::Response<UpstreamBody> {
        let (parts, body) = response.into_parts();
        let mut body = UpstreamBody {
            done: body.is_end_stream(),
            body,
            lent: Some(Lent {
                upstream: self.clone(),
                worker: worker.clone(),
                sender,
            }),
        };
        if body.done {
            body.give_back();
        }
        hyper::Response::from_parts(parts, body)
    }

    fn give_back(&self, worker: Authority, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.pruned_at.elapsed() >= Duration::from_secs(1) {
            idle.prune(self.idle_timeout);
        }
        let entry = (sender, Instant::now());
        match idle.list(&worker) {
            Some(list) if list.len() < MAX_IDLE_PER_WORKER => list.push(entry),
            Some(_) => {}
            None => idle.by_worker.push((worker, vec![entry])),
        }
    }
}

/// The host to connect to: an IPv6 literal without its URI brackets (`[::1]` → `::1`), which
/// workers found by DNS have when the name resolves to IPv6 addresses.
fn connect_host(worker: &Authority) -> &str {
    let host = worker.host();
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// A connection lent to one request.
struct Lent {
    upstream: Arc<Upstream>,
    worker: Authority,
    sender: Sender,
}

/// A worker's response body, holding the connection it arrives on until it ends.
pub struct UpstreamBody {
    body: Incoming,
    done: bool,
    lent: Option<Lent>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("done", &self.done)
            .field("holds_connection", &self.lent.is_some())
            .finish()
    }
}

impl UpstreamBody {
    fn give_back(&mut self) {
        if let Some(lent) = self.lent.take() {
            lent.upstream.give_back(lent.worker, lent.sender);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                this.done = true;
                this.give_back();
            }
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => {
                this.done = true;
                this.give_back();
            }
            // A broken body: the connection is not given back (dropping it closes it).
            Poll::Ready(Some(Err(_))) => {
                this.done = true;
                this.lent = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const REPLY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// A worker stand-in over raw TCP: answers `per_connection` requests on each
    /// connection with `REPLY`, then closes it. Counts the connections it accepted.
    async fn worker(per_connection: usize) -> (Authority, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    for _ in 0..per_connection {
                        if !read_request(&mut socket).await {
                            return;
                        }
                        socket.write_all(REPLY).await.unwrap();
                    }
                    // Closed after the last answer, as a worker's keep-alive timeout would.
                });
            }
        });
        (authority, accepted)
    }

    /// Reads one request head (the requests here have empty bodies); false at EOF.
    async fn read_request(socket: &mut tokio::net::TcpStream) -> bool {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match socket.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    }

    fn request(worker: &Authority) -> UpstreamRequest {
        hyper::Request::post("/v1/chat/completions")
            .header(hyper::header::HOST, worker.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn call(upstream: &Arc<Upstream>, worker: &Authority) -> Bytes {
        let response = upstream.send(worker, request(worker)).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    }

    fn upstream() -> Arc<Upstream> {
        Upstream::new(Duration::from_secs(2), Duration::from_secs(60))
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (worker, accepted) = worker(usize::MAX).await;
        let upstream = upstream();
        for _ in 0..5 {
            assert_eq!(call(&upstream, &worker).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(upstream.idle_count(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_and_all_are_kept() {
        let (worker, accepted) = worker(usize::MAX).await;
        let upstream = upstream();
        let (a, b, c) = tokio::join!(
            upstream.send(&worker, request(&worker)),
            upstream.send(&worker, request(&worker)),
            upstream.send(&worker, request(&worker)),
        );
        for response in [a, b, c] {
            let body = response.unwrap().into_body().collect().await.unwrap();
            assert_eq!(body.to_bytes(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(upstream.idle_count(), 3);
        assert_eq!(call(&upstream, &worker).await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "a kept connection is reused"
        );
    }

    #[tokio::test]
    async fn a_kept_connection_the_worker_closed_is_replaced_without_an_error() {
        // One answer per connection: every kept connection is closed by the time it is
        // used again, which the caller must never see.
        let (worker, accepted) = worker(1).await;
        let upstream = upstream();
        for _ in 0..5 {
            assert_eq!(call(&upstream, &worker).await, "ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let worker: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            assert!(read_request(&mut socket).await);
            // A stream that has only begun.
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await
                .unwrap();
            let mut rest = [0u8; 64];
            let eof = matches!(socket.read(&mut rest).await, Ok(0) | Err(_));
            let _ = closed_tx.send(eof);
        });
        let upstream = upstream();
        let response = upstream.send(&worker, request(&worker)).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "hello");
        drop(body);
        let closed = tokio::time::timeout(Duration::from_secs(5), closed_rx)
            .await
            .expect("the worker saw the connection close")
            .unwrap();
        assert!(closed);
        assert_eq!(upstream.idle_count(), 0);
    }

    #[test]
    fn ipv6_workers_are_connected_to_without_brackets() {
        let host = |a: &str| connect_host(&a.parse().unwrap()).to_owned();
        assert_eq!(host("[::1]:8080"), "::1");
        assert_eq!(host("[fd00::5]:80"), "fd00::5");
        assert_eq!(host("10.0.0.5:8080"), "10.0.0.5");
        assert_eq!(host("worker:8080"), "worker");
    }

    #[tokio::test]
    async fn an_unreachable_worker_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let worker: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let err = upstream()
            .send(&worker, request(&worker))
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err}");
    }
}
