"""
Simulated post-training quantization with PyTorch's own primitives (its observers pick the scales,
torch.fake_quantize_* rounds): how much loss do a model's outliers cost when its numbers get 8 or 4 bits?

    result = ptq_losses(model, batches)   # loss in float32, W8 (weights alone), W8A8 and W4, and the changes

- W8A8: every Linear of the blocks has int8 weights per output channel (symmetric) and int8 inputs per tensor
  (asymmetric, min/max over the calibration batches): a single massive entry stretches that one scale and
  rounds every small activation of the tensor to the zero point.
- W4: 4-bit weights per output channel (symmetric, -8..7), activations in float32.
The embedding and the head (tied to it or not) stay in float32, as is common. Quantization lives inside a
with-block and the float weights come back afterwards. Imports nothing of ours.
"""

import contextlib
import math

import torch
import torch.nn as nn
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver


def block_linears(model):
    """The Linear layers inside the transformer blocks (not the head)."""
    return [m for m in model.transformer.h.modules() if isinstance(m, nn.Linear)]


def weight_observer(bits, device):
    """Per-output-channel symmetric `bits`-bit observer of a (out, in) weight, its buffers on `device` (an
    observer starts on the CPU, and copying a CUDA min/max into CPU buffers gives a CPU scale for a CUDA weight)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                    quant_min=qmin, quant_max=qmax).to(device)


def input_observer(bits, device):
    """Per-tensor asymmetric `bits`-bit observer (quant range 0..2^bits - 1), its buffers on `device`."""
    return MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0,
                          quant_max=2 ** bits - 1).to(device)


def quantize_weight(weight, bits):
    """Per-output-channel symmetric fake quantization of a (out, in) weight to `bits` bits."""
    observer = weight_observer(bits, weight.device)
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(weight, scale.float(), zero_point.int(), 0, observer.quant_min,
                                                  observer.quant_max)


@contextlib.contextmanager
def quantized_weights(model, bits):
    """Inside the block, every block Linear's weight is its `bits`-bit per-channel fake-quantized copy."""
    linears = block_linears(model)
    saved = [layer.weight.data for layer in linears]
    try:
        with torch.no_grad():
            for layer in linears:
                layer.weight.data = quantize_weight(layer.weight.data, bits)
        yield model
    finally:
        for layer, weight in zip(linears, saved):
            layer.weight.data = weight


@contextlib.contextmanager
def forward_pre_hooks(modules, fn):
    """fn(module, inputs) on every module's input for the duration of the block (PyTorch's own module hooks)."""
    handles = [module.register_forward_pre_hook(fn) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def calibrate_inputs(model, batches, bits=8):
    """One observer per block Linear, fed with its inputs over the calibration batches: {Linear: (scale, zero
    point)} of a per-tensor asymmetric `bits`-bit quantization (quant range 0..2^bits - 1)."""
    observers = {layer: input_observer(bits, layer.weight.device) for layer in block_linears(model)}

    def observe(module, inputs):
        observers[module](inputs[0].detach().float())

    with torch.no_grad(), forward_pre_hooks(observers, observe):
        for x, y in batches:
            model(x, y)
    return {layer: observer.calculate_qparams() for layer, observer in observers.items()}


@contextlib.contextmanager
def quantized_inputs(model, qparams, bits=8):
    """Inside the block, every block Linear sees its input fake-quantized per tensor with the calibrated scales."""
    def quantize(module, inputs):  # tensor scale and zero point: on the input's device, no host sync per call
        scale, zero_point = qparams[module]
        x = torch.fake_quantize_per_tensor_affine(inputs[0], scale.float(), zero_point.int(), 0, 2 ** bits - 1)
        return (x,) + tuple(inputs[1:])

    with forward_pre_hooks(qparams, quantize):
        yield model


@torch.no_grad()
def mean_loss(model, batches):
    return sum(model(x, y)[1].item() for x, y in batches) / len(batches)


def ptq_losses(model, batches, calibration=None):
    """Loss over `batches` in float32, with W8A8 and with W4 weights (activation scales calibrated on
    `calibration`, default the batches themselves), the changes against float32 and the perplexities."""
    was_training = model.training
    model.eval()
    try:
        float_loss = mean_loss(model, batches)
        with quantized_weights(model, 8):
            w8 = mean_loss(model, batches)  # the weights' share of W8A8's damage
            qparams = calibrate_inputs(model, calibration or batches)  # the inputs of the int8-weight model
            with quantized_inputs(model, qparams):
                w8a8 = mean_loss(model, batches)
        with quantized_weights(model, 4):
            w4 = mean_loss(model, batches)
    finally:
        model.train(was_training)
    return {"loss_float": float_loss, "loss_w8": w8, "loss_w8a8": w8a8, "loss_w4": w4,
            "delta_w8": w8 - float_loss, "delta_w8a8": w8a8 - float_loss, "delta_w4": w4 - float_loss,
            "ppl_float": math.exp(min(float_loss, 50.0)), "ppl_w8a8": math.exp(min(w8a8, 50.0)),
            "ppl_w4": math.exp(min(w4, 50.0))}
