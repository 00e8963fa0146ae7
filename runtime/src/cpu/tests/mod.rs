//! Tests of the CPU executor against naive references: graphs are built by hand, fed random
//! (never zero) data, and compared with relative L2 error.

#![allow(clippy::type_complexity, clippy::needless_range_loop)]

mod exec;
mod ops;

use super::{CpuExecutor, ExecError, StepOutput};
use crate::ir::{DType, Dim, Graph, InputKind, NodeId, Op, TensorType};
use std::collections::HashMap;

/// A tiny xorshift generator.
pub(super) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Magnitude in `[0.1, 1)`, random sign: never zero.
    pub fn value(&mut self) -> f32 {
        let m = 0.1 + 0.9 * self.unit();
        if self.next() & 1 == 0 {
            m
        } else {
            -m
        }
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }
}

/// `‖got − want‖ / ‖want‖`.
pub(super) fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

#[track_caller]
pub(super) fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let e = rel_l2(got, want);
    assert!(
        e < 1e-5,
        "{what}: relative L2 error {e:e}\n got {:?}\nwant {:?}",
        &got[..got.len().min(8)],
        &want[..want.len().min(8)]
    );
}

pub(super) fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

pub(super) fn dims(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&d| Dim::c(d as i64)).collect()
}

/// Row-major index of `out_idx` in a tensor of `shape` broadcast (right-aligned) to its rank.
pub(super) fn bcast_at(out_idx: &[usize], shape: &[usize]) -> usize {
    let lead = out_idx.len() - shape.len();
    let mut flat = 0;
    for (d, &n) in shape.iter().enumerate() {
        flat = flat * n + if n == 1 { 0 } else { out_idx[lead + d] };
    }
    flat
}

/// All indices of a shape in row-major order.
pub(super) fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut out = vec![];
    let mut idx = vec![0; shape.len()];
    if shape.contains(&0) {
        return out;
    }
    loop {
        out.push(idx.clone());
        let mut d = shape.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Builds test graphs whose data come from weights, either directly (evaluated at construction)
/// or through the token input (evaluated at each step).
pub(super) struct Builder {
    pub g: Graph,
    pub weights: HashMap<String, Vec<f32>>,
    pub rng: Rng,
    tokens: Option<NodeId>,
}

impl Builder {
    pub fn new(seed: u64) -> Builder {
        Builder {
            g: Graph::default(),
            weights: HashMap::new(),
            rng: Rng::new(seed),
            tokens: None,
        }
    }

    pub fn add(&mut self, name: &str, op: Op, inputs: Vec<NodeId>) -> NodeId {
        self.g
            .add(name, op, inputs)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn tokens(&mut self) -> NodeId {
        if let Some(t) = self.tokens {
            return t;
        }
        let ty = TensorType::new(
            DType::I32,
            vec![
                Dim::sym(crate::ir::Sym::Batch),
                Dim::sym(crate::ir::Sym::Seq),
            ],
        );
        let t = self.g.add_leaf(
            "tokens",
            Op::Input {
                kind: InputKind::Tokens,
            },
            ty,
        );
        self.tokens = Some(t);
        t
    }

    /// A weight with the given data.
    pub fn weight_data(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> NodeId {
        assert_eq!(data.len(), numel(shape));
        self.weights.insert(name.to_string(), data);
        self.g.add_leaf(
            name,
            Op::Weight { name: name.into() },
            TensorType::new(DType::F32, dims(shape)),
        )
    }

    /// A random weight.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> (NodeId, Vec<f32>) {
        let data = self.rng.vec(numel(shape));
        (self.weight_data(name, shape, data.clone()), data)
    }

    /// A random value of `shape`: a weight itself, or (when `dynamic`) computed at each step
    /// from the token input (`Gather` of the weight by the tokens, run with one token 0).
    pub fn input(&mut self, name: &str, shape: &[usize], dynamic: bool) -> (NodeId, Vec<f32>) {
        let data = self.rng.vec(numel(shape));
        (self.input_data(name, shape, data.clone(), dynamic), data)
    }

    /// Like [`Builder::input`] with the given data.
    pub fn input_data(
        &mut self,
        name: &str,
        shape: &[usize],
        data: Vec<f32>,
        dynamic: bool,
    ) -> NodeId {
        if !dynamic {
            return self.weight_data(name, shape, data);
        }
        let mut tshape = vec![1];
        tshape.extend_from_slice(shape);
        let table = self.weight_data(&format!("{name}.table"), &tshape, data);
        let tok = self.tokens();
        let g = self.add(&format!("{name}.gather"), Op::Gather, vec![table, tok]);
        let s0 = self.add(
            &format!("{name}.s0"),
            Op::Slice {
                axis: 0,
                start: Dim::c(0),
                end: Dim::c(1),
            },
            vec![g],
        );
        let s1 = self.add(
            &format!("{name}.s1"),
            Op::Slice {
                axis: 1,
                start: Dim::c(0),
                end: Dim::c(1),
            },
            vec![s0],
        );
        self.add(name, Op::Reshape { shape: dims(shape) }, vec![s1])
    }

    pub fn output(&mut self, name: &str, id: NodeId) {
        self.g.outputs.push((name.to_string(), id));
    }

    pub fn build(self) -> CpuExecutor {
        self.try_build().unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_build(self) -> Result<CpuExecutor, ExecError> {
        let weights = self.weights;
        CpuExecutor::new(self.g, |name, shape| {
            let w = weights.get(name).ok_or_else(|| ExecError::Weight {
                name: name.into(),
                message: "missing".into(),
            })?;
            assert_eq!(w.len(), numel(shape), "test weight `{name}`");
            Ok(w.clone())
        })
    }
}

/// One step of one token 0 in a fresh batch-1 session.
pub(super) fn run_once(exec: &CpuExecutor, taps: &[&str]) -> StepOutput {
    let mut s = exec.session(1);
    exec.step(&mut s, &[0], taps)
        .unwrap_or_else(|e| panic!("{e}"))
}
