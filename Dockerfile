# keygate image: `keygate` (the service and its CLI) plus `demo-upstream` (a tiny
# HTTP service used as the protected backend in docker-compose.yml).
# Plain Dockerfile syntax (no BuildKit-only features), so docker-compose v1 builds it too.

FROM rust:1-bookworm AS builder
WORKDIR /src
# Protos are compiled by protox (pure Rust): no protoc needed. No database at build time.
ENV SQLX_OFFLINE=true
COPY . .
# The dist profile: release with one optimisation unit across all crates (Cargo.toml says
# what it costs and saves).
RUN cargo build --profile dist --locked -p keygate -p demo-upstream

FROM debian:bookworm-slim
# ca-certificates unpinned on purpose: it should be the current one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 keygate \
 && useradd --system --uid 10001 --gid keygate --home-dir /var/lib/keygate \
      --shell /usr/sbin/nologin keygate \
 && install -d -o keygate -g keygate -m 0750 /var/lib/keygate
COPY --from=builder /src/target/dist/keygate /src/target/dist/demo-upstream /usr/local/bin/
# Working directory = data directory: the default store, sqlite://keygate.db, lands here.
WORKDIR /var/lib/keygate
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001
# gRPC (Authorizer, ext_authz), admin gRPC (KeyAdmin), Prometheus metrics.
# Admin and metrics listen on 127.0.0.1 by default: set KEYGATE_ADMIN_LISTEN /
# KEYGATE_METRICS_LISTEN to 0.0.0.0:... to reach them from outside the container.
EXPOSE 50051 50052 9464
# Asks grpc.health.v1 on the main port; adjust if KEYGATE_LISTEN moves it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["keygate", "healthcheck", "--addr", "http://127.0.0.1:50051"]
ENTRYPOINT ["keygate"]
CMD ["serve"]
