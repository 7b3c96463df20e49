"""Issue 16's declarations, checked on every registered figure: each claim test says where its margin comes from
(the paper or theory, never our data), each training figure is judged under >= 4 protocols, and each figure either
names the paper's protocol or marks the plausible ones (the headline policy, figures.framework.HEADLINE_POLICY).

``PENDING_*`` list the figures not converted yet; they must be EMPTY before the criteria are frozen
(``test_nothing_pending_at_the_freeze`` fails once the frozen registry exists and something is still pending)."""

from __future__ import annotations

from pathlib import Path

import pytest

from figures import registry
from figures.framework import Context, Unavailable

SPECS = registry.specs()
# shrink these as the figure files are converted (issue 16); never add to them
PENDING_MARGINS: set[str] = set()
PENDING_PROTOCOLS: set[str] = set()
PENDING_HEADLINE: set[str] = set()


def _trains(spec) -> bool:
    primary = next(p for p in spec.protocols if p.primary)
    try:
        return bool(spec.configs(Context(fidelity="quick", seeds=(0, 1)).with_protocol(primary)))
    except Unavailable:
        pytest.skip(f"{spec.id}: a data set is not available here")


@pytest.mark.parametrize("fig_id", sorted(SPECS))
def test_every_claim_test_declares_where_its_margin_comes_from(fig_id):
    spec = SPECS[fig_id]
    missing = [t.name for t in spec.criterion.tests if t.needs_margin_source and not t.margin_from]
    if fig_id in PENDING_MARGINS:
        pytest.skip(f"{fig_id}: not converted yet (issue 16 item 3)")
    assert not missing, f"{fig_id}: claim tests without margin_from: {missing}"
    for t in spec.criterion.tests:
        if t.margin_from:
            assert t.why, f"{fig_id}: {t.name} says margin_from={t.margin_from!r} but not why (which number)"


@pytest.mark.parametrize("fig_id", sorted(SPECS))
def test_every_training_claim_has_at_least_four_protocols(fig_id):
    spec = SPECS[fig_id]
    if spec.kind == "check" or not _trains(spec):
        return
    if fig_id in PENDING_PROTOCOLS:
        pytest.skip(f"{fig_id}: not converted yet (issue 16 item 5)")
    assert len(spec.protocols) >= 4, f"{fig_id}: {len(spec.protocols)} protocols"


@pytest.mark.parametrize("fig_id", sorted(SPECS))
def test_every_training_claim_names_its_headline_protocols(fig_id):
    spec = SPECS[fig_id]
    if spec.kind == "check" or not _trains(spec):
        return
    if fig_id in PENDING_HEADLINE:
        pytest.skip(f"{fig_id}: not converted yet (issue 16 item 4)")
    primary = next(p for p in spec.protocols if p.primary)
    plausible = [p for p in spec.protocols if p.plausible]
    assert primary.paper or len(plausible) >= 2, f"{fig_id}: neither a paper protocol nor >= 2 plausible ones"
    for p in [primary, *plausible]:
        if p.paper or p.plausible:
            assert p.note, f"{fig_id}: protocol {p.name} is marked paper/plausible without saying where the paper says so"


def test_nothing_frozen_is_pending():
    """A figure enters the frozen registry only once its declarations are complete (the lead freezes paper by paper)."""
    import json

    frozen = Path(registry.__file__).with_name("FROZEN.json")
    if not frozen.exists():
        pytest.skip("no criteria are frozen yet")
    ids = set(json.loads(frozen.read_text())["figures"])
    assert not ids & (PENDING_MARGINS | PENDING_PROTOCOLS | PENDING_HEADLINE)
