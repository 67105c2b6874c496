# syntax=docker/dockerfile:1
# Build stage: install the locked dependencies into a virtual environment, then the
# relay, then remove what only development needs.
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.txt ./
# Every file checked against the lock's hashes; nothing resolved at build time.
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements.txt
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation .
# The lock holds runtime and development packages in one resolution: keep the relay's
# own dependency closure (exactly the locked versions) and drop pytest, mypy, ruff,
# playwright and the like, for a small image.
COPY deploy/prune-to-runtime.py ./
RUN /opt/venv/bin/python prune-to-runtime.py \
    && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +

# Runtime stage: the virtual environment and the migrations, as a non-root user.
FROM python:3.11.7-slim-bookworm
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /data relay \
    && install -d -o 10001 -g 10001 -m 0700 /data
# The code stays root-owned and read-only to the relay; /data is its only writable place
# (the embedded SQLite database and the development key file, when no PostgreSQL and no
# RELAY_ENCRYPTION_KEYS are given; mount a volume there to keep them).
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/alembic.ini /app/alembic.ini
COPY --from=build /src/migrations /app/migrations
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAY_LOG_FORMAT=json \
    RELAY_DATABASE_URL=sqlite+aiosqlite:////data/relay.db \
    RELAY_KEY_FILE=/data/relay.key
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
# relay serve (PID 1, exec form, so the signal reaches it) handles SIGTERM: open HTTP
# requests finish (up to 15 s), then the dispatcher stops claiming and finishes or hands
# back its in-flight deliveries (up to 10 s); give `docker stop` -t 30 or more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["relay", "serve", "--host", "0.0.0.0", "--port", "8000"]
