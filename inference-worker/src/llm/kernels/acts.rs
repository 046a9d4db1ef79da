//! Activations quantized for the kernels: 8-bit blocks of 32, each with its scale and the
//! scaled sum of its values, computed as llama.cpp computes them.
//!
//! Owns: `Q8Acts`, the batch of quantized vectors one multiply reads. Must never: hold
//! weights or depend on which block format will read the activations.

use super::attention::round_f16;
use super::layout::ActBlock;
use super::BLOCK;

/// Vectors quantized for the kernels, concatenated (`n` vectors of `cols / 32` blocks).
#[derive(Default)]
pub struct Q8Acts {
    blocks_per_vec: usize,
    blocks: Vec<ActBlock>,
}

impl Q8Acts {
    /// Quantizes `n` vectors of `cols` values each (`xs.len() == n · cols`) as llama.cpp
    /// does: scale `max |x| / 127` kept at f16 precision, values rounded half to even.
    pub fn quantize(xs: &[f32], cols: usize) -> Self {
        let blocks = xs
            .chunks_exact(BLOCK)
            .map(|block| {
                let amax = block.iter().fold(0f32, |a, x| a.max(x.abs()));
                let d = amax / 127.0;
                let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                let mut q = [0i8; 32];
                let mut sum = 0i32;
                for (dst, x) in q.iter_mut().zip(block) {
                    let v = (x * inv).round_ties_even() as i8;
                    *dst = v;
                    sum += i32::from(v);
                }
                ActBlock {
                    d: round_f16(d),
                    s: round_f16(d * sum as f32),
                    q,
                    u: q.map(|v| (v as u8) ^ 0x80),
                }
            })
            .collect();
        Self {
            blocks_per_vec: cols / BLOCK,
            blocks,
        }
    }

    pub fn len(&self) -> usize {
        self.blocks
            .len()
            .checked_div(self.blocks_per_vec)
            .unwrap_or(0)
    }

    pub(super) fn vector(&self, v: usize) -> &[ActBlock] {
        &self.blocks[v * self.blocks_per_vec..(v + 1) * self.blocks_per_vec]
    }
}
