# Sourced by the RUN steps of docker/Dockerfile before pip runs: optional local build inputs.
# docker/certs/ca-certificates.crt: CA bundle for pip behind a TLS-inspecting proxy (gitignored).
if [ -f /src/docker/certs/ca-certificates.crt ]; then
    export PIP_CERT=/src/docker/certs/ca-certificates.crt
fi
