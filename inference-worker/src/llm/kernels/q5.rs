//! The 5-bit format (GGUF Q5_1; Q5_0 read as Q5_1 with `m = -16 d`; the sub-blocks of
//! Q5_K): reading its blocks from GGUF bytes, tiling and dequantizing them, and which
//! kernels multiply them.
//!
//! Owns: `Q5Matrix` and the `BlockKind` implementation of `Q5Block`. Must never: hold SIMD
//! code (that is in `avx2` and `portable`) or parallelise (that is `matrix`'s).

use super::layout::{deinterleave, interleave, ActBlock, Q5Block, Q5Tile};
use super::matrix::{half_at, Matrix};
use super::{kquant, BlockKind, TILE_ROWS};

/// 5-bit blocks (GGUF Q5_0, Q5_1, Q5_K).
pub type Q5Matrix = Matrix<Q5Block>;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Q5Matrix {
    /// From GGUF Q5_0 blocks (`d: f16, qh: [u8; 4], qs: [u8; 16]`, 22 bytes; value =
    /// `d · (q − 16)`).
    pub fn from_q5_0(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse(raw, rows, cols, 22, |b| {
            let d = half_at(b, 0);
            Q5Block {
                d,
                m: -16.0 * d,
                qh: u32_at(b, 2),
                q: std::array::from_fn(|i| b[6 + i]),
            }
        })
    }

    /// From GGUF Q5_1 blocks (`d, m: f16, qh: [u8; 4], qs: [u8; 16]`, 24 bytes).
    pub fn from_q5_1(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse(raw, rows, cols, 24, |b| Q5Block {
            d: half_at(b, 0),
            m: half_at(b, 2),
            qh: u32_at(b, 4),
            q: std::array::from_fn(|i| b[8 + i]),
        })
    }

    /// From GGUF Q5_K super-blocks: each 32-value sub-block is a `Q5Block` exactly.
    pub fn from_q5_k(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse_super(raw, rows, cols, kquant::Q5_K_BYTES, kquant::q5_k)
    }
}

impl Q5Block {
    /// Value `i`'s 5-bit code.
    fn code(&self, i: usize) -> u8 {
        let nibble = if i < 16 {
            self.q[i] & 0x0F
        } else {
            self.q[i - 16] >> 4
        };
        nibble | (((self.qh >> i) & 1) as u8) << 4
    }
}

impl BlockKind for Q5Block {
    type Tile = Q5Tile;

    fn tile(rows: [&Self; TILE_ROWS]) -> Q5Tile {
        let mut h = [0u8; 32];
        for (r, row) in rows.iter().enumerate() {
            for i in 0..4 {
                for g in 0..4 {
                    let low = (row.qh >> (4 * g + i)) & 1;
                    let high = (row.qh >> (16 + 4 * g + i)) & 1;
                    h[4 * r + i] |= ((low << (2 * g)) | (high << (2 * g + 1))) as u8;
                }
            }
        }
        Q5Tile {
            d: rows.map(|x| x.d),
            m: rows.map(|x| x.m),
            h,
            q: interleave(rows.map(|x| &x.q[..])),
        }
    }

    fn lane(tile: &Q5Tile, lane: usize) -> Self {
        let mut qh = 0u32;
        for i in 0..4 {
            let bits = u32::from(tile.h[4 * lane + i]);
            for g in 0..4 {
                qh |= ((bits >> (2 * g)) & 1) << (4 * g + i);
                qh |= ((bits >> (2 * g + 1)) & 1) << (16 + 4 * g + i);
            }
        }
        Q5Block {
            d: tile.d[lane],
            m: tile.m[lane],
            qh,
            q: deinterleave(&tile.q, lane),
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        for (i, v) in out.iter_mut().enumerate().take(32) {
            *v = self.d * f32::from(self.code(i)) + self.m;
        }
    }

    fn row_dots<const N: usize>(row: &[Self], xs: [&[ActBlock]; N], out: &mut [f32]) {
        dispatch!(q5_dots::<N>(row, xs, out));
    }

    fn tile_dots<const N: usize>(
        tiles: &[Q5Tile],
        xs: [&[ActBlock]; N],
        sums: &mut [[f32; TILE_ROWS]; 4],
    ) {
        dispatch_tiles!(q5_tile_dots::<N>(tiles, xs, sums));
    }
}
