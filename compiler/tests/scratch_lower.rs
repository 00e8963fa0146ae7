use kiln_compiler::build::{graph_for, model_for};
use kiln_compiler::codegen::lower::lower;
use kiln_compiler::rewrite::{optimize, RewriteOptions};

#[test]
fn scratch() {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/smollm2-135m/config.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let g = graph_for(&model_for(&cfg, None).unwrap(), &cfg).unwrap();
    let o = optimize(&g, &RewriteOptions::default()).unwrap();
    let text = format!("{}", o.graph);
    for l in text
        .lines()
        .filter(|l| l.contains("layers.0.") || !l.contains("layers."))
        .take(80)
    {
        println!("{l}");
    }
    match lower(&o.graph) {
        Ok(p) => println!(
            "PLAN launches {} buffers {} slots {:?}",
            p.launches.len(),
            p.buffers.len(),
            p.slot_row_bytes()
        ),
        Err(e) => println!("LOWER ERR {e}"),
    }
}
