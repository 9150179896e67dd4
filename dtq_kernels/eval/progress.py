"""The progress file of a quality run (`dtq eval --out-dir DIR` writes DIR/quality.progress.pt): every model's
result and every noise-floor row, saved the moment it is complete, so that an interrupted run, started
again with the same command, samples only what is missing. On a 2-core CPU the whole table at
N = 1000 takes hours; this is what lets it span sessions.

A result is reused only by a run with the same key: the evaluation settings and the FP weights' digest
(the recipes' code is not in the key: delete the file after changing a recipe). The file is written
atomically and loaded with torch.load(weights_only=True) (plain containers and tensors, no code). To keep
it small, only the reference model keeps all its images (PSNR/SSIM of the models still to come are
measured against them); every other model keeps the images its report grid shows.
"""
from __future__ import annotations

import os
import time

import torch

from ..fileio import replaced_atomically
from .harness import ModelResult
from .report import GRID_ROWS

GRID_IMAGES = GRID_ROWS * 10


class RunProgress:
    def __init__(self, path: str, key: dict, reference: str, log=print):
        self.path, self.key, self.reference = path, key, reference
        self.results: dict[str, ModelResult] = {}
        self.descriptions: dict[str, str] = {}
        self.noise: dict[int, dict] = {}
        self.started, self.earlier_s = time.time(), 0.0  # wall time of the sessions before this one
        if not os.path.isfile(path):
            return
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            saved_key = saved["key"]
        except Exception as e:
            raise RuntimeError(f"{path} is not a readable progress file of a quality run ({e}); "
                               "delete it to start the run afresh") from None
        if saved_key != key:
            changed = sorted(k for k in set(key) | set(saved_key) if key.get(k) != saved_key.get(k))
            log(f"{path} belongs to a run with other settings ({', '.join(changed)}): starting afresh, "
                "it is replaced at the first result")
            return
        self.results = {name: ModelResult(**r) for name, r in saved["results"].items()}
        self.descriptions = saved["descriptions"]
        self.noise = {int(k): row for k, row in saved["noise"].items()}
        self.earlier_s = float(saved.get("wall_s", 0.0))
        log(f"{path}: resuming with {len(self.results)} model(s) and {len(self.noise)} noise-floor row(s) done")

    def add_result(self, name: str, result: ModelResult, description: str) -> None:
        images = result.images if name == self.reference else result.images[:GRID_IMAGES]
        self.results[name] = ModelResult(result.row, images.clone(), result.sqnr, result.kept_fp)
        self.descriptions[name] = description
        self._save()

    def add_noise(self, k: int, row: dict) -> None:
        self.noise[k] = row
        self._save()

    def wall_s(self) -> float:
        """Seconds of work in this run so far, over every session that contributed (up to its last save)."""
        return self.earlier_s + time.time() - self.started

    def discard(self) -> None:
        """The report now holds everything: the progress file has served its purpose."""
        if os.path.isfile(self.path):
            os.remove(self.path)

    def _save(self) -> None:
        data = {"key": self.key, "descriptions": self.descriptions, "noise": self.noise, "wall_s": self.wall_s(),
                "results": {name: {"row": r.row, "images": r.images, "sqnr": r.sqnr, "kept_fp": r.kept_fp}
                            for name, r in self.results.items()}}
        with replaced_atomically(self.path) as tmp:
            torch.save(data, tmp)
