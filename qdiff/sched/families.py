"""Prompt families for Q-Sched's validation (issue 25): which part of the prompt distribution a prompt belongs to.

A *family* is one value of one attribute, named ``attr=value`` (``background=white``, ``template=t2``,
``embedding=c3``); every prompt belongs to one family per attribute, so families of different attributes overlap.

* Shapes captions (:func:`shapes_labels`): the attributes a caption names — ``background``, ``colour``, ``size``,
  ``position``, ``shape`` — and the caption ``template`` it was written with (``t0``..``t7`` =
  ``TRAIN_TEMPLATES + HELDOUT_TEMPLATES`` of ``qdiff.models.shapes.data``). An attribute a caption leaves out is
  the family ``<attr>=none``.
* Any other prompt set: ``embedding`` — k-means clusters (:func:`kmeans`) of the prompts' text embeddings (the
  caller embeds them with the pipeline's own text encoder).

:func:`stratified_split` draws the fitting and validation prompts so that every family of every chosen attribute is
represented in each split in proportion to its size. Pure functions: no pipeline runs here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from qdiff.config.sections import QSCHED_FAMILIES
from qdiff.errors import QdiffError

EMBEDDING = "embedding"
NONE = "none"  # the value of an attribute a caption does not name

Labels = Sequence[Mapping[str, str]]  # one {attribute: value} per prompt


def shapes_labels(prompt: str) -> dict[str, str] | None:
    """``{attribute: value}`` of a Shapes caption (all six attributes), or None when it is not one (no shape or
    colour named)."""
    from qdiff.models.shapes import data

    named = data.parse_caption(prompt)
    if not {"shape", "colour"} <= set(named):
        return None
    out = {k: data.ATTRIBUTES[k][named[k]] if k in named else NONE for k in data.ATTRIBUTE_KEYS}
    template = data.caption_template(prompt)
    out["template"] = NONE if template is None else f"t{template}"
    return out


def label_table(prompts: Sequence[str], by: Sequence[str], embeddings=None, clusters: int = 4,
                seed: int = 0) -> list[dict[str, str]]:  # fmt: skip
    """Per prompt, its value of every attribute in ``by`` (Shapes attributes and/or ``embedding``).

    ``embeddings`` (P, D): the prompts' text embeddings, needed for ``embedding`` (k-means into ``clusters``).
    """
    unknown = [b for b in by if b not in QSCHED_FAMILIES]
    if unknown:
        known = ", ".join(QSCHED_FAMILIES)
        raise QdiffError(f"prompt families: unknown attribute {unknown[0]!r}; choose from {known}")
    rows: list[dict[str, str]] = [{} for _ in prompts]
    shapes_by = [b for b in by if b != EMBEDDING]
    if shapes_by:
        for i, p in enumerate(prompts):
            lab = shapes_labels(p)
            if lab is None:
                raise QdiffError(f"prompt families by {shapes_by[0]}: {p!r} is not a Shapes caption (it names no "
                                 "shape and colour); use families: [embedding] for other prompt sets")  # fmt: skip
            rows[i].update({b: lab[b] for b in shapes_by})
    if EMBEDDING in by:
        if embeddings is None:
            raise QdiffError("prompt families by embedding: no text embeddings given")
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != len(prompts):
            raise QdiffError(f"prompt families: {len(prompts)} prompts but embeddings of shape {x.shape}")
        for i, c in enumerate(kmeans(x, clusters, seed)):
            rows[i][EMBEDDING] = f"c{int(c)}"
    return rows


def family_index(labels: Labels, by: Sequence[str]) -> dict[str, list[int]]:
    """``"attr=value"`` -> indices of the prompts in that family; attributes in ``by`` order, values sorted."""
    out: dict[str, list[int]] = {}
    for attr in by:
        for value in sorted({row[attr] for row in labels}):
            out[f"{attr}={value}"] = [i for i, row in enumerate(labels) if row[attr] == value]
    return out


def stratified_split(labels: Labels, by: Sequence[str], sizes: Sequence[int], seed: int = 0) -> list[list[int]]:
    """Disjoint index lists of ``sizes`` (e.g. fitting, validation), each stratified over every family of ``by``.

    Greedy balancing of the marginals: the splits are filled one after the other from the prompts not yet taken;
    each pick is the prompt whose families are furthest below their proportional share of the split (the sum over
    ``by`` of ``size * |family| / |remaining| - taken so far``), ties broken by a seeded shuffle. Every family of
    every attribute thus ends within a prompt or two of its share (tested), which joint strata could not give:
    with six attributes they are nearly all singletons. Deterministic for a given seed.
    """
    n = len(labels)
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise QdiffError(f"stratified split: sizes {list(sizes)} need {sum(sizes)} prompts, only {n} given")
    keys = [[f"{b}={row[b]}" for b in by] for row in labels]
    order = [int(i) for i in np.random.default_rng(seed).permutation(n)]  # tie-break
    remaining, out = order, []
    for size in sizes:
        pool: dict[str, int] = {}
        for i in remaining:
            for k in keys[i]:
                pool[k] = pool.get(k, 0) + 1
        deficit = {k: size * c / len(remaining) for k, c in pool.items()} if remaining else {}
        taken: list[int] = []
        left = list(remaining)
        for _ in range(size):
            best = max(range(len(left)), key=lambda j: (sum(deficit[k] for k in keys[left[j]]), -j))
            pick = left.pop(best)
            taken.append(pick)
            for k in keys[pick]:
                deficit[k] -= 1
        out.append(sorted(taken))
        remaining = left
    return out


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> np.ndarray:
    """Cluster labels (N,) of rows of ``x`` (N, D): k-means++ seeding (``seed``) and Lloyd iterations, float64.

    Clusters are renumbered by their first member, so the labels do not depend on the seeding order.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise QdiffError(f"k-means: need 1 <= clusters <= {n} prompts, got {k}")
    rng = np.random.default_rng(seed)
    centres = [x[int(rng.integers(n))]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        total = d2.sum()
        centres.append(x[int(rng.choice(n, p=d2 / total))] if total > 0 else x[int(rng.integers(n))])
    c = np.stack(centres)
    labels = np.full(n, -1)
    for _ in range(iters):
        new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        if (new == labels).all():
            break
        labels = new
        c = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
    first = {lab: i for i, lab in reversed(list(enumerate(labels)))}
    rename = {lab: r for r, lab in enumerate(sorted(first, key=first.get))}
    return np.array([rename[lab] for lab in labels])
