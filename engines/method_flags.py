"""Command-line flags of the per-task methods: `--method lora+ln` and one flag per option,
`--<method>_<option>` (`--lora_r 8`, `--prefix_length 20`, `--lora_targets q,v,mlp_fc`), read from
the registry, so a new method gets its flags by declaring its defaults. The adapter's bottleneck
is the original `--adapter_bottleneck`, which alone still means `--method adapter`."""
import argparse

from models.methods import METHODS, method_class, parse_method_spec
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


def add_method_arguments(parser):
    """--method and every method's option flags (default None: the paper's value)."""
    group = parser.add_argument_group("per-task methods")
    group.add_argument("--method", type=str, default=None,
                       help=f"the task's module(s), joined by '+' (e.g. prefix+ln): {', '.join(METHODS)}; "
                            "default: adapter with --adapter_bottleneck B > 0, else full fine-tuning")
    for name, cls in METHODS.items():
        for option, default in cls.defaults.items():
            if name == "adapter" and option == "bottleneck":
                continue  # the original --adapter_bottleneck
            shown = ",".join(default) if isinstance(default, list) else default
            group.add_argument(f"--{option_flag(name, option)}", type=_parse(default), default=None,
                               help=f"{name}: {option} (paper default {shown})")
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


def resolve_methods(args, default_bottleneck):
    """{method: resolved options} for the task, or {} when no per-task method is chosen (full,
    emb_only, outputlayer_only). Option flags of methods not chosen are an error."""
    if args.method is None:
        names = ["adapter"] if (args.adapter_bottleneck or 0) > 0 else []
    else:
        names = parse_method_spec(args.method)
    for name in METHODS:
        if name not in names:
            stray = given_options(args, name)
            if stray:
                flag = option_flag(name, next(iter(stray)))
                raise VLMError(f"--{flag} is an option of {name}, which --method "
                               f"{args.method or '(none)'} does not use")
    if "adapter" not in names and (args.adapter_bottleneck or 0) > 0 and args.method is not None:
        raise VLMError(f"--adapter_bottleneck {args.adapter_bottleneck} is an option of adapter, which "
                       f"--method {args.method} does not use")
    methods = {}
    for name in names:
        options = given_options(args, name)
        if name == "adapter":
            options["bottleneck"] = args.adapter_bottleneck if (args.adapter_bottleneck or 0) > 0 else default_bottleneck
        methods[name] = method_class(name).resolve(options, f"--method {name}")
    return methods


def method_tag(methods):
    """Short name of a task's methods for run folders: adapter100, lora, prefix+ln."""
    return "+".join(f"adapter{o['bottleneck']}" if n == "adapter" else n for n, o in methods.items())
