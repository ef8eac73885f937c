"""Looking at a spin: an ipywidgets yaw slider with RGB and normals side by side, and static contact sheets.

Notebook 07. ``spin_viewer(result)`` returns a widget (a slider over the views in yaw order and the picture of
the chosen view); in a live notebook moving the slider turns the head. Headless (papermill, nbmake) the widget is
only displayed, nothing waits for input. ``contact_sheet(result)`` is the static picture for reports.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch


def _as_result(result_or_folder):
    from .spinning import SpinResult

    if isinstance(result_or_folder, (str, os.PathLike)):
        return SpinResult.load(Path(result_or_folder))
    return result_or_folder


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="png")
    return buf.getvalue()


def spin_viewer(result_or_folder, size: int = 192):
    """A yaw slider over a ``SpinResult`` (or a saved spin folder): RGB | normals of the chosen view.

    Views are ordered by yaw from -180 to 180 degrees; each frame is upscaled (nearest) to at least ``size``
    pixels high and drawn ``size`` pixels high whatever the width of the notebook, with the slider as wide as the
    picture: both fit on one screen (left to itself, JupyterLab stretches an image to the full output width, and
    a 64 px view became a picture taller than the screen). Returns an ``ipywidgets.VBox``; needs ``ipywidgets``
    (``pip install -e .[notebooks]``).
    """
    try:
        import ipywidgets as widgets
    except ImportError:
        raise ImportError("the viewer needs ipywidgets: pip install ipywidgets (or `pip install -e .[notebooks]`)") \
            from None
    res = _as_result(result_or_folder)
    frames = res.frames(min_size=size)
    yaw = res.yaw.float()
    order = torch.argsort(yaw).tolist()
    pngs = {i: _png(frames[i]) for i in order}
    options = [(f"{float(yaw[i]):+.1f}°", i) for i in order]
    start = min(order, key=lambda i: abs(float(yaw[i])))          # the view nearest the front
    h, w = frames[0].shape[:2]
    width = round(size * w / h)                                    # RGB | normals: twice as wide as high
    slider = widgets.SelectionSlider(options=options, value=start, description="yaw", continuous_update=True,
                                     layout=widgets.Layout(width=f"{max(width, 320)}px"))
    image = widgets.Image(value=pngs[start], format="png",
                          layout=widgets.Layout(width=f"{width}px", height=f"{size}px", object_fit="contain"))
    caption = widgets.HTML()

    def show(i: int) -> None:
        image.value = pngs[i]
        caption.value = (f"view {i} of {len(res)}: yaw {float(yaw[i]):+.1f}°, pitch {float(res.pitch[i]):+.1f}°"
                         " &nbsp; (left: RGB, right: normals)")

    slider.observe(lambda change: show(change["new"]), names="value")
    show(start)
    return widgets.VBox([slider, image, caption])


def show_spin(result_or_folder, size: int = 192):
    """Display ``spin_viewer`` in the notebook (and return it)."""
    from IPython.display import display

    w = spin_viewer(result_or_folder, size)
    display(w)
    return w


def contact_sheet(result_or_folder, every: int = 1, path: str | os.PathLike | None = None, cols: int = 12):
    """A matplotlib figure of every ``every``-th view: RGB rows above normal rows, yaw in the titles."""
    import matplotlib.pyplot as plt

    res = _as_result(result_or_folder)
    idx = list(range(0, len(res), max(1, every)))
    cols = min(cols, len(idx))
    rows = (len(idx) + cols - 1) // cols
    fig, axes = plt.subplots(2 * rows, cols, figsize=(1.1 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        axes[2 * r, c].imshow(res.views[i].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[2 * r, c].set_title(f"{float(res.yaw[i]):+.0f}°", fontsize=7)
        axes[2 * r + 1, c].imshow(res.normals[i].permute(1, 2, 0).clamp(0, 1).numpy())
    fig.suptitle(f"{len(res)} views: RGB above, normals below")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def relative_yaw(result_or_folder) -> torch.Tensor:
    """Each view's yaw relative to the input's (view 0), wrapped to [-180, 180) degrees."""
    from .spinning import wrap_yaw

    res = _as_result(result_or_folder)
    return wrap_yaw(res.yaw.double() - float(res.yaw[0]))


def near_views(result_or_folder, max_yaw: float = 50.0) -> list[int]:
    """Indices of the views within ``max_yaw`` degrees of the input's yaw (view 0), in yaw order."""
    rel = relative_yaw(result_or_folder)
    return sorted((i for i in range(len(rel)) if abs(float(rel[i])) <= max_yaw), key=lambda i: float(rel[i]))


def close_up(result_or_folder, max_yaw: float = 50.0, found=None, path: str | os.PathLike | None = None,
             size: float = 1.9):
    """The faces: the views within ``max_yaw`` of the input, large and unsmoothed (nearest-pixel), in yaw order.

    ``found``: optional ``{view index: bool}`` (a face detector's verdict, ``faces.FaceDescriptor.found``) shown under
    each view. A contact sheet of 16 small views hides whether a face came out at 22 or 45 degrees; this does not.
    """
    import matplotlib.pyplot as plt

    res = _as_result(result_or_folder)
    rel = relative_yaw(res)
    idx = near_views(res, max_yaw)
    fig, axes = plt.subplots(1, len(idx), figsize=(size * len(idx), size * 1.2), squeeze=False)
    for ax, i in zip(axes[0], idx):
        ax.imshow(res.views[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        title = "input" if i == 0 else f"{float(rel[i]):+.1f}°"
        ax.set_title(title, fontsize=8)
        if found is not None and i in found:
            ax.set_xlabel("face found" if found[i] else "no face found", fontsize=7,
                          color="green" if found[i] else "red")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
