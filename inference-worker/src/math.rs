//! Small numeric helpers shared by the chat and embedding models, and the thread set-up
//! both model loops use.
//!
//! Owns: vector arithmetic written so the compiler vectorizes it. Must never: allocate.

/// A dot product in sixteen independent lanes, so the compiler can keep it in vector
/// registers (a plain `sum()` is one long dependency chain).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `x += y`, element-wise.
#[inline]
pub fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Softmax in place, with the caller's `exp` (the models differ in which one matches their
/// reference).
#[inline]
pub fn softmax(xs: &mut [f32], exp: impl Fn(f32) -> f32) {
    let max = xs.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    let mut total = 0.0;
    for x in xs.iter_mut() {
        *x = exp(*x - max);
        total += *x;
    }
    let inv = 1.0 / total;
    xs.iter_mut().for_each(|x| *x *= inv);
}

/// Runs a model's loop on a thread of its own rayon pool (as many threads as the global
/// pool, i.e. `WORKER_THREADS`), so the parallel parts of each step start on threads that
/// are already awake instead of waking a pool from outside it.
pub fn spawn_on_own_pool(name: String, work: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name({
            let name = name.clone();
            move |i| format!("{name}-{i}")
        })
        .build()?;
    std::thread::Builder::new()
        .name(name)
        .spawn(move || pool.install(work))?;
    Ok(())
}
