"""Collapse diagnostics and the Prometheus exporter of training figures."""

import socket
import urllib.request

import torch

from pipeline.train.diagnostics import MetricsLog, PrometheusGauges, knn_curve, normalized_std, plot_knn, rankme


def test_rankme_counts_effective_dimensions():
    assert abs(rankme(torch.eye(32)) - 32) < 1e-3
    rank_one = torch.randn(64, 1) @ torch.randn(1, 16)
    assert rankme(rank_one) < 1.01
    healthy = torch.randn(256, 16)
    assert 12 < rankme(healthy) <= 16


def test_normalized_std_is_zero_at_collapse_and_about_inverse_sqrt_d_when_healthy():
    assert normalized_std(torch.ones(128, 64)) < 1e-6
    assert abs(normalized_std(torch.randn(4096, 64)) - 64 ** -0.5) < 0.01


def test_metrics_log_drops_steps_after_the_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}}}\n' for s in range(1, 8)) + '{"step": 8, "lo')  # torn last line
    log = MetricsLog(path, resume_step=4)
    log.write({"step": 5, "loss": 1.0})
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5]


def test_prometheus_gauges_are_scrapable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gauges = PrometheusGauges(port)
    try:
        gauges.update({"step": 7, "loss": 123.5, "images_per_s": 42.0, "rankme": 9.5})
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        gauges.close()
    assert "barlow_train_loss 123.5" in text and "barlow_train_step 7.0" in text
    assert "barlow_train_images_per_second 42.0" in text and "barlow_train_rankme 9.5" in text


def test_prometheus_corrupt_samples_follow_the_logged_records():
    """barlow_train_corrupt_samples is the record's `corrupt` (it read 0 after `corrupt: 5` once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gauges = PrometheusGauges(port)
    scrape = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: E731
    try:
        gauges.update({"step": 10, "loss": 1.0, "corrupt": 0})
        assert "barlow_train_corrupt_samples 0.0" in scrape()
        gauges.update({"step": 20, "loss": 1.0, "corrupt": 5})
        text = scrape()
    finally:
        gauges.close()
    assert "barlow_train_corrupt_samples 5.0" in text, [l for l in text.splitlines() if "corrupt" in l]


def test_knn_curve_sums_training_minutes_from_steps_and_rates_across_a_resume(tmp_path):
    records = [{"step": 10, "images_per_s": 64.0, "knn_top1": 0.5},  # the first record starts the clock
               {"step": 20, "images_per_s": 64.0},  # 10 steps x 64 images / 64 per s = 10 s
               {"step": 30, "images_per_s": 32.0, "knn_top1": 0.6},  # + 20 s
               {"step": 20, "images_per_s": 64.0},  # a resume from step 20: not counted backwards
               {"step": 50, "images_per_s": 16.0, "knn_top1": 0.7}]  # + 120 s
    assert knn_curve(records, 64) == [[0.0, 0.5], [0.5, 0.6], [2.5, 0.7]]
    plot_knn(records, 64, tmp_path / "plots" / "knn.png", raw_pixels=0.65)
    assert (tmp_path / "plots" / "knn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
