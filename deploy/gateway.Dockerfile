# The gateway's image for Kubernetes (`workbench deploy` renders its Deployment): the `gateway`
# and `gateway-redis` extras only, no vLLM, torch or lm-eval (docs/gateway-team.md, section 2).
#   docker build -f deploy/gateway.Dockerfile -t workbench-gateway:0.1.0 .
# The word lists are read relative to /opt/workbench, as in the systemd unit. Runs as uid 10001:
# the rendered Deployment sets runAsNonRoot. Not built by this repository's tests.
FROM python:3.11-slim
WORKDIR /opt/workbench
COPY pyproject.toml README.md ./
COPY workbench ./workbench
COPY data/gateway ./data/gateway
RUN pip install --no-cache-dir ".[gateway-redis]" && useradd --uid 10001 --no-create-home workbench-gateway
USER 10001
EXPOSE 8080
CMD ["python", "-m", "workbench.gateway", "--config", "/etc/workbench/config/gateway.yaml"]
