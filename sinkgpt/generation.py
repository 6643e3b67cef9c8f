"""
Faster KV-cache decoding on CPUs: GPT.generate does the decoding; this module only changes how the linear
layers multiply while it runs.

    with decode_layout(model):
        out = model.generate(idx, 64, temperature=0)

Decoding a token multiplies one row per sequence by every weight matrix, so it is bound by reading the weights.
On the CPUs we measured, F.linear on one row (a matrix-vector product in the BLAS) reads the weights at a
quarter to a third of the memory bandwidth, while the same product written as a batched matrix product over
row blocks of the weight runs another kernel at about the bandwidth (bench.py --generate --decode_floor: ours,
'the matrix-vector products alone', 'reading every weight once'):

    x @ W.T  ==  bmm(W.view(parts, out / parts, in), x.T expanded to (parts, in, rows)), blocks stacked

The weight blocks are a view of nn.Linear's (out, in) weight: nothing is copied, nothing is cached. Inside the
block every nn.Linear with at most FEW_ROWS rows of input (the decode steps) multiplies that way, the rest (a
prompt's prefill) as always. The sums run in another order, so results differ from F.linear by rounding only.
On other devices the block changes nothing.

Imports nothing of ours.
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = 4  # up to here the row-block product beats F.linear on every GPT-2 and SmolLM2 layer shape; at 6-8 not


def row_blocks(out_features, threads=None):
    """How many row blocks the product splits a weight into: one per thread (at least two, so that the batched
    kernel is used even on one thread), a divisor of out_features; 1 (use F.linear) where none is."""
    return math.gcd(out_features, max(2, threads or torch.get_num_threads()))


def row_block_product(x, weight, parts):
    """x @ weight.T for x (..., in) with few rows, as one batched product over `parts` row blocks of the (out, in)
    weight. The right operand must be x transposed, strides (1, in): that layout is what selects the fast kernel."""
    out_features, in_features = weight.shape
    columns = x.reshape(-1, in_features).t()  # (in, rows)
    y = torch.bmm(weight.view(parts, out_features // parts, in_features), columns.expand(parts, -1, -1))
    return y.view(out_features, -1).t().reshape(*x.shape[:-1], out_features)  # (parts, out/parts, rows) -> (..., out)


def _decode_forward(linear, parts, x):
    if x.numel() > FEW_ROWS * linear.in_features:
        return F.linear(x, linear.weight, linear.bias)
    y = row_block_product(x, linear.weight, parts)
    return y if linear.bias is None else y + linear.bias


@contextlib.contextmanager
def decode_layout(model):
    """While the block runs (on a CPU model), linear layers multiply few-row inputs as row-block products."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.is_contiguous()] if on_cpu else []
    try:
        for layer in layers:  # an instance attribute shadows nn.Linear.forward for this module only
            parts = row_blocks(layer.out_features)
            if parts > 1:
                layer.forward = lambda x, layer=layer, parts=parts: _decode_forward(layer, parts, x)
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
