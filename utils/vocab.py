"""The vocabulary contract: GPT-2's 50,257 tokens, then 30 added special tokens at fixed ids.

The added tokens come in the authors' order (`<pad>`=50257, then each built-in task's own tokens),
so every checkpoint of every task gives each token the same id. The task table (tasks/table.py)
says what the tasks do with them; the model only needs these ids, so models/ reads this module
and never the task table."""

GPT2_VOCAB_SIZE = 50257
PAD_TOKEN = "<pad>"
EOS_ID = 50256  # GPT-2's <|endoftext|>

# Each built-in task's own special tokens, bos and eos first, in the authors' order.
BUILTIN_TASK_TOKENS = {
    "dialogue": ("<bos_dial>", "<eos_dial>", "<speaker1>", "<speaker2>", "<persona>"),
    "qa": ("<bos_qa>", "<eos_qa>", "<question>", "<answer>", "<document>"),
    "mt": ("<bos_mt>", "<eos_mt>", "<source_mt>", "<target_mt>"),
    "summarization": ("<bos_sm>", "<eos_sm>", "<source_sm>", "<target_sm>"),
    "nlg": ("<bos_nlg>", "<eos_nlg>", "<name>", "<eatType>", "<familyFriendly>", "<priceRange>", "<food>",
            "<near>", "<area>", "<customerRating>", "<response>"),
}
ALL_SPECIAL_TOKENS = (PAD_TOKEN,) + tuple(t for tokens in BUILTIN_TASK_TOKENS.values() for t in tokens)
VOCAB_SIZE = GPT2_VOCAB_SIZE + len(ALL_SPECIAL_TOKENS)  # 50,287
SPECIAL_IDS = tuple(range(GPT2_VOCAB_SIZE, VOCAB_SIZE))
PAD_ID = GPT2_VOCAB_SIZE


def special_token_id(token):
    """Stable id of an added token: 50257 + its position in ALL_SPECIAL_TOKENS."""
    return GPT2_VOCAB_SIZE + ALL_SPECIAL_TOKENS.index(token)


def builtin_token_ids(name):
    """Ids of a built-in task's own special tokens (empty for any other task: user tasks add none)."""
    return tuple(special_token_id(t) for t in BUILTIN_TASK_TOKENS.get(name, ()))
