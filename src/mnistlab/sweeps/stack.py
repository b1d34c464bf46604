"""Several copies of one network trained as one computation: the stacked model.

A sweep of small models leaves the hardware idle: each optimizer step is a few dozen tiny
kernels, and their launch costs more than their arithmetic. :class:`Stack` takes ``G``
built copies of one ``nn.Sequential`` (same layers, same shapes; their weights, dropout
rates, BN momenta, learning rates and regularizer strengths may differ) and runs all of
them with one kernel per layer: batched matrix products for ``Linear``, grouped convolution
for ``Conv2d``, one ``batch_norm`` over every copy's channels side by side.

Layout (:meth:`Stack.forward`). Image layers see a *grid* ``[B, G*C, H, W]``, copy ``g``
owning channels ``g*C`` to ``(g+1)*C``, which grouped convolution, BatchNorm2d and pooling
already work on; from the ``Flatten`` on, activations are *dense* ``[G, features, B]``, so
``Linear`` is one ``baddbmm`` and BatchNorm1d sees every copy's features as channels of
``[1, G*features, B]``, with no copies between layers. Every parameter lives
in one flat tensor (parameter by parameter, each ``[G, *shape]``), so the optimizer, the
regularizer and ``zero_grad`` are a handful of element-wise ops for all copies together;
per-copy hyper-parameters are ``[G]`` vectors spread over it by ``lane_of``.

Each copy stays an ordinary ``nn.Module``: its parameters, BN buffers and optimizer state
are *views* into the stacked storage (``tensor.data`` is re-pointed, object identity kept),
so its checkpoint, evaluation, BN measurements and regularizer metrics are the usual code
on the usual module, and see every update at once.

Per copy, the arithmetic is the one torch does for the copy alone: BN's running statistics
follow the copy's own ``momentum`` (``None``: cumulative average), dropout masks come from
the copy's own generator with the shape and order ``F.dropout`` draws them on CPU (so a
copy's masks are the ones it would draw alone), SGD/Adam/AdamW follow torch's update rules.
Sums run in a different order, so values agree to float32 rounding, not bit for bit.
Caveats: only the layers in :data:`LAYERS` stack; a model with anything else does not
(:func:`signature` returns None). On CUDA, dropout masks differ from a lone run's (torch's
fused CUDA dropout draws its numbers differently).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnistlab.engine.regularizers import Regularizer

# The optimizers that stack, and what every copy's must share; the learning rate, momentum,
# betas and eps are per copy. Weight decay is the regularizer's, never the optimizer's.
SHARED = {"SGD": ("nesterov",), "Adam": (), "AdamW": ()}
UNSUPPORTED = {"weight_decay": 0, "dampening": 0, "amsgrad": False, "maximize": False}


def _flatten(m: nn.Module, h: Tensor, s: Stack) -> Tensor:
    """Grid to dense: each copy's channels x height x width as its features."""
    if s.dense:  # the model's first layer: the input came in dense
        return h
    s.dense = True
    return h.view(h.shape[0], s.size, -1).permute(1, 2, 0).contiguous()


def _linear(m: nn.Module, h: Tensor, s: Stack) -> Tensor:
    w, bias = s.param(m, "weight"), s.param(m, "bias")  # [G, out, in], [G, out]
    return torch.bmm(w, h) if bias is None else torch.baddbmm(bias.unsqueeze(2), w, h)


def _conv2d(m: nn.Module, h: Tensor, s: Stack) -> Tensor:
    w, bias = s.param(m, "weight"), s.param(m, "bias")
    w = w.reshape(-1, *w.shape[2:])  # [G*out, in/groups, kh, kw]: copies as conv groups
    flat_bias = None if bias is None else bias.reshape(-1)
    groups = m.groups * s.size  # type: ignore[operator]
    return F.conv2d(h, w, flat_bias, m.stride, m.padding, m.dilation, groups)  # type: ignore[arg-type]


def _batch_norm(m: nn.Module, h: Tensor, s: Stack) -> Tensor:
    """One ``batch_norm`` over every copy's channels: dense ``[G, C, B]`` is ``[1, G*C, B]``."""
    x = h.view(1, -1, h.shape[2]) if s.dense else h
    w, b = s.param(m, "weight").reshape(-1), s.param(m, "bias").reshape(-1)
    mean, var, tracked = s.buffers[s.names[m]]
    if not s.training:
        if s.tap is not None:  # each copy's input, laid out as the copy alone sees it
            g = s.size
            s.tap(s.names[m], [h[i].t() for i in range(g)] if s.dense else list(
                h.view(h.shape[0], g, -1, *h.shape[2:]).unbind(1)))  # fmt: skip
        out = F.batch_norm(x, mean.view(-1), var.view(-1), w, b, False, 0.0, m.eps)  # type: ignore[arg-type]
        return out.view_as(h)
    # torch's kernel at momentum 1 leaves this batch's mean and unbiased variance in the
    # scratch buffers; each copy's running statistics then move at the copy's own momentum.
    batch_mean, batch_var = s.scratch[s.names[m]]
    out = F.batch_norm(x, batch_mean, batch_var, w, b, True, 1.0, m.eps)  # type: ignore[arg-type]
    with torch.no_grad():
        tracked.add_(1)
        a = s.bn_momentum[s.names[m]]  # [G, 1]; NaN: cumulative average, 1 / updates
        if s.cumulative[s.names[m]]:
            a = torch.where(torch.isnan(a), 1.0 / tracked.unsqueeze(1), a)
        mean.mul_(1 - a).add_(batch_mean.view_as(mean) * a)
        var.mul_(1 - a).add_(batch_var.view_as(var) * a)
    return out.view_as(h)


def _relu(m: nn.Module, h: Tensor, s: Stack) -> Tensor:
    return F.relu(h, inplace=m.inplace)  # type: ignore[arg-type]


def _max_pool2d(m: nn.Module, h: Tensor, s: Stack) -> Tensor:
    return F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)  # type: ignore[arg-type]


def _dropout(m: nn.Module, h: Tensor, s: Stack) -> Tensor:
    """Each copy's mask as ``F.dropout`` draws it for that copy alone: ``bernoulli_(1 - p)``
    over an empty tensor of the copy's shape ``[B, C, ...]``, from the copy's generator,
    divided by ``1 - p``; then laid out as the activations are."""
    if not s.training:
        return h
    b = h.shape[2] if s.dense else h.shape[0]
    shape = (b, h.shape[1]) if s.dense else (b, h.shape[1] // s.size, *h.shape[2:])
    masks = []
    for p, gen in zip(s.dropout[s.names[m]], s.generators, strict=True):
        noise = torch.empty(shape, device=h.device, dtype=h.dtype)
        masks.append(noise.bernoulli_(1 - p, generator=gen).div_(1 - p))
    if s.dense:
        return h * torch.stack(masks).transpose(1, 2)
    return h * torch.stack(masks, 1).view_as(h)


# How each layer runs on the stacked layouts; a model with any other layer does not stack.
LAYERS: dict[type[nn.Module], Callable[[nn.Module, Tensor, Stack], Tensor]] = {
    nn.Flatten: _flatten,
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.ReLU: _relu,
    nn.MaxPool2d: _max_pool2d,
    nn.Dropout: _dropout,
}


def _stackable(m: nn.Module) -> bool:
    if type(m) not in LAYERS:
        return False
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    if isinstance(m, nn.Conv2d):
        return m.padding_mode == "zeros"
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return m.affine and m.track_running_stats
    return True


def _describe(m: nn.Module) -> str:
    """A layer as far as it must be equal in every copy: dropout rates and BN momenta may
    differ (each copy keeps its own), everything else may not."""
    if isinstance(m, nn.Dropout):
        return type(m).__name__
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return f"{type(m).__name__}({m.num_features}, eps={m.eps})"
    return repr(m)


GRID = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)  # layers that need the image's grid
DENSE = (nn.Linear, nn.BatchNorm1d)  # layers that need features: after the Flatten


def signature(model: nn.Module) -> tuple[str, ...] | None:
    """What must be equal for copies to stack: every layer, as :func:`_describe` has it;
    None when the model cannot stack (a layer not in :data:`LAYERS`, or image layers after
    the ``Flatten`` or feature layers before it)."""
    if not isinstance(model, nn.Sequential) or not all(_stackable(m) for m in model):
        return None
    flat = [i for i, m in enumerate(model) if isinstance(m, nn.Flatten)]
    if len(flat) != 1:
        return None
    if any(isinstance(m, GRID) for m in model[flat[0] :]) or any(
        isinstance(m, DENSE) for m in model[: flat[0]]
    ):
        return None
    return tuple(_describe(m) for m in model)


def _optimizer_kind(optimizers: Sequence[torch.optim.Optimizer]) -> str:
    """The optimizers' one class name, if they can stack (else ValueError)."""
    kinds = {type(o).__name__ for o in optimizers}
    kind = next(iter(kinds))
    groups = [g for o in optimizers for g in o.param_groups]
    if len(kinds) != 1 or kind not in SHARED or len(groups) != len(optimizers):
        raise ValueError(f"optimizers cannot stack: {sorted(kinds)}, {len(groups)} groups")
    for key in SHARED[kind]:
        if len({g[key] for g in groups}) != 1:
            raise ValueError(f"optimizers differ in {key}")
    for key, plain in UNSUPPORTED.items():
        if any(g.get(key, plain) != plain for g in groups):
            raise ValueError(f"optimizer {key} other than {plain} does not stack")
    return kind


class Stack:
    """``G`` copies of one ``nn.Sequential``, their optimizers and regularizers, as one.

    ``generators`` are the copies' own random streams (dropout). After construction the
    copies' parameters, BN buffers and optimizer state are views of this stack's storage."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        regularizers: Sequence[Regularizer],
        generators: Sequence[torch.Generator],
        clip_norms: Sequence[float | None] = (),
        clip_values: Sequence[float | None] = (),
    ) -> None:
        """``clip_norms`` and ``clip_values``: each copy's gradient clipping (None or empty:
        none), applied by :meth:`step` to that copy's own gradient."""
        first = models[0]
        if len({signature(m) for m in models}) != 1 or signature(first) is None:
            raise ValueError("the models differ in layers or shapes, or cannot stack")
        self.kind = _optimizer_kind(optimizers)
        self.size, self.models, self.generators = len(models), list(models), list(generators)
        self.first, self.training, self.dense = first, True, False
        # Called with each BN layer's per-copy inputs in eval-mode forwards (BN statistics).
        self.tap: Callable[[str, list[Tensor]], None] | None = None
        self.names = {m: n for n, m in first.named_children()}
        device = next(first.parameters()).device
        named = [dict(m.named_parameters()) for m in models]
        self.keys = list(named[0])
        self.shapes = [named[0][k].shape for k in self.keys]
        self.sizes = [self.size * named[0][k].numel() for k in self.keys]
        self.lane_of = torch.cat(
            [torch.arange(self.size, device=device).repeat_interleave(n // self.size)
             for n in self.sizes]
        )  # fmt: skip
        self._rates: tuple[tuple[float, ...], Tensor] = ((), torch.empty(0))
        flat = torch.empty(sum(self.sizes), device=device)
        for piece, key in zip(self._pieces(flat), self.keys, strict=True):
            for j, params in enumerate(named):
                piece[j].copy_(params[key].detach())
                params[key].data = piece[j]  # the copy's parameter is now a view of the stack
        # Each parameter a leaf over the flat storage, its gradient a view of one flat
        # gradient: backward accumulates in place, and the update needs no gathering.
        self.flat, self.grad = flat, torch.zeros_like(flat)
        self.leaves = [p.detach().requires_grad_() for p in self._pieces(flat)]
        for leaf, grad in zip(self.leaves, self._pieces(self.grad), strict=True):
            leaf.grad = grad
        self._stack_buffers(models, device)
        self._stack_regularizers(regularizers, named)
        self._stack_optimizers(optimizers, named)
        self.clip_norm, self.clip_value = self._limits(clip_norms), self._limits(clip_values)

    def _limits(self, limits: Sequence[float | None]) -> Tensor | None:
        """Per-copy clipping limits ``[G]`` (inf: that copy clips nothing); None: no copy clips."""
        if all(v is None for v in limits):
            return None
        values = [math.inf if v is None else float(v) for v in limits]
        return torch.tensor(values, device=self.flat.device)

    def _pieces(self, flat: Tensor) -> list[Tensor]:
        """``flat`` cut into the parameters, each ``[G, *shape]``."""
        pieces = zip(flat.split(self.sizes), self.shapes, strict=True)
        return [p.view(self.size, *shape) for p, shape in pieces]

    def param(self, m: nn.Module, name: str) -> Tensor | None:
        """Layer ``m``'s stacked parameter ``name`` in the current forward (None: it has none)."""
        return self._params.get(f"{self.names[m]}.{name}")

    def spread(self, values: Sequence[float]) -> Tensor:
        """One value per copy, spread over the flat parameters."""
        v = torch.tensor(list(values), dtype=torch.float32, device=self.lane_of.device)
        return v[self.lane_of]

    def rates(self, lrs: Sequence[float]) -> Tensor:
        """The learning rates, spread; the last ones are kept (they change only with a
        schedule, and spreading costs as much as an update)."""
        if self._rates[0] != tuple(lrs):
            self._rates = (tuple(lrs), self.spread(lrs))
        return self._rates[1]

    def _stack_buffers(self, models: Sequence[nn.Module], device: torch.device) -> None:
        """BN running statistics as ``[G, C]`` (views in every copy); per-copy momentum and
        dropout rate."""
        self.buffers: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.bn_momentum: dict[str, Tensor] = {}
        self.cumulative: dict[str, bool] = {}  # some copy's momentum is None
        self.scratch: dict[str, tuple[Tensor, Tensor]] = {}  # one batch's mean and variance
        self.dropout: dict[str, list[float]] = {}
        for name, layer in self.first.named_children():
            copies = [dict(m.named_children())[name] for m in models]
            if isinstance(layer, nn.Dropout):
                self.dropout[name] = [float(c.p) for c in copies]
            if not isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                continue
            stacked = []
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                t = torch.stack([getattr(c, key).detach() for c in copies])
                for j, c in enumerate(copies):
                    getattr(c, key).data = t[j]
                stacked.append(t)
            self.buffers[name] = (stacked[0], stacked[1], stacked[2])
            momenta = [math.nan if c.momentum is None else c.momentum for c in copies]
            self.bn_momentum[name] = torch.tensor(momenta, device=device).unsqueeze(1)
            self.cumulative[name] = any(c.momentum is None for c in copies)
            self.scratch[name] = (stacked[0].flatten().clone(), stacked[1].flatten().clone())

    def _stack_regularizers(
        self, regularizers: Sequence[Regularizer], named: list[dict[str, nn.Parameter]]
    ) -> None:
        """Which flat entries each copy's regularizer acts on, and its strengths."""
        first = regularizers[0]
        ids = {id(p) for p in first.params}
        chosen = [k for k in self.keys if id(named[0][k]) in ids]
        self.reg_keys = chosen
        mask = torch.cat(
            [torch.full((n,), float(k in chosen), device=self.flat.device)
             for k, n in zip(self.keys, self.sizes, strict=True)]
        )  # fmt: skip
        self.l1 = self.spread([r.l1 for r in regularizers]) * mask
        self.l2 = self.spread([r.l2 for r in regularizers]) * mask
        self.l1_mode, self.l2_mode = first.l1_mode, first.l2_mode
        self.l1_lanes = torch.tensor([r.l1 for r in regularizers], device=self.flat.device)
        self.l2_lanes = torch.tensor([r.l2 for r in regularizers], device=self.flat.device)
        self.l1_any, self.l2_any = bool(self.l1_lanes.any()), bool(self.l2_lanes.any())

    def _stack_optimizers(
        self, optimizers: Sequence[torch.optim.Optimizer], named: list[dict[str, nn.Parameter]]
    ) -> None:
        """The optimizers' kind and per-copy hyper-parameters; their state (a resumed group)
        taken into flat tensors."""
        kind, groups = self.kind, [o.param_groups[0] for o in optimizers]
        self.optimizers = list(optimizers)
        self.order = [[params[k] for k in self.keys] for params in named]
        if kind == "SGD":
            self.momentum = self.spread([g["momentum"] for g in groups])
            self.nesterov = groups[0]["nesterov"]
            self.state_names: tuple[str, ...] = (
                ("momentum_buffer",) if any(g["momentum"] for g in groups) else ()
            )
        else:
            # Per copy [G] (bias corrections, once a step) and spread (the moment updates).
            self.betas = torch.tensor([g["betas"] for g in groups], dtype=torch.float64)
            self.keep1 = self.spread([1 - g["betas"][0] for g in groups])
            self.beta2 = self.spread([g["betas"][1] for g in groups])
            self.keep2 = self.spread([1 - g["betas"][1] for g in groups])
            self.eps = self.spread([g["eps"] for g in groups])
            self.state_names = ("exp_avg", "exp_avg_sq")
        # One step count per copy and parameter (torch keeps one per parameter).
        self.step_counts = torch.zeros(self.size, len(self.keys))
        self.state: dict[str, Tensor] = {}
        if any(o.state for o in optimizers):  # resumed: the saved state into the stack
            self._take_state()

    def _take_state(self) -> None:
        """A resumed group (its copies stand at the same step): their state, stacked."""
        for name in self.state_names:
            flat = torch.zeros_like(self.flat)
            for k, piece in enumerate(self._pieces(flat)):
                for j, opt in enumerate(self.optimizers):
                    saved = opt.state.get(self.order[j][k], {}).get(name)
                    if saved is not None:
                        piece[j].copy_(saved)
            self.state[name] = flat
        steps = [o.state[p[0]]["step"] for o, p in zip(self.optimizers, self.order, strict=True)
                 if "step" in o.state.get(p[0], {})]  # fmt: skip
        if steps:  # Adam's count (SGD keeps none)
            self.step_counts.fill_(float(steps[0]))
        self._lend_state()

    def _lend_state(self) -> None:
        """Each copy's optimizer state as views of the stack's: what its checkpoint saves."""
        views = {n: self._pieces(t) for n, t in self.state.items()}
        for j, opt in enumerate(self.optimizers):
            if self.kind == "SGD" and opt.param_groups[0]["momentum"] == 0:
                continue  # torch keeps no buffer without momentum
            for k, p in enumerate(self.order[j]):
                entry = {n: views[n][k][j] for n in views}
                if self.kind != "SGD":
                    entry["step"] = self.step_counts[j, k]
                opt.state[p] = entry

    @torch.no_grad()
    def release(self, lane: int) -> None:
        """Copy ``lane`` out of the stack, then drop it: its module and optimizer keep the
        weights, BN statistics and state they ended with (a copy that stopped early is
        evaluated and summarised after the others have trained on)."""
        model, optimizer = self.models[lane], self.optimizers[lane]
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
        for state in optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, Tensor):
                    state[k] = v.clone()
        self.drop(lane)

    @torch.no_grad()
    def clip(self) -> None:
        """Each copy's gradient clipped as ``clip_grad_value_`` and then ``clip_grad_norm_``
        would clip the copy's alone: elementwise by its value, then scaled by its own norm
        (over the flat gradient's entries of its lane), never by the group's."""
        grad = self.grad
        if self.clip_value is not None:
            limit = self.clip_value[self.lane_of]
            torch.minimum(grad, limit, out=grad)
            torch.maximum(grad, -limit, out=grad)
        if self.clip_norm is not None:
            squares = [piece.flatten(1).pow(2).sum(1) for piece in self._pieces(grad)]
            norms = torch.stack(squares).sum(0).sqrt()  # [G]
            coef = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)  # torch's own rule
            grad.mul_(coef[self.lane_of])

    @torch.no_grad()
    def drop(self, lane: int) -> None:
        """Reset copy ``lane``: zero weights and optimizer state, BN statistics as new. A copy
        that ended (diverged, or failed) trains on so at rate 0: nothing non-finite runs
        through the stack."""
        for flat in (self.flat, *self.state.values()):
            for piece in self._pieces(flat):
                piece[lane].zero_()
        for name, (mean, var, _) in self.buffers.items():
            mean[lane].zero_(), var[lane].fill_(1.0)
            for scratch in self.scratch[name]:
                scratch.view_as(mean)[lane].zero_()

    # ------------------------------------------------------------------ the computation

    def forward(self, x: Tensor, training: bool = True) -> Tensor:
        """Logits ``[G, B, classes]`` for inputs ``[G, B, *shape]`` (copy ``g`` sees ``x[g]``).

        Two layouts: *grid* ``[B, G*C, H, W]`` for the image layers (copy ``g`` owns channels
        ``g*C`` to ``(g+1)*C``: grouped convolution, BatchNorm2d, pooling), and *dense*
        ``[G, features, B]`` from the ``Flatten`` on (``Linear`` is one ``baddbmm``, and the
        features of all copies are BatchNorm1d's channels)."""
        self.training = training
        self._params = dict(zip(self.keys, self.leaves, strict=True))
        g, b = x.shape[:2]
        self.dense = isinstance(self.first[0], nn.Flatten)
        if self.dense:
            h = x.reshape(g, b, -1).transpose(1, 2).contiguous()
        else:
            h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])
        for layer in self.first:
            h = LAYERS[type(layer)](layer, h, self)
        return h.transpose(1, 2)

    @torch.inference_mode()
    def evaluate(self, x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
        """Every copy's mean loss and accuracy ``[G]`` on the same samples, in eval mode (BN
        with each copy's running statistics, dropout off): ``loop.evaluate`` for all copies
        in one pass per chunk."""
        loss = torch.zeros(self.size, dtype=torch.float64, device=x.device)
        correct = torch.zeros(self.size, dtype=torch.int64, device=x.device)
        for start in range(0, len(x), batch_size):
            xs, ys = x[start : start + batch_size], y[start : start + batch_size]
            out = self.forward(xs.expand(self.size, *xs.shape), training=False).float()
            target = ys.expand(self.size, -1)
            ce = F.cross_entropy(out.flatten(0, 1), target.flatten(), reduction="none")
            loss += ce.view(self.size, -1).sum(1)
            correct += (out.argmax(2) == target).sum(1)
        n = max(1, len(x))
        return loss / n, correct.double() / n

    def penalty(self) -> Tensor:
        """Each copy's loss-side regularizer term ``[G]`` (L1 and/or L2 in penalty mode)."""
        total = torch.zeros(self.size, device=self.flat.device)
        for key in self.reg_keys:
            p = self._params[key].flatten(1)
            if self.l1_mode == "penalty":
                total = total + self.l1_lanes * p.abs().sum(1)
            if self.l2_mode == "penalty":
                total = total + 0.5 * self.l2_lanes * p.pow(2).sum(1)
        return total

    @property
    def adds_to_loss(self) -> bool:
        return (self.l1_mode == "penalty" and self.l1_any) or (
            self.l2_mode == "penalty" and self.l2_any
        )

    @torch.no_grad()
    def step(self, lrs: Sequence[float]) -> None:
        """One optimizer step for every copy at its own rate (its gradient clipped first, if
        it asks), then the update-side regularizer (decoupled decay, proximal L1) at the same
        rate; clears the gradients."""
        self.clip()  # the window's whole gradient, once, before the update
        p, grad, first = self.flat, self.grad, not self.state
        lr = self.rates(lrs)
        self.step_counts.add_(1)
        if self.kind == "SGD":
            d = grad
            if self.state_names and first:  # torch's first buffer is the gradient itself
                self.state["momentum_buffer"] = grad.clone()
            elif self.state_names:
                self.state["momentum_buffer"].mul_(self.momentum).add_(grad)
            if self.state_names:
                buf = self.state["momentum_buffer"]
                d = grad + self.momentum * buf if self.nesterov else buf
            p.addcmul_(lr, d, value=-1)
        else:
            if first:
                self.state = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            m, v, t = self.state["exp_avg"], self.state["exp_avg_sq"], float(self.step_counts[0, 0])
            m.lerp_(grad, self.keep1)
            v.mul_(self.beta2).addcmul_(grad * self.keep2, grad)
            bias = 1 - self.betas**t  # [G, 2]: each copy's bias corrections, as torch's
            per_copy = torch.stack([torch.tensor(lrs, dtype=torch.float64) / bias[:, 0],
                                    bias[:, 1].sqrt()], 1).to(p)  # fmt: skip
            step_size, bias2_sqrt = per_copy[self.lane_of].unbind(1)
            denom = v.sqrt().div_(bias2_sqrt).add_(self.eps)
            p.addcdiv_(step_size * m, denom, value=-1)
        if first and self.state_names:
            self._lend_state()
        if self.l2_mode == "decoupled" and self.l2_any:
            p.mul_(1 - lr * self.l2)
        if self.l1_mode == "proximal" and self.l1_any:
            p.copy_(p.sign() * (p.abs() - lr * self.l1).clamp_min_(0.0))
        grad.zero_()
