//! Worker configuration: flags, each with an environment variable.
//!
//! Owns: the flags, their defaults and how a model spec names its model. Must never: open
//! files or load models.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "inference-worker",
    about = "Serves llama-family GGUF chat models and BERT-family embedding models over an OpenAI-compatible API"
)]
pub struct WorkerConfig {
    /// Address to listen on; port 0 picks a free port (printed at start).
    #[arg(long, env = "WORKER_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,

    /// Chat model as `NAME=PATH.gguf` or `PATH.gguf` (name = file name up to the first dot).
    #[arg(long = "chat-model", env = "WORKER_CHAT_MODELS", value_delimiter = ',')]
    pub chat_models: Vec<String>,

    /// Embedding model folder as `NAME=DIR` or `DIR` (name = folder name).
    #[arg(
        long = "embedding-model",
        env = "WORKER_EMBEDDING_MODELS",
        value_delimiter = ','
    )]
    pub embedding_models: Vec<String>,

    /// Threads for model compute (default: all cores).
    #[arg(long, env = "WORKER_THREADS")]
    pub threads: Option<usize>,

    /// Chat sequences decoded together.
    #[arg(long, env = "WORKER_MAX_ACTIVE_SEQUENCES", default_value_t = 8)]
    pub max_active_sequences: usize,

    /// Most tokens one chat sequence may hold, prompt and completion, below the model's own
    /// context window (which is the default): bounds each sequence's cache. Reported as
    /// the model's `context_length` in `/v1/models`.
    #[arg(long, env = "WORKER_MAX_CONTEXT")]
    pub max_context: Option<usize>,

    /// Bytes of finished sequences' keys and values kept per chat model, so a prompt that
    /// begins as an earlier one did (a conversation's next turn, a shared system prompt)
    /// reads only the rest; the least recently used go first. 0 keeps none.
    #[arg(long, env = "WORKER_PREFIX_CACHE_BYTES", default_value_t = 256 << 20)]
    pub prefix_cache_bytes: usize,

    /// Requests that may wait per model before new ones get 503.
    #[arg(long, env = "WORKER_MAX_QUEUED", default_value_t = 64)]
    pub max_queued: usize,

    /// Most texts embedded in one forward pass.
    #[arg(long, env = "WORKER_EMBED_MAX_BATCH", default_value_t = 32)]
    pub embed_max_batch: usize,

    /// Instruction set of the model kernels: `auto` takes the best the CPU reports at start
    /// (AVX-512 and VNNI, else AVX2/FMA); the others cap it, e.g. to compare (`avx2` for
    /// both model kinds, `portable` for the embedding models' dense layers).
    #[arg(long, env = "WORKER_CPU_KERNELS", value_enum, default_value_t = CpuKernels::Auto)]
    pub cpu_kernels: CpuKernels,

    /// Largest request body accepted.
    #[arg(long, env = "WORKER_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
}

/// A choice of kernel instruction set (see `--cpu-kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuKernels {
    Auto,
    Avx512,
    Avx2,
    Portable,
}

/// Splits `NAME=PATH`, or names the model after the path.
pub fn named_path(spec: &str) -> (String, PathBuf) {
    if let Some((name, path)) = spec.split_once('=') {
        return (name.to_owned(), PathBuf::from(path));
    }
    let path = PathBuf::from(spec);
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_owned());
    let name = file.split('.').next().unwrap_or(&file).to_owned();
    (name, path)
}

#[cfg(test)]
mod tests {
    use super::named_path;

    #[test]
    fn names_models_after_their_files() {
        assert_eq!(
            named_path("models/SmolLM2-135M-Instruct.Q4_1.gguf").0,
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(named_path("models/all-MiniLM-L6-v2").0, "all-MiniLM-L6-v2");
        assert_eq!(named_path("chat=x/y.gguf").0, "chat");
    }
}
