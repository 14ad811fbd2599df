# Consent Gateway (cgw) container image.
#
#   docker build -t cgw .
#   docker run -d -p 587:587 -p 465:465 -v cgw-data:/var/lib/cgw cgw
#   docker compose up -d                      # with PostgreSQL: see compose.yaml
#
# Any other command of the CLI runs the same way, as the same user and with
# the same settings, e.g.:
#   docker compose exec cgw cgw user add drsmith --address dr.smith@praxis.example

# ---------------------------------------------------------------------------
# Build stage: the project and its dependencies in a virtualenv at /opt/cgw,
# which the runtime stage copies whole (same base image, same path). Every
# dependency ships binary wheels for this platform, so no compiler is needed.
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/cgw

WORKDIR /src
COPY pyproject.toml README.md ./
COPY policies/ policies/
COPY consent_registry/ consent_registry/
COPY gateway/ gateway/
RUN /opt/cgw/bin/pip install --no-cache-dir .

# ---------------------------------------------------------------------------
# Runtime stage.
FROM python:3.11-slim

LABEL org.opencontainers.image.title="Consent Gateway" \
      org.opencontainers.image.description="Consent-aware SMTP submission relay for medical practices"

# The gateway listens on the standard submission ports 587 (STARTTLS) and 465
# (implicit TLS) although it runs as an unprivileged user: Docker 20.10 and
# later start containers with net.ipv4.ip_unprivileged_port_start=0, so any
# process in the container may bind ports below 1024. On older engines, or
# runtimes that do not set that sysctl, listen on 2587/2465 instead (set
# CGW_SUBMISSION_LISTEN / CGW_SMTPS_LISTEN) and publish e.g. -p 587:2587.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/cgw/bin:$PATH \
    CGW_DATA_DIR=/var/lib/cgw \
    CGW_SUBMISSION_LISTEN=0.0.0.0:587 \
    CGW_SMTPS_LISTEN=0.0.0.0:465

# A fixed uid/gid, so that volumes and bind mounts (TLS key, data) can be
# given to it on the host: chown 10001:10001 ...
RUN groupadd --system --gid 10001 cgw \
    && useradd --system --uid 10001 --gid cgw --home-dir /var/lib/cgw --no-create-home \
        --shell /usr/sbin/nologin cgw \
    && install -d -o cgw -g cgw -m 0700 /var/lib/cgw

COPY --from=builder /opt/cgw /opt/cgw

USER 10001:10001
# The data directory is also the working directory, so a cgw.toml placed in
# the volume is read (or set CGW_CONFIG to a mounted file).
WORKDIR /var/lib/cgw
# Spool, quarantine, keys, the development certificate and (without
# CGW_DATABASE_URL) the SQLite database: keep it on a volume. `cgw serve`
# creates what is missing in it on start.
VOLUME ["/var/lib/cgw"]
EXPOSE 587 465

# On SIGTERM the gateway stops accepting connections, lets the SMTP
# transactions in flight finish (for up to CGW_SHUTDOWN_GRACE, 30s by
# default; then 421), finishes the deliveries it has started, and exits 0.
# Give it longer than that before SIGKILL: docker stop --time 60, or
# stop_grace_period: 60s in compose.yaml.
STOPSIGNAL SIGTERM

# Healthy: the database is reachable and the submission port accepts
# connections. Otherwise exit 1 with one line on stderr.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["cgw", "status", "--quiet"]

ENTRYPOINT ["cgw"]
CMD ["serve", "--log-format", "json"]
