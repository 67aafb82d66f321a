"""Probes on frozen features: a linear layer (AdamW, seeded from the spec), a weighted kNN (DINO)
and the majority-class baseline; each returns class scores on the eval split."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from earthray.evaluate.features import Features
from earthray.evaluate.spec import EvaluateSpec, KnnSpec, LinearSpec


def standardise(train_x: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """Every array standardised with the training features' per-dimension mean and std."""
    train = torch.as_tensor(train_x, dtype=torch.float32)
    mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-6)
    return [(torch.as_tensor(a, dtype=torch.float32) - mean) / std for a in (train_x, *others)]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, num_classes: int,
                 spec: LinearSpec = LinearSpec(), *, multilabel: bool = False, seed: int = 0) -> torch.Tensor:
    """Class probabilities (N_eval, K) of a linear layer fitted with AdamW; the same seed gives the same result."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        bound = 1 / train_x.shape[1] ** 0.5
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    target = train_y.float() if multilabel else train_y.long()
    n = len(train_x)
    with torch.enable_grad():
        for _ in range(spec.epochs):
            for idx in torch.randperm(n, generator=gen).split(spec.batch_size):
                loss = loss_fn(layer(train_x[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        logits = layer(eval_x)
    return torch.sigmoid(logits) if multilabel else logits.softmax(-1)


def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, num_classes: int,
                 spec: KnnSpec = KnnSpec(), *, multilabel: bool = False, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (DINO): cosine top-k neighbours vote exp(sim / T); returns vote shares (N_eval, K)."""
    train = F.normalize(train_x, dim=1)
    votes_of = train_y.float() if multilabel else F.one_hot(train_y.long(), num_classes).float()
    k = min(spec.k, len(train))
    out = []
    for block in F.normalize(eval_x, dim=1).split(chunk):
        sim, idx = (block @ train.T).topk(k, dim=1)
        w = ((sim - 1) / spec.temperature).exp()  # exp(sim / T), shifted: the shares are the same, never inf
        out.append((w.unsqueeze(-1) * votes_of[idx]).sum(1) / w.sum(1, keepdim=True))
    return torch.cat(out)


def majority_baseline(train_y: torch.Tensor, n_eval: int, num_classes: int, *, multilabel: bool = False
                      ) -> torch.Tensor:
    """Always the most frequent training class (multi-label: each class's training prevalence)."""
    if multilabel:
        return train_y.float().mean(0).expand(n_eval, -1).clone()
    probs = torch.zeros(n_eval, num_classes)
    probs[:, torch.bincount(train_y.long(), minlength=num_classes).argmax()] = 1.0
    return probs


def predict(features: Features, spec: EvaluateSpec) -> dict[str, torch.Tensor]:
    """Class scores on the eval split per method (and ``majority``), from standardised features."""
    train_x, eval_x = standardise(features.train_x, features.eval_x)
    train_y = torch.as_tensor(features.train_y)
    k, ml = len(features.classes), features.multilabel
    out = {}
    if "linear" in spec.methods:
        out["linear"] = linear_probe(train_x, train_y, eval_x, k, spec.linear, multilabel=ml, seed=spec.seed)
    if "knn" in spec.methods:
        out["knn"] = knn_classify(train_x, train_y, eval_x, k, spec.knn, multilabel=ml)
    out["majority"] = majority_baseline(train_y, len(eval_x), k, multilabel=ml)
    return out

