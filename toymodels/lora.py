"""LoRA for the toy models: one layer with every variant the papers discuss, plus LoWR and LoRA+.

Convention (torch.nn.Linear / HF PEFT): x (..., d_in), W = base.weight (d_out, d_in), A = lora_A (r, d_in),
B = lora_B (d_out, r). A LoRA layer computes

    y = x W^T + b + s * drop(x) A^T B^T                      (PEFT, Hu et al. 2021; ALLoRA def. 1)

with s the scaling factor and drop the dropout (p = probability of zeroing, kept entries scaled by
1 / (1 - p); the ALLoRA paper's lambda is the keep probability 1 - p). What this module holds:

- :class:`LoRALinear` wraps a frozen ``nn.Linear``. ``method`` names its variant, a registered
  :class:`LoRAVariant` (the PEFT way, ``peft.tuners.lora.variants``: each variant owns its scaling, its extra
  initialisation, its forward and its merge; :data:`VARIANTS` maps a name to it, :func:`register_variant` adds one):
    "lora"      (:class:`LoRA`) the layer above; ``scaling`` = "lora" (alpha / r), "rslora" (alpha / sqrt(r), rsLoRA
                eq. (4), thm. 3.2), a float, or a callable r -> s (rsLoRA app. B.6, eqs. (12)-(13):
                r^-1/4 and r^-2).
    "dora"      (:class:`DoRA`) DoRA as PEFT implements it (peft/tuners/lora/dora.py):
                W' = m * (W + s BA) / ||W + s BA||_row with the norm detached from the graph (DoRA sec. 4.3).
    "allora"    (:class:`ALLoRA`) ALLoRA (ALLoRA sec. 4.2, listing 1): no scaling factor and no dropout; the
                gradient of BA, g = G^T x, has its row i scaled by s_i = 1 / sqrt(||(BA)_{i,:}|| + 1/eta^2) in the
                parameter gradients only; the input gradient is the plain G B A.
    "allora+d"  (:class:`ALLoRAWithDropout`) ALLoRA with dropout (ALLoRA sec. 4.4, table 2 right), at the
                configured placement.
    "allora_od" (:class:`ALLoRAOD`) ALLoRA-OD (sec. 4.3): the per-sample scale 1 / sqrt(|f(x)_{n,i}| + 1/eta^2),
                f = x A^T B^T.
    "asf"       (:class:`ASFLoRA`) ASF-LoRA (sec. 4.3): output f / sqrt(|f| + 1/eta^2) elementwise, natural
                gradient; not mergeable.
- ``dropout_placement``: "input" (PEFT and the original LoRA code: dropout on x before A) or "bottleneck"
  (ALLoRA eq. 1: dropout on x A^T, one mask entry per sample and rank). The papers analyse the bottleneck;
  PEFT implements the input placement. Their gradients differ; only the input placement matches PEFT.
- :class:`LoWR` rescales (a_i, b_i) -> (gamma_i a_i, b_i / gamma_i) after optimizer steps (LoWR alg. 1, eq. 12).
- :func:`lora_plus_param_groups` gives B a learning rate ``ratio`` times A's (LoRA+, used with LoWR in LoWR app. A.3).
- :func:`inject_lora` swaps chosen ``nn.Linear`` layers of a model for :class:`LoRALinear`.

Where the papers' printed formulas or code are wrong, see ERRATA.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from analysis import inputs as analysis_inputs
from analysis.inputs import dropout_rate, finite_scalar, lowr_tau, positive_int

SCALINGS = ("lora", "rslora")
INITS = ("kaiming", "gaussian", "zero_a", "pissa", "olora")
PLACEMENTS = analysis_inputs.PLACEMENTS  # one list of dropout placements: analysis.inputs.PLACEMENTS
DECOMPOSITION_INITS = ("pissa", "olora")  # set A and B from the SVD / QR of W (LoWR table 2)
LORA_PARAMETER_NAMES = ("lora_A", "lora_B", "lora_magnitude")


def _choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def scaling_factor(scaling: str | float | Callable[[int], float], alpha: float, r: int) -> float:
    """The factor s multiplying BA: "lora" alpha / r, "rslora" alpha / sqrt(r) (rsLoRA eq. (4)), a float s,
    or a callable r -> s (e.g. ``lambda r: r ** -0.25``, rsLoRA app. B.6 eq. (12)); alpha is used only by the
    two named rules."""
    r = positive_int("r", r)
    if isinstance(scaling, str):
        _choice("scaling", scaling, SCALINGS)
        alpha = finite_scalar("alpha", alpha)
        return alpha / r if scaling == "lora" else alpha / math.sqrt(r)
    if callable(scaling):
        return finite_scalar("scaling", scaling(r))
    if isinstance(scaling, bool):
        raise ValueError(f"scaling must be one of {SCALINGS}, a number or a callable of r, got {scaling!r}")
    return finite_scalar("scaling", scaling)


# ----------------------------------------------------------------------------------------------------------
# ALLoRA and ALLoRA-OD: a custom backward that rescales the parameter gradients only


class AdaptiveLoRAFunction(torch.autograd.Function):
    """f = ((h A^T) * M) B^T with ALLoRA's (or ALLoRA-OD's) adapted parameter gradients.

    h (..., d_in) is the adapter input (already input-dropped out if so configured), M (..., r) the bottleneck
    mask or None. With G = dL/df (..., d_out), z = (h A^T) * M, and S the gradient scale,

        ALLoRA    (sec. 4.2): S_{n,i} = s_i = 1 / sqrt(||(BA)_{i,:}||_2 + 1/eta^2)   (one scale per output row)
        ALLoRA-OD (sec. 4.3): S_{n,i} = 1 / sqrt(|f_{n,i}| + 1/eta^2)               (one scale per sample entry)

    the backward returns, summed over every leading (batch) dimension,

        grad_B = (G * S)^T z                     (d_out, r)
        grad_A = (((G * S) B) * M)^T h            (r, d_in)
        grad_h = ((G B) * M) A                    (..., d_in)   -- not rescaled (sec. 4.2, last paragraph)

    For ALLoRA without dropout this is grad_B = g A^T, grad_A = B^T g with g = diag(s) G^T h, the gradient of
    BA with row i scaled by s_i: exactly the paper's tilde g. The norm in s_i is taken in forward and treated as
    a constant, as in listing 1. Compared with listing 1 (App. F) this fixes the undefined ``LinearLayer2``
    (the class constant), accepts 2-D input (the listing's ``transpose(1, 2)`` fails on it and mixes axes on
    4-D input) and forms the summed parameter gradients directly instead of per-batch ones.
    """

    @staticmethod
    def forward(ctx, h, A, B, mask, eta: float, per_sample: bool):
        z = h @ A.T
        if mask is not None:
            z = z * mask
        f = z @ B.T
        floor = 1.0 / eta**2
        if per_sample:
            scale = torch.rsqrt(f.abs() + floor)
        else:
            scale = torch.rsqrt(torch.linalg.vector_norm(B @ A, dim=1) + floor)
        ctx.save_for_backward(h, A, B, mask, z, scale)
        return f

    @staticmethod
    def backward(ctx, grad_f):
        h, A, B, mask, z, scale = ctx.saved_tensors
        (d_out, r), d_in = B.shape, A.shape[1]
        grad_h = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_f @ B
            grad_h = (grad_z if mask is None else grad_z * mask) @ A
        scaled = grad_f * scale
        if ctx.needs_input_grad[1]:
            grad_z = scaled @ B
            if mask is not None:
                grad_z = grad_z * mask
            grad_A = grad_z.reshape(-1, r).T @ h.reshape(-1, d_in)
        if ctx.needs_input_grad[2]:
            grad_B = scaled.reshape(-1, d_out).T @ z.reshape(-1, r)
        return grad_h, grad_A, grad_B, None, None, None


def adaptive_scaling(f: torch.Tensor, eta: float) -> torch.Tensor:
    """ASF-LoRA's output adaptor (ALLoRA sec. 4.3): f / sqrt(|f| + 1/eta^2), elementwise.

    It equals eta * f at f = 0 (LoRA with scaling eta) and grows like sqrt(|f|) for large |f|. Its gradient is
    the natural one through autograd (torch takes d|f|/df = 0 at f = 0).
    """
    return f * torch.rsqrt(f.abs() + 1.0 / eta**2)


# ----------------------------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a rank-r adapter ``lora_B @ lora_A`` (see the module docstring for methods).

    Args:
        base: the pretrained ``nn.Linear``; its parameters are frozen (requires_grad=False) and kept as is.
        r: the rank (>= 1).
        alpha: used by the named scalings only: "lora" s = alpha / r, "rslora" s = alpha / sqrt(r).
            Default 8, PEFT's ``lora_alpha`` default.
        scaling: "lora" (default, alpha / r), "rslora", a float or a callable r -> s (None means "lora"). The
            adaptive methods have no scaling factor (s = 1): they accept the default and reject any other value.
        dropout: p, the probability of zeroing, in [0, 1). "allora" requires 0 (use "allora+d").
        dropout_placement: "input" (PEFT: on x before A) or "bottleneck" (ALLoRA eq. 1: on x A^T).
        method: the name of a registered :class:`LoRAVariant` (:data:`VARIANTS`: "lora", "dora", "allora",
            "allora+d", "allora_od", "asf").
        eta: the ALLoRA family's eta > 0 (scale eta at BA = 0; listing 1 uses 1/eta^2 = 1/4). Ignored by
            lora and dora.
        init: A's initialisation, "kaiming" (PEFT's default: ``kaiming_uniform_(A, a=sqrt(5))``, i.e.
            U(-1/sqrt(d_in), 1/sqrt(d_in)), variance 1/(3 d_in), independent of r) or "gaussian" (PEFT's
            init_lora_weights="gaussian": N(0, (1/r)^2)) or "zero_a" (the swapped initialisation of ALLoRA
            sec. 3.2, "if A is zero-initialised instead": A = 0 and B's entries iid U(-1/sqrt(d_in), 1/sqrt(d_in)),
            the law of PEFT's A entries, so E[B B^T] = E[A^T A]-scale r/(3 d_in) I and the first SGD step's
            expected product update equals the usual init's; ``rank_scaled_init`` then scales B, b_init_std
            must be 0), or "pissa" / "olora" (PEFT's PiSSA and OLoRA: A and B from the SVD / QR of W, the frozen
            weight replaced by the residual W - s BA; see :meth:`_decomposition_init`).
        rank_scaled_init: multiply A's initial values by 1/sqrt(r) (rsLoRA app. B.3), with any scaling.
        b_init_std: B's initial entries are N(0, b_init_std^2); 0 (default) gives LoRA's B = 0.
        generator: torch.Generator for the initialisation (default: the global RNG).

    Parameters: ``lora_A`` (r, d_in), ``lora_B`` (d_out, r) and, for DoRA, ``lora_magnitude`` (d_out,),
    initialised to ||W + s BA||_row as PEFT does. Dropout is the submodule ``lora_dropout`` (``nn.Dropout``,
    or ``nn.Identity`` when p = 0, as PEFT); while the attribute ``mask_stream`` holds a
    :class:`toymodels.masks.MaskStream` (the training loop sets it for its steps' forward passes), a training-mode
    forward draws its mask from that stream instead of torch's global RNG (the same law: kept with probability
    1 - p, scaled by 1 / (1 - p)).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float = 8.0,
        *,
        scaling: str | float | Callable[[int], float] | None = "lora",
        dropout: float = 0.0,
        dropout_placement: str = "input",
        method: str = "lora",
        eta: float = 1.0,
        init: str = "kaiming",
        rank_scaled_init: bool = False,
        b_init_std: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
        self.r = positive_int("r", r)
        if not isinstance(method, str) or method not in VARIANTS:
            raise ValueError(f"method must be one of {tuple(VARIANTS)}, got {method!r}")
        self.method = method
        self.variant = VARIANTS[method]
        self.dropout_placement = _choice("dropout_placement", dropout_placement, PLACEMENTS)
        self.init = _choice("init", init, INITS)
        self.p = dropout_rate(dropout, name="dropout")
        self.eta = finite_scalar("eta", eta, positive=True)
        self.alpha = finite_scalar("alpha", alpha)
        b_init_std = finite_scalar("b_init_std", b_init_std, nonnegative=True)
        self.variant.check(self)
        self.scaling = self.variant.scaling(self, scaling)

        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)
        d_out, d_in = base.weight.shape
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(self.r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(d_out, self.r, **factory))
        self.lora_dropout = nn.Dropout(self.p) if self.p > 0 else nn.Identity()
        self.mask_stream = None  # a toymodels.masks.MaskStream while the training loop's step runs (see _dropout)
        with torch.no_grad():
            if self.init == "zero_a":  # A = 0, B random with the law of PEFT's A entries (ALLoRA sec. 3.2)
                if b_init_std > 0:
                    raise ValueError(f"b_init_std must be 0 with init='zero_a' (B is drawn by the init), "
                                     f"got {b_init_std}")
                bound = 1.0 / math.sqrt(d_in)
                nn.init.zeros_(self.lora_A)
                nn.init.uniform_(self.lora_B, -bound, bound, generator=generator)
                if rank_scaled_init:
                    self.lora_B.mul_(1.0 / math.sqrt(self.r))
            elif self.init in DECOMPOSITION_INITS:
                self._decomposition_init(b_init_std, rank_scaled_init)
            elif self.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.r, generator=generator)
            if self.init in ("kaiming", "gaussian"):
                if rank_scaled_init:
                    self.lora_A.mul_(1.0 / math.sqrt(self.r))
                if b_init_std > 0:
                    nn.init.normal_(self.lora_B, std=b_init_std, generator=generator)
                else:
                    nn.init.zeros_(self.lora_B)
        self.variant.init(self)

    def _decomposition_init(self, b_init_std: float, rank_scaled_init: bool) -> None:
        """PiSSA / OLoRA (the initialisations of LoWR table 2), as HF PEFT's ``pissa_init`` / ``olora_init``:

        - "pissa" (Meng et al. 2024): W = U diag(S) V^T (SVD, S descending); A = diag(sqrt(S_r / s)) V_r^T (r, d_in),
          B = U_r diag(sqrt(S_r / s)) (d_out, r), so s B A = U_r diag(S_r) V_r^T is the top-r SVD part of W;
        - "olora" (Buyukakyuz 2024): W = Q R (reduced QR); B = Q[:, :r] (orthonormal columns), A = R[:r, :]
          (upper trapezoidal), so s B A = s Q_r R_r;

        and the frozen base weight becomes the residual W - s B A (in place, as PEFT), so the layer's function is
        unchanged at initialisation. Deterministic (no generator). Needs r <= min(d_out, d_in); computed in float64.
        """
        if not self.variant.linear_in_ba:
            raise ValueError(f"init={self.init!r} needs a layer linear in BA (the residual W - s BA must restore W); "
                             f"method {self.method!r} is not")
        if b_init_std > 0 or rank_scaled_init:
            raise ValueError(f"init={self.init!r} sets both factors from W: b_init_std must be 0 and "
                             f"rank_scaled_init False, got {b_init_std}, {rank_scaled_init}")
        d_out, d_in = self.base.weight.shape
        if self.r > min(d_out, d_in):
            raise ValueError(f"r must be <= min(d_out, d_in) = {min(d_out, d_in)} for init={self.init!r}, "
                             f"got {self.r}")
        W = self.base.weight.detach().to(torch.float64)
        s = float(self.scaling)
        if not s > 0:
            raise ValueError(f"init={self.init!r} needs a scaling > 0, got {s}")
        if self.init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            root = torch.sqrt(S[: self.r] / s)
            A = root.unsqueeze(1) * Vh[: self.r]
            B = U[:, : self.r] * root.unsqueeze(0)
        else:
            Q, R = torch.linalg.qr(W)
            A, B = R[: self.r], Q[:, : self.r]
        self.lora_A.copy_(A.to(self.lora_A.dtype))
        self.lora_B.copy_(B.to(self.lora_B.dtype))
        self.base.weight.copy_((W - s * (B @ A)).to(self.base.weight.dtype))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return (f"r={self.r}, method={self.method!r}, scaling={self.scaling:.6g}, dropout={self.p}, "
                f"dropout_placement={self.dropout_placement!r}, eta={self.eta}")

    # -- DoRA ----------------------------------------------------------------------------------------------

    def weight_norm(self) -> torch.Tensor:
        """||W + s BA||_row (d_out,): DoRA's column norm in its (d_in, d_out) layout, detached (DoRA sec. 4.3)."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.base.weight + self.scaling * (self.lora_B @ self.lora_A), dim=1)

    def reset_magnitude(self) -> None:
        """Set DoRA's magnitude m to ||W + s BA||_row, so that the layer starts at W + s BA (PEFT's init)."""
        if not isinstance(self.variant, DoRA):
            raise ValueError(f"method must be 'dora' to have a magnitude, got {self.method!r}")
        with torch.no_grad():
            self.lora_magnitude.copy_(self.weight_norm())

    # -- forward -------------------------------------------------------------------------------------------

    def _dropout(self, t: torch.Tensor) -> torch.Tensor:
        """drop(t): ``lora_dropout(t)``, or t times the next mask of ``mask_stream`` when one is set (training mode,
        p > 0; the product ``input * mask`` as nn.Dropout computes it)."""
        if self.mask_stream is None or self.p == 0 or not self.training:
            return self.lora_dropout(t)
        return t * self.mask_stream.draw(tuple(t.shape), self.p, t.dtype, t.device)

    def _bottleneck_mask(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
        """The scaled Bernoulli mask of the bottleneck x A^T, or None when no dropout acts."""
        if self.dropout_placement != "bottleneck" or isinstance(self.lora_dropout, nn.Identity) or not self.training:
            return None
        return self._dropout(torch.ones(shape, dtype=like.dtype, device=like.device))

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """h, what A sees: drop(x) for the input placement (PEFT), x for the bottleneck."""
        return self._dropout(x) if self.dropout_placement == "input" else x

    def lora_output(self, h: torch.Tensor) -> torch.Tensor:
        """f = drop?(h A^T) B^T, the unscaled adapter output (the bottleneck placement drops h A^T)."""
        z = h @ self.lora_A.T
        if self.dropout_placement == "bottleneck":
            z = self._dropout(z)
        return z @ self.lora_B.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.variant.forward(self, x)

    # -- merging -------------------------------------------------------------------------------------------

    def merged_weight(self) -> torch.Tensor:
        """The single matrix W' (d_out, d_in) with forward(x) = x W'^T + b in eval mode (the variant's
        :meth:`LoRAVariant.merged_weight`: lora W + s BA; dora diag(m / ||W + s BA||_row) (W + s BA); the ALLoRA
        family W + BA; asf cannot be merged)."""
        with torch.no_grad():
            return self.variant.merged_weight(self)


# ----------------------------------------------------------------------------------------------------------
# The variants: each owns its scaling, its extra initialisation, its forward and its merge


class LoRAVariant:
    """One LoRA method, as a registered object (PEFT's ``LoraVariant``: ``init`` / ``forward`` / ``merge``).

    A variant is stateless: its hooks take the :class:`LoRALinear` (``layer``), which holds the parameters
    (``lora_A`` (r, d_in), ``lora_B`` (d_out, r), any extra ones the variant's :meth:`init` adds) and the options
    (``r``, ``alpha``, ``p``, ``dropout_placement``, ``eta``, ``init``). Adding a variant is one subclass and one
    :func:`register_variant`; its ``name`` is then a valid ``method`` of :class:`LoRALinear` and of
    :class:`toymodels.config.FinetuneConfig` (the name enters the run-cache key).

    Class attributes: ``name``; ``linear_in_ba`` (the output is linear in BA: the decomposition inits, which
    replace W by the residual W - s BA, restore W only then).
    """

    name: str = ""
    linear_in_ba: bool = True

    def check(self, layer: LoRALinear) -> None:
        """Reject options the variant does not support (ValueError naming the argument)."""

    def scaling(self, layer: LoRALinear, scaling) -> float:
        """The factor s multiplying BA (:func:`scaling_factor`; None means "lora")."""
        return scaling_factor("lora" if scaling is None else scaling, layer.alpha, layer.r)

    def init(self, layer: LoRALinear) -> None:
        """Create the variant's extra parameters, after A and B are initialised (none by default)."""

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """The layer's output: x W^T + b + s f, f = drop?(h A^T) B^T (LoRA, Hu et al. 2021; ALLoRA def. 1)."""
        result = layer.base(x)
        return result + layer.scaling * layer.lora_output(layer.adapter_input(x))

    def merged_weight(self, layer: LoRALinear) -> torch.Tensor:
        """W' with forward(x) = x W'^T + b in eval mode: W + s BA (called under ``torch.no_grad``)."""
        return layer.base.weight + layer.scaling * (layer.lora_B @ layer.lora_A)


#: name -> the registered variant (insertion order: the built-ins as listed in the module docstring)
VARIANTS: dict[str, LoRAVariant] = {}


def register_variant(cls: type[LoRAVariant]) -> type[LoRAVariant]:
    """Register a :class:`LoRAVariant` subclass under its ``name`` (usable as a class decorator); returns it."""
    if not (isinstance(cls, type) and issubclass(cls, LoRAVariant)):
        raise ValueError(f"cls must be a LoRAVariant subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"cls.name must be a non-empty string, got {cls.name!r}")
    if cls.name in VARIANTS:
        raise ValueError(f"a variant named {cls.name!r} is already registered ({type(VARIANTS[cls.name]).__name__})")
    VARIANTS[cls.name] = cls()
    return cls


@register_variant
class LoRA(LoRAVariant):
    """LoRA (Hu et al. 2021; PEFT ``LoraLayer``): y = x W^T + b + s drop?(x) A^T B^T, any scaling rule."""

    name = "lora"


@register_variant
class DoRA(LoRAVariant):
    """DoRA as PEFT implements it (peft/tuners/lora/dora.py): a magnitude m (d_out,), initialised to
    ||W + s BA||_row, and W' = diag(m / ||W + s BA||_row) (W + s BA) with the norm detached (DoRA sec. 4.3)."""

    name = "dora"

    def init(self, layer: LoRALinear) -> None:
        weight = layer.base.weight
        layer.lora_magnitude = nn.Parameter(torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device))
        layer.reset_magnitude()

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        # result + (m/n - 1) * h W^T + (m/n) * s * f, with n detached. Without dropout (or in eval) this is
        # b + x W'^T with W' = diag(m/n) (W + s BA); with input dropout PEFT feeds the dropped-out h to both the
        # adapter and the W-part of the rescaling, and so does this layer.
        result = layer.base(x)
        h = layer.adapter_input(x)
        f = layer.lora_output(h)
        mag_norm_scale = layer.lora_magnitude / layer.weight_norm()
        return result + (mag_norm_scale - 1) * F.linear(h, layer.base.weight) + mag_norm_scale * (layer.scaling * f)

    def merged_weight(self, layer: LoRALinear) -> torch.Tensor:
        weight = super().merged_weight(layer)
        return (layer.lora_magnitude / layer.weight_norm()).unsqueeze(1) * weight


class _Adaptive(LoRAVariant):
    """The ALLoRA family (ALLoRA sec. 4): no scaling factor (s = 1; ``scaling`` must stay at its default), eta."""

    def scaling(self, layer: LoRALinear, scaling) -> float:
        if scaling not in (None, "lora"):  # "lora" is the signature's default: accepted and ignored
            raise ValueError(f"scaling must be left at its default for method {layer.method!r}: the ALLoRA "
                             f"family has no scaling factor (ALLoRA sec. 4.2), got {scaling!r}")
        return 1.0


@register_variant
class ALLoRA(_Adaptive):
    """ALLoRA (sec. 4.2, listing 1): f = h A^T B^T with the parameter gradients of BA's row i scaled by
    1 / sqrt(||(BA)_{i,:}|| + 1/eta^2) (:class:`AdaptiveLoRAFunction`); no dropout (see "allora+d"). Merges to
    W + BA (its output adaptor is the identity)."""

    name = "allora"
    per_sample = False

    def check(self, layer: LoRALinear) -> None:
        if layer.p > 0:
            raise ValueError(f"dropout must be 0 for method 'allora' (ALLoRA removes dropout), got {layer.p!r}; "
                             "use method='allora+d' for ALLoRA with dropout")

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        result = layer.base(x)
        h = layer.adapter_input(x)
        mask = layer._bottleneck_mask(x.shape[:-1] + (layer.r,), x)
        return result + AdaptiveLoRAFunction.apply(h, layer.lora_A, layer.lora_B, mask, layer.eta, self.per_sample)


@register_variant
class ALLoRAWithDropout(ALLoRA):
    """ALLoRA with dropout at the configured placement (ALLoRA sec. 4.4, table 2 right)."""

    name = "allora+d"

    def check(self, layer: LoRALinear) -> None:
        pass


@register_variant
class ALLoRAOD(ALLoRAWithDropout):
    """ALLoRA-OD (sec. 4.3): the per-sample gradient scale 1 / sqrt(|f_{n,i}| + 1/eta^2), f = x A^T B^T."""

    name = "allora_od"
    per_sample = True


@register_variant
class ASFLoRA(_Adaptive):
    """ASF-LoRA (sec. 4.3): output f / sqrt(|f| + 1/eta^2) elementwise (:func:`adaptive_scaling`), natural
    gradient; not mergeable (the output adaptor is nonlinear)."""

    name = "asf"
    linear_in_ba = False

    def forward(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        result = layer.base(x)
        return result + adaptive_scaling(layer.lora_output(layer.adapter_input(x)), layer.eta)

    def merged_weight(self, layer: LoRALinear) -> torch.Tensor:
        raise ValueError(f"method {layer.method!r} cannot be merged: ASF-LoRA's output f / sqrt(|f| + 1/eta^2) is "
                         "nonlinear in x (ALLoRA sec. 4.3)")


METHODS = tuple(VARIANTS)  # the built-in variants (a variant registered later is in VARIANTS)
ADAPTIVE_METHODS = tuple(n for n, v in VARIANTS.items() if isinstance(v, _Adaptive))  # no scaling factor


# ----------------------------------------------------------------------------------------------------------
# Applying LoRA to a model, LoRA+ parameter groups


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target_modules: the qualified name equals the target or ends with '.target'."""
    return name == target or name.endswith("." + target)


def inject_lora(model: nn.Module, targets: str | Iterable[str], *, freeze_others: bool = True, **cfg) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` whose qualified name matches a target by ``LoRALinear(it, **cfg)``.

    Targets match as PEFT's ``target_modules`` list does (name == target or name ends with "." + target). With
    ``freeze_others`` every parameter that is not a LoRA parameter gets requires_grad=False, as PEFT does. The
    model is changed in place and returned. A target that matches no ``nn.Linear``, or that matches another kind
    of module, raises ValueError.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty list of module names, got {targets!r}")
    found = {t: 0 for t in targets}
    chosen = []
    for name, module in model.named_modules():
        hits = [t for t in targets if _matches(name, t)]
        if not hits:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"targets: module {name!r} matches {hits} but is a {type(module).__name__}, "
                             "not an nn.Linear")
        for t in hits:
            found[t] += 1
        chosen.append(name)
    missing = [t for t, n in found.items() if n == 0]
    if missing:
        raise ValueError(f"targets {missing} match no nn.Linear of the model")
    if freeze_others:
        for param in model.parameters():
            param.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), **cfg))
    return model


def lora_modules(model: nn.Module | Iterable[LoRALinear]) -> list[LoRALinear]:
    """The LoRALinear layers of a model (or of an iterable of layers), in module order."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else list(model)
    found = [m for m in modules if isinstance(m, LoRALinear)]
    if not found:
        raise ValueError("modules contain no LoRALinear layer")
    return found


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float, **group_options) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024; LoWR app. A.3): lora_B at lr * ratio.

    Every trainable parameter whose qualified name has a ``lora_B`` component goes to the group
    {"name": "lora_B", "lr": lr * ratio}; every other trainable parameter (lora_A, DoRA's magnitude, an
    unfrozen head) to {"name": "default", "lr": lr}. ``group_options`` (e.g. weight_decay) go to both groups.
    Pass the result to any torch optimizer: ``torch.optim.AdamW(lora_plus_param_groups(model, 1e-4, 16))``.
    """
    lr = finite_scalar("lr", lr, positive=True)
    ratio = finite_scalar("ratio", ratio, positive=True)
    default, lora_b = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (lora_b if "lora_B" in name.split(".") else default).append(param)
    if not lora_b:
        raise ValueError("model has no trainable lora_B parameter")
    groups = [{"params": lora_b, "lr": lr * ratio, "name": "lora_B", **group_options}]
    if default:
        groups.insert(0, {"params": default, "lr": lr, "name": "default", **group_options})
    return groups


# ----------------------------------------------------------------------------------------------------------
# LoWR: rescaling the channels between A and B after optimizer steps


def lowr_gamma(A: torch.Tensor, B: torch.Tensor, *, tau: float, alpha: float) -> torch.Tensor:
    """LoWR's per-channel ratio gamma (r,) (LoWR eq. 12, Algorithm 1 lines 4-6).

    With a_i = ||A_{i,:}||, b_i = ||B_{:,i}|| and c_i = a_i b_i,

        gamma_i = 1 + alpha * (max_j b_j - b_i) * Var_j(c_j)   if a_i / b_i < tau (and b_i > 0),  else 1,

    Var the population variance (ddof = 0) over the r channels. Algorithm 1 loops over channels, updating each
    in turn; the loop equals this simultaneous form because c_i is invariant under (a_i, b_i) -> (gamma a_i,
    b_i / gamma) and the channel attaining max b has gamma = 1, so neither Var(c) nor max b changes in the loop.
    Line 5 of Algorithm 1 reuses the letter r (the rank) for alpha (max b - b_i) Var(c).
    """
    a = torch.linalg.vector_norm(A, dim=1)
    b = torch.linalg.vector_norm(B, dim=0)
    spread = torch.var(a * b, correction=0)
    gamma = 1.0 + alpha * (b.max() - b) * spread
    positive = b > 0
    ratio = torch.where(positive, a / torch.where(positive, b, torch.ones_like(b)), torch.full_like(a, math.inf))
    return torch.where(positive & (ratio < tau), gamma, torch.ones_like(gamma))


class LoWR:
    """LoRA Weight Rescaling (LoWR Algorithm 1) as a plug-in: call :meth:`step` after ``optimizer.step()``.

    Every ``every`` calls it rescales each LoRA layer in place, A_{i,:} <- gamma_i A_{i,:} and B_{:,i} <- B_{:,i}
    / gamma_i (:func:`lowr_gamma`), which leaves BA, and so the function of every method (LoRA, DoRA, the ALLoRA
    family, ASF), unchanged up to rounding. Like the paper, it touches only the parameters: an optimizer's state
    (Adam's moments) stays in the old coordinates, so the next updates of the rescaled channels differ from
    those of a freshly started optimizer. The paper rescales after every step and also reports every 5 steps
    (app. A.2, table 5); it searches tau in {inf, 10, 100} and alpha in {1e-4 ... 1}.

    Args: modules (a model or LoRALinear layers), tau > 0 (``math.inf`` allowed), alpha >= 0, every >= 1.
    """

    def __init__(self, modules: nn.Module | Iterable[LoRALinear], tau: float, alpha: float, every: int = 1):
        self.tau = lowr_tau(tau)
        self.alpha = finite_scalar("alpha", alpha, nonnegative=True)
        self.every = positive_int("every", every)
        self.modules = lora_modules(modules)
        self.calls = 0

    @torch.no_grad()
    def step(self) -> int:
        """Count one optimizer step; on every ``every``-th, rescale. Returns the number of channels rescaled."""
        self.calls += 1
        if self.calls % self.every:
            return 0
        rescaled = 0
        for module in self.modules:
            gamma = lowr_gamma(module.lora_A, module.lora_B, tau=self.tau, alpha=self.alpha)
            module.lora_A.mul_(gamma.unsqueeze(1))
            module.lora_B.div_(gamma.unsqueeze(0))
            rescaled += int((gamma != 1).sum())
        return rescaled


def adapter_output(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter's contribution to the layer's output (call in eval mode: no dropout), for every method."""
    return layer(x) - layer.base(x)
