//! The quantized matrix, generic over its block format: parsing GGUF bytes into blocks,
//! stacking projections, packing rows into 8-row tiles, and the row-parallel multiply of the
//! matrix by a batch of quantized vectors.
//!
//! Owns: `Matrix` and its layout (plain rows or tiles, never both), how rows are shared out
//! to rayon tasks, and how many vectors one kernel call takes. Must never: know a block
//! format's bits (that is `BlockKind`'s) or choose an instruction set.

use half::f16;
use rayon::prelude::*;

use super::kquant::SUPER;
use super::{BlockKind, Q8Acts, BLOCK, TILE_ROWS};

/// A quantized matrix: rows are contiguous runs of `cols / 32` blocks until `pack` moves
/// them into 8-row tiles for the batched kernels.
#[derive(Clone)]
pub struct Matrix<B: BlockKind> {
    pub rows: usize,
    pub cols: usize,
    pub(super) blocks: Vec<B>,
    /// Row group by row group, then block by block.
    pub(super) tiles: Vec<B::Tile>,
}

/// The little-endian f16 at `at`, widened.
pub(super) fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn check_shape(
    len: usize,
    rows: usize,
    cols: usize,
    values: usize,
    block_bytes: usize,
) -> anyhow::Result<()> {
    if !cols.is_multiple_of(values) {
        anyhow::bail!("rows of {cols} values are not whole blocks of {values}");
    }
    let want = rows * cols / values * block_bytes;
    if len != want {
        anyhow::bail!("tensor holds {len} bytes; {rows}×{cols} needs {want}");
    }
    Ok(())
}

impl<B: BlockKind> Matrix<B> {
    /// Blocks of `block_bytes` bytes each, read by `block`, after checking the size.
    pub(super) fn parse(
        raw: &[u8],
        rows: usize,
        cols: usize,
        block_bytes: usize,
        block: impl Fn(&[u8]) -> B,
    ) -> anyhow::Result<Self> {
        check_shape(raw.len(), rows, cols, BLOCK, block_bytes)?;
        Ok(Self {
            rows,
            cols,
            blocks: raw.chunks_exact(block_bytes).map(block).collect(),
            tiles: Vec::new(),
        })
    }

    /// Super-blocks of 256 values in `block_bytes` bytes each, split by `split` into the
    /// eight 32-value blocks they hold (a row holds whole super-blocks).
    pub(super) fn parse_super(
        raw: &[u8],
        rows: usize,
        cols: usize,
        block_bytes: usize,
        split: impl Fn(&[u8]) -> [B; 8],
    ) -> anyhow::Result<Self> {
        check_shape(raw.len(), rows, cols, SUPER, block_bytes)?;
        Ok(Self {
            rows,
            cols,
            blocks: raw.chunks_exact(block_bytes).flat_map(split).collect(),
            tiles: Vec::new(),
        })
    }

    /// Appends the rows of `other` (same width), so several projections of one input run as
    /// one multiply.
    pub fn stack(&mut self, other: &Self) {
        debug_assert!(self.tiles.is_empty() && other.tiles.is_empty());
        debug_assert_eq!(self.cols, other.cols);
        self.rows += other.rows;
        self.blocks.extend_from_slice(&other.blocks);
    }

    /// Moves the rows into 8-row tiles for the batched kernels when the row count allows
    /// (the row kernels serve the rest). Call after any `stack`. One layout only: a
    /// vector's products must not depend on how many vectors share the pass.
    pub fn pack(&mut self) {
        if !self.tiles.is_empty() || !self.rows.is_multiple_of(TILE_ROWS) {
            return;
        }
        let bpr = self.cols / BLOCK;
        let mut tiles = Vec::with_capacity(self.rows / TILE_ROWS * bpr);
        for group in 0..self.rows / TILE_ROWS {
            for b in 0..bpr {
                tiles.push(B::tile(std::array::from_fn(|r| {
                    &self.blocks[(group * TILE_ROWS + r) * bpr + b]
                })));
            }
        }
        self.tiles = tiles;
        self.blocks = Vec::new();
    }

    /// Row `r` as f32 values.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bpr = self.cols / BLOCK;
        for (b, chunk) in out.chunks_exact_mut(BLOCK).enumerate() {
            let block = if self.tiles.is_empty() {
                self.blocks[r * bpr + b]
            } else {
                B::lane(&self.tiles[(r / TILE_ROWS) * bpr + b], r % TILE_ROWS)
            };
            block.dequantize(chunk);
        }
    }

    /// `out[v · rows + r] = row r · vector v` for every vector of `acts`.
    pub fn matmul(&self, acts: &Q8Acts, out: &mut Vec<f32>) {
        let (rows, bpr, n) = (self.rows, self.cols / BLOCK, acts.len());
        out.clear();
        out.resize(rows * n, 0.0);
        if n == 0 {
            return;
        }
        let tiled = !self.tiles.is_empty();
        let step = if tiled { TILE_ROWS } else { 1 };
        let (per_task, tasks) = row_tasks(out, rows, step);
        tasks.into_par_iter().enumerate().for_each(|(c, mut outs)| {
            let task_rows = outs[0].len();
            // A chunk of vectors meets all the task's rows before the next chunk, so the
            // activations a row reads stay in the core's cache however many there are.
            for chunk in (0..n).step_by(VECTOR_CHUNK) {
                let chunk_end = (chunk + VECTOR_CHUNK).min(n);
                for local in (0..task_rows).step_by(step) {
                    let first_row = c * per_task + local;
                    let mut v = chunk;
                    while v < chunk_end {
                        let take = (chunk_end - v).min(4);
                        if tiled {
                            let group = first_row / TILE_ROWS;
                            let tiles = &self.tiles[group * bpr..(group + 1) * bpr];
                            let mut sums = [[0f32; TILE_ROWS]; 4];
                            tile_dots_of::<B>(tiles, acts, v, take, &mut sums);
                            for (k, row_sums) in sums.iter().take(take).enumerate() {
                                outs[v + k][local..local + TILE_ROWS].copy_from_slice(row_sums);
                            }
                        } else {
                            let row = &self.blocks[first_row * bpr..(first_row + 1) * bpr];
                            let mut dots = [0f32; 4];
                            row_dots_of::<B>(row, acts, v, take, &mut dots[..take]);
                            for (k, dot) in dots.iter().take(take).enumerate() {
                                outs[v + k][local] = *dot;
                            }
                        }
                        v += take;
                    }
                }
            }
        });
    }
}

/// Vectors that meet a task's rows together: a few hundred KiB of activations at most, so
/// they stay in a core's L2 cache while the rows pass over them.
pub(super) const VECTOR_CHUNK: usize = 32;

/// `take` (1–4) vectors from `first` against one row.
fn row_dots_of<B: BlockKind>(row: &[B], acts: &Q8Acts, first: usize, take: usize, out: &mut [f32]) {
    let x = |k: usize| acts.vector(first + k);
    match take {
        4 => B::row_dots::<4>(row, std::array::from_fn(x), out),
        3 => B::row_dots::<3>(row, std::array::from_fn(x), out),
        2 => B::row_dots::<2>(row, std::array::from_fn(x), out),
        _ => B::row_dots::<1>(row, std::array::from_fn(x), out),
    }
}

/// `take` (1–4) vectors from `first` against one row group's tiles.
fn tile_dots_of<B: BlockKind>(
    tiles: &[B::Tile],
    acts: &Q8Acts,
    first: usize,
    take: usize,
    sums: &mut [[f32; TILE_ROWS]; 4],
) {
    let x = |k: usize| acts.vector(first + k);
    match take {
        4 => B::tile_dots::<4>(tiles, std::array::from_fn(x), sums),
        3 => B::tile_dots::<3>(tiles, std::array::from_fn(x), sums),
        2 => B::tile_dots::<2>(tiles, std::array::from_fn(x), sums),
        _ => B::tile_dots::<1>(tiles, std::array::from_fn(x), sums),
    }
}

/// Rows handled per parallel task: a few tasks per thread so uneven progress evens out,
/// but never so few rows that scheduling costs more than the work.
fn rows_per_task(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads * 4).max(16).min(rows.max(1))
}

/// Shares the rows of `out` (vectors of `rows` values, one after another) out to parallel
/// tasks in runs of a multiple of `step` rows: each task owns a run of rows, and so the same
/// run in every vector's output, so a row is read once for all vectors and its results land
/// directly where the vectors' outputs want them. Returns the run length and the tasks.
pub(super) fn row_tasks(
    out: &mut [f32],
    rows: usize,
    step: usize,
) -> (usize, Vec<Vec<&mut [f32]>>) {
    let per_task = rows_per_task(rows).div_ceil(step) * step;
    let n = out.len() / rows.max(1);
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..rows.div_ceil(per_task))
        .map(|_| Vec::with_capacity(n))
        .collect();
    for vector_out in out.chunks_exact_mut(rows) {
        for (task, run) in tasks.iter_mut().zip(vector_out.chunks_mut(per_task)) {
            task.push(run);
        }
    }
    (per_task, tasks)
}

#[cfg(test)]
mod tests {
    use super::super::{Q4Matrix, Q8Matrix};

    #[test]
    fn rejects_a_tensor_of_the_wrong_size() {
        assert!(Q4Matrix::from_q4_1(&[0u8; 40], 1, 32).is_err());
        assert!(Q8Matrix::from_q8_0(&[0u8; 34], 1, 48).is_err());
    }
}
