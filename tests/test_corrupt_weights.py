"""Every kind of weights file we read, damaged the ways disks and interrupted copies damage them,
gives one `error:` line naming the file, exit status 2 and no traceback, from the real script:

kinds: a full-model checkpoint (train.py full fine-tuning: model.safetensors), a plain Hugging Face
GPT-2 folder (from_pretrained), an adapter checkpoint (adapters.safetensors), a combined VLM
(combine_all.py), the epoch state `train.py --resume` reads (training_state.safetensors) and the
authors' pytorch_model.bin (weights-only torch.load).
damage: cut inside the 8-byte header length (a zip's first entry header for the .bin), inside the
JSON header (inside the first entry's data), inside the tensor data (the middle of the file), and
every byte overwritten with random ones (same length).

Each checkpoint is built once; each case damages a copy. The cases' scripts run two at a time."""
import json
import os
import random
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import run_script
from test_authors import authors_state
from test_train import train_argv, train_in_process

from engines.specs import adapter_specs
from models.checkpoint import save_checkpoint
from models.combine import combine, load_task_checkpoints, write_vlm
from models.vlm import VersatileLM
from utils.data import load_tokenizer

KINDS = ("full checkpoint", "plain GPT-2 folder", "adapter checkpoint", "combined VLM", "resume state",
         "authors' bin")
DAMAGE = ("cut in header length", "cut in header", "cut in data", "random bytes")
NLG_INPUT = "name[The Vaults], eatType[pub]"


def cut_offset(path, damage):
    """Where to cut `path` for a damage kind: inside the safetensors length field, JSON header or
    data; for a zip (.bin), inside the first entry's header, its data, or the middle."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = f.read(8)
    if path.endswith(".bin"):  # zip: 30-byte local header, then the name and the first entry
        return {"cut in header length": 4, "cut in header": 20, "cut in data": size // 2}[damage]
    header = struct.unpack("<Q", start)[0]
    return {"cut in header length": 4, "cut in header": 8 + header // 2,
            "cut in data": 8 + header + (size - 8 - header) // 2}[damage]


def damage_file(path, damage, seed):
    size = os.path.getsize(path)
    if damage == "random bytes":
        data = random.Random(seed).randbytes(size)
    else:
        with open(path, "rb") as f:
            data = f.read(cut_offset(path, damage))
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_base):
    """{kind: (folder to copy, weights file inside it, argv with {root} for the copy)}."""
    root = tmp_path_factory.mktemp("pristine")
    tokenizer = load_tokenizer()
    full = VersatileLM.from_pretrained(tiny_base)
    save_checkpoint(full, tokenizer, str(root / "full"), "full", ["nlg"], tiny_base)
    shutil.copytree(tiny_base, root / "plain")
    for task in ("nlg", "mt"):
        model = VersatileLM.from_pretrained(tiny_base, adapter_specs({task: 4}))
        save_checkpoint(model, tokenizer, str(root / "adapters" / task), "adapter", [task], tiny_base)
    write_vlm(combine(load_task_checkpoints([str(root / "adapters" / t) for t in ("nlg", "mt")])),
              str(root / "vlm" / "VLM"), log=None)
    # A real run, two epochs: checkpoint_epoch2/ is the one --resume reads.
    run_root = root / "resume"
    run_root.mkdir()
    data = run_root / "nlg.json"
    records = [{"src": {"name": f"Place{i}", "eatType": "pub"}, "tgt": f"Place{i} is a pub."}
               for i in range(4)]
    data.write_text(json.dumps({"train": records, "valid": records[:2]}), encoding="utf-8")
    resume_argv = train_argv(run_root, str(data), tiny_base, "--adapter_bottleneck", "4", "--n_epochs", "2",
                             out="run")
    train_in_process(resume_argv)
    os.makedirs(root / "authors")
    torch.save(authors_state(), root / "authors" / "pytorch_model.bin")

    evaluate = ["--task", "nlg", "--device", "cpu", "--no_sample", "--max_length", "3", "--input", NLG_INPUT]
    at = resume_argv.index("--output_dir")
    return {
        "full checkpoint": (root / "full", "model.safetensors",
                            ["evaluate.py", "--model_checkpoint", "{root}", *evaluate]),
        "plain GPT-2 folder": (root / "plain", "model.safetensors",
                               ["evaluate.py", "--model_checkpoint", "{root}", *evaluate]),
        "adapter checkpoint": (root / "adapters", "nlg/adapters.safetensors",
                               ["combine_all.py", "{root}/nlg", "{root}/mt", "--output_dir", "{root}/VLM"]),
        "combined VLM": (root / "vlm", "VLM/adapters.safetensors",
                         ["evaluate_vlm.py", "--model_checkpoint", "{root}/VLM", *evaluate]),
        "resume state": (run_root / "run", "checkpoint_epoch2/training_state.safetensors",
                         ["train.py", *resume_argv[:at + 1], "{root}", *resume_argv[at + 2:], "--resume"]),
        "authors' bin": (root / "authors", "pytorch_model.bin",
                         ["-m", "engines.authors", "{root}/pytorch_model.bin", "--base_model", tiny_base,
                          "--output_dir", "{root}/converted"]),
    }


@pytest.fixture(scope="module")
def outcomes(pristine, tmp_path_factory):
    """{(kind, damage): (damaged file, CompletedProcess)}, every case run two at a time."""
    cases = {}
    for k, kind in enumerate(KINDS):
        folder, weights, argv = pristine[kind]
        for d, damage in enumerate(DAMAGE):
            copy = tmp_path_factory.mktemp("damaged") / folder.name
            shutil.copytree(folder, copy)
            damage_file(str(copy / weights), damage, seed=10 * k + d)
            cases[kind, damage] = (str(copy / weights), [a.replace("{root}", str(copy)) for a in argv])
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {case: pool.submit(run_script, *argv, timeout=300) for case, (_, argv) in cases.items()}
        return {case: (cases[case][0], future.result()) for case, future in done.items()}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_weights_file_is_one_error_naming_it(outcomes, kind, damage):
    path, done = outcomes[kind, damage]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), done.stderr[-3000:]
    assert done.returncode == 2


def test_undamaged_checkpoints_load(pristine):
    """The same commands on the undamaged files succeed: the errors above are the damage's."""
    for kind in ("full checkpoint", "combined VLM"):
        folder, _, argv = pristine[kind]
        done = run_script(*[a.replace("{root}", str(folder)) for a in argv])
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip()
