//! The dependency graph of a cascade (petgraph), and its Graphviz DOT text.
//!
//! Nodes are tensors (inputs as boxes, defined tensors as ellipses, outputs doubled); an edge
//! `A -> B` says that an Einsum defining `B` reads `A`. Node and edge order follow the cascade,
//! so the text is deterministic.

use std::fmt::Write;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::ir::*;

/// The tensors as nodes, one edge per distinct (read, defined) pair.
pub fn dependency_graph(cascade: &Cascade) -> DiGraph<TensorId, ()> {
    let mut graph = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..cascade.tensors.len()).map(|t| graph.add_node(TensorId::new(t))).collect();
    for einsum in &cascade.einsums {
        let mut reads: Vec<(TensorId, &[Affine])> = einsum.body.accesses();
        for cond in &einsum.filter {
            reads.extend(cond.lhs.accesses());
            reads.extend(cond.rhs.accesses());
        }
        for (read, _) in reads {
            let (from, to) = (nodes[read.index()], nodes[einsum.target.index()]);
            if !graph.contains_edge(from, to) {
                graph.add_edge(from, to, ());
            }
        }
    }
    graph
}

/// The graph as DOT.
pub fn to_dot(cascade: &Cascade) -> String {
    let graph = dependency_graph(cascade);
    let mut out = String::new();
    writeln!(out, "digraph \"{}\" {{", cascade.name).unwrap();
    writeln!(out, "  rankdir=TB;").unwrap();
    for node in graph.node_indices() {
        let tensor = cascade.tensor(graph[node]);
        let ranks: Vec<&str> = tensor.ranks.iter().map(|r| cascade.rank(*r).name.as_str()).collect();
        let shape = match tensor.kind {
            TensorKind::Input { .. } => "box",
            TensorKind::Defined { .. } => "ellipse",
        };
        let peripheries = if cascade.outputs.iter().any(|o| o.tensor == graph[node]) { 2 } else { 1 };
        writeln!(
            out,
            "  n{} [label=\"{}[{}]\", shape={shape}, peripheries={peripheries}];",
            node.index(),
            tensor.name,
            ranks.join(", ")
        )
        .unwrap();
    }
    for edge in graph.edge_indices() {
        let (from, to) = graph.edge_endpoints(edge).expect("edge exists");
        writeln!(out, "  n{} -> n{};", from.index(), to.index()).unwrap();
    }
    writeln!(out, "}}").unwrap();
    out
}
