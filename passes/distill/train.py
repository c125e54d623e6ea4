"""``distill``: train a compressed FX graph (student) against the original (teacher).

The approach: the student is copied with its weights made trainable (:mod:`._trainable`;
sparsified weights keep their zeros), teacher and student are copied once more with the
paired intermediate nodes as extra outputs (:mod:`._taps`, pairs from pass provenance in
:mod:`.features`), and a plain loop minimises the objective of :mod:`._objective` with
AdamW/Adam/SGD at a constant learning rate, the teacher under ``no_grad``. The caller's
teacher and student are never modified; the result holds a new student GraphModule.
Randomness is drawn from a forked RNG seeded with ``seed``; a checkpoint (``checkpoint=path``)
holds everything needed to resume at the same step and reach the same result as an
uninterrupted run.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from graphpress.graph.errors import PreconditionError, UnsupportedGraphError

from ..quantize.qat import convert_qat, is_prepared, prepare_qat
from ._checkpoint import RunState, load_checkpoint, save_checkpoint
from ._config import DistillConfig
from ._data import check_reiterable, select_output, split_batch, to_device
from ._evaluate import evaluate
from ._objective import check_outputs, objective
from ._session import Session

__all__ = ["distill", "DistillResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillResult:
    """The trained student (a new GraphModule), one history row per step and evaluation,
    the feature pairs used and the number of optimiser steps taken."""

    student: fx.GraphModule
    history: list[dict[str, Any]]
    pairs: tuple = ()
    steps: int = 0

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """The evaluation rows (``kind == "eval"``), first (step 0) to last."""
        return [row for row in self.history if row.get("kind") == "eval"]

    def __repr__(self) -> str:
        evals = self.evaluations
        cosine = (f", cosine {evals[0]['cosine_mean']:.4f} -> {evals[-1]['cosine_mean']:.4f}"
                  if evals else "")
        return f"DistillResult(steps={self.steps}, pairs={len(self.pairs)}{cosine})"


def distill(teacher: fx.GraphModule, student: fx.GraphModule, batches: Iterable[Any], *,
            loss: str = "kd", temperature: float = 4.0, alpha: float = 0.5,
            features: Any = "auto", feature_weight: float = 0.1, relation: bool = False,
            relation_weight: float = 1.0, labels: Any = None, output: Any = None,
            epochs: int = 1, steps: int | None = None, lr: float = 1e-4,
            optimizer: str = "adamw", schedule: str = "constant", warmup: int = 0,
            weight_decay: float = 0.0,
            max_grad_norm: float | None = 1.0, eval_batches: Iterable[Any] | None = None,
            eval_every: int | None = None, seed: int = 0,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 50,
            freeze: Sequence[str] | str = (), progress: bool = False, qat: bool = False,
            learn_scales: bool = False) -> DistillResult:
    """Heal ``student`` by distilling ``teacher`` into it on ``batches``; return a new student.

    * ``loss``: ``"kd"`` (``T²·KL`` of logits softened by ``temperature``), ``"cosine"`` or
      ``"mse"`` (embeddings), on the tensor ``output`` picks: ``output(model_outputs)`` or,
      taking two parameters, ``output(model_outputs, inputs)`` (e.g. mask-weighted pooling);
      by default the tensor itself, ``logits``, ``last_hidden_state`` or the first output.
    * ``labels`` (a dict key, a tuple index or a callable ``batch -> (inputs, labels)``) adds
      ``α·CE(student, labels)`` and weighs the distillation term by ``1 − α``.
    * ``features``: ``"auto"`` pairs every rewritten layer's output with the teacher's
      (:mod:`.features`; learned projections where pruning narrowed it), ``None`` none, or a
      list of ``(teacher_node, student_node)``; weighted by ``feature_weight`` (0.1: on
      all-MiniLM-L6-v2 with 50% of the FFN pruned, 40 steps, token cosine 0.662 → 0.853
      without features, 0.853 at 0.1, 0.843 at 1.0). ``relation=True`` adds the batch's
      similarity-matrix loss, weighted by ``relation_weight``.
    * ``steps`` optimiser steps (cycling over ``batches``) or, without it, ``epochs`` passes;
      data read more than once must be re-iterable (a list, a DataLoader). Batches must have
      the shapes the graphs were captured with, unless captured with ``dynamic_shapes``.
    * ``optimizer`` ``"adamw"``/``"adam"``/``"sgd"`` (momentum 0.9), ``weight_decay``,
      gradient norm clipped to ``max_grad_norm`` (``None``: no clipping); the learning rate
      ``lr`` warms up linearly over ``warmup`` steps, then stays (``schedule="constant"``) or
      decays to 0 at the last step (``"cosine"``, ``"linear"``; these need ``steps`` or sized
      ``batches``). Every train row records its ``lr``.
    * ``eval_batches`` are evaluated before training, every ``eval_every`` steps and at the end
      (history rows ``kind="eval"``: ``loss``, ``cosine_mean``, ``cosine_min``, for ``kd``
      ``agreement``, with labels ``accuracy``); every step adds a ``kind="train"`` row with
      ``loss`` and its terms (``response``, ``soft``/``hard`` with labels, ``feature``,
      ``relation``).
    * ``checkpoint``: a file saved every ``checkpoint_every`` steps and at the end; when it
      exists the run resumes from it and ends as an uninterrupted run would.
    * ``freeze``: fnmatch patterns of constants kept fixed (:mod:`._trainable` has the rules);
      ``seed`` seeds a forked RNG; ``progress=True`` shows a tqdm bar.
    * ``qat=True``: quantization-aware training of a quantized student
      (:func:`~graphpress.passes.quantize.qat.prepare_qat`: float master weights behind
      straight-through fake-quant, LSQ scales with ``learn_scales=True``); the returned student
      is converted back (``convert_qat``) to the structure the quantization pass emitted, so it
      exports to the same ONNX. A student that is already prepared trains as it is.

    Raises :class:`PassSpecError` for invalid options, :class:`PreconditionError` for data or
    graphs that cannot be trained as asked, :class:`UnsupportedGraphError` for non-FX models.
    """
    config = DistillConfig(loss=loss, temperature=temperature, alpha=alpha, features=features,
                           feature_weight=feature_weight, relation=relation,
                           relation_weight=relation_weight, labels=labels, output=output,
                           epochs=epochs, steps=steps, lr=lr, optimizer=optimizer,
                           schedule=schedule, warmup=warmup,
                           weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                           eval_every=eval_every, seed=seed, checkpoint_every=checkpoint_every,
                           freeze=freeze, progress=progress)
    for role, graph in (("teacher", teacher), ("student", student)):
        if not isinstance(graph, fx.GraphModule):
            raise UnsupportedGraphError(
                f"distill: the {role} is a {type(graph).__name__}, not a torch.fx.GraphModule; "
                "capture it first with graphpress.capture(model, example_args)")
    check_reiterable(batches, 1 if steps is not None else epochs)
    if eval_batches is not None:
        check_reiterable(eval_batches, 2, "eval_batches")
    if qat and not is_prepared(student):
        student = prepare_qat(student, learn_scales=learn_scales)
    first = next(itertools.chain(student.parameters(), student.buffers()), None)
    cuda = [first.device.index or 0] if first is not None and first.is_cuda else []
    with torch.random.fork_rng(devices=cuda):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        result = _Run(teacher, student, batches, eval_batches, checkpoint, config).train()
    return replace(result, student=convert_qat(result.student)) if qat else result


class _Run:
    def __init__(self, teacher: fx.GraphModule, student: fx.GraphModule, batches: Any,
                 eval_batches: Any, checkpoint: Any, config: DistillConfig) -> None:
        self.batches, self.eval_batches, self.config = batches, eval_batches, config
        self.path = checkpoint
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            raise PreconditionError("distill: batches is empty; pass at least one batch")
        if iterator is batches:  # a one-shot iterator: put the batch just read back in front
            self.batches = itertools.chain([first], iterator)
        self.session = Session(teacher, student, first, config)
        self.state = RunState()
        self.total = config.steps if config.steps is not None else (
            config.epochs * len(batches) if hasattr(batches, "__len__") else None)
        if self.total is None and config.schedule != "constant":
            raise PreconditionError(f"distill: schedule={config.schedule!r} needs the run's "
                                    "length: pass steps=, or batches with a len()")

    def train(self) -> DistillResult:
        session, state, config = self.session, self.state, self.config
        saved = load_checkpoint(self.path, session.fingerprint()) if self.path else None
        if saved is not None:
            session.restore(saved)
            state.step, state.epoch, state.consumed = (saved["step"], saved["epoch"],
                                                       saved["consumed"])
            state.history = list(saved["history"])
            torch.set_rng_state(saved["rng"])
            logger.info("distill: resumed from %s at step %d", self.path, state.step)
        if self.eval_batches is not None and not state.history:
            self._evaluate()
        bar = _progress(config, self.batches, state.step)
        try:
            self._loop(bar)
        finally:
            if bar is not None:
                bar.close()
        last_eval = next((r["step"] for r in reversed(state.history) if r["kind"] == "eval"), -1)
        if self.eval_batches is not None and last_eval != state.step:
            self._evaluate()
        if self.path:
            self._save()
        return DistillResult(session.trainable.finish(), list(state.history),
                             tuple(session.pairs), state.step)

    def _loop(self, bar: Any) -> None:
        state, config = self.state, self.config
        while config.steps is not None or state.epoch < config.epochs:
            if config.steps is not None and state.step >= config.steps:
                return
            seen = 0
            for index, batch in enumerate(self.batches):
                seen += 1
                if index < state.consumed:
                    continue  # consumed before the checkpoint this run resumed from
                row = self._step(batch)
                state.consumed = index + 1
                state.history.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4g}")
                if config.eval_every and self.eval_batches is not None \
                        and state.step % config.eval_every == 0:
                    self._evaluate()
                if self.path and state.step % config.checkpoint_every == 0:
                    self._save()
                if config.steps is not None and state.step >= config.steps:
                    return
            if seen == 0:
                if state.step == 0:
                    raise PreconditionError("distill: batches is empty; pass at least one "
                                            "batch")
                logger.info("distill: the batches ran out after %d steps (a one-shot "
                            "iterator); stopping early", state.step)
                return
            state.epoch, state.consumed = state.epoch + 1, 0

    def _step(self, batch: Any) -> dict[str, Any]:
        session, state = self.session, self.state
        args, kwargs, labels = to_device(split_batch(batch, self.config.labels), session.device)
        with torch.no_grad():
            teacher_out, teacher_features = session.teacher(*args, **kwargs)
        student_out, student_features = session.student(*args, **kwargs)
        z_t = select_output(teacher_out, self.config.output, kwargs or args)
        z_s = select_output(student_out, self.config.output, kwargs or args)
        check_outputs(z_s, z_t, self.config)
        terms = objective(z_s, z_t, labels, student_features, teacher_features,
                          session.projections, self.config)
        lr = self.config.lr_at(state.step, self.total)
        session.update(terms["loss"], lr)
        state.step += 1
        return {"kind": "train", "step": state.step, "epoch": state.epoch, "lr": lr,
                **{name: float(value.detach()) for name, value in terms.items()}}

    def _evaluate(self) -> None:
        s = self.session
        self.state.history.append(evaluate(s.teacher_module, s.trainable.module,
                                           self.eval_batches, self.config, s.device,
                                           self.state.step, self.state.epoch))

    def _save(self) -> None:
        s = self.session
        save_checkpoint(self.path, state=self.state, student=dict(s.trainable.params),
                        projections=s.projections.state_dict(),
                        optimizer=s.optimizer.state_dict(), fingerprint=s.fingerprint())


def _progress(config: DistillConfig, batches: Any, initial: int) -> Any:
    if not config.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no bar without tqdm
        return None
    total = config.steps
    if total is None and hasattr(batches, "__len__"):
        total = config.epochs * len(batches)
    return tqdm(total=total, initial=initial, desc="distill", unit="step")
