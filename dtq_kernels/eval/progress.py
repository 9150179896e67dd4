"""The progress file of a quality run (`dtq eval --out-dir DIR` writes DIR/quality.progress.pt): every model's
result and every noise-floor row, saved the moment it is complete, so that an interrupted run, started
again with the same command, samples only what is missing. On a 2-core CPU the whole table at
N = 1000 takes hours; this is what lets it span sessions, and shards (`--shard I/N`, one process per core)
share the work: each writes its own file, and the unsharded run takes them all.

A result is reused only by a run with the same key: the evaluation settings and the FP weights' digest
(the recipes' code is not in the key: delete the file after changing a recipe). The file is written
atomically and loaded with torch.load(weights_only=True) (plain containers and tensors, no code). To keep
it small, only the reference model keeps all its images (PSNR/SSIM of the models still to come are
measured against them); every other model keeps the images its report grid shows. A run that defers FID
(`--defer-fid`, for a machine without the Inception weights) also keeps every model's and noise-floor
seed's 8-bit samples (1 KB an image) until a run elsewhere has scored their FID.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import sys
import time

import torch

from ..fileio import replaced_atomically
from .harness import ModelResult
from .report import GRID_ROWS

GRID_IMAGES = GRID_ROWS * 10
SHARD_GLOB = "quality.progress.shard*of*.pt"


class RunProgress:
    """The progress of one quality run in `out_dir`: quality.progress.pt, or with shard=(I, N)
    quality.progress.shard<I>of<N>.pt. The unsharded run also takes every shard file's results (same key),
    and discard() removes them all once its report is written."""

    def __init__(self, out_dir: str, key: dict, reference: str, shard: tuple[int, int] | None = None, log=print):
        name = "quality.progress.pt" if shard is None else f"quality.progress.shard{shard[0]}of{shard[1]}.pt"
        self.path, self.key, self.reference, self.log = os.path.join(out_dir, name), key, reference, log
        self.results: dict[str, ModelResult] = {}
        self.descriptions: dict[str, str] = {}
        self.noise: dict[int, ModelResult] = {}  # the FP model sampled from seed + k (rows and kept samples)
        self.commands: list[str] = []  # the command lines that contributed, shards first
        self.started, self.earlier_s = time.time(), 0.0  # wall time of the sessions (and shards) before this
        self.merged: list[str] = []
        paths = [self.path] if shard is not None else sorted(glob.glob(os.path.join(out_dir, SHARD_GLOB))) + [self.path]
        for path in paths:
            if os.path.isfile(path) and self._take(path):
                self.merged.append(path)
        command = " ".join(["python"] + sys.argv)
        if command not in self.commands:
            self.commands.append(command)

    def _take(self, path: str) -> bool:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            saved_key = saved["key"]
        except Exception as e:
            raise RuntimeError(f"{path} is not a readable progress file of a quality run ({e}); "
                               "delete it to start the run afresh") from None
        if saved_key != self.key:
            changed = sorted(k for k in set(self.key) | set(saved_key) if self.key.get(k) != saved_key.get(k))
            self.log(f"{path} belongs to a run with other settings ({', '.join(changed)}): not used"
                     + (", replaced at the first result" if path == self.path else ""))
            return False
        for name, r in saved["results"].items():  # FP sits in every shard's file: keep a copy with its FID
            if name not in self.results or ("fid" in r["row"] and "fid" not in self.results[name].row):
                self.results[name] = ModelResult(**r)
        self.descriptions.update(saved["descriptions"])
        self.noise.update({int(k): ModelResult(**r) for k, r in saved["noise"].items()})
        self.earlier_s += float(saved["wall_s"])
        self.commands += [c for c in saved["commands"] if c not in self.commands]
        self.log(f"{path}: {len(saved['results'])} model(s) and {len(saved['noise'])} noise-floor row(s) done")
        return True

    def add_result(self, name: str, result: ModelResult, description: str) -> None:
        images = result.images if name == self.reference else result.images[:GRID_IMAGES]
        self.results[name] = ModelResult(result.row, images.clone(), result.sqnr, result.kept_fp, result.fid_images)
        self.descriptions[name] = description
        self._save()

    def add_noise(self, k: int, result: ModelResult) -> None:
        """The noise-floor row of seed + k (its images are not kept, only a deferred FID's 8-bit samples)."""
        self.noise[k] = ModelResult(result.row, torch.empty(0), fid_images=result.fid_images)
        self._save()

    def wall_s(self) -> float:
        """Seconds of work in this run so far, over every session and shard that contributed (up to its last
        save)."""
        return self.earlier_s + time.time() - self.started

    def discard(self) -> None:
        """The report now holds everything: the progress files have served their purpose."""
        for path in {self.path, *self.merged}:
            if os.path.isfile(path):
                os.remove(path)

    def _save(self) -> None:
        data = {"key": self.key, "descriptions": self.descriptions, "wall_s": self.wall_s(),
                "commands": self.commands,
                "noise": {k: dataclasses.asdict(r) for k, r in self.noise.items()},
                "results": {name: dataclasses.asdict(r) for name, r in self.results.items()}}
        with replaced_atomically(self.path) as tmp:
            torch.save(data, tmp)
        for path in [p for p in self.merged if p != self.path]:  # now held by this file: never counted twice
            if os.path.isfile(path):
                os.remove(path)
        self.merged = [self.path]
