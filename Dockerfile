# The example app and its worker; docker-compose.yml runs both from this image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY signal_queue ./signal_queue
RUN pip install --no-cache-dir ".[server]"
COPY worker.py ./
COPY examples ./examples
# The article's modules (application, audit_events, exception_reporting) import by plain name.
ENV PYTHONPATH=/app/examples/article:/app
