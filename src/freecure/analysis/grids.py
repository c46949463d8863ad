"""Labelled image grids: a title band, column labels across, row labels down."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

LINE = 12  # pixels per text line (PIL's default bitmap font is about 11 px high)


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a grid goes, in pixels."""

    rows: int
    cols: int
    cell: int
    title_lines: int
    label_width: int
    gap: int = 4

    @property
    def header(self) -> int:
        return LINE * self.title_lines + 2 * LINE  # title, then a column-label band

    @property
    def size(self) -> tuple[int, int]:
        return (
            self.label_width + self.cols * (self.cell + self.gap),
            self.header + self.rows * (self.cell + self.gap),
        )

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of cell (row, col)."""
        left = self.label_width + col * (self.cell + self.gap)
        top = self.header + row * (self.cell + self.gap)
        return left, top, left + self.cell, top + self.cell


def labelled_grid(
    cells: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: Sequence[str] = (),
    cell: int = 128,
) -> Image.Image:
    """``cells[r][c]`` resized to ``cell``², with the labels and the title lines drawn on white."""
    rows, cols = len(cells), len(col_labels)
    if len(row_labels) != rows or any(len(row) != cols for row in cells):
        raise ValueError("labelled_grid: one row label per row and one column label per column")
    label_width = max([6 * len(label) + 8 for label in row_labels] + [40])
    layout = GridLayout(rows, cols, cell, len(title), label_width)
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title):
        draw.text((4, k * LINE), line, fill="black")
    for c, label in enumerate(col_labels):
        left, top, _, _ = layout.cell_box(0, c)
        draw.text((left + 2, top - 2 * LINE + 4), label, fill="black")
    for r, label in enumerate(row_labels):
        _, top, _, bottom = layout.cell_box(r, 0)
        draw.text((4, (top + bottom) // 2 - LINE // 2), label, fill="black")
        for c in range(cols):
            left, top, right, bottom = layout.cell_box(r, c)
            canvas.paste(cells[r][c].convert("RGB").resize((cell, cell)), (left, top))
    return canvas
