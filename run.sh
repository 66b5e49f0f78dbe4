#!/usr/bin/env bash
# Reproduce the paper's experiments for the five tasks with the authors' hyper-parameters
# (their run.sh; the same values are in tasks/table.py):
#   finetune   full fine-tuning of GPT-2 per task (train.py), then evaluate.py -> GPT2_result/
#   adapter    residual adapters + task embeddings per task on the frozen GPT-2 (train.py
#              --adapter_bottleneck B); for mt, summarization and dialogue first sentence-level
#              knowledge distillation from the task's fine-tuned GPT-2 (sentence_distiller.py, then
#              train.py --distillation), then evaluate.py -> adapter_result/
#   combine    all adapter checkpoints into one Versatile Language Model (combine_all.py) -> VLM
#   vlm        every task of the combined model (evaluate_vlm.py --task all) -> VLM_result/
#   multitask  all tasks' adapters trained together (train_vlm.py) and evaluated -> multitask_result/
# Two more stages are not run by default (--mini runs them):
#   adapter_gold  for the tasks whose adapters learn from distilled targets, adapters on the gold
#                 targets as well -> adapter_gold_result/ (the distillation ablation)
#   emb_only      only the task embeddings train (train.py --emb_only) -> emb_only_result/
# and one more that only --stages names:
#   methods       every per-task method (--methods) on each task with one shared budget: the
#                 task's adapter epochs, batches and learning rate (--mini: 3 epochs), train.py
#                 --method M -> methods_result/<M>/, collected into RESULTS/methods.md, methods.csv
#                 and methods.png (python -m engines.methods_report)
#   user_tasks    the NeMo p-tuning article's study on the --model backbone (python -m
#                 engines.prompt_study): the user tasks of data/tasks/nemo_article.json on the
#                 shipped samples (data/samples/sentiment, intent_and_slot), zero- and 3-shot
#                 baselines, the train-fraction sweep and both tasks learned one after the other
#                 into one VLM -> RESULTS/prompt_study/study.md, study.csv, study.png
# and finally collects every metric into RESULTS/summary.md, summary.csv and val_loss.png
# (python -m engines.report).
#
# The full run needs the datasets (data/prepare.py) and a GPU: days of training in all.
# --smoke runs the same pipeline in minutes on CPU: a small random GPT-2, the shipped samples
# (data/samples, cut to a few records), one epoch, short decoding.
# --mini is the paper's comparison in miniature, under an hour on a 2-core CPU: every stage, on
# the shipped stand-in backbone (data/gpt2-stand-in, a 4-layer GPT-2 pretrained here) and the
# whole shipped samples (data/samples), with the authors' epochs and learning rates but batches of
# 8 without accumulation (a few hundred examples give a few dozen steps an epoch). Its runs go to
# runs/mini, its tables to results/mini; an interrupted --mini continues where it stopped.
#
# Usage: bash run.sh [options]
#   --dry-run               print every command, run nothing
#   --stages LIST           comma-separated stages to run (default: finetune,adapter,combine,
#                           vlm,multitask; --mini: also adapter_gold,emb_only)
#   --skip STAGE            leave a stage out (repeatable)
#   --tasks LIST            comma-separated tasks (default: dialogue,qa,mt,summarization,nlg)
#   --model NAME|DIR        GPT-2 to start from (default: gpt2)
#   --data DIR              root of the datasets (default: data, i.e. data/NMT/data_en_ge.json, ...)
#   --device DEV            cpu, cuda, cuda:N (default: the scripts' own, cuda if available)
#   --out DIR               runs go to DIR/runs, results to DIR/results
#                           (default: runs/repro and results)
#   --no-distillation       train every adapter on the gold targets
#   --methods LIST          comma-separated methods of the methods stage (default: all of
#                           models/methods: adapter,houlsby,...,unipelt; composed ones as prefix+ln)
#   --smoke                 tiny pipeline on the samples (default --out runs/smoke); it starts
#                           afresh, deleting OUT/runs, OUT/results and OUT/data first
#   --mini                  the comparison in miniature on the stand-in backbone and the samples
#                           (default --out: runs to runs/mini, results to results/mini)
# A training run whose folder already holds a finished checkpoint (vlm_config.json) is not
# repeated, so an interrupted reproduction continues where it stopped; delete the folder to retrain.
# PYTHON (environment) names the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
export TOKENIZERS_PARALLELISM=false

ALL_STAGES="finetune,adapter,adapter_gold,emb_only,combine,vlm,multitask,methods,user_tasks"
DEFAULT_STAGES="finetune,adapter,combine,vlm,multitask"
MINI_STAGES="finetune,adapter,adapter_gold,emb_only,combine,vlm,multitask"
ALL_METHODS="adapter,houlsby,parallel,lora,prefix,prompt,ptuning,ln,adapterbias,compacter,krona,unipelt"
METHOD_LIST=$ALL_METHODS
ALL_TASKS="dialogue,qa,mt,summarization,nlg"
STAGES=
SKIP=()
TASK_LIST=$ALL_TASKS
MODEL=""
DATA=data
DEVICE=""
OUT=""
DRY_RUN=0
SMOKE=0
MINI=0
DISTILL=1

die() { echo "run.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY_RUN=1; shift ;;
        --smoke) SMOKE=1; shift ;;
        --mini) MINI=1; shift ;;
        --no-distillation) DISTILL=0; shift ;;
        --stages) need_value "$@"; STAGES=$2; shift 2 ;;
        --skip) need_value "$@"; SKIP+=("$2"); shift 2 ;;
        --tasks) need_value "$@"; TASK_LIST=$2; shift 2 ;;
        --methods) need_value "$@"; METHOD_LIST=$2; shift 2 ;;
        --model) need_value "$@"; MODEL=$2; shift 2 ;;
        --data) need_value "$@"; DATA=$2; shift 2 ;;
        --device) need_value "$@"; DEVICE=$2; shift 2 ;;
        --out) need_value "$@"; OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see bash run.sh --help)" ;;
    esac
done

# ---------------------------------------------------------------- checks of the choices
[[ $SMOKE == 1 && $MINI == 1 ]] && die "--smoke and --mini exclude each other; choose one"
if [[ -z $STAGES ]]; then
    if [[ $MINI == 1 ]]; then STAGES=$MINI_STAGES; else STAGES=$DEFAULT_STAGES; fi
fi
if [[ -z $MODEL ]]; then
    if [[ $MINI == 1 ]]; then MODEL=data/gpt2-stand-in; else MODEL=gpt2; fi
fi
in_list() { [[ ",$2," == *",$1,"* ]]; }
IFS=, read -r -a TASKS <<< "$TASK_LIST"
[[ ${#TASKS[@]} -gt 0 ]] || die "--tasks: empty list"
for t in "${TASKS[@]}"; do in_list "$t" "$ALL_TASKS" || die "--tasks: unknown task '$t' (choose from $ALL_TASKS)"; done
IFS=, read -r -a METHOD_NAMES <<< "$METHOD_LIST"
[[ ${#METHOD_NAMES[@]} -gt 0 ]] || die "--methods: empty list"
for m in "${METHOD_NAMES[@]}"; do
    IFS=+ read -r -a parts <<< "$m"
    for p in "${parts[@]}"; do
        in_list "$p" "$ALL_METHODS" || die "--methods: unknown method '$p' (choose from $ALL_METHODS)"
    done
done
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
elif [[ $MINI == 1 ]]; then RUNS=runs/mini; RESULTS=results/mini
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
# The authors' run.sh, also in tasks/table.py (tests/test_run_sh.py checks that they agree):
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
adapter_hyper() {  # task distilled(0|1)
    case $1 in
        dialogue) echo "8 2 3 1e-3" ;;
        qa) echo "2 8 5 5e-4" ;;
        mt) echo "8 4 8 5e-4" ;;
        # the authors' distilled summarization run trains 5 epochs instead of 10
        summarization) if [[ ${2:-0} == 1 ]]; then echo "4 8 5 5e-4"; else echo "4 8 10 5e-4"; fi ;;
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

# ---------------------------------------------------------------- mini mode
# The comparison in miniature: the stand-in backbone (MODEL, unless --model), the whole shipped
# samples, the authors' epochs and learning rates, batches of 8 without accumulation.
mini_setup() {
    local t
    for t in "${TASKS[@]}"; do DATASET[$t]=data/samples/$t.json; done
    DECODE=(--batch_size 16)
    MULTI_HYPER=(--gradient_accumulation_steps 1 --train_batch_size 8 --valid_batch_size 8 --n_epochs 3)
}

# train.py flags for a task: "batch accumulation epochs lr" -> flags (smoke: 1 epoch, batch 4;
# mini: batch 8, no accumulation)
hyper_flags() {
    local batch=$1 accumulation=$2 epochs=$3 lr=$4
    if [[ $SMOKE == 1 ]]; then batch=4; accumulation=1; epochs=1; fi
    if [[ $MINI == 1 ]]; then batch=8; accumulation=1; fi
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

# Adapters of one task: train_adapter TASK DIR DISTILL(0|1), then evaluate into RESULTS_DIR
train_adapter() {
    local t=$1 dir=$2 distill=$3 teacher train_data=${DATASET[$1]} distill_flag=()
    if done_already "$dir"; then return 0; fi
    if [[ $distill == 1 ]]; then
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
        --adapter_bottleneck "$(bottleneck "$t")" $(hyper_flags $(adapter_hyper "$t" "$distill")) \
        "${distill_flag[@]+"${distill_flag[@]}"}" --output_dir "$dir" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
}

stage_adapter() {
    local t distill
    for t in "${TASKS[@]}"; do
        echo "== adapter: $t (bottleneck $(bottleneck "$t"), frozen GPT-2)"
        if distilled "$t"; then distill=1; else distill=0; fi
        train_adapter "$t" "$RUNS/${t}_adapter" "$distill"
        evaluate_single "$t" "$RUNS/${t}_adapter" "$RESULTS/adapter_result"
    done
}

# The distillation ablation: the same adapters on the gold targets, for the tasks the adapter
# stage distils (with --no-distillation the adapter stage is this already).
stage_adapter_gold() {
    local t
    for t in "${TASKS[@]}"; do
        distilled "$t" || continue
        echo "== adapter_gold: $t (bottleneck $(bottleneck "$t"), gold targets)"
        train_adapter "$t" "$RUNS/${t}_adapter_gold" 0
        evaluate_single "$t" "$RUNS/${t}_adapter_gold" "$RESULTS/adapter_gold_result"
    done
}

# Only the task's special-token embeddings learn (the authors' --emb_only), with the adapters'
# epochs and learning rate.
stage_emb_only() {
    local t dir
    for t in "${TASKS[@]}"; do
        echo "== emb_only: $t (task embeddings only, frozen GPT-2)"
        dir=$RUNS/${t}_emb_only
        # shellcheck disable=SC2046
        done_already "$dir" || run "$PYTHON" train.py --task "$t" --dataset_path "${DATASET[$t]}" \
            --dataset_cache "$CACHE" --model_checkpoint "$MODEL" --max_history "$(max_history "$t")" \
            --emb_only $(hyper_flags $(adapter_hyper "$t" 0)) --output_dir "$dir" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
        evaluate_single "$t" "$dir" "$RESULTS/emb_only_result"
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

# Every method of --methods on every task, with one shared budget per task: the adapters'
# batches, accumulation, epochs and learning rate (--mini: 3 epochs), the gold targets.
stage_methods() {
    local t m dir epochs hyper
    for t in "${TASKS[@]}"; do
        read -r -a hyper <<< "$(adapter_hyper "$t" 0)"
        epochs=${hyper[2]}
        [[ $MINI == 1 ]] && epochs=3
        for m in "${METHOD_NAMES[@]}"; do
            echo "== methods: $t with $m"
            dir=$RUNS/methods/${t}_$m
            # shellcheck disable=SC2046
            done_already "$dir" || run "$PYTHON" train.py --task "$t" --dataset_path "${DATASET[$t]}" \
                --dataset_cache "$CACHE" --model_checkpoint "$MODEL" --max_history "$(max_history "$t")" \
                --method "$m" $(hyper_flags "${hyper[0]}" "${hyper[1]}" "$epochs" "${hyper[3]}") \
                --output_dir "$dir" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
            evaluate_single "$t" "$dir" "$RESULTS/methods_result/$m"
        done
    done
    echo "== methods: the comparison"
    run "$PYTHON" -m engines.methods_report "$RESULTS" --runs "$RUNS" --tasks "$(IFS=,; echo "${TASKS[*]}")"
}

stage_user_tasks() {
    echo "== user tasks: the p-tuning study"
    run "$PYTHON" -m engines.prompt_study --model "$MODEL" --runs "$RUNS/prompt_study" \
        --output_dir "$RESULTS/prompt_study" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}"
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
    for stage in ${ALL_STAGES//,/ }; do stage_on "$stage" && ran=1; done
    [[ $ran == 1 ]] || die "no stage left to run"
    if [[ $SMOKE == 1 ]]; then smoke_setup; fi
    if [[ $MINI == 1 ]]; then mini_setup; fi
    for stage in ${ALL_STAGES//,/ }; do
        if stage_on "$stage"; then "stage_$stage"; fi
    done
    local summary=0
    for stage in ${ALL_STAGES//,/ }; do
        [[ $stage != methods && $stage != user_tasks ]] && stage_on "$stage" && summary=1
    done
    [[ $summary == 1 ]] || return 0  # the methods and user_tasks stages write their own tables
    echo "== summary"
    run "$PYTHON" -m engines.report "$RESULTS" --runs "$RUNS" --tasks "$(IFS=,; echo "${TASKS[*]}")"
}
main
exit
