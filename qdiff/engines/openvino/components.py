"""Pipeline components as torch modules with the input / output contract of optimum-intel's OpenVINO pipelines.

One :class:`Component` per folder of the OpenVINO layout (``unet/``, ``text_encoder/``, ``text_encoder_2/``,
``vae_decoder/``, ``vae_encoder/``): its named inputs with dynamic axes (-1) and dtypes, its output names, and a
wrapper module whose ``forward`` takes the inputs positionally and returns the outputs as a tuple, ready for
``ov.convert_model``. Names follow optimum-intel (``docs/openvino.md``): UNet ``sample``, ``timestep`` (rank 1,
float32: fractional timesteps of Euler-type schedulers survive), ``encoder_hidden_states`` [, ``text_embeds``,
``time_ids`` (SDXL)] [, ``timestep_cond`` (LCM)] -> ``out_sample``; CLIP text encoders ``input_ids`` ->
``last_hidden_state``, ``pooler_output`` (with projection: ``text_embeds`` first), ``hidden_states.0..N``; VAE decoder
``latent_sample`` -> ``sample``; VAE encoder ``sample`` -> ``latent_parameters`` (AutoencoderKL) or
``latent_sample`` (AutoencoderTiny).

``keep_f32``: the UNet's sinusoidal timestep embeddings (``time_proj``, SDXL's ``add_time_proj``) take sin / cos of
arguments up to ~1000 radians. With bf16 inference the CPU plugin computes them in bf16, where one step at 512-1024
is 4 radians, and the embedding is noise: the Shapes UNet's output at t=999 was 11.7% off (rel-l2) in bf16, 0.66%
with these nodes in f32 (every other block stays under 0.7%). Diffusers computes them in float32 for the same
reason. The plugin honours no per-node precision mark here, but keeps a model output's producers in f32, so each
is added as an extra output named ``f32.<scope>`` after ``out_sample`` (which stays first, as optimum-intel
reads it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qdiff.errors import QdiffError


@dataclass(frozen=True)
class Port:
    """One model input: name, shape with -1 for a dynamic axis, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def example(self, sizes: dict[int, int], generator: torch.Generator) -> Tensor:
        """A tensor of this port's shape with each dynamic axis i set to ``sizes[i]``."""
        shape = [sizes[i] if d == -1 else d for i, d in enumerate(self.shape)]
        if self.dtype == torch.int64:
            return torch.zeros(shape, dtype=torch.int64)
        return torch.randn(shape, generator=generator)


@dataclass(frozen=True, eq=False)
class Component:
    """A pipeline part as one OpenVINO model: its folder name, wrapper module, inputs and output names."""

    folder: str
    module: nn.Module
    inputs: tuple[Port, ...]
    outputs: tuple[str, ...]
    example_sizes: dict[int, int]  # the value of each dynamic axis (by position) in the tracing example
    keep_f32: tuple[str, ...] = ()  # module scopes kept in f32 whatever the precision (extra outputs, see below)

    def examples(self, seed: int = 0) -> tuple[Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        return tuple(p.example(self.example_sizes, gen) for p in self.inputs)


class _UNet(nn.Module):
    def __init__(self, unet: nn.Module, extra: tuple[str, ...]) -> None:
        super().__init__()
        self.unet, self.extra = unet, extra

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, *rest: Tensor) -> Tensor:
        named = dict(zip(self.extra, rest))
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named} or None
        out = self.unet(sample, timestep, encoder_hidden_states, timestep_cond=named.get("timestep_cond"),
                        added_cond_kwargs=added, return_dict=False)  # fmt: skip
        return out[0]


def unet_component(
    unet: nn.Module, tokens: int, pooled: int | None = None, sizes: tuple[int, int] = (2, 16)
) -> Component:
    """The UNet2DConditionModel as ``unet/``; ``tokens``: the tokenizer's sequence length; ``pooled``: the pooled
    text-embedding width of an SDXL UNet (``text_encoder_2.config.projection_dim``); ``sizes``: (batch, latent side)
    of the tracing example."""
    cfg = unet.config
    inputs = [
        Port("sample", (-1, cfg.in_channels, -1, -1)),
        Port("timestep", (-1,)),
        Port("encoder_hidden_states", (-1, tokens, _cross_dim(cfg))),
    ]
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embeds + time ids (6; the refiner's 5)
        if pooled is None:
            raise QdiffError("OpenVINO export: an SDXL UNet needs the pooled text-embedding width (text_encoder_2)")
        time_ids = (cfg.projection_class_embeddings_input_dim - pooled) // cfg.addition_time_embed_dim
        inputs += [Port("text_embeds", (-1, pooled)), Port("time_ids", (-1, time_ids))]
    elif cfg.addition_embed_type not in (None, "text"):
        raise QdiffError(f"OpenVINO export: UNet addition_embed_type {cfg.addition_embed_type!r} is not supported")
    if cfg.time_cond_proj_dim:  # LCM guidance embedding
        inputs.append(Port("timestep_cond", (-1, cfg.time_cond_proj_dim)))
    extra = tuple(p.name for p in inputs[3:])
    b, side = sizes
    sinusoids = tuple(n for n in ("time_proj", "add_time_proj") if hasattr(unet, n))
    return Component("unet", _UNet(unet, extra), tuple(inputs), ("out_sample",), {0: b, 2: side, 3: side},
                     keep_f32=sinusoids)  # fmt: skip


def _cross_dim(cfg) -> int:
    dim = cfg.cross_attention_dim
    return int(dim[0] if isinstance(dim, (list, tuple)) else dim)


class _TextEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, projection: bool) -> None:
        super().__init__()
        self.encoder, self.projection = encoder, projection

    def forward(self, input_ids: Tensor) -> tuple[Tensor, ...]:
        out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
        if self.projection:
            return (out.text_embeds, out.last_hidden_state, *out.hidden_states)
        return (out.last_hidden_state, out.pooler_output, *out.hidden_states)


def text_encoder_component(folder: str, encoder: nn.Module, tokens: int) -> Component:
    """A CLIP text encoder (``CLIPTextModel`` or ``CLIPTextModelWithProjection``) as ``folder``."""
    kind = type(encoder).__name__
    if kind not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise QdiffError(f"OpenVINO export: text encoder {kind} is not supported (CLIP text encoders only)")
    projection = kind == "CLIPTextModelWithProjection"
    layers = encoder.config.num_hidden_layers
    first = ("text_embeds", "last_hidden_state") if projection else ("last_hidden_state", "pooler_output")
    outputs = (*first, *(f"hidden_states.{i}" for i in range(layers + 1)))
    port = Port("input_ids", (-1, tokens), torch.int64)
    return Component(folder, _TextEncoder(encoder, projection), (port,), outputs, {0: 2})


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: Tensor) -> Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: Tensor) -> Tensor:
        out = self.vae.encode(sample)
        return out.latents if hasattr(out, "latents") else out.latent_dist.parameters


_VAES = ("AutoencoderKL", "AutoencoderTiny")


def vae_components(vae: nn.Module, side: int, encoder: bool) -> list[Component]:
    """``vae_decoder/`` (and ``vae_encoder/`` when asked) of an AutoencoderKL or AutoencoderTiny; ``side``: the
    latent side of the tracing example."""
    kind = type(vae).__name__
    if kind not in _VAES:
        raise QdiffError(f"OpenVINO export: VAE {kind} is not supported ({', '.join(_VAES)})")
    cfg = vae.config
    parts = [
        Component(
            "vae_decoder",
            _VaeDecoder(vae),
            (Port("latent_sample", (-1, cfg.latent_channels, -1, -1)),),
            ("sample",),
            {0: 1, 2: side, 3: side},
        ),  # fmt: skip
    ]
    if encoder:
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        name = "latent_sample" if kind == "AutoencoderTiny" else "latent_parameters"
        parts.append(Component("vae_encoder", _VaeEncoder(vae), (Port("sample", (-1, cfg.in_channels, -1, -1)),),
                               (name,), {0: 1, 2: side * factor, 3: side * factor}))  # fmt: skip
    return parts
