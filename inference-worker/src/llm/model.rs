//! A llama-family transformer read from a GGUF file, with a forward pass over a batch of
//! tokens that may belong to different sequences at different positions: prompt chunks of
//! sequences that just arrived and the next token of every sequence being decoded go
//! through the weights together, one pass per engine step.
//!
//! Owns: the network's shape from the file's metadata, which tensor goes where, RMS norm,
//! rotary embeddings, grouped-query attention over per-sequence KV caches, the SwiGLU
//! feed-forward and the output head. Must never: sample, schedule or know about requests,
//! or decide how a weight matrix is stored (that is `weights`).

use std::io::{Read, Seek};

use candle_core::quantized::gguf_file;
use candle_core::Device;
use half::f16;
use rayon::prelude::*;

use crate::math::{add_into, dot, softmax};

use super::kernels::{
    cached_dots, cached_weighted_sum, extend_f16, extend_f32, round_to_f16, Cached, TurnedKeys,
};
use super::weights::{Embeddings, Fused, Linear};

struct Layer {
    attn_norm: Vec<f32>,
    /// q, k and v projections.
    qkv: Fused,
    attn_out: Linear,
    ffn_norm: Vec<f32>,
    /// gate and up projections.
    gate_up: Fused,
    down: Linear,
}

/// The shape of the network, from the file's metadata.
#[derive(Debug, Clone)]
pub struct Hyper {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    /// Rotate halves (GPT-NeoX style) instead of adjacent pairs.
    pub rope_neox: bool,
    pub eps: f32,
    pub context_len: usize,
}

/// One sequence's keys and values, per layer, `kv_heads · head_dim` values per position,
/// kept in f16 as llama.cpp's cache keeps them: half the memory, and half the bytes that
/// attention reads per step, which dominate it once several long sequences decode together.
#[derive(Default, Clone, Debug, PartialEq)]
pub struct KvCache {
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
        }
    }

    /// A copy of the first `positions` positions (`kv_dim` values each per layer).
    pub fn prefix(&self, positions: usize, kv_dim: usize) -> Self {
        let cut = |layers: &Vec<Vec<f16>>| {
            layers
                .iter()
                .map(|l| l[..(positions * kv_dim).min(l.len())].to_vec())
                .collect()
        };
        Self {
            keys: cut(&self.keys),
            values: cut(&self.values),
        }
    }

    /// Positions held (`kv_dim` values each per layer).
    pub fn positions(&self, kv_dim: usize) -> usize {
        self.keys.first().map_or(0, |l| l.len() / kv_dim.max(1))
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        let values: usize = self.keys.iter().chain(&self.values).map(Vec::len).sum();
        values * std::mem::size_of::<f16>()
    }

    /// A cache whose every value is its position, for tests of what holds caches.
    #[cfg(test)]
    pub fn from_positions(layers: usize, kv_dim: usize, positions: usize) -> Self {
        let layer: Vec<f16> = (0..positions * kv_dim)
            .map(|i| f16::from_f32((i / kv_dim) as f32))
            .collect();
        Self {
            keys: vec![layer.clone(); layers],
            values: vec![layer; layers],
        }
    }
}

/// One token in a step: which cache it belongs to and where it sits in its sequence.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub token: u32,
    pub position: usize,
    pub cache: usize,
    /// Whether the caller wants next-token logits for this token.
    pub logits: bool,
}

pub struct Llama {
    pub hyper: Hyper,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    head: Linear,
    /// cos/sin of every position × rotary frequency.
    rope: Vec<(f32, f32)>,
}

/// The architectures whose GGUF files use GPT-NeoX rotary layout (as llama.cpp decides it).
const NEOX_ARCHITECTURES: &[&str] = &["qwen", "qwen2", "qwen3", "stablelm", "phi3", "olmo2"];

/// Longest context a cache is allowed to grow to, whatever the file says.
pub const MAX_CONTEXT: usize = 8192;

impl Llama {
    pub fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
    ) -> anyhow::Result<Self> {
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".to_string());
        let md = |key: &str| {
            content
                .metadata
                .get(&format!("{arch}.{key}"))
                .ok_or_else(|| anyhow::anyhow!("the file has no {arch}.{key}"))
        };
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let heads = md("attention.head_count")?.to_u32()? as usize;
        let kv_heads = md("attention.head_count_kv")
            .and_then(|v| Ok(v.to_u32()? as usize))
            .unwrap_or(heads);
        let layers = md("block_count")?.to_u32()? as usize;
        let head_dim = hidden / heads;
        let rope_dim = md("rope.dimension_count")
            .and_then(|v| Ok(v.to_u32()? as usize))
            .unwrap_or(head_dim);
        let rope_base = md("rope.freq_base")
            .and_then(|v| Ok(v.to_f32()?))
            .unwrap_or(10_000.0);
        let eps = md("attention.layer_norm_rms_epsilon")
            .and_then(|v| Ok(v.to_f32()?))
            .unwrap_or(1e-5);
        let context_len = md("context_length")
            .and_then(|v| Ok(v.to_u32()? as usize))
            .unwrap_or(4096)
            .min(MAX_CONTEXT);

        let tensor = |reader: &mut R, name: &str| {
            content
                .tensor(reader, name, &Device::Cpu)
                .map_err(|e| anyhow::anyhow!("loading {name}: {e}"))
        };
        let vector = |reader: &mut R, name: &str| -> anyhow::Result<Vec<f32>> {
            Ok(tensor(reader, name)?
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1()?)
        };

        let embd = tensor(reader, "token_embd.weight")?;
        let (vocab, embd_cols) = embd.shape().dims2()?;
        if embd_cols != hidden {
            anyhow::bail!("token_embd is {vocab}×{embd_cols}; expected width {hidden}");
        }
        let (embeddings, head) = Embeddings::with_head(content, reader, embd, hidden)?;

        let mut blocks = Vec::with_capacity(layers);
        for l in 0..layers {
            let name = |part: &str| format!("blk.{l}.{part}.weight");
            let mut linear = |part: &str| Linear::load(content, reader, &name(part));
            let qkv = Fused::new(vec![
                linear("attn_q")?,
                linear("attn_k")?,
                linear("attn_v")?,
            ]);
            let attn_out = linear("attn_output")?.pack();
            let gate_up = Fused::new(vec![linear("ffn_gate")?, linear("ffn_up")?]);
            let down = linear("ffn_down")?.pack();
            blocks.push(Layer {
                attn_norm: vector(reader, &name("attn_norm"))?,
                qkv,
                attn_out,
                ffn_norm: vector(reader, &name("ffn_norm"))?,
                gate_up,
                down,
            });
        }
        let norm = vector(reader, "output_norm.weight")?;

        let pairs = rope_dim / 2;
        let mut rope = Vec::with_capacity(context_len * pairs);
        for pos in 0..context_len {
            for i in 0..pairs {
                let freq = rope_base.powf(-((2 * i) as f32) / rope_dim as f32);
                let angle = pos as f32 * freq;
                rope.push((angle.cos(), angle.sin()));
            }
        }
        Ok(Self {
            hyper: Hyper {
                vocab,
                hidden,
                heads,
                kv_heads,
                head_dim,
                rope_dim,
                rope_neox: NEOX_ARCHITECTURES.contains(&arch.as_str()),
                eps,
                context_len,
            },
            embeddings,
            layers: blocks,
            norm,
            head,
            rope,
        })
    }

    /// Values per position per layer in a cache, for the keys and for the values.
    pub fn kv_dim(&self) -> usize {
        self.hyper.kv_heads * self.hyper.head_dim
    }

    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs every slot through the network, appending their keys and values to their caches,
    /// and returns the logits of the slots that asked for them, in slot order.
    ///
    /// Slots of one cache must be in position order and continue it (the first at the
    /// cache's current length).
    pub fn forward(
        &self,
        slots: &[Slot],
        caches: &mut [&mut KvCache],
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let h = &self.hyper;
        let n = slots.len();
        let (dim, kv_dim) = (h.heads * h.head_dim, h.kv_heads * h.head_dim);
        for s in slots {
            if s.position >= h.context_len {
                anyhow::bail!("position {} is past the context window", s.position);
            }
            if s.token as usize >= h.vocab {
                anyhow::bail!("token {} is not in the vocabulary", s.token);
            }
        }

        let mut x = vec![0f32; n * h.hidden];
        for (s, row) in slots.iter().zip(x.chunks_exact_mut(h.hidden)) {
            self.embeddings.row(s.token as usize, &self.head, row);
        }
        let mut normed = vec![0f32; n * h.hidden];
        let mut qkv = Vec::new();
        let mut attn = vec![0f32; n * dim];
        let mut proj = Vec::new();
        let mut ffn = Vec::new();
        let mut act = Vec::new();

        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, h.eps, &mut normed);
            layer.qkv.forward(&normed, &mut qkv)?;
            let width = dim + 2 * kv_dim;
            // One slot and its row at a time.
            by_rows((slots, 1), (&mut qkv, width), |(s, row)| {
                let (q, kv) = row.split_at_mut(dim);
                self.rotate(q, s[0].position);
                self.rotate(&mut kv[..kv_dim], s[0].position);
            });
            for (s, row) in slots.iter().zip(qkv.chunks_exact(width)) {
                let cache = &mut caches[s.cache];
                if cache.keys[l].len() != s.position * kv_dim {
                    anyhow::bail!(
                        "cache holds {} positions; slot is at {}",
                        cache.keys[l].len() / kv_dim,
                        s.position
                    );
                }
                extend_f16(&mut cache.keys[l], &row[dim..dim + kv_dim]);
                extend_f16(&mut cache.values[l], &row[dim + kv_dim..]);
            }
            self.attention(l, slots, caches, &qkv, &mut attn);
            layer.attn_out.forward(&attn, &mut proj)?;
            add_into(&mut x, &proj);

            rms_norm(&x, &layer.ffn_norm, h.eps, &mut normed);
            layer.gate_up.forward(&normed, &mut ffn)?;
            let inter = layer.gate_up.rows / 2;
            act.resize(n * inter, 0.0);
            let silu = |(row, out): (&[f32], &mut [f32])| {
                let (gate, up) = row.split_at(inter);
                for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            };
            by_rows((&ffn, 2 * inter), (&mut act, inter), silu);
            layer.down.forward(&act, &mut proj)?;
            add_into(&mut x, &proj);
        }

        let wanted: Vec<usize> = (0..n).filter(|&i| slots[i].logits).collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let mut last = Vec::with_capacity(wanted.len() * h.hidden);
        for &i in &wanted {
            last.extend_from_slice(&x[i * h.hidden..(i + 1) * h.hidden]);
        }
        let mut last_normed = vec![0f32; last.len()];
        rms_norm(&last, &self.norm, h.eps, &mut last_normed);
        let mut logits = Vec::new();
        self.head.forward(&last_normed, &mut logits)?;
        Ok(logits.chunks_exact(h.vocab).map(<[f32]>::to_vec).collect())
    }

    /// Rotary position embedding of every head in `v` (heads of `head_dim` values).
    fn rotate(&self, v: &mut [f32], position: usize) {
        let h = &self.hyper;
        let pairs = h.rope_dim / 2;
        let table = &self.rope[position * pairs..(position + 1) * pairs];
        for head in v.chunks_exact_mut(h.head_dim) {
            for (i, (cos, sin)) in table.iter().enumerate() {
                let (a, b) = if h.rope_neox {
                    (i, i + pairs)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }

    /// Causal attention of each slot over its own cache, up to and including its position.
    /// The query heads that share a key/value head run in one task, one after another: the
    /// first brings that head's cached keys and values in from memory, the others find them
    /// in the core's cache. A cache that several slots read in this step (a prompt's chunk)
    /// is widened to f32 once for all of them, instead of once per slot and head.
    fn attention(
        &self,
        layer: usize,
        slots: &[Slot],
        caches: &[&mut KvCache],
        qkv: &[f32],
        out: &mut [f32],
    ) {
        let h = &self.hyper;
        let (dim, kv_dim, hd) = (h.heads * h.head_dim, h.kv_heads * h.head_dim, h.head_dim);
        let width = dim + 2 * kv_dim;
        let group = h.heads / h.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let work: usize = slots.iter().map(|s| s.position + 1).sum::<usize>() * h.heads;

        let mut readers = vec![(0usize, 0usize); caches.len()];
        for s in slots {
            let (count, len) = &mut readers[s.cache];
            *count += 1;
            *len = (*len).max(s.position + 1);
        }
        let widened: Vec<Option<(TurnedKeys, Vec<f32>)>> = readers
            .iter()
            .zip(caches)
            .map(|(&(count, len), cache)| {
                (count > 1).then(|| {
                    let keys = TurnedKeys::new(&cache.keys[layer], h.kv_heads, hd, len);
                    let mut values = Vec::new();
                    extend_f32(&mut values, &cache.values[layer][..len * kv_dim]);
                    (keys, values)
                })
            })
            .collect();

        // One task per (slot, key/value head): `group` query heads, contiguous in `out`.
        let run = |(i, group_out): (usize, &mut [f32])| {
            let (slot, kv_head) = (i / h.kv_heads, i % h.kv_heads);
            let s = slots[slot];
            let len = s.position + 1;
            // Queries at f16 precision, like the cache (llama.cpp multiplies them in f16).
            let q_at = slot * width + kv_head * group * hd;
            let mut queries = qkv[q_at..q_at + group * hd].to_vec();
            round_to_f16(&mut queries);
            let kv_off = kv_head * hd;
            let keys = &caches[s.cache].keys[layer][kv_off..];
            match &widened[s.cache] {
                Some((turned, values)) => {
                    let dots = |q: &[f32], out: &mut [f32]| {
                        turned.dots(kv_head, q, keys, kv_dim, scale, out);
                    };
                    head_group(
                        &queries,
                        hd,
                        dots,
                        &values[kv_off..],
                        len,
                        kv_dim,
                        group_out,
                    );
                }
                None => {
                    let dots = |q: &[f32], out: &mut [f32]| {
                        cached_dots(q, keys, kv_dim, scale, out);
                    };
                    let values = &caches[s.cache].values[layer][kv_off..];
                    head_group(&queries, hd, dots, values, len, kv_dim, group_out);
                }
            }
        };
        // Small steps (one token per decoding sequence, short contexts) are cheaper on this
        // thread than handed to the pool.
        if work < 4096 {
            out.chunks_exact_mut(group * hd).enumerate().for_each(run);
        } else {
            out.par_chunks_mut(group * hd).enumerate().for_each(run);
        }
    }
}

/// Attention of the query heads in `queries` (`hd` values each, one after another) over the
/// first `len` positions of one key/value head: `dots(q, scores)` scores a query against
/// each position, `values` holds that head's rows `stride` apart.
fn head_group<T: Cached>(
    queries: &[f32],
    hd: usize,
    dots: impl Fn(&[f32], &mut [f32]),
    values: &[T],
    len: usize,
    stride: usize,
    out: &mut [f32],
) {
    let group = queries.len() / hd;
    // scores[j · len + p]: query head j against position p.
    let mut scores = vec![0f32; group * len];
    for (q, row) in queries.chunks_exact(hd).zip(scores.chunks_exact_mut(len)) {
        dots(q, row);
        softmax(row, f32::exp);
        // Probabilities at f16 precision, as llama.cpp feeds them to its V product.
        round_to_f16(row);
    }
    for (weights, o) in scores.chunks_exact(len).zip(out.chunks_exact_mut(hd)) {
        cached_weighted_sum(weights, values, stride, o);
    }
}

fn rms_norm(xs: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let norm = |(x, o): (&[f32], &mut [f32])| {
        let mean = dot(x, x) / x.len() as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(x).zip(weight) {
            *o = v * inv * w;
        }
    };
    let width = weight.len();
    by_rows((xs, width), (out, width), norm);
}

/// Slots past which a step's per-token work (norms, rotations, activations) is shared out
/// to the thread pool, so a prompt's chunk does not leave the other threads idle.
const PARALLEL_ROWS: usize = 16;

/// `f` on each pair of rows of `a` and `b` (rows `aw` and `bw` long), on the pool's threads
/// from `PARALLEL_ROWS` rows on.
fn by_rows<T: Sync, U: Send>(
    (a, aw): (&[T], usize),
    (b, bw): (&mut [U], usize),
    f: impl Fn((&[T], &mut [U])) + Sync + Send,
) {
    if a.len() >= PARALLEL_ROWS * aw {
        a.par_chunks_exact(aw)
            .zip(b.par_chunks_exact_mut(bw))
            .for_each(f);
    } else {
        a.chunks_exact(aw).zip(b.chunks_exact_mut(bw)).for_each(f);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

    use super::*;

    fn model() -> Llama {
        let dir = std::env::var_os("MODELS_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
            });
        let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut file = std::fs::File::open(&path).expect("model missing: run `make models`");
        let content = gguf_file::Content::read(&mut file).unwrap();
        Llama::load(&content, &mut file).unwrap()
    }

    fn prompt_slots(prompt: &[u32], cache: usize) -> Vec<Slot> {
        prompt
            .iter()
            .enumerate()
            .map(|(position, &token)| Slot {
                token,
                position,
                cache,
                logits: position + 1 == prompt.len(),
            })
            .collect()
    }

    /// What continuous batching relies on: a sequence's logits do not depend on which
    /// other sequences share its steps, nor on how its prompt was split into chunks —
    /// bit for bit, so a seeded request gives the same answer under any load.
    /// (Agreement with llama.cpp itself is the `reference` integration test.)
    #[test]
    fn batched_and_chunked_passes_equal_a_sequence_alone() {
        let llama = model();
        // Long enough for whole blocks of eight positions and for the steps' shared-out
        // per-token work; a prompt's chunk reads its cache widened, a lone token reads f16.
        let mut prompt: Vec<u32> = vec![1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198];
        prompt.extend((0..29).map(|i| 300 + 97 * i));
        let other: Vec<u32> = vec![1, 4093, 198, 19556, 30, 2, 198, 1, 520, 9531, 198];

        let mut alone = KvCache::new(llama.layers());
        let first = llama
            .forward(&prompt_slots(&prompt, 0), &mut [&mut alone])
            .unwrap();

        // The same prompt in two chunks, the second sharing its step with another prompt.
        let mut chunked = KvCache::new(llama.layers());
        let mut neighbour = KvCache::new(llama.layers());
        let slots = prompt_slots(&prompt, 0);
        assert!(llama
            .forward(&slots[..4], &mut [&mut chunked])
            .unwrap()
            .is_empty());
        let mut step = slots[4..].to_vec();
        step.extend(prompt_slots(&other, 1));
        let both = llama
            .forward(&step, &mut [&mut chunked, &mut neighbour])
            .unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(first[0], both[0], "chunked prompt differs");

        // All but the last token as one chunk, then the last alone.
        let mut split = KvCache::new(llama.layers());
        let slots = prompt_slots(&prompt, 0);
        let (head, last) = slots.split_at(prompt.len() - 1);
        llama.forward(head, &mut [&mut split]).unwrap();
        let lone = llama.forward(last, &mut [&mut split]).unwrap();
        assert_eq!(first[0], lone[0], "a prompt's last token alone differs");

        // Decode steps: alone, and batched with the neighbour at another position.
        for (i, token) in [28u32, 314, 2188].into_iter().enumerate() {
            let position = prompt.len() + i;
            let mine = Slot {
                token,
                position,
                cache: 0,
                logits: true,
            };
            let theirs = Slot {
                token: 30,
                position: other.len() + i,
                cache: 1,
                logits: true,
            };
            let single = llama.forward(&[mine], &mut [&mut alone]).unwrap();
            let batched = llama
                .forward(&[theirs, mine], &mut [&mut chunked, &mut neighbour])
                .unwrap();
            assert_eq!(single[0], batched[1], "step {i}: batched logits differ");
        }
    }

    #[test]
    fn refuses_a_slot_that_does_not_continue_its_cache() {
        let llama = model();
        let mut cache = KvCache::new(llama.layers());
        let gap = Slot {
            token: 1,
            position: 3,
            cache: 0,
            logits: true,
        };
        assert!(llama.forward(&[gap], &mut [&mut cache]).is_err());
        let unknown = Slot {
            token: u32::MAX,
            position: 0,
            cache: 0,
            logits: true,
        };
        assert!(llama.forward(&[unknown], &mut [&mut cache]).is_err());
    }
}
