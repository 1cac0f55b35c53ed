"""Padded batches of token sequences, and the norms that see them: the study of
``question_padding``.

Token ids are padded with id 0 into a rectangle (:func:`pad_batch`); the statistics of a set
that contains padding are diluted (:func:`dilution_sweep`); and a statistic over the time axis
carries later tokens into earlier positions of a causal model (:class:`TinyCausalLM`,
:func:`future_leak`).
"""
import math

import torch
from torch import nn

from ..masked import pack_real
from ..modules import BatchNorm1d, LayerNorm


def build_vocab(sentences):
    """Word -> id, in order of first appearance; id 0 is the pad token ``<pad>``."""
    vocab = {"<pad>": 0}
    for sentence in sentences:
        for word in sentence.split():
            vocab.setdefault(word, len(vocab))
    return vocab


def encode(sentence, vocab):
    return torch.tensor([vocab[word] for word in sentence.split()])


def pad_batch(sequences, length=None):
    """Token ids (B, T) padded with id 0 up to ``length`` (default: the longest), and the
    mask (B, T), True at the real tokens."""
    T = length or max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), T, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = s
    return ids, ids != 0


def set_statistics(values):
    """Mean and biased variance of all the numbers in ``values``."""
    mean = values.mean()
    return mean, ((values - mean) ** 2).mean()


def rms(t):
    return t.pow(2).mean().sqrt()


def batch_norm_tokens(x):
    """BatchNorm1d over the batch and time axes of (B, T, E), with batch statistics."""
    bn = BatchNorm1d(x.shape[-1], affine=False, track_running_stats=False).to(x.dtype)
    return bn(x.transpose(1, 2)).transpose(1, 2)        # (B, T, E) -> (B, E, T) and back


@torch.no_grad()
def dilution_sweep(embed, sentence, sequences, shares):
    """How padding dilutes the statistics, at padding shares near each of ``shares``.

    Two statistics sets: one sentence under ``LayerNorm([T, E])`` (``sentence`` padded to
    ever longer T), and channel 0 of ``BatchNorm1d`` over the whole batch ``sequences``
    padded to ever longer T. For each T: the padding share p of the set, its mean and
    variance divided by those of the real tokens alone, and the size (RMS) of the real
    tokens' normalized outputs divided by their size without padding. Returns
    ``{"layer": {...}, "batch": {...}}``, each a dict of float64 tensors plus the real
    tokens' ``mean_r`` and ``var_r``."""
    n = len(sentence)
    real = embed(sentence[None])[0]                                  # (n, E)
    E = real.shape[-1]
    mean_r, var_r = set_statistics(real)
    unpadded = rms(LayerNorm([n, E], elementwise_affine=False).double()(real))
    layer = {"p": [], "mean": [], "var": [], "out": []}
    for T in sorted({round(n / (1 - share)) for share in shares}):
        xs = embed(pad_batch([sentence], T)[0])[0]                   # (T, E)
        mean, var = set_statistics(xs)
        y = LayerNorm([T, E], elementwise_affine=False).double()(xs)[:n]
        for key, value in zip(layer, (1 - n / T, mean / mean_r, var / var_r,
                                      rms(y) / unpadded)):
            layer[key].append(value)
    ids, mask = pad_batch(sequences)
    x = embed(ids)
    real_mean, real_var = set_statistics(x[..., 0][mask])             # channel 0, real
    unpadded = rms(nn.BatchNorm1d(E, affine=False).double()(pack_real(x.transpose(1, 2), mask)))
    n_real, B = int(mask.sum()), len(sequences)
    batch = {"p": [], "mean": [], "var": [], "out": []}
    for T in sorted({max(ids.shape[1], round(n_real / (B * (1 - s)))) for s in shares}):
        ids_T, mask_T = pad_batch(sequences, T)
        xs = embed(ids_T)
        mean, var = set_statistics(xs[..., 0])                       # pads included
        out = rms(batch_norm_tokens(xs)[mask_T]) / unpadded
        for key, value in zip(batch, (1 - mask_T.double().mean(), mean / real_mean,
                                      var / real_var, out)):
            batch[key].append(value)

    def tensors(d, m, v):
        out = {k: torch.tensor([float(x) for x in vals], dtype=torch.float64)
               for k, vals in d.items()}
        return {**out, "mean_r": float(m), "var_r": float(v)}

    return {"layer": tensors(layer, mean_r, var_r), "batch": tensors(batch, real_mean, real_var)}


class _TimeBatchNorm(nn.Module):
    """BatchNorm1d over the batch and time axes of (B, T, E)."""

    def __init__(self, E):
        super().__init__()
        self.bn = nn.BatchNorm1d(E)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class _SequenceLayerNorm(nn.Module):
    """One mean and variance per sequence, over all its T x E numbers (no affine)."""

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[1:])


class TinyCausalLM(nn.Module):
    """A one-layer causal language model: embedding, a norm, single-head causal
    self-attention with a residual, and a linear head over the vocabulary.

    ``norm`` is where the statistics come from: ``"token"`` (``nn.LayerNorm(E)``, each token
    alone), ``"batch"`` (``nn.BatchNorm1d(E)`` over the batch and time axes) or
    ``"sequence"`` (one mean and variance per sequence, over time and features). The causal
    mask lets position t attend to positions 0..t only; the norm sits before the attention,
    as in pre-norm Transformers."""

    def __init__(self, vocab_size, E, norm="token", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, E)
        self.norm = {"token": lambda: nn.LayerNorm(E), "batch": lambda: _TimeBatchNorm(E),
                     "sequence": _SequenceLayerNorm}[norm]()
        self.qkv = nn.Linear(E, 3 * E)
        self.head = nn.Linear(E, vocab_size)

    def forward(self, ids):                                          # (B, T) -> (B, T, V)
        x = self.embed(ids)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        T = ids.shape[1]
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])       # (B, T, T)
        later = torch.ones(T, T, dtype=torch.bool).triu(1)           # key after query
        scores = scores.masked_fill(later, float("-inf"))
        return self.head(x + scores.softmax(-1) @ v)


@torch.no_grad()
def future_leak(model, ids, position, new_id):
    """How far the outputs at positions ``0 .. position-1`` move when the token at
    ``position`` (in every sequence of the batch) is replaced by ``new_id``. A causal model
    must give exactly 0: those positions may not see the changed token."""
    changed = ids.clone()
    changed[:, position] = new_id
    return (model(changed)[:, :position] - model(ids)[:, :position]).abs().max().item()
