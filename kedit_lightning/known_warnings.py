"""Warnings known to be harmless in this package's runs, each filtered by its message and category.

`quiet_known_warnings()` is called by `python train.py` (TrainingCLI) and by `kedit`; pyproject.toml's
pytest `filterwarnings` lists the same filters (tests/test_warnings.py checks that they agree). Anything
else still shows. Lightning's are `PossibleUserWarning`s, a UserWarning: matched as UserWarning, so `kedit synth`
need not import Lightning.
"""

from __future__ import annotations

import warnings

KNOWN_HARMLESS: tuple[tuple[str, type[Warning]], ...] = (
    # EditorModule.train keeps the frozen backbone in eval mode on purpose (no dropout in the locality targets).
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning),
    # torchdata's StatefulDataLoader calls torch.set_vital, which torch deprecated; nothing of ours calls it.
    (r"'set_vital' is deprecated", UserWarning),
    # Lightning's own _pytree builds torch's deprecated LeafSpec; nothing of ours uses it.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # EditorModule's epoch metrics come from torchmetrics' compute(), already synced across ranks.
    (
        r"It is recommended to use `self\.log\('((val|test)/(reliability|[ti]_generality|[ti]_locality|portability"
        r"|exact_match|score)|[vt]_(relia|t_gen|t_loc))",
        UserWarning,
    ),
)


def quiet_known_warnings() -> None:
    """Ignore the `KNOWN_HARMLESS` warnings (message regex + category) from now on."""
    for message, category in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
