"""The internal covariate shift chapter's studies: Ioffe & Szegedy (2015)'s Figure 1 network on
the digits, the measures of how a unit's input distribution moves, the initialisation and
learning-rate sweep, and the loss landscape along the gradient (Santurkar et al., 2018).

Every function is seeded and returns plain numbers or tensors; the chapter shows the call, the
figure and the assertion, and ``tests/test_claims_internal_covariate_shift.py`` runs the same
functions over several seeds.
"""
import math

import numpy as np
import torch
from torch import nn

from .models import digits_mlp
from .probes import TrainingProbe, activation_inputs, loss_along_gradient
from .training import train

#: Ioffe & Szegedy's Figure 1 setting at CPU scale (theirs: MNIST, 50,000 steps, batch 60).
FIGURE1 = {"steps": 1000, "every": 20, "batch_size": 60, "lr": 1.0, "init_std": 0.1}
#: A sigmoid input counts as saturated beyond this: the slope there is under 1/14 of its peak.
SATURATED = 4.0


def sigmoid_slope(z):
    """The derivative of the sigmoid, sigma(z) (1 - sigma(z))."""
    s = torch.sigmoid(z)
    return s * (1 - s)


def figure1_run(norm, data, probe_x, seed=0, steps=None, every=None):
    """Train the Figure 1 network (3 x 100 sigmoids, N(0, 0.1^2) weights, batch 60, SGD at
    learning rate 1) with ``norm`` (None, or a class such as ``normcode.BatchNorm1d``) before
    each sigmoid, probing ``probe_x`` every ``every`` steps. Returns (model, history, probe)."""
    steps = steps or FIGURE1["steps"]
    every = every or FIGURE1["every"]
    model = digits_mlp(hidden=(100, 100, 100), norm=norm, activation=nn.Sigmoid,
                       init_std=FIGURE1["init_std"], seed=seed)
    probe = TrainingProbe(probe_x, every=every)
    history = train(model, data, steps=steps, batch_size=FIGURE1["batch_size"],
                    lr=FIGURE1["lr"], seed=seed, eval_every=every, callback=probe)
    return model, history, probe


def percentiles(probe, layer=-1, unit=0, q=(0.15, 0.50, 0.85)):
    """The q-th percentiles of one unit's input over the probe images, per record: (len(q),
    records). Ioffe & Szegedy's Figure 1(b, c) plot the 15th, 50th and 85th."""
    z = probe.stacked_inputs()[:, layer, :, unit]                  # (records, probe images)
    return torch.quantile(z, torch.tensor(q), dim=1)


def shift_per_record(probe, layer=-1):
    """How far each unit's mean input moves between two records, averaged over units and
    records: the distribution shift the next layer sees."""
    means = probe.stacked_inputs()[:, layer].mean(1)               # (records, units)
    return (means[1:] - means[:-1]).abs().mean().item()


def median_range(probe, layer=-1):
    """How far each unit's median input wanders over the whole run (max - min), averaged."""
    medians = probe.stacked_inputs()[:, layer].median(1).values    # (records, units)
    return (medians.max(0).values - medians.min(0).values).mean().item()


def band_growth(probe, layer=-1):
    """The median over units of (15th-85th percentile band at the last record) / (at the
    first): how much each unit's input distribution widens over training."""
    z = probe.stacked_inputs()[:, layer]
    band = torch.quantile(z, 0.85, dim=1) - torch.quantile(z, 0.15, dim=1)  # (records, units)
    return (band[-1] / band[0]).median().item()


def saturated_share(probe, threshold=SATURATED):
    """Share of all recorded sigmoid inputs (layers x images x units) with |z| > threshold,
    per record."""
    return (probe.stacked_inputs().abs() > threshold).float().mean((1, 2, 3))


def first_step_reaching(history, level):
    """The first evaluated step with test accuracy >= level (inf if never)."""
    return next((s for s, a in zip(history.steps, history.test_accuracy) if a >= level),
                math.inf)


def accuracy_at(history, step):
    """The test accuracy recorded at ``step``."""
    return history.test_accuracy[history.steps.index(step)]


def init_lr_sweep(data, norm, init_stds, lrs, steps, seed=0, batch_size=60):
    """Final test accuracy of the Figure 1 network (sigmoids) after ``steps`` SGD steps, for
    every initial weight std (rows) and learning rate (columns)."""
    acc = np.zeros((len(init_stds), len(lrs)))
    for i, std in enumerate(init_stds):
        for j, lr in enumerate(lrs):
            model = digits_mlp(norm=norm, init_std=std, seed=seed)
            history = train(model, data, steps=steps, batch_size=batch_size, lr=lr,
                            seed=seed)
            acc[i, j] = history.test_accuracy[-1]
    return acc


def activation_run(data, norm, activation, probe_x, steps, lr, seed=0, batch_size=60):
    """The Figure 1 network with PyTorch's default initialisation and ``activation``. Returns
    (final test accuracy, mean norm of the first layer's gradient over the run)."""
    model = digits_mlp(norm=norm, activation=activation, seed=seed)
    probe = TrainingProbe(probe_x, every=steps, activation=activation)
    history = train(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                    callback=probe)
    return history.test_accuracy[-1], probe.first_layer_grad[0]


def saturated_at_init(norm, probe_x, init_std, seed=0, threshold=SATURATED):
    """Share of the fresh network's sigmoid inputs beyond ``threshold``, weights N(0, std^2)."""
    model = digits_mlp(norm=norm, init_std=init_std, seed=seed)
    return (activation_inputs(model, probe_x).abs() > threshold).float().mean().item()


def relative_noise(outputs):
    """Spread of a sample's logits across companion batches, relative to the spread across
    samples. ``outputs`` is (draws, samples, logits), as ``companion_outputs`` returns."""
    return (outputs.std(0).mean() / outputs.mean(0).std(0).mean()).item()


def landscape_run(data, norm, step_sizes, steps=300, lr=0.5, every=25, init_std=0.15,
                  seed=0, batch_size=60, probe_batch=256):
    """Train the ReLU version of the network and, every ``every`` steps, walk along the
    gradient on a fixed batch (``loss_along_gradient``). Returns (records, final accuracy),
    records an array of rows (step, max - min of the loss, effective beta-smoothness)."""
    batch_x, batch_y = data.x_train[:probe_batch], data.y_train[:probe_batch]
    records = []

    def look(step, model):
        if step % every == 0:
            losses, beta = loss_along_gradient(model, batch_x, batch_y, step_sizes)
            records.append((step, max(losses) - min(losses), beta))

    model = digits_mlp(norm=norm, activation=nn.ReLU, init_std=init_std, seed=seed)
    history = train(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                    callback=look)
    return np.array(records), history.test_accuracy[-1]


#: The test-accuracy level at which "reached" is measured in the Figure 1 comparison.
LEVEL = 0.9


def figure1_measures(runs, level=LEVEL):
    """The numbers the chapter asserts about its Figure 1 runs. ``runs`` maps "without BN",
    "with BN" and, optionally, "noisy BN" to the (model, history, probe) of ``figure1_run``."""
    out = {}
    for name, (_, history, probe) in runs.items():
        sat = saturated_share(probe)
        grads = probe.first_layer_grad
        out[name] = {
            "reach": first_step_reaching(history, level),
            "acc200": accuracy_at(history, 200),
            "final": history.test_accuracy[-1],
            "shift": shift_per_record(probe),
            "median_range": median_range(probe),
            "band_growth": band_growth(probe),
            "sat_first": sat[0].item(),
            "sat_last": sat[-1].item(),
            "sat_max": sat.max().item(),
            "early_grad": float(np.mean(grads[:100 // probe.every])),  # steps 1-100
        }
    return out
