//! Chat models: a llama-family GGUF file, its tokenizer and chat template, and the engine
//! thread that generates tokens for many requests at once.
//!
//! Owns: prompt preparation (a prompt's size bound, template, tokenization, context
//! limits), sampling parameters and the generation loop. Must never: block the async
//! runtime (the model runs on its own thread, fed by a bounded queue; rendering and
//! tokenising run on blocking threads, a bounded number at once) or know who is asking.

mod engine;
mod grammar;
mod kernels;
mod model;
mod prefix;
mod sampler;
mod template;
mod tokenizer;
pub mod toolcall;
mod weights;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use llguidance::Matcher;
use openai_types::{ChatCompletionRequest, FinishReason, MessageContent, Usage};
use tokio::sync::{mpsc, Semaphore};

use crate::error::WorkerError;
use crate::metrics::Metrics;
pub use kernels::allow_vnni;
pub use sampler::SamplingParams;
pub use template::{ChatTemplate, TemplateMessage};

/// How the model samples and when it stops, resolved from a request.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    /// Completion tokens per choice.
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Choices generated from the one prompt (`n`).
    pub choices: usize,
}

/// A generated token's log probability and the likeliest alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What the engine tells a request as it generates; `index` is the choice.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// New text, already safe to show (no partial stop sequence, no partial UTF-8), the
    /// log probabilities of the tokens since the last delta (where asked), and the tokens
    /// counted so far over all choices, so a stream cut short can be billed exactly.
    Delta {
        index: u32,
        text: String,
        logprobs: Vec<TokenInfo>,
        usage: Usage,
    },
    Finished {
        index: u32,
        reason: FinishReason,
        logprobs: Vec<TokenInfo>,
        usage: Usage,
    },
    Failed(String),
}

/// A prepared request waiting for the engine.
pub struct GenerationJob {
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    /// The request's output constraint, matched from its first token.
    pub grammar: Option<Matcher>,
    pub events: mpsc::Sender<GenerationEvent>,
}

/// A request made ready for the engine: its prompt, parameters and constraint.
pub struct Prepared {
    pub request: ChatCompletionRequest,
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    pub grammar: Option<Matcher>,
}

/// Engine sizing, from the worker's configuration.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Sequences decoded together.
    pub max_active: usize,
    /// Requests waiting beyond those; a full queue is answered 503.
    pub max_queued: usize,
    /// Bytes of keys and values the prefix cache keeps; 0 keeps none.
    pub prefix_cache_bytes: usize,
    /// Most tokens one sequence may hold, prompt and completion, where below the model's
    /// own context window.
    pub max_context: Option<usize>,
}

pub struct ChatModel {
    pub name: String,
    template: ChatTemplate,
    tokenizer: tokenizers::Tokenizer,
    /// The bytes each token id stands for (special tokens marked), for log probabilities
    /// and the grammar matcher.
    token_bytes: Arc<Vec<Vec<u8>>>,
    grammars: grammar::Grammars,
    vocab: usize,
    context_len: usize,
    /// The most message text a prompt may hold: more bytes than this cannot fit the
    /// context window, whatever they tokenise to.
    max_prompt_bytes: usize,
    /// Prompts being rendered and tokenised at once; none free is `Overloaded`.
    preparing: Arc<Semaphore>,
    submit: mpsc::Sender<GenerationJob>,
}

impl ChatModel {
    /// Loads the GGUF file and starts its engine thread.
    pub fn load(
        name: String,
        path: &Path,
        limits: EngineLimits,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| anyhow::anyhow!("reading GGUF {}: {e}", path.display()))?;
        let (tokenizer, special) = tokenizer::from_gguf(&content)?;
        let token_bytes = Arc::new(tokenizer::token_bytes(&content)?);
        let grammars = grammar::Grammars::new(&token_bytes, special.eos)?;
        let template_src = content
            .metadata
            .get("tokenizer.chat_template")
            .ok_or_else(|| anyhow::anyhow!("{} has no tokenizer.chat_template", path.display()))?
            .to_string()?
            .clone();
        let template = ChatTemplate::new(
            template_src,
            special.bos_text.clone(),
            special.eos_text.clone(),
        )?;
        let model = model::Llama::load(&content, &mut file)?;
        let vocab = model.hyper.vocab;
        let context_len = limits.max_context.map_or(model.hyper.context_len, |m| {
            m.clamp(1, model.hyper.context_len)
        });
        let max_prompt_bytes = context_len.saturating_sub(1) * longest_token_bytes(&tokenizer);
        tracing::info!(model = %name, context_len, max_prompt_bytes, "chat prompt bounds");
        let (submit, queue) = mpsc::channel(limits.max_queued.max(1));
        let engine = engine::Engine::new(
            name.clone(),
            model,
            tokenizer.clone(),
            special.eos,
            limits.max_active.max(1),
            metrics,
        )
        .with_closers(grammar::closing_tokens(&token_bytes))
        .with_prefix_cache(limits.prefix_cache_bytes);
        crate::math::spawn_on_own_pool(format!("engine-{name}"), move || engine.run(queue))?;
        Ok(Arc::new(Self {
            name,
            template,
            tokenizer,
            token_bytes,
            grammars,
            vocab,
            context_len,
            max_prompt_bytes,
            preparing: Arc::new(Semaphore::new(limits.max_queued.max(1))),
            submit,
        }))
    }

    /// The prompt text for a request, rendered by the model's own template, with tools and
    /// tool turns in the generic format.
    pub fn render_prompt(&self, req: &ChatCompletionRequest) -> Result<String, WorkerError> {
        let messages =
            toolcall::template_messages(req).map_err(|e| WorkerError::invalid(e, "messages"))?;
        self.template
            .render(&messages)
            .map_err(|e| WorkerError::invalid(format!("chat template: {e}"), "messages"))
    }

    /// The bytes token `id` stands for, and its text (lossy where the bytes are part of a
    /// character).
    pub fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self
            .token_bytes
            .get(id as usize)
            .map(|b| b.strip_prefix(&[0xFF]).unwrap_or(b).to_vec())
            .unwrap_or_default();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// The text of token ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String, WorkerError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| WorkerError::Internal(format!("tokenizer: {e}")))
    }

    /// Token ids of `text`, special tokens recognised but none added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, WorkerError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| WorkerError::Internal(format!("tokenizer: {e}")))
    }

    /// Checks a request and the size of its messages' text, cheaply, before any rendering
    /// or tokenising: a prompt of more bytes than `max_prompt_bytes` is refused as over the
    /// context window, since each token stands for at most the longest token's bytes.
    pub fn check(&self, req: &ChatCompletionRequest) -> Result<(), WorkerError> {
        req.validate()
            .map_err(|(msg, param)| WorkerError::invalid(msg, param))?;
        self.check_sampling(req)?;
        let bytes = prompt_text_bytes(req);
        if bytes > self.max_prompt_bytes {
            return Err(WorkerError::ContextLength(format!(
                "the messages hold {bytes} bytes of text; at most {} bytes fit this model's \
                 context window of {} tokens",
                self.max_prompt_bytes, self.context_len
            )));
        }
        Ok(())
    }

    /// The checks of sampling fields that need the model: token ids within its vocabulary.
    fn check_sampling(&self, req: &ChatCompletionRequest) -> Result<(), WorkerError> {
        if let Some(bias) = &req.logit_bias {
            if let Some(t) = bias
                .keys()
                .find(|t| t.parse::<usize>().is_ok_and(|t| t >= self.vocab))
            {
                return Err(WorkerError::invalid(
                    format!(
                        "`logit_bias` names token {t}; this model's vocabulary has {} tokens",
                        self.vocab
                    ),
                    "logit_bias",
                ));
            }
        }
        Ok(())
    }

    /// Runs `work` on a blocking thread (never the async runtime), at most a bounded number
    /// at once; none free is `Overloaded`.
    pub async fn off_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&ChatModel) -> Result<T, WorkerError> + Send + 'static,
    ) -> Result<T, WorkerError> {
        let permit = self
            .preparing
            .clone()
            .try_acquire_owned()
            .map_err(|_| WorkerError::Overloaded)?;
        let model = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&model)
        })
        .await
        .map_err(|e| WorkerError::Internal(format!("preparing the prompt: {e}")))?
    }

    /// Checks `req`, then renders and tokenises its prompt and compiles its constraint on a
    /// blocking thread (never the async runtime), at most a bounded number at once.
    pub async fn prepare_off_runtime(
        self: &Arc<Self>,
        req: ChatCompletionRequest,
    ) -> Result<Prepared, WorkerError> {
        self.check(&req)?;
        self.off_runtime(move |model| model.prepare(req)).await
    }

    /// Tokenizes the prompt, resolves sampling parameters within the context window and
    /// compiles the output constraint. Blocks for as long as the prompt is long: call it
    /// off the async runtime.
    pub fn prepare(&self, req: ChatCompletionRequest) -> Result<Prepared, WorkerError> {
        self.check(&req)?;
        let prompt = self.encode(&self.render_prompt(&req)?)?;
        self.prepare_tokens(req, prompt)
    }

    /// A legacy completion's prompts, each as it is (no template): text tokenised, token
    /// ids checked against the vocabulary. `sampling` holds the request's sampling fields.
    /// Blocks: call it off the async runtime.
    pub fn prepare_raw(
        &self,
        parts: &[openai_types::PromptPart],
        sampling: &ChatCompletionRequest,
    ) -> Result<Vec<Prepared>, WorkerError> {
        self.check_sampling(sampling)?;
        parts
            .iter()
            .map(|part| {
                let prompt = match part {
                    openai_types::PromptPart::Text(t) => {
                        if t.len() > self.max_prompt_bytes {
                            return Err(WorkerError::ContextLength(format!(
                                "the prompt holds {} bytes; at most {} bytes fit this model's \
                                 context window of {} tokens",
                                t.len(),
                                self.max_prompt_bytes,
                                self.context_len
                            )));
                        }
                        self.encode(t)?
                    }
                    openai_types::PromptPart::Tokens(ids) => {
                        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
                            return Err(WorkerError::invalid(
                                format!(
                                    "token {id} is not in this model's vocabulary of {} tokens",
                                    self.vocab
                                ),
                                "prompt",
                            ));
                        }
                        ids.clone()
                    }
                };
                self.prepare_tokens(sampling.clone(), prompt)
            })
            .collect()
    }

    /// Resolves a tokenised prompt's constraint and sampling parameters within the context
    /// window.
    fn prepare_tokens(
        &self,
        req: ChatCompletionRequest,
        prompt: Vec<u32>,
    ) -> Result<Prepared, WorkerError> {
        if prompt.len() >= self.context_len {
            return Err(WorkerError::ContextLength(format!(
                "the prompt is {} tokens; this model's context window is {} tokens",
                prompt.len(),
                self.context_len
            )));
        }
        let grammar = self.grammars.matcher_for(&req).map_err(|e| {
            let param = if req.response_format.is_some() {
                "response_format"
            } else {
                "tools"
            };
            WorkerError::invalid(format!("this schema cannot be enforced: {e}"), param)
        })?;
        let room = self.context_len - prompt.len();
        let max_tokens = req
            .requested_max_tokens()
            .map_or(room, |m| (m as usize).min(room));
        let sampling = SamplingParams {
            temperature: req.temperature.unwrap_or(1.0) as f32,
            top_p: req.top_p.unwrap_or(1.0) as f32,
            top_k: req.top_k.unwrap_or(0) as usize,
            min_p: req.min_p.unwrap_or(0.0) as f32,
            presence_penalty: req.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: req.frequency_penalty.unwrap_or(0.0) as f32,
            repetition_penalty: req.repetition_penalty.unwrap_or(1.0) as f32,
            logit_bias: req
                .logit_bias
                .iter()
                .flatten()
                .filter_map(|(t, b)| Some((t.parse().ok()?, *b as f32)))
                .collect(),
            logprobs: (req.logprobs == Some(true)).then(|| req.top_logprobs.unwrap_or(0) as usize),
            seed: req.seed.unwrap_or_else(rand::random),
        };
        let params = GenerationParams {
            max_tokens,
            stop: req.stop_sequences(),
            sampling,
            choices: req.choices() as usize,
        };
        Ok(Prepared {
            request: req,
            prompt,
            params,
            grammar,
        })
    }

    /// The most tokens one call can use, prompt and completion together.
    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// Queues a job; a full queue is `Overloaded`, never a wait.
    pub fn submit(&self, job: GenerationJob) -> Result<(), WorkerError> {
        self.submit.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => WorkerError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => WorkerError::Internal("engine stopped".into()),
        })
    }
}

/// Bytes of text a request's prompt holds for certain, whatever the template adds: message
/// text, replayed calls, and the tools' names, descriptions and schemas.
fn prompt_text_bytes(req: &ChatCompletionRequest) -> usize {
    let messages: usize = req
        .messages
        .iter()
        .map(|m| {
            let content = match &m.content {
                MessageContent::Text(t) => t.len(),
                MessageContent::Parts(parts) => parts
                    .iter()
                    .map(|p| p.text.as_ref().map_or(0, String::len))
                    .sum(),
                MessageContent::Null => 0,
            };
            let calls: usize = m
                .tool_calls
                .iter()
                .flatten()
                .map(|c| c.function.name.len() + c.function.arguments.len())
                .sum();
            content + calls
        })
        .sum();
    let tools: usize = req
        .tools
        .iter()
        .flatten()
        .map(|t| {
            let f = &t.function;
            f.name.len()
                + f.description.as_ref().map_or(0, String::len)
                + f.parameters.as_ref().map_or(0, |p| p.to_string().len())
        })
        .sum();
    messages + tools
}

/// Bytes of text the longest token stands for: byte-level tokens spell one byte per
/// character, added (special) tokens their own text.
fn longest_token_bytes(tokenizer: &tokenizers::Tokenizer) -> usize {
    let added = tokenizer.get_added_tokens_decoder();
    let byte_level = tokenizer
        .get_vocab(false)
        .keys()
        .map(|t| t.chars().count())
        .max()
        .unwrap_or(1);
    let special = added.values().map(|t| t.content.len()).max().unwrap_or(1);
    byte_level.max(special).max(1)
}
