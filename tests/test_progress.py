"""Progress a person reads: bars that redraw in place on a terminal; in a log (CI, `> log`,
nohup) whole lines only, at most one every LINE_INTERVAL seconds plus one when a bar ends."""
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

from conftest import REPO
from tqdm.std import tqdm

from utils import progress
from utils.progress import LineWriter, engine_progress_bar, progress_bar, tqdm_kwargs


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_gets_a_line_per_interval_and_the_last_state():
    clock, log = Clock(), io.StringIO()
    writer = LineWriter(log, interval=10, clock=clock)
    with tqdm(total=95, desc="decoding", file=writer, mininterval=0, ascii=True) as bar:
        for _ in range(95):
            clock.now += 1
            bar.update(1)  # tqdm redraws after every update here
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [re.search(r" (\d+)/95 ", line).group(1) for line in lines] == [
        "10", "20", "30", "40", "50", "60", "70", "80", "90", "95"]
    assert all(line.startswith("decoding: ") for line in lines)


def test_messages_are_lines_and_a_bar_without_leave_leaves_nothing_more():
    clock, log = Clock(), io.StringIO()
    writer = LineWriter(log, interval=10, clock=clock)
    bar = tqdm(total=4, desc="inner", file=writer, mininterval=0, leave=False)
    bar.update(1)
    tqdm.write("a message", file=writer)
    clock.now += 3
    bar.update(1)
    bar.close()
    assert log.getvalue() == "a message\n"


def test_terminal_bars_redraw_in_place_and_logs_get_line_writers():
    terminal = Terminal()
    with progress_bar(range(3), desc="work", stream=terminal, mininterval=0) as bar:
        for _ in bar:
            pass
    assert terminal.getvalue().count("\r") >= 3 and "work: 100%" in terminal.getvalue()
    assert tqdm_kwargs(terminal) == {"file": terminal}
    options = tqdm_kwargs(io.StringIO())
    assert isinstance(options["file"], LineWriter) and options["ascii"] is True
    assert tqdm_kwargs(io.StringIO())["file"] is not options["file"]  # each bar its own lines


def test_engine_bar_in_a_log_writes_one_line_per_epoch(capsys):
    from ignite.engine import Engine, Events
    log = io.StringIO()
    engine = Engine(lambda engine, batch: 0.5)
    bar = engine_progress_bar(stream=log)
    bar.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: bar.log_message(f"done {e.state.epoch}"))
    engine.run(range(30), max_epochs=3)
    assert log.getvalue().splitlines() == [f"Epoch [{n}/3]: [30/30] 100%|########## [00:00<00:00]"
                                           for n in (1, 2, 3)]
    assert capsys.readouterr().out == "done 1\ndone 2\ndone 3\n"


def test_every_progress_bar_comes_from_the_helper():
    """tqdm and ignite's ProgressBar are used in utils/progress.py only."""
    found = []
    for folder in ("utils", "models", "bench", "."):
        for name in os.listdir(os.path.join(REPO, folder)):
            path = os.path.join(REPO, folder, name)
            if name.endswith(".py") and name != "progress.py" and "pretrain" not in name:
                text = open(path, encoding="utf-8").read()
                if re.search(r"\btqdm\b|\bProgressBar\b", text):
                    found.append(os.path.relpath(path, REPO))
    assert found == []
    assert progress.LINE_INTERVAL == 10.0


# --- train.py as a person runs it ------------------------------------------------------------
def progress_train(tmp_path, base, out):
    records = [{"src": {"name": f"Place{i}", "eatType": "pub"}, "tgt": f"Place{i} is a pub."}
               for i in range(12)]
    data = tmp_path / "nlg.json"
    data.write_text(json.dumps({"train": records, "valid": records[:2], "test": records[:2]}),
                    encoding="utf-8")
    argv = [sys.executable, "train.py", "--task", "nlg", "--dataset_path", str(data), "--dataset_cache",
            str(tmp_path / "cache"), "--model_checkpoint", base, "--device", "cpu", "--output_dir",
            str(tmp_path / out), "--adapter_bottleneck", "4", "--train_batch_size", "2",
            "--valid_batch_size", "2", "--gradient_accumulation_steps", "1", "--n_epochs", "3"]
    env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return argv, env


def test_training_log_is_a_readable_page(tmp_path, tiny_base):
    argv, env = progress_train(tmp_path, tiny_base, "log_run")
    start = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    bar_lines = [line for line in done.stderr.splitlines() if line.startswith("Epoch [")]
    ends = [line for line in bar_lines if "[6/6] 100%" in line]
    assert [line[:12] for line in ends] == ["Epoch [1/3]:", "Epoch [2/3]:", "Epoch [3/3]:"]
    assert len(bar_lines) <= len(ends) + seconds / progress.LINE_INTERVAL
    assert [line[:24] for line in done.stdout.splitlines() if line.startswith("validation after")] == [
        f"validation after epoch {n}" for n in (1, 2, 3)]                   # on stdout, whole lines
    assert len(done.stderr.splitlines()) < 20, done.stderr  # a page, not a flood of redraws


def test_training_on_a_terminal_redraws_in_place(tmp_path, tiny_base):
    argv, env = progress_train(tmp_path, tiny_base, "tty_run")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=follower)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert process.wait(timeout=300) == 0, screen.decode(errors="replace")[-3000:]
    text = screen.decode(errors="replace")
    assert text.count("\r") > 6            # redraws: a carriage return per redraw
    assert "Epoch [3/3]: [6/6] 100%" in text
