"""SAM and ASAM: a wrapper that perturbs the weights before the base optimizer steps.

One step, as in Foret et al. (2021) and the SSAM paper (Mi et al., 2022):

    g   = grad L(w)                                  (the caller's first forward + backward)
    e   = rho * g / (||g|| + eps)                    SAM
    e   = rho * w^2 g / (|| |w| g || + eps)          ASAM (adaptive=True)
    e  *= mask                                       SSAM only (see ssam.optim.ssam)
    w  <- w + e ; g' = grad L(w + e) ; w <- w        (the caller's second forward + backward; w restored by copy)
    base_optimizer.step() with g'

The wrapper and the base optimizer share one ``param_groups`` list, so a learning-rate scheduler attached to either
changes both, and ``zero_grad`` on either clears every gradient.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["SAM"]


def _split_names(params: Any) -> tuple[list, dict[int, str]]:
    """Accept parameters, (name, parameter) pairs or param-group dicts of either; return plain groups + names."""
    params = list(params)
    if len(params) == 0:
        raise ValueError("params: got an empty parameter list; pass the model's parameters")
    names: dict[int, str] = {}

    def strip(items: Iterable) -> list[Tensor]:
        out = []
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                names[id(item[1])] = item[0]
                item = item[1]
            if not isinstance(item, Tensor):
                raise ValueError(f"params: expected tensors or (name, tensor) pairs, got {type(item).__name__}")
            out.append(item)
        return out

    if isinstance(params[0], dict):
        groups = []
        for g in params:
            g = dict(g)
            g["params"] = strip(g["params"] if not isinstance(g["params"], Tensor) else [g["params"]])
            groups.append(g)
        return groups, names
    return strip(params), names


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any ``torch.optim`` optimizer.

    Args:
        params: parameters, named parameters (``model.named_parameters()``) or param-group dicts.
        base_optimizer: an optimizer instance over the same parameters, or an optimizer class built here with
            ``**base_kwargs``.
        rho: radius of the perturbation (>= 0). ``rho=0`` reproduces the base optimizer exactly.
        adaptive: ASAM (Kwon et al., 2021): scale the perturbation element-wise by |w|.
        eps: added to the gradient norm; 1e-7 as in the SSAM paper's code.
        foreach: ``True`` for the multi-tensor ``torch._foreach_*`` kernels, ``False`` for a per-tensor loop; ``None``
            (default) picks foreach on accelerators and the loop on the CPU, as torch.optim does.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eps: float = 1e-7,
        foreach: bool | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(rho, (int, float)) and rho >= 0 and rho == rho and rho != float("inf")):
            raise ValueError(f"rho: got {rho!r}; allowed: a finite number >= 0")
        if not eps >= 0:
            raise ValueError(f"eps: got {eps!r}; allowed: a number >= 0")
        groups, self._param_names = _split_names(params)
        defaults = dict(rho=float(rho), adaptive=bool(adaptive))
        super().__init__(groups, defaults)
        self.eps = float(eps)
        self.foreach = None if foreach is None else bool(foreach)

        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(
                    f"base_optimizer: got an optimizer instance and keyword arguments {sorted(base_kwargs)}; "
                    "pass the arguments when building the instance, or pass the optimizer class"
                )
            ours = {id(p) for g in self.param_groups for p in g["params"]}
            theirs = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
            if ours != theirs:
                raise ValueError(
                    f"base_optimizer: the instance holds {len(theirs)} parameters, {len(theirs & ours)} of them "
                    f"shared with the {len(ours)} given to {type(self).__name__}; allowed: an optimizer over exactly "
                    "the same parameters (or pass the optimizer class)"
                )
            self.base_optimizer = base_optimizer
            for g in base_optimizer.param_groups:
                g.setdefault("rho", float(rho))
                g.setdefault("adaptive", bool(adaptive))
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise ValueError(
                f"base_optimizer: got {base_optimizer!r}; allowed: a torch.optim.Optimizer subclass or instance"
            )
        # One list of groups for both: schedulers and add_param_group act on the pair.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        # Parameters perturbed by the last first_step, with their perturbations, for second_step to undo.
        self._perturbed: tuple[list[Tensor], list[Tensor]] | None = None

    # ------------------------------------------------------------------ hooks for the sparse subclasses
    def _mask_for(self, p: Tensor) -> Tensor | None:
        """The boolean mask applied to p's perturbation; dense SAM has none."""
        return None

    def _check_ready(self) -> None:
        """Raise if the optimizer cannot perturb yet (SSAM-F before its first mask)."""

    # ------------------------------------------------------------------ the two passes
    def _use_foreach(self, tensors: list[Tensor]) -> bool:
        return self.foreach if self.foreach is not None else any(t.device.type != "cpu" for t in tensors)

    def _grad_norm(self, params: list[Tensor], grads: list[Tensor], adaptive: bool) -> Tensor:
        foreach = self._use_foreach(params)
        if adaptive:
            scaled = torch._foreach_mul(grads, torch._foreach_abs(params)) if foreach else [
                g * p.abs() for p, g in zip(params, grads)
            ]
        else:
            scaled = grads
        norms = torch._foreach_norm(scaled) if foreach else [torch.linalg.vector_norm(g) for g in scaled]
        device = norms[0].device
        # Stays a device tensor: no host synchronisation inside the step.
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient from w to w + e."""
        self._check_ready()
        if self._perturbed is not None:
            raise RuntimeError("first_step called twice without second_step; call second_step to restore the weights")
        by_group = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                by_group.append((group, ps, [p.grad for p in ps]))
        all_p = [p for _, ps, _ in by_group for p in ps]
        all_g = [g for _, _, gs in by_group for g in gs]
        if not all_p:
            self._perturbed = ([], [])
            return
        # One norm over every parameter, as in the paper; ASAM takes it of |w| * g.
        adaptive_any = any(g["adaptive"] for g, _, _ in by_group)
        if adaptive_any and not all(g["adaptive"] for g, _, _ in by_group):
            raise ValueError("adaptive: mixed True/False across param groups is not supported; use one value")
        norm = self._grad_norm(all_p, all_g, adaptive_any)

        perturbed_p: list[Tensor] = []
        perturbed_w: list[Tensor] = []
        # As torch.optim does: multi-tensor kernels on accelerators, a per-tensor loop on the CPU (where foreach
        # kernels are loops of the same ops, and the loop can fuse the scale into the add).
        use_foreach = self._use_foreach(all_p)
        for group, ps, gs in by_group:
            if group["rho"] == 0:
                continue
            scale = group["rho"] / (norm + self.eps)
            # Keep w itself, not e: restoring by copy is exact, w + e - e is not.
            saved = [self._buffer(p) for p in ps]
            masks = [self._mask_for(p) for p in ps]
            if use_foreach:
                self._perturb_foreach(ps, gs, saved, masks, scale.to(gs[0].device), group["adaptive"])
            else:
                self._perturb_single(ps, gs, saved, masks, scale, group["adaptive"])
            perturbed_p.extend(ps)
            perturbed_w.extend(saved)
        self._perturbed = (perturbed_p, perturbed_w)
        if zero_grad:
            self.zero_grad()

    def _perturb_foreach(self, ps: list[Tensor], gs: list[Tensor], saved: list[Tensor], masks: list[Tensor | None],
                         scale: Tensor, adaptive: bool) -> None:
        """w <- w + scale * g (* w^2) (* mask) with multi-tensor kernels; the scale stays on the device."""
        torch._foreach_copy_(saved, ps)
        es = torch._foreach_mul(gs, scale)
        if adaptive:
            torch._foreach_mul_(es, torch._foreach_mul(ps, ps))
        masked = [(e, m) for e, m in zip(es, masks) if m is not None]
        if masked:
            # Float times bool lists are not one dtype, so foreach falls back to one kernel per tensor here.
            torch._foreach_mul_([e for e, _ in masked], [m for _, m in masked])
        torch._foreach_add_(ps, es)

    def _perturb_single(self, ps: list[Tensor], gs: list[Tensor], saved: list[Tensor], masks: list[Tensor | None],
                        scale: Tensor, adaptive: bool) -> None:
        """w <- w + scale * g (* w^2) (* mask), one tensor at a time, reusing one scratch buffer.

        On a CPU the scale becomes a Python number (no device to wait for) and fuses into the add; elsewhere it stays
        a device tensor so nothing synchronises. The masked product g * m is exact, so a full mask reproduces dense
        SAM bit for bit.
        """
        host = scale.device.type == "cpu"
        alpha = float(scale) if host else 1.0
        scratch = None
        for p, g, w, m in zip(ps, gs, saved, masks):
            w.copy_(p)
            if m is None and not adaptive and host:
                p.add_(g, alpha=alpha)
                continue
            if scratch is None or scratch.numel() < p.numel() or scratch.dtype != g.dtype or scratch.device != g.device:
                scratch = torch.empty(max(q.numel() for q in ps), dtype=g.dtype, device=g.device)
            e = scratch[:p.numel()].view_as(g)
            if m is not None:
                # A bool mask read as uint8 takes the vectorised mixed-type kernel; as bool it does not.
                torch.mul(g, m.view(torch.uint8), out=e)
            else:
                e.copy_(g)
            if adaptive:
                e.mul_(p).mul_(p)
            if not host:
                e.mul_(scale.to(e.device))
            p.add_(e, alpha=alpha)

    def _buffer(self, p: Tensor) -> Tensor:
        """The persistent copy of w kept during a step (reused every step, so it is allocated once)."""
        st = self.state[p]
        w = st.get("w_saved")
        if w is None or w.shape != p.shape or w.dtype != p.dtype or w.device != p.device:
            w = torch.empty_like(p, memory_format=torch.preserve_format)
            st["w_saved"] = w
        return w

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the last first_step (w + e -> w) without stepping; also used when an fp16 step is skipped."""
        if self._perturbed is None:
            return
        ps, saved = self._perturbed
        if ps:
            if self._use_foreach(ps):
                torch._foreach_copy_(ps, saved)
            else:
                for p, w in zip(ps, saved):
                    p.copy_(w)
        self._perturbed = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to w and let the base optimizer step with the gradient taken at w + e."""
        if self._perturbed is None:
            raise RuntimeError("second_step called without first_step; call first_step after the first backward")
        self.restore()
        self.base_optimizer.step()
        # A scheduler attached to the wrapper watches for wrapper.step(); the two-call path is a step too.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Both passes in one call; ``closure`` runs forward + backward (no zero_grad inside) and returns the loss."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step needs a closure that runs forward + backward; or call "
                "first_step(), then forward + backward, then second_step()"
            )
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        try:
            loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        # The copy of w is scratch space between the passes, not state: leaving it out keeps checkpoints small.
        saved = {p: self.state[p].pop("w_saved") for p in list(self.state) if "w_saved" in self.state[p]}
        try:
            sd = super().state_dict()
        finally:
            for p, e in saved.items():
                self.state[p]["w_saved"] = e
        # super() also reports the shared groups; the base optimizer's copy of them is the one loaded back.
        sd.pop("param_groups", None)
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd["extra"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if "base_optimizer" not in state_dict:
            raise ValueError(
                f"state_dict: missing 'base_optimizer'; allowed: a state_dict from {type(self).__name__}.state_dict()"
            )
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict between first_step and second_step; finish the step first")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups
        # Our own state (masks) is keyed by position in the groups, as in torch.optim.
        params = [p for g in self.param_groups for p in g["params"]]
        own = state_dict.get("state", {})
        self.state.clear()
        for idx, st in own.items():
            idx = int(idx)
            if idx >= len(params):
                raise ValueError(f"state_dict: entry for parameter {idx} but the optimizer has {len(params)}")
            p = params[idx]
            new = {}
            for k, v in st.items():
                if isinstance(v, Tensor):
                    if v.shape != p.shape and k == "mask":
                        raise ValueError(
                            f"state_dict: mask of parameter {idx} has shape {tuple(v.shape)}, the parameter "
                            f"{tuple(p.shape)}; allowed: a state_dict of the same model"
                        )
                    v = v.to(p.device)
                new[k] = v
            self.state[p] = new
        self._load_extra_state(state_dict.get("extra", {}))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def param_name(self, p: Tensor, index: int) -> str:
        return self._param_names.get(id(p), f"param{index}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, rho={self.defaults['rho']})"
