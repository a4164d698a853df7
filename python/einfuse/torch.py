"""einfuse kernels as PyTorch custom operators, so that `torch.compile` calls them without a
graph break.

    import einfuse, einfuse.torch
    kernel = einfuse.compile(source).kernel("attention")
    attention = einfuse.torch.custom_op(kernel, "mylib::attention")
    out = attention(q, k, v)          # inputs in the kernel's order; one output: a tensor

The operator's schema takes the kernel's inputs as tensors, in declaration order, and returns its
outputs (one tensor, or a tuple). Its shape-only (fake) implementation binds the kernel's ranks
from the input shapes, so that tracing never runs the kernel. The kernel runs on CPU tensors.
"""

import torch

_LIBRARIES = {}
_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _output_shapes(kernel, tensors):
    """Each output's shape, from the ranks the inputs bind (fixed extents as declared)."""
    bound = {}
    for port, tensor in zip(kernel.inputs, tensors):
        torch._check(tensor.dim() == len(port.ranks), lambda: f"input `{port.name}` has {len(port.ranks)} ranks")
        for rank, fixed, size in zip(port.ranks, port.extents, tensor.shape):
            if fixed is not None:
                torch._check(size == fixed, lambda: f"input `{port.name}`: rank `{rank}` has size {fixed}")
            bound.setdefault(rank, fixed if fixed is not None else size)
    shapes = []
    for port in kernel.outputs:
        shape = []
        for rank, fixed in zip(port.ranks, port.extents):
            if fixed is not None:
                shape.append(fixed)
            elif rank in bound:
                shape.append(bound[rank])
            else:
                raise ValueError(f"output `{port.name}`: rank `{rank}` is not bound by any input")
        shapes.append(shape)
    return shapes


def custom_op(kernel, name):
    """Registers `kernel` (an `einfuse.Kernel`) as the PyTorch operator `name` ("namespace::op")
    with a fake implementation; returns the operator (`torch.ops.namespace.op`)."""
    namespace, _, op = name.partition("::")
    if not namespace or not op:
        raise ValueError(f"an operator name is `namespace::name`, not `{name}`")
    for port in kernel.outputs:
        if any(r not in {q for p in kernel.inputs for q in p.ranks} and e is None
               for r, e in zip(port.ranks, port.extents)):
            raise ValueError(f"output `{port.name}` of kernel `{kernel.name}` has a rank no input binds")
    names = [p.name for p in kernel.inputs]
    arguments = ", ".join(f"Tensor {n}" for n in names)
    returns = "Tensor" if len(kernel.outputs) == 1 else "(" + ", ".join("Tensor" for _ in kernel.outputs) + ")"
    library = _LIBRARIES.get(namespace)
    if library is None:
        library = _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    library.define(f"{op}({arguments}) -> {returns}")

    def run(*tensors):
        outputs = kernel.call(dict(zip(names, (t.contiguous() for t in tensors))))
        values = tuple(outputs[p.name] for p in kernel.outputs)
        return values[0] if len(values) == 1 else values

    def fake(*tensors):
        shapes = _output_shapes(kernel, tensors)
        values = tuple(tensors[0].new_empty(shape, dtype=_DTYPES[p.dtype]) for p, shape in zip(kernel.outputs, shapes))
        return values[0] if len(values) == 1 else values

    library.impl(op, run, "CPU")
    torch.library.register_fake(name, fake, lib=library)
    return getattr(getattr(torch.ops, namespace), op)
