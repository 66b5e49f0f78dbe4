"""SparseAdapter-style pruning of a task's method weights (He et al. 2022, "SparseAdapter: An Easy
Approach for Improving the Parameter-Efficiency of Adapters"): masks fixed before training, kept
through it, and checkpoints that store only the surviving values.

What is pruned: every weight tensor of a method that has at least two sides longer than 1 (the
2-D weight matrices of adapters, LoRA, KronA, UniPELT, ...; compacter's stacked PHM factors),
except the tensors a method lists in `dense_tensors` (virtual tokens, prefixes, prompt encoders and
prefix MLPs that its saved form drops, per-layer vectors). Biases, LayerNorm gains and (1, d) gate
or score rows stay dense. Each tensor of n numbers keeps n - round(S n) of them (at least one):
sparsity S is the share removed, as in the paper's text (0.8: 80% of the weights are zero).

Scores, higher kept: magnitude |w|; snip |w * dL/dw| (the engines run the loss on training batches
first and leave the gradient in `.grad`); random, uniform. Ties (a tensor that starts at zero, like
LoRA's B, where |w| and |w * g| are all 0) are broken by the seeded generator, so such a tensor is
pruned at random.

Masks live in their method as non-persistent uint8 buffers (`<tensor>_sparsity_mask` on the module
owning the tensor): they move with the model, stay out of its state_dict (checkpoint keys and
shapes are those of the dense method), and a hook on each pruned parameter zeroes its gradient, so
AdamW's moments, its weight decay and gradient clipping never see the pruned entries;
`keep_pruned_at_zero` also zeroes them again after every optimizer step.

In a checkpoint a pruned tensor `K` is stored as `K.sparse_values` (the kept values, row-major),
`K.sparse_mask` (the mask, 8 entries a byte, the first in the lowest bit) and `K.sparse_shape`;
`unpack` turns those back into the exact dense tensor and its mask.

Large-Sparse (the paper's wider bottleneck with as many stored values as the dense one):
`large_sparse_bottleneck` computes the bottleneck option, and

    python -m models.sparsity --method adapter --bottleneck 100 --sparsity 0.8 --model_checkpoint gpt2

prints it for --adapter_bottleneck (or --<method>_bottleneck).
"""
import math

import torch

from models.methods import key_prefix, method_class
from utils.errors import VLMError

PRUNE_KINDS = ("snip", "magnitude", "random")
MASK_SUFFIX = "_sparsity_mask"
PACKED = (".sparse_values", ".sparse_mask", ".sparse_shape")
BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


# --- which tensors ---------------------------------------------------------------------------------
def is_weight_matrix(tensor):
    return tensor.dim() >= 2 and sum(side > 1 for side in tensor.shape) >= 2


def prunable(method):
    """{name: parameter} of a method's weight tensors that pruning may thin (see the module doc)."""
    dense = tuple(type(method).dense_tensors)
    return {name: p for name, p in method.named_parameters()
            if is_weight_matrix(p) and not (dense and name.startswith(dense))}


def prunable_count(method_name, shape, options):
    """(dense values outside the pruned tensors, [numel of each prunable tensor]) of a method built
    with these options on this shape (on the meta device: no memory)."""
    with torch.device("meta"):
        module = method_class(method_name)(shape, options)
    weights = prunable(module)
    rest = sum(p.numel() for name, p in module.named_parameters() if name not in weights)
    return rest, [p.numel() for p in weights.values()]


def kept_count(numel, sparsity):
    """Entries a tensor of `numel` keeps at sparsity S: numel - round(S numel), at least one."""
    return max(1, numel - math.floor(sparsity * numel + 0.5))


def check_sparsity(value, where="--sparsity"):
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise VLMError(f"{where} must be in (0, 1) (the share of weights removed, 0.8: 80% zeros), "
                       f"got {value}")


# --- masks ---------------------------------------------------------------------------------------------
def _owner(module, name):
    """(submodule, attribute) holding parameter `name` (dotted) of `module`."""
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def masks_of(method):
    """{tensor name: uint8 mask} of a method's pruned tensors ({} for a dense method)."""
    return {name[:-len(MASK_SUFFIX)]: buffer for name, buffer in method.named_buffers()
            if name.endswith(MASK_SUFFIX)}


def set_mask(method, name, mask, where="model"):
    """Fix `mask` (1 kept, 0 pruned; parameter `name`'s shape) on a method: the buffer, the gradient
    hook and the pruned entries zeroed now."""
    params = dict(method.named_parameters())
    if name not in params:
        raise VLMError(f"{where}: a pruning mask for {name!r}, which is no weight of method {method.name}")
    param = params[name]
    if tuple(mask.shape) != tuple(param.shape):
        raise VLMError(f"{where}: the pruning mask of {name} has shape {tuple(mask.shape)}, "
                       f"expected {tuple(param.shape)}")
    owner, leaf = _owner(method, name)
    owner.register_buffer(leaf + MASK_SUFFIX, mask.to(device=param.device, dtype=torch.uint8),
                          persistent=False)
    hooks = owner.__dict__.setdefault("_sparsity_hooks", {})
    if leaf in hooks:
        hooks[leaf].remove()
    # The buffer is read when the hook runs, so it follows the module across devices. A frozen
    # tensor takes no hook, so it is unfrozen for the registration: the hook stays for later training.
    frozen = not param.requires_grad
    param.requires_grad_(True)
    attr = leaf + MASK_SUFFIX
    hooks[leaf] = param.register_hook(lambda grad: grad.masked_fill(getattr(owner, attr) == 0, 0))
    param.requires_grad_(not frozen)
    with torch.no_grad():
        param.masked_fill_(getattr(owner, attr) == 0, 0)


def copy_masks(source, target):
    """The masks of `source` onto `target` (a method's exported form: its pruned tensors keep their names)."""
    for name, mask in masks_of(source).items():
        set_mask(target, name, mask)


def zero_pruned(model):
    """Zero every pruned entry of every task's methods again (after an optimizer step)."""
    with torch.no_grad():
        for task in model.tasks.values():
            for method in task.methods.values():
                params = dict(method.named_parameters())
                for name, mask in masks_of(method).items():
                    params[name].masked_fill_(mask == 0, 0)  # +0.0, as a loaded checkpoint has it


def keep_pruned_at_zero(optimizer, model):
    """After every optimizer step, pruned entries are zero again (the gradient hooks already keep
    AdamW's update and weight decay off them; this holds for any optimizer). Returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: zero_pruned(model))


def pruned_count(method):
    """Entries of the method's tensors that are pruned (never trained, stored as nothing)."""
    return sum(int(mask.numel() - mask.sum()) for mask in masks_of(method).values())


# --- choosing the masks ----------------------------------------------------------------------------
def scores(param, kind, generator):
    w = param.detach().float().cpu()
    if kind == "magnitude":
        return w.abs()
    if kind == "snip":
        grad = param.grad
        return (w * (grad.detach().float().cpu() if grad is not None else torch.zeros_like(w))).abs()
    if kind == "random":
        return torch.rand(w.shape, generator=generator)
    raise ValueError(kind)


def top_mask(score, keep, generator):
    """uint8 mask with 1 at the `keep` highest scores; ties broken by a permutation from `generator`."""
    flat = score.flatten()
    order = torch.randperm(flat.numel(), generator=generator)
    ranked = torch.argsort(flat[order], descending=True, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.uint8)
    mask[order[ranked[:keep]]] = 1
    return mask.view(score.shape)


def prune_method(method, sparsity, kind, generator):
    """Fix masks on every prunable tensor of a method (snip reads each tensor's `.grad`); returns
    {name: mask}. The pruned entries are zero from now on."""
    masks = {}
    for name, param in prunable(method).items():
        masks[name] = top_mask(scores(param, kind, generator), kept_count(param.numel(), sparsity), generator)
    for name, mask in masks.items():
        set_mask(method, name, mask)
    return masks


def install_masks(model, masks, where="checkpoint"):
    """Masks keyed by checkpoint tensor name (`methods.<task>.<method>.<tensor>`, as `unpack` gives
    them) onto the model's tasks; a mask no task method claims is a VLMError naming `where`."""
    claimed = set()
    for task in model.tasks.values():
        for method_name, method in task.methods.items():
            prefix = key_prefix(task.name, method_name)
            for key, mask in masks.items():
                if key.startswith(prefix):
                    set_mask(method, key[len(prefix):], mask, where)
                    claimed.add(key)
    stray = sorted(set(masks) - claimed)
    if stray:
        raise VLMError(f"{where}: a pruning mask for {stray[0]!r}, which is no tensor of this model's tasks")


# --- checkpoints: packed tensors -------------------------------------------------------------------
def pack(key, tensor, mask):
    """{K.sparse_values, K.sparse_mask, K.sparse_shape} of a pruned tensor."""
    flat = mask.detach().to("cpu", torch.uint8).flatten()
    keep = flat.bool()
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return {key + ".sparse_values": tensor.detach().to("cpu").flatten()[keep].contiguous(),
            key + ".sparse_mask": (padded * BITS).sum(dim=1).to(torch.uint8),
            key + ".sparse_shape": torch.tensor(list(tensor.shape), dtype=torch.int64)}


def unpack(tensors, where):
    """(dense tensors, {key: uint8 mask}) of a checkpoint's tensors: each packed triple becomes
    its exact dense tensor (zeros where pruned) under its own key."""
    dense, masks = {}, {}
    packed = {k[:-len(suffix)] for k in tensors for suffix in PACKED if k.endswith(suffix)}
    for key, value in tensors.items():
        if not any(key.endswith(suffix) for suffix in PACKED):
            dense[key] = value
    for key in sorted(packed):
        missing = [key + s for s in PACKED if key + s not in tensors]
        if missing:
            raise VLMError(f"{where}: pruned tensor {key} lacks {missing[0]!r}")
        values, bits, shape = (tensors[key + s] for s in PACKED)
        if shape.dtype != torch.int64 or shape.dim() != 1 or bool((shape < 0).any()):
            raise VLMError(f"{where}: {key}.sparse_shape must be a list of non-negative int64 sizes")
        numel = math.prod(shape.tolist())
        if bits.dtype != torch.uint8 or tuple(bits.shape) != (math.ceil(numel / 8),):
            raise VLMError(f"{where}: {key}.sparse_mask must be {math.ceil(numel / 8)} uint8 bytes "
                           f"for shape {tuple(shape.tolist())}")
        mask = ((bits[:, None] & BITS) != 0).flatten()[:numel]
        if values.dim() != 1 or values.numel() != int(mask.sum()) or not values.is_floating_point():
            raise VLMError(f"{where}: {key}.sparse_values must hold the mask's {int(mask.sum())} kept values")
        if key in dense:
            raise VLMError(f"{where}: {key} is stored both dense and pruned")
        full = values.new_zeros(numel)
        full[mask] = values
        dense[key] = full.view(tuple(shape.tolist()))
        masks[key] = mask.to(torch.uint8).view(dense[key].shape)
    return dense, masks


def packed_bytes(numel, kept, element_size, ndim):
    """Bytes of a pruned tensor's packed form (values, mask bits, shape)."""
    return kept * element_size + math.ceil(numel / 8) + 8 * ndim


def task_summary(task):
    """What a TaskModule's pruned tensors store, or None if it has none: the checkpoint config's
    "sparsity" entry and the training log's line."""
    tensors = dense_values = stored = stored_bytes = dense_bytes = 0
    for method in task.methods.values():
        params = dict(method.named_parameters())
        for name, mask in masks_of(method).items():
            p, kept = params[name], int(mask.sum())
            tensors += 1
            dense_values += p.numel()
            stored += kept
            dense_bytes += p.numel() * p.element_size()
            stored_bytes += packed_bytes(p.numel(), kept, p.element_size(), p.dim())
    if not tensors:
        return None
    return {"pruned_tensors": tensors, "dense_values": dense_values, "stored_values": stored,
            "sparsity": round(1 - stored / dense_values, 6), "dense_bytes": dense_bytes,
            "stored_bytes": stored_bytes}


def summary_line(name, summary):
    return (f"{name}: {summary['pruned_tensors']} pruned weight tensors, {summary['stored_values']:,} of "
            f"{summary['dense_values']:,} values stored ({100 * summary['sparsity']:.1f}% sparse), "
            f"{summary['stored_bytes']:,} bytes instead of {summary['dense_bytes']:,}")


# --- Large-Sparse ------------------------------------------------------------------------------------
def stored_values(method_name, shape, options, sparsity):
    """Values a checkpoint stores of a method pruned at `sparsity` (0: dense): its other tensors whole
    plus each prunable tensor's kept entries."""
    rest, sizes = prunable_count(method_name, shape, options)
    return rest + sum(kept_count(n, sparsity) if sparsity else n for n in sizes)


def _bottleneck_step(method_name, shape, options):
    """The smallest bottleneck the method builds with (compacter's: its phm_dim); candidates are
    its multiples."""
    for b in range(1, shape.d_model + 1):
        try:
            prunable_count(method_name, shape, method_class(method_name).resolve(dict(options, bottleneck=b)))
            return b
        except VLMError:
            continue
    raise VLMError(f"--method {method_name}: no bottleneck up to the model width {shape.d_model} fits")


def large_sparse_bottleneck(method_name, shape, options, sparsity, target=None):
    """The bottleneck b at which the method pruned at `sparsity` stores the number of values closest
    to `target` (default: the dense method with `options`' own bottleneck); the smaller b on a tie."""
    cls = method_class(method_name)
    if "bottleneck" not in cls.defaults:
        raise VLMError(f"--method {method_name} has no bottleneck option to widen")
    options = cls.resolve(dict(options))
    target = stored_values(method_name, shape, options, 0) if target is None else target

    def stored(b):
        return stored_values(method_name, shape, cls.resolve(dict(options, bottleneck=b)), sparsity)

    step = _bottleneck_step(method_name, shape, options)
    lo, hi = 1, 1
    while stored(hi * step) < target:  # stored values grow with b: double, then halve the gap
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if stored(mid * step) < target else (lo, mid)
    return min((lo * step, hi * step), key=lambda b: (abs(stored(b) - target), b))


def main(argv=None):
    from transformers import GPT2Config

    from models.methods import BackboneShape
    from utils.errors import ArgumentParser, exit_on_user_error
    from utils.hub import check_model_source

    @exit_on_user_error
    def run():
        parser = ArgumentParser(description="Large-Sparse: the bottleneck at which a pruned method stores "
                                            "as many values as the dense one.")
        parser.add_argument("--method", default="adapter", help="a method with a bottleneck option")
        parser.add_argument("--bottleneck", type=int, required=True, help="the dense method's bottleneck")
        parser.add_argument("--sparsity", type=float, required=True, help="share of weights removed")
        parser.add_argument("--model_checkpoint", default="gpt2", help="GPT-2 hub name or local folder")
        args = parser.parse_args(argv)
        check_sparsity(args.sparsity)
        check_model_source(args.model_checkpoint)  # never minutes of retries against an unreachable hub
        try:
            shape = BackboneShape.of(GPT2Config.from_pretrained(args.model_checkpoint))
        except (OSError, ValueError) as error:
            raise VLMError(f"--model_checkpoint {args.model_checkpoint}: no GPT-2 config ({error})") from None
        options = {"bottleneck": args.bottleneck}
        cls = method_class(args.method)
        b = large_sparse_bottleneck(args.method, shape, options, args.sparsity)
        sparse = stored_values(args.method, shape, cls.resolve(dict(options, bottleneck=b)), args.sparsity)
        dense = stored_values(args.method, shape, cls.resolve(options), 0)
        print(f"{args.method}: bottleneck {b} at sparsity {args.sparsity:g} stores {sparse:,} values; "
              f"dense bottleneck {args.bottleneck}: {dense:,}")
    run()


if __name__ == "__main__":
    main()
