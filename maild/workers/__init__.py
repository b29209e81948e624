"""`[server] workers`: several processes serving SMTP on one host (issue 16).

supervisor.py runs them, forkserver.py forks them, worker.py is one of them, shared.py
is the policy state they share through the supervisor, ipc.py the channel between a
worker and the supervisor, shares.py their parts of the host's capacity limits.
"""
