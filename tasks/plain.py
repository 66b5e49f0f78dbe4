"""The backbone on its own: plain text in, GPT-2's continuation out (no task modules, no segments).

serve.py lists it under the backbone's name beside the model's tasks, so a client can ask the
frozen GPT-2 itself, and the serving bench compares with servers that know only plain requests.
It has no datasets: it is a kind for decoding only.
"""

from dataclasses import dataclass

from tasks.base import Prompt, TaskKind
from tasks.template import NO_SEGMENT
from utils.data import check_unicode
from utils.errors import VLMError
from utils.vocab import EOS_ID


@dataclass(frozen=True)
class PlainTextTask(TaskKind):
    """Text continuation by the backbone: stops at <|endoftext|>, never emits the added task tokens."""

    name: str
    task_id: int = -1
    kind = "text"
    max_history = 0
    special_tokens = ()

    def stop_ids(self):
        return (EOS_ID,)

    def vocab_token_ids(self):
        return ()  # so banned_ids() is every added token

    def input_prompt(self, item, tokenizer, max_history, task_id, where):
        if not isinstance(item, str):
            raise VLMError(f"{where}: the backbone {self.name} takes plain text")
        check_unicode(item, where)
        ids = tokenizer(item, add_special_tokens=False)["input_ids"]
        if not ids:
            raise VLMError(f"{where}: the prompt is empty")
        return Prompt(
            input_ids=ids,
            token_type_ids=[NO_SEGMENT] * len(ids),
            task_id=-1,
            stop_ids=self.stop_ids(),
            banned_ids=self.banned_ids(),
            meta={"input": where},
        )

    def output_text(self, tokenizer, ids, cleanup=True):
        return tokenizer.decode(ids, skip_special_tokens=True)
