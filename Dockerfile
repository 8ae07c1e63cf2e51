# pgvitals: docker build -t pgvitals . && docker run -v $PWD/config.yaml:/etc/pgvitals/config.yaml:ro -p 9839:9839 pgvitals
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgvitals
USER 10001
EXPOSE 9839
ENV PGVITALS_LISTEN=0.0.0.0:9839
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9839/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["pgvitals", "run"]
CMD ["--config", "/etc/pgvitals/config.yaml"]
