"""The training loop. Components are built first (every user error surfaces before any expensive
work), then `train()` runs; everything stateful goes through the checkpointer."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_code.config import Config
from megatron_code.data.pipeline import DataPipeline
from megatron_code.data.tokenizer import load_tokenizer
from megatron_code.evaluation.lm import gpt_sample_losses
from megatron_code.evaluation.multiple_choice import score_multiple_choice
from megatron_code.evaluation.tasks import load_eval_tasks
from megatron_code.kernels import build_attention, build_ops
from megatron_code.model import GPT
from megatron_code.parallel.distributed import Runtime, init_distributed
from megatron_code.training.checkpoint import Checkpointer, resolve
from megatron_code.training.loss import loss_fn, per_source_loss, token_losses
from megatron_code.training.metrics import MetricsLogger, flops_per_token, peak_flops
from megatron_code.training.optim import build_optimizer, lr_at

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)
    """Training loss of every step this process ran."""
    valid_losses: dict[str, float] = field(default_factory=dict)
    tokens_per_source: dict[str, int] = field(default_factory=dict)
    checkpoint: Path | None = None


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        # Cheap checks first: data files and resume state, before the model is built.
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        self.resume_from = resolve(config.checkpoint.load) if config.checkpoint.load else None
        self.eval_tasks = load_eval_tasks(config.train.eval_tasks)

        self.runtime: Runtime = init_distributed(config.train.device)
        if self.runtime.world_size > 1:
            raise RuntimeError(f"this build trains in one process; got WORLD_SIZE={self.runtime.world_size}")
        device = self.runtime.device
        self.data = DataPipeline(config, self.tokenizer, device=device)
        self.step = 0
        if self.resume_from is not None:
            self.data.load_state_dict(json.loads((self.resume_from / "trainer_state.json").read_text()).get("data", {}))
        self.run_dir = Path(config.train.output_dir)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if device.type == "cuda" and config.train.dtype in ("auto", "bf16")
                         else contextlib.nullcontext())

        config.model.vocab_size = config.model.vocab_size or config.model.padded_vocab(self.tokenizer.vocab_size)
        if config.model.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                             f"{self.tokenizer.vocab_size} ({config.data.tokenizer})")
        self.ops = build_ops(config.model.kernels, device)
        attention = build_attention(config.model.attention, device)

        torch.manual_seed(config.train.seed)
        np.random.seed(config.train.seed)
        self.model = GPT(config.model, ops=self.ops, attention=attention).to(device)
        self.optimizer = build_optimizer(self.model, config.optim, device)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", config.checkpoint.keep_last)

        empty_valid = [s.name for s in self.data.sources if s.valid is None]
        if empty_valid and self.runtime.is_main and config.train.eval_interval:
            print(f"note: sources {empty_valid} have no validation documents with data.split={config.data.split}; "
                  "their validation loss is not reported")
        if self.resume_from is not None:
            self.step = Checkpointer.load(self.resume_from, self.model, self.optimizer)["step"]
        self.metrics = MetricsLogger(self.run_dir, self.runtime.is_main, config.train.tensorboard)
        if self.runtime.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    def trainer_state(self) -> dict:
        return {"data": self.data.state_dict(), "config": self.config.to_dict()}

    def train_step(self) -> dict:
        cfg = self.config
        lr = lr_at(self.step, cfg.train.steps, cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        data = self.data.next_step()
        names = self.data.names
        loss_sum = torch.zeros((), device=self.runtime.device)
        source_sums = torch.zeros(2, len(names), dtype=torch.float64, device=self.runtime.device)
        for batch in data.micro_batches:
            with self.autocast:
                losses = token_losses(self.model, batch, self.ops)
                loss = losses.sum() / max(data.loss_tokens, 1)
            loss.backward()
            loss_sum += loss.detach()
            source_sums += per_source_loss(losses, batch, len(names))
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        # the step's one host sync
        loss, norm, *sums = torch.cat([torch.stack([loss_sum, grad_norm]).double(), source_sums.flatten()]).tolist()
        sums, counts = sums[:len(names)], sums[len(names):]
        return {"loss": loss, "lr": lr, "grad_norm": norm, **data.metrics,
                **{f"loss/{n}": s / c for n, s, c in zip(names, sums, counts) if c}}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per source on a fixed set of held-out samples."""
        self.model.eval()
        out = {}
        for index, source in enumerate(self.data.sources):
            if source.valid is None:
                continue
            total, count = 0.0, 0
            for batch in self.data.valid_batches(index):
                with self.autocast:
                    n = int(batch["loss_mask"].sum())
                    total += loss_fn(self.model, batch, self.ops, 1).item()
                    count += n
            out[source.name] = total / max(count, 1)
        self.model.train()
        return out

    @torch.no_grad()
    def evaluate_tasks(self) -> dict[str, float]:
        """Accuracies on the `train.eval_tasks` multiple-choice files."""
        self.model.eval()
        sample_losses = gpt_sample_losses(self.model, self.tokenizer.vocab_size)
        out = {}
        for task in self.eval_tasks:
            with self.autocast:
                scores = score_multiple_choice(task, sample_losses, self.tokenizer, self.config.data.seq_length,
                                               self.config.train.micro_batch_size, self.runtime.device)
            out.update({f"task/{task.name}/{metric}": value for metric, value in scores.metrics.items()})
        self.model.train()
        return out

    def save(self) -> Path | None:
        if not self.config.checkpoint.save:
            return None
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.trainer_state())

    def train(self) -> TrainResult:
        cfg, main = self.config, self.runtime.is_main
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        flops_per_step = flops_per_token(cfg.model, cfg.data.seq_length) * tokens_per_step
        peak = peak_flops(self.runtime.device)
        result = TrainResult(self.run_dir, self.step)
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not (main and cfg.train.progress),
                   desc="train", unit="step", dynamic_ncols=True)
        self.model.train()
        while self.step < cfg.train.steps:
            start = time.perf_counter()
            metrics = self.train_step()
            seconds = time.perf_counter() - start
            metrics["tokens_per_s"] = tokens_per_step / seconds
            if peak:
                metrics["mfu"] = flops_per_step / seconds / peak
            result.losses.append(metrics["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            last = self.step == cfg.train.steps
            if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0 or last):
                result.valid_losses = self.evaluate()
                metrics.update({f"valid_loss/{k}": v for k, v in result.valid_losses.items()})
                metrics.update(self.evaluate_tasks())
                if main:
                    bar.write(f"step {self.step}: valid loss " +
                              ", ".join(f"{k} {v:.3f}" for k, v in result.valid_losses.items()))
            self.metrics.log(self.step, metrics)
            if main and (self.step % cfg.train.log_interval == 0 or last):
                bar.write(f"step {self.step}: loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                          f"grad norm {metrics['grad_norm']:.3f} tokens/s {metrics['tokens_per_s']:.0f}"
                          + (f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""))
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and not last:
                self.save()
        bar.close()
        result.step = self.step
        result.checkpoint = self.save()
        result.tokens_per_source = dict(self.data.cursor.tokens)
        self.data.close()
        self.metrics.close()
        return result
