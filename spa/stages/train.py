"""``spa seed`` and ``spa train --iteration t``: DPO on the seed, refined DPO on judged pairs.

Seed stage (SPA.md): ``pi_0 = DPO(pi_init, D_0)`` with ``pi_ref = pi_init``, 3 epochs.
Iteration t: from ``pi_{t-1}`` with ``pi_ref = pi_{t-1}``, 1 epoch, self-refinement
(Eq. 9-10) with de-coupled detection (Eq. 11-12, ``lambda_t``), ties left out.

With ``train.num_processes > 1`` the work runs under ``torchrun`` (one process per
device; gloo on CPU); this module is then also the worker entry point.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from spa.config import SPAConfig, load_config
from spa.run.artifacts import read_table, write_table
from spa.run.layout import RunLayout, model_dir
from spa.run.manifest import content_hash
from spa.stages.runner import StageResult, require, run_stage

# torch, transformers and the trainer are imported inside the functions that train, so that a stage
# that is already up to date answers in well under a second

SECTIONS = ["model", "train"]


# The three functions below read only the config (no torch import): the command answers "up to date"
# without loading torch, and `spa plan` shows the same resolution the trainer uses.
def refines(cfg: SPAConfig, t: int) -> bool:
    """Self-refinement (Eq. 9-10) applies: an iteration, SR on, and not the 'dro' variant (DRO without SR)."""
    return t > 0 and cfg.train.refinement.self_refine and cfg.train.loss != "dro"


def dnd_lambda_of(cfg: SPAConfig, t: int) -> float:
    """lambda of Eq. 12 in iteration ``t`` (0: DND off, the confidence is pi_theta's own)."""
    r = cfg.train.refinement
    return r.lam(t) if refines(cfg, t) and r.decoupled else 0.0


def loss_kind(cfg: SPAConfig, t: int) -> str:
    """The pair loss of this stage: DRO applies to the self-labelled rounds (VARIANTS.md 3.3, item 9)
    unless ``train.dro.seed_stage``; RPO to the seed stage and the iterations."""
    kind = cfg.train.loss
    if kind in ("dro", "sr+dro") and t == 0 and not cfg.train.dro.seed_stage:
        return "dpo"
    return kind


def refine_settings(cfg: SPAConfig, t: int):
    if not refines(cfg, t):
        return None
    from spa.training.trainer import RefineSettings

    r = cfg.train.refinement
    return RefineSettings(r.alpha, r.k_percent, r.window, r.warmup_fraction, dnd_lambda_of(cfg, t))


def loss_settings(cfg: SPAConfig, t: int):
    """:func:`loss_kind` with its parameters, as the trainer takes them."""
    from spa.training.trainer import LossSettings

    tc = cfg.train
    kind = loss_kind(cfg, t)
    spo = None
    if kind == "spo":
        from spa.training.spo import SPOSettings

        spo = SPOSettings(tc.spo.n_classes, tc.spo.gamma, tc.spo.head_lr, tc.spo.width, tc.spo.draw)
    return LossSettings(kind, tc.rpo.tau, tc.dro.eps, tc.dro.xi_min, spo=spo, seed=tc.seed)


def training_set_path(cfg: SPAConfig, t: int) -> Path:
    return RunLayout(Path(cfg.run_dir)).iteration(t) / "train_pairs.parquet"


REFERENCE_LOGPS = "reference_logps.parquet"


def precomputes_reference(cfg: SPAConfig, t: int) -> bool:
    """The reference enters only through sequence log-probs (no DND, Eq. 12): compute them once, before
    training, and keep no reference model in memory (``train.precompute_reference``)."""
    return cfg.train.precompute_reference and dnd_lambda_of(cfg, t) == 0


def _reference_logps(cfg: SPAConfig, t: int, run_key: str, policy, dataset, pad_id: int, bf16: bool):
    """``iter_t/reference_logps.parquet`` (row, ref_logp_chosen, ref_logp_rejected), unless a file with the
    same key (start model, data, config, precision) exists: a resumed stage reuses it. Under data
    parallelism every rank scores a strided share of the pairs, all ranks gather them, rank 0 writes them.
    Every rank reads the key before the gather, so none can see rank 0's new file early."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from spa.training.trainer import reference_logps

    path = RunLayout(Path(cfg.run_dir)).iteration(t) / REFERENCE_LOGPS
    key = f"{run_key}:{'bf16' if bf16 else 'fp32'}"
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    n = len(dataset)
    if path.exists() and (pq.read_schema(path).metadata or {}).get(b"spa_key") == key.encode():
        table = read_table(path, "reference_logps")
        if table.num_rows != n:
            raise RuntimeError(f"{path}: {table.num_rows} rows for {n} training pairs")
        return torch.from_numpy(np.stack([table.column("ref_logp_chosen").to_numpy(),
                                          table.column("ref_logp_rejected").to_numpy()], axis=1))
    mine = list(range(rank, n, world))
    values = reference_logps(policy, [dataset.items[i] for i in mine], pad_id, cfg.judge.batch_size, bf16)
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


def needs_training_set(cfg: SPAConfig, t: int) -> bool:
    """Replay (iterations) and RPO's prompt embeddings are materialised in ``iter_t/train_pairs.parquet``."""
    return (t > 0 and cfg.train.replay_fraction > 0) or cfg.train.loss == "rpo"


def build_training_set(cfg: SPAConfig, t: int) -> dict[str, Any]:
    """Write ``iter_t/train_pairs.parquet``: the pairs this stage trains on, with a ``source`` column
    (``seed``, ``judged``, ``replay``) and, for RPO, ``prompt_emb`` (computed once per prompt)."""
    import numpy as np
    import pyarrow as pa

    pairs = _training_pairs(cfg, t)
    n = len(pairs["prompt"])
    for side in ("chosen_finished", "rejected_finished"):
        if pairs.get(side) is None:
            pairs[side] = [True] * n
    pairs["source"] = ["seed" if t == 0 else "judged"] * n
    replayed = 0
    gamma = cfg.train.replay_fraction
    if t > 0 and gamma > 0:
        # DICE: n_offline = gamma * n_generated / (1 - gamma) gold pairs, the offline share of the mix is gamma
        seed = read_table(RunLayout(Path(cfg.run_dir)).seed, "seed")
        want = int(round(gamma * n / (1 - gamma)))
        rng = np.random.default_rng([cfg.train.seed, t, 0x5EED])
        if want <= seed.num_rows:
            idx = rng.choice(seed.num_rows, size=want, replace=False)
        else:  # more than the seed holds: every pair once, the rest drawn again
            idx = np.concatenate([rng.permutation(seed.num_rows), rng.choice(seed.num_rows, want - seed.num_rows)])
        picked = seed.take(pa.array(np.sort(idx) if want <= seed.num_rows else idx))
        for k in ("prompt_id", "prompt", "chosen", "rejected"):
            pairs[k] = pairs[k] + picked.column(k).to_pylist()
        pairs["chosen_finished"] += [True] * want
        pairs["rejected_finished"] += [True] * want
        pairs["source"] += ["replay"] * want
        replayed = want
    columns: dict[str, Any] = dict(pairs)
    if cfg.train.loss == "rpo":
        from spa.training.embeddings import embed_texts

        unique = sorted(set(pairs["prompt"]))
        emb = embed_texts(unique, cfg.train.rpo.embedding_model)
        index = {p: i for i, p in enumerate(unique)}
        columns["prompt_emb"] = pa.array([emb[index[p]].tolist() for p in pairs["prompt"]], pa.list_(pa.float32()))
    write_table(pa.table(columns), training_set_path(cfg, t))
    return {"replayed_pairs": replayed, "training_pairs": len(columns["prompt"])}


def _training_pairs(cfg: SPAConfig, t: int) -> dict[str, list]:
    layout = RunLayout(Path(cfg.run_dir))
    if t == 0:
        table = read_table(layout.seed, "seed")
        return {k: table.column(k).to_pylist() for k in ("prompt_id", "prompt", "chosen", "rejected")}
    table = read_table(layout.judgments(t), "judgments")
    table = table.filter(pc.invert(table.column("tie")))
    if "dropped" in table.column_names:
        table = table.filter(pc.invert(table.column("dropped")))
    out = {k: table.column(k).to_pylist() for k in ("prompt_id", "prompt", "chosen", "rejected")}
    for side in ("chosen", "rejected"):
        col = f"{side}_finished"
        out[col] = table.column(col).to_pylist() if col in table.column_names else None
    return out


def _precision(cfg: SPAConfig) -> bool:
    import torch

    if cfg.train.precision == "bf16":
        return True
    return cfg.train.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def train_worker(cfg: SPAConfig, t: int, run_key: str) -> None:
    """Train ``pi_t`` (in this process; one of several under torchrun)."""
    import torch
    from transformers import TrainingArguments

    from spa.models.loading import load_causal_lm
    from spa.models.rendering import load_tokenizer
    from spa.training.trainer import (
        SPO_HEADS,
        STATE_FILE,
        PairCollator,
        PairDataset,
        RefinedDPOTrainer,
        disable_dropout,
        gather_samples,
        latest_checkpoint,
        prepare_checkpoint_dir,
        rows_to_table,
        samples_to_table,
    )

    layout = RunLayout(Path(cfg.run_dir))
    start_dir = Path(cfg.model.pi_init) if t == 0 else model_dir(cfg, t - 1)
    tc = cfg.train
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = load_tokenizer(start_dir, cfg.model.trust_remote_code)
    if needs_training_set(cfg, t):
        import pyarrow.parquet as pq

        table = pq.read_table(training_set_path(cfg, t))  # written by this stage's own body just before
        pairs = {k: table.column(k).to_pylist() for k in table.column_names if k != "prompt_emb"}
        emb = table.column("prompt_emb").to_pylist() if "prompt_emb" in table.column_names else None
    else:
        pairs, emb = _training_pairs(cfg, t), None
    if not pairs["prompt"]:
        raise ValueError(f"iteration {t}: no training pairs (all ties or dropped)")
    dataset = PairDataset(tok, pairs["prompt"], pairs["chosen"], pairs["rejected"], cfg.model.max_length,
                          pairs.get("chosen_finished"), pairs.get("rejected_finished"), prompt_emb=emb,
                          key_phrases=cfg.train.loss == "spo")
    device = "cpu" if not torch.cuda.is_available() else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    policy = load_causal_lm(start_dir, "float32", device, cfg.model.trust_remote_code)
    disable_dropout(policy)
    ref_model = None
    precompute = precomputes_reference(cfg, t)
    if tc.lora is not None:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(
            r=tc.lora.r, lora_alpha=tc.lora.alpha, lora_dropout=tc.lora.dropout,
            target_modules=tc.lora.target_modules, task_type="CAUSAL_LM",
        ))
    elif not precompute:
        ref_model = load_causal_lm(start_dir, "auto" if _precision(cfg) else "float32", device, cfg.model.trust_remote_code)
        disable_dropout(ref_model)
        ref_model.requires_grad_(False)
    policy.train()

    ckpt_dir = layout.checkpoints(t)
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=tc.micro_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        learning_rate=tc.learning_rate,
        num_train_epochs=tc.seed_epochs if t == 0 else tc.epochs,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        optim="adamw_torch",
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        logging_steps=1,
        save_strategy="steps",
        save_steps=tc.save_steps,
        save_total_limit=1,
        report_to=[],
        seed=tc.seed,
        data_seed=tc.seed,
        bf16=_precision(cfg),
        gradient_checkpointing=tc.gradient_checkpointing,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and world > 1 else None,
        disable_tqdm=False,
    )
    # TrainingArguments has set up the process group: rank 0 vets the checkpoints, then all read them
    if rank == 0:
        prepare_checkpoint_dir(ckpt_dir, run_key)
    if world > 1:
        torch.distributed.barrier()
    if precompute:  # before any step: the policy still holds the reference's weights
        dataset.ref_logps = _reference_logps(cfg, t, run_key, policy, dataset, tok.pad_token_id, _precision(cfg))
    resume = latest_checkpoint(ckpt_dir)
    resume_state = json.loads((resume / STATE_FILE).read_text()) if resume and (resume / STATE_FILE).exists() else None
    trainer = RefinedDPOTrainer(
        model=policy, args=args, train_dataset=dataset, data_collator=PairCollator(tok.pad_token_id),
        ref_model=ref_model, beta=tc.beta, refine=refine_settings(cfg, t), resume_state=resume_state,
        loss=loss_settings(cfg, t), group_by_length=tc.group_by_length,
    )
    if trainer.spo_heads is not None and resume is not None and (resume / SPO_HEADS).exists():
        from safetensors.torch import load_file

        trainer.spo_heads.load_state_dict(load_file(str(resume / SPO_HEADS)))
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.accelerator.wait_for_everyone()
    samples = gather_samples(trainer.samples)
    if trainer.is_world_process_zero():
        _save_final(trainer, tok, layout.model(t), tc.lora is not None)
        if trainer.refine is not None:
            write_table(samples_to_table(samples, pairs["prompt_id"]), layout.refinement(t))
        write_table(rows_to_table(trainer.rows), layout.train_log(t), "train_log")
        if trainer.spo_heads is not None:
            from safetensors.torch import save_file

            save_file(trainer.spo_heads.state_dict(), str(layout.iteration(t) / SPO_HEADS))
    trainer.accelerator.wait_for_everyone()


def _save_final(trainer, tok, target: Path, lora: bool) -> None:
    """Save ``pi_t`` as a full safetensors model (a LoRA adapter is merged), atomically as a directory."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        model = model.merge_and_unload()
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _device_name() -> str:
    from spa.models.loading import default_device

    return str(default_device())


def _launch(cfg: SPAConfig, t: int, run_key: str, config_path: Path) -> None:
    n = cfg.train.num_processes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "spa.stages.train", "--config", str(config_path), "--iteration", str(t), "--run-key", run_key]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # stderr is passed through live (progress bars) and its tail is kept: a failed launch then
    # says why in the exception itself, not only somewhere up in a long log
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training ({n} processes) failed with exit code {proc.returncode}; "
                           f"last lines of the workers' stderr:\n{''.join(tail)}")


def refinement_summary(cfg: SPAConfig, t: int) -> dict[str, Any]:
    """Where the refinement flags of round ``t`` landed: flagged shares, SR/DND disagreement, and their
    precision on injected flips and (with ``judge.oracle``) on the labels the oracle calls wrong."""
    import pyarrow.parquet as pq

    from spa.judges.diagnostics import refinement_diagnostics

    layout = RunLayout(Path(cfg.run_dir))
    flags = pq.read_table(layout.refinement(t), columns=["prompt_id", "step", "z_sr", "z_dnd"]).to_pydict()
    # a judgments file written to the contract alone (ARTIFACTS) may lack our extra 'flipped' column
    has_flips = "flipped" in pq.read_schema(layout.judgments(t)).names
    judged = pq.read_table(layout.judgments(t), columns=["prompt_id", "flipped"] if has_flips else ["prompt_id"])
    flipped = dict(zip(judged["prompt_id"].to_pylist(), judged["flipped"].to_pylist(), strict=True)) if has_flips else {}
    wrong = None
    if layout.oracle_verdicts(t).exists():
        v = pq.read_table(layout.oracle_verdicts(t)).to_pydict()
        verdict = dict(zip(v["prompt_id"], v["oracle_verdict"], strict=True))
        wrong = [None if verdict.get(p, 1.5) == 1.5 else verdict[p] == 2.0 for p in flags["prompt_id"]]
    diag = refinement_diagnostics(
        flags["step"], flags["z_sr"], flags["z_dnd"] if dnd_lambda_of(cfg, t) > 0 else None,
        cfg.train.refinement.warmup_fraction, [bool(flipped.get(p, False)) for p in flags["prompt_id"]], wrong)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in diag.items()}


def run(cfg: SPAConfig, t: int, force: bool = False, echo=print) -> StageResult:
    """The seed stage (``t = 0``) or the training of iteration ``t``."""
    layout = RunLayout(Path(cfg.run_dir))
    if t == 0 and cfg.model.pi_0:
        raise ValueError("model.pi_0 is set (no-seed mode): the seed stage is skipped")
    start = Path(cfg.model.pi_init) if t == 0 else require(model_dir(cfg, t - 1), f"pi_{t-1}", "spa train" if t > 1 else "spa seed")
    data = require(layout.seed, "the seed set", "spa prepare") if t == 0 else require(layout.judgments(t), "judgments", f"spa judge --iteration {t}")
    outputs = [layout.model(t), layout.train_log(t)]
    if refines(cfg, t):
        outputs.append(layout.refinement(t))
    if needs_training_set(cfg, t):
        outputs.append(training_set_path(cfg, t))
    if precomputes_reference(cfg, t):
        outputs.append(layout.iteration(t) / REFERENCE_LOGPS)
    if cfg.train.loss == "spo":
        outputs.append(layout.iteration(t) / "spo_heads.safetensors")
    inputs = [start, data]
    key = "seed" if t == 0 else f"train/{t}"
    extra = {"iteration": t}

    def body() -> dict[str, Any]:
        extra_summary = build_training_set(cfg, t) if needs_training_set(cfg, t) else {}
        run_key = hashlib.sha256(json.dumps(
            {k: content_hash(p) for k, p in (("start", start), ("data", data))} | {"cfg": cfg.section_hash(*SECTIONS), "t": t},
            sort_keys=True).encode()).hexdigest()
        if cfg.train.num_processes > 1:
            _launch(cfg, t, run_key, layout.config)
        else:
            train_worker(cfg, t, run_key)
        log = read_table(layout.train_log(t), "train_log")
        shutil.rmtree(layout.checkpoints(t), ignore_errors=True)  # the stage is done; keep only pi_t
        losses = log.column("loss").to_pylist()
        return {
            "steps": log.num_rows, "first_loss": losses[0], "final_loss": losses[-1],
            "mean_refined_fraction": float(pc.mean(log.column("refined_fraction")).as_py()),
            "device": _device_name(), "processes": cfg.train.num_processes, "loss": loss_kind(cfg, t),
            **extra_summary, **(refinement_summary(cfg, t) if refines(cfg, t) else {}),
        }

    return run_stage(cfg, key, inputs, SECTIONS, outputs, body, extra_key=extra, force=force, echo=echo)


def _main() -> None:
    parser = argparse.ArgumentParser(description="SPA training worker (one process of a torchrun launch)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--run-key", required=True)
    ns = parser.parse_args()
    train_worker(load_config(ns.config), ns.iteration, ns.run_key)
    # Every artifact is written (atomically, by rank 0) and every rank passed the final barrier.
    # Leave without interpreter teardown: on CPU/gloo a worker can abort in C++ destructors at
    # exit ("terminate called without an active exception", SIGABRT) after the work succeeded,
    # which torchrun reports as a failed launch (seen about 1 run in 15 on 2 cores).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

if __name__ == "__main__":
    _main()
