#!/usr/bin/env python
"""Federated training of one task's module on Flower: FedAvg over clients that each train the task's
method (and its special-token rows) locally with train.py's run loop (FedPETuning, Zhang et al. 2022).

Simulation on this machine (Flower's simulation runtime; --clients splits the task's training data):
    python federated.py --task mt --method lora --clients 4 --partition dirichlet --alpha 0.5 \
        --rounds 10 --local_epochs 1 --output_dir runs/fed_mt

A deployment: a SuperLink, one SuperNode per client, then this script submits the run (`flwr run`):
    flower-superlink --insecure --port 9093 --disable-runtime-dependency-installation
    PYTHONPATH=$PWD flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9101 \
        --node-config 'partition-id=0 num-partitions=2'                  (a part of --dataset_path)
    PYTHONPATH=$PWD flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9102 \
        --node-config 'partition-id=1 dataset-path="/data/mine.json"'    (the client's own data)
    python federated.py --mode deployment --superlink 127.0.0.1:9093 --clients 2 --task mt --method lora ...

The output folder holds checkpoint_round<N>/ (the global module after round N, an ordinary task
checkpoint: evaluate.py, combine_all.py and serve.py read it), the final module (the folder itself,
as train.py's), metrics.jsonl (per round: validation NLL and task metric, each client's loss,
examples and bytes, the bytes full fine-tuning would have sent) and federated.png. After a crash
the same command with --resume continues from the newest round and ends with the same module.
With --dp_noise Z --dp_clip C, Flower's server-side fixed clipping adds Gaussian noise to every
average; metrics.jsonl reports the noise and the (epsilon, --dp_delta) it spends (fed_strategy.py)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from utils.errors import ArgumentParser, exit_on_user_error  # noqa: E402


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    training = parser.add_argument_group("local training (train.py's flags)")
    training.add_argument("--task", type=str, default="nlg", help="a built-in task or a task of --task_file")
    training.add_argument("--task_file", type=str, default=None, help="JSON task file of user tasks")
    training.add_argument("--dataset_path", type=str, default=None,
                          help="the dataset the clients split (default: the task's); a user task's folder")
    training.add_argument("--dataset_cache", type=str, default="./dataset_cache",
                          help="prefix of the tokenized-dataset cache files")
    training.add_argument("--model_checkpoint", type=str, default="gpt2",
                          help="GPT-2 hub name or local folder")
    training.add_argument("--max_history", type=int, default=None,
                          help="previous exchanges kept (dialogue, qa)")
    training.add_argument("--train_batch_size", type=int, default=None, help="batch size of local training")
    training.add_argument("--valid_batch_size", type=int, default=None, help="batch size of validation")
    training.add_argument("--gradient_accumulation_steps", type=int, default=None,
                          help="batches accumulated per optimizer step")
    training.add_argument("--lr", type=float, default=None, help="peak learning rate of each local training")
    training.add_argument("--max_norm", type=float, default=1.0, help="gradient clipping norm")
    training.add_argument("--local_epochs", type=int, default=1, help="epochs each client trains per round")
    training.add_argument("--adapter_bottleneck", type=int, default=0,
                          help="the authors' adapter (--method adapter)")
    training.add_argument("--device", type=str, default=None,
                          help="cpu, cuda or cuda:N (default: cuda if available)")
    training.add_argument("--seed", type=int, default=42, help="seed of the split, the sampling and training")
    federation = parser.add_argument_group("federation")
    federation.add_argument("--mode", type=str, default="simulation", help="simulation or deployment")
    federation.add_argument("--superlink", type=str, default=None,
                            help="deployment: the SuperLink's address HOST:PORT")
    federation.add_argument("--clients", type=int, default=3,
                            help="clients (simulation: virtual SuperNodes; deployment: SuperNodes to wait "
                                 "for)")
    federation.add_argument("--partition", type=str, default="iid", help="iid or dirichlet")
    federation.add_argument("--alpha", type=float, default=0.5,
                            help="Dirichlet concentration (small: skewed)")
    federation.add_argument("--rounds", type=int, default=10, help="rounds of FedAvg")
    federation.add_argument("--fraction_fit", type=float, default=1.0,
                            help="share of clients sampled per round")
    federation.add_argument("--min_fit_clients", type=int, default=None,
                            help="fewest clients a round averages (default: min(2, --clients))")
    federation.add_argument("--round_timeout", type=float, default=3600.0,
                            help="seconds a round waits for its clients' replies")
    federation.add_argument("--connect_timeout", type=float, default=300.0,
                            help="seconds to wait for --clients clients to connect")
    federation.add_argument("--client_cpus", type=float, default=1.0, help="simulation: CPUs per client")
    federation.add_argument("--dp_noise", type=float, default=None,
                            help="differential privacy: Gaussian noise multiplier (with --dp_clip)")
    federation.add_argument("--dp_clip", type=float, default=None,
                            help="differential privacy: L2 norm each client's update is clipped to")
    federation.add_argument("--dp_delta", type=float, default=1e-5, help="the delta epsilon is reported at")
    federation.add_argument("--eval_prompts", type=int, default=50,
                            help="validation prompts decoded each round for the task's metric (0: NLL only)")
    federation.add_argument("--eval_max_length", type=int, default=64, help="longest decoded output")
    federation.add_argument("--output_dir", type=str, default=None, help="run folder")
    federation.add_argument("--resume", action="store_true", help="continue the run in --output_dir")
    from engines.method_flags import add_method_arguments
    add_method_arguments(parser)
    return parser


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    from utils.hub import check_model_source
    check_model_source(args.model_checkpoint)
    from engines.federated import run_federated
    from engines.runtime import configure_logging
    configure_logging()
    run_federated(args)


if __name__ == "__main__":
    main()
