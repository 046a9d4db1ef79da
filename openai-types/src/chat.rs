use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::fields::CHAT_RULES;
use crate::tools::*;

/// Most stop sequences a request may carry.
pub const MAX_STOP_SEQUENCES: usize = 4;

/// Most choices one request may ask for.
pub const MAX_CHOICES: u32 = 8;
/// Most alternatives `top_logprobs` may ask for per token.
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most entries of `logit_bias`.
pub const MAX_LOGIT_BIAS: usize = 300;

/// Whether a top-level chat field is refused as unknown: neither ours nor OpenAI's.
pub fn is_unknown_chat_field(name: &str) -> bool {
    CHAT_RULES.is_unknown(name)
}

/// The error for a top-level field a chat request may not carry, if `name` is one,
/// worded as OpenAI words it.
pub fn refused_chat_field(name: &str) -> Option<String> {
    CHAT_RULES.refusal(name)
}

/// `POST /v1/chat/completions`. Fields outside [`CHAT_RULES`] land in `other` and are
/// refused by [`ChatCompletionRequest::validate`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Token id (as a string) to a bias added to its logit; −100 bans the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<BTreeMap<String, f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Labels of the call (up to 16 string pairs, as OpenAI bounds them); no effect on the
    /// reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_identifier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modalities: Option<Vec<String>>,
    /// Extension: sample among the `top_k` likeliest tokens only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Extension: drop tokens less likely than `min_p` times the likeliest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    /// Extension: divide positive logits (multiply negative ones) of tokens already in the
    /// prompt or the completion by this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    /// Every other field; any is refused.
    #[serde(flatten, default, skip_serializing_if = "Map::is_empty")]
    pub other: Map<String, Value>,
}

impl ChatCompletionRequest {
    /// The completion budget the caller asked for, `max_completion_tokens` first.
    pub fn requested_max_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    pub fn stop_sequences(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    /// How many choices to generate.
    pub fn choices(&self) -> u32 {
        self.n.unwrap_or(1)
    }

    /// What the tools allow: `tool_choice` defaults to `auto` with tools, `none` without.
    pub fn tool_mode(&self) -> ToolMode {
        let has_tools = self.tools.as_ref().is_some_and(|t| !t.is_empty());
        match &self.tool_choice {
            _ if !has_tools => ToolMode::None,
            None => ToolMode::Auto,
            Some(ToolChoice::Mode(m)) => match m.as_str() {
                "required" => ToolMode::Required,
                "none" => ToolMode::None,
                _ => ToolMode::Auto,
            },
            Some(ToolChoice::Named(n)) => ToolMode::Named(n.function.name.clone()),
        }
    }

    /// Checks the fields the contract bounds; returns `(message, param)` on the first error.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |m: &str, p: &str| Err((m.to_owned(), p.to_owned()));
        if let Some(name) = self.other.keys().find(|k| refused_chat_field(k).is_some()) {
            let msg = refused_chat_field(name).unwrap_or_default();
            return Err((msg, name.clone()));
        }
        if self.messages.is_empty() {
            return err("`messages` must not be empty", "messages");
        }
        for (i, m) in self.messages.iter().enumerate() {
            m.validate().map_err(|e| (e, format!("messages[{i}]")))?;
        }
        self.validate_sampling()?;
        if self.store == Some(true) {
            return err(
                "stored completions are not supported: `store` must be false",
                "store",
            );
        }
        if let Some(m) = &self.metadata {
            if m.len() > 16
                || m.iter()
                    .any(|(k, v)| k.len() > 64 || v.as_str().is_none_or(|v| v.len() > 512))
            {
                return err(
                    "`metadata` holds at most 16 string values, keys up to 64 and values up to 512 characters",
                    "metadata",
                );
            }
        }
        if let Some(tier) = &self.service_tier {
            if tier != "auto" && tier != "default" {
                return err("`service_tier` must be `auto` or `default`", "service_tier");
            }
        }
        if let Some(m) = &self.modalities {
            if m.iter().any(|m| m != "text") {
                return err("only the `text` modality is supported", "modalities");
            }
        }
        self.validate_tools()?;
        if let Some(ResponseFormat::JsonSchema { json_schema }) = &self.response_format {
            if !valid_name(&json_schema.name) {
                return err(
                    "`response_format.json_schema.name` must be 1 to 64 of a-z, A-Z, 0-9, _ and -",
                    "response_format",
                );
            }
            if json_schema.schema.as_ref().is_some_and(|s| !s.is_object()) {
                return err(
                    "`response_format.json_schema.schema` must be an object",
                    "response_format",
                );
            }
        }
        Ok(())
    }

    /// Checks the fields that say how to sample and when to stop, which completions share.
    pub(crate) fn validate_sampling(&self) -> Result<(), (String, String)> {
        let err = |m: &str, p: &str| Err((m.to_owned(), p.to_owned()));
        if let Some(n) = self.n {
            if !(1..=MAX_CHOICES).contains(&n) {
                return err(&format!("`n` must be between 1 and {MAX_CHOICES}"), "n");
            }
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return err("`temperature` must be between 0 and 2", "temperature");
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return err("`top_p` must be in (0, 1]", "top_p");
            }
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return err(&format!("`{field}` must be between -2 and 2"), field);
            }
        }
        if let Some(bias) = &self.logit_bias {
            if bias.len() > MAX_LOGIT_BIAS {
                return err(
                    &format!("`logit_bias` may hold at most {MAX_LOGIT_BIAS} entries"),
                    "logit_bias",
                );
            }
            for (token, b) in bias {
                if token.parse::<u32>().is_err() {
                    return err(
                        &format!("`logit_bias` keys must be token ids, not `{token}`"),
                        "logit_bias",
                    );
                }
                if !(-100.0..=100.0).contains(b) {
                    return err(
                        "`logit_bias` values must be between -100 and 100",
                        "logit_bias",
                    );
                }
            }
        }
        if let Some(k) = self.top_logprobs {
            if k > MAX_TOP_LOGPROBS {
                return err(
                    &format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}"),
                    "top_logprobs",
                );
            }
            if self.logprobs != Some(true) {
                return err(
                    "`top_logprobs` requires `logprobs` to be true",
                    "top_logprobs",
                );
            }
        }
        if self.top_k == Some(0) {
            return err("`top_k` must be at least 1", "top_k");
        }
        if self.min_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            return err("`min_p` must be between 0 and 1", "min_p");
        }
        if self
            .repetition_penalty
            .is_some_and(|r| !(r > 0.0 && r <= 2.0))
        {
            return err(
                "`repetition_penalty` must be in (0, 2]",
                "repetition_penalty",
            );
        }
        let stops = self.stop_sequences();
        if stops.len() > MAX_STOP_SEQUENCES {
            return err(
                &format!("at most {MAX_STOP_SEQUENCES} stop sequences are allowed"),
                "stop",
            );
        }
        if stops.iter().any(String::is_empty) {
            return err("stop sequences must not be empty", "stop");
        }
        if self.requested_max_tokens() == Some(0) {
            return err("`max_tokens` must be at least 1", "max_tokens");
        }
        Ok(())
    }

    fn validate_tools(&self) -> Result<(), (String, String)> {
        let err = |m: String, p: &str| Err((m, p.to_owned()));
        let tools = self.tools.as_deref().unwrap_or_default();
        if tools.len() > MAX_TOOLS {
            return err(format!("at most {MAX_TOOLS} tools are allowed"), "tools");
        }
        for (i, t) in tools.iter().enumerate() {
            if t.kind != "function" {
                return err(
                    format!("tool type `{}` is not supported; only `function`", t.kind),
                    &format!("tools[{i}].type"),
                );
            }
            if !valid_name(&t.function.name) {
                return err(
                    "a function name must be 1 to 64 of a-z, A-Z, 0-9, _ and -".into(),
                    &format!("tools[{i}].function.name"),
                );
            }
            if tools[..i]
                .iter()
                .any(|o| o.function.name == t.function.name)
            {
                return err(
                    format!("two tools are named `{}`", t.function.name),
                    &format!("tools[{i}].function.name"),
                );
            }
            if t.function
                .parameters
                .as_ref()
                .is_some_and(|p| !p.is_object())
            {
                return err(
                    "`parameters` must be a JSON schema object".into(),
                    &format!("tools[{i}].function.parameters"),
                );
            }
        }
        match &self.tool_choice {
            None => {}
            Some(_) if tools.is_empty() => {
                return err(
                    "`tool_choice` is only allowed when `tools` are given".into(),
                    "tool_choice",
                )
            }
            Some(ToolChoice::Mode(m)) if !["none", "auto", "required"].contains(&m.as_str()) => {
                return err(
                    format!(
                        "`tool_choice` must be `none`, `auto`, `required` or a function, not `{m}`"
                    ),
                    "tool_choice",
                );
            }
            Some(ToolChoice::Mode(_)) => {}
            Some(ToolChoice::Named(n)) => {
                if n.kind != "function" {
                    return err(
                        "`tool_choice.type` must be `function`".into(),
                        "tool_choice",
                    );
                }
                if !tools.iter().any(|t| t.function.name == n.function.name) {
                    return err(
                        format!(
                            "`tool_choice` names `{}`, which is not in `tools`",
                            n.function.name
                        ),
                        "tool_choice",
                    );
                }
            }
        }
        if self.parallel_tool_calls.is_some() && tools.is_empty() {
            return err(
                "`parallel_tool_calls` is only allowed when `tools` are given".into(),
                "parallel_tool_calls",
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: MessageContent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's calls, replayed in the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// An assistant turn's refusal text, replayed in the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

impl ChatMessage {
    /// A message with text content.
    pub fn text(role: &str, content: &str) -> Self {
        Self {
            role: role.to_owned(),
            content: MessageContent::Text(content.to_owned()),
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self.role.as_str() {
            "system" | "developer" | "user" => {}
            "assistant" => {
                for call in self.tool_calls.iter().flatten() {
                    if call.kind != "function" {
                        return Err(format!("tool call type `{}` is not supported", call.kind));
                    }
                }
            }
            "tool" => {
                if self.tool_call_id.is_none() {
                    return Err("a `tool` message needs `tool_call_id`".into());
                }
            }
            other => return Err(format!("role `{other}` is not supported")),
        }
        if self.tool_calls.is_some() && self.role != "assistant" {
            return Err("only an `assistant` message may carry `tool_calls`".into());
        }
        self.content.to_text().map(|_| ())
    }
}

/// A message's content: a string, a list of typed parts (only text parts are read), or null.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
    #[default]
    Null,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl MessageContent {
    /// The text a model sees: parts are joined in order, non-text parts are rejected.
    pub fn to_text(&self) -> Result<String, String> {
        match self {
            MessageContent::Text(s) => Ok(s.clone()),
            MessageContent::Null => Ok(String::new()),
            MessageContent::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(format!("content part type `{kind}` is not supported"))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> ChatCompletionRequest {
        serde_json::from_str(body).unwrap()
    }

    fn refusal(body: &str) -> String {
        parse(body).validate().unwrap_err().1
    }

    #[test]
    fn limits_are_checked_and_content_parts_joined() {
        assert_eq!(
            refusal(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stop":["a","b","c","d","e"]}"#
            ),
            "stop"
        );
        let req = parse(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"max_completion_tokens":5,"max_tokens":9}"#,
        );
        assert!(req.validate().is_ok());
        assert_eq!(req.requested_max_tokens(), Some(5));
        assert_eq!(req.messages[0].content.to_text().unwrap(), "ab");
    }

    #[test]
    fn unknown_and_unsupported_fields_are_refused_by_name() {
        let req =
            parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"frobnicate":1}"#);
        let (msg, param) = req.validate().unwrap_err();
        assert_eq!(param, "frobnicate");
        assert_eq!(msg, "Unrecognized request argument supplied: frobnicate");
        assert_eq!(
            refusal(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"audio":{}}"#),
            "audio"
        );
        assert_eq!(
            refusal(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"store":true}"#),
            "store"
        );
        assert_eq!(
            refusal(
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"metadata":{"k":1}}"#
            ),
            "metadata"
        );
        let ok = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"store":false,"user":"u","metadata":{"team":"a"},"top_k":5,"min_p":0.1,"repetition_penalty":1.1,"logit_bias":{"42":-100},"logprobs":true,"top_logprobs":3,"n":8}"#,
        );
        assert_eq!(ok.validate(), Ok(()));
        assert!(CHAT_RULES.known.iter().all(|f| !is_unknown_chat_field(f)));
    }

    #[test]
    fn bounds_of_sampling_fields() {
        let base = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"#;
        for (field, param) in [
            (r#""n":9"#, "n"),
            (r#""n":0"#, "n"),
            (r#""top_logprobs":3"#, "top_logprobs"),
            (r#""logprobs":true,"top_logprobs":21"#, "top_logprobs"),
            (r#""presence_penalty":2.5"#, "presence_penalty"),
            (r#""frequency_penalty":-3"#, "frequency_penalty"),
            (r#""logit_bias":{"x":1}"#, "logit_bias"),
            (r#""logit_bias":{"1":101}"#, "logit_bias"),
            (r#""top_k":0"#, "top_k"),
            (r#""min_p":1.5"#, "min_p"),
            (r#""repetition_penalty":0"#, "repetition_penalty"),
        ] {
            assert_eq!(refusal(&format!("{base}{field}}}")), param, "{field}");
        }
    }

    #[test]
    fn tools_and_tool_choice_are_checked() {
        let tool = r#"{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}"#;
        let body = |rest: &str| {
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{rest}}}"#)
        };
        let req = parse(&body(&format!(
            r#""tools":[{tool}],"tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}}"#
        )));
        assert_eq!(req.validate(), Ok(()));
        assert_eq!(req.tool_mode(), ToolMode::Named("get_weather".into()));
        assert_eq!(
            parse(&body(&format!(r#""tools":[{tool}]"#))).tool_mode(),
            ToolMode::Auto
        );
        assert_eq!(
            refusal(&body(&format!(
                r#""tools":[{tool}],"tool_choice":{{"type":"function","function":{{"name":"other"}}}}"#
            ))),
            "tool_choice"
        );
        assert_eq!(refusal(&body(r#""tool_choice":"auto""#)), "tool_choice");
        assert_eq!(
            refusal(&body(&format!(r#""tools":[{tool},{tool}]"#))),
            "tools[1].function.name"
        );
        assert_eq!(
            refusal(&body(
                r#""tools":[{"type":"function","function":{"name":"bad name"}}]"#
            )),
            "tools[0].function.name"
        );
        let history = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"call_1","content":"42"}]}"#,
        );
        assert_eq!(history.validate(), Ok(()));
        assert_eq!(
            refusal(r#"{"model":"m","messages":[{"role":"tool","content":"42"}]}"#),
            "messages[0]"
        );
    }
}
