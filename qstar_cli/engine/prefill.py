"""Prefill: a group of admitted rows' prompts into their slots' KV caches, one batched forward per
model (or a few, each of at most a chunk's tokens), before their first round."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from qstar_cli.engine.memory import prefill_chunk
from qstar_cli.engine.models import LoadedModel
from qstar_cli.engine.roles import Role, RoleModel, Side
from qstar_cli.engine.rows import to_device
from qstar_cli.engine.samples import StreamStats
from qstar_cli.engine.scheduler import Row
from qstar_cli.engine.slots import SlotCache


def pad_id(loaded: LoadedModel) -> int:
    tok = loaded.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def prefill(
    caches: dict[Role, SlotCache],
    roles: Iterable[RoleModel],
    rows: list[Row],
    group: list[Row],
    vocab: int,
    max_tokens: int,
    stats: StreamStats,
) -> list[Row]:
    """Prefill ``group`` into the slots after ``rows``: left-padded forwards per model over its
    distinct prompts but their last token (fed with the first round), whose caches are then
    copied to their other responses. Returns the group in slot order (distinct prompts first).

    Each forward takes at most ``max_tokens`` tokens (:func:`prefill_chunk`: as many whole
    prompts as fit, else a prompt's columns a chunk at a time, each chunk attending to the
    columns cached before it), so its working memory is what ``--batch-size auto`` reserved.
    """
    first = [i == 0 or not r.request.shares_prompt(group[i - 1].request) for i, r in enumerate(group)]
    distinct = [r for r, f in zip(group, first) if f]
    copies = [r for r, f in zip(group, first) if not f]
    # Each copy's prompt is the last distinct one before it.
    origin = list(itertools.accumulate(int(f) for f in first))
    origin = [o - 1 for o, f in zip(origin, first) if not f]
    group = distinct + copies
    start = len(rows)
    for r in roles:
        caches[r.role].ensure_capacity(max(row.prompt_lengths[r.side] + row.budget for row in group))
    width = [max(row.prompt_lengths[side] for row in distinct) - 1 for side in Side]
    if not any(row.result is not None for row in rows + group) or not any(width):
        return group
    for role in roles:
        cache, loaded, side_width = caches[role.role], role.loaded, width[role.side]
        if not side_width:
            continue
        ids = [row.prompt_ids(role.side)[:-1] for row in distinct]
        # Left-padded: the tokens and their positions (-1: padding), one copy to the device.
        table = np.stack([np.full((len(ids), side_width), pad_id(loaded)), np.full((len(ids), side_width), -1)])
        for i, prompt in enumerate(ids):
            if prompt:
                table[:, i, -len(prompt) :] = prompt, np.arange(len(prompt))
        token_ids, positions = to_device(table, loaded.model.device)
        chunk_rows, chunk_columns = prefill_chunk(len(ids), side_width, max_tokens)
        for r in range(0, len(ids), chunk_rows):
            # These rows' own width: their longest prompt's columns, the last of the table's.
            chunk_width = max(len(prompt) for prompt in ids[r : r + chunk_rows])
            padding = side_width - chunk_width
            for c in range(padding, side_width, chunk_columns):
                block = slice(r, r + chunk_rows), slice(c, c + chunk_columns)
                # The longest of these prompts has position column - padding.
                longest = min(c + chunk_columns, side_width) - padding
                cache.forward(loaded.model, token_ids[block], positions[block], start + r, longest, vocab)
        for j, i in enumerate(origin):
            cache.move(start + i, start + len(distinct) + j, len(ids[i]))
    stats.prefills += 1
    stats.prompts_prefilled += len(distinct)
    return group
