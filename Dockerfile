# alexnet-serve: the API on the shipped weights, on the GPU when the container gets one.
#   docker compose up                    (GPU, needs the NVIDIA Container Toolkit)
#   docker compose --profile cpu up api-cpu
# A slim Python base: torch's Linux wheels from PyPI carry their own CUDA libraries, so no CUDA
# base image is needed; the host's NVIDIA driver comes in through the container toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    APP_HOST=0.0.0.0 \
    APP_PORT=8000 \
    APP_CHECKPOINT=/srv/weights

RUN useradd --create-home --uid 10001 app
WORKDIR /srv

# 1. Dependencies, from pyproject.toml alone: a code change does not reinstall torch.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 2. The project itself, as the README installs it (pip install -e .); deps are already there.
COPY training ./training
COPY app ./app
RUN pip install --no-deps -e .

# 3. The shipped model (mount another at /srv/weights, or set APP_CHECKPOINT).
COPY weights ./weights

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-m", "app.healthcheck"]
CMD ["python", "-m", "app"]
