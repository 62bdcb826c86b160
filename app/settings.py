"""App settings: command-line flags, or SKINGPT_* environment variables (flags win)."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.errors import UserFacingError
from model.choices import DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_QUANTIZE, Dtype, Quantize, check_device


ROOT = Path(__file__).resolve().parent.parent
MAX_PHOTOS = 8  # photos one consultation may hold, on the page and through the API


class SettingsError(UserFacingError, ValueError):
    """Settings that would make the app unsafe or cannot work."""


class AppSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SKINGPT_", extra="forbid")

    weights: str | None = None  # a bundle directory; None: the demo bundle
    # the load policy's choices and defaults (model.choices, torch-free)
    quantize: Quantize = DEFAULT_QUANTIZE
    device: str = DEFAULT_DEVICE  # auto | cpu | cuda | cuda:N
    dtype: Dtype = DEFAULT_DTYPE
    host: str = "127.0.0.1"
    port: int = 7860
    auth: str | None = None  # "user:password"
    api_key: str | None = None  # the API's bearer key(s), comma-separated: one per caller (required off loopback)
    api_key_file: str | None = None  # more keys, one a line ('#' starts a comment)
    allowed_hosts: str | None = None  # comma-separated names the server may be reached by (a reverse proxy's); *: any
    cors_origins: str | None = None  # comma-separated origins whose pages may call the server; default none
    request_timeout_s: float = Field(600.0, gt=0)  # one answer, queue wait included; then it stops with a message
    no_api: bool = False  # serve the web page only, no /v1 API
    max_batch: int = Field(8, ge=1, le=256)  # answers decoded together on the device, in one batch
    kv_cache_gb: float | None = Field(None, gt=0)  # idle consultations' KV caches; default: what the consultations can fill, at most a third of free memory
    concurrency: int | None = Field(None, ge=1)  # requests Gradio runs at once; default twice max_batch
    max_message_chars: int = 2000
    session_ttl_s: int = 4 * 3600  # an idle consultation is wiped after this long
    upload_ttl_s: int = 15 * 60  # a photo attached but never sent is deleted after this long
    max_photo_mb: int = 1024  # decoded photos held in memory, all consultations together
    cache_dir: str | None = None  # bundle verification records; default $XDG_CACHE_HOME/skingpt
    demo_bundle: str | None = None  # where the demo bundle is generated and read; default weights/demo
    # answers from a vLLM server (launch.py export-vllm + vllm serve): its /v1 URL, bearer key, model name
    engine_url: str | None = None
    engine_key: str | None = None
    engine_model: str | None = None
    # kept visits (off by default): the folder, a file holding its passphrase (else SKINGPT_RECORDS_PASSPHRASE
    # or the terminal; cli.records), and how many days a visit is kept (None: until deleted)
    records: str | None = None
    records_passphrase_file: str | None = None
    retain_days: int | None = Field(None, ge=1)
    # a test hook, not a flag: while this file exists, answers wait before each decode step (and the log
    # says "decode held"), so tests hang up or stop answers known to be under way on a machine of any speed
    test_decode_gate: str | None = None

    @field_validator("api_key")
    @classmethod
    def _key_form(cls, value: str | None) -> str | None:
        if value is not None:
            _check_keys(value.split(","))
        return value

    def api_keys(self) -> list[str]:
        """Every bearer key: those of `api_key`, then those of `api_key_file`."""
        keys = [k for k in (self.api_key or "").split(",") if k]
        if self.api_key_file:
            try:
                lines = Path(self.api_key_file).read_text().splitlines()
            except OSError as err:
                raise SettingsError(f"cannot read the API key file {self.api_key_file}: {err.strerror}") from None
            found = [line.split("#", 1)[0].strip() for line in lines]
            try:
                keys += _check_keys([k for k in found if k], where=f" in {self.api_key_file}")
            except ValueError as err:
                raise SettingsError(str(err)) from None
        return keys

    def host_names(self) -> list[str]:
        return [h.strip().lower() for h in (self.allowed_hosts or "").split(",") if h.strip()]

    def origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in (self.cors_origins or "").split(",") if o.strip()]

    @field_validator("engine_url")
    @classmethod
    def _engine_url_form(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError(f"should be the engine's API address, such as http://127.0.0.1:8000/v1, not {value[:60]!r}")
        return value

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        return check_device(value)

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

    # -- what the settings build --------------------------------------------------------------------
    def demo_path(self) -> Path:
        return Path(self.demo_bundle) if self.demo_bundle else ROOT / "weights" / "demo"

    def verification_record(self, bundle: str | Path) -> Path:
        """Where this user's record of which of `bundle`'s files passed their sha256 check lives
        (a per-user cache: never patient data)."""
        from model.weights.bundle import verification_record

        return verification_record(Path(self.cache_dir) if self.cache_dir else _user_cache(), bundle)

    def engine_options(self, bundle: Path, hold=None):
        """The one options object `model.serving.engine.open_engine` builds an engine from."""
        from model.serving.engine import EngineOptions
        from model.weights.policy import LoadPolicy

        kv_bytes = int(self.kv_cache_gb * 2**30) if self.kv_cache_gb is not None else None
        return EngineOptions(bundle, LoadPolicy(device=self.device, dtype=self.dtype, quantize=self.quantize),
                             record=self.verification_record(bundle), max_batch=self.max_batch, kv_cache_bytes=kv_bytes,
                             request_timeout_s=self.request_timeout_s, hold=hold)

    def check_safe(self) -> None:
        """A server reachable from other machines must ask for a password, and for a key on its API."""
        if not is_loopback(self.host) and self.auth is None:
            raise SettingsError(
                f"refusing to listen on {self.host}: other machines could reach the app without a password. "
                f"Add --auth user:password (or SKINGPT_AUTH), or keep the default host 127.0.0.1")
        if not is_loopback(self.host) and not self.no_api and not self.api_keys():
            raise SettingsError(
                f"refusing to listen on {self.host}: other machines could use the API without a key. Set "
                f"SKINGPT_API_KEY (or --api-key), or switch the API off with --no-api")


def _check_keys(keys: list[str], where: str = "") -> list[str]:
    for key in keys:
        if len(key) < 8 or any(c.isspace() for c in key):
            raise ValueError(f"an API key{where} is too short or has spaces: each key needs at least 8 characters "
                             f"and no spaces (for example the output of: python -c \"import secrets; "
                             f"print(secrets.token_urlsafe(24))\")")
    return keys


def problems(err) -> str:
    """A pydantic ValidationError of the settings as one plain line per setting: what is wrong and
    where to change it (the flag, or the SKINGPT_* variable), never pydantic's own dump."""
    lines = []
    for item in err.errors():
        name = str(item["loc"][0]) if item["loc"] else "settings"
        flag, variable = "--" + name.replace("_", "-"), "SKINGPT_" + name.upper()
        message = str(item.get("ctx", {}).get("error") or item["msg"]).removeprefix("Value error, ")
        lines.append(f"{flag} / {variable}: {message}")
    return "; ".join(lines)


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skingpt"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
