"""A small decoder-only Transformer, a synthetic sequence task, and the loops that train and
probe it: the experiments of the part "Normalization in Transformers".

The model is built from torch.nn pieces and normcode's norms. Its options are the three choices
that modern models differ in: the norm (``"layernorm"``, ``"rmsnorm"`` or ``"dyt"``), where it
sits (``"post"`` or ``"pre"``) and QK-norm. Each block's parameters carry the names of
``torch.nn.TransformerEncoderLayer``'s, so ``block.load_state_dict(layer.state_dict())`` works.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import normcode
from normcode.dynamic_tanh import DynamicTanh

NORMS = ("layernorm", "rmsnorm", "dyt")


#: Which implementation of LayerNorm and RMSNorm the models use. normcode's equal torch.nn's
#: (the book asserts it in every chapter, and a test of this part in these very models);
#: torch.nn's fused kernels train several times faster, so the training runs use them.
IMPLEMENTATIONS = {"normcode": normcode, "torch": nn}


def make_norm(kind, shape, alpha_init_value=0.5, impl="torch"):
    """A norm over the trailing ``shape``: LayerNorm, RMSNorm (from ``impl``, normcode or
    torch.nn) or DynamicTanh."""
    lib = IMPLEMENTATIONS[impl]
    if kind == "layernorm":
        return lib.LayerNorm(shape)
    if kind == "rmsnorm":
        return lib.RMSNorm(shape, eps=1e-5)
    if kind == "dyt":
        return DynamicTanh(shape, alpha_init_value=alpha_init_value)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, with the parameters of ``nn.MultiheadAttention``.

    ``qk_norm`` names a norm applied to each head's queries and keys (over the head dimension)
    before their dot product. With ``record = True`` the forward keeps, in ``self.stats``, the
    largest attention logit and the mean attention entropy (in nats) of its last call.
    """

    def __init__(self, d_model, nhead, qk_norm=None, impl="torch"):
        super().__init__()
        self.nhead, self.head_dim = nhead, d_model // nhead
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialization
        nn.init.zeros_(self.out_proj.bias)
        self.q_norm = make_norm(qk_norm, self.head_dim, impl=impl) if qk_norm else None
        self.k_norm = make_norm(qk_norm, self.head_dim, impl=impl) if qk_norm else None
        self.record, self.stats = False, None

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, self.nhead, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:  # (B, H, T, head_dim): each head's query and key alone
            q, k = self.q_norm(q), self.k_norm(k)
        logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
        attn = logits.softmax(dim=-1)
        if self.record:
            with torch.no_grad():
                entropy = -torch.special.xlogy(attn, attn).sum(-1)  # 0 log 0 = 0
                self.stats = (logits.amax().item(), entropy[..., 1:].mean().item())
        out = (attn @ v).transpose(1, 2).reshape(B, T, D)
        return self.out_proj(out)


class Block(nn.Module):
    """One Transformer layer: attention and a ReLU feed-forward, each a residual branch.

    Post-LN (the original Transformer): ``x = norm(x + f(x))``. Pre-LN: ``x = x + f(norm(x))``.
    """

    def __init__(self, d_model, nhead, dim_feedforward, norm="layernorm", placement="pre",
                 qk_norm=False, alpha_init_value=0.5, impl="torch"):
        super().__init__()
        if placement not in ("pre", "post"):
            raise ValueError(f"placement must be 'pre' or 'post', got {placement!r}")
        self.norm_first = placement == "pre"
        self.self_attn = CausalSelfAttention(d_model, nhead, norm if qk_norm else None, impl)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = make_norm(norm, d_model, alpha_init_value, impl)
        self.norm2 = make_norm(norm, d_model, alpha_init_value, impl)

    def feed_forward(self, x):
        return self.linear2(F.relu(self.linear1(x)))

    def forward(self, x):
        if self.norm_first:
            x = x + self.self_attn(self.norm1(x))
            return x + self.feed_forward(self.norm2(x))
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.feed_forward(x))


class TinyTransformer(nn.Module):
    """A decoder-only Transformer: token and position embeddings, ``num_layers`` blocks, a
    final norm (Pre-LN only, as in GPT-2 and LLaMA) and a linear read-out to the vocabulary."""

    def __init__(self, vocab_size, seq_len, d_model=32, nhead=4, num_layers=4,
                 dim_feedforward=None, norm="layernorm", placement="pre", qk_norm=False,
                 alpha_init_value=0.5, impl="torch"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model))
        self.layers = nn.ModuleList(
            Block(d_model, nhead, dim_feedforward or 4 * d_model, norm, placement, qk_norm,
                  alpha_init_value, impl) for _ in range(num_layers))
        self.norm = (make_norm(norm, d_model, alpha_init_value, impl) if placement == "pre"
                     else nn.Identity())
        self.head = nn.Linear(d_model, vocab_size)
        for layer in self.layers:  # Xavier, as nn.Transformer and Xiong et al. (2020) initialize
            for linear in (layer.linear1, layer.linear2, layer.self_attn.out_proj):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    def forward(self, ids, streams=None):
        """Logits (B, T, vocab) for token ids (B, T). A list ``streams`` receives the residual
        stream (B, T, d_model) entering each layer, and the one leaving the last."""
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            if streams is not None:
                streams.append(x.detach())
            x = layer(x)
        if streams is not None:
            streams.append(x.detach())
        return self.head(self.norm(x))

    def attention_stats(self):
        """(largest logit, mean entropy) of each layer's last recorded forward."""
        return [layer.self_attn.stats for layer in self.layers]

    def record_attention(self, on=True):
        for layer in self.layers:
            layer.self_attn.record = on


# ------------------------------------------------------------------------------------------
# The task: reverse a sequence
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reversal:
    """Sequences ``a_1 .. a_n SEP a_n .. a_1`` of symbols 1..``symbols``; the model reads it
    left to right and is scored on predicting the reversed half (the n tokens after SEP).

    Solving it needs attention: the token to emit sits at a position that moves with each step.
    """
    n: int = 7
    symbols: int = 10

    @property
    def vocab_size(self):
        return self.symbols + 1  # SEP is 0

    @property
    def seq_len(self):
        return 2 * self.n  # inputs: the sequence without its last token

    def batch(self, batch_size, generator):
        """(inputs, targets), each (batch_size, 2n); targets are -100 where not scored."""
        a = torch.randint(1, self.symbols + 1, (batch_size, self.n), generator=generator)
        sep = torch.zeros(batch_size, 1, dtype=torch.long)
        seq = torch.cat([a, sep, a.flip(1)], dim=1)  # (B, 2n + 1)
        inputs, targets = seq[:, :-1], seq[:, 1:].clone()
        targets[:, : self.n - 1] = -100  # the first half is random: nothing to predict
        targets[:, self.n - 1] = -100  # nor the SEP
        return inputs, targets


def build(task, seed, **options):
    """A :class:`TinyTransformer` for ``task``, its parameters drawn from ``seed``."""
    torch.manual_seed(seed)
    return TinyTransformer(task.vocab_size, task.seq_len, **options)


def loss_and_accuracy(model, inputs, targets):
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    scored = targets != -100
    accuracy = (logits.argmax(-1)[scored] == targets[scored]).float().mean()
    return loss, accuracy.item()


@dataclass
class Run:
    """What :func:`train` records: the training loss of every step, the attention statistics
    every ``record_every`` steps (step, [(largest logit, mean entropy) per layer]), and the
    held-out loss and token accuracy at the end."""
    loss: list = field(default_factory=list)
    attention: list = field(default_factory=list)
    test_loss: float = float("nan")
    test_accuracy: float = 0.0

    @property
    def diverged(self):
        return not math.isfinite(self.loss[-1])


def held_out(task, size=512):
    """A fixed held-out batch, the same for every run."""
    return task.batch(size, torch.Generator().manual_seed(12345))


def train(model, task, *, steps, lr, warmup=0, batch_size=32, seed=0, weight_decay=0.0,
          record_every=None):
    """Train with Adam (betas 0.9, 0.98, as Xiong et al. 2020) on fresh batches drawn from a
    generator seeded by ``seed``. The learning rate rises linearly from 0 to ``lr`` over
    ``warmup`` steps, then stays. A non-finite loss stops the run. Returns a :class:`Run`."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98),
                            weight_decay=weight_decay, foreach=True)
    run = Run()
    model.train()
    model.record_attention(False)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warmup) if warmup else lr
        record = bool(record_every) and (step == 1 or step % record_every == 0)
        model.record_attention(record)
        inputs, targets = task.batch(batch_size, g)
        loss, _ = loss_and_accuracy(model, inputs, targets)
        run.loss.append(loss.item())
        if record:
            run.attention.append((step, model.attention_stats()))
        if not math.isfinite(run.loss[-1]):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.record_attention(False)
    model.eval()
    with torch.no_grad():
        test_loss, run.test_accuracy = loss_and_accuracy(model, *held_out(task))
    run.test_loss = test_loss.item()
    return run


def gradient_norms(model, task, *, batches=4, batch_size=64, seed=0,
                   weight="linear2.weight"):
    """The gradient norm of each layer's ``weight`` at the model's current parameters, as
    Xiong et al. (2020) measure it at initialization: the root mean square over ``batches``
    batches of the per-batch gradient norm. Returns a tensor (num_layers,)."""
    g = torch.Generator().manual_seed(seed)
    squares = torch.zeros(len(model.layers))
    for _ in range(batches):
        model.zero_grad()
        loss, _ = loss_and_accuracy(model, *task.batch(batch_size, g))
        loss.backward()
        for i, layer in enumerate(model.layers):
            squares[i] += layer.get_parameter(weight).grad.norm() ** 2
    model.zero_grad()
    return (squares / batches).sqrt()


@torch.no_grad()
def residual_norms(model, inputs):
    """The mean norm of the residual stream entering each layer and leaving the last, and the
    mean norm of each layer's update (output minus input): two tensors (L + 1,) and (L,)."""
    streams = []
    model(inputs, streams=streams)
    norms = torch.stack([s.norm(dim=-1).mean() for s in streams])
    updates = torch.stack([(b - a).norm(dim=-1).mean() for a, b in zip(streams, streams[1:])])
    return norms, updates
