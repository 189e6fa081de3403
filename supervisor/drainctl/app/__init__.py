"""The app's side of the drain: the down state, the endpoints, the WSGI and ASGI middlewares.

Standard library only, and nothing of drainctl outside this package: an app imports it through
``drainctl.wsgi`` / ``drainctl.asgi`` (docs/app-side.md) and must not pull in the supervisor.
"""
