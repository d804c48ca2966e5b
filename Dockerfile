# The collector image: collector run | setup | check | simulate.
FROM python:3.11.14-slim-bookworm

# MALLOC_ARENA_MAX: glibc keeps up to 8 malloc arenas a core for the pool's worker threads;
# two hold the world catalogue in 271 MB instead of 305 (BENCHMARKS.md, "GBFS at world scale").
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# One fixed uid: the token and secret files of the compose stack are owned by it.
RUN groupadd --gid 10001 livestack \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin livestack

WORKDIR /opt/livestack
COPY requirements.lock ./
RUN pip install --no-deps --requirement requirements.lock
COPY pyproject.toml README.md ./
COPY collector ./collector
RUN pip install --no-deps . && rm -rf build *.egg-info
COPY deploy/make-secrets.sh ./make-secrets.sh
# Mount points of the token and spool volumes: an empty named volume takes the ownership of the
# image's directory, so uid 10001 can write there.
RUN mkdir -p /run/tokens/writer /run/tokens/reader /var/lib/livestack \
 && chown -R 10001:10001 /run/tokens /var/lib/livestack

USER 10001:10001
# The collector finishes in-flight writes on SIGTERM within 8 s (Docker waits 10).
STOPSIGNAL SIGTERM
ENTRYPOINT ["collector"]
CMD ["run"]
