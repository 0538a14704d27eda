"""Shared test helpers: random-but-sane weights for any model (ours or transformers')."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter and persistent buffer so that no mechanism is trivially off.

    Matrices get 1/sqrt(fan_in) scale so activations stay O(1); sinks, ape/position biases, mHC
    biases and router biases get non-zero values; hash tables get distinct random experts.
    """
    g = torch.Generator().manual_seed(seed)
    persistent = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, t in persistent.items():
            leaf = name.rsplit(".", 1)[-1]
            if "tid2eid" in name:
                n_exp = _n_experts(model)
                t.copy_(torch.rand(t.shape[0], n_exp, generator=g).topk(t.shape[1], dim=-1).indices)
            elif not t.is_floating_point():
                continue
            elif leaf in ("ape", "position_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif t.dim() >= 2:
                fan_in = t.shape[-1]
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
            elif "sink" in leaf:
                t.copy_(torch.randn(t.shape, generator=g))
            elif leaf.endswith("scale"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif leaf.endswith("base"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif "bias" in leaf:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:  # norm weights
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
    return model


def _n_experts(model) -> int:
    cfg = getattr(model, "args", None) or getattr(model, "config")
    return cfg.n_routed_experts


def saved_bytes(fn, exclude=frozenset()):
    """-> (``fn()``, bytes of the distinct storages autograd keeps for backward while it runs),
    storages whose data pointer is in ``exclude`` (e.g. the weights') not counted."""
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


@pytest.fixture
def seed_all():
    torch.manual_seed(0)


def _ambiguous_cut(v_sorted: torch.Tensor, k: int) -> int:
    """Rows whose k-th and (k+1)-th best scores are equal or within float rounding of each other."""
    a, b = v_sorted[..., k - 1], v_sorted[..., k]
    close = (a - b).abs() <= 2e-6 * torch.clamp(a.abs(), min=1.0)
    return int((close & torch.isfinite(b)).sum())


class IndexTieCounter:
    """Counts top-k choices that are ambiguous: the indexer's cut or a router's cut falls inside an
    exact tie (ReLU makes score-0 ties common in tiny random models) or a near-tie that float
    rounding order can flip.

    Any choice among tied entries is a valid top-k, so two implementations may legitimately pick
    different sets; comparisons with transformers therefore use inputs without ambiguous cuts.
    """

    def __init__(self):
        from sparseek.model import common, v4

        self.v4, self.common, self.count = v4, common, 0
        self._select, self._gate = v4.Indexer.select, common.Gate.forward

    def __enter__(self):
        counter, select0, gate0 = self, self._select, self._gate

        def select(ix, q, w, keys, n_vis):
            N = keys.shape[1]
            k = min(ix.topk, N)
            if N > k:
                s = torch.einsum("bqic,bnc->bqin", q.float(), keys.float()).relu()
                s = torch.einsum("bqin,bqi->bqn", s, w)
                s = s.masked_fill(torch.arange(N, device=s.device) >= n_vis[..., None], float("-inf"))
                counter.count += _ambiguous_cut(s.sort(dim=-1, descending=True).values, k)
            return select0(ix, q, w, keys, n_vis)

        def gate(g, x, ids=None):
            w, idx, scores = gate0(g, x, ids)
            if not g.hash_routed and g.topk < scores.shape[-1]:
                choice = scores if g.bias is None else scores + g.bias
                counter.count += _ambiguous_cut(choice.sort(dim=-1, descending=True).values, g.topk)
            return w, idx, scores

        self.v4.Indexer.select, self.common.Gate.forward = select, gate
        return self

    def __exit__(self, *exc):
        self.v4.Indexer.select, self.common.Gate.forward = self._select, self._gate


def tie_free_ids(model, batch: int, T: int, seed: int, tries: int = 100) -> torch.Tensor:
    for attempt in range(tries):
        ids = torch.randint(0, model.args.vocab_size, (batch, T),
                            generator=torch.Generator().manual_seed(seed * 1000 + T * 7 + attempt))
        with IndexTieCounter() as c, torch.no_grad():
            model(ids)
        if c.count == 0:
            return ids
    raise AssertionError(f"no input without ambiguous top-k found for T={T}")


CODE_CORPUS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nfor name in os.listdir('.'):\n    print(name, file=sys.stderr)\n",
] * 30


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of small Python files to train on (90 documents)."""
    d = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(CODE_CORPUS):
        (d / f"doc{i:03d}.py").write_text(text + f"\n# document {i}\nvalue_{i} = {i * 7 % 13}\n")
    return str(d)


@pytest.fixture
def eager_hot_paths(monkeypatch):
    """Undo ``compile_hot_paths()`` (a process-wide swap) after the test, so the rest of the suite
    runs the eager functions."""
    from sparseek.model import v4
    from sparseek.quant import formats

    for module, name, _ in v4.hot_paths():
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(formats, "_decoder", formats._decoder)  # and compile_decoders()
