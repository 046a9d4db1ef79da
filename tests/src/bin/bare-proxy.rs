//! `bare-proxy`: the least a proxy built on our HTTP stack can do, for the gateway
//! benchmark. A hyper 1.x HTTP/1.1 server that reads every request's body and forwards it,
//! with its path, to one upstream over the gateway's own keep-alive connections
//! (`gateway::upstream`), and streams the answer back: no auth, no JSON, no limits, no
//! metering, no metrics. Like the gateway it runs one single-threaded event loop per CPU
//! (each with its own `SO_REUSEPORT` listener and its own upstream connections), so the
//! benchmark can tell what the stack itself costs from what the gateway adds on top of it.
//!
//! Usage: `bare-proxy <upstream base URL>`; prints `bare-proxy listening on <url>`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: failing loudly is right

use std::net::SocketAddr;
use std::time::Duration;

use gateway::upstream::Upstream;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

fn main() {
    let upstream: hyper::Uri = std::env::args()
        .nth(1)
        .expect("usage: bare-proxy <upstream base URL>")
        .parse()
        .expect("the upstream must be a URL");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The first listener picks the port; the others share it. (Tokio binds within a
    // runtime; each serving thread then registers its listener with its own.)
    let binder = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let _entered = binder.enter();
    let first = bind("127.0.0.1:0".parse().unwrap());
    let addr = first.local_addr().unwrap();
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(bind(addr));
    }
    println!("bare-proxy listening on http://{addr}");
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|socket| {
            let upstream = upstream.clone();
            std::thread::spawn(move || serve(socket, upstream))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

fn bind(addr: SocketAddr) -> std::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(1024).unwrap();
    listener.into_std().unwrap()
}

fn serve(socket: std::net::TcpListener, upstream: hyper::Uri) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(socket).unwrap();
        let client = Upstream::new(Duration::from_secs(2), Duration::from_secs(60));
        let authority = upstream.authority().unwrap().clone();
        let host = hyper::header::HeaderValue::from_str(authority.as_str()).unwrap();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (client, authority, host) = (client.clone(), authority.clone(), host.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let (client, authority, host) =
                        (client.clone(), authority.clone(), host.clone());
                    forward(client, authority, host, req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One request, body read whole, sent on with its method, path and headers.
async fn forward(
    client: std::sync::Arc<Upstream>,
    authority: hyper::http::uri::Authority,
    host: hyper::header::HeaderValue,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<gateway::upstream::UpstreamBody>, BoxError> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut forwarded = hyper::Request::new(Full::new(body));
    *forwarded.method_mut() = parts.method;
    *forwarded.uri_mut() = parts
        .uri
        .path_and_query()
        .map_or_else(|| hyper::Uri::from_static("/"), |p| p.clone().into());
    *forwarded.headers_mut() = parts.headers;
    forwarded.headers_mut().insert(hyper::header::HOST, host);
    Ok(client.send(&authority, forwarded).await?)
}
