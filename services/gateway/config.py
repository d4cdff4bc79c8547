"""The gateway's settings."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.services.common.config import KEYS, ServerConfig, check, is_loopback, knob

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class GatewayConfig(ServerConfig):
    """Settings of `kvmesh gateway`."""

    port: int = knob(DEFAULT_PORT, "gRPC port of the Gateway service; 0 picks a free one (printed at start).")
    max_message_bytes: int = knob(4 * 1024 * 1024, "Largest gRPC message accepted from clients, in bytes; a "
                                                   "larger request gets RESOURCE_EXHAUSTED.")
    http_host: str = knob("127.0.0.1", "Address of the OpenAI-compatible HTTP API.")
    http_port: int = knob(8000, "Port of the OpenAI-compatible HTTP API; -1 turns it off, 0 picks a free one.")
    model: str = knob("", "Folder of the served model (its tokenizer, chat template and config are read here).")
    served_model_name: str = knob("", "Name clients use for the model; empty means the folder's name.")
    scheduler: str = knob("127.0.0.1:50050", "Address of the scheduler, or several comma-separated: each call "
                                            "goes to the one that last answered, the next after 1 s of silence.")
    max_body_bytes: int = knob(4 * 1024 * 1024, "Largest HTTP request body, in bytes; larger gets HTTP 413.")
    request_timeout_s: float = knob(600.0, "Deadline of a request that names none, in seconds.")
    route_timeout_s: float = knob(5.0, "Deadline of the call to the scheduler, in seconds.")
    structured_compile_timeout_s: float = knob(10.0, "Longest the gateway spends compiling a request's structured "
                                               "output constraint (JSON schema, regex, grammar); longer is a 400.")
    retry_limit: int = knob(1, "Times a request that fails before its first token (its prefill or decode worker "
                               "gone, its KV lost) is routed again, avoiding the workers it failed on.")
    migration_limit: int = knob(2, "Times a request whose decode worker fails mid-stream is moved to another one "
                                   "(the prompt and the tokens streamed so far re-issued there); 0 ends it with "
                                   "an error instead.")
    stall_check_s: float = knob(1.0, "Seconds a decode stream may send nothing before the gateway asks its worker's "
                                     "health, with the same deadline: a worker that answers keeps the stream, "
                                     "however slow; one that does not (stopped, hung) is taken as gone and the "
                                     "request migrated. 0: never ask.")
    api_key: KEYS = knob((), "An API key clients must send (HTTP 'Authorization: Bearer KEY', gRPC metadata "
                             "'authorization'); repeat the flag for more; the variable is comma-separated.",
                         secret=True)
    api_key_file: str = knob("", "File of API keys, one a line, each optionally followed by its tenant; '#' "
                                 "comments; read again on SIGHUP.")
    metrics_auth: bool = knob(False, "Require an API key for /metrics too (else it is open, as /health is).")
    rate_limit_rpm: float = knob(0.0, "Requests a minute each tenant may send (a token bucket over every "
                                      "authenticated request); more get HTTP 429 with Retry-After or "
                                      "RESOURCE_EXHAUSTED; 0 turns it off. Needs API keys.")
    rate_limit_burst: int = knob(0, "Requests a tenant may send at once before the per-minute rate applies; 0 "
                                    "means one minute's worth.")

    @property
    def serves_mtls(self) -> bool:
        """The gateway's ports are public (API keys guard them); its tls_dir is for its channels to the mesh."""
        return False

    @property
    def authenticates(self) -> bool:
        """True when clients must present an API key."""
        return bool(self.api_key or self.api_key_file)

    def check_exposure(self) -> None:
        """Closed by default: a non-loopback bind needs API keys (or --insecure)."""
        hosts = [self.host] + ([self.http_host] if self.http_port >= 0 else [])
        exposed = [h for h in hosts if not is_loopback(h)]
        check(not exposed or self.authenticates or self.insecure,
              f"refusing to bind {exposed[0] if exposed else ''} without API keys: give --api-key or "
              "--api-key-file (KVMESH_API_KEY), or --insecure to serve anyone who can reach the port")

    def validate(self) -> None:
        super().validate()
        check(bool(self.model), "model is required: the folder of the served model (--model PATH)")
        check(-1 <= self.http_port <= 65535, f"http_port must be in [-1, 65535], got {self.http_port}")
        check(self.max_body_bytes > 0, f"max_body_bytes must be > 0, got {self.max_body_bytes}")
        check(self.retry_limit >= 0, f"retry_limit must be >= 0, got {self.retry_limit}")
        check(self.migration_limit >= 0, f"migration_limit must be >= 0, got {self.migration_limit}")
        check(self.stall_check_s >= 0, f"stall_check_s must be >= 0, got {self.stall_check_s}")
        check(self.structured_compile_timeout_s > 0,
              f"structured_compile_timeout_s must be > 0, got {self.structured_compile_timeout_s}")
        check(all(key and not any(c.isspace() for c in key) for key in self.api_key),
              "an API key must be non-empty and hold no whitespace")
        check(self.rate_limit_rpm >= 0 and self.rate_limit_burst >= 0, "rate_limit_rpm and rate_limit_burst "
              f"must be >= 0, got {self.rate_limit_rpm} and {self.rate_limit_burst}")
        check(not self.rate_limit_rpm or self.authenticates,
              "rate limits are per tenant, and tenants come from API keys: give --api-key or --api-key-file")
        check(self.request_timeout_s > 0, f"request_timeout_s must be > 0, got {self.request_timeout_s}")
