# The Dataflow worker image: Beam's Python SDK image of the version setup.py pins, with this
# package and its pinned dependencies installed, so that workers start without installing any.
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/planet:TAG .
# Jobs use it with --sdk_container_image=... --sdk_location=container (docs/dataflow.md, "Running on
# Dataflow"); the image's own entrypoint, Beam's worker boot, stays as it is.
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/planet-batch
# Only what the package is made of (.dockerignore keeps the rest out of the build context).
COPY setup.py ./
COPY beam_jobs ./beam_jobs
COPY model ./model
RUN pip install --no-cache-dir . \
 && python -c "import beam_jobs.preprocess, beam_jobs.predict, model.schema"
