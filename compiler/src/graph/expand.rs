//! Expansion: a model file plus bound parameters → a typed `Graph`. Repeats are unrolled,
//! functions inlined, sizes evaluated, and every node's type inferred as it is added.

use crate::model::ast::{Function, ModelFile, OpExpr, Stmt};
use crate::model::expr::{Expr, ParamValue, Params};
use crate::model::ModelError;
use kiln_runtime::ir::{
    BinaryOp, DType, Dim, Graph, InputKind, NodeId, Op, ReduceOp, StateBinding, TensorType, UnaryOp,
};
use std::collections::HashMap;

/// The most iterations one `Repeat` may run (a model's layer count).
pub const MAX_REPEAT: i64 = 4096;
/// The most statements an expansion may execute (repeats unrolled, calls inlined), and the most
/// nodes its graph may hold: a 405B Llama is ~10k of each, so these stop a hostile or mistaken
/// file (`Repeat` of 10^12) before it allocates without bound.
pub const MAX_STEPS: usize = 4_000_000;
/// See `MAX_STEPS`.
pub const MAX_NODES: usize = 2_000_000;

struct Expander<'m> {
    family: &'m str,
    functions: HashMap<&'m str, &'m Function>,
    graph: Graph,
    /// Statements executed so far (bounded by `MAX_STEPS`).
    steps: usize,
}

/// Names visible to a statement: a stack of frames, innermost last.
struct Scope {
    frames: Vec<HashMap<String, NodeId>>,
}

impl Scope {
    fn get(&self, name: &str) -> Option<NodeId> {
        self.frames.iter().rev().find_map(|f| f.get(name).copied())
    }
}

/// Expands a parsed model file with bound parameters into a validated graph.
pub fn expand(model: &ModelFile, params: &Params) -> Result<Graph, ModelError> {
    let mut ex = Expander {
        family: &model.family,
        functions: model
            .functions
            .iter()
            .map(|f| (f.name.as_str(), f))
            .collect(),
        graph: Graph::default(),
        steps: 0,
    };
    let mut scope = Scope {
        frames: vec![HashMap::new()],
    };
    ex.stmts(&model.body, &mut scope, params, "", 0)?;
    ex.graph
        .validate()
        .map_err(|e| ex.err("graph", e.to_string()))?;
    if ex.graph.outputs.is_empty() {
        return Err(ex.err("model", "declares no Output".into()));
    }
    Ok(ex.graph)
}

fn axis(a: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    if (-r..r).contains(&a) {
        Ok(((a + r) % r) as usize)
    } else {
        Err(format!("axis {a} out of range for rank {rank}"))
    }
}

fn substitute(template: &str, params: &Params) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in `{template}`"))?
            + open;
        let key = &rest[open + 1..close];
        match params.get(key) {
            Some(ParamValue::Int(i)) => out.push_str(&i.to_string()),
            _ => {
                return Err(format!(
                    "`{{{key}}}` in `{template}` is not an integer parameter"
                ))
            }
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl<'m> Expander<'m> {
    fn err(&self, context: &str, message: String) -> ModelError {
        ModelError::Expand {
            family: self.family.to_string(),
            context: context.to_string(),
            message,
        }
    }

    fn stmts(
        &mut self,
        stmts: &'m [Stmt],
        scope: &mut Scope,
        params: &Params,
        prefix: &str,
        depth: usize,
    ) -> Result<(), ModelError> {
        for stmt in stmts {
            self.stmt(stmt, scope, params, prefix, depth)?;
        }
        Ok(())
    }

    fn lookup(&self, scope: &Scope, name: &str, ctx: &str) -> Result<NodeId, ModelError> {
        scope
            .get(name)
            .ok_or_else(|| self.err(ctx, format!("`{name}` is not defined")))
    }

    fn stmt(
        &mut self,
        stmt: &'m Stmt,
        scope: &mut Scope,
        params: &Params,
        prefix: &str,
        depth: usize,
    ) -> Result<(), ModelError> {
        self.steps += 1;
        if self.steps > MAX_STEPS || self.graph.nodes.len() > MAX_NODES {
            let at = prefix.trim_end_matches('.');
            return Err(self.err(
                if at.is_empty() { "model" } else { at },
                format!(
                    "the model expands to more than {MAX_STEPS} statements or {MAX_NODES} nodes; \
                     check its repeat counts"
                ),
            ));
        }
        match stmt {
            Stmt::Let(name, op) => {
                let ctx = format!("{prefix}{name}");
                if scope.frames.last().is_some_and(|f| f.contains_key(name)) {
                    return Err(
                        self.err(&ctx, format!("`{name}` is already defined in this scope"))
                    );
                }
                let id = self.op(&ctx, op, scope, params, depth)?;
                scope
                    .frames
                    .last_mut()
                    .expect("a frame")
                    .insert(name.clone(), id);
            }
            Stmt::Repeat {
                count,
                index,
                scope: scope_name,
                body,
            } => {
                let n = Expr::parse(count)
                    .and_then(|e| e.eval_dim(params))
                    .map_err(|m| self.err(scope_name, m))?
                    .as_const()
                    .ok_or_else(|| {
                        self.err(
                            scope_name,
                            format!("repeat count `{count}` is not a constant"),
                        )
                    })?;
                if !(1..=MAX_REPEAT).contains(&n) {
                    return Err(self.err(
                        scope_name,
                        format!("repeat count `{count}` = {n} is outside 1..={MAX_REPEAT}"),
                    ));
                }
                for i in 0..n {
                    let mut p = params.clone();
                    p.insert(index.clone(), ParamValue::Int(i));
                    scope.frames.push(HashMap::new());
                    self.stmts(
                        body,
                        scope,
                        &p,
                        &format!("{prefix}{scope_name}.{i}."),
                        depth,
                    )?;
                    let frame = scope.frames.pop().expect("pushed");
                    // Names that existed outside are loop-carried: the iteration's value replaces them.
                    for (name, id) in frame {
                        if let Some(f) = scope
                            .frames
                            .iter_mut()
                            .rev()
                            .find(|f| f.contains_key(&name))
                        {
                            f.insert(name, id);
                        }
                    }
                }
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let c = Expr::parse(cond)
                    .and_then(|e| e.eval_f64(params))
                    .map_err(|m| self.err("If", m))?;
                self.stmts(
                    if c != 0.0 { then } else { otherwise },
                    scope,
                    params,
                    prefix,
                    depth,
                )?;
            }
            Stmt::Output(name, value) => {
                let id = self.lookup(scope, value, &format!("Output {name}"))?;
                self.graph.outputs.push((name.clone(), id));
            }
            Stmt::Update(state, value) => {
                let ctx = format!("Update {state}");
                let input = self.lookup(scope, state, &ctx)?;
                let update = self.lookup(scope, value, &ctx)?;
                if self.graph.nodes[input].op
                    != (Op::Input {
                        kind: InputKind::State,
                    })
                {
                    return Err(self.err(&ctx, format!("`{state}` is not a State")));
                }
                self.graph.states.push(StateBinding { input, update });
            }
        }
        Ok(())
    }

    /// Evaluates sizes; a constant size below zero is an error naming the expression.
    fn dims(&self, ctx: &str, exprs: &[String], params: &Params) -> Result<Vec<Dim>, ModelError> {
        exprs
            .iter()
            .map(|e| {
                let d = Expr::parse(e)
                    .and_then(|x| x.eval_dim(params))
                    .map_err(|m| self.err(ctx, m))?;
                match d.as_const() {
                    Some(v) if v < 0 => Err(self.err(ctx, format!("size `{e}` = {v} is negative"))),
                    _ => Ok(d),
                }
            })
            .collect()
    }

    fn op(
        &mut self,
        ctx: &str,
        op: &'m OpExpr,
        scope: &Scope,
        params: &Params,
        depth: usize,
    ) -> Result<NodeId, ModelError> {
        use OpExpr as E;
        let arg = |name: &String| self.lookup(scope, name, ctx);
        let rank = |g: &Graph, id: NodeId| g.nodes[id].ty.rank();
        let (op, inputs): (Op, Vec<NodeId>) = match op {
            E::Tokens | E::Positions | E::State(_) | E::Weight(..) => {
                let (op, ty) = match op {
                    E::Tokens => (
                        Op::Input {
                            kind: InputKind::Tokens,
                        },
                        TensorType::new(
                            DType::I32,
                            self.dims(ctx, &["batch".into(), "seq".into()], params)?,
                        ),
                    ),
                    E::Positions => (
                        Op::Input {
                            kind: InputKind::Positions,
                        },
                        TensorType::new(DType::I32, self.dims(ctx, &["seq".into()], params)?),
                    ),
                    E::State(shape) => (
                        Op::Input {
                            kind: InputKind::State,
                        },
                        TensorType::new(DType::F32, self.dims(ctx, shape, params)?),
                    ),
                    E::Weight(name, shape) => {
                        let name = substitute(name, params).map_err(|m| self.err(ctx, m))?;
                        let dims = self.dims(ctx, shape, params)?;
                        if let Some(d) = dims.iter().find(|d| d.as_const().is_none()) {
                            return Err(
                                self.err(ctx, format!("weight `{name}` has run-time size {d}"))
                            );
                        }
                        (Op::Weight { name }, TensorType::new(DType::F32, dims))
                    }
                    _ => unreachable!(),
                };
                if matches!(
                    op,
                    Op::Input {
                        kind: InputKind::Tokens | InputKind::Positions
                    }
                ) {
                    if let Some(existing) = self.graph.nodes.iter().position(|n| n.op == op) {
                        return Ok(existing);
                    }
                }
                return Ok(self.graph.add_leaf(ctx, op, ty));
            }
            E::Const(e) => {
                let v = Expr::parse(e)
                    .and_then(|e| e.eval_f64(params))
                    .map_err(|m| self.err(ctx, m))?;
                (Op::Constant { value: v as f32 }, vec![])
            }
            E::Iota(len) => (
                Op::Iota {
                    len: self.dims(ctx, std::slice::from_ref(len), params)?.remove(0),
                },
                vec![],
            ),
            E::Neg(x) => (Op::Unary(UnaryOp::Neg), vec![arg(x)?]),
            E::Exp(x) => (Op::Unary(UnaryOp::Exp), vec![arg(x)?]),
            E::Sqrt(x) => (Op::Unary(UnaryOp::Sqrt), vec![arg(x)?]),
            E::Rsqrt(x) => (Op::Unary(UnaryOp::Rsqrt), vec![arg(x)?]),
            E::Recip(x) => (Op::Unary(UnaryOp::Recip), vec![arg(x)?]),
            E::Sin(x) => (Op::Unary(UnaryOp::Sin), vec![arg(x)?]),
            E::Cos(x) => (Op::Unary(UnaryOp::Cos), vec![arg(x)?]),
            E::Add(a, b) => (Op::Binary(BinaryOp::Add), vec![arg(a)?, arg(b)?]),
            E::Sub(a, b) => (Op::Binary(BinaryOp::Sub), vec![arg(a)?, arg(b)?]),
            E::Mul(a, b) => (Op::Binary(BinaryOp::Mul), vec![arg(a)?, arg(b)?]),
            E::Div(a, b) => (Op::Binary(BinaryOp::Div), vec![arg(a)?, arg(b)?]),
            E::Pow(a, b) => (Op::Binary(BinaryOp::Pow), vec![arg(a)?, arg(b)?]),
            E::Max(a, b) => (Op::Binary(BinaryOp::Max), vec![arg(a)?, arg(b)?]),
            E::Greater(a, b) => (Op::Binary(BinaryOp::Greater), vec![arg(a)?, arg(b)?]),
            E::Where(c, a, b) => (Op::Where, vec![arg(c)?, arg(a)?, arg(b)?]),
            E::Sum { x, axis: a, keep }
            | E::Mean { x, axis: a, keep }
            | E::ReduceMax { x, axis: a, keep } => {
                let id = arg(x)?;
                let reduce = match op {
                    E::Sum { .. } => ReduceOp::Sum,
                    E::Mean { .. } => ReduceOp::Mean,
                    _ => ReduceOp::Max,
                };
                let axis = axis(*a, rank(&self.graph, id)).map_err(|m| self.err(ctx, m))?;
                (
                    Op::Reduce {
                        op: reduce,
                        axis,
                        keep_dim: *keep,
                    },
                    vec![id],
                )
            }
            E::Softmax { x, axis: a } => {
                let id = arg(x)?;
                (
                    Op::Softmax {
                        axis: axis(*a, rank(&self.graph, id)).map_err(|m| self.err(ctx, m))?,
                    },
                    vec![id],
                )
            }
            E::MatMul(a, b) => (Op::MatMul, vec![arg(a)?, arg(b)?]),
            E::Reshape { x, shape } => (
                Op::Reshape {
                    shape: self.dims(ctx, shape, params)?,
                },
                vec![arg(x)?],
            ),
            E::Transpose { x, perm } => (Op::Transpose { perm: perm.clone() }, vec![arg(x)?]),
            E::Gather(table, ids) => (Op::Gather, vec![arg(table)?, arg(ids)?]),
            E::Concat { xs, axis: a } => {
                let ids: Vec<NodeId> = xs.iter().map(arg).collect::<Result<_, _>>()?;
                let first = *ids
                    .first()
                    .ok_or_else(|| self.err(ctx, "Concat of nothing".into()))?;
                (
                    Op::Concat {
                        axis: axis(*a, rank(&self.graph, first)).map_err(|m| self.err(ctx, m))?,
                    },
                    ids,
                )
            }
            E::Slice {
                x,
                axis: a,
                start,
                end,
            } => {
                let id = arg(x)?;
                let axis = axis(*a, rank(&self.graph, id)).map_err(|m| self.err(ctx, m))?;
                let mut se = self.dims(ctx, &[start.clone(), end.clone()], params)?;
                let end = se.pop().expect("two");
                (
                    Op::Slice {
                        axis,
                        start: se.pop().expect("two"),
                        end,
                    },
                    vec![id],
                )
            }
            E::Cast { x, dtype } => (Op::Cast { dtype: *dtype }, vec![arg(x)?]),
            E::Call(name, args) => return self.call(ctx, name, args, scope, params, depth),
        };
        self.graph
            .add(ctx, op, inputs)
            .map_err(|e| self.err(ctx, e.to_string()))
    }

    fn call(
        &mut self,
        ctx: &str,
        name: &str,
        args: &[String],
        scope: &Scope,
        params: &Params,
        depth: usize,
    ) -> Result<NodeId, ModelError> {
        let f = *self
            .functions
            .get(name)
            .ok_or_else(|| self.err(ctx, format!("unknown function `{name}`")))?;
        if depth > 32 {
            return Err(self.err(ctx, format!("function `{name}` recurses too deeply")));
        }
        if f.args.len() != args.len() {
            return Err(self.err(
                ctx,
                format!(
                    "`{name}` takes {} argument(s), got {}",
                    f.args.len(),
                    args.len()
                ),
            ));
        }
        let mut frame = HashMap::new();
        for (param, a) in f.args.iter().zip(args) {
            frame.insert(param.clone(), self.lookup(scope, a, ctx)?);
        }
        let first_new = self.graph.nodes.len();
        let mut inner = Scope {
            frames: vec![frame],
        };
        self.stmts(&f.body, &mut inner, params, &format!("{ctx}."), depth + 1)?;
        let result = self.lookup(&inner, &f.result, &format!("{ctx} (result of `{name}`)"))?;
        if result >= first_new {
            self.graph.nodes[result].name = ctx.to_string();
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{params::bind, ModelFile, LLAMA_RON};

    fn smollm_config() -> serde_json::Value {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/smollm2-135m/config.json"
        ))
        .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn llama_expands_for_smollm2() {
        let model = ModelFile::parse(LLAMA_RON, "llama.ron").unwrap();
        let params = bind(&model.params, &smollm_config()).unwrap();
        let g = expand(&model, &params).unwrap();
        assert_eq!(g.states.len(), 60);
        assert_eq!(g.weights().count(), 2 + 30 * 9);
        let logits = g.output("logits").unwrap();
        assert_eq!(g.nodes[logits].ty.to_string(), "f32[batch, seq, 49152]");
        let x0 = g.find("layers.0.x").unwrap();
        assert_eq!(g.nodes[x0].ty.to_string(), "f32[batch, seq, 576]");
        assert!(g.find("layers.29.h").is_some());
    }

    #[test]
    fn undefined_names_and_bad_shapes_are_reported() {
        let text = r#"Model(family: "t", params: [("n", Expr("4"))], body: [
            Let("w", Weight("w", ["n", "n"])),
            Let("y", MatMul("w", "nope")),
            Output("y", "y"),
        ])"#;
        let m = ModelFile::parse(text, "t.ron").unwrap();
        let err = expand(&m, &bind(&m.params, &serde_json::json!({})).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`nope` is not defined"), "{err}");
        let text = r#"Model(family: "t", params: [("n", Expr("4"))], body: [
            Let("w", Weight("w", ["n", "n"])),
            Let("v", Weight("v", ["3", "n"])),
            Let("y", MatMul("w", "v")),
            Output("y", "y"),
        ])"#;
        let m = ModelFile::parse(text, "t.ron").unwrap();
        let err = expand(&m, &bind(&m.params, &serde_json::json!({})).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("node `y` (MatMul)") && err.contains("[4, 4]") && err.contains("[3, 4]"),
            "{err}"
        );
    }
}
