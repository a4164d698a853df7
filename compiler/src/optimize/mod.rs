//! The e-graph optimizer: rewrites a cascade into an equivalent one with the fewest passes.
//!
//! Needs: a verified cascade. Guarantees: a verified cascade with the same inputs, params and
//! outputs and the same meaning (within rounding, and with an empty row giving "no value", written
//! as 0, where a deferred division would give 0 / 0), or the input itself when nothing better was
//! found or the cascade is outside what the optimizer handles (one with iterative tensors is
//! already scheduled). The result is the same for the same input, byte for byte.
//!
//! Steps: every output is inlined into one term (`to_egg`); the rules (`rules`) saturate an
//! e-graph under node, iteration and time limits; the cheapest term is extracted by a cost that
//! puts numerical safety first, then passes, then size (`cost`); and the terms are emitted as a
//! cascade, online sums lowered to split ranks and running tensors (`from_egg`). Last, every
//! tensor read only under a filter takes the filter (`narrow`), in the cascade found or the one
//! kept.

pub mod cost;
pub mod from_egg;
pub mod lang;
pub mod narrow;
pub mod rules;
pub mod to_egg;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use egg::{CostFunction, EGraph, Extractor, Id, RecExpr, Runner, SimpleScheduler, StopReason, Symbol};

use crate::ir::*;
use cost::{PassCost, PassCostFunction};
use lang::{Ein, EinAnalysis};

/// Limits and choices of the optimizer.
#[derive(Clone, Debug)]
pub struct OptimizeOptions {
    /// The tile size of a split rank (`M0`).
    pub tile: u64,
    pub node_limit: usize,
    pub iter_limit: usize,
    pub time_limit: Duration,
    /// Also run the rules that are exact only in real arithmetic (for tests of extraction).
    pub unsafe_rules: bool,
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        OptimizeOptions {
            tile: 64,
            node_limit: 20_000,
            iter_limit: 30,
            time_limit: Duration::from_secs(2),
            unsafe_rules: false,
        }
    }
}

/// What the optimizer did.
#[derive(Clone, Debug)]
pub struct Optimized {
    pub cascade: Cascade,
    /// Whether the cascade differs from the input.
    pub changed: bool,
    /// Passes per rank of the chosen terms, as the cost counted them.
    pub claimed_passes: BTreeMap<String, u32>,
    /// The same for the input terms.
    pub input_passes: BTreeMap<String, u32>,
    /// Why saturation stopped, the iterations and the e-graph's size.
    pub stop: String,
    pub iterations: usize,
    pub nodes: usize,
    /// The rules applied in each iteration: (iteration, rule, times).
    pub applied: Vec<(usize, String, usize)>,
    /// Why the input was kept, when it was.
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimizeError {
    #[error("internal error: the optimized cascade does not verify: {0}")]
    Internal(String),
}

/// The cost function of a cascade's terms: the role of every index, and the within-tile indices
/// of its splits.
fn cost_function(cascade: &Cascade) -> PassCostFunction {
    let inner_ranks: Vec<RankId> = cascade.split_pairs().iter().map(|(_, inner, _)| *inner).collect();
    let mut within_tile = std::collections::BTreeSet::new();
    for rank in inner_ranks {
        for primes in 0..4u8 {
            within_tile.insert(Symbol::from(cascade.index_name(Index { rank, primes })));
        }
    }
    PassCostFunction { rank_of: index_roles(cascade), within_tile }
}

/// The role of each index name for the pass count, as the analysis sees it
/// (`passcount::Roles`): its rank, with the primes of its role (`m'` counts passes over `M'`,
/// apart from `m`, only where both walk different fibers).
fn index_roles(cascade: &Cascade) -> HashMap<Symbol, Symbol> {
    let by_fiber = crate::passcount::Roles::of(cascade);
    let mut roles = HashMap::new();
    for (r, rank) in cascade.ranks.iter().enumerate() {
        for primes in 0..4u8 {
            let index = Index { rank: RankId::new(r), primes };
            let role = format!("{}{}", rank.name, "'".repeat(by_fiber.role(index) as usize));
            roles.insert(Symbol::from(cascade.index_name(index)), Symbol::from(role.as_str()));
        }
    }
    roles
}

/// Optimizes one cascade: the fewest passes, then every tensor narrowed to the points read.
pub fn optimize(cascade: &Cascade, options: &OptimizeOptions) -> Result<Optimized, OptimizeError> {
    let mut optimized = fewest_passes(cascade, options)?;
    if let Some(narrowed) = narrow::narrow(&optimized.cascade) {
        crate::verify::verify(&narrowed)
            .map_err(|e| OptimizeError::Internal(format!("{e}\n{}", crate::print::print_cascade(&narrowed))))?;
        optimized.cascade = narrowed;
        optimized.changed = true;
        // Narrowed, the cascade is no longer the one written, even where its passes are.
        optimized.note = None;
    }
    Ok(optimized)
}

/// The cascade with the fewest passes the e-graph finds, or the input.
fn fewest_passes(cascade: &Cascade, options: &OptimizeOptions) -> Result<Optimized, OptimizeError> {
    let unchanged = |note: String| Optimized {
        cascade: cascade.clone(),
        changed: false,
        claimed_passes: BTreeMap::new(),
        input_passes: BTreeMap::new(),
        stop: "not run".into(),
        iterations: 0,
        nodes: 0,
        applied: vec![],
        note: Some(note),
    };
    let translator = match to_egg::Translator::new(cascade) {
        Ok(t) => t,
        Err(to_egg::Unsupported::Iterative(name)) => {
            return Ok(unchanged(format!(
                "`{name}` is iterative: the cascade is already scheduled and is kept as written"
            )))
        }
    };
    // Outputs first, then every defined tensor (to name the classes of the result).
    let mut terms: Vec<(TensorId, RecExpr<Ein>)> = Vec::new();
    for output in &cascade.outputs {
        terms.push((output.tensor, translator.tensor_term(output.tensor)));
    }
    for (t, tensor) in cascade.tensors.iter().enumerate() {
        if matches!(tensor.kind, TensorKind::Defined { .. }) && !cascade.outputs.iter().any(|o| o.tensor.index() == t) {
            terms.push((TensorId::new(t), translator.tensor_term(TensorId::new(t))));
        }
    }
    let rank_of = index_roles(cascade);
    let mut cost_function = cost_function(cascade);
    let input_costs: Vec<PassCost> =
        terms[..cascade.outputs.len()].iter().map(|(_, expr)| cost_function.cost_rec(expr)).collect();

    let mut runner: Runner<Ein, EinAnalysis> = Runner::new(EinAnalysis::of(cascade))
        .with_egraph(EGraph::new(EinAnalysis::of(cascade)))
        .with_scheduler(SimpleScheduler)
        .with_node_limit(options.node_limit)
        .with_iter_limit(options.iter_limit)
        .with_time_limit(options.time_limit);
    for (_, expr) in &terms {
        runner = runner.with_expr(expr);
    }
    let mut rules = rules::rules();
    if options.unsafe_rules {
        rules.extend(rules::unsafe_rules());
    }
    let runner = runner.run(&rules);
    let stop = match &runner.stop_reason {
        Some(StopReason::Saturated) => "saturated".to_string(),
        Some(StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
        Some(StopReason::NodeLimit(n)) => format!("node limit ({n})"),
        Some(StopReason::TimeLimit(t)) => format!("time limit ({t:.2} s)"),
        Some(StopReason::Other(why)) => why.clone(),
        None => "unknown".to_string(),
    };
    let applied: Vec<(usize, String, usize)> = runner
        .iterations
        .iter()
        .enumerate()
        .flat_map(|(i, iteration)| {
            let mut rules: Vec<(String, usize)> = iteration.applied.iter().map(|(r, n)| (r.to_string(), *n)).collect();
            rules.sort();
            rules.into_iter().map(move |(r, n)| (i + 1, r, n))
        })
        .collect();
    let egraph = &runner.egraph;
    let rank_of_index = rank_of.clone();
    let extractor = Extractor::new(egraph, cost_function);
    let roots: Vec<Id> = runner.roots.iter().map(|r| egraph.find(*r)).collect();
    let output_costs: Vec<PassCost> =
        roots[..cascade.outputs.len()].iter().map(|r| extractor.find_best_cost(*r)).collect();
    // An output still indexed by a rank is written in one more traversal of it, after every
    // complete value it reads.
    let output_ranks = |cost: &PassCost| -> Vec<Symbol> {
        cost.free.iter().filter_map(|index| rank_of_index.get(index).copied()).collect()
    };
    let passes_of = |costs: &[PassCost]| {
        let mut passes: BTreeMap<String, u32> = BTreeMap::new();
        for cost in costs {
            let written_along = output_ranks(cost);
            for (rank, (p, inner)) in &cost.passes {
                let count = if written_along.contains(rank) { (*p).max(1 + inner) } else { *p };
                let entry = passes.entry(rank.as_str().to_string()).or_insert(0);
                *entry = (*entry).max(count);
            }
        }
        passes
    };
    let claimed_passes = passes_of(&output_costs);
    let input_passes = passes_of(&input_costs);
    let report = |cascade: Cascade, changed: bool, note: Option<String>| Optimized {
        cascade,
        changed,
        claimed_passes: if changed { claimed_passes.clone() } else { input_passes.clone() },
        input_passes: input_passes.clone(),
        stop: stop.clone(),
        iterations: runner.iterations.len(),
        nodes: egraph.total_number_of_nodes(),
        applied: applied.clone(),
        note,
    };
    let better = output_costs.iter().zip(&input_costs).any(|(out, input)| out.rank() < input.rank())
        && output_costs.iter().zip(&input_costs).all(|(out, input)| out.rank() <= input.rank());
    if !better {
        return Ok(report(cascade.clone(), false, Some("no cascade with fewer passes was found".into())));
    }
    let mut names: HashMap<Id, String> = HashMap::new();
    for ((tensor, _), root) in terms.iter().zip(&runner.roots) {
        names.entry(egraph.find(*root)).or_insert_with(|| cascade.tensor(*tensor).name.clone());
    }
    let best = |id: Id| extractor.find_best_node(id).clone();
    let mut emitter = from_egg::Emitter::new(egraph, &best, cascade, &names, options.tile, &roots);
    for (output, root) in cascade.outputs.iter().zip(&roots) {
        let (_, einsum) = cascade.definitions(output.tensor).next().expect("an output is defined");
        let lhs: Vec<Index> = einsum.lhs_indices().collect();
        emitter.output(*root, &cascade.tensor(output.tensor).name, &lhs, output.elem);
    }
    let optimized = emitter.cascade;
    crate::verify::verify(&optimized)
        .map_err(|e| OptimizeError::Internal(format!("{e}\n{}", crate::print::print_cascade(&optimized))))?;
    // The result must keep the promise of its terms: where the analysis finds more passes in it
    // than the terms claimed, or where an online sum over a rank the source had already split by
    // hand was lowered to tiles of tiles (whose passes the term count does not see), the input is
    // kept. (The term count may claim more than the analysis finds: it does not trace which
    // fibers a complete value consumed, so an output indexed by a rank that a reduction also
    // consumed through other tensors is counted once more.)
    let found = crate::passcount::analyze(&optimized);
    let broken = claimed_passes.iter().any(|(rank, claimed)| found.passes(rank).is_some_and(|n| n > *claimed as usize));
    let parts: Vec<RankId> = cascade.split_pairs().iter().flat_map(|(tile, inner, _)| [*tile, *inner]).collect();
    let nested = optimized.split_pairs().iter().any(|(_, _, whole)| parts.contains(whole));
    let why = match (broken, nested) {
        (true, _) => Some("the cascade found makes more passes than its terms promise"),
        (_, true) => Some("the cascade found would tile again a rank the source already splits"),
        _ => None,
    };
    if let Some(why) = why {
        return Ok(report(cascade.clone(), false, Some(why.into())));
    }
    Ok(report(optimized, true, None))
}

/// The rewrites that turn the first output's term into the chosen one, step by step, as
/// s-expressions (egg's explanations): each line is the whole term after one rewrite, with the
/// rule that made it marked `(Rewrite=> rule ...)`. Empty when the cascade is outside what the
/// optimizer handles.
pub fn derivation(cascade: &Cascade, options: &OptimizeOptions) -> Vec<String> {
    let Ok(translator) = to_egg::Translator::new(cascade) else { return vec![] };
    let Some(output) = cascade.outputs.first() else { return vec![] };
    let start = translator.tensor_term(output.tensor);
    let mut runner: Runner<Ein, EinAnalysis> = Runner::new(EinAnalysis::of(cascade))
        .with_explanations_enabled()
        .with_scheduler(SimpleScheduler)
        .with_node_limit(options.node_limit)
        .with_iter_limit(options.iter_limit)
        .with_time_limit(options.time_limit)
        .with_expr(&start)
        .run(&rules::rules());
    let root = runner.egraph.find(runner.roots[0]);
    let best = Extractor::new(&runner.egraph, cost_function(cascade)).find_best(root).1;
    runner.explain_equivalence(&start, &best).get_flat_strings()
}
