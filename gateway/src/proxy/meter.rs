//! Passing a worker's SSE stream to the client while metering it.
//!
//! Owns: reading the stream event by event, keeping the worker's running count (its usage
//! comments, then the usage chunk), hiding the usage chunk from a client that did not ask
//! for it, and finishing the call exactly once: before `[DONE]` goes out, when the worker
//! fails or ends early, or when the client leaves. Must never: send `[DONE]` before the
//! usage is durable, or bill an early end for more than the worker had delivered.

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use billing::UsageStatus;
use futures::{FutureExt, Stream, StreamExt};
use http_body_util::BodyExt;

use super::cache::Capture;
use super::outcome::OutcomeOnEnd;
use super::usage::{UsageRecorder, Used, WorkerJson};
use crate::pool::WorkerSlot;
use crate::upstream::UpstreamBody;

/// A metered SSE response of the worker's `upstream` stream; the worker's `slot` is held
/// until the stream ends.
pub(super) fn metered_response(
    recorder: UsageRecorder,
    slot: WorkerSlot,
    upstream: hyper::Response<UpstreamBody>,
    client_wants_usage: bool,
    capture: Option<Capture>,
) -> Response {
    let meter = StreamMeter {
        recorder: Some(recorder),
        counted: Used::default(),
        outcome: None,
        capture,
        _slot: slot,
    };
    let body = metered(
        upstream.into_body().into_data_stream(),
        meter,
        client_wants_usage,
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Tracks a stream's usage; if dropped before the stream completed (the client left),
/// spools what was delivered.
struct StreamMeter {
    /// Until the call is finished.
    recorder: Option<UsageRecorder>,
    counted: Used,
    /// Set once a success is spooled; reports the outcome when the stream ends, or
    /// "undelivered" if the meter is dropped first.
    outcome: Option<OutcomeOnEnd>,
    /// What the client is sent, for the response cache; stored only on success.
    capture: Option<Capture>,
    _slot: WorkerSlot,
}

impl StreamMeter {
    /// Finishes the call with what was counted; whether its usage was spooled.
    async fn record(&mut self, status: UsageStatus) -> bool {
        let Some(recorder) = self.recorder.take() else {
            return false;
        };
        match recorder.finish(self.counted, status).durable().await {
            Ok(outcome) => {
                self.outcome = Some(outcome);
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for StreamMeter {
    fn drop(&mut self) {
        // A pending outcome reports itself as undelivered when `self.outcome` drops.
        if let Some(recorder) = self.recorder.take() {
            recorder
                .finish(self.counted, UsageStatus::ClientCancelled)
                .queued();
        }
    }
}

/// What one upstream SSE event means to the meter.
enum SseEvent<'a> {
    /// `: usage P C [K]` from the worker.
    Counted(Used),
    Comment,
    Done,
    /// A Responses stream's last event, with the reply's usage: billed, then sent on.
    Final,
    Data(&'a str),
}

fn classify_event(event: &str) -> SseEvent<'_> {
    if let Some(usage) = openai_types::parse_usage_comment(event) {
        return SseEvent::Counted(Used::of(&usage));
    }
    if event.starts_with(':') {
        return SseEvent::Comment;
    }
    // A Responses API event names its type on an `event:` line before its data.
    let (mut name, mut data) = (None, None);
    for line in event.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = name.or(Some(v.trim()));
        } else if let Some(v) = line.strip_prefix("data:") {
            data = data.or(Some(v.trim()));
        }
    }
    match (name, data) {
        (_, Some("[DONE]")) => SseEvent::Done,
        (Some(FINAL_EVENT | INCOMPLETE_EVENT), Some(_)) => SseEvent::Final,
        (_, Some(data)) => SseEvent::Data(data),
        (_, None) => SseEvent::Comment,
    }
}

/// The Responses API's last events: after them nothing is sent, and no `[DONE]`.
const FINAL_EVENT: &str = "response.completed";
const INCOMPLETE_EVENT: &str = "response.incomplete";

/// Passes the worker's SSE stream through, reading usage from it, hiding the usage chunk
/// if the client did not ask for it, and recording usage before `[DONE]` goes out.
fn metered<E: std::fmt::Display + Send + 'static>(
    upstream: impl Stream<Item = Result<Bytes, E>> + Send + 'static,
    meter: StreamMeter,
    client_wants_usage: bool,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    struct State<S, E> {
        upstream: S,
        meter: StreamMeter,
        buffer: Vec<u8>,
        finished: bool,
        /// What the upstream gave while looking ahead, not yet handled.
        early: Option<Option<Result<Bytes, E>>>,
    }
    impl<S: Stream<Item = Result<Bytes, E>> + Unpin, E> State<S, E> {
        /// Reads the usage comment that follows a delta if it is here already (in the
        /// buffer, or ready from the worker), so a client that leaves right after this
        /// delta is billed for it. Never waits.
        fn count_following(&mut self) {
            for _ in 0..2 {
                if let Some(end) = find_event_end(&self.buffer) {
                    let next = String::from_utf8_lossy(&self.buffer[..end]);
                    if let Some(usage) = openai_types::parse_usage_comment(&next) {
                        self.meter.counted = Used::of(&usage);
                        self.buffer.drain(..end + 2);
                    }
                    return;
                }
                if self.early.is_some() {
                    return;
                }
                match self.upstream.next().now_or_never() {
                    Some(Some(Ok(chunk))) => self.buffer.extend_from_slice(&chunk),
                    Some(item) => {
                        self.early = Some(item);
                        return;
                    }
                    None => return,
                }
            }
        }
    }
    let state = State {
        upstream: Box::pin(upstream),
        meter,
        buffer: Vec::new(),
        finished: false,
        early: None,
    };
    futures::stream::unfold(state, move |mut st| async move {
        if st.finished {
            // The server asked for more after the last event: all of it was handed over.
            if let Some(outcome) = st.meter.outcome.as_mut() {
                outcome.settle(true);
            }
            return None;
        }
        loop {
            // Emit every complete event in the buffer.
            if let Some(end) = find_event_end(&st.buffer) {
                let raw: Vec<u8> = st.buffer.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&raw[..raw.len() - 2]).into_owned();
                match classify_event(&text) {
                    SseEvent::Counted(used) => st.meter.counted = used,
                    SseEvent::Comment => {}
                    SseEvent::Done => {
                        st.finished = true;
                        let out = if st.meter.record(UsageStatus::Success).await {
                            const DONE: &[u8] = b"data: [DONE]\n\n";
                            if let Some(mut capture) = st.meter.capture.take() {
                                capture.keep(DONE);
                                capture.store(true, st.meter.counted);
                            }
                            Bytes::from_static(DONE)
                        } else {
                            Bytes::from(error_event(
                                "usage could not be recorded",
                                "metering_unavailable",
                            ))
                        };
                        return Some((Ok(out), st));
                    }
                    SseEvent::Final => {
                        st.finished = true;
                        let out = if st.meter.record(UsageStatus::Success).await {
                            Bytes::from(raw)
                        } else {
                            Bytes::from(error_event(
                                "usage could not be recorded",
                                "metering_unavailable",
                            ))
                        };
                        return Some((Ok(out), st));
                    }
                    SseEvent::Data(data) => {
                        let parsed = WorkerJson::parse(data.as_bytes());
                        if let Some(usage) = parsed.as_ref().and_then(WorkerJson::usage) {
                            st.meter.counted = usage;
                            if !client_wants_usage {
                                continue;
                            }
                        }
                        if parsed.is_some_and(|p| p.error) {
                            st.finished = true;
                            st.meter.record(UsageStatus::UpstreamFailed).await;
                        }
                        if let Some(capture) = st.meter.capture.as_mut() {
                            capture.keep(&raw);
                        }
                        st.count_following();
                        return Some((Ok(Bytes::from(raw)), st));
                    }
                }
                continue;
            }
            let next = match st.early.take() {
                Some(item) => item,
                None => st.upstream.next().await,
            };
            match next {
                Some(Ok(chunk)) => st.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    // The worker went away mid-stream: bill what was delivered, tell the client.
                    st.finished = true;
                    st.meter.record(UsageStatus::UpstreamFailed).await;
                    let out = error_event(
                        &format!("the upstream worker failed mid-stream: {e}"),
                        "upstream_error",
                    );
                    return Some((Ok(Bytes::from(out)), st));
                }
                None => {
                    st.finished = true;
                    st.meter.record(UsageStatus::UpstreamFailed).await;
                    let out = error_event("the upstream stream ended early", "upstream_error");
                    return Some((Ok(Bytes::from(out)), st));
                }
            }
        }
    })
}

fn find_event_end(buffer: &[u8]) -> Option<usize> {
    buffer.windows(2).position(|w| w == b"\n\n")
}

fn error_event(message: &str, code: &str) -> String {
    let body = openai_types::ErrorBody::new(message, "server_error", None, Some(code));
    format!(
        "data: {}\n\n",
        serde_json::to_string(&body).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sse_events() {
        assert!(matches!(
            classify_event(": usage 12 3"),
            SseEvent::Counted(Used {
                prompt: 12,
                completion: 3,
                cached: 0
            })
        ));
        assert!(matches!(
            classify_event(": usage 12 3 9"),
            SseEvent::Counted(Used {
                prompt: 12,
                completion: 3,
                cached: 9
            })
        ));
        assert!(matches!(classify_event(": keep-alive"), SseEvent::Comment));
        assert!(matches!(classify_event("data: [DONE]"), SseEvent::Done));
        assert!(matches!(
            classify_event("data: {\"a\":1}"),
            SseEvent::Data("{\"a\":1}")
        ));
        assert!(matches!(
            classify_event("event: response.output_text.delta\ndata: {\"a\":1}"),
            SseEvent::Data("{\"a\":1}")
        ));
        assert!(matches!(
            classify_event("event: response.completed\ndata: {}"),
            SseEvent::Final
        ));
        assert!(matches!(
            classify_event("event: response.completed"),
            SseEvent::Comment
        ));
    }

    #[test]
    fn usage_and_errors_are_read_from_a_reply_or_a_chunk() {
        let read = |json: &str| WorkerJson::parse(json.as_bytes()).map(|j| (j.usage(), j.error));
        let reply = r#"{"id":"x","choices":[{"message":{"content":"hi"}}],
            "usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}"#;
        let used = |prompt, completion, cached| {
            Some(Used {
                prompt,
                completion,
                cached,
            })
        };
        assert_eq!(read(reply), Some((used(10, 2, 0), false)));
        // Embeddings count no completion tokens.
        let embedding = r#"{"usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        assert_eq!(read(embedding), Some((used(4, 0, 0), false)));
        let chunk = r#"{"choices":[{"delta":{"content":"a"}}],"usage":null}"#;
        assert_eq!(read(chunk), Some((None, false)));
        let error = r#"{"error":{"message":"boom","type":"server_error"}}"#;
        assert_eq!(read(error), Some((None, true)));
        assert_eq!(read(r#"{"error":null}"#), Some((None, false)));
        // The Responses API's counts, and its objects' null `error`.
        let response = r#"{"object":"response","error":null,
            "usage":{"input_tokens":7,"output_tokens":3,"total_tokens":10}}"#;
        assert_eq!(read(response), Some((used(7, 3, 0), false)));
        // Cached prompt tokens, as chat and the Responses API state them.
        let cached = r#"{"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10,
            "prompt_tokens_details":{"cached_tokens":6}}}"#;
        assert_eq!(read(cached), Some((used(9, 1, 6), false)));
        let cached = r#"{"usage":{"input_tokens":9,"output_tokens":1,"total_tokens":10,
            "input_tokens_details":{"cached_tokens":5}}}"#;
        assert_eq!(read(cached), Some((used(9, 1, 5), false)));
        assert_eq!(read("not json"), None);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn cases(default: u32) -> u32 {
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(default)
        }

        /// The value of an event's first `data:` line.
        fn first_data(event: &str) -> Option<&str> {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .map(str::trim)
        }

        /// Events as a worker writes them, and near misses of each.
        fn event() -> impl Strategy<Value = String> {
            prop_oneof![
                (any::<u64>(), any::<u64>()).prop_map(|(p, c)| {
                    openai_types::usage_comment(&openai_types::Usage::new(p, c))
                        .trim_end()
                        .to_owned()
                }),
                Just("data: [DONE]".to_owned()),
                "(response\\.completed|response\\.incomplete|response\\.output_text\\.delta|x)"
                    .prop_map(|n| format!("event: {n}\ndata: {{}}")),
                "[ \\t]{0,2}".prop_map(|w| format!("data:{w}[DONE]{w}")),
                ".{0,20}".prop_map(|t| format!("data: {}", serde_json::json!({"t": t}))),
                ".{0,20}".prop_map(|t| format!(": {t}")),
                "(data|:|: usage|event|id)[: 0-9a-z\\[\\]{}\"]{0,16}",
                any::<String>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(cases(2048)))]

            /// Any event text: no panic, and each class is what its text says: usage only
            /// from a usage comment, data and `[DONE]` only from a `data:` field, and a
            /// comment never reaches the client as data.
            #[test]
            fn events_are_classified_by_what_they_say(event in event()) {
                match classify_event(&event) {
                    SseEvent::Counted(used) => {
                        let usage = openai_types::parse_usage_comment(&event);
                        prop_assert_eq!(usage.map(|u| Used::of(&u)), Some(used));
                    }
                    SseEvent::Done => {
                        prop_assert_eq!(first_data(&event), Some("[DONE]"));
                    }
                    SseEvent::Final => {
                        prop_assert!(event.lines().any(|l| l.strip_prefix("event:").map(str::trim) == Some(FINAL_EVENT) || l.strip_prefix("event:").map(str::trim) == Some(INCOMPLETE_EVENT)), "{:?}", event);
                        prop_assert!(first_data(&event).is_some());
                    }
                    SseEvent::Data(data) => {
                        prop_assert!(!event.starts_with(':'), "{:?}", event);
                        prop_assert_eq!(first_data(&event), Some(data));
                    }
                    SseEvent::Comment => {
                        prop_assert!(openai_types::parse_usage_comment(&event).is_none());
                        prop_assert!(event.starts_with(':') || first_data(&event).is_none(), "{:?}", event);
                    }
                }
            }

            /// A worker's stream cut into chunks anywhere splits into the same events.
            #[test]
            fn events_split_the_same_at_any_chunk_boundaries(
                events in prop::collection::vec(event().prop_filter("one event", |e| !e.contains("\n\n") && !e.ends_with('\n')), 0..8),
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
            ) {
                let stream: String = events.iter().map(|e| format!("{e}\n\n")).collect();
                let bytes = stream.as_bytes();
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
                cuts.push(bytes.len());
                cuts.sort_unstable();
                let (mut buffer, mut seen, mut from) = (Vec::new(), Vec::new(), 0);
                for cut in cuts {
                    buffer.extend_from_slice(&bytes[from..cut]);
                    from = cut;
                    while let Some(end) = find_event_end(&buffer) {
                        let raw: Vec<u8> = buffer.drain(..end + 2).collect();
                        seen.push(String::from_utf8_lossy(&raw[..raw.len() - 2]).into_owned());
                    }
                }
                prop_assert!(buffer.is_empty());
                prop_assert_eq!(seen, events);
            }
        }
    }
}
