"""The keys of a records folder: a passphrase unlocks them, AES-256-GCM seals every stored value.

Why SQLite with `cryptography`'s AES-GCM rather than SQLCipher: `cryptography` ships wheels for every
platform we install on (no native build, no system library), it is the most widely reviewed crypto
library for Python, and sealing each value ourselves lets each one carry what it belongs to (its
row and kind as associated data, so a sealed value cannot be moved to another row unnoticed).

The passphrase is stretched with scrypt (n=2^15, r=8, p=1: ~32 MiB and ~0.1 s per unlock here) into
a key-encryption key, which unwraps two random 256-bit keys: one seals values, one names rows (an
HMAC of the patient or visit reference, so the index holds no reference in plaintext). A wrong
passphrase fails the unwrap's authentication tag: nothing is opened or changed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from model.errors import UserFacingError

SCRYPT = {"n": 2**15, "r": 8, "p": 1}  # OWASP's floor for scrypt; a clinic PC unlocks in well under a second
MIN_PASSPHRASE = 8  # characters, asked of a new records folder
_WRAP_AAD = b"skingpt-records/keys/v1"
NONCE = 12  # bytes, AES-GCM's standard nonce, drawn at random for every value sealed


class RecordsError(UserFacingError):
    """A records folder that cannot be used: a wrong passphrase, a damaged file, an unknown visit."""


@dataclass(frozen=True)
class Keys:
    seal_key: bytes  # AES-256-GCM key for every stored value
    name_key: bytes  # HMAC-SHA256 key for the row names

    def seal(self, kind: str, row: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + AESGCM(self.seal_key).encrypt(nonce, plaintext, f"{kind}:{row}".encode())

    def open(self, kind: str, row: str, sealed: bytes) -> bytes:
        try:
            return AESGCM(self.seal_key).decrypt(sealed[:NONCE], sealed[NONCE:], f"{kind}:{row}".encode())
        except (InvalidTag, ValueError):
            raise RecordsError(f"a stored {kind} failed its integrity check (the records file was altered "
                               "or damaged); restore the folder from a backup") from None

    def name(self, kind: str, reference: str) -> str:
        """The row name of a patient or visit reference: hex of a keyed hash, the same every time."""
        return hmac.new(self.name_key, f"{kind}:{reference}".encode(), hashlib.sha256).hexdigest()[:32]


def _kek(passphrase: str, salt: bytes, params: dict) -> bytes:
    return hashlib.scrypt(passphrase.encode("utf-8"), salt=salt, n=params["n"], r=params["r"], p=params["p"],
                          maxmem=256 * params["n"] * params["r"] + 2**20, dklen=32)


def new_keys(passphrase: str) -> tuple[Keys, dict]:
    """Fresh keys and the header that stores them wrapped under the passphrase."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise RecordsError(f"a new records folder needs a passphrase of at least {MIN_PASSPHRASE} characters")
    keys = Keys(os.urandom(32), os.urandom(32))
    salt, nonce = os.urandom(16), os.urandom(NONCE)
    wrapped = AESGCM(_kek(passphrase, salt, SCRYPT)).encrypt(nonce, keys.seal_key + keys.name_key, _WRAP_AAD)
    header = {"format": 1, "kdf": "scrypt", **SCRYPT, "salt": salt.hex(), "wrapped": (nonce + wrapped).hex()}
    return keys, header


def unlock(passphrase: str, header: dict) -> Keys:
    """The keys a header holds, or RecordsError when the passphrase is not the one it was made with."""
    if header.get("format") != 1 or header.get("kdf") != "scrypt":
        raise RecordsError(f"records written in an unknown format ({json.dumps(header.get('format'))}); "
                           "use the SkinGPT version that wrote them")
    wrapped = bytes.fromhex(header["wrapped"])
    try:
        both = AESGCM(_kek(passphrase, bytes.fromhex(header["salt"]), header)).decrypt(
            wrapped[:NONCE], wrapped[NONCE:], _WRAP_AAD)
    except InvalidTag:
        raise RecordsError("wrong passphrase for these records: nothing was opened or changed") from None
    return Keys(both[:32], both[32:])
