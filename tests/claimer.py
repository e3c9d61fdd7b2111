"""What each process of test_ledger's claiming race runs. The ledger alone: a spawned process that
imports this starts in well under a second (importing test_ledger would also load the study
loader and torch, ~2 s a process)."""
from __future__ import annotations

from chae_ablate.ledger import Ledger


def claim_all(name: str, url: str, hashes: set[str], out) -> None:
    """Claim the study's cells until none is left, putting each claimed trial's number on `out`."""
    ledger = Ledger(name, url)
    while (claim := ledger.claim(hashes)) is not None:
        out.put(claim.number)
