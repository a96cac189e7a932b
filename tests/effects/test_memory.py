"""Rows per forward from free GPU memory (saets_utils/effects/memory.py): the CUDA branch is plain
arithmetic on the model's shape and ``torch.cuda.mem_get_info``, so it is checked here by hand on
any machine, with the free memory given by a stand-in for ``mem_get_info``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from saets_utils.effects import memory

# Gemma-2-2B's shape: bf16, 8 query heads sharing 4 key/value heads of 64, 26 layers, vocab 256000
GEMMA_2B = {
    "dtype": torch.bfloat16,
    "n_heads": 8,
    "n_key_value_heads": 4,
    "d_head": 256,
    "n_layers": 26,
    "d_model": 2304,
    "d_mlp": 9216,
    "d_vocab": 256000,
}


def model(device: str | None = "cuda:0", **cfg) -> SimpleNamespace:
    return SimpleNamespace(cfg=SimpleNamespace(**{**GEMMA_2B, "device": device, **cfg}))


def test_bytes_per_row_counts_logits_kv_cache_and_activations():
    # 32 tokens: logits 32 x 256000 x (2 bytes bf16 + two float32 copies, 8 bytes) = 81_920_000;
    # KV cache 2 x 26 layers x 4 kv heads x 256 x 32 x 2 bytes = 3_407_872;
    # activations 12 x 32 x max(2304, 9216) x 2 bytes = 7_077_888
    assert memory.bytes_per_row(model(), 32) == 81_920_000 + 3_407_872 + 7_077_888
    # generation keeps one position's logits
    assert memory.bytes_per_row(model(), 32, logit_positions=1) == 2_560_000 + 3_407_872 + 7_077_888
    # no grouped-query attention: every head has its own keys and values
    assert memory.bytes_per_row(model(n_key_value_heads=None), 32) == 81_920_000 + 2 * 3_407_872 + 7_077_888
    # float32: 4 bytes per activation, logits 4 + 8
    assert memory.bytes_per_row(model(dtype=torch.float32), 32) == 98_304_000 + 2 * 3_407_872 + 2 * 7_077_888


@pytest.fixture
def free_memory(monkeypatch):
    """``torch.cuda.mem_get_info`` returning ``state["free"]`` bytes free and recording the device asked."""
    state: dict = {"free": 0, "asked": []}

    def mem_get_info(device):
        state["asked"].append(device)
        return state["free"], 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return state


def test_rows_for_memory_on_cuda_fill_a_fraction_of_free_memory(free_memory):
    m = model()
    per_row = memory.bytes_per_row(m, 64)  # 184_811_520 bytes
    free_memory["free"] = 40 * 2**30
    rows = memory.rows_for_memory(m, 64, default=8)
    assert rows == int(40 * 2**30 * 0.4) // per_row == 92
    assert free_memory["asked"] == [torch.device("cuda:0")]
    # a quarter of the memory, a quarter of the rows
    assert memory.rows_for_memory(m, 64, default=8, fraction=0.1) == int(40 * 2**30 * 0.1) // per_row == 23
    # generation (one position's logits) fits many more rows than a loss over all positions
    gen = memory.rows_for_memory(m, 64, default=8, logit_positions=1)
    assert gen == int(40 * 2**30 * 0.4) // memory.bytes_per_row(m, 64, logit_positions=1) > 2 * rows


def test_rows_for_memory_stays_between_one_and_the_cap(free_memory):
    m = model(d_vocab=100, n_layers=1, d_model=16, d_mlp=16, d_head=4)  # a few kB per row
    free_memory["free"] = 80 * 2**30
    assert memory.rows_for_memory(m, 8, default=8) == 16384
    assert memory.rows_for_memory(m, 8, default=8, cap=100) == 100
    free_memory["free"] = 10  # nearly full: still one row, never zero
    assert memory.rows_for_memory(model(), 64, default=8) == 1


def test_rows_for_memory_off_cuda_is_the_default(free_memory):
    for device in ("cpu", None, "mps"):
        assert memory.rows_for_memory(model(device=device), 64, default=7) == 7
    assert free_memory["asked"] == []  # no CUDA call off the GPU


def test_gradient_rows_leave_room_for_what_the_backward_keeps(free_memory):
    m = model()
    free_memory["free"] = 40 * 2**30
    held = 26 * 7_077_888  # every layer's activations at 32 tokens
    rows = memory.gradient_rows(m, 32)
    assert rows == int(40 * 2**30 * 0.4) // (memory.bytes_per_row(m, 32) + held) == 62
    assert rows < memory.loss_rows(m, 32) == int(40 * 2**30 * 0.4) // memory.bytes_per_row(m, 32)
    assert memory.gradient_rows(model(device="cpu"), 32) == 64  # the CPU default
