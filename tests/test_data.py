"""The input builder (hand-written expected ids per task), loaders, cache and batching."""
import json

import pytest
import torch

import utils.data as data
from tasks.table import TASKS
from utils.data import LengthGroupedBatchSampler, collate
from utils.errors import VLMError

X = -100  # ignored label


def test_mt_layout_by_hand():
    # [bos_mt] [source_mt] 10 11 12 [target_mt] 20 21 [eos_mt]
    example = TASKS["mt"].build_inputs([10, 11, 12], [20, 21])
    assert example["input_ids"] == [50268, 50270, 10, 11, 12, 50271, 20, 21, 50269]
    assert example["token_type_ids"] == [50268, 50270, 50270, 50270, 50270, 50271, 50271, 50271, 50271]
    assert example["labels"] == [X, X, X, X, X, X, 20, 21, 50269]


def test_summarization_prompt_without_eos_by_hand():
    example = TASKS["summarization"].build_inputs([7, 8], [], with_eos=False)
    assert example["input_ids"] == [50272, 50274, 7, 8, 50275]
    assert example["token_type_ids"] == [50272, 50274, 50274, 50274, 50275]
    assert example["labels"] == [X, X, X, X, X]


def test_nlg_layout_by_hand():
    # [bos_nlg] [name] 1 2 [customerRating] 3 [response] 4 5 [eos_nlg]; slots in the MR's order
    example = TASKS["nlg"].build_inputs([("name", [1, 2]), ("customer rating", [3])], [4, 5])
    assert example["input_ids"] == [50276, 50278, 1, 2, 50285, 3, 50286, 4, 5, 50277]
    assert example["token_type_ids"] == [50276, 50278, 50278, 50278, 50285, 50285, 50286, 50286, 50286, 50286]
    assert example["labels"] == [X, X, X, X, X, X, X, 4, 5, 50277]


def test_dialogue_layout_by_hand_with_the_segment_quirk():
    # persona [1 2] [3]; history [4] [5] [6]; reply [7 8].
    # Prefixes alternate backwards from the reply: reply speaker2, 6 speaker1, 5 speaker2, 4 speaker1.
    # Segments alternate forwards from the first turn: 4 speaker1, 5 speaker2, 6 speaker1, reply
    # speaker2; with an odd number of history turns the two agree.
    bos, eos, s1, s2, persona = 50258, 50259, 50260, 50261, 50262
    example = TASKS["dialogue"].build_inputs(([[1, 2], [3]], [[4], [5], [6]]), [7, 8])
    assert example["input_ids"] == [bos, persona, 1, 2, 3, s1, 4, s2, 5, s1, 6, s2, 7, 8, eos]
    assert example["token_type_ids"] == [persona] * 5 + [s1, s1, s2, s2, s1, s1, s2, s2, s2, s2]
    assert example["labels"] == [X] * 12 + [7, 8, eos]
    # With an even number of history turns prefixes and segments disagree (the authors' quirk).
    example = TASKS["dialogue"].build_inputs(([[1]], [[4], [5]]), [7])
    assert example["input_ids"] == [bos, persona, 1, s2, 4, s1, 5, s2, 7, eos]
    assert example["token_type_ids"] == [persona] * 3 + [s1, s1, s2, s2, s1, s1, s1]


def test_qa_layout_by_hand():
    bos, eos, question, answer, document = 50263, 50264, 50265, 50266, 50267
    example = TASKS["qa"].build_inputs(([[9, 9]], [[1], [2], [3]]), [4])
    assert example["input_ids"] == [bos, document, 9, 9, question, 1, answer, 2, question, 3, answer, 4, eos]
    assert example["token_type_ids"] == [document] * 4 + [question, question, answer, answer,
                                                          question, question, answer, answer, answer]
    assert example["labels"] == [X] * 11 + [4, eos]


def test_training_contexts_follow_the_authors_loaders():
    mt = TASKS["mt"]
    records = [{"src": [1], "tgt": [2, 3]}, {"src": list(range(150)), "tgt": list(range(120))}]
    contexts = list(mt.iter_contexts(records, 2))
    assert len(contexts) == 1  # pairs under 2 tokens dropped
    source, target, _, _ = contexts[0]
    assert source == list(range(100)) and target == list(range(100))
    # evaluation keeps short pairs, cuts only the source
    evaluation = list(mt.iter_contexts(records, 2, for_training=False))
    assert len(evaluation) == 2 and len(evaluation[1][1]) == 120

    qa = TASKS["qa"]
    record = {"id": "s", "document": [list(range(500))],
              "utterances": [{"history": [[1], [2], [3], [4], [5]], "candidates": [[6]], "turn_id": 3}]}
    (persona, history), target, _, _ = next(qa.iter_contexts([record], qa.max_history))
    assert persona == [list(range(400))] and history == [[3], [4], [5]] and target == [6]

    dialogue = TASKS["dialogue"]
    record = {"personality": [[1], [2], [3]],
              "utterances": [{"history": [[9]], "candidates": [[0], [7]]}] * 3}
    personas = [c[0][0] for c in dialogue.iter_contexts([record], 2)]
    assert personas == [[[1], [2], [3]], [[3], [1], [2]], [[2], [3], [1]]]  # rotated per utterance
    fixed = [c[0][0] for c in dialogue.iter_contexts([record], 2, rotate_persona=False)]
    assert fixed == [[[1], [2], [3]]] * 3


def write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def test_loader_tokenizes_keeps_ids_and_uses_the_cache(tmp_path, tokenizer, monkeypatch):
    path = write(tmp_path / "qa.json", {"train": [{"id": "abc", "document": ["The cat sat."], "utterances": [
        {"history": ["Who sat?"], "candidates": ["wrong", "the cat"], "turn_id": 1}]}], "valid": []})
    loaded = TASKS["qa"].load_data(path, tokenizer, ["train"], str(tmp_path / "cache"))
    record = loaded["train"][0]
    assert record["id"] == "abc" and record["utterances"][0]["turn_id"] == 1
    assert record["document"] == [tokenizer.encode("The cat sat.")]
    assert record["utterances"][0]["candidates"] == [tokenizer.encode("the cat")]  # gold only
    caches = list(tmp_path.glob("cache_qa_*.json"))
    assert len(caches) == 1

    def no_tokenizing(*args):
        raise AssertionError("re-tokenized despite a valid cache")

    monkeypatch.setattr(data, "tokenize_structure", no_tokenizing)
    assert TASKS["qa"].load_data(path, tokenizer, ["train"], str(tmp_path / "cache")) == loaded
    # an edited file gets a new cache entry
    monkeypatch.undo()
    write(tmp_path / "qa.json", {"train": [{"id": "abc", "document": ["A dog."], "utterances": [
        {"history": ["Who?"], "candidates": ["a dog"], "turn_id": 1}]}]})
    again = TASKS["qa"].load_data(path, tokenizer, ["train"], str(tmp_path / "cache"))
    assert again["train"][0]["document"] == [tokenizer.encode("A dog.")]
    assert len(list(tmp_path.glob("cache_qa_*.json"))) == 2


@pytest.mark.parametrize("content, message", [
    ({"train": [{"src": "a"}]}, r"split 'train' record 0: missing key 'tgt'"),
    ({"train": [{"src": "a", "tgt": 3}]}, r"record 0: 'tgt' must be a string"),
    ({"train": []}, r"split 'train' is empty"),
    ({"valid": [{"src": "a", "tgt": "b"}]}, r"no 'train' split"),
    ([1, 2], r"expected a JSON object of splits"),
])
def test_loader_errors_name_file_split_and_record(tmp_path, tokenizer, content, message):
    path = write(tmp_path / "mt.json", content)
    with pytest.raises(VLMError, match=message) as error:
        TASKS["mt"].load_data(path, tokenizer, ["train"])
    assert str(error.value).startswith(path)


def test_loader_errors_for_nlg_slots_bad_json_and_bytes(tmp_path, tokenizer):
    path = write(tmp_path / "nlg.json", {"train": [{"src": {"colour": "red"}, "tgt": "x"}]})
    with pytest.raises(VLMError, match="unknown NLG slot 'colour'"):
        TASKS["nlg"].load_data(path, tokenizer, ["train"])
    (tmp_path / "bad.json").write_text('{"train": [', encoding="utf-8")
    with pytest.raises(VLMError, match="invalid JSON at line 1"):
        TASKS["nlg"].load_data(str(tmp_path / "bad.json"), tokenizer, ["train"])
    (tmp_path / "latin.json").write_bytes(b'{"train": "\xe9"}')
    with pytest.raises(VLMError, match="not UTF-8"):
        TASKS["nlg"].load_data(str(tmp_path / "latin.json"), tokenizer, ["train"])
    with pytest.raises(VLMError, match="not found"):
        TASKS["nlg"].load_data(str(tmp_path / "missing.json"), tokenizer, ["train"])


def test_val_split_is_accepted_for_valid(tmp_path, tokenizer):
    path = write(tmp_path / "sm.json", {"train": [{"src": "a b c", "tgt": "d e"}],
                                        "val": [{"src": "f g", "tgt": "h i"}]})
    loaded = TASKS["summarization"].load_data(path, tokenizer, ["train", "valid"])
    assert set(loaded) == {"train", "valid"}


def test_collate_pads_each_batch_to_its_own_longest():
    examples = [TASKS["mt"].build_inputs([1, 2], [3, 4]), TASKS["mt"].build_inputs([1, 2, 5, 6], [3, 4])]
    batch = collate(examples, TASKS["mt"].task_id)
    assert batch["input_ids"].shape == (2, 10)  # lengths 8 and 10
    assert batch["input_ids"][0, 8:].tolist() == [50257, 50257]
    assert batch["token_type_ids"][0, 8:].tolist() == [50257, 50257]
    assert batch["labels"][0, 8:].tolist() == [X, X]
    assert batch["task_ids"].tolist() == [2, 2]


def test_length_grouped_batches_cover_everything_once_and_pad_little():
    lengths = [5 + (i * 37) % 200 for i in range(1000)]
    sampler = LengthGroupedBatchSampler(lengths, 16, shuffle=True, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000)) and len(batches) == len(sampler)
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert real / padded > 0.9
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order each epoch
    halves = [list(LengthGroupedBatchSampler(lengths, 16, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) and not set(map(tuple, halves[0])) & set(map(tuple, halves[1]))


def test_training_examples_drop_too_long_inputs(caplog):
    mt = TASKS["mt"]
    records = [{"src": list(range(50)), "tgt": [1, 2]}, {"src": [1, 2], "tgt": [3, 4]}]
    examples = mt.training_examples(records, 2, max_positions=20, where="mt.json train")
    assert len(examples) == 1 and "dropped 1 examples" in caplog.text
    with pytest.raises(VLMError, match="no usable examples"):
        mt.training_examples(records[:1], 2, max_positions=20, where="mt.json train")
    assert torch.tensor(examples[0]["input_ids"]).shape == (8,)


def test_banned_tokens_are_pad_and_other_tasks_tokens():
    banned = TASKS["nlg"].banned_ids()
    assert banned == tuple(range(50257, 50276))  # <pad> .. <target_sm>; nlg's own 50276-50286 allowed
    assert 50268 not in TASKS["mt"].banned_ids() and 50257 in TASKS["mt"].banned_ids()
