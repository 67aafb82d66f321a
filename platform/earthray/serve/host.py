"""The model host: loads models on demand (multiplexed) and predicts batches of one model's requests.

``@serve.multiplexed`` keeps at most ``max_models_per_replica`` models per replica (LRU; the router sends
a model's requests to replicas that hold it), and one ``@serve.batch`` method batches requests
dynamically. Serve splits every batch by multiplexed model id, so a batch only ever holds one model's
requests; the batched method reads that id with ``serve.get_multiplexed_model_id()``. Callers address a
model as ``handle.options(multiplexed_model_id="NAME|SOURCE")``, SOURCE being the bundle the gateway
checked requests against (a registry alias pinned to its version).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray import serve

from earthray import compat
from earthray.errors import NotFound
from earthray.serve.config import parse_args
from earthray.serve.predictor import Predictor


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
class ModelServer:
    def __init__(self, args: dict[str, Any]):
        self.args = parse_args(args)

        async def load(model_id: str) -> Predictor:
            name, _, source = model_id.partition("|")
            if name not in self.args.models:
                raise NotFound(f"model {name!r} is not configured here")
            return await asyncio.to_thread(Predictor.load, name, source, self.args.tracking_uri,
                                           self.args.device, max_tiles=self.args.max_batch_size,
                                           overlap=self.args.overlap)

        self._load = load
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.args.max_models_per_replica)(load)
        self.batches = self.requests = 0
        self._batched.set_max_batch_size(self.args.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    async def loaded_models(self) -> list[str]:
        """Models (``NAME|SOURCE``) this replica holds now, least recently used first."""
        return compat.multiplexed_models(self._load)

    async def batch_stats(self) -> dict[str, int]:
        """Batches run and requests in them since the replica started (mean batch size = requests / batches)."""
        import torch

        return {"batches": self.batches, "requests": self.requests, "torch_threads": torch.get_num_threads()}

    async def predict(self, image: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self._batched(image)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, images: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        predictor = await self.get_model(serve.get_multiplexed_model_id())
        self.batches, self.requests = self.batches + 1, self.requests + len(images)
        return await asyncio.to_thread(predictor.predict_answers, images)
