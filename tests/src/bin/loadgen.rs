//! `loadgen`: an HTTP/1.1 load generator for the gateway benchmark.
//!
//! Two modes over `--connections` keep-alive connections:
//! - `--rate 0`: closed loop, each connection sends its next request when the previous
//!   answers; measures the most the target serves.
//! - `--rate R`: open loop, requests are due every 1/R s whatever the target does; latency
//!   is measured from when a request was due, so queueing behind a slow response counts
//!   (no coordinated omission).
//!
//! Prints one JSON line: achieved rate, errors, and latency percentiles in microseconds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: failing loudly is right

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Full URL to POST to.
    #[arg(long)]
    url: String,
    /// Bearer key, if the target wants one.
    #[arg(long)]
    key: Option<String>,
    /// JSON body of every request.
    #[arg(long)]
    body: String,
    /// Requests per second; 0 runs closed loop (as fast as the target answers).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of unmeasured warm-up before.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(authority: &str) -> Sender {
    let stream = TcpStream::connect(authority).await.expect("connecting");
    stream.set_nodelay(true).unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// One request; `Ok(())` for a 2xx with its body read.
async fn call(sender: &mut Sender, args: &Args, authority: &str, path: &str) -> Result<(), String> {
    let mut req = Request::post(path)
        .header("host", authority)
        .header("content-type", "application/json");
    if let Some(key) = &args.key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = req
        .body(Full::new(Bytes::from(args.body.clone())))
        .map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let uri: hyper::Uri = args.url.parse().expect("a valid --url");
    let authority = uri.authority().expect("an http URL").to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let start = Instant::now() + Duration::from_secs(args.warmup);
    let end = start + Duration::from_secs(args.seconds);
    let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Successes including the warm-up's: what a metered target must have recorded.
    let ok_total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    // Open loop: a shared schedule of due times; each connection takes the next one.
    let next_due = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let interval_ns = 1_000_000_000_u64.checked_div(args.rate).unwrap_or(0);
    let origin = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (args, authority, path) = (args.clone(), authority.clone(), path.clone());
        let (latencies, errors, first_error, next_due, ok_total) = (
            latencies.clone(),
            errors.clone(),
            first_error.clone(),
            next_due.clone(),
            ok_total.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&authority).await;
            let mut mine = Vec::new();
            loop {
                let due = if interval_ns > 0 {
                    let n = next_due.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let due = origin + Duration::from_nanos(n * interval_ns);
                    tokio::time::sleep_until(due.into()).await;
                    due
                } else {
                    Instant::now()
                };
                if due >= end {
                    break;
                }
                let outcome = call(&mut sender, &args, &authority, &path).await;
                let took = due.elapsed().as_micros() as u64;
                if outcome.is_ok() {
                    ok_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if due >= start {
                    match outcome {
                        Ok(()) => mine.push(took),
                        Err(e) => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            first_error.lock().await.get_or_insert(e);
                        }
                    }
                }
                if sender.is_closed() {
                    sender = connect(&authority).await;
                }
            }
            latencies.lock().await.extend(mine);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut all = latencies.lock().await.clone();
    all.sort_unstable();
    let seconds = args.seconds as f64;
    println!(
        "{}",
        serde_json::json!({
            "url": args.url,
            "target_rate": args.rate,
            "connections": args.connections,
            "completed": all.len(),
            "ok_total": ok_total.load(std::sync::atomic::Ordering::Relaxed),
            "rate": all.len() as f64 / seconds,
            "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
            "first_error": *first_error.lock().await,
            "p50_us": percentile(&all, 0.50),
            "p90_us": percentile(&all, 0.90),
            "p99_us": percentile(&all, 0.99),
            "p999_us": percentile(&all, 0.999),
        })
    );
}
