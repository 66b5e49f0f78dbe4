"""Progress bars that suit where stderr goes; every progress bar of the toolkit comes from here.

- stderr is a terminal: a tqdm bar that redraws in place, as usual.
- stderr is not a terminal (CI, `> log`, nohup): whole lines only, no carriage returns. A bar's
  state is written at most once every LINE_INTERVAL seconds, plus its last state when it ends
  (one line per epoch for a training bar), so a log stays a readable page.

Use:

    from utils.progress import progress_bar, engine_progress_bar

    for batch in progress_bar(loader, desc="pretraining", unit="batch"):   # any loop, like tqdm()
        ...
    with progress_bar(total=len(items), desc="decoding", unit="ex", disable=quiet) as bar:
        bar.update(len(chunk))

    pbar = engine_progress_bar()                          # an ignite Engine's bar (epochs)
    pbar.attach(trainer, metric_names=["loss"])
    pbar.log_message("validation after epoch 1: ...")    # to stdout, between the bar's lines

progress_bar takes tqdm's arguments; tqdm_kwargs() gives the keyword arguments that adapt any
other tqdm (or ignite) bar the same way.
"""
import re
import sys
import time

LINE_INTERVAL = 10.0  # seconds between two lines of one bar when stderr is not a terminal
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # cursor moves tqdm writes for nested bars


def on_terminal(stream=None):
    """Whether `stream` (default: sys.stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class LineWriter:
    """A file for tqdm that turns redraws into occasional whole lines.

    tqdm redraws a bar as "\\r<state>"; each state only replaces the remembered one, and is
    written (with a newline) when `interval` seconds have passed since the last line. Text that
    tqdm ends with a newline (a bar that closes with leave=True, tqdm.write) is written at once;
    a bar that closes with leave=False leaves nothing more."""

    def __init__(self, stream=None, interval=LINE_INTERVAL, clock=time.monotonic):
        self._stream = stream      # None: sys.stderr at each write (which tests may swap)
        self.interval = interval
        self.clock = clock
        self._current = ""         # text since the last \r or \n: the bar's latest state
        self._last_line = None
        self._last_line_at = clock()

    @property
    def stream(self):
        return sys.stderr if self._stream is None else self._stream

    def write(self, text):
        for piece in re.split(r"(\r|\n)", text):
            if piece == "\r":
                self._current = ""
            elif piece == "\n":
                self._emit(self._current)
                self._current = ""
            else:
                self._current += piece
        return len(text)

    def flush(self):
        """tqdm flushes after each redraw: the moment to write a line if one is due."""
        if self.clock() - self._last_line_at >= self.interval:
            self._emit(self._current)

    def _emit(self, text):
        line = _ESCAPES.sub("", text).strip()
        if not line or line == self._last_line:  # a redraw of the state already written
            return
        sys.stdout.flush()  # what was printed before comes first in a shared log
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last_line, self._last_line_at = line, self.clock()


def tqdm_kwargs(stream=None, interval=LINE_INTERVAL):
    """Keyword arguments for tqdm(...) or ignite's ProgressBar(...) that suit `stream` (default
    sys.stderr): none on a terminal; elsewhere a LineWriter (own to this bar), ASCII bars and a
    fixed position (nested bars each keep their own lines)."""
    if on_terminal(stream):
        return {} if stream is None else {"file": stream}
    return {"file": LineWriter(stream, interval), "ascii": True, "position": 0, "mininterval": 1.0}


def progress_bar(iterable=None, *, stream=None, interval=LINE_INTERVAL, **kwargs):
    """tqdm(iterable, **kwargs) for `stream` (default sys.stderr): redraws on a terminal, a line
    every `interval` seconds and one at the end elsewhere. Usable as an iterator or a context
    manager, exactly like tqdm (update, set_postfix, close, disable=...)."""
    options = tqdm_kwargs(stream, interval)
    if "file" in options and isinstance(options["file"], LineWriter):
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(iterable, **{**options, **kwargs})


def engine_progress_bar(stream=None, interval=LINE_INTERVAL, **kwargs):
    """ignite's ProgressBar(persist=True) for an Engine, through tqdm_kwargs. Attach it with
    .attach(engine, metric_names=[...]); log_message(text) prints to stdout between its lines."""
    from ignite.handlers import ProgressBar
    from tqdm.std import tqdm

    class EngineProgressBar(ProgressBar):
        def log_message(self, message):
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    return EngineProgressBar(**{"persist": True, **tqdm_kwargs(stream, interval), **kwargs})
