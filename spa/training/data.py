"""What a training round trains on: the pairs (seed, judged, replayed), RPO's prompt embeddings, and the
reference's sequence log-probs computed once before training.

``iter_t/train_pairs.parquet`` is written only when the set is more than the stage's input (replay,
RPO embeddings); ``iter_t/reference_logps.parquet`` only when no reference model is kept in memory.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow.compute as pc

from spa.config import SPAConfig
from spa.run.artifacts import read_table, write_table
from spa.run.layout import RunLayout
from spa.training.rounds import TrainRound

PAIR_COLUMNS = ("prompt_id", "prompt", "chosen", "rejected")


def training_pairs(cfg: SPAConfig, t: int) -> dict[str, list]:
    """The stage's own pairs as columns: the seed set (``t = 0``), or the judged pairs without ties and drops.

    ``where`` names each pair for errors (a pair too long for the context): a seed pair by the file and row of
    ``data.source`` it came from (the seed set is shuffled), a judged pair by its prompt id."""
    layout = RunLayout.of(cfg)
    if t == 0:
        table = read_table(layout.seed, "seed")
        out = {k: table.column(k).to_pylist() for k in PAIR_COLUMNS}
        if "source_row" in table.column_names:  # written by spa prepare
            out["where"] = [f"{cfg.data.source} row {r} (prompt_id {p!r}, seed pair {i})" for i, (r, p) in
                            enumerate(zip(table.column("source_row").to_pylist(), out["prompt_id"], strict=True))]
        return out
    table = read_table(layout.judgments(t), "judgments")
    table = table.filter(pc.invert(table.column("tie")))
    if "dropped" in table.column_names:
        table = table.filter(pc.invert(table.column("dropped")))
    out = {k: table.column(k).to_pylist() for k in PAIR_COLUMNS}
    out["where"] = [f"{layout.judgments(t)}, prompt_id {p!r}" for p in out["prompt_id"]]
    for side in ("chosen", "rejected"):
        col = f"{side}_finished"
        out[col] = table.column(col).to_pylist() if col in table.column_names else None
    return out


def _replay(cfg: SPAConfig, t: int, n: int, pairs: dict[str, list]) -> int:
    """Append DICE's replayed gold pairs: ``gamma * n / (1 - gamma)`` of them, so gold is a ``gamma`` share."""
    import numpy as np
    import pyarrow as pa

    seed = read_table(RunLayout.of(cfg).seed, "seed")
    gamma = cfg.train.replay_fraction
    want = int(round(gamma * n / (1 - gamma)))
    rng = np.random.default_rng([cfg.train.seed, t, 0x5EED])
    if want <= seed.num_rows:
        idx = np.sort(rng.choice(seed.num_rows, size=want, replace=False))
    else:  # more than the seed holds: every pair once, the rest drawn again
        idx = np.concatenate([rng.permutation(seed.num_rows), rng.choice(seed.num_rows, want - seed.num_rows)])
    picked = seed.take(pa.array(idx))
    for k in PAIR_COLUMNS:
        pairs[k] = pairs[k] + picked.column(k).to_pylist()
    pairs["chosen_finished"] += [True] * want
    pairs["rejected_finished"] += [True] * want
    pairs["source"] += ["replay"] * want
    return want


def build_training_set(cfg: SPAConfig, rnd: TrainRound) -> dict[str, Any]:
    """Write ``iter_t/train_pairs.parquet``: the pairs this round trains on, with a ``source`` column
    (``seed``, ``judged``, ``replay``) and, for RPO, ``prompt_emb`` (computed once per prompt)."""
    import pyarrow as pa

    t = rnd.t
    pairs = training_pairs(cfg, t)
    pairs.pop("where", None)  # for messages only, not a column of the set
    n = len(pairs["prompt"])
    for side in ("chosen_finished", "rejected_finished"):
        if pairs.get(side) is None:
            pairs[side] = [True] * n
    pairs["source"] = ["seed" if t == 0 else "judged"] * n
    replayed = _replay(cfg, t, n, pairs) if t > 0 and cfg.train.replay_fraction > 0 else 0
    columns: dict[str, Any] = dict(pairs)
    if rnd.loss.kind.needs_prompt_embeddings:
        from spa.training.embeddings import embed_texts

        unique = sorted(set(pairs["prompt"]))
        emb = embed_texts(unique, cfg.train.rpo.embedding_model)
        index = {p: i for i, p in enumerate(unique)}
        columns["prompt_emb"] = pa.array([emb[index[p]].tolist() for p in pairs["prompt"]], pa.list_(pa.float32()))
    write_table(pa.table(columns), rnd.training_set)
    return {"replayed_pairs": replayed, "training_pairs": len(columns["prompt"])}


def load_training_set(cfg: SPAConfig, rnd: TrainRound) -> tuple[dict[str, list], list | None]:
    """The round's pairs (and RPO's prompt embeddings): the materialised set, or the stage's input itself."""
    if rnd.training_set is None:
        return training_pairs(cfg, rnd.t), None
    import pyarrow.parquet as pq

    table = pq.read_table(rnd.training_set)  # written by this stage's own body just before
    pairs = {k: table.column(k).to_pylist() for k in table.column_names if k != "prompt_emb"}
    emb = table.column("prompt_emb").to_pylist() if "prompt_emb" in table.column_names else None
    return pairs, emb


def unpaired_set(rnd: TrainRound) -> dict[str, list]:
    """SSPO / DPO+SFT: the unpaired responses of ``<run>/data/unpaired.parquet`` (prompt_id, prompt, response,
    ``finished``: False for a pi_init answer cut off at its token cap, True for every row of a file source, and
    ``where``: each row's name in errors, by its row of ``data.unpaired_source``)."""
    table = read_table(rnd.unpaired, "unpaired")
    out = {k: table.column(k).to_pylist() for k in ("prompt_id", "prompt", "response")}
    out["finished"] = (table.column("finished").to_pylist() if "finished" in table.column_names
                       else [True] * table.num_rows)
    rows = table.column("source_row").to_pylist() if "source_row" in table.column_names else range(table.num_rows)
    out["where"] = [f"{rnd.unpaired} (unpaired source row {r}, prompt_id {p!r})" for r, p in zip(rows, out["prompt_id"], strict=True)]
    if not out["prompt"]:
        raise ValueError(f"{rnd.unpaired}: the unpaired set is empty (every row of data.unpaired_source was dropped?)")
    return out


def reference_logps_once(cfg: SPAConfig, rnd: TrainRound, run_key: str, policy, dataset, pad_id: int):
    """``iter_t/reference_logps.parquet`` (row, ref_logp_chosen, ref_logp_rejected), unless a file with the
    same key (start model, data, config, precision) exists: a resumed stage reuses it. Under data
    parallelism every rank scores a strided share of the pairs, all ranks gather them, rank 0 writes them.
    Every rank reads the key before the gather, so none can see rank 0's new file early."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from spa.training.pairs import reference_logps

    path = RunLayout.of(cfg).reference_logps(rnd.t)
    key = f"{run_key}:{'bf16' if rnd.bf16 else 'fp32'}"
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    n = len(dataset.items)  # the pairs (an SSPO / DPO+SFT set also holds unpaired responses, with no reference)
    if path.exists() and (pq.read_schema(path).metadata or {}).get(b"spa_key") == key.encode():
        table = read_table(path, "reference_logps")
        if table.num_rows != n:
            raise RuntimeError(f"{path}: {table.num_rows} rows for {n} training pairs")
        return torch.from_numpy(np.stack([table.column("ref_logp_chosen").to_numpy(),
                                          table.column("ref_logp_rejected").to_numpy()], axis=1))
    mine = list(range(rank, n, world))
    values = reference_logps(policy, [dataset.items[i] for i in mine], pad_id, cfg.judge.batch_size, rnd.bf16)
    if world > 1:  # every rank ends up with all values; only rank 0 writes them
        shares: list = [None] * world
        torch.distributed.all_gather_object(shares, (mine, values.tolist()))
        values = torch.zeros(n, 2, dtype=torch.float64)
        for rows, vals in shares:
            values[rows] = torch.tensor(vals, dtype=torch.float64)
    if rank == 0:
        table = pa.table({"row": pa.array(range(n), pa.int32()),
                          "ref_logp_chosen": values[:, 0].numpy(), "ref_logp_rejected": values[:, 1].numpy()})
        write_table(table.replace_schema_metadata({"spa_key": key}), path, "reference_logps")
    return values
