"""The fixes to vLLM are loaded as vLLM loads its plugins (in each of its processes), and each
one fixes what it says."""

from __future__ import annotations

import pytest
import torch


def test_top_k_over_no_rows_masks_nothing_instead_of_raising():
    from vllm.plugins import load_general_plugins
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    load_general_plugins()  # what vLLM's engine core and workers do at start
    assert ops.apply_top_k_only(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)).shape == (0, 10)
    logits = torch.tensor([[1.0, 3.0, 2.0]])  # rows still get their top k
    masked = ops.apply_top_k_only(logits.clone(), torch.tensor([1]))
    assert masked[0, 1] == 3.0 and torch.isinf(masked[0, [0, 2]]).all()


def test_per_token_sampling_parameters_are_spread_over_each_requests_draft_tokens():
    """What the rejection sampler divides each draft token's logits by, and masks them with."""
    from vllm.plugins import load_general_plugins
    from vllm.v1.sample import rejection_sampler

    load_general_plugins()
    cu = torch.tensor([2, 2, 5], dtype=torch.int32)  # drafts per request: 2, 0, 3
    temperatures = torch.tensor([0.7, 0.5, -1.0])
    spread = rejection_sampler.expand_batch_to_tokens(temperatures, cu, 5, replace_from=-1, replace_to=1)
    assert spread.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0])
    top_k = torch.tensor([5, 7, 9], dtype=torch.int32)
    assert rejection_sampler.expand_batch_to_tokens(top_k, cu, 5).tolist() == [5, 5, 9, 9, 9]
