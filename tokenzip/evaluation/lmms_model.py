"""The lmms-eval model class: greedy generation under a tokenzip patch, with per-sample statistics.

    python -m lmms_eval --model tokenzip_llava_hf \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,policy=hiprune,keep=0.111,attn_implementation=sdpa \
        --tasks pope --batch_size 8 --output_path out --log_samples

`--model_args` keys: `pretrained` (hub id, directory or bundled name such as `synth-llava`), `policy`, `keep`,
`attn_implementation`, `dtype` (`auto`, `float32`, `float16`, `bfloat16`), `device_map`, `max_new_tokens`
(default when the task sets none), `agreement` (`auto`: on for the bundled tiny models; also generate with the
unpatched model and record its answers for the tasks' agreement metric), `stats_path` (where to write
`tokenzip_stats.jsonl`; default: lmms-eval's `--output_path` when given on the command line), and any policy option
(`alpha=0.1`, `compat=official`, ...). `policy=oracle` (the non-deployable reference selection) runs on
tokenzip's synthetic tasks only: it reads each document's ground truth (`tokenzip.synthetic.truth.doc_truth`).

Batches are left-padded; tokenzip's hooks make a batch of N give the same answers as N batches of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .. import apply
from ..assets import FAMILY_OF
from ..bench.checks import check_sample
from ..flops import sample_flops
from ..loading import load_vlm, model_family
from ..policies.oracle import ground_truth
from ..synthetic.truth import doc_truth
from . import reference
from .media import build_inputs, visual_kind

RESERVED = {
    "pretrained", "policy", "keep", "attn_implementation", "dtype", "device", "device_map",
    "batch_size", "max_batch_size",
}  # fmt: skip


class TokenzipLMMS(lmms):
    """A supported VLM under a tokenzip policy, as an lmms-eval 'simple' model."""

    is_simple = True
    family: str = ""

    def __init__(
        self,
        pretrained: str = "synth-llava",
        policy: str = "none",
        keep: float | int = 1.0,
        attn_implementation: str = "sdpa",
        dtype: str = "auto",
        device: str | None = None,
        device_map: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 16,
        agreement: bool | str = "auto",
        stats_path: str | None = None,
        **policy_options: Any,
    ) -> None:
        super().__init__()
        pretrained = str(pretrained)
        family = model_family(pretrained)
        if self.family and family != self.family:
            raise ValueError(
                f"{pretrained!r} is a {family!r} checkpoint but this lmms-eval model expects {self.family!r}; "
                f"use --model {MODEL_NAMES[family]}"
            )
        self.accelerator = _data_parallel()
        if self.accelerator is not None:
            if device_map is not None:
                raise ValueError(
                    "device_map splits one model over several devices and runs in ONE process; under `accelerate "
                    "launch --num_processes N` each process holds a whole copy: drop device_map or launch one process"
                )
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        if device is None:
            local = os.environ.get("LOCAL_RANK")
            device = f"cuda:{local or 0}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device) if device_map is None else None
        self.model, self.processor = load_vlm(
            pretrained, attn_implementation=attn_implementation, dtype=dtype, device=device, device_map=device_map
        )
        self.family = family
        self.pretrained = pretrained
        self.policy = str(policy)
        self.keep = keep
        self.policy_options = {k: v for k, v in policy_options.items() if k not in RESERVED}
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if agreement == "auto":
            agreement = pretrained in FAMILY_OF
        self.agreement = bool(agreement) and self.policy != "none"  # generate with the unpatched model too
        self.records_unpatched = bool(agreement)  # record unpatched answers for the agreement metric
        self.stats_path = stats_path or _output_path_from_argv()
        self.sample_stats: list[dict] = []
        reference.clear()
        # fail early on a bad policy / keep / option (the error names what is allowed)
        apply(self.model, self.policy, self.keep, **self.policy_options).remove()

    def configure(self, policy: str, keep: float | int, options: dict[str, Any], agreement: bool = False) -> None:
        """Switch policy / keep between evaluations without reloading the model (`tokenzip eval`). Recorded
        reference answers are kept; `agreement` regenerates them with the unpatched model."""
        apply(self.model, policy, keep, **options).remove()
        self.policy, self.keep, self.policy_options = str(policy), keep, dict(options)
        self.agreement = bool(agreement) and self.policy != "none"
        self.records_unpatched = self.policy == "none" or self.agreement
        self.sample_stats = []
        self._flushed = 0

    persistent = False  # keep the model after an evaluation (lmms-eval's clean() deletes it); set by the grid

    def clean(self) -> None:
        if not self.persistent:
            super().clean()

    # -- lmms-eval interface ------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device if self._device is not None else next(self.model.parameters()).device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError("tokenzip's lmms-eval models support generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError("tokenzip's lmms-eval models support single-round generate_until tasks only")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; requests are batched in order, per task and generation settings."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs, _, _, task, split = req.args
            groups.setdefault((task, split, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                answers = self._generate_chunk([requests[i] for i in chunk])
                for i, answer in zip(chunk, answers):
                    results[i] = answer
        self._flush_stats()
        return [r if r is not None else "" for r in results]

    # -- internals ----------------------------------------------------------------------------------------------
    def _generate_chunk(self, chunk: list[Instance]) -> list[str]:
        contexts, docs, visuals, meta = [], [], [], []
        for req in chunk:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            contexts.append(context)
            docs.append(doc)
            visuals.append(list(doc_to_visual(doc) or []))
            meta.append((task, doc_id))
        gen_kwargs = dict(chunk[0].args[1])
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        generation = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "do_sample": bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 0)) > 0,
        }
        if generation["do_sample"]:
            generation["temperature"] = float(gen_kwargs["temperature"])
        prompts = [self._prompt(c, v) for c, v in zip(contexts, visuals)]
        inputs = build_inputs(self.model, self.processor, self.family, prompts, visuals)
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        prompt_lengths = inputs["attention_mask"].sum(-1).tolist()

        unpatched = None
        if self.agreement:
            unpatched, _, _ = self._run("none", 1.0, {}, inputs, generation, until, prompt_lengths)
        answers, record, seconds = self._run(
            self.policy, self.keep, self.policy_options, inputs, generation, until, prompt_lengths, docs
        )
        if self.records_unpatched and unpatched is None:
            unpatched = answers  # policy none: the model is the unpatched one
        flops = sample_flops(self.model.config, record, prompt_lengths) if record is not None else None
        for b, (doc, (task, doc_id)) in enumerate(zip(docs, meta)):
            uid = str(doc.get("uid", f"{task}/{doc_id}")) if isinstance(doc, dict) else f"{task}/{doc_id}"
            if unpatched is not None:
                reference.record(uid, unpatched[b])
            row: dict[str, Any] = {
                "task": task,
                "doc_id": doc_id,
                "uid": uid,
                "policy": self.policy,
                "keep": self.keep,
                "answer": answers[b],
                "prompt_tokens": int(prompt_lengths[b]),
                "batch_seconds": seconds,
            }
            if unpatched is not None:
                row["unpatched_answer"] = unpatched[b]
            if record is not None:
                s = record.samples[b]
                row.update(
                    visual_in=s.visual_in,
                    visual_llm_input=s.visual_llm_input,  # real kept tokens plus zero rows, as bench counts
                    visual_layer_mean=s.visual_mean,
                    visual_budget=check_sample(self.keep, s).budget,  # layer-average budget (tokenzip.bench.checks)
                    visual_items=len(s.items),
                    prefill_flops=flops[b]["prefill"],
                    prefill_flops_unpruned=flops[b]["prefill_unpruned"],
                    flops_ratio=flops[b]["ratio"],
                )
            self.sample_stats.append(row)
        return answers

    def _run(self, policy, keep, options, inputs, generation, until, prompt_lengths, docs=None):
        """Generate under `policy`; returns (answers, the prefill record, seconds). Policy `oracle` reads the
        ground truth of `docs` (tokenzip's synthetic documents, `tokenzip.synthetic.truth.doc_truth`)."""
        truth = contextlib.nullcontext()
        if str(policy).lower() == "oracle":
            truth = ground_truth([doc_truth(doc) for doc in docs or []])
        patch = apply(self.model, policy, keep, **options)
        try:
            start = time.perf_counter()
            with torch.inference_mode(), truth:
                out = self.model.generate(**inputs, **generation, pad_token_id=self._pad_id())
            seconds = time.perf_counter() - start
            record = _prefill_record(patch)
        finally:
            patch.remove()
        width = inputs["input_ids"].shape[1]
        texts = self.processor.batch_decode(out[:, width:], skip_special_tokens=True)
        return [_cut(t, until) for t in texts], record, seconds

    def _pad_id(self) -> int:
        tok = self.processor.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _prompt(self, context: str, visuals: list) -> str:
        content: list[dict] = []
        for v in visuals:
            content.append({"type": visual_kind(v)})
        text = context.replace("<image>", "").strip() if visuals else context
        content.append({"type": "text", "text": text})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _flush_stats(self) -> None:
        if not self.stats_path or not self.sample_stats:
            return
        where = Path(self.stats_path)
        where.mkdir(parents=True, exist_ok=True)
        name = "tokenzip_stats.jsonl" if self._world_size == 1 else f"tokenzip_stats_rank{self._rank}.jsonl"
        with open(where / name, "a") as f:
            for row in self.sample_stats[self._flushed :]:
                f.write(json.dumps(row) + "\n")
        self._flushed = len(self.sample_stats)

    _flushed = 0


def _data_parallel():
    """The `accelerate.Accelerator` of a data-parallel launch (`accelerate launch --num_processes N`, N > 1), else
    None. Each process then holds a whole patched copy of the model and lmms-eval gives it every N-th request
    (rank = process index); results are gathered by lmms-eval. On machines without CUDA the processes talk over
    gloo (CPU data parallelism: launch with `--multi_gpu` and ACCELERATE_USE_CPU=1, as the tests do)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    return accelerator if accelerator.num_processes > 1 else None


def _prefill_record(patch):
    """The record of the prefill of the last generate call (decode steps are not recorded)."""
    return patch.stats.last


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text.strip()


def _output_path_from_argv() -> str | None:
    """lmms-eval's `--output_path` when the model runs under its CLI (the model is not told otherwise)."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg == "--output_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


class TokenzipLlava(TokenzipLMMS):
    family = "llava"


class TokenzipQwen2_5_VL(TokenzipLMMS):
    family = "qwen2_5_vl"


class TokenzipLlavaOnevision(TokenzipLMMS):
    family = "llava_onevision"


class TokenzipQwen2VL(TokenzipLMMS):
    family = "qwen2_vl"


class TokenzipLlavaNext(TokenzipLMMS):
    family = "llava_next"


class TokenzipQwen3VL(TokenzipLMMS):
    family = "qwen3_vl"


CLASSES = {
    "llava": TokenzipLlava,
    "qwen2_5_vl": TokenzipQwen2_5_VL,
    "llava_onevision": TokenzipLlavaOnevision,
    "qwen2_vl": TokenzipQwen2VL,
    "llava_next": TokenzipLlavaNext,
    "qwen3_vl": TokenzipQwen3VL,
}
MODEL_NAMES = {
    "llava": "tokenzip_llava_hf",
    "qwen2_5_vl": "tokenzip_qwen2_5_vl",
    "llava_onevision": "tokenzip_llava_onevision",
    "qwen2_vl": "tokenzip_qwen2_vl",
    "llava_next": "tokenzip_llava_next",
    "qwen3_vl": "tokenzip_qwen3_vl",
}
