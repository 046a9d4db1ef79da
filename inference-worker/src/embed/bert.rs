//! A BERT-family encoder for sentence embeddings, run without padding: the tokens of every
//! text in a batch are packed into one matrix for the dense layers (so a batch of short and
//! long texts costs what its real tokens cost), and attention runs per text over its own
//! length, so no mask is needed. Mean pooling and L2 normalisation as sentence-transformers.
//!
//! Owns: weight loading from `config.json` + `model.safetensors`, the encoder's forward pass
//! and pooling. Must never: tokenize, batch requests or know who is asking. The dense
//! layers are `dense.rs`'s packed kernels writing into reused buffers, with bias, residual
//! or activation applied as each tile is stored; layer norm and softmax are plain loops
//! written so the compiler vectorizes them.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::dense::{Dense, Epilogue, Kernel};
use crate::math::{add_into, dot, softmax};
use serde::Deserialize;

/// The parts of a Hugging Face BERT `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".into()
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    /// `x · Φ(x)` with the exact normal CDF, as `gelu` in transformers.
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

struct Layer {
    /// Query, key and value projections side by side.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    intermediate: Dense,
    output: Dense,
    out_norm: Norm,
}

pub struct Bert {
    config: BertConfig,
    activation: Activation,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    kernel: Kernel,
}

fn values(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

impl Bert {
    pub fn load(config: BertConfig, weights: Vec<u8>, kernel: Kernel) -> anyhow::Result<Self> {
        if config.position_embedding_type != "absolute" {
            anyhow::bail!(
                "position_embedding_type {:?} is not supported",
                config.position_embedding_type
            );
        }
        let activation = match config.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => anyhow::bail!("hidden_act {other:?} is not supported"),
        };
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            anyhow::bail!("hidden_size is not a multiple of num_attention_heads");
        }
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)?;
        // Some checkpoints nest everything under `bert.`.
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let (h, inter) = (config.hidden_size, config.intermediate_size);
        let eps = config.layer_norm_eps as f32;
        let norm = |vb: VarBuilder| -> anyhow::Result<Norm> {
            Ok(Norm {
                weight: values(&vb.get(h, "weight")?)?,
                bias: values(&vb.get(h, "bias")?)?,
                eps,
            })
        };
        let dense = |vbs: &[VarBuilder], inputs: usize, outputs: usize| -> anyhow::Result<Dense> {
            let mut weight = Vec::new();
            let mut bias = Vec::new();
            for vb in vbs {
                weight.extend(values(&vb.get((outputs, inputs), "weight")?)?);
                bias.extend(values(&vb.get(outputs, "bias")?)?);
            }
            Ok(Dense::new(&weight, bias, inputs))
        };
        let emb = vb.pp("embeddings");
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let vb = vb.pp(format!("encoder.layer.{l}"));
            let attn = vb.pp("attention");
            let own = attn.pp("self");
            layers.push(Layer {
                qkv: dense(&[own.pp("query"), own.pp("key"), own.pp("value")], h, h)?,
                attn_out: dense(&[attn.pp("output.dense")], h, h)?,
                attn_norm: norm(attn.pp("output.LayerNorm"))?,
                intermediate: dense(&[vb.pp("intermediate.dense")], h, inter)?,
                output: dense(&[vb.pp("output.dense")], inter, h)?,
                out_norm: norm(vb.pp("output.LayerNorm"))?,
            });
        }
        Ok(Self {
            word: values(&emb.get((config.vocab_size, h), "word_embeddings.weight")?)?,
            position: values(&emb.get(
                (config.max_position_embeddings, h),
                "position_embeddings.weight",
            )?)?,
            token_type: values(
                &emb.get((config.type_vocab_size, h), "token_type_embeddings.weight")?,
            )?,
            embed_norm: norm(emb.pp("LayerNorm"))?,
            layers,
            activation,
            config,
            kernel,
        })
    }

    pub fn dimensions(&self) -> usize {
        self.config.hidden_size
    }

    /// Unit-length mean-pooled embeddings of each token sequence (no padding).
    pub fn embed(&self, texts: &[Vec<u32>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let h = self.config.hidden_size;
        let mut spans = Vec::with_capacity(texts.len());
        let mut total = 0;
        for ids in texts {
            if ids.is_empty() || ids.len() > self.config.max_position_embeddings {
                anyhow::bail!("a text of {} tokens cannot be embedded", ids.len());
            }
            spans.push(total..total + ids.len());
            total += ids.len();
        }
        let mut x = vec![0f32; total * h];
        for (ids, span) in texts.iter().zip(&spans) {
            for (pos, (&id, row)) in ids
                .iter()
                .zip(x[span.start * h..span.end * h].chunks_exact_mut(h))
                .enumerate()
            {
                let id = id as usize;
                if id >= self.config.vocab_size {
                    anyhow::bail!("token {id} is not in the vocabulary");
                }
                let word = &self.word[id * h..(id + 1) * h];
                let position = &self.position[pos * h..(pos + 1) * h];
                for (((o, w), p), t) in row.iter_mut().zip(word).zip(position).zip(&self.token_type)
                {
                    *o = w + p + t;
                }
            }
        }
        layer_norm(&mut x, &self.embed_norm);

        // Buffers reused by every layer (fresh large allocations cost page faults).
        let mut context = vec![0f32; total * h];
        let (mut qkv, mut next, mut hidden) = (Vec::new(), Vec::new(), Vec::new());
        for layer in &self.layers {
            let k = self.kernel;
            layer.qkv.forward(k, &x, Epilogue::Bias, &mut qkv);
            self.attention(&qkv, &spans, &mut context);
            let residual = Epilogue::Residual(&x);
            layer.attn_out.forward(k, &context, residual, &mut next);
            layer_norm(&mut next, &layer.attn_norm);
            std::mem::swap(&mut x, &mut next);

            let act = Epilogue::Activation(self.activation.over_slice());
            layer.intermediate.forward(k, &x, act, &mut hidden);
            let residual = Epilogue::Residual(&x);
            layer.output.forward(k, &hidden, residual, &mut next);
            layer_norm(&mut next, &layer.out_norm);
            std::mem::swap(&mut x, &mut next);
        }

        Ok(spans
            .iter()
            .map(|span| {
                let mut pooled = vec![0f32; h];
                for row in x[span.start * h..span.end * h].chunks_exact(h) {
                    add_into(&mut pooled, row);
                }
                let n = span.len() as f32;
                pooled.iter_mut().for_each(|v| *v /= n);
                let norm = dot(&pooled, &pooled).sqrt().max(1e-12);
                pooled.iter_mut().for_each(|v| *v /= norm);
                pooled
            })
            .collect())
    }

    /// Self-attention of each text over its own tokens, all heads; writes `context`.
    fn attention(&self, qkv: &[f32], spans: &[std::ops::Range<usize>], context: &mut [f32]) {
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        // One mutable slice of `context` per text, so texts run in parallel.
        let mut parts = Vec::with_capacity(spans.len());
        let mut rest = context;
        for span in spans {
            let (part, tail) = rest.split_at_mut(span.len() * h);
            parts.push((span.clone(), part));
            rest = tail;
        }
        parts.into_par_iter().for_each(|(span, out)| {
            let len = span.len();
            let row = |i: usize| &qkv[(span.start + i) * 3 * h..(span.start + i + 1) * 3 * h];
            let mut probs = vec![0f32; len];
            for head in 0..heads {
                let (q_at, k_at, v_at) = (head * d, h + head * d, 2 * h + head * d);
                for i in 0..len {
                    let q = &row(i)[q_at..q_at + d];
                    for (j, p) in probs.iter_mut().enumerate() {
                        *p = dot(q, &row(j)[k_at..k_at + d]) * scale;
                    }
                    softmax(&mut probs, exp);
                    let o = &mut out[i * h + head * d..i * h + (head + 1) * d];
                    o.fill(0.0);
                    for (j, p) in probs.iter().enumerate() {
                        for (o, v) in o.iter_mut().zip(&row(j)[v_at..v_at + d]) {
                            *o += p * v;
                        }
                    }
                }
            }
        });
    }
}

impl Activation {
    /// The activation over a run of values, as the dense layer's epilogue.
    fn over_slice(self) -> fn(&mut [f32]) {
        match self {
            Activation::Gelu => |xs| {
                xs.iter_mut().for_each(|x| {
                    *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
                })
            },
            Activation::GeluTanh => |xs| {
                xs.iter_mut().for_each(|x| {
                    let inner = 0.797_884_6 * (*x + 0.044_715 * *x * *x * *x);
                    *x = 0.5 * *x * (1.0 + tanh(inner));
                })
            },
            Activation::Relu => |xs| xs.iter_mut().for_each(|x| *x = x.max(0.0)),
        }
    }
}

/// `e^x` for f32 to about 2 ulp, in a form the compiler vectorizes (no library call):
/// `2^n · e^r` with `|r| ≤ ln2/2` and a degree-6 polynomial for `e^r`.
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    // ln 2 in two parts (Cephes): the first has few enough bits that `n · C1` is exact.
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let p = r.mul_add(1.0 / 720.0, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Abramowitz & Stegun 7.1.26: absolute error ≤ 1.5·10⁻⁷ exactly, ≤ 3·10⁻⁷ in f32.
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = t * 1.061_405_4f32
        .mul_add(t, -1.453_152)
        .mul_add(t, 1.421_413_8)
        .mul_add(t, -0.284_496_74)
        .mul_add(t, 0.254_829_6);
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

fn tanh(x: f32) -> f32 {
    let e = exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

fn layer_norm(x: &mut [f32], norm: &Norm) {
    let h = norm.weight.len();
    x.par_chunks_mut(h * 16).for_each(|chunk| {
        for row in chunk.chunks_exact_mut(h) {
            let mean = row.iter().sum::<f32>() / h as f32;
            row.iter_mut().for_each(|v| *v -= mean);
            let var = dot(row, row) / h as f32;
            let inv = 1.0 / (var + norm.eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
                *v = *v * inv * w + b;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_erf_and_tanh_match_the_library() {
        for i in -2000..2000 {
            let x = i as f32 / 50.0;
            let (ours, std) = (exp(x), x.exp());
            assert!(
                (ours - std).abs() <= 5e-7 * std,
                "exp({x}): {ours} vs {std}"
            );
            let want = libm_erf(x);
            assert!(
                (erf(x) - want).abs() <= 3e-7,
                "erf({x}): {} vs {want}",
                erf(x)
            );
            assert!((tanh(x) - x.tanh()).abs() <= 1e-6, "tanh({x})");
        }
    }

    /// erf from the standard library's f64 functions, as the reference.
    fn libm_erf(x: f32) -> f32 {
        // erf(x) = 2/√π ∫₀ˣ e^(−t²) dt, by Simpson's rule in f64.
        let n = 2_000;
        let h = f64::from(x) / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut sum = f(0.0) + f(f64::from(x));
        for k in 1..n {
            sum += f(k as f64 * h) * if k % 2 == 1 { 4.0 } else { 2.0 };
        }
        (sum * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()) as f32
    }
}
