"""Every figure of the gallery, in the gallery's order: one import and one line of :data:`FIGURES` per figure
file (``figures/<paper>/<name>.py``, see :mod:`figures.framework`). The figure ids are a contract (the JSON and
PNG names, the command's arguments).

Transition (issue 15): figures not yet in their own file are still registered by the ``@figure`` decorator of
their old module, listed in :data:`_OLD_MODULES`; :func:`specs` imports those too.
"""

from __future__ import annotations

import importlib

from figures.allora import (
    fig1_dropout_mc,
    fig2_grad_std,
    fig3_norms,
    fig4_expected_vs_empirical,
    fig5_escape,
    fig6_adaptive_fn,
    prop1_ripple,
    regularization_like_dropout,
    ripple_adaptive,
    tab5_best_epoch,
    tab5_dropout_epochs,
    tab_variants,
    zero_init_a,
)
from figures.framework import Spec, spec_of
from figures.lowr import (
    effective_rank,
    fig2_channel_corr,
    fig3_with_without,
    fig4_loss_gradnorm,
    mechanism,
    plugin_inits,
    prop41_equivalent,
    tab5_sensitivity,
)
from figures.rslora import (
    fig2_loss_vs_rank,
    fig9_activation_moments,
    layer_subset,
    multilayer,
    thm_coordcheck,
    trajectory,
)

# the figure files, each a module with ID / PAPER / CLAIM / CRITERION / PROTOCOLS / configs / measure / draw
FIGURES = (
    fig1_dropout_mc,
    fig2_grad_std,
    fig3_norms,
    fig4_expected_vs_empirical,
    tab5_dropout_epochs,
    fig5_escape,
    fig6_adaptive_fn,
    prop1_ripple,
    tab_variants,
    ripple_adaptive,
    zero_init_a,
    tab5_best_epoch,
    regularization_like_dropout,
    fig2_channel_corr,
    fig3_with_without,
    fig4_loss_gradnorm,
    tab5_sensitivity,
    prop41_equivalent,
    thm_coordcheck,
    fig2_loss_vs_rank,
    fig9_activation_moments,
    effective_rank,
    mechanism,
    plugin_inits,
    multilayer,
    trajectory,
    layer_subset,
)

# the gallery's order of every figure id (the contract)
FIGURE_IDS = (
    "allora-fig1-dropout-mc",
    "allora-fig2-grad-std",
    "allora-fig3-norms",
    "allora-fig4-expected-vs-empirical",
    "allora-tab5-dropout-epochs",
    "allora-fig5-escape",
    "allora-fig6-adaptive-fn",
    "allora-prop1-ripple",
    "allora-tab-variants",
    "rslora-thm-coordcheck",
    "rslora-fig2-loss-vs-rank",
    "rslora-fig3-gradnorm",
    "rslora-fig6-init-only",
    "rslora-fig8-other-gammas",
    "rslora-fig9-activation-moments",
    "rslora-b4-lr-sweep",
    "lowr-fig2-channel-corr",
    "lowr-fig3-with-without",
    "lowr-fig4-loss-gradnorm",
    "lowr-tab5-sensitivity",
    "lowr-prop41-equivalent",
    "rslora-multilayer",
    "rslora-trajectory",
    "rslora-layer-subset",
    "lowr-effective-rank",
    "lowr-mechanism",
    "lowr-plugin-inits",
    "allora-ripple-adaptive",
    "allora-zero-init-a",
    "allora-tab5-best-epoch",
    "allora-regularization-like-dropout",
)

# transition only: old multi-figure modules (in figures/) and the ids they still register with @figure
_OLD_MODULES = ("rslora_unconverted",)

_LEGACY: dict[str, Spec] = {}  # filled by figures.figure (the old decorator)


def specs() -> dict[str, Spec]:
    """Every registered figure (id -> Spec), in the gallery's order."""
    found = {m.ID: spec_of(m) for m in FIGURES}
    for name in _OLD_MODULES:
        try:
            importlib.import_module(f"figures.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"figures.{name}":
                raise
    both = set(found) & set(_LEGACY)
    if both:
        raise ValueError(f"figures registered twice (a figure file and an old module): {sorted(both)}")
    found.update(_LEGACY)
    unknown = set(found) - set(FIGURE_IDS)
    if unknown:
        raise ValueError(f"figures not in FIGURE_IDS: {sorted(unknown)}")
    return {fid: found[fid] for fid in FIGURE_IDS if fid in found}
