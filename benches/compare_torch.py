#!/usr/bin/env python3
"""einfuse against PyTorch's scaled_dot_product_attention, on the same inputs, in one run.

    python3 benches/compare_torch.py cpu [--threads 2] [--runs 5] [--kernel NAME]
        The CPU targets of docs/performance.md (fp32, 2 threads): prefill H=8 D=64 P=M=4096,
        causal prefill, decode H=32 D=128 P=1 M=16384. For each: random inputs written as .npy,
        einfuse (cpu-llvm) run on them and checked against PyTorch, then both timed (einfuse with
        `einfuse bench --target both`, PyTorch with the median of --runs calls). PyTorch is
        installed into .venv-torch when missing (a large download; not part of CI).

    python3 benches/compare_torch.py gpu OUT
        On a GPU machine, after `einfuse gpu-check` wrote OUT/gpu_prefill.*.npy and its time:
        PyTorch on the same inputs on the GPU, the agreement, both times and their ratio; the
        same for the bf16 form (gpu_prefill_bf16, against PyTorch in bf16), head dimension 128
        (gpu_prefill_d128) and decode (H=32,
        D=128, P=1, M=16384) and its split-key forms (OUT/decode_split*).

    python3 benches/compare_torch.py rehearse OUT
        The same with PyTorch on the CPU, after `einfuse gpu-check --emulate` wrote OUT: a
        rehearsal of the GPU run (`scripts/gpu-check.sh --emulate OUT`); the times mean nothing.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_torch():
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    venv = os.path.join(ROOT, ".venv-torch")
    python = os.path.join(venv, "bin", "python")
    if os.environ.get("EINFUSE_TORCH_VENV") == "1":
        sys.exit("PyTorch is still missing after installing it into .venv-torch")
    if not os.path.exists(python):
        subprocess.check_call([sys.executable, "-m", "venv", venv])
    subprocess.check_call([python, "-m", "pip", "install", "--quiet", "numpy", "torch"])
    os.environ["EINFUSE_TORCH_VENV"] = "1"
    os.execv(python, [python] + sys.argv)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def sdpa(torch, q, k, v, scale, causal):
    """q: [H, E, P], k: [H, E, M], v: [H, F, M] as einfuse lays them out; returns [H, F, P]."""
    qt = q.permute(0, 2, 1).unsqueeze(0)
    kt = k.permute(0, 2, 1).unsqueeze(0)
    vt = v.permute(0, 2, 1).unsqueeze(0)
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)
    return out.squeeze(0).permute(0, 2, 1)


def gpu_time(torch, call):
    """The median of 10 timed calls (CUDA events), after one warm-up."""
    call()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return median(times)


def gpu_compare(torch, out_dir, name, scale, variants, dtype="fp32"):
    """einfuse's times for `name` (and its `variants`, other outputs on the same inputs) against
    SDPA on the inputs einfuse saved (bf16 values, saved as f32, for dtype "bf16"); returns the
    report's lines and whether all agree."""
    import numpy as np
    q, k, v = (np.load(os.path.join(out_dir, f"{name}.{t}.npy")) for t in ("Q", "K", "V"))
    dev = torch.device("cuda")
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    tq, tk, tv = (torch.from_numpy(x).to(dev).to(kind) for x in (q, k, v))
    ref = sdpa(torch, tq, tk, tv, scale, False).float()
    torch.cuda.synchronize()
    torch_s = gpu_time(torch, lambda: sdpa(torch, tq, tk, tv, scale, False))
    flops = 4 * q.shape[0] * q.shape[2] * k.shape[2] * q.shape[1]
    kv_bytes = (2 if dtype == "bf16" else 4) * (k.size + v.size)
    # Both round their bf16 outputs (values below 4 in size): a few units in the last place.
    tolerance = 3e-2 if dtype == "bf16" else 1e-3
    lines = [f"{name} H={q.shape[0]} P={q.shape[2]} M={k.shape[2]} D={q.shape[1]} {dtype}"]
    lines.append(f"  pytorch: {torch_s * 1e3:.3f} ms  {flops / torch_s / 1e12:.3f} TFLOP/s  "
                 f"{kv_bytes / torch_s / 1e9:.1f} GB/s of K and V")
    ok = True
    for variant in [name] + variants:
        timing = os.path.join(out_dir, f"{variant}.time.txt")
        if not os.path.exists(timing):
            lines.append(f"  {variant}: no time (einfuse did not run it)")
            continue
        with open(timing) as f:
            einfuse_s = float(f.read())
        av = np.load(os.path.join(out_dir, f"{variant}.AV.npy"))
        err = float((ref.cpu() - torch.from_numpy(av)).abs().max())
        ok &= err <= tolerance
        lines.append(f"  einfuse {variant}: {einfuse_s * 1e3:.3f} ms  {flops / einfuse_s / 1e12:.3f} TFLOP/s  "
                     f"{kv_bytes / einfuse_s / 1e9:.1f} GB/s; throughput vs pytorch {torch_s / einfuse_s:.3f}; "
                     f"largest absolute difference {err:.3e}")
    return lines, ok


def gpu(out_dir):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    lines = [f"device: {torch.cuda.get_device_name(0)}"]
    ok = True
    for name, scale, variants, dtype in (
        ("gpu_prefill", 0.125, [], "fp32"),
        ("gpu_prefill_bf16", 0.125, [], "bf16"),
        ("gpu_prefill_d128", 0.08838834764831845, [], "fp32"),
        ("decode", 0.08838834764831845, ["decode_split256", "decode_split1024"], "fp32"),
    ):
        if not os.path.exists(os.path.join(out_dir, f"{name}.Q.npy")):
            lines.append(f"{name}: no inputs (einfuse did not run it)")
            continue
        more, agree = gpu_compare(torch, out_dir, name, scale, variants, dtype)
        lines += more
        ok &= agree
    print("\n".join(lines))
    with open(os.path.join(out_dir, "torch.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not ok:
        sys.exit("einfuse and PyTorch disagree")


def cpu(threads, runs, only=None):
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    einfuse = os.path.join(ROOT, "target", "release", "einfuse")
    subprocess.check_call(["cargo", "build", "--quiet", "--release", "--bin", "einfuse"], cwd=ROOT)
    source = os.path.join(ROOT, "benches", "attention.ein")
    cases = [
        ("prefill", 8, 64, 4096, 4096, 0.125, False),
        ("prefill_causal", 8, 64, 4096, 4096, 0.125, True),
        ("decode", 32, 128, 1, 16384, 0.08838834764831845, False),
    ]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        for kernel, h, d, p, m, scale, causal in cases:
            if only is not None and kernel != only:
                continue
            q = rng.standard_normal((h, d, p), dtype=np.float32)
            k = rng.standard_normal((h, d, m), dtype=np.float32)
            v = rng.standard_normal((h, d, m), dtype=np.float32)
            paths = {}
            for name, x in (("Q", q), ("K", k), ("V", v)):
                paths[name] = os.path.join(work, f"{name}.npy")
                np.save(paths[name], x)
            out = os.path.join(work, "AV.npy")
            binds = ["--bind", f"M={m}"] + (["--bind", f"P={p}"] if kernel != "decode" else [])
            subprocess.check_call(
                [einfuse, "run", source, "--kernel", kernel, "--target", "cpu-llvm", "--threads", str(threads)]
                + binds + [f"--input={n}={path}" for n, path in paths.items()] + ["--output", f"AV={out}"],
                stdout=subprocess.DEVNULL,
            )
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            ref = sdpa(torch, tq, tk, tv, scale, causal)
            err = float((ref - torch.from_numpy(np.load(out))).abs().max())
            times = []
            for _ in range(runs + 1):
                start = time.perf_counter()
                sdpa(torch, tq, tk, tv, scale, causal)
                times.append(time.perf_counter() - start)
            torch_s = median(times[1:])
            bench = json.loads(subprocess.check_output(
                [einfuse, "bench", source, "--kernel", kernel, "--target", "both", "--json", "--runs", str(runs),
                 "--threads", str(threads)] + binds))
            llvm_s = bench["cpu-llvm"]["median_s"]
            cranelift_s = bench["median_s"]
            flops = 4 * h * p * m * d
            print(f"{kernel} H={h} D={d} P={p} M={m} ({threads} threads, medians of {runs})")
            print(f"  pytorch   {torch_s * 1e3:10.2f} ms  {flops / torch_s / 1e9:8.2f} GFLOP/s")
            print(f"  cpu-llvm  {llvm_s * 1e3:10.2f} ms  {flops / llvm_s / 1e9:8.2f} GFLOP/s  "
                  f"{torch_s / llvm_s:.3f}x pytorch's throughput")
            print(f"  cpu       {cranelift_s * 1e3:10.2f} ms  {flops / cranelift_s / 1e9:8.2f} GFLOP/s  "
                  f"{torch_s / cranelift_s:.3f}x pytorch's throughput")
            print(f"  largest absolute difference from pytorch: {err:.3e}")
            if not err <= 1e-3:
                sys.exit(f"{kernel}: einfuse and PyTorch disagree")


def rehearse(out_dir):
    """`gpu` with PyTorch on the CPU standing in for the GPU: the report's arithmetic and the
    agreement checks, on what `einfuse gpu-check --emulate` wrote (times are meaningless)."""
    import time
    import torch

    class Event:
        def __init__(self, enable_timing=True):
            self.at = 0.0

        def record(self):
            self.at = time.perf_counter()

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

    cpu_device = torch.device("cpu")
    torch.device = lambda name: cpu_device
    torch.cuda.Event = Event
    torch.cuda.synchronize = lambda: None
    torch.cuda.get_device_name = lambda index: "none: PyTorch on the CPU (rehearsal)"
    gpu(out_dir)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else None
    if mode not in ("cpu", "gpu", "rehearse") or (mode != "cpu" and len(sys.argv) < 3):
        sys.exit(__doc__)
    ensure_torch()
    if sys.argv[1] == "gpu":
        gpu(sys.argv[2])
    elif sys.argv[1] == "rehearse":
        rehearse(sys.argv[2])
    else:
        args = sys.argv[2:]
        threads = int(args[args.index("--threads") + 1]) if "--threads" in args else 2
        runs = int(args[args.index("--runs") + 1]) if "--runs" in args else 5
        only = args[args.index("--kernel") + 1] if "--kernel" in args else None
        cpu(threads, runs, only)


if __name__ == "__main__":
    main()
