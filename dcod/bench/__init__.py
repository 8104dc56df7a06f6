"""`dcod bench`: load a hub with Oracle-style sessions and measure what a round trip costs.

The figure that decides how many Oracle sessions one host can serve is the hub's CPU time
per round trip, so the bench measures it directly: it samples the CPU time of every dcod
process (supervisor, hub, workers) and of its own load processes at the start and at the
end of a measured window, and divides by the round trips completed in that window; and how
often each process slept and was woken, the size of its batches, which decides much of that
cost on a machine whose cores are shared. It also
checks every reply (each body carries the session's audsid and a request number) and
counts what was lost, so a fast run that drops or misroutes replies does not pass.

Without ``--hub`` it starts a private ``dcod run`` (echo workers, a free port, everything
in a temporary directory) and stops it at the end. The load runs in ``--processes``
spawned processes, each a trio loop of ``dcod.client.Session`` s, because one Python
process is easily slower than the hub it measures; they start and stop on a common
schedule of ``time.monotonic()`` instants, which every process on the host shares.

Scenarios on the private hub, each adding its figures to the report: ``--reload-at S`` runs
the real ``dcod reload`` S seconds into the window and compares the latency of requests sent
during it with the rest; ``--kill-hub-at S`` SIGKILLs the hub and times the quit alert (an
inotify watch on its file) and the first reply from the hub that replaces it;
``--idle-sessions N`` connects N sessions that only say hello and weighs them in hub RSS;
``--spool`` points the proxy at a port where nothing listens, so that every (one-way)
request goes to the hub's durable spool. The private ``dcod run`` keeps its runtime dir
(sockets, the quit alert) on a tmpfs when there is one, as /run/dcod is in production, and

The modules, by concern: ``target`` (the hub under load, and starting a `dcod run`), ``load`` (the load
processes and their sessions), ``accounting`` (CPU, wake-ups, RSS of each process; hub counters),
``scenarios`` (idle sessions, reload, hub kill), ``measure`` (a run from the parent), ``report`` (figures
and table), ``cli`` (`dcod bench`).
"""
