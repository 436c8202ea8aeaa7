"""The online kNN monitor of training, and the kNN classifier it shares with `barlow eval`.

Every few steps or minutes rank 0 embeds a small labelled set held out from training (not used to choose
anything) with the backbone as it is, and classifies each image by its k most cosine-similar other images (votes weighted exp(sim / T), k=20, T=0.07 as in the
lightly and solo-learn monitors). The accuracy goes into metrics.jsonl, the progress bar, the
Prometheus gauges and, at the end, plots/knn.png against training minutes, so a user sees whether more
training helps.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.labelled import iter_labelled
from pipeline.data.stream import CorruptCounter
from pipeline.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_K, DEFAULT_TEMPERATURE = 20, 0.07


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1 always, top5 when there are more than 5 classes; fractions 0-1."""
    ks = (1, 5) if scores.shape[1] > 5 else (1,)
    ranked = scores.topk(max(ks), dim=1).indices
    hits = ranked == labels.view(-1, 1)
    return {f"top{k}": float(hits[:, :k].any(dim=1).float().mean()) for k in ks}



@torch.no_grad()
def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, classes: int,
               k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, exclude_self: bool = False,
               chunk: int = 1024) -> torch.Tensor:
    """Class scores [Q, classes]: sum over the k most cosine-similar bank rows of exp(sim / T) per class.

    `exclude_self`: the queries are the bank (same order) and each row's own match is left out.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, len(bank) - int(exclude_self))
    if k < 1:
        raise UserError("the kNN needs at least 2 labelled training images")
    scores = []
    for start in range(0, len(queries), chunk):
        sim = queries[start:start + chunk] @ bank.T
        if exclude_self:
            rows = torch.arange(len(sim), device=sim.device)
            sim[rows, rows + start] = -math.inf
        top_sim, top_index = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), classes, device=sim.device)
        scores.append(votes.scatter_add_(1, bank_labels[top_index], weights))
    return torch.cat(scores)


class KnnMonitor:
    """kNN accuracy of the training backbone on a small labelled set, every `every` steps (rank 0).

    Leave-one-out over the one set: each image is classified by its k nearest other images, so a
    single held-out shard set is enough. Images are read and preprocessed once, at the start.
    """

    def __init__(self, src: str, image_size: int, mean, std, every: int = 0, limit: int = 2000, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE, batch_size: int = 256, every_minutes: float = 0.0):
        if every < 0 or every_minutes < 0 or not (every or every_minutes):
            raise UserError(f"--monitor-every must be at least 1 step or --monitor-minutes above 0 "
                            f"(got {every}, {every_minutes})")
        pairs = list(iter_labelled(src, image_size, CorruptCounter(), limit))
        if len(pairs) < 2:
            raise UserError(f"--monitor-data {src} has {len(pairs)} labelled images; the kNN monitor needs at least 2")
        self.images = torch.from_numpy(np.stack([image for image, _ in pairs]))
        self.labels = torch.tensor([label for _, label in pairs])
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.every, self.every_s, self.k, self.temperature, self.batch_size = every, every_minutes * 60, k, temperature, batch_size
        self.last: float | None = None
        # The same leave-one-out kNN on the raw pixels: the line the curve has to cross to beat them.
        pixels = self.images.float().flatten(1) / 255
        self.raw_pixels_top1 = topk_accuracy(knn_scores(pixels, self.labels, pixels, int(self.labels.max()) + 1, k,
                                                        temperature, exclude_self=True), self.labels)["top1"]
        self.next_step = every
        self.next_time: float | None = None  # minutes mode: the first logged step runs it (the curve's start)
        how = f"every {every_minutes:g} minutes" if every_minutes else f"every {every} steps"
        log.info("kNN monitor: %d labelled images from %s %s (raw pixels: %.3f)", len(pairs), src, how,
                 self.raw_pixels_top1)

    def due(self, step: int, total_steps: int) -> bool:
        """True at the end, and at the first step asked about once `every` steps (or `every_minutes`)
        passed since the last run; in minutes mode also at the first step asked about."""
        if self.every_s:
            now = time.monotonic()
            if self.next_time is None or now >= self.next_time or step == total_steps:
                self.next_time = now + self.every_s
                return True
            return False
        if step >= self.next_step or step == total_steps:
            self.next_step = step + self.every
            return True
        return False

    @torch.no_grad()
    def __call__(self, backbone: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """{"knn_top1": ...} for the backbone as it is now; its train/eval mode is restored."""
        was_training = backbone.training
        backbone.eval()
        mean, std = self.mean.to(device), self.std.to(device)
        chunks = []
        for start in range(0, len(self.images), self.batch_size):
            images = self.images[start:start + self.batch_size].to(device)
            chunks.append(backbone((images.float() / 255 - mean) / std).float())
        backbone.train(was_training)
        features, labels = torch.cat(chunks), self.labels.to(device)
        scores = knn_scores(features, labels, features, int(labels.max()) + 1, self.k, self.temperature,
                            exclude_self=True)
        self.last = topk_accuracy(scores, labels)["top1"]
        return {"knn_top1": self.last}

    def postfix(self) -> dict[str, str]:
        return {} if self.last is None else {"knn": f"{self.last:.3f}"}

    def attach(self, gauges: Any) -> None:
        """Add a `barlow_train_knn_top1` gauge to the run's Prometheus gauges (updated from each record)."""
        from prometheus_client import Gauge

        gauges.gauges["knn_top1"] = Gauge("barlow_train_knn_top1", "kNN top-1 accuracy on the monitor set",
                                          registry=gauges.registry)
