"""What each process of test_ledger's claiming race runs. The ledger alone: a spawned process that
imports this starts in well under a second (importing test_ledger would also load the study
loader and torch, ~2 s a process)."""
from __future__ import annotations

from chae_ablate.ledger import Ledger


def claim_all(name: str, url: str, hashes: set[str], out, all_done) -> None:
    """Claim the study's cells until none is left, putting each claimed trial's number on `out`,
    then wait at the `all_done` barrier: a claimer that exited early would leave RUNNING trials of a
    dead process, which the others rightly re-queue as new trials (CI saw 119 claims of 60 cells)."""
    ledger = Ledger(name, url)
    while (claim := ledger.claim(hashes)) is not None:
        out.put(claim.number)
    all_done.wait(timeout=120)
