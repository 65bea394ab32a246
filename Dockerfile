# The TUS-REC submission image (default target) and the evaluation harness.
#
#   docker build -t tusrec .                      # submission: ./predict + the shipped weights
#   docker build --target harness -t tusrec-harness .   # + landmarks, evaluate, rank
#   docker run --gpus all --rm -v $PWD/data:/input:ro -v $PWD/out:/output tusrec
#
# Build arguments (all optional):
#   BASE_IMAGE      an NVIDIA CUDA runtime image (the organisers' kind), so that
#                   `--gpus all` with the NVIDIA Container Toolkit reaches the GPU; the
#                   tests substitute a local Debian image (no registry there)
#   WEIGHTS         build-context folder of the ensemble (manifest.json + members)
#   PIP_CERT, PIP_FIND_LINKS   pip's CA bundle and a local wheel folder, for builds
#                   behind a TLS proxy or offline (the tests use both)
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# --------------------------------------------------------------------------- python
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions come from the base image's distribution; the Python libraries are pinned below.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin tusrec \
    && mkdir -p /input /output /opt/tusrec \
    && chown tusrec:tusrec /output

# --------------------------------------------------------------------------- libraries
# The predictor's libraries only, with the exact pins of requirements.txt.
FROM python AS libs
ARG PIP_CERT
ARG PIP_FIND_LINKS
COPY requirements.txt /tmp/requirements.txt
RUN [ -n "${PIP_CERT:-}" ] || unset PIP_CERT; [ -n "${PIP_FIND_LINKS:-}" ] || unset PIP_FIND_LINKS; \
    grep -E '^(torch|roma|numpy|h5py|opencv-python-headless|pandas|tqdm)==' /tmp/requirements.txt \
        > /tmp/predictor.txt \
    && pip install --no-cache-dir -r /tmp/predictor.txt \
    && rm /tmp/requirements.txt /tmp/predictor.txt

# The harness's libraries on top (a stage of its own, so that code changes do not redo them).
FROM libs AS harness-libs
ARG PIP_CERT
ARG PIP_FIND_LINKS
COPY requirements.txt /tmp/requirements.txt
RUN [ -n "${PIP_CERT:-}" ] || unset PIP_CERT; [ -n "${PIP_FIND_LINKS:-}" ] || unset PIP_FIND_LINKS; \
    pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt

# --------------------------------------------------------------------------- harness
# The organisers' tools: landmarks, evaluate (check, score, rank, run), and the predictor.
FROM harness-libs AS harness
COPY tusrec /opt/tusrec/tusrec
COPY .tusrec-command /opt/tusrec/.tusrec-command
ARG WEIGHTS=weights
COPY ${WEIGHTS} /opt/tusrec/weights
RUN echo /opt/tusrec > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/tusrec.pth" \
    && for name in predict landmarks evaluate; do ln -s /opt/tusrec/.tusrec-command "/usr/local/bin/$name"; done \
    && printf '#!/bin/sh\nexec python3 -m tusrec "$@"\n' > /usr/local/bin/tusrec \
    && chmod 755 /usr/local/bin/tusrec \
    && python3 -m compileall -q /opt/tusrec/tusrec \
    && mkdir -p /scores && chown tusrec:tusrec /scores
ENV TUSREC_WEIGHTS=/opt/tusrec/weights \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /output
USER 10001:10001
ENTRYPOINT []
CMD ["evaluate", "--help"]

# --------------------------------------------------------------------------- submission
# The default target (the last stage): the predictor, its libraries and the weights; nothing
# else. These are the modules it imports (tusrec.predict never imports scoring, ranking, harness, train or
# simulate; tests/test_containers.py checks this list against what it really imports).
FROM libs AS submission
COPY tusrec/__init__.py tusrec/__main__.py tusrec/cli.py tusrec/options.py tusrec/data.py tusrec/geometry.py \
     tusrec/ddf.py /opt/tusrec/tusrec/
COPY tusrec/model /opt/tusrec/tusrec/model
COPY tusrec/predict /opt/tusrec/tusrec/predict
COPY .tusrec-command /opt/tusrec/.tusrec-command
ARG WEIGHTS=weights
COPY ${WEIGHTS} /opt/tusrec/weights
RUN echo /opt/tusrec > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/tusrec.pth" \
    && ln -s /opt/tusrec/.tusrec-command /usr/local/bin/predict \
    && python3 -m compileall -q /opt/tusrec/tusrec \
    && test -f /opt/tusrec/weights/manifest.json
ENV TUSREC_WEIGHTS=/opt/tusrec/weights
LABEL org.opencontainers.image.title="tusrec submission" \
      org.opencontainers.image.description="TUS-REC predictor: reads /input (val/test layout), writes GP/GL/LP/LL to /output"
WORKDIR /output
USER 10001:10001
ENTRYPOINT ["predict"]
# 105 s of the organisers' 120 s a scan: the rest is for starting Python and loading the weights,
# which a limit enforced from outside the container counts (9 s measured on a 2-core CPU).
# The image hands in dense DDFs (--format ddf), the challenge's official form, which any
# evaluation reads; for local validation pass --format transforms (kilobytes, scored the same).
CMD ["--input", "/input", "--output", "/output", "--time-limit", "105", "--format", "ddf"]
