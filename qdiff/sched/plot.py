"""JAQ-vs-generations curves as a PNG (matplotlib when installed, else a plain PIL line chart)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from qdiff.utils.images import save_png

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def plot_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: str | Path,
    title: str = "best fitting JAQ vs image generations",
    size: tuple[int, int] = (720, 440),
) -> Path:
    """One step line per optimiser from ``FitResult.curve`` points ``(generations, best JAQ)``; atomic PNG."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return save_png(_pil_chart(curves, title, size), path)
    return _matplotlib_chart(curves, path, title, size)


def _pil_chart(curves, title: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    points = [p for c in curves.values() for p in c]
    x_max = max((p[0] for p in points), default=1) or 1
    y_lo = min((p[1] for p in points), default=0.0)
    y_hi = max((p[1] for p in points), default=1.0)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def xy(g: float, v: float) -> tuple[float, float]:
        return (left + (w - left - right) * g / x_max, h - bottom - (h - top - bottom) * (v - y_lo) / (y_hi - y_lo))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        gx, vy = x_max * i / 4, y_lo + (y_hi - y_lo) * i / 4
        x, _ = xy(gx, y_lo)
        _, y = xy(0, vy)
        draw.text((x - 10, h - bottom + 6), f"{gx:.0f}", fill="black")
        draw.text((4, y - 6), f"{vy:.4g}", fill="black")
    draw.text((left, 10), title, fill="black")
    draw.text((w // 2 - 40, h - 20), "image generations", fill="black")
    for k, (name, curve) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        pts: list[tuple[float, float]] = []
        for g, v in curve:
            if pts:
                pts.append((xy(g, v)[0], pts[-1][1]))  # step line: best-so-far holds until the next point
            pts.append(xy(g, v))
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        draw.text((w - right - 160, top + 8 + 14 * k), f"-- {name}", fill=colour)
    return img


def _matplotlib_chart(
    curves, path, title: str, size: tuple[int, int]
) -> Path:  # pragma: no cover - not installed here
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    for name, curve in curves.items():
        ax.step([p[0] for p in curve], [p[1] for p in curve], where="post", label=name)
    ax.set_xlabel("image generations")
    ax.set_ylabel("best fitting JAQ")
    ax.set_title(title)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return save_png(Image.open(buf).convert("RGB"), path)
