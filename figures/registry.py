"""Every figure of the gallery, in the gallery's order: one import and one line of :data:`FIGURES` per figure file
(``figures/<paper>/<name>.py``, see :mod:`figures.framework`). The figure ids (each module's ``ID``) are a contract:
the JSON and PNG names and the command's arguments."""

from __future__ import annotations

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
    b4_lr_sweep,
    fig2_loss_vs_rank,
    fig3_gradnorm,
    fig6_init_only,
    fig8_other_gammas,
    fig9_activation_moments,
    layer_subset,
    multilayer,
    thm_coordcheck,
    trajectory,
)

# the figure files (ID / PAPER / CLAIM / CRITERION / PROTOCOLS / configs / measure / draw), in the gallery's order
FIGURES = (
    fig1_dropout_mc,  # allora-fig1-dropout-mc
    fig2_grad_std,  # allora-fig2-grad-std
    fig3_norms,  # allora-fig3-norms
    fig4_expected_vs_empirical,  # allora-fig4-expected-vs-empirical
    tab5_dropout_epochs,  # allora-tab5-dropout-epochs
    fig5_escape,  # allora-fig5-escape
    fig6_adaptive_fn,  # allora-fig6-adaptive-fn
    prop1_ripple,  # allora-prop1-ripple
    tab_variants,  # allora-tab-variants
    thm_coordcheck,  # rslora-thm-coordcheck
    fig2_loss_vs_rank,  # rslora-fig2-loss-vs-rank
    fig3_gradnorm,  # rslora-fig3-gradnorm
    fig6_init_only,  # rslora-fig6-init-only
    fig8_other_gammas,  # rslora-fig8-other-gammas
    fig9_activation_moments,  # rslora-fig9-activation-moments
    b4_lr_sweep,  # rslora-b4-lr-sweep
    fig2_channel_corr,  # lowr-fig2-channel-corr
    fig3_with_without,  # lowr-fig3-with-without
    fig4_loss_gradnorm,  # lowr-fig4-loss-gradnorm
    tab5_sensitivity,  # lowr-tab5-sensitivity
    prop41_equivalent,  # lowr-prop41-equivalent
    multilayer,  # rslora-multilayer
    trajectory,  # rslora-trajectory
    layer_subset,  # rslora-layer-subset
    effective_rank,  # lowr-effective-rank
    mechanism,  # lowr-mechanism
    plugin_inits,  # lowr-plugin-inits
    ripple_adaptive,  # allora-ripple-adaptive
    zero_init_a,  # allora-zero-init-a
    tab5_best_epoch,  # allora-tab5-best-epoch
    regularization_like_dropout,  # allora-regularization-like-dropout
)

FIGURE_IDS = tuple(m.ID for m in FIGURES)


def specs() -> dict[str, Spec]:
    """Every figure (id -> Spec), in the gallery's order."""
    if len(set(FIGURE_IDS)) != len(FIGURE_IDS):
        raise ValueError(f"a figure id is listed twice in FIGURES: {FIGURE_IDS}")
    return {m.ID: spec_of(m) for m in FIGURES}
