"""A fine-tuned bundle as a predictor: tiled prediction, with the input contract of ``earthray.serve.inputs``.

Shared by the online app's model host and batch inference's model actors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from earthray.serve.inputs import NODATA_CLASS, SCENE, ModelInfo, blend_weight, pixel_valid, tile_starts

# ---------------------------------------------------------------------------------------------- prediction


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Predictor:
    """A loaded fine-tuned model with the contract it was checked against."""

    def __init__(self, model, info: ModelInfo, device: str = "cpu", max_tiles: int = 16, overlap: float = 0.25):
        self.model = model.to(device).eval()
        self.info = info
        self.device = device
        self.max_tiles = max_tiles
        self.overlap = overlap
        self._weight = blend_weight(info.input_size)

    @classmethod
    def load(cls, name: str, source: str | Path, tracking_uri: str | None = None, device: str = "auto",
             **kwargs) -> Predictor:
        """``source``: a bundle folder or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``."""
        from earthray.bundle import load_bundle
        from earthray.tasks import TaskModel

        bundle = load_bundle(source, tracking_uri=tracking_uri)
        info = ModelInfo.from_meta(name, str(source), bundle.meta)
        device = pick_device(device)
        return cls(TaskModel.from_bundle(bundle), info, device, **kwargs)

    @torch.inference_mode()
    def forward(self, batch: dict[str, np.ndarray], embed: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Prepared windows ``{sensor: (B, C, S, S), sensor.valid: (B, S, S)}`` -> answers in the task's units:
        class probabilities ``(B, K)`` / ``(B, K, S, S)`` or physical target values ``(B, T, S, S)``;
        with ``embed``, also each window's encoder embedding ``(B, D)`` (last level, mean-pooled)."""
        n = len(next(iter(batch.values())))
        tensors: dict[str, torch.Tensor] = {}
        for s in self.info.sensors:
            if s.name not in batch:  # absent from every window: left out of the fusion
                continue
            for key in (s.name, f"{s.name}.valid", f"{s.name}.present"):
                value = batch[key] if key in batch else np.ones(n, bool)
                tensors[key] = torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
        emb = None
        if embed:  # TaskModel.predict, keeping the features it computes on the way
            feats = self.model.features(tensors)
            emb = feats[-1].float().mean(dim=(2, 3)).cpu().numpy()
            size = next(t for k, t in tensors.items() if "." not in k).shape[-2:]
            out = self.model.head(feats) if self.info.task in SCENE else self.model.head(feats, size)
        else:
            out = self.model.predict(tensors)
        out = out.float()
        task = self.info.task
        if task == "multilabel":
            out = out.sigmoid()
        elif task in ("classification", "segmentation"):
            out = out.softmax(dim=1)
        else:
            out = self.model.denormalise(out)
        return out.cpu().numpy(), emb

    def predict(self, images: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Whole prepared images -> per image ``(K,)`` or ``(K, H, W)``, windows batched across the images.

        Images may carry different subsets of the model's sensors; in a batch, a sensor some windows lack is
        zeros there with its ``.present`` flag off.
        """
        s = self.info.input_size
        tiles: list[tuple[int, int, int]] = []
        shapes = []
        for i, img in enumerate(images):
            h, w = next(v for k, v in img.items() if k.endswith(".valid")).shape
            self.info.check_size(h, w)
            shapes.append((h, w))
            tiles += [(i, r, c) for r in tile_starts(h, s, self.overlap) for c in tile_starts(w, s, self.overlap)]
        single = [sum(1 for t in tiles if t[0] == i) == 1 for i in range(len(images))]
        results: list[np.ndarray | None] = [None] * len(images)
        weights: list[np.ndarray | None] = [None] * len(images)
        for lo in range(0, len(tiles), self.max_tiles):
            chunk = tiles[lo:lo + self.max_tiles]
            batch: dict[str, np.ndarray] = {}
            for sensor in self.info.sensors:
                carried = [sensor.name in images[i] for i, _, _ in chunk]
                if not any(carried):
                    continue
                blank, nowhere = np.zeros((len(sensor.bands), s, s), np.float32), np.zeros((s, s), bool)
                batch[sensor.name] = np.stack([images[i][sensor.name][:, r:r + s, c:c + s] if has else blank
                                               for (i, r, c), has in zip(chunk, carried)])
                batch[f"{sensor.name}.valid"] = np.stack(
                    [images[i][f"{sensor.name}.valid"][r:r + s, c:c + s] if has else nowhere
                     for (i, r, c), has in zip(chunk, carried)])
                batch[f"{sensor.name}.present"] = np.array(carried)
            out, _ = self.forward(batch)
            for (i, r, c), o in zip(chunk, out):
                if single[i]:
                    results[i] = o
                    continue
                if results[i] is None:
                    h, w = shapes[i]
                    results[i] = np.zeros((o.shape[0], h, w), np.float32)
                    weights[i] = np.zeros((h, w), np.float32)
                results[i][:, r:r + s, c:c + s] += o * self._weight
                weights[i][r:r + s, c:c + s] += self._weight
        return [res if weights[i] is None else res / weights[i] for i, res in enumerate(results)]

    def answer(self, out: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
        """A prediction in the compact form the app returns: scores (scene tasks), a ``uint8`` class map with
        255 where the input was invalid plus mean class scores (segmentation), or values with NaN there."""
        if self.info.task in SCENE:
            return {"scores": out}
        if self.info.task == "segmentation":
            labels = out.argmax(0).astype(np.uint8)
            labels[~valid] = NODATA_CLASS
            return {"labels": labels, "scores": out[:, valid].mean(axis=1)}
        values = out.astype(np.float32, copy=True)
        values[:, ~valid] = np.nan
        return {"values": values}

    def predict_answers(self, images: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        outs = self.predict(images)
        return [self.answer(o, pixel_valid(self.info, img)) for o, img in zip(outs, images)]
