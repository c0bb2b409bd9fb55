"""The daemon's endpoints, one module per group; each has a module-level `router` that app.py includes.
Routes take the shared `AppContext` as a parameter (`ctx: Context`) and the request handling from
handling.py."""
