# hyperloop as a container image: `docker run --rm -v "$PWD:/work" ghcr.io/OWNER/hyperloop step`.
# Every RUN is a subcommand of scripts/docker-steps.sh, which CI runs too.
ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src
COPY scripts/docker-steps.sh /usr/local/bin/docker-steps.sh
RUN bash /usr/local/bin/docker-steps.sh builder-deps
COPY . .
RUN bash /usr/local/bin/docker-steps.sh build /out release

FROM debian:bookworm-slim
ARG CLAUDE_VERSION=latest
COPY scripts/docker-steps.sh /usr/local/bin/docker-steps.sh
RUN bash /usr/local/bin/docker-steps.sh runtime-deps \
    && bash /usr/local/bin/docker-steps.sh user hyperloop 10001
COPY --from=builder /out/hyperloop /usr/local/bin/hyperloop
USER hyperloop
RUN bash /usr/local/bin/docker-steps.sh smoke /usr/local/bin/hyperloop
WORKDIR /work
ENTRYPOINT ["hyperloop"]
CMD ["step"]
