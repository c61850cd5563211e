"""A minimal client for OpenAI-compatible `/v1/chat/completions` endpoints (stdlib only).

Judging thousands of responses takes hours; a flaky endpoint must not end the run. So transient
failures (timeouts, connection errors, HTTP 429 and 5xx, unreadable bodies) are retried with
exponential backoff, and a request that still fails returns None and is counted. Only errors that
no retry can fix (bad key, wrong URL or model: HTTP 400/401/403/404) stop the evaluation, at the
first request, with a message naming the setting to fix.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from sealft.errors import ConfigError

_FATAL_STATUS = {400, 401, 403, 404}


def chat_completions_url(base_url: str) -> str:
    """Accept 'http://host/v1', 'http://host' or the full '.../chat/completions' URL."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


class ChatClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 2.0,
        temperature: float = 0.0,
    ) -> None:
        self.url = chat_completions_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.temperature = temperature
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        """Settings recorded with every score (never the key itself)."""
        return {"url": self.url, "model": self.model, "api_key_env": self.api_key_env,
                "temperature": self.temperature, "timeout": self.timeout,
                "retries": self.retries}

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.stats[what] += n

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, payload: dict[str, Any]) -> str:
        """One attempt; returns the reply text or raises (classified by `complete`)."""
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"),
                                         headers=self._headers(), method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
        content = body["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ValueError("reply content is not text")
        return content

    def complete(self, messages: list[dict[str, str]], max_tokens: int = 256) -> str | None:
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": max_tokens}
        for attempt in range(self.retries + 1):
            self.count("requests")
            try:
                return self._post(payload)
            except urllib.error.HTTPError as err:
                if err.code in _FATAL_STATUS:
                    raise ConfigError(
                        f"--llm-url/--llm-model/--llm-api-key-env: the judge endpoint {self.url} "
                        f"answered HTTP {err.code} ({err.reason}); check the URL, model name "
                        f"and the key in ${self.api_key_env}"
                    ) from None
                self.count(f"http_{err.code}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                self.count("timeouts" if "timed out" in str(err) else "connection_errors")
            except (ValueError, KeyError, IndexError, TypeError):
                self.count("bad_bodies")  # not JSON, or JSON without choices[0].message.content
            if attempt < self.retries:
                self.count("retries")
                time.sleep(self.backoff * 2**attempt)
        self.count("failures")
        return None
