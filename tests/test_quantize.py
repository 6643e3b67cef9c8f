"""sinkgpt.quantize: PyTorch's fake quantization as the arithmetic predicts (an outlier stretches the per-tensor
scale and the small entries round to zero; per-channel weights keep every row's own scale), weights restored
after the block, and W8A8 / W4 losses of models with and without an outlier."""
import math

import torch

from conftest import randomize, tiny
from sinkgpt.quantize import block_linears, calibrate_inputs, ptq_losses, quantize_weight, quantized_weights


def test_one_outlier_rounds_every_small_entry_of_its_tensor_to_zero():
    x = torch.linspace(-1.0, 1.0, 101)
    x[50] = 1000.0  # one massive entry among entries of size <= 1
    from torch.ao.quantization.observer import MinMaxObserver
    observer = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)
    observer(x)
    scale, zero_point = observer.calculate_qparams()
    assert math.isclose(float(scale), 1001.0 / 255, rel_tol=1e-6) and int(zero_point) == 0  # (max - min) / 255
    q = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, 255)
    small = x.abs() <= 1.0
    assert torch.equal(q[small], torch.zeros(int(small.sum())))  # |x| < scale / 2 = 1.96: all become 0
    assert abs(q[50].item() - 1000.0) <= float(scale) / 2
    without = torch.linspace(-1.0, 1.0, 101)  # the same entries without the outlier keep 2/255 resolution
    observer = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)
    observer(without)
    scale, zero_point = observer.calculate_qparams()
    q = torch.fake_quantize_per_tensor_affine(without, float(scale), int(zero_point), 0, 255)
    assert (q - without).abs().max() <= float(scale) / 2 + 1e-7 and float(scale) < 0.008


def test_per_channel_weights_keep_each_rows_scale():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    w[2] *= 1000.0  # one row far larger: it does not coarsen the others
    for bits, levels in ((8, 127), (4, 7)):
        q = quantize_weight(w, bits)
        row_scale = w.abs().amax(1, keepdim=True) / levels
        assert ((q - w).abs() <= row_scale / 2 + 1e-6 * row_scale).all()
        assert len(torch.unique(q[0])) <= 2 * levels + 1


def test_weights_come_back_after_the_block():
    model = randomize(tiny()).eval()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with quantized_weights(model, 4):
        assert any(not torch.equal(layer.weight, before[f"transformer.{n}.weight"]) for n, layer in
                   ((n, m) for n, m in model.transformer.named_modules() if m in block_linears(model)))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(layer._forward_pre_hooks for layer in block_linears(model))


def batches(model, n=2, B=4, T=16):
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 37, (B, T), generator=g), torch.randint(0, 37, (B, T), generator=g)) for _ in range(n)]


def test_w8a8_barely_moves_a_model_without_outliers_and_an_outlier_makes_it_expensive():
    model = randomize(tiny(), scale=0.3).eval()
    data = batches(model)
    plain = ptq_losses(model, data)
    assert abs(plain["delta_w8a8"]) < 0.02 and abs(plain["delta_w4"]) < 0.5  # measured: about 1e-3 and 5e-2
    assert math.isclose(plain["ppl_float"], math.exp(plain["loss_float"]))
    qparams = calibrate_inputs(model, data)
    assert set(qparams) == set(block_linears(model))
    # an outlier channel in every MLP input (a huge norm gain): per-tensor int8 now rounds the rest away
    with torch.no_grad():
        for block in model.transformer.h:
            block.ln_2.weight[5] = 2000.0
            block.mlp.c_fc.weight[:, 5] *= 1e-3  # the float model hardly changes
    spiky = ptq_losses(model, data)
    assert abs(spiky["loss_float"] - plain["loss_float"]) < 0.5
    # a random model's loss can move either way under rounding noise: the size of the change is what grows
    assert abs(spiky["delta_w8a8"]) > 10 * max(abs(plain["delta_w8a8"]), 1e-3)
