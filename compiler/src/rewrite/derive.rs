//! Weight folding: every weight-only node read at run time (the QKV and gate/up weight
//! concatenations, casts of weights to `bf16`, any transpose of a weight left over) becomes a new
//! *derived weight*. The graph then reads it as an `Op::Weight` leaf, and the build evaluates its
//! recipe — the small weight-only subgraph that computes it — once, with the CPU executor, and
//! stores the result in the engine under the derived name.
//!
//! A derived weight is named by what it computes, with the checkpoint names it reads:
//! `concat0(model.layers.0.self_attn.{q,k,v}_proj.weight)`,
//! `bf16(model.layers.0.input_layernorm.weight)`. After folding, an engine graph holds no
//! weight-only computation: every constant the kernels read is a stored tensor.

use super::cost::weight_only;
use kiln_runtime::cpu::{CpuExecutor, ExecError};
use kiln_runtime::ir::{Graph, NodeId, Op};

/// Longest derived name spelled as an expression; longer ones are named after their node.
const MAX_NAME: usize = 240;

/// A weight computed at build time from checkpoint weights.
#[derive(Clone, Debug, PartialEq)]
pub struct DerivedWeight {
    /// Its name in the graph and the engine.
    pub name: String,
    /// A weight-only graph computing it, with one output `value`.
    pub recipe: Graph,
}

/// `prefix{a,b,c}suffix` for names sharing a prefix and a suffix.
fn brace(names: &[String]) -> String {
    if names.len() < 2 {
        return names.join(",");
    }
    let first = names[0].as_bytes();
    let mut p = first.len();
    for n in &names[1..] {
        p = p.min(
            first
                .iter()
                .zip(n.as_bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    let min_len = names.iter().map(|n| n.len()).min().unwrap_or(0);
    let mut s = 0;
    while s < min_len - p
        && names
            .iter()
            .all(|n| n.as_bytes()[n.len() - 1 - s] == first[first.len() - 1 - s])
    {
        s += 1;
    }
    if !names
        .iter()
        .all(|n| n.is_char_boundary(p) && n.is_char_boundary(n.len() - s))
    {
        return names.join(",");
    }
    let mids: Vec<&str> = names.iter().map(|n| &n[p..n.len() - s]).collect();
    format!(
        "{}{{{}}}{}",
        &names[0][..p],
        mids.join(","),
        &names[0][names[0].len() - s..]
    )
}

fn expr_name(g: &Graph, id: NodeId) -> String {
    let n = &g.nodes[id];
    let args: Vec<String> = n.inputs.iter().map(|&i| expr_name(g, i)).collect();
    let weights_only = n
        .inputs
        .iter()
        .all(|&i| matches!(g.nodes[i].op, Op::Weight { .. }));
    match &n.op {
        Op::Weight { name } => name.clone(),
        Op::Constant { value } => value.to_string(),
        Op::Concat { axis } if weights_only => format!("concat{axis}({})", brace(&args)),
        Op::Concat { axis } => format!("concat{axis}({})", args.join(",")),
        Op::Cast { dtype } => format!("{}({})", dtype.name(), args.join(",")),
        Op::Transpose { perm } => {
            let p: Vec<String> = perm.iter().map(|x| x.to_string()).collect();
            format!("transpose[{}]({})", p.join(","), args.join(","))
        }
        Op::Slice { axis, start, end } => {
            format!("slice{axis}[{start}..{end}]({})", args.join(","))
        }
        // Any other op: its display, attributes included (two nodes that differ only in an
        // attribute must not share a name), without spaces.
        op => {
            let shown: String = op.to_string().chars().filter(|c| *c != ' ').collect();
            let head = if shown.contains('(') {
                shown
            } else {
                shown.to_lowercase()
            };
            if args.is_empty() {
                head
            } else {
                format!("{head}({})", args.join(","))
            }
        }
    }
}

/// The recipe of node `id`: its weight-only ancestors, output `value`.
fn recipe(g: &Graph, id: NodeId) -> Graph {
    let mut need = vec![false; id + 1];
    need[id] = true;
    for i in (0..=id).rev() {
        if need[i] {
            for &j in &g.nodes[i].inputs {
                need[j] = true;
            }
        }
    }
    let mut r = Graph::default();
    let mut map = vec![usize::MAX; id + 1];
    for i in 0..=id {
        if need[i] {
            let mut n = g.nodes[i].clone();
            n.inputs = n.inputs.iter().map(|&j| map[j]).collect();
            r.nodes.push(n);
            map[i] = r.nodes.len() - 1;
        }
    }
    r.outputs.push(("value".into(), map[id]));
    r
}

/// Replaces each weight-only node read at run time by a derived weight; drops what is no longer
/// read. Returns the new graph and the derived weights, in graph order.
pub fn fold_weights(g: &Graph) -> (Graph, Vec<DerivedWeight>) {
    let konst = weight_only(g);
    let is_leaf = |i: NodeId| matches!(g.nodes[i].op, Op::Weight { .. } | Op::Constant { .. });
    let mut fold = vec![false; g.nodes.len()];
    for (id, n) in g.nodes.iter().enumerate() {
        if !konst[id] {
            for &i in &n.inputs {
                fold[i] |= konst[i] && !is_leaf(i);
            }
        }
    }
    for &o in g
        .outputs
        .iter()
        .map(|(_, o)| o)
        .chain(g.states.iter().map(|s| &s.update))
    {
        fold[o] |= konst[o] && !is_leaf(o);
    }
    // Which nodes the folded graph still needs, from the roots back.
    let mut live = vec![false; g.nodes.len()];
    for &o in g.outputs.iter().map(|(_, o)| o) {
        live[o] = true;
    }
    for s in &g.states {
        live[s.update] = true;
        live[s.input] = true;
    }
    for id in (0..g.nodes.len()).rev() {
        if live[id] && !fold[id] {
            for &i in &g.nodes[id].inputs {
                live[i] = true;
            }
        }
    }
    let mut out = Graph::default();
    let mut derived: Vec<DerivedWeight> = Vec::new();
    let mut names = std::collections::HashMap::new();
    let mut map = vec![usize::MAX; g.nodes.len()];
    for (id, n) in g.nodes.iter().enumerate() {
        if !live[id] {
            continue;
        }
        let mut node = n.clone();
        if fold[id] {
            let expr = expr_name(g, id);
            let recipe = recipe(g, id);
            // A name is the weight's identity in the engine: two different recipes never share
            // one (the node name, unique in the graph, breaks a tie).
            let taken = |name: &String| {
                names
                    .get(name)
                    .is_some_and(|&k: &usize| derived[k].recipe != recipe)
            };
            let name = if expr.len() <= MAX_NAME && !taken(&expr) {
                expr
            } else {
                format!("derived:{}", n.name)
            };
            if !names.contains_key(&name) {
                names.insert(name.clone(), derived.len());
                derived.push(DerivedWeight {
                    name: name.clone(),
                    recipe,
                });
            }
            node.op = Op::Weight { name };
            node.inputs.clear();
        } else {
            node.inputs = node.inputs.iter().map(|&i| map[i]).collect();
        }
        out.nodes.push(node);
        map[id] = out.nodes.len() - 1;
    }
    out.copy_bindings(g, |i| map[i]);
    (out, derived)
}

impl DerivedWeight {
    /// For a weight stored in a weight format (its recipe ends in a cast to it): the format and
    /// the recipe of the values it quantizes. The build packs those values (`quant::quantize`)
    /// rather than re-quantizing the dequantized ones.
    pub fn quantized_source(&self) -> Option<(kiln_runtime::ir::DType, DerivedWeight)> {
        let &(_, out) = self.recipe.outputs.first()?;
        let node = &self.recipe.nodes[out];
        let Op::Cast { dtype } = node.op else {
            return None;
        };
        if !dtype.is_weight_format() {
            return None;
        }
        let mut recipe = self.recipe.clone();
        recipe.outputs = vec![("value".to_string(), node.inputs[0])];
        if out + 1 == recipe.nodes.len() {
            recipe.nodes.pop();
        }
        Some((
            dtype,
            DerivedWeight {
                name: self.name.clone(),
                recipe,
            },
        ))
    }
}

/// Evaluates a derived weight with the CPU executor; `load(name, shape)` reads checkpoint weights.
pub fn evaluate(
    weight: &DerivedWeight,
    load: impl FnMut(&str, &[usize]) -> Result<Vec<f32>, ExecError>,
) -> Result<Vec<f32>, ExecError> {
    let exec = CpuExecutor::new(weight.recipe.clone(), load)?;
    let mut session = exec.session(1);
    let mut out = exec.step(&mut session, &[0], &[])?;
    out.outputs
        .remove("value")
        .map(|t| t.data)
        .ok_or_else(|| ExecError::Unsupported(format!("recipe of `{}` has no value", weight.name)))
}

#[cfg(test)]
mod tests {
    use super::brace;

    #[test]
    fn braces_factor_common_prefix_and_suffix() {
        let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            brace(&n(&[
                "m.0.q_proj.weight",
                "m.0.k_proj.weight",
                "m.0.v_proj.weight"
            ])),
            "m.0.{q,k,v}_proj.weight"
        );
        assert_eq!(
            brace(&n(&["mlp.gate_proj.weight", "mlp.up_proj.weight"])),
            "mlp.{gate,up}_proj.weight"
        );
        assert_eq!(brace(&n(&["ab", "abab"])), "ab{,ab}");
    }
}
