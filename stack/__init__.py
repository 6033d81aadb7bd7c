"""The local stack: the Prefect side of dbmigrate on this machine, every part on 127.0.0.1 and
its state under the home (``dbmigrate local up|down|status``):

- the embedded PostgreSQL (:mod:`dbmigrate.local`) on loopback TCP, with one database per
  environment (``development``, ``staging``, ``production``);
- a Prefect server (``prefect server start``) whose PREFECT_HOME is ``<home>/prefect``, its API
  closed to whoever lacks the auth string generated into ``<home>/prefect-auth`` (0600): anyone on
  the machine reaches 127.0.0.1, and the blocks hold the database's password;
- the block types and a ``DatabaseCredentials`` block per environment, written by the code
  ``dbmigrate blocks sync`` runs (:func:`blocks.sync.sync_environment`); the work pool
  ``dbmigrate``; ``prefect deploy --all`` from the checkout;
- a process worker of that pool, running the flows from the checkout.

``stack.provision`` starts it (``up``); ``stack.processes`` keeps its processes (started detached,
recorded, stopped) and stops it: ``down`` stops the worker first (no run is left talking to a server
that went away), then the server, then PostgreSQL. Prefect is imported only by ``up``: ``status``,
``env`` and ``down`` never pay for it. A package beside ``blocks/`` and ``flows/``, not in ``dbmigrate/``:
it is the Prefect side, and the plain command line imports it only for ``local up|down|env|status``.
"""

