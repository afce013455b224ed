"""The stage plugin API (``ldae_bids.plugins.api``) and its registry."""

from ldae_bids.plugins.api import GroupInput, Level, Stage, StageContext

__all__ = ["GroupInput", "Level", "Stage", "StageContext"]
