//! Each op against a naive reference, on weight-only (folded at load) and step-time inputs.

use super::*;
use crate::ir::{BinaryOp, ReduceOp, UnaryOp};

fn naive_binary(
    a: &[f32],
    sa: &[usize],
    b: &[f32],
    sb: &[usize],
    f: impl Fn(f32, f32) -> f32,
) -> (Vec<usize>, Vec<f32>) {
    let rank = sa.len().max(sb.len());
    let pad = |s: &[usize]| [vec![1; rank - s.len()], s.to_vec()].concat();
    let (pa, pb) = (pad(sa), pad(sb));
    let out: Vec<usize> = (0..rank).map(|i| pa[i].max(pb[i])).collect();
    let v = indices(&out)
        .iter()
        .map(|ix| f(a[bcast_at(ix, sa)], b[bcast_at(ix, sb)]))
        .collect();
    (out, v)
}

/// `a[…, m, k] · b[…, k, n]` by definition, in f64.
pub(super) fn naive_matmul(
    a: &[f32],
    sa: &[usize],
    b: &[f32],
    sb: &[usize],
) -> (Vec<usize>, Vec<f32>) {
    let (ra, rb) = (sa.len(), sb.len());
    let (m, k, n) = (sa[ra - 2], sa[ra - 1], sb[rb - 1]);
    let (la, lb) = (&sa[..ra - 2], &sb[..rb - 2]);
    let rank = la.len().max(lb.len());
    let pad = |s: &[usize]| [vec![1; rank - s.len()], s.to_vec()].concat();
    let batch: Vec<usize> = pad(la)
        .iter()
        .zip(pad(lb))
        .map(|(&x, y)| x.max(y))
        .collect();
    let mut out = vec![];
    for bi in indices(&batch) {
        let (ao, bo) = (bcast_at(&bi, la) * m * k, bcast_at(&bi, lb) * k * n);
        for i in 0..m {
            for j in 0..n {
                out.push(
                    (0..k)
                        .map(|p| a[ao + i * k + p] as f64 * b[bo + p * n + j] as f64)
                        .sum::<f64>() as f32,
                );
            }
        }
    }
    (batch.into_iter().chain([m, n]).collect(), out)
}

#[test]
fn unary_ops_match_reference() {
    let ops: [(UnaryOp, fn(f64) -> f64); 7] = [
        (UnaryOp::Neg, |x| -x),
        (UnaryOp::Exp, f64::exp),
        (UnaryOp::Sqrt, f64::sqrt),
        (UnaryOp::Rsqrt, |x| 1.0 / x.sqrt()),
        (UnaryOp::Recip, |x| 1.0 / x),
        (UnaryOp::Sin, f64::sin),
        (UnaryOp::Cos, f64::cos),
    ];
    for dynamic in [false, true] {
        let mut b = Builder::new(1);
        let (x, xv) = b.input("x", &[3, 5], dynamic);
        let pv: Vec<f32> = xv.iter().map(|v| v.abs()).collect();
        let p = b.input_data("p", &[3, 5], pv.clone(), dynamic);
        for (op, _) in ops {
            // The roots get positive inputs.
            let arg = if matches!(op, UnaryOp::Sqrt | UnaryOp::Rsqrt) {
                p
            } else {
                x
            };
            let y = b.add(&format!("{op:?}"), Op::Unary(op), vec![arg]);
            b.output(&format!("{op:?}"), y);
        }
        let out = run_once(&b.build(), &[]);
        for (op, f) in ops {
            let arg = if matches!(op, UnaryOp::Sqrt | UnaryOp::Rsqrt) {
                &pv
            } else {
                &xv
            };
            let want: Vec<f32> = arg.iter().map(|&v| f(v as f64) as f32).collect();
            let got = &out.outputs[&format!("{op:?}")];
            assert_eq!(got.shape, vec![3, 5]);
            assert_close(&got.data, &want, &format!("{op:?} dynamic={dynamic}"));
        }
    }
}

#[test]
fn binary_ops_broadcast_like_numpy() {
    let cases: [(&[usize], &[usize]); 6] = [
        (&[2, 3, 4], &[2, 3, 4]),
        (&[2, 3, 4], &[4]),
        (&[2, 3, 4], &[3, 1]),
        (&[2, 1, 4], &[3, 1]),
        (&[], &[2, 3]),
        (&[5, 1], &[]),
    ];
    let ops: [(BinaryOp, fn(f32, f32) -> f32); 6] = [
        (BinaryOp::Add, |a, b| a + b),
        (BinaryOp::Sub, |a, b| a - b),
        (BinaryOp::Mul, |a, b| a * b),
        (BinaryOp::Div, |a, b| a / b),
        (BinaryOp::Max, f32::max),
        (BinaryOp::Greater, |a, b| (a > b) as i32 as f32),
    ];
    for dynamic in [false, true] {
        for (ci, (sa, sb)) in cases.iter().enumerate() {
            let mut b = Builder::new(10 + ci as u64);
            let (x, xv) = b.input("x", sa, dynamic);
            let (y, yv) = b.input("y", sb, !dynamic);
            let mut want = vec![];
            for (op, f) in ops {
                let z = b.add(&format!("{op:?}"), Op::Binary(op), vec![x, y]);
                b.output(&format!("{op:?}"), z);
                want.push((op, naive_binary(&xv, sa, &yv, sb, f)));
            }
            // Pow on positive bases: |x| = Sqrt(x·x).
            let xx = b.add("xx", Op::Binary(BinaryOp::Mul), vec![x, x]);
            let ax = b.add("ax", Op::Unary(UnaryOp::Sqrt), vec![xx]);
            let p = b.add("pow", Op::Binary(BinaryOp::Pow), vec![ax, y]);
            b.output("pow", p);
            let out = run_once(&b.build(), &[]);
            for (op, (shape, w)) in want {
                let got = &out.outputs[&format!("{op:?}")];
                assert_eq!(got.shape, shape, "{op:?} {sa:?} {sb:?}");
                assert_close(
                    &got.data,
                    &w,
                    &format!("{op:?} {sa:?} {sb:?} dynamic={dynamic}"),
                );
            }
            let (_, w) = naive_binary(&xv, sa, &yv, sb, |a, b| a.abs().powf(b));
            assert_close(&out.outputs["pow"].data, &w, &format!("Pow {sa:?} {sb:?}"));
        }
    }
}

#[test]
fn strided_operands_and_where() {
    for dynamic in [false, true] {
        let mut b = Builder::new(3);
        let (x, xv) = b.input("x", &[4, 3], dynamic); // used as xᵀ [3, 4]
        let (y, yv) = b.input("y", &[3, 4], dynamic);
        let xt = b.add("xt", Op::Transpose { perm: vec![1, 0] }, vec![x]);
        let s = b.add("sum", Op::Binary(BinaryOp::Add), vec![xt, y]);
        let c = b.add("cond", Op::Binary(BinaryOp::Greater), vec![xt, y]);
        let (z, zv) = b.input("z", &[4], dynamic);
        let w = b.add("where", Op::Where, vec![c, s, z]);
        b.output("sum", s);
        b.output("where", w);
        let out = run_once(&b.build(), &[]);
        let xtv: Vec<f32> = indices(&[3, 4])
            .iter()
            .map(|i| xv[i[1] * 3 + i[0]])
            .collect();
        let sum: Vec<f32> = xtv.iter().zip(&yv).map(|(a, b)| a + b).collect();
        assert_close(&out.outputs["sum"].data, &sum, "xᵀ + y");
        let want: Vec<f32> = (0..12)
            .map(|i| if xtv[i] > yv[i] { sum[i] } else { zv[i % 4] })
            .collect();
        assert_eq!(out.outputs["where"].data, want);
    }
}

#[test]
fn reductions_and_softmax_on_every_axis() {
    let shape = [3, 4, 5];
    for dynamic in [false, true] {
        for axis in 0..3 {
            let mut b = Builder::new(20 + axis as u64);
            let (x, xv) = b.input("x", &shape, dynamic);
            for (op, keep) in [
                (ReduceOp::Sum, false),
                (ReduceOp::Mean, true),
                (ReduceOp::Max, false),
            ] {
                let r = b.add(
                    &format!("{op:?}"),
                    Op::Reduce {
                        op,
                        axis,
                        keep_dim: keep,
                    },
                    vec![x],
                );
                b.output(&format!("{op:?}"), r);
            }
            let sm = b.add("softmax", Op::Softmax { axis }, vec![x]);
            b.output("softmax", sm);
            let out = run_once(&b.build(), &[]);
            let mut rshape = shape.to_vec();
            rshape[axis] = 1;
            let line = |ix: &[usize]| -> Vec<f32> {
                (0..shape[axis])
                    .map(|j| {
                        let mut i = ix.to_vec();
                        i[axis] = j;
                        xv[(i[0] * 4 + i[1]) * 5 + i[2]]
                    })
                    .collect()
            };
            let red = |f: &dyn Fn(&[f32]) -> f32| {
                indices(&rshape)
                    .iter()
                    .map(|ix| f(&line(ix)))
                    .collect::<Vec<f32>>()
            };
            assert_close(&out.outputs["Sum"].data, &red(&|l| l.iter().sum()), "Sum");
            assert_close(
                &out.outputs["Mean"].data,
                &red(&|l| l.iter().sum::<f32>() / l.len() as f32),
                "Mean",
            );
            assert_eq!(out.outputs["Mean"].shape, rshape);
            assert_eq!(
                out.outputs["Max"].data,
                red(&|l| l.iter().copied().fold(f32::MIN, f32::max))
            );
            let want: Vec<f32> = indices(&shape)
                .iter()
                .map(|ix| {
                    let l = line(ix);
                    let m = l.iter().copied().fold(f32::MIN, f32::max) as f64;
                    let den: f64 = l.iter().map(|&v| (v as f64 - m).exp()).sum();
                    ((xv[(ix[0] * 4 + ix[1]) * 5 + ix[2]] as f64 - m).exp() / den) as f32
                })
                .collect();
            assert_close(
                &out.outputs["softmax"].data,
                &want,
                &format!("softmax axis {axis}"),
            );
        }
    }
}

#[test]
fn softmax_with_masked_entries() {
    let mut b = Builder::new(4);
    let (x, xv) = b.input("x", &[2, 6], true);
    let pos = b.add("pos", Op::Iota { len: Dim::c(6) }, vec![]);
    let three = b.add("three", Op::Iota { len: Dim::c(4) }, vec![]);
    let lim = b.add(
        "lim",
        Op::Slice {
            axis: 0,
            start: Dim::c(3),
            end: Dim::c(4),
        },
        vec![three],
    );
    let mask = b.add("mask", Op::Binary(BinaryOp::Greater), vec![pos, lim]);
    let ninf = b.add(
        "ninf",
        Op::Constant {
            value: f32::NEG_INFINITY,
        },
        vec![],
    );
    let masked = b.add("masked", Op::Where, vec![mask, ninf, x]);
    let sm = b.add("sm", Op::Softmax { axis: 1 }, vec![masked]);
    b.output("sm", sm);
    let out = run_once(&b.build(), &[]);
    for r in 0..2 {
        let row = &xv[r * 6..r * 6 + 4];
        let m = row.iter().copied().fold(f32::MIN, f32::max);
        let den: f32 = row.iter().map(|&v| (v - m).exp()).sum();
        let want: Vec<f32> = (0..6)
            .map(|j| if j < 4 { (row[j] - m).exp() / den } else { 0.0 })
            .collect();
        assert_close(
            &out.outputs["sm"].data[r * 6..r * 6 + 6],
            &want,
            "masked softmax",
        );
        assert!(out.outputs["sm"].data[r * 6 + 4..r * 6 + 6]
            .iter()
            .all(|&v| v == 0.0));
    }
}

/// `x[batch.., m, k] · Wᵀ` for a weight `W[n, k]`, and `x · V` for a row-major `V[k, n]`.
fn check_weight_matmul(lead: &[usize], m: usize, k: usize, n: usize, dynamic: bool) {
    let mut b = Builder::new((m * 1000 + k * 10 + n) as u64);
    let xs: Vec<usize> = lead.iter().copied().chain([m, k]).collect();
    let (x, xv) = b.input("x", &xs, dynamic);
    let (w, wv) = b.weight("w", &[n, k]);
    let wt = b.add("wt", Op::Transpose { perm: vec![1, 0] }, vec![w]);
    let y = b.add("y", Op::MatMul, vec![x, wt]);
    let (v, vv) = b.weight("v", &[k, n]);
    let z = b.add("z", Op::MatMul, vec![x, v]);
    b.output("y", y);
    b.output("z", z);
    let out = run_once(&b.build(), &[]);
    let wtv: Vec<f32> = indices(&[k, n])
        .iter()
        .map(|i| wv[i[1] * k + i[0]])
        .collect();
    let (shape, want) = naive_matmul(&xv, &xs, &wtv, &[k, n]);
    assert_eq!(out.outputs["y"].shape, shape);
    assert_close(
        &out.outputs["y"].data,
        &want,
        &format!("x{xs:?}·Wᵀ[{k},{n}]"),
    );
    let (_, want) = naive_matmul(&xv, &xs, &vv, &[k, n]);
    assert_close(
        &out.outputs["z"].data,
        &want,
        &format!("x{xs:?}·V[{k},{n}]"),
    );
}

#[test]
fn matmul_with_transposed_and_plain_weights() {
    for dynamic in [false, true] {
        check_weight_matmul(&[1], 1, 13, 7, dynamic);
        check_weight_matmul(&[1], 1, 64, 300, dynamic);
        check_weight_matmul(&[], 3, 13, 7, dynamic);
        check_weight_matmul(&[2], 4, 100, 33, dynamic);
        check_weight_matmul(&[1], 37, 13, 7, dynamic);
        check_weight_matmul(&[37], 1, 64, 19, dynamic);
        check_weight_matmul(&[1], 37, 96, 130, dynamic);
        check_weight_matmul(&[1], 1, 1, 5, dynamic);
    }
    // A wide one that the streaming kernel splits across threads.
    check_weight_matmul(&[1], 2, 576, 3000, true);
}

#[test]
fn batched_matmul_broadcasts_leading_axes() {
    let cases: [(&[usize], &[usize]); 5] = [
        (&[2, 3, 4, 5, 6], &[2, 3, 1, 6, 7]), // grouped-query attention: b broadcast over the group
        (&[2, 3, 4, 1, 6], &[2, 3, 1, 6, 9]), // the same at decode (m = 1)
        (&[2, 1, 5, 6], &[3, 6, 7]),
        (&[4, 9, 8], &[4, 8, 10]),
        (&[3, 12, 5], &[1, 5, 2]),
    ];
    for dynamic in [false, true] {
        for (sa, sb) in cases {
            let mut b = Builder::new(sa.len() as u64 * 7 + sb[0] as u64);
            let (x, xv) = b.input("x", sa, dynamic);
            let (y, yv) = b.input("y", sb, dynamic);
            let z = b.add("z", Op::MatMul, vec![x, y]);
            b.output("z", z);
            let out = run_once(&b.build(), &[]);
            let (shape, want) = naive_matmul(&xv, sa, &yv, sb);
            assert_eq!(out.outputs["z"].shape, shape);
            assert_close(&out.outputs["z"].data, &want, &format!("{sa:?}·{sb:?}"));
        }
    }
    // Attention scores against a transposed key view: q[2, 3, 5, 8] · kᵀ where k is [2, 3, 11, 8].
    let mut b = Builder::new(99);
    let (q, qv) = b.input("q", &[2, 3, 5, 8], true);
    let (k, kv) = b.input("k", &[2, 3, 11, 8], true);
    let kt = b.add(
        "kt",
        Op::Transpose {
            perm: vec![0, 1, 3, 2],
        },
        vec![k],
    );
    let s = b.add("s", Op::MatMul, vec![q, kt]);
    b.output("s", s);
    let out = run_once(&b.build(), &[]);
    let ktv: Vec<f32> = indices(&[2, 3, 8, 11])
        .iter()
        .map(|i| kv[((i[0] * 3 + i[1]) * 11 + i[3]) * 8 + i[2]])
        .collect();
    let (_, want) = naive_matmul(&qv, &[2, 3, 5, 8], &ktv, &[2, 3, 8, 11]);
    assert_close(&out.outputs["s"].data, &want, "q·kᵀ");
}

#[test]
fn data_movement_ops() {
    let mut b = Builder::new(5);
    let (t, tv) = b.input("t", &[4, 3], false);
    let ids = b.tokens();
    let g = b.add("g", Op::Gather, vec![t, ids]);
    let (u, uv) = b.input("u", &[2, 3], false);
    let ut = b.add("ut", Op::Transpose { perm: vec![1, 0] }, vec![u]); // [3, 2]
    let tt = b.add("tt", Op::Transpose { perm: vec![1, 0] }, vec![t]); // [3, 4]
    let c = b.add("c", Op::Concat { axis: 1 }, vec![tt, ut]); // [3, 6]
    let sl = b.add(
        "sl",
        Op::Slice {
            axis: 1,
            start: Dim::c(1),
            end: Dim::c(5),
        },
        vec![c],
    ); // [3, 4]
    let r = b.add(
        "r",
        Op::Reshape {
            shape: dims(&[2, 6]),
        },
        vec![sl],
    );
    let h = b.add("h", Op::Cast { dtype: DType::F16 }, vec![r]);
    let bf = b.add("bf", Op::Cast { dtype: DType::BF16 }, vec![r]);
    let back = b.add("back", Op::Cast { dtype: DType::F32 }, vec![bf]);
    for (name, id) in [("g", g), ("r", r), ("h", h), ("back", back)] {
        b.output(name, id);
    }
    let exec = b.build();
    let mut s = exec.session(2);
    let out = exec.step(&mut s, &[3, 0, 1, 3], &[]).unwrap();
    let gw: Vec<f32> = [3, 0, 1, 3]
        .iter()
        .flat_map(|&i| tv[i * 3..i * 3 + 3].to_vec())
        .collect();
    assert_eq!(out.outputs["g"].shape, vec![2, 2, 3]);
    assert_eq!(out.outputs["g"].data, gw);
    let cw: Vec<f32> = indices(&[3, 6])
        .iter()
        .map(|i| {
            if i[1] < 4 {
                tv[i[1] * 3 + i[0]]
            } else {
                uv[(i[1] - 4) * 3 + i[0]]
            }
        })
        .collect();
    let rw: Vec<f32> = indices(&[3, 4])
        .iter()
        .map(|i| cw[i[0] * 6 + i[1] + 1])
        .collect();
    assert_eq!(out.outputs["r"].data, rw);
    let hw: Vec<f32> = rw
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    assert_eq!(out.outputs["h"].data, hw);
    let bw: Vec<f32> = rw
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(out.outputs["back"].data, bw);
    assert_ne!(hw, rw, "rounding happened");
}

/// Tensors large enough to be split across threads and to have their buffers recycled within
/// the step (a recycled buffer holds old values, so every kernel must write all of its output).
#[test]
fn large_tensors_take_the_parallel_and_pooled_paths() {
    let (a, s, d) = (4, 150, 128);
    let mut b = Builder::new(77);
    let (x, xv) = b.input("x", &[a, s, d], true);
    let (r, rv) = b.input("r", &[s, 1], true);
    let e = b.add("e", Op::Unary(UnaryOp::Exp), vec![x]); // x is read again: a new buffer
    let y = b.add("y", Op::Binary(BinaryOp::Add), vec![e, r]); // in place, r broadcast
    let xt = b.add(
        "xt",
        Op::Transpose {
            perm: vec![0, 2, 1],
        },
        vec![x],
    ); // [a, d, s]
    let half = b.add("half", Op::Constant { value: 0.5 }, vec![]);
    let z = b.add("z", Op::Binary(BinaryOp::Mul), vec![xt, half]); // strided input
    let zt = b.add(
        "zt",
        Op::Transpose {
            perm: vec![0, 2, 1],
        },
        vec![z],
    ); // back to [a, s, d]
    let w = b.add("w", Op::Binary(BinaryOp::Sub), vec![y, zt]);
    let c = b.add("c", Op::Binary(BinaryOp::Greater), vec![w, x]);
    let sel = b.add("sel", Op::Where, vec![c, x, w]);
    let sm = b.add("sm", Op::Softmax { axis: 1 }, vec![sel]);
    let cat = b.add("cat", Op::Concat { axis: 2 }, vec![sm, y]);
    let back = b.add("back", Op::Cast { dtype: DType::BF16 }, vec![cat]);
    b.output("back", back);
    b.output("sm", sm);
    let out = run_once(&b.build(), &[]);
    let at = |i: usize, j: usize, k: usize| (i * s + j) * d + k;
    let yv: Vec<f32> = indices(&[a, s, d])
        .iter()
        .map(|ix| xv[at(ix[0], ix[1], ix[2])].exp() + rv[ix[1]])
        .collect();
    let wv: Vec<f32> = (0..a * s * d).map(|i| yv[i] - xv[i] * 0.5).collect();
    let selv: Vec<f32> = (0..a * s * d)
        .map(|i| if wv[i] > xv[i] { xv[i] } else { wv[i] })
        .collect();
    let mut smv = vec![0f32; a * s * d];
    for i in 0..a {
        for k in 0..d {
            let col: Vec<f64> = (0..s).map(|j| selv[at(i, j, k)] as f64).collect();
            let m = col.iter().copied().fold(f64::MIN, f64::max);
            let den: f64 = col.iter().map(|v| (v - m).exp()).sum();
            for j in 0..s {
                smv[at(i, j, k)] = ((col[j] - m).exp() / den) as f32;
            }
        }
    }
    assert_close(&out.outputs["sm"].data, &smv, "softmax of the chain");
    let catv: Vec<f32> = indices(&[a, s, 2 * d])
        .iter()
        .map(|ix| {
            if ix[2] < d {
                smv[at(ix[0], ix[1], ix[2])]
            } else {
                yv[at(ix[0], ix[1], ix[2] - d)]
            }
        })
        .map(|v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(out.outputs["back"].shape, vec![a, s, 2 * d]);
    // Rounding to bf16 may flip for values within f32 rounding of a tie.
    let e = rel_l2(&out.outputs["back"].data, &catv);
    assert!(e < 1e-4, "bf16 of the concatenation: {e:e}");
}
