//! The e-class analysis: every tensor e-class carries its type (dtype and symbolic shape) and
//! whether its value is a build-time constant (computed from weights and constants only); an
//! attribute e-class carries its attribute.
//!
//! `merge` asserts that two merged classes agree on their type: a rule that equates values of
//! different shapes or dtypes is unsound, and in strict mode (the default, and always in tests) it
//! panics on the spot instead of producing a wrong engine. In permissive mode the conflict is
//! recorded and the phase fails with an error that names it.

use super::lang::{Attr, Node};
use super::ops::{lower, Lowered};
use egg::{Analysis, DidMerge, EGraph, Id, Symbol};
use kiln_runtime::ir::infer::infer;
use kiln_runtime::ir::{DType, InputKind, TensorType};
use std::collections::HashMap;

/// What the analysis knows about a tensor e-class.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Element type and shape.
    pub ty: TensorType,
    /// Computed from weights and constants only (a build-time constant).
    pub konst: bool,
    /// The value, when the class is a literal scalar constant (its bits).
    pub scalar: Option<u32>,
    /// The kind of step input, when the class is one.
    pub input: Option<InputKind>,
}

/// Analysis data of an e-class.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// A tensor value.
    Tensor(TensorInfo),
    /// An attribute leaf.
    Attr(Attr),
}

impl Data {
    /// The tensor info, if this is a tensor class.
    pub fn tensor(&self) -> Option<&TensorInfo> {
        match self {
            Data::Tensor(t) => Some(t),
            Data::Attr(_) => None,
        }
    }
    /// The attribute, if this is an attribute class.
    pub fn attr(&self) -> Option<&Attr> {
        match self {
            Data::Attr(a) => Some(a),
            Data::Tensor(_) => None,
        }
    }
    /// The literal scalar value, if the class is one.
    pub fn scalar(&self) -> Option<f32> {
        self.tensor().and_then(|t| t.scalar).map(f32::from_bits)
    }
    /// The tensor type, if this is a tensor class.
    pub fn ty(&self) -> Option<&TensorType> {
        self.tensor().map(|t| &t.ty)
    }
}

/// Declared types of the leaves (weights and step inputs), by name.
#[derive(Clone, Debug, Default)]
pub struct Leaves {
    /// Weight types by checkpoint (or derived) name.
    pub weights: HashMap<Symbol, TensorType>,
    /// Step inputs by node name.
    pub inputs: HashMap<Symbol, (InputKind, TensorType)>,
}

/// The shape/dtype/constness analysis.
#[derive(Debug, Default)]
pub struct TypeAnalysis {
    /// Leaf types.
    pub leaves: Leaves,
    /// Record type conflicts instead of panicking (see the module doc).
    pub permissive: bool,
    /// Type conflicts seen in permissive mode.
    pub conflicts: Vec<String>,
    /// Rule applications that changed the e-graph: (rule, e-class it rewrote).
    pub applied: Vec<(Symbol, Id)>,
}

/// The e-graph type of kiln.
pub type KilnGraph = EGraph<Node, TypeAnalysis>;

impl TypeAnalysis {
    /// A strict analysis over these leaves.
    pub fn new(leaves: Leaves) -> TypeAnalysis {
        TypeAnalysis {
            leaves,
            ..Default::default()
        }
    }

    /// Reports an unsound merge: a panic in strict mode, a recorded conflict otherwise.
    pub fn conflict(&mut self, message: String) {
        if self.permissive {
            self.conflicts.push(message);
        } else {
            panic!("unsound rewrite: {message}");
        }
    }
}

/// The data of `node` given the data of its children, or why the node is ill-typed.
pub fn node_data(node: &Node, child: &dyn Fn(Id) -> Data, leaves: &Leaves) -> Result<Data, String> {
    let tensor = |ty: TensorType, konst: bool| {
        Data::Tensor(TensorInfo {
            ty,
            konst,
            scalar: None,
            input: None,
        })
    };
    let child_ty = |id: Id| -> Result<TensorType, String> {
        child(id)
            .ty()
            .cloned()
            .ok_or_else(|| "an attribute where a tensor belongs".to_string())
    };
    let child_attr = |id: Id| -> Result<Attr, String> {
        child(id)
            .attr()
            .cloned()
            .ok_or_else(|| "a tensor where an attribute belongs".to_string())
    };
    match node {
        Node::Attr(a) => Ok(Data::Attr(a.clone())),
        Node::Const(c) => Ok(Data::Tensor(TensorInfo {
            ty: TensorType::new(DType::F32, vec![]),
            konst: true,
            scalar: Some(c.0),
            input: None,
        })),
        Node::Weight(w) => leaves
            .weights
            .get(&w.0)
            .map(|ty| tensor(ty.clone(), true))
            .ok_or_else(|| format!("unknown weight `{}`", w.0)),
        Node::Input(i) => {
            let (kind, ty) = leaves
                .inputs
                .get(&i.0)
                .ok_or_else(|| format!("unknown input `{}`", i.0))?;
            Ok(Data::Tensor(TensorInfo {
                ty: ty.clone(),
                konst: false,
                scalar: None,
                input: Some(*kind),
            }))
        }
        Node::Silu(x) => Ok(tensor(child_ty(*x)?, false)),
        Node::RopeAngles([pos, freq]) => {
            let pos = child_ty(*pos)?;
            let freq = child_ty(*freq)?;
            if pos.rank() != 1 || freq.rank() != 1 {
                return Err(format!(
                    "rope_angles of positions {pos}, frequencies {freq}"
                ));
            }
            let shape = vec![pos.shape[0].clone(), freq.shape[0].scale(2)];
            Ok(tensor(TensorType::new(DType::F32, shape), false))
        }
        Node::CausalMask([pos, t]) | Node::WindowMask([pos, t, _]) => {
            let pos = child_ty(*pos)?;
            let Attr::Dim(t) = child_attr(*t)? else {
                return Err("causal_mask needs a dim".into());
            };
            if pos.rank() != 1 {
                return Err(format!("causal_mask of positions {pos}"));
            }
            let shape = vec![pos.shape[0].clone(), t];
            Ok(tensor(TensorType::new(DType::F32, shape), false))
        }
        _ => match lower(node, &|id| child(id))? {
            Lowered::Op(op, inputs) => {
                let datas: Vec<Data> = inputs.iter().map(|&i| child(i)).collect();
                let mut tys = Vec::with_capacity(datas.len());
                for d in &datas {
                    tys.push(d.ty().ok_or("an attribute where a tensor belongs")?);
                }
                let ty = infer(&op, &tys)?;
                let konst =
                    op.is_static() && datas.iter().all(|d| d.tensor().is_some_and(|t| t.konst));
                Ok(tensor(ty, konst))
            }
            Lowered::Leaf | Lowered::Helper | Lowered::Attr => {
                unreachable!("leaves and helpers are handled above")
            }
        },
    }
}

impl Analysis<Node> for TypeAnalysis {
    type Data = Data;

    fn make(egraph: &mut KilnGraph, enode: &Node, _id: Id) -> Data {
        let child = |id: Id| egraph[id].data.clone();
        match node_data(enode, &child, &egraph.analysis.leaves) {
            Ok(d) => d,
            Err(e) => {
                // Only reachable after an unsound merge (appliers type-check what they add).
                egraph
                    .analysis
                    .conflict(format!("ill-typed e-node {enode}: {e}"));
                Data::Tensor(TensorInfo {
                    ty: TensorType::new(DType::F32, vec![]),
                    konst: false,
                    scalar: None,
                    input: None,
                })
            }
        }
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        match (&mut *a, b) {
            (Data::Tensor(x), Data::Tensor(y)) => {
                if x.ty != y.ty {
                    self.conflict(format!("merged e-classes typed {} and {}", x.ty, y.ty));
                    return DidMerge(false, true);
                }
                let konst = x.konst || y.konst;
                let scalar = x.scalar.or(y.scalar);
                let input = x.input.or(y.input);
                let a_changed = konst != x.konst || scalar != x.scalar || input != x.input;
                let b_changed = konst != y.konst || scalar != y.scalar || input != y.input;
                x.konst = konst;
                x.scalar = scalar;
                x.input = input;
                DidMerge(a_changed, b_changed)
            }
            (Data::Attr(x), Data::Attr(y)) if *x == y => DidMerge(false, false),
            (x, y) => {
                self.conflict(format!("merged e-classes {x:?} and {y:?}"));
                DidMerge(false, true)
            }
        }
    }
}
