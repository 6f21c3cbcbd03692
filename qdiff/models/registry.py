"""The family registry's types: an :class:`Architecture` per denoiser kind, a :class:`Family` per model family,
and the :class:`Registry` every family-dependent lookup is derived from.

* :class:`Architecture` — how qdiff reads one kind of denoiser: the diffusers class names it handles (matched
  anywhere in the MRO), the pipeline attribute holding it, which layers are *content* (the rest is *quality*),
  which are kept in float by default, which are the cross-attention K/V (BOS-aware handling) and where the
  skip concatenations split (``qdiff.models.splits``). Rules are name patterns (``qdiff.models.layers``).
  It is also the *adapter* the rest of qdiff asks for layer lists (``get_adapter(denoiser)``).
* :class:`Family` — one model family (SDXL-Turbo, FLUX.1-schnell, ...): its architecture, the published
  checkpoints, the ``builtin:`` pipelines built in code (imported only when asked for), its default recipe and
  its bundled recipes.
* :class:`Registry` — an immutable set of families; derives adapters, ``builtin:`` names, the denoiser classes
  an export may name, the default recipe of a model spec and ``family_of``.

The declarations themselves live in one place, ``qdiff/models/families.py``. Nothing here imports diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

from qdiff.errors import QdiffError
from qdiff.models.layers import (
    CONTENT,
    QUALITY,
    LayerInfo,
    check_patterns,
    gemm_shape,
    name_matches,
    quantizable_modules,
)

BUILTIN_PREFIX = "builtin:"
SplitRule = Callable[[nn.Module], Mapping[str, int]]


@dataclass(frozen=True)
class Architecture:
    """One kind of denoiser; every rule is data (name patterns) except the config-derived split points."""

    name: str  # "unet", "pixart", ...: recorded as the export manifest's denoiser.family
    classes: tuple[str, ...]  # diffusers class names handled (anywhere in the MRO); exports may name these
    attr: str  # pipeline attribute holding the denoiser: "unet" | "transformer"
    content: tuple[str, ...] = ()  # name patterns of the content group; every other layer is quality
    protected: tuple[str, ...] = ()  # name patterns of layers kept in float by default (first and last layers)
    kv: tuple[str, ...] = ()  # name patterns of the layers reading the text condition as attention K/V
    bos: bool = False  # True: a causal text encoder's token 0 reaches ``kv`` (recipes may set bos_aware)
    splits: SplitRule | None = None  # denoiser -> {layer: input channel where the skip part starts}
    description: str = ""

    def __post_init__(self) -> None:
        where = f"architecture {self.name!r}"
        if not self.name or not self.attr or not self.classes or not isinstance(self.classes, tuple):
            raise ValueError(f"{where}: name, attr and a tuple of class names are required")
        for label in ("content", "protected", "kv"):
            check_patterns(getattr(self, label), f"{where}.{label}")

    # --- the adapter interface (names used across qdiff) ---------------------------------------------------
    @property
    def family(self) -> str:
        """The architecture name (the manifest's ``denoiser.family``, calibration metadata)."""
        return self.name

    @property
    def denoiser_attr(self) -> str:
        return self.attr

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes

    def matches(self, denoiser: nn.Module) -> bool:
        return any(cls.__name__ in self.classes for cls in type(denoiser).__mro__)

    def group_of(self, name: str) -> str:
        return CONTENT if name_matches(name, self.content) else QUALITY

    def is_protected(self, name: str) -> bool:
        return name_matches(name, self.protected)

    def is_cross_attention_kv(self, name: str) -> bool:
        return name_matches(name, self.kv)

    def act_splits(self, denoiser: nn.Module) -> dict[str, int]:
        """Layers whose input is a channel concatenation of two differently ranged tensors: name -> split."""
        return {} if self.splits is None else dict(self.splits(denoiser))

    def layers(self, denoiser: nn.Module) -> list[LayerInfo]:
        """Every quantizable layer in module order, grouped, with protection and split point."""
        splits = self.act_splits(denoiser)
        infos = []
        for name, mod, kind in quantizable_modules(denoiser):
            k, n = gemm_shape(mod, kind)
            infos.append(
                LayerInfo(
                    name=name,
                    kind=kind,
                    group=self.group_of(name),
                    protected=self.is_protected(name),
                    in_features=k,
                    out_features=n,
                    weight_numel=int(mod.weight.numel()),
                    a_split=splits.get(name),
                )  # fmt: skip
            )
        return infos

    def cross_attention_kv(self, denoiser: nn.Module) -> list[str]:
        return [name for name, _, _ in quantizable_modules(denoiser) if self.is_cross_attention_kv(name)]

    def __repr__(self) -> str:
        return f"Architecture({self.name!r}, classes={self.classes!r}, attr={self.attr!r})"


@dataclass(frozen=True)
class Builtin:
    """A pipeline built in code, loaded as ``builtin:<name>``; ``factory`` is ``"module:callable"``, imported
    only when asked for. ``toy``: seeded random weights at toy widths (tests, demos), so the family's recipes
    (real resolutions) are not its default; the generic fallback recipe is."""

    name: str
    factory: str
    toy: bool = True

    def __post_init__(self) -> None:
        module, sep, attr = self.factory.partition(":")
        if not self.name or not sep or not module or not attr:
            raise ValueError(f"builtin {self.name!r}: factory must be 'module:callable', got {self.factory!r}")


@dataclass(frozen=True)
class Family:
    """One model family: architecture, published checkpoints, built-in pipelines and recipes."""

    name: str
    architecture: Architecture
    models: tuple[str, ...] = ()  # hub ids of the published checkpoints (``family_of`` finds them)
    builtins: tuple[Builtin, ...] = ()
    default_recipe: str = "w8a8"  # the recipe ``qdiff quantize`` uses for this family without --recipe
    recipes: tuple[str, ...] = ()  # bundled recipes made for this family (recipes/<name>.yaml)
    description: str = ""

    def __post_init__(self) -> None:
        for label in ("models", "builtins", "recipes"):
            if not isinstance(getattr(self, label), tuple):
                raise ValueError(f"family {self.name!r}: {label} must be a tuple")
        if not isinstance(self.architecture, Architecture):
            raise ValueError(f"family {self.name!r}: architecture must be an Architecture")


@dataclass(frozen=True)
class Registry:
    """An immutable set of families (declaration order) and what is derived from it.

    ``generic_recipes``: bundled recipes for any family; ``fallback_recipe`` is the default for models of no
    known family and for toy builtins; ``default_model`` is the model spec meant when none is named.
    """

    families: tuple[Family, ...]
    generic_recipes: tuple[str, ...] = ()
    fallback_recipe: str = "w8a8"
    default_model: str | None = None
    _builtins: Mapping[str, tuple[Builtin, Family]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.families, tuple) or not all(isinstance(f, Family) for f in self.families):
            raise ValueError("Registry(families=...) takes a tuple of Family")
        _unique([f.name for f in self.families], "family name")
        arch_by_name: dict[str, Architecture] = {}
        for arch in (f.architecture for f in self.families):
            if arch_by_name.setdefault(arch.name, arch) != arch:
                raise ValueError(f"two different architectures are named {arch.name!r}")
        _unique([c for a in arch_by_name.values() for c in a.classes], "denoiser class")
        _unique([m for f in self.families for m in f.models], "published model")
        builtins = {b.name: (b, f) for f in self.families for b in f.builtins}
        _unique([b.name for f in self.families for b in f.builtins], "builtin name")
        object.__setattr__(self, "_builtins", MappingProxyType(builtins))

    # --- architectures -----------------------------------------------------------------------------------
    @property
    def architectures(self) -> tuple[Architecture, ...]:
        """Distinct architectures, in declaration order."""
        return tuple({f.architecture.name: f.architecture for f in self.families}.values())

    @property
    def denoiser_attrs(self) -> tuple[str, ...]:
        """Pipeline attributes a denoiser may live in, in declaration order (``unet``, ``transformer``)."""
        return tuple(dict.fromkeys(a.attr for a in self.architectures))

    @property
    def denoiser_classes(self) -> tuple[str, ...]:
        """The diffusers denoiser classes an export may name."""
        return tuple(c for a in self.architectures for c in a.classes)

    def supported_families(self) -> list[str]:
        return [f"{a.name} ({', '.join(a.classes)})" for a in self.architectures]

    def architecture_for(self, denoiser: nn.Module) -> Architecture:
        for arch in self.architectures:
            if arch.matches(denoiser):
                return arch
        raise QdiffError(
            f"unsupported denoiser {type(denoiser).__name__}: supported families are "
            f"{'; '.join(self.supported_families())}"
        )

    def find_denoiser(self, pipe) -> tuple[str, nn.Module]:
        """``(attr, module)`` for the first declared denoiser attribute the pipeline has (``unet``, ...)."""
        for attr in self.denoiser_attrs:
            mod = getattr(pipe, attr, None)
            if isinstance(mod, nn.Module):
                return attr, mod
        expected = " or ".join(f"`{a}`" for a in self.denoiser_attrs)
        raise QdiffError(f"{type(pipe).__name__} has no denoiser: expected a {expected} module on the pipeline")

    # --- families, builtins, recipes ---------------------------------------------------------------------
    @property
    def builtins(self) -> Mapping[str, str]:
        """``builtin:`` name (without the prefix) -> ``"module:callable"``."""
        return MappingProxyType({name: b.factory for name, (b, _) in self._builtins.items()})

    def family(self, name: str) -> Family:
        for f in self.families:
            if f.name == name:
                return f
        raise QdiffError(f"unknown model family {name!r}; known: {', '.join(f.name for f in self.families)}")

    def family_of(self, model: str | None) -> Family | None:
        """The family of a family name, a ``builtin:`` name (prefix optional) or a published hub id; else None."""
        if not model:
            return None
        spec = str(model).strip()
        name = spec.removeprefix(BUILTIN_PREFIX)
        if name in self._builtins:
            return self._builtins[name][1]
        if spec.startswith(BUILTIN_PREFIX):
            return None
        return next((f for f in self.families if spec == f.name or spec in f.models), None)

    def default_recipe(self, model: str | None) -> str:
        """The recipe for ``model`` without --recipe: its family's default; the fallback for a toy builtin or a
        model of no known family; ``model=None`` means ``default_model``."""
        spec = model or self.default_model
        family = self.family_of(spec)
        if family is None:
            return self.fallback_recipe
        builtin = self._builtins.get(str(spec).strip().removeprefix(BUILTIN_PREFIX))
        if builtin is not None and builtin[0].toy:
            return self.fallback_recipe
        return family.default_recipe

    def with_families(self, *families: Family) -> Registry:
        """A new registry with ``families`` appended (the original is unchanged)."""
        return Registry(self.families + families, self.generic_recipes, self.fallback_recipe, self.default_model)


def _unique(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name!r} is declared twice in the family registry")
        seen.add(name)
