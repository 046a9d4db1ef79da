//! The encoder's dense layers: `out = epilogue(x · Wᵀ + b)` in f32, with `W` packed once at
//! load into column panels, so a call does no packing and no allocation, and tiny matrices
//! (one short text: ~20 rows) cost their arithmetic and little else.
//!
//! Owns: the packed weight layout, the register-tiled kernels (AVX-512 when the CPU reports
//! it at run time, AVX2/FMA on the build's baseline, plain loops elsewhere) and the split
//! of a product across threads. Must never: allocate per call or read outside the slices
//! it is handed.
//!
//! Layout: columns in groups of [`GROUP`]` × `[`LANES`] (64); within a group, for each input
//! index `kk`, the group's 64 weights for that input are contiguous. A kernel walks `kk`
//! once, keeping a tile of [`ROWS`] rows × 64 columns of sums in registers.

// SIMD intrinsics and the shared output pointer; each use is commented.
#![allow(unsafe_code)]

use rayon::prelude::*;

/// Floats per vector panel (one AVX-512 register).
const LANES: usize = 16;
/// Panels per column group.
const GROUP: usize = 4;
/// Columns per group.
const WIDTH: usize = LANES * GROUP;
/// Rows per register tile.
const ROWS: usize = 6;
/// Rows per parallel task when a product has many rows.
const TASK_ROWS: usize = ROWS * 16;

/// What is done to each sum before it is stored.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// `x · Wᵀ + b`.
    Bias,
    /// `x · Wᵀ + b + residual` (same shape as the output).
    Residual(&'a [f32]),
    /// `f(x · Wᵀ + b)`, `f` applied to a run of values in place.
    Activation(fn(&mut [f32])),
}

/// A weight matrix `[outputs, inputs]` (row-major, as checkpoints store it) with its bias,
/// packed for the kernels.
pub struct Dense {
    packed: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

/// Which kernel this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Avx512,
    Avx2,
    Portable,
}

impl Kernel {
    /// The kernel for `choice`: the best this CPU has for `auto`; an error where the CPU
    /// (or the build) lacks the one asked for.
    pub fn choose(choice: crate::config::CpuKernels) -> anyhow::Result<Self> {
        use crate::config::CpuKernels;
        let best = Self::best();
        let kernel = match choice {
            CpuKernels::Auto => best,
            CpuKernels::Avx512 => Kernel::Avx512,
            CpuKernels::Avx2 => Kernel::Avx2,
            CpuKernels::Portable => Kernel::Portable,
        };
        if !Self::available().contains(&kernel) {
            anyhow::bail!("--cpu-kernels {choice:?}: this CPU or build cannot run {kernel:?} kernels (best here: {best:?})");
        }
        tracing::info!(kernel = ?kernel, "embedding dense kernels");
        Ok(kernel)
    }

    /// The fastest kernel this CPU supports.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Kernel::Avx512;
        }
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        return Kernel::Avx2;
        #[allow(unreachable_code)]
        Kernel::Portable
    }

    /// Every kernel this CPU and build can run.
    fn available() -> Vec<Self> {
        let mut all = vec![Kernel::Portable];
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        all.push(Kernel::Avx2);
        if Self::best() == Kernel::Avx512 {
            all.push(Kernel::Avx512);
        }
        all
    }
}

/// The output pointer shared by tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint (row range × column group) regions only (see `forward`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// A method, so closures capture the whole `Out` (which is `Sync`), not its pointer.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

impl Dense {
    /// Packs `weight` (`outputs × inputs`, row-major) and keeps `bias` (`outputs`).
    pub fn new(weight: &[f32], bias: Vec<f32>, inputs: usize) -> Self {
        let outputs = bias.len();
        assert_eq!(weight.len(), outputs * inputs, "weight shape");
        let groups = outputs.div_ceil(WIDTH);
        let mut packed = vec![0f32; groups * inputs * WIDTH];
        for (g, group) in packed.chunks_exact_mut(inputs * WIDTH).enumerate() {
            for (kk, line) in group.chunks_exact_mut(WIDTH).enumerate() {
                for (c, slot) in line.iter_mut().enumerate() {
                    let col = g * WIDTH + c;
                    if col < outputs {
                        *slot = weight[col * inputs + kk];
                    }
                }
            }
        }
        Self {
            packed,
            bias,
            inputs,
            outputs,
        }
    }

    /// `out = epilogue(x · Wᵀ + b)` for the rows of `x`, with `kernel` (one of
    /// [`Kernel::choose`]'s answers).
    pub fn forward(&self, kernel: Kernel, x: &[f32], epilogue: Epilogue, out: &mut Vec<f32>) {
        let (k, n) = (self.inputs, self.outputs);
        let m = x.len() / k;
        assert_eq!(x.len(), m * k, "input shape");
        if let Epilogue::Residual(r) = epilogue {
            assert_eq!(r.len(), m * n, "residual shape");
        }
        out.clear();
        out.resize(m * n, 0.0);
        if m == 0 {
            return;
        }
        let groups = n.div_ceil(WIDTH);
        let row_tasks = m.div_ceil(TASK_ROWS);
        let ptr = Out(out.as_mut_ptr());
        (0..groups * row_tasks).into_par_iter().for_each(|task| {
            let (g, rt) = (task % groups, task / groups);
            let rows = rt * TASK_ROWS..(m).min((rt + 1) * TASK_ROWS);
            let w = &self.packed[g * k * WIDTH..(g + 1) * k * WIDTH];
            let cols = g * WIDTH..n.min((g + 1) * WIDTH);
            let mut start = rows.start;
            while start < rows.end {
                let end = rows.end.min(start + ROWS);
                // Rows past the end repeat the last one; their sums are dropped.
                let at: [usize; ROWS] = std::array::from_fn(|r| (start + r).min(end - 1) * k);
                let mut acc = [[0f32; WIDTH]; ROWS];
                tile(kernel, x, at, k, w, &mut acc);
                for (r, sums) in acc.iter().take(end - start).enumerate() {
                    let row = start + r;
                    let bias = &self.bias[cols.clone()];
                    // SAFETY: this task alone writes row `row`, columns `cols` (tasks split
                    // rows by `rt` and columns by `g`), and `out` holds `m × n` values.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(ptr.at(row * n + cols.start), cols.len())
                    };
                    let sums = &sums[..cols.len()];
                    match epilogue {
                        Epilogue::Bias => {
                            for ((d, s), b) in dst.iter_mut().zip(sums).zip(bias) {
                                *d = s + b;
                            }
                        }
                        Epilogue::Residual(res) => {
                            let res = &res[row * n + cols.start..row * n + cols.end];
                            for (((d, s), b), r) in dst.iter_mut().zip(sums).zip(bias).zip(res) {
                                *d = s + b + r;
                            }
                        }
                        Epilogue::Activation(f) => {
                            for ((d, s), b) in dst.iter_mut().zip(sums).zip(bias) {
                                *d = s + b;
                            }
                            f(dst);
                        }
                    }
                }
                start = end;
            }
        });
    }
}

/// Sums of one tile: `acc[r][c] = Σ_kk x[at[r] + kk] · w[kk · WIDTH + c]`.
fn tile(
    kernel: Kernel,
    x: &[f32],
    at: [usize; ROWS],
    k: usize,
    w: &[f32],
    acc: &mut [[f32; WIDTH]; ROWS],
) {
    assert!(at.iter().all(|&a| a + k <= x.len()) && w.len() == k * WIDTH);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the guard checks the CPU has AVX-512F; extents asserted above.
        Kernel::Avx512 if std::arch::is_x86_feature_detected!("avx512f") => unsafe {
            tile_avx512(x, at, k, w, acc)
        },
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        // SAFETY: the build targets AVX2/FMA; extents asserted above.
        Kernel::Avx2 => unsafe { tile_avx2(x, at, k, w, acc) },
        _ => tile_portable(x, at, k, w, acc),
    }
}

fn tile_portable(
    x: &[f32],
    at: [usize; ROWS],
    k: usize,
    w: &[f32],
    acc: &mut [[f32; WIDTH]; ROWS],
) {
    for (kk, line) in w.chunks_exact(WIDTH).enumerate().take(k) {
        for (sums, &a) in acc.iter_mut().zip(&at) {
            let v = x[a + kk];
            for (s, wv) in sums.iter_mut().zip(line) {
                *s = v.mul_add(*wv, *s);
            }
        }
    }
}

/// 6 rows × 4 panels = 24 accumulators, 4 weight loads and 6 broadcasts per input.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(
    x: &[f32],
    at: [usize; ROWS],
    k: usize,
    w: &[f32],
    acc: &mut [[f32; WIDTH]; ROWS],
) {
    use std::arch::x86_64::*;
    let mut c = [[_mm512_setzero_ps(); GROUP]; ROWS];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for kk in 0..k {
        // SAFETY (all loads): `kk < k`, `w` holds `k × WIDTH` floats and each `at[r] + kk`
        // is inside `x` (asserted by `tile`).
        let line = wp.add(kk * WIDTH);
        let wv: [__m512; GROUP] = std::array::from_fn(|p| _mm512_loadu_ps(line.add(p * LANES)));
        for (sums, &a) in c.iter_mut().zip(&at) {
            let b = _mm512_set1_ps(*xp.add(a + kk));
            for (s, w) in sums.iter_mut().zip(&wv) {
                *s = _mm512_fmadd_ps(b, *w, *s);
            }
        }
    }
    for (sums, dst) in c.iter().zip(acc.iter_mut()) {
        for (p, s) in sums.iter().enumerate() {
            // SAFETY: `dst` holds WIDTH floats; panel `p` is 16 of them.
            _mm512_storeu_ps(dst.as_mut_ptr().add(p * LANES), *s);
        }
    }
}

/// Per panel: 6 rows × 2 registers = 12 accumulators, as AVX2 has 16 registers.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
unsafe fn tile_avx2(
    x: &[f32],
    at: [usize; ROWS],
    k: usize,
    w: &[f32],
    acc: &mut [[f32; WIDTH]; ROWS],
) {
    use std::arch::x86_64::*;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for p in 0..GROUP {
        let mut c = [[_mm256_setzero_ps(); 2]; ROWS];
        for kk in 0..k {
            // SAFETY (all loads): as in `tile_avx512`; the panel's 16 floats are in the line.
            let line = wp.add(kk * WIDTH + p * LANES);
            let (w0, w1) = (_mm256_loadu_ps(line), _mm256_loadu_ps(line.add(8)));
            for r in 0..ROWS {
                let b = _mm256_set1_ps(*xp.add(at[r] + kk));
                c[r][0] = _mm256_fmadd_ps(b, w0, c[r][0]);
                c[r][1] = _mm256_fmadd_ps(b, w1, c[r][1]);
            }
        }
        for r in 0..ROWS {
            // SAFETY: `acc[r]` holds WIDTH floats; these are panel `p`'s 16.
            let dst = acc[r].as_mut_ptr().add(p * LANES);
            _mm256_storeu_ps(dst, c[r][0]);
            _mm256_storeu_ps(dst.add(8), c[r][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every kernel against a plain f64 product, for shapes with partial tiles, partial
    /// groups and several row tasks, with each epilogue.
    #[test]
    fn every_kernel_equals_the_plain_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let shapes = [
            (1, 7, 5),
            (5, 40, 37),
            (20, 384, 96),
            (7, 130, 64),
            (TASK_ROWS + 13, 70, 33),
        ];
        for (m, n, k) in shapes {
            let weight: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let res: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let dense = Dense::new(&weight, bias.clone(), k);
            let want: Vec<f64> = (0..m * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    let dot: f64 = (0..k)
                        .map(|kk| f64::from(x[r * k + kk]) * f64::from(weight[c * k + kk]))
                        .sum();
                    dot + f64::from(bias[c])
                })
                .collect();
            let relu: fn(&mut [f32]) = |xs| xs.iter_mut().for_each(|v| *v = v.max(0.0));
            for kernel in Kernel::available() {
                let mut out = Vec::new();
                for (name, epilogue, expect) in [
                    ("bias", Epilogue::Bias, &|_, v: f64| v),
                    ("residual", Epilogue::Residual(&res), &|i: usize, v: f64| {
                        v + f64::from(res[i])
                    }),
                    ("activation", Epilogue::Activation(relu), &|_, v: f64| {
                        v.max(0.0)
                    }),
                ]
                    as [(&str, Epilogue, &dyn Fn(usize, f64) -> f64); 3]
                {
                    dense.forward(kernel, &x, epilogue, &mut out);
                    assert_eq!(out.len(), m * n);
                    for (i, (&got, &w)) in out.iter().zip(&want).enumerate() {
                        let w = expect(i, w);
                        assert!(
                            (f64::from(got) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{kernel:?} {name} ({m}×{n}×{k}) at {i}: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
