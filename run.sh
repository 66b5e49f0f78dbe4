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
#                 With --compare, the fair comparison instead (see below).
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
# --compare is the fair comparison of the per-task methods (the methods stage only, mt and nlg):
# every method of --methods (default: finetune, i.e. full fine-tuning, and all twelve) at its own
# learning rate, chosen from a grid of three around its paper's rate (lr_grid below) on validation
# perplexity with seed 1, then seeds 2 and 3 at that rate; every figure the mean ± std over the
# three seeds, in RESULTS/methods.md, methods.csv and methods.png (python -m engines.methods_report
# --compare), with the differences that exceed the spread. It trains on the stand-in backbone
# (unless --model) with data/compare/{mt,nlg}.json (--data DIR: DIR/compare/), which it prepares
# from the raw releases in --shared on first use (data/prepare.py --slice; the slices and the time
# it takes, about 6 hours on a 2-core CPU, are under "compare mode" below). Runs go to runs/compare, tables to results/compare
# (or --out). Resumable: a finished run is not repeated, an interrupted one continues from its last
# epoch checkpoint, a scored run is not decoded again, and the grid's choice is recorded in
# RUNS/methods/<task>_<method>/choice.json, so the grid is not rerun. With --smoke it runs the
# same steps on the tiny model and the cut samples, to check them in minutes.
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
#                           models/methods: adapter,houlsby,...,unipelt; composed ones as prefix+ln;
#                           --compare: also finetune, first)
#   --smoke                 tiny pipeline on the samples (default --out runs/smoke); it starts
#                           afresh, deleting OUT/runs, OUT/results and OUT/data first
#   --mini                  the comparison in miniature on the stand-in backbone and the samples
#                           (default --out: runs to runs/mini, results to results/mini)
#   --compare               the fair comparison of the methods (above; default --out: runs to
#                           runs/compare, results to results/compare)
#   --shared DIR            the raw releases --compare prepares its data from (default
#                           ../shared/data: DIR/multi30k, DIR/e2e)
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
METHOD_LIST=
ALL_TASKS="dialogue,qa,mt,summarization,nlg"
COMPARE_TASKS="mt,nlg"
STAGES=
SKIP=()
TASK_LIST=
MODEL=""
DATA=data
DEVICE=""
OUT=""
DRY_RUN=0
SMOKE=0
MINI=0
COMPARE=0
SHARED=../shared/data
DISTILL=1

die() { echo "run.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY_RUN=1; shift ;;
        --smoke) SMOKE=1; shift ;;
        --mini) MINI=1; shift ;;
        --compare) COMPARE=1; shift ;;
        --shared) need_value "$@"; SHARED=$2; shift 2 ;;
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
[[ $COMPARE == 1 && $MINI == 1 ]] && die "--compare and --mini exclude each other; choose one"
if [[ -z $STAGES ]]; then
    if [[ $COMPARE == 1 ]]; then STAGES=methods
    elif [[ $MINI == 1 ]]; then STAGES=$MINI_STAGES
    else STAGES=$DEFAULT_STAGES; fi
fi
if [[ -z $MODEL ]]; then
    if [[ $MINI == 1 || $COMPARE == 1 ]]; then MODEL=data/gpt2-stand-in; else MODEL=gpt2; fi
fi
if [[ -z $TASK_LIST ]]; then
    if [[ $COMPARE == 1 ]]; then TASK_LIST=$COMPARE_TASKS; else TASK_LIST=$ALL_TASKS; fi
fi
if [[ -z $METHOD_LIST ]]; then
    if [[ $COMPARE == 1 ]]; then METHOD_LIST=finetune,$ALL_METHODS; else METHOD_LIST=$ALL_METHODS; fi
fi
in_list() { [[ ",$2," == *",$1,"* ]]; }
IFS=, read -r -a TASKS <<< "$TASK_LIST"
[[ ${#TASKS[@]} -gt 0 ]] || die "--tasks: empty list"
for t in "${TASKS[@]}"; do in_list "$t" "$ALL_TASKS" || die "--tasks: unknown task '$t' (choose from $ALL_TASKS)"; done
if [[ $COMPARE == 1 ]]; then
    for t in "${TASKS[@]}"; do
        in_list "$t" "$COMPARE_TASKS" || die "--compare: no data for task '$t' (it compares $COMPARE_TASKS)"
    done
fi
IFS=, read -r -a METHOD_NAMES <<< "$METHOD_LIST"
[[ ${#METHOD_NAMES[@]} -gt 0 ]] || die "--methods: empty list"
for m in "${METHOD_NAMES[@]}"; do
    if [[ $m == finetune ]]; then
        [[ $COMPARE == 1 ]] || die "--methods: finetune is a method of --compare only (without it, the finetune stage gives the fine-tune row)"
        continue
    fi
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
if [[ $COMPARE == 1 ]]; then
    for s in "${WANTED[@]}"; do
        [[ $s == methods ]] || die "--compare runs the methods stage only, not '$s'"
    done
fi

if [[ -n $OUT ]]; then RUNS=$OUT/runs; RESULTS=$OUT/results
elif [[ $SMOKE == 1 ]]; then OUT=runs/smoke; RUNS=$OUT/runs; RESULTS=$OUT/results
elif [[ $MINI == 1 ]]; then RUNS=runs/mini; RESULTS=results/mini
elif [[ $COMPARE == 1 ]]; then RUNS=runs/compare; RESULTS=results/compare
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

# ---------------------------------------------------------------- compare mode
# The fair comparison (--compare): the same data, epochs and batches for every method, each at its
# own learning rate.
# The sizing, for about 6 hours on this 2-core CPU machine with every method on mt and nlg (the
# stand-in backbone; measured while a pretraining job and other work shared the cores, load 3-7; one
# OpenMP thread, so the CPU time is about the wall time): a 30-step train.py run per method and task
# (240 examples, batches of 8, validation before and after) took 7-10 s to start and save, 4-6.5 s
# per validation (250 mt pairs, 275 nlg references) and 0.45-0.62 s per step on mt, 0.39-0.75 s on
# nlg (full fine-tuning 0.57 / 0.47 s, prompt tuning 0.62 / 0.63 s); decoding a 200-item test slice
# to at most 80 tokens (the undertrained runs' outputs go that far) took 20-23 s (mt) and 33-45 s
# (nlg). With 2,000 training examples and 1 epoch (250 steps), a run takes 127-170 s on mt and
# 110-201 s on nlg; each task has 13 methods x (3 grid rates + 2 more seeds) = 65 runs and 13 x 3 =
# 39 decodings: mt 2.6 h of training + 0.25 h of decoding, nlg 2.5 h + 0.5 h, together about 5.8 h.
# (Other sizes by the same arithmetic: 1,500 examples 4.7 h, 2,500 7.0 h, 2,000 x 2 epochs 10.6 h.)
COMPARE_TRAIN=2000          # training examples per task: mt sentence pairs, nlg E2E rows (references)
COMPARE_EPOCHS=1
COMPARE_BATCH=8             # no accumulation
COMPARE_DECODE=(--batch_size 32 --max_length 80)  # every reference of both test slices is < 70 tokens
GRID_SEED=1                 # the grid runs on this seed; its run at the chosen rate is that seed's
SEEDS=(1 2 3)
declare -A TRAIN_DATASET    # what train.py reads (mt: a copy that validates on the validation slice)

# Each method's learning-rate grid: three rates about half a decade apart, around the rate its paper
# or the authors' run.sh trains it with; a composed method (prefix+ln) takes its first part's grid.
lr_grid() {
    case ${1%%+*} in
        finetune) echo "6.25e-5 2.5e-4 1e-3" ;;      # the authors' full fine-tuning: 6.25e-5 (mt), 5e-5 (nlg)
        adapter) echo "5e-4 1.5e-3 5e-3" ;;          # the authors' adapters: 5e-4 (mt) and 5e-3 (nlg)
        houlsby|compacter|adapterbias|ln) echo "1e-3 3e-3 1e-2" ;;  # bottleneck adapters' 1e-3..1e-2
        parallel) echo "3e-4 1e-3 3e-3" ;;           # a wide adapter (d/2, scale 4): a step lower
        lora|krona|unipelt) echo "2e-4 6e-4 2e-3" ;;  # LoRA's GPT-2 E2E rate 2e-4 and up
        prefix) echo "1e-3 3e-3 1e-2" ;;             # reparameterized prefixes: 1e-3..1e-2
        prompt) echo "0.03 0.1 0.3" ;;               # prompt tuning's 0.3 (Lester et al.) and below
        ptuning) echo "3e-3 1e-2 3e-2" ;;            # the p-tuning study's 1e-2 (engines/prompt_study.py)
    esac
}

# The compare data, converted from the raw releases by data/prepare.py (--slice: records of the
# converted split; for nlg, meaning representations with all their references):
#   mt   Multi30k en-de: train = the first COMPARE_TRAIN pairs of train; valid = the first 250 pairs
#        of val (the grid's choice); test = the first 200 pairs of test_2016_flickr (scored). train.py
#        validates mt on its split named test (the authors' layout, tasks/table.py), so it reads
#        mt_training.json: the same train slice, and the validation slice as that split.
#   nlg  E2E: train = the first COMPARE_TRAIN rows of trainset.csv; valid = the first 30 MRs of
#        devset.csv (275 references); test = the next 200 MRs (30-229, 1,440 references; scored).
# Prepared once into DATA/compare/ (delete a file to prepare it again).
compare_setup() {
    local t m=$SHARED/multi30k e=$SHARED/e2e dir=$DATA/compare
    # One OpenMP thread per run (unless OMP_NUM_THREADS says otherwise): on 2 cores shared with
    # another job, torch's two threads spin waiting for each other; a 30-step adapter run on mt took
    # 131-181 s with two and 33-45 s with one.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    if [[ $SMOKE == 1 ]]; then  # the smoke check: the cut samples as they are
        for t in "${TASKS[@]}"; do TRAIN_DATASET[$t]=${DATASET[$t]}; done
        return 0
    fi
    DECODE=("${COMPARE_DECODE[@]}")
    for t in "${TASKS[@]}"; do
        DATASET[$t]=$dir/$t.json
        TRAIN_DATASET[$t]=$dir/$t.json
    done
    if in_list mt "$TASK_LIST"; then
        TRAIN_DATASET[mt]=$dir/mt_training.json
        if [[ $DRY_RUN == 1 || ! -f $dir/mt.json ]]; then
            compare_release "$m/train.en.gz" "$m/val.en.gz" "$m/test_2016_flickr.en.gz"
            run "$PYTHON" data/prepare.py mt --train "$m/train.en.gz" "$m/train.de.gz" --slice train "0:$COMPARE_TRAIN" \
                --valid "$m/val.en.gz" "$m/val.de.gz" --slice valid 0:250 \
                --test "$m/test_2016_flickr.en.gz" "$m/test_2016_flickr.de.gz" --slice test 0:200 --output "$dir/mt.json"
        fi
        if [[ $DRY_RUN == 1 || ! -f $dir/mt_training.json ]]; then
            compare_release "$m/train.en.gz" "$m/val.en.gz"
            run "$PYTHON" data/prepare.py mt --train "$m/train.en.gz" "$m/train.de.gz" --slice train "0:$COMPARE_TRAIN" \
                --test "$m/val.en.gz" "$m/val.de.gz" --slice test 0:250 --output "$dir/mt_training.json"
        fi
    fi
    if in_list nlg "$TASK_LIST" && [[ $DRY_RUN == 1 || ! -f $dir/nlg.json ]]; then
        compare_release "$e/trainset.csv" "$e/devset.csv"
        run "$PYTHON" data/prepare.py nlg --train "$e/trainset.csv" --slice train "0:$COMPARE_TRAIN" \
            --valid "$e/devset.csv" --slice valid 0:30 --test "$e/devset.csv" --slice test 30:230 \
            --output "$dir/nlg.json"
    fi
}
compare_release() {
    local f
    [[ $DRY_RUN == 1 ]] && return 0
    for f in "$@"; do
        [[ -f $f ]] || die "--compare: $f not found: it prepares $DATA/compare/ from the raw releases (--shared DIR)"
    done
}

compare_run() { echo "$RUNS/methods/${1}_$2/lr${3}_seed$4"; }  # task method rate seed

# One run of the comparison: TASK METHOD RATE SEED. A finished run is kept; an interrupted one
# continues from its last complete epoch checkpoint (train.py --resume), or starts again when it
# has none. A run that fails (a NaN loss at a too-large rate) is said and left out.
compare_train() {
    local t=$1 m=$2 lr=$3 seed=$4 dir resume=() method_flag=() status=0
    dir=$(compare_run "$t" "$m" "$lr" "$seed")
    if done_already "$dir"; then return 0; fi
    if [[ $DRY_RUN == 0 && -d $dir ]]; then
        if compgen -G "$dir/checkpoint_epoch*/training_state.json" > /dev/null; then
            echo "== $dir was interrupted; it continues from its last checkpoint"
            resume=(--resume)
        else
            run rm -rf "$dir"
        fi
    fi
    [[ $m == finetune ]] || method_flag=(--method "$m")
    # shellcheck disable=SC2046  # hyper_flags prints separate words on purpose
    run "$PYTHON" train.py --task "$t" --dataset_path "${TRAIN_DATASET[$t]}" --dataset_cache "$CACHE" \
        --model_checkpoint "$MODEL" --max_history "$(max_history "$t")" "${method_flag[@]+"${method_flag[@]}"}" \
        $(hyper_flags "$COMPARE_BATCH" 1 "$COMPARE_EPOCHS" "$lr") --seed "$seed" --output_dir "$dir" \
        "${resume[@]+"${resume[@]}"}" "${DEVICE_FLAG[@]+"${DEVICE_FLAG[@]}"}" || status=$?
    if [[ $status != 0 ]]; then echo "== $dir: training failed (exit $status); left out of the comparison"; fi
    return 0
}

# Decode a finished run's test slice, once: TASK METHOD RATE SEED
compare_evaluate() {
    local t=$1 m=$2 lr=$3 seed=$4 dir out
    dir=$(compare_run "$t" "$m" "$lr" "$seed")
    out=$RESULTS/methods_result/$m/lr${lr}_seed$seed
    if [[ $DRY_RUN == 0 ]]; then
        [[ -f $dir/vlm_config.json ]] || return 0  # a failed run: nothing to score
        if [[ -f $out/${t}_metrics.json ]]; then
            echo "== $out holds the scores of $t; not decoded again"
            return 0
        fi
    fi
    evaluate_single "$t" "$dir" "$out"
}

# One task and method: the grid on GRID_SEED (unless choice.json records its choice), the choice
# (python -m engines.compare), the other seeds at the chosen rate, then every seed's test slice.
compare_method() {
    local t=$1 m=$2 parent grid lr seed choose
    parent=$RUNS/methods/${t}_$m
    grid=$(lr_grid "$m")
    echo "== methods (compare): $t with $m: learning rates $grid on seed $GRID_SEED, then seeds ${SEEDS[*]}"
    if [[ $DRY_RUN == 0 && -f $parent/choice.json ]]; then
        echo "== $parent/choice.json records the grid's choice; the grid is not run again"
    else
        for lr in $grid; do compare_train "$t" "$m" "$lr" "$GRID_SEED"; done
    fi
    choose=("$PYTHON" -m engines.compare "$parent" --rates "${grid// /,}" --seed "$GRID_SEED")
    echo "+ $(printf '%q ' "${choose[@]}")"
    if [[ $DRY_RUN == 1 ]]; then
        lr=CHOSEN  # known once the grid has run
    elif ! lr=$("${choose[@]}"); then
        echo "== $t with $m: no grid run finished; left out of the comparison"
        return 0
    fi
    for seed in "${SEEDS[@]}"; do
        [[ $seed == "$GRID_SEED" ]] || compare_train "$t" "$m" "$lr" "$seed"
    done
    for seed in "${SEEDS[@]}"; do compare_evaluate "$t" "$m" "$lr" "$seed"; done
}

stage_methods_compare() {
    local t m
    for t in "${TASKS[@]}"; do
        for m in "${METHOD_NAMES[@]}"; do compare_method "$t" "$m"; done
    done
    echo "== methods (compare): the comparison"
    run "$PYTHON" -m engines.methods_report "$RESULTS" --runs "$RUNS" --tasks "$(IFS=,; echo "${TASKS[*]}")" --compare
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
    if [[ $COMPARE == 1 ]]; then stage_methods_compare; return; fi
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
    if [[ $COMPARE == 1 ]]; then compare_setup; fi
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
