#!/usr/bin/env bash
# Offline end-to-end demo on the shipped samples: on the shipped stand-in backbone (a small GPT-2
# pretrained here with pretrain.py, data/gpt2-stand-in/README.md), train adapters and task
# embeddings briefly for two tasks (nlg, mt), evaluate each, combine both into one VLM, evaluate
# every task of the VLM in mixed batches, and print the metrics side by side.
# No download; a few minutes on a laptop CPU.
#   bash demo.sh [OUTPUT_DIR]            (default runs/demo)
#   MODEL=gpt2 bash demo.sh              (any GPT-2 hub name or folder instead of the stand-in)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
OUT=${1:-runs/demo}
export TOKENIZERS_PARALLELISM=false
# a re-run starts afresh
rm -rf "$OUT/nlg_adapter" "$OUT/mt_adapter" "$OUT/VLM" "$OUT/results" "$OUT/results_vlm"
MODEL=${MODEL:-data/gpt2-stand-in}
for task in nlg mt; do
    case $task in
        nlg) flags=(--adapter_bottleneck 10 --lr 1e-2) ;;
        mt)  flags=(--adapter_bottleneck 100 --lr 5e-3) ;;
    esac
    echo "== $task: training adapters + task embeddings on data/samples/$task.json"
    $PYTHON train.py --task "$task" --dataset_path "data/samples/$task.json" --dataset_cache "$OUT/dataset_cache" \
        --model_checkpoint "$MODEL" "${flags[@]}" --n_epochs 3 --train_batch_size 16 \
        --valid_batch_size 16 --gradient_accumulation_steps 1 --device cpu --output_dir "$OUT/${task}_adapter"
    echo "== $task: decoding the evaluation split with the single-task checkpoint"
    $PYTHON evaluate.py --task "$task" --no_sample --model_checkpoint "$OUT/${task}_adapter" \
        --dataset_path "data/samples/$task.json" --dataset_cache "$OUT/dataset_cache" --max_length 40 \
        --device cpu --output_dir "$OUT/results"
done

echo "== combining both tasks into one model"
$PYTHON combine_all.py "$OUT/nlg_adapter" "$OUT/mt_adapter" --output_dir "$OUT/VLM"
echo "== decoding both tasks with the combined model, rows of both tasks in the same batches"
$PYTHON evaluate_vlm.py --task all --no_sample --model_checkpoint "$OUT/VLM" --max_length 40 --device cpu \
    --dataset_paths nlg=data/samples/nlg.json mt=data/samples/mt.json --dataset_cache "$OUT/dataset_cache" \
    --output_dir "$OUT/results_vlm"

echo
echo "== summary (metric files in $OUT/results*/; training curves in $OUT/*_adapter/metrics.jsonl)"
$PYTHON - "$OUT" <<'PY'
import filecmp, json, sys
out = sys.argv[1]
for task in ("nlg", "mt"):
    curve = [json.loads(line) for line in open(f"{out}/{task}_adapter/metrics.jsonl")]
    single = json.load(open(f"{out}/results/{task}_metrics.json"))
    combined = json.load(open(f"{out}/results_vlm/{task}_metrics.json"))
    same = filecmp.cmp(f"{out}/results/{task}_output.txt", f"{out}/results_vlm/{task}_output.txt", shallow=False)
    ppl = " -> ".join(f"{row['val_ppl']:.0f}" for row in curve)
    print(f"{task}: validation ppl by epoch {ppl}")
    print(f"     single-task: {({k: round(v, 4) for k, v in single.items() if isinstance(v, float)})}")
    print(f"     combined:    {({k: round(v, 4) for k, v in combined.items() if isinstance(v, float)})}")
    print(f"     combined model's outputs identical to the single-task model's: {same}")
    outputs = open(f"{out}/results/{task}_output.txt", encoding="utf-8").read().splitlines()
    text = open(f"{out}/results/{task}_ref.txt", encoding="utf-8").read()
    # nlg: each MR's references form one blank-line separated group (the E2E scorer's layout)
    references = [g.split("\n")[0] for g in text.strip().split("\n\n")] if task == "nlg" else text.splitlines()
    inputs = open(f"{out}/results/nlg_mr.txt", encoding="utf-8").read().splitlines() if task == "nlg" else None
    for i in (0, len(outputs) // 2):  # two decoded examples
        if inputs:
            print(f"     input:     {inputs[i][:110]}")
        print(f"     reference: {references[i][:110]}")
        print(f"     decoded:   {outputs[i][:110]}")
PY
