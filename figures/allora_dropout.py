"""Transition (issue 15): ALLoRA figs. 1-4 and table 5 have their own files in figures/allora/; these are their
old names, for the tests not yet moved. Removed with the old form."""

from figures.allora.fig1_dropout_mc import CRITERION as FIG1_CRITERION  # noqa: F401
from figures.allora.fig1_dropout_mc import RATES as FIG1_RATES  # noqa: F401
from figures.allora.fig1_dropout_mc import deviations as fig1_deviations  # noqa: F401
from figures.allora.fig1_dropout_mc import noise_test as _fig1_name  # noqa: F401
from figures.allora.fig2_grad_std import CRITERION as FIG2_CRITERION  # noqa: F401
from figures.allora.fig2_grad_std import entry_stats as _entry_stats  # noqa: F401
from figures.allora.fig3_norms import CRITERION as FIG3_CRITERION  # noqa: F401
from figures.allora.fig3_norms import PROTOCOLS as FIG3_PROTOCOLS  # noqa: F401
from figures.allora.fig3_norms import norm_of as fig3_norm  # noqa: F401
from figures.allora.fig4_expected_vs_empirical import CRITERION as FIG4_CRITERION  # noqa: F401
from figures.allora.fig4_expected_vs_empirical import RATES as FIG4_RATES  # noqa: F401
from figures.allora.fig4_expected_vs_empirical import peak_tests as fig4_peak_tests  # noqa: F401
from figures.allora.fig4_expected_vs_empirical import rate_test as _fig4_rate  # noqa: F401
from figures.allora.tab5_dropout_epochs import CRITERION as TAB5_CRITERION  # noqa: F401
