"""Generation modes beyond plain cached `generate`, under a patch (issue 19: r02, r05, r06, r15, r16, r17).

* prompt-lookup decoding verifies several draft tokens per step and crops the cache after a rejected draft:
  under a patch it gives the tokens of plain greedy generation, and logits equal to the cache-free replay;
* `generate(use_cache=False)` works under every patch: keep=1.0 equals the unpatched model, and a pruning patch
  equals cached generation (each step replays the first step's selections);
* generation continued from a returned cache with text-only tokens equals the cache-free replay (keep=1.0:
  the unpatched model's continuation); a stale cache or new images give a clear error;
* `Patch.replay()` works on a batch where one sample has no image;
* `labels=` under a policy that shortens the sequence is refused with a tokenzip error; keep=1.0 accepts it;
* no spurious transformers deprecation warning about `past_key_values`.

Models: the tiny families with 8 decoder layers (where the default prune layers of the policies differ).
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from conftest import FAMILIES, POLICY_CASES, forward_with_hooks
from transformers.utils import generic as hf_generic

import tokenzip
from tokenzip.errors import UnsupportedInputError
from tokenzip.reference import _suppress, extend_inputs, greedy_tokens, uncached_logits
from tokenzip.tiny import TinyVLM, dummy_image, tiny

ATOL = 1e-4


@functools.cache
def model8(family: str) -> TinyVLM:
    """The tiny model of `family` with 8 decoder layers (sdpa)."""
    return tiny(family, text_layers=8)


def apply_case(model, case: str, keep):
    """`tokenzip.apply` for a conftest POLICY_CASES entry, or a plain policy name ("none")."""
    return tokenzip.apply(model, case.split("-")[0], keep, **POLICY_CASES.get(case, {}))


def one_input(vlm: TinyVLM, text: str = "What is in the image ?") -> dict:
    return vlm.inputs([dummy_image(112, 112, 0)], vlm.prompt(text))


def mixed_batch(vlm: TinyVLM) -> dict:
    """Sample 0 with an image, sample 1 text only (left padding)."""
    return vlm.inputs([dummy_image(112, 112, 0)], [vlm.prompt(), vlm.prompt("What is a cat ?", images=0)])


def generate(vlm: TinyVLM, inputs: dict, steps: int, **kw):
    """Greedy generate of exactly `steps` tokens with logits; returns the generate output."""
    with torch.no_grad():
        return vlm.model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            suppress_tokens=_suppress(vlm.model),
            output_logits=True,
            return_dict_in_generate=True,
            **kw,
        )


def new_tokens(out, inputs: dict) -> torch.Tensor:
    return out.sequences[:, inputs["input_ids"].shape[1] :]


def cache_kwarg(model) -> str:
    """The name of the cache argument of the installed transformers (`cache` since 5.24)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


# ------------------------------------------------------------------------------------------ r02 prompt lookup
@pytest.mark.parametrize("case", ["fastv", "pool", "mustdrop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_lookup_equals_greedy_under_a_patch(family, case):
    vlm = model8(family)
    steps = 8
    # Prompt lookup must have had drafts rejected (the cache cropped) for the test to mean anything; whether a
    # tiny random model rejects one depends on the prompt, so the first prompt that makes it do so is used.
    for prompt in PROMPT_LOOKUP_PROMPTS:
        inputs = one_input(vlm, prompt)
        fed: list[int] = []

        def count(module, args, kwargs, fed=fed):
            fed.append(kwargs["input_ids"].shape[1])

        with apply_case(vlm.model, case, 0.5) as patch:
            greedy = generate(vlm, inputs, steps)
            handle = vlm.model.register_forward_pre_hook(count, with_kwargs=True)
            try:
                lookup = generate(vlm, inputs, steps, prompt_lookup_num_tokens=3)
            finally:
                handle.remove()
            with patch.replay():
                reference = uncached_logits(vlm.model, inputs, new_tokens(lookup, inputs))
        if max(fed[1:]) > 1 and sum(fed[1:]) > steps:  # drafts were verified and some were rejected
            break
    else:
        pytest.fail(f"no prompt made prompt lookup reject a draft on {family}/{case}: {PROMPT_LOOKUP_PROMPTS}")
    assert torch.equal(lookup.sequences, greedy.sequences)
    torch.testing.assert_close(torch.stack(lookup.logits, 1), reference, atol=ATOL, rtol=ATOL)


PROMPT_LOOKUP_PROMPTS = (
    "yes how yes how square red square blue ?",
    "red blue red square how yes blue red ?",
    "square square how blue yes red how yes ?",
)


# ------------------------------------------------------------------------------------------ r05 use_cache=False
@pytest.mark.parametrize("case", ["none", "fastv", "mustdrop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_without_cache_keep_one_equals_unpatched(family, case):
    vlm = model8(family)
    inputs = one_input(vlm)
    base = generate(vlm, inputs, 3, use_cache=False)
    with apply_case(vlm.model, case, 1.0):
        out = generate(vlm, inputs, 3, use_cache=False)
    assert torch.equal(out.sequences, base.sequences)
    assert torch.equal(torch.stack(out.logits, 1), torch.stack(base.logits, 1))


@pytest.mark.parametrize("case", ["fastv", "pool", "mustdrop", "holitom"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_without_cache_equals_cached_generation(family, case):
    vlm = model8(family)
    inputs = vlm.inputs(
        [dummy_image(112, 112, 0), dummy_image(112, 112, 1)], [vlm.prompt(), vlm.prompt("Describe this image")]
    )
    with apply_case(vlm.model, case, 0.5) as patch:
        cached = generate(vlm, inputs, 4)
        first = patch.stats.last
        uncached = generate(vlm, inputs, 4, use_cache=False)
        later = patch.stats.last
    assert torch.equal(uncached.sequences, cached.sequences)
    torch.testing.assert_close(torch.stack(uncached.logits, 1), torch.stack(cached.logits, 1), atol=ATOL, rtol=ATOL)
    # every cache-free step ran the first step's selections: the same visual tokens per layer
    assert [s.visual_per_layer for s in later.samples] == [s.visual_per_layer for s in first.samples]
    assert later.samples[0].visual_per_layer[-1] < later.samples[0].visual_in  # it really pruned


# ------------------------------------------------------------------------------------------ r06 continued cache
def _continue(vlm: TinyVLM, inputs: dict, extra: torch.Tensor, steps: int = 3):
    """Generate 3 tokens, then continue from the returned cache with `extra` text tokens appended."""
    first = generate(vlm, inputs, 3)
    ids = torch.cat([first.sequences, extra], 1)
    kw = {cache_kwarg(vlm.model): returned_cache(first)}
    second = generate(vlm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, steps, **kw)
    return first, ids, second


def _extra(vlm: TinyVLM) -> torch.Tensor:
    return vlm.processor.tokenizer(" what is the color ?", add_special_tokens=False, return_tensors="pt").input_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_continue_from_cache_keep_one_equals_unpatched(family):
    vlm = model8(family)
    inputs, extra = one_input(vlm), _extra(vlm)
    _, _, base = _continue(vlm, inputs, extra)
    for case in ("none", "fastv", "pool"):
        with apply_case(vlm.model, case, 1.0):
            _, _, out = _continue(vlm, inputs, extra)
        assert torch.equal(out.sequences, base.sequences), case
        assert torch.equal(torch.stack(out.logits, 1), torch.stack(base.logits, 1)), case


@pytest.mark.parametrize("case", ["fastv", "pool", "mustdrop", "holitom"])
@pytest.mark.parametrize("family", FAMILIES)
def test_continue_from_cache_equals_cache_free_replay(family, case):
    vlm = model8(family)
    inputs, extra = one_input(vlm), _extra(vlm)
    with apply_case(vlm.model, case, 0.5) as patch:
        first, ids, second = _continue(vlm, inputs, extra)
        cache = returned_cache(second)
        with patch.replay():  # the prompt's selections, recomputed on prompt + generated + extra + continuation
            full = extend_inputs(vlm.model, inputs, ids[:, inputs["input_ids"].shape[1] :])
            reference = uncached_logits(vlm.model, full, new_tokens(second, full))
    assert first.sequences.shape[1] < ids.shape[1] < second.sequences.shape[1]
    torch.testing.assert_close(torch.stack(second.logits, 1), reference, atol=ATOL, rtol=ATOL)
    eos = vlm.model.generation_config.eos_token_id
    if eos is not None:  # min_new_tokens suppresses EOS in generate
        reference = reference.clone()
        reference[..., torch.as_tensor(eos).flatten()] = float("-inf")
    assert torch.equal(greedy_tokens(vlm.model, reference), new_tokens(second, full))
    # the cache reports the sequence length it stands for (as the unpatched model's does), not its stored width
    assert cache.get_seq_length() == second.sequences.shape[1] - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_continue_from_a_stale_cache_or_with_images_is_refused(family):
    vlm = model8(family)
    inputs, extra = one_input(vlm), _extra(vlm)
    with apply_case(vlm.model, "pool", 0.5):
        first = generate(vlm, inputs, 2)
        ids = torch.cat([first.sequences, extra], 1)
        name = cache_kwarg(vlm.model)
        full = extend_inputs(vlm.model, inputs, ids[:, inputs["input_ids"].shape[1] :])
        with pytest.raises(UnsupportedInputError, match="image/video inputs arrived after prefill"):
            forward_with_hooks(vlm.model, full, [], **{name: returned_cache(first)})
        generate(vlm, inputs, 2)  # another prefill: the first cache's layout is gone
        with pytest.raises(UnsupportedInputError, match="not this patch's latest"):
            generate(
                vlm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 2, **{name: returned_cache(first)}
            )


# ------------------------------------------------------------------------------------------ r15 replay, mixed batch
@pytest.mark.parametrize("case", ["mustdrop", "fastv", "pool"])
@pytest.mark.parametrize("family", FAMILIES)
def test_replay_on_a_batch_with_a_text_only_sample(family, case):
    vlm = model8(family)
    inputs = mixed_batch(vlm)
    with apply_case(vlm.model, case, 0.5) as patch:
        out = generate(vlm, inputs, 3)
        assert patch.stats.last.samples[1].items == []
        with patch.replay():
            reference = uncached_logits(vlm.model, inputs, new_tokens(out, inputs))
    torch.testing.assert_close(torch.stack(out.logits, 1), reference, atol=ATOL, rtol=ATOL)


# ------------------------------------------------------------------------------------------ r16 labels
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_under_a_shortening_policy_are_refused(family):
    vlm = model8(family)
    inputs = one_input(vlm)
    labels = inputs["input_ids"]
    with torch.no_grad():
        base = vlm.model(**inputs, labels=labels).loss
    for case in ("none", "pool", "mustdrop"):
        with apply_case(vlm.model, case, 1.0), torch.no_grad():
            assert torch.equal(vlm.model(**inputs, labels=labels).loss, base), case
    for case in ("pool", "fastv", "mustdrop"):
        with apply_case(vlm.model, case, 0.5), torch.no_grad():
            with pytest.raises(UnsupportedInputError, match=r"labels=.*keep=1\.0"):
                vlm.model(**inputs, labels=labels)
            assert vlm.model(**inputs).logits.shape[1] < labels.shape[1]  # the patch still works afterwards


# ------------------------------------------------------------------------------------------ r17 deprecation warning
@pytest.mark.parametrize("family", FAMILIES)
def test_no_cache_name_deprecation_warning(family, monkeypatch):
    vlm = model8(family)
    inputs = one_input(vlm)
    messages: list[str] = []
    monkeypatch.setattr(hf_generic.logger, "warning_once", lambda msg, *a, **k: messages.append(str(msg)))
    with apply_case(vlm.model, "mustdrop", 0.5), torch.no_grad():
        vlm.model(**inputs, use_cache=False)
        vlm.model(**inputs)
        generate(vlm, inputs, 2)
    assert not [m for m in messages if "deprecated" in m], messages
