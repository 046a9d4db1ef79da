//! `create-classifier`: uploads labelled examples to a gateway's `/v1/classifiers` with a
//! key, then follows training with a progress bar.
//!
//! Owns: reading the example file and showing progress. Must never: train anything
//! itself or touch the store; the gateway does both.

use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use super::args::CreateClassifier;
use super::output;

/// Labelled examples from a CSV file with a `text,label` header, or JSONL.
fn read_examples(path: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "ndjson");
    let mut examples = Vec::new();
    if jsonl {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            anyhow::ensure!(
                v["text"].is_string() && v["label"].is_string(),
                "{}:{}: each line needs a string `text` and `label`",
                path.display(),
                i + 1
            );
            examples.push(json!({"text": v["text"], "label": v["label"]}));
        }
        return Ok(examples);
    }
    let mut reader = csv::Reader::from_path(path).with_context(|| path.display().to_string())?;
    let headers = reader.headers()?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .with_context(|| format!("{}: no `{name}` column in the header", path.display()))
    };
    let (text, label) = (column("text")?, column("label")?);
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        examples.push(json!({"text": record.get(text), "label": record.get(label)}));
    }
    Ok(examples)
}

async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        anyhow::bail!("the gateway answered {status}: {message}");
    }
    Ok(body)
}

pub async fn create(a: CreateClassifier, json: bool) -> anyhow::Result<()> {
    let examples = read_examples(&a.file)?;
    let options: Value = match &a.options {
        Some(o) => serde_json::from_str(o).context("--options is not JSON")?,
        None => json!({}),
    };
    let http = reqwest::Client::new();
    let base = a.url.trim_end_matches('/');
    eprintln!("uploading {} examples", examples.len());
    let mut classifier = send(
        http.post(format!("{base}/v1/classifiers"))
            .bearer_auth(&a.key)
            .json(&json!({"model": a.model, "name": a.name, "examples": examples, "options": options})),
    )
    .await?;
    let id = classifier["id"].as_str().unwrap_or_default().to_owned();
    if !a.no_wait {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        while classifier["status"] == "training" {
            let p = &classifier["progress"];
            bar.set_message(p["phase"].as_str().unwrap_or("queued").to_owned());
            bar.set_length(p["total"].as_u64().unwrap_or(1).max(1));
            bar.set_position(p["done"].as_u64().unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(500)).await;
            classifier = send(
                http.get(format!("{base}/v1/classifiers/{id}"))
                    .bearer_auth(&a.key),
            )
            .await?;
        }
        bar.finish_and_clear();
    }
    if json {
        return output::json(&classifier);
    }
    match classifier["status"].as_str() {
        Some("ready") => {
            let m = &classifier["metrics"];
            println!(
                "{id}\tready\taccuracy {:.3}\tmacro-F1 {:.3}\t{}",
                m["accuracy"].as_f64().unwrap_or(0.0),
                m["macro_f1"].as_f64().unwrap_or(0.0),
                m["architecture"].as_str().unwrap_or("")
            );
        }
        Some("failed") => anyhow::bail!(
            "{id} failed: {}",
            classifier["error"].as_str().unwrap_or("no reason given")
        ),
        _ => println!("{id}\ttraining"),
    }
    Ok(())
}
