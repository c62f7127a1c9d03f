"""The training loop. One builder per component -- runtime, data, model, optimizer -- runs first
(every user error surfaces before any expensive work), then `train()`. Every stateful component
is a Stateful the checkpointer saves and loads as one dict."""
from __future__ import annotations

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
from megatron_code.parallel.distributed import (Runtime, build_runtime, init_distributed, launched_world_size,
                                                 pick_device)
from megatron_code.parallel.model import ParallelModel, build_model
from megatron_code.training.checkpoint import (Checkpointer, CheckpointError, TrainState, check_checkpoint_matches,
                                               starting_point, tokenizer_record)
from megatron_code.training.guard import NonFiniteError, StepGuard, StopRequests, Verdict, read_step
from megatron_code.training.integrity import write_durably
from megatron_code.training.loss import LossTotals
from megatron_code.training.lr_schedule import check_lr_plan, lr_plan, lr_plan_notes
from megatron_code.training.metrics import (MetricsLogger, flops_per_token, format_peak_memory, hardware_flops_per_token,
                                             peak_flops, peak_memory)
from megatron_code.training.optim import Optimizers
from megatron_code.training.precision import pick_precision


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)
    """Training loss of every step this process ran."""
    valid_losses: dict[str, float] = field(default_factory=dict)
    tokens_per_source: dict[str, int] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped: str | None = None
    """Why the run saved and stopped before train.steps (exit signals, train.max_wall_time)."""


def build_data(config: Config, tokenizer, runtime: Runtime) -> DataPipeline:
    """The data component: asked each step for this data-parallel rank's micro batches of the
    step's global batch (`next_step`), and for each source's held-out samples, the same on every
    rank (`valid_batch`); its state is plain data. Batches carry tokens, labels, loss_mask,
    position_ids and `source` (index into data.sources)."""
    return DataPipeline(config, tokenizer, runtime.coordinate("dp"), runtime.size("dp"), runtime.device)


class Trainer:
    def __init__(self, config: Config):
        started = time.monotonic()  # train.max_wall_time counts from here
        self.config = config
        # Cheap checks first: the layout, the tokenizer and the checkpoint's trainer_state.json
        # (model math, vocabulary, data order), before datasets or the model.
        config.validate(world_size=launched_world_size())
        self.precision = pick_precision(config.train.dtype, pick_device(config.train.device),
                                        config.train.allow_emulated_bf16)
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        ckpt = config.checkpoint
        self.run_dir = Path(config.train.output_dir)
        # the ranks verify the checkpoint's checksums together, each its share of the files
        say = print if init_distributed(config.train.device).is_main else (lambda message: None)
        start = starting_point(ckpt, self.run_dir, self._check_fit, say)
        start_from, weights_only = start.path, start.weights_only
        continuing = start.continued
        if continuing and start.saved.get("weights_only", False):
            raise CheckpointError(f"checkpoint.continue_from={ckpt.continue_from}: {start_from} holds model weights "
                                  "only (no optimizer state to continue): start from it with checkpoint.init_from")
        self.eval_tasks = load_eval_tasks(config.train.eval_tasks)

        self.runtime = build_runtime(config.train.device, config.parallel.tensor, config.parallel.pipeline)
        main = self.runtime.is_main
        if main and start_from is not None and not ckpt.load and not weights_only:
            print(f"resuming from {start_from}, the newest intact checkpoint in train.output_dir"
                  + "".join(f" (checkpoint.{name}={value} only seeds a run's first start)" for name, value in
                            (("init_from", ckpt.init_from), ("continue_from", ckpt.continue_from)) if value))
        if main:
            print(f"precision: {self.precision.reason}")
        self._set_vocab_size(main)

        torch.manual_seed(config.train.seed)
        np.random.seed(config.train.seed)
        self.data = build_data(config, self.tokenizer, self.runtime)
        config.train.steps = self.data.total_steps  # set by the data when train.epochs is
        lr_warnings = check_lr_plan(config.optim, config.train.steps)  # the steps are known now
        self.lr_plan = lr_plan(config.optim, config.train.steps)
        empty_valid = [s.name for s in self.data.sources if s.valid is None]
        if empty_valid and main and config.train.eval_interval:
            print(f"note: sources {empty_valid} have no validation documents with data.split={config.data.split}; "
                  "their validation loss is not reported")
        self.model: ParallelModel = build_model(config, self.runtime, self.precision.autocast)
        self.optimizer = Optimizers(self.model.parts, config.optim)
        self.guard, self.stop = StepGuard(config.train), StopRequests(config.train, started)
        self.train_state = TrainState(self.guard)
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints", ckpt.keep_last,
            sharded={"model": self.model, "optimizer": self.optimizer},
            plain={"train": self.train_state, "data": self.data},
            metadata={"config": config.to_dict(), "layout": self.runtime.layout,
                      "tokenizer": tokenizer_record(self.tokenizer)},
            layout=self.runtime, damaged=start.damaged)
        if start_from is not None:
            resumed = self.checkpointer.load(start_from, weights_only and not continuing, start.saved,
                                             continue_run=continuing)
            if continuing:
                self.train_state.step = self.train_state.first_step = int(start.saved["step"])
                last_lr = self.optimizer.set_hyperparameters(config.optim)
                if main:
                    print(f"continuing from {start_from} at step {self.step}: its model weights and optimizer state "
                          f"(AdamW moments and step counts; its last LR {last_lr:.3g}), this config's LR plan, "
                          f"optimizer settings and data from their start, for train.steps={config.train.steps} "
                          "more steps")
            elif not resumed and main:
                print(f"model weights from {start_from}; fresh optimizer, LR schedule and data position")
        self.last_checkpoint = start_from if start_from is not None and not weights_only else None
        if main:
            for warning in lr_warnings:
                print(f"warning: {warning} (optim.allow_incomplete_schedule=true)")
            print(self.lr_plan.describe(self.train_state.first_step))
        self.metrics = MetricsLogger(self.run_dir, main, config.train.tensorboard, {"layout": self.runtime.layout},
                                     start_step=self.step)
        if main:
            write_durably(self.run_dir / "config.json", json.dumps(config.to_dict(), indent=1))
            saved_config = start.saved["config"] if start.saved and not weights_only else None  # a resume's
            for note in lr_plan_notes(config.optim, config.train.steps, self.step - self.train_state.first_step,
                                      saved_config):
                print(note)

    def _check_fit(self, path: Path, saved: dict, weights_only: bool) -> None:
        """Stop before any work when a checkpoint cannot start this run (its trainer_state.json alone)."""
        check_checkpoint_matches(saved, self.config.model, self.tokenizer, self.config.data.tokenizer, path)
        if not weights_only and "data" in saved:
            check_resumable(saved["data"], self.config, self.tokenizer)

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

    def train_step(self) -> tuple[dict, Verdict, str | None]:
        """One optimizer step: (its metrics, what the guard decided, why the run stops here)."""
        cfg = self.config
        lr = self.lr_plan.lr(self.step - self.train_state.first_step)
        self.optimizer.set_lr(lr)
        data = self.data.next_step()
        for event in data.events:  # schedule changes, logged between the records of steps data.step and data.step + 1
            # the data count their steps from this run's start, the records from the first run's
            self.metrics.event({**event, "step": event["step"] + self.train_state.first_step})
        totals = LossTotals(len(self.data.names), self.runtime.device)
        self.model.forward_backward(data.micro_batches, totals)
        # The step's one all-reduce over all ranks carries the stop votes with the loss totals, and
        # its one host sync everything it decides on: every rank decides alike (training/guard.py).
        votes = totals.all_reduce(self.model.reports_loss, self.stop.votes(self.runtime.device))
        grad_norm = self.model.grad_norm()
        report = read_step(totals.totals, grad_norm, votes, self.data.names)
        step = self.step + 1
        verdict = self.guard.judge(step, report, self.model.first_nonfinite("grad") if report.nonfinite else None)
        if verdict.apply:
            self.model.clip_grads_(cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf, grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad()
        self.train_state.step = step
        losses = report.per_source
        self.data.observe_losses(data.step, losses)  # an adaptive schedule's input (the same on every rank)
        metrics = {"loss": report.loss, "lr": lr, "grad_norm": report.grad_norm, **data.metrics,
                   **{f"loss/{k}": v for k, v in losses.items()}, **verdict.metrics}
        return metrics, verdict, self.stop.reason(report.votes, self.runtime.world_size)

    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per source on a fixed set of held-out samples. Data-parallel ranks
        split each set evenly, padding with loss-masked rows: under FSDP every forward gathers
        parameters, so every rank must run as many forwards as the others."""
        names, totals = [], []
        for index, source in enumerate(self.data.sources):
            batch = self.data.valid_batch(index)
            if batch is not None:
                sums, counts = self.model.evaluate(batch)
                names.append(source.name)
                totals.append(torch.stack([sums.sum(), counts.sum()]))
        values = torch.stack(totals).tolist() if totals else []
        return {name: s / max(c, 1.0) for name, (s, c) in zip(names, values)}

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
        """A checkpoint of this step, unless checkpoint.save=false; never of non-finite weights."""
        if not self.config.checkpoint.save:
            return None
        bad = self.model.first_nonfinite("weight")
        if bad is not None:
            raise NonFiniteError(f"step {self.step}: weight {bad} is non-finite after the optimizer step; "
                                 f"not saved ({self._last_good()})")
        self.last_checkpoint = self.checkpointer.save(self.step)
        return self.last_checkpoint

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "this run has no checkpoint to resume from"
        return f"the last checkpoint, {self.last_checkpoint}, is kept: a relaunch resumes from it"

    def train(self) -> TrainResult:
        with self.stop.listening():
            try:
                return self._train()
            finally:
                self.data.close()
                self.metrics.close()

    def _train(self) -> TrainResult:
        cfg, main = self.config, self.runtime.is_main
        end = self.train_state.first_step + cfg.train.steps
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        model_flops = flops_per_token(cfg.model, cfg.data.seq_length) * tokens_per_step / self.runtime.world_size
        hardware_flops = (hardware_flops_per_token(cfg.model, cfg.data.seq_length, cfg.parallel.activation_checkpointing)
                          * tokens_per_step / self.runtime.world_size)
        peak, peak_note = peak_flops(self.runtime.device, self.precision.dtype, cfg.train.peak_tflops)
        if main and (peak or self.runtime.device.type != "cpu"):
            print(peak_note)
        result = TrainResult(self.run_dir, self.step)
        bar = tqdm(total=end, initial=self.step, disable=not (main and cfg.train.progress),
                   desc="train", unit="step", dynamic_ncols=True)
        self.model.train()
        checkpoint = None
        while self.step < end:
            start = time.perf_counter()
            metrics, verdict, result.stopped = self.train_step()
            seconds = time.perf_counter() - start
            metrics["tokens_per_s"] = metrics["tokens"] / seconds  # real tokens: instruction padding excluded
            metrics["tokens_per_s_per_gpu"] = metrics["tokens_per_s"] / self.runtime.world_size
            metrics["tflops_per_gpu"] = model_flops / seconds / 1e12
            if peak:
                metrics["mfu"], metrics["hfu"] = model_flops / seconds / peak, hardware_flops / seconds / peak
            metrics.update(peak_memory(self.runtime.device))  # each rank its own; rank 0 logs
            result.losses.append(metrics["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if verdict.failure is not None:
                self.metrics.log(self.step, metrics)
                bar.close()
                raise NonFiniteError(f"{verdict.failure}; nothing saved: {self._last_good()}")
            if main and verdict.note:
                bar.write(verdict.note)
            last = self.step == end
            if last or result.stopped or (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                checkpoint = self.save()  # before evaluating: a failing evaluation loses no training
            if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0 or last) and not result.stopped:
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
                          + (f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "")
                          + (f" (hfu {metrics['hfu']:.1%})" if metrics.get("hfu", 0) > metrics.get("mfu", 0) else "")
                          + f" {format_peak_memory(metrics)}")
            if result.stopped:
                if main:
                    bar.write(f"step {self.step}: stopping ({result.stopped}): "
                              + (f"saved {checkpoint}; relaunch the same command to resume" if checkpoint
                                 else "checkpoint.save=false, nothing saved"))
                break
        bar.close()
        result.step = self.step
        result.checkpoint = checkpoint or self.save()
        result.tokens_per_source = dict(self.data.cursor.tokens)
        return result
