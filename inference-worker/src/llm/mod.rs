//! Chat models: a llama-family GGUF file, its tokenizer and chat template, and the engine
//! thread that generates tokens for many requests at once.
//!
//! Owns: prompt preparation (template, tokenization, context limits), sampling parameters
//! and the generation loop. Must never: block the async runtime (the model runs on its own
//! thread, fed by a bounded queue) or know who is asking.

mod engine;
mod kernels;
mod model;
mod template;
mod tokenizer;
mod weights;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use openai_types::{ChatCompletionRequest, FinishReason, Usage};
use tokio::sync::mpsc;

use crate::error::WorkerError;
use crate::metrics::Metrics;
pub use template::{ChatTemplate, TemplateMessage};

/// How the model samples and when it stops, resolved from a request.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub stop: Vec<String>,
}

/// What the engine tells a request as it generates.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// New text, already safe to show (no partial stop sequence, no partial UTF-8), with
    /// the tokens counted so far, so a stream cut short can be billed exactly.
    Delta {
        text: String,
        usage: Usage,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(String),
}

/// A prepared request waiting for the engine.
pub struct GenerationJob {
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    pub events: mpsc::Sender<GenerationEvent>,
}

/// Engine sizing, from the worker's configuration.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Sequences decoded together.
    pub max_active: usize,
    /// Requests waiting beyond those; a full queue is answered 503.
    pub max_queued: usize,
    /// Most tokens one sequence may hold, prompt and completion, where below the model's
    /// own context window.
    pub max_context: Option<usize>,
}

pub struct ChatModel {
    pub name: String,
    template: ChatTemplate,
    tokenizer: tokenizers::Tokenizer,
    context_len: usize,
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
        let context_len = limits.max_context.map_or(model.hyper.context_len, |m| {
            m.clamp(1, model.hyper.context_len)
        });
        let (submit, queue) = mpsc::channel(limits.max_queued.max(1));
        let engine = engine::Engine::new(
            name.clone(),
            model,
            tokenizer.clone(),
            special.eos,
            limits.max_active.max(1),
            metrics,
        );
        crate::math::spawn_on_own_pool(format!("engine-{name}"), move || engine.run(queue))?;
        Ok(Arc::new(Self {
            name,
            template,
            tokenizer,
            context_len,
            submit,
        }))
    }

    /// The prompt text for a request, rendered by the model's own template.
    pub fn render_prompt(&self, req: &ChatCompletionRequest) -> Result<String, WorkerError> {
        let messages = req
            .messages
            .iter()
            .map(|m| {
                Ok(TemplateMessage {
                    role: m.role.clone(),
                    content: m
                        .content
                        .to_text()
                        .map_err(|e| WorkerError::invalid(e, "messages"))?,
                })
            })
            .collect::<Result<Vec<_>, WorkerError>>()?;
        self.template
            .render(&messages)
            .map_err(|e| WorkerError::invalid(format!("chat template: {e}"), "messages"))
    }

    /// Token ids of `text`, special tokens recognised but none added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, WorkerError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| WorkerError::Internal(format!("tokenizer: {e}")))
    }

    /// Tokenizes the prompt and resolves sampling parameters within the context window.
    pub fn prepare(
        &self,
        req: &ChatCompletionRequest,
    ) -> Result<(Vec<u32>, GenerationParams), WorkerError> {
        req.validate()
            .map_err(|(msg, param)| WorkerError::invalid(msg, param))?;
        let prompt = self.encode(&self.render_prompt(req)?)?;
        if prompt.len() >= self.context_len {
            return Err(WorkerError::ContextLength(format!(
                "the prompt is {} tokens; this model's context window is {} tokens",
                prompt.len(),
                self.context_len
            )));
        }
        let room = self.context_len - prompt.len();
        let max_tokens = req
            .requested_max_tokens()
            .map_or(room, |m| (m as usize).min(room));
        let params = GenerationParams {
            max_tokens,
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p.filter(|p| *p < 1.0),
            seed: req.seed.unwrap_or_else(rand::random),
            stop: req.stop_sequences(),
        };
        Ok((prompt, params))
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
