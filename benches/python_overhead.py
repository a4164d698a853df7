#!/usr/bin/env python3
"""What a kernel call costs from Python beyond the same call from Rust, in one run.

    python benches/python_overhead.py        (with the package installed: pip install ./python)

Softmax attention (examples/attention.ein, kernel `attention`), P = 8, M = 256, the `cpu` target,
one thread. Runs `cargo bench --bench call_overhead` (the call from Rust), then times the same
call from Python on NumPy arrays and on torch tensors (when torch is installed); prints the median
microseconds per call of each and the differences.
"""
import os
import re
import subprocess
import time

import numpy as np

import einfuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_call(call, batch=200, rounds=31):
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            call()
        samples.append((time.perf_counter() - start) * 1e6 / batch)
    return sorted(samples)[rounds // 2]


def main():
    rust = subprocess.run(["cargo", "bench", "--quiet", "--bench", "call_overhead"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    rust_us = float(re.search(r"rust_us_per_call=(\S+)", rust).group(1))
    kernel = einfuse.compile_file(os.path.join(ROOT, "examples", "attention.ein"), threads=1).kernel("attention")
    rng = np.random.default_rng(0)
    q = rng.uniform(-1, 1, (64, 8)).astype(np.float32)
    k = rng.uniform(-1, 1, (64, 256)).astype(np.float32)
    v = rng.uniform(-1, 1, (64, 256)).astype(np.float32)
    numpy_us = per_call(lambda: kernel(Q=q, K=k, V=v))
    print(f"rust   {rust_us:8.2f} us per call")
    print(f"numpy  {numpy_us:8.2f} us per call  (+{numpy_us - rust_us:.2f} us)")
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)
    tq, tk, tv = torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)
    torch_us = per_call(lambda: kernel(Q=tq, K=tk, V=tv))
    print(f"torch  {torch_us:8.2f} us per call  (+{torch_us - rust_us:.2f} us)")


if __name__ == "__main__":
    main()
