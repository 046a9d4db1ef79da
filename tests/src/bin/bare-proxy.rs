//! `bare-proxy`: the least a proxy built on our HTTP stack can do, for the gateway
//! benchmark. A hyper 1.x HTTP/1.1 server that forwards every request, as it came, to one
//! upstream through hyper's pooled keep-alive client, and streams the answer back: no
//! auth, no JSON, no limits, no metering, no metrics. Like the gateway it runs one
//! single-threaded event loop per CPU (each with its own `SO_REUSEPORT` listener and its
//! own upstream connections), so the benchmark can tell what the stack itself costs
//! from what the gateway adds on top of it.
//!
//! Usage: `bare-proxy <upstream base URL>`; prints `bare-proxy listening on <url>`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: failing loudly is right

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Upstream = Client<HttpConnector, Incoming>;

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
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (client, upstream) = (client.clone(), upstream.clone());
            tokio::spawn(async move {
                let service =
                    service_fn(move |mut req: hyper::Request<Incoming>| {
                        let client = client.clone();
                        let mut parts = upstream.clone().into_parts();
                        parts.path_and_query =
                            Some(req.uri().path_and_query().cloned().unwrap_or_else(|| {
                                hyper::http::uri::PathAndQuery::from_static("/")
                            }));
                        *req.uri_mut() = hyper::Uri::from_parts(parts).unwrap();
                        async move { client.request(req).await }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
