//! The model language's syntax tree, deserialized from RON. `docs/model-language.md` documents
//! every construct and op with its shape rule.

use kiln_runtime::ir::DType;
use serde::Deserialize;

/// A model family file (`models/*.ron`).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename = "Model")]
pub struct ModelFile {
    /// Family name, e.g. `llama`.
    pub family: String,
    /// Parameters, bound in order; later ones may use earlier ones.
    pub params: Vec<(String, Param)>,
    /// Config values the file's math assumes, as `(key, accepted values)`: a config that sets
    /// the key to another value is refused (e.g. `("hidden_act", ["silu"])`); an absent key
    /// passes. Keys are written as in `Config` (`a|b.c`). A file that lists a `rope_type` key
    /// answers for the RoPE scalings it accepts (otherwise scaled RoPE is refused).
    #[serde(default)]
    pub requires: Vec<(String, Vec<String>)>,
    /// Reusable blocks of statements, inlined at each `Call`.
    #[serde(default)]
    pub functions: Vec<Function>,
    /// The model's statements.
    pub body: Vec<Stmt>,
}

/// How a parameter gets its value.
#[derive(Clone, Debug, Deserialize)]
pub enum Param {
    /// A required `config.json` key. `a|b.c` tries `a`, then the nested key `b.c`.
    Config(String),
    /// A `config.json` key, else the default expression.
    ConfigOr(String, String),
    /// An expression over earlier parameters.
    Expr(String),
}

/// A named block of statements with arguments and one result.
#[derive(Clone, Debug, Deserialize)]
pub struct Function {
    /// Name used by `Call`.
    pub name: String,
    /// Argument names, bound to the caller's values.
    pub args: Vec<String>,
    /// Statements.
    pub body: Vec<Stmt>,
    /// The name whose value is the result.
    pub result: String,
}

/// A statement.
#[derive(Clone, Debug, Deserialize)]
pub enum Stmt {
    /// Binds a name to the value of an op.
    Let(String, OpExpr),
    /// Runs `body` `count` times with `index` = 0, 1, …; names rebound inside that already
    /// exist outside are loop-carried; nodes are named `{scope}.{index}.{name}`.
    Repeat {
        /// Parameter expression for the number of iterations.
        count: String,
        /// Name of the integer index, usable in weight names as `{index}`.
        index: String,
        /// Prefix of node names.
        scope: String,
        /// Statements of one iteration.
        body: Vec<Stmt>,
    },
    /// Expands `then` when the parameter expression is non-zero, else `otherwise`.
    If {
        /// Condition (a parameter expression).
        cond: String,
        /// Statements when true.
        then: Vec<Stmt>,
        /// Statements when false.
        #[serde(default)]
        otherwise: Vec<Stmt>,
    },
    /// Declares a named result of a step.
    Output(String, String),
    /// Declares that the state (first name) takes the value of the second name after a step.
    Update(String, String),
}

/// The op on the right of a `Let`. Arguments name values in scope; sizes and constants are
/// expressions (strings).
#[derive(Clone, Debug, Deserialize)]
#[allow(missing_docs)]
pub enum OpExpr {
    /// Token ids `[batch, seq]` i32.
    Tokens,
    /// Positions `[seq]` i32.
    Positions,
    /// A recurrent state (KV cache) of the given shape, f32.
    State(Vec<String>),
    /// A checkpoint tensor: name (with `{param}` substitution) and expected shape.
    Weight(String, Vec<String>),
    /// A scalar f32 constant.
    Const(String),
    /// `0..len` as i32.
    Iota(String),
    Neg(String),
    Exp(String),
    Sqrt(String),
    Rsqrt(String),
    Recip(String),
    Sin(String),
    Cos(String),
    Add(String, String),
    Sub(String, String),
    Mul(String, String),
    Div(String, String),
    Pow(String, String),
    Max(String, String),
    Greater(String, String),
    Where(String, String, String),
    Sum {
        x: String,
        axis: i64,
        #[serde(default = "yes")]
        keep: bool,
    },
    Mean {
        x: String,
        axis: i64,
        #[serde(default = "yes")]
        keep: bool,
    },
    ReduceMax {
        x: String,
        axis: i64,
        #[serde(default = "yes")]
        keep: bool,
    },
    Softmax {
        x: String,
        axis: i64,
    },
    MatMul(String, String),
    Reshape {
        x: String,
        shape: Vec<String>,
    },
    Transpose {
        x: String,
        perm: Vec<usize>,
    },
    Gather(String, String),
    Concat {
        xs: Vec<String>,
        axis: i64,
    },
    Slice {
        x: String,
        axis: i64,
        start: String,
        end: String,
    },
    Cast {
        x: String,
        dtype: DType,
    },
    /// Inlines a function with the given arguments.
    Call(String, Vec<String>),
}

fn yes() -> bool {
    true
}
