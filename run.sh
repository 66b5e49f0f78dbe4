#!/usr/bin/env bash
# Reproduce the paper's experiments for the five tasks with the authors' hyper-parameters
# (their run.sh; the same values are in utils/tasks.py):
#   finetune   full fine-tuning of GPT-2 per task (train.py), then evaluate.py -> GPT2_result/
#   adapter    residual adapters + task embeddings per task on the frozen GPT-2 (train.py
#              --adapter_bottleneck B); for mt, summarization and dialogue first sentence-level
#              knowledge distillation from the task's fine-tuned GPT-2 (sentence_distiller.py, then
#              train.py --distillation), then evaluate.py -> adapter_result/
#   combine    all adapter checkpoints into one Versatile Language Model (combine_all.py) -> VLM
#   vlm        every task of the combined model (evaluate_vlm.py --task all) -> VLM_result/
#   multitask  all tasks' adapters trained together (train_vlm.py) and evaluated -> multitask_result/
# and finally collects every metric into RESULTS/summary.md, summary.csv and val_loss.png
# (python -m engines.report).
#
# The full run needs the datasets (data/prepare.py) and a GPU: days of training in all.
# --smoke runs the same pipeline in minutes on CPU: a small random GPT-2, the shipped samples
# (data/samples, cut to a few records), one epoch, short decoding.
#
# Usage: bash run.sh [options]
#   --dry-run               print every command, run nothing
#   --stages LIST           comma-separated stages to run (default: all of
#                           finetune,adapter,combine,vlm,multitask)
#   --skip STAGE            leave a stage out (repeatable)
#   --tasks LIST            comma-separated tasks (default: dialogue,qa,mt,summarization,nlg)
#   --model NAME|DIR        GPT-2 to start from (default: gpt2)
#   --data DIR              root of the datasets (default: data, i.e. data/NMT/data_en_ge.json, ...)
#   --device DEV            cpu, cuda, cuda:N (default: the scripts' own, cuda if available)
#   --out DIR               runs go to DIR/runs, results to DIR/results
#                           (default: runs/repro and results)
#   --no-distillation       train every adapter on the gold targets
#   --smoke                 tiny pipeline on the samples (default --out runs/smoke); it starts
#                           afresh, deleting OUT/runs, OUT/results and OUT/data first
# A training run whose folder already holds a finished checkpoint (vlm_config.json) is not
# repeated, so an interrupted reproduction continues where it stopped; delete the folder to retrain.
# PYTHON (environment) names the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
export TOKENIZERS_PARALLELISM=false

ALL_STAGES="finetune,adapter,combine,vlm,multitask"
ALL_TASKS="dialogue,qa,mt,summarization,nlg"
STAGES=$ALL_STAGES
SKIP=()
TASK_LIST=$ALL_TASKS
MODEL=gpt2
DATA=data
DEVICE=""
OUT=""
DRY_RUN=0
SMOKE=0
DISTILL=1

die() { echo "run.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY_RUN=1; shift ;;
        --smoke) SMOKE=1; shift ;;
        --no-distillation) DISTILL=0; shift ;;
        --stages) need_value "$@"; STAGES=$2; shift 2 ;;
        --skip) need_value "$@"; SKIP+=("$2"); shift 2 ;;
        --tasks) need_value "$@"; TASK_LIST=$2; shift 2 ;;
        --model) need_value "$@"; MODEL=$2; shift 2 ;;
        --data) need_value "$@"; DATA=$2; shift 2 ;;
        --device) need_value "$@"; DEVICE=$2; shift 2 ;;
        --out) need_value "$@"; OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see bash run.sh --help)" ;;
    esac
done

# ---------------------------------------------------------------- checks of the choices
in_list() { [[ ",$2," == *",$1,"* ]]; }
IFS=, read -r -a TASKS <<< "$TASK_LIST"
[[ ${#TASKS[@]} -gt 0 ]] || die "--tasks: empty list"
for t in "${TASKS[@]}"; do in_list "$t" "$ALL_TASKS" || die "--tasks: unknown task '$t' (choose from $ALL_TASKS)"; done
IFS=, read -r -a WANTED <<< "$STAGES"
for s in "${WANTED[@]}" "${SKIP[@]+"${SKIP[@]}"}"; do
    in_list "$s" "$ALL_STAGES" || die "unknown stage '$s' (choose from $ALL_STAGES)"
done
stage_on() {
    in_list "$1" "$STAGES" || return 1
    local s
    for s in "${SKIP[@]+"${SKIP[@]}"}"; do [[ $s == "$1" ]] && return 1; done
    return 0
}

if [[ -n $OUT ]]; then RUNS=$OUT/runs; RESULTS=$OUT/results
elif [[ $SMOKE == 1 ]]; then OUT=runs/smoke; RUNS=$OUT/runs; RESULTS=$OUT/results
else RUNS=runs/repro; RESULTS=results
fi
CACHE=$RUNS/dataset_cache  # tokenization caches stay beside the runs, not in the repo root
DEVICE_FLAG=()
[[ -n $DEVICE ]] && DEVICE_FLAG=(--device "$DEVICE")

# Print a command, then run it (unless --dry-run).
run() {
    echo "+ $(printf '%q ' "$@")"
    [[ $DRY_RUN == 1 ]] || "$@"
}

# A training run is done when its folder holds the final checkpoint (written after the last epoch).
done_already() {
    if [[ $DRY_RUN == 0 && -f $1/vlm_config.json ]]; then
        echo "== $1 holds a finished checkpoint; not retrained (delete it to retrain)"
        return 0
    fi
    return 1
}

# ---------------------------------------------------------------- hyper-parameters
# The authors' run.sh, also in utils/tasks.py (tests/test_run_sh.py checks that they agree):
# "batch accumulation epochs lr" for full fine-tuning and for adapters; adapter bottleneck;
# max_history; whether the adapters learn from distilled targets.
full_hyper() {
    case $1 in
        dialogue) echo "8 2 3 6.25e-5" ;;
        qa) echo "2 8 3 6.25e-5" ;;
        mt) echo "8 4 8 6.25e-5" ;;
        summarization) echo "4 8 10 8e-5" ;;
        nlg) echo "8 4 10 5e-5" ;;
    esac
}
adapter_hyper() {
    case $1 in
        dialogue) echo "8 2 3 1e-3" ;;
        qa) echo "2 8 5 5e-4" ;;
        mt) echo "8 4 8 5e-4" ;;
        # the authors' distilled summarization run trains 5 epochs instead of 10
        summarization) if [[ $DISTILL == 1 ]]; then echo "4 8 5 5e-4"; else echo "4 8 10 5e-4"; fi ;;
        nlg) echo "8 4 10 5e-3" ;;
    esac
}
bottleneck() {
    case $1 in dialogue) echo 100 ;; qa) echo 300 ;; mt) echo 300 ;; summarization) echo 100 ;; nlg) echo 10 ;; esac
}
max_history() { if [[ $1 == qa ]]; then echo 1; else echo 2; fi; }
distilled() { [[ $DISTILL == 1 ]] && in_list "$1" "mt,summarization,dialogue"; }
dataset_default() {
    case $1 in
        dialogue) echo persona/data.json ;; qa) echo CoQA/data.json ;; mt) echo NMT/data_en_ge.json ;;
        summarization) echo CNNDAILY/data.json ;; nlg) echo NLG/data.json ;;
    esac
}

declare -A DATASET
for t in "${TASKS[@]}"; do DATASET[$t]=$DATA/$(dataset_default "$t"); done
DECODE=()            # extra decoding flags of evaluate.py / evaluate_vlm.py
MULTI_HYPER=(--gradient_accumulation_steps 16 --train_batch_size 1 --valid_batch_size 1 --n_epochs 3)

# ---------------------------------------------------------------- smoke mode
# Same commands, small everything: a 2-layer 64-wide random GPT-2, the samples cut to a few
# records per split (copies under OUT/data), 1 epoch, batch 4,
# outputs of at most 20 tokens. Scores are meaningless; it checks that the pipeline runs.
smoke_setup() {
    run rm -rf "$RUNS" "$RESULTS" "$OUT/data"
    MODEL=$RUNS/tiny-gpt2
    run "$PYTHON" -m models.tiny_gpt2 "$MODEL" --n_layer 2 --n_embd 64 --n_head 2
    local t pairs=()
    for t in "${TASKS[@]}"; do
        DATASET[$t]=$OUT/data/$t.json
        pairs+=("data/samples/$t.json" "${DATASET[$t]}")
    done
    run "$PYTHON" -c "$SMOKE_CUT" "${pairs[@]}"
    DECODE=(--max_length 20 --batch_size 32)
    MULTI_HYPER=(--gradient_accumulation_steps 1 --train_batch_size 4 --valid_batch_size 8 --n_epochs 1)
}
# Keeps 8 records of the training split and 4 of every other split; of dialogue and qa (whose
# records are whole conversations, each turn a training example) 2 and 1 records of 4 turns.
SMOKE_CUT='import json, sys
from utils.io import write_json
def cut(split, records):
    if records and "utterances" in records[0]:
        return [dict(r, utterances=r["utterances"][:4]) for r in records[:2 if split == "train" else 1]]
    return records[:8 if split == "train" else 4]
for source, target in zip(sys.argv[1::2], sys.argv[2::2]):
    data = json.load(open(source, encoding="utf-8"))
    write_json(target, {split: cut(split, records) for split, records in data.items()})'

# train.py flags for a task: "batch accumulation epochs lr" -> flags (smoke: 1 epoch, batch 4)
hyper_flags() {
    local batch=$1 accumulation=$2 epochs=$3 lr=$4
    if [[ $SMOKE == 1 ]]; then batch=4; accumulation=1; epochs=1; fi
    echo "--train_batch_size $batch --valid_batch_size $batch --gradient_accumulation_steps $accumulation --n_epochs $epochs --lr $lr"
}

evaluate_single() {  # task checkpoint results_dir
    run "$PYTHON" evaluate.py --task "$1" --no_sample --max_history "$(max_history "$1")" \
        --dataset_path "${DATASET[$1]}" --dataset_cache "$CACHE" --model_checkpoint "$2" \
        --output_dir "$3" "${DECODE[@]+"${DECODE[@]}"}" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
}

# ---------------------------------------------------------------- stages
stage_finetune() {
    local t dir
    for t in "${TASKS[@]}"; do
        echo "== finetune: $t (full fine-tuning of GPT-2)"
        dir=$RUNS/${t}_full
        # shellcheck disable=SC2046  # hyper_flags prints separate words on purpose
        done_already "$dir" || run "$PYTHON" train.py --task "$t" --dataset_path "${DATASET[$t]}" \
            --dataset_cache "$CACHE" --model_checkpoint "$MODEL" --max_history "$(max_history "$t")" \
            $(hyper_flags $(full_hyper "$t")) --output_dir "$dir" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
        evaluate_single "$t" "$dir" "$RESULTS/GPT2_result"
    done
}

stage_adapter() {
    local t dir teacher train_data distill_flag
    for t in "${TASKS[@]}"; do
        echo "== adapter: $t (bottleneck $(bottleneck "$t"), frozen GPT-2)"
        dir=$RUNS/${t}_adapter
        train_data=${DATASET[$t]}
        distill_flag=()
        if ! done_already "$dir"; then
            if distilled "$t"; then
                # sentence-level knowledge distillation: the fine-tuned GPT-2 decodes the training
                # targets greedily; the adapters then learn from those instead of the gold ones
                teacher=$RUNS/${t}_full
                [[ $DRY_RUN == 1 || -f $teacher/vlm_config.json ]] || \
                    die "distillation of $t needs the fine-tuned GPT-2 in $teacher (stage finetune) or --no-distillation"
                run "$PYTHON" sentence_distiller.py --task "$t" --no_sample --max_history "$(max_history "$t")" \
                    --model_checkpoint "$teacher" --dataset_path "${DATASET[$t]}" --dataset_cache "$CACHE" \
                    --output "$RUNS/distilled/$t.json" "${DECODE[@]+"${DECODE[@]}"}" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
                # the distilled copy (train split with distilled targets, other splits unchanged)
                train_data=$RUNS/distilled/$t.json
                distill_flag=(--distillation)
            fi
            # shellcheck disable=SC2046
            run "$PYTHON" train.py --task "$t" --dataset_path "$train_data" --dataset_cache "$CACHE" \
                --model_checkpoint "$MODEL" --max_history "$(max_history "$t")" \
                --adapter_bottleneck "$(bottleneck "$t")" $(hyper_flags $(adapter_hyper "$t")) \
                "${distill_flag[@]+"${distill_flag[@]}"}" --output_dir "$dir" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
        fi
        evaluate_single "$t" "$dir" "$RESULTS/adapter_result"
    done
}

stage_combine() {
    local t ckpts=()
    for t in "${TASKS[@]}"; do ckpts+=("$RUNS/${t}_adapter"); done
    echo "== combine: ${TASKS[*]} into one model"
    run rm -rf "$RUNS/VLM"  # combine_all.py writes into a new folder; the combination is cheap to redo
    run "$PYTHON" combine_all.py "${ckpts[@]}" --output_dir "$RUNS/VLM"
}

dataset_pairs() {
    local t
    for t in "${TASKS[@]}"; do printf '%s\n' "$t=${DATASET[$t]}"; done
}

stage_vlm() {
    local pairs
    mapfile -t pairs < <(dataset_pairs)
    echo "== vlm: every task of the combined model, in shared batches"
    run "$PYTHON" evaluate_vlm.py --task all --no_sample --model_checkpoint "$RUNS/VLM" \
        --dataset_paths "${pairs[@]}" --dataset_cache "$CACHE" --output_dir "$RESULTS/VLM_result" \
        "${DECODE[@]+"${DECODE[@]}"}" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
}

stage_multitask() {
    local pairs dir=$RUNS/multitask
    mapfile -t pairs < <(dataset_pairs)
    echo "== multitask: all tasks' adapters trained together"
    done_already "$dir" || run "$PYTHON" train_vlm.py --tasks "${TASKS[@]}" --dataset_paths "${pairs[@]}" \
        --dataset_cache "$CACHE" --model_checkpoint "$MODEL" "${MULTI_HYPER[@]}" --output_dir "$dir" \
        "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
    run "$PYTHON" evaluate_vlm.py --task all --no_sample --model_checkpoint "$dir" \
        --dataset_paths "${pairs[@]}" --dataset_cache "$CACHE" --output_dir "$RESULTS/multitask_result" \
        "${DECODE[@]+"${DECODE[@]}"}" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
}

# ---------------------------------------------------------------- main
# One function, read whole before it starts: editing run.sh during a long run cannot derail it.
main() {
    local stage ran=0
    for stage in finetune adapter combine vlm multitask; do stage_on "$stage" && ran=1; done
    [[ $ran == 1 ]] || die "no stage left to run"
    if [[ $SMOKE == 1 ]]; then smoke_setup; fi
    for stage in finetune adapter combine vlm multitask; do
        if stage_on "$stage"; then "stage_$stage"; fi
    done
    echo "== summary"
    run "$PYTHON" -m engines.report "$RESULTS" --runs "$RUNS" --tasks "$(IFS=,; echo "${TASKS[*]}")"
}
main
exit
