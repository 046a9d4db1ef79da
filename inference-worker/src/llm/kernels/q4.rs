//! The 4-bit format (GGUF Q4_1; Q4_0 read as Q4_1 with `m = -8 d`; the sub-blocks of Q4_K,
//! whose scale and min are the super-block's times the sub-block's): reading its blocks
//! from GGUF bytes, tiling and dequantizing them, and which kernels multiply them.
//!
//! Owns: `Q4Matrix` and the `BlockKind` implementation of `Q4Block`. Must never: hold SIMD
//! code (that is in `avx2` and `portable`) or parallelise (that is `matrix`'s).

use super::layout::{deinterleave, interleave, ActBlock, Q4Block, Q4Tile};
use super::matrix::{half_at, Matrix};
use super::{kquant, BlockKind, TILE_ROWS};

/// 4-bit blocks (GGUF Q4_1, and Q4_0 as `m = -8 d`).
pub type Q4Matrix = Matrix<Q4Block>;

impl Q4Matrix {
    /// From GGUF Q4_1 blocks (`d: f16, m: f16, qs: [u8; 16]`, 20 bytes).
    pub fn from_q4_1(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse(raw, rows, cols, 20, |b| Q4Block {
            d: half_at(b, 0),
            m: half_at(b, 2),
            q: std::array::from_fn(|i| b[4 + i]),
        })
    }

    /// From GGUF Q4_0 blocks (`d: f16, qs: [u8; 16]`, 18 bytes; value = `d · (q − 8)`).
    pub fn from_q4_0(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse(raw, rows, cols, 18, |b| {
            let d = half_at(b, 0);
            Q4Block {
                d,
                m: -8.0 * d,
                q: std::array::from_fn(|i| b[2 + i]),
            }
        })
    }
}

impl Q4Matrix {
    /// From GGUF Q4_K super-blocks: each 32-value sub-block is a `Q4Block` exactly.
    pub fn from_q4_k(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse_super(raw, rows, cols, kquant::Q4_K_BYTES, kquant::q4_k)
    }
}

impl BlockKind for Q4Block {
    type Tile = Q4Tile;

    fn tile(rows: [&Self; TILE_ROWS]) -> Q4Tile {
        Q4Tile {
            d: rows.map(|x| x.d),
            m: rows.map(|x| x.m),
            q: interleave(rows.map(|x| &x.q[..])),
        }
    }

    fn lane(tile: &Q4Tile, lane: usize) -> Self {
        Q4Block {
            d: tile.d[lane],
            m: tile.m[lane],
            q: deinterleave(&tile.q, lane),
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        for (k, byte) in self.q.iter().enumerate() {
            out[k] = self.d * f32::from(byte & 0x0F) + self.m;
            out[k + 16] = self.d * f32::from(byte >> 4) + self.m;
        }
    }

    fn row_dots<const N: usize>(row: &[Self], xs: [&[ActBlock]; N], out: &mut [f32]) {
        dispatch!(q4_dots::<N>(row, xs, out));
    }

    fn tile_dots<const N: usize>(
        tiles: &[Q4Tile],
        xs: [&[ActBlock]; N],
        sums: &mut [[f32; TILE_ROWS]; 4],
    ) {
        dispatch_tiles!(tile_dots::<N>(tiles, xs, sums));
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::testdata::{q4_1_bytes, vectors};
    use super::super::{portable, Q8Acts, BLOCK};
    use super::*;

    #[test]
    fn q4_matmul_matches_dequantized_reference_for_every_batch_size() {
        let (rows, cols) = (37, 96);
        let w = Q4Matrix::from_q4_1(&q4_1_bytes(rows, cols, 7), rows, cols).unwrap();
        for n in [1, 2, 3, 4, 5, 9] {
            let xs = vectors(n, cols);
            let acts = Q8Acts::quantize(&xs, cols);
            let mut out = Vec::new();
            w.matmul(&acts, &mut out);
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut row);
                for v in 0..n {
                    let exact: f32 = row.iter().zip(&xs[v * cols..]).map(|(a, b)| a * b).sum();
                    let got = out[v * rows + r];
                    let scale = row.iter().map(|x| x.abs()).sum::<f32>() + 1.0;
                    assert!(
                        (got - exact).abs() < 0.02 * scale,
                        "n={n} r={r} v={v}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn tiled_layout_gives_the_same_rows_and_products() {
        let (rows, cols) = (24, 96);
        let plain = Q4Matrix::from_q4_1(&q4_1_bytes(rows, cols, 11), rows, cols).unwrap();
        let mut tiled = plain.clone();
        tiled.pack();
        assert!(!tiled.tiles.is_empty() && tiled.blocks.is_empty());
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        for r in 0..rows {
            plain.dequantize_row(r, &mut a);
            tiled.dequantize_row(r, &mut b);
            assert_eq!(a, b, "row {r}");
        }
        for n in [1, 2, 3, 4, 5, 9] {
            let acts = Q8Acts::quantize(&vectors(n, cols), cols);
            let (mut want, mut got) = (Vec::new(), Vec::new());
            plain.matmul(&acts, &mut want);
            tiled.matmul(&acts, &mut got);
            for (w, g) in want.iter().zip(&got) {
                assert!(
                    (w - g).abs() <= 1e-3 * w.abs().max(1.0),
                    "n={n}: {w} vs {g}"
                );
            }
        }
        // The SIMD tile kernel against the portable one.
        let acts = Q8Acts::quantize(&vectors(3, cols), cols);
        let xs = [acts.vector(0), acts.vector(1), acts.vector(2)];
        let bpr = cols / BLOCK;
        let (mut p, mut q) = ([[0f32; TILE_ROWS]; 4], [[0f32; TILE_ROWS]; 4]);
        portable::tile_dots::<3>(&tiled.tiles[..bpr], xs, &mut p);
        Q4Block::tile_dots::<3>(&tiled.tiles[..bpr], xs, &mut q);
        for (x, y) in p.iter().flatten().zip(q.iter().flatten()) {
            assert!((x - y).abs() <= 1e-3 * x.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn q4_0_is_q4_1_with_offset_minus_eight_d() {
        let raw = [
            f16::from_f32(0.5).to_le_bytes().to_vec(),
            (0..16u8).map(|i| i | (15 - i) << 4).collect(),
        ]
        .concat();
        let w = Q4Matrix::from_q4_0(&raw, 1, 32).unwrap();
        let mut row = [0f32; 32];
        w.dequantize_row(0, &mut row);
        assert_eq!(row[0], -4.0);
        assert_eq!(row[15], 3.5);
        assert_eq!(row[16], 3.5);
        assert_eq!(row[31], -4.0);
    }
}
