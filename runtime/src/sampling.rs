//! Choosing the next token on the CPU from a row of logits, and deciding when generation stops.
//!
//! [`Sampler`] implements greedy decoding and temperature / top-k / top-p (nucleus) sampling with
//! its own small seeded generator (splitmix64), so a seed gives the same tokens on every machine.
//! [`StopCriteria`] holds stop token ids and stop strings.

/// How to choose a token from a logits row.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `<= 0` (or NaN) means greedy argmax.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits before the softmax; `0` turns this off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability mass is at
    /// least `top_p`; `1.0` (or more) turns this off.
    pub top_p: f32,
    /// Seed of the sampler's random generator.
    pub seed: u64,
}

impl SamplingParams {
    /// Checks the ranges: temperature finite and ≥ 0, top-p in (0, 1]; the message names the
    /// setting and its range.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature {} is not a finite number ≥ 0 (0 is greedy)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "top-p {} is outside (0, 1] (1 keeps every token)",
                self.top_p
            ));
        }
        Ok(())
    }

    /// Greedy decoding: always the highest logit.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Whether these parameters select greedy argmax decoding.
    pub fn is_greedy(&self) -> bool {
        // True for NaN too.
        self.temperature <= 0.0 || self.temperature.is_nan()
    }
}

/// splitmix64: a tiny, fast generator with good statistical quality for sampling.
#[derive(Clone, Debug)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Draws token ids from logits rows according to [`SamplingParams`], with a seeded generator
/// owned by the sampler: the same seed and the same logits give the same sequence of ids.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

/// Greedy argmax: the highest logit, the lowest index on ties; NaN is never chosen over a
/// number. All-NaN (or empty) rows give 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// Orders candidates by descending logit, then ascending index (a total order: no NaN here).
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

impl Sampler {
    /// A sampler with its generator seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = SplitMix64 { state: params.seed };
        Sampler { params, rng }
    }

    /// The parameters this sampler draws with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses a token id from one row of logits.
    ///
    /// temperature <= 0 → greedy argmax (lowest index on ties). Otherwise: scale by
    /// 1/temperature, keep the top_k highest (if top_k > 0), softmax, keep the smallest set whose
    /// probability mass ≥ top_p (nucleus; always keep ≥ 1), renormalize, draw. Deterministic for a
    /// given seed. NaN logits are treated as -inf; `-inf` logits are never drawn unless every
    /// logit is `-inf` or NaN, when the result is the argmax rule's (index 0). Greedy decoding does
    /// not advance the generator.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        // Candidates: (id, scaled logit), impossible tokens dropped.
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, &v)| !v.is_nan() && v != f32::NEG_INFINITY)
            .map(|(i, &v)| (i as u32, v * inv_t))
            .collect();
        if cands.is_empty() {
            return argmax(logits);
        }

        let top_p = self.params.top_p;
        let nucleus = top_p < 1.0; // NaN top_p: off.
        let k = self.params.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
            if nucleus {
                cands.sort_unstable_by(by_logit_desc);
            }
        } else if nucleus {
            cands.sort_unstable_by(by_logit_desc);
        }

        // Unnormalized softmax weights. Scaling can overflow to +inf (a tiny temperature): those
        // tokens then share all the mass.
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = if max == f32::INFINITY {
            cands
                .iter()
                .map(|c| if c.1 == f32::INFINITY { 1.0 } else { 0.0 })
                .collect()
        } else {
            cands
                .iter()
                .map(|c| (f64::from(c.1) - f64::from(max)).exp())
                .collect()
        };
        let total: f64 = weights.iter().sum();

        // Nucleus: candidates are sorted, keep the shortest prefix with mass >= top_p.
        let mut keep = weights.len();
        if nucleus {
            let threshold = f64::from(top_p) * total;
            let mut mass = 0.0;
            keep = 1;
            for (i, w) in weights.iter().enumerate() {
                mass += w;
                keep = i + 1;
                if mass >= threshold {
                    break;
                }
            }
        }
        let kept = &weights[..keep];
        let kept_total: f64 = kept.iter().sum();

        let u = self.rng.next_f64() * kept_total;
        let mut acc = 0.0;
        for (i, w) in kept.iter().enumerate() {
            acc += w;
            if u < acc {
                return cands[i].0;
            }
        }
        // Rounding left u at the very top: the last candidate with any weight.
        let last = kept.iter().rposition(|&w| w > 0.0).unwrap_or(0);
        cands[last].0
    }
}

/// Stop conditions for generation: stop token ids and stop strings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopCriteria {
    stop_ids: Vec<u32>,
    stop_strings: Vec<String>,
}

impl StopCriteria {
    /// Stop on any of `stop_ids` or when the generated text contains any of `stop_strings`.
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stop_ids: Vec<u32>, stop_strings: Vec<String>) -> Self {
        let stop_strings = stop_strings.into_iter().filter(|s| !s.is_empty()).collect();
        StopCriteria {
            stop_ids,
            stop_strings,
        }
    }

    /// Whether `id` is a stop token.
    pub fn check_token(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// The byte index in `text` where the earliest stop string starts, if any occurs.
    pub fn find_stop_string(&self, text: &str) -> Option<usize> {
        self.stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// For streaming: the length in bytes of the prefix of `text` that can be shown now because no
    /// stop string can start in it. Assumes `text` contains no complete stop string (check
    /// [`find_stop_string`](Self::find_stop_string) first); what follows the returned length is
    /// a suffix that is the beginning of some stop string and must wait for more text.
    pub fn safe_prefix_len(&self, text: &str) -> usize {
        let mut safe = text.len();
        for s in &self.stop_strings {
            // The longest proper prefix of `s` that `text` ends with.
            for (start, _) in text.char_indices().rev().take(s.chars().count()) {
                if start < safe && s.starts_with(&text[start..]) {
                    safe = start;
                }
            }
        }
        safe
    }

    /// The stop token ids.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The (non-empty) stop strings.
    pub fn stop_strings(&self) -> &[String] {
        &self.stop_strings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    /// A deterministic pseudo-random logits row.
    fn row(n: usize, salt: u64) -> Vec<f32> {
        let mut rng = SplitMix64 { state: salt };
        (0..n)
            .map(|_| (rng.next_f64() * 10.0 - 5.0) as f32)
            .collect()
    }

    #[test]
    fn sampling_greedy_picks_argmax_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.5]), 1);
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, 1.5, 3.0]), 1);
        assert_eq!(s.sample(&[5.0, 5.0]), 0);
        assert_eq!(s.sample(&[f32::NAN, 1.0, f32::NAN, 1.0]), 1);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NEG_INFINITY, -1e30]), 2);
        let mut negative_t = Sampler::new(params(-1.0, 0, 1.0, 3));
        assert_eq!(negative_t.sample(&[0.0, -1.0, 7.0, 6.9]), 2);
        let mut nan_t = Sampler::new(params(f32::NAN, 0, 1.0, 3));
        assert_eq!(nan_t.sample(&[0.0, 8.0, 7.0]), 1);
    }

    #[test]
    fn sampling_same_seed_same_sequence_different_seeds_differ() {
        let logits = row(1000, 7);
        let draw = |seed: u64| -> Vec<u32> {
            let mut s = Sampler::new(params(1.5, 0, 1.0, seed));
            (0..200).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let draw_filtered = |seed: u64| -> Vec<u32> {
            let mut s = Sampler::new(params(0.8, 50, 0.9, seed));
            (0..200).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(draw_filtered(1), draw_filtered(1));
        assert_ne!(draw_filtered(1), draw_filtered(2));
    }

    #[test]
    fn sampling_top_k_1_equals_greedy() {
        let mut greedy = Sampler::new(SamplingParams::greedy());
        for salt in 0..20 {
            let mut logits = row(500, salt);
            if salt % 2 == 0 {
                // A tie for the maximum: the lowest index must win.
                let m = logits.iter().cloned().fold(f32::MIN, f32::max);
                logits[499] = m;
                logits[0] = m;
            }
            let expected = greedy.sample(&logits);
            let mut s = Sampler::new(params(1.0, 1, 1.0, salt));
            for _ in 0..10 {
                assert_eq!(s.sample(&logits), expected);
            }
        }
    }

    #[test]
    fn sampling_tiny_top_p_equals_greedy() {
        let mut greedy = Sampler::new(SamplingParams::greedy());
        for salt in 0..20 {
            let mut logits = row(500, salt + 100);
            if salt % 2 == 0 {
                let m = logits.iter().cloned().fold(f32::MIN, f32::max);
                logits[300] = m;
                logits[7] = m;
            }
            let expected = greedy.sample(&logits);
            for top_p in [1e-6, 0.0] {
                let mut s = Sampler::new(params(2.0, 0, top_p, salt));
                for _ in 0..10 {
                    assert_eq!(s.sample(&logits), expected);
                }
            }
        }
    }

    fn softmax(logits: &[f32]) -> Vec<f64> {
        let m = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn frequencies(s: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn sampling_frequencies_match_softmax() {
        let logits = [1.0f32, 2.0, 0.5, -0.3];
        let expected = softmax(&logits);
        let mut s = Sampler::new(params(1.0, 0, 1.0, 12345));
        let freq = frequencies(&mut s, &logits, 20_000);
        for (f, p) in freq.iter().zip(&expected) {
            assert!(
                (f - p).abs() < 0.02,
                "freq {freq:?} vs softmax {expected:?}"
            );
        }
    }

    #[test]
    fn sampling_temperature_top_k_top_p_shape_the_distribution() {
        let logits = [1.0f32, 2.0, 0.5, -0.3];
        // Temperature 2: softmax of logits / 2.
        let expected = softmax(&logits.map(|l| l / 2.0));
        let mut s = Sampler::new(params(2.0, 0, 1.0, 9));
        let freq = frequencies(&mut s, &logits, 20_000);
        for (f, p) in freq.iter().zip(&expected) {
            assert!((f - p).abs() < 0.02, "freq {freq:?} vs {expected:?}");
        }
        // top_k = 2: only ids 1 and 0, renormalized.
        let expected = softmax(&[1.0, 2.0]);
        let mut s = Sampler::new(params(1.0, 2, 1.0, 10));
        let freq = frequencies(&mut s, &logits, 20_000);
        assert_eq!(freq[2] + freq[3], 0.0);
        assert!((freq[0] - expected[0]).abs() < 0.02, "{freq:?}");
        // top_p = 0.8: probabilities are ~[0.22, 0.59, 0.13, 0.06]; {1, 0} has mass 0.81 ≥ 0.8.
        let mut s = Sampler::new(params(1.0, 0, 0.8, 11));
        let freq = frequencies(&mut s, &logits, 20_000);
        assert_eq!(freq[2] + freq[3], 0.0);
        assert!((freq[0] - expected[0]).abs() < 0.02, "{freq:?}");
    }

    #[test]
    fn sampling_handles_infinities_and_nan() {
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0, f32::NAN];
        for (k, p) in [(0, 1.0), (2, 1.0), (0, 0.5), (3, 0.9)] {
            let mut s = Sampler::new(params(0.7, k, p, 5));
            for _ in 0..1000 {
                let id = s.sample(&logits);
                assert!(id == 1 || id == 3, "drew {id}");
            }
        }
        // All impossible: falls back to index 0 rather than panicking.
        let mut s = Sampler::new(params(1.0, 0, 0.9, 5));
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 4]), 0);
        // A temperature so small that scaling overflows: the maximum wins.
        let mut s = Sampler::new(params(1e-38, 0, 1.0, 5));
        for _ in 0..100 {
            assert_eq!(s.sample(&[1.0, 3.0, 2.0, f32::NEG_INFINITY]), 1);
        }
        // Huge spreads stay finite.
        let mut s = Sampler::new(params(1.0, 0, 0.95, 5));
        for _ in 0..100 {
            assert_eq!(s.sample(&[-1e30, 1e30, f32::MIN, 0.0]), 1);
        }
    }

    #[test]
    fn sampling_stop_criteria() {
        let stop = StopCriteria::new(
            vec![2, 0],
            vec!["</s>".into(), "\n\nUser:".into(), String::new()],
        );
        assert!(stop.check_token(2));
        assert!(stop.check_token(0));
        assert!(!stop.check_token(1));
        assert_eq!(stop.find_stop_string("hello"), None);
        assert_eq!(stop.find_stop_string(""), None);
        assert_eq!(stop.find_stop_string("ab</s>cd\n\nUser:"), Some(2));
        assert_eq!(stop.find_stop_string("é\n\nUser: </s>"), Some(2));
        assert_eq!(stop.stop_strings().len(), 2);
        assert_eq!(stop.stop_ids(), &[2, 0]);
        // Streaming hold-back.
        assert_eq!(stop.safe_prefix_len("hello"), 5);
        assert_eq!(stop.safe_prefix_len("hello</"), 5);
        assert_eq!(stop.safe_prefix_len("hello<"), 5);
        assert_eq!(stop.safe_prefix_len("hi\n\nUs"), 2);
        assert_eq!(stop.safe_prefix_len("hi\n"), 2);
        assert_eq!(stop.safe_prefix_len("日本"), "日本".len());
        assert_eq!(StopCriteria::default().find_stop_string("x"), None);
        assert_eq!(StopCriteria::default().safe_prefix_len("x"), 1);
    }
}
