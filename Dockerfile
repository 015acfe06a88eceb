# syntax=docker/dockerfile:1
# One small runtime image with both binaries, /usr/local/bin/auction-server (the default
# entrypoint) and /usr/local/bin/auction-client, running as a non-root user.
#
#   docker build -t auction:0.1.0 .
#
# deploy/ runs the same image for the server (Deployment) and the bidders (StatefulSet),
# choosing the binary with `command`. No secret ever goes into the image: credentials come
# from the environment (Kubernetes Secrets).

# --- build: the toolchain the project is tested with. build.rs compiles the .proto files
# with protox (pure Rust), so no protoc is needed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io registry and the target dir between builds; the binaries
# are copied out (stripped) in the same step, since the cache is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && install -D --strip -m 0755 -t /out target/release/auction-server target/release/auction-client

# --- runtime: glibc and libgcc only (what the binaries link; no TLS library, no shell),
# with the unprivileged user 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="auction" \
      org.opencontainers.image.description="Real-time auctions on Redis Sentinel: auction-server and auction-client" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
# 50051: auction-server gRPC (admin API, grpc.health.v1, reflection).
# 50052: auction-client grpc.health.v1.
EXPOSE 50051 50052
ENTRYPOINT ["/usr/local/bin/auction-server"]
