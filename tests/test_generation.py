"""sinkgpt.generation: inside the CPU decode layout, linear layers multiply few-row inputs as row-block products
(the same product up to rounding, on the current weights, no copies), more rows as nn.Linear does, and the
layout is gone after its `with` (also after an error), leaving any forward of a layer's own alone."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import idx_batch, randomize, tiny
from sinkgpt.generation import FEW_ROWS, decode_layout, row_block_product, row_blocks


@pytest.mark.parametrize("out_features", [48, 47, 3])  # equal blocks; rows left over; fewer rows than blocks
@pytest.mark.parametrize("parts", [2, 3, 8])
@pytest.mark.parametrize("shape", [(24,), (1, 24), (3, 24), (2, 1, 24), (4, 2, 24)])
def test_row_block_product_is_the_linear_product(out_features, parts, shape):
    torch.manual_seed(0)
    weight = torch.randn(out_features, 24, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    y = row_block_product(x, weight, parts)
    assert y.shape == (*shape[:-1], out_features)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=0, atol=1e-12)
    x32, w32 = x.float(), weight.float()  # float32: rounding only (the sums run in another order)
    torch.testing.assert_close(row_block_product(x32, w32, parts), F.linear(x32, w32), rtol=0, atol=1e-5)


def test_row_blocks_are_one_per_thread_and_two_on_one_thread(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert row_blocks() == 2  # the batched kernel is the fast one even on one thread
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert row_blocks() == 16


@pytest.mark.parametrize("bias", [True, False])
def test_decode_layout_multiplies_few_rows_by_blocks_of_the_current_weight(bias, monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias).double()
    model = nn.Sequential(layer)
    blocked = []
    monkeypatch.setattr("sinkgpt.generation.row_block_product",
                        lambda *a, f=row_block_product: blocked.append(a[0].shape) or f(*a))
    few = torch.randn(FEW_ROWS, 1, 24, dtype=torch.float64)
    many = torch.randn(FEW_ROWS + 1, 24, dtype=torch.float64)
    with torch.no_grad(), decode_layout(model):
        for x in (few, many):
            assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-12)
        layer.weight.mul_(2)  # an in-place update (an optimizer step, a load): the blocks are views of it
        assert torch.allclose(layer(few), F.linear(few, layer.weight, layer.bias), rtol=0, atol=1e-12)
        layer.weight = nn.Parameter(torch.randn(24, 40, dtype=torch.float64).t())  # no view splits it: F.linear
        assert torch.allclose(layer(few), F.linear(few, layer.weight, layer.bias), rtol=0, atol=1e-12)
    assert blocked == [few.shape, few.shape]  # the prefill-sized input and the strided weight: F.linear
    assert "forward" not in layer.__dict__


def test_decode_layout_keeps_the_output_dtype_under_autocast():
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    x = torch.randn(2, 1, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x)
        with decode_layout(layer):
            ours = layer(x)
    assert plain.dtype == ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), plain.float(), rtol=0.02, atol=0.02)


def test_decode_layout_leaves_a_forward_of_the_layers_own_and_an_enclosing_layout_alone():
    layers = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    own = layers[1].forward = lambda x: torch.zeros(x.shape[:-1] + (4,))  # e.g. set by a hooking library
    with decode_layout(layers):
        outer = layers[0].__dict__["forward"]
        with decode_layout(layers):
            pass
        assert layers[0].__dict__["forward"] is outer  # the inner `with` did not undo the outer one
        assert layers[1].__dict__["forward"] is own
        twin = copy.deepcopy(layers)  # a copy made inside binds to its own weights
        with torch.no_grad():
            twin[0].weight.zero_(), twin[0].bias.zero_()
        assert torch.equal(twin[0](torch.ones(1, 8)), torch.zeros(1, 6))
    assert "forward" not in layers[0].__dict__ and layers[1].__dict__["forward"] is own
    with decode_layout(nn.ReLU()):  # no parameters: nothing to do
        pass


def test_decode_layout_generates_the_same_tokens_on_the_current_weights_and_always_leaves():
    model = randomize(tiny()).double().eval()
    prompt = idx_batch(model, B=2, T=5)
    plain = model.generate(prompt, 3, temperature=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 1  # c_attn, c_proj, c_fc, c_proj per layer + lm_head (37 rows: one left over)
    with decode_layout(model):
        assert torch.equal(model.generate(prompt, 3, temperature=0), plain)
        assert all("forward" in m.__dict__ for m in linears)
    assert not any("forward" in m.__dict__ for m in linears)
    randomize(model, seed=1)  # new weights, copied in place
    fresh = randomize(tiny(), seed=1).double().eval()
    with decode_layout(model):
        assert torch.equal(model.generate(prompt, 20, temperature=0), fresh.generate(prompt, 20, temperature=0))
    with pytest.raises(IndexError):
        with decode_layout(model):
            model.generate(torch.full((1, 3), 1000), 2, temperature=0)  # an error inside (token out of range)...
    assert not any("forward" in m.__dict__ for m in linears)  # ...still leaves the plain layout


def test_generated_tokens_feed_a_training_forward():
    """generate runs under inference_mode for speed; what it returns is an ordinary tensor, so a forward that
    trains on it (embedding lookups save their indices for backward) works."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=32))
    out = model.generate(torch.zeros((1, 2), dtype=torch.long), 6, temperature=0)
    assert not out.is_inference()
    _, loss = model(out[:, :-1], out[:, 1:])
    loss.backward()
    assert model.transformer.wte.weight.grad is not None
