"""A campaign's shared state in Redis (layer 4): what lets many processes on many
machines send one campaign as if they were one Mailer. No queue engine is imported
here: :mod:`asmtp.celery` carries chunks of jobs to the workers, another engine could
carry them the same way.

* :mod:`.keys`: the names of a campaign's keys and the Lua scripts that change them
  atomically;
* :mod:`.journal`: the journal per campaign and recipient (a dot record before each
  dot, the final result after, both batched into one round trip per group of writers);
* :mod:`.limits`: rates overall and per domain (GCRA, tokens taken in small batches)
  and per-domain connection caps (leases that expire when their worker dies);
* :mod:`.campaign`: runs of a campaign, its messages and settings, chunks done,
  following the results, status and cancel;
* :mod:`.spec`: a campaign's Mailer settings as JSON;
* :mod:`.runner`: one worker process's side: a chunk of jobs through a Mailer over
  this state.
"""

from __future__ import annotations

from .campaign import CampaignStore, RunProgress
from .journal import RedisJournal
from .limits import LeaseKeeper, RedisLimits
from .runner import ChunkRunner
from .spec import CampaignSpec

__all__ = [
    "CampaignSpec",
    "CampaignStore",
    "ChunkRunner",
    "LeaseKeeper",
    "RedisJournal",
    "RedisLimits",
    "RunProgress",
]
