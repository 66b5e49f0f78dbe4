"""The Java half of the official E2E scorer (tuetschek/e2e-metrics `measure_scores.py`), run from the
files the pycocoevalcap wheel ships, as its wrappers run them:

- `ptb_captions`: Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`), then
  pycocoevalcap's punctuation removal; METEOR, ROUGE-L and CIDEr read these captions.
- `meteor`: METEOR 1.5 (`-l en -norm`, with its English paraphrase table) over the stdio protocol
  of pycocoevalcap's Meteor class: one SCORE line per segment, then one EVAL line.

Every call starts its own Java process, bounded by a timeout, and ends it before returning. Any
problem (no `java` on PATH, no pycocoevalcap, a crash, a timeout, an answer that does not parse)
raises JavaUnavailable, on which utils.metrics.e2e_scores falls back to its approximation.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import threading

JAVA_TIMEOUT = 600  # seconds for one Java run; METEOR alone spends ~10 s loading its paraphrase table

# pycocoevalcap drops these tokens. The list is upper-case, but the tokenizer runs with -lowerCase,
# so its "-lrb-" etc. are kept: the official figures count them, and so do ours.
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
               "--", "...", ";"}
# Characters PTBTokenizer ends a line at. pycocoevalcap replaces only "\n", so with any other of them
# its captions shift by a line; here they become spaces and each text stays one caption.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\u2028\u2029]")


class JavaUnavailable(Exception):
    """The official tools cannot run; the message says why. `quiet`: the expected case of a machine
    without Java, which needs no warning (the METEOR* name says it)."""

    def __init__(self, message, quiet=False):
        super().__init__(message)
        self.quiet = quiet


def _tools():
    """(java executable, pycocoevalcap's folder), or JavaUnavailable."""
    java = shutil.which("java")
    if not java:
        raise JavaUnavailable("no java on PATH", quiet=True)
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise JavaUnavailable("the pycocoevalcap package (its Java files) is not installed")
    return java, list(spec.submodule_search_locations)[0]


def available():
    """Whether the official tools can be started here (java on PATH, pycocoevalcap installed)."""
    try:
        _tools()
    except JavaUnavailable:
        return False
    return True


def _file(folder, *parts):
    path = os.path.join(folder, *parts)
    if not os.path.isfile(path):
        raise JavaUnavailable(f"{path} is missing")
    return path


def _last_line(data):
    lines = data.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "no message"


def ptb_captions(texts, timeout=JAVA_TIMEOUT):
    """Each text as pycocoevalcap's PTBTokenizer gives it to the scorers: lower-cased PTB tokens
    without punctuation, joined by single spaces (ROUGE-L re-splits on " ", CIDEr on whitespace)."""
    if not texts:
        return []
    java, folder = _tools()
    jar = _file(folder, "tokenizer", "stanford-corenlp-3.4.1.jar")
    lines = [_LINE_BREAKS.sub(" ", text) for text in texts]
    with tempfile.TemporaryDirectory() as tmp:
        # the input pycocoevalcap writes: a file of the texts, one a line, no final newline
        path = os.path.join(tmp, "captions.txt")
        with open(path, "wb") as f:
            f.write("\n".join(lines).encode("utf-8"))
        command = [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                   "-lowerCase", path]
        try:
            done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise JavaUnavailable(f"the PTB tokenizer took longer than {timeout} s") from None
        except OSError as error:
            raise JavaUnavailable(f"cannot run java: {error}") from None
    if done.returncode:
        raise JavaUnavailable(f"the PTB tokenizer failed (exit {done.returncode}): {_last_line(done.stderr)}")
    tokenized = done.stdout.decode("utf-8").split("\n")
    if len(tokenized) < len(lines) or any(tokenized[len(lines):]):
        raise JavaUnavailable(f"the PTB tokenizer gave {len(tokenized)} lines for {len(lines)} texts")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATION)
            for line in tokenized[:len(lines)]]


def meteor(hypotheses, references, timeout=JAVA_TIMEOUT):
    """Corpus METEOR 1.5 of captions (hypotheses[i] against the list references[i]) exactly as
    pycocoevalcap computes it: the statistics of all segments summed, not a mean of their scores."""
    java, folder = _tools()
    jar = _file(folder, "meteor", "meteor-1.5.jar")
    command = [java, "-jar", "-Xmx2G", jar, "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as errors:
        try:
            # the cwd pycocoevalcap uses: METEOR finds its data/paraphrase-en.gz beside the jar
            process = subprocess.Popen(command, cwd=os.path.dirname(jar), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=errors)
        except OSError as error:
            raise JavaUnavailable(f"cannot run java: {error}") from None
        expired = threading.Event()

        def kill():
            expired.set()
            process.kill()

        watchdog = threading.Timer(timeout, kill)
        with process:  # on leaving: pipes closed, process waited for
            watchdog.start()
            try:
                return _meteor_dialogue(process, hypotheses, references)
            except (OSError, ValueError) as error:  # a closed pipe, an answer that is not a number
                if expired.is_set():
                    raise JavaUnavailable(f"METEOR took longer than {timeout} s") from None
                process.kill()
                process.wait()
                errors.seek(0)
                raise JavaUnavailable(f"METEOR failed ({error}): {_last_line(errors.read())}") from None
            finally:
                watchdog.cancel()
                process.kill()  # it would wait for more lines; pycocoevalcap ends it so too


def _meteor_dialogue(process, hypotheses, references):
    """pycocoevalcap's Meteor.compute_score, line for line."""
    def ask(line, answers=1):
        process.stdin.write(f"{line}\n".encode("utf-8"))
        process.stdin.flush()
        replies = [process.stdout.readline().decode("utf-8").strip() for _ in range(answers)]
        if not all(replies):
            raise OSError("METEOR stopped answering")
        return replies

    statistics = []
    for hypothesis, refs in zip(hypotheses, references):
        hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
        statistics.append(ask(" ||| ".join(("SCORE", " ||| ".join(refs), hypothesis)))[0])
    # EVAL answers each segment's score, then the corpus score
    replies = ask(" ||| ".join(["EVAL"] + statistics), answers=len(statistics) + 1)
    return float(replies[-1])
