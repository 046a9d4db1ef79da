//! Quantized matrix × vector kernels for the chat engine, in the block formats of GGUF.
//!
//! Weights stay in 4- or 8-bit blocks of 32; activations are quantized to 8-bit blocks of
//! 32 (each with its scale and, for the 4-bit kind, the scaled sum of its values) and the
//! dot products are integer sums scaled once per block, as llama.cpp does. One call
//! multiplies a matrix by a whole batch of vectors: each weight row is read from memory once
//! and used for every vector, which is what makes batched decoding cheaper than decoding
//! sequences one by one.
//!
//! Owns: the block layouts after loading, activation quantization, the dot products and the
//! row-parallel matrix multiply, and attention's products over the f16 KV cache. Must never: allocate per block or know about models.
//!
//! The x86-64 path uses AVX2/FMA intrinsics (compiled in when the target has them, as the
//! workspace's default `target-cpu` does); every other target uses the portable loops, and a
//! test checks that both agree.

// The SIMD intrinsics are `unsafe` to call with raw pointers; each use is commented.
#![allow(unsafe_code)]

use half::f16;
use rayon::prelude::*;

/// Calls `simd::f` where the build has AVX2/FMA and `portable::f` elsewhere.
macro_rules! dispatch {
    ($f:ident::<$n:ident>($($arg:expr),*)) => {{
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        simd::$f::<$n>($($arg),*);
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        portable::$f::<$n>($($arg),*);
    }};
}

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// 32 values `d · q + m`, `q` in 0..16: byte `i` holds value `i` in its low nibble and value
/// `i + 16` in its high one. Scales are widened to f32 at load so the kernels convert
/// nothing.
#[derive(Clone, Copy)]
pub struct Q4Block {
    d: f32,
    m: f32,
    q: [u8; 16],
}

/// One block of 32 values from each of 8 consecutive rows, interleaved so that one 256-bit
/// register holds the same 4 positions of all 8 rows: `q[g]` is bytes `4g..4g+4` of each
/// row's block in turn (low nibbles: values `4g..4g+4`, high nibbles: `16+4g..16+4g+4`).
/// A multiply-add against 4 broadcast activation bytes then yields one partial sum per row
/// in each lane, with no horizontal reduction.
#[derive(Clone, Copy)]
pub struct Q4Tile {
    d: [f32; 8],
    m: [f32; 8],
    q: [[u8; 32]; 4],
}

/// Rows per tile.
const TILE_ROWS: usize = 8;

/// One 8-bit block from each of 8 consecutive rows, interleaved like `Q4Tile`: `q[g]` is
/// bytes `4g..4g+4` of each row's block in turn.
#[derive(Clone, Copy)]
pub struct Q8Tile {
    d: [f32; 8],
    q: [[i8; 32]; 8],
}

/// 32 values `d · q`, `q` in -128..128.
#[derive(Clone, Copy)]
pub struct Q8Block {
    d: f32,
    q: [i8; 32],
}

/// 32 quantized activations with `s = d · Σ q`, the term that meets a 4-bit block's `m`.
#[derive(Clone, Copy)]
pub struct ActBlock {
    d: f32,
    s: f32,
    q: [i8; 32],
}

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

/// A quantized matrix: rows are contiguous runs of `cols / 32` blocks until `pack` moves
/// them into 8-row tiles for the batched kernels.
#[derive(Clone)]
pub struct Matrix<B: BlockKind> {
    pub rows: usize,
    pub cols: usize,
    blocks: Vec<B>,
    /// Row group by row group, then block by block.
    tiles: Vec<B::Tile>,
}

/// 4-bit blocks (GGUF Q4_1, and Q4_0 as `m = -8 d`).
pub type Q4Matrix = Matrix<Q4Block>;
/// 8-bit blocks (GGUF Q8_0).
pub type Q8Matrix = Matrix<Q8Block>;

/// Vectors quantized for the kernels, concatenated (`n` vectors of `cols / 32` blocks).
#[derive(Default)]
pub struct Q8Acts {
    blocks_per_vec: usize,
    blocks: Vec<ActBlock>,
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Rounds every value to the nearest f16 (kept as f32), eight at a time with F16C where the
/// build has it.
pub fn round_to_f16(xs: &mut [f32]) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        let mut chunks = xs.chunks_exact_mut(8);
        for chunk in &mut chunks {
            simd::round_to_f16(chunk);
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|x| *x = round_f16(*x));
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    xs.iter_mut().for_each(|x| *x = round_f16(*x));
}

/// Appends `src` rounded to f16, eight at a time with F16C where the build has it.
pub fn extend_f16(dst: &mut Vec<f16>, src: &[f32]) {
    dst.reserve(src.len());
    let mut chunks = src.chunks_exact(8);
    for chunk in &mut chunks {
        dst.extend_from_slice(&narrow8(chunk));
    }
    dst.extend(chunks.remainder().iter().map(|x| f16::from_f32(*x)));
}

// Eight values at a time between f32 and f16: F16C where the build has it.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c"
)))]
use portable::{narrow8, widen8};
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c"
))]
use simd::{narrow8, widen8};

fn dot_f16(q: &[f32], row: &[f16]) -> f32 {
    q.iter().zip(row).map(|(a, b)| a * b.to_f32()).sum()
}

/// `out[p] = scale · q · rows[p]`, where row `p` is `q.len()` f16 values at `p · stride` in
/// `rows` (attention scores over a cache). Eight rows at a time, each in its own eight-lane
/// accumulator, so the horizontal sums of eight dot products overlap instead of each
/// closing a dependency chain alone.
pub fn f16_dots(q: &[f32], rows: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
    let len = q.len();
    if !len.is_multiple_of(8) {
        for (p, o) in out.iter_mut().enumerate() {
            *o = dot_f16(q, &rows[p * stride..p * stride + len]) * scale;
        }
        return;
    }
    let done = out.len() / 8 * 8;
    for (c, chunk) in out.chunks_exact_mut(8).enumerate() {
        let mut acc = [[0f32; 8]; 8];
        for (l, q8) in q.chunks_exact(8).enumerate() {
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = (8 * c + i) * stride + 8 * l;
                let k = widen8(&rows[at..at + 8]);
                for lane in 0..8 {
                    acc[lane] += q8[lane] * k[lane];
                }
            }
        }
        for (o, acc) in chunk.iter_mut().zip(&acc) {
            *o = acc.iter().sum::<f32>() * scale;
        }
    }
    for (p, o) in out.iter_mut().enumerate().skip(done) {
        *o = dot_f16(q, &rows[p * stride..p * stride + len]) * scale;
    }
}

/// `out = Σ_p weights[p] · rows[p]`, where row `p` is `out.len()` f16 values at `p · stride`
/// in `rows` (attention's weighted sum of cached values). Thirty-two outputs at a time stay
/// in registers across all rows.
pub fn f16_weighted_sum(weights: &[f32], rows: &[f16], stride: usize, out: &mut [f32]) {
    let mut at = 0;
    let mut chunks = out.chunks_exact_mut(32);
    for chunk in &mut chunks {
        let mut acc = [0f32; 32];
        for (p, w) in weights.iter().enumerate() {
            let v = &rows[p * stride + at..p * stride + at + 32];
            for (acc, v) in acc.chunks_exact_mut(8).zip(v.chunks_exact(8)) {
                let v = widen8(v);
                for lane in 0..8 {
                    acc[lane] += w * v[lane];
                }
            }
        }
        chunk.copy_from_slice(&acc);
        at += 32;
    }
    let tail = chunks.into_remainder();
    tail.fill(0.0);
    for (p, w) in weights.iter().enumerate() {
        let v = &rows[p * stride + at..p * stride + at + tail.len()];
        for (o, x) in tail.iter_mut().zip(v) {
            *o += w * x.to_f32();
        }
    }
}

/// Interleaves 8 rows' bytes: group `g` holds bytes `4g..4g+4` of each row in turn.
fn interleave<T: Copy + Default, const G: usize>(rows: [&[T]; TILE_ROWS]) -> [[T; 32]; G] {
    let mut groups = [[T::default(); 32]; G];
    for (g, lanes) in groups.iter_mut().enumerate() {
        for (row, lane) in rows.iter().zip(lanes.chunks_exact_mut(4)) {
            lane.copy_from_slice(&row[4 * g..4 * g + 4]);
        }
    }
    groups
}

/// One row's bytes back out of interleaved groups.
fn deinterleave<T: Copy + Default, const W: usize>(groups: &[[T; 32]], lane: usize) -> [T; W] {
    let mut row = [T::default(); W];
    for (g, chunk) in row.chunks_exact_mut(4).enumerate() {
        chunk.copy_from_slice(&groups[g][4 * lane..4 * lane + 4]);
    }
    row
}

fn check_shape(len: usize, rows: usize, cols: usize, block_bytes: usize) -> anyhow::Result<()> {
    if !cols.is_multiple_of(BLOCK) {
        anyhow::bail!("rows of {cols} values are not whole blocks of {BLOCK}");
    }
    let want = rows * cols / BLOCK * block_bytes;
    if len != want {
        anyhow::bail!("tensor holds {len} bytes; {rows}×{cols} needs {want}");
    }
    Ok(())
}

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

impl Q8Matrix {
    /// From GGUF Q8_0 blocks (`d: f16, qs: [i8; 32]`, 34 bytes).
    pub fn from_q8_0(raw: &[u8], rows: usize, cols: usize) -> anyhow::Result<Self> {
        Self::parse(raw, rows, cols, 34, |b| Q8Block {
            d: half_at(b, 0),
            q: std::array::from_fn(|i| b[2 + i] as i8),
        })
    }
}

impl<B: BlockKind> Matrix<B> {
    fn parse(
        raw: &[u8],
        rows: usize,
        cols: usize,
        block_bytes: usize,
        block: impl Fn(&[u8]) -> B,
    ) -> anyhow::Result<Self> {
        check_shape(raw.len(), rows, cols, block_bytes)?;
        Ok(Self {
            rows,
            cols,
            blocks: raw.chunks_exact(block_bytes).map(block).collect(),
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
        let per_task = rows_per_task(rows).div_ceil(step) * step;
        // Each task owns a run of rows, and so the same run in every vector's output: each
        // row (or tile) is read once for all vectors, up to four at a time, and its results
        // land directly where the vectors' outputs want them.
        let mut tasks: Vec<Vec<&mut [f32]>> = (0..rows.div_ceil(per_task))
            .map(|_| Vec::with_capacity(n))
            .collect();
        for vector_out in out.chunks_exact_mut(rows) {
            for (task, run) in tasks.iter_mut().zip(vector_out.chunks_mut(per_task)) {
                task.push(run);
            }
        }
        tasks.into_par_iter().enumerate().for_each(|(c, mut outs)| {
            let task_rows = outs[0].len();
            for local in (0..task_rows).step_by(step) {
                let first_row = c * per_task + local;
                let mut v = 0;
                while v < n {
                    let take = (n - v).min(4);
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
        });
    }
}

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
        dispatch!(tile_dots::<N>(tiles, xs, sums));
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
        dispatch!(q8_tile_dots::<N>(tiles, xs, sums));
    }
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

    fn vector(&self, v: usize) -> &[ActBlock] {
        &self.blocks[v * self.blocks_per_vec..(v + 1) * self.blocks_per_vec]
    }
}

/// Rows handled per parallel task: a few tasks per thread so uneven progress evens out,
/// but never so few rows that scheduling costs more than the work.
fn rows_per_task(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads * 4).max(16).min(rows.max(1))
}

// With SIMD compiled in, the portable loops serve as the tests' reference.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
mod portable {
    use half::f16;

    use super::{ActBlock, Q4Block, Q4Tile, Q8Block, Q8Tile, TILE_ROWS};

    pub fn narrow8(chunk: &[f32]) -> [f16; 8] {
        std::array::from_fn(|i| f16::from_f32(chunk[i]))
    }

    pub fn widen8(h: &[f16]) -> [f32; 8] {
        std::array::from_fn(|i| h[i].to_f32())
    }

    pub fn q8_tile_dots<const N: usize>(
        tiles: &[Q8Tile],
        xs: [&[ActBlock]; N],
        sums: &mut [[f32; TILE_ROWS]; 4],
    ) {
        for (k, x) in xs.iter().enumerate() {
            let mut acc = [0f32; TILE_ROWS];
            for (t, a) in tiles.iter().zip(x.iter()) {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let mut sum = 0i32;
                    for g in 0..8 {
                        for i in 0..4 {
                            sum += i32::from(t.q[g][4 * r + i]) * i32::from(a.q[4 * g + i]);
                        }
                    }
                    *acc = (t.d[r] * a.d).mul_add(sum as f32, *acc);
                }
            }
            sums[k] = acc;
        }
    }

    pub fn tile_dots<const N: usize>(
        tiles: &[Q4Tile],
        xs: [&[ActBlock]; N],
        sums: &mut [[f32; TILE_ROWS]; 4],
    ) {
        for (k, x) in xs.iter().enumerate() {
            let mut acc = [0f32; TILE_ROWS];
            for (t, a) in tiles.iter().zip(x.iter()) {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let mut sum = 0i32;
                    for g in 0..4 {
                        for i in 0..4 {
                            let byte = t.q[g][4 * r + i];
                            sum += i32::from(byte & 0x0F) * i32::from(a.q[4 * g + i])
                                + i32::from(byte >> 4) * i32::from(a.q[16 + 4 * g + i]);
                        }
                    }
                    *acc = (t.d[r] * a.d).mul_add(sum as f32, *acc);
                    *acc = t.m[r].mul_add(a.s, *acc);
                }
            }
            sums[k] = acc;
        }
    }

    pub fn q4_dots<const N: usize>(row: &[Q4Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = row
                .iter()
                .zip(x)
                .map(|(w, a)| {
                    let sum: i32 =
                        w.q.iter()
                            .enumerate()
                            .map(|(k, byte)| {
                                i32::from(byte & 0x0F) * i32::from(a.q[k])
                                    + i32::from(byte >> 4) * i32::from(a.q[k + 16])
                            })
                            .sum();
                    w.d * a.d * sum as f32 + w.m * a.s
                })
                .sum();
        }
    }

    pub fn q8_dots<const N: usize>(row: &[Q8Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = row
                .iter()
                .zip(x)
                .map(|(w, a)| {
                    let sum: i32 =
                        w.q.iter()
                            .zip(&a.q)
                            .map(|(p, q)| i32::from(*p) * i32::from(*q))
                            .sum();
                    w.d * a.d * sum as f32
                })
                .sum();
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod simd {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{ActBlock, Q4Block, Q4Tile, Q8Block, Q8Tile, TILE_ROWS};

    /// Four activation bytes `4g..4g+4` of `q` as one 32-bit lane pattern, in every lane.
    #[inline(always)]
    #[allow(unused_unsafe)]
    fn broadcast4(q: &[i8; 32], at: usize) -> __m256i {
        let word = i32::from_le_bytes([
            q[at] as u8,
            q[at + 1] as u8,
            q[at + 2] as u8,
            q[at + 3] as u8,
        ]);
        // SAFETY: register-only AVX operation.
        unsafe { _mm256_set1_epi32(word) }
    }

    /// Per block: four 32-byte loads give all 8 rows' values; for each vector, eight
    /// multiply-adds against broadcast activation bytes accumulate 16-bit partial sums
    /// (at most 8 · 2 · 15 · 127 = 30 480 in magnitude, so no overflow), one widening
    /// multiply-add finishes the 8 row sums, and the scales are applied as vectors.
    #[inline(always)]
    #[allow(unused_unsafe)]
    pub fn tile_dots<const N: usize>(
        tiles: &[Q4Tile],
        xs: [&[ActBlock]; N],
        sums: &mut [[f32; TILE_ROWS]; 4],
    ) {
        let len = tiles.len();
        let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
        // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); loads read
        // `[u8; 32]` and `[f32; 8]` arrays, stores write `[f32; 8]` arrays, all unaligned.
        unsafe {
            let mask = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); N];
            for (b, t) in tiles.iter().enumerate() {
                let mut partial = [_mm256_setzero_si256(); N];
                for g in 0..4 {
                    let packed = _mm256_loadu_si256(t.q[g].as_ptr().cast());
                    let lo = _mm256_and_si256(packed, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), mask);
                    for k in 0..N {
                        let a = &xs[k][b].q;
                        let low = _mm256_maddubs_epi16(lo, broadcast4(a, 4 * g));
                        let high = _mm256_maddubs_epi16(hi, broadcast4(a, 16 + 4 * g));
                        partial[k] = _mm256_add_epi16(partial[k], _mm256_add_epi16(low, high));
                    }
                }
                let d = _mm256_loadu_ps(t.d.as_ptr());
                let m = _mm256_loadu_ps(t.m.as_ptr());
                for k in 0..N {
                    let a = &xs[k][b];
                    let dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(partial[k], ones));
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                    acc[k] = _mm256_fmadd_ps(scale, dots, acc[k]);
                    acc[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s), acc[k]);
                }
            }
            for k in 0..N {
                _mm256_storeu_ps(sums[k].as_mut_ptr(), acc[k]);
            }
        }
    }

    /// Eight values rounded to f16.
    #[cfg(target_feature = "f16c")]
    #[inline(always)]
    #[allow(unused_unsafe)]
    pub fn narrow8(chunk: &[f32]) -> [f16; 8] {
        assert!(chunk.len() >= 8);
        let mut out = [f16::ZERO; 8];
        // SAFETY: F16C is enabled for this build (the caller's cfg checks it); the load
        // reads the first 8 values of `chunk` (checked above), the store writes the 16 bytes
        // of `out`.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(chunk.as_ptr()));
            _mm_storeu_si128(out.as_mut_ptr().cast(), h);
        }
        out
    }

    /// Eight f16 values widened to f32.
    #[cfg(target_feature = "f16c")]
    #[inline(always)]
    #[allow(unused_unsafe)]
    pub fn widen8(h: &[f16]) -> [f32; 8] {
        assert!(h.len() >= 8);
        let mut out = [0f32; 8];
        // SAFETY: F16C is enabled for this build (the caller's cfg checks it); the load
        // reads the first 16 bytes of `h` (checked above), the store the 8 values of `out`.
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast()));
            _mm256_storeu_ps(out.as_mut_ptr(), v);
        }
        out
    }

    /// Eight values through f16 and back.
    #[inline(always)]
    #[allow(unused_unsafe)]
    pub fn round_to_f16(chunk: &mut [f32]) {
        assert_eq!(chunk.len(), 8);
        // SAFETY: F16C is enabled for this build (x86-64-v3 includes it; the caller's cfg
        // checks it); the load and store touch exactly the 8 values of `chunk`.
        unsafe {
            let v = _mm256_loadu_ps(chunk.as_ptr());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm256_storeu_ps(chunk.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }

    /// Per block: for each group of 4 positions, the 8 rows' weights in one register; each
    /// vector's 4 activation bytes are broadcast, given the weights' signs (`maddubs` takes
    /// one unsigned operand) and multiplied against the weights' magnitudes; 32-bit row sums
    /// accumulate per block (a 16-bit pair sum can reach 32 512, so no 16-bit carrying).
    #[inline(always)]
    #[allow(unused_unsafe)]
    pub fn q8_tile_dots<const N: usize>(
        tiles: &[Q8Tile],
        xs: [&[ActBlock]; N],
        sums: &mut [[f32; TILE_ROWS]; 4],
    ) {
        let len = tiles.len();
        let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
        // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); loads read
        // `[i8; 32]` and `[f32; 8]` arrays, stores write `[f32; 8]` arrays, all unaligned.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); N];
            for (b, t) in tiles.iter().enumerate() {
                let mut dots = [_mm256_setzero_si256(); N];
                for g in 0..8 {
                    let w = load32(&t.q[g]);
                    let magnitude = _mm256_sign_epi8(w, w);
                    for k in 0..N {
                        let x = _mm256_sign_epi8(broadcast4(&xs[k][b].q, 4 * g), w);
                        let pairs = _mm256_maddubs_epi16(magnitude, x);
                        dots[k] = _mm256_add_epi32(dots[k], _mm256_madd_epi16(pairs, ones));
                    }
                }
                let d = _mm256_loadu_ps(t.d.as_ptr());
                for k in 0..N {
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(xs[k][b].d));
                    acc[k] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dots[k]), acc[k]);
                }
            }
            for k in 0..N {
                _mm256_storeu_ps(sums[k].as_mut_ptr(), acc[k]);
            }
        }
    }

    #[inline(always)]
    #[allow(unused_unsafe)]
    fn hsum(v: __m256) -> f32 {
        // SAFETY: register-only AVX operations; the target has AVX (checked by cfg).
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }
    }

    #[inline(always)]
    #[allow(unused_unsafe)]
    fn load32(x: &[i8; 32]) -> __m256i {
        // SAFETY: `x` is 32 readable bytes; the load is unaligned.
        unsafe { _mm256_loadu_si256(x.as_ptr().cast()) }
    }

    #[inline(always)]
    #[allow(unused_unsafe)]
    fn unpack(packed: &[u8; 16]) -> __m256i {
        // SAFETY: a 16-byte unaligned load from a `[u8; 16]`; the rest is register-only.
        unsafe {
            let bytes = _mm_loadu_si128(packed.as_ptr().cast());
            let both = _mm256_set_m128i(_mm_srli_epi16::<4>(bytes), bytes);
            _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
        }
    }

    /// Eight partial sums of `u · x` for unsigned bytes `u` and signed bytes `x`, as floats.
    #[inline(always)]
    #[allow(unused_unsafe)]
    fn products(u: __m256i, x: __m256i) -> __m256 {
        // SAFETY: register-only AVX2 operations.
        unsafe {
            let pairs = _mm256_maddubs_epi16(u, x);
            _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    /// Two blocks per iteration into separate accumulators, so consecutive blocks do not
    /// wait on each other's multiply-add.
    #[inline(always)]
    #[allow(unused_unsafe)]
    pub fn q4_dots<const N: usize>(row: &[Q4Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
        let len = row.len();
        let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
        // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); memory is read
        // only through `unpack` and `load32`, from arrays.
        unsafe {
            let mut even = [_mm256_setzero_ps(); N];
            let mut odd = [_mm256_setzero_ps(); N];
            let mut offsets = [0f32; N];
            let pairs = row.chunks_exact(2);
            let tail = pairs.remainder();
            for (p, w) in pairs.enumerate() {
                let j = 2 * p;
                let (n0, n1) = (unpack(&w[0].q), unpack(&w[1].q));
                for k in 0..N {
                    let (a0, a1) = (&xs[k][j], &xs[k][j + 1]);
                    let (d0, d1) = (w[0].d * a0.d, w[1].d * a1.d);
                    even[k] =
                        _mm256_fmadd_ps(_mm256_set1_ps(d0), products(n0, load32(&a0.q)), even[k]);
                    odd[k] =
                        _mm256_fmadd_ps(_mm256_set1_ps(d1), products(n1, load32(&a1.q)), odd[k]);
                    offsets[k] += w[0].m * a0.s + w[1].m * a1.s;
                }
            }
            if let [w] = tail {
                let j = len - 1;
                let nibbles = unpack(&w.q);
                for k in 0..N {
                    let a = &xs[k][j];
                    let d = _mm256_set1_ps(w.d * a.d);
                    even[k] = _mm256_fmadd_ps(d, products(nibbles, load32(&a.q)), even[k]);
                    offsets[k] += w.m * a.s;
                }
            }
            for k in 0..N {
                out[k] = hsum(_mm256_add_ps(even[k], odd[k])) + offsets[k];
            }
        }
    }

    #[inline(always)]
    #[allow(unused_unsafe)]
    pub fn q8_dots<const N: usize>(row: &[Q8Block], xs: [&[ActBlock]; N], out: &mut [f32]) {
        let len = row.len();
        let xs: [&[ActBlock]; N] = xs.map(|x| &x[..len]);
        // SAFETY: AVX2/FMA are enabled for this build (cfg on the module); memory is read
        // only through `load32`, from arrays.
        unsafe {
            let mut even = [_mm256_setzero_ps(); N];
            let mut odd = [_mm256_setzero_ps(); N];
            let pairs = row.chunks_exact(2);
            let tail = pairs.remainder();
            // maddubs multiplies unsigned by signed: the weight's magnitude times x carrying
            // the weight's sign.
            for (p, w) in pairs.enumerate() {
                let j = 2 * p;
                let (q0, q1) = (load32(&w[0].q), load32(&w[1].q));
                let (m0, m1) = (_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(q1, q1));
                for k in 0..N {
                    let (a0, a1) = (&xs[k][j], &xs[k][j + 1]);
                    let x0 = _mm256_sign_epi8(load32(&a0.q), q0);
                    let x1 = _mm256_sign_epi8(load32(&a1.q), q1);
                    let (d0, d1) = (w[0].d * a0.d, w[1].d * a1.d);
                    even[k] = _mm256_fmadd_ps(_mm256_set1_ps(d0), products(m0, x0), even[k]);
                    odd[k] = _mm256_fmadd_ps(_mm256_set1_ps(d1), products(m1, x1), odd[k]);
                }
            }
            if let [w] = tail {
                let j = len - 1;
                let q = load32(&w.q);
                let magnitude = _mm256_sign_epi8(q, q);
                for k in 0..N {
                    let a = &xs[k][j];
                    let x = _mm256_sign_epi8(load32(&a.q), q);
                    let d = _mm256_set1_ps(w.d * a.d);
                    even[k] = _mm256_fmadd_ps(d, products(magnitude, x), even[k]);
                }
            }
            for k in 0..N {
                out[k] = hsum(_mm256_add_ps(even[k], odd[k]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_1_bytes(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as u8
        };
        let mut raw = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32(0.01 + f32::from(next()) / 5000.0);
            let m = f16::from_f32(-(f32::from(next()) / 1000.0));
            raw.extend_from_slice(&d.to_le_bytes());
            raw.extend_from_slice(&m.to_le_bytes());
            for _ in 0..16 {
                raw.push(next());
            }
        }
        raw
    }

    fn vectors(n: usize, cols: usize) -> Vec<f32> {
        (0..n * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 3) as f32))
            .collect()
    }

    #[test]
    fn f16_attention_helpers_match_plain_loops() {
        // Head sizes with and without whole 8- or 32-value chunks; position counts on both
        // sides of the 8-row blocks.
        for (hd, gap) in [(64, 128), (40, 0), (36, 12), (128, 64)] {
            for len in [1, 7, 8, 9, 30] {
                let stride = hd + gap;
                let xs = vectors(1, len * stride);
                let mut rows = Vec::new();
                extend_f16(&mut rows, &xs);
                for (h, x) in rows.iter().zip(&xs) {
                    assert_eq!(*h, f16::from_f32(*x));
                }
                let q = vectors(1, hd + 3)[3..].to_vec();
                let mut got = vec![0f32; len];
                f16_dots(&q, &rows, stride, 0.5, &mut got);
                for (p, g) in got.iter().enumerate() {
                    let row = &rows[p * stride..];
                    let want = q.iter().zip(row).map(|(a, b)| a * b.to_f32()).sum::<f32>() * 0.5;
                    assert!(
                        (g - want).abs() < 1e-4,
                        "hd {hd} len {len} p {p}: {g} vs {want}"
                    );
                }
                let weights = vectors(1, len + 5)[5..].to_vec();
                let mut sum = vec![f32::NAN; hd];
                f16_weighted_sum(&weights, &rows, stride, &mut sum);
                for (d, s) in sum.iter().enumerate() {
                    let want: f32 = (0..len)
                        .map(|p| weights[p] * rows[p * stride + d].to_f32())
                        .sum();
                    assert!(
                        (s - want).abs() < 1e-4,
                        "hd {hd} len {len} d {d}: {s} vs {want}"
                    );
                }
            }
        }
    }

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

    #[test]
    fn f16_rounding_in_bulk_equals_one_by_one() {
        let mut xs: Vec<f32> = (0..1003)
            .map(|i| (i as f32 - 500.0) * 0.137 * (1.0 + (i % 7) as f32).powi(3))
            .collect();
        xs.extend([1e-7, 6.0e-5, 65504.0, 70000.0, -0.0, f32::MIN_POSITIVE]);
        let want: Vec<f32> = xs.iter().map(|x| round_f16(*x)).collect();
        round_to_f16(&mut xs);
        assert_eq!(xs, want);
    }

    #[test]
    fn rejects_a_tensor_of_the_wrong_size() {
        assert!(Q4Matrix::from_q4_1(&[0u8; 40], 1, 32).is_err());
        assert!(Q8Matrix::from_q8_0(&[0u8; 34], 1, 48).is_err());
    }
}
