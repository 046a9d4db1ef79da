//! The 8-bit format (GGUF Q8_0): reading its blocks from GGUF bytes, tiling and
//! dequantizing them, and which kernels multiply them.
//!
//! Owns: `Q8Matrix` and the `BlockKind` implementation of `Q8Block`. Must never: hold SIMD
//! code (that is in `avx2` and `portable`) or parallelise (that is `matrix`'s).

use super::layout::{deinterleave, interleave, ActBlock, Q8Block, Q8Tile};
use super::matrix::{half_at, Matrix};
use super::{BlockKind, TILE_ROWS};
/// 8-bit blocks (GGUF Q8_0).
pub type Q8Matrix = Matrix<Q8Block>;

impl Q8Matrix {
    /// From GGUF Q8_0 blocks (`d: f16, qs: [i8; 32]`, 34 bytes).
    pub fn from_q8_0(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse(raw, rows, cols, 34, |b| Q8Block {
            d: half_at(b, 0),
            q: std::array::from_fn(|i| b[2 + i] as i8),
        })
    }
}

impl BlockKind for Q8Block {
    type Tile = Q8Tile;

    fn tile(rows: [&Self; TILE_ROWS]) -> Q8Tile {
        Q8Tile {
            d: rows.map(|x| x.d),
            q: interleave(rows.map(|x| &x.q[..])),
        }
    }

    fn lane(tile: &Q8Tile, lane: usize) -> Self {
        Q8Block {
            d: tile.d[lane],
            q: deinterleave(&tile.q, lane),
        }
    }

    fn dequantize(&self, out: &mut [f32]) {
        for (v, q) in out.iter_mut().zip(&self.q) {
            *v = self.d * f32::from(*q);
        }
    }

    fn row_dots<const N: usize>(row: &[Self], xs: [&[ActBlock]; N], out: &mut [f32]) {
        dispatch!(q8_dots::<N>(row, xs, out));
    }

    fn tile_dots<const N: usize>(
        tiles: &[Q8Tile],
        xs: [&[ActBlock]; N],
        sums: &mut [[f32; TILE_ROWS]; 4],
    ) {
        dispatch_tiles!(q8_tile_dots::<N>(tiles, xs, sums));
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::testdata::vectors;
    use super::super::{portable, Q8Acts, BLOCK};
    use super::*;

    #[test]
    fn q8_tiles_give_the_same_rows_and_products() {
        let (rows, cols) = (16, 96);
        let mut raw = Vec::new();
        for i in 0..rows * cols / BLOCK {
            raw.extend_from_slice(&f16::from_f32(0.01 + i as f32 / 300.0).to_le_bytes());
            raw.extend((0..32).map(|k| ((k * 53 + i * 29) % 256) as u8));
        }
        let plain = Q8Matrix::from_q8_0(&raw, rows, cols).unwrap();
        let mut tiled = plain.clone();
        tiled.pack();
        assert!(!tiled.tiles.is_empty() && tiled.blocks.is_empty());
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        for r in 0..rows {
            plain.dequantize_row(r, &mut a);
            tiled.dequantize_row(r, &mut b);
            assert_eq!(a, b, "row {r}");
        }
        for n in [1, 3, 4, 6] {
            let acts = Q8Acts::quantize(&vectors(n, cols), cols);
            let (mut want, mut got) = (Vec::new(), Vec::new());
            plain.matmul(&acts, &mut want);
            tiled.matmul(&acts, &mut got);
            for (w, g) in want.iter().zip(&got) {
                assert!(
                    (w - g).abs() <= 1e-4 * w.abs().max(1.0),
                    "n={n}: {w} vs {g}"
                );
            }
        }
        let acts = Q8Acts::quantize(&vectors(2, cols), cols);
        let xs = [acts.vector(0), acts.vector(1)];
        let bpr = cols / BLOCK;
        let (mut p, mut q) = ([[0f32; TILE_ROWS]; 4], [[0f32; TILE_ROWS]; 4]);
        portable::q8_tile_dots::<2>(&tiled.tiles[..bpr], xs, &mut p);
        Q8Block::tile_dots::<2>(&tiled.tiles[..bpr], xs, &mut q);
        for (x, y) in p.iter().flatten().zip(q.iter().flatten()) {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{x} vs {y}");
        }
    }
}
