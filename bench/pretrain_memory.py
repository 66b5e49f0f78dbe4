#!/usr/bin/env python
"""Peak memory of pretrain.py's streamed corpus against how much of the corpus it reads.

Each size runs in a fresh process: BlockStream tokenizes and packs the files' text into 512-token
blocks until N tokens have passed, and the process reports its peak RSS. Bounded memory means the
peak stays flat while the text read grows.

    python bench/pretrain_memory.py --train_files ../shared/data/pretrain/*.txt.xz \
        --tokens 1000000 4000000 16000000 --output results/pretrain_memory
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(files, tokens, block_size):
    from utils.corpus import BlockStream
    from utils.data import load_tokenizer
    tokenizer = load_tokenizer()
    stream = BlockStream(files, tokenizer, block_size=block_size, seed=0)
    start, seen = time.time(), 0
    for block in stream:
        seen += len(block)
        if seen >= tokens:
            break
    state, _ = stream.state()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": seen, "peak_rss_mb": round(peak_mb, 1),
                      "seconds": round(time.time() - start, 1),
                      "lines": sum(f["lines"] for f in state["files"])}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_files", nargs="+", required=True)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1_000_000, 4_000_000, 16_000_000])
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--output", default="results/pretrain_memory")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.train_files, args.worker, args.block_size)
    rows = []
    for n in args.tokens:
        out = subprocess.run([sys.executable, __file__, "--train_files", *args.train_files, "--block_size",
                              str(args.block_size), "--worker", str(n)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"tokens": row["tokens"], "lines": row["lines"], "peak_rss_mb": row["peak_rss_mb"],
                     "seconds": row["seconds"]})
        print(f"{row['tokens']:>12,} tokens read: peak RSS {row['peak_rss_mb']:.0f} MB "
              f"({row['seconds']:.0f} s)",
              flush=True)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output + ".csv", "w", encoding="utf-8") as f:
        f.write("tokens,lines,peak_rss_mb,seconds\n")
        f.writelines(f"{r['tokens']},{r['lines']},{r['peak_rss_mb']},{r['seconds']}\n" for r in rows)
    lines = ["| tokens streamed | lines read | peak RSS (MB) | seconds |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['tokens']:,} | {r['lines']:,} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} |"
              for r in rows]
    with open(args.output + ".md", "w", encoding="utf-8") as f:
        f.write("Peak RSS of pretrain.py's corpus stream against the text it has read "
                f"(`python bench/pretrain_memory.py --train_files {' '.join(args.train_files)} --tokens "
                f"{' '.join(map(str, args.tokens))}`):\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
