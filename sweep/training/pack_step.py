"""A pack's training step: eager, ``torch.compile``'d and/or captured as a CUDA graph.

The compiled step: forward + loss are one ``torch.compile`` graph (AOTAutograd compiles its
backward with it), the per-slot optimizer update another; inductor fuses BatchNorm, ReLU, the
residual adds and the whole update over the flat buffer into few kernels. On CUDA the step is
then captured as a CUDA graph (compile, then capture). A shrink (a new K) compiles the step once
more, for the new K (``compiling.planned_compile``); whatever dynamo compiles between the pack's
own compilations (a recompile, a graph break) is counted in ``PackStats.recompiles``, with one
warning. A mixin of ``fused_pack.Pack``: it reads the pack's net, optimizer, slots and stats."""

from __future__ import annotations

import time
import warnings

import torch

from sweep.training.compiling import or_fall_back, planned_compile
from sweep.training.graphs import CapturedStep, restored
from sweep.training.train import full_precision


class PackStep:
    """Builds the step for the current K (eager, compiled, captured) and runs it."""

    def _state(self) -> list[torch.Tensor]:
        """Everything a training step writes (to undo warm-up steps)."""
        return [*self.net.parameters(), *self.net.buffers(), self.optimizer.lr,
                *self.optimizer.state_tensors()]

    def _make_step(self) -> None:
        self.loss_fn, self.update, self.logits_fn = self._loss, self.optimizer.step, self.net
        if self.use_compile:  # at the start and after each shrink: see the docstring
            self._compile()
        self.step = self._train_step
        if not self.use_graphs:
            return
        b, k = self.t.batch_size, self.k
        h, w = self.splits.train_x.shape[-2:]
        static_x = torch.zeros(b, 3 * k, h, w, device=self.device).contiguous(
            memory_format=self.layout)
        static_y = torch.zeros(b, k, dtype=torch.long, device=self.device)
        began = time.perf_counter()

        def capture() -> CapturedStep:
            with torch.cuda.device(self.device):  # the side stream and the graph on our GPU
                return CapturedStep(lambda: self._train_step(static_x, static_y), self._state())

        instead = "compiled, without a graph" if self.use_compile else "eagerly"
        captured = or_fall_back(capture, "CUDA graph capture",  # must not fail the trials
                                f"this pack trains {instead}")
        if captured is None:
            self.use_graphs = False
            return
        self.stats.capture_seconds += time.perf_counter() - began
        self.stats.add_time("capture", time.perf_counter() - began)

        def replay(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            static_x.copy_(x)
            static_y.copy_(y)
            return captured()

        self.step = replay

    def _compile(self) -> None:
        """Compile the step and the evaluation forward for this K (``dynamic=False``: K and the
        batch are fixed until the next shrink) and run each once on zeros, state restored, so
        the compilation happens here and is timed; a failure falls back, in one warning line,
        for the rest of the pack."""
        self._note_recompiles()  # anything compiled since the last compilation was unplanned
        began = time.perf_counter()
        loss_fn = torch.compile(self._loss, dynamic=False)
        update = torch.compile(self.optimizer.step, dynamic=False)
        logits_fn = torch.compile(self.net, dynamic=False)
        b, k = self.t.batch_size, self.k
        h, w = self.splits.train_x.shape[-2:]

        def warmed_up() -> tuple:
            with planned_compile(), restored(self._state()):
                x = torch.zeros(b, 3 * k, h, w, device=self.device).contiguous(
                    memory_format=self.layout)
                y = torch.zeros(b, k, dtype=torch.long, device=self.device)
                self._train_step(x, y, loss_fn, update)
                self.net.eval()  # as evaluate() calls it: eval mode, no autograd
                try:
                    with torch.no_grad():
                        self._eval_logits(torch.zeros(self.t.eval_batch_size, 3, h, w,
                                                      device=self.device, dtype=torch.uint8),
                                          logits_fn)
                finally:
                    self.net.train()
            return loss_fn, update, logits_fn

        instead = f"this pack trains with the {'CUDA graph' if self.use_graphs else 'eager'} step"
        if self.stats.compiles:
            instead += f" from its shrink to {k} slots"
        self.watch.mark()
        compiled = or_fall_back(warmed_up, "torch.compile of the pack step", instead)
        _, graph_breaks = self.watch.since()  # the frames compiled here were planned
        if compiled is None:
            self.use_compile = False
            return
        self.loss_fn, self.update, self.logits_fn = compiled
        seconds = time.perf_counter() - began
        self.stats.compiled, self.stats.compiles = True, self.stats.compiles + 1
        self.stats.compile_seconds += seconds
        self.stats.add_time("compile", seconds)
        self._count_unplanned(0, graph_breaks)

    def _note_recompiles(self) -> None:
        """Count what dynamo compiled since the pack's last look (see the module docstring)."""
        if self.stats.compiled:
            self._count_unplanned(*self.watch.since())

    def _count_unplanned(self, frames: int, graph_breaks: int) -> None:
        if not (frames or graph_breaks):
            return
        if not (self.stats.recompiles or self.stats.graph_breaks):  # one warning per pack
            warnings.warn(f"torch.compile: {frames} recompile(s) and {graph_breaks} graph "
                          f"break(s) in this pack's step or evaluation (PackStats counts them "
                          f"all); it trains on, slower, or eagerly where dynamo gave up; "
                          f"TORCH_LOGS=recompiles,graph_breaks says why")
        self.stats.recompiles += frames
        self.stats.graph_breaks += graph_breaks

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The K slot losses of one stacked batch (forward and loss: what is compiled): slot
        k's is ``cross_entropy(..., label_smoothing=eps_k)``, written out as torch computes it
        (``(1 - eps) * nll + eps / C * -sum(log p)``, each a batch mean) with eps a vector."""
        with self.autocast():
            logits = self.net(x)  # [B, K, classes]
        log_p = torch.log_softmax(full_precision(logits), dim=2)
        nll = -log_p.gather(2, y[:, :, None]).squeeze(2).mean(0)  # [K]
        uniform = -log_p.sum(2).mean(0) / log_p.shape[2]  # [K]
        eps = self.label_smoothing
        return (1 - eps) * nll + eps * uniform

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, loss_fn=None,
                     update=None) -> torch.Tensor:
        """Forward, backward, update; returns the K slot losses (on the device)."""
        per_slot = (loss_fn or self.loss_fn)(x, y)
        self.optimizer.zero_grad()  # the gradients are views into one buffer: keep them
        per_slot.sum().backward()  # d(sum)/d(slot k's weights) = d(loss k)/d(them)
        (update or self.update)()
        return per_slot.detach()
