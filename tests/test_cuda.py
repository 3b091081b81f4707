"""The hooks on a CUDA GPU: the same selections and tokens as on the CPU, cached generation equal to recomputation,
keep=1.0 exact, a batch equal to its samples. Needs a CUDA GPU (none on the CI machines; run on a GPU host with
`python -m pytest tests/test_cuda.py`)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import FAMILIES, POLICY_CASES, apply_case, assert_identity_and_restore, image_inputs, single_inputs

from tokenzip.engine.accounting import measure_flops
from tokenzip.flops import breakdown_of_record
from tokenzip.reference import cached_greedy, greedy_tokens, uncached_logits
from tokenzip.tiny import TinyVLM, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

CASES = [(f, c) for f in FAMILIES for c in POLICY_CASES if f == "llava" or c != "random-vision"]  # vision: CLIP only


@functools.cache
def cpu_model(family: str, dtype: torch.dtype = torch.float32) -> TinyVLM:
    return tiny(family, dtype=dtype)


@functools.cache
def cuda_model(family: str, dtype: torch.dtype = torch.float32) -> TinyVLM:
    """The same weights as `cpu_model` (same seed), on the GPU."""
    vlm = tiny(family, dtype=dtype)
    vlm.model.to("cuda")
    return vlm


def to_cuda(inputs: dict, dtype: torch.dtype = torch.float32) -> dict:
    return {
        k: (v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")) if torch.is_tensor(v) else v
        for k, v in inputs.items()
    }


def selections(patch) -> list[list[tuple[str, list[int]]]]:
    """Per sample and item, each stage's kept item-local indices (on the CPU, as lists)."""
    return [
        [(name, idx.cpu().tolist()) for item in sample.items for name, idx in item.stages]
        for sample in patch.stats.last.samples
    ]


@pytest.mark.parametrize(("family", "case"), CASES)
def test_cuda_selects_the_same_tokens_as_the_cpu(family, case):
    """float32, TF32 off: every stage keeps the same indices and greedy decoding gives the same tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu, gpu = cpu_model(family), cuda_model(family)
    inputs = image_inputs(cpu, 2)
    with apply_case(cpu.model, case, 0.25) as patch:
        want, want_logits = cached_greedy(cpu.model, inputs, 3)
        want_kept = selections(patch)
        want_budget = [s.on_budget for s in patch.stats.last.samples]
    with apply_case(gpu.model, case, 0.25) as patch:
        got, got_logits = cached_greedy(gpu.model, to_cuda(inputs), 3)
        got_kept = selections(patch)
        got_budget = [s.on_budget for s in patch.stats.last.samples]
    assert got_kept == want_kept
    assert got_budget == want_budget
    assert torch.equal(got.cpu(), want)
    torch.testing.assert_close(got_logits.cpu(), want_logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(("family", "case"), CASES)
def test_cuda_bfloat16_cached_generation_equals_recomputation(family, case):
    vlm = cuda_model(family, torch.bfloat16)
    inputs = to_cuda(image_inputs(vlm, 2), torch.bfloat16)
    with apply_case(vlm.model, case, 0.25) as patch:
        tokens, logits = cached_greedy(vlm.model, inputs, 3)
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, tokens)
    torch.testing.assert_close(logits.float(), reference.float(), atol=5e-2, rtol=5e-2)
    assert torch.equal(greedy_tokens(vlm.model, reference)[:, 0], tokens[:, 0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["hiprune", "holov", "visiondrop", "holitom", "fastv", "pool"])
def test_cuda_keep_one_reproduces_the_unpatched_logits(family, policy):
    vlm = cuda_model(family)
    assert_identity_and_restore(vlm, to_cuda(image_inputs(vlm, 2)), policy)


@pytest.mark.parametrize(("family", "case"), CASES)
def test_cuda_batch_equals_its_samples(family, case):
    vlm = cuda_model(family)
    with apply_case(vlm.model, case, 0.25):
        batch, _ = cached_greedy(vlm.model, to_cuda(image_inputs(vlm, 2)), 3)
        singles = [cached_greedy(vlm.model, to_cuda(single_inputs(vlm, i)), 3)[0] for i in range(2)]
    assert torch.equal(batch, torch.cat(singles))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("case", "keep"), [("random", 1.0), ("random", 0.25), ("hiprune", 0.25), ("fastv", 0.25)])
def test_cuda_model_flops_equal_the_formula(family, batch, case, keep):
    """At batch 1 without pruning there is no mask, so transformers calls the fused CUDA sdpa kernels with grouped
    key/value heads (`enable_gqa=True`): the counted FLOPs still equal the published formula."""
    vlm = cuda_model(family)
    inputs = to_cuda(image_inputs(vlm, batch))
    with apply_case(vlm.model, case, keep) as patch:
        measured = measure_flops(lambda: vlm.model(**inputs))
        record = patch.stats.last
    analytic = breakdown_of_record(vlm.model.config, record, lm_head_tokens=record.width_per_layer[-1])
    assert analytic.prefill == measured.model
