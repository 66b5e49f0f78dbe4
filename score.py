"""Score any system's outputs with the toolkit's metrics, as the official scorers read them.

    python score.py --task nlg --hypotheses outputs.txt --references nlg_ref.txt
    python score.py --task mt --hypotheses mt_output.txt --references mt_ref.txt --output mt.json
    python score.py --task_file data/tasks/nemo_article.json --task sentiment \\
        --hypotheses sentiment_output.txt --references sentiment_ref.txt

Files are UTF-8. Hypotheses: one output a line, in the order of the references. References:

  nlg            the E2E scorer's multi-reference file (evaluate.py's nlg_ref.txt): the references
                 of one MR one a line, a blank line between MRs; a file without blank lines holds
                 one reference per MR. Lines are stripped, as the E2E scorer strips them.
  mt, summarization, dialogue
                 one reference a line (evaluate.py's <task>_ref.txt).
  qa             JSON lines, one gold answer a line: {"id": story id, "turn_id": turn,
                 "answer": text} (CoQA's scorer averages over the turns of each story).
  task-file tasks
                 one reference a line; in both files a newline inside an answer is written \\n
                 and a backslash \\\\ (as evaluate.py writes <task>_output.txt and <task>_ref.txt).

The metrics are the task's (tasks/table.py, or the task file's `metric`), computed by the code
evaluate.py uses; dialogue's perplexity needs the model, so only evaluate.py reports it. The E2E
METEOR is METEOR 1.5 when `java` is on PATH, else an approximation named METEOR*.
The last line printed is the metrics as one JSON object; --output FILE writes them there too.
"""
import argparse
import json

from utils.errors import ArgumentParser, exit_on_user_error


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True,
                        help="mt, summarization, dialogue, qa or nlg, or a task of --task_file")
    parser.add_argument("--task_file", default=None, help="task file defining --task (a user task)")
    parser.add_argument("--hypotheses", required=True, help="the system's outputs, one a line")
    parser.add_argument("--references", required=True, help="the references (formats above)")
    parser.add_argument("--output", default=None, help="also write the metrics as JSON to this file")
    args = parser.parse_args(argv)
    from engines.scoring import score_files, scoring_task  # after --help: torch loads slowly
    task = scoring_task(args.task, args.task_file)
    print(json.dumps(score_files(task, args.hypotheses, args.references, args.output)))


if __name__ == "__main__":
    main()
