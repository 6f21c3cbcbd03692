"""qdiff's LoRA layers beside frozen integer layers, through PEFT's own injection: float64 references, placement on the
layer's device (never ``qweight``'s meta placeholder), PEFT's adapter bookkeeping, the refused merge."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import LoraConfig, set_peft_model_state_dict
from torch import nn

from qdiff.backends.registry import recording
from qdiff.config.layer import LayerQuant
from qdiff.errors import QdiffError
from qdiff.lora.inject import quant_lora_injection
from qdiff.lora.layers import QuantLoraConv2d, QuantLoraLinear
from qdiff.quant.modules import quant_module_for

W8A8 = LayerQuant(w_bits=8, a_bits=8)


class Tiny(nn.Module):
    """A float conv (kept float), a quantized 3x3 conv and a quantized linear: (B, 4, 6, 6) -> (B, 36, 16)."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 1)
        self.conv = quant_module_for(nn.Conv2d(8, 12, 3, padding=1), W8A8)
        self.proj = quant_module_for(nn.Linear(12, 16), W8A8)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3

    def forward(self, x):
        h = self.conv(self.conv_in(x))  # (B, 12, 6, 6)
        return self.proj(h.flatten(2).transpose(1, 2))  # (B, 36, 16)


def _frozen(gen) -> Tiny:
    model = Tiny(gen)
    for m in (model.conv, model.proj):
        m.freeze()
    return model


def _lora_state(model: Tiny, gen, r: int = 4) -> dict[str, torch.Tensor]:
    return {
        "conv.lora_A.weight": torch.randn(r, 8, 3, 3, generator=gen) * 0.2,
        "conv.lora_B.weight": torch.randn(12, r, 1, 1, generator=gen) * 0.2,
        "proj.lora_A.weight": torch.randn(r, 12, generator=gen) * 0.2,
        "proj.lora_B.weight": torch.randn(16, r, generator=gen) * 0.2,
    }


def _inject(model, state, name="a", alpha=8, low_cpu_mem_usage=False):
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=["conv", "proj"])
    with quant_lora_injection(model):
        peft.inject_adapter_in_model(config, model, adapter_name=name, low_cpu_mem_usage=low_cpu_mem_usage)
    set_peft_model_state_dict(model, state, adapter_name=name, low_cpu_mem_usage=low_cpu_mem_usage)


def _reference(model: Tiny, x: torch.Tensor, adapters: list[tuple[dict, float]]) -> torch.Tensor:
    """float64: the frozen layers' own outputs plus sum scale * B(A(.)) computed from the state dicts."""
    conv, proj = model.conv.get_base_layer(), model.proj.get_base_layer()
    with torch.no_grad():
        h_in = model.conv_in(x).double()
        h = conv(h_in.float()).double()
        for s, scale in adapters:
            a = torch.nn.functional.conv2d(h_in, s["conv.lora_A.weight"].double(), padding=1)
            h = h + scale * torch.nn.functional.conv2d(a, s["conv.lora_B.weight"].double())
        t = h.flatten(2).transpose(1, 2)
        y = proj(t.float()).double()
        for s, scale in adapters:
            y = y + scale * (t @ s["proj.lora_A.weight"].double().T @ s["proj.lora_B.weight"].double().T)
    return y


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_branch_matches_float64_and_codes_stay_untouched(low_cpu_mem_usage, gen):
    model = _frozen(gen)
    x = torch.randn(2, 4, 6, 6, generator=gen)
    with recording() as calls, torch.no_grad():
        before = model(x)
    if any(name == "cpu_int8" for name, _ in calls):  # the codes now live in the prepacked copy: qweight is meta
        assert model.proj.qweight.is_meta and model.conv.qweight.is_meta
    codes = {n: m.packed_weight().codes_from_slot() if m.codes_released() else m.qweight.clone()
             for n, m in (("conv", model.conv), ("proj", model.proj))}  # fmt: skip
    state = _lora_state(model, gen)
    _inject(model, state, low_cpu_mem_usage=low_cpu_mem_usage)
    assert isinstance(model.conv, QuantLoraConv2d) and isinstance(model.proj, QuantLoraLinear)
    for layer in (model.conv, model.proj):
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in layer.lora_A.parameters())
        assert layer.scaling["a"] == 2.0  # alpha 8 / r 4
    with torch.no_grad():
        y = model(x)
    ref = _reference(model, x, [(state, 2.0)])
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err
    assert (y - before).abs().max() > 0.1  # the branch does something
    for n, m in (("conv", model.conv.get_base_layer()), ("proj", model.proj.get_base_layer())):
        now = m.packed_weight().codes_from_slot() if m.codes_released() else m.qweight
        assert torch.equal(now, codes[n]), n


def test_two_adapters_weights_disable_mixed_batch_and_delete(gen):
    model = _frozen(gen)
    x = torch.randn(2, 4, 6, 6, generator=gen)
    with torch.no_grad():
        base = model(x)
    s1, s2 = _lora_state(model, gen), _lora_state(model, gen)
    _inject(model, s1, "a")
    _inject(model, s2, "b", alpha=4)
    for layer in (model.conv, model.proj):
        layer.set_adapter(["a", "b"])
        layer.set_scale("a", 0.5)  # what diffusers' set_adapters(["a", "b"], [0.5, 1.5]) does per layer
        layer.set_scale("b", 1.5)
    with torch.no_grad():
        y = model(x)
    ref = _reference(model, x, [(s1, 0.5 * 2.0), (s2, 1.5 * 1.0)])
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-5
    for layer in (model.conv, model.proj):
        layer.enable_adapters(False)
    with torch.no_grad():
        assert torch.equal(model(x), base)
    for layer in (model.conv, model.proj):
        layer.enable_adapters(True)
    with torch.no_grad():  # PEFT's mixed batch: sample 0 with adapter "b" only, sample 1 with none
        h = model.conv(model.conv_in(x), adapter_names=["b", "__base__"]).flatten(2).transpose(1, 2)
        mixed = model.proj(h, adapter_names=["b", "__base__"])
    only_b = _reference(model, x[:1], [(s2, 1.5 * 1.0)])
    assert (mixed[:1].double() - only_b).abs().max() / only_b.abs().max() < 1e-5
    assert torch.equal(mixed[1:], base[1:])
    for layer in (model.conv, model.proj):
        layer.delete_adapter("b")
        assert list(layer.lora_A) == ["a"] and "b" not in layer.scaling
    with torch.no_grad():
        y = model(x)
    only_a = _reference(model, x, [(s1, 0.5 * 2.0)])
    assert (y.double() - only_a).abs().max() / only_a.abs().max() < 1e-5


def test_branch_runs_in_the_float_compute_dtype(gen):
    model = _frozen(gen)
    model.conv_in.to(torch.bfloat16)  # the model's float parts in bf16; scales and codes unchanged
    model.proj.bias.data = model.proj.bias.data.bfloat16()
    model.conv.bias.data = model.conv.bias.data.bfloat16()
    _inject(model, _lora_state(model, gen))
    assert model.proj.lora_A["a"].weight.dtype == torch.bfloat16
    assert model.proj.get_base_layer().w_scale.dtype == torch.float32
    with torch.no_grad():
        y = model(torch.randn(1, 4, 6, 6, generator=gen).bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_merge_is_refused_and_leaves_the_scale(gen):
    model = _frozen(gen)
    _inject(model, _lora_state(model, gen))
    before = dict(model.proj.scaling)
    model.proj.scale_layer(0.7)  # as diffusers' fuse_lora(lora_scale=0.7) does just before merge
    with pytest.raises(QdiffError, match=r"^fuse_lora on a qdiff-quantized layer .* qdiff quantize --lora PATH:SCALE"):
        model.proj.merge()
    assert model.proj.scaling == before and not model.proj.merged
    assert "\n" not in str(QdiffError)
