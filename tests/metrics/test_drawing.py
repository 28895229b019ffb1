"""The accuracy-matrix figure: colours from the scale, a colour bar, task ids on the axes, values in the cells."""

from __future__ import annotations

import math

import pytest
import torch

from neurenix.metrics.drawing import (
    UNMEASURED,
    accuracy_matrix_layout,
    colormap,
    contrast,
    draw_accuracy_matrix,
    text_colour,
    text_size,
)

NAN = float("nan")
# After task 0 and task 1 of three; task 2 not trained yet. 0 and 1 are the scale's ends.
R = [[0.95, 0.0, 1.0], [0.5, 0.333, 0.125], [NAN, NAN, NAN]]


def _pixel(image, x: int, y: int) -> tuple[int, int, int]:
    return image.getpixel((x, y))


def _distance(a, b) -> int:
    return sum((x - y) ** 2 for x, y in zip(a, b))


def test_each_cell_is_filled_with_the_colour_its_accuracy_has_on_the_scale():
    layout = accuracy_matrix_layout(R)
    image = draw_accuracy_matrix(R)
    assert image.size == layout.size
    for i, row in enumerate(R):
        for j, value in enumerate(row):
            box = layout.cells[i][j]
            expected = UNMEASURED if math.isnan(value) else colormap(value)
            assert layout.colours[i][j] == expected
            pixels = [_pixel(image, x, y) for x in range(box.left, box.right) for y in range(box.top, box.bottom)]
            # The corners hold the fill, and so does most of the cell (the rest is its number).
            corners = [(box.left, box.top), (box.right - 1, box.top), (box.left, box.bottom - 1), (box.right - 1, box.bottom - 1)]
            assert all(_pixel(image, x, y) == expected for x, y in corners)
            assert pixels.count(expected) > 0.8 * len(pixels)
    assert colormap(0.95) != colormap(1.0) != colormap(0.5)  # the cells tell values apart


def test_the_colour_bar_runs_from_the_colour_of_0_at_its_bottom_to_that_of_1_at_its_top():
    layout = accuracy_matrix_layout(R)
    image = draw_accuracy_matrix(R)
    bar = layout.colour_bar
    middle = (bar.left + bar.right) // 2
    assert _pixel(image, middle, bar.bottom - 1) == colormap(0.0) == (68, 1, 84)
    assert _pixel(image, middle, bar.top) == colormap(1.0) == (253, 231, 37)
    for y in range(bar.top, bar.bottom):  # every row in between is the value at its height
        value = (bar.bottom - 1 - y) / (bar.height - 1)
        assert _pixel(image, bar.left, y) == _pixel(image, bar.right - 1, y) == colormap(value)
    ticks = [item for item in layout.texts if item.role == "bar_label"]
    assert [t.text for t in ticks] == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    assert [t.xy[1] for t in ticks] == [bar.bottom - 1, *[round(bar.bottom - 1 - v * (bar.height - 1)) for v in (0.25, 0.5, 0.75)], bar.top]
    assert layout.texts_of("bar_axis") == ["accuracy"]


def test_the_scale_is_viridis_clamped_to_0_1_and_grows_lighter():
    assert colormap(0.05) == (70, 18, 100)  # half-way between its first two samples
    assert colormap(-0.5) == colormap(0.0) and colormap(1.5) == colormap(1.0)
    lightness = [contrast(colormap(v / 100), (0, 0, 0)) for v in range(101)]
    assert lightness == sorted(lightness)  # monotone: it reads in greyscale too
    assert UNMEASURED not in {colormap(v / 1000) for v in range(1001)}
    with pytest.raises(ValueError, match="nan"):
        colormap(NAN)


def test_the_numbers_are_written_in_black_or_white_whichever_reads_on_the_cell():
    for v in range(101):
        background = colormap(v / 100)
        assert contrast(text_colour(background), background) >= 4.5  # WCAG's level for text
    assert text_colour(colormap(0.0)) == (255, 255, 255) and text_colour(colormap(1.0)) == (0, 0, 0)

    layout = accuracy_matrix_layout(R)
    image = draw_accuracy_matrix(R)
    cells = [item for item in layout.texts if item.role == "cell"]
    assert [c.text for c in cells] == ["0.950", "0.000", "1.000", "0.500", "0.333", "0.125"]  # measured cells only
    for item, (i, j) in zip(cells, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]):
        box = layout.cells[i][j]
        assert item.fill == text_colour(layout.colours[i][j])
        assert item.xy == ((box.left + box.right) / 2, (box.top + box.bottom) / 2)
        drawn = [_pixel(image, x, y) for x in range(box.left, box.right) for y in range(box.top, box.bottom)]
        ink = [p for p in drawn if _distance(p, item.fill) < _distance(p, layout.colours[i][j])]
        assert len(ink) >= 40  # the number is there, in that colour (anti-aliased)
        assert text_size(item.text, item.size)[0] < box.width - 4


def test_the_axes_are_labelled_with_the_task_ids_in_order():
    default = accuracy_matrix_layout(R)
    assert default.texts_of("row_label") == default.texts_of("column_label") == ["0", "1", "2"]
    assert default.texts_of("row_axis") == ["after training task"]
    assert default.texts_of("column_axis") == ["evaluated on task"]
    assert default.texts_of("title") == ["Test accuracy after each task"]
    given = accuracy_matrix_layout([[0.9, NAN], [0.4, 0.8]], task_ids=[1, 2], title="Test accuracy after task 2")
    assert given.texts_of("row_label") == given.texts_of("column_label") == ["1", "2"]
    assert given.texts_of("title") == ["Test accuracy after task 2"]
    # Each label sits beside its own row (at the row's middle) or under its own column.
    rows = [item for item in given.texts if item.role == "row_label"]
    columns = [item for item in given.texts if item.role == "column_label"]
    for k, (row, column) in enumerate(zip(rows, columns)):
        cell = given.cells[k][k]
        assert row.xy[1] == pytest.approx((cell.top + cell.bottom) / 2) and row.xy[0] < cell.left
        assert column.xy[0] == pytest.approx((cell.left + cell.right) / 2) and column.xy[1] > given.cells[-1][k].bottom


def test_an_unmeasured_cell_is_grey_and_the_legend_says_so_only_when_there_is_one():
    layout = accuracy_matrix_layout(R)
    image = draw_accuracy_matrix(R)
    assert layout.texts_of("legend") == ["not measured"]
    swatch = layout.legend_swatch
    assert _pixel(image, swatch.left + 2, swatch.top + 2) == UNMEASURED
    complete = accuracy_matrix_layout([[0.9, 0.2], [0.4, 0.8]])
    assert complete.texts_of("legend") == [] and complete.legend_swatch is None


def test_the_figure_grows_with_the_tasks_and_stays_readable_up_to_20():
    sizes = []
    for n in range(2, 21):
        matrix = torch.full((n, n), 0.123)
        layout = accuracy_matrix_layout(matrix)
        sizes.append(layout.size)
        assert len(layout.texts_of("cell")) == n * n and set(layout.texts_of("cell")) == {"0.123"}
        assert layout.cells[0][0].width == layout.cells[-1][-1].width == 46  # 48-pixel cells, 2 between
    widths, heights = zip(*sizes)
    assert list(widths) == sorted(set(widths)) and list(heights) == sorted(set(heights))  # strictly
    assert sizes[0][0] > 120 and sizes[-1][0] < 1300
    assert draw_accuracy_matrix(torch.rand(20, 20)).size == sizes[-1]


def test_narrow_cells_show_two_decimals():
    assert accuracy_matrix_layout([[0.5]], cell=24).texts_of("cell") == ["0.50"]
    assert accuracy_matrix_layout([[0.5]]).texts_of("cell") == ["0.500"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(matrix=[[0.5, 0.5]]), r"matrix must be square .*\[\[0.5, 0.5\]\]"),
        (dict(matrix=torch.zeros(2, 3)), r"matrix must be square .*\(2, 3\)"),
        (dict(matrix=[[0.5]], task_ids=[1, 2]), r"task_ids must name each of the 1 tasks once.*\[1, 2\]"),
        (dict(matrix=[[0.5, 0.5], [0.5, 0.5]], task_ids=[1, 1]), r"task_ids .*\[1, 1\]"),
        (dict(matrix=[[0.5]], cell=8), "cell must be an int >= 16 .*got 8"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        accuracy_matrix_layout(**kwargs)
