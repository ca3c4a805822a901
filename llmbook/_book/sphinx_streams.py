"""Sphinx extension: show progress bars on the static pages in their final state, as a terminal would.

A progress bar (tqdm) redraws itself by writing "\\r" and the new state, and a notebook saves every
redraw as its own stream output: on a static page each one is a separate line, hundreds of them. This
extension replays each run of consecutive stream outputs of a cell (stdout and stderr interleaved, in
the order they were written) on a model terminal and renders what the terminal ends with: the bar's
final line, and every line that was ended with a newline (warnings and errors included) unchanged.
Runs without "\\r" or backspace are left exactly as they are.
"""

from __future__ import annotations

import re

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.transforms import SphinxTransform

_CONTROL = re.compile(r"(\r\n|\n|\r|\x08)")


def _replay(writes: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The lines one terminal shows after the numbered writes, each with the number of the write ending it."""
    lines: list[tuple[int, str]] = []
    cells: list[str] = []  # the current line, one character per column
    cursor = 0
    for number, text in writes:
        for piece in _CONTROL.split(text):
            if piece in ("\n", "\r\n"):
                lines.append((number, "".join(cells).rstrip()))
                cells, cursor = [], 0
            elif piece == "\r":
                cursor = 0
            elif piece == "\x08":
                cursor = max(0, cursor - 1)
            else:
                for ch in piece:
                    if cursor < len(cells):
                        cells[cursor] = ch
                    else:
                        cells.append(ch)
                    cursor += 1
    if "".join(cells).strip():  # an unfinished line that still shows something (a bar left open)
        lines.append((writes[-1][0], "".join(cells).rstrip()))
    return lines


def terminal_lines(writes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (stream name, line) pairs a terminal shows after the (stream name, text) writes, in order.

    Each stream is replayed on a terminal of its own: a kernel sends stdout and stderr separately, so
    a bar's redraw and a line printed "under" it can arrive in either order. Lines are then ordered by
    the write that ended them.
    """
    ended: list[tuple[int, str, str]] = []
    for name in dict.fromkeys(name for name, _ in writes):
        own = [(number, text) for number, (other, text) in enumerate(writes) if other == name]
        ended += [(number, name, line) for number, line in _replay(own)]
    ended.sort(key=lambda item: item[0])  # stable: lines ended by one write keep their order
    return [(name, line) for _, name, line in ended]


def collapse_writes(writes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (stream name, text) blocks showing the final terminal state; consecutive lines of a stream join."""
    blocks: list[tuple[str, str]] = []
    for name, line in terminal_lines(writes):
        if blocks and blocks[-1][0] == name:
            blocks[-1] = (name, blocks[-1][1] + line + "\n")
        else:
            blocks.append((name, line + "\n"))
    return blocks


def _stream_name(node: nodes.Node) -> str | None:
    if not isinstance(node, nodes.literal_block) or "output" not in node["classes"]:
        return None
    if "stderr" in node["classes"]:
        return "stderr"
    return "stdout" if "stream" in node["classes"] else None


class CollapseProgressOutput(SphinxTransform):
    """Replace each cell's runs of stream outputs that redraw themselves with their final state."""

    default_priority = 700

    def apply(self, **kwargs) -> None:
        for output in list(self.document.findall(nodes.container)):
            if output.get("nb_element") == "cell_code_output":
                for run in _stream_runs(output):
                    _collapse_run(output, run)


def _stream_runs(output: nodes.container) -> list[list[nodes.literal_block]]:
    runs: list[list[nodes.literal_block]] = [[]]
    for child in output.children:
        if _stream_name(child):
            runs[-1].append(child)
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def _collapse_run(output: nodes.container, run: list[nodes.literal_block]) -> None:
    writes = [(_stream_name(node), node.astext()) for node in run]
    if not any("\r" in text.replace("\r\n", "\n") or "\x08" in text for _, text in writes):
        return
    first_of = {}
    for node in run:
        first_of.setdefault(_stream_name(node), node)
    replacement = []
    for name, text in collapse_writes(writes):
        like = first_of[name]
        block = nodes.literal_block(
            text, text, language=like.get("language", "none"), classes=like["classes"]
        )
        block.source, block.line = like.source, like.line
        replacement.append(block)
    at = output.index(run[0])
    for node in run:
        output.remove(node)
    output[at:at] = replacement


def setup(app: Sphinx) -> dict:
    app.add_transform(CollapseProgressOutput)
    # Bump when the rendering changes, so Sphinx re-reads pages whose doctrees it cached.
    return {"parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
