#!/usr/bin/env bash
# The bench on a lent GPU machine, as one prepared command (the machine, its limits and its tool:
# the developers' guide). Its image has torch (CUDA) but not every package of requirements.lock,
# so those travel as wheels in .whl/ (ignored by git; made here, on a machine with the registry):
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.24.0 peft==0.21.2 pytorch-ignite==0.5.5 nltk==3.10.4 defusedxml regex==2026.11.19
#
# (17 MiB; the image's huggingface-hub, tokenizers, accelerate, safetensors and sacrebleu fit our
# ranges.) Then run there, carrying .whl:   bash bench/device_check.sh [more bench/run.py flags]
# It writes gpu.txt, bench.log and bench/results.{json,md} under $OUT (or /tmp/device_check).
# float32, the bench's default: its equality targets compare ours with other implementations
# token for token, and half precision rounds differently in differently shaped products.
set -o pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT/bench"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: could not install the wheels in .whl/ (see the comment at the top of $0)" >&2; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, ignite, nltk; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'ignite', ignite.__version__, 'cuda', torch.cuda.is_available())" \
    | tee -a "$OUT/gpu.txt" || exit 1
# bench/run.py rewrites its report after every section, so a run cut short keeps what it finished.
python3 bench/run.py --device cuda --output_dir "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench.log"
