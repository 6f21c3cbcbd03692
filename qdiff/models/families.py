"""Every model family qdiff knows, declared once. Adapters, ``builtin:`` names, the denoiser classes
``qdiff.load`` accepts and the default recipe of a model are all derived from :data:`REGISTRY`.

Adding a family is one :class:`~qdiff.models.registry.Family` entry in ``FAMILIES`` (plus its recipes under
``recipes/`` and tests); a new kind of denoiser also declares its :class:`~qdiff.models.registry.Architecture`
(usually inline in the family entry). See docs/developer-guide.md, "Add a model family".

:func:`use_registry` swaps the registry for the current context (thread / task) only, e.g. in a test that
checks a new family end to end without touching this module::

    with use_registry(REGISTRY.with_families(my_family)):
        pipe = qdiff.load_pipeline("builtin:tiny-my-family")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from qdiff.models.registry import Architecture, Builtin, Family, Registry
from qdiff.models.splits import unet_skip_splits

# --- architectures (denoiser kinds) ----------------------------------------------------------------------

UNET = Architecture(
    name="unet",
    classes=("UNet2DConditionModel",),
    attr="unet",
    content=("**.attn2.**", "**.ff.**"),  # cross-attention and feed-forward of every transformer block
    protected=("conv_in", "conv_out"),
    kv=("**.attn2.to_k", "**.attn2.to_v"),
    bos=True,  # CLIP (causal): token 0 is the same for every prompt
    splits=unet_skip_splits,  # up-block resnets read cat([up, skip])
    description="UNet2DConditionModel: SD 1.x / 2.x / SDXL / SD-Turbo / LCM UNets",
)
PIXART = Architecture(
    name="pixart",
    classes=("PixArtTransformer2DModel",),
    attr="transformer",
    content=("transformer_blocks.**.attn2.**", "transformer_blocks.**.ff.**"),
    protected=("pos_embed.proj", "proj_out"),
    kv=("transformer_blocks.**.attn2.to_k", "transformer_blocks.**.attn2.to_v"),
    bos=True,  # the BOS probe checks per model that token 0 is prompt-independent
    description="PixArtTransformer2DModel: PixArt-alpha / PixArt-sigma DiTs",
)
FLUX = Architecture(
    name="flux",
    classes=("FluxTransformer2DModel",),
    attr="transformer",
    # joint (MM-DiT) attention and feed-forwards; a single-stream block fuses its MLP (proj_mlp) and the
    # attention + MLP output (proj_out)
    content=(
        "**.ff.**",
        "**.ff_context.**",
        "**.attn.**",
        "single_transformer_blocks.**.proj_mlp",
        "single_transformer_blocks.**.proj_out",
    ),  # fmt: skip
    protected=("x_embedder", "context_embedder", "proj_out"),
    kv=("**.attn.add_k_proj", "**.attn.add_v_proj"),  # the text stream's K/V inside joint attention
    bos=False,  # joint attention: text and image tokens share each quantizer
    description="FluxTransformer2DModel: FLUX.1 schnell / dev (joint attention, no separate cross-attention)",
)
SD3 = Architecture(
    name="sd3",
    classes=("SD3Transformer2DModel",),
    attr="transformer",
    # the text stream's attention projections and output, and the feed-forwards; the image stream's
    # to_q/k/v/to_out and SD3.5's image-only attn2 are quality
    content=(
        "**.ff.**",
        "**.ff_context.**",
        "**.attn.add_q_proj",
        "**.attn.add_k_proj",
        "**.attn.add_v_proj",
        "**.attn.to_add_out",
    ),  # fmt: skip
    protected=("pos_embed.proj", "context_embedder", "proj_out"),
    kv=("**.attn.add_k_proj", "**.attn.add_v_proj"),
    bos=False,  # joint attention
    description="SD3Transformer2DModel: SD3 / SD3.5 MM-DiT (joint attention over an image and a text stream)",
)

# --- families ----------------------------------------------------------------------------------------------

_TINY, _FAMILIES = "qdiff.models.tiny", "qdiff.models.tiny_families"

FAMILIES: tuple[Family, ...] = (
    Family(
        name="shapes", architecture=UNET,
        builtins=(Builtin("shapes", "qdiff.models.shapes.pipeline:shapes_pipeline", toy=False),),
        default_recipe="shapes-w8a8",
        recipes=("shapes-w8a8", "shapes-w4a8", "shapes-w3a8", "shapes-w8a8-static", "shapes-w4a8-static",
                 "shapes-mixdq-w4a8"),
        description="the bundled Shapes model (trained weights shipped in the package)",
    ),
    Family(
        name="sd", architecture=UNET,
        models=("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
        builtins=(Builtin("tiny-sd", f"{_TINY}:tiny_sd_pipeline"),),
        description="Stable Diffusion 1.x",
    ),
    Family(
        name="sdxl", architecture=UNET, models=("stabilityai/stable-diffusion-xl-base-1.0",),
        builtins=(Builtin("tiny-sdxl", f"{_TINY}:tiny_sdxl_pipeline"),),
        description="Stable Diffusion XL (base)",
    ),
    Family(
        name="pixart-alpha", architecture=PIXART, models=("PixArt-alpha/PixArt-XL-2-1024-MS",),
        builtins=(Builtin("tiny-pixart", f"{_TINY}:tiny_pixart_pipeline"),),
        description="PixArt-alpha",
    ),
    Family(
        name="sdxl-turbo", architecture=UNET, models=("stabilityai/sdxl-turbo",),
        builtins=(Builtin("tiny-sdxl-turbo", f"{_FAMILIES}:tiny_sdxl_turbo_pipeline"),),
        default_recipe="sdxl-turbo-w8a8",
        recipes=("sdxl-turbo-w8a8", "sdxl-turbo-w4a8", "sdxl-turbo-1step-w8a8", "sdxl-turbo-1step-w4a8"),
    ),
    Family(
        name="sd-turbo", architecture=UNET, models=("stabilityai/sd-turbo",),
        builtins=(Builtin("tiny-sd-turbo", f"{_FAMILIES}:tiny_sd_turbo_pipeline"),),
        default_recipe="sd-turbo-w8a8", recipes=("sd-turbo-w8a8", "sd-turbo-w4a8"),
    ),
    Family(
        name="lcm-dreamshaper", architecture=UNET, models=("SimianLuo/LCM_Dreamshaper_v7",),
        builtins=(Builtin("tiny-lcm-dreamshaper", f"{_FAMILIES}:tiny_lcm_dreamshaper_pipeline"),),
        default_recipe="lcm-dreamshaper-w8a8", recipes=("lcm-dreamshaper-w8a8", "lcm-dreamshaper-w4a8"),
    ),
    Family(
        name="pcm-sdxl", architecture=UNET,  # no published pipeline: SDXL-base with the PCM LoRA fused, by folder
        builtins=(Builtin("tiny-pcm-sdxl", f"{_FAMILIES}:tiny_pcm_sdxl_pipeline"),),
        default_recipe="pcm-sdxl-w8a8", recipes=("pcm-sdxl-w8a8", "pcm-sdxl-w4a8"),
    ),
    Family(
        name="pixart-lcm", architecture=PIXART, models=("PixArt-alpha/PixArt-LCM-XL-2-1024-MS",),
        builtins=(Builtin("tiny-pixart-lcm", f"{_FAMILIES}:tiny_pixart_lcm_pipeline"),),
        default_recipe="pixart-lcm-w8a8", recipes=("pixart-lcm-w8a8", "pixart-lcm-w4a8"),
    ),
    Family(
        name="flux-schnell", architecture=FLUX, models=("black-forest-labs/FLUX.1-schnell",),
        builtins=(Builtin("tiny-flux-schnell", f"{_FAMILIES}:tiny_flux_schnell_pipeline"),),
        default_recipe="flux-schnell-w4a8", recipes=("flux-schnell-w4a8",),
    ),
    Family(
        name="sd3", architecture=SD3, models=("stabilityai/stable-diffusion-3-medium-diffusers",),
        builtins=(Builtin("tiny-sd3", f"{_FAMILIES}:tiny_sd3_pipeline"),),
        description="Stable Diffusion 3 (medium); no family recipe yet: the generic ones apply",
    ),
)  # fmt: skip

REGISTRY = Registry(
    FAMILIES,
    generic_recipes=("w8a8", "w4a8", "w8a8-static", "mixdq-w8a8", "mixdq-w4a8", "mixdq-w3.66a16"),
    fallback_recipe="w8a8",
    default_model="builtin:shapes",  # `qdiff quantize` with neither --model nor --recipe
)

_ACTIVE: ContextVar[Registry] = ContextVar("qdiff_family_registry", default=REGISTRY)


def current_registry() -> Registry:
    """The registry in effect: :data:`REGISTRY` unless :func:`use_registry` swapped it in this context."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_registry(registry: Registry) -> Iterator[Registry]:
    """Use ``registry`` for every derived lookup inside the block (this context only; restored on exit)."""
    if not isinstance(registry, Registry):
        raise TypeError(f"use_registry takes a Registry, got {type(registry).__name__}")
    token = _ACTIVE.set(registry)
    try:
        yield registry
    finally:
        _ACTIVE.reset(token)


def family_of(model: str | None) -> Family | None:
    """The family of a family name, ``builtin:`` name or published hub id (None when unknown)."""
    return current_registry().family_of(model)
