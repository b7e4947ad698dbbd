# alignment-planner: the service on its embedded store (a volume at /data).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PLANNER_DATA_DIR=/data \
    OPENBLAS_CORETYPE=Haswell

WORKDIR /srv
COPY pyproject.toml README.md ./
COPY planner ./planner
COPY app ./app
RUN pip install '.[service]' \
    && useradd --system --uid 10001 --home-dir /srv --shell /usr/sbin/nologin planner \
    && mkdir -p /data && chown planner:planner /data

USER planner
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["python", "-m", "app.server", "--host", "0.0.0.0", "--port", "8000"]
