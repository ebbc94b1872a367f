"""Prometheus metrics, on a registry per app so that several apps in one process never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.logins = Counter("issuer_logins_total", "Login attempts by outcome", ["outcome"], registry=self.registry)
        self.refreshes = Counter(
            "issuer_refreshes_total", "Refresh attempts by outcome", ["outcome"], registry=self.registry
        )
        self.reuse_detections = Counter(
            "issuer_refresh_reuse_detections_total",
            "Consumed refresh tokens presented again outside the grace window (family revoked)",
            registry=self.registry,
        )
        self.suspicious_refreshes = Counter(
            "issuer_refresh_suspicious_total",
            "Refreshes from another network and another user agent than the session's recent uses, by what "
            "REFRESH_BINDING did (audited, rejected)",
            ["action"],
            registry=self.registry,
        )
        self.token_failures = Counter(
            "issuer_token_verification_failures_total",
            "Bearer tokens refused at the issuer's own endpoints, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.db_errors = Counter(
            "issuer_database_errors_total", "Requests that failed because the database failed", registry=self.registry
        )
        self.throttled = Counter(
            "issuer_throttled_requests_total",
            "Requests refused with 429, by reason (ip rate limit, account lock-out)",
            ["route", "reason"],
            registry=self.registry,
        )
        self.signing_key_age = Gauge(
            "issuer_signing_key_age_seconds",
            "Seconds since the active signing key started signing",
            registry=self.registry,
        )
        self.cleanup_deleted = Counter(
            "issuer_cleanup_deleted_total", "Rows deleted by cleanup", ["kind"], registry=self.registry
        )
        self.latency = Histogram(
            "issuer_request_duration_seconds",
            "Request latency by route",
            ["route", "method"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
