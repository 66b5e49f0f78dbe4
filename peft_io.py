#!/usr/bin/env python
"""Hugging Face PEFT interop: export a task checkpoint as a PEFT adapter folder, or import a PEFT
adapter folder as a task of a task file.

    python peft_io.py export runs/nlg_lora --output_dir runs/nlg_lora_peft
    python peft_io.py export runs/VLM --task sentiment --output_dir runs/sentiment_peft
    python peft_io.py import runs/sentiment_peft --task sentiment --task_file tasks.json \
        --output_dir runs/sentiment_imported [--model_checkpoint gpt2]

Export covers one task's lora, prefix, prompt, ptuning or ln (a built-in task's special-token
rows only with lora, as PEFT's trainable_token_indices); the folder loads with
PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), folder). Import reads
adapter_config.json and adapter_model.safetensors (never a pickled adapter_model.bin) of a LORA,
PREFIX_TUNING, PROMPT_TUNING, P_TUNING or LN_TUNING adapter trained on GPT-2, and writes a
checkpoint that evaluate.py decodes and combine_all.py combines. engines/peft_io.py says what
maps how and what is refused.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from utils.errors import ArgumentParser, exit_on_user_error  # noqa: E402


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,import}")
    export = commands.add_parser("export", help="a task checkpoint -> a PEFT adapter folder")
    export.add_argument("checkpoint", help="task checkpoint folder (train.py's output, or a combined VLM)")
    export.add_argument("--output_dir", required=True, help="the PEFT adapter folder to write (new or empty)")
    export.add_argument("--task", default=None,
                        help="the task to export (needed when the checkpoint has several)")
    imported = commands.add_parser("import", help="a PEFT adapter folder -> a task checkpoint")
    imported.add_argument("peft_dir",
                          help="PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    imported.add_argument("--task", required=True, help="the task of --task_file the adapter was trained for")
    imported.add_argument("--task_file", required=True, help="JSON task file defining the task")
    imported.add_argument("--output_dir", required=True, help="the checkpoint folder to write (new or empty)")
    imported.add_argument("--model_checkpoint", default=None,
                          help="the GPT-2 the adapter was trained on (default: its base_model_name_or_path)")
    return parser


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    from engines.peft_io import export_checkpoint, import_adapter
    if args.command == "export":
        print(export_checkpoint(args.checkpoint, args.output_dir, args.task))
    else:
        print(import_adapter(args.peft_dir, args.task, args.task_file, args.output_dir,
                             args.model_checkpoint))


if __name__ == "__main__":
    main()
