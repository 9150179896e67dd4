"""Sample grids for the reference DiT's 32×32 images: one implementation shared by the CLI (`dtq sample`),
the training script, the quality report and `make demo`."""
from __future__ import annotations

from pathlib import Path

import torch

GAP = 2  # white pixels between images


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def grid_image(images: torch.Tensor, cols: int = 10, zoom: int = 3):
    """Images [N, C, H, W] in [-1, 1] as one PIL image, `cols` per row (one column per class when the
    labels are i mod 10), GAP white pixels around each, enlarged `zoom`× with nearest-neighbour."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    x = _to_uint8(images)
    canvas = torch.full((c, rows * (h + GAP) + GAP, cols * (w + GAP) + GAP), 255, dtype=torch.uint8)
    for i in range(n):
        y0, x0 = GAP + (i // cols) * (h + GAP), GAP + (i % cols) * (w + GAP)
        canvas[:, y0:y0 + h, x0:x0 + w] = x[i]
    arr = canvas[0].numpy() if c == 1 else canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    return img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)


def save_grid(images: torch.Tensor, path: str | Path, cols: int = 10, zoom: int = 3) -> None:
    grid_image(images, cols, zoom).save(path)


def comparison_grid(images: dict[str, torch.Tensor], labels: torch.Tensor, class_names: tuple[str, ...],
                    per_class: int = 1, zoom: int = 3):
    """One labelled PIL image comparing models side by side: a row of `per_class` samples per class for
    each model (model name on the left), class names on top. Every model's images must come from the same
    noise and labels, so a column shows the same starting point through each model."""
    from PIL import Image, ImageDraw

    picks = []
    for k in range(len(class_names)):
        idx = (labels == k).nonzero().flatten()[:per_class].tolist()
        picks += idx + [None] * (per_class - len(idx))
    first = next(iter(images.values()))
    blank = torch.ones_like(first[0])  # white where a class has too few samples
    strips = {name: grid_image(torch.stack([x[i] if i is not None else blank for i in picks]),
                               cols=len(picks), zoom=zoom) for name, x in images.items()}
    strip_w, strip_h = next(iter(strips.values())).size
    draw_probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_w = 8 + max(int(draw_probe.textlength(name)) for name in strips)
    head_h = 18
    canvas = Image.new("L", (label_w + strip_w, head_h + len(strips) * strip_h), 255)
    draw = ImageDraw.Draw(canvas)
    cell = strip_w / len(picks)
    for k, cname in enumerate(class_names):
        short = cname.split("/")[0][:9]
        x_mid = label_w + (k * per_class + per_class / 2) * cell
        draw.text((x_mid - draw.textlength(short) / 2, 3), short, fill=0)
    for r, (name, strip) in enumerate(strips.items()):
        y = head_h + r * strip_h
        canvas.paste(strip, (label_w, y))
        draw.text((4, y + strip_h / 2 - 6), name, fill=0)
    return canvas
