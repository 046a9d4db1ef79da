//! 16-bit float weights (GGUF F16 and BF16) times f32 vectors: the rows stay 16-bit (half
//! the memory of f32, read once per batch of vectors), widened eight at a time into f32
//! products. Activations are not quantized here. Rows are interleaved in groups of
//! `HALF_ROWS`, eight values of each in turn, so the multiply reads one contiguous stream:
//! a core fetches it about twice as fast as three rows read side by side.
//!
//! Owns: `HalfMatrix`, its row-parallel multiply and the widening. Must never: round the
//! weights (the file's values are used exactly) or know about models.

use rayon::prelude::*;

use super::matrix::{row_tasks, VECTOR_CHUNK};

/// Rows per kernel call.
pub(super) const HALF_ROWS: usize = 3;

/// How the 16 bits of a weight read as a float.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfKind {
    /// IEEE binary16.
    F16,
    /// bfloat16: the top half of an f32.
    Bf16,
}

impl HalfKind {
    pub(super) fn widen(self, bits: u16) -> f32 {
        match self {
            Self::F16 => half::f16::from_bits(bits).to_f32(),
            Self::Bf16 => f32::from_bits(u32::from(bits) << 16),
        }
    }
}

/// A `rows × cols` matrix of 16-bit floats: row by row until `pack` interleaves them.
#[derive(Clone)]
pub struct HalfMatrix {
    pub rows: usize,
    pub cols: usize,
    pub kind: HalfKind,
    values: Vec<u16>,
    /// Whether `values` holds groups of `HALF_ROWS` rows interleaved eight values at a time
    /// (the last group padded with copies of its last row).
    packed: bool,
}

impl HalfMatrix {
    /// From little-endian 16-bit values; rows a multiple of 8 values long.
    pub fn new(raw: &[u8], rows: usize, cols: usize, kind: HalfKind) -> anyhow::Result<Self> {
        if !cols.is_multiple_of(8) {
            anyhow::bail!("rows of {cols} values are not whole groups of 8");
        }
        if raw.len() != rows * cols * 2 {
            anyhow::bail!(
                "tensor holds {} bytes; {rows}×{cols} needs {}",
                raw.len(),
                rows * cols * 2
            );
        }
        let values = raw
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        Ok(Self {
            rows,
            cols,
            kind,
            values,
            packed: false,
        })
    }

    /// Appends the rows of `other` (same width and kind). Call before `pack`.
    pub fn stack(&mut self, other: &Self) -> bool {
        if self.cols != other.cols || self.kind != other.kind || self.packed || other.packed {
            return false;
        }
        self.rows += other.rows;
        self.values.extend_from_slice(&other.values);
        true
    }

    /// Interleaves the rows for the kernel (after any `stack`).
    pub fn pack(&mut self) {
        if self.packed || self.rows == 0 {
            return;
        }
        let cols = self.cols;
        let mut values = Vec::with_capacity(self.rows.div_ceil(HALF_ROWS) * HALF_ROWS * cols);
        for first in (0..self.rows).step_by(HALF_ROWS) {
            let rows: [&[u16]; HALF_ROWS] = std::array::from_fn(|i| {
                let r = (first + i).min(self.rows - 1);
                &self.values[r * cols..(r + 1) * cols]
            });
            values.extend(interleave(rows));
        }
        self.values = values;
        self.packed = true;
    }

    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols;
        if !self.packed {
            let row = &self.values[r * cols..(r + 1) * cols];
            for (o, bits) in out.iter_mut().zip(row) {
                *o = self.kind.widen(*bits);
            }
            return;
        }
        let group = &self.values[r / HALF_ROWS * HALF_ROWS * cols..][..HALF_ROWS * cols];
        let lane = r % HALF_ROWS;
        for (o, chunk) in out
            .chunks_exact_mut(8)
            .zip(group.chunks_exact(8 * HALF_ROWS))
        {
            for (o, bits) in o.iter_mut().zip(&chunk[8 * lane..8 * lane + 8]) {
                *o = self.kind.widen(*bits);
            }
        }
    }

    /// `out[v · rows + r] = row r · vector v` for the `xs.len() / cols` vectors of `xs`.
    pub fn matmul(&self, xs: &[f32], out: &mut Vec<f32>) {
        let (rows, cols) = (self.rows, self.cols);
        let n = xs.len() / cols;
        out.clear();
        out.resize(rows * n, 0.0);
        if n == 0 || rows == 0 {
            return;
        }
        let (per_task, tasks) = row_tasks(out, rows, HALF_ROWS);
        let interleaved;
        let values = if self.packed {
            &self.values
        } else {
            let mut copy = self.clone();
            copy.pack();
            interleaved = copy.values;
            &interleaved
        };
        tasks.into_par_iter().enumerate().for_each(|(t, mut outs)| {
            let task_rows = outs[0].len();
            // As the quantized multiply: a chunk of vectors meets all the task's rows.
            for chunk in (0..n).step_by(VECTOR_CHUNK) {
                let chunk_end = (chunk + VECTOR_CHUNK).min(n);
                let mut local = 0;
                while local < task_rows {
                    let first = t * per_task + local;
                    let take_rows = (task_rows - local).min(HALF_ROWS);
                    let group = &values[first * cols..(first + HALF_ROWS) * cols];
                    let mut v = chunk;
                    while v < chunk_end {
                        let take = (chunk_end - v).min(4);
                        let mut sums = [[0f32; 4]; HALF_ROWS];
                        half_dots_of(self.kind, group, xs, (v, take), &mut sums);
                        for (i, row_sums) in sums.iter().take(take_rows).enumerate() {
                            for (k, sum) in row_sums.iter().take(take).enumerate() {
                                outs[v + k][local + i] = *sum;
                            }
                        }
                        v += take;
                    }
                    local += take_rows;
                }
            }
        });
    }
}

/// `HALF_ROWS` rows interleaved eight values at a time: values `c..c + 8` of each row in
/// turn, then the next eight.
pub(super) fn interleave(rows: [&[u16]; HALF_ROWS]) -> impl Iterator<Item = u16> + '_ {
    let cols = rows[0].len();
    (0..cols).step_by(8).flat_map(move |c| {
        rows.into_iter()
            .flat_map(move |row| row[c..c + 8].iter().copied())
    })
}

/// `take` (1–4) vectors from vector `first` of `xs` against the rows of `group`.
fn half_dots_of(
    kind: HalfKind,
    group: &[u16],
    xs: &[f32],
    (first, take): (usize, usize),
    sums: &mut [[f32; 4]; HALF_ROWS],
) {
    let cols = group.len() / HALF_ROWS;
    let x = |k: usize| &xs[(first + k) * cols..(first + k + 1) * cols];
    match take {
        4 => half_dots::<4>(kind, group, std::array::from_fn(x), sums),
        3 => half_dots::<3>(kind, group, std::array::from_fn(x), sums),
        2 => half_dots::<2>(kind, group, std::array::from_fn(x), sums),
        _ => half_dots::<1>(kind, group, std::array::from_fn(x), sums),
    }
}

/// The `HALF_ROWS` interleaved rows of `group` against `N` vectors.
fn half_dots<const N: usize>(
    kind: HalfKind,
    group: &[u16],
    xs: [&[f32]; N],
    sums: &mut [[f32; 4]; HALF_ROWS],
) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    match kind {
        HalfKind::F16 => super::avx2::half_dots::<N, false>(group, xs, sums),
        HalfKind::Bf16 => super::avx2::half_dots::<N, true>(group, xs, sums),
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    super::portable::half_dots::<N>(kind, group, xs, sums);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::portable;
    use super::super::testdata::vectors;
    use super::*;

    fn random(rows: usize, cols: usize, kind: HalfKind) -> Vec<u8> {
        (0..rows * cols)
            .flat_map(|i| {
                let v = ((i * 7_919 % 2_003) as f32 / 1_001.0 - 1.0) * 0.3;
                match kind {
                    HalfKind::F16 => half::f16::from_f32(v).to_bits(),
                    HalfKind::Bf16 => half::bf16::from_f32(v).to_bits(),
                }
                .to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn half_matmul_matches_the_widened_rows_for_every_batch_size() {
        for kind in [HalfKind::F16, HalfKind::Bf16] {
            for (rows, cols) in [(7, 96), (16, 64), (1, 8), (3, 40)] {
                let raw = random(rows, cols, kind);
                let raw_rows: Vec<u16> = raw
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect();
                let plain = HalfMatrix::new(&raw, rows, cols, kind).unwrap();
                let mut m = plain.clone();
                m.pack();
                let mut row = vec![0f32; cols];
                for n in [1, 2, 3, 4, 5, 9, 37] {
                    let xs = vectors(n, cols);
                    let mut out = Vec::new();
                    m.matmul(&xs, &mut out);
                    for r in 0..rows {
                        m.dequantize_row(r, &mut row);
                        let mut unpacked = vec![0f32; cols];
                        plain.dequantize_row(r, &mut unpacked);
                        assert_eq!(row, unpacked, "{kind:?} {rows}x{cols} row {r}");
                        // The widened values are the file's exactly.
                        let bits = u16::from_le_bytes([raw[2 * r * cols], raw[2 * r * cols + 1]]);
                        assert_eq!(row[0], kind.widen(bits));
                        for v in 0..n {
                            let x = &xs[v * cols..(v + 1) * cols];
                            let exact: f64 = row
                                .iter()
                                .zip(x)
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum();
                            let size: f64 = row
                                .iter()
                                .zip(x)
                                .map(|(a, b)| f64::from((a * b).abs()))
                                .sum();
                            let got = f64::from(out[v * rows + r]);
                            assert!(
                                (got - exact).abs() <= 1e-5 * size + 1e-6,
                                "{kind:?} {rows}x{cols} n={n} r={r} v={v}: {got} vs {exact}"
                            );
                            // The portable kernel agrees.
                            let mut sums = [[0f32; 4]; HALF_ROWS];
                            let row = &raw_rows[r * cols..(r + 1) * cols];
                            let group: Vec<u16> = interleave([row; HALF_ROWS]).collect();
                            portable::half_dots::<1>(kind, &group, [x], &mut sums);
                            assert!((f64::from(sums[0][0]) - exact).abs() <= 1e-5 * size + 1e-6);
                        }
                    }
                }
            }
        }
    }
}
