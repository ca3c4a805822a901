"""Explorers (sliders and menus) that work in a running notebook and on the book's static pages alike.

`static_interact(function, **grids)` displays one output with two renderings of the same explorer:

- ipywidgets' `interactive` view, which a front-end with a widget manager (Jupyter, VS Code, Colab)
  shows: live sliders that call the function on a running kernel, as `ipywidgets.interact` does;
- a self-contained HTML rendering, which the book's pages show (its _config.yml ranks HTML above widget
  views): the function's output precomputed at every point of the grid of the controls' values, and
  range inputs and menus that switch between those frames with a few lines of the page's own script.
  No kernel, no network: it works from a file opened offline.

A frame is what the function prints (shown as text) and every matplotlib figure it draws (a small
palette PNG). Identical frames are stored once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import inspect
import io
import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any

# Beyond this many frames an explorer weighs megabytes; a coarser grid shows the same thing.
MAX_FRAMES = 400

_SCRIPT = """
(function () {
  const root = document.getElementById("%(id)s");
  const data = JSON.parse(root.querySelector("script.llmbook-explorer-data").textContent);
  const controls = Array.from(root.querySelectorAll("[data-control]"));
  const frame = root.querySelector(".llmbook-explorer-frame");
  function show() {
    let flat = 0;
    controls.forEach((control, k) => {
      const i = Number(control.value);
      flat = flat * data.shape[k] + i;
      const label = control.parentElement.querySelector("output");
      if (label) { label.textContent = data.labels[k][i]; }
    });
    frame.innerHTML = data.frames[data.index[flat]];
  }
  controls.forEach((control) => {
    control.addEventListener("input", show);
    control.addEventListener("change", show);
  });
})();
"""


def static_interact(
    function: Callable[..., Any],
    /,
    *,
    live: dict[str, Any] | None = None,
    dpi: int = 70,
    **grids: Sequence[Any],
) -> None:
    """Display `function` as a live ipywidgets explorer and, in the same output, as precomputed frames.

    Each keyword names a parameter of `function` and the values the static page offers for it. The live
    explorer uses the widget given in `live` for that parameter (for finer steps than the grid), or else a
    slider (numbers) or a menu (anything else) over the grid's values.
    """
    import ipywidgets
    from IPython.display import display

    page = explorer_html(function, dpi=dpi, **grids)
    defaults = initial_values(function, grids)
    controls = {
        name: live[name] if live and name in live else _live_control(name, values, defaults[name])
        for name, values in grids.items()
    }
    unknown = sorted(set(live or {}) - set(grids))
    if unknown:
        raise ValueError(f"live widgets {unknown} have no grid: give each live control a grid of values too")
    view = ipywidgets.interactive(function, **controls)
    display({**view._repr_mimebundle_(), "text/html": page}, raw=True)


def initial_values(function: Callable[..., Any], grids: dict[str, Sequence[Any]]) -> dict[str, Any]:
    """Each control's starting value: the function's default (which must be on the grid), else the first."""
    parameters = inspect.signature(function).parameters
    values = {}
    for name, grid in grids.items():
        if name not in parameters:
            raise ValueError(f"{function.__name__} has no parameter {name!r}; it takes {list(parameters)}")
        if len(grid) == 0:
            raise ValueError(f"the grid of {name!r} is empty: give at least one value")
        default = parameters[name].default
        if default is inspect.Parameter.empty:
            values[name] = grid[0]
        elif default in list(grid):
            values[name] = default
        else:
            raise ValueError(
                f"{function.__name__}'s default {name}={default!r} is not on its grid {list(grid)}: "
                "add it, so that the page opens on the same frame as the live explorer"
            )
    return values


def explorer_html(function: Callable[..., Any], /, *, dpi: int = 70, **grids: Sequence[Any]) -> str:
    """Self-contained HTML: `function`'s output at every point of the grids, and controls to switch."""
    defaults = initial_values(function, grids)
    names, axes = list(grids), [list(values) for values in grids.values()]
    shape = [len(axis) for axis in axes]
    count = 1
    for size in shape:
        count *= size
    if count > MAX_FRAMES:
        raise ValueError(
            f"{count} frames ({' x '.join(map(str, shape))} values of {', '.join(names)}) is more than "
            f"{MAX_FRAMES}: give the grids fewer values"
        )
    frames: list[str] = []
    seen: dict[str, int] = {}
    index = []
    for point in itertools.product(*axes):  # row-major: the last control varies fastest
        frame = render_frame(function, dict(zip(names, point, strict=True)), dpi)
        index.append(seen.setdefault(frame, len(frames)))
        if index[-1] == len(frames):
            frames.append(frame)
    start = [axis.index(defaults[name]) for name, axis in zip(names, axes, strict=True)]
    flat = 0
    for position, size in zip(start, shape, strict=True):
        flat = flat * size + position
    labels = [[_label(value) for value in axis] for axis in axes]
    payload = json.dumps({"shape": shape, "labels": labels, "index": index, "frames": frames})
    payload = payload.replace("<", "\\u003c")  # no "</script>" can end the data early
    ident = "llmbook-explorer-" + hashlib.sha256(payload.encode()).hexdigest()[:12]
    controls = "".join(
        _control_html(k, name, axis, labels[k], start[k])
        for k, (name, axis) in enumerate(zip(names, axes, strict=True))
    )
    return (
        f'<div class="llmbook-explorer" id="{ident}">'
        '<div class="llmbook-explorer-controls" style="display:flex;flex-wrap:wrap;gap:0.4em 1.5em">'
        f"{controls}</div>"
        f'<div class="llmbook-explorer-frame tex2jax_ignore mathjax_ignore">{frames[index[flat]]}</div>'
        f'<script type="application/json" class="llmbook-explorer-data">{payload}</script>'
        f"<script>{_SCRIPT % {'id': ident}}</script></div>"
    )


def render_frame(function: Callable[..., Any], arguments: dict[str, Any], dpi: int) -> str:
    """The HTML of one frame: what `function(**arguments)` prints, then each figure it draws (PNG)."""
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    text = io.StringIO()
    # plt.show() would hand the figure to the notebook (and close it): keep it open to save it here.
    with contextlib.redirect_stdout(text), _no_show(plt):
        function(**arguments)
    parts = []
    if text.getvalue():
        parts.append(f'<pre style="white-space:pre-wrap">{html.escape(text.getvalue())}</pre>')
    for number in sorted(set(plt.get_fignums()) - before):
        figure = plt.figure(number)
        encoded = base64.b64encode(_png(figure, dpi)).decode("ascii")
        plt.close(figure)
        alt = ", ".join(f"{name} = {_label(value)}" for name, value in arguments.items())
        parts.append(
            f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}" style="max-width:100%">'
        )
    if not parts:
        raise ValueError(
            f"{function.__name__}({arguments}) printed nothing and drew no figure: nothing to show"
        )
    return "".join(parts)


@contextlib.contextmanager
def _no_show(plt):
    show = plt.show
    plt.show = lambda *args, **kwargs: None
    try:
        yield
    finally:
        plt.show = show


def _png(figure, dpi: int) -> bytes:
    """The figure as a PNG of 32 colours: plots need few, and a palette PNG is a third the size."""
    from PIL import Image

    raw = io.BytesIO()
    figure.savefig(raw, format="png", dpi=dpi, bbox_inches="tight")
    image = Image.open(raw).convert("RGB").quantize(colors=32, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="png", optimize=True)
    return out.getvalue()


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return value if isinstance(value, str) else repr(value)


def _control_html(k: int, name: str, axis: list[Any], labels: list[str], start: int) -> str:
    """A range input for numbers (its value is the position on the grid) or a menu for anything else."""
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in axis):
        control = (
            f'<input type="range" data-control="{k}" min="0" max="{len(axis) - 1}" step="1" value="{start}">'
            f"<output>{html.escape(labels[start])}</output>"
        )
    else:
        options = "".join(
            f'<option value="{i}"{" selected" if i == start else ""}>{html.escape(label)}</option>'
            for i, label in enumerate(labels)
        )
        control = f'<select data-control="{k}">{options}</select>'
    return f'<label style="display:flex;align-items:center;gap:0.5em">{html.escape(name)} {control}</label>'


def _live_control(name: str, values: Sequence[Any], start: Any):
    """The live explorer's default control: a slider over the grid's numbers, else a menu of its values."""
    import ipywidgets

    values = list(values)
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        return ipywidgets.SelectionSlider(
            options=[(_label(v), v) for v in values], value=start, description=name
        )
    return ipywidgets.Dropdown(options=values, value=start, description=name)
