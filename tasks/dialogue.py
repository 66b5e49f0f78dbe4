"""Persona chat (dialogue, ConvAI2): a persona and the conversation so far in, the next reply out.

Record: {"personality": [str], "utterances": [{"history": [str], "candidates": [str]}]}; each
utterance is one example whose reply is its last candidate (the gold one). Input layout (the
authors'):
    <bos> <persona> persona ... <speaker1|2> turn ... <speaker2> reply ... <eos>
Speaker prefixes alternate backwards from the reply (always <speaker2>), but segment ids
alternate forwards from the first turn: the authors' quirk, kept. Training rotates the persona
sentences by one after each utterance; evaluation keeps them fixed. Dialogue also reports the
teacher-forced perplexity of the gold replies (its "ppl" metric).
"""
from dataclasses import dataclass
from itertools import chain

from tasks.base import BuiltinTask, decode_text
from tasks.seq2seq import check_str_list, labelled
from utils.errors import VLMError
from utils.io import write_lines
from utils.vocab import special_token_id

DISTILLED_CANDIDATES = "distillated_candidates"


def conversation_history(turns, where):
    """The user and assistant turns of a conversation, which must end with a user turn."""
    history = [(role, text) for role, text in turns if role in ("user", "assistant")]
    if not history or history[-1][0] != "user":
        raise VLMError(f"{where}: the conversation must end with a user message")
    return [text for _, text in history]


def history_window(turns, max_history):
    """The turns a model sees: the last max_history exchanges and the newest turn (the authors' cut)."""
    return turns[-(2 * max_history + 1):]


@dataclass(frozen=True)
class DialogueTask(BuiltinTask):
    kind = "dialogue"
    record_keys = ("personality", "utterances")
    context_key = "personality"           # the record's list of context sentences
    empty_context_allowed = True
    distilled_key = DISTILLED_CANDIDATES

    def check_fields(self, record, fail):
        check_str_list(record[self.context_key], self.context_key, fail,
                       allow_empty=self.empty_context_allowed)
        if not isinstance(record["utterances"], list) or not record["utterances"]:
            fail("'utterances' must be a non-empty list")
        for turn, utterance in enumerate(record["utterances"]):
            where = f"utterances[{turn}]"
            if not isinstance(utterance, dict):
                fail(f"{where} must be an object")
            for key in ("history", "candidates"):
                if key not in utterance:
                    fail(f"{where} is missing key {key!r}")
                check_str_list(utterance[key], f"{where}.{key}", fail)

    def keep_for_tokenizing(self, record):
        """Only the last candidate (the gold reply) is ever used: drop the rest before tokenizing."""
        if "utterances" not in record:
            return record
        record = dict(record)
        record["utterances"] = [{k: (v[-1:] if k in ("candidates", DISTILLED_CANDIDATES) else v)
                                 for k, v in u.items()} for u in record["utterances"]]
        return record

    def persona_of(self, record, persona):
        """The context sentences of one example (dialogue: the persona, as rotated so far)."""
        return persona

    def iter_contexts(self, records, max_history, target_key=None, rotate_persona=True, for_training=True):
        for record in records:
            persona = list(record.get("personality", []))
            for utterance in record["utterances"]:
                history = history_window(utterance["history"], max_history)
                context = (self.persona_of(record, persona), history)
                yield context, utterance[target_key or "candidates"][-1], record, utterance
                if rotate_persona and persona:
                    persona = [persona[-1]] + persona[:-1]

    def build_inputs(self, context, reply, with_eos=True):
        """context: (persona or [document] as lists of ids, history turns as lists of ids)."""
        bos, eos, speaker1, speaker2, persona_token = (special_token_id(t) for t in self.special_tokens[:5])
        reply = list(reply) + ([eos] if with_eos else [])
        persona, history = context
        sequence = [[bos, persona_token] + list(chain(*persona))] + [list(t) for t in history] + [reply]
        # Speaker prefixes alternate backwards from the reply (always speaker2) ...
        sequence = [sequence[0]] + [[speaker1 if (len(sequence) - i) % 2 else speaker2] + s
                                    for i, s in enumerate(sequence[1:])]
        # ... but segment ids alternate forwards from the first turn: the authors' quirk, kept.
        token_types = [persona_token] * len(sequence[0]) + [speaker2 if i % 2 else speaker1
                                                            for i, s in enumerate(sequence[1:]) for _ in s]
        input_ids, labels = labelled(sequence)
        return {"input_ids": input_ids, "token_type_ids": token_types, "labels": labels}

    def prompt_meta(self, context, record, utterance, tokenizer):
        return {"persona": [decode_text(tokenizer, p) for p in context[0]]}

    def text_input(self, text, where):
        return {"history": [text]}

    def chat_input(self, turns, where):
        """System messages are persona lines; user and assistant turns the history, ending with the user's."""
        return {"personality": [text for role, text in turns if role == "system"],
                "history": conversation_history(turns, where)}

    def input_context(self, item, encode, get, max_history, where):
        """{"personality": [...], "history": [...]} (or one user turn as text)."""
        history = history_window([encode(t) for t in get("history", list)], max_history)
        persona = [encode(p) for p in get("personality", list)] if "personality" in item else []
        return persona, history

    def write_outputs(self, prompts, outputs, output_dir):
        super().write_outputs(prompts, outputs, output_dir)
        write_lines(self.output_path(output_dir, "persona.txt"),
                    ["\t".join(p.meta["persona"]) for p in prompts])

    # --- distillation: one target per utterance ------------------------------------------------
    def distilled_holders(self, record):
        return record["utterances"]

    def empty_distilled(self, path, split, index):
        raise VLMError(f"{path}: split {split!r} record {index}: {self.distilled_key!r} is empty")

    def example_positions(self, records):
        return [(i, j) for i, record in enumerate(records) for j in range(len(record["utterances"]))]

    def attach_target(self, records, position, text):
        i, j = position
        records[i]["utterances"][j][DISTILLED_CANDIDATES] = [text]
