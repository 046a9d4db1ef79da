//! The 8-bit format with a scale per 16 values: the 32-value blocks of GGUF Q6_K and Q3_K
//! (whose 6- and 3-bit values fit a signed byte exactly). Reading its blocks from GGUF
//! bytes, tiling and dequantizing them, and which kernels multiply them.
//!
//! Owns: `S8Matrix` and the `BlockKind` implementation of `S8Block`. Must never: hold SIMD
//! code (that is in `avx2` and `portable`) or parallelise (that is `matrix`'s).

use super::layout::{deinterleave, interleave, ActBlock, S8Block, S8Tile};
use super::matrix::Matrix;
use super::{kquant, BlockKind, TILE_ROWS};

/// Signed 8-bit blocks with two scales (GGUF Q6_K, Q3_K).
pub type S8Matrix = Matrix<S8Block>;

impl S8Matrix {
    /// From GGUF Q6_K super-blocks.
    pub fn from_q6_k(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse_super(raw, rows, cols, kquant::Q6_K_BYTES, kquant::q6_k)
    }

    /// From GGUF Q3_K super-blocks.
    pub fn from_q3_k(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse_super(raw, rows, cols, kquant::Q3_K_BYTES, kquant::q3_k)
    }
}

impl BlockKind for S8Block {
    type Tile = S8Tile;

    fn tile(rows: [&Self; TILE_ROWS]) -> S8Tile {
        S8Tile {
            d: [rows.map(|x| x.d[0]), rows.map(|x| x.d[1])],
            q: interleave(rows.map(|x| &x.q[..])),
        }
    }

    fn lane(tile: &S8Tile, lane: usize) -> Self {
        S8Block {
            d: [tile.d[0][lane], tile.d[1][lane]],
            q: deinterleave(&tile.q, lane),
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        for (i, (v, q)) in out.iter_mut().zip(&self.q).enumerate() {
            *v = self.d[i / 16] * f32::from(*q);
        }
    }

    fn row_dots<const N: usize>(row: &[Self], xs: [&[ActBlock]; N], out: &mut [f32]) {
        dispatch!(s8_dots::<N>(row, xs, out));
    }

    fn tile_dots<const N: usize>(
        tiles: &[S8Tile],
        xs: [&[ActBlock]; N],
        sums: &mut [[f32; TILE_ROWS]; 4],
    ) {
        dispatch_tiles!(s8_tile_dots::<N>(tiles, xs, sums));
    }
}
