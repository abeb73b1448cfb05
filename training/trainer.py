"""Fine-tune the QPO policy on its examples: one plain PyTorch loop.

``train_policy`` runs AdamW with linear warmup then cosine (or linear) decay,
gradient accumulation and clipping, and writes a checkpoint at the end of every
epoch. The same code runs as one process (CPU or one GPU) or as several under
``accelerate launch`` (DDP; gloo on CPU): :class:`accelerate.Accelerator` reads
the launch environment, and each process takes its own share of every epoch's
batches. Several CPU processes: ``accelerate launch --multi_gpu --num_processes N``
on a machine without GPUs (accelerate's ``--cpu`` flag starts a single process
unless MPI is configured).

Partial fine-tuning (``trainable="top:N"``) trains the top N transformer
layers and the final norm; the embedding matrix, the policy's added tokens
included, stays frozen (see :func:`select_trainable`), so the backward pass
stops at the lowest trained layer. ``trainable="all"`` trains every weight.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .config import TrainConfig, TrainConfigError
from .forward import FrozenLayerCache, frozen_layer_cache, supervised_logits
from .io import atomic_write_json, fsync_dir
from .policy import Example, PolicyDataError, SupervisedObjective, collate, qpo_loss

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE_FILE = "trainer_state.json"
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


class Objective(Protocol):
    """What a fine-tune minimises: how items become a batch, and the batch's loss from the model's logits.

    :class:`~.policy.SupervisedObjective` (the paper's return-conditioned SFT) and
    :class:`~.preference.PreferenceObjective` (DPO on within-query pairs) are the two.
    """

    def collate(self, items: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]: ...

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


@dataclass
class TrainResult:
    """What a run did: optimizer steps, losses (mean over each step's micro-batches and processes), time."""

    steps: int
    first_loss: float
    last_loss: float
    epoch_losses: list[float]
    seconds: float
    checkpoint: Path | None = None


# ---------------------------------------------------------------------------
# Pieces of the loop


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, rank: int, world: int
) -> list[list[int]]:
    """This process's micro-batches (example indices) of one epoch.

    Every process draws the same permutation from the same generator, cuts it
    into batches, pads the batch list by wrapping around until each process
    gets as many, and takes every ``world``-th batch from ``rank`` on.
    """
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    per_process = math.ceil(len(batches) / world)
    batches = [batches[i % len(batches)] for i in range(per_process * world)]
    return batches[rank::world]


def _decoder_layers_and_norm(model: Any) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """The model's stack of transformer layers and its final norm (Llama, Mistral, Qwen, GPT-2 style)."""
    num_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            for name in FINAL_NORM_NAMES:
                norm = getattr(_parent_of(model, module), name, None)
                if isinstance(norm, torch.nn.Module):
                    return module, norm
    raise TrainConfigError(
        f"trainable='top:N' cannot find the transformer layers and final norm of {type(model).__name__}; "
        "use trainable='all' for this model."
    )


def _parent_of(model: torch.nn.Module, child: torch.nn.Module) -> torch.nn.Module | None:
    for module in model.modules():
        if any(c is child for c in module.children()):
            return module
    return None


def select_trainable(model: Any, config: TrainConfig) -> None:
    """Set ``requires_grad`` by ``config.trainable``.

    ``top:N`` trains the top N layers and the final norm only. The embedding
    matrix stays frozen, policy tokens included: training their input rows
    would need the backward pass through every layer below (about twice the
    step time on a CPU). The reward tokens start from distinct embeddings
    (:func:`~.policy.bucket_anchor_ids`), so the frozen lower layers already
    tell the buckets apart and the top layers learn what they mean.
    """
    top = config.top_layers
    if top is None:
        for param in model.parameters():
            param.requires_grad_(True)
        return
    layers, norm = _decoder_layers_and_norm(model)
    if top > len(layers):
        raise TrainConfigError(
            f"trainable='top:{top}' asks for more layers than the model has ({len(layers)})."
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for module in [*layers[len(layers) - top :], norm]:
        for param in module.parameters():
            param.requires_grad_(True)


def _train_policy_token_rows(model: Any, tokenizer: Any, num_buckets: int) -> Any:
    """Make the input embedding rows of the reward and separator tokens trainable, and only them.

    The matrix gets ``requires_grad`` and a hook that zeroes every other row's gradient (with
    no weight decay, AdamW then leaves those rows exactly as they were). Returns the hook handle.
    """
    from .policy import policy_token_ids

    weight = model.get_input_embeddings().weight
    mask = torch.zeros((weight.shape[0], 1), dtype=weight.dtype, device=weight.device)
    mask[policy_token_ids(tokenizer, num_buckets)] = 1.0
    weight.requires_grad_(True)
    return weight.register_hook(lambda grad: grad * mask)


def save_checkpoint(model: Any, tokenizer: Any, output_dir: Path, state: dict[str, Any]) -> Path:
    """Write model, tokenizer and ``trainer_state.json`` to ``output_dir/checkpoint`` atomically.

    Everything goes to a temporary directory first, which then replaces the old
    checkpoint by rename: a crash leaves the old or the new checkpoint, never
    half of one (at worst ``checkpoint.old`` holds the previous one).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / CHECKPOINT_DIR
    backup = output_dir / f"{CHECKPOINT_DIR}.old"
    # A save killed mid-way (SIGKILL, power loss) leaves its temporary directory: a whole
    # model's worth of disk. Saves into one output_dir never overlap, so any left is garbage.
    for stale in output_dir.glob(f".{CHECKPOINT_DIR}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIR}-", dir=output_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / TRAINER_STATE_FILE, state)
        tmp.chmod(0o755)
        if backup.exists():
            shutil.rmtree(backup)
        if target.exists():
            os.replace(target, backup)
        os.replace(tmp, target)
        fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return target


@torch.no_grad()
def evaluate_loss(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean :func:`qpo_loss` over ``examples`` (token-weighted), in eval mode, on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
            logits, batch = supervised_logits(model, batch)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(qpo_loss(logits, batch["labels"])) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(1, count)


# ---------------------------------------------------------------------------
# The loop


def train_policy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    config: TrainConfig,
    output_dir: str | os.PathLike[str],
    *,
    objective: Objective | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    extra_state: dict[str, Any] | None = None,
    cache: FrozenLayerCache | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``examples``; checkpoint to ``output_dir/checkpoint`` every epoch.

    ``objective`` turns examples into batches and losses: by default the paper's supervised loss on
    :class:`~.policy.Example` s; :class:`~.preference.PreferenceObjective` trains DPO on preference pairs.

    ``on_step(step, total, loss)`` is called on the main process after every
    optimizer step (the CLI drives its progress bar with it). ``extra_state``
    (for example the policy format and reward buckets) is stored in the
    checkpoint's ``trainer_state.json`` so the checkpoint describes itself.

    With ``trainable="top:N"`` the frozen layers run once per sequence (:mod:`~.forward`): ``cache`` is one
    already filled on these same weights (the preference step's reference pass), else a new one is made where
    it is exact. One process only; under DDP every step runs the full forward.
    """
    from accelerate import Accelerator

    if not examples:
        raise PolicyDataError("No training examples: the dataset is empty or every record was filtered out.")
    objective = objective or SupervisedObjective()
    output_dir = Path(output_dir)
    started = time.perf_counter()
    torch.manual_seed(config.seed)

    # --- Set-up: processes and device, trainable weights, optimizer -------------
    if config.device == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("device='cuda' but torch sees no GPU; use device='auto' or 'cpu'.")
    # Mixed precision is ours to decide (config.bf16), not the launcher's.
    # cpu=True also when no GPU is present: it is what makes accelerate pick gloo
    # (MULTI_CPU) for several processes instead of running each one alone.
    accelerator = Accelerator(
        cpu=config.device == "cpu" or not torch.cuda.is_available(), mixed_precision="no"
    )
    if config.device == "cuda" and accelerator.device.type != "cuda":
        raise TrainConfigError(
            "device='cuda' but accelerate was already set up for the CPU in this process; start a new process."
        )
    rank, world = accelerator.process_index, accelerator.num_processes
    log = logger.info if accelerator.is_main_process else logger.debug  # one copy of each message
    use_bf16 = config.bf16 and accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    original_flags = {id(p): p.requires_grad for p in model.parameters()}
    select_trainable(model, config)
    row_hook = None
    try:
        frozen_rows: list[Any] = []
        if config.train_policy_tokens and config.top_layers is not None:
            row_hook = _train_policy_token_rows(model, tokenizer, config.num_buckets)
            frozen_rows.append(model.get_input_embeddings().weight)
        params = [p for p in model.parameters() if p.requires_grad]
        # No decay for norms and biases, nor for a matrix trained in a few rows only (decay would
        # shrink the rows the gradient hook keeps frozen).
        decay = [p for p in params if p.ndim >= 2 and not any(p is f for f in frozen_rows)]
        no_decay = [p for p in params if p.ndim < 2 or any(p is f for f in frozen_rows)]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.learning_rate,
        )
        model.train()
        ddp_model = accelerator.prepare_model(model)  # DDP wrapper when launched on several processes
        # The cache's shells call the layers directly, past the DDP wrapper's gradient sync: one process only.
        cache = (cache or frozen_layer_cache(model, config)) if world == 1 else None

        micro_per_epoch = math.ceil(math.ceil(len(examples) / config.batch_size) / world)
        steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum_steps)
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        warmup = int(config.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps, warmup, config.lr_schedule)
        )
        n_trainable = sum(p.numel() for p in params)
        log(
            "Training %s of %s parameters (%s) on %d examples: %d epoch(s), %d optimizer step(s), %d process(es), %s%s",
            f"{n_trainable:,}",
            f"{sum(p.numel() for p in model.parameters()):,}",
            config.trainable,
            len(examples),
            config.epochs,
            total_steps,
            world,
            accelerator.device,
            ", bf16 autocast" if use_bf16 else "",
        )

        generator = torch.Generator().manual_seed(config.seed)
        step, first_loss, last_loss = 0, float("nan"), float("nan")
        epoch_losses: list[float] = []
        checkpoint: Path | None = None
        for epoch in range(config.epochs):
            if step >= total_steps:
                break
            batches = epoch_batches(len(examples), config.batch_size, generator, rank, world)
            step_losses: list[float] = []
            window: list[torch.Tensor] = []
            for micro, indices in enumerate(batches):
                # --- Forward and backward one micro-batch --------------------------
                batch = {
                    k: v.to(accelerator.device)
                    for k, v in objective.collate([examples[i] for i in indices], pad_id).items()
                }
                # This micro-batch's accumulation window (shorter at the end of an epoch);
                # the last one of the window all-reduces the gradients and steps.
                window_start = micro - micro % config.grad_accum_steps
                in_window = min(config.grad_accum_steps, len(batches) - window_start)
                sync = micro + 1 == window_start + in_window
                with contextlib.ExitStack() as stack:
                    if not sync:
                        stack.enter_context(accelerator.no_sync(ddp_model))
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                        # (B, K + 1, V): the positions that predict a supervised token; labels re-aligned
                        logits, batch = supervised_logits(ddp_model, batch, cache)
                    loss = objective.loss(logits, batch)
                    accelerator.backward(loss / in_window)
                window.append(loss.detach())
                if not sync:
                    continue

                # --- Optimizer step: clip, step, schedule ------------------------
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss = float(accelerator.reduce(torch.stack(window).mean(), reduction="mean"))
                window = []
                step += 1
                step_losses.append(step_loss)
                first_loss = step_loss if step == 1 else first_loss
                last_loss = step_loss
                if accelerator.is_main_process and on_step is not None:
                    on_step(step, total_steps, step_loss)
                if step >= total_steps:
                    break

            # --- End of epoch: log and checkpoint ------------------------------
            epoch_losses.append(sum(step_losses) / max(1, len(step_losses)))
            log(
                "Epoch %d/%d: mean loss %.4f (step %d/%d)",
                epoch + 1,
                config.epochs,
                epoch_losses[-1],
                step,
                total_steps,
            )
            if config.save_checkpoints:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    state = {
                        "epoch": epoch + 1,
                        "global_step": step,
                        "total_steps": total_steps,
                        "epoch_losses": epoch_losses,
                        "num_examples": len(examples),
                        "num_processes": world,
                        "config": asdict(config),
                        **(extra_state or {}),
                    }
                    save_checkpoint(accelerator.unwrap_model(ddp_model), tokenizer, output_dir, state)
                    logger.info("Saved checkpoint to %s", output_dir / CHECKPOINT_DIR)
                accelerator.wait_for_everyone()
                checkpoint = output_dir / CHECKPOINT_DIR
        if cache is not None:
            log("Frozen-layer cache: %d sequence(s) computed, %d reused, %.0f MiB kept", cache.misses, cache.hits,
                cache.bytes / 2**20)
    finally:
        # Leave the model as the caller gave it: same requires_grad flags, no hook, eval mode.
        if row_hook is not None:
            row_hook.remove()
        for param in model.parameters():
            param.requires_grad_(original_flags.get(id(param), True))
        model.eval()

    return TrainResult(
        steps=step,
        first_loss=first_loss,
        last_loss=last_loss,
        epoch_losses=epoch_losses,
        seconds=time.perf_counter() - started,
        checkpoint=checkpoint,
    )
