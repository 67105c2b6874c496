# syntax=docker/dockerfile:1
# Build stage: install the locked dependencies into a virtual environment.
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

# Runtime stage: the virtual environment and the migrations, as a non-root user.
FROM python:3.11.7-slim-bookworm
RUN groupadd --system --gid 10001 relay && useradd --system --uid 10001 --gid 10001 --home-dir /app relay
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/alembic.ini /app/alembic.ini
COPY --from=build /src/migrations /app/migrations
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAY_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
# relay serve handles SIGTERM: it stops claiming deliveries and finishes or releases
# the ones in flight before it exits.
ENTRYPOINT ["relay", "serve", "--host", "0.0.0.0", "--port", "8000"]
