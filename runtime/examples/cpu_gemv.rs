//! Micro-benchmark of the CPU executor's decode hot path: `x[1, m, k] · W[n, k]ᵀ` through a graph
//! (`Gather` of a row, then `MatMul` with a transposed weight), reporting GB/s of weight reads.
//!
//! `cargo run --release -p kiln-runtime --example cpu_gemv`

use kiln_runtime::cpu::CpuExecutor;
use kiln_runtime::ir::{DType, Dim, Graph, InputKind, Op, Sym, TensorType};
use std::time::Instant;

fn bench(m: usize, k: usize, n: usize, transposed: bool) {
    let mut g = Graph::default();
    let toks = TensorType::new(DType::I32, vec![Dim::sym(Sym::Batch), Dim::sym(Sym::Seq)]);
    let tok = g.add_leaf(
        "tokens",
        Op::Input {
            kind: InputKind::Tokens,
        },
        toks,
    );
    let f32_ty =
        |s: &[usize]| TensorType::new(DType::F32, s.iter().map(|&d| Dim::c(d as i64)).collect());
    let table = g.add_leaf(
        "table",
        Op::Weight {
            name: "table".into(),
        },
        f32_ty(&[16, k]),
    );
    let w_shape = if transposed { [n, k] } else { [k, n] };
    let w = g.add_leaf("w", Op::Weight { name: "w".into() }, f32_ty(&w_shape));
    let x = g.add("x", Op::Gather, vec![table, tok]).unwrap();
    let wt = if transposed {
        g.add("wt", Op::Transpose { perm: vec![1, 0] }, vec![w])
            .unwrap()
    } else {
        w
    };
    let y = g.add("y", Op::MatMul, vec![x, wt]).unwrap();
    g.outputs.push(("y".into(), y));
    let exec = CpuExecutor::new(g, |_, shape| {
        let len: usize = shape.iter().product();
        Ok((0..len)
            .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
            .collect())
    })
    .unwrap();
    let tokens: Vec<i32> = (0..m as i32).map(|i| i % 16).collect();
    let mut session = exec.session(1);
    for _ in 0..3 {
        exec.step(&mut session, &tokens, &[]).unwrap();
    }
    let bytes = (n * k * 4) as f64;
    // About 2 GB of weight reads per shape.
    let flops = (2 * m * n * k) as f64;
    let iters = ((2e9 / bytes).min(2e10 / flops) as usize).clamp(3, 20_000);
    let t = Instant::now();
    for _ in 0..iters {
        let mut s = exec.session(1);
        std::hint::black_box(exec.step(&mut s, &tokens, &[]).unwrap());
    }
    let dt = t.elapsed().as_secs_f64() / iters as f64;
    let rhs = if transposed {
        format!("[{n}, {k}]ᵀ")
    } else {
        format!("[{k}, {n}] ")
    };
    println!(
        "[{m}, {k}] · {rhs}: {:8.1} µs/step, {:6.2} GB/s of weight reads ({:.1} MB), {:6.1} GFLOP/s",
        dt * 1e6,
        bytes / dt / 1e9,
        bytes / 1e6,
        flops / dt / 1e9
    );
}

/// Reference: how fast the threads can just read memory (a sum over 512 MB).
fn read_bandwidth() {
    use rayon::prelude::*;
    let v: Vec<f32> = (0..128 << 20).map(|i| (i % 7) as f32).collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = v
            .par_chunks(1 << 16)
            .map(|c| {
                c.chunks_exact(16)
                    .fold([0f32; 16], |mut a, x| {
                        for j in 0..16 {
                            a[j] += x[j];
                        }
                        a
                    })
                    .iter()
                    .sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "plain parallel read of 512 MB: {:.2} GB/s",
        (v.len() * 4) as f64 / best / 1e9
    );
}

fn main() {
    println!("rayon threads: {}", rayon::current_num_threads());
    read_bandwidth();
    println!("weights stored [out, in] and used transposed (the decode hot path):");
    let nt = [
        (1, 576, 49152),
        (1, 576, 1536),
        (1, 1536, 576),
        (1, 576, 576),
        (1, 576, 192),
        (4, 576, 49152),
        (8, 576, 1536),
        (9, 576, 1536),
        (16, 576, 1536),
    ];
    for (m, k, n) in nt {
        bench(m, k, n, true);
    }
    println!("prefill shapes:");
    for (m, k, n) in [(1340, 576, 1536), (1340, 1536, 576), (128, 576, 576)] {
        bench(m, k, n, true);
    }
    println!("weights stored [in, out]:");
    for (m, k, n) in [
        (1, 576, 49152),
        (4, 576, 49152),
        (8, 576, 1536),
        (9, 576, 1536),
    ] {
        bench(m, k, n, false);
    }
}
