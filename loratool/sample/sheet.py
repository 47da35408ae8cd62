"""Pictures of a sweep: a labelled contact sheet (columns = scales, rows = seeds) and a back-and-forth animation."""

from __future__ import annotations

from pathlib import Path

from loratool.files import atomic_path

THUMB = 256  # sheet cells are at most this wide: a 5×3 sheet of 1024² images would be 75 MB
GAP = 4


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font


def _thumb(image, width: int):
    if image.width <= width:
        return image.convert("RGB")
    return image.convert("RGB").resize((width, round(image.height * width / image.width)))


def contact_sheet(grid: list[list], column_labels: list[str], row_labels: list[str], title: str = ""):
    """`grid[row][column]` PIL images → one labelled image."""
    from PIL import Image, ImageDraw

    cells = [[_thumb(im, THUMB) for im in row] for row in grid]
    cw, ch = cells[0][0].size
    size = max(14, cw // 8)
    font = _font(size)
    left = max(_font(size).getlength(r) for r in row_labels) + 2 * GAP
    top = (size + 2 * GAP) * (2 if title else 1)
    sheet = Image.new("RGB", (int(left) + len(cells[0]) * (cw + GAP), top + len(cells) * (ch + GAP)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((GAP, GAP), title, fill="black", font=font)
    for c, label in enumerate(column_labels):
        x = int(left) + c * (cw + GAP) + cw // 2
        draw.text((x, top - GAP), label, fill="black", font=font, anchor="md")
    for r, row in enumerate(cells):
        y = top + r * (ch + GAP)
        draw.text((GAP, y + ch // 2), row_labels[r], fill="black", font=font, anchor="lm")
        for c, cell in enumerate(row):
            sheet.paste(cell, (int(left) + c * (cw + GAP), y))
    return sheet


def back_and_forth(frames: list) -> list:
    """0 1 2 3 4 → 0 1 2 3 4 3 2 1, so a looping animation sweeps out and back without a jump."""
    return frames + frames[-2:0:-1]


def save_animation(frames: list, path: Path, force: bool, ms_per_frame: int = 400) -> None:
    """Animated GIF (palette per frame), looping forever."""
    frames = [f.convert("RGB") for f in back_and_forth(frames)]
    with atomic_path(path, force=force) as tmp:
        frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0, disposal=1
        )


def save_sheet(sheet, path: Path, force: bool) -> None:
    with atomic_path(path, force=force) as tmp:
        sheet.save(tmp, format="PNG")
