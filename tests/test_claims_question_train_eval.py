"""The claims of chapters/question_train_eval.ipynb that rest on its experiment code.

The chapter runs its own seeds (0, 1, 2) and asserts the accuracy relations itself; what it
takes on trust from ``normcode.experiments.train_eval`` is checked here: a model trained inside
the grouped ensemble is the model ``normcode.experiments.train`` trains alone, and the shadow
running statistics are the ones the model would have kept at that momentum.
"""
import pytest
import torch
from torch import nn

import normcode
from normcode.experiments import digits_cnn, load_digits, train
from normcode.experiments.train_eval import (bn_layers, recalibrate, shadow_running_stats,
                                             train_ensemble)

DATA = load_digits()


def max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in
               zip(a.state_dict().values(), b.state_dict().values()) if x.is_floating_point())


@pytest.mark.parametrize("batch_size, steps", [(2, 20), (32, 10)])
def test_a_model_in_the_ensemble_is_the_model_trained_alone(batch_size, steps):
    seeds, lrs = [0, 1, 2], [0.05, 0.2, 0.1]
    models, shadows = train_ensemble(DATA, seeds=seeds, lrs=lrs, batch_size=batch_size,
                                     steps=steps, shadow_momenta=(0.1,))
    for k, (seed, lr) in enumerate(zip(seeds, lrs)):
        alone = digits_cnn(nn.BatchNorm2d, seed=seed)
        train(alone, DATA, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        # float32, grouped vs separate convolutions: rounding differs, nothing else. Batch-2
        # BatchNorm amplifies rounding over a long run, so compare over the first steps.
        assert max_difference(models[k], alone) < 1e-3
        assert max_difference(shadows[0.1][k], alone) < 1e-3   # the default momentum
        for a, b in zip(bn_layers(models[k]), bn_layers(alone)):
            assert a.num_batches_tracked == b.num_batches_tracked == steps


def test_shadow_running_stats_are_those_of_that_momentum():
    x = [torch.randn(8, 3, 4, 4, dtype=torch.float64) for _ in range(6)]
    model = normcode.BatchNorm2d(3).double()
    shadows, hooks = shadow_running_stats(model, (0.1, 0.001, None))
    for m in (0.001, None):
        twin = normcode.BatchNorm2d(3, momentum=m).double()
        for xi in x:
            twin(xi)
        if m == 0.001:
            for xi in x:
                model(xi)
        torch.testing.assert_close(shadows[m][0].running_mean, twin.running_mean)
        torch.testing.assert_close(shadows[m][0].running_var, twin.running_var)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(shadows[0.1][0].running_mean, model.running_mean, rtol=0, atol=0)
    model.eval()(x[0])                                       # eval: the shadows are not fed
    assert shadows[0.1][0].num_batches_tracked == len(x)


def test_recalibration_is_the_plain_average_with_the_final_weights():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), normcode.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)                     # stale
    x = torch.randn(40, 1, 6, 6)
    fixed = recalibrate(model, x, batch_size=10)
    with torch.no_grad():
        h = model[0](x)
    batch_means = torch.stack([h[i:i + 10].mean((0, 2, 3)) for i in range(0, 40, 10)])
    torch.testing.assert_close(fixed[1].running_mean, batch_means.mean(0))
    assert not fixed.training and model[1].running_mean[0] == 5.0   # a copy


def test_train_mode_accuracies_of_a_stack_are_those_of_each_model():
    from normcode.experiments.train_eval import train_mode_accuracies, train_mode_accuracy
    models = [digits_cnn(nn.BatchNorm2d, seed=s) for s in (0, 1)]
    for m in models:
        train(m, DATA, steps=5, batch_size=32, lr=0.2, seed=0)
    for B in (2, 32):
        stacked = train_mode_accuracies(models, DATA.x_test, DATA.y_test, B)
        alone = [train_mode_accuracy(m, DATA.x_test, DATA.y_test, B) for m in models]
        assert stacked == pytest.approx(alone, abs=1 / len(DATA.y_test) + 1e-9)
