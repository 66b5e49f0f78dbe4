"""Conversational question answering (qa, CoQA): a story and the questions so far in, the answer out.

Record: {"id", "document": [story], "utterances": [{"history", "candidates", "turn_id"}]}: the
dialogue layout with the story, cut to `max_source_tokens`, where the persona goes. Outputs are
written as CoQA's official scorer reads them (`<task>_predictions.json`: id, turn_id, answer) and
scored with its exact match and F1.
"""
from dataclasses import dataclass

from tasks.dialogue import DialogueTask, conversation_history, history_window
from utils.data import read_jsonl
from utils.errors import VLMError
from utils.io import write_json


@dataclass(frozen=True)
class QATask(DialogueTask):
    kind = "qa"
    record_keys = ("document", "utterances")
    context_key = "document"
    empty_context_allowed = False

    def persona_of(self, record, persona):
        return [record["document"][0][:self.max_source_tokens]]

    def prompt_meta(self, context, record, utterance, tokenizer):
        return {"id": record["id"], "turn_id": utterance.get("turn_id")}

    def references(self, prompts):
        return [{"id": p.meta["id"], "turn_id": p.meta["turn_id"], "answer": p.meta["reference"]}
                for p in prompts]

    def read_references(self, path):
        """JSON lines, one gold answer a line: {"id": story id, "turn_id": turn, "answer": text}
        (CoQA's scorer groups the turns of a story by id)."""
        references = []
        for number, record in read_jsonl(path):
            missing = [key for key in ("id", "turn_id", "answer") if key not in record]
            if missing or not isinstance(record["answer"], str):
                raise VLMError(f"{path}, line {number}: expected {{\"id\", \"turn_id\", \"answer\": "
                               f"a string}}" + (f"; {missing[0]!r} is missing" if missing else ""))
            references.append({key: record[key] for key in ("id", "turn_id", "answer")})
        return references

    def text_input(self, text, where):
        raise VLMError(f"{where}: qa needs a JSON object with 'document' and 'history'")

    def chat_input(self, turns, where):
        """The system messages are the document (the story); user and assistant turns the history."""
        document = "\n".join(text for role, text in turns if role == "system")
        if not document:
            raise VLMError(f"{where}: qa needs the document (the story) as a system message")
        return {"document": document, "history": conversation_history(turns, where)}

    def input_context(self, item, encode, get, max_history, where):
        """{"document": str, "history": [...]}."""
        history = history_window([encode(t) for t in get("history", list)], max_history)
        return [encode(get("document", str))[:self.max_source_tokens]], history

    def write_outputs(self, prompts, outputs, output_dir):
        predictions = [{"id": p.meta["id"], "turn_id": p.meta["turn_id"], "answer": out}
                       for p, out in zip(prompts, outputs)]
        # the authors' name for it
        write_json(self.output_path(output_dir, "output.txt"), predictions, indent=None)
        # for the official CoQA scorer
        write_json(self.output_path(output_dir, "predictions.json"), predictions)
