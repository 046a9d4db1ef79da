//! A real worker process with the real models, for the worker's API tests.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const CHAT: &str = "SmolLM2-135M-Instruct";
pub const EMBED: &str = "all-MiniLM-L6-v2";

pub struct Worker {
    child: Child,
    pub url: String,
    pub http: reqwest::Client,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the models are: `MODELS_DIR`, else the checkout's `models/`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

pub async fn worker(extra: &[&str]) -> Worker {
    let models = models_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_inference-worker"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--chat-model")
        .arg(models.join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .arg("--embedding-model")
        .arg(models.join("all-MiniLM-L6-v2"))
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("inference-worker listening on ")
        .unwrap()
        .to_owned();
    let w = Worker {
        child,
        url,
        http: reqwest::Client::new(),
    };
    let started = Instant::now();
    loop {
        if let Ok(r) = w.http.get(format!("{}/health", w.url)).send().await {
            if r.status() == 200 {
                return w;
            }
            assert_eq!(r.status(), 503, "health is 503 until the models are loaded");
            assert!(r.headers().contains_key("retry-after"));
        }
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Worker {
    pub async fn post(&self, path: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn chat(&self, extra: Value) -> Value {
        let mut body = json!({"model": CHAT, "messages": [{"role": "user", "content": "Tell me about the sea."}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, _, v) = self.post("/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}
