//! Build-time quantization that needs more than the weights: calibration of a model on text
//! (`calibrate.rs`), AWQ's activation-aware scale search (`awq.rs`), GPTQ (`gptq.rs`), and the
//! codes a pre-quantized checkpoint already stores (`stored.rs`). The formats themselves
//! (layout, packing, dequantization) are `kiln_runtime::quant`; the rules choosing them are
//! `rewrite/rules/quant.rs`.

pub mod awq;
pub mod calibrate;
pub mod gptq;
pub mod stored;

/// The calibration text shipped with kiln (`data/calib/python-docstrings.txt`, Python standard
/// library docstrings, PSF license): `kiln build --quant int4-awq` uses it unless `--calib` names
/// another.
pub const DEFAULT_CALIBRATION_TEXT: &str =
    include_str!("../../../data/calib/python-docstrings.txt");

/// Calibration settings of a build.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// The text the model runs on.
    pub text: String,
    /// Windows of [`calibrate::WINDOW`] tokens to run (at most).
    pub windows: usize,
    /// Choose int4 codes by GPTQ (`--quant int4-gptq`) instead of rounding to nearest.
    pub gptq: bool,
    /// GPTQ in act-order with static groups (`--act-order`; `gptq::gptq`).
    pub act_order: bool,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            text: DEFAULT_CALIBRATION_TEXT.to_string(),
            windows: 8,
            gptq: false,
            act_order: false,
        }
    }
}

/// The weight a quantized derived weight stores, from its name: `int4g128awq(NAME)` → `NAME`.
pub fn source_name(name: &str, format: kiln_runtime::ir::DType) -> Option<&str> {
    name.strip_prefix(format.name())?
        .strip_prefix('(')?
        .strip_suffix(')')
}

#[cfg(test)]
pub(crate) mod tests {
    use super::source_name;
    use kiln_runtime::ir::DType;

    /// `n` values in [-0.5, 0.5) from a xorshift generator seeded with `seed`.
    pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn source_names_strip_the_format() {
        let f = DType::Int4Awq { group: 128 };
        assert_eq!(
            source_name("int4g128awq(concat0(m.{q,k,v}.weight))", f),
            Some("concat0(m.{q,k,v}.weight)")
        );
        assert_eq!(source_name("int8(m.o.weight)", f), None);
        assert_eq!(source_name("derived:layers.0.qkv", f), None);
    }
}
