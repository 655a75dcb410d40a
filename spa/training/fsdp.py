"""Sharded training with FSDP2 (``train.sharding: fsdp``) on transformers' ``Trainer``.

``Trainer`` and accelerate do the sharding itself (``fully_shard`` of every decoder layer, the classes the model
names in ``_no_split_modules``, then of the root), the gradient reduction, the sharded or full checkpoints and their
resume (optimiser, scheduler, RNG). This module adds what they do not:

- on CPU accelerate never selects FSDP: its ``MULTI_CPU`` mode wraps the model in DDP whatever plugin it is given.
  :class:`FSDPTrainerMixin` switches the built accelerator state to FSDP, so CPU/gloo runs take the very code path
  GPUs take (that is how the sharded path is tested for real on a CPU machine: tests/test_fsdp.py);
- the mixed precision: bf16 parameters with fp32 gradient reduction (accelerate's default reduces in bf16);
- the reference model that DND needs (its full logits every step), sharded the same way, inference only;
- the full state dict that becomes ``iter_t/model`` (one ordinary safetensors model).
"""

from __future__ import annotations

from typing import Any

import torch


def fsdp_arguments(tc) -> dict[str, Any]:
    """``TrainingArguments`` keywords of ``train.sharding`` (none: data parallelism, no keywords)."""
    if tc.sharding != "fsdp":
        return {}
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's _no_split_modules: its decoder layer
        "reshard_after_forward": True,  # full shard: parameters are gathered per layer, freed after it
        "state_dict_type": "SHARDED_STATE_DICT" if tc.fsdp.checkpoint == "sharded" else "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
        # train.gradient_checkpointing under FSDP: its own activation checkpointing (Trainer's would all-gather twice)
        "activation_checkpointing": tc.gradient_checkpointing,
    }}


def mixed_precision(bf16: bool):
    """bf16 parameters in forward and backward with gradients reduced in fp32 (fp32 master weights and AdamW state);
    fp32 throughout without bf16 (CPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()


class FSDPTrainerMixin:
    """Put before ``Trainer`` in a trainer's bases: FSDP2 also on CPU, with :func:`mixed_precision`."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is None:
            return
        state = self.accelerator.state
        if not self.is_fsdp_enabled:  # CPU: accelerate kept MULTI_CPU (DDP); the plugin's settings were not used
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True
        state.fsdp_plugin.mixed_precision_policy = mixed_precision(self.args.bf16)


def shard_reference(model: torch.nn.Module, bf16: bool) -> torch.nn.Module:
    """The frozen reference sharded like the policy (each decoder layer, then the root) and computed in the policy's
    precision, so that pi_theta = pi_ref still gives margin 0 at step 0. Inference only: no gradients, no optimiser
    state; every unit is freed again after its forward. Every rank runs the same forwards (the same micro-batch
    count), as the all-gathers need."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"reshard_after_forward": True, "mp_policy": mixed_precision(bf16)}
    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules())[1:]:
        if type(module).__name__ in layers:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's full weights on CPU for ``iter_t/model``: a collective (every rank calls it); rank 0 gets
    the tensors, the other ranks an empty dict. A tied weight (``lm_head.weight``, the input embedding itself) is
    written once, as without sharding: gathered, the two names would hold two copies."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        name = name.replace("_checkpoint_wrapped_module.", "")  # activation checkpointing's wrapper
        if first.setdefault(id(param), name) != name:
            weights.pop(name, None)
    return weights


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's trainable parameters (a LoRA adapter: a fraction of a percent of the model) gathered in
    full on CPU under their unsharded names: a collective (every rank calls it, in the same parameter order); rank 0
    keeps them, the other ranks get an empty dict. The frozen base is never gathered."""
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        if rank0:
            out[name.replace("_checkpoint_wrapped_module.", "")] = full.detach().float().cpu()
    return out
