"""`adapter`: the authors' residual adapter after every block (Lin et al. 2020), the default method.

    h <- h + W_up ReLU(W_down LayerNorm(h) + b_down) + b_up        W_down: d x b, W_up: b x d

Its tensors keep the names of the authors' `adapter_block` (`<layer>.ln.weight`,
`<layer>.project_down.weight`, ...), so today's checkpoints and the authors' load unchanged.
"""
from models.adapters import Adapter
from models.methods.base import Method


class AdapterMethod(Method):
    name = "adapter"
    title = "residual adapter after each block"
    reference = "Lin et al. 2020"
    points = frozenset({"block_output"})
    defaults = {"bottleneck": 100}
    help = {"bottleneck": "bottleneck size b (default: the task's own from the paper: mt/qa 300, "
                          "dialogue/summarization 100, nlg 10)"}
    key_prefix = "adapters"  # checkpoint keys adapters.<task>.<layer>.<name>, as before methods existed

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        b = self.options["bottleneck"]
        for i in range(shape.n_layer):
            self.add_module(str(i), Adapter(shape.d_model, b, shape.eps, shape.init_std))

    @classmethod
    def check(cls, options, where):
        cls.require(options["bottleneck"] >= 1, where,
                    f"bottleneck must be at least 1, got {options['bottleneck']}")

    @classmethod
    def parameter_count(cls, shape, options):
        d, b = shape.d_model, options["bottleneck"]
        return shape.n_layer * (2 * d + d * b + b + b * d + d)  # LayerNorm, down, up

    @property
    def bottleneck(self):
        return self.options["bottleneck"]

    def __getitem__(self, layer):
        return getattr(self, str(layer))

    def __len__(self):
        return self.shape.n_layer

    def __iter__(self):  # the per-layer adapters, as the authors' ModuleList
        return (self[i] for i in range(self.shape.n_layer))

    def block_output(self, layer, hidden):  # (n, T, d)
        return self[layer](hidden)
