#!/usr/bin/env python
"""Convert the benchmarks' raw releases into the dataset JSON the VLM loaders read.

    python data/prepare.py TASK [--train PATH...] [--valid PATH...] [--test PATH...]
                           [--slice SPLIT START:STOP]... --output FILE.json

TASK is one of mt, summarization, dialogue, qa, nlg. Each file's format is recognised from
its name (and, for XML, its first line); see FORMATS below. A parallel corpus (mt) is given
as its two files, source first: `--train train.en.gz train.de.gz`; several pairs may follow
each other. Several files for one split are concatenated in the order given.

`--slice SPLIT START:STOP` keeps items START..STOP-1 (Python slice) of a split after
conversion. An item is one output record, except for nlg where it is one meaning
representation with all its references (a run of consecutive rows with the same MR), so a
slice never separates the references that grouped evaluation scores together.

Output layouts (fixed by the original authors' loaders):
  mt, summarization  {"train": [{"src": str, "tgt": str}], ...}
  nlg                {"train": [{"src": {slot: value}, "tgt": str}], ...}
  dialogue           {"train": [{"personality": [str],
                                 "utterances": [{"history": [str], "candidates": [str, ..., gold]}]}], ...}
  qa                 {"train": [{"id": str, "document": [story],
                                 "utterances": [{"history": [q1, a1, ..., qt], "candidates": [at],
                                                 "turn_id": t}]}], ...}
Only the splits given are written.

User tasks (task files, see tasks/task_file.py and data/tasks/nemo_article.json) get JSON-lines
records tagged with their taskname, written as DIR/train.jsonl, valid.jsonl and test.jsonl:

    python data/prepare.py assistant --train assistant_train.csv... [--test testset.csv...] --output DIR
    python data/prepare.py sentiment --input Sentences_AllAgree.txt --output DIR
                           [--folds K] [--fold I] [--seed S] [--train_fraction F]   (both commands)

  assistant  NLU-Evaluation-Data CSV (`;`-separated, answerid;scenario;intent;answer_annotation;
             answer_from_anno;answer_from_user) -> {"taskname": "intent_and_slot", "utterance": str,
             "label": "Intent: iot_coffee\nSlots: device_type(coffee pot)"}   ("Slots: None": no slots)
  sentiment  Financial PhraseBank `sentence@label` lines (UTF-8, else Latin-1 as in the original
             release) -> {"taskname": "sentiment", "sentence": str, "label": "positive"|"negative"|"neutral"}

Splits: the records are shuffled once with --seed and cut into --folds K folds; fold I is test,
fold (I+1) mod K valid, the rest train. With assistant --test, those files are the test split (in
file order) and the K folds give valid (fold I) and train (the rest). --train_fraction F keeps the
first ceil(F x n) training records of the shuffled order, so a smaller fraction is a subset of a
larger one (with the same seed and folds); valid and test do not change with F. Exact duplicate
records are kept once, and a training record equal to a test record is dropped.
"""
import argparse
import collections
import csv
import fractions
import gzip
import html
import itertools
import json
import math
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import ArgumentParser, VLMError, exit_on_user_error  # noqa: E402
from utils.io import write_json, write_lines  # noqa: E402

SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------------------------------------
# Reading files: every reader goes through these, so every error names the file and line.


def _open_binary(path):
    # .gz is decompressed transparently: Multi30k ships its text files gzipped.
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def numbered_lines(path):
    """Yield (line number, text without the line break), decoding UTF-8 one line at a time.

    Line by line (not whole-file) keeps memory flat on the full CNN/DailyMail train set and
    lets a decoding error name its line.
    """
    number = 0
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise VLMError(f"{path}, line {number}: not valid UTF-8") from None
                if number == 1:
                    line = line.lstrip("\ufeff")  # a byte-order mark is not text
                yield number, line.rstrip("\r\n")
    except (OSError, EOFError) as error:  # missing file, directory, truncated or bad gzip
        raise VLMError(f"{path}, line {number + 1}: cannot read: {error}") from None


def read_json(path):
    """Parse a whole JSON file; syntax and encoding errors name the line."""
    text = "\n".join(line for _, line in numbered_lines(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise VLMError(f"{path}, line {error.lineno}: bad JSON: {error.msg}") from None
    except RecursionError:
        raise VLMError(f"{path}: bad JSON: nested too deeply") from None


def require(record, key, kind, where):
    """record[key], checked to be of `kind`; `where` names the file and record for the error."""
    if not isinstance(record, dict):
        raise VLMError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise VLMError(f"{where}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise VLMError(f"{where}: {key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def require_strings(values, where):
    if not all(isinstance(value, str) for value in values):
        raise VLMError(f"{where}: expected a list of strings")
    return values


def suffix(path):
    """The name's last extension, looking through .gz: 'train.en.gz' -> '.en'."""
    name = os.path.basename(path.rstrip("/")).lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    return os.path.splitext(name)[1]


def looks_like_xml(path):
    if suffix(path) == ".xml":
        return True
    for _, line in numbered_lines(path):
        return line.lstrip().startswith("<")
    return False


# ---------------------------------------------------------------------------------------------
# mt: parallel plain text and IWSLT XML


def sentence_pair(src, tgt, where):
    src, tgt = src.strip(), tgt.strip()
    if not src or not tgt:
        raise VLMError(f"{where}: empty sentence")
    return {"src": src, "tgt": tgt}


def read_text_pair(files, split):
    src_path, tgt_path = files
    src = list(numbered_lines(src_path))
    tgt = list(numbered_lines(tgt_path))
    if len(src) != len(tgt):
        raise VLMError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
            "a parallel corpus needs one sentence per line, aligned"
        )
    return [
        sentence_pair(s, t, f"{src_path} / {tgt_path}, line {number}")
        for (number, s), (_, t) in zip(src, tgt)
    ]


DOC_OPEN = re.compile(r'<doc\s[^>]*?\bdocid\s*=\s*"([^"]*)"')
SEG = re.compile(r'<seg\s+id\s*=\s*"\s*([^"]*?)\s*"\s*>(.*?)</seg>')


def read_iwslt_segments(path):
    """{(docid, segid): (line number, text)} in file order; text entity-unescaped and stripped."""
    segments, doc = {}, None
    for number, line in numbered_lines(path):
        opened = DOC_OPEN.search(line)
        if opened:
            doc = opened.group(1)
        found = list(SEG.finditer(line))
        if len(found) != line.count("<seg"):
            raise VLMError(f"{path}, line {number}: <seg> without id or closing </seg> on the same line")
        for seg in found:
            if doc is None:
                raise VLMError(f"{path}, line {number}: <seg> outside a <doc docid=...>")
            key = (doc, seg.group(1))
            if key in segments:
                raise VLMError(f"{path}, line {number}: doc {key[0]} seg {key[1]} appears twice")
            # html.unescape also covers HTML-only entities (&nbsp;) that an XML parser rejects.
            segments[key] = (number, html.unescape(seg.group(2)))
        if "</doc>" in line:
            doc = None
    if not segments:
        raise VLMError(f"{path}: no <seg id=...> elements")
    return segments


def read_iwslt_pair(files, split):
    src_path, tgt_path = files
    src, tgt = read_iwslt_segments(src_path), read_iwslt_segments(tgt_path)
    # Align by (doc, seg) id, not position: a missing segment must not shift every later pair.
    for this_path, these, other_path, others in ((src_path, src, tgt_path, tgt),
                                                 (tgt_path, tgt, src_path, src)):
        for (doc, seg), (number, _) in these.items():
            if (doc, seg) not in others:
                raise VLMError(f"{this_path}, line {number}: doc {doc} seg {seg} has no counterpart in "
                               f"{other_path}")
    return [
        sentence_pair(text, tgt[key][1], f"{src_path}, line {number} / {tgt_path}, line {tgt[key][0]}")
        for key, (number, text) in src.items()
    ]


# ---------------------------------------------------------------------------------------------
# summarization: CNN/DailyMail .story files and JSONL
#
# Text is flattened the way See et al. (2017, make_datafiles.py) do it, since most CNN/DM
# results (and ROUGE references) use their preprocessing: each line gets " ." appended unless
# it already ends in sentence-final punctuation or a closing quote/bracket, and the lines are
# joined with single spaces. Unlike them we neither lowercase nor wrap sentences in <s></s>.

SENTENCE_ENDS = (".", "!", "?", "...", "'", "`", '"', "\u2019", "\u201d", ")")


def join_lines(lines):
    lines = [line.strip() for line in lines]
    return " ".join(line if line.endswith(SENTENCE_ENDS) else line + " ." for line in lines if line)


def read_story(path):
    """One .story file: article paragraphs, then each highlight after an `@highlight` line."""
    article, highlights, next_is_highlight = [], [], False
    for _, line in numbered_lines(path):
        if line.strip() == "@highlight":
            next_is_highlight = True
        elif line.strip():
            (highlights if next_is_highlight else article).append(line)
            next_is_highlight = False
    if not article:
        raise VLMError(f"{path}: no article text before the first @highlight")
    if not highlights:
        raise VLMError(f"{path}: no @highlight lines (the summary)")
    return {"src": join_lines(article), "tgt": join_lines(highlights)}


def read_stories(files, split):
    (path,) = files
    if not os.path.isdir(path):
        return [read_story(path)]
    names = sorted(name for name in os.listdir(path) if name.endswith(".story"))
    if not names:
        raise VLMError(f"{path}: folder holds no .story files")
    return [read_story(os.path.join(path, name)) for name in names]


def read_summary_jsonl(files, split):
    (path,) = files
    records = []
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise VLMError(f"{where}: bad JSON: {error.msg}") from None
        except RecursionError:
            raise VLMError(f"{where}: bad JSON: nested too deeply") from None
        article = require(record, "article", str, where)
        highlights = require(record, "highlights", str, where)
        # The article is already one flattened text (often cut mid-sentence), so it is copied,
        # not period-fixed; highlights may be newline-separated (Hugging Face cnn_dailymail) and
        # get the same flattening as .story highlights, which leaves See et al.'s text unchanged.
        src, tgt = " ".join(article.split("\n")).strip(), join_lines(highlights.split("\n"))
        if not src or not tgt:
            raise VLMError(f"{where}: empty article or highlights")
        records.append({"src": src, "tgt": tgt})
    return records


# ---------------------------------------------------------------------------------------------
# dialogue: ParlAI text and the Hugging Face personachat JSON


def parse_parlai_turn(text, where):
    """`partner<TAB>reply[<TAB>reward<TAB>cand1|cand2|...]` -> (partner, reply, candidates)."""
    fields = text.split("\t")
    if len(fields) < 2 or not fields[1].strip():
        raise VLMError(f"{where}: expected `partner message<TAB>reply`")
    partner, reply = fields[0].strip(), fields[1].strip()
    offered = [c.strip() for c in fields[3].split("|") if c.strip()] if len(fields) > 3 else []
    # The loaders take the LAST candidate as gold (as in the Hugging Face personachat JSON).
    return partner, reply, [c for c in offered if c != reply] + [reply]


def read_parlai(files, split):
    (path,) = files
    dialogues, dialogue, history, expected = [], None, [], 1
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        index, _, text = line.partition(" ")
        if not index.isdigit():
            raise VLMError(f"{where}: expected a line number at the start")
        if int(index) == 1:  # numbering restarts for each dialogue
            dialogue, history = {"personality": [], "utterances": [], "line": number}, []
            dialogues.append(dialogue)
        elif int(index) != expected:
            raise VLMError(f"{where}: line number {index} where {expected} was expected")
        expected = int(index) + 1
        if text.startswith("your persona:"):
            dialogue["personality"].append(text[len("your persona:"):].strip())
        elif text.startswith("partner's persona:"):
            continue  # in the `both_` files; the model only conditions on its own persona
        else:
            partner, reply, candidates = parse_parlai_turn(text, where)
            history.append(partner)
            dialogue["utterances"].append({"history": list(history), "candidates": candidates})
            history.append(reply)
    for dialogue in dialogues:
        start = dialogue.pop("line")  # kept only for this message
        if not dialogue["utterances"]:
            raise VLMError(f"{path}, line {start}: this dialogue has no turns")
    return dialogues


def check_dialogue(dialogue, where):
    """Validate one record of the personachat JSON and return just the loader's fields."""
    personality = require_strings(require(dialogue, "personality", list, where), f"{where}, personality")
    utterances = require(dialogue, "utterances", list, where)
    if not utterances:
        raise VLMError(f"{where}: no utterances")
    for k, utterance in enumerate(utterances):
        turn = f"{where}, utterance {k}"
        require_strings(require(utterance, "history", list, turn), f"{turn}, history")
        if not require_strings(require(utterance, "candidates", list, turn), f"{turn}, candidates"):
            raise VLMError(f"{turn}: no candidates (the last one is the gold reply)")
    return {"personality": personality, "utterances": utterances}


def read_personachat_json(files, split):
    """The file holds all splits; the flag it was given under says which one to take."""
    (path,) = files
    data = read_json(path)
    if not isinstance(data, dict) or split not in data:
        have = ", ".join(sorted(data)) if isinstance(data, dict) else "not an object"
        raise VLMError(f"{path}: no {split!r} split in this personachat JSON (has: {have})")
    dialogues = require(data, split, list, path)
    return [check_dialogue(d, f"{path}, {split} record {i}") for i, d in enumerate(dialogues)]


# ---------------------------------------------------------------------------------------------
# qa: CoQA official JSON


def read_coqa_story(story, where):
    questions = require(story, "questions", list, where)
    answers = require(story, "answers", list, where)
    if len(questions) != len(answers):
        raise VLMError(f"{where}: {len(questions)} questions but {len(answers)} answers")
    utterances, history = [], []
    for question, answer in zip(questions, answers):
        turn_id = require(question, "turn_id", int, f"{where}, question {len(utterances)}")
        turn = f"{where}, turn {turn_id}"
        if require(answer, "turn_id", int, turn) != turn_id:
            raise VLMError(f"{turn}: answer has turn_id {answer['turn_id']}")
        history.append(require(question, "input_text", str, f"{turn}, question").strip())
        gold = require(answer, "input_text", str, f"{turn}, answer").strip()
        utterances.append({"history": list(history), "candidates": [gold], "turn_id": turn_id})
        history.append(gold)
    if not utterances:
        raise VLMError(f"{where}: no questions")
    return {"id": require(story, "id", str, where), "document": [require(story, "story", str, where)],
            "utterances": utterances}


def read_coqa(files, split):
    (path,) = files
    stories = require(read_json(path), "data", list, f"{path}, top level")
    return [read_coqa_story(story, f"{path}, story {i} "
                                   f"(id {story.get('id') if isinstance(story, dict) else '?'})")
            for i, story in enumerate(stories)]


# ---------------------------------------------------------------------------------------------
# nlg: E2E CSV

E2E_SLOTS = ("name", "eatType", "familyFriendly", "priceRange", "food", "near", "area", "customer rating")
MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


def parse_mr(mr, where):
    """`name[The Vaults], eatType[pub]` -> {"name": "The Vaults", "eatType": "pub"}, in MR order."""
    slots, position = {}, 0
    while position < len(mr.rstrip()):
        match = MR_SLOT.match(mr, position)
        if not match:
            raise VLMError(f"{where}: cannot parse the MR at {mr[position:]!r} (expected slot[value], ...)")
        slot, value = match.group(1), match.group(2).strip()
        if slot not in E2E_SLOTS:
            raise VLMError(f"{where}: unknown slot {slot!r} (E2E slots: {', '.join(E2E_SLOTS)})")
        if slot in slots:
            raise VLMError(f"{where}: slot {slot!r} given twice")
        slots[slot] = value
        position = match.end()
    if not slots:
        raise VLMError(f"{where}: empty meaning representation")
    return slots


def read_e2e(files, split):
    (path,) = files
    # csv takes the raw lines so quoted references spanning lines work; line_num is physical.
    rows = csv.reader(line + "\n" for _, line in numbered_lines(path))
    try:
        header = [name.strip().lower() for name in next(rows, [])]
        if "mr" not in header or "ref" not in header:
            raise VLMError(f"{path}, line 1: expected a header with columns mr and ref, got {header}")
        mr_column, ref_column = header.index("mr"), header.index("ref")
        records = []
        for row in rows:
            where = f"{path}, line {rows.line_num}"
            if len(row) != len(header):
                raise VLMError(f"{where}: {len(row)} fields where the header has {len(header)}")
            ref = row[ref_column].strip()
            if not ref:
                raise VLMError(f"{where}: empty ref")
            records.append({"src": parse_mr(row[mr_column], where), "tgt": ref})
        return records
    except csv.Error as error:
        raise VLMError(f"{path}, line {rows.line_num}: bad CSV: {error}") from None


# ---------------------------------------------------------------------------------------------
# The table: for each task, its input formats in the order they are tried.

Format = collections.namedtuple("Format", "task name accepts files_per_item read")

FORMATS = [
    Format("mt", "IWSLT XML pair (.xml)", looks_like_xml, 2, read_iwslt_pair),
    Format("mt", "parallel plain text pair (.gz allowed)", lambda path: True, 2, read_text_pair),
    Format("summarization", "CNN/DailyMail .story files or a folder of them",
           lambda path: os.path.isdir(path) or suffix(path) == ".story", 1, read_stories),
    Format("summarization", "JSONL with article/highlights (.jsonl)",
           lambda path: suffix(path) == ".jsonl", 1, read_summary_jsonl),
    Format("dialogue", "ParlAI text (.txt)", lambda path: suffix(path) == ".txt", 1, read_parlai),
    Format("dialogue", "Hugging Face personachat JSON (.json)", lambda path: suffix(path) == ".json", 1,
           read_personachat_json),
    Format("qa", "CoQA JSON (.json)", lambda path: suffix(path) == ".json", 1, read_coqa),
    Format("nlg", "E2E CSV (.csv)", lambda path: suffix(path) == ".csv", 1, read_e2e),
]

# What one slice item is and what the counts call it; nlg items are MRs (see module doc).
Task = collections.namedtuple("Task", "unit same_item")
TASKS = {
    "mt": Task("sentence pairs", None),
    "summarization": Task("articles", None),
    "dialogue": Task("dialogues", None),
    "qa": Task("stories", None),
    "nlg": Task("references", lambda record: record["src"]),
}


def find_format(task, path):
    if not os.path.exists(path):
        raise VLMError(f"{path}: no such file or folder")
    for fmt in FORMATS:
        if fmt.task == task and fmt.accepts(path):
            return fmt
    known = "; ".join(fmt.name for fmt in FORMATS if fmt.task == task)
    raise VLMError(f"{path}: not a recognised {task} file (expected: {known})")


def convert_split(task, split, paths):
    """Convert every file given for one split, in order, into one list of records."""
    records, position = [], 0
    while position < len(paths):
        fmt = find_format(task, paths[position])
        files = tuple(paths[position: position + fmt.files_per_item])
        if len(files) < fmt.files_per_item:
            raise VLMError(f"--{split}: {fmt.name} is given as source and target files; "
                           f"{files[0]} has no partner")
        records.extend(fmt.read(files, split))
        position += fmt.files_per_item
    return records


def items(task, records):
    """Group records into slice items (consecutive records with the same item key)."""
    key = TASKS[task].same_item
    if key is None:
        return [[record] for record in records]
    return [list(group) for _, group in itertools.groupby(records, key)]


def take(task, records, window):
    start, stop = window
    return [record for item in items(task, records)[start:stop] for record in item]


def describe(task, records):
    text = f"{len(records)} {TASKS[task].unit}"
    if task in ("dialogue", "qa"):
        text += f", {sum(len(record['utterances']) for record in records)} turns"
    if task == "nlg":
        text += f" of {len(items(task, records))} MRs"
    return text


def prepare(task, split_paths, slices=None):
    """{split: [paths]} -> {split: records}, sliced by {split: (start, stop)}; no split may end empty."""
    slices = slices or {}
    for split in slices:
        if split not in split_paths:
            raise VLMError(f"--slice {split}: no --{split} files given")
    dataset = {}
    for split in SPLITS:
        if split not in split_paths:
            continue
        records = convert_split(task, split, split_paths[split])
        if split in slices:
            records = take(task, records, slices[split])
        if not records:
            where = " ".join(split_paths[split])
            raise VLMError(f"--{split} {where}: no records"
                           + (" in the requested slice" if split in slices else ""))
        dataset[split] = records
    return dataset


# ---------------------------------------------------------------------------------------------
# User tasks: NLU-Evaluation-Data (assistant) and Financial PhraseBank (sentiment) as JSON-lines
# records of data/tasks/nemo_article.json's intent_and_slot and sentiment tasks.

ASSISTANT_COLUMNS = ("answerid", "scenario", "intent", "answer_annotation", "answer_from_anno",
                     "answer_from_user")
ANNOTATED_SLOT = re.compile(r"\[([^\[\]]*)\]")
PHRASEBANK_LABELS = ("positive", "negative", "neutral")


def parse_annotation(annotation, where):
    """'wake me [time : at five am]' -> ('wake me at five am', [('time', 'at five am')]).

    Slots are `[name : value]`; spacing around names, colons and values is free, and runs of
    whitespace in the utterance and the values become one space. Unbalanced or nested brackets,
    a slot without a colon, name or value, and a name or value holding ( ) (the label format
    `name(value)` could not hold it) are errors."""
    depth = 0
    for position, char in enumerate(annotation):
        if char == "[":
            if depth:
                raise VLMError(f"{where}: nested '[' at character {position} of the annotation "
                               f"{annotation!r}")
            depth = 1
        elif char == "]":
            if not depth:
                raise VLMError(f"{where}: ']' without '[' at character {position} of the annotation "
                               f"{annotation!r}")
            depth = 0
    if depth:
        raise VLMError(f"{where}: unclosed '[' in the annotation {annotation!r}")
    slots = []

    def replace(match):
        name, colon, value = match.group(1).partition(":")
        name, value = " ".join(name.split()), " ".join(value.split())
        if not colon or not name or not value:
            raise VLMError(f"{where}: slot {match.group(0)!r} is not [name : value]")
        if any(char in name + value for char in "()"):
            raise VLMError(f"{where}: slot {match.group(0)!r} holds '(' or ')', which the label's "
                           f"name(value) pairs cannot hold")
        slots.append((name, value))
        return value

    return " ".join(ANNOTATED_SLOT.sub(replace, annotation).split()), slots


def intent_slot_label(intent, slots):
    """The NeMo tutorial's label: 'Intent: iot_coffee\\nSlots: device_type(coffee pot)' or 'Slots: None'."""
    pairs = ", ".join(f"{name}({value})" for name, value in slots)
    return f"Intent: {intent}\nSlots: {pairs or 'None'}"


def read_assistant_csv(path):
    """(records, rows skipped for an empty answer_annotation) of one NLU-Evaluation-Data CSV.

    The utterance is the annotation without its slot brackets (what answer_from_anno holds); the
    label's intent is scenario_intent. A row without an annotation has no slot information and is
    skipped (and counted)."""
    rows = csv.reader((line + "\n" for _, line in numbered_lines(path)), delimiter=";")
    records, skipped = [], 0
    try:
        header = [name.strip() for name in next(rows, [])]
        if not header:
            raise VLMError(f"{path}: empty file (expected the header {';'.join(ASSISTANT_COLUMNS)})")
        missing = [name for name in ASSISTANT_COLUMNS if name not in header]
        if missing:
            raise VLMError(f"{path}, line 1: the header lacks {', '.join(missing)} "
                           f"(expected {';'.join(ASSISTANT_COLUMNS)})")
        column = {name: header.index(name) for name in ASSISTANT_COLUMNS}
        for row in rows:
            where = f"{path}, line {rows.line_num}"
            if not any(field.strip() for field in row):
                continue
            if len(row) != len(header):
                raise VLMError(f"{where}: {len(row)} fields where the header has {len(header)}")
            scenario, intent = row[column["scenario"]].strip(), row[column["intent"]].strip()
            if not scenario or not intent:
                raise VLMError(f"{where}: empty scenario or intent")
            annotation = row[column["answer_annotation"]]
            if not annotation.strip():
                skipped += 1
                continue
            utterance, slots = parse_annotation(annotation, where)
            records.append({"taskname": "intent_and_slot", "utterance": utterance,
                            "label": intent_slot_label(f"{scenario}_{intent}", slots)})
    except csv.Error as error:
        raise VLMError(f"{path}, line {rows.line_num}: bad CSV: {error}") from None
    return records, skipped


def read_phrasebank(path):
    """The records of a Financial PhraseBank file: `sentence@label` lines (split at the last '@').
    UTF-8, or Latin-1 when the file is not UTF-8 (the original release's encoding)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise VLMError(f"{path}: cannot read: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    records = []
    for number, line in enumerate(text.lstrip("\ufeff").split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        sentence, at, label = line.rpartition("@")
        if not at:
            raise VLMError(f"{where}: expected sentence@label")
        label, sentence = label.strip(), sentence.strip()
        if label not in PHRASEBANK_LABELS:
            raise VLMError(f"{where}: unknown label {label!r} (expected positive, negative or neutral)")
        if not sentence:
            raise VLMError(f"{where}: empty sentence")
        records.append({"taskname": "sentiment", "sentence": sentence, "label": label})
    return records


def _record_key(record):
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def drop_duplicates(records, exclude=()):
    """(records with each exact duplicate kept once, in order, without any record of `exclude`;
    the number of duplicates dropped; the number of records dropped for being in `exclude`)."""
    excluded = {_record_key(record) for record in exclude}
    seen, kept, repeats = set(), [], 0
    for record in records:
        key = _record_key(record)
        if key in seen:
            continue
        seen.add(key)
        if key in excluded:
            repeats += 1
        else:
            kept.append(record)
    return kept, len(records) - len(seen), repeats


def _plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def fold_split(records, folds=10, fold=0, seed=1234, train_fraction=1, test=None):
    """{"train", "valid", "test"} of `records`: shuffled once with random.Random(seed), cut into
    `folds` consecutive folds (sizes differ by at most one); fold `fold` is test, fold
    (fold+1) % folds valid, the others train in shuffled order. With `test` given, those records
    are the test split, fold `fold` is valid and the others train. Only the first
    ceil(train_fraction x n) training records are kept."""
    least = 2 if test is not None else 3
    if folds < least:
        raise VLMError(f"--folds {folds}: need at least {least} folds (" +
                       ("valid and train" if test is not None else "test, valid and train") + ")")
    if not 0 <= fold < folds:
        raise VLMError(f"--fold {fold}: must be 0 to {folds - 1} for --folds {folds}")
    if not 0 < train_fraction <= 1:
        raise VLMError(f"--train_fraction {train_fraction}: must be more than 0 and at most 1")
    if len(records) < folds:
        raise VLMError(f"--folds {folds}: {len(records)} records cannot fill {folds} folds")
    order = list(records)
    random.Random(seed).shuffle(order)
    bounds = [len(order) * k // folds for k in range(folds + 1)]
    parts = [order[bounds[k]:bounds[k + 1]] for k in range(folds)]
    if test is None:
        held_out = {"test": fold, "valid": (fold + 1) % folds}
        split = {"test": parts[fold], "valid": parts[(fold + 1) % folds]}
    else:
        held_out = {"valid": fold}
        split = {"test": list(test), "valid": parts[fold]}
    train = [record for k, part in enumerate(parts) if k not in held_out.values() for record in part]
    split["train"] = train[:math.ceil(train_fraction * len(train))]
    return {name: split[name] for name in SPLITS}


def write_user_task(output, split):
    """DIR/train.jsonl, valid.jsonl, test.jsonl, one JSON object a line, each written atomically."""
    paths = []
    for name, records in split.items():
        path = os.path.join(output, f"{name}.jsonl")
        try:
            write_lines(path, [json.dumps(record, ensure_ascii=False) for record in records])
        except OSError as error:
            raise VLMError(f"{path}: cannot write: {error}") from None
        paths.append(path)
    return paths


def prepare_user_task(args):
    """Convert, de-duplicate and split one user task's files; returns (splits, notes to print)."""
    notes = []
    if args.task == "sentiment":
        records, test = read_phrasebank(args.input), None
    else:
        def read_all(paths):
            records, skipped = [], 0
            for path in paths:
                found, missed = read_assistant_csv(path)
                records += found
                skipped += missed
            if skipped:
                notes.append(f"skipped {_plural(skipped, 'row')} without an answer_annotation in "
                             f"{' '.join(paths)}")
            return records

        records = read_all(args.train)
        test = read_all(args.test) if args.test else None
        if test is not None:
            test, dropped, _ = drop_duplicates(test)
            if dropped:
                notes.append(f"dropped {_plural(dropped, 'duplicate test record')}")
            if not test:
                raise VLMError(f"--test {' '.join(args.test)}: no records")
    records, dropped, repeats = drop_duplicates(records, test or ())
    if dropped:
        notes.append(f"dropped {_plural(dropped, 'duplicate record')}")
    if repeats:
        notes.append(f"dropped {_plural(repeats, 'training record')} equal to a test record")
    if not records:
        raise VLMError(f"{' '.join(args.train if args.task == 'assistant' else [args.input])}: no records")
    split = fold_split(records, args.folds, args.fold, args.seed, args.train_fraction, test)
    return split, notes


def train_fraction(text):
    """An exact fraction ('0.07' is 7/100, so ceil(0.07 x 100) is 7, not 8 as in floating point)."""
    try:
        value = fractions.Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {text}")
    return value


# ---------------------------------------------------------------------------------------------
# Command line


def slice_window(text):
    match = re.fullmatch(r"(\d*):(\d*)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected START:STOP (e.g. 0:300), got {text!r}")
    start, stop = match.groups()
    return int(start or 0), (int(stop) if stop else None)


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for task in TASKS:
        command = commands.add_parser(task, help=f"{task}: the authors' dataset JSON")
        for split in SPLITS:
            command.add_argument(f"--{split}", nargs="+", metavar="PATH",
                                 help=f"{split} files (a parallel corpus as SRC TGT)")
        command.add_argument("--slice", nargs=2, action="append", default=[], metavar=("SPLIT", "START:STOP"),
                             help="keep only these items of a split (nlg: MRs with all their references)")
        command.add_argument("--output", required=True, metavar="FILE.json", help="dataset JSON to write")
    for task, help_text in (("assistant", "NLU-Evaluation-Data CSV -> intent_and_slot JSON lines"),
                            ("sentiment", "Financial PhraseBank -> sentiment JSON lines")):
        command = commands.add_parser(task, help=help_text)
        if task == "assistant":
            command.add_argument("--train", nargs="+", required=True, metavar="CSV",
                                 help="training CSV files (concatenated): the folds of train and valid")
            command.add_argument("--test", nargs="+", metavar="CSV",
                                 help="test CSV files (else a fold is test)")
        else:
            command.add_argument("--input", required=True, metavar="TXT", help="a Sentences_*.txt file")
        command.add_argument("--output", required=True, metavar="DIR",
                             help="folder for train/valid/test.jsonl")
        command.add_argument("--folds", type=int, default=10, metavar="K",
                             help="number of folds (default 10)")
        command.add_argument("--fold", type=int, default=0, metavar="I",
                             help="fold I is test, fold I+1 valid (default 0)")
        command.add_argument("--seed", type=int, default=1234, help="shuffling seed (default 1234)")
        command.add_argument("--train_fraction", type=train_fraction, default=fractions.Fraction(1),
                             metavar="F",
                             help="keep the first ceil(F x n) training records (0 < F <= 1, default 1)")
    args = parser.parse_args(argv)
    args.slices = {}
    for split, window in getattr(args, "slice", []):
        if split not in SPLITS:
            parser.error(f"--slice: split must be one of {', '.join(SPLITS)}, got {split!r}")
        try:
            args.slices[split] = slice_window(window)
        except argparse.ArgumentTypeError as error:
            parser.error(f"--slice {split}: {error}")
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.task in ("assistant", "sentiment"):
        split, notes = prepare_user_task(args)
        paths = write_user_task(args.output, split)
        for note in notes:
            print(note)
        for name, records in split.items():
            print(f"{name}: {len(records)} records")
        print(f"wrote {', '.join(paths)}")
        return
    split_paths = {split: getattr(args, split) for split in SPLITS if getattr(args, split)}
    if not split_paths:
        raise VLMError("give at least one of --train, --valid, --test")
    dataset = prepare(args.task, split_paths, args.slices)
    try:
        write_json(args.output, dataset)
    except OSError as error:
        raise VLMError(f"{args.output}: cannot write: {error}") from None
    for split, records in dataset.items():
        print(f"{split}: {describe(args.task, records)}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
