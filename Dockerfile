# The tokenrelay image: the CLI, which runs workers and consumers.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .
ENTRYPOINT ["tokenrelay"]
CMD ["--help"]
