"""Scene sampling and rendering of the demo visual-QA images (PIL, deterministic).

An image is a square grid of ``grid x grid`` cells of ``cell`` pixels (28 px = one merged
Qwen2-VL vision token: 14-px patches, 2x2 merge). A cell holds at most one thing: a coloured
shape (circle, square, triangle, diamond; small or large) or one character of a short rendered
code (black text in consecutive cells of one row). The background is a plain light tint.

Everything is a pure function of a :class:`random.Random` instance, so the same seed gives the
same scenes and the same pixels (for a fixed Pillow version and its embedded default font).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
# Code alphabet: upper-case letters and digits without the easily confused I, O, Q, 0, 1.
CODE_ALPHABET: str = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (250, 250, 250),
    (245, 243, 236),
    (236, 242, 246),
    (244, 238, 244),
)
TEXT_COLOR = (15, 15, 15)


@dataclass(frozen=True)
class Obj:
    """One shape in one grid cell."""

    row: int
    col: int
    shape: str
    color: str
    size: str

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Everything drawn in an image (the ground truth every question is derived from)."""

    grid: int
    background: int
    objects: tuple[Obj, ...]
    code: str
    code_row: int
    code_col: int
    jitter: tuple[tuple[int, int], ...] = field(default=())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        d["jitter"] = [list(j) for j in self.jitter]
        return d

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(
            grid=d["grid"],
            background=d["background"],
            objects=tuple(Obj(**o) for o in d["objects"]),
            code=d["code"],
            code_row=d["code_row"],
            code_col=d["code_col"],
            jitter=tuple(tuple(j) for j in d["jitter"]),
        )

    def cell_labels(self) -> list[dict[str, int]]:
        """Per-cell class indices (row-major) for auxiliary training targets.

        ``color``/``shape``/``size``: 0 = none, else 1 + index; ``char``: 0 = none, else 1 + index
        in :data:`CODE_ALPHABET`.
        """
        cells = [{"color": 0, "shape": 0, "size": 0, "char": 0} for _ in range(self.grid * self.grid)]
        for o in self.objects:
            c = cells[o.row * self.grid + o.col]
            c["color"] = 1 + list(COLORS).index(o.color)
            c["shape"] = 1 + SHAPES.index(o.shape)
            c["size"] = 1 + SIZES.index(o.size)
        for i, ch in enumerate(self.code):
            cells[self.code_row * self.grid + self.code_col + i]["char"] = 1 + CODE_ALPHABET.index(ch)
        return cells


def sample_scene(rng: random.Random, grid: int, min_objects: int, max_objects: int,
                 min_code: int, max_code: int, jitter: int) -> Scene:
    """Draw a random scene: 1 code row plus ``min_objects..max_objects`` distinct shapes.

    A (colour, shape) pair occurs at most once, so "the red circle" always names one object.
    """
    code_len = rng.randint(min_code, max_code)
    code = "".join(rng.choice(CODE_ALPHABET) for _ in range(code_len))
    code_row = rng.randrange(grid)
    code_col = rng.randrange(grid - code_len + 1)
    used = {(code_row, code_col + i) for i in range(code_len)}
    free = [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in used]
    n = rng.randint(min_objects, max_objects)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    cells = rng.sample(free, n)
    objects = tuple(
        Obj(row=r, col=c, shape=s, color=col, size=rng.choice(SIZES)) for (r, c), (col, s) in zip(cells, kinds)
    )
    jit = tuple((rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)) for _ in objects)
    return Scene(grid=grid, background=rng.randrange(len(BACKGROUNDS)), objects=objects, code=code,
                 code_row=code_row, code_col=code_col, jitter=jit)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(shape)


def render(scene: Scene, cell: int) -> Image.Image:
    """Render ``scene`` as an RGB image of ``grid * cell`` pixels square."""
    side = scene.grid * cell
    img = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    radius = {"small": cell * 0.24, "large": cell * 0.42}
    for o, (dx, dy) in zip(scene.objects, scene.jitter or [(0, 0)] * len(scene.objects)):
        r = radius[o.size]
        slack = max(0.0, cell / 2 - r - 1)
        cx = o.col * cell + cell / 2 + max(-slack, min(slack, dx))
        cy = o.row * cell + cell / 2 + max(-slack, min(slack, dy))
        _draw_shape(draw, o.shape, cx, cy, r, COLORS[o.color])
    font = _font(int(cell * 0.8))
    for i, ch in enumerate(scene.code):
        cx = (scene.code_col + i) * cell + cell / 2
        cy = scene.code_row * cell + cell / 2
        draw.text((cx, cy), ch, fill=TEXT_COLOR, font=font, anchor="mm")
    return img
