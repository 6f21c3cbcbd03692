"""qdiff eval --peers: the registry, rows for peers that cannot run, and tiny pipelines through each peer end to end.

End-to-end cases skip only when the peer's library is not installed (pytest.importorskip)."""

from __future__ import annotations

from types import MappingProxyType

import pytest
import torch
from torch import nn

from qdiff.config.recipe import Recipe
from qdiff.errors import QdiffError
from qdiff.eval import peers, size
from qdiff.eval.peers import PEERS, Built, Peer, add_peers, parse_peers, peer_layers, peer_recipe
from qdiff.eval.run import Evaluator
from qdiff.export.resolve import load_pipeline
from qdiff.models.adapters import find_denoiser, get_adapter
from qdiff.sampling.draw import draw
from qdiff.utils.nbytes import module_nbytes

REF = "builtin:tiny-sd"
PROMPTS = ["a photo of a cat", "a red car"]
RECIPE = Recipe.from_dict({
    "name": "tiny-peers", "weights": {"bits": 4, "granularity": "group", "group_size": 32},
    "activations": {"bits": 8, "mode": "dynamic"},
    "sampler": {"steps": 1, "guidance_scale": 1.0, "height": 32, "width": 32, "seed": 0},
    "calibration": {"prompts": "coco", "num_prompts": 2, "batch_size": 2},
})  # fmt: skip


def _evaluator() -> Evaluator:
    ev = Evaluator(PROMPTS, RECIPE.sampler, batch_size=2, clip=None, quality=None, progress=False)
    ev.add("FP", load_pipeline(REF))
    return ev


def test_registry_and_names():
    assert list(PEERS) == ["bnb-nf4", "bnb-int8", "quanto-w8a8", "quanto-w4", "torchao-int8dq", "torchao-int8wo",
                           "torchao-int4wo", "openvino-fp32", "openvino-nncf-int8"]  # fmt: skip
    assert isinstance(PEERS, MappingProxyType)
    assert parse_peers("bnb-nf4, quanto-w4,bnb-nf4") == ["bnb-nf4", "quanto-w4"]
    assert parse_peers("all") == list(PEERS)
    with pytest.raises(QdiffError, match="unknown peer 'gptq'.*bnb-nf4"):
        parse_peers("bnb-nf4,gptq")


def test_peer_recipe_follows_the_exports():
    assert peer_recipe(["builtin:shapes"]).name == "shapes-w4a8"
    assert peer_recipe([REF]) == Recipe()


def test_peer_layers_are_qdiffs_selection():
    den = find_denoiser(load_pipeline(REF))[1]
    infos = get_adapter(den).layers(den)
    names = peer_layers(den, RECIPE)
    assert names == [i.name for i in infos if not i.protected]
    assert names and len(names) < len(infos)  # conv_in / conv_out stay float for qdiff and for the peers


def _raise_in_build(pipe, den, names, recipe):
    raise RuntimeError("no kernel for this device\n(second line)")


def _raise_in_forward(pipe, den, names, recipe):
    def boom(module, args):
        raise NotImplementedError("aten.convolution unimplemented")

    den.get_submodule(names[0]).register_forward_pre_hook(boom)
    return Built("")


def test_failing_and_missing_peers_become_rows_with_reasons(monkeypatch):
    fake = {p.name: p for p in (
        Peer("broken-build", "torch", "raises while quantizing", (nn.Linear,), "", _raise_in_build),
        Peer("broken-run", "torch", "raises in the first generation", (nn.Linear,), "", _raise_in_forward),
        Peer("absent", "qdiff_no_such_library", "not installed", (nn.Linear,), "", _raise_in_build),
    )}  # fmt: skip
    monkeypatch.setattr(peers, "PEERS", MappingProxyType(fake))
    counter = size.module_nbytes
    ev = _evaluator()
    notes = add_peers(ev, REF, list(fake), RECIPE)
    assert notes == [
        "broken-build: skipped: RuntimeError: no kernel for this device (second line)",
        "broken-run: skipped: NotImplementedError: aten.convolution unimplemented",
        "absent: skipped: not installed: pip install 'qdiff[peers]'",
    ]
    result = ev.result()
    assert list(result.metrics) == ["FP", "broken-build", "broken-run", "absent"]
    assert all(result.metrics[n] == {} for n in fake) and result.notes[-3:] == notes
    assert size.module_nbytes is counter  # the temporary counter switch is undone


def test_quantized_reference_is_refused(monkeypatch):
    from qdiff.quant.transform import QuantInfo, set_info

    ev = _evaluator()
    pipe = load_pipeline(REF)
    set_info(find_denoiser(pipe)[1], QuantInfo(RECIPE))
    monkeypatch.setattr("qdiff.export.resolve.load_pipeline", lambda spec: pipe)
    with pytest.raises(QdiffError, match="already quantized"):
        add_peers(ev, REF, ["bnb-nf4"], RECIPE)


# (peer, library module, module or weight type on every layer it quantizes, whether it quantizes Conv2d)
CASES = [
    ("bnb-nf4", "bitsandbytes", "Linear4bit", False),
    ("bnb-int8", "bitsandbytes", "Linear8bitLt", False),
    ("quanto-w8a8", "optimum.quanto", "WeightQBytesTensor", True),
    ("quanto-w4", "optimum.quanto", "WeightQBitsTensor", True),
    ("torchao-int8dq", "torchao", "Int8Tensor", False),
    ("torchao-int8wo", "torchao", "Int8Tensor", False),
    ("torchao-int4wo", "torchao", "IntxUnpackedToInt8Tensor", True),
]


@pytest.mark.parametrize(("name", "library", "marker", "convs"), CASES, ids=[c[0] for c in CASES])
def test_peer_end_to_end_on_tiny_pipeline(name, library, marker, convs):
    pytest.importorskip(library)
    ev = _evaluator()
    fp_bytes = ev.metrics["FP"]["denoiser_mib"] * 2**20
    den = find_denoiser(load_pipeline(REF))[1]
    selected = peer_layers(den, RECIPE)
    n_conv = sum(isinstance(den.get_submodule(n), nn.Conv2d) for n in selected)

    pipe, note = PEERS[name].build(lambda: load_pipeline(REF), RECIPE, selected)
    draw(pipe, PROMPTS[:1], [0], RECIPE.sampler, 1)  # the first forward may repack (bitsandbytes NF4 on CPU)
    qden = find_denoiser(pipe)[1]
    for layer in selected:
        module = qden.get_submodule(layer)
        kind = type(module).__name__ + " " + type(getattr(module, "weight", None)).__name__
        is_conv = isinstance(den.get_submodule(layer), nn.Conv2d)
        assert (marker in kind) == (convs or not is_conv), (layer, kind)
    assert f"{len(selected) - (0 if convs else n_conv)} of {len(selected)} selected layers quantized" in note
    assert (f"float: {n_conv} Conv2d" in note) == (not convs)

    notes = add_peers(ev, REF, [name], RECIPE)
    row = ev.metrics[name]
    assert notes[0].startswith(f"{name}: ") and "skipped" not in notes[0], notes
    assert row["denoiser_mib"] * 2**20 == module_nbytes(qden) < fp_bytes  # measured like the built copy
    assert 0.0 < row["ssim"] <= 1.0 and torch.isfinite(torch.tensor(row["psnr"]))
    assert row["ssim"] > 0.3, row  # same prompts and seeds: close to the float images


def test_evaluate_scores_peers_after_the_models():
    pytest.importorskip("optimum.quanto")
    import qdiff

    result = qdiff.evaluate([REF], prompts=PROMPTS, num_prompts=2, sampler=RECIPE.sampler, batch_size=2, clip=None,
                            quality=None, peers="quanto-w4", progress=False)  # fmt: skip
    reference, peer = list(result.metrics)
    assert peer == "quanto-w4"
    row = result.metrics[peer]
    assert 0 < row["denoiser_mib"] < result.metrics[reference]["denoiser_mib"]
    assert 0.0 < row["ssim"] <= 1.0
    assert any(note.startswith("quanto-w4:") for note in result.notes)


def test_unknown_peer_fails_before_any_model_loads(monkeypatch):
    import qdiff

    monkeypatch.setattr("qdiff.export.resolve.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(QdiffError, match="unknown peer 'nope'; known: bnb-nf4"):
        qdiff.evaluate([REF], peers="nope", progress=False)
