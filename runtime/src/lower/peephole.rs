//! Stage 2 of the GPU lowering: the merges that save launches, one pass each, over the steps
//! of stage 1. Each pass keeps what the steps compute and only changes how many launches do it;
//! a merge that does not apply leaves the steps as they were (and a step with no kernel of its
//! own then fails the build in `finish`, naming its node).

use super::{Lowered, Step, Val};
use crate::ir::NodeId;
use crate::plan::{BufId, Buffer, Epilogue, Launch, Norm, Rows};

/// Runs every pass, in order.
pub(super) fn run(l: &mut Lowered) -> Result<(), String> {
    fold_embedding_scale(l);
    rope_append(l)?;
    gather_before_norm(l);
    fold_norms(l);
    Ok(())
}

/// The step that writes `buf`, if any.
fn writer(l: &Lowered, buf: BufId) -> Option<usize> {
    l.steps.iter().position(|s| match s {
        Step::Launch(launch) => crate::plan::Plan::reads_writes(launch).1 == Some(buf),
        Step::Scale { out, .. } | Step::Attention { out, .. } => *out == buf,
        Step::Rope { .. } | Step::Append { .. } => false,
    })
}

/// `embedding · c` (Gemma's `√hidden`): a constant scale of an embedding's rows that nothing
/// else reads becomes the embedding launch's `scale`, writing the scaled rows at once.
fn fold_embedding_scale(l: &mut Lowered) {
    let mut i = 0;
    while i < l.steps.len() {
        if let Step::Scale { x, c, out, .. } = l.steps[i] {
            let embedding = writer(l, x)
                .filter(|&e| matches!(l.steps[e], Step::Launch(Launch::Embedding { .. })));
            if let (Some(e), [_]) = (embedding, l.readers(x).as_slice()) {
                if let Step::Launch(Launch::Embedding {
                    scale, out: eout, ..
                }) = &mut l.steps[e]
                {
                    *scale *= c;
                    // The scaled rows land in the product's buffer (`kiln diff` compares it
                    // with the product's node).
                    *eout = out;
                }
                l.steps.remove(i);
                continue;
            }
        }
        i += 1;
    }
}

/// RoPE on q and k, the k and v cache appends and the attention over them: one `RopeAppend`
/// (q roped in place, k roped and v written into the layer's cache) and one `Attention`, when
/// q, k and v are the column ranges `0..h·d`, `h·d..(h+kh)·d`, `(h+kh)·d..` of one fused QKV
/// projection, roped with one table. Anything else is an error naming the attention.
fn rope_append(l: &mut Lowered) -> Result<(), String> {
    let mut i = 0;
    while i < l.steps.len() {
        let Step::Attention {
            node,
            q,
            k,
            v,
            layer,
            scale,
            window,
            out,
        } = l.steps[i].clone()
        else {
            i += 1;
            continue;
        };
        let dims = l.attention.expect("set by the attention node");
        let (hd, kd) = (dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim);
        let merged = match (&q, &k, &v) {
            (
                Val::Roped {
                    rope: qr,
                    buf: qb,
                    off: 0,
                    freq: qf,
                    ..
                },
                Val::Appended {
                    append: ka,
                    buf: kb,
                    off: ko,
                    rope: Some((kr, kf)),
                },
                Val::Appended {
                    append: va,
                    buf: vb,
                    off: vo,
                    rope: None,
                },
            ) if qb == kb
                && kb == vb
                && *ko == hd
                && *vo == hd + kd
                && qf == kf
                && l.buffers[*qb].cols == hd + 2 * kd =>
            {
                Some((*qb, qf.clone(), [*qr, *kr, *ka, *va]))
            }
            _ => None,
        };
        let Some((qkv, inv_freq, parts)) = merged else {
            return Err(l.err(
                node,
                &format!(
                    "needs q, k, v as column ranges 0, {hd}, {} of one fused QKV projection \
                     with RoPE on q and k; got {q:?}, {k:?}, {v:?}",
                    hd + kd
                ),
            ));
        };
        let part_of = |s: &Step| -> Option<NodeId> {
            match s {
                Step::Rope { node, .. } | Step::Append { node, .. } => Some(*node),
                _ => None,
            }
        };
        let before = l.steps.len();
        l.steps
            .retain(|s| part_of(s).is_none_or(|n| !parts.contains(&n)));
        i -= before - l.steps.len();
        l.steps[i] = Step::Launch(Launch::Attention {
            qkv,
            layer,
            inv_freq: inv_freq.clone(),
            scale,
            window,
            out,
        });
        l.steps.insert(
            i,
            Step::Launch(Launch::RopeAppend {
                qkv,
                layer,
                inv_freq,
            }),
        );
        i += 2;
    }
    Ok(())
}

/// The logits' `GatherLast` of a norm's output that nothing else reads gathers the norm's
/// input instead, and the norm runs on the gathered rows only (RMSNorm is row-wise, so the two
/// commute); `fold_norms` then folds it into the lm_head.
fn gather_before_norm(l: &mut Lowered) {
    for i in 0..l.steps.len() {
        let Step::Launch(Launch::GatherLast {
            x: normed,
            out: last,
        }) = l.steps[i]
        else {
            continue;
        };
        let Some(n) = writer(l, normed) else { continue };
        let Step::Launch(Launch::RmsNorm { x, ref w, eps, .. }) = l.steps[n] else {
            continue;
        };
        if l.readers(normed) != [i] {
            continue;
        }
        let w = w.clone();
        let normed_last = l.buffers.len();
        l.buffers.push(Buffer {
            name: l.buffers[normed].name.clone() + ".last",
            rows: Rows::Sequences,
            ..l.buffers[last].clone()
        });
        l.buffers[last].name = format!("{}.last", l.buffers[x].name);
        for r in l.readers(last) {
            redirect(&mut l.steps[r], last, normed_last);
        }
        l.steps[i] = Step::Launch(Launch::GatherLast { x, out: last });
        l.steps.insert(
            i + 1,
            Step::Launch(Launch::RmsNorm {
                x: last,
                w,
                eps,
                out: normed_last,
            }),
        );
        l.steps.remove(n);
    }
}

/// Makes a `Linear` that reads `from` as its input read `to`.
fn redirect(step: &mut Step, from: BufId, to: BufId) {
    if let Step::Launch(Launch::Linear { x, .. }) = step {
        if *x == from {
            *x = to;
        }
    }
}

/// An `RmsNorm` whose output only projections read (as their input, not as a residual) runs
/// inside them: the one-row GEMV normalizes its input as it loads it, the batched paths run the
/// norm into scratch just before their product. A norm that anything else reads stays a launch.
fn fold_norms(l: &mut Lowered) {
    let mut i = 0;
    while i < l.steps.len() {
        if let Step::Launch(Launch::RmsNorm { x, ref w, eps, out }) = l.steps[i] {
            let readers = l.readers(out);
            let projections = readers.iter().all(|&r| {
                matches!(&l.steps[r], Step::Launch(Launch::Linear { x, norm: None, epilogue, .. })
                    if *x == out && *epilogue != Epilogue::Residual(out))
            });
            if !readers.is_empty() && projections {
                let norm = Norm { w: w.clone(), eps };
                for r in readers {
                    if let Step::Launch(Launch::Linear {
                        x: lx, norm: ln, ..
                    }) = &mut l.steps[r]
                    {
                        *lx = x;
                        *ln = Some(norm.clone());
                    }
                }
                l.steps.remove(i);
                continue;
            }
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Graph;
    use crate::plan::{AttentionDims, BufType};

    fn buf(name: &str, rows: Rows, cols: usize) -> Buffer {
        Buffer {
            name: name.into(),
            rows,
            cols,
            dtype: BufType::Bf16,
            slot: 0,
        }
    }

    fn linear(x: BufId, w: &str, epilogue: Epilogue, out: BufId) -> Step {
        Step::Launch(Launch::Linear {
            x,
            norm: None,
            w: w.into(),
            format: crate::ir::DType::BF16,
            epilogue,
            out,
        })
    }

    fn norm(x: BufId, out: BufId) -> Step {
        Step::Launch(Launch::RmsNorm {
            x,
            w: "n".into(),
            eps: 1e-5,
            out,
        })
    }

    fn lowered(g: &Graph, buffers: Vec<Buffer>, steps: Vec<Step>) -> Lowered<'_> {
        Lowered {
            g,
            buffers,
            steps,
            attention: Some(AttentionDims {
                heads: 2,
                kv_heads: 1,
                head_dim: 32,
            }),
            layers: 1,
            logits: 0,
        }
    }

    /// A norm read by two projections folds into both; a norm that a residual add also reads
    /// stays a launch.
    #[test]
    fn norms_fold_into_the_projections_that_alone_read_them() {
        let g = Graph::default();
        let t = |n| buf(n, Rows::Tokens, 64);
        let steps = vec![
            norm(0, 1),
            linear(1, "a", Epilogue::None, 2),
            linear(1, "b", Epilogue::None, 3),
        ];
        let mut l = lowered(&g, vec![t("x"), t("n"), t("a"), t("b")], steps);
        fold_norms(&mut l);
        assert_eq!(l.steps.len(), 2);
        for s in &l.steps {
            let Step::Launch(Launch::Linear { x, norm, .. }) = s else {
                panic!("{s:?}")
            };
            assert_eq!((*x, norm.as_ref().map(|n| n.w.as_str())), (0, Some("n")));
        }
        let steps = vec![
            norm(0, 1),
            linear(1, "a", Epilogue::None, 2),
            linear(2, "o", Epilogue::Residual(1), 3),
        ];
        let mut l = lowered(&g, vec![t("x"), t("n"), t("a"), t("o")], steps.clone());
        fold_norms(&mut l);
        assert_eq!(l.steps, steps);
    }

    /// The logits' gather moves before the final norm, which then folds into the lm_head: the
    /// plan gathers the un-normed rows and normalizes only them.
    #[test]
    fn the_logits_gather_moves_before_the_final_norm() {
        let g = Graph::default();
        let buffers = vec![
            buf("h", Rows::Tokens, 64),
            buf("norm", Rows::Tokens, 64),
            buf("norm.last", Rows::Sequences, 64),
            buf("logits", Rows::Sequences, 100),
        ];
        let steps = vec![
            norm(0, 1),
            Step::Launch(Launch::GatherLast { x: 1, out: 2 }),
            linear(2, "lm_head", Epilogue::None, 3),
        ];
        let mut l = lowered(&g, buffers, steps);
        gather_before_norm(&mut l);
        fold_norms(&mut l);
        assert_eq!(
            l.steps,
            vec![
                Step::Launch(Launch::GatherLast { x: 0, out: 2 }),
                Step::Launch(Launch::Linear {
                    x: 2,
                    norm: Some(Norm {
                        w: "n".into(),
                        eps: 1e-5
                    }),
                    w: "lm_head".into(),
                    format: crate::ir::DType::BF16,
                    epilogue: Epilogue::None,
                    out: 3,
                }),
            ]
        );
        assert_eq!(l.buffers[2].name, "h.last");
    }

    /// A constant scale folds into the embedding it reads; a scale of anything else stays (and
    /// `finish` refuses it by name).
    #[test]
    fn an_embedding_scale_folds_into_the_embedding() {
        let g = Graph::default();
        let t = |n| buf(n, Rows::Tokens, 64);
        let embedding = Step::Launch(Launch::Embedding {
            table: "e".into(),
            scale: 1.0,
            out: 0,
        });
        let scale = |x, out| Step::Scale {
            node: 0,
            x,
            c: 8.0,
            out,
        };
        let mut l = lowered(
            &g,
            vec![t("e"), t("x")],
            vec![embedding.clone(), scale(0, 1)],
        );
        fold_embedding_scale(&mut l);
        assert_eq!(
            l.steps,
            vec![Step::Launch(Launch::Embedding {
                table: "e".into(),
                scale: 8.0,
                out: 1
            })]
        );
        let steps = vec![norm(0, 1), scale(1, 2)];
        let mut l = lowered(&g, vec![t("e"), t("n"), t("x")], steps.clone());
        fold_embedding_scale(&mut l);
        assert_eq!(l.steps, steps);
    }

    /// RoPE of q and k and the two appends merge with the attention into `RopeAppend` +
    /// `Attention` when q, k, v are the fused projection's column ranges; k and v swapped is an
    /// error naming the attention.
    #[test]
    fn rope_and_appends_merge_into_rope_append() {
        let mut g = Graph::default();
        g.nodes.push(crate::ir::Node {
            name: "attn".into(),
            op: crate::ir::Op::FusedAttention {
                scale: 0.125,
                window: 0,
                softcap: 0.0,
            },
            inputs: vec![],
            ty: crate::ir::TensorType::new(crate::ir::DType::BF16, vec![]),
        });
        // heads 2, kv heads 1, head dim 32: q 0..64, k 64..96, v 96..128.
        let buffers = vec![buf("qkv", Rows::Tokens, 128), buf("attn", Rows::Tokens, 64)];
        let (qr, kr, ka, va) = (10, 11, 12, 13);
        let roped = |rope, off, len| Val::Roped {
            rope,
            buf: 0,
            off,
            len,
            freq: "f".into(),
        };
        let steps = |k_off: usize, v_off: usize| {
            vec![
                Step::Rope {
                    node: qr,
                    buf: 0,
                    off: 0,
                    len: 64,
                },
                Step::Rope {
                    node: kr,
                    buf: 0,
                    off: k_off,
                    len: 32,
                },
                Step::Append {
                    node: ka,
                    buf: 0,
                    off: k_off,
                    len: 32,
                },
                Step::Append {
                    node: va,
                    buf: 0,
                    off: v_off,
                    len: 32,
                },
                Step::Attention {
                    node: 0,
                    q: roped(qr, 0, 64),
                    k: Val::Appended {
                        append: ka,
                        buf: 0,
                        off: k_off,
                        rope: Some((kr, "f".into())),
                    },
                    v: Val::Appended {
                        append: va,
                        buf: 0,
                        off: v_off,
                        rope: None,
                    },
                    layer: 0,
                    scale: 0.125,
                    window: 0,
                    out: 1,
                },
            ]
        };
        let mut l = lowered(&g, buffers.clone(), steps(64, 96));
        rope_append(&mut l).unwrap();
        assert_eq!(
            l.steps,
            vec![
                Step::Launch(Launch::RopeAppend {
                    qkv: 0,
                    layer: 0,
                    inv_freq: "f".into()
                }),
                Step::Launch(Launch::Attention {
                    qkv: 0,
                    layer: 0,
                    inv_freq: "f".into(),
                    scale: 0.125,
                    window: 0,
                    out: 1
                }),
            ]
        );
        let mut l = lowered(&g, buffers, steps(96, 64));
        let err = rope_append(&mut l).unwrap_err();
        assert!(
            err.contains("`attn`") && err.contains("column ranges 0, 64, 96"),
            "{err}"
        );
    }
}
