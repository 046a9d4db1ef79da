//! Quantized matrix × vector kernels for the chat engine, in the block formats of GGUF.
//!
//! Weights stay in 4-, 5- or 8-bit blocks of 32 (GGUF's K-quant super-blocks of 256 are
//! unpacked into their eight 32-value sub-blocks at load, exactly); activations are quantized to 8-bit blocks of
//! 32 (each with its scale and, for the 4-bit kind, the scaled sum of its values) and the
//! dot products are integer sums scaled once per block, as llama.cpp does. One call
//! multiplies a matrix by a whole batch of vectors: each weight row is read from memory once
//! and used for every vector, which is what makes batched decoding cheaper than decoding
//! sequences one by one.
//!
//! Owns: the block layouts after loading, activation quantization, the dot products and the
//! row-parallel matrix multiply, and attention's products over the f16 KV cache. Must never:
//! allocate per block or know about models.
//!
//! The pieces: `layout` (blocks and tiles in memory), `matrix` (the generic matrix, its
//! tiling and the parallel multiply), `q4`, `q5`, `q8` and `s8` (a block kind each, read
//! from the GGUF formats that fit it), `kquant` (the K-quant super-blocks), `acts`
//! (quantized activations), `attention` (f16 rounding and the products over the cache).
//! The instruction-level loops are in `avx2` (x86-64 with AVX2/FMA, compiled in when the
//! target has them, as the workspace's default `target-cpu` does) and `portable` (every
//! other target); a test here checks that both agree. `vnni` has AVX-512 VNNI twins of the
//! tile kernels, chosen at run time where the CPU reports the instructions.

/// Calls `avx2::f` where the build has AVX2/FMA and `portable::f` elsewhere. For the block
/// modules directly under this one (the paths are resolved where the macro is called).
macro_rules! dispatch {
    ($f:ident::<$n:ident>($($arg:expr),*)) => {{
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        super::avx2::$f::<$n>($($arg),*);
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        super::portable::$f::<$n>($($arg),*);
    }};
}

/// As `dispatch!`, first trying the AVX-512 VNNI twin where the CPU has it (`vnni`).
macro_rules! dispatch_tiles {
    ($f:ident::<$n:ident>($($arg:expr),*)) => {{
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        if !super::vnni::$f::<$n>($($arg),*) {
            super::avx2::$f::<$n>($($arg),*);
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        super::portable::$f::<$n>($($arg),*);
    }};
}

mod acts;
mod attention;
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2;
mod floats;
#[cfg(test)]
mod format_tests;
mod kquant;
mod layout;
mod matrix;
mod portable;
mod q4;
mod q5;
mod q8;
mod s8;
#[cfg(test)]
mod testdata;
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod vnni;

pub use acts::Q8Acts;
pub use attention::{
    cached_dots, cached_weighted_sum, extend_f16, extend_f32, round_to_f16, Cached, TurnedKeys,
};
pub use floats::{HalfKind, HalfMatrix};
pub use q4::Q4Matrix;
pub use q5::Q5Matrix;
pub use q8::Q8Matrix;
pub use s8::S8Matrix;

use layout::ActBlock;

static VNNI_ALLOWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the tile kernels may use AVX-512 VNNI where the CPU has it (they may, unless
/// the worker's `--cpu-kernels` caps them at AVX2).
pub fn allow_vnni(allow: bool) {
    VNNI_ALLOWED.store(allow, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn vnni_allowed() -> bool {
    VNNI_ALLOWED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// Rows per tile.
const TILE_ROWS: usize = 8;

/// A block type the kernels understand: how 8 rows of it form a tile, how to read one row
/// back, and its row and tile dot products.
pub trait BlockKind: Copy + Send + Sync + 'static {
    type Tile: Copy + Send + Sync;

    fn tile(rows: [&Self; TILE_ROWS]) -> Self::Tile;
    fn lane(tile: &Self::Tile, lane: usize) -> Self;
    fn dequantize(&self, out: &mut [f32]);

    /// `out[k] = row · xs[k]` for `N` vectors (each as long as the row).
    fn row_dots<const N: usize>(row: &[Self], xs: [&[ActBlock]; N], out: &mut [f32]);

    /// `sums[k][r]` = row `r` of the tiles' row group · vector `k`.
    fn tile_dots<const N: usize>(
        tiles: &[Self::Tile],
        xs: [&[ActBlock]; N],
        sums: &mut [[f32; TILE_ROWS]; 4],
    );
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::layout::{Q4Block, Q8Block};
    use super::testdata::{q4_1_bytes, vectors};
    use super::*;

    #[test]
    fn simd_and_portable_kernels_agree() {
        let (rows, cols) = (5, 96);
        let w4 = Q4Matrix::from_q4_1(&q4_1_bytes(rows, cols, 3), rows, cols).unwrap();
        let mut raw8 = Vec::new();
        for i in 0..rows * cols / BLOCK {
            raw8.extend_from_slice(&f16::from_f32(0.02 + i as f32 / 100.0).to_le_bytes());
            raw8.extend((0..32).map(|k| ((k * 37 + i * 11) % 256) as u8));
        }
        let w8 = Q8Matrix::from_q8_0(&raw8, rows, cols).unwrap();
        let acts = Q8Acts::quantize(&vectors(3, cols), cols);
        let bpr = cols / BLOCK;
        let xs = [acts.vector(0), acts.vector(1), acts.vector(2)];
        for r in 0..rows {
            let (mut a, mut b) = ([0f32; 3], [0f32; 3]);
            let row = &w4.blocks[r * bpr..(r + 1) * bpr];
            portable::q4_dots::<3>(row, xs, &mut a);
            Q4Block::row_dots::<3>(row, xs, &mut b);
            for k in 0..3 {
                assert!(
                    (a[k] - b[k]).abs() <= 1e-3 * a[k].abs().max(1.0),
                    "{a:?} {b:?}"
                );
            }
            let row = &w8.blocks[r * bpr..(r + 1) * bpr];
            portable::q8_dots::<3>(row, xs, &mut a);
            Q8Block::row_dots::<3>(row, xs, &mut b);
            for k in 0..3 {
                assert!(
                    (a[k] - b[k]).abs() <= 1e-3 * a[k].abs().max(1.0),
                    "{a:?} {b:?}"
                );
            }
        }
    }
}
