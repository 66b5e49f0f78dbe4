"""Serve every task of a checkpoint from one process, with OpenAI's API and continuous batching.

    python serve.py --model_checkpoint runs/VLM
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "nlg", "prompt": "name[The Vaults], eatType[pub]", "temperature": 0}'

--model_checkpoint is a combined VLM, a single-task checkpoint or a plain GPT-2 folder; the
backbone alone is served too, under its own name, for plain text. Rows of every task and method
share each forward pass; a greedy request's text equals `evaluate.py --no_sample --input` on the
same checkpoint. See README.md (Serve) for the API, streaming, the admin calls and metrics.
"""

import argparse
import os

import torch

from engines.serve_run import DTYPES, serve
from utils.errors import ArgumentParser, exit_on_user_error


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model_checkpoint",
        required=True,
        help="combined VLM, single-task checkpoint, or GPT-2 folder / hub name",
    )
    parser.add_argument("--task_file", default=None, help="JSON task file of user tasks the checkpoint holds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed when ready)")
    parser.add_argument("--max_batch_size", type=int, default=32, help="rows decoded together at most")
    parser.add_argument("--max_queue", type=int, default=256, help="prompts waiting at most (then 429)")
    parser.add_argument(
        "--prefill_tokens",
        type=int,
        default=1024,
        help="padded prompt tokens one prompt pass takes at most (a longer single prompt "
        "runs alone), so joining rows stall the running ones only briefly",
    )
    parser.add_argument(
        "--max_cache_tokens",
        type=int,
        default=None,
        help="key/value cache positions held at most, counting each row's whole allowance "
        "(default: max_batch_size x the model's positions)",
    )
    parser.add_argument("--request_timeout", type=float, default=600.0, help="seconds a request may take")
    parser.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body")
    parser.add_argument(
        "--api_key",
        default=os.environ.get("VLM_API_KEY"),
        help="Bearer token every /v1 route requires (default: $VLM_API_KEY; none: open)",
    )
    parser.add_argument(
        "--admin_token",
        default=os.environ.get("VLM_ADMIN_TOKEN"),
        help="Bearer token of /admin/tasks (default: $VLM_ADMIN_TOKEN; none: admin off)",
    )
    parser.add_argument("--admin_root", default=None, help="folder the admin API may load checkpoints from")
    parser.add_argument(
        "--batching",
        default="continuous",
        choices=["continuous", "static"],
        help="static: collect up to --max_batch_size prompts or --static_wait_ms, then run "
        "the batch to its end (a baseline for the bench)",
    )
    parser.add_argument("--static_wait_ms", type=float, default=50.0)
    parser.add_argument("--access_log", action="store_true", help="log every request")
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
