"""sinkgpt.generation: the CPU decode layout multiplies by an exact (in, out) weight copy, follows in-place weight
updates, touches only the widening layers, and is gone after its block (also after an error)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import idx_batch, randomize, tiny
from sinkgpt.generation import decode_copy_bytes, decode_layout, widening_layers


@pytest.mark.parametrize("bias", [True, False])
def test_decode_layout_computes_the_same_product_and_follows_weight_updates(bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias).double()
    model = nn.Sequential(layer)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    plain = layer(x)
    with torch.no_grad(), decode_layout(model):
        assert torch.allclose(layer(x), plain, rtol=0, atol=1e-12) and decode_copy_bytes(model) == 24 * 40 * 8
        layer.weight.mul_(2)  # an in-place update (an optimizer step, a load) makes a new copy
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-12)
    assert "forward" not in layer.__dict__


def test_decode_layout_copies_the_widening_layers_uses_the_current_weights_and_always_leaves():
    model = randomize(tiny()).double().eval()
    prompt = idx_batch(model, B=2, T=5)
    plain = model.generate(prompt, 3, temperature=0)
    with decode_layout(model):
        assert torch.equal(model.generate(prompt, 3, temperature=0), plain)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 1  # c_attn, c_proj, c_fc, c_proj per layer + lm_head
    widening = widening_layers(model)  # c_attn, c_fc, lm_head: copied, nothing else
    assert len(widening) == 2 * 2 + 1
    assert decode_copy_bytes(model) == sum(m.weight.numel() * 8 for m in widening)  # float64
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
