"""Fixes to vLLM itself, applied in every process vLLM starts: a vLLM general plugin (declared in
pyproject.toml's `vllm.general_plugins` entry points), which vLLM loads in this process, in its
engine core and in each of its workers. Each fix names the version it was found in and checks it
still applies, so an upgrade that fixes vLLM leaves the original in place.
"""

from __future__ import annotations

from typing import Any

PATCHED = "__grokstack_patched__"


def register() -> None:
    _expand_per_token_in_place()
    _top_k_of_no_rows()


def _expand_per_token_in_place() -> None:
    """vLLM 0.32's CPU build (no Triton): the rejection sampler spreads each request's
    temperature, top_k and top_p over its draft tokens (`expand_batch_to_tokens`) with a C++ kernel
    that writes into an int64 copy of the output when the output is not int64 already
    (cpu_triton_utils._ensure_int64): float temperatures and top_p, int32 top_k. The output, made
    with new_empty, keeps whatever memory it was given. So every verification step of a sampled
    (temperature > 0) request divided its logits by garbage, and top_k indexed with garbage (an
    engine crash). Greedy requests never reach it. The same spreading in torch, on any device."""
    from vllm.triton_utils import HAS_TRITON
    from vllm.v1.sample import rejection_sampler

    if HAS_TRITON or getattr(rejection_sampler.expand_batch_to_tokens, PATCHED, False):
        return  # with Triton, vLLM's own kernel writes its output

    def expand_batch_to_tokens(x: Any, cu_num_tokens: Any, num_tokens: int, replace_from: int = 0,
                               replace_to: int = 0) -> Any:
        import torch

        counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1)).long()
        out = torch.repeat_interleave(x, counts, output_size=num_tokens)
        if replace_from != replace_to:
            out = torch.where(out == replace_from, torch.full_like(out, replace_to), out)
        return out

    setattr(expand_batch_to_tokens, PATCHED, True)
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens


def _top_k_of_no_rows() -> None:
    """vLLM 0.32 on CPU: a verification step that holds no draft token (with speculative decoding
    on, a step where the drafter proposed nothing) asks top-k for no rows, and `k.max()` of an
    empty tensor raises in the worker, which kills the engine core. A client sending `top_k`
    would so take down every decode engine its job was redelivered to. No rows: nothing to mask."""
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    original = ops.apply_top_k_only
    if getattr(original, PATCHED, False):
        return

    def apply_top_k_only(logits: Any, k: Any) -> Any:
        if k.numel() == 0:
            return logits
        return original(logits, k)

    setattr(apply_top_k_only, PATCHED, True)
    ops.apply_top_k_only = apply_top_k_only
