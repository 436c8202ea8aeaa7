"""Collapse diagnostics, metrics.jsonl, plots and Prometheus gauges for a training run.

RankMe (Garrido et al. 2023) of backbone embeddings and the per-dimension std of L2-normalised
projector outputs are the two cheap signals that a self-supervised run is not collapsing; the
cross-correlation matrix turning into the identity is the Barlow Twins-specific one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.files import write_text


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(entropy of the normalised singular values) of an N x D embedding matrix: 1 <= RankMe <= min(N, D)."""
    singular_values = torch.linalg.svdvals(embeddings.float())
    p = singular_values / singular_values.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def normalized_std(projections: torch.Tensor) -> float:
    """Mean over dimensions of the batch std of L2-normalised outputs: ~1/sqrt(D) healthy, 0 at collapse."""
    return float(F.normalize(projections.float(), dim=1).std(dim=0).mean())


class MetricsLog:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl; drops lines past a resume point."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():  # a killed run may have logged steps after its last checkpoint: they are redone
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            write_text(path, "".join(line + "\n" for line in kept))  # a kill mid-rewrite keeps the old file

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # an unreadable (torn) line is dropped


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "loss" in r]
    figure, (loss_axis, diag_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot(steps, [r["loss"] for r in records if "loss" in r])
    loss_axis.set(xlabel="step", ylabel="loss", title="Barlow Twins loss", yscale="log")
    diag_axis.plot(steps, [r["on_diag"] for r in records if "loss" in r], label="mean diagonal of C (target 1)")
    diag_axis.plot(steps, [r["off_diag"] for r in records if "loss" in r], label="RMS off-diagonal (target 0)")
    diag_axis.set(xlabel="step", title="cross-correlation")
    diag_axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def knn_curve(records: list[dict[str, Any]], batch_size: int) -> list[list[float]]:
    """[[training minutes, kNN top-1], ...] from metrics.jsonl records: the minutes are summed from each
    record's steps and images/s, so they survive a resume and count only time spent training."""
    curve, seconds, last_step = [], 0.0, None
    for record in records:
        if "images_per_s" not in record:
            continue
        if last_step is not None and record["step"] > last_step and record["images_per_s"] > 0:
            seconds += (record["step"] - last_step) * batch_size / record["images_per_s"]
        last_step = record["step"]
        if "knn_top1" in record:
            curve.append([round(seconds / 60, 2), round(record["knn_top1"], 4)])
    return curve


def plot_knn(records: list[dict[str, Any]], batch_size: int, path: Path, raw_pixels: float | None = None) -> None:
    """plots/knn.png: the kNN monitor's accuracy against training minutes, and the raw pixels' on the same set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = knn_curve(records, batch_size)
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    axis.plot([m for m, _ in curve], [100 * k for _, k in curve], marker="o", label="encoder")
    if raw_pixels is not None:
        axis.axhline(100 * raw_pixels, color="gray", linestyle="--", label="raw pixels")
        axis.legend(fontsize=8)
    axis.set(xlabel="training minutes", ylabel="kNN top-1 (%)", title="kNN monitor (held-out set)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_crosscorr(first: torch.Tensor, last: torch.Tensor, first_step: int, last_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for axis, matrix, step in ((axes[0], first, first_step), (axes[1], last, last_step)):
        image = axis.imshow(matrix.float().numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        axis.set_title(f"step {step}")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("cross-correlation C, first 64 dims (should become the identity)")
    figure.colorbar(image, ax=axes, shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


class PrometheusGauges:
    """The training figures as prometheus-client gauges, served on --metrics-port for cluster scraping."""

    def __init__(self, port: int):
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        names = {
            "step": "optimizer steps done",
            "loss": "Barlow Twins loss at the last logged step",
            "on_diag": "mean diagonal of the cross-correlation matrix",
            "off_diag": "RMS off-diagonal of the cross-correlation matrix",
            "lr": "learning rate of the weights",
            "images_per_second": "image pairs per second over the last logging interval",
            "rankme": "RankMe of backbone embeddings",
            "embedding_std": "per-dimension std of L2-normalised projector outputs",
            "corrupt_samples": "corrupt samples skipped by this process so far",
        }
        self.gauges = {k: Gauge(f"barlow_train_{k}", doc, registry=self.registry) for k, doc in names.items()}
        self.server, self.thread = start_http_server(port, registry=self.registry)

    def update(self, record: dict[str, Any]) -> None:
        key_map = {"images_per_s": "images_per_second", "std": "embedding_std", "corrupt": "corrupt_samples"}
        for key, value in record.items():
            name = key_map.get(key, key)
            if name in self.gauges and isinstance(value, (int, float)):
                self.gauges[name].set(value)

    def close(self) -> None:
        self.server.shutdown()
