"""The hook runtime that drives policies on a model. One job per module:

runtime.py        install / remove the hooks of one patch and route each hook to its stage
config.py         PatchConfig: the frozen per-patch configuration every stage receives; the plan check
hooks.py          hook objects that survive deepcopy, the feature-function wrapper, timing
steps.py          telling a prefill from a decode step (and a cache-free generate's repeated prefill)
feature_calls.py  recording a get_image_features / get_video_features call (shapes, signals, FLOP workload)
vision_stages.py  vision signals, the vision-tower stage, the projector-input stage
vision.py         padding / scattering tower rows around a vision stage
prompt_items.py   matching a prefill's feature calls to the items of its prompt
llm_input.py      the pre-LLM stage: rebuilding the LLM input and its layout
llm_stage.py      in-LLM stages, LLM signals, per-layer arguments in prefill
decode.py         decode-stage KV edits, decode-step masks / positions, their replay as masks
cache.py          the KV cache of a compressed prefill: reading, tagging, gathering
layout.py         Layout: which token sits in which slot of a left-padded batch
compose.py        composing a sample's kept tokens from selections
masks.py          2-D / 4-D attention masks per attention backend
state.py          per-forward state, the decisions of a prefill (replay), the statistics records
recording.py      building a prefill's statistics record
summary.py        per-sample summaries and the printed table of a record
accounting.py     FLOP counting of what the policy itself computes
"""
