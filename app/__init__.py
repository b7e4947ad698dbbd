"""The alignment-planner service: FastAPI over the ``planner`` core. All I/O lives here."""
