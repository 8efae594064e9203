"""A reward computed by an HTTP service: JSON in, JSON out, with a timeout and retries.

Request: `POST url` with body `{"prompts": [...], "completions": [...], <column>: [...], ...}`
(every column, or those named in `columns`). Response: `{"rewards": [float | null, ...]}` or a bare
JSON list, one entry per completion. Connection errors, timeouts, HTTP 429 and 5xx are retried with
exponential backoff; other HTTP errors (a 4xx means the request itself is wrong) fail at once.

Secrets: write a header as `"Bearer ${env:JUDGE_TOKEN}"` and the token is read from the environment
when the reward is built; the config (and so the run directory) only ever holds the reference.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Sequence

import requests

from rewards.registry import register, resolve_env


class RemoteRewardError(RuntimeError):
    """The remote scorer failed for the whole batch (after any retries)."""

    whole_batch = True  # the runner does not re-run such a failure row by row


@register("remote")  # the class is the factory: its arguments are checked by name
class RemoteReward:
    """POST the batch to `url` and read one reward per completion from the JSON reply.

    Waits at most `timeout` seconds per attempt and makes `1 + retries` attempts, sleeping
    `backoff * 2**k` seconds before retry k+1; so the worst case is about
    `(1 + retries) * timeout + backoff * (2**retries - 1)` seconds.

    Example:
        >>> judge = RemoteReward("http://127.0.0.1:8000/score", timeout=5.0, retries=2)
        >>> judge(["2+2?"], ["4"], answer=["4"])          # doctest: +SKIP
        [1.0]
        >>> rewards.get("remote", url="http://judge:8000/score",   # the token from $JUDGE_TOKEN
        ...             headers={"Authorization": "Bearer ${env:JUDGE_TOKEN}"})  # doctest: +SKIP
    """

    def __init__(self, url: str, *, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 headers: dict[str, str] | None = None, columns: Sequence[str] | None = None,
                 batch_size: int | None = None) -> None:
        self.url = url  # endpoint that receives the POST
        self.timeout = timeout  # seconds per attempt (connect and read)
        self.retries = retries  # extra attempts after the first
        self.backoff = backoff  # first retry delay in seconds, doubled each time
        # e.g. an Authorization header; "${env:NAME}" in a value is read from the environment
        self.headers = resolve_env(dict(headers or {}), f"remote reward {url}")
        self.columns = None if columns is None else list(columns)  # columns to send (None: all)
        self.batch_size = batch_size  # completions per request (None: the whole batch)
        self._lock = threading.Lock()
        self._counts = dict(requests=0, retries=0, failures=0)

    def __call__(self, prompts: list[str], completions: list[str],
                 **columns: list[Any]) -> list[float | None]:
        """One reward per completion from the service; RemoteRewardError when it fails."""
        names = sorted(columns) if self.columns is None else self.columns
        missing = [n for n in names if n not in columns]
        if missing:
            raise KeyError(f"remote reward: missing columns {missing}; got {sorted(columns)}")
        step = self.batch_size or max(1, len(completions))
        out: list[float | None] = []
        for start in range(0, len(completions), step):
            part = slice(start, start + step)
            body = {"prompts": list(prompts[part]), "completions": list(completions[part])}
            body.update({n: list(columns[n][part]) for n in names})
            out.extend(self._post(body, len(body["completions"])))
        return out

    def _post(self, body: dict, n: int) -> list[float | None]:
        try:
            data = json.dumps(body)
        except TypeError as exc:
            raise TypeError(f"remote reward: a column is not JSON-serialisable ({exc}); "
                            "pass `columns=[...]` to send only some") from exc
        headers = {"Content-Type": "application/json", **self.headers}
        last: Exception | None = None
        for attempt in range(1 + self.retries):
            if attempt:
                self._count("retries")
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self._count("requests")
            try:
                reply = requests.post(self.url, data=data, headers=headers, timeout=self.timeout)
            except requests.RequestException as exc:  # connection refused, timeout, ...
                last = exc
                continue
            if reply.status_code == 429 or reply.status_code >= 500:
                last = RemoteRewardError(f"HTTP {reply.status_code}: {reply.text[:200]}")
                continue
            if reply.status_code >= 400:
                self._count("failures")
                raise RemoteRewardError(f"remote reward {self.url}: HTTP {reply.status_code}: "
                                        f"{reply.text[:200]}")
            return self._parse(reply, n)
        self._count("failures")
        raise RemoteRewardError(f"remote reward {self.url} failed after {1 + self.retries} "
                                f"attempts: {type(last).__name__}: {last}") from last

    def _parse(self, reply: requests.Response, n: int) -> list[float | None]:
        try:
            payload = reply.json()
        except ValueError as exc:
            self._count("failures")
            raise RemoteRewardError(f"remote reward {self.url}: reply is not JSON: "
                                    f"{reply.text[:200]!r}") from exc
        values = payload.get("rewards") if isinstance(payload, dict) else payload
        if not isinstance(values, list) or len(values) != n:
            self._count("failures")
            raise RemoteRewardError(f"remote reward {self.url}: expected a list of {n} rewards "
                                    f"(or {{'rewards': [...]}}), got {str(payload)[:200]}")
        try:
            return [None if v is None else float(v) for v in values]
        except (TypeError, ValueError) as exc:
            self._count("failures")
            raise RemoteRewardError(f"remote reward {self.url}: non-numeric reward in "
                                    f"{str(values)[:200]}") from exc

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def counters(self) -> dict[str, int]:
        """Cumulative counts: requests (attempts), retries, failures (batches given up on)."""
        with self._lock:
            return dict(self._counts)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
