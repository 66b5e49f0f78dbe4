#!/usr/bin/env bash
# Offline end-to-end demo on the shipped samples: on the shipped stand-in backbone (a small GPT-2
# pretrained here with pretrain.py, data/gpt2-stand-in/README.md), train a small module and task
# embeddings briefly for two tasks (nlg: LoRA, mt: adapters), evaluate each, combine both into one VLM, evaluate
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
rm -rf "$OUT/nlg_module" "$OUT/mt_module" "$OUT/VLM" "$OUT/results" "$OUT/results_vlm"
MODEL=${MODEL:-data/gpt2-stand-in}
for task in nlg mt; do
    case $task in
        # chosen by measurement on the stand-in (README, "Try it"): nlg LoRA on every projection
        # names the MR's slots where its small adapter repeated one sentence
        nlg) flags=(--method lora --lora_r 16 --lora_targets q,k,v,attn_proj,mlp_fc,mlp_proj --lr 1e-2
                    --n_epochs 10) ;;
        mt)  flags=(--adapter_bottleneck 100 --lr 5e-3 --n_epochs 3) ;;
    esac
    echo "== $task: training ${flags[*]:0:2} + task embeddings on data/samples/$task.json"
    $PYTHON train.py --task "$task" --dataset_path "data/samples/$task.json" --dataset_cache "$OUT/dataset_cache" \
        --model_checkpoint "$MODEL" "${flags[@]}" --train_batch_size 16 \
        --valid_batch_size 16 --gradient_accumulation_steps 1 --device cpu --output_dir "$OUT/${task}_module"
    echo "== $task: decoding the evaluation split with the single-task checkpoint"
    $PYTHON evaluate.py --task "$task" --no_sample --model_checkpoint "$OUT/${task}_module" \
        --dataset_path "data/samples/$task.json" --dataset_cache "$OUT/dataset_cache" --max_length 40 \
        --device cpu --output_dir "$OUT/results"
done

echo "== combining both tasks into one model"
$PYTHON combine_all.py "$OUT/nlg_module" "$OUT/mt_module" --output_dir "$OUT/VLM"
echo "== decoding both tasks with the combined model, rows of both tasks in the same batches"
$PYTHON evaluate_vlm.py --task all --no_sample --model_checkpoint "$OUT/VLM" --max_length 40 --device cpu \
    --dataset_paths nlg=data/samples/nlg.json mt=data/samples/mt.json --dataset_cache "$OUT/dataset_cache" \
    --output_dir "$OUT/results_vlm"

echo
echo "== summary (metric files in $OUT/results*/; training curves in $OUT/*_module/metrics.jsonl)"
$PYTHON - "$OUT" <<'PY'
import filecmp, json, re, sys
out = sys.argv[1]
for task in ("nlg", "mt"):
    curve = [json.loads(line) for line in open(f"{out}/{task}_module/metrics.jsonl")]
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
    if task == "nlg":
        # does the output vary with its MR, and does it name the MR's eatType and area?
        slots = [dict(re.findall(r"(\w[\w ]*)\[([^\]]*)\]", mr)) for mr in inputs]
        named = {key: [s[key].lower() in o.lower() for s, o in zip(slots, outputs) if key in s]
                 for key in ("eatType", "area")}
        print(f"     distinct outputs: {len(set(outputs))} of {len(outputs)} MRs; slot coverage: "
              + ", ".join(f"{key} named in {sum(hits)} of {len(hits)}" for key, hits in named.items()))
    for i in (0, len(outputs) // 2):  # two decoded examples
        if inputs:
            print(f"     input:     {inputs[i][:110]}")
        print(f"     reference: {references[i][:110]}")
        print(f"     decoded:   {outputs[i][:110]}")
PY
