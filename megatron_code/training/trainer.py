"""The training loop. One builder per component -- runtime, data, model, optimizer -- runs first
(every user error surfaces before any expensive work), then `train()`. Every stateful component
is a Stateful the checkpointer saves and loads as one dict."""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_code.config import Config, ConfigError
from megatron_code.data.pipeline import DataPipeline, check_resumable
from megatron_code.data.tokenizer import load_tokenizer
from megatron_code.evaluation.multiple_choice import score_multiple_choice
from megatron_code.evaluation.tasks import load_eval_tasks
from megatron_code.parallel.distributed import Runtime, build_runtime, launched_world_size
from megatron_code.parallel.model import ParallelModel, build_model
from megatron_code.training.checkpoint import (Checkpointer, TrainState, check_checkpoint_matches, read_trainer_state,
                                               starting_point, tokenizer_record)
from megatron_code.training.loss import LossTotals
from megatron_code.training.metrics import MetricsLogger, flops_per_token, format_peak_memory, peak_flops, peak_memory
from megatron_code.training.optim import Optimizers, lr_at


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)
    """Training loss of every step this process ran."""
    valid_losses: dict[str, float] = field(default_factory=dict)
    tokens_per_source: dict[str, int] = field(default_factory=dict)
    checkpoint: Path | None = None


def build_data(config: Config, tokenizer, runtime: Runtime) -> DataPipeline:
    """The data component: asked each step for this data-parallel rank's micro batches of the
    step's global batch (`next_step`), and for this rank's share of held-out batches
    (`valid_batches`); its state is plain data. Batches carry tokens, labels, loss_mask,
    position_ids and `source` (index into data.sources)."""
    return DataPipeline(config, tokenizer, runtime.coordinate("dp"), runtime.size("dp"), runtime.device)


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        # Cheap checks first: the layout, the tokenizer and the checkpoint's trainer_state.json
        # (model math, vocabulary, data order), before datasets or the model.
        config.validate(world_size=launched_world_size())
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        ckpt = config.checkpoint
        self.run_dir = Path(config.train.output_dir)
        start_from, weights_only = starting_point(ckpt.load, ckpt.init_from, self.run_dir)
        if start_from is not None:
            saved = read_trainer_state(start_from)
            check_checkpoint_matches(saved, config.model, self.tokenizer, config.data.tokenizer, start_from)
            weights_only = weights_only or saved.get("weights_only", False)
            if not weights_only and "data" in saved:
                check_resumable(saved["data"], config, self.tokenizer)
        self.eval_tasks = load_eval_tasks(config.train.eval_tasks)

        self.runtime = build_runtime(config.train.device, config.parallel.tensor, config.parallel.pipeline)
        device, main = self.runtime.device, self.runtime.is_main
        if main and start_from is not None and not ckpt.load and not weights_only:
            print(f"resuming from {start_from}, the latest checkpoint in train.output_dir"
                  + (f" (checkpoint.init_from={ckpt.init_from} only seeds a run's first start)" if ckpt.init_from else ""))
        use_bf16 = device.type == "cuda" and config.train.dtype in ("auto", "bf16")
        self.autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16
                         else contextlib.nullcontext)
        self._set_vocab_size(main)

        torch.manual_seed(config.train.seed)
        np.random.seed(config.train.seed)
        self.data = build_data(config, self.tokenizer, self.runtime)
        config.train.steps = self.data.total_steps  # set by the data when train.epochs is
        empty_valid = [s.name for s in self.data.sources if s.valid is None]
        if empty_valid and main and config.train.eval_interval:
            print(f"note: sources {empty_valid} have no validation documents with data.split={config.data.split}; "
                  "their validation loss is not reported")
        self.model: ParallelModel = build_model(config, self.runtime, self.autocast)
        self.optimizer = Optimizers(self.model.parts, config.optim, device)
        self.train_state = TrainState()
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", ckpt.keep_last,
            sharded={"model": self.model, "optimizer": self.optimizer},
            plain={"train": self.train_state, "data": self.data},
            metadata={"config": config.to_dict(), "layout": self.runtime.layout,
                      "tokenizer": tokenizer_record(self.tokenizer)})
        if start_from is not None and not self.checkpointer.load(start_from, weights_only=weights_only) and main:
            print(f"model weights from {start_from}; fresh optimizer, LR schedule and data position")
        self.metrics = MetricsLogger(self.run_dir, main, config.train.tensorboard, {"layout": self.runtime.layout},
                                     start_step=self.step)
        if main:
            (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    def _set_vocab_size(self, main: bool) -> None:
        model, T, tokens = self.config.model, self.config.parallel.tensor, self.tokenizer.vocab_size
        if model.tokenizer_vocab_size not in (0, tokens):
            raise ConfigError(f"model.tokenizer_vocab_size={model.tokenizer_vocab_size} but the tokenizer "
                              f"{self.config.data.tokenizer} has {tokens} ids")
        model.tokenizer_vocab_size = tokens
        if model.vocab_size == 0:
            model.vocab_size = model.padded_vocab(tokens, T)
            if main and model.vocab_size != tokens:
                print(f"model.vocab_size={model.vocab_size}: the tokenizer's {tokens} ids padded to a multiple of "
                      f"model.pad_vocab_to_multiple_of x parallel.tensor = {model.pad_vocab_to_multiple_of} x {T}")
        elif model.vocab_size < tokens:
            raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                              f"{tokens} ({self.config.data.tokenizer})")

    @property
    def step(self) -> int:
        return self.train_state.step

    def train_step(self) -> dict:
        cfg = self.config
        lr = lr_at(self.step, cfg.train.steps, cfg.optim)
        self.optimizer.set_lr(lr)
        data = self.data.next_step()
        totals = LossTotals(len(self.data.names), self.runtime.device)
        self.model.forward_backward(data.micro_batches, totals)
        grad_norm = self.model.clip_grad_norm_(cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.train_state.step += 1
        return {"loss": totals.mean(), "lr": lr, "grad_norm": grad_norm.item(), **data.metrics,
                **{f"loss/{k}": v for k, v in totals.per_source(self.data.names).items()}}

    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per source on a fixed set of held-out samples (each data-parallel
        rank evaluates its share)."""
        out = {}
        for index, source in enumerate(self.data.sources):
            if source.valid is None:
                continue
            batches = self.data.valid_batches(index)
            totals = LossTotals(1, self.runtime.device)
            if batches:
                sums, counts = self.model.evaluate({k: torch.cat([b[k] for b in batches]) for k in batches[0]},
                                                   split_over_data_parallel=False)
                totals.add(sums, counts, torch.zeros_like(sums, dtype=torch.long))
            totals.all_reduce(counted_here=self.runtime.coordinate("tp") == 0 and self.runtime.coordinate("pp") == 0)
            out[source.name] = totals.mean()
        return out

    def evaluate_tasks(self) -> dict[str, float]:
        """Accuracies on the `train.eval_tasks` multiple-choice files, scored through the
        evaluation forward (any layout; every rank gets the same numbers)."""
        def sample_losses(tokens, labels, loss_mask):
            return self.model.evaluate({"tokens": tokens, "labels": labels, "loss_mask": loss_mask})
        out = {}
        for task in self.eval_tasks:
            scores = score_multiple_choice(task, sample_losses, self.tokenizer, self.config.data.seq_length,
                                           self.config.train.global_batch_size, self.runtime.device)
            out.update({f"task/{task.name}/{metric}": value for metric, value in scores.metrics.items()})
        return out

    def save(self) -> Path | None:
        return self.checkpointer.save(self.step) if self.config.checkpoint.save else None

    def train(self) -> TrainResult:
        cfg, main = self.config, self.runtime.is_main
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        flops_per_gpu_step = flops_per_token(cfg.model, cfg.data.seq_length) * tokens_per_step / self.runtime.world_size
        peak = peak_flops(self.runtime.device)
        result = TrainResult(self.run_dir, self.step)
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not (main and cfg.train.progress),
                   desc="train", unit="step", dynamic_ncols=True)
        self.model.train()
        checkpoint = None
        while self.step < cfg.train.steps:
            start = time.perf_counter()
            metrics = self.train_step()
            seconds = time.perf_counter() - start
            metrics["tokens_per_s"] = metrics["tokens"] / seconds  # real tokens: instruction padding excluded
            metrics["tokens_per_s_per_gpu"] = metrics["tokens_per_s"] / self.runtime.world_size
            if peak:
                metrics["mfu"] = flops_per_gpu_step / seconds / peak
            metrics.update(peak_memory(self.runtime.device))  # each rank its own; rank 0 logs
            result.losses.append(metrics["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            last = self.step == cfg.train.steps
            if last or (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                checkpoint = self.save()  # before evaluating: a failing evaluation loses no training
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
                          + (f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "") + f" {format_peak_memory(metrics)}")
        bar.close()
        result.step = self.step
        result.checkpoint = checkpoint or self.save()
        result.tokens_per_source = dict(self.data.cursor.tokens)
        self.data.close()
        self.metrics.close()
        return result
