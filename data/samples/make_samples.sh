#!/usr/bin/env bash
# Regenerate data/samples/*.json and data/samples/*/{train,valid,test}.jsonl from the raw public releases;
# see README.md for the slices.
# Usage: data/samples/make_samples.sh --shared PATH   (PATH holds e2e/, multi30k/, convai2/, coqa/, cnndm/,
#        sentiment/, assistant/)
set -euo pipefail

if [ "$#" -ne 2 ] || [ "$1" != "--shared" ]; then
    echo "usage: $0 --shared PATH" >&2
    exit 2
fi
shared=$2
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."  # repo root, where data/prepare.py runs
prepare() { "${PYTHON:-python}" data/prepare.py "$@"; }

m=$shared/multi30k
prepare mt \
    --train "$m/train.en.gz" "$m/train.de.gz" --slice train 0:300 \
    --valid "$m/val.en.gz" "$m/val.de.gz" --slice valid 0:60 \
    --test "$m/test_2016_flickr.en.gz" "$m/test_2016_flickr.de.gz" --slice test 0:60 \
    --output data/samples/mt.json

# nlg slices count MRs (all references of one MR); no two of trainset.csv's first 300 rows
# share an MR, so 0:300 is exactly its first 300 rows.
prepare nlg \
    --train "$shared/e2e/trainset.csv" --slice train 0:300 \
    --valid "$shared/e2e/devset.csv" --slice valid 0:20 \
    --test "$shared/e2e/devset.csv" --slice test 20:40 \
    --output data/samples/nlg.json
# The benchmark's end-to-end run (bench/run.py) decodes 200 more dev MRs (41-240).
prepare nlg --test "$shared/e2e/devset.csv" --slice test 40:240 --output data/samples/nlg_dev200.json

c=$shared/convai2/valid_self_original_no_cands.txt
prepare dialogue --train "$c" --slice train 0:20 --valid "$c" --slice valid 20:25 \
    --output data/samples/dialogue.json

q=$shared/coqa/coqa-dev-v1.0.json
prepare qa --train "$q" --slice train 0:10 --valid "$q" --slice valid 10:13 \
    --output data/samples/qa.json

s=$shared/cnndm/test_sample.jsonl
prepare summarization --train "$s" --slice train 0:40 --valid "$s" --slice valid 40:50 \
    --test "$s" --slice test 50:60 --output data/samples/summarization.json

# User tasks (data/tasks/nemo_article.json): JSON lines in a folder per task. The full files in
# --folds 40 (sentiment) or 200 (intent_and_slot) folds: fold 0 is test, fold 1 valid, and the
# first 10% (sentiment) or 3% (intent_and_slot) of the other folds' shuffled records train.
prepare sentiment --input "$shared/sentiment/Sentences_AllAgree.txt" --folds 40 --fold 0 --seed 1234 \
    --train_fraction 0.1 --output data/samples/sentiment
prepare assistant --train "$shared/assistant/assistant_train.csv" --folds 200 --fold 0 --seed 1234 \
    --train_fraction 0.03 --output data/samples/intent_and_slot
