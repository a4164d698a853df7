#!/usr/bin/env python3
"""einfuse against PyTorch's scaled_dot_product_attention, on the same inputs, in one run.

    python3 benches/compare_torch.py cpu [--threads 2] [--runs 5] [--kernel NAME] [--no-variants] [--no-layouts]
        The CPU targets of docs/performance.md (fp32, 2 threads), every kernel of
        benches/pytorch.ein, written in PyTorch's layout: prefill H=8 D=64 P=M=4096, causal
        prefill, decode H=32 D=128 P=1 M=16384, GQA; the variants (ALiBi + soft-capping +
        causal, sigmoid, softplus-l1, sinks) at the prefill shape; and prefill at P=M=2048 in
        three layouts. For each: random inputs written as .npy, einfuse (cpu-llvm) run on them
        and checked against PyTorch (SDPA, or an eager expression for the variants SDPA lacks),
        then both timed (einfuse with `einfuse bench --target both`, PyTorch's SDPA with the
        median of --runs calls). PyTorch gets the same data as contiguous [1, H, P, E] tensors,
        its own fast configuration. PyTorch (pinned, TORCH below) is installed into
        ~/.cache/einfuse/torch-venv (EINFUSE_TORCH_VENV_DIR) when missing: a large download,
        outside the clone, not part of CI.

    python3 benches/compare_torch.py gpu OUT
        On a GPU machine, after `einfuse gpu-check` wrote its inputs, outputs and times: first the
        kernels of benches/gpu.ein in PyTorch's layout (16-bit on tensor cores against PyTorch's
        flash backend, pinned, and its default dispatch; fp32 against its fp32 SDPA), timed with
        CUDA events on both sides; then, after OUT/gpu_prefill.*.npy and its time:
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

# The PyTorch the comparisons install and were measured with.
TORCH = "torch==2.15.0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_torch():
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    # Outside the clone, so that every checkout and CI run reuses it (about 5 GB installed).
    venv = os.environ.get("EINFUSE_TORCH_VENV_DIR", os.path.expanduser("~/.cache/einfuse/torch-venv"))
    python = os.path.join(venv, "bin", "python")
    if os.environ.get("EINFUSE_TORCH_VENV") == "1":
        sys.exit(f"PyTorch is still missing after installing it into {venv}")
    if not os.path.exists(python):
        subprocess.check_call([sys.executable, "-m", "venv", venv])
    subprocess.check_call([python, "-m", "pip", "install", "--quiet", "numpy", TORCH])
    os.environ["EINFUSE_TORCH_VENV"] = "1"
    os.execv(python, [python] + sys.argv)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def sdpa(torch, q, k, v, scale, causal):
    """SDPA on contiguous [1, H, P, E] tensors (PyTorch's own layout, made once by `to_torch_layout`);
    returns [1, H, P, F]."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def to_torch_layout(x):
    """einfuse's [H, E, P] (the GPU benchmark kernels' layout) as PyTorch's contiguous [1, H, P, E]:
    a copy, so that PyTorch runs in its own fast configuration (a permuted view, whose last
    dimension is not contiguous, sends SDPA to a slow path)."""
    return x.permute(0, 2, 1).unsqueeze(0).contiguous()


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
    tq, tk, tv = (to_torch_layout(torch.from_numpy(x).to(dev).to(kind)) for x in (q, k, v))
    # Back in einfuse's [H, F, P] to compare.
    ref = sdpa(torch, tq, tk, tv, scale, False).squeeze(0).permute(0, 2, 1).float()
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


# The kernels of benches/gpu.ein, in PyTorch's layout: the kernel, its scale, dtype and mask.
PYTORCH_LAYOUT_GPU = (
    ("tc_prefill_bf16", 0.125, "bf16", False),
    ("tc_prefill_f16", 0.125, "f16", False),
    ("tc_causal_bf16", 0.125, "bf16", True),
    ("tc_prefill_d128_bf16", 0.08838834764831845, "bf16", False),
    ("tc_causal_d128_bf16", 0.08838834764831845, "bf16", True),
    ("prefill_f32", 0.125, "fp32", False),
    ("decode_bf16", 0.08838834764831845, "bf16", False),
)

# The split-key forms `gpu-check` times beside a kernel, by kernel.
SPLIT_FORMS = {"decode_bf16": ["decode_bf16_split256", "decode_bf16_split1024"]}


def copy_bandwidth(torch):
    """The device's copy bandwidth in bytes per second (bytes read plus bytes written), from the
    median time of copying 1 GiB, in the same run as the kernels."""
    dev = torch.device("cuda")
    src = torch.empty(1 << 28, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    seconds = gpu_time(torch, lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / seconds


def gpu_compare_pytorch_layout(torch, out_dir, name, scale, dtype, causal, bandwidth=None):
    """einfuse's time for `name` (benches/gpu.ein, inputs saved in PyTorch's [H, P, E]) against
    SDPA on the same data as contiguous [1, H, P, E]: PyTorch's default dispatch, and for 16-bit
    inputs its flash backend pinned with `sdpa_kernel`; returns the report's lines and whether
    they agree."""
    import numpy as np
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (np.load(os.path.join(out_dir, f"{name}.{t}.npy")) for t in ("Q", "K", "V"))
    dev = torch.device("cuda")
    kind = {"bf16": torch.bfloat16, "f16": torch.float16, "fp32": torch.float32}[dtype]
    tq, tk, tv = (torch.from_numpy(x).to(dev).to(kind).unsqueeze(0).contiguous() for x in (q, k, v))
    call = lambda: sdpa(torch, tq, tk, tv, scale, causal)
    ref = call().squeeze(0).float()
    torch.cuda.synchronize()
    h, p, e = q.shape
    m = k.shape[1]
    flops = 4 * h * p * m * e / (2 if causal else 1)
    peers = [("pytorch (default dispatch)", gpu_time(torch, call))]
    if dtype != "fp32":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            peers.append(("pytorch (flash, pinned)", gpu_time(torch, call)))
    lines = [f"{name} H={h} P={p} M={m} D={e} {dtype}{' causal' if causal else ''} (PyTorch's layout)"]
    for label, seconds in peers:
        lines.append(f"  {label}: {seconds * 1e3:.3f} ms  {flops / seconds / 1e12:.3f} TFLOP/s")
    # The bytes of K and V, and what reading them once at the copy bandwidth would take.
    kv_bytes = k.size * 2 * (2 if dtype != "fp32" else 4)
    ok = True
    for variant in [name] + SPLIT_FORMS.get(name, []):
        timing = os.path.join(out_dir, f"{variant}.time.txt")
        if not os.path.exists(timing):
            lines.append(f"  einfuse {variant}: no time (einfuse did not run it)")
            continue
        with open(timing) as f:
            einfuse_s = float(f.read())
        av = np.load(os.path.join(out_dir, f"{variant}.AV.npy"))
        err = float((ref.cpu() - torch.from_numpy(av)).abs().max())
        # 16-bit probabilities and outputs on both sides: a few units in the last place of values
        # below 4 in size.
        tolerance = 1e-3 if dtype == "fp32" else 3e-2
        ok &= err <= tolerance
        ratios = "; ".join(f"vs {label} {seconds / einfuse_s:.3f}x" for label, seconds in peers)
        memory = f"{kv_bytes / einfuse_s / 1e9:.1f} GB/s of K and V"
        if bandwidth:
            memory += f" ({kv_bytes / einfuse_s / bandwidth:.0%} of the copy bandwidth)"
        lines.append(f"  einfuse {variant}: {einfuse_s * 1e3:.3f} ms  {flops / einfuse_s / 1e12:.3f} TFLOP/s  {memory}; "
                     f"{ratios}; largest absolute difference {err:.3e}")
    return lines, ok


def gpu(out_dir):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    lines = [f"device: {torch.cuda.get_device_name(0)}"]
    bandwidth = copy_bandwidth(torch)
    lines.append(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read and written, 1 GiB, median of 10)")
    ok = True
    # PyTorch's layout first (benches/gpu.ein), then einfuse's earlier [H, E, P] kernels.
    cases = [(name, gpu_compare_pytorch_layout, (scale, dtype, causal, bandwidth))
             for name, scale, dtype, causal in PYTORCH_LAYOUT_GPU]
    cases += [(name, gpu_compare, (scale, variants, dtype)) for name, scale, variants, dtype in (
        ("gpu_prefill", 0.125, [], "fp32"),
        ("gpu_prefill_bf16", 0.125, [], "bf16"),
        ("gpu_prefill_d128", 0.08838834764831845, [], "fp32"),
        ("decode", 0.08838834764831845, ["decode_split256", "decode_split1024"], "fp32"),
    )]
    for name, compare, args in cases:
        if not os.path.exists(os.path.join(out_dir, f"{name}.Q.npy")):
            lines.append(f"{name}: no inputs (einfuse did not run it)")
            continue
        more, agree = compare(torch, out_dir, name, *args)
        lines += more
        ok &= agree
    print("\n".join(lines))
    with open(os.path.join(out_dir, "torch.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not ok:
        sys.exit("einfuse and PyTorch disagree")


# The CPU comparison's cases, all in PyTorch's layout (benches/pytorch.ein): the kernel, its
# symbolic extents, PyTorch's reference (a function of the inputs by name, each a contiguous
# tensor in the kernel's layout, returning AV in that layout) and whether that reference is
# SDPA itself (timed as the peer) or an eager PyTorch expression (only checked against).
PLAIN = ("prefill", "prefill_causal", "decode")


def torch_reference(torch, kernel, x, scale):
    """AV of `kernel` on the inputs `x` (contiguous, in the kernel's layout), by PyTorch."""
    F = torch.nn.functional
    q, k, v = x["Q"], x["K"], x["V"]
    if kernel in PLAIN or kernel == "gqa":
        if kernel == "gqa":
            # Q[H, G, P, E] is PyTorch's [B, H * G, P, E]: query head h * G + g reads head h.
            h, g, p, e = q.shape
            q4 = q.reshape(1, h * g, p, e)
            out = F.scaled_dot_product_attention(q4, k.unsqueeze(0), v.unsqueeze(0), scale=scale, enable_gqa=True)
            return out.reshape(h, g, p, -1)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=kernel == "prefill_causal", scale=scale
        )
        return out.squeeze(0)
    if kernel == "prefill_phe":
        out = F.scaled_dot_product_attention(
            q.permute(1, 0, 2).unsqueeze(0), k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0),
            scale=scale)
        return out.squeeze(0).permute(1, 0, 2)
    if kernel == "prefill_hep":
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).unsqueeze(0), k.transpose(1, 2).unsqueeze(0), v.transpose(1, 2).unsqueeze(0),
            scale=scale)
        return out.squeeze(0).transpose(1, 2)
    s = (q @ k.transpose(1, 2)) * scale
    p_idx = torch.arange(q.shape[1]).view(1, -1, 1)
    m_idx = torch.arange(k.shape[1]).view(1, 1, -1)
    if kernel == "alibi_softcap_causal":
        s = 50.0 * torch.tanh(s / 50.0) + x["Slope"].view(-1, 1, 1) * (m_idx - p_idx)
        s = s.masked_fill(m_idx > p_idx, float("-inf"))
        w = torch.softmax(s, dim=-1)
    elif kernel == "sigmoid":
        w = torch.sigmoid(s - 4.0)
    elif kernel == "softplus_l1":
        w = F.softplus(s)
        w = w / w.sum(dim=-1, keepdim=True)
    elif kernel == "sinks":
        gm = s.amax(dim=-1, keepdim=True)
        e = torch.exp(s - gm)
        w = e / (e.sum(dim=-1, keepdim=True) + torch.exp(x["Sink"].view(-1, 1, 1) - gm))
    else:
        raise ValueError(kernel)
    return w @ v


def input_shapes(kernel, extents):
    """The inputs of a kernel of benches/pytorch.ein and their shapes at the symbolic `extents`."""
    sizes = dict(extents, H=8, G=4, E=64, F=64)
    if kernel == "decode":
        sizes.update(H=32, E=128, F=128, P=1)
    if kernel == "gqa":
        sizes.update(H=2)
    layouts = {"Q": "HPE", "K": "HME", "V": "HMF"}
    if kernel == "gqa":
        layouts["Q"] = "HGPE"
    elif kernel == "prefill_phe":
        layouts = {"Q": "PHE", "K": "MHE", "V": "MHF"}
    elif kernel == "prefill_hep":
        layouts = {"Q": "HEP", "K": "HEM", "V": "HFM"}
    elif kernel == "alibi_softcap_causal":
        layouts["Slope"] = "H"
    elif kernel == "sinks":
        layouts["Sink"] = "H"
    return {name: [sizes[r] for r in layout] for name, layout in layouts.items()}


def cpu(threads, runs, only=None, layouts=True, variants=True):
    """Every case of benches/pytorch.ein on the same contiguous data for PyTorch and einfuse."""
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    einfuse = os.path.join(ROOT, "target", "release", "einfuse")
    subprocess.check_call(["cargo", "build", "--quiet", "--release", "--bin", "einfuse"], cwd=ROOT)
    source = os.path.join(ROOT, "benches", "pytorch.ein")
    long_prefill = {"P": 4096, "M": 4096}
    cases = [("prefill", long_prefill, 0.125), ("prefill_causal", long_prefill, 0.125),
             ("decode", {"M": 16384}, 0.08838834764831845)]
    if variants:
        cases += [(k, long_prefill, 0.125) for k in ("gqa", "alibi_softcap_causal", "sigmoid", "softplus_l1", "sinks")]
    if layouts:
        cases += [(k, {"P": 2048, "M": 2048}, 0.125) for k in ("prefill", "prefill_phe", "prefill_hep")]
    print(f"torch {torch.__version__}, {threads} threads, medians of {runs} runs; einfuse `bench --target both`")
    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        for kernel, extents, scale in cases:
            if only is not None and kernel != only:
                continue
            binds = [arg for r, n in extents.items() for arg in ("--bind", f"{r}={n}")]
            shapes = input_shapes(kernel, extents)
            x = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
            if "Slope" in x:
                # ALiBi's own slopes (Press et al.): 2^(-8 (h + 1) / H), so that distant keys
                # weigh less; random slopes of either sign would make logits near 1e4, where
                # f32 scores themselves are only good to about 1e-3.
                heads = x["Slope"].shape[0]
                x["Slope"] = np.array([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=np.float32)
            paths = {}
            for name, array in x.items():
                paths[name] = os.path.join(work, f"{name}.npy")
                np.save(paths[name], array)
            out = os.path.join(work, "AV.npy")
            subprocess.check_call(
                [einfuse, "run", source, "--kernel", kernel, "--target", "cpu-llvm", "--threads", str(threads)]
                + binds + [f"--input={n}={path}" for n, path in paths.items()] + ["--output", f"AV={out}"],
                stdout=subprocess.DEVNULL,
            )
            tx = {name: torch.from_numpy(array) for name, array in x.items()}
            ref = torch_reference(torch, kernel, tx, scale)
            err = float((ref - torch.from_numpy(np.load(out))).abs().max())
            torch_s = None
            if kernel in PLAIN or kernel == "gqa":
                times = []
                for _ in range(runs + 1):
                    start = time.perf_counter()
                    torch_reference(torch, kernel, tx, scale)
                    times.append(time.perf_counter() - start)
                torch_s = median(times[1:])
            bench = json.loads(subprocess.check_output(
                [einfuse, "bench", source, "--kernel", kernel, "--target", "both", "--json", "--runs", str(runs),
                 "--threads", str(threads)] + binds))
            rows.append((kernel, extents, torch_s, bench["cpu-llvm"], bench, err))
            shape = " ".join(f"{r}={n}" for r, n in extents.items())
            line = f"{kernel} {shape}: cpu-llvm {bench['cpu-llvm']['median_s'] * 1e3:.1f} ms, cpu {bench['median_s'] * 1e3:.1f} ms"
            if torch_s is not None:
                line += (f", pytorch {torch_s * 1e3:.1f} ms: cpu-llvm {torch_s / bench['cpu-llvm']['median_s']:.3f}x, "
                         f"cpu {torch_s / bench['median_s']:.3f}x pytorch's throughput")
            line += (f"; fused vs unfused cpu-llvm {bench['cpu-llvm']['speedup_vs_unfused']:.2f}x, "
                     f"cpu {bench['speedup_vs_unfused']:.2f}x; largest absolute difference from pytorch {err:.2e}")
            print(line, flush=True)
            if not err <= 1e-3:
                sys.exit(f"{kernel}: einfuse and PyTorch disagree")
    print()
    print("| kernel | shape | PyTorch | `cpu-llvm` | `cpu` | fused vs unfused (`cpu-llvm` / `cpu`) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kernel, extents, torch_s, llvm, cranelift, _ in rows:
        shape = ", ".join(f"{r}={n}" for r, n in extents.items())
        ratio = lambda s: f" ({torch_s / s:.2f}x)" if torch_s is not None else ""
        peer = f"{torch_s * 1e3:.1f} ms" if torch_s is not None else "-"
        print(f"| {kernel} | {shape} | {peer} | {llvm['median_s'] * 1e3:.1f} ms{ratio(llvm['median_s'])} | "
              f"{cranelift['median_s'] * 1e3:.1f} ms{ratio(cranelift['median_s'])} | "
              f"{llvm['speedup_vs_unfused']:.2f}x / {cranelift['speedup_vs_unfused']:.2f}x |")


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
        cpu(threads, runs, only, layouts="--no-layouts" not in args, variants="--no-variants" not in args)


if __name__ == "__main__":
    main()
