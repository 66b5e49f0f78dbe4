"""The registry of per-task methods: one small file each, read by training, saving, loading and
combining alike. `--method prefix+ln` composes methods for one task, applied in that order where
they share an attachment point."""
from models.methods.base import LINEAR_NAMES, POINTS, BackboneShape, Method
from utils.errors import VLMError

METHODS = {}


def register(cls):
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name} registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(name, where="--method"):
    if name not in METHODS:
        raise VLMError(f"{where}: unknown method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]


def parse_method_spec(spec, where="--method", shown=None):
    """`prefix+ln` -> ["prefix", "ln"]: known names, none twice. Errors quote `shown` (default: spec)."""
    names = [part.strip() for part in str(spec).split("+")]
    shown = spec if shown is None else shown
    if not all(names):
        raise VLMError(f"{where} {shown}: expected method names joined by '+', e.g. prefix+ln")
    for name in names:
        method_class(name, f"{where} {shown}")
    if len(set(names)) != len(names):
        raise VLMError(f"{where} {shown}: a method is named twice")
    return names


def key_prefix(task, method_name):
    """Checkpoint key prefix of a task's method tensors (the adapter keeps its historical keys)."""
    cls = METHODS[method_name]
    if getattr(cls, "key_prefix", None):
        return f"{cls.key_prefix}.{task}."
    return f"methods.{task}.{method_name}."


def _register_all():
    from models.methods import (  # noqa: F401
        adapter,
        adapterbias,
        compacter,
        houlsby,
        krona,
        ln,
        lora,
        parallel,
        prefix,
        prompt,
        ptuning,
        unipelt,
    )
    # the registry's order is the table order (--help, tables, run.sh --stages methods)
    for module in (adapter, houlsby, parallel, lora, prefix, prompt, ptuning, ln, adapterbias, compacter,
                   krona, unipelt):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Method) and value is not Method and value.name \
                    and value.__module__ == module.__name__:
                register(value)


_register_all()

__all__ = ["METHODS", "LINEAR_NAMES", "POINTS", "BackboneShape", "Method", "key_prefix", "method_class",
           "parse_method_spec", "register"]
