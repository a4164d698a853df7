"""einfuse from Python: compile cascades of Einsums (attention and its variants) and call the
kernels on NumPy arrays or torch tensors.

    import numpy as np, einfuse
    program = einfuse.compile_file("examples/attention.ein")
    attention = program.kernel("attention")
    out = attention(Q=q, K=k, V=v)          # {"AV": array}; numpy in, numpy out
    einfuse.analyze(source)                 # the same object as `einfuse analyze --json`

Every user error raises `einfuse.EinfuseError` (a `ValueError`) whose message is the diagnostic
the command line prints. The kernels compute in float32: float32 inputs that are contiguous are
read in place, without a copy; float16 and bfloat16 (torch) inputs are widened to float32 (a
copy), and any other strides are copied once into row-major order. Do not write an input
from another thread while a call reads it (nor resize a torch input). Outputs come back in their storage type
(float16 as float16; bfloat16 as torch.bfloat16 for torch, float32 for NumPy, which has no
bfloat16 of its own).
"""

import json
import os
import threading

import numpy as np

from . import _native
from ._native import EinfuseError

__all__ = [
    "EinfuseError",
    "Kernel",
    "Port",
    "Program",
    "TARGETS",
    "analyze",
    "compile",
    "compile_file",
    "emit",
    "explain",
]

#: The targets, as the command line names them.
TARGETS = ("interp", "cpu", "cpu-llvm", "gpu-emu", "gpu")


class Port:
    """An input or output of a kernel: its name, the names of its ranks, the fixed extent of each
    (None where the call binds it) and its storage type ("f32", "f16" or "bf16")."""

    __slots__ = ("name", "ranks", "extents", "dtype")

    def __init__(self, name, ranks, extents, dtype):
        self.name, self.ranks, self.extents, self.dtype = name, tuple(ranks), tuple(extents), dtype

    def __repr__(self):
        return f"Port({self.name}[{', '.join(self.ranks)}]: {self.dtype})"


def _error(message):
    return EinfuseError(f"error: {message}")


def _count(what, value):
    """`value` as a whole number of at least 1 (or None), else an EinfuseError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise _error(f"{what} must be a whole number of at least 1, not {value!r}")
    return int(value)


def _params(params):
    if params is None:
        return []
    if not isinstance(params, dict):
        raise _error(f"params must be a dict from name to number, not {type(params).__name__}")
    out = []
    for name, value in params.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise _error(f"param {name!r} must be a number, not {value!r}")
        out.append((name, float(value)))
    return out


def _offsets(offsets):
    if not offsets:
        return None
    if not isinstance(offsets, dict):
        raise _error(f"offsets must be a dict from rank name to position, not {type(offsets).__name__}")
    out = []
    for name, value in offsets.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise _error(f"the offset of rank {name!r} must be a whole number, not {value!r}")
        out.append((name, int(value)))
    return out


def _to_numpy(array, dtype):
    if dtype == "f16":
        return array.astype(np.float16)
    return array


def _to_torch(tensor, dtype):
    import torch

    if dtype == "f16":
        return tensor.to(torch.float16)
    if dtype == "bf16":
        return tensor.to(torch.bfloat16)
    return tensor


class Kernel:
    """A compiled kernel. Call it with its inputs as keyword arguments, NumPy arrays or torch
    tensors; it returns a dict from output name to an array of the kind it was given. Symbolic
    ranks are bound from the shapes; a shape that disagrees names the tensor, the rank and both
    sizes. Kernels release the interpreter lock while they run and may be called from several
    threads at once."""

    def __init__(self, native, program):
        self._native = native
        self._program = program
        self.name = native.name
        self.inputs = [Port(*p) for p in native.inputs]
        self.outputs = [Port(*p) for p in native.outputs]
        self._output_dtypes = {p.name: p.dtype for p in self.outputs}
        self._narrow_outputs = any(p.dtype != "f32" for p in self.outputs)

    def __repr__(self):
        ins = ", ".join(repr(p) for p in self.inputs)
        outs = ", ".join(repr(p) for p in self.outputs)
        return f"<einfuse kernel {self.name}({ins}) -> {outs}>"

    @property
    def source(self):
        """The cascade that runs (after optimization, when asked for), as `.ein`."""
        return self._native.source

    def __call__(self, **inputs):
        return self.call(inputs)

    def call(self, inputs, *, offsets=None, params=None):
        """Calls the kernel on `inputs` (a dict by input name).

        `offsets` ({rank: position}) says where along a batch rank (one that every output holds
        and nothing reduces) these arrays sit in a longer sequence: index values and filters (a
        causal mask, ALiBi's distances) see global positions. `params` ({name: value}) overrides
        params for this call: each distinct set of values compiles its kernel once, and is kept.
        """
        if params:
            _params(params)
            return self._program._with_params(params).kernel(self.name).call(inputs, offsets=offsets)
        outputs, torch_in = self._native.call(inputs, _offsets(offsets))
        if self._narrow_outputs:
            convert = _to_torch if torch_in else _to_numpy
            return {name: convert(value, self._output_dtypes[name]) for name, value in outputs.items()}
        return outputs


class Program:
    """The compiled kernels of one source, in source order."""

    def __init__(self, source, path, options):
        self._source, self._path, self._options = source, path, options
        natives = _native.compile(source, path, **options)
        self.kernels = [Kernel(n, self) for n in natives]
        self._variants = {}
        self._lock = threading.Lock()

    def kernel(self, name=None):
        """The kernel named `name` (or the only one)."""
        if name is None:
            if len(self.kernels) == 1:
                return self.kernels[0]
            names = ", ".join(k.name for k in self.kernels)
            raise _error(f"{self._path} has several kernels ({names}): choose one by name")
        for k in self.kernels:
            if k.name == name:
                return k
        names = ", ".join(k.name for k in self.kernels)
        raise _error(f"no kernel `{name}` (there are: {names})")

    __getitem__ = kernel

    def _with_params(self, params):
        key = tuple(sorted((str(k), float(v)) for k, v in params.items()))
        with self._lock:
            if key not in self._variants:
                merged = dict(self._options["params"])
                merged.update(dict(key))
                options = dict(self._options, params=list(merged.items()))
                self._variants[key] = Program(self._source, self._path, options)
            return self._variants[key]


def compile(
    source,
    target="cpu",
    *,
    optimize=True,
    tile=None,
    params=None,
    check_finite=True,
    threads=None,
    split_keys=None,
    path="<source>",
):
    """Compiles every kernel of `source` (`.ein` text) for `target` ("interp", "cpu", "cpu-llvm",
    "gpu-emu" or "gpu"). Options as the Rust `CompileOptions`: `optimize` (the e-graph optimizer,
    on by default), `tile` (split ranks' tile), `params` ({name: value}, compiled in), `check_finite`
    (raise when an output holds an infinity or NaN), `threads` (default: every core) and
    `split_keys` (the Flash-Decoding form with chunks of this many keys)."""
    options = {
        "target": target,
        "optimize": bool(optimize),
        "tile": _count("tile", tile),
        "params": _params(params),
        "check_finite": bool(check_finite),
        "threads": _count("threads", threads),
        "split_keys": _count("split_keys", split_keys),
    }
    return Program(source, path, options)


def compile_file(path, target="cpu", **options):
    """`compile` on the text of a file; errors name the file."""
    path = os.fspath(path)
    return compile(_native.read_source(path), target, path=path, **options)


def analyze(source, kernel=None, *, path="<source>"):
    """Passes per rank, as written and optimized: the object `einfuse analyze --json` prints,
    {"kernels": [{"name", "passes", "optimized_passes"}]}."""
    return json.loads(_native.analyze(source, path, kernel))


def emit(source, stage="opt", kernel=None, *, target="nvptx", chunk=1024, path="<source>"):
    """The text `einfuse emit --stage STAGE` prints: "ast", "ir", "opt", "split", "loops", "clif",
    "llvm", "llvm-opt" or "ptx" (`target` picks the LLVM module, `chunk` the split's keys)."""
    return _native.emit(source, path, stage, kernel, target, _count("chunk", chunk))


def explain(source, kernel=None, *, path="<source>"):
    """The optimizer's derivation, as `einfuse explain` prints it."""
    return _native.explain(source, path, kernel)
