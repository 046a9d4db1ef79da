//! Constrained decoding: a request's `response_format` and tools become a grammar
//! (llguidance's Lark dialect, JSON schemas embedded with `%json`), compiled once per
//! distinct grammar and cached, and matched token by token as a mask over the vocabulary.
//!
//! Owns: the grammar text for each kind of constraint, the vocabulary as bytes that the
//! matcher sees, and the compiled-grammar cache. Must never: run on the async runtime
//! (compiling is CPU work) or accept a schema it cannot enforce (that is a 400, before any
//! token is generated).

use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory, TokenParser};
use openai_types::{ChatCompletionRequest, ResponseFormat, ToolMode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

use super::toolcall;

/// Compiled grammars kept for reuse.
const CACHE_ENTRIES: u64 = 256;

/// How JSON is written under a constraint: OpenAI's separators and no free whitespace, so
/// a small model cannot wander into endless blank lines.
fn json_options() -> Value {
    json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false})
}

pub struct Grammars {
    factory: ParserFactory,
    cache: moka::sync::Cache<[u8; 32], Arc<Mutex<TokenParser>>>,
}

impl Grammars {
    /// `tokens[i]` is the bytes token `i` stands for; special tokens are marked as the
    /// matcher expects (a 0xFF byte before their text), so no grammar can produce them.
    pub fn new(tokens: &[Vec<u8>], eos: u32) -> anyhow::Result<Self> {
        let info = TokRxInfo::new(tokens.len() as u32, eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, tokens)));
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Self {
            factory,
            cache: moka::sync::Cache::new(CACHE_ENTRIES),
        })
    }

    /// The matcher for a request's constraint, or `None` when it has none. A grammar that
    /// cannot be compiled is `Err` with the compiler's reason.
    pub fn matcher_for(&self, req: &ChatCompletionRequest) -> Result<Option<Matcher>, String> {
        let Some(lark) = grammar_for(req)? else {
            return Ok(None);
        };
        let key: [u8; 32] = Sha256::digest(lark.as_bytes()).into();
        let compiled = match self.cache.get(&key) {
            Some(p) => p,
            None => {
                let parser = self
                    .factory
                    .create_parser(TopLevelGrammar::from_lark(lark))
                    .map_err(|e| e.to_string())?;
                let parser = Arc::new(Mutex::new(parser));
                self.cache.insert(key, parser.clone());
                parser
            }
        };
        let fresh = compiled
            .lock()
            .map_err(|_| "grammar cache poisoned".to_owned())?
            .deep_clone();
        Ok(Some(Matcher::new(Ok(fresh))))
    }
}

/// Tokens favoured near the end of a constrained reply's budget, so it ends valid rather
/// than cut: inside a string, those that close it (a quote, then only brackets, braces and
/// spaces); outside, those that only close brackets and braces. (Bracket tokens are text
/// inside a string, and a quote outside one opens another: each set only helps where it
/// closes.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closers {
    pub quote: Vec<u32>,
    pub bracket: Vec<u32>,
}

pub fn closing_tokens(tokens: &[Vec<u8>]) -> Closers {
    let closes = |c: &u8| matches!(c, b'}' | b']' | b' ' | b'\n');
    let mut out = Closers::default();
    for (i, b) in tokens.iter().enumerate() {
        match b.split_first() {
            Some((b'"', rest)) if rest.iter().all(closes) => out.quote.push(i as u32),
            Some(_) if b.iter().all(closes) && b.iter().any(|c| matches!(c, b'}' | b']')) => {
                out.bracket.push(i as u32)
            }
            _ => {}
        }
    }
    out
}

/// Whether JSON text (or text around JSON without quotes of its own) ends inside a string.
pub fn ends_in_string(text: &str) -> bool {
    let (mut inside, mut escaped) = (false, false);
    for b in text.bytes() {
        match (inside, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (_, false, b'"') => inside = !inside,
            _ => {}
        }
    }
    inside
}

/// The Lark grammar a request's output must match, if any.
pub fn grammar_for(req: &ChatCompletionRequest) -> Result<Option<String>, String> {
    let body = match &req.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(json_rule(&json!({"type": "object"}))?),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let schema = json_schema
                .schema
                .clone()
                .unwrap_or_else(|| json!({"type": "object"}));
            Some(json_rule(&schema)?)
        }
    };
    let tools = req.tools.as_deref().unwrap_or_default();
    let calls = |only: Option<&str>| -> Result<String, String> {
        let mut rules = Vec::new();
        let mut names = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            if only.is_some_and(|n| n != t.function.name) {
                continue;
            }
            let params = t
                .function
                .parameters
                .clone()
                .unwrap_or_else(|| json!({"type": "object"}));
            let (open, close) = toolcall::call_frame(&t.function.name);
            rules.push(format!(
                "call_{i}: {} {} {}",
                lark_string(&open),
                json_rule(&params)?,
                lark_string(close)
            ));
            names.push(format!("call_{i}"));
        }
        let one = names.join(" | ");
        let many = req.parallel_tool_calls != Some(false) && only.is_none();
        let calls = if many {
            format!("calls: ({one})+")
        } else {
            format!("calls: {one}")
        };
        Ok(format!("{calls}\n{}", rules.join("\n")))
    };
    let lark = match (req.tool_mode(), body) {
        (ToolMode::None, None) => return Ok(None),
        (ToolMode::None, Some(body)) => format!("start: {body}"),
        (ToolMode::Required, _) => format!("start: calls\n{}", calls(None)?),
        (ToolMode::Named(name), _) => format!("start: calls\n{}", calls(Some(&name))?),
        (ToolMode::Auto, body) => {
            // Text may not begin with the call marker's first character, so a reply is
            // unambiguously text or calls from its first byte.
            let text = body
                .unwrap_or_else(|| format!("TEXT\nTEXT: /[^{}](?s:.*)/", toolcall::MARKER_FIRST));
            format!("start: calls | {text}\n{}", calls(None)?)
        }
    };
    Ok(Some(lark))
}

/// A `%json` rule for `schema`, written the constrained way.
fn json_rule(schema: &Value) -> Result<String, String> {
    let Value::Object(map) = schema else {
        return Err("a JSON schema must be an object".into());
    };
    let mut schema = Value::Object(map.clone());
    bound_formats(&mut schema);
    let Value::Object(mut map) = schema else {
        return Err("a JSON schema must be an object".into());
    };
    map.insert("x-guidance".into(), json_options());
    serde_json::to_string(&Value::Object(map))
        .map(|s| format!("%json {s}"))
        .map_err(|e| e.to_string())
}

/// The longest string a format allows by its own standard (RFC 5321 for addresses, RFC
/// 1035 for host names), where its pattern alone has no end: without a bound a small model
/// can fill a reply's whole budget with one local part.
fn format_max_len(format: &str) -> Option<u64> {
    match format {
        "email" | "idn-email" => Some(254),
        "hostname" | "idn-hostname" => Some(253),
        "duration" => Some(64),
        _ => None,
    }
}

/// Adds those bounds to every subschema that states such a format and no `maxLength`: a
/// reply valid under the bounded schema is valid under the original.
fn bound_formats(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(f)) = map.get("format") {
                if let (Some(max), false) = (format_max_len(f), map.contains_key("maxLength")) {
                    map.insert("maxLength".into(), max.into());
                }
            }
            // Values, not subschemas: left as written.
            map.iter_mut()
                .filter(|(k, _)| !matches!(k.as_str(), "const" | "enum" | "default" | "examples"))
                .for_each(|(_, v)| bound_formats(v));
        }
        Value::Array(items) => items.iter_mut().for_each(bound_formats),
        _ => {}
    }
}

/// A Lark string literal for `s`.
fn lark_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closers_close_strings_inside_them_and_brackets_outside() {
        let tokens: Vec<Vec<u8>> = [
            &b"\""[..],
            b"\"}",
            b"}}",
            b" ]",
            b"},",
            b",\"",
            b"ab",
            b"\"a",
            b" ",
        ]
        .iter()
        .map(|t| t.to_vec())
        .collect();
        let closers = closing_tokens(&tokens);
        assert_eq!(closers.quote, vec![0, 1]);
        assert_eq!(closers.bracket, vec![2, 3]);
        assert!(!ends_in_string(r#"{"a": "b", "c": 1"#));
        assert!(ends_in_string(r#"{"a": "b\"}}}"#));
        assert!(!ends_in_string(r#"{"a": "b\\"}"#));
        assert!(ends_in_string(r#"<tool_call>{"name": "f"#));
    }

    fn request(extra: Value) -> ChatCompletionRequest {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn plain_requests_have_no_grammar() {
        assert_eq!(grammar_for(&request(json!({}))).unwrap(), None);
        assert_eq!(
            grammar_for(&request(json!({"response_format": {"type": "text"}}))).unwrap(),
            None
        );
    }

    #[test]
    fn open_ended_formats_get_their_standard_bound_and_values_stay_as_written() {
        let mut schema = json!({"type": "object", "properties": {
            "mail": {"type": "string", "format": "email"},
            "host": {"type": "string", "format": "hostname", "maxLength": 20},
            "when": {"type": "string", "format": "date"},
            "fixed": {"const": {"format": "email"}}
        }});
        bound_formats(&mut schema);
        assert_eq!(schema["properties"]["mail"]["maxLength"], 254);
        assert_eq!(schema["properties"]["host"]["maxLength"], 20);
        assert!(schema["properties"]["when"].get("maxLength").is_none());
        assert_eq!(
            schema["properties"]["fixed"],
            json!({"const": {"format": "email"}})
        );
    }

    #[test]
    fn tool_modes_shape_the_start_rule() {
        let tools = json!([
            {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "b"}}
        ]);
        let auto = grammar_for(&request(json!({"tools": tools})))
            .unwrap()
            .unwrap();
        assert!(auto.starts_with("start: calls | TEXT"), "{auto}");
        assert!(auto.contains("calls: (call_0 | call_1)+"), "{auto}");
        let named = grammar_for(&request(json!({
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "b"}}
        })))
        .unwrap()
        .unwrap();
        assert!(named.contains("calls: call_1\n"), "{named}");
        assert!(!named.contains("call_0"), "{named}");
        let single = grammar_for(&request(json!({
            "tools": tools, "tool_choice": "required", "parallel_tool_calls": false
        })))
        .unwrap()
        .unwrap();
        assert!(single.contains("calls: call_0 | call_1\n"), "{single}");
    }
}
