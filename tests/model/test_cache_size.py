"""The cache allocates exactly the analytic bytes, and the analytic count matches DeepSeek's figures."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.model.cache import Cache, cache_bytes


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro", "v3-671b", "nano"])
def test_allocation_equals_analytic(name):
    a = sparseek.preset(name)
    for n in (4096, 1 << 20):
        with torch.device("meta"):  # sizes without allocating a 1M-token cache
            c = Cache(a, batch_size=1, max_seq_len=n, device="meta", dtype=torch.bfloat16)
        assert c.nbytes() == pytest.approx(cache_bytes(a, n)["total_bytes"], rel=1e-9)


def test_flash_and_pro_bytes_per_token():
    flash = cache_bytes(sparseek.preset("v4-flash"), 1 << 20)
    # bf16: a CSA layer stores a 512-d entry + a 128-d indexer key per 4 tokens, HCA a 512-d entry per 128
    assert flash["per_layer_type"]["csa"]["bytes_per_token"] == 21 * (1024 + 256) / 4
    assert flash["per_layer_type"]["hca"]["bytes_per_token"] == 20 * 1024 / 128
    assert flash["per_layer_type"]["swa"]["bytes_per_token"] == 0  # window only: fixed size
    pro = cache_bytes(sparseek.preset("v4-pro"), 1 << 20)
    assert pro["per_layer_type"]["csa"]["bytes_per_token"] == 30 * (1024 + 256) / 4
    assert pro["per_layer_type"]["hca"]["bytes_per_token"] == 31 * 1024 / 128
    v3 = cache_bytes(sparseek.preset("v3-671b"), 1 << 20, with_mtp=False)
    assert v3["bytes_per_token"] == 61 * 576 * 2  # 70,272 B/token (spec §2.6)
    # its MTP layer (speculative decoding) keeps latents of its own
    assert cache_bytes(sparseek.preset("v3-671b"), 1 << 20)["bytes_per_token"] == 62 * 576 * 2
    # at 1M tokens V4-Flash needs under 10% of V3's cache even in bf16 (the report: 7% with FP8/FP4)
    assert flash["total_bytes"] / v3["total_bytes"] < 0.10
    assert flash["total_bytes"] / 2**30 < 7.0
