"""curves.png's panels: what a run's history puts in them."""

from __future__ import annotations

from mtcore.artifacts import curve_panels, plot_curves

HISTORY = [
    {"epoch": 0, "split": "init", "seg.miou": 0.1},
    {"epoch": 1, "split": "train", "seg.loss": 1.0, "seg.weight": 1.0, "vae.loss": 2.0,
     "vae.weight": 1.0, "lr": 0.1},
    {"epoch": 1, "split": "val", "seg.loss": 1.1, "seg.miou": 0.5},
    {"epoch": 2, "split": "train", "seg.loss": 0.5, "seg.weight": 0.8, "vae.loss": 1.5,
     "vae.weight": 1.2, "lr": 0.1},
    {"epoch": 2, "split": "val", "seg.loss": 0.6, "seg.miou": 0.7},
]


def test_curve_panels_show_losses_weights_and_metrics(tmp_path):
    panels = dict(curve_panels(HISTORY))
    assert list(panels) == ["losses (solid: train, dashed: val)",
                            "task weights (train, epoch mean)", "seg.miou"]
    losses = {label: (xs, ys) for label, xs, ys, _ in panels["losses (solid: train, dashed: val)"]}
    assert losses["seg.loss"] == ([1, 2], [1.0, 0.5])
    assert losses["val seg.loss"] == ([1, 2], [1.1, 0.6])
    assert losses["val vae.loss"] == ([], [])  # no validation loss of the VAE in this history
    weights = {label: ys for label, _, ys, _ in panels["task weights (train, epoch mean)"]}
    assert weights == {"seg": [1.0, 0.8], "vae": [1.0, 1.2]}
    # the init row (the untrained model, epoch 0) starts a metric's curve
    assert panels["seg.miou"][0][1:3] == ([0, 1, 2], [0.1, 0.5, 0.7])
    assert plot_curves(HISTORY, tmp_path / "c.png").stat().st_size > 0


def test_weights_that_stay_1_get_no_panel():
    flat = [{**h, "seg.weight": 1.0, "vae.weight": 1.0} if h["split"] == "train" else h
            for h in HISTORY]
    assert "task weights (train, epoch mean)" not in dict(curve_panels(flat))
