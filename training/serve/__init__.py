"""Serving a run's model for people to try it: which model a name means (models.py), what loading it
costs (the inference estimate beside training's), and streaming chat sessions on the executor that
unload after an idle timeout (server.py)."""
