//! DAG extraction: picks one e-node per needed e-class so that the picked graph is acyclic and its
//! cost — each e-class counted **once**, however many nodes read it — is low.
//!
//! egg's `Extractor` minimizes *tree* cost: a class read by two nodes is paid twice. On a residual
//! chain (each layer's output feeds the next norm and the next residual add) that doubles per
//! layer, and it makes horizontal fusion unreachable: the fused QKV product is shared by the three
//! slices that read it, so each slice alone looks dearer than its own small product (the trap
//! Tensat reports). Exact DAG extraction is an ILP; kiln uses two cheap steps instead:
//!
//! 1. **Amortized greedy, acyclic by construction.** E-classes are finalized one at a time in order
//!    of their cost, Dijkstra-style; a node becomes eligible once all its children are final, so
//!    a class only ever picks a node over earlier-finalized classes and no cycle can form. A node
//!    costs its own cost plus each child's cost divided by the child's number of parent
//!    classes, so a shared class is split among its readers instead of paid by each.
//! 2. **Shared-class moves.** For each class with several parent classes, try switching all its
//!    parents at once to nodes that read it (adopt) or to nodes that do not (abandon); keep a move
//!    if the exact DAG cost of the whole picked graph drops and stays acyclic. Adopting the fused
//!    QKV product in the three slices at once is such a move. Sweeps repeat until nothing improves.
//!
//! The result is checked: every needed class has a pick, and the picked graph is acyclic.

use super::analysis::KilnGraph;
use super::lang::Node;
use egg::{Id, Language};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// Most improvement sweeps of step 2.
const MAX_SWEEPS: usize = 8;

/// The picked node of each needed e-class.
#[derive(Clone, Debug)]
pub struct Extracted {
    /// Picked node by canonical e-class.
    pub choice: HashMap<Id, Node>,
    /// DAG cost of the picked graph (each class once).
    pub cost: f64,
    /// Moves of step 2 that were kept.
    pub moves: usize,
}

struct Problem {
    classes: Vec<Id>,
    /// Per class: (own cost, distinct child classes, node).
    nodes: Vec<Vec<(f64, Vec<usize>, Node)>>,
    /// Per class: the (parent class, node index) pairs that read it.
    parents: Vec<Vec<(usize, usize)>>,
    /// Per class: number of distinct parent classes.
    users: Vec<usize>,
}

#[derive(PartialEq)]
struct Entry(f64, usize, usize);

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, for a min-heap on (cost, class, node).
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .total_cmp(&self.0)
            .then(other.1.cmp(&self.1))
            .then(other.2.cmp(&self.2))
    }
}

impl Problem {
    fn new(eg: &KilnGraph, cost: &dyn Fn(&Node) -> f64) -> Problem {
        let mut classes: Vec<Id> = eg.classes().map(|c| c.id).collect();
        classes.sort();
        let index: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        let mut nodes = Vec::with_capacity(classes.len());
        let mut parents = vec![Vec::new(); classes.len()];
        for (ci, &c) in classes.iter().enumerate() {
            let mut list = Vec::new();
            for (k, n) in eg[c].nodes.iter().enumerate() {
                let mut ch: Vec<usize> = n.children().iter().map(|&x| index[&eg.find(x)]).collect();
                ch.sort_unstable();
                ch.dedup();
                for &x in &ch {
                    parents[x].push((ci, k));
                }
                list.push((cost(n), ch, n.clone()));
            }
            nodes.push(list);
        }
        let users = parents
            .iter()
            .map(|ps| {
                let mut p: Vec<usize> = ps.iter().map(|&(p, _)| p).collect();
                p.dedup();
                p.len()
            })
            .collect();
        Problem {
            classes,
            nodes,
            parents,
            users,
        }
    }

    /// Step 1: amortized costs, acyclic picks. Returns (pick, amortized cost) per class.
    fn greedy(&self) -> (Vec<Option<usize>>, Vec<f64>) {
        let n = self.classes.len();
        let mut pending: Vec<Vec<usize>> = self
            .nodes
            .iter()
            .map(|ns| ns.iter().map(|(_, ch, _)| ch.len()).collect())
            .collect();
        let mut best: Vec<(f64, Option<usize>)> = vec![(f64::INFINITY, None); n];
        let mut done = vec![false; n];
        let mut acost = vec![f64::INFINITY; n];
        let mut heap = BinaryHeap::new();
        for (c, ns) in self.nodes.iter().enumerate() {
            for (k, (own, ch, _)) in ns.iter().enumerate() {
                if ch.is_empty() && own.is_finite() && *own < best[c].0 {
                    best[c] = (*own, Some(k));
                    heap.push(Entry(*own, c, k));
                }
            }
        }
        while let Some(Entry(cost, c, k)) = heap.pop() {
            if done[c] || best[c].1 != Some(k) || best[c].0 != cost {
                continue;
            }
            done[c] = true;
            acost[c] = cost;
            for &(p, pk) in &self.parents[c] {
                if done[p] {
                    continue;
                }
                pending[p][pk] -= 1;
                if pending[p][pk] > 0 {
                    continue;
                }
                let (own, ch, _) = &self.nodes[p][pk];
                if !own.is_finite() {
                    continue;
                }
                let total = own
                    + ch.iter()
                        .map(|&x| acost[x] / self.users[x].max(1) as f64)
                        .sum::<f64>();
                if total < best[p].0 {
                    best[p] = (total, Some(pk));
                    heap.push(Entry(total, p, pk));
                }
            }
        }
        let pick = (0..n)
            .map(|c| if done[c] { best[c].1 } else { None })
            .collect();
        (pick, acost)
    }

    /// Exact DAG cost of the picks reachable from `roots`, or `None` if they are cyclic or a
    /// reachable class has no pick.
    fn dag_cost(&self, pick: &[Option<usize>], roots: &[usize]) -> Option<f64> {
        // 0 = unseen, 1 = on the stack, 2 = done.
        let mut state = vec![0u8; self.classes.len()];
        let mut total = 0.0;
        let mut stack: Vec<(usize, usize)> = Vec::new();
        for &r in roots {
            if state[r] == 2 {
                continue;
            }
            stack.push((r, 0));
            state[r] = 1;
            while let Some(top) = stack.last_mut() {
                let (c, next) = *top;
                let (own, ch, _) = &self.nodes[c][pick[c]?];
                if next < ch.len() {
                    top.1 += 1;
                    let x = ch[next];
                    match state[x] {
                        0 => {
                            state[x] = 1;
                            stack.push((x, 0));
                        }
                        1 => return None,
                        _ => {}
                    }
                } else {
                    total += own;
                    state[c] = 2;
                    stack.pop();
                }
            }
        }
        total.is_finite().then_some(total)
    }

    /// The cheapest (by amortized cost) complete node of class `c` that does (or does not) read
    /// class `x`.
    fn alternative(&self, c: usize, x: usize, reads: bool, acost: &[f64]) -> Option<usize> {
        let mut best: Option<(f64, usize)> = None;
        for (k, (own, ch, _)) in self.nodes[c].iter().enumerate() {
            if ch.contains(&x) != reads || !own.is_finite() {
                continue;
            }
            let cost = own + ch.iter().map(|&y| acost[y]).sum::<f64>();
            if cost.is_finite() && best.is_none_or(|(b, _)| cost < b) {
                best = Some((cost, k));
            }
        }
        best.map(|(_, k)| k)
    }

    /// Step 2: shared-class moves while they lower the DAG cost.
    fn improve(&self, pick: &mut [Option<usize>], acost: &[f64], roots: &[usize]) -> usize {
        let Some(mut current) = self.dag_cost(pick, roots) else {
            return 0;
        };
        let mut kept = 0;
        for _ in 0..MAX_SWEEPS {
            let mut improved = false;
            for x in 0..self.classes.len() {
                if self.users[x] < 2 {
                    continue;
                }
                let mut ps: Vec<usize> = self.parents[x].iter().map(|&(p, _)| p).collect();
                ps.dedup();
                for adopt in [true, false] {
                    let mut changes = Vec::new();
                    for &p in &ps {
                        let Some(k) = pick[p] else { continue };
                        if self.nodes[p][k].1.contains(&x) == adopt {
                            continue;
                        }
                        if let Some(alt) = self.alternative(p, x, adopt, acost) {
                            changes.push((p, k, alt));
                        }
                    }
                    if changes.is_empty() {
                        continue;
                    }
                    for &(p, _, alt) in &changes {
                        pick[p] = Some(alt);
                    }
                    match self.dag_cost(pick, roots) {
                        Some(cost) if cost < current - 1e-9 * current.abs().max(1.0) => {
                            current = cost;
                            kept += 1;
                            improved = true;
                        }
                        _ => {
                            for &(p, k, _) in &changes {
                                pick[p] = Some(k);
                            }
                        }
                    }
                }
            }
            if !improved {
                break;
            }
        }
        kept
    }
}

/// Extracts the e-classes `roots` (and everything they need) with node costs `cost`.
pub fn extract(
    eg: &KilnGraph,
    roots: &[Id],
    cost: &dyn Fn(&Node) -> f64,
) -> Result<Extracted, String> {
    let p = Problem::new(eg, cost);
    let index: HashMap<Id, usize> = p.classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
    let root_idx: Vec<usize> = roots.iter().map(|&r| index[&eg.find(r)]).collect();
    let (mut pick, acost) = p.greedy();
    if let Some(&r) = root_idx.iter().find(|&&r| pick[r].is_none()) {
        return Err(format!(
            "e-class {} has no extractable node (only helpers or cycles)",
            p.classes[r]
        ));
    }
    let moves = p.improve(&mut pick, &acost, &root_idx);
    let cost = p
        .dag_cost(&pick, &root_idx)
        .ok_or("extraction produced a cycle or left a needed class without a node")?;
    let mut choice = HashMap::new();
    let mut stack = root_idx.clone();
    while let Some(c) = stack.pop() {
        if choice.contains_key(&p.classes[c]) {
            continue;
        }
        let (_, ch, node) = &p.nodes[c][pick[c].expect("dag_cost checked every needed pick")];
        choice.insert(p.classes[c], node.clone());
        stack.extend(ch.iter().copied());
    }
    Ok(Extracted {
        choice,
        cost,
        moves,
    })
}

/// Asserts that the picked nodes reachable from `roots` form an acyclic graph.
pub fn assert_acyclic(eg: &KilnGraph, choice: &HashMap<Id, Node>, roots: &[Id]) {
    let mut state: HashMap<Id, u8> = HashMap::new();
    let mut stack: Vec<(Id, usize)> = Vec::new();
    for &r in roots {
        let r = eg.find(r);
        if state.get(&r) == Some(&2) {
            continue;
        }
        state.insert(r, 1);
        stack.push((r, 0));
        while let Some(top) = stack.last_mut() {
            let (c, next) = *top;
            let ch = choice[&c].children();
            if next < ch.len() {
                top.1 += 1;
                let x = eg.find(ch[next]);
                match state.get(&x) {
                    None => {
                        state.insert(x, 1);
                        stack.push((x, 0));
                    }
                    Some(1) => panic!("extraction produced a cycle through e-class {x}"),
                    _ => {}
                }
            } else {
                state.insert(c, 2);
                stack.pop();
            }
        }
    }
}
