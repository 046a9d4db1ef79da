//! Limited-memory BFGS: minimises a smooth function given its value and gradient, as
//! scikit-learn's default solver does for logistic regression. On a convex objective it
//! reaches the optimum in tens of iterations where stochastic steps only approach it.
//!
//! Owns: the search direction (the two-loop recursion over the last few steps) and a
//! backtracking line search. Must never: know what is being minimised.

use std::collections::VecDeque;

/// Curvature pairs kept.
const MEMORY: usize = 10;
/// Stop when no gradient component is larger than this...
const GRADIENT_TOLERANCE: f64 = 1e-5;
/// ...or a step lowers the value by less than this share of it.
const DECREASE_TOLERANCE: f64 = 1e-7;
/// Halvings of a step before the search gives up (the value cannot be lowered further at
/// the precision it is computed in).
const MAX_HALVINGS: usize = 40;

/// Moves `x` towards a minimum of `f`, which writes the gradient at its first argument
/// into its second and returns the value. `after` sees each iteration's number, value and
/// point.
/// Returns the iterations taken.
pub fn minimise(
    x: &mut [f64],
    f: &mut dyn FnMut(&[f64], &mut [f64]) -> f64,
    max_iterations: usize,
    after: &mut dyn FnMut(usize, f64, &[f64]),
) -> usize {
    let n = x.len();
    let mut g = vec![0.0; n];
    let mut value = f(x, &mut g);
    // (s, y, 1 / y·s) of the last steps, oldest first.
    let mut pairs: VecDeque<(Vec<f64>, Vec<f64>, f64)> = VecDeque::new();
    let (mut d, mut next_x, mut next_g) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut alpha = vec![0.0; MEMORY];
    for iteration in 1..=max_iterations {
        if g.iter().all(|v| v.abs() <= GRADIENT_TOLERANCE) {
            return iteration - 1;
        }
        direction(&g, &pairs, &mut alpha, &mut d);
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            // Not a descent direction (curvature lost to rounding): restart from the gradient.
            pairs.clear();
            d.iter_mut().zip(&g).for_each(|(d, g)| *d = -g);
            slope = -dot(&g, &g);
        }
        let mut step = if pairs.is_empty() {
            (1.0 / dot(&g, &g).sqrt()).min(1.0)
        } else {
            1.0
        };
        let mut next_value = f64::INFINITY;
        for _ in 0..MAX_HALVINGS {
            next_x
                .iter_mut()
                .zip(x.iter().zip(&d))
                .for_each(|(n, (x, d))| *n = x + step * d);
            next_value = f(&next_x, &mut next_g);
            // Armijo: the value falls by a fair share of what the slope promised.
            if next_value.is_finite() && next_value <= value + 1e-4 * step * slope {
                break;
            }
            step *= 0.5;
        }
        if !(next_value.is_finite() && next_value <= value + 1e-4 * step * slope) {
            return iteration - 1;
        }
        let s: Vec<f64> = next_x.iter().zip(x.iter()).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = next_g.iter().zip(&g).map(|(a, b)| a - b).collect();
        let ys = dot(&y, &s);
        if ys > 1e-12 {
            if pairs.len() == MEMORY {
                pairs.pop_front();
            }
            pairs.push_back((s, y, 1.0 / ys));
        }
        let decrease = value - next_value;
        x.copy_from_slice(&next_x);
        std::mem::swap(&mut g, &mut next_g);
        value = next_value;
        after(iteration, value, x);
        if decrease <= DECREASE_TOLERANCE * value.abs().max(1.0) {
            return iteration;
        }
    }
    max_iterations
}

/// `d = −H·g`, H the inverse Hessian estimated from `pairs` (two-loop recursion).
fn direction(
    g: &[f64],
    pairs: &VecDeque<(Vec<f64>, Vec<f64>, f64)>,
    alpha: &mut [f64],
    d: &mut [f64],
) {
    d.copy_from_slice(g);
    for (k, (s, y, rho)) in pairs.iter().enumerate().rev() {
        alpha[k] = rho * dot(s, d);
        d.iter_mut().zip(y).for_each(|(d, y)| *d -= alpha[k] * y);
    }
    if let Some((s, y, _)) = pairs.back() {
        let gamma = dot(s, y) / dot(y, y);
        d.iter_mut().for_each(|d| *d *= gamma);
    }
    for (k, (s, y, rho)) in pairs.iter().enumerate() {
        let beta = rho * dot(y, d);
        d.iter_mut()
            .zip(s)
            .for_each(|(d, s)| *d += (alpha[k] - beta) * s);
    }
    d.iter_mut().for_each(|d| *d = -*d);
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ill_conditioned_quadratic_is_solved() {
        // f(x) = Σ c_i (x_i − i)² with curvatures spanning four orders of magnitude.
        let c: Vec<f64> = (0..20).map(|i| 10f64.powf(i as f64 / 5.0)).collect();
        let mut f = |x: &[f64], g: &mut [f64]| {
            let mut v = 0.0;
            for i in 0..x.len() {
                let r = x[i] - i as f64;
                v += c[i] * r * r;
                g[i] = 2.0 * c[i] * r;
            }
            v
        };
        let mut x = vec![0.0; 20];
        let mut values = Vec::new();
        let iterations = minimise(&mut x, &mut f, 500, &mut |_, v, _| values.push(v));
        assert!(iterations < 500, "{iterations}");
        for (i, v) in x.iter().enumerate() {
            assert!((v - i as f64).abs() < 1e-3, "x[{i}] = {v}");
        }
        assert!(values.windows(2).all(|w| w[1] <= w[0]), "{values:?}");
    }

    #[test]
    fn rosenbrock_reaches_its_minimum() {
        let mut f = |x: &[f64], g: &mut [f64]| {
            let (a, b) = (x[0], x[1]);
            g[0] = -2.0 * (1.0 - a) - 400.0 * a * (b - a * a);
            g[1] = 200.0 * (b - a * a);
            (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2)
        };
        let mut x = vec![-1.2, 1.0];
        minimise(&mut x, &mut f, 1000, &mut |_, _, _| {});
        assert!(
            (x[0] - 1.0).abs() < 1e-2 && (x[1] - 1.0).abs() < 2e-2,
            "{x:?}"
        );
    }
}
