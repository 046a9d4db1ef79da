//! Activations quantized for the kernels: 8-bit blocks of 32, each with its scale and the
//! scaled sum of its values, computed as llama.cpp computes them.
//!
//! Owns: `Q8Acts`, the batch of quantized vectors one multiply reads. Must never: hold
//! weights or depend on which block format will read the activations.

use rayon::prelude::*;

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
        // A prompt's chunk is quantized by the pool's threads: alone it would leave them idle.
        let blocks = if xs.len() >= PARALLEL_VALUES {
            xs.par_chunks_exact(BLOCK).map(quantize_block).collect()
        } else {
            xs.chunks_exact(BLOCK).map(quantize_block).collect()
        };
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

/// Values past which quantizing is shared out to the thread pool (16 vectors of a small
/// model's width).
const PARALLEL_VALUES: usize = 16 * 576;

/// One block of 32 values, scaled as llama.cpp scales it: `max |x| / 127` kept at f16
/// precision, values rounded half to even.
fn quantize_block(block: &[f32]) -> ActBlock {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    let (amax, q, sum) = super::avx2::quantize_block(block);
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    let (amax, q, sum) = quantize_values(block);
    let d = amax / 127.0;
    ActBlock {
        d: round_f16(d),
        s: round_f16(d * sum as f32),
        q,
        u: q.map(|v| (v as u8) ^ 0x80),
    }
}

/// `max |x|`, the values `x · (127 / max)` rounded half to even, and their sum. (With AVX2
/// compiled in, the tests' reference.)
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn quantize_values(block: &[f32]) -> (f32, [i8; 32], i32) {
    let amax = block.iter().fold(0f32, |a, x| a.max(x.abs()));
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut q = [0i8; 32];
    let mut sum = 0i32;
    for (dst, x) in q.iter_mut().zip(block) {
        let v = (x * inv).round_ties_even() as i8;
        *dst = v;
        sum += i32::from(v);
    }
    (amax, q, sum)
}

#[cfg(test)]
mod tests {
    use super::super::testdata::vectors;
    use super::*;

    /// The SIMD quantizer gives the portable one's bytes, scale and sum exactly, on ties,
    /// zeros, signs and magnitudes far apart.
    #[test]
    fn simd_and_plain_quantizing_agree() {
        let mut xs = vectors(40, 32);
        xs.extend((0..32).map(|i| (i as f32 - 16.0) * 0.5)); // halves: ties at 127 / 15.5
        xs.extend([0.0; 32]);
        xs.extend((0..32).map(|i| if i == 7 { -3.0e4 } else { 1.0e-3 * i as f32 }));
        for block in xs.chunks_exact(32) {
            let plain = quantize_values(block);
            let block_out = quantize_block(block);
            assert_eq!(
                (block_out.q, block_out.d),
                (plain.1, round_f16(plain.0 / 127.0))
            );
            assert_eq!(block_out.s, round_f16(plain.0 / 127.0 * plain.2 as f32));
        }
    }
}
