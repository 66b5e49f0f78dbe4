"""Federated training of one task's module on Flower (federated.py; FedPETuning, Zhang et al. 2022):
FedAvg of the task's own tensors (its method and its special-token rows), clients training locally
with train.py's run loop. The pieces:

    fed_data.py      how one dataset is split among clients (IID or Dirichlet(alpha) skewed)
    fed_client.py    a client's round: train_run on its data from the global module
    fed_strategy.py  sampling, screening updates, the weighted mean, differential privacy
    fed_server.py    the rounds: validation, checkpoints, --resume, metrics.jsonl
    fed_report.py    metrics records and federated.png
    fed_apps.py      the Flower ServerApp and ClientApp around them

Two ways to run the same apps: Flower's simulation in this process (its Ray backend runs the
ClientApps), or a deployment: a SuperLink and SuperNodes started as Flower documents, and
`flwr run` of a Flower app (pyproject.toml) that this module writes into the run folder.
"""
import json
import logging
import os
import subprocess
import sys

import torch

from engines.fed_apps import ARGS_KEY, client_app, server_app
from engines.fed_data import PARTITIONS
from engines.fed_server import ROUND_PREFIX, STATE_JSON
from engines.run_state import CheckpointKeeper
from engines.settings import RESUME_SETTINGS, check_numbers, fill_task_defaults, training_mode, user_tasks
from models.checkpoint import CONFIG_NAME, read_config
from tasks.table import get_task
from utils.errors import VLMError
from utils.io import write_json, write_text

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("simulation", "deployment")
APP_FOLDER, HOME_FOLDER, RUN_ARGS = "flower_app", "flower_home", "federated_run_args.json"
APP_MODULE = "vlm_federated_app"
CONNECTION = "vlm"  # the SuperLink connection's name in the run's own Flower configuration
# train.py flags federated runs fix: the module trains on a frozen backbone, in float32
FIXED = {"emb_only": False, "outputlayer_only": False, "random_init": False, "distillation": False,
         "eval_before_start": False, "fp16": ""}
# Flower: no usage telemetry and no update check from any process of ours
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def check_federated_numbers(args):
    checks = [("rounds", args.rounds >= 1, "must be at least 1"),
              ("clients", args.clients >= 1, "must be at least 1"),
              ("local_epochs", args.local_epochs >= 1, "must be at least 1"),
              ("fraction_fit", 0 < args.fraction_fit <= 1, "must be in (0, 1]"),
              ("min_fit_clients", 1 <= args.min_fit_clients <= args.clients,
               "must be between 1 and --clients"),
              ("alpha", args.alpha > 0, "must be positive"),
              ("eval_prompts", args.eval_prompts >= 0, "must be 0 or more"),
              ("eval_max_length", args.eval_max_length >= 1, "must be at least 1"),
              ("round_timeout", args.round_timeout > 0, "must be positive"),
              ("connect_timeout", args.connect_timeout > 0, "must be positive"),
              ("client_cpus", args.client_cpus > 0, "must be positive")]
    if args.dp_noise is not None:
        checks += [("dp_noise", args.dp_noise >= 0, "must be 0 or more"),
                   ("dp_clip", args.dp_clip is not None and args.dp_clip > 0,
                    "must be positive with --dp_noise"),
                   ("dp_delta", 0 < args.dp_delta < 1, "must be in (0, 1)")]
    elif args.dp_clip is not None:
        checks.append(("dp_clip", False, "needs --dp_noise (0 for clipping alone)"))
    for name, ok, message in checks:
        if not ok:
            raise VLMError(f"--{name} {message}, got {getattr(args, name)}")
    if args.partition not in PARTITIONS:
        raise VLMError(f"--partition {args.partition}: choose {' or '.join(PARTITIONS)}")
    if args.mode not in MODES:
        raise VLMError(f"--mode {args.mode}: choose {' or '.join(MODES)}")
    if args.mode == "deployment" and not args.superlink:
        raise VLMError("--mode deployment needs --superlink HOST:PORT (the SuperLink's address)")


def absolute(path):
    return os.path.abspath(path) if path and os.path.exists(path) else path


def prepare_federated_args(args):
    """Check and complete federated.py's arguments in place (train.py's defaults from the task table);
    returns the task. Paths become absolute: a deployment's server reads them in another process."""
    for name, value in FIXED.items():
        setattr(args, name, value)
    task = get_task(args.task, user_tasks(args))
    if training_mode(args, task) != "adapter":
        raise VLMError("federated.py averages a task's own module: choose it with --method "
                       "(or --adapter_bottleneck B)")
    args.n_epochs = args.local_epochs
    fill_task_defaults(args, task, "adapter")
    check_numbers(args)
    if args.min_fit_clients is None:
        args.min_fit_clients = min(2, args.clients)
    check_federated_numbers(args)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    task.check_dataset_path(args.dataset_path)
    if not args.output_dir:
        if args.resume:
            raise VLMError("--resume needs --output_dir: the folder of the run to continue")
        args.output_dir = os.path.join("runs", f"federated_{task.name}_{'+'.join(args.methods)}_"
                                               f"{args.clients}clients_{args.partition}")
    check_output_folder(args)
    for name in ("model_checkpoint", "dataset_path", "task_file", "output_dir"):
        setattr(args, name, absolute(getattr(args, name)))
    args.dataset_cache = os.path.abspath(args.dataset_cache)
    for name in RESUME_SETTINGS:  # flags of train.py features federated runs do not use
        if not hasattr(args, name):
            setattr(args, name, None)
    return task


def check_output_folder(args):
    path = args.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise VLMError(f"--output_dir {path}: exists and is not a folder")
    rounds = [p for p in CheckpointKeeper(path, None, prefix=ROUND_PREFIX).existing()
              if os.path.isfile(os.path.join(p, STATE_JSON))]
    if args.resume and not rounds:
        raise VLMError(f"--resume: no complete {ROUND_PREFIX}<N>/ (with {STATE_JSON}) in --output_dir {path}")
    if not args.resume and os.path.isdir(path) and os.listdir(path):
        raise VLMError(f"--output_dir {path}: folder is not empty; choose a new one (or --resume)")


def run_args_json(args):
    return {k: v for k, v in sorted(vars(args).items())}


class _NoRunSimulationNotice(logging.Filter):
    """flwr.simulation.run_simulation, the Python entry of Flower's simulation, logs that the CLI
    (`flwr run` with a simulation SuperLink) is preferred; this run wants the simulation inside its
    own process, where a killed run leaves no server behind, so the notice is not shown."""

    def filter(self, record):
        return "`run_simulation` function is deprecated" not in record.getMessage()


def simulate(args):
    """Flower's simulation: the ServerApp in this process, args.clients virtual SuperNodes whose
    ClientApps run in Ray actors (args.client_cpus CPUs each)."""
    for name, value in dict(QUIET_FLOWER, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0").items():
        os.environ.setdefault(name, value)
    logging.getLogger("flwr").propagate = False  # Flower prints its own log lines
    from flwr.simulation import run_simulation
    gpus = 1.0 if args.device.startswith("cuda") else 0.0
    backend = {"client_resources": {"num_cpus": args.client_cpus, "num_gpus": gpus},
               "init_args": {"logging_level": "ERROR", "_node_ip_address": "127.0.0.1"}}
    flwr_logger = logging.getLogger("flwr")
    notice = _NoRunSimulationNotice()
    flwr_logger.addFilter(notice)
    try:
        run_simulation(server_app(args), client_app(), num_supernodes=args.clients, backend_config=backend)
    finally:
        flwr_logger.removeFilter(notice)


PYPROJECT = """[project]
name = "vlm-federated"
version = "1.0.0"
description = "federated.py's Flower app: FedAvg of one task's module"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "vlm"

[tool.flwr.app.components]
serverapp = "{module}:server"
clientapp = "{module}:client"

[tool.flwr.app.config]
{key} = {args_file}
"""

APP_SOURCE = '''"""federated.py's Flower app (written by engines/federated.py): the repository's apps."""
import os
import sys

REPO = {repo!r}  # where this app was written; elsewhere, put the repository on PYTHONPATH
if os.path.isdir(REPO) and REPO not in sys.path:
    sys.path.insert(0, REPO)

from engines.fed_apps import client_app, server_app  # noqa: E402

server = server_app()
client = client_app()
'''


def write_app(args):
    """The Flower app folder (pyproject.toml and its module) and the run's own Flower home (the
    SuperLink connection `vlm`); returns (app folder, Flower home)."""
    app, home = (os.path.join(args.output_dir, name) for name in (APP_FOLDER, HOME_FOLDER))
    args_file = os.path.join(args.output_dir, RUN_ARGS)
    write_json(args_file, run_args_json(args))
    write_text(os.path.join(app, "pyproject.toml"),
               PYPROJECT.format(module=APP_MODULE, key=ARGS_KEY, args_file=json.dumps(args_file)))
    write_text(os.path.join(app, f"{APP_MODULE}.py"), APP_SOURCE.format(repo=REPO))
    write_text(os.path.join(home, "config.toml"),
               f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
               f'address = {json.dumps(args.superlink)}\ninsecure = true\n')
    return app, home


def deploy(args):
    """`flwr run` of the run's Flower app on the SuperLink at args.superlink; waits until the run
    ends (at most: connecting, every round's timeout, and an hour of validation and saving)."""
    app, home = write_app(args)
    flwr = os.path.join(os.path.dirname(sys.executable), "flwr")
    env = dict(os.environ, FLWR_HOME=home, **QUIET_FLOWER)
    logging.getLogger("flwr").propagate = False
    limit = args.connect_timeout + args.rounds * (args.round_timeout + args.connect_timeout) + 3600
    try:
        subprocess.run([flwr, "run", app, CONNECTION, "--stream"], env=env, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        raise VLMError(f"the federated run on {args.superlink} did not end within {limit:g} s") from None
    config_path = os.path.join(args.output_dir, CONFIG_NAME)
    finished = (os.path.isfile(config_path)
                and read_config(args.output_dir).get("federated_round") == args.rounds)
    if not finished:
        raise VLMError(f"the federated run on {args.superlink} ended before round {args.rounds} "
                       f"(see the ServerApp's log above; --resume continues from the last round kept in "
                       f"{args.output_dir})")


def run_federated(args):
    """federated.py: check the flags, then run the simulation or the deployment."""
    prepare_federated_args(args)
    (simulate if args.mode == "simulation" else deploy)(args)
    return args.output_dir
