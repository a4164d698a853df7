//! Times the optimizer on the whole example corpus: `cargo bench --bench optimizer`.
//! Prints the median over repeated runs, per kernel and for the corpus.

use std::time::Instant;

use einfuse::compiler::optimize::{optimize, OptimizeOptions};
use einfuse::Program;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let kernels: Vec<_> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ein"))
        .flat_map(|p| Program::from_file(p).unwrap().kernels)
        .collect();
    let options = OptimizeOptions::default();
    let runs = 21;
    let mut corpus = Vec::new();
    let mut per_kernel = vec![Vec::new(); kernels.len()];
    for _ in 0..runs {
        let start = Instant::now();
        for (k, kernel) in kernels.iter().enumerate() {
            let t = Instant::now();
            let result = optimize(kernel, &options).unwrap();
            per_kernel[k].push(t.elapsed().as_secs_f64());
            std::hint::black_box(result);
        }
        corpus.push(start.elapsed().as_secs_f64());
    }
    for (kernel, samples) in kernels.iter().zip(per_kernel) {
        println!("{:<24} {:>8.3} ms", kernel.name, median(samples) * 1e3);
    }
    println!("corpus: {} kernels optimized in {:.2} ms (median of {runs} runs)", kernels.len(), median(corpus) * 1e3);
}
