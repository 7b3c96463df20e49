"""ALLoRA and its adaptive variants (ALLoRA sec. 4.2-4.3, fig. 6, app. F listing 1).

Convention (torch.nn.Linear / PEFT): X (N, d_in), A = lora_A (r, d_in), B = lora_B (d_out, r). ALLoRA has no
scaling factor: the adapter output is f = X A^T B^T (N, d_out). G = dL/df (N, d_out) is the gradient that
reaches the adapter; g = G^T X (d_out, d_in) is the gradient of the loss w.r.t. the product BA (the paper's g
with its column convention f(x) = BAx). Plain LoRA with scaling eta has grad_A = eta B^T g, grad_B = eta g A^T.

- ALLoRA (sec. 4.2): the forward is unchanged; row i of g is multiplied by
  s_i = 1 / sqrt(||(BA)_{i,:}||_2 + 1/eta^2) (<= eta, = eta iff that row of BA is 0), and A, B receive the
  chain-rule images of the scaled gradient: grad_A = B^T diag(s) g, grad_B = diag(s) g A^T (listing 1).
  grad_input = G B A is not scaled (sec. 4.2, "we only modify the gradients of A and B").
- ALLoRA-OD (sec. 4.3): per sample and output, S_{n,i} = 1 / sqrt(|f_{n,i}| + 1/eta^2); G~ = S o G,
  grad_A = B^T G~^T X, grad_B = G~^T X A^T.
- ASF-LoRA (sec. 4.3): the output itself is f~ = f / sqrt(|f| + 1/eta^2) elementwise; its gradient is the
  natural one, with derivative (|f|/2 + 1/eta^2) / (|f| + 1/eta^2)^{3/2}.

The printed listing 1 (kept verbatim in :data:`PAPER_LISTING_1`) does not run as printed; the corrected
version is :func:`allora_function` (ERRATA.md, "ALLoRA app. F").
"""

from __future__ import annotations

import numpy as np

from analysis.inputs import as_matrix, finite_scalar

__all__ = [
    "PAPER_LISTING_1",
    "adaptive_function",
    "allora_function",
    "allora_grads",
    "allora_od_grads",
    "allora_od_scale",
    "allora_scale",
    "asf_derivative",
    "asf_output",
    "lora_grads",
]

#: ALLoRA app. F, listing 1, verbatim (line numbers removed). It raises NameError (``LinearLayer2``) and,
#: once that is fixed, only runs for 3-D input (``transpose(1, 2)``). See ``allora_function`` for the fix.
PAPER_LISTING_1 = '''
class ALLoRA(torch.autograd.Function):
    rsq_scale = 1. / 4. # 1 / \\eta^2

    @staticmethod
    def forward(ctx, input_x, weight_A, weight_B):
        output = input_x @ weight_A.t() @ weight_B.t()
        norms = torch.norm(weight_B @ weight_A, dim=1)
        ctx.save_for_backward(input_x, weight_A, weight_B, norms)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input_x, weight_A, weight_B, norms = ctx.saved_tensors
        accelerate = 1. / torch.sqrt(norms + LinearLayer2.rsq_scale)
        grad_input = grad_output @ weight_B @ weight_A
        temp = grad_output.mul(accelerate) @ weight_B
        temp = torch.transpose(temp, 1, 2)
        grad_weight_A = temp @ input_x
        temp = grad_output.mul(accelerate).transpose(1, 2)
        grad_weight_B = temp @ (input_x @ weight_A.t())
        return grad_input, grad_weight_A, grad_weight_B
'''


def _eta(eta) -> float:
    return finite_scalar("eta", eta, positive=True)


def _finite(name: str, value) -> np.ndarray:
    """Any-shape finite float64 array (scalars allowed)."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {type(value).__name__}") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite entries (NaN or inf)")
    return arr


def _adapter(X, A, B, grad_out):
    X = as_matrix("X", X)
    A = as_matrix("A", A, (None, X.shape[1]))
    B = as_matrix("B", B, (None, A.shape[0]))
    G = as_matrix("grad_out", grad_out, (X.shape[0], B.shape[0]))
    return X, A, B, G


def adaptive_function(x, eta: float) -> np.ndarray:
    """1 / sqrt(|x| + 1/eta^2), elementwise (ALLoRA fig. 6); maximum eta at x = 0, ~ |x|^{-1/2} for large |x|.

    Note: sec. 4.2 calls this rate "inversely proportional to ||(BA)_{i,:}||"; it decays like the inverse
    square root (ERRATA.md).
    """
    eta = _eta(eta)
    arr = _finite("x", x)
    return 1.0 / np.sqrt(np.abs(arr) + 1.0 / eta**2)


def allora_scale(A, B, eta: float) -> np.ndarray:
    """s_i = 1 / sqrt(||(BA)_{i,:}||_2 + 1/eta^2), shape (d_out,) (ALLoRA sec. 4.2; listing 1 ``accelerate``)."""
    A = as_matrix("A", A)
    B = as_matrix("B", B, (None, A.shape[0]))
    return adaptive_function(np.linalg.norm(B @ A, axis=1), eta)


def lora_grads(X, A, B, grad_out, scaling: float = 1.0):
    """Plain LoRA backward for f = scaling X A^T B^T: (grad_input, grad_A, grad_B), summed over the batch.

    grad_input = s G B A, grad_A = s B^T G^T X, grad_B = s G^T X A^T.
    """
    X, A, B, G = _adapter(X, A, B, grad_out)
    s = finite_scalar("scaling", scaling)
    g = G.T @ X
    return s * (G @ B) @ A, s * (B.T @ g), s * (g @ A.T)


def allora_grads(X, A, B, grad_out, eta: float):
    """ALLoRA backward (sec. 4.2, listing 1): (grad_input, grad_A, grad_B), summed over the batch.

    grad_input = G B A (unscaled), grad_A = B^T diag(s) G^T X (r, d_in), grad_B = diag(s) G^T X A^T (d_out, r),
    with s = :func:`allora_scale`. Shapes: X (N, d_in), A (r, d_in), B (d_out, r), grad_out = G (N, d_out).
    At B = 0, s = eta and these are LoRA's gradients with scaling eta (the forward output is 0 for both).
    """
    X, A, B, G = _adapter(X, A, B, grad_out)
    s = allora_scale(A, B, eta)
    gs = s[:, None] * (G.T @ X)  # diag(s) g
    return (G @ B) @ A, B.T @ gs, gs @ A.T


def allora_od_scale(f, eta: float) -> np.ndarray:
    """ALLoRA-OD per-sample scale S_{n,i} = 1 / sqrt(|f_{n,i}| + 1/eta^2) for f = X A^T B^T (N, d_out) (sec. 4.3)."""
    return adaptive_function(as_matrix("f", f), eta)


def allora_od_grads(X, A, B, grad_out, eta: float):
    """ALLoRA-OD backward (sec. 4.3): G~ = S o G, grad_A = B^T G~^T X, grad_B = G~^T X A^T, grad_input = G B A.

    Equals :func:`allora_grads` whenever |f_{n,i}| = ||(BA)_{i,:}|| for every n, i (e.g. rank 1 and every x_n = +-a/||a||).
    """
    X, A, B, G = _adapter(X, A, B, grad_out)
    Gt = allora_od_scale(X @ A.T @ B.T, eta) * G
    g = Gt.T @ X
    return (G @ B) @ A, B.T @ g, g @ A.T


def asf_output(f, eta: float) -> np.ndarray:
    """ASF-LoRA output f / sqrt(|f| + 1/eta^2), elementwise (sec. 4.3); odd, increasing, ~ sign(f) sqrt|f|."""
    arr = _finite("f", f)
    return arr / np.sqrt(np.abs(arr) + 1.0 / _eta(eta) ** 2)


def asf_derivative(f, eta: float) -> np.ndarray:
    """d/df [f / sqrt(|f| + c)] = (|f|/2 + c) / (|f| + c)^{3/2}, c = 1/eta^2 (smooth at f = 0, value eta).

    Equals the ALLoRA-OD scale times (|f|/2 + c)/(|f| + c), a factor in (1/2, 1]: ASF-LoRA's natural gradient
    is up to 2x smaller than ALLoRA-OD's for large |f|.
    """
    c = 1.0 / _eta(eta) ** 2
    a = np.abs(_finite("f", f))
    return (a / 2 + c) / (a + c) ** 1.5


def allora_function():
    """The corrected listing 1: a ``torch.autograd.Function``; call ``fn.apply(x, A, B, eta)``.

    Fixes to the printed listing (ERRATA.md, "ALLoRA app. F"): (1) ``LinearLayer2.rsq_scale`` is an undefined
    name -> eta is an argument (1/eta^2 = ``rsq_scale``); (2) ``transpose(1, 2)`` only works for 3-D input
    (IndexError for 2-D, wrong matmul for 4-D) -> the leading dims are flattened and ``.T`` is used; (3) the
    parameter gradients are summed over the batch explicitly (the printed version returns (batch, r, d_in),
    which torch's autograd sum-reduces to (r, d_in), at the cost of a batch-sized temporary).
    x (..., d_in), A (r, d_in), B (d_out, r); output x A^T B^T (..., d_out). torch is imported lazily.
    """
    import torch

    class ALLoRAFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, input_x, weight_A, weight_B, eta):
            output = input_x @ weight_A.t() @ weight_B.t()
            norms = torch.linalg.vector_norm(weight_B @ weight_A, dim=1)
            ctx.save_for_backward(input_x, weight_A, weight_B, norms)
            ctx.rsq_scale = 1.0 / float(eta) ** 2
            return output

        @staticmethod
        def backward(ctx, grad_output):
            input_x, weight_A, weight_B, norms = ctx.saved_tensors
            accelerate = torch.rsqrt(norms + ctx.rsq_scale)
            grad_input = grad_output @ weight_B @ weight_A
            g = grad_output.reshape(-1, grad_output.shape[-1]).mul(accelerate)  # (N, d_out), columns scaled
            x = input_x.reshape(-1, input_x.shape[-1])  # (N, d_in)
            grad_A = (g @ weight_B).T @ x  # B^T diag(s) G^T X
            grad_B = g.T @ (x @ weight_A.T)  # diag(s) G^T X A^T
            return grad_input, grad_A, grad_B, None

    return ALLoRAFunction
