#!/usr/bin/env bash
# Score tokenzip policies with lmms-eval 0.7.3 on the real 7B checkpoints (needs CUDA GPUs; see README.md here).
#
#   bash benchmarks/gpu/run_all.sh                          # everything, one GPU
#   NUM_GPUS=8 bash benchmarks/gpu/run_all.sh               # data-parallel over 8 GPUs (accelerate)
#   DRY_RUN=1 bash benchmarks/gpu/run_all.sh                # print the commands only
#   LIMIT=20 MODELS=llava-1.5-7b bash benchmarks/gpu/run_all.sh   # smoke test: 20 samples per task
#
# One lmms-eval run per model x policy x keep x task, written to $OUT/<model>/<policy>-<keep>/<task>/.
# A run whose directory already holds an lmms-eval results json is skipped, so the script resumes.
# A failed run is logged and the loop goes on; the failures are listed at the end (exit status 1).
set -euo pipefail

NUM_GPUS="${NUM_GPUS:-1}"
ATTN="${ATTN:-flash_attention_2}"               # or sdpa
LIMIT="${LIMIT:-}"                              # lmms-eval --limit (samples per task); empty = full sets
OUT="${OUT:-results${LIMIT:+-limit$LIMIT}}"     # smoke runs go to their own folder, never mixed with full ones
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
MODELS="${MODELS:-llava-1.5-7b qwen2.5-vl-7b llava-onevision-7b qwen2-vl-7b}"
KEEPS="${KEEPS:-0.111 0.222 0.333}"
IMAGE_POLICIES="${IMAGE_POLICIES:-hiprune holov visiondrop mustdrop atp holitom fastv pool random visionzip divprune pdrop dart}"
VIDEO_POLICIES="${VIDEO_POLICIES:-holitom fastv pool random}"
IMAGE_TASKS="${IMAGE_TASKS:-gqa mmbench_en_dev mme pope scienceqa_img textvqa_val}"
VIDEO_TASKS="${VIDEO_TASKS:-videomme mvbench}"
# 1 = also the papers' own settings: HoloV with compat=official on Qwen2.5-VL (its Table 6 ran the official code),
# HoliTom's rho presets 0.10/0.15/0.20/0.25 on OneVision videos, with the inner merge (keep = 0.821 rho, rho set
# explicitly) and without it ("w/o M": inner=False, keep = rho), as in HoliTom's table; DART's 64/128/192 settings
# on LLaVA-1.5-7B (4 + 8T tokens from layer 2 = layer averages of 100/160/220 tokens).
PAPER_SETTINGS="${PAPER_SETTINGS:-1}"
EXTRA_ARGS="${EXTRA_ARGS:-}"                    # key=value[,key=value] appended to every --model_args
VIDEO_ARGS="${VIDEO_ARGS:-}"                    # appended for video tasks only

if (( NUM_GPUS > 1 )); then
    LAUNCH=(accelerate launch --num_processes "$NUM_GPUS" -m lmms_eval)
else
    LAUNCH=("$PYTHON" -m lmms_eval)
fi

# short name -> "lmms-eval model name|hub id|video-capable"
model_info() {
    case "$1" in
        llava-1.5-7b)       echo "tokenzip_llava_hf|llava-hf/llava-1.5-7b-hf|0" ;;
        qwen2.5-vl-7b)      echo "tokenzip_qwen2_5_vl|Qwen/Qwen2.5-VL-7B-Instruct|1" ;;
        qwen2-vl-7b)        echo "tokenzip_qwen2_vl|Qwen/Qwen2-VL-7B-Instruct|1" ;;
        llava-onevision-7b) echo "tokenzip_llava_onevision|llava-hf/llava-onevision-qwen2-7b-ov-hf|1" ;;
        *) echo "unknown model '$1' (llava-1.5-7b, qwen2.5-vl-7b, llava-onevision-7b, qwen2-vl-7b)" >&2; return 1 ;;
    esac
}

# lmms-eval writes <output_path>/<model name>/<date>_results.json once a run completes
# (task extras such as MMBench's submissions/ are not results files).
has_results() {
    [[ -d "$1" ]] || return 1
    [[ -n "$(find "$1" -path '*/submissions' -prune -o -type f \
        \( -name '[0-9]*_results.json' -o -name 'results.json' \) -print -quit 2>/dev/null)" ]]
}

for short in $MODELS; do model_info "$short" > /dev/null; done   # fail early on a typo

planned=0
skipped=0
failed=()

# run_one <model short> <tag> <task> <policy/keep/option args, comma-separated>
run_one() {
    local short="$1" tag="$2" task="$3" pargs="$4"
    local info lmms_model hub video dir margs
    info="$(model_info "$short")"
    IFS='|' read -r lmms_model hub video <<< "$info"
    dir="$OUT/$short/$tag/$task"
    margs="pretrained=$hub,$pargs,attn_implementation=$ATTN"
    [[ -n "$EXTRA_ARGS" ]] && margs+=",$EXTRA_ARGS"
    [[ " $VIDEO_TASKS " == *" $task "* && -n "$VIDEO_ARGS" ]] && margs+=",$VIDEO_ARGS"
    planned=$((planned + 1))
    if has_results "$dir"; then
        skipped=$((skipped + 1))
        echo "skip (results exist): $dir" >&2
        return 0
    fi
    local cmd=("${LAUNCH[@]}" --model "$lmms_model" --model_args "$margs" --tasks "$task"
               --batch_size 1 --output_path "$dir" --log_samples)
    [[ -n "$LIMIT" ]] && cmd+=(--limit "$LIMIT")
    if [[ "$DRY_RUN" == 1 ]]; then
        local arg line=""
        for arg in "${cmd[@]}"; do   # quote only what the shell would need quoted
            if [[ "$arg" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then line+="$arg "; else line+="$(printf '%q' "$arg") "; fi
        done
        echo "${line% }"
        return 0
    fi
    mkdir -p "$dir"
    echo "=== $dir" >&2
    if ! "${cmd[@]}" 2>&1 | tee "$dir/run.log"; then
        failed+=("$dir")
        echo "FAILED: $dir (log: $dir/run.log)" >&2
    fi
}

for short in $MODELS; do
    IFS='|' read -r _ _ video <<< "$(model_info "$short")"
    tasks="$IMAGE_TASKS"
    [[ "$video" == 1 ]] && tasks+=" $VIDEO_TASKS"
    for task in $tasks; do
        if [[ " $VIDEO_TASKS " == *" $task "* ]]; then policies="$VIDEO_POLICIES"; else policies="$IMAGE_POLICIES"; fi
        run_one "$short" none "$task" "policy=none"
        for policy in $policies; do
            for keep in $KEEPS; do
                # PyramidDrop's official stages (L/4, L/2, 3L/4) keep every token for the first quarter of the
                # layers: a layer average below about a quarter is refused (BudgetError), so it is not planned.
                if [[ "$policy" == pdrop ]] && awk "BEGIN { exit !($keep < 0.26 && $keep <= 1) }"; then
                    echo "skip (below PyramidDrop's floor with its official layers): $short pdrop $keep" >&2
                    continue
                fi
                run_one "$short" "$policy-$keep" "$task" "policy=$policy,keep=$keep"
            done
        done
        if [[ "$PAPER_SETTINGS" == 1 ]]; then
            if [[ "$short" == qwen2.5-vl-7b && " $IMAGE_TASKS " == *" $task "* ]]; then
                for keep in $KEEPS; do
                    run_one "$short" "holov-official-$keep" "$task" "policy=holov,keep=$keep,compat=official"
                done
            fi
            if [[ "$short" == llava-1.5-7b ]]; then
                for keep in 100 160 220; do
                    run_one "$short" "dart-official-$keep" "$task" "policy=dart,keep=$keep"
                done
            fi
            if [[ "$short" == llava-onevision-7b && " $VIDEO_TASKS " == *" $task "* ]]; then
                for pair in 0.082:0.10 0.123:0.15 0.164:0.20 0.205:0.25; do   # keep:rho, with the inner merge
                    run_one "$short" "holitom-rho${pair#*:}" "$task" "policy=holitom,keep=${pair%%:*},rho=${pair#*:}"
                done
                for rho in 0.10 0.15 0.20 0.25; do                               # "w/o M": inner=False, keep = rho
                    run_one "$short" "holitom-noM-rho$rho" "$task" "policy=holitom,keep=$rho,inner=False"
                done
            fi
        fi
    done
done

echo "# $planned runs planned, $skipped skipped (results exist), ${#failed[@]} failed; output under $OUT/" >&2
if (( ${#failed[@]} > 0 )); then
    printf '#   failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
