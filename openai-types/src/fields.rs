//! Which top-level fields each request may carry: the fields OpenAI defines that we honour
//! and our documented extensions. Any other field is refused, by name, at the gateway and at
//! the worker alike, so a caller never pays for a reply that ignored what it asked for.

/// The fields of one kind of request.
pub struct FieldRules {
    /// Fields honoured.
    pub known: &'static [&'static str],
    /// OpenAI fields we know and cannot honour, with why.
    pub unsupported: &'static [(&'static str, &'static str)],
}

impl FieldRules {
    /// Whether `name` is neither ours nor OpenAI's.
    pub fn is_unknown(&self, name: &str) -> bool {
        !self.known.contains(&name) && !self.unsupported.iter().any(|(f, _)| *f == name)
    }

    /// The error for a field a request may not carry, if `name` is one, worded as OpenAI
    /// words it.
    pub fn refusal(&self, name: &str) -> Option<String> {
        if let Some((_, why)) = self.unsupported.iter().find(|(f, _)| *f == name) {
            return Some(format!("`{name}` is not supported: {why}"));
        }
        self.is_unknown(name)
            .then(|| format!("Unrecognized request argument supplied: {name}"))
    }
}

/// The rules of a forwarded endpoint whose fields are checked.
pub fn rules_for(endpoint: &str) -> Option<&'static FieldRules> {
    match endpoint {
        "/v1/chat/completions" => Some(&CHAT_RULES),
        "/v1/completions" => Some(&COMPLETION_RULES),
        "/v1/responses" => Some(&RESPONSES_RULES),
        _ => None,
    }
}

/// `POST /v1/chat/completions`.
pub const CHAT_RULES: FieldRules = FieldRules {
    known: &[
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "metadata",
        "safety_identifier",
        "prompt_cache_key",
        "store",
        "service_tier",
        "modalities",
        "top_k",
        "min_p",
        "repetition_penalty",
    ],
    unsupported: &[
        ("audio", "audio output is not supported"),
        ("prediction", "predicted outputs are not supported"),
        ("web_search_options", "web search is not supported"),
        (
            "functions",
            "use `tools`; the deprecated `functions` is not supported",
        ),
        (
            "function_call",
            "use `tool_choice`; the deprecated `function_call` is not supported",
        ),
        ("reasoning_effort", "the served models do not reason"),
        ("verbosity", "the served models do not support `verbosity`"),
    ],
};

/// `POST /v1/completions`.
pub const COMPLETION_RULES: FieldRules = FieldRules {
    known: &[
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stream",
        "stream_options",
        "logprobs",
        "echo",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "best_of",
        "user",
        "top_k",
        "min_p",
        "repetition_penalty",
    ],
    unsupported: &[("suffix", "inserting text (a suffix) is not supported")],
};

/// `POST /v1/responses`.
pub const RESPONSES_RULES: FieldRules = FieldRules {
    known: &[
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "text",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "metadata",
        "stream",
        "store",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "truncation",
        "service_tier",
    ],
    unsupported: &[
        (
            "previous_response_id",
            "responses are not stored; send the whole conversation in `input`",
        ),
        (
            "conversation",
            "responses are not stored; send the whole conversation in `input`",
        ),
        ("reasoning", "the served models do not reason"),
        ("background", "background responses are not supported"),
        ("include", "no extra output data is available"),
        ("prompt", "stored prompt templates are not supported"),
        (
            "top_logprobs",
            "log probabilities are not offered on this endpoint; use chat completions",
        ),
        ("max_tool_calls", "`max_tool_calls` is not supported"),
        ("stream_options", "`stream_options` is not supported"),
    ],
};
