"""The engines' side of the cross-task method `poly` (models/poly.py): its flags, how train.py and
train_vlm.py see a poly task (as the `lora` it is saved as), and a run's hooks (RunPlan.cross_task).

    train_vlm.py --tasks mt nlg --method poly [--poly_splits 8]         Polytropon / MHR across tasks
    train.py --task summarization --method poly --poly_inventory RUN   a new task over a frozen inventory:
        --poly_inventory_mode route     train only its routing (MHR-z)
        --poly_inventory_mode average   start its LoRA from the skills' average and train that (MHR-mu)

The generic flag checks (engines/settings.py, engines/method_flags.py) resolve poly's place in a
task's --method as `lora` with poly's saved options (rank r, alpha 1, no dropout), so every poly
task is a lora task to the model, the checkpoints, combine_all.py, evaluate_vlm.py and serve.py.
During training the plan swaps in the PolyTask modules and the shared inventory; each checkpoint
folder also gets poly_inventory.safetensors / .json, which --resume and --poly_inventory read.
"""
import os

from engines.method_flags import given_options, task_method_specs
from engines.settings import check_output_dir, default_output_dir
from models.poly import (
    STRUCTURE,
    Poly,
    install,
    load_state,
    read_inventory,
    read_inventory_config,
    save_inventory,
    set_average,
)
from utils.errors import VLMError

POLY_SETTINGS = ("poly",)  # added to the flags --resume must find unchanged
MODES = ("route", "average")


def _flag_type(default):
    if isinstance(default, list):
        return lambda text: [part.strip() for part in text.split(",") if part.strip()]
    return type(default)


def add_poly_arguments(parser):
    group = parser.add_argument_group("cross-task method poly (--method poly, or TASK=poly in train_vlm.py)")
    for option, default in Poly.defaults.items():
        shown = ",".join(default) if isinstance(default, list) else default
        group.add_argument(f"--poly_{option}", type=_flag_type(default), default=None,
                           help=f"poly: {Poly.help[option]} (paper default {shown})")
    group.add_argument("--poly_inventory", default=None, metavar="DIR",
                       help="a --method poly run folder (or one of its checkpoints): new tasks use its "
                            "skills, frozen; skills, r, splits and targets come from it")
    group.add_argument("--poly_inventory_mode", choices=MODES, default=None,
                       help="with --poly_inventory: route (default) trains only the tasks' routing (MHR-z); "
                            "average starts each task's LoRA from the average skill and trains it (MHR-mu)")
    return parser


def _names(item):
    spec = item.split("=", 1)[1] if "=" in item else item
    return [part.strip() for part in spec.split("+")]


def _as_lora(item):
    task, sep, spec = item.rpartition("=") if "=" in item else ("", "", item)
    return task + sep + "+".join("lora" if name.strip() == "poly" else name for name in spec.split("+"))


def _given_poly(args):
    given = {f"--poly_{option}": getattr(args, f"poly_{option}", None) for option in Poly.defaults}
    given.update({"--poly_inventory": getattr(args, "poly_inventory", None),
                  "--poly_inventory_mode": getattr(args, "poly_inventory_mode", None)})
    return {flag: value for flag, value in given.items() if value is not None}


def prepare_with_poly(args, prepare):
    """prepare(args) (engines/settings.py's prepare_args or prepare_multitask_args) with every poly
    task seen as the `lora` it is saved as. Sets args.poly: None, or what the run does with poly
    (its tasks, options, inventory and mode; recorded in training_args.json and checked by
    --resume), and the poly tasks' args.methods. Returns prepare's result."""
    multitask = hasattr(args, "tasks")
    items = list(args.method or []) if multitask else ([args.method] if args.method else [])
    poly_items = [item for item in items if "poly" in _names(item)]
    given = _given_poly(args)
    args.poly = None
    unused = "no task's --method uses" if multitask else f"--method {args.method or '(none)'} does not use"
    if not poly_items:
        if given:
            raise VLMError(f"{next(iter(given))} is an option of poly, which {unused}")
        return prepare(args)
    for item in poly_items:
        names = _names(item)
        if names.count("poly") > 1:
            raise VLMError(f"--method {item}: a method is named twice")
        if "lora" in names:
            raise VLMError(f"--method {item}: poly is a LoRA per task already; compose it with other methods "
                           "than lora")
    _refuse_flags(args, multitask)
    options, inventory, mode = poly_options(args)
    defaulted = not args.output_dir
    original = args.method
    args.method = [_as_lora(item) for item in items] if multitask else _as_lora(args.method)
    try:
        result = prepare(args)
    finally:
        args.method = original
    if multitask:
        specs = task_method_specs(original, args.tasks)
        tasks = [task for task in args.tasks if "poly" in _names(specs[task])]
        real_lora = any("lora" in _names(spec) for spec in specs.values())
    else:
        tasks, real_lora = [args.task], False
    lora_flags = given_options(args, "lora")
    if lora_flags and not real_lora:
        raise VLMError(f"--lora_{next(iter(lora_flags))} is an option of lora, which "
                       f"{'no task' if multitask else 'no method'} of --method {' '.join(items)} uses")
    lora = Poly.lora_options(options)
    if multitask:
        for task in tasks:
            args.methods[task] = {name: dict(lora) if name == "lora" else o
                                  for name, o in args.methods[task].items()}
    else:
        args.methods = {name: dict(lora) if name == "lora" else o for name, o in args.methods.items()}
    args.poly = {"tasks": tasks, **options, "inventory": inventory, "inventory_mode": mode}
    if defaulted:
        _name_run_folder(args, result if multitask else result[1], tasks, multitask)
    return result


def _refuse_flags(args, multitask):
    """The generic checks would name the `lora` placeholder; these say poly."""
    shown = " ".join(args.method) if multitask else args.method
    if multitask and args.no_adapter:
        raise VLMError(f"--no_adapter fine-tunes all of GPT-2 with no per-task modules; "
                       f"drop --method {shown}")
    if not multitask:
        for flag in ("emb_only", "outputlayer_only"):
            if getattr(args, flag):
                raise VLMError(f"--{flag} trains no per-task modules; drop --method {shown}")
        if args.random_init:
            raise VLMError("--random_init trains a backbone from scratch; it cannot be combined with "
                           "--method, which keeps the backbone frozen")
        if (args.adapter_bottleneck or 0) > 0 and "adapter" not in _names(args.method):
            raise VLMError(f"--adapter_bottleneck {args.adapter_bottleneck} is an option of adapter, which "
                           f"--method {shown} does not use")
    if getattr(args, "sparsity", None) is not None:
        raise VLMError("--sparsity: poly tasks' LoRA is generated from the shared skills; it is not pruned")


def poly_options(args):
    """(resolved options, inventory folder or None, its mode or None) from the --poly_* flags; with
    --poly_inventory, the structure comes from the inventory (a flag that differs is an error)."""
    given = {option: getattr(args, f"poly_{option}", None) for option in Poly.defaults}
    given = {option: value for option, value in given.items() if value is not None}
    inventory, mode = getattr(args, "poly_inventory", None), getattr(args, "poly_inventory_mode", None)
    if mode is not None and inventory is None:
        raise VLMError(f"--poly_inventory_mode {mode}: give --poly_inventory DIR, the skills to use")
    if inventory is not None:
        structure = read_inventory_config(inventory, f"--poly_inventory {inventory}")["options"]
        for key in STRUCTURE:
            if key in given and given[key] != structure[key]:
                shown = ",".join(given[key]) if isinstance(given[key], list) else given[key]
                raise VLMError(f"--poly_{key} {shown}: the inventory {inventory} has {key} {structure[key]}")
        given.update(structure)
        mode = mode or "route"
    return Poly.resolve(given, "--method poly"), inventory, mode


def _name_run_folder(args, mode, tasks, multitask):
    """The default run folder names poly where the generic one named its lora placeholder."""
    def named(methods):
        return {("poly" if name == "lora" else name): options for name, options in methods.items()}
    saved = args.methods
    args.methods = {t: named(m) if t in tasks else m for t, m in saved.items()} if multitask else named(saved)
    try:
        args.output_dir = default_output_dir(args, mode)
    finally:
        args.methods = saved
    check_output_dir(args.output_dir)


def poly_plan(model, args, fingerprint):
    """After a plan's model is built (poly tasks as lora placeholders): their PolyTask modules over a
    fresh or a frozen inventory, returned as a PolyRun (RunPlan.cross_task); or, for
    --poly_inventory_mode average, their LoRA set to the average skill (returns None)."""
    poly = getattr(args, "poly", None)
    if not poly:
        return None
    options = {key: poly[key] for key in Poly.defaults}
    skills = None
    if poly["inventory"] is not None:
        where = f"--poly_inventory {poly['inventory']}"
        _, skills = read_inventory(poly["inventory"], model.shape, fingerprint, where)
        if poly["inventory_mode"] == "average":
            set_average(model, poly["tasks"], skills, options)
            return None
    inventory, views = install(model, poly["tasks"], options, skills)
    return PolyRun(model.shape, inventory, views, options, skills is not None, fingerprint,
                   args.model_checkpoint)


class PolyRun:
    """What train_run asks of a cross-task method's run: optimizer groups (the routers at their own
    rate), the shared tensors' count, and its own files in every checkpoint folder."""

    def __init__(self, shape, inventory, views, options, frozen, fingerprint, base_model):
        self.shape, self.inventory, self.views, self.options = shape, inventory, views, options
        self.frozen, self.fingerprint, self.base_model = frozen, fingerprint, base_model

    def optimizer_groups(self, parameters, lr):
        """AdamW's groups: the run's other trainable tensors and the skills at --lr, the routers at
        router_lr (`lr_scale`: their rate over --lr, kept along the schedule by engines/steps.py)."""
        self.inventory.requires_grad_(not self.frozen)
        routers = [view.router for view in self.views.values()]
        own = {id(p) for p in routers}
        main = [p for p in parameters if id(p) not in own] + [p for p in self.inventory.parameters()
                                                                if p.requires_grad]
        rate = self.options["router_lr"]
        return ([{"params": main}] if main else []) + [{"params": routers, "lr": rate, "lr_scale": rate / lr}]

    def trainable_count(self):
        return 0 if self.frozen else sum(p.numel() for p in self.inventory.parameters())

    def save(self, path):
        save_inventory(path, self.inventory, self.views, self.fingerprint, os.path.abspath(self.base_model)
                       if os.path.isdir(self.base_model) else self.base_model)

    def load(self, path):
        load_state(path, self.inventory, self.views, self.shape, self.fingerprint)
