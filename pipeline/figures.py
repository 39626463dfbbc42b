"""Every figure the pipeline draws, with matplotlib's Agg backend (these machines have no display).

Functions build and return a `Figure` from plain arrays and DataFrames; `save_figure`
writes it atomically. Figures are made with the object API (no pyplot state), so they
can be drawn from any thread and never pop up a window.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.files import atomic_write  # noqa: E402

CORRECT_COLOR = "#1a7f37"
WRONG_COLOR = "#cf222e"
NOISE_COLOR = "#8c959f"


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write a PNG via a temporary name in the same folder, so no half-written file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _heatmap(ax, values: np.ndarray, class_names: Sequence[str], fmt, title: str, vmax: float) -> None:
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    for (row, col), value in np.ndenumerate(values):
        if value == 0:
            continue  # empty cells stay blank, so the mistakes stand out
        dark = value > 0.55 * vmax
        ax.text(col, row, fmt(value), ha="center", va="center", fontsize=7.5, color="white" if dark else "black")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03)


def confusion_matrix_figure(confusion: np.ndarray, class_names: Sequence[str], subtitle: str = "") -> Figure:
    """Counts (left) and the same rows as percentages (right): row i is where class i went."""
    confusion = np.asarray(confusion)
    support = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    fig = Figure(figsize=(17, 7.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    _heatmap(left, confusion, class_names, lambda v: f"{int(v)}", "counts", vmax=max(float(confusion.max()), 1.0))
    # Percent with one decimal: a single image in a class of 1,000 still shows (0.1).
    _heatmap(right, 100 * normalised, class_names, lambda v: f"{v:.1f}", "% of each true class (rows sum to 100)", 100)
    fig.suptitle(f"Confusion matrix on {int(confusion.sum()):,} test images{subtitle}", fontsize=13)
    return fig


def _gray_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) 0-255 -> float (N, H, W, 3) in [0, 1]."""
    return np.repeat(np.asarray(images, dtype=np.float32)[..., None] / 255.0, 3, axis=-1)


def _overlaid(images: np.ndarray, overlays: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Gray images with a heat map (values in [0, 1], jet) blended over them, as RGB."""
    heat = matplotlib.colormaps["jet"](np.clip(overlays, 0.0, 1.0))[..., :3]
    return (1 - alpha) * _gray_rgb(images) + alpha * heat


def _tiled_figure(
    tiles: np.ndarray,
    captions: Sequence[str],
    colors: Sequence[str],
    columns: int,
    title: str,
    footer: str,
    cell_inches: float = 2.0,
    caption_inches: float = 0.45,
    fontsize: float = 8.5,
) -> Figure:
    """RGB tiles (N, h, w, 3) in a grid with a caption above each, drawn as ONE image on one axes.

    One axes instead of one per tile: matplotlib's layout and drawing cost grows with the axes,
    and a grid of 24 axes took about a second and a half to save, the mosaic a tenth of that.
    """
    count, height, width = tiles.shape[:3]
    rows = max(1, -(-count // columns))
    pitch_x = width + max(1, width // 8)
    caption = int(round(caption_inches / cell_inches * width))
    pitch_y = height + caption
    canvas = np.ones((rows * pitch_y, columns * pitch_x - (pitch_x - width), 3), dtype=np.float32)
    fig = Figure(figsize=(columns * cell_inches, rows * (cell_inches + caption_inches)), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    for i, (tile, text, color) in enumerate(zip(tiles, captions, colors, strict=False)):
        row, col = divmod(i, columns)
        top, left = row * pitch_y + caption, col * pitch_x
        canvas[top : top + height, left : left + width] = tile
        ax.text(left + width / 2, top - 0.6, text, ha="center", va="bottom", fontsize=fontsize, color=color)
    ax.imshow(np.clip(canvas, 0, 1), interpolation="nearest")
    fig.suptitle(title, fontsize=12)
    fig.supxlabel(footer, fontsize=9)
    return fig


def _image_grid(
    images: np.ndarray,
    captions: Sequence[str],
    colors: Sequence[str],
    columns: int,
    title: str,
    footer: str,
    cell_inches: float = 2.0,
    overlays: np.ndarray | None = None,
) -> Figure:
    """Images in a grid with a caption each; `overlays` (same count, values in [0, 1]) are drawn
    over them as a translucent heat map (explanations)."""
    tiles = _gray_rgb(images) if overlays is None else _overlaid(images, overlays)
    return _tiled_figure(tiles, captions, colors, columns, title, footer, cell_inches)


def confidence(probability: float) -> str:
    # Rounded to 100 % it would read as certainty, which a softmax never reaches.
    return ">99.9%" if probability > 0.999 else f"{probability:.1%}"


def misclassified_figure(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    probabilities: np.ndarray,
    indices: np.ndarray,
    class_names: Sequence[str],
    columns: int = 6,
    subtitle: str = "",
    overlays: np.ndarray | None = None,
    method: str = "",
) -> Figure:
    """The given test images (the most confident mistakes), each with true and predicted label;
    with `overlays` (one map per index), the explanation `method`'s map of the predicted class over each."""
    indices = np.asarray(indices, dtype=np.int64)
    captions = [
        f"#{i}  true: {class_names[labels[i]]}\npred: {class_names[predictions[i]]} "
        f"({confidence(probabilities[i, predictions[i]])})"
        for i in indices
    ]
    if len(indices) == 0:
        fig = Figure(figsize=(6, 2), layout="constrained")
        ax = fig.subplots()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
        fig.suptitle(f"Most confident mistakes{subtitle}")
        return fig
    return _image_grid(
        images[indices],
        captions,
        [WRONG_COLOR] * len(indices),
        columns,
        f"The {len(indices)} most confident mistakes{subtitle}",
        "#test index, true label, predicted label (model's probability for it)"
        + (f"; overlay: {method} for the predicted class (red: most weight)" if overlays is not None else ""),
        overlays=overlays,
    )


def samples_figure(
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    indices: np.ndarray,
    class_names: Sequence[str],
    columns: int = 4,
    subtitle: str = "",
) -> Figure:
    """Random test images, as in the chapter's listing 5-5, with the model's answer under each."""
    indices = np.asarray(indices, dtype=np.int64)
    captions, colors = [], []
    for i in indices:
        right = predictions[i] == labels[i]
        verdict = "right" if right else "WRONG"
        captions.append(f"true: {class_names[labels[i]]}\npred: {class_names[predictions[i]]} ({verdict})")
        colors.append(CORRECT_COLOR if right else WRONG_COLOR)
    correct = int(sum(predictions[i] == labels[i] for i in indices))
    return _image_grid(
        images[indices],
        captions,
        colors,
        columns,
        f"{len(indices)} random test images: {correct} predicted right{subtitle}",
        "green: prediction right, red: wrong",
        cell_inches=2.1,
    )


# Which logged series go on which panel of the training curves, and how each is drawn.
LOSS_SERIES = {
    "train_loss_step": {"label": "train loss (mean since the previous point)", "lw": 1.0, "alpha": 0.55, "color": "C0"},
    "train_loss": {"label": "train loss (epoch mean)", "marker": "o", "lw": 1.6, "color": "C1"},
    "test_loss": {"label": "test loss", "marker": "s", "lw": 1.6, "color": "C2"},
}
ACCURACY_SERIES = {"test_accuracy": {"label": "test accuracy", "marker": "s", "lw": 1.6, "color": "C2"}}


def training_curves_figure(history: pd.DataFrame, subtitle: str = "") -> Figure:
    """Loss and accuracy against optimizer step; `history` has columns key, step, value."""
    # One point per (series, step): train logs its final train_loss twice and `evaluate`
    # re-logs test_accuracy at the last step; the first value logged is the training one.
    if "timestamp" in history:
        history = history.sort_values("timestamp", kind="stable")
    history = history.drop_duplicates(["key", "step"], keep="first")
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2, sharex=True)
    for ax, series in ((loss_ax, LOSS_SERIES), (acc_ax, ACCURACY_SERIES)):
        for key, style in series.items():
            points = history[history["key"] == key].sort_values("step")
            if not points.empty:
                ax.plot(points["step"], points["value"], **style)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=9)
        else:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes)
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.set_title("loss")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_title("test accuracy (after each epoch)")
    acc_ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=1))
    for line in acc_ax.lines:
        for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True):
            acc_ax.annotate(f"{y:.1%}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    acc_ax.margins(y=0.15)
    low, high = acc_ax.get_ylim()
    acc_ax.set_ylim(max(low, 0.0), min(high, 1.02))  # the headroom for labels never runs past 100 %
    fig.suptitle(f"Training curves{subtitle}", fontsize=13)
    return fig


def per_class_comparison_figure(
    accuracy: pd.DataFrame, deltas: pd.DataFrame | None = None, margins: pd.DataFrame | None = None
) -> Figure:
    """Grouped bars of per-class accuracy (rows: classes, columns: runs), and the deltas.

    `deltas` (same rows, one column per compared run) draws a second panel in percentage
    points; `margins` (same shape) adds each delta's approximate 95 % noise margin.
    """
    classes = list(accuracy.index)
    runs = list(accuracy.columns)
    panels = 2 if deltas is not None and not deltas.empty else 1
    fig = Figure(figsize=(max(11, 1.1 * len(classes) * max(1, len(runs) / 2)), 5.2 * panels), layout="constrained")
    axes = np.atleast_1d(fig.subplots(panels, 1))
    x = np.arange(len(classes))
    width = 0.8 / max(len(runs), 1)
    ax = axes[0]
    for i, run in enumerate(runs):
        values = accuracy[run].to_numpy(dtype=float)
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width, label=run, color=f"C{i}")
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(x, labels=classes)
    ax.set_ylim(0, 1.2)  # headroom above 100 % for the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("class")
    ax.set_ylabel("test accuracy")
    ax.set_title("Per-class test accuracy")
    ax.legend(loc="upper left", ncol=len(runs), fontsize=9, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    if panels == 2:
        ax = axes[1]
        compared = list(deltas.columns)
        width = 0.8 / len(compared)
        for i, column in enumerate(compared):
            values = deltas[column].to_numpy(dtype=float) * 100
            errors = margins[column].to_numpy(dtype=float) * 100 if margins is not None else np.zeros_like(values)
            errors = np.nan_to_num(errors)
            # Grey: the difference is within the noise margin, so no clear winner on that class.
            colors = [
                CORRECT_COLOR if v > e else WRONG_COLOR if v < -e else NOISE_COLOR
                for v, e in zip(values, errors, strict=True)
            ]
            offset = (i - (len(compared) - 1) / 2) * width
            ax.bar(x + offset, values, width, yerr=errors, capsize=3, color=colors, alpha=0.85)
            for xi, v, e in zip(x + offset, values, errors, strict=True):
                # Beyond the end of the error bar, so the number never sits on the whisker.
                ax.annotate(
                    f"{v:+.1f}",
                    (xi, v + e if v >= 0 else v - e),
                    xytext=(0, 3 if v >= 0 else -3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom" if v >= 0 else "top",
                    fontsize=8,
                )
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, labels=classes)
        ax.set_xlabel("class")
        ax.set_ylabel("accuracy difference (percentage points)")
        note = (
            " (error bars: approx. 95 % noise margin; green/red: clearly better/worse, grey: within noise)"
            if margins is not None
            else ""
        )
        ax.set_title(f"Difference per class: {', '.join(compared)}{note}")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    fig.suptitle("Model comparison on the test set", fontsize=13)
    return fig


def contact_sheet_figure(entries: Sequence, columns: int = 4) -> Figure:
    """`pipeline predict --contact-sheet`: per image, the original, the 28x28 the model saw, and its top 3.

    `entries` are pipeline.predict.run.SheetEntry: source, original (a Pillow thumbnail), converted
    (uint8 H x W), note (what preprocessing did), top ([(class, probability)] * 3).
    """
    rows = max(1, -(-len(entries) // columns))
    fig = Figure(figsize=(columns * 3.6, rows * 2.3), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, 2 * columns, gridspec_kw={"wspace": 0.02}))
    for ax in axes.ravel():
        ax.set_axis_off()
    for n, entry in enumerate(entries):
        original_ax, converted_ax = axes[n // columns, 2 * (n % columns)], axes[n // columns, 2 * (n % columns) + 1]
        original = np.asarray(entry.original)
        original_ax.imshow(original, cmap="gray" if original.ndim == 2 else None, vmin=0, vmax=255)
        name = Path(entry.source).name
        original_ax.set_title(name if len(name) <= 22 else name[:20] + "…", fontsize=8)
        converted_ax.imshow(entry.converted, cmap="gray", vmin=0, vmax=255)
        converted_ax.set_title("28×28", fontsize=8)
        lines = [f"{cls} {confidence(prob)}" for cls, prob in entry.top]
        converted_ax.text(
            0.0, -0.04, "\n".join(lines), transform=converted_ax.transAxes, va="top", ha="left", fontsize=7.5
        )
        original_ax.text(
            0.0,
            -0.04,
            entry.note,
            transform=original_ax.transAxes,
            va="top",
            ha="left",
            fontsize=6.5,
            color=NOISE_COLOR,
        )
    fig.suptitle(f"Contact sheet: {len(entries)} images as given, as the model saw them, and its top 3", fontsize=11)
    return fig


# --------------------------------------------------------------------------- what the model learned


def filters_figure(filters: np.ndarray, layer: str, subtitle: str = "", columns: int = 8) -> Figure:
    """Every filter of the first convolution (out, in, kh, kw) as an image, input channels averaged.

    One colour scale for all, centred on 0: red weights add the pixel's brightness, blue subtract it.
    """
    filters = np.asarray(filters, dtype=np.float32)
    kernels = filters.mean(axis=1)
    limit = float(np.abs(kernels).max()) or 1.0
    tiles = matplotlib.colormaps["RdBu_r"]((kernels / limit + 1) / 2)[..., :3]
    shape = "x".join(str(d) for d in filters.shape)
    return _tiled_figure(
        tiles,
        [str(i) for i in range(len(tiles))],
        ["black"] * len(tiles),
        columns,
        f"First-layer filters: {layer} ({shape}){subtitle}",
        f"filter number; red: positive weight, blue: negative (one scale for all, |max| {limit:.3g})",
        cell_inches=1.0,
        caption_inches=0.25,
        fontsize=7,
    )


def _mosaic(maps: np.ndarray, columns: int) -> np.ndarray:
    """(C, H, W) channels tiled into one image, each scaled to [0, 1] on its own, NaN between tiles."""
    channels, height, width = maps.shape
    rows = -(-channels // columns)
    out = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1), np.nan, dtype=np.float32)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    scaled = np.divide(maps - low, span, out=np.zeros_like(maps, dtype=np.float32), where=span > 0)
    for c in range(channels):
        r, k = divmod(c, columns)
        out[r * (height + 1) : r * (height + 1) + height, k * (width + 1) : k * (width + 1) + width] = scaled[c]
    return out


def feature_maps_figure(
    maps: np.ndarray,
    images: np.ndarray,
    captions: Sequence[str],
    layer: str,
    kind: str,
    subtitle: str = "",
) -> Figure:
    """One row per image: the image (enlarged to the row's height), then every channel of the
    layer's output for it, tiled, each channel scaled to its own range. Drawn as one image."""
    maps = np.asarray(maps)
    channels = maps.shape[1]
    columns = 16 if channels > 32 else 8
    mosaics = [_mosaic(m, columns) for m in maps]
    mosaic_h, mosaic_w = mosaics[0].shape
    height, width = images.shape[1:3]
    factor = max(1, mosaic_h // height)
    gap = max(2, mosaic_h // 12)
    row_h = max(mosaic_h, height * factor)
    colored = matplotlib.colormaps["viridis"]
    canvas = np.ones((len(maps) * (row_h + gap) - gap, width * factor + gap + mosaic_w, 3), dtype=np.float32)
    for r, (image, mosaic) in enumerate(zip(images, mosaics, strict=True)):
        top = r * (row_h + gap)
        big = np.kron(np.asarray(image, dtype=np.float32) / 255.0, np.ones((factor, factor), dtype=np.float32))
        canvas[top : top + big.shape[0], : big.shape[1]] = big[..., None]
        rgb = colored(np.nan_to_num(mosaic))[..., :3]
        rgb[np.isnan(mosaic)] = 1.0
        canvas[top : top + mosaic_h, width * factor + gap :] = rgb
    # Up to two screen pixels per activation at save_figure's 110 dpi, the picture at most about
    # 1,500 pixels tall: every value visible, and drawing time (which grows with pixels) bounded.
    scale = min(2.0, 1500 / canvas.shape[0]) / 110
    width_in = max(6.0, canvas.shape[1] * scale + 1.2)
    fig = Figure(figsize=(width_in, canvas.shape[0] * scale + 1.0), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    ax.imshow(canvas, interpolation="nearest")
    for r, caption in enumerate(captions):
        ax.text(-gap, r * (row_h + gap) + row_h / 2, caption, ha="right", va="center", fontsize=8)
    shape = "x".join(str(d) for d in maps.shape[1:])
    fig.suptitle(
        f"{kind} {layer}: output {shape} (channels x height x width){subtitle}\n"
        "left: the input image; right: its channels, each scaled to its own range (yellow: strongest)",
        fontsize=10,
    )
    return fig


def explanations_figure(
    images: np.ndarray,
    overlays: np.ndarray,
    captions: Sequence[str],
    colors: Sequence[str],
    title: str,
    footer: str,
    columns: int = 4,
) -> Figure:
    return _image_grid(images, captions, colors, columns, title, footer, cell_inches=2.0, overlays=overlays)


# --------------------------------------------------------------------------- how far to trust it


def reliability_figure(panels: Sequence[tuple[str, object]], subtitle: str = "") -> Figure:
    """A reliability diagram per (title, calibration.Reliability): accuracy against confidence per bin.

    Bars on the diagonal are a calibrated model; below it, over-confident. The count of images per
    bin is drawn underneath, on a log scale, since nearly all sit in the last bin.
    """
    fig = Figure(figsize=(5.2 * len(panels), 6.2), layout="constrained")
    grid = fig.subplots(2, len(panels), height_ratios=[3, 1], squeeze=False)
    for k, (title, rel) in enumerate(panels):
        ax, counts_ax = grid[0, k], grid[1, k]
        edges = rel.edges
        centers = (edges[:-1] + edges[1:]) / 2
        width = np.diff(edges)
        used = rel.counts > 0
        ax.bar(centers[used], rel.accuracy[used], width[used], color="C0", edgecolor="white", label="accuracy")
        ax.bar(
            centers[used],
            rel.confidence[used] - rel.accuracy[used],
            width[used],
            bottom=rel.accuracy[used],
            color=WRONG_COLOR,
            alpha=0.35,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], color="black", lw=1, ls="--", label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy in the bin")
        ax.set_title(f"{title}: ECE {rel.ece:.2%}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        counts_ax.bar(centers, np.maximum(rel.counts, 0), width, color=NOISE_COLOR, edgecolor="white")
        counts_ax.set_yscale("symlog")
        counts_ax.set_xlim(0, 1)
        counts_ax.set_xlabel("confidence (top-class probability)")
        counts_ax.set_ylabel("images")
    fig.suptitle(f"Reliability diagram, {int(panels[0][1].counts.sum()):,} test images{subtitle}", fontsize=12)
    return fig


def _per_class_curves(curves, areas, class_names, xlabel, ylabel, title, area_name, diagonal: bool) -> Figure:
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    for k, ((x, y), area, name) in enumerate(zip(curves, areas, class_names, strict=True)):
        ax.plot(x, y, lw=1.3, color=f"C{k % 10}", label=f"{name} ({area_name} {area:.4f})")
    if diagonal:
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if diagonal else "lower left")
    fig.suptitle(title, fontsize=11)
    return fig


def roc_figure(ranking, subtitle: str = "") -> Figure:
    """One-vs-rest ROC curve per class (a `ranking.Ranking`), AUC in the legend."""
    return _per_class_curves(
        ranking.roc,
        ranking.roc_auc,
        ranking.class_names,
        "false positive rate",
        "true positive rate",
        f"ROC, one class against the rest: macro AUC {ranking.roc_auc.mean():.4f}{subtitle}",
        "AUC",
        diagonal=True,
    )


def pr_figure(ranking, subtitle: str = "") -> Figure:
    """One-vs-rest precision-recall curve per class, average precision in the legend."""
    return _per_class_curves(
        ranking.pr,
        ranking.average_precision,
        ranking.class_names,
        "recall",
        "precision",
        f"Precision-recall, one class against the rest: mean AP {ranking.average_precision.mean():.4f}{subtitle}",
        "AP",
        diagonal=False,
    )
