"""The selection protocol: the slack rule (paper 000, Sec. 4.4) and best-score rules, with their JSON records."""

from __future__ import annotations

import pytest

from hansgate.errors import ConfigError
from hansgate.refinement.selection import (
    Candidate,
    RuleSelection,
    Selection,
    SlackSelection,
    select_best,
    select_by_slack,
    validation_split,
)


def _cands(*accs: float) -> list[Candidate]:
    return [Candidate({"alpha": i}, a) for i, a in enumerate(accs)]


def test_slack_rule_takes_the_strongest_candidate_within_the_relative_slack():
    sel = select_by_slack(_cands(0.80, 0.94, 0.99), original_val_acc=1.0, slack=0.05)
    assert sel.chosen.params == {"alpha": 2} and sel.qualified and sel.threshold == pytest.approx(0.95)
    sel = select_by_slack(_cands(0.80, 0.95, 0.99), original_val_acc=1.0, slack=0.05)
    assert sel.chosen.params == {"alpha": 1}  # the threshold itself qualifies
    relative = select_by_slack(_cands(0.70, 0.80), original_val_acc=0.8, slack=0.1)
    assert relative.chosen.params == {"alpha": 1}  # 0.72 = 0.9 * 0.8, not 0.8 - 0.1
    none = select_by_slack(_cands(0.1, 0.2), original_val_acc=1.0, slack=0.05)
    assert none.chosen.params == {"alpha": 1} and not none.qualified
    assert isinstance(sel, Selection) and sel.rule == "slack"


def test_slack_record_keeps_the_whole_table():
    d = select_by_slack(_cands(0.5, 0.99), 1.0, 0.05).as_dict()
    assert d["chosen"] == {"alpha": 1} and d["original_val_acc"] == 1.0 and d["qualified"] is True
    assert [c["val_acc"] for c in d["candidates"]] == [0.5, 0.99]


@pytest.mark.parametrize("cands, slack", [([], 0.05), (_cands(0.5), 1.0), (_cands(0.5), -0.1)])
def test_slack_rule_refuses_bad_arguments(cands, slack):
    with pytest.raises(ConfigError):
        select_by_slack(cands, 1.0, slack)


def test_best_score_rule_minimises_or_maximises_with_ties_to_the_earlier():
    cands = _cands(0.5, 0.6, 0.7)
    low = select_best(cands, [0.3, 0.1, 0.1], "min loss", best="min", score_name="val_loss")
    assert low.chosen is cands[1]
    high = select_best(cands, [0.3, 0.9, 0.9], "max score", best="max")
    assert high.chosen is cands[1]
    fixed = select_best(cands[:1], [None], "fixed", best="min")
    assert fixed.chosen is cands[0]
    partly = select_best(cands[:2], [None, 2.0], "min", best="min")
    assert partly.chosen is cands[1]  # a candidate without a score never beats one with a score
    assert isinstance(low, Selection) and isinstance(low, RuleSelection) and not isinstance(low, SlackSelection)


def test_rule_record_names_the_rule_and_every_score():
    sel = select_best(_cands(0.5, 0.6), [0.4, 0.2], "min cross-entropy", best="min", score_name="val_loss",
                      details=[{"seconds": 1.0}, {"seconds": 2.0}], original_val_acc=0.9)
    d = sel.as_dict()
    assert d["rule"] == "min cross-entropy" and d["chosen"] == {"alpha": 1} and d["chosen_val_acc"] == 0.6
    assert d["original_val_acc"] == 0.9
    assert d["candidates"][0] == {"params": {"alpha": 0}, "val_acc": 0.5, "seconds": 1.0, "val_loss": 0.4}
    assert "val_loss" not in select_best(_cands(0.5), [None], "fixed", best="min").as_dict()["candidates"][0]
    with pytest.raises(ConfigError):
        select_best(_cands(0.5, 0.6), [0.1], "x", best="min")


def test_validation_split_is_disjoint_seeded_and_rounds_up():
    fit, val = validation_split(11, 0.2, seed=3)
    assert len(val) == 3 and len(fit) == 8  # ceil(0.2 * 11)
    assert sorted(fit.tolist() + val.tolist()) == list(range(11))
    assert validation_split(11, 0.2, seed=3)[1].tolist() == val.tolist()
    assert validation_split(11, 0.2, seed=4)[1].tolist() != val.tolist()
    with pytest.raises(ConfigError):
        validation_split(1, 0.2, 0)
