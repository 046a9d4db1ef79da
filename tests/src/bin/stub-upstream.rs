//! `stub-upstream`: the test stub as a process, for the gateway benchmark: an upstream
//! that answers at once (see `e2e_tests::stub`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: failing loudly is right

#[tokio::main]
async fn main() {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = tokio::net::TcpListener::bind(&listen).await.unwrap();
    println!(
        "stub-upstream listening on http://{}",
        listener.local_addr().unwrap()
    );
    axum::serve(listener, e2e_tests::stub::router())
        .await
        .unwrap();
}
