"""The server's Prometheus metrics (GET /metrics), in a registry of their own per server."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: a tiny model answers in milliseconds, GPT-2 small on 2 cores in tenths of seconds.
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self, cache_limit_positions):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vlm_requests", "Requests answered, by task and HTTP status", ["task", "status"], registry=r
        )
        self.tokens = Counter("vlm_generated_tokens", "Tokens generated, by task", ["task"], registry=r)
        self.queue = Gauge("vlm_queue_prompts", "Prompts waiting to join the running batch", registry=r)
        self.running = Gauge("vlm_running_rows", "Rows in the running batch", registry=r)
        self.cache_positions = Gauge(
            "vlm_kv_cache_positions", "Key/value cache positions held (rows x padded columns)", registry=r
        )
        self.cache_bytes = Gauge("vlm_kv_cache_bytes", "Key/value cache bytes held", registry=r)
        limit = Gauge("vlm_kv_cache_limit_positions", "The cache bound (--max_cache_tokens)", registry=r)
        limit.set(cache_limit_positions)
        self.first_token = Histogram(
            "vlm_time_to_first_token_seconds",
            "From a prompt's arrival to its first token",
            ["task"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "vlm_time_per_output_token_seconds",
            "Between a row's successive tokens",
            ["task"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )

    def token(self, task, seconds, first):
        """Called by the decoding loop for every generated token."""
        self.tokens.labels(task).inc()
        (self.first_token if first else self.per_token).labels(task).observe(seconds)

    def loop_state(self, waiting, running, positions, cache_bytes):
        self.queue.set(waiting)
        self.running.set(running)
        self.cache_positions.set(positions)
        self.cache_bytes.set(cache_bytes)

    def request(self, task, status):
        self.requests.labels(task or "", str(status)).inc()

    def exposition(self):
        return generate_latest(self.registry)
