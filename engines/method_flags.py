"""Command-line flags of the per-task methods: `--method lora+ln` and one flag per option,
`--<method>_<option>` (`--lora_r 8`, `--prefix_length 20`, `--lora_targets q,v,mlp_fc`), read from
the registry, so a new method gets its flags by declaring its defaults. The adapter's bottleneck
is the original `--adapter_bottleneck`, which alone still means `--method adapter`."""
import argparse

from engines.pruning import add_pruning_arguments
from models.methods import METHODS, method_class, parse_method_spec
from tasks.task_file import user_task_methods
from utils.errors import VLMError


def option_flag(method, option):
    return f"{method}_{option}"


def _parse(default):
    """The argparse type of an option, from the type of its paper default."""
    if isinstance(default, bool):
        def boolean(text):
            value = text.strip().lower()
            if value in ("1", "true", "yes", "on"):
                return True
            if value in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        return boolean
    if isinstance(default, list):
        return lambda text: [part.strip() for part in text.split(",") if part.strip()]
    return type(default)


def add_method_arguments(parser, per_task=False):
    """--method and every method's option flags (default None: the paper's value). per_task
    (train_vlm.py): --method takes one method for every task and/or TASK=METHOD pairs."""
    group = parser.add_argument_group("per-task methods")
    if per_task:
        group.add_argument("--method", nargs="+", default=None, metavar="[TASK=]METHOD",
                           help=f"the tasks' module(s), joined by '+' (e.g. prefix+ln): "
                                f"{', '.join(METHODS)}; "
                                "one name sets every task, TASK=METHOD one task "
                                "(e.g. --method lora nlg=prefix+ln); "
                                "default: every task's adapter with the task table's bottleneck")
    else:
        group.add_argument("--method", type=str, default=None,
                           help=f"the task's module(s), joined by '+' (e.g. prefix+ln): "
                                f"{', '.join(METHODS)}; "
                                "default: adapter with --adapter_bottleneck B > 0, else full fine-tuning")
    for name, cls in METHODS.items():
        for option, default in cls.defaults.items():
            if name == "adapter" and option == "bottleneck":
                continue  # the original --adapter_bottleneck
            shown = ",".join(default) if isinstance(default, list) else default
            group.add_argument(f"--{option_flag(name, option)}", type=_parse(default), default=None,
                               help=f"{name}: {option} (paper default {shown})")
    add_pruning_arguments(parser)  # --sparsity, --prune: for every task's methods
    return parser


def given_options(args, name):
    """{option: value} of the flags given on the command line for method `name`."""
    given = {}
    for option in METHODS[name].defaults:
        if name == "adapter" and option == "bottleneck":
            continue
        value = getattr(args, option_flag(name, option), None)
        if value is not None:
            given[option] = value
    return given


def refuse_unused_options(args, used, what):
    """An option flag of a method not in `used` is an error ending in `what` ("which ... does not use")."""
    for name in METHODS:
        stray = given_options(args, name) if name not in used else {}
        if stray:
            raise VLMError(f"--{option_flag(name, next(iter(stray)))} is an option of {name}, which {what}")


def method_options(args, name, bottleneck, file_options=None, user_task=None):
    """One method's options before resolving: a user task's task-file options, then the flags
    given; the adapter's bottleneck; a user task's virtual-token method has its template's
    total_virtual_tokens (a --<method>_length flag that differs is an error)."""
    options = dict((file_options or {}).get(name, {}), **given_options(args, name))
    if name == "adapter":
        options.setdefault("bottleneck", bottleneck)
    if user_task is not None and method_class(name).adds_virtual_tokens():
        total = user_task.total_virtual_tokens
        if options.get("length", total) != total:
            raise VLMError(f"--{option_flag(name, 'length')} {options['length']}: "
                           f"task {user_task.name}'s template has total_virtual_tokens {total}")
        options["length"] = total
    return options


def resolve_methods(args, default_bottleneck):
    """{method: resolved options} for the task, or {} when no per-task method is chosen (full,
    emb_only, outputlayer_only). Option flags of methods not chosen are an error."""
    if args.method is None:
        names = ["adapter"] if (args.adapter_bottleneck or 0) > 0 else []
    else:
        names = parse_method_spec(args.method)
    refuse_unused_options(args, names, f"--method {args.method or '(none)'} does not use")
    if "adapter" not in names and (args.adapter_bottleneck or 0) > 0 and args.method is not None:
        raise VLMError(f"--adapter_bottleneck {args.adapter_bottleneck} is an option of adapter, which "
                       f"--method {args.method} does not use")
    bottleneck = args.adapter_bottleneck if (args.adapter_bottleneck or 0) > 0 else default_bottleneck
    return {name: method_class(name).resolve(method_options(args, name, bottleneck), f"--method {name}")
            for name in names}


def resolve_user_task_methods(args, task):
    """{method: options} of a user task: its task file's method and method_options, or --method and
    its flags when given (flags also override the file's options); a virtual-token method always
    has the template's total_virtual_tokens."""
    method = getattr(args, "method", None) or ("adapter" if (args.adapter_bottleneck or 0) > 0 else None)
    if method is None:
        file_options = user_task_methods(task)
        spec, where = task.method, f"{task.source}: task {task.name!r}: method"
    else:
        spec, where, file_options = method, f"--method {method}", {}
    names = parse_method_spec(spec, where)
    refuse_unused_options(args, names, f"task {task.name}'s method {spec} does not use")
    bottleneck = args.adapter_bottleneck or task.bottleneck
    return {name: method_class(name).resolve(method_options(args, name, bottleneck, file_options, task),
                                             where)
            for name in names}


def method_tag(methods):
    """Short name of a task's methods for run folders: adapter100, lora, prefix+ln."""
    return "+".join(f"adapter{o['bottleneck']}" if n == "adapter" else n for n, o in methods.items())


def task_method_specs(items, tasks, defaults=None):
    """train_vlm.py's --method items -> {task: method spec}: a plain name sets every task (default
    adapter, or `defaults[task]`: a user task's own method), TASK=SPEC one task; unknown or repeated
    tasks and two plain names fail."""
    plain = [item for item in items or [] if "=" not in item]
    if len(plain) > 1:
        raise VLMError(f"--method: {' '.join(plain)}: give one method for every task, then TASK=METHOD "
                       f"for the tasks that differ")
    specs = {task: plain[0] if plain else (defaults or {}).get(task, "adapter") for task in tasks}
    named = set()
    for item in items or []:
        if "=" not in item:
            continue
        task, spec = (part.strip() for part in item.split("=", 1))
        if task not in tasks:
            raise VLMError(f"--method {item}: {task} is not in --tasks ({' '.join(tasks)})")
        if task in named:
            raise VLMError(f"--method {item}: {task} is given twice")
        named.add(task)
        specs[task] = spec
    return specs


def resolve_task_methods(args, bottlenecks, user_tasks=None):
    """{task: {method: resolved options}} for train_vlm.py: each task's --method spec, the option
    flags given for every task using that method, the adapter's bottleneck from `bottlenecks`
    ({task: B}, the task table's). Option flags of a method no task uses are an error. A user task
    ({task: TemplateTask}) defaults to its task file's method and options; its virtual-token
    methods have its template's total_virtual_tokens."""
    user_tasks = {name: task for name, task in (user_tasks or {}).items() if name in bottlenecks}
    specs = task_method_specs(args.method, list(bottlenecks),
                              {name: task.method for name, task in user_tasks.items()})
    names = {task: parse_method_spec(spec, "--method", f"{task}={spec}") for task, spec in specs.items()}
    refuse_unused_options(args, {name for task_names in names.values() for name in task_names},
                          "no task's --method uses")
    methods = {}
    for task, task_names in names.items():
        user_task = user_tasks.get(task)
        file_options = user_task_methods(user_task) if user_task else {}
        methods[task] = {name: method_class(name).resolve(
            method_options(args, name, bottlenecks[task], file_options, user_task),
            f"--method {task}={specs[task]}")
            for name in task_names}
    return methods
