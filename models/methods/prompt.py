"""`prompt`: soft prompt embeddings (Lester et al. 2021).

The task's inputs carry virtual-token positions (the input builder puts them first for the five
built-in tasks, at the template's markers for user tasks); their embeddings are this method's
(n, d) table instead of a vocabulary row. They take positions like any token, and no segment
embedding. Defaults are the paper's: 100 tokens, initialized from the embeddings of tokens drawn
from the vocabulary's 5,000 most frequent (GPT-2's BPE ids 0-4999 are its earliest merges).
"""
import torch
from torch import nn

from models.methods.base import Method

INIT_VOCAB = 5000


class PromptMethod(Method):
    name = "prompt"
    title = "soft prompt embeddings"
    reference = "Lester et al. 2021"
    points = frozenset({"virtual"})
    dense_tensors = ("embeddings",)  # virtual tokens, not weights
    defaults = {"length": 100, "init_seed": 0}
    help = {"length": "virtual tokens", "init_seed": "seed of the vocabulary tokens the prompt starts from"}

    def __init__(self, shape, options=None, backbone=None):
        super().__init__(shape, options, backbone)
        n = self.options["length"]
        self.embeddings = nn.Parameter(torch.zeros(n, shape.d_model))
        if backbone is not None:
            table = backbone.get_input_embeddings().weight
            ids = torch.randint(0, min(INIT_VOCAB, table.shape[0]), (n,),
                                generator=torch.Generator().manual_seed(self.options["init_seed"]))
            with torch.no_grad():
                self.embeddings.copy_(table.detach()[ids.to(table.device)].float())

    @classmethod
    def check(cls, options, where):
        cls.require(options["length"] >= 1, where, f"length must be at least 1, got {options['length']}")

    @classmethod
    def parameter_count(cls, shape, options):
        return options["length"] * shape.d_model

    @property
    def num_virtual_tokens(self):
        return self.options["length"]

    def virtual_tokens(self):  # (n, d)
        return self.embeddings
