//! `POST /v1/responses`: the Responses API request, and its reading as a chat request (the
//! worker answers both through one path).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::chat::{ChatCompletionRequest, ChatMessage, MessageContent};
use crate::fields::RESPONSES_RULES;
use crate::tools::{
    FunctionCall, FunctionDefinition, FunctionName, JsonSchemaFormat, NamedToolChoice,
    ResponseFormat, Tool, ToolCall, ToolChoice,
};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResponsesRequest {
    pub model: String,
    #[serde(default)]
    pub input: ResponseInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ResponseTool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ResponseToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_identifier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<String>,
    /// Every other field; any is refused.
    #[serde(flatten, default, skip_serializing_if = "Map::is_empty")]
    pub other: Map<String, Value>,
}

/// `input`: a user message's text, or a list of items (messages, function calls and their
/// outputs), read by [`ResponsesRequest::to_chat`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResponseInput {
    Text(String),
    Items(Vec<Value>),
}

impl Default for ResponseInput {
    fn default() -> Self {
        Self::Items(Vec::new())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<TextFormat>,
}

/// `text.format`: as chat's `response_format`, with the schema's fields at the top level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TextFormat {
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schema: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        strict: Option<bool>,
    },
}

/// A Responses tool: a function, described at the top level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseTool {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResponseToolChoice {
    Mode(String),
    Named {
        #[serde(rename = "type")]
        kind: String,
        name: String,
    },
}

type Refusal = (String, String);

fn refuse<T>(message: impl Into<String>, param: &str) -> Result<T, Refusal> {
    Err((message.into(), param.to_owned()))
}

impl ResponsesRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// The same request as a chat request, checked; `(message, param)` on the first error.
    pub fn to_chat(&self) -> Result<ChatCompletionRequest, Refusal> {
        if let Some(name) = self
            .other
            .keys()
            .find(|k| RESPONSES_RULES.refusal(k).is_some())
        {
            return Err((
                RESPONSES_RULES.refusal(name).unwrap_or_default(),
                name.clone(),
            ));
        }
        if self.store == Some(true) {
            return refuse(
                "responses are not stored: `store` must be false (send the whole conversation in `input`)",
                "store",
            );
        }
        if let Some(t) = self.truncation.as_deref().filter(|t| *t != "disabled") {
            return refuse(
                format!("`truncation` must be `disabled`, not `{t}`"),
                "truncation",
            );
        }
        let mut messages = Vec::new();
        if let Some(instructions) = &self.instructions {
            messages.push(ChatMessage::text("system", instructions));
        }
        match &self.input {
            ResponseInput::Text(t) => messages.push(ChatMessage::text("user", t)),
            ResponseInput::Items(items) => {
                for (i, item) in items.iter().enumerate() {
                    read_item(item, &mut messages).map_err(|e| (e, format!("input[{i}]")))?;
                }
            }
        }
        let response_format = self
            .text
            .as_ref()
            .and_then(|t| t.format.clone())
            .map(|f| match f {
                TextFormat::Text => ResponseFormat::Text,
                TextFormat::JsonObject => ResponseFormat::JsonObject,
                TextFormat::JsonSchema {
                    name,
                    description,
                    schema,
                    strict,
                } => ResponseFormat::JsonSchema {
                    json_schema: JsonSchemaFormat {
                        name,
                        description,
                        schema,
                        strict,
                    },
                },
            });
        let tools = self.tools.as_ref().map(|tools| {
            tools
                .iter()
                .map(|t| Tool {
                    kind: t.kind.clone(),
                    function: FunctionDefinition {
                        name: t.name.clone(),
                        description: t.description.clone(),
                        parameters: t.parameters.clone(),
                        strict: t.strict,
                    },
                })
                .collect()
        });
        let tool_choice = self.tool_choice.clone().map(|c| match c {
            ResponseToolChoice::Mode(m) => ToolChoice::Mode(m),
            ResponseToolChoice::Named { kind, name } => ToolChoice::Named(NamedToolChoice {
                kind,
                function: FunctionName { name },
            }),
        });
        let chat = ChatCompletionRequest {
            model: self.model.clone(),
            messages,
            max_completion_tokens: self.max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stream: self.stream,
            response_format,
            tools,
            tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
            user: self.user.clone(),
            service_tier: self.service_tier.clone(),
            ..ChatCompletionRequest::default()
        };
        chat.validate().map_err(|(m, p)| (m, chat_param(&p)))?;
        Ok(chat)
    }

    /// The request's settings as a response object repeats them.
    pub fn echo_fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("instructions".into(), json!(self.instructions));
        m.insert("max_output_tokens".into(), json!(self.max_output_tokens));
        m.insert("temperature".into(), json!(self.temperature.unwrap_or(1.0)));
        m.insert("top_p".into(), json!(self.top_p.unwrap_or(1.0)));
        m.insert(
            "tools".into(),
            json!(self.tools.clone().unwrap_or_default()),
        );
        m.insert(
            "tool_choice".into(),
            json!(self
                .tool_choice
                .clone()
                .unwrap_or(ResponseToolChoice::Mode("auto".into()))),
        );
        m.insert(
            "parallel_tool_calls".into(),
            json!(self.parallel_tool_calls.unwrap_or(true)),
        );
        m.insert(
            "text".into(),
            json!({"format": self.text.as_ref().and_then(|t| t.format.clone()).unwrap_or(TextFormat::Text)}),
        );
        m.insert(
            "metadata".into(),
            json!(self.metadata.clone().unwrap_or_default()),
        );
        m.insert("user".into(), json!(self.user));
        m.insert("store".into(), json!(false));
        m.insert("truncation".into(), json!("disabled"));
        m.insert("previous_response_id".into(), Value::Null);
        m.insert("reasoning".into(), json!({"effort": null, "summary": null}));
        m
    }
}

/// A chat field's name as the Responses request calls it.
fn chat_param(param: &str) -> String {
    match param {
        "max_tokens" => "max_output_tokens".into(),
        "response_format" => "text.format".into(),
        p if p.starts_with("messages") => "input".into(),
        p if p.starts_with("tools[") => p.replace(".function.", "."),
        p => p.into(),
    }
}

/// Adds one input item to the chat history.
fn read_item(item: &Value, messages: &mut Vec<ChatMessage>) -> Result<(), String> {
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    let text = |v: Option<&Value>, field: &str| -> Result<String, String> {
        match v {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| {
                    let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                    match (kind, p.get("text").and_then(Value::as_str)) {
                        ("input_text" | "output_text" | "text", Some(t)) => Ok(t.to_owned()),
                        _ => Err(format!("content part type `{kind}` is not supported")),
                    }
                })
                .collect(),
            _ => Err(format!("`{field}` must be text or a list of text parts")),
        }
    };
    match kind {
        "message" => {
            let role = item
                .get("role")
                .and_then(Value::as_str)
                .ok_or("a message needs a `role`")?;
            if !matches!(role, "user" | "system" | "developer" | "assistant") {
                return Err(format!("role `{role}` is not supported"));
            }
            let content = text(item.get("content"), "content")?;
            messages.push(ChatMessage::text(role, &content));
        }
        "function_call" => {
            let field = |name: &str| {
                item.get(name)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| format!("a function call needs `{name}`"))
            };
            let call = ToolCall {
                id: field("call_id")?,
                kind: "function".into(),
                function: FunctionCall {
                    name: field("name")?,
                    arguments: field("arguments")?,
                },
            };
            // Calls in a row are one assistant turn.
            match messages.last_mut() {
                Some(m) if m.role == "assistant" && m.tool_calls.is_some() => {
                    m.tool_calls.get_or_insert_with(Vec::new).push(call)
                }
                _ => messages.push(ChatMessage {
                    role: "assistant".into(),
                    content: MessageContent::Null,
                    tool_calls: Some(vec![call]),
                    ..ChatMessage::default()
                }),
            }
        }
        "function_call_output" => {
            let call_id = item
                .get("call_id")
                .and_then(Value::as_str)
                .ok_or("a function call output needs `call_id`")?;
            let output = text(item.get("output"), "output")?;
            messages.push(ChatMessage {
                role: "tool".into(),
                content: MessageContent::Text(output),
                tool_call_id: Some(call_id.to_owned()),
                ..ChatMessage::default()
            });
        }
        other => return Err(format!("input item type `{other}` is not supported")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: Value) -> Result<ChatCompletionRequest, Refusal> {
        serde_json::from_value::<ResponsesRequest>(body)
            .unwrap()
            .to_chat()
    }

    #[test]
    fn items_become_a_chat_history() {
        let chat = read(json!({
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And?"}]}
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
                      {"type": "function", "name": "get_time"}],
            "tool_choice": {"type": "function", "name": "get_time"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
            "max_output_tokens": 9
        }))
        .unwrap();
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(chat.messages[2].tool_calls.as_ref().unwrap().len(), 2);
        assert_eq!(chat.messages[3].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(chat.max_completion_tokens, Some(9));
        assert!(matches!(
            chat.response_format,
            Some(ResponseFormat::JsonSchema { .. })
        ));
        assert_eq!(chat.tool_mode(), crate::ToolMode::Named("get_time".into()));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let param = |body: Value| read(body).unwrap_err().1;
        assert_eq!(
            param(json!({"model": "m", "input": "x", "store": true})),
            "store"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "x", "previous_response_id": "resp_1"})),
            "previous_response_id"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "x", "frobnicate": 1})),
            "frobnicate"
        );
        assert_eq!(
            param(json!({"model": "m", "input": [{"type": "input_image", "image_url": "x"}]})),
            "input[0]"
        );
        assert_eq!(param(json!({"model": "m", "input": []})), "input");
        assert_eq!(
            param(json!({"model": "m", "input": "x", "temperature": 5})),
            "temperature"
        );
        assert!(read(json!({"model": "m", "input": "x", "store": false})).is_ok());
    }
}
