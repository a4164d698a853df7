//! The extraction cost: numerical safety first, then passes, then size.
//!
//! Passes are counted on terms the way `passcount` counts them on cascades: a reduction over
//! rank R traverses R once more than the deepest R-complete value (a value that needed all of R
//! and is no longer indexed by R) that its body reads. The count is max-based, so shared subterms
//! are not counted twice and the greedy extractor is exact for it. Every component is at least
//! its children's, so the cost is monotone and extraction cannot choose a cycle.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use egg::{CostFunction, Id, Language, Symbol};

use super::lang::Ein;

#[derive(Clone, Debug)]
pub struct PassCost {
    /// `exp` of an argument that is not shifted by a maximum: it can overflow.
    pub unstable: u32,
    /// Per rank: (passes, deepest pass count of a complete value read inside).
    pub passes: BTreeMap<Symbol, (u32, u32)>,
    /// The free indices of the chosen term.
    pub free: BTreeSet<Symbol>,
    /// This term is a maximum (`rmax`), or the larger of one and something else.
    pub is_max: bool,
    /// This term is `a - max(...)`.
    pub shifted: bool,
    pub size: u32,
}

impl PassCost {
    pub fn max_passes(&self) -> u32 {
        self.passes.values().map(|(p, _)| *p).max().unwrap_or(0)
    }

    /// The passes over every rank together: between terms with as many passes over their
    /// busiest rank, the one that traverses the others less (a hand-split rank's tiles once
    /// rather than twice, its points twice either way).
    pub fn total_passes(&self) -> u32 {
        self.passes.values().map(|(p, _)| *p).sum()
    }

    /// Numerical safety, then the passes over the busiest rank, then over all ranks.
    pub fn rank(&self) -> (u32, u32, u32) {
        (self.unstable, self.max_passes(), self.total_passes())
    }

    fn key(&self) -> (u32, u32, u32, u32) {
        (self.unstable, self.max_passes(), self.total_passes(), self.size)
    }
}

impl PartialEq for PassCost {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl PartialOrd for PassCost {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.key().cmp(&other.key()))
    }
}

/// The cost function; it knows which rank each index ranges over, and which indices are the
/// within-tile indices of splits the source made by hand.
pub struct PassCostFunction {
    pub rank_of: HashMap<Symbol, Symbol>,
    /// Within-tile indices of the source's splits (`m0`): an online sum over one is lowered as the
    /// tile's maximum, then the tile's sum (`from_egg`), two passes over the tile.
    pub within_tile: BTreeSet<Symbol>,
}

impl PassCostFunction {
    fn rank(&self, index: Symbol) -> Symbol {
        self.rank_of.get(&index).copied().unwrap_or(index)
    }

    fn has_rank(&self, cost: &PassCost, rank: Symbol) -> bool {
        cost.free.iter().any(|i| self.rank(*i) == rank)
    }

    /// What a child contributes to its parent's count of complete values read, for `rank`.
    fn contribution(&self, child: &PassCost, rank: Symbol) -> u32 {
        let (passes, inner) = child.passes.get(&rank).copied().unwrap_or((0, 0));
        if passes > 0 && !self.has_rank(child, rank) {
            passes
        } else {
            inner
        }
    }
}

impl CostFunction<Ein> for PassCostFunction {
    type Cost = PassCost;

    fn cost<C>(&mut self, enode: &Ein, mut costs: C) -> PassCost
    where
        C: FnMut(Id) -> PassCost,
    {
        let children: Vec<PassCost> = enode.children().iter().map(|id| costs(*id)).collect();
        let mut free: BTreeSet<Symbol> = BTreeSet::new();
        let mut reduced: Option<Symbol> = None;
        match enode {
            Ein::Index(name) => {
                free.insert(name.0);
            }
            Ein::In(_) => children[1..].iter().for_each(|c| free.extend(c.free.iter().copied())),
            Ein::Sum(_) | Ein::RMax(_) | Ein::RMin(_) | Ein::RSum(_) => {
                children[1..].iter().for_each(|c| free.extend(c.free.iter().copied()));
                for index in &children[0].free {
                    free.remove(index);
                    reduced = Some(self.rank(*index));
                }
            }
            _ => children.iter().for_each(|c| free.extend(c.free.iter().copied())),
        }
        let mut ranks: BTreeSet<Symbol> = children.iter().flat_map(|c| c.passes.keys().copied()).collect();
        ranks.extend(reduced);
        let body = match enode {
            Ein::Sum(_) | Ein::RMax(_) | Ein::RMin(_) | Ein::RSum(_) => &children[1..],
            _ => &children[..],
        };
        // An online sum within a hand-made tile reads its scores' maximum, a complete value.
        let within_tile =
            matches!(enode, Ein::RSum(_)) && children[0].free.iter().any(|i| self.within_tile.contains(i));
        let mut passes = BTreeMap::new();
        for rank in ranks {
            let inner = if within_tile && reduced == Some(rank) {
                (self.contribution(&children[1], rank) + 1).max(self.contribution(&children[2], rank))
            } else {
                body.iter().map(|c| self.contribution(c, rank)).max().unwrap_or(0)
            };
            let count = if reduced == Some(rank) {
                1 + inner
            } else {
                children.iter().map(|c| c.passes.get(&rank).map_or(0, |(p, _)| *p)).max().unwrap_or(0)
            };
            passes.insert(rank, (count, inner));
        }
        let mut unstable: u32 = children.iter().map(|c| c.unstable).sum();
        if let Ein::Exp(_) = enode {
            let argument = &children[0];
            if !argument.shifted && !argument.free.is_empty() {
                unstable += 1;
            }
        }
        let size = children.iter().fold(1u32, |acc, c| acc.saturating_add(c.size));
        PassCost {
            unstable,
            passes,
            free,
            // The larger of a maximum and anything is an upper bound too: `max(max[m](S), sink)`.
            is_max: match enode {
                Ein::RMax(_) => true,
                Ein::Max2(_) => children.iter().any(|c| c.is_max),
                _ => false,
            },
            shifted: matches!(enode, Ein::Sub(_)) && children[1].is_max,
            size,
        }
    }
}
