"""The ledger: Optuna storages as the queue and record of a study's cells and a search's trials.

storage.py opens a storage (sqlite, PostgreSQL or a journal file); claims.py is how workers hold
trials and tell that a holder died; queue.py is a study's queue of cells; search.py a search's
sampled trials. This package is the
only importer of optuna, and what leaves it is the project's own records.
"""
from .claims import DEFAULTS, ClaimSettings, TakenOver
from .queue import Claim, Ledger, recorded_versions
from .search import DESCRIBED_AT, OVER_BUDGET, PRUNERS, REJECTED, SAMPLERS, SearchLedger, SearchTrial, search_settings
from .storage import (JOURNAL, delete_study, journal_file, lost_ledger, masked, retrying, storage_url, study_attrs,
                      study_exists, study_names)

__all__ = ["DEFAULTS", "ClaimSettings", "TakenOver", "Claim", "Ledger", "recorded_versions", "DESCRIBED_AT", "OVER_BUDGET", "PRUNERS", "REJECTED", "SAMPLERS",
           "SearchLedger", "SearchTrial", "search_settings", "JOURNAL", "delete_study", "journal_file", "lost_ledger",
           "masked", "retrying", "storage_url", "study_attrs", "study_exists", "study_names"]
