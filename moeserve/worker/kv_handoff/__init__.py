"""The KV hand-off between a prefill and a decode worker, in one place.

- ``prefill``: the prefill side. Pins a finished prefill-only request's blocks under a lease
  with an expiry, issues the handle (a capability bound to one decode worker), answers
  ``ClaimKV`` and releases the blocks on the decode side's notification, ``ReleaseKV``, an abort
  or the lease's expiry.
- ``decode``: the decode side. Checks the fingerprint, claims the handle, admits the request to
  the scheduler as WAITING_FOR_REMOTE_KV (blocks allocated, not scheduled), READs the blocks
  outside the engine step and ends the wait with the first token, or with a recompute.
- ``agent``: the NIXL agent, memory registration, descriptors and the release notification.
- ``compat``: which fields of this worker make up its compatibility fingerprint (the format
  and the comparison live in ``moeserve.common.kv_compat``, which the router uses too).

The request's state while its KV is in flight belongs to the scheduler
(``Scheduler.add_remote_kv_request`` / ``finish_remote_kv``); nothing here touches the KV
cache manager. Submodules are imported by name; this file imports none of them.
"""
