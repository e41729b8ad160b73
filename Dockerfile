# pgfanout: the sidecar binary on a slim Debian runtime.
#
#   docker build -t pgfanout .
#   docker run --rm pgfanout --help
#
# Works with the classic builder and BuildKit alike (no RUN --mount), so
# `docker compose build` and Debian's docker-compose 1.29 both build it.

FROM rust:1-bookworm AS builder
# rdkafka builds its bundled librdkafka (C, no cmake needed) and links
# OpenSSL and zlib; never the system librdkafka (see shared SERVICES.md).
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev zlib1g-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first, against stub sources, so editing src/ does not rebuild
# the ~300 crates underneath. benches/ is copied because Cargo.toml declares
# a [[bench]] target and cargo refuses a manifest whose targets are missing;
# vendor/ holds the patched pgwire-replication (vendor/*/PATCH.md).
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY vendor ./vendor
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin pgfanout \
 && rm -rf src

# The real sources; init.rs embeds sql/ with include_str!.
COPY src ./src
COPY sql ./sql
# COPY keeps the files' old mtimes, which can predate the stub build: drop
# the stub's artifacts so cargo cannot mistake them for up to date.
RUN rm -rf target/release/.fingerprint/pgfanout-* target/release/deps/pgfanout-* \
           target/release/deps/libpgfanout-* target/release/pgfanout \
 && cargo build --release --locked --bin pgfanout \
 && install -m 0755 target/release/pgfanout /usr/local/bin/pgfanout

FROM debian:bookworm-slim
# libssl3 and zlib for rdkafka; ca-certificates for TLS to brokers/sinks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pgfanout
COPY --from=builder /usr/local/bin/pgfanout /usr/local/bin/pgfanout
USER pgfanout
ENTRYPOINT ["pgfanout"]
CMD ["--help"]
