//! The graph IR shared by the compiler (which produces it) and the executors (which run it).

pub mod dim;
pub mod graph;
pub mod infer;
pub mod op;

pub(crate) use dim::{fmt_shape, same_numel};
pub use dim::{Dim, Shape, Sym, SymValues};
pub use graph::{Graph, GraphError, Node, NodeId, StateBinding};
pub use infer::TensorType;
pub(crate) use infer::{broadcast, check_axis, same_float, MAX_IOTA};
pub use op::{BinaryOp, DType, InputKind, Op, ReduceOp, UnaryOp};
