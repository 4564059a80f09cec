"""Drawing the demo's photos: one shape, in one colour, on one of five painted scenes."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# The visible vocabulary: every photo shows exactly one shape, in one colour, on one scene.
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "stripes")
SCENES = ("night", "beach", "forest", "snow", "desert")

# Fill colour of each shape before per-photo jitter; chosen to stay apart from every scene.
COLOUR_RGB = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (255, 225, 0),
    "green": (40, 190, 60),
    "blue": (30, 80, 240),
    "purple": (140, 50, 200),
    "pink": (255, 120, 190),
    "white": (250, 250, 250),
}
# The flat colours a scene is painted with (before texture noise), main colour first.
SCENE_RGB = {
    "night": ((16, 22, 58), (28, 34, 84), (205, 205, 185)),
    "beach": ((222, 198, 150), (30, 120, 150), (150, 200, 235)),
    "forest": ((22, 64, 34), (82, 58, 36), (14, 44, 24)),
    "snow": ((205, 212, 224), (176, 190, 210), (132, 146, 172)),
    "desert": ((206, 150, 92), (240, 214, 168), (184, 128, 76)),
}
JPEG_QUALITY = 90


def fill_rgb(photos: dict) -> np.ndarray:
    base = np.array([COLOUR_RGB[c] for c in COLOURS])[photos["colour"]]
    return np.clip(base + photos["colour_jitter"], 0, 255).astype(np.int64)


def _vertical_gradient(size: int, top: tuple, bottom: tuple) -> np.ndarray:
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    column = (1 - t) * np.array(top, float) + t * np.array(bottom, float)
    return np.broadcast_to(column, (size, size, 3)).copy()


def _draw_scene(scene: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Paint one of the five backgrounds with random layout details."""
    palette = SCENE_RGB[scene]
    if scene == "night":
        canvas = Image.fromarray(
            _vertical_gradient(size, palette[0], palette[1]).astype(np.uint8), "RGB"
        )
        draw = ImageDraw.Draw(canvas)
        for x, y in rng.integers(0, size, size=(int(rng.integers(12, 30)), 2)):
            radius = size / 128 * rng.uniform(0.6, 1.4)
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=palette[2])
        return canvas
    if scene == "beach":
        canvas = Image.new("RGB", (size, size), palette[2])
        draw = ImageDraw.Draw(canvas)
        horizon = size * rng.uniform(0.28, 0.42)
        shore = size * rng.uniform(0.58, 0.72)
        tilt = size * rng.uniform(-0.06, 0.06)
        draw.rectangle((0, horizon, size, size), fill=palette[1])
        draw.polygon([(0, shore - tilt), (size, shore + tilt), (size, size), (0, size)], palette[0])
        return canvas
    if scene == "forest":
        canvas = Image.new("RGB", (size, size), palette[0])
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(4, 8))):
            x = rng.uniform(0, size)
            half = size * rng.uniform(0.015, 0.035)
            draw.rectangle((x - half, size * rng.uniform(0.2, 0.5), x + half, size), palette[1])
        for _ in range(int(rng.integers(3, 6))):
            x, y = rng.uniform(0, size), rng.uniform(0, size * 0.3)
            r = size * rng.uniform(0.1, 0.2)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=palette[2])
        return canvas
    if scene == "snow":
        canvas = Image.new("RGB", (size, size), palette[1])
        draw = ImageDraw.Draw(canvas)
        horizon = size * rng.uniform(0.38, 0.5)
        # distant mountains: alternating peaks and valleys above the snowfield
        xs = np.linspace(0, size, 8) + rng.uniform(-0.04, 0.04, 8) * size
        rise = np.where(np.arange(8) % 2 == 1, rng.uniform(0.12, 0.24, 8), rng.uniform(0, 0.05, 8))
        peaks = list(zip(xs, horizon - rise * size)) + [(size, size), (0, size)]
        draw.polygon(peaks, fill=palette[2])
        draw.rectangle((0, horizon, size, size), fill=palette[0])
        return canvas
    # desert: pale sky, two sine-shaped dunes
    canvas = Image.new("RGB", (size, size), palette[1])
    draw = ImageDraw.Draw(canvas)
    xs = np.linspace(0, size, 17)
    for level, shade in ((0.45, palette[2]), (0.65, palette[0])):
        phase, amplitude = rng.uniform(0, 2 * np.pi), size * rng.uniform(0.03, 0.08)
        ys = size * (level + rng.uniform(-0.05, 0.05)) + amplitude * np.sin(
            xs / size * 2 * np.pi + phase
        )
        draw.polygon(list(zip(xs, ys)) + [(size, size), (0, size)], fill=shade)
    return canvas


def _rotated(points: np.ndarray, degrees: float, cx: float, cy: float) -> list[tuple]:
    theta = np.deg2rad(degrees)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = points @ rotation.T + np.array([cx, cy])
    return [tuple(p) for p in moved]


def _rectangle(half_w: float, half_h: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
    return np.array(corners) + (dx, dy)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, jitter: float):
    """Draw the shape as an 'L' mask; ``jitter`` in [-1, 1] sets the rotation."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        inner = 0.55 * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        draw.polygon(_rotated(_rectangle(0.85 * r, 0.85 * r), 20 * jitter, cx, cy), fill=255)
    elif shape == "diamond":
        points = np.array([(0, -1.05 * r), (0.62 * r, 0), (0, 1.05 * r), (-0.62 * r, 0)])
        draw.polygon(_rotated(points, 15 * jitter, cx, cy), fill=255)
    elif shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        points = 1.1 * r * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        draw.polygon(_rotated(points, 30 * jitter, cx, cy), fill=255)
    elif shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.1 * r, 0.42 * 1.1 * r)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        draw.polygon(_rotated(points, 36 * jitter, cx, cy), fill=255)
    elif shape == "cross":
        for points in (_rectangle(1.05 * r, 0.3 * r), _rectangle(0.3 * r, 1.05 * r)):
            draw.polygon(_rotated(points, 20 * jitter, cx, cy), fill=255)
    elif shape == "stripes":
        bar = 0.95 * r / 5
        for dy in (-4 * bar, 0.0, 4 * bar):
            points = _rectangle(0.95 * r, bar, 0.0, dy)
            draw.polygon(_rotated(points, 90 * jitter, cx, cy), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def dilated(mask: Image.Image, size: int) -> Image.Image:
    """``mask.filter(ImageFilter.MaxFilter(size))``, pixel for pixel, in a tenth of its time.

    PIL's rank filter sorts every window; a square window's maximum is the maximum over its
    rows of the maximum over its columns, so two passes of ``size`` shifted slices give it.
    The edges are padded with their own pixels, as the rank filter's ``expand`` does.
    """
    half = size // 2
    pixels = np.pad(np.asarray(mask), half, mode="edge")
    height, width = pixels.shape[0] - 2 * half, pixels.shape[1] - 2 * half
    rows = pixels[:, :width].copy()
    for dx in range(1, size):
        np.maximum(rows, pixels[:, dx : dx + width], out=rows)
    out = rows[:height].copy()
    for dy in range(1, size):
        np.maximum(out, rows[dy : dy + height], out=out)
    return Image.fromarray(out, mask.mode)


def draw_image(photos: dict, i: int, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw photo ``i`` at twice the size, then downsample for smooth edges, then add noise."""
    size = 2 * image_size
    canvas = _draw_scene(SCENES[photos["scene"][i]], size, rng)
    mask = _shape_mask(
        SHAPES[photos["shape"][i]],
        size,
        photos["centre_x"][i] * size,
        photos["centre_y"][i] * size,
        photos["radius"][i] * size,
        photos["angle"][i],
    )
    base = np.array(COLOUR_RGB[COLOURS[photos["colour"][i]]]) + photos["colour_jitter"][i]
    fill = tuple(int(v) for v in np.clip(base, 0, 255))
    outline = tuple(int(v * 0.45) for v in fill)
    # A thin dark outline keeps light shapes readable on light scenes (white on snow).
    canvas.paste(outline, (0, 0), dilated(mask, 5))
    canvas.paste(fill, (0, 0), mask)
    canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels = pixels * rng.uniform(0.92, 1.04) + rng.normal(0.0, 5.0, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
