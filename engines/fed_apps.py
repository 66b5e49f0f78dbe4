"""The Flower apps of federated.py: a ServerApp whose main is engines/fed_server.py's rounds and a
ClientApp that answers the server's two messages, a query (its client id) and a train message
(one round of local training, engines/fed_client.py). Heavy imports wait for the first message, so
a deployment's ClientApp process answers the query without loading torch."""
import json
import warnings

from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from engines.fed_data import client_identity

ARGS_KEY = "args-file"  # run config key (deployment): the JSON file of the run's arguments


def load_args(path):
    """The run's arguments as federated.py wrote them (engines/federated.py's write_app)."""
    from argparse import Namespace
    with open(path, encoding="utf-8") as f:
        return Namespace(**json.load(f))


def server_app(args=None):
    """ServerApp of the run `args` (simulation), or of the run config's args-file (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid, context):
        from engines.fed_server import run_server
        run_server(grid, args if args is not None else load_args(context.run_config[ARGS_KEY]))

    return app


def client_app():
    app = ClientApp()

    @app.query()
    def query(message, context):
        client, _ = client_identity(context.node_config)
        return Message(RecordDict({"metrics": MetricRecord({"client-id": client})}), reply_to=message)

    @app.train()
    def train(message, context):
        # Ray's workers show the notices torch gives itself when ignite imports torch.distributed.optim
        # (pytest.ini ignores them too); this process never calls torch.jit.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.(script|interface)` is deprecated",
                                category=DeprecationWarning)
        from engines.fed_client import decode_settings, global_tensors_of, train_round
        from engines.fed_strategy import ARRAYS, CONFIG, METRICS, from_record, to_record
        config = message.content[CONFIG]
        tensors, metrics = train_round(decode_settings(config["settings"]), int(config["server-round"]),
                                       global_tensors_of(from_record(message.content[ARRAYS])),
                                       context.node_config)
        content = RecordDict({ARRAYS: to_record(tensors), METRICS: MetricRecord(metrics)})
        return Message(content, reply_to=message)

    return app
