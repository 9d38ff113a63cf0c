FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY outbox ./outbox
COPY processor ./processor
COPY schema ./schema
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT []
CMD ["outbox", "run"]
