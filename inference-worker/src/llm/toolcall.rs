//! Function tools for a model whose template has no tool syntax: a documented generic
//! format in the prompt, and a reader that turns the model's (grammar-constrained) output
//! back into OpenAI tool calls, piece by piece as a stream needs them.
//!
//! The format. The tools are described in a system message:
//!
//! ```text
//! # Tools
//! You can call functions. Each is described by a JSON object:
//! {"name": "get_weather", "description": "...", "parameters": {...}}
//! To call one, answer with exactly
//! <tool_call>{"name": "<name>", "arguments": <a JSON object>}</tool_call>
//! and nothing else; several calls follow one another.
//! ```
//!
//! An assistant turn with calls is rendered as those frames; a `tool` message as a user
//! turn holding `<tool_response>{"tool_call_id": "...", "content": "..."}</tool_response>`.
//!
//! Owns: that format, both ways. Must never: accept output outside it as a call.

use openai_types::{ChatCompletionRequest, ChatMessage, ToolMode};
use serde_json::json;

use super::TemplateMessage;

/// The first character of a call; a text reply may not begin with it.
pub const MARKER_FIRST: char = '<';
const CLOSE: &str = "}</tool_call>";

/// The text before and after a call's arguments.
pub fn call_frame(name: &str) -> (String, &'static str) {
    let name = serde_json::to_string(name).unwrap_or_default();
    (
        format!("<tool_call>{{\"name\": {name}, \"arguments\": "),
        CLOSE,
    )
}

/// The messages the template renders: roles it knows, tools described in a system
/// message, calls and results in the generic format.
pub fn template_messages(req: &ChatCompletionRequest) -> Result<Vec<TemplateMessage>, String> {
    let mut out = Vec::with_capacity(req.messages.len() + 1);
    for m in &req.messages {
        out.push(render_message(m)?);
    }
    if let Some(section) = tools_section(req) {
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{section}", first.content)
            }
            _ => out.insert(
                0,
                TemplateMessage {
                    role: "system".into(),
                    content: section,
                },
            ),
        }
    }
    Ok(out)
}

fn render_message(m: &ChatMessage) -> Result<TemplateMessage, String> {
    let text = m.content.to_text()?;
    let (role, content) = match m.role.as_str() {
        "developer" => ("system", text),
        "tool" => (
            "user",
            format!(
                "<tool_response>{}</tool_response>",
                json!({"tool_call_id": m.tool_call_id, "content": text})
            ),
        ),
        "assistant" => {
            let mut content = text;
            for call in m.tool_calls.iter().flatten() {
                let (open, close) = call_frame(&call.function.name);
                content.push_str(&open);
                content.push_str(&call.function.arguments);
                content.push_str(close);
            }
            ("assistant", content)
        }
        other => (other, text),
    };
    Ok(TemplateMessage {
        role: role.to_owned(),
        content,
    })
}

fn tools_section(req: &ChatCompletionRequest) -> Option<String> {
    let tools = req.tools.as_deref().filter(|t| !t.is_empty())?;
    let mut s =
        String::from("# Tools\nYou can call functions. Each is described by a JSON object:\n");
    for t in tools {
        let f = &t.function;
        s.push_str(
            &json!({"name": f.name, "description": f.description, "parameters": f.parameters})
                .to_string(),
        );
        s.push('\n');
    }
    s.push_str(
        "To call one, answer with exactly\n<tool_call>{\"name\": \"<name>\", \"arguments\": \
         <a JSON object>}</tool_call>\nand nothing else; several calls follow one another.",
    );
    match req.tool_mode() {
        ToolMode::Required => s.push_str("\nCall at least one function now."),
        ToolMode::Named(name) => s.push_str(&format!("\nCall `{name}` now.")),
        ToolMode::None => s.push_str("\nDo not call a function now; answer in text."),
        ToolMode::Auto => {}
    }
    Some(s)
}

/// What a piece of output is, once read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// A call begins: its position among the reply's calls and its function's name.
    CallStart {
        index: u32,
        name: String,
    },
    /// More of the current call's arguments (JSON text).
    Arguments {
        index: u32,
        text: String,
    },
}

/// Reads a reply as text or calls, incrementally.
#[derive(Debug, Default)]
pub struct CallReader {
    state: State,
    calls: u32,
    /// Bytes of a literal part still to match, or of a name read so far.
    held: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Undecided,
    Text,
    /// Matching the frame up to the name's opening quote.
    Open,
    Name,
    /// Matching `, "arguments": `.
    AfterName,
    Arguments(Json),
    Close,
    /// A call ended; another may begin.
    Between,
    /// Output that broke the format: the rest is ignored.
    Broken,
}

/// Where a JSON scan stands: nesting depth and string state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Json {
    depth: u32,
    in_string: bool,
    escaped: bool,
}

const OPEN_TO_NAME: &str = "<tool_call>{\"name\": \"";
const NAME_TO_ARGS: &str = ", \"arguments\": ";

impl CallReader {
    /// Whether the reply so far is calls.
    pub fn is_calls(&self) -> bool {
        !matches!(self.state, State::Undecided | State::Text)
    }

    /// Whether the reply broke the call format (only possible without a grammar).
    pub fn is_broken(&self) -> bool {
        self.state == State::Broken
    }

    /// Reads more output; gives back what it now knows.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        if self.state == State::Text {
            return vec![Piece::Text(text.to_owned())];
        }
        let mut out = Vec::new();
        let mut args = String::new();
        for c in text.chars() {
            match self.state {
                State::Undecided if c == MARKER_FIRST => {
                    self.state = State::Open;
                    self.held = c.to_string();
                }
                State::Undecided => {
                    self.state = State::Text;
                    out.push(Piece::Text(text.to_owned()));
                    return out;
                }
                State::Text | State::Broken => {}
                State::Open | State::AfterName | State::Close => {
                    let literal = match self.state {
                        State::Open => OPEN_TO_NAME,
                        State::AfterName => NAME_TO_ARGS,
                        _ => CLOSE,
                    };
                    self.held.push(c);
                    if self.held == literal {
                        self.held.clear();
                        self.state = match self.state {
                            State::Open => State::Name,
                            State::AfterName => State::Arguments(Json::default()),
                            _ => {
                                self.calls += 1;
                                State::Between
                            }
                        };
                    } else if !literal.starts_with(self.held.as_str()) {
                        self.state = State::Broken;
                    }
                }
                // After a call, only another call may follow.
                State::Between if c == MARKER_FIRST => {
                    self.state = State::Open;
                    self.held = c.to_string();
                }
                State::Between => self.state = State::Broken,
                State::Name if c == '"' => {
                    out.push(Piece::CallStart {
                        index: self.calls,
                        name: std::mem::take(&mut self.held),
                    });
                    self.state = State::AfterName;
                }
                State::Name => self.held.push(c),
                State::Arguments(mut j) => {
                    args.push(c);
                    if j.in_string {
                        if j.escaped {
                            j.escaped = false;
                        } else if c == '\\' {
                            j.escaped = true;
                        } else if c == '"' {
                            j.in_string = false;
                        }
                    } else if c == '"' {
                        j.in_string = true;
                    } else if c == '{' || c == '[' {
                        j.depth += 1;
                    } else if c == '}' || c == ']' {
                        j.depth = j.depth.saturating_sub(1);
                    }
                    self.state = if j.depth == 0 && !j.in_string && (c == '}' || c == ']') {
                        out.push(Piece::Arguments {
                            index: self.calls,
                            text: std::mem::take(&mut args),
                        });
                        State::Close
                    } else {
                        State::Arguments(j)
                    };
                    if self.state == State::Close {
                        self.held.clear();
                    }
                }
            }
        }
        if !args.is_empty() {
            out.push(Piece::Arguments {
                index: self.calls,
                text: args,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(chunks: &[&str]) -> (Vec<(String, String)>, String) {
        let mut r = CallReader::default();
        let mut calls: Vec<(String, String)> = Vec::new();
        let mut text = String::new();
        for c in chunks {
            for p in r.push(c) {
                match p {
                    Piece::Text(t) => text.push_str(&t),
                    Piece::CallStart { index, name } => {
                        assert_eq!(index as usize, calls.len());
                        calls.push((name, String::new()))
                    }
                    Piece::Arguments { index, text } => calls[index as usize].1.push_str(&text),
                }
            }
        }
        (calls, text)
    }

    fn frame(name: &str, args: &str) -> String {
        let (open, close) = call_frame(name);
        format!("{open}{args}{close}")
    }

    #[test]
    fn reads_calls_split_anywhere() {
        let out = frame(
            "get_weather",
            r#"{"city": "Paris}</tool_call>", "n": [1, {"a": "\""}]}"#,
        ) + &frame("f", "{}");
        // Every split point, byte by byte and in two halves.
        let chars: Vec<String> = out.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        for pieces in [
            refs.clone(),
            vec![&out[..17], &out[17..]],
            vec![out.as_str()],
        ] {
            let (calls, text) = read_all(&pieces);
            assert_eq!(text, "");
            assert_eq!(
                calls,
                vec![
                    (
                        "get_weather".to_owned(),
                        r#"{"city": "Paris}</tool_call>", "n": [1, {"a": "\""}]}"#.to_owned()
                    ),
                    ("f".to_owned(), "{}".to_owned())
                ]
            );
        }
    }

    #[test]
    fn text_is_text_and_broken_frames_are_not_calls() {
        let (calls, text) = read_all(&["Hello", " there"]);
        assert!(calls.is_empty());
        assert_eq!(text, "Hello there");
        let mut r = CallReader::default();
        r.push("<tool_cal!");
        assert!(r.is_broken());
    }

    #[test]
    fn history_renders_calls_and_results_in_the_format() {
        let req: ChatCompletionRequest = serde_json::from_value(json!({
            "model": "m",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}
            ]
        }))
        .unwrap();
        let msgs = template_messages(&req).unwrap();
        assert_eq!(msgs[0].role, "system");
        assert!(msgs[0].content.starts_with("Be brief.\n\n# Tools"));
        assert_eq!(msgs[1].content, frame("f", "{\"x\": 1}"));
        assert_eq!(msgs[2].role, "user");
        assert_eq!(
            msgs[2].content,
            r#"<tool_response>{"tool_call_id":"call_1","content":"42"}</tool_response>"#
        );
    }
}
