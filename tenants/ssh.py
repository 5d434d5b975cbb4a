"""Parse and check OpenSSH public keys (the one-line `authorized_keys` format)."""

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

MIN_RSA_BITS = 2048

_ECDSA_BITS = {
    "ecdsa-sha2-nistp256": 256,
    "ecdsa-sha2-nistp384": 384,
    "ecdsa-sha2-nistp521": 521,
    "sk-ecdsa-sha2-nistp256@openssh.com": 256,
}
_ED25519 = {"ssh-ed25519", "sk-ssh-ed25519@openssh.com"}
_REFUSED = {
    "ssh-dss": gettext_lazy(
        "DSA keys are no longer secure and are not accepted. Generate an ed25519 key: ssh-keygen -t ed25519"
    ),
}


@dataclass(frozen=True)
class PublicKey:
    key_type: str
    bits: int
    fingerprint: str
    comment: str
    normalised: str  # "type base64 [comment]" on one line


def _read_string(blob: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 4 > len(blob):
        raise ValueError("truncated")
    (length,) = struct.unpack(">I", blob[offset : offset + 4])
    start, end = offset + 4, offset + 4 + length
    if end > len(blob):
        raise ValueError("truncated")
    return blob[start:end], end


def _mpint_bits(value: bytes) -> int:
    return int.from_bytes(value, "big").bit_length()


def parse_public_key(text: str) -> PublicKey:
    """Validate one OpenSSH public key line; raise ValidationError with a message a person can act on."""
    line = " ".join((text or "").split())
    if not line:
        raise ValidationError(_("Paste your public key, e.g. the contents of ~/.ssh/id_ed25519.pub."))
    if "PRIVATE KEY" in line:
        raise ValidationError(_("This is a private key. Never share it: paste the .pub file instead."))
    parts = line.split(" ", 2)
    if len(parts) < 2:
        raise ValidationError(_("A public key has a type and a base64 body, e.g. 'ssh-ed25519 AAAA… you@host'."))
    key_type, body = parts[0], parts[1]
    comment = parts[2] if len(parts) > 2 else ""
    if key_type in _REFUSED:
        raise ValidationError(str(_REFUSED[key_type]))
    if key_type not in _ED25519 and key_type not in _ECDSA_BITS and key_type != "ssh-rsa":
        raise ValidationError(
            _("Unsupported key type '%(type)s'. Use ed25519, ECDSA or RSA of at least %(bits)s bits.")
            % {"type": key_type[:40], "bits": MIN_RSA_BITS}
        )
    try:
        blob = base64.b64decode(body, validate=True)
        embedded_type, offset = _read_string(blob, 0)
        if embedded_type.decode("ascii") != key_type:
            raise ValueError("type mismatch")
        if key_type == "ssh-rsa":
            exponent, offset = _read_string(blob, offset)
            modulus, offset = _read_string(blob, offset)
            bits = _mpint_bits(modulus)
            if not exponent or bits == 0:
                raise ValueError("empty rsa key")
        elif key_type in _ED25519:
            point, offset = _read_string(blob, offset)
            if len(point) != 32:
                raise ValueError("bad ed25519 key")
            bits = 256
        else:
            curve, offset = _read_string(blob, offset)
            point, offset = _read_string(blob, offset)
            if not key_type.endswith(curve.decode("ascii") + ("@openssh.com" if key_type.startswith("sk-") else "")):
                raise ValueError("curve mismatch")
            if not point or point[0] != 4:
                raise ValueError("bad ecdsa point")
            bits = _ECDSA_BITS[key_type]
        if key_type.startswith("sk-"):
            _application, offset = _read_string(blob, offset)
        if offset != len(blob):
            raise ValueError("trailing data")
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(
            _("The key body is damaged (it is not a valid %(type)s key). Copy the whole line again.")
            % {"type": key_type}
        ) from exc
    if key_type == "ssh-rsa" and bits < MIN_RSA_BITS:
        raise ValidationError(
            _("This RSA key has %(bits)s bits; at least %(min)s are required. Generate an ed25519 key instead.")
            % {"bits": bits, "min": MIN_RSA_BITS}
        )
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    normalised = f"{key_type} {body}" + (f" {comment}" if comment else "")
    return PublicKey(
        key_type=key_type, bits=bits, fingerprint=f"SHA256:{digest}", comment=comment, normalised=normalised
    )
