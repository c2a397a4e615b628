"""Where a `pipeline train` step goes, measured inside the real trainer.

`StepProbe.attach(trainer)` adds a TrainerCallback and wraps the trainer's own `training_step` and `compute_loss`
(the wrappers call the originals unchanged) to mark, per micro-batch: input preparation, forward (+ loss), backward;
per optimizer step: clipping + optimizer, the rest of the step (scheduler, zero_grad), and the host time between
steps (fetching the next micro-batches, logging). On CUDA the marks are CUDA events (device time, no sync inside a
step); on a CPU, wall-clock times. The measured window is bracketed by two synchronizations, so tokens/s is wall
time. Optionally the last step runs under torch.profiler: the share of that step the GPU spent in kernels (the rest
is the GPU waiting for the host) and the top kernels.
"""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback


class _Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


class StepProbe(TrainerCallback):
    def __init__(self, warmup: int, measure: int, profile_last: bool = False):
        self.warmup, self.measure, self.profile_last = warmup, measure, profile_last
        self.cuda = torch.cuda.is_available()
        self.clock = _Clock(self.cuda)
        self.steps: list[dict] = []  # one per optimizer step
        self.window: dict = {}
        self.profile: dict | None = None
        self._prof = None

    # -- wiring ---------------------------------------------------------------------------------------------------
    def attach(self, trainer) -> None:
        trainer.add_callback(self)
        step_fn, loss_fn = trainer.training_step, trainer.compute_loss

        def training_step(model, inputs, num_items_in_batch=None):
            micro = self._micro(inputs)
            loss = step_fn(model, inputs, num_items_in_batch)
            micro["end"] = self.clock.mark()
            micro["loss"] = loss.detach()
            return loss

        def compute_loss(model, inputs, *args, **kwargs):
            micro = self._current["micro"][-1] if self._in_step() and self._current["micro"] else None
            if micro is not None and "fwd" not in micro:
                micro["fwd"] = self.clock.mark()
            out = loss_fn(model, inputs, *args, **kwargs)
            if micro is not None and "fwd_end" not in micro:
                micro["fwd_end"] = self.clock.mark()
            return out

        trainer.training_step = training_step
        trainer.compute_loss = compute_loss

    def _in_step(self) -> bool:
        return bool(self.steps) and "end" not in self.steps[-1]

    @property
    def _current(self) -> dict:
        return self.steps[-1]

    def _micro(self, inputs) -> dict:
        if "attention_mask" in inputs:
            lengths = inputs["attention_mask"].sum(1)
        else:  # padding-free: one row, sequence boundaries from the collator
            lengths = inputs["cu_seq_lens_q"].diff()
        micro = {"begin": self.clock.mark(), "padded": inputs["input_ids"].numel(), "lengths": lengths.detach(),
                 "targets": (inputs["labels"] != -100).sum().detach()}
        self._current["micro"].append(micro)
        return micro

    # -- callback ---------------------------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        i = len(self.steps)
        if i == self.warmup:
            self._sync()
            self.window["t0"] = time.perf_counter()
        if self.profile_last and i == self.warmup + self.measure:
            self._sync()
            try:  # a profiler that cannot start (no CUPTI) costs the profile, not the run
                self._prof = torch.profiler.profile(activities=self._activities())
                self._prof.__enter__()
            except Exception as e:  # noqa: BLE001
                self._prof, self.profile = None, {"error": f"{type(e).__name__}: {e}"[:500]}
            self.window["prof_t0"] = time.perf_counter()
        self.steps.append({"host_begin": time.perf_counter(), "begin": self.clock.mark(), "micro": []})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._current["opt"] = self.clock.mark()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._current["opt_end"] = self.clock.mark()

    def on_step_end(self, args, state, control, **kwargs):
        step = self._current
        step["end"] = self.clock.mark()
        step["host_end"] = time.perf_counter()
        i = len(self.steps) - 1
        if i == self.warmup + self.measure - 1:
            self._sync()
            self.window["t1"] = time.perf_counter()
        if self._prof is not None and i == self.warmup + self.measure:
            self._sync()
            wall = time.perf_counter() - self.window["prof_t0"]
            self._prof.__exit__(None, None, None)
            self.profile = kernel_share(self._prof, wall)
            self._prof = None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _activities(self):
        acts = [torch.profiler.ProfilerActivity.CPU]
        return acts + [torch.profiler.ProfilerActivity.CUDA] if self.cuda else acts

    # -- results ----------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Per measured step: tokens, phase times (ms) and loss; plus the window's wall time."""
        self._sync()
        c = self.clock.ms
        rows = []
        for n, step in enumerate(self.steps):
            if "end" not in step:
                continue
            micro = step["micro"]
            lengths = [int(x) for m in micro for x in m["lengths"].tolist()]
            prev = self.steps[n - 1] if n else None
            row = {
                "step": n + 1,
                "loss": float(sum(m["loss"].float() for m in micro)) if micro else None,
                "tokens": sum(lengths), "padded_tokens": sum(m["padded"] for m in micro),
                "targets": int(sum(int(m["targets"]) for m in micro)), "row_lengths": lengths,
                "prep_ms": sum(c(m["begin"], m["fwd"]) for m in micro if "fwd" in m),
                "forward_ms": sum(c(m["fwd"], m["fwd_end"]) for m in micro if "fwd_end" in m),
                "backward_ms": sum(c(m["fwd_end"], m["end"]) for m in micro if "fwd_end" in m),
                "optimizer_ms": c(micro[-1]["end"], step["opt_end"]) if micro and "opt_end" in step else 0.0,
                "other_ms": c(step["opt_end"], step["end"]) if "opt_end" in step else 0.0,
                # host time between the previous step's end and this one's start: the next micro-batches are fetched
                # there (and the previous step's logging runs)
                "between_steps_ms": (step["host_begin"] - prev["host_end"]) * 1e3 if prev else None,
                "step_device_ms": c(step["begin"], step["end"]),
            }
            rows.append(row)
        wall = self.window["t1"] - self.window["t0"] if "t1" in self.window else None
        return {"steps": rows, "window_s": wall, "measured": [self.warmup + 1, self.warmup + self.measure],
                "profile": self.profile}


def kernel_share(prof, wall_s: float, top: int = 12) -> dict:
    """GPU kernel time of a profiled step against its wall time, and the kernels that took most of it."""
    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in kernels)
    ranked = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {"wall_ms": round(wall_s * 1e3, 2), "kernel_ms": round(total_us / 1e3, 2),
            "kernel_fraction": round(total_us / 1e6 / wall_s, 4) if wall_s > 0 else None,
            "kernel_launches": sum(e.count for e in kernels),
            "top_kernels": [{"name": e.key[:120], "ms": round(e.self_device_time_total / 1e3, 2), "calls": e.count}
                            for e in ranked]}
