//! What a test does as a client of a gateway or worker: scrapes of metrics, streamed
//! calls, request ids.
//!
//! Owns: reading responses the way every test reads them. Must never: start or stop
//! anything a test talks to.

use std::process::{Command, Stdio};

use futures::stream::BoxStream;
use futures::StreamExt;

/// The text of a GET (a metrics scrape, say).
pub async fn scrape(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// The sum of a Prometheus series' samples (all label sets) at `metrics_url`.
pub async fn metric(http: &reqwest::Client, metrics_url: &str, name: &str) -> f64 {
    scrape(http, metrics_url)
        .await
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `promtool check metrics` on a scrape; panics with its complaints.
pub fn promtool_check(scrape: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install it (Debian: apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens a streamed chat completion through a gateway; returns its request id and the
/// SSE byte stream.
pub async fn open_stream(
    gateway_url: &str,
    key: &str,
    body: serde_json::Value,
) -> (String, BoxStream<'static, reqwest::Result<bytes::Bytes>>) {
    let response = reqwest::Client::new()
        .post(format!("{gateway_url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    (request_id(&response), response.bytes_stream().boxed())
}

/// Reads until `n` content deltas (after the role delta) have arrived; returns the text read.
pub async fn read_deltas(
    stream: &mut BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    n: usize,
) -> String {
    let mut seen = String::new();
    while seen.matches("\"content\"").count() < n + 1 {
        seen.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    seen
}

/// The `x-request-id` a gateway gave a response.
pub fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}
