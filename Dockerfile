# Sluice as one static-ish binary on Debian. Not built in CI (its machines run no Docker engine).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p sluice

FROM debian:bookworm-slim
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
WORKDIR /etc/sluice
ENTRYPOINT ["sluice"]
CMD ["run", "--config", "/etc/sluice/configs"]
