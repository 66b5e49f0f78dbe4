"""The original system's methods, written out as the benchmarks' baselines.

- Decoding (the authors' `sample_sequence`, greedy): one prompt at a time, no key/value cache, the
  whole sequence run through the model again for every new token, logits for every position.
- Batching for training (the authors' `pad_dataset`): every example padded to the longest
  example of its whole split (utils.data.collate with `width`, in bench/run.py).
"""
import torch


@torch.no_grad()
def decode_original(model, prompt, max_length, min_length=1):
    """Greedy ids for one engines.generate.Prompt, the original way (tokens identical to ours)."""
    device = model.device
    banned = torch.tensor(list(prompt.banned_ids), dtype=torch.long, device=device)
    stops = torch.tensor(list(prompt.stop_ids), dtype=torch.long, device=device)
    room = min(max_length, model.config.n_positions - len(prompt.input_ids))
    output = []
    for step in range(room):
        ids = torch.tensor([prompt.input_ids + output], device=device)                            # (1, seq)
        types = torch.tensor([prompt.token_type_ids + [prompt.reply_type] * len(output)], device=device)
        logits = model(ids, token_type_ids=types, task_ids=prompt.task_id,
                       use_cache=False).logits  # (1, seq, vocab)
        logits = logits[0, -1, :].float()
        if len(banned):
            logits[banned] = -float("inf")
        if step < min_length and len(stops):
            logits[stops] = -float("inf")
        token = int(logits.argmax())
        if token in prompt.stop_ids:
            break
        output.append(token)
    return output
