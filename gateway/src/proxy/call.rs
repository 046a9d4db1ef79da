//! A consumer call as the gateway reads it: its body, what it may cost, who made it.
//!
//! Owns: parsing a request body (a one-pass read for plain chat calls, a whole parse for
//! everything else), the upper bound of the tokens a body can use, and the edits the
//! gateway makes before forwarding (a stream's usage forced on). Must never: change a body
//! it did not need to change, or bound a call below what it can really use.

use axum::body::Bytes;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::affinity::{prompt_hash, text_of, Opening};
use super::bound::TokenBound;
use super::bound::{choices, compact_len};
use crate::auth::KeyCaller;
use crate::error::GatewayError;

/// A consumer request body: forwarded as the client sent it unless the gateway must
/// change it, with what the gateway reads from it.
pub struct ProxiedCall {
    pub endpoint: &'static str,
    pub model: String,
    /// The body as the client sent it: forwarded as is unless the gateway changed it.
    raw: Bytes,
    body: Parsed,
    /// A hash of where the prompt begins (the first message, a completion's prompt, a
    /// response's instructions and first input): calls that share it are sent where their
    /// start is likely cached.
    pub affinity: Option<u64>,
    /// Set when the client is answered in another shape than the worker's.
    pub(super) answer: Option<Answer>,
}

/// How the gateway answers a call whose reply it makes from the worker's (a trained
/// classifier's, from embeddings): the endpoint billed, and the rewrite of the reply.
#[derive(Clone)]
pub(super) struct Answer {
    pub(super) endpoint: &'static str,
    pub(super) rewrite: Rewrite,
}

/// Turns a worker's JSON reply into the client's.
pub type Rewrite = std::sync::Arc<dyn Fn(&[u8]) -> Result<Bytes, GatewayError> + Send + Sync>;

/// What a call's body is to the gateway.
enum Parsed {
    /// A chat call that does not stream, the common case: its few fields read in one pass
    /// over the bytes, nothing else parsed or copied.
    Chat {
        /// Bytes of `messages` written as compact JSON (an upper bound of them).
        messages_bytes: i64,
        /// `max_completion_tokens`, else `max_tokens`, where one is an integer.
        max_tokens: Option<i64>,
        /// `n`: choices, each bounded by `max_tokens`.
        choices: i64,
    },
    /// Anything else, parsed whole so unknown fields pass through unchanged; `changed`
    /// once the gateway edited it (a stream's usage forced on).
    Json {
        body: Map<String, Value>,
        changed: bool,
    },
}

/// The fields of a chat body the gateway reads, borrowed from the body. Any body this does
/// not take as it is (not an object, a field of another type, a repeated field, a stream,
/// tools, a field not listed) goes the general way, which also words the errors.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the `IgnoredAny` fields are read only to be allowed
struct ChatFields<'a> {
    #[serde(borrow)]
    model: std::borrow::Cow<'a, str>,
    #[serde(default)]
    stream: bool,
    #[serde(borrow, default)]
    messages: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a serde_json::value::RawValue>,
    // Read by the worker alone: listed so that any other field leaves the one pass.
    #[serde(default)]
    temperature: IgnoredAny,
    #[serde(default)]
    top_p: IgnoredAny,
    #[serde(default)]
    seed: IgnoredAny,
    #[serde(default)]
    stop: IgnoredAny,
    #[serde(default)]
    stream_options: IgnoredAny,
    #[serde(default)]
    response_format: IgnoredAny,
    #[serde(default)]
    logprobs: IgnoredAny,
    #[serde(default)]
    top_logprobs: IgnoredAny,
    #[serde(default)]
    presence_penalty: IgnoredAny,
    #[serde(default)]
    frequency_penalty: IgnoredAny,
    #[serde(default)]
    logit_bias: IgnoredAny,
    #[serde(default)]
    user: IgnoredAny,
    #[serde(default)]
    metadata: IgnoredAny,
    #[serde(default)]
    top_k: IgnoredAny,
    #[serde(default)]
    min_p: IgnoredAny,
    #[serde(default)]
    repetition_penalty: IgnoredAny,
}

/// Prompt tokens a chat call's template can add beyond its messages' JSON: the template's
/// own text, per message its role markers, and with tools the fixed text that describes
/// them (their definitions count by their JSON).
const TEMPLATE_OVERHEAD: i64 = 64;
const MESSAGE_OVERHEAD: i64 = 32;
const TOOLS_OVERHEAD: i64 = 512;

impl ProxiedCall {
    pub fn parse(endpoint: &'static str, bytes: Bytes) -> Result<Self, GatewayError> {
        if endpoint == "/v1/chat/completions" {
            if let Some(call) = Self::parse_chat(&bytes) {
                return Ok(call);
            }
        }
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| GatewayError::bad_request(format!("invalid JSON body: {e}"), None))?;
        let Value::Object(body) = value else {
            return Err(GatewayError::bad_request(
                "the request body must be a JSON object",
                None,
            ));
        };
        if let Some(rules) = openai_types::rules_for(endpoint) {
            if let Some((name, message)) =
                body.keys().find_map(|k| rules.refusal(k).map(|m| (k, m)))
            {
                return Err(GatewayError::bad_request_param(message, name.clone()));
            }
        }
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(_) => {
                return Err(GatewayError::bad_request(
                    "`model` must be a non-empty string",
                    Some("model"),
                ))
            }
            None => {
                return Err(GatewayError::bad_request(
                    "`model` is required",
                    Some("model"),
                ))
            }
        };
        let first = |field: &str| match body.get(field) {
            Some(Value::Array(items)) => items.first(),
            other => other,
        };
        let affinity = match endpoint {
            "/v1/chat/completions" => first("messages")
                .and_then(|m| Opening::deserialize(m).ok())
                .map(|o| o.hash(&model)),
            "/v1/completions" => first("prompt").map(|p| prompt_hash(&model, &[&text_of(p)])),
            "/v1/responses" => {
                let instructions = body.get("instructions").map(text_of).unwrap_or_default();
                let input = match first("input") {
                    Some(Value::String(s)) => s.clone(),
                    Some(item) => Opening::deserialize(item)
                        .map(|o| format!("{}\n{}", o.role.as_deref().unwrap_or(""), o.text()))
                        .unwrap_or_default(),
                    None => String::new(),
                };
                Some(prompt_hash(&model, &[&instructions, &input]))
            }
            _ => None,
        };
        Ok(Self {
            endpoint,
            model,
            raw: bytes,
            body: Parsed::Json {
                body,
                changed: false,
            },
            affinity,
            answer: None,
        })
    }

    /// The one-pass read of a plain chat body, or `None` for the general way.
    fn parse_chat(bytes: &Bytes) -> Option<Self> {
        // A struct also deserializes from an array; only an object is a body.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        // Checked whole first: parsing from a slice leaves the strings of skipped fields
        // unchecked, and a body the whole parse refuses must not pass here.
        let text = std::str::from_utf8(bytes).ok()?;
        let fields: ChatFields<'_> = serde_json::from_str(text).ok()?;
        if fields.stream || fields.model.is_empty() {
            return None;
        }
        // As `Value::as_i64` reads them: an integer within i64, else nothing.
        let int = |v: Option<&serde_json::value::RawValue>| {
            v.and_then(|v| serde_json::from_str::<i64>(v.get()).ok())
        };
        let (messages_bytes, messages) = fields.messages.map_or((0, 0), |m| compact_len(m.get()));
        let affinity = fields.messages.and_then(|m| {
            let items: Vec<&serde_json::value::RawValue> = serde_json::from_str(m.get()).ok()?;
            let opening: Opening<'_> = serde_json::from_str(items.first()?.get()).ok()?;
            Some(opening.hash(&fields.model))
        });
        Some(Self {
            endpoint: "/v1/chat/completions",
            model: fields.model.into_owned(),
            affinity,
            answer: None,
            raw: bytes.clone(),
            body: Parsed::Chat {
                messages_bytes: messages_bytes + MESSAGE_OVERHEAD * messages,
                max_tokens: int(fields.max_completion_tokens).or(int(fields.max_tokens)),
                choices: choices(int(fields.n)),
            },
        })
    }

    /// The JSON to send the worker.
    pub(super) fn upstream_body(&self) -> Result<Bytes, GatewayError> {
        match &self.body {
            Parsed::Json {
                body,
                changed: true,
            } => serde_json::to_vec(body)
                .map(Bytes::from)
                .map_err(|e| GatewayError::Upstream(e.to_string())),
            _ => Ok(self.raw.clone()),
        }
    }

    /// Answers the client as `endpoint` with `rewrite` of the worker's JSON reply, billed
    /// as `endpoint`; such a call is never streamed nor cached.
    pub fn answer_as(&mut self, endpoint: &'static str, rewrite: Rewrite) {
        self.answer = Some(Answer { endpoint, rewrite });
    }

    /// The endpoint the usage record names.
    pub(super) fn billed_endpoint(&self) -> &'static str {
        self.answer.as_ref().map_or(self.endpoint, |a| a.endpoint)
    }

    pub(super) fn rewrite(&self) -> Option<Rewrite> {
        self.answer.as_ref().map(|a| a.rewrite.clone())
    }

    /// The body as the client sent it.
    pub(super) fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The body as parsed JSON, where it was parsed whole.
    fn json(&self) -> Option<&Map<String, Value>> {
        match &self.body {
            Parsed::Json { body, .. } => Some(body),
            Parsed::Chat { .. } => None,
        }
    }

    pub fn is_stream(&self) -> bool {
        self.json()
            .and_then(|b| b.get("stream"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// An upper bound of the tokens this call can use, from its body alone: prompt tokens,
    /// completion tokens per choice, and choices. Byte-level tokenizers never make more
    /// tokens than bytes, and the JSON of a message is longer than its text, less the
    /// per-message overhead the template adds.
    pub fn token_bound(&self, default_completion: i64) -> TokenBound {
        let body = match &self.body {
            Parsed::Chat {
                messages_bytes,
                max_tokens,
                choices,
            } => {
                return TokenBound {
                    prompt: messages_bytes + TEMPLATE_OVERHEAD,
                    completion: max_tokens.unwrap_or(default_completion).max(0),
                    choices: *choices,
                }
            }
            Parsed::Json { body, .. } => body,
        };
        let len = |v: &Value| -> i64 {
            match v {
                Value::String(s) => s.len() as i64 + 2,
                Value::Array(items) => items.len() as i64 + 2,
                other => serde_json::to_vec(other).map_or(0, |b| b.len() as i64),
            }
        };
        let inputs = |v: Option<&Value>| -> i64 {
            match v {
                Some(Value::Array(items)) if items.iter().all(|i| !i.is_number()) => {
                    items.iter().map(len).sum()
                }
                Some(v) => len(v),
                None => 0,
            }
        };
        let json_len = |v: Option<&Value>| {
            v.and_then(|v| serde_json::to_vec(v).ok())
                .map_or(0, |b| b.len() as i64)
        };
        match self.endpoint {
            "/v1/chat/completions" => {
                let messages = body
                    .get("messages")
                    .and_then(Value::as_array)
                    .map_or(0, |m| m.iter().filter(|m| m.is_object()).count());
                let tools = match body.get("tools") {
                    None | Some(Value::Null) => 0,
                    tools => json_len(tools) + TOOLS_OVERHEAD,
                };
                let prompt = json_len(body.get("messages"))
                    + MESSAGE_OVERHEAD * messages as i64
                    + tools
                    + TEMPLATE_OVERHEAD;
                let completion = ["max_completion_tokens", "max_tokens"]
                    .iter()
                    .find_map(|k| body.get(*k).and_then(Value::as_i64))
                    .unwrap_or(default_completion)
                    .max(0);
                TokenBound {
                    prompt,
                    completion,
                    choices: choices(body.get("n").and_then(Value::as_i64)),
                }
            }
            "/v1/completions" => {
                let prompts = match body.get("prompt") {
                    Some(Value::Array(items)) if items.iter().all(|i| !i.is_number()) => {
                        items.len().max(1) as i64
                    }
                    _ => 1,
                };
                TokenBound {
                    prompt: inputs(body.get("prompt")),
                    completion: body
                        .get("max_tokens")
                        .and_then(Value::as_i64)
                        .unwrap_or(i64::from(openai_types::DEFAULT_COMPLETION_TOKENS))
                        .max(0),
                    choices: choices(body.get("n").and_then(Value::as_i64)).saturating_mul(prompts),
                }
            }
            "/v1/responses" => {
                let items = body
                    .get("input")
                    .and_then(Value::as_array)
                    .map_or(1, Vec::len) as i64;
                let tools = match body.get("tools") {
                    None | Some(Value::Null) => 0,
                    tools => json_len(tools) + TOOLS_OVERHEAD,
                };
                TokenBound {
                    prompt: json_len(body.get("input"))
                        + json_len(body.get("instructions"))
                        + MESSAGE_OVERHEAD * (items + 1)
                        + tools
                        + TEMPLATE_OVERHEAD,
                    completion: body
                        .get("max_output_tokens")
                        .and_then(Value::as_i64)
                        .unwrap_or(default_completion)
                        .max(0),
                    choices: 1,
                }
            }
            _ => TokenBound {
                prompt: inputs(body.get("input")) + inputs(body.get("labels")),
                completion: 0,
                choices: 1,
            },
        }
    }

    pub(super) fn client_wants_usage(&self) -> bool {
        self.json()
            .and_then(|b| b.get("stream_options"))
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// Billing needs the usage chunk whatever the client asked (the Responses API sends
    /// its usage in its last event anyway).
    pub(super) fn force_stream_usage(&mut self) {
        if self.client_wants_usage() || self.endpoint == "/v1/responses" {
            return;
        }
        let Parsed::Json { body, changed } = &mut self.body else {
            return;
        };
        *changed = true;
        let options = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if !options.is_object() {
            *options = Value::Object(Map::new());
        }
        if let Value::Object(o) = options {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
}

/// Who made the call and when, for the usage event.
#[derive(Clone)]
pub struct CallContext {
    pub request_id: String,
    pub caller: KeyCaller,
    pub started_at: i64,
    /// What the client's `cache-control` asks of the response cache.
    pub cache: crate::response_cache::Directive,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The general way for any endpoint's body: parsed whole.
    fn parse_whole(bytes: &'static [u8]) -> Result<ProxiedCall, GatewayError> {
        let mut call = ProxiedCall::parse("/v1/embeddings", Bytes::from_static(bytes))?;
        call.endpoint = "/v1/chat/completions";
        Ok(call)
    }

    #[test]
    fn a_plain_chat_body_read_in_one_pass_bounds_and_forwards_as_parsed_whole() {
        let bodies: [&'static [u8]; 8] = [
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            br#"{"model":"m","max_tokens":16,"messages":[{"role":"user","content":"a \"quoted\" \\ word"}]}"#,
            br#"{"messages":[{"role":"system","content":"x"},{"role":"user","content":"y"}],"max_completion_tokens":7,"max_tokens":99,"model":"m2"}"#,
            br#"{"model":"m","max_tokens":16.0,"messages":[]}"#,
            br#"{"model":"m","max_tokens":-3,"stream":false,"logit_bias":{"k":[1,2,3]},"n":2}"#,
            br#"{"model":"m","max_tokens":null,"max_completion_tokens":"5","messages":[{"role":"user","content":"\u00e9t\u00e9"}]}"#,
            b"{\"model\":\"m\",\"max_tokens\":18446744073709551615,\"messages\":[{\"role\":\"user\",\"content\":\"caf\xc3\xa9\"}]}",
            br#"{"model":"m\u0021","messages":[{"role":"user","content":[{"type":"text","text":"t"}]}]}"#,
        ];
        for bytes in bodies {
            let text = String::from_utf8_lossy(bytes);
            let fast = ProxiedCall::parse("/v1/chat/completions", Bytes::from_static(bytes))
                .unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert!(matches!(fast.body, Parsed::Chat { .. }), "{text}");
            let whole = parse_whole(bytes).unwrap();
            assert_eq!(fast.model, whole.model, "{text}");
            assert!(!fast.is_stream() && !whole.is_stream(), "{text}");
            let (fast_bound, whole_bound) = (fast.token_bound(256), whole.token_bound(256));
            assert_eq!(fast_bound.completion, whole_bound.completion, "{text}");
            assert_eq!(fast_bound.choices, whole_bound.choices, "{text}");
            // Escapes are written back shorter, never longer.
            assert!(
                fast_bound.prompt >= whole_bound.prompt,
                "{text}: {fast_bound:?} {whole_bound:?}"
            );
            assert_eq!(
                fast.upstream_body().unwrap(),
                Bytes::from_static(bytes),
                "{text}"
            );
        }
        // Written compactly with nothing to unescape, the bound is the same to the byte.
        let compact: &'static [u8] =
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let spaced: &'static [u8] =
            b"{ \"model\": \"m\",\n  \"messages\": [ {\"role\": \"user\", \"content\": \"h i\"} ] }";
        let fast = ProxiedCall::parse("/v1/chat/completions", Bytes::from_static(compact)).unwrap();
        assert_eq!(
            fast.token_bound(0),
            parse_whole(compact).unwrap().token_bound(0)
        );
        let fast = ProxiedCall::parse("/v1/chat/completions", Bytes::from_static(spaced)).unwrap();
        assert_eq!(
            fast.token_bound(0),
            parse_whole(spaced).unwrap().token_bound(0)
        );
    }

    #[test]
    fn chat_bodies_the_one_pass_does_not_take_go_the_general_way() {
        let general = |bytes: &'static [u8]| {
            let call = ProxiedCall::parse("/v1/chat/completions", Bytes::from_static(bytes));
            call.map(|c| matches!(c.body, Parsed::Json { .. }))
        };
        // Streams (the body changes), odd types of known fields, repeated fields.
        assert_eq!(general(br#"{"model":"m","stream":true}"#).ok(), Some(true));
        assert_eq!(general(br#"{"model":"m","stream":null}"#).ok(), Some(true));
        assert_eq!(general(br#"{"model":"m","model":"n"}"#).ok(), Some(true));
        let repeated = ProxiedCall::parse(
            "/v1/chat/completions",
            Bytes::from_static(br#"{"model":"m","model":"n"}"#),
        );
        assert_eq!(repeated.ok().map(|c| c.model), Some("n".to_string()));
        // Bad bodies keep the general way's words.
        let message = |bytes: &'static [u8]| match general(bytes) {
            Err(GatewayError::BadRequest { message, .. }) => message,
            other => panic!("{}: {:?}", String::from_utf8_lossy(bytes), other.ok()),
        };
        assert_eq!(
            message(br#"[{"model":"m"}]"#),
            "the request body must be a JSON object"
        );
        assert_eq!(
            message(br#"["m"]"#),
            "the request body must be a JSON object"
        );
        assert_eq!(
            message(br#"{"model":7}"#),
            "`model` must be a non-empty string"
        );
        assert_eq!(
            message(br#"{"model":""}"#),
            "`model` must be a non-empty string"
        );
        assert_eq!(message(br#"{"messages":[]}"#), "`model` is required");
        assert!(message(br#"{"model":"m""#).starts_with("invalid JSON body"));
        assert!(message(br#"{"model":"m"} x"#).starts_with("invalid JSON body"));
    }

    #[test]
    fn prompts_that_begin_alike_share_an_affinity_whichever_way_they_are_read() {
        let call = |b: &str| {
            ProxiedCall::parse("/v1/chat/completions", Bytes::from(b.to_owned())).unwrap()
        };
        let turn1 = r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]}"#;
        let turn2 = r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"},{"role":"user","content":"More"}]}"#;
        let spaced_stream = r#"{ "model": "m", "stream": true, "messages": [ {"role": "system", "content": "Be brief."} ] }"#;
        let other = r#"{"model":"m","messages":[{"role":"system","content":"Be long."}]}"#;
        let other_model = r#"{"model":"n","messages":[{"role":"system","content":"Be brief."}]}"#;
        let a = call(turn1).affinity;
        assert!(a.is_some());
        assert!(matches!(call(turn1).body, Parsed::Chat { .. }));
        assert_eq!(call(turn2).affinity, a);
        // The general way (a stream), written with spaces: the same start, the same hash.
        assert!(matches!(call(spaced_stream).body, Parsed::Json { .. }));
        assert_eq!(call(spaced_stream).affinity, a);
        assert_ne!(call(other).affinity, a);
        assert_ne!(call(other_model).affinity, a);
        let embed = ProxiedCall::parse(
            "/v1/embeddings",
            Bytes::from_static(br#"{"model":"e","input":"x"}"#),
        );
        assert_eq!(embed.unwrap().affinity, None);
        let completion = |p: &str| {
            ProxiedCall::parse(
                "/v1/completions",
                Bytes::from(format!(r#"{{"model":"m","prompt":{p}}}"#)),
            )
            .unwrap()
            .affinity
        };
        assert_eq!(
            completion(r#""Once upon""#),
            completion(r#"["Once upon", "x"]"#)
        );
    }

    #[test]
    fn stream_usage_is_forced_on() {
        let mut call = ProxiedCall::parse(
            "/v1/chat/completions",
            Bytes::from_static(br#"{"model":"m","stream":true,"stream_options":null}"#),
        )
        .unwrap();
        assert!(!call.client_wants_usage());
        call.force_stream_usage();
        assert!(call.client_wants_usage());
        let sent: Value = serde_json::from_slice(&call.upstream_body().unwrap()).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], Value::Bool(true));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Cases per property: `PROPTEST_CASES` when set (`scripts/fuzz.sh`), else `default`.
        fn cases(default: u32) -> u32 {
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(default)
        }

        fn has_number(v: &Value) -> bool {
            match v {
                Value::Number(_) => true,
                Value::Array(items) => items.iter().any(has_number),
                Value::Object(m) => m.values().any(has_number),
                _ => false,
            }
        }

        /// The one-pass read and the whole parse agree on `bytes`, or both refuse it.
        fn agree(bytes: &[u8]) -> Result<(), TestCaseError> {
            let raw = Bytes::copy_from_slice(bytes);
            let fast = ProxiedCall::parse("/v1/chat/completions", raw.clone());
            let whole = ProxiedCall::parse("/v1/embeddings", raw.clone()).map(|mut c| {
                c.endpoint = "/v1/chat/completions";
                c
            });
            let text = String::from_utf8_lossy(bytes);
            // A field the contract does not define is refused as chat, by name, and the
            // worker refuses the same field.
            let refused = whole.as_ref().ok().and_then(|w| {
                w.json()?
                    .keys()
                    .find(|k| openai_types::refused_chat_field(k).is_some())
                    .cloned()
            });
            if let Some(field) = refused {
                match &fast {
                    Err(GatewayError::BadRequest { param, .. }) => {
                        prop_assert_eq!(param.as_deref(), Some(field.as_str()), "{:?}", text)
                    }
                    other => prop_assert!(false, "{:?}: not refused: {:?}", text, other.is_ok()),
                }
                if let Ok(req) =
                    serde_json::from_slice::<openai_types::ChatCompletionRequest>(bytes)
                {
                    prop_assert!(req.validate().is_err(), "{:?}: the worker takes it", text);
                }
                return Ok(());
            }
            if fast.is_ok() {
                // Whatever the gateway forwards, the worker never finds an unknown field in.
                if let Ok(req) =
                    serde_json::from_slice::<openai_types::ChatCompletionRequest>(bytes)
                {
                    if let Err((message, _)) = req.validate() {
                        prop_assert!(!message.starts_with("Unrecognized"), "{:?}", text);
                    }
                }
            }
            let (fast, whole) = match (fast, whole) {
                (Err(_), Err(_)) => return Ok(()),
                (Ok(f), Ok(w)) => (f, w),
                (f, w) => {
                    return Err(TestCaseError::fail(format!(
                        "{text:?}: one-pass ok {}, whole parse ok {}",
                        f.is_ok(),
                        w.is_ok()
                    )))
                }
            };
            prop_assert_eq!(&fast.model, &whole.model, "{:?}", text);
            prop_assert_eq!(fast.is_stream(), whole.is_stream(), "{:?}", text);
            let (fb, wb) = (fast.token_bound(256), whole.token_bound(256));
            prop_assert_eq!(fb.completion, wb.completion, "{:?}", text);
            prop_assert_eq!(fb.choices, wb.choices, "{:?}", text);
            // A number may be written shorter than serde writes it back, and `null` reads
            // as no messages; no message text is either, and the worker refuses both.
            let exempt = whole
                .json()
                .and_then(|b| b.get("messages"))
                .is_some_and(|m| m.is_null() || has_number(m));
            prop_assert!(
                exempt || fb.prompt >= wb.prompt,
                "{:?}: {:?} < {:?}",
                text,
                fb,
                wb
            );
            if matches!(fast.body, Parsed::Chat { .. }) {
                prop_assert_eq!(fast.upstream_body().ok(), Some(raw), "{:?}", text);
            }
            Ok(())
        }

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,12}".prop_map(Value::String),
                "[a-z\"\\\\/\\u{e9}\\u{1f600} ]{0,8}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::vec(("[a-z_]{1,6}", inner), 0..4)
                        .prop_map(|kv| Value::Object(kv.into_iter().collect())),
                ]
            })
        }

        /// A chat-like body: the fields the one pass reads, with values of any type or
        /// of the usual one, some other fields, written compact or spaced; keys repeat
        /// at times.
        fn chat_body() -> impl Strategy<Value = Vec<u8>> {
            let key = prop_oneof![
                Just("model"),
                Just("stream"),
                Just("messages"),
                Just("max_tokens"),
                Just("max_completion_tokens"),
                Just("stream_options"),
                Just("temperature"),
                Just("n"),
                Just("tools"),
                Just("logit_bias"),
                Just("frobnicate"),
            ];
            let usual = prop_oneof![
                "[a-zA-Z0-9._-]{0,10}".prop_map(Value::String),
                any::<bool>().prop_map(Value::Bool),
                (-5i64..5000).prop_map(Value::from),
                "[ a-z\\u{e9}\"\\\\]{0,10}"
                    .prop_map(|t| { serde_json::json!([{"role": "user", "content": t}]) }),
            ];
            let field = (key, prop_oneof![usual, json_value()]);
            (prop::collection::vec(field, 0..7), any::<bool>()).prop_map(|(fields, spaced)| {
                let mut out = String::from("{");
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let v = if spaced {
                        serde_json::to_string_pretty(v)
                    } else {
                        serde_json::to_string(v)
                    };
                    out.push_str(&format!("\"{k}\":{}", v.unwrap_or_default()));
                    if spaced {
                        out.push_str(" \n");
                    }
                }
                out.push('}');
                out.into_bytes()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(cases(1024)))]

            #[test]
            fn arbitrary_bytes_agree(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
                agree(&bytes)?;
            }

            #[test]
            fn chat_bodies_agree(body in chat_body()) {
                agree(&body)?;
            }

            /// Valid bodies with a few bytes replaced, inserted or removed.
            #[test]
            fn mutated_chat_bodies_agree(
                body in chat_body(),
                edits in prop::collection::vec(
                    (any::<prop::sample::Index>(), 0u8..3, any::<u8>()),
                    1..4,
                ),
            ) {
                let mut body = body;
                for (at, op, byte) in edits {
                    let at = at.index(body.len() + 1);
                    match op {
                        0 if at < body.len() => body[at] = byte,
                        1 => body.insert(at, byte),
                        _ if at < body.len() => {
                            body.remove(at);
                        }
                        _ => body.push(byte),
                    }
                }
                agree(&body)?;
            }
        }
    }
}
