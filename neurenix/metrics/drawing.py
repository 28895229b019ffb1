"""Figures drawn with Pillow (installed with TensorBoard): no plotting library at run time.

The accuracy matrix as a labelled heatmap, plus the small pieces any neurenix figure can reuse:
:func:`font` (a scalable font wherever Pillow has FreeType), :func:`colormap` (accuracy to
colour), :func:`text_colour` (black or white, whichever reads better on a colour) and
:func:`draw_text` (text placed by its centre or edge, optionally turned to read upwards).

A figure is laid out first (:func:`accuracy_matrix_layout`: every box, colour and text with its
place) and drawn second (:func:`draw_accuracy_matrix`), so what a figure says can be checked
without reading pixels.
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "UNMEASURED",
    "AccuracyMatrixLayout",
    "Box",
    "Text",
    "accuracy_matrix_layout",
    "colormap",
    "contrast",
    "draw_accuracy_matrix",
    "draw_text",
    "font",
    "text_colour",
    "text_size",
]

RGB = tuple[int, int, int]

# Viridis (van der Walt & Smith, matplotlib's default) sampled at 0, 0.1, ..., 1 and interpolated
# linearly (within 14/255 of the full map): perceptually uniform, monotone in lightness, so it
# reads in greyscale and for colour-blind readers, and it holds no neutral grey.
_VIRIDIS: tuple[RGB, ...] = (
    (68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142), (33, 145, 140),
    (34, 168, 132), (68, 191, 112), (122, 209, 81), (189, 223, 38), (253, 231, 37),
)
UNMEASURED: RGB = (204, 204, 204)
"""The colour of a cell that holds no measurement (a task not yet trained, for its row)."""

_BLACK, _WHITE, _INK, _MUTED = (0, 0, 0), (255, 255, 255), (20, 20, 20), (85, 85, 85)
_MARGIN = 14  # around the figure
_GAP = 2  # white between cells, so that neighbouring cells of close colours stay apart
_BAR_WIDTH = 14
_BAR_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
_TITLE_SIZE, _AXIS_SIZE, _TICK_SIZE = 16, 13, 12


@functools.lru_cache(maxsize=None)  # loading decodes the embedded font: once per size, not per text
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's own font at ``size`` pixels (Pillow >= 10.1 with FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # an older Pillow, or one built without FreeType
        return ImageFont.load_default()


def colormap(value: float) -> RGB:
    """The colour of an accuracy: viridis from dark violet (0) to yellow (1), clamped to [0, 1].

    Raises:
        ValueError: ``value`` is ``nan`` (an unmeasured cell is :data:`UNMEASURED`, not a colour of the scale).
    """
    if math.isnan(value):
        raise ValueError("colormap got nan: an unmeasured value has no colour on the scale (UNMEASURED is its colour)")
    position = min(max(value, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    low = min(int(position), len(_VIRIDIS) - 2)
    weight = position - low
    return tuple(round(a + weight * (b - a)) for a, b in zip(_VIRIDIS[low], _VIRIDIS[low + 1]))  # type: ignore[return-value]


def text_colour(background: RGB) -> RGB:
    """Black or white, whichever contrasts more with ``background`` (WCAG 2 contrast ratio).

    On every colour of :func:`colormap` the ratio is at least 4.5, WCAG's level for body text.
    """
    return _BLACK if contrast(_BLACK, background) >= contrast(_WHITE, background) else _WHITE


def contrast(first: RGB, second: RGB) -> float:
    """The WCAG 2 contrast ratio of two colours, from 1 (same lightness) to 21 (black on white)."""
    lighter, darker = sorted((_luminance(first), _luminance(second)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def _luminance(colour: RGB) -> float:
    def linear(channel: int) -> float:
        c = channel / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


# ---------------------------------------------------------------------------- text
@dataclass(frozen=True)
class Text:
    """A text of a figure: what it says, what it is, and where it goes.

    ``xy`` is the point the text is placed by: its vertical middle, and its left edge, centre or
    right edge (``align``). ``upward`` texts are turned a quarter to read from bottom to top, and
    are then centred on ``xy``.
    """

    text: str
    role: str
    xy: tuple[float, float]
    size: int
    fill: RGB = _INK
    align: str = "center"
    upward: bool = False


def text_size(text: str, size: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of ``text`` in :func:`font` ``(size)``, as it reads (not turned)."""
    left, top, right, bottom = font(size).getbbox(text)
    return right - left, bottom - top


def draw_text(image: Image.Image, item: Text) -> None:
    """Draw ``item`` on ``image`` (Pillow's own anchors need FreeType: placed from the bounding box instead)."""
    face = font(item.size)
    left, top, right, bottom = face.getbbox(item.text)
    x, y = item.xy
    if item.upward:
        stamp = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(stamp).text((-left, -top), item.text, fill=255, font=face)
        stamp = stamp.rotate(90, expand=True)
        image.paste(item.fill, (round(x - stamp.width / 2), round(y - stamp.height / 2)), stamp)
        return
    offset = {"left": left, "center": (left + right) / 2, "right": right}[item.align]
    ImageDraw.Draw(image).text((round(x - offset), round(y - (top + bottom) / 2)), item.text, fill=item.fill, font=face)


# ---------------------------------------------------------------------------- the accuracy matrix
@dataclass(frozen=True)
class Box:
    """Pixels ``left <= x < right``, ``top <= y < bottom``."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top


@dataclass
class AccuracyMatrixLayout:
    """Everything the accuracy-matrix figure shows, placed: what :func:`draw_accuracy_matrix` draws.

    Attributes:
        size: ``(width, height)`` of the figure in pixels.
        cells: ``cells[i][j]``, the box of the accuracy on the ``j``-th task after the ``i``-th.
        colours: ``colours[i][j]``, that cell's fill (:func:`colormap`, or :data:`UNMEASURED`).
        colour_bar: the box of the colour scale, 0 at its bottom row, 1 at its top row.
        texts: every text, each with its role: ``"title"``, ``"row_axis"``, ``"column_axis"``,
            ``"row_label"`` and ``"column_label"`` (the task ids, in order), ``"cell"`` (one per
            measured cell, row by row), ``"bar_label"``, ``"bar_axis"``, ``"legend"``.
        legend_swatch: the box of the grey sample beside "not measured", when a cell is unmeasured.
    """

    size: tuple[int, int]
    cells: list[list[Box]]
    colours: list[list[RGB]]
    colour_bar: Box
    texts: list[Text] = field(default_factory=list)
    legend_swatch: Optional[Box] = None

    def texts_of(self, role: str) -> list[str]:
        """The texts of one role, in the order they are drawn."""
        return [item.text for item in self.texts if item.role == role]


def accuracy_matrix_layout(
    matrix: Any,
    task_ids: Optional[Sequence[int]] = None,
    *,
    title: str = "Test accuracy after each task",
    cell: int = 48,
) -> AccuracyMatrixLayout:
    """Lay out the accuracy matrix ``R`` as a labelled heatmap.

    Row ``i`` is the model after training the ``i``-th task, column ``j`` its accuracy on the
    ``j``-th task's test data; both axes are labelled with the task ids. Each measured cell is
    coloured by :func:`colormap` and shows its accuracy (three decimals, two where the cell is too
    narrow for three); a ``nan`` cell (not measured) is grey, explained by a legend. A colour bar
    shows the scale from 0 to 1. The figure grows with the number of tasks, ``cell`` pixels a task.

    Args:
        matrix: ``R``, square, accuracies in [0, 1] and ``nan`` where not measured (a tensor or
            nested sequences).
        task_ids: the id of each row's and column's task, as the user's code numbers tasks
            (default ``0 .. n-1``).
        title: the figure's title.
        cell: the side of a cell in pixels, ``>= 16``.

    Raises:
        ValueError: ``matrix`` is not square, ``task_ids`` does not name each task once, or ``cell < 16``.
    """
    values = _square(matrix)
    labels = [str(task) for task in _checked_task_ids(task_ids, len(values))]
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 16:
        raise ValueError(f"cell must be an int >= 16 (pixels), got {cell!r}")
    return _Layout(values, labels, title, cell).build()


def draw_accuracy_matrix(
    matrix: Any,
    task_ids: Optional[Sequence[int]] = None,
    *,
    title: str = "Test accuracy after each task",
    cell: int = 48,
) -> Image.Image:
    """The accuracy matrix as an RGB image: :func:`accuracy_matrix_layout` drawn, same arguments."""
    layout = accuracy_matrix_layout(matrix, task_ids, title=title, cell=cell)
    image = Image.new("RGB", layout.size, _WHITE)
    draw = ImageDraw.Draw(image)
    for boxes, colours in zip(layout.cells, layout.colours):
        for box, colour in zip(boxes, colours):
            draw.rectangle((box.left, box.top, box.right - 1, box.bottom - 1), fill=colour)
    bar = layout.colour_bar
    for y in range(bar.top, bar.bottom):
        draw.line((bar.left, y, bar.right - 1, y), fill=colormap(_bar_value(bar, y)))
    draw.rectangle((bar.left - 1, bar.top - 1, bar.right, bar.bottom), outline=_MUTED)
    for tick in _BAR_TICKS:
        y = _bar_row(bar, tick)
        draw.line((bar.right, y, bar.right + 3, y), fill=_MUTED)
    if layout.legend_swatch is not None:
        swatch = layout.legend_swatch
        draw.rectangle((swatch.left, swatch.top, swatch.right - 1, swatch.bottom - 1), fill=UNMEASURED)
    for item in layout.texts:
        draw_text(image, item)
    return image


def _bar_value(bar: Box, y: int) -> float:
    """The accuracy of colour-bar row ``y``: 0 at the bottom row, 1 at the top row."""
    return (bar.bottom - 1 - y) / (bar.height - 1)


def _bar_row(bar: Box, value: float) -> int:
    return round(bar.bottom - 1 - value * (bar.height - 1))


_ROW_AXIS, _COLUMN_AXIS, _BAR_AXIS, _LEGEND = "after training task", "evaluated on task", "accuracy", "not measured"
_SPACE = 8  # between a label and what it labels, in pixels
_SWATCH = 12  # the legend's grey sample, square


class _Layout:
    """Places the parts around the matrix: title above, rows' axis left, columns' axis below,
    colour bar and legend right. Offsets are measured on the texts, so any font fits."""

    def __init__(self, values: list[list[float]], labels: list[str], title: str, cell: int) -> None:
        self.values, self.labels, self.title, self.cell = values, labels, title, cell
        self.cell_size = max(9, min(16, cell // 4 + 1))
        # Three decimals where they fit in the cell with a little air, else two.
        self.decimals = 3 if text_size("0.000", self.cell_size)[0] <= cell - _SPACE else 2
        self.side = len(values) * cell
        self.axis_h = text_size("Ag", _AXIS_SIZE)[1]
        self.tick_h = text_size("0123456789", _TICK_SIZE)[1]
        # The upward rows' title may be longer than a short matrix is tall: room above and below.
        self.pad = max(0, text_size(_ROW_AXIS, _AXIS_SIZE)[0] - self.side) // 2 + 1
        self.top = _MARGIN + text_size(title, _TITLE_SIZE)[1] + 14 + self.pad
        row_labels_w = max(text_size(label, _TICK_SIZE)[0] for label in labels)
        self.left = _MARGIN + self.axis_h + 10 + row_labels_w + _SPACE
        self.below = self.top + self.side + 4  # where the column labels begin

    def build(self) -> AccuracyMatrixLayout:
        cells = [[self._cell(i, j) for j in range(len(self.values))] for i in range(len(self.values))]
        colours = [[UNMEASURED if math.isnan(v) else colormap(v) for v in row] for row in self.values]
        left, top, side, gap = self.left, self.top, self.side, _GAP
        bar = Box(left + side + 16, top, left + side + 16 + _BAR_WIDTH, top + side - gap)
        texts = [*self._axes(), *self._cell_texts(cells, colours)]
        right = self._colour_bar_texts(bar, texts)
        # The legend's room is kept when no cell needs it: a run's figures keep one size from the
        # first task to the last (TensorBoard's step slider then shows them in place).
        right = max(right, bar.left + _SWATCH + 5 + text_size(_LEGEND, _TICK_SIZE)[0])
        swatch = self._legend(bar, texts)
        title_w, title_h = text_size(self.title, _TITLE_SIZE)
        width = max(math.ceil(right) + _MARGIN, title_w + 2 * _MARGIN)
        height = math.ceil(self.below + self.tick_h + _SPACE + self.axis_h + self.pad) + _MARGIN
        texts.insert(0, Text(self.title, "title", (width / 2, _MARGIN + title_h / 2), _TITLE_SIZE))
        return AccuracyMatrixLayout((width, height), cells, colours, bar, texts, swatch)

    def _cell(self, i: int, j: int) -> Box:
        x, y, cell = self.left + j * self.cell, self.top + i * self.cell, self.cell
        return Box(x, y, x + cell - _GAP, y + cell - _GAP)

    def _axes(self) -> list[Text]:
        """The axes' titles, and the task ids beside each row's middle and under each column's."""
        middle = [(k + 0.5) * self.cell - _GAP / 2 for k in range(len(self.labels))]
        column_labels_y = self.below + self.tick_h / 2
        return [
            Text(_ROW_AXIS, "row_axis", (_MARGIN + self.axis_h / 2, self.top + self.side / 2), _AXIS_SIZE, upward=True),
            *(Text(label, "row_label", (self.left - _SPACE, self.top + m), _TICK_SIZE, align="right") for label, m in zip(self.labels, middle)),
            *(Text(label, "column_label", (self.left + m, column_labels_y), _TICK_SIZE) for label, m in zip(self.labels, middle)),
            Text(_COLUMN_AXIS, "column_axis", (self.left + self.side / 2, self.below + self.tick_h + _SPACE + self.axis_h / 2), _AXIS_SIZE),
        ]

    def _cell_texts(self, cells: list[list[Box]], colours: list[list[RGB]]) -> list[Text]:
        texts = []
        for row, boxes, fills in zip(self.values, cells, colours):
            for value, box, fill in zip(row, boxes, fills):
                if not math.isnan(value):
                    centre = ((box.left + box.right) / 2, (box.top + box.bottom) / 2)
                    texts.append(Text(f"{value:.{self.decimals}f}", "cell", centre, self.cell_size, fill=text_colour(fill)))
        return texts

    def _colour_bar_texts(self, bar: Box, texts: list[Text]) -> float:
        """Add the colour bar's tick labels and title to ``texts``; return where they end on the right."""
        labels_x = bar.right + 6
        for tick in _BAR_TICKS:
            texts.append(Text(f"{tick:.2f}", "bar_label", (labels_x, _bar_row(bar, tick)), _TICK_SIZE, fill=_MUTED, align="left"))
        labels_w = max(text_size(f"{tick:.2f}", _TICK_SIZE)[0] for tick in _BAR_TICKS)
        title_x = labels_x + labels_w + _SPACE + self.axis_h / 2
        texts.append(Text(_BAR_AXIS, "bar_axis", (title_x, (bar.top + bar.bottom) / 2), _AXIS_SIZE, upward=True))
        return title_x + self.axis_h / 2

    def _legend(self, bar: Box, texts: list[Text]) -> Optional[Box]:
        """A grey sample and "not measured" under the colour bar, if a cell is not measured."""
        if not any(math.isnan(v) for row in self.values for v in row):
            return None
        y = self.below + self.tick_h / 2
        swatch = Box(bar.left, round(y - _SWATCH / 2), bar.left + _SWATCH, round(y + _SWATCH / 2))
        texts.append(Text(_LEGEND, "legend", (swatch.right + 5, y), _TICK_SIZE, fill=_MUTED, align="left"))
        return swatch


def _square(matrix: Any) -> list[list[float]]:
    rows = matrix.tolist() if hasattr(matrix, "tolist") else [list(row) for row in matrix]
    if not rows or not all(isinstance(row, list) and len(row) == len(rows) for row in rows):
        shape = getattr(matrix, "shape", None)
        raise ValueError(f"matrix must be square (tasks x tasks) with at least one task, got {tuple(shape) if shape is not None else rows!r}")
    return [[float(v) for v in row] for row in rows]


def _checked_task_ids(task_ids: Optional[Sequence[int]], num_tasks: int) -> list[int]:
    if task_ids is None:
        return list(range(num_tasks))
    ids = list(task_ids)
    if len(ids) != num_tasks or len(set(ids)) != num_tasks or not all(isinstance(t, Integral) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"task_ids must name each of the {num_tasks} tasks once, as distinct ints, got {ids!r}")
    return [int(t) for t in ids]
