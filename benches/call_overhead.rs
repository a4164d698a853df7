//! The cost of one kernel call from Rust, the baseline of the Python package's overhead
//! (`benches/python_overhead.py` runs this and the same call from Python):
//! `cargo bench --bench call_overhead`. Softmax attention (`examples/attention.ein`, kernel
//! `attention`), P = 8, M = 256, the `cpu` target, one thread; prints the median microseconds per
//! call over batches of calls.

use std::time::Instant;

use einfuse::{compile_file, CompileOptions, DType, Tensor};

fn main() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/attention.ein");
    let options = CompileOptions { threads: 1, ..CompileOptions::default() };
    let compiled = compile_file(&path, &options).expect("compile");
    let kernel = compiled.kernel("attention").expect("kernel");
    let q = Tensor::random(DType::F32, vec![64, 8], 1).unwrap();
    let k = Tensor::random(DType::F32, vec![64, 256], 2).unwrap();
    let v = Tensor::random(DType::F32, vec![64, 256], 3).unwrap();
    let inputs = [("Q", q.data(), q.shape()), ("K", k.data(), k.shape()), ("V", v.data(), v.shape())];
    let batch = 200;
    let mut samples = Vec::new();
    for _ in 0..31 {
        let start = Instant::now();
        for _ in 0..batch {
            std::hint::black_box(kernel.call_slices(&inputs).expect("call"));
        }
        samples.push(start.elapsed().as_secs_f64() * 1e6 / batch as f64);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("rust_us_per_call={:.2}", samples[samples.len() / 2]);
}
