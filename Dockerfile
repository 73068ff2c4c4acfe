# The distlock lock service: `distlock serve` in a small image.
#   docker build -t distlock .
#   docker run --rm -p 127.0.0.1:8181:8181 distlock serve --backend redis://redis:6379 --listen 0.0.0.0:8181
# Built with the backends that need no protoc (etcd's client does); add
# `etcd` to --features and protobuf-compiler to the build stage for it.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p distlock-cli --no-default-features --features redis,zookeeper,file,http

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/distlock /usr/local/bin/distlock
USER nobody
EXPOSE 8181
ENTRYPOINT ["distlock"]
CMD ["serve", "--backend", "memory://", "--listen", "0.0.0.0:8181"]
