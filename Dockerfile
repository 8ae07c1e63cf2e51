# pgvitals: docker build -t pgvitals . && docker run -v $PWD/config.yaml:/etc/pgvitals/config.yaml:ro -p 9839:9839 pgvitals
# The base is pinned to an exact release; the install step is scripts/install-package, the one
# scripts/setup runs too (a virtual environment, then pip install of the package).
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
COPY scripts/install-package ./scripts/install-package
RUN PIP_NO_CACHE_DIR=1 bash scripts/install-package /opt/pgvitals

FROM python:3.11.11-slim-bookworm
# Same path and base image as the build stage: the environment's interpreter links stay valid.
COPY --from=build /opt/pgvitals /opt/pgvitals
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgvitals
USER 10001
EXPOSE 9839
ENV PATH=/opt/pgvitals/bin:$PATH PGVITALS_LISTEN=0.0.0.0:9839
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9839/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["pgvitals", "run"]
CMD ["--config", "/etc/pgvitals/config.yaml"]
