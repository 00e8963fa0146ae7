//! The rule sets, one file per concern. Each file holds a `#[rustfmt::skip]` table of
//! [`rule!`]s — `rule!("kebab-name"; "lhs pattern" => "rhs pattern" if guard…)` — and a doc
//! comment on what each rule matches and why it is sound.
//!
//! `rule!` is egg's `rw!` plus two checks done by [`Checked`] on every match before anything is
//! added: the right-hand side must type-check (each node through the same shape rules as the
//! graph, `infer`), and its type must equal the matched e-class's type — a rule that would equate
//! values of different types is unsound, and panics in strict mode (always in tests). Every
//! application that changes the e-graph is logged (rule, e-class) for `kiln inspect --explain`.

pub mod attention;
pub mod fold;
pub mod gated_mlp;
pub mod guards;
pub mod linear;
pub mod norm;
pub mod precision;
pub mod qkv;
pub mod quant;
pub mod rope;

use super::analysis::{node_data, Data, KilnGraph, TypeAnalysis};
use super::lang::Node;
use egg::{Applier, ENodeOrVar, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};

/// A rule of kiln's e-graph.
pub type Rule = Rewrite<Node, TypeAnalysis>;

/// A side condition of a rule, on the matched substitution.
pub type Guard = Box<dyn Fn(&KilnGraph, &Subst) -> bool + Send + Sync>;

/// Writes a checked rule: `rule!("name"; "lhs" => "rhs" if guard if guard…)`. A side may
/// also be a parenthesized expression giving a string (`(format!(…))`).
#[macro_export]
macro_rules! rule {
    ($name:literal; $lhs:tt => $rhs:tt $(if $guard:expr)*) => {
        $crate::rewrite::rules::checked(
            $name,
            &$lhs,
            &$rhs,
            vec![$(Box::new($guard) as $crate::rewrite::rules::Guard),*],
        )
    };
}

/// Parses a pattern variable (`"?x"`).
pub fn var(name: &str) -> Var {
    name.parse()
        .unwrap_or_else(|e| panic!("bad pattern variable `{name}`: {e}"))
}

/// An applier that checks guards and types before instantiating its right-hand side.
pub struct Checked {
    rhs: Pattern<Node>,
    guards: Vec<Guard>,
}

/// Builds a checked rule (what [`rule!`] expands to). Patterns are code: a bad one panics.
pub fn checked(name: &str, lhs: &str, rhs: &str, guards: Vec<Guard>) -> Rule {
    let searcher: Pattern<Node> = lhs
        .parse()
        .unwrap_or_else(|e| panic!("rule `{name}`: bad left-hand side: {e}"));
    let rhs: Pattern<Node> = rhs
        .parse()
        .unwrap_or_else(|e| panic!("rule `{name}`: bad right-hand side: {e}"));
    Rewrite::new(name, searcher, Checked { rhs, guards })
        .unwrap_or_else(|e| panic!("rule `{name}`: {e}"))
}

/// The analysis data of a pattern instantiated with `subst`, without adding it.
pub fn instance_data(
    eg: &KilnGraph,
    ast: &PatternAst<Node>,
    subst: &Subst,
) -> Result<Data, String> {
    let mut datas: Vec<Data> = Vec::with_capacity(ast.as_ref().len());
    for n in ast.as_ref() {
        let d = match n {
            ENodeOrVar::Var(v) => eg[subst[*v]].data.clone(),
            ENodeOrVar::ENode(node) => node_data(
                node,
                &|id: Id| datas[usize::from(id)].clone(),
                &eg.analysis.leaves,
            )?,
        };
        datas.push(d);
    }
    datas.pop().ok_or_else(|| "empty pattern".to_string())
}

/// Adds `node` (children already in the e-graph) if it type-checks; its class otherwise `None`.
pub fn try_add(eg: &mut KilnGraph, node: Node) -> Option<Id> {
    let child = |id: Id| eg[id].data.clone();
    node_data(&node, &child, &eg.analysis.leaves).ok()?;
    Some(eg.add(node))
}

/// Unions `new` into the matched class `eclass` after checking that their types agree (an unsound
/// union is a conflict: a panic in strict mode). Returns whether the e-graph changed.
pub fn union_typed(eg: &mut KilnGraph, eclass: Id, new: Id, rule: Symbol) -> bool {
    let (a, b) = (eg[eclass].data.ty().cloned(), eg[new].data.ty().cloned());
    if a != b {
        let show = |t: Option<kiln_runtime::ir::TensorType>| {
            t.map_or("an attribute".to_string(), |t| t.to_string())
        };
        eg.analysis.conflict(format!(
            "rule `{rule}` rewrites a value of type {} into one of type {}",
            show(a),
            show(b)
        ));
        return false;
    }
    eg.union(eclass, new)
}

/// [`union_typed`], logging the application (rule, e-class) when the e-graph changed.
pub fn union_checked(eg: &mut KilnGraph, eclass: Id, new: Id, rule: Symbol) -> bool {
    let changed = union_typed(eg, eclass, new, rule);
    if changed {
        eg.analysis.applied.push((rule, eclass));
    }
    changed
}

impl Applier<Node, TypeAnalysis> for Checked {
    fn apply_one(
        &self,
        eg: &mut KilnGraph,
        eclass: Id,
        subst: &Subst,
        _searcher_ast: Option<&PatternAst<Node>>,
        rule: Symbol,
    ) -> Vec<Id> {
        if !self.guards.iter().all(|g| g(eg, subst)) {
            return vec![];
        }
        let Ok(rhs) = instance_data(eg, &self.rhs.ast, subst) else {
            return vec![];
        };
        if rhs.ty() != eg[eclass].data.ty() {
            let show = |d: &Data| d.ty().map_or("an attribute".to_string(), |t| t.to_string());
            let msg = format!(
                "rule `{rule}` rewrites a value of type {} into one of type {}",
                show(&eg[eclass].data),
                show(&rhs)
            );
            eg.analysis.conflict(msg);
            return vec![];
        }
        let id = eg.add_instantiation(&self.rhs.ast, subst);
        if union_checked(eg, eclass, id, rule) {
            vec![id]
        } else {
            vec![]
        }
    }

    fn vars(&self) -> Vec<Var> {
        self.rhs.vars()
    }
}
