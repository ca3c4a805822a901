"""llmbook.widgets: an explorer's static rendering holds one frame per point of its grid and opens on the
function's defaults; its live rendering is ipywidgets' interactive view. (tests/test_book.py moves the
controls in a real browser.)"""

from __future__ import annotations

import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from llmbook.widgets import MAX_FRAMES, explorer_html, static_interact  # noqa: E402


def _data(page: str) -> dict:
    found = re.search(
        r'<script type="application/json" class="llmbook-explorer-data">(.*?)</script>', page, re.S
    )
    assert found, "the explorer carries no frame data"
    return json.loads(found.group(1))


def _shown(page: str) -> str:
    return re.search(r'<div class="llmbook-explorer-frame[^"]*">(.*?)</div><script', page, re.S).group(1)


def greet(name="world", times=2):
    print(f"hello {name} " * times)


def test_explorer_holds_one_frame_per_grid_point_in_row_major_order():
    page = explorer_html(greet, name=["world", "moon", "sun"], times=[1, 2])
    data = _data(page)
    assert data["shape"] == [3, 2]
    assert data["labels"] == [["world", "moon", "sun"], ["1", "2"]]
    frames = [data["frames"][i] for i in data["index"]]
    # The last control varies fastest: (world, 1), (world, 2), (moon, 1), ...
    assert "hello moon \n" in frames[2] and "hello moon hello moon" in frames[3]
    assert len(frames) == 6 and len(set(frames)) == 6


def test_explorer_opens_on_the_functions_defaults():
    page = explorer_html(greet, name=["moon", "world"], times=[1, 2, 3])
    assert "hello world hello world" in _shown(page) and "hello world hello world hello" not in _shown(page)
    assert '<option value="1" selected>world</option>' in page
    assert 'data-control="1" min="0" max="2" step="1" value="1"' in page


def test_identical_frames_are_stored_once():
    def constant(x=0):
        print("same")

    data = _data(explorer_html(constant, x=[0, 1, 2, 3]))
    assert data["index"] == [0, 0, 0, 0] and len(data["frames"]) == 1


def test_frames_keep_html_in_printed_text_inert():
    def shout(text="<b>"):
        print(text + "</script>")

    page = explorer_html(shout, text=["<b>", "<i>"])
    assert "&lt;b&gt;&lt;/script&gt;" in _shown(page)
    assert page.count("</script>") == 2  # the data script and the switching script, nothing printed


def test_figures_become_png_frames_and_are_closed():
    def draw(slope=1.0):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, slope])
        plt.show()

    before = plt.get_fignums()
    data = _data(explorer_html(draw, slope=[1.0, 2.0]))
    assert plt.get_fignums() == before, "frames left figures open"
    assert all(frame.startswith('<img src="data:image/png;base64,') for frame in data["frames"])
    assert len(set(data["frames"])) == 2


def test_a_default_off_the_grid_is_refused():
    with pytest.raises(ValueError, match=r"default times=2 is not on its grid \[1, 3\]"):
        explorer_html(greet, times=[1, 3])


def test_a_grid_for_a_parameter_the_function_lacks_is_refused():
    with pytest.raises(ValueError, match="greet has no parameter 'volume'"):
        explorer_html(greet, volume=[1, 2])


def test_a_grid_with_too_many_frames_is_refused():
    with pytest.raises(ValueError, match=f"more than {MAX_FRAMES}"):
        explorer_html(greet, name=["world", *map(str, range(MAX_FRAMES))], times=[1, 2])


def test_a_function_that_shows_nothing_is_refused():
    def silent(x=0):
        pass

    with pytest.raises(ValueError, match="printed nothing and drew no figure"):
        explorer_html(silent, x=[0, 1])


def test_static_interact_displays_the_live_view_and_the_static_frames_in_one_output(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append((obj, raw)))
    static_interact(greet, name=["world", "moon"], times=[1, 2])
    [(bundle, raw)] = shown
    assert raw and set(bundle) == {"text/plain", "text/html", "application/vnd.jupyter.widget-view+json"}
    assert _data(bundle["text/html"])["shape"] == [2, 2]


def test_static_interact_refuses_a_live_widget_without_a_grid():
    import ipywidgets

    with pytest.raises(ValueError, match=r"live widgets \['volume'\] have no grid"):
        static_interact(greet, live={"volume": ipywidgets.IntSlider()}, name=["world"], times=[2])
