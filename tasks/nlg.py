"""Data-to-text generation (nlg, the E2E challenge): a meaning representation in, a sentence out.

Record: {"src": {slot: value}, "tgt": str}. Input layout (the authors'):
    <bos> <slot1> value1 <slot2> value2 ... <response> reply ... <eos>
each value's segment id is its slot's token. Evaluation decodes one output per distinct MR and
scores it against all of that MR's references (`<task>_ref.txt` in the E2E scorer's blocks).
"""
import re
from dataclasses import dataclass

from tasks.base import decode_text
from tasks.seq2seq import SourceTargetTask, check_str, labelled
from utils.data import read_text
from utils.errors import VLMError
from utils.io import write_lines
from utils.vocab import special_token_id

MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*")
MR_TEXT = re.compile(rf"{MR_SLOT.pattern}(?:,{MR_SLOT.pattern})*")


def mr_key(slots):
    """A meaning representation as text, in the E2E style: `name[The Vaults], eatType[pub]`."""
    return ", ".join(f"{slot}[{value}]" for slot, value in slots)


@dataclass(frozen=True)
class NLGTask(SourceTargetTask):
    kind = "nlg"
    def check_fields(self, record, fail):
        if not isinstance(record["src"], dict) or not record["src"]:
            fail("'src' must be a non-empty object of slot: value")
        for slot, value in record["src"].items():
            if slot not in self.slot_tokens:
                fail(f"unknown NLG slot {slot!r} (known: {', '.join(self.slot_tokens)})")
            check_str(value, f"src.{slot}", fail)
        check_str(record["tgt"], "tgt", fail)

    def iter_contexts(self, records, max_history, target_key=None, rotate_persona=True, for_training=True):
        for record in records:
            yield list(record["src"].items()), record[target_key or "tgt"], record, None

    def partition_key(self, record):
        """The restaurant's name (its token ids; an MR without one: `no name`)."""
        name = record["src"].get("name")
        return "no name" if name is None else "name " + " ".join(map(str, name))

    def build_inputs(self, context, reply, with_eos=True):
        """context: [(slot, value ids)] in the MR's order."""
        bos, eos = special_token_id(self.special_tokens[0]), special_token_id(self.special_tokens[1])
        reply = list(reply) + ([eos] if with_eos else [])
        response = special_token_id("<response>")
        sequence = [[bos]] + [[special_token_id(self.slot_tokens[slot])] + list(value)
                              for slot, value in context] \
            + [[response] + reply]
        token_types = [bos] + [s[0] for s in sequence[1:-1] for _ in s] + [response] * len(sequence[-1])
        input_ids, labels = labelled(sequence)
        return {"input_ids": input_ids, "token_type_ids": token_types, "labels": labels}

    def dataset_prompts(self, records, max_history, tokenizer, task_id, shots=()):
        """One prompt per distinct MR, holding the references of every record of that MR."""
        prompts, by_mr = [], {}
        for context, target, _, _ in self.iter_contexts(records, max_history, rotate_persona=False,
                                                        for_training=False):
            reference = decode_text(tokenizer, target)
            key = mr_key((slot, tokenizer.decode(value)) for slot, value in context)
            if key in by_mr:  # E2E: all references of one MR belong to one output
                by_mr[key].meta["references"].append(reference)
                continue
            prompt = self.make_prompt(context, task_id, {"mr": key, "references": [reference]})
            by_mr[key] = prompt
            prompts.append(prompt)
        return prompts

    def references(self, prompts):
        return [p.meta["references"] for p in prompts]

    def parse_mr(self, text, where):
        """`name[The Vaults], eatType[pub]` -> [(slot, value)] in order."""
        if not MR_TEXT.fullmatch(text):
            raise VLMError(f"{where}: cannot read a meaning representation like 'name[X], eatType[pub]'")
        slots = [(m.group(1), m.group(2)) for m in MR_SLOT.finditer(text)]
        for slot, _ in slots:
            if slot not in self.slot_tokens:
                raise VLMError(f"{where}: unknown NLG slot {slot!r} (known: {', '.join(self.slot_tokens)})")
        return slots

    def input_context(self, item, encode, get, max_history, where):
        """{"src": {slot: value}} or {"src": "name[X], eatType[pub]"} (or that MR text itself)."""
        src = item.get("src")
        slots = self.parse_mr(src, where) if isinstance(src, str) else list(get("src", dict).items())
        for slot, value in slots:
            if slot not in self.slot_tokens or not isinstance(value, str):
                raise VLMError(f"{where}: bad NLG slot {slot!r}")
        return [(slot, encode(value)) for slot, value in slots]

    def read_outputs(self, path):
        """One output a line, stripped, as the E2E scorer reads them (it splits lines as
        str.splitlines does)."""
        return [line.strip() for line in read_text(path, "hypotheses").splitlines()]

    def read_references(self, path):
        """The E2E scorer's multi-reference file, as it reads one: the references of an MR one a
        line (stripped), a blank line between MRs; a file without blank lines holds one reference
        per MR. Blank lines at the end are ignored; two in a row elsewhere are an error (the scorer
        would score an MR without references)."""
        blocks, current, blank = [], [], None
        for number, line in enumerate(read_text(path, "references").splitlines(), 1):
            line = line.strip()
            if line and blank:
                raise VLMError(f"{path}, line {blank}: an empty reference block (blank lines "
                               "separate the reference blocks of two MRs, one blank line each)")
            if line:
                current.append(line)
            elif current:
                blocks.append(current)
                current = []
            else:
                blank = number
        if current:
            blocks.append(current)
        return [[ref] for ref in blocks[0]] if len(blocks) == 1 else blocks

    def write_outputs(self, prompts, outputs, output_dir):
        """`<task>_output.txt`, the official E2E scorer's multi-reference `<task>_ref.txt` (one
        block per MR, a blank line between) and `<task>_mr.txt`."""
        write_lines(self.output_path(output_dir, "output.txt"), outputs)
        blocks = self.references(prompts)
        write_lines(self.output_path(output_dir, "ref.txt"),
                    [line for refs in blocks for line in refs + [""]][:-1])
        write_lines(self.output_path(output_dir, "mr.txt"), [p.meta["mr"] for p in prompts])
