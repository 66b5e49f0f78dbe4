"""What every parameter-efficient method is: a module holding one task's tensors, which says
where in GPT-2 it acts and what it does there.

A method never sees the whole batch: the model's hooks (models/vlm.py) read the forward's one
Routing object (models/routing.py) and hand each method only its own task's rows. The
attachment points, each a method a subclass overrides, with tensor shapes (n: the task's rows):

    virtual_tokens()              -> (n_virtual, d)   embeddings of the task's virtual tokens
    prefix_kv()                   -> [(key, value)]    per layer, (heads, P, head_dim): prepended in attention
    prefix_gate(layer, x)         -> (n, T) in (0, 1)  per query position, scales the prefix's scores
                                                       and values
    layer_norm(layer, name, x)    -> (n, T, d)         replaces LayerNorm `name` (ln_1, ln_2; ln_f: layer -1)
    linear(layer, name, x, out)   -> out'              after a projection: c_attn, attn.c_proj, mlp.c_fc,
                                                       mlp.c_proj
    attn_output(layer, x, out)    -> out'              the attention sub-layer's output, before its
                                                       residual add
    mlp_output(layer, x, out)     -> out'              the MLP's output, before its residual add
    block_output(layer, h)        -> h'                a transformer block's output

`points` names the ones a method uses, so the model installs only the hooks some task needs.
Options are plain JSON values with the paper's defaults in `defaults`; `check()` validates them.
A method may train in one form and be saved in another (`exported()`: prefix tuning drops its
reparameterization MLP, p-tuning its prompt encoder); the options always describe the form
the tensors are in, so a checkpoint's config rebuilds exactly the saved module.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from utils.errors import VLMError

POINTS = ("virtual", "prefix", "prefix_gate", "layer_norm", "linear", "attn_output", "mlp_output",
          "block_output")
LINEAR_NAMES = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class BackboneShape:
    """The numbers of a GPT-2 that a method's tensor shapes depend on."""
    n_layer: int
    d_model: int
    n_head: int
    d_inner: int
    eps: float = 1e-5
    init_std: float = 0.02

    @classmethod
    def of(cls, config):
        return cls(config.n_layer, config.n_embd, config.n_head, config.n_inner or 4 * config.n_embd,
                   config.layer_norm_epsilon, config.initializer_range)

    @property
    def head_dim(self):
        return self.d_model // self.n_head

    def linear_shape(self, name):
        """(in, out) features of a projection (GPT-2's Conv1D layout: weight is (in, out))."""
        d, inner = self.d_model, self.d_inner
        return {"c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, inner),
                "mlp.c_proj": (inner, d)}[name]


class Method(nn.Module):
    name = None          # registry name, e.g. "lora"
    title = ""           # one line for --help and tables
    reference = ""       # the paper
    points = frozenset()
    defaults = {}        # option -> the paper's default
    help = {}            # option -> what it means
    batched_linear = False  # True: apply_batched_linear() handles all tasks' rows of a projection at once
    # Name prefixes of tensors --sparsity never prunes although they have two long sides: virtual
    # tokens, prefixes, per-layer vectors, and training-only encoders the saved form drops
    # (models/sparsity.py prunes every other weight tensor with two sides longer than 1).
    dense_tensors = ()

    def __init__(self, shape, options=None, backbone=None):
        """shape: BackboneShape; options: this method's options (missing ones take the defaults);
        backbone: the GPT-2 (read-only), for methods that start from its weights."""
        super().__init__()
        self.shape = shape
        self.options = self.resolve(options or {})

    # --- options ----------------------------------------------------------------------------
    @classmethod
    def resolve(cls, options, where=None):
        """Options completed with the defaults and checked; unknown ones are a VLMError."""
        where = where or f"--method {cls.name}"
        unknown = sorted(set(options) - set(cls.defaults))
        if unknown:
            raise VLMError(f"{where}: unknown option {unknown[0]!r} "
                           f"(options: {', '.join(cls.defaults) or 'none'})")
        resolved = dict(cls.defaults)
        resolved.update({k: v for k, v in options.items() if v is not None})
        for key, value in resolved.items():
            default = cls.defaults[key]
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                value = float(value) if ok else value
            elif isinstance(default, (list, tuple)):
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
                value = list(value) if ok else value
            else:
                ok = isinstance(value, type(default))
            if not ok:
                raise VLMError(f"{where}: option {key!r} must be like {default!r}, got {value!r}")
            resolved[key] = value
        cls.check(resolved, where)
        return resolved

    @classmethod
    def check(cls, options, where):
        """Raise a VLMError naming the option when a value is out of range (subclasses)."""

    @staticmethod
    def require(ok, where, message):
        if not ok:
            raise VLMError(f"{where}: {message}")

    # --- sizes ------------------------------------------------------------------------------
    @classmethod
    def parameter_count(cls, shape, options):
        """Parameters of this method for one task, from its formula (trained form). Tests check it
        against the module's real count on GPT-2 small's shape."""
        raise NotImplementedError

    def exported(self):
        """The module as a checkpoint stores it (default: as trained)."""
        return self

    # --- what the method adds to a task's rows (asked by code outside models/) -----------------
    @classmethod
    def adds_virtual_tokens(cls):
        """Whether the method puts virtual tokens in front of a row's input (prompt tuning, p-tuning):
        a task file's virtual-token markers are filled by such a method."""
        return "virtual" in cls.points

    @classmethod
    def adds_prefix(cls):
        """Whether the method prepends keys and values in attention (prefix tuning, UniPELT)."""
        return "prefix" in cls.points

    @classmethod
    def virtual_token_count(cls, options):
        """Virtual tokens this method adds to every row with these options (its `length`)."""
        return options.get("length", 0) if cls.adds_virtual_tokens() else 0

    # --- attachment points (override those in `points`) --------------------------------------
    def linear_targets(self):
        """{(layer, projection name)} this method changes (point "linear")."""
        return set()

    @property
    def num_virtual_tokens(self):
        return 0

    @property
    def prefix_length(self):
        return 0

    def virtual_tokens(self):
        raise NotImplementedError

    def prefix_kv(self):
        raise NotImplementedError

    def prefix_gate(self, layer, x):
        raise NotImplementedError

    def layer_norm(self, layer, name, x):
        raise NotImplementedError

    def linear(self, layer, name, x, out):
        raise NotImplementedError

    def attn_output(self, layer, x, out):
        raise NotImplementedError

    def mlp_output(self, layer, x, out):
        raise NotImplementedError

    def block_output(self, layer, hidden):
        raise NotImplementedError


def normal_(tensor, std):
    with torch.no_grad():
        return tensor.normal_(0.0, std)
