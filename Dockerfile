# The worker image: the runtime dependencies at exactly the locked versions (requirements.lock),
# the project on top, without the embedded server (it needs OUTBOX_DATABASE_URL). It serves
# /metrics and /health on OUTBOX_METRICS_PORT; its HEALTHCHECK asks /health. docs/operations.md: "Deploying".
ARG PYTHON_IMAGE=python:3.12-slim

# Builder: a venv in /opt/outbox, at the same path and on the same Python as the runtime stage.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# No pip inside the venv: the builder's pip installs into it (--python), so the image carries none.
RUN python -m venv --without-pip /opt/outbox
WORKDIR /src
# The dependencies first, from the lock alone (this layer is rebuilt only when the lock changes);
# --no-deps: nothing but what the lock names.
COPY requirements.lock ./
RUN pip --python /opt/outbox/bin/python install --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY outbox ./outbox
COPY processor ./processor
COPY schema ./schema
# The project without its dependencies (they are the lock's); pip check fails the build if the lock
# lacks one of them or pins a version the project does not accept.
RUN pip --python /opt/outbox/bin/python install --no-deps . \
    && pip --python /opt/outbox/bin/python check

# Runtime: the venv and a non-root user with a fixed uid (for volume ownership and runAsUser).
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 outbox \
    && useradd --system --uid 10001 --gid outbox --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin outbox
COPY --from=builder /opt/outbox /opt/outbox
ENV PATH=/opt/outbox/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OUTBOX_METRICS_PORT=9100
USER 10001:10001
EXPOSE 9100
# processor.probe GETs http://127.0.0.1:$OUTBOX_METRICS_PORT/health: 0 on 200, else 1 and why. It is
# `outbox healthcheck` without the CLI's start-up cost (about 0.8 s of CPU at every interval).
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 CMD ["python", "-m", "processor.probe"]
ENTRYPOINT []
CMD ["outbox", "run"]
