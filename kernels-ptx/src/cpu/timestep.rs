/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding` computes it:
/// `freq_i = exp(-ln(max_period) * i / (half - shift))`, `emb = scale * t * freq`, then
/// `[sin, cos]` (or `[cos, sin]` when flipped), zero-padded when `dim` is odd.
pub fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f32,
    scale: f32,
    max_period: f32,
    out: &mut [f32],
) {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = -(max_period.ln()) * i as f32 / (half as f32 - downscale_freq_shift);
            exponent.exp()
        })
        .collect();
    for (&t, row) in timesteps.iter().zip(out.chunks_exact_mut(dim)) {
        let (first, rest) = row.split_at_mut(half);
        let (second, pad) = rest.split_at_mut(half);
        for ((a, b), &f) in first.iter_mut().zip(second.iter_mut()).zip(&freqs) {
            let arg = (t * f) * scale;
            let (s, c) = (arg.sin(), arg.cos());
            (*a, *b) = if flip_sin_to_cos { (c, s) } else { (s, c) };
        }
        pad.fill(0.0);
    }
}
