//! The consumer listener: TLS with a real TLS client (curl), HTTP/2, deadlines for slow
//! clients, and a graceful shutdown that lets an in-flight stream finish and records it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::{open_stream, read_deltas, Stack, CHAT_MODEL};
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_and_http2_with_a_real_client() {
    let Stack {
        worker: _worker,
        store,
        gateway,
        key,
        ..
    } = Stack::start_with("tls", |config, dir| {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
        config.tls_cert = Some(dir.join("cert.pem"));
        config.tls_key = Some(dir.join("key.pem"));
    })
    .await;
    let cert_path = store.dir().join("cert.pem");
    let port = gateway.url.rsplit(':').next().unwrap().to_owned();
    let url = format!("https://localhost:{port}/v1/models");
    let auth = format!("Authorization: Bearer {key}");
    let cacert = cert_path.to_str().unwrap().to_owned();

    let (out, err) = tokio::task::spawn_blocking({
        let (url, auth, cacert) = (url.clone(), auth.clone(), cacert.clone());
        move || {
            curl(&[
                "--cacert",
                &cacert,
                "--http2",
                "-H",
                &auth,
                "-w",
                "\n%{http_version} %{http_code}",
                &url,
            ])
        }
    })
    .await
    .unwrap();
    assert!(out.ends_with("2 200"), "HTTP/2 over TLS: {out} {err}");
    assert!(out.contains(CHAT_MODEL));

    let (out, _) = tokio::task::spawn_blocking({
        let (url, auth, cacert) = (url.clone(), auth.clone(), cacert.clone());
        move || {
            curl(&[
                "--cacert",
                &cacert,
                "--http1.1",
                "-H",
                &auth,
                "-w",
                "\n%{http_version} %{http_code}",
                &url,
            ])
        }
    })
    .await
    .unwrap();
    assert!(out.ends_with("1.1 200"), "HTTP/1.1 over TLS: {out}");

    // Plain HTTP to the TLS port is refused, not served.
    let plain = format!("http://localhost:{port}/v1/models");
    let (out, _) = tokio::task::spawn_blocking(move || curl(&["-w", "%{http_code}", &plain]))
        .await
        .unwrap();
    assert!(!out.ends_with("200"));
    // An untrusted certificate is rejected by the client, as it should be.
    let (_, err) = tokio::task::spawn_blocking(move || curl(&["-H", &auth, &url]))
        .await
        .unwrap();
    assert!(err.contains("certificate"), "{err}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_cannot_hold_connections() {
    let Stack {
        worker: _worker,
        store: _store,
        gateway,
        key,
        ..
    } = Stack::start_with("slow", |config, _| {
        config.header_read_timeout_secs = 1;
        config.body_read_timeout_secs = 1;
    })
    .await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();

    // Headers that never finish: the connection is closed after the header deadline.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the server kept a header-less connection open for 5 s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );

    // A body that never finishes: 408 after the body deadline.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\""
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&buf[..n]);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("request_timeout"));

    // HTTP/2 without TLS (prior knowledge) is served too.
    let url = format!("{}/v1/models", gateway.url);
    let auth = format!("Authorization: Bearer {key}");
    let (out, err) = tokio::task::spawn_blocking(move || {
        curl(&[
            "--http2-prior-knowledge",
            "-H",
            &auth,
            "-w",
            "\n%{http_version} %{http_code}",
            &url,
        ])
    })
    .await
    .unwrap();
    assert!(out.ends_with("2 200"), "{out} {err}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_finishes_and_records_an_in_flight_stream() {
    let Stack {
        worker: _worker,
        store,
        gateway,
        key,
        ..
    } = Stack::start_with("drain", |config, _| config.shutdown_grace_secs = 120).await;
    let body = json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
                      "max_tokens": 40, "temperature": 0, "stream": true});
    let (request_id, mut stream) = open_stream(&gateway.url, &key, body).await;
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));

    // Shut down while the stream is in flight; it must still finish, while new
    // connections are refused from the drain's start (a readiness check fails).
    let address = gateway.url.trim_start_matches("http://").to_owned();
    let stopping = tokio::spawn(gateway.stop());
    let refused = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while tokio::net::TcpStream::connect(&address).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "new connections still accepted while draining"
    );
    let mut text = String::from_utf8_lossy(&first).into_owned();
    let mut chunks_after_refusal = 0;
    while let Some(chunk) = stream.next().await {
        chunks_after_refusal += 1;
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        chunks_after_refusal > 1,
        "the stream went on after the listener closed"
    );
    stopping.await.unwrap();
    // The gateway closed its pool on the way out; look with a fresh one.
    let db = billing::Db::connect(&store.url).await.unwrap();
    let record = billing::Ledger::new(db)
        .get(&request_id)
        .await
        .unwrap()
        .expect("recorded on shutdown");
    assert_eq!(record.status, billing::UsageStatus::Success);
    assert_eq!(record.delivery, billing::Delivery::Delivered);
    assert!(record.completion_tokens > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_cut_by_the_grace_period_is_billed_for_what_was_delivered() {
    let Stack {
        worker: _worker,
        store,
        gateway,
        key,
        ..
    } = Stack::start_with("cut", |config, _| config.shutdown_grace_secs = 1).await;
    let body = json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
                      "max_tokens": 2000, "temperature": 0, "stream": true});
    let (request_id, mut stream) = open_stream(&gateway.url, &key, body).await;
    // Read a few content chunks (the role delta and three more), then shut down under the stream.
    let mut received = read_deltas(&mut stream, 3).await;
    let stopping = tokio::spawn(gateway.stop());
    while let Some(Ok(chunk)) = stream.next().await {
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    stopping.await.unwrap();
    assert!(
        !received.contains("[DONE]"),
        "the stream should have been cut"
    );
    let db = billing::Db::connect(&store.url).await.unwrap();
    let record = billing::Ledger::new(db)
        .get(&request_id)
        .await
        .unwrap()
        .expect("a cut stream is still recorded");
    assert_eq!(record.status, billing::UsageStatus::ClientCancelled);
    assert!(record.prompt_tokens > 0);
    let chunks = received.matches("\"content\"").count() as i64;
    // Every content chunk but the first (the role delta) carries at least one token. The
    // worker counts a token in the `: usage` comment that follows its chunk, so a cut
    // between the two bills that last token not at all: never more than was sent.
    assert!(
        record.completion_tokens >= chunks - 2,
        "{} tokens for {chunks} chunks",
        record.completion_tokens
    );
}
