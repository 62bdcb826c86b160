"""App settings: command-line flags, or SKINGPT_* environment variables (flags win)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """Settings that would make the app unsafe or cannot work."""


class AppSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SKINGPT_", extra="forbid")

    weights: str | None = None  # a bundle directory; None: the demo bundle
    quantize: str = "auto"  # auto | none | int8 | nf4 (bitsandbytes) | int8w | int4 (PyTorch CPU kernels)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    auth: str | None = None  # "user:password"
    api_key: str | None = None  # the OpenAI-compatible API's bearer key (required off loopback)
    no_api: bool = False  # serve the web page only, no /v1 API
    max_batch: int = Field(8, ge=1, le=256)  # answers decoded together on the device, in one batch
    kv_cache_gb: float | None = Field(None, gt=0)  # idle consultations' KV caches; default a third of free memory
    concurrency: int | None = Field(None, ge=1)  # requests Gradio runs at once; default twice max_batch
    max_message_chars: int = 2000
    session_ttl_s: int = 4 * 3600  # an idle consultation is wiped after this long
    upload_ttl_s: int = 15 * 60  # a photo attached but never sent is deleted after this long
    max_photo_mb: int = 1024  # decoded photos held in memory, all consultations together
    cache_dir: str | None = None  # bundle verification records; default $XDG_CACHE_HOME/skingpt

    @field_validator("api_key")
    @classmethod
    def _key_form(cls, value: str | None) -> str | None:
        if value is not None and (len(value) < 8 or any(c.isspace() for c in value)):
            raise ValueError("the API key must be at least 8 characters, without spaces")
        return value

    @field_validator("auth")
    @classmethod
    def _auth_form(cls, value: str | None) -> str | None:
        if value is not None and (":" not in value or not value.split(":", 1)[0] or not value.split(":", 1)[1]):
            raise ValueError("auth must look like user:password")
        return value

    def credentials(self) -> tuple[str, str] | None:
        if self.auth is None:
            return None
        user, password = self.auth.split(":", 1)
        return user, password

    def check_safe(self) -> None:
        """A server reachable from other machines must ask for a password, and for a key on its API."""
        if not is_loopback(self.host) and self.auth is None:
            raise SettingsError(
                f"refusing to listen on {self.host}: other machines could reach the app without a password. "
                f"Add --auth user:password (or SKINGPT_AUTH), or keep the default host 127.0.0.1")
        if not is_loopback(self.host) and not self.no_api and not self.api_key:
            raise SettingsError(
                f"refusing to listen on {self.host}: other machines could use the API without a key. Set "
                f"SKINGPT_API_KEY (or --api-key), or switch the API off with --no-api")


def default_cache_dir() -> Path:
    """Per-user cache (never patient data: only which bundle files passed their sha256 check)."""
    if os.environ.get("SKINGPT_CACHE_DIR"):
        return Path(os.environ["SKINGPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skingpt"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
