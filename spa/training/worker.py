"""The training process of one round: set up, train, save (the shape of torchtune's recipes).

``train_worker`` runs in the stage's own process, or once per device under ``torchrun`` when
``train.num_processes x train.nnodes > 1`` (gloo on CPU; several nodes meet in a c10d rendezvous: :func:`launch`);
this module is then the workers' entry point
(``python -m spa.training.worker``). What the round does is decided in
:func:`spa.training.rounds.resolve_round`; this module only carries it out.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

from spa.config import SPAConfig, load_config
from spa.errors import ConfigError
from spa.run.artifacts import write_table
from spa.run.layout import RunLayout
from spa.training.data import load_training_set, reference_logps_once, unpaired_set
from spa.training.rounds import TrainRound, resolve_round


def _device() -> str:
    import torch

    return "cpu" if not torch.cuda.is_available() else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_models(cfg: SPAConfig, rnd: TrainRound):
    """The policy (a LoRA adapter on it when configured) and, only where the loss needs its logits and
    they are not precomputed, a frozen reference copy (none for SSPO, whose reward is reference-free) (docs/algorithm.md, "Which reference where")."""
    from spa.models.loading import load_causal_lm
    from spa.training.pairs import disable_dropout

    tc, trust = cfg.train, cfg.model.trust_remote_code
    policy = load_causal_lm(rnd.start, tc.lora.base_dtype if tc.lora is not None else "float32", load_device(cfg),
                            trust)
    disable_dropout(policy)
    ref_model = None
    if tc.lora is not None:  # the reference is the base weights with the adapter disabled
        policy = with_adapter(policy, tc.lora, tc.seed)
    elif not rnd.precompute_reference and rnd.needs_reference:
        # the reference in exactly the policy's precision (fp32 weights, the same autocast in the same forward
        # code), so that pi_theta = pi_ref gives margin 0 at step 0; a bf16 copy would not (~0.01 nats)
        ref_model = load_causal_lm(rnd.start, "float32", _device(), trust)
        disable_dropout(ref_model)
        ref_model.requires_grad_(False)
    policy.train()
    return policy, ref_model


def load_device(cfg: SPAConfig) -> str:
    """Where a rank loads the policy before training: its own device, except under FSDP with LoRA (the 70B recipe:
    141 GB of bf16 base would not fit one GPU), where every rank loads it into host memory and ``fully_shard`` moves
    only that rank's shards to its GPU."""
    return "cpu" if cfg.train.shards_lora else _device()


def with_adapter(base, lora, seed: int):
    """``base`` with a fresh LoRA adapter from ``train.lora`` (its B is zero, so it starts as the base itself); the
    adapter's weights are fp32 whatever the base's dtype (peft's ``autocast_adapter_dtype``). A's random start comes
    from ``seed`` alone, not from whatever the process's generator has drawn before: the same adapter in a stage
    process, in a flow's process and on every rank."""
    import torch
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(base, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ), autocast_adapter_dtype=True)


def training_arguments(cfg: SPAConfig, rnd: TrainRound, output_dir: Path):
    """transformers' ``TrainingArguments`` of the round: every optimiser setting comes from ``train:``."""
    import torch
    from transformers import TrainingArguments

    from spa.run import trackers
    from spa.training.fsdp import fsdp_arguments

    tc = cfg.train
    warn = print if int(os.environ.get("RANK", "0")) == 0 else lambda _line: None
    report_to = trackers.usable(tc.report_to, warn)
    if rnd.loss.kind.reweights and tc.micro_batch_size < tc.batch_size:  # the group: docs/variants.md 3.3, item 7
        warn(f"[train] DRO solves its weights over each micro-batch ({tc.micro_batch_size} pairs on each process), "
             f"not over the optimiser batch of {tc.batch_size}: set train.micro_batch_size: {tc.batch_size} on one "
             "process for the specified group (train_log's dro_group_size records the group)")
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=tc.micro_batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps, learning_rate=tc.learning_rate,
        num_train_epochs=rnd.epochs, lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        optim="adamw_torch", weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm, logging_steps=1,
        save_strategy="steps", save_steps=tc.save_steps, save_total_limit=1, report_to=report_to, seed=tc.seed,
        data_seed=tc.seed, bf16=rnd.bf16,
        gradient_checkpointing=tc.gradient_checkpointing and tc.sharding == "none",  # FSDP: its own (fsdp_arguments)
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and _world() > 1 else None, disable_tqdm=False,
        run_name=trackers.run_name(cfg.run_dir, rnd.t),  # the tracker run of this iteration (t = 0: the seed stage)
        **fsdp_arguments(tc),
    )


def training_dataset(cfg: SPAConfig, rnd: TrainRound, tok):
    """The round's rendered training set, its pairs' prompt ids and (SSPO, DPO+SFT) the unpaired rows' prompt ids:
    the pairs, or the pairs and the unpaired responses as one shuffled set."""
    from spa.training.pairs import MixedDataset, PairDataset

    pairs, emb = load_training_set(cfg, rnd)
    if not pairs["prompt"]:
        raise ValueError(f"iteration {rnd.t}: no training pairs (all ties or dropped)")
    dataset = PairDataset(tok, pairs["prompt"], pairs["chosen"], pairs["rejected"], cfg.model.max_length,
                          pairs.get("chosen_finished"), pairs.get("rejected_finished"), prompt_emb=emb,
                          key_phrases=rnd.loss.kind.needs_key_phrases, where=pairs.get("where"))
    if rnd.unpaired is None:
        return dataset, pairs["prompt_id"], []
    unpaired = unpaired_set(rnd)
    mixed = MixedDataset(dataset, tok, unpaired["prompt"], unpaired["response"], cfg.model.max_length,
                         unpaired["where"], unpaired["finished"])
    return mixed, pairs["prompt_id"], unpaired["prompt_id"]


def setup(cfg: SPAConfig, rnd: TrainRound, run_key: str):
    """Tokenizer, pairs, models and a ``RefinedDPOTrainer`` resumed from this run's own last checkpoint."""
    import torch

    from spa.models.rendering import load_tokenizer
    from spa.training.checkpoints import STATE_FILE, latest_checkpoint, prepare_checkpoint_dir
    from spa.training.pairs import PairCollator
    from spa.training.trainer import SPO_HEADS, RefinedDPOTrainer

    tok = load_tokenizer(rnd.start, cfg.model.trust_remote_code)
    dataset, prompt_ids, unpaired_ids = training_dataset(cfg, rnd, tok)
    policy, ref_model = load_models(cfg, rnd)
    ckpt_dir = RunLayout.of(cfg).checkpoints(rnd.t)
    args = training_arguments(cfg, rnd, ckpt_dir)
    # TrainingArguments has set up the process group: rank 0 vets the checkpoints, then all read them
    if int(os.environ.get("RANK", "0")) == 0:
        last = prepare_checkpoint_dir(ckpt_dir, run_key, cfg.train.save_steps)
        if last is not None:
            print(f"[{rnd.stage_key}] resuming from {last.name} (this run's last checkpoint)", flush=True)
    if _world() > 1:
        torch.distributed.barrier()
    if ref_model is not None and cfg.train.sharding == "fsdp":  # DND's reference, sharded like the policy will be
        from spa.training.fsdp import shard_reference

        ref_model = shard_reference(ref_model, rnd.bf16)
    if rnd.precompute_reference:  # before any step: the policy still holds the reference's weights
        dataset.ref_logps = reference_logps_once(cfg, rnd, run_key, policy, dataset, tok.pad_token_id)
    resume = latest_checkpoint(ckpt_dir)
    state = json.loads((resume / STATE_FILE).read_text()) if resume and (resume / STATE_FILE).exists() else None
    trainer = RefinedDPOTrainer(
        model=policy, args=args, train_dataset=dataset, data_collator=PairCollator(tok.pad_token_id),
        ref_model=ref_model, beta=cfg.train.beta, refine=rnd.refine, resume_state=state, loss=rnd.loss,
        group_by_length=cfg.train.group_by_length,
    )
    if trainer.is_fsdp_enabled and int(os.environ.get("RANK", "0")) == 0:
        what = ("the frozen base and the adapter's weights, gradients and optimiser state" if cfg.train.lora is not None
                else "weights, gradients and optimiser state")
        print(f"[{rnd.stage_key}] FSDP2: {what} sharded over {_world()} processes", flush=True)
    if args.report_to:
        from spa.run.trackers import point_callbacks

        point_callbacks(trainer, cfg.run_dir, rnd.t)
    if trainer.spo_heads is not None and resume is not None and (resume / SPO_HEADS).exists():
        from safetensors.torch import load_file

        trainer.spo_heads.load_state_dict(load_file(str(resume / SPO_HEADS)))
    trainer.unpaired_prompt_ids = unpaired_ids
    return trainer, tok, prompt_ids, resume


def save(cfg: SPAConfig, rnd: TrainRound, trainer, tok, prompt_ids: list[str]) -> None:
    """Rank 0 writes pi_t (LoRA merged), the train log, the refinement flags, SSPO's pseudo-labels and SPO's heads."""
    from spa.training.trainer import gather_samples, rows_to_table, samples_to_table
    from spa.training.unpaired_trainer import PseudoLabel, pseudo_labels_table

    layout = RunLayout.of(cfg)
    trainer.accelerator.wait_for_everyone()
    samples = gather_samples(trainer.samples)
    pseudo = gather_samples(trainer.pseudo_labels, PseudoLabel) if trainer.sspo_state is not None else []
    weights = adapter = None
    if trainer.is_fsdp_enabled:  # every rank takes part in gathering the shards; rank 0 receives them
        from spa.training.fsdp import full_state_dict, full_trainable_state

        if cfg.train.shards_lora:  # only the adapter is gathered: the frozen base is rnd.start's weights
            adapter = full_trainable_state(trainer.model)
        else:
            weights = full_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        if adapter is not None:
            _save_merged_adapter(cfg, rnd, adapter, tok, layout.model(rnd.t))
        else:
            _save_model(trainer, tok, layout.model(rnd.t), cfg.train.lora is not None, weights)
        if trainer.refine is not None:
            write_table(samples_to_table(samples, prompt_ids), layout.refinement(rnd.t), "refinement")
        write_table(rows_to_table(trainer.rows), layout.train_log(rnd.t), "train_log")
        if trainer.sspo_state is not None:
            write_table(pseudo_labels_table(pseudo, trainer.unpaired_prompt_ids), layout.pseudo_labels(rnd.t),
                        "pseudo_labels")
        if trainer.spo_heads is not None:
            from safetensors.torch import save_file

            save_file(trainer.spo_heads.state_dict(), str(layout.spo_heads(rnd.t)))
    trainer.accelerator.wait_for_everyone()


def train_worker(cfg: SPAConfig, t: int, run_key: str) -> None:
    """Train ``pi_t`` (in this process; one of several under torchrun)."""
    rnd = resolve_round(cfg, t)
    from spa.run.trackers import training_run

    trainer, tok, prompt_ids, resume = setup(cfg, rnd, run_key)
    with training_run(trainer.args.report_to, cfg.run_dir, t):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    save(cfg, rnd, trainer, tok, prompt_ids)


def _save_model(trainer, tok, target: Path, lora: bool, weights: dict | None = None) -> None:
    """Save ``pi_t`` as a full safetensors model (a LoRA adapter is merged), atomically as a directory; ``weights``:
    the gathered full state dict of a sharded model (the same ordinary model, whatever the training sharded)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        model = model.merge_and_unload()
    from spa.models.loading import save_model_dir

    save_model_dir(model, tok, target, state_dict=weights)


def _save_merged_adapter(cfg: SPAConfig, rnd: TrainRound, adapter: dict, tok, target: Path) -> None:
    """``pi_t`` of a sharded LoRA round: the base (``rnd.start``, on the CPU, in ``train.lora.base_dtype``) with the
    gathered adapter merged by peft, saved as one ordinary model like every other round's."""
    from spa.models.loading import load_causal_lm, save_model_dir

    model = with_adapter(load_causal_lm(rnd.start, cfg.train.lora.base_dtype, "cpu", cfg.model.trust_remote_code),
                         cfg.train.lora, cfg.train.seed)
    missing = set(adapter) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"the gathered adapter has weights the rebuilt model does not: {sorted(missing)[:3]}")
    model.load_state_dict(adapter, strict=False)
    save_model_dir(model.merge_and_unload(), tok, target)


# where a launcher says which node this is, in the order asked: ours (and Lightning's), Kubeflow's PyTorchJob
# (torchrun's own PET_ variables), Slurm's, torchrun's inside an agent, a Kubernetes indexed Job's
NODE_RANK_VARS = ("NODE_RANK", "PET_NODE_RANK", "SLURM_NODEID", "GROUP_RANK", "JOB_COMPLETION_INDEX")


def node_rank(cfg: SPAConfig, env: dict[str, str] | None = None) -> int:
    """This node's rank in ``0 .. train.nnodes - 1`` (always 0 on one node), from the first of ``NODE_RANK_VARS`` set."""
    env = os.environ if env is None else env
    nnodes = cfg.train.nnodes
    if nnodes == 1:
        return 0
    name = next((v for v in NODE_RANK_VARS if env.get(v, "").strip()), None)
    if name is None:
        raise ConfigError(f"train.nnodes is {nnodes} but this node's rank is not set: set NODE_RANK (0..{nnodes - 1}; "
                          f"under Slurm SLURM_NODEID is read)")
    value = env[name].strip()
    if not value.isdigit() or int(value) >= nnodes:
        raise ConfigError(f"{name}={value}: a node rank must be 0..{nnodes - 1} (train.nnodes {nnodes})")
    return int(value)


def rdzv_id(cfg: SPAConfig, t: int) -> str:
    """The rendezvous id of iteration ``t``: ``train.rdzv_id``, else one from the run directory and ``t`` (the same on
    every node that runs the same config)."""
    import hashlib

    tag = cfg.train.rdzv_id or "spa-" + hashlib.sha256(cfg.run_dir.encode()).hexdigest()[:12]
    return f"{tag}-t{t}"


def torchrun_command(cfg: SPAConfig, t: int, run_key: str, config_path: Path) -> list[str]:
    """torchrun over ``train.num_processes`` processes on this node: standalone on one node; on ``train.nnodes``
    nodes a c10d rendezvous at ``train.rdzv_endpoint``. c10d gives out the global ranks itself (torchrun ignores a
    node rank there), so global rank 0, the one that writes, may be on any node: the run directory is shared."""
    tc = cfg.train
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tc.num_processes}"]
    if tc.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={tc.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={tc.rdzv_endpoint}",
                f"--rdzv_id={rdzv_id(cfg, t)}"]
    return cmd + ["-m", "spa.training.worker", "--config", str(config_path), "--iteration", str(t),
                  "--run-key", run_key]


def launch(cfg: SPAConfig, t: int, run_key: str, config_path: Path) -> None:
    """Run ``train_worker`` in ``train.num_processes`` processes on this node under torchrun (with the other nodes'
    when ``train.nnodes > 1``); a failure says why."""
    n = cfg.train.num_processes
    cmd = torchrun_command(cfg, t, run_key, config_path)
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
        where = f"{n} processes" + (f" on node {node_rank(cfg)} of {cfg.train.nnodes}" if cfg.train.nnodes > 1 else "")
        raise RuntimeError(f"distributed training ({where}) failed with exit code {proc.returncode}; "
                           f"last lines of the workers' stderr:\n{''.join(tail)}")


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
