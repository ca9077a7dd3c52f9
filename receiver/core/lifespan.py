"""What the app's lifespan hands to the HTTP protocols ``receiver serve`` runs.

uvicorn gives the state a lifespan yields to its protocols as well as to requests
(``app_state``). Through it our protocols (`receiver.server`) learn the settings without
reading the environment again, serve callbacks with the app's services (past ASGI), and
tell the app that the server is stopping.

Why the protocols must tell: event streams never end by themselves, and uvicorn waits for
every response to end before it runs the lifespan's shutdown. Its first step of a graceful
shutdown is to call each connection's ``shutdown()``; ours call `STOPPING` there, which cuts
every stream of the process (its clients reconnect elsewhere with Last-Event-ID). Under
uvicorn's own protocols (``python -m uvicorn receiver.app:create_app``) nothing calls it, so
give that server ``--timeout-graceful-shutdown``: the streams end when it cancels them.
"""

SETTINGS = "receiver.settings"  # the app's `Settings`
STOPPING = "receiver.stopping"  # a callable: the server is stopping, end the event streams
SERVICES = "receiver.services"  # the app's `Services`: `receiver.server.direct` serves callbacks
