"""The three exercises' pictures (utils/experiments/teaching.py): the numbers behind them, asserted."""
import numpy as np
import torch

from utils.training.losses import segmentation_loss
from utils.training.networks import build_model, freeze_all_but_last_layer, last_layer, model_config
from utils.experiments.teaching import (changed_by_one_step, draw_counts, fp16_underflow, layer_table, plot_draw_counts,
                            plot_layers, plot_underflow)


def tiny_unet():
    torch.manual_seed(0)
    return build_model(model_config(1, 3, [4, 8], 0))


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 32, 32, 32, generator=generator), torch.randint(0, 3, (2, 1, 32, 32, 32), generator=generator)


def test_fp16_without_scaling_zeroes_more_gradients_than_with_the_gradscaler():
    model = tiny_unet()
    images, labels = batch()
    result = fp16_underflow(model, segmentation_loss("dicece"), images, labels)
    assert result["total"] == len(result["gradients"]) > 1000
    assert result["zero_unscaled"] > result["zero_scaled"] == 0 and result["inf_scaled"] == 0
    tiny = np.abs(result["gradients"]) < 2.0 ** -25          # below half fp16's smallest subnormal
    assert result["zero_unscaled"] == int(tiny.sum())
    assert all(p.grad is None for p in model.parameters())    # it leaves no gradient behind
    assert plot_underflow(result, "bf16 autocast").axes


def test_fine_tuning_table_and_one_step_change_only_the_last_layer():
    model = tiny_unet()
    trainable, total = freeze_all_but_last_layer(model)
    rows = layer_table(model)
    assert sum(r["parameters"] for r in rows) == total
    assert sum(r["parameters"] for r in rows if r["trainable"]) == trainable < total
    last = {f"{name}.{p}" for name, module in model.named_modules() if module is last_layer(model)
            for p, _ in module.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, labels = batch()

    def step():
        segmentation_loss("dicece")(model(images), labels).backward()
        optimizer.step()

    assert set(changed_by_one_step(model, step)) == last
    assert plot_layers(rows).axes


def test_the_naive_loader_spreads_draws_more_and_starves_cases_the_sampler_does_not():
    counts = draw_counts(n_cases=20, batch_size=2, Nit=3, epochs=8, seed=0)
    assert sum(counts["even"]) == sum(counts["naive"]) == 8 * 3 * 2
    assert counts["expected"] == 2.4
    assert max(counts["even"]) - min(counts["even"]) <= 1                  # floor or ceil of 2.4
    assert np.std(counts["naive"]) > np.std(counts["even"])
    assert min(counts["naive"]) == 0 < min(counts["even"])                # starved by the naive loader
    assert plot_draw_counts(counts).axes
