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
        for (read, _) in einsum.reads() {
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
    write_edges(&graph, &mut out);
    writeln!(out, "}}").unwrap();
    out
}

fn write_edges(graph: &DiGraph<TensorId, ()>, out: &mut String) {
    for edge in graph.edge_indices() {
        let (from, to) = graph.edge_endpoints(edge).expect("edge exists");
        writeln!(out, "  n{} -> n{};", from.index(), to.index()).unwrap();
    }
}

/// Fill colours for passes 1, 2, 3, ... (repeating).
const PASS_COLOURS: [&str; 6] = ["#a6cee3", "#fdbf6f", "#fb9a99", "#b2df8a", "#cab2d6", "#ffff99"];

/// The graph as DOT with each tensor coloured by the pass over `rank` in which its Einsums run,
/// and the read-read dependencies that force extra passes drawn as dashed red edges. Tensors
/// whose Einsums do not traverse the rank are white; inputs are boxes. A legend names the passes.
pub fn to_dot_with_passes(cascade: &Cascade, report: &crate::passcount::PassReport, rank: &str) -> String {
    let graph = dependency_graph(cascade);
    let Some(passes) = report.ranks.iter().find(|r| r.rank == rank) else {
        return to_dot(cascade);
    };
    let mut pass_of_tensor: Vec<Option<usize>> = vec![None; cascade.tensors.len()];
    for (einsum, pass) in &passes.einsum_passes {
        let target = cascade.einsums[einsum.index()].target.index();
        pass_of_tensor[target] = Some(pass_of_tensor[target].map_or(*pass, |p| p.max(*pass)));
    }
    let mut out = String::new();
    writeln!(out, "digraph \"{}\" {{", cascade.name).unwrap();
    writeln!(out, "  rankdir=TB;").unwrap();
    writeln!(out, "  label=\"{}: {} pass(es) over {rank}\"; labelloc=t;", cascade.name, passes.passes).unwrap();
    writeln!(out, "  node [style=filled, fillcolor=white, fontname=\"Helvetica\"];").unwrap();
    for node in graph.node_indices() {
        let id = graph[node];
        let tensor = cascade.tensor(id);
        let ranks: Vec<&str> = tensor.ranks.iter().map(|r| cascade.rank(*r).name.as_str()).collect();
        let shape = match tensor.kind {
            TensorKind::Input { .. } => "box",
            TensorKind::Defined { .. } => "ellipse",
        };
        let peripheries = if cascade.outputs.iter().any(|o| o.tensor == id) { 2 } else { 1 };
        let (fill, pass_text) = match pass_of_tensor[id.index()] {
            Some(p) => (PASS_COLOURS[(p - 1) % PASS_COLOURS.len()], format!("\\npass {p}")),
            None => ("white", String::new()),
        };
        writeln!(
            out,
            "  n{} [label=\"{}[{}]{pass_text}\", shape={shape}, peripheries={peripheries}, fillcolor=\"{fill}\"];",
            node.index(),
            tensor.name,
            ranks.join(", ")
        )
        .unwrap();
    }
    write_edges(&graph, &mut out);
    for extra in &passes.extra {
        let reader = cascade.einsums[extra.reader.index()].target;
        writeln!(
            out,
            "  n{} -> n{} [style=dashed, color=red, fontcolor=red, constraint=false, label=\" forces pass {}\"];",
            extra.value.index(),
            reader.index(),
            extra.pass
        )
        .unwrap();
    }
    writeln!(out, "}}").unwrap();
    out
}

/// The rank with the most passes (the first, on a tie), for drawing; the parts of a split rank
/// count only through their whole rank.
pub fn streamed_rank(cascade: &Cascade, report: &crate::passcount::PassReport) -> Option<String> {
    let parts: Vec<String> = cascade
        .split_pairs()
        .iter()
        .flat_map(|(tile, inner, _)| [cascade.rank(*tile).name.clone(), cascade.rank(*inner).name.clone()])
        .collect();
    let mut best: Option<&crate::passcount::RankPasses> = None;
    for rank in report.ranks.iter().filter(|r| !parts.contains(&r.rank)) {
        if best.is_none_or(|b| rank.passes > b.passes) {
            best = Some(rank);
        }
    }
    best.map(|r| r.rank.clone())
}
