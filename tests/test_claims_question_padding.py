"""The claims of chapters/question_padding.ipynb that rest on normcode.experiments.sequences,
over more seeds, positions and tokens than the chapter shows."""
import pytest
import torch

from normcode.experiments.sequences import (TinyCausalLM, dilution_sweep, future_leak,
                                            pad_batch)

VOCAB, E = 30, 16


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 5, 7]
    seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]
    return pad_batch(seqs)[0]


@pytest.mark.parametrize("seed", range(5))
def test_only_per_token_statistics_respect_the_causal_mask(seed):
    ids = batch(seed)
    for position in range(1, ids.shape[1]):
        new_id = (int(ids[0, position]) % (VOCAB - 1)) + 1
        token = TinyCausalLM(VOCAB, E, "token", seed=seed).double().train()
        assert future_leak(token, ids, position, new_id) == 0            # bit for bit
        for norm in ("batch", "sequence"):
            model = TinyCausalLM(VOCAB, E, norm, seed=seed).double().train()
            assert future_leak(model, ids, position, new_id) > 1e-6, (norm, position)
        batch_norm = TinyCausalLM(VOCAB, E, "batch", seed=seed).double().train()
        batch_norm(ids)                                                   # running stats
        assert future_leak(batch_norm.eval(), ids, position, new_id) == 0


def test_the_causal_mask_itself_does_not_leak():
    """Without a norm over time, the model is causal: the leak comes from the norm alone."""
    ids = batch(0)
    model = TinyCausalLM(VOCAB, E, "token").double()
    with torch.no_grad():
        full = model(ids)
        for t in range(1, ids.shape[1] + 1):       # the prefix alone gives the same outputs
            torch.testing.assert_close(model(ids[:, :t]), full[:, :t], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_padding_dilutes_the_mean_as_one_minus_p(seed):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(VOCAB, E, generator=g, dtype=torch.float64)
    table[0] = 0                                                       # the pad vector

    def embed(ids):
        return table[ids]

    seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in (8, 20, 3)]
    sweep = dilution_sweep(embed, seqs[0], seqs, [0.0, 0.3, 0.6, 0.9])
    for d in sweep.values():
        torch.testing.assert_close(d["mean"], 1 - d["p"], rtol=1e-10, atol=1e-12)
        assert (d["out"].diff() > 0).all()
