"""The training loop: one process or many (torchrun, DistributedDataParallel), exact resume.

The loss is the sum of token losses over answer tokens divided by the number of answer tokens in
the global micro-batch (all processes together), so N processes with batch b give the gradients of
one process with batch N*b. Only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.weights.bundle import load_bundle, save_model_bundle
from model.prompt.conversation import template
from model.errors import UserFacingError
from model.weights.policy import LoadPolicy
from model.training.config import StepConfig
from model.training.data import Collator, TrainDataset, load_samples


class TrainingError(UserFacingError, RuntimeError):
    """A training run that cannot go on as asked (a resume that would not be exact)."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed() -> tuple[Dist, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = torch.cuda.is_available()
    device = f"cuda:{ctx.local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return ctx, device


def lr_at(step: int, cfg: StepConfig, total: int) -> float:
    """Linear warm-up from warmup_lr to lr, then cosine down to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(1, cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _make_trainable(model, cfg: StepConfig) -> None:
    model.requires_grad_(False)
    for part in cfg.trainable:
        if part == "lora":
            from peft import LoraConfig, get_peft_model

            lora = cfg.lora
            model.llm = get_peft_model(model.llm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                            target_modules=list(lora.target_modules), bias="none"))
        elif part == "query_tokens":
            model.query_tokens.data = model.query_tokens.data.float()
            model.query_tokens.requires_grad_(True)
        else:
            getattr(model, part).float().requires_grad_(True)
    model.eval()  # frozen parts never drop out; trained ones run as the reference trains them
    for part in cfg.trainable:
        if part in ("qformer", "proj"):
            getattr(model, part).train()


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _batches(dataset: TrainDataset, ctx: Dist, cfg: StepConfig, epoch: int) -> list[list[int]]:
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                                  seed=cfg.seed, drop_last=False)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i:i + cfg.batch_size] for i in range(0, len(indices), cfg.batch_size)]


def _prepare(cfg: StepConfig, data: str | Path, weights: str | Path, ctx, device: str, dtype: str,
             say: Callable[[str], None]):
    """The starting bundle with the step's parts trainable, and its samples as a dataset and collator."""
    policy = LoadPolicy(device=device, dtype=dtype, encoder_compute="stored")
    base = load_bundle(weights, policy, verify=ctx.main)  # (stored: parameter names stay those it saves)
    _make_trainable(base.model, cfg)
    if cfg.grad_checkpointing:
        base.model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    samples = load_samples(data, cfg.split, cfg.skip_bad_records, say=say if ctx.main else (lambda _: None))
    dataset = TrainDataset(samples, base.config.preprocess, cfg.prompts, cfg.seed)
    collate = Collator(base.tokenizer, template(cfg.template), base.config.image_placeholder,
                       base.config.qformer.num_query_tokens, cfg.max_txt_len)
    return base, samples, dataset, collate


def _trainable_line(model, cfg: StepConfig) -> str:
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable: {', '.join(cfg.trainable)} ({count:,} parameters)"


def train(cfg: StepConfig, data: str | Path, out: str | Path, weights: str | Path, *, resume: bool = False,
          say: Callable[[str], None] = print) -> Path | None:
    """Run one training step config; return the final bundle's path (rank 0) or None."""
    ctx, device = setup_distributed()
    out = Path(out)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(cfg.seed)
    base, samples, dataset, collate = _prepare(cfg, data, weights, ctx, device, precision if amp_dtype else "fp32", say)
    model, tokenizer = base.model, base.tokenizer
    steps_per_epoch = math.ceil(len(_batches(dataset, ctx, cfg, 0)) / cfg.grad_accum)
    total = cfg.epochs * steps_per_epoch
    last = min(total, cfg.max_steps) if cfg.max_steps else total
    optimizer, scaler, wrapped = _optimizing(model, cfg, precision, ctx, device)
    fingerprint = data_fingerprint(samples)
    step, epoch, micro, resumed_batches = 0, 0, 0, None  # resumed_batches: the order of an epoch resumed mid-way
    if resume:
        step, epoch, micro, resumed_batches = _load_checkpoint(out, model, optimizer, scaler, ctx, fingerprint, say)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "step.yaml").write_text(json.dumps(cfg.to_dict(), indent=2))
        say(f"training {cfg.name} on {len(dataset)} samples, {ctx.world} process(es) on {device}, {precision}; "
            f"{last} optimizer steps ({steps_per_epoch} per epoch), {_trainable_line(model, cfg)}")
    metrics = _Metrics(out, ctx.main, resume)
    from tqdm.auto import tqdm

    bar = tqdm(total=last, initial=step, disable=not ctx.main, desc=cfg.name, unit="step", mininterval=1.0)
    started, seen = time.perf_counter(), 0
    window = torch.zeros(2, device=device)  # (loss sum, answer tokens) of this optimizer step
    while step < last and epoch < cfg.epochs:
        dataset.epoch = epoch
        batches = resumed_batches or _batches(dataset, ctx, cfg, epoch)
        resumed_batches = None
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[micro:], collate_fn=collate,
                                             num_workers=cfg.num_workers)
        for batch in loader:
            micro += 1
            boundary = micro % cfg.grad_accum == 0 or micro == len(batches)
            window += _backward(wrapped, model, batch, device, amp_dtype, scaler, ctx, cfg, boundary)
            seen += batch["input_ids"].shape[0] * ctx.world
            if not boundary:
                continue
            _optimizer_step(optimizer, scaler, lr_at(step, cfg, total))
            step += 1
            loss_sum, tokens = ctx.sum(window).tolist()
            window.zero_()
            _report(metrics, bar, step, epoch, loss_sum / max(tokens, 1), optimizer.param_groups[0]["lr"],
                    seen / (time.perf_counter() - started), cfg, step == last)
            if step % cfg.save_every == 0 or step == last:
                done = micro >= len(batches)  # the epoch is over: the next one starts afresh
                _save_checkpoint(out, model, optimizer, scaler, ctx, step, epoch + done, 0 if done else micro,
                                 [] if done else batches, fingerprint)
            if step >= last:
                break
        if micro >= len(batches):
            epoch, micro = epoch + 1, 0
    bar.close()
    metrics.close()
    return _finish(out, model, tokenizer, base, cfg, data, ctx, say)


def _optimizing(model, cfg: StepConfig, precision: str, ctx, device: str):
    """AdamW over the trainable parameters, the fp16 loss scaler, and the model as backward sees it
    (wrapped for data parallelism when there are several processes)."""
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    wrapped = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if device != "cpu" else None)
               if ctx.world > 1 else model)
    return optimizer, scaler, wrapped


def _finish(out: Path, model, tokenizer, base, cfg: StepConfig, data, ctx, say: Callable[[str], None]) -> Path | None:
    """The trained bundle (written by rank 0, which says where), once every process is done."""
    bundle = None
    if ctx.main:
        bundle = _final_bundle(out, model, tokenizer, base, cfg, data)
        say(f"bundle written to {bundle}; serve it with {{command:serve --weights {bundle}}}")
    ctx.barrier()
    return bundle


def _optimizer_step(optimizer, scaler, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _report(metrics, bar, step: int, epoch: int, loss: float, lr: float, rate: float, cfg: StepConfig,
            final: bool) -> None:
    """One optimizer step's loss, learning rate and samples/s: into metrics.jsonl and the progress bar."""
    metrics.log(step, epoch, loss, lr, rate, every=cfg.log_every, final=final)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
    bar.update(1)


def _backward(wrapped, model, batch, device, amp_dtype, scaler, ctx: Dist, cfg: StepConfig, boundary: bool
              ) -> torch.Tensor:
    """One micro-batch: forward, token-summed loss scaled to the global token count, backward.
    Returns (loss sum, answer tokens) of this process for logging."""
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")
    tokens = (labels[:, 1:] != -100).sum()
    global_tokens = ctx.sum(tokens.clone().float()).clamp(min=1)
    sync = boundary or ctx.world == 1
    context = wrapped.no_sync() if not sync and hasattr(wrapped, "no_sync") else nullcontext()
    with context, torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype or torch.float32,
                                 enabled=amp_dtype is not None):
        logits = wrapped(batch["input_ids"], batch["attention_mask"], pixels=batch["pixels"]).logits
        loss_sum = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                   reduction="sum")
        # DDP averages gradients over processes; x world turns that average into the global sum
        scaler.scale(loss_sum / global_tokens * ctx.world / cfg.grad_accum).backward()
    return torch.stack([loss_sum.detach(), tokens.float()])


class _Metrics:
    """metrics.jsonl (and TensorBoard when it is installed), rank 0 only."""

    def __init__(self, out: Path, main: bool, resume: bool) -> None:
        self.file = open(out / "metrics.jsonl", "a" if resume else "w") if main else None
        self.board = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def log(self, step: int, epoch: int, loss: float, lr: float, rate: float, every: int, final: bool) -> None:
        if self.file is None or (step % every and not final):
            return
        self.file.write(json.dumps({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "samples_per_s": rate}) + "\n")
        self.file.flush()
        if self.board is not None:
            self.board.add_scalar("loss", loss, step)
            self.board.add_scalar("lr", lr, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def data_fingerprint(samples) -> str:
    """Names the training data exactly (images and texts, in order): a resume must see the same."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.image_path}\0{sample.record.model_dump_json()}\n".encode())
    return digest.hexdigest()


def rng_state() -> dict:
    """Every random state a training step draws from (dropout on CPU and on each GPU)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available():
        if "cuda" not in state:
            raise TrainingError("the checkpoint was written without a GPU; resume it on the CPU, or start over")
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out: Path, model, optimizer, scaler, ctx: Dist, step: int, epoch: int, micro: int,
                     batches: list[list[int]], fingerprint: str) -> None:
    """Rank 0 writes the weights and optimizer; every rank writes its own random state and data order
    (each process draws its own dropout and reads its own share of the data)."""
    folder = out / "checkpoints" / f"step-{step:07d}"
    if ctx.main:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(_trainable_state(model), str(folder / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                    "micro": micro, "world": ctx.world, "data": fingerprint}, folder / "state.pt")
    ctx.barrier()
    torch.save({"rng": rng_state(), "batches": batches}, folder / f"rank-{ctx.rank}.pt")
    ctx.barrier()
    if ctx.main:
        (out / "checkpoints" / "latest").write_text(folder.name)


def _load_checkpoint(out: Path, model, optimizer, scaler, ctx: Dist, fingerprint: str, say
                     ) -> tuple[int, int, int, list[list[int]] | None]:
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        say(f"no checkpoint in {out}; starting from the beginning")
        return 0, 0, 0, None
    folder = out / "checkpoints" / pointer.read_text().strip()
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    if state.get("data") != fingerprint:
        raise TrainingError(f"the training data differs from the data {folder} was trained on (images, texts or "
                            f"their order changed); resume with the same data, or start over without --resume")
    if state.get("world", 1) != ctx.world:
        raise TrainingError(f"{folder} was written by {state.get('world', 1)} process(es); resume it with the same "
                            f"number (this run has {ctx.world})")
    trained = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    for name, value in trained.items():
        params[name].data.copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    mine = torch.load(folder / f"rank-{ctx.rank}.pt", map_location="cpu", weights_only=True)
    restore_rng(mine["rng"])
    say(f"resuming from {folder.name} (epoch {state['epoch']}, batch {state['micro']})")
    return state["step"], state["epoch"], state["micro"], mine["batches"] or None


def _final_bundle(out: Path, model, tokenizer, base, cfg: StepConfig, data) -> Path:
    if "lora" in cfg.trainable:
        model.llm = model.llm.merge_and_unload()  # a plain LM again: the bundle needs no peft to serve
    model.config = replace(base.config, prompt_template=cfg.template)
    sources = {"trained_from": {"file": str(base.path), "sha256": base.bundle_hash},
               "training": {"file": f"{cfg.name} on {data}", "sha256": ""}}
    return save_model_bundle(out / "bundle", model, tokenizer, sources=sources)
