//! The optimized decoder layer of every built-in family other than Llama, on the tiny configs
//! of `tests/fixtures/families/` (where transformers' logits check the same graphs end to end):
//! a snapshot of layer 1 with its kernel count, so what each family fuses — and what it does not
//! yet (Gemma's (1 + w) norm, GPT-2's LayerNorm and biases, windowed masks) — is visible and
//! reviewed.

use super::verified;
use crate::build::graph_for;
use crate::graph::print::text;
use crate::model::{builtin_for, ModelFile};
use crate::rewrite::report::layer_stats;
use crate::rewrite::{optimize, RewriteOptions};

fn optimized_layer(family: &str, config_json: &str) -> String {
    let config: serde_json::Value = serde_json::from_str(config_json).unwrap();
    let model_type = config["model_type"].as_str().unwrap();
    let (name, ron) = builtin_for(model_type).unwrap();
    let model = ModelFile::parse(ron, name).unwrap();
    let g = graph_for(&model, &config).unwrap();
    let out = optimize(&g, &RewriteOptions::default()).unwrap();
    verified(&out.optimized, &g);
    verified(&out.graph, &g);
    let stats = layer_stats(&out.graph, "layers.1.");
    format!(
        "{family} ({name}): kernels per layer: {} ({:?})\nviews: {}, cache appends: {}\n\n{}",
        stats.kernels,
        stats.kernel_ops,
        stats.views,
        stats.cache_appends,
        text(&out.graph, Some("layers.1."))
    )
}

macro_rules! family_layer {
    ($test:ident, $family:literal) => {
        #[test]
        fn $test() {
            let config = include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/families/",
                $family,
                "/config.json"
            ));
            insta::assert_snapshot!(concat!($family, "_layer"), optimized_layer($family, config));
        }
    };
}

family_layer!(llama31_layer, "llama31");
family_layer!(mistral_layer, "mistral");
family_layer!(qwen2_layer, "qwen2");
family_layer!(gemma_layer, "gemma");
family_layer!(gemma2_layer, "gemma2");
family_layer!(phi3_layer, "phi3");
family_layer!(gpt2_layer, "gpt2");
