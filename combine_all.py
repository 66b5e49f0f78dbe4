"""Combine per-task adapter checkpoints into one Versatile Language Model: one referenced backbone,
every task's adapters and task embeddings (an adapter checkpoint that load_checkpoint serves).

    python combine_all.py runs/mt_adapter runs/nlg_adapter --output_dir runs/VLM
    python combine_all.py --vlm runs/VLM runs/qa_adapter --output_dir runs/VLM            # add a task
    python combine_all.py --vlm runs/VLM --replace runs/mt_adapter_v2 --output_dir runs/VLM
    python combine_all.py --vlm runs/VLM --remove nlg --output_dir runs/VLM_without_nlg
    python combine_all.py --vlm runs/VLM runs/sentiment_ptuning --task_file tasks.json --output_dir runs/VLM

A user task's checkpoint records its template (the VLM keeps it); --task_file updates the
recorded templates from the file (metric, label map, stop rule; the prompt itself must not change).

Before writing, every task's logits in the combined model are checked to equal its source
checkpoint's exactly; DIR/manifest.json records the tasks, their sizes and the backbone.
"""

from models.combine import (
    check_output_dir,
    combine,
    describe_methods,
    load_task_checkpoint,
    load_task_checkpoints,
    size_report,
    write_vlm,
)
from utils.errors import ArgumentParser, exit_on_user_error


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", metavar="CKPT",
                        help="task checkpoint folders written by train.py "
                             "(--method M, or --adapter_bottleneck B)")
    parser.add_argument("--output_dir", required=True,
                        help="folder of the combined VLM (new, empty, or the --vlm)")
    parser.add_argument("--vlm", default=None,
                        help="an existing combined VLM to add tasks to or remove tasks from")
    parser.add_argument("--replace", action="store_true",
                        help="a given checkpoint replaces the --vlm's adapter for its task")
    parser.add_argument("--remove", action="append", default=[], metavar="TASK",
                        help="remove this task from the --vlm (repeatable)")
    parser.add_argument("--task_file", default=None,
                        help="JSON task file: its user tasks' templates replace the ones "
                             "the checkpoints record")
    parser.add_argument("--base_model", default=None,
                        help="load the backbone from here instead of the path the checkpoints record "
                             "(it must have the same fingerprint); recorded in the output")
    return parser.parse_intermixed_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    check_output_dir(args.output_dir, args.vlm)  # before any loading: a busy folder fails fast
    checkpoints = load_task_checkpoints(args.checkpoints)
    base = load_task_checkpoint(args.vlm) if args.vlm else None
    combined = combine(checkpoints, base, remove=args.remove, replace=args.replace)
    if args.task_file:
        from engines.specs import refresh_templates
        from tasks.task_file import load_task_file
        combined.task_meta = refresh_templates(combined.task_meta, load_task_file(args.task_file),
                                               args.task_file)
    for checkpoint in [c for c in [*checkpoints, base] if c is not None and c.all_rows]:
        print(f"note: {checkpoint.path} stores all special-token rows; only its own task's rows are combined")
    for task, source in combined.sources.items():
        print(f"{task}: {describe_methods(combined.specs[task].methods)} from {source}")
    manifest = write_vlm(combined, args.output_dir, backbone=args.base_model, vlm_path=args.vlm)
    print(size_report(manifest))
    print(f"wrote {args.output_dir} ({', '.join(combined.specs)})")


if __name__ == "__main__":
    main()
