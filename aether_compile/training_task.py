"""A structured synthetic language-modelling task for training-convergence checks.

Sequences are made of random "key value" pairs followed by queries that repeat an earlier key;
the target after a query key is its value. Solving it needs attention to one far-away position
(sharp, sparse attention), while the rest of the sequence is noise to be ignored. Generated on the
fly from a seed: nothing is downloaded.
"""

from __future__ import annotations

import torch


def recall_batch(batch: int, seq_len: int, vocab: int = 64, seed: int = 0, device="cpu"):
    """(input_ids, labels) [batch, seq_len]; labels are -100 except at recall positions."""
    g = torch.Generator().manual_seed(seed)
    half = vocab // 2
    n_pairs = seq_len // 4
    keys = torch.stack([torch.randperm(half, generator=g)[: min(n_pairs, half)]
                        for _ in range(batch)])
    n_pairs = keys.shape[1]
    values = torch.randint(half, vocab, (batch, n_pairs), generator=g)
    pairs = torch.stack([keys, values], -1).reshape(batch, 2 * n_pairs)
    n_q = (seq_len - 2 * n_pairs) // 2
    pick = torch.randint(0, n_pairs, (batch, n_q), generator=g)
    q_keys = torch.gather(keys, 1, pick)
    q_vals = torch.gather(values, 1, pick)
    queries = torch.stack([q_keys, q_vals], -1).reshape(batch, 2 * n_q)
    ids = torch.cat([pairs, queries], 1)
    ids = torch.nn.functional.pad(ids, (0, seq_len - ids.shape[1]))
    labels = torch.full_like(ids, -100)
    # predict the value token at position p from the query key at p - 1 (HF shifts internally)
    val_pos = 2 * n_pairs + 1 + 2 * torch.arange(n_q)
    labels[:, val_pos] = ids[:, val_pos]
    return ids.to(device), labels.to(device)
