"""One registry of refinement methods: every name maps to one ``Refiner`` with ``fit(model, data, config)``.

Three families (``refinement.refiners`` implements them):

- ``pruning`` — EGEM, PCA-EGEM (paper 000), RGEM, ridge and retraining
  (``refinement.methods``): hyper-parameter by the slack rule on verified samples;
- ``concept`` — P-, A- and RR-ClArC (paper 001, ``refinement.clarc``): the first concept
  given is corrected;
- ``xs`` — training with explanatory supervision, ``CE + lambda L_XS`` (paper 002 Eq. 3:
  RRR, RBR, TAP; ``none`` is plain cross-entropy, the baseline).

``hansgate refine`` offers the first two families, ``hansgate train --xs`` the third; both
take their choices and help text from here (``names``, ``describe``). The table itself is
torch-free, so that building the command line stays light; ``get_refiner`` imports the
implementation named by an entry's ``target`` (``module:Class``, called with the entry).
A new method is one ``register(...)`` line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from hansgate.errors import ConfigError

if TYPE_CHECKING:
    from hansgate.refinement.refiners import Refiner

__all__ = ["Family", "Entry", "ENTRIES", "register", "names", "describe", "get_refiner"]

Family = Literal["pruning", "concept", "xs"]


@dataclass(frozen=True)
class Entry:
    """A method's name, family, one-line summary (for ``--help``) and implementing class (``module:Class``)."""

    name: str
    family: Family
    summary: str
    target: str


#: Every refinement method by name, in the order ``--help`` lists them.
ENTRIES: dict[str, Entry] = {}


def register(name: str, family: Family, summary: str, target: str) -> Entry:
    """Add a method; a name can be registered once."""
    if name in ENTRIES:
        raise ConfigError(f"refinement method {name!r} is already registered")
    ENTRIES[name] = entry = Entry(name, family, summary, target)
    return entry


def names(*families: Family) -> list[str]:
    """Registered names of the given families (all when none is given), in registration order."""
    return [n for n, e in ENTRIES.items() if not families or e.family in families]


def describe(*families: Family) -> str:
    """``name: summary; ...`` for a command's ``--help``."""
    return "; ".join(f"{n}: {ENTRIES[n].summary}" for n in names(*families))


def get_refiner(name: str, *families: Family) -> Refiner:
    """The refiner called ``name`` (among ``families`` when given); ``ConfigError`` naming the choices otherwise."""
    entry = ENTRIES.get(name)
    if entry is None or (families and entry.family not in families):
        raise ConfigError(f"unknown refinement method {name!r}; choose from {', '.join(names(*families))}")
    module, _, attr = entry.target.partition(":")
    refiner: Refiner = getattr(importlib.import_module(module), attr)(entry)
    return refiner


_PRUNING = "hansgate.refinement.refiners:PruningRefiner"
_CLARC = "hansgate.refinement.refiners:ClarcRefiner"
_XS = "hansgate.refinement.refiners:XSRefiner"
register("egem", "pruning", "explanation-guided exposure minimisation, one factor per unit (paper 000)", _PRUNING)
register("pca-egem", "pruning", "exposure minimisation along principal components (paper 000)", _PRUNING)
register("rgem", "pruning", "ridge refit of the last layer to the model's own logits (paper 000)", _PRUNING)
register("ridge", "pruning", "ridge refit of the last layer to the labels (baseline)", _PRUNING)
register("retrain", "pruning", "fine-tuning on the verified samples (baseline)", _PRUNING)
register("p-clarc", "concept", "projects the concept out after the concept layer (paper 001; needs --concept)",
         _CLARC)
register("a-clarc", "concept", "fine-tunes with the concept added to every sample (paper 001; needs --concept)",
         _CLARC)
register("rr-clarc", "concept", "fine-tunes against the concept's gradient, Eq. 5 (paper 001; needs --concept)",
         _CLARC)
register("rrr", "xs", "right for the right reasons: input gradients off the masks (papers 002, 004)", _XS)
register("rbr", "xs", "right for better reasons: influence off the masks (papers 002, 004)", _XS)
register("tap", "xs", "targeted activation penalty under the masks (paper 002)", _XS)
register("none", "xs", "plain cross-entropy, the XS baseline", _XS)
