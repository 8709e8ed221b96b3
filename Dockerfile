# taskd container image: the broker (taskd), the worker (taskworker) and the CLI (taskctl).
#
# One Dockerfile, two ways to get the binaries:
#
#   docker build -t taskd:latest .
#       default target `runtime`: builds the binaries in rust:1-bookworm (needs a registry;
#       --build-arg RUST_IMAGE=... names another Rust bookworm image).
#
#   mkdir -p dist && cp target/release/{taskd,taskworker,taskctl} dist/
#   docker build --target runtime-prebuilt --build-arg BIN_DIR=dist -t taskd:latest .
#       target `runtime-prebuilt`: copies binaries built on a bookworm (glibc 2.36 or older) host from
#       the build context; nothing is pulled when BASE_IMAGE is a local image (deploy/ does this).
#
# The base image is a build argument (default debian:bookworm-slim); deploy/base-image.sh makes a
# local one (taskd-base:bookworm) for machines without a registry. The binaries need only glibc,
# which every Debian base has, so the runtime stages install nothing.
#
# Stage order matters: the classic (non-BuildKit) builder builds every stage up to the target, so
# runtime-prebuilt comes before the builder stage and never touches the Rust image, and it
# succeeds without binaries (see there) so that the default target builds with either builder.

ARG BASE_IMAGE=debian:bookworm-slim
# The builder's image; any Rust toolchain image on bookworm (glibc 2.36) will do, e.g. a mirror's.
ARG RUST_IMAGE=rust:1-bookworm

# ---- common runtime layer: user, data dir, defaults -------------------------------------------
FROM ${BASE_IMAGE} AS base
# --no-log-init: no sparse lastlog/faillog entries sized by the large uid.
RUN groupadd --gid 10001 taskd \
    && useradd --uid 10001 --gid taskd --no-log-init --home-dir /var/lib/taskd --no-create-home \
        --shell /usr/sbin/nologin taskd \
    && mkdir -p /var/lib/taskd \
    && chown taskd:taskd /var/lib/taskd \
    && chmod 0750 /var/lib/taskd
ENV TASKD_LISTEN=0.0.0.0:50051 \
    TASKD_DATA_DIR=/var/lib/taskd
VOLUME ["/var/lib/taskd"]
WORKDIR /var/lib/taskd
EXPOSE 50051
USER taskd:taskd
CMD ["taskd"]

# ---- runtime from binaries built outside Docker (CI, machines without a registry) --------------
# BIN_DIR: a directory of the build context holding exactly taskd, taskworker and taskctl.
# Without BIN_DIR the stage installs nothing: the classic builder builds this stage on its way to
# the default target too, so it must not fail there (BuildKit skips it).
FROM base AS runtime-prebuilt
ARG BIN_DIR
USER root
COPY ${BIN_DIR:-Cargo.toml} /usr/local/bin/
RUN set -e; \
    if [ -z "$BIN_DIR" ]; then \
        rm -f /usr/local/bin/Cargo.toml; \
        echo "runtime-prebuilt: no --build-arg BIN_DIR given, no binaries installed"; \
    else \
        for bin in taskd taskworker taskctl; do \
            if [ ! -x "/usr/local/bin/$bin" ]; then \
                echo "runtime-prebuilt: $BIN_DIR/$bin missing or not executable" >&2; exit 1; \
            fi; \
        done; \
    fi
USER taskd:taskd

# ---- builder: release binaries in the official Rust image --------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
        -p taskd-server --bin taskd \
        -p taskd-worker --bin taskworker \
        -p taskd-client --bin taskctl \
    && mkdir -p /out \
    && cp target/release/taskd target/release/taskworker target/release/taskctl /out/

# ---- runtime built from source (the default target) --------------------------------------------
FROM base AS runtime
COPY --from=builder /out/ /usr/local/bin/
