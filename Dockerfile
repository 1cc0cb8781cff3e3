# source-invoca-destinations as an Airbyte connector image (a custom source in a
# self-managed Airbyte). It follows Airbyte's connector conventions: the code under
# /airbyte/integration_code, AIRBYTE_ENTRYPOINT equal to the ENTRYPOINT, a non-root
# `airbyte` user, and a writable /airbyte (where the platform mounts config files).
#
#   docker build --build-arg VERSION=1.2.3 -t airbyte/source-invoca-destinations:dev .
#   docker run --rm airbyte/source-invoca-destinations:dev spec
FROM python:3.12-slim

# The package's version comes from git (hatch-vcs); an image is built without .git.
ARG VERSION=0.0.0

WORKDIR /airbyte/integration_code
COPY pyproject.toml README.md LICENSE ./
COPY tap_invoca_destinations ./tap_invoca_destinations
RUN SETUPTOOLS_SCM_PRETEND_VERSION="${VERSION}" pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 airbyte \
    && chown -R airbyte:airbyte /airbyte

ENV AIRBYTE_ENTRYPOINT="source-invoca-destinations"
ENTRYPOINT ["source-invoca-destinations"]

LABEL io.airbyte.name="airbyte/source-invoca-destinations"
LABEL io.airbyte.version="${VERSION}"

USER airbyte
