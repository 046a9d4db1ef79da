//! The chat model's weight matrices in the form that runs them: GGUF's 4-, 5-, 6- and 8-bit
//! block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q3_K–Q6_K) in the native
//! kernels, any other GGUF type through candle's quantized matmul. Projections
//! that read the same input are stacked into one multiply, and the token embeddings are
//! read from their file form or, for a tied head, from the head's own rows.
//!
//! Owns: choosing each matrix's form, stacking and tiling, the multiply of a batch of
//! vectors, and embedding row lookup. Must never: know the network's layers or their order,
//! or keep activations between calls.

use std::io::{Read, Seek};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::kernels::{HalfKind, HalfMatrix, Q4Matrix, Q5Matrix, Q8Acts, Q8Matrix, S8Matrix, BLOCK};

/// A weight matrix (`rows` outputs × `cols` inputs) in whichever form runs it fastest.
pub(super) enum Linear {
    Q4(Q4Matrix),
    Q5(Q5Matrix),
    Q8(Q8Matrix),
    S8(S8Matrix),
    /// F16 and BF16, multiplied by unquantized vectors.
    Half(HalfMatrix),
    /// Types without a native kernel (Q2_K, the i-quants, f16, f32, …), through candle.
    Other {
        rows: usize,
        cols: usize,
        matmul: QMatMul,
    },
}

/// `$body` with `$m` bound to the native matrix of `$linear`, or `$other` for the rest.
macro_rules! native {
    ($linear:expr, $m:ident => $body:expr, $other:pat => $else:expr) => {
        match $linear {
            Linear::Q4($m) => $body,
            Linear::Q5($m) => $body,
            Linear::Q8($m) => $body,
            Linear::S8($m) => $body,
            Linear::Half($m) => $body,
            $other => $else,
        }
    };
}

impl Linear {
    pub(super) fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        name: &str,
    ) -> anyhow::Result<Self> {
        let tensor = content
            .tensor(reader, name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("loading {name}: {e}"))?;
        Self::from_qtensor(tensor).map_err(|e| anyhow::anyhow!("{name}: {e}"))
    }

    pub(super) fn from_qtensor(tensor: QTensor) -> anyhow::Result<Self> {
        let (rows, cols) = tensor.shape().dims2()?;
        let half = |kind| -> anyhow::Result<Self> {
            Ok(Self::Half(HalfMatrix::new(
                &tensor.data()?,
                rows,
                cols,
                kind,
            )?))
        };
        match tensor.dtype() {
            GgmlDType::F16 if cols.is_multiple_of(8) => return half(HalfKind::F16),
            GgmlDType::BF16 if cols.is_multiple_of(8) => return half(HalfKind::Bf16),
            _ => {}
        }
        if !cols.is_multiple_of(BLOCK) {
            return Ok(Self::other(tensor, rows, cols)?);
        }
        Ok(match tensor.dtype() {
            GgmlDType::Q4_0 => Self::Q4(Q4Matrix::from_q4_0(&tensor.data()?, rows, cols)?),
            GgmlDType::Q4_1 => Self::Q4(Q4Matrix::from_q4_1(&tensor.data()?, rows, cols)?),
            GgmlDType::Q4K => Self::Q4(Q4Matrix::from_q4_k(&tensor.data()?, rows, cols)?),
            GgmlDType::Q5_0 => Self::Q5(Q5Matrix::from_q5_0(&tensor.data()?, rows, cols)?),
            GgmlDType::Q5_1 => Self::Q5(Q5Matrix::from_q5_1(&tensor.data()?, rows, cols)?),
            GgmlDType::Q5K => Self::Q5(Q5Matrix::from_q5_k(&tensor.data()?, rows, cols)?),
            GgmlDType::Q8_0 => Self::Q8(Q8Matrix::from_q8_0(&tensor.data()?, rows, cols)?),
            GgmlDType::Q6K => Self::S8(S8Matrix::from_q6_k(&tensor.data()?, rows, cols)?),
            GgmlDType::Q3K => Self::S8(S8Matrix::from_q3_k(&tensor.data()?, rows, cols)?),
            _ => Self::other(tensor, rows, cols)?,
        })
    }

    fn other(tensor: QTensor, rows: usize, cols: usize) -> candle_core::Result<Self> {
        Ok(Self::Other {
            rows,
            cols,
            matmul: QMatMul::from_qtensor(tensor)?,
        })
    }

    fn rows(&self) -> usize {
        native!(self, m => m.rows, Self::Other { rows, .. } => *rows)
    }

    fn cols(&self) -> usize {
        native!(self, m => m.cols, Self::Other { cols, .. } => *cols)
    }

    /// Puts native matrices into the tiled layout of the batched kernels.
    pub(super) fn pack(mut self) -> Self {
        native!(&mut self, m => m.pack(), Self::Other { .. } => {});
        self
    }

    /// Row `r` as f32 values, for a native matrix (`false` for the others).
    fn dequantize_row(&self, r: usize, out: &mut [f32]) -> bool {
        native!(self, m => { m.dequantize_row(r, out); true }, Self::Other { .. } => false)
    }

    /// Joins projections that read the same input into one matrix, when their kinds allow.
    fn stack(parts: Vec<Self>) -> Vec<Self> {
        let mut out: Vec<Self> = Vec::new();
        for part in parts {
            match (out.last_mut(), part) {
                (Some(Self::Q4(a)), Self::Q4(b)) => a.stack(&b),
                (Some(Self::Q5(a)), Self::Q5(b)) => a.stack(&b),
                (Some(Self::Q8(a)), Self::Q8(b)) => a.stack(&b),
                (Some(Self::S8(a)), Self::S8(b)) => a.stack(&b),
                (Some(Self::Half(a)), Self::Half(b)) => {
                    if !a.stack(&b) {
                        out.push(Self::Half(b));
                    }
                }
                (_, part) => out.push(part),
            }
        }
        out
    }

    /// `xs` holds `n` input vectors; `out` gets `n` output vectors.
    pub(super) fn forward(&self, xs: &[f32], out: &mut Vec<f32>) -> anyhow::Result<()> {
        let quantized = |cols| Q8Acts::quantize(xs, cols);
        match self {
            Self::Q4(m) => m.matmul(&quantized(m.cols), out),
            Self::Q5(m) => m.matmul(&quantized(m.cols), out),
            Self::Q8(m) => m.matmul(&quantized(m.cols), out),
            Self::S8(m) => m.matmul(&quantized(m.cols), out),
            Self::Half(m) => m.matmul(xs, out),
            Self::Other { cols, matmul, .. } => {
                let n = xs.len() / cols;
                let x = Tensor::from_slice(xs, (n, *cols), &Device::Cpu)?;
                *out = matmul.forward(&x)?.flatten_all()?.to_vec1()?;
            }
        }
        Ok(())
    }
}

/// Several matrices over one input, concatenated per vector in the order given.
pub(super) struct Fused {
    parts: Vec<Linear>,
    pub(super) rows: usize,
}

impl Fused {
    pub(super) fn new(parts: Vec<Linear>) -> Self {
        let rows = parts.iter().map(Linear::rows).sum();
        Self {
            parts: Linear::stack(parts).into_iter().map(Linear::pack).collect(),
            rows,
        }
    }

    pub(super) fn forward(&self, xs: &[f32], out: &mut Vec<f32>) -> anyhow::Result<()> {
        if let [only] = self.parts.as_slice() {
            return only.forward(xs, out);
        }
        let n = xs.len() / self.parts[0].cols();
        out.clear();
        out.resize(n * self.rows, 0.0);
        let mut at = 0;
        let mut part_out = Vec::new();
        for part in &self.parts {
            part.forward(xs, &mut part_out)?;
            let rows = part.rows();
            for v in 0..n {
                out[v * self.rows + at..v * self.rows + at + rows]
                    .copy_from_slice(&part_out[v * rows..(v + 1) * rows]);
            }
            at += rows;
        }
        Ok(())
    }
}

/// Token embeddings, kept in their file form when a native kernel can read rows from it.
pub(super) enum Embeddings {
    /// The rows of the output head (a tied head), read from there.
    Head,
    Native(Linear),
    F32 {
        cols: usize,
        values: Vec<f32>,
    },
}

impl Embeddings {
    /// The token embeddings (`embd`, read from `token_embd.weight`) and the output head.
    pub(super) fn with_head<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        embd: QTensor,
        hidden: usize,
    ) -> anyhow::Result<(Self, Linear)> {
        let tied_head = !content.tensor_infos.contains_key("output.weight");
        let embeddings = match Linear::from_qtensor(embd)? {
            Linear::Other { matmul, .. } => Embeddings::F32 {
                cols: hidden,
                values: match matmul {
                    QMatMul::QTensor(t) => t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1()?,
                },
            },
            native => Embeddings::Native(native),
        };
        // A tied head serves the embedding lookups too (one copy of the matrix).
        let (embeddings, head) = match (tied_head, embeddings) {
            (true, Embeddings::Native(m)) => (Embeddings::Head, m.pack()),
            (true, f32s @ Embeddings::F32 { .. }) => (
                f32s,
                Linear::load(content, reader, "token_embd.weight")?.pack(),
            ),
            (_, embeddings) => (
                embeddings,
                Linear::load(content, reader, "output.weight")?.pack(),
            ),
        };
        Ok((embeddings, head))
    }

    pub(super) fn row(&self, token: usize, head: &Linear, out: &mut [f32]) {
        match self {
            Self::Head => {
                if !head.dequantize_row(token, out) {
                    out.fill(0.0);
                }
            }
            Self::Native(m) => {
                m.dequantize_row(token, out);
            }
            Self::F32 { cols, values } => {
                out.copy_from_slice(&values[token * cols..(token + 1) * cols]);
            }
        }
    }
}
