"""
Faster KV-cache decoding on CPUs: GPT.generate does the decoding; this module only changes how the linear
layers multiply while it runs.

    with decode_layout(model):
        out = model.generate(idx, 64, temperature=0)

Decoding a token multiplies one row per sequence by every weight matrix, so it is bound by reading the weights.
On the CPU we measured, F.linear on one row (a matrix-vector product in the BLAS) takes 2.5-3x as long as
reading the weights, while the same product written as a batched matrix product over row blocks of the weight
runs another kernel in 1.1-1.3x (bench.py --generate --decode_floor times both, beside reading every weight
once):

    x @ W.T  ==  bmm(W.view(parts, out / parts, in), x.T expanded to (parts, in, rows)), blocks stacked

The weight blocks are a view of nn.Linear's (out, in) weight: nothing is copied, nothing is cached. Inside the
`with`, every nn.Linear given at most FEW_ROWS rows (the decode steps) multiplies them that way, more rows (a
prompt's prefill) as always. The sums run in another order, so results differ from F.linear by rounding only.
On other devices the layout changes nothing.

Imports nothing of ours.
"""

import contextlib
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = 4  # up to here the row-block product beats F.linear on every GPT-2 and SmolLM2 layer shape; at 6-8 not


def row_blocks():
    """How many row blocks a weight is split into: one per thread, and two on one thread (the batched kernel is
    the fast one even there)."""
    return max(2, torch.get_num_threads())


def row_block_product(x, weight, parts):
    """x @ weight.T for x (..., in) with few rows, as one batched product over `parts` equal row blocks of the
    (out, in) weight; the out % parts rows left over (GPT-2's 50,257-row head on 2 blocks: one) as one small
    product. The rows go in transposed, strides (1, in): any layout gives the same result, that one the speed."""
    out_features, in_features = weight.shape
    parts = min(parts, out_features)
    blocked = out_features - out_features % parts
    columns = x.reshape(-1, in_features).t()  # (in, rows)
    y = torch.bmm(weight[:blocked].view(parts, blocked // parts, in_features), columns.expand(parts, -1, -1))
    y = y.view(blocked, -1)  # (parts, out/parts, rows) -> (blocked, rows)
    if blocked < out_features:
        y = torch.cat([y, weight[blocked:] @ columns])
    return y.t().reshape(*x.shape[:-1], out_features)


def _decode_forward(linear, x):
    """nn.Linear.forward inside the layout (bound to one layer as its own `forward`)."""
    if x.shape[:-1].numel() > FEW_ROWS or not linear.weight.is_contiguous():  # a prefill, or a weight no view can split
        return F.linear(x, linear.weight, linear.bias)
    y = row_block_product(x, linear.weight, row_blocks())
    return y if linear.bias is None else y.add_(linear.bias)  # in place: keeps y's dtype under autocast


@contextlib.contextmanager
def decode_layout(model):
    """While the `with` runs (on a CPU model), linear layers multiply few-row inputs as row-block products."""
    first = next(model.parameters(), None)
    on_cpu = first is not None and first.device.type == "cpu"
    # a layer that already has a forward of its own (an enclosing decode_layout, a hooking library) keeps it
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and "forward" not in m.__dict__] if on_cpu else []
    try:
        for layer in layers:  # an instance attribute shadows nn.Linear.forward for this module only
            layer.forward = types.MethodType(_decode_forward, layer)  # bound: a deepcopy binds to the copy
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
