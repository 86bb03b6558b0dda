# fleetserve's image: the same image runs `gateway`, `autoscaler` and `bench`.
#
# Build (the tag is the package version, read from pyproject.toml, the one source of truth;
# the chart's appVersion and default image tag equal it, tests/unit/test_chart_versions.py):
#   make image            # or: docker build -t fleetserve:$(make -s version) .
#
# Layout for a read-only root filesystem: the code is in /opt/fleetserve (owned by root, not
# writable by the user); fleetserve writes only to $FLEETSERVE_STATE_DIR (/var/lib/fleetserve)
# and /tmp, which the chart mounts as emptyDirs. No .pyc files are written at run time.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/fleetserve
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# A wheel, not an editable install: the runtime stage gets no source tree. Byte-compiled here,
# because the root filesystem is read-only at run time.
RUN /opt/fleetserve/bin/pip install . \
 && /opt/fleetserve/bin/python -m compileall -q /opt/fleetserve/lib

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION
LABEL org.opencontainers.image.title="fleetserve" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.description="OpenAI-compatible gateway, autoscaler and load tester"
RUN groupadd --gid 10001 fleetserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin fleetserve \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/fleetserve
COPY --from=build /opt/fleetserve /opt/fleetserve
ENV PATH=/opt/fleetserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FLEETSERVE_STATE_DIR=/var/lib/fleetserve
VOLUME ["/var/lib/fleetserve", "/tmp"]
USER 10001:10001
EXPOSE 8000 8081
ENTRYPOINT ["fleetserve"]
CMD ["--help"]
